"""The broker under test as a process: Tributary's `edge`, or Eclipse Mosquitto as the
reference the suite is checked against.

Each broker gets a free loopback port and its own temporary directory (config, data, one
stderr file per run). `kill()` is SIGKILL, `stop()` SIGTERM; `restart()` starts it again on
the same port and data. Only the process this object started is ever signalled, by its pid.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

REPO = Path(__file__).resolve().parents[2]


_handed_out: set[int] = set()


def free_port() -> int:
    """A free port on 127.0.0.1 below the kernel's ephemeral range, never handed out twice.

    A port from bind(0) is in the range that outgoing connections take their local ports
    from, so a broker restarted on its old port could find a client's connection on it.
    """
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            eph_lo, _ = map(int, f.read().split())
    except (OSError, ValueError):
        eph_lo = 32768
    rng = random.Random()
    for _ in range(5000):
        port = rng.randint(10000, max(10001, eph_lo - 1))
        if port in _handed_out:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
        _handed_out.add(port)
        return port
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def seconds(value: Any) -> int:
    """Whole seconds of a duration as the edge's config writes it ("5s", "2m", 3)."""
    if isinstance(value, (int, float)):
        return int(value)
    m = re.fullmatch(r"(\d+)\s*(ms|s|m|h)?", str(value).strip())
    if not m:
        raise ValueError(f"not a duration: {value!r}")
    n, unit = int(m.group(1)), m.group(2) or "s"
    return {"ms": n // 1000, "s": n, "m": n * 60, "h": n * 3600}[unit]


def size_bytes(value: Any) -> int:
    """Bytes of a size as the edge's config writes it ("1MiB", "64KiB", 300)."""
    if isinstance(value, int):
        return value
    m = re.fullmatch(r"(\d+)\s*(B|KiB|MiB|GiB|KB|MB|GB)?", str(value).strip())
    if not m:
        raise ValueError(f"not a size: {value!r}")
    unit = m.group(2) or "B"
    mult = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30,
            "KB": 1000, "MB": 1000**2, "GB": 1000**3}[unit]
    return int(m.group(1)) * mult


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return str(value)
    return json.dumps(str(value))  # a TOML basic string is a JSON string


# The edge's [mqtt] keys and how each is said to Mosquitto.
MOSQUITTO_KEYS = {
    "max_keepalive": ("max_keepalive", seconds),
    # Both limit the aliases a client may use towards the server.
    "topic_alias_maximum": ("max_topic_alias", int),
    # Mosquitto announces max_inflight_messages as its Receive Maximum to 5.0 clients.
    "receive_maximum": ("max_inflight_messages", int),
    "max_packet_size": ("max_packet_size", size_bytes),
    "max_queued_messages": ("max_queued_messages", int),
    # Mosquitto has one bound for connected and disconnected sessions; the edge has two.
    "max_offline_messages": ("max_queued_messages", int),
    "max_queued_bytes": ("max_queued_bytes", size_bytes),
    "sys_interval": ("sys_interval", seconds),
}


def skip_if_mosquitto(broker: "Broker", deviation: str) -> None:
    """Skips the calling test on Mosquitto, which knowingly does `deviation`."""
    if broker.kind == "mosquitto":
        import pytest

        pytest.skip(f"Mosquitto deviates: {deviation}")


class BrokerError(RuntimeError):
    pass


