"""Test-only helpers for the peer exchange: envelopes, bridge processes, requests.

Envelopes are made by :func:`bridge.jmix.pack` from a DICOM file shipped with
pydicom, or as Harmony makes them (a clear envelope under one ``<id>/`` folder,
with folder entries and deflated files). Bridge processes are
:mod:`tests.support.peer_proc` started with ``python -m`` on a free port.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
import zipfile
from pathlib import Path

from pydicom.data import get_testdata_file

from bridge import jmix
from bridge.store.sqlite import SQLiteStore
from tests.support.paths import REPO

SITE_A = jmix.Entity("site-a", "Site A", "ops@site-a.example")
SITE_B = jmix.Entity("site-b", "Site B", "ops@site-b.example")
CT_SMALL = Path(get_testdata_file("CT_small.dcm", download=False))


def pack_envelope(
    out: Path, sender_keys: Path, receiver_keys: Path, envelope_id: str | None = None
) -> jmix.PackResult:
    """Pack CT_small.dcm from ``sender_keys``' site for ``receiver_keys``' site."""
    return jmix.pack(
        [CT_SMALL],
        out,
        sender=SITE_A,
        signing_key=jmix.load_signing_key(sender_keys / "signing.key"),
        receiver=SITE_B,
        recipient_public=jmix.load_encryption_public(receiver_keys / "encryption.pub"),
        envelope_id=envelope_id,
    )


def make_key_dirs(root: Path) -> Path:
    """Create key folders ``a`` (the sender) and ``b`` (the receiver); return root."""
    jmix.generate_key_dir(root / "a")
    jmix.generate_key_dir(root / "b")
    return root


def harmony_zip(out: Path, envelope_id: str | None = None) -> str:
    """Write a clear, unsigned envelope zip the way Harmony builds one; return its id.

    One top-level folder named after the id, with explicit folder entries, and
    every file deflated; entries carry Unix modes with their file type, as the
    Rust ``zip`` crate under Harmony writes them.
    """
    envelope_id = envelope_id or str(uuid.uuid4())
    manifest = {
        "version": "1.0",
        "id": envelope_id,
        "timestamp": "2026-12-03T18:00:00Z",
        "sender": {"id": "harmony", "name": "Harmony", "contact": "ops@harmony.test"},
        "receiver": [
            {"id": "site-b", "name": "Site B", "contact": "ops@site-b.example"}
        ],
        "security": {"classification": "confidential"},
    }
    metadata = {"patient": {"id": "PID-1"}, "studies": {}}
    dicom = CT_SMALL.read_bytes()
    files = {
        "manifest.json": json.dumps(manifest).encode(),
        "audit.json": json.dumps({"audit": []}).encode(),
        "payload/metadata.json": json.dumps(metadata).encode(),
        "payload/dicom/1.dcm": dicom,
    }
    with zipfile.ZipFile(out, "w") as zf:
        for folder in ("", "payload/", "payload/dicom/"):
            info = zipfile.ZipInfo(f"{envelope_id}/{folder}")
            info.external_attr = (0o40755 << 16) | 0x10  # S_IFDIR, MS-DOS directory
            zf.writestr(info, b"")
        for name, data in files.items():
            info = zipfile.ZipInfo(f"{envelope_id}/{name}")
            info.external_attr = 0o100644 << 16  # S_IFREG
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, data)
    return envelope_id


class BridgeProcess:
    """A :mod:`tests.support.peer_proc` process over its own store and spool."""

    def __init__(self, root: Path, name: str, conf: dict, port: int = 0):
        self.root = root / name
        self.root.mkdir(parents=True, exist_ok=True)
        self.db = self.root / "state.db"
        self.spool = self.root / "spool"
        self.conf = {"db": str(self.db), "spool": str(self.spool), **conf}
        if "server" in self.conf:
            self.conf["server"] = {"host": "127.0.0.1", "port": port, **conf["server"]}
        self.port = 0
        self.log = self.root / "process.log"
        self._proc: subprocess.Popen | None = None

    def start(self, timeout: float = 30.0) -> BridgeProcess:
        """Start the process and wait for its ready line; return self."""
        conf_path = self.root / "conf.json"
        conf_path.write_text(json.dumps(self.conf, default=str))
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self._log_fh = open(self.log, "ab")  # noqa: SIM115 (closed in stop)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "tests.support.peer_proc", str(conf_path)],
            cwd=REPO,
            env=env,
            stdout=subprocess.PIPE,
            stderr=self._log_fh,
        )
        line = self._proc.stdout.readline().decode()
        if not line.startswith("READY"):
            self.stop()
            raise RuntimeError(f"bridge process failed: {self.log.read_text()[-3000:]}")
        self.port = int(line.split("port=")[1])
        return self

    def stop(self) -> None:
        """Stop the process (SIGTERM, then SIGKILL after 15 s)."""
        if self._proc is None:
            return
        self._proc.terminate()
        try:
            self._proc.wait(15)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            self._proc.wait()
        self._proc.stdout.close()
        self._log_fh.close()
        self._proc = None

    @property
    def url(self) -> str:
        """The base URL of its API."""
        return f"http://127.0.0.1:{self.port}"

    def store(self) -> SQLiteStore:
        """Open the process's store from the test (SQLite WAL allows it)."""
        return SQLiteStore(self.db)


def raw_request(port: int, head: str, body: bytes = b"", timeout: float = 10.0) -> str:
    """Send ``head`` (CRLF-separated header lines) and ``body`` over a fresh socket.

    Return everything the server answers until it closes the connection or
    ``timeout`` passes; the socket's write side stays open, so an answer that
    arrives proves the server did not wait for more body.
    """
    with socket.create_connection(("127.0.0.1", port), timeout=timeout) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        chunks = []
        try:
            while chunk := sock.recv(65536):
                chunks.append(chunk)
                if b"\r\n\r\n" in b"".join(chunks) and _complete(b"".join(chunks)):
                    break
        except TimeoutError:
            pass
    return b"".join(chunks).decode("latin-1")


def _complete(data: bytes) -> bool:
    head, _, body = data.partition(b"\r\n\r\n")
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return len(body) >= int(line.split(b":")[1])
    return False
