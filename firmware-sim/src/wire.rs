//! Raw MQTT packets for flood mode and the test sink, encoded and decoded with the codec rumqttc
//! exposes (`mqttbytes::v4`, `v5::mqttbytes::v5`).
//!
//! Flood mode bypasses rumqttc's event loop (one event, one allocation and one channel hop per
//! message) and writes pre-encoded packets to the socket itself; this module is the small
//! protocol surface both sides of that need.

use bytes::{Bytes, BytesMut};
use rumqttc::mqttbytes::v4;
use rumqttc::v5::mqttbytes::v5;

use crate::broker::Protocol;

/// The largest packet MQTT can express.
const MAX_PACKET: usize = 268_435_455;

/// A decoded packet, reduced to what flood mode and the sink use.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// CONNECT.
    Connect {
        /// Client id.
        client_id: String,
    },
    /// CONNACK.
    ConnAck {
        /// `None` when accepted, else the refusal.
        refused: Option<String>,
        /// Whether the broker resumed a stored session.
        session_present: bool,
        /// MQTT 5 Receive Maximum: most unacknowledged QoS 1/2 publishes the broker accepts.
        receive_max: Option<u16>,
    },
    /// PUBLISH.
    Publish {
        /// QoS.
        qos: u8,
        /// Packet id (0 for QoS 0).
        pkid: u16,
        /// Retain flag.
        retain: bool,
        /// Topic.
        topic: Bytes,
        /// Payload.
        payload: Bytes,
    },
    /// PUBACK, or PUBREC for QoS 2.
    Ack {
        /// Packet id.
        pkid: u16,
        /// MQTT 5 refusal (reason code >= 0x80).
        refused: bool,
    },
    /// PUBREL.
    PubRel {
        /// Packet id.
        pkid: u16,
    },
    /// PUBCOMP, ending a QoS 2 exchange.
    PubComp {
        /// Packet id.
        pkid: u16,
    },
    /// PINGREQ.
    PingReq,
    /// PINGRESP.
    PingResp,
    /// SUBSCRIBE.
    Subscribe {
        /// Packet id.
        pkid: u16,
        /// Number of filters.
        filters: usize,
    },
    /// DISCONNECT.
    Disconnect,
    /// Anything else.
    Other,
}

/// Reads the protocol level of a CONNECT at the start of `buf`; `Ok(None)` until enough bytes
/// have arrived.
pub fn connect_protocol(buf: &[u8]) -> Result<Option<Protocol>, String> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first != 0x10 {
        return Err(format!(
            "first packet is type {} and not CONNECT",
            first >> 4
        ));
    }
    // Skip the variable-length "remaining length" (1 to 4 bytes with a continuation bit).
    let mut at = 1;
    loop {
        let Some(&byte) = buf.get(at) else {
            return Ok(None);
        };
        at += 1;
        if byte & 0x80 == 0 {
            break;
        }
        if at > 4 {
            return Err("malformed remaining length in CONNECT".into());
        }
    }
    // Protocol name "MQTT" (2-byte length + 4 bytes), then the level.
    match buf.get(at + 6) {
        None => Ok(None),
        Some(4) => Ok(Some(Protocol::V311)),
        Some(5) => Ok(Some(Protocol::V5)),
        Some(level) => Err(format!("unsupported MQTT protocol level {level}")),
    }
}

