//! `firmware-sim sink` (hidden): a minimal MQTT endpoint for benchmarks and tests.
//!
//! Without options it accepts CONNECT, answers CONNACK and then discards every byte without
//! parsing: the cheapest possible peer for flood mode at QoS 0. With `--ack` it parses packets
//! and acknowledges QoS 1/2 publishes and pings, which lets normal mode run against it. With
//! `--record FILE` it also appends each PUBLISH to FILE in the `edge read --json` format before
//! acknowledging it, a stand-in for the edge when testing the verifier. It is not a broker:
//! nothing is delivered to subscribers and QoS 2 duplicates are not filtered.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use base64::Engine as _;
use bytes::{Bytes, BytesMut};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::error::SimError;
use crate::wire::{self, AckKind, Frame};

/// What the sink does with what it receives.
#[derive(Debug, Clone)]
pub struct SinkOptions {
    /// Address to listen on, e.g. `127.0.0.1:0`.
    pub listen: String,
    /// Acknowledge publishes and pings.
    pub ack: bool,
    /// Record publishes to this file (implies `ack`).
    pub record: Option<PathBuf>,
}

struct Recorder {
    out: std::io::BufWriter<std::fs::File>,
    offset: u64,
}

fn record_line(
    offset: u64,
    client_id: &str,
    qos: u8,
    retain: bool,
    topic: &Bytes,
    payload: &Bytes,
) -> String {
    let topic = String::from_utf8_lossy(topic);
    let key = topic.split('/').nth(1).unwrap_or(&topic).to_string();
    let (payload, encoding) = match std::str::from_utf8(payload) {
        Ok(text) => (text.to_string(), "utf8"),
        Err(_) => (
            base64::engine::general_purpose::STANDARD.encode(payload),
            "base64",
        ),
    };
    let timestamp_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    serde_json::json!({
        "topic": "telemetry",
        "partition": 0,
        "offset": offset,
        "timestamp_ms": timestamp_ms,
        "key": key,
        "headers": {
            "mqtt_topic": topic,
            "qos": qos,
            "retain": retain,
            "client_id": client_id,
            "content_type": null,
            "user_properties": [],
        },
        "payload": payload,
        "payload_encoding": encoding,
    })
    .to_string()
}

/// Listens until the process is killed. Prints `listening on ADDRESS` on stdout first.
pub async fn serve(options: SinkOptions) -> Result<(), SimError> {
    let listener = TcpListener::bind(&options.listen)
        .await
        .map_err(|e| SimError::invalid("--listen", format!("{}: {e}", options.listen)))?;
    let address = listener
        .local_addr()
        .map_err(|e| SimError::invalid("--listen", e.to_string()))?;
    let recorder = match &options.record {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| SimError::io("opening", path, e))?;
            Some(Arc::new(Mutex::new(Recorder {
                out: std::io::BufWriter::new(file),
                offset: 0,
            })))
        }
        None => None,
    };
    println!("listening on {address}");
    let _ = std::io::stdout().flush();
    let ack = options.ack || recorder.is_some();
    loop {
        let Ok((stream, _)) = listener.accept().await else {
            continue;
        };
        let recorder = recorder.clone();
        tokio::spawn(async move {
            if let Err(e) = connection(stream, ack, recorder).await {
                eprintln!("sink: connection ended: {e}");
            }
        });
    }
}

async fn connection(
    mut stream: TcpStream,
    ack: bool,
    recorder: Option<Arc<Mutex<Recorder>>>,
) -> Result<(), String> {
    let _ = stream.set_nodelay(true);
    let mut input = BytesMut::with_capacity(256 * 1024);
    let protocol = loop {
        if let Some(protocol) = wire::connect_protocol(&input)? {
            break protocol;
        }
        if stream
            .read_buf(&mut input)
            .await
            .map_err(|e| e.to_string())?
            == 0
        {
            return Ok(());
        }
    };
    let client_id = loop {
        match wire::read(protocol, &mut input)? {
            Some(Frame::Connect { client_id }) => break client_id,
            Some(other) => return Err(format!("expected CONNECT, got {other:?}")),
            None => {
                if stream
                    .read_buf(&mut input)
                    .await
                    .map_err(|e| e.to_string())?
                    == 0
                {
                    return Ok(());
                }
            }
        }
    };
    let mut out = BytesMut::new();
    wire::write_connack(protocol, &mut out);
    stream.write_all(&out).await.map_err(|e| e.to_string())?;

    if !ack {
        let mut discard = vec![0u8; 1 << 20];
        loop {
            if stream.read(&mut discard).await.map_err(|e| e.to_string())? == 0 {
                return Ok(());
            }
        }
    }

    let mut lines = Vec::new();
    loop {
        out.clear();
        let mut closing = false;
        while let Some(frame) = wire::read(protocol, &mut input)? {
            match frame {
                Frame::Publish {
                    qos,
                    pkid,
                    retain,
                    topic,
                    payload,
                } => {
                    if recorder.is_some() {
                        lines.push((qos, retain, topic, payload));
                    }
                    match qos {
                        1 => wire::write_ack(protocol, AckKind::PubAck, pkid, &mut out),
                        2 => wire::write_ack(protocol, AckKind::PubRec, pkid, &mut out),
                        _ => {}
                    }
                }
                Frame::PubRel { pkid } => {
                    wire::write_ack(protocol, AckKind::PubComp, pkid, &mut out)
                }
                Frame::PingReq => wire::write_pingresp(protocol, &mut out),
                Frame::Subscribe { pkid, filters } => {
                    wire::write_suback_refusal(protocol, pkid, filters, &mut out)
                }
                Frame::Disconnect => closing = true,
                _ => {}
            }
        }
        if let Some(recorder) = &recorder {
            if !lines.is_empty() {
                // Recorded and flushed before the acknowledgements go out, as the edge does.
                let mut recorder = recorder.lock().expect("recorder lock");
                for (qos, retain, topic, payload) in lines.drain(..) {
                    let line =
                        record_line(recorder.offset, &client_id, qos, retain, &topic, &payload);
                    recorder.offset += 1;
                    writeln!(recorder.out, "{line}").map_err(|e| e.to_string())?;
                }
                recorder.out.flush().map_err(|e| e.to_string())?;
            }
        }
        if !out.is_empty() {
            stream.write_all(&out).await.map_err(|e| e.to_string())?;
        }
        if closing {
            return Ok(());
        }
        if stream
            .read_buf(&mut input)
            .await
            .map_err(|e| e.to_string())?
            == 0
        {
            return Ok(());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_use_the_edge_read_json_shape() {
        let line = record_line(
            4,
            "sim-dev-1",
            1,
            false,
            &Bytes::from_static(b"sensors/dev-1/temperature"),
            &Bytes::from_static(b"\xff\x00"),
        );
        let value: serde_json::Value = serde_json::from_str(&line).unwrap();
        assert_eq!(value["offset"], 4);
        assert_eq!(value["key"], "dev-1");
        assert_eq!(value["headers"]["mqtt_topic"], "sensors/dev-1/temperature");
        assert_eq!(value["payload_encoding"], "base64");
        assert_eq!(value["payload"], "/wA=");
    }
}
