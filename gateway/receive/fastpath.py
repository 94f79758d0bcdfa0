"""The one place where the gateway changes how pynetdicom moves bytes. Written for pynetdicom 3.0.x.

Why each change, measured on loopback (see ../shared/ARCHITECTURE.md and scripts/bench):
- ``FastSocket``: TCP_NODELAY on every accepted socket, and TCP_QUICKACK re-armed before each read
  where Linux has it. A sender that leaves Nagle on (DCMTK's default) otherwise waits for our
  delayed ACK, 40-90 ms per message. pynetdicom's ``recv`` also reads 4 KiB at a time into a growing
  bytearray; with large PDUs that is dozens of calls and copies per PDU, so we read into one buffer.
- ``FastSocket.ready`` / ``FastAssociation._run_reactor``: pynetdicom's two threads per association
  poll with 1 ms sleeps (the DUL reactor for socket data and outgoing PDUs, the association reactor
  for complete DIMSE messages). Each C-STORE round trip paid up to two of them, plus one at every
  PDU boundary. Here the DUL blocks in ``select`` on the socket and a wake-up pipe that every
  outgoing primitive writes to, and the association reactor blocks on its message queue, woken
  as well by A-RELEASE/A-ABORT primitives. Idle associations now sleep instead of spinning.
- ``receive_datasets_into``: pynetdicom's ``STORE_RECV_CHUNKED_DATASET`` streams each C-STORE data
  set to a temporary file instead of memory (a 1 GB multi-frame must not be held whole), but names
  the file in the system temp folder. We give it the spool's ``incoming`` folder, so the data is on
  the spool's filesystem and a crash leaves it where ``Spool.recover`` looks; and we have it write
  the gateway's own File Meta Information, naming the calling AE as Source Application Entity
  Title (PS3.10 7.1). The received file is then already the file we keep: it is synced and renamed
  into place, never copied (a copy of each image was a fifth of the C-STORE handler's time).
"""

from __future__ import annotations

import functools
import logging
import os
import queue
import select
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, cast

import pynetdicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID
from pynetdicom import _config, dimse_messages, evt
from pynetdicom.association import Association
from pynetdicom.dsutils import create_file_meta
from pynetdicom.transport import AssociationSocket

IMPLEMENTATION_CLASS_UID = "2.25.48550581365857126030161444514657436015"
IMPLEMENTATION_VERSION_NAME = "GATEWAY_010"

PYNETDICOM_SERIES = "3.0."
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)
IDLE_WAIT_S = 0.05  # longest a blocked reactor waits before re-checking timers and kill flags
LOGGER = logging.getLogger("pynetdicom.assoc")


def check_version() -> None:
    """Fail loudly rather than patch a pynetdicom whose internals may have moved."""
    if not pynetdicom.__version__.startswith(PYNETDICOM_SERIES):
        raise RuntimeError(
            f"gateway.receive.fastpath was written for pynetdicom {PYNETDICOM_SERIES}x, found "
            f"{pynetdicom.__version__}; re-check it against the new version and update the pin"
        )


class _WakingQueue(queue.Queue[Any]):
    """A queue that calls ``wake`` after every put, so a thread blocked elsewhere notices it."""

    def __init__(self, wake: Callable[[], None]) -> None:
        super().__init__()
        self._wake = wake

    def put(self, item: Any, block: bool = True, timeout: float | None = None) -> None:
        super().put(item, block, timeout)
        self._wake()


