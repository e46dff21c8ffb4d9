"""The operations routes on the daemon's HTTP server.

``add_ops_routes(app, ctx)`` adds ``/metrics``, ``/healthz``, ``/readyz``,
``/status`` and the admin API (``/admin/api/...``) to an application the
daemon creates together with the peer API. Handlers that read the store or
the disk run in a worker thread so that the event loop keeps serving.
"""

from __future__ import annotations

import asyncio

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from bridge.ops.admin import add_admin_routes
from bridge.ops.context import OPS_CONTEXT, OpsContext
from bridge.ops.health import run_checks
from bridge.ops.status import status_page


def add_ops_routes(app: web.Application, ctx: OpsContext) -> None:
    """Add every operations route to ``app`` (before it starts)."""
    app[OPS_CONTEXT] = ctx
    app.router.add_get("/metrics", metrics)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/status", status_page)
    add_admin_routes(app, ctx)


async def metrics(request: web.Request) -> web.Response:
    """Serve the Prometheus text exposition."""
    ctx = request.app[OPS_CONTEXT]
    body = await asyncio.to_thread(ctx.metrics.exposition)
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})


async def healthz(request: web.Request) -> web.Response:
    """Answer 200 while the process serves HTTP."""
    return web.json_response({"alive": True})


async def readyz(request: web.Request) -> web.Response:
    """Answer 200 when every readiness check passes, else 503 naming the failures."""
    ctx = request.app[OPS_CONTEXT]
    result = await asyncio.to_thread(run_checks, ctx.checks)
    return web.json_response(result.as_json(), status=200 if result.ready else 503)
