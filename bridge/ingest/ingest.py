"""Taking one received instance in: check its header, route it, spool it, record it.

The listener hands :meth:`Ingest.receive` each file pynetdicom wrote, and
answers the modality from the :class:`Receipt`. Only the header is read (up to
the pixel data, and only the attributes routing needs), so a 1 GB multi-frame
instance costs one read for the hash and a few kilobytes for the header.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset

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
    ):
        self.store = store
        self.spool = spool
        # Told (trigger, assembly seconds) for every study sealed, for metrics.
        self.on_sealed = on_sealed or (lambda trigger, seconds: None)
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
        StoreError when that could not be done; refusals are returned.
        """
        try:
            ds = dcmread(
                path, stop_before_pixels=True, specific_tags=self._tags, force=False
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
        if rule is None:
            route = UNROUTED
            quiet = self.settings.unrouted_quiet_seconds
            max_age = self.settings.unrouted_max_age_seconds
        else:
            route, quiet, max_age = rule.name, rule.quiet_seconds, rule.max_age_seconds
        result = self.store.add_instance(
            inst,
            route=route,
            quiet_seconds=quiet,
            max_age_seconds=max_age,
            duplicates=self.settings.duplicates,
        )
        if result.outcome == InstanceOutcome.CONFLICT:
            return Receipt(
                rejection=Rejection.CONFLICT,
                study_ref=result.study.ref,
                size_bytes=spooled.size_bytes,
                detail="known instance with other bytes",
            )

        if rule is not None and rule.required_series:
            self._seal_if_complete(rule, result.study, ds, result.outcome)
        return Receipt(
            outcome=result.outcome,
            study_ref=result.study.ref,
            size_bytes=spooled.size_bytes,
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
                ds = dcmread(
                    self.spool.path_of(inst.spool_path),
                    stop_before_pixels=True,
                    specific_tags=self._tags,
                )
            except Exception:  # a spooled file was readable when it arrived
                logger.warning("spooled instance unreadable study=%s", ref)
                continue
            met.update(rule.satisfied_series(ds))
        return met


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
