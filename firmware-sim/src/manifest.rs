//! The manifest: what a run sent and what the broker acknowledged, per device.
//!
//! A manifest is a directory with two files:
//!
//! - `devices.jsonl`: one JSON object per device, in fleet-index order:
//!   `{"index":0,"name":"dev-1","class":0,"qos":1,"topic":"sensors/dev-1/temperature",
//!   "client_id":"sim-dev-1","sent":[[0,99]],"acked":[[0,97]],"refused":[[98,99]]}`. `sent`,
//!   `acked` and `refused` are sorted, disjoint, inclusive ranges of sequence numbers (`refused`
//!   is omitted when empty). `sent` holds every sequence number written to a socket at least
//!   once; `acked` those the broker acknowledged (PUBACK for QoS 1, PUBREC for QoS 2); QoS 0
//!   devices have no `acked`. `client_id` is absent in manifests of older versions of the
//!   simulator; `verify --kafka` then checks only that records carry a client id.
//! - `manifest.json`: the run's header (format, run id, broker, protocol, classes, totals).
//!
//! `devices.jsonl` is written first and `manifest.json` last, each to a temporary name and then
//! renamed, so a `manifest.json` that exists always describes a complete `devices.jsonl`; a
//! verifier waiting for a run to finish waits for `manifest.json`.

use std::fs::File;
use std::io::{BufRead, BufReader, BufWriter, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::error::SimError;
use crate::payload::RunId;
use crate::ranges::SeqRanges;

/// Value of the `format` field.
pub const FORMAT: &str = "tributary-firmware-sim-manifest";
/// Version of the manifest format this code writes and reads.
pub const FORMAT_VERSION: u32 = 1;
/// Header file name.
pub const HEADER_FILE: &str = "manifest.json";
/// Per-device file name.
pub const DEVICES_FILE: &str = "devices.jsonl";

/// What one device sent and had acknowledged.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeviceRecord {
    /// Index in the fleet; binary payloads carry it.
    pub index: u32,
    /// Device name; JSON payloads carry it.
    pub name: String,
    /// Index of the device's class in the header's `classes`.
    pub class: u16,
    /// QoS the device published with.
    pub qos: u8,
    /// Topic the device published to.
    pub topic: String,
    /// MQTT client id the device connected with; absent in manifests written before verify
    /// checked it against the records' headers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_id: Option<String>,
    /// Sequence numbers written to the socket.
    pub sent: SeqRanges,
    /// Sequence numbers the broker acknowledged.
    #[serde(default)]
    pub acked: SeqRanges,
    /// Sequence numbers an MQTT 5 broker refused with a reason code >= 0x80.
    #[serde(default, skip_serializing_if = "SeqRanges::is_empty")]
    pub refused: SeqRanges,
}

/// A device class as recorded in the header.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ClassSummary {
    /// Class name.
    pub name: String,
    /// Number of devices.
    pub devices: u32,
    /// QoS.
    pub qos: u8,
    /// `json` or `binary`.
    pub payload: String,
    /// Payload size setting.
    pub size: usize,
    /// Topic template.
    pub topic: String,
    /// Messages per second per device (absent in flood mode).
    pub rate: Option<f64>,
}

/// Totals over all devices.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Totals {
    /// Messages written to a socket.
    pub sent: u64,
    /// Messages acknowledged.
    pub acked: u64,
    /// Messages refused.
    pub refused: u64,
}

/// The header file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ManifestHeader {
    /// Always [`FORMAT`].
    pub format: String,
    /// Always [`FORMAT_VERSION`] for files this code can read.
    pub version: u32,
    /// The run.
    pub run: RunId,
    /// `normal` or `flood`.
    pub mode: String,
    /// Broker URL.
    pub broker: String,
    /// `3.1.1` or `5`.
    pub protocol: String,
    /// Unix time in microseconds when the run started.
    pub started_at_us: u64,
    /// Unix time in microseconds when the run ended.
    pub finished_at_us: u64,
    /// Device classes.
    pub classes: Vec<ClassSummary>,
    /// Number of devices (lines of `devices.jsonl`).
    pub devices: u64,
    /// Totals.
    pub totals: Totals,
}

/// A manifest read back from disk.
#[derive(Debug, Clone)]
pub struct Manifest {
    /// The header.
    pub header: ManifestHeader,
    /// One record per device, in index order.
    pub devices: Vec<DeviceRecord>,
}

