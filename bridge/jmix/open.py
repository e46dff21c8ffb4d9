"""Verify and open an envelope: every check first, then one rename into place.

Opening decrypts, parses the tar and writes the files into a temporary folder
beside the destination in one pass; only when the GCM tag has authenticated the
whole ciphertext and every file matches ``files.json`` is that folder renamed to
the destination. On any failure it is removed, so nothing is half-extracted
(docs/envelope.md section 8).
"""

import hashlib
import logging
import os
import shutil
import tarfile
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)

from bridge.errors import (
    AuthenticationFailed,
    EnvelopeError,
    IntegrityError,
    MalformedEnvelope,
    PolicyViolation,
    SchemaViolation,
)

from ._aead import TAG_BYTES, Opener, derive_key, peek, shared_secret
from ._archive import Source
from ._codec import CHUNK, b64decode, load_json, parse_hash
from ._payload import JS, ClearHash, Dialect, candidates, check_files, parse_files
from ._sender import MANIFEST_LIMIT, parse_manifest, sender_check
from ._shape import METADATA
from ._tar import BLOCK, Member, Sink, TarParser, clean_name
from .audit import stored_audit_path, verify_audit
from .trust import DEFAULT_POLICY, OpenPolicy, TrustStore

logger = logging.getLogger(__name__)

_KNOWN = {
    "manifest.json",
    "manifest.jws",
    "audit.json",
    "payload.encrypted",
    "payload.enc",
}
_DOCS = ("files.json", "metadata.json")

Progress = Callable[[int, int], None]


@dataclass
class OpenedEnvelope:
    """What :func:`open_envelope` (or :func:`verify_envelope`) found and checked."""

    envelope_id: str
    manifest: dict
    metadata: dict
    dialect: str
    signer_fingerprint: str | None
    sender_id: str
    files: list[tuple[str, int]] = field(default_factory=list)
    dicom_files: list[Path] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    governance: dict = field(default_factory=dict)
    """One record per governance element (``requester``, ``attestation``,
    ``key_reference``, ``audit``), each with a ``status`` (docs/governance.md)."""
    audit: dict | None = None
    """The envelope's ``audit.json`` as received (None when it has none)."""


class _DiskSink(Sink):
    """Write parsed files under ``root``, a private temporary folder."""

    def __init__(self, root: Path):
        self.root = root
        self._fh = None

    def begin(self, name: str, size: int) -> None:
        path = self.root / name
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        self._fh = os.fdopen(os.open(path, flags, 0o600), "wb")

    def write(self, data: bytes) -> None:
        self._fh.write(data)

    def end(self) -> None:
        self._fh.close()
        self._fh = None

    def abort(self) -> None:
        """Close a file left open by a failed pass."""
        if self._fh is not None:
            self._fh.close()
            self._fh = None


class _RunningSink(Sink):
    """Pass files on to ``inner`` while feeding the js running hash (section 5).

    The running hash takes files in path order; it is right only when the tar
    holds them in that order, which ``in_order`` records.
    """

    def __init__(self, inner: Sink):
        self.inner = inner
        self.running = hashlib.sha256()
        self.in_order = True
        self._last: str | None = None

    def begin(self, name: str, size: int) -> None:
        if self._last is not None and name <= self._last:
            self.in_order = False
        self._last = name
        self.running.update(name.encode("utf-8") + b"\n")
        self.inner.begin(name, size)

    def write(self, data: bytes) -> None:
        self.running.update(data)
        self.inner.write(data)

    def end(self) -> None:
        self.inner.end()


@dataclass
class _Payload:
    """The plaintext payload as one pass saw it.

    ``hash_ok`` is None when the js hash could not be taken in the pass (the tar
    is not in path order) and must be computed from the files afterwards.
    """

    members: dict[str, Member]
    kept: dict[str, bytes]
    dialect: str
    hash_ok: bool | None


def _looks_like_tar(block: bytes) -> bool:
    try:
        tarfile.TarInfo.frombuf(block, "utf-8", "surrogateescape")
    except tarfile.HeaderError:
        return False
    return True


def _limits(parser: TarParser, name: str, data: bytes) -> None:
    """Once ``files.json`` is read, no later entry may exceed the size it declares."""
    if name == "files.json":
        declared = parse_files(load_json(data, "files.json"))
        parser.limits = {
            rel: size for rel, (size, _) in declared.items() if size is not None
        }


