"""The forward progress log: which instances a destination has answered for good.

A forward job keeps its progress in its payload, which the store records only
when the job ends. So that a crash before then does not send again what the
PACS already answered, the forwarder also appends one line to this log per
instance, as soon as its C-STORE response says delivered or refused for good
and before the next instance goes out; a run of the job reads the log first and
leaves out what it records (``bridge/receiving/forwarding.py``).

One log per envelope and destination, ``opened/<envelope id>.progress/<name>.log``:
beside the opened payload, not inside it, so that no file an envelope carries
can pose as a log. The destination's name is checked before it names a file.
Each line is one JSON object: ``{"path": ..., "outcome": "delivered", ...}`` with
the path relative to the opened folder, ``outcome`` one of ``delivered``,
``permanent`` (with ``reason``) and ``resend``, a line without a path that
cancels the refusals before it (an operator asked to try them again).

Lines are written with one ``os.write`` each and no fsync, so the sending path
pays no disk flush per instance. A SIGKILL leaves what was written in the page
cache, which reaches the disk all the same; a power cut may lose the last
lines, which costs only those instances a repeat. A line cut short is ignored.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from bridge.errors import SpoolError

DELIVERED, PERMANENT, RESEND = "delivered", "permanent", "resend"

# As config_checks requires of a destination's name: no separator, no dot first.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")


@dataclass(frozen=True)
class Answer:
    """What a destination answered for good about one instance."""

    outcome: str  # DELIVERED or PERMANENT
    reason: str = ""
    sop_class: str = ""
    sop_instance: str = ""


def progress_folder(opened: Path) -> Path:
    """Return the folder of the progress logs of the opened payload ``opened``."""
    return opened.with_name(f"{opened.name}.progress")


class ProgressLog:
    """The append-only progress log of one envelope and destination.

    Open it (or use it as a context manager) to append with :meth:`note`;
    :meth:`read` needs neither. One thread appends at a time. Raises
    SpoolError for a destination name that cannot name a file.
    """

    def __init__(self, opened: Path, destination: str):
        if not _NAME.fullmatch(destination):
            raise SpoolError(
                "progress log: expected a destination name of letters, digits, "
                f"'.', '_' or '-' (up to 64), got {destination!r}"
            )
        self.path = progress_folder(opened) / f"{destination}.log"
        self._fd = -1

    def open(self) -> None:
        """Open the log for appending, creating it. Raises OSError."""
        self.path.parent.mkdir(mode=0o700, exist_ok=True)
        self._fd = os.open(
            self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600
        )

    def close(self) -> None:
        """Close the log if it is open."""
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> ProgressLog:
        self.open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def note(self, path: str, answer: Answer) -> None:
        """Append the answer about the instance at ``path``. Raises OSError."""
        fields = {
            "path": path,
            "outcome": answer.outcome,
            "reason": answer.reason,
            "sop_class": answer.sop_class,
            "sop_instance": answer.sop_instance,
        }
        self._write(fields)

    def note_resend(self) -> None:
        """Append a line that cancels every refusal noted so far. Raises OSError."""
        self._write({"outcome": RESEND})

    def _write(self, fields: dict) -> None:
        data = (json.dumps(fields, separators=(",", ":")) + "\n").encode()
        # O_APPEND: each write lands whole at the end, even after a torn line.
        while data:
            data = data[os.write(self._fd, data) :]

    def read(self) -> dict[str, Answer]:
        """Return the answers recorded so far, by path; empty when there is no log.

        A delivery stands whatever follows it; a refusal holds until a
        ``resend`` line. Raises OSError when the log exists but cannot be read.
        """
        try:
            text = self.path.read_bytes().decode("utf-8", errors="replace")
        except FileNotFoundError:
            return {}
        answers: dict[str, Answer] = {}
        for line in text.splitlines():
            fields = _parse(line)
            if fields is None:
                continue
            if fields["outcome"] == RESEND:
                answers = {p: a for p, a in answers.items() if a.outcome == DELIVERED}
                continue
            held = answers.get(fields["path"])
            if held is None or held.outcome != DELIVERED:
                answers[fields["path"]] = Answer(
                    fields["outcome"],
                    str(fields.get("reason", "")),
                    str(fields.get("sop_class", "")),
                    str(fields.get("sop_instance", "")),
                )
        return answers


def _parse(line: str) -> dict | None:
    """Return one line's fields, or None for a line cut short or not ours."""
    try:
        fields = json.loads(line)
    except ValueError:
        return None
    if not isinstance(fields, dict):
        return None
    outcome = fields.get("outcome")
    if outcome == RESEND:
        return fields
    if outcome in (DELIVERED, PERMANENT) and isinstance(fields.get("path"), str):
        return fields
    return None
