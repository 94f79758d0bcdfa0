"""The listening AE: binds pynetdicom's events to the gateway's policy objects. Glue only.

Admission (who may associate) is decided before presentation contexts are negotiated, by
``GatewayACSE``; each C-ECHO and C-STORE then checks the caller's services and hands the request
to ``Ingest``. Logs carry AE titles, addresses, UIDs, statuses and counts, never patient values.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from pydicom.dataset import Dataset
from pynetdicom import AE, evt
from pynetdicom.acse import ACSE
from pynetdicom.association import Association
from pynetdicom.dimse_primitives import C_MOVE
from pynetdicom.dsutils import decode
from pynetdicom.pdu_primitives import A_ASSOCIATE
from pynetdicom.presentation import PresentationContext
from pynetdicom.transport import RequestHandler, ThreadedAssociationServer
from sqlalchemy.exc import SQLAlchemyError

from gateway.busy import ReceiverLoad
from gateway.config import DicomConfig, Service
from gateway.dicom.contexts import (
    MODALITY_PERFORMED_PROCEDURE_STEP,
    MODALITY_WORKLIST_FIND,
    scp_contexts,
)
from gateway.dicom.peers import PeerPolicy, RejectReason
from gateway.dicom.status import Answer, Status
from gateway.metrics import Metrics
from gateway.query.gate import GatedAssociation, Retrieve, status_dataset
from gateway.query.service import QueryService
from gateway.receive.associations import AssociationLedger, AssociationStats
from gateway.receive.fastpath import FastSocket, file_meta
from gateway.receive.ingest import Ingest, StoreRequest
from gateway.receive.server import ProxyProtocol, ReceiverServer, adopting_server_class
from gateway.receive.streaming import StreamedStore, StreamingDUL
from gateway.receive.upper_layer import REJECT_INVALID_REQUEST
from gateway.receive.validate import is_valid_uid
from gateway.receive.workers import Admissions, WorkerBoard, handed_server_class
from gateway.worklist.services import NReply, PerformedSteps, WorklistFinder

log = logging.getLogger(__name__)
NEGOTIATION_S = 1.0


@dataclass
class _Open:
    """What the gateway knows about one accepted association while it runs."""

    calling_ae: str
    called_ae: str
    peer: str
    services: frozenset[Service]
    stats: AssociationStats
    end_state: str = "closed"


class Receiver:
    def __init__(
        self,
        config: DicomConfig,
        policy: PeerPolicy,
        ingest: Ingest,
        ledger: AssociationLedger,
        metrics: Metrics,
        query: QueryService | None = None,
        load: ReceiverLoad | None = None,
        worklist: WorklistFinder | None = None,
        performed: PerformedSteps | None = None,
        admissions: Admissions | None = None,
    ) -> None:
        # In a receiver process of several (``gateway.receive.workers``), the node-wide counts;
        # alone, a board of one slot: the same limits by the same code.
        self._admissions: Admissions = admissions if admissions is not None else WorkerBoard(
            1, config.max_associations).admissions(0, config.max_associations)
        self._worklist = worklist
        self._performed = performed
        self._query = query
        self._load = load
        self._config = config
        self._policy = policy
        self._ingest = ingest
        self._ledger = ledger
        self._metrics = metrics
        self._open: dict[int, _Open] = {}
        self._warned_unknown: set[tuple[str, str]] = set()
        self._lock = threading.Lock()
        self._server: ThreadedAssociationServer | None = None
        self._draining: ThreadedAssociationServer | None = None
        self.ae = AE(ae_title=config.ae_title)
        self.ae.maximum_pdu_size = config.max_pdu_size
        # GatewayACSE enforces max_associations over admitted associations; pynetdicom's own
        # check counts raw connections, so it is set out of the way.
        self.ae.maximum_associations = config.max_associations + 10_000
        self.ae.acse_timeout = config.acse_timeout_s
        self.ae.dimse_timeout = config.dimse_timeout_s
        self.ae.network_timeout = config.network_timeout_s
        self.ae.require_called_aet = False  # GatewayACSE decides, with the reason recorded

    @property
    def incoming(self) -> Path:
        """Where received data sets are written before they are kept."""
        return self._ingest.incoming

    @property
    def address(self) -> tuple[str, int]:
        assert self._server is not None, "start() first"
        host, port = self._server.server_address[:2]
        return str(host), int(port)

    def start(self, handed: socket.socket | None = None,
              listening: socket.socket | None = None) -> None:
        """Listen on ``dicom.bind_host``/``port``; or, in a receiver process of several, take
        the connections the supervisor's acceptor sends on ``handed`` (``gateway.receive.workers``);
        or, after a configuration reload in one process, go on listening on the socket of the
        receiver it replaces (``listening``, from its ``stop_accepting``): connections arriving in
        between wait in the kernel's queue, none is refused.
        """
        handlers: list[Any] = [
            (evt.EVT_C_ECHO, self._handle_echo),
            (evt.EVT_C_STORE, self._handle_store),
            (evt.EVT_C_FIND, self._handle_query, ["find"]),
            (evt.EVT_C_MOVE, self._handle_query, ["move"]),
            (evt.EVT_C_GET, self._handle_query, ["get"]),
            (evt.EVT_N_CREATE, self._handle_performed, ["n_create"]),
            (evt.EVT_N_SET, self._handle_performed, ["n_set"]),
            (evt.EVT_RELEASED, self._handle_end, ["released"]),
            (evt.EVT_ABORTED, self._handle_end, ["aborted"]),
            (evt.EVT_CONN_CLOSE, self._handle_closed),
        ]
        address = (self._config.bind_host, self._config.port)
        server_class: type[ThreadedAssociationServer] = ReceiverServer
        if handed is not None:
            server_class = handed_server_class(handed, address)
        elif listening is not None:
            server_class = adopting_server_class(listening)
        server = self.ae.make_server(
            address,
            contexts=scp_contexts(self._config.extra_storage_sop_classes),
            evt_handlers=handlers,
            server_class=server_class,
            request_handler=_handler_class(self),
            # Behind a balancer: the modality's address from its PROXY header (receive.server)
            proxy=ProxyProtocol(self._config.proxy_protocol_from, self._config.acse_timeout_s,
                                on_dropped=self._connection_dropped),
        )
        thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.1}, name="gateway-acceptor",
            daemon=True,
        )
        thread.start()
        self.ae._servers.append(server)
        self._server = cast(ThreadedAssociationServer, server)
        host, port = self.address
        if handed is None:
            log.info("listening as %s on %s:%d", self._config.ae_title, host, port)
        else:
            log.info("receiving as %s for %s:%d", self._config.ae_title, host, port)

    def stop(self, grace_s: float) -> None:
        """Stop accepting, let in-flight associations finish for up to ``grace_s``, then abort."""
        if self._server is None:
            return
        server = self._server
        self.stop_accepting()
        server.server_close()
        drain(server, grace_s)

    def stop_accepting(self) -> socket.socket:
        """No new connections (they wait in the listening socket's queue, which is returned,
        open, for the next receiver); the associations in flight go on (``drain``)."""
        assert self._server is not None, "start() first"
        server, self._server = self._server, None
        self._draining = server
        # socketserver's shutdown only: pynetdicom's would close the listening socket too
        socketserver.BaseServer.shutdown(server)
        if server in self.ae._servers:
            self.ae._servers.remove(server)
        return cast(socket.socket, server.socket)

    def drain(self, grace_s: float) -> None:
        """After ``stop_accepting``: what ``stop`` does with the associations in flight."""
        if self._draining is not None:
            drain(self._draining, grace_s)

    # -- admission (called by GatewayACSE in the association's thread) -------------------------

    def admit(self, assoc: Association, calling_ae: str, called_ae: str) -> RejectReason | None:
        peer = (str(assoc.requestor.address), int(assoc.requestor.port))
        admission = self._policy.admit(calling_ae, called_ae, peer[0])
        reject = admission.reject
        if reject is None:
            # Count admitted associations, not connections: a bare TCP probe holds a pynetdicom
            # thread for the ACSE timeout and must not use up a modality's slot. Checked and
            # reserved under one lock so two simultaneous requests cannot both take the last slot.
            # The calling AE title's own limit is counted the same way, over every receiver process.
            state = _Open(calling_ae, called_ae, f"{peer[0]}:{peer[1]}", admission.services,
                          AssociationStats(None))
            with self._lock:
                reject = self._admissions.take(calling_ae, admission.max_associations)
                if reject is None:
                    self._open[id(assoc)] = state
        if reject is not None:
            self._metrics.associations.labels("rejected", reject.label).inc()
            self._ledger.opened(calling_ae, called_ae, peer, rejected_reason=reject.label)
            log.warning("rejected association from %s at %s:%d calling %s: %s%s",
                        calling_ae, peer[0], peer[1], called_ae, reject.label,
                        _limit_detail(reject, calling_ae, admission.max_associations,
                                      self._config.max_associations))
            return reject
        if not admission.known_peer and (calling_ae, peer[0]) not in self._warned_unknown:
            self._warned_unknown.add((calling_ae, peer[0]))  # once per caller, not per association
            log.warning("accepting unknown caller %s at %s (allowed: %s); list it under "
                        "[[security.peers]] to make this explicit",
                        calling_ae, peer[0], ",".join(sorted(admission.services)))
        record_id = self._ledger.opened(calling_ae, called_ae, peer)
        state.stats.record_id = record_id
        self._metrics.associations.labels("accepted", "").inc()
        self._metrics.associations_active.inc()
        log.info("accepted association %s from %s at %s:%d", record_id, calling_ae, *peer)
        return None

    # -- DIMSE handlers ------------------------------------------------------------------------

    def _state(self, assoc: Association) -> _Open | None:
        with self._lock:
            return self._open.get(id(assoc))

    def _handle_echo(self, event: evt.Event) -> Dataset:
        state = self._state(event.assoc)
        if state is None or "echo" not in state.services:
            calling = state.calling_ae if state else str(event.assoc.requestor.ae_title).strip()
            return Answer(Status.NOT_AUTHORIZED, _not_allowed(calling, "echo")).dataset()
        return Answer(Status.SUCCESS).dataset()

    def _handle_store(self, event: evt.Event) -> Dataset:
        """C-STORE through pynetdicom: what ``StoreStream`` leaves to it, a request read before
        this thread has marked the association established (or during a release)."""
        request = cast(Any, event.request)
        return self._store(event.assoc, StreamedStore(
            event.dataset_path, str(request.AffectedSOPClassUID),
            str(request.AffectedSOPInstanceUID), str(event.context.transfer_syntax),
        )).dataset()

    def store_streamed(self, assoc: Association, streamed: StreamedStore) -> Answer:
        """C-STORE read by the gateway's own reader (``receive.streaming``), in the DUL thread."""
        return self._store(assoc, streamed)

    def _store(self, assoc: Association, received: StreamedStore) -> Answer:
        """C-STORE (PS3.4 B.2.3). Never raises: pynetdicom would answer 0xC211 and lose the why.
        Every answer but Success says why, sent as its Error Comment."""
        started = time.perf_counter()
        sop_instance = received.sop_instance_uid
        state = self._state(assoc)
        if state is None or "store" not in state.services:
            calling = state.calling_ae if state else str(assoc.requestor.ae_title).strip()
            self._metrics.instances.labels(calling, Status.NOT_AUTHORIZED.label).inc()
            log.warning("C-STORE refused: %s may not store", calling)
            return Answer(Status.NOT_AUTHORIZED, _not_allowed(calling, "store"))
        if received.refusal is not None or received.path is None:
            refusal = received.refusal or Answer(Status.CANNOT_UNDERSTAND, "no data set")
            log.warning("C-STORE %s from %s answered %s: %s", sop_instance if is_valid_uid(
                sop_instance) else "(invalid UID)", state.calling_ae, refusal.status.label,
                refusal.reason)
            self._metrics.instances.labels(state.calling_ae, refusal.status.label).inc()
            state.stats.count(refusal.status.label, 0, False)
            return refusal
        try:
            outcome = self._ingest.store(
                StoreRequest(
                    incoming=received.path,
                    affected_sop_class=received.sop_class_uid,
                    affected_sop_instance=sop_instance,
                    transfer_syntax=received.transfer_syntax,
                    calling_ae=state.calling_ae,
                    called_ae=state.called_ae,
                    peer_address=state.peer,
                    association_id=state.stats.record_id,
                )
            )
            status, kept, duplicate = outcome.status, outcome.kept_bytes, outcome.duplicate
            reason = outcome.reason
            if status != Status.SUCCESS:
                log.warning("C-STORE %s from %s answered %s: %s",
                            sop_instance, state.calling_ae, status.label, outcome.reason)
        except Exception as exc:
            status, reason = _unexpected(exc)
            log.error("C-STORE %s from %s failed (%s); answering %s", sop_instance,
                      state.calling_ae, type(exc).__name__, status.label)
            log.debug("C-STORE failure detail", exc_info=True)
            kept, duplicate = 0, None
        self._metrics.instances.labels(state.calling_ae, status.label).inc()
        if kept:
            self._metrics.bytes.labels(state.calling_ae).inc(kept)
        if duplicate:
            self._metrics.duplicates.labels(duplicate).inc()
        state.stats.count(status.label, kept, duplicate is not None)
        elapsed = time.perf_counter() - started
        self._metrics.store_seconds.observe(elapsed)
        if self._load is not None:
            self._load.add(elapsed)
        return Answer(status, reason)

    def _handle_query(self, event: evt.Event, kind: Service) -> Iterator[Any]:
        """C-FIND / C-MOVE / C-GET: the caller's services decide, then ``QueryService``.
        A refusal is 0x0124 (PS3.7 C.5.x, not authorized) with an Error Comment saying how to
        allow it; C-MOVE and C-GET refusals are answered by ``gate_retrieve`` before this runs."""
        state = self._state(event.assoc)
        model = str(cast(Any, event.request).AffectedSOPClassUID)
        if kind == "find" and model == MODALITY_WORKLIST_FIND:
            yield from self._handle_worklist(event, state)
            return
        if self._query is None or state is None or kind not in state.services:
            refusal = self._refusal(event.assoc, kind, cast(Any, event.request))
            if kind == "move":
                yield None, None  # not reached: the gate answered it
                return
            yield refusal, None
            return
        handler = {"find": self._query.find, "move": self._query.move, "get": self._query.get}[kind]
        yield from handler(event, state.calling_ae)

    def _handle_worklist(self, event: evt.Event, state: _Open | None) -> Iterator[Any]:
        """Modality Worklist C-FIND (PS3.4 K): callers with the ``worklist`` service only."""
        if self._worklist is None or state is None or "worklist" not in state.services:
            yield self._refused_workflow(event, state, "C-FIND worklist"), None
            return
        yield from self._worklist.find(event, state.calling_ae)

    def _handle_performed(self, event: evt.Event, operation: str) -> NReply:
        """MPPS N-CREATE / N-SET (PS3.4 F.7): callers with the ``worklist`` service only; any
        other SOP class on these messages is not served (0x0122)."""
        state = self._state(event.assoc)
        request = cast(Any, event.request)
        sop_class = str(getattr(request, "AffectedSOPClassUID", None)
                        or getattr(request, "RequestedSOPClassUID", ""))
        if sop_class != MODALITY_PERFORMED_PROCEDURE_STEP:
            return status_dataset(Status.SOP_CLASS_NOT_SUPPORTED,
                                  f"{operation.upper().replace('_', '-')} of {sop_class} is not "
                                  "served"), None
        if self._performed is None or state is None or "worklist" not in state.services:
            return self._refused_workflow(event, state, "MPPS"), None
        handler = self._performed.n_create if operation == "n_create" else self._performed.n_set
        return handler(event, state.calling_ae)

    def _refused_workflow(self, event: evt.Event, state: _Open | None, what: str) -> Dataset:
        calling = state.calling_ae if state else str(event.assoc.requestor.ae_title).strip()
        log.warning("%s refused: %s may not use it; add \"worklist\" to its services in "
                    "[[security.peers]]", what, calling)
        return status_dataset(Status.NOT_AUTHORIZED,
                              f'{calling} may not use {what}: add "worklist" to its services')

    def gate_retrieve(
        self, assoc: Association, request: Retrieve, context: PresentationContext
    ) -> Dataset | None:
        """Called by ``GatedAssociation`` before pynetdicom's C-MOVE/C-GET SCP: the refusal to
        answer (0x0124, 0xC000, 0xA900, 0xA801), or None to go on."""
        kind: Service = "move" if isinstance(request, C_MOVE) else "get"
        state = self._state(assoc)
        if self._query is None or state is None or kind not in state.services:
            return self._refusal(assoc, kind, request)
        syntax = context.transfer_syntax[0]
        try:
            identifier = decode(cast(Any, request.Identifier), syntax.is_implicit_VR,
                                syntax.is_little_endian, syntax.is_deflated)
        except Exception as exc:  # noqa: BLE001 - untrusted bytes; the refusal says so
            log.debug("C-%s identifier not decodable: %s", kind.upper(), type(exc).__name__)
            identifier = None
        return self._query.precheck(kind, request, identifier, state.calling_ae)

    def _refusal(self, assoc: Association, kind: Service, request: Any) -> Dataset:
        state = self._state(assoc)
        calling = state.calling_ae if state else str(assoc.requestor.ae_title).strip()
        if self._query is None:
            return status_dataset(Status.NOT_AUTHORIZED, f"C-{kind.upper()} is not served here")
        return self._query.refused(kind, calling, str(request.AffectedSOPClassUID))

    def _handle_end(self, event: evt.Event, end_state: str) -> None:
        state = self._state(event.assoc)
        if state is not None:
            state.end_state = end_state
        self._finish(event.assoc)

    def _handle_closed(self, event: evt.Event) -> None:
        self._finish(event.assoc)

    def ended(self, assoc: Association) -> None:
        """The association's thread has ended: if no end event came (pynetdicom fired none on
        some failure paths), it is counted out now, so ``associations_active`` cannot leak."""
        self._finish(assoc)
        self._admissions.connection_ended()

    def _connection_dropped(self) -> None:
        """A connection closed before it became an association (no valid PROXY header)."""
        if self._admissions is not None:
            self._admissions.connection_ended()

    def _finish(self, assoc: Association) -> None:
        with self._lock:
            state = self._open.pop(id(assoc), None)
        if state is None:
            return
        self._admissions.give_back(state.calling_ae)
        self._metrics.associations_active.dec()
        self._ledger.closed(state.stats, state.end_state)
        log.info("association %s from %s %s: %d stored, %d duplicate, %d bytes",
                 state.stats.record_id, state.calling_ae, state.end_state,
                 state.stats.instances, state.stats.duplicates, state.stats.bytes)


