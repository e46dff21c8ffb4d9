"""Measure peak memory and throughput of packing and opening a large study.

Builds a synthetic study (one study, many instances of about 8 MiB of pixel
data each), then packs and opens it, each in a fresh child process, and prints
the child's peak resident set size (``ru_maxrss``) and its throughput. Not run by
the test suite; ``tests/test_jmix_memory.py`` runs it with a small size.

Usage: python bench/envelope_memory.py [--size-mb 2048] [--workdir DIR] [--json]
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

INSTANCE_BYTES = 8 * 1024 * 1024


def make_study(folder: Path, total_bytes: int) -> int:
    """Write a synthetic one-study folder of about ``total_bytes``; return its count."""
    folder.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    block = os.urandom(1024 * 1024)
    count = max(1, total_bytes // INSTANCE_BYTES)
    for index in range(count):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.7"
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID = meta.MediaStorageSOPClassUID
        ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientName, ds.PatientID, ds.Modality = "Bench^Mark", "BENCH", "OT"
        ds.InstanceNumber = index + 1
        path = folder / f"{index:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        # Pixel Data (7FE0,0010) OB, explicit VR little endian, written by hand so
        # that building a 2 GiB study does not need 2 GiB of memory.
        with open(path, "ab") as fh:
            fh.write(
                b"\xe0\x7f\x10\x00OB\x00\x00" + INSTANCE_BYTES.to_bytes(4, "little")
            )
            for _ in range(INSTANCE_BYTES // len(block)):
                fh.write(block)
    return count


_CHILD = r"""
import resource, sys, time, json
from pathlib import Path
from bridge import jmix
from bridge.jmix import Entity, TrustStore, OpenPolicy
verb, work = sys.argv[1], Path(sys.argv[2])
keys = jmix.load_key_dir(work / "keys")
start = time.perf_counter()
if verb == "pack":
    result = jmix.pack(work / "study", work / "env.zip",
        sender=Entity("org:a", "A", "a@x"), signing_key=keys.signing_key,
        receiver=Entity("org:b", "B", "b@x"),
        recipient_public=keys.encryption_key.public_key())
    stages = result.stage_seconds
else:
    jmix.open_envelope(work / "env.zip", work / "out",
        encryption_key=keys.encryption_key,
        trust=TrustStore([work / "keys" / "signing.pub"]), policy=OpenPolicy())
    stages = {}
seconds = time.perf_counter() - start
rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"seconds": seconds, "rss_kib": rss_kib, "stages": stages}))
"""


def _child(verb: str, work: Path) -> dict:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, verb, str(work)],
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout)


def run(size_mb: int, workdir: str | None) -> dict:
    """Build, pack and open a study of ``size_mb`` MiB; return the measurements."""
    from bridge.jmix import generate_key_dir

    work = Path(tempfile.mkdtemp(prefix="jmix-bench-", dir=workdir))
    try:
        count = make_study(work / "study", size_mb * 1024 * 1024)
        generate_key_dir(work / "keys")
        payload = sum(p.stat().st_size for p in (work / "study").iterdir())
        results = {"instances": count, "payload_bytes": payload}
        for verb in ("pack", "open"):
            got = _child(verb, work)
            results[verb] = {
                "peak_rss_mib": round(got["rss_kib"] / 1024, 1),
                "seconds": round(got["seconds"], 2),
                "mb_per_s": round(payload / 1e6 / got["seconds"], 1),
                "stages": {k: round(v, 2) for k, v in got["stages"].items()},
            }
        # Baseline: the interpreter with the package imported, doing nothing.
        base = subprocess.run(
            [
                sys.executable,
                "-c",
                "import resource, bridge.jmix;"
                "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)",
            ],
            check=True,
            capture_output=True,
            text=True,
        )
        results["baseline_rss_mib"] = round(int(base.stdout) / 1024, 1)
        return results
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main() -> None:
    """Parse arguments, run the measurement and print it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size-mb", type=int, default=2048)
    parser.add_argument(
        "--workdir", help="where to build the study (needs 3x its size)"
    )
    parser.add_argument("--json", action="store_true", help="print JSON only")
    args = parser.parse_args()
    results = run(args.size_mb, args.workdir)
    if args.json:
        print(json.dumps(results))
        return
    print(f"study: {results['instances']} instances, {results['payload_bytes']} bytes")
    print(
        f"baseline (python + bridge.jmix imported): {results['baseline_rss_mib']} MiB"
    )
    for verb in ("pack", "open"):
        got = results[verb]
        print(
            f"{verb}: peak RSS {got['peak_rss_mib']} MiB, {got['seconds']} s, "
            f"{got['mb_per_s']} MB/s {got['stages'] or ''}"
        )


if __name__ == "__main__":
    main()
