"""HL7 v2 order intake over MLLP: a real client on a socket against the real gateway, on both
databases; ACK codes and ERR locations on the wire, orders, audit rows and hl7_messages rows in
the database, and no patient value in the log."""

from __future__ import annotations

import json
import logging
import socket
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import hl7
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session

from gateway.app import Gateway
from gateway.config import GatewayConfig
from gateway.db.models import AuditEvent, Hl7Message, Order
from gateway.worklist.mllp import Deframer
from tests.conftest import config_dict, free_port, port_open, wait_for

START, END = b"\x0b", b"\x1c\x0d"


# --- messages ----------------------------------------------------------------------------------


def segment(name: str, fields: dict[int, str]) -> str:
    return "|".join([name, *(fields.get(i, "") for i in range(1, max(fields) + 1))])


def msh(control_id: str, message_type: str = "ORM^O01", version: str = "2.3.1",
        charset: str = "UNICODE UTF-8") -> str:
    fields = {2: "^~\\&", 3: "RIS", 4: "HOSP", 5: "GATEWAY", 6: "HOSP", 7: "20260101120000",
              9: message_type, 10: control_id, 11: "P", 12: version, 18: charset}
    return "MSH|" + "|".join(fields.get(i, "") for i in range(2, 19))


def pid(patient_id: str = "PAT-4711^^^HOSP^MR", name: str = "MÜLLER^JÖRG") -> str:
    return segment("PID", {1: "1", 3: patient_id, 5: name, 7: "19700101", 8: "M"})


PV1 = segment("PV1", {1: "1", 2: "O", 8: "D123^REFERRER^RITA"})


def order_group(control: str, accession: str, start: str = "202601021030",
                modality: str = "CT", sequence: int = 1) -> list[str]:
    return [
        segment("ORC", {1: control, 2: f"P-{accession}", 3: f"F-{accession}", 5: "SC"}),
        segment("OBR", {1: str(sequence), 2: f"P-{accession}", 3: f"F-{accession}",
                        4: "CTHEAD^CT Head^L", 18: accession, 19: f"RP-{accession}",
                        24: modality, 27: f"^^^{start}", 34: "T1&TECHNIKER&TOM"}),
        segment("ZDS", {1: f"1.2.826.0.1.3680043.2.1125.{sequence}^^Application^DICOM"}),
    ]


def orm(control: str = "NW", control_id: str = "C1", accession: str = "ACC1", *,
        name: str = "MÜLLER^JÖRG", patient_id: str = "PAT-4711^^^HOSP^MR",
        start: str = "202601021030", charset: str = "UNICODE UTF-8",
        message_type: str = "ORM^O01", modality: str = "CT") -> str:
    return "\r".join([msh(control_id, message_type, "2.3.1", charset), pid(patient_id, name), PV1,
                      *order_group(control, accession, start, modality)]) + "\r"


def omi(control_id: str = "O1", accession: str = "ACC9",
        steps: tuple[str, ...] = ("SPS1", "SPS2")) -> str:
    ipcs = [segment("IPC", {1: accession, 2: "RP9", 3: "1.2.826.0.1.3680043.2.1125.9",
                            4: step, 5: "MR", 6: f"PROT{i}^Protocol {i}", 7: "MR3T",
                            9: "MR_3T"}) for i, step in enumerate(steps, 1)]
    return "\r".join([
        msh(control_id, "OMI^O23^OMI_O23", "2.5"), pid(), PV1,
        segment("ORC", {1: "NW", 2: "P9", 3: "F9"}),
        segment("TQ1", {1: "1", 7: "20260105143000"}),
        segment("OBR", {1: "1", 2: "P9", 3: "F9", 4: "MRBRAIN^MR Brain^L"}),
        *ipcs]) + "\r"


# --- an MLLP client ----------------------------------------------------------------------------


@dataclass
class Ack:
    code: str
    control_id: str
    error_location: str | None
    error_code: str | None
    text: str
    message: Any


