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

Shared state lives in memory made before the workers fork (``WorkerBoard``). Each value is
written by one process only (the acceptor counts connections handed to a worker, that worker
counts them ended and lists the calling AE titles of its admitted associations), so no
cross-process lock exists that a killed worker could leave held; the supervisor clears a dead
worker's values. ``dicom.max_associations`` and the per-peer limits (``security.peers``
``max_associations``, ``security.max_associations_per_peer``) hold for the node: a worker
reserves a place by writing the caller's title into its own list, counts the titles in every
list, and takes it out again when a count is over its limit. Two requests racing for the last
place in two workers may both be refused (transient, as any refusal at a limit), never both
admitted. With ``workers = 1`` the receiver uses a board of one slot: one implementation.
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

from gateway.dicom.peers import RejectReason
from gateway.lifetime import die_with_parent, name_process
from gateway.receive.server import ReceiverServer

log = logging.getLogger(__name__)
ACCEPT_POLL_S = 0.2
WATCH_S = 0.2
EXTRA_STOP_S = 5.0
RETIRE_READ_S = 2.0


class Admissions(Protocol):
    """What a ``Receiver`` asks of the node-wide counts."""

    def take(self, calling_ae: str, peer_limit: int | None) -> RejectReason | None: ...

    def give_back(self, calling_ae: str) -> None: ...

    def connection_ended(self) -> None: ...


ENTRY_BYTES = 16  # an AE title, PS3.8 9.3.2: 16 bytes of ISO 646 on the wire
_EMPTY = bytes(ENTRY_BYTES)


def _entry(calling_ae: str) -> bytes:
    """The table's form of a (stripped) calling AE title: padded with spaces to 16 bytes, as on
    the wire, its first byte's high bit set. pynetdicom decodes the 16 bytes as ASCII, so every
    title fits exactly and only an entry's first byte ever has the high bit: a search for an
    entry can match only where an entry starts (``bytes.count`` counts whole entries, in C), and
    an entry in use never starts with the NUL of a free one, even for a title of spaces."""
    encoded = calling_ae.encode("ascii").ljust(ENTRY_BYTES)
    if len(encoded) != ENTRY_BYTES:
        raise ValueError(f"an AE title is at most {ENTRY_BYTES} characters: {calling_ae!r}")
    return bytes([encoded[0] | 0x80]) + encoded[1:]


