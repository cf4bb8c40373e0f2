//! Sharing a group's partitions out among its online members.

/// The owner of each partition (by index) among `members`, given the `current` owners.
///
/// Every partition gets exactly one member when there is any; the counts differ by at most
/// one; a partition keeps its current owner whenever that owner is still a member and the
/// balance allows it, so that a member joining or leaving moves as few partitions as it
/// can. Deterministic for the same inputs (`members` in a fixed order).
pub fn assign<M: Clone + PartialEq>(current: &[Option<M>], members: &[M]) -> Vec<Option<M>> {
    if members.is_empty() {
        return vec![None; current.len()];
    }
    let n = members.len();
    let base = current.len() / n;
    let mut extra = current.len() % n;
    let mut counts = vec![0usize; n];
    let mut out: Vec<Option<M>> = vec![None; current.len()];
    let index_of = |m: &M| members.iter().position(|x| x == m);
    // Kept up to the base share first, then up to one more for as many members as the
    // remainder allows.
    for pass in 0..2 {
        for (p, owner) in current.iter().enumerate() {
            if out[p].is_some() {
                continue;
            }
            let Some(i) = owner.as_ref().and_then(index_of) else {
                continue;
            };
            if counts[i] < base {
                counts[i] += 1;
                out[p] = Some(members[i].clone());
            } else if pass == 1 && counts[i] == base && extra > 0 {
                counts[i] += 1;
                extra -= 1;
                out[p] = Some(members[i].clone());
            }
        }
    }
    for slot in out.iter_mut().filter(|o| o.is_none()) {
        let i = (0..n)
            .min_by_key(|&i| counts[i])
            .expect("there is a member");
        counts[i] += 1;
        *slot = Some(members[i].clone());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counts(owners: &[Option<&str>], members: &[&str]) -> Vec<usize> {
        members
            .iter()
            .map(|m| owners.iter().filter(|o| **o == Some(*m)).count())
            .collect()
    }

    #[test]
    fn every_partition_gets_one_member_and_counts_differ_by_at_most_one() {
        for parts in 0..13 {
            for n in 1..6 {
                let members: Vec<&str> = ["a", "b", "c", "d", "e"][..n].to_vec();
                let owners = assign(&vec![None; parts], &members);
                assert!(owners.iter().all(|o| o.is_some()));
                let c = counts(&owners, &members);
                let (lo, hi) = (c.iter().min().unwrap(), c.iter().max().unwrap());
                assert!(hi - lo <= 1, "{parts} partitions over {n}: {c:?}");
            }
        }
    }

    #[test]
    fn no_members_no_owners() {
        assert_eq!(assign(&[Some("a"), None], &[] as &[&str]), vec![None, None]);
    }

    #[test]
    fn a_joining_member_takes_partitions_only_from_the_busiest() {
        let before = assign(&[None; 6], &["a", "b"]);
        let after = assign(&before, &["a", "b", "c"]);
        assert_eq!(counts(&after, &["a", "b", "c"]), vec![2, 2, 2]);
        let moved = before.iter().zip(&after).filter(|(x, y)| x != y).count();
        assert_eq!(
            moved, 2,
            "only c's two partitions move: {before:?} -> {after:?}"
        );
    }

    #[test]
    fn a_leaving_members_partitions_go_to_the_others_and_the_rest_stay() {
        let before = assign(&[None; 6], &["a", "b", "c"]);
        let after = assign(&before, &["a", "c"]);
        for (x, y) in before.iter().zip(&after) {
            if *x != Some("b") {
                assert_eq!(x, y, "partitions of a and c stay where they were");
            }
        }
        assert_eq!(counts(&after, &["a", "c"]), vec![3, 3]);
    }
}
