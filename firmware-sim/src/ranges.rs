//! Sets of sequence numbers kept as sorted, disjoint, inclusive ranges.
//!
//! A device sends sequence numbers 0, 1, 2, ... and almost all of them are acknowledged and
//! received in order, so a set of a million numbers usually collapses to one range. Inserting in
//! order is O(1); an out-of-order insert costs a binary search plus a shift of the ranges after it.

use serde::{Deserialize, Serialize};

/// A set of `u64` sequence numbers stored as `[first, last]` ranges (both ends included).
///
/// Invariant: ranges are sorted, disjoint and not adjacent (`[1,2],[3,4]` is always merged to
/// `[1,4]`), so two equal sets always have equal representations.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "Vec<(u64, u64)>", into = "Vec<(u64, u64)>")]
pub struct SeqRanges {
    ranges: Vec<(u64, u64)>,
}

impl SeqRanges {
    /// An empty set.
    pub fn new() -> Self {
        Self::default()
    }

    /// The ranges, sorted, as inclusive `(first, last)` pairs.
    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }

    /// Whether the set holds no number.
    pub fn is_empty(&self) -> bool {
        self.ranges.is_empty()
    }

    /// How many numbers the set holds.
    pub fn len(&self) -> u64 {
        self.ranges.iter().map(|(a, b)| b - a + 1).sum()
    }

    /// Whether `seq` is in the set.
    pub fn contains(&self, seq: u64) -> bool {
        // The common question is about the newest number, so look at the last range first.
        if let Some(&(first, last)) = self.ranges.last() {
            if seq >= first {
                return seq <= last;
            }
        }
        match self.ranges.binary_search_by(|&(first, _)| first.cmp(&seq)) {
            Ok(_) => true,
            Err(0) => false,
            Err(i) => seq <= self.ranges[i - 1].1,
        }
    }

    /// Adds `seq`; returns false when it was already present.
    pub fn insert(&mut self, seq: u64) -> bool {
        if let Some(last) = self.ranges.last_mut() {
            if seq > last.1 {
                if seq == last.1 + 1 {
                    last.1 = seq;
                } else {
                    self.ranges.push((seq, seq));
                }
                return true;
            }
        } else {
            self.ranges.push((seq, seq));
            return true;
        }
        // `i` is the first range starting after `seq`.
        let i = self.ranges.partition_point(|&(first, _)| first <= seq);
        if i > 0 && seq <= self.ranges[i - 1].1 {
            return false;
        }
        let joins_prev = i > 0 && self.ranges[i - 1].1 + 1 == seq;
        let joins_next = i < self.ranges.len() && seq + 1 == self.ranges[i].0;
        match (joins_prev, joins_next) {
            (true, true) => {
                self.ranges[i - 1].1 = self.ranges[i].1;
                self.ranges.remove(i);
            }
            (true, false) => self.ranges[i - 1].1 = seq,
            (false, true) => self.ranges[i].0 = seq,
            (false, false) => self.ranges.insert(i, (seq, seq)),
        }
        true
    }

    /// Adds every number of `first..=last`.
    pub fn insert_range(&mut self, first: u64, last: u64) {
        if first > last {
            return;
        }
        if self
            .ranges
            .last()
            .is_none_or(|&(_, end)| end < first.saturating_sub(1))
        {
            self.ranges.push((first, last));
            return;
        }
        let mut merged = Vec::with_capacity(self.ranges.len() + 1);
        let mut pending = (first, last);
        let mut placed = false;
        for &(a, b) in &self.ranges {
            if b.saturating_add(1) < pending.0 {
                merged.push((a, b));
            } else if pending.1.saturating_add(1) < a {
                if !placed {
                    merged.push(pending);
                    placed = true;
                }
                merged.push((a, b));
            } else {
                pending = (pending.0.min(a), pending.1.max(b));
            }
        }
        if !placed {
            merged.push(pending);
        }
        self.ranges = merged;
    }

    /// The numbers of `self` that are not in `other`, as ranges.
    pub fn difference(&self, other: &SeqRanges) -> SeqRanges {
        let mut out = SeqRanges::new();
        let theirs = &other.ranges;
        let mut j = 0;
        for &(a, b) in &self.ranges {
            let mut start = a;
            while j < theirs.len() && theirs[j].1 < start {
                j += 1;
            }
            let mut k = j;
            while start <= b {
                match theirs.get(k) {
                    Some(&(oa, ob)) if oa <= b => {
                        if oa > start {
                            out.ranges.push((start, oa - 1));
                        }
                        if ob >= b {
                            start = b.saturating_add(1);
                            if b == u64::MAX {
                                break;
                            }
                        } else {
                            start = ob + 1;
                            k += 1;
                        }
                    }
                    _ => {
                        out.ranges.push((start, b));
                        break;
                    }
                }
            }
        }
        out
    }

    /// How many numbers `self` and `other` have in common.
    pub fn intersection_len(&self, other: &SeqRanges) -> u64 {
        self.len() - self.difference(other).len()
    }
}

