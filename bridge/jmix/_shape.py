"""Structural checks of the four JSON documents, written as small shape objects.

These mirror the constraints of the published JMIX schemas (required keys, no
unknown keys where the schema forbids them, types, patterns) so that a reader
needs no schema files at run time; the tests check our output against the
published schemas themselves. A failure raises :class:`SchemaViolation` naming the
document and the path of the first bad value.
"""

import re

from bridge.errors import SchemaViolation

from ._codec import is_rfc3339, is_uuid


def _fail(where: str, expected: str, value: object) -> None:
    raise SchemaViolation(f"{where}: expected {expected}, got {value!r:.80}")


class Str:
    """A string, optionally restricted by a regex, an enum or a format."""

    def __init__(self, pattern: str | None = None, enum=(), fmt: str | None = None):
        self.pattern = re.compile(pattern) if pattern else None
        self.enum, self.fmt = tuple(enum), fmt

    def check(self, value: object, where: str) -> None:
        """Raise :class:`SchemaViolation` unless ``value`` fits."""
        if not isinstance(value, str):
            _fail(where, "a string", value)
        if self.pattern and not self.pattern.search(value):
            _fail(where, f"a string matching {self.pattern.pattern}", value)
        if self.enum and value not in self.enum:
            _fail(where, f"one of {', '.join(self.enum)}", value)
        if self.fmt == "date-time" and not is_rfc3339(value):
            _fail(where, "an RFC 3339 date-time", value)
        if self.fmt == "uuid" and not is_uuid(value):
            _fail(where, "a UUID", value)


class Int:
    """A non-negative integer (JSON booleans are not integers)."""

    def check(self, value: object, where: str) -> None:
        """Raise :class:`SchemaViolation` unless ``value`` fits."""
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            _fail(where, "a non-negative integer", value)


class Arr:
    """An array of one shape, with a minimum length."""

    def __init__(self, item, min_items: int = 0):
        self.item, self.min_items = item, min_items

    def check(self, value: object, where: str) -> None:
        """Raise :class:`SchemaViolation` unless ``value`` fits."""
        if not isinstance(value, list):
            _fail(where, "an array", value)
        if len(value) < self.min_items:
            _fail(where, f"at least {self.min_items} item(s)", value)
        for index, item in enumerate(value):
            self.item.check(item, f"{where}[{index}]")


class Obj:
    """An object with required and optional keys; ``open`` allows unknown keys."""

    def __init__(self, required=None, optional=None, open: bool = False):
        self.required, self.optional = required or {}, optional or {}
        self.open = open

    def check(self, value: object, where: str) -> None:
        """Raise :class:`SchemaViolation` unless ``value`` fits."""
        if not isinstance(value, dict):
            _fail(where, "an object", value)
        for key in self.required:
            if key not in value:
                raise SchemaViolation(f"{where}: required key {key!r} is missing")
        shapes = self.required | self.optional
        for key, item in value.items():
            if key in shapes:
                shapes[key].check(item, f"{where}.{key}")
            elif not self.open:
                raise SchemaViolation(f"{where}: unknown key {key!r}")


class OneOf:
    """Exactly one of several shapes."""

    def __init__(self, *shapes):
        self.shapes = shapes

    def check(self, value: object, where: str) -> None:
        """Raise :class:`SchemaViolation` unless exactly one shape fits."""
        fits = 0
        for shape in self.shapes:
            try:
                shape.check(value, where)
                fits += 1
            except SchemaViolation:
                pass
        if fits != 1:
            _fail(where, "a string or a contact point", value)


class Anything:
    """Any JSON value."""

    def check(self, value: object, where: str) -> None:
        """Accept anything."""


