//! The MQTT front end: a TCP listener and one task per connection.

pub mod codec;
pub mod connection;
pub mod delivery;
pub mod session;
pub mod subs;

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
    /// Password file, ACL and their counters.
    pub auth: crate::auth::Auth,
}

struct ConnectionGuard(Arc<Broker>);

impl Drop for ConnectionGuard {
    fn drop(&mut self) {
        self.0.connections.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Accepts connections until shutdown, then waits (up to `grace`) for them to end.
pub async fn serve(broker: Arc<Broker>, listener: TcpListener, grace: std::time::Duration) {
    let mut shutdown = broker.shutdown.clone();
    let mut tasks = JoinSet::new();
    loop {
        tokio::select! {
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    broker.connections.fetch_add(1, Ordering::Relaxed);
                    let guard = ConnectionGuard(broker.clone());
                    let b = broker.clone();
                    tasks.spawn(async move {
                        connection::serve(b, stream, peer, None).await;
                        drop(guard);
                    });
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                }
            },
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
        }
    }
    drop(listener);
    let _ = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
}
