//! The stamp every simulated message carries, and the payloads around it.
//!
//! See the crate documentation for the wire format. The stamp is what lets a reader find loss,
//! duplication, reordering and latency whatever payload was chosen: a binary payload starts with
//! a fixed 32-byte header, a JSON payload carries the same facts as the fields `run`, `device`,
//! `seq` and `ts_us`. [`decode`] accepts both and returns `None` for anything else, so records
//! of other producers in the same log are ignored rather than reported as errors.

use std::fmt;
use std::str::FromStr;

use rand::rngs::SmallRng;
use rand::RngExt;
use serde::{Deserialize, Serialize};

/// First four bytes of a binary payload.
pub const MAGIC: [u8; 4] = *b"TSIM";
/// Version byte of the binary header described in the crate docs.
pub const VERSION: u8 = 1;
/// Length of the binary header; a binary payload is never shorter.
pub const HEADER_LEN: usize = 32;
/// Where the big-endian sequence number sits in a binary payload (used to patch
/// pre-encoded packets in flood mode).
pub const SEQ_OFFSET: usize = 16;
/// Where the big-endian send time in microseconds sits in a binary payload.
pub const TS_OFFSET: usize = 24;

/// Identifies one `firmware-sim run`, so that a verifier ignores messages of other runs that
/// share the broker or the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(into = "String", try_from = "String")]
pub struct RunId(pub u32);

impl fmt::Display for RunId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

impl FromStr for RunId {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s.len() != 8 {
            return Err(format!("run id {s:?} is not 8 hex digits"));
        }
        u32::from_str_radix(s, 16)
            .map(RunId)
            .map_err(|_| format!("run id {s:?} is not 8 hex digits"))
    }
}

impl From<RunId> for String {
    fn from(id: RunId) -> Self {
        id.to_string()
    }
}

impl TryFrom<String> for RunId {
    type Error = String;

    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

/// How a decoded message names its device: binary payloads carry the fleet index, JSON payloads
/// the device name; the manifest maps one to the other.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeviceRef {
    /// Index of the device in the run's fleet (0-based).
    Index(u32),
    /// Name of the device, as the `{device}` placeholder expands.
    Name(String),
}

/// The facts a simulated message carries about itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stamp {
    /// The run that sent it.
    pub run: RunId,
    /// The device that sent it.
    pub device: DeviceRef,
    /// Per-device sequence number, from 0, one per message handed to the MQTT client.
    pub seq: u64,
    /// Unix time in microseconds at which the message was created.
    pub sent_at_us: u64,
}

/// Writes the binary header into the first [`HEADER_LEN`] bytes of `out`.
pub fn write_header(
    out: &mut [u8],
    run: RunId,
    class: u16,
    device: u32,
    seq: u64,
    sent_at_us: u64,
) {
    out[0..4].copy_from_slice(&MAGIC);
    out[4] = VERSION;
    out[5] = 0;
    out[6..8].copy_from_slice(&class.to_be_bytes());
    out[8..12].copy_from_slice(&run.0.to_be_bytes());
    out[12..16].copy_from_slice(&device.to_be_bytes());
    out[SEQ_OFFSET..SEQ_OFFSET + 8].copy_from_slice(&seq.to_be_bytes());
    out[TS_OFFSET..TS_OFFSET + 8].copy_from_slice(&sent_at_us.to_be_bytes());
}

#[derive(Deserialize)]
struct JsonStamp {
    run: RunId,
    device: String,
    seq: u64,
    ts_us: u64,
}

/// Reads the stamp of a simulated message, binary or JSON; `None` when the payload is not one.
pub fn decode(payload: &[u8]) -> Option<Stamp> {
    if payload.len() >= HEADER_LEN && payload[0..4] == MAGIC {
        if payload[4] != VERSION {
            return None;
        }
        // Slices of exactly 4 and 8 bytes, inside the HEADER_LEN checked above.
        let u32_at =
            |at: usize| u32::from_be_bytes(payload[at..at + 4].try_into().expect("a 4-byte slice"));
        let u64_at = |at: usize| {
            u64::from_be_bytes(payload[at..at + 8].try_into().expect("an 8-byte slice"))
        };
        return Some(Stamp {
            run: RunId(u32_at(8)),
            device: DeviceRef::Index(u32_at(12)),
            seq: u64_at(SEQ_OFFSET),
            sent_at_us: u64_at(TS_OFFSET),
        });
    }
    let first = payload.iter().find(|b| !b.is_ascii_whitespace())?;
    if *first != b'{' {
        return None;
    }
    let fields: JsonStamp = serde_json::from_slice(payload).ok()?;
    Some(Stamp {
        run: fields.run,
        device: DeviceRef::Name(fields.device),
        seq: fields.seq,
        sent_at_us: fields.ts_us,
    })
}

