"""Forward jobs end to end: the Forwarder handler run by a real worker against
real PACS on loopback, a pynetdicom SCP scripted to refuse some instances and
dcmtk's storescp, across retries, dead-letter, an operator's re-send and a run
cut short."""

import threading
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
from pydicom import dcmread
from pydicom.data import get_testdata_file
from pydicom.pixels import get_decoder
from pydicom.uid import JPEGLSLossless, generate_uid
from pynetdicom import evt
from pynetdicom.sop_class import StorageCommitmentPushModel

from bridge.dicom.forwarder import Destination
from bridge.errors import SpoolError
from bridge.receiving.forwarding import Forwarder
from bridge.receiving.progress import ProgressLog
from bridge.spool import Spool
from bridge.store import JobState, NewJob, SQLiteStore
from bridge.workers.base import JobContext, Worker, WorkerSpec
from bridge.workers.policy import RetryPolicy
from tests.support.dcmtk import StoreSCP
from tests.support.studies import make_instance
from tests.test_forwarder import ScriptedSCP

OUT_OF_RESOURCES = 0xA700  # PS3.4 B.2.3: retryable
NOT_THIS_CLASS = 0xA900  # PS3.4 B.2.3: refused for good


class ScriptedPacs(ScriptedSCP):
    """A scripted SCP that answers each listed UID's stores from its list of
    statuses in turn (success once a list is spent), counts every store and
    calls ``on_each()`` before it answers one."""

    def __init__(self, answers=None, on_each=lambda: None, **kwargs):
        self.answers = {uid: list(codes) for uid, codes in (answers or {}).items()}
        self.stores: Counter[str] = Counter()
        self.on_each = on_each
        super().__init__(on_store=self._answer, **kwargs)

    def _answer(self, event) -> int:
        uid = event.request.AffectedSOPInstanceUID
        self.stores[uid] += 1
        self.on_each()
        codes = self.answers.get(uid)
        return codes.pop(0) if codes else 0x0000


class Site:
    """A store, a spool and a forward worker for one destination named pacs."""

    def __init__(self, root: Path, dest: Destination):
        self.store = SQLiteStore(root / "state.db")
        self.spool = Spool(root / "spool")
        self.results = []
        self.forwarder = Forwarder(
            self.store,
            self.spool,
            {"pacs": dest},
            on_result=lambda name, result: self.results.append(result),
            receipts=False,
        )
        self.worker = Worker(
            self.store,
            WorkerSpec("forward", self.forwarder, retry=RetryPolicy(initial_seconds=0)),
        )

    def opened(self, files: list[Path]) -> tuple[str, dict[str, str]]:
        """Place ``files`` in an opened envelope and enqueue its forward job;
        return the envelope id and each SOP Instance UID's relative path."""
        env_id = str(uuid.uuid4())
        base = self.spool.envelope_path("opened", env_id)
        (base / "dicom").mkdir(parents=True)
        rels = {}
        for n, src in enumerate(files):
            rel = f"dicom/{n:03d}.dcm"
            (base / rel).write_bytes(src.read_bytes())
            rels[str(dcmread(src, stop_before_pixels=True).SOPInstanceUID)] = rel
        self.store.enqueue(
            NewJob(
                "forward",
                f"forward:{env_id}:pacs",
                target="pacs",
                payload={"envelope_id": env_id, "remaining": sorted(rels.values())},
            )
        )
        return env_id, rels

    def job(self):
        [job] = self.store.list_jobs(queue="forward")
        return job

    def close(self):
        self.store.close()


@pytest.fixture
def made(tmp_path):
    """Make sites and scripted PACS that are closed after the test."""
    sites, scps = [], []

    def site(dest: Destination) -> Site:
        sites.append(Site(tmp_path / f"site-{len(sites)}", dest))
        return sites[-1]

    def pacs(**kwargs) -> ScriptedPacs:
        scps.append(ScriptedPacs(**kwargs))
        return scps[-1]

    yield site, pacs
    for scp in scps:
        scp.close()
    for s in sites:
        s.close()


def _dest(port: int) -> Destination:
    return Destination("pacs", "PACS", "127.0.0.1", port)


def _instances(folder: Path, count: int) -> list[Path]:
    study, series = generate_uid(), generate_uid()
    return [
        make_instance(folder / f"{n}.dcm", study_uid=study, series_uid=series, fill=n)
        for n in range(count)
    ]


