"""The sender's ``sent`` audit entry, written into the outgoing zip in place."""

import zipfile

import pytest

from bridge import jmix
from bridge.errors import MalformedEnvelope
from bridge.jmix import audit as audit_module
from bridge.jmix.audit import read_audit, stamp_sent, verify_audit
from tests.support.peer_env import SITE_A, SITE_B, make_key_dirs, pack_envelope


@pytest.fixture
def packed(tmp_path):
    keys = make_key_dirs(tmp_path / "keys")
    result = pack_envelope(tmp_path / "env.zip", keys / "a", keys / "b")
    return result, keys


def _stamp(result, keys):
    return stamp_sent(
        result.path,
        by=SITE_A,
        to=SITE_B,
        key=jmix.load_signing_key(keys / "a" / "signing.key"),
    )


def test_sent_entry_follows_created_and_verifies(packed):
    result, keys = packed

    _stamp(result, keys)

    audit = read_audit(result.path)
    assert [e["event"] for e in audit["audit"]] == ["created", "sent"]
    trust = jmix.TrustStore([(SITE_A.id, keys / "a" / "signing.pub")])
    checks = verify_audit(audit, result.envelope_id, trust, policy="required")
    assert len(checks) == 2


def test_a_retried_delivery_replaces_its_sent_entry_instead_of_adding_one(packed):
    result, keys = packed

    _stamp(result, keys)
    _stamp(result, keys)

    assert [e["event"] for e in read_audit(result.path)["audit"]] == ["created", "sent"]


def test_the_stamped_envelope_still_opens_byte_identical(packed, tmp_path):
    result, keys = packed
    before = zipfile.ZipFile(result.path).read(
        f"{result.envelope_id}/payload.encrypted"
    )

    _stamp(result, keys)

    with zipfile.ZipFile(result.path) as zf:
        assert zf.testzip() is None
        assert zf.read(f"{result.envelope_id}/payload.encrypted") == before
    opened = jmix.open_envelope(
        result.path,
        tmp_path / "out",
        encryption_key=jmix.load_encryption_key(keys / "b" / "encryption.key"),
        trust=jmix.TrustStore([(SITE_A.id, keys / "a" / "signing.pub")]),
        policy=jmix.OpenPolicy(expected_receiver_id=SITE_B.id),
    )
    assert opened.dicom_files


def test_zip_that_does_not_end_with_its_audit_is_refused(packed, tmp_path):
    result, keys = packed
    with zipfile.ZipFile(result.path, "a") as zf:
        zf.writestr("extra.txt", b"x")

    with pytest.raises(MalformedEnvelope):
        _stamp(result, keys)


def test_a_rewrite_cut_short_by_a_crash_is_undone_before_the_next_stamp(packed):
    result, keys = packed
    _stamp(result, keys)
    size = result.path.stat().st_size
    with zipfile.ZipFile(result.path) as zf:
        offset = zf.infolist()[-1].header_offset
    # What a crash half way through a rewrite leaves: the journal of the old
    # tail, and the zip cut off after a few bytes of the new one.
    audit_module._save_tail(result.path, offset)
    with open(result.path, "rb+") as fh:
        fh.truncate(offset + 10)
    with pytest.raises(zipfile.BadZipFile):
        zipfile.ZipFile(result.path)

    _stamp(result, keys)

    assert not result.path.with_name(result.path.name + ".tail").exists()
    assert result.path.stat().st_size == size
    with zipfile.ZipFile(result.path) as zf:
        assert zf.testzip() is None
    assert [e["event"] for e in read_audit(result.path)["audit"]] == ["created", "sent"]
