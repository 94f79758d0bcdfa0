"""Command line: each command parses arguments and calls into the package. No logic lives here."""

from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
import threading
from pathlib import Path

from gateway.config import GatewayConfig, load
from gateway.errors import ConfigError

DEFAULT_CONFIG = Path(os.environ.get("GATEWAY_CONFIG", "config/gateway.toml"))
EXIT_CONFIG = 2
log = logging.getLogger("gateway")


def _load_or_exit(path: Path) -> GatewayConfig:
    try:
        return load(path)
    except ConfigError as exc:
        print(f"{path}: configuration has {len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  - {problem}", file=sys.stderr)
        raise SystemExit(EXIT_CONFIG)


def cmd_check_config(args: argparse.Namespace) -> int:
    _load_or_exit(args.config)
    print("ok")
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    from gateway import logs
    from gateway.app import Gateway

    config = _load_or_exit(args.config)
    logs.setup(config.logging.level)
    stopping = threading.Event()

    def on_signal(signum: int, _frame: object) -> None:
        log.info("received %s: no new associations; finishing those in flight",
                 signal.Signals(signum).name)
        stopping.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    gateway = Gateway(config)
    gateway.start()
    if gateway.http is not None:
        log.info("metrics on http://%s:%d/metrics", config.metrics.host, gateway.http.port)
    # A timed wait: the kernel may deliver the signal to one of pynetdicom's threads, and an
    # untimed wait in the main thread would then never run the Python-level handler.
    while not stopping.wait(0.5):
        pass
    gateway.stop()
    log.info("stopped")
    return 0


def cmd_db_upgrade(args: argparse.Namespace) -> int:
    from gateway.db.engine import make_engine
    from gateway.db.migrate import upgrade

    config = _load_or_exit(args.config)
    engine = make_engine(config.database.url, config.database.busy_timeout_s)
    upgrade(engine)
    engine.dispose()
    print("database schema is current")
    return 0


def cmd_status(args: argparse.Namespace) -> int:
    from gateway.db.engine import make_engine, make_sessions
    from gateway.db.migrate import upgrade
    from gateway.receive.spool import Spool
    from gateway.report import status_report

    config = _load_or_exit(args.config)
    engine = make_engine(config.database.url, config.database.busy_timeout_s)
    upgrade(engine)
    spool = Spool(config.storage.spool_dir, config.storage.min_free_mb * 1024 * 1024)
    with make_sessions(engine)() as session:
        print(status_report(session, spool))
    engine.dispose()
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="gateway", description="DICOM gateway: receive, keep, remap and forward images."
    )
    config_help = f"TOML configuration file (default {DEFAULT_CONFIG}, or $GATEWAY_CONFIG)"
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help, description=help)
        sub.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=config_help)
        return sub

    command("serve", "run the DICOM listener (and /metrics) until SIGTERM or SIGINT"
            ).set_defaults(func=cmd_serve)
    command("check-config", "validate a configuration file; print ok or every problem"
            ).set_defaults(func=cmd_check_config)
    command("status", "instances received today, spool use, last associations"
            ).set_defaults(func=cmd_status)
    db = commands.add_parser("db", help="database maintenance", description="database maintenance")
    db_commands = db.add_subparsers(dest="db_command", required=True, metavar="DB_COMMAND")
    upgrade = db_commands.add_parser("upgrade", help="apply schema migrations up to the latest")
    upgrade.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help=config_help)
    upgrade.set_defaults(func=cmd_db_upgrade)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args))
