//! Flood mode: as few CPU cycles per message as possible, so that the simulator is not what
//! limits a benchmark.
//!
//! Each connection encodes one PUBLISH with rumqttc's codec, then builds batches of ~64 KiB by
//! copying that packet and patching three fields in place (packet id, sequence number, send
//! time), and writes each batch with one `write` call. QoS 0 is pipelined without limit; QoS 1
//! keeps at most `inflight` publishes unacknowledged per connection and reads PUBACKs between
//! batches. One send time is taken per batch: messages of a batch leave together.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::{timeout, Instant};

use crate::broker::ConnectSettings;
use crate::manifest::DeviceRecord;
use crate::payload::{self, RunId, HEADER_LEN, SEQ_OFFSET, TS_OFFSET};
use crate::plan::{ClassPlan, DeviceIdentity};
use crate::ranges::SeqRanges;
use crate::stats::{bump, latency_histogram, Clock, FleetStats};
use crate::wire::{self, Frame};

/// Target size of one write.
const BATCH_BYTES: usize = 64 * 1024;
/// How often a connection hands its latency samples to the shared statistics.
const LATENCY_FLUSH: Duration = Duration::from_secs(1);

/// What one flood connection needs.
pub struct FloodConnection {
    /// Names of the device this connection plays.
    pub identity: DeviceIdentity,
    /// Its class (payload size, QoS, count).
    pub class: ClassPlan,
    /// Connection settings.
    pub settings: Arc<ConnectSettings>,
    /// Most unacknowledged QoS 1 publishes.
    pub inflight: u16,
    /// Messages per second this connection may send (`None`: as fast as it can).
    pub rate: Option<f64>,
    /// The run.
    pub run: RunId,
    /// Shared counters.
    pub stats: Arc<FleetStats>,
    /// Clock for send times.
    pub clock: Clock,
    /// How long to wait for outstanding PUBACKs after the end.
    pub drain: Duration,
}

/// A pre-encoded PUBLISH and where its variable fields are.
struct PacketTemplate {
    bytes: Vec<u8>,
    pkid_at: Option<usize>,
    seq_at: usize,
    ts_at: usize,
}

fn template(conn: &FloodConnection) -> Result<PacketTemplate, String> {
    let size = conn.class.payload.size.max(HEADER_LEN);
    let mut body = vec![0u8; size];
    payload::write_header(
        &mut body,
        conn.run,
        conn.identity.class,
        conn.identity.index,
        0,
        0,
    );
    for (i, byte) in body[HEADER_LEN..].iter_mut().enumerate() {
        *byte = (i as u8).wrapping_mul(31).wrapping_add(7);
    }
    let body = Bytes::from(body);
    let protocol = conn.settings.protocol;
    let qos = conn.class.qos;
    let mut first = BytesMut::new();
    wire::write_publish(
        protocol,
        &conn.identity.topic,
        qos,
        1,
        body.clone(),
        &mut first,
    )?;
    let payload_at = first.len() - size;
    let pkid_at = if qos > 0 {
        // Encode again with another id: the only differing byte is the id's low byte.
        let mut second = BytesMut::new();
        wire::write_publish(protocol, &conn.identity.topic, qos, 2, body, &mut second)?;
        let low = first
            .iter()
            .zip(second.iter())
            .position(|(a, b)| a != b)
            .ok_or("packet id not found in the encoded PUBLISH")?;
        Some(low - 1)
    } else {
        None
    };
    Ok(PacketTemplate {
        bytes: first.to_vec(),
        pkid_at,
        seq_at: payload_at + SEQ_OFFSET,
        ts_at: payload_at + TS_OFFSET,
    })
}

struct AckState {
    slots: Vec<(u64, u64)>,
    free: Vec<u16>,
    acked: SeqRanges,
    refused: SeqRanges,
    histogram: Histogram<u64>,
    window: usize,
}

impl AckState {
    fn new(window: u16) -> Self {
        AckState {
            slots: vec![(0, 0); usize::from(window) + 1],
            free: (1..=window).rev().collect(),
            acked: SeqRanges::new(),
            refused: SeqRanges::new(),
            histogram: latency_histogram(),
            window: usize::from(window),
        }
    }

    fn outstanding(&self) -> usize {
        self.window - self.free.len()
    }

