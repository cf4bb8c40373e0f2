"""The packets themselves, byte by byte: what the server sends (flags, identifiers, lengths,
reason codes) and what it does with packets that break the format (reserved bits, missing
payloads, bad strings, wildcards in topic names).

A server that detects a malformed packet or a protocol error closes the connection
([MQTT-4.13.1-1]; 3.1.1: [MQTT-4.8.0-1]); a 5.0 server may send a DISCONNECT with a reason
code of 0x80 or more first (section 4.13), a 3.1.1 server sends nothing. `assert_refused`
accepts exactly that.
"""

import struct

import pytest

from brokers import skip_if_mosquitto
from mqttclient import QUIET, V311, V5
from rawmqtt import (AUTH, CONNACK, CONNECT, DISCONNECT, PINGREQ, PINGRESP, PUBACK, PUBCOMP,
                     PUBLISH, PUBREC, PUBREL, SUBACK, SUBSCRIBE, UNSUBACK, UNSUBSCRIBE,
                     Closed, encode_properties, packet, string)


def connected(clients, version, client_id, **kwargs):
    raw = clients.raw(version)
    ack = raw.connect(client_id, **kwargs)
    assert ack.reason == 0, ack
    return raw


def assert_refused(raw, version, codes=None):
    """The server closes the connection, after at most one DISCONNECT (5.0 only) with a
    reason code of 0x80 or more (one of `codes` if given). Returns what came."""
    seen = raw.wait_closed()
    assert len(seen) <= 1, seen
    for p in seen:
        assert version == V5 and p.kind == DISCONNECT and p.reason >= 0x80, seen
        if codes is not None:
            assert p.reason in codes, seen
        assert "session_expiry_interval" not in p.props, p  # [MQTT-3.14.2-2]
    return seen


def assert_connect_refused(raw, version, connack_codes=()):
    """A refused CONNECT: the connection is closed, after at most one CONNACK (with one of
    `connack_codes`, Session Present 0), never a DISCONNECT ([MQTT-3.14.0-1])."""
    seen = raw.wait_closed()
    assert len(seen) <= 1, seen
    for p in seen:
        assert p.kind == CONNACK and p.reason in connack_codes, seen
        assert not p.session_present, p
    return seen


def connect_bytes(version, client_id, flags=0x02, name=b"MQTT", level=None, rest=b"",
                  props=None):
    body = string(name) + bytes([version if level is None else level, flags])
    body += struct.pack(">H", 60)
    if version == V5:
        body += encode_properties(props)
    return packet(CONNECT, 0, body + string(client_id) + rest)


# -- what the server sends -------------------------------------------------------------

@pytest.mark.spec("MQTT-3.12.4-1", "MQTT-4.2-1", v311=["MQTT-3.12.4-1", "MQTT-7.1.1-1"])
def test_mqtt_3_12_4_1_pingreq_is_answered_with_pingresp(clients, version):
    """[MQTT-3.12.4-1] The Server MUST send a PINGRESP packet in response to a PINGREQ
    packet. [MQTT-4.2-1] (3.1.1: [MQTT-7.1.1-1]) the transport is an ordered, lossless
    byte stream: here TCP, and ten PINGREQs written at once get ten PINGRESPs."""
    raw = connected(clients, version, "pinger")
    raw.send(packet(PINGREQ, 0, b"") * 10)
    for _ in range(10):
        p = raw.recv()
        assert (p.kind, p.flags, p.wire_size) == (PINGRESP, 0, 2), p


@pytest.mark.spec("MQTT-3.2.0-1", "MQTT-3.2.0-2", "MQTT-3.2.2-1", "MQTT-3.1.4-5",
                  "MQTT-2.2.2-1", "MQTT-4.12.0-6", "MQTT-3.1.2-28",
                  v311=["MQTT-3.2.0-1", "MQTT-3.1.4-4"])
