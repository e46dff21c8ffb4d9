"""Test studies for the benchmark, generated with numpy and pydicom.

Three shapes, as issue #8 asks: a CT-like series (512x512, 16 bit, a phantom
with noise so the pixel data is neither empty nor uniform), a study of a few
large multi-frame instances, and a multi-GB study of such instances for the
memory check. Pixel data of multi-frame instances is appended to the file by
hand, frame by frame, so that writing a 100 MB instance never holds it whole.
Every study gets fresh UIDs; patients are fake.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    CTImageStorage,
    EnhancedCTImageStorage,
    ExplicitVRLittleEndian,
    generate_uid,
)

FAKE_PATIENT = "Bench^Phantom"


@dataclass(frozen=True)
class Study:
    """A generated study on disk: its files, their total size and its UID."""

    name: str
    folder: Path
    files: tuple[Path, ...]
    study_uid: str

    @property
    def bytes(self) -> int:
        """The total size of the study's files, in bytes."""
        return sum(p.stat().st_size for p in self.files)

    @property
    def instances(self) -> int:
        """How many instances the study holds."""
        return len(self.files)


def _phantom(size: int, rng: np.random.Generator) -> np.ndarray:
    """Return a CT-like slice: a body ellipse, a few organs, noise (uint16)."""
    y, x = np.mgrid[-1 : 1 : size * 1j, -1 : 1 : size * 1j]
    img = np.full((size, size), 24.0)  # air, CT number -1000 after the rescale
    body = (x / 0.85) ** 2 + (y / 0.65) ** 2
    img[body < 1] = 1040.0  # soft tissue
    img[(body < 1) & (body > 0.85)] = 1500.0  # a rim of bone
    for cx, cy, r, v in (
        (-0.35, 0, 0.22, 850),
        (0.35, 0, 0.22, 850),
        (0, 0.3, 0.1, 1300),
    ):
        img[(x - cx) ** 2 + (y - cy) ** 2 < r**2] = v
    img += rng.normal(0, 12, img.shape)
    return np.clip(img, 0, 4095).astype("<u2")


def _header(
    sop_class: str,
    study_uid: str,
    series_uid: str,
    number: int,
    size: int,
    frames: int = 1,
) -> Dataset:
    """Return the data set of one instance without its Pixel Data."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    ds.PatientName = FAKE_PATIENT
    ds.PatientID = "BENCH-0001"
    ds.StudyDate = "20250101"
    ds.Modality = "CT"
    ds.SeriesNumber = 1
    ds.InstanceNumber = number
    ds.SliceThickness = "1.0"
    ds.ImagePositionPatient = [0.0, 0.0, float(number)]
    ds.Rows = ds.Columns = size
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    if frames > 1:
        ds.NumberOfFrames = frames
    return ds


def make_ct_study(
    folder: Path, instances: int = 400, size: int = 512, seed: int = 1
) -> Study:
    """Write a CT-like series of ``instances`` slices of ``size`` x ``size``."""
    rng = np.random.default_rng(seed)
    base = _phantom(size, rng)
    study_uid, series_uid = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    files = []
    for index in range(instances):
        ds = _header(CTImageStorage, study_uid, series_uid, index + 1, size)
        # Each slice differs: the phantom shifted a little, with fresh noise.
        noise = rng.integers(0, 24, base.shape, dtype=np.uint16)
        ds.PixelData = (np.roll(base, index % 32, axis=0) + noise).tobytes()
        path = folder / f"ct-{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
    return Study(folder.name, folder, tuple(files), study_uid)


def make_multiframe_study(
    folder: Path, instances: int = 4, frames: int = 100, size: int = 512, seed: int = 2
) -> Study:
    """Write ``instances`` multi-frame instances of ``frames`` frames each.

    512x512x16 bit frames of 0.5 MiB: 100 frames make a 52 MB instance.
    """
    rng = np.random.default_rng(seed)
    base = _phantom(size, rng)
    study_uid, series_uid = generate_uid(), generate_uid()
    folder.mkdir(parents=True, exist_ok=True)
    frame_bytes = size * size * 2
    files = []
    for index in range(instances):
        ds = _header(
            EnhancedCTImageStorage, study_uid, series_uid, index + 1, size, frames
        )
        path = folder / f"mf-{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        # Pixel Data (7FE0,0010), OW, explicit VR little endian (PS3.5 7.1.2):
        # tag, VR, two reserved bytes, a 32-bit length, then the frames.
        with open(path, "ab") as fh:
            fh.write(b"\xe0\x7f\x10\x00OW\x00\x00")
            fh.write((frames * frame_bytes).to_bytes(4, "little"))
            for frame in range(frames):
                fh.write(np.roll(base, (index * 7 + frame) % 64, axis=1).tobytes())
        files.append(path)
    return Study(folder.name, folder, tuple(files), study_uid)


def make_large_study(folder: Path, total_bytes: int, frames: int = 100) -> Study:
    """Write a study of about ``total_bytes`` in multi-frame instances of ~52 MB."""
    per_instance = frames * 512 * 512 * 2
    count = max(1, round(total_bytes / per_instance))
    return make_multiframe_study(folder, instances=count, frames=frames, seed=3)
