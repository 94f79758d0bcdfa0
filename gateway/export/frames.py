"""Number of Frames from the first bytes of a Part-10 file, without pydicom.

The metadata JSON gives each instance's ``numberOfFrames``, which the ledger does not hold; pydicom
takes 1-2 ms to read a CT header for it (every element is parsed), as long as copying the whole
0.5 MB file into the archive. Number of Frames (0028,0008) and Rows (0028,0010) sit near the
start of the data set, so this walks the top-level elements of the file's first bytes (PS3.5
7.1: explicit or implicit VR, little or big endian) up to group 0028, stepping over values and
over sequences (PS3.5 7.5, defined or undefined length, nested), and stops there.

It answers only when it is sure: a deflated data set, bytes that end before group 0028, an
element header that does not hold together: None, and the caller asks pydicom. What it reads
follows pydicom's reading of the same bytes, which the tests check against pydicom itself.
"""

from __future__ import annotations

import struct

DEFLATED = "1.2.840.10008.1.2.1.99"
IMPLICIT_LITTLE = "1.2.840.10008.1.2"
EXPLICIT_BIG = "1.2.840.10008.1.2.2"
UNDEFINED = 0xFFFFFFFF
ITEM = 0xFFFEE000
ITEM_END = 0xFFFEE00D
SEQUENCE_END = 0xFFFEE0DD
NUMBER_OF_FRAMES = 0x00280008
ROWS = 0x00280010
_LONG = frozenset(v.encode() for v in (
    "OB", "OD", "OF", "OL", "OV", "OW", "SQ", "SV", "UC", "UN", "UR", "UT", "UV"))
MAX_DEPTH = 16


class _Unsure(Exception):
    pass


def number_of_frames(head: bytes, complete: bool = False) -> int | None:
    """Number of Frames (when the data set has it) or 1 for an image (it has Rows) or 0 for an
    object without pixels; None when ``head`` does not settle it. ``complete``: ``head`` is the
    whole file, so a data set that ends before group 0028 has neither."""
    try:
        return _walk_file(memoryview(head), complete)
    except (_Unsure, struct.error, UnicodeDecodeError, ValueError):
        return None


def _walk_file(data: memoryview, complete: bool) -> int:
    if bytes(data[128:132]) != b"DICM":
        raise _Unsure()
    position, syntax = 132, ""
    while True:  # the file meta (PS3.10 7.1): explicit VR little endian, group 0002
        group, element, vr = struct.unpack_from("<HH2s", data, position)
        if group != 0x0002:
            break
        if vr in _LONG:
            length, header = struct.unpack_from("<I", data, position + 8)[0], 12
        else:
            length, header = struct.unpack_from("<H", data, position + 6)[0], 8
        if element == 0x0010:
            syntax = bytes(data[position + header:position + header + length]).decode(
                "ascii").rstrip("\0 ")
        position += header + length
    if not syntax or syntax == DEFLATED:
        raise _Unsure()
    walker = _Walker(data, implicit=syntax == IMPLICIT_LITTLE, little=syntax != EXPLICIT_BIG)
    return walker.top_level(position, complete)


class _Walker:
    def __init__(self, data: memoryview, implicit: bool, little: bool) -> None:
        self._data = data
        self._implicit = implicit
        endian = "<" if little else ">"
        self._tag = struct.Struct(f"{endian}HH")
        self._header = struct.Struct(f"{endian}HH2sH")
        self._short = struct.Struct(f"{endian}H")
        self._long = struct.Struct(f"{endian}I")

    def top_level(self, position: int, complete: bool) -> int:
        """The hot loop (about 200 top-level elements precede group 0028 in a CT with the
        usual private groups): one unpack per element, sequences handed to ``_after``."""
        data, size = self._data, len(self._data)
        header, long = self._header.unpack_from, self._long.unpack_from
        implicit = self._implicit
        frames: int | None = None
        tag = 0
        while True:
            if complete and position == size:
                break  # the data set ended before group 0028
            group, element, vr, short = header(data, position)
            tag = group << 16 | element
            if tag >= ROWS:
                break  # Rows present (an image), or past where either could be
            if implicit or group == 0xFFFE:
                vr, length, value = None, long(data, position + 4)[0], position + 8
            elif vr in _LONG:
                length, value = long(data, position + 8)[0], position + 12
            elif b"AA" <= vr <= b"ZZ":
                length, value = short, position + 8
            else:
                raise _Unsure()  # pydicom would switch to implicit VR here; leave it to pydicom
            if tag == NUMBER_OF_FRAMES:
                if length == UNDEFINED or value + length > size:
                    raise _Unsure()
                text = bytes(data[value:value + length]).decode("ascii").strip(" \0")
                frames = int(text) if text else None
            if length == UNDEFINED:
                position = self._after(tag, value, length, vr, 0)
            else:
                position = value + length
                if position > size:
                    raise _Unsure()
        if frames is not None and frames >= 0:
            return frames
        return 1 if tag == ROWS else 0

    def _element(self, position: int) -> tuple[int, int, int, bytes | None]:
        """(tag, where the value starts, its length, the VR if explicit) at ``position``."""
        group, element = self._tag.unpack_from(self._data, position)
        tag = group << 16 | element
        if group == 0xFFFE:  # an item or delimiter: no VR in any transfer syntax
            return tag, position + 8, self._long.unpack_from(self._data, position + 4)[0], None
        if self._implicit:
            return tag, position + 8, self._long.unpack_from(self._data, position + 4)[0], None
        vr = bytes(self._data[position + 4:position + 6])
        if not (b"AA" <= vr <= b"ZZ"):
            raise _Unsure()  # pydicom would switch to implicit VR here; leave it to pydicom
        if vr in _LONG:
            return tag, position + 12, self._long.unpack_from(self._data, position + 8)[0], vr
        return tag, position + 8, self._short.unpack_from(self._data, position + 6)[0], vr

    def _after(self, tag: int, value: int, length: int, vr: bytes | None, depth: int) -> int:
        """Where the element whose value starts at ``value`` ends."""
        if length != UNDEFINED:
            end = value + length
            if end > len(self._data):
                raise _Unsure()
            return end
        if vr not in (b"SQ", b"UN", None) or depth >= MAX_DEPTH:
            raise _Unsure()
        return self._sequence(value, depth + 1)

    def _sequence(self, position: int, depth: int) -> int:
        """Items up to the Sequence Delimitation Item (PS3.5 7.5.2)."""
        while True:
            tag, value, length, _ = self._element(position)
            if tag == SEQUENCE_END:
                return value
            if tag != ITEM:
                raise _Unsure()
            if length != UNDEFINED:
                position = value + length
                if position > len(self._data):
                    raise _Unsure()
                continue
            position = value
            while True:  # an item of undefined length: elements up to its delimiter
                tag, inner, size, vr = self._element(position)
                if tag == ITEM_END:
                    position = inner
                    break
                position = self._after(tag, inner, size, vr, depth)
