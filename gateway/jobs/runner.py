"""One run of one job: recorded, leased, timed, counted; the same for the scheduler and for
``gateway jobs run``.

A job's failure is the job's: it is caught here, at the boundary, recorded with its reason in
``job_runs`` and counted, and the next fire time tries again. The lease is renewed while the run
lasts, so a long run (an export) keeps it and a dead node's lapses.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Protocol

from gateway.config import Job
from gateway.jobs.kinds import KINDS, JobContext
from gateway.jobs.ledger import RunLedger

log = logging.getLogger(__name__)


class JobMetrics(Protocol):
    """What a run reports; the Prometheus side is ``gateway.metrics.Metrics.job_finished``."""

    def job_finished(self, job: str, outcome: str, seconds: float, at: float) -> None: ...


@dataclass(frozen=True)
class Outcome:
    run_id: int
    outcome: str  # success | failed
    counts: dict[str, int]
    error: str | None


class JobRunner:
    def __init__(self, ledger: RunLedger, context: JobContext,
                 metrics: JobMetrics | None = None, renew_every_s: float = 60.0) -> None:
        self._ledger = ledger
        self._context = context
        self._metrics = metrics
        self._renew_every_s = renew_every_s

    def run(self, job: Job, trigger: str, scheduled_for: datetime | None,
            progress: Callable[[str], None] | None = None) -> Outcome | None:
        """None when the job did not run: this fire time was run already, or it runs now."""
        run_id = self._ledger.begin(job.name, job.kind, trigger, scheduled_for)
        if run_id is None:
            log.info("job %s not started: already run for this time, or running now", job.name)
            return None
        log.info("job %s (%s) started, run %d (%s)", job.name, job.kind, run_id, trigger)
        stop = threading.Event()
        renewer = threading.Thread(target=self._renew, args=(job.name, run_id, stop),
                                   name=f"job-lease-{job.name}", daemon=True)
        renewer.start()
        started = time.monotonic()
        context = replace(self._context, progress=progress or self._context.progress)
        outcome, counts, error = "success", {}, None
        try:
            counts = KINDS[job.kind](context, job)
        except Exception as exc:  # noqa: BLE001 - the job's failure is recorded, not raised
            outcome, error = "failed", f"{type(exc).__name__}: {exc}"
            log.error("job %s run %d failed: %s", job.name, run_id, error)
        finally:
            stop.set()
            renewer.join()
            seconds = time.monotonic() - started
            self._ledger.finish(job.name, run_id, outcome, counts, error)
            if self._metrics is not None:
                self._metrics.job_finished(job.name, outcome, seconds, time.time())
        log.info("job %s run %d: %s in %.1f s %s", job.name, run_id, outcome, seconds,
                 " ".join(f"{k}={v}" for k, v in sorted(counts.items())))
        return Outcome(run_id, outcome, counts, error)

    def _renew(self, job: str, run_id: int, stop: threading.Event) -> None:
        while not stop.wait(self._renew_every_s):
            try:
                self._ledger.renew(job, run_id)
            except Exception as exc:  # noqa: BLE001 - a missed renewal is retried; logged
                log.warning("job %s: lease not renewed (%s)", job, type(exc).__name__)
