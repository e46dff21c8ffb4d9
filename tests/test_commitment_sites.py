"""Storage commitment through two real bridges and a real Orthanc (README L-02).

Site B has no routes, only Orthanc as its destination with storage commitment.
Orthanc knows B as a modality and, as it always does, sends the commitment
result later on an association of its own. B's listener runs for that alone,
so the envelope ends up committed; and B offers Orthanc nothing to store.
"""

from __future__ import annotations

import json
import sqlite3

from tests.support.dcmtk import storescu
from tests.support.net import free_port, wait_until
from tests.support.orthanc import Orthanc
from tests.support.sites import Sites, send, study_of


def _commitments(db) -> list[tuple[str, str, int]]:
    with sqlite3.connect(db, timeout=10) as conn:
        return conn.execute(
            "SELECT destination, state, failed FROM commitments"
        ).fetchall()


def _envelope_details(db) -> dict:
    with sqlite3.connect(db, timeout=10) as conn:
        (details,) = conn.execute(
            "SELECT details FROM envelopes WHERE direction = 'in'"
        ).fetchone()
    return json.loads(details)


def test_orthanc_reports_on_its_own_association_and_the_envelope_is_committed(
    tmp_path,
):
    b_dicom = free_port()
    modality = {"AET": "JMIXBRIDGE", "Host": "127.0.0.1", "Port": b_dicom}
    orthanc = Orthanc(tmp_path / "orthanc", DicomModalities={"site-b": modality})
    sites = Sites(
        tmp_path / "sites",
        (orthanc.ae_title, orthanc.dicom_port),
        b={"dicom": {"host": "127.0.0.1", "port": b_dicom}},
    )
    sites.b_conf["destinations"][0]["storage_commitment"] = True
    study = study_of(tmp_path / "study", 3)
    try:
        sites.start_b()
        sites.start_a()
        assert "DICOM     AE JMIXBRIDGE" in sites.b.summary
        assert send(sites, study).returncode == 0

        wait_until(
            lambda: ("pacs", "committed", 0) in _commitments(sites.db("b")),
            90,
            "Orthanc's commitment report to reach site B",
        )
        shown = _envelope_details(sites.db("b"))["storage_commitment"]["pacs"]
        assert (shown["state"], shown["failed"]) == ("committed", 0)
        assert len(orthanc.get("/instances")) == len(study)

        # Orthanc may report to B, but not store into it.
        refused = storescu(b_dicom, list(study.values())[:1], calling=orthanc.ae_title)
        assert refused.returncode != 0
        assert "No Acceptable Presentation Contexts" in refused.stderr
        assert "association ended" in sites.b.log_text()
    finally:
        sites.stop()
        orthanc.stop()
