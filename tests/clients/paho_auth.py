"""Log in with paho-mqtt, then publish and subscribe; print what the broker answered as JSON.

usage: paho_auth.py HOST PORT VERSION(311|5) CLIENT_ID USER PASSWORD ACTION...
USER "-" connects without credentials. ACTION is `pub:TOPIC:PAYLOAD` (QoS 1),
`sub:FILTER` (QoS 1), or `will:TOPIC` (a will set before connecting). Output: {"connack": paho's reason code value (3.1.1 return codes are
mapped by paho to the 5.0 codes: 4 -> 134, 5 -> 135), "actions": [...], "disconnected": bool}.
A publish reports its 5.0 PUBACK reason code, or "closed" when the broker closed the
connection instead (3.1.1 has no negative PUBACK); a subscribe reports its granted codes.
"""
import json
import sys
import threading

import paho.mqtt.client as mqtt

host, port, version, client_id, user, password = sys.argv[1:7]
actions = [a for a in sys.argv[7:] if not a.startswith("will:")]
wills = [a[len("will:"):] for a in sys.argv[7:] if a.startswith("will:")]
protocol = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311
WAIT = 30

client = mqtt.Client(
    mqtt.CallbackAPIVersion.VERSION2,
    client_id=client_id,
    protocol=protocol,
    reconnect_on_failure=False,
)
if user != "-":
    client.username_pw_set(user, password)
for topic in wills:
    client.will_set(topic, "gone", qos=1)

connected = threading.Event()
closed = threading.Event()
acked = {}
subacked = {}
state = {"connack": None}
lock = threading.Condition()


def on_connect(c, userdata, flags, reason_code, properties):
    state["connack"] = reason_code.value
    connected.set()


def on_disconnect(c, userdata, flags, reason_code, properties):
    closed.set()
    connected.set()
    with lock:
        lock.notify_all()


def on_publish(c, userdata, mid, reason_code, properties):
    with lock:
        acked[mid] = reason_code.value
        lock.notify_all()


def on_subscribe(c, userdata, mid, reason_codes, properties):
    with lock:
        subacked[mid] = [r.value for r in reason_codes]
        lock.notify_all()


client.on_connect = on_connect
client.on_disconnect = on_disconnect
client.on_publish = on_publish
client.on_subscribe = on_subscribe
client.connect(host, int(port), keepalive=30)
client.loop_start()
connected.wait(WAIT)

results = []
if state["connack"] == 0:
    for action in actions:
        kind, rest = action.split(":", 1)
        if kind == "pub":
            topic, payload = rest.split(":", 1)
            mid = client.publish(topic, payload, qos=1).mid
            table = acked
        else:
            mid = client.subscribe(rest, qos=1)[1]
            table = subacked
        with lock:
            lock.wait_for(lambda: mid in table or closed.is_set(), WAIT)
        if mid in table:
            results.append(table[mid])
        elif closed.is_set():
            results.append("closed")
            break
        else:
            results.append("no answer")
    if not closed.is_set():
        client.disconnect()
client.loop_stop()
print(json.dumps({"connack": state["connack"], "actions": results, "disconnected": closed.is_set()}))
