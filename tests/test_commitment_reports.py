"""Storage commitment results received by the listener (README L-02), who may
send them, and the one log line each association leaves behind.

The end-to-end test forwards an opened envelope to a real Orthanc, which sends
its N-EVENT-REPORT later on an association of its own to the listener.
"""

import logging
import threading
import uuid
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE, build_role
from pynetdicom.sop_class import (
    CTImageStorage,
    StorageCommitmentPushModel,
    Verification,
)

from bridge.dicom.commitment import CommitmentReports
from bridge.dicom.forwarder import Destination
from bridge.dicom.listener import AllowedCaller, Listener, ListenerSettings
from bridge.ingest import Ingest, IngestSettings, RouteRule
from bridge.receiving.forwarding import Forwarder
from bridge.spool import Spool
from bridge.store import Envelope, NewJob, SQLiteStore
from bridge.workers.base import JobContext
from tests.support.dcmtk import echoscu, storescu
from tests.support.net import wait_until
from tests.support.orthanc import Orthanc
from tests.support.studies import FAKE_PATIENT, make_study
from tests.test_commitment import _report as send_report

ROUTE = RouteRule(name="all", peers=("peer-a",), quiet_seconds=3600)
ORTHANC = AllowedCaller("ORTHANC", "127.0.0.1")
# The calling AE title tests.test_commitment.send_report uses.
PACS = AllowedCaller("PACS", "127.0.0.1")
TXN = "1.2.826.0.1.3680043.8.498.77"


class Node:
    """A listener on a free loopback port over a real SQLite store and spool.

    ``ingest`` False makes a receiving-only node: no routes, no storage.
    """

    def __init__(self, root: Path, *, ingest: bool = False, **settings):
        self.store = SQLiteStore(root / "state.sqlite")
        self.spool = Spool(root / "spool")
        self.ingest = (
            Ingest(self.store, self.spool, [ROUTE], IngestSettings())
            if ingest
            else None
        )
        self.listener = Listener(
            ListenerSettings(host="127.0.0.1", port=0, **settings),
            self.ingest,
            commitment=CommitmentReports(self.store),
        )
        self.listener.start()
        self.port = self.listener.port

    def opened_envelope(self, folder: Path, count: int = 3) -> tuple[str, list[str]]:
        """Record an opened envelope of ``count`` instances; return its id and
        the instances' paths relative to its opened folder."""
        env_id = str(uuid.uuid4())
        opened = self.spool.envelope_path("opened", env_id)
        files = make_study(folder, series=1, per_series=count)
        opened.mkdir(parents=True)
        rel = []
        for path in files:
            path.rename(opened / path.name)
            rel.append(path.name)
        self.store.put_envelope(
            Envelope(
                id=env_id,
                direction="in",
                peer="clinic-a",
                path=self.spool.relative(opened),
                size_bytes=1,
                state="opened",
            )
        )
        return env_id, rel

    def commitment_of(self, env_id: str, dest: str) -> dict:
        env = self.store.get_envelope(env_id, "in")
        return env.details.get("storage_commitment", {}).get(dest, {})

    def stop(self) -> None:
        self.listener.stop()
        self.store.close()


@pytest.fixture
def start_node(tmp_path):
    started = []

    def start(**kwargs) -> Node:
        node = Node(tmp_path / f"node{len(started)}", **kwargs)
        started.append(node)
        return node

    yield start
    for node in started:
        node.stop()


def _summaries(caplog) -> list[str]:
    return [
        r.getMessage()
        for r in caplog.records
        if r.name == "bridge.dicom.listener"
        and r.levelno == logging.INFO
        and r.getMessage().startswith("association ended")
    ]


# -- end to end with Orthanc -------------------------------------------------------


