"""The listener with dcmtk as the modality: real processes, real sockets."""

import errno
import logging
import os
import shutil
import socket
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification

from bridge.daemon import MeteredListenerStats
from bridge.dicom.listener import AllowedCaller, Listener, ListenerSettings
from bridge.errors import StoreError
from bridge.ingest import Ingest, IngestSettings, RouteRule
from bridge.ops import Metrics
from bridge.spool import DiskSpace, Spool
from bridge.store import DuplicatePolicy, SQLiteStore
from tests.support.dcmtk import dcmsend, echoscu, storescu
from tests.support.studies import FAKE_PATIENT, make_instance, make_study

ROUTE = RouteRule(name="all", peers=("peer-a",), quiet_seconds=3600)


class Bridge:
    """A listener on a free loopback port with its own spool and store."""

    def __init__(
        self,
        tmp_path: Path,
        settings=None,
        ingest_settings=None,
        stats=None,
        routes=(ROUTE,),
    ):
        self.spool = Spool(tmp_path / "spool")
        self.store = SQLiteStore(tmp_path / "state.sqlite")
        self.ingest = Ingest(
            self.store, self.spool, list(routes), ingest_settings or IngestSettings()
        )
        base = ListenerSettings(host="127.0.0.1", port=0)
        self.listener = Listener(settings or base, self.ingest, stats=stats)
        self.listener.start()
        self.port = self.listener.port

    def instances(self):
        """Every recorded instance, in arrival order."""
        return [
            inst
            for study in self.store.recent_studies()
            for inst in self.store.study_instances(study.ref)
        ]

    def stop(self):
        self.listener.stop()
        self.store.close()


@pytest.fixture
def start_bridge(tmp_path):
    started = []

    def start(**settings):
        ingest_settings = settings.pop("ingest", None)
        bridge = Bridge(
            tmp_path,
            ListenerSettings(host="127.0.0.1", port=0, **settings),
            ingest_settings,
        )
        started.append(bridge)
        return bridge

    yield start
    for bridge in started:
        bridge.stop()


def data_set(path: Path) -> pydicom.Dataset:
    """Return the data set of a DICOM file, pixel data as encoded, without meta.

    Compared element by element: dcmtk may re-encode lengths on the wire (a
    sequence of undefined length, say), but never a value.
    """
    ds = pydicom.dcmread(path)
    del ds.file_meta
    return ds


def test_study_sent_over_several_associations_is_one_study(start_bridge, tmp_path):
    bridge = start_bridge()
    study_uid = generate_uid()
    for n in range(3):
        files = make_study(
            tmp_path / f"assoc{n}", series=1, per_series=2, study_uid=study_uid
        )
        result = storescu(bridge.port, files)
        assert result.returncode == 0, result.stderr

    [study] = bridge.store.recent_studies()
    assert study.instance_count == 6
    for inst in bridge.store.study_instances(study.ref):
        assert inst.study_instance_uid == study_uid
        assert bridge.spool.path_of(inst.spool_path).is_file()
    assert list(bridge.spool.incoming.iterdir()) == []
    assert bridge.listener.stats.snapshot()["instances_stored"] == 6


