"""What a peer gets wrong, sent over a raw socket: every malformed PDU or association ends with an
A-ABORT (source and reason as PS3.8 9.3.8 says) or an A-ASSOCIATE-RJ, one WARNING naming the peer
and why, the association counted out, nothing left in ``incoming/``, and the next sender served.
Malformed C-STORE requests that can be answered are answered, with an Error Comment, and the
association goes on.

The PDUs are built here by hand (PS3.8 9.3), independently of pynetdicom and of
``gateway.dicom.pdu``, so that a test can send exactly what no library would.
"""

from __future__ import annotations

import errno
import logging
import socket
import struct
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from io import BytesIO
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import UID
from pynetdicom import AE
from pynetdicom.acse import ACSE
from pynetdicom.dsutils import decode
from pynetdicom.dsutils import encode as encode_command
from sqlalchemy.exc import OperationalError

from gateway.app import Gateway
from gateway.dicom.status import Status
from tests.conftest import rows, wait_for
from tests.factory import CT_IMAGE_STORAGE, make_dataset, write_file
from tests.peers import dcmtk, encode, spool_files

APPLICATION_CONTEXT = "1.2.840.10008.3.1.1.1"
VERIFICATION = "1.2.840.10008.1.1"
EXPLICIT_LE = "1.2.840.10008.1.2.1"
IMPLICIT_LE = "1.2.840.10008.1.2"
MR_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.4"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
MAX_PDU = 4 << 20
# The contexts every raw association proposes: 1 accepted (CT), 3 accepted (Verification),
# 5 rejected (an abstract syntax nobody supports).
CONTEXTS = [(1, CT_IMAGE_STORAGE, [EXPLICIT_LE]), (3, VERIFICATION, [IMPLICIT_LE]),
            (5, "1.2.3.4.5.6.7", [IMPLICIT_LE])]


# -- PDUs by hand (PS3.8 9.3) ----------------------------------------------------------------

def _item(kind: int, value: bytes) -> bytes:
    return struct.pack(">BxH", kind, len(value)) + value


def pdu(kind: int, body: bytes) -> bytes:
    return struct.pack(">BxI", kind, len(body)) + body


def associate_rq(contexts: list[tuple[int, str, list[str]]], calling: str = "RAWSCU") -> bytes:
    body = struct.pack(">HH", 1, 0) + b"GATEWAY".ljust(16) + calling.encode().ljust(16) + bytes(32)
    body += _item(0x10, APPLICATION_CONTEXT.encode())
    for context_id, abstract, syntaxes in contexts:
        sub = _item(0x30, abstract.encode()) + b"".join(_item(0x40, s.encode()) for s in syntaxes)
        body += _item(0x20, bytes((context_id, 0, 0, 0)) + sub)
    body += _item(0x50, _item(0x51, struct.pack(">I", 16384)) + _item(0x52, b"1.2.3.4"))
    return pdu(0x01, body)


def pdv(context_id: int, control: int, value: bytes) -> bytes:
    return struct.pack(">IBB", len(value) + 2, context_id, control) + value


def p_data(*items: bytes) -> bytes:
    return pdu(0x04, b"".join(items))


def command(**elements: Any) -> bytes:
    """A command set as PS3.7 6.3.1 encodes it: implicit VR little endian, group length first."""
    ds = Dataset()
    for keyword, value in elements.items():
        setattr(ds, keyword, value)
    encoded = encode_command(ds, True, True)
    assert encoded is not None
    body = bytes(encoded)
    length = Dataset()
    length.CommandGroupLength = len(body)
    header = encode_command(length, True, True)
    assert header is not None
    return bytes(header) + body


def _element(element: int, value: bytes) -> bytes:
    """One group 0000 element, implicit VR little endian, padded to even length with NUL."""
    value += b"\0" * (len(value) % 2)
    return struct.pack("<HHI", 0x0000, element, len(value)) + value


