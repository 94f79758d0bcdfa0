"""The media layout of an export: PS3.10 file IDs for each instance and the DICOMDIR that indexes
them, so that a DICOM viewer opens the unpacked archive like a CD (PS3.10 8, PS3.3 Annex F).

Where the archive puts each file: ``DICOM/Sxxxxxxx/Rxxxxxxx/Ixxxxxxx`` (study, series, instance,
numbered from 1 in the order they first appear), relative to the archive root where ``DICOMDIR``
sits. Every component has at most 8 characters from A-Z, 0-9 (PS3.10 8.2, 8.5), 4 components of
the 8 allowed.

What the DICOMDIR holds: one PATIENT / STUDY / SERIES record per patient, study and series and
one leaf record (IMAGE, SR DOCUMENT, KEY OBJECT DOC, RT DOSE, PRESENTATION, ...) per instance,
chosen and filled exactly as pydicom's ``FileSet.add`` does: the record type from pydicom's SOP
class tables, the record contents from ``pydicom.fileset.DIRECTORY_RECORDERS`` (its documented
hook), the Specific Character Set copied so non-ASCII names stay readable. Records are laid out
depth first, each level's records chained by Offset of the Next Directory Record and pointing at
their first child by Offset of Referenced Lower-Level Directory Entity, both counted in bytes
from the start of the file (PS3.3 F.3.2.1, Table F.3-3).

Why not ``FileSet.add`` + ``FileSet.write`` themselves: they are quadratic in the instances of a
series (each add scans every instance already added, and every sibling record's key), and
``write`` copies every staged instance. Measured here with pydicom 3.0.2 on header-only data
sets: 2000 instances in one series take 54 s to add and 8 s to write; a CT series of 2000
slices is ordinary. This module builds the same records and offsets in linear time (the same
2000 instances: 2.6 s; 10000 in 4 series: 11 s, most of it pydicom encoding the DICOMDIR twice);
the tests read every DICOMDIR back with ``pydicom.fileset.FileSet``, DCMTK and dicom3tools.

Type 1 record attributes that an instance lacks or leaves empty (Patient ID, Study Date, Study
Time, Study ID, Modality, Series Number, Instance Number; all type 2 in most IODs) are invented
in the record only, as DCMTK's ``dcmmkdir --invent`` does; the files are never changed.
"""

from __future__ import annotations

import hashlib
import io
import itertools
import pathlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import cast

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filereader import read_file_meta_info
from pydicom.fileset import (
    DIRECTORY_RECORDERS,
    _four_level_record_type,  # the record type FileSet.add chooses (pydicom >= 3.0, < 4)
    _single_level_record_type,
)
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, MediaStorageDirectoryStorage, generate_uid

from gateway.errors import PermanentError

ROOT = "DICOM"
FILE_SET_ID = "GATEWAY_EXPORT"  # (0004,1130) CS, at most 16 characters
_NEXT = "OffsetOfTheNextDirectoryRecord"
_LOWER = "OffsetOfReferencedLowerLevelDirectoryEntity"
_FIRST = "OffsetOfTheFirstDirectoryRecordOfTheRootDirectoryEntity"
_LAST = "OffsetOfTheLastDirectoryRecordOfTheRootDirectoryEntity"


class MediaLayoutError(PermanentError, ValueError):
    """The instances cannot be laid out as a File-set (the reason: UIDs and keywords only)."""


@dataclass(frozen=True)
class MediaLayout:
    names: list[str]  # archive path of each input file, same order, PS3.10 file IDs
    dicomdir: bytes  # the DICOMDIR file's bytes, to be written at "DICOMDIR"


@dataclass
class _Node:
    """A directory record and the records one level below it, in first-seen order."""

    record: Dataset
    children: dict[str, _Node] = field(default_factory=dict)


