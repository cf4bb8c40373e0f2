//! The subscription index: which sessions subscribed to which topic filters, and which of
//! them a published topic name reaches.
//!
//! Filters are kept in a trie over topic levels. Each node stands for a filter prefix; its
//! children are the literal next levels plus one dedicated child each for `+` and `#`, so
//! matching a topic walks only the branches that can match (the literal level, `+`, `#`)
//! instead of testing every filter. A node holds the plain subscriptions and the shared
//! groups whose filter ends there.
//!
//! Invariants:
//! - Every node other than the root holds a subscription or leads to one: nodes left empty by
//!   `unsubscribe` or `remove_all` are pruned at once, so memory follows the live
//!   subscriptions, not the history of churn.
//! - `filters` (per session) lists exactly the filter texts that session has in the trie, and
//!   `len` is the number of (session, filter text) pairs in it.
//! - A shared group has at least one member; its members keep their order of subscription, so
//!   round-robin is deterministic for a given history.

use std::collections::{HashMap, HashSet};
use std::hash::Hash;
use std::str::Split;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;

const SHARE_PREFIX: &str = "$share/";

/// Options of one subscription (MQTT 5 subscription options; 3.1.1 uses qos only).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SubOptions {
    /// Granted QoS, 0..=2.
    pub qos: u8,
    /// Messages published by the subscribing session itself are not sent back to it.
    pub no_local: bool,
    /// Forwarded messages keep the RETAIN flag they were published with.
    pub retain_as_published: bool,
    /// When retained messages are sent at subscribe time: 0 always, 1 only for a new
    /// subscription, 2 never.
    pub retain_handling: u8,
    /// Subscription identifier, sent with every message this subscription delivers.
    pub id: Option<u32>,
}

/// One matching subscription.
#[derive(Debug, Clone)]
pub struct Match<S> {
    /// The subscribing session.
    pub who: S,
    /// Its options for this subscription.
    pub opts: SubOptions,
    /// The share name for a `$share/{group}/{filter}` subscription, None otherwise.
    pub group: Option<Arc<str>>,
}

/// The members of one shared subscription `$share/{group}/{filter}`.
struct SharedGroup<S> {
    /// In order of subscription; a re-subscription keeps its place.
    members: Vec<(S, SubOptions)>,
    /// Where the next round-robin pick starts. Atomic because matching runs through `&self`
    /// (under a read lock), and concurrent matches may each advance it.
    cursor: AtomicUsize,
    /// Backed by a durable consumer group: its members read the log through the group, so
    /// live publishes are not matched to them.
    durable: bool,
}

impl<S: Eq> SharedGroup<S> {
    /// The next eligible member after the previous pick, advancing the cursor past it.
    fn pick(&self, eligible: &impl Fn(&S) -> bool) -> Option<&(S, SubOptions)> {
        let n = self.members.len();
        let start = self.cursor.fetch_add(1, Ordering::Relaxed);
        for skipped in 0..n {
            let member = &self.members[start.wrapping_add(skipped) % n];
            if eligible(&member.0) {
                if skipped > 0 {
                    // The skipped members had their turn; the next pick starts after this one.
                    self.cursor.fetch_add(skipped, Ordering::Relaxed);
                }
                return Some(member);
            }
        }
        None
    }
}

/// One trie node: a filter prefix.
struct Node<S> {
    children: HashMap<Box<str>, Node<S>>,
    /// The `+` child.
    single: Option<Box<Node<S>>>,
    /// The `#` child; it never has children of its own (`#` is always the last level).
    multi: Option<Box<Node<S>>>,
    /// Plain subscriptions to the filter ending here.
    subscribers: HashMap<S, SubOptions>,
    /// Shared subscriptions to the filter ending here, by share name.
    groups: HashMap<Arc<str>, SharedGroup<S>>,
}

impl<S: Clone + Eq + Hash> Node<S> {
    fn new() -> Self {
        Node {
            children: HashMap::new(),
            single: None,
            multi: None,
            subscribers: HashMap::new(),
            groups: HashMap::new(),
        }
    }

    fn is_empty(&self) -> bool {
        self.subscribers.is_empty()
            && self.groups.is_empty()
            && self.children.is_empty()
            && self.single.is_none()
            && self.multi.is_none()
    }

    fn child_mut_or_insert(&mut self, level: &str) -> &mut Node<S> {
        match level {
            "+" => self.single.get_or_insert_with(|| Box::new(Node::new())),
            "#" => self.multi.get_or_insert_with(|| Box::new(Node::new())),
            _ => {
                // `entry` would allocate the key even when the child exists.
                if !self.children.contains_key(level) {
                    self.children.insert(level.into(), Node::new());
                }
                self.children.get_mut(level).expect("inserted above")
            }
        }
    }

