"""Fetch ahead, in order: the instances of one C-MOVE or C-GET that another node holds are
fetched from it a few at a time while the sub-operations before them are being sent.

Why: each fetch from a holder (``gateway.cluster.peers``) is a round trip, a transfer and a
SHA-256 check; one after the other, a 500-instance study pays 500 latencies before its last
sub-operation. The C-STORE sub-operations themselves still go one at a time and in the order the
ledger lists them (one association, PS3.4 C.4.2.2 / C.4.3.2), so only the fetching overlaps.

Invariants:
- at most ``window`` fetched files exist at once (in flight or waiting to be sent), each in a
  temporary file on disk, not in memory; the one being sent is parsed and closed before the
  window is topped up again;
- every file is checked against the ledger's SHA-256 by ``Peers.fetch`` as before, and a fetch
  that fails is handled as before (``Loader.load``: an Orthanc copy, else a failed
  sub-operation naming the UID);
- ``close()`` (C-CANCEL, a failure, an association abort: the retrieve generator is closed)
  cancels the fetches not yet started and closes every file, including those of fetches still
  running when it is called (closed as they finish).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from types import TracebackType
from typing import BinaryIO, Self

from pydicom.dataset import Dataset

from gateway.query.retrieve import Loader, Stored


class Prefetch:
    """``load(i)`` gives the data set of ``found[i]``; call it for i = 0, 1, 2, ... in order
    (skipping is allowed: a skipped fetch's file is closed). ``window`` 0: nothing ahead, each
    instance fetched when it is loaded (the behaviour before prefetching)."""

    def __init__(self, loader: Loader, found: Sequence[Stored], window: int) -> None:
        self._loader = loader
        self._found = found
        self._window = window
        # Positions in ``found`` of the instances another node holds, in order
        self._remote = [i for i, s in enumerate(found) if window and loader.can_fetch_from_holder(s)]
        self._submitted = 0  # how many of ``_remote`` were submitted
        self._ahead: dict[int, Future[BinaryIO | None]] = {}
        self._executor: ThreadPoolExecutor | None = None
        if self._remote:
            self._executor = ThreadPoolExecutor(max_workers=window,
                                                thread_name_prefix="retrieve-fetch")
            self._top_up()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, kind: type[BaseException] | None, value: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.close()

    def load(self, index: int) -> Dataset:
        stored = self._found[index]
        for skipped in [i for i in self._ahead if i < index]:
            _discard(self._ahead.pop(skipped))
        future = self._ahead.pop(index, None)
        try:
            if future is None:
                return self._loader.load(stored)
            return self._loader.load(stored, fetched=future.result)
        finally:
            self._top_up()  # after the file was parsed and closed: never more than the window

    def close(self) -> None:
        for future in self._ahead.values():
            _discard(future)
        self._ahead.clear()
        self._submitted = len(self._remote)
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None

    def _top_up(self) -> None:
        executor = self._executor
        if executor is None:
            return
        while len(self._ahead) < self._window and self._submitted < len(self._remote):
            index = self._remote[self._submitted]
            self._submitted += 1
            self._ahead[index] = executor.submit(
                self._loader.fetch_from_holder, self._found[index], True)


def _discard(future: Future[BinaryIO | None]) -> None:
    """Cancel a fetch not yet started; close its file once it is done otherwise."""
    future.cancel()
    future.add_done_callback(_close_result)


def _close_result(future: Future[BinaryIO | None]) -> None:
    if future.cancelled() or future.exception() is not None:
        return
    held = future.result()
    if held is not None:
        held.close()