_TEXT = Str()
_TIME = Str(fmt="date-time")
_DATE = Str(pattern=r"^\d{4}-\d{2}-\d{2}$")
_FINGERPRINT = Str(pattern=r"^SHA256:[A-Fa-f0-9]+$")
_SIGNING_KEY = Obj(
    {"alg": Str(enum=["Ed25519"]), "public_key": _TEXT, "fingerprint": _FINGERPRINT}
)
_ATTESTATION = Obj(
    {
        "provider": _TEXT,
        "attestation_signature": _TEXT,
        "attestation_timestamp": _TIME,
        "attestation_public_key": _TEXT,
    }
)
ASSERTION = Obj(
    {"signing_key": _SIGNING_KEY, "signed_fields": Arr(_TEXT, 1), "signature": _TEXT},
    {
        "key_reference": _TEXT,
        "expires_at": _TIME,
        "directory_attestation": _ATTESTATION,
    },
)
_CONTACT = OneOf(_TEXT, Obj({"system": _TEXT, "value": _TEXT}))
_ENTITY = Obj(
    {"id": _TEXT}, {"name": _TEXT, "contact": _CONTACT, "assertion": ASSERTION}
)
ENTITY = _ENTITY
_CONSENT = Obj(
    {"status": Str(enum=["granted", "denied", "unknown"])},
    {
        "scope": Arr(
            Str(enum=["treatment", "research", "emergency", "operations", "patient"])
        ),
        "method": _TEXT,
        "signed_on": _DATE,
    },
)
_EXTENSIONS = Obj(
    optional={
        "custom_tags": Arr(_TEXT),
        "consent": _CONSENT,
        "deid": Obj(optional={"keys": Arr(_TEXT)}),
    },
    open=True,
)
_SECURITY = Obj(
    optional={
        "classification": Str(enum=["confidential", "sensitive", "de-identified"]),
        "payload_hash": Str(pattern=r"^sha256:[A-Fa-f0-9]+$"),
        "jws": Obj({"jws_file": _TEXT}),
        "signature": Obj({"alg": _TEXT, "sig": _TEXT}, {"hash": _TEXT}),
        "encryption": Obj(
            {
                "algorithm": Str(enum=["AES-256-GCM"]),
                "ephemeral_public_key": _TEXT,
                "iv": _TEXT,
                "auth_tag": _TEXT,
            }
        ),
    }
)

MANIFEST = Obj(
    {
        "version": _TEXT,
        "id": Str(fmt="uuid"),
        "timestamp": _TIME,
        "sender": _ENTITY,
        "receiver": Arr(_ENTITY, 1),
    },
    {"requester": _ENTITY, "security": _SECURITY, "extensions": _EXTENSIONS},
)

_NAME = Obj(
    optional={
        "family": _TEXT,
        "given": Arr(_TEXT),
        "prefix": _TEXT,
        "suffix": _TEXT,
        "text": _TEXT,
    }
)
_PATIENT = Obj(
    {"id": _TEXT},
    {
        "name": _NAME,
        "dob": _DATE,
        "sex": Str(enum=["M", "F", "O"]),
        "identifiers": Arr(Obj({"system": _TEXT, "value": _TEXT})),
        "verification": Obj(optional={"verified_by": _TEXT, "verified_on": _DATE}),
    },
)
_SERIES = Obj(
    {"series_uid": _TEXT, "modality": _TEXT},
    {"body_part": _TEXT, "instance_count": Int()},
    open=True,
)
METADATA = Obj(
    {"version": _TEXT, "id": Str(fmt="uuid"), "timestamp": _TIME, "patient": _PATIENT},
    {
        "report": Obj(optional={"file": _TEXT}),
        "studies": Obj(
            optional={
                "study_description": _TEXT,
                "study_uid": _TEXT,
                "series": Arr(_SERIES),
            }
        ),
        "extensions": _EXTENSIONS,
    },
)

FILES = Arr(Obj({"file": _TEXT}, {"hash": _TEXT, "size_bytes": Int()}))

_ENTITY_REF = Obj({"id": _TEXT}, {"name": _TEXT})
AUDIT_ENTRY = Obj(
    {"event": _TEXT, "by": _ENTITY_REF, "timestamp": _TIME},
    {
        "to": _ENTITY_REF,
        "assertion": Obj(
            {
                "signing_key": _SIGNING_KEY,
                "signed_fields": Arr(_TEXT, 1),
                "signature": _TEXT,
            }
        ),
    },
)
AUDIT = Obj({"audit": Arr(AUDIT_ENTRY)})
