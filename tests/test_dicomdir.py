"""DICOMDIR and file IDs (gateway.export.dicomdir): what a viewer opening the unpacked export sees.

Every layout is read back three independent ways: pydicom's ``FileSet`` (follows the record
offsets, resolves each file), DCMTK's ``dcmdump`` (lists each Referenced File ID), and
dicom3tools' ``dcdirdmp`` (walks the offsets, reports any that do not point at a record) and
``dciodvfy`` (checks the Basic Directory IOD and each record's keys).
"""

from __future__ import annotations

import copy
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.dataset import Dataset
from pydicom.fileset import FileInstance, FileSet, is_conformant_file_id
from pydicom.sequence import Sequence
from pydicom.uid import (
    ExplicitVRLittleEndian,
    KeyObjectSelectionDocumentStorage,
    RLELossless,
    generate_uid,
)

from gateway.export.dicomdir import MediaLayout, MediaLayoutError, media_layout
from tests.factory import make_dataset, write_file

TEST_FILES = Path(pydicom.__file__).parent / "data" / "test_files"
NAME = "MÜLLER^JÖRG"


def run(name: str, *args: str | Path, check: bool = False) -> str:
    """A DCMTK or dicom3tools command's output (stdout, then stderr; not always UTF-8)."""
    from tests.peers import require_tool

    path = require_tool(name)  # in CI a missing tool fails the run
    done = subprocess.run([path, *map(str, args)], capture_output=True, timeout=60, check=check)
    return (done.stdout + done.stderr).decode("utf-8", "replace")


def errors(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("Error")]


@contextmanager
def fileset(dicomdir: Path) -> Iterator[FileSet]:
    fs = FileSet(dicomdir)
    try:
        yield fs
    finally:
        fs._stage["t"].cleanup()  # FileSet leaves its staging directory to the GC otherwise


def file_id(instance: FileInstance) -> str:
    """The Referenced File ID as written (``FileInstance.FileID`` is pydicom's own naming)."""
    return "/".join(instance.ReferencedFileID)


def image(study: str, series: str, number: int, **attributes: object) -> Dataset:
    """A fake patient's image; ``attributes`` override (None: delete) any attribute."""
    values: dict[str, Any] = {
        "StudyInstanceUID": study, "SeriesInstanceUID": series, "InstanceNumber": number,
        "PatientName": NAME, "SpecificCharacterSet": "ISO_IR 192"}
    values.update(attributes)
    return make_dataset(**values)


def rle_image(study: str, series: str, number: int) -> Dataset:
    ds = image(study, series, number)
    arr = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 7) % 4096
    ds.PixelData = arr.tobytes()
    ds.file_meta = pydicom.dataset.FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.compress(RLELossless, generate_instance_uid=False)
    return ds


def key_object(study: str, series: str, number: int) -> Dataset:
    ds = image(study, series, number, SOPClassUID=KeyObjectSelectionDocumentStorage,
               Modality="KO", ContentDate="20261203", ContentTime="101010")
    for keyword in ("PixelData", "Rows", "Columns", "BitsAllocated", "BitsStored", "HighBit",
                    "PixelRepresentation", "SamplesPerPixel", "PhotometricInterpretation"):
        delattr(ds, keyword)
    title = Dataset()
    title.CodeValue, title.CodingSchemeDesignator = "113000", "DCM"
    title.CodeMeaning = "Of Interest"
    ds.ConceptNameCodeSequence = Sequence([title])
    return ds


def structured_report(study: str, series: str) -> Dataset:
    ds = pydicom.dcmread(TEST_FILES / "test-SR.dcm")
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.PatientID, ds.PatientName, ds.SpecificCharacterSet = "TEST-0001", NAME, "ISO_IR 192"
    return ds


def two_studies(folder: Path) -> list[tuple[Path, Dataset]]:
    """Ten instances: 2 studies, 4 series (one of them a report), one RLE image, one J2K."""
    study_a, study_b = generate_uid(), generate_uid()
    series = [generate_uid() for _ in range(4)]
    j2k = pydicom.dcmread(TEST_FILES / "MR_small_jp2klossless.dcm")
    j2k.StudyInstanceUID, j2k.SeriesInstanceUID, j2k.InstanceNumber = study_b, series[2], 3
    j2k.SOPInstanceUID = j2k.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    j2k.PatientID, j2k.PatientName, j2k.SpecificCharacterSet = "TEST-0001", NAME, "ISO_IR 192"
    objects = [
        image(study_a, series[0], 1), image(study_a, series[0], 2), rle_image(study_a, series[0], 3),
        image(study_a, series[1], 1), image(study_a, series[1], 2),
        image(study_b, series[2], 1), image(study_b, series[2], 2), j2k,
        structured_report(study_b, series[3]), key_object(study_b, series[3], 2),
    ]
    files: list[tuple[Path, Dataset]] = []
    for i, ds in enumerate(objects):
        syntax = ds.file_meta.TransferSyntaxUID if hasattr(ds, "file_meta") else None
        path = write_file(ds, folder / f"in{i}.dcm", syntax or ExplicitVRLittleEndian)
        files.append((path, pydicom.dcmread(path, stop_before_pixels=True)))
    return files


