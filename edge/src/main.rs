//! The `edge` binary: serve, or inspect a stopped node's log.

use std::io::Write;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::{bail, Context};
use clap::{Parser, Subcommand, ValueEnum};
use edge::config::{Config, ListenerProtocol, Source};
use edge::inspect::admin_client::{AdminClient, Token};
use edge::inspect::{PayloadText, RecordView, TopicView};
use edge::log::Log;
use edge::startup::{self, LoadedConfig};

const EXAMPLES: &str = "\
Every option can also come from the environment: TRIBUTARY_CONFIG, TRIBUTARY_DATA_DIR,
TRIBUTARY_MQTT_LISTEN, TRIBUTARY_TLS_LISTEN, TRIBUTARY_ADMIN_LISTEN, TRIBUTARY_LOG_FORMAT, and for
`read` and `topics` TRIBUTARY_ADMIN_URL and TRIBUTARY_ADMIN_TOKEN_FILE (a command-line option wins
over its variable). The admin token itself can come from TRIBUTARY_ADMIN_TOKEN.

Examples:
  edge                                          serve with the embedded defaults (MQTT on 0.0.0.0:1883, data in ./data)
  edge --config /etc/tributary/edge.toml        serve with a config file
  edge check-config --config edge.toml          validate a config and print the effective settings
  TRIBUTARY_DATA_DIR=/data edge --log-format json   a container: data directory from the environment, JSON logs
  edge passwd /etc/tributary/passwd sensor-17   add a user to a password file
  edge read --config edge.toml --topic telemetry --json   print the records of a stopped node
  edge read --admin http://127.0.0.1:8080 --follow --json   print a running node's new records as they come
  edge mirror-status --config edge.toml         where the Kafka mirror stands
  edge mirror-adopt --config edge.toml          accept this log as the site's (after a reset data directory)";

