"""Retained messages: stored, sent on subscription with RETAIN 1, replaced, cleared by an
empty payload, forwarded live with RETAIN 0, Retain Handling 0/1/2, QoS capped by the
subscription.

Statement numbers are MQTT 5.0's; the 3.1.1 statement of the same rule is named in the
docstring where its number differs.
"""

import pytest

from mqttclient import V5, sub_options


@pytest.mark.spec(
    "MQTT-3.3.1-5", "MQTT-3.3.1-9",
    v311=["MQTT-3.3.1-5", "MQTT-3.3.1-6", "MQTT-3.3.1-8"])
def test_mqtt_3_3_1_9_retained_message_sent_on_subscribe_with_retain_flag(clients, version):
    """[MQTT-3.3.1-5] If the RETAIN flag is set to 1 in a PUBLISH packet sent by a Client to a
    Server, the Server MUST replace any existing retained message for this topic and store
    the Application Message. [MQTT-3.3.1-9] If Retain Handling is set to 0 the Server MUST
    send the retained messages matching the Topic Filter of the subscription to the Client.
    Section 3.3.1.3: these messages are sent with the RETAIN flag set to 1 (3.1.1:
    [MQTT-3.3.1-6] and [MQTT-3.3.1-8])."""
    pub = clients.connect(version)
    pub.publish("r/t", b"kept", 1, retain=True)
    pub.publish("r/u/v", b"deeper", 0, retain=True)
    # QoS 0 has no acknowledgement: a later QoS 1 PUBACK on the same connection shows the
    # server has taken the message (another connection's SUBSCRIBE may overtake it before).
    pub.publish("r-marker/t", b"", 1)
    sub = clients.connect(version)
    assert sub.subscribe("r/#", 1) == [1]
    got = {m.topic: m for m in sub.wait_messages(2)}
    assert set(got) == {"r/t", "r/u/v"}
    assert got["r/t"].payload == b"kept" and got["r/t"].retain and got["r/t"].qos == 1
    assert got["r/u/v"].payload == b"deeper" and got["r/u/v"].retain


@pytest.mark.spec("MQTT-3.3.1-5", v311=["MQTT-3.3.1-5"])
def test_mqtt_3_3_1_5_new_retained_message_replaces_the_old(clients, version):
    """[MQTT-3.3.1-5] If the RETAIN flag is set to 1 in a PUBLISH packet sent by a Client to a
    Server, the Server MUST replace any existing retained message for this topic and store
    the Application Message."""
    pub = clients.connect(version)
    for payload in (b"one", b"two", b"three"):
        pub.publish("rr/t", payload, 1, retain=True)
    sub = clients.connect(version)
    assert sub.subscribe("rr/t", 1) == [1]
    assert sub.wait_payload("three").retain
    sub.assert_nothing(lambda m: m.payload != b"three", window=0.2)
    assert len(sub.received()) == 1, sub.received()


@pytest.mark.spec("MQTT-3.3.1-6", "MQTT-3.3.1-7", v311=["MQTT-3.3.1-10", "MQTT-3.3.1-11"])
def test_mqtt_3_3_1_6_retained_empty_payload_clears(clients, version):
    """[MQTT-3.3.1-6] If the Payload contains zero bytes it is processed normally by the
    Server but any retained message with the same topic name MUST be removed and any future
    subscribers for the topic will not receive a retained message. [MQTT-3.3.1-7] A retained
    message with a Payload containing zero bytes MUST NOT be stored as a retained message on
    the Server. (3.1.1: [MQTT-3.3.1-10], [MQTT-3.3.1-11].)"""
    pub = clients.connect(version)
    pub.publish("rc/t", b"stale", 1, retain=True)
    pub.publish("rc/other", b"keep", 1, retain=True)
    existing = clients.connect(version)
    assert existing.subscribe("rc/#", 1) == [1]
    existing.wait_messages(2)
    pub.publish("rc/t", b"", 1, retain=True)
    cleared = existing.wait_message(lambda m: m.payload == b"")
    assert cleared.topic == "rc/t" and not cleared.retain, "processed normally: sent on live"
    later = clients.connect(version)
    assert later.subscribe("rc/#", 1) == [1]
    assert later.wait_payload("keep").topic == "rc/other"
    later.assert_nothing(lambda m: m.topic == "rc/t", window=0.2, what="cleared retained")


@pytest.mark.spec("MQTT-3.3.1-8", v311=["MQTT-3.3.1-12"])
def test_mqtt_3_3_1_8_non_retained_publish_leaves_the_retained_message(clients, version):
    """[MQTT-3.3.1-8] If the RETAIN flag is 0 in a PUBLISH packet sent by a Client to a
    Server, the Server MUST NOT store the message as a retained message and MUST NOT remove
    or replace any existing retained message. (3.1.1: [MQTT-3.3.1-12].)"""
    pub = clients.connect(version)
    pub.publish("rn/t", b"retained", 1, retain=True)
    pub.publish("rn/t", b"live", 1)
    pub.publish("rn/t", b"", 1)  # not retained: clears nothing
    sub = clients.connect(version)
    assert sub.subscribe("rn/t", 1) == [1]
    assert sub.wait_payload("retained").retain
    sub.assert_nothing(lambda m: m.payload != b"retained", window=0.2)