@pytest.mark.parametrize(
    ("name", "send", "extra"),
    [
        ("JPEG2000.dcm", dcmsend, ()),  # JPEG 2000 1.2.840.10008.1.2.4.91
        ("examples_jpeg2k.dcm", dcmsend, ()),  # JPEG 2000 lossless .90
        ("SC_rgb_jpeg_dcmtk.dcm", dcmsend, ()),  # JPEG baseline .50
        ("JPGExtended.dcm", dcmsend, ()),  # JPEG extended .51
        ("SC_rgb_jpeg_gdcm.dcm", dcmsend, ()),  # JPEG lossless SV1 .70
        ("JPEGLSNearLossless_08.dcm", dcmsend, ()),  # JPEG-LS near-lossless .81
        ("SC_rgb_rle.dcm", dcmsend, ()),  # RLE 1.2.840.10008.1.2.5
        ("image_dfl.dcm", dcmsend, ()),  # deflated explicit little endian
        ("MR_small_bigendian.dcm", storescu, ("-xb",)),  # explicit big endian
        ("rtplan.dcm", storescu, ("-xi",)),  # implicit LE, a non-image class
    ],
)
def test_transfer_syntax_is_stored_exactly_as_sent(
    start_bridge, tmp_path, name, send, extra
):
    bridge = start_bridge()
    source = with_study_uids(Path(get_testdata_file(name, download=False)), tmp_path)

    result = send(bridge.port, [source], extra=extra)

    assert result.returncode == 0, result.stdout + result.stderr
    [inst] = bridge.instances()
    sent_syntax = pydicom.dcmread(source, stop_before_pixels=True).file_meta
    assert inst.transfer_syntax_uid == sent_syntax.TransferSyntaxUID
    stored = bridge.spool.path_of(inst.spool_path)
    assert data_set(stored) == data_set(source)


def with_study_uids(source: Path, folder: Path) -> Path:
    """Return ``source``, or a copy given the Study and Series UIDs it lacks.

    Some of pydicom's files have none; pixel data is copied as encoded.
    """
    ds = pydicom.dcmread(source)
    if "StudyInstanceUID" in ds and "SeriesInstanceUID" in ds:
        return source
    ds.StudyInstanceUID = ds.get("StudyInstanceUID") or generate_uid()
    ds.SeriesInstanceUID = ds.get("SeriesInstanceUID") or generate_uid()
    ds.save_as(folder / source.name)
    return folder / source.name


def test_htj2k_instance_is_accepted_as_sent(start_bridge):
    # dcmtk 3.6.7 predates HTJ2K, so pynetdicom plays the modality here; the
    # code stream is a JPEG 2000 one relabelled, which the bridge never decodes.
    bridge = start_bridge()
    ds = pydicom.dcmread(get_testdata_file("JPEG2000.dcm", download=False))
    htj2k = "1.2.840.10008.1.2.4.203"
    ds.file_meta.TransferSyntaxUID = htj2k
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(ds.SOPClassUID, htj2k)
    assoc = ae.associate("127.0.0.1", bridge.port, ae_title="JMIXBRIDGE")
    assert assoc.is_established
    status = assoc.send_c_store(ds)
    assoc.release()

    assert status.Status == 0x0000
    [inst] = bridge.instances()
    assert inst.transfer_syntax_uid == htj2k


def test_echo_is_answered(start_bridge):
    bridge = start_bridge()
    assert echoscu(bridge.port).returncode == 0


def test_unknown_calling_ae_is_rejected(start_bridge, tmp_path):
    bridge = start_bridge(allowed_callers=(AllowedCaller("CT01"),))
    files = make_study(tmp_path / "in", series=1, per_series=1)

    refused = storescu(bridge.port, files, calling="INTRUDER")
    allowed = storescu(bridge.port, files, calling="CT01")

    assert refused.returncode != 0
    assert "Calling AE Title Not Recognized" in refused.stderr + refused.stdout
    assert allowed.returncode == 0
    stats = bridge.listener.stats.snapshot()
    assert stats["associations_rejected"] == {"calling-ae": 1}
    assert len(bridge.instances()) == 1


def test_allowed_caller_from_another_host_is_rejected(start_bridge):
    bridge = start_bridge(allowed_callers=(AllowedCaller("CT01", "192.0.2.7"),))
    result = echoscu(bridge.port, calling="CT01")
    assert result.returncode != 0
    assert bridge.listener.stats.snapshot()["associations_rejected"] == {"host": 1}


def test_wrong_called_ae_is_rejected_when_checked(start_bridge):
    bridge = start_bridge()
    result = echoscu(bridge.port, called="SOMEONE")
    assert "Called AE Title Not Recognized" in result.stderr + result.stdout