/// Tributary edge: MQTT in, a durable partitioned log on disk.
#[derive(Parser, Debug)]
#[command(name = "edge", version, about, after_help = EXAMPLES)]
struct Cli {
    /// TOML config file; without it the embedded defaults apply.
    #[arg(long, global = true, env = "TRIBUTARY_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    /// Data directory (overrides storage.data_dir).
    #[arg(long, global = true, env = "TRIBUTARY_DATA_DIR", value_name = "DIR")]
    data_dir: Option<PathBuf>,
    /// MQTT listen address: the first `mqtt` listener's (mqtt.listen, or the first
    /// [[listeners]] entry with protocol = "mqtt").
    #[arg(
        long,
        global = true,
        env = "TRIBUTARY_MQTT_LISTEN",
        value_name = "ADDR"
    )]
    mqtt_listen: Option<SocketAddr>,
    /// MQTT over TLS listen address: the first `mqtts` listener's (a [[listeners]] entry with
    /// protocol = "mqtts", or tls.listen).
    #[arg(long, global = true, env = "TRIBUTARY_TLS_LISTEN", value_name = "ADDR")]
    tls_listen: Option<SocketAddr>,
    /// Admin HTTP listen address (overrides admin.listen).
    #[arg(
        long,
        global = true,
        env = "TRIBUTARY_ADMIN_LISTEN",
        value_name = "ADDR"
    )]
    admin_listen: Option<SocketAddr>,
    /// Log output format.
    #[arg(
        long,
        global = true,
        env = "TRIBUTARY_LOG_FORMAT",
        value_enum,
        default_value_t = LogFormat::Text
    )]
    log_format: LogFormat,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Clone, Copy, Debug, ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Serve MQTT and write the log (the default).
    Serve,
    /// Validate a config file and print the effective settings (defaults filled in, secrets
    /// redacted) as TOML. Exit 0 when it is valid, 2 with the key and line when not.
    CheckConfig {
        /// The config file (or give it with --config, like every other command).
        file: Option<PathBuf>,
    },
    /// Add a user to a password file, or change their password (argon2id). The password is
    /// asked twice without echo on a terminal, or read as one line from standard input;
    /// never from the command line. The file is created (mode 0600) if missing; other lines,
    /// comments and mosquitto_passwd hashes included, stay as they are. Send the edge SIGHUP
    /// to use the new file.
    Passwd {
        /// The password file.
        file: PathBuf,
        /// The user name.
        user: String,
        /// Remove the user instead.
        #[arg(long)]
        delete: bool,
    },
    /// List the topics of a stopped node (or with --admin, a running one) with each
    /// partition's offsets.
    Topics {
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Decode every stored entry of a stopped node and list those that do not decode (record
    /// batches and meta entries: sessions, subscriptions, queues, retained messages, group
    /// positions). Exits 1 when it finds any. The running edge skips them and counts them;
    /// this lists them all at once.
    Check {
        /// Move the entries that do not decode to the data directory's `quarantine`
        /// keyspace (kept, out of every reader's way); a moved batch reads as deleted
        /// records.
        #[arg(long)]
        repair: bool,
        /// One JSON document.
        #[arg(long)]
        json: bool,
    },
    /// Print records of a stopped node, or with --admin, of a running one (through its admin
    /// API: durable records only).
    Read {
        /// Only this topic (default: all).
        #[arg(long)]
        topic: Option<String>,
        /// Only this partition (default: all).
        #[arg(long)]
        partition: Option<u32>,
        /// First offset of each partition read (default: the first still held; with
        /// --follow, the end: only records appended from then on).
        #[arg(long)]
        from: Option<u64>,
        /// Most records to print in total.
        #[arg(long)]
        limit: Option<usize>,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
        /// Keep printing records as they are appended (polling the admin API) until
        /// SIGINT or SIGTERM; needs --admin.
        #[arg(long, requires = "admin")]
        follow: bool,
        #[command(flatten)]
        admin: AdminArgs,
    },
    /// Where the Kafka mirror stands, per partition: edge end offset, mirrored offset, lag,
    /// records lost before they were mirrored, the last error and when the link was last
    /// healthy. Works while the edge runs (from the status it rewrites every second) and
    /// after it stopped (with the log's current ends).
    MirrorStatus {
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// On a stopped node whose mirror refuses Kafka's checkpoints because another log wrote
    /// them (the data directory was reset or replaced): adopt that log as this one's
    /// predecessor. The next start mirrors this log from its first offset, after the old
    /// log's records; records this log deleted before they could be mirrored are counted as
    /// lost. Refused while the edge runs, and for a site that another edge uses.
    MirrorAdopt {
        /// One JSON document instead of text.
        #[arg(long)]
        json: bool,
    },
    /// The durable consumer groups, per partition: committed position, end offset, lag,
    /// owner, records lost to retention and, with a mirror, the Kafka group's offset as last
    /// replicated. Works while
    /// the edge runs (from the status it rewrites every second) and after it stopped.
    Groups {
        /// One JSON document instead of a table.
        #[arg(long)]
        json: bool,
        #[command(subcommand)]
        action: Option<GroupsAction>,
    },
}

/// Reading a running node through its admin API.
#[derive(clap::Args, Debug)]
struct AdminArgs {
    /// Read a running node through its admin API at this URL (http://HOST:PORT, the edge's
    /// admin.listen) instead of a stopped node's data directory.
    #[arg(long, env = "TRIBUTARY_ADMIN_URL", value_name = "URL")]
    admin: Option<String>,
    /// With --admin: file whose first line is the admin token (admin.token); without it the
    /// token is taken from TRIBUTARY_ADMIN_TOKEN, if set. There is no option for the token
    /// itself: the command line is visible to every user of the machine.
    #[arg(long, env = "TRIBUTARY_ADMIN_TOKEN_FILE", value_name = "FILE")]
    token_file: Option<PathBuf>,
}

impl AdminArgs {
    /// The admin API client, when --admin was given.
    fn client(&self) -> anyhow::Result<Option<AdminClient>> {
        let Some(url) = &self.admin else {
            return Ok(None);
        };
        let token = match &self.token_file {
            Some(file) => {
                let text = std::fs::read_to_string(file)
                    .with_context(|| format!("--token-file {}", file.display()))?;
                let token = text.lines().next().unwrap_or_default().trim().to_string();
                if token.is_empty() {
                    bail!(
                        "--token-file {}: the first line is empty (it holds the admin token)",
                        file.display()
                    );
                }
                Some(Token::new(
                    token,
                    format!("--token-file {}", file.display()),
                ))
            }
            None => std::env::var(ADMIN_TOKEN_VAR)
                .ok()
                .filter(|t| !t.is_empty())
                .map(|t| Token::new(t, ADMIN_TOKEN_VAR.to_string())),
        };
        Ok(Some(AdminClient::new(url, token)?))
    }
}

/// The environment variable holding the admin token.
const ADMIN_TOKEN_VAR: &str = "TRIBUTARY_ADMIN_TOKEN";

#[derive(Subcommand, Debug)]
enum GroupsAction {
    /// Move a group's positions, on a stopped node.
    Reset {
        /// The group.
        #[arg(long)]
        group: String,
        /// `earliest`, `latest`, or an offset (the same in every partition, kept within
        /// what each partition holds).
        #[arg(long)]
        to: edge::groups::ResetTo,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_tracing(cli.log_format);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("edge: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn init_tracing(format: LogFormat) {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,fjall=warn,lsm_tree=warn"));
    use tracing_subscriber::layer::SubscriberExt as _;
    use tracing_subscriber::util::SubscriberInitExt as _;
    let registry = tracing_subscriber::registry()
        .with(filter)
        .with(edge::recent::RecentErrors);
    match format {
        LogFormat::Text => registry
            .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr))
            .init(),
        LogFormat::Json => registry
            .with(
                tracing_subscriber::fmt::layer()
                    .json()
                    .with_writer(std::io::stderr),
            )
            .init(),
    }
}

