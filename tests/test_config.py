"""Configuration: typed loading, every problem reported with its path, secrets."""

import os
import subprocess
import sys

import pytest

from bridge.config import Secret, Size, env_name, load_config
from bridge.errors import ConfigError
from tests.support.net import free_port
from tests.support.paths import REPO
from tests.support.sites import Sites


def _write(tmp_path, text):
    path = tmp_path / "bridge.yaml"
    path.write_text(text)
    return path


def _problems(path, **kw):
    with pytest.raises(ConfigError) as info:
        load_config(path, check_files=False, **kw)
    return info.value.problems


def test_missing_file_names_the_file(tmp_path):
    problems = _problems(tmp_path / "absent.yaml")
    assert "absent.yaml: cannot read" in problems[0]


def test_unknown_key_is_reported_with_its_path(tmp_path):
    path = _write(tmp_path, "dicom:\n  ae_titel: X\n")
    assert _problems(path) == [
        "dicom.ae_titel: unknown key (expected one of ae_title, allowed_callers, "
        "check_called_ae, duplicates, host, max_associations, max_pdu, port, tls, "
        "unrouted)"
    ]


def test_every_type_problem_is_reported_at_once(tmp_path):
    path = _write(
        tmp_path,
        """
dicom: {port: eleven, check_called_ae: "yes", duplicates: keep-oldest}
peers:
  - name: b
    entity: {id: org:b}
    encryption_key: b.pub
    url: http://b
    timeout_seconds: soon
""",
    )
    problems = _problems(path)
    assert "dicom.port: expected an integer, got 'eleven'" in problems
    assert "dicom.check_called_ae: expected true or false, got 'yes'" in problems
    assert (
        "dicom.duplicates: expected one of keep-newest, reject, got 'keep-oldest'"
    ) in problems
    assert "peers[0].timeout_seconds: expected a number, got 'soon'" in problems


def test_route_naming_an_unknown_peer_is_refused(tmp_path):
    path = _write(tmp_path, "routes:\n  - {name: all, peers: [nowhere]}\n")
    assert any(
        p.startswith("routes[0].peers[0]: no peer named 'nowhere'")
        for p in _problems(path)
    )


def test_sizes_accept_units(tmp_path):
    path = _write(
        tmp_path, "spool: {min_free_bytes: 2 GiB}\nhttp: {max_body_bytes: 1500000}\n"
    )
    config = load_config(path, check_files=False)
    assert config.spool.min_free_bytes == Size(2 * 2**30)
    assert config.http.max_body_bytes == 1_500_000


def test_relative_paths_are_taken_from_the_file_folder(tmp_path):
    path = _write(tmp_path, "node: {data_dir: data}\n")
    assert load_config(path, check_files=False).node.data_dir == tmp_path / "data"


def test_token_from_environment_overrides_the_file_and_is_masked(tmp_path):
    path = _write(
        tmp_path,
        """
peers:
  - {name: clinic-b, entity: {id: org:b}, encryption_key: b.pub, url: http://b,
     token: from-file}
""",
    )
    env = {env_name("PEER", "clinic-b"): "from-env"}
    config = load_config(path, env=env, check_files=False)
    assert env_name("PEER", "clinic-b") == "JMIX_BRIDGE_PEER_CLINIC_B_TOKEN"
    assert config.peers[0].token == "from-env"
    assert "from-env" not in repr(config)
    assert repr(Secret("x")) == "Secret('***')"


def _node_keys(tmp_path):
    """Create ``keys/`` with both private key files, mode 600; return the folder."""
    keys = tmp_path / "keys"
    keys.mkdir()
    for name in ("signing.key", "encryption.key"):
        (keys / name).write_text("k")
        os.chmod(keys / name, 0o600)
    return keys


def test_private_key_readable_by_others_is_refused(tmp_path):
    keys = _node_keys(tmp_path)
    os.chmod(keys / "signing.key", 0o644)
    path = _write(tmp_path, "node: {keys: keys, data_dir: data}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert any(
        "signing.key is readable by group or others" in p for p in info.value.problems
    )


def test_embedded_defaults_load_without_a_file():
    config = load_config(None, check_files=False)
    assert config.dicom.ae_title == "JMIXBRIDGE"
    assert config.store_url.startswith("sqlite:///")


PEER = "{name: %s, entity: {id: org:b}, encryption_key: b.pub, url: http://b%s}"


def test_http_peer_without_any_credential_is_refused(tmp_path):
    path = _write(tmp_path, "peers:\n  - " + PEER % ("clinic-b", "") + "\n")
    assert any(
        p.startswith("peers[0]: needs a token or a client certificate")
        and "JMIX_BRIDGE_PEER_CLINIC_B_TOKEN" in p
        for p in _problems(path)
    )


def test_two_names_sharing_one_token_variable_are_refused(tmp_path):
    path = _write(
        tmp_path,
        "peers:\n  - "
        + PEER % ("site-b", ", token: x")
        + "\n  - "
        + PEER % ("site_b", ", token: y")
        + "\n",
    )
    assert any("JMIX_BRIDGE_PEER_SITE_B_TOKEN" in p for p in _problems(path))


def test_unsupported_store_scheme_is_refused_at_check_time(tmp_path):
    path = _write(tmp_path, "store: {url: 'mysql://db/bridge'}\n")
    assert any(
        p.startswith("store.url: scheme 'mysql' is not supported")
        for p in _problems(path)
    )