def c_store_rq(message_id: int, sop_class: str, sop_instance: str, data_set: bool = True) -> bytes:
    """A C-STORE-RQ (PS3.7 9.3.1.1) with the UIDs' characters sent as UTF-8, whatever they are:
    a peer can put any bytes there, and so can this test."""
    body = b"".join((
        _element(0x0002, sop_class.encode()),
        _element(0x0100, struct.pack("<H", 0x0001)),
        _element(0x0110, struct.pack("<H", message_id)),
        _element(0x0700, struct.pack("<H", 0)),
        _element(0x0800, struct.pack("<H", 0x0000 if data_set else 0x0101)),
        _element(0x1000, sop_instance.encode()),
    ))
    return _element(0x0000, struct.pack("<I", len(body))) + body


@dataclass(frozen=True)
class Received:
    kind: int
    body: bytes

    @property
    def abort(self) -> tuple[int, int]:
        """(source, reason) of an A-ABORT (PS3.8 Table 9-26)."""
        assert self.kind == 0x07 and len(self.body) == 4, f"not an A-ABORT: {self}"
        return self.body[2], self.body[3]

    @property
    def reject(self) -> tuple[int, int, int]:
        """(result, source, reason) of an A-ASSOCIATE-RJ (PS3.8 Table 9-21)."""
        assert self.kind == 0x03 and len(self.body) == 4, f"not an A-ASSOCIATE-RJ: {self}"
        return self.body[1], self.body[2], self.body[3]

    def response(self) -> Dataset:
        """The command set of a P-DATA-TF holding one whole command."""
        assert self.kind == 0x04, f"not a P-DATA-TF: {self}"
        assert self.body[5] == 0x03, "not a whole command in one PDV"
        return decode(BytesIO(self.body[6:]), True, True)


