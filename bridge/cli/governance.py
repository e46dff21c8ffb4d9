"""The governance verbs: trust add, trust fetch, attest, request.

``trust add`` imports a public key block printed by ``keygen`` at the other
site: it writes the keys into a folder and prints the fingerprints and the
configuration lines to paste (configuration files are never edited here, so
their comments survive). ``attest`` is a directory's tool, for tests and small
deployments; ``request`` signs a request file a sender passes to ``pack``.
"""

import argparse
import json
import ssl
import sys
from datetime import timedelta
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from bridge import jmix
from bridge.cli.envelope import EXIT_OK, _run
from bridge.jmix._codec import dump_json
from bridge.jmix.attestation import make_attestation
from bridge.jmix.keys import (
    PublicKeys,
    public_pem,
    read_public_keys,
    write_public_keys,
)
from bridge.jmix.request import make_request
from bridge.peer.directory import DirectoryResolver


def _read_text(source: str) -> str:
    if source == "-":
        return sys.stdin.read()
    path = Path(source)
    if path.is_file():
        return path.read_text(encoding="utf-8")
    return source


def _snippet(name: str, keys: PublicKeys, folder: Path) -> str:
    """Return the configuration lines for a site whose keys are in ``folder``."""
    sign_fp = jmix.fingerprint(keys.signing)
    lines = [
        "# on the receiving side, under senders:",
        f"- name: {name}",
        *([f"  id: {keys.node_id}"] if keys.node_id else []),
        f"  signing_keys: [{folder / 'signing.pub'}]",
        f"  signing_key_fingerprints: ['{sign_fp}']",
    ]
    if keys.encryption is not None:
        lines += [
            "# on the sending side, under peers:",
            f"- name: {name}",
            f"  encryption_key: {folder / 'encryption.pub'}",
            f"  encryption_key_fingerprint: '{jmix.fingerprint(keys.encryption)}'",
            f"  signing_key: {folder / 'signing.pub'}",
        ]
    return "\n".join(lines)


def _trust_add(args) -> int:
    keys = read_public_keys(_read_text(args.source))
    if args.fingerprint and jmix.fingerprint(keys.signing) != args.fingerprint.lower():
        raise ValueError(
            f"--fingerprint: expected {args.fingerprint}, the block's signing key "
            f"is {jmix.fingerprint(keys.signing)}"
        )
    folder = Path(args.into)
    written = write_public_keys(keys, folder)
    for path in written:
        print(f"wrote {path}")
    print(f"signing     {jmix.fingerprint(keys.signing)}")
    if keys.encryption is not None:
        print(f"encryption  {jmix.fingerprint(keys.encryption)}")
    print("compare the fingerprints with the other site before you pin them;")
    print("then paste into your configuration:")
    print(_snippet(args.name or folder.name, keys, folder))
    return EXIT_OK


def _trust_fetch(args) -> int:
    resolver = DirectoryResolver(
        args.directory,
        directory_trust=jmix.TrustStore([(None, path) for path in args.directory_key]),
        pinned=args.pinned,
        verify=ssl.create_default_context(cafile=args.ca) if args.ca else True,
    )
    try:
        found = resolver.resolve(args.reference)
    finally:
        resolver.close()
    key = found.public_key
    name = "signing.pub" if isinstance(key, Ed25519PublicKey) else "encryption.pub"
    folder = Path(args.into)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    if path.exists():
        raise ValueError(f"{path}: exists; not replaced")
    path.write_bytes(public_pem(key))
    print(f"wrote {path}")
    print(f"{found.fingerprint} accepted by {found.accepted_by}")
    return EXIT_OK


def _attest(args) -> int:
    directory = jmix.load_signing_key(args.key)
    subject_key = read_public_keys(_read_text(args.subject_keys)).signing
    attestation = make_attestation(
        directory,
        args.provider,
        args.subject_id,
        subject_key,
        key_reference=args.key_reference,
        valid_for=timedelta(days=args.valid_days) if args.valid_days else None,
    )
    Path(args.output).write_bytes(dump_json(attestation))
    print(
        f"attested {jmix.fingerprint(subject_key)} for {args.subject_id} "
        f"as {args.provider} into {args.output}"
    )
    return EXIT_OK


