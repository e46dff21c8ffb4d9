"""The forwarder: a C-STORE SCU that stores an opened envelope's instances into a
local PACS (PS3.4 Annex B), with optional storage commitment (PS3.4 Annex J).

A library with no knowledge of queues or HTTP: :func:`forward` takes a
:class:`Destination` and a list of DICOM files and returns a
:class:`ForwardResult` with one outcome per instance, so that a job can resend
only what remains. Per-instance failures never raise; only a destination that
cannot be associated with at all raises a :class:`~bridge.errors.TransportError`.

Files are sent as they are, by path and in chunks (no decoding), whenever the
destination accepts the file's own transfer syntax. Otherwise the instance is
re-encoded in memory: uncompressed syntaxes by pynetdicom, compressed ones by
decompressing the pixel data with pydicom. Conversion is the exception.
"""

import contextlib
import logging
import queue
import socket
import ssl
import threading
import time
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from pydicom.filereader import read_file_meta_info
from pydicom.pixels import get_decoder
from pydicom.uid import (
    UID,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    generate_uid,
)
from pynetdicom import AE, _config, build_context, evt
from pynetdicom.sop_class import (
    StorageCommitmentPushModel,
    StorageCommitmentPushModelInstance,
)

from bridge.dicom.outcomes import (
    Commitment,
    ForwardResult,
    InstanceResult,
    Outcome,
    classify_status,
)
from bridge.errors import PermanentTransportError, RetryableTransportError
from bridge.tls import log_handshake_failures

__all__ = [
    "Commitment",
    "Destination",
    "ForwardResult",
    "InstanceResult",
    "Outcome",
    "TLSSettings",
    "classify_status",
    "forward",
    "ssl_context",
]

logger = logging.getLogger(__name__)

# PS3.8 9.3.1: at most 128 presentation contexts (odd IDs 1-255) in one request.
MAX_CONTEXTS = 128

# PS3.5 10.1: every SCP supports Implicit VR Little Endian; Explicit VR Little
# Endian keeps VRs (private tags survive), so it is proposed first.
_UNCOMPRESSED = (ExplicitVRLittleEndian, ImplicitVRLittleEndian)

# How many times in a row an association may die without a single answered
# C-STORE before the rest of the list is handed back as retryable. One new
# association is enough to get past pynetdicom 3.0.4's stalled request (see
# FIELD-NOTES: a request never reaches the wire); a PACS that is really silent
# then costs two DIMSE timeouts, not one per instance.
_MAX_FRUITLESS_ASSOCIATIONS = 2

# PS3.4 J.3.3 action type of the Request Storage Commitment N-ACTION, and the
# N-EVENT-REPORT event types of its answer (1: all stored, 2: failures exist).
_COMMIT_ACTION = 1
_COMMIT_ALL_STORED = 1


@dataclass(frozen=True)
class TLSSettings:
    """TLS for one destination; all files are PEM paths."""

    cafile: Path | None = None
    certfile: Path | None = None
    keyfile: Path | None = None
    check_hostname: bool = True


@dataclass(frozen=True)
class Destination:
    """A local PACS to store into; timeouts in seconds, ``max_pdu`` 0 = unlimited.

    ``commitment_wait`` is how long to wait on the same association for the
    storage commitment result before recording it as only requested.
    """

    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "JMIXBRIDGE"
    tls: TLSSettings | None = None
    dimse_timeout: float = 10.0
    acse_timeout: float = 10.0
    network_timeout: float = 60.0
    connection_timeout: float = 10.0
    max_pdu: int = 0
    storage_commitment: bool = False
    commitment_wait: float = 2.0


def ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """Build the client TLS context for ``tls``; the server is always verified.

    Raises PermanentTransportError when a certificate or key file cannot be
    loaded, since retrying cannot fix a configuration.
    """
    try:
        ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=tls.cafile)
        if tls.certfile:
            ctx.load_cert_chain(tls.certfile, tls.keyfile)
    except (OSError, ssl.SSLError) as exc:
        raise PermanentTransportError(
            f"tls: cannot load cafile={tls.cafile} certfile={tls.certfile} "
            f"keyfile={tls.keyfile}: {exc}"
        ) from exc
    ctx.check_hostname = tls.check_hostname
    return log_handshake_failures(ctx, "forward")


@dataclass
class _Item:
    """One readable file waiting to go."""

    index: int
    path: Path
    sop_class: UID
    sop_instance: UID
    syntax: UID


