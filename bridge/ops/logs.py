"""Structured logging: one line per event, ``key=value`` or JSON.

Every module logs ``event phrase key=value ...`` with lazy ``%`` arguments
(the house style). :func:`configure_logging` installs one handler on the root
logger whose formatter turns that into::

    ts=2025-01-31T09:12:03.120Z level=info logger=bridge.ingest.assembler
    event="study sealed" study=st-3f9a1c0e7b2d trigger=quiet-period instances=12

(one line, wrapped here), or the same fields as one JSON object. Exceptions
ride on the same line (their newlines escaped), so a log shipper never splits
an event.

:class:`RedactFilter` is the last line of defence, not the policy: callers
never log secrets, UIDs or patient values, but should one slip through, bearer
tokens, ``token=``/``password=`` values and non-standard DICOM UIDs are masked
before any handler writes the line.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import sys
import time
from typing import TextIO

from pynetdicom import _config as pynetdicom_config

_HANDLER_NAME = "jmix-bridge"

# A field starts at " key=" where key is a lower-case identifier.
_FIELD_START = re.compile(r"\s(?=[a-z_][a-z0-9_]*=)")
_FIELD = re.compile(r"^([a-z_][a-z0-9_]*)=(.*)$", re.DOTALL)

_SECRETS = (
    (re.compile(r"(?i)\b(bearer)\s+[A-Za-z0-9._~+/=-]+"), r"\1 ***"),
    (
        re.compile(
            r"(?i)\b([a-z_]*(?:token|password|passwd|secret|api_key))"
            r"(\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s,;&]+)"
        ),
        r"\1\2***",
    ),
)
# A DICOM UID (PS3.5 9.1) with at least five components. Standard UIDs under
# 1.2.840.10008 name SOP classes and transfer syntaxes, not people: kept.
# Four-component dotted quads (IPv4 addresses) are never touched.
_UID = re.compile(r"(?<![\d.])(?:0|[1-9]\d*)(?:\.(?:0|[1-9]\d*)){4,}(?![\d.])")
_STANDARD_UID_ROOT = "1.2.840.10008."


def mask_uid(uid: str) -> str:
    """Return an opaque stand-in for a UID: ``uid#`` and 10 hex digits of SHA-256."""
    return "uid#" + hashlib.sha256(uid.encode("ascii", "replace")).hexdigest()[:10]


def redact(text: str) -> str:
    """Mask secret-shaped values and non-standard UIDs in ``text``."""
    for pattern, replacement in _SECRETS:
        text = pattern.sub(replacement, text)

    def uid(match: re.Match) -> str:
        value = match.group(0)
        return value if value.startswith(_STANDARD_UID_ROOT) else mask_uid(value)

    return _UID.sub(uid, text)


class RedactFilter(logging.Filter):
    """Mask secrets and UIDs in every record the handler writes (never drops one)."""

    def filter(self, record: logging.LogRecord) -> bool:
        """Replace the record's message with its redacted form."""
        try:
            message = record.getMessage()
        except Exception:  # a bad format string must not lose the event
            message = f"{record.msg!s} (unformattable arguments)"
        record.msg = redact(message)
        record.args = None
        return True


def split_event(message: str) -> tuple[str, dict[str, str]]:
    """Split ``event phrase k=v k2=v with spaces`` into the phrase and fields.

    A value runs until the next `` key=``, so error texts with spaces survive.
    """
    parts = _FIELD_START.split(message.strip())
    first = _FIELD.match(parts[0])
    event = "" if first else parts[0]
    fields: dict[str, str] = {}
    for part in parts if first else parts[1:]:
        match = _FIELD.match(part)
        if match:  # always, by the split; kept as a guard
            fields[match.group(1)] = match.group(2)
    return event, fields


def _timestamp(record: logging.LogRecord) -> str:
    stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
    return f"{stamp}.{int(record.msecs):03d}Z"


class _EventFormatter(logging.Formatter):
    def fields(self, record: logging.LogRecord) -> dict[str, str]:
        event, fields = split_event(record.getMessage())
        out = {
            "ts": _timestamp(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "event": event,
        }
        for key, value in fields.items():
            out[key if key not in out else f"field_{key}"] = value
        if record.exc_info:
            out["exc"] = redact(self.formatException(record.exc_info))
        if record.stack_info:
            out["stack"] = redact(self.formatStack(record.stack_info))
        return out


class KeyValueFormatter(_EventFormatter):
    """One ``key=value`` line per event; values with spaces or quotes are quoted."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line."""
        return " ".join(
            f"{key}={_kv_value(value)}" for key, value in self.fields(record).items()
        )


class JsonFormatter(_EventFormatter):
    """One JSON object per line per event."""

    def format(self, record: logging.LogRecord) -> str:
        """Return the record as one line of JSON."""
        return json.dumps(self.fields(record), ensure_ascii=False)


def _kv_value(value: str) -> str:
    if value and not re.search(r'[\s"=\\]', value):
        return value
    escaped = (
        value.replace("\\", "\\\\")
        .replace('"', '\\"')
        .replace("\n", "\\n")
        .replace("\r", "\\r")
        .replace("\t", "\\t")
    )
    return f'"{escaped}"'


def configure_logging(
    level: str = "INFO", fmt: str = "kv", stream: TextIO | None = None
) -> logging.Handler:
    """Install the bridge's one log handler on the root logger and return it.

    Replaces a handler this function installed before (so tests and restarts
    can call it again) and leaves other handlers alone. Turns off pynetdicom's
    logging of request and response identifiers and keeps its logger at
    WARNING; with ``level="DEBUG"`` it goes to INFO, not DEBUG, because
    pynetdicom's DEBUG dump prints user-identity passwords of associations.
    """
    if fmt not in ("kv", "json"):
        raise ValueError(f"log format: expected 'kv' or 'json', got {fmt!r}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KeyValueFormatter())
    handler.addFilter(RedactFilter())

    root = logging.getLogger()
    for old in list(root.handlers):
        if old.get_name() == _HANDLER_NAME:
            root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())

    quiet_pynetdicom(debug=level.upper() == "DEBUG")
    return handler


def quiet_pynetdicom(*, debug: bool = False) -> None:
    """Turn off pynetdicom's identifier logging and raise its logger's level."""
    pynetdicom_config.LOG_REQUEST_IDENTIFIERS = False
    pynetdicom_config.LOG_RESPONSE_IDENTIFIERS = False
    logging.getLogger("pynetdicom").setLevel(logging.INFO if debug else logging.WARNING)
    # httpx logs every request line at INFO; the bridge logs its own events.
    for name in ("httpx", "httpcore"):
        logging.getLogger(name).setLevel(logging.DEBUG if debug else logging.WARNING)
