"""The bridge's configuration: YAML in, frozen typed objects out.

``load_config(path)`` reads a file with ``yaml.safe_load``; ``load_config(None)``
uses the embedded defaults of the quick start. Validation collects every
problem with its path (``peers[1].port: expected an integer 1-65535, got
'eleven'``) and raises one :class:`~bridge.errors.ConfigError` listing them all,
before the daemon opens any socket. Unknown keys are errors.

Secrets (tokens) may come from the environment instead of the file: the
variable ``JMIX_BRIDGE_<SECTION>_<NAME>_TOKEN`` (section ``PEER``, ``SENDER`` or
``ADMIN``; name upper-cased, other characters as ``_``) overrides the file's
value. Every key is documented in ``docs/configuration.md``.
"""

from __future__ import annotations

import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from bridge.config_checks import cross_check, env_name, show_value
from bridge.errors import ConfigError

_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}
_Policy = Literal["required", "verified-if-present", "ignored"]


class Size(int):
    """A byte count; YAML may write it as ``1073741824`` or ``"1 GiB"``."""


class Secret(str):
    """A string that never shows itself in ``repr`` (tokens)."""

    def __repr__(self) -> str:
        return "Secret('***')" if self else "Secret('')"


def _secret_field():
    return field(default=Secret(""), repr=False)


@dataclass(frozen=True)
class TLSFiles:
    """Certificate, key and trusted CAs for one TLS endpoint."""

    cert: Path | None = None
    key: Path | None = None
    ca: Path | None = None
    require_client_cert: bool = False


@dataclass(frozen=True)
class RetrySettings:
    """Backoff and dead-letter limits (see bridge.workers.policy.RetryPolicy)."""

    initial_seconds: float = 5.0
    factor: float = 2.0
    max_seconds: float = 600.0
    max_attempts: int = 0  # 0: no limit, max_age_seconds decides
    max_age_seconds: float = 3 * 86400.0


@dataclass(frozen=True)
class CircuitSettings:
    """When a target's circuit breaker opens and for how long."""

    failures_to_open: int = 5
    open_seconds: float = 60.0


@dataclass(frozen=True)
class NodeSettings:
    """Who this bridge is, and where it keeps its state."""

    id: str = "org:jmix-bridge-local"
    name: str = "jmix-bridge"
    contact: str = "operator@localhost"
    data_dir: Path = Path("jmix-bridge-data")
    keys: Path | None = None  # default: data_dir/keys
    generate_keys: bool = False
    # written, signed, into every sender assertion (docs/governance.md 3)
    key_reference: str = ""
    # a directory's attestation of our signing key (``jmix-bridge attest``)
    directory_attestation: Path | None = None


@dataclass(frozen=True)
class StoreSettings:
    """The state store; ``url`` defaults to SQLite in the data folder.

    ``busy_timeout_seconds`` is how long a SQLite write waits for another
    connection's lock before it fails (and its work is retried).
    """

    url: str = ""
    busy_timeout_seconds: float = 30.0


@dataclass(frozen=True)
class SpoolSettings:
    """The spool folder, its free-disk watermark and how long finished work stays."""

    path: Path | None = None  # default: data_dir/spool
    min_free_bytes: Size = Size(1 * 2**30)
    min_free_ratio: float = 0.02
    retention_hours: float = 168.0  # 0 keeps everything


@dataclass(frozen=True)
class AllowedCaller:
    """A calling AE title allowed to associate, optionally only from one host."""

    ae_title: str
    host: str = ""


@dataclass(frozen=True)
class DicomSettings:
    """The DICOM listener (C-STORE and C-ECHO SCP)."""

    ae_title: str = "JMIXBRIDGE"
    host: str = "0.0.0.0"  # noqa: S104 (a DICOM node listens on the network)
    port: int = 11112
    check_called_ae: bool = True
    allowed_callers: tuple[AllowedCaller, ...] = ()
    max_associations: int = 10
    max_pdu: int = 0
    duplicates: Literal["keep-newest", "reject"] = "keep-newest"
    unrouted: Literal["reject", "hold"] = "reject"
    tls: TLSFiles | None = None


@dataclass(frozen=True)
class HttpSettings:
    """The HTTP server: peer API, metrics, health, admin API and status page."""

    host: str = "127.0.0.1"
    port: int = 8080
    tls: TLSFiles | None = None
    max_body_bytes: Size = Size(20 * 2**30)
    body_idle_seconds: float = 30.0
    max_connections_per_client: int = 16
    admin_token: Secret = _secret_field()


