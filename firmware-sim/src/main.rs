//! The `firmware-sim` command line.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context as _;
use clap::{ArgGroup, Args, Parser, Subcommand};

use firmware_sim::broker::{
    parse_source_ips, BrokerUrl, ConnectSettings, Protocol, SessionKind, TlsFiles,
};
use firmware_sim::idle::{idle, IdleOptions};
use firmware_sim::kafka::{read_kafka, KafkaSecurity, KafkaSource};
use firmware_sim::payload::PayloadKind;
use firmware_sim::plan::{ClassDefaults, FleetPlan};
use firmware_sim::run::{new_run_id, run, RunOptions};
use firmware_sim::sink::{serve, SinkOptions};
use firmware_sim::source::{read_edge_log, read_mqtt, MqttSource};
use firmware_sim::subscribe::{subscribe, SubscribeOptions};
use firmware_sim::verify::{Verifier, VerifyReport};
use firmware_sim::{manifest, report};

/// Exit code when verification fails (or a run sent nothing).
const EXIT_FAILED: u8 = 1;
/// Exit code for bad input and errors.
const EXIT_ERROR: u8 = 2;

#[derive(Parser)]
#[command(
    name = "firmware-sim",
    version,
    about = "Tributary device fleet simulator and delivery verifier"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Simulate a fleet of devices publishing over MQTT.
    Run(Box<RunArgs>),
    /// Compare messages read back from the edge log, MQTT or the mirror's Kafka topics with a
    /// run's manifest.
    ///
    /// Fails (exit 1) when an acknowledged message is missing or any message arrived twice;
    /// with --kafka also when a device's records are out of order within a partition, when
    /// records lack their mqtt.* headers or carry ones that disagree with the device, or when a
    /// partition could not be read to its end. Messages sent with QoS 0 or never acknowledged
    /// may be missing. Exit 2 on errors (bad options, unreadable manifest, unreachable source,
    /// missing Kafka topic).
    #[command(after_help = VERIFY_EXAMPLES)]
    Verify(Box<VerifyArgs>),
    /// Subscribe and count what arrives, as fast as the broker sends it (benchmarks, tests).
    ///
    /// Prints one line: received=N rate=R/s bytes=B dup=D disconnect_reason=0x97|none
    /// elapsed=S closed=yes|no ended=duration|count|idle|closed. Exit 2 when the broker
    /// refuses the connection or a filter (SUBACK >= 0x80), or on other errors.
    #[command(after_help = SUBSCRIBE_EXAMPLES)]
    Subscribe(Box<SubscribeArgs>),
    /// Open many idle MQTT connections and hold them (connection-scale benchmarks).
    ///
    /// Each connection sends CONNECT with --keep-alive, waits for its CONNACK and then only
    /// pings. Writes --ready-file once every attempt has ended, and prints one line at the
    /// end of --hold: connected=N failed=F connect_seconds=S open=N closed=N. Exit 1 when a
    /// connection failed or was closed by the broker.
    #[command(after_help = IDLE_EXAMPLES)]
    Idle(Box<IdleArgs>),
    /// A discarding / acknowledging MQTT endpoint for benchmarks and tests.
    #[command(hide = true)]
    Sink(SinkArgs),
}

const VERIFY_EXAMPLES: &str = "Examples:
  firmware-sim verify --manifest run1 --edge-log edge-read.jsonl
  firmware-sim verify --manifest run1 --mqtt mqtt://127.0.0.1:1883 --filter 'sensors/#'
  firmware-sim verify --manifest run1 --kafka 127.0.0.1:9092 --kafka-topic plant-7.telemetry \\
      --kafka-wait 2m --report verdict.json";

const SUBSCRIBE_EXAMPLES: &str = "Examples:
  firmware-sim subscribe --broker mqtt://127.0.0.1:1883 --filter 'sensors/#' --qos 1 --duration 10s
  firmware-sim subscribe --filter '#' --count 1000000 --report sub.json
  firmware-sim subscribe --filter '#' --qos 1 --no-read --duration 30s   # a slow subscriber";

