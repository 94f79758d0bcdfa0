"""Preview benchmark: the gateway's previews (``gateway.export.preview``) against DCMTK
``dcmj2pnm`` rendering the same files in the same run, and peak RSS while rendering a large
multi-frame object.

Why this shape: the target is relative (previews per second at least those of ``dcmj2pnm``), so
both render the same CT files back to back on the same machine, each writing one PNG per file to
disk, with the same rendering asked of both: the first window of the header, no overlays, the
same longest side, non-interlaced 8-bit PNG. ``dcmj2pnm`` runs as DCMTK runs, one process per
file; the gateway renders in one process (as an export does), reading each file from its path.
The repetitions alternate which goes first, so neither always gets the warmer page cache.

The CT set is synthetic and lives in a temp dir: ``--count`` 512x512 16-bit signed slices with
Rescale Intercept -1024 and a soft-tissue window, their pixels a real head CT slice (pydicom's
bundled ``693_J2KI.dcm``, decoded) shifted by one column per file so that no two files are alike.

The memory part writes a multi-frame object of ``--frames`` 512x512 16-bit frames (2000 frames is
1 GiB, 10000 is 5.2 GB) straight to a temp file, header by pydicom and the pixel data in chunks, so
the writer never holds it whole; a fresh Python process then renders every frame through
``iter_frames(path)`` and reports its peak RSS growth over its RSS after imports and a warm-up
render (target: under 100 MB). The file is deleted afterwards.

Usage: python scripts/bench_preview.py [--count 200] [--size 256] [--reps 3] [--frames 2000]
[--skip-rss] [--skip-speed]. Exit status 0 when every run completed (the report says whether the
targets were met), 1 on an error (dcmj2pnm missing or failing, a render failing).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import generate_frames
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, JPEGLosslessSV1, generate_uid

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from gateway.export.preview import iter_frames

SIDE = 512


def base_pixels() -> np.ndarray:
    """A real 512x512 head CT slice (signed, stored values; Rescale Intercept -1024)."""
    path = get_testdata_file("693_J2KI.dcm")
    assert path is not None, "pydicom's bundled 693_J2KI.dcm is missing"
    ds = pydicom.dcmread(path)
    return np.asarray(ds.pixel_array, dtype=np.int16)


def ct_header(study: str, series: str, number: int) -> Dataset:
    ds = Dataset()
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.PatientName, ds.PatientID = "BENCH^PREVIEW", "BENCH-0001"
    ds.StudyDate, ds.StudyTime, ds.StudyID = "20261203", "101010", "1"
    ds.Modality, ds.SeriesNumber, ds.InstanceNumber = "CT", 1, number
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.Rows = ds.Columns = SIDE
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.RescaleIntercept, ds.RescaleSlope, ds.RescaleType = -1024, 1, "HU"
    ds.WindowCenter, ds.WindowWidth = 40, 400
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    return ds


def generate_ct(folder: Path, count: int) -> list[Path]:
    pixels = base_pixels()
    study, series = generate_uid(), generate_uid()
    paths = []
    for i in range(count):
        ds = ct_header(study, series, i + 1)
        ds.PixelData = np.roll(pixels, i, axis=1).tobytes()
        path = folder / f"CT{i:05d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        paths.append(path)
    return paths


def write_multiframe(path: Path, frames: int) -> int:
    """A multi-frame CT of ``frames`` 512x512 frames, written without holding its pixel data
    (native pixel data has a 32-bit length: at most 8191 such frames, 4.29 GB)."""
    if frames * SIDE * SIDE * 2 >= 0xFFFFFFFF:
        raise SystemExit(f"{frames} native frames exceed Pixel Data's 4 GiB length limit")
    ds = ct_header(generate_uid(), generate_uid(), 1)
    ds.NumberOfFrames = frames
    ds.save_as(path, enforce_file_format=True)  # header only; the pixel data is appended below
    length = frames * SIDE * SIDE * 2
    pixels = base_pixels()
    with path.open("ab") as f:
        f.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OW", 0, length))
        for i in range(frames):
            f.write(np.roll(pixels, i % SIDE, axis=0).tobytes())
    return path.stat().st_size


def jpeg_lossless_fragment(work: Path) -> bytes:
    """One 512x512 frame (the CT slice plus noise, so it stays about half its native size)
    compressed JPEG Lossless SV1 by DCMTK's dcmcjpeg: the frame repeated in a large object."""
    dcmcjpeg = shutil.which("dcmcjpeg")
    if dcmcjpeg is None:
        raise SystemExit("dcmcjpeg (DCMTK) is not on PATH")
    noisy = base_pixels().astype(np.int32) + np.random.default_rng(3).normal(0, 30, (SIDE, SIDE))
    ds = ct_header(generate_uid(), generate_uid(), 1)
    ds.PixelData = np.clip(noisy, -32768, 32767).astype(np.int16).tobytes()
    native, compressed = work / "frame.dcm", work / "frame-jpeg.dcm"
    ds.save_as(native, enforce_file_format=True)
    subprocess.run([dcmcjpeg, "+e1", str(native), str(compressed)], check=True)
    fragment = next(generate_frames(pydicom.dcmread(compressed).PixelData, number_of_frames=1))
    native.unlink()
    compressed.unlink()
    return fragment + b"\0" * (len(fragment) % 2)