/// Decodes one packet from the front of `buf`; `Ok(None)` until a whole packet has arrived.
pub fn read(protocol: Protocol, buf: &mut BytesMut) -> Result<Option<Frame>, String> {
    match protocol {
        Protocol::V311 => match v4::Packet::read(buf, MAX_PACKET) {
            Ok(packet) => Ok(Some(match packet {
                v4::Packet::Connect(c) => Frame::Connect {
                    client_id: c.client_id,
                },
                v4::Packet::ConnAck(ack) => Frame::ConnAck {
                    refused: (ack.code != v4::ConnectReturnCode::Success)
                        .then(|| format!("{:?}", ack.code)),
                    session_present: ack.session_present,
                    receive_max: None,
                },
                v4::Packet::Publish(p) => Frame::Publish {
                    qos: p.qos as u8,
                    pkid: p.pkid,
                    retain: p.retain,
                    topic: Bytes::from(p.topic.into_bytes()),
                    payload: p.payload,
                },
                v4::Packet::PubAck(a) => Frame::Ack {
                    pkid: a.pkid,
                    refused: false,
                },
                v4::Packet::PubRec(a) => Frame::Ack {
                    pkid: a.pkid,
                    refused: false,
                },
                v4::Packet::PubRel(r) => Frame::PubRel { pkid: r.pkid },
                v4::Packet::PubComp(c) => Frame::PubComp { pkid: c.pkid },
                v4::Packet::PingReq => Frame::PingReq,
                v4::Packet::PingResp => Frame::PingResp,
                v4::Packet::Subscribe(s) => Frame::Subscribe {
                    pkid: s.pkid,
                    filters: s.filters.len(),
                },
                v4::Packet::Disconnect => Frame::Disconnect,
                _ => Frame::Other,
            })),
            Err(rumqttc::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e.to_string()),
        },
        // rumqttc's v5 reader refuses a DISCONNECT without reason code, which MQTT 5 allows
        // (it means "normal disconnection") and clients send.
        Protocol::V5 if buf.len() >= 2 && buf[0] == 0xE0 && buf[1] == 0 => {
            let _ = buf.split_to(2);
            Ok(Some(Frame::Disconnect))
        }
        Protocol::V5 => match v5::Packet::read(buf, None) {
            Ok(packet) => Ok(Some(match packet {
                v5::Packet::Connect(c, _, _) => Frame::Connect {
                    client_id: c.client_id,
                },
                v5::Packet::ConnAck(ack) => Frame::ConnAck {
                    refused: (ack.code != v5::ConnectReturnCode::Success)
                        .then(|| format!("{:?}", ack.code)),
                    session_present: ack.session_present,
                    receive_max: ack.properties.and_then(|p| p.receive_max),
                },
                v5::Packet::Publish(p) => Frame::Publish {
                    qos: p.qos as u8,
                    pkid: p.pkid,
                    retain: p.retain,
                    topic: p.topic,
                    payload: p.payload,
                },
                v5::Packet::PubAck(a) => Frame::Ack {
                    pkid: a.pkid,
                    refused: !matches!(
                        a.reason,
                        v5::PubAckReason::Success | v5::PubAckReason::NoMatchingSubscribers
                    ),
                },
                v5::Packet::PubRec(a) => Frame::Ack {
                    pkid: a.pkid,
                    refused: !matches!(
                        a.reason,
                        v5::PubRecReason::Success | v5::PubRecReason::NoMatchingSubscribers
                    ),
                },
                v5::Packet::PubRel(r) => Frame::PubRel { pkid: r.pkid },
                v5::Packet::PubComp(c) => Frame::PubComp { pkid: c.pkid },
                v5::Packet::PingReq(_) => Frame::PingReq,
                v5::Packet::PingResp(_) => Frame::PingResp,
                v5::Packet::Subscribe(s) => Frame::Subscribe {
                    pkid: s.pkid,
                    filters: s.filters.len(),
                },
                v5::Packet::Disconnect(_) => Frame::Disconnect,
                _ => Frame::Other,
            })),
            Err(rumqttc::v5::mqttbytes::Error::InsufficientBytes(_)) => Ok(None),
            Err(e) => Err(e.to_string()),
        },
    }
}

fn qos4(qos: u8) -> rumqttc::QoS {
    match qos {
        0 => rumqttc::QoS::AtMostOnce,
        1 => rumqttc::QoS::AtLeastOnce,
        _ => rumqttc::QoS::ExactlyOnce,
    }
}

fn qos5(qos: u8) -> rumqttc::v5::mqttbytes::QoS {
    match qos {
        0 => rumqttc::v5::mqttbytes::QoS::AtMostOnce,
        1 => rumqttc::v5::mqttbytes::QoS::AtLeastOnce,
        _ => rumqttc::v5::mqttbytes::QoS::ExactlyOnce,
    }
}

/// What a CONNECT asks for beyond the protocol version.
#[derive(Debug, Clone, Copy)]
pub struct ConnectFields<'a> {
    /// Client id.
    pub client_id: &'a str,
    /// Optional user name and password.
    pub credentials: Option<&'a (String, String)>,
    /// Keep-alive in seconds; 0 turns it off.
    pub keep_alive_secs: u16,
    /// Clean session (3.1.1) or clean start (5).
    pub clean: bool,
    /// MQTT 5 Session Expiry Interval in seconds; ignored by 3.1.1.
    pub session_expiry_secs: Option<u32>,
}

/// Appends a CONNECT with a clean session and keep-alive disabled (flood connections are
/// never idle).
pub fn write_connect(
    protocol: Protocol,
    client_id: &str,
    credentials: Option<&(String, String)>,
    out: &mut BytesMut,
) -> Result<(), String> {
    write_connect_with(
        protocol,
        ConnectFields {
            client_id,
            credentials,
            keep_alive_secs: 0,
            clean: true,
            session_expiry_secs: None,
        },
        out,
    )
}

