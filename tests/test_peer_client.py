"""The sending client: streaming upload and how each answer of a peer is classified."""

import asyncio
import email.utils

import pytest
from aiohttp import web

from bridge.errors import PermanentTransportError, RetryableTransportError
from bridge.peer.client import PeerClient, parse_retry_after
from bridge.peer.server import PeerServer
from bridge.peer.settings import InboundSender, PeerSettings, ServerSettings
from tests.support.net import free_port


class StubPeer:
    """A peer on loopback that records each upload and answers as told."""

    def __init__(self):
        self.status = 201
        self.headers: dict[str, str] = {}
        self.body = b'{"id": "abc", "status": "stored"}'
        self.hang = False
        self.seen: list[tuple[dict, bytes]] = []
        app = web.Application(client_max_size=16 << 20)
        app.router.add_post("/api/jmix", self.handle)
        # A short shutdown: the hanging handler is cut off at teardown.
        self.server = PeerServer(app, ServerSettings(port=0), shutdown_seconds=0.2)

    async def handle(self, request):
        data = await request.read()
        self.seen.append((dict(request.headers), data))
        if self.hang:
            await asyncio.Event().wait()
        return web.Response(status=self.status, headers=self.headers, body=self.body)


@pytest.fixture(scope="module")
def stub():
    peer = StubPeer()
    peer.server.start()
    yield peer
    peer.server.stop()


@pytest.fixture
def peer(stub):
    stub.status, stub.headers, stub.hang = 201, {}, False
    stub.body = b'{"id": "abc", "status": "stored"}'
    return stub


def _client(port, **settings):
    return PeerClient(
        PeerSettings(
            name="site-b", url=f"http://127.0.0.1:{port}", token="tok", **settings
        )
    )


@pytest.fixture
def envelope(tmp_path):
    path = tmp_path / "env.zip"
    path.write_bytes(bytes(range(256)) * 5000)
    return path


def test_send_streams_the_file_with_its_content_length_and_token(peer, envelope):
    client = _client(peer.server.port)

    result = client.send(envelope)

    headers, data = peer.seen[-1]
    assert (result.status, result.peer_id, result.duplicate) == (201, "abc", False)
    assert data == envelope.read_bytes()
    assert headers["Content-Length"] == str(envelope.stat().st_size)
    assert "Transfer-Encoding" not in headers
    assert headers["Authorization"] == "Bearer tok"
    assert headers["Content-Type"] == "application/zip"
    client.close()


def test_409_counts_as_delivered(peer, envelope):
    peer.status = 409

    result = _client(peer.server.port).send(envelope)

    assert result.duplicate


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503])
def test_retryable_answers_raise_retryable_with_retry_after(peer, envelope, status):
    peer.status, peer.headers = status, {"Retry-After": "7"}

    with pytest.raises(RetryableTransportError) as err:
        _client(peer.server.port).send(envelope)

    assert err.value.retry_after == 7
    assert f"answered {status}" in str(err.value)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 415])
def test_other_4xx_answers_raise_permanent_with_status_and_excerpt(
    peer, envelope, status
):
    peer.status, peer.body = status, b'{"error": "' + b"why " * 200 + b'"}'

    with pytest.raises(PermanentTransportError) as err:
        _client(peer.server.port).send(envelope)

    message = str(err.value)
    assert f"answered {status}" in message
    assert "why why" in message
    assert len(message) < 300


def test_refused_connection_is_retryable(envelope):
    with pytest.raises(RetryableTransportError, match="network error") as err:
        _client(free_port()).send(envelope)

    assert err.value.retry_after is None


def test_peer_that_never_answers_times_out_as_retryable(peer, envelope):
    peer.hang = True

    with pytest.raises(RetryableTransportError, match="timed out"):
        _client(peer.server.port, timeout_seconds=0.5).send(envelope)


def test_retry_after_as_seconds():
    assert parse_retry_after("120") == 120.0


def test_retry_after_as_http_date():
    now = 1_800_000_000.0
    value = email.utils.formatdate(now + 90, usegmt=True)

    assert parse_retry_after(value, now=now) == pytest.approx(90)


def test_retry_after_date_in_the_past_is_zero():
    value = email.utils.formatdate(1_000_000_000, usegmt=True)

    assert parse_retry_after(value, now=1_800_000_000.0) == 0.0


@pytest.mark.parametrize("value", [None, "", "soon", "-5", "1.5e9x"])
def test_retry_after_that_is_absent_or_bad_is_none(value):
    assert parse_retry_after(value) is None


def test_settings_repr_masks_tokens():
    peer = PeerSettings(name="site-b", url="https://b.example", token="s3cret-1")
    sender = InboundSender(name="site-a", token="s3cret-2")

    assert "s3cret" not in repr(peer) + repr(sender)
    assert "token=***" in repr(peer)
    assert "token=''" in repr(InboundSender(name="x", client_cert_sha256="ab"))