    /// Consumes every complete packet in `input`; returns how many acknowledgements it held.
    fn absorb(
        &mut self,
        protocol: crate::broker::Protocol,
        input: &mut BytesMut,
        now_us: u64,
        stats: &FleetStats,
    ) -> Result<u64, String> {
        let mut acks = 0;
        while let Some(frame) = wire::read(protocol, input)? {
            match frame {
                Frame::Ack { pkid, refused } => {
                    let slot = usize::from(pkid);
                    if slot == 0 || slot > self.window || self.free.contains(&pkid) {
                        bump(&stats.errors);
                        stats.note_error("PUBACK for a packet id not in flight");
                        continue;
                    }
                    let (seq, sent_us) = self.slots[slot];
                    self.free.push(pkid);
                    if refused {
                        self.refused.insert(seq);
                        bump(&stats.refused);
                    } else {
                        self.acked.insert(seq);
                        self.histogram
                            .saturating_record(now_us.saturating_sub(sent_us).max(1));
                        acks += 1;
                    }
                }
                Frame::Disconnect => return Err("the broker sent DISCONNECT".into()),
                _ => {}
            }
        }
        Ok(acks)
    }
}

async fn connect(conn: &FloodConnection) -> Result<(TcpStream, Option<u16>), String> {
    let settings = &conn.settings;
    let address = settings.url.socket_address();
    let connecting = async {
        let mut stream = TcpStream::connect(&address)
            .await
            .map_err(|e| format!("connect to {}: {e}", settings.url.original))?;
        stream.set_nodelay(true).map_err(|e| e.to_string())?;
        let mut out = BytesMut::new();
        // The keep-alive is announced (some brokers, rumqttd among them, refuse 0) but no
        // PINGREQ is needed: a flood connection is never idle for that long.
        wire::write_connect_with(
            settings.protocol,
            wire::ConnectFields {
                client_id: &conn.identity.client_id,
                credentials: settings.credentials.as_ref(),
                keep_alive_secs: u16::try_from(settings.keep_alive.as_secs()).unwrap_or(u16::MAX),
                clean: true,
                session_expiry_secs: None,
            },
            &mut out,
        )?;
        stream.write_all(&out).await.map_err(|e| e.to_string())?;
        let mut input = BytesMut::with_capacity(4096);
        loop {
            if let Some(frame) = wire::read(settings.protocol, &mut input)? {
                return match frame {
                    Frame::ConnAck {
                        refused: None,
                        receive_max,
                        ..
                    } => Ok((stream, receive_max)),
                    Frame::ConnAck {
                        refused: Some(reason),
                        ..
                    } => Err(format!("connection refused: {reason}")),
                    other => Err(format!("expected CONNACK, got {other:?}")),
                };
            }
            if stream
                .read_buf(&mut input)
                .await
                .map_err(|e| e.to_string())?
                == 0
            {
                return Err("the broker closed the connection before CONNACK".into());
            }
        }
    };
    timeout(settings.connect_timeout, connecting)
        .await
        .map_err(|_| format!("no CONNACK within {:?}", settings.connect_timeout))?
}

/// Runs one flood connection until `stop` turns true or its message count is reached.
pub async fn run_connection(
    conn: FloodConnection,
    mut stop: watch::Receiver<bool>,
) -> DeviceRecord {
    let mut sent = SeqRanges::new();
    let mut acks = AckState::new(conn.inflight.max(1));
    if let Err(e) = flood(&conn, &mut stop, &mut sent, &mut acks).await {
        // Already counted as a connect failure or a disconnect; keep the reason for the report.
        conn.stats.note_error(&e);
    }
    conn.stats.merge_latencies(&acks.histogram);
    DeviceRecord {
        index: conn.identity.index,
        name: conn.identity.name,
        class: conn.identity.class,
        qos: conn.class.qos,
        topic: conn.identity.topic,
        client_id: Some(conn.identity.client_id),
        sent,
        acked: acks.acked,
        refused: acks.refused,
    }
}

