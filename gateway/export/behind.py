"""Work done behind the archive writer, on the other core: the archive's SHA-256 (read back as
entries become final) and the checkpoints' syncs.

Why: building an archive costs, per byte, a CRC-32 and a SHA-256 (the entry's, for the manifest)
in the writer, plus the SHA-256 of the whole archive (for the audit row) and getting it all onto
the disk. Done in line, the writer waits for each in turn; here the archive's digest is computed by
a thread reading back what is final (hashlib and the reads release the GIL), and a checkpoint's
``fsync`` and progress record are written by another while the writer goes on (the record is
written only after the sync that covers it, so it never claims more than the disk holds).
A failure in either is raised in the writer at its next call.
"""

from __future__ import annotations

import hashlib
import os
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

CHUNK = 1 << 20


class Hasher:
    """SHA-256 of a file that is being appended to, from its start up to what is final."""

    def __init__(self, path: Path) -> None:
        self._descriptor = os.open(path, os.O_RDONLY)
        self._digest = hashlib.sha256()
        self._hashed = 0
        self._final = 0
        self._ended = False
        self._error: BaseException | None = None
        self._changed = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="export-hash", daemon=True)
        self._thread.start()

    def final_upto(self, offset: int) -> None:
        """Bytes before ``offset`` will not change any more."""
        with self._changed:
            self._raise()
            self._final = max(self._final, offset)
            self._changed.notify()

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
                while self._hashed < final:
                    data = os.pread(self._descriptor, min(CHUNK, final - self._hashed),
                                    self._hashed)
                    if not data:
                        raise OSError("the archive is shorter than what was written")
                    self._digest.update(data)
                    self._hashed += len(data)
        except BaseException as exc:  # noqa: BLE001 - handed to the writer, which raises it
            self._error = exc


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
