"""The SQLite store's tables, and the upgrades from older schema versions."""

import logging
import sqlite3

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 2

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (
    name TEXT PRIMARY KEY,
    value TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS studies (
    ref TEXT PRIMARY KEY,
    study_uid TEXT NOT NULL,
    route TEXT NOT NULL,
    generation INTEGER NOT NULL,
    state TEXT NOT NULL,
    instance_count INTEGER NOT NULL DEFAULT 0,
    size_bytes INTEGER NOT NULL DEFAULT 0,
    first_received REAL NOT NULL,
    last_received REAL NOT NULL,
    seal_due REAL NOT NULL,
    sealed_at REAL,
    seal_trigger TEXT NOT NULL DEFAULT '',
    hold_reason TEXT NOT NULL DEFAULT '',
    calling_ae TEXT NOT NULL DEFAULT '',
    purged_at REAL,
    UNIQUE (study_uid, route, generation)
);
CREATE INDEX IF NOT EXISTS studies_due ON studies (state, seal_due);
CREATE TABLE IF NOT EXISTS instances (
    id INTEGER PRIMARY KEY,
    study_ref TEXT NOT NULL REFERENCES studies (ref),
    sop_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    digest TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    spool_path TEXT NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    modality TEXT NOT NULL DEFAULT '',
    patient_id TEXT NOT NULL DEFAULT '',
    received_at REAL NOT NULL,
    UNIQUE (study_ref, sop_uid)
);
CREATE INDEX IF NOT EXISTS instances_sop ON instances (study_uid, sop_uid);
CREATE INDEX IF NOT EXISTS instances_spool ON instances (spool_path);
CREATE TABLE IF NOT EXISTS envelopes (
    id TEXT NOT NULL,
    direction TEXT NOT NULL,
    peer TEXT NOT NULL,
    path TEXT NOT NULL,
    size_bytes INTEGER NOT NULL,
    state TEXT NOT NULL,
    study_ref TEXT NOT NULL DEFAULT '',
    study_uid TEXT NOT NULL DEFAULT '',
    instance_count INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    details TEXT NOT NULL DEFAULT '{}',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    purged_at REAL,
    PRIMARY KEY (id, direction)
);
CREATE INDEX IF NOT EXISTS envelopes_study ON envelopes (study_uid);
CREATE INDEX IF NOT EXISTS envelopes_state ON envelopes (direction, state);
CREATE TABLE IF NOT EXISTS seen_envelopes (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    accepted_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS commitments (
    transaction_uid TEXT PRIMARY KEY,
    envelope_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    failed INTEGER NOT NULL DEFAULT 0,
    updated_at REAL NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY,
    queue TEXT NOT NULL,
    key TEXT NOT NULL UNIQUE,
    target TEXT NOT NULL DEFAULT '',
    payload TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before REAL NOT NULL,
    lease_owner TEXT NOT NULL DEFAULT '',
    lease_until REAL NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (queue, state, not_before);
"""


# Schema changes, by the version they upgrade from. Each runs inside the write
# transaction that opens the store, so an upgrade is all or nothing.
MIGRATIONS = {
    1: (
        "ALTER TABLE studies ADD COLUMN purged_at REAL",
        "ALTER TABLE envelopes ADD COLUMN purged_at REAL",
    ),
}


def migrate(conn: sqlite3.Connection, version: int) -> None:
    while version in MIGRATIONS:
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
        version += 1
    conn.execute(
        "UPDATE meta SET value = ? WHERE name = 'schema_version'", (str(version),)
    )
    logger.info("state store upgraded schema_version=%d", version)