@dataclass(frozen=True)
class RouteSettings:
    """Which instances go to which peers, and when a study is complete."""

    name: str
    peers: tuple[str, ...]
    calling_ae: tuple[str, ...] = ()  # glob patterns; empty matches any
    called_ae: tuple[str, ...] = ()
    # keyword: a glob or a list of globs
    match: dict[str, str | tuple[str, ...]] = field(default_factory=dict)
    quiet_seconds: float = 30.0
    max_age_seconds: float = 3600.0
    # each: {keyword: glob or globs}, or a plain SeriesDescription glob
    required_series: tuple[dict[str, str | tuple[str, ...]] | str, ...] = ()
    requester: Path | None = None  # a signed request file (``jmix-bridge request``)


@dataclass(frozen=True)
class StudyRequestSettings:
    """A signed request for one study, matched by StudyInstanceUID or AccessionNumber.

    Exactly one of the two is set. Its requester goes into the envelopes of
    that study for the peer the request names, in preference to the route's.
    """

    request: Path  # a signed request file (``jmix-bridge request``)
    study_instance_uid: str = ""
    accession_number: str = ""


@dataclass(frozen=True)
class EntitySettings:
    """The JMIX entity of a remote site, as written in manifests."""

    id: str
    name: str = ""
    contact: str = ""


@dataclass(frozen=True)
class PeerSettings:
    """A remote site this bridge sends envelopes to."""

    name: str
    entity: EntitySettings
    encryption_key: Path  # the peer's encryption.pub
    encryption_key_fingerprint: str = ""  # when set, encryption_key must match
    url: str = ""  # the peer's base address; envelopes go to <url>/api/jmix
    signing_key: Path | None = None  # the peer's signing.pub, checks its receipts
    signing_key_fingerprint: str = ""  # when set, signing_key must match
    transport: Literal["http", "drop"] = "http"
    drop_folder: Path | None = None
    token: Secret = _secret_field()
    tls: TLSFiles | None = None
    dialect: Literal["spec", "rs"] = "spec"
    timeout_seconds: float = 60.0
    retry: RetrySettings = field(default_factory=RetrySettings)
    circuit: CircuitSettings = field(default_factory=CircuitSettings)


@dataclass(frozen=True)
class PinnedKey:
    """A pinned Ed25519 public key file and the id it speaks for."""

    id: str
    key: Path


@dataclass(frozen=True)
class GovernanceSettings:
    """What a receiver requires of one sender's governance elements.

    Each is "required", "verified-if-present" or "ignored"
    (docs/governance.md section 5); the attestation policy "auto" means
    "verified-if-present" when directory keys are configured, else "ignored".
    """

    requester: _Policy = "verified-if-present"
    attestation: Literal["auto", "required", "verified-if-present", "ignored"] = "auto"
    key_reference: _Policy = "verified-if-present"
    audit: _Policy = "verified-if-present"


@dataclass(frozen=True)
class SenderSettings:
    """A remote site this bridge accepts envelopes from."""

    name: str
    id: str
    signing_keys: tuple[Path, ...] = ()
    signing_key_fingerprints: tuple[str, ...] = ()  # when set, pins signing_keys
    key_reference: str = ""  # the reference its assertions must name
    requester_keys: tuple[PinnedKey, ...] = ()
    governance: GovernanceSettings = field(default_factory=GovernanceSettings)
    token: Secret = _secret_field()
    client_cert_sha256: str = ""
    trust: Literal["signed", "transport"] = "signed"
    require_encryption: bool = True
    reply_peer: str = ""  # the peer that receipts go back to


@dataclass(frozen=True)
class DestinationSettings:
    """A local PACS that opened envelopes are forwarded to."""

    name: str
    ae_title: str
    host: str
    port: int
    calling_ae_title: str = "JMIXBRIDGE"
    tls: TLSFiles | None = None
    dimse_timeout: float = 10.0
    storage_commitment: bool = False
    retry: RetrySettings = field(default_factory=RetrySettings)
    circuit: CircuitSettings = field(default_factory=CircuitSettings)


