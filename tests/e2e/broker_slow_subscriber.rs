//! Subscribers that never read, while 10 publishers flood the edge at QoS 1: the edge keeps
//! each one's queue bounded (`max_queued_messages = 1000`), drops and counts what does not
//! fit, cuts them off after `slow_subscriber_timeout = "2s"`, and neither the publishers nor a
//! subscriber on another filter notice.
//!
//! The scenario runs once (the first test to get there runs it, the others wait for it) and
//! each test checks one of its outcomes. Slow subscribers, all on `#` with
//! `firmware-sim subscribe --no-read` (subscribe, then leave the socket unread for 10 s, then
//! read what it holds to see whether the edge closed the connection):
//!
//! - MQTT 5, QoS 1: the edge sends at most its in-flight window, queues up to twice the bound,
//!   drops the rest; over its bound for 2 s, it gets DISCONNECT 0x97 (Quota exceeded). The
//!   window leaves room in the socket, so the DISCONNECT reaches it.
//! - MQTT 5, QoS 0: the socket fills, then the queue up to its bound, and every delivery after
//!   that is dropped: the queue stays at its bound, refusing deliveries, so it is over its bound
//!   and is disconnected (0x97) as well; the DISCONNECT itself may be stuck behind the full
//!   socket, so its reason is checked in the edge's log.
//! - MQTT 3.1.1, QoS 1: as the 5.0 one, but 3.1.1 has no DISCONNECT from the server: the
//!   connection is closed.
//!
//! Meanwhile a subscriber on `other/#` gets every one of 1000 QoS 1 messages a separate
//! publisher sends to `other/x`.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::process::{Child, Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use tributary_tests::{binary, last_line, summary_field, ConnectOpts, Edge, Got, Proto, RawClient};

/// Bound on the edge's peak resident memory (VmHWM) in the scenario. Measured: 60-62 MiB
/// (the same flood with no subscriber peaks at about 55 MiB). An edge that queued without
/// bound would keep most of the flood's ~4 million messages (~8.7 million deliveries are
/// dropped) for the slow subscribers: several hundred MiB.
const PEAK_RSS_BOUND_KB: u64 = 256 * 1024;
/// Messages the publisher on `other/x` sends.
const OTHER_MESSAGES: u64 = 1000;

/// A slow subscriber: its client id, protocol and QoS.
struct Slow {
    client_id: &'static str,
    protocol: &'static str,
    qos: u8,
}

const SLOW: [Slow; 3] = [
    Slow {
        client_id: "slow-v5-qos1",
        protocol: "5",
        qos: 1,
    },
    Slow {
        client_id: "slow-v5-qos0",
        protocol: "5",
        qos: 0,
    },
    Slow {
        client_id: "slow-v311-qos1",
        protocol: "3.1.1",
        qos: 1,
    },
];

/// What the scenario left to check.
struct Outcome {
    /// `firmware-sim run --report` of the 10 flood publishers.
    flood: serde_json::Value,
    /// The same for the publisher on `other/x`.
    other_publisher: serde_json::Value,
    /// Summary line of the subscriber on `other/#`.
    other_subscriber: String,
    /// Summary lines of the slow subscribers, in the order of [`SLOW`].
    slow: Vec<String>,
    /// `$SYS/broker/publish/messages/dropped` at the end.
    dropped: u64,
    /// The edge's VmHWM in KiB at the end.
    peak_rss_kb: u64,
    /// The edge's stderr (RUST_LOG=info).
    edge_log: String,
}

fn outcome() -> &'static Outcome {
    static OUTCOME: OnceLock<Result<Outcome, String>> = OnceLock::new();
    OUTCOME
        .get_or_init(|| run_scenario().map_err(|e| format!("{e:#}")))
        .as_ref()
        .unwrap_or_else(|e| panic!("the slow-subscriber scenario failed: {e}"))
}

fn sim() -> Command {
    Command::new(binary("firmware-sim"))
}

