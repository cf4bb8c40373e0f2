"""Sessions: 3.1.1 Clean Session 0 and 5.0 Clean Start 0 with a Session Expiry Interval.
Session Present in CONNACK, subscriptions kept, QoS 1 and 2 messages queued while the client
is away, expiry, Clean Start discarding the session.

QoS 0 messages published while a client is away may be queued or dropped (section 3.1.2.4
lists them as optional session state): nothing here asserts either way.
"""

import time

import pytest

from mqttclient import QUIET, V311, V5
from rawmqtt import PUBREL

SESSION_EXPIRY = 300


def persistent(clients, version, client_id, **kwargs):
    """A client that keeps its session: 3.1.1 Clean Session 0, 5.0 Clean Start 0 with a
    Session Expiry Interval."""
    if version == V5:
        kwargs.setdefault("session_expiry", SESSION_EXPIRY)
    return clients.new(version, client_id=client_id, clean=False, **kwargs)


@pytest.mark.spec(
    "MQTT-3.2.2-3", "MQTT-3.1.2-6", "MQTT-3.1.4-5",
    v311=["MQTT-3.2.2-2", "MQTT-3.2.2-3", "MQTT-3.1.2-4", "MQTT-3.1.4-4"])
def test_mqtt_3_2_2_3_session_present_reflects_stored_state(clients, version):
    """[MQTT-3.2.2-3] If the Server accepts a connection with Clean Start set to 0 and the
    Server has Session State for the ClientID, it MUST set Session Present to 1 in the
    CONNACK packet, otherwise it MUST set Session Present to 0 in the CONNACK packet. In both
    cases it MUST set a 0x00 (Success) Reason Code in the CONNACK packet. [MQTT-3.1.2-6] If a
    CONNECT packet is received with Clean Start set to 0 and there is no Session associated
    with the Client Identifier, the Server MUST create a new Session. (3.1.1:
    [MQTT-3.2.2-2], [MQTT-3.2.2-3].)"""
    first = persistent(clients, version, "sp")
    ack = first.connect()
    assert (ack.reason, ack.session_present) == (0, False)
    first.disconnect()
    again = persistent(clients, version, "sp")
    ack = again.connect()
    assert (ack.reason, ack.session_present) == (0, True)


@pytest.mark.spec("MQTT-3.2.2-2", v311=["MQTT-3.2.2-1"])
def test_mqtt_3_2_2_2_clean_start_gives_session_present_0(clients, version):
    """[MQTT-3.2.2-2] If the Server accepts a connection with Clean Start set to 1, the Server
    MUST set Session Present to 0 in the CONNACK packet in addition to setting a 0x00
    (Success) Reason Code in the CONNACK packet. (3.1.1: [MQTT-3.2.2-1].)

    The client id had a stored session, so 1 would have been the answer with Clean Start 0."""
    c = persistent(clients, version, "cs")
    c.connect()
    assert c.subscribe("cs/t", 1) == [1]
    c.disconnect()
    clean = clients.new(version, client_id="cs", clean=True)
    ack = clean.connect()
    assert (ack.reason, ack.session_present) == (0, False)


@pytest.mark.spec(
    "MQTT-3.1.2-5", "MQTT-3.1.3-2", "MQTT-3.1.4-4",
    v311=["MQTT-3.1.2-4", "MQTT-3.1.3-2", "MQTT-3.1.4-3"])
def test_mqtt_3_1_2_5_resumed_session_keeps_subscriptions(clients, version):
    """[MQTT-3.1.2-5] If a CONNECT packet is received with Clean Start set to 0 and there is a
    Session associated with the Client Identifier, the Server MUST resume communications with
    the Client based on state from the existing Session. Section 4.1: the Server's session
    state includes the Client's subscriptions. (3.1.1: [MQTT-3.1.2-4].)"""
    c = persistent(clients, version, "subs")
    c.connect()
    assert c.subscribe([("keep/a", 1), ("keep/+/b", 2)]) == [1, 2]
    c.disconnect()
    again = persistent(clients, version, "subs")
    assert again.connect().session_present
    pub = clients.connect(version)
    pub.publish("keep/a", b"a", 1)
    pub.publish("keep/x/b", b"b", 2)
    got = {m.payload: m.qos for m in again.wait_messages(2)}
    assert got == {b"a": 1, b"b": 2}


@pytest.mark.spec(
    "MQTT-4.5.0-1", "MQTT-3.1.2-23", "MQTT-4.6.0-5",
    v311=["MQTT-4.5.0-1", "MQTT-3.1.2-5", "MQTT-4.6.0-6"])