def test_mqtt_3_2_0_1_connack_comes_first_once_with_reserved_flags_0(clients, version):
    """[MQTT-3.2.0-1] The Server MUST send a CONNACK with a 0x00 (Success) Reason Code
    before sending any Packet other than AUTH. [MQTT-3.2.0-2] ... MUST NOT send more than one
    CONNACK in a Network Connection. [MQTT-3.2.2-1] Bits 7-1 of the Connect Acknowledge
    Flags are reserved and MUST be set to 0. [MQTT-3.1.4-5] The Server MUST acknowledge the
    CONNECT packet with a CONNACK packet containing a 0x00 (Success) Reason Code.
    5.0 [MQTT-4.12.0-6] without an Authentication Method in the CONNECT the Server MUST NOT
    send an AUTH packet nor an Authentication Method in the CONNACK; [MQTT-3.1.2-28] with
    Request Response Information 0 it MUST NOT return Response Information;
    [MQTT-2.2.2-1] packets without properties carry a Property Length of 0 (the SUBACK
    decodes to exactly its reason code).

    CONNECT, SUBSCRIBE and PINGREQ in one write (clients need not wait for the CONNACK):
    CONNACK first, then SUBACK and PINGRESP, nothing else. (The edge used to leave packets
    that came in the same read as the CONNECT unprocessed until the client sent more.)"""
    raw = clients.raw(version)
    props = {"request_response_information": 0} if version == V5 else None
    sub = struct.pack(">H", 5) + (encode_properties(None) if version == V5 else b"")
    sub += string("first/t") + bytes([1])
    body = string("MQTT") + bytes([version, 0x02]) + struct.pack(">H", 60)
    if version == V5:
        body += encode_properties(props)
    raw.send(packet(CONNECT, 0, body + string("first"))
             + packet(SUBSCRIBE, 0x02, sub) + packet(PINGREQ, 0, b""))
    seen = [raw.recv(), raw.recv(), raw.recv()]
    # (The order of the SUBACK and the PINGRESP is not specified.)
    assert seen[0].kind == CONNACK and {p.kind for p in seen[1:]} == {SUBACK, PINGRESP}, seen
    seen[1:] = sorted(seen[1:], key=lambda p: p.kind)
    ack = seen[0]
    assert (ack.reason, ack.ack_flags) == (0, 0), ack
    if version == V5:
        assert not {"authentication_method", "authentication_data",
                    "response_information"} & set(ack.props), ack
    assert (seen[1].pid, seen[1].reasons) == (5, [1]), seen[1]
    assert raw.quiet_for(QUIET) == [], "a second CONNACK or an AUTH"


@pytest.mark.spec("MQTT-3.3.1-2", "MQTT-4.3.1-1", "MQTT-2.2.1-2", "MQTT-1.5.5-1",
                  "MQTT-3.3.2-1",
                  v311=["MQTT-3.3.1-2", "MQTT-4.3.1-1", "MQTT-2.3.1-5", "MQTT-3.3.2-1"])
def test_mqtt_3_3_1_2_qos0_delivery_has_dup_0_no_packet_id_and_a_minimal_length(
        clients, version):
    """[MQTT-3.3.1-2] The DUP flag MUST be set to 0 for all QoS 0 messages. [MQTT-4.3.1-1]
    (QoS 0 sender) MUST send a PUBLISH packet with QoS 0 and DUP flag set to 0.
    [MQTT-2.2.1-2] A PUBLISH packet MUST NOT contain a Packet Identifier if its QoS value is
    set to 0. [MQTT-1.5.5-1] The encoded value (of a Variable Byte Integer) MUST use the
    minimum number of bytes necessary. [MQTT-3.3.2-1] The Topic Name comes first.

    Payloads of 10, 200 and 20000 bytes (remaining lengths of 1, 2 and 3 bytes), published
    at QoS 0 and at QoS 1 with DUP set: each arrives at QoS 0 with DUP 0, topic then payload
    exactly (a packet identifier would show in the payload), the Remaining Length in the
    fewest bytes."""
    raw = connected(clients, version, "q0sub")
    assert raw.subscribe(1, [("q0/t", 0)]).reasons == [0]
    pub = connected(clients, version, "q0pub")
    sizes = [10, 200, 20000]
    for n, size in enumerate(sizes):
        pub.publish("q0/t", bytes([n]) * size, 0)
        pub.publish("q0/t", bytes([n + 100]) * size, 1, pid=n + 1, dup=True)
        assert pub.recv_kind(PUBACK).pid == n + 1
    for n, size in enumerate(sizes):
        for first in (n, n + 100):
            p = raw.next_publish()
            assert (p.topic, p.qos, p.dup, p.pid) == ("q0/t", 0, False, None), p
            assert p.payload == bytes([first]) * size, p
            remaining = p.wire_size - p.header_size
            minimal = 1 if remaining < 128 else 2 if remaining < 16384 else 3
            assert p.header_size == 1 + minimal, (p.header_size, remaining)


@pytest.mark.spec("MQTT-3.3.1-3", "MQTT-4.3.2-2", v311=["MQTT-3.3.1-3"])
def test_mqtt_3_3_1_3_dup_of_a_forwarded_publish_is_set_independently(clients, version):
    """[MQTT-3.3.1-3] The DUP flag in the outgoing PUBLISH packet is set independently to the
    incoming PUBLISH packet, its value MUST be determined solely by whether the outgoing
    PUBLISH packet is a retransmission. [MQTT-4.3.2-2] a QoS 1 PUBLISH goes out with DUP 0.

    A publisher's first (and only) QoS 1 and QoS 2 PUBLISH packets carry DUP 1: the
    subscriber's copies, first sends, carry DUP 0."""
    raw = connected(clients, version, "dupsub")
    assert raw.subscribe(1, [("dup/t", 2)]).reasons == [2]
    pub = connected(clients, version, "duppub")
    pub.publish("dup/t", b"one", 1, pid=1, dup=True)
    assert pub.recv_kind(PUBACK).pid == 1
    pub.publish("dup/t", b"two", 2, pid=2, dup=True)
    assert pub.recv_kind(PUBREC).pid == 2
    pub.pubrel(2)
    assert pub.recv_kind(PUBCOMP).pid == 2
    got = {}
    for _ in range(2):
        p = raw.next_publish()
        got[p.payload] = (p.qos, p.dup)
        if p.qos == 1:
            raw.puback(p.pid)
        else:
            raw.pubrec(p.pid)
            assert raw.recv_kind(PUBREL).pid == p.pid
            raw.pubcomp(p.pid)
    assert got == {b"one": (1, False), b"two": (2, False)}, got


