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

from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.tag import BaseTag, Tag
from sqlalchemy import ColumnElement, Engine, distinct, func, literal_column, select

from gateway.config import QueryConfig
from gateway.db.models import Instance
from gateway.dicom.status import Status
from gateway.query.attributes import COUNTED, FOLDED, LEVELS, UNIQUE_KEY, columns_at
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
                              config.case_insensitive_names, FOLDED.get(keyword))
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


@dataclass(frozen=True)
class Answer:
    """One match's identifier as (tag, VR, value) in ascending tag order: what is written on the
    wire, without building a Dataset unless pynetdicom must send it (``dataset``)."""

    elements: tuple[tuple[BaseTag, str, Any], ...]
    charset: str | None  # the Specific Character Set the values need, when not the default

    def dataset(self) -> Dataset:
        return Dataset({tag: DataElement(tag, vr, value) for tag, vr, value in self.elements})


def answers(query: Query, rows: list[dict[str, Any]], ae_title: str) -> Iterator[Answer]:
    """One identifier per match: the requested keys, filled or empty, and the character set
    the values need (PS3.4 C.4.1.1.3.2). Tags, VRs and their order are worked out once per
    query, not per row: a one-day query answers about a hundred studies."""
    layout: list[tuple[BaseTag, str, str | None, Any]] = [(_LEVEL, "CS", None, query.level)]
    layout += [(query.requested[k].tag, query.requested[k].VR, k, None) for k in query.keys]
    if "RetrieveAETitle" in query.requested:
        layout.append((_RETRIEVE_AE, "AE", None, ae_title))
    layout.sort(key=lambda entry: entry[0])
    charset = (_CHARSET, "CS", "ISO_IR 192")
    for row in rows:
        elements: list[tuple[BaseTag, str, Any]] = []
        non_ascii = False
        for tag, vr, keyword, constant in layout:
            value = constant if keyword is None else row.get(keyword)
            if vr == "SQ":
                value = []
            elif value == "":
                value = None
            elif isinstance(value, str) and not value.isascii():
                non_ascii = True
            elements.append((tag, vr, value))
        if non_ascii:
            yield Answer((charset, *elements), "ISO_IR 192")  # (0008,0005) sorts first
        else:
            yield Answer(tuple(elements), None)


def _text(element: DataElement) -> str:
    value = element.value
    if value is None:
        return ""
    if isinstance(value, (MultiValue, list)):
        return "\\".join(str(v) for v in value)
    return str(value)
