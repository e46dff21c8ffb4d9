"""The shipped examples: conf/, docker/ and docs/configuration.md stay true.

Every example configuration loads with the bridge's own loader, with its key and
certificate files made for real in a temporary copy so that the file checks run;
every key carries a comment; the docs name every key of the schema; the
Dockerfile installs and runs the bridge as the README does; the compose file
wires site A to site B to Orthanc; the systemd unit passes systemd's verifier.
"""

import dataclasses
import json
import re
import shutil
import subprocess
import typing
from pathlib import Path
from urllib.parse import urlparse

import pytest
import yaml

from bridge.cli import build_parser
from bridge.config import Config, env_name, load_config
from bridge.errors import ConfigError
from bridge.jmix import Entity, generate_key_dir, load_signing_key, make_request
from tests.support.pki import CertificateAuthority

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted(ROOT.glob("conf/*.yaml")) + sorted(ROOT.glob("docker/*.yaml"))
BRIDGE_EXAMPLES = [p for p in EXAMPLES if p.name != "compose.yaml"]
STATE_DIR = "/var/lib/jmix-bridge"  # where the examples keep state, spool and keys
HEALTHCHECK_URL = "http://127.0.0.1:8080/readyz"


def _ids(paths):
    return [f"{p.parent.name}/{p.name}" for p in paths]


def _tokens(raw: dict) -> dict[str, str]:
    """Return an environment with a token for every peer and sender of ``raw``."""
    env = {}
    for section, key in (("PEER", "peers"), ("SENDER", "senders")):
        for item in raw.get(key) or []:
            env[env_name(section, item["name"])] = f"test-token-{item['name']}"
    return env


def _make_files(config: Config, pki: Path) -> None:
    """Create every key and certificate file ``config`` names, as an operator would.

    Certificates are issued by one test CA kept in ``pki``.
    """
    key_dirs = {config.keys_dir}
    for peer in config.peers:
        key_dirs |= {peer.encryption_key.parent}
        if peer.signing_key is not None:
            key_dirs.add(peer.signing_key.parent)
    for sender in config.senders:
        key_dirs |= {key.parent for key in sender.signing_keys}
    for folder in key_dirs:
        generate_key_dir(folder)
    if config.study_requests:
        signer = pki / "requester"
        generate_key_dir(signer)
        for rule in config.study_requests:
            request = make_request(
                load_signing_key(signer / "signing.key"),
                Entity("org:example-requester", "Example requester", "r@example"),
                config.peers[0].entity.id,
            )
            rule.request.parent.mkdir(parents=True, exist_ok=True)
            rule.request.write_text(json.dumps(request.as_json()))

    sections = [config.dicom.tls, config.http.tls]
    sections += [p.tls for p in config.peers] + [d.tls for d in config.destinations]
    ca = CertificateAuthority(pki)
    for number, tls in enumerate(filter(None, sections)):
        if tls.cert is not None:
            ca.issue(f"leaf-{number}", cert_path=tls.cert, key_path=tls.key)
        if tls.ca is not None:
            tls.ca.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(ca.cert, tls.ca)


def _install(example: Path, tmp_path: Path) -> tuple[Path, dict[str, str]]:
    """Copy ``example`` to tmp_path/etc/bridge.yaml with state moved into tmp_path.

    Return the copy and an environment holding every token it needs.
    """
    text = example.read_text().replace(STATE_DIR, str(tmp_path / "state"))
    path = tmp_path / "etc" / "bridge.yaml"
    path.parent.mkdir()
    path.write_text(text)
    return path, _tokens(yaml.safe_load(text))


def _schema_keys(cls=Config) -> set[str]:
    """Every key name of the configuration schema, at every depth."""
    names = set()
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if f.name == "source":  # set by the loader, not a key
            continue
        names.add(f.name)
        for hint in [hints[f.name], *typing.get_args(hints[f.name])]:
            if dataclasses.is_dataclass(hint):
                names |= _schema_keys(hint)
    return names


# -- the example configurations ---------------------------------------------------


@pytest.mark.parametrize("example", BRIDGE_EXAMPLES, ids=_ids(BRIDGE_EXAMPLES))
def test_example_loads_with_its_key_files_checked(example, tmp_path):
    path, env = _install(example, tmp_path)
    _make_files(load_config(path, env=env, check_files=False), tmp_path / "pki")

    config = load_config(path, env=env)

    assert config.source == path
    assert config.node.data_dir == tmp_path / "state"


@pytest.mark.parametrize("example", BRIDGE_EXAMPLES, ids=_ids(BRIDGE_EXAMPLES))
def test_example_key_paths_resolve_beside_the_file(example):
    raw = yaml.safe_load(example.read_text())
    config = load_config(example, env=_tokens(raw), check_files=False)

    for peer in config.peers:
        assert peer.encryption_key.is_relative_to(example.parent / "keys")
    for sender in config.senders:
        assert all(
            k.is_relative_to(example.parent / "keys") for k in sender.signing_keys
        )