const IDLE_EXAMPLES: &str = "Examples:
  firmware-sim idle --broker mqtt://127.0.0.1:1883 --connections 100000 \\
      --source-ips 127.0.1.0-127.0.1.255 --hold 30s --ready-file ready.json --report idle.json";

fn duration(text: &str) -> Result<Duration, String> {
    humantime::parse_duration(text.trim()).map_err(|e| format!("{e}; write e.g. 10s, 500ms, 2m"))
}

#[derive(Args)]
struct ConnectArgs {
    /// Broker URL: mqtt://host[:port] or mqtts://host[:port].
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// MQTT protocol version.
    #[arg(long, value_enum, default_value = "5")]
    protocol: Protocol,
    /// User name.
    #[arg(long)]
    username: Option<String>,
    /// Password (needs --username).
    #[arg(long, requires = "username")]
    password: Option<String>,
    /// CA certificates (PEM) for mqtts://.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long)]
    key: Option<PathBuf>,
    /// Keep-alive interval (at least 5s).
    #[arg(long, value_parser = duration, default_value = "30s")]
    keep_alive: Duration,
    /// Time allowed for TCP, TLS and CONNACK.
    #[arg(long, value_parser = duration, default_value = "10s")]
    connect_timeout: Duration,
}

impl ConnectArgs {
    fn settings(&self, option: &str) -> anyhow::Result<ConnectSettings> {
        let url = BrokerUrl::parse(option, &self.broker)?;
        let tls = TlsFiles {
            ca_file: self.ca_file.clone(),
            cert_file: self.cert.clone(),
            key_file: self.key.clone(),
        }
        .client_config(&url)?;
        if self.keep_alive < Duration::from_secs(5) {
            anyhow::bail!(
                "--keep-alive: must be at least 5s (got {:?})",
                self.keep_alive
            );
        }
        Ok(ConnectSettings {
            url,
            tls,
            protocol: self.protocol,
            credentials: self
                .username
                .clone()
                .map(|u| (u, self.password.clone().unwrap_or_default())),
            keep_alive: self.keep_alive,
            connect_timeout: self.connect_timeout,
            session_expiry: Duration::from_secs(3600),
        })
    }
}

