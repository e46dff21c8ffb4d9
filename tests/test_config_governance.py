"""Governance settings: pinned fingerprints, requests and attestations are
checked against the files they name before the bridge starts."""

import json
from datetime import timedelta

import pytest
import yaml

from bridge import jmix
from bridge.config import load_config
from bridge.errors import ConfigError
from bridge.jmix.attestation import make_attestation
from bridge.jmix.request import make_request


@pytest.fixture
def site(tmp_path):
    """Our keys, a sender's and a peer's, and a configuration using them."""
    for name in ("ours", "a", "b", "other", "directory"):
        jmix.generate_key_dir(tmp_path / name)
    conf = {
        "node": {"id": "site-b", "data_dir": "data", "keys": "ours"},
        "peers": [
            {
                "name": "peer-b",
                "entity": {"id": "site-c"},
                "url": "http://peer",
                "token": "t",
                "encryption_key": "b/encryption.pub",
                "signing_key": "b/signing.pub",
            }
        ],
        "routes": [{"name": "all", "peers": ["peer-b"]}],
        "senders": [
            {
                "name": "site-a",
                "id": "site-a",
                "token": "t",
                "signing_keys": ["a/signing.pub"],
            }
        ],
    }
    return tmp_path, conf


def _fp(path):
    return jmix.fingerprint(jmix.load_signing_public(path))


def _problems(root, conf):
    path = root / "bridge.yaml"
    path.write_text(yaml.safe_dump(conf))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return info.value.problems


def _loads(root, conf):
    path = root / "bridge.yaml"
    path.write_text(yaml.safe_dump(conf))
    return load_config(path)


def test_matching_pins_and_governance_settings_load(site):
    root, conf = site
    conf["senders"][0]["signing_key_fingerprints"] = [_fp(root / "a" / "signing.pub")]
    conf["senders"][0]["governance"] = {"requester": "required", "audit": "ignored"}
    conf["peers"][0]["signing_key_fingerprint"] = _fp(root / "b" / "signing.pub")

    config = _loads(root, conf)

    assert config.senders[0].governance.requester == "required"
    assert config.senders[0].governance.attestation == "auto"


def test_a_signing_key_file_that_is_not_the_pinned_key_is_refused(site):
    root, conf = site
    conf["senders"][0]["signing_key_fingerprints"] = [
        _fp(root / "other" / "signing.pub")
    ]

    problems = _problems(root, conf)

    assert any(
        p.startswith("senders[0].signing_keys[0]:")
        and "signing_key_fingerprints does not list" in p
        for p in problems
    )
    assert any("is pinned but no signing_keys file holds it" in p for p in problems)


def test_a_peer_key_that_does_not_match_its_fingerprint_is_refused(site):
    root, conf = site
    conf["peers"][0]["encryption_key_fingerprint"] = "SHA256:" + "0" * 64

    problems = _problems(root, conf)

    assert any(
        p.startswith("peers[0].encryption_key:")
        and "encryption_key_fingerprint pins SHA256:000" in p
        for p in problems
    )


def test_a_malformed_fingerprint_is_refused_with_its_path(site):
    root, conf = site
    conf["senders"][0]["signing_key_fingerprints"] = ["MD5:abc"]

    assert any(
        p.startswith("senders[0].signing_key_fingerprints[0]: expected 'SHA256:'")
        for p in _problems(root, conf)
    )


def _route_request(root, conf, receiver_id: str, *, tamper: bool = False) -> None:
    """Give the route a request file made by a clinic for ``receiver_id``."""
    request = make_request(
        jmix.load_signing_key(root / "other" / "signing.key"),
        jmix.Entity("org:clinic", "Clinic", "desk@clinic.test"),
        receiver_id,
    ).as_json()
    if tamper:
        request["requester"]["name"] = "Someone else"
    (root / "request.json").write_text(json.dumps(request))
    conf["routes"][0]["requester"] = "request.json"


def test_a_route_request_made_for_another_receiver_is_refused(site):
    root, conf = site
    _route_request(root, conf, "site-z")

    assert any(
        p.startswith("routes[0].requester: the request is for delivery to 'site-z'")
        and "'site-c'" in p
        for p in _problems(root, conf)
    )


def test_a_tampered_request_file_is_refused(site):
    root, conf = site
    _route_request(root, conf, "site-c", tamper=True)

    assert any(
        p.startswith("routes[0].requester:") and "authentication failed" in p
        for p in _problems(root, conf)
    )


def test_an_attestation_of_another_key_is_refused(site):
    root, conf = site
    attestation = make_attestation(
        jmix.load_signing_key(root / "directory" / "signing.key"),
        "dir",
        "site-b",
        jmix.load_signing_public(root / "other" / "signing.pub"),
        valid_for=timedelta(days=1),
    )
    (root / "attestation.json").write_text(json.dumps(attestation))
    conf["node"]["directory_attestation"] = "attestation.json"

    assert any(
        p.startswith("node.directory_attestation: attests key")
        and "but this node signs with" in p
        for p in _problems(root, conf)
    )


def test_a_required_attestation_without_directory_keys_is_refused(site):
    root, conf = site
    conf["senders"][0]["governance"] = {"attestation": "required"}

    assert any(
        p.startswith("senders[0].governance.attestation: 'required' needs ")
        for p in _problems(root, conf)
    )


def test_requester_and_directory_pins_need_ids_and_loadable_keys(site):
    root, conf = site
    (root / "junk.pub").write_text("not a key")
    conf["senders"][0]["requester_keys"] = [{"id": " ", "key": "junk.pub"}]
    conf["receiving"] = {"directory_keys": [{"id": "dir", "key": "absent.pub"}]}

    problems = _problems(root, conf)

    assert any(p.startswith("senders[0].requester_keys[0].id:") for p in problems)
    assert any(p.startswith("senders[0].requester_keys[0].key:") for p in problems)
    assert any(
        p.startswith("receiving.directory_keys[0].key: no such file") for p in problems
    )


def _study_request(root, conf, receiver_id: str, **match) -> None:
    """Add a study request file made by a clinic for ``receiver_id``."""
    _route_request(root, conf, receiver_id)
    conf["routes"][0].pop("requester")
    conf["study_requests"] = [{"request": "request.json", **match}]


def test_a_study_request_for_a_configured_peer_loads(site):
    root, conf = site
    _study_request(root, conf, "site-c", accession_number="ACC-1")

    (rule,) = _loads(root, conf).study_requests

    assert rule.accession_number == "ACC-1"
    assert rule.request == root / "request.json"


def test_a_study_request_made_for_no_configured_peer_is_refused(site):
    root, conf = site
    _study_request(root, conf, "site-z", study_instance_uid="1.2.3")

    assert any(
        p.startswith("study_requests[0].request: the request is for delivery to")
        and "'site-z'" in p
        for p in _problems(root, conf)
    )


@pytest.mark.parametrize(
    "match", [{}, {"study_instance_uid": "1.2.3", "accession_number": "ACC-1"}]
)
def test_a_study_request_must_name_its_study_by_exactly_one_key(site, match):
    root, conf = site
    _study_request(root, conf, "site-c", **match)

    assert any(
        p.startswith("study_requests[0]: expected exactly one of study_instance_uid")
        for p in _problems(root, conf)
    )
