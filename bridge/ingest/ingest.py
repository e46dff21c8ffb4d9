"""Taking one received instance in: check its header, route it, spool it, record it.

The listener hands :meth:`Ingest.receive` each file pynetdicom wrote, and
answers the modality from the :class:`Receipt`. Only the header is read (up to
the pixel data, and only the attributes routing needs), so a 1 GB multi-frame
instance costs one read for the hash and a few kilobytes for the header.
"""

from __future__ import annotations

import io
import logging
import re
import threading
import time
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filereader import _at_pixel_data, _read_file_meta_info, read_dataset
from pydicom.tag import Tag
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)

from bridge.errors import SpoolError
from bridge.ingest.assembler import seal_jobs
from bridge.ingest.routing import UNROUTED, Router, RouteRule, Unrouted
from bridge.spool import Spool
from bridge.store import (
    DuplicatePolicy,
    Instance,
    InstanceOutcome,
    Store,
    Study,
    StudyState,
)

logger = logging.getLogger(__name__)

# PS3.5 9.1: a UID is 1-64 characters of digits and dots.
_UID = re.compile(r"[0-9.]{1,64}")
_REQUIRED_UIDS = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
)
_ALWAYS_READ = (*_REQUIRED_UIDS, "Modality", "PatientID")

# A deflated data set (PS3.5 A.5) is inflated whole, in memory, by pydicom and
# by everything downstream that reads it; one that inflates beyond this is
# refused as not understood, so a small deflate bomb cannot reach them.
DEFLATED_LIMIT = 256 << 20
# Of the inflated bytes, the header (everything before Pixel Data) is parsed
# from at most this many; a header larger than that is not understood either.
_DEFLATED_HEADER = 16 << 20
_CHUNK = 1 << 20
# (implicit VR, little endian) of the data set, by transfer syntax (PS3.5 A).
_ENCODINGS = {
    ImplicitVRLittleEndian: (True, True),
    ExplicitVRLittleEndian: (False, True),
    ExplicitVRBigEndian: (False, False),
}


class _Oversize(Exception):
    """A deflated data set inflates beyond DEFLATED_LIMIT."""


def read_header(path: Path, tags: list[str]) -> Dataset:
    """Read the header attributes ``tags`` of a Part 10 file, never the pixel data.

    The file meta is parsed once, and the data set is read on from there in its
    transfer syntax; a file without a preamble or in a syntax pydicom must guess
    goes through ``dcmread`` instead. A deflated data set is inflated as a
    stream, keeping only its first ``_DEFLATED_HEADER`` bytes, and refused
    (``_Oversize``) if it inflates to more than ``DEFLATED_LIMIT`` bytes. Raises
    whatever pydicom raises on a file it cannot parse.
    """
    with open(path, "rb") as fh:
        # PS3.10 7.1: a 128-byte preamble, "DICM", then the group 0002 meta.
        fh.seek(128)
        if fh.read(4) != b"DICM":
            return _converted(dcmread(fh, stop_before_pixels=True, specific_tags=tags))
        meta = _read_file_meta_info(fh)
        syntax = meta.get("TransferSyntaxUID")
        if syntax == DeflatedExplicitVRLittleEndian:
            stream = io.BytesIO(_inflate_head(fh))
            encoding = (False, True)
        else:
            encoding = _ENCODINGS.get(syntax)
            if encoding is None and syntax is not None and syntax.is_transfer_syntax:
                # PS3.5 10: every standard syntax but these three is explicit
                # VR little endian outside its encapsulated pixel data.
                encoding = (False, True)
            if encoding is None:
                fh.seek(0)
                ds = dcmread(fh, stop_before_pixels=True, specific_tags=tags)
                return _converted(ds)
            stream = fh
        ds = read_dataset(
            stream,
            is_implicit_VR=encoding[0],
            is_little_endian=encoding[1],
            stop_when=_at_pixel_data,
            # As dcmread does: keywords become tags, and the character set is read.
            specific_tags=[Tag(t) for t in (*tags, "SpecificCharacterSet")],
        )
    ds.file_meta = meta
    return _converted(ds)


