"""The state store's contract, run against SQLite and PostgreSQL alike.

Every test takes the ``store`` fixture, once per implementation, and checks one
behaviour that ``bridge/store/base.py`` promises. The PostgreSQL run uses a
private server started once per test run (``tests/support/postgres.py``) and a
fresh schema per test; it is skipped, with the reason, where the server
binaries or psycopg are missing.
"""

import sys

import pytest

from bridge.errors import StoreError
from bridge.store import (
    DuplicatePolicy,
    Envelope,
    Instance,
    InstanceOutcome,
    JobState,
    NewJob,
    StudyState,
    open_store,
)
from tests.support.postgres import postgres_server  # noqa: F401  (fixture)

ROUTE = "all"
ENV_ID = "0f8fad5b-d9cb-469f-a165-70867728950e"
T0 = 2e9  # a "now" for claims, after every not_before the tests set


@pytest.fixture(params=["sqlite", "postgres"])
def store_url(request, tmp_path) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'state.sqlite'}"
    return request.getfixturevalue("postgres_server").new_schema()


@pytest.fixture
def store(store_url):
    s = open_store(store_url)
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
        spool_path=kw.pop("spool_path", f"instances/{digest[:2]}/{digest}.dcm"),
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


def envelope(env_id=ENV_ID, direction="out", state="packed", **kw):
    return Envelope(
        id=env_id,
        direction=direction,
        peer=kw.pop("peer", "b"),
        path=kw.pop("path", f"outbox/{env_id}.zip"),
        size_bytes=3,
        state=state,
        **kw,
    )


def claimed(store, key="k", queue="seal", owner="w1", **kw):
    """Enqueue one job and lease it to ``owner``."""
    store.enqueue(NewJob(queue=queue, key=key, **kw))
    return store.claim(queue, owner, 30, now=T0)


# -- studies and instances ----------------------------------------------------


def test_add_instance_opens_a_study_with_its_quiet_deadline(store):
    result = add(store, inst())
    assert result.outcome == InstanceOutcome.STORED
    assert result.study.state == StudyState.OPEN
    assert result.study.generation == 0
    assert (result.study.instance_count, result.study.size_bytes) == (1, 10)
    assert result.study.seal_due == 1060.0


def test_add_instance_moves_the_deadline_but_never_past_max_age(store):
    add(store, inst(received_at=1000.0), age=100)
    result = add(store, inst(sop="1.2.3.2", digest="bb", received_at=1080.0), age=100)
    assert result.study.seal_due == 1100.0
    assert result.study.last_received == 1080.0


def test_same_uid_same_bytes_is_a_duplicate_stored_once(store):
    first = add(store, inst())
    again = add(store, inst())
    assert again.outcome == InstanceOutcome.DUPLICATE
    assert again.study.ref == first.study.ref
    assert len(store.study_instances(first.study.ref)) == 1


def test_same_uid_other_bytes_replaces_under_keep_newest(store):
    add(store, inst(digest="aa"))
    result = add(store, inst(digest="bb", size=7))
    assert result.outcome == InstanceOutcome.REPLACED
    assert result.previous.digest == "aa"
    assert [i.digest for i in store.study_instances(result.study.ref)] == ["bb"]
    assert (result.study.instance_count, result.study.size_bytes) == (1, 7)


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


def test_other_bytes_after_seal_go_into_the_follow_up(store):
    first = add(store, inst(digest="aa"))
    store.seal_study(first.study.ref, "quiet-period", [])
    later = add(store, inst(digest="bb"))
    assert later.outcome == InstanceOutcome.STORED
    assert later.study.generation == 1
    assert store.find_instance("1.2.3", ROUTE, "1.2.3.1").digest == "bb"
    assert [i.digest for i in store.study_instances(first.study.ref)] == ["aa"]


def test_other_bytes_after_seal_are_a_conflict_under_reject(store):
    first = add(store, inst(digest="aa"))
    store.seal_study(first.study.ref, "quiet-period", [])
    result = add(store, inst(digest="bb"), duplicates=DuplicatePolicy.REJECT)
    assert result.outcome == InstanceOutcome.CONFLICT
    assert store.open_studies() == []


