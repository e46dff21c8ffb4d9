"""JMIX envelopes as a library: keys, pack, verify, open (docs/envelope.md).

This package knows nothing of DICOM networking, HTTP or queues. Format
internals live in underscore modules; everything public is re-exported here.
Errors come from :mod:`bridge.errors` (the ``EnvelopeError`` branch and
``KeyFileError``).
"""

from bridge.errors import UnpackableStudy

from ._sender import check_sender, read_manifest
from .keys import (
    KeyDir,
    KeyDirInfo,
    fingerprint,
    generate_key_dir,
    load_encryption_key,
    load_encryption_public,
    load_key_dir,
    load_signing_key,
    load_signing_public,
)
from .open import OpenedEnvelope, inspect_envelope, open_envelope, verify_envelope
from .pack import PackResult, pack
from .trust import Entity, OpenPolicy, TrustStore

DIALECTS_READ = ("spec", "rs", "js")
DIALECTS_WRITTEN = ("spec", "rs")

__all__ = [
    "DIALECTS_READ",
    "DIALECTS_WRITTEN",
    "Entity",
    "KeyDir",
    "KeyDirInfo",
    "OpenPolicy",
    "OpenedEnvelope",
    "PackResult",
    "TrustStore",
    "UnpackableStudy",
    "check_sender",
    "fingerprint",
    "generate_key_dir",
    "inspect_envelope",
    "load_encryption_key",
    "load_encryption_public",
    "load_key_dir",
    "load_signing_key",
    "load_signing_public",
    "open_envelope",
    "pack",
    "read_manifest",
    "verify_envelope",
]
