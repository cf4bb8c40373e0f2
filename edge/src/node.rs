//! A serving edge node: its parts, started in order and stopped in reverse.
//!
//! [`Node::start`] takes a [`LoadedConfig`] (every file already read by `crate::startup`)
//! and runs these steps in order, each using what the ones before it made:
//!
//! 1. [`start_log`]: the log, the sessions and retained messages it holds, the appender
//!    (group commit) and the router.
//! 2. [`start_fsync_timer`]: the timed fsync of `fsync = "interval:<ms>"` (and of `"never"`
//!    while the mirror or consumer groups read).
//! 3. [`bind_listeners`]: the MQTT sockets of every listener, bound now and served in step 9,
//!    so that an address in use stops the edge before anything else starts.
//! 4. [`start_auth`]: authentication over the loaded password and ACL files, and with it
//!    the broker every connection shares.
//! 5. [`start_groups`]: the durable consumer groups.
//! 6. [`start_mirror`]: the Kafka mirror, which replicates the groups' positions; then the
//!    groups' and the mirror's status files.
//! 7. [`start_housekeeping`]: session expiry and retention, and the `$SYS` topics.
//! 8. [`start_admin`]: the admin HTTP endpoint.
//! 9. The wills stored when the previous run stopped: those due are published (before any
//!    client connects), the others wait out their delay.
//! 10. [`start_serving`]: MQTT connections, and SIGHUP reloads.
//!
//! [`Node::shutdown`] stops them in reverse order with one exception: the consumer groups
//! stop right after the listeners (their members are gone then), because they store their
//! last positions as they stop and the mirror's last round, when it stops, replicates those
//! to Kafka.

use std::future::Future;
use std::ops::ControlFlow;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::admin::AdminState;
use crate::auth::Auth;
use crate::config::{Config, ConfigError, FsyncMode};
use crate::groups::Groups;
use crate::log::appender::{self, now_ms, AppendRequest, Appender, CommitError, StateOp};
use crate::log::{Budget, Log, LogError};
use crate::mqtt::delivery::{self, Hub, Message, OutboxLimits};
use crate::mqtt::session::SessionStore;
use crate::mqtt::tls::TlsServer;
use crate::mqtt::will;
use crate::mqtt::{self, Broker};
use crate::route::{RoutePlan, Router};
use crate::startup::{AdminAccess, AuthFiles, LoadedConfig};

/// Why the edge could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] ConfigError),
    /// The log could not be opened or failed.
    #[error(transparent)]
    Log(#[from] LogError),
    /// The MQTT listener could not be bound.
    #[error("cannot listen for MQTT on {addr}: {source}")]
    Bind {
        /// The address.
        addr: std::net::SocketAddr,
        /// What the OS said.
        source: std::io::Error,
    },
    /// A write to the log failed while serving; nothing after it was acknowledged.
    #[error("the log failed and the edge stopped: {0}")]
    Fatal(CommitError),
}

/// Appender queue length, in requests; the bytes they hold are bounded separately by
/// `mqtt::APPEND_BUDGET_BYTES`.
const APPENDER_QUEUE: usize = 1024;
/// How long connections get to finish on shutdown.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(2);
/// How often the mirror status file is rewritten.
const MIRROR_STATUS_EVERY: Duration = Duration::from_secs(1);
/// How long the mirror gets to finish its transaction on shutdown (with the connections'
/// grace, the edge exits within 5 s of the signal; an unfinished transaction is aborted by
/// Kafka and mirrored again at the next start, from the checkpoint).
const MIRROR_STOP_GRACE: Duration = Duration::from_secs(2);
/// How often the groups status file is rewritten.
const GROUPS_STATUS_EVERY: Duration = Duration::from_secs(1);

/// A started edge node.
pub(crate) struct Node {
    data_dir: PathBuf,
    storage: Storage,
    fsync_timer: Option<JoinHandle<()>>,
    broker: Arc<Broker>,
    groups: GroupsPart,
    mirror: MirrorPart,
    housekeeping: Vec<JoinHandle<()>>,
    admin: AdminPart,
    serving: Serving,
    /// Pings systemd's watchdog while the log is healthy (with `WatchdogSec=`).
    watchdog: Option<JoinHandle<()>>,
}

