"""The job queue of the PostgreSQL store, as a mixin of :class:`PostgresStore`.

Several bridge processes claim from one table: ``claim`` picks its row with
``FOR UPDATE SKIP LOCKED``, so a worker never waits on a job another worker is
taking and no job is leased twice. The rest mirrors ``_sqlite_jobs``; it relies
on the store's ``_write``/``_read`` transactions and envelope helpers.
"""

import time

from bridge.store._pg_connections import retried
from bridge.store._rows import filters
from bridge.store._rows import job as _job
from bridge.store.base import Envelope, Job, JobCount, JobState, NewJob, dumps


class PostgresJobs:
    """Enqueue, claim under a lease, complete, retry, dead-letter and list jobs."""

    # -- enqueue and claim --------------------------------------------------

    @retried
    def enqueue(self, job: NewJob) -> Job:
        with self._write() as conn:
            return self._enqueue(conn, job)

    @staticmethod
    def _enqueue(conn, job: NewJob) -> Job:
        now = time.time()
        # A concurrent insert of the same key makes this one wait for it and
        # then do nothing; the SELECT (a new snapshot) sees the winner's row.
        conn.execute(
            "INSERT INTO jobs (queue, key, target, payload, state, not_before, "
            "created_at, updated_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (key) DO NOTHING",
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
            conn.execute("SELECT * FROM jobs WHERE key = %s", (job.key,)).fetchone()
        )

    @retried
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
        with self._write() as conn:
            # SKIP LOCKED: a row another transaction is claiming right now is
            # passed over rather than waited for, and the next due one taken.
            row = conn.execute(
                "UPDATE jobs SET state = 'leased', lease_owner = %s, "
                "lease_until = %s, updated_at = %s WHERE id = ("
                "  SELECT id FROM jobs WHERE queue = %s AND ("
                "    (state = 'ready' AND not_before <= %s) OR "
                "    (state = 'leased' AND lease_until < %s)) "
                "  AND target <> ALL(%s::text[]) "
                "  ORDER BY not_before, id LIMIT 1 FOR UPDATE SKIP LOCKED) "
                "RETURNING *",
                (
                    owner,
                    now + lease_seconds,
                    now,
                    queue,
                    now,
                    now,
                    sorted(skip_targets),
                ),
            ).fetchone()
            return _job(row) if row else None

    @retried
    def renew(self, job_id: int, owner: str, lease_seconds: float) -> bool:
        now = time.time()
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET lease_until = %s, updated_at = %s "
                "WHERE id = %s AND state = 'leased' AND lease_owner = %s",
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
        sets = ["state = %s", "lease_owner = ''", "lease_until = 0", "updated_at = %s"]
        args: list = [state.value, time.time()]
        if count_attempt:
            sets.append("attempts = attempts + 1")
        if error is not None:
            sets.append("last_error = %s")
            args.append(error[:2000])
        if not_before is not None:
            sets.append("not_before = %s")
            args.append(not_before)
        if payload is not None:
            sets.append("payload = %s")
            args.append(dumps(payload))
        cur = conn.execute(
            f"UPDATE jobs SET {', '.join(sets)} "  # noqa: S608 (fixed columns)
            "WHERE id = %s AND state = 'leased' AND lease_owner = %s",
            (*args, job_id, owner),
        )
        return cur.rowcount == 1

    @retried
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

    @retried
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

    @retried
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

    @retried
    def release(self, job_id: int, owner: str) -> bool:
        with self._write() as conn:
            return self._finish(conn, job_id, owner, JobState.READY)

    @retried
    def requeue(self, job_id: int) -> bool:
        now = time.time()
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = 'ready', attempts = 0, not_before = %s, "
                "updated_at = %s WHERE id = %s AND state = 'dead'",
                (now, now, job_id),
            )
            return cur.rowcount == 1

    def get_job(self, job_id: int) -> Job | None:
        rows = self._read("SELECT * FROM jobs WHERE id = %s", (job_id,))
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
            "%s", queue=queue, state=state and JobState(state).value, target=target
        )
        if key_prefix is not None:
            # starts_with, not LIKE: a key may hold '%' or '_'.
            where += (" AND " if where else "WHERE ") + "starts_with(key, %s)"
            args = (*args, key_prefix)
        rows = self._read(
            f"SELECT * FROM jobs {where} ORDER BY id LIMIT %s",  # noqa: S608
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
