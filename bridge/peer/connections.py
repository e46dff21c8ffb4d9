"""Connections of the peer API: a cap on the connections of each client address.

The peer API's server (:mod:`bridge.peer.server`) listens through a
:class:`GatedSite`, whose every connection passes a :class:`_Gate` before
aiohttp's handler sees it. A client already holding its share is cut before a
byte of the new connection is read, so one client cannot take every
connection of the server while others still get in (README L-35 says what is
left unbounded).
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl

from aiohttp import web

logger = logging.getLogger(__name__)


class ClientLimit:
    """Counts open connections per client address (used on the loop's thread only).

    The total over all addresses is not bounded (README L-35).
    """

    def __init__(self, cap: int):
        self.cap = cap
        self.open: collections.Counter[str] = collections.Counter()

    def admit(self, host: str) -> bool:
        """Count a new connection from ``host``; False when it would pass the cap."""
        if self.open[host] >= self.cap:
            return False
        self.open[host] += 1
        return True

    def release(self, host: str) -> None:
        """Forget one connection from ``host``."""
        self.open[host] -= 1
        if self.open[host] <= 0:
            del self.open[host]


class _Gate(asyncio.Protocol):
    """Hands a connection to aiohttp's handler only if its client is under the cap.

    A refused connection is aborted before any byte of it is read: a client
    cannot hold every connection of the server, and other clients still get in.
    """

    def __init__(self, handler: asyncio.Protocol, limit: ClientLimit):
        self._handler = handler
        self._limit = limit
        self._host: str | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        """Admit or abort the connection."""
        peer = transport.get_extra_info("peername")
        host = str(peer[0]) if peer else ""
        if not self._limit.admit(host):
            logger.warning(
                "peer api connection refused client=%s reason=too many connections "
                "limit=%d",
                host,
                self._limit.cap,
            )
            transport.abort()
            return
        self._host = host
        self._handler.connection_made(transport)

    def connection_lost(self, exc: Exception | None) -> None:
        """Release the client's count and tell the handler."""
        if self._host is None:
            return
        self._limit.release(self._host)
        self._handler.connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Pass the bytes of an admitted connection on."""
        if self._host is not None:
            self._handler.data_received(data)

    def eof_received(self) -> bool | None:
        """Pass the end of an admitted connection's input on."""
        return self._handler.eof_received() if self._host is not None else None

    def pause_writing(self) -> None:
        """Pass flow control on."""
        if self._host is not None:
            self._handler.pause_writing()

    def resume_writing(self) -> None:
        """Pass flow control on."""
        if self._host is not None:
            self._handler.resume_writing()


class GatedSite(web.BaseSite):
    """A site on an already bound socket whose connections pass a :class:`_Gate`."""

    def __init__(
        self,
        runner: web.BaseRunner,
        sock,
        limit: ClientLimit,
        *,
        ssl_context: ssl.SSLContext | None,
        handshake_seconds: float,
    ):
        super().__init__(runner, ssl_context=ssl_context)
        self._sock = sock
        self._limit = limit
        self._handshake_seconds = handshake_seconds

    @property
    def name(self) -> str:
        """The site's address, as aiohttp names sites."""
        host, port = self._sock.getsockname()[:2]
        scheme = "https" if self._ssl_context else "http"
        return f"{scheme}://{host}:{port}"

    async def start(self) -> None:
        """Register with the runner and start accepting."""
        await super().start()
        server = self._runner.server
        extra = {}
        if self._ssl_context is not None:
            # A TLS client is counted once its handshake is done; until then
            # this bound, like the header timeout, limits how long it may stall.
            extra["ssl_handshake_timeout"] = self._handshake_seconds
        self._server = await asyncio.get_running_loop().create_server(
            lambda: _Gate(server(), self._limit),
            sock=self._sock,
            ssl=self._ssl_context,
            backlog=self._backlog,
            **extra,
        )
