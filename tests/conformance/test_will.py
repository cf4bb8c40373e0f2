"""Will messages: published when the connection ends abnormally (socket closed without
DISCONNECT, keepalive expired), discarded on a normal DISCONNECT, published on 5.0
DISCONNECT 0x04, held back by the 5.0 Will Delay Interval.

The client whose will is tested is a raw-socket client, so that closing it sends nothing but
a TCP FIN and keeping it silent sends no PINGREQ.
"""

import pytest

from mqttclient import QUIET, V5
from rawmqtt import DISCONNECT, Will


def observer(clients, version, filt="will/#"):
    c = clients.connect(version)
    assert c.subscribe(filt, 2) == [2]
    return c


def connect_with_will(clients, version, will, client_id="dying", clean=True, keepalive=60,
                      props=None):
    raw = clients.raw(version)
    ack = raw.connect(client_id, clean=clean, keepalive=keepalive, will=will, props=props)
    assert ack.reason == 0, ack
    return raw


@pytest.mark.spec(
    "MQTT-3.1.2-7", "MQTT-3.1.2-8", "MQTT-3.1.2-14", "MQTT-3.1.3-10",
    v311=["MQTT-3.1.2-8", "MQTT-3.1.2-16"])
def test_mqtt_3_1_2_8_will_published_on_abnormal_close(clients, version):
    """[MQTT-3.1.2-8] The Will Message MUST be published after the Network Connection is
    subsequently closed and either the Will Delay Interval has elapsed or the Session ends,
    unless the Will Message has been deleted by the Server on receipt of a DISCONNECT packet
    with Reason Code 0x00 (Normal disconnection) ... [MQTT-3.1.2-14] If the Will Flag is set
    to 1 and Will Retain is set to 0, the Server MUST publish the Will Message as a
    non-retained message. 5.0 [MQTT-3.1.3-10] The Server MUST maintain the order of User
    Properties when publishing the Will Message.

    The will's QoS (1) is kept: the observer's subscription allows 2."""
    obs = observer(clients, version)
    props = None
    if version == V5:
        props = {"user_property": [("z", "1"), ("a", "2"), ("z", "3")],
                 "content_type": "text/plain"}
    raw = connect_with_will(clients, version, Will("will/t", b"gone", qos=1, props=props))
    raw.close()
    m = obs.wait_payload("gone")
    assert (m.topic, m.qos, m.retain) == ("will/t", 1, False)
    if version == V5:
        assert m.props.get("UserProperty") == [("z", "1"), ("a", "2"), ("z", "3")]
        assert m.props.get("ContentType") == "text/plain"


@pytest.mark.spec("MQTT-3.1.2-22", "MQTT-3.1.2-8", v311=["MQTT-3.1.2-24", "MQTT-3.1.2-8"])
def test_mqtt_3_1_2_22_will_published_when_keepalive_expires(clients, version):
    """[MQTT-3.1.2-22] If the Keep Alive value is non-zero and the Server does not receive an
    MQTT Control Packet from the Client within one and a half times the Keep Alive time
    period, it MUST close the Network Connection to the Client as if the network had failed.
    [MQTT-3.1.2-8] The Will Message MUST be published after the Network Connection is
    subsequently closed ...

    Keep Alive is 1 s and the client then stays silent."""
    obs = observer(clients, version)
    raw = connect_with_will(clients, version, Will("will/ka", b"timed out", qos=1),
                            keepalive=1)
    seen = raw.wait_closed(timeout=10)
    assert all(p.kind == DISCONNECT for p in seen), seen  # 5.0: maybe 0x8D first
    m = obs.wait_payload("timed out")
    assert m.topic == "will/ka" and m.qos == 1


@pytest.mark.spec("MQTT-3.14.4-3", "MQTT-3.1.2-10", v311=["MQTT-3.14.4-3", "MQTT-3.1.2-10"])
def test_mqtt_3_14_4_3_will_discarded_on_normal_disconnect(clients, version):
    """[MQTT-3.14.4-3] On receipt of DISCONNECT with a Reason Code of 0x00 (Success) the
    Server MUST discard any Will Message associated with the current Connection without
    publishing it. [MQTT-3.1.2-10] The Will Message MUST be removed from the stored Session
    State in the Server once ... the Server has received a DISCONNECT packet with a Reason
    Code of 0x00 (Normal disconnection) from the Client. (3.1.1: [MQTT-3.1.2-10],
    [MQTT-3.14.4-3].)"""
    obs = observer(clients, version)
    raw = connect_with_will(clients, version, Will("will/t", b"must not appear", qos=1))
    raw.disconnect(0)
    # Once the broker has seen the close, a message on the will topic comes through alone.
    closer = clients.connect(version)
    closer.publish("will/t", b"marker", 1)
    obs.wait_payload("marker")
    obs.assert_nothing(lambda m: m.payload == b"must not appear", window=QUIET, what="will")


