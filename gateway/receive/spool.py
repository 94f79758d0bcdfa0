"""Durable files in the spool: nothing is visible under its final name until it is on disk.

Layout: ``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` for the first copy
of an instance; a later copy with other content is ``<SOPInstanceUID>.<sha256[:16]>.dcm`` beside it,
so no copy ever overwrites another. Paths are built only from UIDs that ``validate`` has checked
against the UID grammar (digits and dots), so no patient data and no ``..`` can reach a path.
``incoming/`` holds what pynetdicom is receiving, already as a Part-10 file; a kept instance is
synced there and renamed into place. ``*.tmp`` files (from rewrites) are never acknowledged.
"""

from __future__ import annotations

import hashlib
import os
import shutil
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import UID

READ_CHUNK = 1 << 20
INCOMING = "incoming"


@dataclass(frozen=True)
class SpooledFile:
    path: Path
    sha256: str
    size_bytes: int


class Spool:
    def __init__(
        self, root: Path, min_free_bytes: int, free_bytes: Callable[[Path], int] | None = None
    ) -> None:
        self.root = root
        self.incoming = root / INCOMING
        self.min_free_bytes = min_free_bytes
        self._free_bytes = free_bytes or filesystem_free_bytes
        self._sealer = ThreadPoolExecutor(max_workers=8, thread_name_prefix="spool-seal")
        self.incoming.mkdir(parents=True, exist_ok=True)

    def free_bytes(self) -> int:
        return self._free_bytes(self.root)

    def has_room_for(self, size_bytes: int) -> bool:
        return self.free_bytes() - size_bytes >= self.min_free_bytes

    def folder_for(self, study_uid: UID, series_uid: UID) -> Path:
        return self.root / study_uid / series_uid

    def seal_in_background(self, received: Path, dataset_offset: int) -> Future[SpooledFile]:
        return self._sealer.submit(self.seal, received, dataset_offset)

    def seal(self, received: Path, dataset_offset: int) -> SpooledFile:
        """Sync a received file to disk and hash its data set.

        The SHA-256 covers the data set bytes only (not the file meta, which names the sender), so
        the same object sent by two modalities hashes alike.
        """
        digest = hashlib.sha256()
        with open(received, "rb") as fp:
            fp.seek(dataset_offset)
            while chunk := fp.read(READ_CHUNK):
                digest.update(chunk)
            os.fsync(fp.fileno())
        return SpooledFile(received, digest.hexdigest(), received.stat().st_size)

    def publish(self, sealed: SpooledFile, final: Path) -> SpooledFile:
        """Rename a synced file to its final name and sync the folder, making the name durable.

        The received file lives in ``incoming/`` on the same filesystem, so the rename is atomic:
        the final name either does not exist or names the complete, synced file.
        """
        final.parent.mkdir(parents=True, exist_ok=True)
        os.rename(sealed.path, final)
        fsync_dir(final.parent)
        return SpooledFile(final, sealed.sha256, sealed.size_bytes)

    def discard(self, path: Path) -> None:
        path.unlink(missing_ok=True)

    def relative(self, path: Path) -> str:
        return str(path.relative_to(self.root))

    def recover(self) -> int:
        """Remove what a crash left half-done: temp files and partly received incoming files.

        Neither was ever acknowledged with Success, so the sender still holds the image and will
        send it again; keeping them would only leave orphans.
        """
        removed = 0
        for tmp in self.root.rglob("*.tmp"):
            tmp.unlink(missing_ok=True)
            removed += 1
        if self.incoming.exists():
            for leftover in self.incoming.iterdir():
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
                removed += 1
        return removed


def filesystem_free_bytes(path: Path) -> int:
    stats = os.statvfs(path)
    return stats.f_bavail * stats.f_frsize


def fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
