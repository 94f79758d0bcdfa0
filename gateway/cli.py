"""Command line: each command parses arguments and calls into the package. No logic lives here."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from gateway import __version__
from gateway.config import GatewayConfig, load
from gateway.errors import ConfigError

if TYPE_CHECKING:
    from gateway.app import Gateway

# Every command reads the same file: --config, else $GATEWAY_CONFIG, else config/gateway.toml.
DEFAULT_CONFIG = Path(os.environ.get("GATEWAY_CONFIG", "config/gateway.toml"))
EXIT_CONFIG = 2
EXIT_NO_DATA = 1
log = logging.getLogger("gateway")


def _refuse(path: Path, problems: list[str]) -> SystemExit:
    print(f"{path}: configuration has {len(problems)} problem(s):", file=sys.stderr)
    for problem in problems:
        print(f"  - {problem}", file=sys.stderr)
    return SystemExit(EXIT_CONFIG)


def _load_or_exit(path: Path) -> GatewayConfig:
    try:
        return load(path)
    except ConfigError as exc:
        raise _refuse(path, exc.problems)


def _ready_or_exit(path: Path, ports: bool = True) -> GatewayConfig:
    """The configuration and everything ``serve`` checks at start (``gateway.preflight``)."""
    from gateway import preflight

    config = _load_or_exit(path)
    found = preflight.problems(config, ports=ports)
    if found:
        raise _refuse(path, found)
    return config


def cmd_check_config(args: argparse.Namespace) -> int:
    _ready_or_exit(args.config)
    print("ok")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway import logs
    from gateway.app import Gateway

    config = _ready_or_exit(args.config)
    logs.setup(config.logging.level)
    stopping = threading.Event()
    reloading = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: no new associations; finishing those in flight",
                 signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    # Set before anything is built: SIGHUP's default action would end the process. The reload
    # itself runs in this (main) thread, between checks of ``stopping``.
    signal.signal(signal.SIGHUP, lambda *_: reloading.set())
    try:
        gateway = Gateway(config, processes=True)
        gateway.start()
    except ConfigError as exc:  # found while building, after the checks: say it the same way
        raise _refuse(args.config, exc.problems)
    except OSError as exc:  # a port taken between the check and the bind
        raise _refuse(args.config, [(f"cannot listen: {exc.strerror or exc}; check dicom.port and "
                                    "metrics.port (GATEWAY_DICOM__PORT, GATEWAY_METRICS__PORT)")])
    if gateway.http is not None:
        log.info("metrics on http://%s:%d/metrics", config.metrics.host, gateway.http.port)
    # A timed wait: the kernel may deliver the signal to one of pynetdicom's threads, and an
    # untimed wait in the main thread would then never run the Python-level handler.
    while not stopping.wait(0.5):
        if reloading.is_set():
            reloading.clear()
            _reload(gateway, args.config)
    gateway.stop()
    log.info("stopped")
    return 0


def _reload(gateway: Gateway, path: Path) -> None:
    """SIGHUP: read and check the file as at start, then apply it or say why not."""
    from gateway import reload

    log.info("received SIGHUP: reading %s", path)
    try:
        gateway.reload(reload.read(path))
    except ConfigError as exc:
        gateway.refuse_reload(exc.problems)
    except OSError:  # a fork refused (no memory, a process limit): said, not fatal
        log.exception("configuration reload failed part way; restart the gateway "
                      "(systemctl restart gateway) to run on one configuration")


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from gateway.db.engine import make_engine
    from gateway.db.migrate import upgrade

    config = _load_or_exit(args.config)
    engine = make_engine(config.database.url, config.database.busy_timeout_s)
    upgrade(engine, node_name=config.forward.node_name)
    engine.dispose()
    print("database schema is current")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from gateway.report import status_report

    config = _load_or_exit(args.config)
    db = _Database(config, args.config, read_only=True)
    try:
        with db.sessions() as session:
            print(status_report(session, config.storage.spool_dir,
                                config.storage.min_free_mb * 1024 * 1024,
                                waiting_uids=args.waiting, node=config.forward.node_name))
    finally:
        db.close()
    return 0


def _operator() -> str:
    return os.environ.get("SUDO_USER") or os.environ.get("USER") or "operator"


class _Database:
    """An operator command's view of the configured database.

    Commands that change something migrate it first, as ``serve`` does. Commands that only look
    (``status``, ``queue``, ``reconcile list``) never create or migrate one: a database that is
    not there means the command is reading another configuration than the running gateway's,
    and it says where it looked instead of answering "(nothing yet)" from a new empty file.
    """

    def __init__(self, config: GatewayConfig, path: Path, read_only: bool = False) -> None:
        from gateway.db.engine import make_engine, make_sessions
        from gateway.db.migrate import current, head, upgrade

        url = config.database.url
        if read_only and url.startswith("sqlite:///"):
            database = Path(url.removeprefix("sqlite:///"))
            if not database.is_file():
                print(f"no database at {database} (database.url of {path}): the gateway has "
                      "not run with this configuration; pass --config (or set GATEWAY_CONFIG) "
                      "with the running gateway's file", file=sys.stderr)
                raise SystemExit(EXIT_NO_DATA)
        self.engine = make_engine(url, config.database.busy_timeout_s)
        self.sessions = make_sessions(self.engine)
        if not read_only:
            upgrade(self.engine, node_name=config.forward.node_name)
            return
        found = current(self.engine)
        if found != head():
            self.engine.dispose()
            where = "has no gateway tables" if found is None else f"is at schema {found}"
            print(f"the database of {path} {where}; this gateway needs {head()}: start the "
                  "gateway or run `gateway db upgrade`", file=sys.stderr)
            raise SystemExit(EXIT_NO_DATA)

    def close(self) -> None:
        self.engine.dispose()


def _import(args: argparse.Namespace, kind: str) -> int:
    from gateway.remap.imports import import_identities, import_orders

    config = _load_or_exit(args.config)
    db = _Database(config, args.config)
    load = import_identities if kind == "identities" else import_orders
    try:
        with db.sessions() as session, session.begin():
            report = load(session, args.file, _operator())
    except (OSError, ValueError) as exc:
        print(f"{args.file}: cannot import: {exc}", file=sys.stderr)
        return 1
    finally:
        db.close()
    print("\n".join(report.lines()))
    return 1 if report.rejected and not (report.added or report.updated or report.unchanged) else 0


def _remapper(config: GatewayConfig, rules_path: Path | None, db: _Database) -> Any:
    from gateway.errors import ConfigError
    from gateway.remap.rules import load_rules
    from gateway.remap.stage import Remapper

    path = rules_path or config.remap.rules_file
    if path is None:
        print("no rules: set remap.rules_file in the configuration or pass --rules", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    try:
        rules = load_rules(path)
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    return Remapper(rules, config.remap, db.engine)


@contextmanager
def _dry_run(config: GatewayConfig, config_path: Path,
             rules_path: Path | None) -> Iterator[tuple[Any, Any, Any]]:
    """(remapper, session, resolver) for commands that look but never write: the session is
    rolled back when it closes."""
    from datetime import timedelta

    from gateway.remap.lookup import DbResolver

    db = _Database(config, config_path)
    try:
        remapper = _remapper(config, rules_path, db)
        with db.sessions() as session:
            yield remapper, session, DbResolver(session, timedelta(hours=config.remap.order_window_h))
    finally:
        db.close()


def cmd_remap_test(args: argparse.Namespace) -> int:
    from gateway.remap.dryrun import test_files

    config = _load_or_exit(args.config)
    with _dry_run(config, args.config, args.rules) as (remapper, _session, resolver):
        for line in test_files(remapper.rules, remapper.settings, resolver, args.paths,
                               args.calling_ae, args.called_ae or config.dicom.ae_title):
            print(line)
    return 0


def cmd_remap_replay(args: argparse.Namespace) -> int:
    from datetime import datetime

    from gateway.remap.dryrun import replay

    config = _load_or_exit(args.config)
    try:
        since = datetime.fromisoformat(args.since)
    except ValueError:
        print(f"--since {args.since!r}: use a date like 2026-11-23 or 2026-11-23T08:00", file=sys.stderr)
        return EXIT_CONFIG
    if since.tzinfo is None:
        since = since.astimezone()
    with _dry_run(config, args.config, args.rules) as (remapper, session, resolver):
        for line in replay(session, remapper.rules, remapper.settings, resolver,
                           config.storage.spool_dir, since, config.remap.modifying_system):
            print(line)
    return 0


def cmd_reconcile_list(args: argparse.Namespace) -> int:
    from gateway.remap.reconcile import held_studies

    config = _load_or_exit(args.config)
    db = _Database(config, args.config, read_only=True)
    try:
        with db.sessions() as session:
            held = held_studies(session)
    finally:
        db.close()
    if not held:
        print("no held studies")
    for study in held:
        print(f"{study.study_instance_uid}: {study.instances} held instance(s) from "
              f"{study.calling_ae}; {study.reason}")
        accession = repr(study.accession_number) if study.accession_number else "none"
        print(f"  received: patient ID {study.patient_id!r}, name {study.patient_name!r}, "
              f"accession {accession}, {study.modality} on {study.study_date}")
        for order in study.candidates:
            print(f"  candidate {order.accession_number}: MRN {order.mrn}, {order.modality} "
                  f"at {order.scheduled_at:%Y-%m-%d %H:%M}, "
                  f"{order.requested_procedure_description or ''} ({order.status})")
        if not study.candidates:
            print("  no candidate orders")
    return 0


def cmd_reconcile_assign(args: argparse.Namespace) -> int:
    from gateway.errors import PermanentError
    from gateway.remap.reconcile import assign

    config = _load_or_exit(args.config)
    db = _Database(config, args.config)
    remapper = _remapper(config, args.rules, db)
    try:
        with db.sessions() as session:
            done = assign(remapper, session, config.storage.spool_dir, args.study, args.accession,
                          args.by or _operator())
    except PermanentError as exc:
        print(f"cannot assign: {exc}", file=sys.stderr)
        return 1
    finally:
        db.close()
    print(f"study {args.study} assigned to accession {args.accession}: "
          f"{done.released} instance(s) released, {done.rewritten} rewritten")
    return 0


def cmd_queue(args: argparse.Namespace) -> int:
    from gateway.forward import operator
    from gateway.forward.outbox import queue_stats

    config = _load_or_exit(args.config)
    action = getattr(args, "queue_command", None)
    db = _Database(config, args.config, read_only=action is None)
    try:
        if action == "retry":
            count = operator.retry(db.engine, args.by or _operator(), args.destination, args.study,
                                   args.dead)
            print(f"{count} job(s) queued to be sent now")
            return 0
        if action == "purge-dead":
            try:
                older = operator.parse_duration(args.older_than)
            except ValueError as exc:
                print(f"--older-than: {exc}", file=sys.stderr)
                return EXIT_CONFIG
            count = operator.purge_dead(db.engine, args.by or _operator(), older)
            print(f"{count} dead job(s) purged (their files stay in the spool)")
            return 0
        names = [d.name for d in config.forward.destinations]
        stats = queue_stats(db.engine, names, count_confirmed=True)
        if not stats:
            print(f"nothing is forwarded: {args.config} has no [[forward.destinations]]; add one "
                  "(see config/gateway.example.toml) and restart the gateway")
            return 0
        print(operator.queue_table(stats))
        return 0
    finally:
        db.close()


def _job_or_exit(config: GatewayConfig, name: str, path: Path) -> Any:
    job = next((j for j in config.jobs if j.name == name), None)
    if job is None:
        names = ", ".join(j.name for j in config.jobs) or "none"
        print(f"no job named {name!r} in {path} (jobs: {names})", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)
    return job


def _when(at: Any) -> str:
    return at.astimezone().strftime("%Y-%m-%d %H:%M:%S") if at is not None else "-"


def cmd_jobs(args: argparse.Namespace) -> int:
    """Each job, its next run, and how its last run ended (read-only)."""
    from datetime import UTC, datetime

    from gateway.jobs.ledger import RunLedger
    from gateway.jobs.triggers import make_trigger, next_fire

    config = _load_or_exit(args.config)
    if not config.jobs:
        print(f"no jobs: {args.config} has no [[jobs]]; see config/gateway.example.toml")
        return 0
    db = _Database(config, args.config, read_only=True)
    try:
        latest = RunLedger(db.engine, config.forward.node_name).latest()
    finally:
        db.close()
    now = datetime.now(UTC)
    print(f"{'job':<20} {'kind':<14} {'schedule':<16} {'next run':<20} last run")
    for job in config.jobs:
        schedule = job.cron or f"every {job.every_s:g} s"
        following = next_fire(make_trigger(job.cron, job.every_s), now) if job.enabled else None
        last = latest.get(job.name)
        done = "never" if last is None else (
            f"{last.outcome} {_when(last.started_at)} on {last.node}"
            + (f" ({', '.join(f'{k} {v}' for k, v in sorted(last.counts.items()))})"
               if last.counts else "") + (f": {last.error}" if last.error else ""))
        print(f"{job.name:<20} {job.kind:<14} {schedule:<16} "
              f"{_when(following) if job.enabled else 'disabled':<20} {done}")
    return 0


def cmd_jobs_run(args: argparse.Namespace) -> int:
    """Run a job now, in the foreground, printing its progress; the same ledger and lease as
    the scheduler, so it never overlaps a scheduled run of the same job."""
    from datetime import UTC, datetime

    from gateway.jobs.kinds import JobContext
    from gateway.jobs.ledger import RunLedger
    from gateway.jobs.runner import JobRunner

    config = _load_or_exit(args.config)
    job = _job_or_exit(config, args.name, args.config)
    db = _Database(config, args.config)
    try:
        node = config.forward.node_name
        context = JobContext(config, db.sessions, node, lambda: datetime.now(UTC), print)
        outcome = JobRunner(RunLedger(db.engine, node), context).run(job, "operator", None)
    finally:
        db.close()
    if outcome is None:
        print(f"job {job.name} is running now (on this or another node); try again when it ends",
              file=sys.stderr)
        return 3
    counts = ", ".join(f"{k} {v}" for k, v in sorted(outcome.counts.items()))
    print(f"job {job.name}: {outcome.outcome}" + (f" ({counts})" if counts else ""))
    if outcome.error:
        print(f"  {outcome.error}", file=sys.stderr)
    return 0 if outcome.outcome == "success" else 1


def cmd_jobs_history(args: argparse.Namespace) -> int:
    from gateway.jobs.ledger import RunLedger

    config = _load_or_exit(args.config)
    _job_or_exit(config, args.name, args.config)
    db = _Database(config, args.config, read_only=True)
    try:
        runs = RunLedger(db.engine, config.forward.node_name).history(args.name, args.limit)
    finally:
        db.close()
    if not runs:
        print(f"job {args.name} has not run yet")
    for run in runs:
        took = (f"{(run.finished_at - run.started_at).total_seconds():.1f} s"
                if run.finished_at else "running")
        counts = ", ".join(f"{k} {v}" for k, v in sorted(run.counts.items()))
        print(f"#{run.id} {_when(run.started_at)} {run.trigger:<9} {run.outcome:<11} {took:>9} "
              f"on {run.node}" + (f"  {counts}" if counts else "")
              + (f"  {run.error}" if run.error else ""))
    return 0


def cmd_worklist_import(args: argparse.Namespace) -> int:
    """Each .wl file as an order and its worklist items, in its own transaction."""
    from datetime import UTC, datetime

    from pydicom.errors import InvalidDicomError

    from gateway.worklist.files import import_worklist_file

    config = _load_or_exit(args.config)
    db = _Database(config, args.config)
    failed = 0
    try:
        for path in args.files:
            try:
                with db.sessions() as session, session.begin():
                    done = import_worklist_file(session, path, config.worklist, _operator(),
                                                datetime.now(UTC))
            except (OSError, ValueError, InvalidDicomError) as exc:
                print(f"{path}: not imported: {exc}", file=sys.stderr)
                failed += 1
                continue
            print(f"{path}: {done.steps} step(s), {done.added} added, {done.updated} updated")
    finally:
        db.close()
    return 1 if failed else 0


def cmd_worklist_list(args: argparse.Namespace) -> int:
    """Today's worklist items (by scheduled start, local date) and their status."""
    from datetime import date

    from gateway.worklist.listing import items_on

    config = _load_or_exit(args.config)
    day = args.date or date.today().strftime("%Y%m%d")
    db = _Database(config, args.config, read_only=True)
    try:
        found = items_on(db.engine, day, args.station)
    finally:
        db.close()
    if not found:
        print(f"no worklist items on {day}")
    for line in found:
        print(line)
    return 0
