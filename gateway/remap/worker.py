"""Rewrites pending instances in worker processes, so the receiver keeps its core.

One thread feeds a process pool: instance ids arrive from the C-STORE handler after its commit,
and a sweep every ``SWEEP_S`` picks up what the queue cannot know about (instances pending from
before a restart, held instances whose study an operator has since assigned). Each rewrite is
claimed in the database first, so an operator's command running at the same time never rewrites
the same file.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from pydicom import config as pydicom_config

from gateway.busy import BurstHold, ReceiverLoad
from gateway.config import GatewayConfig
from gateway.db.engine import make_engine
from gateway.lifetime import exit_when_gone, name_process
from gateway.remap.apply import RewrittenFile, rewrite_file
from gateway.remap.rules import load_rules
from gateway.remap.stage import Claimed, Remapper, Rewritten

log = logging.getLogger(__name__)
SWEEP_S = 2.0
SWEEP_NOW = -1  # on the queue: look in the database for pending instances now
IDLE_WAIT_S = 0.5
NICENESS = 10


def _init_process(gateway_pid: int) -> None:
    exit_when_gone(gateway_pid)  # the fork server is our parent; the gateway is who matters
    name_process("gw-rewriter")  # in top and ps, and in scripts/bench's CPU split by role
    # Rewriting is background work: the receiver (and the modality waiting on it) comes first.
    # SCHED_IDLE runs it only on CPU time nobody else wants; where that is unavailable, nice.
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except (AttributeError, OSError):
        os.nice(NICENESS)
    # As in the service: values that break VR rules must not stop a rewrite; structure must.
    pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE


class RemapWorker:
    def __init__(
        self, remapper: Remapper, spool_root: Path, processes: int,
        hold: BurstHold | None = None, max_defer_s: float = 0.0,
    ) -> None:
        self._hold = hold
        self._max_defer_s = max_defer_s
        self._remapper = remapper
        self._spool_root = spool_root
        self._processes = processes
        self._queue: queue.SimpleQueue[int] = queue.SimpleQueue()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool: ProcessPoolExecutor | None = None

    def notify(self, instance_id: int) -> None:
        self._queue.put(instance_id)

    def wake(self) -> None:
        """Look for pending instances now (from another process, ids do not travel)."""
        self._queue.put(SWEEP_NOW)

    def start(self) -> None:
        self._remapper.requeue_interrupted()
        if self._hold is not None:
            self._hold.start()
        self._pool = self._new_pool()
        self._thread = threading.Thread(target=self._run, name="remap-worker", daemon=True)
        self._thread.start()

    def _new_pool(self) -> ProcessPoolExecutor:
        # forkserver: the service has many threads, and forking them (the default) is unsafe.
        return ProcessPoolExecutor(
            self._processes,
            mp_context=multiprocessing.get_context("forkserver"),
            initializer=_init_process,
            initargs=(os.getpid(),),
        )

    def stop(self, timeout_s: float = 30.0) -> None:
        self._stopping.set()
        if self._hold is not None:
            self._hold.stop()
        if self._thread is not None:
            self._thread.join(timeout_s)
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)

    def _run(self) -> None:
        in_flight: dict[Future[RewrittenFile], Claimed] = {}
        waiting: dict[int, float] = {}  # instance id -> when it was first wanted
        next_sweep = 0.0
        while not self._stopping.is_set():
            wanted: list[int] = []
            if time.monotonic() >= next_sweep:
                next_sweep = time.monotonic() + SWEEP_S
                try:
                    self._remapper.release_held(self._spool_root)
                    wanted.extend(self._remapper.pending_ids())
                except Exception:
                    log.exception("remap sweep failed; retrying in %.0f s", SWEEP_S)
            arrived: list[int] = []  # the receiver recorded instances: their ids, or SWEEP_NOW
            try:
                block = not in_flight and not wanted and not waiting
                arrived.append(self._queue.get(timeout=IDLE_WAIT_S if block else 0.01))
                while True:
                    arrived.append(self._queue.get_nowait())
            except queue.Empty:
                pass
            now = time.monotonic()
            if arrived:
                wanted.extend(arrived)
            if SWEEP_NOW in wanted:
                wanted = [i for i in wanted if i != SWEEP_NOW]
                try:
                    wanted.extend(self._remapper.pending_ids())
                except Exception:
                    log.exception("remap: looking for pending instances failed")
            busy = {job.instance_id for job in in_flight.values()}
            for instance_id in wanted:
                if instance_id not in busy:
                    waiting.setdefault(instance_id, now)
            if waiting and self._may_start(now, min(waiting.values())):
                self._submit(list(waiting), in_flight)
                waiting.clear()
            if in_flight:
                done, _ = wait(list(in_flight), timeout=0.2, return_when=FIRST_COMPLETED)
                self._finish([(in_flight.pop(future), future) for future in done])

    def _may_start(self, now: float, oldest: float) -> bool:
        """Rewrites yield to a saturated receiver (``gateway.busy``): on two cores a rewrite
        running beside a burst of C-STOREs cost the modality a fifth of its rate (scripts/bench,
        receiver ``remap``). They start once it is not saturated, or once the oldest has waited
        ``max_defer_s``, so a receiver that is always saturated still gets its rewrites, in
        batches."""
        if self._hold is None or now - oldest >= self._max_defer_s:
            return True
        return not self._hold.saturated()

    def _submit(self, instance_ids: list[int],
                in_flight: dict[Future[RewrittenFile], Claimed]) -> None:
        assert self._pool is not None
        try:
            claimed = self._remapper.claim(instance_ids)
        except Exception:
            log.exception("could not claim %d instance(s) for rewriting; the sweep retries",
                          len(instance_ids))
            return
        for job in claimed:
            future = self._pool.submit(
                rewrite_file, self._spool_root / job.spool_path, job.changes, job.why
            )
            in_flight[future] = job

    def _finish(self, done: list[tuple[Claimed, Future[RewrittenFile]]]) -> None:
        results = []
        broken = []
        for job, future in done:
            instance_id = job.instance_id
            error = future.exception()
            if isinstance(error, BrokenProcessPool):
                broken.append(instance_id)  # the process died, not the rewrite: do it again
            elif error is None:
                kept = future.result()
                results.append(Rewritten(instance_id, job.spool_path, kept.size_bytes,
                                         sha256=kept.sha256))
            else:
                log.error("rewrite of instance %d failed: %s", instance_id, type(error).__name__)
                results.append(Rewritten(instance_id, job.spool_path, None,
                                         f"{type(error).__name__}: {error}"))
        if broken:
            log.error("a rewrite process died; starting a new pool and retrying %d rewrite(s)",
                      len(broken))
            assert self._pool is not None
            self._pool.shutdown(wait=False, cancel_futures=True)
            self._pool = self._new_pool()
            try:
                self._remapper.requeue_interrupted(broken)
            except Exception:
                log.exception("could not requeue %d rewrite(s); a restart does", len(broken))
        try:
            self._remapper.finish(results)
        except Exception:
            log.exception("could not record %d rewrite(s); they are done again after a restart",
                          len(results))


def remap_stage(
    config: GatewayConfig, spool_root: Path, load: ReceiverLoad | None = None
) -> Callable[[Any], RemapWorker]:
    """What the remap process builds, in the child: the rules, its own engine, the worker.

    Rewrite states commit without fsync there: one lost to a power cut is done again, and a
    rewrite is idempotent."""

    def build(messages: Any) -> RemapWorker:
        assert config.remap.rules_file is not None
        engine = make_engine(config.database.url, config.database.busy_timeout_s, durable=False)
        remapper = Remapper(load_rules(config.remap.rules_file), config.remap, engine,
                            node=config.forward.node_name)
        hold = None
        if load is not None:
            hold = BurstHold(load, config.remap.max_defer_s, lambda: datetime.now(UTC))
        return RemapWorker(remapper, spool_root, config.remap.workers, hold,
                           config.remap.max_defer_s)

    return build
