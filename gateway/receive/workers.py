"""Several receiver processes on one node (``dicom.workers``): one process accepts, each worker
runs the whole C-STORE path (and C-FIND/C-MOVE/C-GET, worklist, MPPS) on the sockets it is given.

Why one acceptor handing sockets over (``SCM_RIGHTS``) rather than ``SO_REUSEPORT`` or workers
sharing one listening socket: measured with ``scripts/measure_accept.py`` (4 concurrent
``storescu`` associations of 100 CT images, ``TCP_NODELAY=1``, loopback, 2 workers, 2026-12, a
2-core machine shared with other test suites, load average 3.4-5.2), over 13 repetitions:

==========  =============================  ==================
how         associations per worker         slowest sender
==========  =============================  ==================
reuseport   2:2 six times, 3:1 five, 4:0 two  median 1.84 s
shared      2:2 eight times, 3:1 five         median 1.65 s
handoff     2:2 every time                   median 1.60 s
==========  =============================  ==================

The kernel's ``SO_REUSEPORT`` hash spreads a few connections unevenly (3:1 and 4:0 leave a core
idle while the other runs three associations); workers racing for one socket do better but still
3:1 when one wins twice before the other wakes. The acceptor hands each connection to the worker
with the fewest open connections, so the spread is even whatever the timing. It costs one
``accept`` and one ``sendmsg`` per connection (not per instance) in the supervisor, and a worker
that dies drops only its own connections: none wait in a dead worker's accept queue.

Shared state lives in memory made before the workers fork (``WorkerBoard``). Each number is
written by one process only (the acceptor counts connections handed to a worker, that worker
counts them ended and counts its admitted associations), so no cross-process lock exists that a
killed worker could leave held. ``dicom.max_associations`` holds for the node: a worker reserves a
slot by adding one to its own count and reading the sum, and gives it back when the sum is over
the limit. Two requests racing for the last slot in two workers may both be refused (transient,
as any refusal at the limit), never both admitted.
"""

from __future__ import annotations

import fcntl
import logging
import multiprocessing
import os
import select
import signal
import socket
import struct
import termios
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol, cast

from pynetdicom.transport import ThreadedAssociationServer

from gateway.lifetime import die_with_parent, name_process
from gateway.receive.server import ReceiverServer

log = logging.getLogger(__name__)
ACCEPT_POLL_S = 0.2
WATCH_S = 0.2
EXTRA_STOP_S = 5.0
RETIRE_READ_S = 2.0


class Admissions(Protocol):
    """What a ``Receiver`` in a worker asks of the node-wide counts."""

    def take(self) -> bool: ...

    def give_back(self) -> None: ...

    def connection_ended(self) -> None: ...


class WorkerBoard:
    """Per worker slot: connections handed over, connections ended, associations admitted."""

    def __init__(self, workers: int) -> None:
        context = multiprocessing.get_context("fork")
        self.workers = workers
        self._handed: Any = context.RawArray("q", workers)
        self._ended: Any = context.RawArray("q", workers)
        self._admitted: Any = context.RawArray("q", workers)

    def open_connections(self, slot: int) -> int:
        return int(self._handed[slot] - self._ended[slot])

    def admitted(self) -> int:
        return int(sum(self._admitted))

    def handed(self, slot: int, count: int = 1) -> None:
        """In the acceptor's thread only."""
        self._handed[slot] += count

    def forget(self, slot: int) -> None:
        """The worker in ``slot`` is dead: nothing of its own is open any more."""
        self._ended[slot] = self._handed[slot]
        self._admitted[slot] = 0

    def admissions(self, slot: int, limit: int) -> SlotAdmissions:
        return SlotAdmissions(self, slot, limit)


class SlotAdmissions:
    """In a worker: its slot's counts, changed under one thread lock (its associations' threads
    admit and end concurrently)."""

    def __init__(self, board: WorkerBoard, slot: int, limit: int) -> None:
        self._board = board
        self._slot = slot
        self._limit = limit
        self._lock = threading.Lock()

    def take(self) -> bool:
        with self._lock:
            self._board._admitted[self._slot] += 1
            if self._board.admitted() <= self._limit:
                return True
            self._board._admitted[self._slot] -= 1
            return False

    def give_back(self) -> None:
        with self._lock:
            self._board._admitted[self._slot] -= 1

    def connection_ended(self) -> None:
        with self._lock:
            self._board._ended[self._slot] += 1


class Worker(Protocol):
    """What runs in a worker process: built there (its own database engines), started, and
    stopped with a grace period for the associations in flight."""

    def start(self) -> None: ...

    def stop(self, grace_s: float) -> None: ...


# Runs in the worker: given its slot and the Unix socket its connections arrive on.
WorkerFactory = Callable[[int, socket.socket], Worker]


