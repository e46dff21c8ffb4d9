"""The admin CLI against a live ``jmix-bridge run`` daemon, token from the environment.

Site B of :class:`tests.support.sites.Sites` runs with ``JMIX_BRIDGE_ADMIN_TOKEN``
in its environment and a dcmtk storescp as its PACS. Each test posts an envelope
whose encrypted payload was damaged on the way: it passes intake (the manifest
and its signature are intact) and the opener quarantines it, for real. The
verbs run as ``python -m bridge VERB --url URL`` with the same variable set.
"""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.support.daemon import Daemon, admin_cli
from tests.support.net import wait_until
from tests.support.sites import Pacs, Sites
from tests.test_ops_intake import flipped_byte, pack_for_b, post, rewrite_member

ADMIN_TOKEN = "admin-token-of-the-live-test"
ENV = {"JMIX_BRIDGE_ADMIN_TOKEN": ADMIN_TOKEN}


class Live:
    """Site B running, one damaged envelope quarantined, and the good copy."""

    def __init__(self, root, pacs: Pacs):
        self.pacs = pacs
        self.sites = Sites(root, ("PACS", pacs.port))
        _, config = self.sites.write()
        self.daemon = Daemon(root / "b", ["-c", str(config)], env=ENV).start()
        packed = pack_for_b(self.sites, root / "good.zip")
        self.envelope_id, self.good = packed.envelope_id, packed.path
        damaged = root / "damaged.zip"
        rewrite_member(self.good, damaged, "payload.encrypted", flipped_byte)
        answer = post(self.sites.b_http, damaged.read_bytes())
        assert answer.status_code == 201, answer.text
        wait_until(
            lambda: self.quarantine(), timeout=30, what="the envelope in quarantine"
        )

    def cli(self, *argv: str) -> subprocess.CompletedProcess:
        """Run ``jmix-bridge ARGV --url <site B>``; the token comes from the env."""
        return admin_cli(self.sites.b_http, ADMIN_TOKEN, *argv)

    def quarantine(self) -> list[dict]:
        """Return ``quarantine list --json``'s envelopes."""
        result = self.cli("quarantine", "list", "--json")
        assert result.returncode == 0, result.stderr
        return json.loads(result.stdout)["quarantine"]

    def quarantined_file(self):
        """The quarantined envelope's file in site B's spool."""
        return self.sites.spool("b") / "quarantine" / f"{self.envelope_id}.zip"


@pytest.fixture
def live(tmp_path):
    """Site B with one quarantined envelope; stopped after the test."""
    pacs = Pacs(tmp_path / "pacs")
    live = None
    try:
        live = Live(tmp_path, pacs)
        yield live
    finally:
        if live is not None:
            live.daemon.stop()
        pacs.stop()


def forward_states(live: Live) -> list[str]:
    """Return the states of site B's forward jobs as ``jobs --json`` lists them."""
    result = live.cli("jobs", "--queue", "forward", "--json")
    return [job["state"] for job in json.loads(result.stdout)["jobs"]]


def test_status_command_counts_the_quarantined_envelope(live):
    result = live.cli("status")

    assert result.returncode == 0, result.stderr
    assert "quarantined envelopes: 1" in result.stdout
    assert "Site B (site-b)" in result.stdout


def test_jobs_command_lists_only_the_queue_asked_for(live):
    result = live.cli("jobs", "--queue", "open")

    assert result.returncode == 0, result.stderr
    heading, *listed = result.stdout.splitlines()
    assert heading.split()[:4] == ["ID", "QUEUE", "TARGET", "STATE"]
    # The open job has no target: its row reads ID, queue, state.
    assert [line.split()[1:3] for line in listed] == [["open", "done"]]


def test_quarantine_list_shows_the_envelope_and_why(live):
    result = live.cli("quarantine", "list")

    assert result.returncode == 0, result.stderr
    [line] = [x for x in result.stdout.splitlines() if live.envelope_id in x]
    assert "site-a" in line
    assert "AuthenticationFailed" in line


def test_quarantine_delete_removes_the_file_and_keeps_the_record(live):
    result = live.cli("quarantine", "delete", live.envelope_id)

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"envelope {live.envelope_id} is deleted"
    assert not live.quarantined_file().exists()
    assert live.quarantine() == []


def test_a_released_envelope_is_opened_again_and_forwarded_to_the_pacs(live):
    # The operator replaces the copy damaged in transit with the sender's own.
    live.quarantined_file().write_bytes(live.good.read_bytes())

    result = live.cli("quarantine", "release", live.envelope_id)

    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"envelope {live.envelope_id} is stored, open job")
    wait_until(lambda: live.pacs.files(), timeout=60, what="the instance in the PACS")
    wait_until(
        lambda: forward_states(live) == ["done"], timeout=30, what="the forward done"
    )
    assert live.quarantine() == []


def test_a_resend_of_a_quarantined_id_is_opened_and_the_first_copy_kept(live):
    damaged = live.quarantined_file().read_bytes()

    answer = post(live.sites.b_http, live.good.read_bytes())

    # An id counts as seen only once accepted: the resend is taken (JMIX.md 4).
    assert answer.status_code == 201, answer.text
    wait_until(lambda: live.pacs.files(), timeout=60, what="the instance in the PACS")
    wait_until(
        lambda: forward_states(live) == ["done"], timeout=30, what="the forward done"
    )
    assert live.quarantine() == []
    aside = (
        live.sites.spool("b") / "quarantine" / f"{live.envelope_id}.superseded-1.zip"
    )
    assert aside.read_bytes() == damaged
    assert not live.quarantined_file().exists()
    # Accepted now: the same id again is a duplicate.
    assert post(live.sites.b_http, live.good.read_bytes()).status_code == 409
