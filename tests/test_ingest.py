"""Routing, taking instances in and sealing studies, without the network."""

import shutil
from pathlib import Path

import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.uid import generate_uid

from bridge.ingest import (
    UNROUTED,
    Assembler,
    Ingest,
    IngestSettings,
    Rejection,
    RouteRule,
    Unrouted,
)
from bridge.ingest.ingest import read_header
from bridge.spool import Spool
from bridge.store import DuplicatePolicy, InstanceOutcome, SQLiteStore, StudyState
from tests.support.studies import make_instance, make_study


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path):
    s = SQLiteStore(tmp_path / "state.sqlite")
    yield s
    s.close()


@pytest.fixture
def spool(tmp_path):
    return Spool(tmp_path / "spool")


CT_ROUTE = RouteRule(
    name="ct",
    peers=("peer-a", "peer-b"),
    match={"Modality": "CT"},
    quiet_seconds=60,
    max_age_seconds=600,
)


def make_ingest(store, spool, clock, routes=(CT_ROUTE,), **settings):
    return Ingest(store, spool, list(routes), IngestSettings(**settings), clock=clock)


def receive(ingest, path: Path, calling="MODALITY", called="JMIXBRIDGE"):
    """Hand a copy of ``path`` to ingest, as pynetdicom hands its temp file."""
    temp = ingest.spool.incoming / f"rx-{generate_uid()}.dcm"
    shutil.copyfile(path, temp)
    return ingest.receive(temp, calling_ae=calling, called_ae=called)


def test_instance_is_spooled_byte_for_byte_and_recorded(store, spool, clock, tmp_path):
    path = make_instance(tmp_path / "a.dcm", study_uid="1.2.3", series_uid="1.2.3.4")
    receipt = receive(make_ingest(store, spool, clock), path)
    assert receipt.outcome == InstanceOutcome.STORED
    [record] = store.study_instances(receipt.study_ref)
    assert spool.path_of(record.spool_path).read_bytes() == path.read_bytes()
    assert record.modality == "CT"


def test_first_matching_route_wins(store, spool, clock, tmp_path):
    catch_all = RouteRule(name="any", peers=("peer-c",))
    ingest = make_ingest(store, spool, clock, routes=(CT_ROUTE, catch_all))
    ct = make_instance(tmp_path / "ct.dcm", study_uid="1.2.3", series_uid="1.2.3.4")
    mr = make_instance(
        tmp_path / "mr.dcm", study_uid="1.2.5", series_uid="1.2.5.4", modality="MR"
    )
    assert store.get_study(receive(ingest, ct).study_ref).route == "ct"
    assert store.get_study(receive(ingest, mr).study_ref).route == "any"


def test_route_matches_calling_ae_pattern(store, spool, clock, tmp_path):
    route = RouteRule(name="scanners", peers=("p",), calling_ae=("CT*",))
    ingest = make_ingest(store, spool, clock, routes=(route,))
    path = make_instance(tmp_path / "a.dcm", study_uid="1.2.3", series_uid="1.2.3.4")
    assert receive(ingest, path, calling="CT01").accepted
    assert receive(ingest, path, calling="MR01").rejection == Rejection.UNROUTED


def test_unrouted_instance_is_refused_under_reject(store, spool, clock, tmp_path):
    path = make_instance(
        tmp_path / "us.dcm", study_uid="1.2.3", series_uid="1.2.3.4", modality="US"
    )
    receipt = receive(make_ingest(store, spool, clock), path)
    assert receipt.rejection == Rejection.UNROUTED
    assert store.recent_studies() == []


def test_unrouted_study_is_held_when_its_quiet_period_ends(
    store, spool, clock, tmp_path
):
    ingest = make_ingest(
        store, spool, clock, unrouted=Unrouted.HOLD, unrouted_quiet_seconds=30
    )
    path = make_instance(
        tmp_path / "us.dcm", study_uid="1.2.3", series_uid="1.2.3.4", modality="US"
    )
    ref = receive(ingest, path).study_ref
    clock.now += 30
    Assembler(store, [CT_ROUTE], clock=clock).run_once()
    study = store.get_study(ref)
    assert study.route == UNROUTED
    assert study.state == StudyState.HELD
    assert store.list_jobs() == []


def test_unrouted_policy_reject_refuses_associations_no_route_admits(
    store, spool, clock
):
    route = RouteRule(name="r", peers=("p",), calling_ae=("CT01",))
    ingest = make_ingest(store, spool, clock, routes=(route,))
    assert ingest.admits("CT01", "JMIXBRIDGE")
    assert not ingest.admits("OTHER", "JMIXBRIDGE")
    held = make_ingest(store, spool, clock, routes=(route,), unrouted=Unrouted.HOLD)
    assert held.admits("OTHER", "JMIXBRIDGE")