@pytest.mark.spec("MQTT-1.5.4-3", v311=["MQTT-1.5.3-3"])
def test_mqtt_1_5_4_3_byte_order_mark_in_a_topic_is_kept(clients, version):
    """[MQTT-1.5.4-3] A UTF-8 encoded sequence 0xEF 0xBB 0xBF is always interpreted as U+FEFF
    ("ZERO WIDTH NO-BREAK SPACE") wherever it appears in a string and MUST NOT be skipped over
    or stripped off by a packet receiver.

    A subscription to "\\ufeffbom/t" gets a message published to that topic, with the topic
    as sent; one to "bom/t" gets neither that message nor anything else before its own."""
    with_bom = connected(clients, version, "bom")
    assert with_bom.subscribe(1, [("\ufeffbom/t", 1)]).reasons == [1]
    without = connected(clients, version, "nobom")
    assert without.subscribe(1, [("bom/t", 1)]).reasons == [1]
    pub = connected(clients, version, "bompub")
    pub.publish("\ufeffbom/t", b"with", 1, pid=1)
    pub.publish("bom/t", b"without", 1, pid=2)
    p = with_bom.next_publish()
    assert (p.topic, p.payload) == ("\ufeffbom/t", b"with"), p
    assert without.next_publish().payload == b"without"


# -- acknowledgements of what the client publishes --------------------------------------

@pytest.mark.spec("MQTT-4.3.2-4", "MQTT-4.3.2-5", "MQTT-2.2.1-5", "MQTT-3.4.2-1",
                  v311=["MQTT-4.3.2-2", "MQTT-2.3.1-6"])
def test_mqtt_4_3_2_5_qos1_packet_id_reused_after_puback_is_a_new_message(clients, version):
    """[MQTT-4.3.2-4] (QoS 1 receiver) MUST respond with a PUBACK packet containing the Packet
    Identifier from the incoming PUBLISH packet. [MQTT-4.3.2-5] After it has sent a PUBACK
    packet the receiver MUST treat any incoming PUBLISH packet that contains the same Packet
    Identifier as being a new Application Message, irrespective of the setting of its DUP
    flag. [MQTT-3.4.2-1] the PUBACK reason is one of the PUBACK Reason Codes (here 0x00).

    Packet id 77 three times (the last with DUP 1), each after the previous PUBACK: three
    PUBACKs for 77 and three deliveries."""
    sub = connected(clients, version, "q1sub")
    assert sub.subscribe(1, [("q1r/t", 1)]).reasons == [1]
    pub = connected(clients, version, "q1pub")
    for n, dup in enumerate((False, False, True)):
        pub.publish("q1r/t", f"m{n}".encode(), 1, pid=77, dup=dup)
        ack = pub.recv_kind(PUBACK)
        assert (ack.pid, ack.reason, ack.flags) == (77, 0, 0), ack
    got = []
    for _ in range(3):
        p = sub.next_publish()
        got.append(p.payload)
        sub.puback(p.pid)
    assert got == [b"m0", b"m1", b"m2"], got


@pytest.mark.spec("MQTT-4.3.3-8", "MQTT-4.3.3-10", "MQTT-4.3.3-11", "MQTT-4.3.3-12",
                  "MQTT-3.5.2-1", "MQTT-3.7.2-1", "MQTT-2.2.1-5",
                  v311=["MQTT-4.3.3-2", "MQTT-2.3.1-6"])
def test_mqtt_4_3_3_10_qos2_publish_repeated_before_pubrel_is_delivered_once(
        clients, version):
    """[MQTT-4.3.3-8] (QoS 2 receiver) MUST respond with a PUBREC containing the Packet
    Identifier from the incoming PUBLISH packet. [MQTT-4.3.3-10] Until it has received the
    corresponding PUBREL packet, the receiver MUST acknowledge any subsequent PUBLISH packet
    with the same Packet Identifier by sending a PUBREC. It MUST NOT cause duplicate messages
    to be delivered to any onward recipients in this case. [MQTT-4.3.3-11] MUST respond to a
    PUBREL packet by sending a PUBCOMP packet containing the same Packet Identifier as the
    PUBREL. [MQTT-4.3.3-12] After it has sent a PUBCOMP, the receiver MUST treat any
    subsequent PUBLISH packet that contains that Packet Identifier as being a new Application
    Message.

    Packet id 9: PUBLISH, PUBLISH again with DUP 1, PUBREL; then PUBLISH 9 with another
    payload and its PUBREL. Two PUBRECs and a PUBCOMP each time; the subscriber gets each
    payload exactly once."""
    sub = connected(clients, version, "q2sub")
    assert sub.subscribe(1, [("q2r/t", 2)]).reasons == [2]
    pub = connected(clients, version, "q2pub")
    for payload in (b"first", b"second"):
        pub.publish("q2r/t", payload, 2, pid=9)
        assert pub.recv_kind(PUBREC).pid == 9
        pub.publish("q2r/t", payload, 2, pid=9, dup=True)
        rec = pub.recv_kind(PUBREC)
        assert (rec.pid, rec.reason) == (9, 0), rec
        pub.pubrel(9)
        comp = pub.recv_kind(PUBCOMP)
        assert (comp.pid, comp.reason) == (9, 0), comp
    got = []
    while len(got) < 2:
        p = sub.next_publish()
        got.append(p.payload)
        sub.pubrec(p.pid)
        assert sub.recv_kind(PUBREL).pid == p.pid
        sub.pubcomp(p.pid)
    assert got == [b"first", b"second"]
    assert sub.quiet_for(QUIET) == [], "a duplicate delivery"