async fn flood(
    conn: &FloodConnection,
    stop: &mut watch::Receiver<bool>,
    sent: &mut SeqRanges,
    acks: &mut AckState,
) -> Result<(), String> {
    let stats = &conn.stats;
    let protocol = conn.settings.protocol;
    let packet = template(conn)?;
    let (mut stream, receive_max) = match connect(conn).await {
        Ok(connected) => connected,
        Err(e) => {
            bump(&stats.connect_failures);
            return Err(e);
        }
    };
    bump(&stats.connects);
    stats.connected.fetch_add(1, Ordering::Relaxed);
    let qos1 = conn.class.qos > 0;
    if let Some(max) = receive_max {
        // The broker's Receive Maximum caps the window; exceeding it is a protocol error.
        if usize::from(max) < acks.window {
            *acks = AckState::new(max.max(1));
        }
    }
    let per_batch = (BATCH_BYTES / packet.bytes.len()).max(1);
    let mut out: Vec<u8> = Vec::with_capacity(per_batch * packet.bytes.len());
    let mut input = BytesMut::with_capacity(64 * 1024);
    let limit = conn.class.count.unwrap_or(u64::MAX);
    let mut seq: u64 = 0;
    let mut last_flush = Instant::now();
    let started = Instant::now();
    let result: Result<(), String> = async {
        while seq < limit && !*stop.borrow() {
            out.clear();
            let now_us = conn.clock.now_us();
            // Paced: send only what the rate allows by now; a whole-millisecond sleep would
            // bunch messages, so the wait is at most the time to the next message.
            let allowed = match conn.rate {
                Some(rate) => {
                    let due = (started.elapsed().as_secs_f64() * rate) as u64 + 1;
                    if due <= seq {
                        let next = Duration::from_secs_f64((seq + 1) as f64 / rate);
                        let wait = next.saturating_sub(started.elapsed()).max(Duration::from_micros(50));
                        if qos1 && acks.outstanding() > 0 {
                            // Keep reading acknowledgements while waiting.
                            tokio::select! {
                                _ = tokio::time::sleep(wait) => {},
                                read = stream.read_buf(&mut input) => {
                                    if read.map_err(|e| format!("read: {e}"))? == 0 {
                                        return Err("the broker closed the connection".into());
                                    }
                                    let got = acks.absorb(protocol, &mut input, conn.clock.now_us(), stats)?;
                                    stats.acked.fetch_add(got, Ordering::Relaxed);
                                },
                                _ = stop.changed() => {},
                            }
                        } else {
                            tokio::select! {
                                _ = tokio::time::sleep(wait) => {},
                                _ = stop.changed() => {},
                            }
                        }
                        continue;
                    }
                    due.saturating_sub(seq) as usize
                }
                None => usize::MAX,
            };
            let mut n = 0u64;
            while (n as usize) < per_batch.min(allowed) && seq < limit {
                let pkid = if qos1 {
                    match acks.free.pop() {
                        Some(id) => id,
                        None => break,
                    }
                } else {
                    0
                };
                let at = out.len();
                out.extend_from_slice(&packet.bytes);
                out[at + packet.seq_at..at + packet.seq_at + 8].copy_from_slice(&seq.to_be_bytes());
                out[at + packet.ts_at..at + packet.ts_at + 8].copy_from_slice(&now_us.to_be_bytes());
                if let Some(pkid_at) = packet.pkid_at {
                    out[at + pkid_at..at + pkid_at + 2].copy_from_slice(&pkid.to_be_bytes());
                    acks.slots[usize::from(pkid)] = (seq, now_us);
                }
                seq += 1;
                n += 1;
            }
            if n > 0 {
                // Counted as sent before the write completes: a failed write leaves these
                // messages possibly delivered, and "sent" must cover everything that may arrive.
                sent.insert_range(seq - n, seq - 1);
                stream.write_all(&out).await.map_err(|e| format!("write: {e}"))?;
                stats.sent.fetch_add(n, Ordering::Relaxed);
            }
            if qos1 {
                if acks.free.is_empty() {
                    let read = tokio::select! {
                        read = stream.read_buf(&mut input) => read.map_err(|e| format!("read: {e}"))?,
                        _ = stop.changed() => continue,
                    };
                    if read == 0 {
                        return Err("the broker closed the connection".into());
                    }
                }
                loop {
                    match stream.try_read_buf(&mut input) {
                        Ok(0) => return Err("the broker closed the connection".into()),
                        Ok(_) => continue,
                        Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                        Err(e) => return Err(format!("read: {e}")),
                    }
                }
                let got = acks.absorb(protocol, &mut input, conn.clock.now_us(), stats)?;
                stats.acked.fetch_add(got, Ordering::Relaxed);
                if last_flush.elapsed() >= LATENCY_FLUSH {
                    stats.merge_latencies(&acks.histogram);
                    acks.histogram.reset();
                    last_flush = Instant::now();
                }
            }
        }
        if qos1 {
            let deadline = Instant::now() + conn.drain;
            while acks.outstanding() > 0 {
                let read = tokio::time::timeout_at(deadline, stream.read_buf(&mut input)).await;
                match read {
                    Err(_) => break,
                    Ok(Ok(0)) => return Err("the broker closed the connection".into()),
                    Ok(Ok(_)) => {
                        let got = acks.absorb(protocol, &mut input, conn.clock.now_us(), stats)?;
                        stats.acked.fetch_add(got, Ordering::Relaxed);
                    }
                    Ok(Err(e)) => return Err(format!("read: {e}")),
                }
            }
        }
        let mut bye = BytesMut::new();
        wire::write_disconnect(protocol, &mut bye);
        stream.write_all(&bye).await.map_err(|e| format!("write: {e}"))?;
        let _ = stream.shutdown().await;
        Ok(())
    }
    .await;
    stats.connected.fetch_sub(1, Ordering::Relaxed);
    if result.is_err() {
        bump(&stats.disconnects);
    }
    result
}