impl Node {
    /// Starts every part of the node (see the module documentation for the order), handing
    /// the opened log to `observe` first: the fuzz harness decodes everything stored after
    /// each input (reads run beside the appender).
    pub(crate) async fn start(
        loaded: LoadedConfig,
        observe: impl FnOnce(Arc<Log>),
    ) -> Result<Node, ServeError> {
        // Installed first: SIGHUP's default action would end the process.
        let hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
            .expect("installing the SIGHUP handler");
        let LoadedConfig {
            config,
            plan,
            auth,
            tls,
            admin,
            mirror,
        } = loaded;
        let (storage, mut ingest) = start_log(&config, &plan, observe).await?;
        let stored_wills = std::mem::take(&mut ingest.wills.wills);
        let fsync_timer = start_fsync_timer(&config, &storage.appender);
        let listeners = bind_listeners(&config, tls).await?;
        let (broker, shutdown) = start_auth(&config, auth, &listeners, &storage, ingest);
        let mut groups = start_groups(&config, &broker)?;
        let mirror = start_mirror(&config, mirror, &storage.log, &groups.groups)?;
        groups.write_status_every(&config, mirror.mirror.clone());
        announce(&config, &storage.log, &listeners);
        let housekeeping = start_housekeeping(&config, &broker);
        let admin = start_admin(&config, admin, &broker, &groups.groups, &mirror).await?;
        mqtt::connection::restore_wills(&broker, stored_wills).await;
        let serving = start_serving(hangup, &broker, listeners, shutdown);
        admin.state.ready.store(true, Ordering::Release);
        crate::service::ready();
        let watchdog =
            crate::service::start_watchdog(storage.appender.clone(), storage.log.clone());
        Ok(Node {
            data_dir: config.storage.data_dir.clone(),
            storage,
            fsync_timer,
            broker,
            groups,
            mirror,
            housekeeping,
            admin,
            serving,
            watchdog,
        })
    }

    /// Waits until a write to the log fails; returns why.
    pub(crate) async fn failed(&mut self) -> Option<CommitError> {
        self.storage
            .fatal
            .wait_for(|f| f.is_some())
            .await
            .ok()
            .and_then(|why| why.clone())
    }

    /// Stops every part (see the module documentation for the order) and closes the log.
    /// `fatal`: the log failure that ended serving, if one did.
    pub(crate) async fn shutdown(self, fatal: Option<CommitError>) -> Result<(), ServeError> {
        let Node {
            data_dir,
            storage,
            fsync_timer,
            broker,
            groups,
            mirror,
            housekeeping,
            admin,
            serving,
            watchdog,
        } = self;
        crate::service::stopping();
        if let Some(w) = watchdog {
            w.abort();
        }
        serving.stop().await;
        groups.stop(&data_dir).await;
        admin.stop().await;
        for task in housekeeping {
            task.abort();
        }
        mirror.stop(&data_dir).await;
        if let Some(t) = fsync_timer {
            t.abort();
        }
        let result = storage.stop(broker).await;
        if let Some(why) = fatal {
            return Err(ServeError::Fatal(why));
        }
        result
    }
}

/// The log and its single writer.
struct Storage {
    log: Arc<Log>,
    appender: Appender,
    appender_thread: std::thread::JoinHandle<Result<(), CommitError>>,
    /// Set when a write to the log failed.
    fatal: watch::Receiver<Option<CommitError>>,
}

/// What the broker is built from, besides the log.
struct Ingest {
    hub: Hub,
    sessions: SessionStore,
    router: Router,
    /// The wills stored when the previous run stopped.
    wills: will::Loaded,
}

