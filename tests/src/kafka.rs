//! Real Apache Kafka for the end-to-end tests: a [`KafkaCluster`] of 1 or 3 KRaft nodes run by
//! `tests/kafka/cluster`, and the Java command-line tools as the independent witness of what
//! reached Kafka (no Kafka client library in this crate: the mirror under test uses rdkafka, so
//! the reader must not share its code).
//!
//! A cluster is 1-3 JVMs of up to 512 MiB each; on a 2-core machine two clusters at once starve
//! each other, so [`KafkaCluster::start`] waits until no other cluster of this test process is
//! running (tests of one binary run in parallel threads). One cluster per test at a time.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::{Condvar, Mutex, PoisonError};
use std::thread::ThreadId;
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};

/// How the formatter prints a null key, value or header value. Bytes equal to this marker read
/// back as null too: the formatter cannot tell them apart (it prints the marker through the
/// same escaping as real bytes), so it is a sequence no test sends.
const NULL_MARKER: &str = "\u{1}null\u{1}";
/// [`NULL_MARKER`] as the formatter prints it (`Bytes.toString` escapes control bytes).
const NULL_MARKER_PRINTED: &str = "\\x01null\\x01";

/// Formatter settings of [`KafkaCluster::consume_committed`]. Keys, values and header values go
/// through Kafka's `BytesDeserializer`, whose `toString` keeps printable ASCII except `\` and
/// writes every other byte as `\xNN`: arbitrary bytes come back exactly, and a tab or newline
/// in the output can only be a separator. Header keys (Java strings) are printed as they are.
const CONSUMER_FORMAT: &str = r"print.timestamp=true
print.partition=true
print.offset=true
print.headers=true
print.key=true
print.value=true
key.separator=\t
headers.separator=\t
line.separator=\n
null.literal=\u0001null\u0001
key.deserializer=org.apache.kafka.common.serialization.BytesDeserializer
value.deserializer=org.apache.kafka.common.serialization.BytesDeserializer
headers.deserializer=org.apache.kafka.common.serialization.BytesDeserializer
";

/// Reader settings of [`KafkaCluster::produce`]: lines `h1:v1,h2:v2<TAB>key<TAB>value`.
const PRODUCER_READER: &str = r"null.marker=\u0001null\u0001
";

/// Limits on a script run, beyond the script's own waits (KAFKA_START_TIMEOUT, 180 s each).
const START_LIMIT: Duration = Duration::from_secs(900);
const TOOL_LIMIT: Duration = Duration::from_secs(300);

/// The one user of the clusters' SASL/PLAIN listener.
pub const SASL_USER: &str = "tributary";
/// Its password.
pub const SASL_PASSWORD: &str = "tributary-secret";

/// The thread whose test holds a cluster, if any; see [`KafkaSlot`].
static SLOT_HOLDER: Mutex<Option<ThreadId>> = Mutex::new(None);
static SLOT_FREED: Condvar = Condvar::new();

/// The right to run a Kafka cluster in this test process, held by a [`KafkaCluster`].
/// Not a `MutexGuard`, so a cluster can move into a spawned thread or task.
struct KafkaSlot;

impl KafkaSlot {
    fn acquire() -> Result<KafkaSlot> {
        let me = std::thread::current().id();
        let mut holder = SLOT_HOLDER.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            match *holder {
                None => break,
                Some(t) if t == me => bail!(
                    "this thread already runs a KafkaCluster: one cluster per test (drop the first)"
                ),
                Some(_) => {
                    holder = SLOT_FREED
                        .wait(holder)
                        .unwrap_or_else(PoisonError::into_inner)
                }
            }
        }
        *holder = Some(me);
        Ok(KafkaSlot)
    }
}

impl Drop for KafkaSlot {
    fn drop(&mut self) {
        *SLOT_HOLDER.lock().unwrap_or_else(PoisonError::into_inner) = None;
        SLOT_FREED.notify_one();
    }
}

/// A running Kafka cluster (KRaft, every node broker and controller) on 127.0.0.1 with its data
/// in a temporary directory; stopped and deleted when dropped.
///
/// 3 nodes: replication factor 3 and `min.insync.replicas` 2 for every topic, internal ones
/// included; 1 node: 1 everywhere. Nodes are numbered 1..=N. Ports stay the same across
/// [`kill`](Self::kill)/[`restart`](Self::restart) and [`kill_all`](Self::kill_all)/
/// [`restart_all`](Self::restart_all), so the bootstrap string stays valid.
pub struct KafkaCluster {
    nodes: usize,
    bootstrap: String,
    // Dropped after `Drop::drop` stopped the nodes, and before the slot is released.
    dir: tempfile::TempDir,
    _slot: KafkaSlot,
}

