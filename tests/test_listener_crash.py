"""kill -9 of the bridge between acknowledgements loses no acknowledged instance."""

import os
import signal
import subprocess
import sys
from pathlib import Path

import pydicom
import pytest

from bridge.spool import Spool
from bridge.store import SQLiteStore
from tests.support.dcmtk import dcmtk_env, store_answers, storescu, storescu_args
from tests.support.studies import make_study

REPO = Path(__file__).resolve().parents[1]


class IngressProcess:
    """tests.support.ingress_proc as a child process."""

    def __init__(self, tmp_path: Path):
        self.log = open(tmp_path / "ingress.log", "ab")  # noqa: SIM115
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.support.ingress_proc",
                "--db",
                str(tmp_path / "state.sqlite"),
                "--spool",
                str(tmp_path / "spool"),
            ],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=self.log,
            text=True,
        )
        line = self.proc.stdout.readline()
        if not line.startswith("ready port="):
            self.kill()
            pytest.fail(f"ingress process did not start: {line!r}")
        self.port = int(line.split("=", 1)[1])

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.log.close()


def test_every_acknowledged_instance_survives_kill_9(tmp_path):
    files = make_study(tmp_path / "in", series=3, per_series=50)
    bridge = IngressProcess(tmp_path)
    acked: list[Path] = []
    sender = subprocess.Popen(
        storescu_args(bridge.port, files, extra=("-v",)),
        env=dcmtk_env(),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        for path, answer in store_answers(sender.stderr):
            if answer == "success":
                acked.append(path)
                if len(acked) == 20:
                    os.kill(bridge.proc.pid, signal.SIGKILL)
    finally:
        sender.wait(timeout=60)
        bridge.kill()
    assert 20 <= len(acked) < len(files), "the kill must land mid-study"

    restarted = IngressProcess(tmp_path)
    try:
        store = SQLiteStore(tmp_path / "state.sqlite")
        spool = Spool(tmp_path / "spool")
        [study] = store.recent_studies()
        recorded = {i.sop_instance_uid: i for i in store.study_instances(study.ref)}
        for path in acked:
            sent = pydicom.dcmread(path)
            inst = recorded[sent.SOPInstanceUID]
            stored = pydicom.dcmread(spool.path_of(inst.spool_path))
            del sent.file_meta, stored.file_meta
            assert stored == sent
        assert list(spool.incoming.iterdir()) == []

        resent = storescu(restarted.port, files)
        assert resent.returncode == 0, resent.stderr
        assert len(store.study_instances(study.ref)) == len(files)
        store.close()
    finally:
        restarted.kill()
