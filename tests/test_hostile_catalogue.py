"""The catalogue of hostile inputs (issue #9), one test per case.

``docs/hostile-inputs.md`` lists every case with how it is built, the outcome
expected and the test that checks it. Cases already covered by a committed
vector (``tests/vectors``) open that vector here; cases covered by another
module's test are named in the document instead of repeated.
"""

from __future__ import annotations

import base64
import json
import re
import socket
import sqlite3
import threading
import time
from pathlib import Path

import httpx
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from bridge import errors
from bridge.ingest import Ingest, IngestSettings, Rejection, RouteRule
from bridge.jmix import Entity, OpenPolicy, load_signing_key, pack
from bridge.jmix import load_encryption_public as load_enc_pub
from bridge.jmix._aead import Opener, derive_key, refuse_zero_secret, shared_secret
from bridge.jmix._codec import b64url
from bridge.peer.intake import Intake
from bridge.peer.server import HEADER_SECONDS, PeerServer, create_app
from bridge.peer.settings import InboundSender, ServerSettings
from bridge.spool import Spool
from bridge.store import SQLiteStore
from tests.fuzz.envelopes import (
    DOCUMENTS,
    RECEIVER_KEY,
    SPEC_INFO,
    VECTORS,
    Entry,
    payload_tar,
    run_open,
    sealed_entries,
    write_zip,
)
from tests.support.net import wait_until
from tests.support.peer_env import (
    CT_SMALL,
    SITE_A,
    SITE_B,
    BridgeProcess,
    make_key_dirs,
    pack_envelope,
)


def open_vector(case: str, tmp_path: Path) -> errors.EnvelopeError | None:
    """Open a committed vector with the policy its ``expect.json`` names."""
    expect = json.loads((VECTORS / case / "expect.json").read_text())
    args = dict(expect["policy"])
    args.pop("pin_sender_id", None)
    return run_open(VECTORS / case / "envelope.zip", tmp_path, OpenPolicy(**args))


def open_entries(entries: list[Entry], tmp_path: Path) -> errors.EnvelopeError | None:
    """Zip ``entries`` under the vector id and open them with the vector keys."""
    src = write_zip(tmp_path / "in.zip", entries)
    return run_open(src, tmp_path)


def sealed(plain: bytes) -> list[Entry]:
    """Entries of a signed envelope whose plaintext tar is ``plain``."""
    return [Entry(name, data) for name, data in sealed_entries(plain).items()]


def tar_header(name: bytes, size_field: bytes, kind: bytes = b"0") -> bytes:
    """A ustar header with a raw 12-byte size field and a correct checksum."""
    block = bytearray(512)
    block[: len(name)] = name
    block[100:108] = b"0000644\0"
    block[124:136] = size_field
    block[156:157] = kind
    block[257:265] = b"ustar\x0000"
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


# -- archive cases -----------------------------------------------------------------


def test_zip_path_escape_is_refused_as_unsafe_entry(tmp_path):
    assert isinstance(
        open_vector("refuse-zip-dotdot-name", tmp_path), errors.UnsafeEntry
    )


def test_tar_path_escape_is_refused_as_unsafe_entry(tmp_path):
    for case in ("refuse-tar-dotdot-path", "refuse-tar-absolute-path"):
        assert isinstance(open_vector(case, tmp_path), errors.UnsafeEntry), case


def test_zip_symlink_is_refused_as_unsafe_entry(tmp_path):
    assert isinstance(open_vector("refuse-zip-symlink", tmp_path), errors.UnsafeEntry)


def test_tar_symlink_and_hard_link_are_refused_as_unsafe_entry(tmp_path):
    for case in ("refuse-tar-symlink", "refuse-tar-hardlink", "refuse-tar-device"):
        assert isinstance(open_vector(case, tmp_path), errors.UnsafeEntry), case


