"""Retention: remove spool files once nothing can need them, keep every record.

A study's instance files go once every envelope built from it was delivered
and the retention time has passed since it was sealed; an outgoing envelope's
zip once it was delivered; an incoming envelope's zip, opened payload and
forward progress logs once every destination has stored it; the earlier
versions of a study's replaced instances (``replaced/<ref>/``) go with the
study. Files that no record names (the ``instances/`` copy of such a version,
say) go once they are older than a day. Quarantined envelopes and held or open
studies are never touched: they wait for an operator. Records stay, marked
purged, so the history of every study can still be shown.

Files are removed before the record is marked, so a crash in between only
means the next round removes nothing and marks the record.
"""

from __future__ import annotations

import logging
import shutil
import time
from dataclasses import dataclass

from bridge.receiving.progress import progress_folder
from bridge.spool import Spool
from bridge.store import Store
from bridge.workers.periodic import Periodic

logger = logging.getLogger(__name__)

ORPHAN_AGE_SECONDS = 86400.0


@dataclass
class Purged:
    """What one round removed."""

    studies: int = 0
    envelopes: int = 0
    orphans: int = 0
    bytes: int = 0


class Janitor:
    """Runs retention rounds; ``retention_seconds`` of 0 keeps everything."""

    def __init__(
        self,
        store: Store,
        spool: Spool,
        retention_seconds: float,
        *,
        interval_seconds: float = 600.0,
        orphan_age_seconds: float = ORPHAN_AGE_SECONDS,
    ):
        self.store = store
        self.spool = spool
        self.retention_seconds = retention_seconds
        self.interval_seconds = interval_seconds
        self.orphan_age_seconds = orphan_age_seconds
        self._timer = Periodic(
            "retention", interval_seconds, self.run_once, run_first=False
        )

    def run_once(self, now: float | None = None) -> Purged:
        """Remove what is due; return the counts. Raises StoreError."""
        done = Purged()
        if self.retention_seconds <= 0:
            return done
        now = time.time() if now is None else now
        before = now - self.retention_seconds
        for study in self.store.purgeable_studies(before, limit=1000):
            for rel in self.store.exclusive_spool_paths(study.ref):
                done.bytes += self._remove(rel)
            # The versions newer ones replaced (keep-newest) go with the study.
            done.bytes += self._remove(f"replaced/{study.ref}")
            self.store.mark_study_purged(study.ref)
            done.studies += 1
        for env in self.store.purgeable_envelopes(before, limit=1000):
            done.bytes += self._remove(env.path)
            if env.direction == "in":
                opened = self.spool.envelope_path("opened", env.id)
                done.bytes += self._remove(self.spool.relative(opened))
                # The forward progress logs live beside the payload they name.
                progress = progress_folder(opened)
                done.bytes += self._remove(self.spool.relative(progress))
            self.store.mark_envelope_purged(env.id, env.direction)
            done.envelopes += 1
        self._sweep_orphans(now, done)
        if done.studies or done.envelopes or done.orphans:
            logger.info(
                "retention round studies=%d envelopes=%d orphans=%d bytes=%d",
                done.studies,
                done.envelopes,
                done.orphans,
                done.bytes,
            )
        return done

    def _sweep_orphans(self, now: float, done: Purged) -> None:
        folder = self.spool.root / "instances"
        if not folder.is_dir():
            return
        for path in folder.rglob("*.dcm"):
            try:
                old = now - path.stat().st_mtime > self.orphan_age_seconds
            except FileNotFoundError:
                continue
            if old and not self.store.spool_path_used(self.spool.relative(path)):
                done.bytes += self._remove(self.spool.relative(path))
                done.orphans += 1

    def _remove(self, rel: str) -> int:
        """Remove a spool file or folder by relative path; return bytes freed."""
        path = self.spool.path_of(rel)
        try:
            if path.is_dir():
                size = sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
                shutil.rmtree(path)
                return size
            size = path.stat().st_size
            path.unlink()
            return size
        except FileNotFoundError:
            return 0

    def start(self) -> None:
        """Run a round every ``interval_seconds`` on a daemon thread."""
        self._timer.start()

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the thread, letting a round in progress finish."""
        self._timer.stop(timeout)