/// Each connection is a file descriptor; the usual soft limit of 1024 would cap the edge far
/// below what it serves, so it asks for the hard limit.
fn raise_open_file_limit() {
    // SAFETY: getrlimit/setrlimit only read and write the struct passed in.
    #[allow(unsafe_code)]
    unsafe {
        let mut lim = libc::rlimit {
            rlim_cur: 0,
            rlim_max: 0,
        };
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) == 0 && lim.rlim_cur < lim.rlim_max {
            let wanted = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &wanted) != 0 {
                tracing::warn!(
                    soft = lim.rlim_cur,
                    "could not raise the open-file limit; connections are capped near it"
                );
            }
        }
    }
}

/// The config of `--config` (or the embedded defaults) with every file it names loaded, and
/// the command-line overrides applied.
fn load_config(cli: &Cli) -> anyhow::Result<LoadedConfig> {
    let source = match &cli.config {
        Some(path) => Source::read(path)?,
        None => Source::embedded(),
    };
    let mut loaded = startup::load(&source)?;
    let config = &mut loaded.config;
    if let Some(dir) = &cli.data_dir {
        config.storage.data_dir = dir.clone();
    }
    if let Some(addr) = cli.mqtt_listen {
        if !config.set_first_listener(ListenerProtocol::Mqtt, addr) {
            bail!("--mqtt-listen {addr}: the config has no mqtt listener; add a [[listeners]] entry with protocol = \"mqtt\"");
        }
    }
    if let Some(addr) = cli.tls_listen {
        if !config.set_first_listener(ListenerProtocol::Mqtts, addr) {
            bail!(
                "--tls-listen {addr}: the config has no mqtts listener and no [tls] section; add a [[listeners]] entry with protocol = \"mqtts\", cert_file and key_file (or a [tls] section)"
            );
        }
    }
    if let Some(addr) = cli.admin_listen {
        config.admin.listen = Some(addr);
        config.admin.enabled = Some(true);
        // A non-loopback address needs a token: check again with the override.
        loaded.admin = startup::admin_access(&loaded.config, &Source::new("", "--admin-listen"))?;
    }
    Ok(loaded)
}

fn run(cli: Cli) -> anyhow::Result<()> {
    if let Some(Command::Passwd { file, user, delete }) = &cli.command {
        return passwd(file, user, *delete);
    }
    if let Some(Command::CheckConfig { file }) = &cli.command {
        let file = match (file, &cli.config) {
            (Some(given), Some(config)) if given != config => bail!(
                "check-config was given two config files: {} and --config {}",
                given.display(),
                config.display()
            ),
            (Some(file), _) | (None, Some(file)) => file.clone(),
            (None, None) => bail!(
                "check-config needs a config file: edge check-config --config FILE (or TRIBUTARY_CONFIG)"
            ),
        };
        let loaded = load_config(&Cli {
            config: Some(file.clone()),
            command: None,
            ..cli
        })?;
        let text =
            toml::to_string_pretty(&loaded.config).context("printing the effective settings")?;
        print!("{text}");
        for warning in loaded.warnings() {
            eprintln!("{}: warning: {warning}", file.display());
        }
        eprintln!("{}: valid", file.display());
        return Ok(());
    }
    // A running node is read through its admin API: no config, no data directory.
    match &cli.command {
        Some(Command::Topics { json, admin }) => {
            if let Some(client) = admin.client()? {
                let topics = block_on(client.topics())?;
                return print_topics(&topics, *json);
            }
        }
        Some(Command::Read {
            topic,
            partition,
            from,
            limit,
            json,
            follow,
            admin,
        }) => {
            if let Some(client) = admin.client()? {
                return block_on(edge::inspect::remote::read(
                    &client,
                    &edge::inspect::remote::ReadArgs {
                        topic: topic.clone(),
                        partition: *partition,
                        from: *from,
                        limit: *limit,
                        json: *json,
                        follow: *follow,
                    },
                ));
            }
        }
        _ => {}
    }
    let loaded = load_config(&cli)?;
    let config = &loaded.config;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Serve => {
            raise_open_file_limit();
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .enable_all()
                .thread_name("edge")
                .build()
                .context("starting the async runtime")?;
            runtime.block_on(edge::server::serve(loaded))?;
            Ok(())
        }
        Command::CheckConfig { .. } | Command::Passwd { .. } => {
            unreachable!("handled before the config is loaded")
        }
        Command::Topics { json, .. } => topics(config, json),
        Command::Check { repair, json } => check(config, repair, json),
        Command::Read {
            topic,
            partition,
            from,
            limit,
            json,
            ..
        } => read(config, topic, partition, from.unwrap_or(0), limit, json),
        Command::MirrorStatus { json } => mirror_status(config, json),
        Command::MirrorAdopt { json } => mirror_adopt(config, json),
        Command::Groups {
            action: Some(GroupsAction::Reset { group, to }),
            ..
        } => groups_reset(config, &group, to),
        Command::Groups { json, action: None } => groups(config, json),
    }
}

