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