def test_wrong_called_ae_is_accepted_when_not_checked(start_bridge):
    bridge = start_bridge(check_called_ae=False)
    assert echoscu(bridge.port, called="SOMEONE").returncode == 0


def test_association_over_the_limit_is_rejected_as_transient(start_bridge):
    bridge = start_bridge(max_associations=1)
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(Verification)
    held = ae.associate("127.0.0.1", bridge.port, ae_title="JMIXBRIDGE")
    assert held.is_established
    try:
        result = echoscu(bridge.port)
    finally:
        held.release()
    assert "Local Limit Exceeded" in result.stderr + result.stdout
    assert echoscu(bridge.port).returncode == 0


def accepted_receive_buffer(bridge: Bridge) -> int:
    """Hold an association open; return its socket's SO_RCVBUF on our side."""
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(Verification)
    assoc = ae.associate("127.0.0.1", bridge.port, ae_title="JMIXBRIDGE")
    assert assoc.is_established
    try:
        [ours] = bridge.listener._server.active_associations
        sock = ours.dul.socket.socket
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    finally:
        assoc.release()


def system_receive_buffer() -> int:
    """Return the SO_RCVBUF a new TCP socket starts with here."""
    with socket.socket() as fresh:
        return fresh.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)


def test_accepted_association_has_the_configured_receive_buffer(start_bridge):
    # Below the usual net.core.rmem_max, which caps what setsockopt may ask.
    wanted = 1 << 20
    assert wanted > system_receive_buffer()
    bridge = start_bridge(receive_buffer_bytes=wanted)

    # Linux reports twice what was asked (its bookkeeping overhead, socket(7)).
    assert accepted_receive_buffer(bridge) >= wanted


def test_receive_buffer_of_zero_leaves_the_system_default(start_bridge):
    bridge = start_bridge(receive_buffer_bytes=0)
    assert accepted_receive_buffer(bridge) == system_receive_buffer()


def fill_disk(monkeypatch, spool: Spool, free_bytes: int) -> None:
    """Make the spool's filesystem look nearly full (the watermark simulation)."""
    monkeypatch.setattr(spool, "disk_space", lambda: DiskSpace(free_bytes, 10**12))


def test_association_is_refused_below_the_disk_watermark_and_recovers(
    start_bridge, monkeypatch, tmp_path
):
    bridge = start_bridge(min_free_bytes=10**9)
    files = make_study(tmp_path / "in", series=1, per_series=1)
    fill_disk(monkeypatch, bridge.spool, 10**6)

    refused = storescu(bridge.port, files)
    assert refused.returncode != 0
    assert "Temporary Congestion" in refused.stderr + refused.stdout

    fill_disk(monkeypatch, bridge.spool, 10**10)
    assert storescu(bridge.port, files).returncode == 0
    assert len(bridge.instances()) == 1
    assert bridge.listener.stats.snapshot()["associations_rejected"] == {"disk-full": 1}


def test_listener_answers_out_of_resources_when_spool_is_full(
    start_bridge, monkeypatch, tmp_path
):
    bridge = start_bridge(min_free_bytes=10**9)
    fill_disk(monkeypatch, bridge.spool, 10**10)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate("127.0.0.1", bridge.port, ae_title="JMIXBRIDGE")
    assert assoc.is_established
    files = make_study(tmp_path / "in", series=1, per_series=2)
    try:
        first = assoc.send_c_store(pydicom.dcmread(files[0]))
        fill_disk(monkeypatch, bridge.spool, 10**6)
        second = assoc.send_c_store(pydicom.dcmread(files[1]))
    finally:
        assoc.release()

    assert (first.Status, second.Status) == (0x0000, 0xA700)
    assert len(bridge.instances()) == 1


