"""The state store: studies, instances, envelopes, jobs and seen envelope ids.

``open_store(url)`` returns the implementation a configuration names. Only the
embedded SQLite store exists today (README, limitation L-01).
"""

from pathlib import Path

from bridge.errors import StoreError
from bridge.store.base import (
    AddResult,
    DuplicatePolicy,
    Envelope,
    Instance,
    InstanceOutcome,
    Job,
    JobCount,
    JobState,
    NewJob,
    Store,
    Study,
    StudyState,
)
from bridge.store.sqlite import SQLiteStore

__all__ = [
    "AddResult",
    "DuplicatePolicy",
    "Envelope",
    "Instance",
    "InstanceOutcome",
    "Job",
    "JobCount",
    "JobState",
    "NewJob",
    "SQLiteStore",
    "Store",
    "Study",
    "StudyState",
    "open_store",
]


def open_store(url: str | Path) -> Store:
    """Open the store named by ``url``: ``sqlite:///PATH`` or a plain file path."""
    text = str(url)
    if text.startswith("sqlite:///"):
        return SQLiteStore(text.removeprefix("sqlite:///"))
    if "://" in text:
        scheme = text.split("://", 1)[0]
        raise StoreError(
            f"state store url: scheme '{scheme}' is not supported, "
            "expected sqlite:///PATH (see README L-01)"
        )
    return SQLiteStore(text)
