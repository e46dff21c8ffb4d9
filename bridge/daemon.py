"""The daemon: one process with the DICOM listener, the HTTP server and the workers.

This is the one place that knows every part (``docs/architecture.md``): it maps
the configuration onto each part's settings, starts them, and stops them in
the reverse order. Stopping closes the doors first (listener, HTTP, inbox),
then lets workers finish or release their leases within a bounded time, so a
restart picks every unfinished job up again.
"""

from __future__ import annotations

import json
import logging
import signal
import ssl
import threading
from dataclasses import dataclass, field

from aiohttp import web
from pynetdicom.association import Association

from bridge import __version__
from bridge.config import (
    Config,
    DestinationSettings,
    PeerSettings,
    PinnedKey,
    ReceivingSettings,
    RetrySettings,
    SenderSettings,
    TLSFiles,
)
from bridge.dicom.commitment import CommitmentReports
from bridge.dicom.forwarder import Destination, TLSSettings
from bridge.dicom.listener import (
    AllowedCaller,
    Listener,
    ListenerSettings,
    ListenerStats,
)
from bridge.ingest.assembler import Assembler
from bridge.ingest.ingest import Ingest, IngestSettings
from bridge.ingest.routing import RouteRule, Unrouted
from bridge.ingest.sealer import (
    PeerEnvelopeSettings,
    Sealer,
    SenderGovernance,
    StudyRequest,
)
from bridge.jmix import (
    Entity,
    KeyDir,
    OpenPolicy,
    TrustStore,
    generate_key_dir,
    load_encryption_public,
    load_key_dir,
    load_signing_public,
    read_request,
)
from bridge.ops.context import OpsContext
from bridge.ops.health import standard_checks
from bridge.ops.metrics import Metrics
from bridge.ops.retention import Janitor
from bridge.ops.routes import add_ops_routes
from bridge.peer import settings as peer_settings
from bridge.peer.client import PeerClient
from bridge.peer.deliver import Deliverer
from bridge.peer.dropfolder import InboxWatcher
from bridge.peer.intake import Intake
from bridge.peer.server import PeerServer, create_app
from bridge.receiving.forwarding import Forwarder
from bridge.receiving.opener import Opener, SenderTrust
from bridge.receiving.receipts import ReceiptSender, add_receipt_route
from bridge.spool import Spool
from bridge.store import (
    DuplicatePolicy,
    InstanceOutcome,
    SQLiteStore,
    Store,
    open_store,
)
from bridge.tls import server_context
from bridge.workers.base import Worker, WorkerSpec
from bridge.workers.policy import BreakerBoard, BreakerPolicy, RetryPolicy

logger = logging.getLogger(__name__)


# -- mapping the configuration onto each part -------------------------------------


def retry_policy(settings: RetrySettings) -> RetryPolicy:
    """Map configured retry settings onto the worker policy."""
    return RetryPolicy(
        initial_seconds=settings.initial_seconds,
        factor=settings.factor,
        max_seconds=settings.max_seconds,
        max_attempts=settings.max_attempts,
        max_age_seconds=settings.max_age_seconds,
    )


def breaker_policy(settings: PeerSettings | DestinationSettings) -> BreakerPolicy:
    """Map a peer's or destination's circuit settings onto the breaker policy."""
    return BreakerPolicy(
        failures_to_open=settings.circuit.failures_to_open,
        open_seconds=settings.circuit.open_seconds,
    )


def destination(settings: DestinationSettings) -> Destination:
    """Map a configured destination onto the forwarder's."""
    tls = None
    if settings.tls is not None:
        tls = TLSSettings(
            cafile=settings.tls.ca,
            certfile=settings.tls.cert,
            keyfile=settings.tls.key,
        )
    return Destination(
        name=settings.name,
        ae_title=settings.ae_title,
        host=settings.host,
        port=settings.port,
        calling_ae_title=settings.calling_ae_title,
        tls=tls,
        dimse_timeout=settings.dimse_timeout,
        storage_commitment=settings.storage_commitment,
    )


