"""What the operations routes need from the running bridge, in one object."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

from aiohttp import web

from bridge.config import Config
from bridge.ops.health import Check
from bridge.ops.metrics import Metrics
from bridge.store.base import Store
from bridge.workers.policy import BreakerBoard


@dataclass
class OpsContext:
    """The store, metrics, configuration and live state behind the ops routes.

    ``checks`` are the readiness checks of ``/readyz`` (see
    :mod:`bridge.ops.health`); the daemon builds them because it knows whether
    the listener is bound and the keys are loaded. ``admin_token`` defaults to
    ``config.http.admin_token``; empty disables the admin API.
    """

    config: Config
    store: Store
    metrics: Metrics
    spool_path: Path
    peer_breakers: BreakerBoard | None = None
    destination_breakers: BreakerBoard | None = None
    checks: list[Check] = field(default_factory=list)
    admin_token: str | None = field(default=None, repr=False)
    started_at: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        if self.admin_token is None:
            self.admin_token = str(self.config.http.admin_token or "")
        self.spool_path = Path(self.spool_path)


# Where add_ops_routes keeps the context on the aiohttp application.
OPS_CONTEXT = web.AppKey("jmix_bridge_ops", OpsContext)
