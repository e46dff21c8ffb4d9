"""The PostgreSQL store where it differs from SQLite: several processes share
one database.

Processes claiming one queue never share a job; processes adding one study
assemble it once; an instance racing a seal waits for it. Also: the tables
match SQLite's column for column, a newer schema is refused, and a password in
the url never shows. The server is the one of ``tests/support/postgres.py``,
started once per test run; without it or psycopg these tests are skipped.
"""

import json
import sqlite3
import subprocess
import sys
import threading

import pytest

from bridge.errors import StoreError
from bridge.store import JobState, NewJob, open_store
from bridge.store._sqlite_schema import SCHEMA_VERSION as SQLITE_SCHEMA_VERSION
from tests.support import store_proc
from tests.support.net import wait_until
from tests.support.postgres import postgres_server as _session_server
from tests.test_store_contract import add, inst

# The session's server (started once however many modules use it), as a
# fixture of this module.
postgres_server = _session_server


def _pg_query(url: str, sql: str) -> list[tuple]:
    import psycopg

    with psycopg.connect(url) as conn:
        return conn.execute(sql).fetchall()


def _pg_columns(url: str) -> dict[str, list[str]]:
    rows = _pg_query(
        url,
        "SELECT table_name, column_name FROM information_schema.columns "
        "WHERE table_schema = current_schema() ORDER BY table_name, "
        "ordinal_position",
    )
    tables: dict[str, list[str]] = {}
    for table, column in rows:
        tables.setdefault(table, []).append(column)
    return tables


def _sqlite_columns(path) -> dict[str, list[str]]:
    conn = sqlite3.connect(path)
    names = [
        r[0]
        for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
    ]
    tables = {n: [c[1] for c in conn.execute(f"PRAGMA table_info({n})")] for n in names}
    conn.close()
    return tables


def test_postgres_tables_have_the_sqlite_columns_and_version(postgres_server, tmp_path):
    url = postgres_server.new_schema()
    open_store(url).close()
    open_store(tmp_path / "state.sqlite").close()

    assert _pg_columns(url) == _sqlite_columns(tmp_path / "state.sqlite")
    version = _pg_query(url, "SELECT value FROM meta WHERE name = 'schema_version'")
    assert int(version[0][0]) == SQLITE_SCHEMA_VERSION


def test_postgres_refuses_a_newer_schema(postgres_server):
    url = postgres_server.new_schema()
    open_store(url).close()
    _pg_query(
        url, "UPDATE meta SET value = '99' WHERE name = 'schema_version' RETURNING 1"
    )

    with pytest.raises(StoreError, match="schema version 99"):
        open_store(url)


def test_postgres_url_password_never_shows(postgres_server):
    port = postgres_server.port
    with pytest.raises(StoreError) as raised:
        open_store(f"postgresql://postgres:s3cret@127.0.0.1:{port}/nosuchdb")
    assert "nosuchdb" in str(raised.value)
    assert "s3cret" not in str(raised.value)

    store = open_store(postgres_server.url().replace("postgres@", "postgres:s3cret@"))
    assert "s3cret" not in repr(store)
    store.close()


def test_postgres_instance_racing_a_seal_goes_into_the_follow_up(postgres_server):
    import psycopg

    url = postgres_server.new_schema()
    store = open_store(url)
    ref = add(store, inst()).study.ref
    results = []

    # Another process seals the study and has not committed yet.
    with psycopg.connect(url) as sealer:
        sealer.execute("UPDATE studies SET state = 'sealed' WHERE ref = %s", (ref,))
        adder = threading.Thread(
            target=lambda: results.append(add(store, inst(sop="1.2.3.2", digest="bb")))
        )
        adder.start()
        wait_until(
            lambda: (
                _pg_query(
                    url,
                    "SELECT count(*) FROM pg_stat_activity "
                    "WHERE wait_event_type = 'Lock' AND datname = current_database()",
                )[0][0]
                == 1
            ),
            what="add_instance to wait for the sealing transaction",
        )
        sealer.commit()
    adder.join(timeout=30)

    assert results[0].study.generation == 1
    assert [i.sop_instance_uid for i in store.study_instances(ref)] == ["1.2.3.1"]
    store.close()


def _run_together(commands: list[list[str]]) -> list:
    """Start every process, let them all begin at once, return their results."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", "tests.support.store_proc", *command],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        for command in commands
    ]
    for proc in procs:
        assert proc.stdout.readline().strip() == "ready"
    for proc in procs:
        proc.stdin.write("go\n")
        proc.stdin.flush()
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=120)
        assert proc.returncode == 0
        results.append(json.loads(out))
    return results


def test_processes_claiming_one_queue_never_share_a_job(postgres_server):
    url = postgres_server.new_database()
    store = open_store(url)
    ids = [store.enqueue(NewJob(store_proc.QUEUE, f"job-{i}")).id for i in range(400)]

    results = _run_together([["claim", url, f"w{n}"] for n in range(4)])

    every = [job_id for claimed_ids in results for job_id in claimed_ids]
    assert sorted(every) == sorted(ids)
    assert all(results)  # each process got some: they did run at once
    assert {j.state for j in store.list_jobs(limit=1000)} == {JobState.DONE}
    store.close()


def test_processes_adding_one_study_assemble_it_once(postgres_server):
    url = postgres_server.new_database()

    results = _run_together([["add", url, f"1.2.3.{n}", "40"] for n in range(4)])

    refs = {ref for study_refs in results for ref in study_refs}
    assert len(refs) == 1
    store = open_store(url)
    study = store.get_study(refs.pop())
    assert (study.instance_count, study.generation) == (160, 0)
    assert len(store.study_instances(study.ref)) == 160
    store.close()
