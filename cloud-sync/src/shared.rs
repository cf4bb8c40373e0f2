//! What the threads of a running mirror share: its settings and source, the status it
//! reports, where its records are in Kafka (read by the group replicator), and the stop signal.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;

use crate::config::MirrorConfig;
use crate::source::PartitionedSource;
use crate::status::{now_ms, ErrorKind, LinkState, MirrorStatus};
use crate::translation::Translation;

/// Bucket upper bounds of the transaction commit durations, in seconds (100 µs to 10 s).
const COMMIT_SECONDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// How many distinct errors librdkafka reports on its own are kept for a session's failure.
const CLIENT_ERRORS_KEPT: usize = 4;

/// The state a mirror's threads share.
pub(crate) struct Shared {
    pub(crate) config: MirrorConfig,
    /// The last error librdkafka reported on its own (authentication, connection), which a
    /// failed request's own error (often just a time-out) does not name.
    client_errors: Mutex<Vec<String>>,
    pub(crate) source: Arc<dyn PartitionedSource>,
    pub(crate) status: Mutex<MirrorStatus>,
    /// Per status partition, where its edge records are in Kafka (for group replication).
    pub(crate) translations: Mutex<Vec<Translation>>,
    /// How long each `commit_transaction` took, successful or not.
    pub(crate) commit_seconds: Histogram,
    stop: AtomicBool,
    /// Wakes sleeps early when `stop` is set.
    wake: (Mutex<()>, Condvar),
}

impl Shared {
    /// The state of a mirror of `source` that starts from `status`.
    pub(crate) fn new(
        config: MirrorConfig,
        source: Arc<dyn PartitionedSource>,
        status: MirrorStatus,
    ) -> Shared {
        Shared {
            translations: Mutex::new(vec![Translation::default(); status.partitions.len()]),
            config,
            source,
            status: Mutex::new(status),
            client_errors: Mutex::new(Vec::new()),
            commit_seconds: Histogram::new(COMMIT_SECONDS),
            stop: AtomicBool::new(false),
            wake: (Mutex::new(()), Condvar::new()),
        }
    }

    pub(crate) fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire)
    }

    /// Tells every thread of the mirror to stop, and wakes those that sleep.
    pub(crate) fn request_stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _guard = self.wake.0.lock().expect("wake lock");
        self.wake.1.notify_all();
    }

    /// Sleeps `d`, or less if the mirror is being stopped.
    pub(crate) fn sleep(&self, d: Duration) {
        let guard = self.wake.0.lock().expect("wake lock");
        if self.stopping() {
            return;
        }
        let _ = self
            .wake
            .1
            .wait_timeout_while(guard, d, |_| !self.stopping())
            .expect("wake lock");
    }

    pub(crate) fn record_error(&self, kind: ErrorKind, message: String) {
        let mut s = self.status.lock().expect("status lock");
        s.last_error = Some(message);
        s.last_error_kind = Some(kind);
        s.last_error_at_ms = Some(now_ms());
    }

    /// An error librdkafka reported on its own, of `kind`, described by `message`.
    pub(crate) fn client_failure(&self, kind: ErrorKind, message: String) {
        let mut seen = self.client_errors.lock().expect("client error lock");
        if !seen.contains(&message) && seen.len() < CLIENT_ERRORS_KEPT {
            seen.push(message.clone());
        }
        drop(seen);
        // While a session starts, its own error reports these with what it was doing (and
        // where); once mirroring, they are the first news of trouble.
        if self.status.lock().expect("status lock").state == LinkState::Mirroring {
            self.record_error(kind, message);
        }
    }

    /// Forgets the errors librdkafka reported on its own (a new session starts).
    pub(crate) fn clear_client_errors(&self) {
        self.client_errors
            .lock()
            .expect("client error lock")
            .clear();
    }

    /// The errors librdkafka reported on its own since they were last cleared or taken,
    /// oldest first.
    pub(crate) fn take_client_errors(&self) -> Vec<String> {
        std::mem::take(&mut *self.client_errors.lock().expect("client error lock"))
    }

    pub(crate) fn set_state(&self, state: LinkState) {
        self.status.lock().expect("status lock").state = state;
    }

    pub(crate) fn healthy(&self) {
        let mut s = self.status.lock().expect("status lock");
        s.state = LinkState::Mirroring;
        s.last_healthy_at_ms = Some(now_ms());
    }
}

#[cfg(test)]
mod tests {
    use prometheus_client::encoding::prometheus_text::encode;
    use prometheus_client::registry::Registry;

    use super::*;

    #[test]
    fn commit_durations_count_into_cumulative_buckets_from_100_microseconds_to_10_seconds() {
        let h = Histogram::new(COMMIT_SECONDS);
        for seconds in [0.00005, 0.0003, 0.0003, 7.0, 12.0] {
            h.observe(seconds);
        }
        let mut registry = Registry::default();
        registry.register("c", "Commits", h);
        let mut out = String::new();
        encode(&mut out, &registry).unwrap();
        let buckets: Vec<&str> = out.lines().filter(|l| l.starts_with("c_bucket")).collect();
        assert_eq!(buckets.len(), COMMIT_SECONDS.len() + 1, "{out}");
        assert_eq!(buckets[0], "c_bucket{le=\"0.0001\"} 1");
        assert_eq!(buckets[1], "c_bucket{le=\"0.00025\"} 1");
        assert_eq!(buckets[2], "c_bucket{le=\"0.0005\"} 3");
        assert_eq!(buckets[14], "c_bucket{le=\"5\"} 3");
        assert_eq!(buckets[15], "c_bucket{le=\"10\"} 4");
        assert_eq!(buckets[16], "c_bucket{le=\"+Inf\"} 5");
        assert!(out.contains("\nc_count 5\n"), "{out}");
        let sum: f64 = out
            .lines()
            .find_map(|l| l.strip_prefix("c_sum "))
            .unwrap()
            .parse()
            .unwrap();
        assert!((sum - 19.00065).abs() < 1e-9, "{out}");
    }
}
