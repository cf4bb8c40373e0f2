//! Per-device bookkeeping that ties rumqttc's packet ids back to sequence numbers.
//!
//! rumqttc reports only packet ids: "PUBLISH with id 7 written", "PUBACK for id 7". The ledger
//! knows the order in which the device handed messages to the client, and rumqttc writes new
//! publishes in that order, so the n-th "written" event for a new publish is the n-th queued
//! message. After a connection loss rumqttc first resends its pending list (publishes that
//! already have an id, then those it took from the request channel without an id); the ledger
//! takes a copy of that list's ids at the loss and uses it to tell resends from new messages.

use std::collections::{HashMap, VecDeque};

use crate::ranges::SeqRanges;

/// A message handed to the client: sequence number and creation time (Unix µs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Queued {
    /// Sequence number.
    pub seq: u64,
    /// Creation time in Unix microseconds.
    pub created_us: u64,
}

/// What an event meant, for the caller's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A new message went out.
    Sent,
    /// A message went out again after a reconnect.
    Resent,
    /// The broker acknowledged a message after this many microseconds.
    Acked {
        /// Publish-to-ack latency.
        latency_us: u64,
    },
    /// The broker refused a message.
    Refused,
    /// Held back by rumqttc until its packet id is free.
    Deferred,
    /// Nothing to count.
    Nothing,
    /// An event the ledger cannot match to a message (counted as an error).
    Unmatched,
}

/// The bookkeeping of one device.
#[derive(Debug, Default)]
pub struct Ledger {
    qos: u8,
    next_seq: u64,
    queued: VecDeque<Queued>,
    inflight: HashMap<u16, Queued>,
    deferred: Option<(u16, Queued)>,
    awaiting_completion: Vec<u16>,
    pending_at_loss: Vec<u16>,
    replay: VecDeque<u16>,
    sent: SeqRanges,
    acked: SeqRanges,
    refused: SeqRanges,
}

impl Ledger {
    /// A ledger for a device publishing with `qos`.
    pub fn new(qos: u8) -> Self {
        Ledger {
            qos,
            ..Ledger::default()
        }
    }

    /// Sequence number the next message gets.
    pub fn next_seq(&self) -> u64 {
        self.next_seq
    }

    /// Messages handed to the client and not yet written.
    pub fn queued_len(&self) -> usize {
        self.queued.len()
    }

