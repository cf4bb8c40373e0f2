//! MQTT 3.1.1 and 5.0 on one port, through rumqttc's codecs.
//!
//! The protocol level is read from the CONNECT packet; after that every packet of the
//! connection is decoded with the codec of that version into the version-neutral [`Inbound`]
//! the connection state machine works with, and answers are written with the same codec.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::{self as mb, v4};
use rumqttc::v5::mqttbytes::{self as mb5, v5};

pub use mb::QoS;

/// MQTT protocol version of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    /// 3.1.1 (protocol level 4).
    V311,
    /// 5.0 (protocol level 5).
    V5,
}

/// Why bytes from a client could not be decoded.
#[derive(Debug, thiserror::Error)]
pub enum DecodeError {
    /// A packet larger than the maximum packet size.
    #[error("packet of {0} bytes exceeds the maximum packet size")]
    TooLarge(usize),
    /// The bytes are not a valid packet.
    #[error("malformed packet: {0}")]
    Malformed(String),
    /// The CONNECT names a protocol level this broker does not speak.
    #[error("unsupported protocol {name:?} level {level}")]
    UnsupportedProtocol {
        /// Protocol name.
        name: String,
        /// Protocol level.
        level: u8,
    },
    /// The first packet is not a CONNECT.
    #[error("the first packet must be CONNECT, got packet type {0}")]
    NotConnect(u8),
}

/// CONNECT, version-neutral.
#[derive(Debug, Clone)]
pub struct ConnectIn {
    /// Version.
    pub version: Version,
    /// Client identifier as sent (may be empty).
    pub client_id: String,
    /// 3.1.1 clean session / 5.0 clean start.
    pub clean_start: bool,
    /// Keepalive in seconds.
    pub keep_alive: u16,
    /// 5.0 Session Expiry Interval (absent = 0).
    pub session_expiry: u32,
    /// 5.0 Receive Maximum of the client (absent = 65,535).
    pub receive_maximum: u16,
    /// 5.0 Maximum Packet Size the client accepts.
    pub max_packet_size: Option<u32>,
    /// 5.0 Topic Alias Maximum of the client (absent = 0: no outbound aliases).
    pub topic_alias_maximum: u16,
    /// 5.0 Request Problem Information (absent = true).
    pub request_problem_info: bool,
    /// 5.0 Authentication Method: the client asks for enhanced authentication (4.12).
    pub auth_method: Option<String>,
    /// Will message.
    pub will: Option<WillIn>,
    /// User Name (absent or empty: none).
    pub username: Option<String>,
    /// Password (absent or empty: none).
    pub password: Option<String>,
}

/// User name and password of a CONNECT, an empty one counting as absent.
fn credentials(username: String, password: String) -> (Option<String>, Option<String>) {
    let some = |s: String| (!s.is_empty()).then_some(s);
    (some(username), some(password))
}

/// The will of a CONNECT.
#[derive(Debug, Clone)]
pub struct WillIn {
    /// Will topic.
    pub topic: Bytes,
    /// Will payload.
    pub payload: Bytes,
    /// Will QoS.
    pub qos: QoS,
    /// Will retain.
    pub retain: bool,
    /// 5.0 Will Delay Interval in seconds.
    pub delay: u32,
    /// 5.0 message properties of the will.
    pub props: MessageProps,
}

/// MQTT 5 properties a message carries from publisher to subscribers.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MessageProps {
    /// Payload Format Indicator.
    pub payload_format: Option<u8>,
    /// Message Expiry Interval in seconds.
    pub message_expiry: Option<u32>,
    /// Content Type.
    pub content_type: Option<String>,
    /// Response Topic.
    pub response_topic: Option<String>,
    /// Correlation Data.
    pub correlation_data: Option<Bytes>,
    /// User properties, in order.
    pub user_properties: Vec<(String, String)>,
}

impl MessageProps {
    /// Whether no property is set.
    pub fn is_empty(&self) -> bool {
        self.payload_format.is_none()
            && self.message_expiry.is_none()
            && self.content_type.is_none()
            && self.response_topic.is_none()
            && self.correlation_data.is_none()
            && self.user_properties.is_empty()
    }
}

/// Options of one subscription as requested (3.1.1 uses the QoS only).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct SubscribeOptions {
    /// Maximum QoS.
    pub qos: u8,
    /// 5.0 No Local.
    pub no_local: bool,
    /// 5.0 Retain As Published.
    pub retain_as_published: bool,
    /// 5.0 Retain Handling (0, 1 or 2).
    pub retain_handling: u8,
}

/// SUBSCRIBE, version-neutral.
#[derive(Debug, Clone)]
pub struct SubscribeIn {
    /// Packet id.
    pub pkid: u16,
    /// Filters with their options, in order.
    pub filters: Vec<(String, SubscribeOptions)>,
    /// 5.0 Subscription Identifier.
    pub id: Option<u32>,
}

/// PUBLISH, version-neutral.
#[derive(Debug, Clone)]
pub struct PublishIn {
    /// QoS.
    pub qos: QoS,
    /// Retain flag.
    pub retain: bool,
    /// Duplicate flag.
    pub dup: bool,
    /// Topic bytes as sent (may be empty with a topic alias).
    pub topic: Bytes,
    /// Packet id (0 for QoS 0).
    pub pkid: u16,
    /// Body.
    pub payload: Bytes,
    /// 5.0 topic alias.
    pub topic_alias: Option<u16>,
    /// 5.0 message properties passed to subscribers.
    pub props: MessageProps,
}

