"""The whole daemon as users run it: dcmtk's storescu as the modality, the quick
start's embedded defaults, and a real PACS (Orthanc) at the far end."""

import json
import re
import signal
import subprocess
import sys
import threading
import urllib.request

import pytest
from pydicom import dcmread
from pynetdicom import AE, StoragePresentationContexts, evt

from bridge.store import JobState, SQLiteStore
from tests.support.compare import dataset_bytes, dataset_bytes_of
from tests.support.daemon import Daemon, quick_start
from tests.support.daemon import admin_cli as run_admin_cli
from tests.support.dcmtk import echoscu, storescu
from tests.support.net import free_port, wait_until
from tests.support.orthanc import Orthanc
from tests.support.sites import Sites
from tests.support.studies import make_study
from tests.test_ops_intake import pack_for_b, post
from tests.test_ops_metrics import value
from tests.test_ops_status import chromium

MARKER = "Zzmarker^Uniquepatient"
ADMIN_TOKEN = "admin-token-of-the-daemon-test"


def admin_cli(delivered, *argv: str) -> subprocess.CompletedProcess:
    """Run ``jmix-bridge ARGV`` against the fixture's daemon, token from the env."""
    return run_admin_cli(delivered["http"], ADMIN_TOKEN, *argv)


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
        root / "bridge",
        pacs.dicom_port,
        pacs.ae_title,
        env={"JMIX_BRIDGE_ADMIN_TOKEN": ADMIN_TOKEN},
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
            "dicom": dicom_port,
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


def metric(delivered, name: str, **labels) -> float | None:
    """Return a sample of the metrics scraped once the study had arrived."""
    return value(delivered["metrics"], name, **labels)


def test_metrics_count_the_modality_association_as_accepted(delivered):
    assert (
        metric(delivered, "jmix_bridge_associations_accepted_total", calling_ae="other")
        == 1
    )


def test_metrics_count_one_success_response_per_instance_sent(delivered):
    assert metric(
        delivered, "jmix_bridge_dimse_responses_total", status="success"
    ) == len(delivered["study"])


def test_metrics_count_the_study_sealed_by_its_quiet_period(delivered):
    assert (
        metric(delivered, "jmix_bridge_studies_sealed_total", trigger="quiet_period")
        == 1
    )
    assert metric(delivered, "jmix_bridge_study_assembly_seconds_count") == 1


def test_metrics_count_the_built_envelope_and_time_each_build_stage(delivered):
    assert metric(delivered, "jmix_bridge_envelopes_built_total", peer="self") == 1
    for stage in ("scan", "tar_encrypt", "zip"):
        assert (
            metric(delivered, "jmix_bridge_envelope_build_seconds_count", stage=stage)
            == 1
        ), stage


def test_metrics_count_the_delivery_and_the_forward_as_done(delivered):
    attempts = "jmix_bridge_job_attempts_total"
    assert metric(delivered, attempts, queue="deliver", target="self", result="done")
    assert metric(delivered, attempts, queue="forward", target="pacs", result="done")
    assert metric(delivered, attempts, queue="seal", target="self", result="done")


def test_metrics_count_every_instance_forwarded_to_the_pacs(delivered):
    assert metric(
        delivered,
        "jmix_bridge_instances_forwarded_total",
        destination="pacs",
        outcome="delivered",
    ) == len(delivered["study"])


def test_metrics_count_an_association_to_a_wrong_called_ae_as_rejected(delivered):
    port = delivered["http"]
    result = echoscu(delivered["dicom"], called="NOTTHEBRIDGE")

    text = _get(port, "/metrics")[1].decode()

    assert result.returncode != 0
    assert (
        value(text, "jmix_bridge_associations_rejected_total", reason="called_ae") == 1
    )


def test_status_page_in_chromium_shows_the_sent_study_and_its_arrival(
    delivered, tmp_path
):
    store = SQLiteStore(delivered["db"])
    [study] = store.recent_studies()
    store.close()

    dom = chromium(
        tmp_path, "--dump-dom", f"http://127.0.0.1:{delivered['http']}/status"
    )

    assert dom.returncode == 0, dom.stderr[-2000:]
    row = re.search(
        rf'<tr data-ref="{re.escape(study.ref)}">(.*?)</tr>', dom.stdout, re.S
    )
    assert row is not None, "no row for the sent study"
    cells = re.findall(r"<td[^>]*>(.*?)</td>", row.group(1), re.S)
    assert str(len(delivered["study"])) in cells
    assert f"self arrived ({len(delivered['study'])} stored)" in cells


