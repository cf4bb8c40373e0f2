//! One simulated device in normal mode: a rumqttc connection, a publish schedule, and the
//! ledger of what was sent and acknowledged.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use rand::rngs::SmallRng;
use rand::{RngExt, SeedableRng};
use tokio::sync::{broadcast, watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep_until, Instant};

use crate::broker::ConnectSettings;
use crate::ledger::{Ledger, Outcome};
use crate::lightweight;
use crate::manifest::DeviceRecord;
use crate::payload::{self, Origin, RunId, Telemetry};
use crate::plan::{ClassPlan, DeviceIdentity, EventPlan, FleetAction};
use crate::session::{self, SessionClient, SessionEvent, SessionParams};
use crate::stats::{bump, Clock, FleetStats};

/// Capacity of each device's request channel. flume allocates lazily, so a large bound costs
/// nothing for idle devices; the ledger's `max_queue` is the limit that matters.
const REQUEST_CAPACITY: usize = 1 << 16;
/// First wait after a failed connection attempt; doubles up to [`MAX_BACKOFF`].
pub(crate) const INITIAL_BACKOFF: Duration = Duration::from_millis(250);
/// Longest wait between connection attempts.
pub(crate) const MAX_BACKOFF: Duration = Duration::from_secs(5);

/// What every device of a fleet shares.
pub struct FleetContext {
    /// Broker and connection settings.
    pub settings: ConnectSettings,
    /// Device classes.
    pub classes: Vec<ClassPlan>,
    /// Scenario events; commands carry an index into this list.
    pub events: Vec<EventPlan>,
    /// Live counters.
    pub stats: Arc<FleetStats>,
    /// Clock for send times and latencies.
    pub clock: Clock,
    /// The run.
    pub run: RunId,
    /// Limits how many devices are connecting at the same moment.
    pub connect_gate: Arc<Semaphore>,
    /// Most messages a device keeps queued in its client before it skips publishes.
    pub max_queue: usize,
    /// How long a stopping device waits for outstanding acknowledgements.
    pub drain: Duration,
    /// Drive plain-TCP devices with [`crate::lightweight`] instead of rumqttc.
    pub lightweight: bool,
    /// Local addresses the lightweight driver binds its sockets to, one per device in turn
    /// (empty: let the kernel choose).
    pub source_ips: Vec<std::net::IpAddr>,
}

enum Step {
    Polled(Result<SessionEvent, String>),
    Drop(Option<Duration>),
    DrainExpired,
}

struct Publisher<'a> {
    ctx: &'a FleetContext,
    class: &'a ClassPlan,
    identity: &'a DeviceIdentity,
    client: &'a SessionClient,
    rng: SmallRng,
    telemetry: Telemetry,
}

impl Publisher<'_> {
    fn publish(&mut self, ledger: &mut Ledger) {
        if ledger.queued_len() >= self.ctx.max_queue {
            bump(&self.ctx.stats.skipped);
            return;
        }
        let (body, created_us) = next_message(
            self.ctx,
            self.class,
            self.identity,
            ledger.next_seq(),
            &mut self.telemetry,
            &mut self.rng,
        );
        match self
            .client
            .try_publish(&self.identity.topic, self.class.qos, body)
        {
            Ok(()) => {
                ledger.queue(created_us);
            }
            Err(e) => {
                bump(&self.ctx.stats.errors);
                self.ctx.stats.note_error(&format!("publish: {e}"));
            }
        }
    }
}

/// The payload of message `seq` of a device and its creation time (Unix µs).
pub(crate) fn next_message(
    ctx: &FleetContext,
    class: &ClassPlan,
    identity: &DeviceIdentity,
    seq: u64,
    telemetry: &mut Telemetry,
    rng: &mut SmallRng,
) -> (Vec<u8>, u64) {
    let created_us = ctx.clock.now_us();
    let origin = Origin {
        run: ctx.run,
        class: identity.class,
        device_index: identity.index,
        device_name: &identity.name,
    };
    let body = payload::encode(class.payload, origin, seq, created_us, telemetry, rng);
    (body, created_us)
}

/// The publish time after `next_tick`, jittered by the class.
pub(crate) fn advance_tick(
    next_tick: Instant,
    interval: Duration,
    jitter: f64,
    rng: &mut SmallRng,
) -> Instant {
    let next = next_tick + interval.mul_f64(1.0 + jitter * rng.random_range(-1.0..1.0));
    let now = Instant::now();
    // After a stall, carry on from now instead of catching up in a burst.
    if next + interval < now {
        now
    } else {
        next
    }
}

/// The random generator of a device: the same device gets the same telemetry in every driver.
fn seed(run: RunId, index: u32) -> u64 {
    (u64::from(run.0) << 32) ^ u64::from(index) ^ 0x5DEE_CE66_D1CE_4E5B
}

