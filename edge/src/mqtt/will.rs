//! Wills: stored with their connection, and held while they wait out their MQTT 5 Will
//! Delay Interval.
//!
//! # Durable wills
//!
//! MQTT 5 counts the will as session state, so it outlives the edge process. A CONNECT with
//! a will stores it under `w | client str16 | will_id u64` (value in [`crate::log::meta`]:
//! when its connection ended, its delay, the user, and the will as a one-record batch), in the
//! commit that precedes the CONNACK. `will_id` comes from a node-wide counter that starts past
//! every stored id, so each connection's will has a key of its own and deleting one will never
//! deletes a newer one of the same client id. The entry is rewritten with the time its
//! connection ended when the will starts waiting out its delay, and deleted when it can no
//! longer be due: after a normal DISCONNECT (before the edge closes the socket), in the very
//! commit that logs it when it is published, when a new connection takes its session up (in
//! that connection's CONNACK commit) or when its client's session was taken over.
//!
//! # Recovery
//!
//! At start every stored will is due: one whose connection was open when the edge stopped
//! (kill -9, power cut, a connection that had not ended within the shutdown grace) counts its
//! delay from the newest group commit that survived (the last moment the edge is known to have
//! been up), one already waiting from when its connection ended. Wills whose delay is over are
//! published before the edge accepts connections; the others wait as they did before, and a
//! client that takes its session up in time cancels its will. A will is published and deleted
//! in one commit, so it is published at most once; a crash before that commit publishes it at
//! the next start. If a client id has several stored wills (a crash between a reconnect and
//! the deletion of the older will), only the newest is kept. A will that does not decode is
//! left out, counted and logged once (`edge check` lists it).
//!
//! # Waiting wills
//!
//! A client chooses the delay (up to 136 years) and can connect, set a large will, and drop
//! the socket as often as it likes under new client ids: each delayed will is held in memory
//! until it is due. So they are bounded node-wide in count (`mqtt.max_pending_wills`) and in
//! bytes (`mqtt.max_pending_will_bytes`), and each delay is capped by `mqtt.max_will_delay`.
//! A will that finds no room is published at once rather than dropped: the client did go
//! away, and its will says so; publishing early is counted. A will whose session is taken up
//! again by a new connection is cancelled at that moment, and its memory freed.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::Notify;

use super::codec::{QoS, WillIn};
use super::delivery::Message;
use crate::log::appender::StateOp;
use crate::log::meta::{self, StoredWill, Tag};
use crate::log::{Log, LogError};

/// One delayed will: which connection left it, its stored entry, its size, and how to
/// cancel its wait.
struct Pending {
    conn: u64,
    will_id: Option<u64>,
    bytes: usize,
    cancel: Arc<Notify>,
}

#[derive(Default)]
struct Inner {
    by_client: HashMap<Arc<str>, Pending>,
    bytes: usize,
}

/// The node's delayed wills.
#[derive(Default)]
pub struct PendingWills {
    inner: Mutex<Inner>,
    /// The next stored will's id.
    next_id: AtomicU64,
    /// Wills published before their delay because the pending-will limits were reached.
    pub published_early: AtomicU64,
    /// Delayed wills cancelled because their session was taken up again.
    pub cancelled: AtomicU64,
}

/// What to do with a will whose delay is not zero.
pub enum Admission {
    /// Wait, until the delay ends or the notify fires (a new connection took the session).
    Wait(Arc<Notify>),
    /// No room: publish it now.
    PublishNow,
}

/// Bytes a will holds while it waits: what the client controls, plus a fixed overhead.
pub(crate) fn will_bytes(will: &WillIn) -> usize {
    let props = &will.props;
    will.topic.len()
        + will.payload.len()
        + props.content_type.as_ref().map_or(0, String::len)
        + props.response_topic.as_ref().map_or(0, String::len)
        + props.correlation_data.as_ref().map_or(0, |c| c.len())
        + props
            .user_properties
            .iter()
            .map(|(k, v)| k.len() + v.len() + 48)
            .sum::<usize>()
        + 256
}

impl PendingWills {
    /// No will waiting; stored wills get ids above `max_stored_id`.
    pub fn new(max_stored_id: u64) -> PendingWills {
        PendingWills {
            next_id: AtomicU64::new(max_stored_id.saturating_add(1)),
            ..Default::default()
        }
    }

