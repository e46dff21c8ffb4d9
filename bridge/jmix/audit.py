"""The audit trail: signed, chained entries that grow at every hop.

``audit.json`` sits outside the ciphertext and outside the manifest's
signatures, so nodes can append to it in transit. Each entry we write carries
the published schema's ``assertion``, signed by the node that wrote it, over
the RFC 8785 (JCS) bytes of (docs/governance.md section 4)::

    {"envelope_id": "<manifest id>",
     "previous": "sha256:<hex of the JCS bytes of the previous entry>" or null,
     "fields": {path: value for each path of signed_fields}}

Paths resolve against the entry (``event``, ``by.id``, ``to.id``, ...). The
envelope id keeps an entry from being moved to another envelope; the hash of
the previous entry (with its own assertion) keeps entries from being reordered,
altered or removed before a signed entry without that entry failing. Removing
entries from the end cannot be detected this way (limitation L-G3).

Entries name nodes and destinations only: never patient data, never a UID.
"""

import contextlib
import copy
import fcntl
import hashlib
import os
import shutil
import tempfile
import zipfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.errors import (
    AuthenticationFailed,
    EnvelopeError,
    MalformedEnvelope,
    PolicyViolation,
    SchemaViolation,
    UnknownSigner,
)

from ._archive import Source
from ._assertion import assertion_key, signed_values, signing_key_json
from ._codec import b64decode, b64encode, dump_json, load_json, utc_now, utc_text
from ._shape import AUDIT
from .keys import fingerprint
from .trust import GOVERNANCE_POLICIES, Entity, TrustStore

_ENTRY_FIELDS = ("event", "by.id", "by.name", "to.id", "to.name", "timestamp")
_REQUIRED_FIELDS = ("event", "by.id", "timestamp")
_AUDIT_LIMIT = 4 * 1024 * 1024
_AUTH_FAILED = "authentication failed"

# The events our nodes write, in the order an envelope meets them.
CREATED, SENT, RECEIVED, VERIFIED, FORWARDED = (
    "created",
    "sent",
    "received",
    "verified",
    "forwarded",
)

EntityRef = Entity | dict


@dataclass(frozen=True)
class AuditEntryCheck:
    """The outcome for one entry: ``verified``, ``unsigned``, ``unknown-signer``
    or ``failed`` (with a reason that names no bytes of the signature)."""

    index: int
    event: str
    by: str
    status: str
    signer: str | None = None
    reason: str | None = None

    def as_json(self) -> dict:
        """Return the record a receiver stores."""
        record = {
            "index": self.index,
            "event": self.event,
            "by": self.by,
            "status": self.status,
        }
        if self.signer:
            record["signer"] = self.signer
        if self.reason:
            record["reason"] = self.reason
        return record


def _ref(entity: EntityRef) -> dict:
    """Return the audit form ``{id, name}`` of an entity (contact left out)."""
    if isinstance(entity, Entity):
        return {"id": entity.id, "name": entity.name}
    if not isinstance(entity, dict) or not isinstance(entity.get("id"), str):
        raise ValueError(f"expected an Entity or a dict with an id, got {entity!r:.80}")
    ref = {"id": entity["id"]}
    if isinstance(entity.get("name"), str):
        ref["name"] = entity["name"]
    return ref


def forwarded_to(destination: str, instances: int) -> dict:
    """Return the ``to`` of a ``forwarded`` entry: the destination and the count.

    The published entry shape has no place for a count, so it goes in the
    name, as ``<destination> (<n> instances)`` (docs/governance.md section 4).
    """
    return {
        "id": f"dicom:{destination}",
        "name": f"{destination} ({instances} instances)",
    }


def entry_hash(entry: dict) -> str:
    """Return ``sha256:<hex>`` of the JCS bytes of a whole entry."""
    return "sha256:" + hashlib.sha256(rfc8785.dumps(entry)).hexdigest()


