"""C-FIND: an identifier in, matching identifiers out (PS3.4 C.4.1), read from the ledger only.

Levels above IMAGE group the instance rows by the level's unique key; every key of a level is
constant within it, so filtering instance rows never changes a group's counts (Modalities in
Study, which is not constant, is matched through a sub-query instead). Keys the gateway does not
keep are answered empty, which PS3.4 C.2.2.1 allows for optional keys.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from sqlalchemy import ColumnElement, Engine, distinct, func, literal_column, select

from gateway.config import QueryConfig
from gateway.db.models import Instance
from gateway.dicom.status import Status
from gateway.query.attributes import COUNTED, LEVELS, UNIQUE_KEY, columns_at
from gateway.query.matching import condition

PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT = {STUDY_ROOT_FIND, "1.2.840.10008.5.1.4.1.2.2.2", "1.2.840.10008.5.1.4.1.2.2.3"}
_LEVEL = Tag(0x0008, 0x0052)
_RETRIEVE_AE = Tag(0x0008, 0x0054)
_CHARSET = Tag(0x0008, 0x0005)
_NOT_KEYS = {"QueryRetrieveLevel", "SpecificCharacterSet", "RetrieveAETitle"}


class QueryRefused(Exception):
    """The identifier cannot be answered; ``status`` says why on the wire."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status


@dataclass(frozen=True)
class Query:
    level: str
    keys: tuple[str, ...]  # requested, in identifier order
    where: tuple[ColumnElement[bool], ...]
    requested: Dataset


def parse(identifier: Dataset, model: str, dialect: str, config: QueryConfig) -> Query:
    """Check the level against the information model and turn the keys into conditions."""
    level = str(identifier.get("QueryRetrieveLevel", "")).strip().upper()
    if level not in LEVELS or (model in STUDY_ROOT and level == "PATIENT"):
        raise QueryRefused(Status.IDENTIFIER_DOES_NOT_MATCH_SOP_CLASS,
                           f"Query/Retrieve Level {level or '(missing)'} is not one of this model's")
    columns = columns_at(level)
    keys: list[str] = []
    where: list[ColumnElement[bool]] = []
    for element in identifier:
        keyword = element.keyword
        if not keyword or keyword in _NOT_KEYS:
            continue
        keys.append(keyword)
        value = _text(element)
        if keyword in columns:
            found = condition(columns[keyword], element.VR, value, dialect,
                              config.case_insensitive_names)
            if found is not None:
                where.append(found)
        elif keyword == "ModalitiesInStudy" and value.strip("*\\ "):
            wanted = [m.strip() for m in value.split("\\") if m.strip()]
            where.append(Instance.study_instance_uid.in_(
                select(Instance.study_instance_uid).where(Instance.modality.in_(wanted))))
    return Query(level, tuple(keys), tuple(where), identifier)


def run(engine: Engine, query: Query, limit: int) -> list[dict[str, Any]]:
    """At most ``limit`` + 1 rows, so the caller can tell the cap was reached."""
    columns = columns_at(query.level)
    if query.level == "IMAGE":
        statement = select(*(c.label(k) for k, c in columns.items())).where(*query.where)
        statement = statement.order_by(Instance.id).limit(limit + 1)
        with engine.connect() as c:
            return [dict(r._mapping) for r in c.execute(statement)]
    group = columns[UNIQUE_KEY[query.level]]
    selected: list[Any] = [group.label(UNIQUE_KEY[query.level])]
    selected += [func.max(c).label(k) for k, c in columns.items() if k != UNIQUE_KEY[query.level]]
    counted = {
        "NumberOfPatientRelatedStudies": func.count(distinct(Instance.study_instance_uid)),
        "NumberOfPatientRelatedSeries": func.count(distinct(Instance.series_instance_uid)),
        "NumberOfPatientRelatedInstances": func.count(),
        "NumberOfStudyRelatedSeries": func.count(distinct(Instance.series_instance_uid)),
        "NumberOfStudyRelatedInstances": func.count(),
        "NumberOfSeriesRelatedInstances": func.count(),
    }
    selected += [counted[k].label(k) for k in COUNTED[query.level] if k in counted]
    modalities = query.level == "STUDY" and "ModalitiesInStudy" in query.keys
    if modalities:  # aggregated in the same statement: one round trip per query
        if engine.dialect.name == "postgresql":
            listed = func.string_agg(distinct(Instance.modality), literal_column("','"))
        else:
            listed = func.group_concat(distinct(Instance.modality))
        selected.append(listed.label("ModalitiesInStudy"))
    statement = (
        select(*selected).where(*query.where).group_by(group)
        .order_by(func.min(Instance.id)).limit(limit + 1)
    )
    with engine.connect() as c:
        rows = [dict(r._mapping) for r in c.execute(statement)]
    if modalities:  # CS values hold neither commas nor backslashes
        for row in rows:
            row["ModalitiesInStudy"] = sorted(filter(None, (row["ModalitiesInStudy"] or "").split(",")))
    return rows


def answers(query: Query, rows: list[dict[str, Any]], ae_title: str) -> Iterator[Dataset]:
    """One identifier per match: the requested keys, filled or empty, and the character set
    the values need (PS3.4 C.4.1.1.3.2). Tags and VRs are looked up once per query, not per row:
    a one-day query answers about a hundred studies."""
    keys = [(k, query.requested[k].tag, query.requested[k].VR) for k in query.keys]
    retrieve_ae = "RetrieveAETitle" in query.requested
    for row in rows:
        elements: dict[BaseTag, DataElement | RawDataElement] = {
            _LEVEL: DataElement(_LEVEL, "CS", query.level)
        }
        non_ascii = False
        for keyword, tag, vr in keys:
            value = row.get(keyword)
            if vr == "SQ":
                value = []
            elif value == "":
                value = None
            elif isinstance(value, str) and not value.isascii():
                non_ascii = True
            elements[tag] = DataElement(tag, vr, value)
        if retrieve_ae:
            elements[_RETRIEVE_AE] = DataElement(_RETRIEVE_AE, "AE", ae_title)
        if non_ascii:
            elements[_CHARSET] = DataElement(_CHARSET, "CS", "ISO_IR 192")
        yield Dataset(elements)  # built from a dict in one go: cheaper than adding one by one


def _text(element: DataElement) -> str:
    value = element.value
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list)):
        return "\\".join(str(v) for v in value)
    return str(value)
