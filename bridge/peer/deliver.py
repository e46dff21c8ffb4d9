"""The deliver-job handler: take a built envelope to its peer.

A ``deliver`` job carries ``{"envelope_id", "peer"}`` and has the peer's name as
its target, so that the worker's per-peer circuit breaker
(:mod:`bridge.workers.policy`) keeps a dead peer from costing the others. The
handler posts the envelope zip over HTTP(S) (:mod:`bridge.peer.client`) or
writes it into the peer's drop folder (:mod:`bridge.peer.dropfolder`), and on
success marks the outgoing envelope ``delivered``. Failures are raised as
RetryableTransportError or PermanentTransportError and the generic worker
(:mod:`bridge.workers.base`) schedules the retry or parks the job.

Given this node's entity and signing key, the handler first writes a signed
``sent`` entry (to the peer, now) into the zip's audit trail
(:func:`bridge.jmix.audit.stamp_sent`); a retry replaces it.

Delivering twice is harmless: the peer answers 409 to an id it holds, which
counts as delivered, and a drop folder's reader ignores an id it has seen.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Iterable, Mapping

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.errors import SpoolError
from bridge.faults import test_only_crash_point
from bridge.jmix import Entity
from bridge.jmix.audit import stamp_sent
from bridge.peer.client import PeerClient
from bridge.peer.dropfolder import drop_envelope
from bridge.peer.settings import PeerSettings
from bridge.spool import Spool
from bridge.store.base import Job, NewJob, Store
from bridge.workers.base import JobContext, Outcome

logger = logging.getLogger(__name__)

DELIVER_QUEUE = "deliver"
DELIVERED = "delivered"


def deliver_job(envelope_id: str, peer: str) -> NewJob:
    """Return the job that delivers outgoing envelope ``envelope_id`` to ``peer``."""
    return NewJob(
        queue=DELIVER_QUEUE,
        key=f"deliver:{envelope_id}:{peer}",
        payload={"envelope_id": envelope_id, "peer": peer},
        target=peer,
    )


class Deliverer:
    """Handles ``deliver`` jobs for the configured peers; thread-safe.

    Call it as the worker's handler: ``Deliverer(...)(job, ctx) -> Outcome``.
    Keeps one HTTP client (connection pool) per peer; :meth:`close` closes them.
    With ``node`` and ``signing_key``, each envelope gets a ``sent`` audit entry
    naming the peer's entity from ``receivers`` (by peer name).
    """

    def __init__(
        self,
        store: Store,
        spool: Spool,
        peers: Iterable[PeerSettings],
        *,
        node: Entity | None = None,
        signing_key: Ed25519PrivateKey | None = None,
        receivers: Mapping[str, Entity] | None = None,
    ):
        self.node = node
        self.signing_key = signing_key
        self.receivers = dict(receivers or {})
        self.store = store
        self.spool = spool
        self.peers = {p.name: p for p in peers}
        self._clients: dict[str, PeerClient] = {}
        self._lock = threading.Lock()

    def _client(self, peer: PeerSettings) -> PeerClient:
        with self._lock:
            client = self._clients.get(peer.name)
            if client is None:
                client = self._clients[peer.name] = PeerClient(peer)
            return client

    def __call__(self, job: Job, ctx: JobContext) -> Outcome:
        """Deliver the job's envelope; raise a TransportError when that fails."""
        envelope_id = str(job.payload.get("envelope_id", ""))
        name = str(job.payload.get("peer", ""))
        peer = self.peers.get(name)
        if peer is None:
            return Outcome.dead(f"peer {name!r} is not configured")
        env = self.store.get_envelope(envelope_id, "out")
        if env is None:
            return Outcome.dead(f"envelope {envelope_id}: no outgoing record")
        try:
            path = self.spool.path_of(env.path)
        except SpoolError as exc:
            return Outcome.dead(str(exc))
        if not path.is_file():
            return Outcome.dead(f"envelope {envelope_id}: file missing from the spool")

        receiver = self.receivers.get(name)
        if self.node and self.signing_key and receiver:
            stamp_sent(path, by=self.node, to=receiver, key=self.signing_key)
        test_only_crash_point("deliver.before-send")
        if peer.transport == "drop":
            drop_envelope(path, peer.drop_folder, envelope_id)
            how = "drop"
        else:
            result = self._client(peer).send(path)
            how = "duplicate" if result.duplicate else "stored"

        logger.info(
            "envelope delivered envelope=%s peer=%s bytes=%d result=%s",
            envelope_id,
            peer.name,
            env.size_bytes,
            how,
        )
        return Outcome.done(envelope_state=(envelope_id, "out", DELIVERED))

    def close(self) -> None:
        """Close every peer's connection pool."""
        with self._lock:
            clients, self._clients = list(self._clients.values()), {}
        for client in clients:
            client.close()
