"""The processes the benchmark runs and reads: dcmtk, Orthanc and two bridges.

Peak memory is ``VmHWM`` from ``/proc/<pid>/status`` (the high-water mark of the
resident set, kept by the kernel, so no sample is missed); CPU time is utime
plus stime from ``/proc/<pid>/stat``. Both are read while the process lives.
Bridges run as ``python -m bridge run -c CONFIG`` (tests.support.daemon), each
with its own data folder, keys and ports; A routes every study to peer B, and B
forwards what it opens to one PACS and sends its receipts back to A.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

from bridge.jmix import generate_key_dir
from tests.support.daemon import Daemon
from tests.support.dcmtk import dcmtk_env, dcmtk_tool
from tests.support.net import free_port, port_open

_TICKS = os.sysconf("SC_CLK_TCK")


# -- /proc ------------------------------------------------------------------------


def peak_rss_mib(pid: int) -> float:
    """Return the peak resident set (VmHWM) of ``pid`` in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"/proc/{pid}/status has no VmHWM")


def cpu_seconds(pid: int) -> float:
    """Return the user plus system CPU seconds ``pid`` has used so far."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    # Fields after the command name, which is in parentheses and may hold spaces.
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / _TICKS


# -- dcmtk ------------------------------------------------------------------------


def storescu(
    port: int,
    files: list[Path],
    *,
    called: str,
    associations: int = 1,
    pdu: int | None = None,
) -> float:
    """Send ``files`` with dcmtk storescu over ``associations`` parallel
    associations (the files split in order); return the wall seconds until the
    last association is released. Raises RuntimeError when a store failed."""
    args = [dcmtk_tool("storescu"), "-aet", "MODALITY", "-aec", called]
    if pdu:
        args += ["-pdu", str(pdu)]
    share = -(-len(files) // associations)
    parts = [files[i : i + share] for i in range(0, len(files), share)]
    started = time.perf_counter()
    procs = [
        subprocess.Popen(
            [*args, "127.0.0.1", str(port), *map(str, part)],
            env=dcmtk_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for part in parts
    ]
    outputs = [p.communicate()[0] for p in procs]
    seconds = time.perf_counter() - started
    for proc, out in zip(procs, outputs, strict=True):
        if proc.returncode != 0 or b"E:" in out:
            raise RuntimeError(
                f"storescu failed: {out.decode(errors='replace')[-800:]}"
            )
    return seconds


class StoreSCP:
    """dcmtk storescp writing what it receives to ``folder``, on a free port."""

    def __init__(self, folder: Path, *, pdu: int | None = None, ae_title="PACS"):
        self.folder = folder
        self.ae_title = ae_title
        self.port = free_port()
        folder.mkdir(parents=True, exist_ok=True)
        args = [dcmtk_tool("storescp"), "-aet", ae_title, "+B", "-od", str(folder)]
        if pdu:
            args += ["-pdu", str(pdu)]
        self.proc = subprocess.Popen(
            [*args, str(self.port)],
            env=dcmtk_env(),
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        _wait_port(self.port, self.proc)

    def stop(self) -> None:
        """Stop storescp and wait for it."""
        self.proc.terminate()
        self.proc.wait(10)


def _wait_port(port: int, proc: subprocess.Popen, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not port_open(port):
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"nothing listens on port {port}")
        time.sleep(0.02)


# -- two bridges --------------------------------------------------------------------


@dataclass
class Bridge:
    """A running bridge process, its ports and its state store path."""

    name: str
    daemon: Daemon
    dicom_port: int
    http_port: int
    db: Path
    token: str = ""

    @property
    def pid(self) -> int:
        """The daemon's process id."""
        return self.daemon.proc.pid

    def peak_rss_mib(self) -> float:
        """The daemon's peak resident set so far, MiB."""
        return peak_rss_mib(self.pid)

    def cpu_seconds(self) -> float:
        """The daemon's CPU seconds so far."""
        return cpu_seconds(self.pid)

    def query(self, sql: str, args: tuple = ()) -> list[sqlite3.Row]:
        """Read the bridge's state store (WAL allows a reader beside the daemon)."""
        conn = sqlite3.connect(f"file:{self.db}?mode=ro", uri=True, timeout=10)
        conn.row_factory = sqlite3.Row
        try:
            return conn.execute(sql, args).fetchall()
        finally:
            conn.close()

    def stop(self) -> None:
        """Stop the daemon (SIGTERM) and wait for it."""
        self.daemon.stop()


