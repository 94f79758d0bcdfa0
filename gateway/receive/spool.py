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


@dataclass(frozen=True)
class Sealing:
    """A received file being synced and hashed; joined by the caller, never by a worker, so
    that a busy pool cannot wait on itself."""

    path: Path
    syncing: Future[None]
    hashing: Future[str]

    def result(self) -> SpooledFile:
        """The sealed file, once both are done; the first error otherwise."""
        digest = self.hashing.result()
        self.syncing.result()
        return SpooledFile(self.path, digest, self.path.stat().st_size)


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

    def seal_in_background(self, received: Path, dataset_offset: int) -> Sealing:
        """Sync and hash a received file in worker threads, the two at once.

        Both release the GIL, so they run beside each other and beside the caller's header decode;
        the fsync is the longest single wait of a C-STORE.
        """
        return Sealing(
            received,
            self._sealer.submit(fsync_path, received),
            self._sealer.submit(hash_dataset, received, dataset_offset),
        )

    def claim(self, sealed: SpooledFile, final: Path) -> bool:
        """Give a synced file its final name unless a file already has it; the folder is not
        synced yet (``sync_folder_in_background``), so the name is not durable on return.

        A hard link, because it is atomic and never replaces: the final name either does not
        exist or names the complete, synced file, and an existing one is reported, not lost. The
        ``incoming/`` name is removed by pynetdicom once the handler returns.
        """
        self._make_folder(final.parent)
        try:
            os.link(sealed.path, final)
        except FileExistsError:
            return False
        return True

    def sync_folder_in_background(self, folder: Path) -> Future[None]:
        return self._sealer.submit(fsync_path, folder)

    def publish(self, sealed: SpooledFile, final: Path) -> SpooledFile:
        """Rename a synced file to its final name, replacing any file there, and sync the folder.

        For the cases ``claim`` declines: the ledger has decided the name may be taken (a crash's
        orphan) or the name is a new version's. The rename is atomic, as the link is.
        """
        self._make_folder(final.parent)
        os.rename(sealed.path, final)
        fsync_path(final.parent)
        return SpooledFile(final, sealed.sha256, sealed.size_bytes)

    def _make_folder(self, folder: Path) -> None:
        """Create ``folder`` and its missing parents so that each new name survives a power cut:
        a folder's entry is durable only once the folder holding it is synced."""
        if folder.is_dir():
            return
        missing = []
        while not folder.is_dir():
            missing.append(folder)
            folder = folder.parent
        for created in reversed(missing):
            created.mkdir(exist_ok=True)
            fsync_path(created.parent)

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


def hash_dataset(path: Path, dataset_offset: int) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fp:
        fp.seek(dataset_offset)
        while chunk := fp.read(READ_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_path(path: Path) -> None:
    """Sync a file's data, or a folder's entries (what makes a new or renamed name durable)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
