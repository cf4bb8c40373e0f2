"""MQTT 5.0 features: message expiry, outbound topic aliases, the client's Receive Maximum and
Maximum Packet Size, PUBLISH properties passed through, No Local, Retain As Published,
assigned client identifiers, Server Keep Alive, shared subscriptions."""

import time

import pytest

from mqttclient import QUIET, V5, sub_options, wait_until
from rawmqtt import PINGRESP


def raw_v5(clients, client_id="raw5", **kwargs):
    raw = clients.raw(V5)
    ack = raw.connect(client_id, **kwargs)
    assert ack.reason == 0, ack
    return raw


def away(clients, client_id, filt, qos=1):
    """A 5.0 session subscribed to `filt` whose client has disconnected."""
    c = clients.new(V5, client_id=client_id, clean=False, session_expiry=300)
    c.connect()
    assert c.subscribe(filt, qos) == [qos]
    c.disconnect()


def back(clients, client_id):
    c = clients.new(V5, client_id=client_id, clean=False, session_expiry=300)
    assert c.connect().session_present
    return c


# -- Message Expiry Interval ---------------------------------------------------------------

@pytest.mark.spec("MQTT-3.3.2-5")
def test_mqtt_3_3_2_5_expired_message_not_delivered(clients):
    """[MQTT-3.3.2-5] If the Message Expiry Interval has passed and the Server has not managed
    to start onward delivery to a matching subscriber, then it MUST delete the copy of the
    message for that subscriber.

    A message queued for an absent client and a retained message, both with an interval of
    1 s, are not delivered 2.5 s later; a message without expiry queued alongside is."""
    away(clients, "exp", "mx/#")
    pub = clients.connect(V5)
    pub.publish("mx/short", b"expires", 1, props={"MessageExpiryInterval": 1})
    pub.publish("mx/keep", b"stays", 1)
    pub.publish("mr/t", b"expiring retained", 1, retain=True,
                props={"MessageExpiryInterval": 1})
    time.sleep(2.5)  # the behaviour under test needs the interval to pass
    c = back(clients, "exp")
    c.wait_payload("stays")
    late = clients.connect(V5)
    assert late.subscribe([("mr/t", 1), ("mx/keep", 1)]) == [1, 1]
    pub.publish("mx/keep", b"marker", 1)
    late.wait_payload("marker")
    for client in (c, late):
        client.assert_nothing(lambda m: m.payload.startswith(b"expir"), window=0.2)


@pytest.mark.spec("MQTT-3.3.2-6")
def test_mqtt_3_3_2_6_delivered_message_carries_the_remaining_expiry(clients):
    """[MQTT-3.3.2-6] The PUBLISH packet sent to a Client by the Server MUST contain a Message
    Expiry Interval set to the received value minus the time that the Application Message
    has been waiting in the Server.

    60 s messages (one queued for an absent client, one retained) fetched at least 2 s later
    carry at most 58 (with whole-second clocks 2 s may count as 2 or 3)."""
    away(clients, "rem", "mq/#")
    live = clients.connect(V5)
    assert live.subscribe("mq/#", 1) == [1]
    pub = clients.connect(V5)
    start = time.monotonic()
    pub.publish("mq/t", b"queued", 1, props={"MessageExpiryInterval": 60})
    pub.publish("mqr/t", b"retained", 1, retain=True, props={"MessageExpiryInterval": 60})
    now = live.wait_payload("queued").props.get("MessageExpiryInterval")
    assert now is not None and 58 <= now <= 60, now
    time.sleep(2.1)  # the message waits in the server
    c = back(clients, "rem")
    queued = c.wait_payload("queued").props.get("MessageExpiryInterval")
    late = clients.connect(V5)
    assert late.subscribe("mqr/t", 1) == [1]
    retained = late.wait_payload("retained").props.get("MessageExpiryInterval")
    waited = time.monotonic() - start
    for remaining in (queued, retained):
        assert remaining is not None, "the Message Expiry Interval must be passed on"
        assert 60 - waited - 2 <= remaining <= 58, (remaining, waited)


# -- Topic aliases -------------------------------------------------------------------------

