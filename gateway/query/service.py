"""Query/Retrieve SCP handlers (PS3.4 Annex C): C-FIND, C-MOVE and C-GET over the ledger.

pynetdicom runs the protocol (Pending responses, sub-operation counts, cancel, the final status
from the counts: Success, 0xB000 some failed, 0xA702 all failed, and the Failed SOP Instance UID
List); these generators decide what matches and what is sent. Each request is one audit row (who,
model, level, how many) and is counted in metrics; the service log names AE titles, levels and
counts, never the query's values.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import (
    UID,
    DeflatedExplicitVRLittleEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
)
from pynetdicom import evt
from pynetdicom.presentation import PresentationContext, build_context
from sqlalchemy import Engine
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from gateway import audit
from gateway.config import Peer, QueryConfig
from gateway.dicom.contexts import sending_contexts
from gateway.dicom.status import Status
from gateway.dicom.transcode import as_uncompressed
from gateway.errors import PermanentError
from gateway.metrics import Metrics
from gateway.query.find import QueryRefused, answers, parse, run
from gateway.query.gate import status_dataset
from gateway.query.pending import PendingSender
from gateway.query.prefetch import Prefetch
from gateway.query.retrieve import Loader, Stored, check_retrievable, lookup, unsendable
from gateway.receive.fastpath import RequestingAssociation

log = logging.getLogger(__name__)
Reply = tuple[int | Dataset, Dataset | None]  # a status, or a status Dataset with its Error Comment
VERIFICATION = "1.2.840.10008.1.1"
OUTGOING_BACKLOG = 32  # P-DATA primitives waiting to be sent


class QueryService:
    def __init__(
        self,
        engine: Engine,
        config: QueryConfig,
        ae_title: str,
        peers: tuple[Peer, ...],
        loader: Loader,
        metrics: Metrics,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._engine = engine
        self._config = config
        self._ae_title = ae_title
        self._destinations = {p.ae_title: p for p in peers if p.host and p.port}
        self._loader = loader
        self._metrics = metrics
        self._clock = clock
        self._audit: queue.SimpleQueue[tuple[str, str, datetime, dict[str, object]] | None] = (
            queue.SimpleQueue()
        )
        self._audit_thread = threading.Thread(target=self._write_audit, name="query-audit",
                                              daemon=True)
        self._audit_thread.start()
        self._dialect = engine.dialect.name

    # -- C-FIND --------------------------------------------------------------------------------

    def find(self, event: evt.Event, calling_ae: str) -> Iterator[Reply]:
        started = time.perf_counter()
        model = str(cast(Any, event.request).AffectedSOPClassUID)
        status, matches, level = Status.SUCCESS, 0, "?"
        try:
            query = parse(event.identifier, model, self._dialect, self._config)
            level = query.level
            rows = run(self._engine, query, self._config.max_results)
            pending = PendingSender(event)
            for answer in answers(query, rows[: self._config.max_results], self._ae_title):
                _let_the_network_catch_up(event.assoc)
                if event.is_cancelled:
                    status = Status.CANCEL
                    yield int(Status.CANCEL), None
                    return
                matches += 1
                if not pending.send(answer):
                    yield int(Status.PENDING), answer.dataset()
            if len(rows) > self._config.max_results:
                status = Status.OUT_OF_RESOURCES  # PS3.4 C.4.1.1.4: refused, out of resources
                log.warning("C-FIND from %s stopped at query.max_results = %d", calling_ae,
                            self._config.max_results)
                yield status_dataset(status, f"more than {self._config.max_results} matches; "
                                     "narrow the query"), None
        except QueryRefused as refused:
            status = refused.status
            log.warning("C-FIND from %s refused (%s): %s", calling_ae, status.label, refused)
            yield status_dataset(status, str(refused)), None
        except SQLAlchemyError as exc:
            status = Status.OUT_OF_RESOURCES
            log.error("C-FIND from %s: database unavailable (%s)", calling_ae, type(exc).__name__)
            yield status_dataset(status, "database unavailable; try again later"), None
        finally:
            self._finished("find", calling_ae, model, level, status, matches, started)

    # -- C-MOVE --------------------------------------------------------------------------------

    def move(self, event: evt.Event, calling_ae: str) -> Iterator[Any]:
        """Yields the destination, then the sub-operation count, then each dataset."""
        started = time.perf_counter()
        request: Any = event.request
        model, destination = str(request.AffectedSOPClassUID), str(request.MoveDestination).strip()
        peer = self._destinations.get(destination)
        found: list[Stored] = []
        status, level, tally = Status.SUCCESS, "?", _SubOperations()
        try:
            if peer is None or not peer.host or not peer.port:  # precheck() refuses these first
                status = Status.MOVE_DESTINATION_UNKNOWN
                yield None, None
                return
            # pynetdicom reads the association options only after the count is yielded, so the
            # contexts, which depend on what matches, are filled in between.
            options: dict[str, Any] = {"evt_handlers": [
                (evt.EVT_ESTABLISHED, _no_delay), (evt.EVT_ESTABLISHED, tally.on_established),
                (evt.EVT_DIMSE_RECV, tally.on_response)]}
            yield peer.host, peer.port, options
            query = parse(event.identifier, model, self._dialect, self._config)
            level = query.level
            found = lookup(self._engine, query, self._loader.node)  # precheck() refused what lookup would refuse
            options["contexts"] = _contexts_for(found)
            yield len(found)
            yield from self._sub_operations(event, found, tally)
        finally:
            if found:
                status = tally.status(len(found))
            self._finished("move", calling_ae, model, level, status, len(found), started,
                           destination=destination, completed=tally.completed,
                           warning=tally.warning)

    # -- C-GET ---------------------------------------------------------------------------------

    def get(self, event: evt.Event, calling_ae: str) -> Iterator[Any]:
        """Yields the sub-operation count, then each dataset, sent on the same association; an
        instance whose syntax the caller did not accept goes decompressed when it accepted an
        uncompressed one."""
        started = time.perf_counter()
        model = str(cast(Any, event.request).AffectedSOPClassUID)
        found: list[Stored] = []
        status, level, tally = Status.SUCCESS, "?", _SubOperations()
        try:
            query = parse(event.identifier, model, self._dialect, self._config)
            level = query.level
            found = lookup(self._engine, query, self._loader.node)  # precheck() refused what lookup would refuse
            yield len(found)
            tally.accepted = _accepted_for_sending(event.assoc)  # on the caller's association
            event.assoc.bind(evt.EVT_DIMSE_RECV, tally.on_response)
            yield from self._sub_operations(event, found, tally)
        finally:
            event.assoc.unbind(evt.EVT_DIMSE_RECV, tally.on_response)
            if found:
                status = tally.status(len(found))
            self._finished("get", calling_ae, model, level, status, len(found), started,
                           completed=tally.completed, warning=tally.warning)

    def _sub_operations(self, event: evt.Event, found: list[Stored],
                        tally: _SubOperations) -> Iterator[tuple[int, Dataset | None]]:
        """C-MOVE's and C-GET's sub-operations, in order, each instance fetched ahead
        (``gateway.query.prefetch``) and fitted to what ``tally.accepted`` allows; a C-CANCEL
        ends them. Closed however the loop ends (cancel, failure, abort: pynetdicom drops the
        generator), so no fetch ahead outlives the retrieve."""
        with Prefetch(self._loader, found, self._loader.prefetch_window) as ahead:
            for index in range(len(found)):
                if event.is_cancelled:
                    tally.cancelled = True
                    yield int(Status.CANCEL), None
                    return
                yield int(Status.PENDING), _fit(ahead.load(index), tally.accepted)

    def refused(self, kind: str, calling_ae: str, model: str) -> Dataset:
        """A caller without the service (PS3.7 C.5: 0x0124): counted and audited like every
        other request; the Error Comment says how to allow it."""
        self._finished(kind, calling_ae, model, "?", Status.NOT_AUTHORIZED, 0, time.perf_counter())
        log.warning("C-%s refused: %s may not %s; add \"%s\" to its services in "
                    "[[security.peers]]", kind.upper(), calling_ae, kind, kind)
        return status_dataset(Status.NOT_AUTHORIZED,
                              f'{calling_ae} may not C-{kind.upper()}: add "{kind}" to its services')

    def precheck(self, kind: str, request: Any, identifier: Dataset | None,
                 calling_ae: str) -> Dataset | None:
        """A C-MOVE or C-GET's refusal, decided before pynetdicom starts (``query.gate``): an
        identifier that cannot be decoded or answered (0xC000, 0xA900), a retrieve without its
        level's unique key (0xC000), a move destination that is not a peer with host and port
        (0xA801). None when the request may go on."""
        model = str(request.AffectedSOPClassUID)
        level = "?"
        try:
            if identifier is None:
                raise QueryRefused(Status.UNABLE_TO_PROCESS, "identifier could not be decoded")
            level = str(identifier.get("QueryRetrieveLevel", "?")).strip() or "?"
            query = parse(identifier, model, self._dialect, self._config)
            check_retrievable(query)
        except QueryRefused as refused:
            return self._refuse(kind, calling_ae, model, level, refused.status, str(refused))
        if kind == "move":
            destination = str(request.MoveDestination).strip()
            if destination not in self._destinations:
                return self._refuse(
                    kind, calling_ae, model, level, Status.MOVE_DESTINATION_UNKNOWN,
                    f"move destination {destination} unknown: list it with host and port",
                    destination=destination)
        return None

    def _refuse(self, kind: str, calling_ae: str, model: str, level: str, status: Status,
                reason: str, **detail: object) -> Dataset:
        log.warning("C-%s from %s at %s level refused (%s): %s", kind.upper(), calling_ae, level,
                    status.label, reason)
        self._finished(kind, calling_ae, model, level, status, 0, time.perf_counter(), **detail)
        return status_dataset(status, reason)

    def _finished(self, kind: str, calling_ae: str, model: str, level: str, status: Status,
                  count: int, started: float, **detail: object) -> None:
        elapsed = time.perf_counter() - started
        self._metrics.queries.labels(kind, calling_ae, Status(status).label).inc()
        if kind == "find":
            self._metrics.query_seconds.observe(elapsed)
        else:
            self._metrics.suboperations.labels(kind).inc(count)
        log.info("C-%s from %s at %s level: %d %s, %s", kind.upper(), calling_ae, level, count,
                 "matches" if kind == "find" else "instances", Status(status).label)
        self._audit.put((calling_ae, kind, self._clock(), dict(
            model=model, level=level, results=count, status=Status(status).label, **detail)))

    def close(self, timeout_s: float = 10.0) -> None:
        """Write the audit rows still queued."""
        self._audit.put(None)
        self._audit_thread.join(timeout_s)

    def _write_audit(self) -> None:
        """Audit rows are written here, after the final response has gone: a commit (an fsync
        on SQLite) would otherwise hold every C-FIND's last answer."""
        while (item := self._audit.get()) is not None:
            calling_ae, kind, at, detail = item
            try:
                with Session(self._engine) as session, session.begin():
                    audit.record(session, calling_ae, kind, None, at, **detail)
            except SQLAlchemyError as exc:
                log.error("audit row for C-%s from %s not written: %s", kind.upper(), calling_ae,
                          type(exc).__name__)


