"""Key files: modes, kinds, fingerprints, masking."""

import stat

import pytest

from bridge.errors import KeyFileError
from bridge.jmix import (
    TrustStore,
    fingerprint,
    generate_key_dir,
    load_encryption_key,
    load_encryption_public,
    load_key_dir,
    load_signing_key,
    load_signing_public,
)


def test_keygen_writes_private_keys_mode_0600(tmp_path):
    info = generate_key_dir(tmp_path / "k")
    for name in ("signing.key", "encryption.key"):
        assert stat.S_IMODE((tmp_path / "k" / name).stat().st_mode) == 0o600
    assert info.signing_fingerprint == fingerprint(
        load_signing_public(tmp_path / "k/signing.pub")
    )
    assert info.encryption_fingerprint.startswith("SHA256:")
    assert info.encryption_fingerprint[7:] == info.encryption_fingerprint[7:].lower()


def test_keygen_refuses_to_overwrite_keys(tmp_path):
    generate_key_dir(tmp_path / "k")
    with pytest.raises(KeyFileError, match="already holds"):
        generate_key_dir(tmp_path / "k")


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644])
def test_private_key_readable_by_others_is_refused(tmp_path, mode):
    generate_key_dir(tmp_path / "k")
    (tmp_path / "k/signing.key").chmod(mode)
    with pytest.raises(KeyFileError, match="chmod 600"):
        load_signing_key(tmp_path / "k/signing.key")


def test_key_of_the_wrong_kind_is_refused_naming_the_file(tmp_path):
    generate_key_dir(tmp_path / "k")
    with pytest.raises(KeyFileError, match=r"encryption\.pub: expected a PEM Ed25519"):
        load_signing_public(tmp_path / "k/encryption.pub")
    with pytest.raises(KeyFileError, match="X25519 private key"):
        load_encryption_key(tmp_path / "k/signing.key")


def test_garbage_and_missing_key_files_are_refused(tmp_path):
    (tmp_path / "junk.pub").write_text("hello")
    with pytest.raises(KeyFileError, match=r"junk\.pub"):
        load_encryption_public(tmp_path / "junk.pub")
    with pytest.raises(KeyFileError, match="cannot read"):
        load_encryption_public(tmp_path / "absent.pub")


def test_key_dir_repr_masks_private_keys(tmp_path):
    generate_key_dir(tmp_path / "k")
    keys = load_key_dir(tmp_path / "k")
    text = repr(keys)
    assert "masked" in text and keys.signing_fingerprint in text
    raw = keys.signing_key.private_bytes_raw().hex()
    assert raw not in text


def test_trust_store_accepts_either_case_of_fingerprint_hex(tmp_path):
    generate_key_dir(tmp_path / "k")
    trust = TrustStore([tmp_path / "k/signing.pub"])
    fp = fingerprint(load_signing_public(tmp_path / "k/signing.pub"))
    assert trust.lookup(fp.upper().replace("SHA256:", "SHA256:")) is not None
    assert trust.lookup("SHA256:" + fp[7:].upper()) is not None
    assert trust.lookup("SHA256:00") is None
