"""Check that a data set's encoding holds together, from its bytes, without converting a value.

Every data element's header is read, at every depth: top level, the items of every sequence, the
fragments of encapsulated pixel data (PS3.5 A.4) and the elements after the pixel data. Each
declared length must fit inside what contains it (the data set, its item, its sequence), every
undefined length must end at its delimiter (PS3.5 7.5), and the data set must end exactly where
its last element ends. So a data set cut anywhere, or one that declares more bytes than arrive,
is found whichever element it cuts and however large: values are stepped over, never read, and
memory follows the size of one read window, not of the object.

pydicom reads such a data set without complaint (a short read, or a seek past the end for a value
over its ``defer_size``), which is why this check is ours. It follows pydicom's reading rules where
the standard leaves room, so that what it accepts is what pydicom then reads: an explicit VR whose
two bytes are not letters is read as implicit for that element, an item whose first element has
no letter VR is read as implicit VR (PS3.5 6.2.2, and writers that do it), undefined-length UN is
a sequence in implicit VR, and an undefined-length element of an implicit VR data set is a
sequence when the dictionary says so or, for a tag it does not know, when an item follows.

Nothing here looks at what a value means: a private element of unknown VR, an odd length, a
number whose length is not a multiple of its size are all just bytes to step over.
"""

from __future__ import annotations

import struct
from typing import BinaryIO

from pydicom.datadict import DicomDictionary, dictionary_VR, keyword_for_tag

UNDEFINED_LENGTH = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_DELIMITATION = 0xFFFEE00D
SEQUENCE_DELIMITATION = 0xFFFEE0DD
# PS3.5 Table 7.1-1: VRs whose explicit header has two reserved bytes and a 32-bit length.
_LONG_VRS = frozenset(
    vr.encode()
    for vr in ("OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV")
)
SEQUENCE_TAGS = frozenset(tag for tag, entry in DicomDictionary.items() if entry[0] == "SQ")
_WINDOW = 8 * 1024  # a CT header in one read; a fragment header costs no more than this
MAX_DEPTH = 64  # nested sequences; real objects use a handful, and recursion must stay bounded


# A top-level element as walked: tag, VR bytes (None: implicit), length (UNDEFINED_LENGTH or
# the value's), where its value starts, where the element ends (after a delimiter, if any).
TopElement = tuple[int, bytes | None, int, int, int]


class Malformed(ValueError):
    """The data set's encoding does not hold together at ``tag`` (None before the first tag).

    ``reason`` is short enough for an Error Comment (LO, 64 characters, PS3.7 C.4); ``path``
    names where the element sits (sequence tags and item numbers), for the log.
    """

    def __init__(self, tag: int | None, problem: str, path: str = "") -> None:
        self.tag = tag
        self.path = path
        self.reason = f"{tag_text(tag)} {problem}"[:64] if tag is not None else problem[:64]
        super().__init__(self.reason)

    @property
    def keyword(self) -> str:
        return keyword_for_tag(self.tag) if self.tag is not None else ""


def tag_text(tag: int) -> str:
    return f"({tag >> 16:04X},{tag & 0xFFFF:04X})"


