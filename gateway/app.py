"""Composition root: builds every part from the configuration, starts and stops them in order.

Nothing else in the package constructs collaborators; everything gets them through ``__init__``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry
from pydicom import config as pydicom_config
from sqlalchemy import text
from sqlalchemy.exc import SQLAlchemyError

from gateway.busy import ReceiverLoad
from gateway.config import GatewayConfig
from gateway.db.engine import make_engine, make_sessions
from gateway.db.migrate import upgrade
from gateway.dicom.peers import PeerPolicy
from gateway.forward.counters import PrometheusCounters, apply
from gateway.forward.destinations.orthanc import Orthanc
from gateway.forward.outbox import queue_stats
from gateway.forward.routes import Router
from gateway.forward.service import build_destination, forward_stage
from gateway.jobs.kinds import JobContext
from gateway.jobs.ledger import RunLedger
from gateway.jobs.runner import JobRunner
from gateway.jobs.scheduler import JobScheduler
from gateway.logs import quiet_pynetdicom
from gateway.metrics import Metrics
from gateway.query.retrieve import Loader
from gateway.query.service import QueryService
from gateway.receive import fastpath
from gateway.receive.associations import AssociationLedger
from gateway.receive.ingest import Ingest, is_recorded
from gateway.receive.scp import Receiver
from gateway.receive.spool import Spool
from gateway.remap.rules import load_rules
from gateway.remap.stage import Remapper
from gateway.remap.worker import remap_stage
from gateway.stage_process import StageProcess
from gateway.web.app import build_app
from gateway.web.server import WebServer
from gateway.worklist.find import WorklistService
from gateway.worklist.hl7 import Hl7Intake
from gateway.worklist.mllp import MllpListener
from gateway.worklist.mpps import PerformedStepService

log = logging.getLogger(__name__)
MIB = 1024 * 1024
# Background stages run below the receiver: when both cores are busy, the modality waiting on a
# C-STORE comes first; their queues (in the database) absorb what they fall behind.
FORWARD_NICENESS = 5
REMAP_NICENESS = 5


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        registry: CollectorRegistry | None = None,
        free_bytes: Callable[[Path], int] | None = None,
    ) -> None:
        fastpath.check_version()
        quiet_pynetdicom()
        # Values that break VR rules (vendors send plenty) must not fail storage; structure must.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        self.config = config
        self.engine = make_engine(config.database.url, config.database.busy_timeout_s)
        upgrade(self.engine)
        self.sessions = make_sessions(self.engine)
        # The association ledger is written while the peer waits for A-ASSOCIATE-AC; its rows
        # need not be on disk before the answer (SQLite: no fsync; the next instance's durable
        # commit makes them durable too, as WAL commits are ordered).
        self.ledger_engine = make_engine(config.database.url, config.database.busy_timeout_s,
                                         durable=False)
        self.spool = Spool(config.storage.spool_dir, config.storage.min_free_mb * MIB, free_bytes)
        removed = self.spool.recover(lambda name: is_recorded(self.engine, name))
        if removed:
            log.warning("removed %d unacknowledged partial files left by a previous stop", removed)
        fastpath.receive_datasets_into(self.spool.incoming)
        self.metrics = Metrics(registry if registry is not None else CollectorRegistry())
        self.metrics.watch_spool(self.spool.free_bytes, self.spool.min_free_bytes)
        # How busy the receiver is, read by the background stages' processes (gateway.busy)
        self.load: ReceiverLoad | None = None
        if config.remap.rules_file is not None or config.forward.destinations:
            self.load = ReceiverLoad()
        self.remapper: Remapper | None = None
        self.remap_worker: StageProcess | None = None
        if config.remap.rules_file is not None:
            self.remapper = Remapper(load_rules(config.remap.rules_file), config.remap, self.engine)
            self.remap_worker = StageProcess(
                "remap", remap_stage(config, self.spool.root, self.load), REMAP_NICENESS,
                config.dicom.shutdown_grace_s,
            )
        self.forwarder: StageProcess | None = None
        router: Router | None = None
        # Built here too, so a missing password stops `serve` before it listens; the Orthanc
        # ones fetch back, for C-MOVE and C-GET, what retention removed from the spool.
        destinations = [build_destination(d, config.dicom.ae_title)
                        for d in config.forward.destinations]
        orthancs = {d.name: d for d in destinations if isinstance(d, Orthanc)}
        if destinations:
            counters = PrometheusCounters(self.metrics)
            self.forwarder = StageProcess(
                "forward", forward_stage(config, self.spool, self.load), FORWARD_NICENESS,
                config.dicom.shutdown_grace_s, lambda message: apply(counters, message),
            )
            router = Router(config.forward)
            names = [d.name for d in destinations]
            self.metrics.watch_queue(lambda: queue_stats(self.engine, names))
        self.query = query = QueryService(
            self.engine, config.query, config.dicom.ae_title, config.security.peers,
            Loader(self.spool.root, orthancs), self.metrics,
        )
        self.worklist = WorklistService(self.engine, config.worklist,
                                        config.query.case_insensitive_names, self.metrics)
        self.receiver = Receiver(
            config.dicom,
            PeerPolicy(config.security, config.dicom.ae_title),
            Ingest(
                self.spool,
                self.engine,
                config.storage.duplicate_policy,
                remapper=self.remapper,
                on_pending=self.remap_worker.notify if self.remap_worker else lambda _: None,
                router=router,
                on_queued=self.forwarder.notify if self.forwarder else lambda: None,
            ),
            AssociationLedger(self.ledger_engine),
            self.metrics,
            query,
            self.load,
            performed=PerformedStepService(self.engine, self.metrics),
            worklist=self.worklist,
        )
        node = config.forward.node_name
        runs = RunLedger(self.engine, node)
        self.jobs = JobScheduler(
            config.jobs,
            JobRunner(runs, JobContext(config, self.sessions, node, _now, _debug, self.metrics),
                      self.metrics),
            runs,
        )
        self.hl7: MllpListener | None = None
        if config.hl7.enabled:
            h = config.hl7
            self.hl7 = MllpListener(h.bind_host, h.port, h.max_message_bytes, h.max_connections,
                                    Hl7Intake(h, self.sessions, self.metrics, _now),
                                    config.dicom.shutdown_grace_s)
        self.http: WebServer | None = None
        if config.metrics.enabled:
            api = None
            if config.api.tokens:  # the export API (gateway.web.api): off without tokens
                from gateway.web.api import ExportApi

                api = ExportApi(config, self.sessions, self.metrics, _now).app()
            self.http = WebServer(config.metrics.host, config.metrics.port,
                                  build_app(self.metrics.registry, self.health, api))

    def health(self) -> dict[str, bool]:
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            database = True
        except SQLAlchemyError:
            database = False
        checks = {"database": database, "spool_free": self.spool.has_room_for(0)}
        if self.forwarder is not None:
            checks["forwarding"] = self.forwarder.alive()
        if self.remap_worker is not None:
            checks["rewriting"] = self.remap_worker.alive()
        return checks

    def start(self) -> None:
        # First: these fork, and no other thread of this process should exist yet.
        if self.forwarder is not None:
            self.forwarder.start()
        if self.remap_worker is not None:
            self.remap_worker.start()
        if self.http is not None:
            self.http.start()
        self.receiver.start()
        if self.hl7 is not None:
            self.hl7.start()
        self.jobs.start()

    def stop(self) -> None:
        self.jobs.stop()
        if self.hl7 is not None:
            self.hl7.stop()
        self.receiver.stop(self.config.dicom.shutdown_grace_s)
        self.query.close()
        self.worklist.close()
        if self.remap_worker is not None:
            self.remap_worker.stop()
        if self.forwarder is not None:
            self.forwarder.stop()
        if self.http is not None:
            self.http.stop()
        self.engine.dispose()
        self.ledger_engine.dispose()


def _now() -> datetime:
    return datetime.now(UTC)


def _debug(line: str) -> None:
    """A job's progress line: the scheduler's runs are followed through job_runs, not the log."""
    log.debug("job progress: %s", line)
