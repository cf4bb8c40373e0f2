//! Access control lists in Mosquitto's `acl_file` syntax.
//!
//! ```text
//! # comment
//! topic read public/#              # before any `user` line: anonymous clients
//! user alice                       # starts alice's block
//! topic readwrite alice/#          # access defaults to readwrite
//! topic deny alice/secret
//! pattern write devices/%c/#       # every client; %c = client id, %u = user name
//! ```
//!
//! `read` governs SUBSCRIBE (and so delivery), `write` governs PUBLISH (and wills).
//! Decisions, where this edge differs from Mosquitto it is on the safe side:
//! - once an ACL file is configured, anything no rule allows is denied;
//! - a `deny` rule that matches wins over every allow, whatever block it comes from
//!   (Mosquitto 2 lets a user block's allow short-circuit pattern denies);
//! - as in Mosquitto, `topic` lines before the first `user` line apply to anonymous
//!   clients only; a rule for every client is a `pattern` (with or without `%u`/`%c`);
//! - a SUBSCRIBE filter is allowed only if one readable rule covers every topic the filter
//!   can match (`devices/#` is refused when only `devices/%c/#` is readable), and no deny
//!   rule can match any of those topics;
//! - `read` is checked again when a message is delivered, so a subscription made under
//!   rules since revoked (or inherited with a session) delivers only what the rules allow;
//! - a substituted `%u`/`%c` value containing `+`, `#` or `/` (or `%u` of an anonymous
//!   client) never widens access: an allow rule using it matches nothing, and a deny rule
//!   using it denies everything from that level down.

use std::collections::HashMap;
use std::path::Path;

use super::passwords::AuthFileError;

/// What a rule grants.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Subscribe (receive).
    Read,
    /// Publish.
    Write,
    /// Both.
    ReadWrite,
    /// Neither; wins over allows.
    Deny,
}

impl Access {
    fn reads(self) -> bool {
        matches!(self, Access::Read | Access::ReadWrite)
    }
    fn writes(self) -> bool {
        matches!(self, Access::Write | Access::ReadWrite)
    }
}

/// One level of a filter.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Level {
    Exact(String),
    /// `+`
    Single,
    /// `#`, always last.
    Rest,
}

/// One level of a pattern before substitution.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PatternLevel {
    Fixed(Level),
    /// Literal text with `%u` / `%c` inside.
    Template(Vec<Piece>),
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Piece {
    Text(String),
    User,
    Client,
}

#[derive(Debug, Clone)]
struct Rule {
    access: Access,
    levels: Vec<Level>,
}

#[derive(Debug, Clone)]
struct PatternRule {
    access: Access,
    levels: Vec<PatternLevel>,
}

/// A parsed ACL file.
#[derive(Debug, Default)]
pub struct AclFile {
    anonymous: Vec<Rule>,
    users: HashMap<String, Vec<Rule>>,
    patterns: Vec<PatternRule>,
    /// Durable consumer groups that anonymous clients (`group` lines before any `user`)
    /// and each user may join.
    anonymous_groups: std::collections::HashSet<String>,
    user_groups: HashMap<String, std::collections::HashSet<String>>,
}

impl AclFile {
    /// Reads and parses an ACL file.
    pub fn load(path: &Path) -> Result<AclFile, AuthFileError> {
        Self::load_with_text(path).map(|(acl, _)| acl)
    }

