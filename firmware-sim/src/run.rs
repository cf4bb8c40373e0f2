//! `firmware-sim run`: starts the fleet (normal or flood mode), stops it, and writes the
//! manifest, the report and the plot.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{broadcast, watch, Semaphore};
use tokio::task::JoinSet;
use tokio::time::Instant;

use crate::broker::{ConnectSettings, Protocol};
use crate::device::{run_device, FleetContext};
use crate::error::SimError;
use crate::flood::{run_connection, FloodConnection};
use crate::manifest::{self, ClassSummary, DeviceRecord, ManifestHeader};
use crate::payload::{PayloadKind, RunId};
use crate::plan::FleetPlan;
use crate::plot;
use crate::progress::{self, Goal};
use crate::report::{self, RunReport};
use crate::stats::{Clock, FleetStats};

/// Everything `run` was asked to do.
pub struct RunOptions {
    /// Connection settings.
    pub settings: ConnectSettings,
    /// Devices and events.
    pub plan: FleetPlan,
    /// Spread the first connections over this long.
    pub ramp_up: Duration,
    /// Most connection attempts at the same moment.
    pub connect_concurrency: usize,
    /// Most messages a device keeps queued in its client.
    pub max_queue: usize,
    /// How long to wait for outstanding acknowledgements at the end.
    pub drain: Duration,
    /// Flood mode with this many unacknowledged QoS 1 publishes per connection.
    pub flood_inflight: Option<u16>,
    /// Flood mode paced to this many messages per second per connection.
    pub flood_rate: Option<f64>,
    /// Drive normal-mode devices with [`crate::lightweight`] instead of rumqttc.
    pub lightweight: bool,
    /// Local addresses the lightweight driver binds its sockets to (empty: any).
    pub source_ips: Vec<std::net::IpAddr>,
    /// Manifest directory.
    pub manifest_dir: Option<PathBuf>,
    /// JSON report file.
    pub report_path: Option<PathBuf>,
    /// SVG plot file.
    pub plot_path: Option<PathBuf>,
}

/// Checks what only flood mode forbids.
fn check_flood(options: &RunOptions) -> Result<(), SimError> {
    if let Some(rate) = options.flood_rate {
        if !(rate.is_finite() && rate > 0.0) {
            return Err(SimError::invalid(
                "--flood-rate",
                "must be a positive number of messages per second",
            ));
        }
    }
    if options.settings.url.tls {
        return Err(SimError::invalid(
            "--flood",
            "flood mode writes plain TCP; use an mqtt:// broker URL",
        ));
    }
    if !options.plan.events.is_empty() {
        return Err(SimError::invalid(
            "--flood",
            "flood mode does not play scenario events; remove the [[event]] tables",
        ));
    }
    for class in &options.plan.classes {
        if class.qos > 1 {
            return Err(SimError::invalid("--qos", "flood mode sends QoS 0 or 1"));
        }
    }
    if options.plan.duration.is_none() && options.plan.classes.iter().any(|c| c.count.is_none()) {
        return Err(SimError::invalid(
            "--flood",
            "flood mode needs --duration or --count",
        ));
    }
    Ok(())
}

fn protocol_text(protocol: Protocol) -> String {
    match protocol {
        Protocol::V311 => "3.1.1".into(),
        Protocol::V5 => "5".into(),
    }
}

/// Checks what the lightweight driver cannot do.
fn check_lightweight(options: &RunOptions) -> Result<(), SimError> {
    if options.flood_inflight.is_some() {
        return Err(SimError::invalid(
            "--lightweight",
            "flood mode has its own driver; use one of --flood and --lightweight",
        ));
    }
    if options.settings.url.tls {
        return Err(SimError::invalid(
            "--lightweight",
            "the lightweight driver speaks plain TCP; use an mqtt:// broker URL or drop --lightweight",
        ));
    }
    Ok(())
}

