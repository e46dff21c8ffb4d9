"""Dialects, ``files.json`` and the payload hash (docs/envelope.md sections 3-5).

The three implementations agree on the cryptography but not on names, tar layout
or what ``payload_hash`` covers; a :class:`Dialect` holds those differences.
"""

import hashlib
from dataclasses import dataclass

from bridge.errors import IntegrityError, SchemaViolation

from ._codec import hash_text, parse_hash
from ._shape import FILES


@dataclass(frozen=True)
class Dialect:
    """What one family of implementations writes differently."""

    name: str
    info: bytes
    ciphertext: str
    tar_prefix: str
    dir_entries: bool
    hash_plaintext: bool


SPEC = Dialect(
    "spec", b"JMIX-payload-encryption", "payload.encrypted", "", False, False
)
RS = Dialect("rs", b"JMIX-AES256-GCM", "payload.enc", "./", True, True)
JS = Dialect(
    "js", b"JMIX-Payload-Encryption", "payload.encrypted", "payload/", True, False
)
DIALECTS = {d.name: d for d in (SPEC, RS, JS)}
WRITABLE = ("spec", "rs")


def candidates(ciphertext_name: str) -> list[Dialect]:
    """Return the dialects that may write a ciphertext of this name, likeliest first."""
    if ciphertext_name == RS.ciphertext:
        return [RS, SPEC, JS]
    return [SPEC, JS, RS]


class ClearHash:
    """Both clear-folder payload hashes, fed file by file in path order.

    ``spec``: SHA-256 over sorted lines ``dir:<rel>`` and ``file:<rel>:<size>:<hex>``.
    ``rs`` (and js): one running SHA-256 over ``rel``, a newline and the bytes of
    each file, in path order. Files must be fed in sorted order for the latter.
    """

    def __init__(self):
        self._lines: list[tuple[str, str]] = []
        self._dirs: set[str] = set()
        self.running = hashlib.sha256()

    def begin(self, rel: str) -> None:
        """Start file ``rel``; its bytes follow through :meth:`update`."""
        parts = rel.split("/")
        for depth in range(1, len(parts)):
            self._dirs.add("/".join(parts[:depth]))
        self.running.update(rel.encode("utf-8") + b"\n")

    def update(self, data: bytes) -> None:
        """Feed bytes of the current file."""
        self.running.update(data)

    def end(self, rel: str, size: int, digest: bytes) -> None:
        """Finish file ``rel``."""
        self._lines.append((rel, f"file:{rel}:{size}:{digest.hex()}\n"))

    def spec_digest(self) -> bytes:
        """Return the spec dialect's digest over everything fed so far."""
        lines = self._lines + [(d, f"dir:{d}\n") for d in self._dirs]
        hasher = hashlib.sha256()
        for _, line in sorted(lines):
            hasher.update(line.encode("utf-8"))
        return hasher.digest()


def files_document(entries: list[tuple[str, int, bytes]]) -> list[dict]:
    """Build ``files.json`` from (path, size, digest), sorted by path."""
    return [
        {"file": rel, "hash": hash_text(digest), "size_bytes": size}
        for rel, size, digest in sorted(entries)
    ]


def parse_files(doc: object) -> dict[str, tuple[int | None, bytes | None]]:
    """Check ``files.json`` and return path -> (size or None, digest or None)."""
    FILES.check(doc, "files.json")
    declared: dict[str, tuple[int | None, bytes | None]] = {}
    for index, item in enumerate(doc):
        where = f"files.json[{index}]"
        rel = item["file"].removeprefix("payload/")
        if rel in declared:
            raise SchemaViolation(f"{where}.file: {rel!r} is listed twice")
        digest = parse_hash(item["hash"], f"{where}.hash") if "hash" in item else None
        declared[rel] = (item.get("size_bytes"), digest)
    return declared


def check_files(
    declared: dict[str, tuple[int | None, bytes | None]],
    found: dict[str, tuple[int, bytes]],
    strict: bool,
) -> list[str]:
    """Check every declared file against what was found; return warnings.

    Raises :class:`IntegrityError` naming the first file that is missing or whose
    size or hash differs; with ``strict``, also for a file that is not declared.
    """
    for rel, (size, digest) in sorted(declared.items()):
        if rel not in found:
            raise IntegrityError(f"{rel}: listed in files.json but not in the payload")
        got_size, got_digest = found[rel]
        if size is not None and size != got_size:
            raise IntegrityError(
                f"{rel}: files.json declares {size} bytes, the payload has {got_size}"
            )
        if digest is not None and digest != got_digest:
            raise IntegrityError(f"{rel}: SHA-256 does not match files.json")
    extra = sorted(set(found) - set(declared) - {"files.json"})
    if extra and strict:
        raise IntegrityError(f"{extra[0]}: in the payload but not listed in files.json")
    return [f"{rel}: not listed in files.json" for rel in extra]
