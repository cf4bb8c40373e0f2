//! The edge's configuration: a TOML file whose every key has a default.
//!
//! The doc comment on each field is the user documentation of that key. Defaults live in the
//! `Default` impls of this module's files and nowhere else. `Config::load` parses with
//! `deny_unknown_fields` and then validates each value on its own; every error names the
//! file, the line and the key.
//!
//! This module is the bottom of the edge: it knows TOML and the shape of each section, and
//! nothing of routing, TLS or authentication. What needs them (the routing table, the
//! password, ACL and TLS files, the checks that span sections) is done once at start by
//! `crate::startup`, which reports through the same [`ConfigError`] and [`Source`].
//!
//! One file per section: `mqtt.rs` (`[mqtt]`, `[tls]`), `listeners.rs`, `storage.rs`, `topics.rs`
//! (`[default_route]`, `[topics.*]`, `[[routes]]`, `[[groups]]`), `auth.rs`, `admin.rs`,
//! `cloud.rs`, and `units.rs` (byte sizes and durations as written in the file); every
//! public name is re-exported here.

mod admin;
mod auth;
mod cloud;
mod listeners;
mod mqtt;
mod storage;
mod topics;
mod units;

use std::collections::BTreeMap;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize, Serializer};

pub use admin::AdminConfig;
pub use auth::{AuthConfig, ClientIdPolicy};
pub use cloud::CloudConfig;
pub use listeners::{Listener, ListenerConfig, ListenerProtocol, ListenerTls, DEFAULT_WS_PATH};
pub use mqtt::{
    CertIdentity, InputLimit, MqttConfig, SessionExpiry, TlsConfig, TlsVersion, INPUT_LIMITS,
    MAX_CLIENT_ID_CEILING, MAX_TOPIC_LENGTH_CEILING,
};
pub use storage::{Compression, DiskFullPolicy, FsyncMode, MinFreeSetting, StorageConfig};
pub use topics::{DefaultRoute, GroupConfig, GroupStart, RouteConfig, TopicConfig};
pub use units::{ByteSize, HumanDuration};

/// A configuration that cannot be used, with the place and the key it comes from.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// The file could not be read.
    #[error("config {path}: {source}")]
    Read {
        /// The file that was asked for.
        path: PathBuf,
        /// What the OS said.
        source: std::io::Error,
    },
    /// The TOML is malformed, has an unknown key or a value of the wrong type.
    #[error("config {origin}:{line}: {message}")]
    Parse {
        /// File name, or `<embedded>`.
        origin: String,
        /// 1-based line of the offending key or value.
        line: usize,
        /// The parser's account, which names the key.
        message: String,
    },
    /// The values parse but do not make sense together.
    #[error("config {origin}:{line}: {key}: {message}")]
    Invalid {
        /// File name, or `<embedded>`.
        origin: String,
        /// 1-based line of the offending value (0 when it has no place in the file).
        line: usize,
        /// Dotted path of the key, `routes[0].key`.
        key: String,
        /// What is wrong and how to fix it.
        message: String,
    },
}

/// The whole configuration of an edge node.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The MQTT listener and its protocol limits.
    pub mqtt: MqttConfig,
    /// The sockets MQTT is served on: plain TCP, TLS, WebSocket and WebSocket over TLS.
    pub listeners: Vec<ListenerConfig>,
    /// Where and how the log is stored.
    pub storage: StorageConfig,
    /// Where publishes that match no route go.
    pub default_route: DefaultRoute,
    /// Per-topic settings of the log (partitions, retention), by log topic name.
    pub topics: BTreeMap<String, TopicConfig>,
    /// Routes from MQTT topic filters to log topics, tried in order; the first match wins.
    pub routes: Vec<RouteConfig>,
    /// The uplink to Kafka. Without this section the edge only logs locally.
    pub cloud: Option<CloudConfig>,
    /// The admin HTTP endpoint (health, metrics, JSON API).
    pub admin: AdminConfig,
    /// Who may connect and what they may publish and subscribe to.
    pub auth: AuthConfig,
    /// A TLS listener for MQTT (a shorthand for an `mqtts` entry of `[[listeners]]`).
    pub tls: Option<TlsConfig>,
    /// Durable consumer groups over log topics, read by MQTT clients through shared
    /// subscriptions.
    pub groups: Vec<GroupConfig>,
}