class ReceiverWorkers:
    """The supervisor's side: the listening socket, the acceptor thread, and one process per
    slot, started again when it dies (``on_exit(pid, crashed)`` is told first, e.g. for
    metrics).

    Slots come in two halves of ``count``: the active half takes every new connection; on a
    configuration reload (``replace``) new processes start in the other half, the acceptor
    switches to them, and the old ones drain their associations (as on SIGTERM) and exit. The
    board has a number per slot of both halves, so old and new processes together hold
    ``dicom.max_associations``, and a draining process's associations count until they end."""

    def __init__(
        self,
        count: int,
        build: WorkerFactory,
        board: WorkerBoard,
        address: tuple[str, int],
        grace_s: float,
        on_exit: Callable[[int, bool], None] = lambda pid, crashed: None,
    ) -> None:
        assert board.workers >= 2 * count, "the board needs a slot per process of both halves"
        self._ctx = multiprocessing.get_context("fork")
        self._count = count
        self._build = build
        self._board = board
        self._address = address
        self._grace_s = grace_s
        self._on_exit = on_exit
        self._listener: socket.socket | None = None
        self._channels: list[socket.socket | None] = [None] * (2 * count)
        self._processes: list[Any] = [None] * (2 * count)
        self._base = 0  # the active half: slots base .. base + count - 1
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self.restarts = 0

    @property
    def address(self) -> tuple[str, int]:
        assert self._listener is not None, "listen() first"
        host, port = self._listener.getsockname()[:2]
        return str(host), int(port)

    def listen(self) -> None:
        """Bind now, so that a port in use fails ``serve`` before anything forks."""
        self._listener = socket.create_server(self._address, backlog=128)
        self._listener.setblocking(False)

    def start(self) -> None:
        if self._listener is None:
            self.listen()
        for slot in self._active():
            self._spawn(slot)
        for target, name in ((self._accept, "gateway-acceptor"), (self._watch, "workers-watch")):
            thread = threading.Thread(target=target, name=name, daemon=True)
            thread.start()
            self._threads.append(thread)
        host, port = self.address
        log.info("accepting on %s:%d for %d receiver processes", host, port, self._count)

    def pids(self) -> list[int]:
        with self._lock:
            return [p.pid for p in self._processes if p is not None and p.is_alive()]

    def alive(self) -> int:
        return len(self.pids())

    def stop(self) -> None:
        """No new connections; each worker finishes its associations within the grace period."""
        self._stopping.set()
        for thread in self._threads:
            thread.join(ACCEPT_POLL_S * 5)
        if self._listener is not None:
            self._listener.close()
        with self._lock:
            processes = [p for p in self._processes if p is not None]
        for process in processes:
            if process.is_alive():
                os.kill(process.pid, signal.SIGTERM)
        for process in processes:
            process.join(self._grace_s + EXTRA_STOP_S)
            if process.is_alive():
                log.warning("receiver process %d did not stop in time; killing it", process.pid)
                process.kill()
                process.join(EXTRA_STOP_S)
        for channel in self._channels:
            if channel is not None:
                channel.close()

    def _spawn(self, slot: int) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        listener = self._listener
        process = self._ctx.Process(
            target=_worker_main,
            args=(self._build, slot, theirs, listener.fileno() if listener else -1,
                  self._grace_s),
            name=f"gateway-receiver-{slot}",
            daemon=False,  # stopped by us, or by the kernel when we die (PR_SET_PDEATHSIG)
        )
        process.start()
        log.info("receiver process %d started (slot %d)", process.pid, slot)
        theirs.close()  # only the worker holds its end: what is queued there dies with it
        with self._lock:
            old, self._channels[slot] = self._channels[slot], ours
            self._processes[slot] = process
        if old is not None:
            old.close()

    def _active(self) -> range:
        return range(self._base, self._base + self._count)

    def replace(self) -> None:
        """A configuration reload: start a process per slot of the other half (built by
        ``build`` from what the supervisor holds now), hand every new connection to them, and
        let the old ones drain their associations within the grace period, then exit.

        A previous reload's processes still draining in that half are waited for first (at most
        the grace period and a margin, then killed, as ``stop`` would)."""
        with self._lock:
            new_base = self._count - self._base
            old = self._active()
        new = range(new_base, new_base + self._count)
        self._wait_drained(new)
        for slot in new:
            self._spawn(slot)
        with self._lock:  # not while the acceptor hands a connection over
            self._base = new_base
        for slot in old:
            self._retire(slot)

    def _wait_drained(self, slots: range) -> None:
        deadline = time.monotonic() + self._grace_s + EXTRA_STOP_S
        while any(self._processes[s] is not None for s in slots):
            if time.monotonic() > deadline:
                for slot in slots:
                    process = self._processes[slot]
                    if process is not None and process.is_alive():
                        log.warning("receiver process %d did not drain in time; killing it",
                                    process.pid)
                        process.kill()
                deadline = time.monotonic() + EXTRA_STOP_S
            time.sleep(WATCH_S)

    def _retire(self, slot: int) -> None:
        """SIGTERM, once the process has read every connection already handed to it: one
        still queued in its channel would die with it, and its sender see a reset."""
        channel, process = self._channels[slot], self._processes[slot]
        if process is None:
            return
        deadline = time.monotonic() + RETIRE_READ_S
        while channel is not None and _unread_bytes(channel) and time.monotonic() < deadline:
            time.sleep(0.01)
        if process.is_alive():
            log.info("receiver process %d (slot %d) takes no new connections; draining",
                     process.pid, slot)
            os.kill(process.pid, signal.SIGTERM)

    def _watch(self) -> None:
        while not self._stopping.wait(WATCH_S):
            for slot in range(len(self._processes)):
                process = self._processes[slot]
                if self._stopping.is_set() or process is not None and process.is_alive():
                    continue
                with self._lock:  # not while the acceptor counts a connection handed to it
                    active = slot in self._active()
                    if self._processes[slot] is not process or process is None and not active:
                        continue  # started meanwhile (a reload), or an empty slot at rest
                    if process is not None:
                        self._board.forget(slot)
                    channel = None
                    if not active:
                        channel, self._channels[slot] = self._channels[slot], None
                        self._processes[slot] = None
                if process is None:  # a reload's new process died before the switch
                    self._spawn(slot)
                    continue
                if not active:
                    log.info("receiver process %d (slot %d) drained and exited (code %s)",
                             process.pid, slot, process.exitcode)
                    if channel is not None:
                        channel.close()
                    self._on_exit(process.pid, False)
                    continue
                log.error("receiver process %d (slot %d) exited (code %s); its associations "
                          "ended with it; starting another", process.pid, slot, process.exitcode)
                self._on_exit(process.pid, True)
                self.restarts += 1
                self._spawn(slot)

    def _accept(self) -> None:
        listener = self._listener
        assert listener is not None
        while not self._stopping.is_set():
            ready, _, _ = select.select([listener], [], [], ACCEPT_POLL_S)
            if not ready:
                continue
            try:
                conn, peer = listener.accept()
            except (BlockingIOError, InterruptedError):
                continue
            except OSError as exc:
                log.error("accept failed (%s)", type(exc).__name__)
                continue
            with conn:
                if not self._hand_over(conn):
                    log.error("no receiver process took the connection from %s:%d; closed",
                              peer[0], peer[1])

    def _hand_over(self, conn: socket.socket) -> bool:
        """To the live worker with the fewest open connections; the next one if it cannot."""
        with self._lock:
            order = sorted(self._active(), key=self._board.open_connections)
            for slot in order:
                channel, process = self._channels[slot], self._processes[slot]
                if channel is None or process is None or not process.is_alive():
                    continue
                self._board.handed(slot)
                try:
                    socket.send_fds(channel, [b"c"], [conn.fileno()], socket.MSG_DONTWAIT)
                    return True
                except OSError:
                    self._board.handed(slot, -1)
        return False


