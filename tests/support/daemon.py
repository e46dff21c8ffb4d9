"""The real daemon, ``python -m bridge run``, as a process the tests start and stop."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

from tests.support.net import free_port
from tests.support.paths import REPO

READY_LINE = "    encryption  "  # the summary's last line


class Daemon:
    """One ``jmix-bridge run`` process; its stdout is the start-up summary."""

    def __init__(
        self,
        root: Path,
        args: list[str],
        env: dict | None = None,
        command: list[str] | None = None,
    ):
        self.root = root
        self.args = args
        self.command = command or [sys.executable, "-m", "bridge", "run"]
        self.env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
        self.summary = ""
        self.log = root / "daemon.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60.0) -> Daemon:
        """Start the process and wait for the end of its summary; return self."""
        self.root.mkdir(parents=True, exist_ok=True)
        self._log_fh = open(self.log, "ab")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(
            [*self.command, *self.args],
            cwd=self.root,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=self._log_fh,
            text=True,
        )
        lines = []
        for line in self.proc.stdout:
            lines.append(line)
            if line.startswith(READY_LINE):
                break
        self.summary = "".join(lines)
        if (
            not self.summary.rstrip().splitlines()[-1:]
            or READY_LINE not in self.summary
        ):
            self.stop()
            raise RuntimeError(f"the daemon did not start:\n{self.log_text()[-3000:]}")
        return self

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Send ``sig``, wait for the exit and return the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc.stdout.close()
        self._log_fh.close()
        self.proc = None
        return code

    def log_text(self) -> str:
        """Return everything the daemon logged so far."""
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def quick_start(
    root: Path,
    pacs_port: int,
    pacs_ae: str = "ORTHANC",
    quiet_seconds: float = 1.0,
    env: dict | None = None,
) -> tuple[Daemon, int, int]:
    """Start the embedded-defaults daemon on free ports; return it and its ports.

    ``env`` adds to the daemon's environment (an admin token, say).
    """
    dicom, http = free_port(), free_port()
    daemon = Daemon(
        root,
        [
            "--data-dir",
            str(root / "data"),
            "--dicom-port",
            str(dicom),
            "--http-port",
            str(http),
            "--pacs",
            f"{pacs_ae}@127.0.0.1:{pacs_port}",
            "--quiet-seconds",
            str(quiet_seconds),
        ],
        env=env,
    ).start()
    return daemon, dicom, http


def admin_cli(http_port: int, token: str, *argv: str) -> subprocess.CompletedProcess:
    """Run ``jmix-bridge ARGV --url <daemon>`` with ``token`` in the environment."""
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "bridge",
            *argv,
            "--url",
            f"http://127.0.0.1:{http_port}",
        ],
        env={**os.environ, "PYTHONPATH": str(REPO), "JMIX_BRIDGE_ADMIN_TOKEN": token},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
