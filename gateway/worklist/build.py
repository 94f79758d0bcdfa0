"""Orders -> Modality Worklist items: the ``worklist_build`` job (PS3.4 Annex K, PS3.3 C.4.10).

``plan_order`` is pure: an order (and the patient's demographics from the identities table, used
where the order lacks them) in, its Scheduled Procedure Steps out, one per order or one per entry
of ``procedure_steps``. ``build_worklist`` applies the plans of every order still within
``[worklist] expire_after_h`` to ``worklist_items`` in one transaction and can run any number of
times: an unchanged order changes nothing.

Invariants:
- A step the build lists has every type 1 return key of Table K.6-1 (Patient's Name and ID,
  Study Instance UID, Requested Procedure ID, Modality, Scheduled Station AE Title, SPS Start
  Date and Time, SPS ID): an order that lacks one is not listed and the run says which order and
  what is missing (a modality refuses a whole answer with an empty type 1 value).
- The Study Instance UID is generated once per order and written to the order, so every build
  gives the step the same UID, the modality puts it in the images, and they meet the order by UID.
- Status: new steps are SCHEDULED; a cancelled order's steps become DISCONTINUED and a completed
  order's COMPLETED; the build never reopens a step that is COMPLETED or DISCONTINUED (MPPS may
  have closed it) and never changes STARTED back. Closed and expired steps leave the list; the
  rows of expired ones are deleted, unless an MPPS refers to them.
- ``attributes`` (what an imported ``.wl`` file carried beyond the columns) is never touched here.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from sqlalchemy import Connection, Table, bindparam, delete, insert, select, update
from sqlalchemy.orm import Session

from gateway import audit
from gateway.config import WorklistConfig
from gateway.db.models import (
    Order,
    PatientIdentity,
    PerformedStep,
    WorklistItem,
    WorklistItemStation,
)
from gateway.query.folding import fold_name
from gateway.worklist.items import CLOSED, station_titles

ORDERS = cast(Table, Order.__table__)
ITEMS = cast(Table, WorklistItem.__table__)
STATIONS = cast(Table, WorklistItemStation.__table__)
IDENTITIES = cast(Table, PatientIdentity.__table__)
PERFORMED = cast(Table, PerformedStep.__table__)

UID_LENGTH = 64  # PS3.5 9.1
SH = 16  # Short String: SPS ID, Accession Number, Requested Procedure ID (PS3.5 6.2)
CHUNK = 500  # values per IN (...) list
# Columns the plan sets; status, ids and timestamps are the build's own business.
PLANNED_COLUMNS = (
    "accession_number", "patient_id", "issuer_of_patient_id", "patient_name",
    "patient_name_folded", "birth_date", "sex", "study_instance_uid", "requested_procedure_id",
    "requested_procedure_description", "modality", "station_ae", "station_name", "start_date",
    "start_time", "performing_physician", "performing_physician_folded", "step_description",
    "referring_physician", "expires_at",
)


@dataclass(frozen=True)
class Demographics:
    """What the identities table knows of a patient (by MRN)."""

    patient_name: str | None
    birth_date: str | None
    sex: str | None


@dataclass(frozen=True)
class PlannedStep:
    step_id: str
    values: dict[str, Any]  # PLANNED_COLUMNS
    stations: tuple[str, ...]


@dataclass(frozen=True)
class OrderPlan:
    steps: tuple[PlannedStep, ...] = ()
    missing: str | None = None  # why the order cannot be listed
    status: str | None = None  # DISCONTINUED / COMPLETED for a closed order, else None


def plan_order(order: Mapping[str, Any], identity: Demographics | None,
               config: WorklistConfig, coded: bool = False) -> OrderPlan:
    """The steps an order puts on the worklist. ``order`` holds the ``orders`` columns (its
    Study Instance UID already set); ``identity`` fills the patient's name, birth date and sex
    where the order has none. ``coded``: the item carries code sequences for the procedure and
    the protocol (an imported file), which stand in for the descriptions (Table K.6-1, 1C)."""
    status = {"cancelled": "DISCONTINUED", "discontinued": "DISCONTINUED",
              "completed": "COMPLETED"}.get(str(order.get("status") or "").lower())
    accession = _text(order.get("accession_number"))
    name = _text(order.get("patient_name")) or (identity.patient_name if identity else None)
    common: dict[str, Any] = {
        "accession_number": (accession or "")[:SH],
        "patient_id": _text(order.get("mrn")),
        "issuer_of_patient_id": _text(order.get("issuer_of_patient_id")),
        "patient_name": name,
        "patient_name_folded": fold_name(name),
        "birth_date": _text(order.get("birth_date")) or (identity.birth_date if identity else None),
        "sex": _text(order.get("sex")) or (identity.sex if identity else None),
        "study_instance_uid": _text(order.get("study_instance_uid")),
        "requested_procedure_id": (_text(order.get("requested_procedure_id")) or accession
                                   or "")[:SH] or None,
        "requested_procedure_description": _text(order.get("requested_procedure_description")),
        "referring_physician": _text(order.get("referring_physician")),
    }
    listed = _steps(order)
    # Requested Procedure Description and SPS Description are 1C return keys: one of each pair
    # (description, code sequence) must be there, so each description stands in for the other.
    common["requested_procedure_description"] = (common["requested_procedure_description"]
                                                 or _text(listed[0].get("description")))
    steps = []
    for number, step in enumerate(listed, start=1):
        modality = _text(step.get("modality")) or _text(order.get("modality"))
        station = (_text(step.get("station_ae")) or _text(order.get("scheduled_station_ae"))
                   or config.station_ae_by_modality.get((modality or "").upper()))
        start = _when(step.get("start")) or _when(order.get("scheduled_at"))
        performer = (_text(step.get("performing_physician"))
                     or _text(order.get("performing_physician")))
        step_id = (_text(step.get("step_id"))
                   or (accession if len(listed) == 1 else f"{accession}.{number}") or "")[:SH]
        description = (_text(step.get("description"))
                       or _text(order.get("requested_procedure_description")))
        missing = _missing(common, modality, station, start, step_id,
                           coded or bool(description))
        if missing:
            what = f"step {step_id}: " if len(listed) > 1 else ""
            return OrderPlan(missing=what + missing, status=status)
        assert start is not None and station is not None
        titles = tuple(station_titles(station))
        values = {
            **common,
            "modality": modality,
            "station_ae": titles[0],
            "station_name": (_text(step.get("station_name"))
                             or _text(order.get("scheduled_station_name"))),
            "start_date": f"{start.year:04d}{start.month:02d}{start.day:02d}",  # DA
            "start_time": f"{start.hour:02d}{start.minute:02d}{start.second:02d}",  # TM
            "performing_physician": performer,
            "performing_physician_folded": fold_name(performer),
            "step_description": description,
            "expires_at": expiry(start, config.expire_after_h),
        }
        steps.append(PlannedStep(step_id, values, titles))
    return OrderPlan(tuple(steps), None, status)


def _steps(order: Mapping[str, Any]) -> list[dict[str, Any]]:
    """The order's steps: its ``procedure_steps`` JSON list, or the order itself as one."""
    raw = order.get("procedure_steps")
    if raw:
        try:
            listed = json.loads(raw) if isinstance(raw, str) else raw
        except json.JSONDecodeError:
            listed = None
        if isinstance(listed, list) and listed and all(isinstance(s, dict) for s in listed):
            return listed
    return [{}]


