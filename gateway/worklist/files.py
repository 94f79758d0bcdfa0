"""Worklist items as DCMTK ``.wl`` files, both ways: importing one (a data set with a Scheduled
Procedure Step Sequence, as ``dump2dcm`` makes from DCMTK's ``wklist*.dump``) as an order and its
steps, and writing every listed step into a folder for sites that already run ``wlmscpfs``.

An import keeps the file's values: its Study Instance UID, Accession Number, SPS ID and every
attribute without a column (kept in ``attributes``), so the gateway and ``wlmscpfs`` serving the
same file answer alike. The order it makes lists the steps in ``procedure_steps``, so the build
job plans the same steps from it again and changes nothing.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid
from sqlalchemy import Connection, select
from sqlalchemy.orm import Session

from gateway import audit
from gateway.config import WorklistConfig
from gateway.db.models import Order
from gateway.worklist.build import ITEMS, BuildReport, apply_plans, plan_order, touched_folder
from gateway.worklist.items import (
    LISTED,
    SPS_COLUMNS,
    SPS_KEY,
    SPS_SEQUENCE,
    STATION_KEY,
    TOP_COLUMNS,
    dump_attributes,
    load_attributes,
    split_dataset,
    station_titles,
    text_of,
    to_json,
)

MODALITY_WORKLIST_FIND = "1.2.840.10008.5.1.4.31"


@dataclass(frozen=True)
class Imported:
    accession_number: str
    steps: int
    added: int
    updated: int


def import_worklist_file(session: Session, path: Path, config: WorklistConfig, actor: str,
                         now: datetime) -> Imported:
    """One ``.wl`` file -> its order (added, or updated when its accession number is known) and
    one worklist item per Scheduled Procedure Step. ValueError says what the file lacks."""
    ds = dcmread(path, force=True)
    steps = list(ds.get("ScheduledProcedureStepSequence") or [])
    if not steps:
        raise ValueError("no Scheduled Procedure Step Sequence (0040,0100): not a worklist item")
    accession = text_of(ds.get("AccessionNumber"))
    mrn = text_of(ds.get("PatientID"))
    if not accession or not mrn:
        raise ValueError("no Accession Number or Patient ID: orders are kept by both")
    listed = [_step(step) for step in steps]
    first = listed[0]
    values: dict[str, Any] = {
        "accession_number": accession,
        "mrn": mrn,
        "modality": first["modality"] or "",
        "scheduled_at": _start(first["start"]),
        "requested_procedure_id": text_of(ds.get("RequestedProcedureID")),
        "requested_procedure_description": text_of(ds.get("RequestedProcedureDescription")),
        "study_instance_uid": text_of(ds.get("StudyInstanceUID")),
        "patient_name": text_of(ds.get("PatientName")),
        "birth_date": text_of(ds.get("PatientBirthDate")),
        "sex": text_of(ds.get("PatientSex")),
        "issuer_of_patient_id": text_of(ds.get("IssuerOfPatientID")),
        "referring_physician": text_of(ds.get("ReferringPhysicianName")),
        # the first title (the column is one AE title); procedure_steps keeps them all
        "scheduled_station_ae": next(iter(station_titles(first["station_ae"])), None),
        "scheduled_station_name": first["station_name"],
        "performing_physician": first["performing_physician"],
        "procedure_steps": json.dumps(listed, ensure_ascii=False),
        "status": "scheduled",
    }
    order = session.scalars(select(Order).where(Order.accession_number == accession)).first()
    if order is None:
        order = Order(**values, updated_at=now)
        session.add(order)
    else:
        for key, value in values.items():
            setattr(order, key, value)
        order.updated_at = now
    session.flush()
    coded = bool(ds.get("RequestedProcedureCodeSequence")) and all(
        step.get("ScheduledProtocolCodeSequence") for step in steps)
    plan = plan_order({c.key: getattr(order, c.key) for c in Order.__table__.columns}, None,
                      config, coded)
    if plan.missing:
        raise ValueError(plan.missing)
    extras = {}
    for step, planned in zip(steps, plan.steps, strict=True):
        one = Dataset()
        for element in ds:
            one.add(element if element.tag != SPS_SEQUENCE
                    else DataElement(SPS_SEQUENCE, "SQ", [step]))
        _, _, rest = split_dataset(one)
        extras[(order.id, planned.step_id)] = dump_attributes(to_json(rest))
    report = BuildReport()
    apply_plans(session.connection(), {order.id: plan}, now, report, extras)
    audit.record(session, actor, "worklist_imported", order.study_instance_uid, now,
                 file=path.name, steps=len(plan.steps), added=report.added,
                 updated=report.updated)
    return Imported(accession, len(plan.steps), report.added, report.updated)


def _step(step: Dataset) -> dict[str, Any]:
    """One SPS item as an entry of ``orders.procedure_steps``."""
    date = text_of(step.get("ScheduledProcedureStepStartDate")) or ""
    time = (text_of(step.get("ScheduledProcedureStepStartTime")) or "").split(".")[0]
    return {
        "step_id": text_of(step.get("ScheduledProcedureStepID")),
        "description": text_of(step.get("ScheduledProcedureStepDescription")),
        "modality": text_of(step.get("Modality")),
        "station_ae": text_of(step.get("ScheduledStationAETitle")),
        "station_name": text_of(step.get("ScheduledStationName")),
        "performing_physician": text_of(step.get("ScheduledPerformingPhysicianName")),
        "start": date + time.ljust(6, "0")[:6] if date else None,
    }


def _start(value: str | None) -> datetime:
    if not value:
        raise ValueError("no Scheduled Procedure Step Start Date (0040,0002)")
    try:
        return datetime.strptime(value, "%Y%m%d%H%M%S")
    except ValueError:
        raise ValueError(f"Scheduled Procedure Step Start Date/Time {value!r} is not a "
                         "date and time") from None


# -- the .wl folder -----------------------------------------------------------------------------

def item_dataset(row: dict[str, Any]) -> Dataset:
    """A worklist item's whole data set, as a ``.wl`` file holds it: every column (empty when
    unknown), the extras, and Specific Character Set ISO_IR 192 when a value is not ASCII."""
    extras = load_attributes(row.get("attributes"))
    step_extras = extras.get(SPS_KEY, {}).get("Value", [{}])[0] if SPS_KEY in extras else {}
    ds = Dataset.from_json({k: v for k, v in extras.items() if k != SPS_KEY})
    step = Dataset.from_json({k: v for k, v in step_extras.items() if k != STATION_KEY})
    for attribute in TOP_COLUMNS.values():
        ds.add(DataElement(attribute.tag, attribute.vr, row.get(attribute.column)))
    for attribute in SPS_COLUMNS.values():
        step.add(DataElement(attribute.tag, attribute.vr, row.get(attribute.column)))
    if STATION_KEY in step_extras:
        step.ScheduledStationAETitle = step_extras[STATION_KEY].get("Value")
    ds.ScheduledProcedureStepSequence = [step]
    if not _ascii(ds):
        ds.add(DataElement(0x00080005, "CS", "ISO_IR 192"))
    return ds


def _ascii(ds: Dataset) -> bool:
    for element in ds.iterall():
        value = element.value
        values = value if isinstance(value, (list, tuple)) else [value]
        if any(not str(v).isascii() for v in values if v is not None and element.VR != "SQ"):
            return False
    return True


def sync_wl_folder(connection: Connection, folder: Path, now: datetime,
                   touched: set[int]) -> tuple[int, int]:
    """One ``item-<id>.wl`` per listed step: written when the step changed in this run or the
    file is missing (atomically: a temporary name wlmscpfs does not read, then renamed), and
    removed once the step leaves the list. Returns (written, removed)."""
    touched_folder(folder)
    items = ITEMS
    listed = {row["id"]: row for row in (dict(r._mapping) for r in connection.execute(
        select(items).where(items.c.status.in_(LISTED), items.c.expires_at > now)))}
    present = {p.name for p in folder.glob("item-*.wl")}
    written = removed = 0
    for item_id, row in listed.items():
        name = f"item-{item_id}.wl"
        if item_id in touched or name not in present:
            _write(item_dataset(row), folder / name)
            written += 1
    for name in present - {f"item-{i}.wl" for i in listed}:
        (folder / name).unlink(missing_ok=True)
        removed += 1
    return written, removed


def _write(ds: Dataset, path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = UID(MODALITY_WORKLIST_FIND)
    meta.MediaStorageSOPInstanceUID = generate_uid()  # the item has no SOP Instance of its own
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    partial = path.with_name(f".{path.name}.tmp")
    ds.save_as(partial, enforce_file_format=True)
    os.replace(partial, path)
