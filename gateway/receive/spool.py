"""Durable files in the spool: nothing is visible under its final name until it is on disk.

Layout: ``<spool>/<StudyInstanceUID>/<SeriesInstanceUID>/<SOPInstanceUID>.dcm`` for the first copy
of an instance; a later copy with other content is ``<SOPInstanceUID>.<sha256[:16]>.dcm`` beside it,
so no copy ever overwrites another. Paths are built only from UIDs that ``validate`` has checked
against the UID grammar (digits and dots), so no patient data and no ``..`` can reach a path.
``incoming/`` holds what pynetdicom is receiving, already as a Part-10 file; a kept instance is
synced there and renamed into place. ``*.tmp`` files (from rewrites) are never acknowledged.

A final name exists before its ledger row is committed (link, then commit: never a row without its
file). ``claims.log`` at the spool's root covers that window: each name is written there before it
is given ("+") and again once its row is committed or the file is removed ("-"). A process killed
in between leaves a "+" with no "-"; ``recover`` removes such a file at the next start unless a
row names it. It never walks the spool: it reads a log of a few hundred kilobytes at most.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from collections import Counter
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from pydicom.uid import UID

READ_CHUNK = 1 << 20
INCOMING = "incoming"
CLAIMS = "claims.log"
COMPACT_BYTES = 256 * 1024  # the claim log is rewritten with only what is pending beyond this

log = logging.getLogger(__name__)


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


class ClaimLog:
    """Final names given to received files whose ledger rows are not committed yet.

    Two appends per instance, "+name" before the name is given and "-name" once the row is
    committed or the file removed: a ``write`` each to an open file, a few microseconds, and no
    fsync. A process kill (the crash this is for: SIGKILL, the OOM killer) loses nothing the
    kernel was given. After a power cut a name may survive while its "+" did not (ext4's ordered
    journal usually commits the append first); such a file is litter only, never acknowledged,
    and the sender's next copy takes its name (``Ingest`` publishes over a name without a row).

    The log is rewritten with only the pending names when it passes ``COMPACT_BYTES``, so it
    stays small however long the gateway runs; ``take_pending`` reads it once, at start.
    """

    def __init__(self, path: Path, compact_bytes: int = COMPACT_BYTES) -> None:
        self.path = path
        self._compact_bytes = compact_bytes
        self._lock = threading.Lock()
        self._pending: Counter[str] = Counter()
        self._fd: int | None = None
        self._size = 0

    def intend(self, name: str) -> None:
        """Before ``name`` (relative to the spool) is given to a file."""
        with self._lock:
            self._append(f"+{name}\n")
            self._pending[name] += 1

    def settle(self, name: str) -> None:
        """After its row is committed, or its file removed, or the name not given after all."""
        with self._lock:
            self._append(f"-{name}\n")
            self._pending[name] -= 1
            if self._pending[name] <= 0:
                del self._pending[name]
            if self._size > self._compact_bytes:
                self._compact()

    def take_pending(self) -> list[str]:
        """The names a previous process claimed and never settled; the log starts afresh."""
        with self._lock:
            counts: Counter[str] = Counter()
            try:
                text = self.path.read_text(encoding="utf-8", errors="replace")
            except FileNotFoundError:
                text = ""
            for line in text.splitlines():
                if line[:1] == "+":
                    counts[line[1:]] += 1
                elif line[:1] == "-":
                    counts[line[1:]] -= 1
            self._close()
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND,
                               0o600)
            self._size = 0
            return sorted(name for name, count in counts.items() if count > 0)

    def _append(self, line: str) -> None:
        if self._fd is None:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            self._size = os.fstat(self._fd).st_size
        data = line.encode()
        os.write(self._fd, data)
        self._size += len(data)

    def _compact(self) -> None:
        """Replace the log by one holding only the pending names (atomically: a rename)."""
        fresh = self.path.with_name(self.path.name + ".new")
        data = "".join(f"+{name}\n" * count for name, count in self._pending.items()).encode()
        fd = os.open(fresh, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_APPEND, 0o600)
        try:
            os.write(fd, data)
            os.fsync(fd)
        except BaseException:
            os.close(fd)
            raise
        os.replace(fresh, self.path)
        self._close()
        self._fd, self._size = fd, len(data)

    def _close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            os.close(fd)


class Spool:
    def __init__(
        self, root: Path, min_free_bytes: int, free_bytes: Callable[[Path], int] | None = None,
        worker: int | None = None,
    ) -> None:
        """``worker``: receiver process ``worker`` of several (``dicom.workers``), with its own
        ``claims-N.log``, so that the next process in its slot cleans up after its crash
        (``recover``) while the others receive; ``incoming/`` names start with the pid of the
        process writing them (``remove_incoming_of``)."""
        self.root = root
        self._worker = worker
        self.incoming = root / INCOMING
        self.min_free_bytes = min_free_bytes
        self._free_bytes = free_bytes or filesystem_free_bytes
        self._sealer = ThreadPoolExecutor(max_workers=8, thread_name_prefix="spool-seal")
        self.incoming.mkdir(parents=True, exist_ok=True)
        # Opened on first use: ``gateway status`` builds one
        self.claims = ClaimLog(root / (CLAIMS if worker is None else f"claims-{worker}.log"))

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
        ``incoming/`` name is removed by the receiver once the handler returns. A given name is
        in the claim log until ``settle``.
        """
        self._make_folder(final.parent)
        name = self.relative(final)
        self.claims.intend(name)
        try:
            os.link(sealed.path, final)
        except FileExistsError:
            self.claims.settle(name)
            return False
        except BaseException:
            self.claims.settle(name)
            raise
        return True

    def settle(self, final: Path) -> None:
        """The ledger row naming ``final`` is committed, or the file was removed."""
        self.claims.settle(self.relative(final))

    def sync_folder_in_background(self, folder: Path) -> Future[None]:
        return self._sealer.submit(fsync_path, folder)

    def publish(self, sealed: SpooledFile, final: Path) -> SpooledFile:
        """Rename a synced file to its final name, replacing any file there, and sync the folder.

        For the cases ``claim`` declines: the ledger has decided the name may be taken (a crash's
        orphan) or the name is a new version's. The rename is atomic, as the link is.
        """
        self._make_folder(final.parent)
        self.claims.intend(self.relative(final))  # until the caller's ``settle``, whatever happens
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

    def recover(self, is_recorded: Callable[[str], bool]) -> int:
        """Remove what a crash left half-done: temp files, partly received incoming files, and
        files given their final name whose ledger row was never committed (the claim log's
        pending names that ``is_recorded`` does not find). Call once, before receiving.

        None of them was ever acknowledged with Success, so the sender still holds the image and
        will send it again; keeping them would only leave orphans. A name a row holds is never
        touched, whatever the log says.

        A worker's spool (``worker=N``) recovers only its own claims (its predecessor's incoming
        files are the supervisor's to remove, ``remove_incoming_of``); the node's (no ``worker``)
        every claim log and everything else, at start.
        """
        removed = 0
        pending = self.claims.take_pending()
        if self._worker is None:
            for other in sorted(self.root.glob("claims-*.log")):
                claims = ClaimLog(other)
                pending += claims.take_pending()
                claims._close()
                other.unlink()
        for name in pending:
            path = self.root / name
            if Path(name).is_absolute() or ".." in Path(name).parts:
                continue  # not a name this gateway wrote
            if path.is_file() and not is_recorded(name):
                log.warning("removing %s: given its name, never recorded (a crash in between)",
                            name)
                path.unlink()
                removed += 1
        for tmp in self.root.rglob("*.tmp") if self._worker is None else ():
            tmp.unlink(missing_ok=True)
            removed += 1
        if self.incoming.exists() and self._worker is None:
            for leftover in self.incoming.iterdir():
                if leftover.is_dir():
                    shutil.rmtree(leftover, ignore_errors=True)
                else:
                    leftover.unlink(missing_ok=True)
                removed += 1
        return removed


    def remove_incoming_of(self, pid: int) -> int:
        """Files a dead receiver process was receiving (never acknowledged: the sender's
        association died with the process)."""
        removed = 0
        for leftover in self.incoming.glob(f"{pid}-*"):
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