@pytest.mark.spec("MQTT-3.3.1-12", v311=["MQTT-3.3.1-9"])
def test_mqtt_3_3_1_12_live_message_forwarded_with_retain_0(clients, version):
    """[MQTT-3.3.1-12] If the value of Retain As Published subscription option is set to 0,
    the Server MUST set the RETAIN flag to 0 when forwarding an Application Message
    regardless of how the RETAIN flag was set in the received PUBLISH packet. (3.1.1:
    [MQTT-3.3.1-9] It MUST set the RETAIN flag to 0 when a PUBLISH Packet is sent to a Client
    because it matches an established subscription regardless of how the flag was set in the
    message it received.)"""
    sub = clients.connect(version)
    assert sub.subscribe("rl/t", 2) == [2]
    pub = clients.connect(version)
    for qos in (0, 1, 2):
        pub.publish("rl/t", f"q{qos}".encode(), qos, retain=True)
    for m in sub.wait_messages(3):
        assert not m.retain, m


@pytest.mark.spec("MQTT-3.3.1-9", "MQTT-3.8.4-4")
def test_mqtt_3_3_1_9_retain_handling_0_sends_on_every_subscribe(clients):
    """[MQTT-3.3.1-9] If Retain Handling is set to 0 the Server MUST send the retained
    messages matching the Topic Filter of the subscription to the Client. [MQTT-3.8.4-4] If
    the Retain Handling option is 0, any existing retained messages matching the Topic Filter
    MUST be re-sent, but Application Messages MUST NOT be lost due to replacing the
    Subscription."""
    pub = clients.connect(V5)
    pub.publish("rh0/t", b"kept", 1, retain=True)
    sub = clients.connect(V5)
    assert sub.subscribe(("rh0/#", sub_options(1, retain_handling=0))) == [1]
    assert sub.wait_payload("kept").retain
    assert sub.subscribe(("rh0/#", sub_options(1, retain_handling=0))) == [1]
    again = sub.wait_messages(2, lambda m: m.payload == b"kept")
    assert all(m.retain for m in again)


def _retained_on_resubscribe(clients, handling):
    """(first subscription's retained payloads, re-subscription's) with Retain Handling
    `handling`; a Retain Handling 0 subscription to another topic afterwards marks when
    the server has answered both."""
    pub = clients.connect(V5)
    pub.publish("rh/t", b"kept", 1, retain=True)
    pub.publish("mark/t", b"mark", 1, retain=True)
    sub = clients.connect(V5)
    seen = []
    for n in (1, 2):
        assert sub.subscribe(("rh/#", sub_options(1, retain_handling=handling))) == [1]
        assert sub.subscribe(("mark/t", sub_options(1, retain_handling=0))) == [1]
        sub.wait_messages(n, lambda m: m.payload == b"mark")
        seen.append(len(sub.received(lambda m: m.payload == b"kept")))
    sub.assert_nothing(lambda m: False, window=0.2)
    total = len(sub.received(lambda m: m.payload == b"kept"))
    return seen[0], total - seen[0]


@pytest.mark.spec("MQTT-3.3.1-10")
def test_mqtt_3_3_1_10_retain_handling_1_sends_only_for_a_new_subscription(clients):
    """[MQTT-3.3.1-10] If Retain Handling is set to 1 then if the subscription did not
    already exist, the Server MUST send all retained message matching the Topic Filter of the
    subscription to the Client, and if the subscription did exist the Server MUST NOT send
    the retained messages."""
    assert _retained_on_resubscribe(clients, 1) == (1, 0)


@pytest.mark.spec("MQTT-3.3.1-11")
def test_mqtt_3_3_1_11_retain_handling_2_never_sends(clients):
    """[MQTT-3.3.1-11] If Retain Handling is set to 2, the Server MUST NOT send the retained
    messages."""
    assert _retained_on_resubscribe(clients, 2) == (0, 0)


@pytest.mark.spec("MQTT-3.8.4-8", v311=["MQTT-3.8.4-6"])
def test_mqtt_3_8_4_8_retained_message_qos_capped_by_granted_qos(clients, version):
    """[MQTT-3.8.4-8] The QoS of Application Messages sent in response to a Subscription MUST
    be the minimum of the QoS of the originally published message and the Maximum QoS granted
    by the Server (3.1.1: [MQTT-3.8.4-6]); this holds for retained messages sent at
    subscription too."""
    pub = clients.connect(version)
    for qos in (0, 1, 2):
        pub.publish(f"rq/{qos}", f"at{qos}".encode(), qos, retain=True)
    for granted in (0, 1, 2):
        sub = clients.connect(version)
        assert sub.subscribe("rq/#", granted) == [granted]
        got = {m.topic: m.qos for m in sub.wait_messages(3)}
        assert got == {f"rq/{q}": min(q, granted) for q in (0, 1, 2)}, (granted, got)
        assert all(m.retain for m in sub.received())
