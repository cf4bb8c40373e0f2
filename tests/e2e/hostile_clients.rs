//! Hostile clients while 10 honest devices publish at QoS 1 (firmware-sim): 1,000 sockets
//! that never send CONNECT, a CONNECT sent one byte per second, streams of random bytes, a
//! CONNECT flood, a subscriber that never reads, oversized packets before and after CONNECT,
//! and a client publishing far over the configured rate. The attackers come from their own
//! loopback addresses (127.0.0.2 and up), as they would from their own hosts, so the
//! per-address limit falls on them and not on the honest devices at 127.0.0.1.
//!
//! The edge stays up; the honest devices get every acknowledgement (none of them had to skip
//! a publish for want of acknowledgements, and `firmware-sim verify` finds every
//! acknowledged message in the log exactly once); the edge's resident memory stays under a
//! bound while under attack; silent sockets, the slow CONNECT and the random bytes are all
//! closed by the edge; the oversized packets get 0x95, the fast publisher 0x96, the
//! subscription past the per-client bound 0x97, and /metrics counts each refusal.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;
use rumqttc::v5::mqttbytes::v5;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::task::JoinSet;
use tributary_tests::{
    binary, http_get, last_line, summary_field, ConnectOpts, Edge, Got, Proto, Pub, RawClient,
};

/// Sockets that never send CONNECT.
const SILENT: usize = 1000;
/// `max_connections_per_address` of the test's edge: the silent sockets' address reaches it.
const PER_ADDRESS: usize = 300;
/// `max_publish_rate` (publishes per second per connection); the honest devices send 20.
const RATE: u32 = 500;
/// Honest devices and their publishes per second each.
const DEVICES: u32 = 10;
const DEVICE_RATE: u32 = 20;
/// Resident memory the edge may use under attack. It starts at about 10 MiB; the limits hold
/// what the attack can make it keep to a few MiB (300 pre-CONNECT sockets without buffers,
/// one subscriber's queue of 200 messages, append requests within the 32 MiB node budget).
/// The attack opens some 20,000 connections in all (mostly the CONNECT flood), so keeping as
/// little as 8 KiB per connection after it closed (a session, a buffer) would cross 128 MiB.
const RSS_BOUND_KIB: u64 = 128 * 1024;
/// Lines the edge may write to stderr in this test. Thousands of connections are refused or
/// closed for cause; their log lines are budgeted (20 per 10 s), or this would be exceeded.
const LOG_LINES_BOUND: usize = 300;

fn mqtt_config() -> String {
    format!(
        "connect_timeout = \"2s\"\n\
         max_packet_size = \"16KiB\"\n\
         max_connections_per_address = {PER_ADDRESS}\n\
         max_subscriptions_per_client = 4\n\
         max_publish_rate = {RATE}\n\
         publish_rate_grace = \"2s\"\n\
         max_inflight_messages = 100\n\
         max_queued_messages = 200\n\
         slow_subscriber_timeout = \"3s\"\n"
    )
}

/// A TCP connection to `to` from the loopback address 127.0.0.`host`.
async fn connect_from(host: u8, to: SocketAddr) -> std::io::Result<TcpStream> {
    let socket = TcpSocket::new_v4()?;
    socket.bind(SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(127, 0, 0, host)),
        0,
    ))?;
    socket.connect(to).await
}

/// Reads until the edge closes the connection (EOF or reset); false if it is still open
/// after `guard` (a guard against a hang, far beyond what the edge should take).
async fn closed_by_edge(stream: &mut TcpStream, guard: Duration) -> bool {
    let mut buf = [0u8; 4096];
    tokio::time::timeout(guard, async {
        loop {
            match stream.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
        }
    })
    .await
    .is_ok()
}

fn v5_connect(client_id: &str) -> BytesMut {
    let mut out = BytesMut::new();
    v5::Connect {
        keep_alive: 30,
        client_id: client_id.to_string(),
        clean_start: true,
        properties: None,
    }
    .write(&None, &None, &mut out)
    .unwrap();
    out
}

fn v311_connect(client_id: &str) -> BytesMut {
    let mut out = BytesMut::new();
    rumqttc::mqttbytes::v4::Connect::new(client_id)
        .write(&mut out)
        .unwrap();
    out
}

/// One /metrics series, exactly as exposed.
fn metric(edge: &Edge, series: &str) -> u64 {
    let (status, text) = http_get(edge.admin, "/metrics", None).unwrap();
    assert_eq!(status, 200);
    tributary_tests::metric(&text, series) as u64
}

