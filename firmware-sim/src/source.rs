//! Where `verify` reads messages back from: the edge's `edge read --json` output, or an MQTT
//! subscription.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::time::Duration;

use base64::Engine as _;
use serde::Deserialize;
use tokio::time::{interval, Instant, MissedTickBehavior};

use crate::broker::{ConnectSettings, SessionKind};
use crate::error::SimError;
use crate::manifest;
use crate::payload::{self, Stamp};
use crate::session::{self, SessionEvent, SessionParams};
use crate::stats::Clock;
use crate::verify::Verifier;

/// One line of `edge read --json`; other fields exist and are not needed here.
#[derive(Deserialize)]
struct EdgeRecord {
    timestamp_ms: u64,
    payload: String,
    payload_encoding: String,
}

/// Counts of what an edge log held besides simulator messages.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct EdgeLogStats {
    /// Non-empty lines read.
    pub lines: u64,
    /// Lines that are not edge records (bad JSON, missing fields, unknown encoding).
    pub malformed: u64,
}

/// How many malformed lines are described on stderr before the rest are only counted.
const MALFORMED_SHOWN: u64 = 5;

/// Feeds every record of an `edge read --json` file (`-` for stdin) to `verifier`. Latency is
/// the record's `timestamp_ms` minus the send time; the timestamp is taken as the middle of
/// its millisecond.
pub fn read_edge_log(path: &Path, verifier: &mut Verifier<'_>) -> Result<EdgeLogStats, SimError> {
    let reader: Box<dyn BufRead> = if path == Path::new("-") {
        Box::new(BufReader::new(std::io::stdin()))
    } else {
        let file = std::fs::File::open(path).map_err(|e| SimError::io("opening", path, e))?;
        Box::new(BufReader::with_capacity(1 << 20, file))
    };
    let mut stats = EdgeLogStats::default();
    for (n, line) in reader.lines().enumerate() {
        let line = line.map_err(|e| SimError::io("reading", path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        stats.lines += 1;
        let decoded = serde_json::from_str::<EdgeRecord>(&line)
            .map_err(|e| e.to_string())
            .and_then(|record| {
                let payload = match record.payload_encoding.as_str() {
                    "utf8" => record.payload.into_bytes(),
                    "base64" => base64::engine::general_purpose::STANDARD
                        .decode(record.payload.as_bytes())
                        .map_err(|e| format!("payload is not base64: {e}"))?,
                    other => return Err(format!("unknown payload_encoding {other:?}")),
                };
                Ok((payload, record.timestamp_ms))
            });
        match decoded {
            Ok((payload, timestamp_ms)) => {
                verifier.observe(&payload, Some(timestamp_ms * 1000 + 500));
            }
            Err(reason) => {
                stats.malformed += 1;
                verifier.observe_foreign();
                if stats.malformed <= MALFORMED_SHOWN {
                    let error = SimError::EdgeLog {
                        path: path.to_path_buf(),
                        line: n as u64 + 1,
                        reason,
                    };
                    eprintln!("warning: {error}; line ignored");
                }
            }
        }
    }
    Ok(stats)
}

/// How to read from MQTT.
pub struct MqttSource {
    /// Broker connection settings.
    pub settings: ConnectSettings,
    /// Topic filter.
    pub filter: String,
    /// Subscription QoS.
    pub qos: u8,
    /// Stop after no message for this long, once the manifest exists.
    pub idle: Duration,
    /// Give up after this long in total.
    pub timeout: Duration,
    /// The manifest directory whose `manifest.json` marks the end of the run.
    pub manifest_dir: PathBuf,
}

/// A message read from MQTT: its stamp (if it is a simulator message) and arrival time.
pub struct Received {
    /// Decoded stamp, `None` for other payloads.
    pub stamp: Option<Stamp>,
    /// Arrival time (Unix µs).
    pub at_us: u64,
}

/// Subscribes and collects messages until the run's manifest exists and nothing has arrived
/// for `idle`. Messages are decoded as they arrive and kept until the manifest can be read,
/// because the verifier may start before the run it checks.
pub async fn read_mqtt(source: &MqttSource) -> Result<Vec<Received>, SimError> {
    let clock = Clock::start();
    let url = source.settings.url.original.clone();
    let broker_error = |reason: String| SimError::Broker {
        url: url.clone(),
        reason,
    };
    let params = SessionParams {
        client_id: format!("firmware-sim-verify-{}", crate::run::new_run_id()),
        session: SessionKind::Clean,
        inflight: 16,
        request_capacity: 64,
    };
    let (client, mut eventloop) = session::open(&source.settings, &params);
    client
        .subscribe(&source.filter, source.qos)
        .await
        .map_err(broker_error)?;
    let header = manifest::header_path(&source.manifest_dir);
    let started = Instant::now();
    let mut last_message = Instant::now();
    let mut received = Vec::new();
    let mut ever_connected = false;
    let mut ticker = interval(Duration::from_millis(250));
    ticker.set_missed_tick_behavior(MissedTickBehavior::Skip);
    loop {
        // The poll future lives across ticks: dropping it mid-read could lose the PUBACK of a
        // message and make the broker deliver it twice, which would show up as a duplicate.
        let event = {
            let mut poll = Box::pin(eventloop.poll());
            loop {
                tokio::select! {
                    event = &mut poll => break Some(event),
                    _ = ticker.tick() => {
                        if started.elapsed() >= source.timeout {
                            return Err(broker_error(format!(
                                "gave up after {:?}: {} did not appear or messages kept arriving",
                                source.timeout,
                                header.display()
                            )));
                        }
                        if last_message.elapsed() >= source.idle && header.exists() {
                            break None;
                        }
                    }
                }
            }
        };
        match event {
            None => break,
            Some(Ok(SessionEvent::Message { payload, .. })) => {
                received.push(Received {
                    stamp: payload::decode(&payload),
                    at_us: clock.now_us(),
                });
                last_message = Instant::now();
            }
            Some(Ok(SessionEvent::Connected { .. })) => {
                if ever_connected {
                    // A clean session forgets the subscription.
                    client
                        .subscribe(&source.filter, source.qos)
                        .await
                        .map_err(broker_error)?;
                }
                ever_connected = true;
            }
            Some(Ok(SessionEvent::Subscribed { refused })) => {
                if refused {
                    return Err(broker_error(format!(
                        "the broker refused the subscription to {:?}",
                        source.filter
                    )));
                }
                eprintln!("verify: subscribed to {} on {}", source.filter, url);
            }
            Some(Ok(_)) => {}
            Some(Err(reason)) => {
                if !ever_connected {
                    return Err(broker_error(reason));
                }
                eprintln!("warning: verify subscription lost ({reason}); reconnecting");
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        }
    }
    client.try_disconnect();
    Ok(received)
}
