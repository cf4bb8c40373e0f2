"""MQTT 5.0 limits and options the client sets for what the server sends it, and what the
server does with features it does not offer: the client's Maximum Packet Size on every packet
(not only PUBLISH), Request Problem Information 0, Server Keep Alive enforced, topic aliases
that belong to one Network Connection, and enhanced authentication refused.
"""

import struct

import pytest

from mqttclient import V5
from rawmqtt import AUTH, CONNACK, DISCONNECT, PUBLISH, SUBACK, encode_properties, packet, string


def raw_v5(clients, client_id, **kwargs):
    raw = clients.raw(V5)
    ack = raw.connect(client_id, **kwargs)
    assert ack.reason == 0, ack
    return raw




# -- Maximum Packet Size on packets other than PUBLISH ------------------------------------

@pytest.mark.skip_mosquitto("2.0.11 closes the connection (0x81) on the invalid filter")
@pytest.mark.spec("MQTT-3.9.2-1", "MQTT-3.9.2-2", "MQTT-3.1.2-24")
def test_mqtt_3_9_2_1_suback_reason_string_dropped_over_the_client_maximum_packet_size(
        clients):
    """[MQTT-3.9.2-1] The Server MUST NOT send this property (Reason String) if it would
    increase the size of the SUBACK packet beyond the Maximum Packet Size specified by the
    Client. [MQTT-3.1.2-24] The Server MUST NOT send packets exceeding Maximum Packet Size to
    the Client.

    A SUBSCRIBE with an invalid filter: a client without a limit gets a SUBACK with a Reason
    String; one with Maximum Packet Size 20 gets the SUBACK (0x8F) without it, within 20
    bytes."""
    roomy = raw_v5(clients, "mps-roomy")
    ack = roomy.subscribe(1, [("bad/#/filter", 0)])
    assert ack.reasons == [0x8F] and "reason_string" in ack.props, ack
    tight = raw_v5(clients, "mps-tight", props={"maximum_packet_size": 20})
    ack = tight.subscribe(1, [("bad/#/filter", 0)])
    assert ack.reasons == [0x8F] and "reason_string" not in ack.props, ack
    assert ack.wire_size <= 20, ack


@pytest.mark.spec("MQTT-3.14.2-3", "MQTT-3.14.2-4", "MQTT-3.1.2-24")
def test_mqtt_3_14_2_3_disconnect_reason_string_dropped_over_the_client_maximum_packet_size(
        clients):
    """[MQTT-3.14.2-3] The sender MUST NOT send this Property (Reason String) if it would
    increase the size of the DISCONNECT packet beyond the Maximum Packet Size specified by
    the receiver. [MQTT-3.1.2-24] the Server MUST NOT send packets exceeding Maximum Packet
    Size to the Client.

    A PUBLISH with QoS 3 (malformed, [MQTT-3.3.1-4]) from a client with Maximum Packet Size
    16: if the server sends a DISCONNECT it is 0x81 within 16 bytes; then the connection is
    closed."""
    raw = raw_v5(clients, "mps-disc", props={"maximum_packet_size": 16})
    raw.send(packet(PUBLISH, 0x06, string("mps/bad") + struct.pack(">H", 1)
                    + encode_properties(None) + b"qos 3"))
    seen = raw.wait_closed()
    assert all(p.kind == DISCONNECT for p in seen), seen
    for p in seen:
        assert p.reason == 0x81 and p.wire_size <= 16, p


@pytest.mark.spec("MQTT-3.2.2-19", "MQTT-3.2.2-20", "MQTT-3.1.2-24")
def test_mqtt_3_2_2_19_connack_reason_string_dropped_over_the_client_maximum_packet_size(
        clients):
    """[MQTT-3.2.2-19] The Server MUST NOT send this property (Reason String) if it would
    increase the size of the CONNACK packet beyond the Maximum Packet Size specified by the
    Client.

    A refused CONNECT (an Authentication Method the server does not support) with Maximum
    Packet Size 10: the CONNACK carries its reason code and fits in 10 bytes."""
    raw = clients.raw(V5)
    raw.send_connect("mps-connack", props={"maximum_packet_size": 10,
                                           "authentication_method": "SCRAM-SHA-256"})
    seen = raw.wait_closed()
    assert len(seen) == 1 and seen[0].kind == CONNACK and seen[0].reason >= 0x80, seen
    assert seen[0].wire_size <= 10, seen


# -- Request Problem Information ----------------------------------------------------------