def unpack(layout: MediaLayout, files: list[tuple[Path, Dataset]], root: Path) -> Path:
    """What the archive does: each file at its name, the DICOMDIR at the root."""
    for (path, _), name in zip(files, layout.names, strict=True):
        target = root / name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(path, target)
    (root / "DICOMDIR").write_bytes(layout.dicomdir)
    return root / "DICOMDIR"


def test_file_ids_conform_to_ps3_10_and_keep_the_input_order(tmp_path: Path) -> None:
    files = two_studies(tmp_path / "in")
    layout = media_layout(files)
    assert len(layout.names) == len(files) == len(set(layout.names))
    for name in layout.names:
        assert "\\" not in name and name.startswith("DICOM/")
        assert is_conformant_file_id(Path(name))
    # Files of one series share a folder; a new study gets a new one.
    assert layout.names[0].rsplit("/", 1)[0] == layout.names[2].rsplit("/", 1)[0]
    assert layout.names[0].split("/")[1] != layout.names[5].split("/")[1]


def test_fileset_reads_back_every_instance(tmp_path: Path) -> None:
    files = two_studies(tmp_path / "in")
    layout = media_layout(files)
    with fileset(unpack(layout, files, tmp_path / "out")) as fs:
        check_every_instance(fs, files, layout)


def check_every_instance(fs: FileSet, files: list[tuple[Path, Dataset]],
                         layout: MediaLayout) -> None:
    by_uid = {instance.SOPInstanceUID: instance for instance in fs}
    assert len(fs) == len(files)
    for (path, header), name in zip(files, layout.names, strict=True):
        instance = by_uid[header.SOPInstanceUID]
        assert file_id(instance) == name
        assert instance.SOPClassUID == header.SOPClassUID
        assert instance.TransferSyntaxUID == header.file_meta.TransferSyntaxUID
        assert instance.StudyInstanceUID == header.StudyInstanceUID
        assert instance.SeriesInstanceUID == header.SeriesInstanceUID
        assert instance.PatientName == NAME  # non-ASCII survives (ISO_IR 192 in the records)
        assert instance.load().SOPInstanceUID == header.SOPInstanceUID  # the file is there
    assert len(fs.find_values("StudyInstanceUID")) == 2
    assert len(fs.find_values("SeriesInstanceUID")) == 4
    types = {instance.DirectoryRecordType for instance in fs}
    assert types == {"IMAGE", "SR DOCUMENT", "KEY OBJECT DOC"}
    rle = by_uid[files[2][1].SOPInstanceUID]
    assert rle.TransferSyntaxUID == RLELossless


def test_dcmtk_lists_every_file(tmp_path: Path) -> None:
    files = two_studies(tmp_path / "in")
    layout = media_layout(files)
    dicomdir = unpack(layout, files, tmp_path / "out")
    dump = run("dcmdump", dicomdir, check=True)
    assert "E:" not in dump
    listed = re.findall(r"\(0004,1500\) CS \[([^\]]+)\]", dump)
    assert sorted(listed) == sorted(name.replace("/", "\\") for name in layout.names)
    scanned = run("dcmdump", "+sd", "+r", "-q", tmp_path / "out", check=True)
    assert scanned.count("# Dicom-File-Format") == len(files) + 1  # and the DICOMDIR


def test_dicom3tools_find_valid_offsets_and_records(tmp_path: Path) -> None:
    files = two_studies(tmp_path / "in")
    layout = media_layout(files)
    dicomdir = unpack(layout, files, tmp_path / "out")
    output = run("dcdirdmp", dicomdir)
    assert errors(output) == []
    for name in layout.names:
        assert f"-> {name.replace('/', chr(92))}" in output
    assert errors(run("dciodvfy", dicomdir)) == []


