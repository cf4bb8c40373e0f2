//! Records and record batches as they are stored in the log.
//!
//! A batch value has one of two versions (all integers big-endian). Version 1 holds the
//! records as they are:
//!
//! ```text
//! magic u8 = 0xB7 | version u8 = 1 | record_count u32 | first_timestamp_ms u64
//! | last_timestamp_ms u64 | crc32 u32 (IEEE, over the record bytes) | records...
//! ```
//!
//! Version 2 holds them compressed (`storage.compression`):
//!
//! ```text
//! magic u8 = 0xB7 | version u8 = 2 | record_count u32 | first_timestamp_ms u64
//! | last_timestamp_ms u64 | crc32 u32 (IEEE, over every byte after this field)
//! | codec u8 (1 = LZ4 block) | records_len u32 (bytes of the records once decompressed)
//! | compressed records...
//! ```
//!
//! Both are read; the appender writes version 2 only when compression is on and the batch
//! shrinks, and version 1 otherwise, so an incompressible batch costs no decompression on
//! read and a log written with `compression = "none"` stays readable by older releases.
//!
//! One record:
//!
//! ```text
//! length u32 (bytes after this field) | timestamp_ms u64 | key: u16 len + bytes
//! | mqtt_topic: u16 len + bytes | qos u8 | flags u8 (bit 0 retain, bits 1-5: the optional
//! fields below are present) | client_id: u16 len + bytes | [content_type: u16 len + bytes]
//! | [payload_format u8] | [message_expiry_secs u32] | [response_topic: u16 len + bytes]
//! | [correlation_data: u16 len + bytes]
//! | user_property_count u16, then per property: u16 len + key, u16 len + value
//! | payload: u32 len + bytes
//! ```
//!
//! Record offsets are not stored: the n-th record of a batch has offset `base_offset + n`,
//! with `base_offset` in the batch's key. The CRC covers what is on disk (for version 2 the
//! compressed bytes, the codec and the declared length), so a damaged value is unreadable
//! rather than wrong; a version 2 body that does not decompress to exactly its declared
//! length is as corrupt as a CRC mismatch. The declared length is believed only up to what
//! LZ4 can expand the stored bytes to, so a damaged or hostile value cannot make a reader
//! allocate more than that.

use bytes::Bytes;

/// First byte of every batch value.
pub const BATCH_MAGIC: u8 = 0xB7;
/// Format version of batch values that hold their records as they are.
pub const BATCH_VERSION: u8 = 1;
/// Format version of batch values that hold their records compressed.
pub const BATCH_VERSION_COMPRESSED: u8 = 2;
/// Where a batch value's CRC-32C starts, in both versions: after magic, version, record
/// count, base offset and base timestamp.
const CRC_AT: usize = 2 + 4 + 8 + 8;
/// Bytes before the first record of a version 1 batch value.
pub const BATCH_HEADER_LEN: usize = CRC_AT + 4;
/// Bytes before the compressed records of a version 2 batch value.
pub const BATCH_HEADER_LEN_COMPRESSED: usize = BATCH_HEADER_LEN + 1 + 4;

/// Codec byte of a version 2 batch whose records are one LZ4 block.
const CODEC_LZ4: u8 = 1;
/// The most bytes one stored byte of an LZ4 block decompresses to (a match length grows by
/// 255 per extension byte): the bound on a declared length.
const LZ4_MAX_EXPANSION: usize = 255;

/// How the appender stores record batches (`storage.compression`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Compression {
    /// Records as they are (version 1 batches).
    None,
    /// Each batch's records as one LZ4 block (version 2), unless that does not shrink it.
    #[default]
    Lz4,
}

const FLAG_RETAIN: u8 = 1;
const FLAG_CONTENT_TYPE: u8 = 2;
const FLAG_PAYLOAD_FORMAT: u8 = 4;
const FLAG_MESSAGE_EXPIRY: u8 = 8;
const FLAG_RESPONSE_TOPIC: u8 = 16;
const FLAG_CORRELATION_DATA: u8 = 32;

/// A batch value or record that does not decode.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum CorruptBatch {
    /// Shorter than its header or than a length it declares.
    #[error("batch is truncated")]
    Truncated,
    /// Not written by this code.
    #[error(
        "batch has magic {0:#04x} / version {1}, expected {BATCH_MAGIC:#04x} / {BATCH_VERSION} or {BATCH_VERSION_COMPRESSED}"
    )]
    Format(u8, u8),
    /// A compressed batch names a codec this code does not know.
    #[error("batch is compressed with unknown codec {0}")]
    Codec(u8),
    /// A compressed batch declares more decompressed bytes than its stored bytes can hold.
    #[error("batch declares {declared} decompressed bytes, more than its {stored} stored bytes can expand to")]
    DeclaredLength {
        /// From the header.
        declared: u32,
        /// Compressed bytes present.
        stored: usize,
    },
    /// A compressed batch's records do not decompress to their declared length.
    #[error("batch does not decompress: {0}")]
    Decompress(String),
    /// The bytes changed after they were written.
    #[error("batch checksum mismatch: stored {stored:#010x}, computed {computed:#010x}")]
    Checksum {
        /// The CRC in the header.
        stored: u32,
        /// The CRC of the bytes read.
        computed: u32,
    },
    /// The header's record count disagrees with the records present.
    #[error("batch declares {declared} records but holds {found}")]
    Count {
        /// From the header.
        declared: u32,
        /// Decoded.
        found: u32,
    },
    /// A text field is not UTF-8.
    #[error("record field {0} is not UTF-8")]
    Utf8(&'static str),
}