    fn child(&self, level: &str) -> Option<&Node<S>> {
        match level {
            "+" => self.single.as_deref(),
            "#" => self.multi.as_deref(),
            _ => self.children.get(level),
        }
    }

    /// Removes `who`'s subscription to the filter `levels` leads to from here, pruning the
    /// nodes it leaves empty; returns whether it existed.
    fn remove(&mut self, mut levels: Split<'_, char>, group: Option<&str>, who: &S) -> bool {
        let Some(level) = levels.next() else {
            return self.remove_here(group, who);
        };
        let slot = match level {
            "+" => &mut self.single,
            "#" => &mut self.multi,
            _ => {
                let Some(child) = self.children.get_mut(level) else {
                    return false;
                };
                let removed = child.remove(levels, group, who);
                if child.is_empty() {
                    self.children.remove(level);
                }
                return removed;
            }
        };
        let Some(child) = slot.as_deref_mut() else {
            return false;
        };
        let removed = child.remove(levels, group, who);
        if child.is_empty() {
            *slot = None;
        }
        removed
    }

    fn remove_here(&mut self, group: Option<&str>, who: &S) -> bool {
        let Some(name) = group else {
            return self.subscribers.remove(who).is_some();
        };
        let Some(shared) = self.groups.get_mut(name) else {
            return false;
        };
        let Some(at) = shared.members.iter().position(|(m, _)| m == who) else {
            return false;
        };
        shared.members.remove(at);
        if shared.members.is_empty() {
            self.groups.remove(name);
        }
        true
    }

    /// Collects the subscriptions under this node that match the rest of a topic, `levels`.
    /// `dollar_first_level` (at the root only) keeps `+` and `#` from matching a first level
    /// that starts with `$`.
    fn collect(
        &self,
        mut levels: Split<'_, char>,
        dollar_first_level: bool,
        eligible: &impl Fn(&S) -> bool,
        out: &mut Vec<Match<S>>,
    ) {
        if !dollar_first_level {
            // `#` matches the parent level too, so it matches whatever is left, even nothing.
            if let Some(multi) = &self.multi {
                multi.emit(eligible, out);
            }
        }
        let Some(level) = levels.next() else {
            self.emit(eligible, out);
            return;
        };
        if let Some(child) = self.children.get(level) {
            child.collect(levels.clone(), false, eligible, out);
        }
        if !dollar_first_level {
            if let Some(single) = &self.single {
                single.collect(levels, false, eligible, out);
            }
        }
    }

    /// The subscriptions whose filter ends at this node.
    fn emit(&self, eligible: &impl Fn(&S) -> bool, out: &mut Vec<Match<S>>) {
        out.extend(self.subscribers.iter().map(|(who, opts)| Match {
            who: who.clone(),
            opts: *opts,
            group: None,
        }));
        for (name, shared) in self.groups.iter().filter(|(_, g)| !g.durable) {
            if let Some((who, opts)) = shared.pick(eligible) {
                out.push(Match {
                    who: who.clone(),
                    opts: *opts,
                    group: Some(name.clone()),
                });
            }
        }
    }

    #[cfg(test)]
    fn count_below(&self) -> usize {
        let children = self
            .children
            .values()
            .chain(self.single.as_deref())
            .chain(self.multi.as_deref());
        children.map(|c| 1 + c.count_below()).sum()
    }
}

/// Splits `$share/{group}/{filter}` into its group and filter; a plain filter has no group.
pub(crate) fn split_shared(filter: &str) -> (Option<&str>, &str) {
    match filter
        .strip_prefix(SHARE_PREFIX)
        .and_then(|rest| rest.split_once('/'))
    {
        Some((group, inner)) => (Some(group), inner),
        None => (None, filter),
    }
}

/// Subscriptions of all sessions, keyed by a session handle `S` (cheap to clone, e.g.
/// `Arc<str>` or `u64`).
pub(crate) struct SubscriptionTree<S> {
    root: Node<S>,
    /// Each session's filter texts as given, so that removing a session visits only its own
    /// branches of the trie.
    filters: HashMap<S, HashSet<Box<str>>>,
    len: usize,
    /// Share names of durable consumer groups (see `SharedGroup::durable`).
    durable: HashSet<Box<str>>,
}

impl<S: Clone + Eq + Hash> Default for SubscriptionTree<S> {
    fn default() -> Self {
        Self::new()
    }
}

