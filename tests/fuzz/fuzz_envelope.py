"""A coverage-guided fuzzer (atheris) for the envelope reader.

Run from the repository root, for as long as you like::

    python -m tests.fuzz.fuzz_envelope --make-corpus /tmp/jmix-corpus
    python -m tests.fuzz.fuzz_envelope /tmp/jmix-corpus -max_total_time=300

The first input byte picks the target: a whole envelope zip, a payload tar
sealed and signed into a valid envelope, a JSON document read as each of the
four envelope documents, or a tar fed straight to the streaming parser. Any
exception other than an EnvelopeError, a write outside the destination folder
or a file left behind after a refusal is a finding: atheris stops and writes
the input as ``crash-<sha1>``. Pytest feeds the seed corpus to
:func:`test_one_input` without atheris (``tests/test_hostile_harness.py``).
"""

from __future__ import annotations

import contextlib
import shutil
import sys
import tempfile
import zipfile
from pathlib import Path

try:
    import atheris
except ImportError:  # pytest runs the harness without it
    atheris = None

# Coverage instrumentation only when run as the fuzzer: pytest has imported
# these modules already, and needs no instrumented copies.
if atheris is not None and __name__ == "__main__":
    _instrumented = atheris.instrument_imports(include=["bridge", "zipfile", "tarfile"])
else:
    _instrumented = contextlib.nullcontext()

with _instrumented:
    from bridge.errors import EnvelopeError
    from bridge.jmix._codec import load_json
    from bridge.jmix._payload import parse_files
    from bridge.jmix._sender import sender_check
    from bridge.jmix._shape import AUDIT, MANIFEST, METADATA
    from bridge.jmix._tar import Sink, TarParser
    from tests.fuzz.envelopes import (
        DOCUMENTS,
        OPEN_CLEAR,
        TRUST,
        VECTORS,
        as_entries,
        payload_tar,
        run_open,
        sealed_entries,
        write_zip,
    )

ZIP, SEALED_TAR, JSON, TAR = range(4)
WORK: Path | None = None
"""The folder each case opens in; made on first use, removed by :func:`main`."""


def _work() -> Path:
    global WORK
    if WORK is None:
        WORK = Path(tempfile.mkdtemp(prefix="jmix-fuzz-"))
    return WORK


def _open_zip(src: Path) -> None:
    work = src.parent
    try:
        run_open(src, work)
    finally:
        shutil.rmtree(work / "dest", ignore_errors=True)
        src.unlink()


def _json(data: bytes) -> None:
    try:
        doc = load_json(data, "fuzz.json")
    except EnvelopeError:
        return
    for check in (parse_files, _metadata, _audit):
        with contextlib.suppress(EnvelopeError):
            check(doc)
    try:
        MANIFEST.check(doc, "manifest.json")
        sender_check(doc, data, None, TRUST, OPEN_CLEAR)
    except EnvelopeError:
        pass


def _metadata(doc: object) -> None:
    METADATA.check(doc, "metadata.json")


def _audit(doc: object) -> None:
    AUDIT.check(doc, "audit.json")


def _tar(data: bytes) -> None:
    parser = TarParser(Sink(), keep=("files.json",))
    try:
        for start in range(0, len(data), 700):
            parser.feed(data[start : start + 700])
        parser.close()
    except EnvelopeError:
        pass


def test_one_input(data: bytes) -> None:
    """One fuzz case; the first byte picks the target."""
    if not data:
        return
    target, body = data[0] % 4, data[1:]
    if target == ZIP:
        src = _work() / "in.zip"
        src.write_bytes(body)
        _open_zip(src)
    elif target == SEALED_TAR:
        _open_zip(write_zip(_work() / "in.zip", as_entries(sealed_entries(body))))
    elif target == JSON:
        _json(body)
    else:
        _tar(body)


def make_corpus(folder: Path) -> None:
    """Write seed inputs: every vector zip, a good payload tar and each document."""
    folder.mkdir(parents=True, exist_ok=True)
    for case in sorted(VECTORS.glob("*/envelope.zip")):
        (folder / f"zip-{case.parent.name}").write_bytes(
            bytes([ZIP]) + case.read_bytes()
        )
    tar = payload_tar()
    (folder / "sealed-tar").write_bytes(bytes([SEALED_TAR]) + tar)
    (folder / "tar").write_bytes(bytes([TAR]) + tar)
    for name, data in DOCUMENTS.items():
        if name.endswith(".json"):
            (folder / f"json-{name}").write_bytes(bytes([JSON]) + data)
    with zipfile.ZipFile(VECTORS / "ok-spec" / "envelope.zip") as zf:
        manifest = next(n for n in zf.namelist() if n.endswith("manifest.json"))
        (folder / "json-manifest").write_bytes(bytes([JSON]) + zf.read(manifest))


def main() -> None:
    """Run atheris with libFuzzer's command line, or write the seed corpus."""
    if len(sys.argv) == 3 and sys.argv[1] == "--make-corpus":
        make_corpus(Path(sys.argv[2]))
        return
    if atheris is None:
        sys.exit("fuzz_envelope: atheris is not installed (pip install atheris)")
    atheris.Setup(sys.argv, test_one_input)
    try:
        atheris.Fuzz()
    finally:
        shutil.rmtree(_work(), ignore_errors=True)


if __name__ == "__main__":
    main()
