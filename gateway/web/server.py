"""uvicorn serving the one ASGI application in a daemon thread of the gateway process.

Why a thread, not a process: the application reads the gateway's own metrics registry and
health checks, and the export API runs the ``Exporter`` against the same database; one process
keeps one composition root (``gateway.app``).

Invariants:
- the socket is bound in ``__init__``, so a port taken is an ``OSError`` before anything starts
  (as ``serve`` reports it) and ``port`` is known at once, also when the configuration says 0;
- uvicorn installs no signal handlers (it only does so on the main thread, and it never runs
  there): SIGTERM stays the gateway's;
- no access log: request lines carry Patient IDs (``/api/export/patient/{id}``), which must
  never reach the service log; uvicorn's own logger is kept to warnings and above, and
  ``log_config=None`` leaves the gateway's logging set-up alone.
"""

from __future__ import annotations

import logging
import socket
import threading

import uvicorn
from starlette.types import ASGIApp

STOP_GRACE_S = 5  # a streaming download still running at stop is cut after this


class WebServer:
    def __init__(self, host: str, port: int, app: ASGIApp) -> None:
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPPROTO_TCP named, not left 0: asyncio turns Nagle's algorithm off on each accepted
        # connection only for a socket whose ``proto`` says TCP (``base_events._set_nodelay``,
        # CPython 3.11), and an accepted socket copies the listener's. With 0, every request on
        # a kept-alive connection (another node's fetches, API clients) waited ~40 ms for the
        # client's delayed ACK before the last part of its answer left.
        self._socket = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            self._socket.bind((host, port))
            self._socket.listen(128)
        except OSError:
            self._socket.close()
            raise
        logging.getLogger("uvicorn.error").setLevel(logging.WARNING)
        logging.getLogger("uvicorn.access").disabled = True
        config = uvicorn.Config(
            app, log_config=None, access_log=False, lifespan="off", server_header=False,
            timeout_graceful_shutdown=STOP_GRACE_S, loop="asyncio", http="h11",
        )
        self._server = uvicorn.Server(config)
        self._thread = threading.Thread(target=self._server.run, args=([self._socket],),
                                        name="gateway-http", daemon=True)

    @property
    def port(self) -> int:
        return int(self._socket.getsockname()[1])

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.should_exit = True
        if self._thread.is_alive():
            self._thread.join(STOP_GRACE_S + 5)
        self._socket.close()
