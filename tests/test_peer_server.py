"""The inbound exchange API, served by a separate bridge process on loopback."""

import base64
import json
import socket
import zipfile
from pathlib import Path

import httpx
import pytest

from bridge.jmix import generate_key_dir
from bridge.store.base import JobState
from tests.support.net import wait_until
from tests.support.peer_env import (
    BridgeProcess,
    harmony_zip,
    make_key_dirs,
    pack_envelope,
    raw_request,
)

LIMIT = 4 << 20
ZIP = {"Content-Type": "application/zip"}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = make_key_dirs(tmp_path_factory.mktemp("keys"))
    # "c" is another pinned sender's key; "x" is pinned for no one.
    generate_key_dir(root / "c")
    generate_key_dir(root / "x")
    return root


@pytest.fixture(scope="module")
def receiver(tmp_path_factory, keys):
    proc = BridgeProcess(
        tmp_path_factory.mktemp("procs"),
        "b",
        {
            "server": {"max_body_bytes": LIMIT},
            "senders": [
                {
                    "name": "site-a",
                    "token": "token-a",
                    "signing_keys": [str(keys / "a" / "signing.pub")],
                },
                {
                    "name": "site-c",
                    "token": "token-c",
                    "signing_keys": [str(keys / "c" / "signing.pub")],
                },
                {
                    "name": "harmony",
                    "token": "token-h",
                    "trust": "transport",
                    "require_encryption": False,
                },
            ],
        },
    ).start()
    yield proc
    proc.stop()


@pytest.fixture
def envelope(tmp_path, keys):
    return pack_envelope(tmp_path / "env.zip", keys / "a", keys / "b")


def _post(proc, path, token="token-a", headers=ZIP):  # noqa: S107
    auth = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.post(
        f"{proc.url}/api/jmix",
        content=path.read_bytes(),
        headers={**headers, **auth},
        timeout=30,
    )


def _spool_files(proc, folder):
    return sorted(p.name for p in (proc.spool / folder).iterdir())


def test_post_signed_envelope_answers_201_and_queues_it_for_opening(receiver, envelope):
    resp = _post(receiver, envelope.path)

    assert resp.status_code == 201
    assert resp.json() == {"id": envelope.envelope_id, "status": "stored"}
    store = receiver.store()
    env = store.get_envelope(envelope.envelope_id, "in")
    assert (env.peer, env.state, env.size_bytes) == (
        "site-a",
        "stored",
        envelope.size_bytes,
    )
    assert (receiver.spool / env.path).read_bytes() == envelope.path.read_bytes()
    job = store.list_jobs(queue="open")[-1]
    assert job.payload == {"envelope_id": envelope.envelope_id, "sender": "site-a"}
    assert job.state == JobState.READY
    store.close()


def test_post_of_an_id_received_before_answers_409_and_keeps_nothing_new(
    receiver, envelope
):
    assert _post(receiver, envelope.path).status_code == 201
    inbox_before = _spool_files(receiver, "inbox")

    resp = _post(receiver, envelope.path)

    assert resp.status_code == 409
    assert resp.json()["id"] == envelope.envelope_id
    assert _spool_files(receiver, "inbox") == inbox_before
    store = receiver.store()
    opens = [
        j
        for j in store.list_jobs(queue="open", limit=1000)
        if j.payload["envelope_id"] == envelope.envelope_id
    ]
    assert len(opens) == 1
    store.close()


def test_harmony_built_zip_is_accepted_from_a_transport_trusted_sender(
    receiver, tmp_path
):
    envelope_id = harmony_zip(tmp_path / "h.zip")

    resp = _post(receiver, tmp_path / "h.zip", token="token-h")

    assert resp.status_code == 201
    assert resp.json() == {"id": envelope_id, "status": "stored"}


def test_unsigned_envelope_from_a_signed_trust_sender_answers_400(receiver, tmp_path):
    harmony_zip(tmp_path / "h.zip")

    resp = _post(receiver, tmp_path / "h.zip", token="token-a")

    assert resp.status_code == 400
    assert resp.json()["error"].startswith("envelope refused by policy: ")


