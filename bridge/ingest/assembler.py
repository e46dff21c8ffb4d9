"""The assembler: seals studies whose quiet period or maximum age has passed.

DICOM has no end-of-study signal (``docs/architecture.md``), so a study's seal
deadline lives in the state store, moved on by every instance; the assembler
polls for studies past their deadline and seals each, enqueueing one ``seal``
job per peer of its route in the same transaction. Because deadlines live in
the store, a restart keeps every open study's timer. Studies held back because
no route took them (or their route left the configuration) are held for an
operator instead of sealed.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence

from bridge.ingest.routing import UNROUTED, RouteRule
from bridge.store import NewJob, Store, Study
from bridge.workers.periodic import Periodic

logger = logging.getLogger(__name__)

# A study whose deadline is within this many seconds of its maximum age was
# sealed by age rather than by quiet (the deadline is stored as a float).
_AGE_SLACK = 1e-3


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
    """Seals due studies, once per call to :meth:`run_once` or on a timer thread."""

    def __init__(
        self,
        store: Store,
        routes: Sequence[RouteRule],
        *,
        interval_seconds: float = 1.0,
        clock: Callable[[], float] = time.time,
        on_sealed: Callable[[str, float], None] | None = None,
    ):
        self.store = store
        # Told (trigger, assembly seconds) for every study sealed, for metrics.
        self.on_sealed = on_sealed or (lambda trigger, seconds: None)
        self.routes = {r.name: r for r in routes}
        self.interval_seconds = interval_seconds
        self._clock = clock
        self._timer = Periodic("assembler", interval_seconds, self.run_once)

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

    def start(self) -> None:
        """Run :meth:`run_once` every ``interval_seconds`` on a daemon thread."""
        self._timer.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the timer thread and wait for a round in progress to finish."""
        self._timer.stop(timeout)