/// Serializes a secret as `"<redacted>"` (for `edge check-config`).
fn redact<S: Serializer>(v: &Option<String>, s: S) -> Result<S::Ok, S::Error> {
    match v {
        Some(_) => s.serialize_str("<redacted>"),
        None => s.serialize_none(),
    }
}

const EMBEDDED: &str = "<embedded>";

/// Config text and the name its errors give it (a file, `<embedded>`, or a command-line
/// option), kept after parsing so that a check made later still points at the line.
#[derive(Debug, Clone)]
pub struct Source {
    /// The TOML text ("" when the config has no text: the embedded defaults).
    pub text: String,
    /// File name, `<embedded>`, or the option that changed the config.
    pub origin: String,
}

impl Source {
    /// Reads a config file.
    pub fn read(path: &Path) -> Result<Source, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.to_path_buf(),
            source,
        })?;
        Ok(Source::new(text, path.display().to_string()))
    }

    /// `text`, named `origin` in errors.
    pub fn new(text: impl Into<String>, origin: impl Into<String>) -> Source {
        Source {
            text: text.into(),
            origin: origin.into(),
        }
    }

    /// The source of a config built in code or of the embedded defaults: errors name no line.
    pub fn embedded() -> Source {
        Source::new("", EMBEDDED)
    }

    /// Parses and validates the text.
    pub fn parse(&self) -> Result<Config, ConfigError> {
        Config::parse(&self.text, &self.origin)
    }

    /// The error for `key`, placed at `span` of the text, or else where the key is written.
    pub fn invalid(&self, span: Option<Range<usize>>, key: String, message: String) -> ConfigError {
        invalid_at(&self.text, &self.origin, span, key, message)
    }
}

/// A value that is wrong on its own, found by a section's `validate`: its dotted key and what
/// to do about it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invalid {
    /// Dotted path of the key, `mqtt.max_packet_size`.
    pub key: String,
    /// What is wrong and how to fix it.
    pub message: String,
}

impl Invalid {
    fn new(key: impl Into<String>, message: impl Into<String>) -> Invalid {
        Invalid {
            key: key.into(),
            message: message.into(),
        }
    }
}

fn invalid_at(
    text: &str,
    origin: &str,
    span: Option<Range<usize>>,
    key: String,
    message: String,
) -> ConfigError {
    let line = match span {
        Some(s) => line_of(text, s.start),
        None => key_line(text, &key),
    };
    ConfigError::Invalid {
        origin: origin.to_string(),
        line,
        key,
        message,
    }
}

/// The line (1-based) where `section.key` is set in `text`, or 0 when it is not written there
/// (a default, or a command-line override). For an entry of an array of tables,
/// `listeners[1].cert_file`, it is the line of the key in the second `[[listeners]]`, or of
/// that `[[listeners]]` itself when the key is missing from it.
fn key_line(text: &str, dotted: &str) -> usize {
    let Some((section, leaf)) = dotted.rsplit_once('.') else {
        return 0;
    };
    // `name[i]`: the i-th `[[name]]` table.
    let entry = section.strip_suffix(']').and_then(|s| {
        let (name, index) = s.split_once('[')?;
        Some((name, index.parse::<usize>().ok()?))
    });
    let mut in_section = false;
    let mut header_line = 0;
    let mut seen = 0;
    for (i, line) in text.lines().enumerate() {
        let t = line.trim();
        if t.starts_with('[') {
            if in_section && header_line > 0 {
                // The entry ended without the key: point at its header.
                return header_line;
            }
            let name = t.trim_matches(|c| c == '[' || c == ']').trim();
            in_section = match entry {
                Some((array, index)) if t.starts_with("[[") && name == array => {
                    seen += 1;
                    if seen == index + 1 {
                        header_line = i + 1;
                    }
                    seen == index + 1
                }
                Some(_) => false,
                None => name == section,
            };
            continue;
        }
        if in_section {
            if let Some(rest) = t.strip_prefix(leaf) {
                if rest.trim_start().starts_with('=') {
                    return i + 1;
                }
            }
        }
    }
    if in_section {
        header_line
    } else {
        0
    }
}