def test_mqtt_4_5_0_1_qos1_and_qos2_published_while_offline_delivered_on_reconnect(
        clients, version):
    """[MQTT-4.5.0-1] When a Server takes ownership of an incoming Application Message it MUST
    add it to the Session State for those Clients that have matching Subscriptions.
    [MQTT-3.1.2-23] The Client and Server MUST store the Session State after the Network
    Connection is closed if the Session Expiry Interval is greater than 0 (3.1.1: Clean
    Session 0, [MQTT-3.1.2-5]). Section 4.3: QoS 1 at least once, QoS 2 exactly once;
    [MQTT-4.6.0-5] per topic and QoS in publish order.

    QoS 0 messages sent meanwhile are neither required nor forbidden."""
    c = persistent(clients, version, "away")
    c.connect()
    assert c.subscribe("off/#", 2) == [2]
    c.disconnect()
    pub = clients.connect(version)
    for i in range(5):
        pub.publish("off/q1", f"q1-{i}".encode(), 1)
        pub.publish("off/q2", f"q2-{i}".encode(), 2)
        pub.publish("off/q0", f"q0-{i}".encode(), 0)
    back = persistent(clients, version, "away")
    assert back.connect().session_present
    back.wait_messages(10, lambda m: m.topic != "off/q0")
    back.assert_nothing(lambda m: False, window=QUIET)  # duplicates, if any, come in now
    q1 = back.received(lambda m: m.topic == "off/q1")
    q2 = back.received(lambda m: m.topic == "off/q2")
    assert [m.payload for m in q2] == [f"q2-{i}".encode() for i in range(5)], "exactly once"
    assert all(m.qos == 2 for m in q2)
    first_seen = list(dict.fromkeys(m.payload for m in q1))
    assert first_seen == [f"q1-{i}".encode() for i in range(5)], "at least once, in order"
    assert all(m.qos == 1 for m in q1)


@pytest.mark.spec("MQTT-4.1.0-2")
def test_mqtt_4_1_0_2_session_discarded_after_expiry(clients):
    """[MQTT-4.1.0-2] The Server MUST discard the Session State when the Network Connection
    is closed and the Session Expiry Interval has passed.

    Session Expiry 1 s; the client comes back 2.5 s after disconnecting."""
    c = persistent(clients, V5, "expiring", session_expiry=1)
    c.connect()
    assert c.subscribe("exp/t", 1) == [1]
    c.disconnect()
    time.sleep(2.5)  # lets the session expire: the behaviour under test needs the time to pass
    back = persistent(clients, V5, "expiring", session_expiry=1)
    assert not back.connect().session_present
    assert back.subscribe("exp/marker", 1) == [1]
    pub = clients.connect(V5)
    pub.publish("exp/t", b"old subscription", 1)
    pub.publish("exp/marker", b"marker", 1)
    back.wait_payload("marker")
    back.assert_nothing(lambda m: m.topic == "exp/t", window=0.2)


def test_mqtt_3_1_2_23_session_expiry_0_ends_the_session_at_close(clients):
    """Section 3.1.2.11.2: if the Session Expiry Interval is absent the value 0 is used; if it
    is set to 0, or is absent, the Session ends when the Network Connection is closed.
    ([MQTT-3.1.2-23] requires storing the state only for an interval greater than 0.)"""
    c = clients.new(V5, client_id="zero", clean=False)
    assert not c.connect().session_present
    assert c.subscribe("zero/t", 1) == [1]
    c.disconnect()
    back = clients.new(V5, client_id="zero", clean=False)
    assert not back.connect().session_present


@pytest.mark.spec("MQTT-3.1.2-4", "MQTT-3.1.4-4", v311=["MQTT-3.1.2-6", "MQTT-3.1.4-3"])
def test_mqtt_3_1_2_4_clean_start_discards_the_session(clients, version):
    """[MQTT-3.1.2-4] If a CONNECT packet is received with Clean Start is set to 1, the Client
    and Server MUST discard any existing Session and start a new Session. (3.1.1:
    [MQTT-3.1.2-6] If CleanSession is set to 1, the Client and Server MUST discard any
    previous Session and start a new one.)

    Queued messages and subscriptions of the old session are gone."""
    c = persistent(clients, version, "fresh")
    c.connect()
    assert c.subscribe("fresh/t", 1) == [1]
    c.disconnect()
    pub = clients.connect(version)
    pub.publish("fresh/t", b"queued for the old session", 1)
    clean = clients.new(version, client_id="fresh", clean=True,
                        session_expiry=SESSION_EXPIRY if version == V5 else None)
    assert not clean.connect().session_present
    assert clean.subscribe("fresh/marker", 1) == [1]
    pub.publish("fresh/t", b"after", 1)
    pub.publish("fresh/marker", b"marker", 1)
    clean.wait_payload("marker")
    clean.assert_nothing(lambda m: m.topic == "fresh/t", window=0.2)


