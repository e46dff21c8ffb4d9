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
    """A pinned signing key and the sender id it may sign for (None: any)."""

    sender_id: str | None
    public_key: Ed25519PublicKey


class TrustStore:
    """Pinned sender signing keys, looked up by fingerprint.

    Built from ``signing.pub`` paths (the key may sign for any sender id) or from
    ``(sender_id, key_or_path)`` pairs (the key signs only for that id).
    """

    def __init__(
        self,
        entries: Iterable[
            str | os.PathLike | tuple[str | None, Ed25519PublicKey | str | os.PathLike]
        ] = (),
    ):
        self._pins: dict[str, Pin] = {}
        for entry in entries:
            sender_id, key = entry if isinstance(entry, tuple) else (None, entry)
            if not isinstance(key, Ed25519PublicKey):
                key = load_signing_public(key)
            self.add(key, sender_id)

    def add(self, public_key: Ed25519PublicKey, sender_id: str | None = None) -> str:
        """Pin ``public_key`` (for ``sender_id``, if given); return its fingerprint."""
        fp = fingerprint(public_key)
        self._pins[fp] = Pin(sender_id, public_key)
        return fp

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


@dataclass(frozen=True)
class OpenPolicy:
    """What a receiver accepts (docs/envelope.md section 8).

    ``trust="signed"``: the sender assertion and ``manifest.jws`` must verify with
    a pinned key and bind our profile's fields, and ``files.json`` must cover the
    payload. ``trust="transport"``: the sender was authenticated by its transport
    credential; signatures are checked when they can be and the outcome recorded
    in ``warnings``, and ``files.json`` is optional.
    """

    require_encryption: bool = True
    expiry: Literal["reject", "warn"] = "reject"
    expected_receiver_id: str | None = None
    trust: Literal["signed", "transport"] = "signed"

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


DEFAULT_POLICY = OpenPolicy()
"""The default: signed trust, encryption required, expired assertions rejected."""
