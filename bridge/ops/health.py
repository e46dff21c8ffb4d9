"""Liveness and readiness: ``/healthz`` and ``/readyz``.

``/healthz`` answers 200 while the process serves HTTP at all. ``/readyz``
runs a list of named checks; each is a callable that returns ``None`` (or an
empty string) when all is well, and a short problem string, or raises, when
not. The answer is 200 ``{"ready": true, "checks": {...}}`` or 503 with the
same shape and ``"failing"`` naming the checks that failed. Problem strings are
written by this module and the daemon, never copied from input, so they carry
no patient data.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from bridge.config import SpoolSettings
from bridge.errors import KeyFileError
from bridge.jmix import KeyDir, load_key_dir
from bridge.store.base import Store

logger = logging.getLogger(__name__)

CheckFn = Callable[[], "str | None"]


@dataclass(frozen=True)
class Check:
    """One named readiness check."""

    name: str
    run: CheckFn


@dataclass(frozen=True)
class Readiness:
    """The result of running every check."""

    ready: bool
    checks: dict[str, str]  # name -> "ok" or the problem

    @property
    def failing(self) -> list[str]:
        """Names of the checks that failed, in check order."""
        return [name for name, result in self.checks.items() if result != "ok"]

    def as_json(self) -> dict:
        """Return the ``/readyz`` body."""
        body: dict = {"ready": self.ready, "checks": self.checks}
        if not self.ready:
            body["failing"] = self.failing
        return body


def run_checks(checks: list[Check]) -> Readiness:
    """Run every check (blocking: checks may touch disk and database)."""
    results: dict[str, str] = {}
    for check in checks:
        try:
            problem = check.run()
        except Exception as exc:
            # Our own exception messages name the failing step, never input.
            problem = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
        results[check.name] = problem or "ok"
    ready = all(result == "ok" for result in results.values())
    if not ready:
        logger.warning(
            "readiness failed checks=%s",
            ",".join(n for n, r in results.items() if r != "ok"),
        )
    return Readiness(ready, results)


# -- the standard checks ---------------------------------------------------------


def store_writable(store: Store) -> Check:
    """Check that a write transaction on the state store commits now."""

    def run() -> None:
        store.check_writable()

    return Check("store", run)


def spool_has_room(path: Path, min_free_bytes: int, min_free_ratio: float) -> Check:
    """Check that the spool's filesystem is above both free-space watermarks."""

    def run() -> str | None:
        usage = shutil.disk_usage(path)
        ratio = usage.free / usage.total if usage.total else 0.0
        if usage.free < min_free_bytes or ratio < min_free_ratio:
            return (
                f"spool free {usage.free} bytes ({ratio:.1%}) is under the "
                f"watermark {min_free_bytes} bytes / {min_free_ratio:.1%}"
            )
        return None

    return Check("spool", run)


def keys_on_disk(loaded: KeyDir) -> Check:
    """Check that the node's key files still hold the keys the daemon signs with.

    The daemon keeps its keys in memory; a key file removed, made unreadable
    or replaced (a rotation without a restart) would not stop it now but means
    that a restart fails, or signs with keys the peers have not pinned. Reads
    two small files and compares fingerprints of their public halves.
    """

    def run() -> str | None:
        try:
            on_disk = load_key_dir(loaded.path)
        except KeyFileError as exc:
            return f"node keys cannot be loaded: {exc}"
        if (on_disk.signing_fingerprint, on_disk.encryption_fingerprint) != (
            loaded.signing_fingerprint,
            loaded.encryption_fingerprint,
        ):
            return (
                f"node keys in {loaded.path} are not the keys in use "
                "(changed since start); restart the bridge to use them"
            )
        return None

    return Check("keys", run)


def flag(name: str, is_ok: Callable[[], bool], problem: str) -> Check:
    """Check a boolean the daemon keeps (the listener is bound)."""

    def run() -> str | None:
        return None if is_ok() else problem

    return Check(name, run)


def standard_checks(
    *,
    store: Store,
    spool_path: Path,
    spool: SpoolSettings,
    listener_bound: Callable[[], bool],
    keys: KeyDir,
) -> list[Check]:
    """Return the daemon's readiness checks: listener, store, spool, keys."""
    return [
        flag("listener", listener_bound, "DICOM listener is not bound"),
        store_writable(store),
        spool_has_room(spool_path, spool.min_free_bytes, spool.min_free_ratio),
        keys_on_disk(keys),
    ]
