"""SUBSCRIBE, SUBACK, UNSUBSCRIBE, UNSUBACK, topic matching and outbound QoS flows.

Statement numbers are MQTT 5.0's; where a behaviour has no numbered statement the name
carries the section number and the docstring says so.
"""

import pytest

import rawmqtt
from brokers import skip_if_mosquitto
from mqttclient import QUIET, V311, V5, payloads
from rawmqtt import PUBREL, SUBACK, UNSUBACK, Closed


def raw_connected(clients, version, client_id="raw", **kwargs):
    raw = clients.raw(version)
    ack = raw.connect(client_id, **kwargs)
    assert ack.reason == 0, ack
    return raw


@pytest.mark.spec(
    "MQTT-3.8.4-1", "MQTT-3.8.4-2", "MQTT-2.2.1-6",
    v311=["MQTT-3.8.4-1", "MQTT-3.8.4-2", "MQTT-2.3.1-7"])
def test_mqtt_3_8_4_1_suback_carries_the_subscribe_packet_id(clients, version):
    """[MQTT-3.8.4-1] When the Server receives a SUBSCRIBE packet from a Client, the Server
    MUST respond with a SUBACK packet. [MQTT-3.8.4-2] The SUBACK packet MUST have the same
    Packet Identifier as the SUBSCRIBE packet that it is acknowledging."""
    raw = raw_connected(clients, version)
    for pid in (1, 4242, 65535):
        ack = raw.subscribe(pid, [(f"s/{pid}", 1)])
        assert ack.kind == SUBACK and ack.pid == pid
        assert ack.reasons == [1]


@pytest.mark.spec(
    "MQTT-3.9.3-1", "MQTT-3.9.3-2", "MQTT-3.8.4-5", "MQTT-3.8.4-6", "MQTT-3.8.4-7",
    v311=["MQTT-3.9.3-1", "MQTT-3.9.3-2", "MQTT-3.8.4-4", "MQTT-3.8.4-5"])
def test_mqtt_3_9_3_1_suback_has_a_reason_code_per_filter_in_order(clients, version):
    """[MQTT-3.9.3-1] The order of Reason Codes in the SUBACK packet MUST match the order of
    Topic Filters in the SUBSCRIBE packet. [MQTT-3.8.4-6] The SUBACK packet sent by the
    Server to the Client MUST contain a Reason Code for each Topic Filter/Subscription
    Option pair. [MQTT-3.8.4-7] This Reason Code MUST either show the maximum QoS that was
    granted for that Subscription or indicate that the subscription failed.

    The suite expects a broker that grants QoS 2 (neither the edge nor Mosquitto announce a
    lower Maximum QoS), so each code is the QoS asked for."""
    c = clients.connect(version)
    codes = c.subscribe([("o/a", 2), ("o/b", 0), ("o/c/#", 1), ("o/+/d", 2), ("#", 0)])
    assert codes == [2, 0, 1, 2, 0]


@pytest.mark.parametrize("bad_filter", ["bad/#/x", "bad/x#", "bad/x+/y"])
@pytest.mark.spec("MQTT-4.7.1-1", "MQTT-4.7.1-2", v311=["MQTT-4.7.1-2", "MQTT-4.7.1-3"])
def test_mqtt_4_7_1_1_misplaced_wildcard_filter_is_refused(clients, version, bad_filter):
    """[MQTT-4.7.1-1] The multi-level wildcard character MUST be specified either on its own
    or following a topic level separator. In either case it MUST be the last character
    specified in the Topic Filter. [MQTT-4.7.1-2] The single-level wildcard ... MUST occupy
    an entire level of the filter.

    A server may answer such a filter with a failure reason code for it (3.1.1: 0x80, 5.0:
    0x80 or more, e.g. 0x8F Topic Filter invalid) or treat the packet as malformed and close
    the connection (4.13; 3.1.1 4.8). Either is accepted; granting it is not. Mosquitto
    closes the connection."""
    raw = raw_connected(clients, version)
    raw.send_subscribe(7, [("good/t", 1), (bad_filter, 1)])
    try:
        ack = raw.recv()
    except Closed:
        return
    if ack.kind != SUBACK:  # 5.0: DISCONNECT with a reason code, then close
        assert ack.kind == rawmqtt.DISCONNECT and ack.reason >= 0x80, ack
        return
    assert ack.reasons[0] == 1, ack
    assert ack.reasons[1] >= 0x80, f"{bad_filter!r} was granted: {ack}"


