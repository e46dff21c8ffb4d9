"""Property tests of the envelope reader against hostile input (issue #9).

Each property mutates something real (the committed vector envelopes, a payload
tar sealed and signed with the vector keys, the four JSON documents, base64
fields, signatures) and asserts the reader's contract: only
:class:`~bridge.errors.EnvelopeError` subclasses escape, nothing is written
outside the destination folder, nothing remains after a refusal, and each
example finishes in bounded time (a Hypothesis deadline, and an alarm that turns
a hang into a failure) and bounded memory (a tracemalloc peak).

``HYPOTHESIS_PROFILE=fuzz pytest tests/test_hostile_envelope.py`` runs 25 times
as many examples with a longer deadline; the default keeps the suite quick.
"""

from __future__ import annotations

import base64
import contextlib
import io
import json
import os
import signal
import string
import struct
import tarfile
import tempfile
import tracemalloc
import zipfile
from datetime import timedelta
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bridge.errors import AuthenticationFailed, EnvelopeError, SchemaViolation
from bridge.jmix import check_sender, verify_envelope
from bridge.jmix._codec import b64decode, b64url, b64url_decode, load_json
from bridge.jmix._payload import parse_files
from bridge.jmix._sender import parse_manifest
from bridge.jmix._shape import AUDIT, METADATA
from bridge.jmix._tar import Sink, TarParser
from tests.fuzz.envelopes import (
    DOCUMENTS,
    OPEN_CLEAR,
    TRUST,
    VECTORS,
    Entry,
    clear_entries,
    payload_tar,
    run_open,
    sealed_entries,
    write_zip,
)