#[derive(Args)]
struct RunArgs {
    #[command(flatten)]
    connect: ConnectArgs,
    /// Number of devices (connections in --flood).
    #[arg(long, default_value_t = 1, conflicts_with = "scenario")]
    devices: u32,
    /// Messages per second per device.
    #[arg(long, default_value_t = 1.0)]
    rate: f64,
    /// Relative jitter of each publish interval, in [0, 1).
    #[arg(long, default_value_t = 0.1)]
    jitter: f64,
    /// Stop publishing after this long (e.g. 10s, 2m).
    #[arg(long, value_parser = duration)]
    duration: Option<Duration>,
    /// Messages per device; the run ends when every device has sent them.
    #[arg(long)]
    count: Option<u64>,
    /// QoS of every publish: 0, 1 or 2.
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// Payload: JSON telemetry or binary [default: json; binary with --flood].
    #[arg(long, value_enum)]
    payload: Option<PayloadKind>,
    /// Payload size in bytes: exact for binary (>= 32, default 64); JSON is padded to it.
    #[arg(long)]
    payload_size: Option<usize>,
    /// Topic template; placeholders {device} {n} {k} {class} {run}.
    #[arg(long, default_value = "sensors/{device}/temperature")]
    topic: String,
    /// Client id template.
    #[arg(long, default_value = "sim-{device}")]
    client_id: String,
    /// Device name template ({n} is the 1-based device number).
    #[arg(long, default_value = "dev-{n}")]
    device_id: String,
    /// Clean or persistent sessions.
    #[arg(long, value_enum, default_value = "clean")]
    session: SessionKind,
    /// Session expiry of persistent MQTT 5 sessions.
    #[arg(long, value_parser = duration, default_value = "1h")]
    session_expiry: Duration,
    /// Spread the first connections evenly over this long.
    #[arg(long, value_parser = duration, default_value = "0s")]
    ramp_up: Duration,
    /// Most connection attempts in progress at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Most unacknowledged QoS 1/2 publishes per connection [default: 16; 64 with --flood].
    #[arg(long)]
    inflight: Option<u16>,
    /// Most messages a device queues in its client before skipping publishes.
    #[arg(long, default_value_t = 1000)]
    max_queue: usize,
    /// After the end, wait this long for outstanding acknowledgements.
    #[arg(long, value_parser = duration, default_value = "5s")]
    drain: Duration,
    /// Scenario file (TOML) with device classes and events; see the crate docs.
    #[arg(long)]
    scenario: Option<PathBuf>,
    /// Benchmark mode: pre-encoded packets written straight to the socket.
    #[arg(long)]
    flood: bool,
    /// With --flood: pace each connection to this many messages per second (default: as fast
    /// as the broker takes them), to measure latency at a given load.
    #[arg(long, requires = "flood")]
    flood_rate: Option<f64>,
    /// Drive devices with a small built-in MQTT client instead of rumqttc: same behaviour,
    /// a few KiB per idle device instead of ~31 KiB (for large idle fleets). mqtt:// only.
    #[arg(long, conflicts_with = "flood")]
    lightweight: bool,
    /// With --lightweight: bind sockets to these local IPv4 addresses in turn, e.g.
    /// 127.0.0.2-127.0.0.254, since one address has only ~28k ports towards one broker.
    #[arg(long, requires = "lightweight")]
    source_ips: Option<String>,
    /// Write the manifest (what was sent and acknowledged) to this directory.
    #[arg(long)]
    manifest: Option<PathBuf>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    report: Option<PathBuf>,
    /// Draw throughput and latency over time to this SVG file.
    #[arg(long)]
    plot: Option<PathBuf>,
}

#[derive(Args)]
#[command(group(ArgGroup::new("source").required(true).args(["edge_log", "mqtt", "kafka"])))]
struct VerifyArgs {
    /// Manifest directory written by `run --manifest`.
    #[arg(long)]
    manifest: PathBuf,
    /// Output of `edge read --json` (`-` for stdin).
    #[arg(long)]
    edge_log: Option<PathBuf>,
    /// Read from an MQTT broker instead (mqtt:// or mqtts:// URL).
    #[arg(long)]
    mqtt: Option<String>,
    /// Topic filter to subscribe to with --mqtt.
    #[arg(long, default_value = "#")]
    filter: String,
    /// Subscription QoS with --mqtt.
    #[arg(long, default_value_t = 1)]
    qos: u8,
    /// With --mqtt: stop when the manifest exists and nothing arrived for this long.
    #[arg(long, value_parser = duration, default_value = "3s")]
    idle: Duration,
    /// With --mqtt: give up after this long.
    #[arg(long, value_parser = duration, default_value = "30m")]
    timeout: Duration,
    #[command(flatten)]
    connect: VerifyConnectArgs,
    /// Read the records the mirror wrote to Kafka from these bootstrap servers
    /// (host:port[,host:port...]): every partition of each --kafka-topic from the beginning,
    /// committed transactions only, without joining a consumer group or committing offsets.
    #[arg(
        long,
        value_name = "BOOTSTRAP",
        requires = "kafka_topic",
        help_heading = "Kafka source"
    )]
    kafka: Option<String>,
    /// Kafka topic the mirror writes, {site}.{edge log topic} by default (e.g.
    /// plant-7.telemetry); repeat the option or separate names with commas for several. A topic
    /// that does not exist is an error.
    #[arg(
        long,
        value_name = "TOPIC",
        value_delimiter = ',',
        requires = "kafka",
        help_heading = "Kafka source"
    )]
    kafka_topic: Vec<String>,
    /// How long to wait for the mirror to deliver every acknowledged message: reading stops as
    /// soon as every partition is read to its end and nothing acknowledged is missing, or at the
    /// next end of all partitions after this long. A partition still not read to its end after
    /// as long again (at least 30s more) fails the verdict.
    #[arg(
        long,
        value_name = "DURATION",
        value_parser = duration,
        default_value = "60s",
        help_heading = "Kafka source"
    )]
    kafka_wait: Duration,
    #[command(flatten)]
    kafka_security: KafkaSecurityArgs,
    /// Write the verdict as JSON to this file.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Args)]