/// Step 1: opens the log, loads the sessions and retained messages it holds (discarding
/// what expired while the edge was down), starts the appender and builds the router.
async fn start_log(
    config: &Config,
    plan: &RoutePlan,
    observe: impl FnOnce(Arc<Log>),
) -> Result<(Storage, Ingest), ServeError> {
    let budget = config.storage.disk_budget.map(|b| Budget {
        bytes: b.0,
        policy: config.storage.disk_full_policy,
    });
    let log = Arc::new(Log::open(
        &config.storage.data_dir,
        Some(&plan.topics),
        budget,
    )?);
    log.set_max_clock_jump(config.storage.max_clock_jump.0);
    log.set_min_free(config.storage.min_free.floor());
    if let Some(space) = log.disk_space().filter(|_| log.low_disk()) {
        tracing::warn!(
            available = space.available,
            "starting below storage.min_free: the edge serves readers and refuses publishes until space is back"
        );
    }
    observe(log.clone());
    let hub = Hub::new(OutboxLimits {
        messages: config.mqtt.max_queued_messages,
        bytes: config.mqtt.max_queued_bytes.0 as usize,
        offline_messages: config.mqtt.max_offline_messages,
    });
    let groups: Vec<(&str, &str)> = config
        .groups
        .iter()
        .map(|g| (g.name.as_str(), g.filter.as_str()))
        .collect();
    hub.declare_durable_groups(&groups);
    let (sessions, mut purge) = SessionStore::load(&log, &hub, now_ms())?;
    // The previous run was up at least until its last commit (read before this run's first).
    let now = now_ms();
    let down_at = log.last_commit_ms().filter(|&at| at <= now).unwrap_or(now);
    let mut wills = will::load(&log, down_at, config.mqtt.max_will_delay.0)?;
    purge.append(&mut wills.purge);
    let retained = load_retained(&log, &hub, now_ms())?;
    purge.extend(retained);

    let (fatal_tx, fatal) = watch::channel::<Option<CommitError>>(None);
    let (appender_tx, appender_thread) = appender::spawn(
        log.clone(),
        config.storage.fsync,
        config.storage.compression,
        config.storage.max_batch_records,
        APPENDER_QUEUE,
        // Queue entries (waiting or released) end with their seq; new ones come after.
        hub.boot_seq.load(Ordering::Relaxed) + 1,
        move |why| {
            let _ = fatal_tx.send(Some(why));
        },
    );
    if !purge.is_empty() {
        tracing::info!(
            entries = purge.len(),
            "discarding session state that expired while the edge was down"
        );
        if let Err(e) = appender_tx.commit_state(purge).await {
            tracing::warn!(error = %e, "discarding expired session state failed");
        }
    }
    let router = Router::new(plan, |name| {
        let t = log.topic(name).expect("configured topics exist in the log");
        (t.id, t.partitions.len() as u32)
    });
    Ok((
        Storage {
            log,
            appender: appender_tx,
            appender_thread,
            fatal,
        },
        Ingest {
            hub,
            sessions,
            router,
            wills,
        },
    ))
}

impl Storage {
    /// Closes the log after the appender wrote what it was sent; `broker`, the last other
    /// holder of the appender's queue, is dropped first.
    async fn stop(self, broker: Arc<Broker>) -> Result<(), ServeError> {
        self.appender.shutdown().await;
        drop(self.appender);
        drop(broker);
        let thread = self.appender_thread;
        let result = tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("joining the appender");
        match result {
            Ok(Ok(())) => {
                tracing::info!("log closed cleanly");
                Ok(())
            }
            Ok(Err(why)) => Err(ServeError::Fatal(why)),
            Err(_) => Err(ServeError::Fatal(CommitError::Storage(
                "the appender thread panicked".into(),
            ))),
        }
    }
}

/// Loads the retained messages into the hub; returns the deletion of those that expired
/// while the edge was down.
fn load_retained(log: &Log, hub: &Hub, now_ms: u64) -> Result<Vec<StateOp>, LogError> {
    let mut purge = Vec::new();
    for (topic, v) in delivery::stored_retained(log)? {
        match Message::decode(&v) {
            Ok(m) if m.expiry_left(now_ms).is_some() => {
                hub.set_retained(bytes::Bytes::from(topic), Some(Arc::new(m)))
            }
            Ok(_) => purge.push(delivery::clear_retained_op(&topic)),
            // Left out, not deleted: `edge check` lists it, `--repair` moves it aside.
            Err(_) => delivery::quarantine_retained(log, &topic),
        }
    }
    if hub.retained_count() > 0 {
        tracing::info!(count = hub.retained_count(), "retained messages loaded");
    }
    Ok(purge)
}

/// Whether a periodic task runs at once or only after its first period.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FirstRun {
    /// At once, then every period.
    Now,
    /// After one period, then every period.
    AfterPeriod,
}