def _missing(common: Mapping[str, Any], modality: str | None, station: str | None,
             start: datetime | None, step_id: str, described: bool) -> str | None:
    """The first type 1 return key of Table K.6-1 the step would lack, in words."""
    checks = (
        (common["patient_name"], ("no patient name (neither the order nor the identities table "
                                 "has one)")),
        (common["patient_id"], "no patient ID"),
        (common["study_instance_uid"], "no Study Instance UID"),
        (common["requested_procedure_id"], "no Requested Procedure ID"),
        (modality, "no modality"),
        (station, (f"no Scheduled Station AE Title: the order names none; set "
                  f"worklist.station_ae_by_modality.{modality or 'XX'}")),
        (start, "no scheduled start"),
        (step_id, "no Scheduled Procedure Step ID"),
        (described, "no procedure description (Requested Procedure or step)"),
    )
    return next((why for value, why in checks if not value), None)


def expiry(start: datetime, expire_after_h: float) -> datetime:
    """When a step leaves the list: ``expire_after_h`` after its start, which is local wall-clock
    time (DICOM DA/TM carry no zone); in UTC, as every stored time."""
    local = start.astimezone() if start.tzinfo is None else start
    return (local + timedelta(hours=expire_after_h)).astimezone(UTC)


def _text(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip()
    return text or None


def _when(value: Any) -> datetime | None:
    """A step's start: a datetime, ISO 8601, or DICOM YYYYMMDD[HHMM[SS]]; local, no zone."""
    if isinstance(value, datetime):
        return value.replace(tzinfo=None) if value.tzinfo is None else value
    text = _text(value)
    if text is None:
        return None
    digits = text.split(".")[0]
    if digits.isdigit() and len(digits) in (8, 12, 14):
        return datetime.strptime(digits.ljust(14, "0"), "%Y%m%d%H%M%S")
    try:
        return datetime.fromisoformat(text)
    except ValueError:
        return None


# -- applying plans -----------------------------------------------------------------------------

@dataclass
class BuildReport:
    orders: int = 0
    added: int = 0
    updated: int = 0
    unchanged: int = 0
    closed: int = 0
    expired: int = 0
    incomplete: int = 0
    uids_generated: int = 0
    wl_written: int = 0
    wl_removed: int = 0
    lines: list[str] = field(default_factory=list)
    touched: set[int] = field(default_factory=set)  # item ids written by this run

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if isinstance(v, int)}