def test_orthanc_report_on_its_own_association_marks_the_envelope_committed(
    start_node, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    node = start_node(commitment_callers=(ORTHANC,))
    # Orthanc takes the N-ACTION only from a modality it knows, and sends the
    # result to that modality's host and port: here, the listener.
    bridge = {"AET": "JMIXBRIDGE", "Host": "127.0.0.1", "Port": node.port}
    orthanc = Orthanc(
        tmp_path / "orthanc", ORTHANC.ae_title, DicomModalities={"b": bridge}
    )
    try:
        env_id, rel = node.opened_envelope(tmp_path / "study")
        dest = Destination(
            "pacs",
            orthanc.ae_title,
            "127.0.0.1",
            orthanc.dicom_port,
            storage_commitment=True,
        )
        forwarder = Forwarder(node.store, node.spool, {"pacs": dest}, receipts=False)
        job = node.store.enqueue(
            NewJob(
                "forward",
                f"forward:{env_id}:pacs",
                target="pacs",
                payload={"envelope_id": env_id, "remaining": rel},
            )
        )

        outcome = forwarder(job, JobContext(threading.Event(), lambda: True))

        assert outcome.kind == "done", outcome
        wait_until(
            lambda: node.commitment_of(env_id, "pacs").get("state") == "committed",
            timeout=60,
            what="Orthanc's storage commitment report",
        )
        shown = node.commitment_of(env_id, "pacs")
        assert shown["failed"] == 0
        assert node.store.find_commitment(shown["transaction_uid"]) == (env_id, "pacs")
        wait_until(lambda: _summaries(caplog), what="the association summary")
    finally:
        orthanc.stop()

    [summary] = _summaries(caplog)
    assert "calling_ae=ORTHANC" in summary
    assert "commitment_reports=1" in summary
    assert "instances_accepted=0" in summary
    assert shown["transaction_uid"] not in caplog.text


# -- who may report, who may store ---------------------------------------------------


def test_commitment_caller_report_is_recorded_without_orthanc(start_node, tmp_path):
    node = start_node(commitment_callers=(PACS,))
    env_id, _ = node.opened_envelope(tmp_path / "study", count=1)
    node.store.record_commitment(TXN, env_id, "pacs", "requested")

    assert send_report(node.port, 1, TXN) == 0x0000
    assert node.commitment_of(env_id, "pacs")["state"] == "committed"


def test_unknown_caller_is_refused(start_node):
    node = start_node(commitment_callers=(PACS,))

    result = echoscu(node.port, calling="INTRUDER")

    assert result.returncode != 0
    assert "Calling AE Title Not Recognized" in result.stderr + result.stdout
    assert node.listener.stats.snapshot()["associations_rejected"] == {"calling-ae": 1}


def test_commitment_caller_from_another_host_is_refused(start_node):
    node = start_node(commitment_callers=(AllowedCaller("PACS", "192.0.2.7"),))

    result = echoscu(node.port, calling="PACS")

    assert result.returncode != 0
    assert node.listener.stats.snapshot()["associations_rejected"] == {"host": 1}


def test_commitment_caller_cannot_store(start_node, tmp_path):
    node = start_node(
        ingest=True,
        allowed_callers=(AllowedCaller("CT01"),),
        commitment_callers=(PACS,),
    )
    files = make_study(tmp_path / "in", series=1, per_series=1)

    refused = storescu(node.port, files, calling="PACS")
    allowed = storescu(node.port, files, calling="CT01")

    assert refused.returncode != 0
    assert allowed.returncode == 0, allowed.stderr
    [study] = node.store.recent_studies()
    assert study.instance_count == 1
    assert node.listener.stats.snapshot()["associations_rejected"] == {}


def test_commitment_caller_is_offered_only_commitment_and_verification(start_node):
    node = start_node(
        ingest=True,
        allowed_callers=(AllowedCaller("CT01"),),
        commitment_callers=(PACS,),
    )
    ae = AE(ae_title="PACS")
    for sop_class in (CTImageStorage, StorageCommitmentPushModel, Verification):
        ae.add_requested_context(sop_class)

    assoc = ae.associate(
        "127.0.0.1",
        node.port,
        ae_title="JMIXBRIDGE",
        ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
    )
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
        rejected = {cx.abstract_syntax for cx in assoc.rejected_contexts}
    finally:
        assoc.release()

    assert accepted == {StorageCommitmentPushModel, Verification}
    assert rejected == {CTImageStorage}


def test_caller_allowed_to_store_cannot_report(start_node, tmp_path):
    node = start_node(
        ingest=True,
        allowed_callers=(AllowedCaller("CT01"),),
        commitment_callers=(PACS,),
    )
    env_id, _ = node.opened_envelope(tmp_path / "study", count=1)
    node.store.record_commitment(TXN, env_id, "pacs", "requested")

    ae = AE(ae_title="CT01")
    ae.add_requested_context(StorageCommitmentPushModel)
    role = build_role(StorageCommitmentPushModel, scp_role=True)

    assoc = ae.associate("127.0.0.1", node.port, ae_title="JMIXBRIDGE", ext_neg=[role])

    # No context was accepted, so pynetdicom gave the association up.
    assert not assoc.is_established
    assert node.commitment_of(env_id, "pacs")["state"] == "requested"
    # The association was let in (CT01 may store); only the context was refused.
    assert node.listener.stats.snapshot()["associations_rejected"] == {}


def test_receiving_only_node_offers_no_storage_context(start_node):
    node = start_node(commitment_callers=(PACS,))
    ae = AE(ae_title="PACS")
    ae.add_requested_context(CTImageStorage)
    ae.add_requested_context(Verification)

    assoc = ae.associate("127.0.0.1", node.port, ae_title="JMIXBRIDGE")
    try:
        accepted = {cx.abstract_syntax for cx in assoc.accepted_contexts}
    finally:
        assoc.release()

    assert accepted == {Verification}


def test_report_is_taken_while_the_spool_is_short_of_disk(
    start_node, tmp_path, monkeypatch
):
    node = start_node(ingest=True, commitment_callers=(PACS,), min_free_bytes=10**15)
    env_id, _ = node.opened_envelope(tmp_path / "study", count=1)
    node.store.record_commitment(TXN, env_id, "pacs", "requested")
    files = make_study(tmp_path / "in", series=1, per_series=1)

    assert storescu(node.port, files, calling="PACS").returncode != 0
    assert send_report(node.port, 1, TXN) == 0x0000
    assert node.commitment_of(env_id, "pacs")["state"] == "committed"
    assert node.listener.stats.snapshot()["associations_rejected"] == {"disk-full": 1}


def test_listener_without_ingest_or_commitment_is_refused(tmp_path):
    with pytest.raises(ValueError, match="ingest or a commitment"):
        Listener(ListenerSettings(), None)


# -- the association summary --------------------------------------------------------


def test_association_ends_with_one_summary_line_without_uids(
    start_node, tmp_path, caplog
):
    caplog.set_level(logging.INFO)
    node = start_node(ingest=True)
    files = make_study(tmp_path / "in", series=1, per_series=2)

    assert storescu(node.port, files, calling="CT01").returncode == 0
    wait_until(lambda: _summaries(caplog), what="the association summary")

    [summary] = _summaries(caplog)
    assert "calling_ae=CT01" in summary
    assert "instances_accepted=2 instances_refused=0" in summary
    [study] = node.store.recent_studies()
    spooled = sum(
        node.spool.path_of(inst.spool_path).stat().st_size
        for inst in node.store.study_instances(study.ref)
    )
    assert f"bytes={spooled} " in summary
    for path in files:
        ds = dcmread(path, stop_before_pixels=True)
        assert ds.StudyInstanceUID not in caplog.text
        assert ds.SOPInstanceUID not in caplog.text
    assert FAKE_PATIENT not in caplog.text
    assert not [
        r
        for r in caplog.records
        if r.name == "bridge.dicom.listener"
        and r.levelno == logging.INFO
        and r.getMessage().startswith("instance ")
    ]


def test_refused_instance_is_counted_in_the_summary(start_node, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    node = start_node(ingest=True)
    [bad] = make_study(tmp_path / "bad", series=1, per_series=1)
    ds = dcmread(bad)
    del ds.StudyInstanceUID
    ds.save_as(bad)

    storescu(node.port, [bad], calling="CT01")
    wait_until(lambda: _summaries(caplog), what="the association summary")

    [summary] = _summaries(caplog)
    assert "instances_accepted=0 instances_refused=1 bytes=0" in summary
