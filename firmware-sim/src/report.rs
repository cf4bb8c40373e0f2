//! The end-of-run report: a table on stdout and the same facts as JSON.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::Serialize;

use crate::error::SimError;
use crate::manifest::ClassSummary;
use crate::payload::RunId;
use crate::progress::TimelinePoint;
use crate::stats::LatencySummary;

/// What a run did.
#[derive(Debug, Clone, Serialize)]
pub struct RunReport {
    /// The run.
    pub run: RunId,
    /// `normal` or `flood`.
    pub mode: String,
    /// Broker URL.
    pub broker: String,
    /// `3.1.1` or `5`.
    pub protocol: String,
    /// Number of devices (connections).
    pub devices: u64,
    /// Device classes.
    pub classes: Vec<ClassSummary>,
    /// Seconds from the start until publishing stopped.
    pub publish_seconds: f64,
    /// Seconds from the start until every device finished (drain included).
    pub total_seconds: f64,
    /// Messages written to the broker.
    pub sent: u64,
    /// Messages the broker acknowledged.
    pub acked: u64,
    /// Messages an MQTT 5 broker refused.
    pub refused: u64,
    /// QoS 1/2 messages sent but neither acknowledged nor refused by the end.
    pub unacked: u64,
    /// Publishes skipped because a device's queue was full or it was offline.
    pub skipped: u64,
    /// Queued messages dropped unsent by a clean-session reconnect.
    pub discarded: u64,
    /// Other errors.
    pub errors: u64,
    /// Successful connections (reconnections included).
    pub connects: u64,
    /// Failed connection attempts.
    pub connect_failures: u64,
    /// Connections that broke without the simulator asking.
    pub disconnects: u64,
    /// `sent / publish_seconds`.
    pub sent_per_s: f64,
    /// `acked / publish_seconds`.
    pub acked_per_s: f64,
    /// Publish-to-ack latency.
    pub latency: LatencySummary,
    /// Error messages and their counts.
    pub error_messages: BTreeMap<String, u64>,
    /// Per-second throughput and latency.
    pub timeline: Vec<TimelinePoint>,
}

impl RunReport {
    /// The table printed at the end of a run.
    pub fn table(&self) -> String {
        let mut out = String::new();
        let row = |out: &mut String, name: &str, value: String| {
            let _ = writeln!(out, "  {name:<22} {value}");
        };
        let _ = writeln!(
            out,
            "run {} ({} mode, MQTT {}, {} devices, {})",
            self.run, self.mode, self.protocol, self.devices, self.broker
        );
        row(&mut out, "sent", self.sent.to_string());
        row(&mut out, "acknowledged", self.acked.to_string());
        row(&mut out, "refused", self.refused.to_string());
        row(&mut out, "unacknowledged", self.unacked.to_string());
        row(&mut out, "skipped", self.skipped.to_string());
        row(
            &mut out,
            "discarded on reconnect",
            self.discarded.to_string(),
        );
        row(&mut out, "errors", self.errors.to_string());
        row(&mut out, "connects", self.connects.to_string());
        row(
            &mut out,
            "connect failures",
            self.connect_failures.to_string(),
        );
        row(&mut out, "disconnects", self.disconnects.to_string());
        row(
            &mut out,
            "publish time",
            format!("{:.2} s", self.publish_seconds),
        );
        row(&mut out, "sent/s", format!("{:.0}", self.sent_per_s));
        row(&mut out, "acked/s", format!("{:.0}", self.acked_per_s));
        let l = &self.latency;
        if l.count > 0 {
            row(
                &mut out,
                "publish-to-ack ms",
                format!(
                    "p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                    l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
                ),
            );
        } else {
            row(&mut out, "publish-to-ack ms", "no acknowledgements".into());
        }
        for (message, count) in &self.error_messages {
            let _ = writeln!(out, "  error x{count}: {message}");
        }
        out
    }
}

/// Writes `value` as pretty JSON to `path`.
pub fn write_json(path: &Path, value: &impl Serialize) -> Result<(), SimError> {
    let text = serde_json::to_string_pretty(value).expect("reports serialize");
    std::fs::write(path, text + "\n").map_err(|e| SimError::io("writing", path, e))
}