def _signed_message(
    entry: dict, fields: list[str], envelope_id: str, previous: dict | None, where: str
) -> bytes:
    if any(f == "assertion" or f.startswith("assertion.") for f in fields):
        raise SchemaViolation(
            f"{where}.signed_fields: an entry cannot sign its assertion"
        )
    return rfc8785.dumps(
        {
            "envelope_id": envelope_id,
            "previous": entry_hash(previous) if previous is not None else None,
            "fields": signed_values(entry, fields, where),
        }
    )


def new_audit() -> dict:
    """Return an empty audit document."""
    return {"audit": []}


def append_audit(
    audit_doc: dict,
    event: str,
    *,
    by: EntityRef,
    to: EntityRef | None = None,
    key: Ed25519PrivateKey,
    envelope_id: str,
    when: datetime | None = None,
) -> dict:
    """Append a signed ``event`` entry to ``audit_doc`` in place; return the entry.

    ``by`` is the node writing the entry (its key is ``key``), ``to`` the node,
    peer or destination it concerns (see :func:`forwarded_to`).
    """
    if not isinstance(event, str) or not event:
        raise ValueError(f"event: expected a non-empty string, got {event!r}")
    AUDIT.check(audit_doc, "audit.json")
    entries = audit_doc["audit"]
    entry: dict = {"event": event, "by": _ref(by)}
    if to is not None:
        entry["to"] = _ref(to)
    entry["timestamp"] = utc_text(when or utc_now())
    fields = [f for f in _ENTRY_FIELDS if _present(entry, f)]
    previous = entries[-1] if entries else None
    message = _signed_message(entry, fields, envelope_id, previous, "audit entry")
    entry["assertion"] = {
        "signing_key": signing_key_json(key.public_key()),
        "signed_fields": fields,
        "signature": b64encode(key.sign(message)),
    }
    entries.append(entry)
    return entry


def _present(entry: dict, path: str) -> bool:
    head, _, tail = path.partition(".")
    return head in entry and (not tail or tail in entry[head])


def _check_entry(
    entry: dict, index: int, envelope_id: str, previous: dict | None, trust: TrustStore
) -> AuditEntryCheck:
    where = f"audit[{index}].assertion"
    event, by = entry["event"], entry["by"]["id"]
    assertion = entry.get("assertion")
    if assertion is None:
        return AuditEntryCheck(index, event, by, "unsigned")
    try:
        public = assertion_key(assertion, where)
    except AuthenticationFailed:
        return AuditEntryCheck(index, event, by, "failed", None, _AUTH_FAILED)
    fp = fingerprint(public)
    pin = trust.lookup(fp)
    if pin is None:
        return AuditEntryCheck(
            index, event, by, "unknown-signer", fp, f"signing key {fp} is not pinned"
        )
    if pin.sender_id is not None and pin.sender_id != by:
        return AuditEntryCheck(
            index,
            event,
            by,
            "failed",
            fp,
            f"signed by a key pinned for {pin.sender_id!r}, not for {by!r}",
        )
    fields = assertion["signed_fields"]
    wanted = [*_REQUIRED_FIELDS, *(["to.id"] if "to" in entry else [])]
    missing = [f for f in wanted if f not in fields]
    if missing:
        return AuditEntryCheck(
            index, event, by, "failed", fp, f"does not bind {', '.join(missing)}"
        )
    try:
        message = _signed_message(entry, fields, envelope_id, previous, where)
        pin.public_key.verify(
            b64decode(assertion["signature"], f"{where}.signature"), message
        )
    except SchemaViolation as exc:
        return AuditEntryCheck(index, event, by, "failed", fp, str(exc))
    except InvalidSignature:
        return AuditEntryCheck(index, event, by, "failed", fp, _AUTH_FAILED)
    return AuditEntryCheck(index, event, by, "verified", fp)


