"""Routing and refusals as a modality sees them on the wire: dcmtk's storescu and
echoscu against a listener whose routes are chosen by AE title."""

from pathlib import Path

import pytest
from pydicom.uid import generate_uid
from pynetdicom.sop_class import CTImageStorage

from bridge.dicom.listener import ListenerSettings
from bridge.ingest import RouteRule
from tests.support.dcmtk import echoscu, store_answers, storescu
from tests.support.studies import make_instance, make_study
from tests.test_hostile_dicom import element, part10
from tests.test_listener import Bridge

# Two called AE titles on one listener, one route each; nothing else is routed.
BY_CALLED_AE = (
    RouteRule(name="archive-1", peers=("peer-a",), called_ae=("ARCHIVE1",)),
    RouteRule(name="archive-2", peers=("peer-b",), called_ae=("ARCHIVE2",)),
)
_IDENTIFYING = (
    "StudyInstanceUID",
    "SeriesInstanceUID",
    "SOPInstanceUID",
    "SOPClassUID",
)


@pytest.fixture
def bridge(tmp_path):
    started = Bridge(
        tmp_path,
        ListenerSettings(host="127.0.0.1", port=0, check_called_ae=False),
        routes=BY_CALLED_AE,
    )
    yield started
    started.stop()


def test_route_is_chosen_by_the_called_ae_title(bridge, tmp_path):
    sent = {}
    for called in ("ARCHIVE1", "ARCHIVE2"):
        study_uid = generate_uid()
        files = make_study(
            tmp_path / called, series=1, per_series=2, study_uid=study_uid
        )
        assert storescu(bridge.port, files, called=called).returncode == 0
        sent[study_uid] = called

    routes = {s.study_instance_uid: s.route for s in bridge.store.recent_studies()}
    assert routes == {
        uid: "archive-1" if called == "ARCHIVE1" else "archive-2"
        for uid, called in sent.items()
    }


def test_association_that_no_route_admits_is_rejected(bridge, tmp_path):
    files = make_study(tmp_path / "in", series=1, per_series=1)

    echoed = echoscu(bridge.port, called="NOWHERE")
    stored = storescu(bridge.port, files, called="NOWHERE")

    for result in (echoed, stored):
        assert result.returncode != 0
        assert "Association Rejected" in result.stderr + result.stdout
    assert bridge.listener.stats.snapshot()["associations_rejected"] == {"unrouted": 2}
    assert bridge.instances() == []


def not_understood(path: Path, study_uid: str) -> Path:
    """Write an instance dcmtk sends as it is but that does not parse: its
    PatientID is encoded as UL (PS3.5 6.2) with five bytes, not a multiple of
    four."""
    sop_uid = generate_uid()
    body = b"".join(
        element(group, elem, vr, value, None)
        for group, elem, vr, value in (
            (0x0008, 0x0016, b"UI", _even(CTImageStorage)),
            (0x0008, 0x0018, b"UI", _even(sop_uid)),
            (0x0010, 0x0020, b"UL", b"FAKE1"),
            (0x0020, 0x000D, b"UI", _even(study_uid)),
            (0x0020, 0x000E, b"UI", _even("1.2")),
        )
    )
    path.write_bytes(part10(body, sop=sop_uid))
    return path


def _even(uid: str) -> bytes:
    """A UID value padded to even length with NUL (PS3.5 9.1)."""
    raw = uid.encode()
    return raw + b"\0" * (len(raw) % 2)


def test_data_set_not_understood_is_refused_and_the_association_goes_on(
    bridge, tmp_path
):
    study_uid = generate_uid()
    good, also_good = (
        make_instance(tmp_path / f"{n}.dcm", study_uid=study_uid, series_uid="1.2")
        for n in (1, 3)
    )
    bad = not_understood(tmp_path / "2.dcm", study_uid)

    sent = storescu(
        bridge.port, [good, bad, also_good], called="ARCHIVE1", extra=("-v", "-nh")
    )

    answers = dict(store_answers(sent.stderr.splitlines()))
    assert answers[good] == answers[also_good] == "success"
    assert "CannotUnderstand" in answers[bad]
    stats = bridge.listener.stats.snapshot()
    assert stats["statuses"] == {0x0000: 2, 0xC000: 1}
    assert stats["associations_accepted"] == 1
    assert len(bridge.instances()) == 2
