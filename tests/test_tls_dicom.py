"""DICOM TLS on the listener and the forwarder, with dcmtk and Orthanc as peers.

The modality is dcmtk's storescu with ``+tls`` (or Orthanc storing to a
modality marked ``UseDicomTls``); the PACS is Orthanc with ``DicomTlsEnabled``
or dcmtk's storescp with ``+tls``. A handshake that fails says so in one log
line, ``tls handshake failed``, with the peer's address and the reason.
"""

from __future__ import annotations

import json
import logging
import socket
import ssl
import urllib.request
from pathlib import Path

import pytest
from pydicom import dcmread
from pynetdicom import AE
from pynetdicom.sop_class import Verification

from bridge.dicom.forwarder import Destination, TLSSettings, forward
from bridge.dicom.forwarder import Outcome as ForwardOutcome
from bridge.dicom.listener import Listener, ListenerSettings
from bridge.ingest import Ingest, IngestSettings, RouteRule
from bridge.spool import Spool
from bridge.store import SQLiteStore
from bridge.tls import server_context
from tests.support.compare import dataset_bytes, dataset_bytes_of
from tests.support.dcmtk import StoreSCP, storescu
from tests.support.net import wait_until
from tests.support.orthanc import Orthanc
from tests.support.pki import CertificateAuthority
from tests.support.sites import Sites
from tests.support.studies import make_study

HANDSHAKE_FAILED = "tls handshake failed"


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    """A trusted CA with a server, a modality and a PACS; a stranger CA's client."""
    folder = tmp_path_factory.mktemp("pki")
    ca = CertificateAuthority(folder, "ca")
    stranger_ca = CertificateAuthority(folder / "stranger", "stranger-ca")
    return {
        "ca": ca.cert,
        "bridge": ca.issue("bridge", server=True, client=True),
        "modality": ca.issue("modality", client=True),
        # Orthanc uses one certificate as SCP and as SCU.
        "orthanc": ca.issue("orthanc", server=True, client=True),
        "stranger": stranger_ca.issue("stranger", server=True, client=True),
    }


class TLSListener:
    """A listener with TLS on a free loopback port, its own spool and store."""

    def __init__(self, tmp_path: Path, pki: dict, *, require_client_cert=True, **kw):
        self.spool = Spool(tmp_path / "spool")
        self.store = SQLiteStore(tmp_path / "state.sqlite")
        route = RouteRule(name="all", peers=("peer-a",), quiet_seconds=3600)
        ingest = Ingest(self.store, self.spool, [route], IngestSettings())
        tls = server_context(
            pki["bridge"].cert, pki["bridge"].key, pki["ca"], require_client_cert
        )
        settings = ListenerSettings(host="127.0.0.1", port=0, tls=tls, **kw)
        self.listener = Listener(settings, ingest)
        self.listener.start()
        self.port = self.listener.port

    def count(self) -> int:
        """How many instances were recorded."""
        return sum(s.instance_count for s in self.store.recent_studies())

    def stop(self) -> None:
        self.listener.stop()
        self.store.close()


@pytest.fixture
def tls_listener(tmp_path, pki):
    started = []

    def start(**kw) -> TLSListener:
        started.append(TLSListener(tmp_path, pki, **kw))
        return started[-1]

    yield start
    for listener in started:
        listener.stop()


def storescu_tls(port: int, files, cert, pki) -> object:
    """storescu over TLS with ``cert`` (or anonymous TLS when None)."""
    own = ("+tls", str(cert.key), str(cert.cert)) if cert else ("+tla",)
    return storescu(port, files, extra=(*own, "+cf", str(pki["ca"])))


def handshake_lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if HANDSHAKE_FAILED in r.message]


# -- the listener -----------------------------------------------------------------


def test_storescu_with_a_client_certificate_stores_over_tls(
    tls_listener, pki, tmp_path
):
    bridge = tls_listener()
    files = make_study(tmp_path / "study", series=1, per_series=3)

    sent = storescu_tls(bridge.port, files, pki["modality"], pki)

    assert sent.returncode == 0, sent.stderr
    assert bridge.count() == 3