/// A decoded packet from a client.
#[derive(Debug)]
pub enum Inbound {
    /// CONNECT.
    Connect(Box<ConnectIn>),
    /// PUBLISH.
    Publish(PublishIn),
    /// PUBACK.
    PubAck(u16),
    /// PUBREC with its 5.0 reason code.
    PubRec(u16, u8),
    /// PUBREL.
    PubRel(u16),
    /// PUBCOMP.
    PubComp(u16),
    /// SUBSCRIBE.
    Subscribe(SubscribeIn),
    /// UNSUBSCRIBE: packet id and filters.
    Unsubscribe(u16, Vec<String>),
    /// PINGREQ.
    PingReq,
    /// DISCONNECT with its 5.0 reason code and Session Expiry Interval.
    Disconnect {
        /// Reason code (0 for 3.1.1).
        reason: u8,
        /// New Session Expiry Interval, if given.
        session_expiry: Option<u32>,
    },
    /// 5.0 AUTH.
    Auth,
    /// A packet a client must not send (CONNACK, SUBACK, ...).
    ServerOnly(&'static str),
}

/// Detects the protocol of the CONNECT at the start of `buf` without consuming it.
/// `Ok(None)`: not enough bytes yet.
pub fn detect_version(buf: &[u8], max_packet_size: usize) -> Result<Option<Version>, DecodeError> {
    if buf.is_empty() {
        return Ok(None);
    }
    if buf[0] >> 4 != 1 {
        return Err(DecodeError::NotConnect(buf[0] >> 4));
    }
    let header = match mb::check(buf.iter(), max_packet_size) {
        Ok(h) => h,
        Err(mb::Error::InsufficientBytes(_)) => {
            // The variable header may already be here even if the payload is not.
            return peek_version(buf);
        }
        Err(mb::Error::PayloadSizeLimitExceeded(n)) => return Err(DecodeError::TooLarge(n)),
        Err(e) => return Err(DecodeError::Malformed(e.to_string())),
    };
    let _ = header;
    peek_version(buf)
}

/// The protocol of the CONNECT whose start is in `buf`, from its variable header alone (the
/// rest may be missing or too large). `Ok(None)`: not enough bytes yet.
pub fn peek_version(buf: &[u8]) -> Result<Option<Version>, DecodeError> {
    // Fixed header: 1 byte + 1..4 bytes of remaining length.
    let mut i = 1;
    while i < buf.len() && i < 5 && buf[i] & 0x80 != 0 {
        i += 1;
    }
    if i >= 5 {
        return Err(DecodeError::Malformed("remaining length too long".into()));
    }
    let vh = i + 1;
    if buf.len() < vh + 2 {
        return Ok(None);
    }
    let name_len = u16::from_be_bytes([buf[vh], buf[vh + 1]]) as usize;
    if buf.len() < vh + 2 + name_len + 1 {
        return Ok(None);
    }
    let name = String::from_utf8_lossy(&buf[vh + 2..vh + 2 + name_len]).into_owned();
    let level = buf[vh + 2 + name_len];
    match (name.as_str(), level) {
        ("MQTT", 4) => Ok(Some(Version::V311)),
        ("MQTT", 5) => Ok(Some(Version::V5)),
        _ => Err(DecodeError::UnsupportedProtocol { name, level }),
    }
}

/// Decodes the next packet from `buf`, consuming its bytes. `Ok(None)`: incomplete.
pub fn decode(
    version: Version,
    buf: &mut BytesMut,
    max_packet_size: usize,
) -> Result<Option<Inbound>, DecodeError> {
    // Total size check; rumqttc's own check counts the remaining length only.
    let frame_length = match mb::check(buf.iter(), max_packet_size) {
        Ok(h) if h.frame_length() > max_packet_size => {
            return Err(DecodeError::TooLarge(h.frame_length()))
        }
        Ok(h) => h.frame_length(),
        Err(mb::Error::InsufficientBytes(_)) => return Ok(None),
        Err(mb::Error::PayloadSizeLimitExceeded(n)) => return Err(DecodeError::TooLarge(n)),
        Err(e) => return Err(DecodeError::Malformed(e.to_string())),
    };
    check_frame(version, &buf[..frame_length])?;
    // A 5.0 AUTH, which rumqttc's reader does not know. The edge never takes part in
    // enhanced authentication (a CONNECT asking for it is refused), so only its framing
    // matters: a well-formed one is a protocol error, not a malformed packet.
    if version == Version::V5 && buf[0] >> 4 == 15 {
        if buf[0] & 0x0F != 0 {
            return Err(malformed("AUTH with reserved flags set"));
        }
        let _ = buf.split_to(frame_length);
        return Ok(Some(Inbound::Auth));
    }
    // Acknowledgements without a reason code are the most frequent packets from a busy
    // subscriber: read them without the general decoder.
    if buf.len() >= 4 && buf[1] == 2 {
        let pkid = u16::from_be_bytes([buf[2], buf[3]]);
        let ack = match buf[0] {
            0x40 => Some(Inbound::PubAck(pkid)),
            0x50 => Some(Inbound::PubRec(pkid, 0)),
            0x62 => Some(Inbound::PubRel(pkid)),
            0x70 => Some(Inbound::PubComp(pkid)),
            _ => None,
        };
        if let Some(ack) = ack {
            if pkid == 0 {
                return Err(malformed("packet identifier 0"));
            }
            let _ = buf.split_to(4);
            return Ok(Some(ack));
        }
    }
    // PUBLISH is the hot packet: its usual form (no 5.0 properties) is read here, as slices of
    // the frame, without the general reader's intermediate packet and, for 3.1.1, its copy of
    // the topic. Every other form, malformed ones included, goes to the general reader, which
    // words the errors.
    if buf[0] >> 4 == 3 {
        if let Some(p) = read_plain_publish(version, buf, frame_length) {
            return Ok(Some(Inbound::Publish(p)));
        }
    }
    match version {
        Version::V311 => decode_v4(buf, max_packet_size),
        Version::V5 => decode_v5(buf, max_packet_size),
    }
    .map(Some)
}

/// What a packet reader running out of bytes means once [`decode`] has the whole frame: a
/// field runs past the packet's end, which is malformed, not incomplete.
fn past_end() -> DecodeError {
    malformed("a field runs past the end of the packet")
}

/// A PUBLISH of `frame_length` bytes at the start of `buf` in its usual form: a valid QoS, a
/// topic within the packet (UTF-8 for 3.1.1, as the general reader checks; 5.0 topics are
/// checked when routed), a non-zero packet id for QoS 1 and 2, and for 5.0 no properties.
/// `None` (nothing consumed) for any other form.
fn read_plain_publish(
    version: Version,
    buf: &mut BytesMut,
    frame_length: usize,
) -> Option<PublishIn> {
    let frame = &buf[..frame_length];
    let first = frame[0];
    let qos = match (first >> 1) & 0x03 {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => return None,
    };
    let mut at = body_start(frame);
    if at == frame_length {
        return None;
    }
    let topic_len = u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?) as usize;
    let topic_at = at + 2;
    let topic = frame.get(topic_at..topic_at + topic_len)?;
    if version == Version::V311 && std::str::from_utf8(topic).is_err() {
        return None;
    }
    at = topic_at + topic_len;
    let pkid = if qos == QoS::AtMostOnce {
        0
    } else {
        let id = u16::from_be_bytes(frame.get(at..at + 2)?.try_into().ok()?);
        if id == 0 {
            return None;
        }
        at += 2;
        id
    };
    if version == Version::V5 {
        if *frame.get(at)? != 0 {
            return None;
        }
        at += 1;
    }
    let frame = buf.split_to(frame_length).freeze();
    Some(PublishIn {
        qos,
        retain: first & 0x01 != 0,
        dup: first & 0x08 != 0,
        topic: frame.slice(topic_at..topic_at + topic_len),
        pkid,
        payload: frame.slice(at..),
        topic_alias: None,
        props: MessageProps::default(),
    })
}

/// Where the variable header of a whole frame starts: past the first byte and the Remaining
/// Length, which the caller validated.
fn body_start(frame: &[u8]) -> usize {
    let mut at = 1;
    while frame.get(at).is_some_and(|b| b & 0x80 != 0) {
        at += 1;
    }
    at + 1
}

fn malformed(e: impl std::fmt::Display) -> DecodeError {
    DecodeError::Malformed(e.to_string())
}

/// What rumqttc's reader lets through and the specifications call malformed, checked on
/// one whole packet: reserved fixed header flags [MQTT-2.1.3-1] (PUBREL, SUBSCRIBE and
/// UNSUBSCRIBE carry 0010, PUBLISH its own flags, every other packet 0000), the reserved
/// CONNECT flag [MQTT-3.1.2-3] (and in 3.1.1 a password without a user name,
/// [MQTT-3.1.2-22]), reserved bits of subscription options [MQTT-3.8.3-5] (3.1.1:
/// [MQTT-3.8.3-4]) and U+0000 in the topic filters of SUBSCRIBE and UNSUBSCRIBE
/// [MQTT-1.5.4-2] (3.1.1: [MQTT-1.5.3-2]). Anything shorter than its fields is left to
/// the packet reader, which refuses it.
fn check_frame(version: Version, frame: &[u8]) -> Result<(), DecodeError> {
    let kind = frame[0] >> 4;
    let flags = frame[0] & 0x0F;
    let expected = match kind {
        3 => None,
        6 | 8 | 10 => Some(0x02),
        _ => Some(0),
    };
    if expected.is_some_and(|e| e != flags) {
        return Err(malformed(format!(
            "packet type {kind} with fixed header flags {flags:#06b}"
        )));
    }
    let body = frame.get(body_start(frame)..).unwrap_or_default();
    match kind {
        1 => check_connect_flags(version, body),
        8 | 10 => check_filters(version, kind == 8, body),
        _ => Ok(()),
    }
}

fn check_connect_flags(version: Version, body: &[u8]) -> Result<(), DecodeError> {
    let Some(name_len) = body
        .get(..2)
        .map(|b| u16::from_be_bytes([b[0], b[1]]) as usize)
    else {
        return Ok(());
    };
    let Some(&flags) = body.get(2 + name_len + 1) else {
        return Ok(());
    };
    if flags & 0x01 != 0 {
        return Err(malformed("CONNECT with the reserved flag set"));
    }
    if version == Version::V311 && flags & 0x40 != 0 && flags & 0x80 == 0 {
        return Err(malformed("3.1.1 CONNECT with a password but no user name"));
    }
    Ok(())
}

