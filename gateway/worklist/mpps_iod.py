"""What an MPPS N-CREATE or N-SET may carry: PS3.4 Table F.7.2-1 as data, and the checks an SCP
makes before it stores anything (PS3.4 F.7.2.1.2, F.7.2.2.2; statuses from PS3.7 10.1.3, 10.1.5
and C.4). Pure functions of data sets: no database, no network.

- N-CREATE: the Performed Procedure Step Status is IN PROGRESS; every Type 1 attribute is present
  with a value and every Type 2 attribute is present, at the top level and in the items of the
  Scheduled Step Attributes and Performed Series sequences (0x0120 missing attribute, 0x0121
  missing value, 0x0106 invalid value).
- N-SET: an attribute the table marks "Not allowed" for N-SET may not change (0x0105, with the
  tags in the Attribute Identifier List). One sent again with the value it already has is
  accepted: some modalities send the whole step on every N-SET, and nothing changes.
- Final state (COMPLETED or DISCONTINUED, the table's Final State column): end date and time
  have values; COMPLETED lists at least one performed series, each with its Type 1 attributes.
- A step in a final state may no longer be updated: 0x0110 with Error ID 0xA710 (PS3.4 F.7.2.2.2).

Error Comments name tags and keywords, never values: they reach the modality's log and ours.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag

from gateway.dicom.status import Status

IN_PROGRESS = "IN PROGRESS"
COMPLETED = "COMPLETED"
DISCONTINUED = "DISCONTINUED"
FINAL = (COMPLETED, DISCONTINUED)
PPS_STATUSES = (IN_PROGRESS, COMPLETED, DISCONTINUED)
# PS3.4 F.7.2.2.2: the Error ID that goes with 0x0110 for a step in a final state
MAY_NO_LONGER_BE_UPDATED = 0xA710
# PS3.16 CID 9300 "Procedure Discontinuation Reasons": (110514, DCM, "Incorrect worklist entry
# selected"). IHE RAD TF-2 4.7: the images of such a step do not belong to the scheduled step.
WRONG_WORKLIST_ENTRY = ("110514", "DCM")

_UID = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_DA = re.compile(r"^[0-9]{8}$")
_TM = re.compile(r"^([0-9]{2})([0-9]{2})?([0-9]{2})?(\.[0-9]{1,6})?$")
UID_MAX = 64  # PS3.5 9.1
SH_MAX = 16  # PS3.5 6.2: Accession Number, SPS ID, Requested Procedure ID
LO_MAX = 64  # Patient ID


@dataclass(frozen=True)
class Refusal:
    """A failure status, why (the Error Comment), and the tags concerned (Attribute Identifier
    List, sent on N-SET responses: PS3.7 10.1.3.1.9)."""

    status: Status
    comment: str
    tags: tuple[BaseTag, ...] = ()
    error_id: int | None = None


@dataclass(frozen=True)
class Attr:
    """One row of Table F.7.2-1: its requirement type in N-CREATE (SCU), and whether an N-SET
    may carry it ("0": not allowed; "3": may be set). ``items`` is the row's sequence content."""

    keyword: str
    create: str
    n_set: str = "3"
    items: tuple[Attr, ...] = ()

    @property
    def tag(self) -> BaseTag:
        found = tag_for_keyword(self.keyword)
        assert found is not None, self.keyword
        return Tag(found)


