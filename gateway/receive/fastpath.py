"""The one place where the gateway changes how pynetdicom moves bytes. Written for pynetdicom 3.0.x.

Why each change, measured on loopback (see ../shared/ARCHITECTURE.md and scripts/bench):
- ``FastSocket``: TCP_NODELAY on every accepted socket, and TCP_QUICKACK re-armed before each read
  where Linux has it. A sender that leaves Nagle on (DCMTK's default) otherwise waits for our
  delayed ACK, 40-90 ms per message. pynetdicom's ``recv`` also reads 4 KiB at a time into a growing
  bytearray; with large PDUs that is dozens of calls and copies per PDU, so we read into one buffer.
- ``receive_datasets_into``: pynetdicom's ``STORE_RECV_CHUNKED_DATASET`` streams each C-STORE data
  set to a temporary file instead of memory (a 1 GB multi-frame must not be held whole), but names
  the file in the system temp folder. We give it the spool's ``incoming`` folder, so the data is on
  the spool's filesystem and a crash leaves it where ``Spool.recover`` looks.
"""

from __future__ import annotations

import functools
import socket
import tempfile
from pathlib import Path
from typing import cast

import pynetdicom
from pynetdicom import _config, dimse_messages
from pynetdicom.transport import AssociationSocket

PYNETDICOM_SERIES = "3.0."
_QUICKACK = getattr(socket, "TCP_QUICKACK", None)


def check_version() -> None:
    """Fail loudly rather than patch a pynetdicom whose internals may have moved."""
    if not pynetdicom.__version__.startswith(PYNETDICOM_SERIES):
        raise RuntimeError(
            f"gateway.receive.fastpath was written for pynetdicom {PYNETDICOM_SERIES}x, found "
            f"{pynetdicom.__version__}; re-check it against the new version and update the pin"
        )


class FastSocket(AssociationSocket):
    @classmethod
    def adopt(cls, wrapped: AssociationSocket) -> None:
        """Turn pynetdicom's socket wrapper into a FastSocket in place.

        In place, because constructing a second wrapper would queue a second transport-connect
        event (Evt5) on the association's state machine.
        """
        wrapped.__class__ = cls
        assert wrapped.socket is not None
        wrapped.socket.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        cast(FastSocket, wrapped)._rearm_quickack()

    def _rearm_quickack(self) -> None:
        # Linux clears QUICKACK after it fires, so it must be set again before every read.
        if _QUICKACK is not None and self.socket is not None:
            try:
                self.socket.setsockopt(socket.IPPROTO_TCP, _QUICKACK, 1)
            except OSError:
                pass  # the peer has gone; the read that follows reports it

    def recv(self, nr_bytes: int) -> bytearray:
        """Read exactly ``nr_bytes`` (fewer only if the peer closed), as pynetdicom's ``recv``."""
        sock = self.socket
        assert sock is not None
        buffer = bytearray(nr_bytes)
        view = memoryview(buffer)
        received = 0
        while received < nr_bytes:
            self._rearm_quickack()
            count = sock.recv_into(view[received:], nr_bytes - received)
            if count == 0:
                del view
                return buffer[:received]
            received += count
        return buffer


def receive_datasets_into(folder: Path) -> None:
    """Stream C-STORE data sets to files in ``folder`` (process-wide: one spool per process)."""
    folder.mkdir(parents=True, exist_ok=True)
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = functools.partial(  # type: ignore[assignment]
        tempfile.NamedTemporaryFile, dir=folder
    )
