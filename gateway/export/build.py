"""Building one archive: its instances' files, previews, metadata JSON and manifest, in a fixed
order, with checkpoints that let an interrupted build continue (``gateway.export.plan``).

Layout (``gateway.export.names``): a study archive holds ``dicom/<n>.dcm`` (n counts the study's
instances from 1, in series then instance order), ``previews/<n>_frame_<k>.png``, the key image
(``image.jpg`` and ``metadata.json``) when asked, ``study_data.json``, then ``DICOMDIR`` when
asked, and ``manifest.sha256`` last. A patient archive holds the same per study under
``studies/<StudyInstanceUID>/`` and ``patient_data.json`` at its root. With a DICOMDIR the DICOM
files are under the PS3.10 file IDs it refers to (``DICOM/...``, from the archive's root), so a
viewer finds them; the JSON gives each file's path either way.

The DICOM files are the spool's bytes, copied as they are (the UID invariant): never decoded and
encoded again unless the export de-identifies them. Each entry's SHA-256 (for the manifest) and
CRC-32 (for the ZIP) are computed as its bytes are copied, in one pass.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from functools import partial
from io import BytesIO
from pathlib import Path
from typing import Any

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filewriter import dcmwrite
from sqlalchemy.orm import Session

from gateway.errors import GatewayError
from gateway.export import metadata, names, select
from gateway.export.behind import Behind
from gateway.export.frames import number_of_frames as frames_in_head
from gateway.export.metadata import About, Exported, Missing
from gateway.export.plan import ArchiveLog, ArchivePlan, ExportPlan, Layout, Progress
from gateway.export.sinks import MANIFEST, FinalHook, FolderSink, Sink, ZipSink
from gateway.export.sources import MissingInstance, Opened, Sources
from gateway.export.zipstream import COPY_CHUNK, Entry

log = logging.getLogger(__name__)
FRAME_TAGS = ["NumberOfFrames", "Rows"]
HEAD_BYTES = 64 * 1024  # where Number of Frames is, in every object but a few odd ones
SHOWN_MISSING = 5
# The key image's metadata.json: (key, DICOM keyword), camelCase as the metadata JSON's
KEY_IMAGE_METADATA = (
    ("patientID", "PatientID"), ("patientName", "PatientName"),
    ("patientBirthDate", "PatientBirthDate"), ("patientSex", "PatientSex"),
    ("studyInstanceUID", "StudyInstanceUID"), ("seriesInstanceUID", "SeriesInstanceUID"),
    ("sopInstanceUID", "SOPInstanceUID"), ("sopClassUID", "SOPClassUID"),
    ("studyDate", "StudyDate"), ("studyTime", "StudyTime"),
    ("studyDescription", "StudyDescription"), ("seriesDescription", "SeriesDescription"),
    ("modality", "Modality"), ("instanceNumber", "InstanceNumber"), ("rows", "Rows"),
    ("columns", "Columns"), ("numberOfFrames", "NumberOfFrames"),
    ("photometricInterpretation", "PhotometricInterpretation"),
    ("pixelSpacing", "PixelSpacing"), ("sliceThickness", "SliceThickness"),
    ("windowCenter", "WindowCenter"), ("windowWidth", "WindowWidth"),
)  # instances named in a failure message; the rest are counted


class ExportFailed(GatewayError):
    """The archive cannot be made as asked; the message says why and what to do (UIDs, counts
    and options only: it reaches the log)."""


class Excluded(MissingInstance):
    """Left out by policy (de-identification refuses it), not lost: never fails an export."""


@dataclass(frozen=True)
class Built:
    path: Path  # the finished archive under its temporary name (a file, or a folder)
    sha256: str
    size: int
    instances: int
    missing: tuple[Missing, ...]
    previews: int
    previews_failed: int


class ArchiveBuilder:
    """Builds ``archive`` of ``plan`` in ``work``, continuing from its log when there is one.

    ``deid`` is a ``gateway.export.deidentify.Deidentifier`` (one per export) or None;
    ``advance(instances, bytes, skipped)`` is told of progress as instances are done (skipped:
    done by an earlier, interrupted run).
    """

    def __init__(self, plan: ExportPlan, archive: ArchivePlan, work: Path,
                 sessions: Callable[[], Session], sources: Sources, deid: Any | None,
                 advance: Callable[[int, int, bool], None], checkpoint_bytes: int,
                 checkpoint_s: float, generator: str,
                 sites: select.SiteScope | None = None,
                 on_final: FinalHook | None = None) -> None:
        self._plan = plan
        self._options = plan.options
        self._archive = archive
        self._sessions = sessions
        self._sources = sources
        self._deid = deid
        self._advance = advance
        self._checkpoint_bytes = checkpoint_bytes
        self._checkpoint_s = checkpoint_s
        self._generator = generator
        self._sites = sites
        self._on_final = on_final  # a ZIP's final bytes, as it grows (gateway.export.sinks)
        # named by number: an archive's name may hold a Patient ID, and a path in an error
        # message would carry it into the log
        self.part = work / f"archive-{archive.number}.part"
        self.log = ArchiveLog(work / f"archive-{archive.number}.log")
        self._staging = work / f"archive-{archive.number}.staging"
        self._images = self._options.include_images and self._options.format != "json"
        self.previews_failed = 0

    # -- the build ------------------------------------------------------------------------------

    def build(self) -> Built:
        state = self.log.read()
        if state is None:
            remove(self.part)
            remove(self._staging)
            with self._sessions() as session:
                found = select.items(session, self._archive.studies, self._sites)
            gone = set(self._archive.studies) - {i.study_instance_uid for i in found}
            if self._sites is not None and gone:
                raise ExportFailed(f"{self._archive.label}: study {min(gone)} is no "
                                   "longer wholly of the sites asked for (an instance of "
                                   "another site arrived); it is left out of this export")
            self._check_sources(found)
            layout = self._layout(found) if self._images and self._options.dicomdir else None
            self.log.start(found, layout)
            state = Progress(found, layout)
        else:
            log.info("export %s: resuming %s after %d of %d instances", self._plan.key,
                     self._archive.label, state.done, len(state.items))
        if self._options.format == "json":
            return self._json_only(state)
        sink: Sink
        if self._options.format == "zip":
            sink = ZipSink(self.part, self._plan.created_at, state.entries, self._plan.force_zip64,
                           self._on_final)
        else:
            sink = FolderSink(self.part)
        behind = Behind()
        try:
            self._instances(sink, state, behind)
            behind.wait()
            state.entries, state.exported = resolved(sink, state.entries, state.exported)
            entries = list(state.entries)
            entries += self._trailing(sink, state, entries)
            sink.add_bytes(MANIFEST, manifest(entries, state.missing))
            digest = sink.finish()
        finally:
            behind.close()
            sink.close()
        shutil.rmtree(self._staging, ignore_errors=True)
        if self._options.format == "zip":
            size = self.part.stat().st_size
        else:
            size = sum(p.stat().st_size for p in self.part.rglob("*") if p.is_file())
        return Built(self.part, digest, size, len(state.exported), tuple(state.missing),
                     state.previews, self.previews_failed)

    def _check_sources(self, found: Sequence[select.Item]) -> None:
        """Fail before writing anything when instances are known to be missing."""
        if self._options.allow_partial or not (self._images or self._options.key_image):
            return
        problems = [(i, p) for i in found if (p := self._sources.problem(i)) is not None]
        if problems:
            raise ExportFailed(describe_missing(
                [(i.sop_instance_uid, p) for i, p in problems], self._archive.label))

    def _instances(self, sink: Sink, state: Progress, behind: Behind) -> None:
        items = state.items
        numbers = numbering(items)
        done_bytes = sum(i.size_bytes for i in items[:state.done])
        if state.done:
            self._advance(state.done, done_bytes, True)
        entries: list[Entry] = []
        exported: list[Exported] = []
        missing: list[Missing] = []
        previews = 0
        since_bytes, since = 0, time.monotonic()
        for index in range(state.done, len(items)):
            item = items[index]
            try:
                new, record, rendered = self._instance(sink, state, index, numbers[index])
                entries += new
                exported.append(record)
                previews += rendered
                since_bytes += sum(e.size for e in new)
            except MissingInstance as exc:
                if not self._options.allow_partial and not isinstance(exc, Excluded):
                    raise ExportFailed(describe_missing([(item.sop_instance_uid, exc.reason)],
                                                        self._archive.label)) from None
                missing.append(self._missing(item, exc.reason))
            self._advance(1, item.size_bytes, False)
            last = index + 1 == len(items)
            if last or since_bytes >= self._checkpoint_bytes or (
                    time.monotonic() - since >= self._checkpoint_s):
                # synced, then recorded, behind the writer, which goes on meanwhile
                behind.submit(partial(self._checkpoint, sink, sink.checkpoint(), index + 1,
                                      entries, exported, missing, previews))
                state.done = index + 1
                state.entries += entries
                state.exported += exported
                state.missing += missing
                state.previews += previews
                entries, exported, missing, previews = [], [], [], 0
                since_bytes, since = 0, time.monotonic()

    def _checkpoint(self, sink: Sink, sync: Callable[[], None], done: int,
                    entries: list[Entry], exported: list[Exported], missing: list[Missing],
                    previews: int) -> None:
        entries, exported = resolved(sink, entries, exported)
        sync()
        self.log.checkpoint(done, entries, exported, missing, previews)

    def _instance(self, sink: Sink, state: Progress, index: int,
                  number: int) -> tuple[list[Entry], Exported, int]:
        item = state.items[index]
        folder = self._folder(item.study_instance_uid)
        if not self._images:
            return [], self._instance_metadata(item), 0
        if state.layout is not None:
            reason = state.layout.reasons[index]
            if reason is not None:
                raise (Excluded if reason.startswith("left out") else MissingInstance)(reason)
            name = state.layout.names[index] or ""
        else:
            name = names.dicom_entry(folder, number)
        with self._payload(item, index) as (opened, final):
            dataset: Dataset | None = None
            if final:
                frames = frames_of(opened)
                entry = sink.add_file(name, opened.file, opened.size)
                # staged for the DICOMDIR, de-identified already: its values are the record's
                header = read_header(opened) if self._deid is not None else None
            else:  # de-identified here: the one path that encodes a data set again
                dataset = self._deidentified(read_dataset(opened))
                entry = sink.add_bytes(name, encode(dataset))
                header, frames = dataset, number_of_frames(dataset)
            written = [entry]
            rendered: list[str] = []
            if self._options.previews:
                if dataset is None:
                    dataset = read_dataset(opened)
                for frame, png in enumerate(self._render(dataset), start=1):
                    preview = sink.add_bytes(names.preview_entry(folder, number, frame), png)
                    written.append(preview)
                    rendered.append(preview.name)
        record = self._record(item, frames, written[0], tuple(rendered), header)
        return written, record, len(rendered)

    @contextmanager
    def _payload(self, item: select.Item, index: int) -> Iterator[tuple[Opened, bool]]:
        """The instance's bytes, and whether they are final (else they are to be
        de-identified). A file staged for the DICOMDIR is final: de-identified already."""
        staged = self._staging / f"{index}.dcm"
        if staged.is_file():
            with open(staged, "rb", buffering=0) as file:
                yield Opened(file, staged.stat().st_size, staged), True
            return
        with self._sources.open(item) as opened:
            yield opened, self._deid is None

    def _header_only(self, item: select.Item) -> Dataset | None:
        """The header of the spool's file, when it is there (metadata-only exports do not
        fetch anything back)."""
        if item.spool_path is None or item.remap_state in ("pending", "held"):
            return None
        try:
            return dcmread(self._sources.spool_path(item), stop_before_pixels=True)
        except (OSError, ValueError) as exc:
            log.warning("export %s: cannot read the header of %s: %s", self._plan.key,
                        item.sop_instance_uid, type(exc).__name__)
            return None

    def _frames_in_spool(self, item: select.Item) -> int | None:
        if item.spool_path is None or item.remap_state in ("pending", "held"):
            return None
        try:
            with open(self._sources.spool_path(item), "rb", buffering=0) as file:
                return frames_of(Opened(file, 0, self._sources.spool_path(item)))
        except (OSError, ValueError) as exc:
            log.warning("export %s: cannot read the header of %s: %s", self._plan.key,
                        item.sop_instance_uid, type(exc).__name__)
            return None

    def _deidentified(self, dataset: Dataset) -> Dataset:
        assert self._deid is not None
        done: Dataset | None = self._deid.apply(dataset)
        if done is None:
            raise Excluded("left out: its pixels may show burned-in text (Burned In Annotation "
                           "is YES) and deid_allow_burned_in is off")
        return done

    def _render(self, dataset: Dataset) -> list[bytes]:
        from gateway.export.preview import PreviewError, render_frames

        try:
            return render_frames(dataset, self._options.preview_max_size)
        except PreviewError as exc:
            self.previews_failed += 1
            log.info("export %s: no preview of %s: %s", self._plan.key,
                     dataset.get("SOPInstanceUID", "?"), exc)
            return []

    def _record(self, item: select.Item, frames: int | None, entry: Entry | None,
                previews: tuple[str, ...] = (), header: Dataset | None = None) -> Exported:
        """The instance as the archive shows it: the ledger's values, or the de-identified
        header's when the export de-identifies (the ledger holds the originals)."""
        record = Exported(
            sop_instance_uid=item.sop_instance_uid, study_instance_uid=item.study_instance_uid,
            series_instance_uid=item.series_instance_uid, sop_class_uid=item.sop_class_uid,
            instance_number=integer(item.instance_number),
            number_of_frames=frames,
            path=entry.name if entry else None, size=entry.size if entry else None,
            sha256=entry.sha256 if entry else None, orthanc_id=item.orthanc_id,
            previews=previews, patient_id=item.patient_id, patient_name=item.patient_name,
            birth_date=item.birth_date, sex=item.sex, study_date=item.study_date,
            study_time=item.study_time, study_description=item.study_description,
            accession_number=item.accession_number, modality=item.modality)
        if self._deid is None:
            return record
        assert header is not None
        return replace(
            record, sop_instance_uid=str(header.SOPInstanceUID),
            study_instance_uid=str(header.StudyInstanceUID),
            series_instance_uid=str(header.SeriesInstanceUID),
            sop_class_uid=str(header.SOPClassUID),
            instance_number=integer(header.get("InstanceNumber")),
            orthanc_id=None,  # Orthanc's ID names the original, not this object
            patient_id=text(header, "PatientID"), patient_name=text(header, "PatientName"),
            birth_date=text(header, "PatientBirthDate"), sex=text(header, "PatientSex"),
            study_date=text(header, "StudyDate"), study_time=text(header, "StudyTime"),
            study_description=text(header, "StudyDescription"),
            accession_number=text(header, "AccessionNumber"), modality=text(header, "Modality"))

    def _missing(self, item: select.Item, reason: str) -> Missing:
        return Missing(self._uid(item.sop_instance_uid), self._uid(item.study_instance_uid),
                       self._uid(item.series_instance_uid), reason)

    def _uid(self, uid: str) -> str:
        return str(self._deid.replaced_uid(uid)) if self._deid is not None else uid

    def _folder(self, study_uid: str) -> str:
        if self._archive.kind == "study":
            return ""
        return names.study_folder(self._uid(study_uid))

    # -- what follows the instances ---------------------------------------------------------------

    def _trailing(self, sink: Sink, state: Progress, entries: list[Entry]) -> list[Entry]:
        """Key images, each study's JSON (patient archives), the archive's JSON, the DICOMDIR."""
        added: list[Entry] = []

        def add(name: str, data: bytes) -> None:
            added.append(sink.add_bytes(name, data))

        studies = [self._uid(uid) for uid in self._archive.studies]
        folders = {self._uid(uid): self._folder(uid) for uid in self._archive.studies}
        for original, study in zip(self._archive.studies, studies):
            if self._options.key_image:
                key = self._key_image(state, original)
                if key is not None:
                    add(folders[study] + "image.jpg", key[0])
                    add(folders[study] + "metadata.json", key[1])
            if self._archive.kind == "patient":
                add(folders[study] + "study_data.json", self._document(
                    state, [study], {study: ""}, {study}))
        top = "study_data.json" if self._archive.kind == "study" else "patient_data.json"
        add(top, self._document(state, studies, folders, set(studies)))
        if state.layout is not None:
            add("DICOMDIR", state.layout.dicomdir)
        return added

    def _document(self, state: Progress, studies: list[str], folders: dict[str, str],
                  keep: set[str]) -> bytes:
        value = metadata.document(
            studies, folders,
            [e for e in state.exported if e.study_instance_uid in keep],
            [m for m in state.missing if m.study_instance_uid in keep],
            About(self._plan.actor, self._plan.created_at, self._images,
                  self._images and self._options.previews, self._deid is not None,
                  self._generator))
        return metadata.encode(value)

    def _key_image(self, state: Progress, study: str) -> tuple[bytes, bytes] | None:
        """The study's middle instance (in archive order) rendered, and its metadata (the
        one-click export of a viewer)."""
        from gateway.export.preview import PreviewError, key_image_jpeg

        members = [i for i, item in enumerate(state.items) if item.study_instance_uid == study]
        if not members:
            return None
        index = members[len(members) // 2]
        try:
            with self._payload(state.items[index], index) as (opened, final):
                dataset: Dataset = read_dataset(opened)
                if not final:
                    dataset = self._deidentified(dataset)
            jpeg = key_image_jpeg(dataset, self._options.preview_max_size)
        except PreviewError as exc:
            self.previews_failed += 1
            log.info("export %s: no key image for study %s: %s", self._plan.key, study, exc)
            return None
        except MissingInstance as exc:
            if not self._options.allow_partial:
                raise ExportFailed(describe_missing(
                    [(state.items[index].sop_instance_uid, exc.reason)],
                    self._archive.label)) from None
            return None
        about = {key: text(dataset, keyword) for key, keyword in KEY_IMAGE_METADATA}
        about["exportedAt"] = self._plan.created_at.isoformat(timespec="seconds")
        return jpeg, metadata.encode(about)

    # -- DICOMDIR -----------------------------------------------------------------------------------

    def _layout(self, found: Sequence[select.Item]) -> Layout:
        """PS3.10 file IDs and the DICOMDIR for the instances that can be had (with their
        de-identified headers when the export de-identifies, staged in the work folder)."""
        from gateway.export.dicomdir import media_layout

        files: list[tuple[Path, Dataset]] = []
        where: list[int] = []
        reasons: list[str | None] = []
        self._staging.mkdir(parents=True, exist_ok=True)
        for index, item in enumerate(found):
            try:
                path = self._stage(item, index)
            except MissingInstance as exc:
                if not self._options.allow_partial and not isinstance(exc, Excluded):
                    raise ExportFailed(describe_missing([(item.sop_instance_uid, exc.reason)],
                                                        self._archive.label)) from None
                reasons.append(exc.reason)
                continue
            reasons.append(None)
            files.append((path, dcmread(path, stop_before_pixels=True)))
            where.append(index)
        made = media_layout(files)
        layout_names: list[str | None] = [None] * len(found)
        for index, name in zip(where, made.names):
            layout_names[index] = name
        return Layout(tuple(layout_names), made.dicomdir, tuple(reasons))

    def _stage(self, item: select.Item, index: int) -> Path:
        """A path to the instance's final bytes: the spool's file, or a staged copy (fetched
        back, or de-identified)."""
        with self._sources.open(item) as opened:
            if self._deid is None and opened.path is not None:
                return opened.path
            staged = self._staging / f"{index}.dcm"
            if self._deid is None:
                with open(staged, "wb") as out:
                    shutil.copyfileobj(opened.file, out, COPY_CHUNK)
            else:
                with open(staged, "wb") as out:
                    out.write(encode(self._deidentified(read_dataset(opened))))
            return staged

    # -- JSON only ------------------------------------------------------------------------------

    def _json_only(self, state: Progress) -> Built:
        exported: list[Exported] = []
        missing: list[Missing] = []
        for item in state.items:
            try:
                exported.append(self._instance_metadata(item))
            except Excluded as exc:
                missing.append(self._missing(item, exc.reason))
            self._advance(1, 0, False)
        state.exported, state.missing = exported, missing
        studies = [self._uid(uid) for uid in self._archive.studies]
        folders = {uid: "" for uid in studies}
        data = self._document(state, studies, folders, set(studies))
        with open(self.part, "wb") as out:
            out.write(data)
            out.flush()
            os.fsync(out.fileno())
        return Built(self.part, hashlib.sha256(data).hexdigest(), len(data), len(exported),
                     tuple(missing), 0, 0)

    def _instance_metadata(self, item: select.Item) -> Exported:
        """Metadata only: the ledger's values (de-identified, with the file's header when it
        is at hand) and the number of frames when the file is."""
        if self._deid is None:
            return self._record(item, self._frames_in_spool(item), None)
        header = self._header_only(item)
        frames = number_of_frames(header) if header is not None else None
        deidentified = self._deidentified(header if header is not None else ledger_dataset(item))
        return self._record(item, frames, None, (), deidentified)


# -- helpers --------------------------------------------------------------------------------------

def resolved(sink: Sink, entries: list[Entry],
             exported: list[Exported]) -> tuple[list[Entry], list[Exported]]:
    """Entries and records with their SHA-256, which a ZIP's hasher computes behind the writer
    (waits for it)."""
    entries = [sink.resolve(e) for e in entries]
    digests = {e.name: e.sha256 for e in entries}
    return entries, [replace(x, sha256=digests[x.path])
                     if x.path is not None and not x.sha256 else x for x in exported]


def numbering(items: Sequence[select.Item]) -> list[int]:
    """Each item's number within its study, from 1, in archive order."""
    seen: dict[str, int] = {}
    result = []
    for item in items:
        seen[item.study_instance_uid] = seen.get(item.study_instance_uid, 0) + 1
        result.append(seen[item.study_instance_uid])
    return result


def manifest(entries: Sequence[Entry], missing: Sequence[Missing]) -> bytes:
    """``sha256sum`` format: every entry before the manifest; missing instances as comment
    lines (``sha256sum -c`` skips lines starting with ``#``)."""
    lines = [f"{e.sha256}  {e.name}\n" for e in entries]
    lines += [f"# missing {m.sop_instance_uid} (study {m.study_instance_uid}): {m.reason}\n"
              for m in missing]
    return "".join(lines).encode("utf-8")


def describe_missing(problems: Sequence[tuple[str, str]], label: str) -> str:
    shown = "; ".join(f"{uid}: {reason}" for uid, reason in problems[:SHOWN_MISSING])
    more = f"; and {len(problems) - SHOWN_MISSING} more" if len(problems) > SHOWN_MISSING else ""
    return (f"{label}: {len(problems)} instance(s) cannot be exported: {shown}{more}; export "
            "with allow_partial (--allow-partial) to write the rest and list these as missing")


def frames_of(opened: Opened) -> int:
    """Number of frames from the file's first bytes (``gateway.export.frames``), or from
    pydicom when those do not settle it. The file's position is left at its start."""
    try:
        head = os.pread(opened.file.fileno(), HEAD_BYTES, 0)
    except (AttributeError, OSError, io.UnsupportedOperation):  # in memory (fetched back)
        opened.file.seek(0)
        head = opened.file.read(HEAD_BYTES)
        opened.file.seek(0)
    found = frames_in_head(head, complete=len(head) < HEAD_BYTES)
    if found is not None:
        return found
    source = opened.path if opened.path is not None else opened.file
    header = dcmread(source, stop_before_pixels=True, specific_tags=FRAME_TAGS)
    opened.file.seek(0)
    return number_of_frames(header)


def read_header(opened: Opened) -> Dataset:
    if opened.path is not None:
        return dcmread(opened.path, stop_before_pixels=True)
    opened.file.seek(0)
    header = dcmread(opened.file, stop_before_pixels=True)
    opened.file.seek(0)
    return header


def read_dataset(opened: Opened) -> Dataset:
    """The whole data set, read by name when it is a file (the data set then refers to no open
    file of ours, and copies cleanly)."""
    if opened.path is not None:
        return dcmread(opened.path)
    opened.file.seek(0)
    dataset = dcmread(opened.file)
    opened.file.seek(0)
    return dataset


def number_of_frames(header: Dataset) -> int:
    """Number of Frames (PS3.3 C.7.6.6) when given, else 1 for an image (it has Rows) and 0 for
    an object without pixels (SR, KOS, ...)."""
    frames = integer(header.get("NumberOfFrames"))
    if frames is not None and frames >= 0:
        return frames
    return 1 if "Rows" in header else 0


def integer(value: Any) -> int | None:
    try:
        return int(str(value).strip()) if value is not None and str(value).strip() else None
    except ValueError:
        return None


def text(dataset: Dataset, keyword: str) -> str | None:
    value = dataset.get(keyword)
    if value is None or value == "":
        return None
    if isinstance(value, (list, tuple)) or type(value).__name__ == "MultiValue":
        return "\\".join(str(v) for v in value)
    return str(value)


def encode(dataset: Dataset) -> bytes:
    buffer = BytesIO()
    dcmwrite(buffer, dataset, enforce_file_format=True)
    return buffer.getvalue()


def ledger_dataset(item: select.Item) -> Dataset:
    """A header made of the ledger's values, for de-identifying metadata without the file."""
    ds = Dataset()
    ds.SOPInstanceUID = item.sop_instance_uid
    ds.SOPClassUID = item.sop_class_uid
    ds.StudyInstanceUID = item.study_instance_uid
    ds.SeriesInstanceUID = item.series_instance_uid
    for keyword, value in (("PatientID", item.patient_id), ("PatientName", item.patient_name),
                           ("PatientBirthDate", item.birth_date), ("PatientSex", item.sex),
                           ("AccessionNumber", item.accession_number),
                           ("StudyDate", item.study_date), ("StudyTime", item.study_time),
                           ("StudyDescription", item.study_description),
                           ("Modality", item.modality), ("SeriesNumber", item.series_number),
                           ("InstanceNumber", item.instance_number)):
        if value is not None:
            setattr(ds, keyword, value)
    return ds


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path)
    else:
        path.unlink(missing_ok=True)