def listener_tls(settings: TLSFiles | None) -> ssl.SSLContext | None:
    """Map ``dicom.tls`` onto the listener's server context (None: plain DICOM).

    Raises OSError or ssl.SSLError when a file cannot be loaded; check-config
    has looked at each file before.
    """
    if settings is None or settings.cert is None:
        return None
    return server_context(
        settings.cert, settings.key, settings.ca, settings.require_client_cert
    )


def peer_transport(settings: PeerSettings) -> peer_settings.PeerSettings:
    """Map a configured peer onto the exchange client's settings."""
    tls = settings.tls
    return peer_settings.PeerSettings(
        name=settings.name,
        url=settings.url,
        token=str(settings.token),
        ca_file=tls.ca if tls else None,
        client_cert=tls.cert if tls else None,
        client_key=tls.key if tls else None,
        timeout_seconds=settings.timeout_seconds,
        transport=settings.transport,
        drop_folder=settings.drop_folder,
    )


def inbound_sender(settings: SenderSettings) -> peer_settings.InboundSender:
    """Map a configured sender onto the exchange server's settings."""
    return peer_settings.InboundSender(
        name=settings.name,
        id=settings.id,
        token=str(settings.token),
        client_cert_sha256=settings.client_cert_sha256,
        trust=settings.trust,
        signing_keys=settings.signing_keys,
        require_encryption=settings.require_encryption,
    )


def pins(keys: tuple[PinnedKey, ...]) -> TrustStore | None:
    """Map configured ``{id, key}`` pins onto a trust store (None when empty)."""
    return TrustStore([(k.id, k.key) for k in keys]) or None


def sender_trust(
    settings: SenderSettings, receiving: ReceivingSettings, node_id: str
) -> SenderTrust:
    """Map a configured sender onto the keys and policy its envelopes meet."""
    reference = settings.key_reference or None
    governance = settings.governance
    attestation = governance.attestation
    policy = OpenPolicy(
        require_encryption=settings.require_encryption,
        expiry=receiving.expiry,
        expected_receiver_id=node_id,
        trust=settings.trust,
        requester=governance.requester,
        requester_trust=pins(settings.requester_keys),
        attestation=None if attestation == "auto" else attestation,
        directory_trust=pins(receiving.directory_keys),
        key_reference=governance.key_reference,
        audit=governance.audit,
        audit_trust=pins(receiving.audit_node_keys),
    )
    trust = TrustStore([(settings.id, key, reference) for key in settings.signing_keys])
    return SenderTrust(settings.name, trust, policy)


def sender_governance(config: Config) -> SenderGovernance:
    """Map this node's key reference, attestation, route and study requests.

    Raises OSError or a BridgeError when a file cannot be read; check-config
    has read each one before.
    """
    node = config.node
    attestation = None
    if node.directory_attestation is not None:
        attestation = json.loads(node.directory_attestation.read_bytes())
    return SenderGovernance(
        key_reference=node.key_reference or None,
        attestation=attestation,
        requests={
            r.name: read_request(r.requester)
            for r in config.routes
            if r.requester is not None
        },
        study_requests=tuple(
            StudyRequest(
                read_request(r.request), r.study_instance_uid, r.accession_number
            )
            for r in config.study_requests
        ),
    )


def node_entity(config: Config) -> Entity:
    """This node as manifests and audit entries name it."""
    node = config.node
    return Entity(node.id, node.name, node.contact)


def peer_entity(settings: PeerSettings) -> Entity:
    """A peer's entity as manifests and audit entries name it."""
    entity = settings.entity
    return Entity(entity.id, entity.name or entity.id, entity.contact or "unknown")


def commitment_callers(config: Config) -> tuple[AllowedCaller, ...]:
    """The destinations that may report storage commitment results to us."""
    return tuple(
        AllowedCaller(d.ae_title, d.host)
        for d in config.destinations
        if d.storage_commitment
    )


def route_rule(settings) -> RouteRule:
    """Map a configured route onto the ingest's route rule."""
    return RouteRule(
        name=settings.name,
        peers=settings.peers,
        calling_ae=settings.calling_ae,
        called_ae=settings.called_ae,
        match=settings.match,
        quiet_seconds=settings.quiet_seconds,
        max_age_seconds=settings.max_age_seconds,
        required_series=settings.required_series,
    )


