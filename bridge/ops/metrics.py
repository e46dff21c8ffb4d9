"""Prometheus metrics of one bridge: every metric defined once, here.

:class:`Metrics` owns its own ``CollectorRegistry`` (never the global one, so
several bridges can live in one test process). Components call its small
methods as things happen (``association_accepted``, ``study_sealed``, ...);
what lives in the store, the spool, the circuit breakers and the certificate
files is read at scrape time by :class:`StateCollector`, so those gauges can
never drift from the truth.

Every label value comes from a bounded set: the configured peers, senders,
destinations and calling AE titles, or a short fixed word chosen by the code
(an outcome, a trigger, a stage). Anything else is folded into ``other`` before
it reaches a metric, so a UID or a patient value can never become a series.
``docs/metrics.md`` documents every metric and the sample alerts.
"""

from __future__ import annotations

import logging
import os
import platform
import re
import shutil
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import pydicom
import pynetdicom
from cryptography import x509
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    generate_latest,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from bridge import __version__
from bridge.config import Config
from bridge.store.base import JobState, Store
from bridge.workers.policy import BreakerBoard

logger = logging.getLogger(__name__)

PREFIX = "jmix_bridge"
OTHER = "other"
NONE = "none"

# Code-chosen label values (outcomes, triggers, stages, queue names) must look
# like short words; anything else is a bug or input and is folded into "other".
_WORD = re.compile(r"^[a-z][a-z0-9_]{0,31}$")

# DIMSE status classes of PS3.7 Annex C that a C-STORE or C-ECHO response can
# carry (neither has a pending status): the only values dimse_status() keeps.
STATUS_CLASSES = frozenset({"success", "warning", "failure", "cancel"})

# Why the listener refused an association (bridge.dicom.listener, hyphens made
# underscores); anything else reads "other".
REJECT_REASONS = frozenset(
    {
        "calling_ae",
        "host",
        "called_ae",
        "unrouted",
        "max_associations",
        "disk_full",
        "error",
    }
)

# Why an envelope was accepted or refused on the receiving side.
RECEIVE_OUTCOMES = frozenset(
    {
        "accepted",
        "bad_signature",
        "unknown_sender",
        "decrypt_failed",
        "hash_mismatch",
        "duplicate",
        "expired",
        "malformed",
        "policy_violation",
        "unauthorized",
        "too_large",
    }
)

_SIZE_BUCKETS = tuple(float(2**n) for n in range(16, 37, 2))  # 64 KiB .. 64 GiB
_SECONDS_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
_ASSEMBLY_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600)

_SPOOL_SIZE_CACHE_SECONDS = 30.0


def word(value: str, allowed: Iterable[str] | None = None) -> str:
    """Return ``value`` as a label value: a short word, else ``other``.

    Hyphens become underscores (``max-age`` -> ``max_age``). With ``allowed``,
    only those words are kept.
    """
    value = (value or "").strip().lower().replace("-", "_")
    if not _WORD.match(value):
        return OTHER
    if allowed is not None and value not in allowed:
        return OTHER
    return value


class LabelSet:
    """A bounded set of names (peers, AE titles); anything else reads ``other``."""

    def __init__(self, names: Iterable[str], *, empty: str = NONE):
        self.names = frozenset(n.strip() for n in names if n and n.strip())
        self.empty = empty

    def __call__(self, value: str | None) -> str:
        """Return ``value`` if it is one of the names, else ``other``."""
        value = (value or "").strip()
        if not value:
            return self.empty
        return value if value in self.names else OTHER


def calling_ae_titles(config: Config) -> frozenset[str]:
    """Return the calling AE titles a metric may name: allow-list and routes.

    Route patterns with glob characters match unknown titles, so only their
    literal entries count.
    """
    titles = {c.ae_title for c in config.dicom.allowed_callers}
    for route in config.routes:
        titles.update(p for p in route.calling_ae if not set(p) & set("*?[]"))
    return frozenset(t.strip() for t in titles)


