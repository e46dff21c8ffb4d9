"""The receiving side of the exchange API (``JMIX.md`` section 5), on aiohttp.

``POST /api/jmix`` takes an envelope zip from an authenticated peer;
``GET /api/jmix/{id}``, ``GET /api/jmix/{id}/manifest``,
``GET /api/jmix/{id}/audit`` (this node's copy of the audit trail, with the
entries it added; docs/governance.md) and ``GET /api/jmix?studyInstanceUid=``
serve envelopes this node holds for the asking peer. Every request is
authenticated before any byte of its body is read: by a bearer token, a TLS
client certificate pinned by the SHA-256 of its DER, or both, as each sender's
settings demand. The headers alone decide 401,
403, 411, 413 and 415; a client sending ``Expect: 100-continue`` gets the refusal
instead of the go-ahead.

An accepted body streams to a temporary file in the spool, never into memory,
with the size limit enforced as it arrives (a chunked body or a lying
``Content-Length`` cannot exceed it), and is fsynced and renamed into place only
once complete. A body cut short stores nothing.

Status codes: 201 stored; 400 not a (valid) envelope or an incomplete body; 401
no credential, or a token that names no sender; 403 a credential that does not
match the sender's settings; 404 no such envelope for this peer; 406 an Accept
header that excludes the answer; 409 an id received before; 411 no length and
not chunked; 413 beyond ``max_body_bytes``; 415 not ``application/zip``.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import os
import ssl
import threading
from collections.abc import Iterable
from pathlib import Path

from aiohttp import ClientPayloadError, web
from aiohttp.http_exceptions import HttpProcessingError

from bridge import jmix
from bridge.errors import (
    EnvelopeError,
    ExpiredAssertion,
    MalformedEnvelope,
    PolicyViolation,
    SpoolError,
)
from bridge.jmix.audit import current_audit
from bridge.peer.connections import ClientLimit, GatedSite
from bridge.peer.intake import Intake
from bridge.peer.settings import InboundSender, ServerSettings
from bridge.spool import validate_envelope_id
from bridge.tls import listening_sockets, log_handshake_failures, server_context

logger = logging.getLogger(__name__)

API = "/api/jmix"
ZIP = "application/zip"
CHUNK = 1 << 20

_SETTINGS = web.AppKey("settings", ServerSettings)
_AUTH = web.AppKey("authenticator", object)
_INTAKE = web.AppKey("intake", Intake)


class Refused(Exception):
    """A request refused before its body is read; carries the HTTP answer."""

    def __init__(self, status: int, reason: str, headers: dict | None = None):
        super().__init__(reason)
        self.status = status
        self.reason = reason
        self.headers = headers or {}


def _normalise_fp(text: str) -> str:
    return text.replace(":", "").strip().lower()


class Authenticator:
    """Finds the sender of a request from its bearer token and client certificate."""

    def __init__(self, senders: Iterable[InboundSender]):
        self.senders = list(senders)
        for s in self.senders:
            if not (s.token or s.client_cert_sha256):
                raise ValueError(
                    f"sender {s.name}: expected a token or a client_cert_sha256"
                )

    def identify(self, request: web.BaseRequest) -> InboundSender:
        """Return the sender that ``request`` authenticates as; raise Refused.

        A sender with both a token and a pinned certificate must present both,
        and credentials that name two different senders are refused.
        Comparisons run in constant time over every sender.
        """
        token = _bearer(request)
        fp = _client_cert_sha256(request)
        if not token and not fp:
            raise Refused(401, "credential required", {"WWW-Authenticate": "Bearer"})

        by_token = by_cert = None
        for s in self.senders:
            if (
                s.token
                and token
                and hmac.compare_digest(s.token.encode(), token.encode())
            ):
                by_token = by_token or s
            if (
                s.client_cert_sha256
                and fp
                and hmac.compare_digest(_normalise_fp(s.client_cert_sha256), fp)
            ):
                by_cert = by_cert or s
        if token and by_token is None:
            raise Refused(
                401,
                "invalid credential",
                {"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        sender = by_token or by_cert
        if sender is None:
            raise Refused(403, "client certificate not allowed")
        if by_token and by_cert and by_token is not by_cert:
            raise Refused(403, "credentials of two different senders")
        if (sender.token and by_token is not sender) or (
            sender.client_cert_sha256 and by_cert is not sender
        ):
            raise Refused(403, "credential does not match the sender's settings")
        return sender


def _bearer(request: web.BaseRequest) -> str:
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if header and scheme.lower() != "bearer":
        raise Refused(401, "expected a bearer token", {"WWW-Authenticate": "Bearer"})
    return value.strip()


def _client_cert_sha256(request: web.BaseRequest) -> str:
    transport = request.transport
    ssl_object = transport.get_extra_info("ssl_object") if transport else None
    if ssl_object is None:
        return ""
    der = ssl_object.getpeercert(binary_form=True)
    return hashlib.sha256(der).hexdigest() if der else ""


def _refusal(exc: Refused) -> web.Response:
    resp = web.json_response(
        {"error": exc.reason}, status=exc.status, headers=exc.headers
    )
    # The body was never read: close the connection rather than drain it.
    resp.force_close()
    return resp


# The outcome label (metrics.RECEIVE_OUTCOMES) of an upload refused by status.
_REFUSAL_OUTCOMES = {401: "unauthorized", 403: "unauthorized", 413: "too_large"}


def _refused_upload(request: web.Request, exc: Refused, sender: str = "") -> None:
    """Count an upload refused before its envelope was checked (400s: malformed)."""
    outcome = _REFUSAL_OUTCOMES.get(exc.status, "malformed")
    request.app[_INTAKE].refused(outcome, sender)


def _authenticate(request: web.Request) -> InboundSender:
    return request.app[_AUTH].identify(request)


def _check_upload_headers(request: web.Request) -> None:
    """Refuse on the headers alone: type, length and size."""
    if request.content_type != ZIP:
        raise Refused(415, f"expected Content-Type {ZIP}")
    limit = request.app[_SETTINGS].max_body_bytes
    length = request.content_length
    chunked = "chunked" in request.headers.get("Transfer-Encoding", "").lower()
    if length is None and not chunked:
        raise Refused(411, "Content-Length required")
    if length is not None and length > limit:
        raise Refused(413, f"body of {length} bytes exceeds the limit of {limit}")


async def _expect_handler(request: web.Request) -> web.StreamResponse | None:
    """Answer ``Expect: 100-continue`` with the refusal, if any, else continue."""
    sender = None
    try:
        sender = _authenticate(request)
        _check_upload_headers(request)
    except Refused as exc:
        _refused_upload(request, exc, sender.name if sender else "")
        return _refusal(exc)
    if request.headers.get("Expect", "").lower() != "100-continue":
        raise web.HTTPExpectationFailed(text="unknown Expect value")
    await request.writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
    return None


async def post_envelope(request: web.Request) -> web.StreamResponse:
    """``POST /api/jmix``: store an envelope zip and queue it for opening."""
    sender = None
    try:
        sender = _authenticate(request)
        _check_upload_headers(request)
    except Refused as exc:
        _refused_upload(request, exc, sender.name if sender else "")
        return _refusal(exc)
    intake = request.app[_INTAKE]
    limit = request.app[_SETTINGS].max_body_bytes

    part = intake.spool.temp_path(".upload")
    try:
        size = await _receive(request, part, limit)
    except Refused as exc:
        _discard(part)
        _refused_upload(request, exc, sender.name)
        logger.warning("upload refused sender=%s status=%d", sender.name, exc.status)
        return _refusal(exc)
    except BaseException:
        _discard(part)
        raise

    try:
        return await asyncio.to_thread(_take, intake, part, sender, size)
    finally:
        _discard(part)


async def _receive(request: web.Request, part: Path, limit: int) -> int:
    """Stream the body into ``part``; return its size. Raise Refused when cut short.

    A body that sends no byte for ``body_idle_seconds`` is refused with 408: a
    slow but steady upload goes on, a stalled one does not hold the connection.
    """
    expected = request.content_length
    idle = request.app[_SETTINGS].body_idle_seconds
    size = 0
    fh = await asyncio.to_thread(open, part, "wb")
    try:
        try:
            while chunk := await _next_chunk(request, idle):
                size += len(chunk)
                if size > limit:
                    raise Refused(413, f"body exceeds the limit of {limit} bytes")
                fh.write(chunk)
        except (OSError, ClientPayloadError, HttpProcessingError) as exc:
            # aiohttp signals a body shorter than its Content-Length, or a broken
            # chunked encoding, with its payload errors; a reset with OSError.
            raise Refused(400, "incomplete body") from exc
        if expected is not None and size != expected:
            raise Refused(400, "incomplete body")
        await asyncio.to_thread(_flush, fh)
    finally:
        fh.close()
    return size


async def _next_chunk(request: web.Request, idle: float) -> bytes:
    """Return the next bytes of the body (b"" at its end); raise Refused when idle."""
    try:
        async with asyncio.timeout(idle):
            return await request.content.read(CHUNK)
    except TimeoutError as exc:
        raise Refused(408, f"no body byte received for {idle:g} seconds") from exc


def _flush(fh) -> None:
    fh.flush()
    os.fsync(fh.fileno())


def _discard(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _take(intake: Intake, part: Path, sender: InboundSender, size: int) -> web.Response:
    """Check and record a received body (runs in a worker thread)."""
    try:
        checked = intake.check(part, sender)
    except MalformedEnvelope as exc:
        logger.warning("upload rejected sender=%s reason=malformed", sender.name)
        return web.json_response({"error": f"malformed envelope: {exc}"}, status=400)
    except (PolicyViolation, ExpiredAssertion) as exc:
        # Authentic, but against this node's policy: the sender authenticated
        # itself and can only fix what it is told (an envelope for another
        # receiver, a missing requester, encryption required).
        logger.warning("upload rejected sender=%s reason=policy", sender.name)
        return web.json_response(
            {"error": f"envelope refused by policy: {exc}"}, status=400
        )
    except EnvelopeError:
        # A signature, key or digest that fails says no more than that
        # (errors.py): the answer must not help anyone forge one.
        logger.warning("upload rejected sender=%s reason=verification", sender.name)
        return web.json_response({"error": "envelope verification failed"}, status=400)

    if not intake.accept(part, checked, sender):
        logger.info(
            "upload duplicate envelope=%s sender=%s", checked.envelope_id, sender.name
        )
        return web.json_response(
            {"id": checked.envelope_id, "error": "envelope already received"},
            status=409,
        )
    return web.json_response(
        {"id": checked.envelope_id, "status": "stored"},
        status=201,
        headers={"Location": f"{API}/{checked.envelope_id}"},
    )


def _held_envelope(request: web.Request, sender: InboundSender) -> Path:
    """Return the file of the envelope in the URL that ``sender`` may read; raise 404.

    A peer may read what was built for it and what it sent, nothing else.
    """
    intake = request.app[_INTAKE]
    try:
        envelope_id = validate_envelope_id(request.match_info["id"].lower())
    except SpoolError:
        raise web.HTTPNotFound() from None
    for direction in ("out", "in"):
        env = intake.store.get_envelope(envelope_id, direction)
        if env is None or env.peer != sender.name or not env.path:
            continue
        try:
            path = intake.spool.path_of(env.path)
        except SpoolError:
            continue
        if path.is_file():
            return path
    raise web.HTTPNotFound()


def _accepts(request: web.Request, media: str) -> bool:
    accept = request.headers.get("Accept", "")
    if not accept:
        return True
    major = media.split("/")[0]
    for item in accept.split(","):
        kind = item.split(";")[0].strip().lower()
        if kind in (media, f"{major}/*", "*/*"):
            return True
    return False


async def get_envelope(request: web.Request) -> web.StreamResponse:
    """``GET /api/jmix/{id}``: the envelope zip, to the peer it concerns."""
    try:
        sender = _authenticate(request)
    except Refused as exc:
        return _refusal(exc)
    if not _accepts(request, ZIP):
        raise web.HTTPNotAcceptable()
    path = await asyncio.to_thread(_held_envelope, request, sender)
    return web.FileResponse(path, headers={"Content-Type": ZIP})


async def get_manifest(request: web.Request) -> web.StreamResponse:
    """``GET /api/jmix/{id}/manifest``: the envelope's manifest as JSON."""
    try:
        sender = _authenticate(request)
    except Refused as exc:
        return _refusal(exc)
    if not _accepts(request, "application/json"):
        raise web.HTTPNotAcceptable()
    path = await asyncio.to_thread(_held_envelope, request, sender)
    try:
        manifest = await asyncio.to_thread(jmix.read_manifest, path)
    except EnvelopeError:
        raise web.HTTPNotFound() from None
    return web.json_response(manifest)


