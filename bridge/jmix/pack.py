"""Pack one study into a signed, by default encrypted, JMIX envelope zip.

One pass over the instance bytes: each file is read in chunks, hashed for
``files.json``, framed into the payload tar, encrypted and written straight into
the zip entry, so memory stays flat whatever the study's size
(docs/envelope.md section 9).
"""

import copy
import hashlib
import logging
import os
import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from bridge.errors import UnpackableStudy

from . import _dicom
from ._aead import Sealer
from ._archive import ZipOut
from ._assertion import make_assertion, make_jws, required_fields
from ._codec import CHUNK, b64encode, dump_json, hash_text, is_uuid, utc_now, utc_text
from ._payload import DIALECTS, WRITABLE, ClearHash, Dialect, files_document
from ._shape import ASSERTION
from ._tar import TarWriter
from .attestation import read_attestation_unverified
from .audit import CREATED, append_audit, new_audit
from .keys import fingerprint, raw_public
from .request import Request, check_request_fits
from .trust import Entity

logger = logging.getLogger(__name__)

Progress = Callable[[int, int], None]
"""Called as ``progress(done_bytes, total_bytes)`` while instance bytes stream."""


@dataclass(frozen=True)
class PackResult:
    """What :func:`pack` wrote."""

    envelope_id: str
    path: Path
    size_bytes: int
    instance_count: int
    payload_bytes: int
    stage_seconds: dict[str, float] = field(default_factory=dict)
    study_instance_uid: str = ""
    skipped_files: int = 0


class _Meter:
    """Counts streamed bytes and reports them to an optional progress callback."""

    def __init__(self, total: int, progress: Progress | None):
        self.total, self.done, self._progress = total, 0, progress

    def chunks(self, path: Path, hasher, also=None) -> Iterable[bytes]:
        """Yield ``path`` in chunks, feeding ``hasher`` (and ``also``) on the way."""
        with open(path, "rb") as fh:
            while chunk := fh.read(CHUNK):
                hasher.update(chunk)
                if also is not None:
                    also(chunk)
                self.done += len(chunk)
                if self._progress:
                    self._progress(self.done, self.total)
                yield chunk


def _instance_names(found: _dicom.Scan) -> list[tuple[str, _dicom.Instance]]:
    # Sorted by name, not by UID: the clear payload hashes need path order.
    return sorted((f"dicom/{i.sop_uid}.dcm", i) for i in found.instances)


def _seal(
    zout: ZipOut,
    prefix: str,
    dialect: Dialect,
    recipient: X25519PublicKey,
    docs: dict[str, bytes],
    found: _dicom.Scan,
    meter: _Meter,
    mtime: int,
) -> dict:
    """Write the encrypted payload; return the manifest's security fields."""
    sealer = Sealer(recipient, dialect.info)
    payload_hash = hashlib.sha256()
    entries = []
    with zout.open(prefix + dialect.ciphertext) as out:

        def write(plain: bytes) -> None:
            cipher = sealer.update(plain)
            payload_hash.update(plain if dialect.hash_plaintext else cipher)
            out.write(cipher)

        tar = TarWriter(write, mtime)
        if dialect.dir_entries:
            tar.add_dir(dialect.tar_prefix)
            tar.add_dir(dialect.tar_prefix + "dicom/")
        for rel, inst in _instance_names(found):
            hasher = hashlib.sha256()
            tar.add_file(
                dialect.tar_prefix + rel, inst.size, meter.chunks(inst.path, hasher)
            )
            entries.append((rel, inst.size, hasher.digest()))
        for rel, data in _documents(docs, entries):
            tar.add_file(dialect.tar_prefix + rel, len(data), [data])
        tar.close()
        tag = sealer.finish()

    return {
        "payload_hash": hash_text(payload_hash.digest()),
        "encryption": {
            "algorithm": "AES-256-GCM",
            "ephemeral_public_key": b64encode(raw_public(sealer.ephemeral_public)),
            "iv": b64encode(sealer.iv),
            "auth_tag": b64encode(tag),
        },
    }


