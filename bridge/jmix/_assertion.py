"""The sender assertion and ``manifest.jws`` (docs/envelope.md section 6).

The assertion signs the RFC 8785 (JCS) form of the object ``{path: value}`` for
each path in ``signed_fields``, resolved against the manifest (dot-separated,
numeric segments index arrays). ``manifest.jws`` is a compact JWS (RFC 7515,
``EdDSA`` per RFC 8037) over the exact bytes of ``manifest.json``, with the
signing key's fingerprint as ``kid``.
"""

import rfc8785
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)

from bridge.errors import AuthenticationFailed, MalformedEnvelope, SchemaViolation

from ._codec import b64decode, b64encode, b64url_decode, load_json
from .jws import sign_compact
from .keys import fingerprint, raw_public

BASE_FIELDS = ("id", "timestamp", "sender.id", "sender.name", "receiver.0.id")
PAYLOAD_FIELDS = ("security.payload_hash",)
ENCRYPTION_FIELDS = (
    "security.encryption.ephemeral_public_key",
    "security.encryption.iv",
    "security.encryption.auth_tag",
)


def required_fields(encrypted: bool) -> tuple[str, ...]:
    """Return the paths our profile requires an assertion to bind."""
    return BASE_FIELDS + PAYLOAD_FIELDS + (ENCRYPTION_FIELDS if encrypted else ())


class _Missing(LookupError):
    pass


def resolve(manifest: dict, path: str) -> object:
    """Return the value at a dot path; numeric segments index arrays."""
    node: object = manifest
    for part in path.split("."):
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        else:
            raise _Missing(path)
    return node


def signed_values(doc: dict, fields: list[str], where: str) -> dict:
    """Return ``{path: value}`` for ``fields`` of ``doc``; refuse a missing path."""
    if len(set(fields)) != len(fields):
        raise SchemaViolation(f"{where}.signed_fields: a path is listed twice")
    values = {}
    for index, path in enumerate(fields):
        try:
            values[path] = resolve(doc, path)
        except _Missing:
            raise SchemaViolation(
                f"{where}.signed_fields[{index}]: {path!r} does not resolve "
                "in the document it signs"
            ) from None
    return values


def signed_bytes(
    manifest: dict, fields: list[str], where: str = "sender.assertion"
) -> bytes:
    """Return the JCS bytes the assertion signs; refuse a path that does not resolve."""
    return rfc8785.dumps(signed_values(manifest, fields, where))


def signing_key_json(public: Ed25519PublicKey) -> dict:
    """Return the ``signing_key`` object of an assertion for ``public``."""
    return {
        "alg": "Ed25519",
        "public_key": b64encode(raw_public(public)),
        "fingerprint": fingerprint(public),
    }


def make_assertion(
    manifest: dict,
    key: Ed25519PrivateKey,
    fields: tuple[str, ...],
    expires_at: str | None,
) -> dict:
    """Return a sender assertion over ``fields`` of ``manifest``."""
    assertion = {
        "signing_key": signing_key_json(key.public_key()),
        "signed_fields": list(fields),
        "signature": b64encode(key.sign(signed_bytes(manifest, list(fields)))),
    }
    if expires_at:
        assertion["expires_at"] = expires_at
    return assertion


def assertion_key(assertion: dict, where: str = "sender.assertion") -> Ed25519PublicKey:
    """Return the public key an assertion names, refusing a mismatched fingerprint."""
    raw = b64decode(
        assertion["signing_key"]["public_key"], f"{where}.signing_key.public_key", 32
    )
    public = Ed25519PublicKey.from_public_bytes(raw)
    if assertion["signing_key"]["fingerprint"].lower() != fingerprint(public).lower():
        raise AuthenticationFailed()
    return public


def verify_assertion(
    manifest: dict, public: Ed25519PublicKey, role: str = "sender"
) -> None:
    """Verify the assertion of ``manifest[role]`` with ``public``; raise on failure.

    ``role`` is ``sender`` or ``requester``; both sign paths of the manifest
    the same way (docs/governance.md section 1).
    """
    where = f"{role}.assertion"
    assertion = manifest[role]["assertion"]
    message = signed_bytes(manifest, assertion["signed_fields"], where)
    signature = b64decode(assertion["signature"], f"{where}.signature")
    try:
        public.verify(signature, message)
    except InvalidSignature as exc:
        raise AuthenticationFailed() from exc


def make_jws(manifest_bytes: bytes, key: Ed25519PrivateKey) -> bytes:
    """Return a compact JWS over ``manifest_bytes`` with ``kid`` the key fingerprint."""
    return sign_compact(manifest_bytes, key)


def verify_jws(jws: bytes, manifest_bytes: bytes, public: Ed25519PublicKey) -> None:
    """Verify that ``jws`` signs exactly ``manifest_bytes`` with ``public``."""
    try:
        text = jws.strip().decode("ascii")
        head, body, sig = text.split(".")
        header = load_json(b64url_decode(head, "manifest.jws header"), "manifest.jws")
        payload = b64url_decode(body, "manifest.jws payload")
        signature = b64url_decode(sig, "manifest.jws signature")
        kid = str(header.get("kid", "")).lower()
        if (
            header.get("alg") != "EdDSA"
            or kid != fingerprint(public).lower()
            or payload != manifest_bytes
        ):
            raise AuthenticationFailed()
        public.verify(signature, f"{head}.{body}".encode("ascii"))
    except (ValueError, AttributeError, MalformedEnvelope, InvalidSignature) as exc:
        raise AuthenticationFailed() from exc
