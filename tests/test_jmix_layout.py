"""The zip pack writes: stored entries, instance names, no patient data outside.

docs/envelope.md section 2 (layout) and section 3 (manifest.json carries no
patient data).
"""

import io
import json
import tarfile
import zipfile
from pathlib import Path

import pydicom
import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PublicKey

from bridge.jmix._aead import Opener, derive_key, shared_secret
from bridge.jmix._codec import b64decode
from bridge.jmix._payload import DIALECTS
from tests.test_jmix_roundtrip import Site, make_study, seal

# Patient values no other part of a test study contains, in each spelling the
# library could write them.
PATIENT = {
    "PatientName": "Layoutfamily^Layoutgiven",
    "PatientID": "PID-LAYOUT-4711",
    "PatientBirthDate": "19631102",
}
SPELLINGS = [b"Layoutfamily", b"Layoutgiven", b"PID-LAYOUT-4711", b"19631102"]
SPELLINGS += [b"1963-11-02"]


@pytest.fixture
def sites(tmp_path):
    """A sending and a receiving site."""
    return Site(tmp_path / "keys-a"), Site(tmp_path / "keys-b")


def sop_uids(src: Path) -> set[str]:
    """Return the SOP Instance UIDs of the study in ``src``."""
    return {str(pydicom.dcmread(p).SOPInstanceUID) for p in src.glob("*.dcm")}


def entries(env: Path, envelope_id: str) -> dict[str, zipfile.ZipInfo]:
    """Return the zip's entries by name relative to the envelope folder."""
    with zipfile.ZipFile(env) as zf:
        return {i.filename.removeprefix(envelope_id + "/"): i for i in zf.infolist()}


def read(env: Path, envelope_id: str, name: str) -> bytes:
    """Return one entry's bytes."""
    with zipfile.ZipFile(env) as zf:
        return zf.read(f"{envelope_id}/{name}")


def decrypted_tar(env: Path, envelope_id: str, dialect: str, b: Site) -> bytes:
    """Decrypt the ciphertext with the recipient's key (docs/envelope.md 4)."""
    manifest = json.loads(read(env, envelope_id, "manifest.json"))
    enc = manifest["security"]["encryption"]
    ephemeral = X25519PublicKey.from_public_bytes(
        b64decode(enc["ephemeral_public_key"], "ephemeral_public_key", 32)
    )
    secret = shared_secret(b.keys.encryption_key, ephemeral)
    opener = Opener(
        derive_key(secret, DIALECTS[dialect].info),
        b64decode(enc["iv"], "iv", 12),
        b64decode(enc["auth_tag"], "auth_tag", 16),
    )
    plain = opener.update(read(env, envelope_id, DIALECTS[dialect].ciphertext))
    opener.finish()
    return plain


@pytest.mark.parametrize(
    ("dialect", "encrypted"), [("spec", True), ("rs", True), ("spec", False)]
)
def test_every_zip_entry_is_stored_not_deflated(tmp_path, sites, dialect, encrypted):
    a, b = sites
    src = make_study(tmp_path / "src", count=2)
    result = seal(src, tmp_path / "e.zip", a, b if encrypted else None, dialect=dialect)

    found = entries(tmp_path / "e.zip", result.envelope_id)

    assert "manifest.json" in found
    deflated = [n for n, i in found.items() if i.compress_type != zipfile.ZIP_STORED]
    assert deflated == []


def test_clear_envelope_names_each_instance_by_its_sop_instance_uid(tmp_path, sites):
    a, _ = sites
    src = make_study(tmp_path / "src", count=3)
    result = seal(src, tmp_path / "e.zip", a, None)

    found = entries(tmp_path / "e.zip", result.envelope_id)

    dicom = {n for n in found if n.startswith("payload/dicom/")}
    assert dicom == {f"payload/dicom/{uid}.dcm" for uid in sop_uids(src)}


@pytest.mark.parametrize(("dialect", "prefix"), [("spec", ""), ("rs", "./")])
def test_encrypted_tar_names_each_instance_by_its_sop_instance_uid(
    tmp_path, sites, dialect, prefix
):
    a, b = sites
    src = make_study(tmp_path / "src", count=3)
    result = seal(src, tmp_path / "e.zip", a, b, dialect=dialect)

    plain = decrypted_tar(tmp_path / "e.zip", result.envelope_id, dialect, b)
    with tarfile.open(fileobj=io.BytesIO(plain)) as tar:
        names = {m.name for m in tar.getmembers() if m.isfile()}

    assert {n for n in names if "dicom/" in n} == {
        f"{prefix}dicom/{uid}.dcm" for uid in sop_uids(src)
    }
    assert {f"{prefix}files.json", f"{prefix}metadata.json"} <= names


@pytest.mark.parametrize("encrypted", [True, False])
def test_manifest_and_audit_carry_no_patient_value(tmp_path, sites, encrypted):
    a, b = sites
    src = make_study(tmp_path / "src", count=2, **PATIENT)
    result = seal(src, tmp_path / "e.zip", a, b if encrypted else None)
    env = tmp_path / "e.zip"

    outside = read(env, result.envelope_id, "manifest.json")
    outside += read(env, result.envelope_id, "audit.json")

    assert [s for s in SPELLINGS if s in outside] == []
    if not encrypted:
        # The values are in the study: metadata.json is where they belong.
        inside = read(env, result.envelope_id, "payload/metadata.json")
        assert all(s in inside for s in SPELLINGS if s != b"19631102")
