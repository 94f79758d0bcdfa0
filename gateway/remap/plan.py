"""What the rules would change in one instance: a pure function of the object, the rules and the
study's decision, so the C-STORE handler, the rewrite worker, ``remap test`` and ``remap replay``
all compute the same thing.

A plan maps keywords to their new values (``None`` deletes the element); it lists only values
that differ from the object's, so an empty plan means the instance is kept as received. Rules
match against the object as received; actions run in order, each seeing the values the actions
before it left. Identity and order lookups go through a ``Resolver``: the database for a study's
first instance, and the study's stored decision for every later one, so a study gets one mapping.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, Protocol

from pydicom.dataset import Dataset
from pydicom.multival import MultiValue
from pydicom.uid import generate_uid

from gateway.remap.rules import (
    Action,
    CopyAction,
    DeleteAction,
    MapIdentityAction,
    Match,
    ReconcileOrderAction,
    RegenerateUidAction,
    RegexReplaceAction,
    Rule,
    RuleSet,
    SetAction,
)

Value = str | list[str] | list[dict[str, str]] | None
_MISSING = object()


@dataclass(frozen=True)
class Subject:
    """What rules match on besides the object's own elements."""

    calling_ae: str
    called_ae: str


@dataclass(frozen=True)
class Identity:
    mrn: str
    patient_name: str | None = None
    birth_date: str | None = None
    sex: str | None = None


@dataclass(frozen=True)
class OrderMatch:
    accession_number: str
    mrn: str
    requested_procedure_id: str | None = None
    requested_procedure_description: str | None = None
    patient_name: str | None = None
    birth_date: str | None = None
    sex: str | None = None


@dataclass(frozen=True)
class OrderQuery:
    accession_number: str | None
    study_instance_uid: str | None
    mrn: str | None
    modality: str | None
    study_at: datetime | None
    series_instance_uid: str | None = None  # the performed series an MPPS may have listed


@dataclass(frozen=True)
class OrderAnswer:
    """The order that fits, or the candidates when none or several do (``order`` is None)."""

    order: OrderMatch | None
    candidates: tuple[str, ...] = ()  # accession numbers
    why: str = ""


class Resolver(Protocol):
    def identity(self, issuer: str, local_id: str) -> Identity | None: ...

    def order(self, query: OrderQuery) -> OrderAnswer: ...


@dataclass(frozen=True)
class Settings:
    issuer_of_patient_id: str
    uid_root: str


@dataclass
class Plan:
    changes: dict[str, Value] = field(default_factory=dict)
    rules: list[str] = field(default_factory=list)
    holds: list[str] = field(default_factory=list)  # why the study must wait for an operator
    flags: list[str] = field(default_factory=list)  # unmatched lookups passed through unchanged
    reason: str = "COERCE"
    identity: Identity | None = None
    order: OrderAnswer | None = None

    @property
    def held(self) -> bool:
        return bool(self.holds)


def plain(value: Any) -> Value:
    """An element value as the plan stores it: text, a list of texts, or None."""
    if value is None or value is _MISSING:
        return None
    if isinstance(value, (MultiValue, list, tuple)):
        return [str(v) for v in value]
    return str(value)


class Working:
    """The object's top-level values with the plan's edits laid over them."""

    def __init__(self, ds: Dataset) -> None:
        self._ds = ds
        self.changes: dict[str, Value] = {}

    def get(self, keyword: str) -> Value:
        if keyword in self.changes:
            return self.changes[keyword]
        return self.original(keyword)

    def original(self, keyword: str) -> Value:
        if keyword not in self._ds:
            return None
        element = self._ds[keyword]
        value = element.value
        if element.VR == "SQ":
            return [{e.keyword: str(e.value) for e in item if e.keyword} for item in value or []] or None
        text = plain(value)
        return None if text == "" else text

    def set(self, keyword: str, value: Value) -> None:
        self.changes[keyword] = value

    def text(self, keyword: str) -> str | None:
        value = self.get(keyword)
        if isinstance(value, list):
            return str(value[0]) if value else None
        return value

    def differences(self) -> dict[str, Value]:
        return {k: v for k, v in self.changes.items() if v != self.original(k)}


def matches(match: Match, subject: Subject, ds: Dataset) -> bool:
    if match.calling_ae and subject.calling_ae not in match.calling_ae:
        return False
    if match.called_ae and subject.called_ae not in match.called_ae:
        return False
    if match.modality and str(ds.get("Modality", "")) not in match.modality:
        return False
    if match.sop_class and str(ds.get("SOPClassUID", "")) not in match.sop_class:
        return False
    for condition in match.tags:
        present = condition.tag in ds and ds[condition.tag].value not in (None, "")
        if condition.missing:
            if present:
                return False
            continue
        if condition.present:
            if not present:
                return False
            continue
        if not present:
            return False
        value = ds[condition.tag].value
        text = "\\".join(str(v) for v in value) if isinstance(value, MultiValue) else str(value)
        if condition.equals is not None and text != condition.equals:
            return False
        if condition.regex is not None and not re.search(condition.regex, text):
            return False
    return True


