"""A test-only bridge process: the peer API, the state store and the deliverer.

``python -m tests.support.peer_proc CONFIG.json`` runs, in one process, what
``jmix-bridge run`` will: the exchange API server, drop-folder inbox watchers
and a deliver worker, over a SQLite store and a spool. It prints
``READY port=<n>`` once the server accepts connections (``port=0`` without a
server) and runs until SIGTERM or SIGINT.

The JSON config holds ``db``, ``spool``, optional ``server`` (ServerSettings
fields), ``senders`` (InboundSender fields), ``peers`` (PeerSettings fields),
``deliver`` (bool), ``retry`` and ``breaker`` (policy fields) and ``inboxes``
(``{"folder", "poll_seconds"}``).
"""

from __future__ import annotations

import json
import logging
import signal
import sys
import threading
from pathlib import Path

from bridge.jmix import OpenPolicy
from bridge.peer.deliver import DELIVER_QUEUE, Deliverer
from bridge.peer.dropfolder import InboxWatcher
from bridge.peer.intake import Intake
from bridge.peer.server import PeerServer, create_app
from bridge.peer.settings import InboundSender, PeerSettings, ServerSettings
from bridge.spool import Spool
from bridge.store.sqlite import SQLiteStore
from bridge.workers.base import Worker, WorkerSpec
from bridge.workers.policy import BreakerBoard, BreakerPolicy, RetryPolicy

_PATHS = {
    "ca_file",
    "client_cert",
    "client_key",
    "drop_folder",
    "tls_cert",
    "tls_key",
    "client_ca",
}


def _fields(raw: dict) -> dict:
    out = {}
    for key, value in raw.items():
        if key in _PATHS and value is not None:
            value = Path(value)
        elif key == "signing_keys":
            value = tuple(Path(v) for v in value)
        out[key] = value
    return out


def main(argv: list[str]) -> int:
    """Run the process described by the JSON config ``argv[0]``."""
    logging.basicConfig(
        level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s"
    )
    conf = json.loads(Path(argv[0]).read_text())
    store = SQLiteStore(conf["db"])
    spool = Spool(conf["spool"])
    senders = [InboundSender(**_fields(s)) for s in conf.get("senders", [])]
    peers = [PeerSettings(**_fields(p)) for p in conf.get("peers", [])]
    # "receiver_id", when given, is this node's own JMIX id, checked at upload.
    policies = {
        s.name: OpenPolicy(
            require_encryption=s.require_encryption,
            expected_receiver_id=conf.get("receiver_id"),
        )
        for s in senders
    }
    intake = Intake(store, spool, senders, policies=policies)
    stopping = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stopping.set())
    signal.signal(signal.SIGINT, lambda *_: stopping.set())

    server = None
    if conf.get("server") is not None:
        settings = ServerSettings(**_fields(conf["server"]))
        server = PeerServer(create_app(settings, senders, intake), settings)
        server.start()

    watchers = [
        InboxWatcher(Path(i["folder"]), senders, intake, i.get("poll_seconds", 0.1))
        for i in conf.get("inboxes", [])
    ]
    for watcher in watchers:
        watcher.start()

    worker = deliverer = None
    if conf.get("deliver"):
        deliverer = Deliverer(store, spool, peers)
        spec = WorkerSpec(
            queue=DELIVER_QUEUE,
            handler=deliverer,
            retry=RetryPolicy(**conf.get("retry", {})),
            breakers=BreakerBoard(BreakerPolicy(**conf.get("breaker", {}))),
            poll_seconds=0.05,
        )
        worker = Worker(store, spec)
        worker.start()

    print(f"READY port={server.port if server else 0}", flush=True)
    stopping.wait()

    if worker:
        worker.stop()
    if deliverer:
        deliverer.close()
    for watcher in watchers:
        watcher.stop()
    if server:
        server.stop()
    store.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