    /// Reads and parses an ACL file; returns the text too.
    pub fn load_with_text(path: &Path) -> Result<(AclFile, String), AuthFileError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        let acl = Self::parse(&text, path)?;
        Ok((acl, text))
    }

    /// Parses ACL text; `path` names it in errors.
    pub fn parse(text: &str, path: &Path) -> Result<AclFile, AuthFileError> {
        let mut acl = AclFile::default();
        let mut current_user: Option<String> = None;
        for (i, raw) in text.lines().enumerate() {
            let err = |message: String| AuthFileError::Line {
                path: path.to_path_buf(),
                line: i + 1,
                message,
            };
            let line = raw.trim();
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let (keyword, rest) = match line.split_once(char::is_whitespace) {
                Some((k, r)) => (k, r.trim_start()),
                None => (line, ""),
            };
            match keyword {
                "user" => {
                    if rest.is_empty() {
                        return Err(err("`user` needs a user name: user NAME".into()));
                    }
                    current_user = Some(rest.to_string());
                    acl.users.entry(rest.to_string()).or_default();
                }
                "topic" | "pattern" => {
                    let (access, filter) = split_access(rest);
                    if filter.is_empty() {
                        return Err(err(format!(
                            "`{keyword}` needs a topic filter: {keyword} [read|write|readwrite|deny] FILTER"
                        )));
                    }
                    if keyword == "topic" {
                        let levels = parse_filter(filter).map_err(&err)?;
                        let rule = Rule { access, levels };
                        match &current_user {
                            Some(u) => acl.users.entry(u.clone()).or_default().push(rule),
                            None => acl.anonymous.push(rule),
                        }
                    } else {
                        let levels = parse_pattern(filter).map_err(&err)?;
                        acl.patterns.push(PatternRule { access, levels });
                    }
                }
                "group" => {
                    let name = match rest.split_once(char::is_whitespace) {
                        Some(("read", name)) if !name.trim().is_empty() => name.trim(),
                        _ => {
                            return Err(err(
                                "`group` grants a durable consumer group: group read NAME".into(),
                            ))
                        }
                    };
                    let set = match &current_user {
                        Some(u) => acl.user_groups.entry(u.clone()).or_default(),
                        None => &mut acl.anonymous_groups,
                    };
                    set.insert(name.to_string());
                }
                other => {
                    return Err(err(format!(
                    "unknown keyword {other:?}: lines start with `user`, `topic`, `pattern`, `group` or `#`"
                )))
                }
            }
        }
        Ok(acl)
    }

    /// The rules that apply to one client, with `%u` and `%c` substituted. `user` is the
    /// authenticated user name (`None`: anonymous).
    pub fn for_client(&self, user: Option<&str>, client_id: &str) -> ClientRules {
        let mut rules: Vec<Rule> = match user {
            None => self.anonymous.clone(),
            Some(u) => self.users.get(u).cloned().unwrap_or_default(),
        };
        for p in &self.patterns {
            if let Some(levels) = substitute(&p.levels, user, client_id, p.access == Access::Deny) {
                rules.push(Rule {
                    access: p.access,
                    levels,
                });
            }
        }
        // Denies first: both checks stop at the first deny that applies.
        rules.sort_by_key(|r| r.access != Access::Deny);
        let groups = match user {
            None => self.anonymous_groups.clone(),
            Some(u) => self.user_groups.get(u).cloned().unwrap_or_default(),
        };
        ClientRules { rules, groups }
    }
}

/// `[read|write|readwrite|deny] FILTER` (the access word is optional, default readwrite).
fn split_access(rest: &str) -> (Access, &str) {
    let (word, after) = match rest.split_once(char::is_whitespace) {
        Some((w, a)) => (w, a.trim_start()),
        None => (rest, ""),
    };
    let access = match word {
        "read" => Access::Read,
        "write" => Access::Write,
        "readwrite" => Access::ReadWrite,
        "deny" => Access::Deny,
        // Mosquitto's rule: no access word, the whole rest is the filter.
        _ => return (Access::ReadWrite, rest),
    };
    (access, after)
}

fn parse_filter(text: &str) -> Result<Vec<Level>, String> {
    let parts: Vec<&str> = text.split('/').collect();
    let mut levels = Vec::with_capacity(parts.len());
    for (i, p) in parts.iter().enumerate() {
        levels.push(match *p {
            "+" => Level::Single,
            "#" if i == parts.len() - 1 => Level::Rest,
            "#" => return Err(format!("filter {text:?}: '#' must be the last level")),
            p if p.contains(['+', '#']) => {
                return Err(format!(
                    "filter {text:?}: a wildcard must fill a whole level, as \"a/+/b\" or \"a/#\""
                ))
            }
            p => Level::Exact(p.to_string()),
        });
    }
    Ok(levels)
}

fn parse_pattern(text: &str) -> Result<Vec<PatternLevel>, String> {
    let fixed = parse_filter(text)?;
    Ok(fixed
        .into_iter()
        .map(|level| match level {
            Level::Exact(s) if s.contains("%u") || s.contains("%c") => {
                let mut pieces = Vec::new();
                let mut rest = s.as_str();
                while let Some(at) = rest.find('%') {
                    let marker = &rest[at..];
                    let piece = if marker.starts_with("%u") {
                        Some(Piece::User)
                    } else if marker.starts_with("%c") {
                        Some(Piece::Client)
                    } else {
                        None
                    };
                    match piece {
                        Some(p) => {
                            if at > 0 {
                                pieces.push(Piece::Text(rest[..at].to_string()));
                            }
                            pieces.push(p);
                            rest = &rest[at + 2..];
                        }
                        None => {
                            pieces.push(Piece::Text(rest[..at + 1].to_string()));
                            rest = &rest[at + 1..];
                        }
                    }
                }
                if !rest.is_empty() {
                    pieces.push(Piece::Text(rest.to_string()));
                }
                PatternLevel::Template(pieces)
            }
            other => PatternLevel::Fixed(other),
        })
        .collect())
}