def ensure_keys(config: Config) -> tuple[KeyDir, bool]:
    """Load this node's keys, creating them first when configured to; return the
    keys and whether they were just created."""
    folder = config.keys_dir
    created = False
    if config.node.generate_keys and not (folder / "signing.key").exists():
        generate_key_dir(folder)
        created = True
    return load_key_dir(folder), created


class MeteredListenerStats(ListenerStats):
    """Listener counters that also feed the Prometheus metrics."""

    def __init__(self, metrics: Metrics):
        super().__init__()
        self.metrics = metrics

    def association(self, rejected_for: str = "", calling_ae: str = "") -> None:
        super().association(rejected_for, calling_ae)
        if rejected_for:
            self.metrics.association_rejected(rejected_for)
        else:
            self.metrics.association_accepted(calling_ae)

    def closed(self) -> None:
        self.metrics.association_closed()

    def instance(self, status, receipt, reason, calling_ae: str = "") -> None:
        super().instance(status, receipt, reason, calling_ae)
        self.metrics.dimse_status(_status_class(status))
        if receipt is not None and receipt.accepted:
            self.metrics.instance_received(calling_ae, receipt.size_bytes)
            if receipt.outcome == InstanceOutcome.REPLACED:
                self.metrics.instance_replaced(calling_ae)


def _status_class(status: int) -> str:
    """Return the PS3.7 Annex C class of a DIMSE status, a bounded label."""
    if status == 0:
        return "success"
    if status & 0xF000 == 0xB000 or status in (0x0001, 0x0107, 0x0116):
        return "warning"
    if status == 0xFE00:
        return "cancel"
    return "failure"


ABORT_GRACE_SECONDS = 2.0
"""How long handlers get to return once their associations were aborted at stop."""


def abort_outgoing_associations() -> int:
    """Send A-ABORT (PS3.8 7.3) on every association this process requested that
    is still open; return how many. Called at stop, once every worker has
    finished or had its job released."""
    stuck = [
        t
        for t in threading.enumerate()
        if isinstance(t, Association) and t.is_alive() and t.is_requestor
    ]
    for assoc in stuck:
        assoc.abort()
    if stuck:
        logger.warning("associations aborted at shutdown count=%d", len(stuck))
    return len(stuck)


# -- the process ------------------------------------------------------------------


@dataclass
class Parts:
    """Everything the daemon started, in start order."""

    store: Store
    spool: Spool
    keys: KeyDir
    metrics: Metrics
    listener: Listener | None = None
    http: PeerServer | None = None
    assembler: Assembler | None = None
    inbox: InboxWatcher | None = None
    janitor: Janitor | None = None
    senders: dict[str, SenderTrust] = field(default_factory=dict)
    workers: dict[str, Worker] = field(default_factory=dict)
    breakers: dict[str, BreakerBoard] = field(default_factory=dict)
    clients: list = field(default_factory=list)  # things with close()


