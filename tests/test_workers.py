"""Several receiver processes (``dicom.workers``) behind one port, driven by DCMTK: every
acknowledged instance kept once, the node-wide association limit, a killed worker replaced, and
``/metrics`` summed over the processes (``gateway.receive.workers``, ``gateway.metrics``)."""

from __future__ import annotations

import multiprocessing
import re
import signal
import subprocess
import threading
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pynetdicom import AE

from gateway.dicom.peers import RejectReason
from gateway.receive.workers import WorkerBoard
from tests.conftest import Served, rows, running, wait_for
from tests.factory import write_study
from tests.peers import dcmtk, require_tool, spool_files

VERIFICATION = "1.2.840.10008.1.1"
STARTED = re.compile(r"receiver process (\d+) started \(slot (\d+)\)")


def _receiver_pids(gateway: Served) -> list[int]:
    """Every receiver process the supervisor has started so far, in order."""
    return [int(pid) for pid, _ in STARTED.findall(gateway.log())]


def _metrics(gateway: Served) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{gateway.metrics_port}/metrics") as response:
        return str(response.read().decode())


def _send_all(gateway: Served, studies: list[list[Path]]) -> list[subprocess.CompletedProcess[str]]:
    results: list[subprocess.CompletedProcess[str]] = [None] * len(studies)  # type: ignore[list-item]

    def send(i: int) -> None:
        results[i] = dcmtk("storescu", "-aet", f"CT{i}", "-aec", "GATEWAY", "127.0.0.1",
                           str(gateway.port), *map(str, studies[i]))

    threads = [threading.Thread(target=send, args=(i,)) for i in range(len(studies))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def _uids(files: list[Path]) -> set[str]:
    return {str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID) for f in files}


def _kept_once(gateway: Served) -> set[str]:
    """The ledger's instances, each once and each with exactly one file on disk."""
    ledger = [str(r.sop_instance_uid) for r in rows(gateway.db_url, "SELECT * FROM instances")]
    assert len(ledger) == len(set(ledger)), "an instance recorded twice"
    on_disk = [str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID)
               for p in spool_files(gateway.spool)]
    assert sorted(on_disk) == sorted(ledger), "ledger and spool disagree"
    return set(ledger)


def test_eight_concurrent_associations_over_two_workers_keep_each_instance_once(
        served: Callable[..., Served], db_url: str, tmp_path: Path) -> None:
    gateway = served(db=db_url, dicom={"workers": 2})
    wait_for(lambda: len(_receiver_pids(gateway)) == 2, 10, "two receiver processes")
    studies = [write_study(tmp_path / f"s{i}", 6, PatientName="Müller^Jürgen") for i in range(8)]
    results = _send_all(gateway, studies)
    assert [r.returncode for r in results] == [0] * 8, [r.stderr for r in results]
    sent = set().union(*map(_uids, studies))
    assert _kept_once(gateway) == sent
    wait_for(lambda: "gateway_associations_active 0.0" in _metrics(gateway), 10,
             "every association counted out")
    metrics = _metrics(gateway)
    # Each instance counted once, whichever process took it; the series as with one process
    for i in range(8):
        assert f'gateway_instances_received_total{{calling_ae="CT{i}",status="0x0000"}} 6.0' \
            in metrics
    assert 'gateway_associations_total{reason="",result="accepted"} 8.0' in metrics
    assert "gateway_spool_free_bytes" in metrics
    # One family per name: the collectors of the processes are merged, not listed side by side
    types = re.findall(r"^# TYPE (\S+)", metrics, re.MULTILINE)
    assert len(types) == len(set(types)) and "gateway_instances_received_total" in types
    assert gateway.stop() == 0