def _deliveries(clients, version, filt, topics, marker):
    """Subscribes to `filt`, publishes one message to each topic and then to `marker` (which
    must match), and returns the topics delivered once the marker is in."""
    sub = clients.connect(version)
    assert sub.subscribe(filt, 1) == [1]
    pub = clients.connect(version)
    for t in topics:
        pub.publish(t, t.encode(), 1)
    pub.publish(marker, b"marker", 1)
    sub.wait_payload("marker")
    sub.assert_nothing(lambda m: False, window=0.2)  # stragglers, if any, show up below
    return sorted(m.topic for m in sub.received())


@pytest.mark.spec("MQTT-4.7.1-2", "MQTT-3.3.2-3", v311=["MQTT-4.7.1-3", "MQTT-3.3.2-3"])
def test_mqtt_4_7_1_3_single_level_wildcard_matches_exactly_one_level(clients, version):
    """Section 4.7.1.3 (no statement number): the single-level wildcard matches only one
    topic level; "sport/+/player1" matches "sport/tennis/player1" and "sport//player1" (an
    empty level is a level), not "sport/tennis/x/player1"; "+" matches "a", not "a/b" or
    "/a"."""
    got = _deliveries(clients, version, "w/+/t",
                      ["w/a/t", "w//t", "w/a/b/t", "w/t", "w/a/tt", "x/a/t"], "w/end/t")
    assert got == sorted(["w/a/t", "w//t", "w/end/t"])


@pytest.mark.spec("MQTT-4.7.1-2", "MQTT-3.3.2-3", v311=["MQTT-4.7.1-3", "MQTT-3.3.2-3"])
def test_mqtt_4_7_1_3_lone_single_level_wildcard_matches_one_level_topics(clients, version):
    """Section 4.7.1.3 (no statement number): "+" matches "sport" but not "sport/" or
    "/finance"; "+/+" matches "/finance"."""
    got = _deliveries(clients, version, "+", ["one", "one/two", "/one", "one/"], "end")
    assert got == ["end", "one"]


@pytest.mark.spec("MQTT-4.7.1-1", "MQTT-3.3.2-3", v311=["MQTT-4.7.1-2", "MQTT-3.3.2-3"])
def test_mqtt_4_7_1_2_multilevel_wildcard_matches_parent_and_children(clients, version):
    """Section 4.7.1.2 (no statement number): "sport/tennis/player1/#" matches
    "sport/tennis/player1", "sport/tennis/player1/ranking" and
    "sport/tennis/player1/score/wimbledon"; the multi-level wildcard also matches the parent
    level."""
    got = _deliveries(clients, version, "sport/tennis/#",
                      ["sport/tennis", "sport/tennis/p1", "sport/tennis/p1/ranking",
                       "sport/tennisplayer", "sport", "sport/tennis2/p1"],
                      "sport/tennis/end")
    assert got == sorted(["sport/tennis", "sport/tennis/p1", "sport/tennis/p1/ranking",
                          "sport/tennis/end"])


