//! Routing: an MQTT topic becomes a log topic, a partition key and a partition.
//!
//! Routes are tried in configured order and the first whose filter matches wins; a publish no
//! route matches goes to the default topic keyed by its MQTT topic. The partition is
//! `murmur2(key) & 0x7fffffff mod partitions`, exactly Kafka's default partitioner, so a key
//! lands on the same partition number at the edge and in the mirrored Kafka topic.

use std::collections::BTreeMap;
use std::time::Duration;

use crate::config::{Config, ConfigError, Source};

/// An MQTT topic filter, split into levels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TopicFilter {
    levels: Vec<FilterLevel>,
    text: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum FilterLevel {
    Exact(String),
    /// `+`
    Single,
    /// `#`, always last.
    Rest,
}

impl TopicFilter {
    /// Parses a filter, enforcing MQTT's rules on where `+` and `#` may stand.
    pub fn parse(text: &str) -> Result<TopicFilter, String> {
        if text.is_empty() {
            return Err("an empty topic filter matches nothing".into());
        }
        let parts: Vec<&str> = text.split('/').collect();
        let mut levels = Vec::with_capacity(parts.len());
        for (i, part) in parts.iter().enumerate() {
            let level = match *part {
                "+" => FilterLevel::Single,
                "#" if i == parts.len() - 1 => FilterLevel::Rest,
                "#" => {
                    return Err(format!(
                        "filter \"{text}\": '#' must be the last level"
                    ))
                }
                p if p.contains('+') || p.contains('#') => {
                    return Err(format!(
                        "filter \"{text}\": a wildcard must fill a whole level, as \"a/+/b\" or \"a/#\""
                    ))
                }
                p => FilterLevel::Exact(p.to_string()),
            };
            levels.push(level);
        }
        Ok(TopicFilter {
            levels,
            text: text.to_string(),
        })
    }

    /// The filter as written.
    pub fn as_str(&self) -> &str {
        &self.text
    }

    /// Number of levels, counting a trailing `#` as one.
    pub fn level_count(&self) -> usize {
        self.levels.len()
    }

    /// Whether level `n` exists in every topic this filter matches.
    fn guarantees_level(&self, n: usize) -> bool {
        match self.levels.last() {
            Some(FilterLevel::Rest) => n < self.levels.len() - 1,
            _ => n < self.levels.len(),
        }
    }

    /// MQTT matching: `+` one level, `#` this level and all below (including none), and a
    /// leading wildcard does not match a topic that starts with `$`.
    pub fn matches(&self, topic: &str) -> bool {
        if topic.starts_with('$')
            && matches!(
                self.levels.first(),
                Some(FilterLevel::Single | FilterLevel::Rest)
            )
        {
            return false;
        }
        let mut topic_levels = topic.split('/');
        for level in &self.levels {
            match level {
                FilterLevel::Rest => return true,
                FilterLevel::Single => {
                    if topic_levels.next().is_none() {
                        return false;
                    }
                }
                FilterLevel::Exact(want) => match topic_levels.next() {
                    Some(got) if got == want => {}
                    _ => return false,
                },
            }
        }
        topic_levels.next().is_none()
    }
}

/// A partition key template such as `"{1}"`, `"{client_id}"` or `"site-{0}-{2}"`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct KeyTemplate {
    parts: Vec<KeyPart>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum KeyPart {
    Literal(String),
    Level(usize),
    Topic,
    ClientId,
}

impl KeyTemplate {
    /// Parses a template and checks that every `{N}` exists in all topics `filter` matches.
    pub fn parse(text: &str, filter: &TopicFilter) -> Result<KeyTemplate, String> {
        let mut parts = Vec::new();
        let mut rest = text;
        while !rest.is_empty() {
            match rest.find('{') {
                None => {
                    parts.push(KeyPart::Literal(rest.to_string()));
                    break;
                }
                Some(open) => {
                    if open > 0 {
                        parts.push(KeyPart::Literal(rest[..open].to_string()));
                    }
                    let close = rest[open..].find('}').ok_or_else(|| {
                        format!("'{{' at byte {open} is never closed: write {{N}}, {{topic}} or {{client_id}}")
                    })? + open;
                    let name = &rest[open + 1..close];
                    let part = match name {
                        "topic" => KeyPart::Topic,
                        "client_id" => KeyPart::ClientId,
                        n => {
                            let level: usize = n.parse().map_err(|_| {
                                format!("{{{n}}} is not a placeholder: write {{N}} (a topic level from 0), {{topic}} or {{client_id}}")
                            })?;
                            if !filter.guarantees_level(level) {
                                return Err(format!(
                                    "the filter \"{}\" has only {} levels",
                                    filter.as_str(),
                                    filter.level_count()
                                ));
                            }
                            KeyPart::Level(level)
                        }
                    };
                    parts.push(part);
                    rest = &rest[close + 1..];
                }
            }
        }
        if parts.is_empty() {
            return Err("an empty key would send every message to one partition: remove the key to use {topic}".into());
        }
        Ok(KeyTemplate { parts })
    }

