"""gateway.export.deidentify: PS3.15 Annex E Basic Profile on exported instances.

What a user of a de-identified export sees: no identifying value anywhere in the written files
(in any encoding), new UIDs that still reference each other, Patient Identity Removed YES, no new
dciodvfy errors, options that change what they say, burned-in objects left out. The generated
table is checked against its extract byte for byte.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from io import BytesIO
from pathlib import Path

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom import config
from pydicom.data import get_testdata_file, get_testdata_files
from pydicom.dataelem import DataElement
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.errors import InvalidDicomError
from pydicom.sequence import Sequence
from pydicom.uid import (
    UID,
    CTImageStorage,
    ExplicitVRBigEndian,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    SecondaryCaptureImageStorage,
    UltrasoundImageStorage,
    generate_uid,
)

from gateway.export import deid_table
from gateway.export.deidentify import Deidentifier, DeidOptions
from tests.factory import make_dataset

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "make_deid_table.py"
SECRET = b"export-secret-for-tests"

# The canary patient: every value below must vanish from a de-identified file.
CANARY_NAME = "Zebedäus^Quuxström^Jörg"
CANARY_ID = "CANARY-7731-ID"
CANARY_BIRTH_DATE = "19710203"
CANARY_ACCESSION = "CANARYACC991"
CANARY_PHYSICIAN = "Ödönkovácsy^Ilmarïne"
CANARY_OPERATOR = "Brünnhildë^Quetzalcoatlus"
CANARY_INSTITUTION = "Hôpital Sainte-Quuxinette"
CANARY_ADDRESS = "17 Rue des Zébédées, Quuxville"
CANARY_STATION = "QUUXSTATION7"
CANARY_VALUES = [
    CANARY_NAME,
    CANARY_ID,
    CANARY_BIRTH_DATE,
    CANARY_ACCESSION,
    CANARY_PHYSICIAN,
    CANARY_OPERATOR,
    CANARY_INSTITUTION,
    CANARY_ADDRESS,
    CANARY_STATION,
]


def _needles(values: list[str], words: bool = True) -> set[bytes]:
    """Each value and (``words``) each of its words of 4+ characters, as upper, lower and given
    case, in every encoding a writer might have used."""
    texts: set[str] = set()
    for value in values:
        words_of = value.replace("^", " ").replace(",", " ").split() if words else []
        for word in [value, *words_of]:
            if len(word) >= 4 and "ANONYM" not in word.upper():  # our own dummy text
                texts.update({word, word.upper(), word.lower()})
    needles: set[bytes] = set()
    for text in texts:
        for encoding in ("utf-8", "latin-1", "utf-16-le", "utf-16-be"):
            try:
                needles.add(text.encode(encoding))
            except UnicodeEncodeError:
                continue
    return needles


def _found(data: bytes, values: list[str], words: bool = True) -> list[bytes]:
    return sorted(needle for needle in _needles(values, words) if needle in data)


def _code(value: str, scheme: str, meaning: str) -> Dataset:
    item = Dataset()
    item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, scheme, meaning
    return item


def canary_dataset(charset: str = "ISO_IR 192") -> Dataset:
    """A CT image of the canary patient with identifying values everywhere Table E.1-1 looks:
    the patient, the people, the institution, free text, private tags, nested sequences."""
    ds = make_dataset(
        SpecificCharacterSet=charset,
        PatientName=CANARY_NAME,
        PatientID=CANARY_ID,
        PatientBirthDate=CANARY_BIRTH_DATE,
        AccessionNumber=CANARY_ACCESSION,
        ReferringPhysicianName=CANARY_PHYSICIAN,
        StudyID=CANARY_ID[:16],
    )
    ds.PixelData = bytes(len(ds.PixelData))  # no accidental text in the pixels
    ds.StudyDate, ds.StudyTime = "20210304", "101112"
    ds.SeriesDate, ds.AcquisitionDate, ds.ContentDate = "20210304", "20210304", "20210304"
    ds.PatientSex, ds.PatientAge = "F", "050Y"
    ds.OtherPatientNames = [CANARY_NAME, "Quuxström^Anna"]
    ds.PatientBirthName = CANARY_NAME
    ds.PatientMotherBirthName = CANARY_NAME
    ds.PatientAddress = CANARY_ADDRESS
    ds.PatientTelephoneNumbers = "+41 77 123 45 67"
    ds.PatientComments = f"Jörg Zebedäus, born {CANARY_BIRTH_DATE}, allergic to iodine"
    ds.AdditionalPatientHistory = f"Referred by {CANARY_PHYSICIAN}"
    other = Dataset()
    other.PatientID, other.IssuerOfPatientID = CANARY_ID, CANARY_INSTITUTION
    ds.OtherPatientIDsSequence = Sequence([other])
    ds.PerformingPhysicianName = CANARY_PHYSICIAN
    ds.NameOfPhysiciansReadingStudy = CANARY_PHYSICIAN
    ds.PhysiciansOfRecord = CANARY_PHYSICIAN
    ds.OperatorsName = CANARY_OPERATOR
    ds.RequestingPhysician = CANARY_PHYSICIAN
    ds.InstitutionName = CANARY_INSTITUTION
    ds.InstitutionAddress = CANARY_ADDRESS
    ds.InstitutionalDepartmentName = CANARY_INSTITUTION
    ds.StationName = CANARY_STATION
    ds.DeviceSerialNumber = CANARY_STATION
    ds.StudyDescription = f"CT THORAX Zebedäus {CANARY_BIRTH_DATE}"
    ds.SeriesDescription = "Quuxström follow-up"
    ds.ProtocolName = f"THORAX {CANARY_ACCESSION}"
    ds.ImageComments = f"{CANARY_NAME} {CANARY_ID}"
    ds.DerivationDescription = CANARY_OPERATOR
    # An unlisted sequence whose items hold listed attributes, two levels deep.
    operator = Dataset()
    operator.PersonIdentificationCodeSequence = Sequence(
        [_code(CANARY_ID, "L", CANARY_OPERATOR)]
    )
    operator.InstitutionName = CANARY_INSTITUTION
    operator.PersonAddress = CANARY_ADDRESS
    equipment = Dataset()
    equipment.Manufacturer = "ACME"
    equipment.InstitutionName = CANARY_INSTITUTION
    equipment.StationName = CANARY_STATION
    equipment.OperatorsName = CANARY_OPERATOR
    equipment.OperatorIdentificationSequence = Sequence([operator])
    purpose = _code("109102", "DCM", "Processing Equipment")
    equipment.PurposeOfReferenceCodeSequence = Sequence([purpose])
    ds.ContributingEquipmentSequence = Sequence([equipment])
    request = Dataset()
    request.RequestedProcedureDescription = f"CT THORAX for {CANARY_NAME}"
    request.RequestedProcedureID = CANARY_ACCESSION
    request.ScheduledProcedureStepID = CANARY_ACCESSION
    ds.RequestAttributesSequence = Sequence([request])
    referenced_patient = Dataset()
    referenced_patient.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.1.1"
    referenced_patient.ReferencedSOPInstanceUID = generate_uid()
    ds.ReferencedPatientSequence = Sequence([referenced_patient])
    content = Dataset()
    content.RelationshipType, content.ValueType = "CONTAINS", "PNAME"
    content.ConceptNameCodeSequence = Sequence([_code("121008", "DCM", "Person Observer Name")])
    content.PersonName = CANARY_OPERATOR
    text = Dataset()
    text.RelationshipType, text.ValueType = "CONTAINS", "TEXT"
    text.ConceptNameCodeSequence = Sequence([_code("121106", "DCM", "Comment")])
    text.TextValue = f"Patient {CANARY_NAME} ID {CANARY_ID}"
    ds.ContentSequence = Sequence([content, text])
    # Private attributes: a block, a private sequence with a name inside a public sequence.
    block = ds.private_block(0x0009, "CANARY PRIVATE 1.0", create=True)
    block.add_new(0x01, "LO", CANARY_NAME)
    block.add_new(0x02, "PN", CANARY_PHYSICIAN)
    inner = Dataset()
    inner.add_new(0x00111010, "LO", "CANARY PRIVATE 2.0")
    inner.add_new(0x00111001, "LO", CANARY_ID)
    block.add_new(0x03, "SQ", Sequence([inner]))
    equipment.add_new(0x00130010, "LO", "CANARY PRIVATE 3.0")
    equipment.add_new(0x00131001, "PN", CANARY_NAME)
    # Overlay and curve groups (Table E.1-1 removes their data).
    ds.add_new(0x60000010, "US", 4)
    ds.add_new(0x60000011, "US", 4)
    ds.add_new(0x60000040, "CS", "G")
    ds.add_new(0x60000050, "SS", [1, 1])
    ds.add_new(0x60000100, "US", 1)
    ds.add_new(0x60000102, "US", 0)
    ds.add_new(0x60000022, "LO", CANARY_NAME)  # Overlay Description
    ds.add_new(0x60003000, "OW", b"\x0f\x00")
    ds.add_new(0x50002500, "LO", CANARY_NAME)  # Curve Label (retired)
    return ds


def _with_meta(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> Dataset:
    ds.file_meta = FileMetaDataset()
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = UID(transfer_syntax)
    return ds


def _encode(ds: Dataset, transfer_syntax: str = ExplicitVRLittleEndian) -> bytes:
    buffer = BytesIO()
    _with_meta(ds, transfer_syntax).save_as(buffer, enforce_file_format=True)
    return buffer.getvalue()


def _written(ds: Dataset) -> bytes:
    """The bytes of ``ds`` as a file, in the transfer syntax of its file meta."""
    buffer = BytesIO()
    meta = getattr(ds, "file_meta", None)
    required = ("MediaStorageSOPClassUID", "MediaStorageSOPInstanceUID", "TransferSyntaxUID")
    complete = meta is not None and all(meta.get(keyword) for keyword in required)
    ds.save_as(buffer, enforce_file_format=complete)
    return buffer.getvalue()


def _elements(ds: Dataset) -> Iterator[DataElement]:
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _elements(item)


def _u_uids(ds: Dataset) -> set[str]:
    """The UID values of every attribute whose Basic Profile action is U, at any depth."""
    found: set[str] = set()
    for elem in _elements(ds):
        row = deid_table.ATTRIBUTES.get(int(elem.tag))
        if row is not None and row.basic_profile == "U" and elem.VR == "UI" and elem.value:
            values = elem.value if isinstance(elem.value, list) else [elem.value]
            found.update(str(v) for v in values if str(v).strip("\0 "))
    return found


def _kept_ui(ds: Dataset) -> set[str]:
    """UID values held by attributes the profile keeps (a SOP Class UID may be "0" too)."""
    found: set[str] = set()
    for elem in _elements(ds):
        row = deid_table.ATTRIBUTES.get(int(elem.tag))
        if elem.VR == "UI" and elem.value and (row is None or row.basic_profile != "U"):
            values = elem.value if isinstance(elem.value, list) else [elem.value]
            found.update(str(v) for v in values)
    return found


def _ui_values(ds: Dataset) -> set[str]:
    found: set[str] = set()
    for elem in _elements(ds):
        if elem.VR == "UI" and elem.value:
            values = elem.value if isinstance(elem.value, list) else [elem.value]
            found.update(str(v) for v in values)
    return found


# -- the generated table ------------------------------------------------------------------


def test_rerunning_the_script_on_the_committed_extract_reproduces_the_table(tmp_path: Path) -> None:
    output = tmp_path / "deid_table.py"
    subprocess.run(
        [sys.executable, str(SCRIPT), "--output", str(output)], check=True, timeout=60
    )
    committed = ROOT / "gateway" / "export" / "deid_table.py"
    assert output.read_bytes() == committed.read_bytes()
    check = subprocess.run([sys.executable, str(SCRIPT), "--check"], check=False, timeout=60)
    assert check.returncode == 0
    header = committed.read_text(encoding="utf-8")[:1200]
    assert "DO NOT EDIT BY HAND" in header and "2024b" in header
    assert "innolitics/dicom-standard" in header


def test_the_script_refuses_an_extract_that_is_not_the_one_its_source_names(
    tmp_path: Path,
) -> None:
    data = ROOT / "gateway" / "export" / "data"
    rows = json.loads((data / "confidentiality_profile_attributes.json").read_text("utf-8"))
    for row in rows:
        if row["tag"] == "(0010,0010)":
            row["basicProfile"] = "K"  # someone "fixing" the table by hand
    extract = tmp_path / "confidentiality_profile_attributes.json"
    extract.write_text(json.dumps(rows, indent=4), encoding="utf-8")
    shutil.copy(data / "confidentiality_profile_attributes.source.json", tmp_path)
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--extract", str(extract), "--output", str(tmp_path / "t")],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 2 and "git blob" in result.stderr
    assert not (tmp_path / "t").exists()


def test_the_table_holds_the_standard_rows_the_profile_depends_on() -> None:
    rows = deid_table.ATTRIBUTES
    assert rows[0x00100010].basic_profile == "Z"  # Patient's Name
    assert rows[0x0020000D].basic_profile == "U"  # Study Instance UID
    assert rows[0x00081030].clean_descriptors == "C"  # Study Description
    assert rows[0x00080020].retain_longitudinal_full_dates == "K"  # Study Date
    assert deid_table.PRIVATE.basic_profile == "X"
    assert len(rows) > 600


# -- no identifying value survives ----------------------------------------------------------

OPTION_SETS = [
    DeidOptions(),
    DeidOptions(retain_longitudinal_temporal=True),
    DeidOptions(clean_descriptors=True),
    DeidOptions(retain_longitudinal_temporal=True, clean_descriptors=True),
]


def test_the_canary_is_really_in_the_input_bytes() -> None:
    """The needle search finds the canary before de-identification (so it can fail)."""
    data = _encode(canary_dataset("ISO_IR 192"))
    assert set(_found(data, CANARY_VALUES)) >= {CANARY_ID.encode(), CANARY_BIRTH_DATE.encode()}
    assert "Zebedäus".encode() in data and "Zebedäus".encode("latin-1") not in data
    data = _encode(canary_dataset("ISO_IR 100"))
    assert "Zebedäus".encode("latin-1") in data


@pytest.mark.parametrize("options", OPTION_SETS, ids=lambda o: f"{o}")
@pytest.mark.parametrize("charset", ["ISO_IR 192", "ISO_IR 100"])
@pytest.mark.parametrize(
    "transfer_syntax", [ExplicitVRLittleEndian, ImplicitVRLittleEndian, ExplicitVRBigEndian]
)
def test_no_canary_value_is_left_in_the_written_file(
    options: DeidOptions, charset: str, transfer_syntax: str
) -> None:
    original = pydicom.dcmread(BytesIO(_encode(canary_dataset(charset), transfer_syntax)))
    out = Deidentifier(options, SECRET).apply(original)
    assert out is not None
    data = _written(out)
    assert _found(data, CANARY_VALUES) == []
    again = pydicom.dcmread(BytesIO(data))
    assert again.PatientIdentityRemoved == "YES"
    assert again.file_meta.TransferSyntaxUID == transfer_syntax
    assert not any(elem.tag.is_private for elem in _elements(again))
    assert not any(0x5000 <= elem.tag.group <= 0x60FF for elem in _elements(again))
    assert again.PixelData == original.PixelData


def test_the_structure_of_replaced_sequences_stays_and_their_values_go() -> None:
    out = Deidentifier(DeidOptions(), SECRET).apply(canary_dataset())
    assert out is not None
    [equipment] = out.ContributingEquipmentSequence
    assert equipment.Manufacturer == "ACME"  # not identifying: kept
    assert equipment.InstitutionName != CANARY_INSTITUTION
    [operator] = equipment.OperatorIdentificationSequence  # X/D: dummy items
    [code] = operator.PersonIdentificationCodeSequence
    assert CANARY_ID not in str(code.CodeValue) and "Brünnhildë" not in str(code.CodeMeaning)
    assert "PersonAddress" not in operator
    person, text = out.ContentSequence  # D: dummy items, same structure
    assert person.ValueType == "PNAME" and str(person.PersonName) != CANARY_OPERATOR
    assert text.ValueType == "TEXT" and CANARY_ID not in text.TextValue
    assert "OtherPatientIDsSequence" not in out and "ReferencedPatientSequence" not in out
    assert out.PatientID.startswith("ANON-") and out.PatientName == ""


# -- UIDs ----------------------------------------------------------------------------------


def _study(series: int = 2, per_series: int = 3) -> list[Dataset]:
    """One study: its instances share a Frame of Reference and reference the previous one."""
    study, frame = generate_uid(), generate_uid()
    out: list[Dataset] = []
    for s in range(series):
        series_uid = generate_uid()
        for i in range(per_series):
            ds = make_dataset(StudyInstanceUID=study, SeriesInstanceUID=series_uid)
            ds.FrameOfReferenceUID = frame
            ds.InstanceNumber = i + 1
            if out:
                ref = Dataset()
                ref.ReferencedSOPClassUID = CTImageStorage
                ref.ReferencedSOPInstanceUID = out[-1].SOPInstanceUID
                ds.ReferencedImageSequence = Sequence([ref])
                source = Dataset()
                source.ReferencedSOPClassUID = CTImageStorage
                source.ReferencedSOPInstanceUID = out[0].SOPInstanceUID
                ds.SourceImageSequence = Sequence([source])
            out.append(_with_meta(ds))
    return out


UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


def test_one_study_keeps_one_new_study_uid_and_references_follow() -> None:
    instances = _study() + _study(series=1, per_series=2)
    deid = Deidentifier(DeidOptions(), SECRET)
    outs = [deid.apply(ds) for ds in instances]
    assert all(out is not None for out in outs)
    pairs = list(zip(instances, [o for o in outs if o is not None], strict=True))
    new_sop = {old.SOPInstanceUID: new.SOPInstanceUID for old, new in pairs}
    for old, new in pairs:
        for keyword in UID_KEYWORDS:
            assert new[keyword].value != old[keyword].value
            assert new[keyword].value == deid.replaced_uid(old[keyword].value)
            assert new[keyword].value.startswith("2.25.") and len(new[keyword].value) <= 64
        assert new.file_meta.MediaStorageSOPInstanceUID == new.SOPInstanceUID
        for keyword in ("ReferencedImageSequence", "SourceImageSequence"):
            if keyword in old:
                referenced = old[keyword].value[0].ReferencedSOPInstanceUID
                assert new[keyword].value[0].ReferencedSOPInstanceUID == new_sop[referenced]
        assert not (_ui_values(new) & _u_uids(old))
    studies = {(old.StudyInstanceUID, new.StudyInstanceUID) for old, new in pairs}
    assert len(studies) == 2 and len({n for _, n in studies}) == 2
    series = {(old.SeriesInstanceUID, new.SeriesInstanceUID) for old, new in pairs}
    assert len(series) == 3 and len({n for _, n in series}) == 3
    assert len(set(new_sop.values())) == len(pairs)


def test_uids_are_the_same_with_the_same_secret_and_differ_with_another() -> None:
    ds = make_dataset()
    first = Deidentifier(DeidOptions(), SECRET).apply(ds)
    again = Deidentifier(DeidOptions(clean_descriptors=True), SECRET).apply(ds)
    other = Deidentifier(DeidOptions(), b"another secret").apply(ds)
    assert first is not None and again is not None and other is not None
    assert first.StudyInstanceUID == again.StudyInstanceUID != other.StudyInstanceUID
    assert first.PatientID == again.PatientID != other.PatientID


def test_a_deidentified_study_can_go_into_a_dicomdir(tmp_path: Path) -> None:
    """The STUDY record needs Study Date, Study Time and Study ID (PS3.3 F.5, Type 1); Z on
    them gives dummies, so pydicom's FileSet (what the export's DICOMDIR uses) takes them."""
    from pydicom.fileset import FileSet

    ds = _with_meta(canary_dataset())
    out = Deidentifier(DeidOptions(), SECRET).apply(ds)
    assert out is not None
    assert out.StudyDate and out.StudyDate != ds.StudyDate
    assert out.StudyTime and out.StudyID and out.StudyID != ds.StudyID
    fileset = FileSet()
    fileset.add(out)
    fileset.write(tmp_path)
    fileset._stage["t"].cleanup()  # pydicom keeps a staging folder it only cleans at exit
    [record] = pydicom.dcmread(tmp_path / "DICOMDIR").DirectoryRecordSequence[1:2]
    assert record.DirectoryRecordType == "STUDY" and record.StudyDate == out.StudyDate


@pytest.mark.parametrize("charset", ["ISO_IR 100", "ISO_IR 192"])
def test_kept_non_ascii_values_survive_unchanged(charset: str) -> None:
    """Kept attributes are copied undecoded; they must still read back as they were, at the
    top level and inside a kept sequence, in the instance's character set."""
    ds = make_dataset(SpecificCharacterSet=charset, Manufacturer="Müller Medizintechnik")
    ds.AnatomicRegionSequence = Sequence([_code("818981001", "SCT", "Bauchhöhle")])
    original = pydicom.dcmread(BytesIO(_encode(ds)))
    out = Deidentifier(DeidOptions(), SECRET).apply(original)
    assert out is not None
    again = pydicom.dcmread(BytesIO(_written(out)))
    assert again.Manufacturer == "Müller Medizintechnik"
    assert again.AnatomicRegionSequence[0].CodeMeaning == "Bauchhöhle"
    assert again.SpecificCharacterSet == charset


