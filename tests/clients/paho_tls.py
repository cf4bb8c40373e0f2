"""An MQTT client over TLS with paho-mqtt and Python's ssl module, for the TLS tests.

usage: paho_tls.py MODE --port P --ca CA.pem [--cert C.pem --key K.pem] [--tls 1.2|1.3]
                   [--client-id ID] [--topic T] [--payload TEXT]...
MODE:
  publish    connect, publish each --payload at QoS 1, disconnect; print one JSON object:
             {"connected": bool, "tls_version": "TLSv1.3", "acked": [payloads], "error": text}
  session    connect (printing the publish mode's JSON), then publish each line read from
             stdin at QoS 1 and print "acked <line> connects=<n>" once it is acknowledged
             ("failed ..." otherwise), n counting successful CONNECTs; ends at EOF
  peer-cert  TLS handshake only (no MQTT); print the server certificate (DER) as hex
"""
import argparse
import json
import socket
import ssl
import sys
import threading
import time

import paho.mqtt.client as mqtt

HOST = "127.0.0.1"

p = argparse.ArgumentParser()
p.add_argument("mode", choices=["publish", "session", "peer-cert"])
p.add_argument("--port", type=int, required=True)
p.add_argument("--ca", required=True)
p.add_argument("--cert")
p.add_argument("--key")
p.add_argument("--tls", choices=["1.2", "1.3"])
p.add_argument("--client-id", default="paho-tls")
p.add_argument("--topic", default="tls/paho")
p.add_argument("--payload", action="append", default=[])
args = p.parse_args()


def context():
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(args.ca)
    if args.cert:
        ctx.load_cert_chain(args.cert, args.key)
    if args.tls:
        version = ssl.TLSVersion.TLSv1_2 if args.tls == "1.2" else ssl.TLSVersion.TLSv1_3
        ctx.minimum_version = version
        ctx.maximum_version = version
    return ctx


if args.mode == "peer-cert":
    with socket.create_connection((HOST, args.port), timeout=10) as raw:
        with context().wrap_socket(raw, server_hostname="localhost") as tls:
            print(tls.getpeercert(binary_form=True).hex())
    sys.exit(0)

connected = threading.Event()
ended = threading.Event()
state = {"rc": None, "connects": 0}


def on_connect(client, userdata, flags, reason_code, properties):
    state["rc"] = str(reason_code)
    if not reason_code.is_failure:
        state["connects"] += 1
        connected.set()
    else:
        ended.set()


def on_disconnect(client, userdata, flags, reason_code, properties):
    ended.set()


client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=args.client_id,
                     protocol=mqtt.MQTTv311)
client.tls_set_context(context())
client.on_connect = on_connect
client.on_disconnect = on_disconnect

result = {"connected": False, "tls_version": None, "acked": [], "error": None}
try:
    client.connect(HOST, args.port, keepalive=30)
except (OSError, ssl.SSLError) as e:
    result["error"] = f"connect: {e!r}"
    print(json.dumps(result))
    sys.exit(0)
client.loop_start()
deadline = time.monotonic() + 20
while not connected.is_set() and not ended.is_set() and time.monotonic() < deadline:
    connected.wait(0.05)
if not connected.is_set():
    result["error"] = f"not connected (CONNACK {state['rc']})"
    client.loop_stop()
    print(json.dumps(result))
    sys.exit(0)
result["connected"] = True
result["tls_version"] = client.socket().version()


def publish(payload):
    info = client.publish(args.topic, payload, qos=1)
    info.wait_for_publish(timeout=30)
    return info.is_published()


if args.mode == "publish":
    result["acked"] = [pl for pl in args.payload if publish(pl)]
    client.disconnect()
    client.loop_stop()
    print(json.dumps(result))
else:
    print(json.dumps(result), flush=True)
    for line in sys.stdin:
        line = line.strip()
        outcome = "acked" if publish(line) else "failed"
        print(f"{outcome} {line} connects={state['connects']}", flush=True)
    client.disconnect()
    client.loop_stop()
