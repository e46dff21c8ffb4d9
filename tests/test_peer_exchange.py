"""Two bridge processes on loopback: one delivers envelopes, the other takes them."""

from contextlib import closing

import httpx
import pydicom
import pytest

from bridge.peer.deliver import DELIVER_QUEUE, deliver_job
from bridge.store import SQLiteStore
from bridge.store.base import Envelope, JobState, NewJob
from tests.support.net import free_port, wait_until
from tests.support.peer_env import BridgeProcess, make_key_dirs, pack_envelope
from tests.support.sites import (
    Pacs,
    Sites,
    dead_jobs,
    end_state,
    send,
    start_and_deliver,
    study_of,
)
from tests.support.studies import make_instance

FAST_RETRY = {"initial_seconds": 0.2, "factor": 2, "max_seconds": 1.0}
FAST_BREAKER = {"failures_to_open": 3, "open_seconds": 0.3}


@pytest.fixture(scope="module")
def keys(tmp_path_factory):
    return make_key_dirs(tmp_path_factory.mktemp("keys"))


def _receiver_conf(keys, **extra):
    return {
        "senders": [
            {
                "name": "site-a",
                "id": "site-a",
                "token": "token-a",
                "signing_keys": [str(keys / "a" / "signing.pub")],
            }
        ],
        **extra,
    }


@pytest.fixture(scope="module")
def receiver(tmp_path_factory, keys):
    proc = BridgeProcess(
        tmp_path_factory.mktemp("procs"), "b", _receiver_conf(keys, server={})
    )
    yield proc.start()
    proc.stop()


@pytest.fixture
def start_sender(tmp_path):
    started = []

    def start(*peers):
        conf = {
            "deliver": True,
            "peers": list(peers),
            "retry": FAST_RETRY,
            "breaker": FAST_BREAKER,
        }
        proc = BridgeProcess(tmp_path, f"a{len(started)}", conf).start()
        started.append(proc)
        return proc

    yield start
    for proc in started:
        proc.stop()


def _http_peer(name, port, token="token-a"):  # noqa: S107
    return {
        "name": name,
        "url": f"http://127.0.0.1:{port}",
        "token": token,
        "timeout_seconds": 5,
    }


def _queue_envelope(sender, keys, peer):
    """Pack an envelope into the sender's outbox and queue its delivery to peer."""
    store = sender.store()
    out = sender.spool / "outbox"
    result = pack_envelope(out / "new.zip", keys / "a", keys / "b")
    path = out / f"{result.envelope_id}.zip"
    result.path.rename(path)
    env = Envelope(
        id=result.envelope_id,
        direction="out",
        peer=peer,
        path=f"outbox/{path.name}",
        size_bytes=result.size_bytes,
        state="sealed",
        study_instance_uid=result.study_instance_uid,
    )
    store.put_envelope(env, jobs=[deliver_job(result.envelope_id, peer)])
    job = store.list_jobs(queue=DELIVER_QUEUE, target=peer)[-1]
    store.close()
    return result, job.id


def _job(proc, job_id):
    store = proc.store()
    try:
        return store.get_job(job_id)
    finally:
        store.close()


def _job_in(proc, job_id, *states):
    return _job(proc, job_id).state in states


def _received(proc, envelope_id):
    store = proc.store()
    try:
        return store.get_envelope(envelope_id, "in")
    finally:
        store.close()


def test_envelope_is_delivered_to_a_peer_process(receiver, start_sender, keys):
    sender = start_sender(_http_peer("site-b", receiver.port))

    result, job_id = _queue_envelope(sender, keys, "site-b")

    wait_until(lambda: _job_in(sender, job_id, JobState.DONE), what="delivery")
    got = _received(receiver, result.envelope_id)
    assert (got.peer, got.state) == ("site-a", "stored")
    sent = (sender.spool / "outbox" / f"{result.envelope_id}.zip").read_bytes()
    assert (receiver.spool / got.path).read_bytes() == sent
    store = sender.store()
    assert store.get_envelope(result.envelope_id, "out").state == "delivered"
    store.close()


def test_peer_down_then_up_is_delivered_after_it_returns_with_backoff(
    tmp_path, start_sender, keys
):
    port = free_port()
    sender = start_sender(_http_peer("site-b", port))

    result, job_id = _queue_envelope(sender, keys, "site-b")

    def backing_off():
        job = _job(sender, job_id)
        return job.attempts >= 2 and job.state == JobState.READY

    wait_until(backing_off, what="two failed attempts, waiting for the next")
    waiting = _job(sender, job_id)
    assert "network error" in waiting.last_error
    assert waiting.not_before > waiting.updated_at  # the backoff, on record

    peer = BridgeProcess(tmp_path, "b-late", _receiver_conf(keys, server={}), port)
    peer.start()
    try:
        wait_until(lambda: _job_in(sender, job_id, JobState.DONE), what="delivery")
        assert _job(sender, job_id).attempts >= 2
        assert _received(peer, result.envelope_id).state == "stored"
    finally:
        peer.stop()


def test_wrong_token_dead_letters_at_once_with_the_peers_answer(
    receiver, start_sender, keys
):
    sender = start_sender(_http_peer("site-b", receiver.port, token="token-wrong"))

    result, job_id = _queue_envelope(sender, keys, "site-b")

    wait_until(lambda: _job_in(sender, job_id, JobState.DEAD), what="dead-letter")
    dead = _job(sender, job_id)
    assert dead.attempts == 1
    assert "answered 401" in dead.last_error
    assert "invalid credential" in dead.last_error
    assert _received(receiver, result.envelope_id) is None


