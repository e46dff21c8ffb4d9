"""The real peers the suite relies on start, answer and stop."""

from tests.support.dcmtk import echoscu


def test_storescp_answers_echo(storescp):
    result = echoscu(storescp.port, called=storescp.ae_title)
    assert result.returncode == 0, result.stderr


def test_orthanc_answers_rest_and_echo(orthanc):
    assert orthanc.get("/system")["DicomAet"] == orthanc.ae_title
    result = echoscu(orthanc.dicom_port, called=orthanc.ae_title)
    assert result.returncode == 0, result.stderr
