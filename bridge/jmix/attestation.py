"""Directory attestations: a directory vouches that a key belongs to an entity.

An assertion's ``directory_attestation`` carries a compact JWS (RFC 7515,
``EdDSA``) made by a directory's Ed25519 key over a small JSON document that
names the attested key by fingerprint (docs/governance.md section 2)::

    {"type": "jmix-bridge.key-attestation", "version": 1,
     "provider": "example-directory", "subject": "org:clinic-a",
     "key_fingerprint": "SHA256:<hex>",
     "key_reference": "directory://org/clinic-a#key-ed25519",
     "issued_at": "2026-01-15T09:00:00Z", "expires_at": "2027-01-15T09:00:00Z"}

``key_reference`` and ``expires_at`` are optional. A receiver trusts an
attestation only when the JWS verifies with a directory key it pins, the
document attests exactly the key that signed the assertion, for the entity
that carries the assertion, and has not expired. No directory is needed to
decrypt or to accept an envelope from a pinned sender; an attestation only adds
to what the receiver records.
"""

import json
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from bridge.errors import (
    AuthenticationFailed,
    ExpiredAssertion,
    MalformedEnvelope,
    PolicyViolation,
    SchemaViolation,
    UnknownSigner,
)

from ._codec import (
    b64decode,
    b64encode,
    b64url_decode,
    load_json,
    parse_time,
    utc_now,
    utc_text,
)
from .jws import sign_compact, verify_compact
from .keys import PublicKey, fingerprint, normalise_fingerprint, raw_public
from .trust import TrustStore

ATTESTATION_TYPE = "jmix-bridge.key-attestation"
_REQUIRED = ("type", "version", "provider", "subject", "key_fingerprint", "issued_at")
_OPTIONAL = ("key_reference", "expires_at")


@dataclass(frozen=True)
class AttestationCheck:
    """A verified attestation: who attested which key, and when."""

    provider: str
    directory_fingerprint: str
    subject: str
    key_fingerprint: str
    key_reference: str | None
    issued_at: str

    def as_json(self) -> dict:
        """Return the record a receiver stores (no key material, no patient data)."""
        return {
            "status": "verified",
            "provider": self.provider,
            "directory_key": self.directory_fingerprint,
            "subject": self.subject,
            "issued_at": self.issued_at,
        }


def make_attestation(
    directory_key: Ed25519PrivateKey,
    provider: str,
    subject: str,
    subject_public: PublicKey,
    *,
    key_reference: str | None = None,
    valid_for: timedelta | None = None,
    now: datetime | None = None,
) -> dict:
    """Return a ``directory_attestation`` object for ``subject_public``.

    This is the directory's side, provided so that tests and small deployments
    can act as their own directory (``jmix-bridge attest``).
    """
    for name, value in (("provider", provider), ("subject", subject)):
        if not isinstance(value, str) or not value:
            raise ValueError(f"{name}: expected a non-empty string, got {value!r}")
    moment = (now or utc_now()).replace(microsecond=0)
    doc = {
        "type": ATTESTATION_TYPE,
        "version": 1,
        "provider": provider,
        "subject": subject,
        "key_fingerprint": fingerprint(subject_public),
        "issued_at": utc_text(moment),
    }
    if key_reference:
        doc["key_reference"] = key_reference
    if valid_for is not None:
        doc["expires_at"] = utc_text(moment + valid_for)
    payload = json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()
    return {
        "provider": provider,
        "attestation_signature": sign_compact(payload, directory_key).decode("ascii"),
        "attestation_timestamp": doc["issued_at"],
        "attestation_public_key": b64encode(raw_public(directory_key.public_key())),
    }


def _read_document(payload: bytes) -> dict:
    try:
        doc = load_json(payload, "directory attestation")
    except MalformedEnvelope as exc:
        raise SchemaViolation(str(exc)) from None
    if not isinstance(doc, dict):
        raise SchemaViolation("directory attestation: expected a JSON object")
    missing = [k for k in _REQUIRED if k not in doc]
    if missing:
        raise SchemaViolation(
            f"directory attestation: required key {missing[0]!r} is missing"
        )
    unknown = set(doc) - set(_REQUIRED) - set(_OPTIONAL)
    if unknown:
        raise SchemaViolation(f"directory attestation: unknown key {min(unknown)!r}")
    if doc["type"] != ATTESTATION_TYPE or doc["version"] != 1:
        raise SchemaViolation(
            f"directory attestation: expected type {ATTESTATION_TYPE!r} version 1, "
            f"got {doc['type']!r} version {doc['version']!r}"
        )
    for key in ("provider", "subject", "key_fingerprint", "key_reference"):
        if key in doc and not isinstance(doc[key], str):
            raise SchemaViolation(f"directory attestation: {key}: expected a string")
    return doc