def test_delivering_a_duplicate_counts_as_delivered(receiver, start_sender, keys):
    sender = start_sender(_http_peer("site-b", receiver.port))
    result, job_id = _queue_envelope(sender, keys, "site-b")
    wait_until(lambda: _job_in(sender, job_id, JobState.DONE), what="delivery")
    store = sender.store()
    again = store.enqueue(
        NewJob(
            queue=DELIVER_QUEUE,
            key=f"deliver:{result.envelope_id}:site-b:again",
            payload={"envelope_id": result.envelope_id, "peer": "site-b"},
            target="site-b",
        )
    )
    store.close()

    wait_until(lambda: _job_in(sender, again.id, JobState.DONE), what="second delivery")
    assert "result=duplicate" in sender.log.read_text()
    store = receiver.store()
    received = store.find_envelopes(direction="in", limit=1000)
    assert [e.id for e in received].count(result.envelope_id) == 1
    store.close()


def test_dead_peer_does_not_hold_up_delivery_to_another(receiver, start_sender, keys):
    sender = start_sender(
        _http_peer("dead", free_port()), _http_peer("site-b", receiver.port)
    )
    _, dead_job = _queue_envelope(sender, keys, "dead")
    wait_until(lambda: _job(sender, dead_job).attempts >= 1, what="dead peer tried")

    _, live_job = _queue_envelope(sender, keys, "site-b")

    wait_until(lambda: _job_in(sender, live_job, JobState.DONE), what="delivery")
    assert _job(sender, dead_job).state in (JobState.READY, JobState.LEASED)


def test_drop_folder_round_trip(tmp_path, start_sender, keys):
    drop = tmp_path / "carried"
    drop.mkdir()
    (drop / ".other.zip.part").write_bytes(b"half written")
    (drop / "junk.zip").write_bytes(b"not an envelope")
    receiver = BridgeProcess(
        tmp_path,
        "b-drop",
        _receiver_conf(
            keys,
            inboxes=[{"folder": str(drop), "poll_seconds": 0.05}],
        ),
    ).start()
    try:
        sender = start_sender(
            {"name": "site-b", "transport": "drop", "drop_folder": str(drop)}
        )

        result, job_id = _queue_envelope(sender, keys, "site-b")

        wait_until(lambda: _job_in(sender, job_id, JobState.DONE), what="drop")
        wait_until(
            lambda: _received(receiver, result.envelope_id) is not None,
            what="envelope taken from the inbox",
        )
        wait_until(lambda: (drop / "rejected" / "junk.zip").exists(), what="junk aside")
    finally:
        receiver.stop()
    reason = (drop / "rejected" / "junk.zip.reason.txt").read_text()
    assert "MalformedEnvelope" in reason
    assert (drop / ".other.zip.part").read_bytes() == b"half written"
    assert not (drop / f"{result.envelope_id}.zip").exists()
    got = _received(receiver, result.envelope_id)
    sent = (sender.spool / "outbox" / f"{result.envelope_id}.zip").read_bytes()
    assert (receiver.spool / got.path).read_bytes() == sent


def test_peer_fetches_and_lists_the_envelopes_built_for_it(tmp_path, keys):
    holder = BridgeProcess(
        tmp_path,
        "holder",
        {"server": {}, "senders": [{"name": "site-b", "token": "token-b"}]},
    ).start()
    try:
        result, _ = _queue_envelope(holder, keys, "site-b")
        auth = {"Authorization": "Bearer token-b"}
        uid = result.study_instance_uid

        listed = httpx.get(
            f"{holder.url}/api/jmix", params={"studyInstanceUid": uid}, headers=auth
        )
        got = httpx.get(f"{holder.url}/api/jmix/{result.envelope_id}", headers=auth)
        manifest = httpx.get(
            f"{holder.url}/api/jmix/{result.envelope_id}/manifest", headers=auth
        )
    finally:
        holder.stop()
    assert [e["id"] for e in listed.json()["envelopes"]] == [result.envelope_id]
    sent = (holder.spool / "outbox" / f"{result.envelope_id}.zip").read_bytes()
    assert got.content == sent
    assert manifest.json()["id"] == result.envelope_id
    assert uid not in holder.log.read_text()


def test_instance_after_the_seal_travels_alone_in_a_follow_up_envelope(tmp_path):
    pacs = Pacs(tmp_path / "pacs")
    sites = Sites(tmp_path / "sites", (pacs.ae_title, pacs.port))
    study = study_of(tmp_path / "study", 3)
    first = next(iter(study.values()))
    header = pydicom.dcmread(first, stop_before_pixels=True)
    try:
        start_and_deliver(sites, pacs, study)

        late = make_instance(
            tmp_path / "late.dcm",
            study_uid=header.StudyInstanceUID,
            series_uid=header.SeriesInstanceUID,
        )
        late_uid = str(pydicom.dcmread(late, stop_before_pixels=True).SOPInstanceUID)
        assert send(sites, {late_uid: late}).returncode == 0
        repeats = end_state(sites, pacs, {**study, late_uid: late})
    finally:
        sites.stop()
        pacs.stop()

    # Every instance reached the PACS once: the first envelope was not re-sent.
    assert repeats == 0
    assert dead_jobs(sites) == 0
    with closing(SQLiteStore(sites.db("a"))) as store_a:
        sent = store_a.find_envelopes(direction="out")
        studies = {env.id: store_a.get_study(env.study_ref) for env in sent}
        late_env = next(e for e in sent if studies[e.id].generation > 0)
        late_instances = store_a.study_instances(late_env.study_ref)
    assert len(sent) == 2
    assert [s.generation for s in studies.values()].count(0) == 1
    assert [i.sop_instance_uid for i in late_instances] == [late_uid]
    with closing(SQLiteStore(sites.db("b"))) as store_b:
        received = {env.id for env in store_b.find_envelopes(direction="in")}
    assert received == {env.id for env in sent}