/// Spawns a task that runs `tick` every `period` until `tick` breaks or the task is aborted.
/// Missed ticks are made up in a burst, as `tokio::time::interval` does by default.
fn every<F, Fut>(period: Duration, first: FirstRun, mut tick: F) -> JoinHandle<()>
where
    F: FnMut() -> Fut + Send + 'static,
    Fut: Future<Output = ControlFlow<()>> + Send + 'static,
{
    tokio::spawn(async move {
        let mut interval = tokio::time::interval(period);
        if first == FirstRun::AfterPeriod {
            interval.tick().await;
        }
        loop {
            interval.tick().await;
            if tick().await.is_break() {
                break;
            }
        }
    })
}

/// One rewrite of a status file in `dir`, off the async threads; a failure is logged.
async fn write_status_file(
    what: &'static str,
    dir: std::path::PathBuf,
    write: impl FnOnce(&std::path::Path) -> std::io::Result<()> + Send + 'static,
) -> ControlFlow<()> {
    if let Ok(Err(e)) = tokio::task::spawn_blocking(move || write(&dir)).await {
        tracing::warn!("writing the {what} status: {e}");
    }
    ControlFlow::Continue(())
}

/// Step 2: with `fsync = "interval:<ms>"`, an fsync every interval. With `"never"` nothing
/// waits for an fsync, but the mirror and consumer groups only read what an fsync made
/// durable (see `PartitionState::durable_end`): while one of them reads, a background fsync
/// every second lets them follow.
fn start_fsync_timer(config: &Config, appender: &Appender) -> Option<JoinHandle<()>> {
    let readers = config.cloud.is_some() || !config.groups.is_empty();
    let period = match config.storage.fsync {
        FsyncMode::Interval(period) => period,
        FsyncMode::Never if readers => Duration::from_secs(1),
        _ => return None,
    };
    let appender = appender.clone();
    Some(every(period, FirstRun::Now, move || {
        let appender = appender.clone();
        async move {
            match appender.persist().await {
                Ok(()) => ControlFlow::Continue(()),
                Err(_) => ControlFlow::Break(()),
            }
        }
    }))
}

/// The MQTT sockets, bound and not yet served, and the addresses they got.
struct Listeners {
    bound: Vec<mqtt::BoundListener>,
    addresses: Vec<std::net::SocketAddr>,
}

/// Step 3: binds every listener of the config (`[[listeners]]` and the `mqtt.listen` and
/// `[tls]` shorthands), each with its TLS settings.
async fn bind_listeners(
    config: &Config,
    mut tls: std::collections::BTreeMap<String, TlsServer>,
) -> Result<Listeners, ServeError> {
    let mut bound = Vec::new();
    let mut addresses = Vec::new();
    for listener in config.listeners() {
        let addr = listener.bind;
        let socket = TcpListener::bind(addr)
            .await
            .map_err(|source| ServeError::Bind { addr, source })?;
        addresses.push(socket.local_addr().unwrap_or(addr));
        let server = tls.remove(&listener.key).map(Arc::new);
        // `startup` built a server for every TLS listener; without one it would serve
        // plain text on a port its users expect TLS on.
        if listener.protocol.tls() && server.is_none() {
            return Err(ServeError::Config(ConfigError::Invalid {
                origin: "<listeners>".into(),
                line: 0,
                key: listener.key,
                message: "the TLS settings of this listener were not loaded".into(),
            }));
        }
        bound.push(mqtt::BoundListener {
            socket,
            protocol: listener.protocol,
            path: Arc::from(listener.path.as_str()),
            tls: server,
        });
    }
    Ok(Listeners { bound, addresses })
}

impl Listeners {
    /// The listeners as `protocol address` pairs, for the log.
    fn describe(&self) -> String {
        self.bound
            .iter()
            .zip(&self.addresses)
            .map(|(l, a)| {
                if l.protocol.websocket() {
                    format!("{} {a}{}", l.protocol, l.path)
                } else {
                    format!("{} {a}", l.protocol)
                }
            })
            .collect::<Vec<_>>()
            .join(", ")
    }
}

