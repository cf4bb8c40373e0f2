//! `[storage]`: where the log lives, when acknowledgements wait for fsync, and how much it
//! may hold.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use serde::de::{self, Deserializer};
use serde::{Deserialize, Serialize, Serializer};

use super::{ByteSize, HumanDuration, Invalid};
pub use crate::log::record::Compression;

/// `[storage]`: the log on disk.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct StorageConfig {
    /// Directory of the log. Created if missing; one edge at a time may hold it.
    pub data_dir: PathBuf,
    /// When an acknowledgement is sent relative to the disk:
    /// `"always"` (default): PUBACK/PUBREC only after the group commit is fsynced, so an
    /// acknowledged message survives kill -9 and power loss.
    /// `"interval:<ms>"`: acknowledged once written to the OS, fsynced every <ms>; survives
    /// kill -9, a power cut loses up to <ms> of acknowledged messages.
    /// `"never"`: written to the OS, fsynced only when the OS decides; survives kill -9, a
    /// power cut loses whatever the OS had not written back (typically up to 30 s).
    pub fsync: FsyncMode,
    /// Node-wide cap on the bytes the node stores: record batches as stored plus the keys
    /// and values of its other durable state (sessions, subscriptions, queued deliveries,
    /// retained messages, group positions). Unset: no cap. The files on disk are larger by
    /// the storage engine's own overhead: its journals (pre-allocated, 64 MiB each) and
    /// deleted records whose space compaction has not reclaimed yet; the
    /// `tributary_data_dir_bytes` metric shows what the data directory really occupies, and
    /// `storage.min_free` is what keeps the disk itself from filling.
    pub disk_budget: Option<ByteSize>,
    /// Free space the data directory's file system keeps: a size (`"256MiB"`) or a share of
    /// the file system (`"5%"`). Below it new publishes are refused (5.0: PUBACK/PUBREC 0x97
    /// Quota exceeded; 3.1.1: the connection is closed without an ack) while subscribers,
    /// consumer groups, the mirror and the admin API go on; retention keeps running, and
    /// publishes are accepted again by themselves once space is back. So the log never meets
    /// a full disk in the middle of a write. `"0"` turns the floor off.
    pub min_free: MinFreeSetting,
    /// What happens when the log reaches `disk_budget`: `"reject"` refuses new publishes
    /// (5.0: PUBACK 0x97 Quota exceeded; 3.1.1: the connection is closed without an ack), or
    /// `"drop-oldest"` deletes the oldest records of the node, counted and logged.
    pub disk_full_policy: DiskFullPolicy,
    /// How record batches are stored: `"lz4"` (default) compresses each batch of a group
    /// commit as one LZ4 block, so the journal and the tables hold the compressed bytes (a
    /// batch that does not shrink is stored as it is); `"none"` stores records as they are.
    /// Batches already stored stay readable whichever is set, so it can be changed at any
    /// restart. `zstd` is not offered: no pure-Rust zstd encoder is production-ready, and the
    /// edge builds without a C toolchain.
    pub compression: Compression,
    /// Most records stored in one batch value; bigger group commits are split.
    pub max_batch_records: usize,
    /// How often retention (age and bytes) is applied.
    pub retention_check_interval: HumanDuration,
    /// A forward step of the wall clock larger than this between two retention checks is
    /// taken as a correction (NTP fixing a gateway that booted with a wrong clock), not as
    /// time passing: it is logged, and records received before it are aged as that much
    /// younger, so age retention does not delete everything received before the correction.
    /// The byte limits and `disk_budget` still apply.
    pub max_clock_jump: HumanDuration,
}

impl Default for StorageConfig {
    fn default() -> Self {
        Self {
            data_dir: PathBuf::from("./data"),
            fsync: FsyncMode::Always,
            disk_budget: None,
            min_free: MinFreeSetting::Bytes(ByteSize(256 << 20)),
            disk_full_policy: DiskFullPolicy::Reject,
            compression: Compression::Lz4,
            max_batch_records: 1000,
            retention_check_interval: HumanDuration(Duration::from_secs(10)),
            max_clock_jump: HumanDuration(Duration::from_secs(5 * 60)),
        }
    }
}

