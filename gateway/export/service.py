"""Exports put together from the configuration, for ``gateway export`` and the ``export`` job
kind: the sources (spool, then the Orthanc destinations), the selection, the reporters.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO

from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from gateway.cluster.peers import make_peers
from gateway.config import ExportJob, GatewayConfig, OrthancDestination
from gateway.db.models import JobRun
from gateway.export import select as select_sites
from gateway.export.build import ExportFailed
from gateway.export.progress import CountsReporter, LineReporter, Reporter, Reporters
from gateway.export.run import (
    Exporter,
    ExportMetrics,
    ExportReport,
    ExportRequest,
    expire,
)
from gateway.export.sources import Sources
from gateway.query.retrieve import Loader

MIB = 1024 * 1024
# "new since the last successful run" starts a little before that run began: an instance
# received just before it, whose transaction committed just after it read the ledger, is not
# lost (its study is exported again, which replaces the archive with a whole one).
NEW_SINCE_OVERLAP = timedelta(minutes=5)


def make_sources(config: GatewayConfig) -> Sources:
    def loader() -> Loader:
        from gateway.forward.destinations.orthanc import Orthanc

        orthancs = {d.name: Orthanc(d) for d in config.forward.destinations
                    if isinstance(d, OrthancDestination)}
        return Loader(config.storage.spool_dir, orthancs, config.forward.node_name,
                      make_peers(config))

    return Sources(config.storage.spool_dir, loader)


def run_job(config: GatewayConfig, job: ExportJob, sessions: Callable[[], Session], node: str,
            clock: Callable[[], datetime], progress: Callable[[str], None],
            metrics: ExportMetrics | None = None) -> dict[str, int]:
    """One run of an ``export`` job: first the export a previous run left unfinished (from its
    checkpoint), then this run's selection; archives older than ``keep_days`` go afterwards.
    Raises ``ExportFailed`` when an archive failed (the others are written)."""
    since = None
    if job.select.new_since_last_run:
        last = last_success(sessions, job.name)
        since = last - NEW_SINCE_OVERLAP if last is not None else None
    reporter = Reporters([LineReporter(progress),
                          CountsReporter(running_counts(sessions, job.name, node))])
    exporter = Exporter(sessions, make_sources(config), reporter, clock, metrics,
                        checkpoint_bytes=job.checkpoint_mb * MIB)
    sites = (select_sites.site_scope(config.site(name) for name in job.select.sites)
             if job.select.sites else None)
    report = exporter.run(ExportRequest(
        key=f"job-{job.name}", actor=f"job:{job.name}", what="job", selector=job.select,
        per=job.per, options=job.options, destination=job.destination, job=job.name,
        since=since, then_plan_again=True, sites=sites))
    counts = report.counts()
    if job.keep_days is not None:
        counts["expired"] = expire(job.destination, job.keep_days, clock())
    if report.failed:
        first = report.failed[0]
        raise ExportFailed(f"{len(report.failed)} of {len(report.archives)} archive(s) failed "
                           f"({counts['archives']} written); {first.error}")
    return counts


def last_success(sessions: Callable[[], Session], job: str) -> datetime | None:
    from gateway.jobs.ledger import _aware

    with sessions() as session:
        found = session.scalar(select(func.max(JobRun.started_at)).where(
            JobRun.job == job, JobRun.outcome == "success"))
    return _aware(found) if found is not None else None


def running_counts(sessions: Callable[[], Session], job: str,
                   node: str) -> Callable[[dict[str, int]], None]:
    """Writes counts into this node's running run of ``job`` (its newest), which ``gateway
    jobs`` shows; the runner writes the final counts when the run ends."""

    def write(counts: dict[str, int]) -> None:
        with sessions() as session:
            newest = select(func.max(JobRun.id)).where(
                JobRun.job == job, JobRun.node == node, JobRun.outcome == "running"
            ).scalar_subquery()
            session.execute(update(JobRun).where(JobRun.id == newest)
                            .values(counts=json.dumps(counts, sort_keys=True)))
            session.commit()

    return write


def report_lines(report: ExportReport) -> list[str]:
    """What ``gateway export`` prints at the end: each archive's path and SHA-256 (or why it
    failed). Operator output: archive names may hold a sanitised Patient ID."""
    lines = []
    for outcome in report.archives:
        if outcome.outcome == "success":
            lines.append(f"{outcome.path}  sha256 {outcome.sha256}  {outcome.instances} "
                         f"instance(s), {outcome.size} bytes"
                         + (f", {outcome.missing} missing" if outcome.missing else ""))
        else:
            lines.append(f"{outcome.archive.name}: not written: {outcome.error}")
    return lines


def cli_reporter(stream: IO[str], emit: Callable[[str], None]) -> Reporter:
    from gateway.export.progress import for_stream

    return for_stream(stream, emit)


def destination_or_cwd(out: Path | None) -> Path:
    return (out or Path.cwd()).resolve()
