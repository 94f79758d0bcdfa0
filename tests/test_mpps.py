"""MPPS SCP (PS3.4 Annex F) as a modality sees it: a pynetdicom SCU creates and sets performed
procedure steps on the running gateway; the statuses on the wire, the rows in the ledger (step,
worklist item, order, audit), the metric, remap's order choice and ``gateway status`` show what it
did. Worklist items are inserted directly (the build job is tested on its own)."""

from __future__ import annotations

import json
import logging
import subprocess
import threading
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.tag import Tag
from pydicom.uid import generate_uid
from pynetdicom import AE
from sqlalchemy import Engine, create_engine
from sqlalchemy.orm import Session

from gateway.app import Gateway
from gateway.db.models import Order, WorklistItem
from gateway.dicom.status import Status
from gateway.receive.fastpath import RequestingAssociation
from gateway.worklist.mpps import PerformedStepService, order_status
from tests.conftest import GATEWAY_BIN, rows, wait_for
from tests.factory import CT_IMAGE_STORAGE, make_dataset, write_file, write_study
from tests.peers import dcmtk

MPPS = "1.2.840.10008.3.1.2.3.3"
SECURITY = {
    "unknown_callers": ["echo", "store"],
    "peers": [{"ae_title": "CT1", "services": ["echo", "store", "worklist"]},
              {"ae_title": "CT2", "services": ["echo", "store"]}],
}
NAME = "Müller^Jürgen"
PHYSICIAN = "Ärztin^Eva"
PATIENT_ID = "MPPSPID-3391"
ACCESSION = "MPPSACC-77"


def today() -> str:
    return datetime.now().strftime("%Y%m%d")


@pytest.fixture
def app(make_gateway: Callable[..., Gateway], db_url: str) -> Gateway:
    return make_gateway(db=db_url, security=SECURITY)


def schedule(engine: Engine, accession: str = ACCESSION, study: str | None = None,
             steps: tuple[str, ...] = ("SPS1",), modality: str = "CT") -> tuple[int, str]:
    """An order and its worklist items, as the build job would leave them: (order id, study)."""
    study = study or generate_uid()
    now = datetime.now(UTC)
    with Session(engine) as session, session.begin():
        order = Order(accession_number=accession, mrn=PATIENT_ID, modality=modality,
                      scheduled_at=datetime.now().replace(microsecond=0), status="scheduled",
                      study_instance_uid=study, patient_name=NAME, updated_at=now)
        session.add(order)
        session.flush()
        for step in steps:
            session.add(WorklistItem(
                order_id=order.id, step_id=step, status="SCHEDULED", accession_number=accession,
                patient_id=PATIENT_ID, patient_name=NAME, study_instance_uid=study,
                modality=modality, station_ae="CT1", start_date=today(), start_time="101500",
                expires_at=now, built_at=now, updated_at=now))
        return order.id, study


def n_create_dataset(study: str, accession: str = ACCESSION, sps: str = "SPS1",
                     **overrides: Any) -> Dataset:
    """Every Type 1 and Type 2 attribute of PS3.4 Table F.7.2-1, as a modality sends them."""
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    item = Dataset()
    item.StudyInstanceUID = study
    item.ReferencedStudySequence = []
    item.AccessionNumber = accession
    item.RequestedProcedureID = "RP1"
    item.RequestedProcedureDescription = "CT HEAD"
    item.ScheduledProcedureStepID = sps
    item.ScheduledProcedureStepDescription = "CT HEAD"
    item.ScheduledProtocolCodeSequence = []
    ds.ScheduledStepAttributesSequence = [item]
    ds.PatientName = NAME
    ds.PatientID = PATIENT_ID
    ds.PatientBirthDate = "19800202"
    ds.PatientSex = "F"
    ds.ReferencedPatientSequence = []
    ds.PerformedProcedureStepID = "PPS-1"
    ds.PerformedStationAETitle = "CT1"
    ds.PerformedStationName = "ROOM 1"
    ds.PerformedLocation = ""
    ds.PerformedProcedureStepStartDate = today()
    ds.PerformedProcedureStepStartTime = "101700"
    ds.PerformedProcedureStepStatus = "IN PROGRESS"
    ds.PerformedProcedureStepDescription = "CT HEAD"
    ds.PerformedProcedureTypeDescription = ""
    ds.ProcedureCodeSequence = []
    ds.PerformedProcedureStepEndDate = ""
    ds.PerformedProcedureStepEndTime = ""
    ds.Modality = "CT"
    ds.StudyID = "1"
    ds.PerformedProtocolCodeSequence = []
    ds.PerformedSeriesSequence = []
    for keyword, value in overrides.items():
        if value is None:
            delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def series_item(series: str, instances: Sequence[str], **overrides: Any) -> Dataset:
    item = Dataset()
    item.PerformingPhysicianName = PHYSICIAN
    item.ProtocolName = "HEAD"
    item.OperatorsName = "Tech^Ünal"
    item.SeriesInstanceUID = series
    item.SeriesDescription = "axial"
    item.RetrieveAETitle = ""
    references = []
    for uid in instances:
        reference = Dataset()
        reference.ReferencedSOPClassUID = CT_IMAGE_STORAGE
        reference.ReferencedSOPInstanceUID = uid
        references.append(reference)
    item.ReferencedImageSequence = references
    item.ReferencedNonImageCompositeSOPInstanceSequence = []
    for keyword, value in overrides.items():
        if value is None:
            delattr(item, keyword)
        else:
            setattr(item, keyword, value)
    return item


