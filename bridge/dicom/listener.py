"""The DICOM listener: a C-STORE and C-ECHO SCP that takes studies in, and the
receiver of storage commitment results a PACS sends on an association of its own.

Each association runs in its own pynetdicom thread. Data sets stream to a file
in the spool's ``incoming/`` folder as they arrive (pynetdicom's chunked
receive), never decoded, so a 1 GB multi-frame instance does not sit in memory;
the handler passes the file to :class:`~bridge.ingest.Ingest`, which moves it
into the spool, fsyncs it and records it, and only then is success answered.

Association policy lives in one handler on ``EVT_REQUESTED``, pynetdicom's
supported place to send an A-ASSOCIATE-RJ before negotiation: allowed calling
AE titles and hosts, our called AE title, the association limit and the
free-disk watermark. The same handler decides what the association may do, and
offers only those presentation contexts: storage to callers allowed to store
(and only when there is an ingest), Storage Commitment Push Model to the PACS
that may report commitment results (PS3.4 J.3.3), Verification to both. Nothing
escapes a handler: every failure becomes a DIMSE status or an association
rejection, one log line and a counter.

Logging: one INFO line when an association is accepted and one when it ends,
with what it carried (instances accepted and refused, bytes, commitment
reports, seconds); each accepted instance is a DEBUG line.

Setting up pynetdicom touches process-wide switches (chunked receive,
unrestricted storage, no identifier logging, the folder for received data
sets); one process runs one listener.
"""

from __future__ import annotations

import logging
import socket
import ssl
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from tempfile import NamedTemporaryFile

from pynetdicom import AE, _config, dimse_messages, evt
from pynetdicom.sop_class import Verification

from bridge.dicom.admission import (
    NOTHING,
    Admission,
    AdmissionSwitch,
    AllowedCaller,
    Callers,
    contexts_for,
    proposes_storage,
)
from bridge.dicom.commitment import CommitmentReports
from bridge.errors import BridgeError
from bridge.faults import test_only_crash_point
from bridge.ingest import Ingest, Receipt, Rejection
from bridge.store import InstanceOutcome
from bridge.tls import log_handshake_failures

logger = logging.getLogger(__name__)

SUCCESS = 0x0000
# PS3.4 B.2.3: "Refused: Out of Resources". The modality may try again later,
# which is right for a full disk or a state store that cannot commit.
OUT_OF_RESOURCES = 0xA700
# PS3.4 B.2.3: "Error: Data Set does not match SOP Class". Study, Series and
# SOP Instance UID and SOP Class UID are Type 1 in every composite IOD.
DATA_SET_MISMATCH = 0xA900
# PS3.4 B.2.3: "Error: Cannot understand". The data set does not parse.
CANNOT_UNDERSTAND = 0xC000
# PS3.7 C.5.x general statuses: "Refused: Not authorized" when no route takes
# the instance or the caller may not send it, and "Duplicate SOP Instance" when
# its UID is known with other bytes and the policy is to reject.
NOT_AUTHORIZED = 0x0124
DUPLICATE_SOP_INSTANCE = 0x0111

# The process-wide pynetdicom switches the listener sets, and restores on stop.
_PYNETDICOM_SWITCHES = (
    "STORE_RECV_CHUNKED_DATASET",
    "UNRESTRICTED_STORAGE_SERVICE",
    "LOG_REQUEST_IDENTIFIERS",
    "LOG_RESPONSE_IDENTIFIERS",
)

_REJECTION_STATUS = {
    Rejection.UNREADABLE: CANNOT_UNDERSTAND,
    Rejection.INVALID: DATA_SET_MISMATCH,
    Rejection.UNROUTED: NOT_AUTHORIZED,
    Rejection.CONFLICT: DUPLICATE_SOP_INSTANCE,
}

