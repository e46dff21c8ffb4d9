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
from bridge.cli import main
from bridge.jmix import (
    OpenPolicy,
    TrustStore,
    load_key_dir,
    open_envelope,
    verify_envelope,
)
from bridge.jmix import load_signing_public as load_pub
from bridge.jmix._aead import Opener, derive_key, shared_secret
from bridge.jmix._payload import DIALECTS

VECTORS = Path(__file__).parent / "vectors"
CASES = sorted(p.parent.name for p in VECTORS.glob("*/expect.json"))
ENVELOPE_ID = "4c2f1d6e-8a3b-4e5f-9a7c-1b2d3e4f5a6b"  # generate.py's ID


@pytest.fixture(scope="module")
def receiver_dir(tmp_path_factory):
    """The receiver's key folder, copied out of git with its private keys 0600."""
    folder = tmp_path_factory.mktemp("keys") / "receiver"
    shutil.copytree(VECTORS / "keys" / "receiver", folder)
    for key in folder.glob("*.key"):
        key.chmod(0o600)
    return folder


@pytest.fixture(scope="module")
def receiver_key(receiver_dir):
    """The receiver's private encryption key."""
    return load_key_dir(receiver_dir).encryption_key


def read_expect(case: str) -> tuple[dict, dict, str | None]:
    """Return a case's expectation, its policy arguments and the pinned sender id."""
    expect = json.loads((VECTORS / case / "expect.json").read_text())
    policy_args = dict(expect["policy"])
    return expect, policy_args, policy_args.pop("pin_sender_id", None)


def test_vector_cases_cover_every_refusal():
    outcomes = {read_expect(c)[0]["outcome"] for c in CASES}
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


@pytest.mark.parametrize("verb", ["open", "verify"])
@pytest.mark.parametrize("case", CASES)
def test_vector_has_its_stated_outcome(case, verb, tmp_path, receiver_key):
    expect, policy_args, pinned_id = read_expect(case)
    trust = TrustStore([(pinned_id, load_pub(VECTORS / "keys/sender/signing.pub"))])
    dest = tmp_path / "out"
    common = dict(
        encryption_key=receiver_key, trust=trust, policy=OpenPolicy(**policy_args)
    )

    def run():
        src = VECTORS / case / "envelope.zip"
        if verb == "open":
            return open_envelope(src, dest, **common)
        return verify_envelope(src, **common)

    if expect["outcome"] == "opens":
        opened = run()
        assert opened.files
        if verb == "open":
            assert opened.dicom_files and all(p.is_file() for p in opened.dicom_files)
        else:
            assert list(tmp_path.iterdir()) == []
    else:
        with pytest.raises(getattr(errors, expect["outcome"])) as caught:
            run()
        assert list(tmp_path.iterdir()) == []
        if isinstance(caught.value, errors.AuthenticationFailed):
            assert str(caught.value) == "authentication failed"


def cli_reader_options(receiver_dir: Path, policy_args: dict, pinned_id) -> list:
    """Translate a case's policy into ``open``/``verify`` options."""
    pub = VECTORS / "keys/sender/signing.pub"
    argv = [
        "--key",
        str(receiver_dir),
        "--trust",
        f"{pinned_id}={pub}" if pinned_id else str(pub),
    ]
    if policy_args.pop("require_encryption", True) is False:
        argv.append("--allow-clear")
    if "expected_receiver_id" in policy_args:
        argv += ["--receiver", policy_args.pop("expected_receiver_id")]
    assert policy_args == {}, f"no command-line option for {policy_args}"
    return argv


@pytest.mark.parametrize("case", [c for c in CASES if c.startswith("ok-")])
def test_opening_vector_passes_every_cli_verb(case, tmp_path, receiver_dir, capsys):
    _, policy_args, pinned_id = read_expect(case)
    src = str(VECTORS / case / "envelope.zip")
    reader = cli_reader_options(receiver_dir, policy_args, pinned_id)

    assert main(["verify", src, *reader]) == 0
    assert list(tmp_path.iterdir()) == []
    assert main(["open", src, "-o", str(tmp_path / "out"), *reader]) == 0
    assert any((tmp_path / "out" / "dicom").iterdir())
    assert main(["inspect", src]) == 0

    out = capsys.readouterr().out
    assert out.count(f"envelope {ENVELOPE_ID} from org:vector-sender") == 2
    assert json.loads(out[out.index("{") :])["id"] == ENVELOPE_ID


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
