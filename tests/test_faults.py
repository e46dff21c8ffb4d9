"""Faults short of a crash: a full disk, a locked state database, a peer that is
slow, resets connections or answers 500 (``docs/reliability.md``).

The rule under every one of them: an instance acknowledged to the modality is
recorded and kept intact; an instance that cannot be is refused with
Out of Resources (0xA700), so the modality sends it again; work that fails on
the way to the peer is retried with backoff, never lost.
"""

from __future__ import annotations

import sqlite3
import subprocess
import threading
from pathlib import Path

import pydicom
import pytest

from bridge.dicom.listener import Listener, ListenerSettings
from bridge.ingest import Ingest, IngestSettings, RouteRule
from bridge.spool import Spool
from bridge.store import SQLiteStore
from tests.support.compare import dataset_bytes
from tests.support.dcmtk import echoscu, store_answers, storescu
from tests.support.net import wait_until
from tests.support.postgres import own_postgres_server as _own_postgres_server
from tests.support.sites import (
    LinkProxy,
    Pacs,
    Sites,
    dead_jobs,
    end_state,
    send,
    study_of,
)
from tests.support.studies import make_study

ROUTE = RouteRule(name="all", peers=("peer-a",), quiet_seconds=3600)
own_postgres_server = _own_postgres_server  # a fixture of this module


class Ingress:
    """A listener over ``spool_dir`` with its store in ``db``."""

    def __init__(self, spool_dir: Path, db: Path, busy_timeout: float = 30.0, **kw):
        self.spool = Spool(spool_dir)
        self.store = SQLiteStore(db, busy_timeout=busy_timeout)
        ingest = Ingest(self.store, self.spool, [ROUTE], IngestSettings())
        self.listener = Listener(
            ListenerSettings(host="127.0.0.1", port=0, **kw), ingest
        )
        self.listener.start()
        self.port = self.listener.port

    def recorded(self) -> dict[str, Path]:
        """Every recorded instance: SOP Instance UID to its spool file."""
        return {
            inst.sop_instance_uid: self.spool.path_of(inst.spool_path)
            for study in self.store.recent_studies()
            for inst in self.store.study_instances(study.ref)
        }

    def stop(self) -> None:
        self.listener.stop()
        self.store.close()


def send_verbose(
    port: int, files: list[Path], extra: tuple[str, ...] = ()
) -> dict[Path, str]:
    """Send ``files`` with storescu; return the answer each file got."""
    sent = storescu(port, files, extra=("-v", *extra))
    return dict(store_answers(sent.stderr.splitlines()))


def assert_acknowledged_are_intact(
    answers: dict[Path, str], recorded: dict[str, Path]
) -> int:
    """Every file answered success is recorded with its bytes; return how many."""
    acked = [path for path, answer in answers.items() if answer == "success"]
    for path in acked:
        uid = str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes(recorded[uid]) == dataset_bytes(path)
    return len(acked)


def big_study(folder: Path, instances: int) -> list[Path]:
    """A study of ``instances`` images of 0.5 MB each."""
    return list(study_of(folder, instances, side=512).values())


# -- the disk ---------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path):
    """A 12 MB tmpfs for the spool; skipped where mounting is not allowed."""
    folder = tmp_path / "small-disk"
    folder.mkdir()
    mounted = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=12m", "tmpfs", str(folder)],
        capture_output=True,
        check=False,
    )
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {mounted.stderr.decode().strip()}")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=False)


def test_disk_filling_during_receive_is_answered_out_of_resources(small_disk, tmp_path):
    # 30 instances of 0.5 MB into 12 MB, no watermark: the disk fills inside
    # pynetdicom's own write of a data set, mid-study.
    files = big_study(tmp_path / "study", 30)
    bridge = Ingress(small_disk / "spool", tmp_path / "state.sqlite")
    try:
        # -nh: storescu would otherwise release after the first refusal.
        answers = send_verbose(bridge.port, files, extra=("-nh",))
        recorded = bridge.recorded()
        acked = assert_acknowledged_are_intact(answers, recorded)
        alive = echoscu(bridge.port)
        statuses = bridge.listener.stats.snapshot()["statuses"]
    finally:
        bridge.stop()

    # Every instance got an answer on the one association: success, or
    # Out of Resources for each the disk could not take.
    assert len(answers) == len(files)
    assert 0 < acked < len(files)
    assert acked == len(recorded)
    refused = [a for a in answers.values() if a != "success"]
    assert all("Refused: OutOfResources" in a for a in refused)
    assert statuses == {0x0000: acked, 0xA700: len(refused)}
    assert alive.returncode == 0
    assert list((small_disk / "spool" / "incoming").iterdir()) == []
    print(f"matrix fault=disk-full acked={acked} of {len(files)}")