def cmd_export(args: argparse.Namespace) -> int:
    """One export now, in the foreground: archives into --out (the working directory by
    default), a progress bar on a terminal (plain lines otherwise, on stderr), then each
    archive's path and SHA-256 on stdout. Run the same command again after an interruption and
    it continues where it stopped."""
    from pydantic import ValidationError

    from gateway.config import ExportOptions, ExportSelector
    from gateway.export.build import ExportFailed
    from gateway.export.run import Exporter, ExportRequest, ExportStopped, request_key
    from gateway.export.service import cli_reporter, make_sources, report_lines

    config = _load_or_exit(args.config)
    what = args.export_command
    subject = getattr(args, "subject", None)
    try:
        selector = ExportSelector.model_validate(
            {"study": {"studies": [subject]}, "patient": {"patients": [subject]},
             "accession": {"accession_numbers": [subject]}}.get(what, {}))
        options = ExportOptions(
            include_images=not args.metadata_only, format=args.format,
            previews=not args.no_previews, preview_max_size=args.preview_max_size,
            dicomdir=not args.no_dicomdir, key_image=args.key_image,
            deidentify=args.deidentify, allow_partial=args.allow_partial)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(p) for p in error["loc"])
        print(f"cannot export: {where}: {error['msg'].removeprefix('Value error, ')}",
              file=sys.stderr)
        return EXIT_CONFIG
    per: Literal["study", "patient"] = "study" if what in ("study", "accession") else "patient"
    out = (args.out or Path.cwd()).resolve()
    request = ExportRequest(
        key=request_key(what, subject, per, options.model_dump(mode="json")),
        actor=args.by or _operator(), what=what, selector=selector, per=per, options=options,
        destination=out)
    db = _Database(config, args.config)
    try:
        exporter = Exporter(db.sessions, make_sources(config),
                            cli_reporter(sys.stderr, lambda line: print(line, file=sys.stderr,
                                                                        flush=True)))
        report = exporter.run(request)
    except (ExportFailed, ExportStopped) as exc:
        print(f"cannot export: {exc}", file=sys.stderr)
        return 1
    finally:
        db.close()
    if not report.archives:
        print(f"nothing to export: no {what} matches" + (f" {subject!r}" if subject else ""),
              file=sys.stderr)
        return 1
    print("\n".join(report_lines(report)))
    return 1 if report.failed else 0