class WorkerBoard:
    """Per worker slot: connections handed over, connections ended, and the calling AE titles of
    its admitted associations (``capacity`` entries of 16 bytes, NULs when free).

    The titles are stored exactly (no hash into shared buckets), so two devices never share a
    per-peer limit; the node's count is the number of entries in use over all slots."""

    def __init__(self, workers: int, capacity: int) -> None:
        context = multiprocessing.get_context("fork")
        self.workers = workers
        # A worker never holds more admitted associations than the node's limit; the gateway
        # passes the highest limit allowed, so a reload may raise dicom.max_associations
        self.capacity = capacity
        self._handed: Any = context.RawArray("q", workers)
        self._ended: Any = context.RawArray("q", workers)
        self._titles: Any = context.RawArray("c", workers * capacity * ENTRY_BYTES)

    def open_connections(self, slot: int) -> int:
        return int(self._handed[slot] - self._ended[slot])

    def admitted(self, calling_ae: str | None = None) -> int:
        """Entries in use on the node: all of them, or those of ``calling_ae``."""
        if calling_ae is None:
            return self._count(None)[0]
        return self._count(_entry(calling_ae))[1]

    def handed(self, slot: int, count: int = 1) -> None:
        """In the acceptor's thread only."""
        self._handed[slot] += count

    def forget(self, slot: int) -> None:
        """The worker in ``slot`` is dead: nothing of its own is open any more."""
        self._ended[slot] = self._handed[slot]
        start, end = self._region(slot)
        self._titles[start:end] = bytes(end - start)

    def admissions(self, slot: int, limit: int) -> SlotAdmissions:
        return SlotAdmissions(self, slot, limit)

    # -- written by the slot's own worker only, under its SlotAdmissions lock -------------------

    def _region(self, slot: int) -> tuple[int, int]:
        start = slot * self.capacity * ENTRY_BYTES
        return start, start + self.capacity * ENTRY_BYTES

    def _publish(self, slot: int, entry: bytes) -> int | None:
        """Write ``entry`` into a free place of ``slot``: its index, or None if the slot is full."""
        start, end = self._region(slot)
        free = self._titles[start:end:ENTRY_BYTES].find(0)  # first bytes: 0 only when free
        if free < 0:
            return None
        index = slot * self.capacity + free
        self._titles[index * ENTRY_BYTES:(index + 1) * ENTRY_BYTES] = entry
        return index

    def _withdraw(self, slot: int, entry: bytes) -> None:
        """Free one place of ``slot`` holding ``entry`` (all of a title's places are alike)."""
        start, end = self._region(slot)
        at = self._titles[start:end].find(entry)  # aligned: see ``_entry``
        if at >= 0:
            self._clear((start + at) // ENTRY_BYTES)

    def _clear(self, index: int) -> None:
        at = index * ENTRY_BYTES
        self._titles[at:at + ENTRY_BYTES] = _EMPTY

    def _count(self, entry: bytes | None) -> tuple[int, int]:
        """(entries in use, entries equal to ``entry``) over every slot, from one copy."""
        table: bytes = self._titles.raw
        firsts = table[::ENTRY_BYTES]
        used = len(firsts) - firsts.count(0)
        return used, table.count(entry) if entry is not None else 0


_FENCE = threading.Lock()


def _store_load_fence() -> None:
    """Make this process's entry visible to the others before it reads theirs. The "never both
    admitted" argument needs each writer's store ordered before its own loads, which x86 does not
    promise across cores (a store may wait in the store buffer while later loads go ahead; both
    racers would then miss each other). Taking a lock is a locked read-modify-write on x86-64
    (glibc's semaphore behind CPython's ``threading.Lock``): a full barrier, for about 0.1 us."""
    with _FENCE:
        pass


class SlotAdmissions:
    """In a worker: its slot's entries, changed under one thread lock (its associations' threads
    admit and end concurrently).

    Admission writes the caller's entry first, then counts every slot, and takes the entry out
    again when a count is over its limit. Two requests racing for the last place (the node's or
    one title's) in two workers: each writes its entry whole before it counts, so whichever counts
    later sees the other's entry whole (an entry read while being written counts as whatever it
    looks like, which only the earlier one can meet). Both may be refused (transient, as any
    refusal at a limit), never both admitted."""

    def __init__(self, board: WorkerBoard, slot: int, limit: int) -> None:
        self._board = board
        self._slot = slot
        self._limit = limit
        self._lock = threading.Lock()

    def take(self, calling_ae: str, peer_limit: int | None) -> RejectReason | None:
        """None if admitted (its place is held until ``give_back``), else which limit refused
        it. A peer over its own limit is named even when the node is full too: it would be
        refused on a quiet node as well, and that is what its operator needs to know."""
        entry = _entry(calling_ae)
        with self._lock:
            index = self._board._publish(self._slot, entry)
            if index is None:  # this worker alone holds the node's limit
                return RejectReason.LOCAL_LIMIT_EXCEEDED
            _store_load_fence()
            used, same = self._board._count(entry)
            if peer_limit is not None and same > peer_limit:
                reject: RejectReason | None = RejectReason.PEER_LIMIT_EXCEEDED
            elif used > self._limit:
                reject = RejectReason.LOCAL_LIMIT_EXCEEDED
            else:
                return None
            self._board._clear(index)
            return reject

    def give_back(self, calling_ae: str) -> None:
        with self._lock:
            self._board._withdraw(self._slot, _entry(calling_ae))

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