@dataclass(frozen=True)
class ReceivingSettings:
    """How received envelopes are checked and where they go."""

    expiry: Literal["reject", "warn"] = "reject"
    destinations: tuple[str, ...] = ()  # default: every destination
    inbox_folder: Path | None = None  # drop-folder transport, watched
    directory_keys: tuple[PinnedKey, ...] = ()  # by provider name
    audit_node_keys: tuple[PinnedKey, ...] = ()  # other nodes that sign audit entries


@dataclass(frozen=True)
class LoggingSettings:
    """Log level and line format."""

    level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = "INFO"
    format: Literal["kv", "json"] = "kv"


@dataclass(frozen=True)
class Config:
    """The whole configuration of one bridge process."""

    node: NodeSettings = field(default_factory=NodeSettings)
    store: StoreSettings = field(default_factory=StoreSettings)
    spool: SpoolSettings = field(default_factory=SpoolSettings)
    dicom: DicomSettings = field(default_factory=DicomSettings)
    http: HttpSettings = field(default_factory=HttpSettings)
    routes: tuple[RouteSettings, ...] = ()
    study_requests: tuple[StudyRequestSettings, ...] = ()
    peers: tuple[PeerSettings, ...] = ()
    senders: tuple[SenderSettings, ...] = ()
    destinations: tuple[DestinationSettings, ...] = ()
    receiving: ReceivingSettings = field(default_factory=ReceivingSettings)
    logging: LoggingSettings = field(default_factory=LoggingSettings)
    source: Path | None = None  # the file it came from, None for defaults

    @property
    def keys_dir(self) -> Path:
        """The folder holding this node's key files."""
        return self.node.keys or self.node.data_dir / "keys"

    @property
    def spool_dir(self) -> Path:
        """The spool folder."""
        return self.spool.path or self.node.data_dir / "spool"

    @property
    def store_url(self) -> str:
        """The state store's url."""
        return self.store.url or f"sqlite:///{self.node.data_dir / 'state.db'}"

    def peer(self, name: str) -> PeerSettings:
        """Return the peer called ``name``."""
        return next(p for p in self.peers if p.name == name)

    def destination(self, name: str) -> DestinationSettings:
        """Return the destination called ``name``."""
        return next(d for d in self.destinations if d.name == name)


# -- loading -------------------------------------------------------------------


def load_config(
    path: Path | str | None,
    *,
    env: dict[str, str] | None = None,
    check_files: bool = True,
) -> Config:
    """Read, type-check and cross-check a configuration; raise ConfigError.

    Relative paths in the file are taken relative to the file's folder.
    ``check_files`` also checks that key files exist, are readable, and that
    private ones are not readable by group or others.
    """
    env = os.environ if env is None else env
    if path is None:
        raw: Any = {}
        base = Path.cwd()
    else:
        path = Path(path)
        try:
            raw = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        except OSError as exc:
            raise ConfigError([f"{path}: cannot read: {exc.strerror}"]) from exc
        except yaml.YAMLError as exc:
            raise ConfigError([f"{path}: not valid YAML: {exc}"]) from exc
        base = path.resolve().parent
    if not isinstance(raw, dict):
        raise ConfigError([f"{path}: expected a mapping at the top level"])
    config = config_from_mapping(raw, base, env=env, check_files=check_files)
    return dataclasses.replace(config, source=Path(path).resolve() if path else None)


def config_from_mapping(
    raw: dict,
    base: Path,
    *,
    env: dict[str, str] | None = None,
    check_files: bool = True,
) -> Config:
    """Validate a configuration given as a mapping (as YAML would give it).

    Relative paths are taken relative to ``base``. Raises ConfigError.
    """
    env = os.environ if env is None else env
    problems: list[str] = []
    config = _build(Config, raw, "", problems, base)
    if config is not None:
        config = _apply_env(_resolve_store(config, base), env)
        problems += cross_check(config, check_files=check_files)
    if problems:
        raise ConfigError(problems)
    return config


def _build(cls, data: Any, path: str, problems: list[str], base: Path):
    """Build dataclass ``cls`` from ``data``, appending problems; None on failure."""
    where = path or "(top level)"
    if not isinstance(data, dict):
        problems.append(f"{where}: expected a mapping, got {show_value(data)}")
        return None
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.name != "source"}
    for key in data:
        if key not in fields:
            problems.append(
                f"{_join(path, key)}: unknown key (expected one of "
                f"{', '.join(sorted(fields))})"
            )
    # A field that fails keeps its default, so that the cross checks can still
    # run over the rest and every problem is reported in one go; only a
    # required field that fails makes the whole object fail.
    values = {}
    broken = False
    for name, f in fields.items():
        required = (
            f.default is dataclasses.MISSING
            and f.default_factory is dataclasses.MISSING
        )
        if name not in data:
            if required:
                problems.append(f"{_join(path, name)}: required")
                broken = True
            continue
        before = len(problems)
        value = _convert(hints[name], data[name], _join(path, name), problems, base)
        if len(problems) == before:
            values[name] = value
        elif required:
            broken = True
    return None if broken else cls(**values)


