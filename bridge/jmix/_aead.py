"""Key agreement, key derivation and streaming AES-256-GCM (docs/envelope.md 4).

The payload key comes from X25519 between a fresh ephemeral key and the
recipient's key, then HKDF-SHA256 with no salt and a dialect-specific info
string. AES-256-GCM runs through the streaming ``Cipher`` API: the one-shot
``AESGCM`` holds the whole payload in memory and fails above 2 GiB. The 16-byte
tag travels in the manifest, so the ciphertext is exactly as long as the
plaintext.
"""

import hmac
import os

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric.x25519 import (
    X25519PrivateKey,
    X25519PublicKey,
)
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from bridge.errors import AuthenticationFailed

IV_BYTES = 12
TAG_BYTES = 16
KEY_BYTES = 32


def shared_secret(private: X25519PrivateKey, public: X25519PublicKey) -> bytes:
    """Return X25519(private, public), refusing the all-zero result.

    A low-order public key forces the all-zero secret (RFC 7748 section 6.1),
    which would let anyone derive the payload key; it is refused as an
    authentication failure.
    """
    try:
        secret = private.exchange(public)
    except ValueError as exc:
        # cryptography (OpenSSL 3) itself refuses the points it knows to be of
        # low order; the check below does not rely on that.
        raise AuthenticationFailed(stage="payload") from exc
    return refuse_zero_secret(secret)


def refuse_zero_secret(secret: bytes) -> bytes:
    """Return ``secret``, or raise AuthenticationFailed when it is all zero.

    RFC 7748 section 6.1: the check is done by the caller of X25519, in
    constant time, whatever the library below does.
    """
    if hmac.compare_digest(secret, bytes(KEY_BYTES)):
        raise AuthenticationFailed(stage="payload")
    return secret


def derive_key(secret: bytes, info: bytes) -> bytes:
    """Derive the 32-byte AES key: HKDF-SHA256, no salt, the dialect's info."""
    return HKDF(
        algorithm=hashes.SHA256(), length=KEY_BYTES, salt=None, info=info
    ).derive(secret)


class Sealer:
    """Encrypt a stream with AES-256-GCM; the key pair and IV are made here.

    Callers never choose a nonce: each ``Sealer`` draws a fresh ephemeral key
    and IV, so a key/IV pair cannot repeat.
    """

    def __init__(self, recipient: X25519PublicKey, info: bytes):
        ephemeral = X25519PrivateKey.generate()
        self.ephemeral_public = ephemeral.public_key()
        self.iv = os.urandom(IV_BYTES)
        key = derive_key(shared_secret(ephemeral, recipient), info)
        self._enc = Cipher(algorithms.AES(key), modes.GCM(self.iv)).encryptor()
        self.tag = b""

    def update(self, data: bytes) -> bytes:
        """Return the ciphertext of ``data`` (same length)."""
        return self._enc.update(data)

    def finish(self) -> bytes:
        """Finish the stream and return the 16-byte tag."""
        self._enc.finalize()
        self.tag = self._enc.tag
        return self.tag


class Opener:
    """Decrypt a stream with AES-256-GCM; :meth:`finish` authenticates it all.

    Plaintext returned by :meth:`update` is unauthenticated until
    :meth:`finish` returns; callers keep it out of any destination until then.
    """

    def __init__(self, key: bytes, iv: bytes, tag: bytes):
        self._dec = Cipher(algorithms.AES(key), modes.GCM(iv, tag)).decryptor()

    def update(self, data: bytes) -> bytes:
        """Return the (not yet authenticated) plaintext of ``data``."""
        return self._dec.update(data)

    def finish(self) -> None:
        """Check the tag; raise :class:`AuthenticationFailed` if it does not match."""
        try:
            self._dec.finalize()
        except InvalidTag as exc:
            raise AuthenticationFailed(stage="payload") from exc


def peek(key: bytes, iv: bytes, head: bytes) -> bytes:
    """Decrypt the first bytes of a ciphertext without authenticating them.

    Used only to guess which dialect's key derivation applies before the one
    authenticating pass; the guess is never trusted on its own.
    """
    return Cipher(algorithms.AES(key), modes.GCM(iv)).decryptor().update(head)
