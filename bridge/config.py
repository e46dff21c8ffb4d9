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
import urllib.parse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

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
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: no backslash


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
    max_attempts: int = 50
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


@dataclass(frozen=True)
class StoreSettings:
    """The state store; ``url`` defaults to SQLite in the data folder."""

    url: str = ""


@dataclass(frozen=True)
class SpoolSettings:
    """The spool folder and its free-disk watermark."""

    path: Path | None = None  # default: data_dir/spool
    min_free_bytes: Size = Size(1 * 2**30)
    min_free_ratio: float = 0.02


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
    url: str = ""  # the peer's base address; envelopes go to <url>/api/jmix
    signing_key: Path | None = None  # the peer's signing.pub, checks its receipts
    transport: Literal["http", "drop"] = "http"
    drop_folder: Path | None = None
    token: Secret = _secret_field()
    tls: TLSFiles | None = None
    dialect: Literal["spec", "rs"] = "spec"
    timeout_seconds: float = 60.0
    retry: RetrySettings = field(default_factory=RetrySettings)
    circuit: CircuitSettings = field(default_factory=CircuitSettings)


@dataclass(frozen=True)
class SenderSettings:
    """A remote site this bridge accepts envelopes from."""

    name: str
    id: str
    signing_keys: tuple[Path, ...] = ()
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
        problems.append(f"{where}: expected a mapping, got {_show(data)}")
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
                f"got {_show(value)}"
            )
        return value
    if origin is tuple:
        if not isinstance(value, list):
            problems.append(f"{path}: expected a list, got {_show(value)}")
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
                f"patterns, got {_show(value)}"
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
                f"'1 GiB', got {_show(value)}"
            )
        return size
    if hint is bool:
        if not isinstance(value, bool):
            problems.append(f"{path}: expected true or false, got {_show(value)}")
        return value
    if hint is int:
        if isinstance(value, bool) or not isinstance(value, int):
            problems.append(f"{path}: expected an integer, got {_show(value)}")
        return value
    if hint is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            problems.append(f"{path}: expected a number, got {_show(value)}")
            return value
        return float(value)
    if hint is Path:
        if not isinstance(value, str) or not value:
            problems.append(f"{path}: expected a path, got {_show(value)}")
            return Path()
        return (base / Path(value).expanduser()).resolve()
    if hint in (str, Secret):
        if not isinstance(value, str):
            problems.append(f"{path}: expected a string, got {_show(value)}")
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


def _show(value) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def env_name(section: str, name: str) -> str:
    """Return the environment variable that overrides a token."""
    return f"JMIX_BRIDGE_{section}_{re.sub(r'[^A-Z0-9]', '_', name.upper())}_TOKEN"


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


# -- cross checks ----------------------------------------------------------------


