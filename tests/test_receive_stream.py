"""The gateway's own P-DATA reader (gateway.receive.streaming): framing a peer may legally choose,
messages it hands to pynetdicom, and what an interrupted data set leaves behind.

The PDUs here are written by hand so that the framing is exactly what PS3.8 9.3.5 allows and
not what pynetdicom or DCMTK happen to produce: a command and data in one PDU, many small
fragments, several fragments per PDU.
"""

from __future__ import annotations

import errno
import os
import struct
import time
from collections.abc import Callable
from io import BytesIO
from pathlib import Path
from typing import Any, cast

import pydicom
import pytest
from pynetdicom import AE
from pynetdicom.dimse_messages import C_ECHO_RQ, C_STORE_RQ
from pynetdicom.dimse_primitives import C_ECHO, C_STORE
from pynetdicom.dsutils import encode as encode_command
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from gateway.app import Gateway
from gateway.dicom.status import Status
from gateway.receive import streaming
from tests.conftest import rows, wait_for
from tests.factory import CT_IMAGE_STORAGE, make_dataset, write_file
from tests.peers import dcmtk, encode, spool_files, store

EXPLICIT_LE = "1.2.840.10008.1.2.1"


def _pdv(context_id: int, control: int, value: bytes) -> bytes:
    return struct.pack(">IBB", len(value) + 2, context_id, control) + value


def _pdu(*items: bytes) -> bytes:
    body = b"".join(items)
    return struct.pack(">BxI", 0x04, len(body)) + body


def _store_command(message_id: int, sop_instance: str) -> bytes:
    request = C_STORE()
    request.MessageID = message_id
    request.AffectedSOPClassUID = CT_IMAGE_STORAGE
    request.AffectedSOPInstanceUID = sop_instance
    request.Priority = 2
    request.DataSet = BytesIO(b"\0")  # marks a data set as present
    message = C_STORE_RQ()
    message.primitive_to_message(request)
    encoded = encode_command(message.command_set, True, True)
    assert encoded is not None
    return bytes(encoded)


def _echo_command(message_id: int) -> bytes:
    request = C_ECHO()
    request.MessageID = message_id
    request.AffectedSOPClassUID = Verification
    message = C_ECHO_RQ()
    message.primitive_to_message(request)
    encoded = encode_command(message.command_set, True, True)
    assert encoded is not None
    return bytes(encoded)


class RawAssociation:
    """A pynetdicom requestor whose reactor is paused: we write PDUs, it decodes the answers."""

    def __init__(self, port: int) -> None:
        ae = AE(ae_title="RAWSCU")
        ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_LE)
        ae.add_requested_context(Verification)
        self.assoc: Any = ae.associate("127.0.0.1", port, ae_title="GATEWAY")
        assert self.assoc.is_established
        self.assoc._reactor_checkpoint.clear()
        while not self.assoc._is_paused:
            time.sleep(0.0001)
        self.contexts = {str(c.abstract_syntax): cast(int, c.context_id)
                                         for c in self.assoc.accepted_contexts}

    def send(self, *pdus: bytes) -> None:
        for pdu in pdus:
            self.assoc.dul.socket.send(pdu)

    def status(self) -> int:
        _, response = self.assoc.dimse.get_msg(block=True)
        assert response is not None, "no response"
        return int(response.Status)

    def release(self) -> None:
        self.assoc._reactor_checkpoint.set()
        self.assoc.release()


def test_any_legal_framing_is_kept_byte_for_byte_and_other_messages_go_through(
    make_gateway: Callable[..., Gateway], sqlite_url: str
) -> None:
    app = make_gateway()
    assert app.receiver is not None
    first, second = make_dataset(rows=64, columns=64), make_dataset(rows=32, columns=32)
    raw = RawAssociation(app.receiver.address[1])
    ct, echo = raw.contexts[CT_IMAGE_STORAGE], raw.contexts[Verification]
    try:
        # The command and the first fragment in one PDU; then 37-byte fragments, three per PDU.
        data = encode(first)
        pieces = [data[i:i + 37] for i in range(0, len(data), 37)]
        items = [_pdv(ct, 0x00, piece) for piece in pieces[:-1]] + [_pdv(ct, 0x02, pieces[-1])]
        pdus = [_pdu(_pdv(ct, 0x03, _store_command(1, first.SOPInstanceUID)), items[0])]
        pdus += [_pdu(*items[i:i + 3]) for i in range(1, len(items), 3)]
        raw.send(*pdus)
        assert raw.status() == Status.SUCCESS

        # A C-ECHO on the same association is pynetdicom's to answer.
        raw.send(_pdu(_pdv(echo, 0x03, _echo_command(2))))
        assert raw.status() == Status.SUCCESS

        # A command split over two fragments, the data set in one.
        command = _store_command(3, second.SOPInstanceUID)
        raw.send(_pdu(_pdv(ct, 0x01, command[:20])), _pdu(_pdv(ct, 0x03, command[20:])),
                 _pdu(_pdv(ct, 0x02, encode(second))))
        assert raw.status() == Status.SUCCESS
    finally:
        raw.release()

    kept = {path.stem: path for path in spool_files(app.spool.root)}
    for ds in (first, second):
        stored = pydicom.dcmread(kept[ds.SOPInstanceUID])
        assert stored.file_meta.TransferSyntaxUID == EXPLICIT_LE
        assert stored.file_meta.SourceApplicationEntityTitle == "RAWSCU"
        assert stored.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert stored.PixelData == ds.PixelData
        with open(kept[ds.SOPInstanceUID], "rb") as fp:
            assert fp.read().endswith(encode(ds))
    assert len(rows(sqlite_url, "SELECT id FROM instances")) == 2
    assert not list(app.spool.incoming.iterdir())


