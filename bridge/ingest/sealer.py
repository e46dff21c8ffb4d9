"""The sealer: packs a sealed study into an envelope for one peer, in the outbox.

It runs ``seal`` jobs (one per study and peer, queued by the assembler). The
envelope id is derived from the job's key, so a sealer that dies after the zip
was renamed into the outbox but before the job completed finds the same zip on
the retry and records it instead of building a second envelope. Recording the
envelope and queueing its ``deliver`` job happen in the same transaction as the
job's completion. A study that cannot go in one envelope (instances that
disagree on Patient ID, say) is held for an operator with the reason.

The governance elements of :class:`SenderGovernance` go into every envelope:
this node's ``key_reference`` and directory attestation in the sender
assertion, and a signed request passed through as its requester: the one
configured for the study (by StudyInstanceUID or AccessionNumber) when it is
made for the envelope's peer, else the study's route's (docs/governance.md).
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import pydicom
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey
from pydicom.errors import InvalidDicomError

from bridge.errors import UnpackableStudy
from bridge.faults import test_only_crash_point
from bridge.jmix import Entity, Request, pack
from bridge.peer.deliver import deliver_job
from bridge.spool import Spool
from bridge.store import Envelope, Instance, Job, Store, Study, StudyState
from bridge.workers.base import JobContext, Outcome

logger = logging.getLogger(__name__)

# Envelope ids of our seal jobs are UUIDv5 in this namespace (RFC 4122 4.3).
_ENVELOPE_NAMESPACE = uuid.UUID("6c1f2b0e-4a52-5a55-9d3c-1b7a3c0e9f21")
PACKED = "packed"

BuiltHook = Callable[[str, int, dict], None]  # (peer, size_bytes, stage_seconds)


@dataclass(frozen=True)
class PeerEnvelopeSettings:
    """What the sealer needs to know of one peer."""

    name: str
    receiver: Entity
    recipient_public: X25519PublicKey
    dialect: str = "spec"


@dataclass(frozen=True)
class StudyRequest:
    """A signed request for the study with this StudyInstanceUID or AccessionNumber.

    One of the two is set (the configuration checks it).
    """

    request: Request
    study_instance_uid: str = ""
    accession_number: str = ""


@dataclass(frozen=True)
class SenderGovernance:
    """What the sealer adds to the envelopes it builds; empty adds nothing.

    ``requests`` maps a route's name to the signed request whose requester its
    envelopes carry; ``study_requests`` name studies whose envelopes carry
    another requester, and win over the route's (the first that matches).
    """

    key_reference: str | None = None
    attestation: dict | None = None
    requests: Mapping[str, Request] = field(default_factory=dict)
    study_requests: tuple[StudyRequest, ...] = ()


def envelope_id_for(job_key: str) -> str:
    """Return the envelope id a seal job always builds (stable across retries)."""
    return str(uuid.uuid5(_ENVELOPE_NAMESPACE, job_key))


class Sealer:
    """The ``seal`` job handler; see the module docstring."""

    def __init__(
        self,
        store: Store,
        spool: Spool,
        sender: Entity,
        signing_key: Ed25519PrivateKey,
        peers: dict[str, PeerEnvelopeSettings],
        on_built: BuiltHook | None = None,
        governance: SenderGovernance | None = None,
        on_held: Callable[[], None] | None = None,
    ):
        self.governance = governance or SenderGovernance()
        self.store = store
        self.spool = spool
        self.sender = sender
        self.signing_key = signing_key
        self.peers = peers
        self.on_built = on_built or (lambda peer, size, stages: None)
        # Called once for each study this sealer holds back, for metrics.
        self.on_held = on_held or (lambda: None)

    def __call__(self, job: Job, ctx: JobContext) -> Outcome:
        """Pack the job's study for its peer; see the module docstring."""
        ref, peer_name = job.payload["study_ref"], job.payload["peer"]
        peer = self.peers.get(peer_name)
        if peer is None:
            return Outcome.dead(
                f"peer {peer_name!r} is not configured", target_failed=False
            )
        study = self.store.get_study(ref)
        if study is None:
            return Outcome.dead(f"no record of study {ref}", target_failed=False)
        instances = self.store.study_instances(ref)
        env_id = envelope_id_for(job.key)
        out = self.spool.envelope_path("outbox", env_id)

        started = time.perf_counter()
        stages: dict[str, float] = {}
        if not out.exists():
            try:
                result = pack(
                    [self.spool.path_of(i.spool_path) for i in instances],
                    out,
                    sender=self.sender,
                    signing_key=self.signing_key,
                    receiver=peer.receiver,
                    recipient_public=peer.recipient_public,
                    dialect=peer.dialect,
                    envelope_id=env_id,
                    progress=_test_only_mid_pack,
                    request=self._request_for(study, instances, peer),
                    key_reference=self.governance.key_reference,
                    attestation=self.governance.attestation,
                )
            except UnpackableStudy as exc:
                # A study routed to several peers fails for each: count it once.
                if study.state is not StudyState.HELD:
                    self.on_held()
                self.store.hold_study(ref, f"cannot be packed: {exc}")
                logger.error("study held study=%s reason=unpackable", ref)
                return Outcome.dead(
                    f"study {ref} cannot be packed: {exc}", target_failed=False
                )
            stages = dict(result.stage_seconds)
        ctx.renew()

        size = out.stat().st_size
        envelope = Envelope(
            id=env_id,
            direction="out",
            peer=peer_name,
            path=self.spool.relative(out),
            size_bytes=size,
            state=PACKED,
            study_ref=ref,
            study_instance_uid=study.study_instance_uid,
            instance_count=len(instances),
            details={
                "stage_seconds": stages,
                "generation": study.generation,
                "pack_seconds": round(time.perf_counter() - started, 3),
            },
        )
        self.on_built(peer_name, size, stages)
        logger.info(
            "envelope built envelope=%s study=%s peer=%s instances=%d bytes=%d",
            env_id,
            ref,
            peer_name,
            len(instances),
            size,
        )
        return Outcome.done(envelope=envelope, jobs=[deliver_job(env_id, peer_name)])

    def _request_for(
        self, study: Study, instances: list[Instance], peer: PeerEnvelopeSettings
    ) -> Request | None:
        """The request whose requester the envelope carries; see the module doc.

        A study's request made for another receiver is left to the envelopes
        for that receiver: a request names where its data may go.
        """
        accession: str | None = None
        for rule in self.governance.study_requests:
            if rule.request.receiver_id != peer.receiver.id:
                continue
            if rule.study_instance_uid:
                if rule.study_instance_uid == study.study_instance_uid:
                    return rule.request
                continue
            if accession is None:
                accession = self._accession_number(instances)
            if accession and rule.accession_number == accession:
                return rule.request
        return self.governance.requests.get(study.route)

    def _accession_number(self, instances: list[Instance]) -> str:
        """The AccessionNumber of the study's first instance ("" when it has none)."""
        if not instances:
            return ""
        path = self.spool.path_of(instances[0].spool_path)
        try:
            ds = pydicom.dcmread(
                path, stop_before_pixels=True, specific_tags=["AccessionNumber"]
            )
        except (OSError, InvalidDicomError):
            # pack() reads the same file next and reports what is wrong with it.
            return ""
        return str(ds.get("AccessionNumber", "") or "").strip()


def _test_only_mid_pack(done: int, total: int) -> None:
    """Reach the ``seal.mid-pack`` crash point once half the payload is packed."""
    if done * 2 >= total:
        test_only_crash_point("seal.mid-pack")