class _Decryptor:
    """Decrypt one ciphertext entry, trying the dialects' key derivations."""

    def __init__(
        self, source: Source, name: str, manifest: dict, key: X25519PrivateKey
    ):
        enc = manifest["security"]["encryption"]
        where = "manifest.json: security.encryption"
        ephemeral = b64decode(
            enc["ephemeral_public_key"], f"{where}.ephemeral_public_key", 32
        )
        self.iv = b64decode(enc["iv"], f"{where}.iv", 12)
        self.tag = b64decode(enc["auth_tag"], f"{where}.auth_tag", TAG_BYTES)
        self.secret = shared_secret(key, X25519PublicKey.from_public_bytes(ephemeral))
        self.source, self.name = source, name
        self.declared = manifest["security"].get("payload_hash")

    def _order(self) -> list[Dialect]:
        # A cheap guess from the first tar header decides the order of trial;
        # only the tag of a full pass ever decides authenticity.
        with self.source.open(self.name, authenticated=True) as fh:
            head = fh.read(BLOCK)
        order = candidates(self.name)
        return sorted(
            order,
            key=lambda d: (
                not _looks_like_tar(
                    peek(derive_key(self.secret, d.info), self.iv, head)
                )
            ),
        )

    def _pass(self, dialect: Dialect, sink: Sink | None, progress: Progress | None):
        opener = Opener(derive_key(self.secret, dialect.info), self.iv, self.tag)
        parser = None
        if sink is not None and dialect is JS:
            sink = running = _RunningSink(sink)
        if sink is not None:
            parser = TarParser(
                sink, keep=_DOCS, on_kept=lambda name, data: _limits(parser, name, data)
            )
        cipher_hash, plain_hash = hashlib.sha256(), hashlib.sha256()
        deferred: EnvelopeError | None = None
        total, done = self.source.names[self.name], 0
        with self.source.open(self.name, authenticated=True) as fh:
            while chunk := fh.read(CHUNK):
                plain = opener.update(chunk)
                if parser is not None:
                    cipher_hash.update(chunk)
                    if dialect.hash_plaintext:
                        plain_hash.update(plain)
                    if deferred is None:
                        try:
                            parser.feed(plain)
                        except EnvelopeError as exc:
                            # Reported only once the tag has authenticated the
                            # stream; a wrong key also produces garbage tars.
                            deferred, parser.sink = exc, Sink()
                done += len(chunk)
                if progress:
                    progress(done, total)
        opener.finish()
        if parser is None:
            return None
        if deferred is None:
            try:
                parser.close()
            except EnvelopeError as exc:
                deferred = exc
        if deferred is not None:
            raise deferred
        if dialect is JS:
            digest = running.running.digest() if running.in_order else None
        elif dialect.hash_plaintext:
            digest = plain_hash.digest()
        else:
            digest = cipher_hash.digest()
        return parser, digest

    def run(self, make_sink: Callable[[], Sink], progress: Progress | None) -> _Payload:
        """Decrypt, parse and hash in one pass; raise unless the tag authenticates."""
        order = self._order()
        for index, dialect in enumerate(order):
            if index > 0:
                try:
                    self._pass(dialect, None, None)
                except AuthenticationFailed:
                    continue
            try:
                parser, digest = self._pass(dialect, make_sink(), progress)
            except AuthenticationFailed:
                continue
            hash_ok = None
            if self.declared is None:
                hash_ok = True
            elif digest is not None:
                want = parse_hash(self.declared, "manifest.json: security.payload_hash")
                hash_ok = want == digest
            return _Payload(parser.members, parser.kept, dialect.name, hash_ok)
        raise AuthenticationFailed(stage="payload")

    def js_digest(self, members: dict[str, Member], root: Path | None) -> bytes:
        """Return the js running hash of the payload, taking files in path order.

        Used only when the tar was not in path order. ``root`` is the folder the
        authenticated pass wrote; without one (verification) the payload is
        decrypted once more into a private temporary folder, hashed from there
        and removed, so that memory stays constant and no destination is touched.
        """
        if root is not None:
            return _js_hash_from_disk(root, members)
        with tempfile.TemporaryDirectory(prefix="jmix-verify-") as tmp:
            sink = _DiskSink(Path(tmp))
            try:
                parser, _ = self._pass(JS, sink, None)
            finally:
                sink.abort()
            return _js_hash_from_disk(Path(tmp), parser.members)