def test_zip_entry_with_huge_declared_size_is_refused_before_reading(tmp_path):
    entries = sealed(payload_tar())
    data = bytearray(write_zip(tmp_path / "z.zip", entries).read_bytes())
    record = data.find(b"PK\x01\x02")
    data[record + 24 : record + 28] = (0xFFFFFFF0).to_bytes(4, "little")
    (tmp_path / "z.zip").unlink()
    (tmp_path / "in.zip").write_bytes(bytes(data))

    refused = run_open(tmp_path / "in.zip", tmp_path)

    assert isinstance(refused, errors.UnsafeEntry)
    assert "declared size is impossible" in str(refused)


def test_tar_member_larger_than_files_json_is_refused_as_unsafe_entry(tmp_path):
    refused = open_vector("refuse-tar-entry-larger-than-files-json", tmp_path)
    assert isinstance(refused, errors.UnsafeEntry)


def test_tar_member_with_huge_declared_size_is_refused_as_truncated(tmp_path):
    plain = tar_header(b"dicom/big.dcm", b"%011o\0" % (1 << 33)) + bytes(1024)

    refused = open_entries(sealed(plain), tmp_path)

    assert isinstance(refused, errors.MalformedEnvelope)
    assert "truncated" in str(refused)


def test_tar_member_with_negative_base256_size_is_refused_not_looped_on(tmp_path):
    plain = tar_header(b"dicom/neg.dcm", b"\xff" * 12) + bytes(2048)

    refused = open_entries(sealed(plain), tmp_path)

    assert isinstance(refused, errors.MalformedEnvelope)
    assert "negative size" in str(refused)


def test_zip_duplicate_entry_is_refused_as_unsafe_entry(tmp_path):
    assert isinstance(
        open_vector("refuse-zip-duplicate-name", tmp_path), errors.UnsafeEntry
    )


def test_tar_duplicate_member_is_refused_as_unsafe_entry(tmp_path):
    files = sorted(DOCUMENTS.items())
    plain = payload_tar(dict(files))
    again = payload_tar({files[0][0]: b"second copy"})
    # The first tar without its two end blocks, then a second member of one name.
    doubled = plain[: plain.rfind(tar_end(plain))] + again

    refused = open_entries(sealed(doubled), tmp_path)

    assert isinstance(refused, errors.UnsafeEntry)
    assert "duplicate name" in str(refused)


def tar_end(tar: bytes) -> bytes:
    """The zero blocks that end ``tar`` (two or more, to a record boundary)."""
    stripped = tar.rstrip(b"\0")
    return tar[len(stripped) + (-len(stripped) % 512) :]


def test_file_that_is_also_a_folder_is_refused_as_unsafe_entry(tmp_path):
    plain = payload_tar({**DOCUMENTS, "dicom/x": b"a", "dicom/x/y": b"b"})

    refused = open_entries(sealed(plain), tmp_path)

    assert isinstance(refused, errors.UnsafeEntry)
    assert "both a file and a folder" in str(refused)


# -- JSON cases --------------------------------------------------------------------


def test_manifest_with_extra_key_is_refused_as_schema_violation(tmp_path):
    refused = open_vector("refuse-manifest-unknown-key", tmp_path)
    assert isinstance(refused, errors.SchemaViolation)


def test_deeply_nested_manifest_is_refused_as_malformed(tmp_path):
    entries = dict(sealed_entries(payload_tar()))
    doc = json.loads(entries["manifest.json"])
    doc["extensions"] = {"deep": json.loads("[" * 200 + "]" * 200)}
    entries["manifest.json"] = json.dumps(doc).encode()

    refused = open_entries([Entry(n, d) for n, d in entries.items()], tmp_path)

    assert isinstance(refused, errors.MalformedEnvelope)
    assert "nest deeper than 64" in str(refused)


def test_manifest_jws_with_a_deeply_nested_header_is_refused_without_detail(tmp_path):
    entries = dict(sealed_entries(payload_tar()))
    header = b64url(b"[" * 100_000 + b"]" * 100_000)
    body = b64url(entries["manifest.json"])
    entries["manifest.jws"] = f"{header}.{body}.{b64url(bytes(64))}".encode()

    refused = open_entries([Entry(n, d) for n, d in entries.items()], tmp_path)

    assert isinstance(refused, errors.AuthenticationFailed)


# -- trust cases at the opener ------------------------------------------------------


