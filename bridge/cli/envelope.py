"""The envelope verbs: keygen, pack, open, verify, inspect.

Governance options (docs/governance.md): ``pack --request/--key-reference/
--attestation`` and the requester, directory, key_reference and audit policies
of ``open`` and ``verify``.

Output rules: results go to stdout, one short line each; errors go to stderr
as ``jmix-bridge: error: ...``; a progress bar is drawn on stderr only when it
is a terminal. Patient data is never printed.
"""

import argparse
import json
import sys
import time
from datetime import timedelta

from bridge import jmix
from bridge.errors import (
    EnvelopeError,
    KeyFileError,
    UnpackableStudy,
    VerificationFailed,
)

EXIT_OK, EXIT_FAILURE, EXIT_USAGE, EXIT_VERIFICATION = 0, 1, 2, 3


class _Bar:
    """A one-line progress bar on stderr, drawn only when stderr is a terminal."""

    def __init__(self, label: str, stream=None):
        self.stream = stream or sys.stderr
        self.label, self._last = label, -1.0
        self.enabled = self.stream.isatty()

    def __call__(self, done: int, total: int) -> None:
        if not self.enabled or not total:
            return
        now = time.monotonic()
        if now - self._last < 0.1 and done < total:
            return
        self._last = now
        filled = int(30 * done / total)
        self.stream.write(
            f"\r{self.label} [{'#' * filled}{'.' * (30 - filled)}] "
            f"{100 * done // total:3d}% {done >> 20}/{total >> 20} MiB"
        )
        self.stream.flush()

    def close(self) -> None:
        """End the bar's line."""
        if self.enabled and self._last >= 0:
            self.stream.write("\n")


def _fail(message: str, code: int) -> int:
    print(f"jmix-bridge: error: {message}", file=sys.stderr)
    return code


def _run(action) -> int:
    """Run ``action`` and translate the error tree into exit codes."""
    try:
        return action()
    except VerificationFailed as exc:
        return _fail(f"verification failed: {exc}", EXIT_VERIFICATION)
    except (EnvelopeError, KeyFileError, UnpackableStudy, ValueError) as exc:
        return _fail(str(exc), EXIT_USAGE)
    except FileNotFoundError as exc:
        return _fail(f"{exc.filename}: no such file or folder", EXIT_USAGE)
    except OSError as exc:
        return _fail(f"{exc.filename or ''}: {exc.strerror}", EXIT_FAILURE)


def _trust(values: list[str], key_reference: str | None = None) -> jmix.TrustStore:
    entries = []
    for value in values:
        sender_id, sep, path = value.rpartition("=")
        entries.append((sender_id if sep and sender_id else None, path, key_reference))
    return jmix.TrustStore(entries)


def _policy(args) -> jmix.OpenPolicy:
    return jmix.OpenPolicy(
        require_encryption=not args.allow_clear,
        expiry=args.expired,
        expected_receiver_id=args.receiver,
        trust="signed",
        requester=args.requester_policy,
        requester_trust=_trust(args.requester_trust),
        attestation=args.attestation_policy,
        directory_trust=_trust(args.directory_key),
        key_reference=args.key_reference_policy,
        audit=args.audit_policy,
    )


def _keygen(args) -> int:
    info = jmix.generate_key_dir(args.dir)
    # The block names each key with its fingerprint once: it is both the
    # summary for this operator and what the other site imports.
    print(f"created {info.path}")
    block = jmix.keys.PublicKeys(
        jmix.load_signing_public(info.path / jmix.keys.SIGNING_PUB),
        jmix.load_encryption_public(info.path / jmix.keys.ENCRYPTION_PUB),
        args.id,
    ).block()
    print("public keys (give this block to the other site: jmix-bridge trust add):")
    print(block, end="")
    if args.qr:
        _print_qr(block)
    return EXIT_OK


