"""The remap rules file: an ordered list of rules, each a ``match`` and a list of ``actions``.

Invariants: rules are data, validated once like the configuration (frozen models, unknown keys are
errors, discriminated on ``type``), never code: no ``eval``, regular expressions compiled up front.
Tags are named by DICOM keyword (``PatientID``), checked against pydicom's dictionary; only
top-level elements are addressed. Every matching rule applies, in file order, each action seeing
what the actions before it left; a rule with ``final = true`` stops the rules after it.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydicom.datadict import dictionary_VR, tag_for_keyword

from gateway.errors import ConfigError

Unmatched = Literal["pass", "hold"]

# Elements whose value the gateway derives itself, or which would make the object inconsistent if
# edited by a generic action: the identity/order actions and regenerate_uid handle the allowed ones.
_PROTECTED = {
    "SpecificCharacterSet": "the gateway chooses the character set when it writes new values",
    "PixelData": "pixel data is never edited",
    "SOPClassUID": "the SOP class is what the instance is; it cannot be remapped",
    "OriginalAttributesSequence": "the gateway writes it to record every change",
}
_UID_VR = "UI"
_UID_KEYWORDS = ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID", "FrameOfReferenceUID")


class _Model(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


def _check_keyword(keyword: str) -> str:
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise ValueError(
            f"{keyword!r} is not a DICOM keyword; use the keyword as pydicom spells it, "
            "e.g. PatientID, AccessionNumber, InstitutionName"
        )
    if tag >> 16 == 0x0002:
        raise ValueError(f"{keyword} is file meta information, which the gateway writes itself")
    return keyword


def _check_editable(keyword: str) -> str:
    _check_keyword(keyword)
    if keyword in _PROTECTED:
        raise ValueError(f"{keyword} cannot be edited by a rule: {_PROTECTED[keyword]}")
    if dictionary_VR(keyword) == "SQ":
        raise ValueError(f"{keyword} is a sequence; rules edit single elements only")
    if dictionary_VR(keyword) == _UID_VR:
        raise ValueError(
            f"{keyword} is a UID; use an action of type regenerate_uid so that every instance "
            "of the study gets the same new UID"
        )
    return keyword


Keyword = Annotated[str, Field(min_length=1)]


class TagCondition(_Model):
    """One test on a top-level element: exactly one of equals, regex, missing, present."""

    tag: Keyword
    equals: str | None = None
    regex: str | None = None
    missing: bool | None = None
    present: bool | None = None

    _tag = field_validator("tag")(_check_keyword)

    @field_validator("regex")
    @classmethod
    def _compiles(cls, pattern: str | None) -> str | None:
        if pattern is not None:
            try:
                re.compile(pattern)
            except re.error as exc:
                raise ValueError(f"not a valid regular expression: {exc}") from None
        return pattern

    @model_validator(mode="after")
    def _one_test(self) -> TagCondition:
        tests = [t for t in ("equals", "regex", "missing", "present") if getattr(self, t) is not None]
        if len(tests) != 1:
            raise ValueError(
                f"give exactly one of equals, regex, missing = true, present = true (found {tests or 'none'})"
            )
        return self


class Match(_Model):
    """All given criteria must hold; an empty match matches everything. Lists mean any of."""

    calling_ae: tuple[str, ...] = ()
    called_ae: tuple[str, ...] = ()
    modality: tuple[str, ...] = ()
    sop_class: tuple[str, ...] = ()
    tags: tuple[TagCondition, ...] = ()


class SetAction(_Model):
    type: Literal["set"]
    tag: Keyword
    value: str | list[str]

    _tag = field_validator("tag")(_check_editable)


class CopyAction(_Model):
    type: Literal["copy"]
    source: Keyword
    tag: Keyword

    _source = field_validator("source")(_check_keyword)
    _tag = field_validator("tag")(_check_editable)


class DeleteAction(_Model):
    type: Literal["delete"]
    tag: Keyword

    _tag = field_validator("tag")(_check_editable)


class RegexReplaceAction(_Model):
    type: Literal["regex_replace"]
    tag: Keyword
    pattern: str
    replacement: str

    _tag = field_validator("tag")(_check_editable)

    @field_validator("pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"not a valid regular expression: {exc}") from None
        return pattern


class MapIdentityAction(_Model):
    """Device or local patient ID -> MRN (and demographics) through the identity table."""

    type: Literal["map_identity"]
    unmatched: Unmatched = "hold"


class ReconcileOrderAction(_Model):
    """Accession number and requested procedure from the matching order."""

    type: Literal["reconcile_order"]
    unmatched: Unmatched = "hold"


class RegenerateUidAction(_Model):
    """A new UID derived from the old one under the gateway's root: same input, same output."""

    type: Literal["regenerate_uid"]
    tag: Literal[_UID_KEYWORDS]  # type: ignore[valid-type]


Action = Annotated[
    SetAction
    | CopyAction
    | DeleteAction
    | RegexReplaceAction
    | MapIdentityAction
    | ReconcileOrderAction
    | RegenerateUidAction,
    Field(discriminator="type"),
]


class Rule(_Model):
    name: str = Field(min_length=1)
    match: Match = Match()
    actions: tuple[Action, ...] = Field(min_length=1)
    final: bool = False
    reason: Literal["COERCE", "CORRECT"] = "COERCE"


class RuleSet(_Model):
    rules: tuple[Rule, ...] = ()

    @field_validator("rules")
    @classmethod
    def _unique_names(cls, rules: tuple[Rule, ...]) -> tuple[Rule, ...]:
        seen: set[str] = set()
        for rule in rules:
            if rule.name in seen:
                raise ValueError(f"rule name {rule.name!r} is used twice; names identify rules in the audit")
            seen.add(rule.name)
        return rules


def _describe(err: Mapping[str, Any], data: Mapping[str, Any], source: Path) -> str:
    loc = list(err["loc"])
    where = ".".join(str(p) for p in loc)
    if len(loc) >= 2 and loc[0] == "rules" and isinstance(loc[1], int):
        rules = data.get("rules") or []
        name = rules[loc[1]].get("name") if loc[1] < len(rules) and isinstance(rules[loc[1]], dict) else None
        rest = ".".join(str(p) for p in loc[2:] if not (isinstance(p, str) and p[:1].isupper() and "Action" in p))
        where = f"rule #{loc[1] + 1}" + (f" {name!r}" if name else "") + (f", {rest}" if rest else "")
    message = str(err["msg"]).removeprefix("Value error, ")
    if err["type"] == "extra_forbidden":
        return f"{source}: {where}: unknown key; remove it or check its spelling (see config/remap.example.toml)"
    if err["type"] == "missing":
        return f"{source}: {where}: required but missing; add it"
    if err["type"] == "union_tag_invalid":
        message = ("unknown action type; use one of set, copy, delete, regex_replace, "
                   "map_identity, reconcile_order, regenerate_uid")
    return f"{source}: {where} = {err.get('input')!r}: {message}"


def load_rules(path: Path) -> RuleSet:
    """Read and validate a rules file; raise ConfigError listing every problem with its rule."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError([f"{path}: no such rules file; fix remap.rules_file or pass --rules"])
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError([f"{path}: not valid TOML ({exc}); fix the syntax"])
    try:
        return RuleSet.model_validate(data)
    except ValidationError as exc:
        raise ConfigError([_describe(e, data, path) for e in exc.errors()])
