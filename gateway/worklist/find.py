"""Modality Worklist Information Model - FIND (PS3.4 Annex K): an identifier in, the matching
Scheduled Procedure Steps out, read from ``worklist_items`` only (never from files).

Matching (PS3.4 K.6.1.2, C.2.2.2): the keys with a column are matched, at the top level or
inside the one item of the Scheduled Procedure Step Sequence, with the Q/R SCP's rules
(``gateway.query.matching``): single value, wildcards ``*`` ``?``, UID lists, ranges ``D1-D2``,
``-D2`` and ``D1-`` on dates and times, person names per component group and in any case when
``[query] case_insensitive_names`` (the folded columns). Without Extended Negotiation a date range
and a time range are matched each on its own (C.2.2.2.5; wlmscpfs combines them). Scheduled
Station AE Title is multi-valued (VM 1-n): an item matches when any of its titles does. Other keys
are return keys only (PS3.4 C.2.2.1.2 lets an SCP answer optional matching keys without matching
on them). Only SCHEDULED and STARTED steps that have not expired are listed.

Answers: every key the identifier asks for comes back, with the item's value or empty when the
item has none (PS3.4 K.6.1.2.2: type 1 and 2 return keys always present; the build job never
lists an item whose type 1 values it lacks). A sequence key comes back as a sequence whose items
carry the sub-keys asked for; a sequence asked for with no item, or with an empty one, returns
everything the item holds there (C.2.2.2.6; for the SPS Sequence the Table K.6-1 attributes, as
wlmscpfs expands it). Specific Character Set (0008,0005) is declared only when a value needs it:
ISO_IR 192, or the one set a peer is limited to (``[worklist] character_sets``), in which case
values are transcoded and characters the set lacks become ``?``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from pydicom.datadict import dictionary_VR
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.sequence import Sequence
from pydicom.tag import BaseTag
from pydicom.valuerep import PersonName
from pynetdicom import evt
from sqlalchemy import ColumnElement, Engine, or_, select
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.orm import Session

from gateway import audit
from gateway.config import WORKLIST_CHARSETS, WorklistConfig
from gateway.db.models import WorklistItem, WorklistItemStation
from gateway.dicom.status import Status
from gateway.metrics import Metrics
from gateway.query.find import QueryRefused
from gateway.query.gate import status_dataset
from gateway.query.matching import compare, condition, tokens
from gateway.worklist.items import (
    COLUMNS,
    LISTED,
    SPECIFIC_CHARACTER_SET,
    SPS_COLUMNS,
    SPS_RETURN,
    SPS_SEQUENCE,
    STATION_KEY,
    TOP_COLUMNS,
    Attribute,
    json_key,
    json_value,
    load_attributes,
    sps_attributes,
)
from gateway.worklist.sender import Element, WorklistAnswer, WorklistSender

log = logging.getLogger(__name__)
Reply = tuple[int | Dataset, Dataset | None]
MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"
OUTGOING_BACKLOG = 32  # as gateway.query.service: P-DATA primitives waiting to be sent
_NOT_KEYS = {SPECIFIC_CHARACTER_SET, BaseTag(0x00080052)}  # and Query/Retrieve Level
_TEXT_VRS = {"AE", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"}
_STATION = COLUMNS["ScheduledStationAETitle"]
# Every column an answer can read, selected once per query.
_SELECTED = (WorklistItem.id, WorklistItem.attributes,
             *(getattr(WorklistItem, a.column) for a in COLUMNS.values()))


@dataclass(frozen=True)
class WorklistQuery:
    identifier: Dataset
    where: tuple[ColumnElement[bool], ...]


def parse(identifier: Dataset, dialect: str, names_any_case: bool) -> WorklistQuery:
    """The identifier's matching keys as SQL conditions; refused (0xA900) when its Scheduled
    Procedure Step Sequence has more than one item (PS3.4 C.2.2.2.6: a key sequence has one)."""
    where: list[ColumnElement[bool]] = []
    for element in identifier:
        if element.tag == SPS_SEQUENCE:
            items = element.value or []
            if len(items) > 1:
                raise QueryRefused(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                                   "Scheduled Procedure Step Sequence has more than one item")
            for sub in items[0] if items else ():
                where += _conditions(sub, SPS_COLUMNS.get(sub.tag), dialect, names_any_case)
        else:
            where += _conditions(element, TOP_COLUMNS.get(element.tag), dialect, names_any_case)
    return WorklistQuery(identifier, tuple(where))


def _conditions(element: DataElement, attribute: Attribute | None, dialect: str,
                names_any_case: bool) -> list[ColumnElement[bool]]:
    if attribute is None or element.VR == "SQ":
        return []
    value = _query_text(element.value)
    if not value.strip(" *"):
        return []  # universal matching
    if attribute is _STATION:
        titles = [t.strip() for t in value.split("\\") if t.strip()]
        stations = WorklistItemStation.station_ae
        found = or_(*(compare(stations, tokens(t, folding=False), dialect) for t in titles))
        return [WorklistItem.id.in_(select(WorklistItemStation.item_id).where(found))]
    column = getattr(WorklistItem, attribute.column)
    if attribute.vr != "PN" and attribute.vr != "UI" and "\\" in value and "-" not in value:
        values = [v.strip() for v in value.split("\\") if v.strip()]  # several single values
        return [or_(*(compare(column, tokens(v, folding=False), dialect) for v in values))]
    folded = getattr(WorklistItem, attribute.folded) if attribute.folded else None
    matched = condition(column, attribute.vr, value, dialect,
                        names_any_case and folded is not None, folded)
    return [] if matched is None else [matched]


def _query_text(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list)):
        return "\\".join(str(v) for v in value)
    return str(value)


def run(engine: Engine, query: WorklistQuery, now: datetime, limit: int) -> list[dict[str, Any]]:
    """At most ``limit`` + 1 listed items, by start date and time, so the caller can tell the cap
    was reached."""
    statement = (
        select(*_SELECTED)
        .where(WorklistItem.status.in_(LISTED), WorklistItem.expires_at > now, *query.where)
        .order_by(WorklistItem.start_date, WorklistItem.start_time, WorklistItem.id)
        .limit(limit + 1)
    )
    with engine.connect() as c:
        return [dict(r._mapping) for r in c.execute(statement)]


# -- answers ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Key:
    """One requested key and where its value comes from: a column, the item's extras, or (the
    SPS Sequence) its own requested sub-keys; ``request`` is the key's element in the query."""

    tag: BaseTag
    vr: str
    column: str | None
    request: DataElement
    sub: tuple[_Key, ...] | None = None  # SPS Sequence: its sub-keys, None to expand them all


