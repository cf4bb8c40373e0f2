//! The error type of the firmware-sim library.

use std::path::PathBuf;

/// Everything that can stop a `run`, a `verify` or the test sink.
///
/// Each variant names the option, file or broker involved so that the message alone tells the
/// user what to fix.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum SimError {
    /// A command-line option or scenario field has a value that cannot work.
    #[error("{option}: {reason}")]
    InvalidOption {
        /// The option as the user wrote it, e.g. `--rate` or `class "vibration".rate`.
        option: String,
        /// What is wrong and what would be accepted.
        reason: String,
    },

    /// The scenario file could not be read or parsed.
    #[error("scenario {path}: {reason}")]
    Scenario {
        /// The scenario file.
        path: PathBuf,
        /// The parser's message, which carries the line and column.
        reason: String,
    },

    /// A file or directory could not be read or written.
    #[error("{action} {path}: {source}")]
    Io {
        /// What was being done, e.g. "reading" or "creating".
        action: &'static str,
        /// The file or directory.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },

    /// A manifest directory is missing a file or holds something that is not a manifest.
    #[error("manifest {path}: {reason}")]
    Manifest {
        /// The manifest file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// A line of an `edge read --json` file is not a record the edge writes.
    #[error("edge log {path}:{line}: {reason}")]
    EdgeLog {
        /// The edge log file.
        path: PathBuf,
        /// The 1-based line number.
        line: u64,
        /// What is wrong with the line.
        reason: String,
    },

    /// A TLS file (CA, client certificate or key) is unusable.
    #[error("{option} {path}: {reason}")]
    Tls {
        /// The option that named the file.
        option: &'static str,
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        reason: String,
    },

    /// The broker could not be reached or refused the connection.
    #[error("broker {url}: {reason}")]
    Broker {
        /// The broker URL as given.
        url: String,
        /// The connection error.
        reason: String,
    },

    /// The Kafka cluster of `verify --kafka` could not be read: unreachable, a topic that
    /// does not exist, a setting librdkafka refuses, a fatal consumer error.
    #[error("Kafka {bootstrap}: {reason}")]
    Kafka {
        /// The bootstrap servers as given to `--kafka`.
        bootstrap: String,
        /// What went wrong, and what to check.
        reason: String,
    },
}

impl SimError {
    /// Shorthand for [`SimError::InvalidOption`].
    pub fn invalid(option: impl Into<String>, reason: impl Into<String>) -> Self {
        SimError::InvalidOption {
            option: option.into(),
            reason: reason.into(),
        }
    }

    /// Shorthand for [`SimError::Io`].
    pub fn io(action: &'static str, path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        SimError::Io {
            action,
            path: path.into(),
            source,
        }
    }
}