def test_watermark_refuses_before_the_disk_is_full(small_disk, tmp_path):
    files = big_study(tmp_path / "study", 30)
    bridge = Ingress(
        small_disk / "spool", tmp_path / "state.sqlite", min_free_bytes=4 * 2**20
    )
    try:
        answers = send_verbose(bridge.port, files)
        recorded = bridge.recorded()
        acked = assert_acknowledged_are_intact(answers, recorded)
    finally:
        bridge.stop()

    assert 0 < acked < len(files)
    refused = [a for a in answers.values() if a != "success"]
    assert refused and all("OutOfResources" in a for a in refused)


# -- the state database -------------------------------------------------------------


def hold_exclusive(db: Path, seconds: float, held: threading.Event) -> None:
    """Hold an exclusive transaction on ``db`` for ``seconds``, as another
    process that locked the database would."""
    conn = sqlite3.connect(db, isolation_level=None)
    conn.execute("BEGIN EXCLUSIVE")
    held.set()
    threading.Event().wait(seconds)
    conn.execute("COMMIT")
    conn.close()


@pytest.mark.parametrize(
    ("busy_timeout", "locked_seconds", "all_acked"),
    [(30.0, 3.0, True), (0.5, 3.0, False)],
    ids=["wait-within-busy-timeout", "out-of-resources-beyond-it"],
)
def test_locked_state_database_never_acknowledges_an_unrecorded_instance(
    tmp_path, busy_timeout, locked_seconds, all_acked
):
    files = make_study(tmp_path / "study", series=1, per_series=10)
    db = tmp_path / "state.sqlite"
    bridge = Ingress(tmp_path / "spool", db, busy_timeout=busy_timeout)
    held = threading.Event()
    locker = threading.Thread(target=hold_exclusive, args=(db, locked_seconds, held))
    locker.start()
    held.wait(10)
    try:
        answers = send_verbose(bridge.port, files)
        locker.join()
        recorded = bridge.recorded()
        acked = assert_acknowledged_are_intact(answers, recorded)
    finally:
        bridge.stop()

    assert acked == len(recorded)
    refused = [a for a in answers.values() if a != "success"]
    if all_acked:
        assert acked == len(files)
    else:
        assert refused and all("OutOfResources" in a for a in refused)


# -- the peer -------------------------------------------------------------------------

PEER_FAULTS = {
    "resets-connections": {"mode": "reset", "faults": 3},
    "answers-500": {"mode": "http500", "faults": 3},
    # The answer comes after A's 1 s timeout: A retries and B answers 409.
    "answers-slowly": {"mode": "slow", "faults": 1, "delay_response": 3.0},
}


@pytest.mark.parametrize("fault", PEER_FAULTS)
def test_peer_fault_is_retried_until_the_study_arrives(fault, tmp_path):
    pacs = Pacs(tmp_path / "pacs")
    sites = Sites(tmp_path / "sites", (pacs.ae_title, pacs.port))
    proxy = LinkProxy(sites.b_http)
    for name, value in PEER_FAULTS[fault].items():
        setattr(proxy, name, value)
    sites.peer_port = proxy.port
    sites.a_conf["peers"][0]["timeout_seconds"] = 1.0
    study = study_of(tmp_path / "study", 10)
    try:
        sites.start_b()
        sites.start_a()
        assert send(sites, study).returncode == 0
        repeats = end_state(sites, pacs, study)
        log_a = sites.a.log_text()
    finally:
        sites.stop()
        proxy.close()
        pacs.stop()

    assert repeats == 0
    assert dead_jobs(sites) == 0
    assert proxy.faulted == PEER_FAULTS[fault]["faults"]
    assert log_a.count('event="job retry scheduled" queue=deliver') >= proxy.faulted


