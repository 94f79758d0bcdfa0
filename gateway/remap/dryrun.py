"""Trying rules without sending or writing anything: ``remap test`` on files, ``remap replay``
on what the gateway has already received. Both print patient values: they are operators'
commands, run at a terminal, and their output never reaches the service log.
"""

from __future__ import annotations

import copy
import json
from collections import Counter
from collections.abc import Iterable, Iterator
from datetime import datetime
from pathlib import Path

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.errors import InvalidDicomError
from sqlalchemy import select
from sqlalchemy.orm import Session

from gateway.db.models import AssociationRecord, Instance
from gateway.remap.plan import Resolver, Settings, Subject, Value, Working, describe, make_plan
from gateway.remap.rules import RuleSet

EXAMPLES = 10


def _files(paths: Iterable[Path]) -> Iterator[Path]:
    for path in paths:
        if path.is_dir():
            yield from sorted(p for p in path.rglob("*") if p.is_file())
        else:
            yield path


def test_files(
    rules: RuleSet,
    settings: Settings,
    resolver: Resolver,
    paths: Iterable[Path],
    calling_ae: str | None,
    called_ae: str,
) -> Iterator[str]:
    """Per file: the rules that match, whether its study would be held, and old -> new."""
    for path in _files(paths):
        try:
            ds = dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError) as exc:
            yield f"{path}: skipped, not a DICOM file ({type(exc).__name__})"
            continue
        sender = calling_ae or str(ds.file_meta.get("SourceApplicationEntityTitle", "")).strip()
        plan = make_plan(rules, Subject(sender, called_ae), ds, resolver, settings)
        # A held study is kept exactly as received until an operator assigns it an order
        # (`gateway reconcile assign`), which decides its values then: no change to show now.
        state = ("held, kept unchanged until `gateway reconcile assign`: " + "; ".join(plan.holds)
                 if plan.held else
                 f"{len(plan.changes)} change(s)" if plan.changes else "unchanged")
        yield f"{path}: {state}; rules: {', '.join(plan.rules) or 'none'} (calling AE {sender!r})"
        for flag in plan.flags:
            yield f"  passed through: {flag}"
        if not plan.held:
            for keyword, old, new in describe(plan.changes, ds):
                yield f"  {keyword}: {_show(old)} -> {_show(new)}"


def _show(value: Value) -> str:
    return "(absent)" if value is None else repr(value)


def as_received(ds: Dataset, modifying_system: str) -> Dataset:
    """The object before this gateway's modifications, rebuilt from Original Attributes Sequence
    (an attribute listed there with no value did not exist before)."""
    received = copy.deepcopy(ds)
    history = list(received.get("OriginalAttributesSequence") or [])
    ours = [item for item in history if str(item.get("ModifyingSystem", "")) == modifying_system]
    for item in reversed(ours):
        for previous in item.get("ModifiedAttributesSequence") or []:
            for element in previous:
                if element.value in (None, "", []):
                    received.pop(element.tag, None)
                else:
                    received[element.tag] = copy.deepcopy(element)
    kept = [item for item in history if item not in ours]
    if kept:
        received.OriginalAttributesSequence = kept
    elif "OriginalAttributesSequence" in received:
        del received.OriginalAttributesSequence
    return received


def replay(
    session: Session,
    rules: RuleSet,
    settings: Settings,
    resolver: Resolver,
    spool_root: Path,
    since: datetime,
    modifying_system: str,
) -> list[str]:
    """Run candidate rules over instances received since ``since`` and count what would differ
    from what was done (values in the spool, or recorded to be written, and held or not)."""
    examined = differ = missing = 0
    by_tag: Counter[str] = Counter()
    held_now = held_then = 0
    examples: list[str] = []
    called = dict(session.execute(select(AssociationRecord.id, AssociationRecord.called_ae)).tuples().all())
    for instance in session.scalars(
        select(Instance).where(Instance.received_at >= since).order_by(Instance.received_at)
    ):
        path = spool_root / instance.spool_path
        if not path.exists():
            missing += 1
            continue
        stored = dcmread(path, stop_before_pixels=True)
        received = as_received(stored, modifying_system)
        subject = Subject(instance.calling_ae, called.get(instance.association_id or -1) or "")
        candidate = make_plan(rules, subject, received, resolver, settings)
        done = Working(stored)
        if instance.remap_state in ("pending", "rewriting") and instance.remap_plan:
            for keyword, value in json.loads(instance.remap_plan).items():
                if not keyword.startswith("__"):
                    done.set(keyword, value)
        would = Working(received)
        for keyword, value in candidate.changes.items():
            would.set(keyword, value)
        keys = set(candidate.changes) | set(done.changes) | _modified_keys(stored, modifying_system)
        changed = sorted(k for k in keys if would.get(k) != done.get(k))
        examined += 1
        held_then += instance.remap_state == "held"
        held_now += candidate.held
        if changed or candidate.held != (instance.remap_state == "held"):
            differ += 1
            by_tag.update(changed)
            if len(examples) < EXAMPLES:
                detail = ", ".join(f"{k}: {_show(done.get(k))} -> {_show(would.get(k))}" for k in changed)
                examples.append(f"  {instance.sop_instance_uid}: {detail or 'held state differs'}")
    lines = [
        (f"examined {examined} instance(s) received since {since:%Y-%m-%d %H:%M}; "
        f"{differ} would differ; {missing} no longer in the spool"),
        f"held: {held_then} as done, {held_now} with the candidate rules",
    ]
    lines += [f"  {tag}: {count} instance(s)" for tag, count in by_tag.most_common()]
    if examples:
        lines.append("examples (done -> candidate):")
        lines += examples
    return lines


def _modified_keys(ds: Dataset, modifying_system: str) -> set[str]:
    keys: set[str] = set()
    for item in ds.get("OriginalAttributesSequence") or []:
        if str(item.get("ModifyingSystem", "")) == modifying_system:
            for previous in item.get("ModifiedAttributesSequence") or []:
                keys.update(e.keyword for e in previous if e.keyword)
    return keys