def read_attestation_unverified(attestation: dict) -> dict:
    """Return the signed document of an attestation without verifying it.

    For a sender checking, before it ships one, that an attestation names its
    own key; never for a trust decision.
    """
    jws = (
        attestation.get("attestation_signature")
        if isinstance(attestation, dict)
        else None
    )
    parts = jws.split(".") if isinstance(jws, str) else []
    if len(parts) != 3:
        raise SchemaViolation("directory_attestation.attestation_signature: not a JWS")
    return _read_document(b64url_decode(parts[1], "directory attestation payload"))


def verify_attestation(
    attestation: dict,
    *,
    subject: str | None,
    public_key: PublicKey,
    directory_trust: TrustStore,
    key_reference: str | None = None,
    now: datetime | None = None,
) -> AttestationCheck:
    """Verify that a pinned directory attests ``public_key`` for ``subject``.

    ``subject=None`` skips the entity check (a key fetched by reference has no
    envelope around it). Raises UnknownSigner when the directory key is not
    pinned (or pinned for another provider), AuthenticationFailed when the JWS
    does not verify, PolicyViolation when it attests another key, subject or
    reference, ExpiredAssertion when it has expired, and SchemaViolation when
    it is not the document docs/governance.md describes.
    """
    where = "directory_attestation"
    jws = attestation.get("attestation_signature")
    if not isinstance(jws, str):
        raise SchemaViolation(f"{where}.attestation_signature: expected a JWS string")
    raw = b64decode(
        attestation.get("attestation_public_key"), f"{where}.attestation_public_key", 32
    )
    named = fingerprint(Ed25519PublicKey.from_public_bytes(raw))
    pin = directory_trust.lookup(named)
    if pin is None:
        raise UnknownSigner(
            f"{where}: made by directory key {named}, which is not trusted"
        )
    provider = attestation.get("provider")
    if pin.sender_id is not None and pin.sender_id != provider:
        raise UnknownSigner(
            f"{where}: directory key {named} is trusted for provider "
            f"{pin.sender_id!r}, not {provider!r}"
        )
    try:
        payload, signer = verify_compact(jws.encode("ascii"), directory_trust)
    except UnicodeEncodeError as exc:
        raise SchemaViolation(f"{where}: not a compact JWS") from exc
    except AuthenticationFailed:
        raise AuthenticationFailed(stage="attestation") from None
    if signer != named:
        raise PolicyViolation(
            f"{where}: signed by {signer}, but names {named} as the directory key"
        )

    doc = _read_document(payload)
    if doc["provider"] != provider:
        raise PolicyViolation(
            f"{where}: provider {provider!r} does not match the signed "
            f"document's {doc['provider']!r}"
        )
    if doc["issued_at"] != attestation.get("attestation_timestamp"):
        raise PolicyViolation(
            f"{where}: attestation_timestamp does not match the signed issued_at"
        )
    wanted = fingerprint(public_key)
    try:
        attested = normalise_fingerprint(doc["key_fingerprint"])
    except ValueError as exc:
        raise SchemaViolation(f"{where}: key_fingerprint: {exc}") from None
    if attested != wanted:
        raise PolicyViolation(f"{where}: attests key {attested}, not the key {wanted}")
    if subject is not None and doc["subject"] != subject:
        raise PolicyViolation(
            f"{where}: attests the key for {doc['subject']!r}, not for {subject!r}"
        )
    if key_reference and doc.get("key_reference", key_reference) != key_reference:
        raise PolicyViolation(
            f"{where}: attests key_reference {doc['key_reference']!r}, "
            f"not {key_reference!r}"
        )
    moment = now or utc_now()
    if parse_time(doc["issued_at"], f"{where} issued_at") > moment + timedelta(
        minutes=5
    ):
        raise PolicyViolation(f"{where}: issued in the future ({doc['issued_at']})")
    if "expires_at" in doc and parse_time(doc["expires_at"], where) < moment:
        raise ExpiredAssertion(f"{where}: expired at {doc['expires_at']}")
    return AttestationCheck(
        provider=doc["provider"],
        directory_fingerprint=signer,
        subject=doc["subject"],
        key_fingerprint=attested,
        key_reference=doc.get("key_reference"),
        issued_at=doc["issued_at"],
    )