@pytest.mark.spec("MQTT-4.7.3-4", v311=["MQTT-4.7.3-4"])
def test_mqtt_4_7_3_4_matching_is_exact_and_case_sensitive(clients, version):
    """[MQTT-4.7.3-4] When it performs subscription matching the Server MUST NOT perform any
    normalization of Topic Names or Topic Filters, or any modification or substitution of
    unrecognized characters. Section 4.7.3: topic names and filters are case sensitive and
    may contain spaces; a trailing "/" makes a different topic."""
    got = _deliveries(clients, version, "Case/ Sp/é",
                      ["case/ sp/é", "Case/Sp/é", "Case/ Sp/e", "Case/ Sp/é/"], "Case/ Sp/é")
    assert got == ["Case/ Sp/é"]


@pytest.mark.spec("MQTT-4.7.2-1", v311=["MQTT-4.7.2-1"])
def test_mqtt_4_7_2_1_dollar_topics_not_matched_by_leading_wildcard(clients, version):
    """[MQTT-4.7.2-1] The Server MUST NOT match Topic Filters starting with a wildcard
    character (# or +) with Topic Names beginning with a $ character.

    The server's own $SYS topics (published every second by the suite's broker config) are
    the $ topics used: a "$SYS/#" subscriber gets a live (RETAIN 0) update, by which time
    the "#" and "+/broker/#" subscribers must have had nothing."""
    hash_sub = clients.connect(version)
    assert hash_sub.subscribe("#", 0) == [0]
    plus_sub = clients.connect(version)
    assert plus_sub.subscribe("+/broker/#", 0) == [0]
    control = clients.connect(version)
    assert control.subscribe("$SYS/#", 0) == [0]
    control.wait_message(lambda m: m.topic.startswith("$SYS/") and not m.retain)
    for c in (hash_sub, plus_sub):
        c.assert_nothing(lambda m: m.topic.startswith("$"), window=0.1, what="$ topic")


@pytest.mark.spec("MQTT-3.8.4-8", v311=["MQTT-3.8.4-6"])
def test_mqtt_3_8_4_8_delivered_qos_is_min_of_published_and_granted(clients, version):
    """[MQTT-3.8.4-8] The QoS of Application Messages sent in response to a Subscription MUST
    be the minimum of the QoS of the originally published message and the Maximum QoS granted
    by the Server."""
    subs = {}
    for granted in (0, 1, 2):
        subs[granted] = clients.connect(version)
        assert subs[granted].subscribe("q/t", granted) == [granted]
    pub = clients.connect(version)
    for qos in (0, 1, 2):
        pub.publish("q/t", f"at{qos}".encode(), qos)
    for granted, sub in subs.items():
        got = {m.payload: m.qos for m in sub.wait_messages(3)}
        assert got == {f"at{q}".encode(): min(q, granted) for q in (0, 1, 2)}, (granted, got)


@pytest.mark.spec(
    "MQTT-4.3.2-1", "MQTT-4.3.2-2", "MQTT-2.2.1-4", "MQTT-4.4.0-1",
    v311=["MQTT-4.3.2-1", "MQTT-2.3.1-4", "MQTT-2.3.1-1"])
def test_mqtt_4_3_2_2_qos1_outbound_publish_then_puback(clients, version):
    """[MQTT-4.3.2-1] (sender) MUST assign an unused Packet Identifier each time it has a new
    Application Message to publish. [MQTT-4.3.2-2] MUST send a PUBLISH packet containing this
    Packet Identifier with QoS 1 and DUP flag set to 0. [MQTT-2.2.1-4] Each time a Server
    sends a new PUBLISH (with QoS > 0) MQTT Control Packet it MUST assign it a non zero Packet
    Identifier that is currently unused. [MQTT-4.4.0-1] ... Clients and Servers MUST NOT
    resend messages at any other time (than a reconnection)."""
    raw = raw_connected(clients, version)
    assert raw.subscribe(1, [("f/1", 1)]).reasons == [1]
    pub = clients.connect(version)
    for i in range(3):
        pub.publish("f/1", f"m{i}".encode(), 1)
    got = [raw.next_publish() for _ in range(3)]
    assert [p.payload for p in got] == [b"m0", b"m1", b"m2"]
    for p in got:
        assert p.qos == 1 and not p.dup and p.topic == "f/1"
        assert p.pid not in (None, 0)
    assert len({p.pid for p in got}) == 3, f"packet ids in use reused: {got}"
    for p in got:
        raw.puback(p.pid)
    assert raw.quiet_for(QUIET) == [], "acknowledged messages were sent again"


