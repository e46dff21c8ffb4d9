"""Connections of the PostgreSQL store: a pool, one transaction per call, and
the one place where psycopg's errors become :class:`StoreError`.

The SQL itself runs in ``postgres`` and ``_pg_jobs`` inside :meth:`write` and
:meth:`read`, which translate whatever psycopg raises there.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import psycopg
from psycopg import errors
from psycopg.conninfo import conninfo_to_dict
from psycopg.rows import dict_row
from psycopg_pool import ConnectionPool

from bridge.errors import StoreError

logger = logging.getLogger(__name__)

# Aborts that say "the same transaction may well succeed now", and how often
# one call runs its transaction before it gives up.
_TRANSIENT = (errors.DeadlockDetected, errors.SerializationFailure)
_ATTEMPTS = 3

T = TypeVar("T")


def shown_url(url: str) -> str:
    """Return the url without its password or options, for messages and repr."""
    try:
        parts = conninfo_to_dict(url)
    except psycopg.Error:
        return "postgresql://(unreadable url)"
    user = f"{parts['user']}@" if parts.get("user") else ""
    port = f":{parts['port']}" if parts.get("port") else ""
    return f"postgresql://{user}{parts.get('host', '')}{port}/{parts.get('dbname', '')}"


def retried(method: Callable[..., T]) -> Callable[..., T]:
    """Run a store method again when PostgreSQL aborted its transaction as a
    deadlock or serialization failure.

    Only for methods that are one transaction from start to end, so that a
    rerun starts from nothing committed.
    """

    @functools.wraps(method)
    def run(*args, **kwargs):
        for attempt in range(1, _ATTEMPTS):
            try:
                return method(*args, **kwargs)
            except StoreError as exc:
                if not isinstance(exc.__cause__, _TRANSIENT):
                    raise
                logger.warning(
                    "state store transaction retried method=%s attempt=%d error=%s",
                    method.__name__,
                    attempt,
                    type(exc.__cause__).__name__,
                )
        return method(*args, **kwargs)

    return run


class Connections:
    """A thread-safe pool of autocommit connections that return dict rows.

    Nothing connects until :meth:`open`. ``timeout`` bounds both the wait for
    the server at open and the wait for a free connection later, in seconds.
    """

    def __init__(self, url: str, *, min_size: int, max_size: int, timeout: float):
        self.shown = shown_url(url)
        self._url = url
        self._timeout = timeout
        self._pool = ConnectionPool(
            url,
            min_size=min_size,
            max_size=max_size,
            timeout=timeout,
            # Autocommit, so that a read is one statement and no idle
            # transaction; writes open theirs with conn.transaction().
            kwargs={"autocommit": True, "row_factory": dict_row},
            # A connection the server dropped (restart, failover) is found
            # out and replaced when it is handed out, not by a failed call.
            check=ConnectionPool.check_connection,
            open=False,
            name="jmix-bridge-store",
        )

    def open(self, prepare: Callable[[psycopg.Connection], T]) -> T:
        """Connect, run ``prepare`` in one transaction, then fill the pool.

        Raises StoreError naming the server (never its password) when it
        cannot be reached within the timeout or ``prepare`` fails.
        """
        try:
            # One plain connection first: the pool would retry a refused one
            # until the timeout and then say only that it timed out, where
            # this says why (no such database, authentication failed).
            with (
                psycopg.connect(
                    self._url,
                    autocommit=True,
                    connect_timeout=max(2, round(self._timeout)),
                    row_factory=dict_row,
                ) as conn,
                conn.transaction(),
            ):
                result = prepare(conn)
            self._pool.open(wait=True, timeout=self._timeout)
            return result
        except psycopg.Error as exc:
            self._pool.close()
            raise StoreError(
                f"{self.shown}: cannot open the state store: {exc}"
            ) from exc

    @contextmanager
    def write(self) -> Iterator[psycopg.Connection]:
        """Yield a connection in a transaction that commits when the block ends."""
        try:
            with self._pool.connection() as conn, conn.transaction():
                yield conn
        except psycopg.Error as exc:
            raise StoreError(f"state store write failed: {exc}") from exc

    def read(self, sql: str, args: tuple = ()) -> list[dict[str, Any]]:
        """Run one query outside any transaction and return its rows."""
        try:
            with self._pool.connection() as conn:
                return conn.execute(sql, args).fetchall()
        except psycopg.Error as exc:
            raise StoreError(f"state store read failed: {exc}") from exc

    def close(self) -> None:
        """Close every connection; the pool cannot be used again."""
        self._pool.close()
