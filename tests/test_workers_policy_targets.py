"""Retry and circuit policies chosen by a job's target (README L-04)."""

import time

import pytest

from bridge.store import JobState, NewJob, SQLiteStore
from bridge.workers.base import Outcome, Worker, WorkerSpec
from bridge.workers.policy import BreakerBoard, BreakerPolicy, RetryPolicy

# Retries due at once, so that one thread can run a job to dead-letter.
NOW = {"initial_seconds": 0, "max_seconds": 0}


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db")
    yield s
    s.close()


def _failing(job, ctx):
    return Outcome.retry(f"{job.target} is down")


def _drain(worker) -> None:
    while worker.run_once():
        pass


def _fail_every_attempt(store, targets, **spec) -> None:
    """Enqueue a job per target, then run a worker whose every attempt fails
    until no job is due."""
    for target in targets:
        store.enqueue(NewJob("q", f"to-{target}", target=target))
    _drain(Worker(store, WorkerSpec("q", _failing, **spec)))


def _fates(store) -> dict[str, tuple[JobState, int]]:
    return {j.target: (j.state, j.attempts) for j in store.list_jobs(queue="q")}


def test_each_target_dead_letters_at_its_own_attempt_count(store):
    _fail_every_attempt(
        store,
        ["a", "b", "other"],
        retry=RetryPolicy(**NOW, max_attempts=3),
        retry_by_target={
            "a": RetryPolicy(**NOW, max_attempts=2),
            "b": RetryPolicy(**NOW, max_attempts=5),
        },
    )

    assert _fates(store) == {
        "a": (JobState.DEAD, 2),
        "b": (JobState.DEAD, 5),
        "other": (JobState.DEAD, 3),
    }


def test_each_target_waits_its_own_backoff(store):
    before = time.time()

    _fail_every_attempt(
        store,
        ["slow", "fast"],
        retry=RetryPolicy(initial_seconds=10),
        retry_by_target={"slow": RetryPolicy(initial_seconds=1000, max_seconds=1000)},
    )

    waits = {j.target: j.not_before - before for j in store.list_jobs(queue="q")}
    assert 500 <= waits["slow"] <= 1001
    assert 5 <= waits["fast"] <= 11


def test_target_past_its_own_max_age_dead_letters_at_the_first_failure(store):
    _fail_every_attempt(
        store,
        ["strict", "lenient"],
        retry=RetryPolicy(initial_seconds=100),
        retry_by_target={"strict": RetryPolicy(max_age_seconds=0)},
    )

    assert _fates(store) == {
        "strict": (JobState.DEAD, 1),
        "lenient": (JobState.READY, 1),
    }


def test_breaker_opened_for_one_target_leaves_the_other_served(store):
    for n in range(3):
        store.enqueue(NewJob("q", f"to-down-{n}", target="down"))
    store.enqueue(NewJob("q", "to-up", target="up"))

    def handler(job, ctx):
        return Outcome.retry("refused") if job.target == "down" else Outcome.done()

    board = BreakerBoard(
        BreakerPolicy(failures_to_open=5),
        policy_by_target={"down": BreakerPolicy(failures_to_open=1)},
    )
    spec = WorkerSpec(
        "q", handler, retry=RetryPolicy(initial_seconds=100), breakers=board
    )

    _drain(Worker(store, spec))

    assert board.states() == {"down": "open", "up": "closed"}
    assert store.list_jobs(target="up")[0].state == JobState.DONE
    assert len(store.list_jobs(target="down", state=JobState.READY)) == 3
    assert [j.attempts for j in store.list_jobs(target="down")] == [1, 0, 0]


def test_each_target_breaker_opens_at_its_own_threshold(store):
    board = BreakerBoard(
        BreakerPolicy(failures_to_open=1, open_seconds=3600),
        policy_by_target={
            "sturdy": BreakerPolicy(failures_to_open=3, open_seconds=3600)
        },
    )

    _fail_every_attempt(
        store, ["fragile", "sturdy"], retry=RetryPolicy(**NOW), breakers=board
    )

    assert board.states() == {"fragile": "open", "sturdy": "open"}
    assert _fates(store) == {
        "fragile": (JobState.READY, 1),
        "sturdy": (JobState.READY, 3),
    }


def test_target_without_a_policy_of_its_own_gets_the_default():
    default, own = BreakerPolicy(failures_to_open=2), BreakerPolicy(open_seconds=1)
    board = BreakerBoard(default, policy_by_target={"a": own})
    spec = WorkerSpec("q", _failing, retry_by_target={"a": RetryPolicy(factor=3)})

    assert board.get("a").policy is own
    assert board.get("b").policy is default
    assert spec.retry_for("a").factor == 3
    assert spec.retry_for("b") is spec.retry