class Client:
    """A plain-socket MLLP client, as a RIS interface engine would be."""

    def __init__(self, port: int) -> None:
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=20)
        self._buffer = b""

    def close(self) -> None:
        self.sock.close()

    def send_raw(self, data: bytes) -> None:
        self.sock.sendall(data)

    def reply(self, codec: str = "utf-8") -> Ack:
        while END not in self._buffer:
            chunk = self.sock.recv(65536)
            assert chunk, "connection closed without an ACK"
            self._buffer += chunk
        block, _, self._buffer = self._buffer.partition(END)
        assert block.startswith(START)
        message = hl7.parse(block[1:].decode(codec))
        err = message.segments("ERR")[0] if any(str(s[0]) == "ERR" for s in message) else None
        return Ack(code=message["MSA.F1"], control_id=message["MSA.F2"],
                   error_location=str(err(2)) if err else None,
                   error_code=message["ERR.F3.R1.C1"] if err else None,
                   text=message["MSA.F3"], message=message)

    def send(self, message: str | bytes, codec: str = "utf-8") -> Ack:
        data = message.encode(codec) if isinstance(message, str) else message
        self.send_raw(START + data + END)
        return self.reply(codec)


@pytest.fixture
def hl7_gateway(make_gateway: Callable[..., Gateway], db_url: str) -> Callable[..., Gateway]:
    def start(**hl7_options: Any) -> Gateway:
        options = {"enabled": True, "bind_host": "127.0.0.1", "port": free_port(), **hl7_options}
        return make_gateway(db=db_url, hl7=options)
    return start


@pytest.fixture
def client(hl7_gateway: Callable[..., Gateway]) -> Iterator[Client]:
    app = hl7_gateway()
    assert app.hl7 is not None
    c = Client(app.hl7.port)
    yield c
    c.close()


def select_all(db_url: str, statement: Any) -> list[Any]:
    engine = sa.create_engine(db_url)
    try:
        with Session(engine) as s:
            return list(s.scalars(statement))
    finally:
        engine.dispose()


def orders(db_url: str) -> dict[str, Order]:
    return {o.accession_number: o for o in select_all(db_url, sa.select(Order))}


def audit_rows(db_url: str) -> list[AuditEvent]:
    return select_all(db_url, sa.select(AuditEvent).order_by(AuditEvent.id))


def messages(db_url: str) -> list[Hl7Message]:
    return select_all(db_url, sa.select(Hl7Message).order_by(Hl7Message.id))


# --- order control: NW, XO, CA, DC -------------------------------------------------------------


def test_new_order_twice_is_one_order_with_every_field_mapped(client: Client, db_url: str) -> None:
    first = client.send(orm())
    again = client.send(orm())  # a resend, as after a lost ACK
    assert (first.code, first.control_id) == ("AA", "C1")
    assert (again.code, again.control_id) == ("AA", "C1")
    assert first.message["MSH.F9.R1.C1"] == "ACK"
    assert first.message["MSH.F3"] == "GATEWAY" and first.message["MSH.F5"] == "RIS"
    stored = orders(db_url)
    assert list(stored) == ["ACC1"]
    order = stored["ACC1"]
    assert (order.mrn, order.issuer_of_patient_id) == ("PAT-4711", "HOSP")
    assert order.patient_name == "MÜLLER^JÖRG"
    assert (order.birth_date, order.sex, order.modality) == ("19700101", "M", "CT")
    assert order.scheduled_at == datetime(2026, 1, 2, 10, 30)
    assert order.referring_physician == "REFERRER^RITA"
    assert order.performing_physician == "TECHNIKER^TOM"
    assert (order.placer_order_number, order.filler_order_number) == ("P-ACC1", "F-ACC1")
    assert order.requested_procedure_id == "RP-ACC1"
    assert order.requested_procedure_description == "CT Head"
    assert order.study_instance_uid == "1.2.826.0.1.3680043.2.1125.1"
    assert order.status == "scheduled"
    rows = audit_rows(db_url)
    assert [(r.actor, r.action) for r in rows] == [("hl7:RIS", "order_added")]
    detail = json.loads(rows[0].detail)
    assert detail["accession_number"] == "ACC1" and detail["control_id"] == "C1"
    kept = messages(db_url)
    assert [(m.message_type, m.control_id, m.ack_code) for m in kept] == [
        ("ORM^O01", "C1", "AA")] * 2
    assert kept[0].raw == orm() and kept[0].accession_number == "ACC1" and kept[0].peer


