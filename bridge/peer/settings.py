"""Settings of the peer exchange: who we send to, who may send to us, and how.

Retry and circuit-breaker policies are those of every worker
(:mod:`bridge.workers.policy`).

Frozen dataclasses that :mod:`bridge.config` fills one to one from the YAML
configuration. Paths are :class:`pathlib.Path`; secrets (tokens) are masked in
``repr`` so that a settings object can be logged or shown in a traceback.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path

MASK = "***"


def _masked_repr(obj: object, secrets: tuple[str, ...]) -> str:
    """Return a dataclass ``repr`` with the named fields shown as ``***`` when set."""
    parts = []
    for f in fields(obj):
        value = getattr(obj, f.name)
        shown = MASK if f.name in secrets and value else repr(value)
        parts.append(f"{f.name}={shown}")
    return f"{type(obj).__name__}({', '.join(parts)})"


@dataclass(frozen=True)
class PeerSettings:
    """A peer we deliver envelopes to.

    ``transport`` is ``"http"`` (POST to ``url``, the JMIX endpoint API of
    ``JMIX.md`` section 5) or ``"drop"`` (write into ``drop_folder``, to be
    carried by any file transfer). ``url`` is the peer's base address; the
    envelope goes to ``<url>/api/jmix``. ``ca_file`` verifies the peer's TLS
    certificate (the system store when None); ``client_cert``/``client_key``
    present our own. ``timeout_seconds`` bounds connecting and each read or
    write, not the whole upload.
    """

    name: str
    url: str = ""
    token: str = ""
    ca_file: Path | None = None
    client_cert: Path | None = None
    client_key: Path | None = None
    timeout_seconds: float = 30.0
    transport: str = "http"
    drop_folder: Path | None = None

    def __repr__(self) -> str:
        return _masked_repr(self, ("token",))


@dataclass(frozen=True)
class InboundSender:
    """A peer allowed to send us envelopes, and how we recognise and trust it.

    ``id`` is the sender's JMIX entity id as its manifests write it; when set,
    an envelope must name it, and its signing keys are pinned for that id only.
    Over HTTP the request must carry ``token`` as a bearer token when it is set,
    and a TLS client certificate whose DER has SHA-256 ``client_cert_sha256``
    (hex, either case, colons allowed) when that is set; at least one of the two
    must be set. ``trust`` is ``"signed"`` (the envelope must be signed by one of
    ``signing_keys``) or ``"transport"`` (the credential suffices), as in
    ``JMIX.md`` section 4; a drop-folder inbox has no credential, so there only
    ``signed`` applies. ``require_encryption`` refuses clear envelopes.
    """

    name: str
    id: str = ""
    token: str = ""
    client_cert_sha256: str = ""
    trust: str = "signed"
    signing_keys: tuple[Path, ...] = field(default_factory=tuple)
    require_encryption: bool = True

    def __repr__(self) -> str:
        return _masked_repr(self, ("token",))


@dataclass(frozen=True)
class ServerSettings:
    """Where and how the envelope API listens.

    TLS is on when ``tls_cert`` and ``tls_key`` are set. ``client_ca`` holds the
    certificates that may issue client certificates (for self-signed client
    certificates, the certificates themselves); with it set a client may present
    a certificate, and with ``require_client_cert`` it must. ``port`` 0 picks a
    free port. ``max_body_bytes`` bounds one upload. An upload that sends no
    byte for ``body_idle_seconds`` is cut (and stores nothing); a client
    address may hold ``max_connections_per_client`` connections at once, and
    further ones are closed as they open.
    """

    host: str = "127.0.0.1"
    port: int = 8443
    tls_cert: Path | None = None
    tls_key: Path | None = None
    client_ca: Path | None = None
    require_client_cert: bool = False
    max_body_bytes: int = 20 << 30
    body_idle_seconds: float = 30.0
    max_connections_per_client: int = 16