def test_a_killed_worker_is_replaced_and_nothing_acknowledged_is_lost(
        served: Callable[..., Served], tmp_path: Path) -> None:
    gateway = served(dicom={"workers": 2})
    first = wait_for(lambda: _receiver_pids(gateway)[:2] if len(_receiver_pids(gateway)) == 2
                     else None, 10, "two receiver processes")
    studies = [write_study(tmp_path / f"s{i}", 60) for i in range(4)]
    senders = [subprocess.Popen(
        [require_tool("storescu"), "-aet", f"CT{i}", "-aec", "GATEWAY", "127.0.0.1",
         str(gateway.port), *map(str, files)], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True, env={"TCP_NODELAY": "1", "PATH": "/usr/bin:/bin"}) for i, files in
        enumerate(studies)]
    wait_for(lambda: len(rows(gateway.db_url, "SELECT id FROM instances")) >= 8, 30,
             "the senders to be under way")
    victim = first[0]
    subprocess.run(["kill", "-KILL", str(victim)], check=True)
    for sender in senders:
        sender.communicate(timeout=120)
    codes = [s.returncode for s in senders]
    assert 0 in codes, "every association failed: the other worker should have gone on"
    assert any(codes), "no association failed: the killed worker held none"
    kept = _kept_once(gateway)
    for files, code in zip(studies, codes, strict=True):
        if code == 0:  # storescu saw Success for every image
            assert _uids(files) <= kept
    assert kept <= set().union(*map(_uids, studies))

    wait_for(lambda: len(_receiver_pids(gateway)) == 3, 15, "the supervisor to start another")
    assert "exited (code -9)" in gateway.log()
    replacement = _receiver_pids(gateway)[-1]
    assert replacement not in first and running(replacement)
    assert not running(victim)
    # The node serves on: enough new associations to reach the new process too
    again = [write_study(tmp_path / f"again{i}", 3) for i in range(4)]
    assert [r.returncode for r in _send_all(gateway, again)] == [0] * 4
    assert set().union(*map(_uids, again)) <= _kept_once(gateway)
    assert "gateway_receiver_restarts_total 1.0" in _metrics(gateway)
    assert not [p for p in (gateway.spool / "incoming").iterdir() if p.name.startswith(
        f"{victim}-")], "the killed process's partial files stayed"
    assert gateway.stop(signal.SIGTERM) == 0
    assert not any(running(pid) for pid in _receiver_pids(gateway))


def test_max_associations_holds_across_workers(served: Callable[..., Served]) -> None:
    gateway = served(dicom={"workers": 2, "max_associations": 2})
    ae = AE(ae_title="HOLDER")
    ae.add_requested_context(VERIFICATION)
    held = [ae.associate("127.0.0.1", gateway.port, ae_title="GATEWAY") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = dcmtk("echoscu", "-aet", "THIRD", "-aec", "GATEWAY", "127.0.0.1",
                      str(gateway.port))
        assert third.returncode != 0
        assert "Local Limit Exceeded" in third.stderr + third.stdout, third.stderr
    finally:
        held[0].release()
    # A slot given back on either worker is free for the next caller, whichever worker takes it
    wait_for(lambda: dcmtk("echoscu", "-aet", "FOURTH", "-aec", "GATEWAY", "127.0.0.1",
                           str(gateway.port)).returncode == 0, 10, "the freed slot to be taken")
    held[1].release()
    metrics = _metrics(gateway)
    assert 'gateway_associations_total{reason="local_limit_exceeded",result="rejected"} 1.0' \
        in metrics
    assert gateway.stop() == 0


@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_drains_and_exits_0(
    served: Callable[..., Served], tmp_path: Path, workers: int
) -> None:
    gateway = served(dicom={"workers": workers})
    files = write_study(tmp_path / "s", 5)
    assert dcmtk("storescu", "-aec", "GATEWAY", "127.0.0.1", str(gateway.port),
                 *map(str, files)).returncode == 0
    assert len(_receiver_pids(gateway)) == (workers if workers > 1 else 0)
    assert gateway.stop(signal.SIGTERM) == 0
    assert _kept_once(gateway) == _uids(files)


# -- the board's counts, without sockets ------------------------------------------------------

_TITLES = st.one_of(
    st.sampled_from(["CT1", "CT10", "CT", "CT1 X", "", "A" * 16]),  # prefixes, padding, empty
    st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E, exclude_characters="\\"),
            max_size=16).map(str.strip),
)
_STEPS = st.lists(st.one_of(
    st.tuples(st.just("take"), st.integers(0, 2), _TITLES),
    st.tuples(st.just("give"), st.integers(0, 2), st.integers(0, 20)),
    st.tuples(st.just("forget"), st.integers(0, 2), st.just(0)),
), max_size=60)


