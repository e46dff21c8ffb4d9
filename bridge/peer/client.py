"""The sending side of the exchange API: POST an envelope zip to a peer.

The body streams from disk with its ``Content-Length`` declared, so the peer can
refuse an oversize upload before reading it, and memory stays flat whatever the
size of the study. The peer's answer is classified once, here (``JMIX.md``
section 5): 201 and 409 mean delivered (409 is the peer saying it holds that id
already); 408, 429, 5xx and network errors are worth retrying, honouring
``Retry-After`` (RFC 9110 10.2.3); any other answer is a refusal for good. httpx
exceptions are translated into :mod:`bridge.errors` here and nowhere else.
"""

from __future__ import annotations

import contextlib
import email.utils
import logging
import os
import ssl
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

import httpx

from bridge.errors import PermanentTransportError, RetryableTransportError
from bridge.peer.settings import PeerSettings

logger = logging.getLogger(__name__)

API_PATH = "/api/jmix"
CHUNK = 1 << 20
EXCERPT = 200  # characters of a refusal's body kept in the error


@dataclass(frozen=True)
class Delivery:
    """A delivered envelope: the peer's status (201 or 409) and its answer's id."""

    status: int
    peer_id: str = ""

    @property
    def duplicate(self) -> bool:
        """True when the peer already held the envelope (409)."""
        return self.status == 409


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Return a ``Retry-After`` header as seconds from now, or None when absent or bad.

    The header is either a number of seconds or an HTTP-date (RFC 9110 10.2.3);
    a date in the past gives 0.
    """
    if not value:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        moment = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if moment.tzinfo is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, moment.timestamp() - now)


def _file_chunks(path: Path, size: int) -> Iterator[bytes]:
    """Yield exactly ``size`` bytes of ``path``; raise if the file is shorter."""
    remaining = size
    with open(path, "rb") as fh:
        while remaining:
            chunk = fh.read(min(CHUNK, remaining))
            if not chunk:
                raise RetryableTransportError(
                    f"envelope file shrank while sending: expected {size} bytes"
                )
            remaining -= len(chunk)
            yield chunk


def _excerpt(response: httpx.Response) -> str:
    try:
        text = response.read().decode("utf-8", "replace")
    except httpx.HTTPError:
        return ""
    return " ".join(text.split())[:EXCERPT]


class PeerClient:
    """Sends envelopes to one peer over HTTP(S); reusable and thread-safe.

    Holds one connection pool; call :meth:`close` when done.
    """

    def __init__(self, peer: PeerSettings):
        self.peer = peer
        self._client = httpx.Client(
            verify=self._verify(peer),
            timeout=httpx.Timeout(peer.timeout_seconds),
            headers={"Authorization": f"Bearer {peer.token}"} if peer.token else {},
            follow_redirects=False,
        )

    @staticmethod
    def _verify(peer: PeerSettings) -> ssl.SSLContext | bool:
        if not peer.url.startswith("https:"):
            return True
        ctx = ssl.create_default_context(
            cafile=str(peer.ca_file) if peer.ca_file else None
        )
        if peer.client_cert:
            ctx.load_cert_chain(
                str(peer.client_cert),
                str(peer.client_key) if peer.client_key else None,
            )
        return ctx

    @property
    def endpoint(self) -> str:
        """The URL envelopes are posted to."""
        return self.peer.url.rstrip("/") + API_PATH

    def send(self, path: Path) -> Delivery:
        """POST the envelope zip at ``path`` and return how the peer took it.

        Raises RetryableTransportError (network, timeout, 408, 429, 5xx; with
        the peer's ``Retry-After`` when given) or PermanentTransportError (any
        other answer but 201 and 409).
        """
        size = os.stat(path).st_size
        headers = {"Content-Type": "application/zip", "Content-Length": str(size)}

        with (
            self._translated(),
            self._client.stream(
                "POST", self.endpoint, content=_file_chunks(path, size), headers=headers
            ) as response,
        ):
            return self._classify(response)

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """Translate httpx's network errors into ours, once, here."""
        try:
            yield
        except httpx.TimeoutException as exc:
            raise RetryableTransportError(
                f"peer {self.peer.name}: timed out ({type(exc).__name__})"
            ) from exc
        except httpx.TransportError as exc:
            raise RetryableTransportError(
                f"peer {self.peer.name}: network error ({type(exc).__name__}: {exc})"
            ) from exc

    def send_receipt(self, envelope_id: str, jws: bytes) -> None:
        """POST a signed delivery receipt to ``<url>/api/jmix/{id}/receipt``.

        Raises RetryableTransportError or PermanentTransportError as
        :meth:`send` does; 200 is success.
        """
        url = f"{self.endpoint}/{envelope_id}/receipt"
        with self._translated():
            response = self._client.post(
                url, content=jws, headers={"Content-Type": "application/jose"}
            )
        if response.status_code != 200:
            self._refusal(response)

    def _classify(self, response: httpx.Response) -> Delivery:
        status = response.status_code
        if status in (201, 409):
            return Delivery(status, self._answer_id(response))
        self._refusal(response)

    def _refusal(self, response: httpx.Response) -> NoReturn:
        """Raise the error an unwanted answer means: retry later, or never."""
        status = response.status_code
        where = f"peer {self.peer.name} answered {status}"
        if status in (408, 429) or status >= 500:
            retry_after = parse_retry_after(response.headers.get("Retry-After"))
            raise RetryableTransportError(
                f"{where}: {_excerpt(response)}", retry_after=retry_after
            )
        raise PermanentTransportError(f"{where}: {_excerpt(response)}")

    @staticmethod
    def _answer_id(response: httpx.Response) -> str:
        try:
            response.read()
            doc = response.json()
        except (httpx.HTTPError, ValueError):
            return ""
        return str(doc.get("id", "")) if isinstance(doc, dict) else ""

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()
