"""Hostile envelopes built around chosen bytes, for the property tests and the fuzzer.

Every envelope here is signed by the fixed vector sender key and encrypted to
the fixed vector receiver key (``tests/vectors/keys``), so that a reader gets
past the signer and the tag and reaches the part under test: a zip whose
entries are chosen by the caller, or a payload tar of arbitrary bytes. The keys
protect nothing. :func:`run_open` opens one and reports what escaped.
"""

from __future__ import annotations

import contextlib
import fnmatch
import hashlib
import io
import os
import sys
import tarfile
import threading
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.serialization import load_pem_private_key

from bridge.errors import EnvelopeError
from bridge.jmix import OpenPolicy, TrustStore, open_envelope
from bridge.jmix._aead import Sealer
from bridge.jmix._assertion import make_assertion, make_jws, required_fields
from bridge.jmix._codec import b64encode, dump_json, hash_text
from bridge.jmix._payload import ClearHash
from bridge.jmix.keys import raw_public
from tests.vectors.generate import ID, STAMP, ZeroSecretSealer, _dicom, _documents

VECTORS = Path(__file__).resolve().parent.parent / "vectors"
KEYS = VECTORS / "keys"
SENDER_ID = "org:vector-sender"
RECEIVER_ID = "org:vector-receiver"


def _private(path: Path):
    # Read the PEM directly: git does not keep the 0600 mode the key loader wants.
    return load_pem_private_key(path.read_bytes(), password=None)


SIGNING_KEY = _private(KEYS / "sender" / "signing.key")
RECEIVER_KEY = _private(KEYS / "receiver" / "encryption.key")
TRUST = TrustStore([(SENDER_ID, SIGNING_KEY.public_key())])
OPEN_CLEAR = OpenPolicy(require_encryption=False)
DOCUMENTS = _documents(_dicom())


def payload_tar(files: dict[str, bytes] | None = None) -> bytes:
    """Return a well-formed spec-dialect payload tar of ``files`` (the vector's)."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for name, data in sorted((files or DOCUMENTS).items()):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return buf.getvalue()


def manifest(security: dict) -> dict:
    """Return the vector manifest with ``security``, signed by the sender key."""
    doc = {
        "version": "1.0",
        "id": ID,
        "timestamp": STAMP,
        "sender": {"id": SENDER_ID, "name": "Vector Sender", "contact": "s@x"},
        "receiver": [{"id": RECEIVER_ID, "name": "Receiver", "contact": "r@x"}],
        "security": security,
    }
    encrypted = "encryption" in security
    doc["sender"]["assertion"] = make_assertion(
        doc, SIGNING_KEY, required_fields(encrypted), None
    )
    return doc


SPEC_INFO = b"JMIX-payload-encryption"


def sealed_entries(plain: bytes, low_order: bytes | None = None) -> dict[str, bytes]:
    """Return the entries of a signed spec envelope whose plaintext tar is ``plain``.

    With ``low_order``, that point is the ephemeral key and the payload is
    sealed under the key the all-zero secret it forces derives.
    """
    if low_order is None:
        sealer = Sealer(RECEIVER_KEY.public_key(), SPEC_INFO)
        ephemeral = raw_public(sealer.ephemeral_public)
    else:
        sealer, ephemeral = ZeroSecretSealer(low_order, SPEC_INFO), low_order
    cipher = sealer.update(plain)
    tag = sealer.finish()
    doc = manifest(
        {
            "classification": "confidential",
            "payload_hash": hash_text(hashlib.sha256(cipher).digest()),
            "encryption": {
                "algorithm": "AES-256-GCM",
                "ephemeral_public_key": b64encode(ephemeral),
                "iv": b64encode(sealer.iv),
                "auth_tag": b64encode(tag),
            },
        }
    )
    return _signed({"payload.encrypted": cipher}, doc)


def clear_entries(files: dict[str, bytes]) -> dict[str, bytes]:
    """Return the entries of a signed clear envelope holding ``files`` under payload/.

    ``payload_hash`` is the spec line hash of ``files`` as named, so that a
    reader checks the names before anything else fails.
    """
    clear = ClearHash()
    for rel, data in sorted(files.items()):
        clear.begin(rel)
        clear.update(data)
        clear.end(rel, len(data), hashlib.sha256(data).digest())
    doc = manifest(
        {
            "classification": "confidential",
            "payload_hash": hash_text(clear.spec_digest()),
        }
    )
    return _signed({f"payload/{name}": data for name, data in files.items()}, doc)


def _signed(payload: dict[str, bytes], doc: dict) -> dict[str, bytes]:
    body = dump_json(doc)
    return {
        "manifest.json": body,
        "manifest.jws": make_jws(body, SIGNING_KEY),
        **payload,
    }


@dataclass(frozen=True)
class Entry:
    """One zip entry as a hostile writer may shape it."""

    name: str
    data: bytes
    external_attr: int = 0o100644 << 16
    deflate: bool = False


def write_zip(path: Path, entries: list[Entry], root: str = ID + "/") -> Path:
    """Write ``entries`` (names relative to ``root``) as a zip at ``path``."""
    with zipfile.ZipFile(path, "w") as zf:
        for entry in entries:
            info = zipfile.ZipInfo(root + entry.name, (2026, 1, 15, 9, 30, 0))
            info.external_attr = entry.external_attr
            info.compress_type = zipfile.ZIP_DEFLATED if entry.deflate else 0
            zf.writestr(info, entry.data)
    return path


def as_entries(files: dict[str, bytes]) -> list[Entry]:
    """Return plain zip entries for a name-to-bytes mapping."""
    return [Entry(name, data) for name, data in files.items()]


class Escaped(AssertionError):
    """An exception other than an EnvelopeError left the reader."""


def listing(folder: Path) -> list[str]:
    """Return every path below ``folder``, relative, sorted."""
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


# Audit events (PEP 578) that create, change or remove a file, with the
# positions of each path argument and of the directory descriptor it is
# relative to (shutil.rmtree works through descriptors). "open" is handled
# apart: it writes only with a write mode or write flags.
_CHANGING = {
    "os.mkdir": ((0, 2),),
    "os.remove": ((0, 1),),
    "os.rmdir": ((0, 1),),
    "os.rename": ((0, 2), (1, 3)),
    "os.replace": ((0, 2), (1, 3)),
    "os.link": ((1, 3),),
    "os.symlink": ((1, 2),),
    "os.truncate": ((0, None),),
    "os.chmod": ((0, 2),),
    "os.utime": ((0, 2),),
    "shutil.rmtree": ((0, 1),),
}
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC


@dataclass
class _Watch:
    """Writes seen during one call, from the threads that did not exist before it."""

    dest: str
    thread: int
    before: frozenset[int]
    outside: list[str] = field(default_factory=list)

    def allowed(self, path: str) -> bool:
        """Whether ``path`` is ``dest``, below it, or in the opener's partial folder."""
        parent, name = os.path.split(self.dest)
        rel = os.path.relpath(path, parent)
        first = rel.split(os.sep)[0]
        return first == name or fnmatch.fnmatchcase(first, f".{name}.*.partial")


