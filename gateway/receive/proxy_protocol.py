"""The PROXY protocol header a TCP balancer (HAProxy ``send-proxy-v2``) puts before the DICOM
bytes, so that the gateway learns the modality's address instead of the balancer's.

Format: https://www.haproxy.org/download/2.8/doc/proxy-protocol.txt. Version 2 (binary): a
12-byte signature, version/command, family/transport, a 16-bit length, then the addresses and
optional TLVs (skipped: the gateway needs only the source). Version 1 (one text line, at most 107
bytes, ``PROXY TCP4 src dst sport dport\\r\\n``) is read too: it costs a few lines, and older
balancers (and HAProxy's ``send-proxy``) send only that.

Invariants: ``read_header`` takes exactly the header's bytes and nothing more (the A-ASSOCIATE-RQ
that follows stays for pynetdicom, PS3.8 9.3.2); any input it cannot take raises
``ProxyHeaderError`` and nothing else, with a message fit for the log (no payload bytes echoed).
Nothing here decides whom to trust: the caller reads a header only from a listed balancer.

Why not a library: PyPI's ``proxy-protocol`` (0.11.3, 2024-04, "Alpha") is ~2,900 lines built
around an asyncio server, DNSBL and TLV objects; the part needed here is the fixed 16-byte prefix
and an address block, so it is written out and property-tested (tests/test_proxy_protocol.py).
"""

from __future__ import annotations

import ipaddress
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

SIGNATURE_V2 = b"\r\n\r\n\x00\r\nQUIT\n"
PREFIX_V1 = b"PROXY "
MAX_V1 = 107  # the whole line, CRLF included (proxy-protocol.txt 2.1)
_V2_FIXED = struct.Struct("!12sBBH")
_INET = struct.Struct("!4s4sHH")
_INET6 = struct.Struct("!16s16sHH")
_UNIX_LENGTH = 216
_FAMILIES = {0x0: "UNSPEC", 0x1: "INET", 0x2: "INET6", 0x3: "UNIX"}

Command = Literal["local", "proxy"]
Endpoint = tuple[str, int]
# Returns exactly n bytes, or raises ProxyHeaderError (closed, too slow).
Read = Callable[[int], bytes]


class ProxyHeaderError(Exception):
    """The connection did not start with a PROXY header the gateway can take; says what was
    wrong."""


@dataclass(frozen=True)
class ProxyHeader:
    """What a balancer said about the connection it relays.

    ``source`` is the client's (the modality's) address; None means the balancer gave none to
    use (v2 LOCAL, e.g. its own health check; v2 UNSPEC or UNIX family; v1 UNKNOWN): the
    connection's own address stands, as the specification asks.
    """

    version: Literal[1, 2]
    command: Command
    source: Endpoint | None = None
    destination: Endpoint | None = None


def read_header(read: Read) -> ProxyHeader:
    """Read one PROXY header (v2 or v1) through ``read``, and not a byte past it."""
    start = read(len(PREFIX_V1))  # both versions are longer than this (v1's shortest is 15)
    if start == SIGNATURE_V2[: len(start)]:
        return _read_v2(start + read(_V2_FIXED.size - len(start)), read)
    if start == PREFIX_V1:
        return _read_v1(start, read)
    raise ProxyHeaderError("no PROXY protocol signature (v2 or v1) at the start of the stream")


def _read_v2(fixed: bytes, read: Read) -> ProxyHeader:
    signature, version_command, family_transport, length = _V2_FIXED.unpack(fixed)
    if signature != SIGNATURE_V2:
        raise ProxyHeaderError("no PROXY protocol v2 signature")
    if version_command >> 4 != 2:
        raise ProxyHeaderError(f"PROXY v2 header with version {version_command >> 4}, not 2")
    command = version_command & 0xF
    if command not in (0, 1):
        raise ProxyHeaderError(f"PROXY v2 header with unknown command {command:#x}")
    family, transport = family_transport >> 4, family_transport & 0xF
    if family not in _FAMILIES or transport > 2:
        raise ProxyHeaderError(f"PROXY v2 header with unknown family/transport "
                               f"{family_transport:#04x}")
    block = read(length) if length else b""
    if command == 0:  # LOCAL: the balancer's own connection; the address block is ignored
        return ProxyHeader(2, "local")
    name = _FAMILIES[family]
    if name in ("UNSPEC", "UNIX"):
        return ProxyHeader(2, "proxy")  # no IP address to use: the connection's own stands
    if transport != 1:
        raise ProxyHeaderError(f"PROXY v2 header for a {name} non-stream transport "
                               f"({transport:#x}) on a TCP connection")
    layout = _INET if name == "INET" else _INET6
    if length < layout.size:
        raise ProxyHeaderError(f"PROXY v2 {name} address block of {length} bytes, "
                               f"at least {layout.size} needed")
    source, destination, source_port, destination_port = layout.unpack_from(block)
    return ProxyHeader(2, "proxy", (canonical_host(source), source_port),
                       (canonical_host(destination), destination_port))


