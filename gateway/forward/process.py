"""The forward stage in a child process of its own.

Why: one Python process runs on one core at a time. With the senders (HTTP, DIMSE, their claims
and settlements) in the receiver's process, forwarding took CPU and the GIL from the C-STORE
handler, and the modality waited on Orthanc after all. In a child process the forward stage uses
the second core; the two share only the database, which is the outbox anyway.

The parent wakes the child after each recorded instance (a multiprocessing Event) and receives its
metric updates over a queue (it owns ``/metrics``). The child dies with the parent (Linux
``PR_SET_PDEATHSIG``), so a killed gateway never leaves a sender behind; if the child dies alone,
the parent starts another, and the outbox's leases make whatever it held sendable again.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import signal
import threading
from typing import Any

from gateway.config import GatewayConfig
from gateway.db.engine import make_engine
from gateway.forward.counters import ForwardCounters, QueuedCounters, apply
from gateway.forward.outbox import Outbox
from gateway.forward.retention import Retention
from gateway.forward.service import Forwarder
from gateway.lifetime import die_with_parent
from gateway.receive.spool import Spool

log = logging.getLogger(__name__)
WATCH_S = 1.0
# Below the receiver: when both cores are busy, the modality waiting on a C-STORE comes first;
# the outbox absorbs what the senders fall behind.
FORWARD_NICENESS = 5


class ForwardProcess:
    def __init__(self, config: GatewayConfig, spool: Spool, counters: ForwardCounters) -> None:
        # fork: the child inherits the built configuration and spool (with a test's injected free
        # space function, which would not pickle); it starts before the receiver's threads do.
        self._ctx = multiprocessing.get_context("fork")
        self._config = config
        self._spool = spool
        self._counters = counters
        self._wake = self._ctx.Event()
        self._stop = self._ctx.Event()
        self._events: Any = self._ctx.Queue()
        self._process: Any = None
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._spawn()
        for target, name in ((self._drain, "forward-metrics"), (self._watch, "forward-watch")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)

    def notify(self) -> None:
        self._wake.set()

    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def stop(self, timeout_s: float) -> None:
        self._stopping.set()
        self._stop.set()
        self._wake.set()
        if self._process is not None:
            self._process.join(timeout_s + 5)
            if self._process.is_alive():
                log.warning("forward process did not stop in time; killing it")
                self._process.kill()
                self._process.join(5)
        for thread in self._threads:
            thread.join(WATCH_S * 2)

    def _spawn(self) -> None:
        self._process = self._ctx.Process(
            target=_child_main,
            args=(self._config, self._spool, self._stop, self._wake, self._events),
            name="gateway-forward",
            daemon=True,
        )
        self._process.start()

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_S):
            if not self._process.is_alive() and not self._stopping.is_set():
                log.error("forward process exited (code %s); starting another",
                          self._process.exitcode)
                self._spawn()

    def _drain(self) -> None:
        while True:
            try:
                message = self._events.get(timeout=WATCH_S)
            except queue.Empty:
                if self._stopping.is_set() and not self.alive():
                    return
                continue
            except (EOFError, OSError):
                return
            apply(self._counters, message)


def _child_main(config: GatewayConfig, spool: Spool, stop: Any, wake: Any, events: Any) -> None:
    """Runs in the child: build the forward stage on its own database engine, run until told."""
    die_with_parent()
    os.nice(FORWARD_NICENESS)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the parent to handle
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    code = 0
    try:
        # A job's progress lost to a power cut means a repeated send, which every destination
        # takes idempotently; its creation was made durable with the instance, by the receiver.
        engine = make_engine(config.database.url, config.database.busy_timeout_s, durable=False)
        outbox = Outbox(engine, spool.root, config.forward.node_name)
        # Removing files is not to be redone or undone by a power cut: durable commits there.
        retention = Retention(make_engine(config.database.url, config.database.busy_timeout_s),
                              spool, config.retention)
        forwarder = Forwarder(config, outbox, retention, QueuedCounters(events))
        forwarder.start()
        while not stop.is_set():
            if wake.wait(WATCH_S):
                wake.clear()
                forwarder.notify()
        forwarder.stop(config.dicom.shutdown_grace_s)
        engine.dispose()
    except BaseException:
        log.exception("forward process failed")
        code = 1
    finally:
        events.close()
        events.join_thread()
        # Not a normal exit: the parent's objects copied by fork (its database connections
        # among them) must not be finalised here, or they would close the parent's sockets.
        os._exit(code)
