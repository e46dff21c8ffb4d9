"""Telling this process's workers that a queue has a due job, once it is committed.

A mixin of both stores. Every write transaction runs inside :meth:`_signalled`,
which collects the queues the transaction gave a due job (a new job, or one
made ready again now) and, only after the commit, calls each subscriber of
those queues. A rolled-back transaction tells no one. A job due later tells no
one either: the worker's poll finds it when it is due, so a backoff never turns
into a loop of wake-ups that find nothing.

Subscribers live in this process only; a worker of another process sharing the
PostgreSQL store sees the job at its next poll.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

logger = logging.getLogger(__name__)

Subscriber = Callable[[], None]


class EnqueueSignals:
    """Subscriptions to a queue's due jobs; the store calls :meth:`_init_signals`."""

    def _init_signals(self) -> None:
        self._subscribers: dict[str, list[Subscriber]] = {}
        self._subscribers_lock = threading.Lock()
        self._pending = threading.local()

    def subscribe(self, queue: str, callback: Subscriber) -> None:
        with self._subscribers_lock:
            self._subscribers.setdefault(queue, []).append(callback)

    def unsubscribe(self, queue: str, callback: Subscriber) -> None:
        with self._subscribers_lock:
            callbacks = self._subscribers.get(queue, [])
            if callback in callbacks:
                callbacks.remove(callback)

    @contextmanager
    def _signalled(self) -> Iterator[None]:
        """Run a transaction's block; after it ends without an exception (it
        committed), tell the subscribers of every queue it gave a due job."""
        outer = getattr(self._pending, "queues", None)
        queues: set[str] = set() if outer is None else outer
        self._pending.queues = queues
        try:
            yield
        finally:
            self._pending.queues = outer
        if outer is None:
            self._notify(queues)

    def _job_due(self, queue: str) -> None:
        """Note, inside a transaction, that it gives ``queue`` a job due now."""
        self._pending.queues.add(queue)

    def _notify(self, queues: set[str]) -> None:
        for queue in sorted(queues):
            with self._subscribers_lock:
                callbacks = list(self._subscribers.get(queue, ()))
            for callback in callbacks:
                # The job is committed whatever a subscriber does; a failing
                # one costs its worker a poll interval, never the job.
                try:
                    callback()
                except Exception:
                    logger.exception("queue subscriber failed queue=%s", queue)