def test_study_instances_are_in_arrival_order(store):
    ref = add(store, inst(sop="1.2.3.9", digest="cc")).study.ref
    add(store, inst(sop="1.2.3.1", digest="aa"))
    assert [i.sop_instance_uid for i in store.study_instances(ref)] == [
        "1.2.3.9",
        "1.2.3.1",
    ]
    assert store.study_instances(ref)[0].study_ref == ref


def test_one_study_per_route(store):
    a = add(store, inst())
    b = store.add_instance(
        inst(),
        route="other",
        quiet_seconds=60,
        max_age_seconds=600,
        duplicates=DuplicatePolicy.KEEP_NEWEST,
    )
    assert b.outcome == InstanceOutcome.STORED
    assert a.study.ref != b.study.ref
    assert store.find_instance("1.2.3", "nowhere", "1.2.3.1") is None


def test_due_studies_lists_only_open_studies_past_their_deadline(store):
    ref = add(store, inst(received_at=1000.0), quiet=60).study.ref
    assert store.due_studies(1059.0) == []
    assert [s.ref for s in store.due_studies(1060.0)] == [ref]


def test_open_and_recent_studies(store):
    old = add(store, inst(study="1.1", received_at=1000.0)).study.ref
    new = add(store, inst(study="2.2", received_at=2000.0)).study.ref
    store.seal_study(old, "max-age", [])
    assert [s.ref for s in store.open_studies()] == [new]
    assert [s.ref for s in store.recent_studies()] == [new, old]
    assert [s.ref for s in store.recent_studies(limit=1)] == [new]


def test_seal_enqueues_its_jobs_once_and_only_for_an_open_study(store):
    ref = add(store, inst()).study.ref
    job = NewJob(queue="seal", key=f"seal:{ref}:p", target="p")
    assert store.seal_study(ref, "quiet-period", [job])
    assert not store.seal_study(ref, "quiet-period", [job])
    assert len(store.list_jobs(queue="seal")) == 1
    sealed = store.get_study(ref)
    assert (sealed.state, sealed.seal_trigger) == (StudyState.SEALED, "quiet-period")
    assert sealed.sealed_at is not None


def test_held_study_is_not_due(store):
    ref = add(store, inst(received_at=1000.0)).study.ref
    store.hold_study(ref, "no route matched")
    assert store.due_studies(10_000.0) == []
    held = store.get_study(ref)
    assert (held.state, held.hold_reason) == (StudyState.HELD, "no route matched")
    assert not store.seal_study(ref, "quiet-period", [])


def test_unknown_study_is_none(store):
    assert store.get_study("st-000000000000") is None


# -- envelopes and seen ids ---------------------------------------------------


def test_put_envelope_records_it_once_with_its_jobs(store):
    assert store.put_envelope(envelope(details={"a": 1}), [NewJob("deliver", "d")])
    assert not store.put_envelope(envelope(state="other"), [NewJob("deliver", "e")])
    got = store.get_envelope(ENV_ID, "out")
    assert (got.state, got.details) == ("packed", {"a": 1})
    assert [j.key for j in store.list_jobs(queue="deliver")] == ["d"]
    assert store.get_envelope(ENV_ID, "in") is None


def test_set_envelope_state_changes_only_what_it_is_given(store):
    store.put_envelope(envelope(details={"a": 1}))
    store.set_envelope_state(ENV_ID, "out", "failed", reason="peer said no")
    got = store.get_envelope(ENV_ID, "out")
    assert (got.state, got.reason, got.details) == ("failed", "peer said no", {"a": 1})
    store.set_envelope_state(
        ENV_ID, "out", "moved", details={"b": 2}, path="x", jobs=[NewJob("q", "j")]
    )
    got = store.get_envelope(ENV_ID, "out")
    assert (got.details, got.path, got.reason) == ({"b": 2}, "x", "")
    assert store.list_jobs(queue="q")[0].key == "j"


def test_set_envelope_state_only_if_changes_nothing_from_another_state(store):
    store.put_envelope(envelope(state="quarantined", details={"a": 1}))

    moved = store.set_envelope_state(
        ENV_ID, "out", "stored", path="y", jobs=[NewJob("q", "k")], only_if="packed"
    )

    assert moved is False
    got = store.get_envelope(ENV_ID, "out")
    assert (got.state, got.path, got.details) == (
        "quarantined",
        f"outbox/{ENV_ID}.zip",
        {"a": 1},
    )
    assert store.list_jobs(queue="q") == []
    assert store.set_envelope_state(
        ENV_ID,
        "out",
        "stored",
        path="y",
        jobs=[NewJob("q", "k")],
        size_bytes=42,
        only_if="quarantined",
    )
    got = store.get_envelope(ENV_ID, "out")
    assert (got.state, got.path, got.size_bytes) == ("stored", "y", 42)
    assert [j.key for j in store.list_jobs(queue="q")] == ["k"]