def completion(status: str = "COMPLETED", series: list[Dataset] | None = None,
               **more: Any) -> Dataset:
    ds = Dataset()
    ds.SpecificCharacterSet = "ISO_IR 192"
    ds.PerformedProcedureStepStatus = status
    ds.PerformedProcedureStepEndDate = today()
    ds.PerformedProcedureStepEndTime = "103000"
    ds.PerformedSeriesSequence = series if series is not None else [
        series_item(generate_uid(), [generate_uid()])]
    for keyword, value in more.items():
        setattr(ds, keyword, value)
    return ds


class Modality:
    """A pynetdicom MPPS SCU on one association: N-CREATE and N-SET, statuses as received."""

    def __init__(self, port: int, calling_ae: str) -> None:
        ae = AE(ae_title=calling_ae)
        ae.add_requested_context(MPPS)
        self.assoc = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
        assert self.assoc.is_established
        # pynetdicom's reactor can miss its pause and drop an answer (fastpath's docstring); the
        # gateway answers fast enough for that to happen here: one full run lost an N-SET-RSP
        RequestingAssociation.adopt(self.assoc)

    def create(self, ds: Dataset | None, uid: str | None) -> Dataset:
        status, _ = self.assoc.send_n_create(ds, MPPS, uid)
        assert "Status" in status, "no N-CREATE response"
        return status

    def set(self, ds: Dataset, uid: str) -> Dataset:
        status, _ = self.assoc.send_n_set(ds, MPPS, uid)
        assert "Status" in status, "no N-SET response"
        return status


@contextmanager
def modality(app: Gateway, calling_ae: str = "CT1") -> Iterator[Modality]:
    assert app.receiver is not None
    scu = Modality(app.receiver.address[1], calling_ae)
    try:
        yield scu
    finally:
        scu.assoc.release()


def step_row(db: str, uid: str) -> Any:
    found = rows(db, "SELECT * FROM performed_steps WHERE sop_instance_uid = :u", u=uid)
    return found[0] if found else None


def item_and_order(db: str, order_id: int) -> tuple[list[str], str]:
    items = [r.status for r in rows(db, "SELECT status FROM worklist_items WHERE order_id = :o "
                                        "ORDER BY id", o=order_id)]
    [order] = rows(db, "SELECT status FROM orders WHERE id = :o", o=order_id)
    return items, order.status


def refused(status: Dataset, code: Status) -> None:
    assert status.Status == code, f"0x{status.Status:04X} ({status.get('ErrorComment')})"
    assert str(status.get("ErrorComment", "")).strip(), "a refusal says why"


def metric(app: Gateway, status: str) -> float:
    value = app.metrics.registry.get_sample_value("gateway_mpps_transitions_total",
                                                  {"status": status})
    return value or 0.0


# -- the workflow ------------------------------------------------------------------------------