/// A value that may replace `%u` / `%c` without changing the shape of the filter.
fn safe_value(v: &str) -> bool {
    !v.is_empty() && !v.contains(['+', '#', '/', '\0'])
}

/// The pattern for one client. An unsafe value: `None` for an allow (it matches nothing),
/// and a deny truncated to `#` at that level (it denies everything below).
fn substitute(
    levels: &[PatternLevel],
    user: Option<&str>,
    client_id: &str,
    deny: bool,
) -> Option<Vec<Level>> {
    let mut out = Vec::with_capacity(levels.len());
    for level in levels {
        match level {
            PatternLevel::Fixed(l) => out.push(l.clone()),
            PatternLevel::Template(pieces) => {
                let mut text = String::new();
                let mut safe = true;
                for p in pieces {
                    match p {
                        Piece::Text(t) => text.push_str(t),
                        Piece::User => match user {
                            Some(u) if safe_value(u) => text.push_str(u),
                            _ => safe = false,
                        },
                        Piece::Client if safe_value(client_id) => text.push_str(client_id),
                        Piece::Client => safe = false,
                    }
                }
                if !safe {
                    if deny {
                        out.push(Level::Rest);
                        return Some(out);
                    }
                    return None;
                }
                out.push(Level::Exact(text));
            }
        }
    }
    Some(out)
}

/// The rules of one client, denies first.
#[derive(Debug, Clone, Default)]
pub struct ClientRules {
    rules: Vec<Rule>,
    groups: std::collections::HashSet<String>,
}

impl ClientRules {
    /// Whether the client may join durable consumer group `name` (`group read NAME`).
    pub fn may_join_group(&self, name: &str) -> bool {
        self.groups.contains(name)
    }

    /// Whether the client may publish to `topic` (a topic name, no wildcards).
    pub fn may_publish(&self, topic: &str) -> bool {
        for r in &self.rules {
            if r.access == Access::Deny {
                if matches_topic(&r.levels, topic) {
                    return false;
                }
            } else if r.access.writes() && matches_topic(&r.levels, topic) {
                return true;
            }
        }
        false
    }

    /// Whether a message on `topic` may be delivered to the client (checked at delivery, so
    /// a subscription made under rules since revoked, or a session taken over by another
    /// user, delivers nothing the current rules do not allow).
    pub fn may_read(&self, topic: &str) -> bool {
        for r in &self.rules {
            if r.access == Access::Deny {
                if matches_topic(&r.levels, topic) {
                    return false;
                }
            } else if r.access.reads() && matches_topic(&r.levels, topic) {
                return true;
            }
        }
        false
    }

    /// Whether the client may subscribe to `filter` (a valid filter; a shared subscription's
    /// `$share/{group}/` prefix is looked through).
    pub fn may_subscribe(&self, filter: &str) -> bool {
        let inner = match filter.strip_prefix("$share/") {
            Some(rest) => match rest.split_once('/') {
                Some((_, f)) => f,
                None => return false,
            },
            None => filter,
        };
        let Ok(levels) = parse_filter(inner) else {
            return false;
        };
        for r in &self.rules {
            if r.access == Access::Deny {
                if overlaps(&r.levels, &levels) {
                    return false;
                }
            } else if r.access.reads() && covers(&r.levels, &levels) {
                return true;
            }
        }
        false
    }
}

fn starts_with_wildcard(levels: &[Level]) -> bool {
    matches!(levels.first(), Some(Level::Single | Level::Rest))
}

fn starts_with_dollar(levels: &[Level]) -> bool {
    matches!(levels.first(), Some(Level::Exact(s)) if s.starts_with('$'))
}

/// MQTT matching, with a leading wildcard not matching `$` topics.
fn matches_topic(rule: &[Level], topic: &str) -> bool {
    if topic.starts_with('$') && starts_with_wildcard(rule) {
        return false;
    }
    let mut t = topic.split('/');
    for level in rule {
        match level {
            Level::Rest => return true,
            Level::Single => {
                if t.next().is_none() {
                    return false;
                }
            }
            Level::Exact(want) => match t.next() {
                Some(got) if got == want => {}
                _ => return false,
            },
        }
    }
    t.next().is_none()
}

