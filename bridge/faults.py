"""Test-only crash points: the process kills itself at a named stage.

The crash tests (``tests/test_crash_matrix.py``) restart a real bridge after a
SIGKILL at each stage of a study's way and check that nothing acknowledged is
lost. Some stages cannot be hit from outside at the right moment (after the
peer's 201 but before the job is marked, say), so the code names them with
:func:`test_only_crash_point` and the test sets the environment variable
``JMIX_BRIDGE_TEST_CRASH_AT`` to one of them::

    JMIX_BRIDGE_TEST_CRASH_AT=deliver.after-handler      # the first time
    JMIX_BRIDGE_TEST_CRASH_AT=listener.after-ack:5       # the fifth time

The variable is read once, at import. Without it every crash point is a
function call that compares one string and returns; a production process
never sets it.
"""

from __future__ import annotations

import os
import signal
import threading

ENV_VAR = "JMIX_BRIDGE_TEST_CRASH_AT"


def _parse(value: str) -> tuple[str, int]:
    name, _, count = value.strip().partition(":")
    try:
        return name, max(1, int(count)) if count else 1
    except ValueError:
        raise ValueError(
            f"{ENV_VAR}: expected NAME or NAME:COUNT, got {value!r}"
        ) from None


_ARMED, _AT = _parse(os.environ[ENV_VAR]) if os.environ.get(ENV_VAR) else ("", 0)
_seen = 0
_lock = threading.Lock()


def test_only_crash_point(name: str) -> None:
    """SIGKILL this process the ``N``-th time ``name`` is reached, if armed.

    A no-op unless ``JMIX_BRIDGE_TEST_CRASH_AT`` named ``name`` when this
    module was imported. SIGKILL, not an exception or ``sys.exit``: no
    ``finally`` block, atexit hook or buffered write may run, as in a power cut.
    """
    global _seen
    if name != _ARMED:
        return
    with _lock:
        _seen += 1
        hit = _seen == _AT
    if hit:
        os.kill(os.getpid(), signal.SIGKILL)
