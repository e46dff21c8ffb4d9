"""The embedded state store: SQLite in WAL mode, for a bridge on one machine.

Durability: ``synchronous=FULL`` makes every commit reach the disk before the
call returns, because the listener acknowledges an instance only after its
record is committed. Each thread gets its own connection; write transactions
start with ``BEGIN IMMEDIATE`` so that two writers never both read and then
collide, and ``busy_timeout`` lets a writer wait for another instead of failing.
"""

from __future__ import annotations

import json
import logging
import secrets
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
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
    dumps,
)

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2

_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS studies (
    ref TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    route TEXT NOT NULL,
    generation INTEGER NOT NULL,
    state TEXT NOT NULL,
    instance_count INTEGER NOT NULL DEFAULT 0,
    size_bytes INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    seal_due REAL NOT NULL,
    sealed_at REAL,
    seal_trigger TEXT NOT NULL DEFAULT '',
    hold_reason TEXT NOT NULL DEFAULT '',
    calling_ae TEXT NOT NULL DEFAULT '',
    purged_at REAL,
    UNIQUE (study_uid, route, generation)
);
CREATE INDEX IF NOT EXISTS studies_due ON studies (state, seal_due);
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    study_ref TEXT NOT NULL REFERENCES studies (ref),
    sop_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    digest TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    spool_path TEXT NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    modality TEXT NOT NULL DEFAULT '',
    patient_id TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    UNIQUE (study_ref, sop_uid)
);
CREATE INDEX IF NOT EXISTS instances_sop ON instances (study_uid, sop_uid);
CREATE INDEX IF NOT EXISTS instances_spool ON instances (spool_path);
CREATE TABLE IF NOT EXISTS envelopes (
    id TEXT NOT NULL,
    direction TEXT NOT NULL,
    peer TEXT NOT NULL,
    path TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    state TEXT NOT NULL,
    study_ref TEXT NOT NULL DEFAULT '',
    study_uid TEXT NOT NULL DEFAULT '',
    instance_count INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    details TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    purged_at REAL,
    PRIMARY KEY (id, direction)
);
CREATE INDEX IF NOT EXISTS envelopes_study ON envelopes (study_uid);
CREATE INDEX IF NOT EXISTS envelopes_state ON envelopes (direction, state);
CREATE TABLE IF NOT EXISTS seen_envelopes (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    accepted_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    key TEXT NOT NULL UNIQUE,
    target TEXT NOT NULL DEFAULT '',
    payload TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL,
    lease_owner TEXT NOT NULL DEFAULT '',
    lease_until REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (queue, state, not_before);
"""


# Schema changes, by the version they upgrade from. Each runs inside the write
# transaction that opens the store, so an upgrade is all or nothing.
_MIGRATIONS = {
    1: (
        "ALTER TABLE studies ADD COLUMN purged_at REAL",
        "ALTER TABLE envelopes ADD COLUMN purged_at REAL",
    ),
}


def _migrate(conn: sqlite3.Connection, version: int) -> None:
    while version in _MIGRATIONS:
        for statement in _MIGRATIONS[version]:
            conn.execute(statement)
        version += 1
    conn.execute(
        "UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(version),)
    )
    logger.info("state store upgraded schema_version=%d", version)


# Outgoing envelope states that mean the peer has it: delivered, and arrived at
# the peer's PACS (a signed receipt came back).
_DELIVERED = ("delivered", "arrived")


def new_study_ref() -> str:
    """Return a fresh opaque study reference (never derived from a UID)."""
    return "st-" + secrets.token_hex(6)


class SQLiteStore(Store):
    """The state store in one SQLite file; see the module docstring."""

    def __init__(self, path: Path | str, *, busy_timeout: float = 30.0):
        self.path = Path(path)
        self._busy_ms = int(busy_timeout * 1000)
        self._local = threading.local()
        self._connections: list[sqlite3.Connection] = []
        self._lock = threading.Lock()
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._conn().executescript(_SCHEMA)
            with self._write() as conn:
                row = conn.execute(
                    "SELECT value FROM meta WHERE name = 'schema_version'"
                ).fetchone()
                if row is None:
                    conn.execute(
                        "INSERT INTO meta VALUES ('schema_version', ?)",
                        (str(SCHEMA_VERSION),),
                    )
                elif int(row[0]) in _MIGRATIONS:
                    _migrate(conn, int(row[0]))
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
            if known is not None and known["digest"] == inst.digest:
                return AddResult(
                    InstanceOutcome.DUPLICATE,
                    study or self._study_row(conn, known["study_ref"]),
                )
            previous = None
            outcome = InstanceOutcome.STORED
            if known is not None and known["study_state"] == StudyState.OPEN:
                if duplicates == DuplicatePolicy.REJECT:
                    return AddResult(
                        InstanceOutcome.CONFLICT,
                        self._study_row(conn, known["study_ref"]),
                    )
                previous = _instance(known)
                outcome = InstanceOutcome.REPLACED
                conn.execute("DELETE FROM instances WHERE id = ?", (known["id"],))
                conn.execute(
                    "UPDATE studies SET instance_count = instance_count - 1, "
                    "size_bytes = size_bytes - ? WHERE ref = ?",
                    (known["size_bytes"], known["study_ref"]),
                )
            elif known is not None and duplicates == DuplicatePolicy.REJECT:
                return AddResult(
                    InstanceOutcome.CONFLICT, self._study_row(conn, known["study_ref"])
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
        return _study(row) if row else None

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
        return _study(
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
        return _instance(rows[0]) if rows else None

    def study_instances(self, ref: str) -> list[Instance]:
        rows = self._read(
            "SELECT * FROM instances WHERE study_ref = ? ORDER BY id", (ref,)
        )
        return [_instance(r) for r in rows]

    def get_study(self, ref: str) -> Study | None:
        rows = self._read("SELECT * FROM studies WHERE ref = ?", (ref,))
        return _study(rows[0]) if rows else None

    def due_studies(self, now: float) -> list[Study]:
        rows = self._read(
            "SELECT * FROM studies WHERE state = ? AND seal_due <= ? ORDER BY seal_due",
            (StudyState.OPEN.value, now),
        )
        return [_study(r) for r in rows]

    def open_studies(self) -> list[Study]:
        rows = self._read(
            "SELECT * FROM studies WHERE state = ? ORDER BY seal_due",
            (StudyState.OPEN.value,),
        )
        return [_study(r) for r in rows]

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
        return [_study(r) for r in rows]

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
        return _envelope(rows[0]) if rows else None

    def set_envelope_state(
        self,
        envelope_id: str,
        direction: str,
        state: str,
        reason: str = "",
        details: dict | None = None,
        path: str | None = None,
        jobs: list[NewJob] = (),
    ) -> None:
        with self._write() as conn:
            self._set_envelope_state(
                conn, envelope_id, direction, state, reason, details, path
            )
            for job in jobs:
                self._enqueue(conn, job)

    @staticmethod
    def _set_envelope_state(
        conn, envelope_id, direction, state, reason="", details=None, path=None
    ) -> None:
        sets = ["state = ?", "reason = ?", "updated_at = ?"]
        args: list = [state, reason, time.time()]
        if details is not None:
            sets.append("details = ?")
            args.append(dumps(details))
        if path is not None:
            sets.append("path = ?")
            args.append(path)
        conn.execute(
            f"UPDATE envelopes SET {', '.join(sets)} "  # noqa: S608 (fixed columns)
            "WHERE id = ? AND direction = ?",
            (*args, envelope_id, direction),
        )

    def find_envelopes(
        self,
        *,
        direction: str | None = None,
        state: str | None = None,
        study_instance_uid: str | None = None,
        limit: int = 100,
    ) -> list[Envelope]:
        where, args = _filters(
            direction=direction, state=state, study_uid=study_instance_uid
        )
        rows = self._read(
            f"SELECT * FROM envelopes {where} "  # noqa: S608 (fixed columns)
            "ORDER BY created_at DESC LIMIT ?",
            (*args, limit),
        )
        return [_envelope(r) for r in rows]

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

    # -- jobs -------------------------------------------------------------------

    def enqueue(self, job: NewJob) -> Job:
        with self._write() as conn:
            return self._enqueue(conn, job)

    @staticmethod
    def _enqueue(conn, job: NewJob) -> Job:
        now = time.time()
        conn.execute(
            "INSERT OR IGNORE INTO jobs (queue, key, target, payload, state, "
            "not_before, created_at, updated_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (
                job.queue,
                job.key,
                job.target,
                dumps(job.payload),
                JobState.READY.value,
                job.not_before or now,
                now,
                now,
            ),
        )
        return _job(
            conn.execute("SELECT * FROM jobs WHERE key = ?", (job.key,)).fetchone()
        )

    def claim(
        self,
        queue: str,
        owner: str,
        lease_seconds: float,
        *,
        now: float | None = None,
        skip_targets: frozenset[str] = frozenset(),
    ) -> Job | None:
        now = time.time() if now is None else now
        skip = sorted(skip_targets)
        marks = ", ".join("?" for _ in skip)
        skip_sql = f"AND target NOT IN ({marks})" if skip else ""
        with self._write() as conn:
            row = conn.execute(
                "SELECT id FROM jobs WHERE queue = ? AND ("  # noqa: S608
                "(state = 'ready' AND not_before <= ?) OR "
                f"(state = 'leased' AND lease_until < ?)) {skip_sql} "
                "ORDER BY not_before, id LIMIT 1",
                (queue, now, now, *skip),
            ).fetchone()
            if row is None:
                return None
            conn.execute(
                "UPDATE jobs SET state = 'leased', lease_owner = ?, lease_until = ?, "
                "updated_at = ? WHERE id = ?",
                (owner, now + lease_seconds, now, row["id"]),
            )
            return _job(
                conn.execute("SELECT * FROM jobs WHERE id = ?", (row["id"],)).fetchone()
            )

    def renew(self, job_id: int, owner: str, lease_seconds: float) -> bool:
        now = time.time()
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET lease_until = ?, updated_at = ? "
                "WHERE id = ? AND state = 'leased' AND lease_owner = ?",
                (now + lease_seconds, now, job_id, owner),
            )
            return cur.rowcount == 1

    def _finish(
        self,
        conn,
        job_id: int,
        owner: str,
        state: JobState,
        *,
        error: str | None = None,
        not_before: float | None = None,
        payload: dict | None = None,
        count_attempt: bool = False,
    ) -> bool:
        sets = ["state = ?", "lease_owner = ''", "lease_until = 0", "updated_at = ?"]
        args: list = [state.value, time.time()]
        if count_attempt:
            sets.append("attempts = attempts + 1")
        if error is not None:
            sets.append("last_error = ?")
            args.append(error[:2000])
        if not_before is not None:
            sets.append("not_before = ?")
            args.append(not_before)
        if payload is not None:
            sets.append("payload = ?")
            args.append(dumps(payload))
        cur = conn.execute(
            f"UPDATE jobs SET {', '.join(sets)} "  # noqa: S608 (fixed columns)
            "WHERE id = ? AND state = 'leased' AND lease_owner = ?",
            (*args, job_id, owner),
        )
        return cur.rowcount == 1

    def complete(
        self,
        job_id: int,
        owner: str,
        *,
        jobs: list[NewJob] = (),
        envelope: Envelope | None = None,
        envelope_state: tuple[str, str, str] | None = None,
        payload: dict | None = None,
        seen: tuple[str, str] | None = None,
    ) -> bool:
        with self._write() as conn:
            if not self._finish(conn, job_id, owner, JobState.DONE, payload=payload):
                return False
            if seen is not None:
                self._mark_seen(conn, *seen)
            if envelope is not None:
                self._put_envelope(conn, envelope)
            if envelope_state is not None:
                self._set_envelope_state(conn, *envelope_state)
            for job in jobs:
                self._enqueue(conn, job)
            return True

    def retry_later(
        self,
        job_id: int,
        owner: str,
        error: str,
        not_before: float,
        payload: dict | None = None,
    ) -> bool:
        with self._write() as conn:
            return self._finish(
                conn,
                job_id,
                owner,
                JobState.READY,
                error=error,
                not_before=not_before,
                payload=payload,
                count_attempt=True,
            )

    def dead_letter(
        self, job_id: int, owner: str, error: str, payload: dict | None = None
    ) -> bool:
        with self._write() as conn:
            return self._finish(
                conn,
                job_id,
                owner,
                JobState.DEAD,
                error=error,
                payload=payload,
                count_attempt=True,
            )

    def release(self, job_id: int, owner: str) -> bool:
        with self._write() as conn:
            return self._finish(conn, job_id, owner, JobState.READY)

    def requeue(self, job_id: int) -> bool:
        now = time.time()
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = 'ready', attempts = 0, not_before = ?, "
                "updated_at = ? WHERE id = ? AND state = 'dead'",
                (now, now, job_id),
            )
            return cur.rowcount == 1

    def get_job(self, job_id: int) -> Job | None:
        rows = self._read("SELECT * FROM jobs WHERE id = ?", (job_id,))
        return _job(rows[0]) if rows else None

    def list_jobs(
        self,
        *,
        queue: str | None = None,
        state: JobState | None = None,
        target: str | None = None,
        key_prefix: str | None = None,
        limit: int = 100,
    ) -> list[Job]:
        where, args = _filters(
            queue=queue, state=state and JobState(state).value, target=target
        )
        if key_prefix is not None:
            # substr, not LIKE: a key may hold '%' or '_'.
            where += (" AND " if where else "WHERE ") + "substr(key, 1, ?) = ?"
            args = (*args, len(key_prefix), key_prefix)
        rows = self._read(
            f"SELECT * FROM jobs {where} ORDER BY id LIMIT ?",  # noqa: S608
            (*args, limit),
        )
        return [_job(r) for r in rows]

    def job_counts(self) -> list[JobCount]:
        rows = self._read(
            "SELECT queue, target, state, COUNT(*) AS n, MIN(created_at) AS oldest "
            "FROM jobs GROUP BY queue, target, state"
        )
        return [
            JobCount(r["queue"], r["target"], JobState(r["state"]), r["n"], r["oldest"])
            for r in rows
        ]

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
            (StudyState.SEALED.value, before, *_DELIVERED, limit),
        )
        return [_study(r) for r in rows]

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
            (before, *_DELIVERED, limit),
        )
        return [_envelope(r) for r in rows]

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

    def close(self) -> None:
        with self._lock:
            for conn in self._connections:
                conn.close()
            self._connections.clear()
        self._local = threading.local()


def _filters(**columns) -> tuple[str, tuple]:
    """Build a WHERE clause from the given columns whose value is not None."""
    given = [(name, value) for name, value in columns.items() if value is not None]
    if not given:
        return "", ()
    where = " AND ".join(f"{name} = ?" for name, _ in given)
    return f"WHERE {where}", tuple(value for _, value in given)


def _study(row: sqlite3.Row) -> Study:
    return Study(
        ref=row["ref"],
        study_instance_uid=row["study_uid"],
        route=row["route"],
        generation=row["generation"],
        state=StudyState(row["state"]),
        instance_count=row["instance_count"],
        size_bytes=row["size_bytes"],
        first_received=row["first_received"],
        last_received=row["last_received"],
        seal_due=row["seal_due"],
        sealed_at=row["sealed_at"],
        seal_trigger=row["seal_trigger"],
        hold_reason=row["hold_reason"],
        calling_ae=row["calling_ae"],
    )


def _instance(row: sqlite3.Row) -> Instance:
    return Instance(
        sop_instance_uid=row["sop_uid"],
        study_instance_uid=row["study_uid"],
        series_instance_uid=row["series_uid"],
        sop_class_uid=row["sop_class_uid"],
        transfer_syntax_uid=row["transfer_syntax_uid"],
        digest=row["digest"],
        size_bytes=row["size_bytes"],
        spool_path=row["spool_path"],
        calling_ae=row["calling_ae"],
        modality=row["modality"],
        patient_id=row["patient_id"],
        received_at=row["received_at"],
        study_ref=row["study_ref"],
    )


def _envelope(row: sqlite3.Row) -> Envelope:
    return Envelope(
        id=row["id"],
        direction=row["direction"],
        peer=row["peer"],
        path=row["path"],
        size_bytes=row["size_bytes"],
        state=row["state"],
        study_ref=row["study_ref"],
        study_instance_uid=row["study_uid"],
        instance_count=row["instance_count"],
        reason=row["reason"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        details=json.loads(row["details"]),
    )


def _job(row: sqlite3.Row) -> Job:
    return Job(
        id=row["id"],
        queue=row["queue"],
        key=row["key"],
        target=row["target"],
        payload=json.loads(row["payload"]),
        state=JobState(row["state"]),
        attempts=row["attempts"],
        not_before=row["not_before"],
        created_at=row["created_at"],
        updated_at=row["updated_at"],
        lease_owner=row["lease_owner"],
        lease_until=row["lease_until"],
        last_error=row["last_error"],
    )
