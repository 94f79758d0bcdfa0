"""Fresh test data per test: datasets with obviously fake patients and unique UIDs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID, ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
CANARY_NAME = "CANARY^ZEBEDIAH^QUUX"
CANARY_ID = "CANARY-7731-ID"
CANARY_ACCESSION = "CANARYACC991"


def make_dataset(rows: int = 16, columns: int = 16, frames: int = 1, **overrides: Any) -> Dataset:
    """A minimal valid CT image; keyword overrides replace (or, with None, delete) attributes."""
    ds = Dataset()
    ds.SOPClassUID = CT_IMAGE_STORAGE
    ds.SOPInstanceUID = generate_uid()
    ds.StudyInstanceUID = generate_uid()
    ds.SeriesInstanceUID = generate_uid()
    ds.PatientName = "TEST^PATIENT"
    ds.PatientID = "TEST-0001"
    ds.PatientBirthDate = "19700101"
    ds.PatientSex = "O"
    ds.AccessionNumber = "ACC0001"
    ds.StudyDate = "20261123"
    ds.StudyTime = "101010"
    ds.StudyID = "1"
    ds.SeriesNumber = 1
    ds.InstanceNumber = 1
    ds.Modality = "CT"
    ds.ReferringPhysicianName = ""
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = rows
    ds.Columns = columns
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = bytes(range(256)) * (rows * columns * 2 * frames // 256) + bytes(
        (rows * columns * 2 * frames) % 256
    )
    for keyword, value in overrides.items():
        if value is None:
            if keyword in ds:
                delattr(ds, keyword)
        else:
            setattr(ds, keyword, value)
    return ds


def write_file(ds: Dataset, path: Path, transfer_syntax: str = ExplicitVRLittleEndian) -> Path:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_study(folder: Path, count: int, **overrides: Any) -> list[Path]:
    """``count`` instances of one study and series, as a modality would send them."""
    study, series = generate_uid(), generate_uid()
    return [
        write_file(
            make_dataset(
                StudyInstanceUID=study, SeriesInstanceUID=series, InstanceNumber=i + 1, **overrides
            ),
            folder / f"IMG{i:05d}.dcm",
        )
        for i in range(count)
    ]
