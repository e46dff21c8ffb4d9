"""Each peer's own retry settings, in a running daemon (README L-04 is gone).

Site A sends every study to two peers: site B, which is up, and site C, whose
address answers nothing and whose settings allow two attempts. C's delivery
goes to dead-letter after its own two attempts, with the reason, while B's
envelope arrives at B's PACS as if C did not exist.
"""

from __future__ import annotations

import sqlite3

from bridge.jmix import generate_key_dir
from tests.support.net import free_port, wait_until
from tests.support.sites import Pacs, Sites, end_state, send, study_of


def _deliveries(db) -> dict[str, tuple[str, int, str]]:
    with sqlite3.connect(db, timeout=10) as conn:
        rows = conn.execute(
            "SELECT target, state, attempts, last_error FROM jobs "
            "WHERE queue = 'deliver'"
        ).fetchall()
    return {target: (state, attempts, error) for target, state, attempts, error in rows}


def test_a_dead_peer_dead_letters_by_its_own_settings_and_costs_the_other_nothing(
    tmp_path,
):
    pacs = Pacs(tmp_path / "pacs")
    sites = Sites(tmp_path / "sites", (pacs.ae_title, pacs.port))
    generate_key_dir(tmp_path / "site-c")
    sites.a_conf["peers"].append(
        {
            "name": "site-c",
            "entity": {"id": "site-c"},
            "url": f"http://127.0.0.1:{free_port()}",
            "encryption_key": str(tmp_path / "site-c" / "encryption.pub"),
            "token": "unused",
            "timeout_seconds": 2.0,
            "retry": {"initial_seconds": 0.2, "max_seconds": 0.2, "max_attempts": 2},
        }
    )
    sites.a_conf["routes"][0]["peers"] = ["site-b", "site-c"]
    study = study_of(tmp_path / "study", 3)
    try:
        sites.start_b()
        sites.start_a()
        assert send(sites, study).returncode == 0

        wait_until(
            lambda: _deliveries(sites.db("a")).get("site-c", ("",))[0] == "dead",
            60,
            "site-c's delivery to reach dead-letter",
        )
        _, attempts, error = _deliveries(sites.db("a"))["site-c"]
        assert attempts == 2
        assert error  # the connection failure, for the operator
        # B's peer settings allow 50 attempts; its delivery is unaffected.
        assert end_state(sites, pacs, study) == 0
        assert _deliveries(sites.db("a"))["site-b"][0] == "done"
    finally:
        sites.stop()
        pacs.stop()