# -- the state database under the workers -----------------------------------------


class Locker:
    """Takes ``BEGIN EXCLUSIVE`` on a database once for each job leased in it.

    A job is leased while its handler runs; the lock, held ``hold`` seconds
    (well beyond the site's ``busy_timeout``), then meets the worker when it
    renews the lease or records the outcome, the writes that follow the
    handler's effect. WAL lets this thread watch the jobs table meanwhile.
    """

    def __init__(self, db: Path, hold: float = 3.0):
        self.db, self.hold = db, hold
        self.stopped = threading.Event()
        self.turns = 0
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        conn = sqlite3.connect(self.db, isolation_level=None, timeout=30)
        met: set[int] = set()
        try:
            while not self.stopped.wait(0.005):
                leased = {
                    row[0]
                    for row in conn.execute(
                        "SELECT id FROM jobs WHERE state = 'leased'"
                    )
                }
                if not leased - met:
                    continue
                met |= leased
                conn.execute("BEGIN EXCLUSIVE")
                self.turns += 1
                self.stopped.wait(self.hold)
                conn.execute("COMMIT")
        finally:
            conn.close()

    def stop(self) -> None:
        """Release the lock and end the thread."""
        self.stopped.set()
        self.thread.join(30)


def test_workers_survive_a_state_database_locked_beyond_busy_timeout(tmp_path):
    pacs = Pacs(tmp_path / "pacs")
    sites = Sites(tmp_path / "sites", (pacs.ae_title, pacs.port))
    for conf in (sites.a_conf, sites.b_conf):
        conf["store"] = {"busy_timeout_seconds": 0.5}
    study = study_of(tmp_path / "study", 10)
    lockers = []
    try:
        sites.start_b()
        sites.start_a()
        assert send(sites, study).returncode == 0
        # From here the study is acknowledged; seal, deliver, open and forward
        # each meet a database locked six times longer than they wait for it.
        lockers = [Locker(sites.db("a")), Locker(sites.db("b"))]
        repeats = end_state(sites, pacs, study)
        log_a, log_b = sites.a.log_text(), sites.b.log_text()
    finally:
        for locker in lockers:
            locker.stop()
        sites.stop()
        pacs.stop()

    assert repeats == 0
    assert dead_jobs(sites) == 0
    assert [locker.turns >= 2 for locker in lockers] == [True, True]
    assert "database is locked" in log_a and "database is locked" in log_b


# -- a PostgreSQL store that goes away ------------------------------------------------


def _pg_one(url: str, sql: str) -> int:
    import psycopg

    with psycopg.connect(url, connect_timeout=5) as conn:
        return conn.execute(sql).fetchone()[0]


def _pg_leased(url: str) -> set[int]:
    import psycopg

    with psycopg.connect(url, connect_timeout=5) as conn:
        rows = conn.execute("SELECT id FROM jobs WHERE state = 'leased'")
        return {row[0] for row in rows}


def _pg_sites(tmp_path: Path, server) -> tuple[Sites, Pacs, dict[str, str]]:
    pacs = Pacs(tmp_path / "pacs")
    sites = Sites(tmp_path / "sites", (pacs.ae_title, pacs.port))
    urls = {"a": server.new_database(), "b": server.new_database()}
    sites.a_conf["store"] = {"url": urls["a"]}
    sites.b_conf["store"] = {"url": urls["b"]}
    return sites, pacs, urls


def _pg_settled(urls: dict[str, str]) -> bool:
    """No job ready or leased at either site, and B has forwarded."""
    try:
        open_jobs = sum(
            _pg_one(url, "SELECT count(*) FROM jobs WHERE state IN ('ready', 'leased')")
            for url in urls.values()
        )
        forwarded = _pg_one(
            urls["b"],
            "SELECT count(*) FROM jobs WHERE queue = 'forward' AND state = 'done'",
        )
    except Exception:  # the server is restarting: not settled yet
        return False
    return open_jobs == 0 and forwarded > 0


