"""PS3.4 C.2.2.2 attribute matching, turned into SQL conditions: one function per matching type.

Single value, list of UIDs, universal (empty: no condition, the value is returned), wildcard
(``*`` and ``?``) and range (``D1-D2``, ``-D2``, ``D1-`` for DA, TM and DT). Wildcards become
``GLOB`` on SQLite (whose ``LIKE`` ignores ASCII case) and ``LIKE`` with an escape character on
PostgreSQL; the value is split into literal runs and wildcards first, and each literal run is
escaped for the one operator, so a literal ``[``, ``%`` or ``_`` in a name never acts as a pattern.

Person names (PN; ``person_name``) are matched per component group, the same way on every database:

- C.2.2.2.1 lets an SCP match PN "insensitive to some or all aspects of case, position, accent, or
  other character encoding variants". With ``[query] case_insensitive_names`` (the default) the
  query value is folded (``gateway.query.folding``: Unicode case folding, Japanese width variants)
  and compared with the folded copy ingest stored, never with SQL ``lower()``, which folds ASCII
  only on SQLite. Off, the stored name must match exactly, case and all. The answer always returns
  the name as stored.
- A PN value has up to three component groups, alphabetic=ideographic=phonetic (PS3.5 6.2.1.2,
  ``Yamada^Tarou=山田^太郎=やまだ^たろう``). A query value with ``=`` is matched group by group; a
  group it leaves empty (or ``*``) matches anything. A query value without ``=`` names one group
  without saying which: it matches when any of the stored groups matches it, so ``YAMADA^TAROU``,
  ``山田^太郎``, ``やまだ*`` and ``*太郎`` all find the patient above, as a Japanese site expects
  (dcm4chee-arc does the same). A wildcard never reaches across a group: ``*TAROU`` finds the
  alphabetic group ``Yamada^Tarou`` although the whole value ends with ``たろう``.
- Within a group the whole group is matched (single value or wildcard), not each component:
  ``MÜLLER`` alone does not find ``Müller^Jürgen``; ``MÜLLER*`` and ``MÜLLER^*`` do. Trailing empty
  components are insignificant (``DOE^JOHN^^`` is ``DOE^JOHN``, PS3.5 6.2.1).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import ColumnElement, and_, case, func, literal, or_
from sqlalchemy.orm import InstrumentedAttribute

from gateway.query.folding import fold

Column = InstrumentedAttribute[Any]
Expression = ColumnElement[Any] | Column
Token = tuple[bool, str]  # (is a wildcard, text): "*" or "?", or a literal run
_RANGE_VRS = ("DA", "TM", "DT")
_WILDCARDS = "*?"
_GROUPS = 3  # alphabetic, ideographic, phonetic


def condition(
    column: Column, vr: str, value: str, dialect: str, names_any_case: bool,
    folded: Column | None = None,
) -> ColumnElement[bool] | None:
    """The condition a key's value sets; None for universal matching. ``folded`` is the column
    holding ``fold_name`` of a PN ``column``, compared when ``names_any_case``."""
    if vr == "PN" and not names_any_case:
        return person_name(column, value, dialect, folding=False)
    if vr == "PN":
        if folded is None:
            raise ValueError(f"PN column {column.key} has no folded column to match in any case")
        return person_name(folded, value, dialect, folding=True)
    value = value.strip()
    if value in ("", "*"):
        return None
    if vr == "UI" and "\\" in value:
        return uid_list(column, value)
    if vr in _RANGE_VRS and "-" in value:
        return date_range(column, value)
    return compare(column, tokens(value, folding=False), dialect)


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


def person_name(column: Column, value: str, dialect: str, folding: bool) -> ColumnElement[bool] | None:
    """A PN key against ``column`` (the folded copy when ``folding``): see the module docstring.

    Cutting a stored value into its groups takes nested ``instr``/``substr`` on SQLite: cutting
    every row made a query over 100 000 instances 3-4 times slower than the old ``lower()``. So
    a name of one group (most names) is compared whole, and the cut is made only on rows that a
    plain pattern over the whole value has let through (SQLite evaluates ``AND`` left to right
    and stops at the first false); an exact value needs no cut at all, as ``=<value>=`` occurs in
    ``=A=I=P=`` only where a whole group is the value. SQLite then reads the folded column's index
    rather than the table (a scan: the ideographic and phonetic groups are not prefixes).
    Stored folded names are normalised (``fold_name``); unfolded ones may end groups in ``^``,
    which is trimmed here."""
    groups = [g.strip(" ").rstrip("^") for g in value.strip(" ").split("=")][:_GROUPS]
    wanted = [(i, tokens(g, folding)) for i, g in enumerate(groups) if g.strip("*")]
    if not wanted:
        return None
    cut = component_groups(column, dialect, trim=not folding)
    any_tail: list[Token] = [(True, "*")] if not folding else []  # room for a trailing "^"
    if len(groups) > 1:
        given = dict(wanted)
        whole: list[Token] = []
        for i in range(max(given) + 1):  # a pattern never matches an empty group: none is last
            whole += [*given.get(i, [(True, "*")]), *any_tail, (False, "=")]
        return and_(compare(column, [*whole[:-1], (True, "*")], dialect),
                    *(compare(cut[i], group, dialect) for i, group in wanted))
    query = wanted[0][1]
    one_group = column if folding else func.rtrim(column, "^")
    # in "=A=I=P=", some group matches only if "=<query>=" occurs (with "^" room when unfolded)
    delimited = literal("=") + column + literal("=")
    somewhere = compare(delimited, [(True, "*"), (False, "="), *query, *any_tail, (False, "="),
                                    (True, "*")], dialect)
    exact = folding and not any(wild for wild, _ in query)  # then "=<value>=" says it all
    return or_(
        and_(~_has_groups(column, dialect), compare(one_group, query, dialect)),
        and_(_has_groups(column, dialect), somewhere,
             *([] if exact else [or_(*(compare(group, query, dialect) for group in cut))])),
    )


def _has_groups(column: Column, dialect: str) -> ColumnElement[bool]:
    return (func.strpos if dialect == "postgresql" else func.instr)(column, "=") > 0


def tokens(value: str, folding: bool) -> list[Token]:
    """The value as wildcards and literal runs, each run folded when ``folding``. Runs are folded
    between ``^`` delimiters as ``fold_name`` folds stored names, component by component."""
    found: list[Token] = []
    run = ""
    for char in value + "^":
        if char in _WILDCARDS or char == "^":
            if run:
                found.append((False, fold(run) if folding else run))
                run = ""
            if char in _WILDCARDS:
                found.append((True, char))
            else:
                found.append((False, "^"))
        else:
            run += char
    return found[:-1]  # the "^" appended above


def compare(target: Expression, query: list[Token], dialect: str) -> ColumnElement[bool]:
    """Single value matching when the query has no wildcard, else wildcard matching."""
    if not any(wild for wild, _ in query):
        return target == "".join(text for _, text in query)
    if dialect == "sqlite":
        glob = "".join(text if wild else "".join(f"[{c}]" if c in "*?[]" else c for c in text)
                       for wild, text in query)
        return target.op("GLOB")(literal(glob))
    like = "".join(
        {"*": "%", "?": "_"}[text] if wild
        else "".join("\\" + c if c in "%_\\" else c for c in text)
        for wild, text in query
    )
    return target.like(like, escape="\\")


def component_groups(column: Column, dialect: str, trim: bool) -> tuple[Expression, ...]:
    """The alphabetic, ideographic and phonetic groups of a stored PN value, '' where absent.
    PostgreSQL has ``split_part``; SQLite has only ``instr`` and ``substr`` (character based),
    so each group is cut from what follows the previous ``=``."""
    groups: list[Expression] = []
    if dialect == "postgresql":
        groups = [func.split_part(column, "=", n) for n in range(1, _GROUPS + 1)]
    else:
        rest: Expression = column
        for _ in range(_GROUPS):
            at = func.instr(rest, "=")
            groups.append(case((at > 0, func.substr(rest, 1, at - 1)), else_=rest))
            rest = case((at > 0, func.substr(rest, at + 1)), else_="")
    return tuple(func.rtrim(g, "^") if trim else g for g in groups)