@pytest.mark.parametrize(
    "missing", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"]
)
def test_instance_without_a_required_uid_is_invalid(
    store, spool, clock, tmp_path, missing
):
    path = make_instance(
        tmp_path / "bad.dcm", study_uid="1.2.3", series_uid="1.2.3.4", omit=(missing,)
    )
    receipt = receive(make_ingest(store, spool, clock), path)
    assert receipt.rejection == Rejection.INVALID
    assert missing in receipt.detail
    assert list((spool.root / "instances").rglob("*.dcm")) == []


def test_instance_whose_uid_differs_from_the_request_is_invalid(
    store, spool, clock, tmp_path
):
    path = make_instance(tmp_path / "a.dcm", study_uid="1.2.3", series_uid="1.2.3.4")
    ingest = make_ingest(store, spool, clock)
    temp = spool.incoming / "rx.dcm"
    shutil.copyfile(path, temp)
    receipt = ingest.receive(
        temp, calling_ae="M", called_ae="B", sop_instance_uid="1.2.999"
    )
    assert receipt.rejection == Rejection.INVALID


def test_file_that_does_not_parse_is_unreadable(store, spool, clock):
    temp = spool.incoming / "rx.dcm"
    temp.write_bytes(b"\0" * 128 + b"DICM" + b"\xff" * 50)
    receipt = make_ingest(store, spool, clock).receive(
        temp, calling_ae="M", called_ae="B"
    )
    assert receipt.rejection == Rejection.UNREADABLE


def test_same_instance_twice_is_acknowledged_and_stored_once(
    store, spool, clock, tmp_path
):
    ingest = make_ingest(store, spool, clock)
    path = make_instance(tmp_path / "a.dcm", study_uid="1.2.3", series_uid="1.2.3.4")
    first = receive(ingest, path)
    again = receive(ingest, path)
    assert again.outcome == InstanceOutcome.DUPLICATE
    assert again.accepted
    assert len(store.study_instances(first.study_ref)) == 1
    assert len(list((spool.root / "instances").rglob("*.dcm"))) == 1


def two_versions(folder: Path) -> tuple[Path, Path]:
    """Write two instances with the same UIDs and different pixel values."""
    sop = generate_uid()
    return tuple(
        make_instance(
            folder / f"v{fill}.dcm",
            study_uid="1.2.3",
            series_uid="1.2",
            sop_uid=sop,
            fill=fill,
        )
        for fill in (0, 7)
    )


def test_changed_instance_replaces_the_old_under_keep_newest(
    store, spool, clock, tmp_path
):
    ingest = make_ingest(store, spool, clock)
    a, b = two_versions(tmp_path)
    receive(ingest, a)
    receipt = receive(ingest, b)
    assert receipt.outcome == InstanceOutcome.REPLACED
    [record] = store.study_instances(receipt.study_ref)
    assert spool.path_of(record.spool_path).read_bytes() == b.read_bytes()
    assert len(list((spool.root / "instances").rglob("*.dcm"))) == 2


def test_changed_instance_is_a_conflict_under_reject(store, spool, clock, tmp_path):
    ingest = make_ingest(store, spool, clock, duplicates=DuplicatePolicy.REJECT)
    a, b = two_versions(tmp_path)
    receive(ingest, a)
    receipt = receive(ingest, b)
    assert receipt.rejection == Rejection.CONFLICT
    [record] = store.study_instances(receipt.study_ref)
    assert spool.path_of(record.spool_path).read_bytes() == a.read_bytes()


def test_quiet_study_is_sealed_with_one_seal_job_per_peer(
    store, spool, clock, tmp_path
):
    ingest = make_ingest(store, spool, clock)
    refs = {receive(ingest, p).study_ref for p in make_study(tmp_path / "in")}
    [ref] = refs
    assembler = Assembler(store, [CT_ROUTE], clock=clock)
    clock.now += 59
    assert assembler.run_once() == 0
    clock.now += 1
    assert assembler.run_once() == 1
    study = store.get_study(ref)
    assert (study.state, study.seal_trigger) == (StudyState.SEALED, "quiet-period")
    jobs = store.list_jobs(queue="seal")
    assert sorted((j.target, j.key) for j in jobs) == [
        ("peer-a", f"seal:{ref}:peer-a"),
        ("peer-b", f"seal:{ref}:peer-b"),
    ]
    assert jobs[0].payload == {"study_ref": ref, "peer": jobs[0].target}


