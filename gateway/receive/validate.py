"""Decide whether a received dataset can be kept, and pull out what the ledger indexes.

The whole data set's encoding is checked once, from its bytes (``structure.check_structure``):
every element's header at every depth, the pixel data's fragments and the elements after them,
each declared length inside what contains it, so a truncated or malformed object is refused with
0xC000 before anything is kept. Values are not converted: a bad value (a date with letters, a
private element of unknown VR, a number of odd length) must not cost a hospital its image, and its
encoding is the sender's to answer for. Large values are not read into memory (``defer_size``): a
1 GB multi-frame costs its header, not its pixels.

UIDs must be digits and dots, at most 64 characters (PS3.5 9.1), matched over the whole value
(a trailing newline is not digits and dots). Components with a leading zero are accepted: several
devices emit them, and refusing would lose their images for a rule that does not matter to
storage; anything else (letters, spaces, slashes) is refused, which is also what makes UIDs safe
to use as path components. Study, Series and SOP Instance UIDs are required (PS3.3 C.7.2.1,
C.7.3.1, C.12.1): the spool files an instance under them and every query level keys on them, so
an object without one is refused with 0xC001 (DCMTK's storescp keeps it; we say why instead).

Every refusal's ``reason`` is what the sender reads as Error Comment (0000,0902), an LO of at most
64 characters (PS3.7 C.4), so each names the attribute or element at fault. The log gets the
exception and the element's tag and keyword at DEBUG, never a value.
"""

from __future__ import annotations

import logging
import re
import struct
import zlib
from dataclasses import dataclass
from io import BytesIO
from typing import BinaryIO

from pydicom import dcmread
from pydicom.charset import convert_encodings, default_encoding
from pydicom.datadict import tag_for_keyword
from pydicom.dataelem import DataElement, RawDataElement, convert_raw_data_element
from pydicom.dataset import Dataset
from pydicom.tag import BaseTag
from pydicom.uid import UID

from gateway.dicom.status import Status
from gateway.errors import PermanentError
from gateway.receive.structure import (
    SEQUENCE_TAGS,
    UNDEFINED_LENGTH,
    Malformed,
    TopElement,
    check_structure,
    tag_text,
)

log = logging.getLogger(__name__)

_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
DEFER_SIZE = 64 * 1024
PIXEL_DATA_TAGS = frozenset({0x7FE00008, 0x7FE00009, 0x7FE00010})  # Float, Double Float, Pixel
_META_START = 132  # 128-byte preamble + b"DICM"
REASON_LENGTH = 64  # Error Comment (0000,0902) is LO (PS3.7 C.4, PS3.5 Table 6.2-1)
# Checked in this order; each is required to file and find the instance.
REQUIRED_UIDS = ("SOPClassUID", "SOPInstanceUID", "StudyInstanceUID", "SeriesInstanceUID")


class Refused(PermanentError):
    """The dataset cannot be kept; ``status`` is what the sender is told, ``reason`` its Error
    Comment (an LO: cut to 64 characters, though every reason here is written to fit)."""

    def __init__(self, status: Status, reason: str) -> None:
        super().__init__(reason[:REASON_LENGTH])
        self.status = status
        self.reason = reason[:REASON_LENGTH]


@dataclass(frozen=True)
class Header:
    """The validated UIDs, the received patient values (the ledger keeps them beside the
    remapped ones) and the decoded dataset; patient values stay out of logs."""

    sop_class_uid: UID
    sop_instance_uid: UID
    study_instance_uid: UID
    series_instance_uid: UID
    patient_id: str | None
    patient_name: str | None
    accession_number: str | None
    # The top-level elements before Pixel Data, values converted only when asked for: what remap
    # rules (top-level keywords) match and plan on. Elements after the pixel data (padding,
    # signatures, private groups) are checked by the structure walk but not kept here.
    dataset: Dataset


def dataset_offset(fp: BinaryIO) -> int:
    """Where the dataset starts in a Part-10 file: after (0002,0000)'s declared group length."""
    fp.seek(_META_START)
    element = fp.read(12)
    tag_group, tag_element, vr, length, value = struct.unpack("<HH2sHI", element)
    if (tag_group, tag_element, vr, length) != (0x0002, 0x0000, b"UL", 4):
        raise Refused(Status.CANNOT_UNDERSTAND, "file meta has no group length")
    return _META_START + 12 + value


