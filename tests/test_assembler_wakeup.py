"""The assembler's thread seals a study at its deadline, not at its next poll.

Every test gives the thread a poll interval of an hour, so a seal within the
bounded wait can only come from the deadline the thread planned for or from a
noted deadline; none asserts how long anything took.
"""

import math
import shutil
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest
from pydicom.uid import generate_uid

from bridge.ingest import Assembler, Ingest, RouteRule
from bridge.spool import Spool
from bridge.store import SQLiteStore, StudyState
from tests.support.studies import make_instance

HOUR = 3600.0
WAIT = 30.0  # the bound on every wait; a pass takes a fraction of a second

ROUTE = RouteRule(
    name="ct",
    peers=("peer-a",),
    match={"Modality": "CT"},
    quiet_seconds=0.2,
    max_age_seconds=600,
)


@pytest.fixture
def store(tmp_path):
    with closing(SQLiteStore(tmp_path / "state.sqlite")) as opened:
        yield opened


@pytest.fixture
def ingest(store, tmp_path):
    return Ingest(store, Spool(tmp_path / "spool"), [ROUTE])


class Sealed:
    """An ``on_sealed`` callback that tests can wait on."""

    def __init__(self):
        self.triggers: list[str] = []
        self.event = threading.Event()

    def __call__(self, trigger: str, seconds: float) -> None:
        self.triggers.append(trigger)
        self.event.set()


@pytest.fixture
def sealed():
    return Sealed()


@pytest.fixture
def assembler(store, sealed):
    made = Assembler(store, [ROUTE], interval_seconds=HOUR, on_sealed=sealed)
    yield made
    made.stop()


def _receive(ingest: Ingest, folder: Path, study_uid: str):
    """Hand ingest one new instance of ``study_uid``; return its receipt."""
    path = make_instance(
        folder / f"{generate_uid()}.dcm", study_uid=study_uid, series_uid="1.2.3"
    )
    temp = ingest.spool.incoming / path.name
    shutil.copyfile(path, temp)
    return ingest.receive(temp, calling_ae="MODALITY", called_ae="JMIXBRIDGE")


def test_study_open_at_start_is_sealed_at_its_deadline_not_at_the_poll(
    store, ingest, assembler, sealed, tmp_path
):
    receipt = _receive(ingest, tmp_path / "in", generate_uid())

    assembler.start()

    assert sealed.event.wait(WAIT)
    study = store.get_study(receipt.study_ref)
    assert (study.state, study.seal_trigger) == (StudyState.SEALED, "quiet-period")


def test_noted_deadline_wakes_an_idle_assembler(
    store, ingest, assembler, sealed, tmp_path
):
    assembler.start()
    receipt = _receive(ingest, tmp_path / "in", generate_uid())

    assembler.note_deadline(store.get_study(receipt.study_ref).seal_due)

    assert sealed.event.wait(WAIT)
    assert store.get_study(receipt.study_ref).state == StudyState.SEALED


def wait_until_asleep(assembler: Assembler) -> None:
    """Wait until the thread's first round is over and it sleeps (its plan set),
    so that a study recorded now can only be found through a note or the poll."""
    deadline = time.monotonic() + WAIT
    while assembler._planned == -math.inf:
        assert time.monotonic() < deadline, "the assembler never went to sleep"
        time.sleep(0.01)


def test_ingest_tells_the_assembler_the_deadline_of_a_study_it_opens(
    store, assembler, sealed, tmp_path
):
    # Wired as the daemon wires them; the thread sleeps for the hour of its
    # poll until ingest tells it of the new study's deadline.
    ingest = Ingest(
        store,
        Spool(tmp_path / "spool"),
        [ROUTE],
        on_deadline=assembler.note_deadline,
    )
    assembler.start()
    wait_until_asleep(assembler)
    receipt = _receive(ingest, tmp_path / "in", generate_uid())

    assert sealed.event.wait(WAIT)
    study = store.get_study(receipt.study_ref)
    assert (study.state, study.seal_trigger) == (StudyState.SEALED, "quiet-period")


def test_extended_study_is_sealed_once_at_its_moved_deadline(store, tmp_path):
    # A quiet period long enough that the second instance, sent at once,
    # always lands in the same study, even on a loaded machine.
    route = RouteRule(
        name="ct", peers=("peer-a",), match={"Modality": "CT"}, quiet_seconds=2.0
    )
    ingest = Ingest(store, Spool(tmp_path / "spool"), [route])
    sealed = Sealed()
    assembler = Assembler(store, [route], interval_seconds=HOUR, on_sealed=sealed)
    study_uid = generate_uid()
    first = _receive(ingest, tmp_path / "in", study_uid)
    assembler.start()
    try:
        # The thread plans for the first deadline; this instance moves it
        # later, which needs no note: the round at the old deadline finds
        # nothing due.
        second = _receive(ingest, tmp_path / "in", study_uid)

        assert sealed.event.wait(WAIT)
    finally:
        assembler.stop()
    assert first.study_ref == second.study_ref
    study = store.get_study(first.study_ref)
    assert (study.state, study.instance_count) == (StudyState.SEALED, 2)
    assert sealed.triggers == ["quiet-period"]


def test_study_of_another_process_is_found_by_the_poll(store, ingest, tmp_path):
    # No note: as when another process sharing the store opened the study.
    done = Sealed()
    poller = Assembler(store, [ROUTE], interval_seconds=0.05, on_sealed=done)
    poller.start()
    try:
        receipt = _receive(ingest, tmp_path / "in", generate_uid())

        assert done.event.wait(WAIT)
    finally:
        poller.stop()
    assert store.get_study(receipt.study_ref).state == StudyState.SEALED


def test_stop_ends_a_sleeping_assembler(assembler):
    assembler.start()
    thread = assembler._thread

    assembler.stop(timeout=WAIT)

    assert not thread.is_alive()