/// What a device starts with, in either driver.
pub(crate) struct DeviceStart {
    /// Its random generator, seeded by run and device.
    pub rng: SmallRng,
    /// Its telemetry state.
    pub telemetry: Telemetry,
    /// Time between its publishes.
    pub interval: Duration,
    /// When it publishes first.
    pub next_tick: Instant,
}

impl DeviceStart {
    pub(crate) fn new(ctx: &FleetContext, class: &ClassPlan, identity: &DeviceIdentity) -> Self {
        let mut rng = SmallRng::seed_from_u64(seed(ctx.run, identity.index));
        let telemetry = Telemetry::new(&mut rng);
        let interval = Duration::from_secs_f64(1.0 / class.rate);
        // A random phase keeps devices started together from publishing in lockstep.
        let next_tick = Instant::now() + interval.mul_f64(rng.random_range(0.0..1.0));
        DeviceStart {
            rng,
            telemetry,
            interval,
            next_tick,
        }
    }
}

/// Runs one device until the run stops (or its message count is reached) and its outstanding
/// messages are acknowledged or the drain time is over; returns what it sent.
pub async fn run_device(
    identity: DeviceIdentity,
    start_at: Instant,
    ctx: Arc<FleetContext>,
    mut commands: broadcast::Receiver<usize>,
    mut stop: watch::Receiver<bool>,
) -> DeviceRecord {
    let class = &ctx.classes[usize::from(identity.class)];
    let mut ledger = Ledger::new(class.qos);
    let mut stopping = *stop.borrow_and_update();
    if !stopping {
        tokio::select! {
            _ = sleep_until(start_at) => {}
            _ = stop.changed() => stopping = true,
        }
    }
    if !stopping {
        // Boxed so that a waiting device holds a pointer, not the larger of the two drivers'
        // state machines; the lightweight driver exists to keep idle devices small.
        if ctx.lightweight {
            Box::pin(lightweight::drive(
                &identity,
                class,
                &ctx,
                &mut ledger,
                &mut commands,
                &mut stop,
            ))
            .await;
        } else {
            Box::pin(drive(
                &identity,
                class,
                &ctx,
                &mut ledger,
                &mut commands,
                &mut stop,
            ))
            .await;
        }
    }
    let (sent, acked, refused) = ledger.into_sets();
    DeviceRecord {
        index: identity.index,
        name: identity.name,
        class: identity.class,
        qos: class.qos,
        topic: identity.topic,
        client_id: Some(identity.client_id),
        sent,
        acked,
        refused,
    }
}

