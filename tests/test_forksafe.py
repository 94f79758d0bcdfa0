"""A child forked while another thread of the supervisor holds a metric's lock
(``gateway.forksafe``): with the guard it runs; without, it hangs on its first metric update.

Each case runs in a fresh interpreter: prometheus-client's multiprocess mode is process-wide."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

# A supervisor thread is inside a metric update (held there, as the scheduler or the forward
# stage's counters can be at any instant) while the main thread forks a receiver process that
# counts an association, as every receiver does.
SCRIPT = r"""
import multiprocessing, sys, tempfile, threading, time
from pathlib import Path
from prometheus_client import CollectorRegistry
from prometheus_client.mmap_dict import MmapedDict
from gateway import forksafe
from gateway.metrics import Metrics, use_multiprocess

guarded, where = sys.argv[1] == "guarded", sys.argv[2]
folder = Path(tempfile.mkdtemp())
use_multiprocess(folder)
metrics = Metrics(CollectorRegistry(), folder)
if guarded:
    forksafe.guard(metrics)
inside = threading.Event()

if where == "values":  # prometheus-client's one lock of multiprocess mode, held in inc()
    write = MmapedDict.write_value
    def slow_write(self, *args):
        if threading.current_thread().name == "supervisor-thread":
            inside.set()
            time.sleep(1.0)
        return write(self, *args)
    MmapedDict.write_value = slow_write
    def update():
        metrics.receiver_restarts.inc()
else:  # a labelled metric's lock, held in labels() while it makes a child
    def update():
        with metrics.associations._lock:
            inside.set()
            time.sleep(1.0)

threading.Thread(target=update, name="supervisor-thread").start()
inside.wait()

def receiver():
    metrics.associations.labels("accepted", "").inc()
    metrics.associations_active.inc()

child = multiprocessing.get_context("fork").Process(target=receiver)
child.start()
child.join(8)
print("hung" if child.is_alive() else f"exit {child.exitcode}")
if child.is_alive():
    child.kill()
"""


def _run(guarded: bool, where: str) -> str:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, "guarded" if guarded else "bare", where],
        capture_output=True, text=True, timeout=60, env=env, check=False)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.parametrize("where", ["values", "labels"])
def test_a_child_forked_while_a_thread_holds_a_metric_lock_runs(where: str) -> None:
    assert _run(True, where) == "exit 0"


@pytest.mark.parametrize("where", ["values", "labels"])
def test_without_the_guard_such_a_child_hangs(where: str) -> None:
    """The hazard itself, so that the test above is known to test something."""
    assert _run(False, where) == "hung"


# The production path: the supervisor's watch thread starts a receiver process again after one
# was killed, while another supervisor thread is inside a metric update; the new process counts
# an association (as every receiver does on its first) and says it runs.
RESTART = r"""
import os, signal, sys, tempfile, threading, time
from pathlib import Path
from prometheus_client import CollectorRegistry
from prometheus_client.mmap_dict import MmapedDict
from gateway import forksafe
from gateway.metrics import Metrics, use_multiprocess
from gateway.receive.workers import ReceiverWorkers, WorkerBoard

guarded = sys.argv[1] == "guarded"
folder = Path(tempfile.mkdtemp())
use_multiprocess(folder)
metrics = Metrics(CollectorRegistry(), folder)
if guarded:
    forksafe.guard(metrics)
marks = Path(tempfile.mkdtemp())

class Idle:
    def start(self): pass
    def stop(self, grace_s): pass

def build(slot, channel):
    metrics.associations.labels("accepted", "").inc()
    (marks / str(os.getpid())).touch()
    return Idle()

workers = ReceiverWorkers(1, build, WorkerBoard(2, 4), ("127.0.0.1", 0), 1.0)
workers.start()
deadline = time.monotonic() + 10
while len(list(marks.iterdir())) < 1 and time.monotonic() < deadline:
    time.sleep(0.02)
first = workers.pids()[0]

inside = threading.Event()
write = MmapedDict.write_value
def slow_write(self, *args):
    if threading.current_thread().name == "supervisor-thread":
        inside.set()
        time.sleep(2.0)
    return write(self, *args)
MmapedDict.write_value = slow_write
threading.Thread(target=metrics.receiver_restarts.inc, name="supervisor-thread").start()
inside.wait()
os.kill(first, signal.SIGKILL)  # the watch thread forks its replacement within the hold
deadline = time.monotonic() + 8
while len(list(marks.iterdir())) < 2 and time.monotonic() < deadline:
    time.sleep(0.05)
print("restarted" if len(list(marks.iterdir())) == 2 else "hung")
for pid in workers.pids():
    os.kill(pid, signal.SIGKILL)
os._exit(0)
"""


@pytest.mark.parametrize(("guarded", "outcome"), [(True, "restarted"), (False, "hung")])
def test_a_receiver_restarted_while_a_supervisor_thread_updates_a_metric(
        guarded: bool, outcome: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    env.pop("PROMETHEUS_MULTIPROC_DIR", None)
    done = subprocess.run([sys.executable, "-c", RESTART, "guarded" if guarded else "bare"],
                          capture_output=True, text=True, timeout=60, env=env, check=False)
    assert done.stdout.strip() == outcome, done.stderr
