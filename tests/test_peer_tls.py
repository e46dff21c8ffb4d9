"""The exchange API over HTTPS, with client certificates pinned per sender."""

import datetime
import hashlib
import ipaddress
import ssl

import httpx
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from bridge.peer.client import PeerClient
from bridge.peer.settings import PeerSettings
from tests.support.peer_env import BridgeProcess, make_key_dirs, pack_envelope


def _issue(folder, name, issuer=None, *, ca=False, server=False):
    """Write ``<name>.pem`` and ``<name>.key``; return (cert, key, sha256 of DER)."""
    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    issuer_cert, issuer_key = issuer or (None, key)
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer_cert.subject if issuer_cert else subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        ).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
    elif not ca:
        builder = builder.add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False
        )
    cert = builder.sign(issuer_key, hashes.SHA256())
    (folder / f"{name}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path = folder / f"{name}.key"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    key_path.chmod(0o600)
    der = cert.public_bytes(serialization.Encoding.DER)
    return cert, key, hashlib.sha256(der).hexdigest()


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    folder = tmp_path_factory.mktemp("pki")
    ca_cert, ca_key, _ = _issue(folder, "ca", ca=True)
    _issue(folder, "server", (ca_cert, ca_key), server=True)
    _, _, pinned = _issue(folder, "client-a", (ca_cert, ca_key))
    _, _, both = _issue(folder, "client-both", (ca_cert, ca_key))
    _issue(folder, "client-stranger", (ca_cert, ca_key))
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
