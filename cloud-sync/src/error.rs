//! Why a mirror could not start.

/// Why a mirror could not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum MirrorError {
    /// A setting is invalid.
    #[error("{key}: {message}")]
    Config {
        /// The setting.
        key: &'static str,
        /// What is wrong.
        message: String,
    },
    /// The mirror thread could not be started.
    #[error("starting the mirror thread: {0}")]
    Thread(std::io::Error),
    /// This build has no Kafka client: cloud-sync was built without its `kafka` feature.
    #[error(
        "this build has no Kafka client (built without the cargo feature `kafka`); \
         build with default features to mirror to Kafka"
    )]
    KafkaNotBuilt,
}