def _print_qr(text: str) -> None:
    """Draw ``text`` as a QR code in the terminal (needs the ``qr`` extra)."""
    try:
        import segno
    except ImportError:
        raise ValueError(
            "--qr: the segno package is not installed (pip install 'jmix-bridge[qr]')"
        ) from None
    segno.make(text, error="m").terminal(compact=True)


def _entity(args, role: str, default_id: str) -> jmix.Entity:
    """Build the sender or receiver from its three options."""
    entity_id = getattr(args, f"{role}_id") or default_id
    name = getattr(args, f"{role}_name") or entity_id
    return jmix.Entity(entity_id, name, getattr(args, f"{role}_contact"))


def _pack(args) -> int:
    if args.recipient is None and not args.no_encrypt:
        raise ValueError(
            "--to: the recipient's encryption.pub is required "
            "(or --no-encrypt for a clear envelope)"
        )
    keys = jmix.load_key_dir(args.key_dir)
    recipient = None if args.no_encrypt else jmix.load_encryption_public(args.recipient)
    request = jmix.request.read_request(args.request) if args.request else None
    attestation = None
    if args.attestation:
        with open(args.attestation, "rb") as fh:
            attestation = jmix.load_json(fh.read(65536), args.attestation)
    sender_fp = keys.signing_fingerprint
    receiver_fp = jmix.fingerprint(recipient) if recipient else "unspecified"
    sender = _entity(args, "sender", f"key:{sender_fp}")
    receiver = _entity(args, "receiver", f"key:{receiver_fp}")
    bar = _Bar("packing")
    try:
        result = jmix.pack(
            args.src,
            args.output,
            sender=sender,
            signing_key=keys.signing_key,
            receiver=receiver,
            recipient_public=recipient,
            dialect=args.dialect,
            expires_in=timedelta(hours=args.expires_in) if args.expires_in else None,
            fallback_patient_id=args.fallback_patient_id,
            progress=bar,
            request=request,
            key_reference=args.key_reference,
            attestation=attestation,
        )
    finally:
        bar.close()
    print(
        f"packed {result.instance_count} instances ({result.payload_bytes} bytes) "
        f"into {result.path}, envelope {result.envelope_id}, {result.size_bytes} bytes"
        + ("" if recipient else ", NOT encrypted")
    )
    if result.skipped_files:
        print(f"skipped {result.skipped_files} files that are not DICOM instances")
    return EXIT_OK


def _report(verb: str, opened: jmix.OpenedEnvelope, where: str = "") -> None:
    print(
        f"{verb} envelope {opened.envelope_id} from {opened.sender_id} "
        f"(signer {opened.signer_fingerprint}, dialect {opened.dialect}): "
        f"{len(opened.files)} files{where}"
    )
    for element, record in opened.governance.items():
        if record.get("status") != "absent":
            print(f"{element}: {record['status']}")
    for note in opened.warnings:
        print(f"warning: {note}", file=sys.stderr)


def _open(args, write: bool) -> int:
    keys = jmix.load_key_dir(args.key_dir)
    trust = _trust(args.trust, args.expect_key_reference)
    bar = _Bar("opening" if write else "verifying")
    try:
        if write:
            opened = jmix.open_envelope(
                args.envelope,
                args.output,
                encryption_key=keys.encryption_key,
                trust=trust,
                policy=_policy(args),
                progress=bar,
            )
        else:
            opened = jmix.verify_envelope(
                args.envelope,
                encryption_key=keys.encryption_key,
                trust=trust,
                policy=_policy(args),
                progress=bar,
            )
    finally:
        bar.close()
    _report(
        "opened" if write else "verified", opened, f" in {args.output}" if write else ""
    )
    return EXIT_OK


def _inspect(args) -> int:
    report = jmix.inspect_envelope(args.envelope)
    if not args.full:
        report.pop("manifest")
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return EXIT_OK


def _policy_help(element: str) -> str:
    """Return the help of a governance policy option (docs/governance.md 5)."""
    return (
        f"how to treat {element}: required (refuse without it), "
        "verified-if-present (default; refuse it if present and failing), or "
        "ignored (accept a failing one with a warning)"
    )


