"""The embedded defaults of the quick start: one bridge that sends to itself.

``jmix-bridge run`` without a configuration file creates ``./jmix-bridge-data``
with the state store, the spool and a fresh key pair, listens for DICOM on the
registered DICOM port 11112 (AE title JMIXBRIDGE) and for HTTP on
127.0.0.1:8080, packs every study it receives into an envelope addressed to
itself, delivers it over loopback, opens it, and forwards the instances to the
PACS at 127.0.0.1:4242 with AE title ORTHANC (Orthanc's own defaults). The
loopback credential is a random token kept in the data folder, mode 0600.
"""

from __future__ import annotations

import os
import secrets
from pathlib import Path

from bridge.config import Config, config_from_mapping
from bridge.jmix import generate_key_dir

DATA_DIR = Path("jmix-bridge-data")
DICOM_PORT = 11112
HTTP_PORT = 8080
PACS = {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": 4242}


def _loopback_token(data_dir: Path) -> str:
    path = data_dir / "loopback.token"
    if not path.exists():
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.write(secrets.token_urlsafe(32))
    return path.read_text().strip()


def quick_start_config(
    data_dir: Path = DATA_DIR,
    *,
    dicom_port: int = DICOM_PORT,
    http_port: int = HTTP_PORT,
    pacs: dict | None = None,
    quiet_seconds: float = 10.0,
) -> Config:
    """Return the quick-start configuration, creating its keys and token."""
    data_dir = Path(data_dir).absolute()
    data_dir.mkdir(parents=True, exist_ok=True)
    keys = data_dir / "keys"
    if not (keys / "signing.key").exists():
        generate_key_dir(keys)
    token = _loopback_token(data_dir)
    raw = {
        "node": {
            "id": "org:jmix-bridge-local",
            "name": "jmix-bridge",
            "data_dir": str(data_dir),
            "keys": str(keys),
        },
        "dicom": {"port": dicom_port},
        "http": {"host": "127.0.0.1", "port": http_port},
        "routes": [
            {"name": "everything", "peers": ["self"], "quiet_seconds": quiet_seconds}
        ],
        "peers": [
            {
                "name": "self",
                "entity": {
                    "id": "org:jmix-bridge-local",
                    "name": "jmix-bridge",
                    "contact": "operator@localhost",
                },
                "url": f"http://127.0.0.1:{http_port}",
                "encryption_key": str(keys / "encryption.pub"),
                "token": token,
                "signing_key": str(keys / "signing.pub"),
            }
        ],
        "senders": [
            {
                "name": "self",
                "id": "org:jmix-bridge-local",
                "signing_keys": [str(keys / "signing.pub")],
                "token": token,
                "reply_peer": "self",
            }
        ],
        "destinations": [{"name": "pacs", **(pacs or PACS)}],
    }
    return config_from_mapping(raw, data_dir)
