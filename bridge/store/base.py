"""The state store: where every study, envelope and job of the bridge lives.

One interface, :class:`Store`, with an embedded SQLite implementation for one
machine (:mod:`bridge.store.sqlite`); a PostgreSQL implementation can fill the
same interface for several bridge processes sharing the work (see
``docs/architecture.md``). Blobs never go into the store: records name files in
the spool by paths relative to the spool root.

Every method is one transaction and safe to call from any thread. Times are
POSIX seconds (``time.time()``).

Jobs are the durable arrows of ``docs/architecture.md``: a worker *claims* a
ready job under a lease, then *completes* it, schedules a retry, or parks it in
dead-letter. A job whose lease expires (its worker died) is claimed again, so
every step must be idempotent. A job's ``key`` makes enqueueing idempotent.
"""

from __future__ import annotations

import abc
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any


class JobState(StrEnum):
    """Where a job is in its life."""

    READY = "ready"  # waiting for its not_before time and a worker
    LEASED = "leased"  # a worker holds it until lease_until
    DONE = "done"
    DEAD = "dead"  # gave up; visible to operators and re-sendable


class StudyState(StrEnum):
    """Where an assembled study is in its life."""

    OPEN = "open"  # instances may still arrive
    SEALED = "sealed"  # closed; seal jobs pack it for each peer
    HELD = "held"  # kept for an operator, with a reason; never sent as is


class DuplicatePolicy(StrEnum):
    """What to do with an instance whose SOP Instance UID is known with other bytes."""

    KEEP_NEWEST = "keep-newest"
    REJECT = "reject"


class InstanceOutcome(StrEnum):
    """What :meth:`Store.add_instance` did with an instance."""

    STORED = "stored"
    DUPLICATE = "duplicate"  # same UID, same bytes: nothing new stored
    REPLACED = "replaced"  # same UID, other bytes, keep-newest: this one wins
    CONFLICT = "conflict"  # same UID, other bytes, reject policy: refused


@dataclass(frozen=True)
class Instance:
    """One received DICOM instance, stored in the spool."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    digest: str  # lower-case hex SHA-256 of the file as stored
    size_bytes: int
    spool_path: str  # relative to the spool root
    calling_ae: str = ""
    modality: str = ""
    patient_id: str = ""
    received_at: float = 0.0
    study_ref: str = ""  # filled in by the store


@dataclass(frozen=True)
class Study:
    """A study assembled for one route; ``ref`` is its opaque reference.

    A study that receives instances after it was sealed continues as a new
    study with the same UID and route and ``generation`` one higher (a
    follow-up envelope).
    """

    ref: str
    study_instance_uid: str
    route: str
    generation: int
    state: StudyState
    instance_count: int
    size_bytes: int
    first_received: float
    last_received: float
    seal_due: float
    sealed_at: float | None = None
    seal_trigger: str = ""
    hold_reason: str = ""
    calling_ae: str = ""


@dataclass(frozen=True)
class AddResult:
    """What :meth:`Store.add_instance` did, and the study as it now stands."""

    outcome: InstanceOutcome
    study: Study
    previous: Instance | None = None


@dataclass(frozen=True)
class Envelope:
    """An envelope this node built (``direction='out'``) or received (``'in'``)."""

    id: str
    direction: str  # "out" or "in"
    peer: str  # the peer it goes to, or the sender it came from
    path: str  # relative to the spool root
    size_bytes: int
    state: str
    study_ref: str = ""
    study_instance_uid: str = ""
    instance_count: int = 0
    reason: str = ""
    created_at: float = 0.0
    updated_at: float = 0.0
    details: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Job:
    """A durable unit of work claimed by one worker at a time."""

    id: int
    queue: str
    key: str
    target: str  # the peer or destination it concerns, "" when none
    payload: dict[str, Any]
    state: JobState
    attempts: int
    not_before: float
    created_at: float
    updated_at: float
    lease_owner: str = ""
    lease_until: float = 0.0
    last_error: str = ""


@dataclass(frozen=True)
class NewJob:
    """A job to enqueue, alone or as the follow-up of a completed one."""

    queue: str
    key: str
    payload: dict[str, Any] = field(default_factory=dict)
    target: str = ""
    not_before: float = 0.0


@dataclass(frozen=True)
class JobCount:
    """How many jobs of one queue, target and state there are."""

    queue: str
    target: str
    state: JobState
    count: int
    oldest_created: float


def dumps(value: dict[str, Any]) -> str:
    """Serialise a payload or details dict the same way in every implementation."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


