//! Live counters of a run, shared by every device task and read by the progress display.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use hdrhistogram::Histogram;
use serde::Serialize;

/// Unix time in microseconds that never goes backwards during a run: a wall-clock reading at
/// start plus a monotonic clock, so that send times in payloads are comparable with the
/// broker's and the edge's wall clocks while latencies stay correct if NTP steps the clock.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    start: Instant,
    start_unix_us: u64,
}

impl Clock {
    /// Starts the clock now.
    pub fn start() -> Self {
        let unix = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        Clock {
            start: Instant::now(),
            start_unix_us: unix,
        }
    }

    /// Current Unix time in microseconds.
    pub fn now_us(&self) -> u64 {
        self.start_unix_us + self.start.elapsed().as_micros() as u64
    }

    /// The instant the clock started.
    pub fn started(&self) -> Instant {
        self.start
    }

    /// Unix time in microseconds at start.
    pub fn start_unix_us(&self) -> u64 {
        self.start_unix_us
    }
}

/// Highest latency the histograms track (one hour, in microseconds); larger values are clamped.
const MAX_LATENCY_US: u64 = 3_600_000_000;

/// A latency histogram in microseconds with 3 significant digits.
pub fn latency_histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, MAX_LATENCY_US, 3).expect("valid histogram bounds")
}

/// Percentiles of a latency histogram, in milliseconds.
#[derive(Debug, Clone, Default, Serialize, PartialEq)]
pub struct LatencySummary {
    /// Number of samples.
    pub count: u64,
    /// Median.
    pub p50_ms: f64,
    /// 90th percentile.
    pub p90_ms: f64,
    /// 99th percentile.
    pub p99_ms: f64,
    /// 99.9th percentile.
    pub p999_ms: f64,
    /// Largest sample.
    pub max_ms: f64,
}

impl LatencySummary {
    /// Summarises `histogram` (microsecond samples).
    pub fn of(histogram: &Histogram<u64>) -> Self {
        if histogram.is_empty() {
            return LatencySummary::default();
        }
        let ms = |us: u64| us as f64 / 1000.0;
        LatencySummary {
            count: histogram.len(),
            p50_ms: ms(histogram.value_at_quantile(0.5)),
            p90_ms: ms(histogram.value_at_quantile(0.9)),
            p99_ms: ms(histogram.value_at_quantile(0.99)),
            p999_ms: ms(histogram.value_at_quantile(0.999)),
            max_ms: ms(histogram.max()),
        }
    }
}

struct Latencies {
    total: Histogram<u64>,
    interval: Histogram<u64>,
}

/// Error messages are grouped by text; beyond this many distinct texts they are only counted.
const MAX_DISTINCT_ERRORS: usize = 16;

/// Counters of a run.
pub struct FleetStats {
    /// Devices connected now.
    pub connected: AtomicI64,
    /// Successful connections, reconnections included.
    pub connects: AtomicU64,
    /// Connection attempts that failed (TCP, TLS, CONNACK refusal or timeout).
    pub connect_failures: AtomicU64,
    /// Established connections that broke without the simulator asking.
    pub disconnects: AtomicU64,
    /// PUBLISH packets written to the socket (first transmissions only).
    pub sent: AtomicU64,
    /// Publishes the broker acknowledged (PUBACK, or PUBREC for QoS 2).
    pub acked: AtomicU64,
    /// Publishes an MQTT 5 broker refused with a reason code >= 0x80.
    pub refused: AtomicU64,
    /// Publishes not made because the device's queue was full or it was offline.
    pub skipped: AtomicU64,
    /// Queued publishes that rumqttc dropped unsent when a clean session reconnected.
    pub discarded: AtomicU64,
    /// Other errors (failed publish calls, acknowledgements for unknown packet ids).
    pub errors: AtomicU64,
    latencies: Mutex<Latencies>,
    error_texts: Mutex<BTreeMap<String, u64>>,
}

