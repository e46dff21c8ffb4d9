"""What the SQLite and PostgreSQL job queues do alike: ending a leased job.

A mixin of both stores' job classes. It relies on the store's ``_write``
transaction, its ``_mark`` (the driver's parameter placeholder), the
helpers that record a job's results: ``_enqueue``, ``_mark_seen``,
``_put_envelope`` and ``_set_envelope_state``, and ``_job_due``
(``_signals``), told of a job made ready again now. Claiming differs between
the two (SQLite's one writer, PostgreSQL's ``SKIP LOCKED``) and stays with each.
"""

import time

from bridge.store.base import Envelope, JobState, NewJob, dumps


class JobEndings:
    """Complete, retry, dead-letter or release a job its owner still holds."""

    _mark = "?"

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
        m, now = self._mark, time.time()
        sets = [
            f"state = {m}",
            f"updated_at = {m}",
            "lease_owner = ''",
            "lease_until = 0",
        ]
        args: list = [state.value, now]
        if count_attempt:
            sets.append("attempts = attempts + 1")
        if error is not None:
            sets.append(f"last_error = {m}")
            args.append(error[:2000])
        if not_before is not None:
            sets.append(f"not_before = {m}")
            args.append(not_before)
        if payload is not None:
            sets.append(f"payload = {m}")
            args.append(dumps(payload))
        cur = conn.execute(
            f"UPDATE jobs SET {', '.join(sets)} "  # noqa: S608 (fixed columns)
            f"WHERE id = {m} AND state = 'leased' AND lease_owner = {m}",
            (*args, job_id, owner),
        )
        if cur.rowcount != 1:
            return False
        if state == JobState.READY and (not_before is None or not_before <= now):
            self._due_again(conn, job_id)
        return True

    def _due_again(self, conn, job_id: int) -> None:
        """Tell the subscribers of a job's queue, once committed, that it is due."""
        row = conn.execute(
            f"SELECT queue FROM jobs WHERE id = {self._mark}",  # noqa: S608
            (job_id,),
        ).fetchone()
        self._job_due(row["queue"])

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

    def expire_leases(self) -> int:
        with self._write() as conn:
            cur = conn.execute("UPDATE jobs SET lease_until = 0 WHERE state = 'leased'")
            return cur.rowcount

    def release(self, job_id: int, owner: str) -> bool:
        with self._write() as conn:
            return self._finish(conn, job_id, owner, JobState.READY)
