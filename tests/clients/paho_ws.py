"""MQTT over WebSocket with paho-mqtt (transport="websockets"), for tests/e2e/listeners_ws.rs.

usage: paho_ws.py --port P [--path /mqtt] [--ca CA.pem] [--topic T] [--v5] --payload TEXT...
A subscriber connects and subscribes to --topic at QoS 1, then a publisher (a second
connection) publishes each --payload at QoS 1. Prints one JSON object:
  {"subscribed": [granted QoS], "acked": [payloads the edge acknowledged],
   "received": [payloads the subscriber got, in order], "error": text or null}
With --ca the connections are wss:// and check the server certificate against that CA.
"""
import argparse
import json
import ssl
import threading
import time

import paho.mqtt.client as mqtt

HOST = "127.0.0.1"

p = argparse.ArgumentParser()
p.add_argument("--port", type=int, required=True)
p.add_argument("--path", default="/mqtt")
p.add_argument("--ca")
p.add_argument("--topic", default="ws/paho")
p.add_argument("--v5", action="store_true")
p.add_argument("--payload", action="append", default=[])
args = p.parse_args()

result = {"subscribed": [], "acked": [], "received": [], "error": None}
protocol = mqtt.MQTTv5 if args.v5 else mqtt.MQTTv311


def client(client_id):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id,
                    protocol=protocol, transport="websockets")
    c.ws_set_options(path=args.path)
    if args.ca:
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
        ctx.load_verify_locations(args.ca)
        c.tls_set_context(ctx)
    return c


def connect(c, name):
    up = threading.Event()
    state = {}

    def on_connect(cl, userdata, flags, reason_code, properties):
        state["rc"] = str(reason_code)
        up.set()

    c.on_connect = on_connect
    c.connect(HOST, args.port, keepalive=30)
    c.loop_start()
    if not up.wait(20) or state.get("rc") != "Success":
        raise RuntimeError(f"{name}: not connected (CONNACK {state.get('rc')})")


def done(result):
    print(json.dumps(result), flush=True)


sub = client("paho-ws-sub")
received_all = threading.Event()
subscribed = threading.Event()


def on_message(cl, userdata, msg):
    result["received"].append(msg.payload.decode())
    if len(result["received"]) >= len(args.payload):
        received_all.set()


def on_subscribe(cl, userdata, mid, reason_codes, properties):
    result["subscribed"] = [rc.value for rc in reason_codes]
    subscribed.set()


sub.on_message = on_message
sub.on_subscribe = on_subscribe
pub = client("paho-ws-pub")
try:
    connect(sub, "subscriber")
    sub.subscribe(args.topic, qos=1)
    if not subscribed.wait(20):
        raise RuntimeError("no SUBACK")
    connect(pub, "publisher")
    for payload in args.payload:
        info = pub.publish(args.topic, payload, qos=1)
        info.wait_for_publish(timeout=30)
        if info.is_published():
            result["acked"].append(payload)
    received_all.wait(30)
except Exception as e:  # reported to the test, which asserts on it
    result["error"] = f"{type(e).__name__}: {e}"
finally:
    for c in (pub, sub):
        try:
            c.disconnect()
            c.loop_stop()
        except Exception:
            pass
    done(result)
