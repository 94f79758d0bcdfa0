"""How concurrent associations spread over receiver processes: ``SO_REUSEPORT`` against one
listening socket shared by the workers against one acceptor handing sockets to the least busy
worker (``SCM_RIGHTS``). Measured for ``gateway.receive.workers``; kept so it can be run again.

Each worker is a minimal pynetdicom C-STORE SCP (it reads each data set's bytes and answers
Success): the CPU it spends per instance is what makes an uneven spread cost wall time. N
``storescu`` associations (``TCP_NODELAY=1``, loopback) start together; the script reports how many
associations each worker got and how long the slowest sender took.

    python scripts/measure_accept.py [--workers 2] [--senders 4] [--images 60] [--reps 6]
"""

from __future__ import annotations

import argparse
import collections
import multiprocessing
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

from pynetdicom import AE, evt
from pynetdicom.presentation import AllStoragePresentationContexts
from pynetdicom.transport import ThreadedAssociationServer

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

MODES = ("reuseport", "shared", "handoff")


class _Server(ThreadedAssociationServer):
    """Binds with SO_REUSEPORT, adopts an inherited listening socket, or takes sockets from a
    Unix socket (``mode``)."""

    mode = "reuseport"
    adopted: socket.socket | None = None

    def server_bind(self) -> None:
        if self.mode == "reuseport":
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            super().server_bind()
            return
        assert self.adopted is not None
        self.socket.close()
        self.socket = self.adopted
        self.server_address = ("127.0.0.1", 0)

    def server_activate(self) -> None:
        if self.mode == "reuseport":
            super().server_activate()

    def get_request(self) -> tuple[socket.socket, Any]:
        if self.mode != "handoff":
            return super().get_request()
        _, fds, _, _ = socket.recv_fds(self.socket, 1, 1)
        if not fds:
            raise OSError("acceptor gone")
        conn = socket.socket(fileno=fds[0])
        return conn, conn.getpeername()


def _worker(mode: str, port: int, inherited: socket.socket | None, counts: Any, slot: int,
            active: Any) -> None:
    def on_store(event: evt.Event) -> int:
        event.encoded_dataset()
        return 0x0000

    def opened(_: evt.Event) -> None:
        counts[slot] += 1
        if mode != "handoff":  # the acceptor counted it when it handed the socket over
            active[slot] += 1

    def closed(_: evt.Event) -> None:
        active[slot] -= 1

    ae = AE("MEASURE")
    ae.maximum_pdu_size = 0
    _Server.mode = mode
    _Server.adopted = inherited
    server = ae.make_server(
        ("127.0.0.1", port), contexts=AllStoragePresentationContexts,
        evt_handlers=[(evt.EVT_C_STORE, on_store), (evt.EVT_ACCEPTED, opened),
                      (evt.EVT_CONN_CLOSE, closed)],
        server_class=_Server,
    )
    server.serve_forever(poll_interval=0.1)


def _acceptor(listener: socket.socket, pipes: list[socket.socket], active: Any) -> None:
    while True:
        conn, _ = listener.accept()
        least = min(range(len(pipes)), key=lambda i: active[i])
        active[least] += 1  # counted now; the worker counts it out when it closes
        socket.send_fds(pipes[least], [b"s"], [conn.fileno()])
        conn.close()


def run(mode: str, workers: int, senders: int, files: list[Path], storescu: Path) -> tuple[
        list[int], float]:
    ctx = multiprocessing.get_context("fork")
    counts = ctx.Array("i", workers, lock=False)
    active = ctx.Array("i", workers, lock=False)
    port = bench.free_port()
    listener: socket.socket | None = None
    pipes: list[socket.socket] = []
    procs = []
    if mode != "reuseport":
        listener = socket.create_server(("127.0.0.1", port), backlog=64)
        if mode == "shared":
            listener.setblocking(False)  # the losers of a race get EAGAIN, not a hang
    for slot in range(workers):
        inherited = listener
        if mode == "handoff":
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
            pipes.append(ours)
            inherited = theirs
        p = ctx.Process(target=_worker, args=(mode, port, inherited, counts, slot, active),
                        daemon=True)
        p.start()
        procs.append(p)
    if mode == "handoff":
        assert listener is not None
        threading.Thread(target=_acceptor, args=(listener, pipes, active), daemon=True).start()
    time.sleep(1.0)
    per = len(files) // senders
    env = {**bench.base_env(), "TCP_NODELAY": "1"}
    started = time.monotonic()
    runs = [subprocess.Popen([str(storescu), "-aec", "MEASURE", "127.0.0.1", str(port),
                              *map(str, files[i * per:(i + 1) * per])],
                             env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            for i in range(senders)]
    for r in runs:
        _, err = r.communicate(timeout=600)
        if r.returncode:
            raise SystemExit(f"storescu failed: {err.decode()[-500:]}")
    took = time.monotonic() - started
    for p in procs:
        p.kill()
        p.join()
    if listener is not None:
        listener.close()
    return sorted(counts[:], reverse=True), took


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--senders", type=int, default=4)
    parser.add_argument("--images", type=int, default=60, help="per sender")
    parser.add_argument("--reps", type=int, default=6)
    args = parser.parse_args()
    images = bench.image_set("ct", args.images * args.senders, bench.CT_SIDE, True)
    files = sorted(images.folder.glob("*.dcm"))
    storescu = bench.find_dcmtk("storescu")
    print(f"load average before: {os.getloadavg()}")
    spreads: dict[str, collections.Counter[str]] = {m: collections.Counter() for m in MODES}
    times: dict[str, list[float]] = {m: [] for m in MODES}
    for rep in range(args.reps):
        for mode in MODES[rep % len(MODES):] + MODES[:rep % len(MODES)]:
            spread, took = run(mode, args.workers, args.senders, files, storescu)
            spreads[mode][":".join(map(str, spread))] += 1
            times[mode].append(took)
            print(f"rep {rep} {mode:<9} spread {spread} {took:.2f} s", flush=True)
    print(f"load average after: {os.getloadavg()}")
    for mode in MODES:
        ordered = sorted(times[mode])
        print(f"{mode:<9} spreads {dict(spreads[mode])}  median {ordered[len(ordered) // 2]:.2f} s"
              f"  min {ordered[0]:.2f} s  max {ordered[-1]:.2f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