# (index in the file list, its result, its SOP Class UID): see forward().
InstanceHook = Callable[[int, InstanceResult, str], None]

# Why instances were handed back unsent when the caller set ``stop``.
_STOPPED = "not sent: the caller stopped the forward"


@dataclass
class _Run:
    """The mutable state of one :func:`forward` call."""

    dest: Destination
    results: dict[int, InstanceResult] = field(default_factory=dict)
    associations: int = 0
    delivered_refs: list[tuple[str, str]] = field(default_factory=list)
    # What the handlers of the current association caught: its A-ASSOCIATE
    # response and a storage commitment report. One association at a time.
    reply: dict = field(default_factory=dict)
    on_commitment_requested: Callable[[str], None] | None = None
    on_instance: InstanceHook | None = None
    stop: threading.Event | None = None
    hook_failed: bool = False  # on_instance raised once: said once in the log

    def stopped(self) -> bool:
        """Whether the caller asked that no more instances be sent."""
        return self.stop is not None and self.stop.is_set()


def forward(
    dest: Destination,
    files: list[Path],
    *,
    counters: MutableMapping[str, int] | None = None,
    on_commitment_requested: Callable[[str], None] | None = None,
    on_instance: InstanceHook | None = None,
    stop: threading.Event | None = None,
    also_commit: list[tuple[str, str]] = (),
) -> ForwardResult:
    """Store ``files`` into ``dest`` over one association and report each outcome.

    Several associations are opened only when the files need more than 128
    presentation contexts, or when an association dies midway (the rest is
    resent on a new one, from the first unanswered instance). Files should
    have distinct SOP Instance UIDs.

    ``counters``, when given, is incremented by ``delivered``, ``retryable``,
    ``permanent``, ``converted`` and ``associations`` (a ``collections.Counter``
    or anything a metrics layer maps to its counters).

    ``on_commitment_requested``, when given, is called with the storage
    commitment Transaction UID just before the N-ACTION goes out, so that the
    caller can record it where the PACS's later report is looked up (a PACS may
    report before this call returns). Should it raise, no N-ACTION is sent and
    the commitment is ``failed``.

    ``on_instance``, when given, is called in the sending thread with each
    file's index, result and SOP Class UID as soon as its outcome is known (for
    a sent instance: when its C-STORE response came), before the next instance
    is sent, so that the caller can record progress that must survive a crash
    of this call. Should it raise, the error is logged and the outcome stands.

    ``stop``, when set, ends the sending before the next instance; what was
    not sent is retryable. ``also_commit`` adds (SOP Class, SOP Instance UID)
    pairs delivered by an earlier call to the storage commitment request.

    Sets pynetdicom's process-wide options for chunked sending and no
    identifier logging. Raises RetryableTransportError when no association
    could be made at all (refused, timed out, rejected transient) and
    PermanentTransportError when the first association is rejected for good.
    """
    started = time.monotonic()
    _configure_pynetdicom()
    run = _Run(
        dest,
        delivered_refs=list(also_commit),
        on_commitment_requested=on_commitment_requested,
        on_instance=on_instance,
        stop=stop,
    )
    tls_args = (ssl_context(dest.tls), dest.host) if dest.tls else None

    items = _read_headers(files, run)
    assoc = None
    for batch in _plan_batches(items, dest.storage_commitment):
        if assoc is not None and assoc.is_established:
            assoc.release()
        if run.stopped():
            _give_back(run, batch, _STOPPED)
            continue
        assoc = _send_batch(run, batch, tls_args)

    commitment = None
    if dest.storage_commitment and run.delivered_refs:
        commitment = _request_commitment(run, assoc, tls_args)
    elif assoc is not None and assoc.is_established:
        assoc.release()

    seconds = time.monotonic() - started
    result = ForwardResult(
        destination=dest.name,
        instances=tuple(run.results[i] for i in range(len(files))),
        commitment=commitment,
        associations=run.associations,
        seconds=seconds,
    )
    if counters is not None:
        for outcome in Outcome:
            counters[outcome.value] = counters.get(outcome.value, 0) + result.count(
                outcome
            )
        counters["converted"] = counters.get("converted", 0) + result.converted
        counters["associations"] = counters.get("associations", 0) + run.associations
    logger.info(
        "forward finished dest=%s delivered=%d failed=%d converted=%d "
        "associations=%d seconds=%.2f",
        dest.name,
        result.count(Outcome.DELIVERED),
        len(files) - result.count(Outcome.DELIVERED),
        result.converted,
        run.associations,
        seconds,
    )
    return result


