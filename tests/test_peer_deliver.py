"""The deliver-job handler: what it does with jobs it cannot carry out."""

import threading

import pytest

from bridge.peer.deliver import Deliverer, deliver_job
from bridge.peer.settings import PeerSettings
from bridge.spool import Spool
from bridge.store.base import Envelope, JobState
from bridge.store.sqlite import SQLiteStore
from bridge.workers.base import JobContext, Worker, WorkerSpec

ENV_ID = "0b1c2d3e-4f50-4617-8899-aabbccddeeff"


@pytest.fixture
def setup(tmp_path):
    store = SQLiteStore(tmp_path / "state.db")
    spool = Spool(tmp_path / "spool")
    drop = tmp_path / "drop"
    drop.mkdir()
    peers = [PeerSettings(name="site-b", transport="drop", drop_folder=drop)]
    yield store, spool, Deliverer(store, spool, peers), drop
    store.close()


def _record(store, spool, peer="site-b", write=True):
    path = spool.envelope_path("outbox", ENV_ID)
    if write:
        path.write_bytes(b"envelope bytes")
    env = Envelope(ENV_ID, "out", peer, spool.relative(path), 14, "sealed")
    store.put_envelope(env, jobs=[deliver_job(ENV_ID, peer)])
    return store.list_jobs(queue="deliver")[-1]


def _ctx():
    return JobContext(stopping=threading.Event(), renew=lambda: True)


def test_deliver_job_targets_its_peer_for_the_circuit_breaker():
    job = deliver_job(ENV_ID, "site-b")

    assert job.target == "site-b"
    assert job.payload == {"envelope_id": ENV_ID, "peer": "site-b"}


def test_delivery_marks_the_envelope_delivered(setup):
    store, spool, deliverer, drop = setup
    job = _record(store, spool)

    Worker(store, WorkerSpec(queue="deliver", handler=deliverer)).run_once()

    assert store.get_job(job.id).state == JobState.DONE
    assert store.get_envelope(ENV_ID, "out").state == "delivered"
    assert (drop / f"{ENV_ID}.zip").read_bytes() == b"envelope bytes"


def test_job_for_a_peer_no_longer_configured_is_dead(setup):
    store, spool, deliverer, _ = setup
    job = _record(store, spool, peer="gone")

    outcome = deliverer(job, _ctx())

    assert outcome.kind == "dead"
    assert "'gone' is not configured" in outcome.error


def test_job_whose_envelope_file_is_missing_is_dead(setup):
    store, spool, deliverer, _ = setup
    job = _record(store, spool, write=False)

    outcome = deliverer(job, _ctx())

    assert outcome.kind == "dead"
    assert "file missing" in outcome.error
