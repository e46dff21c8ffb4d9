"""The shared state store: PostgreSQL, for several bridge processes on several
machines working from one database (``docs/postgres.md``).

Each method is one transaction on a connection from a pool (thread-safe), at
PostgreSQL's default READ COMMITTED isolation; a commit is durable when the call
returns (the server's ``synchronous_commit`` default). Where two processes
could interleave, the method takes the lock that SQLite's one writer gave for
free:

- ``claim`` selects its job ``FOR UPDATE SKIP LOCKED`` (in ``_pg_jobs``);
- ``add_instance`` takes a transaction-scoped advisory lock on the study's
  UID and route, so a study arriving over associations on several machines
  is assembled once, then locks the open study row so a seal cannot slip in;
- ``enqueue``, ``put_envelope`` and ``mark_seen`` insert ``ON CONFLICT DO
  NOTHING``, so the second of two racing inserts waits and then does nothing.

A transaction that PostgreSQL aborts as a deadlock is run again, whole, a few
times (``_pg_connections.retried``). psycopg's errors become
:class:`StoreError` in ``_pg_connections`` and nowhere else.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterator
from contextlib import contextmanager

import psycopg

from bridge.errors import StoreError
from bridge.store import _rows
from bridge.store._pg_connections import Connections, retried
from bridge.store._pg_jobs import PostgresJobs
from bridge.store._pg_schema import SCHEMA_VERSION, prepare
from bridge.store._rules import (
    DELIVERED,
    judge_instance,
    new_study_ref,
    with_commitment,
)
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


class PostgresStore(PostgresJobs, Store):
    """The state store in a PostgreSQL database; see the module docstring.

    ``url`` is a libpq URL (``postgresql://user@host:port/dbname``); keep the
    password out of it (``PGPASSWORD`` or a ``passfile``). Opening connects,
    creates the tables when the database has none, and raises StoreError when
    the server cannot be reached within ``timeout`` seconds or its schema is
    newer than this bridge reads. Each process holds up to ``max_connections``
    connections; a call waits up to ``timeout`` seconds for a free one.
    """

    def __init__(
        self,
        url: str,
        *,
        min_connections: int = 1,
        max_connections: int = 10,
        timeout: float = 30.0,
    ):
        self._init_signals()
        self._db = Connections(
            url, min_size=min_connections, max_size=max_connections, timeout=timeout
        )
        self.url = self._db.shown
        newer = self._db.open(prepare)
        if newer is not None:
            self._db.close()
            raise StoreError(
                f"{self.url}: schema version {newer}, this bridge "
                f"reads version {SCHEMA_VERSION}"
            )

    def __repr__(self) -> str:
        return f"PostgresStore({self.url!r})"

    # -- transactions ---------------------------------------------------------------

    @contextmanager
    def _write(self) -> Iterator[psycopg.Connection]:
        # The connection's transaction commits, and the connection goes back
        # to the pool, before the queues' subscribers hear of their jobs.
        with self._signalled(), self._db.write() as conn:
            yield conn

    def _read(self, sql: str, args: tuple = ()) -> list[dict]:
        return self._db.read(sql, args)

    # -- studies and instances -------------------------------------------------

    @retried
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
            # One transaction at a time per study and route, in every process.
            # Two int4 keys (hashtext of each) rather than one hash of the
            # concatenation; a hash collision only serialises two studies.
            conn.execute(
                "SELECT pg_advisory_xact_lock(hashtext(%s), hashtext(%s))",
                (inst.study_instance_uid, route),
            )
            # Locked, so that seal_study (which does not take the advisory
            # lock) waits until this instance is in or sees it sealed first.
            row = conn.execute(
                "SELECT * FROM studies WHERE study_uid = %s AND route = %s "
                "AND state = %s ORDER BY generation DESC LIMIT 1 FOR UPDATE",
                (inst.study_instance_uid, route, StudyState.OPEN.value),
            ).fetchone()
            study = _rows.study(row) if row else None
            known = conn.execute(
                "SELECT i.*, s.state AS study_state FROM instances i "
                "JOIN studies s ON s.ref = i.study_ref "
                "WHERE i.study_uid = %s AND s.route = %s AND i.sop_uid = %s "
                "ORDER BY s.generation DESC LIMIT 1",
                (inst.study_instance_uid, route, inst.sop_instance_uid),
            ).fetchone()

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
                conn.execute("DELETE FROM instances WHERE id = %s", (known["id"],))
                conn.execute(
                    "UPDATE studies SET instance_count = instance_count - 1, "
                    "size_bytes = size_bytes - %s WHERE ref = %s",
                    (known["size_bytes"], known["study_ref"]),
                )

            ref = study.ref if study else self._create_study(conn, inst, route, now)
            conn.execute(
                "INSERT INTO instances (study_ref, sop_uid, study_uid, series_uid, "
                "sop_class_uid, transfer_syntax_uid, digest, size_bytes, spool_path, "
                "calling_ae, modality, patient_id, received_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
                (
                    ref,
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
            row = conn.execute(
                "UPDATE studies SET instance_count = instance_count + 1, "
                "size_bytes = size_bytes + %s, last_received = %s, "
                "seal_due = LEAST(%s + %s, first_received + %s) WHERE ref = %s "
                "RETURNING *",
                (inst.size_bytes, now, now, quiet_seconds, max_age_seconds, ref),
            ).fetchone()
            return AddResult(outcome, _rows.study(row), previous)

    @staticmethod
    def _create_study(conn, inst: Instance, route: str, now: float) -> str:
        # The seal deadline is set by the caller's update that counts the
        # first instance in.
        ref = new_study_ref()
        conn.execute(
            "INSERT INTO studies (ref, study_uid, route, generation, state, "
            "first_received, last_received, seal_due, calling_ae) "
            "SELECT %s, %s, %s, COALESCE(MAX(generation) + 1, 0), %s, %s, %s, %s, %s "
            "FROM studies WHERE study_uid = %s AND route = %s",
            (
                ref,
                inst.study_instance_uid,
                route,
                StudyState.OPEN.value,
                now,
                now,
                now,
                inst.calling_ae,
                inst.study_instance_uid,
                route,
            ),
        )
        return ref

    @staticmethod
    def _study_row(conn, ref: str) -> Study:
        return _rows.study(
            conn.execute("SELECT * FROM studies WHERE ref = %s", (ref,)).fetchone()
        )

    def find_instance(
        self, study_instance_uid: str, route: str, sop_instance_uid: str
    ) -> Instance | None:
        rows = self._read(
            "SELECT i.* FROM instances i JOIN studies s ON s.ref = i.study_ref "
            "WHERE i.study_uid = %s AND s.route = %s AND i.sop_uid = %s "
            "ORDER BY s.generation DESC LIMIT 1",
            (study_instance_uid, route, sop_instance_uid),
        )
        return _rows.instance(rows[0]) if rows else None

    def study_instances(self, ref: str) -> list[Instance]:
        rows = self._read(
            "SELECT * FROM instances WHERE study_ref = %s ORDER BY id", (ref,)
        )
        return [_rows.instance(r) for r in rows]

    def get_study(self, ref: str) -> Study | None:
        rows = self._read("SELECT * FROM studies WHERE ref = %s", (ref,))
        return _rows.study(rows[0]) if rows else None

    def due_studies(self, now: float) -> list[Study]:
        rows = self._read(
            "SELECT * FROM studies WHERE state = %s AND seal_due <= %s "
            "ORDER BY seal_due",
            (StudyState.OPEN.value, now),
        )
        return [_rows.study(r) for r in rows]

    def open_studies(self) -> list[Study]:
        rows = self._read(
            "SELECT * FROM studies WHERE state = %s ORDER BY seal_due",
            (StudyState.OPEN.value,),
        )
        return [_rows.study(r) for r in rows]

    @retried
    def seal_study(self, ref: str, trigger: str, jobs: list[NewJob]) -> bool:
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE studies SET state = %s, sealed_at = %s, seal_trigger = %s "
                "WHERE ref = %s AND state = %s",
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

    @retried
    def hold_study(self, ref: str, reason: str) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE studies SET state = %s, hold_reason = %s WHERE ref = %s",
                (StudyState.HELD.value, reason, ref),
            )

    def recent_studies(self, limit: int = 50) -> list[Study]:
        rows = self._read(
            "SELECT * FROM studies ORDER BY last_received DESC LIMIT %s", (limit,)
        )
        return [_rows.study(r) for r in rows]

    # -- envelopes --------------------------------------------------------------

    @retried
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
            "INSERT INTO envelopes (id, direction, peer, path, size_bytes, state, "
            "study_ref, study_uid, instance_count, reason, details, created_at, "
            "updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (id, direction) DO NOTHING",
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
            "SELECT * FROM envelopes WHERE id = %s AND direction = %s",
            (envelope_id, direction),
        )
        return _rows.envelope(rows[0]) if rows else None

    @retried
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
            "%s", direction=direction, state=state, study_uid=study_instance_uid
        )
        rows = self._read(
            f"SELECT * FROM envelopes {where} "  # noqa: S608 (fixed columns)
            "ORDER BY created_at DESC LIMIT %s",
            (*args, limit),
        )
        return [_rows.envelope(r) for r in rows]

    @retried
    def mark_seen(self, envelope_id: str, sender: str) -> bool:
        with self._write() as conn:
            return self._mark_seen(conn, envelope_id, sender)

    @staticmethod
    def _mark_seen(conn, envelope_id: str, sender: str) -> bool:
        cur = conn.execute(
            "INSERT INTO seen_envelopes VALUES (%s, %s, %s) "
            "ON CONFLICT (id) DO NOTHING",
            (envelope_id, sender, time.time()),
        )
        return cur.rowcount == 1

    def is_seen(self, envelope_id: str) -> bool:
        return bool(
            self._read("SELECT 1 FROM seen_envelopes WHERE id = %s", (envelope_id,))
        )

    # -- storage commitment ---------------------------------------------------------

    @retried
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
                "INSERT INTO commitments VALUES (%s, %s, %s, %s, %s, %s) "
                "ON CONFLICT (transaction_uid) DO UPDATE SET state = excluded.state, "
                "failed = excluded.failed, updated_at = excluded.updated_at",
                (transaction_uid, envelope_id, destination, state, failed, now),
            )
            # Locked: two destinations' reports for one envelope each merge
            # into the details the other left, not into a stale copy.
            row = conn.execute(
                "SELECT details FROM envelopes WHERE id = %s AND direction = 'in' "
                "FOR UPDATE",
                (envelope_id,),
            ).fetchone()
            if row is None:
                return
            details = with_commitment(
                json.loads(row["details"]), transaction_uid, destination, state, failed
            )
            conn.execute(
                "UPDATE envelopes SET details = %s, updated_at = %s "
                "WHERE id = %s AND direction = 'in'",
                (dumps(details), now, envelope_id),
            )

    def find_commitment(self, transaction_uid: str) -> tuple[str, str] | None:
        rows = self._read(
            "SELECT envelope_id, destination FROM commitments "
            "WHERE transaction_uid = %s",
            (transaction_uid,),
        )
        return (rows[0]["envelope_id"], rows[0]["destination"]) if rows else None

    # -- retention ----------------------------------------------------------------

    def purgeable_studies(self, before: float, limit: int = 100) -> list[Study]:
        rows = self._read(
            "SELECT s.* FROM studies s WHERE s.state = %s AND s.purged_at IS NULL "
            "AND s.sealed_at < %s "
            "AND EXISTS (SELECT 1 FROM envelopes e WHERE e.direction = 'out' "
            "  AND e.study_ref = s.ref) "
            "AND NOT EXISTS (SELECT 1 FROM envelopes e WHERE e.direction = 'out' "
            "  AND e.study_ref = s.ref AND e.state NOT IN (%s, %s)) "
            "AND NOT EXISTS (SELECT 1 FROM jobs j WHERE j.queue = 'seal' "
            "  AND starts_with(j.key, 'seal:' || s.ref || ':') "
            "  AND j.state != 'done') "
            "ORDER BY s.sealed_at LIMIT %s",
            (StudyState.SEALED.value, before, *DELIVERED, limit),
        )
        return [_rows.study(r) for r in rows]

    def exclusive_spool_paths(self, ref: str) -> list[str]:
        rows = self._read(
            "SELECT DISTINCT i.spool_path FROM instances i WHERE i.study_ref = %s "
            "AND NOT EXISTS (SELECT 1 FROM instances o JOIN studies s "
            "  ON s.ref = o.study_ref WHERE o.spool_path = i.spool_path "
            "  AND o.study_ref != i.study_ref AND s.purged_at IS NULL)",
            (ref,),
        )
        return [r["spool_path"] for r in rows]

    @retried
    def mark_study_purged(self, ref: str) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE studies SET purged_at = %s WHERE ref = %s", (time.time(), ref)
            )

    def purgeable_envelopes(self, before: float, limit: int = 100) -> list[Envelope]:
        rows = self._read(
            "SELECT e.* FROM envelopes e WHERE e.purged_at IS NULL "
            "AND e.updated_at < %s AND ("
            "  (e.direction = 'out' AND e.state IN (%s, %s)) OR "
            "  (e.direction = 'in' AND e.state = 'opened' AND NOT EXISTS ("
            "    SELECT 1 FROM jobs j WHERE j.queue = 'forward' "
            "    AND starts_with(j.key, 'forward:' || e.id || ':') "
            "    AND j.state != 'done'))) "
            "ORDER BY e.updated_at LIMIT %s",
            (before, *DELIVERED, limit),
        )
        return [_rows.envelope(r) for r in rows]

    @retried
    def mark_envelope_purged(self, envelope_id: str, direction: str) -> None:
        with self._write() as conn:
            conn.execute(
                "UPDATE envelopes SET purged_at = %s WHERE id = %s AND direction = %s",
                (time.time(), envelope_id, direction),
            )

    def spool_path_used(self, rel: str) -> bool:
        return bool(
            self._read("SELECT 1 FROM instances WHERE spool_path = %s LIMIT 1", (rel,))
        )

    # -- health -----------------------------------------------------------------

    def check_writable(self) -> None:
        with self._write() as conn:
            conn.execute(
                "INSERT INTO meta VALUES ('last_health_check', %s) "
                "ON CONFLICT (name) DO UPDATE SET value = excluded.value",
                (str(time.time()),),
            )

    def close(self) -> None:
        self._db.close()
