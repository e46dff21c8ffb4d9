"""The generic worker: claim a job, run its handler, record what happened.

A handler is a callable ``handler(job, ctx) -> Outcome``. It must be idempotent:
a job whose worker died is claimed again once its lease expires. What it
returns, or raises, decides the job's fate:

- ``Outcome.done(...)`` completes the job and records its results (follow-up
  jobs, an envelope, an envelope state) in the same transaction;
- ``Outcome.retry(error, ...)`` or a raised ``RetryableTransportError`` counts a
  failed attempt and schedules the next one with the backoff of the job's
  target, unless its retry policy is exhausted, in which case the job goes to
  dead-letter;
- ``Outcome.dead(error)`` or a raised ``PermanentTransportError`` parks the job
  in dead-letter at once, where an operator can see and re-send it;
- any other exception is logged without its arguments' data and retried, so
  a bug costs time, never a study.

Failures that concern a target (a peer, a PACS) feed that target's circuit
breaker; while it is open the target's jobs stay ready and cost nothing.

While a handler runs, the worker renews its job's lease every third of the
lease, so that a handler that takes longer than the lease (a large study, a
slow PACS) is not taken over by another thread or process and run twice at
once. Should a renewal find the lease lost all the same (the store was out of
reach for a whole lease, say), the job's :attr:`JobContext.lease_lost` is set,
and a handler that watches it stops: the job belongs to someone else now.

An idle worker waits for the store to tell it of a due job in its queue
(:meth:`Store.subscribe`), so a hand-off from one queue to the next within the
process costs no poll interval. It still polls, for what no one announces: a
retry that has become due, an expired lease, a breaker that closed, and jobs
enqueued by another process sharing the store.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from bridge.errors import PermanentTransportError, RetryableTransportError, StoreError
from bridge.faults import test_only_crash_point
from bridge.store.base import Envelope, Job, NewJob, Store
from bridge.workers.policy import BreakerBoard, RetryPolicy

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Outcome:
    """What a handler decided about its job; build it with the class methods."""

    kind: str  # "done", "retry" or "dead"
    error: str = ""
    jobs: tuple[NewJob, ...] = ()
    envelope: Envelope | None = None
    envelope_state: tuple[str, str, str] | None = None
    payload: dict[str, Any] | None = None
    retry_after: float | None = None
    target_failed: bool = True  # whether a retry/dead counts against the target
    seen: tuple[str, str] | None = None  # (envelope id, sender) accepted with it

    @classmethod
    def done(
        cls, *, jobs=(), envelope=None, envelope_state=None, payload=None, seen=None
    ):
        """Complete the job, recording these results with it."""
        return cls(
            "done",
            jobs=tuple(jobs),
            envelope=envelope,
            envelope_state=envelope_state,
            payload=payload,
            seen=seen,
        )

    @classmethod
    def retry(cls, error: str, *, payload=None, retry_after=None, target_failed=True):
        """Try again later; ``payload`` keeps partial progress."""
        return cls(
            "retry",
            error=error,
            payload=payload,
            retry_after=retry_after,
            target_failed=target_failed,
        )

    @classmethod
    def dead(cls, error: str, *, payload=None, target_failed=False):
        """Give up now and park the job in dead-letter."""
        return cls("dead", error=error, payload=payload, target_failed=target_failed)


@dataclass
class JobContext:
    """What a handler may use besides its job: the stop flag and lease renewal.

    ``lease_lost`` is set by the worker when a renewal of the job's lease
    failed: another owner may be running the job, so a handler should stop
    its side effects as soon as it can. ``renew`` renews at once (the worker
    already renews periodically).
    """

    stopping: threading.Event
    renew: Callable[[], bool]
    lease_lost: threading.Event = field(default_factory=threading.Event)


Handler = Callable[[Job, JobContext], Outcome]
ResultHook = Callable[[str, str, str], None]  # (queue, target, result)


@dataclass
class WorkerSpec:
    """One kind of worker: its queue, handler and policies.

    ``retry`` serves every target not named in ``retry_by_target`` (a job's
    target is its peer or destination); ``breakers`` holds the circuit policy
    per target. ``poll_seconds`` bounds how long an idle thread waits when no
    one tells it of a job.
    """

    queue: str
    handler: Handler
    retry: RetryPolicy = field(default_factory=RetryPolicy)
    breakers: BreakerBoard | None = None
    lease_seconds: float = 300.0
    poll_seconds: float = 0.25
    threads: int = 1
    retry_by_target: Mapping[str, RetryPolicy] = field(default_factory=dict)

    def retry_for(self, target: str) -> RetryPolicy:
        """Return the retry policy of ``target``: its own, or the default."""
        return self.retry_by_target.get(target, self.retry)


class Worker:
    """Runs one :class:`WorkerSpec` in ``spec.threads`` threads until stopped."""

    def __init__(
        self,
        store: Store,
        spec: WorkerSpec,
        *,
        on_result: ResultHook | None = None,
        node: str = "bridge",
    ):
        self.store = store
        self.spec = spec
        self.on_result = on_result
        self.stopping = threading.Event()
        # One event per thread: a thread that clears its own cannot swallow a
        # wake-up another thread needed (with one shared event, a thread that
        # had just taken the last job could clear the signal of the next).
        self._wakes = [threading.Event() for _ in range(spec.threads)]
        self._threads: list[threading.Thread] = []
        self._owner_prefix = f"{node}:{spec.queue}:{uuid.uuid4().hex[:8]}"
        self._in_flight: dict[str, int] = {}
        self._lock = threading.Lock()
        # The jobs whose handler is running, by owner, with their context. A
        # renewal round holds _renew_lock, and a handler's job leaves this map
        # under it, so no renewal runs for a job whose handler has returned.
        self._renewing: dict[str, tuple[int, JobContext]] = {}
        self._renew_lock = threading.Lock()

    def start(self) -> None:
        """Start the worker threads, woken by the store when a job is enqueued."""
        self.store.subscribe(self.spec.queue, self.wake)
        for index in range(self.spec.threads):
            owner = f"{self._owner_prefix}:{index}"
            thread = threading.Thread(
                target=self._loop,
                args=(owner, self._wakes[index]),
                name=f"worker-{self.spec.queue}-{index}",
                daemon=True,
            )
            self._threads.append(thread)
            thread.start()
        renewer = threading.Thread(
            target=self._renew_loop, name=f"renewer-{self.spec.queue}", daemon=True
        )
        self._threads.append(renewer)
        renewer.start()

    def wake(self) -> None:
        """Ask idle threads to look for work now instead of at the next poll."""
        for event in self._wakes:
            event.set()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop claiming, wait up to ``timeout`` s, then release unfinished leases."""
        self.store.unsubscribe(self.spec.queue, self.wake)
        self.stopping.set()
        self.wake()
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            unfinished = dict(self._in_flight)
        for owner, job_id in unfinished.items():
            if self.store.release(job_id, owner):
                logger.warning(
                    "job released at shutdown queue=%s job=%d", self.spec.queue, job_id
                )

    def run_once(self, owner: str | None = None) -> bool:
        """Claim and process one due job; return False when none was due."""
        owner = owner or f"{self._owner_prefix}:once"
        skip = self.spec.breakers.blocked() if self.spec.breakers else frozenset()
        job = self.store.claim(
            self.spec.queue, owner, self.spec.lease_seconds, skip_targets=skip
        )
        if job is None:
            return False
        self._process(job, owner)
        return True

    def renew_leases(self) -> None:
        """Renew the lease of every job whose handler is running now.

        A renewal that finds the lease lost sets the job's ``lease_lost``. A
        store error is logged and the round goes on: the next one tries again
        well before the lease runs out.
        """
        with self._renew_lock:
            for owner, (job_id, ctx) in self._renewing.items():
                if ctx.lease_lost.is_set():
                    continue
                try:
                    kept = self.store.renew(job_id, owner, self.spec.lease_seconds)
                except Exception as exc:
                    logger.warning(
                        "lease renewal failed queue=%s job=%d error=%s",
                        self.spec.queue,
                        job_id,
                        type(exc).__name__,
                    )
                    continue
                if not kept:
                    ctx.lease_lost.set()
                    logger.warning(
                        "lease lost while running queue=%s job=%d",
                        self.spec.queue,
                        job_id,
                    )

    def _renew_loop(self) -> None:
        # A third of the lease: two rounds may fail or come late before the
        # lease runs out.
        while not self.stopping.wait(self.spec.lease_seconds / 3):
            self.renew_leases()

    def _loop(self, owner: str, woken: threading.Event) -> None:
        while not self.stopping.is_set():
            # Cleared before looking, not after waiting: a wake-up that comes
            # while this thread looks then ends its next wait at once, where
            # clearing later would lose it and the job would wait a poll.
            woken.clear()
            try:
                found = self.run_once(owner)
            except Exception:
                logger.exception("worker loop failed queue=%s", self.spec.queue)
                found = False
            if not found and not self.stopping.is_set():
                woken.wait(self.spec.poll_seconds)

    def _process(self, job: Job, owner: str) -> None:
        breaker = (
            self.spec.breakers.get(job.target)
            if (self.spec.breakers and job.target)
            else None
        )
        if breaker:
            breaker.started()
        with self._lock:
            self._in_flight[owner] = job.id
        ctx = JobContext(stopping=self.stopping, renew=lambda: self._renew(job, owner))
        started = time.monotonic()
        try:
            test_only_crash_point(f"{self.spec.queue}.before-handler")
            with self._renew_lock:
                self._renewing[owner] = (job.id, ctx)
            try:
                outcome = self._run_handler(job, ctx)
            finally:
                with self._renew_lock:
                    self._renewing.pop(owner, None)
            # The handler's effect is out (the peer said 201, the PACS stored
            # the instances) but the job is not yet marked: the crash tests
            # stop here to prove the repeat that follows is harmless.
            test_only_crash_point(f"{self.spec.queue}.after-handler")
            self._record_outcome(job, owner, outcome, breaker)
        finally:
            with self._lock:
                self._in_flight.pop(owner, None)
        logger.debug(
            "job processed queue=%s job=%d seconds=%.3f",
            self.spec.queue,
            job.id,
            time.monotonic() - started,
        )

    def _run_handler(self, job: Job, ctx: JobContext) -> Outcome:
        try:
            return self.spec.handler(job, ctx)
        except RetryableTransportError as exc:
            return Outcome.retry(str(exc), retry_after=exc.retry_after)
        except PermanentTransportError as exc:
            return Outcome.dead(str(exc), target_failed=True)
        except Exception as exc:
            logger.exception(
                "job handler failed queue=%s job=%d error=%s",
                self.spec.queue,
                job.id,
                type(exc).__name__,
            )
            return Outcome.retry(
                f"internal error: {type(exc).__name__}: {exc}", target_failed=False
            )

    def _renew(self, job: Job, owner: str) -> bool:
        """Extend the job's lease; a store that fails now leaves it running.

        The lease still has most of its time, and a handler should not lose
        its work (an envelope packed, a study forwarded) to a locked database.
        """
        try:
            return self.store.renew(job.id, owner, self.spec.lease_seconds)
        except StoreError as exc:
            logger.warning(
                "job lease not renewed queue=%s job=%d error=%s",
                self.spec.queue,
                job.id,
                exc,
            )
            return True

    def _record_outcome(self, job: Job, owner: str, outcome: Outcome, breaker) -> None:
        """Record ``outcome``, waiting out a store that fails, until stopped.

        The handler's effect is out; were the job left leased, nothing would
        take it up again before its lease ran out (300 s by default), and a
        forward would then be repeated. So the record is tried again with
        backoff (0.5 s doubling to 10 s) while the worker runs and the lease
        lasts; after that the StoreError is raised and the lease runs out.
        """
        if breaker and outcome.kind != "done" and outcome.target_failed:
            breaker.failed()
        delay = 0.5
        give_up = time.monotonic() + self.spec.lease_seconds
        while True:
            try:
                self._record(job, owner, outcome)
                break
            except StoreError as exc:
                if self.stopping.is_set() or time.monotonic() + delay > give_up:
                    raise
                logger.warning(
                    "job outcome not recorded queue=%s job=%d outcome=%s "
                    "delay_seconds=%.1f error=%s",
                    self.spec.queue,
                    job.id,
                    outcome.kind,
                    delay,
                    exc,
                )
            self.stopping.wait(delay)
            delay = min(delay * 2, 10.0)
        if breaker and outcome.kind == "done":
            breaker.succeeded()

    def _record(self, job: Job, owner: str, outcome: Outcome) -> None:
        queue, target = self.spec.queue, job.target
        if outcome.kind == "done":
            kept = self.store.complete(
                job.id,
                owner,
                jobs=list(outcome.jobs),
                envelope=outcome.envelope,
                envelope_state=outcome.envelope_state,
                payload=outcome.payload,
                seen=outcome.seen,
            )
            self._report(queue, target, "done" if kept else "lease-lost")
            return
        attempts = job.attempts + 1
        retry = self.spec.retry_for(target)
        if outcome.kind == "retry" and not retry.exhausted(
            attempts, job.created_at, time.time()
        ):
            delay = retry.delay(attempts, outcome.retry_after)
            if not self.store.retry_later(
                job.id,
                owner,
                outcome.error,
                time.time() + delay,
                payload=outcome.payload,
            ):
                # Released at shutdown (or expired): the attempt is not counted.
                self._report(queue, target, "lease-lost")
                return
            logger.warning(
                "job retry scheduled queue=%s job=%d target=%s "
                "attempt=%d delay_seconds=%.1f error=%s",
                queue,
                job.id,
                target,
                attempts,
                delay,
                outcome.error,
            )
            self._report(queue, target, "retry")
            return
        if not self.store.dead_letter(
            job.id, owner, outcome.error, payload=outcome.payload
        ):
            self._report(queue, target, "lease-lost")
            return
        logger.error(
            "job dead-lettered queue=%s job=%d target=%s attempts=%d error=%s",
            queue,
            job.id,
            target,
            attempts,
            outcome.error,
        )
        self._report(queue, target, "dead")

    def _report(self, queue: str, target: str, result: str) -> None:
        if self.on_result:
            self.on_result(queue, target, result)