    /// Renders the key of one publish into `out`.
    pub fn render_into(&self, topic: &str, client_id: &str, out: &mut Vec<u8>) {
        for part in &self.parts {
            match part {
                KeyPart::Literal(s) => out.extend_from_slice(s.as_bytes()),
                KeyPart::Topic => out.extend_from_slice(topic.as_bytes()),
                KeyPart::ClientId => out.extend_from_slice(client_id.as_bytes()),
                KeyPart::Level(n) => {
                    if let Some(level) = topic.split('/').nth(*n) {
                        out.extend_from_slice(level.as_bytes())
                    }
                }
            }
        }
    }
}

/// Index of a log topic in the node's topic table.
pub type TopicId = u32;

/// Where one publish goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Destination {
    /// Log topic.
    pub topic: TopicId,
    /// Partition within it.
    pub partition: u32,
    /// Partition key.
    pub key: Vec<u8>,
}

/// The routing table, shared read-only by every connection.
#[derive(Debug)]
pub struct Router {
    routes: Vec<(TopicFilter, TopicId, KeyTemplate)>,
    default_topic: TopicId,
    partitions: Vec<u32>,
}

impl Router {
    /// Builds the router; `topic_id` resolves a log topic name to its id in the log.
    pub fn new(plan: &RoutePlan, topic_id: impl Fn(&str) -> (TopicId, u32)) -> Router {
        let mut partitions = Vec::new();
        let mut resolve = |name: &str| {
            let (id, n) = topic_id(name);
            if partitions.len() <= id as usize {
                partitions.resize(id as usize + 1, 0);
            }
            partitions[id as usize] = n;
            id
        };
        let routes = plan
            .routes
            .iter()
            .map(|r| (r.filter.clone(), resolve(&r.topic), r.key.clone()))
            .collect();
        let default_topic = resolve(&plan.default_topic);
        Router {
            routes,
            default_topic,
            partitions,
        }
    }

    /// Routes one publish.
    pub fn route(&self, mqtt_topic: &str, client_id: &str) -> Destination {
        let mut key = Vec::with_capacity(mqtt_topic.len());
        let topic = match self.routes.iter().find(|(f, _, _)| f.matches(mqtt_topic)) {
            Some((_, topic, template)) => {
                template.render_into(mqtt_topic, client_id, &mut key);
                *topic
            }
            None => {
                key.extend_from_slice(mqtt_topic.as_bytes());
                self.default_topic
            }
        };
        let partition = partition_for(&key, self.partitions[topic as usize]);
        Destination {
            topic,
            partition,
            key,
        }
    }
}

/// Kafka's default partitioner: `toPositive(murmur2(key)) % partitions`.
pub fn partition_for(key: &[u8], partitions: u32) -> u32 {
    (murmur2(key) & 0x7fff_ffff) as u32 % partitions
}

/// MurmurHash2, 32-bit, with the seed and tail handling of Kafka's `Utils.murmur2`.
/// Written here (not taken from a crate) because it must match Kafka's variant bit for bit.
pub fn murmur2(data: &[u8]) -> i32 {
    const SEED: u32 = 0x9747_b28c;
    const M: u32 = 0x5bd1_e995;
    const R: u32 = 24;
    let length = data.len();
    let mut h: u32 = SEED ^ (length as u32);
    let mut chunks = data.chunks_exact(4);
    for chunk in &mut chunks {
        let mut k = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]);
        k = k.wrapping_mul(M);
        k ^= k >> R;
        k = k.wrapping_mul(M);
        h = h.wrapping_mul(M);
        h ^= k;
    }
    let tail = chunks.remainder();
    if tail.len() >= 3 {
        h ^= (tail[2] as u32) << 16;
    }
    if tail.len() >= 2 {
        h ^= (tail[1] as u32) << 8;
    }
    if !tail.is_empty() {
        h ^= tail[0] as u32;
        h = h.wrapping_mul(M);
    }
    h ^= h >> 13;
    h = h.wrapping_mul(M);
    h ^= h >> 15;
    h as i32
}

