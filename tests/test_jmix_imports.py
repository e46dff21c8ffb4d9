"""The envelope library stands alone: importing it loads no network or queue code."""

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# The layers above the envelope format (STYLE "Layout"): DICOM networking, HTTP,
# the queue and state, the peer transport and the workers.
FORBIDDEN = (
    "httpx",
    "aiohttp",
    "pynetdicom",
    "bridge.store",
    "bridge.peer",
    "bridge.dicom",
    "bridge.workers",
)

# Every module of the package is imported, not only what ``__init__`` pulls in,
# so that a module nothing imports yet cannot hide a dependency.
PROBE = """
import importlib, json, pkgutil, sys
import bridge.jmix
for info in pkgutil.iter_modules(bridge.jmix.__path__, "bridge.jmix."):
    importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
"""


def test_importing_bridge_jmix_loads_no_transport_or_queue_module():
    # A fresh interpreter, so that modules other tests imported do not count.
    out = subprocess.run(
        [sys.executable, "-c", PROBE],
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    loaded = json.loads(out.stdout)

    assert "bridge.jmix.open" in loaded
    offenders = [
        name
        for name in loaded
        if any(name == bad or name.startswith(bad + ".") for bad in FORBIDDEN)
    ]
    assert offenders == []
