#!/usr/bin/env python3
"""The broker comparison of tests/bench/run: the edge, Eclipse Mosquitto and rumqttd under the
same load on 127.0.0.1, one broker at a time, restarted for every run.

Started by tests/bench/run (which installs the peers and builds the binaries); see the README's
Performance section. Standard library only. Every process started here is stopped by its PID
on exit, Ctrl-C included.
"""

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024
BROKERS = ("edge", "mosquitto", "rumqttd")
# A run that starts while more than this share of the CPUs was busy (over the second before,
# tests/bench/busy) is marked as taken on a busy machine.
QUIET_BUSY = 10.0
import importlib.machinery  # noqa: E402
import importlib.util  # noqa: E402


def _load_busy(path):
    """busy_percent of tests/bench/busy (a script without .py, so its loader is named)."""
    loader = importlib.machinery.SourceFileLoader("bench_busy", path)
    module = importlib.util.module_from_spec(importlib.util.spec_from_loader("bench_busy", loader))
    loader.exec_module(module)
    return module.busy_percent


busy_percent = _load_busy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "busy"))
PROTOCOL = "3.1.1"  # rumqttd's complete listener is its v4 one; every client speaks 3.1.1.

SCENARIOS = {
    1: "QoS 0, 10 publishers, 64 B",
    2: "QoS 1, 10 publishers x 100 in flight, 64 B",
    3: "QoS 1, 1,000 publishers x 10 in flight, 64 B",
    4: "QoS 1, 10 publishers x 100 in flight, 1 KiB",
    5: "scenario 2 + one QoS 1 subscriber on #",
    6: "idle connections with keep-alive",
    7: "edge mirroring to a 1-node Kafka",
}

# (qos, publishers, in flight, payload bytes) of the publish scenarios.
LOADS = {
    1: (0, 10, 100, 64),
    2: (1, 10, 100, 64),
    3: (1, 1000, 10, 64),
    4: (1, 10, 100, 1024),
    5: (1, 10, 100, 64),
}