def _documents(docs: dict[str, bytes], entries: list) -> list[tuple[str, bytes]]:
    """Return ``files.json`` and ``metadata.json`` in path order (after instances)."""
    meta = docs["metadata.json"]
    listed = [*entries, ("metadata.json", len(meta), hashlib.sha256(meta).digest())]
    return [("files.json", dump_json(files_document(listed))), ("metadata.json", meta)]


def _clear(
    zout: ZipOut, prefix: str, dialect: Dialect, docs: dict[str, bytes], found, meter
) -> dict:
    """Write the payload folder in the clear; return the manifest's security fields."""
    clear = ClearHash()
    entries = []
    for rel, inst in _instance_names(found):
        hasher = hashlib.sha256()
        clear.begin(rel)
        with zout.open(f"{prefix}payload/{rel}") as out:
            size = 0
            for chunk in meter.chunks(inst.path, hasher, clear.update):
                out.write(chunk)
                size += len(chunk)
        if size != inst.size:
            raise UnpackableStudy(f"{inst.path}: changed while it was packed")
        clear.end(rel, size, hasher.digest())
        entries.append((rel, size, hasher.digest()))
    for rel, data in _documents(docs, entries):
        clear.begin(rel)
        clear.update(data)
        clear.end(rel, len(data), hashlib.sha256(data).digest())
        zout.write_bytes(f"{prefix}payload/{rel}", data)
    digest = clear.spec_digest() if dialect.name == "spec" else clear.running.digest()
    return {"payload_hash": hash_text(digest)}


def _check_governance_inputs(
    sender: Entity,
    signing_key: Ed25519PrivateKey,
    receiver: Entity,
    request: Request | None,
    attestation: dict | None,
) -> None:
    """Refuse, before any work, a request or attestation that cannot fit."""
    if request is not None and request.receiver_id != receiver.id:
        raise ValueError(
            f"request: made for receiver {request.receiver_id!r}, but this "
            f"envelope goes to {receiver.id!r}"
        )
    if attestation is not None:
        doc = read_attestation_unverified(attestation)
        own = fingerprint(signing_key.public_key())
        if doc["key_fingerprint"].lower() != own.lower():
            raise ValueError(
                f"attestation: attests key {doc['key_fingerprint']}, not the "
                f"signing key {own}"
            )
        if doc["subject"] != sender.id:
            raise ValueError(
                f"attestation: made for {doc['subject']!r}, not for sender "
                f"{sender.id!r}"
            )


def _sender_assertion(
    manifest: dict,
    key: Ed25519PrivateKey,
    encrypted: bool,
    expires_at: str | None,
    key_reference: str | None,
    attestation: dict | None,
) -> dict:
    """Return the sender assertion: our profile's fields, plus governance ones.

    With a requester, the sender also binds ``requester.id`` and the requester's
    signature, so the request cannot be swapped; with a key reference, the
    reference itself (docs/governance.md section 3).
    """
    fields = list(required_fields(encrypted))
    if "requester" in manifest:
        fields += ["requester.id", "requester.assertion.signature"]
    if key_reference:
        # The reference must resolve while signing, so it goes in first.
        manifest["sender"]["assertion"] = {"key_reference": key_reference}
        fields.append("sender.assertion.key_reference")
    assertion = make_assertion(manifest, key, tuple(fields), expires_at)
    if key_reference:
        assertion["key_reference"] = key_reference
    if attestation is not None:
        assertion["directory_attestation"] = copy.deepcopy(attestation)
    ASSERTION.check(assertion, "sender.assertion")
    return assertion