def _read_clear(source: Source, sink: Sink, declared: str | None) -> _Payload:
    """Hash and copy a clear ``payload/`` folder, in path order."""
    clear, members, kept = ClearHash(), {}, {}
    names = sorted(n for n in source.names if n.startswith("payload/"))
    for raw in names:
        rel = clean_name(raw)
        hasher, size = hashlib.sha256(), 0
        body = bytearray() if rel in _DOCS else None
        clear.begin(rel)
        sink.begin(rel, source.names[raw])
        with source.open(raw) as fh:
            while chunk := fh.read(CHUNK):
                hasher.update(chunk)
                clear.update(chunk)
                sink.write(chunk)
                size += len(chunk)
                if body is not None:
                    body += chunk
        sink.end()
        clear.end(rel, size, hasher.digest())
        members[rel] = Member(rel, size, hasher.digest())
        if body is not None:
            kept[rel] = bytes(body)
    if declared is None:
        return _Payload(members, kept, "spec", True)
    want = parse_hash(declared, "manifest.json: security.payload_hash")
    if want == clear.spec_digest():
        return _Payload(members, kept, "spec", True)
    return _Payload(members, kept, "rs", want == clear.running.digest())


def _js_hash_from_disk(root: Path, members: dict[str, Member]) -> bytes:
    """Return the running hash of section 5 over files written under ``root``."""
    running = hashlib.sha256()
    for rel in sorted(members):
        running.update(rel.encode("utf-8") + b"\n")
        with open(root / rel, "rb") as fh:
            while chunk := fh.read(CHUNK):
                running.update(chunk)
    return running.digest()


def _process(
    src: str | os.PathLike,
    make_sink: Callable[[], Sink],
    disk_root: Callable[[], Path | None],
    encryption_key: X25519PrivateKey | None,
    trust: TrustStore,
    policy: OpenPolicy,
    progress: Progress | None,
) -> OpenedEnvelope:
    """Run every check of docs/envelope.md section 8; files go to ``make_sink()``."""
    with Source(src) as source:
        # Step 1: the layout, the manifest and the sender, before any payload byte.
        ciphers = [n for n in ("payload.encrypted", "payload.enc") if n in source.names]
        has_clear = any(n.startswith("payload/") for n in source.names)
        if len(ciphers) + bool(has_clear) > 1:
            raise MalformedEnvelope(f"{src}: holds more than one payload")
        warnings = [
            f"{name}: unexpected entry, ignored"
            for name in sorted(source.names)
            if name not in _KNOWN and not name.startswith("payload/")
        ]
        manifest_bytes = source.read_small("manifest.json", MANIFEST_LIMIT)
        manifest = parse_manifest(manifest_bytes)
        jws = (
            source.read_small("manifest.jws")
            if "manifest.jws" in source.names
            else None
        )
        checked = sender_check(manifest, manifest_bytes, jws, trust, policy)
        warnings += checked.warnings
        audit = None
        if "audit.json" in source.names:
            audit = load_json(source.read_small("audit.json"), "audit.json")
        governance = {
            **checked.governance,
            "audit": _check_audit(audit, manifest["id"], trust, policy, warnings),
        }

        # Step 2: the payload, decrypted and hashed in one pass.
        encrypted = "encryption" in manifest.get("security", {})
        declared = manifest.get("security", {}).get("payload_hash")
        if encrypted != bool(ciphers) or not (ciphers or has_clear):
            raise MalformedEnvelope(
                f"{src}: the manifest's encryption block and the payload disagree"
            )
        if encrypted:
            if encryption_key is None:
                raise ValueError("encryption_key: required for an encrypted envelope")
            decryptor = _Decryptor(source, ciphers[0], manifest, encryption_key)
            payload = decryptor.run(make_sink, progress)
            if payload.hash_ok is None:
                want = parse_hash(declared, "manifest.json: security.payload_hash")
                got = decryptor.js_digest(payload.members, disk_root())
                payload.hash_ok = want == got
        else:
            payload = _read_clear(source, make_sink(), declared)

    # Step 3: the payload hash, files.json and metadata.json.
    if not payload.hash_ok:
        raise IntegrityError("the payload does not match the manifest's payload_hash")
    if declared is None:
        warnings.append("the manifest has no payload_hash; not checked")
    found = {m.name: (m.size, m.digest) for m in payload.members.values()}
    strict = policy.trust == "signed"
    if "files.json" in payload.kept:
        declared_files = parse_files(
            load_json(payload.kept["files.json"], "files.json")
        )
        warnings += check_files(declared_files, found, strict)
    elif strict:
        raise PolicyViolation("the payload has no files.json")
    else:
        warnings.append("the payload has no files.json; files not checked")
    metadata: dict = {}
    if "metadata.json" in payload.kept:
        metadata = load_json(payload.kept["metadata.json"], "metadata.json")
        METADATA.check(metadata, "metadata.json")
    elif strict:
        raise SchemaViolation("the payload has no metadata.json")

    files = sorted((m.name, m.size) for m in payload.members.values())
    return OpenedEnvelope(
        envelope_id=manifest["id"],
        manifest=manifest,
        metadata=metadata,
        dialect=payload.dialect,
        signer_fingerprint=checked.fingerprint,
        sender_id=manifest["sender"]["id"],
        files=files,
        warnings=warnings,
        governance=governance,
        audit=audit,
    )