def is_valid_uid(value: object) -> bool:
    """PS3.5 9.1: digits and dots, 64 characters at most, over the whole value."""
    return isinstance(value, str) and len(value) <= 64 and _UID.fullmatch(value) is not None


def _transfer_syntax(fp: BinaryIO, offset: int) -> UID:
    """The file meta's Transfer Syntax UID (0002,0010): the negotiated one, as the gateway wrote
    the meta (explicit VR little endian, PS3.10 7.1). A few element headers, read directly: pydicom
    would take a tenth of the C-STORE handler's validation time for this."""
    fp.seek(_META_START)
    meta = fp.read(offset - _META_START)
    position = 0
    while position + 8 <= len(meta):
        group, element, vr, length = struct.unpack_from("<HH2sH", meta, position)
        header = 8
        if vr in (b"OB", b"OW", b"UN", b"UT", b"SQ"):
            length, header = struct.unpack_from("<I", meta, position + 8)[0], 12
        if (group, element) == (0x0002, 0x0010):
            value = meta[position + header:position + header + length]
            return UID(value.rstrip(b"\0 ").decode("ascii"))
        position += header + length
    raise Refused(Status.CANNOT_UNDERSTAND, "file meta has no Transfer Syntax UID")


def _check_deflated(fp: BinaryIO, offset: int) -> None:
    """Deflated data sets (PS3.5 A.5) are walked once inflated: pydicom inflates them into memory
    to read them anyway. A deflate stream cut short is a truncated data set."""
    fp.seek(offset)
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    try:
        inflated = inflater.decompress(fp.read()) + inflater.flush()
    except zlib.error as exc:
        raise Malformed(None, "deflated data set does not inflate") from exc
    if not inflater.eof:
        raise Malformed(None, "deflated data set ends before its deflate stream")
    check_structure(BytesIO(inflated), 0, len(inflated), implicit=False, little=True)


def decode_dataset(fp: BinaryIO) -> Dataset:
    """Check the whole data set's structure, then read its header up to the pixel data.

    Raises ``Malformed`` (element, reason) when the structure breaks, ``Refused`` when the file
    meta is not the gateway's, and whatever pydicom raises on what the walk let through.
    """
    fp.seek(0, 2)
    file_size = fp.tell()
    offset = dataset_offset(fp)
    syntax = _transfer_syntax(fp, offset)
    if syntax.is_deflated:
        _check_deflated(fp, offset)
    else:
        top: list[TopElement] = []
        implicit = check_structure(fp, offset, file_size, syntax.is_implicit_VR,
                                   syntax.is_little_endian, top)
        header = header_from_walk(fp, top, implicit, syntax.is_little_endian)
        if header is not None:
            return header
    fp.seek(0)
    return dcmread(fp, defer_size=DEFER_SIZE, stop_before_pixels=True)


def header_from_walk(fp: BinaryIO, top: list[TopElement], implicit: bool,
                     little: bool) -> Dataset | None:
    """The top-level standard elements before the pixel data as pydicom's ``read_dataset`` makes
    them (raw elements, converted when asked for), from the structure walk's offsets: pydicom's
    own element generator would walk the same header again, which was about 45% of the C-STORE
    handler's CPU (py-spy, 400 CT images, 2026-12-03). None where this reading could differ from
    pydicom's, which then reads the file: a value over ``DEFER_SIZE`` (pydicom defers it), an
    element read as implicit inside an explicit data set, an undefined length that is not a
    sequence of known VR.

    Private elements (odd groups) are left out: everything the header is read for names
    standard attributes by keyword (the ledger's columns, remap rules, routes), and a CT image
    from a real scanner carries two private elements for every standard one (179 of 256 in the
    bench's set, modelled on one), each a ``RawDataElement`` nobody would ask for. The kept file
    is untouched; the structure walk has checked them like every other element.
    """
    chosen: list[TopElement] = []
    for element in top:
        if element[0] in PIXEL_DATA_TAGS:  # pydicom's stop_before_pixels
            break
        if not element[0] & 0x10000:  # an even group: standard (PS3.5 7.8.1)
            chosen.append(element)
    if not chosen:
        return None
    first, stop = chosen[0][3], chosen[-1][4]  # one read, from the first to the last chosen
    fp.seek(first)
    block = fp.read(stop - first)
    raw: dict[BaseTag, DataElement | RawDataElement] = {}
    for tag, vr, length, value, end in chosen:
        if vr is None and not implicit:
            return None
        text = vr.decode("ascii") if vr is not None else None
        if length == UNDEFINED_LENGTH:
            if not (vr == b"SQ" or (vr is None and tag in SEQUENCE_TAGS)):
                return None
            text, length = "SQ", end - 8 - value  # the items, less the Sequence Delimitation
        if length > DEFER_SIZE:
            return None
        at = value - first
        key = BaseTag(tag)
        raw[key] = RawDataElement(key, text, length, block[at:at + length], value, implicit,
                                  little, True)
    ds = Dataset(raw)
    encoding: str | list[str] = default_encoding
    if 0x00080005 in raw:
        charset = raw[BaseTag(0x00080005)]
        assert isinstance(charset, RawDataElement)
        encoding = convert_encodings(convert_raw_data_element(charset).value)
    ds.set_original_encoding(implicit, little, encoding)
    return ds