class RawPeer:
    """A TCP connection that speaks PS3.8 byte by byte."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.address = f"127.0.0.1:{self.sock.getsockname()[1]}"

    def associate(self, contexts: list[tuple[int, str, list[str]]] = CONTEXTS) -> RawPeer:
        self.send(associate_rq(contexts))
        answer = self.read()
        assert answer is not None and answer.kind == 0x02, f"not accepted: {answer}"
        return self

    def send(self, *data: bytes) -> None:
        for chunk in data:
            self.sock.sendall(chunk)

    def read(self, timeout_s: float = 10) -> Received | None:
        """The next PDU, or None once the gateway has closed the connection."""
        self.sock.settimeout(timeout_s)
        header = self._exactly(6)
        if header is None:
            return None
        kind, length = struct.unpack(">BxI", header)
        body = self._exactly(length)
        return None if body is None else Received(kind, body)

    def _exactly(self, count: int) -> bytes | None:
        data = b""
        while len(data) < count:
            try:
                chunk = self.sock.recv(count - len(data))
            except ConnectionResetError:
                return None
            if not chunk:
                return None
            data += chunk
        return data

    def close(self) -> None:
        self.sock.close()


def active(app: Any) -> float:
    return float(app.metrics.registry.get_sample_value("gateway_associations_active"))


def warnings_about(caplog: pytest.LogCaptureFixture, address: str) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.levelno == logging.WARNING and address in r.getMessage()]


def storescu_is_served(app: Any, tmp_path: Path) -> None:
    """A well-behaved modality right after: stored, Success."""
    ds = make_dataset()
    source = write_file(ds, tmp_path / f"{ds.SOPInstanceUID}.dcm")
    result = dcmtk("storescu", "-aet", "AFTER", "-aec", "GATEWAY", "127.0.0.1",
                   str(app.receiver.address[1]), str(source))
    assert result.returncode == 0, result.stderr
    assert ds.SOPInstanceUID in {p.stem for p in spool_files(app.spool.root)}


def ends_in_order(app: Any, caplog: pytest.LogCaptureFixture, peer: RawPeer, why: str) -> None:
    """After the A-ABORT or A-ASSOCIATE-RJ: counted out, nothing in incoming/, one WARNING."""
    peer.close()
    wait_for(lambda: active(app) == 0, 10, "the association was never counted out")
    wait_for(lambda: not list(app.spool.incoming.iterdir()), 10, "incoming/ is not empty")
    said = warnings_about(caplog, peer.address)
    assert len(said) == 1, said
    assert why in said[0], said


# -- the cases: what is sent once the connection is open, and what must come back ----------------

def _half_a_data_set(peer: RawPeer) -> bytes:
    data = encode(make_dataset(rows=64, columns=64))
    return p_data(pdv(1, 0x03, c_store_rq(1, CT_IMAGE_STORAGE, "1.2.3.4")), pdv(1, 0x00, data[:4000]))


def _wait_for_a_file(app: Any) -> None:
    wait_for(lambda: list(app.spool.incoming.iterdir()), 5, "the data set never started")


def _then(last: Callable[[RawPeer], bytes]) -> Callable[[RawPeer, Any], None]:
    """Half a data set, then (once the gateway has begun its file) the PDU ``last`` builds."""
    def send(peer: RawPeer, app: Any) -> None:
        peer.send(_half_a_data_set(peer))
        _wait_for_a_file(app)
        peer.send(last(peer))
    return send


@dataclass(frozen=True)
class Case:
    name: str
    send: Callable[[RawPeer, Any], None]
    expect: Callable[[Received], object]
    expected: object
    why: str
    associate: bool = True


def _abort(received: Received) -> object:
    return received.abort


def _reject(received: Received) -> object:
    return received.reject


PROVIDER, USER = 0x02, 0x00
UNRECOGNIZED_PDU, UNEXPECTED_PDU, INVALID_PARAMETER = 0x01, 0x02, 0x06

CASES = [
    Case("P-DATA on a context id never proposed",
         lambda peer, app: peer.send(p_data(pdv(7, 0x03, c_store_rq(1, CT_IMAGE_STORAGE, "1.2.3")))),
         _abort, (PROVIDER, INVALID_PARAMETER), "presentation context 7"),
    Case("P-DATA on a context that was rejected",
         lambda peer, app: peer.send(p_data(pdv(5, 0x03, c_store_rq(1, CT_IMAGE_STORAGE, "1.2.3")))),
         _abort, (PROVIDER, INVALID_PARAMETER), "presentation context 5"),
    Case("a PDV on a context never proposed inside a data set",
         _then(lambda peer: p_data(pdv(9, 0x02, b"\0" * 10))),
         _abort, (PROVIDER, INVALID_PARAMETER), "presentation context 9"),
    Case("context ids 0 and 2 in the A-ASSOCIATE-RQ",
         lambda peer, app: peer.send(associate_rq(
             [(0, CT_IMAGE_STORAGE, [EXPLICIT_LE]), (2, VERIFICATION, [IMPLICIT_LE])])),
         _reject, (0x01, 0x02, 0x01), "odd", associate=False),
    Case("a P-DATA-TF header longer than max_pdu_size, and no body",
         lambda peer, app: peer.send(struct.pack(">BxI", 0x04, 5 << 20)),
         _abort, (PROVIDER, INVALID_PARAMETER), f"5242880 bytes, more than the {MAX_PDU}"),
    Case("an unknown PDU type",
         lambda peer, app: peer.send(pdu(0x09, bytes(4))),
         _abort, (PROVIDER, UNRECOGNIZED_PDU), "unknown PDU type 0x09"),
    Case("an A-ASSOCIATE-RQ on an established association",
         lambda peer, app: peer.send(associate_rq(CONTEXTS)),
         _abort, (PROVIDER, UNEXPECTED_PDU), "unexpected A-ASSOCIATE-RQ"),
    Case("a P-DATA-TF before any A-ASSOCIATE-RQ",
         lambda peer, app: peer.send(p_data(pdv(1, 0x03, b"\0" * 8))),
         _abort, (PROVIDER, UNEXPECTED_PDU), "unexpected P-DATA-TF", associate=False),
    Case("an A-ASSOCIATE-RQ that does not decode (an item of unknown type)",
         lambda peer, app: peer.send(pdu(0x01, associate_rq(CONTEXTS)[6:74]
                                         + struct.pack(">BxH", 0x99, 4) + b"abcd")),
         _abort, (PROVIDER, INVALID_PARAMETER), "A-ASSOCIATE-RQ could not be decoded",
         associate=False),
    Case("a truncated PDV",
         lambda peer, app: peer.send(p_data(b"\0\0\0")),
         _abort, (PROVIDER, INVALID_PARAMETER), "truncated PDV"),
    Case("a PDV longer than its PDU",
         lambda peer, app: peer.send(p_data(struct.pack(">IBB", 500, 1, 0x03) + b"\0" * 20)),
         _abort, (PROVIDER, INVALID_PARAMETER), "PDV item length 500"),
    Case("a data set fragment with no command",
         lambda peer, app: peer.send(p_data(pdv(1, 0x02, encode(make_dataset())))),
         _abort, (USER, 0x00), "no command before it"),
    Case("a new command inside a data set",
         _then(lambda peer: p_data(pdv(1, 0x03, c_store_rq(2, CT_IMAGE_STORAGE, "1.2")))),
         _abort, (USER, 0x00), "new message began"),
    Case("an unknown Command Field",
         lambda peer, app: peer.send(p_data(pdv(3, 0x03, command(
             AffectedSOPClassUID=VERIFICATION, CommandField=0x0ABC, MessageID=1,
             CommandDataSetType=0x0101)))),
         _abort, (USER, 0x00), "unknown Command Field 0x0ABC"),
    Case("a C-STORE-RQ without a Message ID",
         lambda peer, app: peer.send(p_data(pdv(1, 0x03, command(
             AffectedSOPClassUID=CT_IMAGE_STORAGE, CommandField=0x0001, Priority=0,
             CommandDataSetType=0, AffectedSOPInstanceUID="1.2.3")))),
         _abort, (USER, 0x00), "without a Message ID"),
]


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_a_malformed_pdu_or_association_ends_in_order(
    case: Case, make_gateway: Callable[..., Gateway], caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
) -> None:
    caplog.set_level(logging.WARNING)
    app = make_gateway(dicom={"max_pdu_size": MAX_PDU})
    assert app.receiver is not None
    peer = RawPeer(app.receiver.address[1])
    if case.associate:
        peer.associate()
        assert active(app) == 1
    case.send(peer, app)
    received = peer.read()
    assert received is not None, "the connection was closed without an answer"
    assert case.expect(received) == case.expected
    ends_in_order(app, caplog, peer, case.why)
    assert spool_files(app.spool.root) == []
    storescu_is_served(app, tmp_path)


def test_a_pdu_over_the_maximum_is_refused_while_the_peer_is_still_sending_it(
    make_gateway: Callable[..., Gateway], caplog: pytest.LogCaptureFixture, tmp_path: Path
) -> None:
    """A 5 MB P-DATA-TF against a 4 MB maximum, sent whole: the gateway aborts at the header and
    drops the rest, so the sender finishes sending and then reads the A-ABORT."""
    caplog.set_level(logging.WARNING)
    app = make_gateway(dicom={"max_pdu_size": MAX_PDU})
    assert app.receiver is not None
    peer = RawPeer(app.receiver.address[1]).associate()
    body = pdv(1, 0x00, bytes((5 << 20) - 6))
    sender = threading.Thread(target=peer.send, args=(pdu(0x04, body),), daemon=True)
    sender.start()
    received = peer.read()
    sender.join(10)
    assert received is not None and received.abort == (PROVIDER, INVALID_PARAMETER)
    ends_in_order(app, caplog, peer, "5242880 bytes")
    storescu_is_served(app, tmp_path)


def test_random_command_sets_end_with_an_answer_or_an_abort(
    make_gateway: Callable[..., Gateway], caplog: pytest.LogCaptureFixture
) -> None:
    """Any bytes as a command set: a DIMSE answer if they happen to make a request, else an
    A-ABORT; either way the association is counted out and incoming/ stays empty."""
    caplog.set_level(logging.WARNING)
    app = make_gateway()
    assert app.receiver is not None
    port = app.receiver.address[1]
    elements = st.lists(st.tuples(st.sampled_from([0x0000, 0x0002, 0x0100, 0x0110, 0x0120, 0x0700,
                                                   0x0800, 0x0900, 0x1000, 0x1234]),
                                  st.binary(max_size=70)), max_size=8)

    def structured(items: list[tuple[int, bytes]]) -> bytes:
        """Well-framed elements of group 0000 with arbitrary values (implicit VR LE)."""
        return b"".join(struct.pack("<HHI", 0, tag, len(value)) + value
                        for tag, value in sorted(items))

    @settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.binary(max_size=300), elements.map(structured)),
           st.sampled_from([1, 3]))
    def check(command_set: bytes, context_id: int) -> None:
        caplog.clear()
        peer = RawPeer(port).associate()
        peer.send(p_data(pdv(context_id, 0x03, command_set)))
        try:
            received = peer.read(timeout_s=2)
        except TimeoutError:  # a request whose data set the gateway now waits for: release
            peer.send(pdu(0x05, bytes(4)))
            received = peer.read()
            assert received is not None and received.kind in (0x06, 0x07), received
        assert received is not None, "the connection was closed without an answer"
        if received.kind == 0x07:
            assert received.abort in ((USER, 0x00), (PROVIDER, 0x00)), received
            peer.close()
            wait_for(lambda: active(app) == 0, 10, "the association was never counted out")
            assert len(warnings_about(caplog, peer.address)) == 1
        else:
            assert received.kind in (0x04, 0x06), received  # answered, or released
            peer.close()
            wait_for(lambda: active(app) == 0, 10, "the association was never counted out")
        wait_for(lambda: not list(app.spool.incoming.iterdir()), 10, "incoming/ is not empty")

    check()


# -- C-STORE requests that can be answered: answered, with why, and the association goes on -------

def _status(received: Received | None) -> tuple[int, str | None]:
    assert received is not None, "no answer"
    response = received.response()
    assert response.CommandField == 0x8001, response
    return int(response.Status), response.get("ErrorComment")


def test_no_data_set_said_but_one_sent_is_refused_and_the_association_goes_on(
    make_gateway: Callable[..., Gateway], sqlite_url: str
) -> None:
    app = make_gateway()
    assert app.receiver is not None
    ds = make_dataset()
    peer = RawPeer(app.receiver.address[1]).associate()
    peer.send(p_data(pdv(1, 0x03, c_store_rq(1, CT_IMAGE_STORAGE, ds.SOPInstanceUID, False))),
              p_data(pdv(1, 0x00, encode(ds)[:100])), p_data(pdv(1, 0x02, encode(ds)[100:])))
    status, comment = _status(peer.read())
    assert status == Status.CANNOT_UNDERSTAND
    assert comment and "no data set" in comment
    assert spool_files(app.spool.root) == []

    peer.send(p_data(pdv(1, 0x03, c_store_rq(2, CT_IMAGE_STORAGE, ds.SOPInstanceUID)),
                     pdv(1, 0x02, encode(ds))))
    assert _status(peer.read()) == (Status.SUCCESS, None)
    peer.send(pdu(0x05, bytes(4)))  # A-RELEASE-RQ
    released = peer.read()
    assert released is not None and released.kind == 0x06
    peer.close()
    assert [p.stem for p in spool_files(app.spool.root)] == [ds.SOPInstanceUID]
    assert len(rows(sqlite_url, "SELECT id FROM instances")) == 1
    wait_for(lambda: active(app) == 0, 10, "the association was never counted out")


NOT_STORAGE = ["31", "1.2.3.4", "abc", "", " ", "1.2.840.10008.1.1", "1.2.840.10008.5.1.4.1.2.2.1",
               "1." + "2" * 70, "1.2.3\\4", "1.2.840.10008.5.1.4.1.1.2.\u00e9"]


def test_a_c_store_of_a_sop_class_that_is_no_storage_class_is_refused_and_the_association_goes_on(
    make_gateway: Callable[..., Gateway], sqlite_url: str
) -> None:
    """The class of Affected SOP Class UIDs pynetdicom could not serve (it aborted): invalid
    ones, unknown ones (DCMTK's "31"), known non-storage ones; a table, then Hypothesis, all on
    one association, which must still store a good image at the end."""
    app = make_gateway()
    assert app.receiver is not None
    ds = make_dataset()
    data = encode(ds)
    peer = RawPeer(app.receiver.address[1]).associate()
    message_ids = iter(range(1, 1 << 16))

    def refused(sop_class: str) -> None:
        peer.send(p_data(pdv(1, 0x03, c_store_rq(next(message_ids), sop_class, ds.SOPInstanceUID))),
                  p_data(pdv(1, 0x02, data)))
        status, comment = _status(peer.read())
        assert status == Status.SOP_CLASS_NOT_SUPPORTED, (sop_class, hex(status))
        assert comment and "SOP Class" in comment and len(comment) <= 64

    for sop_class in NOT_STORAGE:
        refused(sop_class)

    from pynetdicom.service_class import StorageServiceClass
    from pynetdicom.sop_class import uid_to_service_class

    @settings(max_examples=50, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.one_of(st.text(max_size=70), st.from_regex(r"\A[0-9]{1,8}(\.[0-9]{1,8}){0,8}\Z")))
    def check(sop_class: str) -> None:
        if uid_to_service_class(sop_class.strip("\0 ")) is StorageServiceClass:
            return  # a storage class: taken as pynetdicom takes it (tested elsewhere)
        refused(sop_class)

    check()
    peer.send(p_data(pdv(1, 0x03, c_store_rq(next(message_ids), CT_IMAGE_STORAGE,
                                             ds.SOPInstanceUID)), pdv(1, 0x02, data)))
    assert _status(peer.read()) == (Status.SUCCESS, None)
    peer.close()
    assert [p.stem for p in spool_files(app.spool.root)] == [ds.SOPInstanceUID]
    wait_for(lambda: active(app) == 0, 10, "the association was never counted out")
    wait_for(lambda: not list(app.spool.incoming.iterdir()), 10, "incoming/ is not empty")


def test_an_invalid_affected_sop_instance_uid_is_refused_with_c001(
    make_gateway: Callable[..., Gateway]
) -> None:
    app = make_gateway()
    assert app.receiver is not None
    ds = make_dataset()
    peer = RawPeer(app.receiver.address[1]).associate()
    for sop_instance in ["", "1.2.abc", "1." + "2" * 70]:
        peer.send(p_data(pdv(1, 0x03, c_store_rq(1, CT_IMAGE_STORAGE, sop_instance)),
                         pdv(1, 0x02, encode(ds))))
        status, comment = _status(peer.read())
        assert status == Status.INVALID_UID
        assert comment and "Affected SOP Instance UID" in comment
    peer.close()
    assert spool_files(app.spool.root) == []


@pytest.mark.parametrize("slow_accept", [False, True], ids=["at-once", "slow-accept"])
def test_dcmsend_of_rt_doses_encoded_as_un_is_refused_per_image_not_aborted(
    make_gateway: Callable[..., Gateway], tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
    slow_accept: bool,
) -> None:
    """pydicom's RLE RT Dose files carry their UIDs with VR UN; DCMTK reads "31" from those bytes
    (the hex of their first character) and proposes RT Dose Storage, then sends C-STORE-RQs
    whose Affected SOP Class and Instance UIDs are both "31". Each is refused with 0x0122 and
    an Error Comment (which ``dcmsend -d`` prints), and the next file on the association is
    stored. ``slow-accept``: pynetdicom's association thread marks the association established
    only 0.3 s after the A-ASSOCIATE-AC went out (as a loaded machine may), so the first
    C-STORE-RQ is read before it; it was handed to pynetdicom then, which aborted."""
    if slow_accept:
        sent = ACSE.send_accept

        def send_accept_then_pause(acse: ACSE) -> None:
            sent(acse)
            time.sleep(0.3)

        monkeypatch.setattr(ACSE, "send_accept", send_accept_then_pause)
    app = make_gateway()
    assert app.receiver is not None
    ct = write_file(make_dataset(), tmp_path / "ct.dcm")
    doses = [get_testdata_file(name) for name in ("rtdose_rle.dcm", "rtdose_rle_1frame.dcm")]
    result = dcmtk("dcmsend", "-d", "-aet", "DCMSEND", "-aec", "GATEWAY", "127.0.0.1",
                   str(app.receiver.address[1]), *map(str, doses), str(ct))
    output = result.stdout + result.stderr
    assert "Abstract Syntax: =RTDoseStorage" in output  # what dcmsend proposes
    assert "Affected SOP Class UID        : 31" in output  # and what it sends
    assert output.count("DIMSE Status                  : 0x0122") == 2, output[-3000:]
    assert output.count("ErrorComment") == 2
    assert "Peer aborted" not in output
    assert "with status SUCCESS  : 1" in output
    assert len(spool_files(app.spool.root)) == 1
    wait_for(lambda: active(app) == 0, 10, "the association was never counted out")


def test_a_c_store_on_another_storage_class_context_is_still_taken(
    make_gateway: Callable[..., Gateway]
) -> None:
    """An MR image on the CT context: pynetdicom took it (SOP Class Common Extended Negotiation
    allows related classes, PS3.7 D.3.11), and so does the streamed path."""
    app = make_gateway()
    assert app.receiver is not None
    ds = make_dataset(SOPClassUID=MR_IMAGE_STORAGE, Modality="MR")
    peer = RawPeer(app.receiver.address[1]).associate()
    peer.send(p_data(pdv(1, 0x03, c_store_rq(1, MR_IMAGE_STORAGE, ds.SOPInstanceUID)),
                     pdv(1, 0x02, encode(ds))))
    assert _status(peer.read()) == (Status.SUCCESS, None)
    peer.close()
    [kept] = spool_files(app.spool.root)
    assert kept.stem == ds.SOPInstanceUID


def test_a_peer_that_sends_nothing_after_the_abort_is_closed_and_its_thread_ends(
    make_gateway: Callable[..., Gateway],
) -> None:
    """After the A-ABORT the gateway closes the connection itself (no reset loses the A-ABORT)
    and no thread of the association outlives it."""
    app = make_gateway()
    assert app.receiver is not None
    before = threading.active_count()
    peer = RawPeer(app.receiver.address[1]).associate()
    peer.send(pdu(0x09, bytes(4)))
    received = peer.read()
    assert received is not None and received.kind == 0x07
    assert peer.read() is None  # closed by the gateway, the peer still connected
    wait_for(lambda: active(app) == 0, 10, "the association was never counted out")
    wait_for(lambda: threading.active_count() <= before, 10, "a thread outlived the association")
    peer.close()


@pytest.mark.parametrize("error, expected", [
    (ValueError("a value ingest did not expect"), Status.CANNOT_UNDERSTAND),
    (KeyError("SOPInstanceUID"), Status.CANNOT_UNDERSTAND),
    (AttributeError("'NoneType' object has no attribute 'value'"), Status.CANNOT_UNDERSTAND),
    (OSError(errno.EIO, "Input/output error"), Status.OUT_OF_RESOURCES),
    (OperationalError("INSERT", {}, Exception("server closed the connection")),
     Status.OUT_OF_RESOURCES),
], ids=["ValueError", "KeyError", "AttributeError", "OSError", "OperationalError"])
def test_a_fault_of_ours_is_answered_retry_later_only_when_retrying_can_help(
    make_gateway: Callable[..., Gateway], monkeypatch: pytest.MonkeyPatch, error: Exception,
    expected: Status,
) -> None:
    """An exception ingest did not classify: 0xA700 ("retry later") for a disk, memory or
    database failure; anything else would meet every retry again, so 0xC000. Both say why, and
    the association goes on."""
    app = make_gateway()
    assert app.receiver is not None
    ingest = app.receiver._ingest
    real = ingest.store
    monkeypatch.setattr(ingest, "store", lambda request: (_ for _ in ()).throw(error))
    ds = make_dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = UID(EXPLICIT_LE)
    ae = AE(ae_title="MODALITY")
    ae.add_requested_context(CT_IMAGE_STORAGE, EXPLICIT_LE)
    assoc = ae.associate("127.0.0.1", app.receiver.address[1], ae_title="GATEWAY")
    assert assoc.is_established
    try:
        answer = assoc.send_c_store(ds)
        assert int(answer.Status) == expected
        assert type(error).__name__ in answer.ErrorComment and len(answer.ErrorComment) <= 64
        monkeypatch.setattr(ingest, "store", real)
        assert int(assoc.send_c_store(ds).Status) == Status.SUCCESS
    finally:
        assoc.release()
