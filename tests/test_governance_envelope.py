"""Requester assertions, directory attestations and key_reference, end to end.

Each test packs a real study and opens it: with and without each element, and
with each element forged, untrusted or mismatched, under each policy.
"""

import json
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest

from bridge.errors import (
    AuthenticationFailed,
    ExpiredAssertion,
    PolicyViolation,
    UnknownSigner,
)
from bridge.jmix import (
    Entity,
    OpenPolicy,
    TrustStore,
    generate_key_dir,
    inspect_envelope,
    load_key_dir,
    open_envelope,
    pack,
    verify_envelope,
)
from bridge.jmix._assertion import make_assertion, make_jws
from bridge.jmix._codec import b64encode, dump_json
from bridge.jmix.attestation import make_attestation, verify_attestation
from bridge.jmix.request import make_request, read_request
from tests.test_jmix_roundtrip import make_study

SENDER = Entity("org:site-a", "Site A", "pacs@site-a.example")
RECEIVER = Entity("org:site-b", "Site B", "pacs@site-b.example")
REQUESTER = Entity("org:dr-smith", "Dr Smith", "smith@site-b.example")
REFERENCE = "directory://org/site-a#key-ed25519"


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    """Key folders for the sender, receiver, requester and a directory."""
    root = tmp_path_factory.mktemp("keys")
    found = {}
    for name in ("sender", "receiver", "requester", "directory", "rogue"):
        generate_key_dir(root / name)
        found[name] = load_key_dir(root / name)
    return found


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    return make_study(tmp_path_factory.mktemp("study") / "s", count=2)


def _pack(keys, study, out: Path, **extra) -> Path:
    pack(
        study,
        out,
        sender=SENDER,
        signing_key=keys["sender"].signing_key,
        receiver=RECEIVER,
        recipient_public=keys["receiver"].encryption_key.public_key(),
        **extra,
    )
    return out


def _trust(keys, reference: str | None = None) -> TrustStore:
    return TrustStore([(SENDER.id, keys["sender"].signing_key.public_key(), reference)])


def _open(keys, env: Path, dest: Path, **policy):
    return open_envelope(
        env,
        dest,
        encryption_key=keys["receiver"].encryption_key,
        trust=policy.pop("trust", None) or _trust(keys),
        policy=OpenPolicy(**policy),
    )


def _request(keys, signer="requester", **kw):
    return make_request(
        keys[signer].signing_key,
        REQUESTER,
        RECEIVER.id,
        valid_for=timedelta(days=1),
        **kw,
    )


def _requesters(keys) -> TrustStore:
    return TrustStore([(REQUESTER.id, keys["requester"].signing_key.public_key())])


def _directories(keys, name="directory") -> TrustStore:
    return TrustStore([("test-directory", keys[name].signing_key.public_key())])


def _rewrite_manifest(env: Path, out: Path, change) -> Path:
    """Copy ``env`` with its manifest changed (the JWS no longer matches)."""
    with zipfile.ZipFile(env) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith("/manifest.json"):
                manifest = json.loads(data)
                change(manifest)
                data = dump_json(manifest)
            zout.writestr(info, data)
    return out


# -- an envelope without any governance element opens as before -------------------


def test_envelope_without_governance_records_each_element_absent(keys, study, tmp_path):
    env = _pack(keys, study, tmp_path / "e.zip")
    opened = _open(keys, env, tmp_path / "out")
    assert opened.governance["requester"] == {"status": "absent"}
    assert opened.governance["attestation"] == {"status": "absent"}
    assert opened.governance["key_reference"] == {"status": "absent"}
    assert opened.governance["audit"]["status"] == "verified"
    assert opened.warnings == []


# -- requester ----------------------------------------------------------------------


