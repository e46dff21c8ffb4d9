"""Two real bridge processes, site A (sends) and site B (receives), and the link.

:class:`Sites` writes a YAML configuration and a key folder for each site the
way an operator would (B pins A's signing key, A holds B's public keys), on free
loopback ports, and starts each as ``python -m bridge run -c FILE``
(:class:`tests.support.daemon.Daemon`), so a test can SIGKILL and restart either.
A's envelopes may go through a :class:`LinkProxy`, which can slow the link, cut
connections or answer 500 in B's place. :class:`Pacs` is dcmtk's storescp keeping
every C-STORE it receives, and :func:`end_state` the check every crash and
fault test ends with.
"""

from __future__ import annotations

import contextlib
import signal
import socket
import sqlite3
import struct
import threading
import time
from pathlib import Path

import numpy as np
import pydicom
import yaml
from pydicom.errors import InvalidDicomError

from bridge.jmix import generate_key_dir
from tests.support.compare import dataset_bytes
from tests.support.daemon import Daemon
from tests.support.dcmtk import StoreSCP, storescu
from tests.support.net import free_port, wait_until
from tests.support.studies import make_study

TOKEN = "site-a-token-for-tests"
FAST_RETRY = {"initial_seconds": 0.5, "factor": 2.0, "max_seconds": 2.0}
CRASH_ENV = "JMIX_BRIDGE_TEST_CRASH_AT"


class Sites:
    """Configurations, keys and processes of sites A and B under ``root``.

    ``pacs`` is ``(ae_title, port)`` of B's destination. ``peer_port`` is where A
    sends envelopes (a proxy's port); B's own HTTP port by default. ``a`` and
    ``b`` are extra top-level config sections merged into each site's mapping.
    ``transport`` ``"drop"`` makes A write its envelopes into :attr:`carried`
    (``peers[].transport: drop``) and B watch that folder
    (``receiving.inbox_folder``), as if a file transfer carried them.
    """

    def __init__(
        self,
        root: Path,
        pacs: tuple[str, int],
        *,
        quiet_seconds: float = 1.0,
        a: dict | None = None,
        b: dict | None = None,
        peer_scheme: str = "http",
        transport: str = "http",
    ):
        self.root = root
        self.carried = root / "carried"
        self.a_dicom, self.a_http, self.b_http = free_port(), free_port(), free_port()
        self.peer_port = self.b_http
        self.peer_scheme = peer_scheme
        for site in ("a", "b"):
            generate_key_dir(root / site / "keys")
        self.a_conf = _merge(self._site_a(quiet_seconds), a or {})
        self.b_conf = _merge(self._site_b(pacs), b or {})
        if transport == "drop":
            self.carried.mkdir(parents=True, exist_ok=True)
            peer = self.a_conf["peers"][0]
            peer |= {"transport": "drop", "drop_folder": str(self.carried)}
            self.b_conf = _merge(
                self.b_conf, {"receiving": {"inbox_folder": str(self.carried)}}
            )
        self.a: Daemon | None = None
        self.b: Daemon | None = None

    # -- configuration ----------------------------------------------------------

    def _site_a(self, quiet_seconds: float) -> dict:
        keys_b = self.root / "b" / "keys"
        return {
            "node": {
                "id": "site-a",
                "name": "Site A",
                "contact": "ops@site-a.test",
                "data_dir": str(self.root / "a" / "data"),
                "keys": str(self.root / "a" / "keys"),
            },
            "dicom": {"host": "127.0.0.1", "port": self.a_dicom},
            "http": {"host": "127.0.0.1", "port": self.a_http},
            "spool": {"min_free_bytes": 0, "min_free_ratio": 0.0},
            "routes": [
                {"name": "all", "peers": ["site-b"], "quiet_seconds": quiet_seconds}
            ],
            "peers": [
                {
                    "name": "site-b",
                    "entity": {"id": "site-b", "name": "Site B"},
                    "url": "",  # set in write(), the proxy may move it
                    "encryption_key": str(keys_b / "encryption.pub"),
                    "signing_key": str(keys_b / "signing.pub"),
                    "token": TOKEN,
                    "timeout_seconds": 10.0,
                    "retry": FAST_RETRY,
                }
            ],
        }

    def _site_b(self, pacs: tuple[str, int]) -> dict:
        return {
            "node": {
                "id": "site-b",
                "name": "Site B",
                "contact": "ops@site-b.test",
                "data_dir": str(self.root / "b" / "data"),
                "keys": str(self.root / "b" / "keys"),
            },
            "http": {"host": "127.0.0.1", "port": self.b_http},
            "spool": {"min_free_bytes": 0, "min_free_ratio": 0.0},
            "senders": [
                {
                    "name": "site-a",
                    "id": "site-a",
                    "signing_keys": [str(self.root / "a" / "keys" / "signing.pub")],
                    "token": TOKEN,
                }
            ],
            "destinations": [
                {
                    "name": "pacs",
                    "ae_title": pacs[0],
                    "host": "127.0.0.1",
                    "port": pacs[1],
                    "retry": FAST_RETRY,
                }
            ],
        }

    def write(self) -> tuple[Path, Path]:
        """Write both YAML files (again); return their paths."""
        self.a_conf["peers"][0]["url"] = (
            f"{self.peer_scheme}://127.0.0.1:{self.peer_port}"
        )
        paths = []
        for site, conf in (("a", self.a_conf), ("b", self.b_conf)):
            path = self.root / site / "bridge.yaml"
            path.write_text(yaml.safe_dump(conf))
            paths.append(path)
        return paths[0], paths[1]

    # -- processes --------------------------------------------------------------

    def start_a(self, crash_at: str = "") -> Daemon:
        """Start site A, armed to SIGKILL itself at ``crash_at`` when given."""
        self.a = self._start("a", crash_at)
        return self.a

    def start_b(self, crash_at: str = "") -> Daemon:
        """Start site B, armed to SIGKILL itself at ``crash_at`` when given."""
        self.b = self._start("b", crash_at)
        return self.b

    def _start(self, site: str, crash_at: str) -> Daemon:
        path_a, path_b = self.write()
        env = {CRASH_ENV: crash_at} if crash_at else {}
        env.setdefault(CRASH_ENV, "")
        config = path_a if site == "a" else path_b
        return Daemon(self.root / site, ["-c", str(config)], env=env).start()

    def db(self, site: str) -> Path:
        """The SQLite state file of ``site``."""
        return self.root / site / "data" / "state.db"

    def spool(self, site: str) -> Path:
        """The spool folder of ``site``."""
        return self.root / site / "data" / "spool"

    def stop(self) -> None:
        """Stop whichever site processes still run."""
        for daemon in (self.a, self.b):
            if daemon is not None:
                daemon.stop()