/// Step 4: authentication over the loaded files (warning about unsafe settings and
/// anonymous access), and the broker that every connection shares. Returns the broker and
/// the sender that tells it to shut down.
fn start_auth(
    config: &Config,
    files: AuthFiles,
    listeners: &Listeners,
    storage: &Storage,
    ingest: Ingest,
) -> (Arc<Broker>, watch::Sender<bool>) {
    let AuthFiles {
        passwords,
        acl,
        warnings,
    } = files;
    let auth = Auth::with_files(&config.auth, config.mutual_tls(), passwords, acl);
    for warning in warnings {
        tracing::warn!("{warning}");
    }
    if auth.anonymous_allowed() {
        tracing::warn!(
            "anonymous access is allowed: any client that reaches {} can connect{}",
            listeners.describe(),
            if auth.has_acl() {
                " and do what the ACL file allows everyone"
            } else {
                " and publish"
            }
        );
    }
    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let broker = Arc::new(Broker {
        config: config.mqtt.clone(),
        router: ingest.router,
        log: storage.log.clone(),
        appender: storage.appender.clone(),
        sessions: ingest.sessions,
        hub: ingest.hub,
        append_budget: Arc::new(tokio::sync::Semaphore::new(
            mqtt::APPEND_BUDGET_BYTES as usize,
        )),
        connections: AtomicUsize::new(0),
        limits: Default::default(),
        wills: will::PendingWills::new(ingest.wills.max_id),
        shutdown: shutdown_rx,
        auth,
    });
    (broker, shutdown_tx)
}

/// The consumer groups and the writer of their status file.
struct GroupsPart {
    groups: Arc<Groups>,
    status_writer: Option<JoinHandle<()>>,
}

/// Step 5: starts the consumer groups.
fn start_groups(config: &Config, broker: &Arc<Broker>) -> Result<GroupsPart, ServeError> {
    Ok(GroupsPart {
        groups: Arc::new(Groups::start(&config.groups, broker)?),
        status_writer: None,
    })
}

impl GroupsPart {
    /// Rewrites the groups' status file every second, with what the mirror (once started)
    /// replicated of their positions.
    fn write_status_every(&mut self, config: &Config, mirror: Option<Arc<cloud_sync::Mirror>>) {
        if config.groups.is_empty() {
            return;
        }
        let groups = self.groups.clone();
        let dir = config.storage.data_dir.clone();
        self.status_writer = Some(every(GROUPS_STATUS_EVERY, FirstRun::Now, move || {
            let mut status = groups.status();
            if let Some(m) = &mirror {
                crate::groups::add_replication(&mut status, &m.status());
            }
            write_status_file("groups", dir.clone(), move |dir| {
                crate::groups::write_status(dir, &status)
            })
        }));
    }

    /// Stops the groups once their members are gone: they store their last positions
    /// before the log closes, and the status file gets them.
    async fn stop(self, data_dir: &std::path::Path) {
        if let Some(t) = self.status_writer {
            t.abort();
            let _ = t.await;
        }
        let groups = self.groups;
        let dir = data_dir.to_path_buf();
        let _ = tokio::task::spawn_blocking(move || {
            groups.stop();
            let status = groups.status();
            if !status.is_empty() {
                if let Err(e) = crate::groups::write_status(&dir, &status) {
                    tracing::warn!("writing the groups status: {e}");
                }
            }
        })
        .await;
    }
}

/// The mirror, when `[cloud]` is set, and the writer of its status file.
struct MirrorPart {
    mirror: Option<Arc<cloud_sync::Mirror>>,
    status_writer: Option<JoinHandle<()>>,
}

/// Step 6: starts the mirror over the log and the groups' positions, resuming from the
/// status it last wrote, and rewrites its status file every second.
fn start_mirror(
    config: &Config,
    mirror_config: Option<cloud_sync::MirrorConfig>,
    log: &Arc<Log>,
    groups: &Arc<Groups>,
) -> Result<MirrorPart, ServeError> {
    let Some(mirror_config) = mirror_config else {
        tracing::info!("no uplink configured: records stay in the local log");
        return Ok(MirrorPart {
            mirror: None,
            status_writer: None,
        });
    };
    tracing::info!(
        bootstrap = %mirror_config.bootstrap,
        site = %mirror_config.site,
        "mirroring the log to Kafka"
    );
    let source = Arc::new(crate::uplink::LogSource::with_groups(
        log.clone(),
        Some(groups.clone()),
    ));
    let previous = crate::uplink::read_status(&config.storage.data_dir).ok();
    // What can still fail here is starting the mirror's threads.
    let mirror = cloud_sync::Mirror::start_after(mirror_config, source, previous).map_err(|e| {
        ConfigError::Invalid {
            origin: "<config>".into(),
            line: 0,
            key: "cloud.mirror".into(),
            message: e.to_string(),
        }
    })?;
    let mirror = Arc::new(mirror);
    let status_writer = {
        let mirror = mirror.clone();
        let dir = config.storage.data_dir.clone();
        every(MIRROR_STATUS_EVERY, FirstRun::Now, move || {
            let status = mirror.status();
            write_status_file("mirror", dir.clone(), move |dir| {
                crate::uplink::write_status(dir, &status)
            })
        })
    };
    Ok(MirrorPart {
        mirror: Some(mirror),
        status_writer: Some(status_writer),
    })
}