/// Appends a CONNECT with the given fields.
pub fn write_connect_with(
    protocol: Protocol,
    fields: ConnectFields<'_>,
    out: &mut BytesMut,
) -> Result<(), String> {
    match protocol {
        Protocol::V311 => {
            let mut connect = v4::Connect::new(fields.client_id);
            connect.keep_alive = fields.keep_alive_secs;
            connect.clean_session = fields.clean;
            if let Some((user, password)) = fields.credentials {
                connect.set_login(user.clone(), password.clone());
            }
            connect.write(out).map(drop).map_err(|e| e.to_string())
        }
        Protocol::V5 => {
            let properties = fields
                .session_expiry_secs
                .map(|expiry| v5::ConnectProperties {
                    session_expiry_interval: Some(expiry),
                    ..v5::ConnectProperties::default()
                });
            let connect = v5::Connect {
                keep_alive: fields.keep_alive_secs,
                client_id: fields.client_id.to_string(),
                clean_start: fields.clean,
                properties,
            };
            let login = fields
                .credentials
                .map(|(u, p)| v5::Login::new(u.clone(), p.clone()));
            v5::Packet::Connect(connect, None, login)
                .write(out, None)
                .map(drop)
                .map_err(|e| e.to_string())
        }
    }
}

/// Appends a PINGREQ.
pub fn write_pingreq(protocol: Protocol, out: &mut BytesMut) {
    let written = match protocol {
        Protocol::V311 => v4::PingReq.write(out).map_err(|e| e.to_string()),
        Protocol::V5 => v5::Packet::PingReq(v5::PingReq)
            .write(out, None)
            .map_err(|e| e.to_string()),
    };
    written.expect("a PINGREQ always encodes");
}

/// Appends a PUBREL, the second step of a QoS 2 exchange.
pub fn write_pubrel(protocol: Protocol, pkid: u16, out: &mut BytesMut) {
    let written = match protocol {
        Protocol::V311 => v4::PubRel::new(pkid).write(out).map_err(|e| e.to_string()),
        Protocol::V5 => v5::Packet::PubRel(v5::PubRel::new(pkid, None))
            .write(out, None)
            .map_err(|e| e.to_string()),
    };
    written.expect("a PUBREL always encodes");
}

/// Appends a PUBLISH.
pub fn write_publish(
    protocol: Protocol,
    topic: &str,
    qos: u8,
    pkid: u16,
    payload: Bytes,
    out: &mut BytesMut,
) -> Result<(), String> {
    match protocol {
        Protocol::V311 => {
            let mut publish = v4::Publish::from_bytes(topic, qos4(qos), payload);
            publish.pkid = pkid;
            publish.write(out).map(drop).map_err(|e| e.to_string())
        }
        Protocol::V5 => {
            let mut publish = v5::Publish::new(topic, qos5(qos), payload, None);
            publish.pkid = pkid;
            v5::Packet::Publish(publish)
                .write(out, None)
                .map(drop)
                .map_err(|e| e.to_string())
        }
    }
}

/// Appends a CONNACK accepting a clean session.
pub fn write_connack(protocol: Protocol, out: &mut BytesMut) {
    write_connack_with(protocol, false, out);
}

/// Appends a CONNACK accepting the connection, with the given session-present flag.
pub fn write_connack_with(protocol: Protocol, session_present: bool, out: &mut BytesMut) {
    let written = match protocol {
        Protocol::V311 => v4::ConnAck::new(v4::ConnectReturnCode::Success, session_present)
            .write(out)
            .map_err(|e| e.to_string()),
        Protocol::V5 => v5::Packet::ConnAck(v5::ConnAck {
            session_present,
            code: v5::ConnectReturnCode::Success,
            properties: None,
        })
        .write(out, None)
        .map_err(|e| e.to_string()),
    };
    written.expect("a CONNACK always encodes");
}

/// Which acknowledgement to send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AckKind {
    /// PUBACK for a QoS 1 PUBLISH.
    PubAck,
    /// PUBREC for a QoS 2 PUBLISH.
    PubRec,
    /// PUBCOMP for a PUBREL.
    PubComp,
}

/// Appends a successful acknowledgement.
pub fn write_ack(protocol: Protocol, kind: AckKind, pkid: u16, out: &mut BytesMut) {
    let written = match (protocol, kind) {
        (Protocol::V311, AckKind::PubAck) => {
            v4::PubAck::new(pkid).write(out).map_err(|e| e.to_string())
        }
        (Protocol::V311, AckKind::PubRec) => {
            v4::PubRec::new(pkid).write(out).map_err(|e| e.to_string())
        }
        (Protocol::V311, AckKind::PubComp) => {
            v4::PubComp::new(pkid).write(out).map_err(|e| e.to_string())
        }
        (Protocol::V5, AckKind::PubAck) => v5::Packet::PubAck(v5::PubAck::new(pkid, None))
            .write(out, None)
            .map_err(|e| e.to_string()),
        (Protocol::V5, AckKind::PubRec) => v5::Packet::PubRec(v5::PubRec::new(pkid, None))
            .write(out, None)
            .map_err(|e| e.to_string()),
        (Protocol::V5, AckKind::PubComp) => v5::Packet::PubComp(v5::PubComp::new(pkid, None))
            .write(out, None)
            .map_err(|e| e.to_string()),
    };
    written.expect("an acknowledgement always encodes");
}

