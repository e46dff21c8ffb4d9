"""Key discovery: the key block, trust add, the CLI verbs, and a real HTTPS directory.

The directory is a small HTTPS server run by the test, with a certificate the
test makes; the resolver accepts a key only when pinned or attested.
"""

import datetime
import ipaddress
import json
import ssl
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from bridge.cli import main
from bridge.errors import KeyFileError, UnknownSigner
from bridge.jmix import TrustStore, fingerprint, generate_key_dir, load_key_dir
from bridge.jmix._codec import b64encode
from bridge.jmix.attestation import make_attestation
from bridge.jmix.keys import PublicKeys, raw_public, read_public_keys
from bridge.peer.directory import DirectoryResolver
from tests.test_jmix_roundtrip import make_study

REFERENCE = "directory://org/site-a#key-ed25519"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    for name in ("a", "b", "directory", "requester", "rogue"):
        generate_key_dir(root / name)
    return root


def _block(folder: Path, node_id="org:site-a") -> str:
    kd = load_key_dir(folder)
    return PublicKeys(
        kd.signing_key.public_key(), kd.encryption_key.public_key(), node_id
    ).block()


# -- the key block ------------------------------------------------------------------


def test_key_block_round_trips(keys):
    read = read_public_keys(_block(keys / "a"))
    kd = load_key_dir(keys / "a")
    assert fingerprint(read.signing) == kd.signing_fingerprint
    assert fingerprint(read.encryption) == kd.encryption_fingerprint
    assert read.node_id == "org:site-a"


def test_key_block_with_a_wrong_fingerprint_is_refused(keys):
    text = _block(keys / "a").replace("SHA256:", "SHA256:0", 1)
    with pytest.raises(KeyFileError):
        read_public_keys(text)


def test_key_block_with_a_typo_in_a_key_is_refused(keys):
    lines = _block(keys / "a").splitlines()
    label, kind, raw, fp = lines[2].split(" ")
    lines[2] = " ".join([label, kind, ("A" if raw[0] != "A" else "B") + raw[1:], fp])
    with pytest.raises(KeyFileError, match="does not match"):
        read_public_keys("\n".join(lines))


def test_keygen_prints_a_block_that_trust_add_imports(tmp_path, capsys):
    assert main(["keygen", str(tmp_path / "k"), "--id", "org:site-a"]) == 0
    printed = capsys.readouterr().out
    (tmp_path / "block.txt").write_text(printed)
    into = tmp_path / "peers" / "site-a"
    assert main(["trust", "add", str(tmp_path / "block.txt"), "--into", str(into)]) == 0
    out = capsys.readouterr().out
    fp = load_key_dir(tmp_path / "k").signing_fingerprint
    assert fp in out and "signing_key_fingerprints" in out
    assert (into / "signing.pub").is_file() and (into / "encryption.pub").is_file()


def test_trust_add_refuses_a_fingerprint_read_back_wrong(tmp_path, keys, capsys):
    (tmp_path / "block.txt").write_text(_block(keys / "a"))
    code = main(
        [
            "trust",
            "add",
            str(tmp_path / "block.txt"),
            "--into",
            str(tmp_path / "p"),
            "--fingerprint",
            "SHA256:" + "0" * 64,
        ]
    )
    assert code == 2 and not (tmp_path / "p").exists()


def test_keygen_qr_draws_a_code(tmp_path, capsys):
    pytest.importorskip("segno")
    assert main(["keygen", str(tmp_path / "k"), "--qr"]) == 0
    assert "█" in capsys.readouterr().out


# -- request, attest, pack and verify from the command line ---------------------------