@pytest.mark.parametrize("charset,codec", [("UNICODE UTF-8", "utf-8"), ("8859/1", "iso8859-1")])
def test_change_reschedules_and_renames_in_its_character_set(
    client: Client, db_url: str, charset: str, codec: str
) -> None:
    assert client.send(orm(charset=charset), codec).code == "AA"
    changed = orm("XO", "C2", name="ÅSTRÖM^BJÖRN^^^DR", start="202601031415", charset=charset)
    ack = client.send(changed, codec)
    assert (ack.code, ack.control_id) == ("AA", "C2")
    assert ack.message["MSH.F18"] == charset  # answered in the set it was asked in
    order = orders(db_url)["ACC1"]
    assert order.patient_name == "ÅSTRÖM^BJÖRN^^DR"  # XPN prefix -> PN prefix (4th component)
    assert order.scheduled_at == datetime(2026, 1, 3, 14, 15)
    update = audit_rows(db_url)[-1]
    assert update.action == "order_updated"
    changes = json.loads(update.detail)["changes"]
    assert set(changes) == {"patient_name", "scheduled_at"}
    assert changes["patient_name"] == ["MÜLLER^JÖRG", "ÅSTRÖM^BJÖRN^^DR"]
    assert messages(db_url)[-1].raw == changed  # decoded as declared, kept in full


def test_change_keeps_what_it_does_not_send_and_clears_hl7_nulls(client: Client,
                                                                   db_url: str) -> None:
    assert client.send(orm()).code == "AA"
    sparse = orm("XO", "C2").replace("|19700101|", '|""|').replace("D123^REFERRER^RITA", "")
    assert client.send(sparse).code == "AA"
    order = orders(db_url)["ACC1"]
    assert order.birth_date is None  # "" (HL7 null): delete the value
    assert order.referring_physician == "REFERRER^RITA"  # not sent: kept


def test_cancel_and_discontinue_are_idempotent_and_unknown_orders_are_named(
    client: Client, db_url: str
) -> None:
    assert client.send(orm(accession="ACC1", control_id="C1")).code == "AA"
    assert client.send(orm(accession="ACC2", control_id="C2")).code == "AA"
    assert client.send(orm("CA", "C3", accession="ACC1")).code == "AA"
    assert client.send(orm("DC", "C4", accession="ACC2")).code == "AA"
    assert client.send(orm("CA", "C5", accession="ACC1")).code == "AA"  # again: unchanged
    stored = orders(db_url)
    assert (stored["ACC1"].status, stored["ACC2"].status) == ("cancelled", "discontinued")
    actions = [r.action for r in audit_rows(db_url)]
    assert actions == ["order_added", "order_added", "order_cancelled", "order_discontinued"]
    unknown = client.send(orm("CA", "C6", accession="ACC404"))
    assert (unknown.code, unknown.error_location, unknown.error_code) == ("AE", "OBR^1^18", "204")
    changed = client.send(orm("XO", "C7", accession="ACC1", start="202602020800"))
    assert changed.code == "AE" and changed.error_location == "ORC^1^1"  # cancelled: no change
    assert orders(db_url)["ACC1"].scheduled_at == datetime(2026, 1, 2, 10, 30)


def test_new_order_with_other_values_for_a_known_accession_is_refused(client: Client,
                                                                      db_url: str) -> None:
    assert client.send(orm()).code == "AA"
    ack = client.send(orm(control_id="C2", start="202603030303"))
    assert (ack.code, ack.error_location, ack.error_code) == ("AE", "OBR^1^18", "205")
    assert orders(db_url)["ACC1"].scheduled_at == datetime(2026, 1, 2, 10, 30)


