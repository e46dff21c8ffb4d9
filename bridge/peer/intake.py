"""Taking in a received envelope: check it, record it, queue it for opening.

Both inbound transports end here: the HTTP API (:mod:`bridge.peer.server`)
once the body is on disk, and the drop-folder watcher
(:mod:`bridge.peer.dropfolder`) once a complete file has appeared. The check is
the cheap one a receiver can make before answering the sender: the archive is a
well-formed envelope whose id is a UUID, and it comes from the sender it claims,
as its trust setting demands (``JMIX.md`` section 4). Decrypting and checking
every file is the opener's work, on the queued ``open`` job.

An id is refused as a duplicate when an inbound envelope with that id is
recorded or was accepted (``Store.is_seen``); nothing new is kept then. The
one exception is an id whose only record is quarantined: an id counts as seen
only once its envelope is accepted (``JMIX.md`` section 4), so a corrected
resend takes the record over and is opened, while the quarantined file is kept
beside it as ``quarantine/<id>.superseded-<n>.zip`` and named in the record's
``superseded`` details, for an operator.

Each envelope is counted once in ``jmix_bridge_envelopes_received_total``: here
when intake refuses it (:meth:`Intake.refused`, with the opener's outcome
labels), by the opener when it accepts or quarantines it.
"""

from __future__ import annotations

import dataclasses
import logging
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

from bridge import jmix
from bridge.errors import EnvelopeError, MalformedEnvelope, PolicyViolation, SpoolError

# The one private import: reading the sender's documents out of a zip whose
# envelope sits at the root or under one folder is the library's own logic.
from bridge.jmix._archive import Source
from bridge.peer.settings import InboundSender
from bridge.receiving.opener import QUARANTINED, OutcomeHook, classify
from bridge.spool import Spool, fsync_rename, validate_envelope_id
from bridge.store.base import Envelope, NewJob, Store

logger = logging.getLogger(__name__)

OPEN_QUEUE = "open"
MANIFEST_LIMIT = 1 << 20  # bytes of manifest.json or manifest.jws read at most


@dataclass(frozen=True)
class Checked:
    """An envelope that passed the intake check."""

    envelope_id: str
    signer: str  # the signing key's fingerprint, "" when unsigned (transport trust)
    trust: str  # the trust it was accepted under: "signed" or "transport"