struct KafkaSecurityArgs {
    /// librdkafka security.protocol: plaintext, ssl, sasl_plaintext or sasl_ssl.
    #[arg(long, requires = "kafka", help_heading = "Kafka source")]
    kafka_security_protocol: Option<String>,
    /// librdkafka sasl.mechanism, e.g. PLAIN, SCRAM-SHA-256, SCRAM-SHA-512.
    #[arg(long, requires = "kafka", help_heading = "Kafka source")]
    kafka_sasl_mechanism: Option<String>,
    /// librdkafka sasl.username.
    #[arg(long, requires = "kafka", help_heading = "Kafka source")]
    kafka_username: Option<String>,
    /// librdkafka sasl.password (needs --kafka-username).
    #[arg(long, requires = "kafka_username", help_heading = "Kafka source")]
    kafka_password: Option<String>,
    /// librdkafka ssl.ca.location: CA certificates (PEM) to trust.
    #[arg(long, requires = "kafka", help_heading = "Kafka source")]
    kafka_ca_file: Option<PathBuf>,
}

#[derive(Args)]
struct VerifyConnectArgs {
    /// MQTT protocol version for --mqtt.
    #[arg(long, value_enum, default_value = "5")]
    protocol: Protocol,
    /// User name for --mqtt.
    #[arg(long)]
    username: Option<String>,
    /// Password for --mqtt.
    #[arg(long, requires = "username")]
    password: Option<String>,
    /// CA certificates (PEM) for an mqtts:// --mqtt URL.
    #[arg(long)]
    ca_file: Option<PathBuf>,
    /// Client certificate (PEM) for --mqtt.
    #[arg(long)]
    cert: Option<PathBuf>,
    /// Private key (PEM) of --cert.
    #[arg(long)]
    key: Option<PathBuf>,
}