/// The validated routing table derived from the config, ready for the router.
#[derive(Debug, Clone)]
pub struct RoutePlan {
    /// Routes in match order.
    pub routes: Vec<PlannedRoute>,
    /// The default topic's name.
    pub default_topic: String,
    /// Every log topic with its partition count and retention, in a stable order.
    pub topics: Vec<PlannedTopic>,
}

/// One validated route.
#[derive(Debug, Clone)]
pub struct PlannedRoute {
    /// Parsed filter.
    pub filter: TopicFilter,
    /// Log topic name.
    pub topic: String,
    /// Parsed key template.
    pub key: KeyTemplate,
}

/// One log topic as configured.
#[derive(Debug, Clone, PartialEq)]
pub struct PlannedTopic {
    /// Name.
    pub name: String,
    /// Partition count.
    pub partitions: u32,
    /// Age retention.
    pub retention: Option<Duration>,
    /// Per-partition byte retention.
    pub retention_bytes: Option<u64>,
}

impl RoutePlan {
    /// Validates the topics and routes of `config` and derives the routing table; errors
    /// point into `source`.
    pub fn new(config: &Config, source: &Source) -> Result<RoutePlan, ConfigError> {
        let invalid = |span: Option<std::ops::Range<usize>>, key: String, message: String| {
            source.invalid(span, key, message)
        };
        // Partition counts: from [topics.X], from routes to X, from [default_route]; all
        // that are given must agree.
        let mut partitions: BTreeMap<String, (u32, String)> = BTreeMap::new();
        let mut set_partitions = |topic: &str,
                                  n: u32,
                                  span: Option<std::ops::Range<usize>>,
                                  key: String|
         -> Result<(), ConfigError> {
            if n == 0 || n > 100_000 {
                return Err(invalid(
                    span,
                    key,
                    format!("{n} partitions: a topic has 1 to 100000"),
                ));
            }
            match partitions.get(topic) {
                Some((existing, from)) if *existing != n => Err(invalid(
                    span,
                    key,
                    format!("topic \"{topic}\" gets {n} partitions here but {existing} from {from}: make them agree"),
                )),
                Some(_) => Ok(()),
                None => {
                    partitions.insert(topic.to_string(), (n, key));
                    Ok(())
                }
            }
        };
        for (name, t) in &config.topics {
            validate_topic_name(name)
                .map_err(|msg| invalid(None, format!("topics.{name}"), msg))?;
            if let Some(p) = &t.partitions {
                set_partitions(
                    name,
                    *p.get_ref(),
                    Some(p.span()),
                    format!("topics.{name}.partitions"),
                )?;
            }
            if let Some(r) = t.retention {
                if r.0.is_zero() {
                    return Err(invalid(
                        None,
                        format!("topics.{name}.retention"),
                        "0 would delete everything at once: remove the key to keep records by age forever".into(),
                    ));
                }
            }
        }
        validate_topic_name(&config.default_route.topic)
            .map_err(|msg| invalid(None, "default_route.topic".into(), msg))?;
        if let Some(p) = config.default_route.partitions {
            set_partitions(
                &config.default_route.topic,
                p,
                None,
                "default_route.partitions".into(),
            )?;
        }

        let mut routes = Vec::with_capacity(config.routes.len());
        for (i, r) in config.routes.iter().enumerate() {
            let filter = TopicFilter::parse(r.filter.get_ref())
                .map_err(|msg| invalid(Some(r.filter.span()), format!("routes[{i}].match"), msg))?;
            validate_topic_name(r.topic.get_ref())
                .map_err(|msg| invalid(Some(r.topic.span()), format!("routes[{i}].topic"), msg))?;
            let key = match &r.key {
                None => {
                    KeyTemplate::parse("{topic}", &filter).expect("the default template is valid")
                }
                Some(k) => KeyTemplate::parse(k.get_ref(), &filter).map_err(|msg| {
                    invalid(
                        Some(k.span()),
                        format!("routes[{i}].key \"{}\"", k.get_ref()),
                        msg,
                    )
                })?,
            };
            if let Some(p) = &r.partitions {
                set_partitions(
                    r.topic.get_ref(),
                    *p.get_ref(),
                    Some(p.span()),
                    format!("routes[{i}].partitions"),
                )?;
            }
            routes.push(PlannedRoute {
                filter,
                topic: r.topic.get_ref().clone(),
                key,
            });
        }

        let mut names: Vec<String> = Vec::new();
        let mut push = |n: &str| {
            if !names.iter().any(|x| x == n) {
                names.push(n.to_string());
            }
        };
        push(&config.default_route.topic);
        for r in &routes {
            push(&r.topic);
        }
        for n in config.topics.keys() {
            push(n);
        }
        let topics: Vec<PlannedTopic> = names
            .into_iter()
            .map(|name| {
                let tc = config.topics.get(&name);
                PlannedTopic {
                    partitions: partitions.get(&name).map(|p| p.0).unwrap_or(1),
                    retention: tc.and_then(|t| t.retention).map(|d| d.0),
                    retention_bytes: tc.and_then(|t| t.retention_bytes).map(|b| b.0),
                    name,
                }
            })
            .collect();
        Ok(RoutePlan {
            routes,
            default_topic: config.default_route.topic.clone(),
            topics,
        })
    }