@pytest.mark.spec("MQTT-4.3.3-13")
def test_mqtt_4_3_3_13_qos2_sequence_completes_after_the_message_expired(clients):
    """[MQTT-4.3.3-13] (QoS 2 receiver) MUST continue the QoS 2 acknowledgement sequence even
    if it has applied message expiry.

    A QoS 2 PUBLISH with Message Expiry Interval 1 gets its PUBREC; the PUBREL comes after
    the interval has passed and still gets PUBCOMP."""
    import time

    pub = connected(clients, V5, "expiring-q2")
    pub.publish("q2x/t", b"short-lived", 2, pid=5, props={"message_expiry_interval": 1})
    assert pub.recv_kind(PUBREC).pid == 5
    time.sleep(2.2)  # the behaviour under test needs the interval to pass
    pub.pubrel(5)
    comp = pub.recv_kind(PUBCOMP)
    assert (comp.pid, comp.reason) == (5, 0), comp


# -- CONNECT the server must refuse -----------------------------------------------------

@pytest.mark.spec("MQTT-3.1.2-1", "MQTT-3.14.0-1", v311=["MQTT-3.1.2-1"])
def test_mqtt_3_1_2_1_protocol_name_other_than_mqtt_is_refused(clients, version):
    """[MQTT-3.1.2-1] The protocol name MUST be the UTF-8 String "MQTT". If the Server does
    not want to accept the CONNECT, and wishes to reveal that it is an MQTT Server it MAY send
    a CONNACK packet with Reason Code of 0x84 (Unsupported Protocol Version), and then it MUST
    close the Network Connection. (3.1.1: the Server MAY disconnect the Client, and MUST NOT
    go on processing the CONNECT under this specification.) [MQTT-3.14.0-1] no DISCONNECT
    before a successful CONNACK.

    "MQTX" and "mqtt": the connection is closed, after at most a refusing CONNACK."""
    for name in (b"MQTX", b"mqtt"):
        raw = clients.raw(version)
        raw.send(connect_bytes(version, "badname", name=name))
        assert_connect_refused(raw, version, (0x84,) if version == V5 else (0x01,))


@pytest.mark.spec(v311=["MQTT-3.1.2-2", "MQTT-3.2.2-4", "MQTT-3.2.2-5"])
def test_mqtt_3_1_2_2_v311_unsupported_protocol_level_gets_return_code_1(clients):
    """3.1.1 [MQTT-3.1.2-2] The Server MUST respond to the CONNECT Packet with a CONNACK
    return code 0x01 (unacceptable protocol level) and then disconnect the Client if the
    Protocol Level is not supported by the Server. [MQTT-3.2.2-4] with a non-zero return
    code Session Present is 0; [MQTT-3.2.2-5] the Server then closes the connection.

    Protocol level 2 with the name "MQTT" (no such level): CONNACK 0x01, then EOF."""
    raw = clients.raw(V311)
    raw.send(connect_bytes(V311, "level2", level=2))
    seen = raw.wait_closed()
    assert [(p.kind, p.reason, p.session_present) for p in seen] == [(CONNACK, 0x01, False)], \
        seen


@pytest.mark.spec("MQTT-3.1.2-3", "MQTT-3.1.4-1", "MQTT-3.14.0-1",
                  v311=["MQTT-3.1.2-3", "MQTT-3.1.4-1", "MQTT-3.2.2-6"])
def test_mqtt_3_1_2_3_reserved_connect_flag_set_is_refused(clients, version):
    """[MQTT-3.1.2-3] The Server MUST validate that the reserved flag in the CONNECT packet is
    set to 0 (3.1.1: and disconnect the Client if it is not). [MQTT-3.1.4-1] ... close the
    Network Connection if it does not match. 3.1.1 [MQTT-3.2.2-6] where no return code
    applies, close without a CONNACK.

    Connect Flags 0x03 (reserved bit and Clean Start): closed; 5.0 may first send CONNACK
    0x81 (Malformed Packet); 3.1.1 gets no CONNACK."""
    raw = clients.raw(version)
    raw.send(connect_bytes(version, "reserved", flags=0x03))
    assert_connect_refused(raw, version, (0x81,) if version == V5 else ())