class _Walker:
    """One walk over one data set. Element headers are read through one buffer (a CT header is
    one read); a value that is stepped over is never read at all. The element loop is the hot
    path of every C-STORE (about 1 us an element), hence its locals."""

    def __init__(self, fp: BinaryIO, end: int, little: bool) -> None:
        endian = "<" if little else ">"
        self._fp = fp
        self._end = end
        self._start = 0
        self._data = b""
        self._tag_length = struct.Struct(f"{endian}HHI")
        self._short = struct.Struct(f"{endian}HH2sH")
        self._long = struct.Struct(f"{endian}I")
        self._path: list[str] = []
        # The top-level elements, when asked for (``check_structure``'s ``top``)
        self.top: list[TopElement] | None = None

    def _at(self, position: int) -> int:
        """The buffer's offset of ``position``, with 12 bytes (or all up to the end) behind it."""
        offset = position - self._start
        if offset < 0 or offset + 12 > len(self._data):
            self._fp.seek(position)
            self._data = self._fp.read(min(_WINDOW, self._end - position))
            self._start, offset = position, 0
        return offset

    def _header(self, position: int) -> tuple[int, int, int]:
        """Group, element and 32-bit length at ``position`` (items and delimiters, PS3.5 7.5)."""
        offset = self._at(position)  # first: it may replace the buffer
        group, element, length = self._tag_length.unpack_from(self._data, offset)
        return group, element, length

    def fail(self, tag: int | None, problem: str) -> Malformed:
        return Malformed(tag, problem, ".".join(self._path))

    def looks_implicit(self, position: int, limit: int) -> bool:
        """pydicom's test (``filereader._is_implicit_vr``): explicit VR is two capital letters."""
        if position + 6 > limit:
            return False
        offset = self._at(position)
        first, second = self._data[offset + 4], self._data[offset + 5]
        return not (0x40 < first < 0x5B and 0x40 < second < 0x5B)

    def data_set(self, position: int, limit: int, implicit: bool, delimited: bool,
                 depth: int, container: str) -> int:
        """Walk the elements from ``position``; return where the data set ends.

        ``delimited``: an undefined-length item, which ends at its Item Delimitation Item and
        may run to ``limit`` at most; otherwise the data set fills ``limit`` exactly.
        """
        short, tag_length, long = self._short, self._tag_length, self._long
        top = self.top if depth == 0 else None
        while True:
            if not delimited and position == limit:
                return position
            if position + 8 > limit:
                if delimited:
                    raise self.fail(None, f"an item of {self._path[-1]} has no delimiter")
                raise self.fail(None, f"{container} ends inside an element header")
            offset = position - self._start
            if offset < 0 or offset + 12 > len(self._data):
                offset = self._at(position)
            data = self._data
            group, element, vr, length = short.unpack_from(data, offset)
            tag = group << 16 | element
            if group == 0xFFFE:
                if tag == ITEM_DELIMITATION and delimited:
                    return position + 8
                raise self.fail(tag, f"item or delimiter among the elements of a {container}")
            header = 8
            if implicit:
                vr = None
                length = tag_length.unpack_from(data, offset)[2]
            elif vr in _LONG_VRS:
                if position + 12 > limit:
                    raise self.fail(tag, f"header runs past the end of its {container}")
                length = long.unpack_from(data, offset + 8)[0]
                header = 12
            elif not b"AA" <= vr <= b"ZZ":  # pydicom's assume_implicit_vr_switch
                vr = None
                length = tag_length.unpack_from(data, offset)[2]
            # else an explicit VR with a 16-bit length; pydicom reads an unknown one so too
            value = position + header
            if length == UNDEFINED_LENGTH:
                position = self._undefined(tag, vr, value, limit, implicit, depth)
                if top is not None:
                    top.append((tag, vr, length, value, position))
                continue
            position = value + length
            if position > limit:
                raise self.fail(tag, f"length {length} runs past its {container}")
            if vr == b"SQ" or (vr is None and tag in SEQUENCE_TAGS):
                self._sequence(tag, value, position, implicit, False, depth)
            if top is not None:
                top.append((tag, vr, length, value, position))

    def _undefined(self, tag: int, vr: bytes | None, value: int, limit: int, implicit: bool,
                   depth: int) -> int:
        """An undefined length (PS3.5 7.1.3): a sequence, or encapsulated pixel data."""
        if vr in (b"SQ", b"UN") or (vr is None and self._sequence_in_implicit(tag, value, limit)):
            return self._sequence(tag, value, limit, implicit, True, depth)
        return self._fragments(tag, value, limit)

    def _sequence_in_implicit(self, tag: int, value: int, limit: int) -> bool:
        """pydicom's rule: the dictionary's VR, or for a tag it does not know (a private one),
        whether an item comes next."""
        try:
            return dictionary_VR(tag) == "SQ"
        except KeyError:
            if value + 8 > limit:
                return False
            group, element, _ = self._header(value)
            return int(group) << 16 | int(element) == ITEM

    def _sequence(self, tag: int, position: int, limit: int, implicit: bool, delimited: bool,
                  depth: int) -> int:
        """Items until the Sequence Delimitation Item, or filling a defined length exactly."""
        if depth >= MAX_DEPTH:
            raise self.fail(tag, f"sequences nested deeper than {MAX_DEPTH}")
        number = 0
        while True:
            if not delimited and position == limit:
                return position
            if position + 8 > limit:
                raise self.fail(tag, "sequence has no delimiter" if delimited
                                else "item runs past its sequence")
            group, element, length = self._header(position)
            item_tag = group << 16 | element
            if item_tag == SEQUENCE_DELIMITATION:
                if delimited or position + 8 == limit:  # pydicom stops here either way
                    return position + 8
                raise self.fail(tag, "sequence delimiter inside a defined length")
            if item_tag != ITEM:
                raise self.fail(tag, f"sequence holds {tag_text(item_tag)}, not an item")
            number += 1
            start = position + 8
            if length != UNDEFINED_LENGTH and start + length > limit:
                raise self.fail(tag, f"item {number} length {length} runs past its sequence")
            end = limit if length == UNDEFINED_LENGTH else start + length
            item_implicit = implicit or self.looks_implicit(start, end)
            self._path.append(f"{tag_text(tag)}[{number}]")
            position = self.data_set(start, end, item_implicit, length == UNDEFINED_LENGTH,
                                     depth + 1, "item")
            self._path.pop()

    def _fragments(self, tag: int, position: int, limit: int) -> int:
        """Encapsulated pixel data (PS3.5 A.4): items of defined length, then the delimiter."""
        while True:
            if position + 8 > limit:
                raise self.fail(tag, "encapsulated value has no sequence delimiter")
            group, element, length = self._header(position)
            item_tag = group << 16 | element
            if item_tag == SEQUENCE_DELIMITATION:
                return position + 8
            if item_tag != ITEM or length == UNDEFINED_LENGTH:
                raise self.fail(tag, "encapsulated value holds something not a fragment")
            if position + 8 + length > limit:
                raise self.fail(tag, f"fragment length {length} runs past the data set")
            position += 8 + length


def check_structure(fp: BinaryIO, start: int, end: int, implicit: bool, little: bool,
                    top: list[TopElement] | None = None) -> bool:
    """Walk the data set in ``fp`` from ``start`` to ``end``; raise ``Malformed`` where it breaks.

    ``implicit`` is the transfer syntax's; like pydicom, the first element decides when the
    two disagree (a sender that negotiated explicit VR and wrote implicit): the one used is
    returned. ``top`` receives every top-level element, in order (``TopElement``), so that the
    header can be read from the walk instead of parsing it a second time.
    """
    walker = _Walker(fp, end, little)
    walker.top = top
    if start + 6 <= end:
        implicit = walker.looks_implicit(start, end)
    walker.data_set(start, end, implicit, False, 0, "data set")
    return implicit
