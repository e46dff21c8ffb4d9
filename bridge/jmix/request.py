"""Signed requests: the requester's assertion, made before the envelope exists.

A requester (a referring clinician, another site) asks for a study. Its signed
request is a small JSON file (docs/governance.md section 1)::

    {"type": "jmix-bridge.request", "version": 1,
     "receiver_id": "org:clinic-b",
     "requester": {"id": ..., "name": ..., "contact": ..., "assertion": {...}}}

The assertion signs paths of the manifest the sender will write, as the sender
assertion does (JCS bytes of ``{path: value}``), but only paths the requester
knows in advance: its own entity, the receiver the data must go to, and its
assertion's own ``expires_at`` and ``key_reference`` when present. The sender
copies ``requester`` into the manifest untouched, so the signature still
verifies there; a receiver checks it against the requester keys it pins.
"""

import copy
import os
from dataclasses import dataclass
from datetime import datetime, timedelta

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from bridge.errors import AuthenticationFailed, EnvelopeError, SchemaViolation

from ._assertion import assertion_key, signed_bytes, signing_key_json, verify_assertion
from ._codec import b64encode, load_json, utc_now, utc_text
from ._shape import ASSERTION, ENTITY
from .trust import Entity

REQUEST_TYPE = "jmix-bridge.request"
REQUESTER_BASE_FIELDS = (
    "requester.id",
    "requester.name",
    "requester.contact",
    "receiver.0.id",
)
REQUESTER_REQUIRED_FIELDS = ("requester.id", "receiver.0.id")
"""What a receiver requires a requester assertion to bind."""

_MAX_REQUEST_BYTES = 64 * 1024


@dataclass(frozen=True)
class Request:
    """A signed request: the requester entity (with assertion) and its receiver."""

    receiver_id: str
    requester: dict

    @property
    def requester_id(self) -> str:
        """The requester's id."""
        return self.requester["id"]

    def as_json(self) -> dict:
        """Return the request file's document."""
        return {
            "type": REQUEST_TYPE,
            "version": 1,
            "receiver_id": self.receiver_id,
            "requester": copy.deepcopy(self.requester),
        }


def make_request(
    key: Ed25519PrivateKey,
    requester: Entity,
    receiver_id: str,
    *,
    valid_for: timedelta | None = None,
    key_reference: str | None = None,
    attestation: dict | None = None,
    now: datetime | None = None,
) -> Request:
    """Sign a request by ``requester`` for data to be delivered to ``receiver_id``.

    ``valid_for`` sets the assertion's ``expires_at``; without it the request
    can be reused until the requester's key is unpinned (docs/governance.md,
    limitation L-G1).
    """
    if not isinstance(receiver_id, str) or not receiver_id:
        raise ValueError(
            f"receiver_id: expected a non-empty string, got {receiver_id!r}"
        )
    assertion: dict = {"signing_key": signing_key_json(key.public_key())}
    fields = list(REQUESTER_BASE_FIELDS)
    if key_reference:
        assertion["key_reference"] = key_reference
        fields.append("requester.assertion.key_reference")
    if valid_for is not None:
        moment = (now or utc_now()).replace(microsecond=0)
        assertion["expires_at"] = utc_text(moment + valid_for)
        fields.append("requester.assertion.expires_at")
    if attestation is not None:
        assertion["directory_attestation"] = copy.deepcopy(attestation)
    assertion["signed_fields"] = fields
    entity = {**requester.as_json(), "assertion": assertion}
    draft = {"requester": entity, "receiver": [{"id": receiver_id}]}
    assertion["signature"] = b64encode(
        key.sign(signed_bytes(draft, fields, "requester.assertion"))
    )
    return Request(receiver_id, entity)


def read_request(data: bytes | str | os.PathLike) -> Request:
    """Read a request file (bytes, or a path) and check its own signature.

    The signature is checked against the key the request names, which proves
    only that the file is intact; whether that key belongs to the requester is
    the receiver's decision. Raises SchemaViolation for a malformed file and
    AuthenticationFailed when the signature does not verify.
    """
    if not isinstance(data, bytes):
        with open(data, "rb") as fh:
            data = fh.read(_MAX_REQUEST_BYTES + 1)
    if len(data) > _MAX_REQUEST_BYTES:
        raise SchemaViolation(f"request: larger than {_MAX_REQUEST_BYTES} bytes")
    try:
        doc = load_json(data, "request")
    except EnvelopeError as exc:
        raise SchemaViolation(str(exc)) from None
    if not isinstance(doc, dict) or doc.get("type") != REQUEST_TYPE:
        raise SchemaViolation(f"request: expected a document of type {REQUEST_TYPE!r}")
    if doc.get("version") != 1:
        raise SchemaViolation(
            f"request.version: expected 1, got {doc.get('version')!r}"
        )
    unknown = set(doc) - {"type", "version", "receiver_id", "requester"}
    if unknown:
        raise SchemaViolation(f"request: unknown key {min(unknown)!r}")
    receiver_id = doc.get("receiver_id")
    if not isinstance(receiver_id, str) or not receiver_id:
        raise SchemaViolation("request.receiver_id: expected a non-empty string")
    ENTITY.check(doc.get("requester"), "request.requester")
    if "assertion" not in doc["requester"]:
        raise SchemaViolation("request.requester: required key 'assertion' is missing")
    ASSERTION.check(doc["requester"]["assertion"], "request.requester.assertion")
    request = Request(receiver_id, doc["requester"])
    draft = {"requester": request.requester, "receiver": [{"id": receiver_id}]}
    verify_assertion(draft, assertion_key(draft["requester"]["assertion"]), "requester")
    return request


def check_request_fits(manifest: dict) -> None:
    """Check, on the sender, that the copied request verifies in ``manifest``.

    Raises ValueError naming the receiver when the request was made for
    another one, and AuthenticationFailed when it does not verify for any
    other reason (a path it signs was changed).
    """
    requester = manifest["requester"]
    receiver_id = manifest["receiver"][0]["id"]
    try:
        verify_assertion(
            manifest,
            assertion_key(requester["assertion"], "requester.assertion"),
            "requester",
        )
    except AuthenticationFailed:
        raise AuthenticationFailed(stage="requester") from None
    except SchemaViolation as exc:
        raise ValueError(
            f"request: does not fit this envelope (receiver {receiver_id!r}): {exc}"
        ) from None