def _layout(items: Dataset | list[DataElement], columns: dict[BaseTag, Attribute]
            ) -> tuple[_Key, ...]:
    keys = []
    for element in items:
        if element.tag in _NOT_KEYS or element.tag.is_private or element.tag.group == 0x0002:
            continue
        attribute = columns.get(element.tag)
        if attribute is not None:
            keys.append(_Key(element.tag, attribute.vr, attribute.column, element))
        elif columns is TOP_COLUMNS and element.tag == SPS_SEQUENCE:
            first = element.value[0] if element.value else None
            sub = _layout(first, SPS_COLUMNS) if first is not None and len(first) else None
            keys.append(_Key(element.tag, "SQ", None, element, sub))
        else:
            keys.append(_Key(element.tag, _vr(element), None, element))
    return tuple(sorted(keys, key=lambda k: k.tag))


def _vr(element: DataElement) -> str:
    if element.VR not in ("UN", "") or element.tag.is_private:
        return element.VR
    try:
        return dictionary_VR(element.tag)
    except KeyError:
        return "UN"


_EXPANDED: tuple[_Key, ...] = tuple(sorted(
    (_Key(tag, vr, SPS_COLUMNS[tag].column if tag in SPS_COLUMNS else None,
          DataElement(tag, vr, None)) for tag, vr in
     {**{t: a.vr for t, a in SPS_COLUMNS.items()}, **dict(SPS_RETURN)}.items()),
    key=lambda k: k.tag))