def build_worklist(sessions: Callable[[], Session], config: WorklistConfig, uid_root: str,
                   now: datetime, actor: str = "job:worklist_build") -> BuildReport:
    """One run of the job: every order scheduled since ``expire_after_h`` ago planned and applied,
    expired steps removed, the ``.wl`` folder brought in line; one transaction, one audit row."""
    report = BuildReport()
    cutoff = (now.astimezone() - timedelta(hours=config.expire_after_h + 24)).replace(tzinfo=None)
    with sessions() as session:
        connection = session.connection()
        orders = [dict(r._mapping) for r in connection.execute(
            select(ORDERS).where(Order.scheduled_at >= cutoff).order_by(Order.id))]
        report.orders = len(orders)
        _give_study_uids(connection, orders, uid_root, report)
        identities = _demographics(connection, [o["mrn"] for o in orders if _lacks_patient(o)])
        plans = {o["id"]: plan_order(o, identities.get(o["mrn"]), config) for o in orders}
        for order in orders:
            plan = plans[order["id"]]
            if plan.missing and plan.status is None:
                report.incomplete += 1
                report.lines.append(f"order #{order['id']}: not listed, {plan.missing}")
        apply_plans(connection, plans, now, report)
        report.expired = _remove_expired(connection, now)
        audit.record(session, actor, "worklist_built", None, now, **{
            k: v for k, v in report.counts().items() if not k.startswith("wl_")})
        session.commit()
    if config.wl_folder is not None:
        from gateway.worklist.files import sync_wl_folder

        with sessions() as session:
            written, removed = sync_wl_folder(session.connection(), config.wl_folder, now,
                                              report.touched)
        report.wl_written, report.wl_removed = written, removed
    report.lines.append(
        f"{report.orders} orders: {report.added} steps added, {report.updated} updated, "
        f"{report.unchanged} unchanged, {report.closed} closed, {report.expired} expired, "
        f"{report.incomplete} orders not listed")
    return report


