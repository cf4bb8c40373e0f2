//! Where the mirror's records are in Kafka, so that a consumer group's position at the edge
//! can be translated into an offset of the Kafka partition (which the group replicator then
//! commits there).
//!
//! An edge offset has no Kafka offset of its own: the mirror's transactions put records at
//! whatever offsets the Kafka partition gives them (transaction markers take offsets too). Per
//! partition, [`Translation`] keeps what the mirror knows for sure:
//! - the checkpoints `(e, k)` it committed or read at session start: every record below edge
//!   offset `e` is in Kafka, record `e - 1` at Kafka offset `k`;
//! - runs `(first_edge_offset, first_kafka_offset, count)` of its committed transactions
//!   whose records landed at consecutive Kafka offsets (checked from the delivery reports).
//!
//! A group position `g` (records below `g` are processed) translates to the Kafka offset a
//! Kafka consumer of the group should start from: the offset of record `g` itself when a run
//! covers it; otherwise `k + 1` of the greatest checkpoint with `e <= g` (the records from
//! `e` to `g - 1` are then seen again: a duplicate on failover, never a gap). A position
//! below every known checkpoint translates to nothing: there is nothing to commit yet. The
//! history is bounded, so a position far behind the mirror falls back to the oldest
//! checkpoints kept, or to nothing.

#![deny(clippy::expect_used, clippy::indexing_slicing)]

use std::collections::VecDeque;

/// How many committed transactions of a partition [`Translation`] remembers.
pub const HISTORY: usize = 1024;

/// Records of one committed transaction of one partition that landed at consecutive Kafka
/// offsets, in edge offset order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Run {
    /// Edge offset of the first record.
    pub first_edge_offset: u64,
    /// Kafka offset of the first record.
    pub first_kafka_offset: i64,
    /// Number of records; record `first_edge_offset + i` is at `first_kafka_offset + i`.
    pub count: u64,
}

impl Run {
    /// A run of a transaction that sent `count` records, from edge offset `first_edge_offset`
    /// up to (not including) `next_edge_offset`, whose delivery reports gave Kafka offsets
    /// from `min_kafka_offset` to `max_kafka_offset`, `delivered` of them. `None` unless both
    /// sides are consecutive: then, as the producer keeps a partition's records in order, the
    /// i-th record is at `min_kafka_offset + i`.
    pub fn verified(
        first_edge_offset: u64,
        next_edge_offset: u64,
        count: u64,
        min_kafka_offset: i64,
        max_kafka_offset: i64,
        delivered: u64,
    ) -> Option<Run> {
        let edge_dense = next_edge_offset.checked_sub(first_edge_offset) == Some(count);
        let kafka_span = max_kafka_offset
            .checked_sub(min_kafka_offset)
            .and_then(|d| u64::try_from(d).ok())
            .map(|d| d + 1);
        (count > 0
            && edge_dense
            && delivered == count
            && min_kafka_offset >= 0
            && kafka_span == Some(count))
        .then_some(Run {
            first_edge_offset,
            first_kafka_offset: min_kafka_offset,
            count,
        })
    }

    fn end_edge_offset(&self) -> u64 {
        self.first_edge_offset + self.count
    }
}

/// What the mirror knows of where one partition's edge records are in Kafka; see the module
/// documentation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Translation {
    /// `(next_edge_offset, last_kafka_offset)`, increasing.
    checkpoints: VecDeque<(u64, i64)>,
    /// Increasing and disjoint.
    runs: VecDeque<Run>,
}

impl Translation {
    /// Forgets everything (Kafka holds no checkpoint of the partition).
    pub fn clear(&mut self) {
        self.checkpoints.clear();
        self.runs.clear();
    }

    /// A session starts from the checkpoints `(next_edge_offset, last_kafka_offset)` read
    /// from Kafka, oldest first (the compacted topic still holds the recent ones; the last is
    /// where the mirror resumes). The history of earlier sessions stays only if the last one
    /// is the last it knows (nothing happened in between that it has not seen); otherwise the
    /// checkpoints read are all it knows.
    pub fn resume(&mut self, read: &[(u64, i64)]) {
        let Some(last) = read.last() else {
            self.clear();
            return;
        };
        if self.checkpoints.back() != Some(last) {
            self.clear();
            for &(e, k) in read
                .get(read.len().saturating_sub(HISTORY)..)
                .unwrap_or_default()
            {
                self.committed(e, k, None);
            }
        }
    }