impl Default for FleetStats {
    fn default() -> Self {
        FleetStats {
            connected: AtomicI64::new(0),
            connects: AtomicU64::new(0),
            connect_failures: AtomicU64::new(0),
            disconnects: AtomicU64::new(0),
            sent: AtomicU64::new(0),
            acked: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            skipped: AtomicU64::new(0),
            discarded: AtomicU64::new(0),
            errors: AtomicU64::new(0),
            latencies: Mutex::new(Latencies {
                total: latency_histogram(),
                interval: latency_histogram(),
            }),
            error_texts: Mutex::new(BTreeMap::new()),
        }
    }
}

/// A consistent-enough reading of the counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Snapshot {
    /// See [`FleetStats::connected`].
    pub connected: i64,
    /// See [`FleetStats::connect_failures`].
    pub connect_failures: u64,
    /// See [`FleetStats::sent`].
    pub sent: u64,
    /// See [`FleetStats::acked`].
    pub acked: u64,
    /// Refused + errors + disconnects.
    pub errors: u64,
}

impl FleetStats {
    /// Records publish-to-ack latencies in microseconds.
    pub fn record_latencies(&self, samples_us: &[u64]) {
        let mut latencies = self.latencies.lock().expect("latency lock");
        for &us in samples_us {
            let us = us.clamp(1, MAX_LATENCY_US);
            latencies.total.saturating_record(us);
            latencies.interval.saturating_record(us);
        }
    }

    /// Merges a histogram recorded elsewhere (flood connections keep their own).
    pub fn merge_latencies(&self, histogram: &Histogram<u64>) {
        let mut latencies = self.latencies.lock().expect("latency lock");
        latencies.total.add(histogram).expect("same bounds");
        latencies.interval.add(histogram).expect("same bounds");
    }

    /// Summary of every latency so far.
    pub fn total_latency(&self) -> LatencySummary {
        LatencySummary::of(&self.latencies.lock().expect("latency lock").total)
    }

    /// Summary of latencies since the previous call, then starts a new interval.
    pub fn take_interval_latency(&self) -> LatencySummary {
        let mut latencies = self.latencies.lock().expect("latency lock");
        let summary = LatencySummary::of(&latencies.interval);
        latencies.interval.reset();
        summary
    }

    /// Counts an error message (connect errors, refusals) for the final report.
    pub fn note_error(&self, text: &str) {
        let mut texts = self.error_texts.lock().expect("error lock");
        if let Some(count) = texts.get_mut(text) {
            *count += 1;
        } else if texts.len() < MAX_DISTINCT_ERRORS {
            texts.insert(text.to_string(), 1);
        } else {
            *texts.entry("(other errors)".to_string()).or_default() += 1;
        }
    }

    /// Error messages and how often each occurred.
    pub fn error_texts(&self) -> BTreeMap<String, u64> {
        self.error_texts.lock().expect("error lock").clone()
    }

    /// Reads the counters.
    pub fn snapshot(&self) -> Snapshot {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        Snapshot {
            connected: self.connected.load(Ordering::Relaxed),
            connect_failures: get(&self.connect_failures),
            sent: get(&self.sent),
            acked: get(&self.acked),
            errors: get(&self.refused) + get(&self.errors) + get(&self.disconnects),
        }
    }
}

/// Adds one to a counter.
pub fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_latency_restarts_but_total_keeps_everything() {
        let stats = FleetStats::default();
        stats.record_latencies(&[1_000, 2_000, 3_000]);
        let first = stats.take_interval_latency();
        assert_eq!(first.count, 3);
        stats.record_latencies(&[10_000]);
        let second = stats.take_interval_latency();
        assert_eq!(second.count, 1);
        assert!((second.max_ms - 10.0).abs() < 0.01);
        assert_eq!(stats.total_latency().count, 4);
    }

    #[test]
    fn distinct_error_texts_are_capped() {
        let stats = FleetStats::default();
        for i in 0..40 {
            stats.note_error(&format!("error {i}"));
        }
        stats.note_error("error 0");
        let texts = stats.error_texts();
        assert_eq!(texts.len(), MAX_DISTINCT_ERRORS + 1);
        assert_eq!(texts["error 0"], 2);
        assert_eq!(texts["(other errors)"], 40 - MAX_DISTINCT_ERRORS as u64);
    }
}