class _SubOperations:
    """The sub-operations' association as negotiated, and C-STORE responses as they arrive (PS3.4
    C.4.2.3: the final status follows from them); an instance that could not even be sent has no
    response and counts as failed."""

    def __init__(self) -> None:
        self.completed = 0
        self.warning = 0
        self.cancelled = False
        self.accepted: dict[str, set[str]] = {}

    def on_established(self, event: evt.Event) -> None:
        self.accepted = _accepted_for_sending(event.assoc)

    def on_response(self, event: evt.Event) -> None:
        message: Any = getattr(event, "message", None)
        if type(message).__name__ != "C_STORE_RSP":
            return
        status = int(message.command_set.Status)
        if status == 0x0000:
            self.completed += 1
        elif 0xB000 <= status <= 0xBFFF:
            self.warning += 1

    def status(self, offered: int) -> Status:
        if self.cancelled:
            return Status.CANCEL
        failed = offered - self.completed - self.warning
        if offered and failed == offered:
            return Status.UNABLE_TO_PERFORM_SUBOPERATIONS
        return Status.SUBOPERATIONS_COMPLETE_WITH_FAILURES if failed else Status.SUCCESS


def _let_the_network_catch_up(assoc: Any) -> None:
    """Back-pressure: pynetdicom's network thread reads nothing while it has messages to send
    (pynetdicom 3.0 ``DULServiceProvider.run_reactor``), so answers queued faster than the socket
    takes them would hide a C-CANCEL until all were sent, and sit in memory meanwhile."""
    dul = assoc.dul
    while dul.to_provider_queue.qsize() > OUTGOING_BACKLOG and assoc.is_established:
        time.sleep(0.0005)


