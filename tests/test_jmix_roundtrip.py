"""Pack and open real DICOM files shipped with pydicom; bytes come back unchanged."""

import shutil
import zipfile
from pathlib import Path

import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from bridge.errors import (
    AuthenticationFailed,
    IntegrityError,
    MalformedEnvelope,
    PolicyViolation,
    UnknownSigner,
    UnpackableStudy,
)
from bridge.jmix import (
    Entity,
    OpenPolicy,
    TrustStore,
    check_sender,
    generate_key_dir,
    load_key_dir,
    open_envelope,
    pack,
    read_manifest,
    verify_envelope,
)

SENDER = Entity("org:site-a", "Site A", "pacs@site-a.example")
RECEIVER = Entity("org:site-b", "Site B", "pacs@site-b.example")
SHIPPED = [
    "CT_small.dcm",  # explicit VR little endian, private tags
    "MR_small_bigendian.dcm",  # explicit VR big endian
    "MR_small_implicit.dcm",  # implicit VR little endian
    "JPEG2000.dcm",  # JPEG 2000
    "JPEG-lossy.dcm",  # JPEG Extended (process 2 and 4), 12-bit
    "SC_rgb_rle_2frame.dcm",  # RLE, multi-frame
    "J2K_pixelrep_mismatch.dcm",  # ISO 2022 IR 13/87 (Japanese) character sets
]


def shipped(name: str) -> Path:
    """Return a pydicom test file without ever downloading one (skip if absent)."""
    path = get_testdata_file(name, download=False)
    if not path:
        pytest.skip(f"pydicom does not ship {name} in this installation")
    return Path(path)


