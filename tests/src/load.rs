//! Load that survives crashes: publishers that keep publishing numbered messages across
//! kills and restarts of the edge, reconnecting as devices do, and record every
//! acknowledgement in a [`Ledger`] for the test to check against the log.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::BytesMut;

use crate::{next_free_pkid, ConnectOpts, Got, Proto, Pub, RawClient};

const WINDOW: usize = 20;

/// What the publishers sent and had acknowledged.
#[derive(Default)]
pub struct Ledger {
    /// Payloads whose PUBACK / PUBREC arrived.
    pub acked: HashSet<String>,
    /// Every payload ever sent.
    pub sent: HashSet<String>,
    /// When each QoS 1 acknowledgement arrived, in order.
    pub acked_at: Vec<(String, std::time::Instant)>,
    /// Connections that found their session present after a restart.
    pub resumed: usize,
}

/// One client's numbered publishes.
struct Stream {
    id: String,
    proto: Proto,
    topic: String,
    qos: u8,
    seq: u64,
    next_pkid: u16,
}

impl Stream {
    fn new(id: &str, proto: Proto, topic: &str, qos: u8) -> Stream {
        Stream {
            id: id.to_string(),
            proto,
            topic: topic.to_string(),
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
                    topic: self.topic.as_bytes(),
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

/// Connects until a CONNACK 0 arrives (the edge may be restarting); returns the client and
/// session present, or `None` once `stop` is set.
pub async fn connect_retrying(
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

/// Publishes QoS 1 to `topic` until stopped; unacknowledged messages of a lost connection
/// are abandoned. Payloads are `{id}-{seq}`.
pub async fn qos1_publisher(
    addr: std::net::SocketAddr,
    proto: Proto,
    id: &str,
    topic: &str,
    stop: Arc<AtomicBool>,
    ledger: Arc<Mutex<Ledger>>,
) {
    let mut stream = Stream::new(id, proto, topic, 1);
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
                    let mut l = ledger.lock().unwrap();
                    l.acked_at.push((p.clone(), std::time::Instant::now()));
                    l.acked.insert(p);
                }
                Ok(Got::Closed) | Err(_) => continue 'outer,
                Ok(other) => panic!("{id}: unexpected {other:?}"),
            }
        }
    }
}

/// Publishes QoS 2 to `topic` over a persistent session until stopped; after a reconnect it
/// resends unacknowledged PUBLISHes with DUP and the same packet id, and PUBRELs for
/// PUBREC'd ones.
pub async fn qos2_publisher(
    addr: std::net::SocketAddr,
    proto: Proto,
    id: &str,
    topic: &str,
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
    let mut stream = Stream::new(id, proto, topic, 2);
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
                        topic: topic.as_bytes(),
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

/// Publishers of a crash test sharing a stop flag and two ledgers: QoS 1 ones into `q1`,
/// QoS 2 ones (over persistent sessions) into `q2`.
pub struct Fleet {
    stop: Arc<AtomicBool>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Acknowledgements of the QoS 1 publishers.
    pub q1: Arc<Mutex<Ledger>>,
    /// Acknowledgements of the QoS 2 publishers.
    pub q2: Arc<Mutex<Ledger>>,
}

impl Fleet {
    fn empty() -> Fleet {
        Fleet {
            stop: Arc::new(AtomicBool::new(false)),
            tasks: Vec::new(),
            q1: Arc::new(Mutex::new(Ledger::default())),
            q2: Arc::new(Mutex::new(Ledger::default())),
        }
    }

    /// For MQTT 3.1.1 and 5.0 each, a QoS 1 publisher `{name}-q1-{version}` to `{topic}/q1`
    /// and a QoS 2 publisher `{name}-q2-{version}` to `{topic}/q2`.
    pub fn both_qos(addr: std::net::SocketAddr, name: &str, topic: &str) -> Fleet {
        let mut fleet = Fleet::empty();
        for (proto, version) in [(Proto::V311, "v311"), (Proto::V5, "v5")] {
            let (stop, ledger) = (fleet.stop.clone(), fleet.q1.clone());
            let (id, t) = (format!("{name}-q1-{version}"), format!("{topic}/q1"));
            fleet.tasks.push(tokio::spawn(async move {
                qos1_publisher(addr, proto, &id, &t, stop, ledger).await
            }));
            let (stop, ledger) = (fleet.stop.clone(), fleet.q2.clone());
            let (id, t) = (format!("{name}-q2-{version}"), format!("{topic}/q2"));
            fleet.tasks.push(tokio::spawn(async move {
                qos2_publisher(addr, proto, &id, &t, stop, ledger).await
            }));
        }
        fleet
    }

    /// `count` MQTT 5.0 QoS 1 publishers `{name}-{i}` to `topic`.
    pub fn qos1(addr: std::net::SocketAddr, name: &str, topic: &str, count: usize) -> Fleet {
        let mut fleet = Fleet::empty();
        for i in 0..count {
            let (stop, ledger) = (fleet.stop.clone(), fleet.q1.clone());
            let (id, t) = (format!("{name}-{i}"), topic.to_string());
            fleet.tasks.push(tokio::spawn(async move {
                qos1_publisher(addr, Proto::V5, &id, &t, stop, ledger).await
            }));
        }
        fleet
    }

    /// Stops publishing and waits (up to `within`) for every publisher to finish its
    /// messages in flight.
    pub async fn finish(self, within: Duration) {
        self.stop.store(true, Ordering::Relaxed);
        for t in self.tasks {
            tokio::time::timeout(within, t)
                .await
                .expect("publishers finish")
                .expect("a publisher panicked");
        }
    }
}

/// Waits (up to 180 s) until `ledger` holds `more` acknowledgements beyond what it held
/// when called: the publishers are through a restart and making progress.
pub async fn wait_for_acks(ledger: &Mutex<Ledger>, more: usize) {
    let start = ledger.lock().unwrap().acked.len();
    let deadline = std::time::Instant::now() + Duration::from_secs(180);
    loop {
        let now = ledger.lock().unwrap().acked.len();
        if now >= start + more {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "publishing made no progress: {start} -> {now} acknowledgements"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