@pytest.mark.skip_mosquitto("2.0.11 closes the connection (0x81) on the invalid filter")
@pytest.mark.spec("MQTT-3.1.2-29")
def test_mqtt_3_1_2_29_no_reason_string_with_request_problem_information_0(clients):
    """[MQTT-3.1.2-29] If the value of Request Problem Information is 0, the Server MAY return
    a Reason String or User Properties on a CONNACK or DISCONNECT packet, but MUST NOT send a
    Reason String or User Properties on any packet other than PUBLISH, CONNACK, or
    DISCONNECT.

    SUBSCRIBE and UNSUBSCRIBE with invalid and unknown filters, QoS 1 and 2 PUBLISH: no
    SUBACK, UNSUBACK, PUBACK, PUBREC or PUBCOMP carries a Reason String or User Property."""
    raw = raw_v5(clients, "rpi0", props={"request_problem_information": 0})
    acks = [raw.subscribe(1, [("bad/#/filter", 1), ("ok/t", 1)])]
    raw.send_unsubscribe(2, ["never/subscribed", "ok/t"])
    acks.append(raw.recv())
    raw.publish("ok/other", b"q1", 1, pid=3)
    acks.append(raw.recv())
    raw.publish("ok/other", b"q2", 2, pid=4)
    acks.append(raw.recv())
    raw.pubrel(4)
    acks.append(raw.recv())
    assert [p.name for p in acks] == ["SUBACK", "UNSUBACK", "PUBACK", "PUBREC", "PUBCOMP"]
    assert acks[0].reasons[0] == 0x8F, acks[0]
    for p in acks:
        assert "reason_string" not in p.props and "user_property" not in p.props, p


# -- Server Keep Alive --------------------------------------------------------------------

@pytest.mark.skip_mosquitto("2.0.11 refuses max_keepalive below 10 s")
@pytest.mark.broker_config(max_keepalive="1s")
@pytest.mark.spec("MQTT-3.1.2-22", "MQTT-3.2.2-21")
def test_mqtt_3_2_2_21_server_keep_alive_is_the_keep_alive_the_server_enforces(clients):
    """[MQTT-3.2.2-21] If the Server sends a Server Keep Alive on the CONNACK packet, the
    Client MUST use this value instead of the Keep Alive value the Client sent on CONNECT.
    [MQTT-3.1.2-22] If the Keep Alive value is non-zero and the Server does not receive an
    MQTT Control Packet from the Client within one and a half times the Keep Alive time
    period, it MUST close the Network Connection to the Client as if the network had failed.

    max_keepalive 1 s: clients asking for 60 s and for 0 (none) get Server Keep Alive 1, and
    one that then stays silent is disconnected (DISCONNECT 0x8D Keep Alive timeout, which
    section 4.13 allows, then the close) long before 60 s."""
    for asked in (60, 0):
        raw = clients.raw(V5)
        ack = raw.connect(f"ska{asked}", keepalive=asked)
        assert ack.reason == 0 and ack.props.get("server_keep_alive") == 1, ack
        seen = raw.wait_closed(timeout=20)
        assert [(p.kind, p.reason) for p in seen] in ([], [(DISCONNECT, 0x8D)]), seen


# -- Topic aliases belong to one Network Connection ---------------------------------------

@pytest.mark.spec("MQTT-3.3.2-7", "MQTT-3.3.2-12")
def test_mqtt_3_3_2_7_inbound_topic_alias_does_not_outlive_its_connection(clients):
    """[MQTT-3.3.2-7] A receiver MUST NOT carry forward any Topic Alias mappings from one
    Network Connection to another. Section 3.3.2.3.4: a PUBLISH with an alias the receiver
    has no mapping for is a Protocol Error (DISCONNECT 0x82).

    A client with a persistent session sets alias 1 to `ta/first`, reconnects (the session
    is resumed) and publishes with alias 1 and no topic: the server closes the connection,
    with DISCONNECT 0x82 if it sends one. On a third connection alias 1 is set again, to
    `ta/second`, and messages go to `ta/second`, never to `ta/first`."""
    sub = clients.connect(V5)
    assert sub.subscribe("ta/+", 1) == [1]
    props = {"session_expiry_interval": 300}
    first = raw_v5(clients, "aliaser", clean=False, props=props)
    first.publish("ta/first", b"one", 1, pid=1, props={"topic_alias": 1})
    assert first.recv().name == "PUBACK"
    first.disconnect()
    second = clients.raw(V5)
    assert second.connect("aliaser", clean=False, props=props).session_present
    second.publish("", b"stale alias", 1, pid=2, props={"topic_alias": 1})
    seen = second.wait_closed()
    assert [(p.kind, p.reason) for p in seen] in ([], [(DISCONNECT, 0x82)]), seen
    third = clients.raw(V5)
    assert third.connect("aliaser", clean=False, props=props).reason == 0
    third.publish("ta/second", b"two", 1, pid=3, props={"topic_alias": 1})
    third.publish("", b"three", 1, pid=4, props={"topic_alias": 1})
    got = [(m.topic, m.payload) for m in sub.wait_messages(3)]
    assert got == [("ta/first", b"one"), ("ta/second", b"two"), ("ta/second", b"three")], got