    /// An id for a will to store: above every id stored or given out before.
    pub fn next_will_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// Takes a place for the will of `client_id` left by connection `conn` (stored as
    /// `will_id`), if the limits allow. A will already waiting for the same client id (from
    /// an earlier connection) is cancelled first: only the newest can be due.
    pub fn admit(
        &self,
        client_id: &Arc<str>,
        conn: u64,
        will_id: Option<u64>,
        bytes: usize,
        max_count: usize,
        max_bytes: u64,
    ) -> Admission {
        let mut inner = self.inner.lock().expect("pending wills lock");
        if let Some(old) = inner.by_client.remove(client_id) {
            inner.bytes -= old.bytes;
            old.cancel.notify_one();
        }
        if inner.by_client.len() >= max_count || (inner.bytes + bytes) as u64 > max_bytes {
            self.published_early.fetch_add(1, Ordering::Relaxed);
            return Admission::PublishNow;
        }
        let cancel = Arc::new(Notify::new());
        inner.bytes += bytes;
        inner.by_client.insert(
            client_id.clone(),
            Pending {
                conn,
                will_id,
                bytes,
                cancel: cancel.clone(),
            },
        );
        Admission::Wait(cancel)
    }

    /// Gives back the place of connection `conn`'s will (once it was published or dropped).
    pub fn release(&self, client_id: &str, conn: u64) {
        let mut inner = self.inner.lock().expect("pending wills lock");
        if inner
            .by_client
            .get(client_id)
            .is_some_and(|p| p.conn == conn)
        {
            if let Some(p) = inner.by_client.remove(client_id) {
                inner.bytes -= p.bytes;
            }
        }
    }

    /// A new connection took the session of `client_id`: its delayed will, if any, is not
    /// published, and its memory goes now. Returns the cancelled will's stored id, to delete.
    pub fn cancel(&self, client_id: &str) -> Option<u64> {
        let mut inner = self.inner.lock().expect("pending wills lock");
        let p = inner.by_client.remove(client_id)?;
        inner.bytes -= p.bytes;
        p.cancel.notify_one();
        self.cancelled.fetch_add(1, Ordering::Relaxed);
        p.will_id
    }

    /// Wills waiting, and the bytes they hold.
    pub fn held(&self) -> (usize, usize) {
        let inner = self.inner.lock().expect("pending wills lock");
        (inner.by_client.len(), inner.bytes)
    }
}

/// The delay a will waits once its connection has ended: its Will Delay Interval, at most
/// the session expiry (the session ends then, and the will with it) and `max`.
pub(crate) fn effective_delay(will_delay: u32, session_expiry: u32, max: Duration) -> u32 {
    let max = u32::try_from(max.as_secs()).unwrap_or(u32::MAX);
    will_delay.min(session_expiry).min(max)
}

/// The will as a one-record batch, the form it is stored in; `Err` names the field that does
/// not fit the record encoding.
pub(crate) fn encode_batch(client_id: &str, will: &WillIn, now_ms: u64) -> Result<Bytes, String> {
    let value = Message::encode_parts(
        &will.topic,
        &will.payload,
        will.qos as u8,
        will.retain,
        client_id,
        &will.props,
        now_ms,
    )
    .map_err(|e| e.to_string())?;
    // `encode_parts` writes a meta value: the format byte, then the batch.
    meta::value_body(&value)
        .map(Bytes::copy_from_slice)
        .ok_or_else(|| "the encoded will has no format byte".to_string())
}

/// Stores (or rewrites) the will `will_id` of `client_id`; `None` when the user name is
/// longer than a stored will holds.
pub(crate) fn put_op(client_id: &str, will_id: u64, will: &StoredWill<'_>) -> Option<StateOp> {
    Some(StateOp::Put {
        key: meta::will_key(client_id, will_id),
        value: meta::will_value(will)?,
    })
}

/// Deletes the stored will `will_id` of `client_id`.
pub(crate) fn delete_op(client_id: &str, will_id: u64) -> StateOp {
    StateOp::Delete {
        key: meta::will_key(client_id, will_id),
    }
}

/// A will found stored at start: due at `due_at_ms` unless its session is taken up first.
#[derive(Debug)]
pub(crate) struct Restored {
    /// Its client id.
    pub client_id: Arc<str>,
    /// Its stored id.
    pub will_id: u64,
    /// When it is due (ms since the Unix epoch).
    pub due_at_ms: u64,
    /// The user its client logged in as (the ACL decides again before it is published).
    pub user: Option<String>,
    /// The will.
    pub will: WillIn,
}