class Bridge:
    """One bridge process; :meth:`start` opens its sockets, :meth:`stop` ends it."""

    def __init__(self, config: Config):
        self.config = config
        self.parts: Parts | None = None
        self.keys_created = False

    # -- start ------------------------------------------------------------------

    def start(self) -> None:
        """Create the state, start the workers, open the listener and HTTP server.

        Raises a BridgeError (keys, store, spool) or OSError (a port that cannot
        be bound); whatever was started by then is stopped again.
        """
        cfg = self.config
        cfg.node.data_dir.mkdir(parents=True, exist_ok=True)
        keys, self.keys_created = ensure_keys(cfg)
        store = open_store(cfg.store_url, busy_timeout=cfg.store.busy_timeout_seconds)
        if isinstance(store, SQLiteStore):
            # One process per SQLite file: every lease found now is a dead
            # process's, so its jobs are taken up again at once.
            try:
                store.hold_exclusively()
            except BaseException:
                store.close()
                raise
            if freed := store.expire_leases():
                logger.info("leases of an earlier run ended jobs=%d", freed)
        parts = Parts(store, Spool(cfg.spool_dir), keys, Metrics(cfg))
        # Alone on its store, nothing in the spool is in progress but ours: what
        # a crash left half-written goes now. On a shared spool, only what is
        # an hour old, so that another process's work is left alone.
        parts.spool.sweep_interrupted(0 if isinstance(store, SQLiteStore) else 3600)
        parts.senders = {
            s.name: sender_trust(s, cfg.receiving, cfg.node.id) for s in cfg.senders
        }
        self.parts = parts
        try:
            parts.janitor = Janitor(
                store, parts.spool, cfg.spool.retention_hours * 3600.0
            )
            parts.janitor.start()
            self._start_workers(parts)
            self._start_listener(parts)
            self._start_http(parts)
        except BaseException:
            self.stop()
            raise
        parts.metrics.attach_state(
            store=store,
            spool_path=cfg.spool_dir,
            peer_breakers=parts.breakers.get("peer"),
            destination_breakers=parts.breakers.get("destination"),
        )
        logger.info("bridge started version=%s", __version__)

    def _start_workers(self, parts: Parts) -> None:
        cfg = self.config
        specs: list[WorkerSpec] = []
        if cfg.peers:
            specs += self._sending_specs(parts)
        if cfg.senders and cfg.destinations:
            specs += self._receiving_specs(parts)
        for spec in specs:
            worker = Worker(
                parts.store,
                spec,
                on_result=parts.metrics.job_result,
                node=cfg.node.name,
            )
            parts.workers[spec.queue] = worker
            worker.start()

    def _sending_specs(self, parts: Parts) -> list[WorkerSpec]:
        cfg = self.config
        node = node_entity(cfg)
        peers = {
            p.name: PeerEnvelopeSettings(
                name=p.name,
                receiver=peer_entity(p),
                recipient_public=load_encryption_public(p.encryption_key),
                dialect=p.dialect,
            )
            for p in cfg.peers
        }
        sealer = Sealer(
            parts.store,
            parts.spool,
            node,
            parts.keys.signing_key,
            peers,
            on_built=lambda peer, size, stages: parts.metrics.envelope_built(
                peer, size, stages
            ),
            governance=sender_governance(cfg),
            on_held=parts.metrics.study_held,
        )
        deliverer = Deliverer(
            parts.store,
            parts.spool,
            [peer_transport(p) for p in cfg.peers],
            node=node,
            signing_key=parts.keys.signing_key,
            receivers={p.name: p.receiver for p in peers.values()},
        )
        parts.clients.append(deliverer)
        board = BreakerBoard(
            BreakerPolicy(),
            policy_by_target={p.name: breaker_policy(p) for p in cfg.peers},
        )
        parts.breakers["peer"] = board
        return [
            WorkerSpec("seal", sealer, threads=1),
            WorkerSpec(
                "deliver",
                deliverer,
                retry=retry_policy(RetrySettings()),
                retry_by_target={p.name: retry_policy(p.retry) for p in cfg.peers},
                breakers=board,
                threads=2,
            ),
        ]

    def _receiving_specs(self, parts: Parts) -> list[WorkerSpec]:
        cfg = self.config
        node = node_entity(cfg)
        names = list(cfg.receiving.destinations) or [d.name for d in cfg.destinations]
        dests = {d.name: destination(d) for d in cfg.destinations if d.name in names}
        opener = Opener(
            parts.store,
            parts.spool,
            parts.keys.encryption_key,
            parts.senders,
            names,
            on_outcome=parts.metrics.envelope_received,
            node=node,
            signing_key=parts.keys.signing_key,
        )

        def forwarded(name, result) -> None:
            for inst in result.instances:
                parts.metrics.instance_forwarded(name, inst.outcome.value)
            for _ in range(result.converted):
                parts.metrics.conversion(name)

        board = BreakerBoard(
            BreakerPolicy(),
            policy_by_target={d.name: breaker_policy(d) for d in cfg.destinations},
        )
        parts.breakers["destination"] = board
        forwarder = Forwarder(
            parts.store,
            parts.spool,
            dests,
            on_result=forwarded,
            receipts=any(s.reply_peer for s in cfg.senders),
            node=node,
            signing_key=parts.keys.signing_key,
        )
        specs = [
            WorkerSpec("open", opener),
            WorkerSpec(
                "forward",
                forwarder,
                retry=retry_policy(RetrySettings()),
                retry_by_target={
                    d.name: retry_policy(d.retry) for d in cfg.destinations
                },
                breakers=board,
                threads=2,
            ),
        ]
        replies = {s.name: s.reply_peer for s in cfg.senders if s.reply_peer}
        if replies:
            clients = {
                p.name: PeerClient(peer_transport(p))
                for p in cfg.peers
                if p.name in replies.values()
            }
            parts.clients.extend(clients.values())

            def post(sender: str, env_id: str, jws: bytes) -> None:
                clients[replies[sender]].send_receipt(env_id, jws)

            sender = ReceiptSender(
                parts.store, cfg.node.id, parts.keys.signing_key, post
            )
            specs.append(
                WorkerSpec("receipt", sender, retry=retry_policy(RetrySettings()))
            )
        return specs

    def _start_listener(self, parts: Parts) -> None:
        """Start the listener: for modalities (routes) and for commitment results.

        A receiving node whose destinations ask for storage commitment runs one
        too, since a PACS may send its result on an association of its own; it
        offers those destinations nothing but commitment and verification.
        """
        cfg = self.config
        routes = [route_rule(r) for r in cfg.routes]
        reporters = commitment_callers(cfg)
        if not routes and not reporters:
            return
        dicom = cfg.dicom
        ingest = None
        if routes:
            parts.assembler = Assembler(
                parts.store,
                routes,
                on_sealed=parts.metrics.study_sealed,
                on_held=parts.metrics.study_held,
            )
            ingest = Ingest(
                parts.store,
                parts.spool,
                routes,
                IngestSettings(
                    duplicates=DuplicatePolicy(dicom.duplicates),
                    unrouted=Unrouted(dicom.unrouted),
                ),
                on_sealed=parts.metrics.study_sealed,
                on_deadline=parts.assembler.note_deadline,
            )
            parts.assembler.start()
        settings = ListenerSettings(
            ae_title=dicom.ae_title,
            host=dicom.host,
            port=dicom.port,
            check_called_ae=dicom.check_called_ae,
            allowed_callers=tuple(
                AllowedCaller(c.ae_title, c.host) for c in dicom.allowed_callers
            ),
            max_associations=dicom.max_associations,
            min_free_bytes=cfg.spool.min_free_bytes,
            min_free_ratio=cfg.spool.min_free_ratio,
            max_pdu=dicom.max_pdu,
            tls=listener_tls(dicom.tls),
            commitment_callers=reporters,
        )
        parts.listener = Listener(
            settings,
            ingest,
            stats=MeteredListenerStats(parts.metrics),
            commitment=CommitmentReports(parts.store) if reporters else None,
        )
        parts.listener.start()

    def _start_http(self, parts: Parts) -> None:
        cfg = self.config
        http = cfg.http
        tls = http.tls
        server = peer_settings.ServerSettings(
            host=http.host,
            port=http.port,
            tls_cert=tls.cert if tls else None,
            tls_key=tls.key if tls else None,
            client_ca=tls.ca if tls else None,
            require_client_cert=tls.require_client_cert if tls else False,
            max_body_bytes=http.max_body_bytes,
            body_idle_seconds=http.body_idle_seconds,
            max_connections_per_client=http.max_connections_per_client,
        )
        senders = [inbound_sender(s) for s in cfg.senders]
        intake = Intake(
            parts.store,
            parts.spool,
            senders,
            trust={name: s.trust for name, s in parts.senders.items()},
            policies={name: s.policy for name, s in parts.senders.items()},
            on_refused=parts.metrics.envelope_received,
        )
        app: web.Application = create_app(server, senders, intake)
        trust_by_peer = {
            p.name: TrustStore([(p.entity.id, load_signing_public(p.signing_key))])
            for p in cfg.peers
            if p.signing_key is not None
        }
        add_receipt_route(app, parts.store, trust_by_peer)
        add_ops_routes(
            app,
            OpsContext(
                config=cfg,
                store=parts.store,
                metrics=parts.metrics,
                spool_path=cfg.spool_dir,
                peer_breakers=parts.breakers.get("peer"),
                destination_breakers=parts.breakers.get("destination"),
                checks=self._readiness(parts),
            ),
        )
        parts.http = PeerServer(app, server)
        parts.http.start()
        if cfg.receiving.inbox_folder is not None:
            parts.inbox = InboxWatcher(cfg.receiving.inbox_folder, senders, intake)
            parts.inbox.start()

    def _readiness(self, parts: Parts) -> list:
        # A node without routes or commitment destinations runs no listener.
        has_listener = bool(self.config.routes or commitment_callers(self.config))
        return standard_checks(
            store=parts.store,
            spool_path=self.config.spool_dir,
            spool=self.config.spool,
            listener_bound=lambda: (
                not has_listener
                or (parts.listener is not None and parts.listener.bound)
            ),
            keys=parts.keys,
        )

    # -- stop -------------------------------------------------------------------

    def stop(self, timeout: float = 20.0) -> None:
        """Stop accepting, let workers finish or release their jobs, close.

        The workers get ``timeout`` seconds between them; with the HTTP
        server's grace and the abort of stuck associations the whole stop
        takes under 30 s (docs/architecture.md, "Shutdown").
        """
        parts = self.parts
        if parts is None:
            return
        for door in (
            parts.listener,
            parts.inbox,
            parts.http,
            parts.assembler,
            parts.janitor,
        ):
            if door is not None:
                door.stop()
        for worker in parts.workers.values():
            worker.stopping.set()
        share = timeout / max(len(parts.workers), 1)
        for worker in parts.workers.values():
            worker.stop(timeout=share)
        # A handler still waiting on a peer that does not answer has had its job
        # released just now. Abort its association, so that it returns and the
        # process can end: pynetdicom's DUL thread is not a daemon thread.
        if abort_outgoing_associations():
            grace = ABORT_GRACE_SECONDS / len(parts.workers)
            for worker in parts.workers.values():
                worker.stop(timeout=grace)
        for client in parts.clients:
            client.close()
        parts.store.close()
        self.parts = None
        logger.info("bridge stopped")

    # -- summary ----------------------------------------------------------------

    def summary(self) -> str:
        """Return the one-screen start-up summary; it never shows a secret."""
        cfg, parts = self.config, self.parts
        lines = [f"jmix-bridge {__version__}  node {cfg.node.id} ({cfg.node.name})"]
        if parts and parts.listener is not None:
            lines.append(
                f"  DICOM     AE {cfg.dicom.ae_title} on {cfg.dicom.host}:"
                f"{parts.listener.port}"
            )
        if parts and parts.http is not None:
            scheme = "https" if cfg.http.tls else "http"
            lines.append(
                f"  HTTP      {scheme}://{cfg.http.host}:{parts.http.port}"
                "  (/api/jmix, /metrics, /healthz, /readyz, /status)"
            )
        for r in cfg.routes:
            lines.append(f"  route     {r.name} -> {', '.join(r.peers)}")
        for p in cfg.peers:
            where = p.url if p.transport == "http" else f"drop folder {p.drop_folder}"
            lines.append(f"  peer      {p.name} ({p.entity.id}) at {where}")
        for s in cfg.senders:
            lines.append(f"  sender    {s.name} ({s.id}), trust {s.trust}")
        for d in cfg.destinations:
            lines.append(f"  PACS      {d.name}: AE {d.ae_title} at {d.host}:{d.port}")
        lines.append(f"  state     {cfg.store_url}")
        lines.append(f"  spool     {cfg.spool_dir}")
        if parts:
            note = "  (created now)" if self.keys_created else ""
            lines.append(f"  keys      {cfg.keys_dir}{note}")
            lines.append(f"    signing     {parts.keys.signing_fingerprint}")
            lines.append(f"    encryption  {parts.keys.encryption_fingerprint}")
        return "\n".join(lines)


def run(config: Config, *, out=print) -> int:
    """Run a bridge until SIGTERM or SIGINT; return the process exit code."""
    stop = threading.Event()
    bridge = Bridge(config)
    previous = {
        sig: signal.signal(sig, lambda signum, frame: stop.set())
        for sig in (signal.SIGTERM, signal.SIGINT)
    }
    try:
        bridge.start()
        out(bridge.summary(), flush=True)
        stop.wait()
        logger.info("shutdown requested")
    finally:
        bridge.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0
