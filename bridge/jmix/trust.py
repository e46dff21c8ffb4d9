"""Who sends and receives, whose keys we trust, and what a receiver accepts."""

import os
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

from .keys import fingerprint, load_signing_public, normalise_fingerprint


@dataclass(frozen=True)
class Entity:
    """A sender or receiver as the manifest names it (id, name, contact)."""

    id: str
    name: str
    contact: str

    def __post_init__(self):
        for attr in ("id", "name", "contact"):
            if not isinstance(getattr(self, attr), str) or not getattr(self, attr):
                raise ValueError(f"Entity.{attr}: expected a non-empty string")

    def as_json(self) -> dict:
        """Return the manifest form of the entity."""
        return {"id": self.id, "name": self.name, "contact": self.contact}


@dataclass(frozen=True)
class Pin:
    """A pinned signing key, the id it may sign for (None: any) and its reference.

    ``key_reference`` is the reference (for example
    ``directory://org/clinic-a#key-ed25519``) an assertion made with this key
    must name, when the pin has one (docs/governance.md section 3).
    """

    sender_id: str | None
    public_key: Ed25519PublicKey
    key_reference: str | None = None


class TrustStore:
    """Pinned sender signing keys, looked up by fingerprint.

    Built from ``signing.pub`` paths (the key may sign for any sender id), from
    ``(sender_id, key_or_path)`` pairs (the key signs only for that id) or from
    ``(sender_id, key_or_path, key_reference)`` triples (and assertions made with
    it must name that reference). The same class pins requester keys, directory
    keys and the keys of nodes that sign audit entries; the id is then the
    requester's, the directory's provider name or the node's.
    """

    def __init__(
        self,
        entries: Iterable[
            str
            | os.PathLike
            | tuple[str | None, Ed25519PublicKey | str | os.PathLike]
            | tuple[str | None, Ed25519PublicKey | str | os.PathLike, str | None]
        ] = (),
    ):
        self._pins: dict[str, Pin] = {}
        for entry in entries:
            if not isinstance(entry, tuple):
                entry = (None, entry)
            sender_id, key, *rest = entry
            if not isinstance(key, Ed25519PublicKey):
                key = load_signing_public(key)
            self.add(key, sender_id, rest[0] if rest else None)

    def add(
        self,
        public_key: Ed25519PublicKey,
        sender_id: str | None = None,
        key_reference: str | None = None,
    ) -> str:
        """Pin ``public_key`` (for ``sender_id``, if given); return its fingerprint."""
        fp = fingerprint(public_key)
        self._pins[fp] = Pin(sender_id, public_key, key_reference)
        return fp

    def merged(self, *others: "TrustStore") -> "TrustStore":
        """Return a new store holding this store's pins and those of ``others``."""
        merged = TrustStore()
        for store in (self, *others):
            merged._pins.update(store._pins)
        return merged

    def lookup(self, fp: str) -> Pin | None:
        """Return the pin for a fingerprint (either case of hex), or None."""
        try:
            return self._pins.get(normalise_fingerprint(fp))
        except ValueError:
            return None

    def __len__(self) -> int:
        return len(self._pins)

    def __repr__(self) -> str:
        return f"TrustStore({sorted(self._pins)})"


GovernancePolicy = Literal["required", "verified-if-present", "ignored"]
GOVERNANCE_POLICIES = ("required", "verified-if-present", "ignored")


@dataclass(frozen=True)
class OpenPolicy:
    """What a receiver accepts (docs/envelope.md section 8, docs/governance.md).

    ``trust="signed"``: the sender assertion and ``manifest.jws`` must verify with
    a pinned key and bind our profile's fields, and ``files.json`` must cover the
    payload. ``trust="transport"``: the sender was authenticated by its transport
    credential; signatures are checked when they can be and the outcome recorded
    in ``warnings``, and ``files.json`` is optional.

    The governance elements (requester assertion, directory attestation,
    ``key_reference``, signed audit entries) each take one of
    ``"required"`` (absent or failing: refused), ``"verified-if-present"``
    (absent: recorded; failing: refused) or ``"ignored"`` (never refused; what
    can be checked still is, and the outcome is recorded as a warning).
    ``attestation=None`` means ``"verified-if-present"`` when
    ``directory_trust`` holds a key and ``"ignored"`` otherwise.
    ``requester_trust`` pins requester keys (by requester id),
    ``directory_trust`` the directories' keys (by provider name), and
    ``audit_trust`` the keys of nodes other than the sender whose audit entries
    this receiver can check (by node id); the sender's own entries are checked
    against the sender's trust store.
    """

    require_encryption: bool = True
    expiry: Literal["reject", "warn"] = "reject"
    expected_receiver_id: str | None = None
    trust: Literal["signed", "transport"] = "signed"
    requester: GovernancePolicy = "verified-if-present"
    requester_trust: TrustStore | None = None
    attestation: GovernancePolicy | None = None
    directory_trust: TrustStore | None = None
    key_reference: GovernancePolicy = "verified-if-present"
    audit: GovernancePolicy = "verified-if-present"
    audit_trust: TrustStore | None = None

    def __post_init__(self):
        if self.expiry not in ("reject", "warn"):
            raise ValueError(
                f"OpenPolicy.expiry: expected 'reject' or 'warn', got {self.expiry!r}"
            )
        if self.trust not in ("signed", "transport"):
            raise ValueError(
                "OpenPolicy.trust: expected 'signed' or 'transport', "
                f"got {self.trust!r}"
            )
        for name in ("requester", "attestation", "key_reference", "audit"):
            value = getattr(self, name)
            if value is None and name == "attestation":
                continue
            if value not in GOVERNANCE_POLICIES:
                raise ValueError(
                    f"OpenPolicy.{name}: expected one of "
                    f"{', '.join(GOVERNANCE_POLICIES)}, got {value!r}"
                )

    @property
    def attestation_policy(self) -> GovernancePolicy:
        """The attestation policy in force, with the default resolved."""
        if self.attestation is not None:
            return self.attestation
        return "verified-if-present" if self.directory_trust else "ignored"


DEFAULT_POLICY = OpenPolicy()
"""The default: signed trust, encryption required, expired assertions rejected."""
