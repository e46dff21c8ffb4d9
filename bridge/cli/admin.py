"""Admin verbs: ask a running bridge through its admin API.

``jmix-bridge status``, ``jobs``, ``retry JOB_ID``, ``quarantine list|release
ID|delete ID`` and ``studies`` each make one request to ``/admin/api/...`` and
print a table, or the JSON answer with ``--json``. The bridge's URL comes from
``--url`` or the ``http`` section of ``-c CONFIG``; the admin token from
``--token``, the environment variable ``JMIX_BRIDGE_ADMIN_TOKEN`` or the
configuration, in that order.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from typing import Any
from urllib.parse import quote

import httpx

from bridge.cli import EXIT_FAILURE, EXIT_OK, EXIT_USAGE
from bridge.errors import ConfigError

TOKEN_ENV = "JMIX_BRIDGE_ADMIN_TOKEN"  # noqa: S105 (a variable name, not a secret)


def register(subparsers) -> None:
    """Add the admin verbs to the top-level parser."""
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("-c", "--config", help="the bridge's configuration file")
    common.add_argument("--url", help="the bridge's HTTP base URL")
    common.add_argument(
        "--token", help=f"admin token (default: ${TOKEN_ENV}, then the config)"
    )
    common.add_argument("--json", action="store_true", help="print the JSON answer")
    common.add_argument(
        "--timeout", type=float, default=10.0, help="seconds to wait (default 10)"
    )

    p = subparsers.add_parser(
        "status", parents=[common], help="show a running bridge's status"
    )
    p.set_defaults(handler=cmd_status)

    p = subparsers.add_parser("jobs", parents=[common], help="list jobs")
    p.add_argument("--queue", help="only this queue (seal, deliver, open, ...)")
    p.add_argument(
        "--state", choices=["ready", "leased", "done", "dead"], help="only this state"
    )
    p.add_argument("--limit", type=int, default=100)
    p.set_defaults(handler=cmd_jobs)

    p = subparsers.add_parser(
        "retry", parents=[common], help="send a dead-lettered job again"
    )
    p.add_argument("job_id", type=int)
    p.set_defaults(handler=cmd_retry)

    p = subparsers.add_parser(
        "quarantine", help="list, release or delete quarantined envelopes"
    )
    actions = p.add_subparsers(dest="action", metavar="ACTION", required=True)
    q = actions.add_parser("list", parents=[common], help="list quarantine")
    q.set_defaults(handler=cmd_quarantine_list)
    q = actions.add_parser(
        "release", parents=[common], help="open a quarantined envelope again"
    )
    q.add_argument("envelope_id")
    q.set_defaults(handler=cmd_quarantine_release)
    q = actions.add_parser(
        "delete", parents=[common], help="delete a quarantined envelope's file"
    )
    q.add_argument("envelope_id")
    q.set_defaults(handler=cmd_quarantine_delete)

    p = subparsers.add_parser(
        "studies", parents=[common], help="list recent studies by reference"
    )
    p.add_argument("--limit", type=int, default=50)
    p.set_defaults(handler=cmd_studies)


# -- talking to the bridge ---------------------------------------------------------


class AdminClientError(Exception):
    """A request failed; ``exit_code`` says how the command should end."""

    def __init__(self, message: str, exit_code: int = EXIT_FAILURE):
        super().__init__(message)
        self.exit_code = exit_code


def _endpoint(args) -> tuple[str, str]:
    """Return the base URL and admin token from the arguments, env and config."""
    url, token = args.url, args.token or os.environ.get(TOKEN_ENV, "")
    if args.config and (not url or not token):
        from bridge.config import load_config

        try:
            config = load_config(args.config, check_files=False)
        except ConfigError as exc:
            raise AdminClientError(f"{args.config}: {exc}", EXIT_USAGE) from exc
        if not url:
            scheme = "https" if config.http.tls else "http"
            host = config.http.host
            if host in ("0.0.0.0", "::", ""):  # noqa: S104 (listens everywhere)
                host = "127.0.0.1"
            host = f"[{host}]" if ":" in host else host
            url = f"{scheme}://{host}:{config.http.port}"
        token = token or str(config.http.admin_token)
    if not url:
        url = "http://127.0.0.1:8080"
    if not token:
        raise AdminClientError(
            f"no admin token: pass --token, set {TOKEN_ENV} or use -c CONFIG",
            EXIT_USAGE,
        )
    return url.rstrip("/"), token


def request(args, method: str, path: str, params: dict | None = None) -> Any:
    """Make one admin API request and return its JSON body; raise AdminClientError."""
    url, token = _endpoint(args)
    try:
        response = httpx.request(
            method,
            f"{url}/admin/api{path}",
            params={k: v for k, v in (params or {}).items() if v is not None},
            headers={"Authorization": f"Bearer {token}"},
            timeout=args.timeout,
        )
    except httpx.HTTPError as exc:
        raise AdminClientError(f"{url}: cannot reach the bridge: {exc}") from exc
    try:
        body = response.json()
    except ValueError:
        body = {"error": response.text[:200]}
    if response.status_code >= 400:
        raise AdminClientError(
            f"{method} {path}: HTTP {response.status_code}: "
            f"{body.get('error', '') if isinstance(body, dict) else body}"
        )
    return body


def _run(args, method: str, path: str, show, params: dict | None = None) -> int:
    try:
        body = request(args, method, path, params)
    except AdminClientError as exc:
        print(f"jmix-bridge: {exc}", file=sys.stderr)
        return exc.exit_code
    if args.json:
        print(json.dumps(body, indent=2, sort_keys=True))
    else:
        show(body)
    return EXIT_OK


# -- printing --------------------------------------------------------------------------


def table(rows: list[dict], columns: list[tuple[str, str]]) -> str:
    """Return ``rows`` as a plain text table with the given (key, heading) columns."""
    cells = [[heading for _, heading in columns]] + [
        ["" if row.get(key) is None else str(row.get(key)) for key, _ in columns]
        for row in rows
    ]
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)) for r in cells
    ]
    return "\n".join(line.rstrip() for line in lines)


def _when(ts: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(ts)) if ts else ""


def _show_status(body: dict) -> None:
    node = body["node"]
    print(
        f"{node['name']} ({node['id']}) version {node['version']}, "
        f"up {node['uptime_seconds']:.0f} s"
    )
    print(
        f"open studies: {body['studies_open']}  dead-letter jobs: "
        f"{body['dead_letter_jobs']}  quarantined envelopes: "
        f"{body['quarantined_envelopes']}"
    )
    print("\nqueues")
    print(
        table(
            body["queues"],
            [
                ("queue", "QUEUE"),
                ("target", "TARGET"),
                ("ready", "READY"),
                ("leased", "LEASED"),
                ("dead", "DEAD"),
                ("done", "DONE"),
                ("oldest_waiting_seconds", "OLDEST_S"),
            ],
        )
    )
    circuits = [{"kind": "peer", **p} for p in body["peers"]] + [
        {"kind": "destination", **d} for d in body["destinations"]
    ]
    print("\npeers and destinations")
    print(table(circuits, [("kind", "KIND"), ("name", "NAME"), ("circuit", "CIRCUIT")]))


def _show_jobs(body: dict) -> None:
    print(
        table(
            body["jobs"],
            [
                ("id", "ID"),
                ("queue", "QUEUE"),
                ("target", "TARGET"),
                ("state", "STATE"),
                ("attempts", "ATTEMPTS"),
                ("last_error", "LAST ERROR"),
            ],
        )
    )


def _show_job(body: dict) -> None:
    job = body["job"]
    print(f"job {job['id']} ({job['queue']}) is {job['state']} again")


def _show_quarantine(body: dict) -> None:
    rows = [{**e, "received": _when(e["created_at"])} for e in body["quarantine"]]
    print(
        table(
            rows,
            [
                ("id", "ENVELOPE"),
                ("peer", "SENDER"),
                ("size_bytes", "BYTES"),
                ("received", "RECEIVED"),
                ("reason", "REASON"),
            ],
        )
    )


def _show_envelope(body: dict) -> None:
    env = body["envelope"]
    extra = f", open job {body['job']['id']}" if "job" in body else ""
    print(f"envelope {env['id']} is {env['state']}{extra}")


def _show_studies(body: dict) -> None:
    rows = [{**s, "last": _when(s["last_received"])} for s in body["studies"]]
    print(
        table(
            rows,
            [
                ("ref", "STUDY"),
                ("route", "ROUTE"),
                ("state", "STATE"),
                ("instances", "INSTANCES"),
                ("size_bytes", "BYTES"),
                ("last", "LAST RECEIVED"),
                ("assembly_seconds", "ASSEMBLY_S"),
                ("delivery", "DELIVERY"),
            ],
        )
    )


# -- the verbs -------------------------------------------------------------------------


def cmd_status(args) -> int:
    """Print the status summary."""
    return _run(args, "GET", "/status", _show_status)


def cmd_jobs(args) -> int:
    """Print jobs by queue and state."""
    params = {"queue": args.queue, "state": args.state, "limit": args.limit}
    return _run(args, "GET", "/jobs", _show_jobs, params)


def cmd_retry(args) -> int:
    """Make a dead-lettered job ready again."""
    return _run(args, "POST", f"/jobs/{args.job_id}/retry", _show_job)


def cmd_quarantine_list(args) -> int:
    """Print the quarantined envelopes."""
    return _run(args, "GET", "/quarantine", _show_quarantine)


def cmd_quarantine_release(args) -> int:
    """Release a quarantined envelope to be opened again."""
    return _run(
        args,
        "POST",
        f"/quarantine/{quote(args.envelope_id, safe='')}/release",
        _show_envelope,
    )


def cmd_quarantine_delete(args) -> int:
    """Delete a quarantined envelope's file."""
    return _run(
        args,
        "DELETE",
        f"/quarantine/{quote(args.envelope_id, safe='')}",
        _show_envelope,
    )


def cmd_studies(args) -> int:
    """Print recent studies by opaque reference."""
    return _run(args, "GET", "/studies", _show_studies, {"limit": args.limit})