def _convert(hint, value, path: str, problems: list[str], base: Path):
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (types.UnionType, typing.Union):
        if value is None and type(None) in args:
            return None
        # Pick the member the value's shape fits; a plain string stays a string.
        options = [a for a in args if a is not type(None)]
        if isinstance(value, str) and str in options:
            hint = str
        else:
            hint = next((a for a in options if a is not str), options[0])
        return _convert(hint, value, path, problems, base)
    if origin is Literal:
        if value not in args:
            problems.append(
                f"{path}: expected one of {', '.join(map(str, args))}, "
                f"got {show_value(value)}"
            )
        return value
    if origin is tuple:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {show_value(value)}")
            return ()
        items = (
            _convert(args[0], item, f"{path}[{i}]", problems, base)
            for i, item in enumerate(value)
        )
        # A failed item stays as None so that later paths keep their index;
        # cross_check skips it, and the configuration is refused anyway.
        return tuple(items)
    if origin is dict:
        if not isinstance(value, dict) or not all(
            isinstance(k, str) and _is_patterns(v) for k, v in value.items()
        ):
            problems.append(
                f"{path}: expected a mapping of keywords to a pattern or a list of "
                f"patterns, got {show_value(value)}"
            )
            return {}
        return {
            k: tuple(map(str, v)) if isinstance(v, list) else str(v)
            for k, v in value.items()
        }
    if dataclasses.is_dataclass(hint):
        return _build(hint, value, path, problems, base)
    return _scalar(hint, value, path, problems, base)


def _is_patterns(value) -> bool:
    if isinstance(value, list):
        return bool(value) and all(isinstance(v, str | int) for v in value)
    return isinstance(value, str | int) and not isinstance(value, bool)


def _scalar(hint, value, path: str, problems: list[str], base: Path):
    if hint is Size:
        size = _parse_size(value)
        if size is None:
            problems.append(
                f"{path}: expected a size such as 1073741824 or "
                f"'1 GiB', got {show_value(value)}"
            )
        return size
    if hint is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {show_value(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {show_value(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{path}: expected a number, got {show_value(value)}")
            return value
        return float(value)
    if hint is Path:
        if not isinstance(value, str) or not value:
            problems.append(f"{path}: expected a path, got {show_value(value)}")
            return Path()
        return (base / Path(value).expanduser()).resolve()
    if hint in (str, Secret):
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {show_value(value)}")
        return hint(value) if isinstance(value, str) else value
    raise TypeError(f"no converter for {hint}")  # a bug in the dataclasses above


def _parse_size(value) -> Size | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return Size(value)
    if isinstance(value, str):
        match = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*", value)
        if match and match.group(2).lower() in _SIZE_UNITS:
            return Size(
                int(float(match.group(1)) * _SIZE_UNITS[match.group(2).lower()])
            )
    return None


def _join(path: str, key) -> str:
    return f"{path}.{key}" if path else str(key)


def _apply_env(config: Config, env) -> Config:
    def token(section: str, name: str, current: Secret) -> Secret:
        return Secret(env.get(env_name(section, name), current))

    return dataclasses.replace(
        config,
        peers=tuple(
            p and dataclasses.replace(p, token=token("PEER", p.name, p.token))
            for p in config.peers
        ),
        senders=tuple(
            s and dataclasses.replace(s, token=token("SENDER", s.name, s.token))
            for s in config.senders
        ),
        http=dataclasses.replace(
            config.http,
            admin_token=Secret(
                env.get("JMIX_BRIDGE_ADMIN_TOKEN", config.http.admin_token)
            ),
        ),
    )


def _resolve_store(config: Config, base: Path) -> Config:
    """Take a relative ``sqlite:///`` path relative to the configuration's folder."""
    url = config.store.url
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        path = (base / url.removeprefix("sqlite:///")).resolve()
        return dataclasses.replace(config, store=StoreSettings(url=f"sqlite:///{path}"))
    return config
