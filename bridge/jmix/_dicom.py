"""Read the DICOM headers of a study and build ``metadata.json`` from them.

Only headers are read (``stop_before_pixels``); pixel data is streamed later,
byte for byte, by the packer. Names are decoded with each file's Specific
Character Set (PS3.5 6.1), which pydicom applies.
"""

import logging
import os
import re
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

from pydicom import dcmread
from pydicom.errors import InvalidDicomError

from bridge.errors import UnpackableStudy

logger = logging.getLogger(__name__)

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
_TAGS = [
    "SpecificCharacterSet",
    "SOPInstanceUID",
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "Modality",
    "BodyPartExamined",
    "StudyDescription",
    "PatientID",
    "PatientName",
    "PatientBirthDate",
    "PatientSex",
]


@dataclass(frozen=True)
class Instance:
    """One DICOM file to pack: where it is and the header values we need."""

    path: Path
    size: int
    sop_uid: str
    study_uid: str
    series_uid: str
    modality: str
    body_part: str
    study_description: str
    patient_id: str
    patient_name: object
    birth_date: str
    sex: str


@dataclass
class Scan:
    """The instances found in the sources and how many files were skipped."""

    instances: list[Instance]
    skipped: int


def _text(ds, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _read(path: Path) -> Instance | None:
    try:
        ds = dcmread(path, stop_before_pixels=True, specific_tags=_TAGS)
    except (InvalidDicomError, EOFError, OSError, ValueError, TypeError, KeyError):
        return None
    sop_uid, study_uid = _text(ds, "SOPInstanceUID"), _text(ds, "StudyInstanceUID")
    if not sop_uid or not study_uid:
        return None
    if not _UID.match(sop_uid) or len(sop_uid) > 64:
        raise UnpackableStudy(f"{path}: SOP Instance UID is not a valid UID")
    if not _text(ds, "SeriesInstanceUID"):
        raise UnpackableStudy(f"{path}: Series Instance UID is missing")
    return Instance(
        path=path,
        size=path.stat().st_size,
        sop_uid=sop_uid,
        study_uid=study_uid,
        series_uid=_text(ds, "SeriesInstanceUID"),
        modality=_text(ds, "Modality"),
        body_part=_text(ds, "BodyPartExamined"),
        study_description=_text(ds, "StudyDescription"),
        patient_id=_text(ds, "PatientID"),
        patient_name=ds.get("PatientName"),
        birth_date=_text(ds, "PatientBirthDate"),
        sex=_text(ds, "PatientSex").upper(),
    )


def _walk(sources: str | os.PathLike | Iterable) -> list[Path]:
    if isinstance(sources, str | os.PathLike):
        sources = [sources]
    paths: list[Path] = []
    for source in sources:
        source = Path(source)
        if source.is_dir():
            paths.extend(p for p in sorted(source.rglob("*")) if p.is_file())
        else:
            paths.append(source)
    return paths


def scan(sources: str | os.PathLike | Iterable) -> Scan:
    """Read the headers of every file in ``sources`` (folders searched recursively).

    Files that are not DICOM instances are skipped and counted. Raises
    :class:`UnpackableStudy` when the instances cannot go in one envelope.
    """
    instances, skipped, seen = [], 0, {}
    for path in _walk(sources):
        inst = _read(path)
        if inst is None:
            skipped += 1
            continue
        if inst.sop_uid in seen:
            raise UnpackableStudy(
                f"{path} and {seen[inst.sop_uid]} share one SOP Instance UID"
            )
        seen[inst.sop_uid] = path
        instances.append(inst)

    if not instances:
        raise UnpackableStudy(f"no DICOM instances found ({skipped} other files)")
    if len({i.study_uid for i in instances}) > 1:
        raise UnpackableStudy(
            "the files belong to more than one study (Study Instance UID differs); "
            "an envelope carries one study"
        )
    if len({i.patient_id for i in instances}) > 1:
        raise UnpackableStudy(
            "instances of the study disagree on Patient ID; held for an operator"
        )
    instances.sort(key=lambda i: i.sop_uid)
    logger.debug("study scanned instances=%d skipped=%d", len(instances), skipped)
    return Scan(instances, skipped)


def _name(person) -> dict:
    if person is None or not str(person).strip("^ "):
        return {}
    given = [g for g in (person.given_name, person.middle_name) if g]
    name = {
        "family": person.family_name,
        "given": given,
        "prefix": person.name_prefix,
        "suffix": person.name_suffix,
    }
    return {k: v for k, v in name.items() if v}


def _dob(value: str) -> str | None:
    if re.fullmatch(r"\d{8}", value):
        return f"{value[:4]}-{value[4:6]}-{value[6:]}"
    return None


def metadata(
    found: Scan, envelope_id: str, timestamp: str, fallback_patient_id: str
) -> dict:
    """Build ``metadata.json``: patient, study and every series with its count."""
    first = found.instances[0]
    patient = {
        "id": first.patient_id or fallback_patient_id,
        "name": _name(first.patient_name),
        "dob": _dob(first.birth_date),
        "sex": first.sex if first.sex in ("M", "F", "O") else None,
    }
    counts = Counter(i.series_uid for i in found.instances)
    series, done = [], set()
    for inst in sorted(found.instances, key=lambda i: (i.series_uid, i.sop_uid)):
        if inst.series_uid in done:
            continue
        done.add(inst.series_uid)
        entry = {
            "series_uid": inst.series_uid,
            "modality": inst.modality or "OT",
            "body_part": inst.body_part,
            "instance_count": counts[inst.series_uid],
        }
        series.append({k: v for k, v in entry.items() if v != ""})
    study = {
        "study_uid": first.study_uid,
        "study_description": first.study_description,
        "series": series,
    }
    return {
        "version": "1.0",
        "id": envelope_id,
        "timestamp": timestamp,
        "patient": {k: v for k, v in patient.items() if v},
        "studies": {k: v for k, v in study.items() if v},
    }
