"""Shared pieces of the operations tests: a populated store and a served app.

The other ``test_ops_*`` modules import the fixtures from here. The app is the
real one: :func:`bridge.ops.add_ops_routes` on an aiohttp application, served by
aiohttp's runner on a loopback port in a thread of its own, so that blocking
clients (httpx, the CLI, chromium, prometheus) talk to it over TCP.
"""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest
from aiohttp import web

from bridge.config import (
    AllowedCaller,
    Config,
    DestinationSettings,
    DicomSettings,
    EntitySettings,
    HttpSettings,
    NodeSettings,
    PeerSettings,
    RouteSettings,
    Secret,
    SenderSettings,
)
from bridge.ops import Metrics, OpsContext, add_ops_routes
from bridge.ops.health import spool_has_room, store_writable
from bridge.store.base import DuplicatePolicy, Envelope, Instance, Job, NewJob, Study
from bridge.store.sqlite import SQLiteStore
from bridge.workers.policy import BreakerBoard
from tests.support.net import free_port

ADMIN_TOKEN = "admin-t0ken-for-tests"
# A UID root registered for examples (PS3.5 B.1 lists 1.2.826.0.1.3680043.* as
# freely usable); every test UID is made from it and must never show.
UID_ROOT = "1.2.826.0.1.3680043.8.498."
PATIENT_MARKER = "ZZMARKER^OPSTEST"


def make_uid() -> str:
    """Return a fresh UID under the example root."""
    return UID_ROOT + str(uuid.uuid4().int)[:20]


def make_config(token: str = ADMIN_TOKEN, **http) -> Config:
    """Return a configuration with one peer, one sender, one destination."""
    return Config(
        node=NodeSettings(id="org:site-a", name="site-a bridge"),
        dicom=DicomSettings(allowed_callers=(AllowedCaller("MODALITY1"),)),
        http=HttpSettings(admin_token=Secret(token), **http),
        routes=(RouteSettings(name="to-b", peers=("site-b",), calling_ae=("CT*",)),),
        peers=(
            PeerSettings(
                name="site-b",
                entity=EntitySettings(id="org:site-b"),
                encryption_key=Path("/nonexistent/encryption.pub"),
                url="http://127.0.0.1:9/",
            ),
        ),
        senders=(SenderSettings(name="site-c", id="org:site-c"),),
        destinations=(
            DestinationSettings(
                name="pacs", ae_title="PACS", host="127.0.0.1", port=4242
            ),
        ),
    )


def add_study(
    store: SQLiteStore,
    *,
    instances: int = 2,
    seal: bool = True,
    calling_ae: str = "MODALITY1",
) -> tuple[Study, list[str]]:
    """Add a study of ``instances`` instances (sealed: one deliver job).

    Returns the study and every UID used, for the tests that look for leaks.
    """
    study_uid, series_uid = make_uid(), make_uid()
    uids = [study_uid, series_uid]
    now = time.time()
    for n in range(instances):
        sop_uid = make_uid()
        uids.append(sop_uid)
        result = store.add_instance(
            Instance(
                sop_instance_uid=sop_uid,
                study_instance_uid=study_uid,
                series_instance_uid=series_uid,
                sop_class_uid="1.2.840.10008.5.1.4.1.1.2",
                transfer_syntax_uid="1.2.840.10008.1.2.1",
                digest=f"{n:064x}",
                size_bytes=1000 + n,
                spool_path=f"instances/00/{n:064x}.dcm",
                calling_ae=calling_ae,
                modality="CT",
                patient_id=PATIENT_MARKER,
                received_at=now - 5 + n,
            ),
            route="to-b",
            quiet_seconds=30,
            max_age_seconds=3600,
            duplicates=DuplicatePolicy.KEEP_NEWEST,
        )
    study = result.study
    if seal:
        store.seal_study(
            study.ref,
            "quiet-period",
            [NewJob(queue="deliver", key=f"deliver:{study.ref}", target="site-b")],
        )
    return store.get_study(study.ref), uids


def add_dead_job(store: SQLiteStore, queue: str = "forward") -> Job:
    """Enqueue a job for the destination, claim it and park it in dead-letter.

    ``queue`` must hold no other ready job.
    """
    job = store.enqueue(
        NewJob(queue=queue, key=f"{queue}:{uuid.uuid4()}", target="pacs")
    )
    claimed = store.claim(queue, "tester", 60.0)
    assert claimed is not None and claimed.id == job.id
    store.dead_letter(job.id, "tester", "peer refused: HTTP 400")
    return store.get_job(job.id)