impl Manifest {
    /// A manifest of run `run` over `devices`, as unit tests of its readers need one.
    #[cfg(test)]
    pub(crate) fn for_tests(run: RunId, devices: Vec<DeviceRecord>) -> Manifest {
        Manifest {
            header: ManifestHeader {
                format: FORMAT.into(),
                version: FORMAT_VERSION,
                run,
                mode: "normal".into(),
                broker: "mqtt://x".into(),
                protocol: "5".into(),
                started_at_us: 0,
                finished_at_us: 0,
                classes: vec![],
                devices: devices.len() as u64,
                totals: Totals::default(),
            },
            devices,
        }
    }
}

/// Totals of `devices`.
pub fn totals(devices: &[DeviceRecord]) -> Totals {
    devices.iter().fold(Totals::default(), |t, d| Totals {
        sent: t.sent + d.sent.len(),
        acked: t.acked + d.acked.len(),
        refused: t.refused + d.refused.len(),
    })
}

/// Removes the header of a previous run, so that a verifier waiting for this run's manifest
/// does not take the old one for it. Creates the directory.
pub fn prepare_dir(dir: &Path) -> Result<(), SimError> {
    std::fs::create_dir_all(dir).map_err(|e| SimError::io("creating", dir, e))?;
    let header = dir.join(HEADER_FILE);
    match std::fs::remove_file(&header) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(SimError::io("removing", header, e)),
    }
}

fn write_atomically(
    path: &Path,
    write: impl FnOnce(&mut BufWriter<File>) -> std::io::Result<()>,
) -> Result<(), SimError> {
    let tmp = path.with_extension("tmp");
    let file = File::create(&tmp).map_err(|e| SimError::io("creating", &tmp, e))?;
    let mut out = BufWriter::new(file);
    write(&mut out)
        .and_then(|()| out.flush())
        .and_then(|()| out.get_ref().sync_all())
        .map_err(|e| SimError::io("writing", &tmp, e))?;
    std::fs::rename(&tmp, path).map_err(|e| SimError::io("renaming", path, e))
}

/// Writes `devices.jsonl`, then `manifest.json`, into `dir`.
pub fn write(
    dir: &Path,
    header: &ManifestHeader,
    devices: &[DeviceRecord],
) -> Result<(), SimError> {
    std::fs::create_dir_all(dir).map_err(|e| SimError::io("creating", dir, e))?;
    write_atomically(&dir.join(DEVICES_FILE), |out| {
        for device in devices {
            serde_json::to_writer(&mut *out, device)?;
            out.write_all(b"\n")?;
        }
        Ok(())
    })?;
    write_atomically(&dir.join(HEADER_FILE), |out| {
        serde_json::to_writer_pretty(&mut *out, header)?;
        out.write_all(b"\n")
    })
}

/// Path of the header file in `dir`.
pub fn header_path(dir: &Path) -> PathBuf {
    dir.join(HEADER_FILE)
}

