"""How an export shows its progress: a bar on a terminal (tqdm: bytes, rate, ETA, instances),
plain lines otherwise (a log, a pipe, ``gateway jobs run`` under cron), and counts in the running
job's ``job_runs`` row, which ``gateway jobs`` shows.

Lines carry archive numbers, study UIDs and counts, never a patient value: a scheduled job's lines
go to the service log.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from typing import IO, Any, Protocol

from gateway.export.plan import ArchivePlan

MB = 1_000_000


class Reporter(Protocol):
    def begin(self, archives: int, instances: int, bytes: int) -> None: ...

    def archive(self, archive: ArchivePlan) -> None: ...

    def advance(self, instances: int, bytes: int, skipped: bool = False) -> None: ...

    def archive_done(self, archive: ArchivePlan, line: str) -> None: ...

    def end(self) -> None: ...


class Totals:
    """Done and total, with the rate measured since the start (skipped work excluded)."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.archives = self.instances = self.bytes = 0
        self.archives_done = self.instances_done = self.bytes_done = 0
        self._skipped_bytes = 0
        self._started = clock()

    def begin(self, archives: int, instances: int, bytes: int) -> None:
        self.archives += archives
        self.instances += instances
        self.bytes += bytes

    def advance(self, instances: int, bytes: int, skipped: bool) -> None:
        self.instances_done += instances
        self.bytes_done += bytes
        if skipped:
            self._skipped_bytes += bytes

    def rate(self) -> float:
        """Bytes a second."""
        elapsed = self._clock() - self._started
        return (self.bytes_done - self._skipped_bytes) / elapsed if elapsed > 0 else 0.0

    def eta_s(self) -> float | None:
        rate = self.rate()
        return (self.bytes - self.bytes_done) / rate if rate > 0 else None

    def counts(self) -> dict[str, int]:
        return {"archives_done": self.archives_done, "archives_total": self.archives,
                "instances_done": self.instances_done, "instances_total": self.instances,
                "bytes_done": self.bytes_done, "bytes_total": self.bytes}

    def line(self) -> str:
        eta = self.eta_s()
        return (f"{self.instances_done}/{self.instances} instances, "
                f"{self.bytes_done / MB:.1f}/{self.bytes / MB:.1f} MB, "
                f"{self.rate() / MB:.1f} MB/s, ETA {_duration(eta) if eta is not None else '?'}")


def _duration(seconds: float) -> str:
    whole = round(seconds)
    return f"{whole // 3600}:{whole // 60 % 60:02d}:{whole % 60:02d}"