/// Runs `task` on a runtime of its own (one thread: the commands that read a running node
/// wait on it most of the time).
fn block_on<T, E: Into<anyhow::Error>>(
    task: impl std::future::Future<Output = Result<T, E>>,
) -> anyhow::Result<T> {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?
        .block_on(task)
        .map_err(Into::into)
}

/// `edge passwd FILE USER [--delete]`.
fn passwd(file: &std::path::Path, user: &str, delete: bool) -> anyhow::Result<()> {
    use edge::auth::passwords;
    use std::io::IsTerminal as _;
    passwords::validate_user_name(user).map_err(anyhow::Error::msg)?;
    let existing = match std::fs::read_to_string(file) {
        Ok(t) => Some(t),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => bail!("reading {}: {e}", file.display()),
    };
    if let Some(text) = &existing {
        // Refuse to rewrite a file the edge could not load: the error names the line to fix.
        passwords::PasswordFile::parse(text, file)?;
    }
    let text = existing.unwrap_or_default();
    let hash = if delete {
        None
    } else {
        let password = if std::io::stdin().is_terminal() {
            let first = rpassword::prompt_password(format!("password for {user}: "))
                .context("reading the password")?;
            let again = rpassword::prompt_password("again: ").context("reading the password")?;
            if first != again {
                bail!("the passwords differ; nothing changed");
            }
            first
        } else {
            let mut line = String::new();
            std::io::stdin()
                .read_line(&mut line)
                .context("reading the password from standard input")?;
            line.trim_end_matches(['\n', '\r']).to_string()
        };
        if password.is_empty() {
            bail!("the password is empty; nothing changed");
        }
        Some(passwords::hash_password(password.as_bytes()).map_err(anyhow::Error::msg)?)
    };
    let (new_text, found) = passwords::edit_file_text(&text, user, hash.as_deref());
    if delete && !found {
        bail!(
            "user {user:?} is not in {}; nothing changed",
            file.display()
        );
    }
    write_atomically(file, new_text.as_bytes())?;
    eprintln!(
        "{}: user {user:?} {}",
        file.display(),
        match (delete, found) {
            (true, _) => "deleted",
            (false, true) => "password changed",
            (false, false) => "added",
        }
    );
    Ok(())
}

/// Writes a file through a temporary file in the same directory and a rename, so readers
/// (the edge on SIGHUP) see the old or the new file, never half of one. A new file gets
/// mode 0600; an existing one keeps its mode.
fn write_atomically(path: &std::path::Path, bytes: &[u8]) -> anyhow::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt as _, PermissionsExt as _};
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = path
        .file_name()
        .with_context(|| format!("{} is not a file name", path.display()))?;
    let mode = std::fs::metadata(path).map_or(0o600, |m| m.permissions().mode() & 0o7777);
    let tmp = dir.join(format!(
        ".{}.tmp-{}",
        name.to_string_lossy(),
        std::process::id()
    ));
    let written = (|| -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o600)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.set_permissions(std::fs::Permissions::from_mode(mode))?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        std::fs::File::open(&dir)?.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        bail!("writing {}: {e}", path.display());
    }
    Ok(())
}

