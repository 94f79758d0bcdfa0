"""What a Modality Worklist item holds (PS3.4 Table K.6-1) and where each attribute lives.

One ``worklist_items`` row is one Scheduled Procedure Step with its Requested Procedure, Imaging
Service Request and Patient: the attributes matched on have a column (``COLUMNS``); every other
attribute an item carries (an imported ``.wl`` file's Medical Alerts, Requested Procedure Code
Sequence, ...) is kept in ``attributes``, in the DICOM JSON model (PS3.18 F.2), and only returned.
The Scheduled Procedure Step's own attributes sit inside the one item of its sequence (0040,0100)
there, as they do in the data set.

Invariants: a column's value is the answer (the MPPS side changes ``status`` and the build job the
others, never ``attributes``), except Scheduled Station AE Title (VM 1-n): its column holds the
first value for display and matching goes through ``worklist_item_stations``; when an item has
several, ``attributes`` holds them all and they are answered from there.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Literal

from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag

Level = Literal["top", "sps"]
SPS_SEQUENCE = Tag(0x0040, 0x0100)  # Scheduled Procedure Step Sequence
SPS_KEY = "00400100"
STATION_KEY = "00400001"  # Scheduled Station AE Title
SPECIFIC_CHARACTER_SET = Tag(0x0008, 0x0005)
# SPS Status (0040,0020) values listed to modalities; COMPLETED and DISCONTINUED leave the list.
LISTED = ("SCHEDULED", "STARTED")
CLOSED = ("COMPLETED", "DISCONTINUED")


@dataclass(frozen=True)
class Attribute:
    keyword: str
    tag: BaseTag
    vr: str
    level: Level
    column: str  # WorklistItem attribute holding the value
    folded: str | None = None  # the column holding fold_name of a PN value


def _attribute(keyword: str, level: Level, column: str, folded: str | None = None) -> Attribute:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return Attribute(keyword, Tag(tag), dictionary_VR(tag), level, column, folded)


# Matching keys and return keys with a column (PS3.4 Table K.6-1; return key types in comments).
COLUMNS: dict[str, Attribute] = {a.keyword: a for a in (
    _attribute("AccessionNumber", "top", "accession_number"),  # 2
    _attribute("PatientName", "top", "patient_name", "patient_name_folded"),  # 1
    _attribute("PatientID", "top", "patient_id"),  # 1
    _attribute("IssuerOfPatientID", "top", "issuer_of_patient_id"),  # 3
    _attribute("PatientBirthDate", "top", "birth_date"),  # 2
    _attribute("PatientSex", "top", "sex"),  # 2
    _attribute("StudyInstanceUID", "top", "study_instance_uid"),  # 1
    _attribute("RequestedProcedureID", "top", "requested_procedure_id"),  # 1
    _attribute("RequestedProcedureDescription", "top", "requested_procedure_description"),  # 1C
    _attribute("ReferringPhysicianName", "top", "referring_physician"),  # 2
    _attribute("Modality", "sps", "modality"),  # 1
    _attribute("ScheduledStationAETitle", "sps", "station_ae"),  # 1
    _attribute("ScheduledStationName", "sps", "station_name"),  # 2
    _attribute("ScheduledProcedureStepStartDate", "sps", "start_date"),  # 1
    _attribute("ScheduledProcedureStepStartTime", "sps", "start_time"),  # 1
    _attribute("ScheduledPerformingPhysicianName", "sps", "performing_physician",
               "performing_physician_folded"),  # 2
    _attribute("ScheduledProcedureStepDescription", "sps", "step_description"),  # 1C
    _attribute("ScheduledProcedureStepID", "sps", "step_id"),  # 1
    _attribute("ScheduledProcedureStepStatus", "sps", "status"),  # 3
)}
TOP_COLUMNS = {a.tag: a for a in COLUMNS.values() if a.level == "top"}
SPS_COLUMNS = {a.tag: a for a in COLUMNS.values() if a.level == "sps"}

# What an empty Scheduled Procedure Step Sequence item asks for (PS3.4 C.2.2.2.6: universal
# matching of a sequence returns its attributes): every SPS attribute of Table K.6-1, as
# wlmscpfs expands it, plus whatever else the item's step holds.
SPS_RETURN_KEYWORDS = (
    "Modality", "RequestedContrastAgent", "ScheduledStationAETitle",
    "ScheduledProcedureStepStartDate", "ScheduledProcedureStepStartTime",
    "ScheduledPerformingPhysicianName", "ScheduledProcedureStepDescription",
    "ScheduledProtocolCodeSequence", "ScheduledProcedureStepID", "ScheduledStationName",
    "ScheduledProcedureStepLocation", "PreMedication", "ScheduledProcedureStepStatus",
    "CommentsOnTheScheduledProcedureStep",
)


def _tag_of(keyword: str) -> BaseTag:
    tag = tag_for_keyword(keyword)
    assert tag is not None, keyword
    return Tag(tag)


SPS_RETURN = tuple((_tag_of(k), dictionary_VR(_tag_of(k))) for k in SPS_RETURN_KEYWORDS)


def json_key(tag: BaseTag) -> str:
    return f"{int(tag):08X}"


# -- the DICOM JSON model (PS3.18 F.2), read without building a pydicom Dataset -------------------

def json_value(element: dict[str, Any]) -> tuple[str, Any]:
    """(VR, value) of one DICOM JSON element as pydicom takes it: None when empty, a str or
    number for one value, a list for several, a list of Datasets for a sequence."""
    vr = str(element.get("vr", "UN"))
    values = element.get("Value")
    if vr == "SQ":
        return vr, [Dataset.from_json(item) for item in values or []]
    if not values:
        return vr, None
    if vr == "PN":
        values = [_person_name(v) for v in values]
    return vr, values[0] if len(values) == 1 else list(values)


def _person_name(value: Any) -> str:
    if not isinstance(value, dict):
        return "" if value is None else str(value)
    groups = [value.get(g, "") or "" for g in ("Alphabetic", "Ideographic", "Phonetic")]
    return "=".join(groups).rstrip("=")


def to_json(ds: Dataset) -> dict[str, Any]:
    """A data set in the DICOM JSON model; binary values inline (worklist items hold none)."""
    return ds.to_json_dict(bulk_data_threshold=1 << 30)


def load_attributes(text: str | None) -> dict[str, Any]:
    if not text or text == "{}":
        return {}
    found = json.loads(text)
    return found if isinstance(found, dict) else {}


def dump_attributes(attributes: dict[str, Any]) -> str:
    return json.dumps(attributes, ensure_ascii=False, sort_keys=True, separators=(",", ":"))


def sps_attributes(attributes: dict[str, Any]) -> dict[str, Any]:
    """The Scheduled Procedure Step's own extra attributes (inside its one sequence item)."""
    sequence = attributes.get(SPS_KEY)
    items = sequence.get("Value") if isinstance(sequence, dict) else None
    return items[0] if items and isinstance(items[0], dict) else {}