def _check_audit(
    audit: object,
    envelope_id: str,
    trust: TrustStore,
    policy: OpenPolicy,
    warnings: list[str],
) -> dict:
    """Check the received audit trail under ``policy.audit``; return its record.

    Entries by the sender are checked against the sender's pins, entries by
    other nodes against ``policy.audit_trust`` (docs/governance.md section 4).
    """
    if audit is None:
        if policy.audit == "required":
            raise PolicyViolation("audit.json: absent, and the policy requires one")
        return {"status": "absent", "entries": []}
    nodes = trust.merged(policy.audit_trust) if policy.audit_trust else trust
    results = verify_audit(audit, envelope_id, nodes, policy.audit)
    statuses = {r.status for r in results}
    if not results:
        status = "absent"
    elif statuses == {"verified"}:
        status = "verified"
    elif "failed" in statuses:
        status = "failed"
        warnings.append(
            "audit.json: an entry failed verification; accepted because the "
            "audit policy is 'ignored'"
        )
    else:
        status = "partly-verified"
    return {"status": status, "entries": [r.as_json() for r in results]}


def verify_envelope(
    src: str | os.PathLike,
    *,
    encryption_key: X25519PrivateKey | None,
    trust: TrustStore,
    policy: OpenPolicy = DEFAULT_POLICY,
    progress: Progress | None = None,
) -> OpenedEnvelope:
    """Run every check :func:`open_envelope` runs, writing nothing.

    The payload is decrypted into a discarding sink while it is hashed. Raises a
    :class:`~bridge.errors.EnvelopeError` subclass on the first failed check.
    """
    opened = _process(src, Sink, lambda: None, encryption_key, trust, policy, progress)
    logger.info(
        "envelope verified envelope=%s dialect=%s", opened.envelope_id, opened.dialect
    )
    return opened


