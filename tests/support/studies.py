"""Small generated studies for ingress tests: real DICOM files, fake patients."""

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

FAKE_PATIENT = "Testpatient^Recognisable"


def make_instance(
    path: Path,
    *,
    study_uid: str,
    series_uid: str,
    sop_uid: str | None = None,
    modality: str = "CT",
    series_description: str = "AXIAL",
    patient_name: str = FAKE_PATIENT,
    fill: int = 0,
    omit: tuple[str, ...] = (),
) -> Path:
    """Write one small CT instance (8x8, 16 bit) and return its path.

    ``fill`` changes the pixel values, so two files with the same UIDs can differ.
    ``omit`` names attributes to leave out (to make a malformed instance).
    """
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = patient_name
    ds.PatientID = "FAKE-0001"
    ds.Modality = modality
    ds.SeriesDescription = series_description
    ds.Rows = ds.Columns = 8
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.PixelData = np.full((8, 8), fill, dtype="<u2").tobytes()
    for keyword in omit:
        delattr(ds, keyword)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.preamble = b"\x00" * 128  # a Part 10 file, as modalities write them
    ds.save_as(path, enforce_file_format=False)
    return path


def make_study(
    folder: Path,
    *,
    series: int = 2,
    per_series: int = 3,
    study_uid: str | None = None,
    modality: str = "CT",
    descriptions: tuple[str, ...] = (),
) -> list[Path]:
    """Write a study of ``series`` x ``per_series`` instances; return the paths."""
    study_uid = study_uid or generate_uid()
    paths = []
    for s in range(series):
        series_uid = generate_uid()
        description = descriptions[s] if s < len(descriptions) else f"SERIES{s}"
        for i in range(per_series):
            paths.append(
                make_instance(
                    folder / f"s{s}-{i}.dcm",
                    study_uid=study_uid,
                    series_uid=series_uid,
                    modality=modality,
                    series_description=description,
                )
            )
    return paths
