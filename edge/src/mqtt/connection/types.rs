//! What the parts of a connection share: who the client is, why a connection closes, and
//! what waits for a commit. Imports nothing else from this folder.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::BytesMut;

use crate::mqtt::codec::{reason, AckKind, Version};
use crate::mqtt::delivery::{Delivery, Subscriber};
use crate::mqtt::limits::PacketRefused;
use crate::mqtt::session::Handover;
use crate::mqtt::Broker;

/// Time a closing connection gets to write its last packets to a peer that does not read.
pub(super) const FINAL_FLUSH: Duration = Duration::from_secs(2);

/// The client at the other end as its CONNECT settled it, and the broker it connected to:
/// what every part of the connection reads and none changes.
pub(super) struct Client {
    pub(super) broker: Arc<Broker>,
    pub(super) version: Version,
    pub(super) client_id: Arc<str>,
    pub(super) peer: SocketAddr,
    /// This session's delivery side.
    pub(super) sub: Arc<Subscriber>,
    /// 5.0 Request Problem Information.
    pub(super) problem_info: bool,
    /// 5.0 Maximum Packet Size the client accepts (`u32::MAX` when it set none): a packet
    /// larger than this goes without its optional properties, a PUBLISH not at all.
    pub(super) max_packet: u32,
}

/// What the client's CONNECT says it accepts: how the edge must send to it.
#[derive(Debug, Clone, Copy)]
pub(super) struct ReceiveLimits {
    /// Outbound QoS 1/2 publishes allowed unacknowledged.
    pub(super) inflight: usize,
    /// 5.0 Maximum Packet Size of the client.
    pub(super) max_packet: Option<usize>,
    /// 5.0 Topic Alias Maximum of the client.
    pub(super) topic_alias_maximum: u16,
}

/// Why the connection is being closed by the edge.
#[derive(Debug)]
pub(super) struct Close {
    /// 5.0 reason code for DISCONNECT (3.1.1 connections are just closed).
    pub(super) code: u8,
    pub(super) why: String,
    /// The limit a packet broke, counted when the connection closes.
    pub(super) refused: Option<PacketRefused>,
}

impl Close {
    pub(super) fn new(code: u8, why: impl Into<String>) -> Close {
        Close {
            code,
            why: why.into(),
            refused: None,
        }
    }

    /// A close for a packet over one of `[mqtt]`'s limits.
    pub(super) fn refused(kind: PacketRefused, code: u8, why: impl Into<String>) -> Close {
        Close {
            code,
            why: why.into(),
            refused: Some(kind),
        }
    }
}

/// Something written once the request it belongs to is committed.
#[derive(Debug)]
pub(super) enum Deferred {
    /// An acknowledgement.
    Ack(PendingAck),
    /// A pre-encoded packet (SUBACK, UNSUBACK).
    Packet(BytesMut),
    /// Retained messages for a new subscription, after its SUBACK.
    Deliver(Vec<Delivery>),
}

#[derive(Debug, Clone, Copy)]
pub(super) struct PendingAck {
    pub(super) kind: AckKind,
    pub(super) pkid: u16,
    pub(super) code: u8,
    /// Whether this acknowledges a publish appended to the log (counted in
    /// `awaiting_commit`).
    pub(super) logged: bool,
}

/// Tells a connection taking the client id over that this one has ended, however its task
/// ends (also when it is cancelled at shutdown).
pub(super) struct EndsHandover(pub(super) Arc<Handover>);

impl Drop for EndsHandover {
    fn drop(&mut self) {
        self.0.end();
    }
}

/// Checks a published topic name.
pub(super) fn validate_topic<'a>(
    topic: &'a [u8],
    cfg: &crate::config::MqttConfig,
) -> Result<&'a str, Close> {
    let text = std::str::from_utf8(topic)
        .map_err(|_| Close::new(reason::MALFORMED, "topic is not valid UTF-8"))?;
    if text.contains('\0') {
        return Err(Close::new(reason::MALFORMED, "topic contains U+0000"));
    }
    if text.contains(['+', '#']) {
        return Err(Close::new(
            reason::TOPIC_NAME_INVALID,
            format!("topic {text:?} contains a wildcard; wildcards are for subscriptions"),
        ));
    }
    if text.len() > cfg.max_topic_length {
        return Err(Close::refused(
            PacketRefused::TopicLength,
            reason::TOPIC_NAME_INVALID,
            format!(
                "topic is {} bytes, the limit is {}",
                text.len(),
                cfg.max_topic_length
            ),
        ));
    }
    if text.split('/').count() > cfg.max_topic_levels {
        return Err(Close::refused(
            PacketRefused::TopicLevels,
            reason::TOPIC_NAME_INVALID,
            format!("topic has more than {} levels", cfg.max_topic_levels),
        ));
    }
    Ok(text)
}
