//! Live progress on stderr and the per-second timeline used by the report and the plot.

use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;

use indicatif::{ProgressBar, ProgressStyle};
use serde::Serialize;
use tokio::sync::oneshot;
use tokio::time::{interval, Instant, MissedTickBehavior};

use crate::stats::FleetStats;

/// Throughput and latency over one second of the run.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TimelinePoint {
    /// Seconds since the start of the run (end of the interval).
    pub t_s: f64,
    /// Messages written per second.
    pub sent_per_s: f64,
    /// Acknowledgements per second.
    pub acked_per_s: f64,
    /// Devices connected at the end of the interval.
    pub connected: i64,
    /// Median publish-to-ack latency in the interval (0 without acknowledgements).
    pub p50_ms: f64,
    /// 99th percentile publish-to-ack latency in the interval.
    pub p99_ms: f64,
}

/// What the bar measures its position against.
#[derive(Debug, Clone, Copy)]
pub enum Goal {
    /// Elapsed time against the run's duration.
    Duration(Duration),
    /// Messages sent against the total to send.
    Messages(u64),
    /// No known end: a spinner.
    Open,
}

/// The running progress display; [`ProgressTask::finish`] stops it and returns the timeline.
pub struct ProgressTask {
    stop: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<Vec<TimelinePoint>>,
}

fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Starts the display. The bar is drawn only when stderr is a terminal; otherwise a status
/// line is printed every 10 seconds so that logs of long runs still show progress.
pub fn start(stats: Arc<FleetStats>, devices: u64, goal: Goal) -> ProgressTask {
    let (stop, mut stopped) = oneshot::channel();
    let handle = tokio::spawn(async move {
        let terminal = std::io::stderr().is_terminal();
        let bar = if terminal {
            let length = match goal {
                Goal::Duration(d) => d.as_millis() as u64,
                Goal::Messages(n) => n,
                Goal::Open => 0,
            };
            let bar = if length == 0 {
                ProgressBar::new_spinner()
            } else {
                ProgressBar::new(length)
            };
            let template = if length == 0 {
                "{spinner} {elapsed_precise} {msg}"
            } else {
                "{elapsed_precise} [{bar:24}] {msg}"
            };
            bar.set_style(
                ProgressStyle::with_template(template)
                    .expect("valid progress template")
                    .progress_chars("=> "),
            );
            bar
        } else {
            ProgressBar::hidden()
        };
        let started = Instant::now();
        let mut ticker = interval(Duration::from_millis(250));
        ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
        let mut timeline = Vec::new();
        let mut last_second = started;
        let mut last_line = started;
        let mut previous = stats.snapshot();
        let mut rate = 0.0;
        loop {
            tokio::select! {
                _ = ticker.tick() => {}
                _ = &mut stopped => break,
            }
            let now = Instant::now();
            let snapshot = stats.snapshot();
            if now.duration_since(last_second) >= Duration::from_secs(1) {
                let seconds = now.duration_since(last_second).as_secs_f64();
                let latency = stats.take_interval_latency();
                rate = (snapshot.sent - previous.sent) as f64 / seconds;
                timeline.push(TimelinePoint {
                    t_s: now.duration_since(started).as_secs_f64(),
                    sent_per_s: rate,
                    acked_per_s: (snapshot.acked - previous.acked) as f64 / seconds,
                    connected: snapshot.connected,
                    p50_ms: latency.p50_ms,
                    p99_ms: latency.p99_ms,
                });
                previous = snapshot;
                last_second = now;
            }
            let message = format!(
                "connected {}/{}  sent {} ({}/s)  acked {}  errors {}  connect failures {}",
                thousands(snapshot.connected.max(0) as u64),
                thousands(devices),
                thousands(snapshot.sent),
                thousands(rate as u64),
                thousands(snapshot.acked),
                thousands(snapshot.errors),
                thousands(snapshot.connect_failures),
            );
            match goal {
                Goal::Duration(_) => {
                    bar.set_position(now.duration_since(started).as_millis() as u64)
                }
                Goal::Messages(_) => bar.set_position(snapshot.sent),
                Goal::Open => bar.tick(),
            }
            bar.set_message(message.clone());
            if !terminal && now.duration_since(last_line) >= Duration::from_secs(10) {
                eprintln!(
                    "[{:>6.1}s] {message}",
                    now.duration_since(started).as_secs_f64()
                );
                last_line = now;
            }
        }
        bar.finish_and_clear();
        timeline
    });
    ProgressTask { stop, handle }
}

impl ProgressTask {
    /// Stops the display and returns the timeline.
    pub async fn finish(self) -> Vec<TimelinePoint> {
        let _ = self.stop.send(());
        self.handle.await.unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::thousands;

    #[test]
    fn thousands_are_separated() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(1234567), "1,234,567");
    }
}