_WATCH: _Watch | None = None
_IN_HOOK = threading.local()


def _written_paths(event: str, args: tuple) -> list[str]:
    """Return the absolute paths that ``event`` changes (none for a read)."""
    if event == "open":
        path, mode, flags = args
        writes = (isinstance(mode, str) and any(c in mode for c in "wax+")) or (
            isinstance(flags, int) and flags & _WRITE_FLAGS
        )
        # An int is an open descriptor: its creation was seen.
        return [os.fsdecode(path)] if writes and not isinstance(path, int) else []
    found = []
    for at, fd_at in _CHANGING.get(event, ()):
        path = os.fsdecode(args[at])
        fd = args[fd_at] if fd_at is not None else None
        if isinstance(fd, int) and fd >= 0 and not os.path.isabs(path):
            path = os.path.join(os.readlink(f"/proc/self/fd/{fd}"), path)
        found.append(path)
    return found


def _hook(event: str, args: tuple) -> None:
    watch = _WATCH
    if watch is None or getattr(_IN_HOOK, "on", False):
        return
    ident = threading.get_ident()
    if ident != watch.thread and ident in watch.before:
        return
    _IN_HOOK.on = True
    try:
        for path in _written_paths(event, args):
            full = os.path.realpath(path)
            if not watch.allowed(full):
                watch.outside.append(f"{event} {full}")
    finally:
        _IN_HOOK.on = False


sys.addaudithook(_hook)


@contextlib.contextmanager
def writes_outside(dest: Path) -> Iterator[list[str]]:
    """Record every file created, written, moved or removed outside ``dest``.

    Yields the list it fills: one ``"<audit event> <path>"`` per change seen
    in the calling thread or in any thread started during the block. The
    opener's own ``.<dest>.*.partial`` sibling folder counts as ``dest``.
    Not reentrant.
    """
    global _WATCH
    before = frozenset(t.ident for t in threading.enumerate() if t.ident is not None)
    watch = _Watch(
        os.path.realpath(dest), threading.get_ident(), before - {threading.get_ident()}
    )
    _WATCH = watch
    try:
        yield watch.outside
    finally:
        _WATCH = None


def run_open(
    src: Path,
    work: Path,
    policy: OpenPolicy = OPEN_CLEAR,
    opener: Callable = open_envelope,
) -> EnvelopeError | None:
    """Open ``src`` into ``work/dest``; return the refusal, None when it opened.

    Raises :class:`Escaped` when anything but an EnvelopeError leaves the reader,
    when it created, wrote, moved or removed any file outside ``work/dest``
    (anywhere on the file system, seen through audit hooks), or when it left
    anything in ``work`` after refusing.
    """
    before = listing(work)
    dest = work / "dest"
    refused: EnvelopeError | None = None
    with writes_outside(dest) as outside:
        try:
            opener(src, dest, encryption_key=RECEIVER_KEY, trust=TRUST, policy=policy)
        except EnvelopeError as exc:
            refused = exc
        except Exception as exc:
            raise Escaped(f"{type(exc).__name__}: {exc!s:.300}") from exc

    if outside:
        raise Escaped(f"wrote outside dest: {outside[:5]}")
    if refused is not None:
        if listing(work) != before:
            raise Escaped(f"refused, but left {listing(work)}") from refused
        return refused
    for path in dest.rglob("*"):
        if path.is_symlink() or not (path.is_file() or path.is_dir()):
            raise Escaped(f"opened, but wrote a non-regular file: {path}")
    return None