settings.register_profile(
    "fuzz",
    deadline=timedelta(seconds=10),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
FUZZ = os.environ.get("HYPOTHESIS_PROFILE") == "fuzz"
if FUZZ:
    settings.load_profile("fuzz")

SECONDS = 20  # an example still running after this long is a hang
MEMORY = 48 << 20  # bytes a small hostile envelope may make Python allocate


def budget(examples: int) -> settings:
    """Settings for one property: ``examples`` by default, 25 times that to fuzz."""
    return settings(
        max_examples=examples * 25 if FUZZ else examples,
        deadline=timedelta(seconds=10 if FUZZ else 3),
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


class Hang(AssertionError):
    """An example ran past :data:`SECONDS`."""


@contextlib.contextmanager
def bounded():
    """Fail an example that hangs, or whose Python allocations peak past MEMORY."""

    def alarm(signum, frame):
        raise Hang(f"no answer within {SECONDS} s")

    previous = signal.signal(signal.SIGALRM, alarm)
    signal.setitimer(signal.ITIMER_REAL, SECONDS)
    tracemalloc.start()
    try:
        yield
        peak = tracemalloc.get_traced_memory()[1]
        assert peak < MEMORY, f"allocated {peak} bytes at the peak"
    finally:
        tracemalloc.stop()
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def opened_or_refused(src_bytes: bytes) -> EnvelopeError | None:
    """Write ``src_bytes`` as a zip in a fresh folder and open it there."""
    with tempfile.TemporaryDirectory() as tmp, bounded():
        src = Path(tmp, "in.zip")
        src.write_bytes(src_bytes)
        return run_open(src, Path(tmp))


def zip_bytes(entries: list[Entry], root: str = "") -> bytes:
    """Return the zip of ``entries`` as bytes."""
    with tempfile.TemporaryDirectory() as tmp:
        return write_zip(Path(tmp, "z.zip"), entries, root).read_bytes()


# -- 1. byte flips and truncations of real envelopes ------------------------------

BASES = {
    case: (VECTORS / case / "envelope.zip").read_bytes()
    for case in ("ok-spec", "ok-spec-root", "ok-rs", "ok-js", "ok-clear")
}

edits = st.lists(
    st.tuples(
        st.sampled_from(["set", "truncate", "insert", "delete"]),
        st.floats(0, 1, exclude_max=True),
        st.binary(min_size=1, max_size=8),
    ),
    min_size=1,
    max_size=4,
)


def apply_edits(data: bytes, changes) -> bytes:
    """Apply (operation, relative position, bytes) edits to ``data``."""
    out = bytearray(data)
    for operation, where, chunk in changes:
        at = int(where * len(out))
        if operation == "set":
            out[at : at + len(chunk)] = chunk
        elif operation == "truncate":
            del out[at:]
        elif operation == "insert":
            out[at:at] = chunk
        else:
            del out[at : at + len(chunk)]
    return bytes(out)


@budget(200)
@given(st.sampled_from(sorted(BASES)), edits)
def test_open_of_a_damaged_real_envelope_raises_only_envelope_errors(case, changes):
    opened_or_refused(apply_edits(BASES[case], changes))


# -- 2. zip entries tampered with -----------------------------------------------

HOSTILE_NAMES = [
    "../evil",
    "/etc/evil",
    "payload/../../evil",
    "payload/./x",
    "payload//x",
    "payload\\..\\evil",
    "C:/evil",
    "c:evil",
    "payload/\x00x",
    "payload/a\nb",
    "payload/" + "x" * 300,
    "payload/payload",
    "payload/dicom",
    "payload/dicom/x.dcm/y",
    "manifest.json",
    "manifest.json/x",
    "payload.encrypted/x",
    "payload/files.json",
    "payload/\u202eevil",
    "payload/é",
]
KINDS = {
    "file": 0o100644,
    "none": 0,
    "symlink": 0o120777,
    "folder": 0o040755,
    "fifo": 0o010644,
    "chardev": 0o020644,
    "blockdev": 0o060644,
    "socket": 0o140644,
}
names = st.one_of(
    st.sampled_from(HOSTILE_NAMES),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=40),
    st.text("payload/dicom.x", min_size=1, max_size=30),
)
entry_edits = st.lists(
    st.one_of(
        st.tuples(st.just("rename"), st.integers(0, 99), names),
        st.tuples(st.just("add"), names, st.binary(max_size=64)),
        st.tuples(st.just("duplicate"), st.integers(0, 99)),
        st.tuples(st.just("kind"), st.integers(0, 99), st.sampled_from(sorted(KINDS))),
        st.tuples(st.just("deflate"), st.integers(0, 99)),
        st.tuples(st.just("drop"), st.integers(0, 99)),
    ),
    min_size=1,
    max_size=4,
)
sizes = st.lists(
    st.tuples(
        st.integers(0, 99), st.sampled_from([16, 20, 24]), st.integers(0, 2**32 - 1)
    ),
    max_size=2,
)


def _base_entries(clear: bool) -> list[Entry]:
    files = {n: DOCUMENTS[n] for n in sorted(DOCUMENTS)}
    entries = clear_entries(files) if clear else sealed_entries(payload_tar())
    return [Entry(name, data) for name, data in entries.items()]


SEALED_ENTRIES = _base_entries(clear=False)
CLEAR_ENTRIES = _base_entries(clear=True)


def tamper(entries: list[Entry], changes) -> list[Entry]:
    """Apply entry-level edits; indexes wrap around the current list."""
    out = list(entries)
    for change in changes:
        kind = change[0]
        if kind == "add":
            out.append(Entry(change[1], change[2]))
            continue
        if not out:
            continue
        at = change[1] % len(out)
        old = out[at]
        if kind == "rename":
            out[at] = Entry(change[2], old.data, old.external_attr, old.deflate)
        elif kind == "duplicate":
            out.append(old)
        elif kind == "kind":
            out[at] = Entry(old.name, old.data, KINDS[change[2]] << 16, old.deflate)
        elif kind == "deflate":
            out[at] = Entry(old.name, old.data, old.external_attr, True)
        else:
            del out[at]
    return out


def patch_declared_sizes(data: bytes, patches) -> bytes:
    """Overwrite CRC or size fields (offsets 16, 20, 24) of central records."""
    out = bytearray(data)
    records = []
    at = out.find(b"PK\x01\x02")
    while at >= 0:
        records.append(at)
        at = out.find(b"PK\x01\x02", at + 4)
    for index, offset, value in patches:
        if records:
            struct.pack_into("<I", out, records[index % len(records)] + offset, value)
    return bytes(out)


@pytest.mark.filterwarnings("ignore:Duplicate name")
@budget(200)
@given(st.booleans(), entry_edits, sizes, st.sampled_from(["", "4c2f/"]))
def test_open_of_a_zip_with_tampered_entries_raises_only_envelope_errors(
    clear, changes, patches, root
):
    entries = tamper(CLEAR_ENTRIES if clear else SEALED_ENTRIES, changes)
    try:
        data = zip_bytes(entries, root)
    except (ValueError, UnicodeEncodeError):
        return  # zipfile itself will not write such a name
    opened_or_refused(patch_declared_sizes(data, patches))


# -- 3. payload tars of every shape, sealed and signed ------------------------------

TAR_TYPES = [
    tarfile.REGTYPE,
    tarfile.AREGTYPE,
    tarfile.LNKTYPE,
    tarfile.SYMTYPE,
    tarfile.CHRTYPE,
    tarfile.BLKTYPE,
    tarfile.DIRTYPE,
    tarfile.FIFOTYPE,
    tarfile.CONTTYPE,
    tarfile.GNUTYPE_SPARSE,
    b"x",
    b"Z",
]
tar_names = st.one_of(
    st.sampled_from(sorted(DOCUMENTS)),
    st.sampled_from([n.removeprefix("payload/") for n in HOSTILE_NAMES]),
    st.sampled_from(["./", "./dicom/", "payload/", "payload/dicom/x.dcm", "dicom"]),
    st.text(st.characters(codec="utf-8"), min_size=1, max_size=120),
)
members = st.lists(
    st.tuples(
        tar_names,
        st.sampled_from(TAR_TYPES),
        st.one_of(st.sampled_from(sorted(DOCUMENTS.values())), st.binary(max_size=700)),
        st.text(max_size=20),
    ),
    max_size=6,
)
tar_formats = st.sampled_from(
    [tarfile.PAX_FORMAT, tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT]
)


def build_tar(items, tar_format, real_first: bool) -> bytes:
    """Return a tar of ``items`` (name, type, data, linkname); bad names are skipped."""
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w", format=tar_format) as tar:
        files = [(n, tarfile.REGTYPE, d, "") for n, d in DOCUMENTS.items()]
        for name, kind, data, link in (files if real_first else []) + items:
            info = tarfile.TarInfo(name)
            info.type, info.linkname = kind, link
            info.size = len(data) if kind in (tarfile.REGTYPE, tarfile.AREGTYPE) else 0
            with contextlib.suppress(ValueError, UnicodeEncodeError):
                tar.addfile(info, io.BytesIO(data) if info.size else None)
    return buf.getvalue()


@budget(150)
@given(members, tar_formats, st.booleans(), edits | st.just([]))
def test_open_of_any_sealed_payload_tar_raises_only_envelope_errors(
    items, tar_format, real_first, changes
):
    plain = apply_edits(build_tar(items, tar_format, real_first), changes)
    entries = sealed_entries(plain)
    opened_or_refused(zip_bytes([Entry(n, d) for n, d in entries.items()]))


header_fields = st.fixed_dictionaries(
    {
        "name": st.binary(min_size=0, max_size=100),
        "size": st.one_of(
            st.binary(min_size=12, max_size=12),
            st.integers(0, 2**33).map(lambda n: b"%011o\0" % n),
            st.just(b"\xff" * 12),
            st.just(b"\x80" + b"\0" * 7 + b"\x01\x00\x00\x00"),
        ),
        "type": st.sampled_from([*TAR_TYPES, b"L", b"K", b"g", b"\0", b"1"]),
        "magic": st.sampled_from([b"ustar\x0000", b"ustar  \0", b"\0" * 8]),
        "rest": st.binary(min_size=0, max_size=255),
    }
)


def raw_header(fields: dict) -> bytes:
    """Return a 512-byte tar header with these fields and a correct checksum."""
    block = bytearray(512)
    block[0 : len(fields["name"])] = fields["name"]
    block[100:108] = b"0000644\0"
    block[124:136] = fields["size"]
    block[156:157] = fields["type"]
    block[257:265] = fields["magic"]
    block[265 : 265 + len(fields["rest"])] = fields["rest"]
    block[148:156] = b" " * 8
    block[148:156] = b"%06o\0 " % sum(block)
    return bytes(block)


@budget(300)
@given(
    st.lists(
        st.tuples(header_fields, st.binary(max_size=1500)), min_size=1, max_size=5
    ),
    st.integers(1, 2000),
)
def test_tar_parser_given_random_headers_raises_only_envelope_errors(blocks, piece):
    stream = b"".join(raw_header(fields) + body for fields, body in blocks)
    parser = TarParser(Sink(), keep=("files.json", "metadata.json"))

    with bounded():
        try:
            for start in range(0, len(stream), piece):
                parser.feed(stream[start : start + piece])
            parser.close()
        except EnvelopeError:
            pass


# -- 4. JSON documents shaped like the envelope's -----------------------------------

MANIFEST_KEYS = [
    "version",
    "id",
    "timestamp",
    "sender",
    "receiver",
    "security",
    "extensions",
    "requester",
    "assertion",
    "signing_key",
    "signed_fields",
    "signature",
    "expires_at",
    "public_key",
    "fingerprint",
    "alg",
    "payload_hash",
    "encryption",
    "iv",
    "auth_tag",
    "ephemeral_public_key",
    "contact",
    "name",
    "file",
    "hash",
    "size_bytes",
    "patient",
    "audit",
    "event",
    "by",
]
scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=30),
    st.sampled_from(
        [
            "4c2f1d6e-8a3b-4e5f-9a7c-1b2d3e4f5a6b",
            "2026-01-15T09:30:00Z",
            "9999-12-31T23:59:60+23:59",
            "sha256:" + "0" * 64,
            "SHA256:" + "0" * 64,
            "Ed25519",
            "AES-256-GCM",
            "AAAA",
            "id",
            "receiver.0.id",
            "receiver.99.id",
            "security.encryption.iv",
        ]
    ),
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(
            st.sampled_from(MANIFEST_KEYS) | st.text(max_size=8), inner, max_size=6
        )
    ),
    max_leaves=40,
)
MANIFEST = json.loads(
    zipfile.ZipFile(VECTORS / "ok-spec" / "envelope.zip")
    .read("4c2f1d6e-8a3b-4e5f-9a7c-1b2d3e4f5a6b/manifest.json")
    .decode()
)
paths = st.lists(st.sampled_from([*MANIFEST_KEYS, "0", "1"]), min_size=1, max_size=4)