class Intake:
    """Checks, records and queues received envelopes; thread-safe.

    ``senders`` are every peer allowed to send to us; each one's pinned signing
    keys form its own trust store, so that one sender cannot pass an envelope
    signed by another's key. ``trust`` and ``policies``, by sender name, are
    the trust stores and open policies the opener will apply (this node's own
    id as the expected receiver, the governance policies); given them, the
    upload is refused for what the opener would refuse, before it is stored.
    ``on_refused(outcome, sender)`` counts each refusal (for metrics).
    """

    def __init__(
        self,
        store: Store,
        spool: Spool,
        senders: Iterable[InboundSender],
        *,
        trust: Mapping[str, jmix.TrustStore] | None = None,
        policies: Mapping[str, jmix.OpenPolicy] | None = None,
        on_refused: OutcomeHook | None = None,
    ):
        self.store = store
        self._on_refused: OutcomeHook = on_refused or (lambda outcome, sender: None)
        self.spool = spool
        self._trust = {
            s.name: jmix.TrustStore([(s.id or None, key) for key in s.signing_keys])
            for s in senders
        }
        self._trust.update(trust or {})
        self._policies = dict(policies or {})
        # One lock orders "is it new?" and "record it" for every transport, so two
        # copies of one envelope arriving together cannot both be recorded.
        self._lock = threading.Lock()

    def check(
        self, path: Path, sender: InboundSender, *, authenticated: bool = True
    ) -> Checked:
        """Return the id and signer of the envelope zip at ``path`` from ``sender``.

        ``authenticated`` says whether the transport proved the sender's
        identity (an HTTP credential); without it the envelope must be signed
        whatever the sender's trust setting. Raises MalformedEnvelope (not an
        envelope, or its id is not a UUID) or a VerificationFailed subclass
        (not from this sender as its trust demands); each refusal is counted.
        """
        try:
            return self._check(path, sender, authenticated)
        except EnvelopeError as exc:
            self.refused(classify(exc), sender.name)
            raise

    def refused(self, outcome: str, sender: str = "") -> None:
        """Count an envelope refused before it was stored (``sender`` "": unknown).

        ``outcome`` is one of the opener's labels (``classify``) or a transport
        refusal: ``unauthorized``, ``too_large``, ``malformed``, ``duplicate``.
        """
        self._on_refused(outcome, sender)

    def _check(self, path: Path, sender: InboundSender, authenticated: bool) -> Checked:
        manifest, manifest_bytes, jws = _sender_documents(path)
        raw_id = manifest.get("id", "")
        try:
            envelope_id = validate_envelope_id(str(raw_id).lower())
        except SpoolError as exc:
            raise MalformedEnvelope(f"manifest.json id: {exc}") from exc
        named = manifest["sender"]["id"]
        if sender.id and named != sender.id:
            raise PolicyViolation(
                f"manifest sender.id: expected {sender.id!r}, got {named!r}"
            )

        trust = sender.trust if authenticated else "signed"
        policy = self._policies.get(sender.name) or jmix.OpenPolicy(
            require_encryption=sender.require_encryption
        )
        policy = dataclasses.replace(policy, trust=trust)
        signer = jmix.check_sender(
            manifest,
            jws,
            self._trust[sender.name],
            policy,
            manifest_bytes=manifest_bytes,
        )
        return Checked(envelope_id, signer or "", trust)

    def is_known(self, envelope_id: str) -> bool:
        """Return True when an inbound envelope with this id was accepted, or is
        recorded in any state but quarantined (see the module docstring)."""
        return self._lookup(envelope_id)[0]

    def _lookup(self, envelope_id: str) -> tuple[bool, Envelope | None]:
        """Return whether the id is known (see :meth:`is_known`) and its record."""
        env = self.store.get_envelope(envelope_id, "in")
        if self.store.is_seen(envelope_id):
            return True, env
        return env is not None and env.state != QUARANTINED, env

    def accept(self, part: Path, checked: Checked, sender: InboundSender) -> bool:
        """Move ``part`` (a file in the spool) to ``inbox/<id>.zip`` and record it.

        Records the envelope as ``stored`` and enqueues its ``open`` job in one
        transaction. Returns False, leaving ``part`` where it is, when the id is
        known already (counted as a ``duplicate``). Raises SpoolError or
        StoreError.
        """
        envelope_id = checked.envelope_id
        dest = self.spool.envelope_path("inbox", envelope_id)
        size = part.stat().st_size
        env = Envelope(
            id=envelope_id,
            direction="in",
            peer=sender.name,
            path=self.spool.relative(dest),
            size_bytes=size,
            state="stored",
            details={"trust": checked.trust, "signer": checked.signer},
        )
        job = NewJob(
            queue=OPEN_QUEUE,
            key=f"open:{envelope_id}",
            payload={"envelope_id": envelope_id, "sender": sender.name},
        )

        with self._lock:
            known, quarantined = self._lookup(envelope_id)
            if known:
                self.refused("duplicate", sender.name)
                return False
            if quarantined is not None:
                taken = self._supersede(quarantined, part, env, job)
            else:
                # A file already at dest has no record (checked just above): it
                # was left by a crash between the rename and the commit, so
                # replace it.
                fsync_rename(part, dest)
                taken = self.store.put_envelope(env, jobs=[job])
            if not taken:
                # Recorded meanwhile by another process sharing the store; the
                # file we moved holds the same envelope id, so leave it.
                self.refused("duplicate", sender.name)
                return False

        logger.info(
            "envelope received envelope=%s sender=%s bytes=%d trust=%s",
            envelope_id,
            sender.name,
            size,
            checked.trust,
        )
        return True

    def _supersede(self, old: Envelope, part: Path, env: Envelope, job: NewJob) -> bool:
        """Let the resend ``env`` take over the quarantined record ``old``.

        The quarantined file moves aside first, under a name fixed by how many
        resends came before, so that a crash before the commit leaves it where
        a repeat of the same resend finds it, and a later quarantine of the
        resend cannot overwrite it. Returns False when the record left the
        quarantined state meanwhile (an operator released it, say).
        """
        earlier = list(old.details.get("superseded", []))
        aside = self.spool.superseded_path(env.id, len(earlier) + 1)
        held = self.spool.path_of(old.path)
        if held.exists() and held != aside:
            fsync_rename(held, aside)
        fsync_rename(part, self.spool.path_of(env.path))
        record = {
            "path": self.spool.relative(aside),
            "reason": old.reason,
            "outcome": old.details.get("outcome", ""),
        }
        details = {**env.details, "superseded": [*earlier, record]}
        resend = dataclasses.replace(job, key=f"{job.key}:resend-{len(earlier) + 1}")
        return self.store.set_envelope_state(
            env.id,
            "in",
            env.state,
            details=details,
            path=env.path,
            jobs=[resend],
            size_bytes=env.size_bytes,
            only_if=QUARANTINED,
        )


def _sender_documents(path: Path) -> tuple[dict, bytes, bytes | None]:
    """Return the manifest, its exact bytes and ``manifest.jws`` (None if absent).

    Raises MalformedEnvelope when the zip holds no well-formed manifest.
    """
    manifest = jmix.read_manifest(path)
    with Source(path) as source:
        manifest_bytes = source.read_small("manifest.json", MANIFEST_LIMIT)
        jws = None
        if "manifest.jws" in source.names:
            jws = source.read_small("manifest.jws", MANIFEST_LIMIT)
    return manifest, manifest_bytes, jws
