"""The admin API under ``/admin/api/``: look at the bridge and act on it.

Every route needs ``Authorization: Bearer <http.admin_token>``, a credential of
its own (not a peer's token). With no admin token configured the API answers
403 and says how to enable it. Tokens are compared with
:func:`hmac.compare_digest`.

Routes::

    GET    /admin/api/status                     summary (see bridge.ops.views)
    GET    /admin/api/jobs?queue=&state=&limit=  jobs, oldest first
    POST   /admin/api/jobs/{id}/retry            dead-lettered job -> ready now
    GET    /admin/api/quarantine                 quarantined envelopes
    POST   /admin/api/quarantine/{id}/release    back to the inbox, open again
    DELETE /admin/api/quarantine/{id}            delete the file, keep the record
    GET    /admin/api/studies?limit=             recent studies by opaque reference

A release moves the file from ``quarantine/`` back to ``inbox/``, sets the
envelope's state to ``stored`` and enqueues a fresh ``open`` job whose payload
says ``released: true``. A delete is an operator's explicit decision: the file
is removed and the record stays, in state ``deleted`` with who-and-when in its
details, so the decision is on record. Every action is logged.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from pathlib import Path

from aiohttp import web

from bridge.errors import SpoolError
from bridge.ops import views
from bridge.ops.context import OPS_CONTEXT, OpsContext
from bridge.spool import fsync_rename, validate_envelope_id
from bridge.store.base import JobState, NewJob

logger = logging.getLogger(__name__)

PREFIX = "/admin/api"
OPEN_QUEUE = "open"
_MAX_LIMIT = 1000


def add_admin_routes(app: web.Application, ctx: OpsContext) -> None:
    """Add the admin API routes to ``app``."""
    app[OPS_CONTEXT] = ctx
    app.router.add_get(f"{PREFIX}/status", _guarded(status))
    app.router.add_get(f"{PREFIX}/jobs", _guarded(jobs))
    app.router.add_post(f"{PREFIX}/jobs/{{job_id}}/retry", _guarded(retry))
    app.router.add_get(f"{PREFIX}/quarantine", _guarded(quarantine_list))
    app.router.add_post(
        f"{PREFIX}/quarantine/{{envelope_id}}/release", _guarded(quarantine_release)
    )
    app.router.add_delete(
        f"{PREFIX}/quarantine/{{envelope_id}}", _guarded(quarantine_delete)
    )
    app.router.add_get(f"{PREFIX}/studies", _guarded(studies))


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers)


def _guarded(handler):
    """Wrap ``handler`` with the admin-token check."""

    async def guarded(request: web.Request) -> web.StreamResponse:
        ctx = request.app[OPS_CONTEXT]
        if not ctx.admin_token:
            return _error(
                403,
                "admin API disabled: set http.admin_token in the configuration "
                "or JMIX_BRIDGE_ADMIN_TOKEN in the environment",
            )
        header = request.headers.get("Authorization", "")
        scheme, _, offered = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(
            offered.strip().encode(), ctx.admin_token.encode()
        ):
            logger.warning(
                "admin request refused remote=%s path=%s",
                request.remote,
                request.path,
            )
            return _error(
                401, "admin token missing or wrong", **{"WWW-Authenticate": "Bearer"}
            )
        return await handler(request, ctx)

    return guarded


def _limit(request: web.Request, default: int) -> int:
    raw = request.query.get("limit", str(default))
    try:
        value = int(raw)
    except ValueError:
        raise web.HTTPBadRequest(
            text=f"limit: expected an integer 1-{_MAX_LIMIT}, got {raw[:20]!r}"
        ) from None
    return max(1, min(value, _MAX_LIMIT))


async def status(request: web.Request, ctx: OpsContext) -> web.Response:
    """Return the status summary."""
    return web.json_response(await asyncio.to_thread(views.summary, ctx))


async def jobs(request: web.Request, ctx: OpsContext) -> web.Response:
    """Return jobs filtered by queue and state, oldest first."""
    queue = request.query.get("queue") or None
    state = request.query.get("state") or None
    if state is not None and state not in {s.value for s in JobState}:
        return _error(
            400,
            f"state: expected one of {', '.join(s.value for s in JobState)}, "
            f"got {state[:20]!r}",
        )
    found = await asyncio.to_thread(
        ctx.store.list_jobs,
        queue=queue,
        state=JobState(state) if state else None,
        limit=_limit(request, 100),
    )
    return web.json_response({"jobs": [views.job_row(j) for j in found]})


async def retry(request: web.Request, ctx: OpsContext) -> web.Response:
    """Make a dead-lettered job ready now, attempts reset."""
    try:
        job_id = int(request.match_info["job_id"])
    except ValueError:
        return _error(400, "job id: expected an integer")
    job = await asyncio.to_thread(ctx.store.get_job, job_id)
    if job is None:
        return _error(404, f"no job {job_id}")
    if not await asyncio.to_thread(ctx.store.requeue, job_id):
        return _error(
            409, f"job {job_id} is {job.state.value}: only dead jobs are retried"
        )
    logger.info(
        "job requeued by operator job=%d queue=%s target=%s",
        job_id,
        job.queue,
        job.target,
    )
    job = await asyncio.to_thread(ctx.store.get_job, job_id)
    return web.json_response({"job": views.job_row(job)})


async def quarantine_list(request: web.Request, ctx: OpsContext) -> web.Response:
    """Return the quarantined envelopes."""
    return web.json_response(
        {"quarantine": await asyncio.to_thread(views.quarantine, ctx)}
    )


def _quarantined(ctx: OpsContext, envelope_id: str):
    try:
        envelope_id = validate_envelope_id(envelope_id)
    except SpoolError:
        return None
    env = ctx.store.get_envelope(envelope_id, "in")
    return env if env is not None and env.state == "quarantined" else None


def _spool_file(ctx: OpsContext, rel: str) -> Path | None:
    """Return the spool file a record names, if it is safely inside the spool."""
    if not rel:
        return None
    root = ctx.spool_path.resolve()
    path = (root / rel).resolve()
    return path if path.is_relative_to(root) else None


def _release(ctx: OpsContext, envelope_id: str) -> dict | None:
    env = _quarantined(ctx, envelope_id)
    if env is None:
        return None
    releases = int(env.details.get("releases", 0)) + 1

    # Back to the inbox, where the open step looks for received envelopes.
    path = env.path
    src = _spool_file(ctx, env.path)
    if src is not None and src.is_file() and src.parent.name == "quarantine":
        dest = ctx.spool_path.resolve() / "inbox" / f"{env.id}.zip"
        dest.parent.mkdir(parents=True, exist_ok=True)
        fsync_rename(src, dest)
        path = f"inbox/{env.id}.zip"
    details = {**env.details, "releases": releases, "released_at": time.time()}
    key = f"open:{env.id}:release:{releases}"
    # One transaction: a crash cannot leave a stored envelope with no open job.
    ctx.store.set_envelope_state(
        env.id,
        "in",
        "stored",
        reason="released by operator",
        details=details,
        path=path,
        jobs=[
            NewJob(
                queue=OPEN_QUEUE,
                key=key,
                payload={"envelope_id": env.id, "sender": env.peer, "released": True},
            )
        ],
    )
    job = ctx.store.list_jobs(key_prefix=key, limit=1)[0]
    logger.warning(
        "quarantined envelope released by operator envelope=%s sender=%s job=%d",
        env.id,
        env.peer,
        job.id,
    )
    return {
        "envelope": views.envelope_row(ctx.store.get_envelope(env.id, "in")),
        "job": views.job_row(job),
    }


async def _on_quarantined(request: web.Request, ctx: OpsContext, action):
    result = await asyncio.to_thread(action, ctx, request.match_info["envelope_id"])
    if result is None:
        return _error(404, "no quarantined envelope with that id")
    return web.json_response(result)


async def quarantine_release(request: web.Request, ctx: OpsContext) -> web.Response:
    """Release a quarantined envelope: back to the inbox and open it again."""
    return await _on_quarantined(request, ctx, _release)


def _delete(ctx: OpsContext, envelope_id: str) -> dict | None:
    env = _quarantined(ctx, envelope_id)
    if env is None:
        return None
    path = _spool_file(ctx, env.path)
    if path is not None:
        path.unlink(missing_ok=True)
    details = {**env.details, "deleted_at": time.time(), "deleted_by": "operator"}
    ctx.store.set_envelope_state(
        env.id, "in", "deleted", reason="deleted by operator", details=details
    )
    logger.warning(
        "quarantined envelope deleted by operator envelope=%s sender=%s",
        env.id,
        env.peer,
    )
    return {"envelope": views.envelope_row(ctx.store.get_envelope(env.id, "in"))}


async def quarantine_delete(request: web.Request, ctx: OpsContext) -> web.Response:
    """Delete a quarantined envelope's file; its record stays, state ``deleted``."""
    return await _on_quarantined(request, ctx, _delete)


async def studies(request: web.Request, ctx: OpsContext) -> web.Response:
    """Return the most recently active studies, newest first."""
    found = await asyncio.to_thread(views.study_rows, ctx.store, _limit(request, 50))
    return web.json_response({"studies": found})
