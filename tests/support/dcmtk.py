"""dcmtk's tools as real, independent peers: a modality (storescu, dcmsend, echoscu)
and a PACS (storescp).

pynetdicom installs console scripts named ``storescp``, ``storescu`` and ``echoscu``
too, and they may come first on PATH; these helpers always pick dcmtk's binaries.
dcmtk needs ``TCP_NODELAY=1`` in its environment here, or Nagle's algorithm makes
every C-STORE wait about 45 ms.
"""

import os
import shutil
import subprocess
from collections.abc import Iterable, Iterator
from pathlib import Path

import pytest

from tests.support.net import free_port, wait_for_port

_DCMTK_DIRS = ("/usr/bin", "/usr/local/bin")


def dcmtk_tool(name: str) -> str:
    """Return the path of dcmtk's ``name``, or skip the test when dcmtk is absent."""
    for folder in _DCMTK_DIRS:
        path = Path(folder) / name
        if path.is_file() and os.access(path, os.X_OK):
            return str(path)
    found = shutil.which(name)
    if found and b"dcmtk" in _version(found):
        return found
    pytest.skip(f"dcmtk's {name} is not installed (apt-get install -y dcmtk)")


def _version(path: str) -> bytes:
    try:
        return subprocess.run(
            [path, "--version"], capture_output=True, timeout=10, check=False
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return b""


def dcmtk_env() -> dict[str, str]:
    """Return the environment dcmtk tools run in: ours plus TCP_NODELAY=1."""
    return {**os.environ, "TCP_NODELAY": "1"}


def storescu_args(
    port: int,
    files: list[Path] | Path,
    *,
    called: str = "JMIXBRIDGE",
    calling: str = "MODALITY",
    extra: tuple[str, ...] = (),
) -> list[str]:
    """Return the command line that sends ``files`` (or a folder, recursively) with
    dcmtk's storescu; run it in :func:`dcmtk_env`."""
    args = [dcmtk_tool("storescu"), "-aet", calling, "-aec", called, *extra]
    if isinstance(files, Path) and files.is_dir():
        return [*args, "+sd", "+r", "127.0.0.1", str(port), str(files)]
    return [*args, "127.0.0.1", str(port), *map(str, files)]


def storescu(
    port: int,
    files: list[Path] | Path,
    *,
    called: str = "JMIXBRIDGE",
    calling: str = "MODALITY",
    extra: tuple[str, ...] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """Send ``files`` (or a folder, recursively) with dcmtk's storescu; never raises
    on a failed store, so the caller can check the return code and output."""
    return subprocess.run(
        storescu_args(port, files, called=called, calling=calling, extra=extra),
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def store_answers(lines: Iterable[str]) -> Iterator[tuple[Path, str]]:
    """Yield (file, answer) for each C-STORE response in ``storescu -v`` output.

    ``lines`` is storescu's stderr, whole or read as it arrives (a pipe), so a
    caller can act on each answer while storescu still sends. The answer is
    ``"success"``, or else storescu's response line, which names the status
    (``Received Store Response (Refused: OutOfResources)``).
    """
    sending = None
    for line in lines:
        if "Sending file: " in line:
            sending = Path(line.split("Sending file: ", 1)[1].strip())
        elif "Received Store Response" in line and sending is not None:
            yield sending, "success" if "(Success)" in line else line.rstrip("\n")


def dcmsend(
    port: int,
    files: list[Path],
    *,
    called: str = "JMIXBRIDGE",
    calling: str = "MODALITY",
    extra: tuple[str, ...] = (),
    timeout: float = 120,
) -> subprocess.CompletedProcess:
    """Send ``files`` with dcmtk's dcmsend, which can send any transfer syntax as is."""
    args = [
        dcmtk_tool("dcmsend"),
        "-aet",
        calling,
        "-aec",
        called,
        *extra,
        "127.0.0.1",
        str(port),
        *map(str, files),
    ]
    return subprocess.run(
        args,
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def echoscu(
    port: int, *, called: str = "JMIXBRIDGE", calling: str = "MODALITY"
) -> subprocess.CompletedProcess:
    """Send one C-ECHO with dcmtk's echoscu."""
    args = [
        dcmtk_tool("echoscu"),
        "-aet",
        calling,
        "-aec",
        called,
        "127.0.0.1",
        str(port),
    ]
    return subprocess.run(
        args,
        env=dcmtk_env(),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )


class StoreSCP:
    """A running dcmtk storescp that writes what it receives, bit-preserving."""

    def __init__(
        self,
        folder: Path,
        ae_title: str = "PACS",
        extra: tuple[str, ...] = (),
        port: int | None = None,
    ):
        self.folder = folder
        self.ae_title = ae_title
        self.port = port or free_port()
        folder.mkdir(parents=True, exist_ok=True)
        self._log = open(folder.parent / f"storescp-{self.port}.log", "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                dcmtk_tool("storescp"),
                "-aet",
                ae_title,
                "+xa",
                "+B",
                "-od",
                str(folder),
                *extra,
                str(self.port),
            ],
            env=dcmtk_env(),
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        wait_for_port(self.port)

    def files(self) -> list[Path]:
        """Return the files storescp has written so far."""
        return sorted(p for p in self.folder.rglob("*") if p.is_file())

    def stop(self) -> None:
        """Stop storescp and wait for it."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()


@pytest.fixture
def storescp(tmp_path):
    """A dcmtk storescp on a free port, stopped after the test."""
    scp = StoreSCP(tmp_path / "pacs")
    yield scp
    scp.stop()
