//! One MQTT connection made with rumqttc, with MQTT 3.1.1 and 5.0 behind one interface.
//!
//! rumqttc has a separate client and event loop per protocol version with different packet
//! types; the device and verifier code only needs a handful of facts from them, which
//! [`SessionEvent`] carries.

use std::time::Duration;

use bytes::Bytes;
use rumqttc::v5::mqttbytes::v5 as v5b;
use rumqttc::{Outgoing, TlsConfiguration, Transport};

use crate::broker::{ConnectSettings, Protocol, SessionKind};

/// What a poll of the event loop produced, reduced to what the simulator acts on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionEvent {
    /// CONNACK accepted the connection.
    Connected {
        /// Whether the broker resumed a stored session.
        session_present: bool,
    },
    /// A PUBLISH was written to the socket (packet id 0 for QoS 0).
    PublishWritten {
        /// Packet id.
        pkid: u16,
    },
    /// rumqttc held a new PUBLISH back because its packet id is still unacknowledged; it is
    /// written (and reported as [`SessionEvent::PublishWritten`]) when that id is acknowledged.
    PublishDeferred {
        /// Packet id.
        pkid: u16,
    },
    /// PUBACK (QoS 1) or PUBREC (QoS 2) arrived.
    Acked {
        /// Packet id.
        pkid: u16,
        /// `Some(reason)` when an MQTT 5 broker refused the message (reason code >= 0x80).
        refused: Option<String>,
    },
    /// PUBCOMP arrived, ending a QoS 2 exchange.
    Completed {
        /// Packet id.
        pkid: u16,
    },
    /// A message arrived on a subscription.
    Message {
        /// Topic of the message.
        topic: Bytes,
        /// Payload of the message.
        payload: Bytes,
    },
    /// SUBACK arrived; `refused` when the broker refused the subscription.
    Subscribed {
        /// Whether a filter was refused.
        refused: bool,
    },
    /// Our DISCONNECT was written.
    DisconnectWritten,
    /// Anything else (pings, PUBREL, ...).
    Other,
}

/// Parameters of one connection beyond the fleet-wide [`ConnectSettings`].
#[derive(Debug, Clone)]
pub struct SessionParams {
    /// Client id.
    pub client_id: String,
    /// Clean or persistent session.
    pub session: SessionKind,
    /// Most QoS 1/2 publishes unacknowledged at once.
    pub inflight: u16,
    /// Capacity of the channel between the client handle and the event loop.
    pub request_capacity: usize,
}

/// The handle that queues requests for the event loop.
#[derive(Debug, Clone)]
pub enum SessionClient {
    /// MQTT 3.1.1.
    V4(rumqttc::AsyncClient),
    /// MQTT 5.0.
    V5(rumqttc::v5::AsyncClient),
}

/// The event loop that owns the socket; it must be polled for anything to happen.
pub enum SessionLoop {
    /// MQTT 3.1.1.
    V4(Box<rumqttc::EventLoop>),
    /// MQTT 5.0.
    V5(Box<rumqttc::v5::EventLoop>),
}

