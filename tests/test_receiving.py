"""The receiving side: open jobs verify or quarantine, forward jobs store into a
real PACS (Orthanc, dcmtk storescp) and keep what remains across retries."""

import zipfile
from datetime import timedelta
from pathlib import Path

import pytest

from bridge.dicom.forwarder import Destination
from bridge.jmix import (
    Entity,
    OpenPolicy,
    TrustStore,
    generate_key_dir,
    load_key_dir,
    pack,
)
from bridge.receiving.forwarding import Forwarder
from bridge.receiving.opener import Opener, SenderTrust
from bridge.spool import Spool
from bridge.store import Envelope, JobState, NewJob, SQLiteStore
from bridge.workers.base import Worker, WorkerSpec
from bridge.workers.policy import RetryPolicy
from tests.support.compare import dataset_bytes, dataset_bytes_of
from tests.support.dcmtk import StoreSCP
from tests.support.net import free_port, wait_until
from tests.support.studies import make_study

SENDER = Entity("org:clinic-a", "Clinic A", "imaging@clinic-a.example")
RECEIVER = Entity("org:clinic-b", "Clinic B", "imaging@clinic-b.example")


class Site:
    """A receiving site: keys, store, spool, and the open and forward workers."""

    def __init__(
        self,
        root: Path,
        sender_keys: Path,
        destinations: dict,
        retry_seconds=0.0,
        expiry="reject",
    ):
        self.keys = load_key_dir(_keys(root / "keys"))
        self.store = SQLiteStore(root / "state.db")
        self.spool = Spool(root / "spool")
        trust = TrustStore([(SENDER.id, sender_keys / "signing.pub")])
        senders = {
            "clinic-a": SenderTrust(
                "clinic-a",
                trust,
                OpenPolicy(expected_receiver_id=RECEIVER.id, expiry=expiry),
            )
        }
        self.outcomes: list[str] = []
        opener = Opener(
            self.store,
            self.spool,
            self.keys.encryption_key,
            senders,
            list(destinations),
            on_outcome=lambda outcome, sender: self.outcomes.append(outcome),
        )
        forwarder = Forwarder(self.store, self.spool, destinations, receipts=False)
        self.open_worker = Worker(self.store, WorkerSpec("open", opener))
        self.forward_worker = Worker(
            self.store,
            WorkerSpec(
                "forward", forwarder, retry=RetryPolicy(initial_seconds=retry_seconds)
            ),
        )

    def receive(self, zip_path: Path, envelope_id: str) -> None:
        """Record an envelope as the peer API does after an upload."""
        target = self.spool.envelope_path("inbox", envelope_id)
        target.write_bytes(zip_path.read_bytes())
        self.store.put_envelope(
            Envelope(
                id=envelope_id,
                direction="in",
                peer="clinic-a",
                path=self.spool.relative(target),
                size_bytes=target.stat().st_size,
                state="stored",
            ),
            jobs=[
                NewJob(
                    "open",
                    f"open:{envelope_id}",
                    payload={"envelope_id": envelope_id, "sender": "clinic-a"},
                )
            ],
        )

    def run(self) -> None:
        """Run every due open and forward job once."""
        while self.open_worker.run_once():
            pass
        while self.forward_worker.run_once():
            pass


def _keys(folder: Path) -> Path:
    if not (folder / "signing.key").exists():
        generate_key_dir(folder)
    return folder


@pytest.fixture
def sender_keys(tmp_path):
    return _keys(tmp_path / "sender-keys")


def _envelope(tmp_path, sender_keys, site, count=4, signer=None, expires_in=None):
    study = make_study(
        tmp_path / f"study-{free_port()}", series=2, per_series=count // 2
    )
    keys = load_key_dir(signer or sender_keys)
    out = tmp_path / f"env-{free_port()}.zip"
    result = pack(
        study,
        out,
        sender=SENDER,
        signing_key=keys.signing_key,
        receiver=RECEIVER,
        recipient_public=site.keys.encryption_key.public_key(),
        expires_in=expires_in,
    )
    return out, result.envelope_id, study


def _pydicom_uid(path: Path) -> str:
    from pydicom import dcmread

    return str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)


def test_envelope_reaches_orthanc_with_every_instance_byte_identical(
    tmp_path, sender_keys, orthanc
):
    dest = Destination("pacs", orthanc.ae_title, "127.0.0.1", orthanc.dicom_port)
    site = Site(tmp_path / "b", sender_keys, {"pacs": dest})
    zip_path, env_id, study = _envelope(tmp_path, sender_keys, site, count=6)

    site.receive(zip_path, env_id)
    site.run()

    stored = orthanc.instance_files()
    assert len(stored) == 6
    for path in study:
        got = dataset_bytes_of(stored[_pydicom_uid(path)], tmp_path / "got.dcm")
        assert got == dataset_bytes(path)
    assert site.outcomes == ["accepted"]
    assert site.store.get_envelope(env_id, "in").state == "opened"
    assert site.store.is_seen(env_id)


def test_envelope_reaches_storescp_and_the_forward_job_is_done(
    tmp_path, sender_keys, storescp
):
    dest = Destination("pacs", storescp.ae_title, "127.0.0.1", storescp.port)
    site = Site(tmp_path / "b", sender_keys, {"pacs": dest})
    zip_path, env_id, study = _envelope(tmp_path, sender_keys, site)

    site.receive(zip_path, env_id)
    site.run()

    assert len(storescp.files()) == len(study)
    job = site.store.list_jobs(queue="forward")[0]
    assert (job.state, job.payload["delivered"], job.payload["remaining"]) == (
        JobState.DONE,
        len(study),
        [],
    )