def text_of(value: Any) -> str | None:
    """A data element's value as the text a column keeps (multiple values joined with \\)."""
    if value is None or value == "":
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        return "\\".join(str(v) for v in value) or None
    return str(value)


def station_titles(value: Any) -> list[str]:
    """The AE titles of a Scheduled Station AE Title value (VM 1-n), without padding."""
    text = text_of(value) or ""
    return [t.strip() for t in text.split("\\") if t.strip()]


def split_dataset(ds: Dataset) -> tuple[dict[str, Any], dict[str, Any], Dataset]:
    """An item's data set -> (top-level column values, SPS column values by keyword, what has no
    column as a Dataset: the extras, with the step's own extras inside its one SPS item).
    Only the first Scheduled Procedure Step item is read: callers split several steps first."""
    top: dict[str, Any] = {}
    sps: dict[str, Any] = {}
    extras = Dataset()
    for element in ds:
        if element.tag == SPECIFIC_CHARACTER_SET or element.tag.group == 0x0002:
            continue
        if element.tag == SPS_SEQUENCE:
            continue
        column = TOP_COLUMNS.get(element.tag)
        if column is not None:
            top[column.keyword] = element.value
        else:
            extras.add(element)
    steps = ds.get("ScheduledProcedureStepSequence") or []
    if steps:
        step_extras = Dataset()
        for element in steps[0]:
            column = SPS_COLUMNS.get(element.tag)
            if column is not None:
                sps[column.keyword] = element.value
                if column.keyword == "ScheduledStationAETitle" and \
                        len(station_titles(element.value)) > 1:
                    step_extras.add(element)  # all of them; the column keeps the first
            else:
                step_extras.add(element)
        if len(step_extras):
            extras.add(DataElement(SPS_SEQUENCE, "SQ", [step_extras]))
    return top, sps, extras


def extra_elements(attributes: dict[str, Any]) -> Iterable[tuple[str, dict[str, Any]]]:
    """The top-level extras, without the SPS sequence (its item is read by ``sps_attributes``)."""
    return ((k, v) for k, v in attributes.items() if k != SPS_KEY and isinstance(v, dict))