def test_requester_round_trip_verifies_against_pinned_requester_key(
    keys, study, tmp_path
):
    env = _pack(keys, study, tmp_path / "e.zip", request=_request(keys))
    opened = _open(keys, env, tmp_path / "out", requester_trust=_requesters(keys))
    record = opened.governance["requester"]
    assert record["status"] == "verified" and record["id"] == REQUESTER.id
    assert inspect_envelope(env)["requester"]["id"] == REQUESTER.id


def test_request_file_survives_writing_and_reading(keys, tmp_path):
    request = _request(keys)
    path = tmp_path / "request.json"
    path.write_bytes(dump_json(request.as_json()))
    assert read_request(path) == request


def test_request_file_with_altered_requester_fails_its_own_signature(keys, tmp_path):
    doc = _request(keys).as_json()
    doc["requester"]["name"] = "Dr Impostor"
    with pytest.raises(AuthenticationFailed):
        read_request(dump_json(doc))


def test_pack_refuses_a_request_made_for_another_receiver(keys, study, tmp_path):
    request = make_request(keys["requester"].signing_key, REQUESTER, "org:elsewhere")
    with pytest.raises(ValueError, match="made for receiver 'org:elsewhere'"):
        _pack(keys, study, tmp_path / "e.zip", request=request)
    assert not (tmp_path / "e.zip").exists()


