"""Storage commitment reports that arrive on the PACS's own association."""

import pytest
from pydicom.dataset import Dataset
from pynetdicom import AE, build_role, evt
from pynetdicom.sop_class import (
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from bridge.dicom.commitment import CommitmentReports
from bridge.store import Envelope, SQLiteStore
from tests.support.net import free_port

ENV_ID = "0f8fad5b-d9cb-469f-a165-70867728950e"
TXN = "1.2.826.0.1.3680043.8.498.1"


@pytest.fixture
def receiver(tmp_path):
    store = SQLiteStore(tmp_path / "state.db")
    store.put_envelope(
        Envelope(
            id=ENV_ID, direction="in", peer="a", path="x", size_bytes=1, state="opened"
        )
    )
    store.record_commitment(TXN, ENV_ID, "pacs", "requested")
    ae = AE(ae_title="JMIXBRIDGE")
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port),
        block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, CommitmentReports(store).handle)],
    )
    yield store, port
    server.shutdown()
    store.close()


def _report(port: int, event_type: int, txn: str, failed: int = 0) -> int:
    """Send an N-EVENT-REPORT as a PACS does, returning the status we answered."""
    info = Dataset()
    info.TransactionUID = txn
    ok = Dataset()
    ok.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
    ok.ReferencedSOPInstanceUID = "1.2.3.4.1"
    info.ReferencedSOPSequence = [ok]
    if failed:
        bad = Dataset()
        bad.ReferencedSOPClassUID = "1.2.840.10008.5.1.4.1.1.2"
        bad.ReferencedSOPInstanceUID = "1.2.3.4.2"
        bad.FailureReason = 0x0110
        info.FailedSOPSequence = [bad] * failed
    pacs = AE(ae_title="PACS")
    pacs.add_requested_context(StorageCommitmentPushModel)
    assoc = pacs.associate(
        "127.0.0.1",
        port,
        ae_title="JMIXBRIDGE",
        ext_neg=[build_role(StorageCommitmentPushModel, scp_role=True)],
    )
    assert assoc.is_established
    status, _ = assoc.send_n_event_report(
        info, event_type, StorageCommitmentPushModel, StorageCommitmentPushModelInstance
    )
    assoc.release()
    return status.Status


def _shown(store):
    return store.get_envelope(ENV_ID, "in").details["storage_commitment"]["pacs"]


def test_report_of_every_instance_marks_the_envelope_committed(receiver):
    store, port = receiver

    assert _report(port, 1, TXN) == 0x0000
    assert _shown(store) == {"state": "committed", "transaction_uid": TXN, "failed": 0}


def test_report_with_failures_marks_the_envelope_failed_with_a_count(receiver):
    store, port = receiver

    assert _report(port, 2, TXN, failed=2) == 0x0000
    assert (_shown(store)["state"], _shown(store)["failed"]) == ("failed", 2)


def test_report_for_an_unknown_transaction_is_refused(receiver):
    store, port = receiver

    assert _report(port, 1, "1.2.3.999") == 0x0115
    assert _shown(store)["state"] == "requested"