def _unread_bytes(channel: socket.socket) -> int:
    """Bytes sent on a Unix socket that its peer has not read yet (Linux ``SIOCOUTQ``: for
    ``AF_UNIX`` a datagram stays charged to its sender until the receiver takes it)."""
    try:
        raw = fcntl.ioctl(channel.fileno(), termios.TIOCOUTQ, struct.pack("i", 0))
    except (OSError, ValueError):  # closed meanwhile (fileno -1): its process exited
        return 0
    return int(struct.unpack("i", raw)[0])


def _worker_main(build: WorkerFactory, slot: int, channel: socket.socket, listener_fd: int,
                 grace_s: float) -> None:
    die_with_parent()
    name_process(f"gw-receiver-{slot}")
    stop = threading.Event()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # a terminal's ^C is for the supervisor
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload is the supervisor's to do
    if listener_fd >= 0:
        os.close(listener_fd)  # refused once the supervisor closes it, not queued for nobody
    code = 0
    try:
        worker = build(slot, channel)
        worker.start()
        while not stop.wait(0.5):
            pass
        worker.stop(grace_s)
    except BaseException:
        log.exception("receiver process %d failed", os.getpid())
        code = 1
    finally:
        logging.shutdown()
        # Not a normal exit: the supervisor's objects copied by fork (its database connections
        # among them) must not be finalised here, or they would close the supervisor's sockets.
        os._exit(code)


def handed_server_class(channel: socket.socket,
                        address: tuple[str, int]) -> type[ThreadedAssociationServer]:
    """pynetdicom's server taking its connections from ``channel`` instead of a
    listening socket: ``serve_forever`` waits on the Unix socket, ``get_request`` receives the
    descriptor the acceptor sent (``SCM_RIGHTS``)."""

    class HandedServer(ReceiverServer):
        def server_bind(self) -> None:
            cast(socket.socket, self.socket).close()
            self.socket = channel
            self.server_address = address

        def server_activate(self) -> None:
            pass

        def get_request(self) -> tuple[socket.socket, tuple[str, int]]:
            _, fds, _, _ = socket.recv_fds(cast(socket.socket, self.socket), 1, 1)
            if not fds:
                raise OSError("the acceptor closed its end")
            conn = socket.socket(fileno=fds[0])
            try:
                host, port = conn.getpeername()[:2]
            except OSError:
                conn.close()
                raise
            return conn, (str(host), int(port))

    return HandedServer
