//! kill -9 under load: clients publish QoS 1 and QoS 2 continuously and record every
//! acknowledgement; the edge is killed several times mid-stream and restarted. Afterwards
//! every acknowledged QoS 1 message is in the log at least once and every QoS 2 message at
//! most once (exactly once if its PUBREC arrived), with the QoS 2 clients resending over their
//! persistent sessions as the spec requires.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;
use tributary_tests::{next_free_pkid, ConnectOpts, Edge, Got, Proto, Pub, RawClient};

const WINDOW: usize = 20;

#[derive(Default)]
struct Ledger {
    /// Payloads whose PUBACK / PUBREC arrived.
    acked: HashSet<String>,
    /// Every payload ever sent.
    sent: HashSet<String>,
    /// Connections that found their session present after a restart.
    resumed: usize,
}

/// One client's numbered publishes.
struct Stream {
    id: String,
    proto: Proto,
    topic: &'static [u8],
    qos: u8,
    seq: u64,
    next_pkid: u16,
}

impl Stream {
    fn new(id: &str, proto: Proto, topic: &'static [u8], qos: u8) -> Stream {
        Stream {
            id: id.to_string(),
            proto,
            topic,
            qos,
            seq: 0,
            next_pkid: 1,
        }
    }

    /// Tops `window` up with new publishes, recorded as sent; returns their encoding.
    fn fill<V>(
        &mut self,
        window: &mut HashMap<u16, V>,
        ledger: &Mutex<Ledger>,
        entry: impl Fn(String) -> V,
    ) -> BytesMut {
        let mut out = BytesMut::new();
        while window.len() < WINDOW {
            let payload = format!("{}-{}", self.id, self.seq);
            self.seq += 1;
            let pkid = next_free_pkid(window, &mut self.next_pkid);
            RawClient::encode_publish(
                self.proto,
                &Pub {
                    topic: self.topic,
                    qos: self.qos,
                    pkid,
                    dup: false,
                    payload: payload.as_bytes(),
                    alias: None,
                },
                &mut out,
            );
            ledger.lock().unwrap().sent.insert(payload.clone());
            window.insert(pkid, entry(payload));
        }
        out
    }
}

