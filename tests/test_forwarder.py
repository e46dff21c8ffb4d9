"""The forwarder against real PACS on loopback: dcmtk storescp, Orthanc, and
pynetdicom SCPs scripted to answer what a real PACS answers when it fails."""

import logging
import threading
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.uid import (
    MPEG2MPML,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, evt
from pynetdicom.dsutils import split_dataset
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.sop_class import (
    CTImageStorage,
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from bridge.dicom.forwarder import Destination, Outcome, TLSSettings, forward
from bridge.errors import PermanentTransportError, RetryableTransportError
from tests.support.dcmtk import StoreSCP
from tests.support.net import free_port, wait_until
from tests.support.orthanc import Orthanc
from tests.support.pki import CertificateAuthority

COMPRESSED = ["JPEG2000.dcm", "SC_rgb_rle.dcm", "SC_rgb_jpeg_dcmtk.dcm"]
UNCOMPRESSED = ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm"]
FAKE_PATIENT = "SECRETTEST^NEVERLOGGED"


def _study(folder: Path, names: list[str], copies: int = 1) -> list[Path]:
    """Write copies of pydicom's test files with fresh instance UIDs, each in its
    own transfer syntax, as one study of a recognisable fake patient."""
    folder.mkdir(parents=True, exist_ok=True)
    study = generate_uid()
    paths = []
    for n in range(copies):
        for name in names:
            ds = dcmread(get_testdata_file(name, download=False))
            ds.StudyInstanceUID = study
            ds.SOPInstanceUID = generate_uid()
            ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
            ds.PatientName = FAKE_PATIENT
            path = folder / f"{n:03d}-{name}"
            ds.save_as(path)
            paths.append(path)
    return paths


def _dest(port: int, ae_title: str = "PACS", **kwargs) -> Destination:
    return Destination("pacs", ae_title, "127.0.0.1", port, **kwargs)


class ScriptedSCP:
    """A pynetdicom storage SCP whose answers the test scripts; stopped by close().

    ``on_store(ds)`` returns the C-STORE status; stored datasets are kept in
    ``received``; ``release`` is set at close so blocked handlers can end.
    """

    def __init__(self, on_store=None, syntaxes=None, contexts=None, extra=()):
        self.received: dict[str, Dataset] = {}
        self.release = threading.Event()
        self.on_store = on_store or (lambda ds: 0x0000)
        ae = AE(ae_title="PACS")
        ae.require_called_aet = True
        for cx in AllStoragePresentationContexts if contexts is None else contexts:
            ae.add_supported_context(
                cx.abstract_syntax,
                syntaxes or [ExplicitVRLittleEndian, ImplicitVRLittleEndian],
            )
        handlers = [(evt.EVT_C_STORE, self._store)]
        for abstract, event, handler in extra:
            ae.add_supported_context(abstract)
            handlers.append((event, handler))
        self.port = free_port()
        self.server = ae.start_server(
            ("127.0.0.1", self.port), block=False, evt_handlers=handlers
        )

    def _store(self, event):
        ds = event.dataset
        ds.file_meta = event.file_meta
        status = self.on_store(event)
        if status == 0x0000 or status & 0xF000 == 0xB000:
            self.received[ds.SOPInstanceUID] = ds
        return status

    def close(self):
        self.release.set()
        self.server.shutdown()


def _uid(event) -> str:
    return event.request.AffectedSOPInstanceUID


@pytest.fixture
def scripted():
    """Make ScriptedSCPs that are closed after the test."""
    made = []

    def make(**kwargs):
        scp = ScriptedSCP(**kwargs)
        made.append(scp)
        return scp

    yield make
    for scp in made:
        scp.close()


def _dataset_bytes(path: Path) -> bytes:
    """Return the encoded dataset after the file meta information."""
    _, offset = split_dataset(path)
    return path.read_bytes()[offset:]


def test_storescp_receives_every_instance_byte_identical(tmp_path, storescp):
    files = _study(tmp_path / "in", UNCOMPRESSED + COMPRESSED)

    result = forward(_dest(storescp.port), files)

    assert result.count(Outcome.DELIVERED) == len(files)
    assert result.associations == 1 and result.converted == 0
    sent = {dcmread(p).SOPInstanceUID: _dataset_bytes(p) for p in files}
    got = {dcmread(p).SOPInstanceUID: _dataset_bytes(p) for p in storescp.files()}
    assert got == sent


def test_orthanc_stores_every_instance(tmp_path, orthanc):
    files = _study(tmp_path / "in", UNCOMPRESSED + COMPRESSED)

    result = forward(_dest(orthanc.dicom_port, orthanc.ae_title), files)

    assert set(orthanc.instance_files()) == set(result.by_uid())
    assert all(r.outcome is Outcome.DELIVERED for r in result.instances)


def test_destination_down_raises_retryable(tmp_path):
    files = _study(tmp_path / "in", ["CT_small.dcm"])

    with pytest.raises(RetryableTransportError):
        forward(_dest(free_port()), files)


def test_unknown_called_ae_raises_permanent(tmp_path, scripted):
    scp = scripted()
    files = _study(tmp_path / "in", ["CT_small.dcm"])

    with pytest.raises(PermanentTransportError, match="rejected permanently"):
        forward(_dest(scp.port, "NOTTHEPACS"), files)


def test_compressed_instances_are_decompressed_for_uncompressed_only_pacs(
    tmp_path, scripted
):
    scp = scripted(syntaxes=[ImplicitVRLittleEndian])
    files = _study(tmp_path / "in", [*COMPRESSED, "CT_small.dcm"])

    result = forward(_dest(scp.port), files)

    assert result.count(Outcome.DELIVERED) == len(files)
    assert result.converted == len(files)  # CT_small is explicit: re-encoded too
    for path in files:
        original = dcmread(path)
        stored = scp.received[original.SOPInstanceUID]
        assert not stored.file_meta.TransferSyntaxUID.is_compressed
        expected = original.pixel_array
        assert np.array_equal(stored.pixel_array, expected)


def test_instance_without_decoder_is_permanent_with_reason(tmp_path, scripted):
    scp = scripted(syntaxes=[ExplicitVRLittleEndian])
    (path,) = _study(tmp_path / "in", ["SC_rgb_jpeg_dcmtk.dcm"])
    ds = dcmread(path)
    ds.file_meta.TransferSyntaxUID = MPEG2MPML  # pydicom has no MPEG decoder
    ds.save_as(path)

    (instance,) = forward(_dest(scp.port), [path]).instances

    assert instance.outcome is Outcome.PERMANENT
    assert instance.reason == (
        f"cannot convert {MPEG2MPML.name} to explicit VR little endian: no decoder"
    )


def test_file_without_meta_header_is_permanent_and_others_go(tmp_path, storescp):
    no_meta = Path(get_testdata_file("no_meta.dcm", download=False))
    files = [no_meta, *_study(tmp_path / "in", ["CT_small.dcm"])]

    bad, good = forward(_dest(storescp.port), files).instances

    assert (bad.outcome, bad.sop_instance_uid) == (Outcome.PERMANENT, "")
    assert bad.reason.startswith("unreadable file")
    assert good.outcome is Outcome.DELIVERED


def test_failure_statuses_are_retryable_or_permanent_by_class(tmp_path, scripted):
    files = _study(tmp_path / "in", ["CT_small.dcm"], copies=4)
    answers = dict(
        zip(
            (dcmread(p).SOPInstanceUID for p in files),
            (0xA700, 0xC000, 0xB000, 0x0000),
            strict=True,
        )
    )
    scp = scripted(on_store=lambda event: answers[_uid(event)])

    result = forward(_dest(scp.port), files)

    outcomes = [(r.outcome, r.status) for r in result.instances]
    assert outcomes == [
        (Outcome.RETRYABLE, 0xA700),
        (Outcome.PERMANENT, 0xC000),
        (Outcome.DELIVERED, 0xB000),
        (Outcome.DELIVERED, 0x0000),
    ]
    assert result.remaining == [files[0]]


def test_silent_pacs_leaves_instances_retryable_without_hanging(tmp_path, scripted):
    scp = scripted(on_store=lambda event: scp.release.wait(60) and 0x0000)
    files = _study(tmp_path / "in", ["CT_small.dcm"], copies=3)

    result = forward(_dest(scp.port, dimse_timeout=1), files)

    assert [r.outcome for r in result.instances] == [Outcome.RETRYABLE] * 3
    assert result.remaining == files


def test_lost_association_resends_from_first_unanswered_instance(tmp_path, scripted):
    files = _study(tmp_path / "in", ["CT_small.dcm"], copies=5)
    third = dcmread(files[2]).SOPInstanceUID
    aborted = threading.Event()

    def abort_once(event):
        if _uid(event) == third and not aborted.is_set():
            aborted.set()
            event.assoc.abort()
            return 0xC000  # never reaches the SCU: the association is gone
        return 0x0000

    scp = scripted(on_store=abort_once)

    result = forward(_dest(scp.port), files)

    assert result.count(Outcome.DELIVERED) == 5
    assert result.associations == 2
    assert set(scp.received) == set(result.by_uid())


def test_sop_class_the_pacs_refuses_is_permanent(tmp_path, scripted):
    scp = scripted(
        contexts=[
            cx
            for cx in AllStoragePresentationContexts
            if cx.abstract_syntax == CTImageStorage
        ]
    )
    files = _study(tmp_path / "in", ["CT_small.dcm", "MR_small.dcm"])

    ct, mr = forward(_dest(scp.port), files).instances

    assert ct.outcome is Outcome.DELIVERED
    assert mr.outcome is Outcome.PERMANENT
    assert "no presentation context for MR Image Storage" in mr.reason


def test_more_than_128_contexts_split_into_two_associations(tmp_path, scripted):
    scp = scripted()
    classes = [cx.abstract_syntax for cx in AllStoragePresentationContexts][:70]
    files = []
    for n, (path, sop_class) in enumerate(
        zip(_study(tmp_path / "in", ["CT_small.dcm"], copies=70), classes, strict=True)
    ):
        ds = dcmread(path)
        ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
        ds.save_as(path)
        files.append(path)
        assert n < 70

    result = forward(_dest(scp.port), files)

    assert result.count(Outcome.DELIVERED) == 70
    assert result.associations == 2  # 70 classes x 2 contexts > 128


def test_counters_are_incremented_by_outcome(tmp_path, storescp):
    files = _study(tmp_path / "in", ["CT_small.dcm", "MR_small.dcm"])
    counters: dict[str, int] = {"delivered": 5}

    forward(_dest(storescp.port), files, counters=counters)

    assert counters == {
        "delivered": 7,
        "retryable": 0,
        "permanent": 0,
        "converted": 0,
        "associations": 1,
    }


def test_logs_carry_no_patient_name_and_no_uid(tmp_path, storescp, caplog):
    files = _study(tmp_path / "in", ["CT_small.dcm", "SC_rgb_rle.dcm"])
    caplog.set_level(logging.INFO)
    caplog.set_level(logging.DEBUG, logger="bridge")

    result = forward(_dest(storescp.port, storage_commitment=True), files)

    assert caplog.records
    assert FAKE_PATIENT not in caplog.text
    for uid in [*result.by_uid(), dcmread(files[0]).StudyInstanceUID]:
        assert uid not in caplog.text


def test_storage_commitment_is_unsupported_by_storescp(tmp_path, storescp):
    files = _study(tmp_path / "in", ["CT_small.dcm"])

    result = forward(_dest(storescp.port, storage_commitment=True), files)

    assert result.commitment.state == "unsupported"
    assert result.associations == 1


def _orthanc_knowing_the_bridge(folder: Path, report_port: int) -> Orthanc:
    # Orthanc answers N-ACTION only from a modality it knows, and sends the
    # result later on an association of its own to that modality's port.
    modality = {"AET": "JMIXBRIDGE", "Host": "127.0.0.1", "Port": report_port}
    return Orthanc(folder, "ORTHANC", DicomModalities={"bridge": modality})


def test_storage_commitment_is_requested_from_orthanc(tmp_path):
    orthanc = _orthanc_knowing_the_bridge(tmp_path / "orthanc", free_port())
    try:
        files = _study(tmp_path / "in", ["CT_small.dcm", "MR_small.dcm"])
        dest = _dest(
            orthanc.dicom_port, "ORTHANC", storage_commitment=True, commitment_wait=0
        )

        result = forward(dest, files)

        assert result.commitment.state == "requested", result.commitment
        assert result.commitment.transaction_uid
    finally:
        orthanc.stop()


def test_orthanc_reports_commitment_of_requested_instances(tmp_path):
    reports = []
    reported = threading.Event()

    def on_report(event):
        reports.append((event.request.EventTypeID, event.event_information))
        reported.set()
        return 0x0000, None

    ae = AE(ae_title="JMIXBRIDGE")
    ae.add_supported_context(StorageCommitmentPushModel, scu_role=True, scp_role=True)
    report_port = free_port()
    server = ae.start_server(
        ("127.0.0.1", report_port),
        block=False,
        evt_handlers=[(evt.EVT_N_EVENT_REPORT, on_report)],
    )
    orthanc = _orthanc_knowing_the_bridge(tmp_path / "orthanc", report_port)
    try:
        files = _study(tmp_path / "in", ["CT_small.dcm", "MR_small.dcm"])
        dest = _dest(
            orthanc.dicom_port, "ORTHANC", storage_commitment=True, commitment_wait=0
        )

        result = forward(dest, files)

        assert reported.wait(30), "Orthanc sent no N-EVENT-REPORT"
        event_type, info = reports[0]
        assert event_type == 1
        assert info.TransactionUID == result.commitment.transaction_uid
        committed = {r.ReferencedSOPInstanceUID for r in info.ReferencedSOPSequence}
        assert committed == set(result.by_uid())
    finally:
        orthanc.stop()
        server.shutdown()


def test_storage_commitment_reported_on_same_association_is_committed(
    tmp_path, scripted
):
    def on_action(event):
        info = event.action_information
        threading.Thread(target=report, args=(event.assoc, info)).start()
        return 0x0000, None

    def report(assoc, info):
        # The N-EVENT-REPORT may follow once the N-ACTION response is queued,
        # which is when the acceptor's reactor leaves the N-ACTION handler.
        wait_until(lambda: not assoc._is_paused, what="N-ACTION response")
        result = Dataset()
        result.TransactionUID = info.TransactionUID
        result.ReferencedSOPSequence = info.ReferencedSOPSequence
        assoc.send_n_event_report(
            result, 1, StorageCommitmentPushModel, StorageCommitmentPushModelInstance
        )

    scp = scripted(extra=[(StorageCommitmentPushModel, evt.EVT_N_ACTION, on_action)])
    files = _study(tmp_path / "in", ["CT_small.dcm", "MR_small.dcm"])
    dest = _dest(scp.port, storage_commitment=True, commitment_wait=20)

    result = forward(dest, files)

    assert result.commitment.state == "committed"
    assert result.associations == 1


def test_tls_destination_with_client_certificate(tmp_path):
    ca = CertificateAuthority(tmp_path / "pki")
    server = ca.issue("server", server=True)
    client = ca.issue("client", client=True)
    scp = StoreSCP(
        tmp_path / "pacs",
        extra=("+tls", str(server.key), str(server.cert), "+cf", str(ca.cert), "-rc"),
    )
    try:
        tls = TLSSettings(ca.cert, client.cert, client.key)
        files = _study(tmp_path / "in", ["CT_small.dcm", "JPEG2000.dcm"])

        result = forward(_dest(scp.port, tls=tls), files)

        assert result.count(Outcome.DELIVERED) == 2
        assert len(scp.files()) == 2
    finally:
        scp.stop()