def test_find_envelopes_filters_newest_first(store):
    store.put_envelope(envelope("e1", created_at=1.0, study_instance_uid="1.2"))
    store.put_envelope(envelope("e2", created_at=2.0, study_instance_uid="1.2"))
    store.put_envelope(envelope("e3", direction="in", state="opened", created_at=3.0))
    assert [e.id for e in store.find_envelopes()] == ["e3", "e2", "e1"]
    assert [e.id for e in store.find_envelopes(direction="out")] == ["e2", "e1"]
    assert [e.id for e in store.find_envelopes(state="opened")] == ["e3"]
    assert [e.id for e in store.find_envelopes(study_instance_uid="1.2", limit=1)] == [
        "e2"
    ]


def test_mark_seen_is_true_only_the_first_time(store):
    assert not store.is_seen(ENV_ID)
    assert store.mark_seen(ENV_ID, "site-a")
    assert not store.mark_seen(ENV_ID, "site-b")
    assert store.is_seen(ENV_ID)


# -- storage commitment -------------------------------------------------------


def test_commitment_is_recorded_and_shown_in_the_envelope(store):
    store.put_envelope(envelope(direction="in", state="opened", details={"k": "v"}))
    store.record_commitment("1.2.9", ENV_ID, "pacs", "requested")
    store.record_commitment("1.2.9", ENV_ID, "pacs", "failed", failed=2)
    store.record_commitment("1.2.10", ENV_ID, "archive", "committed")
    assert store.find_commitment("1.2.9") == (ENV_ID, "pacs")
    assert store.find_commitment("1.2.11") is None
    details = store.get_envelope(ENV_ID, "in").details
    assert details["k"] == "v"
    assert details["storage_commitment"] == {
        "pacs": {"state": "failed", "transaction_uid": "1.2.9", "failed": 2},
        "archive": {"state": "committed", "transaction_uid": "1.2.10", "failed": 0},
    }


def test_commitment_of_an_unknown_envelope_is_still_found(store):
    store.record_commitment("1.2.9", ENV_ID, "pacs", "requested")
    assert store.find_commitment("1.2.9") == (ENV_ID, "pacs")


# -- jobs -----------------------------------------------------------------------


def test_enqueue_with_a_known_key_returns_the_existing_job(store):
    first = store.enqueue(NewJob(queue="seal", key="k", payload={"a": 1}))
    second = store.enqueue(NewJob(queue="seal", key="k", payload={"a": 2}))
    assert second.id == first.id
    assert second.payload == {"a": 1}
    assert (first.state, first.attempts) == (JobState.READY, 0)


def test_claim_leases_a_ready_job(store):
    job = claimed(store)
    assert job.state == JobState.LEASED
    assert (job.lease_owner, job.lease_until) == ("w1", T0 + 30)
    assert store.claim("seal", "w2", 30, now=T0) is None


def test_claim_takes_the_earliest_due_job_then_the_oldest(store):
    store.enqueue(NewJob("q", "late", not_before=300.0))
    store.enqueue(NewJob("q", "b", not_before=100.0))
    store.enqueue(NewJob("q", "c", not_before=100.0))
    store.enqueue(NewJob("q", "future", not_before=T0 + 1))
    order = [store.claim("q", "w", 30, now=T0).key for _ in range(3)]
    assert order == ["b", "c", "late"]
    assert store.claim("q", "w", 30, now=T0) is None


def test_claim_takes_only_its_queue(store):
    store.enqueue(NewJob("other", "k"))
    assert store.claim("seal", "w", 30, now=T0) is None


def test_expired_lease_is_claimed_again(store):
    claimed(store)
    job = store.claim("seal", "w2", 30, now=T0 + 31)
    assert job.lease_owner == "w2"
    assert not store.complete(job.id, "w1")


