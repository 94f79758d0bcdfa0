"""Order intake from a drop folder: each new file of ``folder`` imported like ``gateway orders
import``, then moved to ``done/``, or to ``rejected/`` beside a ``<name>.reason.txt``.

A file is read only once it has not changed for ``settle_s`` (an export still being written by
the RIS is left for the next run) and only if it is a ``.csv`` or ``.json`` that is not hidden;
temporary names (``.tmp``, ``.part``) are never read. A file is imported whole or not at all: one
rejected row rejects the file (the RIS fixes it and drops it again), so a half-imported file never
exists. Idempotent like the import: a file dropped twice changes nothing the second time.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy.orm import Session

from gateway.config import OrderFolderJob
from gateway.remap.imports import ImportReport, import_orders

log = logging.getLogger(__name__)
READABLE = (".csv", ".json")


@dataclass
class FolderReport:
    files_done: int = 0
    files_rejected: int = 0
    files_waiting: int = 0
    orders_added: int = 0
    orders_updated: int = 0
    orders_unchanged: int = 0
    lines: list[str] = field(default_factory=list)

    def counts(self) -> dict[str, int]:
        return {k: v for k, v in vars(self).items() if isinstance(v, int)}


def ready_files(folder: Path, settle_s: float, now_s: float | None = None) -> tuple[list[Path], int]:
    """Files to read now, oldest first, and how many wait because they are still changing."""
    now_s = time.time() if now_s is None else now_s
    ready, waiting = [], 0
    for path in folder.iterdir():
        if (not path.is_file() or path.name.startswith(".")
                or path.suffix.lower() not in READABLE):
            continue
        if now_s - path.stat().st_mtime < settle_s:
            waiting += 1
            continue
        ready.append(path)
    return sorted(ready, key=lambda p: (p.stat().st_mtime, p.name)), waiting


def run_order_folder(sessions: Callable[[], Session], job: OrderFolderJob, actor: str,
                     now: datetime | None = None) -> FolderReport:
    """Import every settled file once, each in its own transaction."""
    report = FolderReport()
    folder = job.folder
    if not folder.is_dir():
        raise FileNotFoundError(f"order folder {folder} does not exist; create it or fix "
                                f"jobs.{job.name}.folder")
    files, report.files_waiting = ready_files(folder, job.settle_s)
    for path in files:
        try:
            with sessions() as session:
                imported = import_orders(session, path, actor, now or datetime.now(UTC))
                if imported.rejected:
                    session.rollback()
                else:
                    session.commit()
        except (OSError, ValueError, UnicodeDecodeError) as exc:
            _reject(path, [f"cannot read the file: {type(exc).__name__}: {exc}"])
            report.files_rejected += 1
            report.lines.append(f"{path.name}: rejected (unreadable)")
            continue
        if imported.rejected:
            _reject(path, _reasons(imported))
            report.files_rejected += 1
            report.lines.append(f"{path.name}: rejected, {len(imported.rejected)} bad row(s); "
                                "nothing imported")
            continue
        _move(path, folder / "done")
        report.files_done += 1
        report.orders_added += imported.added
        report.orders_updated += imported.updated
        report.orders_unchanged += imported.unchanged
        report.lines.append(f"{path.name}: {imported.lines()[0]}")
    return report


def _reasons(imported: ImportReport) -> list[str]:
    return [f"line {line}: {why}" for line, why in imported.rejected]


def _reject(path: Path, reasons: list[str]) -> None:
    moved = _move(path, path.parent / "rejected")
    reason = moved.with_name(moved.name + ".reason.txt")
    reason.write_text("Not imported; fix these and drop the whole file again:\n"
                      + "\n".join(reasons) + "\n", encoding="utf-8")


def _move(path: Path, folder: Path) -> Path:
    """Into ``folder`` under the same name, or with a time suffix when the name is taken."""
    folder.mkdir(exist_ok=True)
    target = folder / path.name
    if target.exists():
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%S%f")
        target = folder / f"{path.stem}.{stamp}{path.suffix}"
    path.rename(target)
    return target
