"""Valid objects rich in structure, and a map of where each of their lengths sits.

``rich_dataset`` has what makes a data set hard to read: nested sequences of defined and undefined
length, a private block with odd lengths and a UN element, a private sequence, a private value
larger than the gateway's 64 KiB defer size before the pixel data, non-ASCII text, and elements
after the pixel data (a large private one and Data Set Trailing Padding). ``encoded`` writes it in
each transfer syntax the gateway accepts; ``layout`` finds every element, item and fragment in the
bytes with pydicom's reader (not the gateway's), so a test can cut or inflate any of them.
"""

from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass
from io import BytesIO

from pydicom.dataelem import DataElement, RawDataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.filebase import DicomBytesIO
from pydicom.filereader import read_dataset
from pydicom.filewriter import write_dataset, write_file_meta_info
from pydicom.sequence import Sequence
from pydicom.uid import (
    DeflatedExplicitVRLittleEndian,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEGBaseline8Bit,
)
from pydicom.valuerep import EXPLICIT_VR_LENGTH_32

from tests.factory import make_dataset

UNDEFINED = 0xFFFFFFFF
LARGE = 70_001  # over the gateway's 64 KiB defer size, and odd
SYNTAXES = {
    "explicit": ExplicitVRLittleEndian,
    "implicit": ImplicitVRLittleEndian,
    "big-endian": ExplicitVRBigEndian,
    "jpeg": JPEGBaseline8Bit,
    "deflated": DeflatedExplicitVRLittleEndian,
}


