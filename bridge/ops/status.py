"""The read-only status page at ``/status``: server-rendered HTML, no scripts.

It shows what :mod:`bridge.ops.views` exposes (queues, peers and destinations
with their circuit state, recent studies by opaque reference, quarantine) and
refreshes itself with a meta tag. Every value is escaped with
:func:`html.escape`; the page carries a Content-Security-Policy that forbids
scripts, so even a value that slipped through could not run.
"""

from __future__ import annotations

import asyncio
import time
from html import escape
from importlib import resources
from string import Template

from aiohttp import web

from bridge.ops import views
from bridge.ops.context import OPS_CONTEXT, OpsContext

REFRESH_SECONDS = 15
STUDY_LIMIT = 50
_CSP = (
    "default-src 'none'; style-src 'unsafe-inline'; base-uri 'none'; form-action 'none'"
)


def _template() -> Template:
    text = (
        resources.files("bridge.ops")
        .joinpath("templates/status.html")
        .read_text(encoding="utf-8")
    )
    return Template(text)


def _cell(value, css: str = "") -> str:
    text = "" if value is None else str(value)
    cls = f' class="{escape(css)}"' if css else ""
    return f"<td{cls}>{escape(text)}</td>"


def _state(value: str, extra: str = "") -> str:
    css = f"state {value} {extra}".strip()
    return f'<td><span class="{escape(css)}">{escape(value)}</span></td>'


def _rows(rows: list[str], columns: int, empty: str) -> str:
    if not rows:
        return f'<tr><td colspan="{columns}" class="empty">{escape(empty)}</td></tr>'
    return "\n".join(rows)


def duration(seconds: float | None) -> str:
    """Return a short human duration: ``42 s``, ``3 min``, ``5.2 h``, ``2.0 d``."""
    if seconds is None:
        return ""
    if seconds < 120:
        return f"{seconds:.0f} s"
    if seconds < 7200:
        return f"{seconds / 60:.0f} min"
    if seconds < 172800:
        return f"{seconds / 3600:.1f} h"
    return f"{seconds / 86400:.1f} d"


def size(nbytes: int) -> str:
    """Return a short human size in binary units."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"  # pragma: no cover (the loop returns at GiB)


def clock(ts: float | None) -> str:
    """Return a UTC time stamp for a POSIX time, or an empty string."""
    if not ts:
        return ""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def render_status(ctx: OpsContext, now: float | None = None) -> str:
    """Return the status page as HTML; blocking (reads the store)."""
    now = time.time() if now is None else now
    info = views.summary(ctx, now)
    circuits = views.circuit_rows(ctx)
    recent = views.study_rows(ctx.store, STUDY_LIMIT)
    quarantined = views.quarantine(ctx)

    queue_rows = [
        "<tr>"
        + _cell(q["queue"])
        + _cell(q["target"] or "—")
        + _cell(q["ready"], "num")
        + _cell(q["leased"], "num")
        + _cell(q["dead"], "num" + (" bad" if q["dead"] else ""))
        + _cell(q["done"], "num")
        + _cell(duration(q["oldest_waiting_seconds"]), "num")
        + "</tr>"
        for q in info["queues"]
    ]
    circuit_rows = [
        "<tr>"
        + _cell("peer")
        + _cell(p["name"])
        + _cell(p["transport"])
        + _state(p["circuit"], "circuit")
        + "</tr>"
        for p in circuits["peers"]
    ] + [
        "<tr>"
        + _cell("destination")
        + _cell(d["name"])
        + _cell(d["ae_title"])
        + _state(d["circuit"], "circuit")
        + "</tr>"
        for d in circuits["destinations"]
    ]
    study_rows = [
        f'<tr data-ref="{escape(s["ref"])}">'
        + f'<td><code class="ref">{escape(s["ref"])}</code></td>'
        + _cell(s["route"])
        + _cell(s["generation"], "num")
        + _state(s["state"])
        + _cell(s["calling_ae"])
        + _cell(s["instances"], "num")
        + _cell(size(s["size_bytes"]), "num")
        + _cell(clock(s["last_received"]))
        + _cell(duration(s["assembly_seconds"]), "num")
        + _cell(s["hold_reason"] or s["seal_trigger"])
        + _cell(s["delivery"], "delivery arrived" if s["arrived"] else "delivery")
        + "</tr>"
        for s in recent
    ]
    quarantine_rows = [
        "<tr>"
        + f"<td><code>{escape(e['id'])}</code></td>"
        + _cell(e["peer"])
        + _cell(size(e["size_bytes"]), "num")
        + _cell(clock(e["created_at"]))
        + _cell(e["reason"])
        + "</tr>"
        for e in quarantined
    ]

    node = info["node"]
    return _template().substitute(
        refresh_seconds=REFRESH_SECONDS,
        node_name=escape(node["name"]),
        node_id=escape(node["id"]),
        version=escape(node["version"]),
        uptime=escape(duration(node["uptime_seconds"])),
        generated=escape(clock(now)),
        studies_open=info["studies_open"],
        dead_letter=info["dead_letter_jobs"],
        quarantined=info["quarantined_envelopes"],
        queue_rows=_rows(queue_rows, 7, "no jobs"),
        circuit_rows=_rows(circuit_rows, 4, "no peers or destinations configured"),
        study_rows=_rows(study_rows, 11, "no studies yet"),
        quarantine_rows=_rows(quarantine_rows, 5, "quarantine is empty"),
    )


async def status_page(request: web.Request) -> web.Response:
    """Serve the status page."""
    ctx = request.app[OPS_CONTEXT]
    page = await asyncio.to_thread(render_status, ctx)
    return web.Response(
        text=page,
        content_type="text/html",
        charset="utf-8",
        headers={
            "Content-Security-Policy": _CSP,
            "Cache-Control": "no-store",
            "X-Content-Type-Options": "nosniff",
        },
    )
