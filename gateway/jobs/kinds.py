"""What each job ``kind`` does: one function per kind, given the job's config and what it needs.

A kind returns its counts (shown by ``gateway jobs``, kept in ``job_runs.counts``) and reports
progress as lines (``gateway jobs run`` prints them; the scheduler logs them at DEBUG). Counts and
lines carry file names and numbers, never patient values.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy.orm import Session

from gateway.config import ExportJob, GatewayConfig, Job, OrderFolderJob, WorklistBuildJob
from gateway.jobs.order_folder import run_order_folder


@dataclass(frozen=True)
class JobContext:
    config: GatewayConfig
    sessions: Callable[[], Session]
    node: str
    clock: Callable[[], datetime]
    progress: Callable[[str], None]
    # gateway.metrics.Metrics in the gateway process (exports count their archives there);
    # None for ``gateway jobs run``, whose process nobody scrapes.
    metrics: Any = None


JobFunction = Callable[[JobContext, Job], dict[str, int]]


def _order_folder(context: JobContext, job: Job) -> dict[str, int]:
    assert isinstance(job, OrderFolderJob)
    report = run_order_folder(context.sessions, job, f"job:{job.name}", context.clock())
    for line in report.lines:
        context.progress(line)
    return report.counts()


def _worklist_build(context: JobContext, job: Job) -> dict[str, int]:
    assert isinstance(job, WorklistBuildJob)
    from gateway.worklist.build import build_worklist

    report = build_worklist(context.sessions, context.config.worklist,
                            context.config.remap.uid_root, context.clock(), f"job:{job.name}")
    for line in report.lines:
        context.progress(line)
    return report.counts()
def _export(context: JobContext, job: Job) -> dict[str, int]:
    """Archives of the selected studies (gateway.export); an interrupted run's export is
    continued first, from its last checkpoint."""
    from gateway.export.service import run_job

    assert isinstance(job, ExportJob)
    return run_job(context.config, job, context.sessions, context.node, context.clock,
                   context.progress, context.metrics)


KINDS: dict[str, JobFunction] = {
    "order_folder": _order_folder,
    "worklist_build": _worklist_build,
    "export": _export,
}
