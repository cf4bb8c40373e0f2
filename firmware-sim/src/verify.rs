//! `firmware-sim verify`: compares the messages read back from a source with a manifest.
//!
//! - expected: messages the broker acknowledged (QoS 1 and 2);
//! - lost: acknowledged but never received — a failure;
//! - duplicates: a (device, seq) received more than once, each extra copy counted — a failure;
//! - reordered: per device, a first reception whose seq is lower than one received before;
//! - QoS 0 messages are sent, never acknowledged; their loss is reported apart and is no failure;
//! - a message that was sent but not acknowledged may arrive: neither loss nor duplicate.
//!
//! Messages of other runs and payloads that are not simulator stamps are counted and ignored.
//!
//! A source may add findings of its own to the verdict: reading from Kafka adds the checks of
//! [`crate::mirror`] (per-partition order, headers), which fail the verdict too.

use std::collections::HashMap;

use hdrhistogram::Histogram;
use serde::Serialize;

use crate::manifest::Manifest;
use crate::mirror::MirrorFindings;
use crate::payload::{self, DeviceRef, RunId, Stamp};
use crate::ranges::SeqRanges;
use crate::stats::{latency_histogram, LatencySummary};

/// How many devices with losses or duplicates the report lists.
const EXAMPLES: usize = 20;
/// How many ranges of one device's losses the report lists.
const EXAMPLE_RANGES: usize = 10;

#[derive(Debug, Default, Clone)]
struct DeviceSeen {
    received: SeqRanges,
    highest: Option<u64>,
    duplicates: u64,
    reordered: u64,
}

/// What happened to one observed payload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Observation {
    /// The first copy of a message of this run from the manifest's device `device` (index).
    First {
        /// Index of the device in the manifest.
        device: u32,
    },
    /// Another copy of a message of this run already received: a duplicate.
    Repeat {
        /// Index of the device in the manifest.
        device: u32,
    },
    /// A simulator message of another run.
    OtherRun,
    /// Not a simulator message.
    Foreign,
    /// A message of this run from a device the manifest does not list.
    UnknownDevice,
}

/// Accumulates observations against a manifest.
pub struct Verifier<'a> {
    manifest: &'a Manifest,
    run: RunId,
    by_name: HashMap<&'a str, u32>,
    seen: Vec<DeviceSeen>,
    received: u64,
    other_run: u64,
    foreign: u64,
    unknown_device: u64,
    latency: Histogram<u64>,
    negative_latency: u64,
}

/// A device whose acknowledged messages did not all arrive, or arrived twice.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct DeviceProblem {
    /// Device name.
    pub device: String,
    /// Number of acknowledged messages missing.
    pub lost: u64,
    /// First ranges of missing sequence numbers.
    pub lost_ranges: Vec<(u64, u64)>,
    /// Extra copies received.
    pub duplicates: u64,
}

/// The verdict.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct VerifyReport {
    /// The run.
    pub run: RunId,
    /// Where messages were read from.
    pub source: String,
    /// Acknowledged QoS 1/2 messages.
    pub expected: u64,
    /// Messages of this run received, duplicates included.
    pub received: u64,
    /// Distinct (device, seq) received.
    pub unique: u64,
    /// Acknowledged but not received.
    pub lost: u64,
    /// Extra copies of a (device, seq).
    pub duplicates: u64,
    /// First receptions with a seq lower than one received before from the same device.
    pub reordered: u64,
    /// QoS 1/2 messages sent but not acknowledged.
    pub sent_unacked: u64,
    /// Of those, how many arrived anyway.
    pub sent_unacked_received: u64,
    /// QoS 0 messages sent.
    pub qos0_sent: u64,
    /// QoS 0 messages that did not arrive (reported, not a failure).
    pub qos0_lost: u64,
    /// Received sequence numbers the manifest does not list as sent.
    pub unexpected: u64,
    /// Messages of this run from devices missing from the manifest.
    pub unknown_device: u64,
    /// Simulator messages of other runs.
    pub other_run: u64,
    /// Records that are not simulator messages.
    pub foreign: u64,
    /// Receptions timestamped before their send time (clock skew), counted as 0 ms.
    pub negative_latency: u64,
    /// Send-to-receive latency.
    pub latency: LatencySummary,
    /// Devices with losses or duplicates (the first few).
    pub problems: Vec<DeviceProblem>,
    /// What reading from Kafka found besides the above (`verify --kafka` only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mirror: Option<MirrorFindings>,
    /// Whether nothing acknowledged is missing and nothing is duplicated (and, from Kafka,
    /// nothing is out of order within a partition and every record has its headers).
    pub passed: bool,
}