def matching_rules(rules: RuleSet, subject: Subject, ds: Dataset) -> list[Rule]:
    chosen = []
    for rule in rules.rules:
        if matches(rule.match, subject, ds):
            chosen.append(rule)
            if rule.final:
                break
    return chosen


def study_datetime(date: str | None, time: str | None) -> datetime | None:
    """DICOM DA + TM (local wall-clock time) -> a naive datetime; None when the date is unusable."""
    if not date:
        return None
    try:
        day = datetime.strptime(date.strip()[:8], "%Y%m%d")
    except ValueError:
        return None
    digits = re.sub(r"[^0-9]", "", (time or "").split(".")[0])[:6].ljust(6, "0")
    try:
        return day.replace(hour=int(digits[:2]), minute=int(digits[2:4]), second=int(digits[4:6]))
    except ValueError:
        return day


def make_plan(
    rules: RuleSet, subject: Subject, ds: Dataset, resolver: Resolver, settings: Settings
) -> Plan:
    plan = Plan()
    work = Working(ds)
    for rule in matching_rules(rules, subject, ds):
        plan.rules.append(rule.name)
        if rule.reason == "CORRECT":
            plan.reason = "CORRECT"
        for action in rule.actions:
            _apply(action, work, subject, resolver, settings, plan)
    plan.changes = work.differences()
    return plan


def _apply(
    action: Action,
    work: Working,
    subject: Subject,
    resolver: Resolver,
    settings: Settings,
    plan: Plan,
) -> None:
    if isinstance(action, SetAction):
        work.set(action.tag, list(action.value) if isinstance(action.value, list) else action.value)
    elif isinstance(action, CopyAction):
        value = work.get(action.source)
        if value is not None:
            work.set(action.tag, value)
    elif isinstance(action, DeleteAction):
        work.set(action.tag, None)
    elif isinstance(action, RegexReplaceAction):
        value = work.get(action.tag)
        if isinstance(value, str):
            work.set(action.tag, re.sub(action.pattern, action.replacement, value))
        elif isinstance(value, list):
            work.set(action.tag, [re.sub(action.pattern, action.replacement, str(v)) for v in value])
    elif isinstance(action, RegenerateUidAction):
        old = work.text(action.tag)
        if old:
            work.set(action.tag, regenerate_uid(old, settings.uid_root))
    elif isinstance(action, MapIdentityAction):
        _map_identity(action, work, subject, resolver, settings, plan)
    elif isinstance(action, ReconcileOrderAction):
        _reconcile_order(action, work, resolver, plan)


def regenerate_uid(old: str, root: str) -> str:
    """Deterministic: pydicom derives the UID from a hash of its entropy sources, so the same old
    UID gives the same new one on every instance, association and restart."""
    prefix = None if root == "2.25" else f"{root}."
    return str(generate_uid(prefix=prefix, entropy_srcs=[root, old]))


def _map_identity(
    action: MapIdentityAction,
    work: Working,
    subject: Subject,
    resolver: Resolver,
    settings: Settings,
    plan: Plan,
) -> None:
    local_id = work.text("PatientID")
    issuer = work.text("IssuerOfPatientID") or subject.calling_ae
    identity = resolver.identity(issuer, local_id) if local_id else None
    plan.identity = identity
    if identity is None:
        note = "no MRN known for this patient ID and issuer"
        (plan.holds if action.unmatched == "hold" else plan.flags).append(note)
        return
    work.set("PatientID", identity.mrn)
    work.set("IssuerOfPatientID", settings.issuer_of_patient_id)
    _demographics(work, identity.patient_name, identity.birth_date, identity.sex)


def _demographics(work: Working, name: str | None, birth: str | None, sex: str | None) -> None:
    for keyword, value in (("PatientName", name), ("PatientBirthDate", birth), ("PatientSex", sex)):
        if value:
            work.set(keyword, value)


def _reconcile_order(
    action: ReconcileOrderAction, work: Working, resolver: Resolver, plan: Plan
) -> None:
    answer = resolver.order(
        OrderQuery(
            accession_number=work.text("AccessionNumber"),
            study_instance_uid=work.text("StudyInstanceUID"),
            mrn=work.text("PatientID"),
            modality=work.text("Modality"),
            study_at=study_datetime(work.text("StudyDate"), work.text("StudyTime")),
            series_instance_uid=work.text("SeriesInstanceUID"),
        )
    )
    plan.order = answer
    order = answer.order
    if order is None:
        (plan.holds if action.unmatched == "hold" else plan.flags).append(answer.why)
        return
    work.set("PatientID", order.mrn)
    work.set("AccessionNumber", order.accession_number)
    _demographics(work, order.patient_name, order.birth_date, order.sex)
    item = {"AccessionNumber": order.accession_number}
    if order.requested_procedure_id:
        item["RequestedProcedureID"] = order.requested_procedure_id
    if order.requested_procedure_description:
        item["RequestedProcedureDescription"] = order.requested_procedure_description
    work.set("RequestAttributesSequence", [item])


def describe(changes: dict[str, Value], ds: Dataset) -> list[tuple[str, Value, Value]]:
    """(keyword, old, new) for printing; old values as the object holds them."""
    work = Working(ds)
    return [(keyword, work.original(keyword), new) for keyword, new in changes.items()]