/// One record as `read_committed` consumers see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConsumedRecord {
    /// Partition.
    pub partition: u32,
    /// Offset in the partition.
    pub offset: u64,
    /// Key bytes, `None` for a null key.
    pub key: Option<Vec<u8>>,
    /// Value bytes, `None` for a null value (tombstone).
    pub value: Option<Vec<u8>>,
    /// Headers in record order. Values are decoded as UTF-8 (invalid bytes replaced); a null
    /// header value reads as "". Header keys containing ':' or a tab are not supported.
    pub headers: Vec<(String, String)>,
    /// Milliseconds since the epoch (-1 with [`TimestampType::None`]).
    pub timestamp: i64,
    /// Whether `timestamp` is the producer's or the broker's.
    pub timestamp_type: TimestampType,
}

/// Kafka's timestamp types.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimestampType {
    /// Set by the producer.
    CreateTime,
    /// Set by the broker on append (topic config `message.timestamp.type=LogAppendTime`).
    LogAppendTime,
    /// No timestamp (pre-0.10 record format only).
    None,
}

impl ConsumedRecord {
    /// The key as UTF-8, if it is set and valid UTF-8.
    pub fn key_str(&self) -> Option<&str> {
        self.key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
    }

    /// The value as UTF-8, if it is set and valid UTF-8.
    pub fn value_str(&self) -> Option<&str> {
        self.value
            .as_deref()
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A record for [`KafkaCluster::produce`]. Text only (the console producer reads lines): no
/// newline anywhere, no tab in the key, no ',' or tab in header values, no ':' ',' or tab in
/// header keys.
#[derive(Debug, Clone, Copy, Default)]
pub struct ProducedRecord<'a> {
    /// Key; `None` produces a null key (the producer then picks the partition).
    pub key: Option<&'a str>,
    /// Value.
    pub value: &'a str,
    /// Headers in order.
    pub headers: &'a [(&'a str, &'a str)],
}

/// One partition of a consumer group as `ConsumerGroupCommand --describe` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GroupPartitionOffset {
    /// Topic.
    pub topic: String,
    /// Partition.
    pub partition: u32,
    /// The group's committed offset, `None` when it has none ("-").
    pub current_offset: Option<u64>,
    /// The member that owns the partition, `None` when no member does.
    pub consumer_id: Option<String>,
}

/// One partition of a topic as the controller describes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionState {
    /// Partition.
    pub partition: u32,
    /// Leader node, `None` while the partition has none.
    pub leader: Option<u32>,
    /// Replica nodes, preferred leader first.
    pub replicas: Vec<u32>,
    /// In-sync replicas.
    pub isr: Vec<u32>,
}

fn cluster_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("kafka/cluster")
}

