"""Which rows a node may act on with its own disk: the instances (and the other versions of
them) its spool holds.

Forwarding, remap rewrites and retention read or change the file itself, so each node does them
only for the instances it holds (``instances.node_name``); queries and retrieves read the one
ledger and reach other nodes' files over HTTP (``gateway.cluster.peers``). A version's file
(``instance_versions.node_name``, migration 0013) is on the node that received that copy, which
need not hold the current one. A NULL holder is a row no node has claimed (written before
migration 0012 or 0013 without a node name): any node takes it, as the single node always did.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, or_, true
from sqlalchemy.orm import InstrumentedAttribute

from gateway.db.models import Instance


def held_by(
    node: str | None, column: InstrumentedAttribute[str | None] = Instance.node_name
) -> ColumnElement[bool]:
    """The condition "this row's file is on ``node``'s disk"; ``None``: no condition (an
    operator's command that acts on the whole ledger). ``column``: the holder column of the
    table asked (``Instance.node_name`` or ``InstanceVersion.node_name``)."""
    if node is None:
        return true()
    return or_(column == node, column.is_(None))
