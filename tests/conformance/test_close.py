"""How the server closes a connection: the last packet it sends (a DISCONNECT with a 5.0
reason code, a refusing CONNACK) must reach a client that is still sending.

A server that closes its socket with input it has not read makes the kernel answer with a
reset instead of an orderly close; the client's next write fails with ECONNRESET or EPIPE,
and a client library then drops the connection without reading what the server sent last.
The server has to send its packet, stop writing, read (and discard) what the client still
sends for a short while, and only then close (section 4.13: the Server MAY close the Network
Connection after the DISCONNECT; [MQTT-4.13.2-1] / [MQTT-3.2.2-7] say the reason code goes
out first, which is worth nothing if it is destroyed on the way).

The clients here write a stream of packets, paced like a device sending telemetry, without
reading, and only then read: every write must succeed and the server's last packet must be
there, followed by an orderly close.
"""

import socket
import struct
import time

import pytest

from mqttclient import V311, V5
from rawmqtt import CONNACK, DISCONNECT, PUBREC, encode_properties, packet, string

# The stream a busy client keeps writing after the packet that ends its connection: 50
# packets of 1 KiB, 5 ms apart (about a quarter of a second).
STREAM = 50
PAUSE = 0.005
MOSQUITTO_RESETS = "2.0.11 closes with unread input: the client's writes fail with ECONNRESET"


def qos0_publish(version: int, topic: str, payload: bytes) -> bytes:
    body = string(topic) + (encode_properties(None) if version == V5 else b"") + payload
    return packet(3, 0, body)


def keep_sending(sock: socket.socket, version: int) -> None:
    """Writes the stream, reading nothing; fails on the first write the server refused."""
    for i in range(STREAM):
        try:
            sock.sendall(qos0_publish(version, "close/stream", bytes([i % 256]) * 1024))
        except OSError as e:
            pytest.fail(f"write {i} of the stream failed ({e!r}): the server closed with "
                        "unread input, so the kernel reset the connection")
        time.sleep(PAUSE)


def assert_orderly_close(raw, last_kind: int, last_reason: int):
    seen, error = raw.read_until_closed()
    assert error is None, f"connection reset after {seen}: {error!r}"
    assert seen and (seen[-1].kind, seen[-1].reason) == (last_kind, last_reason), seen
    return seen


@pytest.mark.skip_mosquitto("2.0.11 answers the PUBLISH over Receive Maximum with PUBREC "
                             "0x97 and keeps the connection")
@pytest.mark.broker_config(receive_maximum=2)
@pytest.mark.spec(
    "MQTT-3.3.4-7", "MQTT-4.13.2-1", "MQTT-3.14.2-1", "MQTT-3.14.4-1", "MQTT-3.14.4-2")
def test_mqtt_3_3_4_7_receive_maximum_exceeded_disconnect_reaches_a_sending_client(clients):
    """[MQTT-3.3.4-7] The Client MUST NOT send more than Receive Maximum QoS 1 and QoS 2
    PUBLISH packets for which it has not received PUBACK, PUBCOMP, or PUBREC with a Reason
    Code of 128 or greater from the Server. Section 3.3.4: if the Server receives more than
    Receive Maximum QoS 1 and QoS 2 PUBLISH packets where it has not sent a PUBACK or PUBCOMP
    in response, it uses a DISCONNECT packet with Reason Code 0x93 (Receive Maximum
    exceeded).

    Receive Maximum 2: the client sends three QoS 2 PUBLISH packets without PUBREL, then
    keeps writing its stream; it reads the two PUBRECs and DISCONNECT 0x93, then EOF."""
    raw = clients.raw(V5)
    ack = raw.connect("rmx")
    assert ack.reason == 0 and ack.props.get("receive_maximum") == 2, ack
    for pid in (1, 2, 3):
        raw.publish("close/q2", b"unreleased", 2, pid=pid)
    keep_sending(raw.sock, V5)
    seen = assert_orderly_close(raw, DISCONNECT, 0x93)
    assert [p.pid for p in seen if p.kind == PUBREC] == [1, 2], seen


@pytest.mark.skip_mosquitto(MOSQUITTO_RESETS)
@pytest.mark.spec("MQTT-4.13.1-1", "MQTT-3.3.1-4", "MQTT-4.13.2-1")
def test_mqtt_4_13_1_1_malformed_packet_disconnect_reaches_a_sending_client(clients):
    """[MQTT-4.13.1-1] When a Server detects a Malformed Packet or Protocol Error, and a Reason
    Code is given in the specification, it MUST close the Network Connection. In the case of
    an error in a PUBLISH packet it MAY send a PUBACK or PUBREC with the Reason Code, or a
    DISCONNECT (the edge sends DISCONNECT 0x81 Malformed Packet). [MQTT-3.3.1-4] A PUBLISH
    packet MUST NOT have both QoS bits set to 1.

    A PUBLISH with QoS 3, then the stream: DISCONNECT 0x81 arrives, then EOF."""
    raw = clients.raw(V5)
    assert raw.connect("malformed-close").reason == 0
    raw.send(packet(3, 0x06, string("close/bad") + struct.pack(">H", 1)
                    + encode_properties(None) + b"qos 3"))
    keep_sending(raw.sock, V5)
    assert_orderly_close(raw, DISCONNECT, 0x81)


@pytest.mark.skip_mosquitto(MOSQUITTO_RESETS)
@pytest.mark.spec(v311=["MQTT-3.1.3-8", "MQTT-3.2.2-5", "MQTT-3.1.4-5"])
def test_mqtt_3_2_2_7_refusing_connack_reaches_a_client_that_sent_more(clients):
    """[MQTT-3.2.2-7] If a Server sends a CONNACK packet containing a Reason Code of 128 or
    greater it MUST then close the Network Connection. [MQTT-3.1.3-8] If the Server rejects
    the ClientID it MAY respond to the CONNECT packet with a CONNACK using Reason Code 0x85
    (Client Identifier not valid). (3.1.1: [MQTT-3.1.3-8] a zero-byte ClientId with
    CleanSession 0 gets return code 0x02, and [MQTT-3.2.2-5] the Server MUST then close the
    Network Connection.) [MQTT-3.1.4-5] the Server MUST NOT process any data sent by the
    Client after the CONNECT packet.

    3.1.1 CONNECT with an empty client id and Clean Session 0, written together with the
    client's first packets (clients do not wait for the CONNACK): CONNACK 0x02, then EOF."""
    raw = clients.raw(V311)
    raw.send_connect("", clean=False)
    keep_sending(raw.sock, V311)
    seen = assert_orderly_close(raw, CONNACK, 0x02)
    assert len(seen) == 1, seen


@pytest.mark.skip_mosquitto("2.0.11 closes without a CONNACK on an unknown protocol level")
@pytest.mark.spec("MQTT-3.1.2-2", "MQTT-3.2.2-7", "MQTT-3.2.2-8", "MQTT-4.13.2-1")
def test_mqtt_3_1_2_2_unsupported_protocol_connack_reaches_a_client_that_sent_more(clients):
    """[MQTT-3.1.2-2] If the Protocol Version is not 5 and the Server does not want to accept
    the CONNECT packet, the Server MAY send a CONNACK packet with Reason Code 0x84
    (Unsupported Protocol Version) and then MUST close the Network Connection.

    A CONNECT for protocol level 6, then the stream: CONNACK 0x84, then EOF."""
    raw = clients.raw(V5)
    raw.version = 6
    raw.send_connect("level6")
    raw.version = V5
    keep_sending(raw.sock, V5)
    seen = assert_orderly_close(raw, CONNACK, 0x84)
    assert len(seen) == 1, seen
