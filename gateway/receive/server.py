"""pynetdicom's threaded association server, without its forced garbage collections.

pynetdicom 3.0's ``AssociationServer.service_actions`` calls ``gc.collect()`` every 60 turns of
the ``serve_forever`` loop (every 6 s at our 0.1 s poll, and after requests): a full collection
of the whole process, holding the GIL. In the gateway's process (SQLAlchemy, pydicom, the
metrics, the services) one took about 100 ms (py-spy, 2026-12-03: 432 ms of 25 s of worklist
queries were in it), a pause of every association at once: C-STOREs in flight and C-FIND answers
alike. The association cycles it was meant for are collected by Python's own generational
collector anyway; so this server does nothing there.
"""

from __future__ import annotations

import socket
from typing import cast

from pynetdicom.transport import ThreadedAssociationServer


class ReceiverServer(ThreadedAssociationServer):
    def service_actions(self) -> None:
        """No forced ``gc.collect()`` (see the module docstring)."""


def adopting_server_class(listening: socket.socket) -> type[ReceiverServer]:
    """The server going on listening on ``listening``, the socket of the server it replaces
    (a configuration reload in one process): no second bind, no moment without a listener."""

    class AdoptingServer(ReceiverServer):
        def server_bind(self) -> None:
            cast(socket.socket, self.socket).close()
            self.socket = listening
            self.server_address = listening.getsockname()

        def server_activate(self) -> None:
            pass

    return AdoptingServer