def _uids(files: list[Path]) -> list[str]:
    return [str(dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in files]


# -- partial answers, refusals, re-sends --------------------------------------------


def test_retry_after_a_partial_answer_sends_only_the_rest(tmp_path, made):
    site, pacs = made
    files = _instances(tmp_path / "in", 5)
    busy = _uids(files)[:2]
    scp = pacs(answers={uid: [OUT_OF_RESOURCES] for uid in busy})
    b = site(_dest(scp.port))
    _, rels = b.opened(files)

    assert b.worker.run_once()
    first = b.job()
    assert (first.state, first.attempts) == (JobState.READY, 1)
    assert sorted(first.payload["remaining"]) == sorted(rels[u] for u in busy)
    assert first.payload["delivered"] == 3

    assert b.worker.run_once()

    assert b.job().state == JobState.DONE
    assert b.job().payload["delivered"] == 5
    assert scp.stores == Counter({uid: 2 if uid in busy else 1 for uid in rels})


def _two_of_four_refused(tmp_path, made):
    """Four instances of which the PACS refuses the middle two once, for good;
    return the site, the PACS, each UID's relative path and the refused UIDs."""
    site, pacs = made
    files = _instances(tmp_path / "in", 4)
    refused = _uids(files)[1:3]
    scp = pacs(answers={uid: [NOT_THIS_CLASS] for uid in refused})
    b = site(_dest(scp.port))
    _, rels = b.opened(files)
    return b, scp, rels, refused


def test_refusals_for_good_reach_dead_letter_with_a_reason_each(tmp_path, made):
    b, _, rels, refused = _two_of_four_refused(tmp_path, made)

    assert b.worker.run_once()

    job = b.job()
    assert job.state == JobState.DEAD
    assert job.last_error.startswith("2 instances refused by pacs: ")
    assert job.payload["failed"] == {
        rels[uid]: "error: data set does not match SOP class 0xA900" for uid in refused
    }
    assert (job.payload["remaining"], job.payload["delivered"]) == ([], 2)


def test_operator_resend_of_a_dead_letter_sends_only_the_refused(tmp_path, made):
    b, scp, _, refused = _two_of_four_refused(tmp_path, made)
    assert b.worker.run_once()
    before = Counter(scp.stores)

    assert b.store.requeue(b.job().id)
    assert b.worker.run_once()

    assert b.job().state == JobState.DONE
    assert b.job().payload["delivered"] == 4
    assert scp.stores - before == Counter(refused)


def test_resent_refusal_that_meets_a_busy_pacs_is_sent_again_on_retry(tmp_path, made):
    site, pacs = made
    files = _instances(tmp_path / "in", 3)
    refused = _uids(files)[0]
    scp = pacs(answers={refused: [NOT_THIS_CLASS, OUT_OF_RESOURCES]})
    b = site(_dest(scp.port))
    b.opened(files)
    assert b.worker.run_once()
    assert b.store.requeue(b.job().id)

    # The re-send meets 0xA700; the retry must send it again, not take the
    # first run's refusal, still in the progress log, for its answer.
    assert b.worker.run_once()
    assert b.job().state == JobState.READY
    assert b.worker.run_once()

    assert b.job().state == JobState.DONE
    assert scp.stores[refused] == 3


# -- progress that outlives a run ---------------------------------------------------


def test_run_whose_result_was_never_recorded_sends_nothing_again(tmp_path, made):
    site, pacs = made
    files = _instances(tmp_path / "in", 5)
    scp = pacs()
    b = site(_dest(scp.port))
    b.opened(files)
    job = b.store.claim("forward", "dies-before-marking", 60)
    ctx = JobContext(threading.Event(), lambda: True)
    # As after a crash between the PACS's answers and the job's mark: the
    # payload still lists every instance as remaining.
    assert b.forwarder(job, ctx).kind == "done"

    outcome = b.forwarder(job, ctx)

    assert outcome.kind == "done"
    assert outcome.payload["delivered"] == 5
    assert scp.stores == Counter(_uids(files))


def test_run_that_lost_its_lease_stops_before_the_next_instance(tmp_path, made):
    site, pacs = made
    files = _instances(tmp_path / "in", 5)
    ctx = JobContext(threading.Event(), lambda: False)
    # Another owner takes the job while the first instance is being stored,
    # and the worker's renewer says so.
    scp = pacs(on_each=ctx.lease_lost.set)
    b = site(_dest(scp.port))
    b.opened(files)
    job = b.store.claim("forward", "loses-its-lease", 60)

    outcome = b.forwarder(job, ctx)

    assert outcome.kind == "retry"
    assert sum(scp.stores.values()) == 1
    assert len(outcome.payload["remaining"]) == 4
    assert outcome.payload["delivered"] == 1


def test_commitment_request_names_what_an_interrupted_run_delivered(tmp_path, made):
    site, pacs = made
    files = _instances(tmp_path / "in", 5)
    requested: list[set[str]] = []

    def on_action(event):
        refs = event.action_information.ReferencedSOPSequence
        requested.append({str(ref.ReferencedSOPInstanceUID) for ref in refs})
        return 0x0000, None

    ctx = JobContext(threading.Event(), lambda: False)
    stores = Counter()

    def lose_lease_at_the_second():
        stores["all"] += 1
        if stores["all"] == 2:
            ctx.lease_lost.set()

    scp = pacs(
        on_each=lose_lease_at_the_second,
        extra=[(StorageCommitmentPushModel, evt.EVT_N_ACTION, on_action)],
    )
    dest = Destination(
        "pacs",
        "PACS",
        "127.0.0.1",
        scp.port,
        storage_commitment=True,
        commitment_wait=0.1,
    )
    b = site(dest)
    b.opened(files)
    job = b.store.claim("forward", "interrupted", 60)
    assert b.forwarder(job, ctx).kind == "retry"

    # The next run starts from the same payload, as after a kill before the
    # first run's end was recorded.
    outcome = b.forwarder(job, JobContext(threading.Event(), lambda: True))

    assert outcome.kind == "done"
    assert sum(scp.stores.values()) == 5
    assert requested[-1] == set(_uids(files))


def test_progress_log_ignores_a_line_cut_short(tmp_path):
    opened = tmp_path / "opened" / str(uuid.uuid4())
    opened.mkdir(parents=True)
    log = ProgressLog(opened, "pacs")
    log.path.parent.mkdir()
    log.path.write_text(
        '{"path":"dicom/000.dcm","outcome":"delivered"}\n{"path":"dicom/001.dc'
    )

    assert list(log.read()) == ["dicom/000.dcm"]


def test_progress_log_refuses_a_destination_name_with_a_separator(tmp_path):
    with pytest.raises(SpoolError, match="destination name"):
        ProgressLog(tmp_path / "opened", "../pacs")


# -- transfer syntax fallback at a real PACS ---------------------------------------


@pytest.fixture
def implicit_only(tmp_path):
    """A dcmtk storescp that accepts implicit VR little endian only (+xi)."""
    scp = StoreSCP(tmp_path / "pacs", extra=("+xi",))
    yield scp
    scp.stop()


def _copies(folder: Path, names: list[str]) -> list[Path]:
    """Copies of pydicom's test files with fresh SOP Instance UIDs."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for name in names:
        ds = dcmread(get_testdata_file(name, download=False))
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / name)
        paths.append(folder / name)
    return paths


def test_compressed_instances_reach_an_implicit_only_pacs_decoded(
    tmp_path, made, implicit_only
):
    site, _ = made
    files = _copies(tmp_path / "in", ["JPEG2000.dcm", "SC_rgb_rle.dcm"])
    b = site(Destination("pacs", "PACS", "127.0.0.1", implicit_only.port))
    b.opened(files)

    assert b.worker.run_once()

    assert b.job().state == JobState.DONE
    assert [r.converted for r in b.results] == [2]
    stored = {str(ds.SOPInstanceUID): ds for ds in map(dcmread, implicit_only.files())}
    assert len(stored) == 2
    for path in files:
        original = dcmread(path)
        copy = stored[str(original.SOPInstanceUID)]
        assert copy.file_meta.TransferSyntaxUID == "1.2.840.10008.1.2"
        assert np.array_equal(copy.pixel_array, original.pixel_array)


@pytest.fixture
def no_jpeg_ls_decoder():
    """Take pydicom's only installed JPEG-LS decoder plugin away for the test."""
    decoder = get_decoder(JPEGLSLossless)
    decoder.remove_plugin("pylibjpeg")
    assert not decoder.is_available
    yield
    decoder.add_plugin(
        "pylibjpeg", ("pydicom.pixels.decoders.pylibjpeg", "_decode_frame")
    )


def test_instance_without_a_decoder_is_dead_lettered_with_its_reason(
    tmp_path, made, implicit_only, no_jpeg_ls_decoder
):
    site, _ = made
    files = _copies(tmp_path / "in", ["MR_small_jpeg_ls_lossless.dcm", "CT_small.dcm"])
    b = site(Destination("pacs", "PACS", "127.0.0.1", implicit_only.port))
    _, rels = b.opened(files)
    jpeg_ls = rels[_uids(files)[0]]

    assert b.worker.run_once()

    job = b.job()
    assert job.state == JobState.DEAD
    assert job.payload["failed"] == {
        jpeg_ls: f"cannot convert {JPEGLSLossless.name} to explicit VR little "
        "endian: no decoder"
    }
    assert job.payload["delivered"] == 1
    assert len(implicit_only.files()) == 1