def wait_dead(daemon: Daemon, timeout: float = 60.0) -> int:
    """Wait for a daemon that is to kill itself; return its exit code."""
    code = daemon.proc.wait(timeout)
    daemon.stop()
    return code


def kill_9(daemon: Daemon) -> int:
    """SIGKILL a daemon now, as a power cut would; return its exit code."""
    return daemon.stop(signal.SIGKILL)


class LinkProxy:
    """A TCP proxy from a free port to ``target_port`` that can misbehave.

    ``mode`` is read per connection: ``pass`` forwards, ``reset`` cuts the
    connection with a TCP RST once the request has started, ``http500`` reads
    the request and answers 500 without passing it on, ``slow`` passes it on
    but holds the answer back ``delay_response`` seconds. ``faults`` is how
    many connections misbehave before it passes everything. ``upload_rate``
    (bytes per second) throttles what every client sends.
    """

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.mode = "pass"
        self.faults = 0
        self.delay_response = 0.0
        self.upload_rate = 0
        self.bytes_up = 0
        self.connections = 0
        self.faulted = 0
        self._lock = threading.Lock()
        self._sock = socket.create_server(("127.0.0.1", 0))
        self.port = self._sock.getsockname()[1]
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self) -> None:
        """Stop accepting; connections in progress run on."""
        self._closed = True
        self._sock.close()

    def _accept(self) -> None:
        while not self._closed:
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            with self._lock:
                self.connections += 1
                misbehave = self.mode != "pass" and self.faulted < self.faults
                if misbehave:
                    self.faulted += 1
            mode = self.mode if misbehave else "pass"
            threading.Thread(
                target=self._serve, args=(client, mode), daemon=True
            ).start()

    def _serve(self, client: socket.socket, mode: str) -> None:
        if mode == "reset":
            client.recv(65536)
            _reset(client)
            return
        if mode == "http500":
            _read_request(client)
            client.sendall(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\n"
                b"Connection: close\r\n\r\n"
            )
            client.close()
            return
        try:
            server = socket.create_connection(("127.0.0.1", self.target_port))
        except OSError:
            _reset(client)
            return
        threading.Thread(target=self._up, args=(client, server), daemon=True).start()
        self._down(server, client, self.delay_response if mode == "slow" else 0.0)

    def _up(self, client: socket.socket, server: socket.socket) -> None:
        started, sent = time.monotonic(), 0
        try:
            while chunk := client.recv(16384):
                server.sendall(chunk)
                sent += len(chunk)
                with self._lock:
                    self.bytes_up += len(chunk)
                if self.upload_rate:
                    ahead = sent / self.upload_rate - (time.monotonic() - started)
                    if ahead > 0:
                        time.sleep(ahead)
        except OSError:
            pass
        finally:
            _close(server, client)

    def _down(self, server: socket.socket, client: socket.socket, delay: float) -> None:
        first = True
        try:
            while chunk := server.recv(65536):
                if first and delay:
                    time.sleep(delay)
                first = False
                client.sendall(chunk)
        except OSError:
            pass
        finally:
            _close(server, client)


