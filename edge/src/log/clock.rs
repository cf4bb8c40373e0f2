//! The clock age retention judges records by, safe from a wall clock that jumps forward.
//!
//! A record's age is its receive time (wall clock at append) against the wall clock now. A
//! gateway that booted with a wrong clock (a dead RTC battery says 2020) and is corrected
//! forward by NTP would otherwise find every record received before the correction years
//! old, and delete them all at the next retention run. So each run compares how far the wall
//! clock moved with how far the monotonic clock moved since the last run: a forward jump of
//! more than `storage.max_clock_jump` is logged and added to a skew, and records received
//! before the jump are aged as that much younger. Records received after it are judged as
//! usual; the byte limits and the disk budget still apply to everything.
//!
//! Stored in the meta keyspace (`c`, see [`super::meta`]) when a jump is seen, so a restart
//! keeps judging the records from before the jump fairly.

#![deny(clippy::expect_used, clippy::indexing_slicing)]

use std::time::Instant;

/// See the module doc.
#[derive(Debug)]
pub(crate) struct RetentionClock {
    max_jump_ms: u64,
    last: Option<(u64, Instant)>,
    /// Records received before this wall time (ms) are aged `skew_ms` younger.
    pub jump_point_ms: u64,
    /// Total forward jumps seen, in ms.
    pub skew_ms: u64,
}

impl RetentionClock {
    /// A clock that takes a forward jump of more than `max_jump_ms` as a correction, with a
    /// skew stored before (`(jump_point_ms, skew_ms)`).
    pub(crate) fn new(max_jump_ms: u64, stored: Option<(u64, u64)>) -> RetentionClock {
        let (jump_point_ms, skew_ms) = stored.unwrap_or((0, 0));
        RetentionClock {
            max_jump_ms,
            last: None,
            jump_point_ms,
            skew_ms,
        }
    }

    /// Takes the clocks of this retention run; returns true when it saw a new forward jump
    /// (the skew changed and is to be stored).
    pub(crate) fn observe(&mut self, wall_ms: u64, mono: Instant) -> bool {
        let previous = self.last.replace((wall_ms, mono));
        let Some((last_wall, last_mono)) = previous else {
            return false;
        };
        let wall_moved = wall_ms.saturating_sub(last_wall);
        let mono_moved = u64::try_from(mono.saturating_duration_since(last_mono).as_millis())
            .unwrap_or(u64::MAX);
        let jump = wall_moved.saturating_sub(mono_moved);
        if jump <= self.max_jump_ms {
            return false;
        }
        self.skew_ms = self.skew_ms.saturating_add(jump);
        self.jump_point_ms = wall_ms;
        tracing::warn!(
            jump_ms = jump,
            skew_ms = self.skew_ms,
            "the wall clock jumped forward: age retention counts records received before now as that much younger (storage.max_clock_jump)"
        );
        true
    }

    /// The age in ms, at wall time `now_ms`, of a batch whose newest record was received at
    /// `last_ts_ms`.
    pub(crate) fn age(&self, now_ms: u64, last_ts_ms: u64) -> u64 {
        let age = now_ms.saturating_sub(last_ts_ms);
        if last_ts_ms < self.jump_point_ms {
            age.saturating_sub(self.skew_ms)
        } else {
            age
        }
    }

    /// The stored form.
    pub(crate) fn value(&self) -> Vec<u8> {
        super::meta::retention_clock_value(self.jump_point_ms, self.skew_ms)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    const HOUR: u64 = 3_600_000;

    #[test]
    fn a_forward_jump_makes_earlier_records_younger_and_later_ones_are_judged_as_usual() {
        let mono = Instant::now();
        let mut c = RetentionClock::new(5 * 60_000, None);
        let boot = 1_577_836_800_000; // 2020: a dead RTC battery
        assert!(!c.observe(boot, mono));
        // Ten seconds later by both clocks: no jump.
        assert!(!c.observe(boot + 10_000, mono + Duration::from_secs(10)));
        // Ten seconds later NTP says six years on.
        let corrected = boot + 20_000 + 6 * 365 * 24 * HOUR;
        assert!(c.observe(corrected, mono + Duration::from_secs(20)));
        // A record received a minute after boot is a few seconds old, not six years.
        assert!(c.age(corrected, boot + 60) < 60_000);
        // One received after the correction is judged by the clock as it is now.
        assert_eq!(c.age(corrected + HOUR, corrected + 10), HOUR - 10);
        // Stored and read back.
        let back = RetentionClock::new(
            1,
            super::super::meta::parse_retention_clock_value(&c.value()),
        );
        assert_eq!(
            (back.jump_point_ms, back.skew_ms),
            (c.jump_point_ms, c.skew_ms)
        );
    }

    #[test]
    fn small_steps_and_backward_jumps_change_nothing() {
        let mono = Instant::now();
        let mut c = RetentionClock::new(5 * 60_000, None);
        c.observe(HOUR, mono);
        assert!(!c.observe(HOUR + 4 * 60_000 + 10_000, mono + Duration::from_secs(10)));
        assert!(!c.observe(HOUR - 60_000, mono + Duration::from_secs(20)));
        assert_eq!(c.skew_ms, 0);
        assert_eq!(c.age(HOUR * 3, HOUR), 2 * HOUR);
    }
}