@pytest.mark.parametrize("example", BRIDGE_EXAMPLES, ids=_ids(BRIDGE_EXAMPLES))
def test_example_writes_no_token(example):
    raw = yaml.safe_load(example.read_text())

    tokens = [p.get("token", "") for p in raw.get("peers") or []]
    tokens += [s.get("token", "") for s in raw.get("senders") or []]
    tokens.append((raw.get("http") or {}).get("admin_token", ""))

    assert set(tokens) == {""}


def test_receiver_example_names_the_missing_token_variable(tmp_path):
    path, _ = _install(ROOT / "conf" / "receiver.yaml", tmp_path)

    with pytest.raises(ConfigError) as info:
        load_config(path, env={}, check_files=False)

    assert info.value.problems == [
        "senders[0]: needs a token or client_cert_sha256 "
        "(or JMIX_BRIDGE_SENDER_SITE_A_TOKEN)"
    ]


def test_example_with_a_readable_private_key_is_refused(tmp_path):
    path, env = _install(ROOT / "conf" / "sender.yaml", tmp_path)
    config = load_config(path, env=env, check_files=False)
    _make_files(config, tmp_path / "pki")
    (config.keys_dir / "encryption.key").chmod(0o644)

    with pytest.raises(ConfigError) as info:
        load_config(path, env=env)

    assert any("encryption.key is readable by group" in p for p in info.value.problems)


@pytest.mark.parametrize("example", BRIDGE_EXAMPLES, ids=_ids(BRIDGE_EXAMPLES))
def test_every_key_in_example_has_a_comment(example):
    keys = _schema_keys()
    key_line = re.compile(r"^\s*(?:-\s+)?([a-z_]+):(?:\s|$)")
    uncommented = []
    previous = ""
    for number, line in enumerate(example.read_text().splitlines(), 1):
        match = key_line.match(line)
        commented = "#" in line or previous.lstrip().startswith("#")
        if match and match.group(1) in keys and not commented:
            uncommented.append(f"{number}: {line.strip()}")
        previous = line

    assert uncommented == []


def test_docs_mention_every_key_of_the_schema():
    docs = (ROOT / "docs" / "configuration.md").read_text()

    missing = sorted(k for k in _schema_keys() if f"`{k}`" not in docs)

    assert missing == []


def test_every_key_of_the_schema_appears_in_a_commented_example():
    examples = "".join(p.read_text() for p in ROOT.glob("conf/*.yaml"))

    missing = sorted(
        k for k in _schema_keys() if not re.search(rf"^\s*-?\s*{k}:", examples, re.M)
    )

    assert missing == []


def test_docs_name_every_token_variable_form():
    docs = (ROOT / "docs" / "configuration.md").read_text()

    for variable in (
        "JMIX_BRIDGE_PEER_<NAME>_TOKEN",
        "JMIX_BRIDGE_SENDER_<NAME>_TOKEN",
        "JMIX_BRIDGE_ADMIN_TOKEN",
    ):
        assert variable in docs


# -- docker/ ------------------------------------------------------------------------


