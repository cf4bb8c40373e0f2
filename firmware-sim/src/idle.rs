//! Idle connections, for the connection-scale benchmark: opens many MQTT connections (CONNECT
//! with a keep-alive, then the CONNACK), spread over local source addresses since one address
//! has only ~28k ports towards one broker, keeps them open with a PINGREQ every half keep-alive,
//! and reports how long connecting them all took and how many the broker kept open.
//!
//! Each connection is one small task with a 64-byte read buffer, so the simulator itself needs
//! a few KiB per connection and 100,000 of them fit on a small machine.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{watch, Semaphore};

use crate::broker::{BrokerUrl, Protocol};
use crate::error::SimError;
use crate::wire::{self, ConnectFields, Frame};

/// What `firmware-sim idle` does.
#[derive(Debug, Clone)]
pub struct IdleOptions {
    /// The broker (plain `mqtt://` only).
    pub broker: BrokerUrl,
    /// MQTT protocol version of every CONNECT.
    pub protocol: Protocol,
    /// Connections to open.
    pub connections: u64,
    /// Local addresses the sockets are bound to, in turn; empty: the OS picks.
    pub source_ips: Vec<IpAddr>,
    /// Keep-alive asked for in the CONNECT; a PINGREQ goes out every half of it.
    pub keep_alive: Duration,
    /// How long the connections stay open once every attempt has ended.
    pub hold: Duration,
    /// Most connection attempts (TCP + CONNECT + CONNACK) in progress at once.
    pub connect_concurrency: usize,
    /// Time allowed for one attempt.
    pub connect_timeout: Duration,
    /// Client ids are this prefix followed by the connection's number.
    pub client_id_prefix: String,
    /// Written (JSON, the report so far) as soon as every attempt has ended, before the hold.
    pub ready_file: Option<PathBuf>,
}

/// The outcome of `firmware-sim idle`.
#[derive(Debug, Clone, Serialize)]
pub struct IdleReport {
    /// The broker URL.
    pub broker: String,
    /// Connections asked for.
    pub connections: u64,
    /// Connections that got a successful CONNACK.
    pub connected: u64,
    /// Attempts that failed (TCP error, refusal, timeout).
    pub failed: u64,
    /// From the first attempt until every attempt had ended.
    pub connect_seconds: f64,
    /// Successful connections per second over `connect_seconds`.
    pub connects_per_s: f64,
    /// Connections the broker closed while they were held (none is expected).
    pub closed_while_held: u64,
    /// Connections still open at the end of the hold.
    pub open_at_end: u64,
    /// How long the connections were held.
    pub held_seconds: f64,
    /// Failure messages and how often each occurred.
    pub errors: BTreeMap<String, u64>,
}

#[derive(Default)]
struct Counters {
    connected: AtomicU64,
    failed: AtomicU64,
    closed: AtomicU64,
    errors: Mutex<BTreeMap<String, u64>>,
}

impl Counters {
    fn fail(&self, message: String) {
        *self
            .errors
            .lock()
            .expect("errors lock")
            .entry(message)
            .or_default() += 1;
        self.failed.fetch_add(1, Ordering::Relaxed);
    }
}