def _read_v1(line: bytes, read: Read) -> ProxyHeader:
    while not line.endswith(b"\r\n"):
        if len(line) >= MAX_V1:
            raise ProxyHeaderError(f"PROXY v1 line longer than {MAX_V1} bytes")
        line += read(1)  # one byte at a time: not a byte of the DICOM stream is taken
    try:
        text = line[:-2].decode("ascii")
    except UnicodeDecodeError:
        raise ProxyHeaderError("PROXY v1 line is not ASCII") from None
    fields = text.split(" ")
    if len(fields) >= 2 and fields[1] == "UNKNOWN":
        return ProxyHeader(1, "proxy")
    if len(fields) != 6 or fields[1] not in ("TCP4", "TCP6"):
        raise ProxyHeaderError("PROXY v1 line is not 'PROXY TCP4|TCP6 src dst sport dport'")
    version = 4 if fields[1] == "TCP4" else 6
    source, destination = (_v1_address(f, version) for f in fields[2:4])
    source_port, destination_port = (_v1_port(f) for f in fields[4:6])
    return ProxyHeader(1, "proxy", (source, source_port), (destination, destination_port))


def _v1_address(text: str, version: int) -> str:
    try:
        address = ipaddress.ip_address(text)
    except ValueError:
        raise ProxyHeaderError(f"PROXY v1 address is not an IPv{version} address") from None
    if address.version != version:
        raise ProxyHeaderError(f"PROXY v1 address is not an IPv{version} address")
    return canonical_host(address.packed)


def _v1_port(text: str) -> int:
    if not text.isascii() or not text.isdigit() or len(text) > 5 or int(text) > 65535:
        raise ProxyHeaderError("PROXY v1 port is not a number from 0 to 65535")
    return int(text)


def canonical_host(address: bytes | str) -> str:
    """An address as the gateway compares and records it: an IPv4-mapped IPv6 address (what
    HAProxy sends for an IPv4 client on a ``v4v6`` bind) as plain IPv4, so that a peer pinned to
    ``host = "10.0.0.7"`` matches it; IPv6 compressed. Text that is no IP address is kept."""
    try:
        parsed = ipaddress.ip_address(address)
    except ValueError:
        return address if isinstance(address, str) else address.hex()
    if isinstance(parsed, ipaddress.IPv6Address) and parsed.ipv4_mapped is not None:
        return str(parsed.ipv4_mapped)
    return str(parsed)


def build_v2(header: ProxyHeader, tlvs: bytes = b"") -> bytes:
    """The v2 bytes for ``header`` (as a balancer would send them; used by the tests)."""
    command = 0 if header.command == "local" else 1
    if header.source is None or header.destination is None:
        return _V2_FIXED.pack(SIGNATURE_V2, 0x20 | command, 0x00, len(tlvs)) + tlvs
    source = ipaddress.ip_address(header.source[0])
    destination = ipaddress.ip_address(header.destination[0])
    layout, family = (_INET, 0x11) if source.version == 4 else (_INET6, 0x21)
    block = layout.pack(source.packed, destination.packed, header.source[1],
                        header.destination[1]) + tlvs
    return _V2_FIXED.pack(SIGNATURE_V2, 0x20 | command, family, len(block)) + block


def build_v1(header: ProxyHeader) -> bytes:
    """The v1 line for ``header`` (a PROXY command; used by the tests)."""
    if header.source is None or header.destination is None:
        return b"PROXY UNKNOWN\r\n"
    protocol = "TCP4" if ipaddress.ip_address(header.source[0]).version == 4 else "TCP6"
    return (f"PROXY {protocol} {header.source[0]} {header.destination[0]} "
            f"{header.source[1]} {header.destination[1]}\r\n").encode("ascii")


def socket_reader(conn: socket.socket, deadline_s: float) -> Read:
    """``Read`` over a connected socket: the whole header within ``deadline_s`` of this call,
    however the balancer (or a silent client) spreads its bytes."""
    deadline = time.monotonic() + deadline_s

    def read(count: int) -> bytes:
        data = b""
        while len(data) < count:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise ProxyHeaderError(f"no complete PROXY header within {deadline_s:g} s")
            conn.settimeout(remaining)
            try:
                chunk = conn.recv(count - len(data))
            except TimeoutError:
                raise ProxyHeaderError(
                    f"no complete PROXY header within {deadline_s:g} s") from None
            except OSError as exc:
                raise ProxyHeaderError(f"connection failed while reading the PROXY header "
                                       f"({type(exc).__name__})") from None
            if not chunk:
                raise ProxyHeaderError(f"connection closed after {len(data)} of {count} "
                                       "bytes of the PROXY header")
            data += chunk
        return data

    return read