def _dockerfile() -> dict[str, list[str]]:
    """Return the Dockerfile's instructions, continuation lines joined, by keyword."""
    text = (ROOT / "docker" / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    instructions: dict[str, list[str]] = {}
    for line in text.splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            keyword, _, rest = line.strip().partition(" ")
            instructions.setdefault(keyword.upper(), []).append(rest.strip())
    return instructions


def _exec_form(value: str) -> list[str]:
    return yaml.safe_load(value)  # a JSON array is a YAML flow sequence


def _compose() -> dict:
    return yaml.safe_load((ROOT / "docker" / "compose.yaml").read_text())


def test_dockerfile_installs_with_the_readme_command():
    readme = (ROOT / "README.md").read_text()
    quick_start = readme.split("## Quick start", 1)[1].split("```sh", 1)[1]
    readme_target = re.search(r"pip install (\S+)", quick_start.split("```")[0])[1]

    installs = [
        re.search(r"pip install (?:--\S+\s+)*(\S+)", run)
        for run in _dockerfile()["RUN"]
        if "pip install" in run
    ]

    assert [m[1] for m in installs] == [readme_target]


def test_dockerfile_runs_the_bridge_run_verb_on_the_mounted_config():
    instructions = _dockerfile()
    entrypoint = _exec_form(instructions["ENTRYPOINT"][0])
    command = _exec_form(instructions["CMD"][0])

    args = build_parser().parse_args(command)

    assert entrypoint == ["jmix-bridge"]
    assert command[0] == "run"
    assert args.config == "/etc/jmix-bridge/bridge.yaml"


def test_dockerfile_base_user_volume_and_ports():
    instructions = _dockerfile()

    assert instructions["FROM"] == ["python:3.11-slim"]
    assert instructions["USER"][-1].split(":")[0] not in ("root", "0")
    assert _exec_form(instructions["VOLUME"][0]) == [STATE_DIR]
    assert instructions["EXPOSE"] == ["11112 8080"]


def test_image_and_compose_health_checks_ask_readyz_alike():
    image_check = _dockerfile()["HEALTHCHECK"][0].split(" CMD ", 1)[1]
    bridges = [s for n, s in _compose()["services"].items() if n.startswith("site-")]

    assert HEALTHCHECK_URL in image_check
    for service in bridges:
        assert service["healthcheck"]["test"] == ["CMD", *_exec_form(image_check)]


def test_compose_names_two_bridges_and_orthanc():
    services = _compose()["services"]

    assert {"site-a", "site-b", "orthanc"} <= set(services)
    assert services["orthanc"]["image"].split(":")[0] in (
        "orthancteam/orthanc",
        "jodogne/orthanc",
    )
    assert services["site-a"]["depends_on"]["site-b"]["condition"] == "service_healthy"
    assert services["site-b"]["depends_on"]["orthanc"]["condition"] == (
        "service_healthy"
    )


def _service_config(name: str) -> Config:
    """Load the docker/ file compose mounts as service ``name``'s bridge.yaml,
    with the environment compose gives that service."""
    service = _compose()["services"][name]
    for volume in service["volumes"]:
        source, target, *_ = volume.split(":")
        if target == "/etc/jmix-bridge/bridge.yaml":
            path = (ROOT / "docker" / source).resolve()
            return load_config(path, env=service["environment"], check_files=False)
    raise AssertionError(f"{name}: no configuration at /etc/jmix-bridge/bridge.yaml")


def test_compose_site_a_delivers_to_the_site_b_service():
    site_a, site_b = _service_config("site-a"), _service_config("site-b")

    url = urlparse(site_a.peers[0].url)

    assert url.hostname == "site-b"
    assert url.port == site_b.http.port
    assert site_a.peers[0].entity.id == site_b.node.id
    assert site_b.senders[0].id == site_a.node.id


def test_compose_site_b_forwards_to_the_orthanc_service():
    orthanc = _compose()["services"]["orthanc"]["environment"]

    (destination,) = _service_config("site-b").destinations

    assert destination.host == "orthanc"
    assert destination.port == int(orthanc["ORTHANC__DICOM_PORT"])
    assert destination.ae_title == orthanc["ORTHANC__DICOM_AET"]


def test_compose_sets_the_token_variables_the_configs_read():
    services = _compose()["services"]

    assert set(services["site-a"]["environment"]) == {env_name("PEER", "site-b")}
    assert set(services["site-b"]["environment"]) == {env_name("SENDER", "site-a")}
    assert all(
        value.startswith("${JMIX_DEMO_TOKEN")
        for name in ("site-a", "site-b")
        for value in services[name]["environment"].values()
    )


def test_compose_keygen_fills_the_folders_the_configs_read():
    services = _compose()["services"]
    keygen = " ".join(services["keygen"]["command"])

    for site in ("site-a", "site-b"):
        mounts = services[site]["volumes"]
        assert f"{site}-data:{STATE_DIR}" in mounts
        assert "public-keys:/etc/jmix-bridge/keys:ro" in mounts
    assert "jmix-bridge keygen" in keygen
    assert "/public/$$site/" in keygen  # $$: compose's escape for a shell $


# -- the systemd unit ---------------------------------------------------------------


def _unit() -> dict[str, list[str]]:
    settings: dict[str, list[str]] = {}
    for line in (ROOT / "conf" / "jmix-bridge.service").read_text().splitlines():
        if "=" in line and not line.startswith("#"):
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


def test_systemd_unit_runs_the_bridge_hardened():
    unit = _unit()

    assert unit["ExecStart"] == [
        "/usr/local/bin/jmix-bridge run -c /etc/jmix-bridge/bridge.yaml"
    ]
    assert unit["KillSignal"] == ["SIGTERM"]
    assert unit["Restart"] == ["on-failure"]
    assert unit["User"] != ["root"]
    assert unit["CapabilityBoundingSet"] == [""]
    assert unit["ReadWritePaths"] == [STATE_DIR]
    assert unit["RestrictAddressFamilies"] == ["AF_INET AF_INET6 AF_UNIX"]
    for option in (
        "NoNewPrivileges",
        "ProtectHome",
        "PrivateTmp",
        "PrivateDevices",
        "ProtectKernelTunables",
        "ProtectKernelModules",
        "MemoryDenyWriteExecute",
        "LockPersonality",
        "RestrictRealtime",
        "RestrictSUIDSGID",
    ):
        assert unit[option] == ["yes"], option
    assert unit["ProtectSystem"] == ["strict"]
    assert "@system-service" in unit["SystemCallFilter"]
    assert unit["UMask"] == ["0077"]
    assert unit["EnvironmentFile"]


@pytest.mark.skipif(not shutil.which("systemd-analyze"), reason="no systemd-analyze")
def test_systemd_unit_passes_systemd_analyze_verify(tmp_path):
    # verify insists that ExecStart exists, so point it at this installation.
    installed = shutil.which("jmix-bridge")
    if installed is None:
        pytest.skip("jmix-bridge is not installed on PATH")
    text = (ROOT / "conf" / "jmix-bridge.service").read_text()
    unit = tmp_path / "jmix-bridge.service"
    unit.write_text(text.replace("/usr/local/bin/jmix-bridge", installed))

    result = subprocess.run(
        ["systemd-analyze", "verify", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