@pytest.mark.spec("MQTT-3.3.2-11", "MQTT-3.3.2-8", "MQTT-3.1.2-26")
def test_mqtt_3_3_2_11_outbound_topic_aliases_stay_within_the_client_maximum(clients):
    """[MQTT-3.3.2-11] A Server MUST NOT send a PUBLISH packet with a Topic Alias greater than
    the Topic Alias Maximum value sent by the Client in the CONNECT packet. [MQTT-3.3.2-8] A
    sender MUST NOT send a PUBLISH packet containing a Topic Alias which has the value 0.
    Section 3.3.2.3.4: a PUBLISH with an alias and an empty topic uses the topic last set for
    that alias.

    The server may or may not use aliases (Mosquitto 2.0.11 does not); whatever it does, the
    topic the application sees must be the one published to. paho-mqtt 2.2 hands aliased
    messages over unresolved; the suite's client resolves them (mqttclient.py)."""
    sub = clients.connect(V5, connect_props={"TopicAliasMaximum": 2})
    assert sub.subscribe("ta/#", 1) == [1]
    pub = clients.connect(V5)
    topics = [f"ta/{name}/a/rather/long/topic/name" for name in ("a", "b", "c", "d")]
    sent = [(topics[i % 4], f"{i}".encode()) for i in range(16)]
    for topic, payload in sent:
        pub.publish(topic, payload, 1)
    got = sub.wait_messages(16)
    assert sorted((m.topic, m.payload) for m in got) == sorted(sent)
    for m in got:
        alias = m.props.get("TopicAlias")
        assert alias is None or 1 <= alias <= 2, m


@pytest.mark.spec("MQTT-3.1.2-27")
def test_mqtt_3_1_2_27_no_topic_alias_without_client_maximum(clients):
    """[MQTT-3.1.2-27] If Topic Alias Maximum is absent or zero, the Server MUST NOT send any
    Topic Aliases to the Client."""
    for n, props in enumerate([None, {"topic_alias_maximum": 0}]):
        raw = raw_v5(clients, f"noalias{n}", props=props)
        assert raw.subscribe(1, [("na/#", 0)]).reasons == [0]
        pub = clients.connect(V5)
        for i in range(6):
            pub.publish(f"na/{i % 2}", f"{i}".encode(), 0)
        for i in range(6):
            p = raw.next_publish()
            assert "topic_alias" not in p.props and p.topic == f"na/{i % 2}", p


# -- Flow control and sizes ----------------------------------------------------------------

def _receive_maximum_2(clients, count):
    """A raw client with Receive Maximum 2 subscribed at QoS 1 and `count` QoS 1 messages
    published to it; returns the client."""
    raw = raw_v5(clients, "rm", props={"receive_maximum": 2})
    assert raw.subscribe(1, [("rm/t", 1)]).reasons == [1]
    pub = clients.connect(V5)
    for i in range(count):
        pub.publish("rm/t", f"m{i}".encode(), 1)
    return raw


@pytest.mark.spec("MQTT-3.3.4-9", "MQTT-3.3.4-10", "MQTT-4.9.0-1", "MQTT-4.9.0-3")
def test_mqtt_3_3_4_9_no_more_than_receive_maximum_unacknowledged_publishes(clients):
    """[MQTT-3.3.4-9] The Server MUST NOT send more than Receive Maximum QoS 1 and QoS 2
    PUBLISH packets for which it has not received PUBACK, PUBCOMP, or PUBREC with a Reason
    Code of 128 or greater from the Client. [MQTT-3.3.4-10] The Server MUST NOT delay the
    sending of any packets other than PUBLISH packets due to having sent Receive Maximum
    PUBLISH packets without receiving acknowledgements for them.

    Receive Maximum 2, six QoS 1 messages, no acknowledgement: two arrive, then nothing;
    a PINGREQ meanwhile is answered."""
    raw = _receive_maximum_2(clients, 6)
    first = [raw.next_publish(), raw.next_publish()]
    assert [p.payload for p in first] == [b"m0", b"m1"]
    extra = raw.quiet_for(QUIET)
    assert extra == [], f"more than Receive Maximum unacknowledged: {extra}"
    raw.ping()
    assert raw.recv().kind == PINGRESP