@pytest.mark.spec(
    "MQTT-4.3.3-1", "MQTT-4.3.3-2", "MQTT-4.3.3-4", "MQTT-3.6.1-1", "MQTT-2.1.3-1",
    "MQTT-2.2.1-5",
    v311=["MQTT-4.3.3-1", "MQTT-3.6.1-1", "MQTT-2.2.2-1", "MQTT-2.3.1-6"])
def test_mqtt_4_3_3_4_qos2_outbound_flow_pubrel_carries_the_packet_id(clients, version):
    """[MQTT-4.3.3-2] (sender) MUST send a PUBLISH packet containing this Packet Identifier
    with QoS 2 and DUP flag set to 0. [MQTT-4.3.3-4] MUST send a PUBREL packet when it
    receives a PUBREC packet from the receiver with a Reason Code value less than 0x80. This
    PUBREL packet MUST contain the same Packet Identifier as the original PUBLISH packet.
    [MQTT-3.6.1-1] Bits 3,2,1 and 0 of the Fixed Header in the PUBREL packet are reserved and
    MUST be set to 0,0,1 and 0."""
    raw = raw_connected(clients, version)
    assert raw.subscribe(1, [("f/2", 2)]).reasons == [2]
    pub = clients.connect(version)
    pub.publish("f/2", b"exactly-once", 2)
    p = raw.next_publish()
    assert (p.topic, p.payload, p.qos, p.dup) == ("f/2", b"exactly-once", 2, False)
    assert p.pid not in (None, 0)
    raw.pubrec(p.pid)
    rel = raw.recv()
    assert rel.kind == PUBREL and rel.pid == p.pid and rel.flags == 0x02, rel
    raw.pubcomp(p.pid)
    assert raw.quiet_for(QUIET) == [], "the completed flow went on"


@pytest.mark.spec("MQTT-4.6.0-5", "MQTT-4.6.0-6", v311=["MQTT-4.6.0-5", "MQTT-4.6.0-6"])
def test_mqtt_4_6_0_6_messages_forwarded_in_publish_order(clients, version):
    """[MQTT-4.6.0-5] When a Server processes a message that has been published to an Ordered
    Topic, it MUST send PUBLISH packets to consumers (for the same Topic and QoS) in the
    order that they were received from any given Client. [MQTT-4.6.0-6] By default, a Server
    MUST treat every Topic as an Ordered Topic when it is forwarding messages on Non-shared
    Subscriptions."""
    sub = clients.connect(version)
    assert sub.subscribe("ord/t", 1) == [1]
    pub = clients.connect(version)
    sent = [f"n{i}".encode() for i in range(40)]
    for p in sent:
        pub.paho.publish("ord/t", p, 1)  # all in flight at once
    assert payloads(sub.wait_messages(40)) == sent


@pytest.mark.spec(
    "MQTT-3.3.4-2", "MQTT-3.3.4-3", "MQTT-3.3.4-4", "MQTT-3.3.4-5",
    v311=["MQTT-3.3.5-1"])
