"""What the SQLite and PostgreSQL job queues do alike: ending a leased job.

A mixin of both stores' job classes. It relies on the store's ``_write``
transaction, its ``_mark`` (the driver's parameter placeholder), the
helpers that record a job's results: ``_enqueue``, ``_mark_seen`` and
``_put_envelope``, and ``_job_due``
(``_signals``), told of a job made ready again now. Claiming differs between
the two (SQLite's one writer, PostgreSQL's ``SKIP LOCKED``) and stays with each.
"""

import time

from bridge.store.base import Envelope, JobState, NewJob, dumps


class JobEndings:
    """Complete, retry, dead-letter or release a job its owner still holds."""

    _mark = "?"

    def _set_envelope_state(
        self,
        conn,
        envelope_id,
        direction,
        state,
        reason="",
        details=None,
        path=None,
        *,
        size_bytes=None,
        only_if=None,
    ) -> bool:
        """Update one envelope's state and the columns given, in ``conn``'s
        transaction; with ``only_if``, only from that state. Returns True when
        a row changed."""
        m = self._mark
        sets = [f"state = {m}", f"reason = {m}", f"updated_at = {m}"]
        args: list = [state, reason, time.time()]
        for column, value in (
            ("details", None if details is None else dumps(details)),
            ("path", path),
            ("size_bytes", size_bytes),
        ):
            if value is not None:
                sets.append(f"{column} = {m}")
                args.append(value)
        where = f"id = {m} AND direction = {m}"
        args += [envelope_id, direction]
        if only_if is not None:
            where += f" AND state = {m}"
            args.append(only_if)
        # Every column and condition is fixed here; values go as parameters.
        sql = f"UPDATE envelopes SET {', '.join(sets)} WHERE {where}"  # noqa: S608
        return conn.execute(sql, args).rowcount == 1

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
