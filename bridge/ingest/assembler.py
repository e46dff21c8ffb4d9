"""The assembler: seals studies whose quiet period or maximum age has passed.

DICOM has no end-of-study signal (``docs/architecture.md``), so a study's seal
deadline lives in the state store, moved on by every instance; the assembler
seals each study past its deadline, enqueueing one ``seal`` job per peer of its
route in the same transaction. Because deadlines live in the store, a restart
keeps every open study's timer. Studies held back because no route took them
(or their route left the configuration) are held for an operator instead of
sealed.

Its thread sleeps until the earliest deadline of the open studies, so a study
is sealed when its quiet period ends rather than at the next tick of a timer.
An instance can only move its own study's deadline later, which needs no
wake-up: the round at the old deadline finds nothing due and sleeps on. Only a
study the thread does not know of yet can be due sooner; whoever records one in
this process calls :meth:`Assembler.note_deadline`. Studies opened by another
process sharing the store are found by the poll, which stays as a fallback:
the thread never sleeps longer than ``interval_seconds``. Two processes sealing
the same study is safe, since :meth:`Store.seal_study` seals it only once.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Sequence

from bridge.ingest.routing import UNROUTED, RouteRule
from bridge.store import NewJob, Store, Study

logger = logging.getLogger(__name__)

# A study whose deadline is within this many seconds of its maximum age was
# sealed by age rather than by quiet (the deadline is stored as a float).
_AGE_SLACK = 1e-3

# The shortest sleep between rounds, so that a deadline the store reports as
# still due right after a round (a clock step, another process's study) cannot
# make the thread spin.
_MIN_SLEEP = 0.01


def seal_jobs(study: Study, rule: RouteRule) -> list[NewJob]:
    """Return the ``seal`` jobs of a study: one per peer of its route.

    The key makes enqueueing idempotent; a follow-up generation has its own
    study ref and so its own jobs.
    """
    return [
        NewJob(
            queue="seal",
            key=f"seal:{study.ref}:{peer}",
            target=peer,
            payload={"study_ref": study.ref, "peer": peer},
        )
        for peer in rule.peers
    ]


class Assembler:
    """Seals due studies, once per call to :meth:`run_once` or on its own thread.

    ``interval_seconds`` is the longest the thread sleeps between rounds (the
    fallback poll); ``clock`` gives the time deadlines are stored in.
    """

    def __init__(
        self,
        store: Store,
        routes: Sequence[RouteRule],
        *,
        interval_seconds: float = 1.0,
        clock: Callable[[], float] = time.time,
        on_sealed: Callable[[str, float], None] | None = None,
        on_held: Callable[[], None] | None = None,
    ):
        self.store = store
        # Told (trigger, assembly seconds) for every study sealed, and called for
        # every study held, for metrics.
        self.on_sealed = on_sealed or (lambda trigger, seconds: None)
        self.on_held = on_held or (lambda: None)
        self.routes = {r.name: r for r in routes}
        self.interval_seconds = interval_seconds
        self._clock = clock
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        # When the sleeping thread means to run its next round (clock time),
        # and the earliest deadline noted while a round was running; both
        # guarded by the lock. During a round nothing wakes the thread: what is
        # noted is planned for when the round ends.
        self._lock = threading.Lock()
        self._planned = -math.inf
        self._noted = math.inf

    def run_once(self) -> int:
        """Seal or hold every study past its deadline; return how many were sealed.

        Raises StoreError when the store cannot be read or written.
        """
        now = self._clock()
        sealed = 0
        for study in self.store.due_studies(now):
            rule = self.routes.get(study.route)
            if rule is None:
                reason = (
                    "no route matched"
                    if study.route == UNROUTED
                    else "route no longer configured"
                )
                self.store.hold_study(study.ref, reason)
                self.on_held()
                logger.warning("study held study=%s reason=%s", study.ref, reason)
                continue
            by_age = study.seal_due >= (
                study.first_received + rule.max_age_seconds - _AGE_SLACK
            )
            trigger = "max-age" if by_age else "quiet-period"
            if self.store.seal_study(study.ref, trigger, seal_jobs(study, rule)):
                sealed += 1
                self.on_sealed(trigger, now - study.first_received)
                logger.info(
                    "study sealed study=%s trigger=%s instances=%d bytes=%d peers=%d",
                    study.ref,
                    trigger,
                    study.instance_count,
                    study.size_bytes,
                    len(rule.peers),
                )
        return sealed

    def note_deadline(self, seal_due: float) -> None:
        """Tell the thread a study of this process is due at ``seal_due`` (clock
        time), so that it wakes for it if it planned to sleep longer.

        Cheap and thread-safe: meant to be called for every instance recorded.
        """
        with self._lock:
            self._noted = min(self._noted, seal_due)
            wake = seal_due < self._planned
        if wake:
            self._wake.set()

    def start(self) -> None:
        """Start the thread; its first round runs at once."""
        self._stop.clear()
        self._thread = threading.Thread(
            target=self._loop, name="assembler", daemon=True
        )
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread and wait for a round in progress to finish."""
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                self._wake.clear()
                self._planned = -math.inf
                self._noted = math.inf
            try:
                self.run_once()
                next_due = self._next_due()
            except Exception as exc:
                # A round that fails is logged by its error type only (messages
                # may carry paths); the study is delayed by one poll, not lost.
                logger.warning("assembler round failed error=%s", type(exc).__name__)
                next_due = math.inf

            now = self._clock()
            with self._lock:
                planned = min(next_due, self._noted, now + self.interval_seconds)
                self._planned = planned
            self._wake.wait(max(planned - now, _MIN_SLEEP))

    def _next_due(self) -> float:
        """Return the earliest seal deadline of the open studies, or infinity."""
        studies = self.store.open_studies()  # ordered by deadline
        return studies[0].seal_due if studies else math.inf
