"""The scheduler: every enabled ``[[jobs]]`` entry on APScheduler 3, in the gateway process.

Started and stopped by the composition root. APScheduler keeps the fire times (``coalesce``, one
instance at a time); the run ledger decides whether a fire time runs here (once across nodes,
never twice at once). At start, runs this node left ``running`` are marked ``interrupted``, and a
job whose latest fire time passed while the gateway was down (since its last recorded run) runs
once, at once: several missed times make one run.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

from apscheduler.schedulers.background import BackgroundScheduler
from tzlocal import get_localzone

from gateway.config import Job
from gateway.jobs.ledger import RunLedger
from gateway.jobs.runner import JobRunner
from gateway.jobs.triggers import last_fire, make_trigger, missed

log = logging.getLogger(__name__)


class JobScheduler:
    def __init__(self, jobs: tuple[Job, ...], runner: JobRunner, ledger: RunLedger,
                 clock: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self._jobs = {j.name: j for j in jobs if j.enabled}
        self._triggers: dict[str, Any] = {j.name: make_trigger(j.cron, j.every_s)
                                          for j in self._jobs.values()}
        self._runner = runner
        self._ledger = ledger
        self._clock = clock
        self._scheduler: BackgroundScheduler | None = None

    def start(self, reloaded: bool = False) -> None:
        """``reloaded``: a scheduler replacing another in the same process (a configuration
        reload): a run the old one started still holds its lease and must not be marked
        interrupted, and no run was missed while the gateway was down."""
        if not self._jobs:
            return
        interrupted = 0 if reloaded else self._ledger.interrupted()
        if interrupted:
            log.warning("%d job run(s) were interrupted by the last stop", interrupted)
        scheduler = BackgroundScheduler(
            timezone=get_localzone(),
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": None},
        )
        now = self._clock()
        for name, trigger in self._triggers.items():
            scheduler.add_job(self._fire, trigger, args=[name], id=name, name=name)
            late = None if reloaded else missed(trigger, self._ledger.last_scheduled(name), now)
            if late is not None:
                log.info("job %s missed its run of %s while the gateway was down; running it now",
                         name, late.isoformat(timespec="minutes"))
                scheduler.add_job(self._run, "date", run_date=now, args=[name, "missed", late],
                                  id=f"{name}-missed")
        scheduler.start()
        self._scheduler = scheduler

    def stop(self) -> None:
        """Stop firing; a run in progress is left to end with the process (it is marked
        ``interrupted`` at the next start if it did not finish)."""
        if self._scheduler is not None:
            self._scheduler.shutdown(wait=False)
            self._scheduler = None

    def _fire(self, name: str) -> None:
        scheduled_for = last_fire(self._triggers[name], self._clock())
        self._run(name, "schedule", scheduled_for)

    def _run(self, name: str, trigger: str, scheduled_for: datetime | None) -> None:
        self._runner.run(self._jobs[name], trigger, scheduled_for)