def _lacks_patient(order: Mapping[str, Any]) -> bool:
    return not (order.get("patient_name") and order.get("birth_date") and order.get("sex"))


def _give_study_uids(connection: Connection, orders: list[dict[str, Any]], root: str,
                     report: BuildReport) -> None:
    """Once per order, written back, so a rebuild gives the same UID (the images carry it)."""
    given = []
    for order in orders:
        if not order.get("study_instance_uid"):
            order["study_instance_uid"] = new_uid(root)
            given.append({"order": order["id"], "uid": order["study_instance_uid"]})
    if given:
        connection.execute(
            update(ORDERS).where(ORDERS.c.id == bindparam("order"))
            .values(study_instance_uid=bindparam("uid")), given)
    report.uids_generated = len(given)


def new_uid(root: str) -> str:
    """A new UID under ``root`` from a random UUID (PS3.5 B.2: ``2.25.<UUID as integer>``; under
    another root its decimal digits, cut to the 64 characters a UID may have), as pydicom's
    ``generate_uid`` makes it, without its validation (a tenth of a 10,000-order build)."""
    return f"{root}.{uuid.uuid4().int}"[:UID_LENGTH].rstrip(".")


def _demographics(connection: Connection, mrns: Iterable[str]) -> dict[str, Demographics]:
    """Per MRN, the most recently updated identity row's values (each field from the newest row
    that has it)."""
    wanted = sorted(set(mrns))
    found: dict[str, Demographics] = {}
    table = IDENTITIES
    for first in range(0, len(wanted), CHUNK):
        rows = connection.execute(
            select(table.c.mrn, table.c.patient_name, table.c.birth_date, table.c.sex)
            .where(table.c.mrn.in_(wanted[first:first + CHUNK]))
            .order_by(table.c.updated_at.desc(), table.c.id.desc()))
        for mrn, name, birth, sex in rows:
            known = found.get(mrn)
            found[mrn] = Demographics(
                known.patient_name if known and known.patient_name else name,
                known.birth_date if known and known.birth_date else birth,
                known.sex if known and known.sex else sex)
    return found


