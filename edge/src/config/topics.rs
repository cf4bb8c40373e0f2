//! `[default_route]`, `[topics.<name>]`, `[[routes]]` and `[[groups]]`: the log's topics,
//! how MQTT publishes are routed into them, and the consumer groups that read them.
//!
//! The routing table built from these sections, and its checks, are `crate::route`'s.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use toml::Spanned;

use super::{ByteSize, HumanDuration};

/// `[default_route]`: the log topic of publishes that match no route, keyed by MQTT topic.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct DefaultRoute {
    /// Log topic name.
    pub topic: String,
    /// Partition count of that topic, unless `[topics.<name>]` sets it.
    pub partitions: Option<u32>,
}

impl Default for DefaultRoute {
    fn default() -> Self {
        Self {
            topic: "mqtt".to_string(),
            partitions: None,
        }
    }
}

/// `[topics.<name>]`: settings of one log topic.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct TopicConfig {
    /// Number of partitions (default 1). Partitions can be added later, never removed.
    pub partitions: Option<Spanned<u32>>,
    /// Records older than this are deleted (`"7d"`, `"12h"`). Unset: kept by age forever.
    pub retention: Option<HumanDuration>,
    /// Each partition keeps at most about this many bytes, oldest deleted first, as Kafka's
    /// `retention.bytes`. Unset: no per-partition cap.
    pub retention_bytes: Option<ByteSize>,
}

/// `[[routes]]`: one mapping from MQTT topics to a log topic.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RouteConfig {
    /// MQTT topic filter (`+` and `#` wildcards) that selects the publishes of this route.
    #[serde(rename = "match")]
    pub filter: Spanned<String>,
    /// Log topic the publishes go to.
    pub topic: Spanned<String>,
    /// Partition key template: `{N}` is level N of the MQTT topic (0-based), `{topic}` the
    /// whole MQTT topic, `{client_id}` the publisher's client id; other text is literal.
    /// Default `{topic}`.
    #[serde(default)]
    pub key: Option<Spanned<String>>,
    /// Partition count of the log topic (may instead be set in `[topics.<name>]`).
    #[serde(default)]
    pub partitions: Option<Spanned<u32>>,
}

/// `[[groups]]`: a durable consumer group. MQTT clients that subscribe to
/// `$share/{name}/{filter}` (with the group's own `filter`) become its members: the group's
/// partitions are shared out among the online members, each partition to one member, and
/// each member receives its partitions' records from the log, in offset order, from the
/// group's committed position (those whose MQTT topic matches the group's filter). The
/// position advances past records the member acknowledged, is kept in the data directory,
/// and is replicated to the Kafka consumer group of the same name when `[cloud]` is set.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    /// Group name: the share name members subscribe with, and the Kafka consumer group id.
    pub name: String,
    /// Log topics the group reads.
    pub topics: Vec<String>,
    /// Where a new group (or a partition it has no position in yet) starts: `"earliest"`,
    /// the first record held, or `"latest"`, the records appended from then on.
    #[serde(default)]
    pub start: GroupStart,
    /// The MQTT topic filter of the records the group reads (default `"#"`, all). Members
    /// join with exactly `$share/{name}/{filter}`; any other filter, or (with an ACL) a
    /// member without read rights on all of it or without `group read {name}`, is refused
    /// (SUBACK 0x87; 3.1.1: 0x80). Records outside it are skipped and counted, so no
    /// record the group should see is ever committed unseen.
    #[serde(default = "GroupConfig::all")]
    pub filter: String,
    /// A member that holds records and acknowledges none of them for this long loses its
    /// partitions: what it held goes to another member (DUP set), and it gets partitions
    /// again only after it reconnects.
    #[serde(default = "GroupConfig::default_ack_timeout")]
    pub ack_timeout: HumanDuration,
}

impl GroupConfig {
    fn all() -> String {
        "#".into()
    }

    fn default_ack_timeout() -> HumanDuration {
        HumanDuration(Duration::from_secs(60))
    }
}

/// Where a group without a stored position starts; see `GroupConfig::start`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum GroupStart {
    /// At the first record the partition holds.
    #[default]
    Earliest,
    /// At the partition's end.
    Latest,
}