class Broker:
    """One broker process (`kind` "edge" or "mosquitto") with its own port and data."""

    host = "127.0.0.1"

    def __init__(self, kind: str, mqtt_extra: Optional[dict[str, Any]] = None):
        if kind not in ("edge", "mosquitto"):
            raise BrokerError(f"CONFORMANCE_BROKER must be edge or mosquitto, not {kind!r}")
        self.kind = kind
        self.mqtt = {"sys_interval": "1s", **(mqtt_extra or {})}
        self.dir = Path(tempfile.mkdtemp(prefix=f"conformance-{kind}-"))
        self.data_dir = self.dir / "data"
        self.data_dir.mkdir()
        self.port = free_port()
        self.proc: Optional[subprocess.Popen] = None
        self.runs = 0
        # Every run's stderr, kept once the directory is removed.
        self.saved_stderr: Optional[str] = None
        self.config_path = self._write_config()

    # -- config ------------------------------------------------------------------

    def _write_config(self) -> Path:
        if self.kind == "edge":
            lines = ["[mqtt]", f'listen = "{self.host}:{self.port}"']
            lines += [f"{k} = {toml_value(v)}" for k, v in self.mqtt.items()]
            lines += ["", "[storage]", f"data_dir = {toml_value(self.data_dir)}", ""]
            path = self.dir / "edge.toml"
        else:
            lines = [
                f"listener {self.port} {self.host}",
                "allow_anonymous true",
                "persistence true",
                f"persistence_location {self.data_dir}/",
                # Run as root it would drop to the mosquitto user, which cannot write here.
                "user root",
                "log_dest stderr",
                "log_type all",
            ]
            for key, value in self.mqtt.items():
                if key not in MOSQUITTO_KEYS:
                    raise BrokerError(f"no Mosquitto equivalent for [mqtt] {key}")
                name, convert = MOSQUITTO_KEYS[key]
                lines.append(f"{name} {convert(value)}")
            lines.append("")
            path = self.dir / "mosquitto.conf"
        path.write_text("\n".join(lines))
        return path

    def _command(self) -> list[str]:
        if self.kind == "edge":
            binary = os.environ.get("EDGE_BIN") or str(REPO / "target" / "release" / "edge")
            if not Path(binary).exists():
                raise BrokerError(f"no edge binary at {binary}: build it or set EDGE_BIN")
            return [binary, "--config", str(self.config_path)]
        binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        return [binary, "-c", str(self.config_path)]

    # -- process -----------------------------------------------------------------

    def _stderr_path(self, run: int) -> Path:
        return self.dir / f"{self.kind}-{run}.stderr"

    def stderr(self) -> str:
        """What the broker wrote to stderr in its latest run."""
        try:
            return self._stderr_path(self.runs).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def all_stderr(self) -> str:
        if self.saved_stderr is not None:
            return self.saved_stderr
        parts = []
        for run in range(1, self.runs + 1):
            try:
                text = self._stderr_path(run).read_text(errors="replace")
            except FileNotFoundError:
                continue
            parts.append(f"--- run {run} ---\n{text}")
        return "\n".join(parts)

    def start(self) -> None:
        """Starts the broker and waits until it accepts TCP connections."""
        if self.proc is not None:
            raise BrokerError("the broker is already running")
        self.runs += 1
        env = dict(os.environ, RUST_LOG=os.environ.get("RUST_LOG", "info"))
        with open(self._stderr_path(self.runs), "wb") as err:
            self.proc = subprocess.Popen(self._command(), stdin=subprocess.DEVNULL,
                                         stdout=subprocess.DEVNULL, stderr=err, env=env)
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((self.host, self.port), timeout=0.5).close()
                return
            except OSError:
                pass
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                raise BrokerError(f"{self.kind} exited with {code} while starting:\n"
                                  f"{self.stderr()}")
            if time.monotonic() > deadline:
                self._signal_and_wait(signal.SIGKILL, 10)
                raise BrokerError(f"{self.kind} did not listen on port {self.port} within "
                                  f"30 s:\n{self.stderr()}")
            time.sleep(0.02)

    def _signal_and_wait(self, sig: int, timeout: float) -> Optional[int]:
        proc, self.proc = self.proc, None
        if proc is None:
            return None
        if proc.poll() is None:
            os.kill(proc.pid, sig)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            raise BrokerError(f"{self.kind} did not exit within {timeout} s of signal {sig}:\n"
                              f"{self.stderr()}") from None

    def kill(self) -> None:
        """SIGKILL, as a power cut or the OOM killer would."""
        self._signal_and_wait(signal.SIGKILL, 10)

    def stop(self) -> Optional[int]:
        """SIGTERM, then waits for the exit (SIGKILL after 10 s); returns the exit status."""
        return self._signal_and_wait(signal.SIGTERM, 10)

    def restart(self) -> None:
        """Starts the broker again on the same port and data directory."""
        if self.proc is not None:
            raise BrokerError("stop or kill the broker before restarting it")
        self.start()

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def close(self) -> None:
        """Stops the broker if it runs and removes its directory."""
        try:
            if self.proc is not None:
                self.stop()
        finally:
            self.saved_stderr = self.all_stderr()
            shutil.rmtree(self.dir, ignore_errors=True)