/// MQTT metadata kept with each record; mirrored as Kafka headers.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RecordHeaders {
    /// The topic the device published to.
    pub mqtt_topic: String,
    /// QoS of the publish.
    pub qos: u8,
    /// Retain flag of the publish.
    pub retain: bool,
    /// Publisher's client id.
    pub client_id: String,
    /// MQTT 5 content type.
    pub content_type: Option<String>,
    /// MQTT 5 payload format indicator.
    pub payload_format: Option<u8>,
    /// MQTT 5 message expiry interval in seconds, from `timestamp_ms`.
    pub message_expiry: Option<u32>,
    /// MQTT 5 response topic.
    pub response_topic: Option<String>,
    /// MQTT 5 correlation data.
    pub correlation_data: Option<Bytes>,
    /// MQTT 5 user properties, in order.
    pub user_properties: Vec<(String, String)>,
}

/// One record read back from the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    /// Position in its partition.
    pub offset: u64,
    /// When the edge received it (ms since the Unix epoch).
    pub timestamp_ms: u64,
    /// Partition key.
    pub key: Bytes,
    /// MQTT metadata.
    pub headers: RecordHeaders,
    /// Message body.
    pub payload: Bytes,
}

/// The fields of a record about to be appended, borrowed from the decoded packet.
#[derive(Debug, Clone, Copy)]
pub struct NewRecord<'a> {
    /// Receive time.
    pub timestamp_ms: u64,
    /// Partition key.
    pub key: &'a [u8],
    /// MQTT topic (validated UTF-8).
    pub mqtt_topic: &'a [u8],
    /// QoS.
    pub qos: u8,
    /// Retain flag.
    pub retain: bool,
    /// Client id.
    pub client_id: &'a str,
    /// Content type.
    pub content_type: Option<&'a str>,
    /// Payload format indicator.
    pub payload_format: Option<u8>,
    /// Message expiry interval in seconds.
    pub message_expiry: Option<u32>,
    /// Response topic.
    pub response_topic: Option<&'a str>,
    /// Correlation data.
    pub correlation_data: Option<&'a [u8]>,
    /// User properties.
    pub user_properties: &'a [(String, String)],
    /// Body.
    pub payload: &'a [u8],
}

/// A record field longer than its length prefix can hold. Limits checked where input enters
/// (`[mqtt]` in the config) keep every field far below these; this error is the last line,
/// so that the log never holds a record its decoder rejects.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record field {field} is {len} bytes (or items), more than its encoding holds ({max})")]
pub struct RecordTooLarge {
    /// Which field.
    pub field: &'static str,
    /// Its length (bytes, or items for counts).
    pub len: usize,
    /// The most its prefix can hold.
    pub max: usize,
}

impl NewRecord<'_> {
    /// Appends the encoded record to `out`, or returns an error and leaves `out` as it was
    /// when a field does not fit its length prefix.
    pub fn encode_into(&self, out: &mut Vec<u8>) -> Result<(), RecordTooLarge> {
        let len_at = out.len();
        let result = self.encode_fields(out);
        if result.is_err() {
            out.truncate(len_at);
        }
        result
    }

    fn encode_fields(&self, out: &mut Vec<u8>) -> Result<(), RecordTooLarge> {
        let len_at = out.len();
        out.extend_from_slice(&[0; 4]);
        out.extend_from_slice(&self.timestamp_ms.to_be_bytes());
        put_short(out, "key", self.key)?;
        put_short(out, "mqtt_topic", self.mqtt_topic)?;
        out.push(self.qos);
        let mut flags = 0;
        if self.retain {
            flags |= FLAG_RETAIN;
        }
        if self.content_type.is_some() {
            flags |= FLAG_CONTENT_TYPE;
        }
        if self.payload_format.is_some() {
            flags |= FLAG_PAYLOAD_FORMAT;
        }
        if self.message_expiry.is_some() {
            flags |= FLAG_MESSAGE_EXPIRY;
        }
        if self.response_topic.is_some() {
            flags |= FLAG_RESPONSE_TOPIC;
        }
        if self.correlation_data.is_some() {
            flags |= FLAG_CORRELATION_DATA;
        }
        out.push(flags);
        put_short(out, "client_id", self.client_id.as_bytes())?;
        if let Some(ct) = self.content_type {
            put_short(out, "content_type", ct.as_bytes())?;
        }
        if let Some(f) = self.payload_format {
            out.push(f);
        }
        if let Some(e) = self.message_expiry {
            out.extend_from_slice(&e.to_be_bytes());
        }
        if let Some(rt) = self.response_topic {
            put_short(out, "response_topic", rt.as_bytes())?;
        }
        if let Some(cd) = self.correlation_data {
            put_short(out, "correlation_data", cd)?;
        }
        let count = checked_len::<u16>("user_property_count", self.user_properties.len())?;
        out.extend_from_slice(&count.to_be_bytes());
        for (k, v) in self.user_properties {
            put_short(out, "user_property", k.as_bytes())?;
            put_short(out, "user_property", v.as_bytes())?;
        }
        let payload_len = checked_len::<u32>("payload", self.payload.len())?;
        out.extend_from_slice(&payload_len.to_be_bytes());
        out.extend_from_slice(self.payload);
        let len = checked_len::<u32>("record", out.len() - len_at - 4)?;
        out[len_at..len_at + 4].copy_from_slice(&len.to_be_bytes());
        Ok(())
    }
}