def _request(args) -> int:
    keys = jmix.load_key_dir(args.key_dir)
    request = make_request(
        keys.signing_key,
        jmix.Entity(args.requester_id, args.requester_name, args.requester_contact),
        args.receiver_id,
        valid_for=timedelta(hours=args.expires_in) if args.expires_in else None,
        key_reference=args.key_reference,
        attestation=(
            json.loads(Path(args.attestation).read_text()) if args.attestation else None
        ),
    )
    Path(args.output).write_bytes(dump_json(request.as_json()))
    print(
        f"request by {args.requester_id} for delivery to {args.receiver_id} "
        f"signed by {keys.signing_fingerprint} into {args.output}"
    )
    return EXIT_OK


def register(subparsers) -> None:
    """Add the governance verbs to the ``jmix-bridge`` command line."""
    fmt = argparse.RawDescriptionHelpFormatter

    trust = subparsers.add_parser(
        "trust", help="import another site's public keys (see keygen)"
    )
    verbs = trust.add_subparsers(dest="trust_verb", metavar="VERB")
    sub = verbs.add_parser(
        "add",
        help="import a public key block printed by keygen",
        formatter_class=fmt,
        description="Read the block keygen printed at the other site (a file, the "
        "text itself,\nor - for stdin), check each fingerprint, write "
        "signing.pub/encryption.pub\ninto --into, and print the lines to paste "
        "into your configuration.",
    )
    sub.add_argument("source", metavar="FILE_OR_TEXT", help="the block, a file or -")
    sub.add_argument(
        "--into", required=True, metavar="DIR", help="folder for the .pub files"
    )
    sub.add_argument("--name", help="the site's name in your configuration")
    sub.add_argument(
        "--fingerprint",
        metavar="SHA256:...",
        help="refuse unless the signing key has this fingerprint (read it "
        "back from the other site)",
    )
    sub.set_defaults(handler=lambda a: _run(lambda: _trust_add(a)))

    sub = verbs.add_parser(
        "fetch",
        help="fetch a key by reference from a directory",
        description="Fetch a public key by key_reference over HTTPS; it is "
        "accepted only when its fingerprint is given with --pinned or a "
        "--directory-key attests it.",
    )
    sub.add_argument("reference", metavar="KEY_REFERENCE")
    sub.add_argument("--directory", required=True, metavar="URL", help="https://...")
    sub.add_argument(
        "--directory-key",
        action="append",
        default=[],
        metavar="PUB",
        help="a trusted directory's signing.pub; repeat for several",
    )
    sub.add_argument(
        "--pinned",
        action="append",
        default=[],
        metavar="SHA256:...",
        help="a fingerprint accepted without an attestation; repeat for several",
    )
    sub.add_argument("--ca", metavar="FILE", help="CA certificates for the directory")
    sub.add_argument("--into", required=True, metavar="DIR")
    sub.set_defaults(handler=lambda a: _run(lambda: _trust_fetch(a)))

    sub = subparsers.add_parser(
        "attest",
        help="act as a directory: attest a site's signing key (for tests)",
        formatter_class=fmt,
        description="Write a directory_attestation (docs/governance.md) of the "
        "signing key in a\npublic key block, signed with a directory's "
        "signing.key.",
    )
    sub.add_argument(
        "--key", required=True, metavar="KEY", help="directory signing.key"
    )
    sub.add_argument("--provider", required=True, help="the directory's name")
    sub.add_argument("--subject-id", required=True, help="the site's entity id")
    sub.add_argument(
        "--subject-keys", required=True, metavar="FILE_OR_TEXT", help="its key block"
    )
    sub.add_argument("--key-reference", help="the reference the key is known by")
    sub.add_argument("--valid-days", type=float, help="expires this many days on")
    sub.add_argument("-o", "--output", required=True, metavar="FILE")
    sub.set_defaults(handler=lambda a: _run(lambda: _attest(a)))

    sub = subparsers.add_parser(
        "request",
        help="sign a request for a study, for the sender to pass through",
        formatter_class=fmt,
        description="Write a signed request file; the sender gives it to pack "
        "--request and the\nreceiver verifies the requester against the keys it "
        "pins.",
    )
    sub.add_argument("--key", dest="key_dir", required=True, metavar="DIR")
    sub.add_argument("--requester-id", required=True)
    sub.add_argument("--requester-name", required=True)
    sub.add_argument("--requester-contact", required=True)
    sub.add_argument("--receiver-id", required=True, help="where the data must go")
    sub.add_argument(
        "--expires-in",
        type=float,
        default=168.0,
        metavar="HOURS",
        help="the request expires this many hours from now (default: 168)",
    )
    sub.add_argument("--key-reference")
    sub.add_argument("--attestation", metavar="FILE")
    sub.add_argument("-o", "--output", required=True, metavar="FILE")
    sub.set_defaults(handler=lambda a: _run(lambda: _request(a)))


__all__ = ["register"]
