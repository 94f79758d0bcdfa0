"""Background stages (forwarding, rewriting) in child processes of their own.

Why: one Python process runs on one core at a time. A stage running in the receiver's process
(its threads, its database claims and settlements, its pool traffic) takes CPU and the GIL from
the C-STORE handler, and the modality waits for work that is not its own. In a child process a
stage uses the other core; the two share only the database, where the stage's work queue lives
anyway (the outbox, the pending rewrites).

Every receiver process wakes the child after each recorded instance (a ``Doorbell``; many wakes
coalesce into one) and receives its metric updates over a queue (it owns ``/metrics``). The child
is forked before any thread of the parent starts, dies with the parent (``PR_SET_PDEATHSIG``), and
is started again if it dies alone: its queue is in the database, so nothing is lost.

A configuration reload (``replace``) stops the child as SIGTERM would (it finishes or releases
what it claimed, within the grace period) and only then starts one built from the new
configuration: never two children of one stage at once, so a job is neither lost (its claim is
settled or released by the old child, or lapses as after a crash) nor done twice.
"""

from __future__ import annotations

import logging
import multiprocessing
import os
import queue
import select
import signal
import threading
from collections.abc import Callable
from typing import Any, Protocol

from gateway.lifetime import die_with_parent, name_process

log = logging.getLogger(__name__)
WATCH_S = 1.0
GATHER_S = 0.1


class Doorbell:
    """A wake-up that any process forked after it may ring: one byte into a non-blocking pipe.
    A write takes no lock, so a receiver process killed while ringing leaves nothing held (a
    multiprocessing Event's lock would stay held, stalling every other receiver and the stage);
    a full pipe means it is rung already."""

    def __init__(self) -> None:
        self._read, self._write = os.pipe()
        os.set_blocking(self._read, False)
        os.set_blocking(self._write, False)

    def set(self) -> None:
        try:
            os.write(self._write, b"\0")
        except BlockingIOError:
            pass

    def wait(self, timeout_s: float) -> bool:
        ready, _, _ = select.select([self._read], [], [], timeout_s)
        return bool(ready)

    def clear(self) -> None:
        try:
            while os.read(self._read, 4096):
                pass
        except BlockingIOError:
            pass


class Stage(Protocol):
    def start(self) -> None: ...
    def wake(self) -> None: ...
    def stop(self, timeout_s: float) -> None: ...


# Runs in the child: builds the stage (its own database engine included) given the queue on
# which the child's metric updates travel.
StageFactory = Callable[[Any], Stage]


class StageProcess:
    def __init__(
        self,
        name: str,
        build: StageFactory,
        niceness: int,
        stop_timeout_s: float,
        on_message: Callable[[Any], None] = lambda message: None,
    ) -> None:
        # fork: the child inherits the built configuration and spool (with a test's injected free
        # space function, which would not pickle); it starts before the receiver's threads do.
        self._ctx = multiprocessing.get_context("fork")
        self._name = name
        self._build = build
        self._niceness = niceness
        self._stop_timeout_s = stop_timeout_s
        self._on_message = on_message
        self._wake = Doorbell()
        self._stop = self._ctx.Event()
        self._messages: Any = self._ctx.Queue()
        self._process: Any = None
        self._stopping = threading.Event()
        self._lock = threading.Lock()  # the watch thread does not restart a child being replaced
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        self._spawn()
        for target, role in ((self._drain, "messages"), (self._watch, "watch")):
            thread = threading.Thread(target=target, name=f"{self._name}-{role}", daemon=True)
            thread.start()
            self._threads.append(thread)

    def notify(self, *_: object) -> None:
        self._wake.set()

    def alive(self) -> bool:
        return self._process is not None and self._process.is_alive()

    def stop(self) -> None:
        self._stopping.set()
        self._end_child()
        for thread in self._threads:
            thread.join(WATCH_S * 2)

    def replace(self, build: StageFactory) -> None:
        """Stop the child (as on SIGTERM), then start one made by ``build``. The wake-up pipe
        and the message queue stay: the receivers forked before keep ringing this stage."""
        with self._lock:
            if self._stopping.is_set():
                return
            self._end_child()
            self._stop.clear()
            self._build = build
            self._spawn()
            self._wake.set()  # whatever was rung while no child listened
        log.info("%s process replaced (pid %d)", self._name, self._process.pid)

    def _end_child(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._process is not None:
            self._process.join(self._stop_timeout_s + 5)
            if self._process.is_alive():
                log.warning("%s process did not stop in time; killing it", self._name)
                self._process.kill()
                self._process.join(5)

    def _spawn(self) -> None:
        self._process = self._ctx.Process(
            target=_child_main,
            args=(self._name, self._build, self._niceness, self._stop_timeout_s, self._stop, self._wake,
                  self._messages),
            name=f"gateway-{self._name}",
            daemon=False,  # it may have children of its own (the rewrite pool); it dies with us
        )
        self._process.start()

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_S):
            with self._lock:
                if not self._process.is_alive() and not self._stopping.is_set():
                    log.error("%s process exited (code %s); starting another", self._name,
                              self._process.exitcode)
                    self._spawn()

    def _drain(self) -> None:
        while True:
            try:
                message = self._messages.get(timeout=WATCH_S)
            except queue.Empty:
                if self._stopping.is_set() and not self.alive():
                    return
                continue
            except (EOFError, OSError):
                return
            self._on_message(message)


def _child_main(name: str, build: StageFactory, niceness: int, stop_timeout_s: float, stop: Any,
                wake: Any, messages: Any) -> None:
    die_with_parent()
    name_process(f"gw-{name}")
    os.nice(niceness)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the parent to handle
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the parent's to do
    code = 0
    try:
        stage = build(messages)
        stage.start()
        while not stop.is_set():
            if wake.wait(WATCH_S):
                # Let a few instances gather: one claim for several, not one per instance, and
                # fewer write transactions competing with the receiver's commits.
                stop.wait(GATHER_S)
                wake.clear()
                stage.wake()
        stage.stop(stop_timeout_s)
    except BaseException:
        log.exception("background stage failed")
        code = 1
    finally:
        messages.close()
        messages.join_thread()
        # Not a normal exit: the parent's objects copied by fork (its database connections
        # among them) must not be finalised here, or they would close the parent's sockets.
        os._exit(code)