fn check_filters(version: Version, subscribe: bool, body: &[u8]) -> Result<(), DecodeError> {
    let mut at = 2;
    if version == Version::V5 {
        // Skip the properties: a Variable Byte Integer length, then that many bytes.
        let (mut len, mut shift) = (0usize, 0);
        loop {
            let Some(&b) = body.get(at) else {
                return Ok(());
            };
            at += 1;
            len |= ((b & 0x7F) as usize) << shift;
            shift += 7;
            if b & 0x80 == 0 || shift > 21 {
                break;
            }
        }
        at += len;
    }
    while let Some(n) = body.get(at..at + 2) {
        let n = u16::from_be_bytes([n[0], n[1]]) as usize;
        let Some(filter) = body.get(at + 2..at + 2 + n) else {
            return Ok(());
        };
        if filter.contains(&0) {
            return Err(malformed("a topic filter with U+0000"));
        }
        at += 2 + n;
        if subscribe {
            let Some(&options) = body.get(at) else {
                return Ok(());
            };
            at += 1;
            let bad = match version {
                Version::V311 => options & 0xFC != 0,
                Version::V5 => options & 0xC0 != 0 || (options >> 4) & 0x03 == 3,
            };
            if bad || options & 0x03 == 3 {
                return Err(malformed(format!("subscription options {options:#010b}")));
            }
        }
    }
    Ok(())
}

fn decode_v4(buf: &mut BytesMut, max: usize) -> Result<Inbound, DecodeError> {
    let packet = match v4::Packet::read(buf, max) {
        Ok(p) => p,
        Err(mb::Error::InsufficientBytes(_)) => return Err(past_end()),
        Err(e) => return Err(malformed(e)),
    };
    Ok(match packet {
        v4::Packet::Connect(c) => {
            let (username, password) = c
                .login
                .map_or((None, None), |l| credentials(l.username, l.password));
            Inbound::Connect(Box::new(ConnectIn {
                version: Version::V311,
                client_id: c.client_id,
                clean_start: c.clean_session,
                keep_alive: c.keep_alive,
                session_expiry: if c.clean_session { 0 } else { u32::MAX },
                receive_maximum: u16::MAX,
                max_packet_size: None,
                topic_alias_maximum: 0,
                request_problem_info: true,
                auth_method: None,
                will: c.last_will.map(|w| WillIn {
                    topic: Bytes::from(w.topic.into_bytes()),
                    payload: w.message,
                    qos: w.qos,
                    retain: w.retain,
                    delay: 0,
                    props: MessageProps::default(),
                }),
                username,
                password,
            }))
        }
        v4::Packet::Publish(p) => Inbound::Publish(PublishIn {
            qos: p.qos,
            retain: p.retain,
            dup: p.dup,
            topic: Bytes::from(p.topic.into_bytes()),
            pkid: p.pkid,
            payload: p.payload,
            topic_alias: None,
            props: MessageProps::default(),
        }),
        v4::Packet::PubAck(a) => Inbound::PubAck(a.pkid),
        v4::Packet::PubRec(a) => Inbound::PubRec(a.pkid, 0),
        v4::Packet::PubRel(a) => Inbound::PubRel(a.pkid),
        v4::Packet::PubComp(a) => Inbound::PubComp(a.pkid),
        v4::Packet::Subscribe(s) => Inbound::Subscribe(SubscribeIn {
            pkid: s.pkid,
            filters: s
                .filters
                .into_iter()
                .map(|f| {
                    (
                        f.path,
                        SubscribeOptions {
                            qos: f.qos as u8,
                            ..Default::default()
                        },
                    )
                })
                .collect(),
            id: None,
        }),
        v4::Packet::Unsubscribe(u) => {
            if u.topics.is_empty() {
                return Err(malformed("UNSUBSCRIBE without a topic filter"));
            }
            Inbound::Unsubscribe(u.pkid, u.topics)
        }
        v4::Packet::PingReq => Inbound::PingReq,
        v4::Packet::Disconnect => Inbound::Disconnect {
            reason: 0,
            session_expiry: None,
        },
        v4::Packet::ConnAck(_) => Inbound::ServerOnly("CONNACK"),
        v4::Packet::SubAck(_) => Inbound::ServerOnly("SUBACK"),
        v4::Packet::UnsubAck(_) => Inbound::ServerOnly("UNSUBACK"),
        v4::Packet::PingResp => Inbound::ServerOnly("PINGRESP"),
    })
}

fn decode_v5(buf: &mut BytesMut, max: usize) -> Result<Inbound, DecodeError> {
    // A 5.0 DISCONNECT may leave out its property length (Remaining Length 1: the length is
    // then 0 [MQTT-3.14.2.2.1]) and its reason code too (Remaining Length 0: 0x00). rumqttc's
    // reader refuses both.
    if buf.len() >= 2 && buf[0] == 0xE0 && buf[1] <= 1 && buf.len() >= 2 + buf[1] as usize {
        let code = if buf[1] == 1 { buf[2] } else { 0 };
        if v5::DisconnectReasonCode::try_from(code).is_err() {
            return Err(malformed(format!("DISCONNECT reason code {code:#04x}")));
        }
        let _ = buf.split_to(2 + buf[1] as usize);
        return Ok(Inbound::Disconnect {
            reason: code,
            session_expiry: None,
        });
    }
    let packet = match v5::Packet::read(buf, Some(max as u32)) {
        Ok(p) => p,
        Err(mb5::Error::InsufficientBytes(_)) => return Err(past_end()),
        Err(e) => return Err(malformed(e)),
    };
    Ok(match packet {
        v5::Packet::Connect(c, will, login) => {
            let (username, password) =
                login.map_or((None, None), |l| credentials(l.username, l.password));
            let props = c.properties.unwrap_or_default();
            if props.receive_maximum == Some(0) {
                return Err(malformed("Receive Maximum 0"));
            }
            if props.max_packet_size == Some(0) {
                return Err(malformed("Maximum Packet Size 0"));
            }
            Inbound::Connect(Box::new(ConnectIn {
                version: Version::V5,
                client_id: c.client_id,
                clean_start: c.clean_start,
                keep_alive: c.keep_alive,
                session_expiry: props.session_expiry_interval.unwrap_or(0),
                receive_maximum: props.receive_maximum.unwrap_or(u16::MAX),
                max_packet_size: props.max_packet_size,
                topic_alias_maximum: props.topic_alias_max.unwrap_or(0),
                request_problem_info: props.request_problem_info != Some(0),
                auth_method: props.authentication_method.clone(),
                will: will.map(|w| {
                    let p = w.properties.unwrap_or(v5::LastWillProperties {
                        delay_interval: None,
                        payload_format_indicator: None,
                        message_expiry_interval: None,
                        content_type: None,
                        response_topic: None,
                        correlation_data: None,
                        user_properties: Vec::new(),
                    });
                    WillIn {
                        topic: w.topic,
                        payload: w.message,
                        qos: qos_from5(w.qos),
                        retain: w.retain,
                        delay: p.delay_interval.unwrap_or(0),
                        props: MessageProps {
                            payload_format: p.payload_format_indicator,
                            message_expiry: p.message_expiry_interval,
                            content_type: p.content_type,
                            response_topic: p.response_topic,
                            correlation_data: p.correlation_data,
                            user_properties: p.user_properties,
                        },
                    }
                }),
                username,
                password,
            }))
        }
        v5::Packet::Publish(p) => {
            let props = p.properties.unwrap_or_default();
            if !props.subscription_identifiers.is_empty() {
                return Err(malformed(
                    "a PUBLISH from a client carries a Subscription Identifier",
                ));
            }
            Inbound::Publish(PublishIn {
                qos: qos_from5(p.qos),
                retain: p.retain,
                dup: p.dup,
                topic: p.topic,
                pkid: p.pkid,
                payload: p.payload,
                topic_alias: props.topic_alias,
                props: MessageProps {
                    payload_format: props.payload_format_indicator,
                    message_expiry: props.message_expiry_interval,
                    content_type: props.content_type,
                    response_topic: props.response_topic,
                    correlation_data: props.correlation_data,
                    user_properties: props.user_properties,
                },
            })
        }
        v5::Packet::PubAck(a) => Inbound::PubAck(a.pkid),
        v5::Packet::PubRec(a) => Inbound::PubRec(a.pkid, pubrec_code(&a.reason)),
        v5::Packet::PubRel(a) => Inbound::PubRel(a.pkid),
        v5::Packet::PubComp(a) => Inbound::PubComp(a.pkid),
        v5::Packet::Subscribe(s) => {
            let id = match s.properties.as_ref().and_then(|p| p.id) {
                Some(0) => return Err(malformed("Subscription Identifier 0")),
                Some(id) if id > 268_435_455 => {
                    return Err(malformed("Subscription Identifier too large"))
                }
                Some(id) => Some(id as u32),
                None => None,
            };
            Inbound::Subscribe(SubscribeIn {
                pkid: s.pkid,
                filters: s
                    .filters
                    .into_iter()
                    .map(|f| {
                        (
                            f.path,
                            SubscribeOptions {
                                qos: f.qos as u8,
                                no_local: f.nolocal,
                                retain_as_published: f.preserve_retain,
                                retain_handling: match f.retain_forward_rule {
                                    v5::RetainForwardRule::OnEverySubscribe => 0,
                                    v5::RetainForwardRule::OnNewSubscribe => 1,
                                    v5::RetainForwardRule::Never => 2,
                                },
                            },
                        )
                    })
                    .collect(),
                id,
            })
        }
        v5::Packet::Unsubscribe(u) => {
            if u.filters.is_empty() {
                return Err(malformed("UNSUBSCRIBE without a topic filter"));
            }
            Inbound::Unsubscribe(u.pkid, u.filters)
        }
        v5::Packet::PingReq(_) => Inbound::PingReq,
        v5::Packet::Disconnect(d) => Inbound::Disconnect {
            reason: d.reason_code as u8,
            session_expiry: d.properties.and_then(|p| p.session_expiry_interval),
        },
        v5::Packet::Auth(_) => Inbound::Auth,
        v5::Packet::ConnAck(_) => Inbound::ServerOnly("CONNACK"),
        v5::Packet::SubAck(_) => Inbound::ServerOnly("SUBACK"),
        v5::Packet::UnsubAck(_) => Inbound::ServerOnly("UNSUBACK"),
        v5::Packet::PingResp(_) => Inbound::ServerOnly("PINGRESP"),
    })
}

