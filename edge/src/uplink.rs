//! The uplink: the edge's log as a [`PartitionedSource`] for cloud-sync's mirror, and the
//! mirror status file that `edge mirror-status` reads.
//!
//! The status file is `mirror-status.json` in the data directory, rewritten (write to a
//! temporary file, then rename) every second while the mirror runs, and once more when the
//! edge stops. It is the mirror's own account: the mirrored offsets are what the last
//! committed Kafka transaction covered.

use std::borrow::Cow;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use cloud_sync::{
    Header, MirrorStatus, PartitionBounds, PartitionedSource, SourceError, SourceRecord,
    SourceTopic,
};

use crate::groups::Groups;
use crate::log::record::Record;
use crate::log::Log;

/// File name of the mirror status in the data directory.
pub const STATUS_FILE: &str = "mirror-status.json";

/// The path of the status file in `data_dir`.
pub fn status_path(data_dir: &Path) -> PathBuf {
    data_dir.join(STATUS_FILE)
}

/// The edge log, read by the mirror, with the positions of its consumer groups.
#[derive(Debug, Clone)]
pub struct LogSource {
    log: Arc<Log>,
    /// The consumer groups whose positions the mirror replicates.
    groups: Option<Arc<Groups>>,
}

impl LogSource {
    /// The log alone.
    pub fn new(log: Arc<Log>) -> LogSource {
        LogSource::with_groups(log, None)
    }

    /// The log and the groups.
    pub fn with_groups(log: Arc<Log>, groups: Option<Arc<Groups>>) -> LogSource {
        LogSource { log, groups }
    }

    fn partition(
        &self,
        topic: &str,
        partition: u32,
    ) -> Result<(&crate::log::TopicLog, &crate::log::PartitionState), SourceError> {
        let unknown = || SourceError::UnknownPartition {
            topic: topic.to_string(),
            partition,
        };
        let t = self.log.topic(topic).ok_or_else(unknown)?;
        let p = t.partitions.get(partition as usize).ok_or_else(unknown)?;
        Ok((t, p))
    }
}

impl PartitionedSource for LogSource {
    fn identity(&self) -> Option<cloud_sync::SourceIdentity> {
        Some(source_identity(&self.log.identity()))
    }

    fn topics(&self) -> Vec<SourceTopic> {
        self.log
            .topics()
            .iter()
            .map(|t| SourceTopic {
                name: t.name.clone(),
                partitions: t.partitions.len() as u32,
            })
            .collect()
    }

    fn bounds(&self, topic: &str, partition: u32) -> Result<PartitionBounds, SourceError> {
        let (_, p) = self.partition(topic, partition)?;
        let end = p.durable_end();
        Ok(PartitionBounds {
            start: p.start().min(end),
            end,
            bytes: p.bytes(),
        })
    }

    fn read(
        &self,
        topic: &str,
        partition: u32,
        from: u64,
        max_records: usize,
        out: &mut Vec<SourceRecord>,
    ) -> Result<(), SourceError> {
        let (t, p) = self.partition(topic, partition)?;
        let end = p.durable_end();
        let start = p.start();
        let available = end.saturating_sub(from.max(start)) as usize;
        let records = self
            .log
            .read(t.id, partition, from, max_records.min(available))
            .map_err(|e| SourceError::Read {
                topic: topic.to_string(),
                partition,
                message: e.to_string(),
            })?;
        out.extend(
            records
                .into_iter()
                .take_while(|r| r.offset < end)
                .map(source_record),
        );
        Ok(())
    }

    fn group_positions(&self) -> Vec<cloud_sync::GroupPosition> {
        self.groups
            .as_ref()
            .map(|g| g.positions())
            .unwrap_or_default()
    }
}

/// The Kafka form of a record: MQTT metadata as `mqtt.*` headers, then each user property.
fn source_record(r: Record) -> SourceRecord {
    let h = r.headers;
    let mut headers = Vec::with_capacity(4 + h.user_properties.len());
    headers.push(Header {
        name: Cow::Borrowed("mqtt.topic"),
        value: Cow::Owned(h.mqtt_topic.into_bytes()),
    });
    headers.push(Header {
        name: Cow::Borrowed("mqtt.client_id"),
        value: Cow::Owned(h.client_id.into_bytes()),
    });
    headers.push(Header {
        name: Cow::Borrowed("mqtt.qos"),
        value: Cow::Borrowed(match h.qos {
            0 => b"0",
            1 => b"1",
            _ => b"2",
        }),
    });
    headers.push(Header {
        name: Cow::Borrowed("mqtt.retain"),
        value: Cow::Borrowed(if h.retain { b"true" } else { b"false" }),
    });
    if let Some(ct) = h.content_type {
        headers.push(Header {
            name: Cow::Borrowed("mqtt.content_type"),
            value: Cow::Owned(ct.into_bytes()),
        });
    }
    if let Some(rt) = h.response_topic {
        headers.push(Header {
            name: Cow::Borrowed("mqtt.response_topic"),
            value: Cow::Owned(rt.into_bytes()),
        });
    }
    if let Some(cd) = h.correlation_data {
        headers.push(Header {
            name: Cow::Borrowed("mqtt.correlation_data"),
            value: Cow::Owned(cd.to_vec()),
        });
    }
    for (k, v) in h.user_properties {
        headers.push(Header {
            name: Cow::Owned(k),
            value: Cow::Owned(v.into_bytes()),
        });
    }
    SourceRecord {
        offset: r.offset,
        timestamp_ms: r.timestamp_ms,
        key: r.key,
        payload: r.payload,
        headers,
    }
}