class Store(abc.ABC):
    """The interface every state store implements; see the module docstring."""

    # -- studies and instances ------------------------------------------------

    @abc.abstractmethod
    def add_instance(
        self,
        inst: Instance,
        *,
        route: str,
        quiet_seconds: float,
        max_age_seconds: float,
        duplicates: DuplicatePolicy,
    ) -> AddResult:
        """Record a received instance in the open study of its UID and route.

        Opens the study (or a follow-up generation when the last one is sealed)
        when needed and moves its seal deadline to
        ``min(last_received + quiet_seconds, first_received + max_age_seconds)``.
        An instance already sent in a sealed generation with the same digest is
        a DUPLICATE; with other bytes it goes into the follow-up study (the
        receiver merges by SOP Instance UID). With DUPLICATE or CONFLICT nothing
        is recorded; with REPLACED, ``previous`` is the record it displaced.
        """

    @abc.abstractmethod
    def find_instance(
        self, study_instance_uid: str, route: str, sop_instance_uid: str
    ) -> Instance | None:
        """Return the newest record of a SOP instance for a study and route."""

    @abc.abstractmethod
    def study_instances(self, ref: str) -> list[Instance]:
        """Return every instance of a study, in arrival order."""

    @abc.abstractmethod
    def get_study(self, ref: str) -> Study | None:
        """Return a study by its opaque reference."""

    @abc.abstractmethod
    def due_studies(self, now: float) -> list[Study]:
        """Return open studies whose seal deadline has passed."""

    @abc.abstractmethod
    def open_studies(self) -> list[Study]:
        """Return every open study (for timers after a restart and for metrics)."""

    @abc.abstractmethod
    def seal_study(self, ref: str, trigger: str, jobs: list[NewJob]) -> bool:
        """Seal an open study and enqueue ``jobs`` in the same transaction.

        Returns False, changing nothing, when the study is not open.
        """

    @abc.abstractmethod
    def hold_study(self, ref: str, reason: str) -> None:
        """Keep a study back for an operator, with the reason."""

    @abc.abstractmethod
    def recent_studies(self, limit: int = 50) -> list[Study]:
        """Return the most recently active studies, newest first."""

    # -- envelopes ------------------------------------------------------------

    @abc.abstractmethod
    def put_envelope(self, env: Envelope, jobs: list[NewJob] = ()) -> bool:
        """Record an envelope and enqueue ``jobs`` in one transaction.

        Returns False, changing nothing, when an envelope with the same id and
        direction exists already.
        """

    @abc.abstractmethod
    def get_envelope(self, envelope_id: str, direction: str) -> Envelope | None:
        """Return an envelope record."""

    @abc.abstractmethod
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
        """Change an envelope's state (and optionally reason, details, path and
        size), enqueueing ``jobs`` in the same transaction.

        With ``only_if``, nothing changes and no job is enqueued unless the
        envelope is in that state now. Returns True when the record changed
        (False also for an unknown envelope, whose jobs are still enqueued when
        ``only_if`` is not given).
        """

    @abc.abstractmethod
    def find_envelopes(
        self,
        *,
        direction: str | None = None,
        state: str | None = None,
        study_instance_uid: str | None = None,
        limit: int = 100,
    ) -> list[Envelope]:
        """Return envelopes matching every given filter, newest first."""

    @abc.abstractmethod
    def mark_seen(self, envelope_id: str, sender: str) -> bool:
        """Record an accepted envelope id; False when it was seen before."""

    @abc.abstractmethod
    def is_seen(self, envelope_id: str) -> bool:
        """Return True when an envelope with this id was accepted before."""

    @abc.abstractmethod
    def record_commitment(
        self,
        transaction_uid: str,
        envelope_id: str,
        destination: str,
        state: str,
        failed: int = 0,
    ) -> None:
        """Record a storage commitment transaction of a received envelope.

        Also shows it in the envelope's ``details["storage_commitment"]``, in
        the same transaction. ``state`` is requested, committed, failed or
        unsupported; ``failed`` counts the instances the PACS did not commit.
        """

    @abc.abstractmethod
    def find_commitment(self, transaction_uid: str) -> tuple[str, str] | None:
        """Return ``(envelope_id, destination)`` of a commitment transaction."""

    # -- jobs -----------------------------------------------------------------

    @abc.abstractmethod
    def enqueue(self, job: NewJob) -> Job:
        """Add a ready job, or return the existing job with the same key."""

    @abc.abstractmethod
    def subscribe(self, queue: str, callback: Callable[[], None]) -> None:
        """Call ``callback()`` whenever a job of ``queue`` becomes due in this
        process, after the transaction that made it due commits.

        A job becomes due when any method adds it with a ``not_before`` that
        has passed (:meth:`enqueue`, and the ``jobs`` of :meth:`seal_study`,
        :meth:`put_envelope`, :meth:`set_envelope_state` and :meth:`complete`)
        or makes it ready now again (:meth:`requeue`, :meth:`release`, and
        :meth:`retry_later` with a ``not_before`` that has passed). A job due
        later, a key already known, a rolled-back transaction and other
        processes sharing the store call no one: workers poll for those.
        ``callback`` runs on the committing thread once its connection is free,
        so it should be quick (set an event); an exception it raises is logged
        and dropped.
        """

    @abc.abstractmethod
    def unsubscribe(self, queue: str, callback: Callable[[], None]) -> None:
        """Stop calling a callback given to :meth:`subscribe`; unknown ones are
        ignored."""

    @abc.abstractmethod
    def claim(
        self,
        queue: str,
        owner: str,
        lease_seconds: float,
        *,
        now: float | None = None,
        skip_targets: frozenset[str] = frozenset(),
    ) -> Job | None:
        """Lease the oldest due job of ``queue`` to ``owner``, or return None.

        A job is due when it is ready and its ``not_before`` has passed, or when
        it is leased and its lease has expired. Jobs whose target is in
        ``skip_targets`` (an open circuit breaker) are left for later.
        """

    @abc.abstractmethod
    def renew(self, job_id: int, owner: str, lease_seconds: float) -> bool:
        """Extend a lease still held by ``owner``; False when it was lost."""

    @abc.abstractmethod
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
        """Mark a job done and, in the same transaction, record its results.

        ``jobs`` are enqueued, ``envelope`` is recorded (as :meth:`put_envelope`),
        ``envelope_state`` is ``(envelope_id, direction, state)`` to set,
        ``payload`` replaces the job's payload, and ``seen`` is an
        ``(envelope_id, sender)`` to record as accepted (as :meth:`mark_seen`).
        Returns False, changing nothing, when ``owner`` no longer holds the lease.
        """

    @abc.abstractmethod
    def retry_later(
        self,
        job_id: int,
        owner: str,
        error: str,
        not_before: float,
        payload: dict | None = None,
    ) -> bool:
        """Count a failed attempt and make the job ready again at ``not_before``."""

    @abc.abstractmethod
    def dead_letter(
        self, job_id: int, owner: str, error: str, payload: dict | None = None
    ) -> bool:
        """Count a failed attempt and park the job in dead-letter."""

    @abc.abstractmethod
    def release(self, job_id: int, owner: str) -> bool:
        """Give a leased job back without counting an attempt (clean shutdown)."""

    @abc.abstractmethod
    def expire_leases(self) -> int:
        """End every lease now, so the leased jobs can be claimed again.

        Only for a store that one process uses alone, at its start: every lease
        then belongs to a process that died. Returns how many jobs it freed.
        """

    @abc.abstractmethod
    def requeue(self, job_id: int) -> bool:
        """Make a dead-lettered job ready now with its attempts reset (operator)."""

    @abc.abstractmethod
    def get_job(self, job_id: int) -> Job | None:
        """Return a job by id."""

    @abc.abstractmethod
    def list_jobs(
        self,
        *,
        queue: str | None = None,
        state: JobState | None = None,
        target: str | None = None,
        key_prefix: str | None = None,
        limit: int = 100,
    ) -> list[Job]:
        """Return jobs matching every given filter, oldest first.

        ``key_prefix`` selects the jobs whose key starts with it (for example
        every forward job of one envelope).
        """

    @abc.abstractmethod
    def job_counts(self) -> list[JobCount]:
        """Return job counts by queue, target and state (for metrics)."""

    # -- retention ------------------------------------------------------------

    @abc.abstractmethod
    def purgeable_studies(self, before: float, limit: int = 100) -> list[Study]:
        """Return sealed studies, sealed before ``before`` and not yet purged,
        whose every envelope was delivered and whose seal jobs are all done."""

    @abc.abstractmethod
    def exclusive_spool_paths(self, ref: str) -> list[str]:
        """Return the spool files of a study that no other unpurged study uses."""

    @abc.abstractmethod
    def mark_study_purged(self, ref: str) -> None:
        """Record that a study's spool files are gone (its records stay)."""

    @abc.abstractmethod
    def purgeable_envelopes(self, before: float, limit: int = 100) -> list[Envelope]:
        """Return envelopes whose files may go: outgoing ones delivered (or
        arrived), incoming ones opened with every forward job done, unchanged
        since before ``before`` and not yet purged. Quarantine is never listed."""

    @abc.abstractmethod
    def mark_envelope_purged(self, envelope_id: str, direction: str) -> None:
        """Record that an envelope's spool files are gone (its record stays)."""

    @abc.abstractmethod
    def spool_path_used(self, rel: str) -> bool:
        """Return True when an instance record names this spool file."""

    # -- health ---------------------------------------------------------------

    @abc.abstractmethod
    def check_writable(self) -> None:
        """Raise StoreError unless a write transaction can commit now."""

    @abc.abstractmethod
    def close(self) -> None:
        """Release the store's connections."""
