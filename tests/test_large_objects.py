"""A large multi-frame is streamed to disk, never held whole in the gateway's memory."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pydicom
import pytest
from pydicom.encaps import encapsulate
from pydicom.uid import ExplicitVRLittleEndian, JPEGBaseline8Bit

from tests.conftest import Served
from tests.factory import make_dataset, write_file
from tests.peers import dcmtk, spool_files

OBJECT_MB = 160


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmHWM")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def big_native(path: Path) -> Path:
    frames = OBJECT_MB * 4  # 512x512x2 bytes = 0.25 MiB a frame
    ds = make_dataset(rows=512, columns=512, frames=1)
    ds.NumberOfFrames = frames
    ds.PixelData = os.urandom(1 << 20) * (frames // 4)
    return write_file(ds, path, ExplicitVRLittleEndian)


def big_encapsulated(path: Path) -> Path:
    """JPEG baseline syntax with opaque fragments: the gateway never decodes pixels, so the
    fragments need only be well-formed items, not real JPEG."""
    frames = OBJECT_MB
    chunk = os.urandom(1 << 20)
    ds = make_dataset(rows=512, columns=512, frames=1)
    ds.NumberOfFrames = frames
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 3, "YBR_FULL_422"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PlanarConfiguration = 8, 8, 7, 0
    ds.PixelData = encapsulate([chunk] * frames)
    ds["PixelData"].VR = "OB"
    return write_file(ds, path, JPEGBaseline8Bit)


@pytest.mark.parametrize("make", [big_native, big_encapsulated])
def test_large_multiframe_is_received_in_bounded_memory(
    served: Callable[..., Served], tmp_path: Path, make: Callable[[Path], Path]
) -> None:
    gateway = served()
    source = make(tmp_path / "big.dcm")
    baseline = rss_mb(gateway.process.pid)
    result = dcmtk("dcmsend", "-aet", "MODALITY", "-aec", "GATEWAY", "127.0.0.1",
                   str(gateway.port), str(source), timeout=300)
    assert result.returncode == 0, result.stderr + result.stdout
    peak = peak_rss_mb(gateway.process.pid)
    [stored] = spool_files(gateway.spool)
    assert stored.stat().st_size >= OBJECT_MB * (1 << 20)
    kept = pydicom.dcmread(stored, defer_size=1024)
    assert kept.SOPInstanceUID == pydicom.dcmread(source, stop_before_pixels=True).SOPInstanceUID
    # The object is 160 MiB; receiving it may cost a few PDU buffers and copy chunks, no more.
    print(f"{make.__name__}: baseline {baseline:.0f} MiB, peak {peak:.0f} MiB")
    assert peak - baseline < 48, f"peak RSS {peak:.0f} MiB from a {baseline:.0f} MiB baseline"
    source.unlink()