# PS3.8 9.3.4 A-ASSOCIATE-RJ (result, source, diagnostic) by reason:
# permanent from the service user for who is calling, transient from the
# service provider (presentation related) for our own limits.
_ASSOC_REJECT = {
    "calling-ae": (0x01, 0x01, 0x03),  # calling AE title not recognised
    "host": (0x01, 0x01, 0x03),
    "unrouted": (0x01, 0x01, 0x03),
    "called-ae": (0x01, 0x01, 0x07),  # called AE title not recognised
    "max-associations": (0x02, 0x03, 0x02),  # local limit exceeded
    "disk-full": (0x02, 0x03, 0x01),  # temporary congestion
    "error": (0x02, 0x03, 0x01),
}


@dataclass(frozen=True)
class ListenerSettings:
    """The listener's policy; see the module docstring. Times are seconds.

    An empty ``allowed_callers`` lets every calling AE title in. New
    associations are refused while free space on the spool's filesystem is
    below ``min_free_bytes`` or ``min_free_ratio`` (0.0-1.0). ``max_pdu`` is
    the largest P-DATA-TF PDU we accept (PS3.8 9.3.1), 0 for unlimited.
    ``tls`` (see :func:`bridge.tls.server_context`) makes every association
    TLS-only (PS3.15 B.9); a failed handshake is logged, and bounded by
    ``tls_handshake_timeout``. ``receive_buffer_bytes`` is the kernel's receive
    buffer of each association's socket (``SO_RCVBUF``; 0 leaves the system's
    default and its autotuning).

    ``commitment_callers`` are the PACS that may send storage commitment
    results (PS3.4 J.3.3), usually the forwarding destinations: they are let in
    even when not in ``allowed_callers``, but offered only the Storage
    Commitment and Verification contexts unless they are allowed to store too.
    Empty lets no one report.
    """

    ae_title: str = "JMIXBRIDGE"
    host: str = "0.0.0.0"  # noqa: S104 (a DICOM listener serves the network)
    port: int = 11112
    check_called_ae: bool = True
    allowed_callers: tuple[AllowedCaller, ...] = ()
    max_associations: int = 10
    min_free_bytes: int = 0
    min_free_ratio: float = 0.0
    acse_timeout: float = 30.0
    dimse_timeout: float = 60.0
    network_timeout: float = 60.0
    max_pdu: int = 0
    tls: ssl.SSLContext | None = field(default=None, compare=False, repr=False)
    tls_handshake_timeout: float = 10.0
    commitment_callers: tuple[AllowedCaller, ...] = ()
    receive_buffer_bytes: int = 4 << 20


@dataclass
class ListenerStats:
    """Counters of what the listener did, for the metrics layer to read.

    Increments are thread-safe; :meth:`snapshot` returns a consistent copy.
    """

    associations_accepted: int = 0
    associations_rejected: dict[str, int] = field(default_factory=dict)
    instances_stored: int = 0
    instances_duplicate: int = 0
    instances_replaced: int = 0
    bytes_received: int = 0
    instances_rejected: dict[str, int] = field(default_factory=dict)
    statuses: dict[int, int] = field(default_factory=dict)
    _lock: threading.Lock = field(
        default_factory=threading.Lock, repr=False, compare=False
    )

    def association(self, rejected_for: str = "", calling_ae: str = "") -> None:
        """Count an association accepted, or rejected for a reason."""
        with self._lock:
            if rejected_for:
                _bump(self.associations_rejected, rejected_for)
            else:
                self.associations_accepted += 1

    def closed(self) -> None:
        """Note that an accepted association ended (released or aborted)."""

    def instance(
        self, status: int, receipt: Receipt | None, reason: str, calling_ae: str = ""
    ) -> None:
        """Count one C-STORE answered with ``status``."""
        with self._lock:
            _bump(self.statuses, status)
            if receipt is not None and receipt.accepted:
                self.bytes_received += receipt.size_bytes
                if receipt.outcome == InstanceOutcome.DUPLICATE:
                    self.instances_duplicate += 1
                elif receipt.outcome == InstanceOutcome.REPLACED:
                    self.instances_replaced += 1
                else:
                    self.instances_stored += 1
            else:
                _bump(self.instances_rejected, reason)

    def snapshot(self) -> dict:
        """Return every counter as plain values."""
        with self._lock:
            return {
                "associations_accepted": self.associations_accepted,
                "associations_rejected": dict(self.associations_rejected),
                "instances_stored": self.instances_stored,
                "instances_duplicate": self.instances_duplicate,
                "instances_replaced": self.instances_replaced,
                "bytes_received": self.bytes_received,
                "instances_rejected": dict(self.instances_rejected),
                "statuses": dict(self.statuses),
            }