def _configure_pynetdicom() -> None:
    # Chunked send reads no dataset into memory (FIELD-NOTES: 0.30 of dcmtk);
    # identifier logging would print patient attributes of every request.
    _config.STORE_SEND_CHUNKED_DATASET = True
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False


def _read_headers(files: list[Path], run: _Run) -> list[_Item]:
    """Read each file's meta header only; unreadable files fail permanently."""
    items, seen = [], set()
    for index, path in enumerate(files):
        path = Path(path)
        try:
            meta = read_file_meta_info(path)
            item = _Item(
                index,
                path,
                UID(meta.MediaStorageSOPClassUID),
                UID(meta.MediaStorageSOPInstanceUID),
                UID(meta.TransferSyntaxUID),
            )
        except (OSError, ValueError, AttributeError, InvalidDicomError) as exc:
            run.results[index] = InstanceResult(
                path, "", Outcome.PERMANENT, None, f"unreadable file: {exc}"
            )
            continue
        if item.sop_instance in seen:
            run.results[index] = InstanceResult(
                path,
                str(item.sop_instance),
                Outcome.PERMANENT,
                None,
                "SOP Instance UID repeated in the same list; sent once",
            )
            continue
        seen.add(item.sop_instance)
        items.append(item)
    return items


def _syntaxes_by_class(items: list[_Item]) -> dict[UID, set[UID]]:
    """Return the transfer syntaxes of ``items`` per SOP class, in first-seen order."""
    by_class: dict[UID, set[UID]] = {}
    for item in items:
        by_class.setdefault(item.sop_class, set()).add(item.syntax)
    return by_class


def _contexts_for(syntaxes: set[UID]) -> list[list[UID]]:
    """Return the transfer syntax lists to propose for one SOP class."""
    # One context per syntax the files have, alone, so that the SCP cannot pick
    # a fallback the file would need converting to; then one context with the
    # uncompressed fallbacks not already proposed.
    lists = [[ts] for ts in sorted(syntaxes)]
    fallback = [ts for ts in _UNCOMPRESSED if ts not in syntaxes]
    if fallback:
        lists.append(fallback)
    return lists


def _plan_batches(items: list[_Item], commitment: bool) -> list[list[_Item]]:
    """Split the items into as few associations as 128 contexts allow."""
    budget = MAX_CONTEXTS - (1 if commitment else 0)
    groups: list[set[UID]] = [set()]
    used = 0
    for sop_class, syntaxes in _syntaxes_by_class(items).items():
        need = len(_contexts_for(syntaxes))
        if used + need > budget and groups[-1]:
            groups.append(set())
            used = 0
        groups[-1].add(sop_class)
        used += need
    return [[i for i in items if i.sop_class in g] for g in groups if g]


def _associate(run: _Run, batch: list[_Item], tls_args, *, commit: bool):
    """Open an association proposing what ``batch`` needs; return it and why not.

    Returns ``(assoc, None)`` when established, else ``(None, error)`` where
    error is a RetryableTransportError or PermanentTransportError.
    """
    dest = run.dest
    contexts = [
        build_context(sop_class, syntaxes)
        for sop_class, all_syntaxes in _syntaxes_by_class(batch).items()
        for syntaxes in _contexts_for(all_syntaxes)
    ]
    if commit:
        contexts.append(build_context(StorageCommitmentPushModel, list(_UNCOMPRESSED)))

    ae = AE(ae_title=dest.calling_ae_title)
    ae.acse_timeout = dest.acse_timeout
    ae.dimse_timeout = dest.dimse_timeout
    ae.network_timeout = dest.network_timeout
    ae.connection_timeout = dest.connection_timeout
    reply = run.reply = {"reported": threading.Event()}
    handlers = [
        (evt.EVT_ACSE_RECV, _keep_associate_reply, [reply]),
        (evt.EVT_N_EVENT_REPORT, _on_commitment_report, [reply]),
    ]
    run.associations += 1
    assoc = ae.associate(
        dest.host,
        dest.port,
        contexts=contexts,
        ae_title=dest.ae_title,
        max_pdu=dest.max_pdu,
        tls_args=tls_args,
        evt_handlers=handlers,
    )
    if assoc.is_established:
        # pynetdicom never sets TCP_NODELAY; without it every C-STORE waits on
        # Nagle's algorithm (FIELD-NOTES: 0.11 -> 0.30 of dcmtk's rate).
        sock = assoc.dul.socket.socket if assoc.dul.socket else None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        _keep_responses_from_reactor(assoc)
        return assoc, None

    where = f"dest={dest.name} {dest.host}:{dest.port}"
    rsp = reply.get("associate")
    result = getattr(rsp, "result", None)
    if assoc.is_rejected and result == 0x01:
        # PS3.8 9.3.4: rejected-permanent, e.g. called AE title not recognised.
        return None, PermanentTransportError(
            f"association rejected permanently by {where}: "
            f"{rsp.source_str}: {rsp.reason_str}"
        )
    if assoc.is_rejected:
        return None, RetryableTransportError(
            f"association rejected transiently by {where}: "
            f"{rsp.source_str}: {rsp.reason_str}"
        )
    if result == 0x00 and not assoc.accepted_contexts:
        return None, _NoContextAccepted(f"{where} accepted no presentation context")
    return None, RetryableTransportError(
        f"no association with {where}: connection refused, timed out or aborted"
    )