impl<S: Clone + Eq + Hash> SubscriptionTree<S> {
    /// An empty tree.
    pub(crate) fn new() -> Self {
        SubscriptionTree {
            root: Node::new(),
            filters: HashMap::new(),
            len: 0,
            durable: HashSet::new(),
        }
    }

    /// Declares the share names backed by durable consumer groups; set before subscribing.
    pub(crate) fn set_durable_groups<'a>(&mut self, names: impl IntoIterator<Item = &'a str>) {
        self.durable = names.into_iter().map(Box::from).collect();
    }

    /// Adds or replaces `who`'s subscription to `filter`. `filter` is already validated
    /// (see [`validate_filter`]) and may be a shared one `$share/{group}/{filter}`.
    /// Returns true if it replaced an existing subscription of `who` to the same filter text
    /// (for a shared filter: same group and same filter).
    pub(crate) fn subscribe(&mut self, who: S, filter: &str, opts: SubOptions) -> bool {
        let (group, inner) = split_shared(filter);
        let mut node = &mut self.root;
        for level in inner.split('/') {
            node = node.child_mut_or_insert(level);
        }
        let replaced = match group {
            None => node.subscribers.insert(who.clone(), opts).is_some(),
            Some(name) => {
                if !node.groups.contains_key(name) {
                    let shared = SharedGroup {
                        members: Vec::new(),
                        cursor: AtomicUsize::new(0),
                        durable: self.durable.contains(name),
                    };
                    node.groups.insert(name.into(), shared);
                }
                let shared = node.groups.get_mut(name).expect("inserted above");
                match shared.members.iter_mut().find(|(m, _)| *m == who) {
                    Some(member) => {
                        member.1 = opts;
                        true
                    }
                    None => {
                        shared.members.push((who.clone(), opts));
                        false
                    }
                }
            }
        };
        if !replaced {
            self.filters.entry(who).or_default().insert(filter.into());
            self.len += 1;
        }
        replaced
    }

    /// Removes `who`'s subscription to `filter`; returns whether it existed.
    pub(crate) fn unsubscribe(&mut self, who: &S, filter: &str) -> bool {
        let Some(own) = self.filters.get_mut(who) else {
            return false;
        };
        if !own.remove(filter) {
            return false;
        }
        if own.is_empty() {
            self.filters.remove(who);
        }
        self.remove_from_trie(who, filter);
        true
    }

    /// Removes every subscription of `who`.
    pub(crate) fn remove_all(&mut self, who: &S) {
        let Some(own) = self.filters.remove(who) else {
            return;
        };
        for filter in own.iter() {
            self.remove_from_trie(who, filter);
        }
    }

    fn remove_from_trie(&mut self, who: &S, filter: &str) {
        let (group, inner) = split_shared(filter);
        let removed = self.root.remove(inner.split('/'), group, who);
        debug_assert!(
            removed,
            "the filter index and the trie disagree on {filter:?}"
        );
        self.len -= 1;
    }

    /// `who`'s subscriptions as (filter text as given, options), in any order.
    pub(crate) fn subscriptions_of(&self, who: &S) -> Vec<(String, SubOptions)> {
        let Some(own) = self.filters.get(who) else {
            return Vec::new();
        };
        own.iter()
            .filter_map(|filter| {
                let opts = self.options_of(who, filter)?;
                Some((filter.to_string(), opts))
            })
            .collect()
    }

    fn options_of(&self, who: &S, filter: &str) -> Option<SubOptions> {
        let (group, inner) = split_shared(filter);
        let mut node = &self.root;
        for level in inner.split('/') {
            node = node.child(level)?;
        }
        match group {
            None => node.subscribers.get(who).copied(),
            Some(name) => {
                let members = &node.groups.get(name)?.members;
                members
                    .iter()
                    .find(|(m, _)| m == who)
                    .map(|(_, opts)| *opts)
            }
        }
    }

    /// Number of `who`'s subscriptions.
    pub(crate) fn count_of(&self, who: &S) -> usize {
        self.filters.get(who).map_or(0, |own| own.len())
    }

    /// Whether `who` is subscribed to `filter` (as given, shared ones with their group).
    pub(crate) fn holds(&self, who: &S, filter: &str) -> bool {
        self.filters
            .get(who)
            .is_some_and(|own| own.contains(filter))
    }

    /// Number of subscriptions (a shared subscription counts once per member).
    pub(crate) fn len(&self) -> usize {
        self.len
    }

    /// Appends to `out` every subscription matching the topic name `topic`:
    /// - every non-shared subscription whose filter matches (one Match per subscription, so
    ///   one session can appear several times with different options; the caller aggregates);
    /// - for each shared group `$share/{g}/{f}` whose filter `f` matches: exactly one member,
    ///   chosen round-robin among the members for which `eligible(&who)` is true (e.g.
    ///   online); none if no member is eligible.
    ///
    /// Topics starting with `$` are not matched by filters whose first level is `+` or `#`
    /// (MQTT-4.7.2-1).
    pub(crate) fn matches(
        &self,
        topic: &str,
        eligible: impl Fn(&S) -> bool,
        out: &mut Vec<Match<S>>,
    ) {
        self.root
            .collect(topic.split('/'), topic.starts_with('$'), &eligible, out);
    }

    /// Trie nodes besides the root: 0 once every subscription is gone.
    #[cfg(test)]
    fn node_count(&self) -> usize {
        self.root.count_below()
    }
}