def _resigned(keys, env: Path, out: Path, change) -> Path:
    """Copy ``env`` with its manifest changed and signed again by the sender.

    This is what a sender that alters what it was asked to pass through
    (or a stolen sender key) produces: the sender's signatures hold.
    """
    with zipfile.ZipFile(env) as zin, zipfile.ZipFile(out, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            name = info.filename.rsplit("/", 1)[-1]
            if name == "manifest.json":
                manifest = json.loads(data)
                change(manifest)
                fields = tuple(manifest["sender"]["assertion"]["signed_fields"])
                manifest["sender"]["assertion"] = make_assertion(
                    manifest, keys["sender"].signing_key, fields, None
                )
                data = dump_json(manifest)
                jws = make_jws(data, keys["sender"].signing_key)
            if name == "manifest.jws":
                continue
            zout.writestr(info, data)
        zout.writestr(info.filename.rsplit("/", 1)[0] + "/manifest.jws", jws)
    return out


def _forged_requester(keys, study, tmp_path) -> Path:
    """An envelope whose requester name was changed after the requester signed."""
    env = _pack(keys, study, tmp_path / "e.zip", request=_request(keys))
    return _resigned(
        keys,
        env,
        tmp_path / "forged.zip",
        lambda m: m["requester"].__setitem__("name", "Dr Impostor"),
    )


def test_forged_requester_signature_is_refused_when_verified_if_present(
    keys, study, tmp_path
):
    env = _forged_requester(keys, study, tmp_path)
    with pytest.raises(AuthenticationFailed) as caught:
        _open(keys, env, tmp_path / "out", requester_trust=_requesters(keys))
    assert caught.value.stage == "requester"
    assert str(caught.value) == "authentication failed"
    assert not (tmp_path / "out").exists()


def test_forged_requester_signature_is_flagged_when_ignored(keys, study, tmp_path):
    env = _forged_requester(keys, study, tmp_path)
    opened = _open(
        keys,
        env,
        tmp_path / "out",
        requester_trust=_requesters(keys),
        requester="ignored",
    )
    assert opened.governance["requester"]["status"] == "failed"
    assert any("requester assertion not verified" in w for w in opened.warnings)


def test_requester_with_unpinned_key_is_refused_by_default(keys, study, tmp_path):
    env = _pack(keys, study, tmp_path / "e.zip", request=_request(keys))
    with pytest.raises(UnknownSigner, match="requester signing key"):
        _open(keys, env, tmp_path / "out")


def test_missing_requester_is_refused_when_required(keys, study, tmp_path):
    env = _pack(keys, study, tmp_path / "e.zip")
    with pytest.raises(PolicyViolation, match="requester assertion: absent"):
        _open(keys, env, tmp_path / "out", requester="required")


def test_expired_requester_assertion_is_refused(keys, study, tmp_path):
    request = make_request(
        keys["requester"].signing_key,
        REQUESTER,
        RECEIVER.id,
        valid_for=timedelta(seconds=-60),
    )
    env = _pack(keys, study, tmp_path / "e.zip", request=request)
    with pytest.raises(ExpiredAssertion, match="requester"):
        _open(keys, env, tmp_path / "out", requester_trust=_requesters(keys))


# -- directory attestation ------------------------------------------------------------


def _attestation(keys, directory="directory", subject=SENDER.id, **kw):
    return make_attestation(
        keys[directory].signing_key,
        "test-directory",
        subject,
        keys["sender"].signing_key.public_key(),
        valid_for=timedelta(days=30),
        **kw,
    )


def test_attestation_round_trip_is_verified_and_recorded(keys, study, tmp_path):
    env = _pack(keys, study, tmp_path / "e.zip", attestation=_attestation(keys))
    opened = _open(keys, env, tmp_path / "out", directory_trust=_directories(keys))
    record = opened.governance["attestation"]
    assert record["status"] == "verified" and record["provider"] == "test-directory"
    assert inspect_envelope(env)["directory_attestation"] == "test-directory"


def test_attestation_is_not_needed_to_accept_a_pinned_sender(keys, study, tmp_path):
    env = _pack(keys, study, tmp_path / "e.zip", attestation=_attestation(keys))
    opened = _open(keys, env, tmp_path / "out")
    assert opened.governance["attestation"]["status"] == "not-checked"


def test_attestation_by_untrusted_directory_is_refused(keys, study, tmp_path):
    env = _pack(
        keys, study, tmp_path / "e.zip", attestation=_attestation(keys, "rogue")
    )
    with pytest.raises(UnknownSigner, match="not trusted"):
        _open(keys, env, tmp_path / "out", directory_trust=_directories(keys))


def test_attestation_by_untrusted_directory_is_flagged_when_ignored(
    keys, study, tmp_path
):
    env = _pack(
        keys, study, tmp_path / "e.zip", attestation=_attestation(keys, "rogue")
    )
    opened = _open(
        keys,
        env,
        tmp_path / "out",
        directory_trust=_directories(keys),
        attestation="ignored",
    )
    assert opened.governance["attestation"]["status"] == "failed"
    assert "not trusted" in opened.governance["attestation"]["reason"]


def test_missing_attestation_is_refused_when_required(keys, study, tmp_path):
    env = _pack(keys, study, tmp_path / "e.zip")
    with pytest.raises(PolicyViolation, match="directory attestation: absent"):
        _open(
            keys,
            env,
            tmp_path / "out",
            directory_trust=_directories(keys),
            attestation="required",
        )


def test_attestation_of_another_key_is_refused(keys):
    attestation = make_attestation(
        keys["directory"].signing_key,
        "test-directory",
        SENDER.id,
        keys["rogue"].signing_key.public_key(),
    )
    with pytest.raises(PolicyViolation, match="attests key"):
        verify_attestation(
            attestation,
            subject=SENDER.id,
            public_key=keys["sender"].signing_key.public_key(),
            directory_trust=_directories(keys),
        )


def test_attestation_with_flipped_signature_fails_authentication(keys):
    attestation = _attestation(keys)
    head, body, sig = attestation["attestation_signature"].split(".")
    flipped = ("A" if sig[0] != "A" else "B") + sig[1:]
    attestation["attestation_signature"] = f"{head}.{body}.{flipped}"
    with pytest.raises(AuthenticationFailed) as caught:
        verify_attestation(
            attestation,
            subject=SENDER.id,
            public_key=keys["sender"].signing_key.public_key(),
            directory_trust=_directories(keys),
        )
    assert caught.value.stage == "attestation"


def test_attestation_naming_a_trusted_key_it_was_not_signed_with_is_refused(keys):
    attestation = _attestation(keys, "rogue")
    trusted = keys["directory"].signing_key.public_key()
    from bridge.jmix.keys import raw_public

    attestation["attestation_public_key"] = b64encode(raw_public(trusted))
    with pytest.raises((UnknownSigner, PolicyViolation)):
        verify_attestation(
            attestation,
            subject=SENDER.id,
            public_key=keys["sender"].signing_key.public_key(),
            directory_trust=_directories(keys),
        )


def test_pack_refuses_an_attestation_of_another_key(keys, study, tmp_path):
    attestation = make_attestation(
        keys["directory"].signing_key,
        "test-directory",
        SENDER.id,
        keys["rogue"].signing_key.public_key(),
    )
    with pytest.raises(ValueError, match="attests key"):
        _pack(keys, study, tmp_path / "e.zip", attestation=attestation)


# -- key_reference -------------------------------------------------------------------


def test_key_reference_matching_the_pin_is_verified(keys, study, tmp_path):
    env = _pack(keys, study, tmp_path / "e.zip", key_reference=REFERENCE)
    opened = _open(keys, env, tmp_path / "out", trust=_trust(keys, REFERENCE))
    assert opened.governance["key_reference"] == {
        "status": "verified",
        "reference": REFERENCE,
    }
    manifest = opened.manifest
    assert (
        "sender.assertion.key_reference"
        in (manifest["sender"]["assertion"]["signed_fields"])
    )


def test_key_reference_not_matching_the_pin_is_refused(keys, study, tmp_path):
    env = _pack(keys, study, tmp_path / "e.zip", key_reference=REFERENCE)
    other = "directory://org/site-z#key-ed25519"
    with pytest.raises(PolicyViolation, match="key_reference: expected"):
        _open(keys, env, tmp_path / "out", trust=_trust(keys, other))


def test_key_reference_not_matching_is_flagged_when_ignored(keys, study, tmp_path):
    env = _pack(keys, study, tmp_path / "e.zip", key_reference=REFERENCE)
    opened = _open(
        keys,
        env,
        tmp_path / "out",
        trust=_trust(keys, "directory://org/site-z#key-ed25519"),
        key_reference="ignored",
    )
    assert opened.governance["key_reference"]["status"] == "failed"


def test_key_reference_without_a_pinned_reference_is_recorded_unchecked(
    keys, study, tmp_path
):
    env = _pack(keys, study, tmp_path / "e.zip", key_reference=REFERENCE)
    opened = _open(keys, env, tmp_path / "out")
    assert opened.governance["key_reference"]["status"] == "not-checked"


def test_key_reference_changed_after_signing_fails_authentication(
    keys, study, tmp_path
):
    env = _pack(keys, study, tmp_path / "e.zip", key_reference=REFERENCE)
    other = "directory://org/site-z#key-ed25519"
    changed = _rewrite_manifest(
        env,
        tmp_path / "changed.zip",
        lambda m: m["sender"]["assertion"].__setitem__("key_reference", other),
    )
    with pytest.raises(AuthenticationFailed):
        _open(keys, changed, tmp_path / "out", trust=_trust(keys, other))


def test_all_elements_together_verify(keys, study, tmp_path):
    env = _pack(
        keys,
        study,
        tmp_path / "e.zip",
        request=_request(keys),
        key_reference=REFERENCE,
        attestation=_attestation(keys, key_reference=REFERENCE),
    )
    opened = verify_envelope(
        env,
        encryption_key=keys["receiver"].encryption_key,
        trust=_trust(keys, REFERENCE),
        policy=OpenPolicy(
            requester="required",
            requester_trust=_requesters(keys),
            attestation="required",
            directory_trust=_directories(keys),
            key_reference="required",
            audit="required",
        ),
    )
    assert {k: v["status"] for k, v in opened.governance.items()} == {
        "requester": "verified",
        "attestation": "verified",
        "key_reference": "verified",
        "audit": "verified",
    }