def write_encapsulated(path: Path, gigabytes: float, fragment: bytes) -> tuple[int, int]:
    """A JPEG Lossless multi-frame of at least ``gigabytes`` (one fragment per frame, no offset
    table: encapsulated pixel data has no 4 GiB limit), written a frame at a time."""
    frames = int(gigabytes * 1e9 // (len(fragment) + 8)) + 1
    ds = ct_header(generate_uid(), generate_uid(), 1)
    ds.NumberOfFrames = frames
    ds.file_meta.TransferSyntaxUID = JPEGLosslessSV1
    ds.save_as(path, enforce_file_format=True)
    item = struct.pack("<HHL", 0xFFFE, 0xE000, len(fragment))
    with path.open("ab") as f:
        f.write(struct.pack("<HH2sHL", 0x7FE0, 0x0010, b"OB", 0, 0xFFFFFFFF))
        f.write(struct.pack("<HHL", 0xFFFE, 0xE000, 0))  # empty Basic Offset Table
        for _ in range(frames):
            f.write(item)
            f.write(fragment)
        f.write(struct.pack("<HHL", 0xFFFE, 0xE0DD, 0))
    return frames, path.stat().st_size


def render_ours(paths: list[Path], out: Path, size: int) -> float:
    start = time.perf_counter()
    for path in paths:
        for n, png in enumerate(iter_frames(path, size)):
            (out / f"{path.stem}.{n}.png").write_bytes(png)
    return time.perf_counter() - start


def render_dcmtk(dcmj2pnm: str, paths: list[Path], out: Path, size: int) -> float:
    scale = ["+Sxv", str(size)] if size < SIDE else []  # the CT set is square
    start = time.perf_counter()
    for path in paths:
        subprocess.run(
            [dcmj2pnm, "--quiet", "+Wi", "1", "-O", "+on", "-il", *scale, str(path),
             str(out / f"{path.stem}.png")],
            check=True,
        )
    return time.perf_counter() - start


def speed(count: int, size: int, reps: int, work: Path) -> dict[str, float]:
    dcmj2pnm = shutil.which("dcmj2pnm")
    if dcmj2pnm is None:
        raise SystemExit("dcmj2pnm (DCMTK) is not on PATH")
    folder = work / "ct"
    folder.mkdir()
    paths = generate_ct(folder, count)
    render_ours(paths[:3], Path(tempfile.mkdtemp(dir=work)), size)  # imports, decoder set-up
    ours, theirs = [], []
    for rep in range(reps):
        order = ["ours", "dcmtk"] if rep % 2 == 0 else ["dcmtk", "ours"]
        for who in order:
            out = Path(tempfile.mkdtemp(dir=work))
            if who == "ours":
                ours.append(count / render_ours(paths, out, size))
            else:
                theirs.append(count / render_dcmtk(dcmj2pnm, paths, out, size))
            written = len(list(out.iterdir()))
            if written != count:
                raise SystemExit(f"{who} wrote {written} previews for {count} files")
            shutil.rmtree(out)
    result = {
        "ours_per_s": statistics.median(ours),
        "dcmj2pnm_per_s": statistics.median(theirs),
    }
    result["ratio"] = result["ours_per_s"] / result["dcmj2pnm_per_s"]
    print(f"CT {SIDE}x{SIDE}, {count} files, longest side {size}, {reps} reps (median):")
    print(f"  gateway  {result['ours_per_s']:7.1f} previews/s  (runs: "
          f"{', '.join(f'{x:.1f}' for x in ours)})")
    print(f"  dcmj2pnm {result['dcmj2pnm_per_s']:7.1f} previews/s  (runs: "
          f"{', '.join(f'{x:.1f}' for x in theirs)})")
    verdict = "met" if result["ratio"] >= 1.0 else "NOT met"
    print(f"  ratio {result['ratio']:.2f} (target >= 1.0: {verdict})")
    return result


_CHILD = """
import json, resource, sys, time
sys.path.insert(0, sys.argv[3])
from gateway.export.preview import iter_frames
for _ in iter_frames(sys.argv[4], int(sys.argv[2])):
    pass  # warm-up: decoders, Pillow's PNG encoder
base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
start = time.perf_counter()
frames = sum(1 for _ in iter_frames(sys.argv[1], int(sys.argv[2])))
elapsed = time.perf_counter() - start
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print(json.dumps({"frames": frames, "seconds": elapsed, "base_kib": base, "peak_kib": peak}))
"""


def measure(big: Path, small: Path, frames: int, size: int, label: str) -> float:
    """Render every frame of ``big`` in a fresh process; its peak RSS growth in MB."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _CHILD, str(big), str(size), str(REPO), str(small)],
            check=True, capture_output=True, text=True,
        )
    finally:
        big.unlink()
    report = json.loads(done.stdout)
    if report["frames"] != frames:
        raise SystemExit(f"rendered {report['frames']} frames of {frames}")
    growth_mb = (report["peak_kib"] - report["base_kib"]) * 1024 / 1e6
    verdict = "met" if growth_mb < 100 else "NOT met"
    print(f"  {label}: {frames} frames in {report['seconds']:.1f} s "
          f"({frames / report['seconds']:.1f} frames/s); peak RSS {report['peak_kib'] / 1024:.0f} "
          f"MiB, growth {growth_mb:.1f} MB over imports + warm-up (target < 100 MB: {verdict})")
    return growth_mb


def rss(frames: int, gigabytes: float, size: int, work: Path) -> None:
    big, small = work / "multiframe.dcm", work / "warmup.dcm"
    if frames:
        start = time.perf_counter()
        nbytes = write_multiframe(big, frames)
        write_multiframe(small, 2)
        print(f"native multi-frame: {frames} frames of {SIDE}x{SIDE}, {nbytes / 1e9:.2f} GB "
              f"written in {time.perf_counter() - start:.1f} s")
        measure(big, small, frames, size, "native")
    if gigabytes:
        fragment = jpeg_lossless_fragment(work)
        start = time.perf_counter()
        count, nbytes = write_encapsulated(big, gigabytes, fragment)
        write_encapsulated(small, 0, fragment)
        print(f"JPEG Lossless multi-frame: {count} frames of {SIDE}x{SIDE} "
              f"({len(fragment) / 1e3:.0f} kB each), {nbytes / 1e9:.2f} GB written in "
              f"{time.perf_counter() - start:.1f} s")
        measure(big, small, count, size, "JPEG Lossless")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--count", type=int, default=200, help="CT files (default 200)")
    parser.add_argument("--size", type=int, default=256, help="longest side (default 256)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--frames", type=int, default=2000,
                        help="frames of the native multi-frame object (default 2000 = 1 GiB; "
                             "0: none)")
    parser.add_argument("--gigabytes", type=float, default=0,
                        help="size of a JPEG Lossless multi-frame object to render too, e.g. 5 "
                             "(default 0: none)")
    parser.add_argument("--skip-rss", action="store_true", help="no multi-frame memory run")
    parser.add_argument("--skip-speed", action="store_true", help="no dcmj2pnm comparison")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-preview-") as tmp:
        work = Path(tmp)
        if not args.skip_speed:
            speed(args.count, args.size, args.reps, work)
        if not args.skip_rss:
            rss(args.frames, args.gigabytes, args.size, work)
    return 0


if __name__ == "__main__":
    sys.exit(main())
