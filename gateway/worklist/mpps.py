"""MPPS SCP: Modality Performed Procedure Step N-CREATE and N-SET (PS3.4 Annex F) on the ledger.

The modality creates a step IN PROGRESS when the exam starts and sets it COMPLETED or
DISCONTINUED when it ends (IHE RAD-6, RAD-7). Each accepted transition, in one transaction:

- stores the step (``performed_steps``: the attributes as last set, in the DICOM JSON model) and
  the series it lists (``performed_series``), which remap follows from the images to the order;
- moves the worklist items its Scheduled Step Attributes name to STARTED, COMPLETED or
  DISCONTINUED (back to SCHEDULED when discontinued as the wrong worklist entry, so the exam can
  be performed again), and each of their orders to what its items add up to;
- writes an audit row (actor: the calling AE) and counts ``gateway_mpps_transitions_total``.

A refused request stores nothing and is answered with its status and an Error Comment
(``gateway.worklist.mpps_iod`` decides which). Logs carry UIDs, AE titles and statuses only.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, cast

from pydicom.dataset import Dataset
from pydicom.uid import generate_uid
from pynetdicom import evt
from sqlalchemy import Engine, delete, select, update
from sqlalchemy.exc import IntegrityError, SQLAlchemyError
from sqlalchemy.orm import Session

from gateway import audit
from gateway.db.models import Order, PerformedSeries, PerformedStep, WorklistItem
from gateway.dicom.status import Status
from gateway.metrics import Metrics
from gateway.query.gate import status_dataset
from gateway.worklist import mpps_iod
from gateway.worklist.mpps_iod import (
    COMPLETED,
    DISCONTINUED,
    FINAL,
    IN_PROGRESS,
    MAY_NO_LONGER_BE_UPDATED,
    Refusal,
    ScheduledStep,
)
from gateway.worklist.services import NReply

log = logging.getLogger(__name__)

# Worklist item (Scheduled Procedure Step) statuses, PS3.3 C.4.10 (0040,0020)
SPS_SCHEDULED = "SCHEDULED"
SPS_STARTED = "STARTED"
SPS_COMPLETED = "COMPLETED"
SPS_DISCONTINUED = "DISCONTINUED"
# Order statuses (orders.status); "discontinued": every step of the order was discontinued
ORDER_SCHEDULED = "scheduled"
ORDER_IN_PROGRESS = "in_progress"
ORDER_COMPLETED = "completed"
ORDER_DISCONTINUED = "discontinued"
ORDER_CANCELLED = "cancelled"

_ITEM_STATUS = {IN_PROGRESS: SPS_STARTED, COMPLETED: SPS_COMPLETED, DISCONTINUED: SPS_DISCONTINUED}
LABELS = {IN_PROGRESS: "in_progress", COMPLETED: "completed", DISCONTINUED: "discontinued"}


def order_status(item_statuses: Collection[str]) -> str:
    """An order's status from its worklist items': in progress while any is started or some are
    done and others still scheduled; completed once all ended and one completed."""
    statuses = set(item_statuses)
    ended = statuses & {SPS_COMPLETED, SPS_DISCONTINUED}
    if SPS_STARTED in statuses or (ended and ended != statuses):
        return ORDER_IN_PROGRESS
    if not ended:
        return ORDER_SCHEDULED
    return ORDER_COMPLETED if SPS_COMPLETED in ended else ORDER_DISCONTINUED


def match_items(session: Session, scheduled: list[ScheduledStep], modality: str
                ) -> list[WorklistItem]:
    """The worklist items a step performs: for each scheduled step it names, the items of its
    Study Instance UID, else of its Accession Number (the unscheduled case names neither), each
    narrowed to its Scheduled Procedure Step ID when it gives one and, if several remain, to the
    step's modality. Every match counts: one step may perform several (PS3.17 "group case")."""
    found: dict[int, WorklistItem] = {}
    for step in scheduled:
        for column, value in ((WorklistItem.study_instance_uid, step.study_instance_uid),
                              (WorklistItem.accession_number, step.accession_number)):
            if not value:
                continue
            items = list(session.scalars(select(WorklistItem).where(column == value)
                                         .order_by(WorklistItem.id)))
            if step.scheduled_procedure_step_id:
                items = [i for i in items if i.step_id == step.scheduled_procedure_step_id]
            if len(items) > 1 and modality:
                items = [i for i in items if i.modality == modality] or items
            if items:
                found.update((i.id, i) for i in items)
                break
    return list(found.values())


