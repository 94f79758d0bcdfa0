"""gateway.receive.validate on classes of data sets: every cut, every inflated length, private
elements of every shape. The same classes go over a real association in test_receive_store.py;
here they are exhaustive, which only a direct call makes fast enough."""

from __future__ import annotations

import logging
import struct
import warnings
from io import BytesIO
from pathlib import Path
from typing import Any

import pydicom.data
import pytest
from pydicom import dcmread
from pydicom.dataset import Dataset

from gateway.dicom.status import Status
from gateway.receive.structure import Malformed, TopElement, check_structure
from gateway.receive.validate import (
    DEFER_SIZE,
    Refused,
    _transfer_syntax,
    dataset_offset,
    header_from_walk,
    is_valid_uid,
    read_header,
)
from tests.factory import make_dataset
from tests.objects import (
    LARGE,
    PRIVATE,
    SYNTAXES,
    cut_offsets,
    encoded,
    layout,
    part10,
    private_object,
)
from tests.peers import encode

LAID_OUT = [syntax for syntax in SYNTAXES if syntax != "deflated"]


def _refusal(file: bytes, sop_class: str, sop_instance: str) -> Refused | None:
    try:
        read_header(BytesIO(file), sop_class, sop_instance)
    except Refused as refused:
        return refused
    return None


@pytest.mark.parametrize("large", [True, False], ids=["large", "small"])
@pytest.mark.parametrize("syntax", list(SYNTAXES))
def test_the_whole_object_is_accepted(syntax: str, large: bool) -> None:
    ds, data = encoded(syntax, large)
    header = read_header(BytesIO(part10(ds, data, syntax)), ds.SOPClassUID, ds.SOPInstanceUID)
    assert header.sop_instance_uid == ds.SOPInstanceUID
    assert header.patient_name == "MÜLLER^JÖRG"


@pytest.mark.parametrize("large", [True, False], ids=["large", "small"])
@pytest.mark.parametrize("syntax", list(SYNTAXES))
def test_every_cut_inside_an_element_is_refused_with_c000(syntax: str, large: bool) -> None:
    """A cut anywhere but between two top-level elements: inside a header, a value, a sequence,
    an item, a fragment, the elements after the pixel data, or the deflate stream."""
    ds, data = encoded(syntax, large)
    accepted = []
    for cut in cut_offsets(data, syntax):
        refused = _refusal(part10(ds, data[:cut], syntax), ds.SOPClassUID, ds.SOPInstanceUID)
        if refused is None or refused.status != Status.CANNOT_UNDERSTAND:
            accepted.append((cut, refused and refused.reason))
    assert accepted == []


@pytest.mark.parametrize("large", [True, False], ids=["large", "small"])
@pytest.mark.parametrize("syntax", LAID_OUT)
def test_every_length_declared_past_the_end_is_refused_with_c000(syntax: str, large: bool) -> None:
    """Each element's, item's and fragment's length, at every depth, made to reach 1, 2 or
    257 bytes past the end of the data set (where its length field can say so)."""
    ds, data = encoded(syntax, large)
    little = syntax != "big-endian"
    lengths = layout(data, syntax == "implicit", little)
    accepted, tried = [], 0
    for entry in lengths:
        for extra in (1, 2, 257):
            declared = len(data) - entry.value + extra
            if entry.length == 0xFFFFFFFF or declared >= (1 << (8 * entry.size)) - 1:
                continue
            tried += 1
            field = struct.pack(("<" if little else ">") + ("H" if entry.size == 2 else "I"),
                                declared)
            inflated = data[:entry.at] + field + data[entry.at + entry.size:]
            refused = _refusal(part10(ds, inflated, syntax), ds.SOPClassUID, ds.SOPInstanceUID)
            if refused is None or refused.status != Status.CANNOT_UNDERSTAND:
                accepted.append((hex(entry.tag), entry.depth, extra))
    assert tried > (len(lengths) if not large else 20)
    assert accepted == []


def test_refusal_names_the_element_in_the_log_without_its_value(
    caplog: pytest.LogCaptureFixture,
) -> None:
    ds, data = encoded("explicit")
    lengths = layout(data, False, True)
    [private] = [e for e in lengths if e.tag == 0x00291001]
    assert private.length == LARGE + 1
    cut = data[:private.value + 100]
    caplog.set_level(logging.DEBUG, logger="gateway.receive.validate")
    refused = _refusal(part10(ds, cut, "explicit"), ds.SOPClassUID, ds.SOPInstanceUID)
    assert refused is not None and refused.status == Status.CANNOT_UNDERSTAND
    assert refused.reason == "(0029,1001) length 70002 runs past its data set"
    [record] = [r for r in caplog.records if r.name == "gateway.receive.validate"]
    assert record.levelno == logging.DEBUG
    assert "Malformed at (0029,1001)" in record.getMessage()
    assert "MÜLLER" not in record.getMessage()


@pytest.mark.parametrize("syntax", ["implicit", "explicit"])
@pytest.mark.parametrize(("group", "creator", "element", "vr", "length"), PRIVATE,
                         ids=[f"{c}-{vr}-{n}" for _, c, _, vr, n in PRIVATE])
def test_private_elements_of_any_vr_and_length_are_accepted(
    group: int, creator: str, element: int, vr: str, length: int, syntax: str
) -> None:
    ds, data = private_object(group, creator, element, vr, length, syntax)
    header = read_header(BytesIO(part10(ds, data, syntax)), ds.SOPClassUID, ds.SOPInstanceUID)
    assert header.sop_instance_uid == ds.SOPInstanceUID


@pytest.mark.parametrize("value", ["1.2.3\n", "1.2.3\r\n", "\n1.2.3", "1.2.3 ", "1.2.\n3",
                                   "1.2.3.", ".1.2", "1..2", "1.2a", "", "1" * 65])
