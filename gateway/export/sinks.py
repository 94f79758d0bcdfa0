"""Where an archive's entries go: a ZIP file (``format = "zip"``) or a folder with the same
layout (``format = "folder"``). Both append entries, make what they wrote durable on
``checkpoint`` (so that a progress record never claims more than the disk holds), and can start
again after the last checkpointed entry.
"""

from __future__ import annotations

import hashlib
import os
import zlib
from collections.abc import Callable, Sequence
from dataclasses import replace
from datetime import datetime
from pathlib import Path
from typing import BinaryIO, Protocol

from gateway.export.behind import Hasher
from gateway.export.names import is_inside
from gateway.export.zipstream import COPY_CHUNK, Entry, ZipWriter, chunks

MANIFEST = "manifest.sha256"


class Sink(Protocol):
    def add_file(self, name: str, source: BinaryIO, size: int) -> Entry:
        """A copy of ``size`` bytes of ``source``; its ``sha256`` may come later: ``resolve``."""
        ...

    def add_bytes(self, name: str, data: bytes) -> Entry:
        """An entry with ``data``, its ``sha256`` set."""
        ...

    def resolve(self, entry: Entry) -> Entry:
        """``entry`` with its ``sha256``, once computed (waits for it); thread-safe."""
        ...

    def checkpoint(self) -> Callable[[], None]:
        """What makes every entry added so far durable; safe to call on another thread while
        entries are added."""
        ...

    def finish(self) -> str:
        """Complete and sync the archive; return its SHA-256 (for a folder, its manifest's)."""
        ...

    def close(self) -> None: ...


def _check(name: str) -> None:
    if not is_inside(name):  # names come from gateway.export.names; this is the last guard
        raise ValueError("an archive entry name would leave the archive's folder")


# ``on_final(final, finished)``: the archive file's bytes before ``final`` will not change any
# more (``finished``: the archive is complete, ``final`` is its size). Called on the writer's
# thread after each entry; the export API streams those bytes to its client while the archive
# is built (gateway.web.stream). An exception raised by it stops the build.
FinalHook = Callable[[int, bool], None]


class ZipSink:
    """The ZIP, and its SHA-256 computed behind the writer (``gateway.export.behind``).

    Every byte before the entry being written is final (``gateway.export.zipstream`` patches a
    CRC inside the current entry only); ``on_final`` is told as that point moves."""

    def __init__(self, path: Path, when: datetime, done: Sequence[Entry],
                 force_zip64: bool = False, on_final: FinalHook | None = None) -> None:
        descriptor = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        self._file: BinaryIO = os.fdopen(descriptor, "r+b", buffering=0)
        self._writer = ZipWriter(self._file, when, done, force_zip64)
        self._hasher = Hasher(path)
        self._on_final = on_final
        self._final(self._writer.position)

    def add_file(self, name: str, source: BinaryIO, size: int) -> Entry:
        """The entry's SHA-256 is computed by the hasher, from the archive, behind the writer."""
        _check(name)
        entry = self._writer.add_file(name, source, size)
        self._hasher.watch(name, entry.end - entry.size, entry.end)
        self._final(entry.end)
        return entry

    def add_bytes(self, name: str, data: bytes) -> Entry:
        _check(name)
        entry = self._writer.add_bytes(name, data)
        self._final(entry.end)
        return replace(entry, sha256=hashlib.sha256(data).hexdigest())

    def _final(self, offset: int, finished: bool = False) -> None:
        self._hasher.final_upto(offset)
        if self._on_final is not None:
            self._on_final(offset, finished)

    def resolve(self, entry: Entry) -> Entry:
        if entry.sha256:
            return entry
        return replace(entry, sha256=self._hasher.digest_of(entry.name))

    def checkpoint(self) -> Callable[[], None]:
        descriptor = self._file.fileno()
        return lambda: os.fsync(descriptor)

    def finish(self) -> str:
        size = self._writer.finish()
        os.fsync(self._file.fileno())
        digest = self._hasher.result(size)
        if self._on_final is not None:
            self._on_final(size, True)
        return digest

    def close(self) -> None:
        self._hasher.close()
        self._file.close()


class FolderSink:
    """Files under ``root``; an entry's ``offset`` and ``end`` are 0 (nothing to resume inside
    a folder: an entry written again simply replaces its file)."""

    def __init__(self, root: Path) -> None:
        self._root = root
        self._unsynced: list[Path] = []
        root.mkdir(parents=True, exist_ok=True)
        self._buffer = bytearray(COPY_CHUNK)

    def add_file(self, name: str, source: BinaryIO, size: int) -> Entry:
        _check(name)
        path = self._path(name)
        digest = hashlib.sha256()
        crc = 0
        with open(path, "wb", buffering=0) as out:
            for chunk in chunks(source, size, self._buffer, name):
                crc = zlib.crc32(chunk, crc)
                digest.update(chunk)
                _write_all(out, chunk)
        return Entry(name, 0, size, crc, False, 0, digest.hexdigest())

    def add_bytes(self, name: str, data: bytes) -> Entry:
        _check(name)
        path = self._path(name)
        with open(path, "wb", buffering=0) as out:
            _write_all(out, data)
        return Entry(name, 0, len(data), zlib.crc32(data), False, 0,
                     hashlib.sha256(data).hexdigest())

    def resolve(self, entry: Entry) -> Entry:
        return entry

    def checkpoint(self) -> Callable[[], None]:
        written, self._unsynced = self._unsynced, []
        root = self._root

        def sync() -> None:
            folders = {root}
            for path in written:
                with open(path, "rb") as file:
                    os.fsync(file.fileno())
                folders.update(p for p in path.parents if root in p.parents)
            for folder in sorted(folders):
                sync_folder(folder)

        return sync

    def finish(self) -> str:
        self.checkpoint()()
        return file_sha256(self._root / MANIFEST)

    def close(self) -> None:
        pass

    def _path(self, name: str) -> Path:
        path = self._root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        self._unsynced.append(path)
        return path


def _write_all(out: BinaryIO, data: bytes | memoryview) -> None:
    view = memoryview(data)
    while view:
        written = out.write(view)
        if written is None:
            raise OSError("non-blocking write to an export file")
        view = view[written:]


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    view = memoryview(bytearray(COPY_CHUNK))
    with open(path, "rb", buffering=0) as file:
        while count := file.readinto(view):
            digest.update(view[:count])
    return digest.hexdigest()


def sync_folder(folder: Path) -> None:
    """A rename or a new file in ``folder`` survives a crash only once the folder is synced."""
    descriptor = os.open(folder, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