/// The log identity as the mirror writes it into checkpoints.
pub fn source_identity(identity: &crate::log::meta::LogIdentity) -> cloud_sync::SourceIdentity {
    use crate::log::meta::{id_hex, UnmarkedCheckpoints as Stored};
    cloud_sync::SourceIdentity {
        id: id_hex(&identity.id),
        unmarked: match identity.unmarked {
            Stored::Refused => cloud_sync::UnmarkedCheckpoints::Refused,
            Stored::Own => cloud_sync::UnmarkedCheckpoints::Own,
            Stored::Predecessor => cloud_sync::UnmarkedCheckpoints::Predecessor,
        },
        predecessors: identity.predecessors.iter().map(id_hex).collect(),
    }
}

/// Writes `status` to the status file of `data_dir`, atomically.
pub fn write_status(data_dir: &Path, status: &MirrorStatus) -> std::io::Result<()> {
    let path = status_path(data_dir);
    let tmp = path.with_extension("json.tmp");
    let text = serde_json::to_vec_pretty(status).map_err(std::io::Error::other)?;
    std::fs::write(&tmp, text)?;
    std::fs::rename(&tmp, &path)
}

/// Reads the status file of `data_dir`.
pub fn read_status(data_dir: &Path) -> Result<MirrorStatus, String> {
    let path = status_path(data_dir);
    let text = std::fs::read(&path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            format!(
                "no mirror status in {}: the edge has not run with a [cloud] section there",
                data_dir.display()
            )
        } else {
            format!("{}: {e}", path.display())
        }
    })?;
    serde_json::from_slice(&text).map_err(|e| format!("{}: {e}", path.display()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::FsyncMode;
    use crate::log::appender::{self, AppendRequest, Appender, PendingRecord};
    use crate::log::record::Compression;
    use crate::log::record::NewRecord;

    /// Appends `n` records to partition 0 of the default topic and waits for the commit.
    fn append(tx: &Appender, n: usize) {
        let mut req = AppendRequest::default();
        let props = [("site".to_string(), "7".to_string())];
        for i in 0..n {
            let payload = format!("p{i}");
            let start = req.buf.len();
            NewRecord {
                timestamp_ms: 1000 + i as u64,
                key: b"k",
                mqtt_topic: b"a/b",
                qos: 1,
                retain: false,
                client_id: "dev",
                content_type: Some("text/plain"),
                payload_format: None,
                message_expiry: None,
                response_topic: None,
                correlation_data: None,
                user_properties: &props,
                payload: payload.as_bytes(),
            }
            .encode_into(&mut req.buf)
            .unwrap();
            req.records.push(PendingRecord {
                topic: 0,
                partition: 0,
                start: start as u32,
                len: (req.buf.len() - start) as u32,
                timestamp_ms: 1000 + i as u64,
            });
        }
        tx.blocking_commit(req).unwrap();
    }

    fn open(dir: &Path) -> Arc<Log> {
        let plan = crate::config::Config::default().route_plan().unwrap();
        Arc::new(Log::open(dir, Some(&plan.topics), None).unwrap())
    }

    #[test]
    fn interval_mode_exposes_only_fsynced_records() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let (tx, thread) = appender::spawn(
            log.clone(),
            FsyncMode::Interval(std::time::Duration::from_secs(3600)),
            Compression::Lz4,
            1000,
            16,
            1,
            |_| {},
        );
        let source = LogSource::new(log.clone());
        append(&tx, 5);
        assert_eq!(source.bounds("mqtt", 0).unwrap().end, 0);
        let mut out = Vec::new();
        source.read("mqtt", 0, 0, 100, &mut out).unwrap();
        assert!(out.is_empty(), "unsynced records must not be mirrored");
        tx.blocking_persist().unwrap();
        tx.blocking_shutdown();
        drop(tx);
        thread.join().unwrap().unwrap();
        assert_eq!(source.bounds("mqtt", 0).unwrap().end, 5);
        source.read("mqtt", 0, 2, 100, &mut out).unwrap();
        assert_eq!(
            out.iter().map(|r| r.offset).collect::<Vec<_>>(),
            vec![2, 3, 4]
        );
    }

    #[test]
    fn records_carry_mqtt_metadata_as_headers() {
        let dir = tempfile::tempdir().unwrap();
        let log = open(dir.path());
        let (tx, thread) = appender::spawn(
            log.clone(),
            FsyncMode::Always,
            Compression::Lz4,
            1000,
            16,
            1,
            |_| {},
        );
        append(&tx, 2);
        tx.blocking_shutdown();
        drop(tx);
        thread.join().unwrap().unwrap();
        let mut out = Vec::new();
        LogSource::new(log)
            .read("mqtt", 0, 1, 10, &mut out)
            .unwrap();
        assert_eq!(out.len(), 1);
        let r = &out[0];
        assert_eq!((r.offset, r.timestamp_ms), (1, 1001));
        assert_eq!(&r.key[..], b"k");
        assert_eq!(&r.payload[..], b"p1");
        let headers: Vec<(&str, &[u8])> = r.headers.iter().map(|h| (&*h.name, &*h.value)).collect();
        assert_eq!(
            headers,
            vec![
                ("mqtt.topic", &b"a/b"[..]),
                ("mqtt.client_id", b"dev"),
                ("mqtt.qos", b"1"),
                ("mqtt.retain", b"false"),
                ("mqtt.content_type", b"text/plain"),
                ("site", b"7"),
            ]
        );
    }
}