def test_apply_never_modifies_its_input() -> None:
    ds = canary_dataset()
    before = ds.to_json_dict()
    Deidentifier(DeidOptions(clean_descriptors=True), SECRET).apply(ds)
    assert ds.to_json_dict() == before


# -- options ---------------------------------------------------------------------------------


def test_retain_longitudinal_temporal_keeps_full_dates_and_says_so() -> None:
    ds = canary_dataset()
    kept = Deidentifier(DeidOptions(retain_longitudinal_temporal=True), SECRET).apply(ds)
    removed = Deidentifier(DeidOptions(), SECRET).apply(ds)
    assert kept is not None and removed is not None
    for keyword in ("StudyDate", "StudyTime", "SeriesDate", "AcquisitionDate", "ContentDate"):
        assert kept[keyword].value == ds[keyword].value
        assert removed[keyword].value != ds[keyword].value
    assert kept.PatientBirthDate == removed.PatientBirthDate == ""  # no option keeps it
    assert kept.LongitudinalTemporalInformationModified == "UNMODIFIED"
    assert removed.LongitudinalTemporalInformationModified == "REMOVED"
    assert _codes(kept) == {"113100", "113106"} and _codes(removed) == {"113100"}


def _codes(ds: Dataset) -> set[str]:
    return {item.CodeValue for item in ds.DeidentificationMethodCodeSequence}


