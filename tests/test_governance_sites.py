"""Governance between two real bridge processes, configured as operators would.

Site A's route carries a signed request, its node a key reference and a
directory's attestation; site B pins A's key by fingerprint, the requester's
key and the directory's key, and requires every element. The study must reach
the PACS with each element verified and an audit trail of created, sent,
received, verified and forwarded, each entry signed by the node that wrote it.
Then the same configuration without the request: B refuses it, and A parks the
delivery in dead-letter with B's reason, where an operator sees it.
"""

from __future__ import annotations

import json
import sqlite3
from datetime import timedelta
from pathlib import Path

import httpx
import pydicom

from bridge import jmix
from bridge.jmix.attestation import make_attestation
from bridge.jmix.audit import read_audit, stored_audit_path, verify_audit
from bridge.jmix.request import make_request
from tests.support.net import wait_until
from tests.support.sites import (
    TOKEN,
    Pacs,
    Sites,
    dead_jobs,
    end_state,
    send,
    study_of,
)
from tests.support.studies import FAKE_PATIENT

REFERENCE = "directory://org/site-a#key-ed25519"
PROVIDER = "test-directory"
REQUESTER = "org:referring-clinic"


def _governed_sites(root: Path, pacs: Pacs, *, with_request: bool) -> Sites:
    sites = Sites(root / "sites", (pacs.ae_title, pacs.port))
    keys_a = root / "sites" / "a" / "keys"
    a_signing = jmix.load_signing_key(keys_a / "signing.key")
    directory, requester = root / "directory", root / "requester"
    jmix.generate_key_dir(directory)
    jmix.generate_key_dir(requester)

    attestation = make_attestation(
        jmix.load_signing_key(directory / "signing.key"),
        PROVIDER,
        "site-a",
        a_signing.public_key(),
        key_reference=REFERENCE,
        valid_for=timedelta(days=1),
    )
    (root / "attestation.json").write_text(json.dumps(attestation))
    sites.a_conf["node"]["key_reference"] = REFERENCE
    sites.a_conf["node"]["directory_attestation"] = str(root / "attestation.json")
    if with_request:
        sites.a_conf["routes"][0]["requester"] = _request_file(
            requester, REQUESTER, root / "request.json"
        )

    sender = sites.b_conf["senders"][0]
    sender["signing_key_fingerprints"] = [jmix.fingerprint(a_signing.public_key())]
    sender["key_reference"] = REFERENCE
    sender["requester_keys"] = [
        {"id": REQUESTER, "key": str(requester / "signing.pub")}
    ]
    sender["governance"] = {
        "requester": "required",
        "attestation": "required",
        "key_reference": "required",
        "audit": "required",
    }
    sites.b_conf["receiving"] = {
        "directory_keys": [{"id": PROVIDER, "key": str(directory / "signing.pub")}]
    }
    return sites


def _request_file(keys: Path, requester_id: str, path: Path) -> str:
    """Write a request signed with ``keys`` by ``requester_id`` for site B."""
    request = make_request(
        jmix.load_signing_key(keys / "signing.key"),
        jmix.Entity(requester_id, "Referring clinic", "desk@clinic.test"),
        "site-b",
        valid_for=timedelta(days=1),
    )
    path.write_text(json.dumps(request.as_json()))
    return str(path)


def _rows(db: Path, sql: str) -> list[dict]:
    with sqlite3.connect(db, timeout=10) as conn:
        conn.row_factory = sqlite3.Row
        return [dict(r) for r in conn.execute(sql)]


def _inbound(sites: Sites) -> list[dict]:
    rows = _rows(
        sites.db("b"),
        "SELECT id, state, path, reason, details FROM envelopes WHERE direction = 'in'",
    )
    return [r | {"details": json.loads(r["details"])} for r in rows]


def test_every_element_is_verified_and_the_audit_grows_at_each_hop(tmp_path):
    pacs = Pacs(tmp_path / "pacs")
    sites = _governed_sites(tmp_path, pacs, with_request=True)
    study = study_of(tmp_path / "study", 4)
    try:
        sites.start_b()
        sites.start_a()
        assert send(sites, study).returncode == 0
        assert end_state(sites, pacs, study) == 0

        (envelope,) = _inbound(sites)
        governance = envelope["details"]["governance"]
        assert {k: governance[k]["status"] for k in governance} == {
            "requester": "verified",
            "attestation": "verified",
            "key_reference": "verified",
            "audit": "verified",
        }
        zip_path = sites.spool("b") / envelope["path"]
        wait_until(
            lambda: "forwarded" in _events(stored_audit_path(zip_path)),
            30,
            "the forwarded audit entry",
        )
        audit = json.loads(stored_audit_path(zip_path).read_text())
        assert [e["event"] for e in audit["audit"]] == [
            "created",
            "sent",
            "received",
            "verified",
            "forwarded",
        ]
        assert [e["by"]["id"] for e in audit["audit"]] == ["site-a"] * 2 + [
            "site-b"
        ] * 3
        keys = tmp_path / "sites"
        trust = jmix.TrustStore(
            [
                ("site-a", keys / "a" / "keys" / "signing.pub"),
                ("site-b", keys / "b" / "keys" / "signing.pub"),
            ]
        )
        checks = verify_audit(audit, envelope["id"], trust, policy="required")
        assert [c.status for c in checks] == ["verified"] * 5
        # What arrived over the wire already carried the sender's two entries.
        assert [e["event"] for e in read_audit(zip_path)["audit"]] == [
            "created",
            "sent",
        ]
    finally:
        sites.stop()
        pacs.stop()


