"""The spool folder: content-addressed instances, envelope names, free space."""

import hashlib
import os
import time
from pathlib import Path

import pytest

from bridge.errors import SpoolError
from bridge.spool import Spool, new_envelope_id


@pytest.fixture
def spool(tmp_path):
    return Spool(tmp_path / "spool")


def test_adopt_instance_renames_the_file_to_its_digest(spool):
    src = spool.incoming / "tmp123.dcm"
    src.write_bytes(b"dicom bytes")
    digest = hashlib.sha256(b"dicom bytes").hexdigest()

    stored = spool.adopt_instance(src)

    assert stored.path == f"instances/{digest[:2]}/{digest}.dcm"
    assert stored.digest == digest
    assert stored.size_bytes == 11
    assert spool.path_of(stored.path).read_bytes() == b"dicom bytes"
    assert not src.exists()


def test_adopting_identical_bytes_twice_keeps_one_file(spool):
    for name in ("a.dcm", "b.dcm"):
        (spool.incoming / name).write_bytes(b"same")
        stored = spool.adopt_instance(spool.incoming / name)
    assert len(list((spool.root / "instances").rglob("*.dcm"))) == 1
    assert spool.path_of(stored.path).read_bytes() == b"same"


def test_import_instance_leaves_the_source_in_place(spool, tmp_path):
    src = tmp_path / "outside.dcm"
    src.write_bytes(b"outside")
    stored = spool.import_instance(src)
    assert src.read_bytes() == b"outside"
    assert spool.path_of(stored.path).read_bytes() == b"outside"
    assert list(spool.incoming.iterdir()) == []


def test_adopt_instance_raises_spool_error_for_a_missing_file(spool):
    with pytest.raises(SpoolError):
        spool.adopt_instance(spool.incoming / "gone.dcm")


def test_path_of_refuses_a_path_outside_the_spool(spool):
    with pytest.raises(SpoolError):
        spool.path_of("../elsewhere/file.dcm")


def test_envelope_path_accepts_a_generated_id(spool):
    envelope_id = new_envelope_id()
    assert spool.envelope_path("outbox", envelope_id) == (
        spool.root / "outbox" / f"{envelope_id}.zip"
    )
    assert spool.envelope_path("opened", envelope_id) == (
        spool.root / "opened" / envelope_id
    )


@pytest.mark.parametrize(
    "bad",
    ["../../etc/passwd", "not-a-uuid", "0F8E2B1C-2D3E-4F50-8A9B-0C1D2E3F4A5B", ""],
)
def test_envelope_path_refuses_ids_that_are_not_canonical_uuids(spool, bad):
    with pytest.raises(SpoolError):
        spool.envelope_path("inbox", bad)


def test_envelope_path_refuses_an_unknown_folder(spool):
    with pytest.raises(SpoolError):
        spool.envelope_path("instances", new_envelope_id())


def test_has_room_compares_free_space_with_both_watermarks(spool):
    space = spool.disk_space()
    assert spool.has_room(min_free_bytes=0, min_free_ratio=0.0)
    assert not spool.has_room(min_free_bytes=space.total_bytes + 1)
    assert not spool.has_room(min_free_ratio=1.0 + 1e-9)


def test_sweep_interrupted_removes_old_partial_work_and_nothing_recorded(spool):
    env_id = "0f8fad5b-d9cb-469f-a165-70867728950e"
    root = spool.root
    partial = [
        spool.incoming / "rx.dcm",
        root / "tmp" / "upload.part",
        root / "outbox" / f".{env_id}.zip.k3j2.tmp",
        root / "opened" / f".{env_id}.x8q1.partial",
    ]
    kept = [
        spool.envelope_path("outbox", env_id),
        spool.envelope_path("inbox", env_id),
        spool.envelope_path("opened", env_id),
        root / "opened" / f"{env_id}.progress",
    ]
    for path in partial[:3] + kept[:2]:
        path.write_bytes(b"x")
    for folder in (partial[3], *kept[2:]):
        (folder / "dicom").mkdir(parents=True)
        (folder / "dicom" / "a.dcm").write_bytes(b"x")
    hour_ago = time.time() - 3600
    for path in partial + kept:
        os.utime(path, (hour_ago, hour_ago))
    fresh = [
        root / "outbox" / f".{env_id}.zip.fresh.tmp",
        spool.incoming / "arriving.dcm",
    ]
    for path in fresh:
        path.write_bytes(b"being written now")

    assert spool.sweep_interrupted(older_than_seconds=60) == 4

    assert [p for p in partial if p.exists()] == []
    assert all(p.exists() for p in kept)
    assert all(p.exists() for p in fresh)
    assert spool.sweep_interrupted(older_than_seconds=0) == 2
    assert not any(p.exists() for p in fresh)