def media_layout(files: Sequence[tuple[pathlib.Path, Dataset]]) -> MediaLayout:
    """File IDs for ``files`` (each instance's file and its header, pixel data not needed) and
    the DICOMDIR indexing them. Raises ``MediaLayoutError`` for a SOP Instance UID given twice,
    or an instance a directory record cannot describe (e.g. an SR without Content Date)."""
    roots: dict[str, _Node] = {}
    names: list[str] = []
    seen: set[str] = set()
    studies: dict[str, int] = {}  # study UID -> its folder's number
    series_numbers: dict[tuple[str, str], int] = {}  # (study, series) -> number within study
    series_counts: dict[str, int] = {}  # study UID -> series seen
    instance_counts: dict[tuple[str, str], int] = {}  # (study, series) -> instances seen
    for path, header in files:
        uid = str(header.get("SOPInstanceUID", ""))
        if not uid:
            raise MediaLayoutError(f"{path.name}: no SOP Instance UID")
        if uid in seen:
            raise MediaLayoutError(f"SOP Instance UID {uid} is given twice")
        seen.add(uid)
        study = str(header.get("StudyInstanceUID", ""))
        series = str(header.get("SeriesInstanceUID", ""))
        study_index = studies.setdefault(study, len(studies) + 1)
        series_index = series_numbers.get((study, series), 0)
        if not series_index:
            series_index = series_counts[study] = series_counts.get(study, 0) + 1
            series_numbers[(study, series)] = series_index
        instance_index = instance_counts.get((study, series), 0) + 1
        instance_counts[(study, series)] = instance_index
        components = [ROOT, f"S{study_index:07d}", f"R{series_index:07d}", f"I{instance_index:07d}"]
        names.append("/".join(components))
        source = _completed(header, series_index, instance_index)
        _add(roots, source, _transfer_syntax(path, header), components)
    return MediaLayout(names=names, dicomdir=_encode(roots))


def _transfer_syntax(path: pathlib.Path, header: Dataset) -> str:
    """The transfer syntax the file is in: its header's file meta, else the file's own."""
    syntax = getattr(getattr(header, "file_meta", None), "TransferSyntaxUID", None)
    if syntax:
        return str(syntax)
    try:
        syntax = read_file_meta_info(path).get("TransferSyntaxUID")
    except (OSError, pydicom.errors.InvalidDicomError) as exc:
        raise MediaLayoutError(f"{path.name}: no file meta information ({exc})") from exc
    if not syntax:
        raise MediaLayoutError(f"{path.name}: no Transfer Syntax UID")
    return str(syntax)


def _empty(ds: Dataset, keyword: str) -> bool:
    return keyword not in ds or ds[keyword].VM == 0


def _completed(header: Dataset, series_index: int, instance_index: int) -> Dataset:
    """``header``, or when it lacks type 1 record keys (PS3.3 F.5) a shallow copy of it with
    them invented: the elements are shared, never modified; only the copy gains new ones."""
    inventions: dict[str, Callable[[], object]] = {
        "PatientID": lambda: _invented_patient_id(header),
        "StudyDate": lambda: _first_of(header, ("SeriesDate", "AcquisitionDate", "ContentDate"),
                                       "19000101"),
        "StudyTime": lambda: _first_of(header, ("SeriesTime", "AcquisitionTime", "ContentTime"),
                                       "000000"),
        "StudyID": lambda: "1",
        "Modality": lambda: "OT",
        "SeriesNumber": lambda: series_index,
        "InstanceNumber": lambda: instance_index,
    }
    missing = [keyword for keyword in inventions if _empty(header, keyword)]
    if not missing:
        return header
    ds = Dataset({element.tag: element for element in header})
    for keyword in missing:
        if keyword in ds:
            del ds[keyword]  # a new element: setting the shared one would change the caller's
        setattr(ds, keyword, inventions[keyword]())
    return ds


def _first_of(ds: Dataset, keywords: tuple[str, ...], default: str) -> str:
    for keyword in keywords:
        if not _empty(ds, keyword):
            return str(ds[keyword].value)
    return default


def _invented_patient_id(header: Dataset) -> str:
    """One invented ID per patient name and birth date, so one person stays one PATIENT record
    and two people never merge (the ID is a digest: the record carries no more than the file)."""
    key = f"{header.get('PatientName', '')}|{header.get('PatientBirthDate', '')}"
    return "NOID" + hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:12].upper()


def _add(roots: dict[str, _Node], ds: Dataset, syntax: str, components: list[str]) -> None:
    """Place the records of one instance in the tree, creating only those not there yet: the
    PATIENT, STUDY and SERIES records of its first instance stand for all the others (keyed as
    FileSet keys them: Patient ID, Study and Series Instance UIDs)."""
    uid = str(ds.SOPInstanceUID)
    single = _single_level_record_type(ds)
    levels = [(single, uid)] if single != "PATIENT" else [
        ("PATIENT", str(ds.PatientID)), ("STUDY", str(ds.StudyInstanceUID)),
        ("SERIES", str(ds.SeriesInstanceUID)), (_four_level_record_type(ds), uid)]
    level, leaf = roots, None
    for record_type, key in levels:
        node = level.get(key)
        if node is None:
            node = level[key] = _Node(_record(ds, record_type))
        level, leaf = node.children, node.record
    assert leaf is not None
    leaf.ReferencedFileID = components
    leaf.ReferencedSOPClassUIDInFile = ds.SOPClassUID
    leaf.ReferencedSOPInstanceUIDInFile = uid
    leaf.ReferencedTransferSyntaxUIDInFile = syntax


