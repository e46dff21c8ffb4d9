"""Compact JWS (RFC 7515) with EdDSA (RFC 8037), signed by our Ed25519 keys.

``manifest.jws`` and the delivery receipts of the receiving side are both
compact JWS whose ``kid`` is the signing key's fingerprint, so that a verifier
finds the pinned key without trusting anything else in the token.
"""

import json

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.errors import (
    AuthenticationFailed,
    MalformedEnvelope,
    SchemaViolation,
    UnknownSigner,
)

from ._codec import b64url, b64url_decode, load_json
from .keys import fingerprint
from .trust import TrustStore


def sign_compact(payload: bytes, key: Ed25519PrivateKey, typ: str = "JOSE") -> bytes:
    """Return a compact JWS over ``payload`` with ``kid`` the key's fingerprint."""
    header = {"alg": "EdDSA", "kid": fingerprint(key.public_key()), "typ": typ}
    head = b64url(json.dumps(header, separators=(",", ":")).encode())
    signing_input = f"{head}.{b64url(payload)}".encode("ascii")
    return signing_input + b"." + b64url(key.sign(signing_input)).encode("ascii")


def verify_compact(jws: bytes, trust: TrustStore) -> tuple[bytes, str]:
    """Verify ``jws`` against the pinned keys; return (payload, signer fingerprint).

    Raises SchemaViolation when it is not a compact JWS, UnknownSigner when its
    ``kid`` names no pinned key, and AuthenticationFailed when the signature
    does not verify.
    """
    try:
        head, body, sig = jws.strip().decode("ascii").split(".")
        header = load_json(b64url_decode(head, "JWS header"), "JWS header")
    except (UnicodeDecodeError, ValueError, MalformedEnvelope) as exc:
        raise SchemaViolation("not a compact JWS") from exc
    if not isinstance(header, dict) or header.get("alg") != "EdDSA":
        raise SchemaViolation("JWS header: expected alg EdDSA")
    pin = trust.lookup(str(header.get("kid", "")))
    if pin is None:
        raise UnknownSigner("JWS signed by a key that is not pinned")
    try:
        pin.public_key.verify(
            b64url_decode(sig, "JWS signature"), f"{head}.{body}".encode("ascii")
        )
    except InvalidSignature as exc:
        raise AuthenticationFailed() from exc
    return b64url_decode(body, "JWS payload"), fingerprint(pin.public_key)