def test_create_set_complete_moves_item_and_order_and_keeps_the_step(
    app: Gateway, db_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG, logger="gateway")
    order_id, study = schedule(app.engine)
    uid = generate_uid()
    series, images = generate_uid(), [generate_uid(), generate_uid()]
    with modality(app) as scu:
        assert scu.create(n_create_dataset(study), uid).Status == Status.SUCCESS
        step = step_row(db_url, uid)
        assert (step.status, step.calling_ae, step.study_instance_uid, step.accession_number) == (
            "IN PROGRESS", "CT1", study, ACCESSION)
        assert item_and_order(db_url, order_id) == (["STARTED"], "in_progress")

        more = Dataset()
        more.PerformedProcedureStepDescription = "CT HEAD WITH CONTRAST"
        more.CommentsOnThePerformedProcedureStep = "Kontrastmittel gegeben"
        assert scu.set(more, uid).Status == Status.SUCCESS
        assert item_and_order(db_url, order_id) == (["STARTED"], "in_progress")
        assert step_row(db_url, uid).status == "IN PROGRESS"

        done = completion(series=[series_item(series, images)])
        done.SpecificCharacterSet = "ISO_IR 100"  # Latin-1 on the wire this time
        assert scu.set(done, uid).Status == Status.SUCCESS

    step = step_row(db_url, uid)
    assert step.status == "COMPLETED"
    assert item_and_order(db_url, order_id) == (["COMPLETED"], "completed")
    [item] = rows(db_url, "SELECT id FROM worklist_items WHERE order_id = :o", o=order_id)
    assert step.worklist_item_id == item.id
    assert json.loads(step.performed_series) == [series]
    assert [r.series_instance_uid for r in rows(
        db_url, "SELECT series_instance_uid FROM performed_series")] == [series]
    stored = pydicom.Dataset.from_json(step.attributes)
    assert str(stored.PatientName) == NAME  # Unicode kept, whatever the wire's character set
    assert stored.PerformedProcedureStepDescription == "CT HEAD WITH CONTRAST"
    assert str(stored.PerformedSeriesSequence[0].PerformingPhysicianName) == PHYSICIAN
    assert [r.ReferencedSOPInstanceUID for r in
            stored.PerformedSeriesSequence[0].ReferencedImageSequence] == images
    audit = rows(db_url, "SELECT actor, action, study_instance_uid FROM audit_events ORDER BY id")
    assert [tuple(a) for a in audit] == [("CT1", "mpps_in_progress", study),
                                         ("CT1", "mpps_completed", study)]
    assert (metric(app, "in_progress"), metric(app, "completed")) == (1.0, 1.0)
    for secret in (NAME, "Müller", PATIENT_ID, ACCESSION, "19800202", PHYSICIAN, "Kontrastmittel"):
        assert secret not in caplog.text


def test_discontinued_step_discontinues_its_item_and_order(app: Gateway, db_url: str) -> None:
    order_id, study = schedule(app.engine)
    uid = generate_uid()
    with modality(app) as scu:
        assert scu.create(n_create_dataset(study), uid).Status == Status.SUCCESS
        # DISCONTINUED may list no series: nothing may have been acquired
        assert scu.set(completion("DISCONTINUED", series=[]), uid).Status == Status.SUCCESS
    assert step_row(db_url, uid).status == "DISCONTINUED"
    assert item_and_order(db_url, order_id) == (["DISCONTINUED"], "discontinued")
    assert metric(app, "discontinued") == 1.0


def test_wrong_worklist_entry_puts_the_item_back_on_the_list(app: Gateway, db_url: str) -> None:
    """IHE RAD TF-2 4.7: discontinued because the wrong entry was chosen, the exam is still to
    be done; its series name no order."""
    order_id, study = schedule(app.engine)
    uid = generate_uid()
    reason = Dataset()
    reason.CodeValue, reason.CodingSchemeDesignator = "110514", "DCM"
    reason.CodeMeaning = "Incorrect worklist entry selected"
    with modality(app) as scu:
        assert scu.create(n_create_dataset(study), uid).Status == Status.SUCCESS
        wrong = completion("DISCONTINUED",
                           PerformedProcedureStepDiscontinuationReasonCodeSequence=[reason])
        assert scu.set(wrong, uid).Status == Status.SUCCESS
    assert item_and_order(db_url, order_id) == (["SCHEDULED"], "scheduled")


def test_order_with_two_steps_is_in_progress_until_both_end(app: Gateway, db_url: str) -> None:
    order_id, study = schedule(app.engine, steps=("SPS1", "SPS2"))
    first, second = generate_uid(), generate_uid()
    with modality(app) as scu:
        assert scu.create(n_create_dataset(study, sps="SPS1"), first).Status == Status.SUCCESS
        assert scu.set(completion(), first).Status == Status.SUCCESS
        assert item_and_order(db_url, order_id) == (["COMPLETED", "SCHEDULED"], "in_progress")
        assert scu.create(n_create_dataset(study, sps="SPS2"), second).Status == Status.SUCCESS
        assert scu.set(completion("DISCONTINUED"), second).Status == Status.SUCCESS
    assert item_and_order(db_url, order_id) == (["COMPLETED", "DISCONTINUED"], "completed")


@pytest.mark.parametrize(("statuses", "expected"), [
    (["SCHEDULED"], "scheduled"),
    (["STARTED"], "in_progress"),
    (["STARTED", "COMPLETED"], "in_progress"),
    (["SCHEDULED", "COMPLETED"], "in_progress"),
    (["COMPLETED", "COMPLETED"], "completed"),
    (["COMPLETED", "DISCONTINUED"], "completed"),
    (["DISCONTINUED", "DISCONTINUED"], "discontinued"),
])
def test_order_status_adds_up_its_items(statuses: list[str], expected: str) -> None:
    assert order_status(statuses) == expected