def _converted(ds: Dataset) -> Dataset:
    """Convert every element read now: pydicom converts values lazily, on first
    access, and a value that does not fit its VR would otherwise raise later,
    far from the ``try`` that turns it into a refusal."""
    for _ in ds:
        pass
    return ds


def _inflate_head(fh) -> bytes:
    """Inflate the raw deflate stream after the meta; return its first bytes."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    head = bytearray()
    total = 0
    while chunk := fh.read(_CHUNK):
        while chunk:
            # max_length bounds each step's output, so a bomb never sits in memory.
            out = inflater.decompress(chunk, _CHUNK)
            chunk = inflater.unconsumed_tail
            total += len(out)
            if total > DEFLATED_LIMIT:
                raise _Oversize
            if len(head) < _DEFLATED_HEADER:
                head += out[: _DEFLATED_HEADER - len(head)]
            if inflater.eof:
                return bytes(head)
    return bytes(head)


class Rejection(StrEnum):
    """Why an instance was refused; the listener maps each to a DIMSE status."""

    UNREADABLE = "unreadable"  # the data set cannot be parsed
    INVALID = "invalid"  # a required UID is missing, malformed or contradicts
    UNROUTED = "unrouted"  # no route takes it and the policy is to refuse
    CONFLICT = "conflict"  # known UID with other bytes, reject policy


@dataclass(frozen=True)
class IngestSettings:
    """How instances are taken in; ``unrouted_*`` times apply to held studies."""

    duplicates: DuplicatePolicy = DuplicatePolicy.KEEP_NEWEST
    unrouted: Unrouted = Unrouted.REJECT
    unrouted_quiet_seconds: float = 300.0
    unrouted_max_age_seconds: float = 86400.0


@dataclass(frozen=True)
class Receipt:
    """What became of one instance: an ``outcome`` or a ``rejection``."""

    outcome: InstanceOutcome | None = None
    rejection: Rejection | None = None
    study_ref: str = ""
    size_bytes: int = 0
    detail: str = ""  # for the log line; never a UID or patient value

    @property
    def accepted(self) -> bool:
        """True when the modality may be told the instance is safe with us."""
        return self.outcome in (
            InstanceOutcome.STORED,
            InstanceOutcome.DUPLICATE,
            InstanceOutcome.REPLACED,
        )


class Ingest:
    """Takes received instances into the spool and the state store.

    Thread-safe: the listener calls :meth:`receive` from one thread per
    association.
    """

    def __init__(
        self,
        store: Store,
        spool: Spool,
        routes: Sequence[RouteRule],
        settings: IngestSettings | None = None,
        *,
        clock: Callable[[], float] = time.time,
        on_sealed: Callable[[str, float], None] | None = None,
        on_deadline: Callable[[float], None] | None = None,
    ):
        self.store = store
        self.spool = spool
        # Told (trigger, assembly seconds) for every study sealed, for metrics.
        self.on_sealed = on_sealed or (lambda trigger, seconds: None)
        # Told the seal deadline (clock time) of every study an instance opened
        # or extended: Assembler.note_deadline, so a new study is sealed when
        # its quiet period ends rather than at the assembler's next poll.
        self.on_deadline = on_deadline or (lambda seal_due: None)
        self.settings = settings or IngestSettings()
        self.router = Router(routes, self.settings.unrouted)
        self._clock = clock
        self._tags = sorted({*_ALWAYS_READ, *self.router.keywords})
        # Required series met so far, by study ref; rebuilt from the spool after
        # a restart, dropped when the study is sealed.
        self._met: dict[str, set[int]] = {}
        self._met_lock = threading.Lock()

    def admits(self, calling_ae: str, called_ae: str) -> bool:
        """Return False when no instance from this association could be taken."""
        return self.router.admits(calling_ae, called_ae)

    def receive(
        self,
        path: Path,
        *,
        calling_ae: str,
        called_ae: str,
        sop_class_uid: str = "",
        sop_instance_uid: str = "",
    ) -> Receipt:
        """Take the received file at ``path`` in and say what became of it.

        ``sop_class_uid`` and ``sop_instance_uid`` are the C-STORE request's
        affected UIDs; when given, the data set must carry the same ones. On an
        accepted outcome the file has been moved into the spool (or copied, from
        another filesystem), fsynced and recorded. Raises SpoolError or
        StoreError when that could not be done, or when the data set could not
        be written whole as it arrived; refusals are returned.
        """
        self.spool.check_received(path)
        try:
            ds = read_header(path, self._tags)
        except _Oversize:
            return Receipt(
                rejection=Rejection.UNREADABLE,
                detail=f"deflated data set inflates beyond {DEFLATED_LIMIT} bytes",
            )
        except Exception as exc:  # pydicom raises many types on bad input
            return Receipt(rejection=Rejection.UNREADABLE, detail=type(exc).__name__)

        # pydicom reads much damage leniently; a data set in which not one of
        # the identifying attributes could be found was not understood at all.
        if not any(keyword in ds for keyword in _REQUIRED_UIDS):
            return Receipt(
                rejection=Rejection.UNREADABLE, detail="no identifying attributes"
            )
        problem = _uid_problem(ds, sop_class_uid, sop_instance_uid)
        if problem:
            return Receipt(rejection=Rejection.INVALID, detail=problem)

        rule = self.router.route_for(calling_ae, called_ae, ds)
        if rule is None and self.settings.unrouted == Unrouted.REJECT:
            return Receipt(rejection=Rejection.UNROUTED, detail="no route matched")

        if rule is None:
            route = UNROUTED
            quiet = self.settings.unrouted_quiet_seconds
            max_age = self.settings.unrouted_max_age_seconds
        else:
            route, quiet, max_age = rule.name, rule.quiet_seconds, rule.max_age_seconds
        if self.settings.duplicates == DuplicatePolicy.REJECT:
            conflict = self._conflict(ds, route, path)
            if conflict is not None:
                return conflict

        spooled = self.spool.adopt_instance(path)
        inst = Instance(
            sop_instance_uid=str(ds.SOPInstanceUID),
            study_instance_uid=str(ds.StudyInstanceUID),
            series_instance_uid=str(ds.SeriesInstanceUID),
            sop_class_uid=str(ds.SOPClassUID),
            transfer_syntax_uid=str(ds.file_meta.get("TransferSyntaxUID", "")),
            digest=spooled.digest,
            size_bytes=spooled.size_bytes,
            spool_path=spooled.path,
            calling_ae=calling_ae.strip(),
            modality=str(ds.get("Modality", "") or ""),
            patient_id=str(ds.get("PatientID", "") or ""),
            received_at=self._clock(),
        )
        result = self.store.add_instance(
            inst,
            route=route,
            quiet_seconds=quiet,
            max_age_seconds=max_age,
            duplicates=self.settings.duplicates,
        )
        if result.outcome == InstanceOutcome.CONFLICT:
            # Recorded by another association since _conflict looked; the
            # spooled copy no record names goes with retention's orphan sweep.
            return _conflicting(result.study.ref, spooled.size_bytes)

        study = result.study
        if result.previous is not None:
            self._keep_replaced(result.previous, study)
        if (
            result.outcome != InstanceOutcome.DUPLICATE
            and study.state == StudyState.OPEN
        ):
            self.on_deadline(study.seal_due)
        if rule is not None and rule.required_series:
            self._seal_if_complete(rule, study, ds, result.outcome)
        return Receipt(
            outcome=result.outcome,
            study_ref=result.study.ref,
            size_bytes=spooled.size_bytes,
        )

    def _conflict(self, ds: Dataset, route: str, path: Path) -> Receipt | None:
        """Under the reject policy, refuse a known instance with other bytes
        before it is spooled, so that no refused file is left in the spool."""
        known = self.store.find_instance(
            str(ds.StudyInstanceUID), route, str(ds.SOPInstanceUID)
        )
        if known is None:
            return None
        digest, size = self.spool.received_digest(path)
        if digest == known.digest:
            return None
        return _conflicting(known.study_ref, size)

    def _keep_replaced(self, previous: Instance, study: Study) -> None:
        """Keep the version a newer one displaced (keep-newest), and say so.

        Its record is gone; its file goes under ``replaced/``, and retention
        removes it with the rest of its study's files. Should the file not be
        kept, the loss is logged: the newer version is recorded already.
        """
        try:
            kept = self.spool.keep_replaced(previous.spool_path, study.ref)
        except SpoolError as exc:
            logger.error(
                "replaced instance not kept study=%s error=%s",
                study.ref,
                type(exc.__cause__ or exc).__name__,
            )
            return
        logger.warning(
            "instance replaced by a changed version study=%s kept=%s",
            study.ref,
            kept.rsplit("/", 1)[0],
        )

    # -- the required-series trigger ----------------------------------------------

    def _seal_if_complete(
        self, rule: RouteRule, study: Study, ds: Dataset, outcome: InstanceOutcome
    ) -> None:
        if study.state != StudyState.OPEN or outcome == InstanceOutcome.DUPLICATE:
            return
        with self._met_lock:
            met = self._met.get(study.ref)
            if met is not None:
                met.update(rule.satisfied_series(ds))
        if met is None:
            rebuilt = self._met_from_spool(rule, study.ref)
            with self._met_lock:
                met = self._met.setdefault(study.ref, set())
                met.update(rebuilt)
        if len(met) < len(rule.required_series):
            return

        if self.store.seal_study(study.ref, "required-series", seal_jobs(study, rule)):
            self.on_sealed("required-series", self._clock() - study.first_received)
            logger.info(
                "study sealed study=%s trigger=required-series instances=%d peers=%d",
                study.ref,
                study.instance_count,
                len(rule.peers),
            )
        with self._met_lock:
            self._met.pop(study.ref, None)

    def _met_from_spool(self, rule: RouteRule, ref: str) -> set[int]:
        """Read one header per series of the study to see which are present."""
        met: set[int] = set()
        seen_series: set[str] = set()
        for inst in self.store.study_instances(ref):
            if inst.series_instance_uid in seen_series:
                continue
            seen_series.add(inst.series_instance_uid)
            try:
                ds = read_header(self.spool.path_of(inst.spool_path), self._tags)
            except Exception:  # a spooled file was readable when it arrived
                logger.warning("spooled instance unreadable study=%s", ref)
                continue
            met.update(rule.satisfied_series(ds))
        return met


def _conflicting(study_ref: str, size_bytes: int) -> Receipt:
    """The receipt of a known instance with other bytes, under the reject policy."""
    return Receipt(
        rejection=Rejection.CONFLICT,
        study_ref=study_ref,
        size_bytes=size_bytes,
        detail="known instance with other bytes",
    )


def _uid_problem(ds: Dataset, sop_class_uid: str, sop_instance_uid: str) -> str:
    """Return why the data set's UIDs are unacceptable, or "" when they are fine.

    The text names the attribute, never its value.
    """
    for keyword in _REQUIRED_UIDS:
        value = str(ds.get(keyword, "") or "").rstrip("\0 ")
        if not value:
            return f"{keyword} missing"
        if not _UID.fullmatch(value):
            return f"{keyword} malformed"
    if sop_instance_uid and str(ds.SOPInstanceUID) != sop_instance_uid:
        return "SOPInstanceUID differs from the request"
    if sop_class_uid and str(ds.SOPClassUID) != sop_class_uid:
        return "SOPClassUID differs from the request"
    return ""
