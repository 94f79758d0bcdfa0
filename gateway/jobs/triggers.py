"""When a job fires: APScheduler 3 triggers from ``cron`` (five fields, the crontab's) or
``every_s``, and the fire times the scheduler and the run ledger reason with.

Pure functions of their arguments (the arq idiom: ``next_run(previous, now)``), so the rules about
missed and duplicate runs are tested without sleeping. Cron times are the machine's local time, as an
operator writing "0 2 * * *" means; interval jobs fire on multiples of ``every_s`` since the epoch,
so every node of a cluster computes the same fire times.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from tzlocal import get_localzone

EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
# How far back ``last_fire`` looks for a cron expression's previous fire time: a year covers
# every five-field expression (the rarest is once a year, e.g. "0 0 29 2 *" aside).
_LOOKBACK = (timedelta(minutes=1), timedelta(hours=1), timedelta(days=1), timedelta(days=32),
             timedelta(days=367), timedelta(days=367 * 4 + 1))


def make_trigger(cron: str | None, every_s: float | None) -> Any:
    """ValueError (with the reason) for a cron expression APScheduler cannot read."""
    if cron is not None:
        return CronTrigger.from_crontab(cron, timezone=get_localzone())
    assert every_s is not None, "a job has cron or every_s (checked by the config model)"
    return IntervalTrigger(seconds=every_s, start_date=EPOCH, timezone=UTC)


def next_fire(trigger: Any, after: datetime) -> datetime | None:
    """The first fire time strictly after ``after``."""
    fire: datetime | None = trigger.get_next_fire_time(None, after + timedelta(microseconds=1))
    return fire


def last_fire(trigger: Any, now: datetime) -> datetime | None:
    """The latest fire time at or before ``now``; None when there was none in the lookback."""
    if isinstance(trigger, IntervalTrigger):
        period = trigger.interval.total_seconds()
        elapsed = (now - EPOCH).total_seconds()
        return EPOCH + timedelta(seconds=(elapsed // period) * period)
    for back in _LOOKBACK:
        fire = trigger.get_next_fire_time(None, now - back)
        if fire is not None and fire <= now:
            while (later := next_fire(trigger, fire)) is not None and later <= now:
                fire = later
            return fire
    return None


def missed(trigger: Any, last_run_for: datetime | None, now: datetime) -> datetime | None:
    """The fire time to run once at start, or None: the latest fire time since the job's last
    run (``last_run_for``, the fire time that run was for) that has no run. A job that never ran
    has missed nothing; several missed fire times make one run (coalesce)."""
    if last_run_for is None:
        return None
    latest = last_fire(trigger, now)
    if latest is None or latest <= last_run_for:
        return None
    return latest