def flip_signature_byte(envelope: Path) -> None:
    """Flip one bit of the signature of the envelope's ``manifest.jws`` (RFC 7515
    compact serialisation: header.payload.signature), in place."""
    with zipfile.ZipFile(envelope) as zf:
        entries = [(info, zf.read(info)) for info in zf.infolist()]
    with zipfile.ZipFile(envelope, "w") as zf:
        for info, data in entries:
            if info.filename.endswith("manifest.jws"):
                head, payload, sig = data.split(b".")
                raw = bytearray(base64.urlsafe_b64decode(sig + b"=" * (-len(sig) % 4)))
                raw[len(raw) // 2] ^= 0x01
                sig = base64.urlsafe_b64encode(bytes(raw)).rstrip(b"=")
                data = b".".join((head, payload, sig))
            zf.writestr(info, data)


@pytest.mark.parametrize("signer", ["unpinned-key", "other-sender-key", "flipped-byte"])
def test_envelope_that_fails_verification_answers_400_and_stores_nothing(
    receiver, keys, tmp_path, signer
):
    # Posted with site-a's token each time.
    key = {"unpinned-key": "x", "other-sender-key": "c"}.get(signer, "a")
    env = pack_envelope(tmp_path / "env.zip", keys / key, keys / "b")
    if signer == "flipped-byte":
        flip_signature_byte(env.path)
    before = {f: _spool_files(receiver, f) for f in ("inbox", "quarantine", "tmp")}

    resp = _post(receiver, env.path)

    assert resp.status_code == 400
    assert resp.json() == {"error": "envelope verification failed"}
    after = {f: _spool_files(receiver, f) for f in ("inbox", "quarantine", "tmp")}
    assert after == before
    store = receiver.store()
    try:
        assert store.get_envelope(env.envelope_id, "in") is None
    finally:
        store.close()


def test_post_of_a_non_zip_body_answers_400(receiver, tmp_path):
    (tmp_path / "junk.zip").write_bytes(b"not a zip at all" * 100)

    resp = _post(receiver, tmp_path / "junk.zip")

    assert resp.status_code == 400
    assert "malformed envelope" in resp.json()["error"]


def test_wrong_token_answers_401_and_stores_nothing(receiver, envelope):
    resp = _post(receiver, envelope.path, token="token-wrong")

    assert resp.status_code == 401
    assert "invalid_token" in resp.headers["WWW-Authenticate"]
    assert receiver.store().get_envelope(envelope.envelope_id, "in") is None


def test_missing_credential_answers_401(receiver, envelope):
    resp = _post(receiver, envelope.path, token=None)

    assert resp.status_code == 401
    assert resp.headers["WWW-Authenticate"] == "Bearer"


def test_other_content_type_answers_415(receiver, envelope):
    resp = _post(receiver, envelope.path, headers={"Content-Type": "application/gzip"})

    assert resp.status_code == 415


def test_unauthenticated_5_gb_content_length_is_refused_before_any_body(receiver):
    # No byte of the body is sent: an answer proves the server did not wait for it.
    answer = raw_request(
        receiver.port,
        "POST /api/jmix HTTP/1.1\r\nHost: peer\r\nContent-Type: application/zip\r\n"
        "Content-Length: 5000000000",
    )

    assert answer.startswith("HTTP/1.1 401")
    assert "Connection: close" in answer


def test_authenticated_content_length_beyond_the_limit_answers_413(receiver):
    answer = raw_request(
        receiver.port,
        "POST /api/jmix HTTP/1.1\r\nHost: peer\r\nContent-Type: application/zip\r\n"
        f"Authorization: Bearer token-a\r\nContent-Length: {LIMIT + 1}",
    )

    assert answer.startswith("HTTP/1.1 413")


def test_expect_100_continue_with_a_wrong_token_gets_401_instead_of_continue(
    receiver,
):
    answer = raw_request(
        receiver.port,
        "POST /api/jmix HTTP/1.1\r\nHost: peer\r\nContent-Type: application/zip\r\n"
        "Authorization: Bearer nope\r\nExpect: 100-continue\r\nContent-Length: 1000",
    )

    assert answer.startswith("HTTP/1.1 401")
    assert "100 Continue" not in answer


def test_chunked_body_beyond_the_limit_answers_413_and_leaves_no_file(receiver):
    chunk = b"x" * 65536
    body = b"".join(
        b"%x\r\n%s\r\n" % (len(chunk), chunk) for _ in range(LIMIT // 65536 + 2)
    )

    answer = raw_request(
        receiver.port,
        "POST /api/jmix HTTP/1.1\r\nHost: peer\r\nContent-Type: application/zip\r\n"
        "Authorization: Bearer token-a\r\nTransfer-Encoding: chunked",
        body,
    )

    assert answer.startswith("HTTP/1.1 413")
    assert _spool_files(receiver, "tmp") == []


def _refusals(proc):
    return proc.log.read_text().count("upload refused sender=site-a status=400")


def _upload_half(proc, envelope, how):
    """Send the headers and half the body of ``envelope``, then give up ``how``."""
    data = envelope.path.read_bytes()
    head = (
        "POST /api/jmix HTTP/1.1\r\nHost: peer\r\nContent-Type: application/zip\r\n"
        f"Authorization: Bearer token-a\r\nContent-Length: {len(data)}\r\n\r\n"
    )
    with socket.create_connection(("127.0.0.1", proc.port), timeout=10) as sock:
        sock.sendall(head.encode() + data[: len(data) // 2])
        if how == "half-close":
            sock.shutdown(socket.SHUT_WR)
            assert sock.recv(65536) == b""  # the server hangs up, keeping nothing


@pytest.mark.parametrize("how", ["half-close", "close"])
def test_truncated_upload_stores_nothing(receiver, envelope, how):
    inbox_before = _spool_files(receiver, "inbox")
    refusals = _refusals(receiver)

    _upload_half(receiver, envelope, how)

    wait_until(lambda: _refusals(receiver) > refusals, what="upload refused")
    assert _spool_files(receiver, "tmp") == []
    assert _spool_files(receiver, "inbox") == inbox_before
    assert receiver.store().get_envelope(envelope.envelope_id, "in") is None


def test_get_envelope_and_manifest_serve_the_sender_its_own_envelope(
    receiver, envelope
):
    assert _post(receiver, envelope.path).status_code == 201
    auth = {"Authorization": "Bearer token-a"}
    base = f"{receiver.url}/api/jmix/{envelope.envelope_id}"

    got = httpx.get(base, headers=auth)
    manifest = httpx.get(f"{base}/manifest", headers=auth)

    assert got.status_code == 200
    assert got.headers["Content-Type"] == "application/zip"
    assert got.content == envelope.path.read_bytes()
    assert manifest.status_code == 200
    assert manifest.json()["id"] == envelope.envelope_id


def test_get_envelope_of_another_peer_answers_404(receiver, envelope):
    assert _post(receiver, envelope.path).status_code == 201

    got = httpx.get(
        f"{receiver.url}/api/jmix/{envelope.envelope_id}",
        headers={"Authorization": "Bearer token-h"},
    )

    assert got.status_code == 404


def test_get_without_credential_answers_401(receiver, envelope):
    got = httpx.get(f"{receiver.url}/api/jmix/{envelope.envelope_id}")

    assert got.status_code == 401


def test_get_with_an_accept_that_excludes_zip_answers_406(receiver, envelope):
    assert _post(receiver, envelope.path).status_code == 201

    got = httpx.get(
        f"{receiver.url}/api/jmix/{envelope.envelope_id}",
        headers={"Authorization": "Bearer token-a", "Accept": "text/html"},
    )

    assert got.status_code == 406


def test_list_by_study_requires_the_parameter(receiver):
    got = httpx.get(
        f"{receiver.url}/api/jmix", headers={"Authorization": "Bearer token-a"}
    )

    assert got.status_code == 400


def test_log_carries_no_token(receiver):
    text = receiver.log.read_text()

    assert "token-a" not in text
    assert "token-h" not in text
    assert json.dumps("token-a") not in text
