"""Is this a well-formed envelope from a sender we trust? (docs/envelope.md 8).

This is the cheap check: it needs the manifest and ``manifest.jws`` only, not
the decryption key, so the inbound API can run it on upload.
"""

import os
from dataclasses import dataclass, field

from bridge.errors import (
    EnvelopeError,
    ExpiredAssertion,
    PolicyViolation,
    UnknownSigner,
)

from ._archive import Source
from ._assertion import assertion_key, required_fields, verify_assertion, verify_jws
from ._codec import b64url_decode, load_json, parse_time, utc_now
from ._governance import check_governance
from ._shape import MANIFEST
from .keys import fingerprint
from .trust import DEFAULT_POLICY, OpenPolicy, TrustStore

MANIFEST_LIMIT = 1024 * 1024


@dataclass
class SenderCheck:
    """The outcome of :func:`sender_check`: the verified signer, if any, and notes."""

    fingerprint: str | None
    warnings: list[str] = field(default_factory=list)
    governance: dict = field(default_factory=dict)


def parse_manifest(data: bytes) -> dict:
    """Parse and shape-check ``manifest.json`` bytes."""
    manifest = load_json(data, "manifest.json")
    MANIFEST.check(manifest, "manifest.json")
    return manifest


def read_manifest(src: str | os.PathLike) -> dict:
    """Return the checked manifest of an envelope zip or folder."""
    with Source(src) as source:
        return parse_manifest(source.read_small("manifest.json", MANIFEST_LIMIT))


def _verify_signer(
    manifest: dict, manifest_bytes: bytes, jws: bytes | None, trust: TrustStore
) -> str:
    """Verify the assertion and the JWS against a pinned key; return its fingerprint."""
    assertion = manifest["sender"].get("assertion")
    if assertion is None:
        raise PolicyViolation("the manifest carries no sender assertion")
    public = assertion_key(assertion)
    fp = fingerprint(public)
    pin = trust.lookup(fp)
    if pin is None:
        raise UnknownSigner(f"signing key {fp} is not pinned in the trust store")
    sender_id = manifest["sender"]["id"]
    if pin.sender_id is not None and pin.sender_id != sender_id:
        raise UnknownSigner(
            f"signing key {fp} is pinned for sender {pin.sender_id!r}, "
            f"not for {sender_id!r}"
        )
    verify_assertion(manifest, pin.public_key)
    if jws is None:
        raise PolicyViolation("manifest.jws is missing")
    verify_jws(jws, manifest_bytes, pin.public_key)
    encrypted = "encryption" in manifest.get("security", {})
    missing = set(required_fields(encrypted)) - set(assertion["signed_fields"])
    if missing:
        raise PolicyViolation(
            f"the sender assertion does not bind {', '.join(sorted(missing))}"
        )
    return fp


def sender_check(
    manifest: dict,
    manifest_bytes: bytes,
    jws: bytes | None,
    trust: TrustStore,
    policy: OpenPolicy,
) -> SenderCheck:
    """Run every check that needs no decryption key; see :func:`check_sender`."""
    MANIFEST.check(manifest, "manifest.json")
    result = SenderCheck(None)
    receiver_id = manifest["receiver"][0]["id"]
    if (
        policy.expected_receiver_id is not None
        and receiver_id != policy.expected_receiver_id
    ):
        raise PolicyViolation(
            f"manifest receiver.0.id: expected {policy.expected_receiver_id!r}, "
            f"got {receiver_id!r}"
        )
    if policy.require_encryption and "encryption" not in manifest.get("security", {}):
        raise PolicyViolation(
            "the envelope is not encrypted and the policy requires it"
        )

    try:
        result.fingerprint = _verify_signer(manifest, manifest_bytes, jws, trust)
    except EnvelopeError as exc:
        if policy.trust == "signed":
            raise
        result.warnings.append(
            f"sender signature not verified ({type(exc).__name__}: {exc}); "
            "accepted under transport trust"
        )

    expires = manifest["sender"].get("assertion", {}).get("expires_at")
    if expires and parse_time(expires, "sender.assertion.expires_at") < utc_now():
        note = f"the sender assertion expired at {expires}"
        if policy.expiry == "reject":
            raise ExpiredAssertion(note)
        result.warnings.append(note)

    pin = trust.lookup(result.fingerprint) if result.fingerprint else None
    result.governance = check_governance(manifest, pin, policy, result.warnings)
    return result


def check_sender(
    manifest: dict,
    manifest_jws_bytes: bytes | None,
    trust: TrustStore,
    policy: OpenPolicy = DEFAULT_POLICY,
    manifest_bytes: bytes | None = None,
) -> str | None:
    """Check that a manifest is well formed and signed by a pinned sender.

    Verifies the sender assertion and ``manifest.jws`` against ``trust`` and
    applies ``policy`` (receiver, encryption, expiry, and the governance
    elements of docs/governance.md: requester, attestation, key_reference).
    ``manifest_bytes`` are the exact bytes of ``manifest.json``; when omitted
    they are taken from the JWS payload, which the JWS signature then covers.
    Returns the signer's fingerprint (None under transport trust when no
    signature verified).
    Raises a :class:`~bridge.errors.VerificationFailed` subclass otherwise.
    """
    if manifest_bytes is None:
        manifest_bytes = _jws_payload(manifest_jws_bytes)
        if manifest_bytes is not None and parse_manifest(manifest_bytes) != manifest:
            raise PolicyViolation("manifest.jws signs a different manifest")
    return sender_check(
        manifest, manifest_bytes or b"", manifest_jws_bytes, trust, policy
    ).fingerprint


def _jws_payload(jws: bytes | None) -> bytes | None:
    if not jws:
        return None
    parts = jws.strip().split(b".")
    if len(parts) != 3:
        return None
    try:
        return b64url_decode(parts[1].decode("ascii"), "manifest.jws payload")
    except (UnicodeDecodeError, EnvelopeError):
        return None
