"""An export's plan and each archive's progress record: what a resumed export continues from.

An export writes into a hidden work folder inside its destination, ``.export-<key>/``:

- ``plan.json``: the archives to build, the options, the export's time (every timestamp in the
  archives is this one) and, for a de-identified export, its secret; written once, synced;
- ``archive-<n>.log``: JSON lines. The first freezes the archive's instances (as the ledger had
  them) and, with a DICOMDIR, the file layout; each next one is a checkpoint, written only once
  the entries it lists are on disk (the archive synced first); then ``finished`` (the archive is
  complete under its temporary name) and ``audited`` (renamed into place and recorded);
- ``archive-<n>.part``: the archive being written (a folder for ``format = "folder"``); named
  by number, since an archive's name may hold a Patient ID.

The next run reads these and continues after the last checkpoint, cutting off whatever an
interruption left after it; since every entry's bytes follow from the plan and the frozen
instances, the finished archive is the same, byte for byte, as one built without interruption.
Nothing in the work folder is visible under an archive's name, and the folder goes when the
export ends.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Literal

from gateway.config import ExportOptions
from gateway.export.metadata import Exported, Missing
from gateway.export.select import Item
from gateway.export.sinks import sync_folder
from gateway.export.zipstream import Entry

PLAN = "plan.json"


@dataclass(frozen=True)
class ArchivePlan:
    """One archive of an export. ``subject`` is the study's UID or the patient's ID (patient
    data: it goes to the audit row and the plan, never to the log); ``label`` is what progress
    lines and the log may show."""

    number: int
    name: str
    kind: Literal["study", "patient"]
    subject: str | None
    studies: tuple[str, ...]
    instances: int
    bytes: int

    @property
    def label(self) -> str:
        if self.kind == "study":
            return f"archive {self.number} (study {self.studies[0]})"
        return f"archive {self.number} (patient, {len(self.studies)} studies)"

    def to_json(self) -> dict[str, Any]:
        return {"number": self.number, "name": self.name, "kind": self.kind,
                "subject": self.subject, "studies": list(self.studies),
                "instances": self.instances, "bytes": self.bytes}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ArchivePlan:
        return cls(int(data["number"]), str(data["name"]), data["kind"], data["subject"],
                   tuple(data["studies"]), int(data["instances"]), int(data["bytes"]))


@dataclass(frozen=True)
class ExportPlan:
    key: str
    actor: str
    what: str  # study | patient | accession | all | job
    job: str | None
    created_at: datetime
    options: ExportOptions
    archives: tuple[ArchivePlan, ...]
    deid_secret: str | None = None  # hex; only in the work folder, which is removed at the end
    force_zip64: bool = False

    def to_json(self) -> dict[str, Any]:
        return {"key": self.key, "actor": self.actor, "what": self.what, "job": self.job,
                "created_at": self.created_at.isoformat(),
                "options": self.options.model_dump(mode="json"),
                "archives": [a.to_json() for a in self.archives],
                "deid_secret": self.deid_secret, "force_zip64": self.force_zip64}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> ExportPlan:
        return cls(str(data["key"]), str(data["actor"]), str(data["what"]), data["job"],
                   datetime.fromisoformat(data["created_at"]),
                   ExportOptions.model_validate(data["options"]),
                   tuple(ArchivePlan.from_json(a) for a in data["archives"]),
                   data.get("deid_secret"), bool(data.get("force_zip64", False)))


def write_plan(work: Path, plan: ExportPlan) -> None:
    temporary = work / (PLAN + ".tmp")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as file:
        json.dump(plan.to_json(), file, ensure_ascii=False)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, work / PLAN)
    sync_folder(work)


def read_plan(work: Path) -> ExportPlan | None:
    try:
        return ExportPlan.from_json(json.loads((work / PLAN).read_text(encoding="utf-8")))
    except FileNotFoundError:
        return None


@dataclass(frozen=True)
class Layout:
    """A DICOMDIR's file IDs (one per item, in order; None for an item left out, and
    ``reasons`` says why) and the DICOMDIR's bytes."""

    names: tuple[str | None, ...]
    dicomdir: bytes
    reasons: tuple[str | None, ...]


@dataclass
class Progress:
    """An archive's state as its log records it."""

    items: list[Item]
    layout: Layout | None
    done: int = 0  # items processed
    entries: list[Entry] = field(default_factory=list)
    exported: list[Exported] = field(default_factory=list)
    missing: list[Missing] = field(default_factory=list)
    previews: int = 0
    finished: dict[str, Any] | None = None
    audited: bool = False


class ArchiveLog:
    def __init__(self, path: Path) -> None:
        self.path = path

    def read(self) -> Progress | None:
        """None when there is no usable record (none yet, or its first line was cut)."""
        try:
            lines = self.path.read_bytes().split(b"\n")
        except FileNotFoundError:
            return None
        records = []
        for line in lines:
            try:
                records.append(json.loads(line))
            except ValueError:
                break  # a line cut by the interruption, and whatever follows it
        if not records or "header" not in records[0]:
            return None
        header = records[0]["header"]
        layout = header.get("layout")
        progress = Progress(
            [Item.from_json(i) for i in header["items"]],
            Layout(tuple(layout["names"]), bytes.fromhex(layout["dicomdir"]),
                   tuple(layout["reasons"])) if layout else None,
        )
        for record in records[1:]:
            if "done" in record:
                progress.done = int(record["done"])
                progress.entries += [_entry(e) for e in record["entries"]]
                progress.exported += [Exported.from_json(e) for e in record["exported"]]
                progress.missing += [Missing.from_json(m) for m in record["missing"]]
                progress.previews += int(record["previews"])
            elif "finished" in record:
                progress.finished = record["finished"]
            elif record.get("audited"):
                progress.audited = True
        return progress

    def start(self, items: Sequence[Item], layout: Layout | None) -> None:
        header = {"items": [i.to_json() for i in items],
                  "layout": None if layout is None else {"names": list(layout.names),
                                                         "dicomdir": layout.dicomdir.hex(),
                                                         "reasons": list(layout.reasons)}}
        descriptor = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "wb") as file:
            file.write(_line({"header": header}))
            file.flush()
            os.fsync(file.fileno())
        sync_folder(self.path.parent)

    def checkpoint(self, done: int, entries: Sequence[Entry], exported: Sequence[Exported],
                   missing: Sequence[Missing], previews: int) -> None:
        self._append({"done": done, "entries": [_entry_json(e) for e in entries],
                      "exported": [e.to_json() for e in exported],
                      "missing": [m.to_json() for m in missing], "previews": previews})

    def finish(self, result: dict[str, Any]) -> None:
        self._append({"finished": result})

    def audited(self) -> None:
        self._append({"audited": True})

    def _append(self, record: dict[str, Any]) -> None:
        with open(self.path, "ab") as file:
            file.write(_line(record))
            file.flush()
            os.fsync(file.fileno())


def _line(record: dict[str, Any]) -> bytes:
    return json.dumps(record, ensure_ascii=False).encode("utf-8") + b"\n"


def _entry_json(entry: Entry) -> dict[str, Any]:
    return entry.to_json()


def _entry(data: dict[str, Any]) -> Entry:
    return Entry.from_json(data)
