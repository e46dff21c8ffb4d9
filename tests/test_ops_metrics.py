"""The Prometheus metrics: names, bounded labels, state read at scrape time."""

from __future__ import annotations

import shutil
import subprocess

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from bridge.config import Config, HttpSettings, TLSFiles
from bridge.ingest.assembler import Assembler
from bridge.ops import Metrics
from bridge.store import StudyState
from tests.support.net import free_port, wait_until
from tests.support.pki import CertificateAuthority
from tests.test_ops_docs import dashboard_queries
from tests.test_ops_support import (
    PATIENT_MARKER,
    add_dead_job,
    add_quarantined,
    add_study,
    make_config,
    make_uid,
    served_bridge,
)


@pytest.fixture
def bridge(tmp_path):
    """A served ops app over an empty store."""
    yield from served_bridge(tmp_path)


def samples(text: str) -> list:
    """Return every sample of an exposition."""
    return [
        s for family in text_string_to_metric_families(text) for s in family.samples
    ]


def value(text: str, name: str, **labels) -> float | None:
    """Return the value of the sample ``name`` with exactly these labels."""
    for s in samples(text):
        if s.name == name and s.labels == labels:
            return s.value
    return None


def exercise(metrics: Metrics, hostile: str) -> None:
    """Call every recording method, some with a hostile (UID-like) value."""
    metrics.association_accepted("MODALITY1")
    metrics.association_accepted(hostile)
    metrics.association_rejected("calling-ae-not-allowed")
    metrics.association_rejected(hostile)
    metrics.instance_received("MODALITY1", 1234)
    metrics.instance_received(hostile, 10)
    metrics.dimse_status("success")
    metrics.dimse_status(hostile)
    metrics.study_sealed("quiet-period", 12.5)
    metrics.study_sealed(hostile, 1.0)
    metrics.study_held()
    metrics.envelope_built("site-b", 5_000_000, {"scan": 0.1, "tar_encrypt": 1.2})
    metrics.envelope_built(hostile, 10, {hostile: 0.1})
    metrics.envelope_received("accepted", "site-c")
    metrics.envelope_received("bad-signature", hostile)
    metrics.envelope_received(hostile)
    metrics.job_result("deliver", "site-b", "done")
    metrics.job_result(hostile, hostile, hostile)
    metrics.instance_forwarded("pacs", "delivered")
    metrics.instance_forwarded(hostile, hostile)
    metrics.conversion("pacs")
    metrics.association_closed()


def test_exposition_passes_promtool_check_metrics(bridge):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is absent: install Debian's prometheus package")
    add_study(bridge.store)
    add_dead_job(bridge.store)
    exercise(bridge.ctx.metrics, make_uid())

    text = bridge.get("/metrics", token=None).text
    result = subprocess.run(
        [promtool, "check", "metrics"], input=text, capture_output=True, text=True
    )

    assert result.returncode == 0, result.stdout + result.stderr


def test_metrics_show_queue_depth_by_queue_target_and_state(bridge):
    add_study(bridge.store)
    add_study(bridge.store)
    add_dead_job(bridge.store)

    text = bridge.get("/metrics", token=None).text

    assert (
        value(
            text,
            "jmix_bridge_queue_jobs",
            queue="deliver",
            target="site-b",
            state="ready",
        )
        == 2
    )
    assert (
        value(text, "jmix_bridge_dead_letter_jobs", queue="forward", target="pacs") == 1
    )
    age = value(
        text,
        "jmix_bridge_queue_oldest_job_age_seconds",
        queue="deliver",
        target="site-b",
    )
    assert age is not None and 0 <= age < 60


def test_no_label_value_is_a_uid_or_patient_value(bridge):
    study, uids = add_study(bridge.store)
    env, _ = add_quarantined(bridge.store, bridge.spool)
    hostile = uids[0]
    exercise(bridge.ctx.metrics, hostile)
    exercise(bridge.ctx.metrics, PATIENT_MARKER)

    text = bridge.get("/metrics", token=None).text
    labels = {v for s in samples(text) for v in s.labels.values()}

    assert not labels & {*uids, env.study_instance_uid, PATIENT_MARKER, study.ref}
    assert PATIENT_MARKER not in text
    assert not any(uid in text for uid in uids)


def test_unknown_calling_ae_is_counted_as_other():
    metrics = Metrics(make_config())

    metrics.instance_received("MODALITY1", 100)
    metrics.instance_received("SOMEONE-ELSE", 50)
    text = metrics.exposition().decode()

    assert (
        value(text, "jmix_bridge_instances_received_total", calling_ae="MODALITY1") == 1
    )
    assert value(text, "jmix_bridge_received_bytes_total", calling_ae="other") == 50