/// Appends a PINGRESP.
pub fn write_pingresp(protocol: Protocol, out: &mut BytesMut) {
    let written = match protocol {
        Protocol::V311 => v4::PingResp.write(out).map_err(|e| e.to_string()),
        Protocol::V5 => v5::Packet::PingResp(v5::PingResp)
            .write(out, None)
            .map_err(|e| e.to_string()),
    };
    written.expect("a PINGRESP always encodes");
}

/// Appends a SUBACK refusing every filter (the sink delivers nothing).
pub fn write_suback_refusal(protocol: Protocol, pkid: u16, filters: usize, out: &mut BytesMut) {
    let written = match protocol {
        Protocol::V311 => v4::SubAck::new(pkid, vec![v4::SubscribeReasonCode::Failure; filters])
            .write(out)
            .map_err(|e| e.to_string()),
        Protocol::V5 => v5::Packet::SubAck(v5::SubAck {
            pkid,
            return_codes: vec![v5::SubscribeReasonCode::Unspecified; filters],
            properties: None,
        })
        .write(out, None)
        .map_err(|e| e.to_string()),
    };
    written.expect("a SUBACK always encodes");
}

/// Appends a DISCONNECT (normal disconnection).
pub fn write_disconnect(protocol: Protocol, out: &mut BytesMut) {
    let written = match protocol {
        Protocol::V311 => v4::Disconnect.write(out).map_err(|e| e.to_string()),
        Protocol::V5 => v5::Packet::Disconnect(v5::Disconnect::new(
            v5::DisconnectReasonCode::NormalDisconnection,
        ))
        .write(out, None)
        .map_err(|e| e.to_string()),
    };
    written.expect("a DISCONNECT always encodes");
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connect_protocol_is_detected_for_both_versions() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let mut out = BytesMut::new();
            write_connect(protocol, "dev-1", None, &mut out).unwrap();
            assert_eq!(connect_protocol(&out).unwrap(), Some(protocol));
            assert_eq!(connect_protocol(&out[..3]).unwrap(), None);
        }
        assert!(connect_protocol(&[0x30, 0x00]).is_err());
    }

    #[test]
    fn publish_round_trips_through_the_codec() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let mut out = BytesMut::new();
            write_publish(protocol, "a/b", 1, 7, Bytes::from_static(b"xyz"), &mut out).unwrap();
            let frame = read(protocol, &mut out).unwrap().unwrap();
            assert_eq!(
                frame,
                Frame::Publish {
                    qos: 1,
                    pkid: 7,
                    retain: false,
                    topic: Bytes::from_static(b"a/b"),
                    payload: Bytes::from_static(b"xyz"),
                }
            );
            assert!(out.is_empty());
        }
    }

    #[test]
    fn qos2_and_keep_alive_packets_round_trip_through_the_codec() {
        for protocol in [Protocol::V311, Protocol::V5] {
            let mut out = BytesMut::new();
            write_connack_with(protocol, true, &mut out);
            write_pubrel(protocol, 9, &mut out);
            write_ack(protocol, AckKind::PubComp, 9, &mut out);
            write_pingreq(protocol, &mut out);
            write_pingresp(protocol, &mut out);
            assert!(matches!(
                read(protocol, &mut out).unwrap(),
                Some(Frame::ConnAck {
                    refused: None,
                    session_present: true,
                    ..
                })
            ));
            assert_eq!(
                read(protocol, &mut out).unwrap(),
                Some(Frame::PubRel { pkid: 9 })
            );
            assert_eq!(
                read(protocol, &mut out).unwrap(),
                Some(Frame::PubComp { pkid: 9 })
            );
            assert_eq!(read(protocol, &mut out).unwrap(), Some(Frame::PingReq));
            assert_eq!(read(protocol, &mut out).unwrap(), Some(Frame::PingResp));
            assert!(out.is_empty(), "{protocol:?}");
        }
    }

    #[test]
    fn partial_packets_wait_for_more_bytes() {
        let mut full = BytesMut::new();
        write_ack(Protocol::V5, AckKind::PubAck, 3, &mut full);
        let mut partial = BytesMut::from(&full[..1]);
        assert_eq!(read(Protocol::V5, &mut partial).unwrap(), None);
        assert_eq!(
            read(Protocol::V5, &mut full).unwrap(),
            Some(Frame::Ack {
                pkid: 3,
                refused: false
            })
        );
    }
}