def test_client_certificate_of_an_untrusted_ca_is_refused_with_a_clear_log_line(
    tls_listener, pki, tmp_path, caplog
):
    bridge = tls_listener()
    files = make_study(tmp_path / "study", series=1, per_series=1)
    caplog.set_level(logging.WARNING, logger="bridge.tls")

    sent = storescu_tls(bridge.port, files, pki["stranger"], pki)

    assert sent.returncode != 0
    assert bridge.count() == 0
    [line] = handshake_lines(caplog)
    assert "service=dicom side=server peer_host=127.0.0.1" in line
    assert "reason=certificate verify failed" in line


def test_client_without_a_certificate_is_refused_when_one_is_required(
    tls_listener, pki, tmp_path, caplog
):
    bridge = tls_listener()
    files = make_study(tmp_path / "study", series=1, per_series=1)
    caplog.set_level(logging.WARNING, logger="bridge.tls")

    sent = storescu_tls(bridge.port, files, None, pki)

    assert sent.returncode != 0
    assert bridge.count() == 0
    [line] = handshake_lines(caplog)
    assert "reason=PEER_DID_NOT_RETURN_A_CERTIFICATE" in line


def test_client_without_a_certificate_is_served_when_none_is_required(
    tls_listener, pki, tmp_path
):
    bridge = tls_listener(require_client_cert=False)
    files = make_study(tmp_path / "study", series=1, per_series=1)

    sent = storescu_tls(bridge.port, files, None, pki)

    assert sent.returncode == 0, sent.stderr
    assert bridge.count() == 1


def test_plain_dicom_on_the_tls_port_is_logged_as_a_handshake_failure(
    tls_listener, tmp_path, caplog
):
    bridge = tls_listener()
    files = make_study(tmp_path / "study", series=1, per_series=1)
    caplog.set_level(logging.WARNING, logger="bridge.tls")

    sent = storescu(bridge.port, files, timeout=30)

    assert sent.returncode != 0
    assert bridge.count() == 0
    [line] = handshake_lines(caplog)
    assert "peer_host=127.0.0.1" in line


def test_a_stalled_handshake_does_not_hold_the_listener(tls_listener, pki, tmp_path):
    bridge = tls_listener(tls_handshake_timeout=1.0)
    files = make_study(tmp_path / "study", series=1, per_series=1)

    # A client that connects and says nothing: pynetdicom's accept thread
    # waits for its handshake, bounded by tls_handshake_timeout.
    with socket.create_connection(("127.0.0.1", bridge.port)):
        sent = storescu_tls(bridge.port, files, pki["modality"], pki)

    assert sent.returncode == 0, sent.stderr
    assert bridge.count() == 1


def test_listener_offers_the_configured_maximum_pdu(tls_listener, pki):
    bridge = tls_listener(max_pdu=16384)
    ae = AE(ae_title="PROBE")
    ae.add_requested_context(Verification)
    client = ssl.create_default_context(cafile=str(pki["ca"]))
    client.load_cert_chain(str(pki["modality"].cert), str(pki["modality"].key))

    assoc = ae.associate(
        "127.0.0.1", bridge.port, ae_title="JMIXBRIDGE", tls_args=(client, "127.0.0.1")
    )

    assert assoc.is_established
    assert assoc.acceptor.maximum_length == 16384
    assoc.release()


# -- the forwarder ----------------------------------------------------------------


def _destination(port: int, pki: dict, ae_title: str = "PACS") -> Destination:
    tls = TLSSettings(pki["ca"], pki["bridge"].cert, pki["bridge"].key)
    return Destination("pacs", ae_title, "127.0.0.1", port, tls=tls)


def test_forwarder_names_an_untrusted_pacs_certificate_in_one_log_line(
    pki, tmp_path, caplog
):
    stranger = pki["stranger"]
    scp = StoreSCP(
        tmp_path / "pacs",
        extra=("+tls", str(stranger.key), str(stranger.cert), "-ic"),
    )
    files = make_study(tmp_path / "study", series=1, per_series=2)
    caplog.set_level(logging.WARNING, logger="bridge.tls")
    try:
        result = forward(_destination(scp.port, pki), files)
    except Exception as exc:  # the forwarder may raise a transport error instead
        result = exc
    finally:
        scp.stop()

    assert scp.files() == []
    assert not getattr(result, "instances", None) or all(
        i.outcome != ForwardOutcome.DELIVERED for i in result.instances
    )
    line = handshake_lines(caplog)[0]
    assert "service=forward side=client peer_host=127.0.0.1" in line
    assert "reason=certificate verify failed" in line


