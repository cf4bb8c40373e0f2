//! The MQTT front end: a plain TCP listener, optionally a TLS one, and one task per
//! connection.

pub mod codec;
pub mod connection;
pub mod delivery;
pub mod session;
pub mod subs;
pub mod tls;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

use crate::config::MqttConfig;
use crate::log::appender::AppenderMsg;
use crate::log::Log;
use crate::route::Router;
use session::SessionStore;

/// Bytes of appends that may be queued or being committed at once, node-wide.
pub const APPEND_BUDGET_BYTES: u32 = 32 << 20;

/// What every connection shares.
pub struct Broker {
    /// The `[mqtt]` settings.
    pub config: MqttConfig,
    /// Routing table.
    pub router: Router,
    /// The log (read side, budget state).
    pub log: Arc<Log>,
    /// The appender's queue.
    pub appender: mpsc::Sender<AppenderMsg>,
    /// Sessions by client id.
    pub sessions: SessionStore,
    /// Subscriptions, retained messages, delivery counters.
    pub hub: delivery::Hub,
    /// Bytes of appends sent to the appender and not yet committed, node-wide: a connection
    /// waits for room here before it sends, so memory stays bounded whatever clients do.
    pub append_budget: Arc<tokio::sync::Semaphore>,
    /// Open connections.
    pub connections: AtomicUsize,
    /// Becomes true when the edge shuts down.
    pub shutdown: watch::Receiver<bool>,
}

struct ConnectionGuard(Arc<Broker>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
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
                broker.connections.fetch_add(1, Ordering::Relaxed);
                let guard = ConnectionGuard(broker.clone());
                let b = broker.clone();
                let _ = stream.set_nodelay(true);
                tasks.spawn(async move {
                    match tls {
                        None => {
                            let (reader, writer) = stream.into_split();
                            connection::serve(b, reader, writer, peer, None).await;
                        }
                        Some(tls) => serve_tls(b, &tls, stream, peer).await,
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
        Ok(Err(e)) => tracing::info!(%peer, reason = %e, "TLS connection refused"),
        Err(_) => tracing::debug!(%peer, "no TLS handshake in time; closing"),
    }
}