/// The payload a device class sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum PayloadKind {
    /// JSON telemetry with realistic sensor fields.
    Json,
    /// The 32-byte binary header followed by filler bytes.
    Binary,
}

/// Payload kind and size of a device class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct PayloadSpec {
    /// JSON or binary.
    pub kind: PayloadKind,
    /// Binary: the exact size (at least [`HEADER_LEN`]). JSON: the size the document is padded
    /// to with a `samples` array and trailing spaces; 0 keeps it as short as it comes.
    pub size: usize,
}

/// The slowly drifting readings of one simulated sensor.
#[derive(Debug, Clone)]
pub struct Telemetry {
    temperature_c: f32,
    humidity_pct: f32,
    battery_v: f32,
    rssi_dbm: i16,
}

#[derive(Serialize)]
struct TelemetryDocument<'a> {
    run: RunId,
    device: &'a str,
    seq: u64,
    ts_us: u64,
    temperature_c: f64,
    humidity_pct: f64,
    battery_v: f64,
    rssi_dbm: i16,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    samples: Vec<u16>,
}

fn round_to(value: f32, decimals: i32) -> f64 {
    let scale = 10f64.powi(decimals);
    (f64::from(value) * scale).round() / scale
}

impl Telemetry {
    /// Readings for a new device, spread over plausible ranges.
    pub fn new(rng: &mut SmallRng) -> Self {
        Telemetry {
            temperature_c: rng.random_range(17.0..26.0),
            humidity_pct: rng.random_range(30.0..60.0),
            battery_v: rng.random_range(3.6..4.1),
            rssi_dbm: rng.random_range(-90..-40),
        }
    }

    fn step(&mut self, rng: &mut SmallRng) {
        self.temperature_c =
            (self.temperature_c + rng.random_range(-0.05..0.05)).clamp(-20.0, 60.0);
        self.humidity_pct = (self.humidity_pct + rng.random_range(-0.2..0.2)).clamp(5.0, 95.0);
        self.battery_v = (self.battery_v - rng.random_range(0.0..0.0002)).max(3.0);
        self.rssi_dbm = (self.rssi_dbm + rng.random_range(-2..=2)).clamp(-110, -30);
    }
}

/// What a device needs to build its payloads.
#[derive(Debug, Clone, Copy)]
pub struct Origin<'a> {
    /// The run.
    pub run: RunId,
    /// Index of the device's class in the fleet.
    pub class: u16,
    /// Index of the device in the fleet.
    pub device_index: u32,
    /// Name of the device.
    pub device_name: &'a str,
}