@pytest.mark.spec("MQTT-3.1.4-1", "MQTT-3.1.0-1", "MQTT-3.1.2-11", "MQTT-3.1.2-12",
                  "MQTT-3.1.2-13", "MQTT-3.14.0-1",
                  v311=["MQTT-3.1.4-1", "MQTT-3.2.2-6", "MQTT-3.1.2-13", "MQTT-3.1.2-14",
                        "MQTT-3.1.2-15", "MQTT-3.1.2-22", "MQTT-3.1.0-1"])
@pytest.mark.parametrize("case", ["will qos without will flag", "will retain without will flag",
                                  "will qos 3", "password without user name",
                                  "first packet not connect", "missing client id"])
def test_mqtt_3_1_4_1_connect_not_matching_the_format_is_refused(clients, version, case):
    """[MQTT-3.1.4-1] The Server MUST validate that the CONNECT packet matches the format
    described in section 3.1 and close the Network Connection if it does not match. The
    format rules on the client's side: [MQTT-3.1.2-11] Will QoS 0 without the Will Flag,
    [MQTT-3.1.2-13] Will Retain 0 without it, [MQTT-3.1.2-12] Will QoS 0, 1 or 2 with it,
    3.1.1 [MQTT-3.1.2-22] no password without a user name (5.0 allows one),
    [MQTT-3.1.0-1] CONNECT first, [MQTT-3.1.3-3] a Client Identifier.

    Each such CONNECT closes the connection; 5.0 may first get a CONNACK 0x80 or more,
    3.1.1 none ([MQTT-3.2.2-6]: no return code applies)."""
    if case == "password without user name" and version == V5:
        pytest.skip("5.0 allows a password without a user name (section 3.1.2.9)")
    raw = clients.raw(version)
    will = string("w/t") + string(b"w")
    if version == V5:
        will = encode_properties(None) + will
    data = {
        "will qos without will flag": connect_bytes(version, "c", flags=0x02 | 0x08),
        "will retain without will flag": connect_bytes(version, "c", flags=0x02 | 0x20),
        "will qos 3": connect_bytes(version, "c", flags=0x02 | 0x04 | 0x18, rest=will),
        "password without user name": connect_bytes(version, "c", flags=0x02 | 0x40,
                                                    rest=string(b"secret")),
        "first packet not connect": packet(PINGREQ, 0, b""),
        "missing client id": connect_bytes(version, "c")[:-3],
    }[case]
    if case == "missing client id":  # the Remaining Length must match what is left
        body = data[2:]
        data = bytes([data[0], len(body)]) + body
    raw.send(data)
    assert_connect_refused(raw, version, tuple(range(0x80, 0x100)) if version == V5 else ())


@pytest.mark.spec("MQTT-3.1.3-5", v311=["MQTT-3.1.3-5"])
def test_mqtt_3_1_3_5_client_ids_of_1_to_23_letters_and_digits_are_accepted(clients, version):
    """[MQTT-3.1.3-5] The Server MUST allow ClientID's which are between 1 and 23 UTF-8
    encoded bytes in length, and that contain only the characters
    "0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ"."""
    for cid in ("a", "Z", "7", "0123456789abcdefghijKLM", "ABCDEFGHIJKLMNOPQRSTUVW"):
        raw = clients.raw(version)
        ack = raw.connect(cid)
        assert ack.reason == 0, (cid, ack)
        raw.disconnect()


@pytest.mark.skip_mosquitto("2.0.11 takes client ids of any length")
@pytest.mark.spec("MQTT-3.1.3-8", "MQTT-3.2.2-6", "MQTT-3.2.2-7", "MQTT-3.2.2-8",
                  v311=["MQTT-3.1.3-9", "MQTT-3.2.2-4", "MQTT-3.2.2-5"])
def test_mqtt_3_1_3_8_client_id_over_the_limit_is_refused(clients, version):
    """[MQTT-3.1.3-8] If the Server rejects the ClientID it MAY respond to the CONNECT packet
    with a CONNACK using Reason Code 0x85 (Client Identifier not valid) ... and then it MUST
    close the Network Connection. (3.1.1 [MQTT-3.1.3-9]: CONNACK 0x02, then close.)
    [MQTT-3.2.2-6] Session Present 0 with a non-zero reason.

    The edge refuses client ids longer than mqtt.max_client_id_length (256 by default)."""
    raw = clients.raw(version)
    raw.send_connect("x" * 300)
    seen = raw.wait_closed()
    code = 0x85 if version == V5 else 0x02
    assert [(p.kind, p.reason, p.session_present) for p in seen] == [(CONNACK, code, False)], \
        seen


@pytest.mark.skip_mosquitto("2.0.11 takes client ids of any length: the CONNECT is not "
                             "refused")
