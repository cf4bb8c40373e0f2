//! rumqttc (3.1.1 and 5.0) as a subscriber: what a publisher sends at QoS 0, 1 and 2 comes
//! back at that QoS, and a persistent session gets the QoS 1 and 2 messages published while
//! its client was away, on reconnection, without subscribing again.
//!
//! The tests run against the edge. With `CONFORMANCE_BROKER=mosquitto` they run against
//! Mosquitto instead, the reference broker the conformance suite (tests/conformance) is
//! checked against, so that a failure can be told apart from a wrong test.
#![allow(clippy::unwrap_used)] // test code: a failed unwrap is the report

use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tokio::sync::mpsc;
use tributary_tests::{free_port, Edge};

const WAIT: Duration = Duration::from_secs(20);

/// The broker under test.
enum Broker {
    Edge(Edge),
    Mosquitto {
        child: Child,
        _dir: tempfile::TempDir,
        addr: SocketAddr,
    },
}

impl Broker {
    fn start() -> Broker {
        match std::env::var("CONFORMANCE_BROKER").as_deref() {
            Ok("mosquitto") => Broker::mosquitto(),
            Ok("edge") | Err(_) => Broker::Edge(Edge::start("")),
            Ok(other) => panic!("CONFORMANCE_BROKER must be edge or mosquitto, not {other:?}"),
        }
    }

