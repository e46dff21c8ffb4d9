"""The file transport: envelopes through folders, for pure peer-to-peer use.

The sender writes each envelope into a drop folder; any file transfer (rsync,
SFTP, a shared volume, removable media) carries it to the receiver's inbox
folder, which :class:`InboxWatcher` polls. The contract between the two ends is
the rename: a file is written under a dot-name ending in ``.part`` and renamed
to ``<id>.zip`` once complete, so a reader that takes only ``*.zip`` names that
do not start with a dot never sees a partial file. The watcher also waits until a file's
size and modification time are unchanged across two scans, for carriers that
write in place.

A taken envelope goes through the same intake as an HTTP upload
(:mod:`bridge.peer.intake`), except that it must be signed by the sender its
manifest names. One that is not an envelope, fails the sender check or was
received before is moved aside into ``rejected/`` with a
``<name>.reason.txt`` beside it; nothing is ever deleted. Filesystem errors of
the sending side are translated here into transport errors.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import threading
import uuid
from collections.abc import Iterable
from pathlib import Path

from bridge import jmix
from bridge.errors import (
    EnvelopeError,
    RetryableTransportError,
    SpoolError,
    UnknownSigner,
)
from bridge.peer.intake import Intake
from bridge.peer.settings import InboundSender
from bridge.receiving.opener import classify
from bridge.spool import fsync_rename, validate_envelope_id

logger = logging.getLogger(__name__)

REJECTED = "rejected"


def _copy_into_place(src: Path, dest: Path) -> None:
    """Copy ``src`` beside ``dest`` under a dot-name, then make it ``dest`` durably.

    Raises OSError or SpoolError.
    """
    part = dest.with_name(f".{dest.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        shutil.copyfile(src, part)
        fsync_rename(part, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            part.unlink()


def drop_envelope(src: Path, folder: Path | None, envelope_id: str) -> Path:
    """Write the envelope zip ``src`` into ``folder`` as ``<id>.zip``; return it.

    Copies to a ``.<id>.zip.<random>.part`` name, fsyncs, renames and fsyncs the
    folder, so the file appears complete or not at all. Writing the same id
    again replaces the earlier file with the same bytes. Raises
    RetryableTransportError when the folder is missing or not writable (a mount
    may come back).
    """
    if folder is None:
        raise ValueError("drop transport: drop_folder is not set")
    dest = folder / f"{validate_envelope_id(envelope_id)}.zip"
    try:
        _copy_into_place(src, dest)
    except (OSError, SpoolError) as exc:
        raise RetryableTransportError(
            f"drop folder {folder}: cannot write envelope: {exc}"
        ) from exc
    return dest


def _move(src: Path, dest: Path) -> None:
    """Move ``src`` to ``dest`` durably, copying when they are on two filesystems.

    Raises OSError or SpoolError.
    """
    if os.stat(src).st_dev == os.stat(dest.parent).st_dev:
        fsync_rename(src, dest)
        return
    _copy_into_place(src, dest)
    os.unlink(src)


class InboxWatcher:
    """Polls one inbox folder for envelopes and takes them in.

    A file proves nothing about who wrote it, so each envelope is matched to
    the sender whose ``id`` its manifest names and must carry that sender's
    signature, whatever the sender's trust setting for HTTP (``JMIX.md``
    section 4). Call :meth:`scan` from a loop of your own, or :meth:`start` a
    thread.
    """

    def __init__(
        self,
        folder: Path,
        senders: Iterable[InboundSender],
        intake: Intake,
        poll_seconds: float = 2.0,
    ):
        self.folder = Path(folder)
        self.senders = {s.id: s for s in senders if s.id}
        self.intake = intake
        self.poll_seconds = poll_seconds
        self.rejected = self.folder / REJECTED
        self._seen: dict[str, tuple[int, int]] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _complete_files(self) -> list[Path]:
        """Return ``*.zip`` files unchanged since the previous scan."""
        current: dict[str, tuple[int, int]] = {}
        for entry in os.scandir(self.folder):
            if entry.name.startswith(".") or not entry.name.endswith(".zip"):
                continue
            if not entry.is_file(follow_symlinks=False):
                continue
            st = entry.stat(follow_symlinks=False)
            current[entry.name] = (st.st_size, st.st_mtime_ns)
        ready = [
            self.folder / name
            for name, mark in sorted(current.items())
            if self._seen.get(name) == mark
        ]
        self._seen = current
        return ready

    def scan(self) -> int:
        """Take in every complete envelope now in the folder; return how many.

        Raises SpoolError or StoreError when the bridge's own side fails; the
        file stays in place to be tried at the next scan.
        """
        taken = 0
        for path in self._complete_files():
            if self._take(path):
                taken += 1
            self._seen.pop(path.name, None)
        return taken

    def _take(self, path: Path) -> bool:
        # Intake counts what its check refuses; what is refused here before it,
        # a file naming no configured sender, and a known id, are counted here.
        try:
            sender = self._sender_of(path)
        except EnvelopeError as exc:
            self.intake.refused(classify(exc))
            self._set_aside(path, f"{type(exc).__name__}: {exc}")
            return False
        try:
            checked = self.intake.check(path, sender, authenticated=False)
        except EnvelopeError as exc:
            self._set_aside(path, f"{type(exc).__name__}: {exc}")
            return False
        if self.intake.is_known(checked.envelope_id):
            self.intake.refused("duplicate", sender.name)
            self._set_aside(path, f"envelope {checked.envelope_id} already received")
            return False

        part = self.intake.spool.temp_path(".drop")
        try:
            _move(path, part)
        except (OSError, SpoolError) as exc:
            raise SpoolError(f"inbox {self.folder}: cannot take a file: {exc}") from exc
        if not self.intake.accept(part, checked, sender):
            self._set_aside(part, f"envelope {checked.envelope_id} already received")
            return False
        return True

    def _sender_of(self, path: Path) -> InboundSender:
        """Return the configured sender the envelope's manifest names; raise."""
        named = jmix.read_manifest(path)["sender"]["id"]
        sender = self.senders.get(named)
        if sender is None:
            raise UnknownSigner(f"manifest sender.id {named!r}: no such sender")
        return sender

    def _set_aside(self, path: Path, reason: str) -> None:
        """Move ``path`` into ``rejected/`` with a reason file; never delete it."""
        self.rejected.mkdir(exist_ok=True)
        name = path.name if path.suffix == ".zip" else f"{uuid.uuid4().hex}.zip"
        dest = self.rejected / name
        if dest.exists():
            dest = self.rejected / f"{dest.stem}.{uuid.uuid4().hex[:8]}.zip"
        try:
            _move(path, dest)
            (self.rejected / f"{dest.name}.reason.txt").write_text(reason + "\n")
        except (OSError, SpoolError) as exc:
            raise SpoolError(
                f"inbox {self.folder}: cannot set a file aside: {exc}"
            ) from exc
        logger.warning("inbox file set aside file=%s", dest.name)

    def start(self) -> None:
        """Scan every ``poll_seconds`` in a background thread until :meth:`stop`."""
        self._thread = threading.Thread(
            target=self._loop, name="peer-inbox", daemon=True
        )
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.scan()
            except Exception:
                logger.exception("inbox scan failed")
            self._stop.wait(self.poll_seconds)

    def stop(self, timeout: float = 10.0) -> None:
        """Stop the scanning thread and wait for it."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