def _limit_detail(reject: RejectReason, calling_ae: str, peer_limit: int | None,
                  node_limit: int) -> str:
    """What the operator reads after the label: which limit, and the key that sets it."""
    if reject is RejectReason.PEER_LIMIT_EXCEEDED:
        return (f" ({calling_ae} already holds its {peer_limit} associations; its limit is "
                "max_associations in its [[security.peers]] entry, else "
                "security.max_associations_per_peer)")
    if reject is RejectReason.LOCAL_LIMIT_EXCEEDED:
        return f" (the node holds dicom.max_associations = {node_limit})"
    return ""


def drain(server: ThreadedAssociationServer, grace_s: float) -> None:
    """Let ``server``'s associations finish for up to ``grace_s``, then abort the rest.

    Established associations are waited for the whole grace; one still negotiating (its
    A-ASSOCIATE-RQ not yet answered: a connection taken just before the stop, e.g. handed to a
    receiver process an instant before a reload retired it) for ``NEGOTIATION_S`` at most, so
    that it is answered rather than cut, while a bare TCP connect (a port probe) does not hold the
    stop for the whole ACSE timeout."""
    started = time.monotonic()
    deadline = started + grace_s
    negotiating_until = started + min(grace_s, NEGOTIATION_S)

    def waited_for(assoc: Association) -> bool:
        if assoc.is_established:
            return True
        ended = assoc.is_released or assoc.is_aborted or assoc.is_rejected
        return not ended and time.monotonic() < negotiating_until

    while time.monotonic() < deadline and any(waited_for(a) for a in server.active_associations):
        time.sleep(0.05)
    for assoc in server.active_associations:
        if assoc.is_established:
            log.warning("aborting association from %s after %.0f s grace",
                        assoc.requestor.ae_title, grace_s)
        assoc.abort()


