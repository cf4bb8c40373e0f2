//! Starting and stopping a serving edge: log, appender, router, sessions, listeners.

use std::sync::atomic::AtomicUsize;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio::sync::watch;

use crate::config::{Config, FsyncMode, Source};
use crate::groups::Groups;
use crate::log::appender::{self, now_ms, AppendRequest, AppenderMsg, StateOp};
use crate::log::{Budget, Log, LogError};
use crate::mqtt::delivery::{Hub, Message, OutboxLimits, TAG_RETAINED};
use crate::mqtt::session::SessionStore;
use crate::mqtt::tls::TlsServer;
use crate::mqtt::{self, Broker};
use crate::route::Router;
use crate::startup::{AdminAccess, LoadedConfig};

/// Why the edge could not start or had to stop.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum ServeError {
    /// The configuration is unusable.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
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
    Fatal(String),
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
/// Exit status after a second SIGINT/SIGTERM.
pub const EXIT_SECOND_SIGNAL: i32 = 130;

/// Serves until SIGINT or SIGTERM (or a fatal log error); SIGHUP reloads what can be
/// reloaded (see [`reload`]). `config` is checked and its files read first; errors name no
/// line (see [`serve`] for a config loaded from its file).
pub async fn run(config: Config) -> Result<(), ServeError> {
    run_observed(config, |_| {}).await
}

/// [`run`], handing the opened log to `observe` first: the fuzz harness decodes everything
/// stored after each input (reads run beside the appender).
pub async fn run_observed(
    config: Config,
    observe: impl FnOnce(Arc<Log>),
) -> Result<(), ServeError> {
    let loaded = crate::startup::prepare(config, &Source::embedded())?;
    serve_observed(loaded, observe).await
}

/// Serves a configuration loaded by [`crate::startup::load`] until SIGINT or SIGTERM (or a
/// fatal log error).
pub async fn serve(loaded: LoadedConfig) -> Result<(), ServeError> {
    serve_observed(loaded, |_| {}).await
}