impl Config {
    /// Reads, parses and validates a config file, each value on its own
    /// (`crate::startup::load` completes the checks and loads the files the config names).
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        Source::read(path)?.parse()
    }

    /// Parses config text and validates each value on its own; `origin` names it in errors.
    pub fn parse(text: &str, origin: &str) -> Result<Config, ConfigError> {
        let config: Config = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|span| line_of(text, span.start)).unwrap_or(0);
            ConfigError::Parse {
                origin: origin.to_string(),
                line,
                message: e.message().trim().to_string(),
            }
        })?;
        config
            .validate()
            .map_err(|e| invalid_at(text, origin, None, e.key, e.message))?;
        Ok(config)
    }

    /// The embedded defaults, as `edge` with no arguments uses them.
    pub fn embedded() -> Config {
        Config::default()
    }

    /// Checks each value that can be judged on its own (ranges, settings that must go
    /// together within a section). The checks that need routing, TLS, the auth files or
    /// several sections at once are `crate::startup`'s.
    pub fn validate(&self) -> Result<(), Invalid> {
        self.mqtt.validate()?;
        self.validate_listeners()?;
        self.auth.validate(self.mutual_tls())?;
        self.storage.validate()
    }
}

/// The 1-based line of byte `byte` of `text`.
fn line_of(text: &str, byte: usize) -> usize {
    text.as_bytes()[..byte.min(text.len())]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_file_gives_embedded_defaults() {
        let c = Config::parse("", "t.toml").unwrap();
        assert_eq!(c.listeners()[0].bind.to_string(), "0.0.0.0:1883");
        assert_eq!(c.storage.data_dir, PathBuf::from("./data"));
        assert_eq!(c.storage.fsync, FsyncMode::Always);
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let err = Config::parse(
            "[mqtt]\nlisten = \"127.0.0.1:1\"\nlisten_port = 3\n",
            "e.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("config e.toml:3:"), "{err}");
        assert!(err.contains("listen_port"), "{err}");
    }

    #[test]
    fn keys_of_an_array_of_tables_entry_have_their_line() {
        let text = "[mqtt]\nlisten = \"127.0.0.1:1\"\n\n[[listeners]]\nprotocol = \"ws\"\n\
                    bind = \"127.0.0.1:2\"\n\n[[listeners]]\nprotocol = \"wss\"\n\
                    bind = \"127.0.0.1:3\"\n\n[admin]\nlisten = \"127.0.0.1:4\"\n";
        assert_eq!(key_line(text, "listeners[0].bind"), 6);
        assert_eq!(key_line(text, "listeners[1].bind"), 10);
        // A key the entry lacks: the entry's header.
        assert_eq!(key_line(text, "listeners[1].cert_file"), 8);
        assert_eq!(key_line(text, "listeners[2].bind"), 0);
        assert_eq!(key_line(text, "mqtt.listen"), 2);
        assert_eq!(key_line(text, "admin.listen"), 13);
        assert_eq!(key_line(text, "admin.token_file"), 0);
        let err = Config::parse(text, "e.toml").unwrap_err().to_string();
        assert!(
            err.starts_with("config e.toml:8: listeners[1].cert_file"),
            "{err}"
        );
    }
}