def graft(doc, path: list[str], value):
    """Set ``value`` at ``path`` in a copy of ``doc``, making objects on the way."""
    doc = json.loads(json.dumps(doc))
    node = doc
    for part in path[:-1]:
        if isinstance(node, list) and part.isdigit() and int(part) < len(node):
            node = node[int(part)]
        elif isinstance(node, dict):
            node = node.setdefault(part, {})
        else:
            return doc
    if isinstance(node, dict):
        node[path[-1]] = value
    return doc


@budget(200)
@given(st.one_of(json_values, st.lists(st.tuples(paths, json_values), max_size=3)))
def test_json_reader_given_documents_shaped_like_manifests_raises_only_envelope_errors(
    shape,
):
    if isinstance(shape, list) and all(isinstance(x, tuple) for x in shape):
        doc = MANIFEST
        for path, value in shape:
            doc = graft(doc, path, value)
    else:
        doc = shape
    data = json.dumps(doc).encode()

    with bounded():
        for check in (
            lambda: check_sender(parse_manifest(data), None, TRUST, OPEN_CLEAR, data),
            lambda: parse_files(load_json(data, "files.json")),
            lambda: METADATA.check(load_json(data, "metadata.json"), "metadata.json"),
            lambda: AUDIT.check(load_json(data, "audit.json"), "audit.json"),
        ):
            with contextlib.suppress(EnvelopeError):
                check()