def apply_plans(connection: Connection, plans: Mapping[int, OrderPlan], now: datetime,
                report: BuildReport,
                attributes: Mapping[tuple[int, str], str] | None = None) -> None:
    """Insert, update or close the steps of these orders. ``attributes`` (import only) sets the
    extras of the steps it names; otherwise they are left as they are."""
    items = ITEMS
    existing: dict[tuple[int, str], dict[str, Any]] = {}
    by_order: dict[int, list[dict[str, Any]]] = {}
    ids = list(plans)
    for first in range(0, len(ids), CHUNK):
        for stored in connection.execute(select(items).where(
                items.c.order_id.in_(ids[first:first + CHUNK]))):
            found = dict(stored._mapping)
            existing[(found["order_id"], found["step_id"])] = found
            by_order.setdefault(found["order_id"], []).append(found)
    stations = _stations(connection, [row["id"] for row in existing.values()])
    inserts: list[dict[str, Any]] = []
    updates: list[dict[str, Any]] = []
    station_rows: dict[tuple[int, str], tuple[str, ...]] = {}
    for order_id, plan in plans.items():
        if plan.missing and plan.status is None:
            continue  # not listable now: what is listed stays as it was
        planned = {step.step_id for step in plan.steps}
        for row in by_order.get(order_id, ()):
            # a closed order closes its steps; a step the order no longer lists is discontinued
            wanted = plan.status or ("DISCONTINUED" if row["step_id"] not in planned else None)
            if wanted and row["status"] not in CLOSED:
                updates.append({"item": row["id"], "status": wanted, "updated_at": now})
                report.closed += 1
                report.touched.add(row["id"])
        if plan.status is not None:
            continue  # a closed order adds no steps
        for step in plan.steps:
            key = (order_id, step.step_id)
            extra = attributes.get(key) if attributes else None
            current = existing.get(key)
            if current is None:
                inserts.append({"order_id": order_id, "step_id": step.step_id,
                                "status": "SCHEDULED", **step.values, "built_at": now,
                                "updated_at": now, "attributes": extra or "{}"})
                station_rows[key] = step.stations
                report.added += 1
                continue
            row = current
            changed = {k: v for k, v in step.values.items()
                       if k != "expires_at" and row.get(k) != v}
            if _utc(row["expires_at"]) != step.values["expires_at"]:
                changed["expires_at"] = step.values["expires_at"]
            if extra is not None and extra != row["attributes"]:
                changed["attributes"] = extra
            if sorted(stations.get(row["id"], ())) != sorted(step.stations):
                connection.execute(delete(STATIONS).where(
                    STATIONS.c.item_id == row["id"]))
                connection.execute(insert(STATIONS), [
                    {"item_id": row["id"], "station_ae": ae} for ae in step.stations])
                changed.setdefault("station_ae", step.values["station_ae"])
            if changed:
                connection.execute(update(items).where(items.c.id == row["id"])
                                   .values(**changed, updated_at=now))
                report.updated += 1
                report.touched.add(row["id"])
            else:
                report.unchanged += 1
    if updates:
        connection.execute(update(items).where(items.c.id == bindparam("item"))
                           .values(status=bindparam("status"),
                                   updated_at=bindparam("updated_at")), updates)
    if inserts:
        # A plain executemany, then the new ids read back: with RETURNING, SQLAlchemy sends
        # one INSERT of 1,000 rows' placeholders at a time, which psycopg re-parses without its
        # cache (4.3 s of a 9 s build of 10,000 orders on PostgreSQL); without, psycopg
        # prepares the statement once and pipelines the rows.
        connection.execute(insert(items), inserts)
        new_keys = set(station_rows)
        created = [
            (item_id, order_id, step_id)
            for first in range(0, len(ids), CHUNK)
            for item_id, order_id, step_id in connection.execute(
                select(items.c.id, items.c.order_id, items.c.step_id).where(
                    items.c.order_id.in_(ids[first:first + CHUNK])))
            if (order_id, step_id) in new_keys and (order_id, step_id) not in existing
        ]
        connection.execute(insert(STATIONS), [
            {"item_id": item_id, "station_ae": ae}
            for item_id, order_id, step_id in created
            for ae in station_rows[(order_id, step_id)]])
        report.touched.update(item_id for item_id, _, _ in created)


def _stations(connection: Connection, item_ids: list[int]) -> dict[int, tuple[str, ...]]:
    found: dict[int, list[str]] = {}
    table = STATIONS
    for first in range(0, len(item_ids), CHUNK):
        for item_id, ae in connection.execute(select(table.c.item_id, table.c.station_ae).where(
                table.c.item_id.in_(item_ids[first:first + CHUNK]))):
            found.setdefault(item_id, []).append(ae)
    return {k: tuple(v) for k, v in found.items()}


def _utc(value: datetime | None) -> datetime | None:
    """A stored time as an aware UTC datetime (SQLite gives it back without its zone)."""
    if value is None:
        return None
    return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


def _remove_expired(connection: Connection, now: datetime) -> int:
    """Rows of steps past their expiry, except those an MPPS refers to (kept for the record)."""
    items = ITEMS
    referenced = select(PERFORMED.c.worklist_item_id).where(
        PERFORMED.c.worklist_item_id.is_not(None))
    gone = select(items.c.id).where(items.c.expires_at <= now, items.c.id.not_in(referenced))
    connection.execute(delete(STATIONS).where(
        STATIONS.c.item_id.in_(gone)))
    result = connection.execute(delete(items).where(items.c.expires_at <= now,
                                                    items.c.id.not_in(referenced)))
    return int(result.rowcount or 0)


def touched_folder(folder: Path) -> Path:
    """The ``.wl`` folder, created with the ``lockfile`` wlmscpfs expects in it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "lockfile").touch(exist_ok=True)
    return folder
