"""The benchmark runs end to end on tiny studies and writes every section.

It asserts no timing: only that ``python -m bench.run --quick`` finishes, and
that its JSON holds each phase with positive ratios.
"""

import json
import math
import subprocess
import sys

import pytest

from tests.support.dcmtk import dcmtk_tool
from tests.support.orthanc import _orthanc_binary
from tests.support.paths import REPO

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    dcmtk_tool("storescu")
    _orthanc_binary()
    out = tmp_path_factory.mktemp("bench") / "results.json"
    run = subprocess.run(
        [sys.executable, "-m", "bench.run", "--quick", "--out", str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text()), run.stdout


def _positive(value) -> bool:
    return isinstance(value, int | float) and value > 0 and math.isfinite(value)


def test_quick_run_writes_every_section(results):
    data, _ = results
    for section in ("machine", "settings", "ingest", "e2e", "stream", "stages"):
        assert section in data
    assert "large" in data["memory"]
    assert set(data["stages"]) == {"seal", "deliver", "open", "forward"}


def test_quick_run_reports_positive_ratios(results):
    data, _ = results
    ingest = data["ingest"]
    ratios = [
        ingest["ratio_ct_1_vs_storescp"],
        ingest["ratio_ct_2_vs_storescp"],
        ingest["ratio_mf_vs_storescp_128k"],
        ingest["ratio_ct_vs_orthanc"],
        data["e2e"]["ratio_vs_direct"],
        data["stream"]["ratio_vs_direct"],
    ]
    assert all(_positive(r) for r in ratios), ratios


def test_quick_run_reports_memory_and_cpu_of_both_bridges(results):
    data, _ = results
    assert _positive(data["e2e"]["cpu_seconds_per_gb"])
    for proc in ("a", "b"):
        assert _positive(data["memory"]["large"]["peak_rss_mib"][proc])


def test_quick_run_prints_the_table(results):
    _, stdout = results
    assert "| ingest CT, 1 association, / storescp |" in stdout
