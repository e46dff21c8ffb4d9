"""A data set of several hundred megabytes streams to disk: the listener process
never holds it in memory (issue #3, pynetdicom's chunked receive)."""

import hashlib
import struct
from pathlib import Path

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom.dsutils import split_dataset
from pynetdicom.sop_class import MultiFrameGrayscaleWordSecondaryCaptureImageStorage

from bridge.store import SQLiteStore
from tests.support.dcmtk import dcmsend
from tests.test_listener_crash import IngressProcess

MiB = 1 << 20
FRAMES = 150  # of 1024 x 1024 16-bit pixels, 2 MiB each: 300 MiB of pixel data
PEAK_BOUND = 150 * MiB


def write_large_instance(path: Path, frames: int) -> Path:
    """Write a multi-frame instance of ``frames`` 2 MiB frames, a frame at a time.

    The header comes from pydicom; Pixel Data (7FE0,0010) is appended as an
    explicit VR OW element (PS3.5 7.1.2), so the test never holds it whole either.
    """
    sop_uid = generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MultiFrameGrayscaleWordSecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientID = "FAKE-LARGE"
    ds.Modality = "OT"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.NumberOfFrames = frames
    ds.Rows = ds.Columns = 1024
    ds.BitsAllocated = ds.BitsStored = 16
    ds.HighBit = 15
    ds.PixelRepresentation = 0
    ds.save_as(path, enforce_file_format=True)

    frame = 1024 * 1024 * 2
    with open(path, "ab") as fh:
        fh.write(struct.pack("<HH2sHI", 0x7FE0, 0x0010, b"OW", 0, frame * frames))
        for n in range(frames):
            # Each frame differs, so a frame lost or repeated changes the digest.
            fh.write(n.to_bytes(2, "little") * (frame // 2))
    return path


def dataset_digest(path: Path) -> str:
    """SHA-256 of the data set after the file meta, read a MiB at a time."""
    _, offset = split_dataset(path)
    sha = hashlib.sha256()
    with open(path, "rb") as fh:
        fh.seek(offset)
        while chunk := fh.read(MiB):
            sha.update(chunk)
    return sha.hexdigest()


def peak_rss(pid: int) -> int:
    """The process's peak resident set size (VmHWM, proc(5)), in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM in /proc/<pid>/status")


@pytest.mark.slow
def test_large_instance_is_spooled_intact_without_being_held_in_memory(tmp_path):
    source = write_large_instance(tmp_path / "large.dcm", FRAMES)
    assert source.stat().st_size > 2 * PEAK_BOUND
    bridge = IngressProcess(tmp_path)
    try:
        sent = dcmsend(bridge.port, [source], timeout=600)
        peak = peak_rss(bridge.proc.pid)
    finally:
        bridge.kill()

    assert sent.returncode == 0, sent.stdout + sent.stderr
    store = SQLiteStore(tmp_path / "state.sqlite")
    try:
        [study] = store.recent_studies()
        [inst] = store.study_instances(study.ref)
    finally:
        store.close()
    spooled = tmp_path / "spool" / inst.spool_path
    assert dataset_digest(spooled) == dataset_digest(source)
    assert peak < PEAK_BOUND, f"peak RSS {peak / MiB:.0f} MiB"
    print(f"large instance bytes={source.stat().st_size} peak_rss_mib={peak / MiB:.0f}")
