"""Idle workers wake when a job of their queue is enqueued, not at their poll.

Every worker here polls once an hour, and every wait is bounded well below
that: a job done within the bound was found because the store said so.
"""

import threading

import pytest

from bridge.store import NewJob, SQLiteStore
from bridge.workers.base import Outcome, Worker, WorkerSpec

POLL = 3600.0
BOUND = 30.0


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db")
    yield s
    s.close()


class ClaimLog:
    """Records, in order, what each claim on a store found: (queue, key or None)."""

    def __init__(self, store):
        self._claim = store.claim
        self.found: list[tuple[str, str | None]] = []
        self._changed = threading.Condition()
        store.claim = self._spy

    def _spy(self, queue, *args, **kwargs):
        job = self._claim(queue, *args, **kwargs)
        with self._changed:
            self.found.append((queue, job.key if job else None))
            self._changed.notify_all()
        return job

    def idle(self, *queues: str) -> bool:
        """Wait until each queue's worker has once found nothing to do."""
        with self._changed:
            return self._changed.wait_for(
                lambda: all((q, None) in self.found for q in queues), BOUND
            )


@pytest.fixture
def workers(store):
    started: list[Worker] = []

    def start(queue, handler, threads=1):
        spec = WorkerSpec(queue, handler, poll_seconds=POLL, threads=threads)
        worker = Worker(store, spec)
        worker.start()
        started.append(worker)
        return worker

    yield start
    for worker in started:
        worker.stop(timeout=BOUND)


def _done_setting(event):
    def handler(job, ctx):
        event.set()
        return Outcome.done()

    return handler


def test_enqueue_wakes_an_idle_worker_before_its_poll(store, workers):
    log, done = ClaimLog(store), threading.Event()
    workers("q", _done_setting(done))
    assert log.idle("q")

    store.enqueue(NewJob("q", "k"))

    assert done.wait(BOUND)


def test_follow_up_job_wakes_the_next_queues_worker(store, workers):
    log, delivered = ClaimLog(store), threading.Event()
    workers("seal", lambda job, ctx: Outcome.done(jobs=[NewJob("deliver", "d")]))
    workers("deliver", _done_setting(delivered))
    assert log.idle("seal", "deliver")

    store.enqueue(NewJob("seal", "s"))

    assert delivered.wait(BOUND)


def test_requeued_job_wakes_its_worker(store, workers):
    job = store.enqueue(NewJob("q", "k"))
    store.dead_letter(store.claim("q", "operator", 30).id, "operator", "gave up")
    log, done = ClaimLog(store), threading.Event()
    workers("q", _done_setting(done))
    assert log.idle("q")

    assert store.requeue(job.id)

    assert done.wait(BOUND)


def test_enqueues_wake_every_idle_thread_of_a_worker(store, workers):
    # Each job's handler waits for the other's: both finish only when two
    # threads run at once, so the second thread must have been woken too.
    both = threading.Barrier(2, timeout=BOUND)
    finished, all_finished = [], threading.Event()

    def handler(job, ctx):
        both.wait()
        finished.append(job.key)
        if len(finished) == 2:
            all_finished.set()
        return Outcome.done()

    log = ClaimLog(store)
    workers("q", handler, threads=2)
    assert log.idle("q")

    store.enqueue(NewJob("q", "a"))
    store.enqueue(NewJob("q", "b"))

    assert all_finished.wait(BOUND)
    assert sorted(finished) == ["a", "b"]


def test_stop_ends_an_idle_worker_without_waiting_for_its_poll(store):
    log = ClaimLog(store)
    worker = Worker(
        store, WorkerSpec("q", _done_setting(threading.Event()), poll_seconds=POLL)
    )
    worker.start()
    assert log.idle("q")

    worker.stop(timeout=BOUND)

    assert not [t for t in threading.enumerate() if t.name.startswith("worker-q-")]