def _record(ds: Dataset, record_type: str) -> Dataset:
    """One directory record, as ``FileSet.add`` builds it (PS3.3 F.5)."""
    try:
        record = DIRECTORY_RECORDERS[record_type](ds)
    except (ValueError, KeyError, AttributeError) as exc:
        raise MediaLayoutError(
            f"SOP Instance {ds.SOPInstanceUID}: no {record_type} record: {exc}") from exc
    if record_type in ("SR DOCUMENT", "KEY OBJECT DOC"):
        _conform_document_record(record, ds)
    record.OffsetOfTheNextDirectoryRecord = 0
    record.RecordInUseFlag = 0xFFFF
    record.OffsetOfReferencedLowerLevelDirectoryEntity = 0
    record.DirectoryRecordType = record_type
    if "SpecificCharacterSet" in ds:
        record.SpecificCharacterSet = ds.SpecificCharacterSet
    return record


def _conform_document_record(record: Dataset, ds: Dataset) -> None:
    """SR DOCUMENT and KEY OBJECT DOC records as PS3.3 F.5 describes them, where pydicom's
    recorders copy too much or too little: the Content Sequence keeps only the document title's
    HAS CONCEPT MOD items (not the whole report, which may be large and makes the DICOMDIR
    fail dciodvfy); a VERIFIED document carries its latest Verification DateTime, which the SR
    IOD keeps inside the Verifying Observer Sequence."""
    if "ContentSequence" in record:
        modifiers = [item for item in record.ContentSequence
                     if item.get("RelationshipType") == "HAS CONCEPT MOD"]
        if modifiers:
            record.ContentSequence = DicomSequence(modifiers)
        else:
            del record.ContentSequence
    if record.get("VerificationFlag") == "VERIFIED" and "VerificationDateTime" not in record:
        times = [str(item.VerificationDateTime) for item in ds.get("VerifyingObserverSequence", [])
                 if item.get("VerificationDateTime")]
        if times:
            record.VerificationDateTime = max(times)


def _flatten(roots: dict[str, _Node]) -> list[_Node]:
    """Depth first: each record followed by its descendants (the layout DCMTK writes too)."""
    order: list[_Node] = []
    stack = list(reversed(roots.values()))
    while stack:
        node = stack.pop()
        order.append(node)
        stack.extend(reversed(node.children.values()))
    return order


def _encode(roots: dict[str, _Node]) -> bytes:
    """The DICOMDIR (Basic Directory IOD, PS3.3 A.1 / F.2) with its records' byte offsets.

    Offsets depend on the encoded length of every record before them, and setting them changes
    no length (all are UL): encode once with zeros, read the position of each record's item tag
    back with pydicom's reader (``seq_item_tell``), set the offsets, encode again."""
    order = _flatten(roots)
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = MediaStorageDirectoryStorage
    ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.FileSetID = FILE_SET_ID
    setattr(ds, _FIRST, 0)
    setattr(ds, _LAST, 0)
    ds.FileSetConsistencyFlag = 0
    ds.DirectoryRecordSequence = DicomSequence([node.record for node in order])
    first = _write(ds)
    items = pydicom.dcmread(io.BytesIO(first)).DirectoryRecordSequence
    offsets = {id(node): int(item.seq_item_tell) for node, item in zip(order, items, strict=True)}
    for node in order:
        siblings = node.children.values()
        setattr(node.record, _LOWER, offsets[id(next(iter(siblings)))] if siblings else 0)
        children = list(siblings)
        for child, following in itertools.pairwise(children):
            setattr(child.record, _NEXT, offsets[id(following)])
    tops = list(roots.values())
    for top, following in itertools.pairwise(tops):
        setattr(top.record, _NEXT, offsets[id(following)])
    setattr(ds, _FIRST, offsets[id(tops[0])] if tops else 0)
    setattr(ds, _LAST, offsets[id(tops[-1])] if tops else 0)
    final = _write(ds)
    if len(final) != len(first):
        raise AssertionError("DICOMDIR length changed while setting UL offsets")
    return final


def _write(ds: Dataset) -> bytes:
    buffer = io.BytesIO()
    pydicom.dcmwrite(cast(io.BytesIO, buffer), ds, enforce_file_format=True)
    return buffer.getvalue()