def test_imaging_order_with_two_steps(client: Client, db_url: str) -> None:
    ack = client.send(omi())
    assert (ack.code, ack.control_id) == ("AA", "O1")
    assert ack.message["MSH.F9.R1.C2"] == "O23"
    order = orders(db_url)["ACC9"]
    assert (order.modality, order.scheduled_station_ae, order.scheduled_station_name) == (
        "MR", "MR_3T", "MR3T")
    assert order.study_instance_uid == "1.2.826.0.1.3680043.2.1125.9"
    assert order.requested_procedure_id == "RP9"
    assert order.scheduled_at == datetime(2026, 1, 5, 14, 30)
    assert order.procedure_steps is not None
    steps = json.loads(order.procedure_steps)
    assert [(s["step_id"], s["description"], s["modality"], s["station_ae"]) for s in steps] == [
        ("SPS1", "Protocol 1", "MR", "MR_3T"), ("SPS2", "Protocol 2", "MR", "MR_3T")]
    assert all(s["start"] == "2026-01-05T14:30:00" for s in steps)


# --- errors: AE names the field, AR rejects, nothing half-stored -------------------------------


@pytest.mark.parametrize("message,location,code", [
    (orm(patient_id=""), "PID^1^3", "101"),
    (orm(modality=""), "OBR^1^24", "101"),
    (orm(start=""), "OBR^1^27", "101"),
    (orm(start="2026-01-02"), "OBR^1^27", "102"),
    (orm(accession=""), "OBR^1^18", "101"),
    (orm(accession="ACC-TOO-LONG-FOR-SH"), "OBR^1^18", "102"),
    (orm("ZZ"), "ORC^1^1", "103"),
    (orm(modality="C-T"), "OBR^1^24", "102"),
    (omi(steps=("SPS1", "")), "IPC^2^4", "101"),
    (omi(steps=("SPS1", "SPS1")), "IPC^2^4", "205"),
    (orm(name="MÜL\x00LER^JÖRG"), "PID^1^5", "102"),
], ids=["no-patient-id", "no-modality", "no-start", "bad-start", "no-accession",
        "long-accession", "unknown-order-control", "bad-modality", "step-without-id",
        "duplicate-step", "nul-in-name"])
def test_content_errors_are_AE_naming_the_field_and_store_nothing(
    client: Client, db_url: str, message: str, location: str, code: str
) -> None:
    ack = client.send(message)
    assert (ack.code, ack.error_location, ack.error_code) == ("AE", location, code)
    assert ack.control_id in ("C1", "O1")
    assert orders(db_url) == {} and audit_rows(db_url) == []
    kept = messages(db_url)
    assert [(m.ack_code, m.raw) for m in kept] == [("AE", message.replace("\x00", "\\X00\\"))]
    assert kept[0].error is not None and kept[0].error.startswith(location)
    if "ACC1" in message:  # the refused message can be found by its order's accession
        assert kept[0].accession_number == "ACC1"


def test_a_bad_second_order_leaves_the_first_unstored(client: Client, db_url: str) -> None:
    def message(modality: str) -> str:
        return "\r".join([msh("C1"), pid(), PV1, *order_group("NW", "ACC5"),
                           *order_group("NW", "ACC6", modality=modality, sequence=2)]) + "\r"

    ack = client.send(message(""))
    assert (ack.code, ack.error_location) == ("AE", "OBR^2^24")
    assert orders(db_url) == {} and audit_rows(db_url) == []
    assert client.send(message("MR")).code == "AA"  # corrected and sent again: both
    assert {a: o.modality for a, o in orders(db_url).items()} == {"ACC5": "CT", "ACC6": "MR"}


@pytest.mark.parametrize("data,location,code", [
    (b"garbage, not HL7", "MSH^1", "100"),
    (b"PID|1||PAT-4711", "MSH^1", "100"),
    (orm().replace("MSH|^~\\&|", "MSH|^~|").encode(), "MSH^1^2", "102"),
    (orm(message_type="ADT^A01").encode(), "MSH^1^9", "200"),
    (orm(message_type="ORM^O02").encode(), "MSH^1^9", "201"),
    (orm(control_id="").encode(), "MSH^1^10", "101"),
    (orm(charset="EBCDIC").encode(), "MSH^1^18", "103"),
], ids=["garbage", "no-msh", "bad-msh-2", "adt", "unknown-trigger", "no-control-id",
        "unknown-charset"])
