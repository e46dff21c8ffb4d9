"""Small encodings the envelope format uses: base64, hashes, timestamps, strict JSON.

Every decoder here is strict: it raises :class:`~bridge.errors.MalformedEnvelope`
naming the field, so that a lenient decoder can never turn two different inputs
into the same bytes.
"""

import base64
import binascii
import hashlib
import json
import re
from datetime import UTC, datetime

from bridge.errors import MalformedEnvelope, SchemaViolation

CHUNK = 1024 * 1024
"""Every stream in the envelope code moves in chunks of this many bytes."""

MAX_JSON_DEPTH = 64
"""Arrays and objects nest at most this deep in an envelope's JSON documents.

Ours nest five deep; the bound keeps every later walk (schema checks, JCS,
``repr`` in an error message) far from Python's recursion limit.
"""

_RFC3339 = re.compile(
    r"^(\d{4})-(\d{2})-(\d{2})[Tt](\d{2}):(\d{2}):(\d{2})(\.\d+)?"
    r"([Zz]|[+-]\d{2}:\d{2})$"
)
_UUID = re.compile(r"^[0-9a-fA-F]{8}-([0-9a-fA-F]{4}-){3}[0-9a-fA-F]{12}$")
_HASH = re.compile(r"^sha256:([0-9A-Fa-f]{64})$")


def b64encode(data: bytes) -> str:
    """Return standard base64 with padding, as every JMIX binary field is written."""
    return base64.b64encode(data).decode("ascii")


def b64decode(text: object, field: str, length: int | None = None) -> bytes:
    """Decode standard padded base64 from ``field``; refuse anything else."""
    if not isinstance(text, str):
        raise SchemaViolation(f"{field}: expected a base64 string, got {text!r:.40}")
    try:
        data = base64.b64decode(text.encode("ascii"), validate=True)
    except (binascii.Error, UnicodeEncodeError, ValueError) as exc:
        raise SchemaViolation(f"{field}: not valid base64: {text!r:.40}") from exc
    # The decoder ignores the unused low bits of the last character, so "QR=="
    # and "QQ==" both give b"A"; only the canonical spelling is accepted.
    if b64encode(data) != text:
        raise SchemaViolation(f"{field}: not canonical base64: {text!r:.40}")
    if length is not None and len(data) != length:
        raise SchemaViolation(
            f"{field}: expected {length} bytes of base64, got {len(data)}"
        )
    return data


def b64url(data: bytes) -> str:
    """Return unpadded base64url (RFC 7515 section 2), as JWS needs."""
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def b64url_decode(text: str, field: str) -> bytes:
    """Decode unpadded base64url from ``field``; refuse padding and stray bytes."""
    if (
        not isinstance(text, str)
        or not re.fullmatch(r"[A-Za-z0-9_-]*", text)
        or len(text) % 4 == 1
    ):
        raise SchemaViolation(f"{field}: not unpadded base64url")
    data = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    if b64url(data) != text:
        raise SchemaViolation(f"{field}: not canonical base64url")
    return data


def hash_text(digest: bytes) -> str:
    """Write a SHA-256 digest as ``sha256:<lower-case hex>`` (docs/envelope.md 3)."""
    return "sha256:" + digest.hex()


def parse_hash(text: object, field: str) -> bytes:
    """Read ``sha256:<hex>`` (either case of hex) from ``field`` into 32 bytes."""
    match = _HASH.match(text) if isinstance(text, str) else None
    if not match:
        raise SchemaViolation(
            f"{field}: expected 'sha256:' and 64 hex digits, got {text!r:.80}"
        )
    return bytes.fromhex(match.group(1))


def sha256_file(path) -> tuple[int, bytes]:
    """Return (size, SHA-256 digest) of a file, read in chunks."""
    hasher = hashlib.sha256()
    size = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            hasher.update(chunk)
            size += len(chunk)
    return size, hasher.digest()


def utc_text(moment: datetime) -> str:
    """Write ``moment`` as RFC 3339 UTC with a ``Z``, to the second."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def utc_now() -> datetime:
    """Return the current time in UTC, truncated to the second."""
    return datetime.now(UTC).replace(microsecond=0)


def parse_time(text: object, field: str) -> datetime:
    """Read an RFC 3339 timestamp from ``field`` into an aware datetime."""
    if not isinstance(text, str) or not _RFC3339.match(text):
        raise SchemaViolation(f"{field}: expected an RFC 3339 timestamp, got {text!r}")
    try:
        moment = datetime.fromisoformat(text.upper().replace("Z", "+00:00"))
    except ValueError as exc:
        raise SchemaViolation(f"{field}: not a valid date and time: {text!r}") from exc
    return moment


def is_rfc3339(text: str) -> bool:
    """Return whether ``text`` is an RFC 3339 date-time."""
    try:
        parse_time(text, "")
    except SchemaViolation:
        return False
    return True


def is_uuid(text: str) -> bool:
    """Return whether ``text`` is a UUID in its usual hyphenated form."""
    return bool(_UUID.match(text))


def _reject_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def _no_duplicates(pairs: list) -> dict:
    result = {}
    for key, value in pairs:
        if key in result:
            raise ValueError(f"duplicate key {key!r}")
        result[key] = value
    return result


def _depth(doc: object) -> int:
    """Return how deep arrays and objects nest in ``doc``, without recursing."""
    deepest, stack = 0, [(doc, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, dict):
            node = node.values()
        elif not isinstance(node, list):
            continue
        deepest = max(deepest, depth)
        if depth <= MAX_JSON_DEPTH:
            stack.extend((child, depth + 1) for child in node)
    return deepest


def load_json(data: bytes, name: str) -> object:
    """Parse strict UTF-8 JSON: no duplicate keys, NaN or Infinity, nesting bounded.

    Raises :class:`MalformedEnvelope` naming ``name`` for anything else,
    including nesting deeper than :data:`MAX_JSON_DEPTH`.
    """
    try:
        doc = json.loads(
            data.decode("utf-8"),
            object_pairs_hook=_no_duplicates,
            parse_constant=_reject_constant,
        )
    except (UnicodeDecodeError, ValueError, RecursionError) as exc:
        raise MalformedEnvelope(f"{name}: not valid JSON: {exc!s:.200}") from exc
    if _depth(doc) > MAX_JSON_DEPTH:
        raise MalformedEnvelope(
            f"{name}: arrays and objects nest deeper than {MAX_JSON_DEPTH} levels"
        )
    return doc


def dump_json(doc: object) -> bytes:
    """Write a JSON document the way the envelope stores it: UTF-8, indented."""
    return json.dumps(doc, indent=2, ensure_ascii=False).encode("utf-8") + b"\n"