/// Runs `tests/kafka/cluster ARGS` under coreutils `timeout` (which also kills a tool JVM the
/// script waits for; the Kafka nodes are in their own sessions and survive it). The nodes'
/// watchdog is tied to this process, so a test killed before its cleanup leaves no JVM behind.
fn run_script(args: &[&str], input: Option<&[u8]>, limit: Duration) -> Result<Output> {
    let mut cmd = Command::new("timeout");
    cmd.arg("--kill-after=10")
        .arg(limit.as_secs().to_string())
        .arg(cluster_script())
        .args(args)
        .env("KAFKA_OWNER_PID", std::process::id().to_string())
        .stdin(if input.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().with_context(|| {
        format!(
            "running {} (needs bash, coreutils)",
            cluster_script().display()
        )
    })?;
    let writer = match (input, child.stdin.take()) {
        (Some(bytes), Some(mut stdin)) => {
            let bytes = bytes.to_vec();
            // A thread, so a tool that fills its stdout pipe before reading all its input
            // cannot deadlock with us.
            Some(std::thread::spawn(move || stdin.write_all(&bytes)))
        }
        _ => None,
    };
    let out = child.wait_with_output()?;
    if let Some(w) = writer {
        // A tool that exits early closes the pipe; its exit status says why.
        let _ = w.join();
    }
    if out.status.code() == Some(124) {
        bail!(
            "cluster {} did not finish within {} s\nstderr:\n{}",
            args.join(" "),
            limit.as_secs(),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(out)
}

fn describe_failure(what: &str, out: &Output) -> String {
    format!(
        "{what} failed ({})\nstdout:\n{}\nstderr:\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

impl KafkaCluster {
    /// Starts a cluster of `nodes` (1 or 3) nodes and waits until every node is up and the
    /// metadata lists all brokers. Waits first for any other cluster of this test process to be
    /// dropped. Fails with the tail of the nodes' logs.
    pub fn start(nodes: usize) -> Result<KafkaCluster> {
        ensure!(
            nodes == 1 || nodes == 3,
            "a test cluster has 1 or 3 nodes, not {nodes}"
        );
        let slot = KafkaSlot::acquire()?;
        let mut attempt = 1;
        loop {
            let dir = tempfile::Builder::new()
                .prefix("tributary-kafka-")
                .tempdir()
                .context("creating the cluster directory")?;
            let path = dir.path().to_str().context("temp dir path is not UTF-8")?;
            let n = nodes.to_string();
            let started = run_script(&["start", &n, path], None, START_LIMIT);
            match started {
                Ok(out) if out.status.success() => {
                    let stdout = String::from_utf8_lossy(&out.stdout);
                    let bootstrap = stdout
                        .lines()
                        .last()
                        .filter(|l| l.starts_with("127.0.0.1:"))
                        .with_context(|| {
                            format!("cluster start printed no bootstrap servers: {stdout}")
                        })?
                        .to_string();
                    let cluster = KafkaCluster {
                        nodes,
                        bootstrap,
                        dir,
                        _slot: slot,
                    };
                    cluster.write_tool_configs()?;
                    return Ok(cluster);
                }
                result => {
                    let failure = match result {
                        Ok(out) => describe_failure(&format!("starting {nodes}-node Kafka"), &out),
                        Err(e) => format!("{e:#}"),
                    };
                    let failure = with_log_tails(failure, dir.path(), nodes);
                    // The script stops what it started on failure, unless it was killed.
                    let _ = run_script(&["stop", path], None, TOOL_LIMIT);
                    // The ports are picked free, but another process may take one before the
                    // node binds it; a second try picks new ones.
                    let port_taken = failure.contains("Address already in use");
                    if port_taken && attempt < 2 {
                        attempt += 1;
                        eprintln!("kafka: a port was taken while starting; trying new ports");
                        continue;
                    }
                    bail!(failure);
                }
            }
        }
    }

    /// Bootstrap servers, `127.0.0.1:P1,127.0.0.1:P2,...`.
    pub fn bootstrap(&self) -> &str {
        &self.bootstrap
    }

    /// Number of nodes.
    pub fn nodes(&self) -> usize {
        self.nodes
    }

    /// The SASL_PLAINTEXT listeners: mechanism PLAIN, user [`SASL_USER`], password
    /// [`SASL_PASSWORD`].
    pub fn sasl_bootstrap(&self) -> Result<String> {
        let out = self.script(
            "reading the SASL listeners",
            &["sasl-bootstrap", self.dir_str()],
            TOOL_LIMIT,
        )?;
        Ok(out.trim().to_string())
    }

    /// Per node, `(proxy port, proxied port)`: the node advertises a plaintext listener at
    /// the proxy port, where a test's [`crate::proxy::StallingProxy`] listens and forwards to
    /// the proxied port; a client bootstrapped at the proxy reaches every node through it.
    pub fn proxied(&self) -> Result<Vec<(u16, u16)>> {
        let out = self.script(
            "reading the proxied listeners",
            &["proxied", self.dir_str()],
            TOOL_LIMIT,
        )?;
        out.lines()
            .map(|l| {
                let (a, b) = l
                    .split_once(' ')
                    .with_context(|| format!("cluster proxied printed {l:?}"))?;
                Ok((a.parse()?, b.parse()?))
            })
            .collect()
    }

    /// The cluster directory (`nodeK/server.log` are the nodes' logs).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn dir_str(&self) -> &str {
        self.dir.path().to_str().expect("checked UTF-8 at start")
    }

    fn script(&self, what: &str, args: &[&str], limit: Duration) -> Result<String> {
        let out = run_script(args, None, limit)?;
        if !out.status.success() {
            bail!(with_log_tails(
                describe_failure(what, &out),
                self.dir.path(),
                self.nodes
            ));
        }
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    /// SIGKILL of node `node` (1..=N), as a power cut would.
    pub fn kill(&self, node: usize) -> Result<()> {
        let n = node.to_string();
        self.script(
            &format!("killing node {node}"),
            &["kill", &n, self.dir_str()],
            TOOL_LIMIT,
        )
        .map(drop)
    }

    /// Starts node `node` again on its data and ports (stopping it first if it runs); waits
    /// until the metadata lists all brokers and the node is back in the ISR of its partitions.
    /// Needs the other nodes up; after [`kill_all`](Self::kill_all) use
    /// [`restart_all`](Self::restart_all).
    pub fn restart(&self, node: usize) -> Result<()> {
        let n = node.to_string();
        let out = self.script(
            &format!("restarting node {node}"),
            &["restart", &n, self.dir_str()],
            START_LIMIT,
        )?;
        self.check_same_bootstrap(&out)
    }

    /// Restarts keep the ports; a test holding the bootstrap string relies on it.
    fn check_same_bootstrap(&self, script_stdout: &str) -> Result<()> {
        let now = script_stdout.lines().last().unwrap_or_default();
        ensure!(
            now == self.bootstrap,
            "the cluster came back on {now:?}, not on {:?}",
            self.bootstrap
        );
        Ok(())
    }

    /// SIGKILL of every node at once: a whole-cluster outage. Data and ports are kept.
    pub fn kill_all(&self) -> Result<()> {
        self.script(
            "killing every node",
            &["kill-all", self.dir_str()],
            TOOL_LIMIT,
        )
        .map(drop)
    }

    /// SIGTERM of every node (a clean shutdown of the whole cluster). Data and ports are kept.
    pub fn stop_all(&self) -> Result<()> {
        self.script("stopping every node", &["stop", self.dir_str()], TOOL_LIMIT)
            .map(drop)
    }

    /// Starts every node that is down, on its data and ports, all at once; waits until every
    /// node is up, the metadata lists all brokers and every partition has a leader and a full
    /// ISR.
    pub fn restart_all(&self) -> Result<()> {
        let out = self.script(
            "restarting the cluster",
            &["restart-all", self.dir_str()],
            START_LIMIT,
        )?;
        self.check_same_bootstrap(&out)
    }

    /// Runs a Kafka tool class (e.g. `org.apache.kafka.tools.TopicCommand`) with Kafka's jars
    /// and quiet logging; an argument `@BOOTSTRAP@` becomes the bootstrap servers. The exit
    /// status is the caller's to check.
    pub fn tools(&self, class: &str, args: &[&str]) -> Result<Output> {
        self.tools_with_input(class, args, None)
    }

    /// [`tools`](Self::tools) with `input` on the tool's stdin.
    pub fn tools_with_input(
        &self,
        class: &str,
        args: &[&str],
        input: Option<&[u8]>,
    ) -> Result<Output> {
        let mut all = vec!["tools", self.dir_str(), class];
        all.extend_from_slice(args);
        run_script(&all, input, TOOL_LIMIT)
    }

    /// A tool run that must succeed; returns its stdout.
    fn tool_ok(&self, class: &str, args: &[&str], input: Option<&[u8]>) -> Result<String> {
        let out = self.tools_with_input(class, args, input)?;
        let short = class.rsplit('.').next().unwrap_or(class);
        ensure!(
            out.status.success(),
            "{}",
            describe_failure(&format!("{short} {}", args.join(" ")), &out)
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    }

    fn write_tool_configs(&self) -> Result<()> {
        std::fs::write(
            self.dir().join("consumer-format.properties"),
            CONSUMER_FORMAT,
        )?;
        std::fs::write(
            self.dir().join("producer-reader.properties"),
            PRODUCER_READER,
        )?;
        Ok(())
    }

    fn config_path(&self, name: &str) -> String {
        self.dir().join(name).to_str().expect("UTF-8").to_string()
    }

    /// Creates SCRAM-SHA-512 user `user` with `password` on the SASL listener (a principal
    /// held to the ACLs given with [`KafkaCluster::acl`]).
    pub fn add_scram_user(&self, user: &str, password: &str) -> Result<()> {
        let config = format!("SCRAM-SHA-512=[iterations=4096,password={password}]");
        self.tool_ok(
            "org.apache.kafka.tools.ConfigCommand",
            &[
                "--bootstrap-server",
                "@BOOTSTRAP@",
                "--alter",
                "--add-config",
                &config,
                "--entity-type",
                "users",
                "--entity-name",
                user,
            ],
            None,
        )?;
        Ok(())
    }

    /// What kcat (librdkafka's reader, another client than Kafka's own) reads of `topic`
    /// with `isolation.level=read_committed`, to its end: per partition, the values in offset
    /// order (lossy UTF-8; kcat gives each value's length, so any bytes are read right).
    pub fn kcat_values(&self, topic: &str) -> Result<std::collections::BTreeMap<i32, Vec<String>>> {
        let out = std::process::Command::new("kcat")
            .args(["-b", &self.bootstrap, "-C", "-t", topic, "-e", "-q"])
            .args(["-X", "isolation.level=read_committed"])
            .args(["-f", "%p %S\n%s\n"])
            .output()
            .context("running kcat (tests/run installs it)")?;
        ensure!(out.status.success(), "{}", describe_failure("kcat", &out));
        let mut by_partition: std::collections::BTreeMap<i32, Vec<String>> = Default::default();
        let mut rest = &out.stdout[..];
        while !rest.is_empty() {
            let eol = rest
                .iter()
                .position(|&b| b == b'\n')
                .context("kcat output ends inside a record header")?;
            let header = std::str::from_utf8(&rest[..eol])?;
            let (p, len) = header
                .split_once(' ')
                .with_context(|| format!("kcat header {header:?}"))?;
            // A null value has length -1 and prints as nothing.
            let len: usize = len
                .parse::<i64>()
                .with_context(|| format!("kcat header {header:?}"))?
                .max(0) as usize;
            let value = rest
                .get(eol + 1..eol + 1 + len)
                .with_context(|| format!("kcat output ends inside the value of {header:?}"))?;
            by_partition
                .entry(
                    p.parse()
                        .with_context(|| format!("kcat header {header:?}"))?,
                )
                .or_default()
                .push(String::from_utf8_lossy(value).into_owned());
            rest = rest
                .get(eol + 1 + len + 1..)
                .with_context(|| format!("no newline after the value of {header:?}"))?;
        }
        Ok(by_partition)
    }

    /// How many records kcat reads of `topic`, `read_committed` (see [`Self::kcat_values`]).
    pub fn kcat_count(&self, topic: &str) -> Result<usize> {
        Ok(self.kcat_values(topic)?.values().map(Vec::len).sum())
    }

    /// The node (1..N) that coordinates transactional id `id`, as Kafka's own
    /// `TransactionsCommand describe` reports it (the id must have been used).
    pub fn transaction_coordinator(&self, id: &str) -> Result<usize> {
        let out = self.tool_ok(
            "org.apache.kafka.tools.TransactionsCommand",
            &[
                "--bootstrap-server",
                "@BOOTSTRAP@",
                "describe",
                "--transactional-id",
                id,
            ],
            None,
        )?;
        // A header line starting with CoordinatorId, then one row for the id.
        let mut lines = out.lines().filter(|l| !l.trim().is_empty());
        let header: Vec<&str> = lines
            .next()
            .context("TransactionsCommand printed nothing")?
            .split_whitespace()
            .collect();
        let row: Vec<&str> = lines
            .next()
            .with_context(|| format!("no row for {id} in {out:?}"))?
            .split_whitespace()
            .collect();
        let at = header
            .iter()
            .position(|h| *h == "CoordinatorId")
            .with_context(|| format!("no CoordinatorId column in {out:?}"))?;
        let node: usize = row
            .get(at)
            .with_context(|| format!("short row in {out:?}"))?
            .parse()
            .with_context(|| format!("CoordinatorId in {out:?}"))?;
        ensure!(
            (1..=self.nodes).contains(&node),
            "coordinator {node} is not a node of this cluster: {out:?}"
        );
        Ok(node)
    }

    /// Kafka's `AclCommand` with `args` after the bootstrap servers, e.g. `--add
    /// --allow-principal User:edge --operation Write --topic t`; fails when the tool does.
    pub fn acl(&self, args: &[&str]) -> Result<()> {
        let mut all = vec!["--bootstrap-server", "@BOOTSTRAP@"];
        all.extend_from_slice(args);
        self.tool_ok("org.apache.kafka.tools.AclCommand", &all, None)?;
        Ok(())
    }

    /// Creates `topic` with `partitions` partitions and the cluster's replication factor.
    pub fn create_topic(&self, topic: &str, partitions: u32) -> Result<()> {
        let p = partitions.to_string();
        self.tool_ok(
            "org.apache.kafka.tools.TopicCommand",
            &[
                "--bootstrap-server",
                "@BOOTSTRAP@",
                "--create",
                "--topic",
                topic,
                "--partitions",
                &p,
            ],
            None,
        )
        .map(drop)
    }

    /// Creates `topic` with `partitions` partitions, the cluster's replication factor and the
    /// topic settings `configs` (`("max.message.bytes", "1000000")`).
    pub fn create_topic_with(
        &self,
        topic: &str,
        partitions: u32,
        configs: &[(&str, &str)],
    ) -> Result<()> {
        let p = partitions.to_string();
        let mut args = vec![
            "--bootstrap-server".to_string(),
            "@BOOTSTRAP@".into(),
            "--create".into(),
            "--topic".into(),
            topic.into(),
            "--partitions".into(),
            p,
        ];
        for (k, v) in configs {
            args.push("--config".into());
            args.push(format!("{k}={v}"));
        }
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        self.tool_ok("org.apache.kafka.tools.TopicCommand", &args, None)
            .map(drop)
    }

    /// Names of the topics, internal ones excluded, sorted.
    pub fn list_topics(&self) -> Result<Vec<String>> {
        let out = self.tool_ok(
            "org.apache.kafka.tools.TopicCommand",
            &[
                "--bootstrap-server",
                "@BOOTSTRAP@",
                "--list",
                "--exclude-internal",
            ],
            None,
        )?;
        let mut topics: Vec<String> = out
            .lines()
            .filter(|l| !l.is_empty())
            .map(str::to_string)
            .collect();
        topics.sort();
        Ok(topics)
    }

    /// The partitions of `topic` with leader, replicas and ISR; `None` if it does not exist.
    pub fn describe_topic(&self, topic: &str) -> Result<Option<Vec<PartitionState>>> {
        let out = self.tools(
            "org.apache.kafka.tools.TopicCommand",
            &[
                "--bootstrap-server",
                "@BOOTSTRAP@",
                "--describe",
                "--topic",
                topic,
            ],
        )?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            let missing = format!("Topic '{topic}' does not exist");
            if stdout.contains(&missing) || String::from_utf8_lossy(&out.stderr).contains(&missing)
            {
                return Ok(None);
            }
            bail!(describe_failure(&format!("describing topic {topic}"), &out));
        }
        let mut partitions = stdout
            .lines()
            .filter(|l| l.contains("\tPartition: "))
            .map(parse_partition_line)
            .collect::<Result<Vec<_>>>()?;
        partitions.sort_by_key(|p| p.partition);
        Ok(Some(partitions))
    }

    /// Number of partitions of `topic`; `None` if it does not exist.
    pub fn partitions_of(&self, topic: &str) -> Result<Option<u32>> {
        Ok(self.describe_topic(topic)?.map(|p| p.len() as u32))
    }

    /// Produces `records` in order with the console producer, synchronously (each send
    /// acknowledged by all in-sync replicas before the next), retrying through leader changes
    /// for up to 120 s.
    pub fn produce(&self, topic: &str, records: &[ProducedRecord<'_>]) -> Result<()> {
        for r in records {
            check_line_safe(r)?;
        }
        let reader = self.config_path("producer-reader.properties");
        // The reader parses headers either on every line or on none: one run per stretch of
        // records that agree, in order.
        for stretch in records.chunk_by(|a, b| a.headers.is_empty() == b.headers.is_empty()) {
            let with_headers = !stretch[0].headers.is_empty();
            let mut input = String::new();
            for r in stretch {
                if with_headers {
                    let headers: Vec<String> =
                        r.headers.iter().map(|(k, v)| format!("{k}:{v}")).collect();
                    input.push_str(&headers.join(","));
                    input.push('\t');
                }
                input.push_str(r.key.unwrap_or(NULL_MARKER));
                input.push('\t');
                input.push_str(r.value);
                input.push('\n');
            }
            let parse_headers = format!("parse.headers={with_headers}");
            self.tool_ok(
                "org.apache.kafka.tools.ConsoleProducer",
                &[
                    "--bootstrap-server",
                    "@BOOTSTRAP@",
                    "--topic",
                    topic,
                    "--sync",
                    // The tool's defaults (1.5 s, 3 retries) give up before the controller
                    // has fenced a killed node and moved its leaderships (~6 s); a client's
                    // usual ones ride that out, bounded by delivery.timeout.ms (120 s).
                    "--request-timeout-ms",
                    "30000",
                    "--message-send-max-retries",
                    "1000",
                    "--reader-config",
                    &reader,
                    "--reader-property",
                    "parse.key=true",
                    "--reader-property",
                    &parse_headers,
                ],
                Some(input.as_bytes()),
            )?;
        }
        Ok(())
    }

    /// Every committed record of `topic` from the beginning, as a `read_committed` consumer
    /// (the console consumer) sees it, read until no record arrives for `idle`; sorted by
    /// partition and offset. `idle` includes the consumer's group join: give it a few seconds.
    /// A missing topic reads as empty (the consumer does not create it).
    pub fn consume_committed(&self, topic: &str, idle: Duration) -> Result<Vec<ConsumedRecord>> {
        self.console_consume(topic, &["--from-beginning"], idle)
    }

    /// What a consumer of group `group` reads of `topic`, from the group's committed offsets
    /// (a partition without one starts at its end, the consumer's default), `read_committed`,
    /// until no record arrives for `idle`; sorted by partition and offset. The console
    /// consumer joins the group, so it commits what it read when it leaves.
    pub fn consume_as_group(
        &self,
        topic: &str,
        group: &str,
        idle: Duration,
    ) -> Result<Vec<ConsumedRecord>> {
        self.console_consume(topic, &["--group", group], idle)
    }

    /// Kafka's console consumer on `topic` with `position` (where it starts), `read_committed`,
    /// until no record arrives for `idle`; its records sorted by partition and offset.
    fn console_consume(
        &self,
        topic: &str,
        position: &[&str],
        idle: Duration,
    ) -> Result<Vec<ConsumedRecord>> {
        let format = self.config_path("consumer-format.properties");
        let timeout_ms = idle.as_millis().to_string();
        let mut args = vec!["--bootstrap-server", "@BOOTSTRAP@", "--topic", topic];
        args.extend_from_slice(position);
        args.extend_from_slice(&[
            "--isolation-level",
            "read_committed",
            "--timeout-ms",
            &timeout_ms,
            "--command-property",
            "allow.auto.create.topics=false",
            "--formatter-config",
            &format,
        ]);
        let out = self.tool_ok(
            "org.apache.kafka.tools.consumer.ConsoleConsumer",
            &args,
            None,
        )?;
        let mut records = out
            .lines()
            .map(|line| {
                parse_consumed_line(line)
                    .with_context(|| format!("unexpected console consumer line {line:?}"))
            })
            .collect::<Result<Vec<_>>>()?;
        records.sort_by_key(|r| (r.partition, r.offset));
        Ok(records)
    }

    /// The partitions of consumer group `group` with their committed offsets, as
    /// `ConsumerGroupCommand --describe` shows them; empty when the group does not exist or
    /// has no offsets. Sorted by topic and partition.
    pub fn describe_group(&self, group: &str) -> Result<Vec<GroupPartitionOffset>> {
        let out = self.tools(
            "org.apache.kafka.tools.consumer.group.ConsumerGroupCommand",
            &[
                "--bootstrap-server",
                "@BOOTSTRAP@",
                "--describe",
                "--group",
                group,
            ],
        )?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let stderr = String::from_utf8_lossy(&out.stderr);
        if !out.status.success() {
            if format!("{stdout}{stderr}").contains("does not exist") {
                return Ok(Vec::new());
            }
            bail!(describe_failure(&format!("describing group {group}"), &out));
        }
        let mut partitions = Vec::new();
        for line in stdout.lines() {
            let fields: Vec<&str> = line.split_whitespace().collect();
            // GROUP TOPIC PARTITION CURRENT-OFFSET LOG-END-OFFSET LAG CONSUMER-ID HOST CLIENT-ID
            if fields.len() < 9 || fields[0] != group || fields[2].parse::<u32>().is_err() {
                continue;
            }
            let dash = |f: &str| (f != "-").then(|| f.to_string());
            partitions.push(GroupPartitionOffset {
                topic: fields[1].to_string(),
                partition: fields[2].parse()?,
                current_offset: dash(fields[3])
                    .map(|o| o.parse())
                    .transpose()
                    .with_context(|| format!("offset in {line:?}"))?,
                consumer_id: dash(fields[6]),
            });
        }
        partitions.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        Ok(partitions)
    }

    /// [`consume_committed`](Self::consume_committed) until it returns at least `count`
    /// records; fails after `within` with the number seen. Returns every record read (more
    /// than `count` if there are more).
    pub fn wait_for_committed(
        &self,
        topic: &str,
        count: usize,
        within: Duration,
    ) -> Result<Vec<ConsumedRecord>> {
        let deadline = Instant::now() + within;
        loop {
            let records = self.consume_committed(topic, Duration::from_secs(5))?;
            if records.len() >= count {
                return Ok(records);
            }
            if Instant::now() >= deadline {
                bail!(
                    "{topic}: {} of {count} committed records after {within:?}",
                    records.len()
                );
            }
            std::thread::sleep(Duration::from_secs(1));
        }
    }

    /// The last `lines` lines of every node's server log (and JVM output, if any).
    pub fn log_tails(&self, lines: usize) -> String {
        log_tails(self.dir.path(), self.nodes, lines)
    }
}

impl Drop for KafkaCluster {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "kafka: the test failed; the cluster's logs end with:\n{}",
                self.log_tails(20)
            );
        }
        match run_script(&["stop", self.dir_str()], None, TOOL_LIMIT) {
            Ok(out) if out.status.success() => {}
            Ok(out) => eprintln!("{}", describe_failure("stopping the Kafka cluster", &out)),
            Err(e) => eprintln!("stopping the Kafka cluster: {e:#}"),
        }
    }
}

fn log_tails(dir: &Path, nodes: usize, lines: usize) -> String {
    let mut out = String::new();
    for node in 1..=nodes {
        for (file, n) in [("server.log", lines), ("stdout.log", lines.min(20))] {
            let path = dir.join(format!("node{node}")).join(file);
            let Ok(text) = std::fs::read_to_string(&path) else {
                continue;
            };
            if text.trim().is_empty() {
                continue;
            }
            let all: Vec<&str> = text.lines().collect();
            out.push_str(&format!("---- tail of {} ----\n", path.display()));
            for line in &all[all.len().saturating_sub(n)..] {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// `failure`, plus the nodes' log tails unless the script already printed them.
fn with_log_tails(failure: String, dir: &Path, nodes: usize) -> String {
    if failure.contains("---- tail of ") {
        return failure;
    }
    format!("{failure}\n{}", log_tails(dir, nodes, 40))
}

fn check_line_safe(r: &ProducedRecord<'_>) -> Result<()> {
    let bad = |s: &str, forbidden: &[char]| {
        s.contains(|c| forbidden.contains(&c) || c == '\n' || c == '\r')
    };
    ensure!(
        !r.key.is_some_and(|k| bad(k, &['\t'])),
        "produce: key {:?} has a tab or line break",
        r.key
    );
    ensure!(
        !bad(r.value, &[]),
        "produce: value {:?} has a line break",
        r.value
    );
    for (k, v) in r.headers {
        ensure!(
            !bad(k, &['\t', ',', ':']) && !bad(v, &['\t', ',']),
            "produce: header {k:?}={v:?}: keys take no ':' ',' tab or line break, values no ',' tab or line break"
        );
    }
    Ok(())
}

/// `\tTopic: t\tPartition: 0\tLeader: 2\tReplicas: 3,1,2\tIsr: 1,2,3\tElr: \tLastKnownElr: `
fn parse_partition_line(line: &str) -> Result<PartitionState> {
    let field = |name: &str| -> Result<&str> {
        line.split('\t')
            .find_map(|f| f.strip_prefix(name))
            .map(str::trim)
            .with_context(|| format!("no {name} in {line:?}"))
    };
    let nodes = |s: &str| -> Result<Vec<u32>> {
        s.split(',')
            .filter(|n| !n.is_empty())
            .map(|n| {
                n.parse()
                    .with_context(|| format!("node id {n:?} in {line:?}"))
            })
            .collect()
    };
    let leader = field("Leader: ")?;
    Ok(PartitionState {
        partition: field("Partition: ")?.parse()?,
        leader: match leader {
            "none" | "-1" => None,
            id => Some(id.parse()?),
        },
        replicas: nodes(field("Replicas: ")?)?,
        isr: nodes(field("Isr: ")?)?,
    })
}

/// `CreateTime:T<TAB>Partition:P<TAB>Offset:O<TAB>HEADERS...<TAB>KEY<TAB>VALUE`, HEADERS being
/// `NO_HEADERS` or one `name:value` field per header.
fn parse_consumed_line(line: &str) -> Result<ConsumedRecord> {
    let fields: Vec<&str> = line.split('\t').collect();
    ensure!(
        fields.len() >= 6,
        "expected at least 6 tab-separated fields"
    );
    let (timestamp_type, timestamp) = match fields[0].split_once(':') {
        Some(("CreateTime", t)) => (TimestampType::CreateTime, t.parse()?),
        Some(("LogAppendTime", t)) => (TimestampType::LogAppendTime, t.parse()?),
        None if fields[0] == "NO_TIMESTAMP" => (TimestampType::None, -1),
        _ => bail!("bad timestamp field {:?}", fields[0]),
    };
    let partition = fields[1]
        .strip_prefix("Partition:")
        .context("no partition")?
        .parse()?;
    let offset = fields[2]
        .strip_prefix("Offset:")
        .context("no offset")?
        .parse()?;
    let header_fields = &fields[3..fields.len() - 2];
    let headers = if header_fields == ["NO_HEADERS"] {
        Vec::new()
    } else {
        header_fields
            .iter()
            .map(|h| {
                let (name, value) = h.split_once(':').context("header without ':'")?;
                let value = unescape(value)?.unwrap_or_default();
                Ok((
                    name.to_string(),
                    String::from_utf8_lossy(&value).into_owned(),
                ))
            })
            .collect::<Result<_>>()?
    };
    Ok(ConsumedRecord {
        partition,
        offset,
        key: unescape(fields[fields.len() - 2])?,
        value: unescape(fields[fields.len() - 1])?,
        headers,
        timestamp,
        timestamp_type,
    })
}

/// Reverses Kafka's `Bytes.toString`: `\xNN` is byte NN, anything else is itself; the null
/// marker is `None`.
fn unescape(printed: &str) -> Result<Option<Vec<u8>>> {
    if printed == NULL_MARKER_PRINTED {
        return Ok(None);
    }
    let bytes = printed.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\' {
            let hex = printed
                .get(i + 2..i + 4)
                .filter(|_| bytes.get(i + 1) == Some(&b'x'))
                .with_context(|| format!("bad escape at byte {i} of {printed:?}"))?;
            out.push(u8::from_str_radix(hex, 16).with_context(|| format!("bad escape {hex:?}"))?);
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unescape_reverses_bytes_to_string() {
        assert_eq!(
            unescape(r#"{"t":"\xC3\xA9\x5C\x09x"} ~"#).unwrap(),
            Some("{\"t\":\"é\\\tx\"} ~".as_bytes().to_vec())
        );
        assert_eq!(unescape("").unwrap(), Some(Vec::new()));
        assert_eq!(unescape(NULL_MARKER_PRINTED).unwrap(), None);
        assert!(unescape(r"\x4").is_err());
        assert!(unescape(r"\y41").is_err());
    }

    #[test]
    fn consumed_line_with_headers_parses() {
        let r = parse_consumed_line(
            "CreateTime:1795656613149\tPartition:1\tOffset:7\th1:v1\th2:a b\tk\\x09\tv\\x0A",
        )
        .unwrap();
        assert_eq!(r.partition, 1);
        assert_eq!(r.offset, 7);
        assert_eq!(r.timestamp, 1795656613149);
        assert_eq!(r.timestamp_type, TimestampType::CreateTime);
        assert_eq!(
            r.headers,
            vec![("h1".into(), "v1".into()), ("h2".into(), "a b".into())]
        );
        assert_eq!(r.key.as_deref(), Some(&b"k\t"[..]));
        assert_eq!(r.value.as_deref(), Some(&b"v\n"[..]));
    }

    #[test]
    fn consumed_line_without_headers_or_key_parses() {
        let line =
            format!("LogAppendTime:5\tPartition:0\tOffset:0\tNO_HEADERS\t{NULL_MARKER_PRINTED}\t");
        let r = parse_consumed_line(&line).unwrap();
        assert!(r.headers.is_empty());
        assert_eq!(r.key, None);
        assert_eq!(r.value, Some(Vec::new()));
        assert_eq!(r.timestamp_type, TimestampType::LogAppendTime);
    }

    #[test]
    fn partition_line_parses() {
        let p = parse_partition_line(
            "\tTopic: t3\tPartition: 2\tLeader: none\tReplicas: 2,3,1\tIsr: 1\tElr: \tLastKnownElr: ",
        )
        .unwrap();
        assert_eq!(
            p,
            PartitionState {
                partition: 2,
                leader: None,
                replicas: vec![2, 3, 1],
                isr: vec![1]
            }
        );
    }
}