_SOP_REFERENCE = (Attr("ReferencedSOPClassUID", "1"), Attr("ReferencedSOPInstanceUID", "1"))
SCHEDULED_STEP_ITEM = (
    Attr("StudyInstanceUID", "1"),
    Attr("ReferencedStudySequence", "2", items=_SOP_REFERENCE),
    Attr("AccessionNumber", "2"),
    Attr("RequestedProcedureID", "2"),
    Attr("RequestedProcedureDescription", "2"),
    Attr("ScheduledProcedureStepID", "2"),
    Attr("ScheduledProcedureStepDescription", "2"),
    Attr("ScheduledProtocolCodeSequence", "2"),
)
PERFORMED_SERIES_ITEM = (
    Attr("PerformingPhysicianName", "2"),
    Attr("ProtocolName", "1"),
    Attr("OperatorsName", "2"),
    Attr("SeriesInstanceUID", "1"),
    Attr("SeriesDescription", "2"),
    Attr("RetrieveAETitle", "2"),
    Attr("ReferencedImageSequence", "2", items=_SOP_REFERENCE),
    Attr("ReferencedNonImageCompositeSOPInstanceSequence", "2", items=_SOP_REFERENCE),
)
# Table F.7.2-1, module by module: SOP Common, Performed Procedure Step Relationship, Performed
# Procedure Step Information, Image Acquisition Results. Attributes not listed (Radiation Dose,
# Billing and Material Management, private ones) are Type 3 in N-CREATE and may be set.
TABLE_F_7_2_1 = (
    Attr("ScheduledStepAttributesSequence", "1", "0", SCHEDULED_STEP_ITEM),
    Attr("PatientName", "2", "0"),
    Attr("PatientID", "2", "0"),
    Attr("IssuerOfPatientID", "3", "0"),
    Attr("IssuerOfPatientIDQualifiersSequence", "3", "0"),
    Attr("PatientBirthDate", "2", "0"),
    Attr("PatientSex", "2", "0"),
    Attr("ReferencedPatientSequence", "2", "0", _SOP_REFERENCE),
    Attr("AdmissionID", "3", "0"),
    Attr("IssuerOfAdmissionIDSequence", "3", "0"),
    Attr("ServiceEpisodeID", "3", "0"),
    Attr("IssuerOfServiceEpisodeIDSequence", "3", "0"),
    Attr("ServiceEpisodeDescription", "3", "0"),
    Attr("PerformedProcedureStepID", "1", "0"),
    Attr("PerformedStationAETitle", "1", "0"),
    Attr("PerformedStationName", "2", "0"),
    Attr("PerformedLocation", "2", "0"),
    Attr("PerformedProcedureStepStartDate", "1", "0"),
    Attr("PerformedProcedureStepStartTime", "1", "0"),
    Attr("PerformedProcedureStepStatus", "1"),
    Attr("PerformedProcedureStepDescription", "2"),
    Attr("PerformedProcedureTypeDescription", "2"),
    Attr("ProcedureCodeSequence", "2"),
    Attr("PerformedProcedureStepEndDate", "2"),
    Attr("PerformedProcedureStepEndTime", "2"),
    Attr("Modality", "1", "0"),
    Attr("StudyID", "2", "0"),
    Attr("PerformedProtocolCodeSequence", "2"),
    Attr("PerformedSeriesSequence", "2", items=PERFORMED_SERIES_ITEM),
)
NOT_ALLOWED_IN_N_SET = tuple(a for a in TABLE_F_7_2_1 if a.n_set == "0")
_BY_KEYWORD = {a.keyword: a for a in TABLE_F_7_2_1}


def _where(path: str) -> str:
    return f" in {path}" if path else ""


def _present(ds: Dataset, attrs: Iterable[Attr], path: str = "") -> Refusal | None:
    """Type 1 present with a value, Type 2 present, recursively in the listed sequences."""
    for attr in attrs:
        if attr.create not in ("1", "2"):
            continue
        if attr.keyword not in ds:
            return Refusal(Status.MISSING_ATTRIBUTE,
                           f"missing {attr.tag}{_where(path)} {attr.keyword}", (attr.tag,))
        element = ds[attr.keyword]
        if attr.create == "1" and element.is_empty:
            return Refusal(Status.MISSING_ATTRIBUTE_VALUE,
                           f"no value in {attr.tag}{_where(path)} {attr.keyword}", (attr.tag,))
        if attr.items and element.VR == "SQ":
            for number, item in enumerate(element.value, start=1):
                found = _present(item, attr.items, f"{attr.tag} item {number}")
                if found is not None:
                    return found
    return None


def _text(ds: Dataset, keyword: str) -> str:
    value = ds.get(keyword)
    return "" if value is None else str(value).strip()


def _invalid(tag: BaseTag, path: str, what: str) -> Refusal:
    return Refusal(Status.INVALID_ATTRIBUTE_VALUE, f"{tag}{_where(path)} {what}", (tag,))


def valid_uid(value: str) -> bool:
    """PS3.5 9.1: digits and dots, no leading zero in a component, at most 64 characters."""
    return len(value) <= UID_MAX and _UID.match(value) is not None


def _uid(ds: Dataset, keyword: str, path: str) -> Refusal | None:
    value = _text(ds, keyword)
    if value and not valid_uid(value):
        return _invalid(Tag(keyword), path, "is not a valid UID")
    return None