/// [`open_stopped`], for `edge read` and `edge topics`: a running node's refusal says how
/// to read it anyway.
fn open_stopped_for_reading(config: &Config) -> anyhow::Result<Log> {
    open_stopped(config).map_err(|e| {
        if let Some(edge::log::LogError::Locked(dir)) = e.downcast_ref::<edge::log::LogError>() {
            let url = match config.admin.address() {
                Some((addr, _)) => format!("--admin http://{addr}"),
                None => "--admin http://HOST:PORT (its admin endpoint is turned off in this config)".to_string(),
            };
            anyhow::anyhow!(
                "the data directory {} is in use by another process, a running edge: read it through its admin API with {url} (and --token-file FILE when it has a token), or stop it first",
                dir.display()
            )
        } else {
            e
        }
    })
}

fn open_stopped(config: &Config) -> anyhow::Result<Log> {
    let dir = &config.storage.data_dir;
    // fjall writes its `version` file when it creates a database; without it the directory
    // holds no log, and opening it would create one.
    if !dir.join("version").exists() {
        bail!(
            "no log in {}: nothing has been stored there (give the edge's --data-dir)",
            dir.display()
        );
    }
    Ok(Log::open(dir, None, None)?)
}

/// `edge check [--repair] [--json]`.
fn check(config: &Config, repair: bool, json: bool) -> anyhow::Result<()> {
    let log = open_stopped(config)?;
    let report = edge::check::check(&log, repair)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&report)?);
    } else {
        for b in &report.bad {
            println!("{} {} {}: {}", b.keyspace, b.kind, b.at, b.error);
        }
        println!(
            "checked {} record batches and {} meta entries: {} do not decode{}",
            report.batches_checked,
            report.meta_checked,
            report.bad.len(),
            if repair {
                format!(", {} moved to quarantine", report.moved)
            } else if report.bad.is_empty() {
                String::new()
            } else {
                " (edge check --repair moves them to quarantine)".to_string()
            }
        );
    }
    if !report.bad.is_empty() && !repair {
        std::process::exit(1);
    }
    Ok(())
}

fn mirror_status(config: &Config, json: bool) -> anyhow::Result<()> {
    let dir = &config.storage.data_dir;
    let mut status = edge::uplink::read_status(dir).map_err(anyhow::Error::msg)?;
    // A stopped edge's log gives the current ends; a running one holds the log, and its
    // status file is at most a second old.
    let running = match Log::open(dir, None, None) {
        Ok(log) => {
            let source = edge::uplink::LogSource::new(std::sync::Arc::new(log));
            status.refresh_from(&source);
            false
        }
        Err(edge::log::LogError::Locked(_)) => true,
        Err(e) => return Err(e.into()),
    };
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if json {
        let mut doc = serde_json::to_value(&status)?;
        doc["edge_running"] = serde_json::Value::Bool(running);
        doc["lag_records"] = status.lag_records().into();
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        let when = |ms: Option<u64>| match ms {
            None => "never".to_string(),
            Some(ms) => {
                let ago = cloud_sync::status::now_ms().saturating_sub(ms);
                format!("{:.1}s ago", ago as f64 / 1000.0)
            }
        };
        writeln!(
            out,
            "site {} -> {} ({:?}{}); last healthy {}; {} records lag",
            status.site,
            status.bootstrap,
            status.state,
            if running {
                ", edge running"
            } else {
                ", edge stopped"
            },
            when(status.last_healthy_at_ms),
            status.lag_records()
        )?;
        if let Some(id) = &status.log_id {
            writeln!(out, "log id {id}")?;
        }
        if let Some(r) = &status.refusal {
            writeln!(
                out,
                "REFUSED ({}): {}{}",
                r.reason.label(),
                r.message,
                if status.state == cloud_sync::LinkState::Refused {
                    ""
                } else {
                    " (as last decided; the mirror checks again when Kafka answers)"
                }
            )?;
            for (topic, partition, next, kafka) in &r.checkpoints {
                writeln!(
                    out,
                    "  Kafka's checkpoint of {topic}/{partition}: the other log's offsets below {next} mirrored, the last at Kafka offset {kafka}"
                )?;
            }
        }
        if let Some(e) = &status.last_error {
            let kind = status.last_error_kind.map_or("", |k| k.label());
            writeln!(
                out,
                "last error ({kind}{}{}): {e}",
                if kind.is_empty() { "" } else { ", " },
                when(status.last_error_at_ms)
            )?;
        }
        writeln!(
            out,
            "{:<24} {:<32} {:>4} {:>12} {:>12} {:>10} {:>12} {:>8}",
            "TOPIC", "KAFKA_TOPIC", "PART", "EDGE_END", "MIRRORED", "LAG", "LAG_BYTES", "LOST"
        )?;
        for p in &status.partitions {
            writeln!(
                out,
                "{:<24} {:<32} {:>4} {:>12} {:>12} {:>10} {:>12} {:>8}{}",
                p.topic,
                p.kafka_topic,
                p.partition,
                p.edge_end_offset,
                p.mirrored_offset
                    .map(|o| o.to_string())
                    .unwrap_or_else(|| "-".into()),
                p.lag_records,
                p.lag_bytes,
                p.lost_before_mirror,
                p.error
                    .as_deref()
                    .map(|e| format!("  error: {e}"))
                    .unwrap_or_default()
            )?;
        }
    }
    out.flush()?;
    Ok(())
}