def test_a_uid_is_digits_and_dots_over_its_whole_value(value: str) -> None:
    assert not is_valid_uid(value)
    assert is_valid_uid("1.2.840.10008.5.1.4.1.1.7")
    assert is_valid_uid("1.02.3")  # leading zeros: see the module docstring


UID_BYTES = "1.2.3.4.5.67"  # 12 bytes, replaced below by other 12-byte values


@pytest.mark.parametrize(("value", "kept"), [
    (b"1.2.3.4.5.67", True),
    (b"1.2.3.4.5.6\0", True),  # PS3.5 9.1 padding
    (b"1.2.3.4.5.6 ", True),  # the padding of other string VRs, which pydicom also strips
    (b"1.2.3.4.5.6\n", False),
    (b"1.2.3.4.5\r\n\0", False),
    (b"1.2.3.4.5.6\t", False),
    (b" 1.2.3.4.5.6", False),
    (b"\n1.2.3.4.5.6", False),
    (b"1.2.3\\4.5.67", False),  # two values
    (b"\0" * 12, False),
])
@pytest.mark.parametrize("keyword", ["StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"])
def test_uid_bytes_are_checked_less_only_their_padding(keyword: str, value: bytes,
                                                        kept: bool) -> None:
    """pydicom strips any whitespace around a UID; the bytes kept would then differ from the
    ledger's UID."""
    overrides: dict[str, Any] = {keyword: UID_BYTES}
    ds = make_dataset(**overrides)
    data = encode(ds).replace(UID_BYTES.encode(), value)
    affected = value.rstrip(b"\0 ").decode() if keyword == "SOPInstanceUID" else ds.SOPInstanceUID
    refused = _refusal(part10(ds, data, "explicit"), ds.SOPClassUID, affected)
    if kept:
        assert refused is None
    else:
        assert refused is not None and refused.status == Status.INVALID_UID
        assert refused.reason.startswith(keyword)


def test_a_uid_longer_than_any_uid_is_refused_unread() -> None:
    """Over the defer size: pydicom leaves the value on disk, and so does the check."""
    ds = make_dataset(StudyInstanceUID=UID_BYTES)
    long_uid = b"1." * 40_000
    data = encode(ds).replace(b"\x0d\x00UI\x0c\x00" + UID_BYTES.encode(), b"\x0d\x00UN\x00\x00"
                              + struct.pack("<I", len(long_uid)) + long_uid)
    refused = _refusal(part10(ds, data, "explicit"), ds.SOPClassUID, ds.SOPInstanceUID)
    assert refused is not None and refused.status == Status.INVALID_UID
    assert refused.reason == "StudyInstanceUID (0020,000D) is not a valid UID (PS3.5 9.1)"


# --- the header read from the structure walk is the header pydicom reads ----------------------

def _headers(file: bytes) -> tuple[Dataset | None, Dataset]:
    """(the walk's header, or None where it leaves the file to pydicom; pydicom's header)."""
    fp = BytesIO(file)
    offset = dataset_offset(fp)
    syntax = _transfer_syntax(fp, offset)
    top: list[TopElement] = []
    implicit = check_structure(fp, offset, len(file), syntax.is_implicit_VR,
                               syntax.is_little_endian, top)
    ours = header_from_walk(fp, top, implicit, syntax.is_little_endian)
    return ours, dcmread(BytesIO(file), defer_size=DEFER_SIZE, stop_before_pixels=True)


def _values(ds: Dataset, top: bool = True) -> dict[int, tuple[str, object]]:
    """Every element as the application sees it: VR and converted value (sequences recursed);
    at the top level the standard ones only, which is what the walk's header keeps."""
    found: dict[int, tuple[str, object]] = {}
    for element in ds:
        if top and element.tag.is_private:
            continue
        value = ([_values(item, top=False) for item in element.value] if element.VR == "SQ"
                 else element.value)
        found[int(element.tag)] = (str(element.VR), value)
    return found


@pytest.mark.parametrize("large", [True, False], ids=["large", "small"])
@pytest.mark.parametrize("syntax", LAID_OUT)
def test_the_header_read_from_the_walk_is_pydicoms(syntax: str, large: bool) -> None:
    """Sequences (defined and undefined lengths), private elements, non-ASCII names, both byte
    orders: the same elements with the same values; a value over DEFER_SIZE goes to pydicom."""
    ds, data = encoded(syntax, large)
    ours, theirs = _headers(part10(ds, data, syntax))
    if ours is None:
        assert any(len(e.value or b"") > DEFER_SIZE for e in theirs if isinstance(e.value, bytes))
        return
    assert _values(ours) == _values(theirs)
    assert str(ours.PatientName) == str(theirs.PatientName)
    assert not any(e.tag.is_private for e in ours)


def test_the_header_read_from_the_walk_is_pydicoms_for_pydicoms_own_test_files() -> None:
    """pydicom's test files: every character set it ships, implicit and explicit VR, big endian,
    retired and private elements, odd writers. Files whose meta the gateway would not write
    (no group length) or deflated ones are not this reader's business."""
    folder = Path(pydicom.data.__file__).parent / "test_files"
    compared = 0
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's notes on its deliberately odd files
        for path in sorted(folder.rglob("*.dcm")):
            file = path.read_bytes()
            try:
                offset = dataset_offset(BytesIO(file))
                if _transfer_syntax(BytesIO(file), offset).is_deflated:
                    continue
                ours, theirs = _headers(file)
            except (Refused, Malformed):
                continue
            if ours is None:
                continue
            assert _values(ours) == _values(theirs), path.name
            compared += 1
    assert compared >= 50, compared
