"""Prometheus metrics, all on a registry passed in, so each test and each app has its own.

Labels carry AE titles, statuses and reasons only: never patient values.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

STORE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)


class Metrics:
    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.associations = Counter(
            "gateway_associations",
            "Association requests by result and rejection reason",
            ["result", "reason"],
            registry=registry,
        )
        self.associations_active = Gauge(
            "gateway_associations_active", "Associations open now", registry=registry
        )
        self.instances = Counter(
            "gateway_instances_received",
            "C-STORE requests answered, by calling AE and DIMSE status",
            ["calling_ae", "status"],
            registry=registry,
        )
        self.bytes = Counter(
            "gateway_received_bytes",
            "Bytes of instances kept, by calling AE",
            ["calling_ae"],
            registry=registry,
        )
        self.duplicates = Counter(
            "gateway_duplicates",
            "Instances received again, by outcome (identical, kept_first, replaced, rejected)",
            ["outcome"],
            registry=registry,
        )
        self.store_seconds = Histogram(
            "gateway_store_seconds",
            "Time from a complete C-STORE request to its answer",
            buckets=STORE_BUCKETS_S,
            registry=registry,
        )
        self.spool_free_bytes = Gauge(
            "gateway_spool_free_bytes", "Free space on the spool's filesystem", registry=registry
        )

    def watch_spool(self, free_bytes: Callable[[], int]) -> None:
        """Read free space at scrape time, so the gauge is never stale."""
        self.spool_free_bytes.set_function(lambda: float(free_bytes()))