impl<'a> Verifier<'a> {
    /// A verifier for `manifest`.
    pub fn new(manifest: &'a Manifest) -> Self {
        Verifier {
            manifest,
            run: manifest.header.run,
            by_name: manifest
                .devices
                .iter()
                .map(|d| (d.name.as_str(), d.index))
                .collect(),
            seen: vec![DeviceSeen::default(); manifest.devices.len()],
            received: 0,
            other_run: 0,
            foreign: 0,
            unknown_device: 0,
            latency: latency_histogram(),
            negative_latency: 0,
        }
    }

    /// The manifest observations are compared with.
    pub fn manifest(&self) -> &'a Manifest {
        self.manifest
    }

    /// Whether every acknowledged message has been received at least once.
    pub fn all_acked_received(&self) -> bool {
        self.manifest
            .devices
            .iter()
            .zip(&self.seen)
            .filter(|(device, _)| device.qos > 0)
            .all(|(device, seen)| {
                device.acked.intersection_len(&seen.received) == device.acked.len()
            })
    }

    /// How many acknowledged messages have not been received yet.
    pub fn acked_missing(&self) -> u64 {
        self.manifest
            .devices
            .iter()
            .zip(&self.seen)
            .filter(|(device, _)| device.qos > 0)
            .map(|(device, seen)| {
                device.acked.len() - device.acked.intersection_len(&seen.received)
            })
            .sum()
    }

    /// Observes one payload; `received_at_us` is when it reached the source (Unix µs).
    pub fn observe(&mut self, payload: &[u8], received_at_us: Option<u64>) -> Observation {
        match payload::decode(payload) {
            Some(stamp) => self.observe_stamp(&stamp, received_at_us),
            None => {
                self.foreign += 1;
                Observation::Foreign
            }
        }
    }

    /// Counts a record that is not a simulator message (e.g. a malformed log line).
    pub fn observe_foreign(&mut self) {
        self.foreign += 1;
    }

    /// Observes an already decoded stamp.
    pub fn observe_stamp(&mut self, stamp: &Stamp, received_at_us: Option<u64>) -> Observation {
        if stamp.run != self.run {
            self.other_run += 1;
            return Observation::OtherRun;
        }
        let index = match &stamp.device {
            DeviceRef::Index(i) => Some(*i).filter(|&i| (i as usize) < self.seen.len()),
            DeviceRef::Name(name) => self.by_name.get(name.as_str()).copied(),
        };
        let Some(index) = index else {
            self.unknown_device += 1;
            return Observation::UnknownDevice;
        };
        self.received += 1;
        if let Some(at) = received_at_us {
            if at < stamp.sent_at_us {
                self.negative_latency += 1;
            }
            self.latency
                .saturating_record(at.saturating_sub(stamp.sent_at_us).max(1));
        }
        let seen = &mut self.seen[index as usize];
        if !seen.received.insert(stamp.seq) {
            seen.duplicates += 1;
            return Observation::Repeat { device: index };
        }
        match seen.highest {
            Some(highest) if stamp.seq < highest => seen.reordered += 1,
            _ => seen.highest = Some(stamp.seq),
        }
        Observation::First { device: index }
    }

    /// The verdict; `source` describes where messages came from.
    pub fn finish(&self, source: &str) -> VerifyReport {
        let mut report = VerifyReport {
            run: self.run,
            source: source.to_string(),
            expected: 0,
            received: self.received,
            unique: 0,
            lost: 0,
            duplicates: 0,
            reordered: 0,
            sent_unacked: 0,
            sent_unacked_received: 0,
            qos0_sent: 0,
            qos0_lost: 0,
            unexpected: 0,
            unknown_device: self.unknown_device,
            other_run: self.other_run,
            foreign: self.foreign,
            negative_latency: self.negative_latency,
            latency: LatencySummary::of(&self.latency),
            problems: Vec::new(),
            mirror: None,
            passed: false,
        };
        for (device, seen) in self.manifest.devices.iter().zip(&self.seen) {
            report.unique += seen.received.len();
            report.duplicates += seen.duplicates;
            report.reordered += seen.reordered;
            report.unexpected += seen.received.difference(&device.sent).len();
            if device.qos == 0 {
                report.qos0_sent += device.sent.len();
                report.qos0_lost += device.sent.difference(&seen.received).len();
                continue;
            }
            report.expected += device.acked.len();
            let missing = device.acked.difference(&seen.received);
            report.lost += missing.len();
            let unacked = device.sent.difference(&device.acked);
            report.sent_unacked += unacked.len();
            report.sent_unacked_received += unacked.intersection_len(&seen.received);
            if (!missing.is_empty() || seen.duplicates > 0) && report.problems.len() < EXAMPLES {
                report.problems.push(DeviceProblem {
                    device: device.name.clone(),
                    lost: missing.len(),
                    lost_ranges: missing
                        .ranges()
                        .iter()
                        .take(EXAMPLE_RANGES)
                        .copied()
                        .collect(),
                    duplicates: seen.duplicates,
                });
            }
        }
        report.passed = report.lost == 0 && report.duplicates == 0;
        report
    }
}