class Harness:
    def __init__(self, args):
        self.args = args
        self.bin = args.bin
        self.work = tempfile.mkdtemp(prefix="tributary-bench-")
        self.procs = []  # every Popen started, stopped by PID in cleanup()
        self.kafka_dir = None
        self.results = []  # one dict per (scenario, broker, generator, load)
        self.notes = []
        self.port = free_port()
        self.admin_port = free_port()

    # ---- processes ----------------------------------------------------------------------------

    def spawn(self, argv, log_name, **kwargs):
        log = open(os.path.join(self.work, log_name), "ab")
        proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, **kwargs)
        log.close()
        self.procs.append(proc)
        return proc

    def stop(self, proc, sig=signal.SIGINT, timeout=20):
        """Stops one process by its PID: `sig`, then SIGKILL after `timeout` seconds."""
        if proc is None:
            return
        if proc.poll() is None:
            try:
                proc.send_signal(getattr(proc, "stop_signal", sig))
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc in self.procs:
            self.procs.remove(proc)

    def wait_rusage(self, proc, timeout):
        """Waits for a child and returns (exit code, its CPU seconds: user + system)."""
        deadline = time.time() + timeout
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid == proc.pid:
                proc.returncode = os.waitstatus_to_exitcode(status)
                if proc in self.procs:
                    self.procs.remove(proc)
                return proc.returncode, usage.ru_utime + usage.ru_stime
            if time.time() > deadline:
                self.stop(proc, signal.SIGTERM, 5)
                raise RuntimeError(f"{proc.args[0]} did not finish within {timeout:.0f} s")
            time.sleep(0.05)

    def cleanup(self):
        for proc in list(self.procs):
            self.stop(proc, signal.SIGTERM, 10)
        if self.kafka_dir:
            subprocess.run(["tests/kafka/cluster", "stop", self.kafka_dir],
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            self.kafka_dir = None
        if not self.args.keep_work:
            shutil.rmtree(self.work, ignore_errors=True)

    # ---- brokers ------------------------------------------------------------------------------

    def start_broker(self, broker, extra_edge="", max_connections=2000):
        data = os.path.join(self.work, "data")
        shutil.rmtree(data, ignore_errors=True)
        if broker == "edge":
            config = os.path.join(self.work, "edge.toml")
            with open(config, "w") as f:
                f.write(edge_config(self.port, self.admin_port, data, extra_edge))
            argv = [os.path.join(self.bin, "edge"), "--config", config]
        elif broker == "mosquitto":
            config = os.path.join(self.work, "mosquitto.conf")
            with open(config, "w") as f:
                f.write(MOSQUITTO_CONFIG.format(port=self.port))
            argv = [self.args.mosquitto, "-c", config]
        else:
            config = os.path.join(self.work, "rumqttd.toml")
            with open(config, "w") as f:
                f.write(RUMQTTD_CONFIG.format(port=self.port, max_connections=max_connections))
            argv = [self.args.rumqttd, "--quiet", "--config", config]
        proc = self.spawn(argv, f"{broker}.log")
        if broker == "rumqttd":
            proc.stop_signal = signal.SIGTERM  # it does not end on SIGINT
        deadline = time.time() + 30
        while not port_open(self.port):
            if proc.poll() is not None:
                raise RuntimeError(f"{broker} exited at start: {self.log_tail(broker + '.log')}")
            if time.time() > deadline:
                raise RuntimeError(f"{broker} does not listen on 127.0.0.1:{self.port}")
            time.sleep(0.05)
        return proc

    def log_tail(self, name, lines=15):
        try:
            with open(os.path.join(self.work, name), errors="replace") as f:
                return "".join(f.readlines()[-lines:])
        except OSError:
            return ""

    # ---- load ---------------------------------------------------------------------------------

    def flood(self, qos, publishers, inflight, payload, seconds, rate=None, count=None,
              kind="binary"):
        report = os.path.join(self.work, "flood.json")
        if os.path.exists(report):
            os.remove(report)
        argv = [os.path.join(self.bin, "firmware-sim"), "run", "--flood",
                "--broker", f"mqtt://127.0.0.1:{self.port}", "--protocol", PROTOCOL,
                "--devices", str(publishers), "--qos", str(qos), "--inflight", str(inflight),
                "--payload", kind, "--payload-size", str(payload), "--report", report,
                "--topic", "sensors/{device}/t"]
        if count is not None:
            argv += ["--count", str(count)]
        else:
            argv += ["--duration", f"{seconds}s"]
        if rate is not None:
            argv += ["--flood-rate", str(rate)]
        proc = self.spawn(argv, "firmware-sim.log")
        code, cpu = self.wait_rusage(proc, (seconds or 60) + 120)
        if code != 0 or not os.path.exists(report):
            raise RuntimeError(f"firmware-sim run failed ({code}): {self.log_tail('firmware-sim.log')}")
        with open(report) as f:
            r = json.load(f)
        msgs = r["acked_per_s"] if qos > 0 else r["sent_per_s"]
        lat = r["latency"] if qos > 0 else {}
        return {
            "msg_per_s": msgs,
            "mb_per_s": msgs * payload / 1e6,
            "p50_ms": lat.get("p50_ms"), "p99_ms": lat.get("p99_ms"), "p999_ms": lat.get("p999_ms"),
            "seconds": r["publish_seconds"],
            "generator_cpu_cores": cpu / max(r["total_seconds"], 1e-9),
            "errors": r["errors"] + r["connect_failures"],
            "acked": r["acked"], "sent": r["sent"],
        }

    def mqtt_benchmark(self, qos, clients, payload, count):
        argv = [self.args.mqtt_benchmark, "--broker", f"127.0.0.1:{self.port}",
                "--topic", "bench", "--qos", str(qos), "--client-num", str(clients),
                "--size", str(count), "--payload", "x" * payload,
                "--client-id", "mqtt-benchmark"]
        out = os.path.join(self.work, "mqtt-benchmark.log")
        if os.path.exists(out):
            os.remove(out)
        started = time.time()
        proc = self.spawn(argv, "mqtt-benchmark.log")
        code, cpu = self.wait_rusage(proc, 600)
        wall = time.time() - started
        text = open(out, errors="replace").read()
        m = re.search(r"(\d+) client, total: (\d+), duration: ([\d.]+) \(sec\), avg speed: ([\d.]+)", text)
        failures = len(re.findall(r"publish failed", text))
        if code != 0 or not m:
            raise RuntimeError(f"mqtt-benchmark failed ({code}): {text[-1500:]}")
        total = int(m.group(2))
        if total < clients * count or failures:
            raise RuntimeError(f"mqtt-benchmark sent {total} of {clients * count}: {text[-1500:]}")
        msgs = float(m.group(4))
        return {"msg_per_s": msgs, "mb_per_s": msgs * payload / 1e6, "p50_ms": None,
                "p99_ms": None, "p999_ms": None, "seconds": float(m.group(3)),
                "generator_cpu_cores": cpu / max(wall, 1e-9), "errors": 0}

    # ---- one measured run ---------------------------------------------------------------------

    def measured(self, broker, load, extra_edge="", subscriber=False):
        """Starts `broker` fresh, runs `load()` against it, returns its result with the broker's
        CPU (cores used over the load) and peak RSS, and stops the broker. Records the load
        average before the run: a figure taken on a busy machine says so."""
        busy = busy_percent()
        if busy > QUIET_BUSY:
            # Give what ran before (the previous broker's exit, a build) a moment to end.
            deadline = time.time() + 10
            while time.time() < deadline and busy > QUIET_BUSY:
                busy = busy_percent()
        load1 = os.getloadavg()[0]
        proc = self.start_broker(broker, extra_edge)
        sub = None
        try:
            if subscriber:
                sub_report = os.path.join(self.work, "sub.json")
                if os.path.exists(sub_report):
                    os.remove(sub_report)
                sub = self.spawn([os.path.join(self.bin, "firmware-sim"), "subscribe",
                                  "--broker", f"mqtt://127.0.0.1:{self.port}",
                                  "--protocol", PROTOCOL, "--filter", "#", "--qos", "1",
                                  "--duration", f"{self.args.seconds + 120}s",
                                  "--idle-timeout", "3s", "--report", sub_report],
                                 "subscriber.log")
                time.sleep(1)
                if sub.poll() is not None:
                    raise RuntimeError(f"the subscriber failed: {self.log_tail('subscriber.log')}")
            cpu0, t0 = cpu_ticks(proc.pid), time.time()
            result = load()
            cpu1, t1 = cpu_ticks(proc.pid), time.time()
            if sub is not None:
                code, sub_cpu = self.wait_rusage(sub, 120)
                sub = None
                if code != 0:
                    raise RuntimeError(f"the subscriber failed: {self.log_tail('subscriber.log')}")
                with open(sub_report) as f:
                    s = json.load(f)
                result["sub_msg_per_s"] = s["rate_per_s"]
                result["sub_received"] = s["received"]
                result["sub_over_ingest"] = s["rate_per_s"] / max(result["msg_per_s"], 1e-9)
                result["sub_received_over_acked"] = s["received"] / max(result["acked"], 1)
                result["sub_cpu_s"] = sub_cpu
            result["load1_before"] = load1
            result["busy_before_pct"] = busy
            result["broker_cpu_cores"] = (cpu1 - cpu0) / CLK_TCK / max(t1 - t0, 1e-9)
            result["broker_peak_rss_mib"] = status_kib(proc.pid, "VmHWM") / 1024
            if proc.poll() is not None:
                raise RuntimeError(f"{broker} died during the run: {self.log_tail(broker + '.log')}")
            return result
        finally:
            if sub is not None:
                self.stop(sub, signal.SIGTERM)
            self.stop(proc)

    def repeat(self, label, run_once):
        runs = []
        for i in range(self.args.runs):
            r = run_once()
            runs.append(r)
            p99 = f", p99 {r['p99_ms']} ms" if r.get("p99_ms") is not None else ""
            cpu = r.get("broker_cpu_cores")
            cpu = f", broker CPU {cpu:.2f} cores" if cpu is not None else ""
            gen = r.get("generator_cpu_cores")
            gen = f", generator CPU {gen:.2f} cores" if gen is not None else ""
            load = r.get("busy_before_pct")
            load = f", CPU {load:.0f} % busy before" if load is not None else ""
            log(f"  {label} run {i + 1}/{self.args.runs}: {fmt_rate(r.get('msg_per_s'))} msg/s"
                f"{p99}{cpu}{gen}{load}")
        return runs

    def record(self, scenario, broker, generator, load, runs, **extra):
        row = {"scenario": scenario, "scenario_name": SCENARIOS[scenario], "broker": broker,
               "generator": generator, "load": load,
               "fsync": "always" if broker == "edge" else None,
               "durability": DURABILITY[broker], "runs": runs}
        keys = sorted({k for r in runs for k, v in r.items() if isinstance(v, (int, float))})
        row["median"] = {k: statistics.median([r[k] for r in runs if r.get(k) is not None])
                         for k in keys if any(r.get(k) is not None for r in runs)}
        row.update(extra)
        self.results.append(row)
        return row

    # ---- scenarios ----------------------------------------------------------------------------

    def publish_scenario(self, n):
        qos, pubs, inflight, payload = LOADS[n]
        secs = self.args.seconds
        for broker in self.args.brokers:
            log(f"scenario {n} ({SCENARIOS[n]}) on {broker}, firmware-sim")
            runs = self.repeat(broker, lambda: self.measured(
                broker, lambda: self.flood(qos, pubs, inflight, payload, secs),
                subscriber=(n == 5)))
            row = self.record(n, broker, "firmware-sim", "max", runs)
            if n == 4:
                # The same load with JSON telemetry (compressible, as sensors' documents are);
                # the binary run above is random filler behind the stamp (incompressible).
                log(f"scenario 4 on {broker}, firmware-sim, JSON payloads")
                runs = self.repeat(broker, lambda: self.measured(
                    broker, lambda: self.flood(qos, pubs, inflight, payload, secs, kind="json")))
                self.record(n, broker, "firmware-sim (JSON)", "max", runs)
            if n == 2:
                half = max(1, int(row["median"]["msg_per_s"] / 2 / pubs))
                log(f"scenario 2 on {broker}, paced at half: {half * pubs} msg/s")
                runs = self.repeat(broker, lambda: self.measured(
                    broker, lambda: self.flood(qos, pubs, inflight, payload, secs, rate=half)))
                self.record(n, broker, "firmware-sim", f"half ({half * pubs:,} msg/s)", runs)
            if n in (1, 2) and self.args.mqtt_benchmark:
                rate = row["median"]["msg_per_s"]
                count = max(1000, int(rate * secs / pubs))
                log(f"scenario {n} on {broker}, mqtt-benchmark ({pubs} x {count:,} messages)")
                runs = self.repeat(broker, lambda: self.measured(
                    broker, lambda: self.mqtt_benchmark(qos, pubs, payload, count)))
                self.record(n, broker, "mqtt-benchmark", "max", runs, count_per_client=count)

    def idle_scenario(self):
        want = self.args.idle_connections
        soft, hard = resource_nofile()
        # Both the broker and the client hold one descriptor per connection, and each process
        # is bound by RLIMIT_NOFILE (tests/bench/run raises it as far as it may).
        n = min(want, soft - 2000)
        if n < want:
            self.notes.append(
                f"Scenario 6 opened {n:,} connections, not {want:,}: the open-file limit here is "
                f"{soft:,} (hard {hard:,}) and could not be raised (no CAP_SYS_RESOURCE), and "
                f"each broker holds one descriptor per connection.")
        sources = "127.0.1.0-127.0.1.255"
        for broker in self.args.brokers:
            log(f"scenario 6 ({n:,} idle connections) on {broker}")
            runs = []
            for i in range(self.args.runs):
                r = self.idle_once(broker, n, sources)
                runs.append(r)
                log(f"  {broker} run {i + 1}/{self.args.runs}: {r['connected']:,} connected in "
                    f"{r['connect_seconds']:.1f} s, {r['bytes_per_connection']:.0f} B/connection")
            self.record(6, broker, "firmware-sim idle", f"{n:,} connections", runs)

    def idle_once(self, broker, n, sources):
        proc = self.start_broker(broker, max_connections=n + 1000)
        tool = None
        try:
            time.sleep(1)
            before = status_kib(proc.pid, "VmRSS")
            ready = os.path.join(self.work, "idle-ready.json")
            report = os.path.join(self.work, "idle.json")
            for path in (ready, report):
                if os.path.exists(path):
                    os.remove(path)
            hold = self.args.idle_hold
            tool = self.spawn([os.path.join(self.bin, "firmware-sim"), "idle",
                               "--broker", f"mqtt://127.0.0.1:{self.port}", "--protocol", PROTOCOL,
                               "--connections", str(n), "--source-ips", sources,
                               "--keep-alive", "60s", "--hold", f"{hold}s",
                               "--connect-timeout", "60s",
                               "--ready-file", ready, "--report", report], "idle.log")
            cpu0 = cpu_ticks(proc.pid)
            deadline = time.time() + 600
            while not os.path.exists(ready):
                if tool.poll() is not None or time.time() > deadline:
                    raise RuntimeError(f"firmware-sim idle failed: {self.log_tail('idle.log')}")
                time.sleep(0.1)
            cpu1 = cpu_ticks(proc.pid)
            time.sleep(min(5, hold / 2))  # let the broker settle with every connection open
            after = status_kib(proc.pid, "VmRSS")
            peak = status_kib(proc.pid, "VmHWM")
            code, _ = self.wait_rusage(tool, hold + 60)
            tool = None
            with open(report) as f:
                r = json.load(f)
            if proc.poll() is not None:
                raise RuntimeError(f"{broker} died during the run: {self.log_tail(broker + '.log')}")
            connected = max(r["connected"], 1)
            return {
                "connected": r["connected"], "failed": r["failed"],
                "closed_while_held": r["closed_while_held"],
                "connect_seconds": r["connect_seconds"], "connects_per_s": r["connects_per_s"],
                "rss_before_mib": before / 1024, "rss_after_mib": after / 1024,
                "bytes_per_connection": (after - before) * 1024 / connected,
                "broker_peak_rss_mib": peak / 1024,
                "broker_cpu_seconds_connecting": (cpu1 - cpu0) / CLK_TCK,
                "tool_exit": code, "errors": sum(r["errors"].values()),
            }
        finally:
            if tool is not None:
                self.stop(tool, signal.SIGTERM)
            self.stop(proc)

    def kafka_scenario(self):
        if "edge" not in self.args.brokers:
            return
        log("scenario 7: starting a 1-node Kafka")
        subprocess.run(["tests/kafka/cluster", "fetch"], check=True, stdout=subprocess.DEVNULL)
        self.kafka_dir = os.path.join(self.work, "kafka")
        env = dict(os.environ, KAFKA_OWNER_PID=str(os.getpid()))
        out = subprocess.run(["tests/kafka/cluster", "start", "1", self.kafka_dir], env=env,
                             check=True, capture_output=True, text=True)
        bootstrap = out.stdout.strip().splitlines()[-1]
        qos, pubs, inflight, payload = LOADS[2]
        secs = self.args.seconds
        partitions = '[default_route]\ntopic = "telemetry"\npartitions = 4\n'
        for mirror in (False, True):
            label = "mirror on" if mirror else "mirror off"
            log(f"scenario 7: ingest (scenario 2 load), {label}")
            counter = iter(range(1000))

            def once():
                cloud = (f'[cloud]\nbootstrap = "{bootstrap}"\nsite = "ingest{next(counter)}"\n'
                         if mirror else "")
                return self.measured("edge", lambda: self.flood(qos, pubs, inflight, payload, secs),
                                     extra_edge=partitions + cloud)
            runs = self.repeat(f"edge {label}", once)
            self.record(7, "edge", "firmware-sim", f"ingest, {label}", runs)
        log(f"scenario 7: backlog drain ({self.args.backlog:,} records)")
        runs = []
        for i in range(self.args.runs):
            r = self.drain_once(bootstrap, partitions, f"drain{i}")
            runs.append(r)
            log(f"  drain run {i + 1}/{self.args.runs}: {r['records']:,} records in "
                f"{r['drain_seconds']:.1f} s = {fmt_rate(r['msg_per_s'])} rec/s")
        self.record(7, "edge", "edge mirror", f"backlog drain ({self.args.backlog:,} x 64 B)", runs)
        subprocess.run(["tests/kafka/cluster", "stop", self.kafka_dir],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.kafka_dir = None

    def drain_once(self, bootstrap, partitions, site):
        per_device = self.args.backlog // 10
        proc = self.start_broker("edge", partitions)
        try:
            self.flood(1, 10, 100, 64, None, count=per_device)
        finally:
            self.stop(proc)
        config = os.path.join(self.work, "edge.toml")
        with open(config, "a") as f:
            f.write(f'[cloud]\nbootstrap = "{bootstrap}"\nsite = "{site}"\n')
        edge = os.path.join(self.bin, "edge")
        started = time.time()
        proc = self.spawn([edge, "--config", config], "edge-drain.log")
        try:
            cpu0 = cpu_ticks(proc.pid)
            status = None
            while True:
                time.sleep(0.25)
                if proc.poll() is not None:
                    raise RuntimeError(f"the edge exited while draining: {self.log_tail('edge-drain.log')}")
                if time.time() - started > 900:
                    raise RuntimeError("the backlog did not drain within 15 min")
                out = subprocess.run([edge, "--config", config, "mirror-status", "--json"],
                                     capture_output=True, text=True)
                if out.returncode != 0:
                    continue
                status = json.loads(out.stdout)
                if status["lag_records"] == 0 and all(
                        p["mirrored_offset"] is not None for p in status["partitions"]):
                    break
            secs = time.time() - started
            cpu = (cpu_ticks(proc.pid) - cpu0) / CLK_TCK
            return {"records": status["records_mirrored"], "drain_seconds": secs,
                    "msg_per_s": status["records_mirrored"] / secs,
                    "mb_per_s": status["records_mirrored"] * 64 / secs / 1e6,
                    "broker_cpu_cores": cpu / secs,
                    "broker_peak_rss_mib": status_kib(proc.pid, "VmHWM") / 1024}
        finally:
            self.stop(proc)

    # ---- output -------------------------------------------------------------------------------

    def ratios(self):
        """Edge over each peer, same scenario, generator and load, on the median msg/s."""
        for row in self.results:
            # Paced runs carry the rate they were paced to, not a broker's capacity.
            if row["broker"] != "edge" or row["load"].startswith("half"):
                continue
            for peer in ("mosquitto", "rumqttd"):
                other = next((r for r in self.results if r["broker"] == peer
                              and r["scenario"] == row["scenario"]
                              and r["generator"] == row["generator"]
                              and r["load"] == row["load"]), None)
                if other is None or row["scenario"] == 6:
                    continue
                mine, theirs = row["median"].get("msg_per_s"), other["median"].get("msg_per_s")
                if mine and theirs:
                    row.setdefault("ratio", {})[peer] = mine / theirs

    def write(self, started):
        self.ratios()
        date = started.strftime("%Y-%m-%d")
        stamp = started.strftime("%Y-%m-%dT%H%MZ")
        machine = machine_description()
        doc = {"date": started.isoformat(timespec="seconds"), "command": self.args.command,
               "machine": machine, "runs_per_figure": self.args.runs,
               "seconds_per_run": self.args.seconds, "protocol": PROTOCOL,
               "peers": self.args.versions, "configs": {
                   "edge": edge_config("PORT", "ADMIN_PORT", "DATA", ""),
                   "mosquitto": MOSQUITTO_CONFIG.format(port="PORT"),
                   "rumqttd": RUMQTTD_CONFIG.format(port="PORT", max_connections="N + 1000")},
               "notes": self.notes, "results": self.results}
        out_dir = os.path.join("target", "bench")
        os.makedirs(out_dir, exist_ok=True)
        json_path = os.path.join(out_dir, f"results-{stamp}.json")
        md_path = os.path.join(out_dir, f"results-{stamp}.md")
        with open(json_path, "w") as f:
            json.dump(doc, f, indent=2)
        md = markdown(doc, date)
        with open(md_path, "w") as f:
            f.write(md)
        print(md)
        log(f"written {json_path} and {md_path}")


DURABILITY = {"edge": "fsync always", "mosquitto": "memory only", "rumqttd": "memory only"}

MOSQUITTO_CONFIG = """listener {port} 127.0.0.1
allow_anonymous true
max_connections -1
max_queued_messages 1000
persistence false
"""

RUMQTTD_CONFIG = """id = 0
[router]
id = 0
max_connections = {max_connections}
max_outgoing_packet_count = 200
max_segment_size = 104857600
max_segment_count = 10
[v4.1]
name = "v4-1"
listen = "127.0.0.1:{port}"
next_connection_delay_ms = 0
    [v4.1.connections]
    connection_timeout_ms = 60000
    max_payload_size = 20480
    max_inflight_count = 100
    dynamic_filters = true
"""


def edge_config(port, admin_port, data, extra):
    return (f'[mqtt]\nlisten = "127.0.0.1:{port}"\nmax_connections = 200000\n'
            f'max_connections_per_address = 0\n'
            f'[storage]\ndata_dir = "{data}"\nfsync = "always"\n'
            f'[admin]\nlisten = "127.0.0.1:{admin_port}"\n{extra}')


def markdown(doc, date):
    m = doc["machine"]
    lines = [f"# Broker comparison, {date}", "",
             f"Machine: {m['cpus']} CPUs ({m['cpu_model']}), {m['memory_gib']:.0f} GiB, "
             f"{m['kernel']}; brokers and load generators share the same cores, 127.0.0.1 only.",
             f"Command: `{doc['command']}`; every figure is the median of "
             f"{doc['runs_per_figure']} run{'s' if doc['runs_per_figure'] > 1 else ''} of "
             f"{doc['seconds_per_run']} s (mqtt-benchmark: a "
             f"message count sized to about as long), every broker restarted for every run. "
             f"Clients speak MQTT {doc['protocol']}.", "",
             "| # | scenario | broker (durability) | generator | load | msg/s | MB/s | p50 ms | "
             "p99 ms | p99.9 ms | broker CPU (cores) | peak RSS MiB | edge / Mosquitto | "
             "edge / rumqttd |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in doc["results"]:
        if row["scenario"] == 6:
            continue
        md = row["median"]
        ratio = row.get("ratio", {})
        lines.append("| {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} | {} |".format(
            row["scenario"], SCENARIOS[row["scenario"]], f"{row['broker']} ({row['durability']})",
            row["generator"], row["load"], fmt_rate(md.get("msg_per_s")),
            fmt_num(md.get("mb_per_s"), 1), fmt_num(md.get("p50_ms"), 2),
            fmt_num(md.get("p99_ms"), 2), fmt_num(md.get("p999_ms"), 2),
            fmt_num(md.get("broker_cpu_cores"), 2), fmt_num(md.get("broker_peak_rss_mib"), 0),
            fmt_num(ratio.get("mosquitto"), 2), fmt_num(ratio.get("rumqttd"), 2)))
    subs = [r for r in doc["results"] if r["scenario"] == 5]
    if subs:
        lines += ["", "Scenario 5, the subscriber (firmware-sim subscribe, QoS 1 on `#`):", "",
                  "| broker | ingest msg/s | subscriber msg/s | subscriber / ingest | "
                  "received / acked | ingest vs scenario 2 |", "|---|---|---|---|---|---|"]
        for row in subs:
            base = next((r for r in doc["results"] if r["scenario"] == 2 and r["broker"] ==
                         row["broker"] and r["generator"] == "firmware-sim" and r["load"] == "max"),
                        None)
            md = row["median"]
            vs = md["msg_per_s"] / base["median"]["msg_per_s"] if base else None
            lines.append(f"| {row['broker']} | {fmt_rate(md.get('msg_per_s'))} | "
                         f"{fmt_rate(md.get('sub_msg_per_s'))} | {fmt_num(md.get('sub_over_ingest'), 2)} | "
                         f"{fmt_num(md.get('sub_received_over_acked'), 3)} | {fmt_num(vs, 2)} |")
    idle = [r for r in doc["results"] if r["scenario"] == 6]
    if idle:
        lines += ["", "Scenario 6, idle connections (CONNECT with keep-alive 60 s, held; source "
                  "addresses 127.0.1.0-127.0.1.255):", "",
                  "| broker | connections | connected | time to connect all | connects/s | "
                  "RSS before MiB | RSS with all open MiB | bytes per connection |",
                  "|---|---|---|---|---|---|---|---|"]
        for row in idle:
            md = row["median"]
            lines.append(f"| {row['broker']} ({row['durability']}) | {row['load']} | "
                         f"{fmt_rate(md.get('connected'))} | {md['connect_seconds']:.1f} s | "
                         f"{fmt_rate(md.get('connects_per_s'))} | {md['rss_before_mib']:.0f} | "
                         f"{md['rss_after_mib']:.0f} | {md['bytes_per_connection']:,.0f} |")
    goals = goal_rows(doc["results"])
    if goals:
        lines += ["", "Goals (issues #8 and #22; the edge with fsync \"always\"; firmware-sim's load unless "
                  "said):", "",
                  "| goal | measured | met |", "|---|---|---|"]
        lines += [f"| {g} | {m} | {'yes' if ok else 'no'} |" for g, m, ok in goals]
    lines += ["", "Brokers: edge with fsync \"always\" (PUBACK after the group commit is fsynced); "
              "Mosquitto and rumqttd keep messages in memory only (no persistence), so their "
              "acknowledgements promise less. Peer versions: "
              + ", ".join(f"{k} {v}" for k, v in doc["peers"].items()) + ".",
              "msg/s: acknowledged publishes per second for QoS 1, publishes written per second "
              "for QoS 0 (TCP flow control holds a publisher back to what the broker reads). "
              "MB/s: payload bytes (10^6). Latency: publish to PUBACK as firmware-sim measures "
              "it (QoS 1 only; mqtt-benchmark reports none). Broker CPU: utime+stime from "
              "/proc/PID/stat over the load, in cores (2 = the whole machine). Peak RSS: VmHWM.",
              "Ratios: the edge's median msg/s over the peer's, same scenario, generator and load."]
    busy = [f"{r['broker']} scenario {r['scenario']} {r['generator']} {r['load']} run {i + 1}: "
            f"{x['busy_before_pct']:.0f} %" for r in doc["results"] for i, x in enumerate(r["runs"])
            if x.get("busy_before_pct", 0) > QUIET_BUSY]
    if busy:
        lines.append(f"Note: not a quiet machine: {len(busy)} run(s) started while more than "
                     f"{QUIET_BUSY:.0f} % of the CPUs were busy over the second before (" +
                     "; ".join(busy) + ").")
    else:
        lines.append(f"Quiet machine: every run started with at most {QUIET_BUSY:.0f} % of the CPUs "
                     "busy over the second before it (tests/bench/busy).")
    lines += [f"Note: {n}" for n in doc["notes"]]
    return "\n".join(lines) + "\n"


def goal_rows(results):
    """(goal, what was measured, met) for each goal of issue #8 this run has figures for."""
    def find(scenario, broker, load="max", generator="firmware-sim"):
        return next((r for r in results if r["scenario"] == scenario and r["broker"] == broker
                     and r["generator"] == generator and r["load"].startswith(load)), None)

    def rate(row):
        return row["median"]["msg_per_s"] if row else None

    rows = []
    e2 = find(2, "edge")
    if e2:
        rows.append(("Scenario 2: >= 1,000,000 acked msg/s", f"{rate(e2):,.0f}",
                     rate(e2) >= 1e6))
        for peer, need in (("mosquitto", 6), ("rumqttd", 1)):
            ratio = e2.get("ratio", {}).get(peer)
            if ratio is not None:
                rows.append((f"Scenario 2: >= {need}x {peer}", f"{ratio:.2f}x", ratio >= need))
        half = find(2, "edge", "half")
        if half:
            p99 = half["median"].get("p99_ms")
            rows.append(("Scenario 2: p99 publish-to-PUBACK < 5 ms at half the maximum",
                         f"{p99:.2f} ms at {rate(half):,.0f} msg/s", p99 < 5))
    e1 = find(1, "edge")
    if e1:
        for peer, need in (("mosquitto", 2), ("rumqttd", 1)):
            ratio = e1.get("ratio", {}).get(peer)
            if ratio is not None:
                rows.append((f"Scenario 1: >= {need}x {peer}", f"{ratio:.2f}x", ratio >= need))
    for n, needs in ((2, (("mosquitto", 6), ("rumqttd", 1))), (1, (("mosquitto", 2), ("rumqttd", 1)))):
        row = find(n, "edge", generator="mqtt-benchmark")
        for peer, need in needs if row else ():
            ratio = row.get("ratio", {}).get(peer)
            if ratio is not None:
                rows.append((f"Scenario {n} (mqtt-benchmark's load): >= {need}x {peer}",
                             f"{ratio:.2f}x", ratio >= need))
    for generator, goal in (("firmware-sim (JSON)", "JSON payloads"),
                            ("firmware-sim", "incompressible payloads")):
        e4 = find(4, "edge", generator=generator)
        ratio = e4.get("ratio", {}).get("rumqttd") if e4 else None
        if ratio is not None:
            rows.append((f"Scenario 4, 1 KiB {goal}: >= 1x rumqttd (MB/s)", f"{ratio:.2f}x",
                         ratio >= 1))
    e5 = find(5, "edge")
    if e5:
        sub = e5["median"].get("sub_over_ingest")
        rows.append(("Scenario 5: the subscriber receives at the ingest rate (>= 0.95 of it)",
                     f"{sub:.2f} of ingest", sub >= 0.95))
        if e2:
            vs = rate(e5) / rate(e2)
            rows.append(("Scenario 5: ingest >= 70 % of scenario 2", f"{vs * 100:.0f} %",
                         vs >= 0.7))
    e6 = find(6, "edge", "", "firmware-sim idle")
    if e6:
        md = e6["median"]
        rows.append(("Scenario 6: 100,000 connections", f"{md['connected']:,.0f} connected",
                     md["connected"] >= 100000))
        rows.append(("Scenario 6: <= 4 KiB of edge memory per connection",
                     f"{md['bytes_per_connection']:,.0f} B", md["bytes_per_connection"] <= 4096))
    off, on = find(7, "edge", "ingest, mirror off"), find(7, "edge", "ingest, mirror on")
    if off and on:
        vs = rate(on) / rate(off)
        rows.append(("Scenario 7: ingest with mirroring >= 80 % of without",
                     f"{vs * 100:.0f} % ({rate(on):,.0f} / {rate(off):,.0f})", vs >= 0.8))
    return rows


def machine_description():
    model = "unknown"
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        for line in out.splitlines():
            if line.startswith("Model name:"):
                model = line.split(":", 1)[1].strip()
    except OSError:
        pass
    mem_kib = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    return {"cpus": os.cpu_count(), "cpu_model": model, "memory_gib": mem_kib / 1024 / 1024,
            "kernel": f"Linux {platform.release()}"}


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def port_open(port):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def cpu_ticks(pid):
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15)


def status_kib(pid, key):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"no {key} in /proc/{pid}/status")


def resource_nofile():
    import resource
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def fmt_rate(v):
    return "-" if v is None else f"{v:,.0f}"


def fmt_num(v, digits):
    return "-" if v is None else f"{v:,.{digits}f}"


def log(text):
    print(f"[{time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--bin", required=True, help="directory of the release edge and firmware-sim")
    p.add_argument("--quick", action="store_true", help="short runs, 1 repetition (development)")
    p.add_argument("--runs", type=int, help="repetitions per figure (default 2; quick: 1)")
    p.add_argument("--seconds", type=int, help="seconds per run (default 10; quick: 3)")
    p.add_argument("--scenarios", default="1,2,3,4,5,6,7", help="e.g. 1,2,6")
    p.add_argument("--brokers", default=",".join(BROKERS), help="e.g. edge,mosquitto")
    p.add_argument("--idle-connections", type=int, help="scenario 6 (default 100000; quick: 5000)")
    p.add_argument("--idle-hold", type=int, default=None, help="seconds scenario 6 holds them")
    p.add_argument("--backlog", type=int, help="scenario 7 backlog records (default 3000000; quick: 300000)")
    p.add_argument("--mosquitto", default="/usr/sbin/mosquitto")
    p.add_argument("--rumqttd", default=shutil.which("rumqttd"))
    p.add_argument("--mqtt-benchmark", default=shutil.which("mqtt-benchmark"))
    p.add_argument("--command", default="tests/bench/run", help="the command line, for the record")
    p.add_argument("--keep-work", action="store_true", help="keep the scratch directory (logs)")
    args = p.parse_args()
    quick = args.quick
    args.runs = args.runs or (1 if quick else 2)
    args.seconds = args.seconds or (3 if quick else 10)
    args.idle_connections = args.idle_connections or (5000 if quick else 100000)
    args.idle_hold = args.idle_hold or (8 if quick else 15)
    args.backlog = args.backlog or (300000 if quick else 3000000)
    args.scenarios = [int(s) for s in args.scenarios.split(",") if s.strip()]
    args.brokers = [b.strip() for b in args.brokers.split(",") if b.strip()]
    for b in args.brokers:
        if b not in BROKERS:
            p.error(f"--brokers: unknown broker {b!r}; known: {', '.join(BROKERS)}")
    for s in args.scenarios:
        if s not in SCENARIOS:
            p.error(f"--scenarios: unknown scenario {s}; known: 1 to 7")
    if "mosquitto" in args.brokers and not os.access(args.mosquitto, os.X_OK):
        p.error(f"--mosquitto: {args.mosquitto} is not executable (apt-get install mosquitto)")
    if "rumqttd" in args.brokers and not args.rumqttd:
        p.error("--rumqttd: no rumqttd on PATH (cargo install --locked rumqttd)")
    args.versions = peer_versions(args)

    started = datetime.datetime.now(datetime.timezone.utc)
    harness = Harness(args)
    # SIGTERM and SIGHUP end the run like Ctrl-C: through the cleanup below.
    def interrupted(signum, frame):
        raise KeyboardInterrupt()

    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, interrupted)
    try:
        for n in args.scenarios:
            if n in LOADS:
                harness.publish_scenario(n)
            elif n == 6:
                harness.idle_scenario()
            elif n == 7:
                harness.kafka_scenario()
        harness.write(started)
        return 0
    except KeyboardInterrupt:
        log("interrupted: stopping every process started")
        return 130
    except RuntimeError as e:
        log(f"error: {e}")
        if harness.results:
            harness.notes.append(f"The run stopped early: {e}")
            harness.write(started)
        return 1
    finally:
        harness.cleanup()


def peer_versions(args):
    versions = {}
    if "mosquitto" in args.brokers:
        out = subprocess.run([args.mosquitto, "-h"], capture_output=True, text=True).stdout
        m = re.search(r"mosquitto version (\S+)", out)
        versions["Mosquitto"] = m.group(1) if m else "unknown"
    if "rumqttd" in args.brokers:
        versions["rumqttd"] = cargo_installed_version("rumqttd")
    if args.mqtt_benchmark:
        versions["mqtt-benchmark"] = cargo_installed_version("mqtt-benchmark")
    return versions


def cargo_installed_version(name):
    out = subprocess.run(["cargo", "install", "--list"], capture_output=True, text=True).stdout
    m = re.search(rf"^{re.escape(name)} v(\S+):", out, re.M)
    return m.group(1) if m else "unknown"


if __name__ == "__main__":
    sys.exit(main())