#[derive(Args)]
struct SubscribeArgs {
    /// Broker URL: mqtt://host[:port] (plain TCP only).
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// Topic filter; repeat for several.
    #[arg(long = "filter", required = true)]
    filters: Vec<String>,
    /// QoS asked for every filter: 0, 1 or 2.
    #[arg(long, default_value_t = 0)]
    qos: u8,
    /// MQTT protocol version.
    #[arg(long, value_enum, default_value = "5")]
    protocol: Protocol,
    /// Client id [default: fwsim-sub-PID].
    #[arg(long)]
    client_id: Option<String>,
    /// User name.
    #[arg(long)]
    username: Option<String>,
    /// Password (needs --username).
    #[arg(long, requires = "username")]
    password: Option<String>,
    /// Stop this long after the SUBACK (e.g. 10s, 2m).
    #[arg(long, value_parser = duration)]
    duration: Option<Duration>,
    /// Stop after this many messages.
    #[arg(long)]
    count: Option<u64>,
    /// Stop when nothing arrived for this long; with --no-read, the longest it reads at the
    /// end to see whether the broker closed the connection.
    #[arg(long, value_parser = duration, default_value = "5s")]
    idle_timeout: Duration,
    /// Subscribe, then leave the socket unread until --duration has passed (a deliberately
    /// slow subscriber); report whether the broker closed the connection.
    #[arg(long, requires = "duration")]
    no_read: bool,
    /// Keep-alive asked for in the CONNECT, with a PINGREQ every half of it; 0s turns it off.
    #[arg(long, value_parser = duration, default_value = "60s")]
    keep_alive: Duration,
    /// Time allowed for TCP, CONNACK and SUBACK.
    #[arg(long, value_parser = duration, default_value = "10s")]
    connect_timeout: Duration,
    /// Write the report as JSON to this file.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Args)]
struct IdleArgs {
    /// Broker URL: mqtt://host[:port] (plain TCP only).
    #[arg(long, default_value = "mqtt://127.0.0.1:1883")]
    broker: String,
    /// MQTT protocol version.
    #[arg(long, value_enum, default_value = "3.1.1")]
    protocol: Protocol,
    /// Connections to open.
    #[arg(long)]
    connections: u64,
    /// Bind the sockets to these local IPv4 addresses in turn, e.g. 127.0.1.0-127.0.1.255,
    /// since one address has only ~28k ports towards one broker.
    #[arg(long)]
    source_ips: Option<String>,
    /// Keep-alive asked for in every CONNECT, with a PINGREQ every half of it.
    #[arg(long, value_parser = duration, default_value = "60s")]
    keep_alive: Duration,
    /// How long to hold the connections once every attempt has ended.
    #[arg(long, value_parser = duration, default_value = "30s")]
    hold: Duration,
    /// Most connection attempts in progress at once.
    #[arg(long, default_value_t = 256)]
    connect_concurrency: usize,
    /// Time allowed for TCP and CONNACK, per connection.
    #[arg(long, value_parser = duration, default_value = "30s")]
    connect_timeout: Duration,
    /// Client ids are this prefix followed by the connection's number.
    #[arg(long, default_value = "idle-")]
    client_id_prefix: String,
    /// Write the report so far (JSON) here as soon as every attempt has ended, before the hold.
    #[arg(long)]
    ready_file: Option<PathBuf>,
    /// Write the final report as JSON to this file.
    #[arg(long)]
    report: Option<PathBuf>,
}

#[derive(Args)]
struct SinkArgs {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:18831")]
    listen: String,
    /// Parse packets and acknowledge publishes and pings.
    #[arg(long)]
    ack: bool,
    /// Append received publishes to this file in `edge read --json` format (implies --ack).
    #[arg(long)]
    record: Option<PathBuf>,
}

async fn run_command(args: RunArgs) -> anyhow::Result<ExitCode> {
    let settings = {
        let mut s = args.connect.settings("--broker")?;
        s.session_expiry = args.session_expiry;
        s
    };
    let payload = args.payload.unwrap_or(if args.flood {
        PayloadKind::Binary
    } else {
        PayloadKind::Json
    });
    let defaults = ClassDefaults {
        devices: args.devices,
        rate: args.rate,
        jitter: args.jitter,
        qos: args.qos,
        payload,
        size: args.payload_size,
        topic: args.topic.clone(),
        device_id: args.device_id.clone(),
        client_id: args.client_id.clone(),
        session: args.session,
        inflight: args.inflight.unwrap_or(if args.flood { 64 } else { 16 }),
        count: args.count,
    };
    let run_id = new_run_id();
    let plan = match &args.scenario {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("--scenario: reading {}", path.display()))?;
            FleetPlan::from_scenario(run_id, path, &text, &defaults, args.duration)?
        }
        None => FleetPlan::from_options(run_id, &defaults, args.duration)?,
    };
    let options = RunOptions {
        settings,
        plan,
        ramp_up: args.ramp_up,
        connect_concurrency: args.connect_concurrency,
        max_queue: args.max_queue,
        drain: args.drain,
        flood_inflight: args.flood.then_some(defaults.inflight),
        flood_rate: args.flood_rate,
        lightweight: args.lightweight,
        source_ips: match &args.source_ips {
            Some(text) => parse_source_ips("--source-ips", text)?,
            None => Vec::new(),
        },
        manifest_dir: args.manifest.clone(),
        report_path: args.report.clone(),
        plot_path: args.plot.clone(),
    };
    let report = run(options).await?;
    print!("{}", report.table());
    if report.sent == 0 && report.connect_failures > 0 {
        eprintln!(
            "error: nothing was sent: {} connection attempts to {} failed (see the errors above)",
            report.connect_failures, report.broker
        );
        return Ok(ExitCode::from(EXIT_FAILED));
    }
    Ok(ExitCode::SUCCESS)
}

