//! MQTT sessions: which connection holds a client id, and the session state that outlives a
//! connection.
//!
//! Durable state lives in the log's meta keyspace (keys and values in [`crate::log::meta`])
//! and is written through the appender, in the same group commits as records: the session
//! record (expiry, disconnect time, owner), and a QoS 2 marker per packet id whose PUBLISH is
//! in the log and whose PUBREL has not arrived, so that a resent PUBLISH with that id is not
//! logged again, across restarts too.
//!
//! Only sessions with a non-zero expiry are written: a session with expiry 0 ends with its
//! network connection, and a crash ends every connection, so its state would be discarded at
//! the next start anyway.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::Notify;

use super::delivery::{parse_subscription_value, Hub, Subscriber};
use crate::log::appender::{now_ms, StateOp};
use crate::log::meta::{self, Tag};
pub(crate) use crate::log::meta::{parse_qos2_key, parse_session_value};
use crate::log::{Log, LogError};

/// How a connection holding a client id is asked to end when another connection takes the
/// id over, and how the one taking over learns that it has ended. One small allocation per
/// connection: a channel pair for each direction cost about 900 bytes, a large share of what
/// an idle connection holds.
#[derive(Debug, Default)]
pub struct Handover {
    taken_over: AtomicBool,
    ended: AtomicBool,
    /// Woken on either change; each side waits for its own flag.
    changed: Notify,
}