def test_item_found_by_accession_when_the_modality_made_its_own_study_uid(
    app: Gateway, db_url: str
) -> None:
    order_id, _ = schedule(app.engine, steps=("SPS1", "SPS2"))
    uid = generate_uid()
    with modality(app) as scu:
        ds = n_create_dataset(generate_uid(), sps="SPS2")
        assert scu.create(ds, uid).Status == Status.SUCCESS
    assert item_and_order(db_url, order_id) == (["SCHEDULED", "STARTED"], "in_progress")


def test_unscheduled_step_is_stored_and_named_by_what_it_says(app: Gateway, db_url: str) -> None:
    uid, study = generate_uid(), generate_uid()
    with modality(app) as scu:
        ds = n_create_dataset(study, accession="", sps="")
        assert scu.create(ds, uid).Status == Status.SUCCESS
    step = step_row(db_url, uid)
    assert (step.worklist_item_id, step.study_instance_uid, step.accession_number) == (
        None, study, None)


def test_n_create_without_instance_uid_gets_one_assigned(app: Gateway, db_url: str) -> None:
    """PS3.7 10.1.5.1.4: the SCP assigns the Affected SOP Instance UID and returns it."""
    _, study = schedule(app.engine)
    with modality(app) as scu:
        assert scu.create(n_create_dataset(study), None).Status == Status.SUCCESS
    [step] = rows(db_url, "SELECT sop_instance_uid, status FROM performed_steps")
    assert step.status == "IN PROGRESS" and step.sop_instance_uid.startswith("1.2.826.0.1.3680043")


# -- refusals: the right status, an Error Comment, nothing stored -------------------------------


def test_n_set_after_completed_is_refused_and_changes_nothing(app: Gateway, db_url: str) -> None:
    order_id, study = schedule(app.engine)
    uid = generate_uid()
    with modality(app) as scu:
        assert scu.create(n_create_dataset(study), uid).Status == Status.SUCCESS
        assert scu.set(completion(), uid).Status == Status.SUCCESS
        before = tuple(step_row(db_url, uid))
        late = Dataset()
        late.PerformedProcedureStepDescription = "changed afterwards"
        for attempt in (late, completion("DISCONTINUED"), completion("IN PROGRESS")):
            status = scu.set(attempt, uid)
            refused(status, Status.PROCESSING_FAILURE)
            assert status.ErrorID == 0xA710  # PS3.4 F.7.2.2.2
            assert "may no longer be updated" in status.ErrorComment
    assert tuple(step_row(db_url, uid)) == before
    assert item_and_order(db_url, order_id) == (["COMPLETED"], "completed")
    assert metric(app, "completed") == 1.0


def _end_at_once(app: Gateway, uid: str) -> dict[str, Dataset]:
    """COMPLETED and DISCONTINUED for ``uid`` from two associations, released together."""
    answers: dict[str, Dataset] = {}
    start = threading.Barrier(2)

    def end(final: str) -> None:
        with modality(app) as scu:
            start.wait()
            answers[final] = scu.set(completion(final), uid)

    threads = [threading.Thread(target=end, args=(f,)) for f in ("COMPLETED", "DISCONTINUED")]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    return answers


def test_two_n_sets_ending_a_step_at_once_leave_one_final_state(app: Gateway, db_url: str) -> None:
    """Two associations end the same step at the same moment: one wins, the other is told the
    step may no longer be updated, and the stored status is the winner's."""
    _, study = schedule(app.engine)
    for _round in range(5):
        uid = generate_uid()
        with modality(app) as scu:
            assert scu.create(n_create_dataset(study), uid).Status == Status.SUCCESS
        answers = _end_at_once(app, uid)
        winners = [f for f, a in answers.items() if a.Status == Status.SUCCESS]
        assert len(winners) == 1, {f: hex(a.Status) for f, a in answers.items()}
        [loser] = [a for a in answers.values() if a.Status != Status.SUCCESS]
        refused(loser, Status.PROCESSING_FAILURE)
        assert loser.ErrorID == 0xA710
        assert step_row(db_url, uid).status == winners[0]


def test_duplicate_n_create_is_refused(app: Gateway, db_url: str) -> None:
    _, study = schedule(app.engine)
    uid = generate_uid()
    with modality(app) as scu:
        assert scu.create(n_create_dataset(study), uid).Status == Status.SUCCESS
        before = tuple(step_row(db_url, uid))
        refused(scu.create(n_create_dataset(study, PerformedProcedureStepID="PPS-2"), uid),
                Status.DUPLICATE_SOP_INSTANCE)
    assert tuple(step_row(db_url, uid)) == before
    assert len(rows(db_url, "SELECT id FROM performed_steps")) == 1