def test_audit_entries_carry_no_patient_data_nor_uids(tmp_path):
    pacs = Pacs(tmp_path / "pacs")
    sites = _governed_sites(tmp_path, pacs, with_request=True)
    study = study_of(tmp_path / "study", 2)
    try:
        sites.start_b()
        sites.start_a()
        assert send(sites, study).returncode == 0
        assert end_state(sites, pacs, study) == 0
        (envelope,) = _inbound(sites)
        stored = stored_audit_path(sites.spool("b") / envelope["path"])
        wait_until(lambda: "forwarded" in _events(stored), 30, "the forwarded entry")

        answer = httpx.get(
            f"http://127.0.0.1:{sites.b_http}/api/jmix/{envelope['id']}/audit",
            headers={"Authorization": f"Bearer {TOKEN}"},
            timeout=10,
        )
        assert answer.status_code == 200
        assert len(answer.json()["audit"]) == 5
        for text in (stored.read_text(), answer.text):
            leaked = [value for value in _identifying(study) if value in text]
            assert leaked == [], leaked
    finally:
        sites.stop()
        pacs.stop()


def _identifying(study: dict[str, Path]) -> set[str]:
    """The patient's name (whole and in parts), id and every UID of ``study``."""
    found = {FAKE_PATIENT, *FAKE_PATIENT.split("^")}
    for path in study.values():
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        found |= {str(ds.PatientName), ds.PatientID, ds.StudyInstanceUID}
        found |= {ds.SeriesInstanceUID, ds.SOPInstanceUID}
    return found


def test_a_study_request_wins_over_the_route_for_its_study_only(tmp_path):
    pacs = Pacs(tmp_path / "pacs")
    sites = _governed_sites(tmp_path, pacs, with_request=True)
    by_uid, by_accession, other = (
        study_of(tmp_path / name, 1) for name in ("by-uid", "by-accession", "other")
    )
    _set_accession(by_accession, "ACC-2026-0042")
    rules = []
    for name, match in (
        ("org:asked-by-uid", {"study_instance_uid": _study_uid(by_uid)}),
        ("org:asked-by-accession", {"accession_number": "ACC-2026-0042"}),
    ):
        keys = tmp_path / name.replace(":", "-")
        jmix.generate_key_dir(keys)
        request = _request_file(keys, name, keys / "request.json")
        rules.append({"request": request, **match})
        sites.b_conf["senders"][0]["requester_keys"].append(
            {"id": name, "key": str(keys / "signing.pub")}
        )
    sites.a_conf["study_requests"] = rules
    try:
        sites.start_b()
        sites.start_a()
        assert send(sites, {**by_uid, **by_accession, **other}).returncode == 0
        assert end_state(sites, pacs, {**by_uid, **by_accession, **other}) == 0

        requesters = {}
        for row in _rows(
            sites.db("a"),
            "SELECT id, study_uid FROM envelopes WHERE direction = 'out'",
        ):
            (inbound,) = [e for e in _inbound(sites) if e["id"] == row["id"]]
            manifest = jmix.read_manifest(sites.spool("b") / inbound["path"])
            requesters[row["study_uid"]] = manifest["requester"]["id"]
        assert requesters == {
            _study_uid(by_uid): "org:asked-by-uid",
            _study_uid(by_accession): "org:asked-by-accession",
            _study_uid(other): REQUESTER,
        }
    finally:
        sites.stop()
        pacs.stop()


def _study_uid(study: dict[str, Path]) -> str:
    path = next(iter(study.values()))
    return str(pydicom.dcmread(path, stop_before_pixels=True).StudyInstanceUID)


def _set_accession(study: dict[str, Path], accession: str) -> None:
    for path in study.values():
        ds = pydicom.dcmread(path)
        ds.AccessionNumber = accession
        ds.save_as(path)


def test_an_envelope_without_the_required_request_is_refused_and_parked(tmp_path):
    pacs = Pacs(tmp_path / "pacs")
    sites = _governed_sites(tmp_path, pacs, with_request=False)
    study = study_of(tmp_path / "study", 2)
    try:
        sites.start_b()
        sites.start_a()
        assert send(sites, study).returncode == 0
        wait_until(
            lambda: dead_jobs(sites) or _inbound(sites), 60, "B to refuse the envelope"
        )
        refused = _dead_reasons(sites.db("a")) + [
            e["reason"] for e in _inbound(sites) if e["state"] == "quarantined"
        ]
        assert refused, "the envelope was neither parked nor quarantined"
        assert all("requester" in reason for reason in refused), refused
        assert pacs.received() == {}
    finally:
        sites.stop()
        pacs.stop()


def _events(path: Path) -> list[str]:
    try:
        return [e["event"] for e in json.loads(path.read_text())["audit"]]
    except (FileNotFoundError, ValueError):
        return []


def _dead_reasons(db: Path) -> list[str]:
    rows = _rows(db, "SELECT last_error FROM jobs WHERE state = 'dead'")
    return [r["last_error"] for r in rows]