def test_envelope_for_another_recipient_is_refused_by_the_opener(tmp_path):
    refused = open_vector("refuse-other-receiver", tmp_path)
    assert isinstance(refused, errors.PolicyViolation)
    wrong_key = open_vector("refuse-wrong-recipient-key", tmp_path)
    assert isinstance(wrong_key, errors.AuthenticationFailed)


def test_clear_envelope_is_refused_by_the_opener_when_encryption_is_required(
    tmp_path,
):
    refused = open_vector("refuse-clear-when-encryption-required", tmp_path)
    assert isinstance(refused, errors.PolicyViolation)


def test_expired_assertion_is_refused_as_expired(tmp_path):
    assert isinstance(
        open_vector("refuse-expired-assertion", tmp_path), errors.ExpiredAssertion
    )


# RFC 7748 section 5 and the points libsodium refuses: u-coordinates of small
# order on Curve25519 and their non-canonical encodings.
LOW_ORDER = [
    "0000000000000000000000000000000000000000000000000000000000000000",
    "0100000000000000000000000000000000000000000000000000000000000000",
    "e0eb7a7c3b41b8ae1656e3faf19fc46ada098deb9c32b1fd866205165f49b800",
    "5f9c95bca3508c24b1d0b1559c83ef5b04445cc4581c8e86d8224eddd09f1157",
    "ecffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "edffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
    "eeffffffffffffffffffffffffffffffffffffffffffffffffffffffffffff7f",
]


@pytest.mark.parametrize("point", LOW_ORDER)
def test_low_order_ephemeral_key_is_refused_without_detail(tmp_path, point):
    # Sealed under the key the zero secret derives and signed by the pinned
    # sender: the tag would verify, so only the refusal of the point stops it.
    entries = sealed_entries(payload_tar(), low_order=bytes.fromhex(point))

    refused = open_entries([Entry(n, d) for n, d in entries.items()], tmp_path)

    assert isinstance(refused, errors.AuthenticationFailed)
    assert str(refused) == "authentication failed"
    assert refused.stage == "payload"


def test_low_order_envelope_would_open_under_the_zero_secret(tmp_path):
    # The premise of the test above: without the refusal, the payload is
    # authentic under the key anyone can derive.
    entries = sealed_entries(payload_tar(), low_order=bytes(32))
    enc = json.loads(entries["manifest.json"])["security"]["encryption"]
    opener = Opener(
        derive_key(bytes(32), SPEC_INFO),
        base64.b64decode(enc["iv"]),
        base64.b64decode(enc["auth_tag"]),
    )

    plain = opener.update(entries["payload.encrypted"])
    opener.finish()

    assert plain == payload_tar()


@pytest.mark.parametrize("point", LOW_ORDER)
def test_shared_secret_refuses_each_low_order_point(point):
    public = X25519PublicKey.from_public_bytes(bytes.fromhex(point))

    with pytest.raises(errors.AuthenticationFailed) as refused:
        shared_secret(RECEIVER_KEY, public)

    assert refused.value.stage == "payload"


def test_zero_secret_is_refused_whatever_the_library_returns():
    with pytest.raises(errors.AuthenticationFailed):
        refuse_zero_secret(bytes(32))
    assert refuse_zero_secret(b"\x01" + bytes(31)) == b"\x01" + bytes(31)


# -- DICOM cases -------------------------------------------------------------------


def test_malformed_dicom_file_is_refused_as_unreadable(tmp_path):
    store = SQLiteStore(tmp_path / "state.sqlite")
    spool = Spool(tmp_path / "spool")
    route = RouteRule(name="all", peers=("peer-a",), quiet_seconds=3600)
    ingest = Ingest(store, spool, [route], IngestSettings())
    path = spool.incoming / "rx.dcm"
    path.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00UI\xff\xff" + b"1.2")

    receipt = ingest.receive(path, calling_ae="MODALITY", called_ae="JMIXBRIDGE")

    assert receipt.rejection == Rejection.UNREADABLE
    assert path.exists() and not [p for p in spool.root.rglob("*.dcm") if p != path]
    store.close()


# -- HTTP cases, against a real bridge process --------------------------------------


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_key_dirs(tmp_path_factory.mktemp("keys"))


