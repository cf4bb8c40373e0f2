"""paho-mqtt clients that tests drive step by step: every call that expects an answer from
the broker waits for it (with a timeout) and returns what came back, and received messages
are collected so a test can wait for them.

Waiting for something to arrive always has a timeout and fails with what did arrive.
Checking that nothing arrives (`assert_nothing`) waits a short bounded window: use it only for
negative checks, after a positive event has shown the broker got that far.
"""

from __future__ import annotations

import itertools
import socket
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Optional, Union

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.reasoncodes import ReasonCode
from paho.mqtt.subscribeoptions import SubscribeOptions

V311, V5 = 4, 5
TIMEOUT = 10.0  # for anything the broker must do promptly
QUIET = 0.5  # window of a negative check

_ids = itertools.count(1)


def unique_id(prefix: str = "c") -> str:
    return f"{prefix}-{next(_ids)}-{int(time.time() * 1000) % 100000}"


def properties(packet_type: int, values: Optional[dict[str, Any]]) -> Optional[Properties]:
    """paho Properties from {"MessageExpiryInterval": 5, "UserProperty": [(k, v)], ...}."""
    if not values:
        return None
    props = Properties(packet_type)
    for name, value in values.items():
        setattr(props, name, value)
    return props


def props_dict(props: Optional[Properties]) -> dict[str, Any]:
    """paho Properties as {"UserProperty": [...], "SubscriptionIdentifier": [...], ...}."""
    out: dict[str, Any] = {}
    if props is None:
        return out
    for name in props.names:
        compact = name.replace(" ", "")
        if hasattr(props, compact):
            out[compact] = getattr(props, compact)
    return out


@dataclass
class Message:
    """A PUBLISH the client received."""

    topic: str
    payload: bytes
    qos: int
    retain: bool
    dup: bool
    props: dict[str, Any]
    # The topic as it was on the wire (empty when only a topic alias was sent).
    wire_topic: str = ""
    received_at: float = 0.0

    def __repr__(self) -> str:
        return (f"Message({self.topic!r}, {self.payload[:40]!r}, qos={self.qos}, "
                f"retain={self.retain}, props={self.props})")


@dataclass
class ConnAck:
    reason: int
    session_present: bool
    props: dict[str, Any] = field(default_factory=dict)


@dataclass
class WillSpec:
    topic: str
    payload: bytes
    qos: int = 0
    retain: bool = False
    props: Optional[dict[str, Any]] = None


SubscriptionSpec = Union[str, tuple[str, int], tuple[str, SubscribeOptions]]


def sub_options(qos: int = 0, no_local: bool = False, retain_as_published: bool = False,
                retain_handling: int = 0) -> SubscribeOptions:
    return SubscribeOptions(qos=qos, noLocal=no_local, retainAsPublished=retain_as_published,
                            retainHandling=retain_handling)


