//! Flood mode: as few CPU cycles per message as possible, so that the simulator is not what
//! limits a benchmark.
//!
//! Each connection encodes one PUBLISH with rumqttc's codec, then builds batches of ~64 KiB by
//! copying that packet, copying in the next payload of a pre-built pool and patching three
//! fields in place (packet id, sequence number, send time), and writes each batch with one
//! `write` call. The pool makes the payloads what they claim to be: binary filler is random
//! bytes that no two messages within [`POOL_BYTES`] share (incompressible, as a sensor's raw
//! samples or encrypted data), JSON payloads are telemetry documents whose readings drift
//! (compressible as real telemetry is), each with its own sequence number and send time. QoS 0 is pipelined without limit; QoS 1
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
use rand::rngs::SmallRng;
use rand::{Rng, SeedableRng};

use crate::payload::{self, PayloadKind, RunId, HEADER_LEN, SEQ_OFFSET, TS_OFFSET};
use crate::plan::{ClassPlan, DeviceIdentity};
use crate::ranges::SeqRanges;
use crate::stats::{bump, latency_histogram, Clock, FleetStats};
use crate::wire::{self, Frame};

/// Target size of one write.
const BATCH_BYTES: usize = 64 * 1024;
/// Bytes of random binary filler a connection cycles through: more than any compressor's
/// window over one stored batch, so the filler does not repeat where it could be found.
const POOL_BYTES: usize = 8 << 20;
/// JSON documents a connection cycles through.
const JSON_POOL: usize = 4096;
/// Width of the `seq` and `ts_us` fields of a pooled JSON document: `u64::MAX` has 20
/// digits; a smaller number is right-aligned behind spaces (whitespace that JSON allows).
const JSON_NUMBER_WIDTH: usize = 20;
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
    /// Where the payload starts in `bytes`.
    payload_at: usize,
    payloads: PayloadPool,
}

/// The payloads a connection copies into its packets, all of the same length.
enum PayloadPool {
    /// The binary header (patched) followed by `filler` bytes taken in turn from `bytes`.
    Binary { bytes: Vec<u8>, filler: usize },
    /// Whole JSON documents, each `len` bytes, with `seq` and `ts_us` patched at the offsets.
    Json {
        docs: Vec<u8>,
        len: usize,
        seq_at: usize,
        ts_at: usize,
    },
}

impl PayloadPool {
    fn build(
        spec: payload::PayloadSpec,
        run: RunId,
        identity: &DeviceIdentity,
    ) -> Result<PayloadPool, String> {
        let mut rng = SmallRng::seed_from_u64(u64::from(run.0) << 32 | u64::from(identity.index));
        match spec.kind {
            PayloadKind::Binary => {
                let filler = spec.size.max(HEADER_LEN) - HEADER_LEN;
                // Rounded to whole fillers so that every message takes a contiguous slice.
                let len = POOL_BYTES
                    .checked_div(filler)
                    .map_or(0, |n| n.max(1) * filler);
                let mut bytes = vec![0u8; len];
                rng.fill_bytes(&mut bytes);
                Ok(PayloadPool::Binary { bytes, filler })
            }
            PayloadKind::Json => {
                let origin = payload::Origin {
                    run,
                    class: identity.class,
                    device_index: identity.index,
                    device_name: &identity.name,
                };
                let mut telemetry = payload::Telemetry::new(&mut rng);
                // u64::MAX marks where the numbers go and reserves their widest form.
                let mut docs: Vec<Vec<u8>> = (0..JSON_POOL)
                    .map(|_| {
                        payload::encode(spec, origin, u64::MAX, u64::MAX, &mut telemetry, &mut rng)
                    })
                    .collect();
                // Padding after the closing brace gives every document the longest one's size.
                let len = docs.iter().map(Vec::len).max().unwrap_or(0);
                for d in &mut docs {
                    d.resize(len, b' ');
                }
                let find = |doc: &[u8], field: &str| -> Result<usize, String> {
                    let needle = format!("\"{field}\":{}", u64::MAX);
                    doc.windows(needle.len())
                        .position(|w| w == needle.as_bytes())
                        .map(|at| at + needle.len() - JSON_NUMBER_WIDTH)
                        .ok_or_else(|| format!("no {field} field in a JSON payload"))
                };
                let (seq_at, ts_at) = (find(&docs[0], "seq")?, find(&docs[0], "ts_us")?);
                // Every document has the same fields before these two, of fixed text.
                for d in &docs {
                    if find(d, "seq")? != seq_at || find(d, "ts_us")? != ts_at {
                        return Err("JSON payloads of different layouts".into());
                    }
                }
                Ok(PayloadPool::Json {
                    docs: docs.concat(),
                    len,
                    seq_at,
                    ts_at,
                })
            }
        }
    }

    fn len(&self) -> usize {
        match self {
            PayloadPool::Binary { filler, .. } => HEADER_LEN + filler,
            PayloadPool::Json { len, .. } => *len,
        }
    }