@pytest.mark.spec("MQTT-3.1.4-6", v311=["MQTT-3.1.4-5"])
def test_mqtt_3_1_4_6_nothing_after_a_refused_connect_is_processed(clients, version):
    """[MQTT-3.1.4-6] If the Server rejects the CONNECT, it MUST NOT process any data sent by
    the Client after the CONNECT packet except AUTH packets. (3.1.1 [MQTT-3.1.4-5].)

    A CONNECT the server refuses (a 300-byte client id) written together with a retained
    PUBLISH: the connection is closed and no retained message was stored."""
    raw = clients.raw(version)
    body = string("nr/t") + (encode_properties(None) if version == V5 else b"") + b"nope"
    raw.send(connect_bytes(version, "y" * 300) + packet(PUBLISH, 0x01, body))
    raw.wait_closed()
    sub = connected(clients, version, "nr-check")
    assert sub.subscribe(1, [("nr/t", 0), ("nr-mark/t", 0)]).reasons == [0, 0]
    pub = connected(clients, version, "nr-pub")
    pub.publish("nr-mark/t", b"marker", 0)
    assert sub.next_publish().payload == b"marker", "a retained message was stored"


@pytest.mark.spec("MQTT-3.1.0-2", "MQTT-3.2.0-2", "MQTT-4.13.1-1",
                  v311=["MQTT-3.1.0-2", "MQTT-4.8.0-1"])
def test_mqtt_3_1_0_2_second_connect_is_a_protocol_error(clients, version):
    """[MQTT-3.1.0-2] The Server MUST process a second CONNECT packet sent from a Client as a
    Protocol Error and close the Network Connection. [MQTT-3.2.0-2] no second CONNACK."""
    raw = connected(clients, version, "twice")
    raw.send_connect("twice")
    assert_refused(raw, version, (0x82,))


# -- malformed packets after the CONNECT ------------------------------------------------

BAD_FLAGS = {
    # packet kind: (flags that are wrong, a body that is otherwise right)
    "SUBSCRIBE": (SUBSCRIBE, 0x00, lambda v: struct.pack(">H", 1)
                  + (encode_properties(None) if v == V5 else b"") + string("x/t") + b"\x01"),
    "UNSUBSCRIBE": (UNSUBSCRIBE, 0x00, lambda v: struct.pack(">H", 1)
                    + (encode_properties(None) if v == V5 else b"") + string("x/t")),
    "PUBREL": (PUBREL, 0x00, lambda v: struct.pack(">H", 1)),
    "PINGREQ": (PINGREQ, 0x01, lambda v: b""),
    "DISCONNECT": (DISCONNECT, 0x01, lambda v: b""),
    "AUTH": (AUTH, 0x01, lambda v: bytes([0x18]) + encode_properties(None)),
}


@pytest.mark.spec("MQTT-2.1.3-1", "MQTT-3.8.1-1", "MQTT-3.10.1-1", "MQTT-3.6.1-1",
                  "MQTT-3.14.1-1", "MQTT-3.15.1-1", "MQTT-4.13.1-1", "MQTT-4.13.2-1",
                  "MQTT-3.14.2-1", "MQTT-3.14.2-2", "MQTT-3.14.4-1", "MQTT-3.14.4-2",
                  v311=["MQTT-2.2.2-1", "MQTT-2.2.2-2", "MQTT-3.8.1-1", "MQTT-3.10.1-1",
                        "MQTT-3.6.1-1", "MQTT-3.14.1-1", "MQTT-4.8.0-1"])
@pytest.mark.parametrize("kind", list(BAD_FLAGS))
def test_mqtt_2_1_3_1_reserved_fixed_header_flags_make_a_packet_malformed(
        broker, clients, version, kind):
    """[MQTT-2.1.3-1] Where a flag bit is marked as "Reserved", it is reserved for future use
    and MUST be set to the value listed. SUBSCRIBE [MQTT-3.8.1-1], UNSUBSCRIBE
    [MQTT-3.10.1-1] and PUBREL [MQTT-3.6.1-1] with other flags than 0010, and AUTH
    [MQTT-3.15.1-1] with other flags than 0000: the Server MUST treat them as malformed and
    close the Network Connection; DISCONNECT [MQTT-3.14.1-1] with reserved bits set gets
    DISCONNECT 0x81 (if anything). PINGREQ has reserved flags 0000 too. (3.1.1:
    [MQTT-2.2.2-2] a receiver of invalid flags MUST close the Network Connection; AUTH is a
    reserved packet type.)"""
    if kind == "PINGREQ":
        skip_if_mosquitto(broker, "2.0.11 answers a PINGREQ with reserved flags set")
    packet_kind, flags, body = BAD_FLAGS[kind]
    raw = connected(clients, version, f"bad-{kind.lower()}")
    raw.send(packet(packet_kind, flags, body(version)))
    assert_refused(raw, version, (0x81, 0x82) if kind == "AUTH" else (0x81,))


