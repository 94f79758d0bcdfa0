"""The one place where the gateway changes how pynetdicom moves bytes. Written for pynetdicom 3.0.x.

Why each change, measured on loopback (see ../shared/ARCHITECTURE.md and scripts/bench):
- ``FastSocket``: TCP_NODELAY on every accepted socket, and TCP_QUICKACK re-armed before each read
  where Linux has it. A sender that leaves Nagle on (DCMTK's default) otherwise waits for our
  delayed ACK, 40-90 ms per message. pynetdicom's ``recv`` also reads 4 KiB at a time into a growing
  bytearray; with large PDUs that is dozens of calls and copies per PDU, so we read into one buffer.
- ``receive_datasets_into``: pynetdicom's ``STORE_RECV_CHUNKED_DATASET`` streams each C-STORE data
  set to a temporary file instead of memory (a 1 GB multi-frame must not be held whole), but names
  the file in the system temp folder. We give it the spool's ``incoming`` folder, so the data is on
  the spool's filesystem and a crash leaves it where ``Spool.recover`` looks; and we have it write
  the gateway's own File Meta Information, naming the calling AE as Source Application Entity
  Title (PS3.10 7.1). The received file is then already the file we keep: it is synced and renamed
  into place, never copied (a copy of each image was a fifth of the C-STORE handler's time).
"""

from __future__ import annotations

import functools
import socket
import tempfile
import threading
from pathlib import Path
from typing import cast

import pynetdicom
from pydicom.dataset import FileMetaDataset
from pydicom.uid import UID
from pynetdicom import _config, dimse_messages
from pynetdicom.dsutils import create_file_meta
from pynetdicom.transport import AssociationSocket

IMPLEMENTATION_CLASS_UID = "2.25.48550581365857126030161444514657436015"
IMPLEMENTATION_VERSION_NAME = "GATEWAY_010"

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


def _file_meta(
    sop_class_uid: UID, sop_instance_uid: UID, transfer_syntax: UID, **_: object
) -> FileMetaDataset:
    """pynetdicom's ``create_file_meta`` plus the sender: called in the DUL thread of the
    association receiving the data set, which is how the calling AE title is found."""
    meta = create_file_meta(
        sop_class_uid=sop_class_uid,
        sop_instance_uid=sop_instance_uid,
        transfer_syntax=transfer_syntax,
        implementation_uid=UID(IMPLEMENTATION_CLASS_UID),
        implementation_version=IMPLEMENTATION_VERSION_NAME,
    )
    dul = threading.current_thread()
    calling_ae = getattr(getattr(getattr(dul, "assoc", None), "requestor", None), "ae_title", None)
    if calling_ae:
        meta.SourceApplicationEntityTitle = str(calling_ae).strip()
    return meta


def receive_datasets_into(folder: Path) -> None:
    """Stream C-STORE data sets to Part-10 files in ``folder`` (process-wide: one spool each)."""
    folder.mkdir(parents=True, exist_ok=True)
    _config.STORE_RECV_CHUNKED_DATASET = True
    dimse_messages.NamedTemporaryFile = functools.partial(  # type: ignore[assignment]
        tempfile.NamedTemporaryFile, dir=folder
    )
    dimse_messages.create_file_meta = _file_meta
