"""$SYS topics: broker statistics published every `sys_interval` (1 s in the suite).

No MQTT statement defines them: section 4.7.2 only notes that "$SYS/" is widely used for
server-specific information. The topics and meanings are the ones Mosquitto made common:

  $SYS/broker/clients/connected   clients connected now
  $SYS/broker/messages/received   messages received since start (Mosquitto: packets of any
                                  type, so at least the PUBLISH packets)
  $SYS/broker/messages/sent       messages sent since start (likewise at least the PUBLISHes)
  $SYS/broker/bytes/received      bytes received since start
  $SYS/broker/uptime              seconds since start ("12 seconds" in Mosquitto)

A value is read as the integer it starts with. Updates may be retained and may be skipped
while a value does not change (Mosquitto does both); the tests wait for the value they need.
"""

import re

from mqttclient import V5

SYS_WAIT = 10.0  # several sys_interval periods


def value(message):
    m = re.match(rb"\s*(\d+)", message.payload)
    assert m, f"{message.topic}: not a number: {message.payload!r}"
    return int(m.group(1))


def watch(clients, topic, version=V5):
    c = clients.connect(version)
    assert c.subscribe(topic, 0) == [0]
    return c


def latest(c, topic, at_least=0):
    """The first value on `topic` that is at least `at_least`."""
    return value(c.wait_message(lambda m: m.topic == topic and value(m) >= at_least,
                                timeout=SYS_WAIT))


def assert_never_decreases(c, topic):
    values = [value(m) for m in c.received(lambda m: m.topic == topic)]
    assert values == sorted(values), f"{topic} went down: {values}"


def test_mqtt_4_7_2_sys_broker_clients_connected_counts_connections(clients, version):
    """$SYS/broker/clients/connected is the number of clients connected: the watcher plus
    three, then the watcher plus one after two disconnect."""
    topic = "$SYS/broker/clients/connected"
    w = watch(clients, topic, version)
    others = [clients.connect(version) for _ in range(3)]
    w.wait_message(lambda m: m.topic == topic and value(m) == 4, timeout=SYS_WAIT)
    others[0].disconnect()
    others[1].drop()
    w.wait_message(lambda m: m.topic == topic and value(m) == 2, timeout=SYS_WAIT)


def test_mqtt_4_7_2_sys_broker_messages_received_counts_publishes(clients):
    """$SYS/broker/messages/received grows by at least the PUBLISH packets received."""
    topic = "$SYS/broker/messages/received"
    w = watch(clients, topic)
    before = latest(w, topic)
    pub = clients.connect(V5)
    for i in range(25):
        pub.publish("count/in", f"{i}".encode(), 1)
    latest(w, topic, before + 25)
    assert_never_decreases(w, topic)


def test_mqtt_4_7_2_sys_broker_messages_sent_counts_deliveries(clients):
    """$SYS/broker/messages/sent grows by at least the PUBLISH packets delivered."""
    topic = "$SYS/broker/messages/sent"
    w = watch(clients, topic)
    before = latest(w, topic)
    subs = [clients.connect(V5) for _ in range(2)]
    for s in subs:
        assert s.subscribe("count/out", 1) == [1]
    pub = clients.connect(V5)
    for i in range(15):
        pub.publish("count/out", f"{i}".encode(), 1)
    for s in subs:
        s.wait_messages(15)
    latest(w, topic, before + 30)
    assert_never_decreases(w, topic)


def test_mqtt_4_7_2_sys_broker_bytes_received_counts_payload_bytes(clients):
    """$SYS/broker/bytes/received grows by at least the payload bytes received."""
    topic = "$SYS/broker/bytes/received"
    w = watch(clients, topic)
    before = latest(w, topic)
    pub = clients.connect(V5)
    for _ in range(8):
        pub.publish("count/bytes", b"b" * 1000, 1)
    latest(w, topic, before + 8000)
    assert_never_decreases(w, topic)


def test_mqtt_4_7_2_sys_broker_uptime_published_and_increasing(clients):
    """$SYS/broker/uptime is published every interval and goes up."""
    topic = "$SYS/broker/uptime"
    w = watch(clients, topic)
    first = latest(w, topic)
    assert 0 <= first < 3600, first
    later = latest(w, topic, first + 1)
    assert later > first
    assert_never_decreases(w, topic)