/// `edge mirror-adopt`: adopts, on a stopped node, the log whose Kafka checkpoints the
/// mirror refused, as this log's predecessor.
fn mirror_adopt(config: &Config, json: bool) -> anyhow::Result<()> {
    let dir = &config.storage.data_dir;
    let log = match open_stopped(config) {
        Ok(log) => log,
        Err(e) => {
            if matches!(
                e.downcast_ref::<edge::log::LogError>(),
                Some(edge::log::LogError::Locked(_))
            ) {
                bail!(
                    "the edge is running on {}: stop it first (a log is adopted only on a stopped node)",
                    dir.display()
                );
            }
            return Err(e);
        }
    };
    let mut status = edge::uplink::read_status(dir).map_err(anyhow::Error::msg)?;
    let identity = log.identity();
    let this = edge::log::meta::id_hex(&identity.id);
    let Some(refusal) = status.refusal.clone() else {
        bail!(
            "the mirror of site {} refuses nothing (as its status in {} last said): there is nothing to adopt",
            status.site,
            dir.display()
        );
    };
    if status.log_id.as_deref() != Some(this.as_str()) {
        bail!(
            "the mirror status in {} was written for log {} but this log is {this}: start the edge once so that its mirror reads Kafka's checkpoints, then stop it and adopt",
            dir.display(),
            status.log_id.as_deref().unwrap_or("(none)")
        );
    }
    if refusal.reason == cloud_sync::RefusalReason::DuplicateSite {
        bail!(
            "{}\nedge mirror-adopt is for a data directory that replaced the one that mirrored; two edges that use one site need two site names",
            refusal.message
        );
    }
    let predecessor = match &refusal.foreign_log {
        None => None,
        Some(hex) => Some(edge::log::meta::parse_id_hex(hex).with_context(|| {
            format!("the mirror status names the other log as {hex:?}, which is not a log id")
        })?),
    };
    log.adopt_predecessor(predecessor)?;
    // This log follows the old log's records in Kafka from its own first offset: what it no
    // longer holds of that range will never be mirrored, and is counted as lost now.
    let source = edge::uplink::LogSource::new(std::sync::Arc::new(log));
    let mut lost = Vec::new();
    for p in &mut status.partitions {
        let start = cloud_sync::PartitionedSource::bounds(&source, &p.topic, p.partition)
            .map(|b| b.start)
            .unwrap_or(0);
        let newly = start.saturating_sub(p.loss_counted_until);
        p.lost_before_mirror += newly;
        p.loss_counted_until = p.loss_counted_until.max(start);
        p.mirrored_offset = Some(0);
        p.error = None;
        lost.push((p.topic.clone(), p.partition, newly));
    }
    status.refusal = None;
    status.state = cloud_sync::LinkState::Stopped;
    status.refresh_from(&source);
    edge::uplink::write_status(dir, &status)?;
    let lost_total: u64 = lost.iter().map(|l| l.2).sum();
    if json {
        let doc = serde_json::json!({
            "site": status.site,
            "log_id": this,
            "adopted": refusal.foreign_log,
            "adopted_unmarked": refusal.foreign_log.is_none(),
            "lost_before_mirror": lost_total,
            "partitions": lost.iter().map(|(t, p, n)| serde_json::json!({"topic": t, "partition": p, "lost": n})).collect::<Vec<_>>(),
        });
        println!("{}", serde_json::to_string_pretty(&doc)?);
    } else {
        println!(
            "site {}: this log ({this}) adopted {} as its predecessor.",
            status.site,
            match &refusal.foreign_log {
                Some(id) => format!("log {id}"),
                None => "the checkpoints written before logs had ids".to_string(),
            }
        );
        println!(
            "At the next start it is mirrored from its first offset, after the old log's records in Kafka; {lost_total} records it deleted before they could be mirrored are counted as lost."
        );
        println!(
            "Records the old log held beyond its last checkpoint were in the replaced data directory: they are not in Kafka and no edge can count them."
        );
        for (t, p, n) in lost.iter().filter(|l| l.2 > 0) {
            println!("  {t}/{p}: {n} lost");
        }
    }
    Ok(())
}

