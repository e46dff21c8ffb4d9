"""A test-only process that works a shared state store, started together with
others to show what happens when several bridge processes share one database.

Run as ``python -m tests.support.store_proc claim URL OWNER`` or
``... add URL SOP_PREFIX COUNT``. It opens the store, prints ``ready``, waits
for a line on stdin so that every process starts at once, does its work and
prints one JSON line: the ids of the jobs it claimed, or the study refs its
instances went into.
"""

import hashlib
import json
import sys

from bridge.store import DuplicatePolicy, Instance, open_store

STUDY_UID = "1.2.826.0.1.3680043.8.498.77"
QUEUE = "shared"


def _claim_all(store, owner: str) -> list[int]:
    claimed = []
    while (job := store.claim(QUEUE, owner, 300)) is not None:
        claimed.append(job.id)
        store.complete(job.id, owner)
    return claimed


def _add(store, prefix: str, count: int) -> list[str]:
    refs = []
    for i in range(count):
        sop = f"{prefix}.{i}"
        result = store.add_instance(
            Instance(
                sop_instance_uid=sop,
                study_instance_uid=STUDY_UID,
                series_instance_uid=f"{STUDY_UID}.1",
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                digest=hashlib.sha256(sop.encode()).hexdigest(),
                size_bytes=10,
                spool_path=f"instances/{sop}.dcm",
            ),
            route="all",
            quiet_seconds=3600,
            max_age_seconds=7200,
            duplicates=DuplicatePolicy.KEEP_NEWEST,
        )
        refs.append(result.study.ref)
    return refs


def main() -> None:
    """Open the store, wait for the go line, work, print the result."""
    command, url, *args = sys.argv[1:]
    store = open_store(url)
    print("ready", flush=True)
    sys.stdin.readline()
    if command == "claim":
        result = _claim_all(store, args[0])
    else:
        result = _add(store, args[0], int(args[1]))
    store.close()
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
