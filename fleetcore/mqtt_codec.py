"""MQTT 5 packets, as bytes and back: the subset the agents and the bridge speak (pure).

``fleetcore.mqtt_client`` is the I/O around it. What is encoded: CONNECT (clean start, a will,
keep-alive, session expiry, maximum packet size), PUBLISH at QoS 0 or 1 (retain, correlation
data, user properties), PUBACK, SUBSCRIBE, PINGREQ and DISCONNECT. What is decoded, from the
broker: CONNACK, PUBLISH, PUBACK, SUBACK, PINGRESP and DISCONNECT. Anything else (QoS 2,
AUTH, a packet a client never receives) is a protocol error, and so is every malformed field:
``MalformedPacket``, on which the client drops the connection. ``Framer`` cuts a stream of
bytes into packets and refuses, before buffering it, one larger than its limit.

Why not paho's codec: it is not separable from paho's client, whose network thread costs about
three times the CPU per received 45 KB message of this codec with asyncio's transport
(``python -m scripts.bench_mqtt --client``, docs/mqtt.md).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field

__all__ = [
    "CONNACK",
    "DISCONNECT",
    "PINGRESP",
    "PUBACK",
    "PUBLISH",
    "SUBACK",
    "Framer",
    "MalformedPacket",
    "Properties",
    "Publish",
    "Will",
    "connect",
        "decode_connack",
    "decode_puback",
    "decode_publish",
    "decode_reason",
    "decode_suback",
    "disconnect",
    "pingreq",
    "puback",
    "publish",
    "reason_name",
    "subscribe",
]

CONNECT, CONNACK, PUBLISH, PUBACK = 1, 2, 3, 4
SUBSCRIBE, SUBACK, PINGREQ, PINGRESP, DISCONNECT = 8, 9, 12, 13, 14

# Property identifiers (MQTT 5.0, 2.2.2.2) by the type of their value.
_BYTE = {0x01, 0x17, 0x19, 0x24, 0x25, 0x28, 0x29, 0x2A}
_U16 = {0x13, 0x21, 0x22, 0x23}
_U32 = {0x02, 0x11, 0x18, 0x27}
_VARINT = {0x0B}
_STRING = {0x03, 0x08, 0x12, 0x15, 0x1A, 0x1C, 0x1F}
_BINARY = {0x09, 0x16}
_FIXED = {**dict.fromkeys(_BYTE, 1), **dict.fromkeys(_U16, 2), **dict.fromkeys(_U32, 4)}
CORRELATION_DATA, USER_PROPERTY, REASON_STRING = 0x09, 0x26, 0x1F
SESSION_EXPIRY, RECEIVE_MAXIMUM, MAXIMUM_PACKET_SIZE = 0x11, 0x21, 0x27
MAX_USER_PROPERTIES = 64  # in one packet: more is refused (nothing here sends more than a few)

# Reason codes by name, as paho and the specification spell them (2.4).
_REASONS = {
    0: "Success", 1: "Granted QoS 1", 2: "Granted QoS 2", 4: "Disconnect with will message",
    16: "No matching subscribers", 128: "Unspecified error", 129: "Malformed packet",
    130: "Protocol error", 131: "Implementation specific error",
    132: "Unsupported protocol version", 133: "Client identifier not valid",
    134: "Bad user name or password", 135: "Not authorized", 136: "Server unavailable",
    137: "Server busy", 138: "Banned", 139: "Server shutting down",
    140: "Bad authentication method", 141: "Keep alive timeout", 142: "Session taken over",
    143: "Topic filter invalid", 144: "Topic name invalid", 145: "Packet identifier in use",
    147: "Receive maximum exceeded", 149: "Packet too large", 151: "Quota exceeded",
    152: "Administrative action", 153: "Payload format invalid", 154: "Retain not supported",
    155: "QoS not supported", 156: "Use another server", 157: "Server moved",
    158: "Shared subscriptions not supported", 159: "Connection rate exceeded",
}


class MalformedPacket(ValueError):
    """Bytes that are not a packet this client accepts; the connection is dropped."""


def reason_name(code: int) -> str:
    return _REASONS.get(code, f"reason code {code}")


@dataclass
class Properties:
    """The properties a packet carried that anything here reads; the rest are skipped."""

    correlation: bytes = b""
    user: list[tuple[str, str]] = field(default_factory=list)
    reason: str = ""
    receive_maximum: int = 65535
    maximum_packet_size: int = 0  # 0: none given


@dataclass
class Publish:
    topic: str
    payload: bytes
    qos: int
    retain: bool
    packet_id: int  # 0 at QoS 0
    properties: Properties


@dataclass(frozen=True)
class Will:
    topic: str
    payload: bytes
    qos: int = 1
    retain: bool = True


# ---------------------------------------------------------------------- encoding
def _varint(n: int) -> bytes:
    if not 0 <= n <= 268_435_455:
        raise ValueError(f"{n} does not fit a variable byte integer")
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    if len(raw) > 65535:
        raise ValueError("string over 65535 bytes")
    return struct.pack(">H", len(raw)) + raw


def _binary(raw: bytes) -> bytes:
    if len(raw) > 65535:
        raise ValueError("binary data over 65535 bytes")
    return struct.pack(">H", len(raw)) + raw


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def _props(raw: bytes) -> bytes:
    return _varint(len(raw)) + raw


def connect(client_id: str, *, keepalive: int, clean_start: bool = True,
            session_expiry: int = 0, maximum_packet_size: int = 0,
            will: Will | None = None) -> bytes:
    flags = 0x02 if clean_start else 0
    if will is not None:
        flags |= 0x04 | (will.qos << 3) | (0x20 if will.retain else 0)
    props = b""
    if session_expiry:
        props += bytes([SESSION_EXPIRY]) + struct.pack(">I", session_expiry)
    if maximum_packet_size:
        props += bytes([MAXIMUM_PACKET_SIZE]) + struct.pack(">I", maximum_packet_size)
    body = _string("MQTT") + bytes([5, flags]) + struct.pack(">H", keepalive) + _props(props)
    body += _string(client_id)
    if will is not None:
        body += _props(b"") + _string(will.topic) + _binary(will.payload)
    return _packet(CONNECT << 4, body)


def publish(topic: str, payload: bytes, *, qos: int, packet_id: int = 0, retain: bool = False,
            correlation: bytes = b"", user: tuple[tuple[str, str], ...] = ()) -> bytes:
    """The whole packet; the payload is copied once, into it."""
    props = b""
    if correlation:
        props += bytes([CORRELATION_DATA]) + _binary(correlation)
    for key, value in user:
        props += bytes([USER_PROPERTY]) + _string(key) + _string(value)
    head = _string(topic) + (struct.pack(">H", packet_id) if qos else b"") + _props(props)
    first = (PUBLISH << 4) | (qos << 1) | (1 if retain else 0)
    return b"".join((bytes([first]), _varint(len(head) + len(payload)), head, payload))


def puback(packet_id: int) -> bytes:
    return bytes([PUBACK << 4, 2]) + struct.pack(">H", packet_id)


def subscribe(packet_id: int, filters: list[tuple[str, int]]) -> bytes:
    body = struct.pack(">H", packet_id) + _props(b"")
    body += b"".join(_string(name) + bytes([qos]) for name, qos in filters)
    return _packet((SUBSCRIBE << 4) | 0x02, body)


def pingreq() -> bytes:
    return bytes([PINGREQ << 4, 0])


def disconnect() -> bytes:
    return bytes([DISCONNECT << 4, 0])  # normal disconnection: the will is not sent


# ---------------------------------------------------------------------- decoding
class _Reader:
    __slots__ = ("data", "pos")

    def __init__(self, data: memoryview) -> None:
        self.data, self.pos = data, 0

    def left(self) -> int:
        return len(self.data) - self.pos

    def take(self, n: int) -> memoryview:
        if n > self.left():
            raise MalformedPacket("field past the end of the packet")
        out = self.data[self.pos:self.pos + n]
        self.pos += n
        return out

    def byte(self) -> int:
        return self.take(1)[0]

    def u16(self) -> int:
        raw = self.take(2)
        return raw[0] << 8 | raw[1]

    def u32(self) -> int:
        return int.from_bytes(self.take(4), "big")

    def varint(self) -> int:
        value, shift = 0, 0
        for _ in range(4):
            digit = self.byte()
            value |= (digit & 0x7F) << shift
            if not digit & 0x80:
                return value
            shift += 7
        raise MalformedPacket("variable byte integer longer than 4 bytes")

    def string(self) -> str:
        try:
            return str(self.take(self.u16()), "utf-8")
        except UnicodeDecodeError:
            raise MalformedPacket("string is not UTF-8") from None

    def skip(self, ident: int) -> None:
        """Past a property nothing here reads."""
        if ident in _FIXED:
            self.take(_FIXED[ident])
        elif ident in _VARINT:
            self.varint()
        elif ident in _STRING:
            self.string()
        elif ident in _BINARY:
            self.take(self.u16())
        else:
            raise MalformedPacket(f"unknown property {ident:#x}")

    def properties(self) -> Properties:
        end = self.varint()
        if end > self.left():
            raise MalformedPacket("properties past the end of the packet")
        end += self.pos
        out = Properties()
        while self.pos < end:
            ident = self.varint()
            if ident == CORRELATION_DATA:
                out.correlation = bytes(self.take(self.u16()))
            elif ident == USER_PROPERTY:
                if len(out.user) >= MAX_USER_PROPERTIES:
                    raise MalformedPacket("too many user properties")
                out.user.append((self.string(), self.string()))
            elif ident == REASON_STRING:
                out.reason = self.string()
            elif ident == RECEIVE_MAXIMUM:
                out.receive_maximum = self.u16()
                if not out.receive_maximum:
                    raise MalformedPacket("receive maximum of 0")
            elif ident == MAXIMUM_PACKET_SIZE:
                out.maximum_packet_size = self.u32()
            else:
                self.skip(ident)
        if self.pos != end:
            raise MalformedPacket("a property runs past its block")
        return out


def decode_connack(body: memoryview) -> tuple[int, Properties]:
    """(reason code, properties) of a CONNACK's body."""
    r = _Reader(body)
    if r.byte() & 0xFE:
        raise MalformedPacket("reserved CONNACK flags set")
    reason = r.byte()
    props = r.properties() if r.left() else Properties()
    return reason, props


