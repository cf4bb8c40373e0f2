//! Wills waiting out their MQTT 5 Will Delay Interval.
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

use tokio::sync::Notify;

use super::codec::WillIn;

/// One delayed will: which connection left it, its size, and how to cancel its wait.
struct Pending {
    conn: u64,
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
    /// Takes a place for the will of `client_id` left by connection `conn`, if the limits
    /// allow. A will already waiting for the same client id (from an earlier connection) is
    /// cancelled first: only the newest can be due.
    pub fn admit(
        &self,
        client_id: &Arc<str>,
        conn: u64,
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
    /// published, and its memory goes now.
    pub fn cancel(&self, client_id: &str) {
        let mut inner = self.inner.lock().expect("pending wills lock");
        if let Some(p) = inner.by_client.remove(client_id) {
            inner.bytes -= p.bytes;
            p.cancel.notify_one();
            self.cancelled.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Wills waiting, and the bytes they hold.
    pub fn held(&self) -> (usize, usize) {
        let inner = self.inner.lock().expect("pending wills lock");
        (inner.by_client.len(), inner.bytes)
    }
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
            w.admit(&id("a"), 1, 10, 2, 1000),
            Admission::Wait(_)
        ));
        assert!(matches!(
            w.admit(&id("b"), 2, 10, 2, 1000),
            Admission::Wait(_)
        ));
        assert!(matches!(
            w.admit(&id("c"), 3, 10, 2, 1000),
            Admission::PublishNow
        ));
        assert_eq!(w.published_early.load(Ordering::Relaxed), 1);
        assert_eq!(w.held(), (2, 20));
    }

    #[test]
    fn byte_limit_publishes_the_will_that_does_not_fit() {
        let w = PendingWills::default();
        assert!(matches!(
            w.admit(&id("a"), 1, 600, 10, 1000),
            Admission::Wait(_)
        ));
        assert!(matches!(
            w.admit(&id("b"), 2, 401, 10, 1000),
            Admission::PublishNow
        ));
        assert!(matches!(
            w.admit(&id("b"), 2, 400, 10, 1000),
            Admission::Wait(_)
        ));
        assert_eq!(w.held(), (2, 1000));
    }

    #[tokio::test]
    async fn a_new_connection_cancels_the_waiting_will_and_frees_its_place() {
        let w = PendingWills::default();
        let Admission::Wait(cancel) = w.admit(&id("a"), 1, 100, 10, 1000) else {
            panic!("room for one")
        };
        w.cancel("a");
        // notify_one stores a permit: the waiter sees it even though it starts waiting now.
        tokio::time::timeout(std::time::Duration::from_secs(10), cancel.notified())
            .await
            .expect("the waiting will is woken");
        assert_eq!(w.held(), (0, 0));
        assert_eq!(w.cancelled.load(Ordering::Relaxed), 1);
    }

    #[test]
    fn release_only_frees_the_place_of_the_same_connection() {
        let w = PendingWills::default();
        let _ = w.admit(&id("a"), 1, 100, 10, 1000);
        let _ = w.admit(&id("a"), 2, 50, 10, 1000);
        w.release("a", 1);
        assert_eq!(w.held(), (1, 50), "the newer will keeps its place");
        w.release("a", 2);
        assert_eq!(w.held(), (0, 0));
    }
}