async def get_audit(request: web.Request) -> web.StreamResponse:
    """``GET /api/jmix/{id}/audit``: this node's copy of the envelope's audit."""
    try:
        sender = _authenticate(request)
    except Refused as exc:
        return _refusal(exc)
    if not _accepts(request, "application/json"):
        raise web.HTTPNotAcceptable()
    path = await asyncio.to_thread(_held_envelope, request, sender)
    try:
        audit = await asyncio.to_thread(current_audit, path)
    except EnvelopeError:
        raise web.HTTPNotFound() from None
    return web.json_response(audit if audit is not None else {"audit": []})


async def list_envelopes(request: web.Request) -> web.StreamResponse:
    """``GET /api/jmix?studyInstanceUid=``: the asking peer's envelopes of a study."""
    try:
        sender = _authenticate(request)
    except Refused as exc:
        return _refusal(exc)
    study_uid = request.query.get("studyInstanceUid", "")
    if not study_uid:
        raise web.HTTPBadRequest(text="studyInstanceUid is required")
    store = request.app[_INTAKE].store
    found = await asyncio.to_thread(
        store.find_envelopes, study_instance_uid=study_uid, limit=1000
    )
    items = [
        {
            "id": env.id,
            "direction": env.direction,
            "state": env.state,
            "sizeBytes": env.size_bytes,
            "createdAt": env.created_at,
        }
        for env in found
        if env.peer == sender.name
    ]
    return web.json_response({"envelopes": items})