/// `len` as the integer type of its length prefix, or the error naming `field`.
fn checked_len<T: TryFrom<usize> + Bounded>(
    field: &'static str,
    len: usize,
) -> Result<T, RecordTooLarge> {
    T::try_from(len).map_err(|_| RecordTooLarge {
        field,
        len,
        max: T::MAX_USIZE,
    })
}

/// The largest value of a length prefix type, as a `usize`.
trait Bounded {
    const MAX_USIZE: usize;
}
impl Bounded for u16 {
    const MAX_USIZE: usize = u16::MAX as usize;
}
impl Bounded for u32 {
    const MAX_USIZE: usize = u32::MAX as usize;
}

/// Bytes for a JSON field: the text when they are UTF-8 (`"utf8"`), else base64
/// (`"base64"`).
pub fn text_or_base64(bytes: &[u8]) -> (String, &'static str) {
    use base64::Engine as _;
    match std::str::from_utf8(bytes) {
        Ok(s) => (s.to_string(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(bytes),
            "base64",
        ),
    }
}

fn put_short(out: &mut Vec<u8>, field: &'static str, bytes: &[u8]) -> Result<(), RecordTooLarge> {
    let len = checked_len::<u16>(field, bytes.len())?;
    out.extend_from_slice(&len.to_be_bytes());
    out.extend_from_slice(bytes);
    Ok(())
}

/// The header of a batch value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchHeader {
    /// Records in the batch.
    pub record_count: u32,
    /// Timestamp of the first record.
    pub first_timestamp_ms: u64,
    /// Timestamp of the last record (the batch's age for retention).
    pub last_timestamp_ms: u64,
}

/// Writes a batch value: header, then the already-encoded `records`.
pub fn encode_batch(header: BatchHeader, records: &[u8], out: &mut Vec<u8>) {
    out.reserve(BATCH_HEADER_LEN + records.len());
    out.push(BATCH_MAGIC);
    out.push(BATCH_VERSION);
    out.extend_from_slice(&header.record_count.to_be_bytes());
    out.extend_from_slice(&header.first_timestamp_ms.to_be_bytes());
    out.extend_from_slice(&header.last_timestamp_ms.to_be_bytes());
    out.extend_from_slice(&crc32fast::hash(records).to_be_bytes());
    out.extend_from_slice(records);
}

