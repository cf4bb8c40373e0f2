"""Fixtures of the conformance suite.

`broker`: a fresh broker per test on a free loopback port with its own data directory: the
edge (`EDGE_BIN`, default <repo>/target/release/edge) or Mosquitto, chosen by
`CONFORMANCE_BROKER=edge|mosquitto` (default edge). Extra `[mqtt]` keys for one test:
`@pytest.mark.broker_config(max_keepalive="2s")`; the Mosquitto equivalents are in
brokers.MOSQUITTO_KEYS. A failing test's report carries the broker's stderr.

`clients`: makes paho clients (`clients.connect(...)`) and raw-socket clients
(`clients.raw(version)`) for the broker and closes all of them after the test.

`version`: parametrizes a test over MQTT 3.1.1 (4) and 5.0 (5).
"""

from __future__ import annotations

import os
from typing import Any, Optional

import pytest

from brokers import Broker
from mqttclient import V311, V5, Client, WillSpec
from rawmqtt import RawClient

BROKER_KIND = os.environ.get("CONFORMANCE_BROKER", "edge")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "broker_config(**keys): extra [mqtt] config keys for this test's broker")
    config.addinivalue_line(
        "markers", "skip_mosquitto(reason): Mosquitto knowingly deviates; run on the edge only")
    config.addinivalue_line(
        "markers", "spec(*ids_5_0, v311=ids): the normative statements this test checks "
        "(see normative.py and NORMATIVE.md)")


def pytest_report_header(config: pytest.Config) -> str:
    return f"conformance broker: {BROKER_KIND}"


def pytest_runtest_setup(item: pytest.Item) -> None:
    marker = item.get_closest_marker("skip_mosquitto")
    if marker and BROKER_KIND == "mosquitto":
        pytest.skip(f"Mosquitto deviates: {marker.args[0]}")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    broker = getattr(item, "conformance_broker", None)
    if report.failed and broker is not None:
        report.sections.append((f"{broker.kind} stderr (tail)", broker.all_stderr()[-30000:]))


@pytest.fixture
def broker(request: pytest.FixtureRequest):
    marker = request.node.get_closest_marker("broker_config")
    b = Broker(BROKER_KIND, dict(marker.kwargs) if marker else None)
    request.node.conformance_broker = b
    try:
        b.start()
        yield b
    finally:
        b.close()


@pytest.fixture(params=[V311, V5], ids=["v311", "v5"])
def version(request: pytest.FixtureRequest) -> int:
    return request.param


class Clients:
    """Client factory bound to one broker; everything it made is closed at teardown."""

    def __init__(self, broker: Broker):
        self.broker = broker
        self.made: list[Any] = []

    def new(self, version: int = V5, client_id: Optional[str] = None, clean: bool = True,
            keepalive: int = 30, session_expiry: Optional[int] = None,
            connect_props: Optional[dict[str, Any]] = None,
            will: Optional[WillSpec] = None) -> Client:
        """A paho client, not yet connected."""
        props = dict(connect_props or {})
        if session_expiry is not None:
            props["SessionExpiryInterval"] = session_expiry
        c = Client(self.broker.host, self.broker.port, version, client_id, clean, keepalive,
                   props or None, will)
        self.made.append(c)
        return c

    def connect(self, version: int = V5, **kwargs: Any) -> Client:
        """A connected paho client (the CONNACK must be a success)."""
        c = self.new(version, **kwargs)
        ack = c.connect()
        assert ack.reason == 0, f"{c.client_id}: CONNACK {ack}"
        return c

    def raw(self, version: int) -> RawClient:
        """A raw-socket client with an open TCP connection and nothing sent."""
        c = RawClient(self.broker.host, self.broker.port, version)
        self.made.append(c)
        return c

    def close(self) -> None:
        for c in self.made:
            try:
                c.close()
            except Exception:  # teardown: one client's failure must not leak the others
                pass


@pytest.fixture
def clients(broker: Broker):
    c = Clients(broker)
    try:
        yield c
    finally:
        c.close()
