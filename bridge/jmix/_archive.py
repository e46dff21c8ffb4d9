"""The envelope as a zip or a folder: atomic writing and guarded reading.

Entries are stored, never deflated: a ciphertext does not compress. On reading,
every name is checked before anything is opened: duplicates, absolute names,
``..``, links and absurd declared sizes are refused (docs/envelope.md section 7).
"""

import os
import stat
import struct
import tempfile
import time
import zipfile
import zlib
from pathlib import Path
from typing import BinaryIO

from bridge.errors import (
    AuthenticationFailed,
    IntegrityError,
    MalformedEnvelope,
    UnsafeEntry,
)

_SMALL_LIMIT = 64 * 1024 * 1024
_MAX_ENTRIES = 1_000_000
_MAX_SEGMENT = 255  # bytes in one path segment: NAME_MAX of Linux filesystems

# What zipfile raises on damaged input besides BadZipFile: a truncated entry
# (EOFError), a broken deflate stream (zlib.error), a UTF-8 flagged name that
# is not UTF-8 (UnicodeDecodeError, a ValueError), a version or feature it does
# not implement (NotImplementedError), odd offsets (ValueError, OverflowError,
# struct.error). Each is translated here, once (STYLE "Errors").
_ZIP_ERRORS = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    EOFError,
    zlib.error,
    ValueError,
    NotImplementedError,
    OverflowError,
    struct.error,
)


def _check_name(name: str) -> None:
    parts = name.rstrip("/").split("/")
    if (
        not name.strip("/")
        or name.startswith("/")
        or "\\" in name
        or any(ord(c) < 32 for c in name)
        or any(p in ("", ".", "..") for p in parts)
        or any(len(p.encode("utf-8", "surrogateescape")) > _MAX_SEGMENT for p in parts)
        or (len(parts[0]) == 2 and parts[0][1] == ":")
    ):
        raise UnsafeEntry(f"zip entry {name!r:.200}: unsafe name")


def _check_no_file_is_a_folder(found: dict[str, int]) -> None:
    """Refuse a file whose name is also the folder of another (``a`` and ``a/b``).

    Extraction could not create both; refusing here keeps that an envelope
    error rather than a filesystem one.
    """
    folders = {name[:i] for name in found for i, c in enumerate(name) if c == "/"}
    clash = sorted(folders & found.keys())
    if clash:
        raise UnsafeEntry(f"zip entry {clash[0]!r:.200}: both a file and a folder")


