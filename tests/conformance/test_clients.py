"""Mosquitto's command-line clients against the broker: what mosquitto_pub sends,
mosquitto_sub receives (3.1.1 and 5.0, QoS 0, 1 and 2, retained with -r).

mosquitto_sub runs with -d, whose debug lines show when the subscription is acknowledged and
the QoS and RETAIN flag of each PUBLISH it receives; -v prints "topic payload".
"""

import queue
import re
import shutil
import subprocess
import threading

import pytest

TIMEOUT = 15
PUBLISH_LINE = re.compile(r"received PUBLISH \(d\d, q(\d), r(\d), m\d+, '([^']*)'")

pytestmark = pytest.mark.skipif(not shutil.which("mosquitto_sub"),
                                reason="mosquitto-clients is not installed")


@pytest.fixture(params=["mqttv311", "mqttv5"])
def cli_version(request):
    return request.param


class MosquittoSub:
    """A running mosquitto_sub whose stdout is read line by line."""

    def __init__(self, broker, version, qos, count, topic="a/#"):
        # stdbuf: mosquitto_sub's stdout is block-buffered into a pipe otherwise.
        self.proc = subprocess.Popen(
            ["stdbuf", "-oL", "mosquitto_sub", "-h", broker.host, "-p", str(broker.port),
             "-V", version, "-q", str(qos), "-t", topic, "-C", str(count), "-v", "-d",
             "-W", str(TIMEOUT), "-i", f"sub-{version}-{qos}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.lines: "queue.Queue[str | None]" = queue.Queue()
        self.seen: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self):
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))
        self.lines.put(None)

    def wait_line(self, pattern):
        while True:
            try:
                line = self.lines.get(timeout=TIMEOUT)
            except queue.Empty:
                raise AssertionError(f"mosquitto_sub: no {pattern!r} line; saw {self.seen}")
            if line is None:
                raise AssertionError(f"mosquitto_sub ended before {pattern!r}; saw {self.seen}")
            self.seen.append(line)
            if re.search(pattern, line):
                return line

    def finish(self):
        """Waits for the exit (-C reached); returns [(topic, payload, qos, retain)]."""
        try:
            self.proc.wait(TIMEOUT)
        finally:
            self.stop()
        self.reader.join(TIMEOUT)
        while True:
            line = self.lines.get_nowait() if not self.lines.empty() else None
            if line is None:
                break
            self.seen.append(line)
        assert self.proc.returncode == 0, f"mosquitto_sub exited {self.proc.returncode}: " \
                                          f"{self.seen}"
        flags = [(int(m.group(1)), m.group(2) == "1", m.group(3))
                 for m in map(PUBLISH_LINE.search, self.seen) if m]
        # -v lines: "topic payload"; the suite's topics all start with "a/".
        messages = [line.split(" ", 1) for line in self.seen if line.startswith("a/")]
        assert len(flags) == len(messages), self.seen
        return [(topic, payload, qos, retain)
                for (qos, retain, _), (topic, payload) in zip(flags, messages)]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


@pytest.fixture
def mosquitto_subs():
    started = []

    def start(*args, **kwargs):
        s = MosquittoSub(*args, **kwargs)
        started.append(s)
        return s
    yield start
    for s in started:
        s.stop()


def mosquitto_pub(broker, version, qos, topic, lines, retain=False):
    args = ["mosquitto_pub", "-h", broker.host, "-p", str(broker.port), "-V", version,
            "-q", str(qos), "-t", topic, "-l", "-i", f"pub-{version}-{qos}"]
    if retain:
        args.append("-r")
    out = subprocess.run(args, input="".join(f"{l}\n" for l in lines), text=True,
                         capture_output=True, timeout=TIMEOUT)
    assert out.returncode == 0, f"mosquitto_pub failed: {out.stderr}"


@pytest.mark.parametrize("pub_qos,sub_qos", [(0, 0), (1, 1), (2, 2), (2, 1), (1, 0)])
@pytest.mark.spec(
    "MQTT-4.5.0-1", "MQTT-3.8.4-8", "MQTT-4.6.0-6", "MQTT-3.3.1-12",
    v311=["MQTT-4.5.0-1", "MQTT-3.8.4-6", "MQTT-4.6.0-6", "MQTT-3.3.1-9", "MQTT-7.0.0-2"])
def test_mqtt_4_5_0_1_mosquitto_sub_receives_what_mosquitto_pub_sends(
        broker, mosquitto_subs, cli_version, pub_qos, sub_qos):
    """[MQTT-4.5.0-1] When a Server takes ownership of an incoming Application Message it MUST
    add it to the Session State for those Clients that have matching Subscriptions.
    [MQTT-3.8.4-8] The QoS of Application Messages sent in response to a Subscription MUST be
    the minimum of the QoS of the originally published message and the Maximum QoS granted.
    [MQTT-4.6.0-6] in order; [MQTT-3.3.1-12] RETAIN 0 on live messages."""
    lines = [f"message {i}" for i in range(5)]
    sub = mosquitto_subs(broker, cli_version, sub_qos, len(lines))
    sub.wait_line(r"^Subscribed")
    mosquitto_pub(broker, cli_version, pub_qos, "a/b/c", lines)
    got = sub.finish()
    expected_qos = min(pub_qos, sub_qos)
    assert got == [("a/b/c", l, expected_qos, False) for l in lines]


@pytest.mark.spec(
    "MQTT-3.3.1-5", "MQTT-3.3.1-9",
    v311=["MQTT-3.3.1-5", "MQTT-3.3.1-6", "MQTT-3.3.1-8"])
def test_mqtt_3_3_1_9_mosquitto_sub_gets_what_mosquitto_pub_retained(
        broker, mosquitto_subs, cli_version):
    """[MQTT-3.3.1-5] the Server MUST ... store the Application Message (RETAIN 1).
    [MQTT-3.3.1-9] If Retain Handling is set to 0 the Server MUST send the retained messages
    matching the Topic Filter of the subscription to the Client, with the RETAIN flag set
    (3.1.1: [MQTT-3.3.1-6], [MQTT-3.3.1-8])."""
    mosquitto_pub(broker, cli_version, 1, "a/retained", ["kept for later"], retain=True)
    mosquitto_pub(broker, cli_version, 2, "a/retained2", ["also kept"], retain=True)
    sub = mosquitto_subs(broker, cli_version, 2, 2)
    got = sorted(sub.finish())
    assert got == [("a/retained", "kept for later", 1, True),
                   ("a/retained2", "also kept", 2, True)]