def pack(
    sources: str | os.PathLike | Iterable[str | os.PathLike],
    out_zip: str | os.PathLike,
    *,
    sender: Entity,
    signing_key: Ed25519PrivateKey,
    receiver: Entity,
    recipient_public: X25519PublicKey | None,
    dialect: str = "spec",
    envelope_id: str | None = None,
    expires_in: timedelta | None = None,
    fallback_patient_id: str = "UNKNOWN",
    workdir: str | os.PathLike | None = None,
    progress: Progress | None = None,
    request: Request | None = None,
    key_reference: str | None = None,
    attestation: dict | None = None,
) -> PackResult:
    """Pack the DICOM files in ``sources`` (one study) into ``out_zip``.

    The zip holds one folder named after the envelope id. It is written under a
    temporary name in the same folder, fsynced and renamed, so ``out_zip`` is
    either complete or absent. ``recipient_public=None`` writes a clear envelope.
    ``workdir`` is accepted for callers that manage scratch space; nothing needs
    it, because the payload streams straight into the zip.

    Governance (docs/governance.md): ``request`` is a signed request whose
    requester entity is copied into the manifest untouched; ``key_reference``
    is written into the sender assertion and signed; ``attestation`` is a
    ``directory_attestation`` of the signing key, carried as given. The
    ``created`` audit entry is signed with ``signing_key``.

    Raises :class:`~bridge.errors.UnpackableStudy` when the files are not one
    study with one Patient ID, and ``ValueError`` for a bad argument (a request
    made for another receiver, an attestation of another key).
    """
    if dialect not in WRITABLE:
        raise ValueError(
            f"dialect: expected one of {', '.join(WRITABLE)}, got {dialect!r}"
        )
    if envelope_id is not None and not is_uuid(envelope_id):
        raise ValueError(f"envelope_id: expected a UUID, got {envelope_id!r}")
    if recipient_public is not None and not isinstance(
        recipient_public, X25519PublicKey
    ):
        raise ValueError("recipient_public: expected an X25519 public key or None")
    _check_governance_inputs(sender, signing_key, receiver, request, attestation)
    env_id = (envelope_id or str(uuid.uuid4())).lower()
    now = utc_now()
    stamp, chosen = utc_text(now), DIALECTS[dialect]
    stages: dict[str, float] = {}

    clock = time.perf_counter()
    found = _dicom.scan(sources)
    meta = _dicom.metadata(found, env_id, stamp, fallback_patient_id)
    docs = {"metadata.json": dump_json(meta)}
    payload_bytes = sum(i.size for i in found.instances)
    meter = _Meter(payload_bytes, progress)
    stages["scan"] = time.perf_counter() - clock

    clock = time.perf_counter()
    prefix = env_id + "/"
    with ZipOut(out_zip, now.timestamp()) as zout:
        if recipient_public is None:
            security = _clear(zout, prefix, chosen, docs, found, meter)
        else:
            security = _seal(
                zout,
                prefix,
                chosen,
                recipient_public,
                docs,
                found,
                meter,
                int(now.timestamp()),
            )
        stages["tar_encrypt"] = time.perf_counter() - clock

        clock = time.perf_counter()
        manifest = {
            "version": "1.0",
            "id": env_id,
            "timestamp": stamp,
            "sender": sender.as_json(),
            **({"requester": copy.deepcopy(request.requester)} if request else {}),
            "receiver": [receiver.as_json()],
            "security": {
                "classification": "confidential",
                "jws": {"jws_file": "manifest.jws"},
                **security,
            },
        }
        expires_at = utc_text(now + expires_in) if expires_in else None
        manifest["sender"]["assertion"] = _sender_assertion(
            manifest,
            signing_key,
            recipient_public is not None,
            expires_at,
            key_reference,
            attestation,
        )
        if request is not None:
            check_request_fits(manifest)
        manifest_bytes = dump_json(manifest)
        audit = new_audit()
        append_audit(
            audit,
            CREATED,
            by=sender,
            to=receiver,
            key=signing_key,
            envelope_id=env_id,
            when=now,
        )
        zout.write_bytes(prefix + "manifest.json", manifest_bytes)
        zout.write_bytes(prefix + "manifest.jws", make_jws(manifest_bytes, signing_key))
        zout.write_bytes(prefix + "audit.json", dump_json(audit))
        size = zout.commit()
        stages["zip"] = time.perf_counter() - clock

    logger.info(
        "envelope packed envelope=%s instances=%d bytes=%d dialect=%s encrypted=%s",
        env_id,
        len(found.instances),
        size,
        dialect,
        recipient_public is not None,
    )
    return PackResult(
        envelope_id=env_id,
        path=Path(out_zip),
        size_bytes=size,
        instance_count=len(found.instances),
        payload_bytes=payload_bytes,
        stage_seconds=stages,
        study_instance_uid=found.instances[0].study_uid,
        skipped_files=found.skipped,
    )