class _ResponsesForSender(queue.Queue):
    """A DIMSE message queue whose reactor thread is handed requests only.

    pynetdicom 3.0.4 lets two threads read an association's incoming DIMSE
    messages: the thread that called ``send_c_store`` (or ``send_n_action``)
    waits there for its response, and the association's own reactor thread
    polls it for requests from the peer. ``send_c_store`` pauses the reactor
    by clearing ``_reactor_checkpoint`` and spinning until ``_is_paused`` is
    true, but the reactor raises ``_is_paused`` just before it passes the
    checkpoint and lowers it just after. A sender that looks in that window
    believes the reactor paused while it is about to make one more pass; if
    the peer's response has arrived by then (storescp answers a small
    instance in a few milliseconds), the reactor takes it, logs "Received
    unexpected C-STORE service message" and drops it. The sender then waits
    for a response that already came and went, until the DIMSE timeout
    aborts the association, although the peer stored the instance. Measured
    here: one such loss in about two 400-instance associations of small
    instances, each preceded by the response arriving within 3 ms of its
    request. The same race is pynetdicom issue #875 (sporadic "Received
    unexpected C-FIND service message"); the checkpoint came with pull
    request #351.

    Handing the reactor only requests (what it serves) and leaving responses
    and the abort sentinel ``(None, None)`` to the waiting sender removes the
    race whatever the threads' timing. The reactor is the Association thread
    itself (``Association`` is a ``threading.Thread`` and runs its reactor in
    ``run``).
    """

    def __init__(self, reactor: threading.Thread):
        super().__init__()
        self._reactor = reactor

    def get(self, block: bool = True, timeout: float | None = None):
        if threading.current_thread() is not self._reactor:
            return super().get(block, timeout)
        # The reactor only ever polls (block=False); it never waits here.
        with self.not_empty:
            if not self._qsize() or not _is_request(self.queue[0]):
                raise queue.Empty
            item = self._get()
            self.not_full.notify()
            return item


def _is_request(item: tuple) -> bool:
    """Whether a DIMSE queue item is a request from the peer (PS3.7 9.1)."""
    _, msg = item
    # pynetdicom tells a response by its Message ID Being Responded To.
    return msg is not None and msg.MessageIDBeingRespondedTo is None


def _keep_responses_from_reactor(assoc) -> None:
    """Give ``assoc`` a DIMSE queue whose responses only its sender can take.

    Called right after the association is established, before any request
    goes out, so nothing is waiting in the queue; anything the DUL thread put
    there meanwhile is carried over.
    """
    old = assoc.dimse.msg_queue
    assoc.dimse.msg_queue = _ResponsesForSender(assoc)
    while True:
        try:
            assoc.dimse.msg_queue.put(old.get(block=False))
        except queue.Empty:
            return


class _NoContextAccepted(Exception):
    """The peer accepted the association but none of its presentation contexts.

    Never raised out of this module: it fails each instance permanently.
    """


def _keep_associate_reply(event, reply: dict) -> None:
    # The A-ASSOCIATE response carries the rejection's result and reason.
    primitive = event.primitive
    if type(primitive).__name__ == "A_ASSOCIATE" and primitive.result is not None:
        reply["associate"] = primitive


