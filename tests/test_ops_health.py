"""Liveness and readiness: /healthz always, /readyz naming the failing checks."""

from __future__ import annotations

import shutil
import sqlite3

import pytest

from bridge.config import Size, SpoolSettings
from bridge.jmix import generate_key_dir, load_key_dir
from bridge.ops.health import (
    Check,
    flag,
    keys_on_disk,
    run_checks,
    spool_has_room,
    standard_checks,
)
from bridge.store.sqlite import SQLiteStore
from tests.test_ops_support import served_bridge


@pytest.fixture
def bridge(tmp_path):
    """A served ops app over an empty store."""
    yield from served_bridge(tmp_path)


def test_healthz_answers_200_without_credentials(bridge):
    response = bridge.get("/healthz", token=None)

    assert response.status_code == 200


def test_readyz_answers_200_when_every_check_passes(bridge):
    response = bridge.get("/readyz", token=None)

    assert response.status_code == 200
    assert response.json() == {"ready": True, "checks": {"store": "ok", "spool": "ok"}}


def test_readyz_answers_503_naming_the_spool_under_its_watermark(bridge):
    bridge.ctx.checks[1] = spool_has_room(bridge.spool, 2**62, 0.0)

    response = bridge.get("/readyz", token=None)

    assert response.status_code == 503
    body = response.json()
    assert body["ready"] is False
    assert body["failing"] == ["spool"]
    assert "watermark" in body["checks"]["spool"]
    assert body["checks"]["store"] == "ok"


def test_readyz_answers_503_naming_the_store_when_it_cannot_write(bridge):
    # Another process holding the write lock is what a stuck or full database
    # looks like from here; the store gives up after its busy timeout.
    blocker = sqlite3.connect(bridge.store.path, isolation_level=None)
    blocker.execute("BEGIN IMMEDIATE")
    try:
        response = bridge.get("/readyz", token=None)
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()

    assert response.status_code == 503
    assert response.json()["failing"] == ["store"]
    assert "StoreError" in response.json()["checks"]["store"]


def test_readyz_names_a_listener_that_is_not_bound(bridge):
    bridge.ctx.checks.append(
        flag("listener", lambda: False, "DICOM listener is not bound")
    )

    response = bridge.get("/readyz", token=None)

    assert response.status_code == 503
    assert response.json()["checks"]["listener"] == "DICOM listener is not bound"


def test_a_check_that_raises_counts_as_failing():
    def broken():
        raise OSError("keys folder unreadable")

    result = run_checks([Check("keys", broken), Check("fine", lambda: None)])

    assert not result.ready
    assert result.checks == {"keys": "OSError: keys folder unreadable", "fine": "ok"}


def test_standard_checks_cover_listener_store_spool_and_keys(tmp_path):
    bound = {"listener": False}
    store = SQLiteStore(tmp_path / "state.db")
    checks = standard_checks(
        store=store,
        spool_path=tmp_path,
        spool=SpoolSettings(min_free_bytes=Size(0), min_free_ratio=0.0),
        listener_bound=lambda: bound["listener"],
        keys=generate_and_load(tmp_path / "keys"),
    )

    before = run_checks(checks)
    bound["listener"] = True
    after = run_checks(checks)
    store.close()

    assert list(before.checks) == ["listener", "store", "spool", "keys"]
    assert before.failing == ["listener"]
    assert after.ready


def generate_and_load(folder):
    """Create a node key folder and return its keys as the daemon holds them."""
    generate_key_dir(folder)
    return load_key_dir(folder)


def test_keys_check_fails_naming_the_file_when_a_key_file_is_removed(tmp_path):
    keys = generate_and_load(tmp_path / "keys")
    (tmp_path / "keys" / "encryption.key").unlink()

    result = run_checks([keys_on_disk(keys)])

    assert result.failing == ["keys"]
    assert "encryption.key" in result.checks["keys"]


def test_keys_check_fails_when_the_key_files_hold_other_keys(tmp_path):
    keys = generate_and_load(tmp_path / "keys")
    shutil.rmtree(tmp_path / "keys")
    generate_key_dir(tmp_path / "keys")

    result = run_checks([keys_on_disk(keys)])

    assert "are not the keys in use" in result.checks["keys"]
