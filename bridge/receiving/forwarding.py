"""The forward job: store an opened envelope's instances into one local PACS.

One job per envelope and destination. Its payload keeps the instances that
remain (paths relative to the opened folder), those refused for good with
their reasons, and how many were delivered, so that a retry sends only what
remains. The store records that payload only when a run ends; within a run,
each instance's answer goes at once to the envelope's progress log for the
destination (:mod:`bridge.receiving.progress`), which the next run reads first,
so that after a crash only the instance in flight (sent, its answer not yet
noted) is sent twice (README L-32). A run stops sending when its lease was
lost (another owner has the job).

When every instance that can be delivered is, the instances refused for good
stay behind in the job, which goes to dead-letter with the reasons: an operator
sees them and can send them again. Storage commitment results are recorded in
the envelope's details; a run's request also names the instances an earlier,
interrupted run delivered. With a node identity and signing key, a signed
``forwarded`` entry (destination and instance count) is appended to this
node's copy of the envelope's audit when a destination has every instance.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.dicom.forwarder import Destination, ForwardResult, forward
from bridge.dicom.forwarder import Outcome as InstanceOutcome
from bridge.errors import EnvelopeError, SpoolError
from bridge.jmix import Entity
from bridge.jmix.audit import FORWARDED, append_audit, forwarded_to, update_stored_audit
from bridge.receiving.progress import DELIVERED, PERMANENT, Answer, ProgressLog
from bridge.spool import Spool, validate_envelope_id
from bridge.store import Job, NewJob, Store
from bridge.workers.base import JobContext, Outcome

logger = logging.getLogger(__name__)

ResultHook = Callable[[str, ForwardResult], None]  # (destination, result)


class Forwarder:
    """The ``forward`` job handler; see the module docstring."""

    def __init__(
        self,
        store: Store,
        spool: Spool,
        destinations: dict[str, Destination],
        on_result: ResultHook | None = None,
        receipts: bool = True,
        node: Entity | None = None,
        signing_key: Ed25519PrivateKey | None = None,
    ):
        self.node = node
        self.signing_key = signing_key
        self.store = store
        self.spool = spool
        self.destinations = destinations
        self.on_result = on_result or (lambda name, result: None)
        self.receipts = receipts

    def __call__(self, job: Job, ctx: JobContext) -> Outcome:
        """Send what remains of the job's instances; see the module docstring."""
        env_id = validate_envelope_id(job.payload["envelope_id"])
        dest = self.destinations.get(job.target)
        if dest is None:
            return Outcome.dead(
                f"destination {job.target!r} is not configured", target_failed=False
            )
        base = self.spool.envelope_path("opened", env_id)
        remaining = list(job.payload.get("remaining", []))
        failed = dict(job.payload.get("failed", {}))
        delivered = int(job.payload.get("delivered", 0))
        resend = not remaining and bool(failed)
        if resend:
            # An operator re-sent a dead-lettered job: try the refused ones again.
            remaining, failed = sorted(failed), {}
        log = ProgressLog(base, dest.name)
        remaining, earlier = _leave_out_answered(
            remaining, failed, self._read(log, env_id, dest.name), resend
        )
        delivered += len(earlier)

        try:
            note = self._open(log, env_id, dest.name, resend, remaining)
            result = forward(
                dest,
                [base / rel for rel in remaining],
                on_commitment_requested=lambda uid: self.store.record_commitment(
                    uid, env_id, dest.name, "requested"
                ),
                on_instance=note,
                stop=ctx.lease_lost,
                also_commit=earlier,
            )
        finally:
            log.close()
        self.on_result(dest.name, result)

        retry, reasons = [], []
        for rel, inst in zip(remaining, result.instances, strict=True):
            if inst.outcome is InstanceOutcome.DELIVERED:
                delivered += 1
            elif inst.outcome is InstanceOutcome.RETRYABLE:
                retry.append(rel)
                reasons.append(inst.reason)
            else:
                failed[rel] = inst.reason
        payload = {
            **job.payload,
            "remaining": retry,
            "failed": failed,
            "delivered": delivered,
        }
        if result.commitment is not None:
            self._record_commitment(env_id, dest.name, result)

        if retry:
            return Outcome.retry(
                f"{len(retry)} instances not stored yet: {reasons[0]}", payload=payload
            )
        if failed:
            first = next(iter(failed.values()))
            return Outcome.dead(
                f"{len(failed)} instances refused by {dest.name}: {first}",
                payload={**payload, "remaining": []},
                target_failed=False,
            )
        logger.info(
            "envelope forwarded envelope=%s dest=%s instances=%d",
            env_id,
            dest.name,
            delivered,
        )
        self._audit(env_id, dest.name, delivered)
        jobs = []
        if self.receipts and job.payload.get("sender"):
            jobs.append(
                NewJob(
                    "receipt",
                    f"receipt:{env_id}:{dest.name}",
                    payload={"envelope_id": env_id, "sender": job.payload["sender"]},
                )
            )
        return Outcome.done(payload=payload, jobs=jobs)

    def _read(self, log: ProgressLog, env_id: str, dest: str) -> dict[str, Answer]:
        """Return what the progress log holds; nothing when it cannot be read."""
        try:
            return log.read()
        except OSError as exc:
            # Without the log, instances already answered are sent again: a
            # repeat, never a loss.
            logger.warning(
                "progress log not read envelope=%s dest=%s error=%s",
                env_id,
                dest,
                type(exc).__name__,
            )
            return {}

    def _open(
        self,
        log: ProgressLog,
        env_id: str,
        dest: str,
        resend: bool,
        remaining: list[str],
    ):
        """Open ``log`` and return the hook that notes each final answer in it,
        or None when it cannot be opened (the forward goes on unrecorded)."""
        try:
            log.open()
            if resend:
                log.note_resend()
        except OSError as exc:
            logger.warning(
                "progress log not opened envelope=%s dest=%s error=%s",
                env_id,
                dest,
                type(exc).__name__,
            )
            return None

        def note(index: int, inst, sop_class: str) -> None:
            if inst.outcome is InstanceOutcome.DELIVERED:
                answer = Answer(
                    DELIVERED, sop_class=sop_class, sop_instance=inst.sop_instance_uid
                )
            elif inst.outcome is InstanceOutcome.PERMANENT:
                answer = Answer(PERMANENT, inst.reason)
            else:
                return
            log.note(remaining[index], answer)

        return note

    def _audit(self, env_id: str, destination: str, delivered: int) -> None:
        """Append a signed ``forwarded`` entry to this node's copy of the audit."""
        env = self.store.get_envelope(env_id, "in")
        if self.node is None or self.signing_key is None or env is None:
            return
        try:
            update_stored_audit(
                self.spool.path_of(env.path),
                lambda doc: append_audit(
                    doc,
                    FORWARDED,
                    by=self.node,
                    to=forwarded_to(destination, delivered),
                    key=self.signing_key,
                    envelope_id=env_id,
                ),
            )
        except (OSError, EnvelopeError, SpoolError) as exc:
            # The audit is a record, not a gate: the delivery stands.
            logger.warning(
                "audit not updated envelope=%s dest=%s error=%s",
                env_id,
                destination,
                type(exc).__name__,
            )

    def _record_commitment(self, env_id: str, dest: str, result: ForwardResult) -> None:
        """Record the storage commitment of one forward call (PS3.4 Annex J).

        The transaction went into the store's commitment table as
        ``requested`` just before its N-ACTION was sent, where the listener's
        :class:`~bridge.dicom.commitment.CommitmentReports` finds the PACS's
        report, which may come on its own association before :func:`forward`
        returns. So ``requested`` is not written again (it would undo such a
        report); an answer on our own association or a refused N-ACTION is.
        An outcome without a transaction (no association, no Storage
        Commitment support) is shown in the envelope's details only.
        """
        commitment = result.commitment
        if commitment.state == "requested":
            return
        if commitment.transaction_uid:
            failed = len(commitment.failed_uids)
            self.store.record_commitment(
                commitment.transaction_uid, env_id, dest, commitment.state, failed
            )
            return
        env = self.store.get_envelope(env_id, "in")
        if env is None:
            return
        shown = dict(env.details.get("storage_commitment", {}))
        shown[dest] = {"state": commitment.state, "transaction_uid": None, "failed": 0}
        details = {**env.details, "storage_commitment": shown}
        self.store.set_envelope_state(
            env_id, "in", env.state, reason=env.reason, details=details
        )


def _leave_out_answered(
    remaining: list[str],
    failed: dict[str, str],
    answered: dict[str, Answer],
    resend: bool,
) -> tuple[list[str], list[tuple[str, str]]]:
    """Drop from ``remaining`` what an earlier run's progress log answers.

    Refusals move into ``failed`` with their reasons, unless this run re-sends
    refused instances (``resend``). Returns what is left to send and the (SOP
    Class, SOP Instance UID) of each instance dropped as delivered. Idempotent:
    an instance the payload already shows as done is not in ``remaining``.
    """
    left, earlier = [], []
    for rel in remaining:
        answer = answered.get(rel)
        if answer is None or (answer.outcome == PERMANENT and resend):
            left.append(rel)
        elif answer.outcome == DELIVERED:
            earlier.append((answer.sop_class, answer.sop_instance))
        else:
            failed[rel] = answer.reason
    return left, earlier
