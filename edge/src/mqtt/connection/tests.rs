//! Connection tests: real connections over in-memory streams, and the size of what an idle
//! connection keeps.

use std::sync::atomic::AtomicUsize;
use std::task::{Context, Poll};

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::watch;

use super::socket::{read_some, IDLE_AFTER};
use super::*;
use crate::config::{Config, FsyncMode};
use crate::log::appender;
use crate::log::Log;
use crate::mqtt::delivery::{Hub, Message, OutboxLimits};
use crate::mqtt::session::SessionStore;
use crate::route::Router;

/// 3.1.1 CONNECT of client "c1", clean session, keepalive 60.
const CONNECT: &[u8] = &[
    0x10, 14, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x02, 0, 60, 0, 2, b'c', b'1',
];
/// QoS 1 PUBLISH of "hi" to "t/1", packet id 1.
const PUBLISH: &[u8] = &[0x32, 9, 0, 3, b't', b'/', b'1', 0, 1, b'h', b'i'];

/// A broker over a new log in `dir`, as `server::run` builds one (without listeners).
type Running = (
    Arc<Broker>,
    watch::Sender<bool>,
    std::thread::JoinHandle<Result<(), crate::log::appender::CommitError>>,
);

fn broker(dir: &std::path::Path) -> Running {
    let config = Config::default();
    let plan = config.route_plan().unwrap();
    let log = Arc::new(Log::open(dir, Some(&plan.topics), None).unwrap());
    let hub = Hub::new(OutboxLimits {
        messages: 1000,
        bytes: 1 << 20,
        offline_messages: 1000,
    });
    let (sessions, _) = SessionStore::load(&log, &hub, now_ms()).unwrap();
    let (appender, thread) = appender::spawn(
        log.clone(),
        FsyncMode::Never,
        crate::log::record::Compression::Lz4,
        1000,
        64,
        1,
        |_| {},
    );
    let router = Router::new(&plan, |name| {
        let t = log.topic(name).unwrap();
        (t.id, t.partitions.len() as u32)
    });
    let (shutdown_tx, shutdown) = watch::channel(false);
    let broker = Broker {
        config: config.mqtt.clone(),
        router,
        log,
        appender,
        sessions,
        hub,
        append_budget: Arc::new(tokio::sync::Semaphore::new(
            crate::mqtt::APPEND_BUDGET_BYTES as usize,
        )),
        connections: AtomicUsize::new(1),
        limits: Default::default(),
        wills: Default::default(),
        shutdown,
        auth: crate::auth::Auth::new(&config.auth, false).unwrap(),
    };
    (Arc::new(broker), shutdown_tx, thread)
}

/// A writer whose flush completes only when polled again after it said Pending (having
/// woken the caller), as a TLS stream's flush completes once its full socket drains.
struct SlowFlush<W> {
    inner: W,
    ready: bool,
}

impl<W: AsyncWrite + Unpin> AsyncWrite for SlowFlush<W> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        if !self.ready {
            self.ready = true;
            cx.waker().wake_by_ref();
            return Poll::Pending;
        }
        self.ready = false;
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// What a TLS stream does when the socket is full: the writer takes bytes and holds them
/// until it is flushed, and the flush itself may have to wait. The connection must see
/// the flush through, or its peer waits forever.
#[tokio::test]
async fn packets_reach_a_writer_that_holds_bytes_until_flushed() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _shutdown, appender_thread) = broker(dir.path());
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let (reader, writer) = tokio::io::split(server);
    let writer = SlowFlush {
        inner: tokio::io::BufWriter::new(writer),
        ready: false,
    };
    let peer = "127.0.0.1:1".parse().unwrap();
    let conn = tokio::spawn(serve(broker.clone(), reader, writer, peer, None));

    let mut got = [0u8; 4];
    client.write_all(CONNECT).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
        .await
        .expect("the CONNACK was flushed")
        .unwrap();
    assert_eq!(got, [0x20, 2, 0, 0]);
    client.write_all(PUBLISH).await.unwrap();
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
        .await
        .expect("the PUBACK was flushed")
        .unwrap();
    assert_eq!(got, [0x40, 2, 0, 1]);

    drop(client);
    conn.await.unwrap();
    broker.appender.shutdown().await;
    drop(broker);
    appender_thread.join().unwrap().unwrap();
}

/// A 3.1.1 QoS 1 PUBLISH.
fn publish_packet(topic: &str, pkid: u16, payload: &[u8]) -> Vec<u8> {
    codec::publish_frame(Version::V311, 0x32, topic.as_bytes(), pkid, payload)
}

async fn expect(client: &mut tokio::io::DuplexStream, want: &[u8]) {
    let mut got = vec![0u8; want.len()];
    tokio::time::timeout(Duration::from_secs(10), client.read_exact(&mut got))
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(got, want);
}

