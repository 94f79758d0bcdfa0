"""Measure what ``gateway.busy`` reads from a real receiver, to set its thresholds from data.

Why: ``BUSY_SHARE`` (entering a burst) and ``STAY_SHARE`` (staying in one) decide when forwarding
and rewrites stand aside. They must sit between what a saturated receiver shows (the sender sends
as fast as the gateway answers) and what a receiver at half its capacity shows, on this kind of
machine, with the gateway's real C-STORE handlers. This script starts the gateway in this process
(with a remap rule that matches nobody, so that it keeps a ``ReceiverLoad`` and nothing else runs),
records when each C-STORE handler ended and how long it took, and sends:

- ``saturated``: DCMTK storescu, one association, every file, as fast as the gateway answers;
- ``half`` / ``third``: the same storescu through a loopback proxy (another process) that passes
  the sender's bytes at 1/2 and 1/3 of the rate the saturated run reached, as a modality on a
  slower link, or one that sends as it acquires, would.

Each trace is then replayed through ``BurstHold`` on a simulated clock (samples every ``POLL_S``,
exactly as its thread takes them): the share of each ``WINDOW_S``, the smaller of two windows
(what entering needs) and how often the hold reads saturated with the module's thresholds.
Prints one JSON document; ``--traces FILE`` also writes the raw traces (end time, handler
seconds). Loopback only; bounded by ``--count`` images per run.

Usage: PYTHONPATH=. python scripts/measure_busy.py [--count 400] [--side 512] [--reps 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from prometheus_client import CollectorRegistry

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench  # scripts/bench.py: the cached CT image sets

from gateway import busy
from gateway.app import Gateway
from gateway.config import GatewayConfig

Event = tuple[float, float]  # when a C-STORE handler ended (monotonic), its seconds


@dataclass
class Trace:
    name: str
    events: list[Event]
    wall_s: float

    @property
    def rate(self) -> float:
        return len(self.events) / self.wall_s


class _ReplayLoad:
    """The counters ``ReceiverLoad`` keeps, fed from a trace."""

    def __init__(self) -> None:
        self.total, self.n, self.ended = 0.0, 0, 0.0

    def seconds(self) -> float:
        return self.total

    def count(self) -> int:
        return self.n

    def last(self) -> float:
        return self.ended


def replay(events: list[Event]) -> dict[str, Any]:
    """The shares ``BurstHold`` would have read over this trace, and its answers."""
    now = [events[0][0]]
    load = _ReplayLoad()
    hold = busy.BurstHold(load, 5.0, lambda: datetime.now(UTC), lambda: now[0])
    samples: list[tuple[float, float]] = []
    looks: list[bool] = []
    i = 0
    steps = round(busy.POLL_S / busy.HELD_POLL_S)
    end = events[-1][0]
    tick = 0
    while now[0] <= end:
        while i < len(events) and events[i][0] <= now[0]:
            load.total += events[i][1]
            load.n += 1
            load.ended = events[i][0]
            i += 1
        if tick % steps == 0:
            hold.sample()
            samples.append((now[0], load.total))
        looks.append(hold.saturated())
        tick += 1
        now[0] = events[0][0] + tick * busy.HELD_POLL_S
    per = round(busy.WINDOW_S / busy.POLL_S)
    single = [(b[1] - a[1]) / (b[0] - a[0]) for a, b in zip(samples, samples[per:])]
    both = [min(x, y) for x, y in zip(single, single[per:])]
    skip = 2 * per * steps  # the first two windows: the hold cannot know yet
    return {"window_share": _stats(single), "two_window_min": _stats(both),
            "saturated_looks": round(sum(looks[skip:]) / max(len(looks[skip:]), 1), 3)}


def _stats(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    q = statistics.quantiles(ordered, n=100)
    return {"min": round(ordered[0], 3), "p1": round(q[0], 3), "p5": round(q[4], 3),
            "p50": round(q[49], 3), "p95": round(q[94], 3), "p99": round(q[98], 3),
            "max": round(ordered[-1], 3), "n": len(ordered)}


def throttled_proxy(listen_port: int, port: int, bytes_per_s: float) -> None:
    """The ``--proxy`` mode: one connection, the sender's bytes passed on at ``bytes_per_s``,
    the gateway's answers at once."""
    with socket.create_server(("127.0.0.1", listen_port)) as server:
        print("listening", flush=True)
        client, _ = server.accept()
    upstream = socket.create_connection(("127.0.0.1", port))
    for s in (client, upstream):
        s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def answers() -> None:
        while data := upstream.recv(65536):
            client.sendall(data)
        client.close()

    threading.Thread(target=answers, daemon=True).start()
    start, sent = time.monotonic(), 0
    while data := client.recv(16384):
        sent += len(data)
        delay = start + sent / bytes_per_s - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        upstream.sendall(data)
    upstream.shutdown(socket.SHUT_WR)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def measure(name: str, command: list[str], events: list[Event], env: dict[str, str]) -> Trace:
    events.clear()
    started = time.monotonic()
    subprocess.run(command, check=True, env=env, stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL, timeout=900)
    taken = list(events)
    wall = taken[-1][0] - taken[0][0] if len(taken) > 1 else time.monotonic() - started
    return Trace(name, taken, wall)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--count", type=int, default=400)
    parser.add_argument("--side", type=int, default=512)
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--traces", type=Path)
    parser.add_argument("--proxy", nargs=3, type=float, metavar=("LISTEN", "PORT", "BYTES_PER_S"))
    args = parser.parse_args()
    if args.proxy:
        throttled_proxy(int(args.proxy[0]), int(args.proxy[1]), args.proxy[2])
        return 0
    images = bench.image_set("ct", args.count, args.side, True)
    work = Path(tempfile.mkdtemp(prefix="measure-busy-"))
    rules = work / "rules.toml"
    rules.write_text('[[rules]]\nname = "nobody"\nmatch = { calling_ae = ["NOBODY"] }\n'
                     'actions = [{ type = "set", tag = "InstitutionName", value = "X" }]\n')
    port = free_port()
    config = GatewayConfig.model_validate({
        "dicom": {"ae_title": "GATEWAY", "bind_host": "127.0.0.1", "port": port},
        "security": {"unknown_callers": ["echo", "store"]},
        "storage": {"spool_dir": str(work / "spool"), "min_free_mb": 1},
        "database": {"url": f"sqlite:///{work / 'gateway.db'}"},
        "metrics": {"enabled": False},
        "remap": {"rules_file": str(rules)},
    })
    app = Gateway(config, CollectorRegistry())
    assert app.load is not None
    events: list[Event] = []
    lock = threading.Lock()
    add = app.load.add

    def recording(seconds: float) -> None:
        add(seconds)
        with lock:
            events.append((time.monotonic(), seconds))

    app.load.add = recording  # type: ignore[method-assign]
    app.start()
    env = {**os.environ, "TCP_NODELAY": "1"}
    storescu = [str(bench.find_dcmtk("storescu")), "-aet", "CT_ROOM1", "-aec", "GATEWAY",
                "+sd", "127.0.0.1", str(port), str(images.folder)]

    def through_proxy(name: str, bytes_per_s: float) -> Trace:
        listen = free_port()
        proxy = subprocess.Popen([sys.executable, __file__, "--proxy", str(listen), str(port),
                                  str(bytes_per_s)], stdout=subprocess.PIPE, text=True)
        assert proxy.stdout is not None and proxy.stdout.readline().strip() == "listening"
        command = [*storescu[:-2], str(listen), storescu[-1]]
        try:
            return measure(name, command, events, env)
        finally:
            proxy.wait(30)

    traces: list[Trace] = []
    try:
        for _ in range(args.reps):
            flat = measure("saturated", storescu, events, env)
            traces.append(flat)
            bytes_per_s = images.total_bytes / images.count * flat.rate
            traces.append(through_proxy("half", bytes_per_s / 2))
            traces.append(through_proxy("third", bytes_per_s / 3))
    finally:
        app.stop()
    report = {
        "machine": {"cpus": os.cpu_count(), "loadavg": os.getloadavg()},
        "images": {"count": images.count, "side": images.side},
        "thresholds": {"BUSY_SHARE": busy.BUSY_SHARE, "STAY_SHARE": busy.STAY_SHARE},
        "runs": [{"name": t.name, "rate": round(t.rate, 1),
                  "seconds": round(t.wall_s, 2), **replay(t.events)} for t in traces],
    }
    print(json.dumps(report, indent=1))
    if args.traces:
        args.traces.write_text(json.dumps(
            {t.name + f"#{n}": [[round(e - t.events[0][0], 6), round(s, 6)] for e, s in t.events]
             for n, t in enumerate(traces)}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
