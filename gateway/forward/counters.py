"""What the forward stage reports to metrics, as plain calls, so that it can run in a child
process: there the calls travel over a queue to the parent, which owns ``/metrics``."""

from __future__ import annotations

from typing import Any, Protocol

from gateway.metrics import Metrics


class ForwardCounters(Protocol):
    def forwarded(self, destination: str, count: int, batch_s: float) -> None: ...
    def failed(self, destination: str, kind: str) -> None: ...
    def dead(self, destination: str) -> None: ...
    def breaker(self, destination: str, is_open: bool) -> None: ...
    def confirmed(self, destination: str, latencies_s: list[float]) -> None: ...
    def requeued(self, destination: str, count: int) -> None: ...
    def verify_gave_up(self, destination: str, count: int) -> None: ...


class PrometheusCounters:
    def __init__(self, metrics: Metrics) -> None:
        self._m = metrics

    def forwarded(self, destination: str, count: int, batch_s: float) -> None:
        self._m.forwarded.labels(destination).inc(count)
        self._m.forward_batch_seconds.labels(destination).observe(batch_s)

    def failed(self, destination: str, kind: str) -> None:
        self._m.forward_failures.labels(destination, kind).inc()

    def dead(self, destination: str) -> None:
        self._m.dead_letters.labels(destination).inc()

    def breaker(self, destination: str, is_open: bool) -> None:
        self._m.breaker_open.labels(destination).set(1 if is_open else 0)

    def confirmed(self, destination: str, latencies_s: list[float]) -> None:
        self._m.confirmed.labels(destination).inc(len(latencies_s))
        for latency in latencies_s:
            self._m.forward_latency.labels(destination).observe(latency)

    def requeued(self, destination: str, count: int) -> None:
        self._m.requeued_missing.labels(destination).inc(count)

    def verify_gave_up(self, destination: str, count: int) -> None:
        self._m.verify_gave_up.labels(destination).inc(count)
        self._m.dead_letters.labels(destination).inc(count)


class QueuedCounters:
    """In the child: each call becomes ``(method, args)`` on a multiprocessing queue."""

    def __init__(self, queue: Any) -> None:
        self._queue = queue

    def __getattr__(self, method: str) -> Any:
        def send(*args: Any) -> None:
            self._queue.put((method, args))

        return send


def apply(counters: ForwardCounters, message: tuple[str, tuple[Any, ...]]) -> None:
    """In the parent: replay one queued call."""
    method, args = message
    if method in ("forwarded", "failed", "dead", "breaker", "confirmed", "requeued",
                  "verify_gave_up"):
        getattr(counters, method)(*args)
