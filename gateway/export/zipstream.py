"""A ZIP writer that streams stored entries to a file, deterministically, and can resume.

Why not ``zipfile``: an export interrupted by a crash must continue from the entries already on
disk and end with the same bytes as a run that was never interrupted. That needs the state of a
half-written archive (each entry's offset, size and CRC) to be recorded outside the process and
handed back, which ``zipfile`` keeps in private attributes. The format written here is the plain
subset of APPNOTE 6.3.10 every reader takes:

- every entry is stored (method 0): DICOM pixel data is mostly compressed already, and storing
  runs at disk speed where deflate runs at a tenth of it (see ARCHITECTURE.md);
- one fixed timestamp (the export's) and fixed attributes (regular file, 0644, made on Unix), so
  the same entries in the same order give the same bytes;
- the local header is written with the size known in advance and the CRC-32 patched in once the
  data is written (no data descriptor, so streaming readers can read it too);
- ZIP64 (APPNOTE 4.5.3) where a size or an offset needs it (an entry of 4 GiB or more, an entry
  starting beyond 4 GiB, 65,535 entries or more), or for every entry when ``force_zip64``.

Memory is one copy buffer, whatever the size of the entries.
"""

from __future__ import annotations

import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, BinaryIO

LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
CENTRAL_HEADER = struct.Struct("<IHHHHHHIIIHHHHHII")
END_RECORD = struct.Struct("<IHHHHIIH")
ZIP64_END_RECORD = struct.Struct("<IQHHIIQQQQ")
ZIP64_LOCATOR = struct.Struct("<IIQI")
LIMIT_32 = 0xFFFFFFFF
LIMIT_16 = 0xFFFF
VERSION_DEFAULT = 20  # 2.0: stored entries, folders
VERSION_ZIP64 = 45  # 4.5: ZIP64 extensions
MADE_ON_UNIX = 3 << 8
REGULAR_FILE_0644 = 0o100644 << 16
CRC_OFFSET = 14  # in the local header
COPY_CHUNK = 1 << 20


@dataclass(frozen=True)
class Entry:
    """One entry as written: enough to write its central directory record, now or after a
    restart. ``end`` is where the next entry's local header starts."""

    name: str
    offset: int
    size: int
    crc: int
    zip64: bool
    end: int
    sha256: str = ""  # the entry's digest, for the manifest (set by the caller)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Entry:
        return cls(str(data["name"]), int(data["offset"]), int(data["size"]), int(data["crc"]),
                   bool(data["zip64"]), int(data["end"]), str(data.get("sha256", "")))


def dos_time(when: datetime) -> tuple[int, int]:
    """(time, date) in MS-DOS format (APPNOTE 4.4.6), 2-second resolution, from 1980 on."""
    year = max(when.year, 1980)
    return (when.hour << 11 | when.minute << 5 | when.second // 2,
            (year - 1980) << 9 | when.month << 5 | when.day)


