"""A member of an edge consumer group (MQTT 5 shared subscription), or a publisher for one.

usage:
  group_member.py consume HOST PORT CLIENT_ID FILTER OUT [--ack-first N] [--leave-after N]
                  [--until-file PATH] [--max-seconds S] [--session-expiry S]
      Subscribes to FILTER at QoS 1 with manual acknowledgements and appends one JSON line per
      message received to OUT: {"topic", "payload", "dup", "qos", "acked"}. Acknowledges the
      first N messages (default: all). With --leave-after N it disconnects right after the
      N-th message (unrecorded and unacknowledged from then on), leaving what it did not
      acknowledge to the group: once PATH exists, so that the test can first see the edge
      receive its acknowledgements (a client that closes its socket while the broker still
      sends makes the kernel reset the connection, and the broker may never read the last
      acknowledgements). It writes OUT.leaving when it reached the N-th message. Otherwise it
      runs until PATH exists or S seconds passed. Prints a JSON summary at the end.
  group_member.py publish HOST PORT CLIENT_ID DEVICES PER_DEVICE PREFIX
      Publishes PER_DEVICE messages for each of DEVICES devices at QoS 1, round-robin, to
      sensors/dev{d}/reading with payload "{PREFIX}:dev{d}:{i}", and prints how many the broker
      acknowledged.
"""
import argparse
import json
import os
import sys
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties


def consume(a):
    out = open(a.out, "a", buffering=1)
    lock = threading.Lock()
    state = {"received": 0, "acked": 0, "subscribed": False, "leave": False}
    gone = threading.Event()

    def on_disconnect(client, userdata, flags, reason, props):
        gone.set()

    def on_connect(client, userdata, flags, reason, props):
        client.subscribe(a.filter, qos=1)

    def on_subscribe(client, userdata, mid, reasons, props):
        state["subscribed"] = all(not r.is_failure for r in reasons)
        if not state["subscribed"]:
            print(json.dumps({"error": f"subscribe refused: {reasons}"}), file=sys.stderr)

    def on_message(client, userdata, msg):
        with lock:
            if state["leave"]:
                # Leaving: whatever still arrives is neither recorded nor acknowledged.
                return
            state["received"] += 1
            ack = a.ack_first is None or state["acked"] < a.ack_first
            if ack and msg.qos > 0:
                client.ack(msg.mid, msg.qos)
                state["acked"] += 1
            out.write(json.dumps({
                "topic": msg.topic,
                "payload": msg.payload.decode(),
                "dup": bool(msg.dup),
                "qos": msg.qos,
                "acked": ack,
            }) + "\n")
            if a.leave_after is not None and state["received"] >= a.leave_after:
                state["leave"] = True
                open(a.out + ".leaving", "w").close()

    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=a.client_id,
                         protocol=mqtt.MQTTv5)
    client.manual_ack_set(True)
    client.on_connect = on_connect
    client.on_subscribe = on_subscribe
    client.on_message = on_message
    client.on_disconnect = on_disconnect
    props = Properties(PacketTypes.CONNECT)
    props.SessionExpiryInterval = a.session_expiry
    client.connect(a.host, a.port, keepalive=30, clean_start=True, properties=props)
    client.loop_start()
    deadline = time.time() + a.max_seconds
    while time.time() < deadline:
        if a.until_file and os.path.exists(a.until_file):
            break
        time.sleep(0.02)
    # Leaving: what is not acknowledged stays with the group. paho writes its queue in order
    # and reports the disconnection after DISCONNECT is written, so every PUBACK queued
    # before has reached the socket once `gone` is set.
    client.disconnect()
    gone.wait(10)
    client.loop_stop()
    out.close()
    print(json.dumps({"received": state["received"], "acked": state["acked"],
                      "subscribed": state["subscribed"]}))


def publish(a):
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=a.client_id,
                         protocol=mqtt.MQTTv5)
    client.max_inflight_messages_set(50)
    client.max_queued_messages_set(0)
    client.connect(a.host, a.port, keepalive=30)
    client.loop_start()
    infos = []
    for i in range(a.per_device):
        for d in range(a.devices):
            infos.append(client.publish(f"sensors/dev{d}/reading", f"{a.prefix}:dev{d}:{i}", qos=1))
    acked = 0
    for info in infos:
        info.wait_for_publish(timeout=60)
        acked += info.is_published()
    client.disconnect()
    client.loop_stop()
    print(json.dumps({"acked": acked}))


def main():
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("consume")
    for name in ("host", "port", "client_id", "filter", "out"):
        c.add_argument(name, type=int if name == "port" else str)
    c.add_argument("--ack-first", type=int)
    c.add_argument("--leave-after", type=int)
    c.add_argument("--until-file")
    c.add_argument("--max-seconds", type=float, default=120)
    c.add_argument("--session-expiry", type=int, default=0)
    q = sub.add_parser("publish")
    q.add_argument("host")
    q.add_argument("port", type=int)
    q.add_argument("client_id")
    q.add_argument("devices", type=int)
    q.add_argument("per_device", type=int)
    q.add_argument("prefix")
    a = p.parse_args()
    consume(a) if a.cmd == "consume" else publish(a)


if __name__ == "__main__":
    main()