@pytest.fixture(scope="module")
def peer(tmp_path_factory, keys):
    proc = BridgeProcess(
        tmp_path_factory.mktemp("procs"),
        "b",
        {
            "server": {"max_body_bytes": 4 << 20},
            "receiver_id": SITE_B.id,
            "senders": [
                {
                    "name": "site-a",
                    "id": SITE_A.id,
                    "token": "token-a",
                    "signing_keys": [str(keys / "a" / "signing.pub")],
                }
            ],
        },
    ).start()
    yield proc
    proc.stop()


def post(proc: BridgeProcess, path: Path) -> httpx.Response:
    """POST an envelope zip as site-a."""
    return httpx.post(
        f"{proc.url}/api/jmix",
        content=path.read_bytes(),
        headers={"Content-Type": "application/zip", "Authorization": "Bearer token-a"},
        timeout=30,
    )


def test_downgrade_to_clear_is_refused_by_the_api_when_encryption_is_required(
    peer, keys, tmp_path
):
    clear = pack(
        [CT_SMALL],
        tmp_path / "clear.zip",
        sender=SITE_A,
        signing_key=load_signing_key(keys / "a" / "signing.key"),
        receiver=Entity("site-b", "Site B", "ops@site-b.example"),
        recipient_public=None,
    )

    resp = post(peer, clear.path)

    assert resp.status_code == 400
    assert resp.json() == {
        "error": "envelope refused by policy: the envelope is not encrypted "
        "and the policy requires it"
    }
    assert peer.store().get_envelope(clear.envelope_id, "in") is None


def test_replayed_envelope_is_refused_by_the_api_with_409(peer, keys, tmp_path):
    env = pack_envelope(tmp_path / "env.zip", keys / "a", keys / "b")
    assert post(peer, env.path).status_code == 201

    again = post(peer, env.path)

    assert again.status_code == 409
    assert again.json()["id"] == env.envelope_id


def test_envelope_signed_by_a_pinned_key_for_another_recipient_is_refused_by_the_api(
    peer, keys, tmp_path
):
    other = pack(
        [CT_SMALL],
        tmp_path / "other.zip",
        sender=SITE_A,
        signing_key=load_signing_key(keys / "a" / "signing.key"),
        receiver=Entity("site-c", "Site C", "ops@site-c.example"),
        recipient_public=load_enc_pub(keys / "b" / "encryption.pub"),
    )

    resp = post(peer, other.path)

    assert resp.status_code == 400
    assert resp.json()["error"].startswith("envelope refused by policy: ")
    assert "site-c" in resp.json()["error"]
    assert peer.store().get_envelope(other.envelope_id, "in") is None


# -- slow-loris ---------------------------------------------------------------------


def _serve(tmp_path: Path, header_seconds: float, **settings) -> PeerServer:
    store = SQLiteStore(tmp_path / "state.sqlite")
    sender = InboundSender(name="site-a", token="token-a", trust="transport")
    server_settings = ServerSettings(port=0, **settings)
    intake = Intake(store, Spool(tmp_path / "spool"), [sender])
    server = PeerServer(
        create_app(server_settings, [sender], intake),
        server_settings,
        0.2,
        header_seconds=header_seconds,
    )
    server.start()
    return server


@pytest.fixture
def api(tmp_path):
    server = _serve(tmp_path, 1.0, body_idle_seconds=2.0)
    yield server
    server.stop()


@pytest.fixture
def capped_api(tmp_path):
    server = _serve(tmp_path, 30.0, max_connections_per_client=2)
    yield server
    server.stop()


def test_slow_loris_client_is_dropped_while_others_are_served(api):
    dropped_after: list[float] = []

    def trickle():
        start = time.monotonic()
        with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
            try:
                for byte in (
                    b"GET /api/jmix?studyInstanceUid=1 HTTP/1.1\r\nX-Slow: " * 5
                ):
                    sock.sendall(bytes([byte]))
                    time.sleep(0.3)
                    if time.monotonic() - start > 8:
                        return
            except OSError:
                pass  # the server closed the connection: that is the point
            dropped_after.append(time.monotonic() - start)

    slow = threading.Thread(target=trickle)
    slow.start()
    answers = [
        httpx.get(
            f"http://127.0.0.1:{api.port}/api/jmix?studyInstanceUid=1",
            headers={"Authorization": "Bearer token-a"},
            timeout=5,
        ).status_code
        for _ in range(3)
    ]
    slow.join(15)

    assert answers == [200, 200, 200]
    assert dropped_after and dropped_after[0] < 4.0
    assert HEADER_SECONDS <= 30  # the daemon's default bound is short too


