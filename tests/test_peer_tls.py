"""The exchange API over HTTPS, with client certificates pinned per sender."""

import logging
import ssl

import httpx
import pytest
from aiohttp import web

from bridge.peer.client import PeerClient
from bridge.peer.server import PeerServer
from bridge.peer.settings import PeerSettings, ServerSettings
from tests.support.net import wait_until
from tests.support.peer_env import BridgeProcess, make_key_dirs, pack_envelope
from tests.support.pki import CertificateAuthority


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(folder, "ca")
    ca.issue("server", server=True)
    pinned = ca.issue("client-a", client=True).sha256
    both = ca.issue("client-both", client=True).sha256
    ca.issue("client-stranger", client=True)
    # A client certificate from a CA the server does not trust at all.
    CertificateAuthority(folder / "untrusted", "untrusted-ca").issue(
        "client-untrusted",
        client=True,
        cert_path=folder / "client-untrusted.pem",
        key_path=folder / "client-untrusted.key",
    )
    return folder, pinned, both


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_key_dirs(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def receiver(tmp_path_factory, pki, keys):
    folder, pinned, both = pki
    signing = [str(keys / "a" / "signing.pub")]
    proc = BridgeProcess(
        tmp_path_factory.mktemp("procs"),
        "b",
        {
            "server": {
                "tls_cert": str(folder / "server.pem"),
                "tls_key": str(folder / "server.key"),
                "client_ca": str(folder / "ca.pem"),
            },
            "senders": [
                {
                    "name": "site-a",
                    "client_cert_sha256": pinned,
                    "signing_keys": signing,
                },
                {
                    "name": "site-c",
                    "token": "token-c",
                    # Pins are accepted in the colon-separated upper-case form too.
                    "client_cert_sha256": ":".join(
                        both[i : i + 2].upper() for i in range(0, 64, 2)
                    ),
                    "signing_keys": signing,
                },
            ],
        },
    ).start()
    yield proc
    proc.stop()


@pytest.fixture
def envelope(tmp_path, keys):
    return pack_envelope(tmp_path / "env.zip", keys / "a", keys / "b")


def _https(receiver, pki, cert=None, token=None):
    folder = pki[0]
    ctx = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(folder / f"{cert}.pem"), str(folder / f"{cert}.key"))
    headers = {"Content-Type": "application/zip"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.Client(
        base_url=f"https://127.0.0.1:{receiver.port}", verify=ctx, headers=headers
    )


def test_peer_client_with_a_pinned_certificate_delivers(receiver, pki, envelope):
    folder = pki[0]
    client = PeerClient(
        PeerSettings(
            name="site-b",
            url=f"https://127.0.0.1:{receiver.port}",
            ca_file=folder / "ca.pem",
            client_cert=folder / "client-a.pem",
            client_key=folder / "client-a.key",
        )
    )

    result = client.send(envelope.path)

    client.close()
    assert result.status == 201
    store = receiver.store()
    assert store.get_envelope(envelope.envelope_id, "in").peer == "site-a"
    store.close()


def test_certificate_of_the_ca_that_is_not_pinned_answers_403(receiver, pki, envelope):
    with _https(receiver, pki, cert="client-stranger") as client:
        resp = client.post("/api/jmix", content=envelope.path.read_bytes())

    assert resp.status_code == 403


def test_no_certificate_and_no_token_over_tls_answers_401(receiver, pki, envelope):
    with _https(receiver, pki) as client:
        resp = client.post("/api/jmix", content=envelope.path.read_bytes())

    assert resp.status_code == 401


def test_sender_with_token_and_certificate_needs_both(receiver, pki, envelope):
    with _https(receiver, pki, token="token-c") as client:
        token_only = client.post("/api/jmix", content=envelope.path.read_bytes())
    with _https(receiver, pki, cert="client-both", token="token-c") as client:
        both = client.post("/api/jmix", content=envelope.path.read_bytes())

    assert token_only.status_code == 403
    assert both.status_code == 201


def test_certificate_pinned_for_one_sender_with_anothers_token_answers_403(
    receiver, pki, envelope
):
    with _https(receiver, pki, cert="client-a", token="token-c") as client:
        resp = client.post("/api/jmix", content=envelope.path.read_bytes())

    assert resp.status_code == 403


@pytest.fixture
def hello_server(pki):
    """An in-process PeerServer answering GET /hello over HTTPS with client certs."""
    folder = pki[0]

    async def hello(request):
        return web.Response(text="hello")

    app = web.Application()
    app.router.add_get("/hello", hello)
    settings = ServerSettings(
        port=0,
        tls_cert=folder / "server.pem",
        tls_key=folder / "server.key",
        client_ca=folder / "ca.pem",
        require_client_cert=True,
    )
    server = PeerServer(app, settings, shutdown_seconds=0.2)
    server.start()
    yield server
    server.stop()


def _handshake_lines(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.getMessage().startswith("tls handshake failed")
    ]


@pytest.mark.parametrize(
    ("scheme", "cert", "reason"),
    [
        ("https", "client-untrusted", "reason=certificate verify failed: "),
        ("http", None, "reason=HTTP_REQUEST"),
    ],
    ids=["untrusted-client-certificate", "plain-http"],
)
def test_failed_handshake_logs_one_line_and_the_server_serves_on(
    hello_server, pki, caplog, scheme, cert, reason
):
    caplog.set_level(logging.WARNING, logger="bridge.tls")
    folder = pki[0]
    ctx = ssl.create_default_context(cafile=str(folder / "ca.pem"))
    if cert:
        ctx.load_cert_chain(str(folder / f"{cert}.pem"), str(folder / f"{cert}.key"))
    url = f"{scheme}://127.0.0.1:{hello_server.port}/hello"

    with pytest.raises(httpx.TransportError):
        httpx.get(url, verify=ctx, timeout=10)
    wait_until(lambda: _handshake_lines(caplog), 10, "the handshake log line")
    with _https(hello_server, pki, cert="client-a") as client:
        good = client.get("/hello")

    [line] = _handshake_lines(caplog)
    assert "service=http side=server peer_host=127.0.0.1 " in line
    assert reason in line
    assert good.status_code == 200