def _longest(ds: Dataset, keyword: str, most: int, path: str) -> Refusal | None:
    if len(_text(ds, keyword)) > most:
        return _invalid(Tag(keyword), path, f"is longer than {most}")
    return None


def valid_date(value: str) -> bool:
    if not _DA.match(value):
        return False
    try:
        datetime.strptime(value, "%Y%m%d")
    except ValueError:
        return False
    return True


def valid_time(value: str) -> bool:
    found = _TM.match(value)
    if found is None:
        return False
    hours, minutes, seconds = (int(found.group(i) or 0) for i in (1, 2, 3))
    return hours < 24 and minutes < 60 and seconds < 61  # 60: a leap second (PS3.5 6.2 TM)


def _dates(ds: Dataset) -> Refusal | None:
    for keyword, check in (
        ("PerformedProcedureStepStartDate", valid_date),
        ("PerformedProcedureStepStartTime", valid_time),
        ("PerformedProcedureStepEndDate", valid_date),
        ("PerformedProcedureStepEndTime", valid_time),
    ):
        value = _text(ds, keyword)
        if value and not check(value):
            return _invalid(Tag(keyword), "", f"is not a valid {keyword[-4:].upper()}")
    return None


def _items(ds: Dataset, keyword: str) -> Sequence[Dataset]:
    value = ds.get(keyword)
    return list(value) if value else []


def _series_values(ds: Dataset) -> Refusal | None:
    """The UIDs the ledger indexes are UIDs (they go into 64-character columns)."""
    for number, item in enumerate(_items(ds, "PerformedSeriesSequence"), start=1):
        path = f"{Tag('PerformedSeriesSequence')} item {number}"
        found = _uid(item, "SeriesInstanceUID", path)
        if found is not None:
            return found
        for keyword in ("ReferencedImageSequence", "ReferencedNonImageCompositeSOPInstanceSequence"):
            for reference in _items(item, keyword):
                found = _uid(reference, "ReferencedSOPInstanceUID", path) or _uid(
                    reference, "ReferencedSOPClassUID", path)
                if found is not None:
                    return found
    return None


def check_create(ds: Dataset) -> Refusal | None:
    """An N-CREATE's attribute list (PS3.4 F.7.2.1.1): None when it may be stored."""
    found = _present(ds, TABLE_F_7_2_1)
    if found is not None:
        return found
    if _text(ds, "PerformedProcedureStepStatus") != IN_PROGRESS:
        return _invalid(Tag("PerformedProcedureStepStatus"), "", f"must be {IN_PROGRESS}")
    for number, item in enumerate(_items(ds, "ScheduledStepAttributesSequence"), start=1):
        path = f"{Tag('ScheduledStepAttributesSequence')} item {number}"
        found = (_uid(item, "StudyInstanceUID", path)
                 or _longest(item, "AccessionNumber", SH_MAX, path)
                 or _longest(item, "ScheduledProcedureStepID", SH_MAX, path))
        if found is not None:
            return found
    return _longest(ds, "PatientID", LO_MAX, "") or _dates(ds) or _series_values(ds)


def element_json(element: DataElement) -> Any:
    """An element in the DICOM JSON model (PS3.18 F.2), for comparing values across encodings."""
    return element.to_json_dict(bulk_data_element_handler=None, bulk_data_threshold=1 << 62)


def check_set(modifications: Dataset, stored: Dataset) -> Refusal | None:
    """An N-SET's modification list against the step as stored (PS3.4 F.7.2.2.1)."""
    changed = [attr.tag for attr in NOT_ALLOWED_IN_N_SET if attr.keyword in modifications and (
        attr.keyword not in stored
        or element_json(modifications[attr.keyword]) != element_json(stored[attr.keyword]))]
    if changed:
        first = _BY_KEYWORD[_keyword(changed[0])]
        more = f" and {len(changed) - 1} more" if len(changed) > 1 else ""
        return Refusal(Status.NO_SUCH_ATTRIBUTE,
                       f"N-SET may not change {first.tag} {first.keyword}{more}", tuple(changed))
    status = _text(modifications, "PerformedProcedureStepStatus")
    if "PerformedProcedureStepStatus" in modifications and status not in PPS_STATUSES:
        return _invalid(Tag("PerformedProcedureStepStatus"), "",
                        "must be IN PROGRESS, COMPLETED or DISCONTINUED")
    if "PerformedSeriesSequence" in modifications:
        found = _present(modifications, (_BY_KEYWORD["PerformedSeriesSequence"],))
        if found is not None:
            return found
    return _dates(modifications) or _series_values(modifications)