class ZipWriter:
    """Appends entries to ``fp`` (opened unbuffered, ``r+b``) from the end of ``done``.

    Whatever follows the last entry of ``done`` (an entry cut by a crash) is cut off first.
    """

    def __init__(self, fp: BinaryIO, when: datetime, done: Sequence[Entry] = (),
                 force_zip64: bool = False) -> None:
        self._fp = fp
        self._time, self._date = dos_time(when)
        self._force_zip64 = force_zip64
        self.entries: list[Entry] = list(done)
        self.position = self.entries[-1].end if self.entries else 0
        fp.seek(self.position)
        fp.truncate()
        self._buffer = bytearray(COPY_CHUNK)

    def add_file(self, name: str, source: BinaryIO, size: int) -> Entry:
        """Copy exactly ``size`` bytes of ``source`` into a new entry (its CRC-32 computed on
        the way); ``OSError`` when the source ends early."""
        offset = self._local_header(name, size)
        crc = 0
        for chunk in chunks(source, size, self._buffer, name):
            crc = zlib.crc32(chunk, crc)
            self._write(chunk)
        return self._close_entry(name, offset, size, crc)

    def add_bytes(self, name: str, data: bytes) -> Entry:
        offset = self._local_header(name, len(data))
        self._write(data)
        return self._close_entry(name, offset, len(data), zlib.crc32(data))

    def finish(self) -> int:
        """Write the central directory and the end records; return the archive's size."""
        start = self.position
        for entry in self.entries:
            self._write(self._central_header(entry))
        size = self.position - start
        count = len(self.entries)
        if self._force_zip64 or count >= LIMIT_16 or size >= LIMIT_32 or start >= LIMIT_32:
            record = self.position
            self._write(ZIP64_END_RECORD.pack(0x06064B50, ZIP64_END_RECORD.size - 12,
                                              MADE_ON_UNIX | VERSION_ZIP64, VERSION_ZIP64, 0, 0,
                                              count, count, size, start))
            self._write(ZIP64_LOCATOR.pack(0x07064B50, 0, record, 1))
        self._write(END_RECORD.pack(0x06054B50, 0, 0, min(count, LIMIT_16),
                                    min(count, LIMIT_16), min(size, LIMIT_32),
                                    min(start, LIMIT_32), 0))
        return self.position

    def _local_header(self, name: str, size: int) -> int:
        encoded = name.encode("ascii")  # names are made by gateway.export.names: ASCII only
        zip64 = self._force_zip64 or size >= LIMIT_32
        extra = struct.pack("<HHQQ", 0x0001, 16, size, size) if zip64 else b""
        stored = LIMIT_32 if zip64 else size
        offset = self.position
        self._write(LOCAL_HEADER.pack(
            0x04034B50, VERSION_ZIP64 if zip64 else VERSION_DEFAULT, 0, 0, self._time,
            self._date, 0, stored, stored, len(encoded), len(extra)) + encoded + extra)
        return offset

    def _close_entry(self, name: str, offset: int, size: int, crc: int) -> Entry:
        end = self.position
        self._fp.seek(offset + CRC_OFFSET)
        self._write_all(struct.pack("<I", crc))
        self._fp.seek(end)
        zip64 = self._force_zip64 or size >= LIMIT_32
        entry = Entry(name, offset, size, crc, zip64, end)
        self.entries.append(entry)
        return entry

    def _central_header(self, entry: Entry) -> bytes:
        encoded = entry.name.encode("ascii")
        fields = b""
        if entry.size >= LIMIT_32:
            fields += struct.pack("<QQ", entry.size, entry.size)
        if entry.offset >= LIMIT_32:
            fields += struct.pack("<Q", entry.offset)
        extra = struct.pack("<HH", 0x0001, len(fields)) + fields if fields else b""
        version = VERSION_ZIP64 if fields or entry.zip64 else VERSION_DEFAULT
        size = min(LIMIT_32, entry.size)
        return CENTRAL_HEADER.pack(
            0x02014B50, MADE_ON_UNIX | version, version, 0, 0, self._time, self._date,
            entry.crc, size, size, len(encoded), len(extra), 0, 0, 0, REGULAR_FILE_0644,
            min(entry.offset, LIMIT_32)) + encoded + extra

    def _write(self, data: bytes | memoryview) -> None:
        self._write_all(data)
        self.position += len(data)

    def _write_all(self, data: bytes | memoryview) -> None:
        view = memoryview(data)
        while view:
            written = self._fp.write(view)
            if written is None:
                raise OSError("non-blocking write to an archive file")
            view = view[written:]


def chunks(source: BinaryIO, size: int, buffer: bytearray, name: str) -> Iterator[memoryview]:
    """Exactly ``size`` bytes of ``source``, read into ``buffer`` one chunk at a time (each
    chunk is valid until the next); ``OSError`` naming the entry when the source ends early."""
    left, view = size, memoryview(buffer)
    while left:
        count = source.readinto(view[:min(left, len(buffer))])  # type: ignore[attr-defined]
        if not count:
            raise OSError(f"{name}: the source ended {left} bytes early")
        yield view[:count]
        left -= count


def sync(fp: BinaryIO) -> None:
    """Data on disk before a progress record says it is."""
    os.fsync(fp.fileno())