class ZipOut:
    """Write a zip under a temporary name beside ``path``; :meth:`commit` renames it.

    Use as a context manager: leaving it without :meth:`commit` removes the
    temporary file, so a failed pack leaves nothing behind.
    """

    def __init__(self, path: str | os.PathLike, stamp: float | None = None):
        self.path = Path(path)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{self.path.name}.", suffix=".tmp", dir=self.path.parent
        )
        self._tmp = Path(tmp)
        self._fh = os.fdopen(fd, "w+b")
        self._zip = zipfile.ZipFile(self._fh, "w", zipfile.ZIP_STORED, allowZip64=True)
        self._date = time.gmtime(stamp if stamp is not None else time.time())[:6]
        self._done = False

    def _info(self, name: str) -> zipfile.ZipInfo:
        info = zipfile.ZipInfo(name, self._date)
        info.compress_type = zipfile.ZIP_STORED
        info.external_attr = (stat.S_IFREG | 0o644) << 16
        return info

    def open(self, name: str) -> BinaryIO:
        """Return a writable stream for entry ``name`` (zip64 allowed)."""
        return self._zip.open(self._info(name), "w", force_zip64=True)

    def write_bytes(self, name: str, data: bytes) -> None:
        """Write a small entry in one go."""
        self._zip.writestr(self._info(name), data)

    def commit(self) -> int:
        """Finish the zip, fsync it, rename it into place; return its size in bytes."""
        self._zip.close()
        self._fh.flush()
        os.fsync(self._fh.fileno())
        size = self._fh.tell()
        self._fh.close()
        os.replace(self._tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._done = True
        return size

    def __enter__(self) -> "ZipOut":
        return self

    def __exit__(self, *exc) -> None:
        if not self._done:
            self._zip.close()
            self._fh.close()
            self._tmp.unlink(missing_ok=True)


class _Guarded:
    """A zip entry stream that reports a corrupt entry as an integrity failure.

    For an ``authenticated`` entry (the ciphertext) a corrupt entry, a CRC-32
    mismatch above all, is an authentication failure instead: its bytes are
    the attacker's to change, and the GCM tag is what decides whether they
    changed. Reporting the zip's CRC apart would tell an attacker which of
    the two checks caught an edit (docs/envelope.md section 8).
    """

    def __init__(self, stream: BinaryIO, name: str, authenticated: bool = False):
        self._stream, self._name = stream, name
        self._authenticated = authenticated

    def read(self, size: int = -1) -> bytes:
        try:
            return self._stream.read(size)
        except (*_ZIP_ERRORS, OSError) as exc:
            if self._authenticated and not isinstance(exc, OSError):
                raise AuthenticationFailed(stage="payload") from exc
            raise IntegrityError(f"{self._name}: corrupt zip entry ({exc})") from exc

    def close(self) -> None:
        self._stream.close()

    def __enter__(self) -> "_Guarded":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class Source:
    """An envelope to read: a zip (root or one top-level folder) or a folder.

    ``names`` maps each file's name relative to the envelope root to its size.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._prefix = ""
        if self.path.is_dir():
            self.names = self._scan_folder()
            return
        try:
            self.names = self._scan_zip()
        except BaseException:
            self.close()
            raise

    def _scan_folder(self) -> dict[str, int]:
        names: dict[str, int] = {}
        for top, dirs, files in os.walk(self.path):
            for entry in dirs + files:
                full = Path(top, entry)
                info = full.lstat()
                rel = full.relative_to(self.path).as_posix()
                if stat.S_ISLNK(info.st_mode):
                    raise UnsafeEntry(f"{rel}: links are not allowed in an envelope")
                if stat.S_ISREG(info.st_mode):
                    names[rel] = info.st_size
                elif not stat.S_ISDIR(info.st_mode):
                    raise UnsafeEntry(f"{rel}: not a regular file")
        return names

    def _scan_zip(self) -> dict[str, int]:
        try:
            self._zip = zipfile.ZipFile(self.path)
        except (*_ZIP_ERRORS, OSError) as exc:
            raise MalformedEnvelope(
                f"{self.path}: not a readable zip: {exc!s:.200}"
            ) from exc
        archive_size = self.path.stat().st_size
        infos = self._zip.infolist()
        if len(infos) > _MAX_ENTRIES:
            raise UnsafeEntry(f"{self.path}: {len(infos)} entries, too many")
        found: dict[str, int] = {}
        for info in infos:
            name = info.filename
            _check_name(name)
            if name in found or name.rstrip("/") in found:
                raise UnsafeEntry(f"zip entry {name!r}: duplicate name")
            # Unix type bits, when present (PKWARE APPNOTE 4.4.15); zips made
            # elsewhere leave them zero, which means a regular file.
            kind = stat.S_IFMT(info.external_attr >> 16)
            if kind not in (0, stat.S_IFREG, stat.S_IFDIR):
                raise UnsafeEntry(
                    f"zip entry {name!r}: links and devices are not allowed"
                )
            if info.flag_bits & 0x1:
                raise MalformedEnvelope(f"zip entry {name!r}: encrypted zip entries")
            if info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
                raise MalformedEnvelope(f"zip entry {name!r}: unsupported compression")
            stored = info.compress_type == zipfile.ZIP_STORED
            if (
                info.compress_size > archive_size
                or (stored and info.file_size != info.compress_size)
                or info.file_size > 1032 * info.compress_size + 1024
            ):
                raise UnsafeEntry(f"zip entry {name!r}: declared size is impossible")
            if info.is_dir():
                continue
            found[name] = info.file_size
        _check_no_file_is_a_folder(found)
        return self._find_root(found)

    def _find_root(self, found: dict[str, int]) -> dict[str, int]:
        if "manifest.json" in found:
            return found
        tops = {name.split("/", 1)[0] for name in found}
        if len(tops) == 1:
            top = tops.pop()
            if f"{top}/manifest.json" in found:
                self._prefix = top + "/"
                return {n[len(self._prefix) :]: s for n, s in found.items()}
        raise MalformedEnvelope(
            f"{self.path}: no manifest.json at the root or under one top-level folder"
        )

    def open(self, name: str, *, authenticated: bool = False) -> BinaryIO:
        """Open entry ``name`` (relative to the envelope root) for reading.

        ``authenticated`` marks an entry whose integrity a cryptographic check
        decides (the ciphertext): a corrupt zip entry then raises
        :class:`AuthenticationFailed`, not :class:`IntegrityError`.
        """
        if name not in self.names:
            raise MalformedEnvelope(f"{self.path}: {name} is missing")
        if self._zip is None:
            return open(self.path / name, "rb")
        try:
            stream = self._zip.open(self._prefix + name)
        except (*_ZIP_ERRORS, OSError) as exc:
            # The local header disagrees with the central directory, or is
            # damaged: the archive is not what its index says.
            raise MalformedEnvelope(
                f"zip entry {name!r:.200}: unreadable ({exc!s:.200})"
            ) from exc
        return _Guarded(stream, name, authenticated)

    def read_small(self, name: str, limit: int = _SMALL_LIMIT) -> bytes:
        """Read a small entry whole, refusing one larger than ``limit`` bytes."""
        if self.names.get(name, 0) > limit:
            raise UnsafeEntry(f"{name}: {self.names[name]} bytes, larger than allowed")
        with self.open(name) as fh:
            data = fh.read(limit + 1)
        if len(data) > limit:
            raise UnsafeEntry(f"{name}: larger than allowed")
        return data

    def close(self) -> None:
        """Close the underlying zip, if any."""
        if self._zip is not None:
            self._zip.close()

    def __enter__(self) -> "Source":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