fn qos_v4(qos: u8) -> rumqttc::QoS {
    match qos {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos_v5(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    match qos {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// The largest packet MQTT can express; the simulator lets the broker decide what is too big.
const MAX_PACKET: usize = 268_435_455;

/// Creates the client handle and event loop of one connection (nothing is connected until the
/// loop is polled).
pub fn open(settings: &ConnectSettings, params: &SessionParams) -> (SessionClient, SessionLoop) {
    let transport = match &settings.tls {
        Some(config) => Transport::tls_with_config(TlsConfiguration::Rustls(config.clone())),
        None => Transport::tcp(),
    };
    let connect_timeout = settings.connect_timeout.as_secs().max(1);
    match settings.protocol {
        Protocol::V311 => {
            let mut options = rumqttc::MqttOptions::new(
                params.client_id.clone(),
                settings.url.host.clone(),
                settings.url.port,
            );
            options
                .set_transport(transport)
                .set_keep_alive(settings.keep_alive)
                .set_clean_session(params.session == SessionKind::Clean)
                .set_inflight(params.inflight.max(1))
                .set_max_packet_size(MAX_PACKET, MAX_PACKET);
            if let Some((user, password)) = &settings.credentials {
                options.set_credentials(user.clone(), password.clone());
            }
            let (client, mut eventloop) =
                rumqttc::AsyncClient::new(options, params.request_capacity);
            let mut network = rumqttc::NetworkOptions::new();
            network.set_connection_timeout(connect_timeout);
            eventloop.set_network_options(network);
            (
                SessionClient::V4(client),
                SessionLoop::V4(Box::new(eventloop)),
            )
        }
        Protocol::V5 => {
            let mut options = rumqttc::v5::MqttOptions::new(
                params.client_id.clone(),
                settings.url.host.clone(),
                settings.url.port,
            );
            options
                .set_transport(transport)
                .set_keep_alive(settings.keep_alive)
                .set_clean_start(params.session == SessionKind::Clean)
                // rumqttc sizes its in-flight table by this limit; without it every connection
                // would allocate room for 65,535 publishes.
                .set_outgoing_inflight_upper_limit(params.inflight.max(2))
                .set_connection_timeout(connect_timeout);
            if params.session == SessionKind::Persistent {
                let expiry = u32::try_from(settings.session_expiry.as_secs()).unwrap_or(u32::MAX);
                options.set_session_expiry_interval(Some(expiry));
            }
            if let Some((user, password)) = &settings.credentials {
                options.set_credentials(user.clone(), password.clone());
            }
            let (client, eventloop) =
                rumqttc::v5::AsyncClient::new(options, params.request_capacity);
            (
                SessionClient::V5(client),
                SessionLoop::V5(Box::new(eventloop)),
            )
        }
    }
}

impl SessionClient {
    /// Queues a PUBLISH without waiting; fails only when the request channel is full or closed.
    pub fn try_publish(&self, topic: &str, qos: u8, payload: Vec<u8>) -> Result<(), String> {
        match self {
            SessionClient::V4(client) => client
                .try_publish(topic, qos_v4(qos), false, payload)
                .map_err(|e| e.to_string()),
            SessionClient::V5(client) => client
                .try_publish(topic, qos_v5(qos), false, payload)
                .map_err(|e| e.to_string()),
        }
    }

    /// Queues a SUBSCRIBE.
    pub async fn subscribe(&self, filter: &str, qos: u8) -> Result<(), String> {
        match self {
            SessionClient::V4(client) => client
                .subscribe(filter, qos_v4(qos))
                .await
                .map_err(|e| e.to_string()),
            SessionClient::V5(client) => client
                .subscribe(filter, qos_v5(qos))
                .await
                .map_err(|e| e.to_string()),
        }
    }

    /// Queues a DISCONNECT; ignored when the loop is gone.
    pub fn try_disconnect(&self) {
        // A full or closed channel means the connection is going away anyway.
        let _ = match self {
            SessionClient::V4(client) => client.try_disconnect().map_err(|e| e.to_string()),
            SessionClient::V5(client) => client.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

fn outgoing(event: Outgoing) -> SessionEvent {
    match event {
        Outgoing::Publish(pkid) => SessionEvent::PublishWritten { pkid },
        Outgoing::AwaitAck(pkid) => SessionEvent::PublishDeferred { pkid },
        Outgoing::Disconnect => SessionEvent::DisconnectWritten,
        _ => SessionEvent::Other,
    }
}

impl SessionLoop {
    /// Drives the connection until the next event; connects (again) when not connected.
    pub async fn poll(&mut self) -> Result<SessionEvent, String> {
        match self {
            SessionLoop::V4(eventloop) => {
                use rumqttc::{Event, Packet};
                let event = eventloop.poll().await.map_err(|e| e.to_string())?;
                Ok(match event {
                    Event::Incoming(Packet::ConnAck(ack)) => SessionEvent::Connected {
                        session_present: ack.session_present,
                    },
                    Event::Incoming(Packet::PubAck(ack)) => SessionEvent::Acked {
                        pkid: ack.pkid,
                        refused: None,
                    },
                    Event::Incoming(Packet::PubRec(rec)) => SessionEvent::Acked {
                        pkid: rec.pkid,
                        refused: None,
                    },
                    Event::Incoming(Packet::PubComp(comp)) => {
                        SessionEvent::Completed { pkid: comp.pkid }
                    }
                    Event::Incoming(Packet::Publish(publish)) => SessionEvent::Message {
                        topic: Bytes::from(publish.topic.into_bytes()),
                        payload: publish.payload,
                    },
                    Event::Incoming(Packet::SubAck(ack)) => SessionEvent::Subscribed {
                        refused: ack
                            .return_codes
                            .iter()
                            .any(|c| matches!(c, rumqttc::SubscribeReasonCode::Failure)),
                    },
                    Event::Incoming(_) => SessionEvent::Other,
                    Event::Outgoing(event) => outgoing(event),
                })
            }
            SessionLoop::V5(eventloop) => {
                use rumqttc::v5::Event;
                use v5b::{Packet, PubAckReason, PubRecReason};
                let event = eventloop.poll().await.map_err(|e| e.to_string())?;
                Ok(match event {
                    Event::Incoming(Packet::ConnAck(ack)) => SessionEvent::Connected {
                        session_present: ack.session_present,
                    },
                    Event::Incoming(Packet::PubAck(ack)) => SessionEvent::Acked {
                        pkid: ack.pkid,
                        refused: match ack.reason {
                            PubAckReason::Success | PubAckReason::NoMatchingSubscribers => None,
                            other => Some(format!("PUBACK {other:?}")),
                        },
                    },
                    Event::Incoming(Packet::PubRec(rec)) => SessionEvent::Acked {
                        pkid: rec.pkid,
                        refused: match rec.reason {
                            PubRecReason::Success | PubRecReason::NoMatchingSubscribers => None,
                            other => Some(format!("PUBREC {other:?}")),
                        },
                    },
                    Event::Incoming(Packet::PubComp(comp)) => {
                        SessionEvent::Completed { pkid: comp.pkid }
                    }
                    Event::Incoming(Packet::Publish(publish)) => SessionEvent::Message {
                        topic: publish.topic,
                        payload: publish.payload,
                    },
                    Event::Incoming(Packet::SubAck(ack)) => SessionEvent::Subscribed {
                        refused: ack
                            .return_codes
                            .iter()
                            .any(|c| !matches!(c, v5b::SubscribeReasonCode::Success(_))),
                    },
                    Event::Incoming(_) => SessionEvent::Other,
                    Event::Outgoing(event) => outgoing(event),
                })
            }
        }
    }

    /// Drops the socket at once, as a device losing power or network would; the next poll
    /// reconnects. Unacknowledged publishes move to rumqttc's pending list.
    pub fn drop_connection(&mut self) {
        match self {
            SessionLoop::V4(eventloop) => eventloop.clean(),
            SessionLoop::V5(eventloop) => eventloop.clean(),
        }
    }

    /// Packet ids of the PUBLISH requests rumqttc will send first after a reconnect, in order
    /// (0 for a publish that never got an id).
    pub fn pending_publish_ids(&self) -> Vec<u16> {
        match self {
            SessionLoop::V4(eventloop) => eventloop
                .pending
                .iter()
                .filter_map(|r| match r {
                    rumqttc::Request::Publish(p) => Some(p.pkid),
                    _ => None,
                })
                .collect(),
            SessionLoop::V5(eventloop) => eventloop
                .pending
                .iter()
                .filter_map(|r| match r {
                    rumqttc::v5::Request::Publish(p) => Some(p.pkid),
                    _ => None,
                })
                .collect(),
        }
    }
}

/// Default connect timeout when none is configured.
pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
