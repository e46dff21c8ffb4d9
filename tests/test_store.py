"""Contract tests of the SQLite state store, as the ingress relies on it."""

import pytest

from bridge.store import (
    DuplicatePolicy,
    Instance,
    InstanceOutcome,
    JobState,
    NewJob,
    SQLiteStore,
    StudyState,
)

ROUTE = "all"


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.sqlite")
    yield s
    s.close()


def inst(sop="1.2.3.1", digest="aa", study="1.2.3", received_at=1000.0, **kw):
    return Instance(
        sop_instance_uid=sop,
        study_instance_uid=study,
        series_instance_uid=kw.pop("series", "1.2.3.9"),
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        digest=digest,
        size_bytes=kw.pop("size", 10),
        spool_path=f"instances/{digest[:2]}/{digest}.dcm",
        received_at=received_at,
        **kw,
    )


def add(store, instance, duplicates=DuplicatePolicy.KEEP_NEWEST, quiet=60, age=600):
    return store.add_instance(
        instance,
        route=ROUTE,
        quiet_seconds=quiet,
        max_age_seconds=age,
        duplicates=duplicates,
    )


def test_add_instance_opens_a_study_with_its_quiet_deadline(store):
    result = add(store, inst())
    assert result.outcome == InstanceOutcome.STORED
    assert result.study.state == StudyState.OPEN
    assert result.study.seal_due == 1060.0


def test_add_instance_moves_the_deadline_but_never_past_max_age(store):
    add(store, inst(received_at=1000.0), age=100)
    result = add(store, inst(sop="1.2.3.2", digest="bb", received_at=1080.0), age=100)
    assert result.study.seal_due == 1100.0


def test_same_uid_same_bytes_is_a_duplicate_stored_once(store):
    first = add(store, inst())
    again = add(store, inst())
    assert again.outcome == InstanceOutcome.DUPLICATE
    assert len(store.study_instances(first.study.ref)) == 1


def test_same_uid_other_bytes_replaces_under_keep_newest(store):
    add(store, inst(digest="aa"))
    result = add(store, inst(digest="bb"))
    assert result.outcome == InstanceOutcome.REPLACED
    assert result.previous.digest == "aa"
    assert [i.digest for i in store.study_instances(result.study.ref)] == ["bb"]


def test_same_uid_other_bytes_is_a_conflict_under_reject(store):
    add(store, inst(digest="aa"))
    result = add(store, inst(digest="bb"), duplicates=DuplicatePolicy.REJECT)
    assert result.outcome == InstanceOutcome.CONFLICT
    assert [i.digest for i in store.study_instances(result.study.ref)] == ["aa"]


def test_instance_after_seal_opens_a_follow_up_generation(store):
    first = add(store, inst())
    assert store.seal_study(first.study.ref, "quiet-period", [])
    later = add(store, inst(sop="1.2.3.2", digest="bb"))
    assert later.study.ref != first.study.ref
    assert later.study.generation == 1
    assert later.outcome == InstanceOutcome.STORED


def test_resent_instance_of_a_sealed_study_is_a_duplicate(store):
    first = add(store, inst())
    store.seal_study(first.study.ref, "quiet-period", [])
    assert add(store, inst()).outcome == InstanceOutcome.DUPLICATE


def test_due_studies_lists_only_open_studies_past_their_deadline(store):
    ref = add(store, inst(received_at=1000.0), quiet=60).study.ref
    assert store.due_studies(1059.0) == []
    assert [s.ref for s in store.due_studies(1060.0)] == [ref]


def test_seal_enqueues_its_jobs_once_and_only_for_an_open_study(store):
    ref = add(store, inst()).study.ref
    job = NewJob(queue="seal", key=f"seal:{ref}:p", target="p")
    assert store.seal_study(ref, "quiet-period", [job])
    assert not store.seal_study(ref, "quiet-period", [job])
    assert len(store.list_jobs(queue="seal")) == 1
    assert store.get_study(ref).seal_trigger == "quiet-period"


def test_held_study_is_not_due(store):
    ref = add(store, inst(received_at=1000.0)).study.ref
    store.hold_study(ref, "no route matched")
    assert store.due_studies(10_000.0) == []
    assert store.get_study(ref).state == StudyState.HELD


def test_claim_leases_a_ready_job(store):
    store.enqueue(NewJob(queue="seal", key="k"))
    job = store.claim("seal", "w1", 30, now=2e9)
    assert job.state == JobState.LEASED
    assert job.lease_owner == "w1"
    assert store.claim("seal", "w2", 30, now=2e9) is None


def test_expired_lease_is_claimed_again(store):
    store.enqueue(NewJob(queue="seal", key="k"))
    store.claim("seal", "w1", 30, now=2e9)
    job = store.claim("seal", "w2", 30, now=2e9 + 31)
    assert job.lease_owner == "w2"
    assert not store.complete(job.id, "w1")


def test_retry_later_counts_the_attempt_and_waits(store):
    job = store.enqueue(NewJob(queue="seal", key="k"))
    store.claim("seal", "w1", 30, now=2e9)
    assert store.retry_later(job.id, "w1", "peer down", not_before=2e9 + 100)
    assert store.claim("seal", "w1", 30, now=2e9 + 99) is None
    again = store.claim("seal", "w1", 30, now=2e9 + 100)
    assert again.attempts == 1
    assert again.last_error == "peer down"


def test_dead_letter_parks_the_job_until_requeued(store):
    job = store.enqueue(NewJob(queue="seal", key="k"))
    store.claim("seal", "w1", 30, now=2e9)
    assert store.dead_letter(job.id, "w1", "gave up")
    assert store.claim("seal", "w1", 30, now=3e9) is None
    assert store.requeue(job.id)
    assert store.get_job(job.id).attempts == 0
    assert store.claim("seal", "w1", 30) is not None


def test_release_returns_a_job_without_counting_an_attempt(store):
    job = store.enqueue(NewJob(queue="seal", key="k"))
    store.claim("seal", "w1", 30, now=2e9)
    assert store.release(job.id, "w1")
    assert store.get_job(job.id).state == JobState.READY
    assert store.get_job(job.id).attempts == 0


def test_enqueue_with_a_known_key_returns_the_existing_job(store):
    first = store.enqueue(NewJob(queue="seal", key="k", payload={"a": 1}))
    second = store.enqueue(NewJob(queue="seal", key="k", payload={"a": 2}))
    assert second.id == first.id
    assert second.payload == {"a": 1}


def test_state_survives_reopening_the_database(tmp_path):
    path = tmp_path / "state.sqlite"
    first = SQLiteStore(path)
    ref = add(first, inst()).study.ref
    first.close()
    again = SQLiteStore(path)
    assert [i.sop_instance_uid for i in again.study_instances(ref)] == ["1.2.3.1"]
    again.close()
