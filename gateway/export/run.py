"""One export from request to archives in place: plan, build each archive, put it in place
atomically, record it (an ``audit_events`` row per archive, metrics), and continue an
interrupted one first.

No half archive is ever visible: an archive is built in the hidden work folder
(``<destination>/.export-<key>/``), synced, then renamed to its name in the destination (a
folder export replaces an older folder of the same name in two renames). An archive of the same
name already there (the same study exported again) is replaced whole.

Failures come in two kinds. The content cannot be exported as asked (instances missing, an
option this build lacks): that archive fails, is recorded, its temporary files go, and the other
archives are still made. The machine failed (disk full, database away, the process killed): the
export stops where it is, its work folder stays, and the next run with the same key continues
from the last checkpoint.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import logging
import os
import re
import secrets
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, Protocol

from sqlalchemy.orm import Session

from gateway import __version__, audit
from gateway.config import ExportOptions, ExportSelector
from gateway.errors import GatewayError
from gateway.export import names, select
from gateway.export.build import ArchiveBuilder, Built, ExportFailed, remove
from gateway.export.plan import ArchivePlan, ExportPlan, read_plan, write_plan
from gateway.export.progress import Reporter
from gateway.export.sinks import sync_folder
from gateway.export.sources import Sources

log = logging.getLogger(__name__)
CHECKPOINT_BYTES = 64 * 1024 * 1024
CHECKPOINT_S = 5.0
# Archive names an export writes (and ``keep_days`` may remove): nothing else is ever touched.
OWN_NAMES = re.compile(r"(study|patient)_[A-Za-z0-9._-]+_export(\.zip|\.json)?")


class ExportStopped(GatewayError):
    """The machine failed the export (disk full, unreadable spool): it stops, its work folder
    stays, and the next run continues it. The message names no path (paths may hold Patient
    IDs; this message reaches the log)."""


class ExportMetrics(Protocol):
    """The Prometheus side is ``gateway.metrics.Metrics``."""

    def export_finished(self, outcome: str, bytes: int, seconds: float) -> None: ...

    def previews_rendered(self, count: int) -> None: ...


@dataclass(frozen=True)
class ExportRequest:
    """What to export. ``key`` names the work folder: the same request, run again after an
    interruption, continues the same export. ``then_plan_again`` (scheduled jobs): after
    finishing an interrupted export, plan and run a new one too."""

    key: str
    actor: str
    what: str  # study | patient | accession | all | job (for the audit)
    selector: ExportSelector
    per: Literal["study", "patient"]
    options: ExportOptions
    destination: Path
    job: str | None = None
    since: datetime | None = None
    then_plan_again: bool = False
    force_zip64: bool = False
    # only studies every instance of which is in this scope (the API's token, a job's sites)
    sites: select.SiteScope | None = None


@dataclass(frozen=True)
class ArchiveOutcome:
    archive: ArchivePlan
    outcome: str  # success | failed
    path: Path | None
    sha256: str | None
    size: int
    instances: int
    missing: int
    previews: int
    error: str | None


@dataclass
class ExportReport:
    archives: list[ArchiveOutcome] = field(default_factory=list)
    resumed: int = 0  # exports continued from an interrupted run

    @property
    def failed(self) -> list[ArchiveOutcome]:
        return [a for a in self.archives if a.outcome != "success"]

    def counts(self) -> dict[str, int]:
        done = [a for a in self.archives if a.outcome == "success"]
        return {"archives": len(done), "archives_failed": len(self.failed),
                "instances": sum(a.instances for a in done),
                "missing": sum(a.missing for a in done),
                "bytes": sum(a.size for a in done), "previews": sum(a.previews for a in done),
                "resumed": self.resumed}


# ``on_final(archive, part, final, finished)``: the ZIP being built for ``archive`` (at ``part``,
# its temporary name) holds final bytes up to ``final`` (``gateway.export.sinks.FinalHook``);
# called on the export's thread. The export API streams them (gateway.web.stream).
ArchiveHook = Callable[[ArchivePlan, Path, int, bool], None]


class Exporter:
    def __init__(self, sessions: Callable[[], Session], sources: Sources,
                 reporter: Reporter, clock: Callable[[], datetime] = lambda: datetime.now(UTC),
                 metrics: ExportMetrics | None = None,
                 checkpoint_bytes: int = CHECKPOINT_BYTES,
                 checkpoint_s: float = CHECKPOINT_S,
                 on_final: ArchiveHook | None = None) -> None:
        self._sessions = sessions
        self._sources = sources
        self._reporter = reporter
        self._clock = clock
        self._metrics = metrics
        self._checkpoint_bytes = checkpoint_bytes
        self._checkpoint_s = checkpoint_s
        self._on_final = on_final

    def run(self, request: ExportRequest) -> ExportReport:
        """Continue the request's interrupted export, if any, then (the first time, or for a
        job) plan and run it. ``ExportFailed`` when the same export runs now elsewhere."""
        report = ExportReport()
        work = work_folder(request.destination, request.key)
        work.mkdir(parents=True, exist_ok=True)
        with held(work):
            try:
                pending = read_plan(work)
                if pending is None:
                    clear(work)  # cut before its plan was written: nothing was built
                else:
                    log.info("export %s: continuing an interrupted export", request.key)
                    report.resumed += 1
                    self._execute(pending, work, request.destination, report, request.sites)
                if pending is None or request.then_plan_again:
                    # a study the continued export just wrote is not written again by this run
                    just_done = {uid for a in report.archives if a.outcome == "success"
                                 for uid in a.archive.studies}
                    plan = self.plan(request, exclude=just_done)
                    if plan.archives:
                        write_plan(work, plan)
                        self._execute(plan, work, request.destination, report,
                                      request.sites)
            except BaseException:
                if not any(work.iterdir()):
                    work.rmdir()  # nothing to continue from
                raise
            work.rmdir()
            sync_folder(request.destination)
        return report

    def plan(self, request: ExportRequest, exclude: set[str] | None = None) -> ExportPlan:
        """The archives, each study's size, names made safe; nothing written yet."""
        now = self._clock()
        today = now.astimezone().date()
        with self._sessions() as session:
            uids = select.study_uids(session, request.selector, today, request.since,
                                     request.sites)
            if request.per == "patient" and (request.since or request.selector.study_date):
                uids = self._whole_patients(session, request.selector, today, uids,
                                            request.sites)
            uids = [uid for uid in uids if uid not in (exclude or set())]
            studies = select.summaries(session, uids)
        secret = secrets.token_hex(32) if request.options.deidentify else None
        deid = self._deidentifier(request.options, secret)
        archives: list[ArchivePlan] = []
        fmt = request.options.format
        if request.per == "study":
            for study in studies:
                uid = str(deid.replaced_uid(study.study_instance_uid)) if deid else \
                    study.study_instance_uid
                archives.append(ArchivePlan(
                    len(archives) + 1, names.archive_name(names.study_stem(uid), fmt), "study",
                    study.study_instance_uid, (study.study_instance_uid,), study.instances,
                    study.bytes))
        else:
            groups: dict[str | None, list[select.StudySummary]] = {}
            for study in studies:
                groups.setdefault(study.patient_id, []).append(study)
            for patient, members in groups.items():
                stem = (names.patient_stem(patient) if secret is None
                        else f"patient_{pseudonym(secret, patient)}_export")
                archives.append(ArchivePlan(
                    len(archives) + 1, names.archive_name(stem, fmt), "patient", patient,
                    tuple(s.study_instance_uid for s in members),
                    sum(s.instances for s in members), sum(s.bytes for s in members)))
        return ExportPlan(request.key, request.actor, request.what, request.job,
                          now.replace(microsecond=0), request.options, tuple(archives), secret,
                          request.force_zip64)

    @staticmethod
    def _whole_patients(session: Session, selector: ExportSelector, today: date,
                        uids: list[str], sites: select.SiteScope | None) -> list[str]:
        """Patient archives are replaced whole: the time criteria (``study_date``,
        ``new_since_last_run``) pick the patients, and each one's archive holds every study of
        theirs that the other criteria select, so that today's archive does not lose the
        studies last week's held."""
        patients = {s.patient_id for s in select.summaries(session, uids)}
        known = tuple(sorted(p for p in patients if p is not None))
        if not known:
            return uids
        wider = selector.model_copy(update={"study_date": None, "patients": known})
        return sorted(set(uids) | set(select.study_uids(session, wider, today, None, sites)))

    def _execute(self, plan: ExportPlan, work: Path, destination: Path,
                 report: ExportReport, sites: select.SiteScope | None = None) -> None:
        self._reporter.begin(len(plan.archives), sum(a.instances for a in plan.archives),
                             sum(a.bytes for a in plan.archives))
        try:
            deid = self._deidentifier(plan.options, plan.deid_secret)
        except ExportFailed as exc:
            for archive in plan.archives:
                report.archives.append(self._failed(plan, archive, str(exc), 0.0))
            deid = None
        else:
            for archive in plan.archives:
                self._reporter.archive(archive)
                try:
                    report.archives.append(self._one(plan, archive, work, destination, deid,
                                                     sites))
                except OSError as exc:  # the message would name paths: Patient IDs
                    raise ExportStopped(
                        f"{archive.label}: {exc.strerror or type(exc).__name__} (errno "
                        f"{exc.errno}); the next run continues from the last checkpoint"
                    ) from None
        self._reporter.end()
        clear(work)

    def _one(self, plan: ExportPlan, archive: ArchivePlan, work: Path, destination: Path,
             deid: Any | None, sites: select.SiteScope | None) -> ArchiveOutcome:
        started = time.monotonic()
        hook = self._on_final
        builder = ArchiveBuilder(
            plan, archive, work, self._sessions, self._sources, deid, self._reporter.advance,
            self._checkpoint_bytes, self._checkpoint_s, f"gateway {__version__}", sites,
            None if hook is None else lambda final, finished: hook(archive, builder.part, final,
                                                                    finished))
        state = builder.log.read()
        final = destination / archive.name
        if state is not None and state.finished is not None:  # built before the interruption
            built = Built(builder.part, state.finished["sha256"], int(state.finished["size"]),
                          int(state.finished["instances"]), tuple(state.missing),
                          int(state.finished["previews"]), 0)
            if state.audited:
                return self._outcome(archive, built, final)
            if builder.part.exists():
                place(builder.part, final, work)
        else:
            try:
                built = builder.build()
            except ExportFailed as exc:
                return self._failed(plan, archive, str(exc), time.monotonic() - started,
                                    builder)
            except ImportError as exc:
                return self._failed(plan, archive, f"this build lacks {exc.name}: export "
                                    "without the option that needs it", 0.0, builder)
            builder.log.finish({"sha256": built.sha256, "size": built.size,
                                "instances": built.instances, "previews": built.previews})
            place(builder.part, final, work)
        self._record(plan, archive, "success", final, built, None)
        builder.log.audited()
        seconds = time.monotonic() - started
        if self._metrics is not None:
            self._metrics.export_finished("success", built.size, seconds)
            self._metrics.previews_rendered(built.previews)
        line = (f"written, {built.instances} instance(s), {built.size} bytes, "
                f"sha256 {built.sha256}" + (f", {len(built.missing)} missing (listed in the "
                                            "manifest and the JSON)" if built.missing else ""))
        self._reporter.archive_done(archive, line)
        log.info("export %s: %s written: %d instance(s), %d missing, %d bytes in %.1f s",
                 plan.key, archive.label, built.instances, len(built.missing), built.size,
                 seconds)
        return self._outcome(archive, built, final)

    def _outcome(self, archive: ArchivePlan, built: Built, final: Path) -> ArchiveOutcome:
        return ArchiveOutcome(archive, "success", final, built.sha256, built.size,
                              built.instances, len(built.missing), built.previews, None)

    def _failed(self, plan: ExportPlan, archive: ArchivePlan, error: str, seconds: float,
                builder: ArchiveBuilder | None = None) -> ArchiveOutcome:
        if builder is not None:
            remove(builder.part)
            builder.log.path.unlink(missing_ok=True)
        self._record(plan, archive, "failed", None, None, error)
        if self._metrics is not None:
            self._metrics.export_finished("failed", 0, seconds)
        self._reporter.archive_done(archive, f"failed: {error}")
        log.warning("export %s: %s failed: %s", plan.key, archive.label, error)
        return ArchiveOutcome(archive, "failed", None, None, 0, 0, 0, 0, error)

    def _record(self, plan: ExportPlan, archive: ArchivePlan, outcome: str,
                final: Path | None, built: Built | None, error: str | None) -> None:
        """The audit row: who, what, options, counts, the archive's SHA-256, the outcome."""
        with self._sessions() as session:
            audit.record(
                session, plan.actor, "export",
                archive.studies[0] if archive.kind == "study" else None, self._clock(),
                export=plan.key, what=plan.what, job=plan.job, kind=archive.kind,
                subject=archive.subject, studies=list(archive.studies),
                options=plan.options.model_dump(mode="json"),
                archive=str(final) if final else archive.name,
                outcome=outcome, error=error, sha256=built.sha256 if built else None,
                bytes=built.size if built else 0, instances=built.instances if built else 0,
                missing=[m.sop_instance_uid for m in built.missing] if built else [],
                previews=built.previews if built else 0,
                exported_at=plan.created_at.isoformat())
            session.commit()

    def _deidentifier(self, options: ExportOptions, secret: str | None) -> Any | None:
        if not options.deidentify:
            return None
        assert secret is not None
        try:
            from gateway.export.deidentify import Deidentifier, DeidOptions
        except ImportError:
            raise ExportFailed("de-identification is not in this build "
                               "(gateway.export.deidentify); export without deidentify") from None
        return Deidentifier(DeidOptions(
            retain_longitudinal_temporal=options.deid_retain_longitudinal_temporal,
            clean_descriptors=options.deid_clean_descriptors,
            allow_burned_in=options.deid_allow_burned_in), bytes.fromhex(secret))