fn qos_from5(q: mb5::QoS) -> QoS {
    match q {
        mb5::QoS::AtMostOnce => QoS::AtMostOnce,
        mb5::QoS::AtLeastOnce => QoS::AtLeastOnce,
        mb5::QoS::ExactlyOnce => QoS::ExactlyOnce,
    }
}

fn pubrec_code(r: &v5::PubRecReason) -> u8 {
    use v5::PubRecReason as R;
    match r {
        R::Success => 0x00,
        R::NoMatchingSubscribers => 0x10,
        R::UnspecifiedError => 0x80,
        R::ImplementationSpecificError => 0x83,
        R::NotAuthorized => 0x87,
        R::TopicNameInvalid => 0x90,
        R::PacketIdentifierInUse => 0x91,
        R::QuotaExceeded => 0x97,
        R::PayloadFormatInvalid => 0x99,
    }
}

/// MQTT 5 reason codes the edge sends (3.1.1 maps them to its return codes or a close).
pub mod reason {
    /// Success (also: granted QoS 0).
    pub const SUCCESS: u8 = 0x00;
    /// Disconnect with Will Message (from a client).
    pub const DISCONNECT_WITH_WILL: u8 = 0x04;
    /// No matching subscribers (PUBACK/PUBREC).
    pub const NO_MATCHING_SUBSCRIBERS: u8 = 0x10;
    /// No subscription existed (UNSUBACK).
    pub const NO_SUBSCRIPTION_EXISTED: u8 = 0x11;
    /// Unspecified error.
    pub const UNSPECIFIED: u8 = 0x80;
    /// Malformed packet.
    pub const MALFORMED: u8 = 0x81;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u8 = 0x82;
    /// Implementation specific error.
    pub const IMPLEMENTATION_SPECIFIC: u8 = 0x83;
    /// Unsupported protocol version.
    pub const UNSUPPORTED_PROTOCOL: u8 = 0x84;
    /// Client identifier not valid.
    pub const CLIENT_ID_NOT_VALID: u8 = 0x85;
    /// Bad user name or password (CONNACK).
    pub const BAD_USER_NAME_OR_PASSWORD: u8 = 0x86;
    /// Server busy.
    pub const SERVER_BUSY: u8 = 0x89;
    /// Server shutting down.
    pub const SERVER_SHUTTING_DOWN: u8 = 0x8B;
    /// Keep alive timeout.
    pub const KEEP_ALIVE_TIMEOUT: u8 = 0x8D;
    /// Session taken over.
    pub const SESSION_TAKEN_OVER: u8 = 0x8E;
    /// Not authorized.
    pub const NOT_AUTHORIZED: u8 = 0x87;
    /// Bad authentication method (an Authentication Method the edge does not support).
    pub const BAD_AUTHENTICATION_METHOD: u8 = 0x8C;
    /// Topic filter invalid.
    pub const TOPIC_FILTER_INVALID: u8 = 0x8F;
    /// Topic name invalid.
    pub const TOPIC_NAME_INVALID: u8 = 0x90;
    /// Packet identifier in use.
    pub const PACKET_ID_IN_USE: u8 = 0x91;
    /// Packet identifier not found.
    pub const PACKET_ID_NOT_FOUND: u8 = 0x92;
    /// Receive maximum exceeded.
    pub const RECEIVE_MAXIMUM_EXCEEDED: u8 = 0x93;
    /// Topic alias invalid.
    pub const TOPIC_ALIAS_INVALID: u8 = 0x94;
    /// Packet too large.
    pub const PACKET_TOO_LARGE: u8 = 0x95;
    /// Message rate too high.
    pub const MESSAGE_RATE_TOO_HIGH: u8 = 0x96;
    /// Quota exceeded.
    pub const QUOTA_EXCEEDED: u8 = 0x97;
}

/// What the edge announces in a 5.0 CONNACK.
#[derive(Debug, Clone, Default)]
pub struct ConnAckInfo {
    /// Session present flag.
    pub session_present: bool,
    /// Reason code (5.0 codes; mapped for 3.1.1).
    pub reason: u8,
    /// Assigned client identifier.
    pub assigned_client_id: Option<String>,
    /// Server Keep Alive.
    pub server_keep_alive: Option<u16>,
    /// Receive Maximum.
    pub receive_maximum: u16,
    /// Maximum Packet Size.
    pub max_packet_size: u32,
    /// Topic Alias Maximum.
    pub topic_alias_maximum: u16,
    /// Reason string.
    pub reason_string: Option<String>,
}

/// Writes a CONNACK, without its Reason String if that would make it larger than
/// `max_packet`, the client's Maximum Packet Size (MQTT-3.2.2-19).
pub fn write_connack(version: Version, info: &ConnAckInfo, max_packet: usize, out: &mut BytesMut) {
    let start = out.len();
    write_connack_once(version, info, out);
    if out.len() - start > max_packet && info.reason_string.is_some() {
        out.truncate(start);
        let bare = ConnAckInfo {
            reason_string: None,
            ..info.clone()
        };
        write_connack_once(version, &bare, out);
    }
}