def _start(
    root: Path, name: str, config: dict, dicom: int, http: int, token: str = ""
) -> Bridge:
    root.mkdir(parents=True, exist_ok=True)
    path = root / f"{name}.yaml"
    path.write_text(json.dumps(config, indent=1))  # JSON is YAML
    daemon = Daemon(root, ["-c", str(path)]).start()
    db = Path(config["node"]["data_dir"]) / "state.db"
    return Bridge(name, daemon, dicom, http, db, token)


_ENTITY = {
    "a": {"id": "org:bench-a", "name": "Bench A", "contact": "a@bench.invalid"},
    "b": {"id": "org:bench-b", "name": "Bench B", "contact": "b@bench.invalid"},
}


def _node(name: str, folder: Path) -> dict:
    """The ``node`` section of bridge ``name``, keeping its state under ``folder``."""
    return {
        **_ENTITY[name],
        "data_dir": str(folder / "data"),
        "keys": str(folder / "keys"),
    }


def start_pair(
    root: Path, pacs_port: int, *, quiet_seconds: float, pacs_ae: str = "PACS"
) -> tuple[Bridge, Bridge]:
    """Start bridge B (receiving, forwarding to the PACS) and bridge A (DICOM in,
    every study to B); return (A, B). Both have fresh keys and state."""
    a_dir, b_dir = root / "a", root / "b"
    generate_key_dir(a_dir / "keys")
    generate_key_dir(b_dir / "keys")
    token = secrets.token_urlsafe(24)
    a_dicom, a_http, b_http = free_port(), free_port(), free_port()

    def peer(name: str, folder: Path, port: int) -> dict:
        return {
            "name": name,
            "entity": _ENTITY[name],
            "url": f"http://127.0.0.1:{port}",
            "encryption_key": str(folder / "keys" / "encryption.pub"),
            "signing_key": str(folder / "keys" / "signing.pub"),
            "token": token,
        }

    def sender(name: str, folder: Path) -> dict:
        return {
            "name": name,
            "id": _ENTITY[name]["id"],
            "signing_keys": [str(folder / "keys" / "signing.pub")],
            "token": token,
        }

    pacs = {"name": "pacs", "ae_title": pacs_ae, "host": "127.0.0.1", "port": pacs_port}
    b_config = {
        "node": _node("b", b_dir),
        "http": {"host": "127.0.0.1", "port": b_http},
        "peers": [peer("a", a_dir, a_http)],
        "senders": [{**sender("a", a_dir), "reply_peer": "a"}],
        "destinations": [pacs],
    }
    a_config = {
        "node": _node("a", a_dir),
        "dicom": {"port": a_dicom, "host": "127.0.0.1"},
        "http": {"host": "127.0.0.1", "port": a_http},
        "routes": [{"name": "all", "peers": ["b"], "quiet_seconds": quiet_seconds}],
        "peers": [peer("b", b_dir, b_http)],
        "senders": [sender("b", b_dir)],
    }
    b = _start(b_dir, "b", b_config, 0, b_http, token)
    try:
        a = _start(a_dir, "a", a_config, a_dicom, a_http, token)
    except BaseException:
        b.stop()
        raise
    return a, b


def start_receiver_only(root: Path, quiet_seconds: float = 3600.0) -> Bridge:
    """Start one bridge that only takes studies in (its peer is never reached
    within the quiet period), for measuring ingest alone."""
    a_dir = root / "a"
    generate_key_dir(a_dir / "keys")
    dicom, http = free_port(), free_port()
    config = {
        "node": _node("a", a_dir),
        "dicom": {"port": dicom, "host": "127.0.0.1"},
        "http": {"host": "127.0.0.1", "port": http},
        "routes": [{"name": "all", "peers": ["self"], "quiet_seconds": quiet_seconds}],
        "peers": [
            {
                "name": "self",
                "entity": _ENTITY["a"],
                "url": f"http://127.0.0.1:{http}",
                "encryption_key": str(a_dir / "keys" / "encryption.pub"),
                "token": secrets.token_urlsafe(24),
            }
        ],
    }
    return _start(a_dir, "a", config, dicom, http)