def test_study_that_keeps_growing_is_sealed_at_max_age(store, spool, clock, tmp_path):
    ingest = make_ingest(store, spool, clock)
    paths = make_study(tmp_path / "in", series=1, per_series=12)
    for path in paths:
        ref = receive(ingest, path).study_ref
        clock.now += 55  # always inside the quiet period
    Assembler(store, [CT_ROUTE], clock=clock).run_once()
    study = store.get_study(ref)
    assert (study.state, study.seal_trigger) == (StudyState.SEALED, "max-age")


def test_instance_after_seal_goes_into_a_follow_up_study(store, spool, clock, tmp_path):
    ingest = make_ingest(store, spool, clock)
    study_uid = generate_uid()
    first, late = make_study(
        tmp_path / "in", series=1, per_series=2, study_uid=study_uid
    )
    ref = receive(ingest, first).study_ref
    clock.now += 60
    Assembler(store, [CT_ROUTE], clock=clock).run_once()
    follow_up = store.get_study(receive(ingest, late).study_ref)
    assert follow_up.ref != ref
    assert follow_up.generation == 1
    assert follow_up.state == StudyState.OPEN
    assert [i.study_instance_uid for i in store.study_instances(follow_up.ref)] == [
        study_uid
    ]


REQUIRED = RouteRule(
    name="ct",
    peers=("peer-a",),
    quiet_seconds=600,
    max_age_seconds=3600,
    required_series=("LOCALIZER", {"SeriesDescription": "AXIAL*"}),
)


def test_study_is_sealed_when_its_required_series_are_present(
    store, spool, clock, tmp_path
):
    ingest = make_ingest(store, spool, clock, routes=(REQUIRED,))
    paths = make_study(
        tmp_path / "in", series=2, per_series=2, descriptions=("LOCALIZER", "AXIAL 5mm")
    )
    receipts = [receive(ingest, p) for p in paths]
    study = store.get_study(receipts[0].study_ref)
    assert (study.state, study.seal_trigger) == (StudyState.SEALED, "required-series")
    assert study.instance_count == 3  # sealed on the first AXIAL instance
    assert [j.target for j in store.list_jobs(queue="seal")] == ["peer-a"]


def test_required_series_seen_before_a_restart_still_count(
    store, spool, clock, tmp_path
):
    study_uid = generate_uid()
    [localizer] = make_study(
        tmp_path / "a",
        series=1,
        per_series=1,
        study_uid=study_uid,
        descriptions=("LOCALIZER",),
    )
    [axial] = make_study(
        tmp_path / "b",
        series=1,
        per_series=1,
        study_uid=study_uid,
        descriptions=("AXIAL",),
    )
    ref = receive(make_ingest(store, spool, clock, routes=(REQUIRED,)), localizer)
    assert store.get_study(ref.study_ref).state == StudyState.OPEN
    restarted = make_ingest(store, spool, clock, routes=(REQUIRED,))
    receive(restarted, axial)
    assert store.get_study(ref.study_ref).state == StudyState.SEALED


def test_route_rule_refuses_an_unknown_keyword():
    with pytest.raises(ValueError, match="Modalty"):
        RouteRule(name="r", peers=("p",), match={"Modalty": "CT"})


def test_route_rule_refuses_a_route_without_peers():
    with pytest.raises(ValueError, match="peers"):
        RouteRule(name="r", peers=())


def test_open_study_keeps_its_timer_across_a_restart(spool, clock, tmp_path):
    db = tmp_path / "restart.sqlite"
    first = SQLiteStore(db)
    [path] = make_study(tmp_path / "in", series=1, per_series=1)
    ref = receive(make_ingest(first, spool, clock), path).study_ref
    first.close()

    again = SQLiteStore(db)
    clock.now += 60
    assert Assembler(again, [CT_ROUTE], clock=clock).run_once() == 1
    assert again.get_study(ref).state == StudyState.SEALED
    again.close()


@pytest.mark.parametrize(
    "name",
    [
        "CT_small.dcm",  # explicit VR little endian
        "MR_small_implicit.dcm",
        "MR_small_bigendian.dcm",
        "JPEG2000.dcm",  # encapsulated pixel data
        "image_dfl.dcm",  # deflated
    ],
)
def test_header_reads_the_same_values_as_dcmread(name):
    path = get_testdata_file(name, download=False)
    keywords = ["PatientID", "Modality", "SOPInstanceUID", "StudyInstanceUID"]

    header = read_header(Path(path), keywords)

    full = dcmread(path, force=True)
    for keyword in keywords:
        assert header.get(keyword) == full.get(keyword)
    assert "PixelData" not in header