def test_studies_command_shows_that_the_study_arrived_at_the_pacs(delivered):
    store = SQLiteStore(delivered["db"])
    [study] = store.recent_studies()
    store.close()

    result = admin_cli(delivered, "studies")

    assert result.returncode == 0, result.stderr
    [line] = [x for x in result.stdout.splitlines() if x.startswith(study.ref)]
    assert line.endswith(f"self arrived ({len(delivered['study'])} stored)")


def test_admin_api_says_the_study_arrived(delivered):
    result = admin_cli(delivered, "studies", "--json")

    [study] = json.loads(result.stdout)["studies"]
    assert study["arrived"] is True
    assert [e["state"] for e in study["envelopes"]] == ["arrived"]


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


def test_readyz_answers_503_naming_the_keys_when_a_key_file_is_removed(tmp_path):
    daemon, _, http = quick_start(tmp_path / "bridge", pacs_port=9)
    try:
        (tmp_path / "bridge" / "data" / "keys" / "encryption.key").unlink()

        status, body = _get(http, "/readyz")
    finally:
        daemon.stop()

    answer = json.loads(body)
    assert status == 503
    assert answer["failing"] == ["keys"]
    assert "encryption.key" in answer["checks"]["keys"]


def test_readyz_answers_503_naming_the_spool_when_the_watermark_exceeds_the_disk(
    tmp_path,
):
    sites = Sites(tmp_path, ("PACS", 9), b={"spool": {"min_free_bytes": 2**60}})
    daemon = sites.start_b()
    try:
        status, body = _get(sites.b_http, "/readyz")
    finally:
        daemon.stop()

    answer = json.loads(body)
    assert status == 503
    assert answer["failing"] == ["spool"]
    assert "under the watermark" in answer["checks"]["spool"]


SHUTDOWN_BOUND_SECONDS = 30  # docs/architecture.md "Shutdown"


@pytest.fixture
def stalled_pacs():
    """A PACS that accepts associations and never answers a C-STORE (until the end).

    Yields its port and an event set once a C-STORE request has come in.
    """
    received, release = threading.Event(), threading.Event()

    def on_store(event):
        received.set()
        release.wait(120)
        return 0xA700  # out of resources, should the test ever let it answer

    ae = AE(ae_title="STALL")
    ae.supported_contexts = StoragePresentationContexts
    port = free_port()
    server = ae.start_server(
        ("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)]
    )
    try:
        yield port, received
    finally:
        release.set()
        server.shutdown()


def test_sigterm_during_a_stalled_forward_exits_0_and_puts_the_job_back(
    tmp_path, stalled_pacs
):
    port, received = stalled_pacs
    sites = Sites(tmp_path, ("STALL", port))
    # Longer than the test: the forward is still waiting when SIGTERM comes.
    sites.b_conf["destinations"][0]["dimse_timeout"] = 600.0
    envelope = pack_for_b(sites, tmp_path / "envelope.zip")
    daemon = sites.start_b()
    try:
        answer = post(sites.b_http, envelope.path.read_bytes())
        assert answer.status_code == 201, answer.text
        wait_until(received.is_set, timeout=60, what="the forward's C-STORE")
    finally:
        code = daemon.stop(signal.SIGTERM, timeout=SHUTDOWN_BOUND_SECONDS)

    store = SQLiteStore(sites.db("b"))
    try:
        [job] = store.list_jobs(queue="forward")
    finally:
        store.close()
    assert code == 0, daemon.log_text()[-3000:]
    assert job.state is JobState.READY
    assert job.attempts == 0
    assert job.last_error in (None, "")
    released = [
        x for x in daemon.log_text().splitlines() if "released at shutdown" in x
    ]
    assert [x.endswith(f"queue=forward job={job.id}") for x in released] == [True]
