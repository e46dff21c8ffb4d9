"""Regenerate the envelope vector files in this folder (run by hand, not by pytest).

Each case is a folder ``<case>/`` holding ``envelope.zip`` and ``expect.json``
(the expected outcome: ``opens`` or the name of the error, and the receiver
policy to open it with). The keys in ``keys/`` are fixed test keys; they protect
nothing (git keeps them 0644; ``chmod 600 tests/vectors/keys/*/*.key`` before a
run). Usage, from the repository root:
``PYTHONPATH=. python tests/vectors/generate.py [case ...]``; with case names,
only those cases are rewritten (the others keep their bytes: sealing draws a
fresh ephemeral key and IV each run).
"""

import hashlib
import io
import json
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian

from bridge.jmix import load_key_dir, load_signing_key
from bridge.jmix._aead import IV_BYTES, Sealer, derive_key
from bridge.jmix._assertion import make_assertion, make_jws, required_fields
from bridge.jmix._codec import b64encode, dump_json, hash_text
from bridge.jmix._payload import JS, RS, SPEC, ClearHash, Dialect
from bridge.jmix.keys import raw_public

HERE = Path(__file__).resolve().parent
KEYS = HERE / "keys"
ID = "4c2f1d6e-8a3b-4e5f-9a7c-1b2d3e4f5a6b"
STAMP = "2026-01-15T09:30:00Z"
SOP = "1.2.826.0.1.3680043.8.498.1.1"
ONLY: frozenset[str] = frozenset()
"""The cases to write; empty for all of them."""


def _dicom() -> bytes:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
    meta.MediaStorageSOPInstanceUID = SOP
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = meta.MediaStorageSOPClassUID, SOP
    ds.StudyInstanceUID, ds.SeriesInstanceUID = (
        "1.2.826.0.1.3680043.8.498.1",
        SOP + ".9",
    )
    ds.PatientName, ds.PatientID, ds.Modality = "Vector^Test", "V-1", "OT"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _documents(dicom: bytes) -> dict[str, bytes]:
    meta = dump_json(
        {
            "version": "1.0",
            "id": ID,
            "timestamp": STAMP,
            "patient": {"id": "V-1", "name": {"family": "Vector", "given": ["Test"]}},
            "studies": {"study_uid": "1.2.826.0.1.3680043.8.498.1"},
        }
    )
    files = {f"dicom/{SOP}.dcm": dicom, "metadata.json": meta}
    listing = [
        {"file": k, "hash": hash_text(hashlib.sha256(v).digest()), "size_bytes": len(v)}
        for k, v in sorted(files.items())
    ]
    return {**files, "files.json": dump_json(listing)}