@given(steps=_STEPS, node=st.integers(1, 5), per_peer=st.one_of(st.none(), st.integers(1, 3)))
@settings(max_examples=200, deadline=None)
def test_the_board_admits_exactly_what_the_limits_allow(
        steps: list[tuple[str, int, Any]], node: int, per_peer: int | None) -> None:
    """Any sequence of admissions, ends and dead workers over three slots: each answer is the
    one a plain list of open associations per slot gives, and the counts agree with it."""
    board = WorkerBoard(3, node)
    slots = [board.admissions(slot, node) for slot in range(3)]
    held: list[list[str]] = [[], [], []]
    for op, slot, arg in steps:
        if op == "take":
            everyone = [t for titles in held for t in titles]
            expected = (RejectReason.LOCAL_LIMIT_EXCEEDED if len(held[slot]) == node else
                        RejectReason.PEER_LIMIT_EXCEEDED if per_peer is not None and
                        everyone.count(arg) >= per_peer else
                        RejectReason.LOCAL_LIMIT_EXCEEDED if len(everyone) >= node else None)
            assert slots[slot].take(arg, per_peer) is expected
            if expected is None:
                held[slot].append(arg)
        elif op == "give" and held[slot]:
            title = held[slot].pop(arg % len(held[slot]))
            slots[slot].give_back(title)
        elif op == "forget":
            board.forget(slot)
            held[slot] = []
        everyone = [t for titles in held for t in titles]
        assert board.admitted() == len(everyone)
        for title in set(everyone):
            assert board.admitted(title) == everyone.count(title)


def _race(board: WorkerBoard, slot: int, title: str, limit: int, start: Any, out: Any) -> None:
    start.wait()
    out.put(board.admissions(slot, 100).take(title, limit) is None)


def test_racing_processes_never_exceed_a_peer_limit() -> None:
    """Four processes ask for the same title at once, 30 times, limit 2: never 3 admitted."""
    context = multiprocessing.get_context("fork")
    for _ in range(30):
        board = WorkerBoard(4, 100)
        start, out = context.Barrier(4), context.Queue()
        racers = [context.Process(target=_race, args=(board, slot, "CT1", 2, start, out))
                  for slot in range(4)]
        for racer in racers:
            racer.start()
        admitted = sum(out.get(timeout=30) for _ in racers)
        for racer in racers:
            racer.join(30)
        assert admitted <= 2 and board.admitted("CT1") == admitted


# -- per-peer limits on the wire -----------------------------------------------------------------

TRANSIENT_LOCAL_LIMIT = ("Rejected Transient", "Service Provider (Presentation",
                         "Local Limit Exceeded")