impl StorageConfig {
    /// Checks the batch size, the retention interval and the budget.
    pub fn validate(&self) -> Result<(), Invalid> {
        let s = self;
        if s.max_batch_records == 0 || s.max_batch_records > 1_000_000 {
            return Err(Invalid::new(
                "storage.max_batch_records",
                "must be between 1 and 1000000",
            ));
        }
        if s.retention_check_interval.0.is_zero() {
            return Err(Invalid::new(
                "storage.retention_check_interval",
                "must be longer than 0",
            ));
        }
        if let MinFreeSetting::Percent(p) = s.min_free {
            if !(0.0..100.0).contains(&p) {
                return Err(Invalid::new(
                    "storage.min_free",
                    "a share of the disk must be at least 0% and below 100%",
                ));
            }
        }
        if let Some(b) = s.disk_budget {
            if b.0 == 0 {
                return Err(Invalid::new(
                    "storage.disk_budget",
                    "0 would refuse every publish: remove the key for no budget",
                ));
            }
        }
        Ok(())
    }
}

/// `storage.min_free`: bytes, or a percent of the file system.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum MinFreeSetting {
    /// At least this many bytes free.
    Bytes(ByteSize),
    /// At least this share of the file system free, in percent.
    Percent(f64),
}

impl MinFreeSetting {
    /// The floor for the log, `None` when it is off (0).
    pub fn floor(self) -> Option<crate::log::MinFree> {
        match self {
            MinFreeSetting::Bytes(ByteSize(0)) => None,
            MinFreeSetting::Bytes(b) => Some(crate::log::MinFree::Bytes(b.0)),
            MinFreeSetting::Percent(p) if p <= 0.0 => None,
            MinFreeSetting::Percent(p) => Some(crate::log::MinFree::Percent(p)),
        }
    }
}

impl std::str::FromStr for MinFreeSetting {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s.trim().strip_suffix('%') {
            Some(p) => p
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|p| p.is_finite())
                .map(MinFreeSetting::Percent)
                .ok_or_else(|| format!("\"{s}\" is not a percent: write it as \"5%\"")),
            None => s.parse().map(MinFreeSetting::Bytes),
        }
    }
}

impl fmt::Display for MinFreeSetting {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MinFreeSetting::Bytes(b) => write!(f, "{b}"),
            MinFreeSetting::Percent(p) => write!(f, "{p}%"),
        }
    }
}

impl Serialize for MinFreeSetting {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match self {
            MinFreeSetting::Bytes(b) => b.serialize(s),
            MinFreeSetting::Percent(_) => s.serialize_str(&self.to_string()),
        }
    }
}

impl<'de> Deserialize<'de> for MinFreeSetting {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(MinFreeSetting::Bytes(ByteSize(n))),
            Raw::Text(s) => s.parse().map_err(de::Error::custom),
        }
    }
}

/// How acknowledgements relate to fsync; see `StorageConfig::fsync`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FsyncMode {
    /// fsync every group commit before acknowledging it.
    Always,
    /// Write to the OS before acknowledging, fsync on a timer.
    Interval(Duration),
    /// Write to the OS before acknowledging, never fsync explicitly.
    Never,
}

impl fmt::Display for FsyncMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FsyncMode::Always => write!(f, "always"),
            FsyncMode::Interval(d) => write!(f, "interval:{}", d.as_millis()),
            FsyncMode::Never => write!(f, "never"),
        }
    }
}

