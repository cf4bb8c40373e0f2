//! The record encoding, both ways: arbitrary bytes cut into the fields of a record must
//! either encode to bytes that decode back to the same record, or be refused with nothing
//! written; and arbitrary bytes given to the batch decoder must be refused or decoded, never
//! crash it.
//!
//! Field lengths are taken from the input (two bytes each, scaled up to the encoding's
//! limits), so inputs reach the largest value every length prefix holds and just past it.

#![no_main]

use bytes::Bytes;
use edge::log::record::{decode_batch, encode_batch, BatchHeader, NewRecord};
use libfuzzer_sys::fuzz_target;

/// Takes a length from two input bytes: small lengths often, and the region around the
/// 65535 a u16 prefix holds when the first byte says so.
fn take_len(data: &mut &[u8]) -> usize {
    let (a, b) = match data {
        [a, b, rest @ ..] => {
            let out = (*a, *b);
            *data = rest;
            out
        }
        _ => return 0,
    };
    if a >= 0xF0 {
        65_530 + usize::from(b % 12)
    } else {
        usize::from(a) << 4 | usize::from(b & 0x0F)
    }
}

fuzz_target!(|data: &[u8]| {
    // Raw bytes straight into the decoder.
    let _ = decode_batch(0, Bytes::copy_from_slice(data));

    let mut rest = data;
    let lens: Vec<usize> = (0..7).map(|_| take_len(&mut rest)).collect();
    let props = take_len(&mut rest).min(70_000);
    let text = |n: usize| "t".repeat(n);
    let blob = |n: usize| vec![0x5A_u8; n];
    let (key, topic, client, ct, rt, cd, payload) = (
        blob(lens[0]),
        text(lens[1]),
        text(lens[2]),
        text(lens[3]),
        text(lens[4]),
        blob(lens[5]),
        rest.iter()
            .copied()
            .cycle()
            .take(lens[6])
            .collect::<Vec<u8>>(),
    );
    let user_properties: Vec<(String, String)> = (0..props)
        .map(|i| {
            (
                String::new(),
                if i == 0 { text(lens[3]) } else { String::new() },
            )
        })
        .collect();
    let record = NewRecord {
        timestamp_ms: 42,
        key: &key,
        mqtt_topic: topic.as_bytes(),
        qos: 1,
        retain: lens[0] % 2 == 0,
        client_id: &client,
        content_type: (lens[3] % 3 != 0).then_some(ct.as_str()),
        payload_format: Some(1),
        message_expiry: Some(7),
        response_topic: (lens[4] % 2 == 0).then_some(rt.as_str()),
        correlation_data: (lens[5] % 2 == 1).then_some(&cd[..]),
        user_properties: &user_properties,
        payload: &payload,
    };
    let mut out = b"prefix".to_vec();
    match record.encode_into(&mut out) {
        Err(_) => assert_eq!(out, b"prefix", "a refused record writes nothing"),
        Ok(()) => {
            let mut value = Vec::new();
            let header = BatchHeader {
                record_count: 1,
                first_timestamp_ms: 42,
                last_timestamp_ms: 42,
            };
            encode_batch(header, &out[6..], &mut value);
            let r = decode_batch(9, Bytes::from(value))
                .expect("an encoded record decodes")
                .pop()
                .expect("one record");
            assert_eq!(r.offset, 9);
            assert_eq!(&r.key[..], &key[..]);
            assert_eq!(r.headers.mqtt_topic, topic);
            assert_eq!(r.headers.client_id, client);
            assert_eq!(r.headers.content_type.as_deref(), record.content_type);
            assert_eq!(r.headers.response_topic.as_deref(), record.response_topic);
            assert_eq!(
                r.headers.correlation_data.as_deref(),
                record.correlation_data
            );
            assert_eq!(r.headers.user_properties, user_properties);
            assert_eq!(&r.payload[..], &payload[..]);
        }
    }
});