def _hold(gateway: Served, calling_ae: str) -> Any:
    """An association from ``calling_ae``, kept established until the test releases it."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(VERIFICATION)
    return ae.associate("127.0.0.1", gateway.port, ae_title="GATEWAY")


def _echo(gateway: Served, calling_ae: str) -> subprocess.CompletedProcess[str]:
    return dcmtk("echoscu", "-aet", calling_ae, "-aec", "GATEWAY", "127.0.0.1", str(gateway.port))


def _refused_at_a_limit(result: subprocess.CompletedProcess[str]) -> bool:
    """A-ASSOCIATE-RJ rejected-transient, service-provider (presentation), local-limit-exceeded
    (PS3.8 Table 9-21): the same on the wire for the node's limit and a peer's."""
    text = result.stdout + result.stderr
    return result.returncode != 0 and all(part in text for part in TRANSIENT_LOCAL_LIMIT)


@pytest.mark.parametrize("workers", [1, 2])
def test_one_caller_cannot_take_more_than_its_limit_across_processes(
        served: Callable[..., Served], db_url: str, workers: int) -> None:
    gateway = served(db=db_url, dicom={"workers": workers, "max_associations": 10},
                     security={"max_associations_per_peer": 2})
    if workers > 1:
        wait_for(lambda: len(_receiver_pids(gateway)) == 2, 10, "two receiver processes")
    # Handed to the process with the fewest connections: with two, one in each
    held = [_hold(gateway, "CT1") for _ in range(2)]
    try:
        assert all(a.is_established for a in held)
        third = _echo(gateway, "CT1")
        assert _refused_at_a_limit(third), third.stdout + third.stderr
        assert _echo(gateway, "CT2").returncode == 0  # another scanner is not held back
        held.pop(0).release()
        wait_for(lambda: "gateway_associations_active 1.0" in _metrics(gateway), 10,
                 "the released association and CT2's counted out")
        # The place given back, whichever process held it, is CT1's again
        assert _echo(gateway, "CT1").returncode == 0
    finally:
        for assoc in held:
            assoc.release()
    assert 'gateway_associations_total{reason="peer_limit_exceeded",result="rejected"} 1.0' \
        in _metrics(gateway)
    assert "rejected association from CT1" in gateway.log()
    assert "peer_limit_exceeded (CT1 already holds its 2 associations" in gateway.log()
    assert gateway.stop() == 0
    ledger = [tuple(r) for r in rows(gateway.db_url, "SELECT calling_ae, result, reason FROM "
                                     "associations ORDER BY id")]
    assert ledger[:4] == [("CT1", "accepted", None), ("CT1", "accepted", None),
                          ("CT1", "rejected", "peer_limit_exceeded"), ("CT2", "accepted", None)]
    assert ledger[-1] == ("CT1", "accepted", None)
    assert "local_limit_exceeded" not in {r[2] for r in ledger}


def test_a_peers_own_limit_overrides_the_default_both_ways(served: Callable[..., Served]) -> None:
    gateway = served(dicom={"workers": 2, "max_associations": 10}, security={
        "max_associations_per_peer": 2, "peers": [
            {"ae_title": "PACS", "services": ["echo"], "max_associations": 3},  # above
            {"ae_title": "US1", "services": ["echo"], "max_associations": 1},  # below
        ]})
    held = [_hold(gateway, "PACS") for _ in range(3)] + [_hold(gateway, "US1")]
    try:
        assert all(a.is_established for a in held)
        assert _refused_at_a_limit(_echo(gateway, "PACS"))
        assert _refused_at_a_limit(_echo(gateway, "US1"))
        assert _echo(gateway, "CT1").returncode == 0  # the default, for anyone else
    finally:
        for assoc in held:
            assoc.release()
    assert 'gateway_associations_total{reason="peer_limit_exceeded",result="rejected"} 2.0' \
        in _metrics(gateway)
    assert gateway.stop() == 0


def test_a_killed_workers_places_are_given_back(served: Callable[..., Served]) -> None:
    gateway = served(dicom={"workers": 2, "max_associations": 10},
                     security={"max_associations_per_peer": 2})
    first = wait_for(lambda: _receiver_pids(gateway)[:2] if len(_receiver_pids(gateway)) == 2
                     else None, 10, "two receiver processes")
    held = [_hold(gateway, "CT1") for _ in range(2)]  # one in each process
    try:
        assert all(a.is_established for a in held)
        assert _refused_at_a_limit(_echo(gateway, "CT1"))
        subprocess.run(["kill", "-KILL", str(first[0])], check=True)
        wait_for(lambda: len(_receiver_pids(gateway)) == 3, 15, "the supervisor to start another")
        # The dead process's CT1 place is free; the live one's is still held: one more, not two
        held.append(_hold(gateway, "CT1"))  # forgotten before the new process started
        assert held[-1].is_established, "the dead process's place is still taken"
        assert _refused_at_a_limit(_echo(gateway, "CT1"))
    finally:
        for assoc in held:
            if assoc.is_established:
                assoc.release()
    assert gateway.stop() == 0
