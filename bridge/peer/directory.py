"""An optional directory resolver: public keys fetched by reference, over HTTPS.

It lives with the peer transport, not in :mod:`bridge.jmix`, because it speaks
HTTP; the envelope library only verifies the attestation it returns.

A directory serves ``GET <endpoint>/keys?ref=<key_reference>`` as JSON
(docs/governance.md section 3)::

    {"key_reference": "directory://org/clinic-a#key-ed25519",
     "alg": "Ed25519", "public_key": "<base64 raw>",
     "fingerprint": "SHA256:<hex>",
     "directory_attestation": {...}}

The resolver trusts nothing the directory says on its own: a key is accepted
only when its fingerprint is pinned locally, or when its attestation verifies
with a pinned directory key and attests this key for this reference. Accepted
keys are cached for ``cache_seconds``; refused ones are not.
"""

import logging
import ssl
import threading
import time
from dataclasses import dataclass

import httpx
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from bridge.errors import (
    PolicyViolation,
    RetryableTransportError,
    SchemaViolation,
    TransportError,
    UnknownSigner,
    VerificationFailed,
)
from bridge.jmix._codec import b64decode
from bridge.jmix.attestation import AttestationCheck, verify_attestation
from bridge.jmix.keys import PublicKey, fingerprint, normalise_fingerprint
from bridge.jmix.trust import TrustStore

logger = logging.getLogger(__name__)

_KINDS = {"Ed25519": Ed25519PublicKey, "X25519": X25519PublicKey}
_MAX_ANSWER = 64 * 1024


@dataclass(frozen=True)
class ResolvedKey:
    """A key fetched by reference and accepted, and why it was accepted."""

    reference: str
    public_key: PublicKey
    fingerprint: str
    accepted_by: str  # "pinned" or "attestation"
    attestation: AttestationCheck | None = None


class DirectoryResolver:
    """Fetch public keys by ``key_reference`` from one directory; thread-safe.

    ``pinned`` holds fingerprints accepted without an attestation;
    ``directory_trust`` the directory keys whose attestations are accepted.
    ``verify`` is passed to the HTTPS client (True, a CA file path, or an
    ``ssl.SSLContext``). Only ``https://`` endpoints are accepted.
    """

    def __init__(
        self,
        endpoint: str,
        *,
        directory_trust: TrustStore,
        pinned: tuple[str, ...] | list[str] = (),
        verify: bool | str | ssl.SSLContext = True,
        cache_seconds: float = 3600.0,
        timeout: float = 10.0,
    ):
        if not endpoint.startswith("https://"):
            raise ValueError(f"endpoint: expected an https:// URL, got {endpoint!r}")
        self.endpoint = endpoint.rstrip("/")
        self.directory_trust = directory_trust
        self.pinned = {normalise_fingerprint(fp) for fp in pinned}
        self.cache_seconds = cache_seconds
        self._client = httpx.Client(verify=verify, timeout=timeout)
        self._cache: dict[str, tuple[float, ResolvedKey]] = {}
        self._lock = threading.Lock()

    def resolve(self, reference: str) -> ResolvedKey:
        """Return the key the directory serves for ``reference``, if acceptable.

        Raises UnknownSigner when the key is neither pinned nor attested by a
        trusted directory, another VerificationFailed subclass when its
        attestation fails, SchemaViolation for a malformed answer and
        TransportError when the directory cannot be reached.
        """
        with self._lock:
            cached = self._cache.get(reference)
            if cached and cached[0] > time.monotonic():
                return cached[1]
        doc = self._fetch(reference)
        resolved = self._accept(reference, doc)
        with self._lock:
            self._cache[reference] = (time.monotonic() + self.cache_seconds, resolved)
        logger.info(
            "directory key resolved fingerprint=%s accepted_by=%s",
            resolved.fingerprint,
            resolved.accepted_by,
        )
        return resolved

    def _fetch(self, reference: str) -> dict:
        try:
            answer = self._client.get(
                self.endpoint + "/keys", params={"ref": reference}
            )
        except httpx.HTTPError as exc:
            raise RetryableTransportError(f"directory: {type(exc).__name__}") from exc
        if answer.status_code != 200:
            raise TransportError(f"directory: answered {answer.status_code}")
        if len(answer.content) > _MAX_ANSWER:
            raise SchemaViolation("directory answer: too large")
        try:
            doc = answer.json()
        except ValueError as exc:
            raise SchemaViolation("directory answer: not JSON") from exc
        if not isinstance(doc, dict):
            raise SchemaViolation("directory answer: expected a JSON object")
        return doc

    def _accept(self, reference: str, doc: dict) -> ResolvedKey:
        if doc.get("key_reference") != reference:
            raise PolicyViolation(
                f"directory answer: key_reference {doc.get('key_reference')!r} "
                f"is not the one asked for ({reference!r})"
            )
        kind = _KINDS.get(doc.get("alg"))
        if kind is None:
            raise SchemaViolation(
                f"directory answer: alg: expected Ed25519 or X25519, "
                f"got {doc.get('alg')!r}"
            )
        key = kind.from_public_bytes(
            b64decode(doc.get("public_key"), "directory answer public_key", 32)
        )
        fp = fingerprint(key)
        stated = doc.get("fingerprint")
        if not isinstance(stated, str) or stated.lower() != fp.lower():
            raise PolicyViolation("directory answer: fingerprint does not match key")
        if fp in self.pinned:
            return ResolvedKey(reference, key, fp, "pinned")
        attestation = doc.get("directory_attestation")
        if not isinstance(attestation, dict):
            raise UnknownSigner(
                f"key {fp} for {reference!r} is not pinned and carries no attestation"
            )
        try:
            checked = verify_attestation(
                attestation,
                subject=None,
                public_key=key,
                directory_trust=self.directory_trust,
                key_reference=reference,
            )
        except VerificationFailed:
            logger.warning("directory key refused fingerprint=%s", fp)
            raise
        if checked.key_reference != reference:
            raise PolicyViolation(
                f"directory attestation: attests the key without the reference "
                f"{reference!r}"
            )
        return ResolvedKey(reference, key, fp, "attestation", checked)

    def close(self) -> None:
        """Close the HTTPS connection pool."""
        self._client.close()
