"""The embedded state store: SQLite in WAL mode, for a bridge on one machine.

Durability: ``synchronous=FULL`` makes every commit reach the disk before the
call returns, because the listener acknowledges an instance only after its
record is committed. Each thread gets its own connection; write transactions
start with ``BEGIN IMMEDIATE`` so that two writers never both read and then
collide, and ``busy_timeout`` lets a writer wait for another instead of failing.

A bridge process takes the file for itself with
:meth:`SQLiteStore.hold_exclusively`, a lock held until it closes the store: a
second process on the same file is refused at start, and the owner knows that
every lease it finds was held by a process that died, so it can end them at
once instead of waiting for them to run out.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from bridge.errors import StoreError
from bridge.store import _rows
from bridge.store._rules import (
    DELIVERED,
    judge_instance,
    new_study_ref,
    with_commitment,
)
from bridge.store._sqlite_jobs import SQLiteJobs
from bridge.store._sqlite_schema import MIGRATIONS, SCHEMA, SCHEMA_VERSION, migrate
from bridge.store.base import (
    AddResult,
    DuplicatePolicy,
    Envelope,
    Instance,
    InstanceOutcome,
    NewJob,
    Store,
    Study,
    StudyState,
    dumps,
)

logger = logging.getLogger(__name__)


class SQLiteStore(SQLiteJobs, Store):
    """The state store in one SQLite file; see the module docstring."""

    def __init__(self, path: Path | str, *, busy_timeout: float = 30.0):
        self._init_signals()
        self.path = Path(path)
        self._busy_ms = int(busy_timeout * 1000)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        self._claim_fd: int | None = None
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn().executescript(SCHEMA)
            with self._write() as conn:
                row = conn.execute(
                    "SELECT value FROM meta WHERE name = 'schema_version'"
                ).fetchone()
                if row is None:
                    conn.execute(
                        "INSERT INTO meta VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),),
                    )
                elif int(row[0]) in MIGRATIONS:
                    migrate(conn, int(row[0]))
                elif int(row[0]) != SCHEMA_VERSION:
                    raise StoreError(
                        f"{self.path}: schema version {row[0]}, this bridge "
                        f"reads version {SCHEMA_VERSION}"
                    )
        except (sqlite3.Error, OSError) as exc:
            raise StoreError(
                f"{self.path}: cannot open the state store: {exc}"
            ) from exc

    # -- connections and transactions ------------------------------------------

    def _conn(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(
                self.path, isolation_level=None, check_same_thread=False
            )
            conn.row_factory = sqlite3.Row
            conn.execute(f"PRAGMA busy_timeout = {self._busy_ms}")
            conn.execute("PRAGMA journal_mode = WAL")
            conn.execute("PRAGMA synchronous = FULL")
            conn.execute("PRAGMA foreign_keys = ON")
            self._local.conn = conn
            with self._lock:
                self._connections.append(conn)
        return conn

    @contextmanager
    def _write(self) -> Iterator[sqlite3.Connection]:
        conn = self._conn()
        with self._signalled():
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    yield conn
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
                conn.execute("COMMIT")
            except sqlite3.Error as exc:
                raise StoreError(f"state store write failed: {exc}") from exc

    def _read(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        try:
            return self._conn().execute(sql, args).fetchall()
        except sqlite3.Error as exc:
            raise StoreError(f"state store read failed: {exc}") from exc

    # -- studies and instances -------------------------------------------------

    def add_instance(
        self,
        inst: Instance,
        *,
        route: str,
        quiet_seconds: float,
        max_age_seconds: float,
        duplicates: DuplicatePolicy,
    ) -> AddResult:
        now = inst.received_at or time.time()
        with self._write() as conn:
            known = conn.execute(
                "SELECT i.*, s.state AS study_state FROM instances i "
                "JOIN studies s ON s.ref = i.study_ref "
                "WHERE i.study_uid = ? AND s.route = ? AND i.sop_uid = ? "
                "ORDER BY s.generation DESC LIMIT 1",
                (inst.study_instance_uid, route, inst.sop_instance_uid),
            ).fetchone()
            study = self._open_study_for(conn, inst, route, now)
            outcome = judge_instance(known, inst.digest, duplicates)
            if outcome == InstanceOutcome.DUPLICATE:
                return AddResult(
                    outcome, study or self._study_row(conn, known["study_ref"])
                )
            if outcome == InstanceOutcome.CONFLICT:
                return AddResult(outcome, self._study_row(conn, known["study_ref"]))
            previous = None
            if outcome == InstanceOutcome.REPLACED:
                previous = _rows.instance(known)
                conn.execute("DELETE FROM instances WHERE id = ?", (known["id"],))
                conn.execute(
                    "UPDATE studies SET instance_count = instance_count - 1, "
                    "size_bytes = size_bytes - ? WHERE ref = ?",
                    (known["size_bytes"], known["study_ref"]),
                )
            if study is None:
                study = self._create_study(
                    conn, inst, route, now, quiet_seconds, max_age_seconds
                )
            conn.execute(
                "INSERT INTO instances (study_ref, sop_uid, study_uid, series_uid, "
                "sop_class_uid, transfer_syntax_uid, digest, size_bytes, spool_path, "
                "calling_ae, modality, patient_id, received_at) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    study.ref,
                    inst.sop_instance_uid,
                    inst.study_instance_uid,
                    inst.series_instance_uid,
                    inst.sop_class_uid,
                    inst.transfer_syntax_uid,
                    inst.digest,
                    inst.size_bytes,
                    inst.spool_path,
                    inst.calling_ae,
                    inst.modality,
                    inst.patient_id,
                    now,
                ),
            )
            conn.execute(
                "UPDATE studies SET instance_count = instance_count + 1, "
                "size_bytes = size_bytes + ?, last_received = ?, "
                "seal_due = MIN(? + ?, first_received + ?) WHERE ref = ?",
                (inst.size_bytes, now, now, quiet_seconds, max_age_seconds, study.ref),
            )
            return AddResult(outcome, self._study_row(conn, study.ref), previous)

    @staticmethod
    def _open_study_for(conn, inst: Instance, route: str, now: float) -> Study | None:
        row = conn.execute(
            "SELECT * FROM studies WHERE study_uid = ? AND route = ? AND state = ? "
            "ORDER BY generation DESC LIMIT 1",
            (inst.study_instance_uid, route, StudyState.OPEN.value),
        ).fetchone()
        return _rows.study(row) if row else None

    @staticmethod
    def _create_study(
        conn,
        inst: Instance,
        route: str,
        now: float,
        quiet_seconds: float,
        max_age_seconds: float,
    ) -> Study:
        row = conn.execute(
            "SELECT MAX(generation) FROM studies WHERE study_uid = ? AND route = ?",
            (inst.study_instance_uid, route),
        ).fetchone()
        generation = 0 if row[0] is None else row[0] + 1
        ref = new_study_ref()
        due = min(now + quiet_seconds, now + max_age_seconds)
        conn.execute(
            "INSERT INTO studies (ref, study_uid, route, generation, state, "
            "first_received, last_received, seal_due, calling_ae) "
            "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                ref,
                inst.study_instance_uid,
                route,
                generation,
                StudyState.OPEN.value,
                now,
                now,
                due,
                inst.calling_ae,
            ),
        )
        return SQLiteStore._study_row(conn, ref)

    @staticmethod
    def _study_row(conn, ref: str) -> Study:
        return _rows.study(
            conn.execute("SELECT * FROM studies WHERE ref = ?", (ref,)).fetchone()
        )

    def find_instance(
        self, study_instance_uid: str, route: str, sop_instance_uid: str
    ) -> Instance | None:
        rows = self._read(
            "SELECT i.* FROM instances i JOIN studies s ON s.ref = i.study_ref "
            "WHERE i.study_uid = ? AND s.route = ? AND i.sop_uid = ? "
            "ORDER BY s.generation DESC LIMIT 1",
            (study_instance_uid, route, sop_instance_uid),
        )
        return _rows.instance(rows[0]) if rows else None

    def study_instances(self, ref: str) -> list[Instance]:
        rows = self._read(
            "SELECT * FROM instances WHERE study_ref = ? ORDER BY id", (ref,)
        )
        return [_rows.instance(r) for r in rows]

    def get_study(self, ref: str) -> Study | None:
        rows = self._read("SELECT * FROM studies WHERE ref = ?", (ref,))
        return _rows.study(rows[0]) if rows else None

    def due_studies(self, now: float) -> list[Study]:
        rows = self._read(
            "SELECT * FROM studies WHERE state = ? AND seal_due <= ? ORDER BY seal_due",
            (StudyState.OPEN.value, now),
        )
        return [_rows.study(r) for r in rows]

    def open_studies(self) -> list[Study]:
        rows = self._read(
            "SELECT * FROM studies WHERE state = ? ORDER BY seal_due",
            (StudyState.OPEN.value,),
        )
        return [_rows.study(r) for r in rows]

    def seal_study(self, ref: str, trigger: str, jobs: list[NewJob]) -> bool:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE studies SET state = ?, sealed_at = ?, seal_trigger = ? "
                "WHERE ref = ? AND state = ?",
                (
                    StudyState.SEALED.value,
                    time.time(),
                    trigger,
                    ref,
                    StudyState.OPEN.value,
                ),
            )
            if cur.rowcount != 1:
                return False
            for job in jobs:
                self._enqueue(conn, job)
            return True

    def hold_study(self, ref: str, reason: str) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE studies SET state = ?, hold_reason = ? WHERE ref = ?",
                (StudyState.HELD.value, reason, ref),
            )

    def recent_studies(self, limit: int = 50) -> list[Study]:
        rows = self._read(
            "SELECT * FROM studies ORDER BY last_received DESC LIMIT ?", (limit,)
        )
        return [_rows.study(r) for r in rows]

    # -- envelopes --------------------------------------------------------------

    def put_envelope(self, env: Envelope, jobs: list[NewJob] = ()) -> bool:
        with self._write() as conn:
            if not self._put_envelope(conn, env):
                return False
            for job in jobs:
                self._enqueue(conn, job)
            return True

    @staticmethod
    def _put_envelope(conn, env: Envelope) -> bool:
        now = time.time()
        cur = conn.execute(
            "INSERT OR IGNORE INTO envelopes (id, direction, peer, path, size_bytes, "
            "state, study_ref, study_uid, instance_count, reason, details, "
            "created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                env.id,
                env.direction,
                env.peer,
                env.path,
                env.size_bytes,
                env.state,
                env.study_ref,
                env.study_instance_uid,
                env.instance_count,
                env.reason,
                dumps(env.details),
                env.created_at or now,
                now,
            ),
        )
        return cur.rowcount == 1

    def get_envelope(self, envelope_id: str, direction: str) -> Envelope | None:
        rows = self._read(
            "SELECT * FROM envelopes WHERE id = ? AND direction = ?",
            (envelope_id, direction),
        )
        return _rows.envelope(rows[0]) if rows else None

    def set_envelope_state(
        self,
        envelope_id: str,
        direction: str,
        state: str,
        reason: str = "",
        details: dict | None = None,
        path: str | None = None,
        jobs: list[NewJob] = (),
        *,
        size_bytes: int | None = None,
        only_if: str | None = None,
    ) -> bool:
        with self._write() as conn:
            changed = self._set_envelope_state(
                conn,
                envelope_id,
                direction,
                state,
                reason,
                details,
                path,
                size_bytes=size_bytes,
                only_if=only_if,
            )
            if changed or only_if is None:
                for job in jobs:
                    self._enqueue(conn, job)
            return changed

    def find_envelopes(
        self,
        *,
        direction: str | None = None,
        state: str | None = None,
        study_instance_uid: str | None = None,
        limit: int = 100,
    ) -> list[Envelope]:
        where, args = _rows.filters(
            direction=direction, state=state, study_uid=study_instance_uid
        )
        rows = self._read(
            f"SELECT * FROM envelopes {where} "  # noqa: S608 (fixed columns)
            "ORDER BY created_at DESC LIMIT ?",
            (*args, limit),
        )
        return [_rows.envelope(r) for r in rows]

    def mark_seen(self, envelope_id: str, sender: str) -> bool:
        with self._write() as conn:
            return self._mark_seen(conn, envelope_id, sender)

    @staticmethod
    def _mark_seen(conn, envelope_id: str, sender: str) -> bool:
        cur = conn.execute(
            "INSERT OR IGNORE INTO seen_envelopes VALUES (?, ?, ?)",
            (envelope_id, sender, time.time()),
        )
        return cur.rowcount == 1

    def is_seen(self, envelope_id: str) -> bool:
        return bool(
            self._read("SELECT 1 FROM seen_envelopes WHERE id = ?", (envelope_id,))
        )

    # -- storage commitment ---------------------------------------------------------

    def record_commitment(
        self,
        transaction_uid: str,
        envelope_id: str,
        destination: str,
        state: str,
        failed: int = 0,
    ) -> None:
        now = time.time()
        with self._write() as conn:
            conn.execute(
                "INSERT INTO commitments VALUES (?, ?, ?, ?, ?, ?) "
                "ON CONFLICT (transaction_uid) DO UPDATE SET state = excluded.state, "
                "failed = excluded.failed, updated_at = excluded.updated_at",
                (transaction_uid, envelope_id, destination, state, failed, now),
            )
            row = conn.execute(
                "SELECT details FROM envelopes WHERE id = ? AND direction = 'in'",
                (envelope_id,),
            ).fetchone()
            if row is None:
                return
            details = with_commitment(
                json.loads(row["details"]), transaction_uid, destination, state, failed
            )
            conn.execute(
                "UPDATE envelopes SET details = ?, updated_at = ? "
                "WHERE id = ? AND direction = 'in'",
                (dumps(details), now, envelope_id),
            )

    def find_commitment(self, transaction_uid: str) -> tuple[str, str] | None:
        rows = self._read(
            "SELECT envelope_id, destination FROM commitments "
            "WHERE transaction_uid = ?",
            (transaction_uid,),
        )
        return (rows[0]["envelope_id"], rows[0]["destination"]) if rows else None

    # -- retention ----------------------------------------------------------------

    def purgeable_studies(self, before: float, limit: int = 100) -> list[Study]:
        rows = self._read(
            "SELECT s.* FROM studies s WHERE s.state = ? AND s.purged_at IS NULL "
            "AND s.sealed_at < ? "
            "AND EXISTS (SELECT 1 FROM envelopes e WHERE e.direction = 'out' "
            "  AND e.study_ref = s.ref) "
            "AND NOT EXISTS (SELECT 1 FROM envelopes e WHERE e.direction = 'out' "
            "  AND e.study_ref = s.ref AND e.state NOT IN (?, ?)) "
            "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.queue = 'seal' "
            "  AND substr(j.key, 1, length(s.ref) + 6) = 'seal:' || s.ref || ':' "
            "  AND j.state != 'done') "
            "ORDER BY s.sealed_at LIMIT ?",
            (StudyState.SEALED.value, before, *DELIVERED, limit),
        )
        return [_rows.study(r) for r in rows]

    def exclusive_spool_paths(self, ref: str) -> list[str]:
        rows = self._read(
            "SELECT DISTINCT i.spool_path FROM instances i WHERE i.study_ref = ? "
            "AND NOT EXISTS (SELECT 1 FROM instances o JOIN studies s "
            "  ON s.ref = o.study_ref WHERE o.spool_path = i.spool_path "
            "  AND o.study_ref != i.study_ref AND s.purged_at IS NULL)",
            (ref,),
        )
        return [r["spool_path"] for r in rows]

    def mark_study_purged(self, ref: str) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE studies SET purged_at = ? WHERE ref = ?", (time.time(), ref)
            )

    def purgeable_envelopes(self, before: float, limit: int = 100) -> list[Envelope]:
        rows = self._read(
            "SELECT e.* FROM envelopes e WHERE e.purged_at IS NULL "
            "AND e.updated_at < ? AND ("
            "  (e.direction = 'out' AND e.state IN (?, ?)) OR "
            "  (e.direction = 'in' AND e.state = 'opened' AND NOT EXISTS ("
            "    SELECT 1 FROM jobs j WHERE j.queue = 'forward' "
            "    AND substr(j.key, 1, length(e.id) + 9) = 'forward:' || e.id || ':' "
            "    AND j.state != 'done'))) "
            "ORDER BY e.updated_at LIMIT ?",
            (before, *DELIVERED, limit),
        )
        return [_rows.envelope(r) for r in rows]

    def mark_envelope_purged(self, envelope_id: str, direction: str) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE envelopes SET purged_at = ? WHERE id = ? AND direction = ?",
                (time.time(), envelope_id, direction),
            )

    def spool_path_used(self, rel: str) -> bool:
        return bool(
            self._read("SELECT 1 FROM instances WHERE spool_path = ? LIMIT 1", (rel,))
        )

    # -- health -----------------------------------------------------------------

    def check_writable(self) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT OR REPLACE INTO meta VALUES ('last_health_check', ?)",
                (str(time.time()),),
            )

    def hold_exclusively(self) -> None:
        """Take the database for this process alone until :meth:`close`.

        Raises StoreError when another process holds it.
        """
        lock = self.path.with_name(self.path.name + ".lock")
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise StoreError(
                f"state store {self.path} is in use by another bridge process"
            ) from None
        self._claim_fd = fd

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
            if self._claim_fd is not None:
                os.close(self._claim_fd)
                self._claim_fd = None
        self._local = threading.local()