impl MirrorPart {
    /// Stops the mirror (its last transaction, and its last round of group replication) and
    /// writes its final status.
    async fn stop(self, data_dir: &std::path::Path) {
        if let Some(t) = self.status_writer {
            t.abort();
            // Awaited, so that its handle on the mirror is gone before the mirror is stopped.
            let _ = t.await;
        }
        if let Some(mirror) = self.mirror {
            let dir = data_dir.to_path_buf();
            tokio::task::spawn_blocking(move || {
                let status = Arc::try_unwrap(mirror)
                    .expect("the status writer, the mirror's only other holder, has ended")
                    .stop(MIRROR_STOP_GRACE);
                if let Err(e) = crate::uplink::write_status(&dir, &status) {
                    tracing::warn!("writing the mirror status: {e}");
                }
            })
            .await
            .expect("stopping the mirror");
        }
    }
}

/// Logs the topics and the listeners, and that the edge is serving.
fn announce(config: &Config, log: &Log, listeners: &Listeners) {
    for t in log.topics() {
        tracing::info!(
            topic = %t.name,
            partitions = t.partitions.len(),
            end_offsets = ?t.partitions.iter().map(|p| p.end()).collect::<Vec<_>>(),
            "topic"
        );
    }
    for (l, addr) in listeners.bound.iter().zip(&listeners.addresses) {
        match (&l.tls, l.protocol.websocket()) {
            (None, false) => tracing::info!(mqtt = %addr, "MQTT listener (plain TCP) is bound"),
            (None, true) => tracing::info!(
                mqtt_ws = %addr,
                path = %l.path,
                "MQTT listener (WebSocket) is bound"
            ),
            (Some(server), websocket) => tracing::info!(
                mqtt_tls = %addr,
                path = websocket.then(|| tracing::field::display(&l.path)),
                client_certificates = if server.mutual() { "required (mutual TLS)" } else { "not asked for" },
                "{}",
                if websocket { "MQTT listener (WebSocket over TLS) is bound" } else { "MQTT listener (TLS) is bound" }
            ),
        }
    }
    tracing::info!(
        listeners = %listeners.describe(),
        data_dir = %config.storage.data_dir.display(),
        fsync = %config.storage.fsync,
        "edge is serving"
    );
}

/// Step 7: every `storage.retention_check_interval`, ends the sessions that expired and
/// applies retention; and, unless `mqtt.sys_interval` is 0, publishes the `$SYS` topics.
fn start_housekeeping(config: &Config, broker: &Arc<Broker>) -> Vec<JoinHandle<()>> {
    let mut tasks = Vec::new();
    let b = broker.clone();
    tasks.push(every(
        config.storage.retention_check_interval.0,
        FirstRun::AfterPeriod,
        move || {
            let broker = b.clone();
            async move {
                let (expired, ended) = broker.sessions.expire(now_ms());
                for sub in &ended {
                    broker.hub.remove_session(sub);
                }
                if !expired.is_empty() {
                    let _ = broker
                        .appender
                        .append(AppendRequest {
                            state: expired,
                            ..Default::default()
                        })
                        .await;
                }
                match broker.appender.apply_retention().await {
                    Ok(()) => ControlFlow::Continue(()),
                    Err(_) => ControlFlow::Break(()),
                }
            }
        },
    ));
    if !config.mqtt.sys_interval.0.is_zero() {
        tasks.push(tokio::spawn(crate::sys::publish_every(
            broker.clone(),
            config.mqtt.sys_interval.0,
        )));
    }
    tasks
}