def test_envelope_outcome_hyphens_become_underscores():
    metrics = Metrics(make_config())

    metrics.envelope_received("decrypt-failed", "site-c")
    text = metrics.exposition().decode()

    assert (
        value(
            text,
            "jmix_bridge_envelopes_received_total",
            sender="site-c",
            outcome="decrypt_failed",
        )
        == 1
    )


def test_peer_up_is_zero_while_its_circuit_is_open(bridge):
    breaker = bridge.peer_breakers.get("site-b")
    for _ in range(breaker.policy.failures_to_open):
        breaker.failed()

    text = bridge.get("/metrics", token=None).text

    assert value(text, "jmix_bridge_peer_up", peer="site-b") == 0
    assert value(text, "jmix_bridge_destination_up", destination="pacs") == 1


def test_certificate_expiry_counts_seconds_until_not_after(tmp_path):
    http = CertificateAuthority(tmp_path).issue("http", server=True, days=10)
    config = make_config(tls=TLSFiles(cert=http.cert, key=http.key))
    metrics = Metrics(config)
    metrics.attach_state()

    text = metrics.exposition().decode()
    seconds = value(text, "jmix_bridge_certificate_expiry_seconds", certificate="http")

    assert seconds is not None and abs(seconds - 10 * 86400) < 120


def test_spool_gauges_report_bytes_and_free_ratio(bridge):
    (bridge.spool / "outbox" / "blob.zip").write_bytes(bytes(4096))

    text = bridge.get("/metrics", token=None).text

    assert value(text, "jmix_bridge_spool_used_bytes") >= 4096
    assert 0 < value(text, "jmix_bridge_spool_free_ratio") <= 1


def test_build_info_names_the_versions():
    text = Metrics(Config()).exposition().decode()

    info = [s for s in samples(text) if s.name == "jmix_bridge_build_info"]

    assert len(info) == 1
    assert set(info[0].labels) == {"version", "python", "pydicom", "pynetdicom"}


def test_two_bridges_in_one_process_keep_separate_counts():
    one, two = Metrics(Config()), Metrics(Config(http=HttpSettings(port=8081)))

    one.study_held()
    text = two.exposition().decode()

    assert value(text, "jmix_bridge_studies_held_total") == 0


@pytest.mark.slow
def test_real_prometheus_scrapes_the_bridge_and_answers_dashboard_queries(
    bridge, tmp_path
):
    prometheus = shutil.which("prometheus")
    if prometheus is None:
        pytest.skip("prometheus is absent: install Debian's prometheus package")
    add_study(bridge.store)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(
        "global:\n  scrape_interval: 1s\n"
        "scrape_configs:\n  - job_name: bridge\n    static_configs:\n"
        f"      - targets: ['127.0.0.1:{bridge.url.rsplit(':', 1)[1]}']\n"
    )
    proc = subprocess.Popen(
        [
            prometheus,
            f"--config.file={config}",
            f"--storage.tsdb.path={tmp_path / 'tsdb'}",
            f"--web.listen-address=127.0.0.1:{port}",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    query = 'jmix_bridge_queue_jobs{queue="deliver",state="ready"}'
    found: list = []

    def scraped() -> bool:
        try:
            answer = httpx.get(
                f"http://127.0.0.1:{port}/api/v1/query", params={"query": query}
            ).json()
        except (httpx.HTTPError, ValueError):
            return False
        found[:] = answer.get("data", {}).get("result", [])
        return bool(found)

    def ask(expr: str) -> str:
        expr = expr.replace("$__rate_interval", "1m").replace("$instance", ".*")
        url = f"http://127.0.0.1:{port}/api/v1/query"
        return httpx.get(url, params={"query": expr}).json()["status"]

    try:
        wait_until(scraped, timeout=60, what="prometheus to scrape the bridge")
        answers = {q: ask(q) for q in dashboard_queries() if "label_values" not in q}
    finally:
        proc.terminate()
        proc.wait(10)
    assert found[0]["metric"]["target"] == "site-b"
    assert float(found[0]["value"][1]) == 1
    assert {q for q, status in answers.items() if status != "success"} == set()


def test_attaching_state_again_replaces_the_first_sources(bridge):
    bridge.ctx.metrics.attach_state(store=bridge.store)

    text = bridge.ctx.metrics.exposition().decode()

    assert text.count("# TYPE jmix_bridge_store_up gauge") == 1
    assert "jmix_bridge_spool_free_ratio" not in text


def test_a_study_the_assembler_holds_counts_in_studies_held(bridge):
    metrics = Metrics(Config())
    study, _ = add_study(bridge.store, seal=False)
    # Its route has left the configuration: at its deadline it is held, not sealed.
    assembler = Assembler(
        bridge.store,
        [],
        clock=lambda: study.seal_due + 1,
        on_held=metrics.study_held,
    )

    assembler.run_once()

    assert bridge.store.get_study(study.ref).state is StudyState.HELD
    assert value(metrics.exposition().decode(), "jmix_bridge_studies_held_total") == 1