def cross_check(config: Config, *, check_files: bool = True) -> list[str]:
    """Return the problems that span several keys or touch the filesystem."""
    problems: list[str] = []
    _check_port("dicom.port", config.dicom.port, problems)
    _check_port("http.port", config.http.port, problems)
    if not _AE.match(config.dicom.ae_title) or config.dicom.ae_title.strip() == "":
        problems.append(
            f"dicom.ae_title: expected 1-16 printable characters without "
            f"backslash, got {_show(config.dicom.ae_title)}"
        )
    if config.dicom.max_associations < 1:
        problems.append(
            "dicom.max_associations: expected at least 1, got "
            f"{config.dicom.max_associations}"
        )
    if not 0 <= config.spool.min_free_ratio < 1:
        problems.append(
            "spool.min_free_ratio: expected a number from 0 to 1, got "
            f"{config.spool.min_free_ratio}"
        )

    peer_names = _unique("peers", [p.name for _, p in _items(config.peers)], problems)
    _unique("senders", [s.name for _, s in _items(config.senders)], problems)
    dest_names = _unique(
        "destinations", [d.name for _, d in _items(config.destinations)], problems
    )
    _unique("routes", [r.name for _, r in _items(config.routes)], problems)

    for i, route in _items(config.routes):
        where = f"routes[{i}]"
        if not route.peers:
            problems.append(f"{where}.peers: expected at least one peer")
        for j, peer in enumerate(route.peers):
            if peer not in peer_names:
                problems.append(
                    f"{where}.peers[{j}]: no peer named {peer!r} "
                    f"(peers: {', '.join(sorted(peer_names)) or 'none'})"
                )
        if route.quiet_seconds <= 0 or route.max_age_seconds <= 0:
            problems.append(
                f"{where}: quiet_seconds and max_age_seconds must be positive"
            )
    for i, peer in _items(config.peers):
        where = f"peers[{i}]"
        if peer.transport == "http" and not re.match(r"^https?://", peer.url):
            problems.append(
                f"{where}.url: expected an http:// or https:// URL, got "
                f"{_show(peer.url)}"
            )
        if peer.transport == "drop" and peer.drop_folder is None:
            problems.append(f"{where}.drop_folder: required when transport is drop")
        if (
            peer.transport == "http"
            and not peer.token
            and not (peer.tls and peer.tls.cert)
        ):
            problems.append(
                f"{where}: needs a token or a client certificate (tls.cert); set "
                f"token or {env_name('PEER', peer.name)}"
            )
        _check_ranges(where, peer, problems)
        if check_files:
            _check_writable(f"{where}.drop_folder", peer.drop_folder, problems)
            _check_file(f"{where}.encryption_key", peer.encryption_key, problems)
            _check_file(f"{where}.signing_key", peer.signing_key, problems)
            _check_tls(f"{where}.tls", peer.tls, problems)
    for i, sender in _items(config.senders):
        where = f"senders[{i}]"
        if sender.trust == "signed" and not sender.signing_keys:
            problems.append(f"{where}.signing_keys: required with trust 'signed'")
        if not sender.token and not sender.client_cert_sha256:
            problems.append(
                f"{where}: needs a token or client_cert_sha256 "
                f"(or {env_name('SENDER', sender.name)})"
            )
        pin = sender.client_cert_sha256.replace(":", "")
        if pin and not re.fullmatch(r"[0-9A-Fa-f]{64}", pin):
            problems.append(
                f"{where}.client_cert_sha256: expected 64 hex digits "
                f"(colons allowed), got {_show(sender.client_cert_sha256)}"
            )
        if sender.reply_peer and sender.reply_peer not in peer_names:
            problems.append(f"{where}.reply_peer: no peer named {sender.reply_peer!r}")
        if check_files:
            for j, key in enumerate(sender.signing_keys):
                _check_file(f"{where}.signing_keys[{j}]", key, problems)
    for i, dest in _items(config.destinations):
        _check_port(f"destinations[{i}].port", dest.port, problems)
        if check_files:
            _check_tls(f"destinations[{i}].tls", dest.tls, problems)
    for j, name in enumerate(config.receiving.destinations):
        if name not in dest_names:
            problems.append(
                f"receiving.destinations[{j}]: no destination named {name!r}"
            )
    for i, dest in _items(config.destinations):
        _check_ranges(f"destinations[{i}]", dest, problems)
        if dest.dimse_timeout <= 0:
            problems.append(
                f"destinations[{i}].dimse_timeout: expected a positive "
                f"number of seconds, got {dest.dimse_timeout}"
            )
    for where, tls in (("dicom.tls", config.dicom.tls), ("http.tls", config.http.tls)):
        if tls is not None and tls.cert is None:
            # A server section without its certificate would serve in the clear.
            problems.append(f"{where}.cert: a server needs its certificate and key")
        if tls is not None and tls.require_client_cert and tls.ca is None:
            problems.append(
                f"{where}.require_client_cert: needs {where}.ca, the "
                "certificates that may issue client certificates"
            )
    if config.dicom.max_pdu < 0:
        problems.append(
            f"dicom.max_pdu: expected 0 (unlimited) or more, got {config.dicom.max_pdu}"
        )
    _check_store_url(config.store_url, problems)
    _check_token_names(config, problems)
    if check_files:
        _check_tls("dicom.tls", config.dicom.tls, problems)
        _check_tls("http.tls", config.http.tls, problems)
        _check_keys(config, problems)
        _check_writable("node.data_dir", config.node.data_dir, problems)
        _check_writable("spool.path", config.spool.path, problems)
        _check_writable(
            "receiving.inbox_folder", config.receiving.inbox_folder, problems
        )
    return problems


def _check_ranges(where: str, settings, problems: list[str]) -> None:
    """Check a peer's or destination's retry and circuit numbers."""
    retry, circuit = settings.retry, settings.circuit
    if retry.factor < 1:
        problems.append(f"{where}.retry.factor: expected 1 or more, got {retry.factor}")
    for name in ("initial_seconds", "max_seconds", "max_age_seconds"):
        if getattr(retry, name) < 0:
            problems.append(
                f"{where}.retry.{name}: expected 0 or more seconds, got "
                f"{getattr(retry, name)}"
            )
    if retry.max_attempts < 1:
        problems.append(
            f"{where}.retry.max_attempts: expected 1 or more, got {retry.max_attempts}"
        )
    if circuit.failures_to_open < 1 or circuit.open_seconds < 0:
        problems.append(
            f"{where}.circuit: expected failures_to_open of 1 or more "
            "and open_seconds of 0 or more"
        )
    timeout = getattr(settings, "timeout_seconds", 1.0)
    if timeout <= 0:
        problems.append(
            f"{where}.timeout_seconds: expected a positive number, got {timeout}"
        )


