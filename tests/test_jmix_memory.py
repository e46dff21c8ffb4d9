"""Packing and opening stream: memory stays flat on a few-hundred-MB study."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench" / "envelope_memory.py"
LIMIT_MIB = 150


@pytest.mark.slow
def test_pack_and_open_of_300_mb_stay_under_150_mib(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            str(BENCH),
            "--size-mb",
            "300",
            "--workdir",
            str(tmp_path),
            "--json",
        ],
        check=True,
        capture_output=True,
        text=True,
    )
    figures = json.loads(out.stdout)
    assert figures["payload_bytes"] > 300_000_000
    # Peak RSS of each child, which would be above 300 MiB if the study were
    # held in memory at any point.
    assert figures["pack"]["peak_rss_mib"] < LIMIT_MIB
    assert figures["open"]["peak_rss_mib"] < LIMIT_MIB