def make_study(
    folder: Path, count: int = 3, base: str = "CT_small.dcm", **attrs
) -> Path:
    """Write ``count`` copies of a shipped file as one study with new UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    study, series = generate_uid(), [generate_uid(), generate_uid()]
    for index in range(count):
        ds = pydicom.dcmread(shipped(base))
        ds.StudyInstanceUID = study
        ds.SeriesInstanceUID = series[index % 2]
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        for key, value in attrs.items():
            setattr(ds, key, value)
        ds.save_as(folder / f"im{index}.dcm")
    return folder


class Site:
    """A key folder with its private keys loaded."""

    def __init__(self, folder: Path):
        generate_key_dir(folder)
        self.folder = folder
        self.keys = load_key_dir(folder)
        self.trust = TrustStore([folder / "signing.pub"])


@pytest.fixture
def sites(tmp_path):
    """A sending and a receiving site."""
    return Site(tmp_path / "keys-a"), Site(tmp_path / "keys-b")


def seal(src, out, a: Site, b: Site | None, **kw):
    """Pack ``src`` from site ``a`` to site ``b`` (clear when ``b`` is None)."""
    return pack(
        src,
        out,
        sender=SENDER,
        signing_key=a.keys.signing_key,
        receiver=RECEIVER,
        recipient_public=b.keys.encryption_key.public_key() if b else None,
        **kw,
    )


def unseal(src, dest, a: Site, b: Site, **policy):
    """Open ``src`` at site ``b``, trusting site ``a``."""
    return open_envelope(
        src,
        dest,
        encryption_key=b.keys.encryption_key,
        trust=a.trust,
        policy=OpenPolicy(**policy),
    )


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("dialect", ["spec", "rs"])
def test_shipped_file_comes_back_byte_identical(tmp_path, sites, name, dialect):
    a, b = sites
    src = tmp_path / "src"
    src.mkdir()
    shutil.copy(shipped(name), src / name)

    result = seal(src, tmp_path / "env.zip", a, b, dialect=dialect)
    opened = unseal(tmp_path / "env.zip", tmp_path / "out", a, b)

    assert opened.dialect == dialect
    assert result.instance_count == 1
    assert [p.read_bytes() for p in opened.dicom_files] == [(src / name).read_bytes()]


def test_multi_instance_study_metadata_counts_every_series(tmp_path, sites):
    a, b = sites
    src = make_study(tmp_path / "src", count=5)
    seal(src, tmp_path / "env.zip", a, b)
    opened = unseal(tmp_path / "env.zip", tmp_path / "out", a, b)

    series = opened.metadata["studies"]["series"]
    assert sorted(s["instance_count"] for s in series) == [2, 3]
    assert {s["modality"] for s in series} == {"CT"}
    originals = sorted(p.read_bytes() for p in src.iterdir())
    assert sorted(p.read_bytes() for p in opened.dicom_files) == originals


@pytest.mark.parametrize(
    ("charset", "name", "family", "given"),
    [
        ("ISO_IR 100", "Müller^Jürgen", "Müller", ["Jürgen"]),
        ("ISO_IR 192", "山田^太郎", "山田", ["太郎"]),
        ("ISO_IR 144", "Иванов^Иван", "Иванов", ["Иван"]),
    ],
)
def test_non_ascii_patient_name_is_decoded_with_its_character_set(
    tmp_path, sites, charset, name, family, given
):
    a, b = sites
    src = make_study(tmp_path / "src", count=1, SpecificCharacterSet=charset)
    path = next(src.iterdir())
    ds = pydicom.dcmread(path)
    ds.PatientName = name
    ds.PatientBirthDate, ds.PatientSex = "19750214", "F"
    ds.save_as(path)

    seal(src, tmp_path / "env.zip", a, b)
    opened = unseal(tmp_path / "env.zip", tmp_path / "out", a, b)

    patient = opened.metadata["patient"]
    assert patient["name"] == {"family": family, "given": given}
    assert patient["dob"] == "1975-02-14"
    assert patient["sex"] == "F"
    assert opened.dicom_files[0].read_bytes() == path.read_bytes()


def test_empty_patient_id_gets_the_fallback(tmp_path, sites):
    a, b = sites
    src = make_study(tmp_path / "src", count=1, PatientID="", PatientSex="X")
    seal(src, tmp_path / "env.zip", a, b, fallback_patient_id="SITE-A-UNKNOWN")
    opened = unseal(tmp_path / "env.zip", tmp_path / "out", a, b)
    assert opened.metadata["patient"]["id"] == "SITE-A-UNKNOWN"
    assert "sex" not in opened.metadata["patient"]


def test_clear_envelope_opens_only_when_policy_allows_it(tmp_path, sites):
    a, b = sites
    src = make_study(tmp_path / "src", count=2)
    for dialect in ("spec", "rs"):
        env = tmp_path / f"clear-{dialect}.zip"
        seal(src, env, a, None, dialect=dialect)
        with pytest.raises(PolicyViolation):
            unseal(env, tmp_path / f"no-{dialect}", a, b)
        opened = unseal(
            env, tmp_path / f"yes-{dialect}", a, b, require_encryption=False
        )
        assert opened.dialect == dialect
        assert len(opened.dicom_files) == 2


def test_envelope_folder_opens_like_its_zip(tmp_path, sites):
    a, b = sites
    src = make_study(tmp_path / "src", count=2)
    result = seal(src, tmp_path / "env.zip", a, b)
    with zipfile.ZipFile(tmp_path / "env.zip") as zf:
        zf.extractall(tmp_path / "unzipped")
    folder = tmp_path / "unzipped" / result.envelope_id
    opened = unseal(folder, tmp_path / "out", a, b)
    assert opened.envelope_id == result.envelope_id


def test_pack_refuses_files_from_two_studies(tmp_path, sites):
    a, b = sites
    make_study(tmp_path / "src" / "one", count=1)
    make_study(tmp_path / "src" / "two", count=1)
    with pytest.raises(UnpackableStudy, match="more than one study"):
        seal(tmp_path / "src", tmp_path / "env.zip", a, b)
    assert not (tmp_path / "env.zip").exists()


def test_pack_refuses_instances_that_disagree_on_patient_id(tmp_path, sites):
    a, b = sites
    src = make_study(tmp_path / "src", count=2)
    path = sorted(src.iterdir())[0]
    ds = pydicom.dcmread(path)
    ds.PatientID = "SOMEONE-ELSE"
    ds.save_as(path)
    with pytest.raises(UnpackableStudy, match="Patient ID"):
        seal(src, tmp_path / "env.zip", a, b)
    assert list(tmp_path.glob("*.zip*")) == []


def test_pack_skips_and_counts_files_that_are_not_dicom(tmp_path, sites):
    a, b = sites
    src = make_study(tmp_path / "src", count=2)
    (src / "notes.txt").write_text("not an image")
    (src / "sub").mkdir()
    (src / "sub" / "DICOMDIR.bak").write_bytes(b"\0" * 200)
    result = seal(src, tmp_path / "env.zip", a, b)
    assert (result.instance_count, result.skipped_files) == (2, 2)


def test_verify_writes_nothing_and_checks_everything(tmp_path, sites):
    a, b = sites
    src = make_study(tmp_path / "src", count=2)
    seal(src, tmp_path / "env.zip", a, b)
    before = sorted(tmp_path.iterdir())
    checked = verify_envelope(
        tmp_path / "env.zip", encryption_key=b.keys.encryption_key, trust=a.trust
    )
    assert checked.signer_fingerprint == a.keys.signing_fingerprint
    assert checked.dicom_files == []
    assert sorted(tmp_path.iterdir()) == before
    with pytest.raises(AuthenticationFailed):
        verify_envelope(
            tmp_path / "env.zip", encryption_key=a.keys.encryption_key, trust=a.trust
        )


def test_open_refuses_a_non_empty_destination(tmp_path, sites):
    a, b = sites
    seal(make_study(tmp_path / "src", count=1), tmp_path / "env.zip", a, b)
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    with pytest.raises(ValueError, match="not an empty folder"):
        unseal(tmp_path / "env.zip", tmp_path / "out", a, b)
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["keep.txt"]


def test_open_into_an_existing_empty_destination(tmp_path, sites):
    a, b = sites
    seal(make_study(tmp_path / "src", count=1), tmp_path / "env.zip", a, b)
    (tmp_path / "out").mkdir()
    opened = unseal(tmp_path / "env.zip", tmp_path / "out", a, b)
    assert opened.dicom_files[0].parent == tmp_path / "out" / "dicom"


def entry_span(data: bytes, info: zipfile.ZipInfo) -> tuple[int, int]:
    """Return where an entry's stored bytes start and end in the zip ``data``."""
    # The data starts after the local header (APPNOTE 4.3.7), whose extra field
    # differs from the central directory's.
    local = data[info.header_offset : info.header_offset + 30]
    start = info.header_offset + 30 + int.from_bytes(local[26:28], "little")
    start += int.from_bytes(local[28:30], "little")
    return start, start + info.compress_size


