"""The signed, chained audit trail: library checks, a real receiving site, the API.

The receiving site opens a real envelope, forwards it into dcmtk's storescp and
appends its own entries; the sender then fetches the audit over the peer API
and verifies every entry, its own and the receiver's.
"""

import copy
import json
import zipfile
from pathlib import Path

import httpx
import pytest

from bridge.dicom.forwarder import Destination
from bridge.errors import AuthenticationFailed, PolicyViolation, UnknownSigner
from bridge.jmix import (
    Entity,
    OpenPolicy,
    TrustStore,
    generate_key_dir,
    inspect_envelope,
    load_key_dir,
    open_envelope,
    pack,
)
from bridge.jmix._codec import dump_json
from bridge.jmix.audit import (
    SENT,
    append_audit,
    read_audit,
    stored_audit_path,
    verify_audit,
)
from bridge.peer.intake import Intake
from bridge.peer.server import PeerServer, create_app
from bridge.peer.settings import InboundSender, ServerSettings
from bridge.receiving.forwarding import Forwarder
from bridge.receiving.opener import Opener, SenderTrust
from bridge.workers.base import Worker, WorkerSpec
from tests.test_jmix_roundtrip import make_study
from tests.test_receiving import RECEIVER, SENDER, Site

RECEIVER_NODE = Entity("node:site-b-bridge", "Site B bridge", "ops@site-b.example")


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys")
    found = {}
    for name in ("sender", "receiver", "rogue"):
        generate_key_dir(root / name)
        found[name] = load_key_dir(root / name)
    found["root"] = root
    return found


@pytest.fixture(scope="module")
def envelope(tmp_path_factory, keys) -> tuple[Path, str]:
    folder = tmp_path_factory.mktemp("env")
    result = pack(
        make_study(folder / "study", count=2),
        folder / "e.zip",
        sender=SENDER,
        signing_key=keys["sender"].signing_key,
        receiver=RECEIVER,
        recipient_public=keys["receiver"].encryption_key.public_key(),
    )
    return result.path, result.envelope_id


def _nodes(keys) -> TrustStore:
    return TrustStore(
        [
            (SENDER.id, keys["sender"].signing_key.public_key()),
            (RECEIVER_NODE.id, keys["receiver"].signing_key.public_key()),
        ]
    )


def _grown(keys, envelope) -> dict:
    """The envelope's audit with a ``sent`` entry by the sender and one by us."""
    path, env_id = envelope
    doc = read_audit(path)
    append_audit(
        doc,
        SENT,
        by=SENDER,
        to=RECEIVER,
        key=keys["sender"].signing_key,
        envelope_id=env_id,
    )
    append_audit(
        doc,
        "received",
        by=RECEIVER_NODE,
        key=keys["receiver"].signing_key,
        envelope_id=env_id,
    )
    return doc


# -- the library ---------------------------------------------------------------------


def test_pack_signs_the_created_entry(keys, envelope):
    path, env_id = envelope
    results = verify_audit(read_audit(path), env_id, _nodes(keys), "required")
    assert [(r.event, r.status) for r in results] == [("created", "verified")]


def test_entries_of_every_node_verify(keys, envelope):
    results = verify_audit(
        _grown(keys, envelope), envelope[1], _nodes(keys), "required"
    )
    assert [r.status for r in results] == ["verified"] * 3


def test_tampered_entry_is_refused_when_verified_if_present(keys, envelope):
    doc = _grown(keys, envelope)
    doc["audit"][1]["to"]["id"] = "org:somewhere-else"
    with pytest.raises(AuthenticationFailed) as caught:
        verify_audit(doc, envelope[1], _nodes(keys))
    assert caught.value.stage == "audit"
    assert str(caught.value) == "authentication failed"


def test_tampered_entry_is_flagged_when_ignored(keys, envelope):
    doc = _grown(keys, envelope)
    doc["audit"][1]["timestamp"] = "2020-01-01T00:00:00Z"
    results = verify_audit(doc, envelope[1], _nodes(keys), "ignored")
    # The next entry signed the hash of the one before it, so it fails too.
    assert [r.status for r in results] == ["verified", "failed", "failed"]
    assert results[1].reason == "authentication failed"