#[tokio::test]
async fn an_idle_read_takes_a_buffer_only_once_bytes_arrive() {
    use std::future::Future;
    let (mut client, mut server) = tokio::io::duplex(64 * 1024);
    let mut rbuf = BytesMut::new();
    let waker = std::task::Waker::noop();
    {
        let read = read_some(&mut server, &mut rbuf, true, 4096);
        tokio::pin!(read);
        assert!(read
            .as_mut()
            .poll(&mut Context::from_waker(waker))
            .is_pending());
    }
    assert_eq!(rbuf.capacity(), 0, "nothing arrived, nothing allocated");
    client.write_all(&[0xc0, 0]).await.unwrap();
    let n = read_some(&mut server, &mut rbuf, true, 4096).await.unwrap();
    assert_eq!(n, 2);
    assert_eq!(&rbuf[..], &[0xc0, 0]);
    assert!(rbuf.capacity() >= 4096, "the read size for what follows");
}

/// An idle connection gives its read buffer and commit channel back; a large packet
/// arriving in pieces afterwards is still read whole, logged and acknowledged, and so is
/// the next one after the connection idled again.
#[tokio::test]
async fn publishes_after_idling_are_read_whole_and_acknowledged() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _shutdown, appender_thread) = broker(dir.path());
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let (reader, writer) = tokio::io::split(server);
    let peer = "127.0.0.1:1".parse().unwrap();
    let conn = tokio::spawn(serve(broker.clone(), reader, writer, peer, None));

    client.write_all(CONNECT).await.unwrap();
    expect(&mut client, &[0x20, 2, 0, 0]).await;
    let big: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
    let small = b"after idling again".to_vec();
    for (pkid, payload) in [(7u16, &big), (8, &small)] {
        // A PINGREQ after a quiet spell: the connection is idle after answering it.
        tokio::time::sleep(IDLE_AFTER + Duration::from_millis(100)).await;
        client.write_all(&[0xc0, 0]).await.unwrap();
        expect(&mut client, &[0xd0, 0]).await;
        let packet = publish_packet("t/big", pkid, payload);
        let (a, rest) = packet.split_at(3);
        let (b, c) = rest.split_at(rest.len() / 2);
        for piece in [a, b, c] {
            client.write_all(piece).await.unwrap();
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let [hi, lo] = pkid.to_be_bytes();
        expect(&mut client, &[0x40, 2, hi, lo]).await;
    }

    let d = broker.router.route("t/big", "c1");
    let records = broker.log.read(d.topic, d.partition, 0, 10).unwrap();
    let payloads: Vec<&[u8]> = records.iter().map(|r| &r.payload[..]).collect();
    assert_eq!(payloads, [&big[..], &small[..]]);

    drop(client);
    conn.await.unwrap();
    broker.appender.shutdown().await;
    drop(broker);
    appender_thread.join().unwrap().unwrap();
}

/// A subscriber with more deliveries waiting than one write buffer holds gets them all
/// without waiting for a timer: a connection that wrote a full buffer out pumps again by
/// itself. No publisher would wake it: one wakes a subscriber only when it adds to its
/// outbox, and a full outbox takes nothing (tests/bench/fanout with 4 KiB payloads: the
/// subscriber got 1,031 of 350,000 messages, 16 per tick of the 500 ms slow-subscriber check).
#[tokio::test]
async fn deliveries_beyond_one_write_buffer_go_out_without_waiting_for_a_timer() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _shutdown, appender_thread) = broker(dir.path());
    // Takes everything the connection writes at once, so each write buffer goes out whole.
    let (mut client, server) = tokio::io::duplex(8 << 20);
    let (reader, writer) = tokio::io::split(server);
    let peer = "127.0.0.1:1".parse().unwrap();
    let conn = tokio::spawn(serve(broker.clone(), reader, writer, peer, None));
    client.write_all(CONNECT).await.unwrap();
    expect(&mut client, &[0x20, 2, 0, 0]).await;
    // SUBSCRIBE to '#' at QoS 0, packet id 1.
    client
        .write_all(&[0x82, 6, 0, 1, 0, 1, b'#', 0])
        .await
        .unwrap();
    expect(&mut client, &[0x90, 3, 0, 1, 0]).await;

    // From here the clock moves only when every task waits for a timer.
    tokio::time::pause();
    let start = tokio::time::Instant::now();
    // Four times the connection's write buffer (64 KiB), well inside its outbox bound.
    const COUNT: usize = 64;
    let payload = Bytes::from(vec![0x5a; 4096]);
    for _ in 0..COUNT {
        broker.hub.deliver_now(Arc::new(Message {
            topic: Bytes::from_static(b"t/1"),
            payload: payload.clone(),
            qos: 0,
            retain: false,
            publisher: Arc::from(""),
            props: Default::default(),
            received_ms: 0,
        }));
    }
    for i in 0..COUNT {
        let mut head = [0u8; 1];
        client.read_exact(&mut head).await.unwrap();
        assert_eq!(head[0], 0x30, "delivery {i} is a QoS 0 PUBLISH");
        let (mut len, mut shift) = (0usize, 0);
        loop {
            client.read_exact(&mut head).await.unwrap();
            len |= usize::from(head[0] & 0x7f) << shift;
            shift += 7;
            if head[0] & 0x80 == 0 {
                break;
            }
        }
        let mut body = vec![0u8; len];
        client.read_exact(&mut body).await.unwrap();
        assert_eq!(&body[..5], &[0, 3, b't', b'/', b'1']);
        assert_eq!(&body[5..], &payload[..]);
    }
    assert!(
        start.elapsed() < Duration::from_millis(500),
        "the deliveries waited for a timer: {:?}",
        start.elapsed()
    );

    tokio::time::resume();
    drop(client);
    conn.await.unwrap();
    broker.appender.shutdown().await;
    drop(broker);
    appender_thread.join().unwrap().unwrap();
}

