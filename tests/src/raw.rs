//! MQTT packets built byte by byte, for tests that send what a client library would refuse
//! to build or would hide: oversize fields, tens of thousands of properties, wills with
//! chosen properties.

/// MQTT variable byte integer.
pub fn varint(mut n: usize, out: &mut Vec<u8>) {
    loop {
        let mut b = (n % 128) as u8;
        n /= 128;
        if n > 0 {
            b |= 0x80;
        }
        out.push(b);
        if n == 0 {
            return;
        }
    }
}

/// A u16-length-prefixed string or binary field.
pub fn string(s: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(
        &u16::try_from(s.len())
            .expect("a field of at most 65535 bytes")
            .to_be_bytes(),
    );
    out.extend_from_slice(s);
}

/// `count` 5.0 user properties whose names and values are `len` bytes each.
pub fn user_properties(count: usize, len: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(count * (5 + 2 * len));
    let text = vec![b'u'; len];
    for _ in 0..count {
        out.push(0x26);
        string(&text, &mut out);
        string(&text, &mut out);
    }
    out
}

/// A whole packet: fixed header byte `first`, remaining length, `body`.
pub fn packet(first: u8, body: &[u8]) -> Vec<u8> {
    let mut out = vec![first];
    varint(body.len(), &mut out);
    out.extend_from_slice(body);
    out
}

/// An MQTT 5 PUBLISH with raw property bytes.
pub fn v5_publish(
    topic: &str,
    qos: u8,
    pkid: u16,
    retain: bool,
    props: &[u8],
    payload: &[u8],
) -> Vec<u8> {
    let mut body = Vec::new();
    string(topic.as_bytes(), &mut body);
    if qos > 0 {
        body.extend_from_slice(&pkid.to_be_bytes());
    }
    varint(props.len(), &mut body);
    body.extend_from_slice(props);
    body.extend_from_slice(payload);
    packet(0x30 | (qos << 1) | u8::from(retain), &body)
}

/// A will of a [`v5_connect`].
pub struct Will<'a> {
    /// Topic.
    pub topic: &'a str,
    /// Payload.
    pub payload: &'a [u8],
    /// Raw will property bytes (see [`will_delay`]).
    pub props: &'a [u8],
    /// QoS.
    pub qos: u8,
}

/// The Will Delay Interval property.
pub fn will_delay(seconds: u32) -> Vec<u8> {
    let mut out = vec![0x18];
    out.extend_from_slice(&seconds.to_be_bytes());
    out
}

/// An MQTT 5 CONNECT: clean start, keepalive 60, the Session Expiry Interval when given,
/// and a will when given.
pub fn v5_connect(
    client_id: &str,
    session_expiry: Option<u32>,
    will: Option<&Will<'_>>,
) -> Vec<u8> {
    let mut body = Vec::new();
    string(b"MQTT", &mut body);
    body.push(5);
    let mut flags = 0x02;
    if let Some(w) = will {
        flags |= 0x04 | (w.qos << 3);
    }
    body.push(flags);
    body.extend_from_slice(&60u16.to_be_bytes());
    let mut props = Vec::new();
    if let Some(e) = session_expiry {
        props.push(0x11);
        props.extend_from_slice(&e.to_be_bytes());
    }
    varint(props.len(), &mut body);
    body.extend_from_slice(&props);
    string(client_id.as_bytes(), &mut body);
    if let Some(w) = will {
        varint(w.props.len(), &mut body);
        body.extend_from_slice(w.props);
        string(w.topic.as_bytes(), &mut body);
        string(w.payload, &mut body);
    }
    packet(0x10, &body)
}
