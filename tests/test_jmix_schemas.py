"""What the library writes validates against the published JMIX schemas."""

import json
import zipfile
from datetime import timedelta

import pytest
from jsonschema import Draft202012Validator

from bridge.errors import SchemaViolation
from bridge.jmix import Entity
from bridge.jmix._shape import MANIFEST
from bridge.jmix.attestation import make_attestation
from bridge.jmix.audit import (
    CREATED,
    FORWARDED,
    RECEIVED,
    SENT,
    VERIFIED,
    append_audit,
    current_audit,
    forwarded_to,
    stamp_sent,
    update_stored_audit,
)
from bridge.jmix.request import make_request
from tests.support.paths import SCHEMAS, require_shared
from tests.test_jmix_roundtrip import RECEIVER, SENDER, Site, make_study, seal, unseal

FORMATS = Draft202012Validator.FORMAT_CHECKER
REFERENCE = "directory://org/site-a#key-ed25519"


@pytest.fixture
def sites(tmp_path):
    """A sending and a receiving site."""
    return Site(tmp_path / "keys-a"), Site(tmp_path / "keys-b")


def validator(name: str) -> Draft202012Validator:
    """Return a validator for one published schema, with format checks on.

    jsonschema checks ``date-time`` only when rfc3339-validator is installed
    (the ``test`` extra); without it every timestamp would pass unchecked.
    """
    assert "date-time" in FORMATS.checkers, "rfc3339-validator is not installed"
    schema = json.loads((require_shared(SCHEMAS) / f"{name}.schema.json").read_text())
    return Draft202012Validator(schema, format_checker=FORMATS)


def test_date_time_format_checker_is_active():
    assert "date-time" in FORMATS.checkers, "rfc3339-validator is not installed"
    assert FORMATS.conforms("2026-01-15T09:30:00Z", "date-time")
    assert not FORMATS.conforms("yesterday", "date-time")
    assert not FORMATS.conforms("2026-01-15 09:30", "date-time")


@pytest.mark.parametrize(
    ("dialect", "encrypted"), [("spec", True), ("rs", True), ("spec", False)]
)
def test_written_documents_validate_against_the_published_schemas(
    tmp_path,
    sites,
    dialect,
    encrypted,
):
    a, b = sites
    src = make_study(tmp_path / "src", count=3)
    result = seal(
        src, tmp_path / "env.zip", a, b if encrypted else None, dialect=dialect
    )
    opened = unseal(
        tmp_path / "env.zip", tmp_path / "out", a, b, require_encryption=encrypted
    )
    with zipfile.ZipFile(tmp_path / "env.zip") as zf:
        manifest = json.loads(zf.read(f"{result.envelope_id}/manifest.json"))
        audit = json.loads(zf.read(f"{result.envelope_id}/audit.json"))

    validator("manifest").validate(manifest)
    validator("audit").validate(audit)
    validator("metadata").validate(
        json.loads((tmp_path / "out/metadata.json").read_text())
    )
    validator("files").validate(json.loads((tmp_path / "out/files.json").read_text()))
    assert opened.manifest == manifest


def test_published_example_manifest_passes_our_own_shape_check():
    example = require_shared(SCHEMAS.parent / "examples" / "manifest.json")
    MANIFEST.check(json.loads(example.read_text()), "manifest.json")


@pytest.mark.parametrize(
    "mutate",
    [
        lambda m: m.pop("receiver"),
        lambda m: m.__setitem__("receiver", []),
        lambda m: m.__setitem__("id", "not-a-uuid"),
        lambda m: m["sender"].__setitem__("nickname", "x"),
        lambda m: m.__setitem__("timestamp", "yesterday"),
        lambda m: m["security"].__setitem__("payload_hash", "md5:00"),
    ],
)
def test_our_shape_check_refuses_what_the_published_schema_refuses(mutate):
    example = require_shared(SCHEMAS.parent / "examples" / "manifest.json")
    manifest = json.loads(example.read_text())
    mutate(manifest)
    assert not validator("manifest").is_valid(manifest)
    with pytest.raises(SchemaViolation):
        MANIFEST.check(manifest, "manifest.json")


@pytest.fixture
def governed(tmp_path, sites):
    """An envelope with every governance element, and its audit after every hop.

    The audit grows as the nodes grow it: ``created`` by pack, ``sent`` by the
    sender's delivery, ``received`` and ``verified`` by the receiver's opener,
    ``forwarded`` by its forwarder (bridge/receiving).
    """
    a, b = sites
    requester, directory = Site(tmp_path / "keys-r"), Site(tmp_path / "keys-d")
    request = make_request(
        requester.keys.signing_key,
        Entity("org:requester", "Requester", "r@requester.example"),
        RECEIVER.id,
        valid_for=timedelta(days=1),
        key_reference="directory://org/requester#key-ed25519",
    )
    attestation = make_attestation(
        directory.keys.signing_key,
        "test-directory",
        SENDER.id,
        a.keys.signing_key.public_key(),
        key_reference=REFERENCE,
        valid_for=timedelta(days=30),
    )
    env = tmp_path / "env.zip"
    result = seal(
        make_study(tmp_path / "src", count=2),
        env,
        a,
        b,
        expires_in=timedelta(hours=2),
        request=request,
        key_reference=REFERENCE,
        attestation=attestation,
    )
    stamp_sent(env, by=SENDER, to=RECEIVER, key=a.keys.signing_key)

    def receive_and_forward(doc: dict) -> None:
        for event in (RECEIVED, VERIFIED):
            append_audit(
                doc,
                event,
                by=RECEIVER,
                key=b.keys.signing_key,
                envelope_id=result.envelope_id,
            )
        append_audit(
            doc,
            FORWARDED,
            by=RECEIVER,
            to=forwarded_to("PACS", 2),
            key=b.keys.signing_key,
            envelope_id=result.envelope_id,
        )

    update_stored_audit(env, receive_and_forward)
    with zipfile.ZipFile(env) as zf:
        manifest = json.loads(zf.read(f"{result.envelope_id}/manifest.json"))
    return manifest, current_audit(env)


def test_manifest_with_every_governance_element_validates(governed):
    manifest, _ = governed
    assertion = manifest["sender"]["assertion"]
    assert {"expires_at", "key_reference", "directory_attestation"} <= set(assertion)
    assert "expires_at" in manifest["requester"]["assertion"]

    validator("manifest").validate(manifest)
    MANIFEST.check(manifest, "manifest.json")


def test_audit_after_every_hop_validates(governed):
    _, audit = governed
    events = [e["event"] for e in audit["audit"]]
    assert events == [CREATED, SENT, RECEIVED, VERIFIED, FORWARDED]

    validator("audit").validate(audit)