def test_clean_descriptors_keeps_descriptions_without_identifying_words() -> None:
    ds = canary_dataset()
    cleaned = Deidentifier(DeidOptions(clean_descriptors=True), SECRET).apply(ds)
    removed = Deidentifier(DeidOptions(), SECRET).apply(ds)
    assert cleaned is not None and removed is not None
    assert cleaned.StudyDescription == "CT THORAX"
    assert cleaned.SeriesDescription == "follow-up"
    assert cleaned.PatientComments == "born allergic to iodine"
    assert cleaned.RequestAttributesSequence[0].RequestedProcedureDescription == "CT THORAX for"
    assert "StudyDescription" not in removed and "SeriesDescription" not in removed
    assert "RequestAttributesSequence" not in removed
    assert _codes(cleaned) == {"113100", "113105"}
    assert "Clean Descriptors" in cleaned.DeidentificationMethod


# -- burned-in annotation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sop_class", "burned_in", "allow", "excluded"),
    [
        (CTImageStorage, None, False, False),
        (CTImageStorage, "NO", False, False),
        (CTImageStorage, "YES", False, True),
        (CTImageStorage, "yes ", False, True),
        (CTImageStorage, "YES", True, False),
        (UltrasoundImageStorage, None, False, True),
        (UltrasoundImageStorage, "NO", False, False),
        (UltrasoundImageStorage, None, True, False),
        (SecondaryCaptureImageStorage, None, False, True),
        (SecondaryCaptureImageStorage, "", False, True),
        ("1.2.840.10008.5.1.4.1.1.6", None, False, True),  # retired US
        ("1.2.840.10008.5.1.4.1.1.104.1", "YES", False, True),  # Encapsulated PDF
    ],
)
def test_burned_in_objects_are_excluded_unless_allowed(
    sop_class: str, burned_in: str | None, allow: bool, excluded: bool
) -> None:
    ds = make_dataset(SOPClassUID=sop_class)
    if burned_in is not None:  # as a modality may send it (no validation on the way in)
        ds[0x00280301] = DataElement(0x00280301, "CS", burned_in, validation_mode=config.IGNORE)
    out = Deidentifier(DeidOptions(allow_burned_in=allow), SECRET).apply(ds)
    assert (out is None) == excluded
    if out is not None:
        assert out.PatientIdentityRemoved == "YES"


