"""SIGHUP to ``gateway serve``: the edited configuration applied to the running process tree, or
refused with the old one kept (``gateway.reload``, ``Gateway.reload``, ``ReceiverWorkers.replace``,
``StageProcess.replace``), driven by DCMTK as a modality would."""

from __future__ import annotations

import signal
import subprocess
import time
import tomllib
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from pynetdicom import AE

from gateway.config import GatewayConfig
from gateway.reload import changed_keys, needing_restart, rules_digest
from tests.conftest import (
    Served,
    config_dict,
    descendants,
    free_port,
    port_open,
    rows,
    running,
    wait_for,
    write_toml,
)
from tests.factory import write_study
from tests.peers import dcmtk, require_tool
from tests.test_forward import (
    FAST,
    Recording,
    jobs,
    orthanc_destination,
    recording_orthanc,  # noqa: F401  (a fixture)
)
from tests.test_workers import _kept_once, _metrics, _receiver_pids, _uids

REFUSED_CALLER = "Calling AE Title Not Recognized"
VERIFICATION = "1.2.840.10008.1.1"


def _edit(gateway: Served, **sections: dict[str, Any]) -> None:
    """Merge ``sections`` into the running gateway's file (tables merged, lists replaced)."""
    data = tomllib.loads(gateway.config_path.read_text(encoding="utf-8"))
    for section, values in sections.items():
        data[section] = {**data.get(section, {}), **values}
    write_toml(gateway.config_path, data)


def _reloaded(gateway: Served, result: str, count: int = 1) -> None:
    """SIGHUP, then wait until ``count`` reloads have ended with ``result``."""
    gateway.process.send_signal(signal.SIGHUP)
    line = f'gateway_config_reloads_total{{result="{result}"}} {float(count)}'
    wait_for(lambda: line in _metrics(gateway), 30, f"reload {count} to end {result}")


def _echo(gateway: Served, calling_ae: str, port: int | None = None) -> subprocess.CompletedProcess[str]:
    return dcmtk("echoscu", "-v", "-aet", calling_ae, "-aec", "GATEWAY", "127.0.0.1",
                 str(port or gateway.port))


def _refused(gateway: Served, calling_ae: str) -> bool:
    """Rejected for its calling AE title, as the A-ASSOCIATE-RJ says (PS3.8 9.3.4)."""
    answer = _echo(gateway, calling_ae)
    return answer.returncode != 0 and REFUSED_CALLER in answer.stdout + answer.stderr


def _peers(*titles: str) -> dict[str, Any]:
    return {"unknown_callers": [], "peers": [{"ae_title": t, "services": ["echo", "store"]}
                                             for t in titles]}


