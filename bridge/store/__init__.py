"""The state store: studies, instances, envelopes, jobs and seen envelope ids.

``open_store(url)`` returns the implementation a configuration names: the
embedded SQLite store, or the PostgreSQL store that several bridge processes
share (``docs/postgres.md``). The PostgreSQL store needs the optional
``postgres`` extra, so it is imported only when a url names it.
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

# The url schemes libpq reads as PostgreSQL.
POSTGRES_SCHEMES = ("postgresql", "postgres")


def open_store(url: str | Path, *, busy_timeout: float = 30.0) -> Store:
    """Open the store named by ``url``.

    ``sqlite:///PATH`` or a plain file path opens SQLite, whose writes wait
    ``busy_timeout`` seconds for another connection's lock;
    ``postgresql://...`` (or ``postgres://...``), a libpq URL, opens PostgreSQL.
    Raises StoreError for any other scheme, when psycopg is not installed, or
    when the store cannot be opened.
    """
    text = str(url)
    if text.startswith("sqlite:///"):
        return SQLiteStore(text.removeprefix("sqlite:///"), busy_timeout=busy_timeout)
    if "://" not in text:
        return SQLiteStore(text, busy_timeout=busy_timeout)
    scheme = text.split("://", 1)[0]
    if scheme in POSTGRES_SCHEMES:
        return _open_postgres(text)
    raise StoreError(
        f"state store url: scheme '{scheme}' is not supported, "
        "expected sqlite:///PATH or postgresql://HOST/DBNAME"
    )


def _open_postgres(url: str) -> Store:
    try:
        from bridge.store.postgres import PostgresStore
    except ImportError as exc:
        if exc.name not in ("psycopg", "psycopg_pool"):
            raise
        raise StoreError(
            f"state store url: a PostgreSQL store needs {exc.name}, which is "
            "not installed; install the 'postgres' extra "
            "(pip install 'jmix-bridge[postgres]')"
        ) from exc
    return PostgresStore(url)