def _reader_options(sub: argparse.ArgumentParser) -> None:
    sub.add_argument(
        "envelope",
        metavar="ENVELOPE.zip",
        help="the envelope: a zip, or an envelope folder",
    )
    sub.add_argument(
        "--key",
        dest="key_dir",
        metavar="DIR",
        required=True,
        help="your key folder (made by keygen); its encryption.key "
        "decrypts the payload",
    )
    sub.add_argument(
        "--trust",
        metavar="[SENDER_ID=]PUB",
        action="append",
        default=[],
        required=True,
        help="a trusted sender's signing.pub; repeat for several senders. "
        "With SENDER_ID= the key is accepted only for that sender id",
    )
    sub.add_argument(
        "--receiver",
        metavar="ID",
        help="refuse envelopes addressed to another receiver id",
    )
    sub.add_argument(
        "--allow-clear",
        action="store_true",
        help="accept envelopes that are not encrypted (refused by default)",
    )
    sub.add_argument(
        "--expired",
        choices=("reject", "warn"),
        default="reject",
        help="what to do when the sender assertion has expired (default: reject)",
    )
    policies = ("required", "verified-if-present", "ignored")
    sub.add_argument(
        "--requester-trust",
        metavar="[REQUESTER_ID=]PUB",
        action="append",
        default=[],
        help="a requester's signing.pub; repeat for several",
    )
    sub.add_argument(
        "--requester-policy",
        choices=policies,
        default="verified-if-present",
        help=_policy_help("the requester block (checked with --requester-trust)"),
    )
    sub.add_argument(
        "--directory-key",
        metavar="[PROVIDER=]PUB",
        action="append",
        default=[],
        help="a trusted directory's signing.pub; repeat for several",
    )
    sub.add_argument(
        "--attestation-policy",
        choices=policies,
        help="default: verified-if-present with a --directory-key, else ignored",
    )
    sub.add_argument(
        "--expect-key-reference",
        metavar="REF",
        help="the key_reference the --trust keys are known by",
    )
    sub.add_argument(
        "--key-reference-policy",
        choices=policies,
        default="verified-if-present",
        help=_policy_help(
            "the sender's key_reference (compared with --expect-key-reference)"
        ),
    )
    sub.add_argument(
        "--audit-policy",
        choices=policies,
        default="verified-if-present",
        help=_policy_help("audit.json (entries by pinned nodes are verified)"),
    )