def test_rejections_are_AR_and_kept(client: Client, db_url: str, data: bytes, location: str,
                                    code: str) -> None:
    ack = client.send(data)
    assert (ack.code, ack.error_location, ack.error_code) == ("AR", location, code)
    assert orders(db_url) == {}
    assert [m.ack_code for m in messages(db_url)] == ["AR"]
    assert client.send(orm()).code == "AA"  # the connection goes on


def test_bytes_invalid_in_the_declared_set_are_AE(client: Client, db_url: str) -> None:
    ack = client.send(orm(charset="UNICODE UTF-8").encode("latin-1"))
    assert (ack.code, ack.error_location) == ("AE", "MSH^1^18")
    assert orders(db_url) == {}
    assert "MÜLLER" in messages(db_url)[0].raw  # kept as Latin-1, which reads every byte


def test_a_message_over_the_limit_is_AR_and_the_connection_goes_on(
    hl7_gateway: Callable[..., Gateway], db_url: str
) -> None:
    app = hl7_gateway(max_message_bytes=1024)
    assert app.hl7 is not None
    c = Client(app.hl7.port)
    big = orm() + segment("NTE", {1: "1", 3: "x" * 5000}) + "\r"
    ack = c.send(big)
    assert (ack.code, ack.control_id) == ("AR", "C1")
    assert "max_message_bytes" in ack.text
    kept = messages(db_url)
    assert kept[0].ack_code == "AR" and len(kept[0].raw) <= 1024
    assert orders(db_url) == {}
    assert c.send(orm(control_id="C2")).code == "AA"
    c.close()


# --- the listener ------------------------------------------------------------------------------


def test_two_connections_at_once_and_pipelined_messages_in_order(
    hl7_gateway: Callable[..., Gateway], db_url: str
) -> None:
    app = hl7_gateway()
    assert app.hl7 is not None
    a, b = Client(app.hl7.port), Client(app.hl7.port)
    half = orm(accession="ACC-A", control_id="A1").encode()
    a.send_raw(START + half[:100])  # A stops mid-message ...
    assert b.send(orm(accession="ACC-B", control_id="B1")).code == "AA"  # ... B is served
    a.send_raw(half[100:] + END)
    assert (a.reply().code, "A1") == ("AA", "A1")
    # two messages in one write, and a CR LF between frames: two ACKs, in order
    a.send_raw(b"".join(START + orm(accession=f"ACC-{i}", control_id=f"P{i}").encode() + END
                        + b"\r\n" for i in (1, 2)))
    assert [a.reply().control_id, a.reply().control_id] == ["P1", "P2"]
    assert set(orders(db_url)) == {"ACC-A", "ACC-B", "ACC-1", "ACC-2"}
    a.close()
    b.close()


def test_stop_closes_idle_connections_and_the_port(tmp_path: Path, sqlite_url: str) -> None:
    port = free_port()
    data = config_dict(tmp_path, sqlite_url, free_port(),
                       hl7={"enabled": True, "bind_host": "127.0.0.1", "port": port})
    app = Gateway(GatewayConfig.model_validate(data), CollectorRegistry())
    app.start()
    c = Client(port)
    assert c.send(orm()).code == "AA"
    began = time.monotonic()
    app.stop()
    assert time.monotonic() - began < 5
    assert c.sock.recv(10) == b""  # closed by the gateway
    assert not port_open(port)
    c.close()


def test_off_unless_enabled(make_gateway: Callable[..., Gateway]) -> None:
    assert GatewayConfig().hl7.enabled is False
    assert make_gateway().hl7 is None


# --- logs and metrics --------------------------------------------------------------------------

PATIENT_VALUES = ["MÜLLER", "JÖRG", "ÅSTRÖM", "PAT-4711", "ACC1", "19700101", "REFERRER",
                  "TECHNIKER", "ACC404", "SECRET-NAME"]