@pytest.mark.spec("MQTT-3.8.3-2", "MQTT-3.10.3-2", v311=["MQTT-3.8.3-3", "MQTT-3.10.3-2"])
@pytest.mark.parametrize("kind", ["SUBSCRIBE", "UNSUBSCRIBE"])
def test_mqtt_3_8_3_2_subscribe_or_unsubscribe_without_a_filter_is_refused(
        clients, version, kind):
    """[MQTT-3.8.3-2] The Payload (of SUBSCRIBE) MUST contain at least one Topic Filter and
    Subscription Options pair. [MQTT-3.10.3-2] The Payload of an UNSUBSCRIBE packet MUST
    contain at least one Topic Filter. A packet without is a Protocol Error (5.0: 0x82 or
    0x81 if a DISCONNECT is sent)."""
    raw = connected(clients, version, "nofilter")
    body = struct.pack(">H", 3) + (encode_properties(None) if version == V5 else b"")
    raw.send(packet(SUBSCRIBE if kind == "SUBSCRIBE" else UNSUBSCRIBE, 0x02, body))
    assert_refused(raw, version, (0x81, 0x82))


@pytest.mark.spec("MQTT-3.8.3-5", v311=["MQTT-3.8.3-4"])
@pytest.mark.parametrize("options", [0x41, 0x81, 0x03, 0x31])
def test_mqtt_3_8_3_5_reserved_subscription_option_bits_are_malformed(
        clients, version, options):
    """[MQTT-3.8.3-5] The Server MUST treat a SUBSCRIBE packet as malformed if any of Reserved
    bits in the Payload are non-zero. QoS 3 and (5.0) Retain Handling 3 are malformed too
    (section 3.8.3.1). (3.1.1 [MQTT-3.8.3-4]: the upper 6 bits of the requested QoS byte are
    0, and QoS 3 is malformed.)"""
    raw = connected(clients, version, "badopts")
    raw.send_subscribe(4, [("opts/t", options)])
    assert_refused(raw, version, (0x81, 0x82))


@pytest.mark.spec("MQTT-3.3.2-2", "MQTT-4.7.0-1", v311=["MQTT-3.3.2-2", "MQTT-4.7.1-1"])
@pytest.mark.parametrize("topic", ["wild/+", "wild/#", "+"])
def test_mqtt_3_3_2_2_publish_to_a_wildcard_topic_is_refused(clients, version, topic):
    """[MQTT-3.3.2-2] The Topic Name in the PUBLISH packet MUST NOT contain wildcard
    characters. [MQTT-4.7.0-1] The wildcard characters can be used in Topic Filters, but MUST
    NOT be used within a Topic Name.

    A QoS 1 PUBLISH to such a name: either the connection is closed (5.0: after DISCONNECT
    0x90 Topic Name invalid or 0x82/0x81) or (5.0) a PUBACK 0x90; the message reaches no
    subscriber."""
    sub = connected(clients, version, "wildsub")
    assert sub.subscribe(1, [("#", 1)]).reasons == [1]
    raw = connected(clients, version, "wildpub")
    raw.publish(topic, b"wild", 1, pid=1)
    try:
        answer = raw.recv()
    except Closed:
        answer = None
    if answer is not None:
        assert version == V5 and answer.reason >= 0x80, answer
        assert answer.kind in (DISCONNECT, PUBACK), answer
        if answer.kind == DISCONNECT:
            assert raw.wait_closed() == []
    mark = connected(clients, version, "wildmark")
    mark.publish("wild-mark/t", b"marker", 1, pid=1)
    p = sub.next_publish()
    assert p.payload == b"marker", p


@pytest.mark.spec("MQTT-4.7.3-1", v311=["MQTT-4.7.3-1"])
def test_mqtt_4_7_3_1_empty_topic_name_and_filter_are_refused(clients, version):
    """[MQTT-4.7.3-1] All Topic Names and Topic Filters MUST be at least one character long.

    A SUBSCRIBE to "" gets a failure reason code (0x80 or more) for it, or the connection is
    closed; a PUBLISH to "" (without a Topic Alias) closes the connection."""
    raw = connected(clients, version, "empty-filter")
    raw.send_subscribe(2, [("", 1)])
    try:
        ack = raw.recv()
    except Closed:  # also right
        ack = None
    if ack is not None and ack.kind == SUBACK:
        assert ack.reasons and ack.reasons[0] >= 0x80, ack
    elif ack is not None:
        assert version == V5 and ack.kind == DISCONNECT and ack.reason >= 0x80, ack
    raw = connected(clients, version, "empty-topic")
    raw.publish("", b"nowhere", 0)
    assert_refused(raw, version, (0x81, 0x82, 0x90))


@pytest.mark.spec("MQTT-4.7.3-2", "MQTT-1.5.4-2", v311=["MQTT-4.7.3-2", "MQTT-1.5.3-2"])
@pytest.mark.parametrize("where", ["topic name", "topic filter"])
def test_mqtt_4_7_3_2_null_character_in_a_topic_is_refused(clients, version, where):
    """[MQTT-4.7.3-2] Topic Names and Topic Filters MUST NOT include the null character
    (Unicode U+0000). [MQTT-1.5.4-2] A UTF-8 Encoded String MUST NOT include an encoding of
    the null character U+0000 (3.1.1 [MQTT-1.5.3-2]: a receiver of one MUST close the Network
    Connection)."""
    raw = connected(clients, version, "nul")
    if where == "topic name":
        raw.publish("nul/\0/t", b"x", 0)
    else:
        raw.send_subscribe(3, [("nul/\0/t", 0)])
    assert_refused(raw, version, (0x81, 0x82, 0x90))