def decode_publish(flags: int, body: memoryview) -> Publish:
    qos = (flags >> 1) & 0x03
    if qos > 1:
        raise MalformedPacket(f"PUBLISH at QoS {qos}; this client subscribes at most at QoS 1")
    r = _Reader(body)
    topic = r.string()
    packet_id = r.u16() if qos else 0
    if qos and not packet_id:
        raise MalformedPacket("PUBLISH at QoS 1 with packet identifier 0")
    props = r.properties()
    if not topic:
        raise MalformedPacket("PUBLISH with an empty topic (no alias was agreed)")
    return Publish(topic, bytes(body[r.pos:]), qos, bool(flags & 0x01), packet_id, props)


def decode_puback(body: memoryview) -> tuple[int, int, Properties]:
    r = _Reader(body)
    packet_id = r.u16()
    if not r.left():
        return packet_id, 0, Properties()
    code = r.byte()
    props = r.properties() if r.left() else Properties()
    return packet_id, code, props


def decode_suback(body: memoryview) -> tuple[int, list[int], Properties]:
    r = _Reader(body)
    packet_id = r.u16()
    props = r.properties()
    codes = list(r.take(r.left()))
    if not codes:
        raise MalformedPacket("SUBACK without a reason code")
    return packet_id, codes, props


