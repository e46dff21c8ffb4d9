"""Orthanc as a real, independent PACS for tests, started headless on free ports.

Debian's ``orthanc`` package installs the server but does not start it here. Each
instance gets its own storage and index folders, no plugins, and free DICOM and
HTTP ports; it is checked through its REST API.
"""

import json
import re
import shutil
import subprocess
import urllib.request
from pathlib import Path

import pytest

from tests.support.dcmtk import dcmtk_env
from tests.support.net import free_port, wait_until

_BINARY = "/usr/sbin/Orthanc"


def _orthanc_binary() -> str:
    found = _BINARY if Path(_BINARY).exists() else shutil.which("Orthanc")
    if not found:
        pytest.skip("Orthanc is not installed (apt-get install -y orthanc)")
    return found


class Orthanc:
    """A running Orthanc with its own folders; ``stop()`` ends it."""

    def __init__(self, folder: Path, ae_title: str = "ORTHANC", **settings):
        binary = _orthanc_binary()
        self.folder = folder
        self.ae_title = ae_title
        self.dicom_port = free_port()
        self.http_port = free_port()
        (folder / "log").mkdir(parents=True, exist_ok=True)
        config = {
            "Name": "jmix-bridge-test",
            "StorageDirectory": str(folder / "storage"),
            "IndexDirectory": str(folder / "index"),
            "Plugins": [],
            "HttpPort": self.http_port,
            "DicomPort": self.dicom_port,
            "DicomAet": ae_title,
            "RemoteAccessAllowed": False,
            "AuthenticationEnabled": False,
            "DicomCheckCalledAet": False,
            "OverwriteInstances": False,
            "StorageCompression": False,
            **settings,
        }
        config_path = folder / "orthanc.json"
        config_path.write_text(json.dumps(config, indent=2))
        self._log = open(folder / "stdout.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [binary, f"--logdir={folder / 'log'}", str(config_path)],
            env=dcmtk_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_until(self._answers, timeout=60, what="Orthanc REST API")

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(
                f"Orthanc exited with {self.proc.returncode}; see {self.folder / 'log'}"
            )
        try:
            self.get("/system")
            return True
        except OSError:
            return False

    def get(self, path: str):
        """GET ``path`` from the REST API and return the decoded JSON."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.http_port}{path}", timeout=10
        ) as resp:
            return json.loads(resp.read())

    def get_bytes(self, path: str) -> bytes:
        """GET ``path`` from the REST API and return the raw body."""
        with urllib.request.urlopen(
            f"http://127.0.0.1:{self.http_port}{path}", timeout=30
        ) as resp:
            return resp.read()

    def instance_files(self) -> dict[str, bytes]:
        """Return every stored instance as ``{SOPInstanceUID: file bytes}``."""
        result = {}
        for orthanc_id in self.get("/instances"):
            tags = self.get(f"/instances/{orthanc_id}/simplified-tags")
            result[tags["SOPInstanceUID"]] = self.get_bytes(
                f"/instances/{orthanc_id}/file"
            )
        return result

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after 20 s) and wait for it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


def orthanc_version() -> str:
    """Return the installed Orthanc's version string (for reports)."""
    out = subprocess.run(
        [_orthanc_binary(), "--version"], capture_output=True, text=True, check=False
    ).stdout
    match = re.search(r"(\d+\.\d+\.\d+)", out)
    return match.group(1) if match else "unknown"


@pytest.fixture
def orthanc(tmp_path):
    """An Orthanc PACS on free ports, stopped after the test."""
    server = Orthanc(tmp_path / "orthanc")
    yield server
    server.stop()
