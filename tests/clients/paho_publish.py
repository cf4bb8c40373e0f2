"""Publish N messages with paho-mqtt and print, as JSON, the payloads the broker acknowledged.

usage: paho_publish.py HOST PORT VERSION(311|5) QOS COUNT PREFIX CLIENT_ID
QoS 0 messages count as acknowledged once paho has written them.
"""
import json
import sys

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

host, port, version, qos, count, prefix, client_id = sys.argv[1:8]
port, qos, count = int(port), int(qos), int(count)
protocol = mqtt.MQTTv5 if version == "5" else mqtt.MQTTv311

client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=protocol)
client.max_inflight_messages_set(20)
client.connect(host, port, keepalive=30)
client.loop_start()

infos = []
for i in range(count):
    payload = f"{prefix}-{i}"
    props = None
    if protocol == mqtt.MQTTv5:
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("seq", str(i))]
        props.ContentType = "text/plain"
    infos.append((payload, client.publish(f"sensors/{client_id}/reading", payload, qos=qos, properties=props)))

acked = []
for payload, info in infos:
    info.wait_for_publish(timeout=30)
    if info.is_published():
        acked.append(payload)

client.disconnect()
client.loop_stop()
print(json.dumps(acked))
