"""The gateway's counterparts in tests: DCMTK tools as real modalities, and a raw pynetdicom SCU
for requests no well-behaved modality would send (mismatched UIDs, undecodable data sets)."""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from io import BytesIO
from pathlib import Path
from typing import Any, NoReturn

import pytest
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.filebase import DicomBytesIO
from pydicom.filewriter import write_dataset
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE
from pynetdicom.dimse_primitives import C_STORE

IN_CI = os.environ.get("CI") == "true"


def unavailable(message: str) -> NoReturn:
    """A tool or service this test needs is missing: under CI=true that fails the run (CI
    installs everything, scripts/test), elsewhere the test is skipped with ``message``."""
    if IN_CI:
        pytest.fail(message)
    pytest.skip(message)  # outside CI only: IN_CI failed above


def require_tool(name: str) -> str:
    """Path of a tool; in CI a missing tool fails the run, elsewhere the test is skipped."""
    path = shutil.which(name)
    if path is None:
        unavailable(f"{name} not found: install it (scripts/test does, with apt)")
    return path


def dcmtk(
    tool: str, *args: str, nodelay: bool = True, timeout: float = 120, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a DCMTK tool. ``nodelay`` sets TCP_NODELAY=1 in its environment (speed only)."""
    env = dict(os.environ)
    env.pop("TCP_NODELAY", None)
    if nodelay:
        env["TCP_NODELAY"] = "1"
    return subprocess.run(
        [require_tool(tool), *args], capture_output=True, text=True, timeout=timeout, env=env,
        cwd=cwd, check=False
    )


def encode(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    buffer = DicomBytesIO()
    buffer.is_little_endian = True
    buffer.is_implicit_VR = transfer_syntax == ImplicitVRLittleEndian
    write_dataset(buffer, ds)
    return buffer.getvalue()


def raw_c_store(
    port: int,
    payload: bytes,
    sop_class: str,
    sop_instance: str,
    calling_ae: str = "RAWSCU",
    called_ae: str = "GATEWAY",
    transfer_syntax: str = ExplicitVRLittleEndian,
) -> int:
    """Send one C-STORE whose Affected UIDs and data set bytes are exactly as given."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(sop_class, transfer_syntax)
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established, "association was not accepted"
    # Pause the requestor's reactor, as pynetdicom's own send_c_store does, so that the response
    # comes to us and not to the reactor.
    assoc._reactor_checkpoint.clear()
    while not assoc._is_paused:
        time.sleep(0.0001)
    try:
        context = assoc.accepted_contexts[0]
        request = C_STORE()
        request.MessageID = 1
        request.AffectedSOPClassUID = sop_class
        request.AffectedSOPInstanceUID = sop_instance
        request.Priority = 2
        request.DataSet = BytesIO(payload)
        assert context.context_id is not None
        assoc.dimse.send_msg(request, context.context_id)
        _, response = assoc.dimse.get_msg(block=True)
        assert response is not None, "no C-STORE response"
        assert response.Status is not None
        return int(response.Status)
    finally:
        assoc._reactor_checkpoint.set()
        assoc.release()


def store(port: int, ds: Dataset, calling_ae: str = "PYSCU", called_ae: str = "GATEWAY") -> int:
    """A well-formed C-STORE of ``ds``; returns the status on the wire."""
    ae = AE(ae_title=calling_ae)
    ae.add_requested_context(ds.SOPClassUID, ExplicitVRLittleEndian)
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    assoc = ae.associate("127.0.0.1", port, ae_title=called_ae)
    assert assoc.is_established, "association was not accepted"
    try:
        status: Any = assoc.send_c_store(ds)
        return int(status.Status)
    finally:
        assoc.release()


def spool_files(spool: Path) -> list[Path]:
    return sorted(p for p in spool.rglob("*.dcm") if "incoming" not in p.parts)