def _check_store_url(url: str, problems: list[str]) -> None:
    if url.startswith("sqlite:///") or "://" not in url:
        return
    scheme = url.split("://", 1)[0]
    if scheme not in ("postgresql", "postgres"):
        problems.append(
            f"store.url: scheme {scheme!r} is not supported, expected "
            "sqlite:///PATH or postgresql://HOST/DBNAME"
        )
    elif urllib.parse.urlsplit(url).password or "password=" in url:
        # Like every secret of the bridge, kept out of the file (docs/postgres.md).
        problems.append(
            "store.url: a password in the url is refused; give it in "
            "PGPASSWORD or a passfile"
        )


def _check_token_names(config: Config, problems: list[str]) -> None:
    """Two names that map to one token variable would share a secret."""
    for section, items in (("PEER", config.peers), ("SENDER", config.senders)):
        seen: dict[str, str] = {}
        for _, item in _items(items):
            var = env_name(section, item.name)
            if var in seen and seen[var] != item.name:
                problems.append(
                    f"{item.name!r} and {seen[var]!r} both read their "
                    f"token from {var}; rename one"
                )
            seen.setdefault(var, item.name)


def _resolve_store(config: Config, base: Path) -> Config:
    """Take a relative ``sqlite:///`` path relative to the configuration's folder."""
    url = config.store.url
    if url.startswith("sqlite:///") and not url.startswith("sqlite:////"):
        path = (base / url.removeprefix("sqlite:///")).resolve()
        return dataclasses.replace(config, store=StoreSettings(url=f"sqlite:///{path}"))
    return config


def _items(seq) -> list[tuple[int, Any]]:
    """Return ``(index, item)`` for the items that were built (not None)."""
    return [(i, item) for i, item in enumerate(seq) if item is not None]


def _check_port(where: str, port, problems: list[str]) -> None:
    if isinstance(port, int) and not 0 <= port <= 65535:
        problems.append(f"{where}: expected an integer 0-65535, got {port}")


def _unique(where: str, names: list[str], problems: list[str]) -> set[str]:
    seen: set[str] = set()
    for i, name in enumerate(names):
        if not _NAME.match(name):
            problems.append(
                f"{where}[{i}].name: expected letters, digits, '.', '_' "
                f"or '-' (up to 64), got {_show(name)}"
            )
        if name in seen:
            problems.append(f"{where}[{i}].name: {name!r} is used twice")
        seen.add(name)
    return seen


def _check_file(
    where: str, path: Path | None, problems: list[str], private: bool = False
) -> None:
    if path is None:
        return
    if not path.is_file():
        problems.append(f"{where}: no such file: {path}")
        return
    if not os.access(path, os.R_OK):
        problems.append(f"{where}: not readable: {path}")
        return
    if private and path.stat().st_mode & 0o077:
        problems.append(
            f"{where}: {path} is readable by group or others "
            f"(mode {path.stat().st_mode & 0o777:o}); chmod 600 it"
        )


def _check_tls(where: str, tls: TLSFiles | None, problems: list[str]) -> None:
    if tls is None:
        return
    if (tls.cert is None) != (tls.key is None):
        problems.append(f"{where}: cert and key go together")
    _check_file(f"{where}.cert", tls.cert, problems)
    _check_file(f"{where}.key", tls.key, problems, private=True)
    _check_file(f"{where}.ca", tls.ca, problems)


def _check_keys(config: Config, problems: list[str]) -> None:
    keys = config.keys_dir
    if config.node.generate_keys and not (keys / "signing.key").exists():
        return  # created at start-up
    for name in ("signing.key", "encryption.key"):
        _check_file(f"node.keys ({name})", keys / name, problems, private=True)


def _check_writable(where: str, folder: Path | None, problems: list[str]) -> None:
    if folder is None:
        return
    probe = folder
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    if not probe.is_dir() or not os.access(probe, os.W_OK | os.X_OK):
        problems.append(f"{where}: {folder} cannot be created or written")