def test_n_create_with_an_invalid_instance_uid_is_refused(app: Gateway, db_url: str) -> None:
    _, study = schedule(app.engine)
    with modality(app) as scu:
        refused(scu.create(n_create_dataset(study), "1.2.03.x"), Status.INVALID_OBJECT_INSTANCE)
    assert rows(db_url, "SELECT id FROM performed_steps") == []


def test_database_away_is_answered_0x0213_so_the_modality_sends_again(
    app: Gateway, tmp_path: Path
) -> None:
    """Not 0x0110 "may no longer be updated" (the modality would give up) nor an exception."""
    _, study = schedule(app.engine)
    broken = create_engine(f"sqlite:///{tmp_path / 'missing' / 'folder' / 'gateway.db'}")
    assert app.receiver is not None
    service = app.receiver._performed
    assert isinstance(service, PerformedStepService)
    service._engine = broken
    try:
        with modality(app) as scu:
            refused(scu.create(n_create_dataset(study), generate_uid()),
                    Status.RESOURCE_LIMITATION)
            refused(scu.set(completion(), generate_uid()), Status.RESOURCE_LIMITATION)
    finally:
        broken.dispose()


def test_n_set_of_an_unknown_instance_is_refused(app: Gateway, db_url: str) -> None:
    with modality(app) as scu:
        refused(scu.set(completion(), generate_uid()), Status.NO_SUCH_OBJECT_INSTANCE)
    assert rows(db_url, "SELECT id FROM performed_steps") == []


def _ssa_other_study() -> Any:
    item = n_create_dataset(generate_uid()).ScheduledStepAttributesSequence
    return item


@pytest.mark.parametrize(("keyword", "value"), [
    ("PatientID", "SOMEONE-ELSE"),
    ("PatientName", "Other^Patient"),
    ("PerformedProcedureStepID", "PPS-9"),
    ("PerformedProcedureStepStartDate", "20200101"),
    ("PerformedProcedureStepStartTime", "235959"),
    ("Modality", "MR"),
    ("ScheduledStepAttributesSequence", "other study"),
])
def test_n_set_may_not_change_what_table_f_7_2_1_forbids(
    app: Gateway, db_url: str, keyword: str, value: str
) -> None:
    order_id, study = schedule(app.engine)
    uid = generate_uid()
    with modality(app) as scu:
        assert scu.create(n_create_dataset(study), uid).Status == Status.SUCCESS
        before = tuple(step_row(db_url, uid))
        change = completion()
        setattr(change, keyword, _ssa_other_study() if keyword.endswith("Sequence") else value)
        status = scu.set(change, uid)
        refused(status, Status.NO_SUCH_ATTRIBUTE)
        assert Tag(keyword) in _tags(status.AttributeIdentifierList)
        assert tuple(step_row(db_url, uid)) == before
        assert item_and_order(db_url, order_id) == (["STARTED"], "in_progress")
        # The same value sent again changes nothing and is accepted (some modalities resend all).
        same = completion()
        original = n_create_dataset(study)
        setattr(same, keyword, original[keyword].value)
        assert scu.set(same, uid).Status == Status.SUCCESS
    assert item_and_order(db_url, order_id) == (["COMPLETED"], "completed")


def _tags(value: Any) -> list[Any]:
    return list(value) if isinstance(value, (list, pydicom.multival.MultiValue)) else [value]


def _without_ssa_study(ds: Dataset) -> Dataset:
    del ds.ScheduledStepAttributesSequence[0].StudyInstanceUID
    return ds


def _ssa_bad_uid(ds: Dataset) -> Dataset:
    ds.ScheduledStepAttributesSequence[0].StudyInstanceUID = "1.2.3.abc"
    return ds


def _no_ssa_items(ds: Dataset) -> Dataset:
    ds.ScheduledStepAttributesSequence = []
    return ds


def _ssa_delete(keyword: str) -> Callable[[Dataset], Dataset]:
    def change(ds: Dataset) -> Dataset:
        delattr(ds.ScheduledStepAttributesSequence[0], keyword)
        return ds
    return change


def _series_without_protocol(ds: Dataset) -> Dataset:
    ds.PerformedSeriesSequence = [series_item(generate_uid(), [], ProtocolName=None)]
    return ds


def _top(**values: Any) -> Callable[[Dataset], Dataset]:
    """Set (or with None delete) top-level attributes of the N-CREATE data set."""
    def change(ds: Dataset) -> Dataset:
        for keyword, value in values.items():
            if value is None:
                delattr(ds, keyword)
            else:
                setattr(ds, keyword, value)
        return ds
    return change