impl std::str::FromStr for FsyncMode {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "always" => Ok(FsyncMode::Always),
            "never" => Ok(FsyncMode::Never),
            other => {
                let ms = other.strip_prefix("interval:").ok_or_else(|| {
                    format!("\"{other}\" is not a fsync mode: use \"always\", \"interval:<ms>\" or \"never\"")
                })?;
                let ms: u64 = ms.parse().map_err(|_| {
                    format!(
                        "\"{other}\": the interval must be whole milliseconds, as \"interval:10\""
                    )
                })?;
                if ms == 0 {
                    return Err("\"interval:0\": the interval must be at least 1 ms".into());
                }
                Ok(FsyncMode::Interval(Duration::from_millis(ms)))
            }
        }
    }
}

impl Serialize for FsyncMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for FsyncMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

impl fmt::Display for Compression {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Compression::None => "none",
            Compression::Lz4 => "lz4",
        })
    }
}

impl std::str::FromStr for Compression {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "lz4" => Ok(Compression::Lz4),
            "none" => Ok(Compression::None),
            "zstd" => Err("\"zstd\" is not offered (no pure-Rust zstd encoder is production-ready): use \"lz4\" or \"none\"".into()),
            other => Err(format!(
                "\"{other}\" is not a compression: use \"lz4\" or \"none\""
            )),
        }
    }
}

impl Serialize for Compression {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Compression {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(de::Error::custom)
    }
}

/// What to do when the disk budget is reached; see `StorageConfig::disk_full_policy`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskFullPolicy {
    /// Refuse new publishes.
    Reject,
    /// Delete the oldest records of the node.
    DropOldest,
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    #[test]
    fn bad_fsync_mode_is_explained() {
        let err = Config::parse("[storage]\nfsync = \"sometimes\"\n", "e.toml")
            .unwrap_err()
            .to_string();
        assert!(err.contains("e.toml:2"), "{err}");
        assert!(err.contains("interval:<ms>"), "{err}");
    }

    #[test]
    fn compression_defaults_to_lz4_and_unknown_values_are_explained() {
        let c = Config::parse("", "t").unwrap();
        assert_eq!(c.storage.compression, Compression::Lz4);
        let c = Config::parse("[storage]\ncompression = \"none\"\n", "t").unwrap();
        assert_eq!(c.storage.compression, Compression::None);
        for bad in ["zstd", "gzip", "LZ4"] {
            let err = Config::parse(&format!("[storage]\ncompression = \"{bad}\"\n"), "e.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains("e.toml:2"), "{bad}: {err}");
            assert!(err.contains("use \"lz4\" or \"none\""), "{bad}: {err}");
        }
    }

    #[test]
    fn fsync_interval_parses() {
        let c = Config::parse("[storage]\nfsync = \"interval:25\"\n", "t").unwrap();
        assert_eq!(
            c.storage.fsync,
            FsyncMode::Interval(Duration::from_millis(25))
        );
    }

    #[test]
    fn min_free_takes_a_size_or_a_percent() {
        let c = Config::parse("", "t").unwrap();
        assert_eq!(
            c.storage.min_free.floor(),
            Some(crate::log::MinFree::Bytes(256 << 20)),
            "on by default"
        );
        let c = Config::parse("[storage]\nmin_free = \"5%\"\n", "t").unwrap();
        assert_eq!(
            c.storage.min_free.floor(),
            Some(crate::log::MinFree::Percent(5.0))
        );
        let c = Config::parse("[storage]\nmin_free = \"1GiB\"\n", "t").unwrap();
        assert_eq!(
            c.storage.min_free.floor(),
            Some(crate::log::MinFree::Bytes(1 << 30))
        );
        let c = Config::parse("[storage]\nmin_free = 0\n", "t").unwrap();
        assert_eq!(c.storage.min_free.floor(), None);
        for bad in ["\"100%\"", "\"-1%\"", "\"lots\"", "\"x%\""] {
            let err = Config::parse(&format!("[storage]\nmin_free = {bad}\n"), "e.toml")
                .unwrap_err()
                .to_string();
            assert!(
                err.contains("min_free") || err.contains("e.toml:2"),
                "{bad}: {err}"
            );
        }
    }
}