/// What start-up found stored: the wills to restore, the entries to delete (older wills of a
/// client id that has a newer one), and the highest will id stored.
#[derive(Debug, Default)]
pub(crate) struct Loaded {
    /// Wills to restore.
    pub wills: Vec<Restored>,
    /// Older wills of the same client ids, to delete.
    pub purge: Vec<StateOp>,
    /// The highest will id stored (0: none).
    pub max_id: u64,
}

/// Loads the stored wills. `down_at_ms` is when the previous run is taken to have stopped:
/// the delay of a will whose connection was open then counts from it. Delays are capped by
/// `max_delay` as configured now.
pub(crate) fn load(log: &Log, down_at_ms: u64, max_delay: Duration) -> Result<Loaded, LogError> {
    let mut loaded = Loaded::default();
    let mut newest: HashMap<String, Restored> = HashMap::new();
    let max_secs = max_delay.as_secs();
    for (k, v) in log.meta_scan(&Tag::Will.prefix())? {
        let Some((client, will_id)) = meta::parse_will_key(&k) else {
            log.quarantine_meta(&k, "will key");
            continue;
        };
        loaded.max_id = loaded.max_id.max(will_id);
        let Some(restored) = decode(client, will_id, &v, down_at_ms, max_secs) else {
            log.quarantine_meta(&k, "will");
            continue;
        };
        match newest.get(client) {
            Some(kept) if kept.will_id > will_id => {
                loaded.purge.push(delete_op(client, will_id));
            }
            _ => {
                if let Some(older) = newest.insert(client.to_string(), restored) {
                    loaded.purge.push(delete_op(client, older.will_id));
                }
            }
        }
    }
    loaded.wills = newest.into_values().collect();
    loaded.wills.sort_by_key(|w| w.due_at_ms);
    Ok(loaded)
}