async fn connect_retrying(
    addr: std::net::SocketAddr,
    proto: Proto,
    opts: &ConnectOpts,
    stop: &AtomicBool,
) -> Option<(RawClient, bool)> {
    loop {
        if let Ok((
            c,
            Got::ConnAck {
                code: 0,
                session_present,
                ..
            },
        )) = RawClient::connect(addr, proto, opts).await
        {
            return Some((c, session_present));
        }
        if stop.load(Ordering::Relaxed) {
            return None;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Publishes QoS 1 until stopped; unacknowledged messages of a lost connection are abandoned.
async fn qos1_publisher(
    addr: std::net::SocketAddr,
    proto: Proto,
    id: &str,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let mut stream = Stream::new(id, proto, b"sensors/crash/q1", 1);
    let opts = ConnectOpts::new(id);
    'outer: loop {
        let Some((mut c, _)) = connect_retrying(addr, proto, &opts, &stop).await else {
            break;
        };
        let mut window: HashMap<u16, String> = HashMap::new();
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            if stopping && window.is_empty() {
                break 'outer;
            }
            let out = if stopping {
                BytesMut::new()
            } else {
                stream.fill(&mut window, &ledger, |p| p)
            };
            if !out.is_empty() && c.send_raw(&out).await.is_err() {
                continue 'outer;
            }
            match c.recv_within(Duration::from_secs(5)).await {
                Ok(Got::PubAck(pkid, 0)) => {
                    let p = window
                        .remove(&pkid)
                        .expect("PUBACK for a packet id in flight");
                    ledger.lock().unwrap().acked.insert(p);
                }
                Ok(Got::Closed) | Err(_) => continue 'outer,
                Ok(other) => panic!("{id}: unexpected {other:?}"),
            }
        }
    }
}

/// Publishes QoS 2 over a persistent session until stopped; after a reconnect it resends
/// unacknowledged PUBLISHes with DUP and the same packet id, and PUBRELs for PUBREC'd ones.
async fn qos2_publisher(
    addr: std::net::SocketAddr,
    proto: Proto,
    id: &str,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let mut opts = ConnectOpts::new(id);
    opts.clean = false;
    opts.session_expiry = Some(3600);
    // Clear any earlier session once, then continue it across crashes.
    {
        let mut fresh = opts.clone();
        fresh.clean = true;
        let (mut c, ack) = RawClient::connect(addr, proto, &fresh).await.unwrap();
        assert!(matches!(ack, Got::ConnAck { code: 0, .. }));
        c.send_raw(&[0xE0, 0]).await.unwrap();
    }
    let mut stream = Stream::new(id, proto, b"sensors/crash/q2", 2);
    // pkid -> (payload, PUBREC received)
    let mut window: HashMap<u16, (String, bool)> = HashMap::new();
    let mut first = true;
    'outer: loop {
        let Some((mut c, present)) = connect_retrying(addr, proto, &opts, &stop).await else {
            break;
        };
        if !first {
            assert!(present, "{id}: the persistent session survived the restart");
            ledger.lock().unwrap().resumed += 1;
        }
        first = false;
        let mut out = BytesMut::new();
        let mut pending: Vec<_> = window.iter().map(|(k, v)| (*k, v.clone())).collect();
        pending.sort_by_key(|(k, _)| *k);
        for (pkid, (payload, recd)) in pending {
            if recd {
                let [hi, lo] = pkid.to_be_bytes();
                out.extend_from_slice(&[0x62, 2, hi, lo]);
            } else {
                RawClient::encode_publish(
                    proto,
                    &Pub {
                        topic: b"sensors/crash/q2",
                        qos: 2,
                        pkid,
                        dup: true,
                        payload: payload.as_bytes(),
                        alias: None,
                    },
                    &mut out,
                );
            }
        }
        if c.send_raw(&out).await.is_err() {
            continue;
        }
        loop {
            let stopping = stop.load(Ordering::Relaxed);
            if stopping && window.is_empty() {
                break 'outer;
            }
            let out = if stopping {
                BytesMut::new()
            } else {
                stream.fill(&mut window, &ledger, |p| (p, false))
            };
            if !out.is_empty() && c.send_raw(&out).await.is_err() {
                continue 'outer;
            }
            match c.recv_within(Duration::from_secs(5)).await {
                Ok(Got::PubRec(pkid, 0)) => {
                    if let Some(entry) = window.get_mut(&pkid) {
                        entry.1 = true;
                        ledger.lock().unwrap().acked.insert(entry.0.clone());
                        if c.pubrel(pkid).await.is_err() {
                            continue 'outer;
                        }
                    }
                }
                Ok(Got::PubComp(pkid, _)) => {
                    window.remove(&pkid);
                }
                Ok(Got::Closed) | Err(_) => continue 'outer,
                Ok(other) => panic!("{id}: unexpected {other:?}"),
            }
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acknowledged_messages_survive_repeated_kill_9() {
    let mut edge = Edge::start("[[routes]]\nmatch = \"sensors/#\"\ntopic = \"telemetry\"\nkey = \"{client_id}\"\npartitions = 4\n");
    let addr = edge.addr;
    let stop = Arc::new(AtomicBool::new(false));
    let q1 = Arc::new(Mutex::new(Ledger::default()));
    let q2 = Arc::new(Mutex::new(Ledger::default()));
    let mut tasks = Vec::new();
    for (proto, name) in [(Proto::V311, "v311"), (Proto::V5, "v5")] {
        let (s, l) = (stop.clone(), q1.clone());
        tasks.push(tokio::spawn(async move {
            qos1_publisher(addr, proto, &format!("crash-q1-{name}"), s, l).await
        }));
        let (s, l) = (stop.clone(), q2.clone());
        tasks.push(tokio::spawn(async move {
            qos2_publisher(addr, proto, &format!("crash-q2-{name}"), s, l).await
        }));
    }

    let mut acked_before_kill = Vec::new();
    for _round in 0..4 {
        tokio::time::sleep(Duration::from_millis(1500)).await;
        acked_before_kill.push((
            q1.lock().unwrap().acked.len(),
            q2.lock().unwrap().acked.len(),
        ));
        edge.kill9();
        tokio::time::sleep(Duration::from_millis(300)).await;
        edge.restart();
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        tokio::time::timeout(Duration::from_secs(60), t)
            .await
            .expect("publishers finish")
            .unwrap();
    }
    assert!(edge.stop().success(), "{}", edge.stderr());

    // Publishing made progress between every two kills, so each kill hit a live stream.
    for w in acked_before_kill.windows(2) {
        assert!(
            w[1].0 > w[0].0 && w[1].1 > w[0].1,
            "no progress between kills: {acked_before_kill:?}"
        );
    }
    assert!(
        q2.lock().unwrap().resumed >= 2 * 4,
        "QoS 2 clients resumed their sessions after each kill"
    );

    let log = edge.read_log();
    let mut count: HashMap<String, usize> = HashMap::new();
    for r in &log {
        *count
            .entry(r["payload"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    let q1 = q1.lock().unwrap();
    let missing: Vec<_> = q1
        .acked
        .iter()
        .filter(|p| !count.contains_key(*p))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged QoS 1 messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let q2 = q2.lock().unwrap();
    let missing: Vec<_> = q2
        .acked
        .iter()
        .filter(|p| !count.contains_key(*p))
        .collect();
    assert!(
        missing.is_empty(),
        "{} acknowledged QoS 2 messages lost, e.g. {:?}",
        missing.len(),
        &missing[..missing.len().min(5)]
    );
    let dups: Vec<_> = q2
        .sent
        .iter()
        .filter(|p| count.get(*p).copied().unwrap_or(0) > 1)
        .collect();
    assert!(dups.is_empty(), "QoS 2 messages logged twice: {dups:?}");
    // With every in-flight QoS 2 message resent to completion, all of them arrived.
    assert_eq!(q2.acked.len(), q2.sent.len());
    eprintln!(
        "acknowledged: QoS 1 {} (of {} sent), QoS 2 {}; log holds {} records",
        q1.acked.len(),
        q1.sent.len(),
        q2.acked.len(),
        log.len()
    );
}
