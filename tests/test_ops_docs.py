"""The operations docs agree with the code: every metric documented, every
alert and dashboard query built on metrics that exist."""

from __future__ import annotations

import json
import re
import shutil
import subprocess

import pytest
import yaml

from bridge.dicom import listener as listener_module
from bridge.ops.metrics import RECEIVE_OUTCOMES, REJECT_REASONS, STATUS_CLASSES, word
from tests.support.paths import REPO
from tests.test_ops_support import add_dead_job, add_study, served_bridge

DOCS = REPO / "docs"
_NAME = re.compile(r"\bjmix_bridge_[a-z0-9_]+")
_SUFFIXES = ("_bucket", "_count", "_sum", "_created")


@pytest.fixture
def bridge(tmp_path):
    """A served ops app over an empty store."""
    yield from served_bridge(tmp_path)


def exported_names(text: str) -> set[str]:
    """Return the metric names (TYPE lines) of an exposition."""
    return set(re.findall(r"^# TYPE (\S+) ", text, re.MULTILINE))


def base_name(name: str) -> str:
    """Strip the sample suffixes a histogram adds to its family name."""
    for suffix in _SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def dashboard_queries() -> list[str]:
    """Return every query of the Grafana dashboard and its variables."""
    dashboard = json.loads((DOCS / "grafana-dashboard.json").read_text())
    queries = [t["expr"] for p in dashboard["panels"] for t in p.get("targets", [])]
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            queries.append(variable["definition"])
    return queries


def test_every_exported_metric_is_documented(bridge):
    add_study(bridge.store)
    text = bridge.get("/metrics", token=None).text
    documented = set(_NAME.findall((DOCS / "metrics.md").read_text()))
    # prometheus_client's "_created" series are documented once, in general.
    names = {n for n in exported_names(text) if not n.endswith("_created")}

    assert names - documented == set()


def test_alerts_and_dashboard_use_only_exported_metrics(bridge):
    add_study(bridge.store)
    add_dead_job(bridge.store)
    exported = exported_names(bridge.get("/metrics", token=None).text)
    alerts = yaml.safe_load((DOCS / "alerts.yaml").read_text())
    exprs = [r["expr"] for g in alerts["groups"] for r in g["rules"]]

    used = {
        base_name(n) for e in [*exprs, *dashboard_queries()] for n in _NAME.findall(e)
    }

    assert used - exported == set()


def test_sample_alerts_pass_promtool_check_rules():
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is absent: install Debian's prometheus package")

    result = subprocess.run(
        [promtool, "check", "rules", str(DOCS / "alerts.yaml")],
        capture_output=True,
        text=True,
    )

    assert result.returncode == 0, result.stdout + result.stderr


def documented_values(metric: str) -> set[str]:
    """Return the backquoted label values in the meaning column of ``metric``'s row."""
    for line in (DOCS / "metrics.md").read_text().splitlines():
        if line.startswith(f"| `{metric}` |"):
            meaning = line.rstrip(" |").rsplit(" | ", 1)[1]
            return set(re.findall(r"`([a-z_]+)`", meaning))
    raise AssertionError(f"{metric} has no row in docs/metrics.md")


def test_documented_rejection_reasons_are_the_listeners():
    from_listener = {word(reason) for reason in listener_module._ASSOC_REJECT}

    assert from_listener == REJECT_REASONS
    assert documented_values("jmix_bridge_associations_rejected_total") == (
        REJECT_REASONS
    )


def test_documented_dimse_status_classes_are_the_counted_ones():
    assert documented_values("jmix_bridge_dimse_responses_total") == STATUS_CLASSES


def test_documented_receive_outcomes_are_the_counted_ones():
    assert documented_values("jmix_bridge_envelopes_received_total") == (
        RECEIVE_OUTCOMES
    )