impl TryFrom<Vec<(u64, u64)>> for SeqRanges {
    type Error = String;

    fn try_from(ranges: Vec<(u64, u64)>) -> Result<Self, Self::Error> {
        for (i, &(a, b)) in ranges.iter().enumerate() {
            if a > b {
                return Err(format!("range [{a}, {b}] ends before it starts"));
            }
            if i > 0 && ranges[i - 1].1.saturating_add(1) >= a {
                return Err(format!(
                    "ranges [{}, {}] and [{a}, {b}] are not sorted and disjoint",
                    ranges[i - 1].0,
                    ranges[i - 1].1
                ));
            }
        }
        Ok(SeqRanges { ranges })
    }
}

impl From<SeqRanges> for Vec<(u64, u64)> {
    fn from(set: SeqRanges) -> Self {
        set.ranges
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeSet;

    #[test]
    fn in_order_inserts_collapse_to_one_range() {
        let mut set = SeqRanges::new();
        for seq in 0..1000 {
            assert!(set.insert(seq));
        }
        assert_eq!(set.ranges(), &[(0, 999)]);
        assert_eq!(set.len(), 1000);
    }

    #[test]
    fn inserting_a_present_number_reports_it() {
        let mut set = SeqRanges::new();
        set.insert(5);
        set.insert(6);
        assert!(!set.insert(5));
        assert!(!set.insert(6));
        assert_eq!(set.len(), 2);
    }

    #[test]
    fn filling_a_gap_merges_both_neighbours() {
        let mut set = SeqRanges::new();
        for seq in [1, 2, 4, 5] {
            set.insert(seq);
        }
        assert_eq!(set.ranges(), &[(1, 2), (4, 5)]);
        set.insert(3);
        assert_eq!(set.ranges(), &[(1, 5)]);
    }

    #[test]
    fn difference_lists_the_missing_numbers() {
        let acked: SeqRanges = vec![(0, 99)].try_into().unwrap();
        let received: SeqRanges = vec![(0, 9), (12, 50), (52, 120)].try_into().unwrap();
        assert_eq!(acked.difference(&received).ranges(), &[(10, 11), (51, 51)]);
        assert_eq!(acked.intersection_len(&received), 97);
    }

    #[test]
    fn unsorted_ranges_are_refused_when_read() {
        let parsed: Result<SeqRanges, _> = serde_json::from_str("[[5,6],[1,2]]");
        assert!(parsed.is_err());
        let adjacent: Result<SeqRanges, _> = serde_json::from_str("[[1,2],[3,4]]");
        assert!(adjacent.is_err());
    }

    fn model_ranges(model: &BTreeSet<u64>) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for &n in model {
            match out.last_mut() {
                Some(last) if last.1 + 1 == n => last.1 = n,
                _ => out.push((n, n)),
            }
        }
        out
    }

    proptest! {
        #[test]
        fn matches_a_btreeset(ops in proptest::collection::vec((0u64..200, 0u64..4), 0..300)) {
            let mut set = SeqRanges::new();
            let mut model = BTreeSet::new();
            for (n, span) in ops {
                if span == 0 {
                    prop_assert_eq!(set.insert(n), model.insert(n));
                } else {
                    set.insert_range(n, n + span);
                    model.extend(n..=n + span);
                }
                prop_assert_eq!(set.ranges().to_vec(), model_ranges(&model));
            }
            for probe in 0..210 {
                prop_assert_eq!(set.contains(probe), model.contains(&probe));
            }
        }

        #[test]
        fn difference_matches_a_btreeset(
            a in proptest::collection::btree_set(0u64..150, 0..100),
            b in proptest::collection::btree_set(0u64..150, 0..100),
        ) {
            let mut sa = SeqRanges::new();
            a.iter().for_each(|&n| { sa.insert(n); });
            let mut sb = SeqRanges::new();
            b.iter().for_each(|&n| { sb.insert(n); });
            let expected: BTreeSet<u64> = a.difference(&b).copied().collect();
            prop_assert_eq!(sa.difference(&sb).ranges().to_vec(), model_ranges(&expected));
        }
    }
}