/// The groups' reports: from the running edge's status file, or from a stopped node's log.
fn groups(config: &Config, json: bool) -> anyhow::Result<()> {
    use edge::groups::{stored_positions, GroupStatus, PartitionPosition};
    let dir = &config.storage.data_dir;
    let (running, mut list) = match open_stopped(config) {
        Ok(log) => {
            let stored = stored_positions(&log, None)?;
            let mut names: Vec<String> = config.groups.iter().map(|g| g.name.clone()).collect();
            for s in &stored {
                if !names.contains(&s.group) {
                    names.push(s.group.clone());
                }
            }
            let list = names
                .into_iter()
                .map(|name| {
                    let topics = edge::groups::group_topics(&config.groups, &stored, &name);
                    let mut partitions = Vec::new();
                    for t in &topics {
                        let Some(tl) = log.topic(t) else { continue };
                        for (i, p) in tl.partitions.iter().enumerate() {
                            let end = p.durable_end();
                            let committed = stored
                                .iter()
                                .find(|s| {
                                    s.group == name && &s.topic == t && s.partition == i as u32
                                })
                                .map(|s| s.committed);
                            partitions.push(PartitionPosition {
                                topic: t.clone(),
                                partition: i as u32,
                                committed: committed.unwrap_or(0),
                                end,
                                lag: committed.map_or(end, |c| end.saturating_sub(c)),
                                ..Default::default()
                            });
                        }
                    }
                    GroupStatus {
                        name,
                        topics,
                        partitions,
                        ..Default::default()
                    }
                })
                .collect::<Vec<_>>();
            let mut list = list;
            // What the mirror last replicated, when there is a mirror.
            if let Ok(m) = edge::uplink::read_status(dir) {
                edge::groups::add_replication(&mut list, &m);
            }
            (false, list)
        }
        Err(_) if dir.join(edge::groups::STATUS_FILE).exists() => (
            true,
            edge::groups::read_status(dir).map_err(anyhow::Error::msg)?,
        ),
        Err(e) => return Err(e),
    };
    list.sort_by(|a, b| a.name.cmp(&b.name));
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if json {
        let doc = serde_json::json!({ "edge_running": running, "groups": list });
        writeln!(out, "{}", serde_json::to_string_pretty(&doc)?)?;
    } else {
        for g in &list {
            writeln!(
                out,
                "group {} (topics {}; {} members online{}{})",
                g.name,
                g.topics.join(", "),
                g.members.len(),
                if running { "" } else { ", edge stopped" },
                match (&g.kafka_state, &g.kafka_error) {
                    (Some(state), None) => format!(
                        "; Kafka: {}",
                        serde_json::to_string(state)?.trim_matches('"')
                    ),
                    (Some(state), Some(e)) => format!(
                        "; Kafka: {} ({e})",
                        serde_json::to_string(state)?.trim_matches('"')
                    ),
                    _ => String::new(),
                }
            )?;
            writeln!(
                out,
                "  {:<24} {:>4} {:>12} {:>12} {:>10} {:>8} {:>12}  OWNER",
                "TOPIC", "PART", "POSITION", "END", "LAG", "LOST", "KAFKA_OFFSET"
            )?;
            for p in &g.partitions {
                writeln!(
                    out,
                    "  {:<24} {:>4} {:>12} {:>12} {:>10} {:>8} {:>12}  {}",
                    p.topic,
                    p.partition,
                    p.committed,
                    p.end,
                    p.lag,
                    p.lost,
                    p.kafka_offset
                        .map(|o| o.to_string())
                        .unwrap_or_else(|| "-".into()),
                    p.owner.as_deref().unwrap_or("-")
                )?;
            }
        }
    }
    out.flush()?;
    Ok(())
}