def register(subparsers) -> None:
    """Add the envelope verbs to the ``jmix-bridge`` command line."""
    fmt = argparse.RawDescriptionHelpFormatter

    sub = subparsers.add_parser(
        "keygen",
        help="create a key folder (signing and encryption key pairs)",
        formatter_class=fmt,
        description="Create DIR with signing.key/signing.pub (Ed25519, signs your "
        "envelopes)\nand encryption.key/encryption.pub (X25519, lets others encrypt "
        "to you).\nGive the two .pub files to your peers; keep the .key files "
        "private (mode 0600).",
    )
    sub.add_argument("dir", metavar="DIR", help="folder to create (may exist if empty)")
    sub.add_argument("--id", help="your entity id, written into the printed block")
    sub.add_argument(
        "--qr",
        action="store_true",
        help="also draw the block as a QR code (needs the qr extra: segno)",
    )
    sub.set_defaults(handler=lambda a: _run(lambda: _keygen(a)))

    sub = subparsers.add_parser(
        "pack",
        help="pack a folder of DICOM files into an envelope zip",
        formatter_class=fmt,
        description="Pack one study into a signed, encrypted envelope.\n\n"
        "example:\n  jmix-bridge pack study/ -o study.zip --from mykeys "
        "--to peer/encryption.pub",
    )
    sub.add_argument(
        "src",
        metavar="SRC",
        help="folder of DICOM files (searched recursively; other files "
        "are skipped and counted)",
    )
    sub.add_argument(
        "-o",
        "--output",
        metavar="ENVELOPE.zip",
        required=True,
        help="the zip to write (written atomically)",
    )
    sub.add_argument(
        "--from",
        dest="key_dir",
        metavar="DIR",
        required=True,
        help="your key folder; its signing.key signs the envelope",
    )
    sub.add_argument(
        "--to", dest="recipient", metavar="PUB", help="the recipient's encryption.pub"
    )
    sub.add_argument(
        "--no-encrypt",
        action="store_true",
        help="write a clear (unencrypted) envelope; receivers refuse it "
        "unless they allow clear envelopes",
    )
    sub.add_argument(
        "--dialect",
        choices=jmix.DIALECTS_WRITTEN,
        default="spec",
        help="spec (default) or rs (for Harmony and jmix-rs peers)",
    )
    for role, whose, fp_kind in (
        ("sender", "your", "your signing"),
        ("receiver", "the receiver's", "its encryption"),
    ):
        sub.add_argument(
            f"--{role}-id",
            help=f"{whose} id in the manifest (default: key:<{fp_kind} fingerprint>)",
        )
        sub.add_argument(f"--{role}-name", help=f"{whose} name (default: the id)")
        sub.add_argument(
            f"--{role}-contact",
            default="unspecified",
            help=f"{whose} contact (default: unspecified)",
        )
    sub.add_argument(
        "--expires-in",
        type=float,
        metavar="HOURS",
        help="the sender assertion expires this many hours from now",
    )
    sub.add_argument(
        "--request",
        metavar="FILE",
        help="a signed request file (jmix-bridge request); its requester is "
        "carried untouched",
    )
    sub.add_argument(
        "--key-reference",
        metavar="REF",
        help="the reference your signing key is known by, written and signed",
    )
    sub.add_argument(
        "--attestation",
        metavar="FILE",
        help="a directory_attestation of your signing key (jmix-bridge attest)",
    )
    sub.add_argument(
        "--fallback-patient-id",
        default="UNKNOWN",
        help="patient id written when the files have none",
    )
    sub.set_defaults(handler=lambda a: _run(lambda: _pack(a)))

    sub = subparsers.add_parser(
        "open",
        help="verify an envelope and extract its payload",
        formatter_class=fmt,
        description="Verify every check, then extract the payload (DICOM files, "
        "metadata.json,\nfiles.json) into OUTDIR. Nothing is written unless every "
        "check passed.\n\nexample:\n  jmix-bridge open study.zip -o incoming/ "
        "--key mykeys --trust peer/signing.pub",
    )
    _reader_options(sub)
    sub.add_argument(
        "-o",
        "--output",
        metavar="OUTDIR",
        required=True,
        help="folder to create (must not exist, or be empty)",
    )
    sub.set_defaults(handler=lambda a: _run(lambda: _open(a, True)))

    sub = subparsers.add_parser(
        "verify",
        help="run every check of open, writing nothing",
        formatter_class=fmt,
        description="Run every check open runs (signature, decryption, hashes), "
        "writing nothing.\nExit code 0: the envelope would open; 3: it would be "
        "refused.",
    )
    _reader_options(sub)
    sub.set_defaults(handler=lambda a: _run(lambda: _open(a, False)))

    sub = subparsers.add_parser(
        "inspect",
        help="show an envelope's manifest without keys",
        formatter_class=fmt,
        description="Show what can be known without keys: sender, receivers, "
        "encryption,\nsigner fingerprint, sizes. Never reads the payload, so never "
        "shows patient data.\nNothing here is verified; use verify for that.",
    )
    sub.add_argument(
        "envelope", metavar="ENVELOPE.zip", help="the envelope zip or folder"
    )
    sub.add_argument(
        "--full", action="store_true", help="also print the whole manifest"
    )
    sub.set_defaults(handler=lambda a: _run(lambda: _inspect(a)))


__all__ = ["register"]