def _element(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    return f"{keyword} {tag_text(tag)}" if tag is not None else keyword


def _uid(ds: Dataset, keyword: str) -> UID:
    """A required UID, or the refusal naming it: missing (absent or empty) or not a UID.

    Checked on the value's bytes less their padding (trailing NULs or spaces, PS3.5 6.2, 9.1):
    pydicom's ``UID`` strips any whitespace, so a UID ending in a newline would be indexed
    without it while the kept file holds it.
    """
    element = ds.get_item(keyword, keep_deferred=True)
    value: object = None
    if isinstance(element, RawDataElement):
        if element.length > 64 + 2:  # no UID, and a deferred value stays unread
            raise Refused(Status.INVALID_UID, f"{_element(keyword)} is not a valid UID (PS3.5 9.1)")
        value = (element.value or b"").rstrip(b"\0 ").decode("latin-1")
    elif element is not None:  # converted already: pydicom's own reading of it
        value = element.value
    if value is None or value == "":
        raise Refused(Status.INVALID_UID, f"{_element(keyword)} missing: required to file it")
    if not is_valid_uid(value):
        raise Refused(Status.INVALID_UID, f"{_element(keyword)} is not a valid UID (PS3.5 9.1)")
    return UID(str(value))


def _text(ds: Dataset, keyword: str) -> str | None:
    value = ds.get(keyword)
    if value is None or value == "":
        return None
    return str(value)


def read_header(fp: BinaryIO, affected_sop_class: str, affected_sop_instance: str) -> Header:
    """Check the data set and read its header against the C-STORE request (PS3.4 B.2.3)."""
    try:
        ds = decode_dataset(fp)
    except Malformed as exc:
        where = tag_text(exc.tag) if exc.tag is not None else "-"
        log.debug("data set refused: %s (%s at %s %s%s)", exc.reason, type(exc).__name__, where,
                  exc.keyword or "-", f" in {exc.path}" if exc.path else "")
        raise Refused(Status.CANNOT_UNDERSTAND, exc.reason) from exc
    except Refused:
        raise
    except Exception as exc:  # untrusted bytes can fail any way; all are refusals
        log.debug("data set refused: %s reading the header (element not known)", type(exc).__name__)
        reason = f"data set could not be decoded ({type(exc).__name__})"
        raise Refused(Status.CANNOT_UNDERSTAND, reason) from exc
    uids = {keyword: _uid(ds, keyword) for keyword in REQUIRED_UIDS}
    if uids["SOPClassUID"] != affected_sop_class:
        raise Refused(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                      "SOPClassUID differs from the Affected SOP Class UID")
    if uids["SOPInstanceUID"] != affected_sop_instance:
        raise Refused(Status.DATASET_DOES_NOT_MATCH_SOP_CLASS,
                      "SOPInstanceUID differs from the Affected SOP Instance UID")
    return Header(
        sop_class_uid=uids["SOPClassUID"],
        sop_instance_uid=uids["SOPInstanceUID"],
        study_instance_uid=uids["StudyInstanceUID"],
        series_instance_uid=uids["SeriesInstanceUID"],
        patient_id=_text(ds, "PatientID"),
        patient_name=_text(ds, "PatientName"),
        accession_number=_text(ds, "AccessionNumber"),
        dataset=ds,
    )