fn write_connack_once(version: Version, info: &ConnAckInfo, out: &mut BytesMut) {
    match version {
        Version::V311 => {
            let code = match info.reason {
                reason::SUCCESS => v4::ConnectReturnCode::Success,
                reason::UNSUPPORTED_PROTOCOL => v4::ConnectReturnCode::RefusedProtocolVersion,
                reason::CLIENT_ID_NOT_VALID => v4::ConnectReturnCode::BadClientId,
                reason::SERVER_BUSY => v4::ConnectReturnCode::ServiceUnavailable,
                reason::BAD_USER_NAME_OR_PASSWORD => v4::ConnectReturnCode::BadUserNamePassword,
                _ => v4::ConnectReturnCode::NotAuthorized,
            };
            v4::ConnAck::new(code, info.session_present && info.reason == reason::SUCCESS)
                .write(out)
                .expect("CONNACK encodes");
        }
        Version::V5 => {
            let code = match info.reason {
                reason::SUCCESS => v5::ConnectReturnCode::Success,
                reason::MALFORMED => v5::ConnectReturnCode::MalformedPacket,
                reason::PROTOCOL_ERROR => v5::ConnectReturnCode::ProtocolError,
                reason::UNSUPPORTED_PROTOCOL => v5::ConnectReturnCode::UnsupportedProtocolVersion,
                reason::CLIENT_ID_NOT_VALID => v5::ConnectReturnCode::ClientIdentifierNotValid,
                reason::SERVER_BUSY => v5::ConnectReturnCode::ServerBusy,
                reason::PACKET_TOO_LARGE => v5::ConnectReturnCode::PacketTooLarge,
                reason::QUOTA_EXCEEDED => v5::ConnectReturnCode::QuotaExceeded,
                reason::TOPIC_NAME_INVALID => v5::ConnectReturnCode::TopicNameInvalid,
                reason::BAD_USER_NAME_OR_PASSWORD => v5::ConnectReturnCode::BadUserNamePassword,
                reason::NOT_AUTHORIZED => v5::ConnectReturnCode::NotAuthorized,
                reason::BAD_AUTHENTICATION_METHOD => v5::ConnectReturnCode::BadAuthenticationMethod,
                _ => v5::ConnectReturnCode::UnspecifiedError,
            };
            let properties = (info.reason == reason::SUCCESS).then(|| v5::ConnAckProperties {
                session_expiry_interval: None,
                receive_max: Some(info.receive_maximum),
                max_qos: None,
                retain_available: None,
                max_packet_size: Some(info.max_packet_size),
                assigned_client_identifier: info.assigned_client_id.clone(),
                topic_alias_max: Some(info.topic_alias_maximum),
                reason_string: info.reason_string.clone(),
                user_properties: Vec::new(),
                wildcard_subscription_available: None,
                subscription_identifiers_available: None,
                shared_subscription_available: None,
                server_keep_alive: info.server_keep_alive,
                response_information: None,
                server_reference: None,
                authentication_method: None,
                authentication_data: None,
            });
            let properties = properties.or_else(|| {
                info.reason_string.clone().map(|s| v5::ConnAckProperties {
                    reason_string: Some(s),
                    ..empty_connack_props()
                })
            });
            v5::ConnAck {
                session_present: info.session_present && info.reason == reason::SUCCESS,
                code,
                properties,
            }
            .write(out)
            .expect("CONNACK encodes");
        }
    }
}

fn empty_connack_props() -> v5::ConnAckProperties {
    v5::ConnAckProperties {
        session_expiry_interval: None,
        receive_max: None,
        max_qos: None,
        retain_available: None,
        max_packet_size: None,
        assigned_client_identifier: None,
        topic_alias_max: None,
        reason_string: None,
        user_properties: Vec::new(),
        wildcard_subscription_available: None,
        subscription_identifiers_available: None,
        shared_subscription_available: None,
        server_keep_alive: None,
        response_information: None,
        server_reference: None,
        authentication_method: None,
        authentication_data: None,
    }
}

/// The acknowledgements the edge sends for inbound publishes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// PUBACK (QoS 1).
    PubAck,
    /// PUBREC (QoS 2, first half).
    PubRec,
    /// PUBCOMP (QoS 2, second half).
    PubComp,
    /// PUBREL (outbound QoS 2, after the subscriber's PUBREC).
    PubRel,
}

/// Writes PUBACK / PUBREC / PUBCOMP. 3.1.1 has no reason codes; callers close the connection
/// instead of sending a failure to a 3.1.1 client.
pub fn write_ack(version: Version, kind: AckKind, pkid: u16, code: u8, out: &mut BytesMut) {
    // Hand-encoded: these are the hot path (one per publish) and have a fixed shape; a
    // reason code of 0 with no properties may be omitted in 5.0, which every client accepts.
    let type_byte = match kind {
        AckKind::PubAck => 0x40,
        AckKind::PubRec => 0x50,
        AckKind::PubComp => 0x70,
        AckKind::PubRel => 0x62,
    };
    let [hi, lo] = pkid.to_be_bytes();
    if version == Version::V311 || code == reason::SUCCESS {
        out.extend_from_slice(&[type_byte, 2, hi, lo]);
    } else {
        out.extend_from_slice(&[type_byte, 3, hi, lo, code]);
    }
}

/// Writes PINGRESP.
pub fn write_pingresp(out: &mut BytesMut) {
    out.extend_from_slice(&[0xD0, 0]);
}

/// Writes a SUBACK with one reason code per filter (5.0 codes; 3.1.1 gets the granted QoS
/// or 0x80 Failure), without its Reason String if that would make it larger than
/// `max_packet`, the client's Maximum Packet Size (MQTT-3.9.2-1).
pub fn write_suback(
    version: Version,
    pkid: u16,
    codes: &[u8],
    reason_string: Option<&str>,
    max_packet: usize,
    out: &mut BytesMut,
) {
    let start = out.len();
    write_sub_or_unsub_ack(0x90, version, pkid, codes, reason_string, out);
    if out.len() - start > max_packet && reason_string.is_some() {
        out.truncate(start);
        write_sub_or_unsub_ack(0x90, version, pkid, codes, None, out);
    }
}

/// Writes an UNSUBACK (5.0: one reason code per filter; 3.1.1 has none).
pub fn write_unsuback(version: Version, pkid: u16, codes: &[u8], out: &mut BytesMut) {
    write_sub_or_unsub_ack(0xB0, version, pkid, codes, None, out);
}

fn write_sub_or_unsub_ack(
    type_byte: u8,
    version: Version,
    pkid: u16,
    codes: &[u8],
    reason_string: Option<&str>,
    out: &mut BytesMut,
) {
    let mut body = Vec::with_capacity(4 + codes.len());
    body.extend_from_slice(&pkid.to_be_bytes());
    match version {
        Version::V311 => {
            if type_byte == 0x90 {
                body.extend(codes.iter().map(|&c| if c <= 2 { c } else { 0x80 }));
            }
        }
        Version::V5 => {
            let mut props = Vec::new();
            if let Some(r) = reason_string {
                props.push(0x1F);
                put_str(&mut props, r.as_bytes());
            }
            put_varint(&mut body, props.len());
            body.extend_from_slice(&props);
            body.extend_from_slice(codes);
        }
    }
    out.extend_from_slice(&[type_byte]);
    put_varint(out, body.len());
    out.extend_from_slice(&body);
}

/// An outbound PUBLISH.
#[derive(Debug, Clone, Copy)]
pub struct OutPublish<'a> {
    /// Topic name; empty when a 5.0 topic alias already set stands for it.
    pub topic: &'a [u8],
    /// 5.0 topic alias to set or use.
    pub alias: Option<u16>,
    /// Packet id (QoS 1 and 2).
    pub pkid: u16,
    /// Delivered QoS.
    pub qos: u8,
    /// Retain flag as delivered.
    pub retain: bool,
    /// Duplicate flag (a resend).
    pub dup: bool,
    /// Message properties (5.0 only).
    pub props: &'a MessageProps,
    /// Remaining Message Expiry Interval (replaces the published one).
    pub expiry_left: Option<u32>,
    /// Subscription identifiers of the matching subscriptions (5.0 only).
    pub sub_ids: &'a [u32],
    /// Body.
    pub payload: &'a [u8],
}