class Answers:
    """Builds each match's identifier from its row; the keys' layout is worked out once per
    query."""

    def __init__(self, query: WorklistQuery, codec: str | None, declared: str | None) -> None:
        self._keys = _layout(query.identifier, TOP_COLUMNS)
        self._codec = codec  # transcode to this (a peer limited to one character set)
        self._declared = declared  # what (0008,0005) says when a value is not ASCII

    def answer(self, row: dict[str, Any]) -> WorklistAnswer:
        extras = load_attributes(row.get("attributes"))
        state = _State(self._codec)
        elements = [(key.tag, key.vr, self._value(key, row, extras, state)) for key in self._keys]
        if state.non_ascii and self._declared:
            return WorklistAnswer(((SPECIFIC_CHARACTER_SET, "CS", self._declared), *elements),
                                  self._declared)
        return WorklistAnswer(tuple(elements), None)

    def _value(self, key: _Key, row: dict[str, Any], extras: dict[str, Any],
               state: _State) -> Any:
        if key.tag == SPS_SEQUENCE:
            return (self._step(key.sub, row, sps_attributes(extras) if extras else {}, state),)
        if key.column is not None:
            return state.fit(row.get(key.column))
        return self._extra(key, extras, state)

    def _step(self, sub: tuple[_Key, ...] | None, row: dict[str, Any], extras: dict[str, Any],
              state: _State) -> tuple[Element, ...]:
        keys = sub
        if keys is None:  # an empty item: every SPS attribute, and the extras the step holds
            known = {k.tag for k in _EXPANDED}
            more = [_Key(BaseTag(int(t, 16)), str(e.get("vr", "UN")), None,
                         DataElement(BaseTag(int(t, 16)), str(e.get("vr", "UN")), None))
                    for t, e in extras.items() if BaseTag(int(t, 16)) not in known]
            keys = tuple(sorted((*_EXPANDED, *more), key=lambda k: k.tag))
        step = []
        for key in keys:
            if key.tag == _STATION.tag and STATION_KEY in extras:  # several titles: all of them
                value = self._extra(key, extras, state)
            elif key.column is not None:
                value = state.fit(row.get(key.column))
            else:
                value = self._extra(key, extras, state)
            step.append((key.tag, key.vr, value))
        return tuple(step)

    def _extra(self, key: _Key, extras: dict[str, Any], state: _State) -> Any:
        stored = extras.get(json_key(key.tag)) if extras else None
        vr, value = json_value(stored) if isinstance(stored, dict) else (key.vr, None)
        if key.vr == "SQ":
            items = value if vr == "SQ" and value else []
            return [state.fit_dataset(i) for i in project(items, key.request.value)]
        if isinstance(value, list):
            value = tuple(value)  # hashable, for the encoder's cache
        return state.fit(value)


def project(stored: list[Dataset], request: Sequence | list[Dataset] | None) -> list[Dataset]:
    """The stored items of a sequence with the sub-keys the request's one item names (empty
    where an item lacks one); all of each item when the request has no item or an empty one."""
    if not request or not len(request[0]):
        return list(stored)
    template = request[0]
    found = []
    for item in stored:
        out = Dataset()
        for element in template:
            held = item.get(element.tag)
            if element.VR == "SQ":
                value: Any = project(list(held.value) if held is not None else [], element.value)
            else:
                value = None if held is None else held.value
            out.add(DataElement(element.tag, _vr(element), value))
        found.append(out)
    return found


class _State:
    """Per answer: whether a value needs a declared character set, and the transcoding for a
    peer limited to one (values it cannot hold get ``?``)."""

    def __init__(self, codec: str | None) -> None:
        self.codec = codec
        self.non_ascii = False

    def fit(self, value: Any) -> Any:
        if value is None or value == "":
            return None
        if isinstance(value, PersonName):
            value = str(value)
        if isinstance(value, str):
            if value.isascii():
                return value
            if self.codec is not None:
                value = value.encode(self.codec, "replace").decode(self.codec)
            self.non_ascii = self.non_ascii or not value.isascii()
            return value
        if isinstance(value, (list, MultiValue)):
            return [self.fit(v) or "" for v in value]
        return value

    def fit_dataset(self, ds: Dataset) -> Dataset:
        for element in ds:
            if element.VR == "SQ":
                for item in element.value:
                    self.fit_dataset(item)
            elif element.VR in _TEXT_VRS and element.value not in (None, ""):
                element.value = self.fit(element.value)
        return ds


def character_set(config: WorklistConfig, calling_ae: str) -> tuple[str | None, str | None]:
    """(codec to transcode to, Specific Character Set to declare when a value is not ASCII)."""
    limited = config.character_sets.get(calling_ae)
    if limited is None or limited == "ISO_IR 192":
        return None, "ISO_IR 192"
    return WORKLIST_CHARSETS[limited], (None if limited == "ISO_IR 6" else limited)


# -- the C-FIND handler -------------------------------------------------------------------------

