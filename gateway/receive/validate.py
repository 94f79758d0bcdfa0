"""Decide whether a received dataset can be kept, and pull out what the ledger indexes.

The whole dataset is decoded once (every element, every sequence item) inside one guarded block,
so a malformed object is refused before anything is written. Large values are not read into
memory (``defer_size``): a 1 GB multi-frame costs its header, not its pixels.

UIDs must be digits and dots, at most 64 characters (PS3.5 9.1). Components with a leading zero
are accepted: several devices emit them, and refusing would lose their images for a rule that
does not matter to storage; anything else (letters, spaces, slashes) is refused, which is also
what makes UIDs safe to use as path components.
"""

from __future__ import annotations

import re
import struct
from dataclasses import dataclass
from typing import BinaryIO

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.uid import UID

from gateway.dicom.status import Status
from gateway.errors import PermanentError

_UID = re.compile(r"^[0-9]+(\.[0-9]+)*$")
DEFER_SIZE = 64 * 1024
_META_START = 132  # 128-byte preamble + b"DICM"


class Refused(PermanentError):
    """The dataset cannot be kept; ``status`` is what the sender is told."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason)
        self.status = status
        self.reason = reason


@dataclass(frozen=True)
class Header:
    """What the ledger records about an instance; patient values stay out of logs."""

    sop_class_uid: UID
    sop_instance_uid: UID
    study_instance_uid: UID
    series_instance_uid: UID
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    modality: str | None
    study_date: str | None


def dataset_offset(fp: BinaryIO) -> int:
    """Where the dataset starts in a Part-10 file: after (0002,0000)'s declared group length."""
    fp.seek(_META_START)
    element = fp.read(12)
    tag_group, tag_element, vr, length, value = struct.unpack("<HH2sHI", element)
    if (tag_group, tag_element, vr, length) != (0x0002, 0x0000, b"UL", 4):
        raise Refused(Status.CANNOT_UNDERSTAND, "file meta has no group length")
    return _META_START + 12 + value


def is_valid_uid(value: object) -> bool:
    return isinstance(value, str) and len(value) <= 64 and bool(_UID.match(value))


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)


def _check_not_truncated(ds: Dataset, file_size: int) -> None:
    """pydicom reads a value that runs past the end of the data as a short value, silently; an
    element that overruns can only be the last one read, so checking that one is enough."""
    if not len(ds):
        return
    last = ds.get_item(list(ds.keys())[-1])
    tell, length = getattr(last, "value_tell", None), getattr(last, "length", 0)
    if tell is not None and length != 0xFFFFFFFF and tell + length > file_size:
        raise ValueError("last element runs past the end of the data set")


def read_header(fp: BinaryIO, affected_sop_class: str, affected_sop_instance: str) -> Header:
    """Decode the dataset fully and check it against the C-STORE request (PS3.4 B.2.3)."""
    try:
        fp.seek(0, 2)
        file_size = fp.tell()
        fp.seek(0)
        ds = dcmread(fp, defer_size=DEFER_SIZE)
        _check_not_truncated(ds, file_size)
        for _ in ds.iterall():
            pass  # converting every raw element is what proves the encoding is sound
        uids = {
            kw: ds.get(kw)
            for kw in ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")
        }
    except Exception as exc:  # noqa: BLE001 - untrusted bytes can fail any way; all are refusals
        raise Refused(Status.CANNOT_UNDERSTAND, f"dataset could not be decoded ({type(exc).__name__})")
    for keyword, value in uids.items():
        if not is_valid_uid(value):
            raise Refused(Status.INVALID_UID, f"{keyword} missing or not a valid UID")
    if uids["SOPClassUID"] != affected_sop_class or uids["SOPInstanceUID"] != affected_sop_instance:
        raise Refused(
            Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
            "SOP Class/Instance UID in the dataset differ from the request's Affected ones",
        )
    return Header(
        sop_class_uid=UID(uids["SOPClassUID"]),
        sop_instance_uid=UID(uids["SOPInstanceUID"]),
        study_instance_uid=UID(uids["StudyInstanceUID"]),
        series_instance_uid=UID(uids["SeriesInstanceUID"]),
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        accession_number=_text(ds, "AccessionNumber"),
        modality=_text(ds, "Modality"),
        study_date=_text(ds, "StudyDate"),
    )