fn publish_props<S: Sink>(p: &OutPublish<'_>, out: &mut S) {
    if let Some(f) = p.props.payload_format {
        out.put(&[0x01, f]);
    }
    if let Some(e) = p.expiry_left {
        out.put(&[0x02]);
        out.put(&e.to_be_bytes());
    }
    if let Some(ct) = &p.props.content_type {
        out.put(&[0x03]);
        put_str(out, ct.as_bytes());
    }
    if let Some(rt) = &p.props.response_topic {
        out.put(&[0x08]);
        put_str(out, rt.as_bytes());
    }
    if let Some(cd) = &p.props.correlation_data {
        out.put(&[0x09]);
        put_str(out, cd);
    }
    for &id in p.sub_ids {
        out.put(&[0x0B]);
        put_varint(out, id as usize);
    }
    if let Some(a) = p.alias {
        out.put(&[0x23]);
        out.put(&a.to_be_bytes());
    }
    for (k, v) in &p.props.user_properties {
        out.put(&[0x26]);
        put_str(out, k.as_bytes());
        put_str(out, v.as_bytes());
    }
}

/// Bytes of a PUBLISH's properties and of their length, and the PUBLISH's Remaining Length.
fn publish_lengths(version: Version, p: &OutPublish<'_>) -> (usize, usize) {
    let mut remaining = 2 + p.topic.len() + p.payload.len() + if p.qos > 0 { 2 } else { 0 };
    let mut props = Count(0);
    if version == Version::V5 {
        publish_props(p, &mut props);
        remaining += varint_len(props.0) + props.0;
    }
    (props.0, remaining)
}

/// Writes a PUBLISH; returns its size in bytes. Nothing is allocated but room in `out`:
/// this runs once per message delivered.
pub fn write_publish(version: Version, p: &OutPublish<'_>, out: &mut BytesMut) -> usize {
    let (props_len, remaining) = publish_lengths(version, p);
    let start = out.len();
    out.reserve(remaining + 5);
    let flags = (u8::from(p.dup && p.qos > 0) << 3) | (p.qos << 1) | u8::from(p.retain);
    out.put(&[0x30 | flags]);
    put_varint(out, remaining);
    put_str(out, p.topic);
    if p.qos > 0 {
        out.put(&p.pkid.to_be_bytes());
    }
    if version == Version::V5 {
        put_varint(out, props_len);
        publish_props(p, out);
    }
    out.put(p.payload);
    out.len() - start
}

/// Size in bytes of the PUBLISH [`write_publish`] would write.
pub fn publish_size(version: Version, p: &OutPublish<'_>) -> usize {
    let (_, remaining) = publish_lengths(version, p);
    1 + varint_len(remaining) + remaining
}

fn varint_len(n: usize) -> usize {
    match n {
        0..=127 => 1,
        128..=16_383 => 2,
        16_384..=2_097_151 => 3,
        _ => 4,
    }
}

/// Where packet fields are written: a buffer, or a count of the bytes they take.
trait Sink {
    fn put(&mut self, bytes: &[u8]);
}

