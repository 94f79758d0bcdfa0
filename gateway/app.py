"""Composition root: builds every part from the configuration, starts and stops them in order.

Nothing else in the package constructs collaborators; everything gets them through ``__init__``.

One process, or a supervisor and ``dicom.workers`` receiver processes (``gateway.receive.workers``):
the supervisor accepts connections and hands each to a worker, runs the forward and remap stages
(as child processes, as in one process), the HTTP endpoint, the scheduled jobs and HL7 intake;
each worker builds its own receiving half (``_receiving``: spool view, database engines, C-STORE,
query, worklist and MPPS services) after it forks.

``reload`` (SIGHUP to ``gateway serve``) applies an edited configuration to the same process
tree: new receivers take every new connection while the old ones drain, the background stages
and the job scheduler are rebuilt; what cannot change without a restart is listed in
``gateway.reload``.
"""

from __future__ import annotations

import logging
import shutil
import socket
import tempfile
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from prometheus_client import CollectorRegistry
from pydicom import config as pydicom_config
from sqlalchemy import Engine, text
from sqlalchemy.exc import SQLAlchemyError

from gateway import forksafe
from gateway.busy import ReceiverLoad
from gateway.cluster.internal import internal_app
from gateway.cluster.nodes import Heartbeat, NodeRegistry, NodeState, list_nodes
from gateway.cluster.peers import make_peers
from gateway.config import MAX_ASSOCIATIONS, GatewayConfig
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
from gateway.metrics import Metrics, process_ended, use_multiprocess
from gateway.query.retrieve import Loader
from gateway.query.service import QueryService
from gateway.receive import fastpath
from gateway.receive.associations import AssociationLedger
from gateway.receive.ingest import Ingest, is_recorded
from gateway.receive.scp import Receiver
from gateway.receive.spool import Spool
from gateway.receive.workers import Admissions, ReceiverWorkers, WorkerBoard
from gateway.reload import RULES_CONTENT, changed_keys, needing_restart, rules_digest
from gateway.remap.rules import RuleSet, load_rules
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


@dataclass
class _Receiving:
    """The receiving half: what one process needs to answer associations."""

    receiver: Receiver
    query: QueryService
    worklist: WorklistService

    def close(self) -> None:
        self.query.close()
        self.worklist.close()