@dataclass(frozen=True)
class CertificateFile:
    """A configured TLS certificate to watch: its name in config and its path."""

    name: str  # e.g. "http", "peer:site-b", "destination:pacs"
    path: Path


def certificate_files(config: Config) -> list[CertificateFile]:
    """Return every TLS certificate file named in the configuration."""
    found: list[CertificateFile] = []

    def add(name: str, tls) -> None:
        if tls is not None and tls.cert is not None:
            found.append(CertificateFile(name, Path(tls.cert)))

    add("dicom", config.dicom.tls)
    add("http", config.http.tls)
    for peer in config.peers:
        add(f"peer:{peer.name}", peer.tls)
    for dest in config.destinations:
        add(f"destination:{dest.name}", dest.tls)
    return found


class Metrics:
    """Every metric of one bridge, in its own registry; thread-safe.

    ``config`` bounds the label values. Call :meth:`attach_state` once the
    store and breaker boards exist so that a scrape also reads them.
    """

    def __init__(self, config: Config | None = None):
        config = config or Config()
        self.config = config
        self.registry = CollectorRegistry(auto_describe=True)
        self.calling_ae = LabelSet(calling_ae_titles(config), empty=OTHER)
        self.peer = LabelSet(p.name for p in config.peers)
        self.sender = LabelSet((s.name for s in config.senders), empty="unknown")
        self.destination = LabelSet(d.name for d in config.destinations)
        self.target = LabelSet(
            [p.name for p in config.peers] + [d.name for d in config.destinations]
        )
        self._state: StateCollector | None = None
        self._define()

    def _define(self) -> None:
        r, p = self.registry, PREFIX

        # -- DICOM listener ------------------------------------------------------
        self.associations_active = Gauge(
            f"{p}_associations_active",
            "DICOM associations currently open on the listener.",
            registry=r,
        )
        self.associations_accepted = Counter(
            f"{p}_associations_accepted_total",
            "DICOM associations accepted, by calling AE title.",
            ["calling_ae"],
            registry=r,
        )
        self.associations_rejected = Counter(
            f"{p}_associations_rejected_total",
            "DICOM associations rejected, by reason.",
            ["reason"],
            registry=r,
        )
        self.instances_received = Counter(
            f"{p}_instances_received_total",
            "DICOM instances received by C-STORE and stored in the spool.",
            ["calling_ae"],
            registry=r,
        )
        self.instances_replaced = Counter(
            f"{p}_instances_replaced_total",
            "DICOM instances that replaced a changed earlier version of themselves "
            "(duplicate policy keep-newest); the earlier one is kept under replaced/.",
            ["calling_ae"],
            registry=r,
        )
        self.received_bytes = Counter(
            f"{p}_received_bytes_total",
            "Bytes of DICOM instances received by C-STORE.",
            ["calling_ae"],
            registry=r,
        )
        self.dimse_responses = Counter(
            f"{p}_dimse_responses_total",
            "DIMSE responses the listener sent, by status class (PS3.7 Annex C).",
            ["status"],
            registry=r,
        )

        # -- study assembly ----------------------------------------------------------
        self.studies_sealed = Counter(
            f"{p}_studies_sealed_total",
            "Studies sealed for packing, by what triggered the seal.",
            ["trigger"],
            registry=r,
        )
        self.studies_held = Counter(
            f"{p}_studies_held_total",
            "Studies held back for an operator instead of being sent.",
            registry=r,
        )
        self.study_assembly = Histogram(
            f"{p}_study_assembly_seconds",
            "Time from a study's first instance to its seal.",
            buckets=_ASSEMBLY_BUCKETS,
            registry=r,
        )

        # -- envelopes out -----------------------------------------------------------
        self.envelopes_built = Counter(
            f"{p}_envelopes_built_total",
            "JMIX envelopes built, by the peer they go to.",
            ["peer"],
            registry=r,
        )
        self.envelope_size = Histogram(
            f"{p}_envelope_size_bytes",
            "Size of built JMIX envelopes.",
            ["peer"],
            buckets=_SIZE_BUCKETS,
            registry=r,
        )
        self.envelope_build = Histogram(
            f"{p}_envelope_build_seconds",
            "Time spent building an envelope, by build stage.",
            ["stage"],
            buckets=_SECONDS_BUCKETS,
            registry=r,
        )

        # -- envelopes in ------------------------------------------------------------
        self.envelopes_received = Counter(
            f"{p}_envelopes_received_total",
            "JMIX envelopes received from peers, by sender and outcome.",
            ["sender", "outcome"],
            registry=r,
        )

        # -- jobs and forwarding -----------------------------------------------------
        self.job_attempts = Counter(
            f"{p}_job_attempts_total",
            "Job attempts (deliveries, seals, opens, forwards) by result.",
            ["queue", "target", "result"],
            registry=r,
        )
        self.instances_forwarded = Counter(
            f"{p}_instances_forwarded_total",
            "Instances sent by C-STORE to a local PACS, by outcome.",
            ["destination", "outcome"],
            registry=r,
        )
        self.conversions = Counter(
            f"{p}_conversions_total",
            "Instances converted to another transfer syntax for a destination.",
            ["destination"],
            registry=r,
        )

        # -- build info --------------------------------------------------------------
        self.build = Info(
            f"{p}_build", "Versions of the bridge and its runtime.", registry=r
        )
        self.build.info(
            {
                "version": __version__,
                "python": platform.python_version(),
                "pydicom": pydicom.__version__,
                "pynetdicom": pynetdicom.__version__,
            }
        )

    # -- what the components call --------------------------------------------------

    def association_accepted(self, calling_ae: str) -> None:
        """Count an accepted association and one more open association."""
        self.associations_accepted.labels(self.calling_ae(calling_ae)).inc()
        self.associations_active.inc()

    def association_closed(self) -> None:
        """Count one fewer open association (released or aborted)."""
        self.associations_active.dec()

    def association_rejected(self, reason: str) -> None:
        """Count a rejected association; ``reason`` is one of ``REJECT_REASONS``."""
        self.associations_rejected.labels(word(reason, REJECT_REASONS)).inc()

    def instance_received(self, calling_ae: str, nbytes: int) -> None:
        """Count an instance stored in the spool and its size."""
        label = self.calling_ae(calling_ae)
        self.instances_received.labels(label).inc()
        self.received_bytes.labels(label).inc(max(0, nbytes))

    def instance_replaced(self, calling_ae: str) -> None:
        """Count an instance that replaced an earlier version of itself."""
        self.instances_replaced.labels(self.calling_ae(calling_ae)).inc()

    def dimse_status(self, status_class: str) -> None:
        """Count a DIMSE response: success, warning, failure or cancel."""
        self.dimse_responses.labels(word(status_class, STATUS_CLASSES)).inc()

    def study_sealed(self, trigger: str, assembly_seconds: float) -> None:
        """Count a sealed study and observe how long it took to assemble."""
        self.studies_sealed.labels(word(trigger)).inc()
        self.study_assembly.observe(max(0.0, assembly_seconds))

    def study_held(self) -> None:
        """Count a study held back for an operator."""
        self.studies_held.inc()

    def envelope_built(
        self, peer: str, size_bytes: int, stage_seconds: Mapping[str, float]
    ) -> None:
        """Count a built envelope, its size and the seconds of each build stage."""
        label = self.peer(peer)
        self.envelopes_built.labels(label).inc()
        self.envelope_size.labels(label).observe(max(0, size_bytes))
        for stage, seconds in stage_seconds.items():
            self.envelope_build.labels(word(stage)).observe(max(0.0, seconds))

    def envelope_received(self, outcome: str, sender: str = "") -> None:
        """Count a received envelope by outcome (see ``RECEIVE_OUTCOMES``)."""
        self.envelopes_received.labels(
            self.sender(sender), word(outcome, RECEIVE_OUTCOMES)
        ).inc()

    def job_result(self, queue: str, target: str, result: str) -> None:
        """Count a job attempt; fits ``Worker(on_result=metrics.job_result)``."""
        self.job_attempts.labels(word(queue), self.target(target), word(result)).inc()

    def instance_forwarded(self, destination: str, outcome: str) -> None:
        """Count an instance sent to a local PACS by outcome."""
        self.instances_forwarded.labels(
            self.destination(destination), word(outcome)
        ).inc()

    def conversion(self, destination: str) -> None:
        """Count an instance converted to another transfer syntax."""
        self.conversions.labels(self.destination(destination)).inc()

    # -- scrape ----------------------------------------------------------------------

    def attach_state(
        self,
        *,
        store: Store | None = None,
        spool_path: Path | None = None,
        peer_breakers: BreakerBoard | None = None,
        destination_breakers: BreakerBoard | None = None,
    ) -> None:
        """Read these at every scrape (queue depth, spool, peer up, certificates).

        Calling it again replaces what an earlier call attached.
        """
        if self._state is not None:
            self.registry.unregister(self._state)
        self._state = StateCollector(
            self,
            store=store,
            spool_path=spool_path,
            peer_breakers=peer_breakers,
            destination_breakers=destination_breakers,
        )
        self.registry.register(self._state)

    def exposition(self) -> bytes:
        """Return the text exposition of every metric; blocking (reads the store)."""
        return generate_latest(self.registry)