@pytest.mark.spec("MQTT-3.1.2-8")
def test_mqtt_3_1_2_8_disconnect_with_will_message_publishes_the_will(clients):
    """[MQTT-3.1.2-8] The Will Message MUST be published after the Network Connection is
    subsequently closed ... unless the Will Message has been deleted by the Server on receipt
    of a DISCONNECT packet with Reason Code 0x00 (Normal disconnection). Section 3.14.2.1:
    reason code 0x04 (Disconnect with Will Message): the Client wishes to disconnect but
    requires that the Server also publishes its Will Message."""
    obs = observer(clients, V5)
    raw = connect_with_will(clients, V5, Will("will/t", b"asked for", qos=2))
    raw.disconnect(0x04)
    m = obs.wait_payload("asked for")
    assert m.topic == "will/t" and m.qos == 2 and not m.retain


@pytest.mark.spec("MQTT-3.1.2-15", "MQTT-3.3.1-12", v311=["MQTT-3.1.2-17", "MQTT-3.3.1-9"])
def test_mqtt_3_1_2_15_will_retain_publishes_a_retained_message(clients, version):
    """[MQTT-3.1.2-15] If the Will Flag is set to 1 and Will Retain is set to 1, the Server
    MUST publish the Will Message as a retained message. (3.1.1: [MQTT-3.1.2-17].)"""
    obs = observer(clients, version)
    raw = connect_with_will(clients, version,
                            Will("will/retained", b"last words", qos=1, retain=True))
    raw.close()
    live = obs.wait_payload("last words")
    assert not live.retain, "a live subscriber gets it with RETAIN 0 ([MQTT-3.3.1-12])"
    later = observer(clients, version, "will/retained")
    m = later.wait_payload("last words")
    assert m.retain and m.qos == 1


@pytest.mark.spec("MQTT-3.1.3-9")
def test_mqtt_3_1_3_9_no_will_when_reconnected_within_will_delay(clients):
    """[MQTT-3.1.3-9] If a new Network Connection to this Session is made before the Will
    Delay Interval has passed, the Server MUST NOT send the Will Message.

    Will Delay 2 s, Session Expiry 30 s; the client comes back (Clean Start 0) at once and
    the observer waits past the delay."""
    obs = observer(clients, V5)
    will = Will("will/delayed", b"should be cancelled", qos=1,
                props={"will_delay_interval": 2})
    raw = connect_with_will(clients, V5, will, client_id="delayed", clean=False,
                            props={"session_expiry_interval": 30})
    raw.close()
    again = clients.raw(V5)
    ack = again.connect("delayed", clean=False, props={"session_expiry_interval": 30})
    assert ack.reason == 0 and ack.session_present, ack
    obs.assert_nothing(lambda m: m.topic == "will/delayed", window=3.0, what="will")


@pytest.mark.spec("MQTT-3.1.2-8")
def test_mqtt_3_1_2_8_will_published_once_the_will_delay_has_passed(clients):
    """[MQTT-3.1.2-8] The Will Message MUST be published after the Network Connection is
    subsequently closed and either the Will Delay Interval has elapsed or the Session ends.

    Will Delay 2 s, Session Expiry 30 s: nothing in the first second, the will after."""
    obs = observer(clients, V5)
    will = Will("will/delayed", b"late", qos=1, props={"will_delay_interval": 2})
    raw = connect_with_will(clients, V5, will, client_id="late", clean=False,
                            props={"session_expiry_interval": 30})
    raw.close()
    obs.assert_nothing(window=1.0, what="will before its delay")
    assert obs.wait_payload("late", timeout=10).topic == "will/delayed"


@pytest.mark.spec("MQTT-3.1.2-8")
def test_mqtt_3_1_2_8_will_published_when_the_session_ends_before_the_delay(clients):
    """[MQTT-3.1.2-8] The Will Message MUST be published after the Network Connection is
    subsequently closed and either the Will Delay Interval has elapsed or the Session ends,
    whichever comes first.

    Will Delay 60 s, Session Expiry 1 s: the session ends first."""
    obs = observer(clients, V5)
    will = Will("will/expired", b"session over", qos=1, props={"will_delay_interval": 60})
    raw = connect_with_will(clients, V5, will, client_id="short", clean=False,
                            props={"session_expiry_interval": 1})
    raw.close()
    assert obs.wait_payload("session over", timeout=15).topic == "will/expired"