def open_envelope(
    src: str | os.PathLike,
    dest: str | os.PathLike,
    *,
    encryption_key: X25519PrivateKey | None,
    trust: TrustStore,
    policy: OpenPolicy = DEFAULT_POLICY,
    progress: Progress | None = None,
) -> OpenedEnvelope:
    """Verify an envelope and extract its payload into ``dest``.

    ``src`` is a zip (envelope at its root or under one folder) or a folder.
    ``dest`` must not exist or be an empty folder; its parent must exist. Files
    are written to a temporary sibling folder and renamed to ``dest`` only after
    every check passed; on failure nothing appears in ``dest``. Raises a
    :class:`~bridge.errors.EnvelopeError` subclass on the first failed check and
    ``ValueError`` when ``dest`` is not empty.
    """
    dest = Path(dest)
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise ValueError(f"dest: {dest} exists and is not an empty folder")
    parent = dest.absolute().parent
    sinks: list[_DiskSink] = []

    def make_sink() -> _DiskSink:
        # Each trial pass gets a fresh folder; an earlier failed one is discarded.
        for old in sinks:
            old.abort()
            shutil.rmtree(old.root, ignore_errors=True)
        sinks.clear()
        root = Path(
            tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".partial", dir=parent)
        )
        sinks.append(_DiskSink(root))
        return sinks[0]

    try:
        opened = _process(
            src,
            make_sink,
            lambda: sinks[0].root if sinks else None,
            encryption_key,
            trust,
            policy,
            progress,
        )
        root = sinks[0].root if sinks else make_sink().root
        if dest.exists():
            dest.rmdir()
        os.rename(root, dest)
        sinks.clear()
    finally:
        for sink in sinks:
            sink.abort()
            shutil.rmtree(sink.root, ignore_errors=True)

    opened.dicom_files = [
        dest / rel for rel, _ in opened.files if rel.startswith("dicom/")
    ]
    logger.info(
        "envelope opened envelope=%s files=%d dialect=%s",
        opened.envelope_id,
        len(opened.files),
        opened.dialect,
    )
    return opened


def inspect_envelope(src: str | os.PathLike) -> dict:
    """Return what can be known without keys: the manifest and the entries.

    Never reads ``payload/metadata.json`` or any payload file, so no patient data.
    The audit shown is the node's stored copy beside the envelope when there is
    one (it holds the entries added at this node), else the envelope's own.
    """
    with Source(src) as source:
        manifest = parse_manifest(source.read_small("manifest.json", MANIFEST_LIMIT))
        names = dict(source.names)
        audit = None
        if "audit.json" in names:
            audit = load_json(source.read_small("audit.json"), "audit.json")
    audit_source = "envelope" if audit is not None else None
    stored = stored_audit_path(src)
    if stored.is_file():
        audit, audit_source = load_json(stored.read_bytes(), "audit.json"), "stored"
    security = manifest.get("security", {})
    assertion = manifest["sender"].get("assertion", {})
    requester = manifest.get("requester")
    entries = (audit or {}).get("audit", []) if isinstance(audit, dict) else []
    cipher = next((n for n in ("payload.enc", "payload.encrypted") if n in names), None)
    payload_files = [n for n in names if n.startswith("payload/")]
    return {
        "id": manifest["id"],
        "timestamp": manifest["timestamp"],
        "sender": {k: manifest["sender"].get(k) for k in ("id", "name")},
        "receivers": [
            {k: r.get(k) for k in ("id", "name")} for r in manifest["receiver"]
        ],
        "encrypted": "encryption" in security,
        "dialect_hint": {"payload.enc": "rs", "payload.encrypted": "spec or js"}.get(
            cipher, "clear"
        ),
        "payload_bytes": names[cipher]
        if cipher
        else sum(names[n] for n in payload_files),
        "payload_files": len(payload_files) if not cipher else None,
        "signer_fingerprint": assertion.get("signing_key", {}).get("fingerprint"),
        "signed_fields": assertion.get("signed_fields", []),
        "expires_at": assertion.get("expires_at"),
        "key_reference": assertion.get("key_reference"),
        "directory_attestation": (assertion.get("directory_attestation") or {}).get(
            "provider"
        ),
        "requester": {
            "id": requester.get("id"),
            "name": requester.get("name"),
            "signer_fingerprint": requester.get("assertion", {})
            .get("signing_key", {})
            .get("fingerprint"),
        }
        if isinstance(requester, dict)
        else None,
        "has_jws": "manifest.jws" in names,
        "audit_source": audit_source,
        "audit_events": [e.get("event") for e in entries if isinstance(e, dict)],
        "audit": [_audit_line(e) for e in entries if isinstance(e, dict)],
        "manifest": manifest,
    }


def _audit_line(entry: dict) -> dict:
    """Return what inspect shows of one audit entry (unverified)."""
    line = {
        "event": entry.get("event"),
        "by": (entry.get("by") or {}).get("id"),
        "timestamp": entry.get("timestamp"),
        "signer_fingerprint": (entry.get("assertion") or {})
        .get("signing_key", {})
        .get("fingerprint"),
    }
    if isinstance(entry.get("to"), dict):
        line["to"] = entry["to"].get("id")
        line["to_name"] = entry["to"].get("name")
    return line