/// Whether every topic `filter` matches is matched by `rule`.
fn covers(rule: &[Level], filter: &[Level]) -> bool {
    if starts_with_wildcard(rule) && starts_with_dollar(filter) {
        return false;
    }
    fn go(r: &[Level], f: &[Level]) -> bool {
        match (r.first(), f.first()) {
            (Some(Level::Rest), _) => true,
            (None, None) => true,
            (None, Some(_)) | (Some(_), None) => false,
            (Some(_), Some(Level::Rest)) => false,
            (Some(Level::Single), Some(_)) => go(&r[1..], &f[1..]),
            (Some(Level::Exact(_)), Some(Level::Single)) => false,
            (Some(Level::Exact(a)), Some(Level::Exact(b))) => a == b && go(&r[1..], &f[1..]),
        }
    }
    go(rule, filter)
}

/// Whether some topic is matched by both filters.
fn overlaps(a: &[Level], b: &[Level]) -> bool {
    if (starts_with_wildcard(a) && starts_with_dollar(b))
        || (starts_with_wildcard(b) && starts_with_dollar(a))
    {
        return false;
    }
    fn go(a: &[Level], b: &[Level]) -> bool {
        match (a.first(), b.first()) {
            (Some(Level::Rest), _) | (_, Some(Level::Rest)) => true,
            (None, None) => true,
            (None, Some(_)) | (Some(_), None) => false,
            (Some(Level::Exact(x)), Some(Level::Exact(y))) => x == y && go(&a[1..], &b[1..]),
            _ => go(&a[1..], &b[1..]),
        }
    }
    go(a, b)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl(text: &str) -> AclFile {
        AclFile::parse(text, Path::new("acl")).unwrap()
    }

    #[test]
    fn group_lines_grant_durable_groups_per_user_and_to_anonymous_clients() {
        let acl = AclFile::parse(
            "group read public\nuser alice\ngroup read alarms\ntopic read sensors/#\nuser bob\n",
            Path::new("acl"),
        )
        .unwrap();
        let alice = acl.for_client(Some("alice"), "a");
        assert!(alice.may_join_group("alarms"));
        assert!(
            !alice.may_join_group("public"),
            "anonymous grants are for anonymous clients"
        );
        assert!(!acl.for_client(Some("bob"), "b").may_join_group("alarms"));
        assert!(acl.for_client(None, "x").may_join_group("public"));
        for bad in ["group alarms", "group read", "group write alarms"] {
            let e = AclFile::parse(bad, Path::new("acl"))
                .unwrap_err()
                .to_string();
            assert!(e.contains("group read NAME"), "{bad}: {e}");
        }
    }

    #[test]
    fn client_id_pattern_isolates_devices() {
        let a = acl("pattern write devices/%c/#\npattern read devices/%c/commands/#\n");
        let dev_a = a.for_client(Some("dev-a"), "dev-a");
        assert!(dev_a.may_publish("devices/dev-a/x"));
        assert!(dev_a.may_publish("devices/dev-a"));
        assert!(!dev_a.may_publish("devices/dev-b/x"));
        assert!(dev_a.may_subscribe("devices/dev-a/commands/#"));
        assert!(!dev_a.may_subscribe("devices/dev-b/commands/#"));
        assert!(!dev_a.may_subscribe("devices/+/commands/#"));
        assert!(dev_a.may_read("devices/dev-a/commands/reboot"));
        assert!(!dev_a.may_read("devices/dev-a/x"));
        assert!(!dev_a.may_read("devices/dev-b/commands/reboot"));
        let dev_b = a.for_client(None, "dev-b");
        assert!(dev_b.may_publish("devices/dev-b/x"));
        assert!(!dev_b.may_publish("devices/dev-a/x"));
    }

    #[test]
    fn wildcard_or_slash_in_client_id_never_widens_an_allow() {
        let a = acl("pattern readwrite devices/%c/#\n");
        for id in ["+", "#", "dev-a/x", "a+b"] {
            let r = a.for_client(None, id);
            assert!(!r.may_publish("devices/dev-a/x"), "{id}");
            assert!(!r.may_publish("devices/dev-a/x/y"), "{id}");
            assert!(!r.may_subscribe("devices/+/#"), "{id}");
            assert!(!r.may_subscribe("devices/#"), "{id}");
        }
    }

    #[test]
    fn unsafe_value_in_a_deny_pattern_denies_below_it() {
        let a = acl("topic readwrite devices/#\npattern deny devices/%c/config\n");
        let ok = a.for_client(None, "dev-a");
        assert!(!ok.may_publish("devices/dev-a/config"));
        assert!(ok.may_publish("devices/dev-b/config"));
        let odd = a.for_client(None, "dev-a/x");
        assert!(!odd.may_publish("devices/dev-a/x/config"));
        assert!(!odd.may_publish("devices/anything"));
    }

    #[test]
    fn user_pattern_needs_a_user() {
        let a = acl("pattern readwrite users/%u/#\n");
        assert!(a.for_client(Some("bob"), "c1").may_publish("users/bob/x"));
        assert!(!a.for_client(None, "c1").may_publish("users/bob/x"));
        assert!(!a.for_client(None, "c1").may_subscribe("users/+/x"));
    }

    #[test]
    fn user_blocks_and_global_topics() {
        let a = acl(
            "# global\ntopic read public/#\n\nuser alice\ntopic alice/#\ntopic deny alice/secret\nuser bob\ntopic write bob/out\n",
        );
        let alice = a.for_client(Some("alice"), "x");
        assert!(alice.may_publish("alice/a"));
        assert!(!alice.may_publish("alice/secret"));
        assert!(alice.may_subscribe("alice/a"));
        assert!(alice.may_subscribe("alice/a/#"));
        assert!(
            !alice.may_subscribe("alice/+"),
            "can match the denied topic"
        );
        assert!(
            !alice.may_subscribe("alice/#"),
            "can match the denied topic"
        );
        assert!(
            !alice.may_subscribe("public/#"),
            "rules before any user line are for anonymous clients (as in Mosquitto)"
        );
        let bob = a.for_client(Some("bob"), "y");
        assert!(bob.may_publish("bob/out"));
        assert!(!bob.may_subscribe("bob/out"));
        assert!(!bob.may_publish("alice/a"));
        let anon = a.for_client(None, "z");
        assert!(anon.may_subscribe("public/a/b"));
        assert!(!anon.may_publish("alice/a"));
    }

    #[test]
    fn nothing_is_allowed_without_a_rule() {
        let a = acl("");
        let r = a.for_client(Some("u"), "c");
        assert!(!r.may_publish("a"));
        assert!(!r.may_subscribe("#"));
    }

    #[test]
    fn subscribe_needs_a_covering_rule() {
        let a = acl("topic read sensors/+/temp\ntopic read logs/#\n");
        let r = a.for_client(None, "c");
        assert!(r.may_subscribe("sensors/a/temp"));
        assert!(r.may_subscribe("sensors/+/temp"));
        assert!(!r.may_subscribe("sensors/#"));
        assert!(!r.may_subscribe("sensors/+/+"));
        assert!(!r.may_subscribe("sensors/a/temp/x"));
        assert!(r.may_subscribe("logs"));
        assert!(r.may_subscribe("logs/#"));
        assert!(r.may_subscribe("logs/+/x"));
        assert!(r.may_subscribe("$share/g/logs/#"));
        assert!(!r.may_subscribe("#"));
        assert!(!r.may_subscribe("+/#"));
    }

    #[test]
    fn leading_wildcards_do_not_reach_dollar_topics() {
        let a = acl("topic readwrite #\n");
        let r = a.for_client(None, "c");
        assert!(r.may_publish("a/b"));
        assert!(!r.may_publish("$SYS/x"));
        assert!(!r.may_subscribe("$SYS/#"));
        assert!(r.may_subscribe("#"));
        let d = acl("topic read $SYS/#\ntopic deny #\n");
        assert!(d.for_client(None, "c").may_subscribe("$SYS/broker/x"));
    }

    #[test]
    fn deny_wins_over_allow() {
        let a = acl("topic readwrite a/#\nuser u\ntopic readwrite a/b\npattern deny a/%u\n");
        let r = a.for_client(Some("u"), "c");
        assert!(!r.may_publish("a/u"));
        assert!(r.may_publish("a/b"));
        assert!(!r.may_subscribe("a/+"));
    }

    #[test]
    fn pattern_levels_mix_text_and_markers() {
        let a = acl("pattern write t/%u-%c/x%\n");
        let r = a.for_client(Some("u1"), "c1");
        assert!(r.may_publish("t/u1-c1/x%"));
        assert!(!r.may_publish("t/u1-c2/x%"));
    }

    #[test]
    fn errors_name_file_and_line() {
        let e = AclFile::parse("topic read a/#\n\nfoo bar\n", Path::new("acl.conf"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("acl.conf:3: unknown keyword \"foo\""), "{e}");
        let e = AclFile::parse("user\n", Path::new("acl.conf"))
            .unwrap_err()
            .to_string();
        assert!(e.starts_with("acl.conf:1:"), "{e}");
        let e = AclFile::parse("topic read a/#/b\n", Path::new("acl.conf"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("acl.conf:1:") && e.contains("last level"), "{e}");
        let e = AclFile::parse("pattern deny\n", Path::new("acl.conf"))
            .unwrap_err()
            .to_string();
        assert!(e.contains("needs a topic filter"), "{e}");
    }
}