def test_the_log_holds_no_patient_value(client: Client, caplog: pytest.LogCaptureFixture,
                                        db_url: str) -> None:
    caplog.set_level(logging.DEBUG)
    client.send(orm())
    client.send(orm("XO", "C2", name="ÅSTRÖM^BJÖRN"))
    client.send(orm(patient_id=""))
    client.send(orm("CA", "C3", accession="ACC404"))
    client.send(orm(start="SECRET-NAME"))
    client.send(b"SECRET-NAME garbage")
    client.send(orm().replace("MÜLLER", "MÜLLER\\Zxx\\\\\\"))  # escapes python-hl7 cannot read
    client.close()
    wait_for(lambda: "closed after" in caplog.text, 10, "the connection's last log line")
    assert "hl7 ORM^O01 control 'C1'" in caplog.text  # the log does say what happened
    for value in PATIENT_VALUES:
        assert value not in caplog.text, value
    assert len(messages(db_url)) == 7


def test_metrics_count_messages_by_type_and_outcome(hl7_gateway: Callable[..., Gateway]) -> None:
    app = hl7_gateway()
    assert app.hl7 is not None
    c = Client(app.hl7.port)
    for message in (orm(), orm(control_id="C2"), omi(), orm(patient_id="", accession="X"),
                    orm(message_type="ADT^A01"), "garbage"):
        c.send(message)
    c.close()

    def count(message_type: str, ack: str) -> float:
        value = app.metrics.registry.get_sample_value(
            "gateway_hl7_messages_total", {"message_type": message_type, "ack_code": ack})
        return value or 0.0

    assert count("ORM^O01", "AA") == 2 and count("OMI^O23", "AA") == 1
    assert count("ORM^O01", "AE") == 1 and count("other", "AR") == 1
    assert count("unknown", "AR") == 1


# --- classes of input --------------------------------------------------------------------------

FIELD = st.text(st.characters(codec="utf-8", exclude_characters="\x0b\x1c"), max_size=24)


def test_any_field_content_gets_an_ack_and_stores_nothing_unless_accepted(
    hl7_gateway: Callable[..., Gateway], db_url: str
) -> None:
    """Random text (separators, escapes, CR, LF, any script) in the fields an order is read from:
    always one ACK for the message's control ID; only AA stores an order."""
    app = hl7_gateway()
    assert app.hl7 is not None
    c = Client(app.hl7.port)
    sent = [0]

    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(control=st.one_of(st.sampled_from(["NW", "XO", "CA", "DC"]), FIELD),
           patient_id=FIELD, name=FIELD, start=st.one_of(st.just("202601021030"), FIELD),
           modality=st.one_of(st.just("CT"), FIELD), accession=FIELD)
    def check(control: str, patient_id: str, name: str, start: str, modality: str,
              accession: str) -> None:
        before = orders(db_url)
        sent[0] += 1
        message = orm(control, f"H{sent[0]}", accession, name=name, patient_id=patient_id,
                      start=start, modality=modality)
        ack = c.send(message)
        assert ack.control_id == f"H{sent[0]}"
        assert ack.code in ("AA", "AE", "AR")
        if ack.code != "AA":
            assert orders(db_url).keys() == before.keys()

    check()
    assert len(messages(db_url)) == sent[0]
    c.close()


def test_any_bytes_get_an_ack_naming_what_is_wrong(hl7_gateway: Callable[..., Gateway],
                                                   db_url: str) -> None:
    """Bytes that are not HL7 (or barely: an MSH and noise) are rejected with a reason, never
    with the internal-error code 207, which would mean the reading itself failed."""
    app = hl7_gateway()
    assert app.hl7 is not None
    c = Client(app.hl7.port)
    sent = [0]
    noise = st.binary(max_size=200).map(lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b""))

    @settings(max_examples=60, deadline=None,
              suppress_health_check=[HealthCheck.function_scoped_fixture])
    @given(data=st.one_of(noise, noise.map(lambda b: b"MSH" + b),
                          noise.map(lambda b: b"MSH|^~\\&|" + b)))
    def check(data: bytes) -> None:
        sent[0] += 1
        ack = c.send(data, "latin-1")
        assert ack.code in ("AE", "AR")
        assert ack.error_code != "207"

    check()
    assert orders(db_url) == {}
    assert len(messages(db_url)) == sent[0]
    c.close()


