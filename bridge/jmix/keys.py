"""Key files: Ed25519 signing keys and X25519 encryption keys (docs/envelope.md 6).

A key folder holds four PEM files: ``signing.key`` (PKCS #8, Ed25519),
``signing.pub`` (SubjectPublicKeyInfo, Ed25519), ``encryption.key`` and
``encryption.pub`` (the same for X25519). PEM is what OpenSSL reads and writes,
so an operator can inspect or produce the files with standard tools. Private key
files are written mode 0600 and refused when group or others may access them.

A key is named by its fingerprint, ``SHA256:`` followed by the lower-case hex
SHA-256 of the 32 raw public key bytes.
"""

import base64
import hashlib
import os
import stat
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import (
    Ed25519PrivateKey,
    Ed25519PublicKey,
)
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)

from bridge.errors import KeyFileError

SIGNING_KEY = "signing.key"
SIGNING_PUB = "signing.pub"
ENCRYPTION_KEY = "encryption.key"
ENCRYPTION_PUB = "encryption.pub"

PublicKey = Ed25519PublicKey | X25519PublicKey


def raw_public(public_key: PublicKey) -> bytes:
    """Return the 32 raw bytes of an Ed25519 or X25519 public key."""
    return public_key.public_bytes(
        serialization.Encoding.Raw, serialization.PublicFormat.Raw
    )


def fingerprint(public_key: PublicKey) -> str:
    """Return ``SHA256:<lower-case hex>`` of the key's raw public bytes."""
    return "SHA256:" + hashlib.sha256(raw_public(public_key)).hexdigest()


def normalise_fingerprint(text: str) -> str:
    """Return a fingerprint with the hex in lower case (input may use either case)."""
    prefix, sep, hexpart = text.partition(":")
    if prefix.upper() != "SHA256" or not sep or len(hexpart) != 64:
        raise ValueError(f"expected 'SHA256:' and 64 hex digits, got {text!r:.80}")
    bytes.fromhex(hexpart)
    return "SHA256:" + hexpart.lower()


@dataclass(frozen=True)
class KeyDirInfo:
    """What :func:`generate_key_dir` made: the folder and both fingerprints."""

    path: Path
    signing_fingerprint: str
    encryption_fingerprint: str


@dataclass(frozen=True)
class KeyDir:
    """The private keys of one key folder; ``repr`` shows only fingerprints."""

    path: Path
    signing_key: Ed25519PrivateKey = field(repr=False)
    encryption_key: X25519PrivateKey = field(repr=False)

    @property
    def signing_fingerprint(self) -> str:
        """Fingerprint of the signing public key."""
        return fingerprint(self.signing_key.public_key())

    @property
    def encryption_fingerprint(self) -> str:
        """Fingerprint of the encryption public key."""
        return fingerprint(self.encryption_key.public_key())

    def __repr__(self) -> str:
        return (
            f"KeyDir(path={str(self.path)!r}, signing={self.signing_fingerprint}, "
            f"encryption={self.encryption_fingerprint}, private keys masked)"
        )


def _write(path: Path, data: bytes, mode: int) -> None:
    # O_EXCL: never overwrite an existing key; the mode is set at creation so the
    # private bytes are never readable by others, not even for an instant.
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    with os.fdopen(fd, "wb") as fh:
        fh.write(data)
        fh.flush()
        os.fsync(fh.fileno())
    os.chmod(path, mode)


def generate_key_dir(path: str | os.PathLike) -> KeyDirInfo:
    """Create ``path`` with a fresh signing and encryption key pair.

    The folder may exist if it is empty. Raises :class:`KeyFileError` when a key
    file is already there.
    """
    folder = Path(path)
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    names = (SIGNING_KEY, SIGNING_PUB, ENCRYPTION_KEY, ENCRYPTION_PUB)
    if clash := [n for n in names if (folder / n).exists()]:
        raise KeyFileError(f"{folder}: already holds {', '.join(clash)}; not replaced")

    signing = Ed25519PrivateKey.generate()
    encryption = X25519PrivateKey.generate()
    for private, key_name, pub_name in (
        (signing, SIGNING_KEY, SIGNING_PUB),
        (encryption, ENCRYPTION_KEY, ENCRYPTION_PUB),
    ):
        pem = private.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
        pub = private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        _write(folder / key_name, pem, 0o600)
        _write(folder / pub_name, pub, 0o644)

    return KeyDirInfo(
        folder, fingerprint(signing.public_key()), fingerprint(encryption.public_key())
    )


def _read(path: str | os.PathLike, private: bool) -> bytes:
    try:
        info = os.stat(path)
        if not stat.S_ISREG(info.st_mode):
            raise KeyFileError(f"{path}: not a regular file")
        if private and info.st_mode & 0o077:
            raise KeyFileError(
                f"{path}: private key is accessible by group or others "
                f"(mode {stat.S_IMODE(info.st_mode):04o}); run chmod 600"
            )
        with open(path, "rb") as fh:
            return fh.read(64 * 1024)
    except OSError as exc:
        raise KeyFileError(f"{path}: cannot read key file: {exc.strerror}") from exc


def _load(path, private: bool, kind: type, label: str):
    data = _read(path, private)
    loader = (
        serialization.load_pem_private_key
        if private
        else serialization.load_pem_public_key
    )
    try:
        key = loader(data, None) if private else loader(data)
    except (ValueError, TypeError, UnsupportedAlgorithm) as exc:
        raise KeyFileError(f"{path}: expected a PEM {label}, found none") from exc
    if not isinstance(key, kind):
        raise KeyFileError(
            f"{path}: expected a PEM {label}, found a {type(key).__name__[1:]}"
        )
    return key