def create_app(
    settings: ServerSettings, senders: Iterable[InboundSender], intake: Intake
) -> web.Application:
    """Return the aiohttp application of the exchange API.

    Serve it with ``lingering_time=0`` (as :class:`PeerServer` does) so that a
    refused upload's unread body is never drained: the connection is closed
    after the answer instead.
    """
    app = web.Application()
    app[_SETTINGS] = settings
    app[_AUTH] = Authenticator(senders)
    app[_INTAKE] = intake
    app.router.add_route("POST", API, post_envelope, expect_handler=_expect_handler)
    app.router.add_get(API, list_envelopes)
    app.router.add_get(API + "/{id}", get_envelope)
    app.router.add_get(API + "/{id}/manifest", get_manifest)
    app.router.add_get(API + "/{id}/audit", get_audit)
    return app


def server_ssl_context(settings: ServerSettings) -> ssl.SSLContext | None:
    """Return the TLS context of ``settings``, or None for plain HTTP.

    With ``client_ca`` set, clients may present a certificate issued by it (and
    must, with ``require_client_cert``); which certificate is allowed is then
    decided per sender by its pinned fingerprint.
    """
    if not settings.tls_cert:
        return None
    return server_context(
        settings.tls_cert,
        settings.tls_key,
        settings.client_ca,
        settings.require_client_cert,
    )