@pytest.mark.spec(v311=["MQTT-3.1.3-8", "MQTT-3.1.3-6", "MQTT-3.2.2-4", "MQTT-3.2.2-5"])
def test_mqtt_3_1_3_8_v311_empty_client_id_needs_clean_session(clients):
    """3.1.1 [MQTT-3.1.3-8] If the Client supplies a zero-byte ClientId with CleanSession set
    to 0, the Server MUST respond to the CONNECT Packet with a CONNACK return code 0x02
    (Identifier rejected) and then close the Network Connection. 3.1.1 [MQTT-3.1.3-6] A
    Server MAY allow a Client to supply a ClientId that has a length of zero bytes, however if
    it does so the Server MUST treat this as a special case and assign a unique ClientId to
    that Client. (5.0 allows an empty ClientId with Clean Start 0: see test_mqtt5.)"""
    raw = clients.raw(V311)
    ack = raw.connect("", clean=False)
    assert (ack.reason, ack.session_present) == (0x02, False), ack
    assert raw.wait_closed() == []
    ok = clients.raw(V311)
    assert ok.connect("", clean=True).reason == 0
    ok.ping()
    assert ok.recv().name == "PINGRESP"


@pytest.mark.spec("MQTT-3.1.4-3", v311=["MQTT-3.1.4-2"])
def test_mqtt_3_1_4_3_second_connection_takes_the_session_over(clients, version):
    """[MQTT-3.1.4-3] If the ClientID represents a Client already connected to the Server,
    the Server sends a DISCONNECT packet to the existing Client with Reason Code of 0x8E
    (Session taken over) ... and MUST close the Network Connection of the existing Client.
    (3.1.1: [MQTT-3.1.4-2] the Server MUST disconnect the existing Client.) The session goes
    on on the new connection.

    Only the close is a MUST; the DISCONNECT before it is not (4.13.2: a Server MAY send
    one), so a bare close passes, but a DISCONNECT sent must carry 0x8E. Mosquitto 2.0.11
    closes without DISCONNECT."""
    old = clients.raw(version)
    props = {"session_expiry_interval": SESSION_EXPIRY} if version == V5 else None
    assert old.connect("twin", clean=False, props=props).reason == 0
    assert old.subscribe(1, [("twin/t", 1)]).reasons == [1]
    new = persistent(clients, version, "twin")
    assert new.connect().session_present
    seen = old.wait_closed()
    if version == V5:
        assert [(p.name, p.reason) for p in seen] in ([], [("DISCONNECT", 0x8E)]), seen
    else:
        assert seen == [], seen
    pub = clients.connect(version)
    pub.publish("twin/t", b"to the new one", 1)
    assert new.wait_payload("to the new one").qos == 1


@pytest.mark.broker_config(max_offline_messages=5)
def test_mqtt_4_1_offline_session_queue_bounded_by_max_offline_messages(clients, version):
    """No MQTT statement: bounding what a session queues is a broker's own limit (it departs
    from [MQTT-4.5.0-1] by design, as Mosquitto's setting of the same name does).

    max_offline_messages 5 (Mosquitto: max_queued_messages) and 30 QoS 1 messages for an
    absent client: the publisher gets
    every acknowledgement (a slow subscriber never holds it up), the client gets 5 messages
    on reconnection, each once and in publish order. Which 5 (oldest or newest) is left to
    the broker; Mosquitto keeps the oldest."""
    c = persistent(clients, version, "bounded")
    c.connect()
    assert c.subscribe("bq/t", 1) == [1]
    c.disconnect()
    pub = clients.connect(version)
    for i in range(30):
        pub.publish("bq/t", f"{i}".encode(), 1)  # waits for each PUBACK
    back = persistent(clients, version, "bounded")
    assert back.connect().session_present
    back.wait_messages(5)
    back.assert_nothing(lambda m: False, window=QUIET)  # anything beyond the bound shows here
    got = [int(m.payload) for m in back.received()]
    assert len(got) == 5 and got == sorted(set(got)), got


def _away_with_queue(clients, client_id, expiry=99999):
    """A 5.0 session (Session Expiry `expiry`) subscribed to `rq/+` at QoS 2 whose client has
    left, and a publisher that has since sent it QoS 1 and QoS 2 messages; returns the
    publisher."""
    c = clients.new(V5, client_id=client_id, clean=False, session_expiry=expiry)
    assert not c.connect().session_present
    assert c.subscribe("rq/+", 2) == [2]
    c.disconnect()
    pub = clients.connect(V5)
    for i in range(3):
        pub.publish("rq/q1", f"q1-{i}".encode(), 1)
        pub.publish("rq/q2", f"q2-{i}".encode(), 2)
    return pub