def flipped_copy(tmp_path: Path, data: bytes, offset: int) -> Path:
    """Write ``data`` with one bit of the byte at ``offset`` flipped; return it."""
    bad = bytearray(data)
    bad[offset] ^= 0x40
    (tmp_path / "bad.zip").write_bytes(bad)
    return tmp_path / "bad.zip"


@pytest.fixture
def sealed(tmp_path, sites):
    """An encrypted envelope's bytes and its zip entries by short name."""
    a, b = sites
    seal(make_study(tmp_path / "src", count=1), tmp_path / "env.zip", a, b)
    with zipfile.ZipFile(tmp_path / "env.zip") as zf:
        infos = {i.filename.rsplit("/", 1)[-1]: i for i in zf.infolist()}
    return (tmp_path / "env.zip").read_bytes(), infos


KEPT = ["env.zip", "keys-a", "keys-b", "src"]


@pytest.mark.parametrize("where", ["first", "middle", "last"])
def test_flipped_ciphertext_byte_says_only_authentication_failed(
    tmp_path, sites, sealed, where
):
    # The zip's CRC-32 of the ciphertext entry also catches the flip; it must
    # not surface as an error of its own (an oracle on which check caught it).
    a, b = sites
    data, infos = sealed
    start, end = entry_span(data, infos["payload.encrypted"])
    offset = {"first": start, "middle": (start + end) // 2, "last": end - 1}[where]
    bad = flipped_copy(tmp_path, data, offset)

    for attempt in (
        lambda: unseal(bad, tmp_path / "out", a, b),
        lambda: verify_envelope(
            bad, encryption_key=b.keys.encryption_key, trust=a.trust
        ),
    ):
        with pytest.raises(AuthenticationFailed) as caught:
            attempt()
        assert str(caught.value) == "authentication failed"
        assert caught.value.stage == "payload"
        assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip", *KEPT]


@pytest.mark.parametrize(
    ("region", "error", "message"),
    [
        ("manifest.json data", IntegrityError, "manifest.json: corrupt zip entry"),
        ("audit.json data", IntegrityError, "audit.json: corrupt zip entry"),
        ("ciphertext local header", MalformedEnvelope, "unreadable"),
        ("end of central directory", MalformedEnvelope, "not a readable zip"),
    ],
)
def test_flipped_byte_outside_the_ciphertext_gets_its_specific_error(
    tmp_path, sites, sealed, region, error, message
):
    a, b = sites
    data, infos = sealed
    offsets = {
        "manifest.json data": entry_span(data, infos["manifest.json"])[0] + 5,
        "audit.json data": entry_span(data, infos["audit.json"])[0] + 5,
        # The local header's signature (APPNOTE 4.3.7).
        "ciphertext local header": infos["payload.encrypted"].header_offset,
        "end of central directory": data.rindex(b"PK\x05\x06"),
    }
    bad = flipped_copy(tmp_path, data, offsets[region])

    with pytest.raises(error, match=message) as caught:
        unseal(bad, tmp_path / "out", a, b)
    assert not isinstance(caught.value, AuthenticationFailed)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.zip", *KEPT]


def test_check_sender_needs_no_decryption_key(tmp_path, sites):
    a, b = sites
    result = seal(make_study(tmp_path / "src", count=1), tmp_path / "env.zip", a, b)
    manifest = read_manifest(tmp_path / "env.zip")
    with zipfile.ZipFile(tmp_path / "env.zip") as zf:
        jws = zf.read(f"{result.envelope_id}/manifest.jws")
    assert check_sender(manifest, jws, a.trust) == a.keys.signing_fingerprint
    with pytest.raises(UnknownSigner):
        check_sender(manifest, jws, b.trust)
    with pytest.raises(PolicyViolation):
        check_sender(manifest, None, a.trust)


def test_signer_pinned_for_its_sender_id_is_accepted_only_for_it(tmp_path, sites):
    a, b = sites
    seal(make_study(tmp_path / "src", count=1), tmp_path / "env.zip", a, b)
    key = a.keys.signing_key.public_key()
    ok = TrustStore([(SENDER.id, key)])
    wrong = TrustStore([("org:impostor", key)])
    opened = open_envelope(
        tmp_path / "env.zip",
        tmp_path / "out",
        encryption_key=b.keys.encryption_key,
        trust=ok,
    )
    assert opened.sender_id == SENDER.id
    with pytest.raises(UnknownSigner):
        verify_envelope(
            tmp_path / "env.zip", encryption_key=b.keys.encryption_key, trust=wrong
        )


def test_transport_trust_records_an_unverified_signature(tmp_path, sites):
    a, b = sites
    seal(make_study(tmp_path / "src", count=1), tmp_path / "env.zip", a, b)
    opened = verify_envelope(
        tmp_path / "env.zip",
        encryption_key=b.keys.encryption_key,
        trust=TrustStore(),
        policy=OpenPolicy(trust="transport"),
    )
    assert opened.signer_fingerprint is None
    assert any("not verified" in w for w in opened.warnings)


def test_a_file_changed_in_the_clear_payload_fails_integrity(tmp_path, sites):
    a, b = sites
    result = seal(make_study(tmp_path / "src", count=1), tmp_path / "env.zip", a, None)
    with zipfile.ZipFile(tmp_path / "env.zip") as zf:
        zf.extractall(tmp_path / "x")
    folder = tmp_path / "x" / result.envelope_id
    dicom = next((folder / "payload" / "dicom").iterdir())
    data = bytearray(dicom.read_bytes())
    data[-1] ^= 1
    dicom.write_bytes(data)
    with pytest.raises(IntegrityError):
        unseal(folder, tmp_path / "out", a, b, require_encryption=False)
    assert not (tmp_path / "out").exists()
