"""An export run for one HTTP request, its archive's bytes streamed to the client as they are
built.

The ``Exporter`` runs in a worker thread into a private temporary folder; its ``on_final`` hook
(``gateway.export.run.ArchiveHook``) says how far each ZIP is final, and ``events`` reads those
bytes back from the file (one chunk at a time: never the whole archive in memory) for the
response. A JSON document (``format=json``) is written whole at its end, and sent then.

The client may leave at any time: ``close`` (always called when the response ends, however it
ends) marks the run cancelled; the worker stops at its next entry or instance (the hook and the
reporter raise ``ExportCancelled``), and whichever of the two ends last removes the temporary
folder. An archive finished before the client left is still recorded as exported (its audit row
says so); a cancelled one gets an audit row with outcome ``cancelled``.
"""

from __future__ import annotations

import logging
import os
import shutil
import threading
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import anyio

from gateway.export.plan import ArchivePlan
from gateway.export.run import ArchiveHook, ExportReport

log = logging.getLogger(__name__)
CHUNK = 1 << 20
WAIT_S = 0.5  # a waiting reader looks again this often (also how soon it sees a cancel)


class ExportCancelled(Exception):
    """The client left: raised inside the export to stop it."""


class ExportBroken(Exception):
    """The export failed after the response began: the connection is cut (the client sees an
    incomplete body), since a status can no longer be sent."""


@dataclass
class _Live:
    number: int
    name: str
    fd: int
    final: int = 0
    finished: bool = False


@dataclass(frozen=True)
class Begin:
    name: str


@dataclass(frozen=True)
class Data:
    data: bytes


@dataclass(frozen=True)
class End:
    name: str


@dataclass(frozen=True)
class Failed:
    """An archive that could not be made; nothing of it was sent."""

    name: str
    error: str


Event = Begin | Data | End | Failed


class LiveExport:
    """``run(hook, check)`` runs the export (``check()`` raises ``ExportCancelled`` once the
    client is gone: call it as the export advances); ``on_cancelled`` records the cancel."""

    def __init__(self, run: Callable[[ArchiveHook, Callable[[], None]], ExportReport],
                 folder: Path, on_cancelled: Callable[[], None]) -> None:
        self._run_export = run
        self._folder = folder
        self._on_cancelled = on_cancelled
        self._changed = threading.Condition()
        self._version = 0
        self._live: list[_Live] = []
        self._report: ExportReport | None = None
        self._error: BaseException | None = None
        self._done = False
        self._closed = False
        self._removed = False
        self._thread = threading.Thread(target=self._run, name="api-export", daemon=True)

    def start(self) -> None:
        self._thread.start()

    # -- the worker's side ----------------------------------------------------------------------

    def _check(self) -> None:
        if self._closed:
            raise ExportCancelled()

    def _hook(self, archive: ArchivePlan, part: Path, final: int, finished: bool) -> None:
        with self._changed:
            self._check()
            live = self._live[-1] if self._live else None
            if live is None or live.number != archive.number:
                # opened here, on the writer's thread: before the archive is renamed into place
                live = _Live(archive.number, archive.name, os.open(part, os.O_RDONLY))
                self._live.append(live)
            live.final = max(live.final, final)
            live.finished = finished
            self._notify()

    def _run(self) -> None:
        try:
            report = self._run_export(self._hook, self._check)
        except ExportCancelled:
            log.info("api export cancelled: the client left")
            self._on_cancelled()
            report = None
        except BaseException as exc:  # noqa: BLE001 - handed to the reader, which reports it
            log.warning("api export failed: %s", type(exc).__name__)
            with self._changed:
                self._error = exc
            report = None
        with self._changed:
            self._report = report
            self._done = True
            self._notify()
            self._remove_when_both_ended()

    def _notify(self) -> None:
        self._version += 1
        self._changed.notify_all()

    # -- the response's side --------------------------------------------------------------------

    def close(self) -> None:
        """The response ended (sent whole, or the client left): stop the export if it still
        runs; the temporary folder goes once it has stopped."""
        with self._changed:
            self._closed = True
            self._notify()
            self._remove_when_both_ended()

    def _remove_when_both_ended(self) -> None:
        if self._done and self._closed and not self._removed:
            self._removed = True
            for live in self._live:
                os.close(live.fd)
            shutil.rmtree(self._folder, ignore_errors=True)

    def _wait(self, seen: int) -> None:
        with self._changed:
            if self._version == seen:
                self._changed.wait(WAIT_S)

    def _state(self) -> tuple[int, list[_Live], bool, ExportReport | None, BaseException | None]:
        with self._changed:
            return (self._version, [_Live(lv.number, lv.name, lv.fd, lv.final, lv.finished)
                                    for lv in self._live],
                    self._done, self._report, self._error)

    async def events(self) -> AsyncIterator[Event]:
        """Each archive as Begin, Data..., End (or Failed), in the order they are built."""
        index, sent, began = 0, 0, False
        while True:
            version, live, done, report, error = self._state()
            if index < len(live):
                current = live[index]
                if not began:
                    began = True
                    yield Begin(current.name)
                if sent < current.final:
                    count = min(CHUNK, current.final - sent)
                    data = await anyio.to_thread.run_sync(os.pread, current.fd, count, sent)
                    if not data:
                        raise ExportBroken("the archive is shorter than the export said")
                    sent += len(data)
                    yield Data(data)
                    continue
                if current.finished:
                    yield End(current.name)
                    index, sent, began = index + 1, 0, False
                    continue
                if index + 1 < len(live) or done:
                    raise ExportBroken(f"archive {current.number} failed while it was sent")
            elif done:
                if error is not None or report is None:
                    raise ExportBroken("the export stopped")
                streamed = {lv.number for lv in live}
                for outcome in report.archives:
                    if outcome.archive.number in streamed:
                        continue
                    if outcome.outcome != "success" or outcome.path is None:
                        yield Failed(outcome.archive.name, outcome.error or "failed")
                        continue
                    async for event in _whole_file(outcome.archive.name, outcome.path):
                        yield event
                return
            await anyio.to_thread.run_sync(self._wait, version, abandon_on_cancel=True)


async def _whole_file(name: str, path: Path) -> AsyncIterator[Event]:
    """A file written whole (the JSON of ``format=json``), read a chunk at a time."""
    fd = os.open(path, os.O_RDONLY)
    try:
        yield Begin(name)
        offset = 0
        while data := await anyio.to_thread.run_sync(os.pread, fd, CHUNK, offset):
            offset += len(data)
            yield Data(data)
        yield End(name)
    finally:
        os.close(fd)