@pytest.mark.spec("MQTT-3.3.2-7")
def test_mqtt_3_3_2_7_outbound_topic_alias_not_carried_to_a_new_connection(clients):
    """[MQTT-3.3.2-7] A receiver MUST NOT carry forward any Topic Alias mappings from one
    Network Connection to another; so a sender cannot use one either: the server's first
    PUBLISH for a topic on a new connection of the same session carries the topic name.

    A persistent session with Topic Alias Maximum 4 gets messages on `tb/t` (the server may
    alias them), reconnects, and every PUBLISH on the new connection either names its topic
    or uses an alias set earlier on that connection."""
    props = {"session_expiry_interval": 300, "topic_alias_maximum": 4}
    raw = raw_v5(clients, "alias-sub", clean=False, props=props)
    assert raw.subscribe(1, [("tb/t", 1)]).reasons == [1]
    pub = clients.connect(V5)
    sent = set()
    for conn in range(2):
        new = {f"{conn}-{i}".encode() for i in range(3)}
        for payload in sorted(new):
            pub.publish("tb/t", payload, 1)
        sent |= new
        mapping = {}
        while new:
            p = raw.next_publish()
            alias = p.props.get("topic_alias")
            if p.topic:
                if alias is not None:
                    mapping[alias] = p.topic
                topic = p.topic
            else:
                assert alias in mapping, f"connection {conn}: alias {alias} not set on it: {p}"
                topic = mapping[alias]
            # (QoS 1: a message of the previous connection may come again.)
            assert topic == "tb/t" and p.payload in sent, p
            new.discard(p.payload)
            raw.puback(p.pid)
        raw.disconnect()
        raw = clients.raw(V5)
        assert raw.connect("alias-sub", clean=False, props=props).session_present


# -- Enhanced authentication --------------------------------------------------------------

@pytest.mark.skip_mosquitto("the reference instance runs without an authentication plugin")
@pytest.mark.spec("MQTT-4.12.0-1", "MQTT-4.12.0-4", "MQTT-3.2.2-6")
def test_mqtt_4_12_0_1_unsupported_authentication_method_refused_with_0x8c(clients):
    """[MQTT-4.12.0-1] If the Server does not support the Authentication Method supplied by
    the Client, it MAY send a CONNACK with a Reason Code of 0x8C (Bad authentication method)
    or 0x87 (Not Authorized) as described in section 4.13 and MUST close the Network
    Connection.

    The edge offers no enhanced authentication: CONNECT with Authentication Method
    SCRAM-SHA-256 gets CONNACK 0x8C, then the connection is closed; no session was made."""
    raw = clients.raw(V5)
    raw.send_connect("scram", clean=False, props={"authentication_method": "SCRAM-SHA-256",
                                                   "authentication_data": b"client-first",
                                                   "session_expiry_interval": 300})
    seen = raw.wait_closed()
    assert [(p.kind, p.reason, p.session_present) for p in seen] == [(CONNACK, 0x8C, False)], \
        seen
    again = clients.raw(V5)
    ack = again.connect("scram", clean=False, props={"session_expiry_interval": 300})
    assert (ack.reason, ack.session_present) == (0, False), ack


@pytest.mark.spec("MQTT-4.12.0-7")
def test_mqtt_4_12_0_2_auth_without_authentication_method_is_a_protocol_error(clients):
    """[MQTT-4.12.0-7] If the Client does not include an Authentication Method in the
    CONNECT, the Client MUST NOT send an AUTH packet to the Server; one that does commits a
    Protocol Error: the
    Server closes the connection, with DISCONNECT 0x82 if it
    sends one (section 4.13)."""
    raw = raw_v5(clients, "auth-none")
    raw.send(packet(AUTH, 0, bytes([0x18]) + encode_properties(
        {"authentication_method": "SCRAM-SHA-256"})))
    seen = raw.wait_closed()
    assert [(p.kind, p.reason) for p in seen] in ([], [(DISCONNECT, 0x82)]), seen