/// Builds the payload of message `seq`, created at `sent_at_us`.
pub fn encode(
    spec: PayloadSpec,
    origin: Origin<'_>,
    seq: u64,
    sent_at_us: u64,
    telemetry: &mut Telemetry,
    rng: &mut SmallRng,
) -> Vec<u8> {
    match spec.kind {
        PayloadKind::Binary => {
            let mut out = vec![0u8; spec.size.max(HEADER_LEN)];
            write_header(
                &mut out,
                origin.run,
                origin.class,
                origin.device_index,
                seq,
                sent_at_us,
            );
            // Filler varies with the sequence number so that payloads do not compress to nothing.
            let mut x = seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
            for byte in &mut out[HEADER_LEN..] {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                *byte = x as u8;
            }
            out
        }
        PayloadKind::Json => {
            telemetry.step(rng);
            let mut document = TelemetryDocument {
                run: origin.run,
                device: origin.device_name,
                seq,
                ts_us: sent_at_us,
                temperature_c: round_to(telemetry.temperature_c, 2),
                humidity_pct: round_to(telemetry.humidity_pct, 1),
                battery_v: round_to(telemetry.battery_v, 3),
                rssi_dbm: telemetry.rssi_dbm,
                samples: Vec::new(),
            };
            let mut out = serde_json::to_vec(&document).expect("telemetry serializes");
            // `,"samples":[]` costs 13 bytes and each 3-digit sample 4 more (with its comma).
            if spec.size >= out.len() + 16 {
                let count = (spec.size - out.len() - 13 + 1) / 4;
                document.samples = (0..count).map(|_| rng.random_range(100..1000)).collect();
                out = serde_json::to_vec(&document).expect("telemetry serializes");
            }
            if out.len() < spec.size {
                // Whitespace after the closing brace keeps the document valid JSON.
                out.resize(spec.size, b' ');
            }
            out
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::SeedableRng;

    fn origin(name: &str) -> Origin<'_> {
        Origin {
            run: RunId(0xdead_beef),
            class: 3,
            device_index: 41,
            device_name: name,
        }
    }

    fn encode_one(kind: PayloadKind, size: usize, seq: u64, ts: u64) -> Vec<u8> {
        let mut rng = SmallRng::seed_from_u64(7);
        let mut telemetry = Telemetry::new(&mut rng);
        encode(
            PayloadSpec { kind, size },
            origin("dev-42"),
            seq,
            ts,
            &mut telemetry,
            &mut rng,
        )
    }

    #[test]
    fn binary_payload_has_the_requested_size_and_decodes() {
        let payload = encode_one(PayloadKind::Binary, 64, 9, 1_700_000_000_000_000);
        assert_eq!(payload.len(), 64);
        let stamp = decode(&payload).unwrap();
        assert_eq!(stamp.run, RunId(0xdead_beef));
        assert_eq!(stamp.device, DeviceRef::Index(41));
        assert_eq!(stamp.seq, 9);
        assert_eq!(stamp.sent_at_us, 1_700_000_000_000_000);
    }

    #[test]
    fn json_payload_carries_stamp_fields_and_telemetry() {
        let payload = encode_one(PayloadKind::Json, 0, 5, 123);
        let value: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(value["device"], "dev-42");
        assert_eq!(value["run"], "deadbeef");
        assert_eq!(value["seq"], 5);
        assert_eq!(value["ts_us"], 123);
        assert!(value["temperature_c"].is_number());
        let stamp = decode(&payload).unwrap();
        assert_eq!(stamp.device, DeviceRef::Name("dev-42".into()));
    }

    #[test]
    fn json_payload_is_padded_to_the_requested_size() {
        for size in [200, 333, 1024, 4096] {
            let payload = encode_one(PayloadKind::Json, size, 1, 2);
            assert_eq!(payload.len(), size);
            assert!(serde_json::from_slice::<serde_json::Value>(&payload).is_ok());
            assert_eq!(decode(&payload).unwrap().seq, 1);
        }
    }

    #[test]
    fn foreign_payloads_are_not_stamps() {
        assert_eq!(decode(b""), None);
        assert_eq!(decode(b"21.5"), None);
        assert_eq!(decode(br#"{"temperature":21.5}"#), None);
        assert_eq!(
            decode(br#"{"run":"nothex!!","device":"a","seq":1,"ts_us":2}"#),
            None
        );
        let mut binary = encode_one(PayloadKind::Binary, 40, 1, 2);
        binary[4] = 99;
        assert_eq!(decode(&binary), None, "unknown header version");
        assert_eq!(decode(&binary[..20]), None, "truncated header");
    }

    #[test]
    fn json_decoding_ignores_fields_it_does_not_need() {
        let text = br#" {"extra":[1,2],"device":"d","run":"00000001","seq":3,"ts_us":4}"#;
        let stamp = decode(text).unwrap();
        assert_eq!(stamp.run, RunId(1));
        assert_eq!(stamp.seq, 3);
    }

    proptest! {
        #[test]
        fn binary_round_trip(run: u32, class: u16, device: u32, seq: u64, ts: u64, extra in 0usize..64) {
            let mut payload = vec![0u8; HEADER_LEN + extra];
            write_header(&mut payload, RunId(run), class, device, seq, ts);
            let stamp = decode(&payload).unwrap();
            prop_assert_eq!(stamp, Stamp { run: RunId(run), device: DeviceRef::Index(device), seq, sent_at_us: ts });
        }

        #[test]
        fn json_round_trip(run: u32, name in "[a-z0-9_\\-\"\\\\é]{1,24}", seq: u64, ts: u64, size in 0usize..1500) {
            let mut rng = SmallRng::seed_from_u64(seq);
            let mut telemetry = Telemetry::new(&mut rng);
            let origin = Origin { run: RunId(run), class: 0, device_index: 0, device_name: &name };
            let payload = encode(PayloadSpec { kind: PayloadKind::Json, size }, origin, seq, ts, &mut telemetry, &mut rng);
            prop_assert!(payload.len() >= size);
            let stamp = decode(&payload).unwrap();
            prop_assert_eq!(stamp, Stamp { run: RunId(run), device: DeviceRef::Name(name.clone()), seq, sent_at_us: ts });
        }
    }
}