class LineReporter:
    """A line when an archive starts and ends, and one every ``every_s`` in between."""

    def __init__(self, emit: Callable[[str], None], every_s: float = 5.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._emit = emit
        self._every_s = every_s
        self._clock = clock
        self.totals = Totals(clock)
        self._last = clock()

    def begin(self, archives: int, instances: int, bytes: int) -> None:
        self.totals.begin(archives, instances, bytes)
        self._emit(f"exporting {archives} archive(s): {instances} instances, "
                   f"{bytes / MB:.1f} MB")

    def archive(self, archive: ArchivePlan) -> None:
        self._emit(f"{archive.label}: {archive.instances} instances, "
                   f"{archive.bytes / MB:.1f} MB")

    def advance(self, instances: int, bytes: int, skipped: bool = False) -> None:
        self.totals.advance(instances, bytes, skipped)
        if skipped:
            self._emit(f"resumed: {instances} instances ({bytes / MB:.1f} MB) were done already")
        now = self._clock()
        if now - self._last >= self._every_s:
            self._last = now
            self._emit(self.totals.line())

    def archive_done(self, archive: ArchivePlan, line: str) -> None:
        self.totals.archives_done += 1
        self._emit(f"{archive.label}: {line}")

    def end(self) -> None:
        self._emit(self.totals.line())


class BarReporter:
    """tqdm on a terminal: bytes with rate and ETA, instances beside them."""

    def __init__(self, stream: IO[str]) -> None:
        self._stream = stream
        self.totals = Totals(time.monotonic)
        self._bar: Any = None

    def begin(self, archives: int, instances: int, bytes: int) -> None:
        from tqdm import tqdm

        self.totals.begin(archives, instances, bytes)
        if self._bar is None:
            self._bar = tqdm(total=bytes, unit="B", unit_scale=True, unit_divisor=1024,
                             file=self._stream, desc="export", **_size(self._stream))
        else:
            self._bar.total += bytes
            self._bar.refresh()

    def archive(self, archive: ArchivePlan) -> None:
        if self._bar is not None:
            self._bar.set_description(f"archive {archive.number}", refresh=False)

    def advance(self, instances: int, bytes: int, skipped: bool = False) -> None:
        self.totals.advance(instances, bytes, skipped)
        if self._bar is not None:
            self._bar.set_postfix_str(
                f"{self.totals.instances_done}/{self.totals.instances} instances", refresh=False)
            self._bar.update(bytes)

    def archive_done(self, archive: ArchivePlan, line: str) -> None:
        self.totals.archives_done += 1
        if self._bar is not None:
            self._bar.write(f"{archive.label}: {line}", file=self._stream)

    def end(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class CountsReporter:
    """Writes the totals through ``write`` (a running job's ``job_runs.counts``) every
    ``every_s`` and at the end, so that ``gateway jobs`` shows a running export's progress."""

    def __init__(self, write: Callable[[dict[str, int]], None], every_s: float = 1.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._write = write
        self._every_s = every_s
        self._clock = clock
        self.totals = Totals(clock)
        self._last = clock()

    def begin(self, archives: int, instances: int, bytes: int) -> None:
        self.totals.begin(archives, instances, bytes)
        self._flush()

    def archive(self, archive: ArchivePlan) -> None:
        pass

    def advance(self, instances: int, bytes: int, skipped: bool = False) -> None:
        first = self.totals.instances_done == 0
        self.totals.advance(instances, bytes, skipped)
        if first or self._clock() - self._last >= self._every_s:
            self._flush()  # the first instance at once: the run shows it has started

    def archive_done(self, archive: ArchivePlan, line: str) -> None:
        self.totals.archives_done += 1
        self._flush()

    def end(self) -> None:
        self._flush()

    def _flush(self) -> None:
        self._last = self._clock()
        self._write(self.totals.counts())


class Reporters:
    """Several reporters as one."""

    def __init__(self, reporters: Sequence[Reporter]) -> None:
        self._reporters = list(reporters)

    def begin(self, archives: int, instances: int, bytes: int) -> None:
        for r in self._reporters:
            r.begin(archives, instances, bytes)

    def archive(self, archive: ArchivePlan) -> None:
        for r in self._reporters:
            r.archive(archive)

    def advance(self, instances: int, bytes: int, skipped: bool = False) -> None:
        for r in self._reporters:
            r.advance(instances, bytes, skipped)

    def archive_done(self, archive: ArchivePlan, line: str) -> None:
        for r in self._reporters:
            r.archive_done(archive, line)

    def end(self) -> None:
        for r in self._reporters:
            r.end()


def _size(stream: IO[str]) -> dict[str, int]:
    """The terminal's size for tqdm; one that does not say (a pty nobody sized) gets 100x24,
    where tqdm would otherwise draw nothing."""
    try:
        size = os.get_terminal_size(stream.fileno())
    except (OSError, ValueError):
        return {"ncols": 100, "nrows": 24}
    return {"ncols": size.columns or 100, "nrows": size.lines or 24}


def for_stream(stream: IO[str], emit: Callable[[str], None]) -> Reporter:
    """A bar when ``stream`` is a terminal, plain lines through ``emit`` otherwise."""
    return BarReporter(stream) if stream.isatty() else LineReporter(emit)