@pytest.mark.skip_mosquitto(
    "2.0.11 answers one PUBACK with two PUBLISH packets once its send quota was used up, "
    "leaving 3 unacknowledged under Receive Maximum 2 (likely the outgoing-quota bug in "
    "db__message_delete_outgoing described in eclipse-mosquitto/mosquitto#2301)")
@pytest.mark.spec("MQTT-3.3.4-9", "MQTT-4.9.0-2")
def test_mqtt_3_3_4_9_receive_maximum_holds_as_acknowledgements_come_in(clients):
    """[MQTT-3.3.4-9] The Server MUST NOT send more than Receive Maximum QoS 1 and QoS 2
    PUBLISH packets for which it has not received PUBACK, PUBCOMP, or PUBREC with a Reason
    Code of 128 or greater from the Client. [MQTT-4.9.0-2] Each time the Client or Server
    sends a PUBLISH packet at QoS > 0, it decrements the send quota. If the send quota reaches
    zero, the Client or Server MUST NOT send any more PUBLISH packets with QoS > 0.

    Receive Maximum 2, six QoS 1 messages: each PUBACK lets exactly one more through."""
    raw = _receive_maximum_2(clients, 6)
    inflight = [raw.next_publish(), raw.next_publish()]
    delivered = [p.payload for p in inflight]
    while len(delivered) < 6:
        raw.puback(inflight.pop(0).pid)
        inflight.append(raw.next_publish())
        delivered.append(inflight[-1].payload)
        more = raw.quiet_for(0.2)
        assert more == [], f"more than Receive Maximum unacknowledged: {more}"
    assert delivered == [f"m{i}".encode() for i in range(6)]
    for p in inflight:
        raw.puback(p.pid)


@pytest.mark.broker_config(max_queued_messages=5)
def test_mqtt_4_9_slow_subscriber_queue_bounded_by_max_queued_messages(clients):
    """No MQTT statement: bounding what waits for a slow subscriber is a broker's own limit
    (see test_session's offline variant).

    A subscriber with Receive Maximum 2 that acknowledges nothing while 30 QoS 1 messages
    are published: the publisher gets every acknowledgement, and once the subscriber starts
    acknowledging it gets at least the 5 queued and at most 2 in flight + twice the bound
    (the edge keeps QoS 1/2 up to twice its bound before it drops them; Mosquitto delivers
    exactly 7), each once, in publish order."""
    raw = _receive_maximum_2(clients, 30)  # publish() waits for each PUBACK
    got = []
    while True:
        try:
            p = raw.next_publish(timeout=1.0)
        except TimeoutError:
            break
        got.append(int(p.payload[1:]))
        raw.puback(p.pid)
    assert 5 <= len(got) <= 2 + 2 * 5 and got == sorted(set(got)), got


@pytest.mark.spec("MQTT-3.1.2-24", "MQTT-3.1.2-25")
def test_mqtt_3_1_2_24_packet_over_client_maximum_packet_size_not_sent(clients):
    """[MQTT-3.1.2-24] The Server MUST NOT send packets exceeding Maximum Packet Size to the
    Client. [MQTT-3.1.2-25] Where a Packet is too large to send, the Server MUST discard it
    without sending it and then behave as if it had completed sending that Application
    Message.

    Maximum Packet Size 200: a 1000-byte message is skipped, the small ones around it
    arrive and the connection stays up."""
    sub = clients.connect(V5, connect_props={"MaximumPacketSize": 200})
    assert sub.subscribe("mps/t", 1) == [1]
    pub = clients.connect(V5)
    pub.publish("mps/t", b"before", 1)
    pub.publish("mps/t", b"x" * 1000, 1)
    pub.publish("mps/t", b"after", 1)
    sub.wait_payload("after")
    assert [m.payload for m in sub.received()] == [b"before", b"after"]
    assert sub.disconnected is None


# -- Properties passed through -------------------------------------------------------------

def forwarded(clients, props, payload=b"payload"):
    """The properties a subscriber gets on a message published with `props`."""
    sub = clients.connect(V5)
    assert sub.subscribe("props/t", 1) == [1]
    pub = clients.connect(V5)
    pub.publish("props/t", payload, 1, props=props)
    return sub.wait_payload(payload).props


