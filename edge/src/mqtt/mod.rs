//! The MQTT front end: a plain TCP listener, optionally a TLS one, and one task per
//! connection.

pub mod codec;
pub(crate) mod connection;
pub(crate) mod delivery;
pub(crate) mod limits;
pub(crate) mod session;
pub(crate) mod subs;
pub mod tls;
pub(crate) mod will;

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::MqttConfig;
use crate::log::appender::Appender;
use crate::log::Log;
use crate::route::Router;
use session::SessionStore;

/// Bytes of appends that may be queued or being committed at once, node-wide.
pub const APPEND_BUDGET_BYTES: u32 = 32 << 20;
/// Sockets accepted beyond `max_connections` and read up to their CONNECT, so that a client
/// just past the limit hears CONNACK Server busy; beyond these, sockets are closed at accept.
pub const ACCEPT_HEADROOM: usize = 64;

/// What every connection shares.
pub struct Broker {
    /// The `[mqtt]` settings.
    pub config: MqttConfig,
    /// Routing table.
    pub router: Router,
    /// The log (read side, budget state).
    pub log: Arc<Log>,
    /// The way into the log.
    pub appender: Appender,
    /// Sessions by client id.
    pub sessions: SessionStore,
    /// Subscriptions, retained messages, delivery counters.
    pub hub: delivery::Hub,
    /// Bytes of appends sent to the appender and not yet committed, node-wide: a connection
    /// waits for room here before it sends, so memory stays bounded whatever clients do.
    pub append_budget: Arc<tokio::sync::Semaphore>,
    /// Open connections.
    pub connections: AtomicUsize,
    /// Per-address connection counts, refusal counters and other client limits.
    pub limits: limits::Limits,
    /// Becomes true when the edge shuts down.
    pub shutdown: watch::Receiver<bool>,
    /// Password file, ACL and their counters.
    pub auth: crate::auth::Auth,
    /// Wills waiting out their delay.
    pub wills: will::PendingWills,
}

/// An accepted socket's place in the connection counts, given back when it closes.
struct ConnectionGuard {
    broker: Arc<Broker>,
    /// The source address, when it took a per-address slot.
    address: Option<IpAddr>,
}

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.broker.connections.fetch_sub(1, Ordering::Relaxed);
        if let Some(ip) = self.address {
            self.broker.limits.release(ip);
        }
    }
}

/// Takes a connection slot for a socket from `ip`, or says why it is refused at accept.
fn admit(broker: &Arc<Broker>, ip: IpAddr) -> Result<ConnectionGuard, limits::Refused> {
    let cfg = &broker.config;
    let open = broker.connections.load(Ordering::Relaxed);
    if open >= cfg.max_connections.saturating_add(ACCEPT_HEADROOM) {
        return Err(limits::Refused::MaxConnections);
    }
    let per_address = cfg.max_connections_per_address;
    if !broker.limits.try_take(ip, per_address) {
        return Err(limits::Refused::PerAddress);
    }
    broker.connections.fetch_add(1, Ordering::Relaxed);
    Ok(ConnectionGuard {
        broker: broker.clone(),
        address: (per_address > 0).then_some(ip),
    })
}

/// Counts a socket closed at accept and logs it, within the log budget.
fn refused_at_accept(broker: &Broker, peer: std::net::SocketAddr, why: limits::Refused) {
    broker.limits.refused(why);
    let Some(held_back) = broker.limits.log_budget.admit() else {
        return;
    };
    let cfg = &broker.config;
    let because = match why {
        limits::Refused::PerAddress => format!(
            "this address holds mqtt.max_connections_per_address = {} connections already \
             (raise it if many devices share the address, e.g. behind a NAT gateway)",
            cfg.max_connections_per_address
        ),
        _ => format!(
            "the edge holds mqtt.max_connections = {} connections and {ACCEPT_HEADROOM} more \
             waiting for their CONNECT",
            cfg.max_connections
        ),
    };
    tracing::warn!(%peer, held_back, "connection closed at accept: {because}");
}

/// Accepts connections on the plain listener and, when given, the TLS one until shutdown,
/// then waits (up to `grace`) for them to end. Both share `max_connections`.
pub async fn serve(
    broker: Arc<Broker>,
    listener: TcpListener,
    tls: Option<(TcpListener, Arc<tls::TlsServer>)>,
    grace: std::time::Duration,
) {
    let mut shutdown = broker.shutdown.clone();
    let mut tasks = JoinSet::new();
    loop {
        let accepted = tokio::select! {
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
            accepted = listener.accept() => accepted.map(|(stream, peer)| (stream, peer, None)),
            accepted = async { tls.as_ref().expect("guarded").0.accept().await }, if tls.is_some() => {
                let server = tls.as_ref().map(|(_, server)| server.clone());
                accepted.map(|(stream, peer)| (stream, peer, server))
            }
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        match accepted {
            Ok((stream, peer, tls)) => {
                let guard = match admit(&broker, peer.ip()) {
                    Ok(guard) => guard,
                    Err(why) => {
                        drop(stream);
                        refused_at_accept(&broker, peer, why);
                        continue;
                    }
                };
                let b = broker.clone();
                let _ = stream.set_nodelay(true);
                tasks.spawn(async move {
                    match tls {
                        None => {
                            let (reader, writer) = stream.into_split();
                            connection::serve(b, reader, writer, peer, None).await;
                        }
                        // Boxed: the task of every connection, plain ones too, would
                        // otherwise be as large as a TLS handshake in progress.
                        Some(tls) => Box::pin(serve_tls(b, &tls, stream, peer)).await,
                    }
                    drop(guard);
                });
            }
            Err(e) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    drop(listener);
    drop(tls);
    let _ = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
}

/// Handshakes in the connection's own task (so a slow client never holds up the accept
/// loop), within `connect_timeout`, then serves MQTT over the TLS stream.
async fn serve_tls(
    broker: Arc<Broker>,
    tls: &tls::TlsServer,
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
) {
    let limit = broker.config.connect_timeout.0;
    match tokio::time::timeout(limit, tls.accept(stream)).await {
        Ok(Ok((stream, cert_user))) => {
            let (reader, writer) = tokio::io::split(stream);
            connection::serve(broker, reader, writer, peer, cert_user).await;
        }
        Ok(Err(e)) => {
            broker.limits.refused(limits::Refused::TlsHandshake);
            if let Some(held_back) = broker.limits.log_budget.admit() {
                tracing::info!(%peer, reason = %e, held_back, "TLS connection refused");
            }
        }
        Err(_) => {
            broker.limits.refused(limits::Refused::ConnectTimeout);
            tracing::debug!(%peer, "no TLS handshake in time; closing");
        }
    }
}
