"""The read-only status page: escaped, script-free, and rendered by a real browser.

Set ``JMIX_BRIDGE_TEST_WRITE_SCREENSHOT=1`` to have the browser test also
refresh ``docs/status-page.png``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from bridge.ops.status import render_status
from tests.support.paths import REPO
from tests.test_ops_support import (
    PATIENT_MARKER,
    add_arrived,
    add_dead_job,
    add_quarantined,
    add_study,
    served_bridge,
)

CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--window-size=1280,900",
)


@pytest.fixture
def bridge(tmp_path):
    """A served ops app over an empty store."""
    yield from served_bridge(tmp_path)


def chromium(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    """Run headless chromium with a throw-away profile; skip when it is absent."""
    binary = shutil.which("chromium") or shutil.which("chromium-browser")
    if binary is None:
        pytest.skip("chromium is absent: install Debian's chromium package")
    profile = tmp_path / "chromium-profile"
    return subprocess.run(
        [binary, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_status_page_escapes_every_value(bridge):
    add_study(bridge.store, calling_ae="<b>CT</b>")

    page = render_status(bridge.ctx)

    assert "<b>CT</b>" not in page
    assert "&lt;b&gt;CT&lt;/b&gt;" in page
    assert "<script" not in page


def test_status_page_forbids_scripts(bridge):
    response = bridge.get("/status", token=None)

    assert response.status_code == 200
    assert "script-src" not in response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in response.headers["Content-Security-Policy"]


def test_status_page_shows_no_uid_or_patient_value(bridge):
    _, uids = add_study(bridge.store)
    env, _ = add_quarantined(bridge.store, bridge.spool)

    page = bridge.get("/status", token=None).text

    assert PATIENT_MARKER not in page
    assert not any(uid in page for uid in [*uids, env.study_instance_uid])


def test_status_page_renders_in_chromium_and_shows_a_sent_study(bridge, tmp_path):
    study, _ = add_study(bridge.store, instances=3)
    add_arrived(bridge.store, study)
    add_study(bridge.store, seal=False)
    add_dead_job(bridge.store)
    add_quarantined(bridge.store, bridge.spool)
    for _ in range(bridge.peer_breakers.policy.failures_to_open):
        bridge.destination_breakers.get("pacs").failed()

    dom = chromium(tmp_path, "--dump-dom", f"{bridge.url}/status")
    shot = tmp_path / "status.png"
    shot_run = chromium(tmp_path, f"--screenshot={shot}", f"{bridge.url}/status")

    assert dom.returncode == 0, dom.stderr[-2000:]
    assert f'data-ref="{study.ref}"' in dom.stdout
    assert '<b id="dead-letter">1</b>' in dom.stdout
    assert '<td class="delivery arrived">site-b arrived (3 stored)</td>' in dom.stdout
    assert shot_run.returncode == 0, shot_run.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    if os.environ.get("JMIX_BRIDGE_TEST_WRITE_SCREENSHOT") == "1":
        shutil.copyfile(shot, REPO / "docs" / "status-page.png")
