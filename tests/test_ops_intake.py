"""Envelopes refused at intake are counted, on a real receiving daemon.

Site B of :class:`tests.support.sites.Sites` runs as ``python -m bridge run``; the
tests post envelopes to its upload API as a peer would (tampered, expired,
replayed, signed by a stranger, unauthenticated, too large, not a zip) and drop
one into its inbox folder, then read each outcome's series on ``/metrics``.
"""

from __future__ import annotations

import json
import zipfile
from datetime import timedelta
from pathlib import Path

import httpx
import pytest

from bridge import jmix
from tests.support.net import free_port, wait_until
from tests.support.peer_env import CT_SMALL, SITE_A, SITE_B
from tests.support.sites import TOKEN, Sites
from tests.test_ops_metrics import value

RECEIVED = "jmix_bridge_envelopes_received_total"
MAX_BODY = 1 << 20


def pack_for_b(
    sites: Sites, out: Path, *, keys: Path | None = None, sender=SITE_A, **kw
) -> jmix.PackResult:
    """Pack CT_small.dcm for site B, signed with site A's keys unless ``keys``."""
    keys = keys or sites.root / "a" / "keys"
    return jmix.pack(
        [CT_SMALL],
        out,
        sender=sender,
        signing_key=jmix.load_signing_key(keys / "signing.key"),
        receiver=SITE_B,
        recipient_public=jmix.load_encryption_public(
            sites.root / "b" / "keys" / "encryption.pub"
        ),
        **kw,
    )


def rewrite_member(src: Path, dest: Path, suffix: str, change) -> None:
    """Copy the zip ``src`` to ``dest`` with the member ending in ``suffix`` changed."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dest, "w") as zout:
        for info in zin.infolist():
            data = zin.read(info)
            if info.filename.endswith(suffix):
                data = change(data)
            zout.writestr(info, data)


def renamed_sender(data: bytes) -> bytes:
    """Change the sender's name in a manifest: its signature no longer verifies."""
    manifest = json.loads(data)
    manifest["sender"]["name"] = "Somebody Else"
    return json.dumps(manifest).encode()


def flipped_byte(data: bytes) -> bytes:
    """Flip one byte in the middle of ``data``."""
    middle = len(data) // 2
    return data[:middle] + bytes([data[middle] ^ 0x01]) + data[middle + 1 :]


def post(port: int, body: bytes, token: str | None = TOKEN) -> httpx.Response:
    """POST ``body`` to the upload API, with the bearer ``token`` unless None."""
    headers = {"Content-Type": "application/zip"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(
        f"http://127.0.0.1:{port}/api/jmix", content=body, headers=headers, timeout=30
    )


@pytest.fixture(scope="module")
def refused(tmp_path_factory):
    """Site B after one envelope of each kind was posted or dropped; its metrics."""
    root = tmp_path_factory.mktemp("intake")
    inbox = root / "inbox"
    inbox.mkdir()
    sites = Sites(
        root,
        ("PACS", free_port()),
        b={
            "http": {"max_body_bytes": MAX_BODY},
            "receiving": {"inbox_folder": str(inbox)},
        },
    )
    jmix.generate_key_dir(root / "stranger")
    work = root / "work"
    work.mkdir()
    good = pack_for_b(sites, work / "good.zip").path
    rewrite_member(good, work / "tampered.zip", "manifest.json", renamed_sender)
    expired = pack_for_b(
        sites, work / "expired.zip", expires_in=timedelta(seconds=-60)
    ).path
    stranger = pack_for_b(sites, work / "stranger.zip", keys=root / "stranger").path
    unknown_site = jmix.Entity("site-c", "Site C", "ops@site-c.example")
    dropped = pack_for_b(
        sites, work / "dropped.zip", keys=root / "stranger", sender=unknown_site
    )

    daemon = sites.start_b()
    try:
        port = sites.b_http
        answers = {
            "good": post(port, good.read_bytes()).status_code,
            "replayed": post(port, good.read_bytes()).status_code,
            "tampered": post(port, (work / "tampered.zip").read_bytes()).status_code,
            "expired": post(port, expired.read_bytes()).status_code,
            "stranger": post(port, stranger.read_bytes()).status_code,
            "no_token": post(port, good.read_bytes(), token=None).status_code,
            "too_large": post(port, b"\0" * (MAX_BODY + 1)).status_code,
            "not_a_zip": post(port, b"this is not a zip file").status_code,
        }
        dropped.path.rename(inbox / f"{dropped.envelope_id}.zip")
        wait_until(
            lambda: any((inbox / "rejected").glob("*.reason.txt")),
            timeout=30,
            what="the inbox watcher to set the dropped file aside",
        )

        def scrape() -> str:
            return httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text

        wait_until(
            lambda: value(scrape(), RECEIVED, sender="site-a", outcome="accepted"),
            timeout=30,
            what="the good envelope to be opened",
        )
        yield {"answers": answers, "metrics": scrape()}
    finally:
        daemon.stop()


def count(refused, outcome: str, sender: str = "site-a") -> float | None:
    """Return the envelopes counted with ``outcome`` from ``sender``."""
    return value(refused["metrics"], RECEIVED, sender=sender, outcome=outcome)


def test_the_upload_api_answers_each_refusal_with_its_status(refused):
    assert refused["answers"] == {
        "good": 201,
        "replayed": 409,
        "tampered": 400,
        "expired": 400,
        "stranger": 400,
        "no_token": 401,
        "too_large": 413,
        "not_a_zip": 400,
    }


def test_an_envelope_with_a_tampered_manifest_counts_as_bad_signature(refused):
    assert count(refused, "bad_signature") == 1


def test_an_expired_envelope_counts_as_expired(refused):
    assert count(refused, "expired") == 1


def test_a_replayed_envelope_counts_as_duplicate(refused):
    assert count(refused, "duplicate") == 1


def test_an_envelope_signed_by_an_unpinned_key_counts_as_unknown_sender(refused):
    assert count(refused, "unknown_sender") == 1


def test_an_upload_without_a_credential_counts_as_unauthorized_from_unknown(
    refused,
):
    assert count(refused, "unauthorized", sender="unknown") == 1


def test_an_upload_over_the_size_limit_counts_as_too_large(refused):
    assert count(refused, "too_large") == 1


def test_an_upload_that_is_not_a_zip_counts_as_malformed(refused):
    assert count(refused, "malformed") == 1


def test_a_dropped_file_naming_no_configured_sender_counts_as_unknown_sender(
    refused,
):
    assert count(refused, "unknown_sender", sender="unknown") == 1


def test_the_accepted_envelope_is_counted_once_by_the_opener(refused):
    assert count(refused, "accepted") == 1
