"""The Starlette application: ``/metrics`` (Prometheus text), ``/healthz``, and the export API
(``gateway.web.api``) when tokens are configured.

``/healthz`` answers 200 only when the database answers and the spool has its minimum free
space, i.e. when a C-STORE would succeed; otherwise 503 with the failing check named. It also
lists every node of the cluster with its last heartbeat and whether it is stale; a stale peer
never makes this node's answer 503. ``/internal`` (gateway.cluster.internal): the nodes' own
endpoint, behind the cluster secret, when one is configured.
"""

from __future__ import annotations

import json
from collections.abc import Callable

from prometheus_client import CollectorRegistry, make_asgi_app
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.cluster.nodes import NodeState

HealthCheck = Callable[[], dict[str, bool]]


class _Asgi:
    """An ASGI callable as a route endpoint (Starlette treats a plain function as a request
    handler, and prometheus_client's app is one)."""

    def __init__(self, app: ASGIApp) -> None:
        self._app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._app(scope, receive, send)


def build_app(registry: CollectorRegistry, health: HealthCheck,
              api: ASGIApp | None = None, internal: ASGIApp | None = None,
              nodes: Callable[[], list[NodeState]] = list) -> Starlette:
    def healthz(request: Request) -> Response:  # sync: Starlette runs it in its thread pool
        checks = health()
        ok = all(checks.values())
        # Every node with its heartbeat: a stale peer is reported here, not a failure of this
        # node (the balancer asks each node about itself)
        body = json.dumps({"status": "ok" if ok else "failing", "checks": checks,
                           "nodes": [n.as_json() for n in nodes()]})
        return Response(body, 200 if ok else 503, media_type="application/json")

    async def not_found(request: Request, exc: Exception) -> Response:
        return Response("try /metrics or /healthz\n", 404, media_type="text/plain")

    routes: list[BaseRoute] = [
        Route("/metrics", _Asgi(make_asgi_app(registry)), methods=["GET", "HEAD"]),
        Route("/healthz", healthz, methods=["GET", "HEAD"]),
    ]
    if api is not None:
        routes.append(Mount("/api", app=api))
    if internal is not None:
        routes.append(Mount("/internal", app=internal))
    app = Starlette(routes=routes, exception_handlers={404: not_found})
    app.router.redirect_slashes = False
    return app
