"""pynetdicom's threaded association server, without its forced garbage collections, and reading
the PROXY protocol header of connections from trusted balancers.

pynetdicom 3.0's ``AssociationServer.service_actions`` calls ``gc.collect()`` every 60 turns of
the ``serve_forever`` loop (every 6 s at our 0.1 s poll, and after requests): a full collection
of the whole process, holding the GIL. In the gateway's process (SQLAlchemy, pydicom, the
metrics, the services) one took about 100 ms (py-spy, 2026-12-03: 432 ms of 25 s of worklist
queries were in it), a pause of every association at once: C-STOREs in flight and C-FIND answers
alike. The association cycles it was meant for are collected by Python's own generational
collector anyway; so this server does nothing there.

PROXY protocol (``dicom.proxy_protocol_from``, ``gateway.receive.proxy_protocol``): behind
HAProxy in TCP mode every connection comes from the balancer; its ``send-proxy-v2`` header names
the modality. The header is read in ``process_request_thread``, the thread ``ThreadingMixIn``
starts for each connection before pynetdicom builds the association, so

- the accepting loop (this server's, or the supervisor's acceptor with ``dicom.workers`` > 1,
  which only hands the socket over) never waits for it: a silent or slow client holds only its
  own thread, for at most ``dicom.acse_timeout_s`` (the time PS3.8 9.1.4's ARTIM timer gives a
  connection to send its A-ASSOCIATE-RQ anyway);
- everything downstream sees the modality's address as the request's ``client_address``: it is
  what pynetdicom puts in ``assoc.requestor.address``/``port``, which the peer policy, the
  association ledger and the logs read.

Only connections from a listed balancer are read this way: from anywhere else a PROXY header is
not honoured (pynetdicom reads it as the start of a malformed PDU and aborts). A listed balancer's
connection without a valid header is closed, with a WARNING naming the balancer and what was
wrong: nothing can be answered on the wire, as PS3.8 defines no PDU for a connection that has not
sent an A-ASSOCIATE-RQ.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import threading
from collections.abc import Callable, Sequence
from typing import Any, cast

from pynetdicom.transport import ThreadedAssociationServer

from gateway.receive.proxy_protocol import (
    ProxyHeaderError,
    canonical_host,
    read_header,
    socket_reader,
)

log = logging.getLogger(__name__)
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


class ProxyProtocol:
    """Which balancers' connections start with a PROXY header, and how long one may take."""

    def __init__(self, trusted: Sequence[Network], deadline_s: float,
                 on_dropped: Callable[[], None] = lambda: None) -> None:
        self.trusted = tuple(trusted)
        self.deadline_s = deadline_s
        # A dropped connection never becomes an association: told so it is counted as ended
        self.on_dropped = on_dropped

    def is_trusted(self, host: str) -> bool:
        try:
            address = ipaddress.ip_address(canonical_host(host))
        except ValueError:
            return False
        return any(address in network for network in self.trusted)


class ReceiverServer(ThreadedAssociationServer):
    def __init__(self, *args: Any, proxy: ProxyProtocol | None = None, **kwargs: Any) -> None:
        self._proxy = proxy if proxy is not None and proxy.trusted else None
        self._reading: set[socket.socket] = set()
        self._reading_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def service_actions(self) -> None:
        """No forced ``gc.collect()`` (see the module docstring)."""

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        """In the connection's own thread: the modality's address from a trusted balancer's
        PROXY header, then pynetdicom's handling with that address."""
        if self._proxy is not None and isinstance(request, socket.socket):
            balancer = (str(client_address[0]), int(client_address[1]))
            if self._proxy.is_trusted(balancer[0]):
                client_address = self._through_balancer(request, balancer)
                if client_address is None:
                    return
        super().process_request_thread(request, client_address)

    def _through_balancer(self, conn: socket.socket,
                          balancer: tuple[str, int]) -> tuple[str, int] | None:
        assert self._proxy is not None
        timeout = conn.gettimeout()
        with self._reading_lock:
            self._reading.add(conn)
        try:
            header = read_header(socket_reader(conn, self._proxy.deadline_s))
        except ProxyHeaderError as exc:
            log.warning("connection from %s:%d closed: it is a trusted balancer "
                        "(dicom.proxy_protocol_from) but sent no valid PROXY header: %s",
                        balancer[0], balancer[1], exc)
            self.shutdown_request(conn)
            self._proxy.on_dropped()
            return None
        finally:
            with self._reading_lock:
                self._reading.discard(conn)
        conn.settimeout(timeout)
        if header.source is None:  # LOCAL (a health check) or no usable address: the balancer's
            return balancer
        log.debug("connection from %s:%d relays %s:%d (PROXY v%d)", *balancer, *header.source,
                  header.version)
        return header.source

    def server_close(self) -> None:
        """Connections still sending their PROXY header are cut, so that stopping does not wait
        for their deadline (``ThreadingMixIn`` joins every connection's thread)."""
        with self._reading_lock:
            pending = list(self._reading)
        for conn in pending:
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        super().server_close()


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
