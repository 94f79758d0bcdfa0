"""The PROXY protocol header (gateway.receive.proxy_protocol): what a balancer builds is read back
exactly, not a byte of the DICOM stream after it is taken, and no input raises anything but
``ProxyHeaderError``."""

from __future__ import annotations

import ipaddress
import socket
import struct
import threading
import time
from io import BytesIO

import pytest
from hypothesis import given
from hypothesis import strategies as st

from gateway.receive.proxy_protocol import (
    SIGNATURE_V2,
    ProxyHeader,
    ProxyHeaderError,
    Read,
    build_v1,
    build_v2,
    canonical_host,
    read_header,
    socket_reader,
)
from gateway.receive.server import ProxyProtocol

# What follows the header on the wire: the start of an A-ASSOCIATE-RQ (PS3.8 9.3.2)
ASSOCIATE_RQ = b"\x01\x00\x00\x00\x00\xcd\x00\x01"


def reader(data: bytes) -> tuple[Read, BytesIO]:
    stream = BytesIO(data)

    def read(count: int) -> bytes:
        chunk = stream.read(count)
        if len(chunk) < count:
            raise ProxyHeaderError("closed")
        return chunk

    return read, stream


def _host(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> str:
    return canonical_host(str(address))


def _not_mapped(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    return not isinstance(address, ipaddress.IPv6Address) or address.ipv4_mapped is None


ports = st.integers(0, 65535)
v4 = st.ip_addresses(v=4).map(_host)
# IPv4-mapped IPv6 addresses read back as IPv4 (canonical_host): not a round trip, tested apart
v6 = st.ip_addresses(v=6).filter(_not_mapped).map(_host)
endpoints_pair = st.one_of(
    st.tuples(st.tuples(v4, ports), st.tuples(v4, ports)),
    st.tuples(st.tuples(v6, ports), st.tuples(v6, ports)),
)
tlvs = st.binary(max_size=300)


@given(endpoints_pair, tlvs, st.binary(max_size=64))
def test_v2_proxy_reads_back_what_was_built_and_leaves_what_follows(
    pair: tuple[tuple[str, int], tuple[str, int]], extra: bytes, following: bytes,
) -> None:
    header = ProxyHeader(2, "proxy", pair[0], pair[1])
    read, rest = reader(build_v2(header, extra) + ASSOCIATE_RQ + following)
    assert read_header(read) == header
    assert rest.read() == ASSOCIATE_RQ + following


@given(st.one_of(st.none(), endpoints_pair), tlvs)
def test_v2_local_is_the_balancers_own_connection(
    pair: tuple[tuple[str, int], tuple[str, int]] | None, extra: bytes,
) -> None:
    header = ProxyHeader(2, "local", *(pair or (None, None)))
    read, rest = reader(build_v2(header, extra) + ASSOCIATE_RQ)
    assert read_header(read) == ProxyHeader(2, "local")
    assert rest.read() == ASSOCIATE_RQ


@given(endpoints_pair, st.binary(max_size=64))
def test_v1_reads_back_what_was_built_and_leaves_what_follows(
    pair: tuple[tuple[str, int], tuple[str, int]], following: bytes,
) -> None:
    header = ProxyHeader(1, "proxy", pair[0], pair[1])
    read, rest = reader(build_v1(header) + ASSOCIATE_RQ + following)
    assert read_header(read) == header
    assert rest.read() == ASSOCIATE_RQ + following


def test_v1_unknown_and_v2_unspec_leave_the_connection_address() -> None:
    for built in (b"PROXY UNKNOWN\r\n", b"PROXY UNKNOWN ffff::1 ::1 1 2\r\n",
                  build_v2(ProxyHeader(2, "proxy"))):
        read, rest = reader(built + ASSOCIATE_RQ)
        assert read_header(read).source is None
        assert rest.read() == ASSOCIATE_RQ


def test_an_ipv4_mapped_client_reads_as_ipv4() -> None:
    """HAProxy on a v4v6 bind sends an IPv4 client as ::ffff:a.b.c.d (INET6)."""
    header = ProxyHeader(2, "proxy", ("::ffff:10.0.0.7", 40000), ("::ffff:10.0.0.1", 11112))
    read, _ = reader(build_v2(header))
    assert read_header(read).source == ("10.0.0.7", 40000)


def _v2(version_command: int = 0x21, family: int = 0x11, block: bytes = bytes(12),
        length: int | None = None) -> bytes:
    size = len(block) if length is None else length
    return SIGNATURE_V2 + struct.pack("!BBH", version_command, family, size) + block


@pytest.mark.parametrize(("data", "why"), [
    (b"", "closed"),
    (ASSOCIATE_RQ + bytes(100), "no PROXY protocol signature"),
    (SIGNATURE_V2[:9] + b"XYZ" + bytes(20), "no PROXY protocol v2 signature"),
    (_v2(version_command=0x11), "version 1, not 2"),
    (_v2(version_command=0x22), "unknown command 0x2"),
    (_v2(family=0x41), "unknown family/transport 0x41"),
    (_v2(family=0x13), "unknown family/transport 0x13"),
    (_v2(family=0x12), "non-stream transport"),
    (_v2(family=0x11, block=bytes(8)), "address block of 8 bytes, at least 12"),
    (_v2(family=0x21, block=bytes(12)), "address block of 12 bytes, at least 36"),
    (_v2(length=40), "closed"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1 2", "closed"),
    (b"PROXY " + b"A" * 200, "longer than 107"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 1\r\n", "is not 'PROXY TCP4|TCP6"),
    (b"PROXY UDP4 1.2.3.4 5.6.7.8 1 2\r\n", "is not 'PROXY TCP4|TCP6"),
    (b"PROXY TCP4 ::1 ::1 1 2\r\n", "not an IPv4 address"),
    (b"PROXY TCP6 1.2.3.4 5.6.7.8 1 2\r\n", "not an IPv6 address"),
    (b"PROXY TCP4 1.2.3.400 5.6.7.8 1 2\r\n", "not an IPv4 address"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 65536 2\r\n", "port is not a number"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 -1 2\r\n", "port is not a number"),
    (b"PROXY TCP4 1.2.3.4 5.6.7.8 \xd9\xa1 2\r\n", "not ASCII"),
])
def test_malformed_headers_say_what_was_wrong(data: bytes, why: str) -> None:
    read, _ = reader(data)
    with pytest.raises(ProxyHeaderError, match=why):
        read_header(read)


valid = st.one_of(
    endpoints_pair.map(lambda p: build_v2(ProxyHeader(2, "proxy", *p))),
    endpoints_pair.map(lambda p: build_v1(ProxyHeader(1, "proxy", *p))),
)


@given(st.one_of(
    st.binary(max_size=300),
    st.binary(max_size=300).map(lambda tail: SIGNATURE_V2 + tail),
    st.binary(max_size=120).map(lambda tail: b"PROXY " + tail),
    valid,
))
def test_garbage_raises_only_our_error(data: bytes) -> None:
    read, _ = reader(data)
    try:
        read_header(read)
    except ProxyHeaderError:
        pass  # the only outcome besides a header; anything else fails the test


@given(valid, st.integers(0, 200), st.integers(0, 255))
def test_a_corrupted_header_raises_only_our_error_and_never_reads_past_itself(
    data: bytes, position: int, value: int,
) -> None:
    corrupted = bytearray(data)
    corrupted[position % len(data)] = value
    read, rest = reader(bytes(corrupted) + ASSOCIATE_RQ)
    try:
        read_header(read)
    except ProxyHeaderError:
        return
    assert rest.read().endswith(ASSOCIATE_RQ)


def test_the_socket_reader_takes_a_trickled_header_within_the_deadline() -> None:
    ours, theirs = socket.socketpair()
    built = build_v2(ProxyHeader(2, "proxy", ("10.0.0.7", 4000), ("10.0.0.1", 11112)))

    def trickle() -> None:
        for byte in built:
            theirs.send(bytes([byte]))
            time.sleep(0.002)
        theirs.send(ASSOCIATE_RQ)

    sender = threading.Thread(target=trickle)
    sender.start()
    try:
        assert read_header(socket_reader(ours, 5.0)).source == ("10.0.0.7", 4000)
        sender.join()
        assert ours.recv(100) == ASSOCIATE_RQ
    finally:
        ours.close()
        theirs.close()


def test_the_socket_reader_gives_up_on_a_silent_client_at_the_deadline() -> None:
    ours, theirs = socket.socketpair()
    theirs.send(SIGNATURE_V2[:3])  # a few bytes, then nothing: the deadline is for the whole
    started = time.monotonic()
    try:
        with pytest.raises(ProxyHeaderError, match="within 0.3 s"):
            read_header(socket_reader(ours, 0.3))
        assert 0.25 < time.monotonic() - started < 2.0
    finally:
        ours.close()
        theirs.close()


def test_the_socket_reader_reports_a_closed_connection() -> None:
    ours, theirs = socket.socketpair()
    theirs.send(SIGNATURE_V2)
    theirs.close()
    try:
        with pytest.raises(ProxyHeaderError, match="closed after 6 of 10 bytes"):
            read_header(socket_reader(ours, 5.0))
    finally:
        ours.close()


@pytest.mark.parametrize(("host", "trusted"), [
    ("10.0.0.5", True), ("10.0.0.6", False), ("10.1.0.200", True), ("10.1.1.1", False),
    ("::ffff:10.0.0.5", True), ("fd00::1", True), ("fd01::1", False), ("not-an-ip", False),
])
def test_only_listed_balancers_are_trusted(host: str, trusted: bool) -> None:
    proxy = ProxyProtocol([ipaddress.ip_network(n) for n in ("10.0.0.5", "10.1.0.0/24",
                                                             "fd00::/16")], 1.0)
    assert proxy.is_trusted(host) is trusted