class FastSocket(AssociationSocket):
    _wake_r: int
    _wake_w: int

    @classmethod
    def adopt(cls, wrapped: AssociationSocket) -> None:
        """Turn pynetdicom's socket wrapper into a FastSocket in place.

        In place, because constructing a second wrapper would queue a second transport-connect
        event (Evt5) on the association's state machine.
        """
        wrapped.__class__ = cls
        fast = cast(FastSocket, wrapped)
        assert fast.socket is not None
        fast.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        fast._rearm_quickack()
        fast._wake_r, fast._wake_w = os.pipe()
        os.set_blocking(fast._wake_r, False)
        os.set_blocking(fast._wake_w, False)
        dul = fast.assoc.dul
        dul.to_provider_queue = _WakingQueue(fast._wake)
        dul._run_loop_delay = 0  # ``ready`` below blocks instead

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):
            pass  # already pending, or closed: either way nobody needs another byte

    def _rearm_quickack(self) -> None:
        rearm_quickack(self.socket)

    @property
    def ready(self) -> bool:
        """Wait up to IDLE_WAIT_S for data, unless the DUL has other work queued."""
        if self.socket is None or not self._is_connected:
            time.sleep(0.001)  # what pynetdicom's loop did; the DUL is about to stop
            return False
        dul = self.assoc.dul
        # Sta13 is busy (pynetdicom closes the socket there once nothing is waiting), unless an
        # abort of ours is draining what the peer still sends (``upper_layer``): then a pause
        # of up to IDLE_WAIT_S is allowed before the close, so the peer can read the A-ABORT.
        busy = (
            dul.to_provider_queue.qsize()
            or dul.event_queue.qsize()
            or (dul.state_machine.current_state == "Sta13" and not getattr(dul, "draining", False))
        )
        watched: list[Any] = [self.socket, self._wake_r]
        try:
            readable, _, _ = select.select(watched, [], [], 0 if busy else IDLE_WAIT_S)
        except (OSError, TimeoutError, ValueError):
            self.event_queue.put("Evt17")
            return False
        if self._wake_r in readable:
            try:
                while os.read(self._wake_r, 4096):
                    pass
            except BlockingIOError:
                pass
        return self.socket in readable

    def close(self) -> None:
        super().close()
        self.release_wakeup()

    def release_wakeup(self) -> None:
        """Close the wake-up pipe; idempotent. pynetdicom does not close the socket wrapper on
        every path (a released association only shuts the socket down), so the association's
        thread also calls this when it ends."""
        for fd in ("_wake_r", "_wake_w"):
            number = self.__dict__.pop(fd, None)
            if number is not None:
                os.close(number)

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly ``nr_bytes`` (fewer only if the peer closed), as pynetdicom's ``recv``."""
        buffer = bytearray(nr_bytes)
        received = self.recv_into_exactly(memoryview(buffer))
        return buffer if received == nr_bytes else buffer[:received]

    def recv_into_exactly(self, view: memoryview) -> int:
        """Fill ``view`` from the socket; the count is short only if the peer closed."""
        sock = self.socket
        assert sock is not None
        wanted = len(view)
        received = 0
        while received < wanted:
            self._rearm_quickack()
            count = sock.recv_into(view[received:], wanted - received)
            if count == 0:
                break
            received += count
        return received


def rearm_quickack(sock: socket.socket | None) -> None:
    """Linux clears TCP_QUICKACK after it fires, so it is set again before every read."""
    if _QUICKACK is not None and sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
        except OSError:
            pass  # the peer has gone; the read that follows reports it


class QuickAckSocket(AssociationSocket):
    """pynetdicom's socket wrapper for an association the gateway requests (C-MOVE
    sub-operations): TCP_NODELAY, and TCP_QUICKACK re-armed before each read, as ``FastSocket``
    does for accepted ones. A peer that leaves Nagle on (DCMTK's default) writes a PDU in more
    than one piece and holds the last until our ACK of the first, which Linux delays by 40 ms:
    one such wait per C-STORE-RSP, measured as 50 ms per sub-operation to ``storescp``."""

    @classmethod
    def adopt(cls, wrapped: AssociationSocket) -> None:
        """In place, as ``FastSocket.adopt``; only ``recv`` changes, so this is safe at any
        point of the association's life (pynetdicom's threads keep their queues)."""
        wrapped.__class__ = cls
        if wrapped.socket is not None:
            wrapped.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            cast(QuickAckSocket, wrapped)._rearm_quickack()

    def _rearm_quickack(self) -> None:
        rearm_quickack(self.socket)

    def recv(self, nr_bytes: int) -> bytearray:
        self._rearm_quickack()
        return super().recv(nr_bytes)


class RequestingAssociation(Association):
    """pynetdicom's ``Association`` for one the gateway requests to send C-STOREs (C-MOVE
    sub-operations, DIMSE forwarding), whose reactor gives back a response it took.

    pynetdicom pauses an association's reactor while ``send_c_store`` waits for its answer, but
    the pause can be missed: the reactor marks itself paused and passes its checkpoint just
    before the sender clears it; the sender reads the stale mark and sends; the reactor then takes
    the C-STORE-RSP off the queue as "unexpected" and drops it, and the sender waits out the DIMSE
    timeout (60 s) and aborts the association, failing every sub-operation left. Quick answers
    (``QuickAckSocket``) make the window likely on a loaded machine: a full test run lost one.
    A response is only ever awaited by the sender, so the reactor puts it back for it.
    """

    @classmethod
    def adopt(cls, assoc: Association) -> None:
        """In place, with its socket made a ``QuickAckSocket``."""
        assoc.__class__ = cls
        if assoc.dul.socket is not None:
            QuickAckSocket.adopt(assoc.dul.socket)

    def _serve_request(self, msg: Any, context_id: int) -> None:
        if getattr(msg, "is_valid_response", False):
            # Back where it was, at the head: a C-FIND's pending answers and its final one queue
            # behind each other, and the waiting send_c_*() must read them in order
            messages = self.dimse.msg_queue
            with messages.not_empty:
                messages.queue.appendleft((context_id, msg))
                messages.unfinished_tasks += 1
                messages.not_empty.notify()
            time.sleep(0.001)  # its blocked get() is woken now; let it take it
            return
        super()._serve_request(msg, context_id)