def test_failing_store_is_answered_out_of_resources(
    start_bridge, monkeypatch, tmp_path
):
    bridge = start_bridge()

    def broken(*args, **kwargs):
        raise StoreError("state store write failed: disk I/O error")

    monkeypatch.setattr(bridge.store, "add_instance", broken)
    files = make_study(tmp_path / "in", series=1, per_series=1)
    result = storescu(bridge.port, files, extra=("-v",))

    assert "Refused: OutOfResources" in result.stderr
    assert bridge.listener.stats.snapshot()["statuses"] == {0xA700: 1}


def test_failing_fsync_of_a_received_instance_is_answered_out_of_resources(
    start_bridge, monkeypatch, tmp_path
):
    bridge = start_bridge()

    def failing_fsync(fd):
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "fsync", failing_fsync)
    files = make_study(tmp_path / "in", series=1, per_series=2)
    result = storescu(bridge.port, files, extra=("-v", "-nh"))

    assert result.stderr.count("Refused: OutOfResources") == 2
    assert bridge.listener.stats.snapshot()["statuses"] == {0xA700: 2}
    assert bridge.instances() == []
    assert list((bridge.spool.root / "instances").rglob("*.dcm")) == []


def test_resent_study_is_acknowledged_and_stored_once(start_bridge, tmp_path):
    bridge = start_bridge()
    files = make_study(tmp_path / "in", series=1, per_series=3)
    assert storescu(bridge.port, files).returncode == 0
    assert storescu(bridge.port, files).returncode == 0

    assert len(bridge.instances()) == 3
    assert len(list((bridge.spool.root / "instances").rglob("*.dcm"))) == 3
    assert bridge.listener.stats.snapshot()["instances_duplicate"] == 3


def two_versions(tmp_path: Path, **study) -> tuple[Path, Path]:
    """Return one instance and a changed copy with the same SOP Instance UID."""
    [original] = make_study(tmp_path / "in", series=1, per_series=1, **study)
    ds = pydicom.dcmread(original)
    ds.SeriesDescription = "CHANGED"
    ds.save_as(tmp_path / "changed.dcm")
    return original, tmp_path / "changed.dcm"


def test_changed_instance_replaces_the_old_one_under_keep_newest(
    start_bridge, tmp_path
):
    bridge = start_bridge()
    original, changed = two_versions(tmp_path)
    assert storescu(bridge.port, [original]).returncode == 0
    assert storescu(bridge.port, [changed]).returncode == 0

    [inst] = bridge.instances()
    stored = bridge.spool.path_of(inst.spool_path)
    assert data_set(stored) == data_set(changed)


def test_version_a_changed_instance_replaced_is_kept_in_the_spool(
    start_bridge, tmp_path
):
    bridge = start_bridge()
    original, changed = two_versions(tmp_path)
    assert storescu(bridge.port, [original]).returncode == 0
    [first] = bridge.instances()
    first_bytes = bridge.spool.path_of(first.spool_path).read_bytes()

    assert storescu(bridge.port, [changed]).returncode == 0

    [study] = bridge.store.recent_studies()
    [kept] = (bridge.spool.root / "replaced" / study.ref).iterdir()
    assert kept.read_bytes() == first_bytes


def test_replacing_a_changed_instance_is_a_warning_and_counted(tmp_path, caplog):
    metrics = Metrics()
    bridge = Bridge(
        tmp_path,
        ListenerSettings(host="127.0.0.1", port=0),
        stats=MeteredListenerStats(metrics),
    )
    study_uid = generate_uid()
    original, changed = two_versions(tmp_path, study_uid=study_uid)
    try:
        assert storescu(bridge.port, [original]).returncode == 0
        with caplog.at_level(logging.WARNING, logger="bridge.ingest.ingest"):
            assert storescu(bridge.port, [changed]).returncode == 0
    finally:
        bridge.stop()

    [study] = bridge.store.recent_studies()
    [line] = [r.getMessage() for r in caplog.records if "replaced" in r.message]
    assert f"study={study.ref}" in line
    assert study_uid not in caplog.text
    assert bridge.listener.stats.snapshot()["instances_replaced"] == 1
    replaced = metrics.registry.get_sample_value(
        "jmix_bridge_instances_replaced_total", {"calling_ae": "other"}
    )
    assert replaced == 1