def test_expire_leases_frees_every_leased_job_at_once(store):
    claimed(store)
    store.enqueue(NewJob("seal", "still-ready"))
    assert store.expire_leases() == 1
    job = store.claim("seal", "w2", 30, now=T0 + 1)
    assert (job.key, job.lease_owner) == ("k", "w2")
    assert not store.complete(job.id, "w1")


def test_claim_passes_over_skipped_targets(store):
    store.enqueue(NewJob("q", "to-down", target="down"))
    store.enqueue(NewJob("q", "to-up", target="up"))
    job = store.claim("q", "w", 30, now=T0, skip_targets=frozenset({"down"}))
    assert job.key == "to-up"
    assert store.claim("q", "w", 30, now=T0, skip_targets=frozenset({"down"})) is None


def test_renew_extends_only_the_owners_lease(store):
    store.enqueue(NewJob("seal", "k"))
    job = store.claim("seal", "w1", 30)
    assert store.renew(job.id, "w1", 600)
    assert not store.renew(job.id, "w2", 600)
    assert store.get_job(job.id).lease_until >= job.lease_until + 500


def test_complete_records_its_results_in_one_step(store):
    job = claimed(store)
    done = store.complete(
        job.id,
        "w1",
        jobs=[NewJob("deliver", "d1", target="b")],
        envelope=envelope(),
        payload={"built": True},
        seen=("seen-id", "site-a"),
    )
    assert done
    after = store.get_job(job.id)
    assert (after.state, after.payload, after.lease_owner) == (
        JobState.DONE,
        {"built": True},
        "",
    )
    assert store.list_jobs(queue="deliver")[0].target == "b"
    assert store.get_envelope(ENV_ID, "out").state == "packed"
    assert store.is_seen("seen-id")


def test_complete_sets_an_envelope_state(store):
    store.put_envelope(envelope())
    job = claimed(store)
    assert store.complete(job.id, "w1", envelope_state=(ENV_ID, "out", "delivered"))
    assert store.get_envelope(ENV_ID, "out").state == "delivered"


def test_complete_by_a_lost_owner_changes_nothing(store):
    job = claimed(store)
    done = store.complete(
        job.id,
        "w2",
        jobs=[NewJob("deliver", "d1")],
        envelope=envelope(),
        seen=("seen-id", "site-a"),
    )
    assert not done
    assert store.get_job(job.id).state == JobState.LEASED
    assert store.list_jobs(queue="deliver") == []
    assert store.get_envelope(ENV_ID, "out") is None
    assert not store.is_seen("seen-id")


def test_retry_later_counts_the_attempt_and_waits(store):
    job = claimed(store)
    assert store.retry_later(job.id, "w1", "peer down", T0 + 100, payload={"n": 1})
    assert store.claim("seal", "w1", 30, now=T0 + 99) is None
    again = store.claim("seal", "w1", 30, now=T0 + 100)
    assert (again.attempts, again.last_error, again.payload) == (
        1,
        "peer down",
        {"n": 1},
    )


def test_dead_letter_parks_the_job_until_requeued(store):
    job = claimed(store)
    assert store.dead_letter(job.id, "w1", "gave up")
    dead = store.get_job(job.id)
    assert (dead.state, dead.attempts, dead.last_error) == (JobState.DEAD, 1, "gave up")
    assert store.claim("seal", "w1", 30, now=3e9) is None
    assert store.requeue(job.id)
    assert not store.requeue(job.id)
    assert store.get_job(job.id).attempts == 0
    assert store.claim("seal", "w1", 30) is not None


def test_release_returns_a_job_without_counting_an_attempt(store):
    job = claimed(store)
    assert store.release(job.id, "w1")
    assert not store.release(job.id, "w1")
    after = store.get_job(job.id)
    assert (after.state, after.attempts, after.lease_owner) == (JobState.READY, 0, "")


def test_unknown_job_is_none(store):
    assert store.get_job(999) is None