def _contexts_for(found: list[Stored]) -> list[PresentationContext]:
    """Verification too, so that a destination refusing every SOP class still associates and
    each sub-operation fails visibly (0xA702) rather than looking like an unknown destination."""
    pairs = ((s.sop_class_uid, s.transfer_syntax_uid) for s in found)
    return [build_context(VERIFICATION), *sending_contexts(pairs, reserved=1)]


def _no_delay(event: evt.Event) -> None:
    """Sub-operation associations leave Nagle off, as every SCU of the gateway does, and ACK
    at once (``fastpath.QuickAckSocket``): a destination with Nagle on (DCMTK's default)
    otherwise waits 40 ms for our delayed ACK before each C-STORE-RSP is whole. Their reactor
    gives back an answer it takes (``fastpath.RequestingAssociation``)."""
    RequestingAssociation.adopt(event.assoc)


def _accepted_for_sending(assoc: Any) -> dict[str, set[str]]:
    """SOP class -> syntaxes in which this side may send C-STORE requests (as the storage SCU:
    on a C-GET association the caller took the SCP role, PS3.4 C.4.3)."""
    accepted: dict[str, set[str]] = {}
    for cx in assoc.accepted_contexts:
        if cx.as_scu:
            accepted.setdefault(str(cx.abstract_syntax), set()).add(str(cx.transfer_syntax[0]))
    return accepted


# Little-endian syntaxes pydicom writes from any decoded data set, in the order we send them.
_PLAIN = (ExplicitVRLittleEndian, ImplicitVRLittleEndian, DeflatedExplicitVRLittleEndian)


def _fit(ds: Dataset, accepted: dict[str, set[str]]) -> Dataset:
    """The instance in a syntax the peer accepted for its SOP class: as stored when it can be,
    else decompressed and re-stated in an accepted little-endian syntax (pynetdicom encodes it
    as the file meta says). A peer may well accept deflated and not explicit VR for a context
    (the acceptor picks one syntax per context), so every plain one counts. With none accepted
    the instance goes as it is, and pynetdicom fails and lists that sub-operation."""
    syntaxes = accepted.get(str(ds.get("SOPClassUID", "")), set())
    stored = UID(ds.file_meta.TransferSyntaxUID) if "file_meta" in ds.__dict__ else None
    target = next((s for s in _PLAIN if s in syntaxes), None)
    if stored is None or stored in syntaxes or target is None:
        return ds
    try:
        plain = as_uncompressed(ds)
    except PermanentError:
        return unsendable(str(ds.SOPInstanceUID))
    plain.file_meta.TransferSyntaxUID = target
    return plain
