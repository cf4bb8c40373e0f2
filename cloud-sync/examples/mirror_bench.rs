//! Mirror throughput against a plain idempotent rdkafka producer, same records, same cluster.
//!
//! `cargo run --release -p cloud-sync --example mirror_bench -- BOOTSTRAP RECORDS SIZE [PARTITIONS]`
//!
//! 1. Baseline: one `BaseProducer` with `enable.idempotence=true` (no transactions) sends
//!    RECORDS records of SIZE payload bytes, with the same keys and headers the edge gives, to
//!    a fresh topic; timed from the first send to the last acknowledgement.
//! 2. Mirror: the same records in a [`MemorySource`], mirrored with exactly-once on (the
//!    default settings of `[cloud]`); timed from the end of the mirror's start-up (topics
//!    created, transactions initialised, checkpoints read) to the commit of the last record.
//!
//! Prints one JSON line with both rates and their ratio. tests/bench/mirror runs it.

use std::borrow::Cow;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cloud_sync::{Header, LinkState, MemorySource, Mirror, MirrorConfig};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header as KafkaHeader, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::ClientConfig;

fn headers(device: u32) -> Vec<Header> {
    vec![
        Header {
            name: Cow::Borrowed("mqtt.topic"),
            value: Cow::Owned(format!("sensors/dev-{device}/temp").into_bytes()),
        },
        Header {
            name: Cow::Borrowed("mqtt.client_id"),
            value: Cow::Owned(format!("dev-{device}").into_bytes()),
        },
        Header {
            name: Cow::Borrowed("mqtt.qos"),
            value: Cow::Borrowed(b"1"),
        },
        Header {
            name: Cow::Borrowed("mqtt.retain"),
            value: Cow::Borrowed(b"false"),
        },
    ]
}

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.len() < 3 {
        eprintln!("usage: mirror_bench BOOTSTRAP RECORDS SIZE [PARTITIONS] [ROUNDS]");
        std::process::exit(2);
    }
    let bootstrap = &args[0];
    let records: u32 = args[1].parse().expect("RECORDS is a number");
    let size: usize = args[2].parse().expect("SIZE is a number");
    let partitions: u32 = args
        .get(3)
        .map(|p| p.parse().expect("PARTITIONS"))
        .unwrap_or(4);
    let rounds: u32 = args.get(4).map(|r| r.parse().expect("ROUNDS")).unwrap_or(3);
    let run = std::process::id();
    // Sensor-like payloads: JSON with varying readings, padded with pseudo-random hex, so
    // that compression sees realistic (not trivially compressible) data.
    let mut seed = 0x9E37_79B9_7F4A_7C15u64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let payloads: Vec<Vec<u8>> = (0..records)
        .map(|i| {
            let mut p = format!(
                "{{\"device\":\"dev-{}\",\"seq\":{i},\"t\":{:.2},\"pad\":\"",
                i % 1000,
                (next() % 10_000) as f64 / 100.0
            )
            .into_bytes();
            while p.len() + 2 < size {
                p.extend_from_slice(format!("{:016x}", next()).as_bytes());
            }
            p.truncate(size.saturating_sub(2));
            p.extend_from_slice(b"\"}");
            p
        })
        .collect();
    let devices = 1000u32;
    let record_of = |i: u32| {
        let device = i % devices;
        (
            device % partitions,
            format!("dev-{device}"),
            headers(device),
        )
    };

    let mut results = Vec::new();
    for round in 0..rounds {
        let base_secs = baseline(
            bootstrap,
            &format!("bench-base-{run}-{size}-{round}"),
            partitions,
            &payloads,
            &record_of,
        );
        let (mirror_secs, transactions) = mirror(
            bootstrap,
            &format!("bench-{run}-{size}-{round}"),
            partitions,
            &payloads,
            &record_of,
        );
        let base_rate = records as f64 / base_secs;
        let mirror_rate = records as f64 / mirror_secs;
        let r = serde_json::json!({
            "round": round,
            "records": records,
            "payload_bytes": size,
            "partitions": partitions,
            "baseline_idempotent_secs": base_secs,
            "baseline_records_per_sec": base_rate.round(),
            "mirror_exactly_once_secs": mirror_secs,
            "mirror_records_per_sec": mirror_rate.round(),
            "mirror_transactions": transactions,
            "ratio": (mirror_rate / base_rate * 1000.0).round() / 1000.0,
        });
        eprintln!("{r}");
        results.push((mirror_rate / base_rate, base_rate, mirror_rate));
    }
    results.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (ratio, base_rate, mirror_rate) = results[results.len() / 2];
    println!(
        "{}",
        serde_json::json!({
            "records": records,
            "payload_bytes": size,
            "partitions": partitions,
            "rounds": rounds,
            "median_ratio": (ratio * 1000.0).round() / 1000.0,
            "baseline_records_per_sec": base_rate.round(),
            "mirror_records_per_sec": mirror_rate.round(),
            "ratios": results.iter().map(|r| (r.0 * 1000.0).round() / 1000.0).collect::<Vec<_>>(),
        })
    );
}

