"""Carry out a plan on an object: new values, the previous ones in Original Attributes Sequence,
and a character set that can hold everything; then rewrite the spool file durably.

PS3.3 C.12.1.1.9: each modification adds one item to Original Attributes Sequence (0400,0561)
holding, in Modified Attributes Sequence, the attributes as they were (an attribute that did not
exist is listed with an empty value), with the time, the modifying system, the source of the
previous values and the reason (COERCE or CORRECT). Values are never written as ``?``: when the
object's Specific Character Set cannot encode a new value, every text value of the object is
decoded with the old set and the object moves to ISO_IR 192 (UTF-8).

The rewrite reads only the header into memory; pixel data (and anything after it) is copied from
the received file as bytes, so a 1 GB multi-frame costs a copy on disk, not 1 GB of memory.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import datetime
from io import BytesIO
from pathlib import Path

from pydicom import config as pydicom_config
from pydicom import dcmread
from pydicom.charset import convert_encodings, encode_string
from pydicom.datadict import dictionary_VR, tag_for_keyword
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence

from gateway.receive.spool import fsync_path, hash_dataset
from gateway.receive.validate import dataset_offset
from gateway.remap.plan import Value, Working

UTF8 = "ISO_IR 192"
_TEXT_VRS = {"SH", "LO", "ST", "PN", "LT", "UC", "UT"}
COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Modification:
    """Why and by whom, for the Original Attributes Sequence item."""

    reason: str  # COERCE | CORRECT
    modifying_system: str
    source_of_previous_values: str  # the calling AE title the values came from
    at: datetime


@contextmanager
def _strict_writing() -> Iterator[None]:
    """pydicom writes a value its character set cannot hold as ``?`` unless told to raise."""
    saved = pydicom_config.settings.writing_validation_mode
    pydicom_config.settings.writing_validation_mode = pydicom_config.RAISE
    try:
        yield
    finally:
        pydicom_config.settings.writing_validation_mode = saved


_DEFAULT_REPERTOIRE = {"", "ISO_IR 6", "ISO 2022 IR 6"}


def strict_encodings(ds: Dataset) -> list[str]:
    """Python codecs for the object's Specific Character Set, the default repertoire as ASCII.

    pydicom maps the default repertoire to Latin-1 so that it can read what vendors actually
    send; checking a new value against that would let a ``u-umlaut`` into a file that declares
    ASCII (or ISO 2022 IR 87, whose first code element is ASCII).
    """
    declared = ds.get("SpecificCharacterSet") or ""
    terms = [declared] if isinstance(declared, str) else list(declared)
    terms = terms or [""]
    return [
        "ascii" if term.strip() in _DEFAULT_REPERTOIRE else convert_encodings([term.strip()])[0]
        for term in terms
    ]


def _texts(value: Value) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                yield from item.values()
            else:
                yield item


def _encodable(changes: dict[str, Value], encodings: list[str]) -> bool:
    with _strict_writing():
        for keyword, value in changes.items():
            vr = dictionary_VR(keyword)
            if vr not in _TEXT_VRS and vr != "SQ":
                continue
            for text in _texts(value):
                try:
                    encode_string(text, encodings)
                except (UnicodeError, ValueError, LookupError):
                    return False
    return True


def _move_to_utf8(ds: Dataset) -> None:
    """Decode every text value with the old character set (iterating converts raw elements;
    PersonName decodes lazily, so names become plain text now), then declare UTF-8."""
    for element in ds.iterall():
        if element.VR == "PN" and element.value:
            element.value = str(element.value) if element.VM == 1 else [str(v) for v in element.value]
    ds.SpecificCharacterSet = UTF8


def _element(keyword: str, value: Value) -> DataElement:
    tag = tag_for_keyword(keyword)
    assert tag is not None  # rules.py checked every keyword
    vr = dictionary_VR(keyword)
    if vr == "SQ":
        items = []
        for fields in value or []:
            item = Dataset()
            for item_keyword, item_value in (fields.items() if isinstance(fields, dict) else ()):
                item[item_keyword] = _element(item_keyword, item_value)
            items.append(item)
        return DataElement(tag, vr, Sequence(items))
    return DataElement(tag, vr, value)


def apply_changes(ds: Dataset, changes: dict[str, Value], why: Modification) -> None:
    """Edit ``ds`` in place. Moves it to UTF-8 first when a new value needs it."""
    if not changes:
        return
    if not _encodable(changes, strict_encodings(ds)):
        _move_to_utf8(ds)
    previous = Dataset()
    for keyword in changes:
        if keyword in ds:
            previous[keyword] = copy.deepcopy(ds[keyword])
        else:
            tag = tag_for_keyword(keyword)
            assert tag is not None
            previous[keyword] = DataElement(tag, dictionary_VR(keyword), None)
    for keyword, value in changes.items():
        if value is None:
            if keyword in ds:
                del ds[keyword]
        else:
            ds[keyword] = _element(keyword, value)
    item = Dataset()
    item.ModifiedAttributesSequence = [previous]
    item.AttributeModificationDateTime = why.at.strftime("%Y%m%d%H%M%S.%f%z")
    item.ModifyingSystem = why.modifying_system
    item.SourceOfPreviousValues = why.source_of_previous_values
    item.ReasonForTheAttributeModification = why.reason
    history = ds.get("OriginalAttributesSequence")
    ds.OriginalAttributesSequence = list(history or []) + [item]
    if "SOPInstanceUID" in changes and getattr(ds, "file_meta", None) is not None:
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID


@dataclass(frozen=True)
class RewrittenFile:
    """The spool file after a rewrite: its size and the SHA-256 of its data set, by the ledger's
    definition (``gateway.receive.spool.hash_dataset``: from the data set's offset, after the File
    Meta Information), for ``instances.kept_sha256``."""

    size_bytes: int
    sha256: str


def rewrite_file(path: Path, changes: dict[str, Value], why: Modification) -> RewrittenFile:
    """Rewrite a spool file with the plan applied: temp file beside it, fsync, rename over it,
    fsync the folder. Idempotent: values the file already has are not changed again, so a
    repeated rewrite adds no second Original Attributes item.

    The data set is hashed as it is written (the header from memory, the copied tail chunk by
    chunk), so the kept hash costs no second read of the file. Only a rewrite that finds nothing
    to change (repeated after a crash between the rename and the ledger's commit) reads the file
    to hash it: the ledger must then learn the hash of what is there."""
    temp = path.with_name(path.name + ".tmp")
    with open(path, "rb") as source:
        ds = dcmread(source, stop_before_pixels=True)
        if ds.file_meta.TransferSyntaxUID.is_deflated:
            source.seek(0)  # deflated bytes cannot be copied past the header: read it whole
            ds = dcmread(source)
        tail_offset = source.tell()
        current = Working(ds)
        # A rewrite repeated after a crash finds its values already there and changes nothing.
        changes = {k: v for k, v in changes.items() if current.original(k) != v}
        if not changes:
            return RewrittenFile(path.stat().st_size, hash_dataset(path, dataset_offset(source)))
        apply_changes(ds, changes, why)
        try:
            with open(temp, "wb") as target:
                head = BytesIO()
                with _strict_writing():
                    ds.save_as(head)
                digest = hashlib.sha256(head.getbuffer()[dataset_offset(head):])
                target.write(head.getbuffer())
                del head
                source.seek(tail_offset)
                while chunk := source.read(COPY_CHUNK):
                    digest.update(chunk)
                    target.write(chunk)
                target.flush()
                os.fsync(target.fileno())
        except BaseException:
            temp.unlink(missing_ok=True)
            raise
    os.replace(temp, path)
    fsync_path(path.parent)
    return RewrittenFile(path.stat().st_size, digest.hexdigest())
