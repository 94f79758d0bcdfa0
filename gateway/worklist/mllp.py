"""The MLLP listener: HL7 v2 messages over TCP, each answered before the next one is read.

MLLP, the Minimal Lower Layer Protocol (HL7 v2.5 Appendix C, C.4), frames each message as
``<SB> message <EB><CR>`` (0x0B ... 0x1C 0x0D) and the answer alike. This module owns the framing
and the sockets; what a message means and what to answer is the handler's
(``gateway.worklist.hl7``).
python-hl7's own MLLP streams are not used: they decode with one encoding per connection before
MSH-18 can be read, and keep no raw bytes.

Invariants:
- Per connection one message at a time, in order: the next frame is handed over only once the
  previous answer is written (a sender that pipelines gets its ACKs in its order).
- Several connections at once (asyncio in one thread of the gateway process; the handler, which
  writes to the database, runs in a small thread pool), at most ``hl7.max_connections``.
- Memory per message is bounded: of a frame longer than ``hl7.max_message_bytes`` only the first
  bytes are kept; the rest is read to its end and dropped, and the handler gets the head and the
  full size (it answers AR). Bytes outside a frame (a CR LF between messages) are skipped; a start
  byte inside a frame starts a new one (the sender gave up on the partial message, which is
  dropped).
- Stop: no new connections; idle ones are closed; a message being handled finishes and gets its
  answer within the grace period.
- Logs: peer addresses and counts, never message bytes (they hold patient data).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import socket
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor

from gateway.worklist.hl7 import Received

log = logging.getLogger(__name__)

START_BLOCK = b"\x0b"
END_BLOCK = b"\x1c"
CARRIAGE_RETURN = b"\x0d"
_BOUNDARY = re.compile(b"[\x0b\x1c]")
READ_BYTES = 65536
HANDLER_THREADS = 4

Handler = Callable[[Received], bytes]


def frame(message: bytes) -> bytes:
    return START_BLOCK + message + END_BLOCK + CARRIAGE_RETURN


class Deframer:
    """MLLP frames out of a byte stream fed in arbitrary pieces: (kept bytes, full size) each."""

    def __init__(self, max_bytes: int) -> None:
        self._max = max_bytes
        self._inside = False
        self._kept = bytearray()
        self._size = 0
        self._end_block_seen = False  # the previous piece ended with <EB>
        self.skipped = 0  # bytes outside frames, and of frames a new start byte cut short

    def feed(self, data: bytes) -> list[tuple[bytes, int]]:
        frames: list[tuple[bytes, int]] = []
        i, n = 0, len(data)
        while i < n:
            if not self._inside:
                start = data.find(START_BLOCK, i)
                if start < 0:
                    self.skipped += n - i
                    break
                self.skipped += start - i
                self._begin()
                i = start + 1
                continue
            if self._end_block_seen:
                self._end_block_seen = False
                if data[i:i + 1] == CARRIAGE_RETURN:
                    frames.append(self._end())
                    i += 1
                    continue
                self._keep(END_BLOCK)  # a lone <EB> is not an end; kept as sent
            match = _BOUNDARY.search(data, i)
            if match is None:
                self._keep(data[i:])
                break
            j = match.start()
            self._keep(data[i:j])
            if data[j:j + 1] == START_BLOCK:
                self.skipped += self._size
                self._begin()
                i = j + 1
            elif j + 1 == n:
                self._end_block_seen = True
                i = n
            elif data[j + 1:j + 2] == CARRIAGE_RETURN:
                frames.append(self._end())
                i = j + 2
            else:
                self._keep(END_BLOCK)
                i = j + 1
        return frames

    def _begin(self) -> None:
        self._inside = True
        self._kept = bytearray()
        self._size = 0
        self._end_block_seen = False

    def _keep(self, chunk: bytes) -> None:
        self._size += len(chunk)
        room = self._max - len(self._kept)
        if room > 0:
            self._kept += chunk[:room]

    def _end(self) -> tuple[bytes, int]:
        self._inside = False
        return bytes(self._kept), self._size


class MllpListener:
    """Listens on ``host:port`` in its own thread; ``start`` returns once it listens (or raises
    the bind error), ``stop`` once every connection is closed."""

    def __init__(self, host: str, port: int, max_message_bytes: int, max_connections: int,
                 handler: Handler, grace_s: float) -> None:
        self._host = host
        self._requested_port = port
        self._max_bytes = max_message_bytes
        self._max_connections = max_connections
        self._handler = handler
        self._grace_s = grace_s
        self._thread = threading.Thread(target=self._run, name="gateway-hl7", daemon=True)
        self._ready = threading.Event()
        self._error: OSError | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        # each connection's task -> its writer, and whether it is handling a message now
        self._connections: dict[asyncio.Task[None], tuple[asyncio.StreamWriter, bool]] = {}
        self.port = 0

    def start(self) -> None:
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error
        log.info("hl7 listening on %s:%d", self._host, self.port)

    def stop(self) -> None:
        loop, stopping = self._loop, self._stopping
        if loop is not None and stopping is not None and self._thread.is_alive():
            loop.call_soon_threadsafe(stopping.set)
        if self._thread.is_alive():
            self._thread.join(self._grace_s + 10)

    def _run(self) -> None:
        executor = ThreadPoolExecutor(HANDLER_THREADS, thread_name_prefix="gateway-hl7-handler")
        try:
            asyncio.run(self._main(executor))
        finally:
            executor.shutdown(wait=True)
            self._ready.set()

    async def _main(self, executor: ThreadPoolExecutor) -> None:
        self._loop = asyncio.get_running_loop()
        self._stopping = asyncio.Event()
        try:
            server = await asyncio.start_server(
                lambda r, w: self._connection(r, w, executor), self._host, self._requested_port,
                reuse_address=True)
        except OSError as exc:
            self._error = exc
            return
        self.port = int(server.sockets[0].getsockname()[1])
        self._ready.set()
        await self._stopping.wait()
        server.close()
        # Closing a transport ends its reader (EOF), so each connection's task ends by itself;
        # cancelling them instead makes asyncio (3.11) log the CancelledError as an error.
        for writer, busy in list(self._connections.values()):
            if not busy:
                writer.close()
        tasks = list(self._connections)
        if tasks:
            _, late = await asyncio.wait(tasks, timeout=self._grace_s)
            for task in late:  # still handling a message: its answer will not be sent
                self._connections[task][0].transport.abort()
            if late:
                await asyncio.wait(late)
        await server.wait_closed()

    async def _connection(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter,
                          executor: ThreadPoolExecutor) -> None:
        address = writer.get_extra_info("peername") or ("?", 0)
        peer = f"{address[0]}:{address[1]}"
        task = asyncio.current_task()
        assert task is not None and self._stopping is not None
        if len(self._connections) >= self._max_connections:
            log.warning("hl7 connection from %s refused: %d open (hl7.max_connections)", peer,
                        len(self._connections))
            await _close(writer)
            return
        sock = writer.get_extra_info("socket")
        if sock is not None:  # ACKs leave at once (no Nagle delay); dead peers are noticed
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE, 1)
        self._connections[task] = (writer, False)
        deframer = Deframer(self._max_bytes)
        messages = 0
        log.info("hl7 connection from %s", peer)
        try:
            while not self._stopping.is_set():
                data = await reader.read(READ_BYTES)
                if not data:
                    break
                for kept, size in deframer.feed(data):
                    self._connections[task] = (writer, True)
                    reply = await asyncio.get_running_loop().run_in_executor(
                        executor, self._handler, Received(kept, size, peer))
                    writer.write(frame(reply))
                    await writer.drain()
                    messages += 1
                    self._connections[task] = (writer, False)
        except (ConnectionError, TimeoutError) as exc:
            log.info("hl7 connection from %s lost: %s", peer, type(exc).__name__)
        finally:
            self._connections.pop(task, None)
            await _close(writer)
            log.info("hl7 connection from %s closed after %d message(s)%s", peer, messages,
                     f", {deframer.skipped} byte(s) outside frames skipped"
                     if deframer.skipped else "")


async def _close(writer: asyncio.StreamWriter) -> None:
    writer.close()
    with contextlib.suppress(ConnectionError, TimeoutError):
        await writer.wait_closed()