/// 3.1.1 CONNECT of client `id`, clean session, keepalive 60.
fn connect_packet(id: &str) -> Vec<u8> {
    let mut packet = vec![
        0x10,
        12 + id.len() as u8,
        0,
        4,
        b'M',
        b'Q',
        b'T',
        b'T',
        4,
        0x02,
        0,
        60,
    ];
    packet.extend_from_slice(&(id.len() as u16).to_be_bytes());
    packet.extend_from_slice(id.as_bytes());
    packet
}

/// A connection over an in-memory stream, connected as `id`.
async fn connected(
    broker: &Arc<Broker>,
    id: &str,
) -> (tokio::io::DuplexStream, tokio::task::JoinHandle<()>) {
    let (mut client, server) = tokio::io::duplex(64 * 1024);
    let (reader, writer) = tokio::io::split(server);
    let peer = "127.0.0.1:1".parse().unwrap();
    let conn = tokio::spawn(serve(broker.clone(), reader, writer, peer, None));
    client.write_all(&connect_packet(id)).await.unwrap();
    expect(&mut client, &[0x20, 2, 0, 0]).await;
    (client, conn)
}

/// A publisher's connection remembers where its topics go; a session that subscribes after
/// it began publishing still gets what it publishes after the SUBACK.
#[tokio::test]
async fn a_subscription_made_while_a_publisher_runs_gets_its_next_messages() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, _shutdown, appender_thread) = broker(dir.path());
    // A subscription elsewhere, so that the publisher plans (and remembers) its topic's.
    let (mut other, other_conn) = connected(&broker, "other").await;
    other
        .write_all(&[0x82, 10, 0, 1, 0, 5, b'o', b't', b'h', b'e', b'r', 0])
        .await
        .unwrap();
    expect(&mut other, &[0x90, 3, 0, 1, 0]).await;
    // Attached before the publisher plans: attaching makes plans change as well.
    let (mut sub, sub_conn) = connected(&broker, "s1").await;
    let (mut publisher, publisher_conn) = connected(&broker, "c1").await;
    publisher
        .write_all(&publish_packet("t/1", 1, b"before"))
        .await
        .unwrap();
    expect(&mut publisher, &[0x40, 2, 0, 1]).await;

    sub.write_all(&[0x82, 8, 0, 1, 0, 3, b't', b'/', b'#', 0])
        .await
        .unwrap();
    expect(&mut sub, &[0x90, 3, 0, 1, 0]).await;
    publisher
        .write_all(&publish_packet("t/1", 2, b"after"))
        .await
        .unwrap();
    expect(&mut publisher, &[0x40, 2, 0, 2]).await;
    expect(
        &mut sub,
        &[
            0x30, 10, 0, 3, b't', b'/', b'1', b'a', b'f', b't', b'e', b'r',
        ],
    )
    .await;

    for (client, conn) in [
        (other, other_conn),
        (publisher, publisher_conn),
        (sub, sub_conn),
    ] {
        drop(client);
        conn.await.unwrap();
    }
    broker.appender.shutdown().await;
    drop(broker);
    appender_thread.join().unwrap().unwrap();
}

fn future_size<F: FnOnce() -> T, T>(_make: &F) -> usize {
    std::mem::size_of::<T>()
}

/// What every idle connection holds for its whole life: its task (the `serve` future),
/// the boxed `serve_session` future and the `Connection`. Waits that happen once or only
/// under back-pressure are boxed apart; awaiting one inline again would show here.
#[test]
#[allow(unreachable_code, unused_variables, clippy::diverging_sub_expression)]
fn a_connections_lasting_state_stays_small() {
    use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
    type Tcp = Connection<OwnedReadHalf, OwnedWriteHalf>;
    let serve_size = future_size(&|| {
        let (reader, writer): (OwnedReadHalf, OwnedWriteHalf) = unimplemented!();
        serve(unimplemented!(), reader, writer, unimplemented!(), None)
    });
    let session_size = future_size(&|| {
        let opened: Box<Opened<OwnedReadHalf, OwnedWriteHalf>> = unimplemented!();
        serve_session(opened)
    });
    let connection_size = std::mem::size_of::<Tcp>();
    assert!(serve_size <= 256, "serve future: {serve_size} bytes");
    assert!(
        session_size <= 1280,
        "serve_session future: {session_size} bytes"
    );
    assert!(
        connection_size <= 1152,
        "Connection: {connection_size} bytes"
    );
}
