"""The peer API over HTTPS between two real bridges, and handshake failures.

Certificates come from :mod:`tests.support.pki`; the sites are two ``jmix-bridge
run`` processes (:class:`tests.support.sites.Sites`) with ``http.tls`` on B and
``peers[].tls`` on A.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import ssl
import threading

import pytest

from bridge.peer.server import server_ssl_context
from bridge.peer.settings import ServerSettings
from bridge.tls import log_handshake_failures
from tests.support.net import wait_until
from tests.support.pki import CertificateAuthority
from tests.support.sites import Pacs, Sites, dead_jobs, end_state, send, study_of


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(folder, "ca")
    stranger_ca = CertificateAuthority(folder / "stranger", "stranger-ca")
    return {
        "ca": ca.cert,
        "stranger-ca": stranger_ca.cert,
        "site-b": ca.issue("site-b", server=True),
        "site-a": ca.issue("site-a", client=True),
    }


@pytest.fixture
def pacs(tmp_path):
    scp = Pacs(tmp_path / "pacs")
    yield scp
    scp.stop()


def https_sites(tmp_path, pacs, pki, *, trusted_ca, client_cert=True) -> Sites:
    """Sites A and B with B's API on HTTPS, requiring a client certificate."""
    b_cert, a_cert = pki["site-b"], pki["site-a"]
    sites = Sites(
        tmp_path / "sites",
        (pacs.ae_title, pacs.port),
        peer_scheme="https",
        b={
            "http": {
                "tls": {
                    "cert": str(b_cert.cert),
                    "key": str(b_cert.key),
                    "ca": str(pki["ca"]),
                    "require_client_cert": True,
                }
            }
        },
    )
    tls = {"ca": str(trusted_ca)}
    if client_cert:
        tls |= {"cert": str(a_cert.cert), "key": str(a_cert.key)}
    sites.a_conf["peers"][0]["tls"] = tls
    return sites


def test_envelope_travels_to_an_https_peer_with_a_client_certificate(
    tmp_path, pacs, pki
):
    sites = https_sites(tmp_path, pacs, pki, trusted_ca=pki["ca"])
    study = study_of(tmp_path / "study", 5)
    try:
        sites.start_b()
        sites.start_a()
        assert send(sites, study).returncode == 0
        repeats = end_state(sites, pacs, study)
        log_b = sites.b.log_text()
    finally:
        sites.stop()

    assert repeats == 0
    assert dead_jobs(sites) == 0
    assert "scheme=https" in log_b


def test_peer_certificate_from_an_untrusted_ca_is_retried_and_says_why(
    tmp_path, pacs, pki
):
    sites = https_sites(tmp_path, pacs, pki, trusted_ca=pki["stranger-ca"])
    study = study_of(tmp_path / "study", 2)
    try:
        sites.start_b()
        a = sites.start_a()
        assert send(sites, study).returncode == 0
        wait_until(
            lambda: "queue=deliver" in a.log_text() and "retry" in a.log_text(),
            30,
            "a delivery retry",
        )
        log_a = a.log_text()
    finally:
        sites.stop()

    [line] = [
        x for x in log_a.splitlines() if "job retry scheduled" in x and "deliver" in x
    ][:1]
    assert "CERTIFICATE_VERIFY_FAILED" in line


def test_https_handshake_failure_is_logged_on_the_server_side(pki, caplog):
    b_cert = pki["site-b"]
    settings = ServerSettings(
        host="127.0.0.1",
        port=0,
        tls_cert=b_cert.cert,
        tls_key=b_cert.key,
        client_ca=pki["ca"],
        require_client_cert=True,
    )
    ctx = log_handshake_failures(server_ssl_context(settings), "http")
    caplog.set_level(logging.WARNING, logger="bridge.tls")
    port, stop = _asyncio_tls_server(ctx)
    client = ssl.create_default_context(cafile=str(pki["ca"]))  # no certificate
    try:
        # Under TLS 1.3 the client learns of the refusal only on its next
        # read, if at all; what matters here is the server's line.
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=5) as raw,
            client.wrap_socket(raw, server_hostname="127.0.0.1") as tls,
        ):
            tls.sendall(b"GET / HTTP/1.1\r\n\r\n")
            tls.recv(1)
        wait_until(lambda: "tls handshake failed" in caplog.text, 10, "the log line")
    finally:
        stop()

    assert "service=http side=server" in caplog.text
    assert "reason=PEER_DID_NOT_RETURN_A_CERTIFICATE" in caplog.text


def _asyncio_tls_server(ctx: ssl.SSLContext):
    """Serve TLS with ``ctx`` on asyncio, as aiohttp does; return (port, stop)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    holder = {}

    async def handle(reader, writer):
        writer.close()

    async def start():
        holder["server"] = await asyncio.start_server(handle, "127.0.0.1", 0, ssl=ctx)
        ready.set()

    def run():
        loop.run_until_complete(start())
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    ready.wait(10)

    def stop():
        loop.call_soon_threadsafe(loop.stop)
        thread.join(5)

    return holder["server"].sockets[0].getsockname()[1], stop