def verify_audit(
    audit_doc: dict,
    envelope_id: str,
    trust: TrustStore,
    policy: str = "verified-if-present",
) -> list[AuditEntryCheck]:
    """Check every entry of ``audit_doc`` for envelope ``envelope_id``.

    ``trust`` pins the keys of the nodes whose entries can be checked, each for
    its node id. Returns one :class:`AuditEntryCheck` per entry. Raises per
    ``policy``: ``required``, unless every entry verified;
    ``verified-if-present``, when a signed entry whose key is pinned fails;
    ``ignored``, never. A failed signature raises AuthenticationFailed
    (``stage="audit"``), an entry by an unpinned key UnknownSigner, and an
    unsigned one PolicyViolation. SchemaViolation when the document is not
    an audit document at all.
    """
    if policy not in GOVERNANCE_POLICIES:
        raise ValueError(
            f"policy: expected one of {', '.join(GOVERNANCE_POLICIES)}, got {policy!r}"
        )
    AUDIT.check(audit_doc, "audit.json")
    entries = audit_doc["audit"]
    results = [
        _check_entry(
            entry, index, envelope_id, entries[index - 1] if index else None, trust
        )
        for index, entry in enumerate(entries)
    ]
    if policy == "ignored":
        return results
    for result in results:
        if result.status == "failed":
            if result.reason == _AUTH_FAILED:
                raise AuthenticationFailed(stage="audit")
            raise PolicyViolation(f"audit.json entry {result.index}: {result.reason}")
        if policy == "required" and result.status == "unknown-signer":
            raise UnknownSigner(f"audit.json entry {result.index}: {result.reason}")
        if policy == "required" and result.status == "unsigned":
            raise PolicyViolation(
                f"audit.json entry {result.index} is not signed and the policy "
                "requires signed entries"
            )
    if policy == "required" and not results:
        raise PolicyViolation("audit.json has no entries and the policy requires them")
    return results


# -- a node's stored copy -----------------------------------------------------------


def read_audit(src: str | os.PathLike) -> dict | None:
    """Return the ``audit.json`` of an envelope zip or folder (None when absent)."""
    with Source(src) as source:
        if "audit.json" not in source.names:
            return None
        doc = load_json(source.read_small("audit.json", _AUDIT_LIMIT), "audit.json")
    AUDIT.check(doc, "audit.json")
    return doc


def stored_audit_path(envelope_path: str | os.PathLike) -> Path:
    """Return where a node keeps its copy of an envelope's audit: beside it.

    ``<folder>/<id>.zip`` (or the folder ``<id>``) has its copy in
    ``<folder>/<id>.audit.json``.
    """
    path = Path(envelope_path)
    return path.with_name(path.name.removesuffix(".zip") + ".audit.json")


def current_audit(envelope_path: str | os.PathLike) -> dict | None:
    """Return the node's stored copy of the audit, else the envelope's own."""
    stored = stored_audit_path(envelope_path)
    with contextlib.suppress(FileNotFoundError):
        doc = load_json(stored.read_bytes(), "audit.json")
        AUDIT.check(doc, "audit.json")
        return doc
    return read_audit(envelope_path)


@contextlib.contextmanager
def _locked(path: Path) -> Iterator[None]:
    # One lock file per stored copy: the opener and several forward jobs may
    # append to the same envelope's audit at once.
    fd = os.open(path.with_name(path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)


def update_stored_audit(
    envelope_path: str | os.PathLike, change: Callable[[dict], None]
) -> dict:
    """Apply ``change`` to the node's stored copy of an envelope's audit.

    The copy starts from the envelope's own ``audit.json`` (or an empty one).
    The read, the change and the atomic replace happen under an exclusive lock,
    so concurrent appends are never lost. Returns the new document.
    """
    stored = stored_audit_path(envelope_path)
    with _locked(stored):
        try:
            doc = current_audit(envelope_path)
        except (EnvelopeError, OSError):
            # A damaged stored copy: start again from the envelope's own.
            try:
                doc = read_audit(envelope_path)
            except (EnvelopeError, OSError):
                doc = None
        doc = copy.deepcopy(doc) if doc is not None else new_audit()
        change(doc)
        fd, tmp = tempfile.mkstemp(
            prefix=f".{stored.name}.", suffix=".tmp", dir=stored.parent
        )
        try:
            with os.fdopen(fd, "wb") as fh:
                fh.write(dump_json(doc))
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, stored)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    return doc


