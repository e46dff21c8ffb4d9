"""One stage of the chain alone, in a fresh process: seal, deliver, open or forward.

``python -m bench.stages VERB ARGS...`` runs the bridge's own library code for
one stage on files prepared by :mod:`bench.run` and prints one JSON line with
the wall seconds, the CPU seconds and the peak resident set of the process.
A fresh process per stage keeps each peak apart from the others.

- ``pack STUDY_DIR OUT_ZIP SENDER_KEYS RECEIVER_KEYS``
- ``deliver ZIP URL TOKEN``
- ``open ZIP OUT_DIR RECEIVER_KEYS SENDER_KEYS``
- ``forward FOLDER PORT AE_TITLE``
"""

from __future__ import annotations

import json
import resource
import sys
import time
from pathlib import Path

from bridge import jmix


def _pack(study: str, out: str, sender_keys: str, receiver_keys: str) -> dict:
    keys = jmix.load_key_dir(Path(sender_keys))
    files = sorted(Path(study).iterdir())
    result = jmix.pack(
        files,
        out,
        sender=jmix.Entity("org:bench-a", "Bench A", "a@bench.invalid"),
        signing_key=keys.signing_key,
        receiver=jmix.Entity("org:bench-b", "Bench B", "b@bench.invalid"),
        recipient_public=jmix.load_encryption_public(
            Path(receiver_keys) / "encryption.pub"
        ),
    )
    return {
        "bytes": sum(p.stat().st_size for p in files),
        "stages": dict(result.stage_seconds),
    }


def _deliver(path: str, url: str, token: str) -> dict:
    from bridge.peer.client import PeerClient
    from bridge.peer.settings import PeerSettings

    client = PeerClient(PeerSettings(name="b", url=url, token=token))
    try:
        delivery = client.send(Path(path))
    finally:
        client.close()
    return {"bytes": Path(path).stat().st_size, "status": delivery.status}


def _open(path: str, out: str, receiver_keys: str, sender_keys: str) -> dict:
    keys = jmix.load_key_dir(Path(receiver_keys))
    opened = jmix.open_envelope(
        path,
        out,
        encryption_key=keys.encryption_key,
        trust=jmix.TrustStore([Path(sender_keys) / "signing.pub"]),
        policy=jmix.OpenPolicy(),
    )
    return {"bytes": sum(Path(f).stat().st_size for f in opened.dicom_files)}


def _forward(folder: str, port: str, ae_title: str) -> dict:
    from bridge.dicom.forwarder import Destination, Outcome, forward

    files = sorted(p for p in Path(folder).rglob("*") if p.is_file())
    dest = Destination(name="pacs", ae_title=ae_title, host="127.0.0.1", port=int(port))
    result = forward(dest, files)
    return {
        "bytes": sum(p.stat().st_size for p in files),
        "delivered": result.count(Outcome.DELIVERED),
        "instances": len(files),
        # More than one means an association was lost midway and the rest resent.
        "associations": result.associations,
    }


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


_VERBS = {"pack": _pack, "deliver": _deliver, "open": _open, "forward": _forward}


def main() -> None:
    """Run the stage named on the command line and print its figures as JSON."""
    verb, args = sys.argv[1], sys.argv[2:]
    before = _cpu()
    started = time.perf_counter()
    got = _VERBS[verb](*args)
    seconds = time.perf_counter() - started
    got.update(
        seconds=seconds,
        cpu_seconds=_cpu() - before,
        peak_rss_mib=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    )
    print(json.dumps(got))


if __name__ == "__main__":
    main()