def test_forwarder_stores_into_orthanc_over_dicom_tls(pki, tmp_path):
    pacs = _orthanc_tls(tmp_path / "orthanc", pki)
    files = make_study(tmp_path / "study", series=1, per_series=3)
    try:
        result = forward(_destination(pacs.dicom_port, pki, pacs.ae_title), files)
        stored = pacs.instance_files()
    finally:
        pacs.stop()

    assert result.count(ForwardOutcome.DELIVERED) == 3
    for path in files:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes_of(stored[uid], tmp_path / "got.dcm") == dataset_bytes(
            path
        )


# -- Orthanc as the modality --------------------------------------------------------


def test_orthanc_stores_into_the_listener_over_dicom_tls(tls_listener, pki, tmp_path):
    bridge = tls_listener()
    modality = _orthanc_tls(
        tmp_path / "orthanc",
        pki,
        DicomModalities={
            "bridge": {
                "AET": "JMIXBRIDGE",
                "Host": "127.0.0.1",
                "Port": bridge.port,
                "UseDicomTls": True,
            }
        },
    )
    [path] = make_study(tmp_path / "study", series=1, per_series=1)
    try:
        uploaded = _post(modality, "/instances", path.read_bytes())
        answer = _post(
            modality,
            "/modalities/bridge/store",
            json.dumps({"Resources": [uploaded["ID"]], "Synchronous": True}).encode(),
        )
    finally:
        modality.stop()

    assert answer.get("FailedInstancesCount", 0) == 0, answer
    assert bridge.count() == 1


# -- the whole daemon -----------------------------------------------------------------


def test_daemons_carry_a_study_from_tls_modality_to_tls_orthanc(pki, tmp_path):
    pacs = _orthanc_tls(tmp_path / "orthanc", pki)
    bridge = pki["bridge"]
    sites = Sites(
        tmp_path / "sites",
        (pacs.ae_title, pacs.dicom_port),
        a={
            "dicom": {
                "tls": {
                    "cert": str(bridge.cert),
                    "key": str(bridge.key),
                    "ca": str(pki["ca"]),
                    "require_client_cert": True,
                }
            }
        },
    )
    sites.b_conf["destinations"][0]["tls"] = {
        "cert": str(bridge.cert),
        "key": str(bridge.key),
        "ca": str(pki["ca"]),
    }
    files = make_study(tmp_path / "study", series=1, per_series=4)
    try:
        sites.start_b()
        sites.start_a()
        refused = storescu_tls(sites.a_dicom, files[:1], pki["stranger"], pki)
        sent = storescu_tls(sites.a_dicom, files, pki["modality"], pki)
        wait_until(
            lambda: len(pacs.get("/instances")) == len(files),
            60,
            "the study in Orthanc",
        )
        stored = pacs.instance_files()
        log_a = sites.a.log_text()
    finally:
        sites.stop()
        pacs.stop()

    assert refused.returncode != 0
    assert sent.returncode == 0, sent.stderr
    assert "tls=on" in log_a
    assert f'event="{HANDSHAKE_FAILED}" service=dicom side=server' in log_a
    for path in files:
        uid = str(dcmread(path, stop_before_pixels=True).SOPInstanceUID)
        assert dataset_bytes_of(stored[uid], tmp_path / "got.dcm") == dataset_bytes(
            path
        )


def _orthanc_tls(folder: Path, pki: dict, **settings) -> Orthanc:
    own = pki["orthanc"]
    return Orthanc(
        folder,
        DicomTlsEnabled=True,
        DicomTlsCertificate=str(own.cert),
        DicomTlsPrivateKey=str(own.key),
        DicomTlsTrustedCertificates=str(pki["ca"]),
        DicomTlsRemoteCertificateRequired=True,
        **settings,
    )


def _post(server: Orthanc, path: str, body: bytes) -> dict:
    req = urllib.request.Request(
        f"http://127.0.0.1:{server.http_port}{path}", data=body, method="POST"
    )
    with urllib.request.urlopen(req, timeout=60) as resp:
        return json.loads(resp.read())