class Gateway:
    def __init__(
        self,
        config: GatewayConfig,
        registry: CollectorRegistry | None = None,
        free_bytes: Callable[[Path], int] | None = None,
        processes: bool = False,
    ) -> None:
        """``processes``: honour ``dicom.workers`` (fork that many receiver processes; metrics
        in multiprocess mode, which is process-wide). Only for the caller that owns the process,
        ``gateway serve``; without it the gateway is one process whatever ``workers`` says."""
        fastpath.check_version()
        quiet_pynetdicom()
        # Values that break VR rules (vendors send plenty) must not fail storage; structure must.
        pydicom_config.settings.reading_validation_mode = pydicom_config.IGNORE
        self.config = config
        self._free_bytes = free_bytes
        workers = config.dicom.workers if processes else 1
        self.engine = make_engine(config.database.url, config.database.busy_timeout_s)
        upgrade(self.engine, node_name=config.forward.node_name)
        self.sessions = make_sessions(self.engine)
        # The association ledger is written while the peer waits for A-ASSOCIATE-AC; its rows
        # need not be on disk before the answer (SQLite: no fsync; the next instance's durable
        # commit makes them durable too, as WAL commits are ordered).
        self.ledger_engine = make_engine(config.database.url, config.database.busy_timeout_s,
                                         durable=False)
        self.spool = Spool(config.storage.spool_dir, config.storage.min_free_mb * MIB, free_bytes)
        node = config.forward.node_name
        removed = self.spool.recover(lambda name: is_recorded(self.engine, name, node))
        if removed:
            log.warning("removed %d unacknowledged partial files left by a previous stop", removed)
        fastpath.receive_datasets_into(self.spool.incoming)
        self._metrics_dir: Path | None = None
        if workers > 1:
            self._metrics_dir = Path(tempfile.mkdtemp(prefix="gateway-metrics-"))
            use_multiprocess(self._metrics_dir)
        self.metrics = Metrics(registry if registry is not None else CollectorRegistry(),
                               self._metrics_dir)
        self.metrics.watch_spool(self.spool.free_bytes, self.spool.min_free_bytes)
        self.metrics.start_at_zero([d.name for d in config.forward.destinations])
        # Children forked later (a crashed receiver's replacement, a reload's) find the metrics'
        # locks free whatever the supervisor's threads were doing (gateway.forksafe)
        forksafe.guard(self.metrics)
        # Node-wide counts, a slot per receiver of two generations: during a reload the new
        # receivers and the draining old ones count together (gateway.receive.workers)
        self._board = WorkerBoard(2 * workers, MAX_ASSOCIATIONS)
        self._generation = 0
        self._draining: threading.Thread | None = None
        # How busy the receivers are, read by the background stages' processes (gateway.busy)
        self.load: ReceiverLoad | None = None
        if config.remap.rules_file is not None or config.forward.destinations:
            self.load = ReceiverLoad(slots=2 * workers if workers > 1 else 1)
        self._rules_digest = rules_digest(config)
        self._rules: RuleSet | None = None
        self.remap_worker: StageProcess | None = None
        if config.remap.rules_file is not None:
            self._rules = load_rules(config.remap.rules_file)
            self.remap_worker = StageProcess(
                "remap", remap_stage(config, self.spool.root, self.load), REMAP_NICENESS,
                config.dicom.shutdown_grace_s,
            )
        self.forwarder: StageProcess | None = None
        self._router: Router | None = None
        # Built here too, so a missing password stops `serve` before it listens; the Orthanc
        # ones fetch back, for C-MOVE and C-GET, what retention removed from the spool.
        destinations = [build_destination(d, config.dicom.ae_title)
                        for d in config.forward.destinations]
        self._orthancs = {d.name: d for d in destinations if isinstance(d, Orthanc)}
        self._destination_names = [d.name for d in destinations]
        if destinations:
            counters = PrometheusCounters(self.metrics)
            self.forwarder = StageProcess(
                "forward", forward_stage(config, self.spool, self.load), FORWARD_NICENESS,
                config.dicom.shutdown_grace_s, lambda message: apply(counters, message),
            )
            self._router = Router(config.forward)
            self.metrics.watch_queue(lambda: queue_stats(self.engine, self._destination_names))
        self.receiver: Receiver | None = None
        self._receiving: _Receiving | None = None
        self.workers: ReceiverWorkers | None = None
        if workers == 1:
            self._receiving = self._receiving_half(
                self.engine, self.ledger_engine, self.spool,
                self._board.admissions(0, config.dicom.max_associations))
            self.receiver = self._receiving.receiver
        else:
            self.workers = ReceiverWorkers(
                workers, self._receiver_process, self._board,
                (config.dicom.bind_host, config.dicom.port), config.dicom.shutdown_grace_s,
                self._receiver_process_ended,
            )
        self.jobs = self._scheduler(config)
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
            internal = None
            if config.cluster.secret_sha256 is not None:
                internal = internal_app(self.engine, self.spool.root, node,
                                        config.cluster.secret_sha256)
            self.http = WebServer(config.metrics.host, config.metrics.port,
                                  build_app(self.metrics.registry, self.health, api, internal,
                                            self.node_states))
        url = (config.cluster.url_of(config.metrics.host, self.http.port)
               if self.http is not None else None)
        self.nodes = NodeRegistry(self.engine, node, url, config.cluster.heartbeat_s)
        self.heartbeat = Heartbeat(self.nodes, config.cluster.heartbeat_s)

    def _scheduler(self, config: GatewayConfig) -> JobScheduler:
        node = config.forward.node_name
        runs = RunLedger(self.engine, node)
        return JobScheduler(
            config.jobs,
            JobRunner(runs, JobContext(config, self.sessions, node, _now, _debug, self.metrics),
                      self.metrics),
            runs,
        )

    def reload(self, config: GatewayConfig) -> str:
        """Apply ``config`` (read and checked as at start: ``gateway.reload.read``) to the
        running tree, all of it or none; returns the result counted in
        ``gateway_config_reloads_total``: ``applied``, ``unchanged`` or ``needs_restart``.

        Applied: the receivers (processes, or the one in this process) are replaced, the new
        ones taking every new connection while the old ones finish their associations within
        ``dicom.shutdown_grace_s``; the forward and remap stages are stopped as on SIGTERM and
        started again; the job scheduler is rebuilt. Logged by key name only, never values."""
        changed = changed_keys(self.config, config)
        digest = rules_digest(config)
        if "remap.rules_file" not in changed and digest != self._rules_digest:
            changed.append(RULES_CONTENT)
        if not changed:
            log.info("configuration reloaded: nothing changed")
            return self._counted("unchanged")
        restart = needing_restart(self.config, config, changed)
        if restart:
            log.error("configuration NOT reloaded: %s cannot change while the gateway runs; "
                      "restart it to apply them (systemctl restart gateway); still running on "
                      "the previous configuration, nothing of the new one applied",
                      ", ".join(restart))
            return self._counted("needs_restart")
        # Everything that may fail is built before anything is swapped
        rules = load_rules(config.remap.rules_file) if config.remap.rules_file else None
        destinations = [build_destination(d, config.dicom.ae_title)
                        for d in config.forward.destinations]
        router = Router(config.forward) if destinations else None
        self.config, self._rules, self._rules_digest = config, rules, digest
        self._orthancs = {d.name: d for d in destinations if isinstance(d, Orthanc)}
        self._router = router
        self._destination_names = [d.name for d in destinations]
        self.metrics.start_at_zero(self._destination_names)
        # The receivers first: from now on every new association gets the new configuration
        if self.workers is not None:
            self.workers.replace()
        else:
            self._replace_receiver()
        if self.forwarder is not None:
            self.forwarder.replace(forward_stage(config, self.spool, self.load))
        if self.remap_worker is not None:
            self.remap_worker.replace(remap_stage(config, self.spool.root, self.load))
        self.jobs.stop()
        self.jobs = self._scheduler(config)
        self.jobs.start(reloaded=True)
        log.info("configuration reloaded; changed: %s", ", ".join(changed))
        return self._counted("applied")

    def refuse_reload(self, problems: list[str]) -> str:
        """The edited file cannot be used: say why, run on."""
        for problem in problems:
            log.error("configuration NOT reloaded: %s", problem)
        log.error("still running on the previous configuration; fix the file and reload again "
                  "(`gateway check-config` shows the same problems)")
        return self._counted("invalid")

    def _counted(self, result: str) -> str:
        self.metrics.config_reloads.labels(result).inc()
        return result

    def _replace_receiver(self) -> None:
        """One process: a receiver built from the new configuration takes over the listening
        socket; the old one finishes its associations in a thread of its own. A previous
        reload's receiver still draining is waited for first (its slot on the board is reused)."""
        old = self._receiving
        assert old is not None
        if self._draining is not None:
            self._draining.join()
        self._generation = 1 - self._generation
        self._board.forget(self._generation)
        new = self._receiving_half(
            self.engine, self.ledger_engine, self.spool,
            self._board.admissions(self._generation, self.config.dicom.max_associations))
        new.receiver.start(listening=old.receiver.stop_accepting())
        self._receiving, self.receiver = new, new.receiver
        grace_s = self.config.dicom.shutdown_grace_s

        def drain() -> None:
            old.receiver.drain(grace_s)
            old.close()

        self._draining = threading.Thread(target=drain, name="receiver-drain", daemon=True)
        self._draining.start()

    def _receiving_half(self, engine: Engine, ledger_engine: Engine, spool: Spool,
                        admissions: Admissions | None = None) -> _Receiving:
        config = self.config
        remapper = (Remapper(self._rules, config.remap, engine, node=config.forward.node_name)
                    if self._rules is not None else None)
        query = QueryService(
            engine, config.query, config.dicom.ae_title, config.security.peers,
            Loader(spool.root, self._orthancs, config.forward.node_name,
                   make_peers(config, engine)),
            self.metrics,
        )
        worklist = WorklistService(engine, config.worklist, config.query.case_insensitive_names,
                                   self.metrics)
        receiver = Receiver(
            config.dicom,
            PeerPolicy(config.security, config.dicom.ae_title),
            Ingest(
                spool,
                engine,
                config.storage.duplicate_policy,
                remapper=remapper,
                on_pending=self.remap_worker.notify if self.remap_worker else lambda _: None,
                router=self._router,
                on_queued=self.forwarder.notify if self.forwarder else lambda: None,
                node_name=config.forward.node_name,
            ),
            AssociationLedger(ledger_engine),
            self.metrics,
            query,
            self.load,
            performed=PerformedStepService(engine, self.metrics),
            worklist=worklist,
            admissions=admissions,
        )
        return _Receiving(receiver, query, worklist)

    def _receiver_process(self, slot: int, handed: socket.socket) -> _ReceiverProcess:
        """Runs in receiver process ``slot``, just forked: its own spool folders (recovered
        from its predecessor's crash, if any), its own database engines, its own services."""
        config = self.config
        # The supervisor's pools, copied by fork: dropped here without closing its connections
        self.engine.dispose(close=False)
        self.ledger_engine.dispose(close=False)
        if self.load is not None:
            self.load.use_slot(slot)
        spool = Spool(config.storage.spool_dir, config.storage.min_free_mb * MIB,
                      self._free_bytes, worker=slot)
        engine = make_engine(config.database.url, config.database.busy_timeout_s)
        ledger_engine = make_engine(config.database.url, config.database.busy_timeout_s,
                                    durable=False)
        removed = spool.recover(
            lambda name: is_recorded(engine, name, config.forward.node_name))
        if removed:
            log.warning("receiver process %d: removed %d unacknowledged files its predecessor "
                        "had named", slot, removed)
        fastpath.receive_datasets_into(spool.incoming)
        receiving = self._receiving_half(engine, ledger_engine, spool,
                                         self._board.admissions(slot, config.dicom.max_associations))
        return _ReceiverProcess(receiving, handed, (engine, ledger_engine))

    def _receiver_process_ended(self, pid: int, crashed: bool) -> None:
        removed = self.spool.remove_incoming_of(pid)
        if removed:
            log.warning("removed %d partly received files of receiver process %d", removed, pid)
        if crashed:  # not one that drained and exited after a reload
            self.metrics.receiver_restarts.inc()
        if self._metrics_dir is not None:
            process_ended(self._metrics_dir, pid)

    def health(self) -> dict[str, bool]:
        try:
            with self.engine.connect() as connection:
                connection.execute(text("SELECT 1"))
            database = True
        except SQLAlchemyError:
            database = False
        checks = {"database": database, "spool_free": self.spool.has_room_for(0)}
        if self.workers is not None:
            checks["receiving"] = self.workers.alive() > 0
        if self.forwarder is not None:
            checks["forwarding"] = self.forwarder.alive()
        if self.remap_worker is not None:
            checks["rewriting"] = self.remap_worker.alive()
        return checks

    def node_states(self) -> list[NodeState]:
        """Every node of the cluster (this one too), for ``/healthz``; a database that does not
        answer lists none (the ``database`` check says so)."""
        try:
            return list_nodes(self.engine)
        except SQLAlchemyError:
            return []

    def start(self) -> None:
        # First: these fork, and no other thread of this process should exist yet.
        if self.forwarder is not None:
            self.forwarder.start()
        if self.remap_worker is not None:
            self.remap_worker.start()
        if self.workers is not None:
            self.workers.start()
        if self.http is not None:
            self.http.start()
        if self.receiver is not None:
            self.receiver.start()
        if self.hl7 is not None:
            self.hl7.start()
        self.jobs.start()
        self.heartbeat.start()

    def stop(self) -> None:
        self.heartbeat.stop()
        self.jobs.stop()
        if self.hl7 is not None:
            self.hl7.stop()
        if self.receiver is not None:
            self.receiver.stop(self.config.dicom.shutdown_grace_s)
        if self._draining is not None:
            self._draining.join()
        if self.workers is not None:
            self.workers.stop()  # each drains its associations within shutdown_grace_s
        if self._receiving is not None:
            self._receiving.close()
        if self.remap_worker is not None:
            self.remap_worker.stop()
        if self.forwarder is not None:
            self.forwarder.stop()
        if self.http is not None:
            self.http.stop()
        self.engine.dispose()
        self.ledger_engine.dispose()
        if self._metrics_dir is not None:
            shutil.rmtree(self._metrics_dir, ignore_errors=True)


class _ReceiverProcess:
    """A worker's receiving half, as ``gateway.receive.workers`` runs it."""

    def __init__(self, receiving: _Receiving, handed: socket.socket,
                 engines: tuple[Engine, ...]) -> None:
        self._receiving = receiving
        self._handed = handed
        self._engines = engines

    def start(self) -> None:
        self._receiving.receiver.start(self._handed)

    def stop(self, grace_s: float) -> None:
        self._receiving.receiver.stop(grace_s)
        self._receiving.close()
        for engine in self._engines:
            engine.dispose()


def _now() -> datetime:
    return datetime.now(UTC)


def _debug(line: str) -> None:
    """A job's progress line: the scheduler's runs are followed through job_runs, not the log."""
    log.debug("job progress: %s", line)