def _pg_end_state(urls: dict[str, str], pacs: Pacs, study: dict[str, Path]) -> int:
    """As ``end_state``, for sites on PostgreSQL; return the repeats."""
    # One forward done is not the end: an instance recorded but never answered
    # (the store came back after the modality gave up) may go out first in an
    # envelope of its own, the rest in a follow-up once its quiet period ends.
    wait_until(
        lambda: _pg_settled(urls) and set(study) <= set(pacs.received()),
        90,
        "every instance at the PACS and both sites settled",
    )
    received = pacs.received()
    received.pop("", None)
    assert set(received) == set(study), "instances missing at the PACS"
    for uid, copies in received.items():
        for copy in copies:
            assert dataset_bytes(copy) == dataset_bytes(study[uid])
    return sum(len(copies) - 1 for copies in received.values())


def _pg_dead_jobs(urls: dict[str, str]) -> int:
    return sum(
        _pg_one(url, "SELECT count(*) FROM jobs WHERE state = 'dead'")
        for url in urls.values()
    )


class Outage:
    """Stops the PostgreSQL server for ``down`` seconds once per job leased.

    A job is leased while its handler runs, so each stage loses the server
    (its connections are ended) while it works or records what it did.
    """

    def __init__(self, server, urls: list[str], down: float = 2.0):
        self.server, self.urls, self.down = server, urls, down
        self.stopped = threading.Event()
        self.outages = 0
        self.sites_hit: set[int] = set()  # indexes into urls
        self.thread = threading.Thread(target=self._run)
        self.thread.start()

    def _run(self) -> None:
        met: set[tuple[int, int]] = set()
        while not self.stopped.wait(0.01):
            leased = {
                (number, job)
                for number, url in enumerate(self.urls)
                for job in _pg_leased(url)
            }
            if not leased - met:
                continue
            self.sites_hit |= {number for number, _ in leased - met}
            met |= leased
            self.server.stop_server()
            self.outages += 1
            self.stopped.wait(self.down)
            self.server.start_server()

    def stop(self) -> None:
        """End the thread, leaving the server running."""
        self.stopped.set()
        self.thread.join(60)


def test_postgres_outages_while_a_study_flows_lose_nothing(
    own_postgres_server, tmp_path
):
    server = own_postgres_server
    sites, pacs, urls = _pg_sites(tmp_path, server)
    # Instances large enough that each stage holds its job for a while.
    study = study_of(tmp_path / "study", 20, side=128)
    outage = None
    try:
        sites.start_b()
        sites.start_a()
        assert send(sites, study).returncode == 0
        outage = Outage(server, [urls["a"], urls["b"]])
        repeats = _pg_end_state(urls, pacs, study)
        outage.stop()
        dead = _pg_dead_jobs(urls)
    finally:
        if outage is not None:
            outage.stop()
        sites.stop()
        pacs.stop()

    # Which stages the outages meet depends on timing; each site met one at
    # least (A seals and delivers, B opens and forwards).
    assert outage.sites_hit == {0, 1}
    assert dead == 0
    assert repeats == 0


def test_instances_arriving_while_postgres_is_down_are_refused_not_acknowledged(
    own_postgres_server, tmp_path
):
    server = own_postgres_server
    sites, pacs, urls = _pg_sites(tmp_path, server)
    study = study_of(tmp_path / "study", 5)
    try:
        sites.start_b()
        sites.start_a()
        server.stop_server()
        while_down = send_verbose(sites.a_dicom, list(study.values()))
        server.start_server()
        again = send_verbose(sites.a_dicom, list(study.values()))
        repeats = _pg_end_state(urls, pacs, study)
    finally:
        sites.stop()
        pacs.stop()

    # storescu ends the association at the first refusal; what matters is
    # that nothing was acknowledged while the store could record nothing.
    assert while_down
    assert all("OutOfResources" in answer for answer in while_down.values())
    assert list(again.values()) == ["success"] * len(study)
    assert repeats == 0