def _unexpected(exc: Exception) -> tuple[Status, str]:
    """A failure ``Ingest`` did not classify. 0xA700 tells the sender to try again later
    (PS3.4 B.2.3): right for a disk, memory or database failure, which passes. Anything else is
    this data set meeting a fault of ours, which every retry would meet again: 0xC000."""
    if isinstance(exc, (OSError, MemoryError, SQLAlchemyError)):
        return Status.OUT_OF_RESOURCES, f"{type(exc).__name__} while storing; retry later"
    return Status.CANNOT_UNDERSTAND, f"data set could not be processed ({type(exc).__name__})"


def _not_allowed(calling_ae: str, service: Service) -> str:
    """The Error Comment of a 0x0124 refusal: who, and what the operator can change."""
    return f'{calling_ae} may not {service}; add "{service}" in security.peers'


class GatewayACSE(ACSE):
    """pynetdicom's ACSE, with the gateway's admission decided before negotiation (PS3.8 7.1)."""

    def __init__(self, assoc: Association, receiver: Receiver) -> None:
        super().__init__(assoc)
        self._receiver = receiver

    def _negotiate_as_acceptor(self) -> None:
        request = self.requestor.primitive
        if not isinstance(request, A_ASSOCIATE):
            # The DUL answered the request itself (A-ASSOCIATE-RJ or A-ABORT, see
            # ``upper_layer``) and sent this A-P-ABORT instead of the request: nothing to negotiate.
            self.assoc.is_aborted = True
            self.assoc.kill()
            return
        calling_ae = str(request.calling_ae_title).strip()
        called_ae = str(request.called_ae_title).strip()
        reject = self._receiver.admit(self.assoc, calling_ae, called_ae)
        if reject is None:
            try:
                super()._negotiate_as_acceptor()
            except Exception as exc:  # noqa: BLE001 - the requestor is told, not left waiting
                log.warning("rejecting association from %s at %s:%s: negotiation failed (%s)",
                            calling_ae, self.requestor.address, self.requestor.port,
                            type(exc).__name__)
                self.send_reject(*REJECT_INVALID_REQUEST)
                evt.trigger(self.assoc, evt.EVT_REJECTED, {})
                self.assoc.kill()
            return
        self.requestor.ae_title = request.calling_ae_title
        self.send_reject(*reject.wire)
        evt.trigger(self.assoc, evt.EVT_REJECTED, {})
        self.assoc.kill()


def _handler_class(receiver: Receiver) -> type[RequestHandler]:
    class GatewayRequestHandler(RequestHandler):
        def _create_association(self) -> Association:
            assoc = super()._create_association()
            FastSocket.adopt(cast(Any, assoc.dul.socket))
            StreamingDUL.adopt(assoc.dul, receiver.store_streamed, receiver.incoming, file_meta)
            # Whatever ends the association's thread, it is counted out (``_finish`` once)
            GatedAssociation.adopt_with_gate(assoc, receiver.gate_retrieve,
                                             on_end=lambda: receiver.ended(assoc))
            assoc.acse = GatewayACSE(assoc, receiver)
            return assoc

    return GatewayRequestHandler