@dataclass
class _Session:
    """One established association, for its summary line.

    Only the association's own thread changes the counts.
    """

    calling_ae: str
    admission: Admission
    started: float = field(default_factory=time.monotonic)
    accepted: int = 0
    refused: int = 0
    bytes: int = 0
    reports: int = 0


class Listener:
    """The C-STORE, C-ECHO and storage commitment report SCP; :meth:`start` opens
    the socket.

    ``ingest`` None makes a node that takes no studies in: no storage context is
    offered to anyone. ``commitment`` receives the N-EVENT-REPORTs of the
    ``commitment_callers`` (PS3.4 J.3.3). Raises ValueError when the listener
    would have nothing to serve, or commitment callers but no ``commitment``.
    """

    def __init__(
        self,
        settings: ListenerSettings,
        ingest: Ingest | None,
        *,
        stats: ListenerStats | None = None,
        commitment: CommitmentReports | None = None,
    ):
        if ingest is None and commitment is None:
            raise ValueError("Listener: expected an ingest or a commitment, got none")
        if settings.commitment_callers and commitment is None:
            raise ValueError(
                "Listener: commitment_callers given but no commitment to record "
                "their reports"
            )
        self.settings = settings
        self.ingest = ingest
        self.spool = ingest.spool if ingest is not None else None
        self.commitment = commitment
        self.stats = stats or ListenerStats()
        self._server = None
        self._ae: AE | None = None
        self._allowed = Callers(())
        self._reporters = Callers(())
        self._switch = AdmissionSwitch()
        self._sessions: dict[int, _Session] = {}  # established, by id(assoc)
        self._lock = threading.Lock()
        self._saved: dict[str, object] = {}
        self._saved_tempfile = NamedTemporaryFile

    @property
    def bound(self) -> bool:
        """True while the listener's socket is open."""
        return self._server is not None

    @property
    def port(self) -> int:
        """The TCP port the listener is bound to (useful with port 0)."""
        if self._server is None:
            raise RuntimeError("the listener is not started")
        return self._server.server_address[1]

    def start(self) -> None:
        """Bind the socket and serve associations on background threads.

        Raises OSError when the address cannot be bound.
        """
        self._configure_pynetdicom()
        self._allowed = Callers(self.settings.allowed_callers)
        self._reporters = Callers(self.settings.commitment_callers)
        if self.ingest is not None and not self.settings.allowed_callers:
            logger.warning("listener accepts any calling AE title")
        if self.ingest is None and not self.settings.commitment_callers:
            logger.warning("listener lets no one in: no ingest, no commitment callers")

        ae = AE(ae_title=self.settings.ae_title)
        # 0 is unlimited and the fastest receive (FIELD-NOTES), the default.
        ae.maximum_pdu_size = self.settings.max_pdu
        ae.maximum_associations = self.settings.max_associations
        ae.acse_timeout = self.settings.acse_timeout
        ae.dimse_timeout = self.settings.dimse_timeout
        ae.network_timeout = self.settings.network_timeout
        # Each association gets its own contexts in _on_requested; this one
        # only satisfies start_server, which wants at least one.
        ae.add_supported_context(Verification)
        handlers = [
            (evt.EVT_REQUESTED, self._on_requested),
            (evt.EVT_ESTABLISHED, self._on_established),
            (evt.EVT_C_STORE, self._on_c_store),
            (evt.EVT_RELEASED, self._on_closed),
            (evt.EVT_ABORTED, self._on_closed),
        ]
        if self.ingest is not None:
            handlers.append((evt.EVT_DIMSE_RECV, self._on_dimse_recv))
        if self.commitment is not None:
            handlers.append((evt.EVT_N_EVENT_REPORT, self._on_n_event_report))
        tls = self.settings.tls
        if tls is not None:
            # pynetdicom's server wraps each accepted socket (handshake
            # included) on its accept thread and drops a failure silently;
            # this bounds the handshake and logs why it failed (README L-30).
            log_handshake_failures(tls, "dicom", self.settings.tls_handshake_timeout)
        self._server = ae.start_server(
            (self.settings.host, self.settings.port),
            block=False,
            evt_handlers=handlers,
            ssl_context=tls,
        )
        if self.settings.receive_buffer_bytes:
            # Accepted sockets inherit the listening socket's buffer. With the
            # default one (128 KiB here) a sender is at most one 128 KiB PDU
            # ahead, and pynetdicom, finding no PDU waiting, sleeps a
            # millisecond between PDUs; with room for whole instances the data
            # set streams in (0.5 MB instances arrived about 40% faster).
            self._server.socket.setsockopt(
                socket.SOL_SOCKET, socket.SO_RCVBUF, self.settings.receive_buffer_bytes
            )
        self._ae = ae
        logger.info(
            "listener started ae_title=%s port=%d tls=%s storage=%s commitment=%s",
            self.settings.ae_title,
            self.port,
            "on" if tls is not None else "off",
            "on" if self.ingest is not None else "off",
            "on" if self.commitment is not None else "off",
        )

    def stop(self) -> None:
        """Stop accepting, end open associations, close the socket and give
        pynetdicom's process-wide switches back their earlier values."""
        if self._server is not None:
            # shutdown() waits for every association to end; one that is idle
            # (a port probe, a modality that never sends A-ASSOCIATE) would hold
            # it for the ACSE timeout. Aborting is safe: nothing unacknowledged
            # is lost, the modality sends it again.
            for assoc in list(self._server.active_associations):
                assoc.abort()
            self._server.shutdown()
            self._server = None
            self._restore_pynetdicom()
            logger.info("listener stopped ae_title=%s", self.settings.ae_title)

    def _configure_pynetdicom(self) -> None:
        self._saved = {name: getattr(_config, name) for name in _PYNETDICOM_SWITCHES}
        self._saved_tempfile = dimse_messages.NamedTemporaryFile
        # Stream each data set to a file instead of decoding it (FIELD-NOTES).
        _config.STORE_RECV_CHUNKED_DATASET = True
        # Accept every storage SOP class, private and future ones included, in
        # whatever transfer syntax the modality proposes first: the bridge
        # stores instances as received and never decodes pixel data. Only for
        # associations admitted to store; see AdmissionSwitch.
        _config.UNRESTRICTED_STORAGE_SERVICE = self._switch
        # STYLE: pynetdicom logs request and response identifiers by default.
        _config.LOG_REQUEST_IDENTIFIERS = False
        _config.LOG_RESPONSE_IDENTIFIERS = False
        # pynetdicom writes received data sets to a NamedTemporaryFile in
        # tempfile's default folder. The spool's IncomingFile takes its place
        # (README L-11): it lies in the spool's incoming/ folder, on the spool's
        # filesystem, so adopting it is a rename rather than a second copy (the
        # spool copies should this ever not hold), and it hashes the data set
        # as it arrives, so adopting it needs no second read either.
        if self.spool is not None:
            dimse_messages.NamedTemporaryFile = self.spool.incoming_file

    def _restore_pynetdicom(self) -> None:
        for name, value in self._saved.items():
            setattr(_config, name, value)
        dimse_messages.NamedTemporaryFile = self._saved_tempfile

    # -- association policy ------------------------------------------------------

    def _on_requested(self, event: evt.Event) -> None:
        assoc = event.assoc
        try:
            reason, admission = self._admission(assoc)
            if not reason:
                self._switch.admit(admission)
                assoc.acceptor.supported_contexts = contexts_for(admission)
                return
        except Exception as exc:  # nothing escapes a handler
            logger.error("association check failed error=%s", _describe(exc))
            reason = "error"
        self.stats.association(
            rejected_for=reason,
            calling_ae=assoc.requestor.primitive.calling_ae_title.strip(),
        )
        logger.warning(
            "association rejected reason=%s calling_ae=%s peer_host=%s",
            reason,
            assoc.requestor.primitive.calling_ae_title,
            assoc.requestor.address,
        )
        # pynetdicom #408: a reject sent from EVT_REQUESTED ends negotiation;
        # kill() then waits for the DUL to put it on the wire, as pynetdicom's
        # own rejections do (acse.py, _negotiate_as_acceptor).
        assoc.acse.send_reject(*_ASSOC_REJECT[reason])
        assoc.kill()

    def _admission(self, assoc) -> tuple[str, Admission]:
        """Return why an association must be refused ("" to accept it), and
        what it may do when accepted."""
        calling = assoc.requestor.primitive.calling_ae_title.strip()
        called = assoc.requestor.primitive.called_ae_title.strip()
        host = assoc.requestor.address

        # Who is calling: a caller allowed to store, one allowed to report
        # storage commitment results, or both.
        if self.ingest is None:
            not_storing = "calling-ae"
        elif self._allowed:
            not_storing = self._allowed.refusal(calling, host)
        else:
            not_storing = ""
        not_reporting = self._reporters.refusal(calling, host)
        if not_storing and not_reporting:
            # A caller known to either list but calling from elsewhere: "host".
            reason = "host" if "host" in (not_storing, not_reporting) else "calling-ae"
            return reason, NOTHING
        if self.settings.check_called_ae and called != self.settings.ae_title.strip():
            return "called-ae", NOTHING
        store, report = not not_storing, not not_reporting
        if store and not self.ingest.admits(calling, called):
            if not report:
                return "unrouted", NOTHING
            store = False

        # Our own limits. A report association (nothing but commitment and
        # verification proposed) writes a row to the state store, not the
        # spool, so it is let in while the disk is short.
        active = [a for a in assoc.ae.active_associations if a.is_acceptor]
        if len(active) > self.settings.max_associations:
            return "max-associations", NOTHING
        if store and not self._has_room():
            if not report or proposes_storage(assoc):
                return "disk-full", NOTHING
            store = False
        return "", Admission(store=store, report=report)

    def _has_room(self) -> bool:
        if self.spool is None:
            return True
        return self.spool.has_room(
            self.settings.min_free_bytes, self.settings.min_free_ratio
        )

    def _on_established(self, event: evt.Event) -> None:
        # The same thread ran _on_requested for this association.
        calling = event.assoc.requestor.ae_title.strip()
        admission = self._switch.admission
        with self._lock:
            self._sessions[id(event.assoc)] = _Session(calling, admission)
        self.stats.association(calling_ae=calling)
        logger.info(
            "association accepted calling_ae=%s peer_host=%s storage=%s commitment=%s",
            calling,
            event.assoc.requestor.address,
            "yes" if admission.store else "no",
            "yes" if admission.report else "no",
        )

    def _on_closed(self, event: evt.Event) -> None:
        # Rejected associations end here too; count only those established.
        with self._lock:
            session = self._sessions.pop(id(event.assoc), None)
        if session is None:
            return
        self.stats.closed()
        logger.info(
            "association ended calling_ae=%s how=%s instances_accepted=%d "
            "instances_refused=%d bytes=%d commitment_reports=%d seconds=%.1f",
            session.calling_ae,
            "released" if event.event == evt.EVT_RELEASED else "aborted",
            session.accepted,
            session.refused,
            session.bytes,
            session.reports,
            time.monotonic() - session.started,
        )

    def _session(self, assoc) -> _Session:
        with self._lock:
            found = self._sessions.get(id(assoc))
        # A request can only come on an established association; an unknown one
        # (never expected) may do nothing.
        return found or _Session("", NOTHING)

    # -- N-EVENT-REPORT ----------------------------------------------------------

    def _on_n_event_report(self, event: evt.Event) -> tuple[int, None]:
        """Pass a storage commitment result to the commitment recorder."""
        session = self._session(event.assoc)
        if not session.admission.report:
            logger.warning(
                "commitment report refused reason=%s calling_ae=%s",
                "not-a-commitment-caller",
                session.calling_ae,
            )
            return NOT_AUTHORIZED, None
        session.reports += 1
        return self.commitment.handle(event)

    # -- C-STORE -----------------------------------------------------------------

    def _on_dimse_recv(self, event: evt.Event) -> None:
        # pynetdicom's DUL thread fires this as soon as a whole message is in,
        # before the association's thread takes it from its queue (it looks
        # every millisecond). A C-STORE data set is then complete on disk, so
        # its fsync starts now and runs while the request waits and its header
        # is read; the instance is still acknowledged only after the fsync.
        try:
            self.spool.sync_received()
        except Exception as exc:  # nothing escapes a handler; adopting fsyncs
            logger.warning("early fsync not started error=%s", _describe(exc))

    def _on_c_store(self, event: evt.Event) -> int:
        """Take one instance in; return its DIMSE status (PS3.4 B.2.3)."""
        assoc = event.assoc
        calling = assoc.requestor.ae_title
        session = self._session(assoc)
        receipt = None
        try:
            if not session.admission.store:
                # Storage contexts are not offered to such callers; this holds
                # should a C-STORE come on another context all the same.
                status, reason, detail = NOT_AUTHORIZED, "not-a-storage-caller", ""
            elif not self._has_room():
                status, reason, detail = OUT_OF_RESOURCES, "disk-full", ""
            else:
                req = event.request
                receipt = self.ingest.receive(
                    Path(event.dataset_path),
                    calling_ae=calling,
                    called_ae=assoc.requestor.primitive.called_ae_title,
                    sop_class_uid=str(req.AffectedSOPClassUID or ""),
                    sop_instance_uid=str(req.AffectedSOPInstanceUID or ""),
                )
                if receipt.accepted:
                    status, reason, detail = SUCCESS, "", ""
                else:
                    status = _REJECTION_STATUS[receipt.rejection]
                    reason, detail = receipt.rejection.value, receipt.detail
        except BridgeError as exc:
            status, reason, detail = OUT_OF_RESOURCES, "storage", str(exc)
        except Exception as exc:  # nothing escapes a handler
            status, reason, detail = OUT_OF_RESOURCES, "error", _describe(exc)

        self.stats.instance(status, receipt, reason, calling.strip())
        if status == SUCCESS:
            session.accepted += 1
            session.bytes += receipt.size_bytes
        else:
            session.refused += 1
        # Recorded (or refused) but not yet answered: the modality never sees
        # this acknowledgement and must send the instance again.
        test_only_crash_point("listener.before-ack")
        if status == SUCCESS:
            logger.debug(
                "instance %s study=%s bytes=%d",
                receipt.outcome.value,
                receipt.study_ref,
                receipt.size_bytes,
            )
        else:
            log = logger.error if status == OUT_OF_RESOURCES else logger.warning
            log(
                "instance refused status=0x%04X reason=%s calling_ae=%s study=%s "
                "detail=%s",
                status,
                reason,
                calling,
                receipt.study_ref if receipt else "",
                detail,
            )
        return status


def _bump(counts: dict, key) -> None:
    counts[key] = counts.get(key, 0) + 1


def _describe(exc: BaseException) -> str:
    """Name an unexpected exception and where it was raised, never its message.

    Messages of third-party exceptions may quote data set values.
    """
    frames = traceback.extract_tb(exc.__traceback__)
    where = (
        f" at {Path(frames[-1].filename).name}:{frames[-1].lineno}" if frames else ""
    )
    return f"{type(exc).__name__}{where}"
