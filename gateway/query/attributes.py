"""Which attributes the ledger keeps for queries, at which level, and how ingest fills them.

PS3.4 C.6.1.1 (Patient Root) and C.6.2.1 (Study Root) name the keys per level; these are those
keys plus what viewers ask for. Each maps to one ``instances`` column holding the value the
instance carries (after remapping), so a query reads indexes and never opens a file. A level also
answers the keys of the levels above it (a study's patient), which are constant within it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from sqlalchemy.orm import InstrumentedAttribute

from gateway.db.models import Instance
from gateway.query.folding import fold_name

Level = str  # PATIENT | STUDY | SERIES | IMAGE
LEVELS: tuple[Level, ...] = ("PATIENT", "STUDY", "SERIES", "IMAGE")

_BY_LEVEL: dict[Level, dict[str, InstrumentedAttribute[Any]]] = {
    "PATIENT": {
        "PatientID": Instance.patient_id,
        "PatientName": Instance.patient_name,
        "IssuerOfPatientID": Instance.issuer_of_patient_id,
        "PatientBirthDate": Instance.patient_birth_date,
        "PatientSex": Instance.patient_sex,
    },
    "STUDY": {
        "StudyInstanceUID": Instance.study_instance_uid,
        "StudyDate": Instance.study_date,
        "StudyTime": Instance.study_time,
        "AccessionNumber": Instance.accession_number,
        "StudyID": Instance.study_id,
        "StudyDescription": Instance.study_description,
        "ReferringPhysicianName": Instance.referring_physician_name,
    },
    "SERIES": {
        "SeriesInstanceUID": Instance.series_instance_uid,
        "Modality": Instance.modality,
        "SeriesNumber": Instance.series_number,
        "SeriesDescription": Instance.series_description,
        "BodyPartExamined": Instance.body_part_examined,
        # PS3.3 C.7.5.1 General Equipment: the equipment's, so constant within a series
        "InstitutionName": Instance.institution_name,
    },
    "IMAGE": {
        "SOPInstanceUID": Instance.sop_instance_uid,
        "SOPClassUID": Instance.sop_class_uid,
        "InstanceNumber": Instance.instance_number,
    },
}
# The unique key of each level (PS3.4 C.6.1.1.1): what a level's rows are grouped by.
UNIQUE_KEY: dict[Level, str] = {
    "PATIENT": "PatientID",
    "STUDY": "StudyInstanceUID",
    "SERIES": "SeriesInstanceUID",
    "IMAGE": "SOPInstanceUID",
}
# Keys computed over the instances below a level (PS3.4 C.3.4 "additional keys").
COUNTED: dict[Level, tuple[str, ...]] = {
    "PATIENT": ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                "NumberOfPatientRelatedInstances"),
    "STUDY": ("NumberOfStudyRelatedSeries", "NumberOfStudyRelatedInstances", "ModalitiesInStudy"),
    "SERIES": ("NumberOfSeriesRelatedInstances",),
    "IMAGE": (),
}


# PN keys and the column holding their ``fold_name``, which matching compares in any case
# (gateway.query.matching); every writer of a name writes its folded copy in the same statement.
FOLDED: dict[str, InstrumentedAttribute[Any]] = {
    "PatientName": Instance.patient_name_folded,
    "ReferringPhysicianName": Instance.referring_physician_name_folded,
}


def columns_at(level: Level) -> dict[str, InstrumentedAttribute[Any]]:
    """The keys a level answers: its own and those of every level above it."""
    found: dict[str, InstrumentedAttribute[Any]] = {}
    for upper in LEVELS[: LEVELS.index(level) + 1]:
        found.update(_BY_LEVEL[upper])
    return found


# The query columns ingest fills from the header, and a remap may change: every key but the UIDs
# and the SOP class (a regenerated UID is the remap plan's business; the ledger keeps the received
# ones, which name the spool files).
_NOT_REMAPPED = {"StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "SOPClassUID"}
LEDGER_CARRIED: dict[str, InstrumentedAttribute[Any]] = {
    k: c for level in LEVELS for k, c in _BY_LEVEL[level].items() if k not in _NOT_REMAPPED
}


def ledger_values(ds: Dataset, changes: Mapping[str, Any]) -> dict[str, str | None]:
    """Column values for the carried keys: the remap's new value where it sets one, else the
    received one; and the folded copy of each name."""
    return _with_folded({
        key: _text(changes[keyword] if keyword in changes else _value(ds, tag), length)
        for keyword, tag, key, length in _CARRIED_CELLS
    })


def _value(ds: Dataset, tag: BaseTag) -> Any:
    """``ds.get(keyword)`` without looking the keyword up again for every instance."""
    element = ds.get(tag)
    return None if element is None else element.value


def changed_values(changes: Mapping[str, Any]) -> dict[str, str | None]:
    """Only the columns a remap plan changes, with the folded copy of a changed name: for
    instances planned after they were recorded."""
    return _with_folded({
        key: _text(changes[keyword], length)
        for keyword, _, key, length in _CARRIED_CELLS if keyword in changes
    })


def _with_folded(values: dict[str, str | None]) -> dict[str, str | None]:
    for name, folded in _FOLDED_CELLS:
        if name in values:
            values[folded] = fold_name(values[name])
    return values


def _text(raw: Any, length: int | None) -> str | None:
    """Text cut to the column's length: vendors overrun VR limits, and storage must not fail."""
    if isinstance(raw, list):
        raw = raw[0] if raw else None
    text = None if raw is None or raw == "" else str(raw)
    return text[:length] if text is not None and length else text


def _tag(keyword: str) -> BaseTag:
    tag = tag_for_keyword(keyword)
    assert tag is not None, f"{keyword} is not in pydicom's dictionary"
    return BaseTag(tag)


# (keyword, tag, column key, column length), worked out once: read for every received instance.
_CARRIED_CELLS: tuple[tuple[str, BaseTag, str, int | None], ...] = tuple(
    (keyword, _tag(keyword), column.key, getattr(column.type, "length", None))
    for keyword, column in LEDGER_CARRIED.items()
)
# (name column key, folded column key)
_FOLDED_CELLS: tuple[tuple[str, str], ...] = tuple(
    (LEDGER_CARRIED[keyword].key, column.key) for keyword, column in FOLDED.items()
)