impl Sink for Vec<u8> {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

impl Sink for BytesMut {
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// A [`Sink`] that only counts.
struct Count(usize);

impl Sink for Count {
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
}

/// Writes a Variable Byte Integer (at most 4 bytes for the values MQTT allows).
fn put_varint<S: Sink>(out: &mut S, mut n: usize) {
    debug_assert!(n < 1 << 28, "{n} does not fit a Variable Byte Integer");
    let mut v = [0u8; 4];
    let mut len = 0;
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        v[len] = b;
        len += 1;
        if n == 0 || len == v.len() {
            break;
        }
    }
    out.put(&v[..len]);
}

/// A PUBLISH frame with first byte `first` (type, flags), for tests: `pkid` is written for
/// QoS 1 and 2, and for 5.0 an empty property list.
#[cfg(test)]
pub(crate) fn publish_frame(
    version: Version,
    first: u8,
    topic: &[u8],
    pkid: u16,
    payload: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    body.extend_from_slice(&(topic.len() as u16).to_be_bytes());
    body.extend_from_slice(topic);
    if (first >> 1) & 0x03 != 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    if version == Version::V5 {
        body.push(0);
    }
    body.extend_from_slice(payload);
    let mut frame = vec![first];
    put_varint(&mut frame, body.len());
    frame.extend_from_slice(&body);
    frame
}

fn put_str<S: Sink>(out: &mut S, s: &[u8]) {
    out.put(&(s.len() as u16).to_be_bytes());
    out.put(s);
}

/// Writes a 5.0 DISCONNECT with a reason code and reason string (nothing for 3.1.1, where the
/// server closes the connection without a packet). The reason string is left out if it
/// would make the packet larger than `max_packet`, the client's Maximum Packet Size
/// (MQTT-3.14.2-3).
pub fn write_disconnect(
    version: Version,
    code: u8,
    why: &str,
    max_packet: usize,
    out: &mut BytesMut,
) {
    if version == Version::V311 {
        return;
    }
    let Some(reason_code) = disconnect_reason(code) else {
        return;
    };
    let start = out.len();
    v5::Disconnect {
        reason_code,
        properties: Some(v5::DisconnectProperties {
            session_expiry_interval: None,
            reason_string: Some(why.to_string()),
            user_properties: Vec::new(),
            server_reference: None,
        }),
    }
    .write(out)
    .expect("DISCONNECT encodes");
    if out.len() - start > max_packet {
        out.truncate(start);
        v5::Disconnect {
            reason_code,
            properties: None,
        }
        .write(out)
        .expect("DISCONNECT encodes");
    }
}

fn disconnect_reason(code: u8) -> Option<v5::DisconnectReasonCode> {
    use v5::DisconnectReasonCode as D;
    Some(match code {
        reason::SUCCESS => D::NormalDisconnection,
        reason::UNSPECIFIED => D::UnspecifiedError,
        reason::MALFORMED => D::MalformedPacket,
        reason::PROTOCOL_ERROR => D::ProtocolError,
        reason::IMPLEMENTATION_SPECIFIC => D::ImplementationSpecificError,
        reason::SERVER_BUSY => D::ServerBusy,
        reason::SERVER_SHUTTING_DOWN => D::ServerShuttingDown,
        reason::KEEP_ALIVE_TIMEOUT => D::KeepAliveTimeout,
        reason::SESSION_TAKEN_OVER => D::SessionTakenOver,
        reason::TOPIC_NAME_INVALID => D::TopicNameInvalid,
        reason::RECEIVE_MAXIMUM_EXCEEDED => D::ReceiveMaximumExceeded,
        reason::TOPIC_ALIAS_INVALID => D::TopicAliasInvalid,
        reason::PACKET_TOO_LARGE => D::PacketTooLarge,
        reason::MESSAGE_RATE_TOO_HIGH => D::MessageRateTooHigh,
        reason::QUOTA_EXCEEDED => D::QuotaExceeded,
        reason::NOT_AUTHORIZED => D::NotAuthorized,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn connect_bytes(version: Version, id: &str) -> BytesMut {
        let mut out = BytesMut::new();
        match version {
            Version::V311 => {
                v4::Connect::new(id).write(&mut out).unwrap();
            }
            Version::V5 => {
                v5::Connect {
                    keep_alive: 30,
                    client_id: id.to_string(),
                    clean_start: true,
                    properties: None,
                }
                .write(&None, &None, &mut out)
                .unwrap();
            }
        }
        out
    }

    #[test]
    fn detects_both_versions_from_connect() {
        for v in [Version::V311, Version::V5] {
            let bytes = connect_bytes(v, "dev");
            assert_eq!(detect_version(&bytes, 1 << 20).unwrap(), Some(v));
            // Half a header is not enough to tell.
            assert_eq!(detect_version(&bytes[..3], 1 << 20).unwrap(), None);
            let mut buf = bytes.clone();
            match decode(v, &mut buf, 1 << 20).unwrap().unwrap() {
                Inbound::Connect(c) => assert_eq!(c.client_id, "dev"),
                other => panic!("{other:?}"),
            }
            assert!(buf.is_empty());
        }
    }

    /// A 5.0 DISCONNECT of its reason code alone (no property length) is read as that code;
    /// an unknown code is malformed.
    #[test]
    fn v5_disconnect_with_a_reason_code_and_no_properties_is_read() {
        for code in [0x00, 0x04, 0x80] {
            let mut buf = BytesMut::from(&[0xE0, 0x01, code, 0xC0, 0x00][..]);
            match decode(Version::V5, &mut buf, 1024).unwrap().unwrap() {
                Inbound::Disconnect {
                    reason,
                    session_expiry,
                } => assert_eq!((reason, session_expiry), (code, None)),
                other => panic!("{other:?}"),
            }
            assert_eq!(&buf[..], &[0xC0, 0x00], "the next packet is left");
        }
        let mut buf = BytesMut::from(&[0xE0, 0x01, 0x03][..]);
        assert!(matches!(
            decode(Version::V5, &mut buf, 1024),
            Err(DecodeError::Malformed(_))
        ));
    }

    #[test]
    fn v5_disconnect_without_reason_code_is_normal() {
        let mut buf = BytesMut::from(&[0xE0, 0x00][..]);
        match decode(Version::V5, &mut buf, 1024).unwrap().unwrap() {
            Inbound::Disconnect { reason, .. } => assert_eq!(reason, 0),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn short_acks_decode_in_both_versions() {
        for v in [Version::V311, Version::V5] {
            let mut buf = BytesMut::from(&[0x40, 2, 0, 7, 0x50, 2, 1, 0, 0x62, 2, 0, 9][..]);
            assert!(matches!(
                decode(v, &mut buf, 1024),
                Ok(Some(Inbound::PubAck(7)))
            ));
            assert!(matches!(
                decode(v, &mut buf, 1024),
                Ok(Some(Inbound::PubRec(256, 0)))
            ));
            assert!(matches!(
                decode(v, &mut buf, 1024),
                Ok(Some(Inbound::PubRel(9)))
            ));
            assert!(buf.is_empty());
            let mut zero = BytesMut::from(&[0x70, 2, 0, 0][..]);
            assert!(decode(v, &mut zero, 1024).is_err());
        }
    }

    #[test]
    fn reserved_bits_the_reader_would_let_through_are_malformed() {
        let bad: [(Version, &[u8]); 9] = [
            (Version::V311, &[0x80, 6, 0, 1, 0, 1, b't', 1]),
            (Version::V5, &[0xA0, 5, 0, 1, 0, 0, 1]),
            (Version::V311, &[0x60, 2, 0, 1]),
            (Version::V311, &[0xC1, 0]),
            (Version::V5, &[0xE1, 0]),
            (Version::V311, &[0x82, 6, 0, 1, 0, 1, b't', 0x41]),
            (Version::V5, &[0x82, 7, 0, 1, 0, 0, 1, b't', 0x81]),
            (Version::V5, &[0x82, 7, 0, 1, 0, 0, 1, 0, 0x01]),
            (
                Version::V311,
                &[0x10, 12, 0, 4, b'M', b'Q', b'T', b'T', 4, 0x03, 0, 60, 0, 0],
            ),
        ];
        for (v, bytes) in bad {
            let mut buf = BytesMut::from(bytes);
            assert!(
                matches!(decode(v, &mut buf, 1024), Err(DecodeError::Malformed(_))),
                "{bytes:02x?}"
            );
        }
        let mut good = BytesMut::from(&[0x82, 7, 0, 1, 0, 0, 1, b't', 0x2E][..]);
        assert!(matches!(
            decode(Version::V5, &mut good, 1024),
            Ok(Some(Inbound::Subscribe(_)))
        ));
    }

    #[test]
    fn first_packet_must_be_connect() {
        assert!(matches!(
            detect_version(&[0x30, 0x00], 1024),
            Err(DecodeError::NotConnect(3))
        ));
    }

    #[test]
    fn mqtt_3_1_is_unsupported() {
        let mut b = vec![0x10, 0x0c, 0x00, 0x06];
        b.extend_from_slice(b"MQIsdp");
        b.extend_from_slice(&[3, 2, 0, 10]);
        assert!(matches!(
            detect_version(&b, 1024),
            Err(DecodeError::UnsupportedProtocol { level: 3, .. })
        ));
    }

    #[test]
    fn oversize_packet_is_refused_before_it_arrives() {
        // PUBLISH announcing 1 MiB of remaining length, with only the header present.
        let mut buf = BytesMut::from(&[0x30, 0x80, 0x80, 0x40][..]);
        assert!(matches!(
            decode(Version::V311, &mut buf, 64 * 1024),
            Err(DecodeError::TooLarge(_))
        ));
    }

    #[test]
    fn a_v5_auth_packet_decodes_as_auth() {
        // AUTH 0x18 (continue authentication) with an Authentication Method, then a PINGREQ.
        let mut buf = BytesMut::from(
            &[
                0xF0, 0x07, 0x18, 0x05, 0x15, 0x00, 0x02, b'x', b'y', 0xC0, 0x00,
            ][..],
        );
        assert!(matches!(
            decode(Version::V5, &mut buf, 1024),
            Ok(Some(Inbound::Auth))
        ));
        assert!(matches!(
            decode(Version::V5, &mut buf, 1024),
            Ok(Some(Inbound::PingReq))
        ));
        let mut flags = BytesMut::from(&[0xF1, 0x00][..]);
        assert!(matches!(
            decode(Version::V5, &mut flags, 1024),
            Err(DecodeError::Malformed(_))
        ));
        let mut v311 = BytesMut::from(&[0xF0, 0x00][..]);
        assert!(decode(Version::V311, &mut v311, 1024).is_err());
    }

    #[test]
    fn reason_strings_are_dropped_past_the_client_maximum_packet_size() {
        let why = "a reason string that does not fit";
        let mut full = BytesMut::new();
        write_disconnect(Version::V5, reason::MALFORMED, why, usize::MAX, &mut full);
        let mut tight = BytesMut::new();
        write_disconnect(
            Version::V5,
            reason::MALFORMED,
            why,
            full.len() - 1,
            &mut tight,
        );
        assert!(tight.len() < full.len() && tight.len() <= 4, "{tight:?}");
        assert_eq!(tight[2], reason::MALFORMED);

        let mut full = BytesMut::new();
        write_suback(Version::V5, 7, &[0x8F], Some(why), usize::MAX, &mut full);
        let mut tight = BytesMut::new();
        write_suback(
            Version::V5,
            7,
            &[0x8F],
            Some(why),
            full.len() - 1,
            &mut tight,
        );
        assert_eq!(&tight[..], &[0x90, 4, 0, 7, 0, 0x8F]);

        let refusal = ConnAckInfo {
            reason: reason::NOT_AUTHORIZED,
            reason_string: Some(why.into()),
            ..Default::default()
        };
        let mut full = BytesMut::new();
        write_connack(Version::V5, &refusal, usize::MAX, &mut full);
        let mut tight = BytesMut::new();
        write_connack(Version::V5, &refusal, full.len() - 1, &mut tight);
        assert!(tight.len() < full.len(), "{tight:?}");
        assert_eq!(tight[3], reason::NOT_AUTHORIZED);
    }

    #[test]
    fn acks_encode_as_the_codec_reads_them() {
        let mut out = BytesMut::new();
        write_ack(
            Version::V5,
            AckKind::PubAck,
            7,
            reason::QUOTA_EXCEEDED,
            &mut out,
        );
        let p = v5::Packet::read(&mut out, None).unwrap();
        match p {
            v5::Packet::PubAck(a) => {
                assert_eq!(a.pkid, 7);
                assert_eq!(a.reason, v5::PubAckReason::QuotaExceeded);
            }
            other => panic!("{other:?}"),
        }
        let mut out = BytesMut::new();
        write_ack(Version::V311, AckKind::PubComp, 9, 0, &mut out);
        assert_eq!(
            v4::Packet::read(&mut out, 100).unwrap(),
            v4::Packet::PubComp(v4::PubComp::new(9))
        );
    }

    /// Every PUBLISH shape the edge sends is read back by an independent reader with the same
    /// fields, and `publish_size` is the size written: Remaining Lengths and property
    /// lengths across the Variable Byte Integer boundaries, every property, both versions.
    #[test]
    fn publishes_encode_as_an_independent_reader_reads_them() {
        let full = MessageProps {
            payload_format: Some(1),
            message_expiry: Some(60),
            content_type: Some("application/json".into()),
            response_topic: Some("reply/to".into()),
            correlation_data: Some(Bytes::from_static(b"corr")),
            user_properties: vec![("k".into(), "v".repeat(200))],
        };
        let none = MessageProps::default();
        for payload_len in [0usize, 1, 100, 127, 128, 16_383, 16_384, 2_097_152] {
            let payload = vec![0xA5u8; payload_len];
            for (props, expiry_left, sub_ids, alias) in [
                (&none, None, &[][..], None),
                (
                    &full,
                    Some(59),
                    &[1u32, 128, 16_384, 268_435_455][..],
                    Some(3u16),
                ),
            ] {
                for qos in [0u8, 1, 2] {
                    let publish = OutPublish {
                        topic: b"plant/line-1/temp",
                        alias,
                        pkid: if qos > 0 { 513 } else { 0 },
                        qos,
                        retain: qos == 1,
                        dup: qos == 2,
                        props,
                        expiry_left,
                        sub_ids,
                        payload: &payload,
                    };
                    let mut out = BytesMut::from(&b"ahead"[..]);
                    let n = write_publish(Version::V5, &publish, &mut out);
                    assert_eq!(n, out.len() - 5);
                    assert_eq!(n, publish_size(Version::V5, &publish));
                    let _ = out.split_to(5);
                    let p = match v5::Packet::read(&mut out, None).unwrap() {
                        v5::Packet::Publish(p) => p,
                        other => panic!("{other:?}"),
                    };
                    assert!(out.is_empty());
                    assert_eq!(&p.topic[..], publish.topic);
                    assert_eq!(p.pkid, publish.pkid);
                    assert_eq!(p.qos as u8, qos);
                    assert_eq!((p.retain, p.dup), (qos == 1, qos == 2));
                    assert_eq!(&p.payload[..], &payload[..]);
                    let got = p.properties.unwrap_or_default();
                    assert_eq!(got.payload_format_indicator, props.payload_format);
                    assert_eq!(got.message_expiry_interval, expiry_left);
                    assert_eq!(got.content_type, props.content_type);
                    assert_eq!(got.response_topic, props.response_topic);
                    assert_eq!(got.correlation_data, props.correlation_data);
                    assert_eq!(got.user_properties, props.user_properties);
                    assert_eq!(got.topic_alias, alias);
                    let ids: Vec<u32> = got
                        .subscription_identifiers
                        .iter()
                        .map(|&i| i as u32)
                        .collect();
                    assert_eq!(ids, sub_ids);

                    let mut out = BytesMut::new();
                    let n = write_publish(Version::V311, &publish, &mut out);
                    assert_eq!(n, out.len());
                    assert_eq!(n, publish_size(Version::V311, &publish));
                    match v4::Packet::read(&mut out, usize::MAX).unwrap() {
                        v4::Packet::Publish(p) => {
                            assert_eq!(p.topic.as_bytes(), publish.topic);
                            assert_eq!(p.pkid, publish.pkid);
                            assert_eq!(&p.payload[..], &payload[..]);
                        }
                        other => panic!("{other:?}"),
                    }
                }
            }
        }
    }

    /// The PUBLISH read without the general reader gives what the general reader gives, for
    /// every QoS and flag, topic and payload size (Remaining Length of 1 to 3 bytes), and
    /// leaves the next packet in the buffer.
    #[test]
    fn plain_publishes_read_as_the_general_reader_reads_them() {
        let long_topic = "x/".repeat(150);
        let mut checked = 0;
        for version in [Version::V311, Version::V5] {
            for first in [0x30u8, 0x31, 0x32, 0x33, 0x34, 0x3A, 0x3D] {
                for topic in [
                    &b"a"[..],
                    b"plant/line-1/temp",
                    b"caf\xC3\xA9",
                    long_topic.as_bytes(),
                ] {
                    for payload_len in [0usize, 1, 127, 128, 16_384] {
                        for pkid in [1u16, 0x1234, u16::MAX] {
                            let payload: Vec<u8> = (0..payload_len).map(|i| i as u8).collect();
                            let frame = publish_frame(version, first, topic, pkid, &payload);
                            let mut buf = BytesMut::from(&frame[..]);
                            buf.extend_from_slice(&[0xC0, 0]);
                            let mut general = buf.clone();
                            let got = decode(version, &mut buf, 1 << 20).unwrap().unwrap();
                            let want = match version {
                                Version::V311 => decode_v4(&mut general, 1 << 20),
                                Version::V5 => decode_v5(&mut general, 1 << 20),
                            }
                            .unwrap();
                            assert_eq!(format!("{got:?}"), format!("{want:?}"));
                            assert!(matches!(got, Inbound::Publish(_)));
                            assert_eq!(&buf[..], &[0xC0, 0], "the next packet is left");
                            // The plain reader took it, not the general one.
                            let mut again = BytesMut::from(&frame[..]);
                            let len = frame.len();
                            assert!(read_plain_publish(version, &mut again, len).is_some());
                            checked += 1;
                        }
                    }
                }
            }
        }
        assert_eq!(checked, 2 * 7 * 4 * 5 * 3);
    }

    /// A PUBLISH whose fields do not fit the packet, or break a rule the general reader
    /// checks, is malformed in both versions: never "incomplete" (which would drop it
    /// without a word) and never read as a publish.
    #[test]
    fn malformed_publishes_are_refused_not_swallowed() {
        let both: [&[u8]; 6] = [
            &[0x36, 5, 0, 1, b'a', 0, 1],    // QoS 3
            &[0x32, 6, 0, 1, b'a', 0, 0, 0], // packet id 0
            &[0x30, 3, 0, 5, b'a'],          // topic past the end
            &[0x32, 4, 0, 1, b'a', 0],       // packet id cut
            &[0x30, 0],                      // no variable header
            &[0x30, 1, 0],                   // topic length cut
        ];
        for version in [Version::V311, Version::V5] {
            for bytes in both {
                let mut buf = BytesMut::from(bytes);
                let r = decode(version, &mut buf, 1024);
                assert!(
                    matches!(r, Err(DecodeError::Malformed(_))),
                    "{version:?} {bytes:?}: {r:?}"
                );
            }
        }
        // 5.0: the property length is missing.
        for bytes in [&[0x30u8, 3, 0, 1, b'a'][..], &[0x32, 5, 0, 1, b'a', 0, 1]] {
            let r = decode(Version::V5, &mut BytesMut::from(bytes), 1024);
            assert!(
                matches!(r, Err(DecodeError::Malformed(_))),
                "{bytes:?}: {r:?}"
            );
        }
        // 3.1.1: a topic that is not UTF-8.
        let r = decode(
            Version::V311,
            &mut BytesMut::from(&[0x30u8, 4, 0, 2, 0xC3, 0x28][..]),
            1024,
        );
        assert!(matches!(r, Err(DecodeError::Malformed(_))), "{r:?}");
    }
}
