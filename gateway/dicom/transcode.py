"""Decompressing for a peer that takes only uncompressed data: one place for every sender.

Invariant: decoding changes the encoding, never the identity. Every UID an instance carries
(SOP, Study, Series Instance UID, and every other UI element, in sequences too) is the same
after as before; only the Transfer Syntax UID (0002,0010) changes. A UID that changed on the way
makes the instance a different one to the peer (PS3.3 C.12.1.1.1: a SOP Instance UID names one
instance) and its proof of delivery impossible, so a changed UID is refused, never sent.
"""

from __future__ import annotations

import numpy
from pydicom.datadict import keyword_for_tag
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag, Tag
from pydicom.uid import DeflatedExplicitVRLittleEndian, ExplicitVRLittleEndian

from gateway.errors import PermanentError

TRANSFER_SYNTAX_UID = Tag(0x0002, 0x0010)
PIXEL_DATA = Tag(0x7FE0, 0x0010)
_WORD_BYTES = {"OW": 2, "OL": 4, "OF": 4, "OD": 8, "OV": 8}  # the one UID decoding is meant to change
UidAt = tuple[tuple[BaseTag | int, ...], str]  # the path of tags (and sequence items) to a value


def as_uncompressed(ds: Dataset) -> Dataset:
    """Decompress (pydicom with the pylibjpeg / Pillow plugins) in place. A deflated object is
    inflated already and only needs its transfer syntax restated; a big endian one also needs its
    OW/OL/OF/OD/OV values byte-swapped, which pydicom leaves as read (numbers of other VRs it
    decodes, and encodes again in the new order).

    pydicom 3's ``decompress`` makes up a new SOP Instance UID unless told not to; a peer then
    holds the instance under a UID the gateway never received, and asking it (C-FIND) never finds
    the original. Told not to, and checked afterwards, in case a library ever does it anyway."""
    syntax = ds.file_meta.TransferSyntaxUID
    before = uids(ds)
    try:
        if syntax.is_compressed:
            ds.decompress(generate_instance_uid=False)
        elif not syntax.is_little_endian:
            _swap_words(ds, top=True)
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        elif syntax == DeflatedExplicitVRLittleEndian:
            ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    except Exception as exc:  # each codec raises its own kinds; the object itself is the problem
        raise PermanentError(f"cannot decompress {syntax.name}: {type(exc).__name__}: {exc}") from exc
    after = uids(ds)
    if after != before:
        changed = sorted({_name(path) for path, _ in before ^ after})
        raise PermanentError(f"decompressing {syntax.name} changed {', '.join(changed)}; not sent")
    return ds


def _swap_words(ds: Dataset, top: bool) -> None:
    """Explicit VR Big Endian to little endian (PS3.5 7.3, Annex A.3): each OW, OL, OF, OD or OV
    value is a run of 2, 4 or 8 byte words, each reversed. Pixel Data is read as pydicom decodes
    it: samples of Bits Allocated bits, or words of the OW that holds 8-bit samples."""
    for element in ds:
        if element.VR == "SQ":
            for item in element.value:
                _swap_words(item, top=False)
            continue
        size = _WORD_BYTES.get(element.VR, 1)
        if top and element.tag == PIXEL_DATA and int(ds.get("BitsAllocated", 0)) > 8:
            size = int(ds.BitsAllocated) // 8
        if size > 1 and element.value:
            data = bytes(element.value)
            if len(data) % size:
                raise PermanentError(
                    f"{element.name} {element.tag} holds {len(data)} bytes, not whole "
                    f"{size}-byte words; cannot convert it from big endian")
            element.value = numpy.frombuffer(data, f">u{size}").astype(f"<u{size}").tobytes()


def uids(ds: Dataset) -> frozenset[UidAt]:
    """Every UI value of the dataset and its file meta information, with where it is (nested
    sequence items included), except the Transfer Syntax UID."""
    found: set[UidAt] = set()
    meta = getattr(ds, "file_meta", None)
    if meta is not None:
        _collect(meta, (), found)
    _collect(ds, (), found)
    return frozenset(found)


def _collect(ds: Dataset, at: tuple[BaseTag | int, ...], found: set[UidAt]) -> None:
    for element in ds:
        where = (*at, element.tag)
        if element.VR == "SQ":
            for index, item in enumerate(element.value):
                _collect(item, (*where, index), found)
        elif element.VR == "UI" and element.tag != TRANSFER_SYNTAX_UID:
            found.add((where, _text(element)))


def _text(element: DataElement) -> str:
    value = element.value
    if isinstance(value, list | tuple):  # UI with VM > 1 (rare, but allowed)
        return "\\".join(str(v) for v in value)
    return "" if value is None else str(value)


def _name(path: tuple[BaseTag | int, ...]) -> str:
    tag = Tag(path[-1])  # the UI element itself; the items before it are sequences and indexes
    return keyword_for_tag(tag) or str(tag)
