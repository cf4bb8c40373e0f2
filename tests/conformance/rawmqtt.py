"""A byte-level MQTT 3.1.1 / 5.0 client for the checks a library client hides.

paho acknowledges every PUBLISH as soon as it arrives and never shows packet ids, DUP
flags or the raw topic alias; the tests of flow control (Receive Maximum), of outbound
QoS 2 across a broker restart and of topic aliases need to see and steer exactly that.
Only what those tests need is encoded; decoding covers every packet a server sends.
"""

from __future__ import annotations

import socket
import struct
import time
from dataclasses import dataclass, field
from typing import Any, Optional

CONNECT, CONNACK, PUBLISH, PUBACK, PUBREC, PUBREL, PUBCOMP = 1, 2, 3, 4, 5, 6, 7
SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, PINGREQ, PINGRESP, DISCONNECT, AUTH = (
    8, 9, 10, 11, 12, 13, 14, 15)

PACKET_NAMES = {
    CONNECT: "CONNECT", CONNACK: "CONNACK", PUBLISH: "PUBLISH", PUBACK: "PUBACK",
    PUBREC: "PUBREC", PUBREL: "PUBREL", PUBCOMP: "PUBCOMP", SUBSCRIBE: "SUBSCRIBE",
    SUBACK: "SUBACK", UNSUBSCRIBE: "UNSUBSCRIBE", UNSUBACK: "UNSUBACK",
    PINGREQ: "PINGREQ", PINGRESP: "PINGRESP", DISCONNECT: "DISCONNECT", AUTH: "AUTH",
}

# 5.0 property identifiers: (name, wire type).
PROPERTIES = {
    0x01: ("payload_format_indicator", "byte"),
    0x02: ("message_expiry_interval", "u32"),
    0x03: ("content_type", "str"),
    0x08: ("response_topic", "str"),
    0x09: ("correlation_data", "bin"),
    0x0B: ("subscription_identifier", "varint"),
    0x11: ("session_expiry_interval", "u32"),
    0x12: ("assigned_client_identifier", "str"),
    0x13: ("server_keep_alive", "u16"),
    0x15: ("authentication_method", "str"),
    0x16: ("authentication_data", "bin"),
    0x17: ("request_problem_information", "byte"),
    0x18: ("will_delay_interval", "u32"),
    0x19: ("request_response_information", "byte"),
    0x1A: ("response_information", "str"),
    0x1C: ("server_reference", "str"),
    0x1F: ("reason_string", "str"),
    0x21: ("receive_maximum", "u16"),
    0x22: ("topic_alias_maximum", "u16"),
    0x23: ("topic_alias", "u16"),
    0x24: ("maximum_qos", "byte"),
    0x25: ("retain_available", "byte"),
    0x26: ("user_property", "pair"),
    0x27: ("maximum_packet_size", "u32"),
    0x28: ("wildcard_subscription_available", "byte"),
    0x29: ("subscription_identifier_available", "byte"),
    0x2A: ("shared_subscription_available", "byte"),
}
PROPERTY_IDS = {name: (pid, kind) for pid, (name, kind) in PROPERTIES.items()}
# Properties that may appear more than once; decoded as lists.
REPEATABLE = {"user_property", "subscription_identifier"}


def varint(n: int) -> bytes:
    out = bytearray()
    while True:
        b = n % 128
        n //= 128
        if n:
            b |= 0x80
        out.append(b)
        if not n:
            return bytes(out)


def string(s: str | bytes) -> bytes:
    b = s.encode() if isinstance(s, str) else s
    return struct.pack(">H", len(b)) + b


def encode_properties(props: Optional[dict[str, Any]]) -> bytes:
    body = bytearray()
    for name, value in (props or {}).items():
        pid, kind = PROPERTY_IDS[name]
        values = value if name in REPEATABLE else [value]
        for v in values:
            body.append(pid)
            if kind == "byte":
                body.append(v)
            elif kind == "u16":
                body += struct.pack(">H", v)
            elif kind == "u32":
                body += struct.pack(">I", v)
            elif kind == "varint":
                body += varint(v)
            elif kind in ("str", "bin"):
                body += string(v)
            elif kind == "pair":
                body += string(v[0]) + string(v[1])
    return varint(len(body)) + bytes(body)