    /// Resolves a topic name to the id a new, empty log gives it (plan order) and its
    /// partition count: for a router without a log, in tests and benchmarks.
    pub fn ids_in_plan_order(&self) -> impl Fn(&str) -> (TopicId, u32) + '_ {
        move |name| {
            let i = self
                .topics
                .iter()
                .position(|t| t.name == name)
                .expect("the plan names every topic its routes use");
            (i as u32, self.topics[i].partitions)
        }
    }
}

impl Config {
    /// The routing table of a config that was already validated by `Config::parse` or
    /// built in code (errors name no line).
    pub fn route_plan(&self) -> Result<RoutePlan, ConfigError> {
        RoutePlan::new(self, &Source::embedded())
    }
}

/// Log topic names follow Kafka's rules, so that `{site}.{topic}` is a valid Kafka topic.
fn validate_topic_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err(format!(
            "topic name \"{name}\" must have 1 to 200 characters"
        ));
    }
    if name == "." || name == ".." {
        return Err(format!("topic name \"{name}\" is not allowed"));
    }
    if let Some(c) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-')))
    {
        return Err(format!(
            "topic name \"{name}\" has '{c}': use letters, digits, '.', '_' and '-' as Kafka topic names do"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Parses `text` and builds its routing table, as the edge does at start.
    fn plan(text: &str, origin: &str) -> Result<RoutePlan, ConfigError> {
        let source = Source::new(text, origin);
        RoutePlan::new(&source.parse()?, &source)
    }

    #[test]
    fn embedded_defaults_route_everything_to_the_mqtt_topic() {
        let plan = Config::parse("", "t.toml").unwrap().route_plan().unwrap();
        assert_eq!(plan.default_topic, "mqtt");
        assert_eq!(plan.topics.len(), 1);
    }

    #[test]
    fn key_level_beyond_filter_names_route_and_line() {
        let text = "\n[[routes]]\nmatch = \"sensors/+\"\ntopic = \"telemetry\"\nkey = \"{9}\"\n";
        let err = plan(text, "edge.toml").unwrap_err().to_string();
        assert!(
            err.starts_with("config edge.toml:5: routes[0].key \"{9}\""),
            "{err}"
        );
        assert!(err.contains("2 levels"), "{err}");
    }

    #[test]
    fn disagreeing_partition_counts_are_rejected() {
        let text = "[topics.telemetry]\npartitions = 8\n[[routes]]\nmatch = \"a/#\"\ntopic = \"telemetry\"\npartitions = 4\n";
        let err = plan(text, "e.toml").unwrap_err().to_string();
        assert!(err.contains("routes[0].partitions"), "{err}");
        assert!(err.contains("8"), "{err}");
    }

    #[test]
    fn invalid_log_topic_name_is_rejected() {
        let text = "[[routes]]\nmatch = \"a/#\"\ntopic = \"bad topic\"\n";
        let err = plan(text, "e.toml").unwrap_err().to_string();
        assert!(err.contains("routes[0].topic"), "{err}");
    }

    /// Values printed by Kafka 4.4.0's own `Utils.murmur2` and `toPositive(h) % n`.
    const KAFKA: &[(&str, i32, u32, u32)] = &[
        ("21", -973932308, 0, 12),
        ("foobar", -790332482, 2, 14),
        ("a-little-bit-long-string", -985981536, 0, 0),
        ("a-little-bit-longer-string", -1486304829, 3, 3),
        (
            "lkjh234lh9fiuh90y23oiuhsafujhadof229phr9h19h89h8",
            -58897971,
            1,
            13,
        ),
        ("abc", 479470107, 3, 11),
        ("dev-1", -1811837231, 1, 1),
        ("sensor-042", 1544276614, 2, 6),
        ("", 275646681, 1, 9),
        ("ü-日本", -2059983426, 2, 14),
    ];

    #[test]
    fn murmur2_matches_kafka() {
        for (key, hash, p4, p16) in KAFKA {
            assert_eq!(murmur2(key.as_bytes()), *hash, "murmur2({key:?})");
            assert_eq!(partition_for(key.as_bytes(), 4), *p4, "{key:?} of 4");
            assert_eq!(partition_for(key.as_bytes(), 16), *p16, "{key:?} of 16");
        }
    }

    #[test]
    fn filter_wildcards_match_per_spec() {
        let f = |s| TopicFilter::parse(s).unwrap();
        assert!(f("sensors/#").matches("sensors"));
        assert!(f("sensors/#").matches("sensors/a/b"));
        assert!(f("sensors/+").matches("sensors/a"));
        assert!(!f("sensors/+").matches("sensors/a/b"));
        assert!(!f("sensors/+").matches("sensors"));
        assert!(f("sensors/+").matches("sensors/"));
        assert!(f("+/+").matches("/x"));
        assert!(f("#").matches("a"));
        assert!(!f("#").matches("$SYS/x"));
        assert!(!f("+/x").matches("$SYS/x"));
        assert!(f("$SYS/#").matches("$SYS/x"));
        assert!(!f("a/b").matches("a/b/c"));
    }

    #[test]
    fn misplaced_wildcards_are_rejected() {
        assert!(TopicFilter::parse("a/#/b").is_err());
        assert!(TopicFilter::parse("a/b+").is_err());
        assert!(TopicFilter::parse("").is_err());
    }

    #[test]
    fn key_template_renders_levels_topic_and_client() {
        let filter = TopicFilter::parse("sensors/+/#").unwrap();
        let t = KeyTemplate::parse("{client_id}:{1}:{topic}", &filter).unwrap();
        let mut out = Vec::new();
        t.render_into("sensors/dev-7/temp", "c1", &mut out);
        assert_eq!(out, b"c1:dev-7:sensors/dev-7/temp");
    }

    #[test]
    fn key_template_rejects_level_not_in_filter() {
        let filter = TopicFilter::parse("sensors/#").unwrap();
        let err = KeyTemplate::parse("{1}", &filter).unwrap_err();
        assert!(err.contains("only 2 levels"), "{err}");
        assert!(KeyTemplate::parse("{0}", &filter).is_ok());
        assert!(KeyTemplate::parse("{nope}", &filter).is_err());
        assert!(KeyTemplate::parse("{1", &filter).is_err());
    }

    fn router(text: &str) -> Router {
        let c = Config::parse(text, "t").unwrap();
        let plan = c.route_plan().unwrap();
        Router::new(&plan, plan.ids_in_plan_order())
    }

    #[test]
    fn first_matching_route_wins_and_unrouted_goes_to_default() {
        let r = router(
            "[[routes]]\nmatch = \"sensors/+/#\"\ntopic = \"telemetry\"\nkey = \"{1}\"\npartitions = 4\n\
             [[routes]]\nmatch = \"sensors/#\"\ntopic = \"other\"\n",
        );
        let d = r.route("sensors/dev-1/temperature", "c");
        assert_eq!(d.topic, 1);
        assert_eq!(d.key, b"dev-1");
        assert_eq!(d.partition, 1, "Kafka puts \"dev-1\" on partition 1 of 4");
        let d = r.route("sensors", "c");
        assert_eq!(d.topic, 2);
        let d = r.route("plant/line1", "c");
        assert_eq!(d.topic, 0);
        assert_eq!(d.key, b"plant/line1");
        assert_eq!(d.partition, 0);
    }

    proptest! {
        #[test]
        fn partition_is_always_in_range(key in proptest::collection::vec(any::<u8>(), 0..64), n in 1u32..1000) {
            prop_assert!(partition_for(&key, n) < n);
        }

        #[test]
        fn same_key_same_partition(level in "[a-z0-9-]{1,12}", suffix in "[a-z]{1,5}") {
            let r = router("[[routes]]\nmatch = \"s/+/#\"\ntopic = \"t\"\nkey = \"{1}\"\npartitions = 16\n");
            let a = r.route(&format!("s/{level}/x"), "c1");
            let b = r.route(&format!("s/{level}/{suffix}"), "c2");
            prop_assert_eq!(a.partition, b.partition);
            prop_assert_eq!(a.partition, partition_for(level.as_bytes(), 16));
        }
    }
}