HEADER_SECONDS = 15.0
"""How long a client has to send a request's headers, and an idle connection lives."""


class PeerServer:
    """Runs an application on its own event loop in a background thread.

    On :meth:`stop`, requests in flight get ``shutdown_seconds`` to finish; an
    upload cut off then stores nothing, and its sender tries again. A connection
    that has not sent complete request headers ``header_seconds`` after it opened
    (or after its previous answer) is closed: a slow-loris client cannot hold a
    connection by trickling header bytes. Nor by stalling its body (the
    settings' ``body_idle_seconds``), nor by opening many connections (at most
    ``max_connections_per_client`` per client address).
    """

    def __init__(
        self,
        app: web.Application,
        settings: ServerSettings,
        shutdown_seconds: float = 5.0,
        header_seconds: float = HEADER_SECONDS,
    ):
        self.app = app
        self.settings = settings
        self.port = settings.port
        self.shutdown_seconds = shutdown_seconds
        self.header_seconds = header_seconds
        self._loop: asyncio.AbstractEventLoop | None = None
        self._runner: web.AppRunner | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    def start(self, timeout: float = 30.0) -> None:
        """Bind and start serving; return once the socket accepts connections.

        Raises OSError when the address cannot be bound, ssl.SSLError or OSError
        when the TLS files cannot be loaded.
        """
        self._thread = threading.Thread(target=self._run, name="peer-api", daemon=True)
        self._thread.start()
        self._ready.wait(timeout)
        if self._error is not None:
            raise self._error
        scheme = "https" if self.settings.tls_cert else "http"
        logger.info(
            "peer api listening scheme=%s host=%s port=%d",
            scheme,
            self.settings.host,
            self.port,
        )

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._start())
        except BaseException as exc:
            self._error = exc
        self._ready.set()
        if self._error is None:
            loop.run_forever()
        loop.close()

    async def _start(self) -> None:
        self._runner = web.AppRunner(
            self.app,
            lingering_time=0,
            access_log=None,
            handle_signals=False,
            shutdown_timeout=self.shutdown_seconds,
            # aiohttp has no header-read timeout of its own. Its keep-alive timer
            # (armed when a connection opens and after each answer) closes a
            # connection still waiting for a complete request, which is one;
            # once the headers are in, the request is no longer waiting and the
            # timer leaves a long upload alone.
            keepalive_timeout=self.header_seconds,
        )
        await self._runner.setup()
        ctx = server_ssl_context(self.settings)
        if ctx is not None:
            # Without this a failed handshake (an untrusted client certificate,
            # plain HTTP to this port) leaves no trace on this side.
            log_handshake_failures(ctx, "http")
        limit = ClientLimit(self.settings.max_connections_per_client)
        for sock in listening_sockets(self.settings.host, self.settings.port):
            site = GatedSite(
                self._runner,
                sock,
                limit,
                ssl_context=ctx,
                handshake_seconds=self.header_seconds,
            )
            await site.start()
        self.port = self._runner.addresses[0][1]

    def stop(self) -> None:
        """Stop accepting, let requests in flight finish, and end the loop's thread."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None or not thread.is_alive():
            return
        if self._runner is not None:
            done = asyncio.run_coroutine_threadsafe(self._runner.cleanup(), loop)
            with contextlib.suppress(Exception):
                done.result(self.shutdown_seconds + 5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(self.shutdown_seconds + 5)
        logger.info("peer api stopped port=%d", self.port)
