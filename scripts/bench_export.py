"""Export benchmark: how fast a study archive is built, against copying the same files, and how
much memory a 5 GB multi-frame study costs.

Why this shape: the target is relative (archive build without previews at least 0.8 of a plain
``cp -r`` of the same spool files to the same disk, in the same run), so both are timed back to
back, alternating which goes first, on the same files in the same page cache state (warm: each is
read before the first timed run). The export is the gateway's own code in this process
(``gateway.export.run.Exporter``, ZIP, no previews, no DICOMDIR), timed from the call to the
archive renamed into place: it reads the ledger, copies each file into the ZIP computing its
CRC-32 and SHA-256, writes the metadata JSON and the manifest, syncs the archive (checkpoints
included), hashes the finished archive for the audit row and records it. ``cp -r`` syncs
nothing; ``cp -r`` followed by ``sync`` of the copy is reported too, since an export's archive
is on disk when it is reported and a copy's is not.

The study is the receive benchmark's CT set (``scripts/bench.py``: 512x512 16-bit, about 0.53 MB
each, cached in ``~/.cache/gateway-bench``), placed in a spool with a SQLite ledger made directly
(the benchmark is about the archive, not about receiving).

The big study (``--big-gb``, default 5): multi-frame objects of 512 MB each (1,000 frames of
512x512), written once to the cache; a child process exports it and reports its peak RSS
(``VmHWM``) before and after, the growth being what the export cost. The archive then goes
through ``unzip -t`` (its offsets pass 4 GiB: ZIP64).

Exit status: 0 when every run completed (targets met or not: the report says), 1 on an error.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
RATIO_TARGET = 0.8
RSS_TARGET_MB = 100.0
FRAME_SIDE = 512
FRAMES_PER_OBJECT = 1000  # 512 MB of pixels per object


def spool_from(files: list[Path], root: Path) -> tuple[Path, str, str]:
    """A spool and a SQLite ledger holding ``files`` (one study), as the gateway lays them out;
    returns (spool, database URL, Study Instance UID)."""
    from sqlalchemy.orm import Session

    from gateway.db.engine import make_engine
    from gateway.db.migrate import upgrade
    from gateway.db.models import Instance

    spool = root / "spool"
    url = f"sqlite:///{root / 'gateway.db'}"
    engine = make_engine(url)
    upgrade(engine)
    study = ""
    with Session(engine) as session:
        for path in files:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
            study = str(ds.StudyInstanceUID)
            relative = Path(study) / str(ds.SeriesInstanceUID) / f"{ds.SOPInstanceUID}.dcm"
            (spool / relative).parent.mkdir(parents=True, exist_ok=True)
            try:  # the same bytes without a second copy on the disk
                os.link(path, spool / relative)
            except OSError:
                shutil.copyfile(path, spool / relative)
            session.add(Instance(
                sop_instance_uid=str(ds.SOPInstanceUID), sop_class_uid=str(ds.SOPClassUID),
                study_instance_uid=study, series_instance_uid=str(ds.SeriesInstanceUID),
                patient_id=str(ds.get("PatientID", "BENCH")), modality=str(ds.get("Modality")),
                instance_number=str(ds.get("InstanceNumber", "")), calling_ae="BENCH",
                peer_address="127.0.0.1", transfer_syntax_uid=ExplicitVRLittleEndian,
                size_bytes=(spool / relative).stat().st_size, sha256="0" * 64,
                spool_path=str(relative), received_at=datetime.now(UTC)))
        session.commit()
    engine.dispose()
    return spool, url, study


def export_once(spool: Path, url: str, study: str, out: Path) -> float:
    from gateway.config import ExportOptions, ExportSelector
    from gateway.db.engine import make_engine, make_sessions
    from gateway.export.progress import LineReporter
    from gateway.export.run import Exporter, ExportRequest
    from gateway.export.sources import Sources
    from gateway.query.retrieve import Loader

    engine = make_engine(url)
    exporter = Exporter(make_sessions(engine), Sources(spool, lambda: Loader(spool, {})),
                        LineReporter(lambda _: None))
    request = ExportRequest("bench", "bench", "study", ExportSelector(studies=(study,)), "study",
                            ExportOptions(previews=False, dicomdir=False), out)
    started = time.perf_counter()
    report = exporter.run(request)
    elapsed = time.perf_counter() - started
    engine.dispose()
    if report.failed or len(report.archives) != 1:
        raise bench.BenchError(f"the export failed: {report.failed}")
    return elapsed


def copy_once(source: Path, target: Path, sync: bool) -> float:
    started = time.perf_counter()
    subprocess.run(["cp", "-r", str(source), str(target)], check=True)
    if sync:
        subprocess.run(["sync", "-f", str(target)], check=True)
    return time.perf_counter() - started


def ratio_run(count: int, reps: int, workdir: Path) -> dict[str, float]:
    images = bench.image_set("ct", count, bench.CT_SIDE, nodelay=True)
    files = sorted(images.folder.glob("*.dcm"))
    spool, url, study = spool_from(files, workdir)
    source = spool / study
    total = sum(p.stat().st_size for p in source.rglob("*.dcm"))
    for path in source.rglob("*.dcm"):  # warm: every timed run reads from the page cache
        path.read_bytes()
    times: dict[str, list[float]] = {"cp": [], "cp+sync": [], "export": []}
    for rep in range(reps):
        order = ["cp", "export", "cp+sync"]
        order = order[rep % 3:] + order[:rep % 3]
        for what in order:
            target = workdir / f"{what}-{rep}"
            if what == "export":
                times[what].append(export_once(spool, url, study, target))
            else:
                times[what].append(copy_once(source, target, sync=what == "cp+sync"))
            subprocess.run(["sync"], check=True)  # the next run does not pay for this one
            shutil.rmtree(target)
    result = {what: statistics.median(values) for what, values in times.items()}
    mb = total / 1e6
    print(f"study: {count} CT instances, {mb:.1f} MB; median of {reps} runs, alternating")
    for what, seconds in result.items():
        print(f"  {what:<8} {seconds:7.3f} s  {mb / seconds:7.1f} MB/s   "
              f"(runs: {', '.join(f'{t:.3f}' for t in times[what])})")
    ratio, synced = result["cp"] / result["export"], result["cp+sync"] / result["export"]
    print(f"  ratio export/cp -r (throughput): {ratio:.2f}  (target >= {RATIO_TARGET}: "
          f"{'met' if ratio >= RATIO_TARGET else 'NOT met'})")
    print(f"  ratio export/(cp -r + sync):     {synced:.2f}")
    return {**result, "ratio": ratio, "ratio_synced": synced, "mb": mb}


def big_objects(gigabytes: float) -> list[Path]:
    """Multi-frame objects of 512 MB each making ``gigabytes``, cached; written element by
    element so that the generator never holds an object in memory either."""
    count = max(1, round(gigabytes * 1e9 / (FRAME_SIDE * FRAME_SIDE * 2 * FRAMES_PER_OBJECT)))
    folder = bench.CACHE / f"mf-{FRAME_SIDE}-{FRAMES_PER_OBJECT}x{count}"
    files = sorted(folder.glob("*.dcm")) if folder.is_dir() else []
    if len(files) == count:
        return files
    partial = folder.with_name(folder.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    study, series = generate_uid(), generate_uid()
    block = bytes(range(256)) * (FRAME_SIDE * FRAME_SIDE * 2 // 256)  # one frame
    print(f"bench: generating {count} multi-frame objects in {folder} ...", file=sys.stderr)
    for number in range(1, count + 1):
        ds = Dataset()
        ds.file_meta = FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.SOPClassUID = "1.2.840.10008.5.1.4.1.1.7.3"  # Multi-frame Grayscale Word SC
        ds.SOPInstanceUID = generate_uid()
        ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.PatientID, ds.PatientName, ds.Modality = "BENCH-MF", "BENCH^MULTIFRAME", "OT"
        ds.InstanceNumber = number
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.Rows = ds.Columns = FRAME_SIDE
        ds.NumberOfFrames = FRAMES_PER_OBJECT
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
        path = partial / f"{number:04d}.dcm"
        ds.save_as(path, enforce_file_format=True)
        length = len(block) * FRAMES_PER_OBJECT
        with open(path, "ab") as out:  # (7FE0,0010) OW, 32-bit length, then the frames
            out.write(b"\xe0\x7f\x10\x00OW\x00\x00" + length.to_bytes(4, "little"))
            out.writelines(block for _ in range(FRAMES_PER_OBJECT))
    shutil.rmtree(folder, ignore_errors=True)
    partial.rename(folder)
    return sorted(folder.glob("*.dcm"))


CHILD = """
import json, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[1])
from bench_export import export_once