/// Moves a group's stored positions on a stopped node.
fn groups_reset(config: &Config, group: &str, to: edge::groups::ResetTo) -> anyhow::Result<()> {
    let log = match open_stopped(config) {
        Ok(log) => std::sync::Arc::new(log),
        Err(e) => {
            if matches!(
                e.downcast_ref::<edge::log::LogError>(),
                Some(edge::log::LogError::Locked(_))
            ) {
                bail!("the edge is running on {}: stop it first (positions change only on a stopped node)", config.storage.data_dir.display());
            }
            return Err(e);
        }
    };
    let stored = edge::groups::stored_positions(&log, Some(group))?;
    let topics = edge::groups::group_topics(&config.groups, &stored, group);
    if topics.is_empty() {
        bail!("no group \"{group}\": it is neither declared in the config's [[groups]] nor stored in {}", config.storage.data_dir.display());
    }
    let (ops, positions) = edge::groups::reset_ops(&log, group, &topics, &stored, to)?;
    let (tx, thread) = edge::log::appender::spawn(
        log.clone(),
        edge::config::FsyncMode::Always,
        config.storage.compression,
        1,
        4,
        1,
        |_| {},
    );
    let written = tx.blocking_commit(edge::log::appender::AppendRequest {
        state: ops,
        ..Default::default()
    });
    tx.blocking_shutdown();
    drop(tx);
    let joined = thread.join();
    if let Err(why) = written {
        bail!("writing the new positions: {why}");
    }
    match joined {
        Ok(Ok(())) => {}
        Ok(Err(why)) => bail!("closing the log: {why}"),
        Err(_) => bail!("the log writer panicked"),
    }
    for p in positions {
        println!("{} {}/{} -> {}", p.group, p.topic, p.partition, p.committed);
    }
    Ok(())
}

fn topics(config: &Config, json: bool) -> anyhow::Result<()> {
    let log = open_stopped_for_reading(config)?;
    let views: Vec<TopicView> = log.topics().iter().map(TopicView::new).collect();
    print_topics(&views, json)
}

/// `edge topics` output, the same for a stopped node and a running one.
fn print_topics(topics: &[TopicView], json: bool) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    if json {
        writeln!(out, "{}", serde_json::to_string_pretty(topics)?)?;
    } else {
        writeln!(
            out,
            "{:<32} {:>9} {:>14} {:>14} {:>14}",
            "TOPIC", "PARTITION", "START_OFFSET", "END_OFFSET", "BYTES"
        )?;
        for t in topics {
            for p in &t.partitions {
                writeln!(
                    out,
                    "{:<32} {:>9} {:>14} {:>14} {:>14}",
                    t.topic, p.partition, p.start_offset, p.end_offset, p.bytes
                )?;
            }
        }
    }
    match out.flush() {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

fn read(
    config: &Config,
    topic: Option<String>,
    partition: Option<u32>,
    from: u64,
    limit: Option<usize>,
    json: bool,
) -> anyhow::Result<()> {
    let log = open_stopped_for_reading(config)?;
    let topics: Vec<_> = match &topic {
        Some(name) => vec![log
            .topic(name)
            .ok_or_else(|| edge::log::LogError::UnknownTopic(name.clone()))?],
        None => log.topics().iter().collect(),
    };
    let mut remaining = limit.unwrap_or(usize::MAX);
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for t in topics {
        let partitions: Vec<u32> = match partition {
            Some(p) => {
                if p as usize >= t.partitions.len() {
                    bail!(
                        "topic \"{}\" has no partition {p} (it has {})",
                        t.name,
                        t.partitions.len()
                    );
                }
                vec![p]
            }
            None => (0..t.partitions.len() as u32).collect(),
        };
        for p in partitions {
            let mut next = from;
            while remaining > 0 {
                let batch = log.read(t.id, p, next, remaining.min(10_000))?;
                let Some(last) = batch.last() else { break };
                next = last.offset + 1;
                for r in &batch {
                    let view = RecordView::new(&t.name, p, r, PayloadText::Auto);
                    let written = writeln!(out, "{}", record_line(&view, json));
                    if let Err(e) = written {
                        if e.kind() == std::io::ErrorKind::BrokenPipe {
                            return Ok(());
                        }
                        return Err(e.into());
                    }
                }
                remaining -= batch.len();
            }
        }
    }
    let corrupt = log
        .counters
        .corrupt_batches
        .load(std::sync::atomic::Ordering::Relaxed);
    if corrupt > 0 {
        eprintln!(
            "edge read: skipped {corrupt} record batch(es) that do not decode (each logged above with its topic, partition and offset); every other record was read"
        );
    }
    match out.flush() {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        other => Ok(other?),
    }
}

/// One `edge read` line.
fn record_line(view: &RecordView, json: bool) -> String {
    if json {
        view.to_json_line()
    } else {
        view.to_text_line()
    }
}