# -- a class of real inputs: every file bundled with pydicom -------------------------------


def _bundled() -> list[Path]:
    paths = []
    for name in sorted(get_testdata_files()):
        path = Path(name)
        if not path.is_file():
            continue
        try:
            pydicom.dcmread(path, stop_before_pixels=True)
        except InvalidDicomError:  # pydicom ships some non-DICOM files on purpose
            continue
        paths.append(path)
    return paths


def _identifying(ds: Dataset) -> list[str]:
    """The input's own patient values distinctive enough to search for in bytes."""
    values = []
    for keyword in ("PatientName", "PatientID", "PatientBirthDate", "AccessionNumber"):
        value = str(ds.get(keyword, "") or "").strip()
        if len(value) >= 6:
            values.append(value)
    return values


@pytest.mark.filterwarnings("ignore::UserWarning")  # pydicom warns about odd values in its files
def test_every_bundled_pydicom_file_is_deidentified() -> None:
    paths = _bundled()
    assert len(paths) > 100
    deid = Deidentifier(DeidOptions(allow_burned_in=True), SECRET)
    excluding = Deidentifier(DeidOptions(), SECRET)
    checked = excluded = 0
    for path in paths:
        ds = pydicom.dcmread(path)
        if excluding.apply(ds) is None:
            excluded += 1
            flag = str(ds.get("BurnedInAnnotation", "") or "").upper()
            assert flag == "YES" or flag != "NO", path.name
        out = deid.apply(ds)
        assert out is not None, path.name
        assert out.PatientIdentityRemoved == "YES", path.name
        assert not any(elem.tag.is_private for elem in _elements(out)), path.name
        old_uids = _u_uids(ds)
        kept_uids = _ui_values(ds) - old_uids | {v for v in old_uids if v in _kept_ui(ds)}
        assert not (_ui_values(out) & (old_uids - kept_uids)), path.name
        assert not (_u_uids(out) & old_uids), path.name
        assert _u_uids(out) <= {deid.replaced_uid(uid) for uid in old_uids}, path.name
        if "PixelData" in out:
            del out.PixelData  # burned-in text is not this profile's business
        data = _written(out)
        assert _found(data, _identifying(ds), words=False) == [], path.name
        checked += 1
    assert checked == len(paths) and 0 < excluded < checked