/// Reads a manifest directory.
pub fn read(dir: &Path) -> Result<Manifest, SimError> {
    let header_path = dir.join(HEADER_FILE);
    let text = std::fs::read_to_string(&header_path).map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            SimError::Manifest {
                path: header_path.clone(),
                reason: "not found; pass the directory given to `run --manifest`".into(),
            }
        } else {
            SimError::io("reading", &header_path, e)
        }
    })?;
    let header: ManifestHeader = serde_json::from_str(&text).map_err(|e| SimError::Manifest {
        path: header_path.clone(),
        reason: e.to_string(),
    })?;
    if header.format != FORMAT || header.version != FORMAT_VERSION {
        return Err(SimError::Manifest {
            path: header_path,
            reason: format!(
                "format {:?} version {} is not {FORMAT:?} version {FORMAT_VERSION}",
                header.format, header.version
            ),
        });
    }
    let devices_path = dir.join(DEVICES_FILE);
    let file = File::open(&devices_path).map_err(|e| SimError::io("opening", &devices_path, e))?;
    let mut devices = Vec::with_capacity(header.devices as usize);
    for (n, line) in BufReader::new(file).lines().enumerate() {
        let line = line.map_err(|e| SimError::io("reading", &devices_path, e))?;
        if line.trim().is_empty() {
            continue;
        }
        let record: DeviceRecord = serde_json::from_str(&line).map_err(|e| SimError::Manifest {
            path: devices_path.clone(),
            reason: format!("line {}: {e}", n + 1),
        })?;
        if record.index as usize != devices.len() {
            return Err(SimError::Manifest {
                path: devices_path,
                reason: format!(
                    "line {}: device index {} where {} was expected",
                    n + 1,
                    record.index,
                    devices.len()
                ),
            });
        }
        devices.push(record);
    }
    if devices.len() as u64 != header.devices {
        return Err(SimError::Manifest {
            path: devices_path,
            reason: format!(
                "{} devices where the header announces {}",
                devices.len(),
                header.devices
            ),
        });
    }
    Ok(Manifest { header, devices })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(index: u32, sent: &[(u64, u64)], acked: &[(u64, u64)]) -> DeviceRecord {
        DeviceRecord {
            index,
            name: format!("dev-{}", index + 1),
            class: 0,
            qos: 1,
            topic: format!("sensors/dev-{}/temperature", index + 1),
            client_id: Some(format!("sim-dev-{}", index + 1)),
            sent: sent.to_vec().try_into().unwrap(),
            acked: acked.to_vec().try_into().unwrap(),
            refused: SeqRanges::new(),
        }
    }

    fn header(devices: &[DeviceRecord]) -> ManifestHeader {
        ManifestHeader {
            format: FORMAT.into(),
            version: FORMAT_VERSION,
            run: RunId(0x1234_5678),
            mode: "normal".into(),
            broker: "mqtt://127.0.0.1:1883".into(),
            protocol: "5".into(),
            started_at_us: 1,
            finished_at_us: 2,
            classes: vec![],
            devices: devices.len() as u64,
            totals: totals(devices),
        }
    }

    #[test]
    fn write_then_read_gives_the_same_manifest() {
        let dir = tempfile::tempdir().unwrap();
        let devices = vec![
            record(0, &[(0, 99)], &[(0, 97)]),
            record(1, &[(0, 9), (20, 29)], &[]),
        ];
        let header = header(&devices);
        write(dir.path(), &header, &devices).unwrap();
        let back = read(dir.path()).unwrap();
        assert_eq!(back.header, header);
        assert_eq!(back.devices, devices);
        assert_eq!(back.header.totals.sent, 120);
        assert_eq!(back.header.totals.acked, 98);
    }

    #[test]
    fn a_device_line_stays_compact() {
        let line = serde_json::to_string(&record(0, &[(0, 999_999)], &[(0, 999_999)])).unwrap();
        assert!(line.len() < 160, "{line}");
        assert!(
            !line.contains("refused"),
            "empty refused set is omitted: {line}"
        );
    }

    #[test]
    fn a_device_line_without_client_id_still_reads() {
        let line = r#"{"index":0,"name":"dev-1","class":0,"qos":1,"topic":"t","sent":[[0,1]]}"#;
        let record: DeviceRecord = serde_json::from_str(line).unwrap();
        assert_eq!(record.client_id, None);
        assert_eq!(record.sent.len(), 2);
    }

    #[test]
    fn missing_manifest_names_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(err.contains("manifest.json"), "{err}");
    }

    #[test]
    fn truncated_devices_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let devices = vec![record(0, &[(0, 1)], &[]), record(1, &[(0, 1)], &[])];
        write(dir.path(), &header(&devices), &devices).unwrap();
        let path = dir.path().join(DEVICES_FILE);
        let text = std::fs::read_to_string(&path).unwrap();
        std::fs::write(&path, text.lines().next().unwrap()).unwrap();
        let err = read(dir.path()).unwrap_err().to_string();
        assert!(
            err.contains("1 devices where the header announces 2"),
            "{err}"
        );
    }

    #[test]
    fn preparing_a_directory_removes_the_old_header_only() {
        let dir = tempfile::tempdir().unwrap();
        let devices = vec![record(0, &[(0, 1)], &[])];
        write(dir.path(), &header(&devices), &devices).unwrap();
        prepare_dir(dir.path()).unwrap();
        assert!(!dir.path().join(HEADER_FILE).exists());
        assert!(dir.path().join(DEVICES_FILE).exists());
    }
}
