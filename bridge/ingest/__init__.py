"""Study assembly: route each received instance, record it, seal studies when due.

:mod:`bridge.ingest.routing` decides which route an instance belongs to,
:mod:`bridge.ingest.ingest` takes each file the listener received into the
spool and the state store, and :mod:`bridge.ingest.assembler` seals studies
whose quiet period or maximum age has passed, one ``seal`` job per peer.
"""

from bridge.ingest.assembler import Assembler, seal_jobs
from bridge.ingest.ingest import Ingest, IngestSettings, Receipt, Rejection
from bridge.ingest.routing import UNROUTED, Router, RouteRule, Unrouted

__all__ = [
    "UNROUTED",
    "Assembler",
    "Ingest",
    "IngestSettings",
    "Receipt",
    "Rejection",
    "RouteRule",
    "Router",
    "Unrouted",
    "seal_jobs",
]