def decode_reason(body: memoryview) -> tuple[int, Properties]:
    """A DISCONNECT's reason code (0 when left out) and properties."""
    r = _Reader(body)
    if not r.left():
        return 0, Properties()
    code = r.byte()
    return code, r.properties() if r.left() else Properties()


class Framer:
    """Cuts received bytes into (packet type, flags, body) in order. A remaining length over
    ``max_packet`` raises ``MalformedPacket`` as soon as the header is read, before the body is
    buffered; so does a malformed length."""

    def __init__(self, max_packet: int) -> None:
        self.max_packet = max_packet
        self._buf = bytearray()
        self.broken: MalformedPacket | None = None

    def feed(self, data: bytes) -> list[tuple[int, int, memoryview]]:
        """The packets completed by ``data``. A malformed one raises, or when whole packets
        came before it in the same bytes, is kept in ``broken`` (they are returned; the caller
        handles them, then sees ``broken``), and every later call raises it."""
        if self.broken is not None:
            raise self.broken
        buf = self._buf
        buf += data
        out: list[tuple[int, int, memoryview]] = []
        pos, n = 0, len(buf)
        while n - pos >= 2:
            length, shift, i = 0, 0, pos + 1
            while True:
                if i >= n:
                    length = -1
                    break
                digit = buf[i]
                length |= (digit & 0x7F) << shift
                i += 1
                if not digit & 0x80:
                    break
                shift += 7
                if shift > 21:
                    return self._broken(out, "remaining length longer than 4 bytes")
            if length < 0:
                break
            if length > self.max_packet:
                return self._broken(out, f"packet of {length} bytes; the limit is "
                                         f"{self.max_packet}")
            if n - i < length:
                break
            first = buf[pos]
            out.append((first >> 4, first & 0x0F, memoryview(buf)[i:i + length]))
            pos = i + length
        if pos:
            # The packets are views of this buffer, which is never written again: what
            # follows them starts a new one (not copied out of it a packet at a time).
            self._buf = bytearray(memoryview(buf)[pos:])
        return out

    def _broken(self, out: list[tuple[int, int, memoryview]],
                why: str) -> list[tuple[int, int, memoryview]]:
        self.broken = MalformedPacket(why)
        self._buf = bytearray()
        if not out:
            raise self.broken
        return out