def test_removed_middle_entry_breaks_the_chain(keys, envelope):
    doc = _grown(keys, envelope)
    del doc["audit"][1]
    results = verify_audit(doc, envelope[1], _nodes(keys), "ignored")
    assert [r.status for r in results] == ["verified", "failed"]


def test_reordered_entries_fail(keys, envelope):
    doc = _grown(keys, envelope)
    doc["audit"][1], doc["audit"][2] = doc["audit"][2], doc["audit"][1]
    results = verify_audit(doc, envelope[1], _nodes(keys), "ignored")
    assert results[1].status == results[2].status == "failed"


def test_entry_moved_from_another_envelope_fails(keys, envelope):
    doc = _grown(keys, envelope)
    other = "0b0e8b9c-6a3f-4f7a-9a53-2d6d5c1e4f00"
    results = verify_audit(doc, other, _nodes(keys), "ignored")
    assert {r.status for r in results} == {"failed"}


def test_unsigned_entry_is_recorded_unless_signed_entries_are_required(keys, envelope):
    doc = _grown(keys, envelope)
    doc["audit"].append(
        {
            "event": "stored",
            "by": {"id": "org:relay"},
            "timestamp": "2026-01-01T00:00:00Z",
        }
    )
    results = verify_audit(doc, envelope[1], _nodes(keys))
    assert results[-1].status == "unsigned"
    with pytest.raises(PolicyViolation, match="entry 3 is not signed"):
        verify_audit(doc, envelope[1], _nodes(keys), "required")


def test_entry_by_an_unpinned_node_is_refused_only_when_required(keys, envelope):
    doc = _grown(keys, envelope)
    append_audit(
        doc,
        "relayed",
        by={"id": "org:relay"},
        key=keys["rogue"].signing_key,
        envelope_id=envelope[1],
    )
    assert verify_audit(doc, envelope[1], _nodes(keys))[-1].status == "unknown-signer"
    with pytest.raises(UnknownSigner):
        verify_audit(doc, envelope[1], _nodes(keys), "required")


def test_entry_signed_with_a_key_pinned_for_another_node_fails(keys, envelope):
    doc = read_audit(envelope[0])
    append_audit(
        doc,
        "received",
        by={"id": "org:impostor"},
        key=keys["receiver"].signing_key,
        envelope_id=envelope[1],
    )
    with pytest.raises(PolicyViolation, match="pinned for 'node:site-b-bridge'"):
        verify_audit(doc, envelope[1], _nodes(keys))


def test_audit_entries_carry_no_patient_data(keys, envelope):
    text = json.dumps(_grown(keys, envelope))
    assert "Patient" not in text and "CompressedSamples" not in text


# -- opening an envelope whose audit was tampered with --------------------------------


def _with_audit(env: Path, out: Path, change) -> Path:
    with zipfile.ZipFile(env) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/audit.json"):
                doc = json.loads(data)
                change(doc)
                data = dump_json(doc)
            zout.writestr(info, data)
    return out


def _retarget(doc: dict) -> None:
    doc["audit"][0]["to"]["id"] = "org:somewhere-else"


def test_open_refuses_an_envelope_with_a_tampered_audit_entry(keys, envelope, tmp_path):
    env = _with_audit(envelope[0], tmp_path / "t.zip", _retarget)
    with pytest.raises(AuthenticationFailed) as caught:
        open_envelope(
            env,
            tmp_path / "out",
            encryption_key=keys["receiver"].encryption_key,
            trust=_nodes(keys),
        )
    assert caught.value.stage == "audit"
    assert not (tmp_path / "out").exists()


def test_open_flags_a_tampered_audit_entry_when_the_audit_policy_is_ignored(
    keys, envelope, tmp_path
):
    env = _with_audit(envelope[0], tmp_path / "t.zip", _retarget)
    opened = open_envelope(
        env,
        tmp_path / "out",
        encryption_key=keys["receiver"].encryption_key,
        trust=_nodes(keys),
        policy=OpenPolicy(audit="ignored"),
    )
    assert opened.governance["audit"]["status"] == "failed"
    assert any("audit.json" in w for w in opened.warnings)


