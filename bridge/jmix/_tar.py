"""The payload tar, written and parsed by hand in one streaming pass.

``tarfile`` in stream mode turns quadratic on large bodies, so the framing is
written here: a header from ``TarInfo.tobuf`` (PAX, so sizes above 8 GiB and long
names still fit), the body in chunks, zero padding to 512 bytes, and two zero
blocks at the end (POSIX.1-2001 ustar/pax).

The parser is push-driven: decrypted chunks are fed in as they come, so that
decrypting, parsing, hashing and writing happen in one pass. It accepts regular
files and ignores folder entries; links, devices, absolute names, ``..`` and
duplicates are refused (docs/envelope.md section 7).
"""

import hashlib
import re
import tarfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from bridge.errors import MalformedEnvelope, UnpackableStudy, UnsafeEntry

BLOCK = 512
_ZERO = bytes(BLOCK)
_META_LIMIT = 1024 * 1024
_MAX_SEGMENT = 255  # bytes in one path segment: NAME_MAX of Linux filesystems
_DIGITS = re.compile(r"[0-9]{1,20}")
_FILE_TYPES = (tarfile.REGTYPE, tarfile.AREGTYPE)
_IGNORED = (tarfile.DIRTYPE, tarfile.XGLTYPE)


def _padding(size: int) -> int:
    return -size % BLOCK


class TarWriter:
    """Write tar framing and bodies to ``write``, one chunk at a time."""

    def __init__(self, write: Callable[[bytes], object], mtime: int):
        self._write = write
        self._mtime = mtime

    def _header(self, name: str, size: int, kind: bytes, mode: int) -> None:
        info = tarfile.TarInfo(name)
        info.size, info.type, info.mode, info.mtime = size, kind, mode, self._mtime
        self._write(info.tobuf(format=tarfile.PAX_FORMAT, encoding="utf-8"))

    def add_dir(self, name: str) -> None:
        """Add a folder entry (the rs dialect writes them)."""
        self._header(name, 0, tarfile.DIRTYPE, 0o755)

    def add_file(self, name: str, size: int, chunks: Iterable[bytes]) -> None:
        """Add a regular file of ``size`` bytes; ``chunks`` must yield exactly that."""
        self._header(name, size, tarfile.REGTYPE, 0o644)
        written = 0
        for chunk in chunks:
            written += len(chunk)
            if written > size:
                break
            self._write(chunk)
        if written != size:
            raise UnpackableStudy(
                f"{name}: expected {size} bytes, the source gave {written} "
                "(did the file change while it was packed?)"
            )
        if pad := _padding(size):
            self._write(bytes(pad))

    def close(self) -> None:
        """Write the two zero blocks that end the archive."""
        self._write(_ZERO + _ZERO)


@dataclass
class Member:
    """A regular file seen in the tar: its cleaned name, size and SHA-256."""

    name: str
    size: int
    digest: bytes


def clean_name(raw: str, strip: tuple[str, ...] = ("./", "payload/")) -> str:
    """Return a safe relative name for a payload file.

    Strips one leading ``./`` and then one ``payload/`` (the rs and js dialects);
    refuses absolute names, ``..``, backslashes, control characters, segments
    longer than a filesystem allows, and a name that is the payload root itself
    (a file cannot be the folder it is in) with :class:`UnsafeEntry`.
    """
    name = raw
    for prefix in strip:
        if name.startswith(prefix):
            name = name[len(prefix) :]
    name = name.rstrip("/")
    parts = name.split("/")
    if (
        name in ("", ".", "payload")
        or raw.startswith("/")
        or "\\" in name
        or any(ord(c) < 32 for c in name)
        or any(p in ("", ".", "..") for p in parts)
        or len(name) > 1024
        or any(len(p.encode("utf-8", "surrogateescape")) > _MAX_SEGMENT for p in parts)
        or (len(parts[0]) == 2 and parts[0][1] == ":")
    ):
        raise UnsafeEntry(f"payload entry {raw!r:.200}: unsafe name")
    return name


class Sink:
    """Where parsed files go; the base class discards bodies (verification)."""

    def begin(self, name: str, size: int) -> None:
        """Start a file called ``name`` of ``size`` bytes."""

    def write(self, data: bytes) -> None:
        """Receive the next piece of the current file."""

    def end(self) -> None:
        """Finish the current file."""


