//! The mirror of a build without the `kafka` feature: there is no Kafka client to mirror
//! with, so [`Mirror::start`] refuses with [`MirrorError::KafkaNotBuilt`] and no [`Mirror`]
//! ever exists. `Mirror` has no values at all (its one field has none), so code that holds an `Option<Mirror>` compiles
//! unchanged and its `Some` branches are never taken.

use std::sync::Arc;
use std::time::Duration;

use prometheus_client::metrics::histogram::Histogram;

use crate::config::MirrorConfig;
pub use crate::error::MirrorError;
use crate::source::PartitionedSource;
use crate::status::MirrorStatus;

/// A running mirror; in this build there can be none.
#[derive(Debug)]
pub struct Mirror {
    /// No value of this type exists, so neither does a `Mirror`.
    never: std::convert::Infallible,
}

impl Mirror {
    /// Refuses: this build cannot mirror.
    pub fn start(
        config: MirrorConfig,
        source: Arc<dyn PartitionedSource>,
    ) -> Result<Mirror, MirrorError> {
        Mirror::start_after(config, source, None)
    }

    /// Refuses: this build cannot mirror.
    pub fn start_after(
        _config: MirrorConfig,
        _source: Arc<dyn PartitionedSource>,
        _previous: Option<MirrorStatus>,
    ) -> Result<Mirror, MirrorError> {
        Err(MirrorError::KafkaNotBuilt)
    }

    /// Durations of the transaction commits; unreachable, as no mirror exists.
    pub fn commit_latency(&self) -> &Histogram {
        match self.never {}
    }

    /// A snapshot of where every partition stands; unreachable, as no mirror exists.
    pub fn status(&self) -> MirrorStatus {
        match self.never {}
    }

    /// Stops the mirror; unreachable, as no mirror exists.
    pub fn stop(self, _grace: Duration) -> MirrorStatus {
        match self.never {}
    }
}
