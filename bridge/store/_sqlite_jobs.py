"""The job queue of the SQLite store, as a mixin of :class:`SQLiteStore`.

It relies on the store's ``_write``/``_read`` transactions. Ending a leased
job (complete, retry, dead-letter, release) is shared with the PostgreSQL
store, in ``_jobs``; so is telling subscribers of a due job, in ``_signals``.
"""

import time

from bridge.store._jobs import JobEndings
from bridge.store._rows import filters
from bridge.store._rows import job as _job
from bridge.store._signals import EnqueueSignals
from bridge.store.base import Job, JobCount, JobState, NewJob, dumps


class SQLiteJobs(JobEndings, EnqueueSignals):
    """Enqueue, claim under a lease, complete, retry, dead-letter and list jobs."""

    # -- enqueue and claim --------------------------------------------------

    def enqueue(self, job: NewJob) -> Job:
        with self._write() as conn:
            return self._enqueue(conn, job)

    def _enqueue(self, conn, job: NewJob) -> Job:
        now = time.time()
        cur = conn.execute(
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
        if cur.rowcount == 1 and job.not_before <= now:
            self._job_due(job.queue)
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

    def requeue(self, job_id: int) -> bool:
        now = time.time()
        with self._write() as conn:
            cur = conn.execute(
                "UPDATE jobs SET state = 'ready', attempts = 0, not_before = ?, "
                "updated_at = ? WHERE id = ? AND state = 'dead'",
                (now, now, job_id),
            )
            if cur.rowcount != 1:
                return False
            self._due_again(conn, job_id)
            return True

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