async fn drive(
    identity: &DeviceIdentity,
    class: &ClassPlan,
    ctx: &FleetContext,
    ledger: &mut Ledger,
    commands: &mut broadcast::Receiver<usize>,
    stop: &mut watch::Receiver<bool>,
) {
    let params = SessionParams {
        client_id: identity.client_id.clone(),
        session: class.session,
        inflight: class.inflight,
        request_capacity: REQUEST_CAPACITY,
    };
    let (client, mut eventloop) = session::open(&ctx.settings, &params);
    let DeviceStart {
        rng,
        telemetry,
        interval,
        mut next_tick,
    } = DeviceStart::new(ctx, class, identity);
    let mut publisher = Publisher {
        ctx,
        class,
        identity,
        client: &client,
        rng,
        telemetry,
    };
    let stats = &ctx.stats;
    let mut stopping = false;
    let mut drain_deadline: Option<Instant> = None;
    let mut connected = false;
    let mut disconnect_sent = false;
    let mut permit: Option<OwnedSemaphorePermit> = None;
    let mut offline_until: Option<Instant> = None;
    let mut backoff = INITIAL_BACKOFF;
    let mut commands_open = true;

    loop {
        if stopping && drain_deadline.is_none() {
            drain_deadline = Some(Instant::now() + ctx.drain);
        }
        if stopping && !connected {
            break;
        }
        if stopping && ledger.is_settled() && !disconnect_sent {
            client.try_disconnect();
            disconnect_sent = true;
        }
        if let Some(until) = offline_until.take() {
            tokio::select! {
                _ = sleep_until(until) => {}
                _ = stop.changed() => {
                    stopping = true;
                    continue;
                }
            }
            next_tick = Instant::now() + interval;
        }
        if !connected && permit.is_none() {
            tokio::select! {
                acquired = ctx.connect_gate.clone().acquire_owned() => permit = acquired.ok(),
                _ = stop.changed() => {
                    stopping = true;
                    continue;
                }
            }
        }

        let step = {
            let mut poll = Box::pin(eventloop.poll());
            loop {
                tokio::select! {
                    biased;
                    event = &mut poll => break Step::Polled(event),
                    _ = sleep_until(drain_deadline.unwrap_or(next_tick)), if drain_deadline.is_some() => {
                        break Step::DrainExpired;
                    }
                    _ = stop.changed(), if !stopping => {
                        stopping = true;
                        drain_deadline = Some(Instant::now() + ctx.drain);
                        if connected && ledger.is_settled() && !disconnect_sent {
                            client.try_disconnect();
                            disconnect_sent = true;
                        }
                    }
                    command = commands.recv(), if commands_open => match command {
                        Ok(i) => {
                            let event = &ctx.events[i];
                            if !event.selects(identity.index, identity.class, i as u64) {
                                continue;
                            }
                            match event.action {
                                FleetAction::ReconnectStorm => break Step::Drop(None),
                                FleetAction::Offline(d) => break Step::Drop(Some(d)),
                                FleetAction::Burst(n) if connected && !stopping => {
                                    for _ in 0..n {
                                        publisher.publish(ledger);
                                    }
                                }
                                FleetAction::Burst(n) => {
                                    stats.skipped.fetch_add(u64::from(n), Ordering::Relaxed);
                                }
                            }
                        }
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => commands_open = false,
                    },
                    _ = sleep_until(next_tick), if connected && !stopping => {
                        if class.count.is_some_and(|count| ledger.next_seq() >= count) {
                            stopping = true;
                            drain_deadline = Some(Instant::now() + ctx.drain);
                            if ledger.is_settled() && !disconnect_sent {
                                client.try_disconnect();
                                disconnect_sent = true;
                            }
                            continue;
                        }
                        publisher.publish(ledger);
                        next_tick = advance_tick(next_tick, interval, class.jitter, &mut publisher.rng);
                    }
                }
            }
        };

        match step {
            Step::Polled(Ok(event)) => match event {
                SessionEvent::Connected { session_present } => {
                    connected = true;
                    permit = None;
                    backoff = INITIAL_BACKOFF;
                    stats.connected.fetch_add(1, Ordering::Relaxed);
                    bump(&stats.connects);
                    let dropped = ledger.connected(session_present);
                    stats.discarded.fetch_add(dropped, Ordering::Relaxed);
                    next_tick = next_tick.max(Instant::now());
                }
                SessionEvent::PublishWritten { pkid } => match ledger.written(pkid) {
                    Outcome::Sent => bump(&stats.sent),
                    Outcome::Unmatched => {
                        bump(&stats.errors);
                        stats.note_error("a PUBLISH was written that the simulator cannot match");
                    }
                    _ => {}
                },
                SessionEvent::PublishDeferred { pkid } => {
                    if ledger.deferred(pkid) == Outcome::Unmatched {
                        bump(&stats.errors);
                    }
                }
                SessionEvent::Acked { pkid, refused } => {
                    let now = ctx.clock.now_us();
                    match ledger.acked(pkid, refused.is_some(), now) {
                        Outcome::Acked { latency_us } => {
                            bump(&stats.acked);
                            stats.record_latencies(&[latency_us]);
                        }
                        Outcome::Refused => {
                            bump(&stats.refused);
                            stats.note_error(&format!(
                                "refused by the broker: {}",
                                refused.unwrap_or_default()
                            ));
                        }
                        _ => {
                            bump(&stats.errors);
                            stats.note_error("acknowledgement for an unknown packet id");
                        }
                    }
                }
                SessionEvent::Completed { pkid } => ledger.completed(pkid),
                SessionEvent::DisconnectWritten => break,
                SessionEvent::Message { .. }
                | SessionEvent::Subscribed { .. }
                | SessionEvent::Other => {}
            },
            Step::Polled(Err(error)) => {
                if disconnect_sent {
                    break;
                }
                if connected {
                    connected = false;
                    stats.connected.fetch_sub(1, Ordering::Relaxed);
                    bump(&stats.disconnects);
                    stats.note_error(&format!("connection lost: {error}"));
                    ledger.connection_lost(eventloop.pending_publish_ids());
                } else {
                    permit = None;
                    bump(&stats.connect_failures);
                    stats.note_error(&format!(
                        "connect to {}: {error}",
                        ctx.settings.url.original
                    ));
                    let wait = backoff.mul_f64(publisher.rng.random_range(0.5..1.0));
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                    tokio::select! {
                        _ = tokio::time::sleep(wait) => {}
                        _ = stop.changed(), if !stopping => stopping = true,
                    }
                }
            }
            Step::Drop(offline) => {
                if connected {
                    connected = false;
                    stats.connected.fetch_sub(1, Ordering::Relaxed);
                    eventloop.drop_connection();
                    ledger.connection_lost(eventloop.pending_publish_ids());
                }
                permit = None;
                offline_until = offline.map(|d| Instant::now() + d);
            }
            Step::DrainExpired => break,
        }
    }
    drop(permit);
    if connected {
        stats.connected.fetch_sub(1, Ordering::Relaxed);
    }
}