def place(part: Path, final: Path, work: Path) -> None:
    """Rename the finished archive into place, replacing one of the same name; then sync the
    destination so that the rename survives a crash."""
    if part.is_dir():
        old = work / (final.name + ".old")
        remove(old)
        if final.exists():
            os.rename(final, old)
        os.rename(part, final)
        remove(old)
    else:
        os.replace(part, final)
    sync_folder(final.parent)


@contextmanager
def held(work: Path) -> Iterator[None]:
    """An exclusive lock on the work folder while an export uses it: the same export started
    twice at once (an operator's command run again while it runs) is refused, not interleaved."""
    descriptor = os.open(work, os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise ExportFailed("this export is running now (in another process); wait for it "
                               "to end") from None
        yield
    finally:
        os.close(descriptor)


def clear(work: Path) -> None:
    """Empty the work folder (what a finished or never-planned export left)."""
    for path in work.iterdir():
        remove(path)


def work_folder(destination: Path, key: str) -> Path:
    return destination / f".export-{key}"


def request_key(*parts: object) -> str:
    """A key for a request made of its parts (an operator's command and its options)."""
    return hashlib.sha256(repr(parts).encode("utf-8")).hexdigest()[:16]


def pseudonym(secret: str, patient_id: str | None) -> str:
    """A de-identified patient archive's name part: an HMAC of the ID under the export's secret,
    the same for the patient's studies in this export and unrelated to the ID otherwise."""
    digest = hmac.new(bytes.fromhex(secret), (patient_id or "").encode("utf-8", "surrogatepass"),
                      hashlib.sha256).hexdigest()
    return f"anon{digest[:16]}"


def expire(destination: Path, keep_days: float, now: datetime) -> int:
    """Remove the export's own archives in ``destination`` older than ``keep_days``; return
    how many. Names an export never writes are left alone."""
    if not destination.is_dir():
        return 0
    cutoff = (now - timedelta(days=keep_days)).timestamp()
    removed = 0
    for path in destination.iterdir():
        if OWN_NAMES.fullmatch(path.name) and path.stat().st_mtime < cutoff:
            remove(path)
            removed += 1
    if removed:
        sync_folder(destination)
    return removed
