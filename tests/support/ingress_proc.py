"""A test-only ingress process: listener and ingest with one fixed route.

Run as ``python -m tests.support.ingress_proc --db DB --spool DIR --port N``; it
prints ``ready port=N`` once it accepts associations and runs until killed. Tests
use it where the bridge must die as a real process (kill -9).
"""

import argparse
import logging
import sys
import threading

from bridge.dicom.listener import Listener, ListenerSettings
from bridge.ingest import Ingest, IngestSettings, RouteRule
from bridge.spool import Spool
from bridge.store import SQLiteStore


def main() -> None:
    """Start the listener and block until the process is killed."""
    parser = argparse.ArgumentParser()
    parser.add_argument("--db", required=True)
    parser.add_argument("--spool", required=True)
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--ae-title", default="JMIXBRIDGE")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, stream=sys.stderr)

    spool = Spool(args.spool)
    # Alone on its spool, as the daemon is on SQLite: a crash's leftovers go.
    spool.sweep_interrupted(older_than_seconds=0)
    store = SQLiteStore(args.db)
    route = RouteRule(name="all", peers=("peer-a",), quiet_seconds=3600)
    ingest = Ingest(store, spool, [route], IngestSettings())
    listener = Listener(
        ListenerSettings(ae_title=args.ae_title, host="127.0.0.1", port=args.port),
        ingest,
    )
    listener.start()
    print(f"ready port={listener.port}", flush=True)
    threading.Event().wait()


if __name__ == "__main__":
    main()