class FastAssociation(Association):
    """pynetdicom's acceptor ``Association`` whose reactor blocks instead of polling, and whose
    end is reported whatever the path to it (``on_end``)."""

    _on_end: Callable[[], None]

    @classmethod
    def adopt(cls, assoc: Association, on_end: Callable[[], None] = lambda: None) -> None:
        assoc.__class__ = cls
        assoc.dul.to_user_queue = _WakingQueue(lambda: assoc.dimse.msg_queue.put((None, None)))
        cast(FastAssociation, assoc)._on_end = on_end

    def run(self) -> None:
        try:
            super().run()
        finally:
            if self.dul.is_alive():
                # Only a failure returns here without ``kill()``: pynetdicom has shut the socket
                # down, and the DUL thread would otherwise poll in Sta1 for good.
                self.dul.kill_dul()
                self.dul.join(timeout=1.0)  # before its wake-up pipe is closed below
            wrapped = self.dul.socket
            if isinstance(wrapped, FastSocket):
                wrapped.release_wakeup()
            self._on_end()

    def _run_reactor(self) -> None:
        """pynetdicom 3.0.4's ``Association._run_reactor``, with ``time.sleep(0.001)`` and a
        non-blocking ``get_msg`` replaced by a blocking get; a ``(None, None)`` item (put when
        an ACSE primitive arrives) only wakes it. The rest is unchanged, in the same order."""
        self._is_paused = False
        while not self._kill:
            self._is_paused = True
            self._reactor_checkpoint.wait()
            self._is_paused = False

            try:
                context_id, msg = self.dimse.msg_queue.get(timeout=IDLE_WAIT_S)
            except queue.Empty:
                context_id, msg = None, None
            if msg:
                self._serve_request(msg, cast(int, context_id))

            if self.is_established and self.acse.is_release_requested():
                self.acse.send_release(is_response=True)
                LOGGER.info("Association Released")
                self.is_released = True
                self.is_established = False
                evt.trigger(self, evt.EVT_RELEASED, {})
                self.kill()
                return

            if self.acse.is_aborted():
                log_msg = "Association Aborted"
                if self.acse.is_aborted("a-p-abort"):
                    log_msg += " (A-P-ABORT)"
                LOGGER.info(log_msg)
                self.dul.receive_pdu(wait=False)
                self.is_aborted = True
                self.is_established = False
                evt.trigger(self, evt.EVT_ABORTED, {})
                self.kill()
                return

            if not self.dul.is_alive():
                self.kill()
                return

            if self.dul.idle_timer_expired():
                LOGGER.error("Network timeout reached")
                if self.network_timeout_response == "A-RELEASE":
                    self._is_paused = True
                    self._reactor_checkpoint.wait()
                    self.release()
                    self._is_paused = False
                else:
                    self.abort()
                self.kill()
                return


def file_meta(
    sop_class_uid: UID, sop_instance_uid: UID, transfer_syntax: UID, **_: object
) -> FileMetaDataset:
    """pynetdicom's ``create_file_meta`` plus the sender: called in the DUL thread of the
    association receiving the data set, which is how the calling AE title is found."""
    meta = create_file_meta(
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        transfer_syntax=transfer_syntax,
        implementation_uid=UID(IMPLEMENTATION_CLASS_UID),
        implementation_version=IMPLEMENTATION_VERSION_NAME,
    )
    dul = threading.current_thread()
    calling_ae = getattr(getattr(getattr(dul, "assoc", None), "requestor", None), "ae_title", None)
    if calling_ae:
        meta.SourceApplicationEntityTitle = str(calling_ae).strip()
    return meta


def receive_datasets_into(folder: Path) -> None:
    """Stream C-STORE data sets to Part-10 files in ``folder`` (process-wide: one spool each)."""
    folder.mkdir(parents=True, exist_ok=True)
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = functools.partial(  # type: ignore[assignment]
        tempfile.NamedTemporaryFile, dir=folder, prefix=f"{os.getpid()}-"
    )
    dimse_messages.create_file_meta = file_meta
