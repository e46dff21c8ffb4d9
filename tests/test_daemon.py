"""The whole daemon as users run it: dcmtk's storescu as the modality, the quick
start's embedded defaults, and a real PACS (Orthanc) at the far end."""

import json
import signal
import subprocess
import sys
import urllib.request

import pytest
from pydicom import dcmread

from bridge.store import SQLiteStore
from tests.support.compare import dataset_bytes, dataset_bytes_of
from tests.support.daemon import Daemon, quick_start
from tests.support.dcmtk import storescu
from tests.support.net import wait_until
from tests.support.orthanc import Orthanc
from tests.support.studies import make_study

MARKER = "Zzmarker^Uniquepatient"


def _get(port: int, path: str) -> tuple[int, bytes]:
    try:
        with urllib.request.urlopen(
            f"http://127.0.0.1:{port}{path}", timeout=10
        ) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()


@pytest.fixture(scope="module")
def delivered(tmp_path_factory):
    """One study sent by storescu through a quick-start bridge into Orthanc."""
    root = tmp_path_factory.mktemp("daemon")
    pacs = Orthanc(root / "orthanc")
    daemon, dicom_port, http_port = quick_start(
        root / "bridge", pacs.dicom_port, pacs.ae_title
    )
    study = make_study(root / "study", series=2, per_series=4)
    for path in study:
        ds = dcmread(path)
        ds.PatientName = MARKER
        ds.save_as(path)
    sent = storescu(dicom_port, root / "study", calling="CT1")
    try:
        wait_until(
            lambda: len(pacs.get("/instances")) == len(study),
            timeout=60,
            what="every instance in Orthanc",
        )
        db = root / "bridge" / "data" / "state.db"
        wait_until(lambda: _arrived(db), timeout=30, what="the delivery receipt")
        yield {
            "root": root,
            "pacs": pacs,
            "daemon": daemon,
            "study": study,
            "sent": sent,
            "http": http_port,
            "db": db,
            "metrics": _get(http_port, "/metrics")[1].decode(),
            "status": _get(http_port, "/status")[1].decode(),
        }
    finally:
        daemon.stop()
        pacs.stop()


def _arrived(db) -> bool:
    store = SQLiteStore(db)
    try:
        return any(e.state == "arrived" for e in store.find_envelopes(direction="out"))
    finally:
        store.close()


def test_summary_names_ports_peers_and_fingerprints_but_no_token(delivered):
    summary = delivered["daemon"].summary
    token = (delivered["root"] / "bridge" / "data" / "loopback.token").read_text()
    assert "DICOM     AE JMIXBRIDGE" in summary
    assert "PACS      pacs: AE ORTHANC" in summary
    assert "signing     SHA256:" in summary
    assert token.strip() not in summary


def test_modality_sees_every_instance_acknowledged(delivered):
    assert delivered["sent"].returncode == 0, delivered["sent"].stderr


def test_every_instance_reaches_orthanc_byte_identical(delivered, tmp_path):
    pacs = delivered["pacs"]
    stored = pacs.instance_files()
    for path in delivered["study"]:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes_of(stored[uid], tmp_path / "got.dcm") == dataset_bytes(
            path
        )


def test_sender_records_the_signed_receipt_from_the_receiving_side(delivered):
    store = SQLiteStore(delivered["db"])
    out = store.find_envelopes(direction="out")[0]
    store.close()
    assert out.state == "arrived"
    assert out.details["receipt"]["delivered"] == len(delivered["study"])


def test_patient_name_marker_is_in_no_log_line_and_no_metric(delivered):
    assert "Zzmarker" not in delivered["daemon"].log_text()
    assert "Zzmarker" not in delivered["metrics"]
    assert "Zzmarker" not in delivered["status"]


def test_no_study_or_instance_uid_is_logged(delivered):
    log = delivered["daemon"].log_text()
    ds = dcmread(delivered["study"][0], stop_before_pixels=True)
    assert str(ds.StudyInstanceUID) not in log
    assert str(ds.SOPInstanceUID) not in log
    assert "study sealed" in log  # the log does speak of the study, by reference


def test_metrics_count_the_instances_and_the_accepted_envelope(delivered):
    metrics = delivered["metrics"]
    count = len(delivered["study"])
    assert (
        f'jmix_bridge_instances_received_total{{calling_ae="other"}} {count}.0'
        in metrics
    )
    assert (
        'jmix_bridge_envelopes_received_total{outcome="accepted",sender="self"} 1.0'
        in metrics
    )


def test_readyz_reports_every_check_ok(delivered):
    status, body = _get(delivered["http"], "/readyz")
    assert status == 200, body
    assert json.loads(body)["checks"] == {
        "listener": "ok",
        "store": "ok",
        "spool": "ok",
        "keys": "ok",
    }


def test_sigterm_stops_the_daemon_with_exit_code_0(tmp_path):
    daemon, _, _ = quick_start(tmp_path / "bridge", pacs_port=9)

    assert daemon.stop(signal.SIGTERM) == 0
    assert "bridge stopped" in daemon.log_text()


def test_sigint_stops_the_daemon_with_exit_code_0(tmp_path):
    daemon, _, _ = quick_start(tmp_path / "bridge", pacs_port=9)

    assert daemon.stop(signal.SIGINT) == 0


def test_bad_configuration_is_refused_before_any_socket_opens(tmp_path):
    conf = tmp_path / "bridge.yaml"
    conf.write_text("dicom: {port: eleven}\nroutes: [{name: r, peers: [nowhere]}]\n")
    daemon = Daemon(tmp_path, ["-c", str(conf)])
    result = subprocess.run(
        [sys.executable, "-m", "bridge", "run", "-c", str(conf)],
        env=daemon.env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )

    assert result.returncode == 2
    assert "dicom.port: expected an integer, got 'eleven'" in result.stderr
    assert "routes[0].peers[0]: no peer named 'nowhere'" in result.stderr


def test_a_second_process_on_the_same_state_database_is_refused(tmp_path):
    first, _, _ = quick_start(tmp_path / "bridge", pacs_port=9)
    try:
        result = subprocess.run(
            [
                sys.executable,
                "-m",
                "bridge",
                "run",
                "--data-dir",
                str(tmp_path / "bridge" / "data"),
                "--dicom-port",
                "0",
                "--http-port",
                "0",
            ],
            env=first.env,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode != 0
        assert "is in use by another bridge process" in result.stderr
        # The first one still serves.
        assert first.proc.poll() is None
    finally:
        assert first.stop() == 0
