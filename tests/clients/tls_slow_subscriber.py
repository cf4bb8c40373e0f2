"""A subscriber over TLS that stops reading for a while, for the edge's TLS write path.

usage: tls_slow_subscriber.py PORT CA_FILE TOPIC COUNT OUT_FILE
Connects (MQTT 3.1.1, keepalive 0, so no PINGREQ ever makes the edge write), subscribes to
TOPIC at QoS 0 with a small socket receive buffer and prints "subscribed". It then reads
nothing until a line arrives on stdin; after that it reads COUNT PUBLISH packets, slower
than the edge writes (so the edge's socket stays full to the last byte), giving up after
30 s without a byte, writes their payloads one after another to OUT_FILE and prints the
number received.
"""
import socket
import ssl
import sys
import time

port, ca, topic, count, out = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]


def string(s: bytes) -> bytes:
    return len(s).to_bytes(2, "big") + s


def packet(first: int, body: bytes) -> bytes:
    n, length = len(body), b""
    while True:
        digit, n = n % 128, n // 128
        length += bytes([digit | (0x80 if n else 0)])
        if not n:
            return bytes([first]) + length + body


raw = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
raw.settimeout(30)
raw.connect(("127.0.0.1", int(port)))
ctx = ssl.create_default_context(cafile=ca)
tls = ctx.wrap_socket(raw, server_hostname="localhost")

buf = b""
slow = False


def read_packet():
    global buf
    while True:
        if len(buf) >= 2:
            mult, length, i = 1, 0, 1
            while i < len(buf):
                length += (buf[i] & 0x7F) * mult
                mult *= 128
                i += 1
                if not buf[i - 1] & 0x80:
                    if len(buf) >= i + length:
                        first, body = buf[0], buf[i:i + length]
                        buf = buf[i + length:]
                        return first >> 4, body
                    break
        if slow:
            time.sleep(0.001)
        chunk = tls.recv(8192)
        if not chunk:
            raise SystemExit("the edge closed the connection")
        buf += chunk


connect = string(b"MQTT") + bytes([4, 0x02]) + (0).to_bytes(2, "big") + string(b"slow-sub")
tls.sendall(packet(0x10, connect))
kind, body = read_packet()
assert kind == 2 and body[1] == 0, f"CONNACK expected, got {kind} {body!r}"
tls.sendall(packet(0x82, (1).to_bytes(2, "big") + string(topic.encode()) + bytes([0])))
kind, body = read_packet()
assert kind == 9, f"SUBACK expected, got {kind}"
print("subscribed", flush=True)

sys.stdin.readline()
slow = True
received = 0
with open(out, "wb") as f:
    while received < count:
        kind, body = read_packet()
        if kind != 3:
            continue
        topic_len = int.from_bytes(body[:2], "big")
        f.write(body[2 + topic_len:])
        received += 1
print(received, flush=True)