def _keyword(tag: BaseTag) -> str:
    return next(a.keyword for a in TABLE_F_7_2_1 if a.tag == tag)


def check_final(step: Dataset) -> Refusal | None:
    """The step as it will be stored, when its status is COMPLETED or DISCONTINUED: the Final
    State requirements of Table F.7.2-1 (end date and time; COMPLETED lists its series)."""
    for keyword in ("PerformedProcedureStepEndDate", "PerformedProcedureStepEndTime"):
        if not _text(step, keyword):
            tag = Tag(keyword)
            return Refusal(Status.MISSING_ATTRIBUTE_VALUE,
                           f"{_text(step, 'PerformedProcedureStepStatus')} needs {tag} {keyword}",
                           (tag,))
    if _text(step, "PerformedProcedureStepStatus") == COMPLETED and not _items(
            step, "PerformedSeriesSequence"):
        tag = Tag("PerformedSeriesSequence")
        return Refusal(Status.MISSING_ATTRIBUTE_VALUE,
                       f"COMPLETED needs items in {tag} PerformedSeriesSequence", (tag,))
    return None


def merged(stored: Dataset, modifications: Dataset) -> Dataset:
    """The step after an N-SET: each attribute sent replaces the stored one, a sequence whole
    (PS3.7 10.1.3: the Modification List carries the new values)."""
    result = Dataset()
    for element in stored:
        result.add(element)
    for element in modifications:
        result.add(element)
    return result


@dataclass(frozen=True)
class ScheduledStep:
    """One item of the Scheduled Step Attributes Sequence: what the step says it performs."""

    study_instance_uid: str
    accession_number: str
    requested_procedure_id: str
    scheduled_procedure_step_id: str


def scheduled_steps(ds: Dataset) -> list[ScheduledStep]:
    return [
        ScheduledStep(_text(item, "StudyInstanceUID"), _text(item, "AccessionNumber"),
                      _text(item, "RequestedProcedureID"), _text(item, "ScheduledProcedureStepID"))
        for item in _items(ds, "ScheduledStepAttributesSequence")
    ]


def performed_series(ds: Dataset) -> list[str]:
    """The Series Instance UIDs the step lists, in order, once each."""
    uids = (_text(item, "SeriesInstanceUID") for item in _items(ds, "PerformedSeriesSequence"))
    return list(dict.fromkeys(uid for uid in uids if uid))


def wrong_worklist_entry(ds: Dataset) -> bool:
    """DISCONTINUED because the wrong worklist entry was selected (IHE RAD TF-2 4.7.4.1.2.2):
    its images belong to no scheduled step, so no link is made from it."""
    if _text(ds, "PerformedProcedureStepStatus") != DISCONTINUED:
        return False
    return any((_text(code, "CodeValue"), _text(code, "CodingSchemeDesignator"))
               == WRONG_WORKLIST_ENTRY
               for code in _items(ds, "PerformedProcedureStepDiscontinuationReasonCodeSequence"))


def to_json(ds: Dataset) -> str:
    """The step as stored: the DICOM JSON model (PS3.18 F.2), text in Unicode whatever the
    modality's character set, hence Specific Character Set ISO_IR 192."""
    copy = merged(ds, Dataset())
    copy.SpecificCharacterSet = "ISO_IR 192"
    return json.dumps(copy.to_json_dict(bulk_data_element_handler=None,
                                        bulk_data_threshold=1 << 62),
                      ensure_ascii=False, sort_keys=True)


def from_json(text: str) -> Dataset:
    return Dataset.from_json(text)


@dataclass(frozen=True)
class StepLinks:
    """What a stored step names, for remap: the accession numbers of its scheduled steps, and
    whether it was discontinued as the wrong worklist entry (then it names nothing)."""

    accessions: tuple[str, ...]
    wrong_entry: bool


def links(attributes: str) -> StepLinks:
    ds = from_json(attributes)
    accessions = tuple(dict.fromkeys(s.accession_number for s in scheduled_steps(ds)
                                     if s.accession_number))
    return StepLinks(accessions, wrong_worklist_entry(ds))