impl VerifyReport {
    /// Adds what reading from Kafka found; its failures fail the verdict.
    pub fn with_mirror(mut self, findings: MirrorFindings) -> Self {
        self.passed &= findings.passed();
        self.mirror = Some(findings);
        self
    }

    /// The one-line summary printed last.
    pub fn summary_line(&self) -> String {
        let p99 = if self.latency.count > 0 {
            format!("{:.3}", self.latency.p99_ms)
        } else {
            "n/a".into()
        };
        let mut line = format!(
            "expected={} received={} lost={} duplicates={} reordered={} p99_ms={}",
            self.expected, self.received, self.lost, self.duplicates, self.reordered, p99
        );
        if let Some(mirror) = &self.mirror {
            line.push(' ');
            line.push_str(&mirror.summary_fields());
        }
        line
    }

    /// The table printed before the summary.
    pub fn table(&self) -> String {
        use std::fmt::Write as _;
        let mut out = String::new();
        let _ = writeln!(out, "verify run {} from {}", self.run, self.source);
        let rows: [(&str, u64); 15] = [
            ("expected (acknowledged)", self.expected),
            ("received", self.received),
            ("unique", self.unique),
            ("lost", self.lost),
            ("duplicates", self.duplicates),
            ("reordered", self.reordered),
            ("sent, not acknowledged", self.sent_unacked),
            ("  of which received", self.sent_unacked_received),
            ("QoS 0 sent", self.qos0_sent),
            ("QoS 0 lost (no failure)", self.qos0_lost),
            ("never sent but received", self.unexpected),
            ("unknown device", self.unknown_device),
            ("other runs (ignored)", self.other_run),
            ("not simulator (ignored)", self.foreign),
            ("clock skew samples", self.negative_latency),
        ];
        for (name, value) in rows {
            let _ = writeln!(out, "  {name:<26} {value}");
        }
        let l = &self.latency;
        if l.count > 0 {
            let _ = writeln!(
                out,
                "  {:<26} p50 {:.3}  p90 {:.3}  p99 {:.3}  p99.9 {:.3}  max {:.3}",
                "end-to-end latency ms", l.p50_ms, l.p90_ms, l.p99_ms, l.p999_ms, l.max_ms
            );
        }
        for problem in &self.problems {
            let _ = writeln!(
                out,
                "  {}: lost {} {:?}, duplicates {}",
                problem.device, problem.lost, problem.lost_ranges, problem.duplicates
            );
        }
        if let Some(mirror) = &self.mirror {
            out.push_str(&mirror.table());
        }
        let _ = writeln!(
            out,
            "  {:<26} {}",
            "verdict",
            if self.passed { "PASS" } else { "FAIL" }
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::manifest::DeviceRecord;
    use crate::payload::{write_header, HEADER_LEN};

    const RUN: RunId = RunId(0xabcd_0001);

    /// A device as (qos, sent ranges, acknowledged ranges).
    type DeviceSpec = (u8, Vec<(u64, u64)>, Vec<(u64, u64)>);

    fn manifest(devices: Vec<DeviceSpec>) -> Manifest {
        let devices: Vec<DeviceRecord> = devices
            .into_iter()
            .enumerate()
            .map(|(i, (qos, sent, acked))| DeviceRecord {
                index: i as u32,
                name: format!("dev-{}", i + 1),
                class: 0,
                qos,
                topic: "t".into(),
                client_id: Some(format!("sim-dev-{}", i + 1)),
                sent: sent.try_into().unwrap(),
                acked: acked.try_into().unwrap(),
                refused: SeqRanges::new(),
            })
            .collect();
        Manifest::for_tests(RUN, devices)
    }

    fn message(run: RunId, device: u32, seq: u64) -> Vec<u8> {
        let mut payload = vec![0u8; HEADER_LEN];
        write_header(&mut payload, run, 0, device, seq, 1_000);
        payload
    }

    fn json_message(device: &str, seq: u64) -> Vec<u8> {
        format!(r#"{{"run":"{RUN}","device":"{device}","seq":{seq},"ts_us":1000}}"#).into_bytes()
    }

    #[test]
    fn complete_delivery_passes() {
        let m = manifest(vec![(1, vec![(0, 4)], vec![(0, 4)])]);
        let mut v = Verifier::new(&m);
        for seq in 0..5 {
            v.observe(&message(RUN, 0, seq), Some(3_000));
        }
        let r = v.finish("test");
        assert!(r.passed);
        assert_eq!((r.expected, r.received, r.lost), (5, 5, 0));
        assert_eq!(r.latency.count, 5);
        assert!((r.latency.p99_ms - 2.0).abs() < 0.01);
        assert_eq!(
            r.summary_line(),
            "expected=5 received=5 lost=0 duplicates=0 reordered=0 p99_ms=2.000"
        );
    }

    #[test]
    fn missing_acknowledged_message_is_loss() {
        let m = manifest(vec![(1, vec![(0, 4)], vec![(0, 4)])]);
        let mut v = Verifier::new(&m);
        for seq in [0, 1, 3, 4] {
            v.observe(&message(RUN, 0, seq), None);
        }
        let r = v.finish("test");
        assert!(!r.passed);
        assert_eq!(r.lost, 1);
        assert_eq!(r.problems[0].lost_ranges, vec![(2, 2)]);
    }

    #[test]
    fn second_copy_is_a_duplicate_not_a_reorder() {
        let m = manifest(vec![(1, vec![(0, 2)], vec![(0, 2)])]);
        let mut v = Verifier::new(&m);
        for seq in [0, 1, 2, 1] {
            v.observe(&message(RUN, 0, seq), None);
        }
        let r = v.finish("test");
        assert!(!r.passed);
        assert_eq!((r.duplicates, r.reordered, r.lost), (1, 0, 0));
    }

    #[test]
    fn lower_seq_after_higher_is_reordered_but_passes() {
        let m = manifest(vec![(1, vec![(0, 2)], vec![(0, 2)])]);
        let mut v = Verifier::new(&m);
        for seq in [0, 2, 1] {
            v.observe(&message(RUN, 0, seq), None);
        }
        let r = v.finish("test");
        assert!(r.passed, "reordering alone is reported, not a failure");
        assert_eq!(r.reordered, 1);
    }

    #[test]
    fn reordering_is_per_device() {
        let m = manifest(vec![
            (1, vec![(0, 9)], vec![(0, 9)]),
            (1, vec![(0, 9)], vec![(0, 9)]),
        ]);
        let mut v = Verifier::new(&m);
        v.observe(&message(RUN, 0, 9), None);
        v.observe(&message(RUN, 1, 0), None);
        assert_eq!(v.finish("test").reordered, 0);
    }

    #[test]
    fn unacknowledged_messages_may_arrive_or_not() {
        let m = manifest(vec![(1, vec![(0, 9)], vec![(0, 4)])]);
        let mut v = Verifier::new(&m);
        for seq in 0..7 {
            v.observe(&message(RUN, 0, seq), None);
        }
        let r = v.finish("test");
        assert!(r.passed);
        assert_eq!(
            (r.expected, r.sent_unacked, r.sent_unacked_received),
            (5, 5, 2)
        );
    }

    #[test]
    fn qos0_loss_is_reported_but_does_not_fail() {
        let m = manifest(vec![(0, vec![(0, 9)], vec![])]);
        let mut v = Verifier::new(&m);
        for seq in 0..8 {
            v.observe(&message(RUN, 0, seq), None);
        }
        let r = v.finish("test");
        assert!(r.passed);
        assert_eq!((r.expected, r.qos0_sent, r.qos0_lost), (0, 10, 2));
    }

    #[test]
    fn other_runs_and_foreign_payloads_are_ignored() {
        let m = manifest(vec![(1, vec![(0, 0)], vec![(0, 0)])]);
        let mut v = Verifier::new(&m);
        assert_eq!(
            v.observe(&message(RunId(7), 0, 0), None),
            Observation::OtherRun
        );
        assert_eq!(v.observe(b"{\"temp\":1}", None), Observation::Foreign);
        assert_eq!(
            v.observe(&message(RUN, 5, 0), None),
            Observation::UnknownDevice
        );
        assert_eq!(
            v.observe(&json_message("dev-1", 0), None),
            Observation::First { device: 0 }
        );
        let r = v.finish("test");
        assert!(r.passed);
        assert_eq!(
            (r.other_run, r.foreign, r.unknown_device, r.received),
            (1, 1, 1, 1)
        );
    }

    #[test]
    fn json_messages_are_matched_by_device_name() {
        let m = manifest(vec![
            (1, vec![(0, 1)], vec![(0, 1)]),
            (1, vec![(0, 1)], vec![(0, 1)]),
        ]);
        let mut v = Verifier::new(&m);
        for seq in 0..2 {
            v.observe(&json_message("dev-2", seq), None);
        }
        let r = v.finish("test");
        assert_eq!(r.lost, 2, "dev-1 sent nothing that arrived");
        assert_eq!(r.problems[0].device, "dev-1");
    }

    #[test]
    fn a_second_copy_is_observed_as_a_repeat() {
        let m = manifest(vec![
            (1, vec![(0, 1)], vec![(0, 1)]),
            (1, vec![(0, 1)], vec![(0, 1)]),
        ]);
        let mut v = Verifier::new(&m);
        assert_eq!(
            v.observe(&message(RUN, 1, 0), None),
            Observation::First { device: 1 }
        );
        assert_eq!(
            v.observe(&message(RUN, 1, 0), None),
            Observation::Repeat { device: 1 }
        );
    }

    #[test]
    fn all_acked_received_ignores_unacked_and_qos0() {
        let m = manifest(vec![
            (1, vec![(0, 9)], vec![(0, 1)]),
            (0, vec![(0, 9)], vec![]),
        ]);
        let mut v = Verifier::new(&m);
        v.observe(&message(RUN, 0, 0), None);
        assert!(!v.all_acked_received());
        assert_eq!(v.acked_missing(), 1);
        v.observe(&message(RUN, 0, 1), None);
        assert!(v.all_acked_received());
        assert_eq!(v.acked_missing(), 0);
    }

    #[test]
    fn received_but_never_sent_is_unexpected() {
        let m = manifest(vec![(1, vec![(0, 1)], vec![(0, 1)])]);
        let mut v = Verifier::new(&m);
        for seq in 0..3 {
            v.observe(&message(RUN, 0, seq), None);
        }
        assert_eq!(v.finish("test").unexpected, 1);
    }
}