class StateCollector(Collector):
    """Gauges read at scrape time from the store, spool, breakers and certificates.

    A source that fails is logged and left out of that scrape;
    ``jmix_bridge_store_up`` says whether the store answered.
    """

    def __init__(
        self,
        metrics: Metrics,
        *,
        store: Store | None,
        spool_path: Path | None,
        peer_breakers: BreakerBoard | None,
        destination_breakers: BreakerBoard | None,
        clock: Callable[[], float] = time.time,
    ):
        self.metrics = metrics
        self.store = store
        self.spool_path = Path(spool_path) if spool_path else None
        self.peer_breakers = peer_breakers
        self.destination_breakers = destination_breakers
        self.clock = clock
        self.certificates = certificate_files(metrics.config)
        self._spool_size: tuple[float, int] | None = None
        self._lock = threading.Lock()

    def describe(self):
        """Return nothing: the series are known only at scrape time."""
        return []

    def collect(self):
        """Yield every state gauge; called by the registry at each scrape."""
        if self.store is not None:
            yield from self._store_metrics()
        if self.spool_path is not None:
            yield from self._spool_metrics()
        yield from self._up_metrics()
        yield from self._certificate_metrics()

    def _store_metrics(self):
        p, m = PREFIX, self.metrics
        up = GaugeMetricFamily(
            f"{p}_store_up", "1 when the state store answered this scrape."
        )
        try:
            counts = self.store.job_counts()
            open_studies = len(self.store.open_studies())
            quarantined = len(
                self.store.find_envelopes(
                    direction="in", state="quarantined", limit=100_000
                )
            )
        except Exception as exc:
            logger.warning("metrics store read failed error=%s", type(exc).__name__)
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up

        now = self.clock()
        depth = GaugeMetricFamily(
            f"{p}_queue_jobs",
            "Jobs waiting or running, by queue, target and state (done left out).",
            labels=["queue", "target", "state"],
        )
        oldest = GaugeMetricFamily(
            f"{p}_queue_oldest_job_age_seconds",
            "Age of the oldest ready or leased job, by queue and target.",
            labels=["queue", "target"],
        )
        dead = GaugeMetricFamily(
            f"{p}_dead_letter_jobs",
            "Jobs parked in dead-letter, waiting for an operator.",
            labels=["queue", "target"],
        )
        depth_values: dict[tuple[str, str, str], float] = {}
        oldest_values: dict[tuple[str, str], float] = {}
        dead_values: dict[tuple[str, str], float] = {}
        for c in counts:
            queue, target = word(c.queue), m.target(c.target)
            if c.state is JobState.DONE:
                continue
            key = (queue, target, c.state.value)
            depth_values[key] = depth_values.get(key, 0) + c.count
            if c.state is JobState.DEAD:
                dead_values[(queue, target)] = (
                    dead_values.get((queue, target), 0) + c.count
                )
            elif c.oldest_created is not None:
                age = max(0.0, now - c.oldest_created)
                oldest_values[(queue, target)] = max(
                    age, oldest_values.get((queue, target), 0.0)
                )
        for key, value in sorted(depth_values.items()):
            depth.add_metric(list(key), value)
        for key, value in sorted(oldest_values.items()):
            oldest.add_metric(list(key), value)
        for key, value in sorted(dead_values.items()):
            dead.add_metric(list(key), value)
        yield depth
        yield oldest
        yield dead
        yield GaugeMetricFamily(
            f"{p}_studies_open",
            "Studies still receiving instances (not yet sealed).",
            value=open_studies,
        )
        yield GaugeMetricFamily(
            f"{p}_quarantined_envelopes",
            "Received envelopes kept in quarantine for an operator.",
            value=quarantined,
        )

    def _spool_metrics(self):
        p = PREFIX
        try:
            usage = shutil.disk_usage(self.spool_path)
            used = self._spool_bytes()
        except OSError as exc:
            logger.warning("metrics spool read failed error=%s", type(exc).__name__)
            return
        yield GaugeMetricFamily(
            f"{p}_spool_used_bytes",
            "Bytes of files under the spool folder (recounted at most every 30 s).",
            value=used,
        )
        yield GaugeMetricFamily(
            f"{p}_spool_free_bytes",
            "Bytes free on the spool's filesystem.",
            value=usage.free,
        )
        yield GaugeMetricFamily(
            f"{p}_spool_free_ratio",
            "Free fraction (0-1) of the spool's filesystem.",
            value=usage.free / usage.total if usage.total else 0.0,
        )

    def _spool_bytes(self) -> int:
        # Walking a large spool costs; a scrape every few seconds need not.
        with self._lock:
            now = time.monotonic()
            if (
                self._spool_size
                and now - self._spool_size[0] < _SPOOL_SIZE_CACHE_SECONDS
            ):
                return self._spool_size[1]
            total = _tree_bytes(self.spool_path)
            self._spool_size = (now, total)
            return total

    def _up_metrics(self):
        p, m = PREFIX, self.metrics
        for kind, names, board in (
            ("peer", [x.name for x in m.config.peers], self.peer_breakers),
            (
                "destination",
                [x.name for x in m.config.destinations],
                self.destination_breakers,
            ),
        ):
            family = GaugeMetricFamily(
                f"{p}_{kind}_up",
                f"1 while the {kind}'s circuit breaker is closed, else 0.",
                labels=[kind],
            )
            states = board.states() if board else {}
            for name in names:
                family.add_metric(
                    [name], 1 if states.get(name, "closed") == "closed" else 0
                )
            yield family

    def _certificate_metrics(self):
        family = GaugeMetricFamily(
            f"{PREFIX}_certificate_expiry_seconds",
            "Seconds until a configured TLS certificate's notAfter; negative: expired.",
            labels=["certificate"],
        )
        now = self.clock()
        for cert in self.certificates:
            try:
                not_after = certificate_not_after(cert.path)
            except (OSError, ValueError) as exc:
                logger.warning(
                    "certificate unreadable certificate=%s error=%s",
                    cert.name,
                    type(exc).__name__,
                )
                continue
            family.add_metric([cert.name], not_after - now)
        yield family


def certificate_not_after(path: Path) -> float:
    """Return the notAfter of the first certificate in a PEM or DER file (POSIX s).

    Raises OSError when the file cannot be read, ValueError when it holds no
    certificate.
    """
    data = Path(path).read_bytes()
    if b"-----BEGIN CERTIFICATE-----" in data:
        cert = x509.load_pem_x509_certificate(data)
    else:
        cert = x509.load_der_x509_certificate(data)
    return cert.not_valid_after_utc.timestamp()


def _tree_bytes(root: Path) -> int:
    total = 0
    for folder, _dirs, files in os.walk(root):
        for name in files:
            try:
                total += os.lstat(os.path.join(folder, name)).st_size
            except OSError:
                continue  # removed while we walked
    return total