def _received(spool, chunks):
    """Write ``chunks`` through an incoming file, as pynetdicom does."""
    incoming = spool.incoming_file(delete=False, mode="wb", suffix=".dcm")
    for chunk in chunks:
        incoming.write(chunk)
        incoming.file.flush()
    return incoming


def test_incoming_file_is_adopted_without_reading_it_again(spool, monkeypatch):
    incoming = _received(spool, [b"\0" * 128, b"DICM", b"data set"])
    monkeypatch.setattr("bridge.spool._hash_and_sync", _must_not_be_called)

    stored = spool.adopt_instance(Path(incoming.name))

    expected = b"\0" * 128 + b"DICMdata set"
    assert stored.digest == hashlib.sha256(expected).hexdigest()
    assert stored.size_bytes == len(expected)
    assert spool.path_of(stored.path).read_bytes() == expected
    incoming.close()


def test_incoming_file_fsynced_in_the_background_is_adopted(spool):
    incoming = _received(spool, [b"fragment one", b"fragment two"])
    spool.sync_received()

    stored = spool.adopt_instance(Path(incoming.name))

    assert spool.path_of(stored.path).read_bytes() == b"fragment onefragment two"
    incoming.close()


def test_sync_received_on_a_thread_that_wrote_nothing_does_nothing(spool):
    spool.sync_received()
    assert list(spool.incoming.iterdir()) == []


def test_incoming_file_changed_behind_its_writer_is_not_adopted(spool):
    incoming = _received(spool, [b"as received"])
    with open(incoming.name, "ab") as fh:
        fh.write(b" and more")

    with pytest.raises(SpoolError):
        spool.adopt_instance(Path(incoming.name))
    incoming.close()


def _must_not_be_called(*args):
    raise AssertionError("the received file was read again")


def test_incoming_file_dropped_without_close_releases_its_descriptor(spool):
    incoming = _received(spool, [b"cut short"])
    fd = incoming._fd

    del incoming

    with pytest.raises(OSError):
        os.fstat(fd)


def test_incoming_file_that_cannot_be_written_takes_the_rest_and_is_not_adopted(
    spool,
):
    incoming = _received(spool, [b"written"])
    # The file's descriptor now leads to /dev/full: every write fails ENOSPC.
    full = os.open("/dev/full", os.O_WRONLY)
    os.dup2(full, incoming._fd)
    os.close(full)

    taken = [incoming.write(chunk) for chunk in (b"lost", b"dropped")]

    assert taken == [4, 7]
    assert incoming.failed is not None
    with pytest.raises(SpoolError):
        spool.check_received(Path(incoming.name))
    with pytest.raises(SpoolError):
        spool.adopt_instance(Path(incoming.name))
    incoming.close()


def test_keep_replaced_links_the_file_under_its_study(spool, tmp_path):
    src = tmp_path / "x.dcm"
    src.write_bytes(b"first version")
    stored = spool.adopt_instance(src)

    kept = spool.keep_replaced(stored.path, "st-0a1b2c")

    assert kept == f"replaced/st-0a1b2c/{stored.digest}.dcm"
    assert spool.path_of(kept).read_bytes() == b"first version"
    assert spool.path_of(stored.path).is_file()


@pytest.mark.parametrize("bad", ["../instances", "st-", "1.2.840.1", "st-ZZ"])
def test_keep_replaced_refuses_a_study_ref_the_stores_never_make(spool, bad):
    with pytest.raises(SpoolError):
        spool.keep_replaced("instances/00/none.dcm", bad)


def test_incoming_file_that_cannot_be_created_takes_the_data_set_all_the_same(
    tmp_path,
):
    spool = Spool(tmp_path / "spool")
    spool.incoming.rmdir()  # mkstemp now fails, as on a disk without inodes

    incoming = spool.incoming_file(delete=False, mode="wb", suffix=".dcm")

    assert incoming.write(b"data set") == 8
    with pytest.raises(SpoolError):
        spool.check_received(Path(incoming.name))
    incoming.close()