def test_postgresql_store_url_is_accepted(tmp_path):
    path = _write(tmp_path, "store: {url: 'postgresql://bridge@db:5432/bridge'}\n")
    config = load_config(path, check_files=False)
    assert config.store_url == "postgresql://bridge@db:5432/bridge"


def test_password_in_the_store_url_is_refused(tmp_path):
    path = _write(tmp_path, "store: {url: 'postgres://bridge:s3cret@db/bridge'}\n")
    problems = [p for p in _problems(path) if p.startswith("store.url")]
    assert problems == [
        "store.url: a password in the url is refused; give it in "
        "PGPASSWORD or a passfile"
    ]


def test_relative_sqlite_path_is_taken_from_the_file_folder(tmp_path):
    path = _write(tmp_path, "store: {url: 'sqlite:///state/bridge.db'}\n")
    config = load_config(path, check_files=False)
    assert config.store_url == f"sqlite:///{tmp_path / 'state' / 'bridge.db'}"


def test_required_client_certificate_without_a_ca_is_refused(tmp_path):
    path = _write(tmp_path, "http: {tls: {require_client_cert: true}}\n")
    assert any(
        p.startswith("http.tls.require_client_cert: needs http.tls.ca")
        for p in _problems(path)
    )


def test_route_match_takes_a_list_and_required_series_a_plain_string(tmp_path):
    path = _write(
        tmp_path,
        "routes:\n  - {name: r, peers: [p], match: {Modality: "
        "[CT, MR]}, required_series: ['AX*', {Modality: SR}]}\npeers:\n"
        "  - " + PEER % ("p", ", token: t") + "\n",
    )
    route = load_config(path, check_files=False).routes[0]
    assert route.match == {"Modality": ("CT", "MR")}
    assert route.required_series == ("AX*", {"Modality": "SR"})


def test_retry_numbers_out_of_range_are_refused(tmp_path):
    path = _write(
        tmp_path,
        "peers:\n  - {name: p, entity: {id: x}, encryption_key: "
        "x, url: http://x, token: t, retry: {factor: 0.5, max_attempts: -1}}\n",
    )
    problems = _problems(path)
    assert "peers[0].retry.factor: expected 1 or more, got 0.5" in problems
    expected = "peers[0].retry.max_attempts: expected 0 (no limit) or more, got -1"
    assert expected in problems


def test_key_file_that_cannot_be_read_is_reported_with_its_path(tmp_path):
    # Root reads a file whatever its mode: a folder where the file should be is
    # a key file no one can read as one.
    keys = _node_keys(tmp_path)
    (keys / "signing.key").unlink()
    (keys / "signing.key").mkdir()
    path = _write(tmp_path, "node: {keys: keys, data_dir: data}\n")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert (
        f"node.keys (signing.key): not a regular file: {keys / 'signing.key'}"
        in info.value.problems
    )


def test_data_dir_under_a_regular_file_is_reported_with_its_path(tmp_path):
    _node_keys(tmp_path)
    (tmp_path / "plain-file").write_text("not a folder")
    path = _write(tmp_path, "node: {keys: keys, data_dir: plain-file/data}\n")

    with pytest.raises(ConfigError) as info:
        load_config(path)

    assert info.value.problems == [
        f"node.data_dir: {tmp_path / 'plain-file' / 'data'} cannot be created "
        "or written"
    ]


def _jmix_bridge(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "bridge", *argv],
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


BAD_CONFIG = """
node: {keys: keys, data_dir: plain-file/data}
dicom: {port: eleven, ae_titel: X}
http: {port: %d}
"""


def _bad_config(tmp_path):
    keys = _node_keys(tmp_path)
    (keys / "signing.key").unlink()
    (keys / "signing.key").mkdir()
    (tmp_path / "plain-file").write_text("not a folder")
    return _write(tmp_path, BAD_CONFIG % free_port()), keys


def test_check_config_exits_2_listing_every_problem_with_its_path(tmp_path):
    path, keys = _bad_config(tmp_path)

    result = _jmix_bridge("check-config", "-c", str(path))

    assert result.returncode == 2
    lines = result.stderr.splitlines()
    assert lines[0] == "configuration has 4 problem(s):"
    assert sorted(line.strip() for line in lines[1:]) == sorted(
        [
            "dicom.ae_titel: unknown key (expected one of ae_title, allowed_callers, "
            "check_called_ae, duplicates, host, max_associations, max_pdu, port, "
            "tls, unrouted)",
            "dicom.port: expected an integer, got 'eleven'",
            f"node.keys (signing.key): not a regular file: {keys / 'signing.key'}",
            f"node.data_dir: {tmp_path / 'plain-file' / 'data'} cannot be created "
            "or written",
        ]
    )


def test_check_config_exits_0_for_a_valid_file(tmp_path):
    sites = Sites(tmp_path, ("PACS", 9))
    _, path_b = sites.write()

    result = _jmix_bridge("check-config", "-c", str(path_b))

    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == f"configuration is valid: {path_b}"


def test_run_refuses_a_bad_file_before_it_starts_anything(tmp_path):
    path, _ = _bad_config(tmp_path)

    result = _jmix_bridge("run", "-c", str(path))

    assert result.returncode == 2
    assert "configuration has 4 problem(s):" in result.stderr
    # The daemon logs each socket it opens, and its start; none of it happened.
    for event in ("peer api listening", "listener started", "bridge started"):
        assert event not in result.stderr