def test_an_abort_inside_a_data_set_leaves_nothing_and_the_next_sender_is_served(
    make_gateway: Callable[..., Gateway], sqlite_url: str
) -> None:
    app = make_gateway()
    assert app.receiver is not None
    ds = make_dataset(rows=64, columns=64)
    raw = RawAssociation(app.receiver.address[1])
    ct = raw.contexts[CT_IMAGE_STORAGE]
    data = encode(ds)
    raw.send(_pdu(_pdv(ct, 0x03, _store_command(1, ds.SOPInstanceUID))),
             _pdu(_pdv(ct, 0x00, data[: len(data) // 2])))
    wait_for(lambda: list(app.spool.incoming.iterdir()), 5, "the data set never started")
    raw.assoc._reactor_checkpoint.set()
    raw.assoc.abort()

    wait_for(lambda: not list(app.spool.incoming.iterdir()), 5, "the partial file was left")
    assert spool_files(app.spool.root) == []
    assert rows(sqlite_url, "SELECT id FROM instances") == []
    assert store(app.receiver.address[1], ds) == Status.SUCCESS
    assert len(spool_files(app.spool.root)) == 1


def test_a_new_command_inside_a_data_set_aborts_the_association(
    make_gateway: Callable[..., Gateway], sqlite_url: str
) -> None:
    app = make_gateway()
    assert app.receiver is not None
    ds = make_dataset()
    raw = RawAssociation(app.receiver.address[1])
    ct = raw.contexts[CT_IMAGE_STORAGE]
    data = encode(ds)
    raw.send(_pdu(_pdv(ct, 0x03, _store_command(1, ds.SOPInstanceUID)),
                  _pdv(ct, 0x00, data[:100]),
                  _pdv(ct, 0x03, _store_command(2, ds.SOPInstanceUID))))
    raw.assoc._reactor_checkpoint.set()  # let the requestor see the A-ABORT
    wait_for(lambda: raw.assoc.is_aborted, 5, "the gateway did not abort")
    assert not list(app.spool.incoming.iterdir())
    assert rows(sqlite_url, "SELECT id FROM instances") == []
    # The ledger commits asynchronously; which of pynetdicom's end events comes first varies.
    [association] = wait_for(
        lambda: [r for r in rows(sqlite_url, "SELECT end_state FROM associations") if r.end_state],
        5, "the association's end was not recorded",
    )
    assert association.end_state in ("aborted", "closed")


def test_storescu_with_a_small_maximum_pdu_is_kept_byte_for_byte(
    make_gateway: Callable[..., Gateway], tmp_path: Path
) -> None:
    """The gateway offers 4 KiB PDUs, so each image arrives in dozens of fragments."""
    app = make_gateway(dicom={"max_pdu_size": 4096})
    assert app.receiver is not None
    ds = make_dataset(rows=128, columns=128)
    source = write_file(ds, tmp_path / "ct.dcm")
    result = dcmtk("storescu", "-aet", "SMALLPDU", "-aec", "GATEWAY", "127.0.0.1",
                   str(app.receiver.address[1]), str(source), nodelay=True)
    assert result.returncode == 0, result.stderr
    [kept] = spool_files(app.spool.root)
    assert pydicom.dcmread(kept).PixelData == ds.PixelData
    assert kept.read_bytes().endswith(encode(ds))


def test_a_disk_full_while_writing_answers_a700_and_leaves_nothing(
    make_gateway: Callable[..., Gateway], sqlite_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """ENOSPC half-way through a data set: the rest is read and dropped, the sender is told to
    retry (0xA700), the association stays usable, and nothing half-written is kept."""
    app = make_gateway()
    assert app.receiver is not None
    real_write = os.write
    full = {"on": True}

    def write(fd: int, data: Any) -> int:
        if (full["on"] and "/incoming/" in os.readlink(f"/proc/self/fd/{fd}")
                and os.fstat(fd).st_size >= 4000):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(streaming.os, "write", write)
    ds = make_dataset(rows=64, columns=64)
    raw = RawAssociation(app.receiver.address[1])
    ct = raw.contexts[CT_IMAGE_STORAGE]
    data = encode(ds)
    try:
        # the command and a first fragment are written; the disk is full for the rest
        raw.send(_pdu(_pdv(ct, 0x03, _store_command(1, ds.SOPInstanceUID)),
                      _pdv(ct, 0x00, data[:4000])),
                 _pdu(_pdv(ct, 0x00, data[4000:5000]), _pdv(ct, 0x02, data[5000:])))
        assert raw.status() == Status.OUT_OF_RESOURCES
        assert not list(app.spool.incoming.iterdir())
        full["on"] = False
        raw.send(_pdu(_pdv(ct, 0x03, _store_command(2, ds.SOPInstanceUID)), _pdv(ct, 0x02, data)))
        assert raw.status() == Status.SUCCESS
    finally:
        raw.release()
    [kept] = spool_files(app.spool.root)
    assert kept.read_bytes().endswith(data)
    assert len(rows(sqlite_url, "SELECT id FROM instances")) == 1