def _ssa(**values: str) -> Callable[[Dataset], Dataset]:
    def change(ds: Dataset) -> Dataset:
        for keyword, value in values.items():
            setattr(ds.ScheduledStepAttributesSequence[0], keyword, value)
        return ds
    return change


CREATE_REFUSALS: list[tuple[str, Callable[[Dataset], Dataset], Status]] = [
    ("Type 1 absent", _top(PerformedProcedureStepID=None), Status.MISSING_ATTRIBUTE),
    ("Type 1 empty", _top(Modality=""), Status.MISSING_ATTRIBUTE_VALUE),
    ("Type 2 absent", _top(PatientID=None), Status.MISSING_ATTRIBUTE),
    ("Type 2 sequence absent", _top(PerformedSeriesSequence=None), Status.MISSING_ATTRIBUTE),
    ("sequence Type 1 absent", _without_ssa_study, Status.MISSING_ATTRIBUTE),
    ("sequence Type 2 absent", _ssa_delete("ScheduledProcedureStepID"), Status.MISSING_ATTRIBUTE),
    ("sequence without items", _no_ssa_items, Status.MISSING_ATTRIBUTE_VALUE),
    ("series item Type 1 absent", _series_without_protocol, Status.MISSING_ATTRIBUTE),
    ("not IN PROGRESS", _top(PerformedProcedureStepStatus="COMPLETED"),
     Status.INVALID_ATTRIBUTE_VALUE),
    ("invalid UID", _ssa_bad_uid, Status.INVALID_ATTRIBUTE_VALUE),
    ("invalid date", _top(PerformedProcedureStepStartDate="20261340"),
     Status.INVALID_ATTRIBUTE_VALUE),
    ("invalid time", _top(PerformedProcedureStepStartTime="2561"), Status.INVALID_ATTRIBUTE_VALUE),
    ("accession too long", _ssa(AccessionNumber="A" * 17), Status.INVALID_ATTRIBUTE_VALUE),
]


@pytest.mark.parametrize(("case", "make", "code"), CREATE_REFUSALS, ids=[c[0] for c in CREATE_REFUSALS])
def test_n_create_checks_table_f_7_2_1(
    app: Gateway, db_url: str, case: str, make: Callable[[Dataset], Dataset], code: Status
) -> None:
    _, study = schedule(app.engine)
    ds = make(n_create_dataset(study))
    with modality(app) as scu:
        refused(scu.create(ds, generate_uid()), code)
    assert rows(db_url, "SELECT id FROM performed_steps") == []
    assert [r.status for r in rows(db_url, "SELECT status FROM worklist_items")] == ["SCHEDULED"]
    assert rows(db_url, "SELECT id FROM audit_events") == []


N_SET_REFUSALS: list[tuple[str, Callable[[], Dataset], Status]] = [
    ("COMPLETED without series", lambda: completion(series=[]), Status.MISSING_ATTRIBUTE_VALUE),
    ("COMPLETED without end time",
     lambda: completion(PerformedProcedureStepEndTime=""), Status.MISSING_ATTRIBUTE_VALUE),
    ("DISCONTINUED without end date",
     lambda: completion("DISCONTINUED", PerformedProcedureStepEndDate=""),
     Status.MISSING_ATTRIBUTE_VALUE),
    ("unknown status", lambda: completion("DONE"), Status.INVALID_ATTRIBUTE_VALUE),
    ("series without its UID",
     lambda: completion(series=[series_item("", [], SeriesInstanceUID=None)]),
     Status.MISSING_ATTRIBUTE),
    ("series UID not a UID",
     lambda: completion(series=[series_item("1.2.x", [])]), Status.INVALID_ATTRIBUTE_VALUE),
    ("image reference without its UID",
     lambda: completion(series=[_unreferenced()]), Status.MISSING_ATTRIBUTE),
    ("end time not a TM", lambda: completion(PerformedProcedureStepEndTime="10h30"),
     Status.INVALID_ATTRIBUTE_VALUE),
]


def _unreferenced() -> Dataset:
    item = series_item(generate_uid(), [generate_uid()])
    del item.ReferencedImageSequence[0].ReferencedSOPInstanceUID
    return item


@pytest.mark.parametrize(("case", "make", "code"), N_SET_REFUSALS, ids=[c[0] for c in N_SET_REFUSALS])
def test_n_set_checks_values_and_the_final_state(
    app: Gateway, db_url: str, case: str, make: Callable[[], Dataset], code: Status
) -> None:
    order_id, study = schedule(app.engine)
    uid = generate_uid()
    with modality(app) as scu:
        assert scu.create(n_create_dataset(study), uid).Status == Status.SUCCESS
        before = tuple(step_row(db_url, uid))
        refused(scu.set(make(), uid), code)
    assert tuple(step_row(db_url, uid)) == before
    assert item_and_order(db_url, order_id) == (["STARTED"], "in_progress")
    assert [r.action for r in rows(db_url, "SELECT action FROM audit_events")] == [
        "mpps_in_progress"]