# -- dciodvfy --------------------------------------------------------------------------------


def _dciodvfy_errors(path: Path) -> set[str]:
    from tests.peers import require_tool

    result = subprocess.run(
        [require_tool("dciodvfy"), str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,  # it exits non-zero when it finds errors; the lines are compared
    )
    # dciodvfy quotes values ("= <value>"): a dummy in place of a bad value is the same error
    return {
        re.sub(r"= <[^>]*>", "= <>", line.strip())
        for line in (result.stdout + result.stderr).splitlines()
        if line.startswith("Error")
    }


@pytest.mark.parametrize("name", ["CT_small.dcm", "MR_small.dcm", "rtplan.dcm", "rtstruct.dcm"])
@pytest.mark.parametrize("options", OPTION_SETS[:3], ids=lambda o: f"{o}")
def test_deidentified_real_iods_have_no_new_dciodvfy_errors(
    name: str, options: DeidOptions, tmp_path: Path
) -> None:
    original = Path(str(get_testdata_file(name)))
    ds = pydicom.dcmread(original, force=True)
    if not ds.file_meta.get("TransferSyntaxUID"):  # rtstruct.dcm is a bare data set
        ds.file_meta.TransferSyntaxUID = ImplicitVRLittleEndian
    out = Deidentifier(options, SECRET).apply(ds)
    assert out is not None
    written = tmp_path / name
    out.save_as(written, enforce_file_format=True)
    new_errors = _dciodvfy_errors(written) - _dciodvfy_errors(original)
    assert new_errors == set()


# -- Hypothesis: random datasets from a vocabulary of attributes with identifying actions ----

VOCABULARY = [
    ("PatientName", "PN"),
    ("PatientID", "LO"),
    ("PatientBirthDate", "DA"),
    ("AccessionNumber", "SH"),
    ("ReferringPhysicianName", "PN"),
    ("InstitutionName", "LO"),
    ("InstitutionAddress", "ST"),
    ("OperatorsName", "PN"),
    ("PerformingPhysicianName", "PN"),
    ("OtherPatientNames", "PN"),
    ("PatientAddress", "LO"),
    ("StationName", "SH"),
    ("StudyDescription", "LO"),
    ("ImageComments", "LT"),
    ("PatientComments", "LT"),
    ("IssuerOfPatientID", "LO"),
    ("PersonName", "PN"),
    ("ContentDate", "DA"),
    ("SeriesDate", "DA"),
    ("StudyInstanceUID", "UI"),
    ("SeriesInstanceUID", "UI"),
    ("FrameOfReferenceUID", "UI"),
    ("ReferencedSOPInstanceUID", "UI"),
]
# Where the attributes are put: the top level, an unlisted sequence, a sequence Table E.1-1
# keeps with its UIDs replaced (X/Z/U*), and two levels down.
CONTAINERS = ["top", "ContributingEquipmentSequence", "ReferencedImageSequence", "nested"]

_letters = st.text(alphabet="abcdefghijkmpqrstvwxyzÄÖÜäöüßéçЖжλ", min_size=3, max_size=12)


@st.composite
def _value(draw: st.DrawFn, vr: str) -> str:
    if vr == "DA":
        return draw(st.dates().map(lambda d: f"{d.year:04d}{d.month:02d}{d.day:02d}")
                    .filter(lambda s: s >= "19010101" and s != "19000101"))
    if vr == "UI":
        return f"1.2.3.999.{draw(st.integers(1, 10**30))}"  # under no root pydicom uses
    return "Ϙ" + draw(_letters)  # a character no dummy value holds


@st.composite
def _random_dataset(draw: st.DrawFn) -> tuple[Dataset, list[tuple[str, str, str]]]:
    chosen = draw(st.lists(st.sampled_from(VOCABULARY), min_size=1, max_size=10, unique=True))
    ds = make_dataset(SpecificCharacterSet="ISO_IR 192", PatientName=None, PatientID=None,
                      PatientBirthDate=None, AccessionNumber=None, StudyDate=None,
                      ReferringPhysicianName=None)
    ds.PixelData = bytes(len(ds.PixelData))
    placed: list[tuple[str, str, str]] = []
    for keyword, vr in chosen:
        container = draw(st.sampled_from(CONTAINERS))
        value = draw(_value(vr))
        target = ds
        if container != "top":
            outer = container if container != "nested" else "ContributingEquipmentSequence"
            if outer not in ds:
                ds[outer] = DataElement(outer, "SQ", Sequence([Dataset()]))
            target = ds[outer].value[0]
            if container == "nested":
                if "OperatorIdentificationSequence" not in target:
                    target.OperatorIdentificationSequence = Sequence([Dataset()])
                target = target.OperatorIdentificationSequence[0]
        if keyword in target:
            continue
        setattr(target, keyword, value)
        placed.append((keyword, container, value))
    return ds, placed


def _where(ds: Dataset, container: str) -> Dataset | None:
    if container == "top":
        return ds
    outer = container if container != "nested" else "ContributingEquipmentSequence"
    if outer not in ds or not ds[outer].value:
        return None
    item = ds[outer].value[0]
    if container == "nested":
        if "OperatorIdentificationSequence" not in item or not item.OperatorIdentificationSequence:
            return None
        item = item.OperatorIdentificationSequence[0]
    return item


def _expected_code(keyword: str, retain: bool) -> str:
    row = deid_table.ATTRIBUTES[int(pydicom.datadict.tag_for_keyword(keyword) or 0)]
    if retain and row.retain_longitudinal_full_dates:
        return row.retain_longitudinal_full_dates
    return row.basic_profile


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(drawn=_random_dataset(), retain=st.booleans())
def test_random_datasets_lose_every_identifying_value(
    drawn: tuple[Dataset, list[tuple[str, str, str]]], retain: bool
) -> None:
    ds, placed = drawn
    deid = Deidentifier(DeidOptions(retain_longitudinal_temporal=retain), SECRET)
    out = deid.apply(_with_meta(ds))
    assert out is not None
    data = _written(out)
    kept = {value for keyword, _, value in placed if _expected_code(keyword, retain) == "K"}
    for keyword, container, value in placed:
        code = _expected_code(keyword, retain)
        target = _where(out, container)
        present = target is not None and keyword in target
        new = str(target[keyword].value) if present and target is not None else None
        if code == "K":
            assert new == value
            continue
        if value not in kept:  # another attribute may legitimately hold the same date
            assert value.encode("utf-8") not in data, (keyword, container)
        if code == "U":
            assert new == deid.replaced_uid(value) != value
        elif code == "X":
            assert not present, keyword
        elif code in ("Z", "D", "Z/D"):
            assert present and new != value, keyword
            if code == "D":
                assert new, keyword
        else:  # X/Z, X/D, X/Z/D: removed, emptied or a dummy
            assert new != value
