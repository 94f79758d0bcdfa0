"""Which rows a node may act on with its own disk: the instances its spool holds.

Forwarding, remap rewrites and retention read or change the file itself, so each node does them
only for the instances it holds (``instances.node_name``); queries and retrieves read the one
ledger and reach other nodes' files over HTTP (``gateway.cluster.peers``). A NULL holder is a row
no node has claimed (written before migration 0012 without a node name): any node takes it, as
the single node always did.
"""

from __future__ import annotations

from sqlalchemy import ColumnElement, or_, true

from gateway.db.models import Instance


def held_by(node: str | None) -> ColumnElement[bool]:
    """The condition "this instance's file is on ``node``'s disk"; ``None``: no condition
    (an operator's command that acts on the whole ledger)."""
    if node is None:
        return true()
    return or_(Instance.node_name == node, Instance.node_name.is_(None))