def test_dcdirdmp_would_see_a_broken_offset(tmp_path: Path) -> None:
    """The check above can fail: the same DICOMDIR with one offset pointing nowhere."""
    files = two_studies(tmp_path / "in")
    dicomdir = unpack(media_layout(files), files, tmp_path / "out")
    ds = pydicom.dcmread(dicomdir)
    ds.DirectoryRecordSequence[0].OffsetOfReferencedLowerLevelDirectoryEntity = 12345
    ds.save_as(dicomdir)
    assert errors(run("dcdirdmp", dicomdir)) != []


def test_missing_type_1_record_keys_are_invented_in_the_records_only(tmp_path: Path) -> None:
    study, series = generate_uid(), generate_uid()
    bare = [
        image(study, series, 1, PatientID="", StudyID=None, StudyDate=None, SeriesNumber=None),
        image(study, series, 2, PatientID="", StudyID=None, StudyDate=None, SeriesNumber=None,
              InstanceNumber=None),
        make_dataset(PatientID="", PatientName="OTHER^PERSON"),
    ]
    files = [(write_file(ds, tmp_path / f"in{i}.dcm"), ds) for i, ds in enumerate(bare)]
    headers_before = [copy.deepcopy(ds) for ds in bare]
    layout = media_layout(files)
    dicomdir = unpack(layout, files, tmp_path / "out")
    with fileset(dicomdir) as fs:
        assert len(fs) == 3
        patients = fs.find_values("PatientID")
        assert len(patients) == 2 and all(str(patient).startswith("NOID") for patient in patients)
        assert sorted(fs.find_values("InstanceNumber")) == [1, 2]
        assert "19000101" in fs.find_values("StudyDate")
    for ds, before in zip(bare, headers_before, strict=True):
        assert ds == before  # invented in the records only, never in the caller's headers
    assert errors(run("dciodvfy", dicomdir)) == []


def test_a_sop_instance_given_twice_is_refused(tmp_path: Path) -> None:
    ds = make_dataset()
    path = write_file(ds, tmp_path / "a.dcm")
    with pytest.raises(MediaLayoutError, match=str(ds.SOPInstanceUID)):
        media_layout([(path, ds), (path, ds)])


def test_an_empty_export_has_an_empty_dicomdir() -> None:
    layout = media_layout([])
    assert layout.names == []
    ds = pydicom.dcmread(pydicom.filebase.DicomBytesIO(layout.dicomdir))
    assert ds.DirectoryRecordSequence == []


@settings(max_examples=20, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 2), st.integers(0, 2), st.integers(0, 2)),
                min_size=1, max_size=15))
def test_records_follow_patients_studies_and_series_in_any_order(
        placements: list[tuple[int, int, int]]) -> None:
    """Instances of up to 3 patients x 3 studies x 3 series, in any order: FileSet finds each
    under its own patient, study and series records, at its own file ID."""
    studies = {(p, s): generate_uid() for p in range(3) for s in range(3)}
    series = {(p, s, r): generate_uid() for p in range(3) for s in range(3) for r in range(3)}
    headers = []
    for number, (p, s, r) in enumerate(placements, start=1):
        ds = make_dataset(PatientID=f"P{p}", PatientName=f"PATIENT^{p}",
                          StudyInstanceUID=studies[(p, s)], SeriesInstanceUID=series[(p, s, r)],
                          InstanceNumber=number)
        del ds.PixelData
        ds.file_meta = pydicom.dataset.FileMetaDataset()
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        headers.append((Path(f"in{number}.dcm"), ds))
    layout = media_layout(headers)
    with tempfile.TemporaryDirectory() as folder:
        for (_, ds), name in zip(headers, layout.names, strict=True):
            write_file(ds, Path(folder) / name)
        dicomdir = Path(folder) / "DICOMDIR"
        dicomdir.write_bytes(layout.dicomdir)
        with fileset(dicomdir) as fs:
            found = {instance.SOPInstanceUID: instance for instance in fs}
            assert len(found) == len(headers)
            for (_, ds), name in zip(headers, layout.names, strict=True):
                instance = found[ds.SOPInstanceUID]
                assert (instance.PatientID, instance.StudyInstanceUID,
                        instance.SeriesInstanceUID) == (
                    ds.PatientID, ds.StudyInstanceUID, ds.SeriesInstanceUID)
                assert file_id(instance) == name
                assert instance.InstanceNumber == ds.InstanceNumber
            assert len(fs.find_values("PatientID")) == len({p for p, _, _ in placements})
            assert len(fs.find_values("SeriesInstanceUID")) == len(set(placements))