def _tamper(zip_path: Path, out: Path) -> Path:
    """Flip one byte in the middle of the ciphertext entry."""
    with zipfile.ZipFile(zip_path) as src, zipfile.ZipFile(out, "w") as dst:
        for info in src.infolist():
            data = src.read(info)
            if info.filename.endswith("payload.encrypted"):
                middle = len(data) // 2
                data = data[:middle] + bytes([data[middle] ^ 1]) + data[middle + 1 :]
            dst.writestr(info, data)
    return out


def test_tampered_envelope_is_quarantined_and_nothing_forwarded(
    tmp_path, sender_keys, storescp
):
    dest = Destination("pacs", storescp.ae_title, "127.0.0.1", storescp.port)
    site = Site(tmp_path / "b", sender_keys, {"pacs": dest})
    zip_path, env_id, _ = _envelope(tmp_path, sender_keys, site)

    site.receive(_tamper(zip_path, tmp_path / "tampered.zip"), env_id)
    site.run()

    env = site.store.get_envelope(env_id, "in")
    assert env.state == "quarantined"
    assert env.reason == "AuthenticationFailed: authentication failed"
    assert site.outcomes == ["decrypt_failed"]
    assert site.spool.path_of(env.path).exists()
    assert not site.spool.envelope_path("opened", env_id).exists()
    assert site.store.list_jobs(queue="forward") == []
    assert storescp.files() == []
    assert not site.store.is_seen(env_id)


def test_envelope_from_an_unknown_signer_is_quarantined(
    tmp_path, sender_keys, storescp
):
    dest = Destination("pacs", storescp.ae_title, "127.0.0.1", storescp.port)
    site = Site(tmp_path / "b", sender_keys, {"pacs": dest})
    stranger = _keys(tmp_path / "stranger-keys")
    zip_path, env_id, _ = _envelope(tmp_path, sender_keys, site, signer=stranger)

    site.receive(zip_path, env_id)
    site.run()

    assert site.store.get_envelope(env_id, "in").state == "quarantined"
    assert site.outcomes == ["unknown_sender"]
    assert storescp.files() == []


def test_replayed_envelope_id_is_quarantined_not_forwarded_twice(
    tmp_path, sender_keys, storescp
):
    dest = Destination("pacs", storescp.ae_title, "127.0.0.1", storescp.port)
    site = Site(tmp_path / "b", sender_keys, {"pacs": dest})
    zip_path, env_id, study = _envelope(tmp_path, sender_keys, site)
    site.receive(zip_path, env_id)
    site.run()
    # The same envelope comes in again by another way (say a drop folder), after
    # an operator removed the first record.
    site.store.set_envelope_state(env_id, "in", "stored")
    site.store.enqueue(
        NewJob(
            "open",
            f"open:{env_id}:again",
            payload={"envelope_id": env_id, "sender": "clinic-a"},
        )
    )

    site.run()

    assert site.outcomes == ["accepted", "duplicate"]
    assert len(storescp.files()) == len(study)


def test_expired_envelope_is_quarantined_as_expired_under_reject(
    tmp_path, sender_keys, storescp
):
    dest = Destination("pacs", storescp.ae_title, "127.0.0.1", storescp.port)
    site = Site(tmp_path / "b", sender_keys, {"pacs": dest}, expiry="reject")
    zip_path, env_id, _ = _envelope(
        tmp_path, sender_keys, site, expires_in=timedelta(seconds=-60)
    )

    site.receive(zip_path, env_id)
    site.run()

    env = site.store.get_envelope(env_id, "in")
    assert env.state == "quarantined"
    assert env.reason.startswith("ExpiredAssertion: ")
    assert site.outcomes == ["expired"]
    assert site.store.list_jobs(queue="forward") == []
    assert storescp.files() == []
    assert not site.store.is_seen(env_id)


def test_expired_envelope_is_forwarded_with_a_warning_under_warn(
    tmp_path, sender_keys, storescp
):
    dest = Destination("pacs", storescp.ae_title, "127.0.0.1", storescp.port)
    site = Site(tmp_path / "b", sender_keys, {"pacs": dest}, expiry="warn")
    zip_path, env_id, study = _envelope(
        tmp_path, sender_keys, site, expires_in=timedelta(seconds=-60)
    )

    site.receive(zip_path, env_id)
    site.run()

    env = site.store.get_envelope(env_id, "in")
    assert env.state == "opened"
    assert site.outcomes == ["accepted"]
    assert any("expired" in note for note in env.details["warnings"])
    assert len(storescp.files()) == len(study)


def test_pacs_down_then_up_receives_everything_after_retries(tmp_path, sender_keys):
    port = free_port()
    dest = Destination("pacs", "PACS", "127.0.0.1", port, connection_timeout=2)
    site = Site(tmp_path / "b", sender_keys, {"pacs": dest}, retry_seconds=0.5)
    zip_path, env_id, study = _envelope(tmp_path, sender_keys, site)
    site.receive(zip_path, env_id)

    site.run()
    job = site.store.list_jobs(queue="forward")[0]
    assert (job.state, job.attempts) == (JobState.READY, 1)
    assert job.payload["remaining"] and job.not_before > job.created_at
    assert "no association" in job.last_error

    scp = StoreSCP(tmp_path / "pacs", port=port)
    try:
        wait_until(site.forward_worker.run_once, timeout=10, what="the retry")
        assert len(scp.files()) == len(study)
    finally:
        scp.stop()
    assert site.store.get_job(job.id).state == JobState.DONE
