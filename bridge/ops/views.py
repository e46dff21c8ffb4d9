"""The operator's view of the bridge, as plain dicts for the admin API and page.

One place decides what an operator sees: opaque study references, counts,
times, states and reasons, never a UID, a patient value or a job payload. Free
texts written by other components (errors, reasons) pass through
:func:`bridge.ops.logs.redact` on the way out, in case one quoted a UID.
"""

from __future__ import annotations

import time
from collections.abc import Iterable

from bridge import __version__
from bridge.ops.context import OpsContext
from bridge.ops.logs import redact
from bridge.receiving.receipts import ARRIVED
from bridge.store.base import Envelope, Job, JobState, Store, Study

QUARANTINE_LIMIT = 500
DELIVERY_LIMIT = 1000


def queue_rows(ctx: OpsContext, now: float | None = None) -> list[dict]:
    """Return one row per queue and target: job counts by state, oldest waiting."""
    now = time.time() if now is None else now
    rows: dict[tuple[str, str], dict] = {}
    for c in ctx.store.job_counts():
        row = rows.setdefault(
            (c.queue, c.target),
            {
                "queue": c.queue,
                "target": c.target,
                **{s.value: 0 for s in JobState},
                "oldest_waiting_seconds": None,
            },
        )
        row[c.state.value] += c.count
        if c.state in (JobState.READY, JobState.LEASED) and c.oldest_created:
            age = round(max(0.0, now - c.oldest_created), 1)
            old = row["oldest_waiting_seconds"]
            row["oldest_waiting_seconds"] = age if old is None else max(old, age)
    return [rows[k] for k in sorted(rows)]


def circuit_rows(ctx: OpsContext) -> dict[str, list[dict]]:
    """Return the configured peers and destinations with their circuit state."""
    peer_states = ctx.peer_breakers.states() if ctx.peer_breakers else {}
    dest_states = ctx.destination_breakers.states() if ctx.destination_breakers else {}
    return {
        "peers": [
            {
                "name": p.name,
                "transport": p.transport,
                "circuit": peer_states.get(p.name, "closed"),
            }
            for p in ctx.config.peers
        ],
        "destinations": [
            {
                "name": d.name,
                "ae_title": d.ae_title,
                "circuit": dest_states.get(d.name, "closed"),
            }
            for d in ctx.config.destinations
        ],
    }


def delivery_rows(store: Store, refs: Iterable[str]) -> dict[str, list[dict]]:
    """Return, by study reference, the outgoing envelopes of those studies.

    Each row says which peer it went to, its state (``built``, ``delivered``,
    ``arrived`` once the receiving side's signed receipt says the instances
    reached its PACS) and the receipt's counts. Looks among the newest
    ``DELIVERY_LIMIT`` outgoing envelopes only.
    """
    wanted = set(refs)
    found: dict[str, list[dict]] = {}
    for env in store.find_envelopes(direction="out", limit=DELIVERY_LIMIT):
        if env.study_ref not in wanted:
            continue
        receipt = env.details.get("receipt") or {}
        found.setdefault(env.study_ref, []).append(
            {
                "id": env.id,
                "peer": env.peer,
                "state": env.state,
                "arrived": env.state == ARRIVED,
                "delivered": receipt.get("delivered"),
                "refused": receipt.get("refused"),
            }
        )
    return found


def delivery_text(envelopes: list[dict]) -> str:
    """Return one line on where a study's envelopes are.

    For example ``site-b arrived (12 stored)``.
    """
    parts = []
    for env in sorted(envelopes, key=lambda e: (e["peer"], e["id"])):
        text = f"{env['peer']} {env['state']}"
        if env["arrived"]:
            text += f" ({env['delivered']} stored"
            text += f", {env['refused']} refused)" if env["refused"] else ")"
        parts.append(text)
    return ", ".join(parts)


def study_rows(store: Store, limit: int) -> list[dict]:
    """Return the most recently active studies with their deliveries, newest first."""
    studies = store.recent_studies(limit)
    deliveries = delivery_rows(store, (s.ref for s in studies))
    return [study_row(s, deliveries.get(s.ref, [])) for s in studies]


def study_row(study: Study, envelopes: list[dict] | None = None) -> dict:
    """Return what an operator sees of a study: its reference, counts, timings.

    ``envelopes`` are its outgoing envelopes (:func:`delivery_rows`);
    ``arrived`` is true once every one of them has arrived.
    """
    assembly = (
        round(study.sealed_at - study.first_received, 3)
        if study.sealed_at is not None
        else None
    )
    return {
        "ref": study.ref,
        "route": study.route,
        "generation": study.generation,
        "state": study.state.value,
        "calling_ae": study.calling_ae,
        "instances": study.instance_count,
        "size_bytes": study.size_bytes,
        "first_received": study.first_received,
        "last_received": study.last_received,
        "sealed_at": study.sealed_at,
        "assembly_seconds": assembly,
        "seal_trigger": study.seal_trigger,
        "hold_reason": redact(study.hold_reason),
        "envelopes": envelopes or [],
        "arrived": bool(envelopes) and all(e["arrived"] for e in envelopes),
        "delivery": delivery_text(envelopes or []),
    }


def envelope_row(env: Envelope) -> dict:
    """Return what an operator sees of an envelope (no study UID, no path)."""
    return {
        "id": env.id,
        "direction": env.direction,
        "peer": env.peer,
        "state": env.state,
        "size_bytes": env.size_bytes,
        "study_ref": env.study_ref,
        "instances": env.instance_count,
        "reason": redact(env.reason),
        "created_at": env.created_at,
        "updated_at": env.updated_at,
    }


def job_row(job: Job) -> dict:
    """Return what an operator sees of a job (no payload)."""
    return {
        "id": job.id,
        "queue": job.queue,
        "target": job.target,
        "state": job.state.value,
        "key": redact(job.key),
        "attempts": job.attempts,
        "created_at": job.created_at,
        "updated_at": job.updated_at,
        "not_before": job.not_before,
        "last_error": redact(job.last_error),
    }


def quarantine(ctx: OpsContext) -> list[dict]:
    """Return the received envelopes kept in quarantine, newest first."""
    return [
        envelope_row(e)
        for e in ctx.store.find_envelopes(
            direction="in", state="quarantined", limit=QUARANTINE_LIMIT
        )
    ]


def summary(ctx: OpsContext, now: float | None = None) -> dict:
    """Return the status summary: node, queues, circuits, open studies, quarantine."""
    now = time.time() if now is None else now
    queues = queue_rows(ctx, now)
    return {
        "node": {
            "id": ctx.config.node.id,
            "name": ctx.config.node.name,
            "version": __version__,
            "uptime_seconds": round(now - ctx.started_at, 1),
        },
        "queues": queues,
        **circuit_rows(ctx),
        "studies_open": len(ctx.store.open_studies()),
        "dead_letter_jobs": sum(row["dead"] for row in queues),
        "quarantined_envelopes": len(quarantine(ctx)),
    }