class Client:
    """A paho client for one broker; `connect()` returns once the CONNACK is in."""

    def __init__(self, host: str, port: int, version: int = V5, client_id: Optional[str] = None,
                 clean: bool = True, keepalive: int = 30,
                 connect_props: Optional[dict[str, Any]] = None,
                 will: Optional[WillSpec] = None):
        self.host, self.port, self.version = host, port, version
        self.client_id = unique_id() if client_id is None else client_id
        self.clean, self.keepalive = clean, keepalive
        self.connect_props = connect_props
        self.cond = threading.Condition()
        self.messages: list[Message] = []
        self.connack: Optional[ConnAck] = None
        self.disconnected: Optional[int] = None  # reason once the connection is gone
        self._acks: dict[int, tuple[list[int], dict[str, Any]]] = {}
        self._aliases: dict[int, str] = {}
        self._started = False
        self.paho = mqtt.Client(
            mqtt.CallbackAPIVersion.VERSION2,
            client_id=self.client_id,
            clean_session=clean if version == V311 else None,
            protocol=mqtt.MQTTv5 if version == V5 else mqtt.MQTTv311,
            reconnect_on_failure=False,
        )
        # Keep every QoS 1/2 message in flight: tests count what the broker sends.
        self.paho.max_inflight_messages_set(0)
        self.paho.max_queued_messages_set(0)
        if will:
            self.paho.will_set(will.topic, will.payload, will.qos, will.retain,
                               properties(PacketTypes.WILLMESSAGE, will.props))
        self.paho.on_connect = self._on_connect
        self.paho.on_disconnect = self._on_disconnect
        self.paho.on_message = self._on_message
        self.paho.on_subscribe = self._on_ack
        self.paho.on_unsubscribe = self._on_ack

    # -- callbacks (paho's network thread) --------------------------------------------

    def _on_connect(self, _c, _u, flags, reason: ReasonCode, props) -> None:
        with self.cond:
            self._aliases.clear()  # aliases never carry over to a new connection
            self.connack = ConnAck(reason.value, bool(flags.session_present), props_dict(props))
            self.cond.notify_all()

    def _on_disconnect(self, _c, _u, _flags, reason: ReasonCode, _props) -> None:
        with self.cond:
            self.disconnected = reason.value if reason is not None else 0
            self.cond.notify_all()

    def _on_ack(self, _c, _u, mid: int, reasons: list[ReasonCode], props) -> None:
        with self.cond:
            self._acks[mid] = ([r.value for r in reasons], props_dict(props))
            self.cond.notify_all()

    def _on_message(self, _c, _u, msg: mqtt.MQTTMessage) -> None:
        props = props_dict(getattr(msg, "properties", None))
        wire_topic = msg.topic
        topic = wire_topic
        # paho-mqtt (2.2) hands topic-aliased messages over as they came: resolve them here.
        alias = props.get("TopicAlias")
        with self.cond:
            if alias is not None:
                if wire_topic:
                    self._aliases[alias] = wire_topic
                else:
                    topic = self._aliases.get(alias, f"<unknown topic alias {alias}>")
            self.messages.append(Message(topic, msg.payload, msg.qos, bool(msg.retain),
                                         bool(msg.dup), props, wire_topic, time.monotonic()))
            self.cond.notify_all()

    # -- waiting ------------------------------------------------------------------------

    def _wait(self, ready: Callable[[], Any], timeout: float, what: str) -> Any:
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                value = ready()
                if value:
                    return value
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"{self.client_id}: no {what} within {timeout} s; "
                                         f"received {self.messages}")
                self.cond.wait(remaining)

    # -- operations -----------------------------------------------------------------------

    def connect(self, timeout: float = TIMEOUT) -> ConnAck:
        """Connects and returns the CONNACK (also when the broker refuses the connection)."""
        with self.cond:
            self.connack, self.disconnected = None, None
        props = properties(PacketTypes.CONNECT, self.connect_props)
        if self.version == V5:
            self.paho.connect(self.host, self.port, self.keepalive, clean_start=self.clean,
                              properties=props)
        else:
            self.paho.connect(self.host, self.port, self.keepalive)
        if not self._started:
            self.paho.loop_start()
            self._started = True
        return self._wait(lambda: self.connack or (self.disconnected is not None and
                                                   ConnAck(-1, False)),
                          timeout, "CONNACK")

    def subscribe(self, spec: Union[SubscriptionSpec, list[SubscriptionSpec]], qos: int = 0,
                  props: Optional[dict[str, Any]] = None) -> list[int]:
        """Subscribes and returns the SUBACK's reason codes (3.1.1: granted QoS or 0x80).

        `spec` is a filter (at `qos`), a (filter, qos) or (filter, SubscribeOptions) pair,
        or a list of pairs.
        """
        if isinstance(spec, str):
            spec = (spec, sub_options(qos) if self.version == V5 else qos)
        if isinstance(spec, list) and self.version == V5:
            spec = [(t, sub_options(o) if isinstance(o, int) else o) for t, o in spec]
        elif isinstance(spec, tuple) and self.version == V5 and isinstance(spec[1], int):
            spec = (spec[0], sub_options(spec[1]))
        rc, mid = self.paho.subscribe(spec, properties=properties(PacketTypes.SUBSCRIBE, props))
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"subscribe not sent: {rc}"
        return self._wait(lambda: self._acks.pop(mid, None), TIMEOUT, "SUBACK")[0]

    def unsubscribe(self, topics: Union[str, list[str]]) -> list[int]:
        """Unsubscribes and returns the UNSUBACK's reason codes (none in 3.1.1)."""
        rc, mid = self.paho.unsubscribe(topics)
        assert rc == mqtt.MQTT_ERR_SUCCESS, f"unsubscribe not sent: {rc}"
        return self._wait(lambda: self._acks.pop(mid, None), TIMEOUT, "UNSUBACK")[0]

    def publish(self, topic: str, payload: Union[bytes, str] = b"", qos: int = 0,
                retain: bool = False, props: Optional[dict[str, Any]] = None) -> None:
        """Publishes and waits until the flow is complete (QoS 0: written to the socket)."""
        info = self.paho.publish(topic, payload, qos, retain,
                                 properties(PacketTypes.PUBLISH, props))
        info.wait_for_publish(TIMEOUT)
        assert info.is_published(), f"{self.client_id}: publish to {topic} not acknowledged"

    def disconnect(self, reason: Optional[int] = None,
                   props: Optional[dict[str, Any]] = None) -> None:
        """Sends DISCONNECT (5.0: with `reason`) and waits until the connection is closed."""
        rc = ReasonCode(PacketTypes.DISCONNECT, identifier=reason) if reason is not None else None
        self.paho.disconnect(rc, properties(PacketTypes.DISCONNECT, props))
        self._wait(lambda: self.disconnected is not None, TIMEOUT, "disconnection")
        self._stop_loop()

    def drop(self) -> None:
        """Closes the TCP connection without DISCONNECT (an abnormal close, to the broker)."""
        sock = self.paho.socket()
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        self._wait(lambda: self.disconnected is not None, TIMEOUT, "disconnection")
        self._stop_loop()

    def wait_disconnected(self, timeout: float = TIMEOUT) -> int:
        """Waits until the broker closes the connection; returns the reason paho saw."""
        self._wait(lambda: self.disconnected is not None, timeout, "disconnection")
        return self.disconnected

    def _stop_loop(self) -> None:
        if self._started:
            self.paho.loop_stop()
            self._started = False

    def close(self) -> None:
        """Stops the client whatever its state (test teardown)."""
        try:
            if self.connack is not None and self.disconnected is None:
                self.paho.disconnect()
                with self.cond:
                    self.cond.wait_for(lambda: self.disconnected is not None, 2)
        finally:
            self._stop_loop()
            sock = self.paho.socket()
            if sock is not None:
                sock.close()

    # -- received messages ----------------------------------------------------------------

    def wait_messages(self, count: int, match: Optional[Callable[[Message], bool]] = None,
                      timeout: float = TIMEOUT) -> list[Message]:
        """The first `count` received messages that `match`, once they are all in."""
        def ready():
            got = [m for m in self.messages if match is None or match(m)]
            return got[:count] if len(got) >= count else None
        return self._wait(ready, timeout, f"{count} matching messages")

    def wait_message(self, match: Optional[Callable[[Message], bool]] = None,
                     timeout: float = TIMEOUT) -> Message:
        return self.wait_messages(1, match, timeout)[0]

    def wait_payload(self, payload: Union[bytes, str], timeout: float = TIMEOUT) -> Message:
        p = payload.encode() if isinstance(payload, str) else payload
        return self.wait_message(lambda m: m.payload == p, timeout)

    def received(self, match: Optional[Callable[[Message], bool]] = None) -> list[Message]:
        with self.cond:
            return [m for m in self.messages if match is None or match(m)]

    def assert_nothing(self, match: Optional[Callable[[Message], bool]] = None,
                       window: float = QUIET, what: str = "message") -> None:
        """Negative check: no matching message arrives within `window` (or before)."""
        deadline = time.monotonic() + window
        with self.cond:
            while True:
                got = [m for m in self.messages if match is None or match(m)]
                assert not got, f"{self.client_id}: unexpected {what}: {got}"
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return
                self.cond.wait(remaining)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = TIMEOUT) -> None:
    """Polls `condition` (for conditions over several clients) until it holds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} within {timeout} s")
        time.sleep(0.02)


def payloads(messages: Iterable[Message]) -> list[bytes]:
    return [m.payload for m in messages]