/// The admin endpoint and the state it serves.
struct AdminPart {
    state: Arc<AdminState>,
    server: Option<JoinHandle<()>>,
}

/// Step 8: the admin HTTP endpoint. Its default address is given up with a warning when
/// taken; a configured one that cannot be bound stops the edge.
async fn start_admin(
    config: &Config,
    access: Option<AdminAccess>,
    broker: &Arc<Broker>,
    groups: &Arc<Groups>,
    mirror: &MirrorPart,
) -> Result<AdminPart, ServeError> {
    let access = match access {
        Some(access) => access,
        // With the endpoint off, start-up read nothing for it; the token and hosts are
        // still checked, as they always were, though nothing serves them.
        None => {
            AdminAccess::read(&config.admin).map_err(|(key, message)| ConfigError::Invalid {
                origin: "<config>".into(),
                line: 0,
                key: format!("admin.{key}"),
                message,
            })?
        }
    };
    let state = Arc::new(AdminState {
        broker: broker.clone(),
        mirror: mirror.mirror.clone(),
        groups: groups.clone(),
        ready: std::sync::atomic::AtomicBool::new(false),
        token: access.token,
        allowed_hosts: access.allowed_hosts,
    });
    let server = match config.admin.address() {
        None => None,
        Some((addr, explicit)) => match TcpListener::bind(addr).await {
            Ok(l) => {
                tracing::info!(admin = %l.local_addr().unwrap_or(addr), "admin HTTP endpoint is serving");
                Some(tokio::spawn(crate::admin::serve(l, state.clone())))
            }
            Err(source) if explicit => {
                return Err(ServeError::Bind { addr, source });
            }
            Err(e) => {
                tracing::warn!(
                    "the admin HTTP endpoint is off: cannot listen on the default {addr} ({e}); set admin.listen to choose another address"
                );
                None
            }
        },
    };
    Ok(AdminPart { state, server })
}

impl AdminPart {
    async fn stop(self) {
        if let Some(t) = self.server {
            t.abort();
            let _ = t.await;
        }
    }
}

/// The MQTT connections being served, and the SIGHUP reloads.
struct Serving {
    shutdown: watch::Sender<bool>,
    reloads: JoinHandle<()>,
    server: JoinHandle<()>,
}

/// Step 9: serves MQTT on the bound listeners; SIGHUP reloads the auth and TLS files.
fn start_serving(
    mut hangup: tokio::signal::unix::Signal,
    broker: &Arc<Broker>,
    listeners: Listeners,
    shutdown: watch::Sender<bool>,
) -> Serving {
    let tls_servers: Vec<Arc<TlsServer>> = listeners
        .bound
        .iter()
        .filter_map(|l| l.tls.clone())
        .collect();
    let reloads = {
        let broker = broker.clone();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the password, ACL and TLS files");
                reload(&broker, &tls_servers).await;
            }
        })
    };
    let server = tokio::spawn(mqtt::serve(broker.clone(), listeners.bound, SHUTDOWN_GRACE));
    Serving {
        shutdown,
        reloads,
        server,
    }
}

impl Serving {
    /// Tells the connections to end and waits for them (up to their grace).
    async fn stop(self) {
        let _ = self.shutdown.send(true);
        self.reloads.abort();
        let _ = self.server.await;
    }
}

/// What SIGHUP does: reads the password and ACL files again (each connection applies the new
/// rules from its next packet), and the TLS certificate, key and client CA files (new
/// handshakes use them; open connections stay). A file that fails to load is logged and
/// what it held before stays in force.
pub async fn reload(broker: &Arc<Broker>, tls_servers: &[Arc<TlsServer>]) {
    let b = broker.clone();
    match tokio::task::spawn_blocking(move || b.auth.reload()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("reloading auth files on SIGHUP: {e}"),
        Err(e) => tracing::error!("reloading auth files on SIGHUP: {e}"),
    }
    for tls in tls_servers {
        // A few small files: read in place rather than on a blocking thread.
        match tls.reload() {
            Ok(()) => tracing::info!(
                listener = tls.listener(),
                client_ca = tls.mutual(),
                "SIGHUP: TLS certificate and key reloaded"
            ),
            Err(e) => tracing::error!(
                "SIGHUP: TLS reload failed, the previous certificate stays in use: {}.{e}",
                tls.listener()
            ),
        }
    }
}