def test_control_characters_outside_fields_are_kept_readable(client: Client,
                                                             db_url: str) -> None:
    ack = client.send(orm(control_id="C\x00\x07"))
    assert ack.code == "AA"
    assert messages(db_url)[0].control_id == "C??"


@settings(max_examples=200)
@given(frames=st.lists(st.binary(max_size=300).map(
           lambda b: b.replace(b"\x0b", b"").replace(b"\x1c", b"")), max_size=5),
       cuts=st.lists(st.integers(min_value=0, max_value=2000), max_size=8),
       limit=st.integers(min_value=1, max_value=400))
def test_deframing_does_not_depend_on_how_the_bytes_arrive(
    frames: list[bytes], cuts: list[int], limit: int
) -> None:
    stream = b"\r\n".join(START + f + END for f in frames)
    pieces, last = [], 0
    for cut in sorted(c for c in cuts if c <= len(stream)):
        pieces.append(stream[last:cut])
        last = cut
    pieces.append(stream[last:])
    deframer = Deframer(limit)
    got = [frame for piece in pieces for frame in deframer.feed(piece)]
    assert got == [(f[:limit], len(f)) for f in frames]


def test_a_bad_hl7_setting_is_named_with_its_fix(tmp_path: Path) -> None:
    from gateway.config import load
    from gateway.errors import ConfigError

    path = tmp_path / "g.toml"
    path.write_text('[hl7]\nenabled = true\ndefault_charset = "EBCDIC"\n'
                    'accession_field = "OBR-99"\nsending_application = "A|B"\n')
    with pytest.raises(ConfigError) as error:
        load(path, environ={})
    text = "\n".join(error.value.problems)
    assert "hl7.default_charset = 'EBCDIC'" in text and "UNICODE UTF-8" in text
    assert "hl7.accession_field = 'OBR-99'" in text
    assert "hl7.sending_application" in text


@pytest.mark.parametrize("fields,column,expected", [
    ({"PID": {3: "X1^^^OTHER^PI~PAT-1^^^HOSP^MR"}}, "mrn", "PAT-1"),
    ({"PID": {3: "X1^^^OTHER^PI~PAT-1^^^HOSP^MR"}}, "issuer_of_patient_id", "HOSP"),
    ({"PID": {3: "PAT-2^^^HOSP&1.2.3&ISO"}}, "issuer_of_patient_id", "HOSP"),
    ({"PID": {5: "ALIAS^AL^^^^^A~SMITH^JOHN^Q^JR^DR^^L"}}, "patient_name", "SMITH^JOHN^Q^DR^JR"),
    ({"PID": {5: "O\\S\\BRIEN^SEÁN"}}, "patient_name", "O BRIEN^SEÁN"),
    ({"PID": {5: "VAN DER BERG&VAN DER&BERG^ANNA"}}, "patient_name", "VAN DER BERG^ANNA"),
    ({"PID": {7: "19700101120000"}}, "birth_date", "19700101"),
    ({"PID": {8: "U"}}, "sex", None),
    ({"PID": {8: "A"}}, "sex", "O"),
    ({"OBR": {24: "RAD"}}, "modality", "CR"),
    ({"OBR": {27: "", 36: "202601021030"}}, "scheduled_at", datetime(2026, 1, 2, 10, 30)),
    ({"ORC": {7: "^^^202601021030"}, "OBR": {27: ""}}, "scheduled_at",
     datetime(2026, 1, 2, 10, 30)),
    ({"OBR": {27: "^^^202601021030+0100"}}, "scheduled_at",
     datetime(2026, 1, 2, 9, 30, tzinfo=UTC).astimezone().replace(tzinfo=None)),
    ({"OBR": {4: "CODE^" + "D" * 70}}, "requested_procedure_description", "D" * 64),
    ({"OBR": {34: "T1&NURSE&NORA&&&SR"}}, "performing_physician", "NURSE^NORA^^SR"),
], ids=lambda v: str(v)[:40] if not isinstance(v, dict) else None)
def test_field_mapping(fields: dict[str, dict[int, str]], column: str, expected: Any) -> None:
    """order_requests on one ORM^O01 whose segments are changed by ``fields``."""
    from gateway.config import Hl7Config
    from gateway.worklist.hl7 import order_requests

    base = {
        "PID": {1: "1", 3: "PAT-4711^^^HOSP^MR", 5: "DOE^JANE", 7: "19700101", 8: "F"},
        "ORC": {1: "NW", 2: "P1", 3: "F1"},
        "OBR": {1: "1", 4: "CTHEAD^CT Head", 18: "ACC1", 24: "CT", 27: "^^^202601021030"},
    }
    segments = [msh("M1")] + [segment(name, {**values, **fields.get(name, {})})
                              for name, values in base.items()]
    [request] = order_requests(hl7.parse("\r".join(segments)), Hl7Config())
    assert request.sent(column) == expected


