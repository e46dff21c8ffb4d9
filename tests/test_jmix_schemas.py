"""What the library writes validates against the published JMIX schemas."""

import json
import zipfile

import pytest
from jsonschema import Draft202012Validator

from bridge.errors import SchemaViolation
from bridge.jmix._shape import MANIFEST
from tests.support.paths import SCHEMAS, require_shared
from tests.test_jmix_roundtrip import Site, make_study, seal, unseal


@pytest.fixture
def sites(tmp_path):
    """A sending and a receiving site."""
    return Site(tmp_path / "keys-a"), Site(tmp_path / "keys-b")


def validator(name: str) -> Draft202012Validator:
    """Return a validator for one published schema, with format checks on."""
    schema = json.loads((require_shared(SCHEMAS) / f"{name}.schema.json").read_text())
    return Draft202012Validator(
        schema, format_checker=Draft202012Validator.FORMAT_CHECKER
    )


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