@pytest.mark.spec("MQTT-1.5.4-1", "MQTT-1.5.7-1", v311=["MQTT-1.5.3-1"])
@pytest.mark.parametrize("bad", [b"\xc3\x28", b"\xed\xa0\x80", b"\xff"])
def test_mqtt_1_5_4_1_ill_formed_utf8_is_refused(clients, version, bad):
    """[MQTT-1.5.4-1] The character data in a UTF-8 Encoded String MUST be well-formed UTF-8
    ... MUST NOT include encodings of code points between U+D800 and U+DFFF (3.1.1
    [MQTT-1.5.3-1]: a receiver of ill-formed UTF-8 MUST close the Network Connection).
    5.0 [MQTT-1.5.7-1] both strings of a UTF-8 String Pair follow the same rules.

    An ill-formed sequence, a surrogate (ED A0 80) and a lone FF in a topic name; in 5.0
    also in a User Property of a PUBLISH: each closes the connection."""
    places = ["topic"] + (["user property"] if version == V5 else [])
    for place in places:
        raw = connected(clients, version, "utf8")
        if place == "topic":
            body = string(b"utf8/" + bad)
            if version == V5:
                body += encode_properties(None)
        else:
            body = string("utf8/t") + encode_properties({"user_property": [(b"k", bad)]})
        raw.send(packet(PUBLISH, 0, body + b"x"))
        assert_refused(raw, version, (0x81, 0x82, 0x90))


# -- 3.1.1 statements without a 5.0 counterpart of the same shape --------------------------

@pytest.mark.spec("MQTT-3.3.1-4", v311=["MQTT-3.3.1-4"])
def test_mqtt_3_3_1_4_publish_with_qos_3_closes_the_connection(clients, version):
    """[MQTT-3.3.1-4] A PUBLISH Packet MUST NOT have both QoS bits set to 1. If a Server or
    Client receives a PUBLISH Packet which has both QoS bits set to 1 it MUST close the
    Network Connection (5.0: a Malformed Packet, DISCONNECT 0x81 if any)."""
    raw = connected(clients, version, "qos3")
    body = string("q3/t") + struct.pack(">H", 1)
    if version == V5:
        body += encode_properties(None)
    raw.send(packet(PUBLISH, 0x06, body + b"qos 3"))
    assert_refused(raw, version, (0x81,))


@pytest.mark.spec(v311=["MQTT-3.1.2-7", "MQTT-3.3.1-7"])
def test_mqtt_3_1_2_7_v311_retained_message_outlives_its_session_and_qos0_replaces(clients):
    """3.1.1 [MQTT-3.1.2-7] Retained messages do not form part of the Session state in the
    Server, they MUST NOT be deleted when the Session ends. 3.1.1 [MQTT-3.3.1-7] a retained
    QoS 0 message replaces any previous retained message of its topic.

    A Clean Session client publishes a retained QoS 1 message and then a retained QoS 0 one
    on the same topic and disconnects (its session ends): a new subscriber gets the QoS 0
    one, with RETAIN 1."""
    pub = connected(clients, V311, "ret-pub")
    pub.publish("r311/t", b"first", 1, pid=1, retain=True)
    assert pub.recv_kind(PUBACK).pid == 1
    pub.publish("r311/t", b"second", 0, retain=True)
    pub.publish("r311-mark/t", b"", 1, pid=2)  # its PUBACK: the QoS 0 one was taken
    assert pub.recv_kind(PUBACK).pid == 2
    pub.disconnect()
    sub = connected(clients, V311, "ret-sub")
    assert sub.subscribe(1, [("r311/t", 1)]).reasons == [1]
    p = sub.next_publish()
    assert (p.payload, p.retain, p.qos) == (b"second", True, 0), p
    assert sub.quiet_for(QUIET) == []


@pytest.mark.spec(v311=["MQTT-3.1.2-12"])
def test_mqtt_3_1_2_12_v311_no_will_flag_no_will(clients):
    """3.1.1 [MQTT-3.1.2-12] If the Will Flag is set to 0, a Will Message MUST NOT be
    published when this Network Connection ends.

    A client without a Will (its CONNECT carries no Will fields) drops its connection: an
    observer of "#" gets nothing but the marker published afterwards."""
    obs = connected(clients, V311, "nowill-obs")
    assert obs.subscribe(1, [("#", 0)]).reasons == [0]
    gone = connected(clients, V311, "nowill")
    gone.close()
    pub = connected(clients, V311, "nowill-pub")
    # Once the broker saw the close, a new connection with that client id is accepted
    # cleanly; the marker comes after it.
    again = connected(clients, V311, "nowill")
    again.disconnect()
    pub.publish("nowill-mark/t", b"marker", 0)
    p = obs.next_publish()
    assert (p.topic, p.payload) == ("nowill-mark/t", b"marker"), p
