"""Resolvers: where a plan's identity and order questions are answered.

``DbResolver`` asks the identity and orders tables (a study's first instance); ``StoredResolver``
replays a study's stored decision (every later instance, and operators' assignments), so all
instances of a study get the same answers even if the tables change in between.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from datetime import timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.db.models import (
    Order,
    PatientIdentity,
    PerformedSeries,
    PerformedStep,
    StudyDecision,
    WorklistItem,
)
from gateway.remap.plan import Identity, OrderAnswer, OrderMatch, OrderQuery
from gateway.worklist.mpps_iod import links

OPEN_ORDER_STATES = ("scheduled", "in_progress")


def order_match(order: Order) -> OrderMatch:
    return OrderMatch(
        accession_number=order.accession_number,
        mrn=order.mrn,
        requested_procedure_id=order.requested_procedure_id,
        requested_procedure_description=order.requested_procedure_description,
        patient_name=order.patient_name,
        birth_date=order.birth_date,
        sex=order.sex,
    )


class DbResolver:
    def __init__(self, session: Session, window: timedelta) -> None:
        self._session = session
        self._window = window

    def identity(self, issuer: str, local_id: str) -> Identity | None:
        row = self._session.scalar(
            select(PatientIdentity).where(
                PatientIdentity.issuer == issuer, PatientIdentity.local_id == local_id
            )
        )
        if row is None:
            return None
        return Identity(row.mrn, row.patient_name, row.birth_date, row.sex)

    def order(self, query: OrderQuery) -> OrderAnswer:
        """Accession known -> that order; a pre-assigned Study Instance UID -> that order; the
        order a performed procedure step names for the series or study (MPPS); otherwise MRN +
        modality + study time within the window, which must leave exactly one."""
        if query.accession_number:
            known = self._session.scalar(
                select(Order).where(Order.accession_number == query.accession_number)
            )
            if known is not None:
                return OrderAnswer(order_match(known))
        if query.study_instance_uid:
            assigned = self._session.scalars(
                select(Order).where(Order.study_instance_uid == query.study_instance_uid)
            ).all()
            if len(assigned) == 1:
                return OrderAnswer(order_match(assigned[0]))
        performed = self._performed(query)
        if performed is not None:
            return performed
        if not (query.mrn and query.modality and query.study_at):
            return OrderAnswer(None, (), "no known accession, and no MRN, modality or study date to match orders by")
        candidates = self._session.scalars(
            select(Order)
            .where(
                Order.mrn == query.mrn,
                Order.modality == query.modality,
                Order.status.in_(OPEN_ORDER_STATES),
                Order.scheduled_at >= query.study_at - self._window,
                Order.scheduled_at <= query.study_at + self._window,
            )
            .order_by(Order.scheduled_at)
        ).all()
        if len(candidates) == 1:
            return OrderAnswer(order_match(candidates[0]))
        accessions = tuple(c.accession_number for c in candidates)
        why = "no order matches" if not candidates else f"{len(candidates)} orders match"
        return OrderAnswer(None, accessions, f"{why} by MRN, modality and study date")


    def _performed(self, query: OrderQuery) -> OrderAnswer | None:
        """The orders the modality said it performed (PS3.4 F.7, ``gateway.worklist.mpps``): the
        steps listing the image's series, else the steps of its study. A step discontinued as
        the wrong worklist entry names none. None when no step names an order."""
        steps: list[PerformedStep] = []
        if query.series_instance_uid:
            steps = list(self._session.scalars(
                select(PerformedStep)
                .join(PerformedSeries, PerformedSeries.performed_step_id == PerformedStep.id)
                .where(PerformedSeries.series_instance_uid == query.series_instance_uid)
            ))
        if not steps and query.study_instance_uid:
            steps = list(self._session.scalars(
                select(PerformedStep)
                .where(PerformedStep.study_instance_uid == query.study_instance_uid)
            ))
        accessions: set[str] = set()
        items: set[int] = set()
        for step in steps:
            named = links(step.attributes)
            if named.wrong_entry:
                continue
            accessions.update(named.accessions)
            if step.worklist_item_id is not None:
                items.add(step.worklist_item_id)
        if not (accessions or items):
            return None
        orders = list(self._session.scalars(
            select(Order).where(
                Order.accession_number.in_(accessions)
                | Order.id.in_(select(WorklistItem.order_id).where(WorklistItem.id.in_(items)))
            ).order_by(Order.accession_number)
        ))
        if len(orders) == 1:
            return OrderAnswer(order_match(orders[0]))
        if not orders:
            return None
        return OrderAnswer(None, tuple(o.accession_number for o in orders),
                           f"{len(orders)} orders named by performed procedure steps")


class StoredResolver:
    """Answers exactly what the study's decision recorded."""

    def __init__(self, decision: StudyDecision) -> None:
        self._identity = _load(decision.identity, Identity)
        self._order = _load(decision.order_match, OrderMatch)
        self._candidates = tuple(json.loads(decision.candidates or "[]"))
        self._why = decision.hold_reason or "no order decided for this study"

    def identity(self, issuer: str, local_id: str) -> Identity | None:
        return self._identity

    def order(self, query: OrderQuery) -> OrderAnswer:
        if self._order is None:
            return OrderAnswer(None, self._candidates, self._why)
        return OrderAnswer(self._order)


def _load(text: str | None, kind: Any) -> Any:
    return kind(**json.loads(text)) if text else None


def dump(value: Identity | OrderMatch | None) -> str | None:
    return json.dumps(asdict(value), sort_keys=True) if value is not None else None
