"""The generic worker: outcomes, backoff, dead-letter, circuit breakers, shutdown."""

import threading

import pytest

from bridge.errors import PermanentTransportError, RetryableTransportError
from bridge.store import JobState, NewJob, SQLiteStore
from bridge.workers.base import Outcome, Worker, WorkerSpec
from bridge.workers.policy import (
    BreakerBoard,
    BreakerPolicy,
    CircuitBreaker,
    RetryPolicy,
)


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.db")
    yield s
    s.close()


def _worker(store, handler, **spec):
    return Worker(store, WorkerSpec(queue="q", handler=handler, **spec))


def test_done_outcome_completes_job_and_enqueues_follow_ups(store):
    store.enqueue(NewJob("q", "a"))
    worker = _worker(store, lambda job, ctx: Outcome.done(jobs=[NewJob("next", "b")]))

    assert worker.run_once()

    assert store.list_jobs(queue="q")[0].state == JobState.DONE
    assert store.list_jobs(queue="next")[0].state == JobState.READY


def test_retryable_error_schedules_a_later_attempt_with_backoff(store):
    job = store.enqueue(NewJob("q", "a"))

    def handler(job, ctx):
        raise RetryableTransportError("peer answered 503")

    worker = _worker(store, handler, retry=RetryPolicy(initial_seconds=100))
    worker.run_once()

    after = store.get_job(job.id)
    assert after.state == JobState.READY
    assert after.attempts == 1
    assert after.last_error == "peer answered 503"
    assert after.not_before >= job.not_before + 50
    assert not worker.run_once()  # not due yet


def test_retry_after_from_the_peer_wins_over_a_shorter_backoff(store):
    job = store.enqueue(NewJob("q", "a"))

    def handler(job, ctx):
        raise RetryableTransportError("429", retry_after=500)

    _worker(store, handler, retry=RetryPolicy(initial_seconds=1)).run_once()

    assert store.get_job(job.id).not_before >= job.not_before + 499


def test_permanent_error_dead_letters_at_once(store):
    job = store.enqueue(NewJob("q", "a"))

    def handler(job, ctx):
        raise PermanentTransportError("peer answered 400: bad envelope")

    _worker(store, handler).run_once()

    after = store.get_job(job.id)
    assert after.state == JobState.DEAD
    assert "400" in after.last_error


def test_retries_end_in_dead_letter_when_attempts_are_exhausted(store):
    job = store.enqueue(NewJob("q", "a"))
    policy = RetryPolicy(initial_seconds=0, max_attempts=3)
    worker = _worker(store, lambda j, c: Outcome.retry("down"), retry=policy)

    while worker.run_once():
        pass

    after = store.get_job(job.id)
    assert (after.state, after.attempts) == (JobState.DEAD, 3)


def test_unexpected_exception_is_retried_not_lost(store):
    job = store.enqueue(NewJob("q", "a"))

    def handler(job, ctx):
        raise ValueError("boom")

    _worker(store, handler, retry=RetryPolicy(initial_seconds=100)).run_once()

    after = store.get_job(job.id)
    assert after.state == JobState.READY
    assert "ValueError" in after.last_error


def test_open_breaker_leaves_its_target_waiting_and_serves_others(store):
    store.enqueue(NewJob("q", "dead-peer-1", target="down"))
    store.enqueue(NewJob("q", "dead-peer-2", target="down"))
    store.enqueue(NewJob("q", "live-peer", target="up"))
    seen = []

    def handler(job, ctx):
        seen.append(job.target)
        if job.target == "down":
            return Outcome.retry("connection refused")
        return Outcome.done()

    board = BreakerBoard(BreakerPolicy(failures_to_open=1, open_seconds=3600))
    worker = _worker(
        store, handler, breakers=board, retry=RetryPolicy(initial_seconds=0)
    )
    while worker.run_once():
        pass

    assert seen == ["down", "up"]
    assert board.states()["down"] == "open"
    assert store.list_jobs(target="down", state=JobState.READY)


def test_half_open_breaker_lets_one_trial_through_then_closes_on_success():
    breaker = CircuitBreaker(BreakerPolicy(failures_to_open=1, open_seconds=10))
    breaker.failed(now=0)
    assert not breaker.allows(now=5)
    assert breaker.allows(now=11)

    breaker.started(now=11)
    assert not breaker.allows(now=11)
    breaker.succeeded()

    assert breaker.state() == "closed"


def test_stop_releases_the_lease_of_a_job_still_running(store):
    job = store.enqueue(NewJob("q", "a"))
    entered, leave = threading.Event(), threading.Event()

    def handler(job, ctx):
        entered.set()
        leave.wait(10)
        return Outcome.done()

    worker = _worker(store, handler)
    worker.start()
    assert entered.wait(10)
    worker.stop(timeout=0.2)

    after = store.get_job(job.id)
    assert (after.state, after.attempts) == (JobState.READY, 0)
    leave.set()


def test_backoff_grows_and_stays_under_the_cap():
    policy = RetryPolicy(initial_seconds=10, factor=2, max_seconds=60)
    assert 5 <= policy.delay(1) <= 10
    assert 20 <= policy.delay(3) <= 40
    assert 30 <= policy.delay(10) <= 60


def _fail_until_dead(policy: RetryPolicy, monkeypatch) -> float:
    """Fail a job at every attempt on a fake clock, each retry after the shortest
    delay the policy can draw; return the clock when it goes to dead-letter."""
    # Equal jitter draws the random half from uniform(0, base/2): its lower end
    # is the shortest wait, so the most attempts fit into any span of time.
    monkeypatch.setattr("bridge.workers.policy.random.uniform", lambda low, high: low)
    clock, attempts = 0.0, 0
    while True:
        attempts += 1
        if policy.exhausted(attempts, created_at=0.0, now=clock):
            return clock
        clock += policy.delay(attempts)


def test_default_retry_policy_keeps_a_job_failing_for_a_whole_day(monkeypatch):
    dead_at = _fail_until_dead(RetryPolicy(), monkeypatch)

    assert dead_at > 86400


def test_default_retry_policy_dead_letters_once_max_age_has_passed(monkeypatch):
    policy = RetryPolicy()

    dead_at = _fail_until_dead(policy, monkeypatch)

    assert (
        policy.max_age_seconds <= dead_at <= policy.max_age_seconds + policy.max_seconds
    )


def test_max_attempts_above_zero_still_limits_attempts():
    policy = RetryPolicy(max_attempts=3)
    assert not policy.exhausted(2, created_at=0.0, now=1.0)
    assert policy.exhausted(3, created_at=0.0, now=1.0)
