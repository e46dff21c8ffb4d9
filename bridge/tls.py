"""TLS contexts for the bridge's servers, and one log line per failed handshake.

A failed TLS handshake is easy to misread: pynetdicom's server drops the
connection without a word (``socketserver`` swallows the error raised while it
wraps the accepted socket), and a client sees only "unable to connect". The
operator needs to know that the certificate, not the DICOM or HTTP layer, is
the problem. :func:`log_handshake_failures` makes a context's sockets log
``tls handshake failed`` with the peer's address and OpenSSL's reason
(``TLSV1_ALERT_UNKNOWN_CA``, ``certificate verify failed: ...``); the reason
names no certificate content, only what went wrong.
"""

from __future__ import annotations

import contextlib
import logging
import ssl
from pathlib import Path

logger = logging.getLogger(__name__)


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
    # peer's address, so that line says peer_host=unknown.
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
            _log_failure(self._service, self.server_side, "unknown", exc)
            raise


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