impl Handover {
    /// Asks the connection to end: another connection took its client id.
    pub fn take_over(&self) {
        self.taken_over.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Whether [`Handover::take_over`] was called.
    pub fn is_taken_over(&self) -> bool {
        self.taken_over.load(Ordering::Acquire)
    }

    /// Resolves once [`Handover::take_over`] was called.
    pub async fn taken_over(&self) {
        Self::wait(&self.changed, &self.taken_over).await
    }

    /// Tells whoever takes over that the connection has ended and handed its state back.
    pub fn end(&self) {
        self.ended.store(true, Ordering::Release);
        self.changed.notify_waiters();
    }

    /// Resolves once [`Handover::end`] was called.
    pub async fn ended(&self) {
        Self::wait(&self.changed, &self.ended).await
    }

    async fn wait(changed: &Notify, flag: &AtomicBool) {
        loop {
            // Created before the flag is read: a `notify_waiters` after the read wakes it.
            let notified = changed.notified();
            if flag.load(Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

/// State of a session that survives its connection.
#[derive(Debug, Clone, Default)]
pub struct SessionData {
    /// Session Expiry Interval in seconds (`u32::MAX`: never; 0: ends with the connection).
    pub expiry: u32,
    /// QoS 2 packet ids logged and awaiting PUBREL.
    pub qos2: HashSet<u16>,
    /// Whether this session has a durable record.
    pub durable: bool,
    /// Its delivery side (subscriptions point at it).
    pub sub: Option<Arc<Subscriber>>,
    /// The user who started it (`None`: an anonymous client). Only that user may resume
    /// or take it over.
    pub owner: Option<Arc<str>>,
}

struct Attached {
    conn: u64,
    /// The client's authenticated name (from its TLS certificate), if any.
    username: Option<Arc<str>>,
    handover: Arc<Handover>,
}

struct Entry {
    data: SessionData,
    attached: Option<Attached>,
    disconnected_at_ms: u64,
    /// The connection that attached last.
    last_conn: u64,
}

/// All sessions of the node.
pub struct SessionStore {
    inner: Mutex<HashMap<String, Entry>>,
    next_conn: AtomicU64,
}

/// Records that a QoS 2 PUBLISH with `pkid` is in the log and its PUBREL has not arrived.
pub(crate) fn qos2_marker_op(client_id: &str, pkid: u16) -> StateOp {
    StateOp::Put {
        key: meta::qos2_key(client_id, pkid),
        value: meta::marker_value(),
    }
}

/// Ends a QoS 2 marker: the PUBREL arrived.
pub(crate) fn qos2_release_op(client_id: &str, pkid: u16) -> StateOp {
    StateOp::Delete {
        key: meta::qos2_key(client_id, pkid),
    }
}

/// Stores a session record.
pub(crate) fn session_put_op(
    client_id: &str,
    expiry: u32,
    disconnected_at_ms: u64,
    owner: Option<&str>,
) -> StateOp {
    StateOp::Put {
        key: meta::session_key(client_id),
        value: meta::session_value(expiry, disconnected_at_ms, owner),
    }
}

/// Every durable key of a session, to delete when it ends.
pub(crate) fn purge_ops(client_id: &str) -> Vec<StateOp> {
    let mut ops: Vec<StateOp> = [Tag::Subscription, Tag::Queued, Tag::Released, Tag::Qos2]
        .into_iter()
        .map(|t| StateOp::DeletePrefix {
            prefix: meta::client_prefix(t, client_id),
        })
        .collect();
    ops.push(StateOp::Delete {
        key: meta::session_key(client_id),
    });
    ops
}

/// A session as the admin API lists it.
#[derive(Debug, Clone)]
pub struct SessionInfo {
    /// Client id.
    pub client_id: String,
    /// A connection holds it.
    pub connected: bool,
    /// It has durable state (session expiry > 0).
    pub persistent: bool,
    /// Session Expiry Interval in seconds (`u32::MAX`: never).
    pub expiry: u32,
    /// When its client disconnected (ms since the epoch), while disconnected.
    pub disconnected_at_ms: Option<u64>,
    /// The connected client's authenticated name (from its TLS certificate), if any.
    pub username: Option<Arc<str>>,
    /// Its delivery side.
    pub sub: Option<Arc<Subscriber>>,
}

/// What a new connection finds when it attaches to a client id.
pub struct Attachment {
    /// This connection's id in the store.
    pub conn: u64,
    /// The session it continues, if any.
    pub previous: Option<SessionData>,
    /// A session under this client id that had expired: its state is to be discarded.
    pub expired: Option<SessionData>,
}

impl SessionStore {
    /// Loads the durable sessions; returns the store and the state changes that discard what
    /// expired while the edge was down.
    pub fn load(
        log: &Log,
        hub: &Hub,
        now_ms: u64,
    ) -> Result<(SessionStore, Vec<StateOp>), LogError> {
        let mut sessions: HashMap<String, Entry> = HashMap::new();
        let mut purge = Vec::new();
        // Clients whose session record does not decode: left out, and their other entries
        // are kept (not purged as orphans), for `edge check` to show.
        let mut corrupt: HashSet<String> = HashSet::new();
        for (k, v) in log.meta_scan(&Tag::Session.prefix())? {
            let client = String::from_utf8_lossy(k.get(1..).unwrap_or_default()).into_owned();
            let Some((expiry, disconnected, owner)) = parse_session_value(&v) else {
                log.quarantine_meta(&k, "session");
                corrupt.insert(client);
                continue;
            };
            // A session connected at the crash counts as disconnected now.
            let since = if disconnected == 0 {
                now_ms
            } else {
                disconnected
            };
            let expired = expiry == 0
                || (expiry != u32::MAX && now_ms.saturating_sub(since) > u64::from(expiry) * 1000);
            if expired {
                purge.extend(purge_ops(&client));
                continue;
            }
            let sub = Subscriber::new(Arc::from(client.as_str()), true);
            sessions.insert(
                client,
                Entry {
                    data: SessionData {
                        expiry,
                        qos2: HashSet::new(),
                        durable: true,
                        sub: Some(sub),
                        owner,
                    },
                    attached: None,
                    disconnected_at_ms: since,
                    last_conn: 0,
                },
            );
        }
        // Subscriptions and queue entries of sessions that no longer exist are deleted.
        for (k, v) in log.meta_scan(&Tag::Subscription.prefix())? {
            let Some((client, filter)) = meta::parse_subscription_key(&k) else {
                log.quarantine_meta(&k, "subscription key");
                continue;
            };
            let Some(opts) = parse_subscription_value(&v) else {
                log.quarantine_meta(&k, "subscription");
                continue;
            };
            match sessions.get(client).and_then(|e| e.data.sub.as_ref()) {
                Some(sub) => {
                    hub.subscribe(sub, filter, opts);
                }
                None if corrupt.contains(client) => {}
                None => purge.push(StateOp::Delete { key: k.clone() }),
            }
        }
        for tag in [Tag::Queued, Tag::Released] {
            for (k, _) in log.meta_scan(&tag.prefix())? {
                let Some((_, client, seq)) = meta::parse_queue_key(&k) else {
                    log.quarantine_meta(&k, "queue key");
                    continue;
                };
                hub.boot_seq.fetch_max(seq, Ordering::Relaxed);
                match sessions.get(client).and_then(|e| e.data.sub.as_ref()) {
                    Some(sub) => {
                        sub.offline_queued.fetch_add(1, Ordering::Relaxed);
                    }
                    None if corrupt.contains(client) => {}
                    None => purge.push(StateOp::Delete { key: k.clone() }),
                }
            }
        }
        for (k, _) in log.meta_scan(&Tag::Qos2.prefix())? {
            let Some((client, pkid)) = parse_qos2_key(&k) else {
                log.quarantine_meta(&k, "qos2 marker");
                continue;
            };
            let client = client.to_string();
            match sessions.get_mut(&client) {
                Some(e) => {
                    e.data.qos2.insert(pkid);
                }
                None if corrupt.contains(&client) => {}
                None => purge.push(StateOp::Delete { key: k }),
            }
        }
        Ok((
            SessionStore {
                inner: Mutex::new(sessions),
                next_conn: AtomicU64::new(1),
            },
            purge,
        ))
    }

    /// Takes the client id for a new connection, first asking a connection that holds it to
    /// end and waiting until it has (its pending appends committed and its state handed back).
    pub async fn attach(
        &self,
        client_id: &str,
        username: Option<Arc<str>>,
        handover: Arc<Handover>,
    ) -> Attachment {
        let conn = self.next_conn.fetch_add(1, Ordering::Relaxed);
        loop {
            let wait = {
                let mut map = self.inner.lock().expect("session lock");
                match map.get_mut(client_id) {
                    Some(Entry {
                        attached: Some(a), ..
                    }) => {
                        a.handover.take_over();
                        Some((a.conn, a.handover.clone()))
                    }
                    Some(entry) => {
                        // An entry the periodic sweep has not removed yet may have expired:
                        // the new connection then starts afresh and the caller discards
                        // the old state.
                        let expired = entry.data.expiry != u32::MAX
                            && entry.data.expiry != 0
                            && now_ms().saturating_sub(entry.disconnected_at_ms)
                                > u64::from(entry.data.expiry) * 1000;
                        entry.last_conn = conn;
                        entry.attached = Some(Attached {
                            conn,
                            username: username.clone(),
                            handover: handover.clone(),
                        });
                        if expired {
                            entry.disconnected_at_ms = 0;
                            return Attachment {
                                conn,
                                previous: None,
                                expired: Some(std::mem::take(&mut entry.data)),
                            };
                        }
                        return Attachment {
                            conn,
                            previous: Some(entry.data.clone()),
                            expired: None,
                        };
                    }
                    None => {
                        map.insert(
                            client_id.to_string(),
                            Entry {
                                data: SessionData::default(),
                                attached: Some(Attached {
                                    conn,
                                    username: username.clone(),
                                    handover: handover.clone(),
                                }),
                                disconnected_at_ms: 0,
                                last_conn: conn,
                            },
                        );
                        return Attachment {
                            conn,
                            previous: None,
                            expired: None,
                        };
                    }
                }
            };
            if let Some((old, held)) = wait {
                // The old connection ends promptly once told; the timeout only guards against
                // a connection stuck writing to a peer that stopped reading. Its state then
                // stays as last handed back.
                let _ = tokio::time::timeout(Duration::from_secs(10), held.ended()).await;
                let mut map = self.inner.lock().expect("session lock");
                if let Some(entry) = map.get_mut(client_id) {
                    if entry.attached.as_ref().is_some_and(|a| a.conn == old) {
                        entry.attached = None;
                    }
                }
            }
        }
    }

    /// Records the state a connection leaves behind. Returns the state changes to commit
    /// (the disconnect time of a durable session, or the removal of a session that ended)
    /// and, when the session ended, its subscriber (to remove its subscriptions).
    pub fn detach(
        &self,
        client_id: &str,
        conn: u64,
        data: SessionData,
        now_ms: u64,
    ) -> (Vec<StateOp>, Option<Arc<Subscriber>>) {
        let mut map = self.inner.lock().expect("session lock");
        let Some(entry) = map.get_mut(client_id) else {
            return (Vec::new(), None);
        };
        if entry.attached.as_ref().is_none_or(|a| a.conn != conn) {
            return (Vec::new(), None);
        }
        entry.attached = None;
        // Expiry 0: the session ends with its network connection, also when a new
        // connection took the client id over (MQTT 5 3.1.2.11.2): the newcomer starts afresh.
        if data.expiry == 0 {
            let durable = data.durable;
            map.remove(client_id);
            let ops = if durable {
                purge_ops(client_id)
            } else {
                Vec::new()
            };
            return (ops, data.sub);
        }
        let durable = data.durable;
        let expiry = data.expiry;
        let op = session_put_op(client_id, expiry, now_ms, data.owner.as_deref());
        entry.data = data;
        entry.disconnected_at_ms = now_ms;
        if durable {
            (vec![op], None)
        } else {
            (Vec::new(), None)
        }
    }

    /// Ends disconnected sessions whose expiry has passed; returns the state to delete and
    /// their subscribers.
    pub fn expire(&self, now_ms: u64) -> (Vec<StateOp>, Vec<Arc<Subscriber>>) {
        let mut map = self.inner.lock().expect("session lock");
        let mut ops = Vec::new();
        let mut ended = Vec::new();
        map.retain(|client, e| {
            let expired = e.attached.is_none()
                && e.data.expiry != u32::MAX
                && now_ms.saturating_sub(e.disconnected_at_ms) > u64::from(e.data.expiry) * 1000;
            if expired {
                if e.data.durable {
                    ops.extend(purge_ops(client));
                }
                ended.extend(e.data.sub.take());
            }
            !expired
        });
        (ops, ended)
    }

    /// Whether the will of connection `conn` is still due: its session has not been taken
    /// by a later connection (it may have ended).
    pub fn will_due(&self, client_id: &str, conn: u64) -> bool {
        let map = self.inner.lock().expect("session lock");
        match map.get(client_id) {
            None => true,
            Some(e) => e.attached.is_none() && e.last_conn == conn,
        }
    }

    /// Records the delivery side of the session connection `conn` holds, so it can be
    /// listed while the connection runs.
    pub fn set_subscriber(
        &self,
        client_id: &str,
        conn: u64,
        sub: Arc<Subscriber>,
        expiry: u32,
        owner: Option<Arc<str>>,
    ) {
        let mut map = self.inner.lock().expect("session lock");
        if let Some(e) = map.get_mut(client_id) {
            if e.attached.as_ref().is_some_and(|a| a.conn == conn) {
                e.data.sub = Some(sub);
                e.data.durable = expiry > 0;
                e.data.expiry = expiry;
                e.data.owner = owner;
            }
        }
    }

    /// Who may take up the session of `client_id`: `None` when there is no persistent one
    /// (anyone may start it; a session with expiry 0 ends when a new connection takes the
    /// client id, so it hands nothing over), `Some(None)` when an anonymous client started
    /// it (anyone may), `Some(user)` when a user did (that user only).
    pub fn owner_of(&self, client_id: &str) -> Option<Option<Arc<str>>> {
        let map = self.inner.lock().expect("session lock");
        map.get(client_id)
            .filter(|e| e.data.expiry > 0)
            .map(|e| e.data.owner.clone())
    }

    /// Every session, by client id.
    pub fn list(&self) -> Vec<SessionInfo> {
        let map = self.inner.lock().expect("session lock");
        let mut out: Vec<SessionInfo> = map
            .iter()
            .map(|(client, e)| SessionInfo {
                client_id: client.clone(),
                connected: e.attached.is_some(),
                persistent: e.data.durable,
                expiry: e.data.expiry,
                disconnected_at_ms: (e.attached.is_none()).then_some(e.disconnected_at_ms),
                username: e.attached.as_ref().and_then(|a| a.username.clone()),
                sub: e.data.sub.clone(),
            })
            .collect();
        out.sort_by(|a, b| a.client_id.cmp(&b.client_id));
        out
    }

    /// Connected clients and disconnected persistent sessions.
    /// Sessions held (connected or not), and whether `client_id` holds one of them.
    pub fn held(&self, client_id: &str) -> (usize, bool) {
        let map = self.inner.lock().expect("session lock");
        (map.len(), map.contains_key(client_id))
    }

    /// Sessions with a connection attached, and sessions without one.
    pub fn counts(&self) -> (usize, usize) {
        let map = self.inner.lock().expect("session lock");
        let connected = map.values().filter(|e| e.attached.is_some()).count();
        (connected, map.len() - connected)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_values_round_trip_with_and_without_an_owner() {
        let v = meta::session_value(60, 1234, Some("alice"));
        let (e, d, o) = parse_session_value(&v).unwrap();
        assert_eq!((e, d, o.as_deref()), (60, 1234, Some("alice")));
        // Without an owner: the format byte and 12 bytes.
        let plain = meta::session_value(7, 8, None);
        assert_eq!(plain.len(), 13);
        assert_eq!(parse_session_value(&plain), Some((7, 8, None)));
        let long = "u".repeat(70_000);
        assert_eq!(
            parse_session_value(&meta::session_value(1, 2, Some(&long))),
            Some((1, 2, None))
        );
        for bad in [&v[..12], &v[..14], &v[..v.len() - 1], &v[1..]] {
            assert_eq!(parse_session_value(bad), None, "{bad:?}");
        }
    }

    use crate::log::meta::qos2_key;

    fn qos2_prefix(client_id: &str) -> Vec<u8> {
        meta::client_prefix(Tag::Qos2, client_id)
    }

    #[test]
    fn qos2_keys_round_trip_and_malformed_ones_do_not_decode() {
        assert_eq!(
            parse_qos2_key(&qos2_key("dev-1", 513)),
            Some(("dev-1", 513))
        );
        let k = qos2_key("dev-1", 7);
        assert_eq!(parse_qos2_key(&k[..k.len() - 1]), None);
        assert_eq!(parse_qos2_key(b"q"), None);
    }

    #[test]
    fn qos2_keys_of_one_client_share_its_prefix_only() {
        assert!(qos2_key("ab", 7).starts_with(&qos2_prefix("ab")));
        // "a" must not be a prefix match for "ab": the length is part of the prefix.
        assert!(!qos2_key("ab", 7).starts_with(&qos2_prefix("a")));
    }

    #[tokio::test]
    async fn second_attach_takes_over_and_gets_state() {
        let store = SessionStore {
            inner: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
        };
        let h1 = Arc::new(Handover::default());
        let a1 = store.attach("dev", None, h1.clone()).await;
        assert!(a1.previous.is_none());
        let store = std::sync::Arc::new(store);
        let s2 = store.clone();
        let second =
            tokio::spawn(
                async move { s2.attach("dev", None, Arc::new(Handover::default())).await },
            );
        h1.taken_over().await;
        let mut data = SessionData {
            expiry: 60,
            ..Default::default()
        };
        data.qos2.insert(5);
        let (ops, ended) = store.detach("dev", a1.conn, data, now_ms());
        assert!(ops.is_empty(), "not durable, nothing to write");
        assert!(ended.is_none());
        h1.end();
        let a2 = second.await.unwrap();
        let prev = a2.previous.expect("session continues");
        assert!(prev.qos2.contains(&5));
    }

    #[tokio::test]
    async fn a_session_with_expiry_0_ends_when_taken_over() {
        let store = std::sync::Arc::new(SessionStore {
            inner: Mutex::new(HashMap::new()),
            next_conn: AtomicU64::new(1),
        });
        let h1 = Arc::new(Handover::default());
        let a1 = store.attach("dev", None, h1.clone()).await;
        let s2 = store.clone();
        let second =
            tokio::spawn(
                async move { s2.attach("dev", None, Arc::new(Handover::default())).await },
            );
        h1.taken_over().await;
        let mut data = SessionData::default();
        data.qos2.insert(5);
        let (_, ended) = store.detach("dev", a1.conn, data, now_ms());
        assert!(ended.is_none(), "it had no subscriber");
        h1.end();
        let a2 = second.await.unwrap();
        assert!(
            a2.previous.is_none(),
            "the session ended with its connection"
        );
    }
}
