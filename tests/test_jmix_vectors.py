"""The committed vector files: each opens, or fails with the error it names."""

import json
import shutil
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)

from bridge import errors
from bridge.jmix import OpenPolicy, TrustStore, load_key_dir, open_envelope
from bridge.jmix import load_signing_public as load_pub
from bridge.jmix._aead import Opener, derive_key, shared_secret
from bridge.jmix._payload import DIALECTS

VECTORS = Path(__file__).parent / "vectors"
CASES = sorted(p.parent.name for p in VECTORS.glob("*/expect.json"))


@pytest.fixture(scope="module")
def receiver_key(tmp_path_factory):
    """The receiver's private keys, copied out of git with mode 0600."""
    folder = tmp_path_factory.mktemp("keys") / "receiver"
    shutil.copytree(VECTORS / "keys" / "receiver", folder)
    for key in folder.glob("*.key"):
        key.chmod(0o600)
    return load_key_dir(folder).encryption_key


def test_vector_cases_cover_every_refusal():
    outcomes = {
        json.loads((VECTORS / c / "expect.json").read_text())["outcome"] for c in CASES
    }
    assert outcomes >= {
        "opens",
        "AuthenticationFailed",
        "UnknownSigner",
        "IntegrityError",
        "PolicyViolation",
        "ExpiredAssertion",
        "SchemaViolation",
        "UnsafeEntry",
    }


@pytest.mark.parametrize("case", CASES)
def test_vector_has_its_stated_outcome(case, tmp_path, receiver_key):
    expect = json.loads((VECTORS / case / "expect.json").read_text())
    policy_args = dict(expect["policy"])
    pinned_id = policy_args.pop("pin_sender_id", None)
    trust = TrustStore([(pinned_id, load_pub(VECTORS / "keys/sender/signing.pub"))])
    dest = tmp_path / "out"

    def run():
        return open_envelope(
            VECTORS / case / "envelope.zip",
            dest,
            encryption_key=receiver_key,
            trust=trust,
            policy=OpenPolicy(**policy_args),
        )

    if expect["outcome"] == "opens":
        opened = run()
        assert opened.dicom_files and all(p.is_file() for p in opened.dicom_files)
    else:
        with pytest.raises(getattr(errors, expect["outcome"])) as caught:
            run()
        assert not dest.exists()
        assert list(tmp_path.iterdir()) == []
        if isinstance(caught.value, errors.AuthenticationFailed):
            assert str(caught.value) == "authentication failed"


def test_key_derivation_matches_the_known_answers():
    kat = json.loads((VECTORS / "kdf-known-answer.json").read_text())
    alice = X25519PrivateKey.from_private_bytes(bytes.fromhex(kat["alice_private"]))
    bob = X25519PublicKey.from_public_bytes(bytes.fromhex(kat["bob_public"]))
    secret = shared_secret(alice, bob)
    assert secret.hex() == kat["shared_secret"]
    for case in kat["cases"]:
        assert DIALECTS[case["dialect"]].info == case["info"].encode()
        key = derive_key(secret, case["info"].encode())
        assert key.hex() == case["key"]
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes

        enc = Cipher(
            algorithms.AES(key), modes.GCM(bytes.fromhex(kat["iv"]))
        ).encryptor()
        cipher = enc.update(kat["plaintext"].encode()) + enc.finalize()
        assert enc.tag.hex() == case["tag"]
        opener = Opener(key, bytes.fromhex(kat["iv"]), enc.tag)
        assert opener.update(cipher) == kat["plaintext"].encode()
        opener.finish()
