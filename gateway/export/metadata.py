"""The metadata JSON of an export (``study_data.json``, ``patient_data.json``) and its schema.

The shape is the one users of other export features know (camelCase keys: ``patient``,
``studies``, ``instances``, ``metadata``), extended with each instance's path, size and SHA-256 in
the archive and a ``missing`` list; ``schema/export-metadata.schema.json`` describes it (the
tests validate every document they produce against it; validating at export time would cost as
much as copying the files). Values are the ones the archive's objects carry (de-identified ones
when the export is), so this file never says more than the objects next to it.
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, fields
from datetime import datetime
from functools import cache
from pathlib import Path
from typing import Any

SCHEMA_PATH = Path(__file__).with_name("schema") / "export-metadata.schema.json"
VERSION = "1.0"


@dataclass(frozen=True)
class Exported:
    """One instance as the archive holds it (UIDs and values after de-identification, if any)."""

    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    instance_number: int | None
    number_of_frames: int | None
    path: str | None
    size: int | None
    sha256: str | None
    orthanc_id: str | None
    previews: tuple[str, ...]
    patient_id: str | None
    patient_name: str | None
    birth_date: str | None
    sex: str | None
    study_date: str | None
    study_time: str | None
    study_description: str | None
    accession_number: str | None
    modality: str | None

    def to_json(self) -> dict[str, Any]:
        return {f: getattr(self, f) for f in _EXPORTED_FIELDS}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Exported:
        return cls(**{**data, "previews": tuple(data["previews"])})


_EXPORTED_FIELDS = tuple(f.name for f in fields(Exported))


@dataclass(frozen=True)
class Missing:
    sop_instance_uid: str
    study_instance_uid: str
    series_instance_uid: str
    reason: str

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> Missing:
        return cls(**data)


@dataclass(frozen=True)
class About:
    """The ``metadata`` block: who, when, what kind of export."""

    exported_by: str
    exported_at: datetime
    includes_images: bool
    includes_previews: bool
    deidentified: bool
    generator: str


def document(studies: Sequence[str], folders: dict[str, str], exported: Sequence[Exported],
             missing: Sequence[Missing], about: About) -> dict[str, Any]:
    """The metadata of the instances ``exported`` (and ``missing``) of ``studies`` (their UIDs
    as exported, in archive order; ``folders`` gives each one's folder in the archive)."""
    by_study: dict[str, list[Exported]] = {uid: [] for uid in studies}
    for instance in exported:
        by_study[instance.study_instance_uid].append(instance)
    first = exported[0] if exported else None
    at = _timestamp(about.exported_at)
    result: dict[str, Any] = {
        "patient": {
            "patientID": first.patient_id if first else None,
            "patientName": first.patient_name if first else None,
            "birthDate": first.birth_date if first else None,
            "sex": first.sex if first else None,
            "exportDate": at,
            "studyCount": len(studies),
        },
        "studies": [_study(uid, folders.get(uid, ""), by_study[uid]) for uid in studies],
        "instances": [_instance(i) for i in exported],
        "metadata": {
            "exportedBy": about.exported_by,
            "exportedAt": at,
            "version": VERSION,
            "includesImages": about.includes_images,
            "includesPreviews": about.includes_previews,
            "deidentified": about.deidentified,
            "complete": not missing,
            "generator": about.generator,
        },
    }
    if missing:
        result["missing"] = [{"sopInstanceUID": m.sop_instance_uid,
                              "studyInstanceUID": m.study_instance_uid,
                              "seriesInstanceUID": m.series_instance_uid,
                              "reason": m.reason} for m in missing]
    return result


def _study(uid: str, folder: str, instances: Sequence[Exported]) -> dict[str, Any]:
    first = instances[0] if instances else None
    modalities = Counter(i.modality for i in instances if i.modality)
    return {
        "studyInstanceUID": uid,
        "studyDate": first.study_date if first else None,
        "studyTime": first.study_time if first else None,
        "modality": min(modalities, key=lambda m: (-modalities[m], m)) if modalities else None,
        "modalitiesInStudy": sorted(modalities),
        "studyDescription": first.study_description if first else None,
        "accessionNumber": first.accession_number if first else None,
        "numberOfSeries": len({i.series_instance_uid for i in instances}),
        "numberOfInstances": len(instances),
        "path": folder,
    }


def _instance(instance: Exported) -> dict[str, Any]:
    return {
        "sopInstanceUID": instance.sop_instance_uid,
        "studyInstanceUID": instance.study_instance_uid,
        "seriesInstanceUID": instance.series_instance_uid,
        "sopClassUID": instance.sop_class_uid,
        "instanceNumber": instance.instance_number,
        "numberOfFrames": instance.number_of_frames,
        "path": instance.path,
        "size": instance.size,
        "sha256": instance.sha256,
        "orthancInstanceId": instance.orthanc_id,
        "previews": list(instance.previews),
    }


def _timestamp(at: datetime) -> str:
    return at.isoformat(timespec="seconds").replace("+00:00", "Z")


def encode(value: dict[str, Any]) -> bytes:
    """UTF-8 JSON, keys in the order built (the same bytes on every run), names as they are."""
    return (json.dumps(value, indent=2, ensure_ascii=False) + "\n").encode("utf-8")


@cache
def schema() -> dict[str, Any]:
    loaded: dict[str, Any] = json.loads(SCHEMA_PATH.read_text(encoding="utf-8"))
    return loaded


def check(value: dict[str, Any]) -> None:
    """``jsonschema.ValidationError`` when ``value`` does not conform to the schema."""
    import jsonschema

    jsonschema.Draft202012Validator(
        schema(), format_checker=jsonschema.Draft202012Validator.FORMAT_CHECKER
    ).validate(value)