/// Waits for a child's exit and output, killing it after `limit`.
fn finish(mut child: Child, what: &str, limit: Duration) -> anyhow::Result<Output> {
    let deadline = Instant::now() + limit;
    while child.try_wait()?.is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output()?;
            anyhow::bail!(
                "{what} did not end within {limit:?}: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let out = child.wait_with_output()?;
    anyhow::ensure!(
        out.status.success(),
        "{what} failed with {}: {}{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(out)
}

/// The retained value of a `$SYS` topic once `accept` takes it (it is republished every
/// `sys_interval`), within 15 s.
async fn sys_value(edge: &Edge, topic: &str, accept: impl Fn(u64) -> bool) -> anyhow::Result<u64> {
    let (mut c, _) =
        RawClient::connect(edge.addr, Proto::V5, &ConnectOpts::new("sys-reader")).await?;
    anyhow::ensure!(c.subscribe(1, &[(topic, 0)]).await? == vec![0]);
    let deadline = Instant::now() + Duration::from_secs(15);
    let mut last = None;
    while Instant::now() < deadline {
        if let Got::Publish { payload, .. } = c.recv().await? {
            let value: u64 = String::from_utf8(payload)?.trim().parse()?;
            if accept(value) {
                return Ok(value);
            }
            last = Some(value);
        }
    }
    anyhow::bail!("{topic} still {last:?} after 15 s")
}

fn run_scenario() -> anyhow::Result<Outcome> {
    let runtime = tokio::runtime::Runtime::new()?;
    let mut edge = Edge::start_with(
        "max_queued_messages = 1000\nmax_inflight_messages = 64\nslow_subscriber_timeout = \"2s\"\nsys_interval = \"1s\"",
        "",
        "",
    );
    let broker = format!("mqtt://{}", edge.addr);
    let subscriber = |client_id: &str, protocol: &str, filter: &str, qos: u8| {
        let mut cmd = sim();
        cmd.args(["subscribe", "--broker", &broker, "--client-id", client_id])
            .args(["--protocol", protocol, "--filter", filter])
            .args(["--qos", &qos.to_string()])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        cmd
    };
    let other_subscriber = subscriber("other-dashboard", "5", "other/#", 1)
        .args([
            "--count",
            &OTHER_MESSAGES.to_string(),
            "--idle-timeout",
            "60s",
        ])
        .spawn()?;
    let mut slow = Vec::new();
    for s in &SLOW {
        slow.push(
            subscriber(s.client_id, s.protocol, "#", s.qos)
                .args(["--no-read", "--duration", "10s", "--idle-timeout", "5s"])
                .spawn()?,
        );
    }
    // Every subscriber (and the reader of the count itself) is subscribed before anything is
    // published.
    let subscriptions = SLOW.len() as u64 + 2;
    runtime.block_on(sys_value(&edge, "$SYS/broker/subscriptions/count", |n| {
        n >= subscriptions
    }))?;

    let dir = tempfile::tempdir()?;
    let flood_report = dir.path().join("flood.json");
    let other_report = dir.path().join("other.json");
    let flood = sim()
        .args([
            "run",
            "--flood",
            "--broker",
            &broker,
            "--devices",
            "10",
            "--qos",
            "1",
        ])
        .args([
            "--inflight",
            "100",
            "--payload-size",
            "64",
            "--duration",
            "5s",
        ])
        .arg("--report")
        .arg(&flood_report)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    let other_publisher = sim()
        .args([
            "run",
            "--flood",
            "--broker",
            &broker,
            "--devices",
            "1",
            "--qos",
            "1",
        ])
        .args([
            "--count",
            &OTHER_MESSAGES.to_string(),
            "--flood-rate",
            "250",
        ])
        .args(["--topic", "other/x", "--client-id", "other-{device}"])
        .arg("--report")
        .arg(&other_report)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()?;
    finish(flood, "the flood publishers", Duration::from_secs(60))?;
    finish(
        other_publisher,
        "the publisher on other/x",
        Duration::from_secs(60),
    )?;
    let other_subscriber = last_line(&finish(
        other_subscriber,
        "the subscriber on other/#",
        Duration::from_secs(60),
    )?);
    let mut slow_lines = Vec::new();
    for (child, s) in slow.into_iter().zip(&SLOW) {
        let out = finish(child, s.client_id, Duration::from_secs(60))?;
        slow_lines.push(last_line(&out));
    }
    // The counter is republished every second; once it no longer grows, it is final.
    let mut dropped = 0;
    for _ in 0..10 {
        let now = runtime.block_on(sys_value(
            &edge,
            "$SYS/broker/publish/messages/dropped",
            |_| true,
        ))?;
        if now == dropped && now > 0 {
            break;
        }
        dropped = now;
        std::thread::sleep(Duration::from_millis(1100));
    }
    let status = std::fs::read_to_string(format!("/proc/{}/status", edge.pid()))?;
    let peak_rss_kb = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no VmHWM in /proc/PID/status"))?;
    edge.stop();
    // Shown with --nocapture: the figures the bounds above were set from.
    eprintln!(
        "edge VmHWM {peak_rss_kb} KiB, dropped {dropped}\nother/#: {other_subscriber}\n{}",
        SLOW.iter()
            .zip(&slow_lines)
            .map(|(s, line)| format!("{}: {line}", s.client_id))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let read_report = |path: &std::path::Path| -> anyhow::Result<serde_json::Value> {
        Ok(serde_json::from_str(&std::fs::read_to_string(path)?)?)
    };
    Ok(Outcome {
        flood: read_report(&flood_report)?,
        other_publisher: read_report(&other_report)?,
        other_subscriber,
        slow: slow_lines,
        dropped,
        peak_rss_kb,
        edge_log: edge.stderr(),
    })
}

/// The word after `name=` in a summary line.
fn summary_word<'a>(summary: &'a str, name: &str) -> &'a str {
    summary
        .split_whitespace()
        .find_map(|kv| kv.strip_prefix(name)?.strip_prefix('='))
        .unwrap_or_else(|| panic!("{name} in {summary:?}"))
}

/// The edge's "closing connection" log line for a client id, without colours.
fn closing_line(log: &str, client_id: &str) -> Option<String> {
    let plain: String = {
        // Strip ANSI colour sequences (ESC [ ... m).
        let mut out = String::with_capacity(log.len());
        let mut chars = log.chars();
        while let Some(c) = chars.next() {
            if c == '\u{1b}' {
                for c in chars.by_ref() {
                    if c == 'm' {
                        break;
                    }
                }
            } else {
                out.push(c);
            }
        }
        out
    };
    plain
        .lines()
        .find(|l| {
            l.contains("closing connection") && l.contains(&format!("client_id={client_id} "))
        })
        .map(str::to_string)
}

fn assert_cut_off_for_its_queue(o: &Outcome, client_id: &str) {
    let line = closing_line(&o.edge_log, client_id)
        .unwrap_or_else(|| panic!("the edge never closed {client_id}:\n{}", o.edge_log));
    assert!(
        line.contains("code=\"0x97\"") && line.contains("stayed over its queue bound"),
        "{line}"
    );
}

fn count(report: &serde_json::Value, field: &str) -> u64 {
    report[field]
        .as_u64()
        .unwrap_or_else(|| panic!("{field} in {report}"))
}

#[test]
fn flood_publishers_get_every_message_acknowledged_despite_subscribers_that_never_read() {
    let o = outcome();
    let sent = count(&o.flood, "sent");
    assert!(sent > 0, "{}", o.flood);
    assert_eq!(count(&o.flood, "acked"), sent, "{}", o.flood);
    for field in [
        "refused",
        "unacked",
        "errors",
        "disconnects",
        "connect_failures",
    ] {
        assert_eq!(count(&o.flood, field), 0, "{field}: {}", o.flood);
    }
}

#[test]
fn publisher_on_another_topic_gets_every_message_acknowledged() {
    let o = outcome();
    assert_eq!(count(&o.other_publisher, "sent"), OTHER_MESSAGES);
    assert_eq!(
        count(&o.other_publisher, "acked"),
        OTHER_MESSAGES,
        "{}",
        o.other_publisher
    );
}

#[test]
fn subscriber_on_another_filter_receives_every_message() {
    let o = outcome();
    let line = &o.other_subscriber;
    assert_eq!(summary_field(line, "received"), OTHER_MESSAGES, "{line}");
    assert_eq!(summary_field(line, "dup"), 0, "{line}");
    assert_eq!(summary_word(line, "closed"), "no", "{line}");
}

#[test]
fn edge_peak_memory_stays_bounded() {
    let o = outcome();
    assert!(
        o.peak_rss_kb < PEAK_RSS_BOUND_KB,
        "VmHWM {} KiB, bound {} KiB",
        o.peak_rss_kb,
        PEAK_RSS_BOUND_KB
    );
}

#[test]
fn deliveries_past_the_queue_bound_are_counted_as_dropped() {
    let o = outcome();
    assert!(o.dropped > 0, "$SYS/broker/publish/messages/dropped is 0");
}

#[test]
fn slow_v5_qos1_subscriber_is_disconnected_with_quota_exceeded() {
    let o = outcome();
    let line = &o.slow[0];
    assert_eq!(summary_word(line, "disconnect_reason"), "0x97", "{line}");
    assert_eq!(summary_word(line, "closed"), "yes", "{line}");
    // It held no more than the edge's in-flight window (max_inflight_messages = 64):
    // nothing was acknowledged.
    assert!(summary_field(line, "received") <= 64, "{line}");
    assert_cut_off_for_its_queue(o, SLOW[0].client_id);
}

#[test]
fn slow_v5_qos0_subscriber_that_stays_at_its_bound_is_disconnected_too() {
    let o = outcome();
    let line = &o.slow[1];
    assert_eq!(summary_word(line, "closed"), "yes", "{line}");
    assert_cut_off_for_its_queue(o, SLOW[1].client_id);
}

#[test]
fn slow_v311_qos1_subscriber_connection_is_closed() {
    let o = outcome();
    let line = &o.slow[2];
    assert_eq!(summary_word(line, "closed"), "yes", "{line}");
    // 3.1.1 has no DISCONNECT from the server.
    assert_eq!(summary_word(line, "disconnect_reason"), "none", "{line}");
    assert_cut_off_for_its_queue(o, SLOW[2].client_id);
}