def load_signing_key(path: str | os.PathLike) -> Ed25519PrivateKey:
    """Load an Ed25519 private key from a PEM file that only its owner can read."""
    return _load(path, True, Ed25519PrivateKey, "Ed25519 private key")


def load_signing_public(path: str | os.PathLike) -> Ed25519PublicKey:
    """Load an Ed25519 public key (a ``signing.pub``)."""
    return _load(path, False, Ed25519PublicKey, "Ed25519 public key")


def load_encryption_key(path: str | os.PathLike) -> X25519PrivateKey:
    """Load an X25519 private key from a PEM file that only its owner can read."""
    return _load(path, True, X25519PrivateKey, "X25519 private key")


def load_encryption_public(path: str | os.PathLike) -> X25519PublicKey:
    """Load an X25519 public key (an ``encryption.pub``)."""
    return _load(path, False, X25519PublicKey, "X25519 public key")


def load_key_dir(path: str | os.PathLike) -> KeyDir:
    """Load both private keys of a key folder made by :func:`generate_key_dir`."""
    folder = Path(path)
    return KeyDir(
        folder,
        load_signing_key(folder / SIGNING_KEY),
        load_encryption_key(folder / ENCRYPTION_KEY),
    )


# -- out-of-band exchange --------------------------------------------------------

_BLOCK_BEGIN = "-----BEGIN JMIX-BRIDGE PUBLIC KEYS-----"
_BLOCK_END = "-----END JMIX-BRIDGE PUBLIC KEYS-----"


@dataclass(frozen=True)
class PublicKeys:
    """A site's public keys as exchanged out of band (docs/governance.md 3)."""

    signing: Ed25519PublicKey
    encryption: X25519PublicKey | None = None
    node_id: str | None = None

    def block(self) -> str:
        """Return the text block ``keygen`` prints and ``trust add`` reads.

        One line per key: its kind, the raw public key in base64 and its
        fingerprint, so that the receiving operator can read the fingerprint
        back over the telephone before pinning it.
        """
        lines = [_BLOCK_BEGIN]
        if self.node_id:
            lines.append(f"id: {self.node_id}")
        for label, key in (("signing", self.signing), ("encryption", self.encryption)):
            if key is not None:
                kind = "ed25519" if label == "signing" else "x25519"
                raw = base64.b64encode(raw_public(key)).decode("ascii")
                lines.append(f"{label}: {kind} {raw} {fingerprint(key)}")
        lines.append(_BLOCK_END)
        return "\n".join(lines) + "\n"


def read_public_keys(text: str) -> PublicKeys:
    """Parse a public key block; refuse a key whose fingerprint does not match.

    Raises KeyFileError naming the line that is wrong.
    """
    try:
        start = text.index(_BLOCK_BEGIN) + len(_BLOCK_BEGIN)
        body = text[start : text.index(_BLOCK_END, start)]
    except ValueError:
        raise KeyFileError("no JMIX-BRIDGE PUBLIC KEYS block found") from None
    found: dict[str, object] = {}
    for number, line in enumerate(body.strip().splitlines(), 1):
        label, _, value = line.strip().partition(": ")
        if label == "id" and value:
            found["id"] = value.strip()
            continue
        parts = value.split()
        wanted = {"signing": "ed25519", "encryption": "x25519"}.get(label)
        if wanted is None or len(parts) != 3 or parts[0] != wanted:
            raise KeyFileError(
                f"public key block line {number}: expected "
                f"'signing: ed25519 <base64> <fingerprint>' or "
                f"'encryption: x25519 <base64> <fingerprint>', got {line.strip()!r:.80}"
            )
        kind = Ed25519PublicKey if label == "signing" else X25519PublicKey
        try:
            key = kind.from_public_bytes(base64.b64decode(parts[1], validate=True))
            stated = normalise_fingerprint(parts[2])
        except ValueError as exc:
            raise KeyFileError(f"public key block line {number}: {exc}") from None
        if stated != fingerprint(key):
            raise KeyFileError(
                f"public key block line {number}: the fingerprint {parts[2]} does "
                f"not match the key (its fingerprint is {fingerprint(key)})"
            )
        found[label] = key
    if "signing" not in found:
        raise KeyFileError("public key block: no 'signing:' line")
    return PublicKeys(found["signing"], found.get("encryption"), found.get("id"))


def public_pem(key: PublicKey) -> bytes:
    """Return a public key as PEM SubjectPublicKeyInfo (a ``.pub`` file)."""
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def write_public_keys(keys: PublicKeys, folder: str | os.PathLike) -> list[Path]:
    """Write ``signing.pub`` (and ``encryption.pub``) into ``folder``; never overwrite.

    Returns the files written. Raises KeyFileError when one exists already.
    """
    target = Path(folder)
    target.mkdir(mode=0o755, parents=True, exist_ok=True)
    pairs = [(target / SIGNING_PUB, keys.signing)]
    if keys.encryption is not None:
        pairs.append((target / ENCRYPTION_PUB, keys.encryption))
    if clash := [p.name for p, _ in pairs if p.exists()]:
        raise KeyFileError(f"{target}: already holds {', '.join(clash)}; not replaced")
    for path, key in pairs:
        _write(path, public_pem(key), 0o644)
    return [p for p, _ in pairs]