def stamp_sent(
    zip_path: str | os.PathLike,
    *,
    by: EntityRef,
    to: EntityRef,
    key: Ed25519PrivateKey,
    when: datetime | None = None,
) -> dict:
    """Give an envelope zip a signed ``sent`` entry before it goes to a peer.

    The zip's ``audit.json`` must be its last entry (``pack`` writes it last):
    only that entry and the central directory are rewritten, in place, so a
    multi-gigabyte ciphertext is never copied. A ``sent`` entry left at the end
    by an earlier attempt that failed is replaced rather than repeated. Returns
    the new audit document. Raises MalformedEnvelope when the zip does not end
    with its audit.

    The rewrite is journalled: the old tail (audit entry and central
    directory) is saved beside the zip, fsynced, before the zip is touched, and
    removed once the new tail is on disk. A crash in between leaves the
    journal, and the next call puts the old tail back before it starts, so a
    crash never leaves an envelope that cannot be read.
    """
    path = Path(zip_path)
    _restore_tail(path)
    with zipfile.ZipFile(path) as zf:
        last = zf.infolist()[-1] if zf.infolist() else None
        if last is None or not last.filename.endswith("audit.json"):
            raise MalformedEnvelope(f"{path}: audit.json is not the last zip entry")
        prefix = last.filename.removesuffix("audit.json")
        manifest = load_json(zf.read(prefix + "manifest.json"), "manifest.json")
        doc = load_json(zf.read(last), "audit.json")
    AUDIT.check(doc, "audit.json")
    entries = doc["audit"]
    if entries and entries[-1].get("event") == SENT:
        entries.pop()
    append_audit(
        doc, SENT, by=by, to=to, key=key, envelope_id=manifest["id"], when=when
    )

    _save_tail(path, last.header_offset)
    with zipfile.ZipFile(path, "a") as zf:
        # Drop the old trailing entry from the central directory and write the
        # new one where it began; closing writes the directory and truncates.
        old = zf.getinfo(last.filename)
        zf.filelist.remove(old)
        del zf.NameToInfo[old.filename]
        zf.start_dir = old.header_offset
        zf.fp.seek(old.header_offset)
        info = zipfile.ZipInfo(old.filename, date_time=old.date_time)
        info.external_attr = old.external_attr
        zf.writestr(info, dump_json(doc), compress_type=zipfile.ZIP_STORED)
    with open(path, "rb+") as fh:
        os.fsync(fh.fileno())
    _tail_journal(path).unlink()
    return doc


def _tail_journal(path: Path) -> Path:
    return path.with_name(path.name + ".tail")


def _save_tail(path: Path, offset: int) -> None:
    """Write the zip's bytes from ``offset`` on, and the offset, to its journal."""
    journal = _tail_journal(path)
    tmp = journal.with_name(journal.name + ".tmp")
    with open(path, "rb") as src, open(tmp, "wb") as out:
        src.seek(offset)
        out.write(offset.to_bytes(8, "big"))
        shutil.copyfileobj(src, out)
        out.flush()
        os.fsync(out.fileno())
    os.replace(tmp, journal)
    fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _restore_tail(path: Path) -> None:
    """Undo a rewrite that a crash interrupted: put the journalled tail back."""
    journal = _tail_journal(path)
    try:
        saved = journal.read_bytes()
    except FileNotFoundError:
        return
    offset = int.from_bytes(saved[:8], "big")
    with open(path, "rb+") as fh:
        fh.seek(offset)
        fh.write(saved[8:])
        fh.truncate()
        fh.flush()
        os.fsync(fh.fileno())
    journal.unlink()