def _code(value: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "SCT", meaning
    return item


def rich_dataset(encapsulated: bool = False, large: bool = True) -> Dataset:
    """``large``: with the two private values over the defer size (the data set is then over
    64 KiB, which no 16-bit length can reach past)."""
    ds = make_dataset(PatientName="MÜLLER^JÖRG", SpecificCharacterSet="ISO_IR 192")
    region = _code("818981001", "Abdomen")
    region.AnatomicRegionModifierSequence = Sequence([_code("24028007", "Right")])
    region.AnatomicRegionModifierSequence.is_undefined_length = True
    ds.AnatomicRegionSequence = Sequence([region, _code("51185008", "Thorax")])
    ds.ProcedureCodeSequence = Sequence([_code("77477000", "CT")])
    ds["ProcedureCodeSequence"].is_undefined_length = True
    ds.ProcedureCodeSequence[0].is_undefined_length_sequence_item = True
    block = ds.private_block(0x0009, "GATEWAY TEST 1.0", create=True)
    block.add_new(0x01, "LO", "private text")
    block.add_new(0x02, "OB", b"\x01\x02\x03")  # odd length
    block.add_new(0x03, "UL", 7)
    block.add_new(0x04, "UN", b"\x00" * 5)
    inner = Dataset()
    inner.add_new(0x00091010, "LO", "GATEWAY TEST 1.0")
    inner.add_new(0x00091001, "LO", "nested private")
    block.add_new(0x05, "SQ", Sequence([inner]))
    size = LARGE if large else 301
    before = ds.private_block(0x0029, "GATEWAY TEST 2.0", create=True)
    before.add_new(0x01, "OB", bytes(range(256)) * (size // 256) + bytes(size % 256))
    if encapsulated:
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "YBR_FULL_422"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PlanarConfiguration = 8, 8, 7, 0
        ds.NumberOfFrames = 2
        ds.PixelData = encapsulate([b"\xff\xd8" + bytes(300) + b"\xff\xd9"] * 2)
        ds["PixelData"].VR = "OB"
        ds["PixelData"].is_undefined_length = True
    trailer = ds.private_block(0x7FE1, "GATEWAY TEST 3.0", create=True)
    trailer.add_new(0x01, "OB", bytes(size + 1))
    ds.DataSetTrailingPadding = bytes(16)
    return ds


def encoded(syntax: str, large: bool = True) -> tuple[Dataset, bytes]:
    """The rich dataset and its data set bytes in ``syntax`` (a key of ``SYNTAXES``)."""
    ds = rich_dataset(encapsulated=syntax == "jpeg", large=large)
    buffer = DicomBytesIO()
    buffer.is_little_endian = syntax != "big-endian"
    buffer.is_implicit_VR = syntax == "implicit"
    write_dataset(buffer, ds)
    data = buffer.getvalue()
    if syntax == "deflated":
        deflater = zlib.compressobj(wbits=-zlib.MAX_WBITS)
        data = deflater.compress(data) + deflater.flush()
    return ds, data


def part10(ds: Dataset, data: bytes, syntax: str) -> bytes:
    """``data`` as the gateway keeps it: preamble, file meta naming ``syntax``, the data set."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = ds.SOPClassUID
    meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    meta.TransferSyntaxUID = SYNTAXES[syntax]
    buffer = DicomBytesIO()
    write_file_meta_info(buffer, meta)
    return bytes(128) + b"DICM" + buffer.getvalue() + data


# Private elements as devices send them, each where its group puts it: before the pixel data (the
# last element pydicom reads there, so a deferred one used to be read and converted) or after it
# (where a deferred one could not be read at all). In implicit VR, pydicom converts a value with
# the VR its private dictionary gives, whatever the value's length.
PRIVATE = [
    # (group, private creator, element, VR in explicit VR, value length)
    (0x0029, "SIEMENS CSA HEADER", 0x10, "OB", LARGE),
    (0x0043, "GEMS_PARM_01", 0x08, "SS", 3),  # SS of odd length
    (0x0043, "GEMS_PARM_01", 0x08, "UN", LARGE),
    (0x2005, "Philips MR Imaging DD 001", 0x08, "FL", 70_002),  # FL not a multiple of 4
    (0x7019, "TOSHIBA_MEC_OT3", 0x80, "OB", 0),  # VR "OB_OW" in pydicom's dictionary
    (0x0027, "FDMS 1.0", 0xA3, "UN", 5),  # "US or SS"
    (0x0009, "ACME UNKNOWN 1.0", 0x01, "UN", LARGE),  # a creator no dictionary knows
    (0x0009, "ACME UNKNOWN 1.0", 0x02, "XX", 4),  # a VR no standard defines
    (0x7FE1, "GEMS_Ultrasound_MovieGroup_001", 0x48, "FD", 70_001),  # after the pixel data
    (0x7FF1, "TOSHIBA_MEC_CT_1.0", 0x09, "UN", LARGE),
]


def private_object(group: int, creator: str, element: int, vr: str, length: int,
                   syntax: str) -> tuple[Dataset, bytes]:
    """A Secondary Capture object with one private block, and its data set in ``syntax``
    ("explicit" or "implicit"), encoded by hand: pydicom would not write an odd-length SS or an
    unknown VR. In explicit VR, a value too long for a 16-bit length is written as UN."""
    if vr not in ("OB", "UN") and length > 0xFFFF and syntax == "explicit":
        vr = "UN"
    ds = make_dataset(SOPClassUID="1.2.840.10008.5.1.4.1.1.7", Modality="OT")
    implicit = syntax == "implicit"
    buffer = DicomBytesIO()
    buffer.is_little_endian, buffer.is_implicit_VR = True, implicit
    write_dataset(buffer, ds)
    base = buffer.getvalue()
    name = creator.encode() + b" " * (len(creator) % 2)
    value = bytes(range(256)) * (length // 256) + bytes(length % 256)
    block = _element(group, 0x0010, "LO", name, implicit)
    block += _element(group, 0x1000 | element, vr, value, implicit)
    pixel_data = base.index(b"\xe0\x7f\x10\x00")
    if group < 0x7FE0:
        return ds, base[:pixel_data] + block + base[pixel_data:]
    return ds, base + block


def _element(group: int, element: int, vr: str, value: bytes, implicit: bool) -> bytes:
    if implicit:
        return struct.pack("<HHI", group, element, len(value)) + value
    if vr in ("OB", "OW", "UN", "SQ", "UT", "UC", "UR", "OD", "OF", "OL", "OV", "SV", "UV"):
        return struct.pack("<HH2sHI", group, element, vr.encode(), 0, len(value)) + value
    return struct.pack("<HH2sH", group, element, vr.encode(), len(value)) + value


@dataclass(frozen=True)
class Length:
    """One declared length: of a data element, a sequence item or a pixel data fragment."""

    tag: int
    depth: int  # 0 for top-level elements
    start: int  # first byte of its header
    at: int  # first byte of the length field
    size: int  # 2 or 4 bytes
    value: int  # first byte of the value
    length: int  # as declared; 0xFFFFFFFF for undefined


def layout(data: bytes, implicit: bool, little: bool) -> list[Length]:
    """Every declared length in ``data``, found by pydicom's reader."""
    found: list[Length] = []
    _elements(read_dataset(BytesIO(data), implicit, little), data, little, 0, found)
    return found


def top_level_boundaries(lengths: list[Length], end: int) -> set[int]:
    """Where a data set may end and still be well formed: before a top-level element, or at
    the end. Cutting anywhere else leaves some declared length unfulfilled."""
    return {entry.start for entry in lengths if entry.depth == 0} | {end}


def _elements(ds: Dataset, data: bytes, little: bool, depth: int, found: list[Length],
              base: int = 0) -> None:
    """pydicom's positions are relative to the stream it read: the whole data set, or the value
    of a defined-length sequence it converted (``base`` is where that stream starts)."""
    endian = "<" if little else ">"
    for tag in list(ds.keys()):
        raw = ds.get_item(tag, keep_deferred=True)
        child_base = base
        if isinstance(raw, RawDataElement):
            value, implicit, vr = base + raw.value_tell, raw.is_implicit_VR, raw.VR
            child_base = value  # a sequence in it is converted from its value alone
        else:  # an undefined-length sequence, which pydicom parses as it reads
            assert isinstance(raw, DataElement) and raw.file_tell is not None
            value, implicit, vr = base + raw.file_tell, ds.original_encoding[0], raw.VR
        size = 4 if implicit or vr in EXPLICIT_VR_LENGTH_32 else 2
        header = 8 if implicit or size == 2 else 12
        length = struct.unpack_from(f"{endian}{'I' if size == 4 else 'H'}", data, value - size)[0]
        found.append(Length(int(tag), depth, value - header, value - size, size, value, length))
        element = ds[tag]
        if element.VR == "SQ":
            for item in element.value:
                start = base + item.seq_item_tell
                item_length = struct.unpack_from(f"{endian}I", data, start + 4)[0]
                found.append(Length(0xFFFEE000, depth + 1, start, start + 4, 4, start + 8,
                                    item_length))
                _elements(item, data, little, depth + 1, found, child_base)
        elif length == UNDEFINED:  # encapsulated pixel data: its fragments
            position = value
            while struct.unpack_from(f"{endian}HH", data, position) == (0xFFFE, 0xE000):
                fragment = struct.unpack_from(f"{endian}I", data, position + 4)[0]
                found.append(Length(0xFFFEE000, depth + 1, position, position + 4, 4,
                                    position + 8, fragment))
                position += 8 + fragment


def cut_offsets(data: bytes, syntax: str) -> list[int]:
    """Every offset where a cut leaves some declared length unfulfilled, less the inside of
    opaque values over 64 bytes, of which only the first and last 16 bytes and one middle byte
    are taken (every byte of them is the same case for the reader). Sequences are cut
    everywhere."""
    if syntax == "deflated":
        return list(range(1, len(data)))
    lengths = layout(data, syntax == "implicit", syntax != "big-endian")
    starts = sorted(entry.start for entry in lengths)
    allowed = set(range(1, len(data))) - top_level_boundaries(lengths, len(data))
    for entry in lengths:
        if entry.length == UNDEFINED or entry.length <= 64:
            continue
        end = entry.value + entry.length
        if any(entry.value <= start < end for start in starts):
            continue  # it holds items or elements: every offset of it counts
        allowed -= set(range(entry.value + 16, end - 16)) - {entry.value + entry.length // 2}
    return sorted(allowed)
