//! Micro-benchmarks of the ingest hot path: routing, record encoding, batch decoding, MQTT
//! PUBLISH decoding and one group commit. `cargo bench -p edge`; the system benchmark is
//! tests/bench/ingest.
#![allow(clippy::unwrap_used)] // test and benchmark code: a failed unwrap is the report

use std::sync::Arc;

use bytes::BytesMut;
use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use edge::config::{Config, FsyncMode};
use edge::log::appender::{self, AppendRequest, PendingRecord, ReplyTo};
use edge::log::record::{decode_batch, encode_batch, BatchHeader, NewRecord};
use edge::log::Log;
use edge::mqtt::codec::{decode, Version};
use edge::route::Router;
use rumqttc::mqttbytes::{v4, QoS};

const PAYLOAD: [u8; 64] = [7; 64];

fn router() -> Router {
    let config = Config::parse(
        "[[routes]]\nmatch = \"sensors/+/#\"\ntopic = \"telemetry\"\nkey = \"{1}\"\npartitions = 16\n",
        "bench",
    )
    .unwrap();
    let plan = config.route_plan().unwrap();
    Router::new(&plan, plan.ids_in_plan_order())
}

fn record(payload: &[u8], out: &mut Vec<u8>) {
    NewRecord {
        timestamp_ms: 1_795_600_000_000,
        key: b"dev-42",
        mqtt_topic: b"sensors/dev-42/temperature",
        qos: 1,
        retain: false,
        client_id: "sim-dev-42",
        content_type: None,
        payload_format: None,
        message_expiry: None,
        response_topic: None,
        correlation_data: None,
        user_properties: &[],
        payload,
    }
    .encode_into(out)
    .expect("a small record fits its encoding");
}

fn routing(c: &mut Criterion) {
    let r = router();
    c.bench_function("route/routed_topic", |b| {
        b.iter(|| r.route(std::hint::black_box("sensors/dev-42/temperature"), "c"))
    });
    c.bench_function("route/unrouted_topic", |b| {
        b.iter(|| r.route(std::hint::black_box("plant/line-3/press"), "c"))
    });
}

fn records(c: &mut Criterion) {
    let mut g = c.benchmark_group("record");
    g.throughput(Throughput::Elements(1));
    let mut out = Vec::with_capacity(1 << 20);
    g.bench_function("encode_64B", |b| {
        b.iter(|| {
            if out.len() > (1 << 20) - 256 {
                out.clear();
            }
            record(&PAYLOAD, &mut out)
        })
    });
    let mut body = Vec::new();
    for _ in 0..1000 {
        record(&PAYLOAD, &mut body);
    }
    let mut value = Vec::new();
    encode_batch(
        BatchHeader {
            record_count: 1000,
            first_timestamp_ms: 1,
            last_timestamp_ms: 2,
        },
        &body,
        &mut value,
    );
    let value = bytes::Bytes::from(value);
    g.throughput(Throughput::Elements(1000));
    g.bench_function("decode_batch_1000", |b| {
        b.iter(|| decode_batch(0, value.clone()).unwrap())
    });
    g.finish();
}

fn codec(c: &mut Criterion) {
    let mut wire = BytesMut::new();
    for pkid in 1..=1000u16 {
        let mut p = v4::Publish::new(
            "sensors/dev-42/temperature",
            QoS::AtLeastOnce,
            PAYLOAD.to_vec(),
        );
        p.pkid = pkid;
        p.write(&mut wire).unwrap();
    }
    let wire = wire.freeze();
    let mut g = c.benchmark_group("codec");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("decode_1000_publish_v311", |b| {
        b.iter_batched(
            || BytesMut::from(&wire[..]),
            |mut buf| {
                while let Some(p) = decode(Version::V311, &mut buf, 1 << 20).unwrap() {
                    std::hint::black_box(p);
                }
            },
            BatchSize::SmallInput,
        )
    });
    g.finish();
}

fn group_commit(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let plan = Config::parse("", "bench").unwrap().route_plan().unwrap();
    let log = Arc::new(Log::open(dir.path(), Some(&plan.topics), None).unwrap());
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    // fsync "never" so the figure is the appender's CPU cost, not the disk's latency.
    let (tx, thread) = appender::spawn(
        log,
        FsyncMode::Never,
        edge::log::record::Compression::Lz4,
        1000,
        64,
        1,
        |_| {},
    );
    let (reply_tx, mut reply_rx) = tokio::sync::mpsc::unbounded_channel();
    let mut template = AppendRequest::default();
    for _ in 0..1000 {
        let start = template.buf.len();
        record(&PAYLOAD, &mut template.buf);
        template.records.push(PendingRecord {
            topic: 0,
            partition: 0,
            start: start as u32,
            len: (template.buf.len() - start) as u32,
            timestamp_ms: 1,
        });
    }
    let mut g = c.benchmark_group("append");
    g.throughput(Throughput::Elements(1000));
    g.bench_function("group_commit_1000_records", |b| {
        b.iter(|| {
            let req = AppendRequest {
                records: template.records.clone(),
                buf: template.buf.clone(),
                reply: Some(ReplyTo {
                    tx: reply_tx.clone(),
                    ticket: 0,
                }),
                ..Default::default()
            };
            rt.block_on(async {
                tx.append(req).await.unwrap();
                reply_rx.recv().await.unwrap().outcome.unwrap();
            })
        })
    });
    g.finish();
    rt.block_on(tx.shutdown());
    drop(tx);
    thread.join().unwrap().unwrap();
}

criterion_group!(benches, routing, records, codec, group_commit);
criterion_main!(benches);