    fn mosquitto() -> Broker {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let conf = dir.path().join("mosquitto.conf");
        // Run as root, Mosquitto would switch to its own user; nothing here needs that.
        std::fs::write(
            &conf,
            format!("listener {port} 127.0.0.1\nallow_anonymous true\nuser root\n"),
        )
        .unwrap();
        let log = dir.path().join("mosquitto.log");
        let child = Command::new("mosquitto")
            .arg("-c")
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("mosquitto (tests/run installs it)");
        let addr: SocketAddr = format!("127.0.0.1:{port}").parse().unwrap();
        let deadline = Instant::now() + Duration::from_secs(10);
        while std::net::TcpStream::connect(addr).is_err() {
            assert!(
                Instant::now() < deadline,
                "mosquitto did not listen:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        Broker::Mosquitto {
            child,
            _dir: dir,
            addr,
        }
    }

    fn addr(&self) -> SocketAddr {
        match self {
            Broker::Edge(edge) => edge.addr,
            Broker::Mosquitto { addr, .. } => *addr,
        }
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Broker::Mosquitto { child, .. } = self {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A message as a subscriber saw it: topic, payload, QoS.
type Received = (String, Vec<u8>, u8);

/// The same client code for rumqttc's 3.1.1 and 5.0 clients, whose types differ.
macro_rules! rumqttc_client {
    ($module:ident, $client:path, $options:path, $event:path, $packet:path, $qos:path,
     $suback_code:path, persistent: |$opts:ident| $make_persistent:block) => {
        mod $module {
            use super::*;
            use rumqttc::Outgoing;
            use $client as Client;
            use $event as Event;
            use $options as Options;
            use $packet as Packet;
            use $qos as QoS;
            use $suback_code as SubAckCode;

            pub(super) fn qos(n: u8) -> QoS {
                match n {
                    0 => QoS::AtMostOnce,
                    1 => QoS::AtLeastOnce,
                    _ => QoS::ExactlyOnce,
                }
            }

            /// A connected client whose event loop runs in a task and reports here.
            pub(super) struct Connection {
                pub(super) client: Client,
                pub(super) events: mpsc::UnboundedReceiver<Event>,
                pub(super) session_present: bool,
            }

            pub(super) async fn connect(addr: SocketAddr, id: &str, persistent: bool) -> Connection {
                let mut $opts = Options::new(id, addr.ip().to_string(), addr.port());
                $opts.set_keep_alive(Duration::from_secs(30));
                if persistent $make_persistent
                let (client, mut eventloop) = Client::new($opts, 100);
                let (tx, mut events) = mpsc::unbounded_channel();
                tokio::spawn(async move {
                    while let Ok(event) = eventloop.poll().await {
                        let done = matches!(event, Event::Outgoing(Outgoing::Disconnect));
                        if tx.send(event).is_err() || done {
                            break;
                        }
                    }
                });
                let session_present = loop {
                    match next(&mut events, id).await {
                        Event::Incoming(Packet::ConnAck(ack)) => break ack.session_present,
                        _ => continue,
                    }
                };
                Connection {
                    client,
                    events,
                    session_present,
                }
            }

            async fn next(events: &mut mpsc::UnboundedReceiver<Event>, id: &str) -> Event {
                tokio::time::timeout(WAIT, events.recv())
                    .await
                    .unwrap_or_else(|_| panic!("{id}: nothing from the broker in {WAIT:?}"))
                    .unwrap_or_else(|| panic!("{id}: the connection ended"))
            }

            impl Connection {
                pub(super) async fn subscribe(&mut self, filter: &str, q: u8) {
                    self.client.subscribe(filter, qos(q)).await.unwrap();
                    loop {
                        if let Event::Incoming(Packet::SubAck(ack)) =
                            next(&mut self.events, filter).await
                        {
                            assert_eq!(
                                ack.return_codes,
                                vec![SubAckCode::Success(qos(q))],
                                "SUBACK for {filter}"
                            );
                            return;
                        }
                    }
                }

                /// Publishes and waits for the acknowledgement (QoS 0: for the send).
                pub(super) async fn publish(&mut self, topic: &str, q: u8, payload: &str) {
                    self.client
                        .publish(topic, qos(q), false, payload.as_bytes().to_vec())
                        .await
                        .unwrap();
                    loop {
                        match (q, next(&mut self.events, topic).await) {
                            (0, Event::Outgoing(Outgoing::Publish(_)))
                            | (1, Event::Incoming(Packet::PubAck(_)))
                            | (2, Event::Incoming(Packet::PubComp(_))) => return,
                            _ => continue,
                        }
                    }
                }

                /// The next `count` messages received.
                pub(super) async fn receive(&mut self, count: usize) -> Vec<Received> {
                    let mut got = Vec::new();
                    while got.len() < count {
                        if let Event::Incoming(Packet::Publish(p)) =
                            next(&mut self.events, "receive").await
                        {
                            got.push((
                                String::from_utf8_lossy(p.topic.as_ref()).into_owned(),
                                p.payload.to_vec(),
                                p.qos as u8,
                            ));
                        }
                    }
                    got
                }

                /// Sends DISCONNECT and waits until the event loop has sent it.
                pub(super) async fn disconnect(mut self) {
                    self.client.disconnect().await.unwrap();
                    while let Ok(Some(event)) =
                        tokio::time::timeout(WAIT, self.events.recv()).await
                    {
                        if matches!(event, Event::Outgoing(Outgoing::Disconnect)) {
                            return;
                        }
                    }
                    panic!("rumqttc did not send DISCONNECT");
                }
            }
        }
    };
}

rumqttc_client!(
    v4,
    rumqttc::AsyncClient,
    rumqttc::MqttOptions,
    rumqttc::Event,
    rumqttc::Packet,
    rumqttc::QoS,
    rumqttc::mqttbytes::v4::SubscribeReasonCode,
    persistent: |opts| {
        opts.set_clean_session(false);
    }
);

rumqttc_client!(
    v5,
    rumqttc::v5::AsyncClient,
    rumqttc::v5::MqttOptions,
    rumqttc::v5::Event,
    rumqttc::v5::mqttbytes::v5::Packet,
    rumqttc::v5::mqttbytes::QoS,
    rumqttc::v5::mqttbytes::v5::SubscribeReasonCode,
    persistent: |opts| {
        opts.set_clean_start(false);
        opts.set_session_expiry_interval(Some(300));
    }
);

/// Same steps for both protocol versions.
macro_rules! scenarios {
    ($round_trip:ident, $redelivery:ident, $m:ident, $tag:literal) => {
        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $round_trip() {
            let broker = Broker::start();
            let mut sub = $m::connect(broker.addr(), concat!($tag, "-sub"), false).await;
            let mut publisher = $m::connect(broker.addr(), concat!($tag, "-pub"), false).await;
            for q in 0..=2u8 {
                let filter = format!("rt/q{q}/#");
                sub.subscribe(&filter, q).await;
                let topic = format!("rt/q{q}/x");
                publisher.publish(&topic, q, &format!("at qos {q}")).await;
                let got = sub.receive(1).await;
                assert_eq!(
                    got,
                    vec![(topic, format!("at qos {q}").into_bytes(), q)],
                    "{} QoS {q}",
                    $tag
                );
            }
            sub.disconnect().await;
            publisher.disconnect().await;
        }

        #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
        async fn $redelivery() {
            let broker = Broker::start();
            let id = concat!($tag, "-persistent");
            let mut sub = $m::connect(broker.addr(), id, true).await;
            assert!(!sub.session_present, "a new session");
            sub.subscribe("ps/#", 2).await;
            sub.disconnect().await;

            let mut publisher = $m::connect(broker.addr(), concat!($tag, "-pub"), false).await;
            let mut sent = Vec::new();
            for i in 0..5 {
                for q in [1u8, 2] {
                    let topic = format!("ps/q{q}");
                    let payload = format!("{i} at qos {q}");
                    publisher.publish(&topic, q, &payload).await;
                    sent.push((topic, payload.into_bytes(), q));
                }
            }
            publisher.disconnect().await;

            let mut sub = $m::connect(broker.addr(), id, true).await;
            assert!(sub.session_present, "the session was kept");
            let mut got = sub.receive(sent.len()).await;
            got.sort();
            sent.sort();
            assert_eq!(got, sent, "every message published while away, at its QoS");
            sub.disconnect().await;
        }
    };
}

scenarios!(
    v311_round_trip_at_qos_0_1_2,
    v311_persistent_session_redelivers_after_reconnect,
    v4,
    "v311"
);
scenarios!(
    v5_round_trip_at_qos_0_1_2,
    v5_persistent_session_redelivers_after_reconnect,
    v5,
    "v5"
);