def _read_request(sock: socket.socket) -> None:
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            return
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    if b"100-continue" in head.lower():
        sock.sendall(b"HTTP/1.1 100 Continue\r\n\r\n")
    received = len(body)
    while received < length:
        chunk = sock.recv(min(65536, length - received))
        if not chunk:
            return
        received += len(chunk)


def _reset(sock: socket.socket) -> None:
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _close(*socks: socket.socket) -> None:
    for sock in socks:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
        sock.close()


def _merge(base: dict, extra: dict) -> dict:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# -- the PACS and the end state ----------------------------------------------

SETTLE_SECONDS = 90


class Pacs(StoreSCP):
    """storescp writing each C-STORE it receives to a new file (``+uf``)."""

    def __init__(self, folder: Path):
        super().__init__(folder, ae_title="PACS", extra=("+uf",))

    def received(self) -> dict[str, list[Path]]:
        """Return the files received per SOP Instance UID.

        A file cut short by an aborted association (the bridge was killed while
        sending it) is listed under "" rather than read.
        """
        found: dict[str, list[Path]] = {}
        for path in self.files():
            try:
                uid = _sop_uid(path)
            except (InvalidDicomError, EOFError, OSError, ValueError):
                uid = ""
            found.setdefault(uid, []).append(path)
        return found


def study_of(folder: Path, instances: int, side: int = 8) -> dict[str, Path]:
    """Write a study of ``instances`` CT images of ``side`` x ``side`` pixels."""
    files = make_study(folder, series=1, per_series=instances)
    if side != 8:
        rng = np.random.default_rng(7)
        for path in files:
            ds = pydicom.dcmread(path)
            ds.Rows = ds.Columns = side
            ds.PixelData = rng.integers(0, 4096, (side, side), "<u2").tobytes()
            ds.save_as(path)
    return {_sop_uid(path): path for path in files}


def _sop_uid(path: Path) -> str:
    return str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def send(sites: Sites, study: dict[str, Path]):
    """Send the study to site A as a modality would; return storescu's result."""
    return storescu(sites.a_dicom, list(study.values()))


def settled(sites: Sites) -> bool:
    """True once both sites have no open study and no job ready or leased."""
    for site in ("a", "b"):
        with sqlite3.connect(sites.db(site), timeout=10) as conn:
            open_jobs = conn.execute(
                "SELECT count(*) FROM jobs WHERE state IN ('ready', 'leased')"
            ).fetchone()[0]
            forwarded = conn.execute(
                "SELECT count(*) FROM jobs WHERE queue = 'forward' AND state = 'done'"
            ).fetchone()[0]
            # A study still open waits for its quiet period (a follow-up, L-03).
            open_studies = conn.execute(
                "SELECT count(*) FROM studies WHERE state = 'open'"
            ).fetchone()[0]
        if open_jobs or open_studies or (site == "b" and not forwarded):
            return False
    return True


def end_state(sites: Sites, pacs: Pacs, study: dict[str, Path]) -> int:
    """Check every instance reached the PACS byte-identical; return the repeats."""
    wait_until(lambda: settled(sites), SETTLE_SECONDS, "both sites to settle")
    received = pacs.received()
    received.pop("", None)  # the PACS's own debris of an aborted association
    assert set(received) == set(study), "instances missing at the PACS"
    for uid, copies in received.items():
        for copy in copies:
            assert dataset_bytes(copy) == dataset_bytes(study[uid])
    return sum(len(copies) - 1 for copies in received.values())


def start_and_deliver(sites: Sites, pacs: Pacs, study: dict[str, Path]) -> int:
    """Start B, then A, send ``study`` to A and wait for :func:`end_state`;
    return its repeats. The caller stops the sites."""
    sites.start_b()
    sites.start_a()
    assert send(sites, study).returncode == 0
    return end_state(sites, pacs, study)


def dead_jobs(sites: Sites) -> int:
    """Count the jobs either site parked in dead-letter."""
    total = 0
    for site in ("a", "b"):
        with sqlite3.connect(sites.db(site), timeout=10) as conn:
            total += conn.execute(
                "SELECT count(*) FROM jobs WHERE state = 'dead'"
            ).fetchone()[0]
    return total


def restart(sites: Sites, site: str, daemon: Daemon) -> None:
    """Restart ``site`` after its death; it takes up its dead leases itself."""
    sites.start_a() if site == "a" else sites.start_b()


def debris(sites: Sites, site: str) -> list[str]:
    """Names of temporary files or folders a crash left in ``site``'s spool."""
    spool = sites.spool(site)
    return sorted(
        p.name
        for folder in ("outbox", "inbox", "opened", "incoming", "tmp")
        if (spool / folder).exists()
        for p in (spool / folder).iterdir()
        if p.name.startswith(".") or folder in ("incoming", "tmp")
    )