def test_open_refuses_an_envelope_without_audit_when_required(keys, envelope, tmp_path):
    env = tmp_path / "no-audit.zip"
    with zipfile.ZipFile(envelope[0]) as zin, zipfile.ZipFile(env, "w") as zout:
        for info in zin.infolist():
            if not info.filename.endswith("/audit.json"):
                zout.writestr(info, zin.read(info))
    with pytest.raises(PolicyViolation, match=r"audit\.json: absent"):
        open_envelope(
            env,
            tmp_path / "out",
            encryption_key=keys["receiver"].encryption_key,
            trust=_nodes(keys),
            policy=OpenPolicy(audit="required"),
        )


# -- a receiving site appends, and the sender fetches the audit over the API ---------


def test_receiving_site_appends_signed_entries_and_serves_them(
    tmp_path, keys, envelope, storescp
):
    dest = Destination("pacs", storescp.ae_title, "127.0.0.1", storescp.port)
    site = Site(tmp_path / "b", keys["root"] / "sender", {"pacs": dest})
    node_key = site.keys.signing_key
    trust = TrustStore([(SENDER.id, keys["sender"].signing_key.public_key())])
    senders = {
        "clinic-a": SenderTrust(
            "clinic-a", trust, OpenPolicy(expected_receiver_id=RECEIVER.id)
        )
    }
    site.open_worker = Worker(
        site.store,
        WorkerSpec(
            "open",
            Opener(
                site.store,
                site.spool,
                keys["receiver"].encryption_key,
                senders,
                ["pacs"],
                node=RECEIVER_NODE,
                signing_key=node_key,
            ),
        ),
    )
    site.forward_worker = Worker(
        site.store,
        WorkerSpec(
            "forward",
            Forwarder(
                site.store,
                site.spool,
                {"pacs": dest},
                receipts=False,
                node=RECEIVER_NODE,
                signing_key=node_key,
            ),
        ),
    )
    path, env_id = envelope

    site.receive(path, env_id)
    site.run()

    env = site.store.get_envelope(env_id, "in")
    assert env.details["governance"]["audit"]["status"] == "verified"
    inbox = site.spool.path_of(env.path)
    assert stored_audit_path(inbox).is_file()
    shown = inspect_envelope(inbox)
    assert shown["audit_source"] == "stored"
    assert shown["audit_events"] == ["created", "received", "verified", "forwarded"]
    assert shown["audit"][-1]["to_name"] == "pacs (2 instances)"

    # The sender fetches the audit through the peer API and checks every entry.
    sender = InboundSender("clinic-a", id=SENDER.id, token="token-a")
    intake = Intake(site.store, site.spool, [sender])
    server = PeerServer(
        create_app(ServerSettings(port=0), [sender], intake), ServerSettings(port=0)
    )
    server.start()
    try:
        url = f"http://127.0.0.1:{server.port}/api/jmix/{env_id}/audit"
        answer = httpx.get(url, headers={"Authorization": "Bearer token-a"})
        denied = httpx.get(url, headers={"Authorization": "Bearer wrong"})
    finally:
        server.stop()
    assert answer.status_code == 200 and denied.status_code == 401
    nodes = TrustStore(
        [
            (SENDER.id, keys["sender"].signing_key.public_key()),
            (RECEIVER_NODE.id, node_key.public_key()),
        ]
    )
    results = verify_audit(answer.json(), env_id, nodes, "required")
    assert [r.event for r in results] == [
        "created",
        "received",
        "verified",
        "forwarded",
    ]


def test_stored_audit_is_appended_not_replaced(tmp_path, keys, envelope):
    from bridge.jmix.audit import update_stored_audit

    copy_of = tmp_path / "e.zip"
    copy_of.write_bytes(envelope[0].read_bytes())
    for event in ("received", "verified"):
        update_stored_audit(
            copy_of,
            lambda doc, event=event: append_audit(
                doc,
                event,
                by=RECEIVER_NODE,
                key=keys["receiver"].signing_key,
                envelope_id=envelope[1],
            ),
        )
    doc = json.loads(stored_audit_path(copy_of).read_text())
    assert [e["event"] for e in doc["audit"]] == ["created", "received", "verified"]
    assert copy.deepcopy(doc) == doc
