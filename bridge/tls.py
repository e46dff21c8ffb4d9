"""TLS contexts for the bridge's servers, and one log line per failed handshake.

A failed TLS handshake is easy to misread: pynetdicom's server drops the
connection without a word (``socketserver`` swallows the error raised while it
wraps the accepted socket), and a client sees only "unable to connect". The
operator needs to know that the certificate, not the DICOM or HTTP layer, is
the problem. :func:`log_handshake_failures` makes a context's sockets log
``tls handshake failed`` with the peer's address and OpenSSL's reason
(``TLSV1_ALERT_UNKNOWN_CA``, ``certificate verify failed: ...``); the reason
names no certificate content, only what went wrong. An asyncio server (aiohttp)
learns the peer's address for that line only when it listens on sockets from
:func:`listening_sockets`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import socket
import ssl
from pathlib import Path

logger = logging.getLogger(__name__)

# The address of the connection an asyncio server accepted last in this context.
_accepted_peer: contextvars.ContextVar[str] = contextvars.ContextVar(
    "tls_accepted_peer", default="unknown"
)


def server_context(
    cert: Path,
    key: Path | None,
    ca: Path | None = None,
    require_client_cert: bool = False,
) -> ssl.SSLContext:
    """Return a server context for ``cert``/``key``; clients verified against ``ca``.

    Without ``ca`` no client certificate is asked for. With it, a client may
    present one issued by ``ca``, and must when ``require_client_cert``.
    TLS 1.2 or later, as the DICOM BCP 195 profiles ask (PS3.15 B.9, B.10).
    Raises OSError or ssl.SSLError when a file cannot be loaded.
    """
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(str(cert), str(key) if key else None)
    if ca is not None:
        ctx.load_verify_locations(cafile=str(ca))
        required = ssl.CERT_REQUIRED if require_client_cert else ssl.CERT_OPTIONAL
        ctx.verify_mode = required
    return ctx


def handshake_reason(exc: BaseException) -> str:
    """Return a short, data-free reason for a failed handshake."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError):
        return exc.reason or type(exc).__name__
    if isinstance(exc, TimeoutError):
        return "timed out"
    if isinstance(exc, ConnectionError):
        return "connection closed by peer"
    return type(exc).__name__


def log_handshake_failures(
    ctx: ssl.SSLContext, service: str, timeout: float | None = None
) -> ssl.SSLContext:
    """Make sockets wrapped by ``ctx`` log one line when their handshake fails.

    ``service`` names the endpoint in the line (``dicom``, ``forward``, ``http``).
    ``timeout`` (seconds) bounds a handshake on a socket that has no timeout of
    its own, such as one pynetdicom's server has just accepted. Returns ``ctx``,
    changed in place (its ``sslsocket_class``); the error is still raised.
    """
    ctx.sslsocket_class = type(
        "HandshakeLoggingSocket",
        (_HandshakeLoggingSocket,),
        {"_service": service, "_handshake_timeout": timeout},
    )
    # asyncio (and so aiohttp) drives TLS through memory BIOs, not sockets; it
    # logs a failed handshake only in debug mode. The object cannot see the
    # peer's address: it reads what listening_sockets() recorded, or says
    # peer_host=unknown.
    ctx.sslobject_class = type(
        "HandshakeLoggingObject", (_HandshakeLoggingObject,), {"_service": service}
    )
    return ctx


class _HandshakeLoggingSocket(ssl.SSLSocket):
    _service = "tls"
    _handshake_timeout: float | None = None

    def do_handshake(self, block: bool = False) -> None:
        previous = self.gettimeout()
        if previous is None and self._handshake_timeout is not None:
            self.settimeout(self._handshake_timeout)
        try:
            super().do_handshake(block)
        except OSError as exc:  # ssl.SSLError is an OSError
            _log_failure(self._service, self.server_side, _peer_host(self), exc)
            raise
        finally:
            if previous is None and self._handshake_timeout is not None:
                with contextlib.suppress(OSError):
                    self.settimeout(None)


class _HandshakeLoggingObject(ssl.SSLObject):
    _service = "tls"

    def do_handshake(self) -> None:
        try:
            super().do_handshake()
        except (ssl.SSLWantReadError, ssl.SSLWantWriteError):
            raise  # the handshake goes on when more bytes arrive
        except ssl.SSLError as exc:
            _log_failure(self._service, self.server_side, _accepted_peer.get(), exc)
            raise


def listening_sockets(host: str, port: int) -> list[socket.socket]:
    """Bind TCP sockets on every address of ``host`` for an asyncio server to serve.

    Binds as ``loop.create_server(host=..., port=...)`` would (SO_REUSEADDR,
    IPv6 sockets IPv6-only; port 0 picks a free port per address) but does not
    listen: the server does. Each accepted connection's address is recorded for
    :func:`log_handshake_failures`' line. That relies on asyncio running the
    handshake of a connection in the context of the task it made on accepting
    it (Python 3.11's selector loop does; on another loop the line says
    peer_host=unknown). Raises OSError when ``host`` does not resolve or an
    address cannot be bound.
    """
    infos = socket.getaddrinfo(
        host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(infos):
            sock = _PeerRecordingSocket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                sock.bind(address)
            except OSError as exc:
                raise OSError(
                    exc.errno, f"cannot bind {address[0]} port {port}: {exc.strerror}"
                ) from exc
    except BaseException:
        for sock in sockets:
            sock.close()
        raise
    return sockets


class _PeerRecordingSocket(socket.socket):
    def accept(self):
        conn, address = super().accept()
        # asyncio makes the connection's task right after this call, and the
        # task copies the context, so each connection sees its own address.
        _accepted_peer.set(str(address[0]))
        return conn, address


def _log_failure(service: str, server_side: bool, peer: str, exc: BaseException):
    logger.warning(
        "tls handshake failed service=%s side=%s peer_host=%s reason=%s",
        service,
        "server" if server_side else "client",
        peer,
        handshake_reason(exc),
    )


def _peer_host(sock: ssl.SSLSocket) -> str:
    try:
        return str(sock.getpeername()[0])
    except OSError:
        return sock.server_hostname or "unknown"