def test_upload_longer_than_the_header_timeout_is_not_cut(api, tmp_path):
    """The header bound must not cut a body that takes longer than it."""
    with socket.create_connection(("127.0.0.1", api.port), timeout=10) as sock:
        head = (
            "POST /api/jmix HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer token-a\r\n"
            "Content-Type: application/zip\r\nContent-Length: 4\r\n\r\n"
        )
        sock.sendall(head.encode())
        for byte in b"PK\x05\x06":
            time.sleep(0.6)
            sock.sendall(bytes([byte]))
        answer = sock.recv(65536).decode("latin-1")

    assert answer.startswith("HTTP/1.1 400")
    assert "malformed envelope" in answer


def test_upload_that_stalls_after_its_headers_is_dropped_and_stores_nothing(
    api, tmp_path
):
    with socket.create_connection(("127.0.0.1", api.port), timeout=20) as sock:
        head = (
            "POST /api/jmix HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer token-a\r\n"
            "Content-Type: application/zip\r\nContent-Length: 1000\r\n\r\n"
        )
        sock.sendall(head.encode() + b"PK\x03\x04")
        answer = sock.recv(65536).decode("latin-1")
        closed = sock.recv(65536)

    assert answer.startswith("HTTP/1.1 408"), answer
    assert closed == b""
    assert [p for p in (tmp_path / "spool").rglob("*") if p.is_file()] == []
    with sqlite3.connect(tmp_path / "state.sqlite") as conn:
        assert conn.execute("SELECT count(*) FROM envelopes").fetchone() == (0,)


def _held(port: int) -> socket.socket:
    """Open a keep-alive connection and prove it is served, then leave it open."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    sock.sendall(
        b"GET /api/jmix?studyInstanceUid=1 HTTP/1.1\r\nHost: x\r\n"
        b"Authorization: Bearer token-a\r\n\r\n"
    )
    assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    return sock


def _closed_on_arrival(port: int) -> bool:
    """Whether a new connection from 127.0.0.1 is closed without an answer."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        try:
            sock.sendall(b"GET /api/jmix HTTP/1.1\r\nHost: x\r\n\r\n")
            return sock.recv(65536) == b""
        except (ConnectionResetError, BrokenPipeError):
            return True


def test_client_over_its_connection_cap_is_closed_while_another_gets_through(
    capped_api,
):
    held = [_held(capped_api.port) for _ in range(2)]
    try:
        refused = _closed_on_arrival(capped_api.port)
        other = httpx.Client(transport=httpx.HTTPTransport(local_address="127.0.0.2"))
        with other:
            answer = other.get(
                f"http://127.0.0.1:{capped_api.port}/api/jmix?studyInstanceUid=1",
                headers={"Authorization": "Bearer token-a"},
                timeout=10,
            )
    finally:
        for sock in held:
            sock.close()

    assert refused
    assert answer.status_code == 200


def test_connection_cap_admits_the_client_again_once_one_closes(capped_api):
    held = [_held(capped_api.port) for _ in range(2)]
    try:
        assert _closed_on_arrival(capped_api.port)
        held.pop().close()
        wait_until(lambda: not _closed_on_arrival(capped_api.port), 10, "a freed slot")
    finally:
        for sock in held:
            sock.close()


def test_every_catalogue_case_is_in_the_document():
    doc = (Path(__file__).parent.parent / "docs" / "hostile-inputs.md").read_text()
    here = {name for name in globals() if name.startswith("test_")}
    named = set(re.findall(r"test_hostile_catalogue\.py::(test_\w+)", doc))

    assert named <= here, named - here
    assert here - {"test_every_catalogue_case_is_in_the_document"} <= named
