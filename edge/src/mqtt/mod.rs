//! The MQTT front end: the listeners (plain TCP, TLS, WebSocket, WebSocket over TLS), and
//! one task per connection.

pub mod codec;
pub(crate) mod connection;
pub(crate) mod delivery;
pub(crate) mod limits;
pub(crate) mod session;
pub(crate) mod subs;
pub mod tls;
pub(crate) mod websocket;
pub(crate) mod will;

use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinSet;

use crate::config::{ListenerProtocol, MqttConfig};
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

/// A bound listener socket and what it serves.
pub struct BoundListener {
    /// The socket.
    pub socket: TcpListener,
    /// What it speaks.
    pub protocol: ListenerProtocol,
    /// The path of the WebSocket upgrade (`ws`, `wss`).
    pub path: Arc<str>,
    /// The TLS settings (`mqtts`, `wss`).
    pub tls: Option<Arc<tls::TlsServer>>,
}

/// What a connection needs of its listener.
#[derive(Clone)]
struct ListenerKind {
    protocol: ListenerProtocol,
    path: Arc<str>,
    tls: Option<Arc<tls::TlsServer>>,
}

/// Accepts connections on every listener until shutdown, then waits (up to `grace`) for
/// them to end. All share `max_connections` and the per-address limit.
pub async fn serve(broker: Arc<Broker>, listeners: Vec<BoundListener>, grace: std::time::Duration) {
    let mut shutdown = broker.shutdown.clone();
    let mut tasks = JoinSet::new();
    let kinds: Vec<ListenerKind> = listeners
        .iter()
        .map(|l| ListenerKind {
            protocol: l.protocol,
            path: l.path.clone(),
            tls: l.tls.clone(),
        })
        .collect();
    let sockets: Vec<TcpListener> = listeners.into_iter().map(|l| l.socket).collect();
    // The listener polled first, turn by turn, so that a busy one cannot starve the others.
    let mut first = 0usize;
    loop {
        let accepted = tokio::select! {
            _ = async { let _ = shutdown.wait_for(|s| *s).await; } => break,
            accepted = std::future::poll_fn(|cx| accept_any(&sockets, &mut first, cx)) => accepted,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => continue,
        };
        match accepted {
            (Ok((stream, peer)), index) => {
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
                let kind = kinds[index].clone();
                tasks.spawn(async move {
                    if kind.protocol == ListenerProtocol::Mqtt {
                        let (reader, writer) = stream.into_split();
                        connection::serve(b, reader, writer, peer, None).await;
                    } else {
                        // Boxed: the task of every connection, plain ones too, would
                        // otherwise be as large as a TLS handshake in progress.
                        Box::pin(serve_upgraded(b, kind, stream, peer)).await;
                    }
                    drop(guard);
                });
            }
            (Err(e), _) => {
                // Out of file descriptors and the like: back off instead of spinning.
                tracing::warn!(error = %e, "accept failed");
                tokio::time::sleep(std::time::Duration::from_millis(50)).await;
            }
        }
    }
    drop(sockets);
    let _ = tokio::time::timeout(grace, async { while tasks.join_next().await.is_some() {} }).await;
    tasks.abort_all();
}

/// Polls every socket for a connection, starting at `first` (which then moves on by one);
/// returns what the first ready one gave and its index.
fn accept_any(
    sockets: &[TcpListener],
    first: &mut usize,
    cx: &mut std::task::Context<'_>,
) -> std::task::Poll<(
    std::io::Result<(tokio::net::TcpStream, std::net::SocketAddr)>,
    usize,
)> {
    let n = sockets.len();
    if n == 0 {
        return std::task::Poll::Pending;
    }
    let start = *first % n;
    *first = first.wrapping_add(1);
    for i in (start..n).chain(0..start) {
        if let std::task::Poll::Ready(r) = sockets[i].poll_accept(cx) {
            return std::task::Poll::Ready((r, i));
        }
    }
    std::task::Poll::Pending
}

/// Runs the TLS handshake and the WebSocket upgrade the listener asks for, in the
/// connection's own task (so a slow client never holds up the accept loop) and within
/// `connect_timeout` together, then serves MQTT over what they made.
async fn serve_upgraded(
    broker: Arc<Broker>,
    kind: ListenerKind,
    stream: tokio::net::TcpStream,
    peer: std::net::SocketAddr,
) {
    let limit = broker.config.connect_timeout.0;
    // A WebSocket message may hold a whole packet of the largest size and the fixed header.
    let max_message = broker.config.max_packet_size.0 as usize + 5;
    let upgrade = async {
        let (stream, cert_user): (Box<dyn Transport>, _) = match &kind.tls {
            Some(server) => {
                let (s, user) = server.accept(stream).await.map_err(Failed::Tls)?;
                (Box::new(s), user)
            }
            None => (Box::new(stream), None),
        };
        if !kind.protocol.websocket() {
            return Ok((stream, cert_user));
        }
        let ws = websocket::accept(stream, &kind.path, max_message)
            .await
            .map_err(Failed::WebSocket)?;
        Ok::<(Box<dyn Transport>, _), Failed>((Box::new(ws), cert_user))
    };
    match tokio::time::timeout(limit, upgrade).await {
        Ok(Ok((stream, cert_user))) => {
            let (reader, writer) = tokio::io::split(stream);
            connection::serve(broker, reader, writer, peer, cert_user).await;
        }
        Ok(Err(failed)) => {
            let (why, what) = match &failed {
                Failed::Tls(_) => (limits::Refused::TlsHandshake, "TLS connection refused"),
                Failed::WebSocket(_) => (
                    limits::Refused::WebSocketUpgrade,
                    "WebSocket connection refused",
                ),
            };
            broker.limits.refused(why);
            if let Some(held_back) = broker.limits.log_budget.admit() {
                tracing::info!(%peer, listener = %kind.protocol, reason = %failed, held_back, "{what}");
            }
        }
        Err(_) => {
            broker.limits.refused(limits::Refused::ConnectTimeout);
            tracing::debug!(%peer, listener = %kind.protocol, "no TLS handshake or WebSocket upgrade in time; closing");
        }
    }
}

/// Why a TLS handshake or WebSocket upgrade ended a connection.
#[derive(Debug, thiserror::Error)]
enum Failed {
    #[error(transparent)]
    Tls(tls::HandshakeError),
    #[error(transparent)]
    WebSocket(websocket::UpgradeError),
}

/// What MQTT is served over after the handshakes: TLS, a WebSocket, or both.
trait Transport: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send {}

impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send> Transport for T {}