fn vm_rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .expect("VmRSS in /proc/PID/status")
}

/// 1,000 sockets from 127.0.0.2 that never send anything. Returns how many of them the edge
/// closed (all of them: past the per-address limit at once, the others at connect_timeout).
async fn silent_sockets(addr: SocketAddr) -> usize {
    let mut sockets = Vec::with_capacity(SILENT);
    for _ in 0..SILENT {
        sockets.push(
            connect_from(2, addr)
                .await
                .expect("connecting a silent socket"),
        );
    }
    let mut waits = JoinSet::new();
    for mut s in sockets {
        waits.spawn(async move { closed_by_edge(&mut s, Duration::from_secs(60)).await });
    }
    let mut closed = 0;
    while let Some(r) = waits.join_next().await {
        closed += usize::from(r.unwrap());
    }
    closed
}

/// A 5.0 CONNECT sent one byte per second from 127.0.0.4. Returns (bytes sent before the edge
/// closed the connection, length of the CONNECT).
async fn slowloris(addr: SocketAddr) -> (usize, usize) {
    let connect = v5_connect("slowloris-with-a-long-client-id-to-send");
    let mut s = connect_from(4, addr).await.unwrap();
    let mut buf = [0u8; 64];
    for (i, byte) in connect.iter().enumerate() {
        if s.write_all(&[*byte]).await.is_err() {
            return (i, connect.len());
        }
        match tokio::time::timeout(Duration::from_secs(1), s.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return (i + 1, connect.len()),
            Ok(Ok(n)) => panic!("the edge answered a partial CONNECT: {:?}", &buf[..n]),
            Err(_) => {}
        }
    }
    (connect.len(), connect.len())
}

/// Streams of random bytes from 127.0.0.5 (a few starting like a CONNECT, the rest not).
/// Returns how many the edge closed.
async fn random_streams(addr: SocketAddr, count: usize) -> usize {
    let mut tasks = JoinSet::new();
    for n in 0..count {
        tasks.spawn(async move {
            let mut x = 0x9E37_79B9_7F4A_7C15u64 ^ (n as u64 + 1);
            let mut bytes: Vec<u8> = (0..16 * 1024)
                .map(|_| {
                    x ^= x << 13;
                    x ^= x >> 7;
                    x ^= x << 17;
                    x as u8
                })
                .collect();
            bytes[0] = if n % 4 == 0 { 0x10 } else { 0xF0 | bytes[0] };
            let mut s = connect_from(5, addr).await.unwrap();
            // The edge may close before it has all of it; that is the point.
            let _ = s.write_all(&bytes).await;
            closed_by_edge(&mut s, Duration::from_secs(60)).await
        });
    }
    let mut closed = 0;
    while let Some(r) = tasks.join_next().await {
        closed += usize::from(r.unwrap());
    }
    closed
}

/// CONNECT, CONNACK, DISCONNECT as fast as `workers` connections from 127.0.0.3 go, until
/// `stop`. Returns the CONNACKs with return code 0 received.
async fn connect_flood(addr: SocketAddr, workers: usize, stop: Arc<AtomicBool>) -> u64 {
    let accepted = Arc::new(AtomicU64::new(0));
    let mut tasks = JoinSet::new();
    for w in 0..workers {
        let (stop, accepted) = (stop.clone(), accepted.clone());
        tasks.spawn(async move {
            let mut i = 0u64;
            let mut buf = BytesMut::new();
            while !stop.load(Ordering::Relaxed) {
                i += 1;
                let Ok(mut s) = connect_from(3, addr).await else {
                    // Out of local ports, for one: let them come back.
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                };
                if s.write_all(&v311_connect(&format!("flood-{w}-{i}")))
                    .await
                    .is_err()
                {
                    continue;
                }
                buf.clear();
                let got = tokio::time::timeout(Duration::from_secs(10), s.read_buf(&mut buf)).await;
                if matches!(got, Ok(Ok(n)) if n >= 4) && buf[..4] == [0x20, 2, 0, 0] {
                    accepted.fetch_add(1, Ordering::Relaxed);
                    // The edge closes first, so the TIME_WAIT is its own and this address's
                    // ports are not used up.
                    if s.write_all(&[0xE0, 0]).await.is_ok() {
                        closed_by_edge(&mut s, Duration::from_secs(10)).await;
                    }
                }
            }
        });
    }
    while let Some(r) = tasks.join_next().await {
        r.unwrap();
    }
    accepted.load(Ordering::Relaxed)
}