    /// Records that the message `next_seq()` was handed to the client.
    pub fn queue(&mut self, created_us: u64) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.queued.push_back(Queued { seq, created_us });
        seq
    }

    /// Whether nothing is waiting to be written, acknowledged or completed.
    pub fn is_settled(&self) -> bool {
        self.queued.is_empty()
            && self.inflight.is_empty()
            && self.deferred.is_none()
            && self.awaiting_completion.is_empty()
            && self.replay.is_empty()
    }

    /// The connection broke; `pending_ids` are the ids of rumqttc's pending publishes in the
    /// order it will resend them (0 for those that never got an id).
    pub fn connection_lost(&mut self, pending_ids: Vec<u16>) {
        self.pending_at_loss = pending_ids;
        self.replay.clear();
    }

    /// CONNACK arrived. Returns how many queued messages rumqttc dropped unsent.
    pub fn connected(&mut self, session_present: bool) -> u64 {
        let pending = std::mem::take(&mut self.pending_at_loss);
        if session_present {
            self.replay = pending.into();
            return 0;
        }
        // rumqttc empties its pending list when the broker has no session: messages in it with
        // an id were written before and stay unacknowledged; those without were never written.
        let mut dropped = 0;
        for id in pending {
            if id == 0 && self.queued.pop_front().is_some() {
                dropped += 1;
            }
        }
        self.inflight.clear();
        self.awaiting_completion.clear();
        self.replay.clear();
        dropped
    }

    /// A PUBLISH with `pkid` was written.
    pub fn written(&mut self, pkid: u16) -> Outcome {
        if let Some((deferred_id, message)) = self.deferred {
            if deferred_id == pkid && self.replay.front() != Some(&pkid) {
                self.deferred = None;
                self.sent.insert(message.seq);
                self.inflight.insert(pkid, message);
                return Outcome::Sent;
            }
        }
        if let Some(front) = self.replay.pop_front() {
            if front != 0 {
                return if front == pkid {
                    Outcome::Resent
                } else {
                    Outcome::Unmatched
                };
            }
        }
        let Some(message) = self.queued.pop_front() else {
            return Outcome::Unmatched;
        };
        self.sent.insert(message.seq);
        if self.qos > 0 {
            self.inflight.insert(pkid, message);
        }
        Outcome::Sent
    }

    /// rumqttc held a new PUBLISH back because `pkid` is still in flight.
    pub fn deferred(&mut self, pkid: u16) -> Outcome {
        match self.queued.pop_front() {
            Some(message) => {
                self.deferred = Some((pkid, message));
                Outcome::Deferred
            }
            None => Outcome::Unmatched,
        }
    }

    /// PUBACK or PUBREC for `pkid` arrived at `now_us`.
    pub fn acked(&mut self, pkid: u16, refused: bool, now_us: u64) -> Outcome {
        let Some(message) = self.inflight.remove(&pkid) else {
            return Outcome::Unmatched;
        };
        if refused {
            self.refused.insert(message.seq);
            return Outcome::Refused;
        }
        self.acked.insert(message.seq);
        if self.qos == 2 {
            self.awaiting_completion.push(pkid);
        }
        Outcome::Acked {
            latency_us: now_us.saturating_sub(message.created_us),
        }
    }

    /// PUBCOMP for `pkid` arrived.
    pub fn completed(&mut self, pkid: u16) {
        self.awaiting_completion.retain(|&id| id != pkid);
    }

    /// The sets for the manifest: sent, acknowledged, refused.
    pub fn into_sets(self) -> (SeqRanges, SeqRanges, SeqRanges) {
        (self.sent, self.acked, self.refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acked_latency(outcome: Outcome) -> u64 {
        match outcome {
            Outcome::Acked { latency_us } => latency_us,
            other => panic!("expected an ack, got {other:?}"),
        }
    }

    #[test]
    fn acks_map_back_to_sequence_numbers_in_write_order() {
        let mut ledger = Ledger::new(1);
        ledger.queue(100);
        ledger.queue(200);
        assert_eq!(ledger.written(1), Outcome::Sent);
        assert_eq!(ledger.written(2), Outcome::Sent);
        assert_eq!(acked_latency(ledger.acked(2, false, 250)), 50);
        assert_eq!(acked_latency(ledger.acked(1, false, 300)), 200);
        assert!(ledger.is_settled());
        let (sent, acked, _) = ledger.into_sets();
        assert_eq!(sent.ranges(), &[(0, 1)]);
        assert_eq!(acked.ranges(), &[(0, 1)]);
    }

    #[test]
    fn qos0_messages_are_sent_but_never_in_flight() {
        let mut ledger = Ledger::new(0);
        ledger.queue(1);
        assert_eq!(ledger.written(0), Outcome::Sent);
        assert!(ledger.is_settled());
        assert_eq!(ledger.acked(0, false, 5), Outcome::Unmatched);
    }

    #[test]
    fn clean_reconnect_drops_unsent_and_forgets_unacked() {
        let mut ledger = Ledger::new(1);
        ledger.queue(1);
        ledger.queue(2);
        ledger.queue(3);
        ledger.written(1);
        // Loss: id 1 unacked, seq 1 and 2 were still in the request channel.
        ledger.connection_lost(vec![1, 0, 0]);
        assert_eq!(ledger.connected(false), 2);
        assert!(ledger.is_settled());
        ledger.queue(4);
        assert_eq!(ledger.written(1), Outcome::Sent);
        assert!(matches!(ledger.acked(1, false, 10), Outcome::Acked { .. }));
        let (sent, acked, _) = ledger.into_sets();
        assert_eq!(sent.ranges(), &[(0, 0), (3, 3)]);
        assert_eq!(acked.ranges(), &[(3, 3)]);
    }

    #[test]
    fn resumed_session_resends_then_sends_new_messages() {
        let mut ledger = Ledger::new(1);
        for t in 0..3 {
            ledger.queue(t);
        }
        ledger.written(1);
        ledger.written(2);
        ledger.connection_lost(vec![1, 2, 0]);
        assert_eq!(ledger.connected(true), 0);
        assert_eq!(ledger.written(1), Outcome::Resent);
        assert_eq!(ledger.written(2), Outcome::Resent);
        assert_eq!(ledger.written(3), Outcome::Sent, "seq 2 gets a new id");
        for id in 1..=3 {
            assert!(matches!(ledger.acked(id, false, 10), Outcome::Acked { .. }));
        }
        assert!(ledger.is_settled());
        let (sent, acked, _) = ledger.into_sets();
        assert_eq!(sent.ranges(), &[(0, 2)]);
        assert_eq!(acked.ranges(), &[(0, 2)]);
    }

    #[test]
    fn deferred_publish_is_matched_when_written() {
        let mut ledger = Ledger::new(1);
        ledger.queue(0);
        ledger.queue(0);
        ledger.written(1);
        assert_eq!(ledger.deferred(1), Outcome::Deferred);
        assert!(matches!(ledger.acked(1, false, 1), Outcome::Acked { .. }));
        assert_eq!(ledger.written(1), Outcome::Sent);
        assert!(matches!(ledger.acked(1, false, 2), Outcome::Acked { .. }));
        let (_, acked, _) = ledger.into_sets();
        assert_eq!(acked.ranges(), &[(0, 1)]);
    }

    #[test]
    fn refused_messages_are_not_acknowledged() {
        let mut ledger = Ledger::new(1);
        ledger.queue(0);
        ledger.written(1);
        assert_eq!(ledger.acked(1, true, 1), Outcome::Refused);
        let (sent, acked, refused) = ledger.into_sets();
        assert_eq!(sent.len(), 1);
        assert!(acked.is_empty());
        assert_eq!(refused.ranges(), &[(0, 0)]);
    }

    #[test]
    fn qos2_waits_for_completion() {
        let mut ledger = Ledger::new(2);
        ledger.queue(0);
        ledger.written(1);
        ledger.acked(1, false, 1);
        assert!(!ledger.is_settled());
        ledger.completed(1);
        assert!(ledger.is_settled());
    }

    #[test]
    fn unknown_ack_is_unmatched() {
        let mut ledger = Ledger::new(1);
        assert_eq!(ledger.acked(9, false, 1), Outcome::Unmatched);
        assert_eq!(ledger.written(3), Outcome::Unmatched);
    }
}
