"""The opener: verifies and opens each received envelope, or quarantines it.

It runs ``open`` jobs (queued by the peer API and the drop-folder inbox). An
envelope is accepted only when the envelope library's checks all pass for the
sender it came from (pinned signer, binding fields, GCM tag, every file against
``files.json``, receiver, expiry policy) and its id is new. Accepting records
the id as seen, in the same transaction as the forward jobs it creates, one per
destination. An envelope that fails is moved to quarantine with the reason and
never forwarded; nothing is deleted.

The governance checks (docs/governance.md) run under each sender's
``OpenPolicy``; their records go into the envelope's details. With a node
identity and signing key, the opener appends signed ``received`` and
``verified`` entries to this node's copy of the envelope's audit, kept beside
the received zip.
"""

from __future__ import annotations

import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from bridge.errors import (
    AuthenticationFailed,
    EnvelopeError,
    ExpiredAssertion,
    IntegrityError,
    MalformedEnvelope,
    PolicyViolation,
    SpoolError,
    UnknownSigner,
)
from bridge.jmix import Entity, OpenPolicy, TrustStore, open_envelope
from bridge.jmix.audit import RECEIVED, VERIFIED, append_audit, update_stored_audit
from bridge.spool import Spool, fsync_rename, validate_envelope_id
from bridge.store import Job, NewJob, Store
from bridge.workers.base import JobContext, Outcome

logger = logging.getLogger(__name__)

# Envelope states on the receiving side.
STORED, OPENED, QUARANTINED = "stored", "opened", "quarantined"

OutcomeHook = Callable[[str, str], None]  # (outcome, sender), for metrics


@dataclass(frozen=True)
class SenderTrust:
    """What the opener needs to know of one configured sender."""

    name: str
    trust: TrustStore
    policy: OpenPolicy


def classify(exc: EnvelopeError) -> str:
    """Return the bounded outcome label of a refused envelope (for metrics)."""
    if isinstance(exc, UnknownSigner):
        return "unknown_sender"
    if isinstance(exc, ExpiredAssertion):
        return "expired"
    if isinstance(exc, AuthenticationFailed):
        # Requester, attestation and audit signatures count as bad signatures.
        stage = getattr(exc, "stage", "")
        return "decrypt_failed" if stage == "payload" else "bad_signature"
    if isinstance(exc, IntegrityError):
        return "hash_mismatch"
    if isinstance(exc, PolicyViolation):
        return "policy_violation"
    if isinstance(exc, MalformedEnvelope):
        return "malformed"
    return "policy_violation"


def describe(exc: EnvelopeError) -> str:
    """Return the quarantine reason: the error, and which signature failed.

    An authentication failure says only that it failed; for the governance
    elements its ``stage`` (requester, attestation, audit) tells the operator
    which signature it was.
    """
    stage = getattr(exc, "stage", None)
    if isinstance(exc, AuthenticationFailed) and stage not in ("signature", "payload"):
        return f"{type(exc).__name__} ({stage}): {exc}"
    return f"{type(exc).__name__}: {exc}"


class Opener:
    """The ``open`` job handler; see the module docstring."""

    def __init__(
        self,
        store: Store,
        spool: Spool,
        encryption_key: X25519PrivateKey,
        senders: dict[str, SenderTrust],
        destinations: list[str],
        on_outcome: OutcomeHook | None = None,
        node: Entity | None = None,
        signing_key: Ed25519PrivateKey | None = None,
    ):
        self.store = store
        self.node = node
        self.signing_key = signing_key
        self.spool = spool
        self.encryption_key = encryption_key
        self.senders = senders
        self.destinations = list(destinations)
        self.on_outcome = on_outcome or (lambda outcome, sender: None)

    def __call__(self, job: Job, ctx: JobContext) -> Outcome:
        """Open the job's envelope; see the module docstring."""
        env_id = validate_envelope_id(job.payload["envelope_id"])
        env = self.store.get_envelope(env_id, "in")
        if env is None:
            return Outcome.dead(f"no record of received envelope {env_id}")
        if env.state == OPENED:
            return Outcome.done()  # an earlier run finished; nothing to redo
        src = self.spool.path_of(env.path)
        dest = self.spool.envelope_path("opened", env_id)

        sender = self.senders.get(env.peer)
        if sender is None:
            return self._quarantine(
                env,
                src,
                "unknown_sender",
                f"sender {env.peer!r} is not configured on this node",
            )
        if self.store.is_seen(env_id):
            return self._quarantine(
                env, src, "duplicate", "replayed envelope id: already accepted"
            )

        if dest.exists():
            # A run that died after the rename into place left a complete folder.
            files = sorted(p for p in (dest / "dicom").rglob("*") if p.is_file())
            details = dict(env.details)
        else:
            try:
                opened = open_envelope(
                    src,
                    dest,
                    encryption_key=self.encryption_key,
                    trust=sender.trust,
                    policy=sender.policy,
                )
            except EnvelopeError as exc:
                return self._quarantine(env, src, classify(exc), describe(exc))
            files = opened.dicom_files
            details = {
                "signer": opened.signer_fingerprint,
                "dialect": opened.dialect,
                "warnings": opened.warnings,
                "instances": len(files),
                "governance": opened.governance,
            }
            self._audit(env_id, src, env.peer)
            ctx.renew()

        rel = [str(Path(f).relative_to(dest)) for f in files]
        self.store.set_envelope_state(env_id, "in", STORED, details=details)
        jobs = [
            NewJob(
                "forward",
                f"forward:{env_id}:{name}",
                target=name,
                payload={
                    "envelope_id": env_id,
                    "sender": env.peer,
                    "remaining": rel,
                    "failed": {},
                    "delivered": 0,
                },
            )
            for name in self.destinations
        ]
        self.on_outcome("accepted", env.peer)
        logger.info(
            "envelope accepted envelope=%s sender=%s instances=%d",
            env_id,
            env.peer,
            len(rel),
        )
        return Outcome.done(
            jobs=jobs, envelope_state=(env_id, "in", OPENED), seen=(env_id, env.peer)
        )

    def _audit(self, env_id: str, src: Path, sender: str) -> None:
        """Append ``received`` and ``verified`` to this node's copy of the audit."""
        if self.node is None or self.signing_key is None:
            return

        def add(doc: dict) -> None:
            for event in (RECEIVED, VERIFIED):
                append_audit(
                    doc, event, by=self.node, key=self.signing_key, envelope_id=env_id
                )

        try:
            update_stored_audit(src, add)
        except (OSError, EnvelopeError) as exc:
            # The audit is a record, not a gate: the envelope is still accepted.
            logger.warning(
                "audit not updated envelope=%s sender=%s error=%s",
                env_id,
                sender,
                type(exc).__name__,
            )

    def _quarantine(self, env, src: Path, outcome: str, reason: str) -> Outcome:
        env_id = env.id
        target = self.spool.envelope_path("quarantine", env_id)
        try:
            if src.exists() and src != target:
                if src.is_dir():
                    shutil.move(src, target)
                else:
                    fsync_rename(src, target)
        except OSError as exc:
            raise SpoolError(f"cannot move envelope to quarantine: {exc}") from exc
        self.store.set_envelope_state(
            env_id,
            "in",
            QUARANTINED,
            reason=reason,
            path=self.spool.relative(target),
            details={"outcome": outcome},
        )
        self.on_outcome(outcome, env.peer)
        # The reason may name payload files (SOP Instance UIDs): it goes to the
        # store, for operators, and never to the log.
        logger.warning("envelope quarantined envelope=%s outcome=%s", env_id, outcome)
        return Outcome.done()