@pytest.mark.spec("MQTT-3.3.2-17", "MQTT-3.3.2-18")
def test_mqtt_3_3_2_17_user_properties_forwarded_unaltered_and_in_order(clients):
    """[MQTT-3.3.2-17] The Server MUST send all User Properties unaltered in a PUBLISH packet
    when forwarding the Application Message to a Client. [MQTT-3.3.2-18] The Server MUST
    maintain the order of User Properties when forwarding the Application Message."""
    pairs = [("k", "1"), ("a", "x"), ("k", "2"), ("ünï", "cødé"), ("empty", "")]
    assert forwarded(clients, {"UserProperty": pairs}).get("UserProperty") == pairs


@pytest.mark.spec("MQTT-3.3.2-20")
def test_mqtt_3_3_2_20_content_type_forwarded_unaltered(clients):
    """[MQTT-3.3.2-20] A Server MUST send the Content Type unaltered to all subscribers
    receiving the Application Message."""
    ct = "application/vnd.example+json; charset=utf-8"
    assert forwarded(clients, {"ContentType": ct}).get("ContentType") == ct


@pytest.mark.spec("MQTT-3.3.2-15")
def test_mqtt_3_3_2_15_response_topic_forwarded_unaltered(clients):
    """[MQTT-3.3.2-15] The Server MUST send the Response Topic unaltered to all subscribers
    receiving the Application Message."""
    assert forwarded(clients, {"ResponseTopic": "reply/to/me"}).get(
        "ResponseTopic") == "reply/to/me"


@pytest.mark.spec("MQTT-3.3.2-16")
def test_mqtt_3_3_2_16_correlation_data_forwarded_unaltered(clients):
    """[MQTT-3.3.2-16] The Server MUST send the Correlation Data unaltered to all subscribers
    receiving the Application Message."""
    data = bytes([0, 1, 2, 0xFF, 0xFE]) + b"request-42"
    assert forwarded(clients, {"CorrelationData": data}).get("CorrelationData") == data


@pytest.mark.spec("MQTT-3.3.2-4")
def test_mqtt_3_3_2_4_payload_format_indicator_forwarded_unaltered(clients):
    """[MQTT-3.3.2-4] A Server MUST send the Payload Format Indicator unaltered to all
    subscribers receiving the Application Message."""
    got = forwarded(clients, {"PayloadFormatIndicator": 1}, "utf-8 text ✓".encode())
    assert got.get("PayloadFormatIndicator") == 1


# -- Subscription options ------------------------------------------------------------------

@pytest.mark.spec("MQTT-3.8.3-3")
def test_mqtt_3_8_3_3_no_local_not_forwarded_to_the_publisher(clients):
    """[MQTT-3.8.3-3] Bit 2 of the Subscription Options represents the No Local option. If
    the value is 1, Application Messages MUST NOT be forwarded to a connection with a
    ClientID equal to the ClientID of the publishing connection."""
    me = clients.connect(V5)
    assert me.subscribe(("nl/t", sub_options(1, no_local=True))) == [1]
    other = clients.connect(V5)
    me.publish("nl/t", b"mine", 1)
    other.publish("nl/t", b"theirs", 1)
    me.wait_payload("theirs")
    me.assert_nothing(lambda m: m.payload == b"mine", window=0.2)


@pytest.mark.spec("MQTT-3.3.1-13")
def test_mqtt_3_3_1_13_retain_as_published_keeps_the_retain_flag(clients):
    """[MQTT-3.3.1-13] If the value of Retain As Published subscription option is set to 1,
    the Server MUST set the RETAIN flag equal to the RETAIN flag in the received PUBLISH
    packet."""
    sub = clients.connect(V5)
    assert sub.subscribe(("rap/t", sub_options(1, retain_as_published=True))) == [1]
    plain = clients.connect(V5)
    assert plain.subscribe("rap/t", 1) == [1]
    pub = clients.connect(V5)
    pub.publish("rap/t", b"retained", 1, retain=True)
    pub.publish("rap/t", b"not retained", 1)
    got = {m.payload: m.retain for m in sub.wait_messages(2)}
    assert got == {b"retained": True, b"not retained": False}
    assert not any(m.retain for m in plain.wait_messages(2)), "0 without the option"


# -- CONNACK -------------------------------------------------------------------------------