@pytest.mark.spec("MQTT-3.1.2-5")
def test_mqtt_3_1_2_5_resumed_without_session_expiry_delivers_the_queue(clients):
    """[MQTT-3.1.2-5] If a CONNECT packet is received with Clean Start set to 0 and there is a
    Session associated with the Client Identifier, the Server MUST resume communications with
    the Client based on state from the existing Session. Section 3.1.2.11.2: without a
    Session Expiry Interval the value 0 is used, and the Session ends when the Network
    Connection is closed (not before: the queued messages are part of the state resumed).

    The session was left with Session Expiry 99999; the client comes back with Clean Start 0
    and no Session Expiry Interval, as paho-mqtt and many device SDKs do: Session Present 1,
    every queued QoS 1 and QoS 2 message, and the session ends with that connection."""
    _away_with_queue(clients, "resume0")
    back = clients.new(V5, client_id="resume0", clean=False)  # no properties at all
    assert back.connect().session_present
    back.wait_messages(6)
    back.assert_nothing(lambda m: False, window=QUIET)  # duplicates, if any, come in now
    q2 = [m.payload for m in back.received(lambda m: m.topic == "rq/q2")]
    assert q2 == [f"q2-{i}".encode() for i in range(3)], "exactly once, in order"
    q1 = list(dict.fromkeys(m.payload for m in back.received(lambda m: m.topic == "rq/q1")))
    assert q1 == [f"q1-{i}".encode() for i in range(3)], "at least once, in order"
    # The subscriptions are in force on the resumed connection too.
    pub = clients.connect(V5)
    pub.publish("rq/live", b"live", 2)
    assert back.wait_payload("live").qos == 2
    back.disconnect()
    # Session Expiry 0 on that connection: the session ended when it closed.
    again = clients.new(V5, client_id="resume0", clean=False)
    assert not again.connect().session_present
    pub.publish("rq/q1", b"after the end", 1)
    assert again.subscribe("rq/marker", 1) == [1]
    pub.publish("rq/marker", b"marker", 1)
    again.wait_payload("marker")
    again.assert_nothing(lambda m: m.topic.startswith("rq/q"), window=0.2)


@pytest.mark.spec("MQTT-3.1.2-5", "MQTT-4.3.3-4", "MQTT-4.3.3-5")
def test_mqtt_3_1_2_5_resumed_without_session_expiry_raw_packets(clients):
    """[MQTT-3.1.2-5] as above, seen on the wire: a CONNECT with Clean Start 0 and an empty
    property list gets CONNACK Session Present 1, then the queued messages as PUBLISH packets
    of QoS 1 and 2 ([MQTT-3.3.1-9]: the QoS of the subscription's grant and the message's
    own, whichever is lower), each flow completed by the client."""
    _away_with_queue(clients, "resume0raw")
    raw = clients.raw(V5)
    ack = raw.connect("resume0raw", clean=False)
    assert (ack.reason, ack.session_present) == (0, True), ack
    got = []
    while len(got) < 6:
        p = raw.next_publish()
        got.append((p.topic, p.qos, p.payload))
        if p.qos == 1:
            raw.puback(p.pid)
        else:
            raw.pubrec(p.pid)
            assert raw.recv_kind(PUBREL).pid == p.pid
            raw.pubcomp(p.pid)
    assert sorted(got) == sorted(
        [("rq/q1", 1, f"q1-{i}".encode()) for i in range(3)]
        + [("rq/q2", 2, f"q2-{i}".encode()) for i in range(3)]), got


@pytest.mark.spec("MQTT-3.3.2-5", "MQTT-3.3.2-6")
def test_mqtt_3_3_2_5_message_expiry_holds_on_a_session_resumed_without_expiry(clients):
    """[MQTT-3.3.2-5] a queued message whose Message Expiry Interval has passed is not
    delivered; [MQTT-3.3.2-6] one that has not carries the interval minus the time it
    waited. Here on a session resumed with Clean Start 0 and no Session Expiry Interval.

    A 1 s message and a 60 s one wait at least 2 s for the client."""
    c = clients.new(V5, client_id="resumeexp", clean=False, session_expiry=99999)
    c.connect()
    assert c.subscribe("rx/+", 1) == [1]
    c.disconnect()
    pub = clients.connect(V5)
    start = time.monotonic()
    pub.publish("rx/short", b"expires", 1, props={"MessageExpiryInterval": 1})
    pub.publish("rx/long", b"stays", 1, props={"MessageExpiryInterval": 60})
    time.sleep(2.1)  # the behaviour under test needs the intervals to pass
    back = clients.new(V5, client_id="resumeexp", clean=False)
    assert back.connect().session_present
    left = back.wait_payload("stays").props.get("MessageExpiryInterval")
    waited = time.monotonic() - start
    assert left is not None and 60 - waited - 2 <= left <= 58, (left, waited)
    pub.publish("rx/marker", b"marker", 1)
    back.wait_payload("marker")
    back.assert_nothing(lambda m: m.payload == b"expires", window=0.2)
