"""A background round run every so often: the assembler's timer, retention."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

logger = logging.getLogger(__name__)


class Periodic:
    """Calls ``task()`` every ``interval_seconds`` on a daemon thread.

    A round that raises is logged (its error type only: messages may carry
    paths) and the next round runs on time; a study is never lost to a bug in
    one round, only delayed.
    """

    def __init__(
        self,
        name: str,
        interval_seconds: float,
        task: Callable[[], object],
        *,
        run_first: bool = True,
    ):
        self.name = name
        self.interval_seconds = interval_seconds
        self.task = task
        self.run_first = run_first
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        """Start the thread; the first round runs at once when ``run_first``."""
        self._stop.clear()
        self._thread = threading.Thread(target=self._loop, name=self.name, daemon=True)
        self._thread.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread, letting a round in progress finish."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            self._thread = None

    def _loop(self) -> None:
        if not self.run_first and self._stop.wait(self.interval_seconds):
            return
        while not self._stop.is_set():
            try:
                self.task()
            except Exception as exc:
                logger.warning(
                    "%s round failed error=%s", self.name, type(exc).__name__
                )
            self._stop.wait(self.interval_seconds)