def test_mqtt_3_3_4_2_overlapping_subscriptions_respect_the_maximum_qos(broker, clients,
                                                                        version):
    """[MQTT-3.3.4-2] (overlapping subscriptions) the Server MUST deliver the message to the
    Client respecting the maximum QoS of all the matching subscriptions. Section 3.3.4 (3.1.1:
    3.3.5): In addition, the Server MAY deliver further copies of the message, one for each
    additional matching subscription and respecting the subscription's QoS in each case.
    5.0 [MQTT-3.3.4-3] If the Client specified a Subscription Identifier for any of the
    overlapping subscriptions the Server MUST send those Subscription Identifiers in the
    message which is published as the result of the subscriptions. [MQTT-3.3.4-4] If the
    Server sends a single copy of the message it MUST include in the PUBLISH packet the
    Subscription Identifiers for all matching subscriptions ... [MQTT-3.3.4-5] If the Server
    sends multiple PUBLISH packets it MUST send, in each of them, the Subscription Identifier
    of the matching subscription.

    So both one copy at QoS 2 and one copy per subscription (QoS 1, 2, 0) are right.
    Mosquitto sends 5.0 clients one copy per subscription; to 3.1.1 clients it sends one copy
    at the QoS of the first subscription its topic tree yields (here "ov/a", QoS 0), which
    breaks 3.1.1 [MQTT-3.3.5-1] (the same statement)."""
    if version == V311:
        skip_if_mosquitto(broker, "3.1.1 overlapping subscriptions: one copy, not at the "
                          "maximum QoS ([MQTT-3.3.5-1] of 3.1.1)")
    sub = clients.connect(version)
    granted = {"ov/#": 1, "ov/+": 2, "ov/a": 0}
    ids = {"ov/#": 11, "ov/+": 12, "ov/a": 13}
    for filt, qos in granted.items():
        props = {"SubscriptionIdentifier": ids[filt]} if version == V5 else None
        assert sub.subscribe(filt, qos, props=props) == [qos]
    pub = clients.connect(version)
    pub.publish("ov/a", b"overlap", 2)
    sub.wait_payload("overlap")
    sub.assert_nothing(lambda m: False, window=QUIET)  # let further copies come in
    copies = sub.received(lambda m: m.payload == b"overlap")
    qos_of_copies = sorted(m.qos for m in copies)
    assert max(qos_of_copies) == 2, copies
    assert len(copies) in (1, 3), f"neither one copy nor one per subscription: {copies}"
    assert len(set(qos_of_copies)) == len(copies), copies
    if version == V5:
        sub_ids = [m.props.get("SubscriptionIdentifier", []) for m in copies]
        if len(copies) == 1:
            assert sorted(sub_ids[0]) == [11, 12, 13], copies
        else:
            qos_by_id = {ids[f]: min(2, q) for f, q in granted.items()}
            assert sorted(i for s in sub_ids for i in s) == [11, 12, 13], copies
            for m, s in zip(copies, sub_ids):
                assert len(s) == 1 and m.qos == qos_by_id[s[0]], copies


@pytest.mark.spec("MQTT-3.3.4-3")
def test_mqtt_3_3_4_3_subscription_identifier_on_delivered_message(clients):
    """[MQTT-3.3.4-3] If the Client specified a Subscription Identifier for any of the
    overlapping subscriptions the Server MUST send those Subscription Identifiers in the
    message which is published as the result of the subscriptions. Section 3.8.2.1.2: the
    identifier is associated with the subscription; a re-subscription replaces it, and a
    subscription without one delivers messages without one."""
    with_id = clients.connect(V5)
    assert with_id.subscribe("sid/t", 1, props={"SubscriptionIdentifier": 7}) == [1]
    without = clients.connect(V5)
    assert without.subscribe("sid/t", 1) == [1]
    pub = clients.connect(V5)
    pub.publish("sid/t", b"first", 1)
    assert with_id.wait_payload("first").props.get("SubscriptionIdentifier") == [7]
    assert "SubscriptionIdentifier" not in without.wait_payload("first").props
    assert with_id.subscribe("sid/t", 1, props={"SubscriptionIdentifier": 268435455}) == [1]
    pub.publish("sid/t", b"second", 1)
    assert with_id.wait_payload("second").props.get("SubscriptionIdentifier") == [268435455]


