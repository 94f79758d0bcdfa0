"""PS3.4 C.2.2.2 attribute matching, turned into SQL conditions: one function per matching type.

Single value, list of UIDs, universal (empty: no condition, the value is returned), wildcard
(``*`` and ``?``) and range (``D1-D2``, ``-D2``, ``D1-`` for DA, TM and DT). Person names match
without regard to case when configured (C.2.2.2.1 leaves it to the SCP). Wildcards become
``LIKE`` with an escape character on PostgreSQL and ``GLOB`` on SQLite, whose ``LIKE`` ignores case.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, and_, func, literal
from sqlalchemy.orm import InstrumentedAttribute

Column = InstrumentedAttribute[Any]
_RANGE_VRS = ("DA", "TM", "DT")


def condition(
    column: Column, vr: str, value: str, dialect: str, names_any_case: bool
) -> ColumnElement[bool] | None:
    """The condition a key's value sets; None for universal matching."""
    value = value.strip() if vr != "PN" else value.strip().rstrip("^=")
    if value in ("", "*"):
        return None
    if vr == "UI" and "\\" in value:
        return uid_list(column, value)
    if vr in _RANGE_VRS and "-" in value:
        return date_range(column, value)
    any_case = vr == "PN" and names_any_case
    if "*" in value or "?" in value:
        return wildcard(column, value, dialect, any_case)
    return single_value(column, value, any_case)


def single_value(column: Column, value: str, any_case: bool) -> ColumnElement[bool]:
    if any_case:
        return func.lower(column) == value.lower()
    return column == value


def uid_list(column: Column, value: str) -> ColumnElement[bool]:
    return column.in_([uid.strip() for uid in value.split("\\") if uid.strip()])


def date_range(column: Column, value: str) -> ColumnElement[bool]:
    """DA and TM are fixed-width digit strings, so text order is time order. An open end is
    unbounded; ``D1-D2`` includes both ends (PS3.4 C.2.2.2.5)."""
    low, _, high = value.partition("-")
    parts = []
    if low.strip():
        parts.append(column >= low.strip())
    if high.strip():
        # TM "-1200" includes 12:00:59.99: compare against the bound padded to its precision
        parts.append(column <= high.strip() + "\uffff")
    return and_(*parts)


def wildcard(column: Column, value: str, dialect: str, any_case: bool) -> ColumnElement[bool]:
    target: Any = func.lower(column) if any_case else column
    pattern = value.lower() if any_case else value
    if dialect == "sqlite":
        escaped = "".join(f"[{c}]" if c in "[]" else c for c in pattern)
        return target.op("GLOB")(literal(escaped))
    like = "".join("\\" + c if c in "%_\\" else c for c in pattern).replace("*", "%").replace("?", "_")
    return target.like(like, escape="\\")

