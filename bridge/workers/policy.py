"""Retry and circuit-breaker policies shared by every worker that talks to a peer.

Each target (a peer, a PACS) may have policies of its own; a target without
gets its queue's default (``WorkerSpec.retry_by_target``,
``BreakerBoard.policy_by_target``).

Backoff is exponential with "equal jitter": half the delay is fixed, half random,
so that many jobs failing together do not retry together, while the delay still
grows visibly from one attempt to the next. A peer's ``Retry-After`` wins over
a shorter computed delay, within the cap.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field


@dataclass(frozen=True)
class RetryPolicy:
    """How often and how long a failing job is tried before dead-letter."""

    initial_seconds: float = 5.0
    factor: float = 2.0
    max_seconds: float = 600.0
    # 0 sets no limit on attempts, so that max_age_seconds alone decides: with
    # the capped backoff, any fixed count ends far sooner (50 attempts is about
    # 5.4 hours), and a PACS or peer down for a day must lose nothing.
    max_attempts: int = 0
    max_age_seconds: float = 3 * 86400.0

    def delay(self, attempts: int, retry_after: float | None = None) -> float:
        """Return the seconds to wait after ``attempts`` failed attempts (1-based)."""
        exponent = max(attempts - 1, 0)
        base = min(self.max_seconds, self.initial_seconds * self.factor**exponent)
        wait = base / 2 + random.uniform(0, base / 2)
        if retry_after is not None:
            wait = max(wait, min(retry_after, self.max_seconds))
        return wait

    def exhausted(self, attempts: int, created_at: float, now: float) -> bool:
        """Return True when a job with ``attempts`` failures must go to dead-letter.

        ``max_attempts`` of 0 sets no limit on attempts; the age still does.
        """
        if self.max_attempts and attempts >= self.max_attempts:
            return True
        return now - created_at >= self.max_age_seconds


@dataclass(frozen=True)
class BreakerPolicy:
    """When a target's circuit opens and how long it stays open."""

    failures_to_open: int = 5
    open_seconds: float = 60.0


@dataclass
class CircuitBreaker:
    """A circuit breaker for one target (a peer or a PACS); thread-safe.

    Closed: every job goes. After ``failures_to_open`` consecutive failures it
    opens: jobs for the target are left waiting, costing nothing, for
    ``open_seconds``. Then it is half-open: one trial job goes; success closes
    the circuit, failure opens it again.
    """

    policy: BreakerPolicy = field(default_factory=BreakerPolicy)
    failures: int = 0
    opened_at: float | None = None
    trial_running: bool = False
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def state(self, now: float | None = None) -> str:
        """Return "closed", "open" or "half-open"."""
        now = time.monotonic() if now is None else now
        if self.opened_at is None:
            return "closed"
        if now - self.opened_at < self.policy.open_seconds:
            return "open"
        return "half-open"

    def allows(self, now: float | None = None) -> bool:
        """Return True when a job for this target may start now."""
        with self._lock:
            state = self.state(now)
            return state == "closed" or (
                state == "half-open" and not self.trial_running
            )

    def started(self, now: float | None = None) -> None:
        """Note that a job for this target started (marks the half-open trial)."""
        with self._lock:
            if self.state(now) == "half-open":
                self.trial_running = True

    def succeeded(self) -> None:
        """Close the circuit."""
        with self._lock:
            self.failures = 0
            self.opened_at = None
            self.trial_running = False

    def failed(self, now: float | None = None) -> None:
        """Count a failure; open the circuit at the threshold or after a trial."""
        now = time.monotonic() if now is None else now
        with self._lock:
            self.failures += 1
            was_trial = self.trial_running
            self.trial_running = False
            if was_trial or self.failures >= self.policy.failures_to_open:
                self.opened_at = now


class BreakerBoard:
    """The circuit breakers of one kind of target, created on first use.

    A target named in ``policy_by_target`` gets that policy; every other target
    gets ``policy``.
    """

    def __init__(
        self,
        policy: BreakerPolicy | None = None,
        policy_by_target: Mapping[str, BreakerPolicy] | None = None,
    ):
        self.policy = policy or BreakerPolicy()
        self.policy_by_target = dict(policy_by_target or {})
        self._breakers: dict[str, CircuitBreaker] = {}
        self._lock = threading.Lock()

    def policy_for(self, target: str) -> BreakerPolicy:
        """Return the breaker policy of ``target``: its own, or the default."""
        return self.policy_by_target.get(target, self.policy)

    def get(self, target: str) -> CircuitBreaker:
        """Return the breaker of ``target``."""
        with self._lock:
            if target not in self._breakers:
                self._breakers[target] = CircuitBreaker(self.policy_for(target))
            return self._breakers[target]

    def blocked(self) -> frozenset[str]:
        """Return the targets whose jobs must not start now."""
        with self._lock:
            breakers = list(self._breakers.items())
        return frozenset(name for name, b in breakers if not b.allows())

    def states(self) -> dict[str, str]:
        """Return every known target's circuit state (for metrics and status)."""
        with self._lock:
            breakers = list(self._breakers.items())
        return {name: b.state() for name, b in breakers}