def test_changed_instance_is_refused_under_reject(start_bridge, tmp_path):
    bridge = start_bridge(ingest=IngestSettings(duplicates=DuplicatePolicy.REJECT))
    original, changed = two_versions(tmp_path)
    assert storescu(bridge.port, [original]).returncode == 0
    refused = storescu(bridge.port, [changed], extra=("-v",))

    assert "Unknown Status: 0x111" in refused.stderr  # dcmtk names no 0x0111
    [inst] = bridge.instances()
    stored = bridge.spool.path_of(inst.spool_path)
    assert data_set(stored) == data_set(original)


def test_changed_instance_refused_under_reject_leaves_no_file_in_the_spool(
    start_bridge, tmp_path
):
    bridge = start_bridge(ingest=IngestSettings(duplicates=DuplicatePolicy.REJECT))
    original, changed = two_versions(tmp_path)
    assert storescu(bridge.port, [original]).returncode == 0
    spooled = sorted(bridge.spool.root.rglob("*.dcm"))

    storescu(bridge.port, [changed])

    assert bridge.listener.stats.snapshot()["instances_rejected"] == {"conflict": 1}
    assert sorted(bridge.spool.root.rglob("*.dcm")) == spooled


def test_malformed_instance_is_refused_and_the_association_goes_on(
    start_bridge, tmp_path
):
    bridge = start_bridge()
    study_uid = generate_uid()
    good = make_instance(tmp_path / "1.dcm", study_uid=study_uid, series_uid="1.2")
    bad = make_instance(
        tmp_path / "2.dcm",
        study_uid=study_uid,
        series_uid="1.2",
        omit=("StudyInstanceUID",),
    )
    also_good = make_instance(tmp_path / "3.dcm", study_uid=study_uid, series_uid="1.2")

    result = storescu(bridge.port, [good, bad, also_good], extra=("-v", "-nh"))

    assert "DataSetDoesNotMatchSOPClass" in result.stderr
    assert len(bridge.instances()) == 2
    stats = bridge.listener.stats.snapshot()
    assert stats["instances_rejected"] == {"invalid": 1}
    assert stats["associations_accepted"] == 1


def test_logs_carry_no_patient_data_or_uids(start_bridge, tmp_path, caplog):
    caplog.set_level(logging.INFO)
    # Each instance is a DEBUG line; the association's summary is INFO.
    caplog.set_level(logging.DEBUG, logger="bridge.dicom.listener")
    bridge = start_bridge()
    study_uid = generate_uid()
    files = make_study(tmp_path / "in", series=1, per_series=2, study_uid=study_uid)
    assert storescu(bridge.port, files).returncode == 0

    assert "instance stored" in caplog.text
    assert FAKE_PATIENT not in caplog.text
    assert study_uid not in caplog.text
    assert "FAKE-0001" not in caplog.text


def test_received_data_sets_are_written_inside_the_spool(start_bridge, tmp_path):
    bridge = start_bridge()
    seen = []
    original = bridge.ingest.receive

    def spy(path, **kwargs):
        seen.append(Path(path).parent)
        return original(path, **kwargs)

    bridge.ingest.receive = spy
    assert (
        storescu(
            bridge.port, make_study(tmp_path / "in", series=1, per_series=1)
        ).returncode
        == 0
    )
    assert seen == [bridge.spool.incoming]


def test_stopping_restores_pynetdicom_switches(tmp_path):
    from pynetdicom import _config

    before = _config.STORE_RECV_CHUNKED_DATASET
    bridge = Bridge(tmp_path)
    assert _config.STORE_RECV_CHUNKED_DATASET is True
    bridge.stop()
    assert before == _config.STORE_RECV_CHUNKED_DATASET
    shutil.rmtree(tmp_path / "spool")