@pytest.mark.spec("MQTT-3.8.4-3", v311=["MQTT-3.8.4-3"])
def test_mqtt_3_8_4_3_identical_filter_replaces_the_subscription(clients, version):
    """[MQTT-3.8.4-3] If a Server receives a SUBSCRIBE packet containing a Topic Filter that
    is identical to a Non-shared Subscription's Topic Filter for the current Session, then it
    MUST replace that existing Subscription with a new Subscription."""
    sub = clients.connect(version)
    assert sub.subscribe("rp/t", 0) == [0]
    assert sub.subscribe("rp/t", 2) == [2]
    pub = clients.connect(version)
    pub.publish("rp/t", b"once", 2)
    assert sub.wait_payload("once").qos == 2
    pub.publish("rp/t", b"marker", 2)
    sub.wait_payload("marker")
    assert len(sub.received(lambda m: m.payload == b"once")) == 1, sub.received()


@pytest.mark.spec(
    "MQTT-3.10.4-4", "MQTT-3.10.4-5", "MQTT-3.10.4-6", "MQTT-3.11.3-1", "MQTT-3.11.3-2",
    "MQTT-2.2.1-6",
    v311=["MQTT-3.10.4-4", "MQTT-3.10.4-5", "MQTT-3.10.4-6", "MQTT-2.3.1-7"])
def test_mqtt_3_10_4_4_unsuback_carries_the_packet_id_and_a_code_per_filter(clients, version):
    """[MQTT-3.10.4-4] The Server MUST respond to an UNSUBSCRIBE request by sending an
    UNSUBACK packet. [MQTT-3.10.4-5] The UNSUBACK packet MUST have the same Packet Identifier
    as the UNSUBSCRIBE packet. Even where no Topic Subscriptions are deleted, the Server MUST
    respond with an UNSUBACK. 5.0 [MQTT-3.11.3-1] The order of Reason Codes in the UNSUBACK
    packet MUST match the order of Topic Filters in the UNSUBSCRIBE packet.

    5.0: 0x00 for the filter that existed; for the one that did not, 0x11 (No subscription
    existed) is what the reason code means, but the spec does not make it a MUST, so 0x00
    is accepted too (Mosquitto sends 0x11)."""
    raw = raw_connected(clients, version)
    assert raw.subscribe(3, [("u/a", 1), ("u/b/#", 0)]).reasons == [1, 0]
    raw.send_unsubscribe(9001, ["u/b/#", "u/none", "u/a"])
    ack = raw.recv_kind(UNSUBACK)
    assert ack.pid == 9001
    if version == V5:
        assert len(ack.reasons) == 3, ack
        assert ack.reasons[0] == 0x00 and ack.reasons[2] == 0x00, ack
        assert ack.reasons[1] in (0x00, 0x11), ack
    else:
        assert ack.reasons == [], ack
    raw.send_unsubscribe(9002, ["never/subscribed"])
    assert raw.recv_kind(UNSUBACK).pid == 9002


@pytest.mark.spec("MQTT-3.10.4-1", "MQTT-3.10.4-2", v311=["MQTT-3.10.4-1", "MQTT-3.10.4-2"])
def test_mqtt_3_10_4_2_no_new_messages_after_unsubscribe(clients, version):
    """[MQTT-3.10.4-1] ... If any filter matches exactly then its owning Subscription MUST be
    deleted. [MQTT-3.10.4-2] It MUST stop adding any new messages which match the Topic
    Filters, for delivery to the Client. Other subscriptions stay."""
    sub = clients.connect(version)
    assert sub.subscribe([("us/a", 1), ("us/+", 1)]) == [1, 1]
    assert sub.unsubscribe("us/a") in ([], [0])
    pub = clients.connect(version)
    pub.publish("us/a", b"via-plus", 1)
    assert sub.wait_payload("via-plus").topic == "us/a"
    assert sub.unsubscribe("us/+") in ([], [0])
    pub.publish("us/a", b"after", 1)
    marker = clients.connect(version)
    assert marker.subscribe("us/a", 1) == [1]
    pub.publish("us/a", b"marker", 1)
    marker.wait_payload("marker")
    sub.assert_nothing(lambda m: m.payload in (b"after", b"marker"), window=0.2)


