"""JMIX envelopes as a library: keys, pack, verify, open (docs/envelope.md).

This package knows nothing of DICOM networking, HTTP or queues. Format
internals live in underscore modules; everything public is re-exported here.
Errors come from :mod:`bridge.errors` (the ``EnvelopeError`` branch and
``KeyFileError``).
"""

from bridge.errors import UnpackableStudy

from . import keys, request
from ._codec import load_json
from ._sender import check_sender, read_manifest
from .audit import append_audit, read_audit, verify_audit
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
from .request import Request, make_request, read_request
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
    "Request",
    "TrustStore",
    "UnpackableStudy",
    "append_audit",
    "check_sender",
    "fingerprint",
    "generate_key_dir",
    "inspect_envelope",
    "keys",
    "load_encryption_key",
    "load_encryption_public",
    "load_json",
    "load_key_dir",
    "load_signing_key",
    "load_signing_public",
    "make_request",
    "open_envelope",
    "pack",
    "read_audit",
    "read_manifest",
    "read_request",
    "request",
    "verify_audit",
    "verify_envelope",
]