/// Opens the connections, holds them, and reports.
pub async fn idle(options: IdleOptions) -> Result<IdleReport, SimError> {
    if options.broker.tls {
        return Err(SimError::invalid(
            "--broker",
            "idle connections are plain TCP only: use an mqtt:// URL",
        ));
    }
    if options.connections == 0 {
        return Err(SimError::invalid("--connections", "must be at least 1"));
    }
    let keep_alive_secs = u16::try_from(options.keep_alive.as_secs())
        .ok()
        .filter(|&secs| secs >= 2)
        .ok_or_else(|| SimError::invalid("--keep-alive", "must be between 2s and 65535s"))?;
    let target = tokio::net::lookup_host((options.broker.host.as_str(), options.broker.port))
        .await
        .ok()
        .and_then(|mut addrs| addrs.next())
        .ok_or_else(|| {
            SimError::invalid(
                "--broker",
                format!("cannot resolve {}", options.broker.original),
            )
        })?;

    let counters = Arc::new(Counters::default());
    let gate = Arc::new(Semaphore::new(options.connect_concurrency.max(1)));
    let (stop_tx, stop_rx) = watch::channel(false);
    let attempts_done = Arc::new(tokio::sync::Notify::new());
    let started = Instant::now();
    for index in 0..options.connections {
        let source = (!options.source_ips.is_empty())
            .then(|| options.source_ips[(index % options.source_ips.len() as u64) as usize]);
        let connection = IdleConnection {
            target,
            source,
            protocol: options.protocol,
            client_id: format!("{}{index}", options.client_id_prefix),
            keep_alive_secs,
            connect_timeout: options.connect_timeout,
        };
        let gate = gate.clone();
        let counters = counters.clone();
        let stop = stop_rx.clone();
        let attempts_done = attempts_done.clone();
        let total = options.connections;
        tokio::spawn(async move {
            let permit = gate
                .acquire_owned()
                .await
                .expect("the gate is never closed");
            let opened = connection.open().await;
            drop(permit);
            let ended = |counters: &Counters| {
                counters.connected.load(Ordering::Relaxed) + counters.failed.load(Ordering::Relaxed)
            };
            let stream = match opened {
                Ok(stream) => {
                    counters.connected.fetch_add(1, Ordering::Relaxed);
                    stream
                }
                Err(message) => {
                    counters.fail(message);
                    if ended(&counters) == total {
                        attempts_done.notify_one();
                    }
                    return;
                }
            };
            if ended(&counters) == total {
                attempts_done.notify_one();
            }
            if !connection.hold(stream, stop).await {
                counters.closed.fetch_add(1, Ordering::Relaxed);
            }
        });
    }
    attempts_done.notified().await;
    let connect_seconds = started.elapsed().as_secs_f64();
    let snapshot = |held_seconds: f64| {
        let connected = counters.connected.load(Ordering::Relaxed);
        let closed = counters.closed.load(Ordering::Relaxed);
        IdleReport {
            broker: options.broker.original.clone(),
            connections: options.connections,
            connected,
            failed: counters.failed.load(Ordering::Relaxed),
            connect_seconds,
            connects_per_s: connected as f64 / connect_seconds.max(1e-9),
            closed_while_held: closed,
            open_at_end: connected - closed,
            held_seconds,
            errors: counters.errors.lock().expect("errors lock").clone(),
        }
    };
    if let Some(path) = &options.ready_file {
        crate::report::write_json(path, &snapshot(0.0))?;
    }
    let hold_started = Instant::now();
    tokio::time::sleep(options.hold).await;
    let report = snapshot(hold_started.elapsed().as_secs_f64());
    let _ = stop_tx.send(true);
    Ok(report)
}

struct IdleConnection {
    target: SocketAddr,
    source: Option<IpAddr>,
    protocol: Protocol,
    client_id: String,
    keep_alive_secs: u16,
    connect_timeout: Duration,
}

impl IdleConnection {
    /// TCP connect, CONNECT, CONNACK; the error says which step failed.
    async fn open(&self) -> Result<TcpStream, String> {
        tokio::time::timeout(self.connect_timeout, self.handshake())
            .await
            .unwrap_or_else(|_| Err(format!("no CONNACK within {:?}", self.connect_timeout)))
    }

    async fn handshake(&self) -> Result<TcpStream, String> {
        let socket = match self.target {
            SocketAddr::V4(_) => TcpSocket::new_v4(),
            SocketAddr::V6(_) => TcpSocket::new_v6(),
        }
        .map_err(|e| format!("socket: {e}"))?;
        if let Some(source) = self.source {
            socket
                .bind(SocketAddr::new(source, 0))
                .map_err(|e| format!("bind {source}: {e}"))?;
        }
        let mut stream = socket
            .connect(self.target)
            .await
            .map_err(|e| format!("connect: {e}"))?;
        stream
            .set_nodelay(true)
            .map_err(|e| format!("nodelay: {e}"))?;
        let mut out = BytesMut::with_capacity(64);
        wire::write_connect_with(
            self.protocol,
            ConnectFields {
                client_id: &self.client_id,
                credentials: None,
                keep_alive_secs: self.keep_alive_secs,
                clean: true,
                session_expiry_secs: None,
            },
            &mut out,
        )?;
        stream
            .write_all(&out)
            .await
            .map_err(|e| format!("writing CONNECT: {e}"))?;
        let mut buf = BytesMut::with_capacity(64);
        loop {
            if stream
                .read_buf(&mut buf)
                .await
                .map_err(|e| format!("reading CONNACK: {e}"))?
                == 0
            {
                return Err("closed before CONNACK".into());
            }
            match wire::read(self.protocol, &mut buf)? {
                None => continue,
                Some(Frame::ConnAck { refused: None, .. }) => return Ok(stream),
                Some(Frame::ConnAck {
                    refused: Some(reason),
                    ..
                }) => return Err(format!("refused: {reason}")),
                Some(_) => return Err("the first packet was not a CONNACK".into()),
            }
        }
    }