def test_list_jobs_filters_oldest_first(store):
    store.enqueue(NewJob("forward", "forward:e1:pacs", target="pacs"))
    store.enqueue(NewJob("forward", "forward:e1:archive", target="archive"))
    store.enqueue(NewJob("forward", "forward:e2:pacs", target="pacs"))
    store.enqueue(NewJob("seal", "seal:x:b", target="b"))
    assert [j.key for j in store.list_jobs(key_prefix="forward:e1:")] == [
        "forward:e1:pacs",
        "forward:e1:archive",
    ]
    assert len(store.list_jobs(queue="forward", target="pacs")) == 2
    assert len(store.list_jobs(state=JobState.READY, limit=3)) == 3
    assert store.list_jobs(state=JobState.DEAD) == []


def test_list_jobs_key_prefix_takes_wildcards_literally(store):
    store.enqueue(NewJob("q", "a%b_c"))
    store.enqueue(NewJob("q", "axbxc"))
    assert [j.key for j in store.list_jobs(key_prefix="a%b_")] == ["a%b_c"]


def test_job_counts_by_queue_target_and_state(store):
    store.enqueue(NewJob("deliver", "d1", target="b"))
    store.enqueue(NewJob("deliver", "d2", target="b"))
    store.enqueue(NewJob("deliver", "d3", target="c"))
    store.claim("deliver", "w", 30, now=T0)
    counts = {(c.queue, c.target, c.state): c.count for c in store.job_counts()}
    assert counts == {
        ("deliver", "b", JobState.LEASED): 1,
        ("deliver", "b", JobState.READY): 1,
        ("deliver", "c", JobState.READY): 1,
    }


# -- enqueue signals --------------------------------------------------------------


def listen(store, queue="q"):
    """Subscribe to ``queue``; each call appends the queue's committed job keys."""
    heard = []
    store.subscribe(
        queue, lambda: heard.append(sorted(j.key for j in store.list_jobs(queue=queue)))
    )
    return heard


def test_enqueue_tells_the_queue_subscribers_once_committed(store):
    heard, other = listen(store), listen(store, "other")
    store.enqueue(NewJob("q", "k"))
    assert heard == [["k"]]
    assert other == []


def _with_jobs(store, job):
    """Each way, besides enqueue, that adds jobs in one transaction."""
    return {
        "seal_study": lambda: store.seal_study(
            add(store, inst()).study.ref, "t", [job]
        ),
        "put_envelope": lambda: store.put_envelope(envelope(), [job]),
        "set_envelope_state": lambda: store.set_envelope_state(
            ENV_ID, "out", "x", jobs=[job]
        ),
        "complete": lambda: store.complete(
            claimed(store, key="s1", queue="s").id, "w1", jobs=[job]
        ),
    }


@pytest.mark.parametrize(
    "way", ["seal_study", "put_envelope", "set_envelope_state", "complete"]
)
def test_jobs_added_with_other_records_tell_their_queue(store, way):
    heard = listen(store)
    _with_jobs(store, NewJob("q", "k"))[way]()
    assert heard == [["k"]]


@pytest.mark.parametrize("way", ["release", "retry_later", "requeue"])
def test_job_made_due_again_tells_its_queue(store, way):
    job = claimed(store, queue="q")
    if way == "requeue":
        store.dead_letter(job.id, "w1", "gave up")
    heard = listen(store)
    {
        "release": lambda: store.release(job.id, "w1"),
        "retry_later": lambda: store.retry_later(job.id, "w1", "down", 0.0),
        "requeue": lambda: store.requeue(job.id),
    }[way]()
    assert heard == [["k"]]


def test_job_due_later_tells_no_one(store):
    heard = listen(store)
    store.enqueue(NewJob("q", "later", not_before=T0))
    job = claimed(store, key="now", queue="q")
    heard.clear()
    store.retry_later(job.id, "w1", "peer down", T0 + 100)
    store.dead_letter(store.claim("q", "w1", 30, now=T0).id, "w1", "gave up")
    assert heard == []


def test_known_key_tells_no_one_again(store):
    heard = listen(store)
    store.enqueue(NewJob("q", "k"))
    store.enqueue(NewJob("q", "k"))
    assert heard == [["k"]]


def test_rolled_back_transaction_tells_no_one(store):
    heard = listen(store)
    unserialisable = NewJob("q", "bad", payload={"x": object()})
    with pytest.raises(TypeError):
        store.put_envelope(envelope(), [NewJob("q", "good"), unserialisable])
    assert heard == []
    assert store.list_jobs(queue="q") == []