async fn verify_command(args: VerifyArgs) -> anyhow::Result<ExitCode> {
    if args.qos > 2 {
        anyhow::bail!("--qos: must be 0, 1 or 2 (got {})", args.qos);
    }
    if let Some(bootstrap) = &args.kafka {
        let security = &args.kafka_security;
        let source = KafkaSource {
            bootstrap: bootstrap.clone(),
            topics: args.kafka_topic.clone(),
            wait: args.kafka_wait,
            security: KafkaSecurity {
                protocol: security.kafka_security_protocol.clone(),
                sasl_mechanism: security.kafka_sasl_mechanism.clone(),
                username: security.kafka_username.clone(),
                password: security.kafka_password.clone(),
                ca_file: security.kafka_ca_file.clone(),
            },
        };
        let manifest = manifest::read(&args.manifest)?;
        let mut verifier = Verifier::new(&manifest);
        // librdkafka's poll blocks; nothing else runs on the runtime meanwhile.
        let findings = tokio::task::block_in_place(|| read_kafka(&source, &mut verifier))?;
        let described = format!("Kafka {bootstrap} topics {}", args.kafka_topic.join(","));
        let verdict = verifier.finish(&described).with_mirror(findings);
        return report_verdict(&args, &verdict);
    }
    let (source, received) = match (&args.edge_log, &args.mqtt) {
        (Some(path), _) => (format!("edge log {}", path.display()), None),
        (None, Some(url)) => {
            let connect = ConnectArgs {
                broker: url.clone(),
                protocol: args.connect.protocol,
                username: args.connect.username.clone(),
                password: args.connect.password.clone(),
                ca_file: args.connect.ca_file.clone(),
                cert: args.connect.cert.clone(),
                key: args.connect.key.clone(),
                keep_alive: Duration::from_secs(30),
                connect_timeout: Duration::from_secs(10),
            };
            let source = MqttSource {
                settings: connect.settings("--mqtt")?,
                filter: args.filter.clone(),
                qos: args.qos,
                idle: args.idle,
                timeout: args.timeout,
                manifest_dir: args.manifest.clone(),
            };
            let received = read_mqtt(&source).await?;
            (format!("MQTT {url} filter {}", args.filter), Some(received))
        }
        (None, None) => {
            anyhow::bail!("verify needs --edge-log FILE, --mqtt URL or --kafka BOOTSTRAP")
        }
    };
    let manifest = manifest::read(&args.manifest)?;
    let mut verifier = Verifier::new(&manifest);
    match received {
        Some(messages) => {
            for message in &messages {
                match &message.stamp {
                    Some(stamp) => {
                        verifier.observe_stamp(stamp, Some(message.at_us));
                    }
                    None => verifier.observe_foreign(),
                }
            }
        }
        None => {
            let path = args.edge_log.as_ref().expect("edge log chosen above");
            let stats = read_edge_log(path, &mut verifier)?;
            if stats.malformed > 0 {
                eprintln!(
                    "warning: {} of {} lines of {} are not edge records",
                    stats.malformed,
                    stats.lines,
                    path.display()
                );
            }
        }
    }
    let verdict = verifier.finish(&source);
    report_verdict(&args, &verdict)
}