/// Runs the fleet and writes the requested outputs.
pub async fn run(options: RunOptions) -> Result<RunReport, SimError> {
    let flood = options.flood_inflight.is_some();
    if flood {
        check_flood(&options)?;
    }
    if options.lightweight {
        check_lightweight(&options)?;
    } else if !options.source_ips.is_empty() {
        return Err(SimError::invalid(
            "--source-ips",
            "only the lightweight driver binds source addresses; add --lightweight",
        ));
    }
    if let Some(dir) = &options.manifest_dir {
        manifest::prepare_dir(dir)?;
    }
    let plan = &options.plan;
    let devices = plan.device_count();
    let stats = Arc::new(FleetStats::default());
    let clock = Clock::start();
    let (stop_tx, stop_rx) = watch::channel(false);
    let start = Instant::now();

    let goal = match (
        plan.duration,
        plan.classes
            .iter()
            .map(|c| c.count)
            .collect::<Option<Vec<_>>>(),
    ) {
        (Some(d), _) => Goal::Duration(d),
        (None, Some(counts)) => Goal::Messages(
            plan.classes
                .iter()
                .zip(counts)
                .map(|(c, n)| u64::from(c.devices) * n)
                .sum(),
        ),
        (None, None) => Goal::Open,
    };
    let display = progress::start(stats.clone(), devices, goal);

    let stopped_at = Arc::new(std::sync::Mutex::new(None::<Instant>));
    let stopper = {
        let stopped_at = stopped_at.clone();
        let duration = plan.duration;
        tokio::spawn(async move {
            let timer = async {
                match duration {
                    Some(d) => tokio::time::sleep_until(start + d).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = timer => {}
                _ = tokio::signal::ctrl_c() => {
                    eprintln!("interrupted: stopping devices and waiting for acknowledgements (Ctrl-C again to quit at once)");
                    tokio::spawn(async {
                        if tokio::signal::ctrl_c().await.is_ok() {
                            std::process::exit(130);
                        }
                    });
                }
            }
            *stopped_at.lock().expect("stop lock") = Some(Instant::now());
            let _ = stop_tx.send(true);
            // Keep the sender alive so that devices see `true`, not a closed channel.
            std::future::pending::<()>().await;
        })
    };

    let mut tasks: JoinSet<DeviceRecord> = JoinSet::new();
    if let Some(inflight) = options.flood_inflight {
        let settings = Arc::new(options.settings.clone());
        for identity in plan.devices() {
            let connection = FloodConnection {
                class: plan.classes[usize::from(identity.class)].clone(),
                identity,
                settings: settings.clone(),
                inflight,
                rate: options.flood_rate,
                run: plan.run,
                stats: stats.clone(),
                clock,
                drain: options.drain,
            };
            tasks.spawn(run_connection(connection, stop_rx.clone()));
        }
    } else {
        let (commands, _) = broadcast::channel(64);
        let ctx = Arc::new(FleetContext {
            settings: options.settings.clone(),
            classes: plan.classes.clone(),
            events: plan.events.clone(),
            stats: stats.clone(),
            clock,
            run: plan.run,
            connect_gate: Arc::new(Semaphore::new(options.connect_concurrency.max(1))),
            max_queue: options.max_queue.max(1),
            drain: options.drain,
            lightweight: options.lightweight,
            source_ips: options.source_ips.clone(),
        });
        for identity in plan.devices() {
            let offset = if devices > 1 {
                options
                    .ramp_up
                    .mul_f64(f64::from(identity.index) / (devices - 1) as f64)
            } else {
                Duration::ZERO
            };
            tasks.spawn(run_device(
                identity,
                start + offset,
                ctx.clone(),
                commands.subscribe(),
                stop_rx.clone(),
            ));
        }
        let events = plan.events.clone();
        let mut stop_events = stop_rx.clone();
        tokio::spawn(async move {
            for (i, event) in events.iter().enumerate() {
                tokio::select! {
                    _ = tokio::time::sleep_until(start + event.at) => {}
                    _ = stop_events.changed() => return,
                }
                let _ = commands.send(i);
            }
            // Dropping `commands` here is harmless: devices stop listening on Closed.
        });
    }
    drop(stop_rx);

    let mut records = Vec::with_capacity(devices as usize);
    while let Some(joined) = tasks.join_next().await {
        match joined {
            Ok(record) => records.push(record),
            Err(e) if e.is_panic() => std::panic::resume_unwind(e.into_panic()),
            Err(e) => return Err(SimError::invalid("run", format!("device task failed: {e}"))),
        }
    }
    let finished = Instant::now();
    stopper.abort();
    let timeline = display.finish().await;
    records.sort_by_key(|r| r.index);

    let publish_end = stopped_at.lock().expect("stop lock").unwrap_or(finished);
    let publish_seconds = publish_end.duration_since(start).as_secs_f64().max(1e-9);
    let totals = manifest::totals(&records);
    let unacked: u64 = records
        .iter()
        .filter(|r| r.qos > 0)
        .map(|r| r.sent.len() - r.acked.len() - r.refused.len())
        .sum();
    let classes: Vec<ClassSummary> = plan
        .classes
        .iter()
        .map(|c| ClassSummary {
            name: c.name.clone(),
            devices: c.devices,
            qos: c.qos,
            payload: match c.payload.kind {
                PayloadKind::Json => "json".into(),
                PayloadKind::Binary => "binary".into(),
            },
            size: c.payload.size,
            topic: c.topic_text.clone(),
            rate: (!flood).then_some(c.rate),
        })
        .collect();
    let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    let report = RunReport {
        run: plan.run,
        mode: if flood { "flood" } else { "normal" }.into(),
        broker: options.settings.url.original.clone(),
        protocol: protocol_text(options.settings.protocol),
        devices,
        classes: classes.clone(),
        publish_seconds,
        total_seconds: finished.duration_since(start).as_secs_f64(),
        sent: totals.sent,
        acked: totals.acked,
        refused: totals.refused,
        unacked,
        skipped: get(&stats.skipped),
        discarded: get(&stats.discarded),
        errors: get(&stats.errors),
        connects: get(&stats.connects),
        connect_failures: get(&stats.connect_failures),
        disconnects: get(&stats.disconnects),
        sent_per_s: totals.sent as f64 / publish_seconds,
        acked_per_s: totals.acked as f64 / publish_seconds,
        latency: stats.total_latency(),
        error_messages: stats.error_texts(),
        timeline,
    };

    if let Some(dir) = &options.manifest_dir {
        let header = ManifestHeader {
            format: manifest::FORMAT.into(),
            version: manifest::FORMAT_VERSION,
            run: plan.run,
            mode: report.mode.clone(),
            broker: report.broker.clone(),
            protocol: report.protocol.clone(),
            started_at_us: clock.start_unix_us(),
            finished_at_us: clock.now_us(),
            classes,
            devices,
            totals,
        };
        manifest::write(dir, &header, &records)?;
    }
    if let Some(path) = &options.report_path {
        report::write_json(path, &report)?;
    }
    if let Some(path) = &options.plot_path {
        plot::write_svg(path, &report)?;
    }
    Ok(report)
}

/// A fresh random run id.
pub fn new_run_id() -> RunId {
    use rand::RngExt;
    RunId(rand::rng().random())
}
