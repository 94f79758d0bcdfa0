"""Work done behind the archive writer, on the other core: the archive's SHA-256 (read back as
entries become final) and the checkpoints' syncs.

Why: building an archive costs, per byte, a CRC-32 (for the ZIP), a SHA-256 (the entry's, for
the manifest), another (the whole archive's, for the audit row) and getting it all onto the
disk. Done in line, the writer waits for each in turn. Here the writer only copies and computes
the CRC; one thread reads back what is final once and computes both digests from it (hashlib and
the reads release the GIL), and a checkpoint's
``fsync`` and progress record are written by another while the writer goes on (the record is
written only after the sync that covers it, so it never claims more than the disk holds).
A failure in either is raised in the writer at its next call.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

CHUNK = 1 << 20


class Hasher:
    """SHA-256 of a file that is being appended to, from its start up to what is final; and of
    the regions ``watch`` names in it (an entry's data), read once for both."""

    def __init__(self, path: Path) -> None:
        self._descriptor = os.open(path, os.O_RDONLY)
        self._digest = hashlib.sha256()
        self._hashed = 0
        self._final = 0
        self._ended = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._regions: deque[tuple[str, int, int]] = deque()  # (name, start, end), in order
        self._region_digest: Any = None
        self._digests: dict[str, str] = {}
        self._thread = threading.Thread(target=self._run, name="export-hash", daemon=True)
        self._thread.start()

    def watch(self, name: str, start: int, end: int) -> None:
        """Compute the digest of bytes ``start`` to ``end`` too (not final yet, and after every
        region watched before)."""
        with self._changed:
            self._regions.append((name, start, end))

    def digest_of(self, name: str) -> str:
        """A watched region's digest, once the hasher has passed it."""
        with self._changed:
            while name not in self._digests:
                self._raise()
                if not self._thread.is_alive():
                    raise OSError(f"the archive's hasher stopped before {name}")
                self._changed.wait(0.1)
            return self._digests[name]

    def final_upto(self, offset: int) -> None:
        """Bytes before ``offset`` will not change any more."""
        with self._changed:
            self._raise()
            self._final = max(self._final, offset)
            self._changed.notify_all()

    def result(self, size: int) -> str:
        """The digest of the first ``size`` bytes (the whole file, once it is written)."""
        self.final_upto(size)
        self.close()
        self._raise()
        if self._hashed != size:
            raise OSError(f"the archive ended at {self._hashed} bytes, not {size}")
        return self._digest.hexdigest()

    def close(self) -> None:
        with self._changed:
            self._ended = True
            self._changed.notify()
        self._thread.join()
        if self._descriptor >= 0:
            os.close(self._descriptor)
            self._descriptor = -1

    def _close_region(self, region: tuple[str, int, int]) -> tuple[str, int, int] | None:
        digest = self._region_digest if self._region_digest is not None else hashlib.sha256()
        self._region_digest = None
        with self._changed:
            self._regions.popleft()
            self._digests[region[0]] = digest.hexdigest()
            self._changed.notify_all()
            return self._regions[0] if self._regions else None

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        try:
            while True:
                with self._changed:
                    while self._hashed >= self._final and not self._ended:
                        self._changed.wait()
                    if self._hashed >= self._final:
                        return
                    final = self._final
                    region = self._regions[0] if self._regions else None
                while True:
                    while region is not None and self._hashed >= region[2]:
                        region = self._close_region(region)  # passed (or empty)
                    if self._hashed >= final:
                        break
                    stop = min(final, self._hashed + CHUNK)
                    if region is not None:  # a read never straddles a region's edge
                        _, start, end = region
                        stop = min(stop, start) if self._hashed < start else min(stop, end)
                    data = os.pread(self._descriptor, stop - self._hashed, self._hashed)
                    if not data:
                        raise OSError("the archive is shorter than what was written")
                    self._digest.update(data)
                    if region is not None and self._hashed >= region[1]:
                        if self._region_digest is None:
                            self._region_digest = hashlib.sha256()
                        self._region_digest.update(data)
                    self._hashed += len(data)
        except BaseException as exc:  # noqa: BLE001 - handed to the writer, which raises it
            with self._changed:
                self._error = exc
                self._changed.notify_all()


class Behind:
    """One task at a time on a worker thread; a new one waits for the one before."""

    def __init__(self) -> None:
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="export-sync")
        self._last: Future[None] | None = None

    def submit(self, task: Callable[[], None]) -> None:
        self.wait()
        self._last = self._pool.submit(task)

    def wait(self) -> None:
        if self._last is not None:
            last, self._last = self._last, None
            last.result()

    def close(self) -> None:
        try:
            self.wait()
        finally:
            self._pool.shutdown(wait=True)
