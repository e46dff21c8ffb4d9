"""The job queue of the PostgreSQL store, as a mixin of :class:`PostgresStore`.

Several bridge processes claim from one table: ``claim`` picks its row with
``FOR UPDATE SKIP LOCKED``, so a worker never waits on a job another worker is
taking and no job is leased twice. The rest mirrors ``_sqlite_jobs``, and
ending a leased job is shared with it (``_jobs``), as is telling subscribers
of a due job (``_signals``); it relies on the store's ``_write``/``_read``
transactions.
"""

import time

from bridge.store._jobs import JobEndings
from bridge.store._pg_connections import retried
from bridge.store._rows import filters
from bridge.store._rows import job as _job
from bridge.store._signals import EnqueueSignals
from bridge.store.base import Job, JobCount, JobState, NewJob, dumps


class PostgresJobs(JobEndings, EnqueueSignals):
    """Enqueue, claim under a lease, complete, retry, dead-letter and list jobs."""

    _mark = "%s"

    # -- enqueue and claim --------------------------------------------------

    @retried
    def enqueue(self, job: NewJob) -> Job:
        with self._write() as conn:
            return self._enqueue(conn, job)

    def _enqueue(self, conn, job: NewJob) -> Job:
        now = time.time()
        # A concurrent insert of the same key makes this one wait for it and
        # then do nothing; the SELECT (a new snapshot) sees the winner's row.
        cur = conn.execute(
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
        if cur.rowcount == 1 and job.not_before <= now:
            self._job_due(job.queue)
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

    # Ending a job is shared with SQLite; here each runs again on a deadlock.
    complete = retried(JobEndings.complete)
    retry_later = retried(JobEndings.retry_later)
    dead_letter = retried(JobEndings.dead_letter)
    release = retried(JobEndings.release)

    @retried
    def requeue(self, job_id: int) -> bool:
        now = time.time()
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = 'ready', attempts = 0, not_before = %s, "
                "updated_at = %s WHERE id = %s AND state = 'dead'",
                (now, now, job_id),
            )
            if cur.rowcount != 1:
                return False
            self._due_again(conn, job_id)
            return True

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
