"""The spool: the one folder on disk where the bridge keeps its blobs.

Layout under the spool root::

    incoming/            pynetdicom writes each C-STORE data set here while it
                         arrives (same filesystem, so adopting it is a rename)
    instances/ab/<sha256>.dcm
                         received instances, content-addressed by the SHA-256
                         of the file as stored; ``ab`` is the first two hex digits
    replaced/<study ref>/<sha256>.dcm
                         earlier versions of instances a newer version replaced
                         (duplicate policy keep-newest), kept with their study
    outbox/<uuid>.zip    envelopes this node built, waiting for delivery
    inbox/<uuid>.zip     envelopes received from a peer, waiting to be opened
    quarantine/<uuid>.zip
                         envelopes that failed verification, kept for an operator
    opened/<uuid>/       the extracted payload of an opened envelope
    tmp/                 scratch space for writes that end in a rename

No file name comes from received input: instances are named by their digest,
envelopes by an id this module generated or validated as a UUID. A file is
durable when :meth:`Spool.adopt_instance` or :func:`fsync_rename` returns: its
bytes are fsynced, it is renamed into place and its folder is fsynced.

A data set received over the network is written through an
:class:`IncomingFile`, which hashes the bytes as they go by, so adopting it
costs an fsync and a rename but no second read of the file.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
import uuid
import weakref
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from bridge.errors import SpoolError

logger = logging.getLogger(__name__)

_CHUNK = 1 << 20  # 1 MiB reads: SHA-256 runs near disk speed with this size
_ENVELOPE_FOLDERS = ("outbox", "inbox", "quarantine", "opened")
# A study reference as the stores make them (bridge.store._rules.new_study_ref).
_STUDY_REF = re.compile(r"st-[0-9a-f]{1,32}")
# Threads that fsync received files in the background: one per association
# receiving at the same moment is plenty; more only queue at the disk.
_SYNC_THREADS = 4


@dataclass(frozen=True)
class SpooledFile:
    """A file made durable in the spool."""

    path: str  # relative to the spool root, '/'-separated
    digest: str  # lower-case hex SHA-256 of the file
    size_bytes: int


@dataclass(frozen=True)
class DiskSpace:
    """Free and total bytes of the filesystem that holds the spool."""

    free_bytes: int
    total_bytes: int

    @property
    def free_ratio(self) -> float:
        """Free space as a fraction of the filesystem, 0.0-1.0."""
        return self.free_bytes / self.total_bytes if self.total_bytes else 0.0


class IncomingFile:
    """A file in ``incoming/`` that hashes its bytes while they are written.

    It stands in for the ``NamedTemporaryFile`` that pynetdicom writes a
    received data set to, and offers what pynetdicom uses of one: ``name``,
    ``write``, ``file.flush`` and ``close``. Writes go straight to the file
    descriptor, unbuffered, so ``flush`` has nothing to do. One thread writes it.

    It never raises: pynetdicom writes it on the association's reactor thread,
    which an exception would end, leaving the modality without an answer. A
    file that cannot be created or written (a full disk) records the error in
    ``failed``, gives back what it had written and takes the rest of the data
    set without writing it, so that the C-STORE handler can answer
    Out of Resources and the association go on (PS3.4 B.2.3).
    """

    def __init__(self, folder: Path):
        self.failed: OSError | None = None
        self._sha = hashlib.sha256()
        self._synced: Future | None = None
        self.size = 0
        try:
            fd, self.name = tempfile.mkstemp(dir=folder, suffix=".dcm")
        except OSError as exc:
            # A name no file has, for pynetdicom to report and later unlink.
            self.name = str(folder / f"unwritten-{uuid.uuid4().hex}.dcm")
            self._fd = -1
            self._fail(exc)
            return
        self._fd = fd
        # A data set cut short by an abort is never closed by pynetdicom; its
        # descriptor goes when the object does (the file, at the next sweep).
        self._closer = weakref.finalize(self, os.close, fd)

    @property
    def file(self) -> IncomingFile:
        """This object: pynetdicom flushes ``file``, as on a tempfile wrapper."""
        return self

    def write(self, data) -> int:
        """Write all of ``data`` and add it to the digest; return its length.

        After a failed write, or when the file could not be created, ``data`` is
        taken and dropped; see the class docstring.
        """
        if self.failed is None:
            view = memoryview(data)
            self._sha.update(view)
            try:
                while view:
                    view = view[os.write(self._fd, view) :]
            except OSError as exc:
                self._fail(exc)
            self.size += len(data)
        return len(data)

    def _fail(self, exc: OSError) -> None:
        """Record the first failure and free the space the partial file holds."""
        self.failed = exc
        if self._fd >= 0:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
        logger.warning(
            "received data set not written error=%s",
            errno.errorcode.get(exc.errno, type(exc).__name__),
        )

    def flush(self) -> None:
        """Do nothing: every write already reached the file."""

    def close(self) -> None:
        """Close the file, after a background fsync of it ended; the bytes stay."""
        if self._synced is not None:
            self._synced.exception()  # waits; the fsync must not outlive the fd
        if self._fd >= 0:
            self._closer()
            self._fd = -1

    def digest(self) -> tuple[str, int]:
        """Return the SHA-256 and size of what was written so far."""
        return self._sha.copy().hexdigest(), self.size

    def check(self) -> None:
        """Raise SpoolError when the data set could not be written whole."""
        if self.failed is not None:
            raise SpoolError(
                f"spool: cannot write a received instance: {self.failed.strerror}"
            )

    def sync_soon(self, pool: ThreadPoolExecutor) -> None:
        """Start fsyncing the file on ``pool``; call once the last byte is written.

        :meth:`digest_and_sync` then waits for that fsync instead of running its
        own, so the disk works while the caller does other things.
        """
        if self._synced is None and self._fd >= 0 and self.failed is None:
            self._synced = pool.submit(os.fsync, self._fd)

    def digest_and_sync(self) -> tuple[str, int]:
        """Fsync the file and return the SHA-256 and size of what was written.

        Raises OSError when the fsync fails, or when the file on disk is not the
        size written, so that a file changed behind our back is never named by
        a digest it lacks, or when the data set could not be written whole.
        """
        if self.failed is not None:
            raise self.failed
        if self._synced is not None and self._fd >= 0:
            self._synced.result()
            fd = self._fd
        else:
            fd = self._fd if self._fd >= 0 else os.open(self.name, os.O_RDONLY)
            os.fsync(fd)
        try:
            if os.fstat(fd).st_size != self.size:
                raise OSError(errno.EIO, "received file changed size", self.name)
        finally:
            if fd != self._fd:
                os.close(fd)
        return self._sha.hexdigest(), self.size


class Spool:
    """The spool folder; see the module docstring for its layout.

    Safe to use from many threads: every write goes to a unique temporary name
    and ends in an atomic rename.
    """

    def __init__(self, root: Path | str):
        self.root = Path(root).resolve()
        try:
            for name in (
                "incoming",
                "instances",
                "replaced",
                "tmp",
                *_ENVELOPE_FOLDERS,
            ):
                (self.root / name).mkdir(parents=True, exist_ok=True)
            # The 256 fan-out folders exist from the start, so that no instance
            # pays for a mkdir and an extra folder fsync on its way to the ack.
            instances = self.root / "instances"
            missing = [
                f"{i:02x}" for i in range(256) if not (instances / f"{i:02x}").is_dir()
            ]
            for name in missing:
                (instances / name).mkdir(exist_ok=True)
            if missing:
                _fsync_dir(instances)
        except OSError as exc:
            raise SpoolError(
                f"spool {self.root}: cannot create its folders: {exc}"
            ) from exc
        # Files being received, by name, until adopted or dropped by their
        # writer; and the one each writing thread has open, for sync_received.
        self._receiving: weakref.WeakValueDictionary[str, IncomingFile] = (
            weakref.WeakValueDictionary()
        )
        self._receiving_lock = threading.Lock()
        self._writing = threading.local()
        self._sync_pool: ThreadPoolExecutor | None = None

    @property
    def incoming(self) -> Path:
        """The folder where received data sets are written while they arrive."""
        return self.root / "incoming"

    # -- instances --------------------------------------------------------------

    def incoming_file(self, **_tempfile_options) -> IncomingFile:
        """Return a new :class:`IncomingFile` in ``incoming/``.

        Accepts and ignores ``NamedTemporaryFile``'s keyword arguments, so that
        pynetdicom can call it in that function's place. Raises OSError.
        """
        incoming = IncomingFile(self.incoming)
        with self._receiving_lock:
            self._receiving[incoming.name] = incoming
        self._writing.file = weakref.ref(incoming)
        return incoming

    def sync_received(self) -> None:
        """Start the fsync of the file this thread has just finished writing.

        Call from the thread that wrote an :meth:`incoming_file`, once its last
        byte is in; does nothing when that thread has none open. The fsync runs
        on a small pool of threads, and :meth:`adopt_instance` waits for it.
        """
        written = getattr(self._writing, "file", None)
        incoming = written() if written is not None else None
        if incoming is None:
            return
        self._writing.file = None
        with self._receiving_lock:
            if self._sync_pool is None:
                self._sync_pool = ThreadPoolExecutor(
                    max_workers=_SYNC_THREADS, thread_name_prefix="spool-sync"
                )
        incoming.sync_soon(self._sync_pool)

    def check_received(self, src: Path) -> None:
        """Raise SpoolError when the received file ``src`` could not be written
        whole (a full disk, see :class:`IncomingFile`); else do nothing.

        Call before reading ``src``: what is on disk of such a file is not the
        data set that was sent.
        """
        with self._receiving_lock:
            incoming = self._receiving.get(str(src))
        if incoming is not None:
            incoming.check()

    def received_digest(self, src: Path) -> tuple[str, int]:
        """Return the SHA-256 and size of the received file ``src``, unsynced.

        For a file from :meth:`incoming_file` this costs nothing (the digest
        was taken as it arrived); any other file is read once. Raises
        SpoolError when it cannot be read.
        """
        with self._receiving_lock:
            incoming = self._receiving.get(str(src))
        if incoming is not None:
            incoming.check()
            return incoming.digest()
        try:
            return _hash(src)
        except OSError as exc:
            raise SpoolError(f"spool: cannot read a received instance: {exc}") from exc

    def adopt_instance(self, src: Path) -> SpooledFile:
        """Make the received file ``src`` durable as a content-addressed instance.

        Hashes ``src`` (from what was written, for a file from
        :meth:`incoming_file`; else by reading it once), fsyncs it and renames
        it into ``instances/``; when ``src`` lies on another filesystem it is copied
        instead and ``src`` is left in place. When an identical file is already
        spooled, ``src`` is left alone and the existing file is returned.
        Raises SpoolError when the file cannot be read, written or synced.
        """
        with self._receiving_lock:
            incoming = self._receiving.pop(str(src), None)
        try:
            if incoming is not None:
                digest, size = incoming.digest_and_sync()
            else:
                digest, size = _hash_and_sync(src)
            rel = f"instances/{digest[:2]}/{digest}.dcm"
            dest = self.root / rel
            if dest.exists() and dest.stat().st_size == size:
                # The same bytes are spooled already; the received copy is spare.
                with contextlib.suppress(OSError):
                    if src.parent == self.incoming:
                        src.unlink()
                return SpooledFile(rel, digest, size)
            folder_is_new = not dest.parent.exists()
            dest.parent.mkdir(exist_ok=True)
            if folder_is_new:
                _fsync_dir(dest.parent.parent)
            try:
                os.rename(src, dest)
            except OSError as exc:
                if exc.errno != errno.EXDEV:
                    raise
                self._copy_durably(src, dest)
            _fsync_dir(dest.parent)
        except OSError as exc:
            raise SpoolError(f"spool: cannot store a received instance: {exc}") from exc
        return SpooledFile(rel, digest, size)

    def keep_replaced(self, rel: str, study_ref: str) -> str:
        """Keep the spooled instance ``rel`` as a replaced version of its study.

        Hard-links it as ``replaced/<study_ref>/<digest>.dcm`` and returns that
        path (spool-relative); the file under ``instances/`` is left to
        whatever else may name the same bytes. ``study_ref`` must be a store's
        opaque reference. Raises SpoolError when the link cannot be made.
        """
        if not _STUDY_REF.fullmatch(study_ref):
            raise SpoolError(
                f"study ref {study_ref!r}: expected 'st-' and hexadecimal digits"
            )
        src = self.path_of(rel)
        folder = self.root / "replaced" / study_ref
        dest = folder / src.name
        try:
            folder_is_new = not folder.is_dir()
            folder.mkdir(exist_ok=True)
            if folder_is_new:
                _fsync_dir(folder.parent)
            with contextlib.suppress(FileExistsError):
                os.link(src, dest)
            _fsync_dir(folder)
        except OSError as exc:
            raise SpoolError(f"spool: cannot keep a replaced instance: {exc}") from exc
        return self.relative(dest)

    def import_instance(self, src: Path) -> SpooledFile:
        """Copy a DICOM file from outside the spool in as an instance.

        ``src`` is never moved or changed. Raises SpoolError on any failure.
        """
        try:
            fd, tmp = tempfile.mkstemp(dir=self.incoming, suffix=".dcm")
            os.close(fd)
            shutil.copyfile(src, tmp)
        except OSError as exc:
            raise SpoolError(f"spool: cannot copy {src} in: {exc}") from exc
        try:
            return self.adopt_instance(Path(tmp))
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _copy_durably(self, src: Path, dest: Path) -> None:
        tmp = dest.with_name(f".{dest.name}.{uuid.uuid4().hex}.part")
        try:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb") as fh:
                os.fsync(fh.fileno())
            os.rename(tmp, dest)
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def path_of(self, rel: str) -> Path:
        """Return the absolute path of a spool-relative path from the store.

        Raises SpoolError when ``rel`` would lead outside the spool root.
        """
        path = (self.root / rel).resolve()
        if not path.is_relative_to(self.root) or path == self.root:
            raise SpoolError(f"spool path {rel!r}: expected a path inside the spool")
        return path

    def sweep_interrupted(self, older_than_seconds: float = 3600.0) -> int:
        """Remove what interrupted work left behind; return how many entries went.

        That is partial data sets in ``incoming/``, everything in ``tmp/``, a
        zip being written in ``outbox/`` (``.<id>.zip.<random>.tmp``) and a
        payload being extracted in ``opened/`` (``.<id>.<random>.partial``):
        names no record points to, which the work that made them redoes from
        the start. Only entries older than ``older_than_seconds`` go, so that
        work going on now (another process's, on a shared spool) is never
        touched; 0 for a process that holds its store alone, at its start.
        """
        limit = time.time() - older_than_seconds
        removed = 0
        candidates = [
            *self.incoming.iterdir(),
            *(self.root / "tmp").iterdir(),
            *(self.root / "outbox").glob(".*.tmp"),
            *(self.root / "opened").glob(".*.partial"),
        ]
        for path in candidates:
            with contextlib.suppress(OSError):
                if path.lstat().st_mtime >= limit:
                    continue
                if path.is_dir() and not path.is_symlink():
                    shutil.rmtree(path)
                else:
                    path.unlink()
                removed += 1
        if removed:
            logger.warning("interrupted work removed from spool entries=%d", removed)
        return removed

    # -- envelopes ----------------------------------------------------------------

    def envelope_path(self, folder: str, envelope_id: str) -> Path:
        """Return ``<folder>/<id>.zip`` (``opened/<id>`` for ``opened``).

        ``folder`` is one of outbox, inbox, quarantine or opened. Raises
        SpoolError unless ``envelope_id`` is a UUID in canonical lower-case form,
        so that no name from a peer reaches the filesystem unchecked.
        """
        if folder not in _ENVELOPE_FOLDERS:
            raise SpoolError(
                f"spool folder {folder!r}: expected one of "
                f"{', '.join(_ENVELOPE_FOLDERS)}"
            )
        checked = validate_envelope_id(envelope_id)
        name = checked if folder == "opened" else f"{checked}.zip"
        return self.root / folder / name

    def superseded_path(self, envelope_id: str, number: int) -> Path:
        """Return ``quarantine/<id>.superseded-<number>.zip``: where a quarantined
        envelope is kept when a resend of the same id takes its record."""
        checked = validate_envelope_id(envelope_id)
        return self.root / "quarantine" / f"{checked}.superseded-{int(number)}.zip"

    def relative(self, path: Path) -> str:
        """Return ``path`` relative to the spool root, as the store records it."""
        return Path(path).resolve().relative_to(self.root).as_posix()

    def temp_path(self, suffix: str = "") -> Path:
        """Return a fresh name under ``tmp/`` for a write that ends in a rename."""
        return self.root / "tmp" / f"{uuid.uuid4().hex}{suffix}"

    # -- disk space ---------------------------------------------------------------

    def disk_space(self) -> DiskSpace:
        """Return free and total bytes of the spool's filesystem.

        Free bytes are those available to this (unprivileged) process.
        """
        try:
            st = os.statvfs(self.root)
        except OSError as exc:
            raise SpoolError(f"spool: cannot read free space: {exc}") from exc
        return DiskSpace(st.f_bavail * st.f_frsize, st.f_blocks * st.f_frsize)

    def has_room(self, min_free_bytes: int = 0, min_free_ratio: float = 0.0) -> bool:
        """Return True while free space is at or above both watermarks."""
        space = self.disk_space()
        return space.free_bytes >= min_free_bytes and space.free_ratio >= min_free_ratio


def new_envelope_id() -> str:
    """Return a fresh envelope id (a random UUID, lower case)."""
    return str(uuid.uuid4())


def validate_envelope_id(envelope_id: str) -> str:
    """Return ``envelope_id`` if it is a canonical lower-case UUID, else raise.

    Raises SpoolError naming the bad value.
    """
    try:
        canonical = str(uuid.UUID(envelope_id))
    except (ValueError, TypeError, AttributeError) as exc:
        raise SpoolError(
            f"envelope id {envelope_id!r}: expected a UUID like '0f8e2b1c-...-...'"
        ) from exc
    if canonical != envelope_id:
        raise SpoolError(
            f"envelope id {envelope_id!r}: expected the canonical form {canonical!r}"
        )
    return canonical


def fsync_rename(src: Path, dest: Path) -> None:
    """Fsync ``src``, rename it to ``dest`` and fsync ``dest``'s folder.

    Both paths must be on the same filesystem (inside the spool they are).
    Raises SpoolError on failure.
    """
    try:
        with open(src, "rb") as fh:
            os.fsync(fh.fileno())
        os.rename(src, dest)
        _fsync_dir(dest.parent)
    except OSError as exc:
        raise SpoolError(f"spool: cannot move {src.name} into place: {exc}") from exc


def _hash_and_sync(path: Path) -> tuple[str, int]:
    """Return the SHA-256 and size of ``path`` after fsyncing it."""
    return _hash(path, sync=True)


def _hash(path: Path, *, sync: bool = False) -> tuple[str, int]:
    """Return the SHA-256 and size of ``path``, fsyncing it first if ``sync``."""
    sha = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            sha.update(chunk)
            size += len(chunk)
        if sync:
            os.fsync(fh.fileno())
    return sha.hexdigest(), size


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