def _send_batch(run: _Run, batch: list[_Item], tls_args):
    """Send every item of ``batch``, reassociating when an association dies.

    Returns the last association, still open, or None.
    """
    commit = run.dest.storage_commitment
    pending = list(batch)
    fruitless = 0
    while True:
        assoc, error = _associate(run, pending, tls_args, commit=commit)
        if error is not None:
            _fail_all(run, pending, error)
            return None
        answered = _send_items(run, assoc, pending)
        pending = [i for i in pending if i.index not in run.results]
        if not pending:
            return assoc
        if run.stopped():
            _give_back(run, pending, _STOPPED)
            return assoc
        if assoc.is_established:
            assoc.release()
        fruitless = 0 if answered else fruitless + 1
        if fruitless >= _MAX_FRUITLESS_ASSOCIATIONS:
            _give_back(run, pending, "no response from peer")
            return None
        logger.warning(
            "association lost dest=%s answered=%d left=%d; reassociating",
            run.dest.name,
            answered,
            len(pending),
        )


def _give_back(run: _Run, items: list[_Item], reason: str) -> None:
    """Record ``items`` as not sent and worth sending later."""
    for item in items:
        _record(run, item, Outcome.RETRYABLE, None, reason)


def _fail_all(run: _Run, items: list[_Item], error: Exception) -> None:
    """Record ``error`` for ``items``, or raise it when it is the call's first
    association that failed (nothing could be attempted at all)."""
    if isinstance(error, _NoContextAccepted):
        outcome = Outcome.PERMANENT
    elif run.associations == 1:
        raise error
    elif isinstance(error, PermanentTransportError):
        outcome = Outcome.PERMANENT
    else:
        outcome = Outcome.RETRYABLE
    for item in items:
        _record(run, item, outcome, None, str(error))


def _send_items(run: _Run, assoc, items: list[_Item]) -> int:
    """Send ``items`` in order until done or the association dies.

    Returns how many got a response. An unanswered item is not recorded, so it
    is resent first on the next association.
    """
    answered = sent = 0
    for item in items:
        if not assoc.is_established or run.stopped():
            break
        payload, converted, reason = _payload(assoc, item)
        if payload is None:
            _record(run, item, Outcome.PERMANENT, None, reason)
            continue
        try:
            # PS3.7 9.1.1.1: a new Message ID for each request on the association.
            sent += 1
            status = assoc.send_c_store(payload, msg_id=sent % 0xFFFF + 1)
        except RuntimeError:
            break  # the association ended between the check and the send
        except (ValueError, AttributeError, OSError) as exc:
            _record(run, item, Outcome.PERMANENT, None, f"cannot send: {exc}")
            continue
        code = getattr(status, "Status", None)
        if code is None:
            # DIMSE timeout or the association was lost: pynetdicom has
            # aborted it. Leave the item unrecorded so it goes out again,
            # although the PACS may have stored it (README L-32).
            break
        answered += 1
        outcome, why = classify_status(int(code))
        _record(run, item, outcome, int(code), why, converted)
    return answered


def _payload(assoc, item: _Item) -> tuple[Path | Dataset | None, bool, str]:
    """Return what to pass to send_c_store for ``item``, whether it was
    converted, and the reason when it cannot be sent."""
    accepted = [
        cx.transfer_syntax[0]
        for cx in assoc.accepted_contexts
        if cx.abstract_syntax == item.sop_class
    ]
    if not accepted:
        return (
            None,
            False,
            f"peer accepted no presentation context for {item.sop_class.name}",
        )
    if item.syntax in accepted:
        return item.path, False, ""

    # The exact syntax was refused; only uncompressed fallbacks were accepted.
    try:
        if item.syntax.is_compressed:
            try:
                available = get_decoder(item.syntax).is_available
            except NotImplementedError:
                available = False
            if not available:
                raise LookupError("no decoder")
            ds = dcmread(item.path)
            # Keep the SOP Instance UID: decoding changes the encoding, not the
            # pixel values the instance already had, and the receiver merges
            # by this UID.
            ds.decompress(generate_instance_uid=False)
        elif item.syntax == ExplicitVRBigEndian:
            raise LookupError("byte order conversion is not supported")
        else:
            # Implicit <-> explicit VR and deflated -> inflated: pynetdicom
            # re-encodes a dataset for the accepted context.
            ds = dcmread(item.path)
    except LookupError as exc:
        return (
            None,
            False,
            f"cannot convert {item.syntax.name} to explicit VR little endian: {exc}",
        )
    except Exception as exc:
        # A decoder may raise anything on corrupt data; the instance is then
        # undeliverable in any form the peer accepts.
        return (
            None,
            False,
            f"cannot convert {item.syntax.name}: {type(exc).__name__}: {exc}",
        )
    return ds, True, ""