def test_caller_without_the_worklist_service_is_refused(app: Gateway, db_url: str) -> None:
    _, study = schedule(app.engine)
    uid = generate_uid()
    for calling_ae in ("CT2", "STRANGER"):  # a peer without "worklist"; an unknown caller
        with modality(app, calling_ae) as scu:
            status = scu.create(n_create_dataset(study), uid)
            refused(status, Status.NOT_AUTHORIZED)
            assert "worklist" in status.ErrorComment
            refused(scu.set(completion(), uid), Status.NOT_AUTHORIZED)
    assert rows(db_url, "SELECT id FROM performed_steps") == []


@settings(max_examples=15, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(final=st.sampled_from(["COMPLETED", "DISCONTINUED"]),
       attempts=st.lists(st.sampled_from(["description", "completed", "discontinued",
                                          "in_progress", "series", "patient", "comment",
                                          "bad_status"]),
                         min_size=1, max_size=6))
def test_no_sequence_of_n_sets_changes_a_final_step(
    app: Gateway, db_url: str, final: str, attempts: list[str]
) -> None:
    _, study = schedule(app.engine, accession=generate_uid()[-16:])
    uid = generate_uid()
    with modality(app) as scu:
        assert scu.create(n_create_dataset(study, accession=""), uid).Status == Status.SUCCESS
        assert scu.set(completion(final), uid).Status == Status.SUCCESS
        before = tuple(step_row(db_url, uid))
        for attempt in attempts:
            status = scu.set(_attempt(attempt), uid)
            refused(status, Status.PROCESSING_FAILURE)
            assert status.ErrorID == 0xA710
    assert tuple(step_row(db_url, uid)) == before


def _attempt(kind: str) -> Dataset:
    ds = Dataset()
    if kind == "description":
        ds.PerformedProcedureStepDescription = "later"
    elif kind in ("completed", "discontinued", "in_progress"):
        ds = completion(kind.upper().replace("_", " "))
    elif kind == "series":
        ds.PerformedSeriesSequence = [series_item(generate_uid(), [generate_uid()])]
    elif kind == "patient":
        ds.PatientID = "SOMEONE-ELSE"
    elif kind == "comment":
        ds.CommentsOnThePerformedProcedureStep = "added late"
    else:
        ds.PerformedProcedureStepStatus = "DONE"
    return ds


# -- the images: linked to the order, counted per item ------------------------------------------


RULES = """
[[rules]]
name = "ct identity and order"
match = { calling_ae = ["CT1"], modality = ["CT"] }
actions = [
  { type = "map_identity", unmatched = "hold" },
  { type = "reconcile_order", unmatched = "hold" },
]
"""
IDENTITIES = "issuer,local_id,mrn\nCT1,DEV-77,MRN0077\n"
# Two CT orders for the patient, an hour either side of the images' 10:00: ambiguous by window.
ORDERS = """accession_number,mrn,modality,scheduled_at,requested_procedure_id,requested_procedure_description
ACC-A,MRN0077,CT,2026-11-23T09:00,RP3,CT CHEST
ACC-B,MRN0077,CT,2026-11-23T11:00,RP4,CT ABDOMEN
"""


def cli(config: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(GATEWAY_BIN), *args, "--config", str(config)],
                          capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture
def remap_served(served: Any, tmp_path: Path, db_url: str) -> Any:
    (tmp_path / "rules.toml").write_text(RULES, encoding="utf-8")
    server = served(db=db_url, security=SECURITY,
                    remap={"rules_file": str(tmp_path / "rules.toml"),
                           "issuer_of_patient_id": "HOSPITAL"})
    for kind, text in (("identities", IDENTITIES), ("orders", ORDERS)):
        (tmp_path / f"{kind}.csv").write_text(text, encoding="utf-8")
        result = cli(server.config_path, kind, "import", str(tmp_path / f"{kind}.csv"))
        assert result.returncode == 0, result.stderr
    return server


@pytest.mark.parametrize("link", ["series", "study"])
def test_remap_takes_the_order_the_mpps_names_before_the_date_window(
    remap_served: Any, tmp_path: Path, link: str
) -> None:
    """Without the MPPS, this study is held: ACC-A and ACC-B both fit by MRN, modality and date
    (test_remap.test_ambiguous_study_is_held_listed_and_released_by_assign). The modality said
    it performed ACC-B: by the series it listed (the images carry another Study Instance UID
    than the scheduled one) or, while still in progress, by the study."""
    server = remap_served
    files = write_study(tmp_path / "study", 2, PatientID="DEV-77", AccessionNumber=None,
                        StudyDate="20261123", StudyTime="100000")
    first = pydicom.dcmread(files[0])
    scheduled_study = generate_uid() if link == "series" else first.StudyInstanceUID
    uid = generate_uid()
    scu = Modality(server.port, "CT1")
    try:
        ds = n_create_dataset(scheduled_study, accession="ACC-B", sps="", PatientID="MRN0077")
        assert scu.create(ds, uid).Status == Status.SUCCESS
        if link == "series":
            images = [str(pydicom.dcmread(f).SOPInstanceUID) for f in files]
            done = completion(series=[series_item(first.SeriesInstanceUID, images)])
            assert scu.set(done, uid).Status == Status.SUCCESS
    finally:
        scu.assoc.release()
    sent = dcmtk("storescu", "-aet", "CT1", "-aec", "GATEWAY", "127.0.0.1", str(server.port),
                 *map(str, files))
    assert sent.returncode == 0, sent.stderr

    done_rows = wait_for(
        lambda: (r := rows(server.db_url, "SELECT * FROM instances WHERE remap_state = 'done'"))
        and len(r) == 2 and r, 30, "2 instances remapped")
    assert {(r.patient_id, r.accession_number) for r in done_rows} == {("MRN0077", "ACC-B")}
    [decision] = rows(server.db_url, "SELECT state, accession_number FROM study_decisions")
    assert tuple(decision) == ("ready", "ACC-B")


def test_status_shows_todays_worklist_with_images_per_item(
    served: Any, tmp_path: Path, db_url: str
) -> None:
    server = served(db=db_url, security=SECURITY)
    engine = create_engine(server.db_url)
    try:
        done_order, done_study = schedule(engine, accession="ACC-DONE")
        schedule(engine, accession="ACC-WAIT")
        _, started_study = schedule(engine, accession="ACC-RUN")
        stopped_order, stopped_study = schedule(engine, accession="ACC-STOP")
    finally:
        engine.dispose()
    series = generate_uid()
    files = [write_file(make_dataset(StudyInstanceUID=done_study, SeriesInstanceUID=series,
                                     PatientID=PATIENT_ID), tmp_path / "done" / f"{i}.dcm")
             for i in range(3)]
    # A series of another Study Instance UID that the step lists: counted for the item too.
    extra = write_study(tmp_path / "extra", 2, PatientID=PATIENT_ID)
    extra_series = str(pydicom.dcmread(extra[0]).SeriesInstanceUID)
    steps = {s: generate_uid() for s in ("done", "run", "stop")}
    scu = Modality(server.port, "CT1")
    try:
        for key, study in (("done", done_study), ("run", started_study), ("stop", stopped_study)):
            assert scu.create(n_create_dataset(study), steps[key]).Status == Status.SUCCESS
        listed = [series_item(str(pydicom.dcmread(files[0]).SeriesInstanceUID), []),
                  series_item(extra_series, [])]
        assert scu.set(completion(series=listed), steps["done"]).Status == Status.SUCCESS
        assert scu.set(completion("DISCONTINUED"), steps["stop"]).Status == Status.SUCCESS
    finally:
        scu.assoc.release()
    sent = dcmtk("storescu", "-aet", "CT1", "-aec", "GATEWAY", "127.0.0.1", str(server.port),
                 *map(str, files + extra))
    assert sent.returncode == 0, sent.stderr
    wait_for(lambda: len(rows(server.db_url, "SELECT id FROM instances")) == 5, 30, "5 stored")

    status = cli(server.config_path, "status")
    assert status.returncode == 0, status.stderr
    day = today()
    assert (f"Worklist today ({day[:4]}-{day[4:6]}-{day[6:]}): 1 scheduled, 1 in progress, "
            "1 completed, 1 discontinued") in status.stdout
    lines = {line.split()[0]: line for line in status.stdout.splitlines()
             if line.strip().startswith("#") and "step" in line}
    by_status = {line.split()[6]: line for line in lines.values()}
    assert by_status["COMPLETED"].rstrip().endswith("5 images")
    assert by_status["STARTED"].rstrip().endswith("0 images")
    assert by_status["SCHEDULED"].rstrip().endswith("0 images")
    for secret in (PATIENT_ID, "ACC-DONE", "Müller"):
        assert secret not in status.stdout
    assert item_and_order(server.db_url, done_order)[1] == "completed"
    assert item_and_order(server.db_url, stopped_order)[1] == "discontinued"
