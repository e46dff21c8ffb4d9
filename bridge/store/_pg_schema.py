"""The PostgreSQL store's tables: the SQLite store's tables in PostgreSQL types.

The columns are the same as ``_sqlite_schema`` (a test compares them), so one
row mapping (``_rows``) serves both stores and ``schema_version`` counts the
same thing in both. Times stay POSIX seconds in ``DOUBLE PRECISION``, and
payloads and details stay JSON text written by ``base.dumps``, as in SQLite.
"""

import logging

import psycopg

logger = logging.getLogger(__name__)

# The version of the tables below, in the same numbering as the SQLite store's
# SCHEMA_VERSION. PostgreSQL support began at version 2, so there is nothing
# older to upgrade from yet; a later change adds its steps to MIGRATIONS.
SCHEMA_VERSION = 2
MIGRATIONS: dict[int, tuple[str, ...]] = {}

# Taken (per transaction) while the schema is created or upgraded, so that
# bridge processes starting together do not race to create the same tables.
# The number is arbitrary; it only has to be the same in every process.
SCHEMA_LOCK = 0x6A6D6978  # "jmix"

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
    size_bytes BIGINT NOT NULL DEFAULT 0,
    first_received DOUBLE PRECISION NOT NULL,
    last_received DOUBLE PRECISION NOT NULL,
    seal_due DOUBLE PRECISION NOT NULL,
    sealed_at DOUBLE PRECISION,
    seal_trigger TEXT NOT NULL DEFAULT '',
    hold_reason TEXT NOT NULL DEFAULT '',
    calling_ae TEXT NOT NULL DEFAULT '',
    purged_at DOUBLE PRECISION,
    UNIQUE (study_uid, route, generation)
);
CREATE INDEX IF NOT EXISTS studies_due ON studies (state, seal_due);
CREATE TABLE IF NOT EXISTS instances (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    study_ref TEXT NOT NULL REFERENCES studies (ref),
    sop_uid TEXT NOT NULL,
    study_uid TEXT NOT NULL,
    series_uid TEXT NOT NULL,
    sop_class_uid TEXT NOT NULL,
    transfer_syntax_uid TEXT NOT NULL,
    digest TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    spool_path TEXT NOT NULL,
    calling_ae TEXT NOT NULL DEFAULT '',
    modality TEXT NOT NULL DEFAULT '',
    patient_id TEXT NOT NULL DEFAULT '',
    received_at DOUBLE PRECISION NOT NULL,
    UNIQUE (study_ref, sop_uid)
);
CREATE INDEX IF NOT EXISTS instances_sop ON instances (study_uid, sop_uid);
CREATE INDEX IF NOT EXISTS instances_spool ON instances (spool_path);
CREATE TABLE IF NOT EXISTS envelopes (
    id TEXT NOT NULL,
    direction TEXT NOT NULL,
    peer TEXT NOT NULL,
    path TEXT NOT NULL,
    size_bytes BIGINT NOT NULL,
    state TEXT NOT NULL,
    study_ref TEXT NOT NULL DEFAULT '',
    study_uid TEXT NOT NULL DEFAULT '',
    instance_count INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    details TEXT NOT NULL DEFAULT '{}',
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL,
    purged_at DOUBLE PRECISION,
    PRIMARY KEY (id, direction)
);
CREATE INDEX IF NOT EXISTS envelopes_study ON envelopes (study_uid);
CREATE INDEX IF NOT EXISTS envelopes_state ON envelopes (direction, state);
CREATE TABLE IF NOT EXISTS seen_envelopes (
    id TEXT PRIMARY KEY,
    sender TEXT NOT NULL,
    accepted_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS commitments (
    transaction_uid TEXT PRIMARY KEY,
    envelope_id TEXT NOT NULL,
    destination TEXT NOT NULL,
    state TEXT NOT NULL,
    failed INTEGER NOT NULL DEFAULT 0,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE TABLE IF NOT EXISTS jobs (
    id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    queue TEXT NOT NULL,
    key TEXT NOT NULL UNIQUE,
    target TEXT NOT NULL DEFAULT '',
    payload TEXT NOT NULL DEFAULT '{}',
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    not_before DOUBLE PRECISION NOT NULL,
    lease_owner TEXT NOT NULL DEFAULT '',
    lease_until DOUBLE PRECISION NOT NULL DEFAULT 0,
    last_error TEXT NOT NULL DEFAULT '',
    created_at DOUBLE PRECISION NOT NULL,
    updated_at DOUBLE PRECISION NOT NULL
);
CREATE INDEX IF NOT EXISTS jobs_due ON jobs (queue, state, not_before);
"""


def prepare(conn: psycopg.Connection) -> int | None:
    """Create or upgrade the tables inside the caller's transaction.

    Returns the schema version found when it is one this bridge cannot read
    (newer than SCHEMA_VERSION), else None. Raises psycopg errors untranslated;
    the store translates them.
    """
    conn.execute("SELECT pg_advisory_xact_lock(%s)", (SCHEMA_LOCK,))
    conn.execute(SCHEMA)
    row = conn.execute(
        "SELECT value FROM meta WHERE name = 'schema_version'"
    ).fetchone()
    if row is None:
        conn.execute(
            "INSERT INTO meta VALUES ('schema_version', %s)", (str(SCHEMA_VERSION),)
        )
        return None
    version = int(row["value"])
    while version in MIGRATIONS:
        for statement in MIGRATIONS[version]:
            conn.execute(statement)
        version += 1
        conn.execute(
            "UPDATE meta SET value = %s WHERE name = 'schema_version'", (str(version),)
        )
        logger.info("state store upgraded schema_version=%d", version)
    return None if version == SCHEMA_VERSION else version
