"""Deployment pieces, checked as an operator would meet them: the image's own configuration starts
as is and its HEALTHCHECK tells healthy from not; the build context holds only what the image
copies; the compose site's files agree with each other; the systemd unit passes systemd's own
checks; the alert rules and the dashboard pass Prometheus' checks and use only metrics that a
running gateway exports, with the labels it gives them (a real Prometheus scrapes a real gateway).

The image is built and run where a Docker daemon answers (scripts/test starts one as root or under
CI): on the official Python image when Docker Hub answers, else on gateway-base:bookworm built
from Debian packages (scripts/docker-base); the test's summary line says which. Without a daemon
it is skipped outside CI, and fails under CI=true.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tomllib
import urllib.error
import urllib.parse
import urllib.request
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pydicom
import pytest
import sqlalchemy as sa
import yaml
from pydicom.uid import generate_uid

from gateway.config import DicomConfig, load
from tests.conftest import GATEWAY_BIN, free_port, port_open, wait_for
from tests.factory import make_dataset, write_study
from tests.peers import dcmtk, encode, raw_c_store, require_tool, spool_files, unavailable

ROOT = Path(__file__).resolve().parents[1]
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
ALERTS = ROOT / "config/prometheus/alerts.yml"
ALERTS_TEST = ROOT / "config/prometheus/alerts_test.yml"
PROMETHEUS_CONFIG = ROOT / "config/prometheus/prometheus.yml"
DASHBOARD = ROOT / "config/grafana/gateway-dashboard.json"
UNIT = ROOT / "config/systemd/gateway.service"
IMAGE_CONFIG_PATH = "/etc/gateway/gateway.toml"
METRIC_NAME = re.compile(r"\bgateway_[a-z0-9_]+")
IN_CI = os.environ.get("CI") == "true"


def run(args: list[str], timeout: float = 120, **kwargs: Any) -> subprocess.CompletedProcess[str]:
    """A command's exit status and output, for the test to judge."""
    return subprocess.run(args, check=False, capture_output=True, text=True, timeout=timeout,
                          **kwargs)


# --- the Dockerfile, read as Docker reads it -------------------------------------------------

def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order, continuation lines joined, comments dropped."""
    steps: list[tuple[str, str]] = []
    pending = ""
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if not pending and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if line.rstrip().endswith("\\"):
            pending += line.rstrip()[:-1] + " "
            continue
        full = (pending + line).strip()
        pending = ""
        instruction, _, args = full.partition(" ")
        steps.append((instruction.upper(), args.strip()))
    return steps


def image_env() -> dict[str, str]:
    """The image's ENV, $VAR and ${VAR} expanded as Docker does: from the ENV lines above, else
    from the base image's environment (this machine's stands in for it: PATH=/opt/venv/bin:$PATH
    keeps this machine's PATH behind the venv's)."""
    env: dict[str, str] = {}
    for instruction, args in dockerfile():
        if instruction == "ENV":
            for item in shlex.split(args):
                name, value = item.split("=", 1)
                env[name] = re.sub(r"\$\{?(\w+)\}?",
                                   lambda m: env.get(m[1], os.environ.get(m[1], "")), value)
    return env


def baked_config() -> Path:
    """The file the image copies to /etc/gateway/gateway.toml: what `docker run IMAGE` uses."""
    for instruction, args in dockerfile():
        if instruction == "COPY" and args.split()[-1] == IMAGE_CONFIG_PATH:
            return ROOT / args.split()[0]
    raise AssertionError(f"the Dockerfile copies nothing to {IMAGE_CONFIG_PATH}")


def healthcheck() -> list[str]:
    [args] = [a for i, a in dockerfile() if i == "HEALTHCHECK"]
    command = json.loads(args[args.index("CMD") + len("CMD"):].strip())
    assert command[0] == "python", "the slim image's interpreter is `python`"
    return [sys.executable, *command[1:]]


def clean_env(**extra: str) -> dict[str, str]:
    """This machine's environment without the gateway's variables or any destination password,
    as a fresh container has it."""
    env = {k: v for k, v in os.environ.items()
           if not (k.startswith("GATEWAY_") and "__" in k) and k != "ORTHANC_PASSWORD"}
    env.pop("GATEWAY_CONFIG", None)
    return {**env, **extra}


def as_in_the_image(tmp_path: Path, **extra: str) -> dict[str, str]:
    """The image's ENV, with the volume (/var/lib/gateway) and the ports moved to this test's."""
    return clean_env(**image_env(), **{
        "GATEWAY_STORAGE__SPOOL_DIR": str(tmp_path / "volume/spool"),
        "GATEWAY_DATABASE__URL": f"sqlite:///{tmp_path / 'volume/gateway.db'}",
        "GATEWAY_DICOM__PORT": str(free_port()),
        "GATEWAY_METRICS__PORT": str(free_port()),
        **extra,
    })


class Process:
    """A `gateway serve` subprocess with its log in a file."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log_path = log
        with open(log, "wb") as out:
            self.process = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_listening(self, port: int) -> None:
        wait_for(lambda: port_open(port) or self.process.poll() is not None, 30,
                 "gateway to listen")
        assert self.process.poll() is None, f"gateway exited at start:\n{self.log()}"

    def terminate(self) -> int:
        self.process.send_signal(signal.SIGTERM)
        return self.process.wait(timeout=60)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