def test_unsubscribed_callback_is_not_called(store):
    heard = []

    def callback():
        heard.append("called")

    store.subscribe("q", callback)
    store.unsubscribe("q", callback)
    store.unsubscribe("q", callback)  # a second time is ignored
    store.enqueue(NewJob("q", "k"))
    assert heard == []


def test_failing_subscriber_neither_undoes_the_job_nor_silences_others(store):
    def fail():
        raise RuntimeError("subscriber bug")

    store.subscribe("q", fail)
    heard = listen(store)
    job = store.enqueue(NewJob("q", "k"))
    assert heard == [["k"]]
    assert store.get_job(job.id).state == JobState.READY


# -- retention ------------------------------------------------------------------


def _delivered_study(store, peers=("b",), state="delivered"):
    """A sealed study with an outgoing envelope for its first peer, in ``state``."""
    ref = add(store, inst(received_at=1000.0)).study.ref
    store.seal_study(
        ref, "quiet-period", [NewJob("seal", f"seal:{ref}:{p}") for p in peers]
    )
    job = store.claim("seal", "w", 60, now=T0)
    store.complete(job.id, "w", envelope=envelope(study_ref=ref, state=state))
    return ref


def test_delivered_study_becomes_purgeable_once(store):
    ref = _delivered_study(store)
    assert [s.ref for s in store.purgeable_studies(before=T0)] == [ref]
    assert store.exclusive_spool_paths(ref) == ["instances/aa/aa.dcm"]
    store.mark_study_purged(ref)
    assert store.purgeable_studies(before=T0) == []
    assert store.get_study(ref).state == StudyState.SEALED


def test_study_is_not_purgeable_before_its_time(store):
    _delivered_study(store)
    assert store.purgeable_studies(before=0.0) == []


def test_study_waits_while_an_envelope_is_undelivered(store):
    _delivered_study(store, state="packed")
    assert store.purgeable_studies(before=T0) == []


def test_study_waits_for_a_pending_seal_job_of_another_peer(store):
    _delivered_study(store, peers=("b", "c"))
    assert store.purgeable_studies(before=T0) == []


def test_spool_file_shared_with_an_unpurged_study_is_not_exclusive(store):
    ref = _delivered_study(store)
    store.add_instance(
        inst(),
        route="other",
        quiet_seconds=60,
        max_age_seconds=600,
        duplicates=DuplicatePolicy.KEEP_NEWEST,
    )
    assert store.exclusive_spool_paths(ref) == []
    assert store.spool_path_used("instances/aa/aa.dcm")
    assert not store.spool_path_used("instances/zz/zz.dcm")


def test_envelopes_become_purgeable_when_done_with(store):
    store.put_envelope(envelope("out-1", state="delivered"))
    store.put_envelope(envelope("out-2", state="packed"))
    store.put_envelope(envelope("in-1", direction="in", state="opened"))
    store.put_envelope(envelope("in-2", direction="in", state="opened"))
    store.put_envelope(envelope("in-3", direction="in", state="quarantined"))
    store.enqueue(NewJob("forward", "forward:in-2:pacs"))
    purgeable = {(e.id, e.direction) for e in store.purgeable_envelopes(before=T0)}
    assert purgeable == {("out-1", "out"), ("in-1", "in")}
    store.mark_envelope_purged("out-1", "out")
    assert {e.id for e in store.purgeable_envelopes(before=T0)} == {"in-1"}


# -- health, reopening and urls ----------------------------------------------


def test_check_writable_passes_on_an_open_store(store):
    store.check_writable()
    assert store.list_jobs() == []


def test_state_survives_reopening(store_url):
    first = open_store(store_url)
    ref = add(first, inst()).study.ref
    first.close()
    again = open_store(store_url)
    assert [i.sop_instance_uid for i in again.study_instances(ref)] == ["1.2.3.1"]
    again.close()


def test_open_store_refuses_an_unknown_scheme():
    with pytest.raises(StoreError, match="scheme 'mysql' is not supported"):
        open_store("mysql://db/bridge")


def test_open_store_names_the_extra_when_psycopg_is_missing(monkeypatch):
    monkeypatch.setitem(sys.modules, "psycopg", None)
    monkeypatch.delitem(sys.modules, "bridge.store.postgres", raising=False)
    with pytest.raises(StoreError, match=r"install the 'postgres' extra"):
        open_store("postgresql://db/bridge")