class TarParser:
    """Parse a tar fed in arbitrary pieces; hash every regular file into ``members``.

    Small files named in ``keep`` are also kept in memory (``kept``) so that
    ``files.json`` and ``metadata.json`` can be read without going to disk.
    ``limits`` maps names to the largest size allowed, once known: ``on_kept`` is
    called with each kept file as soon as it is complete, and may fill it in.
    """

    def __init__(
        self,
        sink: Sink,
        keep: Iterable[str] = (),
        keep_limit: int = 64 << 20,
        on_kept: Callable[[str, bytes], None] | None = None,
    ):
        self.sink = sink
        self.members: dict[str, Member] = {}
        self.kept: dict[str, bytes] = {}
        self.limits: dict[str, int] = {}
        self._keep, self._on_kept = set(keep), on_kept
        self._keep_limit = keep_limit
        self._buf = bytearray()
        self._state = "header"
        self._left = 0
        self._pad = 0
        self._pax: dict[str, str] = {}
        self._meta = bytearray()
        self._meta_kind = b""
        self._folders: set[str] = set()  # every folder some member sits in
        self._current: Member | None = None
        self._hasher = None
        self._kept: bytearray | None = None

    def feed(self, data: bytes) -> None:
        """Consume the next piece of the tar stream."""
        view = memoryview(data)
        while view:
            if self._state == "body":
                take = view[: self._left]
                self._body(take)
                view = view[len(take) :]
                if not self._left:
                    self._end_member()
            elif self._state == "pad":
                take = min(self._pad, len(view))
                self._pad -= take
                view = view[take:]
                if not self._pad:
                    self._state = "header"
            elif self._state == "end":
                if any(view):
                    raise MalformedEnvelope("payload tar has data after its end")
                return
            else:
                take = min(BLOCK - len(self._buf), len(view))
                self._buf += view[:take]
                view = view[take:]
                if len(self._buf) == BLOCK:
                    block, self._buf = bytes(self._buf), bytearray()
                    self._header(block)

    def close(self) -> None:
        """Check that the stream ended on an entry boundary."""
        if self._state in ("body", "pad", "meta") or self._buf:
            raise MalformedEnvelope("payload tar is truncated")

    def _header(self, block: bytes) -> None:
        if block == _ZERO:
            self._state = "end"
            return
        try:
            info = tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
        except tarfile.HeaderError as exc:
            raise MalformedEnvelope(f"payload tar has a bad header: {exc}") from exc
        pax, self._pax = self._pax, {}
        name = pax.get("path", info.name)
        size = int(pax["size"]) if "size" in pax else info.size
        if size < 0:
            # Base-256 size fields (GNU) can encode negative numbers.
            raise MalformedEnvelope(f"payload tar has a negative size: {size}")
        if info.type in (tarfile.XHDTYPE, tarfile.GNUTYPE_LONGNAME):
            if size > _META_LIMIT:
                raise UnsafeEntry("payload tar has an oversize extended header")
            self._meta_kind, self._meta = info.type, bytearray()
            self._start_body(size, None)
            if pax:
                self._pax = pax
            return
        if self._meta_kind == b"L-done":
            name, self._meta_kind = self._longname, b""
        if info.type in _IGNORED:
            self._start_body(size if info.type == tarfile.XGLTYPE else 0, None)
            return
        if info.type not in _FILE_TYPES:
            raise UnsafeEntry(
                f"payload entry {name!r:.200}: links and devices are not allowed"
            )
        cleaned = clean_name(name)
        if cleaned in self.members:
            raise UnsafeEntry(f"payload entry {name!r:.200}: duplicate name")
        folders = {cleaned[:i] for i, c in enumerate(cleaned) if c == "/"}
        if cleaned in self._folders or folders & self.members.keys():
            raise UnsafeEntry(f"payload entry {name!r:.200}: both a file and a folder")
        self._folders |= folders
        if cleaned in self.limits and size > self.limits[cleaned]:
            raise UnsafeEntry(
                f"payload entry {cleaned!r}: {size} bytes, more than files.json says"
            )
        member = Member(cleaned, size, b"")
        self.members[cleaned] = member
        self.sink.begin(cleaned, size)
        self._start_body(size, member)

    def _start_body(self, size: int, member: Member | None) -> None:
        self._current, self._left, self._pad = member, size, _padding(size)
        self._hasher = hashlib.sha256() if member else None
        keep = member and member.name in self._keep and size <= self._keep_limit
        self._kept = bytearray() if keep else None
        self._state = "body"
        if not size:
            self._end_member()

    def _body(self, data: memoryview) -> None:
        self._left -= len(data)
        if self._current is not None:
            self._hasher.update(data)
            self.sink.write(data)
            if self._kept is not None:
                self._kept += data
        elif self._meta_kind:
            self._meta += data

    def _end_member(self) -> None:
        self._state = "pad" if self._pad else "header"
        member = self._current
        if member is not None:
            member.digest = self._hasher.digest()
            self.sink.end()
            if self._kept is not None:
                self.kept[member.name] = bytes(self._kept)
                if self._on_kept:
                    self._on_kept(member.name, self.kept[member.name])
            self._current = None
        elif self._meta_kind == tarfile.XHDTYPE:
            self._pax, self._meta_kind = _parse_pax(bytes(self._meta)), b""
        elif self._meta_kind == tarfile.GNUTYPE_LONGNAME:
            self._longname = (
                bytes(self._meta).rstrip(b"\0").decode("utf-8", "surrogateescape")
            )
            self._meta_kind = b"L-done"


def _parse_pax(data: bytes) -> dict[str, str]:
    """Parse PAX records ``"<len> <key>=<value>\\n"`` (POSIX.1-2001 pax format)."""
    records: dict[str, str] = {}
    pos = 0
    while pos < len(data):
        space = data.find(b" ", pos)
        try:
            length = int(data[pos:space])
        except ValueError as exc:
            raise MalformedEnvelope("payload tar has a bad PAX header") from exc
        record = data[space + 1 : pos + length]
        if length <= 0 or not record.endswith(b"\n") or b"=" not in record:
            raise MalformedEnvelope("payload tar has a bad PAX header")
        key, _, value = record[:-1].partition(b"=")
        records[key.decode("utf-8", "replace")] = value.decode(
            "utf-8", "surrogateescape"
        )
        pos += length
    # str.isdigit() also admits digits int() refuses (superscripts).
    if "size" in records and not _DIGITS.fullmatch(records["size"]):
        raise MalformedEnvelope("payload tar has a bad PAX size")
    return records