def add_quarantined(
    store: SQLiteStore, spool: Path, sender: str = "site-c"
) -> tuple[Envelope, Path]:
    """Record a received envelope in quarantine with a file in the spool."""
    envelope_id = str(uuid.uuid4())
    path = spool / "quarantine" / f"{envelope_id}.zip"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"PK\x05\x06" + bytes(18))
    env = Envelope(
        id=envelope_id,
        direction="in",
        peer=sender,
        path=f"quarantine/{envelope_id}.zip",
        size_bytes=path.stat().st_size,
        state="quarantined",
        study_instance_uid=make_uid(),
        reason="verification failed",
    )
    assert store.put_envelope(env)
    return store.get_envelope(envelope_id, "in"), path


def add_arrived(store: SQLiteStore, study: Study, peer: str = "site-b") -> Envelope:
    """Record an outgoing envelope of ``study`` whose receipt says it arrived."""
    envelope_id = str(uuid.uuid4())
    env = Envelope(
        id=envelope_id,
        direction="out",
        peer=peer,
        path=f"outbox/{envelope_id}.zip",
        size_bytes=2048,
        state="arrived",
        study_ref=study.ref,
        instance_count=study.instance_count,
        details={"receipt": {"delivered": study.instance_count, "refused": 0}},
    )
    assert store.put_envelope(env)
    return store.get_envelope(envelope_id, "out")


class ServedApp:
    """An aiohttp application served on a loopback port from a thread."""

    def __init__(self, app: web.Application):
        self.app = app
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self._loop = asyncio.new_event_loop()
        self._runner = web.AppRunner(app)
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def start(self) -> ServedApp:
        """Start serving; returns when the port accepts connections."""
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(10)
        return self

    async def _start(self) -> None:
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    def stop(self) -> None:
        """Stop serving and end the thread."""
        asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()


@dataclass
class Bridge:
    """What an operations test gets: the served app and what is behind it."""

    url: str
    ctx: OpsContext
    store: SQLiteStore
    spool: Path
    peer_breakers: BreakerBoard
    destination_breakers: BreakerBoard

    def get(self, path: str, token: str | None = ADMIN_TOKEN, **kw) -> httpx.Response:
        """GET ``path`` with the admin token (``token=None`` sends none)."""
        return self.request("GET", path, token, **kw)

    def request(
        self, method: str, path: str, token: str | None = ADMIN_TOKEN, **kw
    ) -> httpx.Response:
        """Make a request to the served app."""
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return httpx.request(method, self.url + path, headers=headers, timeout=10, **kw)


def build_bridge(
    tmp_path: Path, config: Config | None = None
) -> tuple[Bridge, ServedApp]:
    """Create a store, metrics and context, and serve the ops routes."""
    config = config or make_config()
    spool = tmp_path / "spool"
    for name in ("inbox", "quarantine", "outbox"):
        (spool / name).mkdir(parents=True, exist_ok=True)
    store = SQLiteStore(tmp_path / "state.db", busy_timeout=0.5)
    peers, dests = BreakerBoard(), BreakerBoard()
    metrics = Metrics(config)
    metrics.attach_state(
        store=store, spool_path=spool, peer_breakers=peers, destination_breakers=dests
    )
    ctx = OpsContext(
        config=config,
        store=store,
        metrics=metrics,
        spool_path=spool,
        peer_breakers=peers,
        destination_breakers=dests,
        checks=[store_writable(store), spool_has_room(spool, 0, 0.0)],
    )
    app = web.Application()
    add_ops_routes(app, ctx)
    served = ServedApp(app).start()
    return Bridge(served.url, ctx, store, spool, peers, dests), served


def served_bridge(tmp_path: Path, config: Config | None = None) -> Iterator[Bridge]:
    """Yield a served ops app over an empty store, then stop it (fixture body).

    Each test module wraps it in its own ``bridge`` fixture.
    """
    result, served = build_bridge(tmp_path, config)
    yield result
    served.stop()
    result.store.close()


@pytest.fixture
def bridge(tmp_path):
    """A served ops app over an empty store, with an admin token configured."""
    yield from served_bridge(tmp_path)


def test_served_app_answers_healthz_over_loopback(bridge):
    assert bridge.get("/healthz", token=None).json() == {"alive": True}
