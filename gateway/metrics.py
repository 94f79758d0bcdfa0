"""Prometheus metrics, all on a registry passed in, so each test and each app has its own.

Labels carry AE titles, statuses and reasons only: never patient values.

With several receiver processes (``dicom.workers``) the node runs in prometheus-client's
multiprocess mode (``use_multiprocess``): every process keeps its values in files of its own in a
fresh folder, and ``/metrics`` sums them with ``MultiProcessCollector`` (a counter counts each
instance once, whichever worker took it; ``gateway_associations_active`` is the sum over live
processes). Figures read at scrape time (spool free space, queue depth) are collected by the
supervisor beside it. Series names and labels are the same in both modes.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Protocol

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    values,
)
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.multiprocess import MultiProcessCollector, mark_process_dead
from prometheus_client.registry import Collector
from sqlalchemy.exc import SQLAlchemyError

STORE_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30)
LATENCY_BUCKETS_S = (0.25, 0.5, 1, 2, 5, 10, 30, 60, 120, 300, 900, 3600, 4 * 3600, 24 * 3600)


class QueueRow(Protocol):
    @property
    def destination(self) -> str: ...
    @property
    def oldest_unconfirmed(self) -> datetime | None: ...


JOB_BUCKETS_S = (0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 4 * 3600)


def use_multiprocess(folder: Path) -> None:
    """Switch this process, and every process it forks from now on, to multiprocess mode: each
    metric made after this call keeps its values in ``folder`` (which must be empty: a fresh
    one per run, or a previous run's counts would be added in). Process-wide, as
    prometheus-client reads it; ``gateway serve`` calls it, never a test process."""
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(folder)
    values.ValueClass = values.MultiProcessValue()


def process_ended(folder: Path, pid: int) -> None:
    """A worker exited: its live gauges (open associations) no longer count; its counters do."""
    mark_process_dead(pid, str(folder))


class Metrics:
    def __init__(self, registry: CollectorRegistry, multiprocess: Path | None = None) -> None:
        """``multiprocess``: the folder given to ``use_multiprocess``; ``registry`` then serves
        every process's values, and the metrics themselves are not registered on it."""
        self._multiprocess = multiprocess
        own = registry if multiprocess is None else None
        # No ``*_created`` series beside every counter and histogram (prometheus-client's
        # default): a timestamp per series nobody graphs, doubling what each scrape carries.
        # Process-wide in prometheus-client, so it is set here, where the metrics are made.
        disable_created_metrics()
        self.registry = registry
        self.associations = Counter(
            "gateway_associations",
            "Association requests by result and rejection reason",
            ["result", "reason"],
            registry=own,
        )
        self.associations_active = Gauge(
            "gateway_associations_active", "Associations open now", registry=own,
            multiprocess_mode="livesum",
        )
        self.instances = Counter(
            "gateway_instances_received",
            "C-STORE requests answered, by calling AE and DIMSE status",
            ["calling_ae", "status"],
            registry=own,
        )
        self.bytes = Counter(
            "gateway_received_bytes",
            "Bytes of instances kept, by calling AE",
            ["calling_ae"],
            registry=own,
        )
        self.duplicates = Counter(
            "gateway_duplicates",
            "Instances received again, by outcome (identical, kept_first, replaced, rejected)",
            ["outcome"],
            registry=own,
        )
        self.receiver_restarts = Counter(
            "gateway_receiver_restarts",
            "Receiver processes started again after one died (dicom.workers > 1)",
            registry=own,
        )
        self.config_reloads = Counter(
            "gateway_config_reloads",
            "Configuration reloads (SIGHUP) by result: applied, unchanged, invalid, needs_restart",
            ["result"],
            registry=own,
        )
        self.store_seconds = Histogram(
            "gateway_store_seconds",
            "Time from a complete C-STORE request to its answer",
            buckets=STORE_BUCKETS_S,
            registry=own,
        )
        if multiprocess is not None:
            MultiProcessCollector(registry, path=str(multiprocess))

        d = ["destination"]
        self.forwarded = Counter("gateway_forwarded", "Instances a destination said it stored",
                                 d, registry=own)
        self.forward_failures = Counter(
            "gateway_forward_failures", "Failed sends by destination and kind (retriable, permanent)",
            d + ["kind"], registry=own)
        self.dead_letters = Counter("gateway_forward_dead", "Jobs moved to the dead letters",
                                    d, registry=own)
        self.confirmed = Counter("gateway_forward_confirmed",
                                 "Instances the destination was asked about and holds", d,
                                 registry=own)
        self.requeued_missing = Counter(
            "gateway_forward_requeued_missing",
            "Forwarded instances the destination did not hold when verified (sent again)", d,
            registry=own)
        self.verify_gave_up = Counter(
            "gateway_forward_verify_gave_up",
            "Instances dead-lettered because the destination still lacked them after "
            "forward.max_verify_misses verifications (it may change UIDs)", d, registry=own)
        self.forward_latency = Histogram(
            "gateway_forward_latency_seconds", "From received to confirmed at the destination",
            d, buckets=LATENCY_BUCKETS_S, registry=own)
        self.forward_batch_seconds = Histogram(
            "gateway_forward_batch_seconds", "Time to send one claimed batch", d,
            buckets=STORE_BUCKETS_S, registry=own)
        self.breaker_open = Gauge("gateway_forward_breaker_open",
                                  "1 while the destination's circuit breaker is open", d,
                                  registry=own, multiprocess_mode="mostrecent")

        self.queries = Counter("gateway_queries",
                               "C-FIND, C-MOVE and C-GET requests by kind, calling AE and status",
                               ["kind", "calling_ae", "status"], registry=own)
        self.query_seconds = Histogram("gateway_query_seconds", "C-FIND request to final response",
                                       buckets=STORE_BUCKETS_S, registry=own)
        self.suboperations = Counter("gateway_retrieve_suboperations",
                                     "Instances offered to C-MOVE and C-GET sub-operations",
                                     ["kind"], registry=own)

        # Modality Worklist (gateway.worklist)
        self.worklist_queries = Counter(
            "gateway_worklist_queries", "Modality Worklist C-FIND requests by calling AE and status",
            ["calling_ae", "status"], registry=own)
        self.worklist_items_returned = Counter(
            "gateway_worklist_items_returned", "Worklist items answered, by calling AE",
            ["calling_ae"], registry=own)
        self.worklist_query_seconds = Histogram(
            "gateway_worklist_query_seconds", "Modality Worklist C-FIND request to final response",
            buckets=STORE_BUCKETS_S, registry=own)

        # Scheduled jobs (gateway.jobs)
        self.job_runs = Counter("gateway_job_runs", "Job runs by job and outcome",
                                ["job", "outcome"], registry=own)
        self.job_seconds = Histogram("gateway_job_run_seconds", "How long each job run took",
                                     ["job"], buckets=JOB_BUCKETS_S, registry=own)
        self.job_last_success = Gauge("gateway_job_last_success_timestamp_seconds",
                                      "When each job last ended in success (Unix time)",
                                      ["job"], registry=own, multiprocess_mode="max")

        # HL7 order intake (gateway.worklist.hl7): message_type is ORM^O01, OMI^O23, "other"
        # (answered AR) or "unknown" (no readable MSH); ack_code AA, AE or AR
        self.hl7_messages = Counter("gateway_hl7_messages", "HL7 messages by type and ACK code",
                                    ["message_type", "ack_code"], registry=own)
        # Modality Performed Procedure Steps (gateway.worklist.mpps)
        self.mpps_transitions = Counter(
            "gateway_mpps_transitions",
            "MPPS transitions accepted, by the status reached (in_progress, completed, "
            "discontinued)", ["status"], registry=own)
        # Exports (gateway.export): one per archive
        self.exports = Counter("gateway_exports", "Export archives by outcome (success, failed)",
                               ["outcome"], registry=own)
        self.export_bytes = Counter("gateway_export_bytes", "Bytes of export archives written",
                                    registry=own)
        self.export_seconds = Histogram("gateway_export_seconds",
                                        "Time to build and place one export archive",
                                        buckets=JOB_BUCKETS_S, registry=own)
        self.export_previews = Counter("gateway_export_previews",
                                       "Preview images rendered into export archives",
                                       registry=own)

    def start_at_zero(self, destinations: Sequence[str]) -> None:
        """Every series whose labels are known at start, at 0: a dashboard or alert then reads
        0, not "no data", before the first event (Prometheus' advice for labelled metrics), and
        in multiprocess mode a family nobody has written yet would not even be listed."""
        for outcome in ("identical", "kept_first", "replaced", "rejected"):
            self.duplicates.labels(outcome)
        for kind in ("move", "get"):
            self.suboperations.labels(kind)
        for name in destinations:
            for metric in (self.forwarded, self.dead_letters, self.confirmed,
                           self.requeued_missing, self.verify_gave_up, self.forward_latency,
                           self.forward_batch_seconds):
                metric.labels(name)

    def export_finished(self, outcome: str, bytes: int, seconds: float) -> None:
        self.exports.labels(outcome).inc()
        self.export_bytes.inc(bytes)
        self.export_seconds.observe(seconds)

    def previews_rendered(self, count: int) -> None:
        self.export_previews.inc(count)

    def job_finished(self, job: str, outcome: str, seconds: float, at: float) -> None:
        self.job_runs.labels(job, outcome).inc()
        self.job_seconds.labels(job).observe(seconds)
        if outcome == "success":
            self.job_last_success.labels(job).set(at)

    def watch_queue(self, stats: Callable[[], Sequence[QueueRow]]) -> None:
        """Queue depth and age are read from the outbox at scrape time."""
        self.registry.register(_QueueCollector(stats))

    def watch_spool(self, free_bytes: Callable[[], int], min_free_bytes: int) -> None:
        """Read free space at scrape time, so the gauge is never stale; the minimum beside it,
        so an alert compares the two instead of repeating the configured number."""
        self.registry.register(_SpoolCollector(free_bytes, min_free_bytes))


class _SpoolCollector(Collector):
    def __init__(self, free_bytes: Callable[[], int], min_free_bytes: int) -> None:
        self._free_bytes = free_bytes
        self._min_free_bytes = min_free_bytes

    def collect(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(
            "gateway_spool_min_free_bytes",
            "storage.min_free_mb: below this free space every C-STORE is refused",
            value=float(self._min_free_bytes))
        yield GaugeMetricFamily("gateway_spool_free_bytes", "Free space on the spool's filesystem",
                                value=float(self._free_bytes()))

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())


class _QueueCollector(Collector):
    def __init__(self, stats: Callable[[], Sequence[QueueRow]]) -> None:
        self._stats = stats

    def collect(self) -> Iterator[GaugeMetricFamily]:
        try:
            rows = self._stats()
        except SQLAlchemyError:
            return  # the database is away: no queue figures rather than a failed scrape
        depth = GaugeMetricFamily("gateway_forward_queue_depth",
                                  "Jobs by destination and state (not yet confirmed)",
                                  labels=["destination", "state"])
        age = GaugeMetricFamily("gateway_forward_oldest_unconfirmed_seconds",
                                "Age of the oldest job not yet confirmed", labels=["destination"])
        now = datetime.now(UTC)
        for row in rows:
            for state in ("queued", "waiting_remap", "sending", "forwarded", "dead"):
                depth.add_metric([row.destination, state], getattr(row, state))
            oldest = row.oldest_unconfirmed
            age.add_metric([row.destination], (now - oldest).total_seconds() if oldest else 0.0)
        yield depth
        yield age

    def describe(self) -> Iterator[GaugeMetricFamily]:
        return iter(())
