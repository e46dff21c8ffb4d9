"""The crash matrix: SIGKILL a bridge at each stage of a study's way, restart it,
and check the end state (``docs/reliability.md``).

Two real bridge processes, site A (listener, sealer, deliverer) and site B
(inbound API, opener, forwarder), built from YAML by :class:`Sites`; dcmtk's
storescu is the modality and dcmtk's storescp the PACS, writing every C-STORE
it receives to a file of its own (``+uf``), so a second store of an instance is
seen and counted. Stages that cannot be hit from outside at the right moment
use the test-only crash points of :mod:`bridge.faults`; the others are SIGKILLs
from the test while it watches the work in progress.

Every scenario ends with the same check: every instance acknowledged to the
modality is at the PACS, byte for byte, and the number of repeated stores is
the one the stage explains.
"""

from __future__ import annotations

import json
import sqlite3

import pytest

from tests.support.net import wait_until
from tests.support.sites import (
    LinkProxy,
    Pacs,
    Sites,
    dead_jobs,
    debris,
    end_state,
    kill_9,
    restart,
    send,
    study_of,
    wait_dead,
)


@pytest.fixture
def pacs(tmp_path):
    scp = Pacs(tmp_path / "pacs")
    yield scp
    scp.stop()


@pytest.fixture
def sites(tmp_path, pacs):
    both = Sites(tmp_path / "sites", (pacs.ae_title, pacs.port))
    yield both
    both.stop()


# -- the stages -------------------------------------------------------------------


def test_mid_association_crash_loses_nothing_acknowledged(sites, pacs, tmp_path):
    study = study_of(tmp_path / "study", 30)
    sites.start_b()
    # The 10th instance is recorded but the process dies before its answer.
    a = sites.start_a(crash_at="listener.before-ack:10")

    first = send(sites, study)

    assert first.returncode != 0
    assert wait_dead(a) == -9
    sites.start_a()
    assert send(sites, study).returncode == 0
    assert end_state(sites, pacs, study) == 0
    assert dead_jobs(sites) == 0


# Crash points of bridge.faults: (site, point, repeated stores expected at the
# PACS, a temporary name the crash leaves in the spool).
CRASH_POINTS = {
    "after-ack-before-seal": ("a", "seal.before-handler", 0, ""),
    "mid-pack": ("a", "seal.mid-pack", 0, ".tmp"),
    "after-pack-before-mark": ("a", "seal.after-handler", 0, ""),
    "before-upload": ("a", "deliver.before-send", 0, ""),
    "after-201-before-mark": ("a", "deliver.after-handler", 0, ""),
    "before-open": ("b", "open.before-handler", 0, ""),
    "after-open-before-mark": ("b", "open.after-handler", 0, ""),
    "before-forward": ("b", "forward.before-handler", 0, ""),
    # The forward's progress log already holds every answer: nothing is resent.
    "after-pacs-success-before-mark": ("b", "forward.after-handler", 0, ""),
}


@pytest.mark.parametrize("stage", CRASH_POINTS)
def test_crash_point_then_restart_delivers_every_instance(stage, sites, pacs, tmp_path):
    site, point, repeats, left_behind = CRASH_POINTS[stage]
    study = study_of(tmp_path / "study", 20, side=256 if left_behind else 8)
    b = sites.start_b(crash_at=point if site == "b" else "")
    a = sites.start_a(crash_at=point if site == "a" else "")
    dying = a if site == "a" else b

    assert send(sites, study).returncode == 0

    assert wait_dead(dying) == -9
    left = debris(sites, site)
    packed = sorted(p.name for p in (sites.spool("a") / "outbox").glob("*.zip"))
    restart(sites, site, dying)
    assert end_state(sites, pacs, study) == repeats
    assert dead_jobs(sites) == 0
    if point == "seal.after-handler":
        # The zip the dead run built is the one delivered: the run after the
        # restart found it and packed nothing (no pack stage timed).
        assert len(packed) == 1
        assert _outgoing_stage_seconds(sites) == {packed[0].removesuffix(".zip"): {}}
    if left_behind:
        assert any(name.endswith(left_behind) for name in left), left
        # The restarted site swept what the dead run left half-written.
        assert not any(name.endswith(left_behind) for name in debris(sites, site))
    if point == "deliver.after-handler":
        # The repeat is answered 409 by B, which holds the envelope already.
        assert "result=duplicate" in sites.a.log_text()
    print(f"matrix stage={stage} repeats={repeats} debris={left}")


def _outgoing_stage_seconds(sites: Sites) -> dict[str, dict]:
    """The pack stage times A recorded for each envelope it built, by id."""
    with sqlite3.connect(sites.db("a"), timeout=10) as conn:
        rows = conn.execute(
            "SELECT id, details FROM envelopes WHERE direction = 'out'"
        ).fetchall()
    return {env_id: json.loads(details)["stage_seconds"] for env_id, details in rows}


def test_crash_mid_upload_delivers_after_restart(tmp_path, pacs):
    sites = Sites(tmp_path / "sites", (pacs.ae_title, pacs.port))
    proxy = LinkProxy(sites.b_http)
    sites.peer_port = proxy.port
    # About 5 MB through a link of 1 MB/s: the kill lands mid-body.
    proxy.upload_rate = 1_000_000
    study = study_of(tmp_path / "study", 40, side=256)
    try:
        sites.start_b()
        a = sites.start_a()
        assert send(sites, study).returncode == 0
        wait_until(lambda: proxy.bytes_up > 1_500_000, 60, "the upload to start")

        kill_9(a)

        proxy.upload_rate = 0
        restart(sites, "a", a)
        assert end_state(sites, pacs, study) == 0
        assert dead_jobs(sites) == 0
        assert debris(sites, "b") == []
    finally:
        sites.stop()
        proxy.close()


def test_crash_mid_open_opens_again_after_restart(sites, pacs, tmp_path):
    study = study_of(tmp_path / "study", 60, side=512)
    b = sites.start_b()
    sites.start_a()
    opened = sites.spool("b") / "opened"

    assert send(sites, study).returncode == 0
    wait_until(
        lambda: (
            opened.exists() and any(p.suffix == ".partial" for p in opened.iterdir())
        ),
        60,
        "an envelope being opened",
    )
    kill_9(b)

    left = debris(sites, "b")
    restart(sites, "b", b)
    assert end_state(sites, pacs, study) == 0
    assert dead_jobs(sites) == 0
    assert any(name.endswith(".partial") for name in left), left
    # The restarted site swept the dead run's half-extracted folder.
    assert not any(name.endswith(".partial") for name in debris(sites, "b"))


def test_crash_mid_forward_resends_at_most_the_instance_being_noted(
    sites, pacs, tmp_path
):
    study = study_of(tmp_path / "study", 300)
    b = sites.start_b()
    sites.start_a()

    assert send(sites, study).returncode == 0
    wait_until(lambda: len(pacs.files()) >= 20, 60, "the forward to start")
    kill_9(b)
    before = len(pacs.received().keys() - {""})

    restart(sites, "b", b)
    repeats = end_state(sites, pacs, study)
    # Each answer is in the progress log before the next instance goes: only
    # one whose success had come but was not yet noted can go again.
    assert 0 < before < len(study)
    assert repeats <= 1
    assert dead_jobs(sites) == 0
    print(f"matrix stage=mid-forward before_kill={before} repeats={repeats}")
