//! `$SYS/broker/...`: the broker's statistics as retained messages, under the topic names
//! Mosquitto uses, republished every `mqtt.sys_interval`. They are not written to the log.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;

use crate::log::appender::now_ms;
use crate::mqtt::delivery::Message;
use crate::mqtt::Broker;

/// The `$SYS` topics and their current values.
pub(crate) fn snapshot(broker: &Broker) -> Vec<(&'static str, String)> {
    let hub = &broker.hub;
    let s = &hub.stats;
    let (connected, disconnected) = broker.sessions.counts();
    let received = s.messages_received.load(Ordering::Relaxed).to_string();
    let sent = s.messages_sent.load(Ordering::Relaxed).to_string();
    vec![
        (
            "$SYS/broker/version",
            format!("tributary edge {}", env!("CARGO_PKG_VERSION")),
        ),
        (
            "$SYS/broker/uptime",
            format!("{} seconds", s.started.elapsed().as_secs()),
        ),
        ("$SYS/broker/clients/connected", connected.to_string()),
        ("$SYS/broker/clients/disconnected", disconnected.to_string()),
        (
            "$SYS/broker/clients/total",
            (connected + disconnected).to_string(),
        ),
        ("$SYS/broker/messages/received", received.clone()),
        ("$SYS/broker/messages/sent", sent.clone()),
        ("$SYS/broker/publish/messages/received", received),
        ("$SYS/broker/publish/messages/sent", sent),
        (
            "$SYS/broker/publish/messages/dropped",
            s.dropped.load(Ordering::Relaxed).to_string(),
        ),
        (
            "$SYS/broker/bytes/received",
            s.bytes_received.load(Ordering::Relaxed).to_string(),
        ),
        (
            "$SYS/broker/bytes/sent",
            s.bytes_sent.load(Ordering::Relaxed).to_string(),
        ),
        (
            "$SYS/broker/subscriptions/count",
            hub.subscription_count().to_string(),
        ),
        (
            "$SYS/broker/retained messages/count",
            hub.retained_count().to_string(),
        ),
    ]
}

/// Publishes the snapshot now and then every `every`, until aborted.
pub(crate) async fn publish_every(broker: Arc<Broker>, every: Duration) {
    let mut tick = tokio::time::interval(every);
    loop {
        tick.tick().await;
        let now = now_ms();
        for (topic, value) in snapshot(&broker) {
            let topic = Bytes::from_static(topic.as_bytes());
            let msg = Arc::new(Message {
                topic: topic.clone(),
                payload: Bytes::from(value.into_bytes()),
                qos: 0,
                retain: true,
                publisher: Arc::from(""),
                props: Default::default(),
                received_ms: now,
            });
            broker.hub.set_retained(topic, Some(msg.clone()));
            broker.hub.deliver_now(msg);
        }
    }
}