    /// Pings every half keep-alive until `stop`; false when the broker closed the connection.
    async fn hold(&self, mut stream: TcpStream, mut stop: watch::Receiver<bool>) -> bool {
        let mut ping = BytesMut::with_capacity(8);
        wire::write_pingreq(self.protocol, &mut ping);
        let period = Duration::from_secs(u64::from(self.keep_alive_secs) / 2);
        let mut next_ping = tokio::time::Instant::now() + period;
        let mut discard = [0u8; 64];
        loop {
            tokio::select! {
                _ = stop.changed() => return true,
                _ = tokio::time::sleep_until(next_ping) => {
                    if stream.write_all(&ping).await.is_err() {
                        return false;
                    }
                    next_ping += period;
                }
                // PINGRESPs (and anything else the broker sends) are read and dropped.
                read = stream.read(&mut discard) => match read {
                    Ok(0) | Err(_) => return false,
                    Ok(_) => {}
                },
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::broker::BrokerUrl;
    use tokio::net::TcpListener;

    /// A broker that accepts CONNECT with a CONNACK and answers PINGREQs, counting both.
    async fn tiny_broker(listener: TcpListener, pings: Arc<AtomicU64>) {
        loop {
            let Ok((mut stream, _)) = listener.accept().await else {
                return;
            };
            let pings = pings.clone();
            tokio::spawn(async move {
                let mut buf = BytesMut::new();
                let mut out = BytesMut::new();
                loop {
                    match stream.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(_) => {}
                    }
                    while let Ok(Some(frame)) = wire::read(Protocol::V311, &mut buf) {
                        match frame {
                            Frame::Connect { .. } => wire::write_connack(Protocol::V311, &mut out),
                            Frame::PingReq => {
                                pings.fetch_add(1, Ordering::Relaxed);
                                wire::write_pingresp(Protocol::V311, &mut out)
                            }
                            _ => {}
                        }
                    }
                    if stream.write_all(&out).await.is_err() {
                        return;
                    }
                    out.clear();
                }
            });
        }
    }

    fn options(port: u16, connections: u64) -> IdleOptions {
        IdleOptions {
            broker: BrokerUrl::parse("--broker", &format!("mqtt://127.0.0.1:{port}")).unwrap(),
            protocol: Protocol::V311,
            connections,
            source_ips: vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()],
            keep_alive: Duration::from_secs(2),
            hold: Duration::from_millis(2500),
            connect_concurrency: 8,
            connect_timeout: Duration::from_secs(5),
            client_id_prefix: "idle-".into(),
            ready_file: None,
        }
    }

    #[tokio::test]
    async fn every_connection_is_acknowledged_held_and_pinged() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let pings = Arc::new(AtomicU64::new(0));
        let server = tokio::spawn(tiny_broker(listener, pings.clone()));
        let report = idle(options(port, 20)).await.unwrap();
        server.abort();
        assert_eq!(report.connected, 20);
        assert_eq!(report.failed, 0);
        assert_eq!(report.open_at_end, 20);
        // A 2 s keep-alive pings every second: each connection pinged during the 2.5 s hold.
        assert!(pings.load(Ordering::Relaxed) >= 20, "pings: {pings:?}");
    }

    #[tokio::test]
    async fn a_broker_that_is_not_there_counts_failures() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        drop(listener);
        let mut options = options(port, 3);
        options.hold = Duration::ZERO;
        let report = idle(options).await.unwrap();
        assert_eq!(report.connected, 0);
        assert_eq!(report.failed, 3);
        assert!(
            report.errors.keys().all(|e| e.starts_with("connect:")),
            "{:?}",
            report.errors
        );
    }

    #[tokio::test]
    async fn tls_urls_are_refused_with_the_option_name() {
        let mut options = options(1, 1);
        options.broker = BrokerUrl::parse("--broker", "mqtts://127.0.0.1:8883").unwrap();
        let err = idle(options).await.unwrap_err().to_string();
        assert!(err.contains("--broker"), "{err}");
    }
}