def test_cli_request_attest_pack_and_verify_with_every_policy(tmp_path, keys, capsys):
    study = make_study(tmp_path / "study", count=2)
    (tmp_path / "a.txt").write_text(_block(keys / "a"))
    steps = [
        [
            "request",
            "--key", str(keys / "requester"),
            "--requester-id", "org:dr-smith",
            "--requester-name", "Dr Smith",
            "--requester-contact", "smith@example.org",
            "--receiver-id", "org:site-b",
            "-o", str(tmp_path / "request.json"),
        ],
        [
            "attest",
            "--key", str(keys / "directory" / "signing.key"),
            "--provider", "test-directory",
            "--subject-id", "org:site-a",
            "--subject-keys", str(tmp_path / "a.txt"),
            "--key-reference", REFERENCE,
            "-o", str(tmp_path / "attestation.json"),
        ],
        [
            "pack", str(study),
            "-o", str(tmp_path / "e.zip"),
            "--from", str(keys / "a"),
            "--to", str(keys / "b" / "encryption.pub"),
            "--sender-id", "org:site-a",
            "--receiver-id", "org:site-b",
            "--request", str(tmp_path / "request.json"),
            "--key-reference", REFERENCE,
            "--attestation", str(tmp_path / "attestation.json"),
        ],
        [
            "verify", str(tmp_path / "e.zip"),
            "--key", str(keys / "b"),
            "--trust", f"org:site-a={keys / 'a' / 'signing.pub'}",
            "--expect-key-reference", REFERENCE,
            "--requester-trust", f"org:dr-smith={keys / 'requester' / 'signing.pub'}",
            "--requester-policy", "required",
            "--directory-key", f"test-directory={keys / 'directory' / 'signing.pub'}",
            "--attestation-policy", "required",
            "--key-reference-policy", "required",
            "--audit-policy", "required",
        ],
    ]  # fmt: skip
    for argv in steps:
        assert main(argv) == 0, argv
    out = capsys.readouterr().out
    for element in ("requester", "attestation", "key_reference", "audit"):
        assert f"{element}: verified" in out

    assert main(["inspect", str(tmp_path / "e.zip")]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["requester"]["id"] == "org:dr-smith"
    assert shown["audit"][0]["event"] == "created"


def test_cli_verify_refuses_an_attestation_by_an_untrusted_directory(
    tmp_path, keys, capsys
):
    study = make_study(tmp_path / "study", count=1)
    (tmp_path / "a.txt").write_text(_block(keys / "a"))
    rogue = [
        "attest", "--key", str(keys / "rogue" / "signing.key"),
        "--provider", "test-directory", "--subject-id", "org:site-a",
        "--subject-keys", str(tmp_path / "a.txt"), "-o", str(tmp_path / "att.json"),
    ]  # fmt: skip
    assert main(rogue) == 0
    packed = [
        "pack", str(study), "-o", str(tmp_path / "e.zip"), "--from", str(keys / "a"),
        "--to", str(keys / "b" / "encryption.pub"), "--sender-id", "org:site-a",
        "--attestation", str(tmp_path / "att.json"),
    ]  # fmt: skip
    assert main(packed) == 0
    code = main(
        [
            "verify", str(tmp_path / "e.zip"), "--key", str(keys / "b"),
            "--trust", str(keys / "a" / "signing.pub"),
            "--directory-key", str(keys / "directory" / "signing.pub"),
        ]
    )  # fmt: skip
    assert code == 3
    assert "not trusted" in capsys.readouterr().err


# -- a directory served over HTTPS by the test ----------------------------------------


def _certificate(folder: Path) -> tuple[Path, Path]:
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_path, key_path = folder / "cert.pem", folder / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_path, key_path


@pytest.fixture
def directory(tmp_path, keys):
    """An HTTPS directory serving site A's key, attested, and a rogue key, not."""
    site_a = load_key_dir(keys / "a").signing_key.public_key()
    rogue = load_key_dir(keys / "rogue").signing_key.public_key()
    entries = {
        REFERENCE: {
            "key_reference": REFERENCE,
            "alg": "Ed25519",
            "public_key": b64encode(raw_public(site_a)),
            "fingerprint": fingerprint(site_a),
            "directory_attestation": make_attestation(
                load_key_dir(keys / "directory").signing_key,
                "test-directory",
                "org:site-a",
                site_a,
                key_reference=REFERENCE,
            ),
        },
        "directory://org/rogue#key": {
            "key_reference": "directory://org/rogue#key",
            "alg": "Ed25519",
            "public_key": b64encode(raw_public(rogue)),
            "fingerprint": fingerprint(rogue),
        },
    }
    asked = []

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self):
            url = urlparse(self.path)
            ref = parse_qs(url.query).get("ref", [""])[0]
            asked.append(ref)
            doc = entries.get(ref) if url.path == "/keys" else None
            body = json.dumps(doc).encode() if doc else b"{}"
            self.send_response(200 if doc else 404)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    cert, key = _certificate(tmp_path)
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(cert, key)
    server.socket = ctx.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    client_ctx = ssl.create_default_context(cafile=str(cert))
    yield f"https://127.0.0.1:{server.server_address[1]}", client_ctx, asked, cert
    server.shutdown()
    server.server_close()


def _trusted_directory(keys) -> TrustStore:
    return TrustStore([("test-directory", keys / "directory" / "signing.pub")])


def test_resolver_accepts_an_attested_key_and_caches_it(directory, keys):
    url, ctx, asked, _ = directory
    resolver = DirectoryResolver(
        url, directory_trust=_trusted_directory(keys), verify=ctx
    )
    first = resolver.resolve(REFERENCE)
    second = resolver.resolve(REFERENCE)
    resolver.close()
    assert first.accepted_by == "attestation" and second is first
    assert first.fingerprint == load_key_dir(keys / "a").signing_fingerprint
    assert asked == [REFERENCE]


def test_resolver_refuses_a_key_neither_pinned_nor_attested(directory, keys):
    url, ctx, _, _ = directory
    resolver = DirectoryResolver(
        url, directory_trust=_trusted_directory(keys), verify=ctx
    )
    with pytest.raises(UnknownSigner, match="not pinned"):
        resolver.resolve("directory://org/rogue#key")
    resolver.close()


def test_resolver_accepts_a_pinned_key_without_attestation(directory, keys):
    url, ctx, _, _ = directory
    pinned = load_key_dir(keys / "rogue").signing_fingerprint
    resolver = DirectoryResolver(
        url, directory_trust=TrustStore(), pinned=[pinned], verify=ctx
    )
    assert resolver.resolve("directory://org/rogue#key").accepted_by == "pinned"
    resolver.close()


def test_resolver_refuses_an_attestation_by_an_untrusted_directory(directory, keys):
    url, ctx, _, _ = directory
    untrusted = TrustStore([(None, keys / "rogue" / "signing.pub")])
    resolver = DirectoryResolver(url, directory_trust=untrusted, verify=ctx)
    with pytest.raises(UnknownSigner, match="not trusted"):
        resolver.resolve(REFERENCE)
    resolver.close()


def test_resolver_refuses_plain_http():
    with pytest.raises(ValueError, match="https"):
        DirectoryResolver("http://127.0.0.1:1", directory_trust=TrustStore())


def test_trust_fetch_writes_an_attested_key(directory, keys, tmp_path, capsys):
    url, _, _, cert = directory
    code = main(
        [
            "trust", "fetch", REFERENCE, "--directory", url,
            "--directory-key", str(keys / "directory" / "signing.pub"),
            "--ca", str(cert), "--into", str(tmp_path / "fetched"),
        ]
    )  # fmt: skip
    assert code == 0
    assert "accepted by attestation" in capsys.readouterr().out
    assert (tmp_path / "fetched" / "signing.pub").is_file()