async fn serve_observed(
    loaded: LoadedConfig,
    observe: impl FnOnce(Arc<Log>),
) -> Result<(), ServeError> {
    // Installed first: SIGHUP's default action would end the process.
    let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup())
        .expect("installing the SIGHUP handler");
    let LoadedConfig {
        config,
        plan,
        auth: auth_files,
        tls,
        admin: admin_access,
        mirror: mirror_config,
    } = loaded;
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
    let retained = load_retained(&log, &hub, now_ms())?;
    purge.extend(retained);

    let (fatal_tx, mut fatal_rx) = watch::channel::<Option<String>>(None);
    let (appender_tx, appender_thread) = appender::spawn(
        log.clone(),
        config.storage.fsync,
        config.storage.max_batch_records,
        APPENDER_QUEUE,
        // Queue entries (waiting or released) end with their seq; new ones come after.
        hub.boot_seq.load(std::sync::atomic::Ordering::Relaxed) + 1,
        move |why| {
            let _ = fatal_tx.send(Some(why));
        },
    );
    if !purge.is_empty() {
        tracing::info!(
            entries = purge.len(),
            "discarding session state that expired while the edge was down"
        );
        let _ = appender_tx
            .send(AppenderMsg::Append(AppendRequest {
                state: purge,
                ..Default::default()
            }))
            .await;
    }

    let router = Router::new(&plan, |name| {
        let t = log.topic(name).expect("configured topics exist in the log");
        (t.id, t.partitions.len() as u32)
    });
    let listen = config.mqtt.listen;
    let listener = TcpListener::bind(listen)
        .await
        .map_err(|source| ServeError::Bind {
            addr: listen,
            source,
        })?;
    let bound = listener.local_addr().unwrap_or(listen);
    let tls = match (tls, &config.tls) {
        (Some(server), Some(tls_config)) => {
            let addr = tls_config.listen;
            let listener = TcpListener::bind(addr)
                .await
                .map_err(|source| ServeError::Bind { addr, source })?;
            let bound = listener.local_addr().unwrap_or(addr);
            Some((listener, Arc::new(server), bound))
        }
        _ => None,
    };

    let auth = crate::auth::Auth::with_files(
        &config.auth,
        config.mutual_tls(),
        auth_files.passwords,
        auth_files.acl,
    );
    for warning in auth_files.warnings {
        tracing::warn!("{warning}");
    }
    if auth.anonymous_allowed() {
        tracing::warn!(
            "anonymous access is allowed: any client that reaches {bound} can connect{}",
            if auth.has_acl() {
                " and do what the ACL file allows everyone"
            } else {
                " and publish"
            }
        );
    }
    let groups_cell: Arc<std::sync::OnceLock<Arc<Groups>>> = Arc::default();
    let mirror = match mirror_config {
        None => {
            tracing::info!("no uplink configured: records stay in the local log");
            None
        }
        Some(mirror_config) => {
            // Start-up checked the section already; what can still fail here is starting
            // the mirror's thread.
            let refused = |key: &str, message: String| crate::config::ConfigError::Invalid {
                origin: "<config>".into(),
                line: 0,
                key: format!("cloud.{key}"),
                message,
            };
            tracing::info!(
                bootstrap = %mirror_config.bootstrap,
                site = %mirror_config.site,
                "mirroring the log to Kafka"
            );
            let source = Arc::new(crate::uplink::LogSource::with_groups(
                log.clone(),
                groups_cell.clone(),
            ));
            let previous = crate::uplink::read_status(&config.storage.data_dir).ok();
            let mirror = cloud_sync::Mirror::start_after(mirror_config, source, previous)
                .map_err(|e| refused("mirror", e.to_string()))?;
            Some(Arc::new(mirror))
        }
    };
    let status_writer = mirror.as_ref().map(|m| {
        let m = m.clone();
        let dir = config.storage.data_dir.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(MIRROR_STATUS_EVERY);
            loop {
                tick.tick().await;
                let status = m.status();
                let dir = dir.clone();
                let written =
                    tokio::task::spawn_blocking(move || crate::uplink::write_status(&dir, &status))
                        .await;
                if let Ok(Err(e)) = written {
                    tracing::warn!("writing the mirror status: {e}");
                }
            }
        })
    });
    for t in log.topics() {
        tracing::info!(
            topic = %t.name,
            partitions = t.partitions.len(),
            end_offsets = ?t.partitions.iter().map(|p| p.end.load(std::sync::atomic::Ordering::Relaxed)).collect::<Vec<_>>(),
            "topic"
        );
    }
    tracing::info!(mqtt = %bound, "MQTT listener (plain TCP) is bound");
    if let Some((_, server, tls_bound)) = &tls {
        tracing::info!(
            mqtt_tls = %tls_bound,
            client_certificates = if server.mutual() { "required (mutual TLS)" } else { "not asked for" },
            "MQTT listener (TLS) is bound"
        );
    }
    tracing::info!(
        mqtt = %bound,
        mqtt_tls = tls.as_ref().map(|(_, _, b)| tracing::field::display(b)),
        data_dir = %config.storage.data_dir.display(),
        fsync = %config.storage.fsync,
        "edge is serving"
    );

    let (shutdown_tx, shutdown_rx) = watch::channel(false);
    let broker = Arc::new(Broker {
        config: config.mqtt.clone(),
        router,
        log: log.clone(),
        appender: appender_tx.clone(),
        sessions,
        hub,
        append_budget: Arc::new(tokio::sync::Semaphore::new(
            mqtt::APPEND_BUDGET_BYTES as usize,
        )),
        connections: AtomicUsize::new(0),
        limits: Default::default(),
        wills: Default::default(),
        shutdown: shutdown_rx,
        auth,
    });

    let groups = Arc::new(Groups::start(&config.groups, &broker)?);
    let _ = groups_cell.set(groups.clone());
    let groups_status = (!config.groups.is_empty()).then(|| {
        let groups = groups.clone();
        let mirror = mirror.clone();
        let dir = config.storage.data_dir.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(GROUPS_STATUS_EVERY);
            loop {
                tick.tick().await;
                let mut status = groups.status();
                if let Some(m) = &mirror {
                    crate::groups::add_replication(&mut status, &m.status());
                }
                let dir = dir.clone();
                let written =
                    tokio::task::spawn_blocking(move || crate::groups::write_status(&dir, &status))
                        .await;
                if let Ok(Err(e)) = written {
                    tracing::warn!("writing the groups status: {e}");
                }
            }
        })
    });

    let housekeeping = {
        let broker = broker.clone();
        let every = config.storage.retention_check_interval.0;
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(every);
            tick.tick().await;
            loop {
                tick.tick().await;
                let (expired, ended) = broker.sessions.expire(now_ms());
                for sub in &ended {
                    broker.hub.remove_session(sub);
                }
                if !expired.is_empty() {
                    let _ = broker
                        .appender
                        .send(AppenderMsg::Append(AppendRequest {
                            state: expired,
                            ..Default::default()
                        }))
                        .await;
                }
                if broker.appender.send(AppenderMsg::Retention).await.is_err() {
                    break;
                }
            }
        })
    };
    // With "never" nothing waits for an fsync, but the mirror and consumer groups only read
    // what an fsync made durable (see `PartitionState::durable_end`): while one of them
    // reads, a background fsync every second lets them follow.
    let readers = config.cloud.is_some() || !config.groups.is_empty();
    let fsync_every = match config.storage.fsync {
        FsyncMode::Interval(every) => Some(every),
        FsyncMode::Never if readers => Some(Duration::from_secs(1)),
        _ => None,
    };
    let fsync_timer = match fsync_every {
        Some(every) => {
            let tx = appender_tx.clone();
            Some(tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                loop {
                    tick.tick().await;
                    if tx.send(AppenderMsg::Persist).await.is_err() {
                        break;
                    }
                }
            }))
        }
        _ => None,
    };

    let sys = (!config.mqtt.sys_interval.0.is_zero()).then(|| {
        tokio::spawn(crate::sys::publish_every(
            broker.clone(),
            config.mqtt.sys_interval.0,
        ))
    });
    let admin_access = match admin_access {
        Some(access) => access,
        // With the endpoint off, start-up read nothing for it; the token and hosts are
        // still checked, as they always were, though nothing serves them.
        None => AdminAccess::read(&config.admin).map_err(|(key, message)| {
            crate::config::ConfigError::Invalid {
                origin: "<config>".into(),
                line: 0,
                key: format!("admin.{key}"),
                message,
            }
        })?,
    };
    let admin_state = Arc::new(crate::admin::AdminState {
        broker: broker.clone(),
        mirror: mirror.clone(),
        groups: groups.clone(),
        ready: std::sync::atomic::AtomicBool::new(false),
        token: admin_access.token,
        allowed_hosts: admin_access.allowed_hosts,
    });
    let admin = match config.admin.address() {
        None => None,
        Some((addr, explicit)) => match TcpListener::bind(addr).await {
            Ok(l) => {
                tracing::info!(admin = %l.local_addr().unwrap_or(addr), "admin HTTP endpoint is serving");
                Some(tokio::spawn(crate::admin::serve(l, admin_state.clone())))
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
    let tls_server = tls.as_ref().map(|(_, server, _)| server.clone());
    let reloads = {
        let broker = broker.clone();
        tokio::spawn(async move {
            while hangup.recv().await.is_some() {
                tracing::info!("SIGHUP: reloading the password, ACL and TLS files");
                reload(&broker, tls_server.as_deref()).await;
            }
        })
    };
    let server = tokio::spawn(mqtt::serve(
        broker.clone(),
        listener,
        tls.map(|(listener, server, _)| (listener, server)),
        SHUTDOWN_GRACE,
    ));
    admin_state
        .ready
        .store(true, std::sync::atomic::Ordering::Release);
    let fatal = tokio::select! {
        _ = shutdown_signal() => {
            tracing::info!("shutting down: finishing in-flight appends (a second signal exits at once)");
            // Everything acknowledged is already in the log (fsynced, or written to the OS
            // per the fsync mode), so leaving now loses nothing acknowledged.
            tokio::spawn(async {
                shutdown_signal().await;
                tracing::warn!("second signal: exiting now");
                std::process::exit(EXIT_SECOND_SIGNAL);
            });
            None
        }
        why = fatal_rx.wait_for(|f| f.is_some()) => why.ok().and_then(|w| w.clone()),
    };
    let _ = shutdown_tx.send(true);
    reloads.abort();
    let _ = server.await;
    if let Some(t) = groups_status {
        t.abort();
        let _ = t.await;
    }
    {
        // Members are gone; the groups store their last positions before the log closes.
        let groups = groups.clone();
        let dir = config.storage.data_dir.clone();
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
    if let Some(t) = admin {
        t.abort();
        let _ = t.await;
    }
    drop(admin_state);
    housekeeping.abort();
    if let Some(t) = sys {
        t.abort();
    }
    if let Some(t) = status_writer {
        t.abort();
        // Awaited, so that its handle on the mirror is gone before the mirror is stopped.
        let _ = t.await;
    }
    if let Some(mirror) = mirror {
        let dir = config.storage.data_dir.clone();
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
    if let Some(t) = fsync_timer {
        t.abort();
    }
    let _ = appender_tx.send(AppenderMsg::Shutdown).await;
    drop(appender_tx);
    drop(broker);
    let result = tokio::task::spawn_blocking(move || appender_thread.join())
        .await
        .expect("joining the appender");
    if let Some(why) = fatal {
        return Err(ServeError::Fatal(why));
    }
    match result {
        Ok(Ok(())) => {
            tracing::info!("log closed cleanly");
            Ok(())
        }
        Ok(Err(why)) => Err(ServeError::Fatal(why)),
        Err(_) => Err(ServeError::Fatal("the appender thread panicked".into())),
    }
}

/// Loads the retained messages into the hub; returns the deletion of those that expired
/// while the edge was down.
fn load_retained(log: &Log, hub: &Hub, now_ms: u64) -> Result<Vec<StateOp>, crate::log::LogError> {
    let mut purge = Vec::new();
    for (k, v) in log.meta_scan(&[TAG_RETAINED])? {
        match Message::decode(&v) {
            Ok(m) if m.expiry_left(now_ms).is_some() => {
                hub.set_retained(bytes::Bytes::copy_from_slice(&k[1..]), Some(Arc::new(m)))
            }
            Ok(_) => purge.push(StateOp::Delete { key: k }),
            // Left out, not deleted: `edge check` lists it, `--repair` moves it aside.
            Err(_) => log.quarantine_meta(&k, "retained message"),
        }
    }
    if hub.retained_count() > 0 {
        tracing::info!(count = hub.retained_count(), "retained messages loaded");
    }
    Ok(purge)
}

/// What SIGHUP does: reads the password and ACL files again (each connection applies the new
/// rules from its next packet), and the TLS certificate, key and client CA files (new
/// handshakes use them; open connections stay). A file that fails to load is logged and
/// what it held before stays in force.
pub async fn reload(broker: &Arc<Broker>, tls: Option<&TlsServer>) {
    let b = broker.clone();
    match tokio::task::spawn_blocking(move || b.auth.reload()).await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!("reloading auth files on SIGHUP: {e}"),
        Err(e) => tracing::error!("reloading auth files on SIGHUP: {e}"),
    }
    let Some(tls) = tls else {
        return;
    };
    // A few small files: read in place rather than on a blocking thread.
    match tls.reload() {
        Ok(()) => tracing::info!(
            client_ca = tls.mutual(),
            "SIGHUP: TLS certificate and key reloaded"
        ),
        Err(e) => {
            tracing::error!("SIGHUP: TLS reload failed, the previous certificate stays in use: {e}")
        }
    }
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate()).expect("installing the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = term.recv() => {}
    }
}
