"""Packing and opening stream: memory stays flat as a study grows.

Runs ``bench/envelope_memory.py`` (each verb in a fresh child process, peak RSS
from ``ru_maxrss``) at two sizes. Only memory is asserted, never a timing.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "envelope_memory.py"
LIMIT_MIB = 150
# What may separate the peaks of a study three times larger: allocator noise
# and a longer files.json, not the study (a held study would add 200 MiB).
FLAT_MARGIN_MIB = 12


@pytest.fixture(scope="module")
def figures(tmp_path_factory) -> dict[int, dict]:
    """The bench's measurements at 100 and 300 MB, by size."""
    results = {}
    for size_mb in (100, 300):
        out = subprocess.run(
            [
                sys.executable,
                str(BENCH),
                "--size-mb",
                str(size_mb),
                "--workdir",
                str(tmp_path_factory.mktemp(f"bench-{size_mb}")),
                "--json",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        results[size_mb] = json.loads(out.stdout)
    return results


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["pack", "open"])
def test_peak_memory_of_a_300_mb_study_stays_under_150_mib(figures, verb):
    assert figures[300]["payload_bytes"] > 300_000_000
    # Peak RSS of the child, which would be above 300 MiB if the study were
    # held in memory at any point.
    assert figures[300][verb]["peak_rss_mib"] < LIMIT_MIB


@pytest.mark.slow
@pytest.mark.parametrize("verb", ["pack", "open"])
def test_peak_memory_does_not_grow_with_the_study(figures, verb):
    small, large = figures[100], figures[300]
    assert large["payload_bytes"] > 2.5 * small["payload_bytes"]

    grown = large[verb]["peak_rss_mib"] - small[verb]["peak_rss_mib"]
    assert grown <= FLAT_MARGIN_MIB