async fn subscribe_command(args: SubscribeArgs) -> anyhow::Result<ExitCode> {
    let options = SubscribeOptions {
        url: BrokerUrl::parse("--broker", &args.broker)?,
        protocol: args.protocol,
        credentials: args
            .username
            .map(|u| (u, args.password.unwrap_or_default())),
        client_id: args
            .client_id
            .unwrap_or_else(|| format!("fwsim-sub-{}", std::process::id())),
        filters: args.filters,
        qos: args.qos,
        keep_alive: args.keep_alive,
        connect_timeout: args.connect_timeout,
        duration: args.duration,
        count: args.count,
        idle_timeout: args.idle_timeout,
        no_read: args.no_read,
        report_path: args.report,
    };
    // One blocking socket read as fast as it can; off the async workers.
    let report = tokio::task::spawn_blocking(move || subscribe(&options)).await??;
    println!("{}", report.summary_line());
    Ok(ExitCode::SUCCESS)
}

async fn idle_command(args: IdleArgs) -> anyhow::Result<ExitCode> {
    let options = IdleOptions {
        broker: BrokerUrl::parse("--broker", &args.broker)?,
        protocol: args.protocol,
        connections: args.connections,
        source_ips: match &args.source_ips {
            Some(text) => parse_source_ips("--source-ips", text)?,
            None => Vec::new(),
        },
        keep_alive: args.keep_alive,
        hold: args.hold,
        connect_concurrency: args.connect_concurrency,
        connect_timeout: args.connect_timeout,
        client_id_prefix: args.client_id_prefix,
        ready_file: args.ready_file,
    };
    let report = idle(options).await?;
    println!(
        "connected={} failed={} connect_seconds={:.2} open={} closed={}",
        report.connected,
        report.failed,
        report.connect_seconds,
        report.open_at_end,
        report.closed_while_held
    );
    for (error, count) in &report.errors {
        eprintln!("{count} x {error}");
    }
    if let Some(path) = &args.report {
        report::write_json(path, &report)?;
    }
    Ok(if report.failed == 0 && report.closed_while_held == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}

/// Writes the JSON report if asked, prints the table and the summary line, and picks the exit
/// code.
fn report_verdict(args: &VerifyArgs, verdict: &VerifyReport) -> anyhow::Result<ExitCode> {
    if let Some(path) = &args.report {
        report::write_json(path, verdict)?;
    }
    print!("{}", verdict.table());
    println!("{}", verdict.summary_line());
    Ok(if verdict.passed {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(EXIT_FAILED)
    })
}

/// Raises the soft limit on open files to the hard limit: every device holds a socket, and the
/// usual soft limit of 1024 would stop a fleet long before memory does.
fn raise_open_file_limit() {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct passed by pointer.
    #[allow(unsafe_code)]
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) == 0 && limit.rlim_cur < limit.rlim_max
        {
            limit.rlim_cur = limit.rlim_max;
            // Failure leaves the old limit, and connections past it report "too many open files".
            let _ = libc::setrlimit(libc::RLIMIT_NOFILE, &limit);
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    raise_open_file_limit();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("error: cannot start the async runtime: {e}");
            return ExitCode::from(EXIT_ERROR);
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Run(args) => run_command(*args).await,
            Command::Verify(args) => verify_command(*args).await,
            Command::Subscribe(args) => subscribe_command(*args).await,
            Command::Idle(args) => idle_command(*args).await,
            Command::Sink(args) => serve(SinkOptions {
                listen: args.listen,
                ack: args.ack,
                record: args.record,
            })
            .await
            .map(|()| ExitCode::SUCCESS)
            .map_err(anyhow::Error::from),
        }
    });
    // Device tasks may still hold sockets; do not wait for them.
    runtime.shutdown_background();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(EXIT_ERROR)
        }
    }
}