/// Publishes QoS 0 from 127.0.0.6 as fast as the edge reads; returns the reason code of the
/// DISCONNECT the edge sent, if any.
async fn over_the_rate(addr: SocketAddr) -> Option<u8> {
    let s = connect_from(6, addr).await.unwrap();
    s.set_nodelay(true).unwrap();
    let (mut rd, mut wr) = s.into_split();
    wr.write_all(&v5_connect("too-fast")).await.unwrap();
    let writer = tokio::spawn(async move {
        let mut batch = BytesMut::new();
        for i in 0..200u32 {
            let payload = format!("too-fast-{i:04}-padding-to-about-eighty-bytes-of-payload");
            RawClient::encode_publish(
                Proto::V5,
                &Pub {
                    topic: b"flood/too-fast",
                    qos: 0,
                    pkid: 0,
                    dup: false,
                    payload: payload.as_bytes(),
                    alias: None,
                },
                &mut batch,
            );
        }
        // Until the edge closes the connection; it stops reading long before.
        while wr.write_all(&batch).await.is_ok() {}
    });
    let mut buf = BytesMut::new();
    let mut code = None;
    let read_all = async {
        loop {
            match v5::Packet::read(&mut buf, None) {
                Ok(v5::Packet::Disconnect(d)) => code = Some(d.reason_code as u8),
                Ok(_) => {}
                Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => {
                    match rd.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                }
                Err(e) => panic!("undecodable packet from the edge: {e}"),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(60), read_all)
        .await
        .expect("the edge ends a client that stays over its rate");
    writer.await.unwrap();
    code
}

/// A CONNECT claiming 1 MiB (the limit is 16 KiB), then a connected client
/// sending a 32 KiB PUBLISH: what each got before the edge closed it.
async fn oversized(addr: SocketAddr) -> (Vec<Got>, Vec<Got>) {
    let mut header = vec![0x10, 0x80, 0x80, 0x40];
    header.extend_from_slice(&[0, 4, b'M', b'Q', b'T', b'T', 5, 0x02, 0, 30, 0]);
    let mut c = RawClient::open(addr, Proto::V5).await.unwrap();
    c.send_raw(&header).await.unwrap();
    let before_connect = c.until_closed().await.unwrap();

    let (mut c, ack) = RawClient::connect(addr, Proto::V5, &ConnectOpts::new("oversized"))
        .await
        .unwrap();
    assert!(matches!(ack, Got::ConnAck { code: 0, .. }), "{ack:?}");
    c.publish("sensors/oversized/t", 1, 1, &vec![b'x'; 32 * 1024])
        .await
        .unwrap();
    let after_connect = c.until_closed().await.unwrap();
    (before_connect, after_connect)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_clients_do_not_hurt_honest_devices() {
    tributary_tests::raise_open_files(16384);
    let mut edge = Edge::start_with(&mqtt_config(), "", "");
    let addr = edge.addr;
    let pid = edge.pid();
    let rss_at_start = vm_rss_kib(pid);

    let work = tempfile::tempdir().unwrap();
    let manifest = work.path().join("manifest");
    let report = work.path().join("run.json");
    let honest = Command::new(binary("firmware-sim"))
        .args(["run", "--broker", &format!("mqtt://{addr}")])
        .args(["--devices", &DEVICES.to_string()])
        .args(["--rate", &DEVICE_RATE.to_string()])
        .args(["--qos", "1", "--duration", "25s"])
        // Acknowledgements that stall for ~10 s make a device skip publishes.
        .args(["--max-queue", "200"])
        .arg("--manifest")
        .arg(&manifest)
        .arg("--report")
        .arg(&report)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    tokio::time::sleep(Duration::from_secs(2)).await;

    // A subscriber on the honest topics that never reads, with one filter past its bound.
    let (mut deaf, _) = RawClient::connect(addr, Proto::V5, &ConnectOpts::new("deaf"))
        .await
        .unwrap();
    let codes = deaf
        .subscribe(
            1,
            &[
                ("sensors/#", 1),
                ("sensors/+/temperature", 1),
                ("a", 0),
                ("b", 0),
                ("c", 0),
            ],
        )
        .await
        .unwrap();
    assert_eq!(
        codes,
        vec![1, 1, 0, 0, 0x97],
        "the fifth filter is over the bound"
    );

    // Memory and connections, sampled while the attack runs.
    let sampling = Arc::new(AtomicBool::new(true));
    let sampler = {
        let sampling = sampling.clone();
        let admin = edge.admin;
        tokio::task::spawn_blocking(move || {
            let (mut max_rss, mut max_conns) = (0, 0);
            while sampling.load(Ordering::Relaxed) {
                max_rss = max_rss.max(vm_rss_kib(pid));
                if let Ok((200, text)) = http_get(admin, "/metrics", None) {
                    let conns = text
                        .lines()
                        .find_map(|l| l.strip_prefix("tributary_connections "))
                        .and_then(|v| v.trim().parse::<u64>().ok())
                        .unwrap_or(0);
                    max_conns = max_conns.max(conns);
                }
                std::thread::sleep(Duration::from_millis(250));
            }
            (max_rss, max_conns)
        })
    };

    let flood_stop = Arc::new(AtomicBool::new(false));
    let flood = tokio::spawn(connect_flood(addr, 8, flood_stop.clone()));
    let silent = tokio::spawn(silent_sockets(addr));
    let slow = tokio::spawn(slowloris(addr));
    let random = tokio::spawn(random_streams(addr, 20));
    let rate = tokio::spawn(over_the_rate(addr));
    let big = tokio::spawn(oversized(addr));

    tokio::time::sleep(Duration::from_secs(8)).await;
    flood_stop.store(true, Ordering::Relaxed);
    let flood_accepted = flood.await.unwrap();
    let silent_closed = silent.await.unwrap();
    let (slow_sent, slow_len) = slow.await.unwrap();
    let random_closed = random.await.unwrap();
    let rate_code = rate.await.unwrap();
    let (big_before, big_after) = big.await.unwrap();

    let honest = honest.wait_with_output().unwrap();
    sampling.store(false, Ordering::Relaxed);
    let (max_rss, max_conns) = sampler.await.unwrap();
    eprintln!(
        "edge RSS {} MiB at start, at most {} MiB under attack; at most {max_conns} connections; \
         {flood_accepted} flood CONNECTs accepted; {} log lines",
        rss_at_start / 1024,
        max_rss / 1024,
        edge.stderr().lines().count()
    );

    assert!(
        edge.try_wait().is_none(),
        "the edge died:\n{}",
        edge.stderr()
    );
    assert_eq!(
        silent_closed, SILENT,
        "every silent socket was closed by the edge"
    );
    assert!(
        slow_sent < slow_len,
        "the slow CONNECT was cut before it was complete ({slow_sent} of {slow_len} bytes)"
    );
    assert_eq!(
        random_closed, 20,
        "every random stream was closed by the edge"
    );
    assert!(
        flood_accepted > PER_ADDRESS as u64,
        "the flood's CONNECTs were served, more of them from one address than its limit: \
         each connection gave its slot back ({flood_accepted})"
    );
    assert_eq!(rate_code, Some(0x96), "Message rate too high");
    assert_eq!(
        big_before,
        vec![Got::ConnAck {
            code: 0x95,
            session_present: false,
            assigned_id: None,
            receive_maximum: None,
        }],
        "an oversized CONNECT"
    );
    assert_eq!(
        big_after,
        vec![Got::Disconnect(0x95)],
        "an oversized PUBLISH"
    );
    assert!(
        max_rss < RSS_BOUND_KIB,
        "edge RSS reached {} MiB",
        max_rss / 1024
    );
    let log_lines = edge.stderr().lines().count();
    assert!(
        log_lines < LOG_LINES_BOUND,
        "{log_lines} log lines:\n{}",
        edge.stderr()
    );
    assert!(
        max_conns < SILENT as u64,
        "the per-address limit kept the silent sockets to {PER_ADDRESS}: at most {max_conns} connections"
    );

    let refused = |why: &str| {
        metric(
            &edge,
            &format!("tributary_connections_refused_total{{reason=\"{why}\"}}"),
        )
    };
    assert!(refused("per_address") > 0, "silent sockets past the limit");
    assert!(
        refused("connect_timeout") > 1,
        "silent sockets within the limit and the slow CONNECT"
    );
    assert!(
        refused("malformed") >= 15,
        "the random streams not starting like a CONNECT"
    );
    assert!(refused("packet_too_large") >= 1, "the oversized CONNECT");
    assert_eq!(metric(&edge, "tributary_publish_rate_limited_total"), 1);
    assert!(metric(&edge, "tributary_publish_rate_throttled_total") >= 1);
    assert_eq!(metric(&edge, "tributary_subscriptions_refused_total"), 1);
    assert!(
        metric(&edge, "tributary_slow_subscriber_disconnects_total") >= 1,
        "the subscriber that never reads"
    );
    drop(deaf);

    // The honest devices: every publish acknowledged, none skipped, none disconnected.
    assert!(
        honest.status.success(),
        "firmware-sim run: {}",
        String::from_utf8_lossy(&honest.stderr)
    );
    let run: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let field = |name: &str| {
        run[name]
            .as_u64()
            .unwrap_or_else(|| panic!("{name} in {run}"))
    };
    assert!(field("sent") > 0, "{run}");
    assert_eq!(field("acked"), field("sent"), "{run}");
    assert_eq!(field("skipped"), 0, "{run}");
    assert_eq!(field("disconnects"), 0, "{run}");
    assert_eq!(field("connect_failures"), 0, "{run}");

    assert!(edge.stop().success(), "{}", edge.stderr());
    let (status, log, err) = edge.cli(&["read", "--json"]);
    assert!(status.success(), "edge read: {err}");
    let dump = work.path().join("edge.jsonl");
    std::fs::write(&dump, log).unwrap();
    let verify = Command::new(binary("firmware-sim"))
        .args(["verify", "--manifest"])
        .arg(&manifest)
        .arg("--edge-log")
        .arg(&dump)
        .output()
        .unwrap();
    let summary = last_line(&verify);
    assert!(
        verify.status.success(),
        "verify: {summary}\n{}",
        String::from_utf8_lossy(&verify.stderr)
    );
    assert_eq!(summary_field(&summary, "lost"), 0, "{summary}");
    assert_eq!(summary_field(&summary, "duplicates"), 0, "{summary}");
    assert_eq!(
        summary_field(&summary, "received"),
        summary_field(&summary, "expected"),
        "{summary}"
    );
    assert_eq!(
        summary_field(&summary, "expected"),
        field("acked"),
        "{summary}"
    );
}

/// Waits until /metrics shows `series` at `value` (the edge counts asynchronously); fails
/// after 30 s.
async fn wait_metric(edge: &Edge, series: &str, value: u64) {
    for _ in 0..300 {
        if metric(edge, series) == value {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("{series} never reached {value}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn past_max_connections_clients_hear_server_busy_then_sockets_are_closed_at_accept() {
    tributary_tests::raise_open_files(16384);
    let edge = Edge::start_with("max_connections = 2\nconnect_timeout = \"60s\"\n", "", "");
    let addr = edge.addr;
    // The harness's readiness probe was a connection too.
    wait_metric(&edge, "tributary_connections", 0).await;
    let mut held = Vec::new();
    for id in ["first", "second"] {
        let (c, ack) = RawClient::connect(addr, Proto::V5, &ConnectOpts::new(id))
            .await
            .unwrap();
        assert!(matches!(ack, Got::ConnAck { code: 0, .. }), "{ack:?}");
        held.push(c);
    }
    let (mut third, ack) = RawClient::connect(addr, Proto::V5, &ConnectOpts::new("third"))
        .await
        .unwrap();
    assert_eq!(ack.connack(), Some((0x89, false)), "Server busy");
    assert_eq!(third.until_closed().await.unwrap(), vec![]);
    wait_metric(&edge, "tributary_connections", 2).await;

    // 64 sockets past the limit are read up to their CONNECT (to hear Server busy); the next
    // one is closed at accept, without waiting for connect_timeout.
    let mut waiting = Vec::new();
    for _ in 0..64 {
        waiting.push(TcpStream::connect(addr).await.unwrap());
    }
    let mut extra = TcpStream::connect(addr).await.unwrap();
    assert!(closed_by_edge(&mut extra, Duration::from_secs(30)).await);
    let refused_max = "tributary_connections_refused_total{reason=\"max_connections\"}";
    assert_eq!(metric(&edge, refused_max), 2, "the CONNACK and the accept");
    assert_eq!(
        metric(
            &edge,
            "tributary_connections_refused_total{reason=\"connect_timeout\"}"
        ),
        0
    );
    assert_eq!(metric(&edge, "tributary_connections"), 66);

    // Slots come back as connections close.
    drop(waiting);
    drop(held);
    wait_metric(&edge, "tributary_connections", 0).await;
    let (_c, ack) = RawClient::connect(addr, Proto::V5, &ConnectOpts::new("again"))
        .await
        .unwrap();
    assert!(matches!(ack, Got::ConnAck { code: 0, .. }), "{ack:?}");
}