def hwm():
    for line in open("/proc/self/status"):
        if line.startswith(("VmHWM", "VmRSS")):
            yield line.split()[0].rstrip(":"), int(line.split()[1]) // 1024

import gateway.export.run, gateway.export.build, gateway.db.engine, sqlalchemy  # loaded first
before = dict(hwm())
seconds = export_once(Path(sys.argv[2]), sys.argv[3], sys.argv[4], Path(sys.argv[5]))
after = dict(hwm())
print(json.dumps({"before": before, "after": after, "seconds": seconds}))
"""


def memory_run(gigabytes: float, workdir: Path) -> dict[str, float]:
    files = big_objects(gigabytes)
    spool, url, study = spool_from(files, workdir / "big")
    out = workdir / "big-out"
    child = subprocess.run(
        [sys.executable, "-c", CHILD, str(Path(__file__).parent), str(spool), url, study,
         str(out)], capture_output=True, text=True, check=False)
    if child.returncode != 0:
        raise bench.BenchError(f"the big export failed:\n{child.stderr[-3000:]}")
    measured = json.loads(child.stdout.splitlines()[-1])
    (archive,) = out.glob("*.zip")
    size = archive.stat().st_size
    started = time.perf_counter()
    tested = subprocess.run(["unzip", "-tq", str(archive)], capture_output=True, text=True,
                            check=False)
    unzip_s = time.perf_counter() - started
    growth = measured["after"]["VmHWM"] - measured["before"]["VmHWM"]
    print(f"big study: {len(files)} multi-frame objects, {size / 1e9:.2f} GB archive in "
          f"{measured['seconds']:.1f} s ({size / 1e6 / measured['seconds']:.0f} MB/s)")
    print(f"  peak RSS {measured['before']['VmHWM']} MB before the export, "
          f"{measured['after']['VmHWM']} MB after: growth {growth} MB "
          f"(target < {RSS_TARGET_MB:.0f}: {'met' if growth < RSS_TARGET_MB else 'NOT met'})")
    print(f"  unzip -t: {'ok' if tested.returncode == 0 else 'FAILED'} in {unzip_s:.1f} s"
          + ("" if tested.returncode == 0 else f"\n{tested.stdout[-2000:]}"))
    if tested.returncode != 0:
        raise bench.BenchError("the big archive does not test clean")
    return {"growth_mb": growth, "seconds": measured["seconds"], "bytes": size}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--export", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--count", type=int, default=1000, help="CT instances (default 1000)")
    parser.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    parser.add_argument("--big-gb", type=float, default=5.0,
                        help="size of the multi-frame study, GB (default 5; 0 skips it)")
    parser.add_argument("--keep", action="store_true", help="keep the work folder")
    args = parser.parse_args()
    workdir = Path(tempfile.mkdtemp(prefix="export-bench-", dir=bench.CACHE.parent))
    try:
        ratio_run(args.count, args.reps, workdir)
        if args.big_gb > 0:
            memory_run(args.big_gb, workdir)
    except (bench.BenchError, subprocess.CalledProcessError) as exc:
        print(f"bench: {exc}", file=sys.stderr)
        return 1
    finally:
        if args.keep:
            print(f"work folder kept: {workdir}", file=sys.stderr)
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
