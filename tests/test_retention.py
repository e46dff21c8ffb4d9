"""Retention: spool files go once nothing can need them; records and quarantine stay."""

import os
import sqlite3
import time

import pytest

from bridge.ops.retention import Janitor
from bridge.receiving.progress import DELIVERED, Answer, ProgressLog, progress_folder
from bridge.spool import Spool
from bridge.store import (
    DuplicatePolicy,
    Envelope,
    Instance,
    JobState,
    NewJob,
    SQLiteStore,
    StudyState,
)

DAY = 86400.0
LATER = time.time() + 10 * DAY  # "now" for rounds run after the retention time


@pytest.fixture
def site(tmp_path):
    store = SQLiteStore(tmp_path / "state.db")
    spool = Spool(tmp_path / "spool")
    yield store, spool, Janitor(store, spool, retention_seconds=DAY)
    store.close()


def _instance(spool: Spool, data: bytes, sop: str) -> Instance:
    src = spool.root / "tmp" / f"{sop}.dcm"
    src.write_bytes(data)
    spooled = spool.adopt_instance(src)
    return Instance(
        sop_instance_uid=sop,
        study_instance_uid="1.2.3",
        series_instance_uid="1.2.3.4",
        sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
        transfer_syntax_uid="1.2.840.10008.1.2.1",
        digest=spooled.digest,
        size_bytes=spooled.size_bytes,
        spool_path=spooled.path,
    )


def _sealed_study(store, spool, peers=("b",), data=(b"one", b"two")):
    for i, payload in enumerate(data):
        result = store.add_instance(
            _instance(spool, payload, f"1.2.3.4.{i}"),
            route="r",
            quiet_seconds=30,
            max_age_seconds=60,
            duplicates=DuplicatePolicy.KEEP_NEWEST,
        )
    ref = result.study.ref
    store.seal_study(
        ref, "quiet-period", [NewJob("seal", f"seal:{ref}:{p}") for p in peers]
    )
    return ref


def _deliver(store, spool, ref, peer="b", state="delivered"):
    job = store.claim("seal", "w", 60)
    out = spool.envelope_path("outbox", "0f8fad5b-d9cb-469f-a165-70867728950e")
    out.write_bytes(b"zip")
    store.complete(
        job.id,
        "w",
        envelope=Envelope(
            id="0f8fad5b-d9cb-469f-a165-70867728950e",
            direction="out",
            peer=peer,
            path=spool.relative(out),
            size_bytes=3,
            state=state,
            study_ref=ref,
        ),
    )
    return out


def test_delivered_study_loses_its_files_after_retention_and_keeps_its_records(site):
    store, spool, janitor = site
    ref = _sealed_study(store, spool)
    out = _deliver(store, spool, ref)
    files = [spool.path_of(i.spool_path) for i in store.study_instances(ref)]

    purged = janitor.run_once(now=LATER)

    assert (purged.studies, purged.envelopes) == (1, 1)
    assert not any(f.exists() for f in files) and not out.exists()
    assert store.get_study(ref).state == StudyState.SEALED
    assert len(store.study_instances(ref)) == 2


def test_replaced_versions_go_with_their_study(site):
    store, spool, janitor = site
    ref = _sealed_study(store, spool)
    [first, _] = store.study_instances(ref)
    kept = spool.path_of(spool.keep_replaced(first.spool_path, ref))
    _deliver(store, spool, ref)

    before = janitor.run_once(now=time.time())
    assert kept.is_file() and before.studies == 0
    janitor.run_once(now=LATER)

    assert not kept.parent.exists()


def test_nothing_goes_before_the_retention_time(site):
    store, spool, janitor = site
    ref = _sealed_study(store, spool)
    _deliver(store, spool, ref)

    assert janitor.run_once().studies == 0
    assert all(spool.path_of(i.spool_path).exists() for i in store.study_instances(ref))


