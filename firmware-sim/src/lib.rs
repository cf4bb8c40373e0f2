//! firmware-sim: a device fleet simulator and delivery verifier for Tributary.
//!
//! `firmware-sim run` simulates devices publishing over real MQTT connections (rumqttc, MQTT
//! 3.1.1 or 5.0, TCP or TLS) and writes a manifest of what was sent and acknowledged;
//! `firmware-sim verify` reads the messages back (from `edge read --json` output, an MQTT
//! subscription, or the Kafka topics the mirror writes) and reports loss, duplicates,
//! reordering and end-to-end latency.
//!
//! # Verifying the mirror
//!
//! `verify --kafka BOOTSTRAP --kafka-topic TOPIC` reads every partition of the mirror's topics
//! from the beginning (read_committed, no consumer group, nothing committed) and, besides loss
//! and duplicates, fails on a device's records out of sequence order within a partition and on
//! records whose `mqtt.*` headers are missing or disagree with the device; see [`mirror`] for
//! the record contract and the checks, [`kafka`] for how long it reads (`--kafka-wait`).
//!
//! # Message stamp
//!
//! Every message names its run, its device, a per-device sequence number (from 0) and its send
//! time, whatever the payload:
//!
//! - **binary** payloads start with a 32-byte big-endian header, followed by filler bytes up to
//!   the requested size:
//!
//!   | bytes  | field                                   |
//!   |--------|-----------------------------------------|
//!   | 0..4   | magic `TSIM`                            |
//!   | 4      | header version, 1                       |
//!   | 5      | reserved, 0                             |
//!   | 6..8   | class index (u16)                       |
//!   | 8..12  | run id (u32)                            |
//!   | 12..16 | device index in the fleet (u32)         |
//!   | 16..24 | sequence number (u64)                   |
//!   | 24..32 | send time, Unix microseconds (u64)      |
//!
//! - **JSON** payloads are telemetry documents that carry the same facts as fields:
//!   `{"run":"8b64f659","device":"dev-1","seq":0,"ts_us":1764111111111111,
//!   "temperature_c":21.53,"humidity_pct":45.2,"battery_v":3.712,"rssi_dbm":-61}`; with a size
//!   they get a `samples` array and trailing spaces to reach it exactly. `run` is the run id as 8
//!   hex digits, `device` the device name.
//!
//! [`payload::decode`] accepts both and ignores anything else. The manifest maps device
//! indices (binary) and names (JSON) to devices.
//!
//! # Manifest
//!
//! See [`manifest`]: a directory with `devices.jsonl` (per device: sent, acknowledged and
//! refused sequence numbers as inclusive ranges, e.g. `"acked":[[0,9999]]`) and `manifest.json`
//! (the header), written last so that its presence means the run is complete.
//!
//! # Scenarios
//!
//! See [`plan`] for the TOML format: device classes with their own rate, QoS, payload and
//! templates, and timed events (reconnect storm, devices going offline, bursts).
//!
//! # Lightweight driver
//!
//! See [`lightweight`]: `run --lightweight` plays normal-mode devices over plain TCP with small
//! buffers of their own instead of rumqttc's event loop, for fleets of many idle devices
//! (about 3.3 KiB per idle device against ~31 KiB with rumqttc), optionally spreading sockets
//! over `--source-ips`.
//!
//! # Counting subscriber
//!
//! See [`subscribe`]: `firmware-sim subscribe` subscribes and counts (and acknowledges) what
//! arrives as fast as the broker sends it, for fan-out benchmarks and tests; `--no-read` plays
//! a subscriber that never reads its socket.
//!
//! # Flood mode
//!
//! See [`flood`]: pre-encoded packets patched in place and written in 64 KiB batches, QoS 0
//! pipelined, QoS 1 windowed by `--inflight`, PUBACKs read between batches.

pub mod broker;
pub mod device;
pub mod error;
pub mod flood;
pub mod idle;
pub mod kafka;
pub mod ledger;
pub mod lightweight;
pub mod manifest;
pub mod mirror;
pub mod payload;
pub mod plan;
pub mod plot;
pub mod progress;
pub mod ranges;
pub mod report;
pub mod run;
pub mod session;
pub mod sink;
pub mod source;
pub mod stats;
pub mod subscribe;
pub mod template;
pub mod verify;
pub mod wire;