def _tar(entries: list[tuple], dialect: Dialect) -> bytes:
    """Entries: (name, bytes) files, or (name, TarInfo-type, linkname) specials."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
        if dialect.dir_entries:
            for name in (dialect.tar_prefix, dialect.tar_prefix + "dicom/"):
                info = tarfile.TarInfo(name)
                info.type = tarfile.DIRTYPE
                tar.addfile(info)
        for entry in entries:
            info = tarfile.TarInfo(entry[0])
            if len(entry) == 2:
                info.size = len(entry[1])
                tar.addfile(info, io.BytesIO(entry[1]))
            else:
                info.type, info.linkname = entry[1], entry[2]
                tar.addfile(info)
    return buf.getvalue()


class ZeroSecretSealer:
    """Encrypt as a sender would whose ephemeral key is the low-order ``point``.

    X25519 with a low-order point yields the all-zero secret whatever the other
    key (RFC 7748 section 6.1), so the payload key is HKDF of 32 zero bytes: an
    envelope anyone can make and open. Only the reader's explicit refusal of
    that secret stands between it and the destination.
    """

    def __init__(self, point: bytes, info: bytes):
        self.point = point
        self.iv = bytes(range(IV_BYTES))
        key = derive_key(bytes(32), info)
        self._enc = Cipher(algorithms.AES(key), modes.GCM(self.iv)).encryptor()

    def update(self, data: bytes) -> bytes:
        """Return the ciphertext of ``data``."""
        return self._enc.update(data)

    def finish(self) -> bytes:
        """Finish the stream and return the tag."""
        self._enc.finalize()
        return self._enc.tag


def _files(docs: dict[str, bytes], dialect: Dialect) -> list[tuple]:
    return [(dialect.tar_prefix + k, v) for k, v in sorted(docs.items())]


def build(
    case: str,
    expect: dict,
    *,
    dialect: Dialect = SPEC,
    entries: list[tuple] | None = None,
    encrypt: bool = True,
    signer: str = "sender",
    recipient: str = "receiver",
    fields: tuple[str, ...] | None = None,
    tweak=None,
    after=None,
    expires_at: str | None = None,
    root: str = ID + "/",
    zip_extra: list[tuple[str, bytes]] = (),
    low_order: bytes | None = None,
) -> None:
    """Write one vector: build the payload, seal, sign, zip, then describe it.

    ``low_order`` seals with that point as the ephemeral key, under the key
    derived from the all-zero secret it forces.
    """
    if ONLY and case not in ONLY:
        return
    docs = _documents(_dicom())
    key = load_signing_key(KEYS / signer / "signing.key")
    out: dict[str, bytes] = {}
    security: dict = {"classification": "confidential"}
    if encrypt:
        plain = _tar(entries if entries is not None else _files(docs, dialect), dialect)
        recipient_key = load_key_dir(KEYS / recipient).encryption_key.public_key()
        if low_order is None:
            sealer = Sealer(recipient_key, dialect.info)
            ephemeral = raw_public(sealer.ephemeral_public)
        else:
            sealer = ZeroSecretSealer(low_order, dialect.info)
            ephemeral = low_order
        cipher = sealer.update(plain)
        tag = sealer.finish()
        if dialect is JS:
            clear = ClearHash()
            for rel, data in sorted(docs.items()):
                clear.begin(rel)
                clear.update(data)
            digest = clear.running.digest()
        else:
            digest = hashlib.sha256(
                plain if dialect.hash_plaintext else cipher
            ).digest()
        out[dialect.ciphertext] = cipher
        security["payload_hash"] = hash_text(digest)
        security["encryption"] = {
            "algorithm": "AES-256-GCM",
            "ephemeral_public_key": b64encode(ephemeral),
            "iv": b64encode(sealer.iv),
            "auth_tag": b64encode(tag),
        }
    else:
        clear = ClearHash()
        for rel, data in sorted(docs.items()):
            clear.begin(rel)
            clear.update(data)
            clear.end(rel, len(data), hashlib.sha256(data).digest())
            out["payload/" + rel] = data
        security["payload_hash"] = hash_text(clear.spec_digest())
    manifest = {
        "version": "1.0",
        "id": ID,
        "timestamp": STAMP,
        "sender": {
            "id": "org:vector-sender",
            "name": "Vector Sender",
            "contact": "s@x",
        },
        "receiver": [
            {"id": "org:vector-receiver", "name": "Receiver", "contact": "r@x"}
        ],
        "security": security,
    }
    if tweak:
        tweak(manifest)
    manifest["sender"]["assertion"] = make_assertion(
        manifest, key, fields or required_fields(encrypt), expires_at
    )
    if after:
        after(manifest, out)
    out["manifest.json"] = dump_json(manifest)
    out["manifest.jws"] = make_jws(out["manifest.json"], key)
    out["audit.json"] = dump_json(
        {
            "audit": [
                {
                    "event": "created",
                    "by": {"id": "org:vector-sender"},
                    "timestamp": STAMP,
                }
            ]
        }
    )
    if expect.pop("flip_jws", False):
        jws = bytearray(out["manifest.jws"])
        jws[-5] = ord("A") if jws[-5] != ord("A") else ord("B")
        out["manifest.jws"] = bytes(jws)

    folder = HERE / case
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir()
    with zipfile.ZipFile(folder / "envelope.zip", "w", zipfile.ZIP_STORED) as zf:
        for name, data in out.items():
            zf.writestr(zipfile.ZipInfo(root + name, (2026, 1, 15, 9, 30, 0)), data)
        for name, data in zip_extra:
            info = zipfile.ZipInfo(name, (2026, 1, 15, 9, 30, 0))
            if name.endswith("@link"):
                info.filename = name[: -len("@link")]
                info.external_attr = 0o120777 << 16
            zf.writestr(info, data)
    (folder / "expect.json").write_text(json.dumps(expect, indent=2) + "\n")


def _flip_b64(value: str) -> str:
    raw = bytearray(__import__("base64").b64decode(value))
    raw[0] ^= 0x01
    return b64encode(bytes(raw))


def _flip_payload(manifest: dict, out: dict) -> None:
    name = next(n for n in out if n.startswith("payload."))
    data = bytearray(out[name])
    data[len(data) // 2] ^= 0x01
    out[name] = bytes(data)


def _resign_flip(path: str):
    """Flip a signed encryption field before signing: GCM fails, the signature holds."""

    def tweak(manifest: dict) -> None:
        enc = manifest["security"]["encryption"]
        enc[path] = _flip_b64(enc[path])

    return tweak


def main() -> None:
    """Write every case."""
    docs = _documents(_dicom())
    dicom = docs[f"dicom/{SOP}.dcm"]

    def opens(what: str, **policy) -> dict:
        return {"outcome": "opens", "description": what, "policy": policy}

    def fails(error: str, what: str, **policy) -> dict:
        return {"outcome": error, "description": what, "policy": policy}

    build("ok-spec", opens("spec dialect, envelope under one top-level folder"))
    build("ok-spec-root", opens("spec dialect, envelope at the zip root"), root="")
    build(
        "ok-rs", opens("rs dialect: payload.enc, ./ names, plaintext hash"), dialect=RS
    )
    build("ok-js", opens("js dialect: payload/ tar names, folder hash"), dialect=JS)
    # The js hash takes files in path order; a tar in another order cannot be
    # hashed as it streams, so these exercise the hash taken from the files.
    unsorted = list(reversed(_files(docs, JS)))
    build(
        "ok-js-unsorted-tar",
        opens("js dialect, tar members not in path order"),
        dialect=JS,
        entries=unsorted,
    )
    zero_hash = "sha256:" + "0" * 64
    build(
        "refuse-js-payload-hash-mismatch",
        fails("IntegrityError", "js dialect, folder hash signed but wrong"),
        dialect=JS,
        tweak=lambda m: m["security"].__setitem__("payload_hash", zero_hash),
    )
    build(
        "refuse-js-unsorted-tar-payload-hash-mismatch",
        fails("IntegrityError", "js dialect, tar not in path order, hash wrong"),
        dialect=JS,
        entries=unsorted,
        tweak=lambda m: m["security"].__setitem__("payload_hash", zero_hash),
    )
    build(
        "ok-clear",
        opens(
            "clear envelope, accepted because encryption is not required",
            require_encryption=False,
        ),
        encrypt=False,
    )
    build(
        "refuse-clear-when-encryption-required",
        fails("PolicyViolation", "clear envelope, encryption required"),
        encrypt=False,
    )
    build(
        "refuse-wrong-recipient-key",
        fails("AuthenticationFailed", "encrypted to another key"),
        recipient="other",
    )
    build(
        "refuse-flipped-ciphertext-byte",
        fails("AuthenticationFailed", "one ciphertext bit flipped"),
        after=_flip_payload,
    )
    for field in ("auth_tag", "iv", "ephemeral_public_key"):
        build(
            f"refuse-flipped-{field.replace('_', '-')}",
            fails(
                "AuthenticationFailed", f"{field} flipped and re-signed by the sender"
            ),
            tweak=_resign_flip(field),
        )
        build(
            f"refuse-flipped-{field.replace('_', '-')}-unsigned",
            fails("AuthenticationFailed", f"{field} flipped after signing"),
            after=lambda m, o, f=field: m["security"]["encryption"].__setitem__(
                f, _flip_b64(m["security"]["encryption"][f])
            ),
        )
    build(
        "refuse-flipped-assertion-signature",
        fails("AuthenticationFailed", "sender assertion signature flipped"),
        after=lambda m, o: m["sender"]["assertion"].__setitem__(
            "signature", _flip_b64(m["sender"]["assertion"]["signature"])
        ),
    )
    build(
        "refuse-flipped-jws",
        {**fails("AuthenticationFailed", "manifest.jws flipped"), "flip_jws": True},
    )
    build(
        "refuse-low-order-ephemeral-key",
        fails(
            "AuthenticationFailed",
            "all-zero ephemeral key, payload sealed under the zero shared secret",
        ),
        low_order=bytes(32),
    )
    build(
        "refuse-unknown-signer",
        fails("UnknownSigner", "signed by a key not pinned"),
        signer="other",
    )
    build(
        "refuse-signer-pinned-for-another-sender",
        fails(
            "UnknownSigner",
            "the key is pinned for another sender id",
            pin_sender_id="org:someone-else",
        ),
    )
    build(
        "refuse-weak-signed-fields",
        fails("PolicyViolation", "assertion binds only what jmix-rs binds"),
        fields=("sender.id", "sender.name", "id", "timestamp"),
    )
    build(
        "refuse-unresolvable-signed-field",
        fails("SchemaViolation", "a signed field path that does not resolve"),
        fields=(*required_fields(True), "security.classification"),
        after=lambda m, o: m["security"].pop("classification"),
    )
    build(
        "refuse-expired-assertion",
        fails("ExpiredAssertion", "expires_at in the past"),
        expires_at="2026-01-16T00:00:00Z",
    )
    build(
        "refuse-other-receiver",
        fails(
            "PolicyViolation",
            "addressed to another receiver id",
            expected_receiver_id="org:not-us",
        ),
    )
    build(
        "refuse-manifest-unknown-key",
        fails("SchemaViolation", "manifest has a key the schema forbids"),
        tweak=lambda m: m.__setitem__("colour", "blue"),
    )
    build(
        "refuse-payload-hash-mismatch",
        fails("IntegrityError", "payload_hash signed but wrong"),
        tweak=lambda m: m["security"].__setitem__("payload_hash", zero_hash),
    )
    wrong = dict(docs)
    wrong[f"dicom/{SOP}.dcm"] = dicom[:-1] + bytes([dicom[-1] ^ 1])
    build(
        "refuse-file-not-matching-files-json",
        fails("IntegrityError", "a DICOM file differs from files.json"),
        entries=_files({**wrong, "files.json": docs["files.json"]}, SPEC),
    )
    for case, entry, what in (
        ("absolute-path", ("/etc/evil", b"x"), "absolute tar name"),
        ("dotdot-path", ("dicom/../../evil", b"x"), "tar name with .."),
        (
            "symlink",
            ("dicom/link.dcm", tarfile.SYMTYPE, "/etc/passwd"),
            "symlink entry",
        ),
        ("hardlink", ("dicom/hard.dcm", tarfile.LNKTYPE, "metadata.json"), "hard link"),
        ("device", ("dicom/dev.dcm", tarfile.CHRTYPE, ""), "character device"),
    ):
        build(
            f"refuse-tar-{case}",
            fails("UnsafeEntry", what),
            entries=[*_files(docs, SPEC), entry],
        )
    oversize = [
        ("files.json", docs["files.json"]),
        ("metadata.json", docs["metadata.json"]),
        (f"dicom/{SOP}.dcm", dicom + b"extra"),
    ]
    build(
        "refuse-tar-entry-larger-than-files-json",
        fails("UnsafeEntry", "entry larger than files.json declares"),
        entries=oversize,
    )
    build(
        "refuse-zip-duplicate-name",
        fails("UnsafeEntry", "two zip entries, one name"),
        zip_extra=[(ID + "/manifest.json", b"{}")],
    )
    build(
        "refuse-zip-dotdot-name",
        fails("UnsafeEntry", "zip entry name with .."),
        zip_extra=[(ID + "/../evil", b"x")],
    )
    build(
        "refuse-zip-symlink",
        fails("UnsafeEntry", "zip entry that is a symlink"),
        zip_extra=[(ID + "/payload.link@link", b"/etc/passwd")],
    )


if __name__ == "__main__":
    ONLY = frozenset(sys.argv[1:])
    main()