@dataclass
class _Outcome:
    """What one accepted transition changed, for the log, the audit row and the metric."""

    items: list[WorklistItem]
    orders: list[Order]


class PerformedStepService:
    """``gateway.worklist.services.PerformedSteps`` on the database. Never raises: pynetdicom would
    answer 0x0110 without saying why."""

    def __init__(self, engine: Engine, metrics: Metrics,
                 now: Callable[[], datetime] | None = None) -> None:
        self._engine = engine
        self._metrics = metrics
        self._now = now or (lambda: datetime.now(UTC))

    # -- N-CREATE ------------------------------------------------------------------------------

    def n_create(self, event: evt.Event, calling_ae: str) -> NReply:
        """N-CREATE (PS3.4 F.7.2.1): 0x0000, or 0x0111 for an instance that exists, 0x0117 for an
        invalid UID, 0x0120/0x0121/0x0106 for the attribute list, 0x0213 when the database is away.
        Without an Affected SOP Instance UID the SCP assigns one and returns it (PS3.7 10.1.5)."""
        request = cast(Any, event.request)
        uid = str(request.AffectedSOPInstanceUID or "")
        generated = not uid
        if generated:
            uid = str(generate_uid())
        elif not mpps_iod.valid_uid(uid):
            return self._refuse("N-CREATE", uid, calling_ae, Refusal(
                Status.INVALID_OBJECT_INSTANCE, "Affected SOP Instance UID is not a valid UID"))
        try:
            ds = event.attribute_list
            refusal = mpps_iod.check_create(ds)
            attributes = mpps_iod.to_json(ds) if refusal is None else ""
        except Exception as exc:  # noqa: BLE001 - untrusted bytes; the refusal says so
            log.debug("MPPS N-CREATE %s: attribute list not decodable: %s", uid,
                      type(exc).__name__)
            refusal = Refusal(Status.INVALID_ATTRIBUTE_VALUE, "attribute list cannot be decoded")
        if refusal is not None:
            return self._refuse("N-CREATE", uid, calling_ae, refusal)
        try:
            with Session(self._engine) as session, session.begin():
                if session.scalar(select(PerformedStep.id)
                                  .where(PerformedStep.sop_instance_uid == uid)) is not None:
                    return self._refuse("N-CREATE", uid, calling_ae, _duplicate())
                outcome = self._create(session, uid, ds, attributes, calling_ae)
        except IntegrityError:  # the same instance created at the same moment by another request
            return self._refuse("N-CREATE", uid, calling_ae, _duplicate())
        except SQLAlchemyError as exc:
            return self._unavailable("N-CREATE", uid, calling_ae, exc)
        self._transitioned("N-CREATE", uid, calling_ae, IN_PROGRESS, outcome)
        if generated:
            reply = Dataset()
            reply.AffectedSOPInstanceUID = uid  # pynetdicom moves it into the response
            return int(Status.SUCCESS), reply
        return int(Status.SUCCESS), None

    def _create(self, session: Session, uid: str, ds: Dataset, attributes: str,
                calling_ae: str) -> _Outcome:
        now = self._now()
        scheduled = mpps_iod.scheduled_steps(ds)
        series = mpps_iod.performed_series(ds)
        items = match_items(session, scheduled, str(ds.get("Modality") or ""))
        step = PerformedStep(
            sop_instance_uid=uid, status=IN_PROGRESS, calling_ae=calling_ae,
            worklist_item_id=items[0].id if items else None,
            accession_number=next((s.accession_number for s in scheduled if s.accession_number),
                                  None),
            study_instance_uid=next((s.study_instance_uid for s in scheduled
                                     if s.study_instance_uid), None),
            patient_id=str(ds.get("PatientID") or "") or None,
            performed_series=json.dumps(series), attributes=attributes,
            created_at=now, updated_at=now,
        )
        session.add(step)
        session.flush()
        session.add_all(PerformedSeries(performed_step_id=step.id, series_instance_uid=s)
                        for s in series)
        orders = _move(session, items, SPS_STARTED, now)
        self._audit(session, step, IN_PROGRESS, items, orders, calling_ae, now)
        return _Outcome(items, orders)

    # -- N-SET ---------------------------------------------------------------------------------

    def n_set(self, event: evt.Event, calling_ae: str) -> NReply:
        """N-SET (PS3.4 F.7.2.2): 0x0000, or 0x0112 for an unknown instance, 0x0110 with Error ID
        0xA710 once the step is COMPLETED or DISCONTINUED, 0x0105 for an attribute N-SET may not
        change, 0x0120/0x0121/0x0106 for the values, 0x0213 when the database is away."""
        uid = str(cast(Any, event.request).RequestedSOPInstanceUID or "")
        try:
            with Session(self._engine) as session, session.begin():
                step = session.scalar(select(PerformedStep)
                                      .where(PerformedStep.sop_instance_uid == uid)
                                      .with_for_update())
                if step is None:
                    return self._refuse("N-SET", uid, calling_ae, Refusal(
                        Status.NO_SUCH_OBJECT_INSTANCE, "no performed procedure step has this UID"),
                        n_set=True)
                if step.status in FINAL:
                    return self._refuse("N-SET", uid, calling_ae, _final(step.status), n_set=True)
                try:
                    modifications = event.modification_list
                    stored = mpps_iod.from_json(step.attributes)
                    refusal = mpps_iod.check_set(modifications, stored)
                    result = mpps_iod.merged(stored, modifications)
                    status = str(result.get("PerformedProcedureStepStatus") or "").strip()
                    if refusal is None and status in FINAL:
                        refusal = mpps_iod.check_final(result)
                    attributes = mpps_iod.to_json(result) if refusal is None else ""
                except Exception as exc:  # noqa: BLE001 - untrusted bytes; the refusal says so
                    log.debug("MPPS N-SET %s: modification list not decodable: %s", uid,
                              type(exc).__name__)
                    refusal = Refusal(Status.INVALID_ATTRIBUTE_VALUE,
                                      "modification list cannot be decoded")
                if refusal is not None:
                    return self._refuse("N-SET", uid, calling_ae, refusal, n_set=True)
                outcome = self._set(session, step, result, status, attributes, calling_ae)
                if outcome is None:  # another N-SET ended the step since it was read
                    return self._refuse("N-SET", uid, calling_ae, _final("final"), n_set=True)
        except SQLAlchemyError as exc:
            return self._unavailable("N-SET", uid, calling_ae, exc)
        if status in FINAL:
            self._transitioned("N-SET", uid, calling_ae, status, outcome)
        else:
            log.info("MPPS N-SET %s from %s: still %s", uid, calling_ae, IN_PROGRESS)
        return int(Status.SUCCESS), None

    def _set(self, session: Session, step: PerformedStep, result: Dataset, status: str,
             attributes: str, calling_ae: str) -> _Outcome | None:
        now = self._now()
        series = mpps_iod.performed_series(result)
        # Conditional on the step being as read: on SQLite ``with_for_update`` locks nothing,
        # and a step must never change once final, however two N-SETs interleave.
        changed = session.execute(
            update(PerformedStep)
            .where(PerformedStep.id == step.id, PerformedStep.status == IN_PROGRESS,
                   PerformedStep.attributes == step.attributes)
            .values(status=status, attributes=attributes, performed_series=json.dumps(series),
                    updated_at=now)
            .execution_options(synchronize_session=False)
        )
        if cast(Any, changed).rowcount != 1:
            return None
        session.execute(delete(PerformedSeries).where(PerformedSeries.performed_step_id == step.id))
        session.add_all(PerformedSeries(performed_step_id=step.id, series_instance_uid=s)
                        for s in series)
        if status not in FINAL:
            return _Outcome([], [])
        items = match_items(session, mpps_iod.scheduled_steps(result),
                            str(result.get("Modality") or ""))
        target = _ITEM_STATUS[status]
        if mpps_iod.wrong_worklist_entry(result):
            target = SPS_SCHEDULED  # IHE RAD TF-2 4.7.4.1.2.2: to be performed again
        orders = _move(session, items, target, now)
        session.execute(update(PerformedStep).where(PerformedStep.id == step.id)
                        .values(worklist_item_id=items[0].id if items else step.worklist_item_id)
                        .execution_options(synchronize_session=False))
        self._audit(session, step, status, items, orders, calling_ae, now)
        return _Outcome(items, orders)

    # -- shared --------------------------------------------------------------------------------

    def _audit(self, session: Session, step: PerformedStep, status: str,
               items: list[WorklistItem], orders: list[Order], calling_ae: str,
               now: datetime) -> None:
        audit.record(
            session, calling_ae, f"mpps_{LABELS[status]}", step.study_instance_uid, now,
            sop_instance_uid=step.sop_instance_uid, status=status,
            worklist_items=[i.id for i in items], orders=[o.accession_number for o in orders],
            accession_number=step.accession_number,
        )

    def _transitioned(self, operation: str, uid: str, calling_ae: str, status: str,
                      outcome: _Outcome) -> None:
        self._metrics.mpps_transitions.labels(LABELS[status]).inc()
        log.info("MPPS %s %s from %s: %s, %d worklist item(s), %d order(s) updated",
                 operation, uid, calling_ae, status, len(outcome.items), len(outcome.orders))

    def _refuse(self, operation: str, uid: str, calling_ae: str, refusal: Refusal,
                n_set: bool = False) -> NReply:
        log.warning("MPPS %s %s from %s refused %s: %s", operation, uid, calling_ae,
                    refusal.status.label, refusal.comment)
        reply = status_dataset(refusal.status, refusal.comment)
        if refusal.error_id is not None:
            reply.ErrorID = refusal.error_id
        if n_set and refusal.tags:  # pynetdicom's N-CREATE response cannot carry the list
            reply.AttributeIdentifierList = list(refusal.tags)
        return reply, None

    def _unavailable(self, operation: str, uid: str, calling_ae: str,
                     exc: SQLAlchemyError) -> NReply:
        log.error("MPPS %s %s from %s failed (%s); answering 0x0213 so it is sent again",
                  operation, uid, calling_ae, type(exc).__name__)
        log.debug("MPPS failure detail", exc_info=exc)
        return self._refuse(operation, uid, calling_ae, Refusal(
            Status.RESOURCE_LIMITATION, "database unavailable: send the step again later"))


def _duplicate() -> Refusal:
    return Refusal(Status.DUPLICATE_SOP_INSTANCE, "a performed procedure step has this UID")


def _final(status: str) -> Refusal:
    return Refusal(Status.PROCESSING_FAILURE,
                   f"step is {status}: it may no longer be updated",
                   error_id=MAY_NO_LONGER_BE_UPDATED)


def _move(session: Session, items: list[WorklistItem], status: str, now: datetime) -> list[Order]:
    """Worklist items to ``status``; each of their orders to what all its items add up to. A
    cancelled order stays cancelled: the RIS decided, and the step still records what was done."""
    for item in items:
        item.status = status
        item.updated_at = now
    session.flush()
    orders = []
    for order_id in dict.fromkeys(i.order_id for i in items):
        order = session.get(Order, order_id)
        if order is None or order.status == ORDER_CANCELLED:
            continue
        siblings = session.scalars(select(WorklistItem.status)
                                   .where(WorklistItem.order_id == order_id)).all()
        order.status = order_status(siblings)
        order.updated_at = now
        orders.append(order)
    return orders