def _record(
    run: _Run,
    item: _Item,
    outcome: Outcome,
    status: int | None,
    reason: str,
    converted: bool = False,
) -> None:
    result = run.results[item.index] = InstanceResult(
        item.path,
        str(item.sop_instance),
        outcome,
        status,
        reason,
        converted and outcome is Outcome.DELIVERED,
    )
    if run.on_instance is not None:
        try:
            run.on_instance(item.index, result, str(item.sop_class))
        except Exception as exc:  # the caller's hook; the outcome stands
            if not run.hook_failed:
                logger.warning(
                    "instance outcome not noted dest=%s error=%s",
                    run.dest.name,
                    type(exc).__name__,
                )
            run.hook_failed = True
    if outcome is Outcome.DELIVERED:
        run.delivered_refs.append((str(item.sop_class), str(item.sop_instance)))
    elif outcome is Outcome.PERMANENT:
        logger.warning(
            "instance refused dest=%s status=%s reason=%s",
            run.dest.name,
            "none" if status is None else f"0x{status:04X}",
            reason.split(":")[0],
        )


def _request_commitment(run: _Run, assoc, tls_args) -> Commitment:
    """Ask the destination to commit to the delivered instances (PS3.4 J.3.2).

    Uses ``assoc`` when it is still open, else a new association. Waits up to
    ``commitment_wait`` seconds for the N-EVENT-REPORT on that association; most
    PACS (Orthanc among them) answer later on an association of their own, and
    then the result is ``requested``.
    """
    dest = run.dest
    if assoc is None or not assoc.is_established:
        assoc, error = _associate(run, [], tls_args, commit=True)
        if error is not None:
            return Commitment("failed", reason=str(error))
    try:
        if not any(
            cx.abstract_syntax == StorageCommitmentPushModel
            for cx in assoc.accepted_contexts
        ):
            return Commitment(
                "unsupported", reason="peer refused the Storage Commitment SOP class"
            )

        # PS3.4 J.3.2.1.1: a Transaction UID and the references to commit.
        transaction = generate_uid()
        info = Dataset()
        info.TransactionUID = transaction
        info.ReferencedSOPSequence = []
        for sop_class, sop_instance in run.delivered_refs:
            ref = Dataset()
            ref.ReferencedSOPClassUID = sop_class
            ref.ReferencedSOPInstanceUID = sop_instance
            info.ReferencedSOPSequence.append(ref)
        if run.on_commitment_requested is not None:
            try:
                run.on_commitment_requested(transaction)
            except Exception as exc:  # the caller's hook; the delivery stands
                logger.warning(
                    "storage commitment not requested dest=%s error=%s",
                    dest.name,
                    type(exc).__name__,
                )
                return Commitment(
                    "failed", reason=f"transaction not recorded: {type(exc).__name__}"
                )
        reply = run.reply
        reply["transaction"] = transaction
        status, _ = assoc.send_n_action(
            info,
            _COMMIT_ACTION,
            StorageCommitmentPushModel,
            StorageCommitmentPushModelInstance,
        )
        code = getattr(status, "Status", None)
        if code is None:
            return Commitment("failed", transaction, reason="no N-ACTION response")
        if code == 0x0122:
            # PS3.7 C.5.x: SOP class not supported, although it was negotiated.
            return Commitment("unsupported", transaction, reason="status 0x0122")
        if code != 0x0000:
            return Commitment("failed", transaction, reason=f"status 0x{code:04X}")

        if not reply["reported"].wait(dest.commitment_wait):
            return Commitment("requested", transaction)
        event_type, failed = reply["report"]
        if event_type == _COMMIT_ALL_STORED:
            return Commitment("committed", transaction)
        return Commitment(
            "failed", transaction, failed, reason="peer reported failed instances"
        )
    finally:
        if assoc.is_established:
            assoc.release()


def _on_commitment_report(event, reply: dict):
    """Take the storage commitment result sent on our association (PS3.4 J.3.3)."""
    # Only a report for the transaction we asked about counts; anything else
    # is acknowledged and ignored.
    info = event.event_information
    if info.get("TransactionUID") == reply.get("transaction"):
        failed = tuple(
            str(ref.ReferencedSOPInstanceUID)
            for ref in info.get("FailedSOPSequence", [])
        )
        reply["report"] = (event.request.EventTypeID, failed)
        reply["reported"].set()
    return 0x0000, None