/// Turns `value`, which holds [`BATCH_HEADER_LEN`] placeholder bytes followed by encoded
/// records, into a batch value in place (no copy of the records).
pub fn finish_batch_in_place(header: BatchHeader, value: &mut [u8]) {
    let crc = crc32fast::hash(&value[BATCH_HEADER_LEN..]);
    value[0] = BATCH_MAGIC;
    value[1] = BATCH_VERSION;
    value[2..6].copy_from_slice(&header.record_count.to_be_bytes());
    value[6..14].copy_from_slice(&header.first_timestamp_ms.to_be_bytes());
    value[14..22].copy_from_slice(&header.last_timestamp_ms.to_be_bytes());
    value[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
}

/// Writes `records` as a compressed (version 2) batch value into `out` (cleared first) and
/// returns true, or returns false when compressing does not make the value smaller than
/// the version 1 value of the same records.
pub fn encode_compressed_batch(
    header: BatchHeader,
    records: &[u8],
    compression: Compression,
    out: &mut Vec<u8>,
) -> bool {
    let Compression::Lz4 = compression else {
        return false;
    };
    // Larger values are refused by fjall anyway; the length field would not hold them.
    let Ok(records_len) = u32::try_from(records.len()) else {
        return false;
    };
    out.clear();
    out.resize(
        BATCH_HEADER_LEN_COMPRESSED + lz4_flex::block::get_maximum_output_size(records.len()),
        0,
    );
    let Ok(compressed) =
        lz4_flex::block::compress_into(records, &mut out[BATCH_HEADER_LEN_COMPRESSED..])
    else {
        return false;
    };
    out.truncate(BATCH_HEADER_LEN_COMPRESSED + compressed);
    if out.len() >= BATCH_HEADER_LEN + records.len() {
        return false;
    }
    out[BATCH_HEADER_LEN] = CODEC_LZ4;
    out[BATCH_HEADER_LEN + 1..BATCH_HEADER_LEN_COMPRESSED]
        .copy_from_slice(&records_len.to_be_bytes());
    let crc = crc32fast::hash(&out[BATCH_HEADER_LEN..]);
    out[0] = BATCH_MAGIC;
    out[1] = BATCH_VERSION_COMPRESSED;
    out[2..6].copy_from_slice(&header.record_count.to_be_bytes());
    out[6..14].copy_from_slice(&header.first_timestamp_ms.to_be_bytes());
    out[14..22].copy_from_slice(&header.last_timestamp_ms.to_be_bytes());
    out[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
    true
}

/// Reads a batch header (either version) without checking the records.
pub fn decode_header(value: &[u8]) -> Result<BatchHeader, CorruptBatch> {
    if value.len() < 2 {
        return Err(CorruptBatch::Truncated);
    }
    let header_len = match (value[0], value[1]) {
        (BATCH_MAGIC, BATCH_VERSION) => BATCH_HEADER_LEN,
        (BATCH_MAGIC, BATCH_VERSION_COMPRESSED) => BATCH_HEADER_LEN_COMPRESSED,
        (magic, version) => return Err(CorruptBatch::Format(magic, version)),
    };
    if value.len() < header_len {
        return Err(CorruptBatch::Truncated);
    }
    Ok(BatchHeader {
        record_count: u32::from_be_bytes(value[2..6].try_into().expect("4 bytes")),
        first_timestamp_ms: u64::from_be_bytes(value[6..14].try_into().expect("8 bytes")),
        last_timestamp_ms: u64::from_be_bytes(value[14..22].try_into().expect("8 bytes")),
    })
}

/// The verified header and record bytes of a batch value of either version: the CRC is
/// checked over what is stored, then a compressed body is decompressed.
fn batch_records(value: Bytes) -> Result<(BatchHeader, Bytes), CorruptBatch> {
    let header = decode_header(&value)?;
    // decode_header checked the length for the version: the CRC is at `CRC_AT` in both.
    let stored = u32::from_be_bytes(value[CRC_AT..CRC_AT + 4].try_into().expect("4 bytes"));
    let computed = crc32fast::hash(&value[BATCH_HEADER_LEN..]);
    if stored != computed {
        return Err(CorruptBatch::Checksum { stored, computed });
    }
    if value[1] == BATCH_VERSION {
        return Ok((header, value.slice(BATCH_HEADER_LEN..)));
    }
    let codec = value[BATCH_HEADER_LEN];
    if codec != CODEC_LZ4 {
        return Err(CorruptBatch::Codec(codec));
    }
    let declared = u32::from_be_bytes(
        value[BATCH_HEADER_LEN + 1..BATCH_HEADER_LEN_COMPRESSED]
            .try_into()
            .expect("4 bytes"),
    );
    let compressed = &value[BATCH_HEADER_LEN_COMPRESSED..];
    if declared as usize > compressed.len().saturating_mul(LZ4_MAX_EXPANSION) {
        return Err(CorruptBatch::DeclaredLength {
            declared,
            stored: compressed.len(),
        });
    }
    let mut records = vec![0u8; declared as usize];
    let written = lz4_flex::block::decompress_into(compressed, &mut records)
        .map_err(|e| CorruptBatch::Decompress(e.to_string()))?;
    if written != records.len() {
        return Err(CorruptBatch::Decompress(format!(
            "{written} bytes, {declared} declared"
        )));
    }
    Ok((header, Bytes::from(records)))
}

/// Decodes and verifies a whole batch value (either version) whose first record has
/// `base_offset`.
pub fn decode_batch(base_offset: u64, value: Bytes) -> Result<Vec<Record>, CorruptBatch> {
    let (header, body) = batch_records(value)?;
    let mut records = Vec::with_capacity(header.record_count as usize);
    let mut cursor = Cursor { buf: body, pos: 0 };
    while cursor.remaining() > 0 {
        let len = cursor.u32()? as usize;
        let end = cursor.pos + len;
        if end > cursor.buf.len() {
            return Err(CorruptBatch::Truncated);
        }
        let timestamp_ms = cursor.u64()?;
        let key = cursor.short_bytes()?;
        let mqtt_topic = cursor.short_string("mqtt_topic")?;
        let qos = cursor.u8()?;
        let flags = cursor.u8()?;
        let client_id = cursor.short_string("client_id")?;
        let content_type = if flags & FLAG_CONTENT_TYPE != 0 {
            Some(cursor.short_string("content_type")?)
        } else {
            None
        };
        let payload_format = if flags & FLAG_PAYLOAD_FORMAT != 0 {
            Some(cursor.u8()?)
        } else {
            None
        };
        let message_expiry = if flags & FLAG_MESSAGE_EXPIRY != 0 {
            Some(cursor.u32()?)
        } else {
            None
        };
        let response_topic = if flags & FLAG_RESPONSE_TOPIC != 0 {
            Some(cursor.short_string("response_topic")?)
        } else {
            None
        };
        let correlation_data = if flags & FLAG_CORRELATION_DATA != 0 {
            Some(cursor.short_bytes()?)
        } else {
            None
        };
        let n_props = cursor.u16()?;
        let mut user_properties = Vec::with_capacity(n_props as usize);
        for _ in 0..n_props {
            let k = cursor.short_string("user_property")?;
            let v = cursor.short_string("user_property")?;
            user_properties.push((k, v));
        }
        let payload_len = cursor.u32()? as usize;
        let payload = cursor.take(payload_len)?;
        if cursor.pos != end {
            return Err(CorruptBatch::Truncated);
        }
        records.push(Record {
            offset: base_offset + records.len() as u64,
            timestamp_ms,
            key,
            headers: RecordHeaders {
                mqtt_topic,
                qos,
                retain: flags & FLAG_RETAIN != 0,
                client_id,
                content_type,
                payload_format,
                message_expiry,
                response_topic,
                correlation_data,
                user_properties,
            },
            payload,
        });
    }
    if records.len() as u32 != header.record_count {
        return Err(CorruptBatch::Count {
            declared: header.record_count,
            found: records.len() as u32,
        });
    }
    Ok(records)
}

struct Cursor {
    buf: Bytes,
    pos: usize,
}

impl Cursor {
    fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }
    fn take(&mut self, n: usize) -> Result<Bytes, CorruptBatch> {
        if self.remaining() < n {
            return Err(CorruptBatch::Truncated);
        }
        let out = self.buf.slice(self.pos..self.pos + n);
        self.pos += n;
        Ok(out)
    }
    fn array<const N: usize>(&mut self) -> Result<[u8; N], CorruptBatch> {
        if self.remaining() < N {
            return Err(CorruptBatch::Truncated);
        }
        let out = self.buf[self.pos..self.pos + N]
            .try_into()
            .expect("N bytes");
        self.pos += N;
        Ok(out)
    }
    fn u8(&mut self) -> Result<u8, CorruptBatch> {
        Ok(self.array::<1>()?[0])
    }
    fn u16(&mut self) -> Result<u16, CorruptBatch> {
        Ok(u16::from_be_bytes(self.array()?))
    }
    fn u32(&mut self) -> Result<u32, CorruptBatch> {
        Ok(u32::from_be_bytes(self.array()?))
    }
    fn u64(&mut self) -> Result<u64, CorruptBatch> {
        Ok(u64::from_be_bytes(self.array()?))
    }
    fn short_bytes(&mut self) -> Result<Bytes, CorruptBatch> {
        let n = self.u16()? as usize;
        self.take(n)
    }
    fn short_string(&mut self, field: &'static str) -> Result<String, CorruptBatch> {
        let b = self.short_bytes()?;
        String::from_utf8(b.to_vec()).map_err(|_| CorruptBatch::Utf8(field))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn sample(payload: &[u8], props: &[(String, String)]) -> Vec<u8> {
        let mut out = Vec::new();
        NewRecord {
            timestamp_ms: 1_700_000_000_123,
            key: b"dev-1",
            mqtt_topic: b"sensors/dev-1/t",
            qos: 1,
            retain: true,
            client_id: "c-1",
            content_type: Some("application/json"),
            payload_format: None,
            message_expiry: None,
            response_topic: None,
            correlation_data: None,
            user_properties: props,
            payload,
        }
        .encode_into(&mut out)
        .unwrap();
        out
    }

    fn batch_of(records: &[Vec<u8>]) -> Bytes {
        let body: Vec<u8> = records.concat();
        let mut out = Vec::new();
        encode_batch(
            BatchHeader {
                record_count: records.len() as u32,
                first_timestamp_ms: 1,
                last_timestamp_ms: 2,
            },
            &body,
            &mut out,
        );
        Bytes::from(out)
    }

    #[test]
    fn batch_round_trips_with_dense_offsets() {
        let props = vec![("k".to_string(), "v".to_string())];
        let value = batch_of(&[sample(b"one", &props), sample(b"two", &[])]);
        let records = decode_batch(40, value).unwrap();
        assert_eq!(records.len(), 2);
        assert_eq!(records[0].offset, 40);
        assert_eq!(records[1].offset, 41);
        assert_eq!(&records[0].payload[..], b"one");
        assert_eq!(records[0].headers.user_properties, props);
        assert!(records[0].headers.retain);
        assert_eq!(
            records[0].headers.content_type.as_deref(),
            Some("application/json")
        );
    }

    #[test]
    fn in_place_batch_equals_copied_batch() {
        let records = [sample(b"a", &[]), sample(b"b", &[])].concat();
        let header = BatchHeader {
            record_count: 2,
            first_timestamp_ms: 1,
            last_timestamp_ms: 2,
        };
        let mut copied = Vec::new();
        encode_batch(header, &records, &mut copied);
        let mut in_place = vec![0u8; BATCH_HEADER_LEN];
        in_place.extend_from_slice(&records);
        finish_batch_in_place(header, &mut in_place);
        assert_eq!(copied, in_place);
    }

    /// Every byte of `value` from `from` on, flipped alone, fails the checksum.
    fn assert_every_flip_detected(value: &[u8], from: usize) {
        for i in from..value.len() {
            let mut damaged = value.to_vec();
            damaged[i] ^= 0x40;
            assert!(
                matches!(
                    decode_batch(0, Bytes::from(damaged)),
                    Err(CorruptBatch::Checksum { .. })
                ),
                "flip at {i} went unnoticed"
            );
        }
    }

    /// Every proper prefix of `value` is refused.
    fn assert_every_truncation_rejected(value: &Bytes) {
        for cut in 0..value.len() {
            assert!(decode_batch(0, value.slice(..cut)).is_err(), "cut at {cut}");
        }
    }

    #[test]
    fn flipped_byte_is_detected() {
        let value = batch_of(&[sample(b"payload", &[])]);
        assert_every_flip_detected(&value, BATCH_HEADER_LEN);
    }

    #[test]
    fn truncated_batch_is_rejected() {
        let value = batch_of(&[sample(b"payload", &[])]);
        assert_every_truncation_rejected(&value);
    }

    const HEADER: BatchHeader = BatchHeader {
        record_count: 3,
        first_timestamp_ms: 1,
        last_timestamp_ms: 2,
    };

    /// Three records that compress well (repeated metadata, JSON-like payloads).
    fn compressible_records() -> Vec<u8> {
        [
            sample(br#"{"temp":21.5,"hum":40}"#, &[]),
            sample(br#"{"temp":21.6,"hum":40}"#, &[]),
            sample(br#"{"temp":21.7,"hum":41}"#, &[]),
        ]
        .concat()
    }

    fn compressed(records: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        assert!(encode_compressed_batch(
            HEADER,
            records,
            Compression::Lz4,
            &mut out
        ));
        out
    }

    /// Recomputes a version 2 value's CRC, as a writer of a hostile value would.
    fn reseal(value: &mut [u8]) {
        let crc = crc32fast::hash(&value[BATCH_HEADER_LEN..]);
        value[CRC_AT..CRC_AT + 4].copy_from_slice(&crc.to_be_bytes());
    }

    #[test]
    fn compressed_batch_reads_as_the_uncompressed_one() {
        let records = compressible_records();
        let mut plain = Vec::new();
        encode_batch(HEADER, &records, &mut plain);
        let packed = compressed(&records);
        assert_eq!(packed[1], BATCH_VERSION_COMPRESSED);
        assert!(
            packed.len() < plain.len(),
            "{} >= {}",
            packed.len(),
            plain.len()
        );
        assert_eq!(decode_header(&packed).unwrap(), HEADER);
        assert_eq!(
            decode_batch(9, Bytes::from(packed)).unwrap(),
            decode_batch(9, Bytes::from(plain)).unwrap()
        );
    }

    #[test]
    fn version_1_batch_as_written_before_compression_still_reads() {
        // Laid out byte by byte as release 1 wrote it, not through this code's encoder.
        let body = sample(b"old", &[]);
        let mut value = vec![0xB7, 1, 0, 0, 0, 1];
        value.extend_from_slice(&7u64.to_be_bytes());
        value.extend_from_slice(&8u64.to_be_bytes());
        value.extend_from_slice(&crc32fast::hash(&body).to_be_bytes());
        value.extend_from_slice(&body);
        let header = decode_header(&value).unwrap();
        assert_eq!((header.record_count, header.last_timestamp_ms), (1, 8));
        let r = decode_batch(5, Bytes::from(value)).unwrap();
        assert_eq!((r[0].offset, &r[0].payload[..]), (5, &b"old"[..]));
    }

    #[test]
    fn batch_that_does_not_shrink_is_left_uncompressed() {
        // xorshift: bytes LZ4 finds nothing to repeat in.
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        let payload: Vec<u8> = (0..4000)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                x as u8
            })
            .collect();
        let records = sample(&payload, &[]);
        let mut out = Vec::new();
        assert!(!encode_compressed_batch(
            HEADER,
            &records,
            Compression::Lz4,
            &mut out
        ));
        assert!(!encode_compressed_batch(
            HEADER,
            &compressible_records(),
            Compression::None,
            &mut out
        ));
    }

    #[test]
    fn flipped_byte_in_compressed_batch_is_detected() {
        let value = compressed(&compressible_records());
        assert_every_flip_detected(&value, CRC_AT);
    }

    #[test]
    fn truncated_compressed_batch_is_rejected() {
        let value = Bytes::from(compressed(&compressible_records()));
        assert_every_truncation_rejected(&value);
    }

    #[test]
    fn compressed_body_that_does_not_decompress_is_corrupt_not_a_panic() {
        let value = compressed(&compressible_records());
        // A body cut short, a declared length one too long or too short, under a valid CRC.
        let mut cut = value[..value.len() - 3].to_vec();
        reseal(&mut cut);
        let mut longer = value.clone();
        let declared = u32::from_be_bytes(longer[27..31].try_into().unwrap());
        longer[27..31].copy_from_slice(&(declared + 1).to_be_bytes());
        reseal(&mut longer);
        let mut shorter = value.clone();
        shorter[27..31].copy_from_slice(&(declared - 1).to_be_bytes());
        reseal(&mut shorter);
        for damaged in [cut, longer, shorter] {
            assert!(
                matches!(
                    decode_batch(0, Bytes::from(damaged)),
                    Err(CorruptBatch::Decompress(_))
                ),
                "accepted"
            );
        }
        // Any byte of the body changed under a valid CRC: an error or other records, never
        // a panic.
        for i in BATCH_HEADER_LEN_COMPRESSED..value.len() {
            for flip in [0x01, 0x80, 0xFF] {
                let mut damaged = value.clone();
                damaged[i] ^= flip;
                reseal(&mut damaged);
                let _ = decode_batch(0, Bytes::from(damaged));
            }
        }
        let mut codec = value.clone();
        codec[BATCH_HEADER_LEN] = 9;
        reseal(&mut codec);
        assert_eq!(
            decode_batch(0, Bytes::from(codec)),
            Err(CorruptBatch::Codec(9))
        );
    }

    #[test]
    fn declared_length_beyond_what_the_body_can_expand_to_is_refused() {
        let value = compressed(&compressible_records());
        let stored = value.len() - BATCH_HEADER_LEN_COMPRESSED;
        for declared in [u32::MAX, (stored * LZ4_MAX_EXPANSION + 1) as u32] {
            let mut bomb = value.clone();
            bomb[27..31].copy_from_slice(&declared.to_be_bytes());
            reseal(&mut bomb);
            assert_eq!(
                decode_batch(0, Bytes::from(bomb)),
                Err(CorruptBatch::DeclaredLength { declared, stored })
            );
        }
    }

    #[test]
    fn the_most_compressible_batch_is_within_the_expansion_bound() {
        let records = sample(&vec![0u8; 4 << 20], &[]);
        let mut value = Vec::new();
        let one = BatchHeader {
            record_count: 1,
            ..HEADER
        };
        assert!(encode_compressed_batch(
            one,
            &records,
            Compression::Lz4,
            &mut value
        ));
        assert!(value.len() < records.len() / 200, "{}", value.len());
        let r = decode_batch(0, Bytes::from(value)).unwrap();
        assert_eq!(r[0].payload.len(), 4 << 20);
    }

    proptest! {
        #[test]
        fn any_record_round_trips(
            ts in any::<u64>(),
            key in proptest::collection::vec(any::<u8>(), 0..300),
            topic in "[a-z/]{1,40}",
            qos in 0u8..3,
            retain in any::<bool>(),
            client in "[a-zA-Z0-9-]{0,30}",
            ct in proptest::option::of("[a-z/]{1,20}"),
            props in proptest::collection::vec(("[a-z]{0,8}", "[ -~]{0,8}"), 0..4),
            payload in proptest::collection::vec(any::<u8>(), 0..2000),
        ) {
            let mut body = Vec::new();
            NewRecord {
                timestamp_ms: ts, key: &key, mqtt_topic: topic.as_bytes(), qos, retain,
                client_id: &client, content_type: ct.as_deref(), payload_format: None, message_expiry: None, response_topic: None, correlation_data: None, user_properties: &props,
                payload: &payload,
            }.encode_into(&mut body).unwrap();
            let mut value = Vec::new();
            encode_batch(BatchHeader { record_count: 1, first_timestamp_ms: ts, last_timestamp_ms: ts }, &body, &mut value);
            let r = decode_batch(7, Bytes::from(value)).unwrap().pop().unwrap();
            prop_assert_eq!(r.offset, 7);
            prop_assert_eq!(r.timestamp_ms, ts);
            prop_assert_eq!(&r.key[..], &key[..]);
            prop_assert_eq!(r.headers.mqtt_topic, topic);
            prop_assert_eq!(r.headers.qos, qos);
            prop_assert_eq!(r.headers.retain, retain);
            prop_assert_eq!(r.headers.client_id, client);
            prop_assert_eq!(r.headers.content_type, ct);
            prop_assert_eq!(r.headers.user_properties, props);
            prop_assert_eq!(&r.payload[..], &payload[..]);
        }
    }

    /// A record whose every variable field has length `n` (user properties: `n_props` of
    /// them, each with a name and value of `prop_len` bytes).
    fn at_lengths(n: usize, n_props: usize, prop_len: usize) -> (Vec<u8>, Vec<(String, String)>) {
        let text = "t".repeat(n);
        let bytes = vec![0xA5; n];
        let props: Vec<(String, String)> = (0..n_props)
            .map(|_| ("k".repeat(prop_len), "v".repeat(prop_len)))
            .collect();
        let mut out = vec![0xEE; 3];
        let result = NewRecord {
            timestamp_ms: 9,
            key: &bytes,
            mqtt_topic: text.as_bytes(),
            qos: 2,
            retain: true,
            client_id: &text,
            content_type: Some(&text),
            payload_format: Some(1),
            message_expiry: Some(u32::MAX),
            response_topic: Some(&text),
            correlation_data: Some(&bytes),
            user_properties: &props,
            payload: &bytes,
        }
        .encode_into(&mut out);
        match result {
            Ok(()) => (out, props),
            Err(e) => {
                assert_eq!(
                    out,
                    vec![0xEE; 3],
                    "a refused record leaves the buffer as it was"
                );
                panic!("{e}")
            }
        }
    }

    #[test]
    fn every_field_round_trips_at_its_encoding_limit() {
        let max = u16::MAX as usize;
        let (out, props) = at_lengths(max, 3, max);
        let mut value = Vec::new();
        let header = BatchHeader {
            record_count: 1,
            first_timestamp_ms: 9,
            last_timestamp_ms: 9,
        };
        encode_batch(header, &out[3..], &mut value);
        let r = decode_batch(0, Bytes::from(value)).unwrap().pop().unwrap();
        assert_eq!(r.key.len(), max);
        assert_eq!(r.headers.mqtt_topic.len(), max);
        assert_eq!(r.headers.client_id.len(), max);
        assert_eq!(r.headers.content_type.unwrap().len(), max);
        assert_eq!(r.headers.response_topic.unwrap().len(), max);
        assert_eq!(r.headers.correlation_data.unwrap().len(), max);
        assert_eq!(r.headers.user_properties, props);
        assert_eq!(r.payload.len(), max);
    }

    #[test]
    fn the_most_user_properties_the_count_holds_round_trip() {
        let (out, props) = at_lengths(1, u16::MAX as usize, 0);
        let mut value = Vec::new();
        let header = BatchHeader {
            record_count: 1,
            first_timestamp_ms: 9,
            last_timestamp_ms: 9,
        };
        encode_batch(header, &out[3..], &mut value);
        let r = decode_batch(0, Bytes::from(value)).unwrap().pop().unwrap();
        assert_eq!(r.headers.user_properties.len(), u16::MAX as usize);
        assert_eq!(r.headers.user_properties, props);
    }

    #[test]
    #[should_panic(expected = "user_property_count is 65536")]
    fn one_user_property_past_the_count_is_refused() {
        // The one-packet attack: a PUBLISH with 65,536 user properties used to be written
        // with a wrapped count, and the whole batch became unreadable.
        at_lengths(1, u16::MAX as usize + 1, 0);
    }

    #[test]
    fn one_byte_past_any_short_field_is_refused_and_writes_nothing() {
        let long = "x".repeat(u16::MAX as usize + 1);
        let fields: [(&str, NewRecord<'_>); 6] = {
            let base = NewRecord {
                timestamp_ms: 1,
                key: b"k",
                mqtt_topic: b"t",
                qos: 0,
                retain: false,
                client_id: "c",
                content_type: None,
                payload_format: None,
                message_expiry: None,
                response_topic: None,
                correlation_data: None,
                user_properties: &[],
                payload: b"",
            };
            [
                (
                    "key",
                    NewRecord {
                        key: long.as_bytes(),
                        ..base
                    },
                ),
                (
                    "mqtt_topic",
                    NewRecord {
                        mqtt_topic: long.as_bytes(),
                        ..base
                    },
                ),
                (
                    "client_id",
                    NewRecord {
                        client_id: &long,
                        ..base
                    },
                ),
                (
                    "content_type",
                    NewRecord {
                        content_type: Some(&long),
                        ..base
                    },
                ),
                (
                    "response_topic",
                    NewRecord {
                        response_topic: Some(&long),
                        ..base
                    },
                ),
                (
                    "correlation_data",
                    NewRecord {
                        correlation_data: Some(long.as_bytes()),
                        ..base
                    },
                ),
            ]
        };
        for (name, rec) in fields {
            let mut out = b"before".to_vec();
            let err = rec.encode_into(&mut out).unwrap_err();
            assert_eq!(err.field, name);
            assert_eq!(err.len, u16::MAX as usize + 1);
            assert_eq!(out, b"before", "{name}: nothing written");
        }
        let props = vec![("k".to_string(), long.clone())];
        let mut out = Vec::new();
        let err = NewRecord {
            timestamp_ms: 1,
            key: b"k",
            mqtt_topic: b"t",
            qos: 0,
            retain: false,
            client_id: "c",
            content_type: None,
            payload_format: None,
            message_expiry: None,
            response_topic: None,
            correlation_data: None,
            user_properties: &props,
            payload: b"",
        }
        .encode_into(&mut out)
        .unwrap_err();
        assert_eq!(err.field, "user_property");
        assert!(out.is_empty());
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(24))]
        /// Lengths drawn near the limits of every prefix: whatever the encoder accepts, the
        /// decoder reads back the same; whatever it refuses leaves nothing behind.
        #[test]
        fn records_near_the_limits_round_trip_or_are_refused(
            n in prop_oneof![Just(0usize), 65_530usize..=65_537],
            n_props in prop_oneof![Just(0usize), 65_534usize..=65_537],
        ) {
            let text = "a".repeat(n);
            let props: Vec<(String, String)> = vec![(String::new(), String::new()); n_props];
            let mut out = Vec::new();
            let result = NewRecord {
                timestamp_ms: 5, key: text.as_bytes(), mqtt_topic: text.as_bytes(), qos: 1, retain: false,
                client_id: &text, content_type: Some(&text), payload_format: None, message_expiry: None,
                response_topic: Some(&text), correlation_data: Some(text.as_bytes()), user_properties: &props,
                payload: text.as_bytes(),
            }.encode_into(&mut out);
            let fits = n <= u16::MAX as usize && n_props <= u16::MAX as usize;
            prop_assert_eq!(result.is_ok(), fits);
            if !fits {
                prop_assert!(out.is_empty());
            } else {
                let mut value = Vec::new();
                encode_batch(BatchHeader { record_count: 1, first_timestamp_ms: 5, last_timestamp_ms: 5 }, &out, &mut value);
                let r = decode_batch(3, Bytes::from(value)).unwrap().pop().unwrap();
                prop_assert_eq!(r.headers.mqtt_topic.len(), n);
                prop_assert_eq!(r.headers.correlation_data.map(|c| c.len()), Some(n));
                prop_assert_eq!(r.headers.user_properties.len(), n_props);
                prop_assert_eq!(r.payload.len(), n);
            }
        }
    }
}