def sub_options(qos: int, no_local: bool = False, retain_as_published: bool = False,
                retain_handling: int = 0) -> int:
    """The options byte of a 5.0 subscription (3.1.1: just the QoS)."""
    return qos | (0x04 if no_local else 0) | (0x08 if retain_as_published else 0) | (
        retain_handling << 4)


def packet(kind: int, flags: int, body: bytes) -> bytes:
    return bytes([(kind << 4) | flags]) + varint(len(body)) + body


class Reader:
    def __init__(self, data: bytes):
        self.data, self.pos = data, 0

    def take(self, n: int) -> bytes:
        if self.pos + n > len(self.data):
            raise ValueError("packet shorter than its fields")
        b = self.data[self.pos:self.pos + n]
        self.pos += n
        return b

    def byte(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        return struct.unpack(">H", self.take(2))[0]

    def u32(self) -> int:
        return struct.unpack(">I", self.take(4))[0]

    def varint(self) -> int:
        n, mult = 0, 1
        for _ in range(4):
            b = self.byte()
            n += (b & 0x7F) * mult
            if not b & 0x80:
                return n
            mult *= 128
        raise ValueError("variable byte integer longer than 4 bytes")

    def bin(self) -> bytes:
        return self.take(self.u16())

    def str(self) -> str:
        return self.bin().decode()

    def rest(self) -> bytes:
        return self.take(len(self.data) - self.pos)

    def more(self) -> bool:
        return self.pos < len(self.data)

    def properties(self) -> dict[str, Any]:
        end = self.varint()
        end += self.pos
        props: dict[str, Any] = {}
        while self.pos < end:
            pid = self.varint()
            name, kind = PROPERTIES[pid]
            if kind == "byte":
                v: Any = self.byte()
            elif kind == "u16":
                v = self.u16()
            elif kind == "u32":
                v = self.u32()
            elif kind == "varint":
                v = self.varint()
            elif kind == "str":
                v = self.str()
            elif kind == "bin":
                v = self.bin()
            else:
                v = (self.str(), self.str())
            if name in REPEATABLE:
                props.setdefault(name, []).append(v)
            else:
                props[name] = v
        return props


@dataclass
class Packet:
    """A decoded packet; the fields that apply to its kind are set."""

    kind: int
    flags: int = 0
    pid: Optional[int] = None
    reason: Optional[int] = None
    reasons: list[int] = field(default_factory=list)
    props: dict[str, Any] = field(default_factory=dict)
    session_present: bool = False
    topic: str = ""
    payload: bytes = b""
    qos: int = 0
    dup: bool = False
    retain: bool = False
    # Bytes the packet took on the wire, fixed header included.
    wire_size: int = 0
    # Bytes of the fixed header (first byte and Remaining Length).
    header_size: int = 0
    # CONNACK: the whole Connect Acknowledge Flags byte (bit 0 is Session Present).
    ack_flags: int = 0

    @property
    def name(self) -> str:
        return PACKET_NAMES.get(self.kind, str(self.kind))

    def __repr__(self) -> str:
        if self.kind == PUBLISH:
            return (f"PUBLISH(topic={self.topic!r}, qos={self.qos}, pid={self.pid}, "
                    f"dup={self.dup}, retain={self.retain}, props={self.props}, "
                    f"payload={self.payload[:40]!r})")
        return (f"{self.name}(pid={self.pid}, reason={self.reason}, reasons={self.reasons}, "
                f"session_present={self.session_present}, props={self.props})")


class Closed(Exception):
    """The server closed the connection."""


@dataclass
class Will:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    props: Optional[dict[str, Any]] = None


class RawClient:
    """One TCP connection speaking MQTT 3.1.1 (version 4) or 5.0 (version 5)."""

    def __init__(self, host: str, port: int, version: int):
        self.version = version
        self.sock = socket.create_connection((host, port), timeout=10)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""
        self.closed = False
        # PUBLISH packets that arrived while waiting for another kind.
        self.pending: list[Packet] = []

    # -- sending ------------------------------------------------------------------

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def send_connect(self, client_id: str, clean: bool = True, keepalive: int = 60,
                     props: Optional[dict[str, Any]] = None, will: Optional[Will] = None) -> None:
        flags = 0x02 if clean else 0
        if will:
            flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
        body = string("MQTT") + bytes([self.version, flags]) + struct.pack(">H", keepalive)
        if self.version == 5:
            body += encode_properties(props)
        body += string(client_id)
        if will:
            if self.version == 5:
                body += encode_properties(will.props)
            body += string(will.topic) + string(will.payload)
        self.send(packet(CONNECT, 0, body))

    def connect(self, client_id: str, **kwargs: Any) -> Packet:
        """Sends CONNECT and returns the CONNACK."""
        self.send_connect(client_id, **kwargs)
        ack = self.recv()
        assert ack.kind == CONNACK, f"expected CONNACK, got {ack}"
        return ack

    def send_subscribe(self, pid: int, filters: list[tuple[str, int]],
                       props: Optional[dict[str, Any]] = None) -> None:
        """`filters` pairs a topic filter with its options byte (3.1.1: the QoS)."""
        body = struct.pack(">H", pid)
        if self.version == 5:
            body += encode_properties(props)
        for topic, options in filters:
            body += string(topic) + bytes([options])
        self.send(packet(SUBSCRIBE, 0x02, body))

    def subscribe(self, pid: int, filters: list[tuple[str, int]],
                  props: Optional[dict[str, Any]] = None) -> Packet:
        """Subscribes and returns the SUBACK (PUBLISH packets before it are kept)."""
        self.send_subscribe(pid, filters, props)
        return self.recv_kind(SUBACK)

    def send_unsubscribe(self, pid: int, topics: list[str],
                         props: Optional[dict[str, Any]] = None) -> None:
        body = struct.pack(">H", pid)
        if self.version == 5:
            body += encode_properties(props)
        for topic in topics:
            body += string(topic)
        self.send(packet(UNSUBSCRIBE, 0x02, body))

    def publish(self, topic: str, payload: bytes, qos: int = 0, pid: Optional[int] = None,
                retain: bool = False, dup: bool = False,
                props: Optional[dict[str, Any]] = None) -> None:
        body = string(topic)
        if qos:
            body += struct.pack(">H", pid)
        if self.version == 5:
            body += encode_properties(props)
        body += payload
        flags = (qos << 1) | (0x08 if dup else 0) | (0x01 if retain else 0)
        self.send(packet(PUBLISH, flags, body))

    def _ack(self, kind: int, flags: int, pid: int, reason: int) -> None:
        body = struct.pack(">H", pid)
        if self.version == 5 and reason:
            body += bytes([reason])
        self.send(packet(kind, flags, body))

    def puback(self, pid: int, reason: int = 0) -> None:
        self._ack(PUBACK, 0, pid, reason)

    def pubrec(self, pid: int, reason: int = 0) -> None:
        self._ack(PUBREC, 0, pid, reason)

    def pubrel(self, pid: int, reason: int = 0) -> None:
        self._ack(PUBREL, 0x02, pid, reason)

    def pubcomp(self, pid: int, reason: int = 0) -> None:
        self._ack(PUBCOMP, 0, pid, reason)

    def ping(self) -> None:
        self.send(packet(PINGREQ, 0, b""))

    def disconnect(self, reason: int = 0, props: Optional[dict[str, Any]] = None) -> None:
        body = b""
        if self.version == 5 and (reason or props):
            body = bytes([reason]) + encode_properties(props)
        self.send(packet(DISCONNECT, 0, body))
        self.close()

    def close(self) -> None:
        """Closes the socket without sending anything (an abnormal close, to the server)."""
        if not self.closed:
            self.closed = True
            self.sock.close()

    # -- receiving ----------------------------------------------------------------

    def _frame(self) -> Optional[tuple[int, bytes]]:
        """(first byte, body) of a complete packet at the front of the buffer."""
        if len(self.buf) < 2:
            return None
        length, mult, i = 0, 1, 1
        while True:
            if i >= len(self.buf):
                return None
            b = self.buf[i]
            length += (b & 0x7F) * mult
            mult *= 128
            i += 1
            if not b & 0x80:
                break
        if len(self.buf) < i + length:
            return None
        first, body = self.buf[0], self.buf[i:i + length]
        self.buf = self.buf[i + length:]
        self.last_frame_size = i + length
        self.last_header_size = i
        return first, body

    def recv(self, timeout: float = 10.0) -> Packet:
        """The next packet; raises TimeoutError after `timeout`, Closed at EOF."""
        deadline = time.monotonic() + timeout
        while True:
            frame = self._frame()
            if frame:
                return self._decode(*frame)
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"no packet within {timeout} s")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                raise TimeoutError(f"no packet within {timeout} s") from None
            except ConnectionError:
                data = b""
            if not data:
                raise Closed()
            self.buf += data

    def recv_kind(self, kind: int, timeout: float = 10.0) -> Packet:
        """The next packet of `kind`; PUBLISH packets before it go to `self.pending`."""
        while True:
            p = self.recv(timeout)
            if p.kind == kind:
                return p
            if p.kind == PUBLISH:
                self.pending.append(p)
                continue
            raise AssertionError(f"expected {PACKET_NAMES[kind]}, got {p}")

    def next_publish(self, timeout: float = 10.0) -> Packet:
        """The next PUBLISH, including those `recv_kind` put aside."""
        if self.pending:
            return self.pending.pop(0)
        p = self.recv(timeout)
        assert p.kind == PUBLISH, f"expected PUBLISH, got {p}"
        return p

    def quiet_for(self, window: float) -> list[Packet]:
        """Every packet that arrives within `window` (for negative checks)."""
        seen = list(self.pending)
        self.pending.clear()
        deadline = time.monotonic() + window
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return seen
            try:
                seen.append(self.recv(remaining))
            except TimeoutError:
                return seen

    def wait_closed(self, timeout: float = 10.0) -> list[Packet]:
        """Packets received until the server closes the connection."""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            try:
                seen.append(self.recv(max(0.0, deadline - time.monotonic())))
            except Closed:
                return seen

    def read_until_closed(self, timeout: float = 10.0) -> tuple[list[Packet], Optional[OSError]]:
        """Packets received until the server closes the connection, and the error the close
        came with: `None` for an orderly close (EOF), the `ConnectionResetError` of a reset.
        (`recv` treats a reset as a close; this tells them apart.)"""
        seen = []
        deadline = time.monotonic() + timeout
        while True:
            frame = self._frame()
            if frame:
                seen.append(self._decode(*frame))
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise TimeoutError(f"the server did not close within {timeout} s: {seen}")
            self.sock.settimeout(remaining)
            try:
                data = self.sock.recv(65536)
            except socket.timeout:
                continue
            except ConnectionError as e:
                return seen, e
            if not data:
                return seen, None
            self.buf += data

    def _decode(self, first: int, body: bytes) -> Packet:
        kind, flags = first >> 4, first & 0x0F
        r = Reader(body)
        p = Packet(kind, flags, wire_size=self.last_frame_size,
                   header_size=self.last_header_size)
        v5 = self.version == 5
        if kind == CONNACK:
            p.ack_flags = r.byte()
            p.session_present = bool(p.ack_flags & 0x01)
            p.reason = r.byte()
            if v5 and r.more():
                p.props = r.properties()
        elif kind == PUBLISH:
            p.qos, p.dup, p.retain = (flags >> 1) & 0x03, bool(flags & 0x08), bool(flags & 0x01)
            p.topic = r.str()
            if p.qos:
                p.pid = r.u16()
            if v5:
                p.props = r.properties()
            p.payload = r.rest()
        elif kind in (PUBACK, PUBREC, PUBREL, PUBCOMP):
            p.pid = r.u16()
            p.reason = 0
            if v5 and r.more():
                p.reason = r.byte()
                if r.more():
                    p.props = r.properties()
        elif kind in (SUBACK, UNSUBACK):
            p.pid = r.u16()
            if v5:
                p.props = r.properties()
            p.reasons = list(r.rest())
        elif kind == DISCONNECT:
            p.reason = 0
            if r.more():
                p.reason = r.byte()
                if r.more():
                    p.props = r.properties()
        elif kind == AUTH:
            p.reason = r.byte() if r.more() else 0
            if r.more():
                p.props = r.properties()
        return p

