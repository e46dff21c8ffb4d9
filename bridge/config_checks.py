"""The configuration's cross checks: what spans several keys or touches files.

:func:`cross_check` runs after every key has its type (``bridge.config``) and
returns every problem it finds, each with the path of the key it concerns, so
``check-config`` can show them all at once. With ``check_files`` it also opens
the files the configuration names: key files must exist and be readable, and
private ones readable by their owner only; pinned fingerprints must match the
key files they pin; request and attestation files must parse.
"""

from __future__ import annotations

import json
import os
import re
import urllib.parse
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from bridge.errors import BridgeError
from bridge.jmix import (
    fingerprint,
    load_encryption_public,
    load_signing_public,
    read_request,
)
from bridge.jmix.attestation import read_attestation_unverified
from bridge.jmix.keys import normalise_fingerprint

if TYPE_CHECKING:
    from bridge.config import Config, TLSFiles

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
_AE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 6.2: no backslash


def env_name(section: str, name: str) -> str:
    """Return the environment variable that overrides a token."""
    return f"JMIX_BRIDGE_{section}_{re.sub(r'[^A-Z0-9]', '_', name.upper())}_TOKEN"


def show_value(value) -> str:
    """Return a short printable form of a configured value, for a problem."""
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def cross_check(config: Config, *, check_files: bool = True) -> list[str]:
    """Return the problems that span several keys or touch the filesystem."""
    problems: list[str] = []
    _check_port("dicom.port", config.dicom.port, problems)
    _check_port("http.port", config.http.port, problems)
    if not _AE.match(config.dicom.ae_title) or config.dicom.ae_title.strip() == "":
        problems.append(
            f"dicom.ae_title: expected 1-16 printable characters without "
            f"backslash, got {show_value(config.dicom.ae_title)}"
        )
    if config.dicom.max_associations < 1:
        problems.append(
            "dicom.max_associations: expected at least 1, got "
            f"{config.dicom.max_associations}"
        )
    if config.store.busy_timeout_seconds < 0:
        problems.append(
            "store.busy_timeout_seconds: expected a number of seconds from 0, got "
            f"{config.store.busy_timeout_seconds}"
        )
    if not config.http.body_idle_seconds > 0:
        problems.append(
            "http.body_idle_seconds: expected a number of seconds above 0, got "
            f"{config.http.body_idle_seconds}"
        )
    if config.http.max_connections_per_client < 1:
        problems.append(
            "http.max_connections_per_client: expected at least 1, got "
            f"{config.http.max_connections_per_client}"
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
                f"{show_value(peer.url)}"
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
                f"(colons allowed), got {show_value(sender.client_cert_sha256)}"
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
        if (
            dest.storage_commitment
            and config.dicom.check_called_ae
            and dest.calling_ae_title != config.dicom.ae_title
        ):
            # The PACS sends its result to the AE that asked: our listener.
            problems.append(
                f"destinations[{i}].calling_ae_title: storage commitment results "
                f"come back to {dest.calling_ae_title!r}, but the listener is "
                f"{config.dicom.ae_title!r}; make them equal or set "
                "dicom.check_called_ae to false"
            )
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
    _check_pins(config, problems)
    if check_files:
        _check_governance_files(config, problems)
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
    if retry.max_attempts < 0:
        problems.append(
            f"{where}.retry.max_attempts: expected 0 (no limit) or more, "
            f"got {retry.max_attempts}"
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
                f"or '-' (up to 64), got {show_value(name)}"
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
    if not path.exists():
        problems.append(f"{where}: no such file: {path}")
        return
    if not path.is_file():
        problems.append(f"{where}: not a regular file: {path}")
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


# -- governance: pinned fingerprints, requests, attestations --------------------


def _check_pins(config: Config, problems: list[str]) -> None:
    """Check the fingerprints and ids written in the file, without opening keys."""
    for i, peer in _items(config.peers):
        for name in ("encryption_key_fingerprint", "signing_key_fingerprint"):
            _parse_fingerprint(f"peers[{i}].{name}", getattr(peer, name), problems)
        if peer.signing_key_fingerprint and peer.signing_key is None:
            problems.append(f"peers[{i}].signing_key_fingerprint: needs signing_key")
    for i, sender in _items(config.senders):
        for j, text in enumerate(sender.signing_key_fingerprints):
            where = f"senders[{i}].signing_key_fingerprints[{j}]"
            _parse_fingerprint(where, text, problems)
        for j, pin in _items(sender.requester_keys):
            _check_pin_id(f"senders[{i}].requester_keys[{j}]", pin.id, problems)
        policy = sender.governance.attestation
        if policy in ("required", "verified-if-present") and not (
            config.receiving.directory_keys
        ):
            problems.append(
                f"senders[{i}].governance.attestation: {policy!r} needs "
                "receiving.directory_keys, the directories trusted to attest keys"
            )
    for section in ("directory_keys", "audit_node_keys"):
        for j, pin in _items(getattr(config.receiving, section)):
            _check_pin_id(f"receiving.{section}[{j}]", pin.id, problems)
    for i, rule in _items(config.study_requests):
        given = sum(1 for v in (rule.study_instance_uid, rule.accession_number) if v)
        if given != 1:
            problems.append(
                f"study_requests[{i}]: expected exactly one of study_instance_uid "
                f"and accession_number, got {given}"
            )


def _check_governance_files(config: Config, problems: list[str]) -> None:
    """Open the key, request and attestation files governance settings name."""
    for i, peer in _items(config.peers):
        _check_fingerprint(
            f"peers[{i}].encryption_key",
            peer.encryption_key,
            peer.encryption_key_fingerprint,
            load_encryption_public,
            problems,
        )
        _check_fingerprint(
            f"peers[{i}].signing_key",
            peer.signing_key,
            peer.signing_key_fingerprint,
            load_signing_public,
            problems,
        )
    for i, sender in _items(config.senders):
        _check_sender_pins(i, sender, problems)
        for j, pin in _items(sender.requester_keys):
            _check_public(f"senders[{i}].requester_keys[{j}].key", pin.key, problems)
    for section in ("directory_keys", "audit_node_keys"):
        for j, pin in _items(getattr(config.receiving, section)):
            _check_public(f"receiving.{section}[{j}].key", pin.key, problems)
    peers = {p.name: p for _, p in _items(config.peers)}
    for i, route in _items(config.routes):
        if route.requester is not None:
            _check_request(
                f"routes[{i}].requester", route.requester, route.peers, peers, problems
            )
    for i, rule in _items(config.study_requests):
        # The study may take any route: the request must name one of our peers.
        ids = {p.entity.id for p in peers.values()}
        request = _check_request(
            f"study_requests[{i}].request", rule.request, (), peers, problems
        )
        if request is not None and request.receiver_id not in ids:
            problems.append(
                f"study_requests[{i}].request: the request is for delivery to "
                f"{request.receiver_id!r}, which is no configured peer's entity id"
            )
    if config.node.directory_attestation is not None:
        _check_attestation(config, problems)


def _parse_fingerprint(where: str, text: str, problems: list[str]) -> str | None:
    if not text:
        return None
    try:
        return normalise_fingerprint(text)
    except ValueError:
        problems.append(
            f"{where}: expected 'SHA256:' and 64 hex digits, got {show_value(text)}"
        )
        return None


def _check_pin_id(where: str, pin_id: str, problems: list[str]) -> None:
    if not pin_id.strip():
        problems.append(f"{where}.id: expected a non-empty id")


def _load_public(where: str, path: Path, loader, problems: list[str]):
    """Load a public key file for a check; None (with a problem) when it fails."""
    try:
        return loader(path)
    except (BridgeError, OSError, ValueError) as exc:
        problems.append(f"{where}: {path}: {exc}")
        return None


def _check_public(where: str, path: Path, problems: list[str]) -> None:
    before = len(problems)
    _check_file(where, path, problems)
    if len(problems) == before:
        _load_public(where, path, load_signing_public, problems)


def _check_fingerprint(
    where: str, path: Path | None, pinned: str, loader, problems: list[str]
) -> None:
    """A key file with a pinned fingerprint must be the key that was pinned."""
    want = _parse_fingerprint(f"{where}_fingerprint", pinned, problems)
    if path is None or want is None or not path.is_file():
        return
    key = _load_public(where, path, loader, problems)
    if key is not None and fingerprint(key) != want:
        problems.append(
            f"{where}: {path} has fingerprint {fingerprint(key)}, but "
            f"{where}_fingerprint pins {want}"
        )


def _check_sender_pins(i: int, sender, problems: list[str]) -> None:
    """With signing_key_fingerprints, the key files and the pins must agree."""
    where = f"senders[{i}]"
    # Malformed pins were reported by _check_pins; here they are left out.
    pinned = [
        fp
        for text in sender.signing_key_fingerprints
        if (fp := _parse_fingerprint(where, text, []))
    ]
    if not pinned:
        return
    found = set()
    for j, path in enumerate(sender.signing_keys):
        if not path.is_file():
            continue  # reported by the file check
        key = _load_public(
            f"{where}.signing_keys[{j}]", path, load_signing_public, problems
        )
        if key is None:
            continue
        found.add(fingerprint(key))
        if fingerprint(key) not in pinned:
            problems.append(
                f"{where}.signing_keys[{j}]: {path} has fingerprint "
                f"{fingerprint(key)}, which signing_key_fingerprints does not list"
            )
    for fp in pinned:
        if fp not in found:
            problems.append(
                f"{where}.signing_key_fingerprints: {fp} is pinned but no "
                "signing_keys file holds it"
            )


def _check_request(
    where: str, path: Path, names: Iterable[str], peers: dict, problems: list[str]
):
    """A request file must verify and be made for each of the peers ``names``.

    Returns the request, or None (with a problem) when it cannot be read.
    """
    before = len(problems)
    _check_file(where, path, problems)
    if len(problems) > before:
        return None
    try:
        request = read_request(path)
    except (BridgeError, OSError) as exc:
        problems.append(f"{where}: {path}: {exc}")
        return None
    for name in names:
        peer = peers.get(name)
        if peer is not None and peer.entity.id != request.receiver_id:
            problems.append(
                f"{where}: the request is for delivery to {request.receiver_id!r}, "
                f"but peer {name!r} is {peer.entity.id!r}"
            )
    return request


def _check_attestation(config: Config, problems: list[str]) -> None:
    """Our directory attestation must parse and attest our own signing key."""
    where = "node.directory_attestation"
    path = config.node.directory_attestation
    before = len(problems)
    _check_file(where, path, problems)
    if len(problems) > before:
        return
    try:
        doc = read_attestation_unverified(json.loads(path.read_bytes()))
    except (BridgeError, OSError, ValueError) as exc:
        problems.append(f"{where}: {path}: {exc}")
        return
    if doc["subject"] != config.node.id:
        problems.append(
            f"{where}: attests {doc['subject']!r}, but node.id is {config.node.id!r}"
        )
    public = config.keys_dir / "signing.pub"
    if public.is_file():
        key = _load_public(where, public, load_signing_public, problems)
        if key is not None and fingerprint(key) != doc["key_fingerprint"]:
            problems.append(
                f"{where}: attests key {doc['key_fingerprint']}, but this node "
                f"signs with {fingerprint(key)}"
            )
