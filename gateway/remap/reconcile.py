"""Held studies, for an operator: what is waiting and why, and assigning one to an order.

An assignment replaces the study's decision (who made it is recorded, and an audit row keeps the
previous candidates), then every held instance of the study is planned with it, rewritten durably
and released in this process; instances that arrive meanwhile are released by the service's sweep.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from gateway import audit
from gateway.db.models import Instance, Order, StudyDecision
from gateway.errors import PermanentError
from gateway.remap.lookup import dump, order_match
from gateway.remap.plan import Identity
from gateway.remap.stage import Remapper


@dataclass(frozen=True)
class HeldStudy:
    study_instance_uid: str
    reason: str
    instances: int
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    modality: str | None
    study_date: str | None
    calling_ae: str | None
    candidates: list[Order]


def held_studies(session: Session) -> list[HeldStudy]:
    held = []
    for decision in session.scalars(
        select(StudyDecision).where(StudyDecision.state == "held").order_by(StudyDecision.decided_at)
    ):
        sample = session.scalars(
            select(Instance).where(Instance.study_instance_uid == decision.study_instance_uid).limit(1)
        ).first()
        count = session.scalar(
            select(func.count()).where(
                Instance.study_instance_uid == decision.study_instance_uid,
                Instance.remap_state == "held",
            )
        )
        accessions = json.loads(decision.candidates or "[]")
        candidates = list(
            session.scalars(select(Order).where(Order.accession_number.in_(accessions)))
        ) if accessions else []
        held.append(
            HeldStudy(
                study_instance_uid=decision.study_instance_uid,
                reason=decision.hold_reason or "",
                instances=int(count or 0),
                patient_id=sample.original_patient_id if sample else None,
                patient_name=sample.original_patient_name if sample else None,
                accession_number=sample.original_accession_number if sample else None,
                modality=sample.modality if sample else None,
                study_date=sample.study_date if sample else None,
                calling_ae=sample.calling_ae if sample else None,
                candidates=candidates,
            )
        )
    return held


@dataclass(frozen=True)
class Assignment:
    released: int
    rewritten: int


def assign(
    remapper: Remapper,
    session: Session,
    spool_root: Path,
    study: str,
    accession: str,
    actor: str,
    now: datetime | None = None,
) -> Assignment:
    """Decide a held study by an operator's choice of order, then release its instances."""
    now = now or datetime.now(UTC)
    with session.begin():
        decision = session.scalar(
            select(StudyDecision).where(StudyDecision.study_instance_uid == study)
        )
        if decision is None:
            raise PermanentError(f"study {study} has no remap decision; `gateway reconcile list` shows held studies")
        if decision.state != "held":
            raise PermanentError(f"study {study} is not held (its decision is {decision.state}); nothing to assign")
        order = session.scalar(select(Order).where(Order.accession_number == accession))
        if order is None:
            raise PermanentError(
                f"no order with accession number {accession}; import it with `gateway orders import` first"
            )
        matched = order_match(order)
        previous = {"reason": decision.hold_reason, "candidates": json.loads(decision.candidates)}
        if decision.identity is None:
            # The operator vouches for the order, and with it for the patient it names.
            decision.identity = dump(Identity(order.mrn, order.patient_name, order.birth_date, order.sex))
        decision.order_match = dump(matched)
        decision.state = "ready"
        decision.hold_reason = None
        decision.mrn = order.mrn
        decision.accession_number = order.accession_number
        decision.decided_by = actor
        decision.decided_at = now
        audit.record(session, actor, "study_assigned", study, now, accession=accession, previous=previous)
    released = remapper.release_held(spool_root, study)
    rewritten = remapper.rewrite_now(spool_root, released)
    return Assignment(len(released), rewritten)
