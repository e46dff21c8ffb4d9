"""The drop-folder transport: atomic drops, and an inbox that takes only whole files."""

from contextlib import closing

import pytest

from bridge.errors import RetryableTransportError
from bridge.peer.dropfolder import InboxWatcher, drop_envelope
from bridge.peer.intake import Intake
from bridge.peer.settings import InboundSender
from bridge.spool import Spool
from bridge.store.sqlite import SQLiteStore
from tests.support.peer_env import harmony_zip, make_key_dirs, pack_envelope
from tests.support.sites import Pacs, Sites, dead_jobs, start_and_deliver, study_of


@pytest.fixture
def keys(tmp_path):
    return make_key_dirs(tmp_path / "keys")


@pytest.fixture
def inbox(tmp_path, keys):
    store = SQLiteStore(tmp_path / "state.db")
    # Trusted on its transport for HTTP; the inbox still demands its signature.
    sender = InboundSender(
        name="site-a",
        id="site-a",
        token="t",
        trust="transport",
        signing_keys=(keys / "a" / "signing.pub",),
    )
    intake = Intake(store, Spool(tmp_path / "spool"), [sender])
    folder = tmp_path / "inbox"
    folder.mkdir()
    yield InboxWatcher(folder, [sender], intake, poll_seconds=0.05)
    store.close()


def _envelope(tmp_path, keys, name="env.zip"):
    return pack_envelope(tmp_path / name, keys / "a", keys / "b")


def test_drop_writes_the_envelope_under_its_id_and_leaves_no_part_file(tmp_path, keys):
    env = _envelope(tmp_path, keys)
    drop = tmp_path / "drop"
    drop.mkdir()

    dest = drop_envelope(env.path, drop, env.envelope_id)

    assert dest == drop / f"{env.envelope_id}.zip"
    assert dest.read_bytes() == env.path.read_bytes()
    assert sorted(p.name for p in drop.iterdir()) == [dest.name]


def test_drop_into_a_missing_folder_is_retryable(tmp_path, keys):
    env = _envelope(tmp_path, keys)

    with pytest.raises(RetryableTransportError, match="drop folder"):
        drop_envelope(env.path, tmp_path / "unmounted", env.envelope_id)


def test_inbox_takes_a_file_only_once_it_is_unchanged_across_two_scans(
    tmp_path, keys, inbox
):
    env = _envelope(tmp_path, keys)
    drop_envelope(env.path, inbox.folder, env.envelope_id)

    first, second = inbox.scan(), inbox.scan()

    assert (first, second) == (0, 1)
    assert inbox.intake.store.get_envelope(env.envelope_id, "in").state == "stored"
    assert list(inbox.folder.iterdir()) == []


def test_inbox_ignores_part_and_dot_files(tmp_path, keys, inbox):
    env = _envelope(tmp_path, keys)
    for name in (f".{env.envelope_id}.zip.part", ".hidden.zip", "note.txt"):
        (inbox.folder / name).write_bytes(env.path.read_bytes())

    taken = inbox.scan() + inbox.scan()

    assert taken == 0
    assert len(list(inbox.folder.iterdir())) == 3


def test_inbox_sets_a_duplicate_aside_with_its_reason(tmp_path, keys, inbox):
    env = _envelope(tmp_path, keys)
    drop_envelope(env.path, inbox.folder, env.envelope_id)
    inbox.scan(), inbox.scan()
    drop_envelope(env.path, inbox.folder, env.envelope_id)

    taken = inbox.scan() + inbox.scan()

    assert taken == 0
    aside = inbox.folder / "rejected" / f"{env.envelope_id}.zip"
    assert aside.read_bytes() == env.path.read_bytes()
    reason = (inbox.folder / "rejected" / f"{aside.name}.reason.txt").read_text()
    assert "already received" in reason


def test_inbox_sets_aside_an_envelope_signed_by_an_unpinned_key(tmp_path, keys, inbox):
    other = make_key_dirs(tmp_path / "other")
    env = pack_envelope(tmp_path / "e.zip", other / "a", keys / "b")
    drop_envelope(env.path, inbox.folder, env.envelope_id)

    inbox.scan(), inbox.scan()

    assert inbox.intake.store.get_envelope(env.envelope_id, "in") is None
    reason = (
        inbox.folder / "rejected" / f"{env.envelope_id}.zip.reason.txt"
    ).read_text()
    assert "UnknownSigner" in reason


def test_inbox_keeps_every_rejected_file_under_a_distinct_name(tmp_path, inbox):
    for _ in range(2):
        (inbox.folder / "junk.zip").write_bytes(b"not an envelope")
        inbox.scan(), inbox.scan()

    kept = sorted(p.name for p in (inbox.folder / "rejected").glob("*.zip"))

    assert len(kept) == 2
    assert "junk.zip" in kept


def test_inbox_sets_aside_an_envelope_naming_an_unknown_sender(tmp_path, inbox):
    envelope_id = harmony_zip(inbox.folder / "h.zip")

    inbox.scan(), inbox.scan()

    assert inbox.intake.store.get_envelope(envelope_id, "in") is None
    reason = (inbox.folder / "rejected" / "h.zip.reason.txt").read_text()
    assert "'harmony': no such sender" in reason


def test_study_travels_through_the_drop_folder_between_two_daemons(tmp_path):
    pacs = Pacs(tmp_path / "pacs")
    sites = Sites(tmp_path / "sites", (pacs.ae_title, pacs.port), transport="drop")
    study = study_of(tmp_path / "study", 5)
    try:
        repeats = start_and_deliver(sites, pacs, study)
        log_a = sites.a.log_text()
    finally:
        sites.stop()
        pacs.stop()

    assert repeats == 0
    assert dead_jobs(sites) == 0
    assert "envelope delivered" in log_a and "result=drop" in log_a
    # B took the one envelope A dropped, and the folder holds no envelope now.
    with closing(SQLiteStore(sites.db("b"))) as store_b:
        [received] = store_b.find_envelopes(direction="in")
    assert received.peer == "site-a"
    assert list(sites.carried.glob("*.zip")) == []
