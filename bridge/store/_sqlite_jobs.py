"""The job queue of the SQLite store, as a mixin of :class:`SQLiteStore`.

It relies on the store's ``_write``/``_read`` transactions and on its
envelope helpers for :meth:`complete`, which records a job's results in the
same transaction as its completion.
"""

import time

from bridge.store._rows import filters
from bridge.store._rows import job as _job
from bridge.store.base import Envelope, Job, JobCount, JobState, NewJob, dumps


class SQLiteJobs:
    """Enqueue, claim under a lease, complete, retry, dead-letter and list jobs."""

    # -- enqueue and claim --------------------------------------------------

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
        where, args = filters(
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
