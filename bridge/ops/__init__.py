"""Operations: metrics, health, structured logs, the admin API and status page.

The daemon builds one :class:`OpsContext` and calls :func:`add_ops_routes` on
its aiohttp application; components count what happens through
:class:`~bridge.ops.metrics.Metrics`; :func:`configure_logging` sets up the
one log handler.
"""

from bridge.ops.context import OpsContext
from bridge.ops.health import Check
from bridge.ops.logs import configure_logging
from bridge.ops.metrics import Metrics
from bridge.ops.routes import add_ops_routes

__all__ = ["Check", "Metrics", "OpsContext", "add_ops_routes", "configure_logging"]