/// Checks a subscription filter; `Err` is a human-readable reason. Rules: non-empty, no
/// U+0000; `#` only as the whole last level; `+` only as a whole level;
/// `$share/{group}/{filter}`: group non-empty without `+`, `#` or `/`, and a non-empty valid
/// filter after it. `max_levels` bounds the level count of the filter part.
pub(crate) fn validate_filter(filter: &str, max_levels: usize) -> Result<(), String> {
    if filter.is_empty() {
        return Err("the topic filter is empty".to_string());
    }
    if filter.contains('\0') {
        return Err(format!("the topic filter {filter:?} contains U+0000"));
    }
    let inner = match filter.strip_prefix(SHARE_PREFIX) {
        None => filter,
        Some(rest) => {
            let Some((group, inner)) = rest.split_once('/') else {
                return Err(format!(
                    "the shared subscription {filter:?} has no filter: write $share/{{group}}/{{filter}}"
                ));
            };
            if group.is_empty() {
                return Err(format!(
                    "the shared subscription {filter:?} has an empty share name"
                ));
            }
            if group.contains(['+', '#']) {
                return Err(format!(
                    "the shared subscription {filter:?}: the share name {group:?} contains a wildcard"
                ));
            }
            if inner.is_empty() {
                return Err(format!(
                    "the shared subscription {filter:?} has an empty filter"
                ));
            }
            inner
        }
    };
    let levels = inner.split('/').count();
    if levels > max_levels {
        return Err(format!(
            "the topic filter {filter:?} has {levels} levels, more than the {max_levels} allowed"
        ));
    }
    let mut rest = inner.split('/').peekable();
    while let Some(level) = rest.next() {
        if level.contains('#') && (level != "#" || rest.peek().is_some()) {
            return Err(format!(
                "the topic filter {filter:?}: '#' must be the whole last level"
            ));
        }
        if level.contains('+') && level != "+" {
            return Err(format!(
                "the topic filter {filter:?}: '+' must be a whole level, as in a/+/b"
            ));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn qos(qos: u8) -> SubOptions {
        SubOptions {
            qos,
            no_local: false,
            retain_as_published: false,
            retain_handling: 0,
            id: None,
        }
    }

    fn tree_with(filters: &[&str]) -> SubscriptionTree<u32> {
        let mut tree = SubscriptionTree::new();
        for (who, filter) in filters.iter().enumerate() {
            tree.subscribe(who as u32, filter, qos(0));
        }
        tree
    }

    /// The sessions reached by `topic`, sorted.
    fn matching(tree: &SubscriptionTree<u32>, topic: &str) -> Vec<u32> {
        let mut out = Vec::new();
        tree.matches(topic, |_| true, &mut out);
        let mut who: Vec<u32> = out.into_iter().map(|m| m.who).collect();
        who.sort_unstable();
        who
    }

    fn matches_one(filter: &str, topic: &str) -> bool {
        !matching(&tree_with(&[filter]), topic).is_empty()
    }

    #[test]
    fn exact_filter_matches_only_its_topic() {
        assert!(matches_one("a/b", "a/b"));
        assert!(!matches_one("a/b", "a/b/c"));
        assert!(!matches_one("a/b", "a"));
        assert!(!matches_one("a/b", "a/c"));
        assert!(!matches_one("A/b", "a/b"));
    }

    #[test]
    fn multi_level_wildcard_matches_parent_level() {
        assert!(matches_one("a/#", "a"));
        assert!(matches_one("a/#", "a/"));
        assert!(matches_one("a/#", "a/b/c"));
        assert!(!matches_one("a/#", "ab"));
        assert!(!matches_one("a/#", "b/a"));
    }

    #[test]
    fn single_level_wildcard_matches_exactly_one_level() {
        assert!(matches_one("sport/+", "sport/tennis"));
        assert!(!matches_one("sport/+", "sport"));
        assert!(!matches_one("sport/+", "sport/tennis/player1"));
        assert!(matches_one("+/+", "/finance"));
        assert!(matches_one("/+", "/finance"));
        assert!(!matches_one("+", "/finance"));
    }

    #[test]
    fn single_level_wildcard_matches_empty_level() {
        assert!(matches_one("a/+", "a/"));
        assert!(matches_one("+/b", "/b"));
        assert!(matches_one("a/+/c", "a//c"));
    }

    #[test]
    fn empty_levels_are_real_levels() {
        assert!(matches_one("/a", "/a"));
        assert!(!matches_one("/a", "a"));
        assert!(!matches_one("a", "/a"));
        assert!(matches_one("a//b", "a//b"));
        assert!(!matches_one("a//b", "a/b"));
        assert!(matches_one("/", "/"));
    }

    #[test]
    fn hash_alone_matches_everything_not_starting_with_dollar() {
        for topic in ["a", "/", "a/b/c", "", "x$"] {
            assert!(matches_one("#", topic), "{topic:?}");
        }
        assert!(!matches_one("#", "$SYS"));
        assert!(!matches_one("#", "$SYS/broker/uptime"));
    }

    #[test]
    fn dollar_topics_match_filters_that_name_them() {
        assert!(matches_one("$SYS/#", "$SYS/broker/uptime"));
        assert!(matches_one("$SYS/#", "$SYS"));
        assert!(matches_one("$SYS/monitor/+", "$SYS/monitor/Clients"));
        assert!(matches_one("$SYS/+/Clients", "$SYS/monitor/Clients"));
    }

    #[test]
    fn wildcard_first_level_does_not_match_dollar_topics() {
        assert!(!matches_one("+/monitor/Clients", "$SYS/monitor/Clients"));
        assert!(!matches_one("+", "$SYS"));
        assert!(!matches_one("#", "$"));
        // Only the first level is special.
        assert!(matches_one("a/+", "a/$x"));
        assert!(matches_one("a/#", "a/$x/y"));
    }

    #[test]
    fn every_matching_subscription_is_reported_once() {
        let tree = tree_with(&["a/b", "a/+", "a/#", "#", "+/b", "a/c", "b/#"]);
        assert_eq!(matching(&tree, "a/b"), vec![0, 1, 2, 3, 4]);
    }

    #[test]
    fn one_session_appears_once_per_matching_subscription() {
        let mut tree = SubscriptionTree::new();
        tree.subscribe(7u32, "a/+", qos(1));
        tree.subscribe(7u32, "a/#", qos(2));
        let mut out = Vec::new();
        tree.matches("a/b", |_| true, &mut out);
        let mut qos: Vec<u8> = out.iter().map(|m| m.opts.qos).collect();
        qos.sort_unstable();
        assert_eq!(qos, vec![1, 2]);
        assert!(out.iter().all(|m| m.who == 7 && m.group.is_none()));
    }

    #[test]
    fn matches_appends_to_out() {
        let tree = tree_with(&["a"]);
        let mut out = Vec::new();
        tree.matches("a", |_| true, &mut out);
        tree.matches("a", |_| true, &mut out);
        assert_eq!(out.len(), 2);
    }

    #[test]
    fn resubscribing_replaces_options() {
        let mut tree = SubscriptionTree::new();
        assert!(!tree.subscribe(1u32, "a/+", qos(0)));
        assert!(tree.subscribe(1u32, "a/+", qos(2)));
        assert_eq!(tree.len(), 1);
        assert_eq!(tree.subscriptions_of(&1), vec![("a/+".to_string(), qos(2))]);
        let mut out = Vec::new();
        tree.matches("a/x", |_| true, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].opts, qos(2));
    }

    #[test]
    fn unsubscribe_removes_only_that_filter() {
        let mut tree = SubscriptionTree::new();
        tree.subscribe(1u32, "a/+", qos(0));
        tree.subscribe(1u32, "a/b", qos(0));
        tree.subscribe(2u32, "a/+", qos(0));
        assert!(tree.unsubscribe(&1, "a/+"));
        assert!(!tree.unsubscribe(&1, "a/+"));
        assert!(!tree.unsubscribe(&3, "a/+"));
        assert!(!tree.unsubscribe(&1, "a/#"));
        assert_eq!(tree.len(), 2);
        assert_eq!(matching(&tree, "a/b"), vec![1, 2]);
        assert_eq!(matching(&tree, "a/c"), vec![2]);
    }

    #[test]
    fn subscriptions_of_lists_filters_as_given() {
        let mut tree = SubscriptionTree::new();
        tree.subscribe(1u32, "a/+", qos(1));
        tree.subscribe(1u32, "$share/g/a/+", qos(2));
        tree.subscribe(2u32, "b", qos(0));
        let mut own = tree.subscriptions_of(&1);
        own.sort_by(|a, b| a.0.cmp(&b.0));
        assert_eq!(
            own,
            vec![
                ("$share/g/a/+".to_string(), qos(2)),
                ("a/+".to_string(), qos(1))
            ]
        );
        assert!(tree.subscriptions_of(&3).is_empty());
    }

    #[test]
    fn remove_all_removes_every_subscription_of_a_session() {
        let mut tree = SubscriptionTree::new();
        for filter in ["a", "a/+", "#", "$share/g/a"] {
            tree.subscribe(1u32, filter, qos(0));
        }
        tree.subscribe(2u32, "a", qos(0));
        tree.remove_all(&1);
        assert_eq!(tree.len(), 1);
        assert!(tree.subscriptions_of(&1).is_empty());
        assert_eq!(matching(&tree, "a"), vec![2]);
        tree.remove_all(&1);
        assert_eq!(tree.len(), 1);
    }

    #[test]
    fn removing_everything_prunes_every_node() {
        let mut tree = SubscriptionTree::new();
        let filters = [
            "a/b/c",
            "a/+/c",
            "a/#",
            "#",
            "/",
            "$SYS/#",
            "$share/g/a/b",
            "$share/h/+/x",
        ];
        for (who, filter) in filters.iter().enumerate() {
            tree.subscribe(who as u32, filter, qos(0));
            tree.subscribe(100, filter, qos(1));
        }
        assert!(tree.node_count() > 0);
        for (who, filter) in filters.iter().enumerate() {
            assert!(tree.unsubscribe(&(who as u32), filter));
        }
        // What is left belongs to session 100 only.
        assert_eq!(tree.len(), filters.len());
        tree.remove_all(&100);
        assert_eq!(tree.len(), 0);
        assert_eq!(tree.len(), 0);
        assert_eq!(tree.node_count(), 0);
        assert!(tree.filters.is_empty());
    }

    #[test]
    fn unsubscribing_one_branch_keeps_the_shared_prefix() {
        let mut tree = tree_with(&["a/b/c", "a/b"]);
        assert_eq!(tree.node_count(), 3);
        tree.unsubscribe(&0, "a/b/c");
        assert_eq!(tree.node_count(), 2);
        assert_eq!(matching(&tree, "a/b"), vec![1]);
    }

    fn picks(
        tree: &SubscriptionTree<u32>,
        topic: &str,
        n: usize,
        eligible: impl Fn(&u32) -> bool,
    ) -> Vec<u32> {
        (0..n)
            .map(|_| {
                let mut out = Vec::new();
                tree.matches(topic, &eligible, &mut out);
                assert_eq!(out.len(), 1, "one member per group");
                assert_eq!(out[0].group.as_deref(), Some("g"));
                out[0].who
            })
            .collect()
    }

    #[test]
    fn shared_group_delivers_round_robin() {
        let mut tree = SubscriptionTree::new();
        for who in [1u32, 2, 3] {
            tree.subscribe(who, "$share/g/a/+", qos(1));
        }
        assert_eq!(tree.len(), 3);
        assert_eq!(picks(&tree, "a/x", 7, |_| true), vec![1, 2, 3, 1, 2, 3, 1]);
    }

    #[test]
    fn shared_group_skips_ineligible_members() {
        let mut tree = SubscriptionTree::new();
        for who in [1u32, 2, 3] {
            tree.subscribe(who, "$share/g/a", qos(1));
        }
        assert_eq!(picks(&tree, "a", 4, |w| *w != 2), vec![1, 3, 1, 3]);
        assert_eq!(picks(&tree, "a", 3, |w| *w == 2), vec![2, 2, 2]);
    }

    #[test]
    fn shared_group_without_eligible_member_delivers_nothing() {
        let mut tree = SubscriptionTree::new();
        tree.subscribe(1u32, "$share/g/a", qos(1));
        tree.subscribe(2u32, "a", qos(0));
        let mut out = Vec::new();
        tree.matches("a", |w| *w == 2, &mut out);
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].who, 2);
        assert!(out[0].group.is_none());
    }

    #[test]
    fn shared_groups_are_keyed_by_name_and_filter() {
        let mut tree = SubscriptionTree::new();
        assert!(!tree.subscribe(1u32, "$share/g/a/+", qos(0)));
        assert!(!tree.subscribe(1u32, "$share/h/a/+", qos(0)));
        assert!(!tree.subscribe(1u32, "$share/g/a/#", qos(0)));
        assert!(!tree.subscribe(1u32, "a/+", qos(0)));
        assert_eq!(tree.len(), 4);
        let mut out = Vec::new();
        tree.matches("a/b", |_| true, &mut out);
        let mut groups: Vec<Option<&str>> = out.iter().map(|m| m.group.as_deref()).collect();
        groups.sort_unstable();
        assert_eq!(groups, vec![None, Some("g"), Some("g"), Some("h")]);
    }

    #[test]
    fn shared_resubscription_replaces_options_and_keeps_its_turn() {
        let mut tree = SubscriptionTree::new();
        tree.subscribe(1u32, "$share/g/a", qos(0));
        tree.subscribe(2u32, "$share/g/a", qos(0));
        assert!(tree.subscribe(1u32, "$share/g/a", qos(2)));
        assert_eq!(tree.len(), 2);
        let mut out = Vec::new();
        tree.matches("a", |_| true, &mut out);
        tree.matches("a", |_| true, &mut out);
        let got: Vec<(u32, u8)> = out.iter().map(|m| (m.who, m.opts.qos)).collect();
        assert_eq!(got, vec![(1, 2), (2, 0)]);
    }

    #[test]
    fn shared_unsubscribe_leaves_other_members() {
        let mut tree = SubscriptionTree::new();
        tree.subscribe(1u32, "$share/g/a", qos(0));
        tree.subscribe(2u32, "$share/g/a", qos(0));
        assert!(tree.unsubscribe(&1, "$share/g/a"));
        assert!(!tree.unsubscribe(&1, "$share/g/a"));
        assert!(!tree.unsubscribe(&2, "$share/h/a"));
        assert!(!tree.unsubscribe(&2, "a"));
        assert_eq!(picks(&tree, "a", 2, |_| true), vec![2, 2]);
        assert!(tree.unsubscribe(&2, "$share/g/a"));
        assert_eq!(tree.len(), 0);
        assert_eq!(tree.node_count(), 0);
    }

    #[test]
    fn shared_filter_follows_the_dollar_rule() {
        let mut tree = SubscriptionTree::new();
        tree.subscribe(1u32, "$share/g/#", qos(0));
        assert!(matching(&tree, "$SYS/x").is_empty());
        assert_eq!(matching(&tree, "a/b"), vec![1]);
    }

    #[test]
    fn validate_filter_accepts_valid_filters() {
        for filter in [
            "a",
            "a/b",
            "/",
            "//",
            "#",
            "+",
            "a/#",
            "+/+",
            "/+/",
            "a/+/b/#",
            "$SYS/#",
            "$share",
            "sport/tennis/+",
            "$share/g/#",
            "$share/g/a/+/b",
            "$share/g//",
            "é/ü",
        ] {
            assert_eq!(validate_filter(filter, 8), Ok(()), "{filter:?}");
        }
    }

    #[test]
    fn validate_filter_rejects_invalid_filters() {
        for filter in [
            "",
            "a\0b",
            "a#",
            "#/a",
            "a/#/b",
            "a/b#",
            "##",
            "a+",
            "+a/b",
            "a/++",
            "$share/g",
            "$share//a",
            "$share/g/",
            "$share/+/a",
            "$share/g#/a",
            "$share/g/a#",
            "$share/g/a/+b",
        ] {
            assert!(validate_filter(filter, 8).is_err(), "{filter:?}");
        }
    }

    #[test]
    fn validate_filter_bounds_levels_of_the_filter_part() {
        assert!(validate_filter("a/b/c", 3).is_ok());
        assert!(validate_filter("a/b/c/d", 3).is_err());
        assert!(validate_filter("$share/group/a/b/c", 3).is_ok());
        assert!(validate_filter("$share/group/a/b/c/d", 3).is_err());
        let reason = validate_filter("a/b/c/d", 3).unwrap_err();
        assert!(reason.contains("4 levels"), "{reason}");
    }

    /// One filter against one topic, level by level: the rules of MQTT 4.7 written plainly.
    fn reference_matches(filter: &str, topic: &str) -> bool {
        let filter: Vec<&str> = filter.split('/').collect();
        let topic: Vec<&str> = topic.split('/').collect();
        if topic[0].starts_with('$') && (filter[0] == "+" || filter[0] == "#") {
            return false;
        }
        for i in 0.. {
            match (filter.get(i).copied(), topic.get(i).copied()) {
                (Some("#"), _) => return true,
                (None, None) => return true,
                (Some("+"), Some(_)) => {}
                (Some(f), Some(t)) if f == t => {}
                _ => return false,
            }
        }
        unreachable!()
    }

    /// Non-empty filters over a small alphabet of levels, `#` only last (so always valid).
    fn filters() -> impl Strategy<Value = String> {
        let level = prop::sample::select(&["", "a", "b", "+", "$x"][..]);
        (prop::collection::vec(level, 0..=3), any::<bool>())
            .prop_map(|(mut levels, hash)| {
                if hash {
                    levels.push("#");
                }
                levels.join("/")
            })
            .prop_filter("a filter is not empty", |f| !f.is_empty())
    }

    fn topics() -> impl Strategy<Value = String> {
        let level = prop::sample::select(&["", "a", "b", "$x"][..]);
        prop::collection::vec(level, 1..=4)
            .prop_map(|levels| levels.join("/"))
            .prop_filter("a topic name is not empty", |t| !t.is_empty())
    }

    /// A subscription: the filter and, for a shared one, its share name.
    fn subscriptions() -> impl Strategy<Value = Vec<(Option<&'static str>, String)>> {
        let group = prop::option::weighted(0.3, prop::sample::select(&["g", "h"][..]));
        prop::collection::vec((group, filters()), 0..24)
    }

    fn filter_text(group: Option<&str>, filter: &str) -> String {
        match group {
            Some(g) => format!("$share/{g}/{filter}"),
            None => filter.to_string(),
        }
    }

    proptest! {
        #[test]
        fn matches_agrees_with_reference(
            subs in subscriptions(),
            topics in prop::collection::vec(topics(), 1..8),
        ) {
            let mut tree = SubscriptionTree::new();
            for (who, (group, filter)) in subs.iter().enumerate() {
                let text = filter_text(*group, filter);
                prop_assert_eq!(validate_filter(&text, 8), Ok(()));
                tree.subscribe(who as u32, &text, qos(0));
            }
            prop_assert_eq!(tree.len(), subs.len());
            for topic in &topics {
                let mut out = Vec::new();
                tree.matches(topic, |_| true, &mut out);

                let mut plain: Vec<u32> =
                    out.iter().filter(|m| m.group.is_none()).map(|m| m.who).collect();
                plain.sort_unstable();
                let expected: Vec<u32> = subs
                    .iter()
                    .enumerate()
                    .filter(|(_, (g, f))| g.is_none() && reference_matches(f, topic))
                    .map(|(who, _)| who as u32)
                    .collect();
                prop_assert_eq!(plain, expected, "topic {:?}", topic);

                // One pick per matching (share name, filter), from that group's members.
                let mut expected_groups: Vec<(&str, &str)> = subs
                    .iter()
                    .filter_map(|(g, f)| Some(((*g)?, f.as_str())))
                    .filter(|(_, f)| reference_matches(f, topic))
                    .collect();
                expected_groups.sort_unstable();
                expected_groups.dedup();
                let mut picked: Vec<(&str, &str)> = Vec::new();
                for m in &out {
                    let (group, filter) = &subs[m.who as usize];
                    prop_assert_eq!(*group, m.group.as_deref());
                    if let Some(group) = group {
                        picked.push((group, filter));
                    }
                }
                picked.sort_unstable();
                prop_assert_eq!(picked, expected_groups, "topic {:?}", topic);
            }
        }

        #[test]
        fn removing_every_subscription_leaves_no_node(
            subs in subscriptions(),
            order in any::<prop::sample::Index>(),
            by_session in any::<bool>(),
        ) {
            // A few sessions, each possibly holding several of the filters.
            let mut tree = SubscriptionTree::new();
            let owned: Vec<(u32, String)> = subs
                .iter()
                .enumerate()
                .map(|(i, (g, f))| ((i % 3) as u32, filter_text(*g, f)))
                .collect();
            for (who, filter) in &owned {
                tree.subscribe(*who, filter, qos(0));
            }
            if by_session {
                for who in 0..3 {
                    tree.remove_all(&who);
                }
            } else {
                let mut owned = owned;
                let start = if owned.is_empty() { 0 } else { order.index(owned.len()) };
                owned.rotate_left(start);
                for (who, filter) in &owned {
                    tree.unsubscribe(who, filter);
                }
            }
            prop_assert_eq!(tree.len(), 0);
            prop_assert_eq!(tree.node_count(), 0);
            prop_assert!(tree.filters.is_empty());
        }
    }
}