@pytest.mark.parametrize("workers", [1, 2])
def test_an_association_in_flight_finishes_across_a_reload_and_new_ones_get_the_new_peers(
        served: Callable[..., Served], db_url: str, tmp_path: Path, workers: int) -> None:
    gateway = served(db=db_url, dicom={"workers": workers}, security=_peers("OLDCT"))
    assert _echo(gateway, "OLDCT").returncode == 0
    assert _refused(gateway, "NEWCT")
    wait_for(lambda: len(_receiver_pids(gateway)) == (workers if workers > 1 else 0), 10,
             "the receiver processes")
    old_pids = _receiver_pids(gateway)

    files = write_study(tmp_path / "study", 400, PatientName="Müller^Jürgen")
    sender = subprocess.Popen(
        [require_tool("storescu"), "-aet", "OLDCT", "-aec", "GATEWAY", "127.0.0.1",
         str(gateway.port), *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True)
    wait_for(lambda: len(rows(gateway.db_url, "SELECT id FROM instances")) >= 5, 30,
             "the association to be under way")
    # OLDCT removed, NEWCT added: the association open now is OLDCT's
    _edit(gateway, security=_peers("NEWCT"))
    _reloaded(gateway, "applied")
    assert sender.poll() is None, "the association ended before the reload: nothing was tested"

    assert _refused(gateway, "OLDCT")
    assert _echo(gateway, "NEWCT").returncode == 0

    _, errors = sender.communicate(timeout=120)
    assert sender.returncode == 0, errors  # Success for every image, no abort
    assert _kept_once(gateway) == _uids(files)
    log = gateway.log()
    assert "configuration reloaded; changed: security.peers\n" in log
    assert "aborting association" not in log
    if workers > 1:
        # The old processes drained and exited; the new ones were never counted as crashes
        wait_for(lambda: not any(running(pid) for pid in old_pids), 15, "old receivers to exit")
        new_pids = _receiver_pids(gateway)[len(old_pids):]
        assert len(new_pids) == workers and all(running(pid) for pid in new_pids)
        assert "gateway_receiver_restarts_total 0.0" in _metrics(gateway)
    assert gateway.stop() == 0


@pytest.mark.parametrize(("broken", "named"), [
    ("[dicom\nport = ", "not valid TOML"),
    ({"security": {"peerz": []}}, "security.peerz: unknown key"),
    ({"dicom": {"max_associations": 0}}, "dicom.max_associations"),
    ({"forward": {"destinations": [{"type": "orthanc", "name": "pacs", "url": "http://127.0.0.1:1",
                                    "password_env": "GATEWAY_TEST_UNSET_PASSWORD"}]}},
     "GATEWAY_TEST_UNSET_PASSWORD"),
])
def test_an_invalid_file_keeps_the_old_configuration_and_says_why(
        served: Callable[..., Served], broken: str | dict[str, dict[str, Any]], named: str) -> None:
    gateway = served(dicom={"workers": 1}, security=_peers("OLDCT"))
    good = gateway.config_path.read_text(encoding="utf-8")
    if isinstance(broken, str):
        gateway.config_path.write_text(good + "\n" + broken, encoding="utf-8")
    else:
        _edit(gateway, **broken)
    _reloaded(gateway, "invalid")
    log = gateway.log()
    assert "ERROR" in log and "configuration NOT reloaded" in log and named in log
    assert "still running on the previous configuration" in log
    assert _echo(gateway, "OLDCT").returncode == 0
    assert _refused(gateway, "NEWCT")
    # Fixed: the next reload applies
    gateway.config_path.write_text(good, encoding="utf-8")
    _edit(gateway, security=_peers("NEWCT"))
    _reloaded(gateway, "applied")
    assert _echo(gateway, "NEWCT").returncode == 0
    assert gateway.stop() == 0


def test_a_changed_port_needs_a_restart_and_nothing_of_the_edit_is_applied(
        served: Callable[..., Served]) -> None:
    gateway = served(dicom={"workers": 2}, security=_peers("OLDCT"))
    pids = wait_for(lambda: len(_receiver_pids(gateway)) == 2 and _receiver_pids(gateway), 10,
                    "two receiver processes")
    other = free_port()
    _edit(gateway, dicom={"port": other}, security=_peers("NEWCT"))
    _reloaded(gateway, "needs_restart")
    lines = [line for line in gateway.log().splitlines() if "configuration NOT reloaded" in line]
    assert len(lines) == 1 and "dicom.port" in lines[0] and "restart" in lines[0]
    assert "security.peers" not in lines[0]  # only what needs the restart is named
    assert not port_open(other)
    assert _echo(gateway, "OLDCT").returncode == 0  # the old peers, on the old port
    assert _refused(gateway, "NEWCT")
    assert _receiver_pids(gateway) == pids  # no process replaced
    assert gateway.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_old_and_new_receivers_together_hold_max_associations(
        served: Callable[..., Served], workers: int) -> None:
    """A draining receiver's associations count until they end, on the node-wide board."""
    gateway = served(dicom={"workers": workers, "max_associations": 2})
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(VERIFICATION)
    held = [ae.associate("127.0.0.1", gateway.port, ae_title="GATEWAY") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        _edit(gateway, query={"max_results": 7})
        _reloaded(gateway, "applied")
        third = _echo(gateway, "THIRD")  # to a new receiver: the old ones hold both slots
        assert third.returncode != 0 and "Local Limit Exceeded" in third.stdout + third.stderr
        held[0].release()
        wait_for(lambda: _echo(gateway, "FOURTH").returncode == 0, 4, "the freed slot taken")
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
    assert gateway.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_after_several_reloads_no_process_is_left_and_sigterm_exits_within_the_grace(
        served: Callable[..., Served], tmp_path: Path, workers: int) -> None:
    # An Orthanc destination nobody listens on: a forward stage process that is replaced too
    destination = {"type": "orthanc", "name": "pacs", "url": f"http://127.0.0.1:{free_port()}"}
    gateway = served(dicom={"workers": workers}, forward={"destinations": [destination]})
    expected = workers if workers > 1 else 0
    wait_for(lambda: len(_receiver_pids(gateway)) == expected, 10, "the receiver processes")
    tree = descendants(gateway.process.pid)
    for n in range(1, 4):
        _edit(gateway, dicom={"max_associations": 40 + n})
        _reloaded(gateway, "applied", n)
    assert gateway.log().count("forward process replaced") == 3
    started = _receiver_pids(gateway)
    assert len(started) == expected * 4
    # The last ones serve; every earlier one drained and exited, and nothing else was left
    wait_for(lambda: len(descendants(gateway.process.pid)) == len(tree), 20,
             "the old processes to exit")
    assert [pid for pid in started if running(pid)] == started[len(started) - expected:]
    files = write_study(tmp_path / "s", 3)
    assert dcmtk("storescu", "-aec", "GATEWAY", "127.0.0.1", str(gateway.port),
                 *map(str, files)).returncode == 0
    everything = descendants(gateway.process.pid)
    begun = time.monotonic()
    assert gateway.stop(signal.SIGTERM) == 0
    assert time.monotonic() - begun < 5.0 + 5  # shutdown_grace_s and a margin
    assert not any(running(pid) for pid in everything)


def test_forwarding_and_rewriting_across_reloads_lose_and_repeat_nothing(
        served: Callable[..., Served], recording_orthanc: Callable[..., Recording],  # noqa: F811
        tmp_path: Path) -> None:
    """The forward and remap stages are replaced mid-queue, twice, with an edited rules file:
    every instance arrives at Orthanc (which records every copy it is given) exactly once,
    rewritten by the old rule or the new one, never by both, never left half done."""
    recording = recording_orthanc()
    orthanc = recording.orthanc
    rules = tmp_path / "rules.toml"
    rule = ('[[rules]]\nname = "site"\nactions = [{{ type = "set", tag = "InstitutionName", '
            'value = "{}" }}]\n')
    rules.write_text(rule.format("Hôpital Nord"), encoding="utf-8")
    orthanc.stop()  # the queue fills first, so that the second reload lands while it drains
    forward = {**FAST, "destinations": [orthanc_destination(orthanc, tmp_path, concurrency=1,
                                                            batch_size=1)]}
    gateway = served(dicom={"workers": 2}, forward=forward, remap={"rules_file": str(rules)})
    files = write_study(tmp_path / "study", 120, PatientName="Müller^Jürgen")
    sender = subprocess.Popen(
        [require_tool("storescu"), "-aec", "GATEWAY", "127.0.0.1", str(gateway.port),
         *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def confirmed() -> int:
        return len(jobs(gateway.db_url, "confirmed"))

    def sent_on() -> int:
        return len(rows(gateway.db_url, "SELECT id FROM forward_jobs WHERE state IN "
                        "('forwarded', 'confirmed')"))

    wait_for(lambda: len(rows(gateway.db_url, "SELECT id FROM instances")) >= 10, 60,
             "receiving under way")
    rules.write_text(rule.format("Hôpital Sud"), encoding="utf-8")
    _reloaded(gateway, "applied", 1)
    assert "changed: remap.rules_file (its contents)" in gateway.log()
    _, errors = sender.communicate(timeout=120)
    assert sender.returncode == 0, errors
    orthanc.start()
    wait_for(lambda: sent_on() >= 10, 60, "forwarding under way")
    _edit(gateway, forward={"check_interval_s": 0.3})
    _reloaded(gateway, "applied", 2)
    assert sent_on() < 120, "the queue was empty before the second reload: nothing tested"
    wait_for(lambda: confirmed() == 120, 120, "every instance confirmed")
    sent = _uids(files)
    copies = Counter(sop for _, _, sop in recording.copies())
    assert set(copies) == sent and max(copies.values()) == 1, copies.most_common(3)
    for uid in sorted(sent)[:10]:
        arrived = pydicom.dcmread(pydicom.filebase.DicomBytesIO(orthanc.instance_file(uid)))
        assert arrived.InstitutionName in ("Hôpital Nord", "Hôpital Sud")
    assert gateway.log().count("forward process replaced") == 2
    assert gateway.stop() == 0


def _with(config: GatewayConfig, key: str, value: Any) -> GatewayConfig:
    """``config`` with the dotted ``key`` set to ``value`` (validated as a file would be)."""
    data = config.model_dump(mode="json")
    *path, last = key.split(".")
    table = data
    for part in path:
        table = table[part]
    table[last] = value
    return GatewayConfig.model_validate(data)


# One changed value per key bound once per process tree, and per key applied live
NEEDS_RESTART = [
    ("dicom.port", 11113), ("dicom.bind_host", "127.0.0.2"), ("dicom.workers", 3),
    ("dicom.shutdown_grace_s", 9.0), ("database.url", "sqlite:////elsewhere/g.db"),
    ("database.busy_timeout_s", 3.0), ("storage.spool_dir", "/elsewhere/spool"),
    ("storage.min_free_mb", 2), ("forward.node_name", "node-b"), ("metrics.port", 9999),
    ("metrics.enabled", False), ("cluster.heartbeat_s", 9.0), ("hl7.enabled", True),
    ("logging.level", "DEBUG"),
    ("api.tokens", [{"name": "t", "sha256": "a" * 64, "role": "exporter", "sites": ["*"]}]),
]
LIVE = [
    ("security.peers", [{"ae_title": "CT1"}]), ("security.unknown_callers", ["echo"]),
    ("dicom.max_associations", 7), ("dicom.ae_title", "OTHER"), ("dicom.dimse_timeout_s", 5.0),
    ("storage.duplicate_policy", "replace"), ("query.max_results", 3),
    ("worklist.max_results", 4), ("retention.keep_days", 1.0), ("remap.coerced_status", "warning"),
    ("jobs", [{"kind": "worklist_build", "name": "wl", "every_s": 60}]),
]


@pytest.mark.parametrize(("key", "value"), NEEDS_RESTART + LIVE)
def test_each_key_is_either_applied_live_or_named_as_needing_a_restart(
        tmp_path: Path, key: str, value: Any) -> None:
    old = GatewayConfig.model_validate(config_dict(tmp_path, "sqlite:///g.db", 11112))
    new = _with(old, key, value)
    changed = changed_keys(old, new)
    assert changed == [key]
    assert needing_restart(old, new, changed) == ([key] if (key, value) in NEEDS_RESTART else [])


@pytest.mark.parametrize(("key", "before", "after"), [
    ("remap.rules_file", None, "rules.toml"),
    ("forward.destinations", [], [{"type": "dimse", "name": "p", "ae_title": "PACS",
                                   "host": "127.0.0.1", "port": 104}]),
])
def test_a_stage_appearing_or_going_needs_a_restart(
        tmp_path: Path, key: str, before: Any, after: Any) -> None:
    (tmp_path / "rules.toml").write_text("", encoding="utf-8")
    if key == "remap.rules_file":
        after = str(tmp_path / after)
    base = GatewayConfig.model_validate(config_dict(tmp_path, "sqlite:///g.db", 11112))
    one, other = _with(base, key, before), _with(base, key, after)
    for old, new in ((one, other), (other, one)):
        assert needing_restart(old, new, changed_keys(old, new)) == [key]


def test_an_edited_rules_file_is_a_change_under_an_unchanged_path(tmp_path: Path) -> None:
    rules = tmp_path / "rules.toml"
    rules.write_text("", encoding="utf-8")
    config = GatewayConfig.model_validate(
        config_dict(tmp_path, "sqlite:///g.db", 11112, remap={"rules_file": str(rules)}))
    before = rules_digest(config)
    rules.write_text('[[rules]]\nname = "x"\nactions = []\n', encoding="utf-8")
    assert rules_digest(config) != before