@budget(150)
@given(st.binary(max_size=300) | st.text(max_size=300).map(str.encode))
def test_json_reader_given_any_bytes_raises_only_envelope_errors(data):
    with contextlib.suppress(EnvelopeError):
        load_json(data, "manifest.json")


@budget(100)
@given(st.lists(st.tuples(paths, json_values), min_size=1, max_size=3))
def test_verify_of_a_real_envelope_with_a_reshaped_manifest_raises_envelope_errors(
    changes,
):
    doc = MANIFEST
    for path, value in changes:
        doc = graft(doc, path, value)
    entries = dict(sealed_entries(payload_tar()))
    entries["manifest.json"] = json.dumps(doc).encode()

    with tempfile.TemporaryDirectory() as tmp, bounded():
        src = write_zip(Path(tmp, "in.zip"), [Entry(n, d) for n, d in entries.items()])
        run_open(src, Path(tmp), opener=_verify)


def _verify(src, dest, **kwargs):
    return verify_envelope(src, **kwargs)


# -- 5. base64 and signatures ------------------------------------------------------

B64 = string.ascii_letters + string.digits + "+/="
B64URL = string.ascii_letters + string.digits + "-_"


@budget(300)
@given(st.text(B64 + " \n-_.", max_size=64))
def test_base64_decodes_only_its_one_canonical_spelling(text):
    try:
        data = b64decode(text, "field")
    except SchemaViolation:
        return
    assert base64.b64encode(data).decode() == text


@budget(300)
@given(st.text(B64URL + "=+/", max_size=64))
def test_base64url_decodes_only_its_one_canonical_spelling(text):
    try:
        data = b64url_decode(text, "field")
    except SchemaViolation:
        return
    assert b64url(data) == text


signature_fields = st.sampled_from(
    [
        ("sender", "assertion", "signature"),
        ("sender", "assertion", "signing_key", "public_key"),
        ("sender", "assertion", "signing_key", "fingerprint"),
    ]
)


@budget(150)
@given(
    signature_fields,
    st.binary(max_size=80).map(lambda b: base64.b64encode(b).decode())
    | st.text(B64, max_size=90),
    st.binary(max_size=200)
    | st.lists(st.text(B64URL, max_size=120), min_size=1, max_size=4).map(
        lambda parts: ".".join(parts).encode()
    ),
)
def test_sender_check_given_random_signatures_refuses_without_detail(field, value, jws):
    doc = json.loads(json.dumps(MANIFEST))
    node = doc
    for part in field[:-1]:
        node = node[part]
    node[field[-1]] = value
    data = json.dumps(doc).encode()

    with bounded():
        try:
            check_sender(doc, jws, TRUST, OPEN_CLEAR, data)
        except AuthenticationFailed as exc:
            assert str(exc) == "authentication failed"
        except EnvelopeError:
            pass
        else:
            raise AssertionError("a forged signature was accepted")
