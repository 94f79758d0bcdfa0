"""The operator's first hour (issue 17): every command reads the same configuration, says what is
wrong in the words of the file, and never invents an empty database. Each test runs the installed
``gateway`` command as an operator would, from a working directory other than the file's."""

from __future__ import annotations

import os
import socket
import subprocess
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gateway import __version__
from tests.conftest import GATEWAY_BIN, Served, free_port
from tests.peers import dcmtk


def gateway(*args: str, cwd: Path, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess[str]:
    environ = {k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}
    return subprocess.run([str(GATEWAY_BIN), *args], capture_output=True, text=True, cwd=cwd,
                          env={**environ, **(env or {})}, timeout=timeout, check=False)


def site(tmp_path: Path, extra: str = "") -> Path:
    """A configuration in its own folder, with relative paths and free ports."""
    folder = tmp_path / "site"
    folder.mkdir(exist_ok=True)
    path = folder / "gateway.toml"
    path.write_text(
        f'[dicom]\nport = {free_port()}\nbind_host = "127.0.0.1"\n'
        '[security]\nunknown_callers = ["echo", "store"]\n'
        '[storage]\nspool_dir = "data/spool"\nmin_free_mb = 1\n'
        '[database]\nurl = "sqlite:///data/gateway.db"\n'
        f'[metrics]\nport = {free_port()}\n' + extra, encoding="utf-8")
    return path


def test_version() -> None:
    result = subprocess.run([str(GATEWAY_BIN), "--version"], capture_output=True, text=True, check=False)
    assert (result.returncode, result.stdout.strip()) == (0, f"gateway {__version__}")


def test_check_config_reports_what_serve_would_refuse_with_the_same_words(tmp_path: Path) -> None:
    path = site(tmp_path, '[[forward.destinations]]\ntype = "orthanc"\nname = "pacs"\n'
                          'url = "http://127.0.0.1:9"\nusername = "gw"\n'
                          'password_env = "PACS_PASSWORD_FOR_TEST"\n')
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    expected = ("destination pacs: environment variable PACS_PASSWORD_FOR_TEST is not set; "
                "export it or use password_file")
    for command in ("check-config", "serve"):
        result = gateway(command, "--config", str(path), cwd=elsewhere)
        assert result.returncode == 2, (command, result.stderr)
        assert expected in result.stderr, (command, result.stderr)
        assert "Traceback" not in result.stderr
    ok = gateway("check-config", "--config", str(path), cwd=elsewhere,
                 env={"PACS_PASSWORD_FOR_TEST": "x"})
    assert (ok.returncode, ok.stdout.strip()) == (0, "ok"), ok.stderr
    assert not (path.parent / "data").exists()  # checking creates nothing


@pytest.mark.parametrize("which", ["dicom", "metrics", "hl7"])
def test_a_port_in_use_names_the_port_and_the_key_and_exits_2(tmp_path: Path, which: str) -> None:
    path = site(tmp_path, f'[hl7]\nenabled = true\nbind_host = "127.0.0.1"\nport = {free_port()}\n')
    config = path.read_text()
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        section_start = config.index(f"[{which}]")
        line_start = config.index("port = ", section_start)
        line_end = config.index("\n", line_start)
        path.write_text(config[:line_start] + f"port = {port}" + config[line_end:])
        variable = f"GATEWAY_{which.upper()}__PORT"
        for command in ("check-config", "serve"):
            result = gateway(command, "--config", str(path), cwd=tmp_path)
            assert result.returncode == 2, (command, result.stderr)
            assert f"{which}.port = {port}" in result.stderr and "already in use" in result.stderr
            assert variable in result.stderr and "Traceback" not in result.stderr


def test_relative_paths_follow_the_file_and_read_only_commands_create_nothing(
    tmp_path: Path,
) -> None:
    path = site(tmp_path)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    database = path.parent / "data" / "gateway.db"
    for command in (["status"], ["queue"], ["reconcile", "list"]):
        result = gateway(*command, "--config", str(path), cwd=elsewhere)
        assert result.returncode == 1, (command, result.stdout, result.stderr)
        assert f"no database at {database}" in result.stderr, result.stderr
    assert list(elsewhere.iterdir()) == [] and not (path.parent / "data").exists()

    # GATEWAY_CONFIG points every command at the same file; the server made the database
    env = {"GATEWAY_CONFIG": str(path)}
    process = subprocess.Popen([str(GATEWAY_BIN), "serve"], cwd=elsewhere, env={
        **{k: v for k, v in os.environ.items() if not k.startswith("GATEWAY_")}, **env},
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        port = int(path.read_text().split("port = ")[1].split("\n")[0])
        served = Served(process, port, 0, path, path.parent / "data" / "spool", "",
                        tmp_path / "unused.log")
        from tests.conftest import port_open, wait_for

        wait_for(lambda: port_open(port), 30, "the gateway to listen")
        assert dcmtk("echoscu", "-aec", "GATEWAY", "127.0.0.1", str(port)).returncode == 0
        from tests.factory import make_dataset, write_file

        sent = write_file(make_dataset(), tmp_path / "one.dcm")
        assert dcmtk("storescu", "-aet", "CT_ROOM1", "-aec", "GATEWAY", "127.0.0.1", str(port),
                     str(sent)).returncode == 0
    finally:
        served.stop()
    assert database.is_file() and (path.parent / "data" / "spool").is_dir()
    status = gateway("status", cwd=tmp_path, env=env)
    assert status.returncode == 0, status.stderr
    assert "CT_ROOM1" in status.stdout and "1 instances" in status.stdout
    queue = gateway("queue", cwd=tmp_path, env=env)
    assert queue.returncode == 0 and "nothing is forwarded" in queue.stdout


def test_an_unknown_key_suggests_the_known_one_and_lists_read_as_lists(tmp_path: Path) -> None:
    path = tmp_path / "typo.toml"
    path.write_text('[dicom]\nprot = 104\n[security]\nunknown_callers = "echo"\n')
    result = gateway("check-config", "--config", str(path), cwd=tmp_path)
    assert result.returncode == 2
    assert "dicom.prot: unknown key" in result.stderr and "did you mean port?" in result.stderr
    assert "security.unknown_callers = 'echo'" in result.stderr
    assert "should be a list" in result.stderr and "valid tuple" not in result.stderr


def test_metrics_carry_no_created_series(served: Callable[..., Served]) -> None:
    server = served()
    assert dcmtk("echoscu", "-aec", "GATEWAY", "127.0.0.1", str(server.port)).returncode == 0
    with urllib.request.urlopen(f"http://127.0.0.1:{server.metrics_port}/metrics") as response:
        text = response.read().decode()
    assert "gateway_associations_total" in text
    assert "_created" not in text


def test_metrics_show_the_spool_minimum_and_a_restart_records_its_breakers_closed(
    make_gateway: Any, tmp_path: Path, sqlite_url: str,
) -> None:
    from datetime import UTC, datetime

    import sqlalchemy as sa

    from gateway.db.engine import make_engine
    from gateway.db.migrate import upgrade

    engine = make_engine(sqlite_url)
    upgrade(engine)
    with engine.begin() as c:  # the breaker was open when the gateway last stopped
        c.execute(sa.text("INSERT INTO destination_states (destination, breaker, failures, since) "
                          "VALUES ('pacs', 'open', 3, :now)"), {"now": datetime.now(UTC)})
    engine.dispose()
    destinations = [{"type": "dimse", "name": name, "ae_title": "PACS", "host": "127.0.0.1",
                     "port": free_port(), "verify": "none"} for name in ("pacs", "vna")]
    app = make_gateway(storage={"min_free_mb": 3}, forward={"destinations": destinations})
    sample = app.metrics.registry.get_sample_value
    assert sample("gateway_spool_min_free_bytes") == 3 * 1024 * 1024
    # the new forward process starts with closed breakers, and says so everywhere
    from tests.conftest import rows, wait_for

    wait_for(lambda: [r.breaker for r in rows(
        sqlite_url, "SELECT breaker FROM destination_states ORDER BY destination")] == [
        "closed", "closed"], 30, "the breakers recorded closed")
    wait_for(lambda: sample("gateway_forward_breaker_open", {"destination": "pacs"}) == 0
             and sample("gateway_forward_breaker_open", {"destination": "vna"}) == 0, 10,
             "both breaker gauges set")