type RecordOf<'a> = &'a dyn Fn(u32) -> (u32, String, Vec<Header>);

/// Seconds for a plain idempotent producer to send every record and get every ack.
fn baseline(
    bootstrap: &str,
    topic: &str,
    partitions: u32,
    payloads: &[Vec<u8>],
    record_of: RecordOf<'_>,
) -> f64 {
    let records = payloads.len() as u32;
    let payload = &payloads[0];
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("enable.idempotence", "true")
        .set("compression.type", "lz4")
        .set("linger.ms", "5")
        .set("batch.size", "1048576")
        .set("queue.buffering.max.kbytes", "262144")
        .create()
        .expect("producer");
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    let created = runtime
        .block_on(admin.create_topics(
            [&NewTopic::new(
                topic,
                partitions as i32,
                TopicReplication::Fixed(-1),
            )],
            &AdminOptions::new(),
        ))
        .expect("create topic");
    assert!(
        created.iter().all(|r| r.is_ok()),
        "creating {topic}: {created:?}"
    );
    // Warm up: metadata and producer id, so that only sending is timed.
    producer
        .send(
            BaseRecord::<str, [u8]>::to(topic)
                .partition(0)
                .key("warmup")
                .payload(&payload[..]),
        )
        .expect("warm-up send");
    producer.flush(Duration::from_secs(60)).expect("warm-up");
    // Keys and headers are built before timing, as the mirror's source holds them ready.
    let prepared: Vec<_> = (0..records).map(record_of).collect();
    let t0 = Instant::now();
    for (i, (partition, key, hs)) in prepared.iter().enumerate() {
        let mut h = OwnedHeaders::new_with_capacity(hs.len());
        for x in hs {
            h = h.insert(KafkaHeader {
                key: &x.name,
                value: Some(&*x.value),
            });
        }
        let mut rec = BaseRecord::to(topic)
            .partition(*partition as i32)
            .key(key)
            .payload(&payloads[i][..])
            .headers(h);
        loop {
            match producer.send(rec) {
                Ok(()) => break,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), r)) => {
                    rec = r;
                    producer.poll(Duration::from_millis(1));
                }
                Err((e, _)) => panic!("baseline send: {e}"),
            }
        }
    }
    producer.flush(Duration::from_secs(600)).expect("flush");
    let base_secs = t0.elapsed().as_secs_f64();
    drop(producer);

    base_secs
}

/// Seconds for the mirror to commit every record, from the end of its start-up.
fn mirror(
    bootstrap: &str,
    site: &str,
    partitions: u32,
    payloads: &[Vec<u8>],
    record_of: RecordOf<'_>,
) -> (f64, u64) {
    let records = payloads.len() as u32;
    let source = Arc::new(MemorySource::new());
    source.add_topic("telemetry", partitions);
    // Current timestamps, as the edge gives them: Kafka rolls a segment when its first record
    // is older than segment.ms, so old timestamps would roll one per request.
    let now_ms = cloud_sync::status::now_ms();
    for i in 0..records {
        let (partition, key, hs) = record_of(i);
        source.append(
            "telemetry",
            partition,
            now_ms,
            key.as_bytes(),
            &payloads[i as usize],
            hs,
        );
    }
    let mut config = MirrorConfig::new(bootstrap, site);
    if let Ok(bytes) = std::env::var("MIRROR_TRANSACTION_BYTES") {
        config.transaction_bytes = bytes.parse().expect("MIRROR_TRANSACTION_BYTES");
    }
    let mirror = Mirror::start(config, source).expect("mirror");
    let deadline = Instant::now() + Duration::from_secs(120);
    let mut started: Option<Instant> = None;
    let mirror_secs = loop {
        let s = mirror.status();
        if started.is_none() && s.state == LinkState::Mirroring {
            started = Some(Instant::now());
        }
        let done = s
            .partitions
            .iter()
            .all(|p| p.mirrored_offset == Some(p.edge_end_offset));
        if let (Some(t), true) = (started, done) {
            break t.elapsed().as_secs_f64();
        }
        assert!(Instant::now() < deadline, "mirror did not finish: {s:?}");
        std::thread::sleep(Duration::from_millis(2));
    };
    let status = mirror.stop(Duration::from_secs(30));
    if status.records_mirrored != records as u64 {
        eprintln!(
            "note: the mirror restarted a session ({} records counted by committed transactions, last error: {:?})",
            status.records_mirrored, status.last_error
        );
    }
    (mirror_secs, status.transactions)
}
