"""A running handler keeps its job's lease: the worker renews it, and tells the
handler when it was lost all the same."""

import threading

import pytest

from bridge.store import JobState, NewJob, SQLiteStore
from bridge.workers.base import Outcome, Worker, WorkerSpec
from tests.support.net import wait_until

# Far shorter than the handlers below run, so that without renewal the job's
# lease would run out several times while its first run still goes on.
LEASE = 0.6
WORK = 3.0


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db")
    yield s
    s.close()


class LongHandler:
    """A handler that works for ``WORK`` s, or until its lease is lost, and
    records which thread ran it and whether the lease was lost meanwhile."""

    def __init__(self):
        self.runs: list[tuple[str, bool]] = []
        self.started = threading.Event()
        self._lock = threading.Lock()

    def __call__(self, job, ctx):
        self.started.set()
        lost = ctx.lease_lost.wait(WORK)
        with self._lock:
            self.runs.append((threading.current_thread().name, lost))
        return Outcome.done()


def test_job_running_longer_than_its_lease_is_not_taken_by_a_second_thread(store):
    job = store.enqueue(NewJob("q", "long"))
    handler = LongHandler()
    worker = Worker(
        store,
        WorkerSpec(
            queue="q",
            handler=handler,
            threads=2,
            lease_seconds=LEASE,
            poll_seconds=0.05,
        ),
    )

    worker.start()
    try:
        wait_until(
            lambda: store.get_job(job.id).state == JobState.DONE,
            WORK * 10,
            "the long job to complete",
        )
    finally:
        worker.stop()

    assert len(handler.runs) == 1, handler.runs
    assert handler.runs[0][1] is False  # the lease held throughout


def test_handler_is_told_when_its_lease_was_taken_by_another_owner(store):
    job = store.enqueue(NewJob("q", "long"))
    handler = LongHandler()
    worker = Worker(store, WorkerSpec(queue="q", handler=handler, lease_seconds=LEASE))

    worker.start()
    try:
        assert handler.started.wait(WORK * 10)
        # As after a stall longer than the lease: the lease ran out and
        # another process took the job.
        store.expire_leases()
        assert store.claim("q", "another-process", 60).id == job.id
        wait_until(lambda: handler.runs, WORK * 10, "the handler to end")
    finally:
        worker.stop()

    assert handler.runs[0][1] is True
    assert store.get_job(job.id).state == JobState.LEASED  # still the other's