@pytest.mark.spec("MQTT-3.2.2-16", "MQTT-3.1.3-6", "MQTT-3.1.3-7")
def test_mqtt_3_2_2_16_assigned_client_identifier_for_an_empty_client_id(clients):
    """[MQTT-3.2.2-16] If the Client connects using a zero length Client Identifier, the
    Server MUST respond with a CONNACK containing an Assigned Client Identifier. The Assigned
    Client Identifier MUST be a new Client Identifier not used by any other Session currently
    in the Server. [MQTT-3.1.3-7] It MUST then process the CONNECT packet as if the Client
    had provided that unique ClientID."""
    ids = []
    for _ in range(3):
        c = clients.new(V5, client_id="")
        ack = c.connect()
        assert ack.reason == 0, ack
        ids.append(ack.props.get("AssignedClientIdentifier"))
    assert all(ids) and len(set(ids)) == 3, ids
    named = clients.connect(V5, client_id="named")
    assert "AssignedClientIdentifier" not in named.connack.props


@pytest.mark.broker_config(max_keepalive="10s")
@pytest.mark.spec("MQTT-3.2.2-21", "MQTT-3.2.2-22")
def test_mqtt_3_2_2_21_server_keep_alive_caps_the_client_keep_alive(clients):
    """[MQTT-3.2.2-21] If the Server sends a Server Keep Alive on the CONNACK packet, the
    Client MUST use this value instead of the Keep Alive value the Client sent on CONNECT.
    [MQTT-3.2.2-22] If the Server does not send the Server Keep Alive, the Server MUST use
    the Keep Alive value set by the Client on CONNECT. Section 3.2.2.3.14: the Server uses it
    to tell the client the keepalive it will hold it to.

    With a 10 s cap (Mosquitto refuses less): asking for 60 s, or for 0 (no keepalive), gets
    Server Keep Alive 10; asking for 5 gets no Server Keep Alive, or 5. That the server then
    enforces it would take 15 s of waiting and is left out."""
    for asked in (60, 0):
        raw = clients.raw(V5)
        ack = raw.connect(f"ka{asked}", keepalive=asked)
        assert ack.reason == 0 and ack.props.get("server_keep_alive") == 10, (asked, ack)
    raw = clients.raw(V5)
    ack = raw.connect("ka5", keepalive=5)
    assert ack.reason == 0 and ack.props.get("server_keep_alive", 5) == 5, ack


# -- Shared subscriptions ------------------------------------------------------------------

@pytest.mark.spec("MQTT-4.8.2-1", "MQTT-4.8.2-3")
def test_mqtt_4_8_2_shared_subscription_delivers_each_message_to_one_member(clients):
    """Section 4.8.2 (no statement number): each message matching a Shared Subscription is
    sent to only one of the Sessions attached to it; ordinary subscriptions get their own
    copy. [MQTT-4.8.2-3] the Server MUST respect the granted QoS for the Client's
    subscription. [MQTT-4.8.2-1] A Shared Subscription's Topic Filter MUST start with
    $share/ and MUST contain a ShareName that is at least one character long.

    The spec does not require balance; the suite asks that with 20 messages and two
    idle members both get some (what any round-robin or random choice gives)."""
    members = [clients.connect(V5), clients.connect(V5)]
    assert members[0].subscribe("$share/g/sh/+", 1) == [1]
    assert members[1].subscribe("$share/g/sh/+", 0) == [0]
    plain = clients.connect(V5)
    assert plain.subscribe("sh/+", 1) == [1]
    pub = clients.connect(V5)
    sent = [f"s{i}".encode() for i in range(20)]
    for p in sent:
        pub.publish("sh/t", p, 1)
    assert sorted(m.payload for m in plain.wait_messages(20)) == sorted(sent)
    wait_until(lambda: sum(len(m.received()) for m in members) >= 20, "20 shared deliveries")
    members[0].assert_nothing(lambda m: False, window=0.2)  # duplicates, if any, come in now
    got = [[m.payload for m in member.received()] for member in members]
    assert sorted(got[0] + got[1]) == sorted(sent), f"each message exactly once: {got}"
    assert got[0] and got[1], f"both members receive some: {got}"
    assert all(m.qos == 1 for m in members[0].received())
    assert all(m.qos == 0 for m in members[1].received())
    assert all(m.topic == "sh/t" for member in members for m in member.received())