/// A stored will, decoded; `None` when it does not decode.
fn decode(
    client: &str,
    will_id: u64,
    v: &[u8],
    down_at_ms: u64,
    max_secs: u64,
) -> Option<Restored> {
    let stored = meta::parse_will_value(v)?;
    let m = Message::decode_batch(stored.batch).ok()?;
    let qos = match m.qos {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        2 => QoS::ExactlyOnce,
        _ => return None,
    };
    let since = match stored.disconnected_at_ms {
        0 => down_at_ms,
        at => at,
    };
    let delay_ms = u64::from(stored.delay_secs)
        .min(max_secs)
        .saturating_mul(1000);
    Some(Restored {
        client_id: Arc::from(client),
        will_id,
        due_at_ms: since.saturating_add(delay_ms),
        user: stored.user.map(str::to_string),
        will: WillIn {
            topic: m.topic,
            payload: m.payload,
            qos,
            retain: m.retain,
            delay: stored.delay_secs,
            props: m.props.into_inner(),
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(s: &str) -> Arc<str> {
        Arc::from(s)
    }

    #[test]
    fn count_limit_publishes_the_next_will_at_once() {
        let w = PendingWills::default();
        assert!(matches!(
            w.admit(&id("a"), 1, None, 10, 2, 1000),
            Admission::Wait(_)
        ));
        assert!(matches!(
            w.admit(&id("b"), 2, None, 10, 2, 1000),
            Admission::Wait(_)
        ));
        assert!(matches!(
            w.admit(&id("c"), 3, None, 10, 2, 1000),
            Admission::PublishNow
        ));
        assert_eq!(w.published_early.load(Ordering::Relaxed), 1);
        assert_eq!(w.held(), (2, 20));
    }

    #[test]
    fn byte_limit_publishes_the_will_that_does_not_fit() {
        let w = PendingWills::default();
        assert!(matches!(
            w.admit(&id("a"), 1, None, 600, 10, 1000),
            Admission::Wait(_)
        ));
        assert!(matches!(
            w.admit(&id("b"), 2, None, 401, 10, 1000),
            Admission::PublishNow
        ));
        assert!(matches!(
            w.admit(&id("b"), 2, None, 400, 10, 1000),
            Admission::Wait(_)
        ));
        assert_eq!(w.held(), (2, 1000));
    }

    #[tokio::test]
    async fn a_new_connection_cancels_the_waiting_will_and_frees_its_place() {
        let w = PendingWills::default();
        let Admission::Wait(cancel) = w.admit(&id("a"), 1, Some(7), 100, 10, 1000) else {
            panic!("room for one")
        };
        assert_eq!(w.cancel("a"), Some(7), "its stored entry is to be deleted");
        // notify_one stores a permit: the waiter sees it even though it starts waiting now.
        tokio::time::timeout(std::time::Duration::from_secs(10), cancel.notified())
            .await
            .expect("the waiting will is woken");
        assert_eq!(w.held(), (0, 0));
        assert_eq!(w.cancelled.load(Ordering::Relaxed), 1);
    }

    fn will(topic: &str, payload: &[u8], delay: u32) -> WillIn {
        WillIn {
            topic: Bytes::copy_from_slice(topic.as_bytes()),
            payload: Bytes::copy_from_slice(payload),
            qos: QoS::AtLeastOnce,
            retain: true,
            delay,
            props: crate::mqtt::codec::MessageProps {
                content_type: Some("text/plain".into()),
                user_properties: vec![("k".into(), "v".into())],
                ..Default::default()
            },
        }
    }

    fn store(
        log: &Log,
        client: &str,
        id: u64,
        at: u64,
        delay: u32,
        user: Option<&str>,
        w: &WillIn,
    ) {
        let batch = encode_batch(client, w, 1).unwrap();
        let stored = StoredWill {
            disconnected_at_ms: at,
            delay_secs: delay,
            user,
            batch: &batch,
        };
        log.put_raw(
            false,
            &meta::will_key(client, id),
            &meta::will_value(&stored).unwrap(),
        );
    }

    #[test]
    fn stored_wills_are_due_from_the_stop_or_their_disconnect_and_the_newest_of_a_client_wins() {
        let dir = tempfile::tempdir().unwrap();
        let log = Log::open(dir.path(), Some(&[]), None).unwrap();
        let w = will("gone/a", b"bye", 30);
        // Open when the edge stopped: due 30 s after the stop.
        store(&log, "a", 4, 0, 30, Some("alice"), &w);
        // Waiting since 5000: due at 5000 + 10 s.
        store(&log, "b", 2, 5_000, 10, None, &w);
        // An older will of "b" (a crash between a reconnect and its deletion): dropped.
        store(&log, "b", 1, 1_000, 10, None, &w);
        // A delay over today's max_will_delay is cut to it.
        store(&log, "c", 3, 0, 100_000, None, &w);
        // One that does not decode: left out and counted, its id still counts.
        log.put_raw(false, &meta::will_key("d", 9), b"\x01junk");
        let loaded = load(&log, 1_000_000, Duration::from_secs(3600)).unwrap();
        let due: Vec<(&str, u64, u64)> = loaded
            .wills
            .iter()
            .map(|r| (&*r.client_id, r.will_id, r.due_at_ms))
            .collect();
        assert_eq!(
            due,
            vec![("b", 2, 15_000), ("a", 4, 1_030_000), ("c", 3, 4_600_000)]
        );
        assert_eq!(loaded.max_id, 9);
        assert_eq!(loaded.purge.len(), 1);
        assert!(
            matches!(&loaded.purge[0], StateOp::Delete { key } if *key == meta::will_key("b", 1))
        );
        assert_eq!(log.counters.corrupt_meta.load(Ordering::Relaxed), 1);
        let a = loaded.wills.iter().find(|r| &*r.client_id == "a").unwrap();
        assert_eq!(a.user.as_deref(), Some("alice"));
        assert_eq!(
            (a.will.topic.as_ref(), a.will.payload.as_ref()),
            (&b"gone/a"[..], &b"bye"[..])
        );
        assert_eq!((a.will.qos, a.will.retain), (QoS::AtLeastOnce, true));
        assert_eq!(a.will.props, w.props);
        // Ids given out from now on are above every stored one.
        assert_eq!(PendingWills::new(loaded.max_id).next_will_id(), 10);
    }

    #[test]
    fn the_delay_is_capped_by_the_session_expiry_and_the_configured_maximum() {
        let max = Duration::from_secs(60);
        assert_eq!(effective_delay(30, 100, max), 30);
        assert_eq!(effective_delay(30, 0, max), 0);
        assert_eq!(effective_delay(30, 10, max), 10);
        assert_eq!(effective_delay(u32::MAX, u32::MAX, max), 60);
    }

    #[test]
    fn release_only_frees_the_place_of_the_same_connection() {
        let w = PendingWills::default();
        let _ = w.admit(&id("a"), 1, None, 100, 10, 1000);
        let _ = w.admit(&id("a"), 2, None, 50, 10, 1000);
        w.release("a", 1);
        assert_eq!(w.held(), (1, 50), "the newer will keeps its place");
        w.release("a", 2);
        assert_eq!(w.held(), (0, 0));
    }
}