@pytest.fixture
def processes() -> Iterator[list[Process]]:
    started: list[Process] = []
    yield started
    for process in started:
        process.kill()


def serve(processes: list[Process], config: Path, env: dict[str, str], log: Path) -> Process:
    process = Process([str(GATEWAY_BIN), "serve", "--config", str(config)], env, log)
    processes.append(process)
    process.wait_listening(int(env["GATEWAY_DICOM__PORT"]))
    return process


def run_healthcheck(env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run(healthcheck(), timeout=30, env=env)


# --- the image -------------------------------------------------------------------------------

def test_image_config_keeps_everything_on_the_volume_and_exposes_metrics() -> None:
    config = load(baked_config(), environ=image_env())
    [volume] = [json.loads(a)[0] for i, a in dockerfile() if i == "VOLUME"]
    assert config.storage.spool_dir.is_relative_to(volume)
    assert config.database.url == f"sqlite:///{volume}/gateway.db"
    assert config.metrics.enabled and config.metrics.host == "0.0.0.0"
    assert not config.forward.destinations  # nothing that needs a password to start
    exposed = {int(p) for i, a in dockerfile() if i == "EXPOSE" for p in a.split()}
    assert {config.dicom.port, config.metrics.port} <= exposed


def test_image_config_starts_as_is_and_its_healthcheck_passes(tmp_path: Path,
                                                                processes: list[Process]) -> None:
    env = as_in_the_image(tmp_path)
    check = run([str(GATEWAY_BIN), "check-config", "--config", str(baked_config())], env=env)
    assert (check.returncode, check.stdout.strip()) == (0, "ok"), check.stderr
    gateway = serve(processes, baked_config(), env, tmp_path / "gateway.log")
    port = env["GATEWAY_DICOM__PORT"]

    echo = dcmtk("echoscu", "-aet", "MONITORING", "-aec", "GATEWAY", "127.0.0.1", port)
    assert echo.returncode == 0, echo.stderr
    files = write_study(tmp_path / "study", 3, PatientName="Müller^Jürgen")
    store = dcmtk("storescu", "-aet", "CT_ROOM1", "-aec", "GATEWAY", "127.0.0.1", port,
                  *map(str, files))
    assert store.returncode == 0, store.stderr
    assert len(spool_files(tmp_path / "volume/spool")) == 3
    health = run_healthcheck(env)
    assert health.returncode == 0, health.stderr

    assert gateway.terminate() == 0, gateway.log()
    stopped = run_healthcheck(env)
    assert stopped.returncode == 1, "Docker reads 1 as unhealthy (2 is reserved)"


def test_healthcheck_fails_when_healthz_answers_503(tmp_path: Path,
                                                    processes: list[Process]) -> None:
    # A minimum free space no disk has: /healthz answers 503 naming spool_free.
    env = as_in_the_image(tmp_path, GATEWAY_STORAGE__MIN_FREE_MB=str(10**12))
    gateway = serve(processes, baked_config(), env, tmp_path / "gateway.log")
    health = run_healthcheck(env)
    assert health.returncode == 1
    assert "503" in health.stderr
    assert gateway.terminate() == 0


def dockerignore_excludes(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders decides;
    `*` stays within one path segment, `**` spans any number."""
    parts = path.split("/")
    excluded = False
    for raw in patterns:
        negated = raw.startswith("!")
        pattern = raw[1:] if negated else raw
        pattern = pattern.strip("/")
        regex = "".join(
            ".*" if token == "**" else "[^/]*" if token == "*" else "[^/]" if token == "?"
            else re.escape(token)
            for token in re.split(r"(\*\*|\*|\?)", pattern)
        )
        regex = regex.replace(".*/", "(.*/)?")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negated
    return excluded


def test_build_context_is_only_what_the_image_copies() -> None:
    lines = (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
    patterns = [line.strip() for line in lines if line.strip() and not line.startswith("#")]
    copied = [src for i, a in dockerfile() if i == "COPY" for src in a.split()[:-1]]
    tracked = subprocess.run(["git", "ls-files", *copied], cwd=ROOT, capture_output=True,
                             text=True, check=True).stdout.split()
    assert len(tracked) > len(copied)  # the gateway package's files, not only the names
    for path in tracked:
        assert not dockerignore_excludes(path, patterns), f"{path} is copied but left out"
    for path in (".venv/bin/python", "data/gateway.db", "data/spool/1.2/3.4/5.6.dcm", ".env",
                 ".git/config", "tests/test_deploy.py", "gateway/__pycache__/app.cpython-311.pyc",
                 "scripts/bench", ".bench-cache/ct/1.dcm"):
        assert dockerignore_excludes(path, patterns), f"{path} would be sent to the daemon"


def test_build_context_alone_builds_the_whole_package(tmp_path: Path) -> None:
    """The image's `pip install .` sees only the context: built from a copy of just that, the
    package holds every module and data file of gateway/ (migrations included)."""
    patterns = [line.strip() for line in
                (ROOT / ".dockerignore").read_text(encoding="utf-8").splitlines()
                if line.strip() and not line.startswith("#")]
    tracked = run(["git", "ls-files"], cwd=ROOT).stdout.split()
    context = tmp_path / "context"
    for path in tracked:
        if not dockerignore_excludes(path, patterns):
            (context / path).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / path, context / path)
    built = run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--quiet", "-w",
                 str(tmp_path / "wheel"), str(context)], timeout=600)
    assert built.returncode == 0, built.stderr[-4000:]
    [wheel] = (tmp_path / "wheel").glob("*.whl")
    with zipfile.ZipFile(wheel) as archive:
        packaged = {name for name in archive.namelist() if name.startswith("gateway/")}
    wanted = {path for path in tracked if path.startswith("gateway/")}
    assert wanted - packaged == set(), "left out of the image"


def docker_daemon() -> str | None:
    """None when a Docker daemon answers, else why not."""
    if shutil.which("docker") is None:
        return "no docker command"
    info = run(["docker", "info", "--format", "{{.ServerVersion}}"])
    if info.returncode != 0:
        return (info.stderr.strip().splitlines() or ["docker info failed"])[-1]
    return None


def default_base() -> str:
    """The Dockerfile's `ARG BASE=...`: the official Python image on Docker Hub."""
    [base] = [a.split("=", 1)[1] for i, a in dockerfile() if i == "ARG" and a.startswith("BASE=")]
    return base


LOCAL_BASE = "gateway-base:bookworm"  # what scripts/docker-base builds from Debian packages


def image_base() -> str:
    """The base to build on: the official image when it is here or can be pulled, else (no Docker
    Hub, as on the machines these tests run on) gateway-base:bookworm built by scripts/docker-base
    (waiting for it when scripts/test already started it in the background)."""
    base = default_base()
    if run(["docker", "image", "inspect", base]).returncode == 0:
        return base
    pulled = run(["docker", "pull", base], timeout=600)
    if pulled.returncode == 0:
        return base
    if os.geteuid() != 0 and run(["docker", "image", "inspect", LOCAL_BASE]).returncode != 0:
        unavailable(f"{base} cannot be pulled and building {LOCAL_BASE} needs root: "
                    "the image build and run are not tested")
    built = run([str(ROOT / "scripts/docker-base"), LOCAL_BASE], timeout=1200)
    assert built.returncode == 0, f"{base}: {pulled.stderr.strip()}\n{built.stderr[-4000:]}"
    return LOCAL_BASE


@pytest.mark.timeout(1800)  # the base from Debian packages (~2 min) and the image (~1.5 min)
def test_image_builds_starts_healthy_and_stops_on_sigterm(tmp_path: Path,
                                                          record_property: Any) -> None:
    why = docker_daemon()
    if why is not None:
        # CI installs docker.io and starts dockerd (scripts/test): no daemon there is a failure.
        unavailable(f"no Docker daemon here ({why}): the image build and run are not tested")
    base = image_base()
    record_property("summary", f"the image was built on {base}")
    print(f"the image is built on {base}")
    tag = f"dicom-gateway-test:{uuid.uuid4().hex[:8]}"
    name = f"gateway-test-{uuid.uuid4().hex[:8]}"
    build = run(["docker", "build", "--build-arg", f"BASE={base}", "-t", tag, str(ROOT)],
                timeout=1200)
    assert build.returncode == 0, f"on {base}:\n{build.stdout[-2000:]}\n{build.stderr[-4000:]}"
    try:
        started = run(["docker", "run", "-d", "--name", name, "--stop-timeout", "120",
                       "-p", "127.0.0.1::11112", "-p", "127.0.0.1::9110", tag])
        assert started.returncode == 0, started.stderr

        def inspect(template: str) -> str:
            return run(["docker", "inspect", "-f", template, name]).stdout.strip()

        wait_for(lambda: inspect("{{.State.Health.Status}}") in ("healthy", "unhealthy"), 180,
                 "the container's HEALTHCHECK to pass")
        assert inspect("{{.State.Health.Status}}") == "healthy"
        port = run(["docker", "port", name, "11112/tcp"]).stdout.split(":")[-1].strip()
        echo = dcmtk("echoscu", "-aet", "MONITORING", "-aec", "GATEWAY", "127.0.0.1", port)
        assert echo.returncode == 0, echo.stderr
        metrics_port = run(["docker", "port", name, "9110/tcp"]).stdout.split(":")[-1].strip()
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics") as response:
            assert b"gateway_spool_free_bytes" in response.read()
        assert run(["docker", "stop", name], timeout=180).returncode == 0
        assert inspect("{{.State.ExitCode}}") == "0"
    finally:
        run(["docker", "rm", "-f", name])
        run(["docker", "rmi", "-f", tag])


# --- docker compose --------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    return data


def mounts(service: dict[str, Any]) -> dict[str, str]:
    """container path -> host path (relative to the checkout) or volume name."""
    found = {}
    for volume in service.get("volumes", []):
        source, target = volume.split(":")[:2]
        found[target] = source
    return found


def published(service: dict[str, Any]) -> set[int]:
    return {int(str(p).split(":")[-1]) for p in service.get("ports", [])}


def test_compose_files_agree_with_each_other() -> None:
    services = compose()["services"]
    assert {"gateway", "orthanc", "postgres", "prometheus"} <= set(services)
    for name, service in services.items():
        for source in mounts(service).values():
            if source.startswith("."):
                assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"

    gateway = services["gateway"]
    assert gateway["build"] == "."
    [volume] = [json.loads(a)[0] for i, a in dockerfile() if i == "VOLUME"]
    assert volume in mounts(gateway)
    config_file = ROOT / mounts(gateway)[IMAGE_CONFIG_PATH]
    env = {k: _interpolated(str(v)) for k, v in gateway["environment"].items()}
    config = load(config_file, environ=env)
    assert {config.dicom.port, config.metrics.port} <= published(gateway)

    # The gateway reaches PostgreSQL and Orthanc by their service names, as the user they know.
    url = sa.make_url(env["GATEWAY_DATABASE__URL"])
    postgres = services["postgres"]
    assert url.host == "postgres" and "postgres" in gateway["depends_on"]
    assert (url.username, url.database) == (postgres["environment"]["POSTGRES_USER"],
                                            postgres["environment"]["POSTGRES_DB"])
    [orthanc] = config.forward.destinations
    assert orthanc.type == "orthanc" and orthanc.password_env in env
    assert urllib.parse.urlsplit(orthanc.url).hostname == "orthanc"
    orthanc_env = services["orthanc"]["environment"]
    users = json.loads(_interpolated(orthanc_env["ORTHANC__REGISTERED_USERS"]))
    assert orthanc.username in users

    # Prometheus scrapes the gateway's metrics port and finds its rules where prometheus.yml says.
    prometheus = services["prometheus"]
    prometheus_mounts = mounts(prometheus)
    scrape_file = ROOT / prometheus_mounts["/etc/prometheus/prometheus.yml"]
    scrape = yaml.safe_load(scrape_file.read_text(encoding="utf-8"))
    targets = [t for job in scrape["scrape_configs"] for s in job["static_configs"]
               for t in s["targets"]]
    assert f"gateway:{config.metrics.port}" in targets
    for rules in scrape["rule_files"]:
        assert prometheus_mounts[f"/etc/prometheus/{rules}"] == "./config/prometheus/alerts.yml"

    # Grafana: the provisioned data source is this Prometheus, the dashboard where it is looked for.
    grafana = mounts(services["grafana"])
    sources = yaml.safe_load((ROOT / grafana["/etc/grafana/provisioning/datasources"] /
                              "prometheus.yml").read_text())
    assert sources["datasources"][0]["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((ROOT / grafana["/etc/grafana/provisioning/dashboards"] /
                                "gateway.yml").read_text())
    folder = providers["providers"][0]["options"]["path"]
    assert grafana[f"{folder}/gateway-dashboard.json"] == "./config/grafana/gateway-dashboard.json"

    # SIGTERM: long enough for the shutdown the systemd unit allows for.
    assert _seconds(gateway["stop_grace_period"]) >= worst_case_stop_s(config.dicom)


def _interpolated(value: str) -> str:
    """Compose's ${VAR:?message} with a stand-in value."""
    return re.sub(r"\$\{([A-Z_]+)[^}]*\}", lambda m: f"{m.group(1).lower()}-value", value)


def test_compose_secrets_come_from_an_ignored_env_file() -> None:
    text = COMPOSE.read_text(encoding="utf-8")
    wanted = set(re.findall(r"\$\{([A-Z_]+)", text))
    example = (ROOT / ".env.example").read_text(encoding="utf-8")
    given = {line.split("=", 1)[0] for line in example.splitlines()
             if line and not line.startswith("#")}
    assert wanted and wanted == given
    # every secret is required (${VAR:?...}): no silent empty password
    assert all(re.search(rf"\$\{{{var}:\?", text) for var in wanted)
    ignored = run(["git", "check-ignore", "-q", ".env"], cwd=ROOT)
    assert ignored.returncode == 0, ".env must be git-ignored"
    # The database URL (with its password) comes from the environment, not the mounted file.
    mounted = tomllib.loads((ROOT / "config/compose.toml").read_text(encoding="utf-8"))
    assert "url" not in mounted.get("database", {})


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
def test_compose_gateway_config_forwards_to_orthanc_on_postgresql(
    db_url: str, orthanc_factory: Any, tmp_path: Path, processes: list[Process]
) -> None:
    """config/compose.toml as compose runs it (secrets from the environment), with Orthanc's
    address moved from the compose network to this test's Orthanc."""
    orthanc = orthanc_factory()
    text = (ROOT / "config/compose.toml").read_text(encoding="utf-8")
    assert "http://orthanc:8042" in text
    config = tmp_path / "compose.toml"
    config.write_text(text.replace("http://orthanc:8042", orthanc.url), encoding="utf-8")
    env = clean_env(**image_env(), GATEWAY_DATABASE__URL=db_url,
                    ORTHANC_PASSWORD=orthanc.password,
                    GATEWAY_STORAGE__SPOOL_DIR=str(tmp_path / "volume/spool"),
                    GATEWAY_DICOM__PORT=str(free_port()), GATEWAY_METRICS__PORT=str(free_port()))
    gateway = serve(processes, config, env, tmp_path / "gateway.log")
    files = write_study(tmp_path / "study", 5, PatientName="Ødegård^Åse")
    store = dcmtk("storescu", "-aet", "CT_ROOM1", "-aec", "GATEWAY", "127.0.0.1",
                  env["GATEWAY_DICOM__PORT"], *map(str, files))
    assert store.returncode == 0, store.stderr
    sent = {pydicom.dcmread(f).SOPInstanceUID for f in files}
    wait_for(lambda: orthanc.sop_instance_uids() == sent, 60, "the study to reach Orthanc")
    assert gateway.terminate() == 0, gateway.log()


# --- systemd ---------------------------------------------------------------------------------

def unit() -> dict[str, list[str]]:
    """KEY -> values, over every section (systemd allows a key several times)."""
    keys: dict[str, list[str]] = {}
    for line in UNIT.read_text(encoding="utf-8").splitlines():
        if "=" in line and not line.startswith(("#", "[")):
            key, _, value = line.partition("=")
            keys.setdefault(key.strip(), []).append(value.strip())
    return keys


def worst_case_stop_s(dicom: DicomConfig) -> float:
    """SIGTERM to exit: open associations get the grace, then the rewriting and the forwarding
    process each get the grace and 10 s more before they are killed (gateway.stage_process)."""
    return dicom.shutdown_grace_s + 2 * (dicom.shutdown_grace_s + 10)


def _seconds(value: str) -> float:
    match = re.fullmatch(r"(\d+)(s|m|min)?", str(value).strip())
    assert match, value
    return int(match.group(1)) * (60 if match.group(2) in ("m", "min") else 1)


def test_systemd_unit_runs_as_its_user_restarts_and_stops_as_the_readme_says() -> None:
    keys = unit()
    assert keys["User"] == ["gateway"] and keys["Group"] == ["gateway"]
    assert keys["Restart"] == ["on-failure"]
    assert keys["RestartPreventExitStatus"] == ["2"]  # a bad configuration, as check-config says
    assert keys["KillSignal"] == ["SIGTERM"] and keys["KillMode"] == ["mixed"]
    config_path = Path(keys["ExecStart"][0].split("--config")[1].strip())
    example = load(ROOT / "config/gateway.example.toml", environ={})
    assert _seconds(keys["TimeoutStopSec"][0]) > worst_case_stop_s(example.dicom)
    # What the example configuration (installed as the unit's config) writes is writable.
    writable = [Path("/var/lib") / d for d in keys["StateDirectory"]]
    writable += [Path(p) for v in keys.get("ReadWritePaths", []) for p in v.split()]
    database = Path(sa.make_url(example.database.url).database or "")
    for path in (example.storage.spool_dir, database):
        assert any(path.is_relative_to(w) for w in writable), f"{path} is read-only to the unit"
    assert config_path == Path("/etc/gateway/gateway.toml")
    assert keys["ProtectSystem"] == ["strict"] and keys["NoNewPrivileges"] == ["yes"]


def installed_unit(tmp_path: Path) -> Path:
    """The unit with /opt/gateway/bin/gateway pointing at this checkout's: systemd-analyze
    checks that the commands exist."""
    text = UNIT.read_text(encoding="utf-8").replace("/opt/gateway/bin/gateway", str(GATEWAY_BIN))
    path = tmp_path / "gateway.service"
    path.write_text(text, encoding="utf-8")
    return path


def test_systemd_unit_passes_systemd_analyze_verify(tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze")
    result = run([tool, "verify", "--man=no", str(installed_unit(tmp_path))])
    # Unknown keys and bad values are warnings on stderr with exit 0: no output at all is asked.
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


def test_systemd_unit_is_hardened(tmp_path: Path) -> None:
    tool = require_tool("systemd-analyze")
    result = run([tool, "security", "--offline=true", "--no-pager",
                  str(installed_unit(tmp_path))])
    assert result.returncode == 0, result.stderr
    overall = re.search(r"Overall exposure level for \S+: ([\d.]+)", result.stdout)
    assert overall, result.stdout
    level = float(overall[1])
    assert level <= 2.0, result.stdout  # "OK"; an unhardened unit scores 9.6 ("UNSAFE")


# --- Prometheus and Grafana ------------------------------------------------------------------

def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return run([require_tool("promtool"), *args])


def test_prometheus_config_and_alert_rules_pass_promtool() -> None:
    checked = promtool("check", "config", str(PROMETHEUS_CONFIG))
    assert checked.returncode == 0, checked.stdout + checked.stderr
    assert "SUCCESS: 1 rule files found" in checked.stdout
    rules = promtool("check", "rules", str(ALERTS))
    assert rules.returncode == 0, rules.stdout + rules.stderr


def test_alert_rules_unit_tests_pass() -> None:
    result = promtool("test", "rules", str(ALERTS_TEST))
    assert result.returncode == 0, result.stdout + result.stderr


def alert_rules() -> list[dict[str, Any]]:
    data = yaml.safe_load(ALERTS.read_text(encoding="utf-8"))
    return [rule for group in data["groups"] for rule in group["rules"]]


def test_alert_rules_cover_what_an_operator_must_hear_about() -> None:
    rules = {rule["alert"]: rule["expr"] for rule in alert_rules()}
    wanted = {
        "GatewayForwardQueueStuck": "gateway_forward_oldest_unconfirmed_seconds",
        "GatewayForwardBreakerOpen": "gateway_forward_breaker_open",
        "GatewayForwardDeadLetters": "gateway_forward_queue_depth",
        "GatewaySpoolBelowWatermark": "gateway_spool_free_bytes",
        "GatewayModalitySilent": "gateway_instances_received_total",
    }
    for alert, metric in wanted.items():
        assert metric in rules[alert]
    tested = set(re.findall(r"alertname: (\w+)", ALERTS_TEST.read_text(encoding="utf-8")))
    assert tested == set(rules), "every alert has a promtool unit test"


GRAFANA_VARIABLES = {"$__rate_interval": "1m", "$instance": ".*", "$destination": ".*"}


def dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) with Grafana's variables replaced by what "All" sends."""
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    found = []
    for panel in data["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"{panel['title']}: unknown variable in {expr}"
            found.append((panel["title"], expr))
    return found


def test_dashboard_queries_are_valid_promql(tmp_path: Path) -> None:
    rules = {"groups": [{"name": "dashboard", "rules": [
        {"record": f"dashboard:query_{n}", "expr": expr}
        for n, (_, expr) in enumerate(dashboard_queries())]}]}
    path = tmp_path / "dashboard-rules.yml"
    path.write_text(yaml.safe_dump(rules), encoding="utf-8")
    result = promtool("check", "rules", str(path))
    assert result.returncode == 0, result.stdout + result.stderr


def test_dashboard_shows_what_an_operator_watches() -> None:
    data = json.loads(DASHBOARD.read_text(encoding="utf-8"))
    queries = dashboard_queries()
    wanted = {
        "received per AE": r"by \(calling_ae\) \(rate\(gateway_instances_received_total",
        "store latency": r"gateway_store_seconds_bucket",
        "queue depth per destination": r"by \(destination, state\) \(gateway_forward_queue_depth",
        "queue age per destination": r"by \(destination\) \(gateway_forward_oldest_unconfirmed",
        "breaker states": r"gateway_forward_breaker_open",
        "disk free": r"gateway_spool_free_bytes",
        "query rate": r"rate\(gateway_queries_total",
    }
    for what, pattern in wanted.items():
        assert any(re.search(pattern, expr) for _, expr in queries), what
    # Panels do not overlap (Grafana would move them) and all use the chosen data source.
    cells: set[tuple[int, int]] = set()
    for panel in data["panels"]:
        pos = panel["gridPos"]
        mine = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"])
                for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & mine, f"{panel['title']} overlaps another panel"
        assert pos["x"] + pos["w"] <= 24
        cells |= mine
        if panel["type"] != "row":
            assert panel["datasource"]["uid"] == "${datasource}"


def exported_names(metrics: str) -> set[str]:
    """Every sample name the exposition can carry, from its TYPE lines and its samples."""
    names = set()
    for line in metrics.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split()
            names.add(name)
            if kind == "histogram":
                names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
        elif line and not line.startswith("#"):
            names.add(re.split(r"[{ ]", line)[0])
    return names


@pytest.fixture
def busy_gateway(served: Any, tmp_path: Path) -> Any:
    """A gateway with a destination that does not answer (its breaker opens), after a study, a
    refused C-STORE, a rejected association and a C-FIND."""
    gateway = served(forward={
        "destinations": [{"type": "dimse", "name": "pacs", "ae_title": "PACS",
                          "host": "127.0.0.1", "port": free_port(), "verify": "none"}],
        "retry": {"first_delay_s": 0.05, "max_delay_s": 0.2},
        "breaker": {"failures_to_open": 2, "probe_interval_s": 60.0},
        "burst_hold_s": 0.0,
    })
    files = write_study(tmp_path / "study", 3)
    store = dcmtk("storescu", "-aet", "CT_ROOM1", "-aec", "GATEWAY", "127.0.0.1",
                  str(gateway.port), *map(str, files))
    assert store.returncode == 0, store.stderr
    ds = make_dataset()
    mismatched = raw_c_store(gateway.port, encode(ds), ds.SOPClassUID, generate_uid(),
                             calling_ae="US_ROOM2")
    assert mismatched == 0xA900
    rejected = dcmtk("echoscu", "-aet", "CT_ROOM1", "-aec", "NOT_US", "127.0.0.1",
                     str(gateway.port))
    assert rejected.returncode != 0
    find = dcmtk("findscu", "-S", "-aet", "READER", "-aec", "GATEWAY", "127.0.0.1",
                 str(gateway.port), "-k", "QueryRetrieveLevel=STUDY", "-k", "StudyInstanceUID")
    assert find.returncode == 0, find.stderr
    url = f"http://127.0.0.1:{gateway.metrics_port}/metrics"

    def breaker_open() -> bool:
        with urllib.request.urlopen(url) as response:
            exposition = response.read().decode()
        return 'gateway_forward_breaker_open{destination="pacs"} 1.0' in exposition

    wait_for(breaker_open, 30, "the breaker of the unanswering destination to open")
    return gateway


def test_dashboard_and_alerts_use_only_metrics_the_gateway_exports(busy_gateway: Any) -> None:
    with urllib.request.urlopen(f"http://127.0.0.1:{busy_gateway.metrics_port}/metrics") as r:
        exported = exported_names(r.read().decode())
    used = {name for _, expr in dashboard_queries() for name in METRIC_NAME.findall(expr)}
    used |= {name for rule in alert_rules() for name in METRIC_NAME.findall(rule["expr"])}
    assert used, "no metric found in the dashboard or the rules"
    assert used - exported == set(), f"not exported by the gateway: {sorted(used - exported)}"


def test_prometheus_scraping_a_gateway_raises_its_alert_and_fills_the_dashboard(
    busy_gateway: Any, tmp_path: Path
) -> None:
    """A real Prometheus with prometheus.yml's rules, scraping a real gateway whose destination
    is down: the breaker alert becomes active, and the dashboard's queries find series with the
    labels the panels group by."""
    binary = require_tool("prometheus")
    port = free_port()
    config = yaml.safe_load(PROMETHEUS_CONFIG.read_text(encoding="utf-8"))
    config["global"] = {"scrape_interval": "1s", "evaluation_interval": "1s"}
    config["rule_files"] = [str(ALERTS)]
    config["scrape_configs"][0]["static_configs"] = [
        {"targets": [f"127.0.0.1:{busy_gateway.metrics_port}"]}]
    (tmp_path / "prometheus.yml").write_text(yaml.safe_dump(config), encoding="utf-8")
    with open(tmp_path / "prometheus.log", "wb") as log:
        server = subprocess.Popen(
            [binary, f"--config.file={tmp_path / 'prometheus.yml'}",
             f"--storage.tsdb.path={tmp_path / 'tsdb'}", f"--web.listen-address=127.0.0.1:{port}"],
            stdout=log, stderr=subprocess.STDOUT)
    try:
        def api(path: str, **params: str) -> Any:
            query = urllib.parse.urlencode(params)
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/{path}?{query}") as r:
                    return json.loads(r.read())["data"]
            except (urllib.error.URLError, ConnectionError):
                return None

        def breaker_alert() -> list[dict[str, Any]]:
            alerts = (api("alerts") or {}).get("alerts", [])
            return [a for a in alerts if a["labels"]["alertname"] == "GatewayForwardBreakerOpen"]

        [alert] = wait_for(breaker_alert, 60, "GatewayForwardBreakerOpen to become active")
        assert alert["labels"]["destination"] == "pacs"
        assert alert["state"] in ("pending", "firing")  # firing after its `for: 5m`
        # rate() and increase() need two samples of each series
        wait_for(lambda: (api("query", query="count_over_time(gateway_spool_free_bytes[1m]) > 2")
                          or {}).get("result"), 30, "three scrapes")
        # Series the gateway gave samples for: a query over only those must find some.
        names = api("query", query='count by (__name__) ({__name__=~"gateway_.+"})')
        sampled = {series["metric"]["__name__"] for series in names["result"]}
        assert {"gateway_instances_received_total", "gateway_forward_queue_depth",
                "gateway_queries_total", "gateway_forward_failures_total"} <= sampled
        grouped_by = re.compile(r"by \(([a-z_, ]+)\)")
        for title, expr in dashboard_queries():
            data = api("query", query=expr)
            assert data is not None, f"{title}: Prometheus refused {expr}"
            if not set(METRIC_NAME.findall(expr)) <= sampled:
                continue  # nothing this gateway did is counted there (yet)
            assert data["result"], f"{title}: no series for {expr}"
            labels = grouped_by.search(expr)
            if labels:
                wanted = {label.strip() for label in labels[1].split(",")} - {"le"}
                given = {label for series in data["result"] for label in series["metric"]}
                assert wanted <= given, f"{title}: {expr}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_readme_deploying_section_names_only_files_that_exist() -> None:
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("## Deploying"):readme.index("## Development")]
    named = set(re.findall(r"(?<![\w/.])((?:config|scripts)/[\w./-]+\.\w+|\.env\.example|"
                           r"compose\.yaml|Dockerfile)", section))
    assert {"config/docker.toml", "config/systemd/gateway.service", "compose.yaml",
            ".env.example", "config/prometheus/alerts.yml"} <= named
    for path in named:
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"
    for alert in re.findall(r"`(Gateway[A-Za-z]+)`", section):
        assert alert in {rule["alert"] for rule in alert_rules()}, alert