    /// A transaction committed: every record below `next_edge_offset` is in Kafka, the last
    /// at `last_kafka_offset`; `run` says exactly where its records are, when they are
    /// consecutive.
    pub fn committed(&mut self, next_edge_offset: u64, last_kafka_offset: i64, run: Option<Run>) {
        let follows = self
            .checkpoints
            .back()
            .is_none_or(|&(e, k)| e < next_edge_offset && k < last_kafka_offset);
        if !follows {
            // Not after what is known: the earlier history cannot be trusted with it.
            self.clear();
        }
        self.checkpoints
            .push_back((next_edge_offset, last_kafka_offset));
        if self.checkpoints.len() > HISTORY {
            self.checkpoints.pop_front();
        }
        if let Some(run) = run {
            let fits = run.end_edge_offset() == next_edge_offset
                && run.first_kafka_offset + run.count as i64 - 1 == last_kafka_offset
                && self
                    .runs
                    .back()
                    .is_none_or(|r| r.end_edge_offset() <= run.first_edge_offset);
            if fits {
                self.runs.push_back(run);
                if self.runs.len() > HISTORY {
                    self.runs.pop_front();
                }
            }
        }
    }

    /// The Kafka offset a consumer of a group whose position is `next_edge_offset` starts
    /// from; `None` when no checkpoint is at or below the position.
    pub fn translate(&self, next_edge_offset: u64) -> Option<i64> {
        let g = next_edge_offset;
        let &(last_e, last_k) = self.checkpoints.back()?;
        if g >= last_e {
            return Some(last_k + 1);
        }
        let i = self.runs.partition_point(|r| r.end_edge_offset() <= g);
        if let Some(run) = self.runs.get(i).filter(|r| r.first_edge_offset <= g) {
            return Some(run.first_kafka_offset + (g - run.first_edge_offset) as i64);
        }
        let i = self.checkpoints.partition_point(|&(e, _)| e <= g);
        i.checked_sub(1)
            .and_then(|i| self.checkpoints.get(i))
            .map(|&(_, k)| k + 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(first_edge_offset: u64, first_kafka_offset: i64, count: u64) -> Option<Run> {
        Some(Run {
            first_edge_offset,
            first_kafka_offset,
            count,
        })
    }

    #[test]
    fn nothing_known_translates_to_nothing() {
        assert_eq!(Translation::default().translate(0), None);
        assert_eq!(Translation::default().translate(100), None);
    }

    #[test]
    fn checkpoint_only_gives_the_offset_after_the_greatest_checkpoint_at_or_below() {
        let mut t = Translation::default();
        t.resume(&[(100, 140)]); // read at session start
        t.committed(150, 191, None);
        t.committed(200, 242, None);
        assert_eq!(t.translate(99), None, "below every checkpoint");
        assert_eq!(t.translate(100), Some(141));
        assert_eq!(t.translate(149), Some(141), "between: from the lower one");
        assert_eq!(t.translate(150), Some(192));
        assert_eq!(t.translate(199), Some(192));
        assert_eq!(t.translate(200), Some(243));
        assert_eq!(
            t.translate(500),
            Some(243),
            "past the mirror: where the next record will go"
        );
    }

    #[test]
    fn a_run_gives_the_exact_offset_of_the_first_unprocessed_record() {
        let mut t = Translation::default();
        t.resume(&[(100, 140)]);
        // Records 100..150 at 142..192 (141 is the previous transaction's marker).
        t.committed(150, 191, run(100, 142, 50));
        assert_eq!(
            t.translate(100),
            Some(142),
            "the run says exactly where record 100 is"
        );
        assert_eq!(t.translate(101), Some(143));
        assert_eq!(t.translate(149), Some(191));
        assert_eq!(t.translate(150), Some(192));
    }

    #[test]
    fn non_consecutive_deliveries_make_no_run() {
        // 50 records but Kafka offsets 142..=192 span 51: another producer wrote in between.
        assert_eq!(Run::verified(100, 150, 50, 142, 192, 50), None);
        // Edge offsets 100..151 for 50 records: one was deleted before it was read.
        assert_eq!(Run::verified(100, 151, 50, 142, 191, 50), None);
        // A delivery report missing.
        assert_eq!(Run::verified(100, 150, 50, 142, 191, 49), None);
        // Nothing delivered (min still at its initial value).
        assert_eq!(Run::verified(100, 150, 50, i64::MAX, -1, 0), None);
        assert_eq!(Run::verified(100, 150, 50, 142, 191, 50), run(100, 142, 50));
    }

    #[test]
    fn without_a_run_a_position_falls_back_to_the_checkpoint_below() {
        let mut t = Translation::default();
        t.resume(&[(100, 140)]);
        t.committed(150, 195, Run::verified(100, 150, 50, 142, 195, 50));
        assert_eq!(t.translate(120), Some(141));
        assert_eq!(t.translate(150), Some(196));
    }

    #[test]
    fn a_run_that_does_not_match_its_checkpoint_is_not_kept() {
        let mut t = Translation::default();
        t.resume(&[(100, 140)]);
        t.committed(150, 191, run(100, 142, 49));
        assert_eq!(t.translate(120), Some(141));
    }

    #[test]
    fn never_ahead_of_an_unprocessed_record_nor_behind_the_checkpoint_below() {
        // Transactions of varying sizes, every other one with a run; Kafka offsets as a
        // transactional producer gets them (a commit marker after each transaction).
        let mut t = Translation::default();
        let mut kafka_of = Vec::new(); // Kafka offset of each edge record
        let mut checkpoints = Vec::new();
        let mut exact = Vec::new(); // edge offsets covered by a run
        let mut next_kafka = 0i64;
        let mut e = 0u64;
        for (i, size) in [3u64, 1, 7, 2, 5, 4].into_iter().enumerate() {
            let first_kafka = next_kafka;
            for _ in 0..size {
                kafka_of.push(next_kafka);
                next_kafka += 1;
            }
            let k = next_kafka - 1;
            next_kafka += 1;
            let r = if i % 2 == 0 {
                exact.extend(e..e + size);
                Run::verified(e, e + size, size, first_kafka, k, size)
            } else {
                None
            };
            e += size;
            t.committed(e, k, r);
            checkpoints.push(e);
        }
        for g in 0..=e + 3 {
            let below = checkpoints.iter().rev().find(|&&c| c <= g);
            let Some(&c) = below else {
                let expected = exact.contains(&g).then(|| kafka_of[g as usize]);
                assert_eq!(
                    t.translate(g),
                    expected,
                    "position {g}: below every checkpoint"
                );
                continue;
            };
            let o = t.translate(g).unwrap();
            assert!(
                o > kafka_of[c as usize - 1],
                "position {g}: {o} repeats before {c}"
            );
            if let Some(&first_unprocessed) = kafka_of.get(g as usize) {
                assert!(
                    o <= first_unprocessed,
                    "position {g}: {o} skips {first_unprocessed}"
                );
                if exact.contains(&g) {
                    assert_eq!(o, first_unprocessed, "position {g} is covered by a run");
                }
            }
        }
        assert_eq!(t.translate(e), Some(next_kafka - 1));
    }

    #[test]
    fn resume_keeps_history_only_when_it_continues() {
        let mut t = Translation::default();
        t.resume(&[(100, 140)]);
        t.committed(150, 191, run(100, 142, 50));
        t.resume(&[(100, 140), (150, 191)]);
        assert_eq!(
            t.translate(120),
            Some(162),
            "same checkpoint: the run is kept"
        );
        t.resume(&[(150, 300)]); // the Kafka topic was recreated, say
        assert_eq!(t.translate(120), None);
        assert_eq!(t.translate(150), Some(301));
        t.resume(&[]);
        assert_eq!(
            t.translate(150),
            None,
            "no checkpoint in Kafka: nothing known"
        );
    }

    #[test]
    fn every_checkpoint_read_at_session_start_is_used() {
        let mut t = Translation::default();
        // Older checkpoints not compacted away yet, then one from before a topic was
        // recreated (its offsets go back), then the current ones.
        t.resume(&[(50, 60), (100, 120), (120, 5), (150, 40), (200, 95)]);
        assert_eq!(t.translate(60), None, "before the recreation: forgotten");
        assert_eq!(t.translate(130), Some(6));
        assert_eq!(t.translate(170), Some(41));
        assert_eq!(t.translate(200), Some(96));
    }

    #[test]
    fn a_checkpoint_that_does_not_follow_resets_the_history() {
        let mut t = Translation::default();
        t.committed(150, 191, run(100, 142, 50));
        t.committed(120, 500, None);
        assert_eq!(t.translate(110), None);
        assert_eq!(t.translate(130), Some(501));
    }

    #[test]
    fn history_is_bounded() {
        let mut t = Translation::default();
        for i in 0..(HISTORY as u64 + 10) {
            let k = 2 * i as i64;
            t.committed(i + 1, k, run(i, k, 1));
        }
        assert_eq!(t.checkpoints.len(), HISTORY);
        assert_eq!(t.runs.len(), HISTORY);
        assert_eq!(t.translate(5), None, "forgotten");
        assert_eq!(t.translate(20), Some(40));
    }
}
