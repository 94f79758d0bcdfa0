"""gateway.query.prefetch: another node's instances fetched ahead of the sub-operation being sent.

What a retrieve must keep whatever the window, the mix of local and remote instances, the
failures and the moment it stops (cancel, abort): the data sets in the ledger's order, each
remote instance fetched once, a failed fetch a stand-in naming its UID, never more files at once
than the window, and none left open once it is closed. The holder is a stand-in for
``gateway.cluster.peers.Peers`` that answers after a random short delay."""

from __future__ import annotations

import random
import tempfile
import threading
import time
from pathlib import Path
from typing import BinaryIO, cast

from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.uid import generate_uid

from gateway.cluster.peers import IN_MEMORY, PeerFetchError, Peers
from gateway.query.prefetch import Prefetch
from gateway.query.retrieve import _UNSENDABLE_SOP_CLASS, Loader, Stored
from tests.conftest import wait_for
from tests.factory import make_dataset, write_file

CT = "1.2.840.10008.5.1.4.1.1.2"
EXPLICIT = "1.2.840.10008.1.2.1"


def _file_bytes(uid: str) -> bytes:
    with tempfile.TemporaryDirectory() as folder:
        return write_file(make_dataset(SOPInstanceUID=uid), Path(folder, "x.dcm")).read_bytes()


class FakeHolder:
    """Node ``b``: gives each UID's file after 0-3 ms, in a temporary file as ``Peers`` does;
    counts the files open at once and every fetch."""

    def __init__(self, failing: set[str], seed: int) -> None:
        self._failing = failing
        self._random = random.Random(seed)
        self._lock = threading.Lock()
        self.files: list[BinaryIO] = []
        self.fetched: list[str] = []
        self.most_open = 0
        self.on_disk: list[bool] = []

    def fetch(self, node: str, sop_instance_uid: str, sha256: str | None,
              in_memory_bytes: int = IN_MEMORY) -> BinaryIO:
        with self._lock:
            delay = self._random.random() * 0.003
        time.sleep(delay)
        with self._lock:
            self.fetched.append(sop_instance_uid)
            self.on_disk.append(in_memory_bytes == 0)
            if sop_instance_uid in self._failing:
                raise PeerFetchError(f"{sop_instance_uid}: the bytes from node {node} do not "
                                     "match the ledger's SHA-256; not used")
            file = cast(BinaryIO, tempfile.TemporaryFile())  # noqa: SIM115 (returned open)
            file.write(_file_bytes(sop_instance_uid))
            file.seek(0)
            self.files.append(file)
            self.most_open = max(self.most_open, sum(not f.closed for f in self.files))
            return file

    def close(self) -> None:
        pass

    def open_files(self) -> int:
        with self._lock:
            return sum(not f.closed for f in self.files)


@settings(max_examples=40, deadline=None)
@given(
    kinds=st.lists(st.sampled_from(["remote", "remote", "remote", "local", "failing"]),
                   max_size=14),
    window=st.integers(min_value=0, max_value=5),
    stop=st.floats(min_value=0, max_value=1),
    seed=st.integers(min_value=0, max_value=1000),
)
def test_prefetch_keeps_order_window_and_closes_everything(
    kinds: list[str], window: int, stop: float, seed: int,
) -> None:
    with tempfile.TemporaryDirectory() as spool:
        found: list[Stored] = []
        for kind in kinds:
            uid = generate_uid()
            if kind == "local":  # this node's own file
                Path(spool, f"{uid}.dcm").write_bytes(_file_bytes(uid))
            found.append(Stored(uid, CT, EXPLICIT, Path(f"{uid}.dcm"), (),
                                "a" if kind == "local" else "b", "0" * 64))
        failing = {s.sop_instance_uid for s, k in zip(found, kinds, strict=True) if k == "failing"}
        holder = FakeHolder(failing, seed)
        loader = Loader(Path(spool), {}, "a", cast(Peers, holder), prefetch_window=window)
        sent = int(stop * len(found))  # a cancel or an abort after this many sub-operations

        with Prefetch(loader, found, window) as ahead:
            for index in range(sent):
                ds = ahead.load(index)
                assert str(ds.SOPInstanceUID) == found[index].sop_instance_uid  # in order
                unsendable = str(ds.SOPClassUID) == _UNSENDABLE_SOP_CLASS
                assert unsendable == (kinds[index] == "failing")  # a failed sub-operation
                assert holder.most_open <= max(window, 1)

        wait_for(lambda: holder.open_files() == 0, 10, "every fetched file closed")
        remote = [s.sop_instance_uid for s, k in zip(found, kinds, strict=True) if k != "local"]
        assert len(holder.fetched) == len(set(holder.fetched))  # each fetched at most once
        assert set(holder.fetched) <= set(remote)
        assert set(remote[:sum(k != "local" for k in kinds[:sent])]) <= set(holder.fetched)
        if window:  # ahead: in temporary files on disk, not in memory
            assert all(holder.on_disk)
            assert len(holder.fetched) <= sum(k != "local" for k in kinds[:sent]) + window


def test_closing_mid_fetch_closes_the_files_of_fetches_still_running() -> None:
    """An abort while fetches are in flight: the files they produce afterwards are closed as
    they finish, and nothing further is fetched."""
    release = threading.Event()

    class SlowHolder(FakeHolder):
        def fetch(self, node: str, sop_instance_uid: str, sha256: str | None,
                  in_memory_bytes: int = IN_MEMORY) -> BinaryIO:
            release.wait(10)
            return super().fetch(node, sop_instance_uid, sha256, in_memory_bytes)

    with tempfile.TemporaryDirectory() as spool:
        found = [Stored(generate_uid(), CT, EXPLICIT, Path("x.dcm"), (), "b", "0" * 64)
                 for _ in range(10)]
        holder = SlowHolder(set(), 1)
        prefetch = Prefetch(Loader(Path(spool), {}, "a", cast(Peers, holder)), found, 3)
        prefetch.close()  # three fetches running, blocked
        release.set()
        wait_for(lambda: len(holder.fetched) == 3 and holder.open_files() == 0, 10,
                 "the running fetches to finish and their files to be closed")
        time.sleep(0.05)
        assert len(holder.fetched) == 3  # none started after the close


def test_fetches_overlap_up_to_the_window() -> None:
    """The point of it: while one instance is sent, the next ones are on their way, several at
    once, never more than the window."""
    lock = threading.Lock()
    in_flight = [0, 0]  # now, most

    class CountingHolder(FakeHolder):
        def fetch(self, node: str, sop_instance_uid: str, sha256: str | None,
                  in_memory_bytes: int = IN_MEMORY) -> BinaryIO:
            with lock:
                in_flight[0] += 1
                in_flight[1] = max(in_flight)
            try:
                time.sleep(0.05)
                return super().fetch(node, sop_instance_uid, sha256, in_memory_bytes)
            finally:
                with lock:
                    in_flight[0] -= 1

    with tempfile.TemporaryDirectory() as spool:
        found = [Stored(generate_uid(), CT, EXPLICIT, Path("x.dcm"), (), "b", "0" * 64)
                 for _ in range(12)]
        holder = CountingHolder(set(), 2)
        with Prefetch(Loader(Path(spool), {}, "a", cast(Peers, holder)), found, 4) as ahead:
            for index in range(len(found)):
                assert str(ahead.load(index).SOPInstanceUID) == found[index].sop_instance_uid
        assert 2 <= in_flight[1] <= 4
        assert holder.open_files() == 0