@pytest.mark.spec("MQTT-4.5.0-1", "MQTT-3.3.4-1", "MQTT-4.3.2-4", "MQTT-4.3.3-8",
                  "MQTT-4.3.3-11", v311=["MQTT-4.5.0-1", "MQTT-3.3.4-1"])
def test_mqtt_4_5_0_1_subscription_in_force_for_every_publish_after_the_suback(clients):
    """[MQTT-4.5.0-1] When a Server takes ownership of an incoming Application Message it
    MUST add it to the Session State for those Clients that have matching Subscriptions.
    Section 3.8.4: the SUBACK confirms the subscription, so every PUBLISH the Server receives
    after it sent the SUBACK, from any connection, has that subscription to match.

    Under load (two other connections publishing QoS 1 all along, so the server's commits
    batch many publishes), 600 rounds: a subscriber subscribes to a new filter (exact, `+` or `#`,
    QoS 0, 1 or 2, on a clean and on a persistent session) and as soon as its SUBACK is in,
    a publisher on another connection (3.1.1 or 5.0, at QoS 0, 1 or 2) sends one message
    matching it. Every one of them arrives."""
    import threading

    stop = threading.Event()
    errors = []

    def load(n):
        try:
            c = raw_connected(clients, V5, f"load{n}")
            pid = 0
            while not stop.is_set():
                for _ in range(20):
                    pid = pid % 65535 + 1
                    c.publish(f"load/{n}", b"x" * 256, 1, pid=pid)
                for _ in range(20):
                    c.recv_kind(rawmqtt.PUBACK)
        except Exception as e:  # reported by the test below
            errors.append(e)

    loaders = [threading.Thread(target=load, args=(n,), daemon=True) for n in range(2)]
    for t in loaders:
        t.start()
    try:
        subs = [raw_connected(clients, V5, "fresh-sub"),
                raw_connected(clients, V5, "kept-sub", clean=False,
                              props={"session_expiry_interval": 300})]
        pubs = [raw_connected(clients, V5, "pub5"), raw_connected(clients, V311, "pub311")]
        for i in range(600):
            sub, pub = subs[i % 2], pubs[(i // 2) % 2]
            qos, pub_qos = i % 3, (i // 3) % 3
            topic = f"sa/{i}/leaf"
            filt = [topic, f"sa/{i}/+", f"sa/{i}/#"][(i // 9) % 3]
            ack = sub.subscribe(i + 2, [(filt, qos)])
            assert ack.reasons == [qos], (i, ack)
            pub.publish(topic, f"m{i}".encode(), pub_qos, pid=1 if pub_qos else None)
            # (A broker may hold a QoS 2 message back until its PUBREL: Mosquitto does.)
            if pub_qos == 1:
                assert pub.recv_kind(rawmqtt.PUBACK).pid == 1
            elif pub_qos == 2:
                assert pub.recv_kind(rawmqtt.PUBREC).pid == 1
                pub.pubrel(1)
                assert pub.recv_kind(rawmqtt.PUBCOMP).pid == 1
            try:
                p = sub.next_publish()
            except TimeoutError:
                raise AssertionError(f"round {i}: {filt!r} at QoS {qos}, published to {topic!r} "
                                     f"at QoS {pub_qos} by {pub.version}: not delivered")
            if p.qos == 1:
                sub.puback(p.pid)
            elif p.qos == 2:
                sub.pubrec(p.pid)
                assert sub.recv_kind(PUBREL).pid == p.pid
                sub.pubcomp(p.pid)
            assert (p.topic, p.payload, p.qos) == (topic, f"m{i}".encode(), min(qos, pub_qos)), \
                (i, p)
    finally:
        stop.set()
        for t in loaders:
            t.join(30)
    assert not errors, errors
