"""Where an exported instance's bytes come from: the spool, the node of the cluster that holds it,
or, once retention removed the file (or its node cannot give it), the Orthanc destination that
confirmed it (``gateway.query.retrieve.Loader``, as C-MOVE does).

An instance that can be had from neither is *missing*, with a reason an operator can act on; so is
one whose file is not final yet (its remap is pending or held for an operator), because exporting
it would export what the gateway has not finished deciding.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import BinaryIO

from gateway.db.models import kept_hash
from gateway.errors import GatewayError
from gateway.export.select import Item
from gateway.query.retrieve import Loader, Stored

NOT_FINAL = {
    "pending": "its remap has not been applied to the file yet",
    "held": "its study is held for an operator (gateway reconcile list)",
    "failed": "its remap failed (see the gateway's log), so the file is not what the ledger says",
}


class MissingInstance(Exception):
    """The instance's bytes cannot be had; ``reason`` says why (no patient data)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class Opened:
    """An instance's bytes: ``file`` from its start, ``size`` bytes long."""

    file: BinaryIO
    size: int
    path: Path | None  # on disk (the spool), for readers that want a path


class Sources:
    def __init__(self, spool_root: Path, loader: Callable[[], Loader]) -> None:
        self._root = spool_root
        self._make_loader = loader
        self._loader: Loader | None = None

    @property
    def loader(self) -> Loader:
        """Built on first use: the Orthanc clients read their passwords only when needed."""
        if self._loader is None:
            self._loader = self._make_loader()
        return self._loader

    def spool_path(self, item: Item) -> Path:
        assert item.spool_path is not None
        return self._root / item.spool_path

    def problem(self, item: Item) -> str | None:
        """Why ``item`` cannot be exported, found without reading it; None when it looks fine."""
        if item.remap_state in NOT_FINAL:
            return NOT_FINAL[item.remap_state]
        if self.loader.can_fetch_from_holder(_stored(item)):
            return None
        if (item.spool_path is not None and not self.loader.elsewhere(_stored(item))
                and (self._root / item.spool_path).is_file()):
            return None
        if self.loader.can_fetch_back(_stored(item)):
            return None
        if item.spool_path is not None:
            return "its file is not in the spool and no Orthanc destination confirmed it"
        return "retention removed it from the spool and no Orthanc destination confirmed it"

    @contextmanager
    def open(self, item: Item) -> Iterator[Opened]:
        """The instance's bytes; ``MissingInstance`` when they cannot be had."""
        problem = NOT_FINAL.get(item.remap_state)
        if problem:
            raise MissingInstance(problem)
        stored = _stored(item)
        if self.loader.elsewhere(stored):
            held = self.loader.fetch_from_holder(stored)  # None: try an Orthanc copy below
            if held is not None:
                with held:
                    size = held.seek(0, os.SEEK_END)
                    held.seek(0)
                    yield Opened(held, size, None)
                return
        elif item.spool_path is not None:
            path = self._root / item.spool_path
            file = _open_or_none(path)  # None: removed meanwhile; an Orthanc copy may still do
            if file is not None:
                with file:
                    yield Opened(file, os.fstat(file.fileno()).st_size, path)
                return
        try:
            data = self.loader.fetch_back(_stored(item))
        except GatewayError as exc:
            raise MissingInstance(f"fetching it back from Orthanc failed: {exc}") from None
        if data is None:
            raise MissingInstance("retention removed it from the spool and no Orthanc "
                                  "destination confirmed it")
        yield Opened(BytesIO(data), len(data), None)


def _open_or_none(path: Path) -> BinaryIO | None:
    try:
        return open(path, "rb", buffering=0)
    except FileNotFoundError:
        return None


def _stored(item: Item) -> Stored:
    kept = kept_hash(item.sha256, item.kept_sha256, item.remap_state)
    return Stored(item.sop_instance_uid, item.sop_class_uid, "",
                  Path(item.spool_path) if item.spool_path is not None else None, item.copies,
                  item.node_name, kept or "", kept is None)
