"""A private PostgreSQL server for tests, started from Debian's binaries.

Debian's ``postgresql`` package installs the server under
``/usr/lib/postgresql/<version>/bin`` and does not put it on PATH. The fixture
runs ``initdb`` into a fresh folder and ``pg_ctl start`` on a free loopback
port with its socket in that folder; each test then gets a database of its
own. PostgreSQL refuses to run as root, so under root the server runs as the
``postgres`` system user, in a folder it owns.

The server trades durability for speed (``fsync=off``): what is under test is
the store's transactions and locks, not the disk.
"""

import os
import pwd
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from itertools import count
from pathlib import Path

import pytest

from tests.support.net import free_port

_SERVER_USER = "postgres"


def _bin_folder() -> Path:
    """Return the newest installed server's bin folder, or skip."""
    versions = [
        p.parent
        for p in Path("/usr/lib/postgresql").glob("*/bin/pg_ctl")
        if p.parent.parent.name.isdigit()
    ]
    if not versions:
        pytest.skip("PostgreSQL is not installed (apt-get install -y postgresql)")
    return max(versions, key=lambda folder: int(folder.parent.name))


class PostgresServer:
    """A running PostgreSQL with its own data folder; ``stop()`` ends it."""

    def __init__(self, bin_folder: Path):
        self.bin = bin_folder
        self.port = free_port()
        # Not pytest's tmp_path: that folder is private to the user running
        # the tests, and the server may run as another one.
        self.folder = Path(tempfile.mkdtemp(prefix="jmix-pg-"))
        self.data = self.folder / "data"
        self._as_server = []
        if os.geteuid() == 0:
            shutil.chown(self.folder, user=_SERVER_USER)
            self._as_server = ["runuser", "-u", _SERVER_USER, "--"]
        self._run(
            "initdb",
            "-D",
            str(self.data),
            "-U",
            "postgres",
            "--auth=trust",
            "--encoding=UTF8",
            "--no-sync",
        )
        self.start_server()
        self._names = count(1)

    def start_server(self) -> None:
        """Start the server on its data folder and port; return once it accepts."""
        self._run(
            "pg_ctl",
            "start",
            "-w",
            "-D",
            str(self.data),
            "-l",
            str(self.folder / "server.log"),
            "-o",
            f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
            "-c fsync=off -c synchronous_commit=off -c full_page_writes=off",
        )

    def stop_server(self) -> None:
        """Stop the server (its clients' connections end), keeping its data."""
        self._run("pg_ctl", "stop", "-m", "fast", "-w", "-D", str(self.data))

    def _run(self, tool: str, *args: str) -> None:
        result = subprocess.run(
            [*self._as_server, str(self.bin / tool), *args],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        if result.returncode != 0:
            raise RuntimeError(f"{tool} failed: {result.stderr or result.stdout}")

    def url(self, dbname: str = "postgres") -> str:
        """Return the url of one database of this server."""
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    def new_database(self) -> str:
        """Create an empty database and return its url (about 0.3 s)."""
        name = f"db{next(self._names)}"
        self._admin(f"CREATE DATABASE {name} STRATEGY FILE_COPY")
        return self.url(name)

    def new_schema(self) -> str:
        """Create an empty schema and return a url whose tables go there.

        Much faster than a database, and as separate for the store, whose
        statements name no schema and so use the first on ``search_path``.
        """
        name = f"s{next(self._names)}"
        self._admin(f"CREATE SCHEMA {name}")
        return f"{self.url()}?options=-csearch_path%3D{name}"

    def _admin(self, sql: str) -> None:
        import psycopg

        with psycopg.connect(self.url(), autocommit=True) as conn:
            conn.execute(sql)

    def stop(self) -> None:
        """Stop the server and remove its folder."""
        try:
            self._run("pg_ctl", "stop", "-m", "fast", "-w", "-D", str(self.data))
        finally:
            shutil.rmtree(self.folder, ignore_errors=True)


# The one server of this test run. Each test module that uses the fixture gets
# its own copy of it from pytest, so the copies share the server through here;
# every copy stops it at the end of the session (the second finds it stopped).
_running: list[PostgresServer] = []


def _runnable_bin_folder() -> Path:
    """Return the server's bin folder, or skip when a server cannot run here."""
    pytest.importorskip(
        "psycopg", reason="psycopg is not installed (pip install -e '.[postgres]')"
    )
    bin_folder = _bin_folder()
    if os.geteuid() == 0:
        try:
            pwd.getpwnam(_SERVER_USER)
        except KeyError:
            pytest.skip(f"running as root and there is no {_SERVER_USER!r} user")
        if shutil.which("runuser") is None:
            pytest.skip("running as root without runuser to start PostgreSQL")
    return bin_folder


@pytest.fixture(scope="session")
def postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server for the whole test run; skips when it cannot run.

    Import it into a test module (``from tests.support.postgres import
    postgres_server``) to use it there.
    """
    bin_folder = _runnable_bin_folder()
    if not _running:
        _running.append(PostgresServer(bin_folder))
    yield _running[0]
    if _running:
        _running.pop().stop()


@pytest.fixture
def own_postgres_server() -> Iterator[PostgresServer]:
    """A PostgreSQL server of one test's own, which it may stop and start."""
    server = PostgresServer(_runnable_bin_folder())
    yield server
    server.stop()