class WorklistService:
    """``gateway.worklist.services.WorklistFinder``: answers MWL C-FIND requests, counts them
    (``gateway_worklist_queries``, ``gateway_worklist_items_returned``) and writes one audit row
    each (actor the calling AE, action ``worklist_find``, how many items, the status)."""

    def __init__(
        self,
        engine: Engine,
        config: WorklistConfig,
        names_any_case: bool,
        metrics: Metrics,
        clock: Callable[[], datetime] = lambda: datetime.now(UTC),
    ) -> None:
        self._engine = engine
        self._config = config
        self._names_any_case = names_any_case
        self._metrics = metrics
        self._clock = clock
        self._dialect = engine.dialect.name
        self._audit: queue.SimpleQueue[tuple[str, datetime, dict[str, object]] | None] = (
            queue.SimpleQueue())
        self._audit_thread = threading.Thread(target=self._write_audit, name="worklist-audit",
                                              daemon=True)
        self._audit_thread.start()

    def find(self, event: evt.Event, calling_ae: str) -> Iterator[Reply]:
        """PS3.4 K.4.1.2 statuses: Pending per item, then Success; Cancel (0xFE00) after a
        C-CANCEL; 0xA700 past ``max_results`` (the first ones sent) or without the database;
        0xA900 for an identifier this model cannot answer. Each with an Error Comment."""
        started = time.perf_counter()
        status, returned = Status.SUCCESS, 0
        limit = self._config.max_results
        try:
            query = parse(cast(Dataset, event.identifier), self._dialect, self._names_any_case)
            rows = run(self._engine, query, self._clock(), limit)
            build = Answers(query, *character_set(self._config, calling_ae))
            pending = WorklistSender(event)
            for row in rows[:limit]:
                _let_the_network_catch_up(event.assoc)
                if event.is_cancelled:
                    status = Status.CANCEL
                    yield int(Status.CANCEL), None
                    return
                answer = build.answer(row)
                returned += 1
                if not pending.send(answer):
                    yield int(Status.PENDING), answer.dataset()
            pending.flush()  # before pynetdicom sends the final response
            if len(rows) > limit:
                status = Status.OUT_OF_RESOURCES
                log.warning("worklist C-FIND from %s stopped at worklist.max_results = %d",
                            calling_ae, limit)
                yield status_dataset(status, f"more than {limit} items; narrow the query"), None
        except QueryRefused as refused:
            status = refused.status
            log.warning("worklist C-FIND from %s refused (%s): %s", calling_ae, status.label,
                        refused)
            yield status_dataset(status, str(refused)), None
        except SQLAlchemyError as exc:
            status = Status.OUT_OF_RESOURCES
            log.error("worklist C-FIND from %s: database unavailable (%s)", calling_ae,
                      type(exc).__name__)
            yield status_dataset(status, "database unavailable; try again later"), None
        finally:
            self._finished(calling_ae, status, returned, started)

    def _finished(self, calling_ae: str, status: Status, returned: int, started: float) -> None:
        label = Status(status).label
        self._metrics.worklist_queries.labels(calling_ae, label).inc()
        self._metrics.worklist_items_returned.labels(calling_ae).inc(returned)
        self._metrics.worklist_query_seconds.observe(time.perf_counter() - started)
        log.info("worklist C-FIND from %s: %d items, %s", calling_ae, returned, label)
        self._audit.put((calling_ae, self._clock(), {
            "model": MODALITY_WORKLIST_FIND, "results": returned, "status": label}))

    def close(self, timeout_s: float = 10.0) -> None:
        """Write the audit rows still queued."""
        self._audit.put(None)
        self._audit_thread.join(timeout_s)

    def _write_audit(self) -> None:
        """After the final response, as ``QueryService`` does: a commit must not hold it."""
        while (item := self._audit.get()) is not None:
            calling_ae, at, detail = item
            try:
                with Session(self._engine) as session, session.begin():
                    audit.record(session, calling_ae, "worklist_find", None, at, **detail)
            except SQLAlchemyError as exc:
                log.error("audit row for worklist C-FIND from %s not written: %s", calling_ae,
                          type(exc).__name__)


def _let_the_network_catch_up(assoc: Any) -> None:
    """Back-pressure, as ``gateway.query.service`` explains: pynetdicom's network thread reads
    nothing (a C-CANCEL) while it has messages to send."""
    dul = assoc.dul
    while dul.to_provider_queue.qsize() > OUTGOING_BACKLOG and assoc.is_established:
        time.sleep(0.0005)