def test_study_waits_while_an_envelope_is_still_undelivered(site):
    store, spool, janitor = site
    ref = _sealed_study(store, spool)
    _deliver(store, spool, ref, state="packed")

    assert janitor.run_once(now=LATER).studies == 0


def test_study_waits_while_a_seal_job_for_another_peer_is_pending(site):
    store, spool, janitor = site
    ref = _sealed_study(store, spool, peers=("b", "c"))
    _deliver(store, spool, ref)

    assert store.list_jobs(queue="seal", state=JobState.READY)
    assert janitor.run_once(now=LATER).studies == 0


def test_file_shared_with_an_open_study_is_kept(site):
    store, spool, janitor = site
    ref = _sealed_study(store, spool, data=(b"same",))
    _deliver(store, spool, ref)
    # The same bytes arrive for another route: one content-addressed file, two rows.
    store.add_instance(
        _instance(spool, b"same", "1.2.3.4.0"),
        route="other",
        quiet_seconds=30,
        max_age_seconds=60,
        duplicates=DuplicatePolicy.KEEP_NEWEST,
    )
    path = spool.path_of(store.study_instances(ref)[0].spool_path)

    janitor.run_once(now=LATER)

    assert path.exists()


INCOMING_ID = "7c9e6679-7425-40de-944b-e07fc1f90ae7"


def _incoming(store, spool, folder: str, state: str):
    """Record an incoming envelope whose zip is in ``folder``; return the zip."""
    kept = spool.envelope_path(folder, INCOMING_ID)
    kept.write_bytes(b"zip")
    store.put_envelope(
        Envelope(
            id=INCOMING_ID,
            direction="in",
            peer="a",
            path=spool.relative(kept),
            size_bytes=3,
            state=state,
        )
    )
    return kept


def test_quarantined_envelope_is_never_purged(site):
    store, spool, janitor = site
    kept = _incoming(store, spool, "quarantine", "quarantined")

    assert janitor.run_once(now=LATER).envelopes == 0
    assert kept.exists()


def test_unreferenced_old_instance_file_is_swept(site):
    _, spool, janitor = site
    orphan = spool.root / "instances" / "ab" / ("ab" + "0" * 62 + ".dcm")
    orphan.parent.mkdir(parents=True, exist_ok=True)
    orphan.write_bytes(b"displaced")
    os.utime(orphan, (time.time() - 2 * DAY, time.time() - 2 * DAY))

    assert janitor.run_once().orphans == 1
    assert not orphan.exists()


def test_zero_retention_keeps_everything(site):
    store, spool, _ = site
    ref = _sealed_study(store, spool)
    _deliver(store, spool, ref)

    assert Janitor(store, spool, retention_seconds=0).run_once(now=LATER).studies == 0


def test_version_1_store_is_upgraded_in_place(tmp_path):
    path = tmp_path / "state.db"
    SQLiteStore(path).close()
    conn = sqlite3.connect(path)
    conn.executescript(
        "ALTER TABLE studies DROP COLUMN purged_at;"
        "ALTER TABLE envelopes DROP COLUMN purged_at;"
        "UPDATE meta SET value = '1' WHERE name = 'schema_version';"
    )
    conn.close()

    store = SQLiteStore(path)
    assert store.purgeable_studies(LATER) == []
    store.close()


def test_opened_envelope_loses_its_payload_and_progress_logs(site):
    store, spool, janitor = site
    inbox = _incoming(store, spool, "inbox", "opened")
    opened = spool.envelope_path("opened", INCOMING_ID)
    (opened / "dicom").mkdir(parents=True)
    (opened / "dicom" / "1.dcm").write_bytes(b"dicom")
    with ProgressLog(opened, "pacs") as log:
        log.note("dicom/1.dcm", Answer(DELIVERED))

    assert janitor.run_once(now=LATER).envelopes == 1

    assert not inbox.exists() and not opened.exists()
    assert not progress_folder(opened).exists()