    /// Writes payload number `seq` (sent at `now_us`) over `out`, which holds a payload of
    /// this pool's length.
    fn fill(&self, out: &mut [u8], seq: u64, now_us: u64) {
        match self {
            PayloadPool::Binary { bytes, filler } => {
                out[SEQ_OFFSET..SEQ_OFFSET + 8].copy_from_slice(&seq.to_be_bytes());
                out[TS_OFFSET..TS_OFFSET + 8].copy_from_slice(&now_us.to_be_bytes());
                if *filler > 0 {
                    let slots = bytes.len() / filler;
                    let at = (seq as usize % slots) * filler;
                    out[HEADER_LEN..].copy_from_slice(&bytes[at..at + filler]);
                }
            }
            PayloadPool::Json {
                docs,
                len,
                seq_at,
                ts_at,
            } => {
                let at = (seq as usize % JSON_POOL) * len;
                out.copy_from_slice(&docs[at..at + len]);
                write_padded(&mut out[*seq_at..*seq_at + JSON_NUMBER_WIDTH], seq);
                write_padded(&mut out[*ts_at..*ts_at + JSON_NUMBER_WIDTH], now_us);
            }
        }
    }
}

/// Writes `n` in decimal right-aligned in `field`, spaces before it.
fn write_padded(field: &mut [u8], mut n: u64) {
    let mut i = field.len();
    loop {
        i -= 1;
        field[i] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            break;
        }
    }
    field[..i].fill(b' ');
}

fn template(conn: &FloodConnection) -> Result<PacketTemplate, String> {
    let payloads = PayloadPool::build(conn.class.payload, conn.run, &conn.identity)?;
    let size = payloads.len();
    let mut body = vec![0u8; size];
    if let PayloadPool::Binary { .. } = payloads {
        payload::write_header(
            &mut body,
            conn.run,
            conn.identity.class,
            conn.identity.index,
            0,
            0,
        );
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
        payload_at,
        payloads,
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
                packet
                    .payloads
                    .fill(&mut out[at + packet.payload_at..], seq, now_us);
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

#[cfg(test)]
mod tests {
    use super::*;

    fn identity() -> DeviceIdentity {
        DeviceIdentity {
            index: 7,
            class: 1,
            name: "dev-7".into(),
            client_id: "c7".into(),
            topic: "t/7".into(),
        }
    }

    fn payloads(kind: PayloadKind, size: usize) -> (PayloadPool, Vec<Vec<u8>>) {
        let pool = PayloadPool::build(
            payload::PayloadSpec { kind, size },
            RunId(0xabcd_0123),
            &identity(),
        )
        .unwrap();
        let out = [0u64, 1, 9_999, 123_456_789_012]
            .iter()
            .map(|&seq| {
                let mut p = vec![0u8; pool.len()];
                if let PayloadPool::Binary { .. } = pool {
                    payload::write_header(&mut p, RunId(0xabcd_0123), 1, 7, 0, 0);
                }
                pool.fill(&mut p, seq, 1_000 + seq);
                p
            })
            .collect();
        (pool, out)
    }

    #[test]
    fn pooled_payloads_carry_their_own_stamp() {
        for (kind, size) in [
            (PayloadKind::Binary, 64),
            (PayloadKind::Binary, 32),
            (PayloadKind::Json, 0),
            (PayloadKind::Json, 1024),
        ] {
            let (pool, list) = payloads(kind, size);
            for (p, seq) in list.iter().zip([0u64, 1, 9_999, 123_456_789_012]) {
                assert_eq!(p.len(), pool.len());
                let stamp =
                    payload::decode(p).unwrap_or_else(|| panic!("{kind:?} {size}: undecodable"));
                assert_eq!(
                    (stamp.seq, stamp.sent_at_us),
                    (seq, 1_000 + seq),
                    "{kind:?} {size}"
                );
                assert_eq!(stamp.run, RunId(0xabcd_0123));
            }
            if size > 0 {
                assert_eq!(pool.len(), size, "{kind:?}: padded to the requested size");
            }
        }
    }

    #[test]
    fn binary_filler_differs_between_messages() {
        let (_, list) = payloads(PayloadKind::Binary, 64);
        assert_ne!(list[0][HEADER_LEN..], list[1][HEADER_LEN..]);
        assert_ne!(list[1][HEADER_LEN..], list[2][HEADER_LEN..]);
    }

    #[test]
    fn json_documents_differ_beyond_their_stamp() {
        let (_, list) = payloads(PayloadKind::Json, 0);
        let text = |p: &[u8]| -> serde_json::Value { serde_json::from_slice(p).unwrap() };
        let (a, b) = (text(&list[0]), text(&list[2]));
        assert!(
            ["temperature_c", "humidity_pct", "battery_v", "rssi_dbm"]
                .iter()
                .any(|f| a[f] != b[f]),
            "readings drift between documents: {a} {b}"
        );
    }

    #[test]
    fn numbers_are_right_aligned_behind_spaces() {
        let mut f = [0u8; JSON_NUMBER_WIDTH];
        write_padded(&mut f, 42);
        assert_eq!(&f[..], format!("{:>20}", 42).as_bytes());
        write_padded(&mut f, u64::MAX);
        assert_eq!(&f[..], u64::MAX.to_string().as_bytes());
        write_padded(&mut f, 0);
        assert_eq!(&f[..], format!("{:>20}", 0).as_bytes());
    }
}