@pytest.mark.parametrize("pieces,frames,skipped", [
    ([b"\x0bAB\x1c\r"], [(b"AB", 2)], 0),
    ([b"\r\n\x0bAB\x1c", b"\r"], [(b"AB", 2)], 2),  # bytes between frames, <EB> then <CR> later
    ([b"\x0bA\x1cB\x1c\r"], [(b"A\x1cB", 3)], 0),  # a lone <EB> is data
    ([b"\x0bA\x1c", b"B\x1c\r"], [(b"A\x1cB", 3)], 0),
    ([b"\x0bHALF", b"\x0bAB\x1c\r"], [(b"AB", 2)], 4),  # a new start drops the partial message
    ([b"\x0b" + b"x" * 10 + b"\x1c\r"], [(b"x" * 4, 10)], 0),  # over the limit: head and size
], ids=["one", "stray-bytes-and-split-end", "lone-eb", "lone-eb-split", "restart", "too-long"])
def test_deframer_cases(pieces: list[bytes], frames: list[tuple[bytes, int]],
                        skipped: int) -> None:
    deframer = Deframer(4 if frames and frames[0][1] == 10 else 100)
    assert [f for piece in pieces for f in deframer.feed(piece)] == frames
    assert deframer.skipped == skipped


def test_stop_lets_a_message_being_handled_finish_and_answer() -> None:
    """The listener alone, with a handler that takes its time: stop() waits for the answer."""
    import threading

    from gateway.worklist.hl7 import Received
    from gateway.worklist.mllp import MllpListener

    handling = threading.Event()

    def slow(received: Received) -> bytes:
        handling.set()
        time.sleep(0.5)
        return b"ACK " + received.data

    listener = MllpListener("127.0.0.1", 0, 1024, 2, slow, grace_s=5)
    listener.start()
    c = Client(listener.port)
    c.send_raw(START + b"one" + END)
    assert handling.wait(5)
    stopper = threading.Thread(target=listener.stop)
    stopper.start()
    reply = b""
    while not reply.endswith(END):
        chunk = c.sock.recv(100)
        assert chunk, "closed before the answer"
        reply += chunk
    assert reply == START + b"ACK one" + END
    assert c.sock.recv(10) == b""
    stopper.join(10)
    assert not stopper.is_alive() and not port_open(listener.port)
    c.close()


def test_connections_over_the_limit_are_closed() -> None:
    from gateway.worklist.hl7 import Received
    from gateway.worklist.mllp import MllpListener

    def echo(received: Received) -> bytes:
        return received.data

    listener = MllpListener("127.0.0.1", 0, 1024, 2, echo, grace_s=1)
    listener.start()
    try:
        first, second = Client(listener.port), Client(listener.port)
        for c in (first, second):
            c.send_raw(START + b"hi" + END)
            c.sock.recv(10)  # served: both are open now
        third = Client(listener.port)
        assert third.sock.recv(10) == b""  # closed at once
        second.send_raw(START + b"again" + END)
        assert second.sock.recv(20) == START + b"again" + END
        for c in (first, second, third):
            c.close()
    finally:
        listener.stop()