def cmd_token_new(args: argparse.Namespace) -> int:
    """A fresh API token, printed once (stdout), and the [[api.tokens]] entry holding only its
    SHA-256: the token is not stored anywhere by the gateway, so it cannot be shown again."""
    from gateway.web.auth import new_token, toml_entry

    token = new_token()
    sites = [s.strip() for s in args.sites.split(",") if s.strip()]
    print(f"token (shown once; give it to the client, keep it secret):\n{token}\n")
    print("add to the configuration (then restart `gateway serve`):\n")
    print(toml_entry(args.name, token, args.role, sites))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="DICOM gateway: receive, keep, remap and forward images."
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    config_help = ("TOML configuration file (default: $GATEWAY_CONFIG, else "
                   "config/gateway.toml); relative paths in it are relative to its folder")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=config_help)
        return sub

    command("serve", "run the DICOM listener (and /metrics) until SIGTERM or SIGINT"
            ).set_defaults(func=cmd_serve)
    command("check-config", "validate a configuration file; print ok or every problem"
            ).set_defaults(func=cmd_check_config)
    status = command("status", "instances received today, spool use, the cluster's nodes, "
                     "last associations")
    status.add_argument("--waiting", type=int, default=0, metavar="N",
                        help="also list up to N SOP Instance UIDs waiting on each node (their "
                        "forwarding can only be done by the node that holds their file)")
    status.set_defaults(func=cmd_status)
    db = commands.add_parser("db", help="database maintenance", description="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    upgrade = db_commands.add_parser("upgrade", help="apply schema migrations up to the latest")
    upgrade.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=config_help)
    upgrade.set_defaults(func=cmd_db_upgrade)

    def group(name: str, help: str) -> Any:
        parent = commands.add_parser(name, help=help, description=help)
        return parent.add_subparsers(dest=f"{name}_command", required=True, metavar="ACTION")

    def sub(parent: Any, name: str, help: str, func: Any) -> argparse.ArgumentParser:
        parser = parent.add_parser(name, help=help, description=help)
        parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=config_help)
        parser.set_defaults(func=func)
        return parser

    identities = group("identities", "the patient identity table (local ID -> MRN)")
    sub(identities, "import", "load identities from CSV (issuer,local_id,mrn,patient_name,"
        "birth_date,sex); idempotent", lambda a: _import(a, "identities")
        ).add_argument("file", type=Path)
    orders = group("orders", "the orders table (accession numbers)")
    sub(orders, "import", "load orders from CSV or JSON (accession_number,mrn,modality,"
        "scheduled_at,...); idempotent", lambda a: _import(a, "orders")).add_argument("file", type=Path)
    worklist = group("worklist", "Modality Worklist items (built from orders by worklist_build)")
    sub(worklist, "import", "load DICOM worklist files (.wl, as wlmscpfs reads them) as orders "
        "and their items, keeping their values", cmd_worklist_import
        ).add_argument("files", type=Path, nargs="+")
    listing = sub(worklist, "list", "today's items: start, station, modality, status",
                  cmd_worklist_list)
    listing.add_argument("--date", help="another day, YYYYMMDD (default: today)")
    listing.add_argument("--station", help="only this Scheduled Station AE Title")
    remap = group("remap", "try remap rules without sending anything")
    test = sub(remap, "test", "print, per file, the tags the rules would change (old -> new); "
               "writes nothing", cmd_remap_test)
    test.add_argument("--rules", type=Path, help="rules file (default: remap.rules_file)")
    test.add_argument("--calling-ae", help="sender to match on (default: the file's Source AE)")
    test.add_argument("--called-ae", help="called AE to match on (default: dicom.ae_title)")
    test.add_argument("paths", type=Path, nargs="+", help="files or folders")
    replay = sub(remap, "replay", "run candidate rules over instances already received and "
                 "summarise what would differ from what was done", cmd_remap_replay)
    replay.add_argument("--rules", type=Path, required=True, help="candidate rules file")
    replay.add_argument("--since", required=True, help="received since (2026-11-23[T08:00])")
    reconcile = group("reconcile", "studies held for an operator")
    sub(reconcile, "list", "held studies with their candidate orders", cmd_reconcile_list)
    assign = sub(reconcile, "assign", "decide a held study by an order, rewrite and release it",
                 cmd_reconcile_assign)
    assign.add_argument("study", help="Study Instance UID")
    assign.add_argument("accession", help="accession number of the order")
    assign.add_argument("--by", help="operator name for the audit (default: $SUDO_USER/$USER)")
    assign.add_argument("--rules", type=Path, help="rules file (default: remap.rules_file)")
    queue = command("queue", "forward queue per destination: depth, in flight, unconfirmed, dead, "
                    "oldest, breaker")
    queue.set_defaults(func=cmd_queue)
    queue_actions = queue.add_subparsers(dest="queue_command", metavar="ACTION")
    retry = sub(queue_actions, "retry", "send waiting jobs now (or, with --dead, dead letters "
                "again)", cmd_queue)
    retry.add_argument("--destination", help="only this destination")
    retry.add_argument("--study", help="only this Study Instance UID")
    retry.add_argument("--dead", action="store_true",
                       help="dead letters, attempts and verification misses reset")
    retry.add_argument("--by", help="operator name for the audit (default: $SUDO_USER/$USER)")
    purge = sub(queue_actions, "purge-dead", "give up on dead letters older than a duration",
                cmd_queue)
    purge.add_argument("--older-than", required=True, help="e.g. 7d, 12h, 30m")
    purge.add_argument("--by", help="operator name for the audit (default: $SUDO_USER/$USER)")
    export = group("export", "write archives (ZIP, folder or JSON) of studies: DICOM files, "
                   "previews, metadata JSON and a SHA-256 manifest")
    for name, subject_help, help in (
            ("study", "Study Instance UID", "one study: study_<UID>_export.zip"),
            ("patient", "Patient ID (as the ledger holds it, after remapping)",
             "every study of one patient: patient_<ID>_export.zip"),
            ("accession", "accession number", "the study (or studies) of an accession number"),
            ("all", None, "every patient, one patient archive each")):
        action = sub(export, name, help, cmd_export)
        if subject_help:
            action.add_argument("subject", help=subject_help)
        action.add_argument("--out", type=Path, help="destination folder (default: here)")
        action.add_argument("--metadata-only", action="store_true",
                            help="the metadata JSON and manifest, no DICOM files")
        action.add_argument("--format", choices=("zip", "json", "folder"), default="zip",
                            help="zip (default), json (the metadata only) or folder")
        action.add_argument("--deidentify", action="store_true",
                            help="PS3.15 Basic Application Level Confidentiality Profile")
        action.add_argument("--no-previews", action="store_true", help="no PNG previews")
        action.add_argument("--preview-max-size", type=int, default=512,
                            help="longest side of a preview, pixels (default 512)")
        action.add_argument("--no-dicomdir", action="store_true",
                            help="dicom/<n>.dcm without a DICOMDIR")
        action.add_argument("--key-image", action="store_true",
                            help="add image.jpg (the middle image) and its metadata.json")
        action.add_argument("--allow-partial", action="store_true",
                            help="export what can be found and list what cannot")
        action.add_argument("--by", help="operator name for the audit (default: $SUDO_USER/$USER)")
    token = group("token", "bearer tokens of the export HTTP API")
    made = token.add_parser("new", help="print a new token once and its [[api.tokens]] entry "
                            "(the SHA-256 only)", description="print a new token once and its "
                            "[[api.tokens]] entry (the SHA-256 only)")
    made.add_argument("--name", required=True, help="who holds it (audit rows say api:NAME)")
    made.add_argument("--role", choices=("exporter", "admin"), default="exporter",
                      help="admin may also export everything (default: exporter)")
    made.add_argument("--sites", default="*",
                      help='comma-separated [[sites]] names, or "*" for every study (default)')
    made.set_defaults(func=cmd_token_new)
    jobs = command("jobs", "scheduled jobs ([[jobs]]): each one's schedule, next run and last run")
    jobs.set_defaults(func=cmd_jobs)
    job_actions = jobs.add_subparsers(dest="jobs_command", metavar="ACTION")
    run = sub(job_actions, "run", "run a job now, in the foreground, with its progress",
              cmd_jobs_run)
    run.add_argument("name", help="the job's name")
    history = sub(job_actions, "history", "a job's last runs, newest first", cmd_jobs_history)
    history.add_argument("name", help="the job's name")
    history.add_argument("--limit", type=int, default=20, help="how many runs (default 20)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except BrokenPipeError:
        # `gateway status | head`: the reader left; say nothing more (Python's documented recipe)
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
