//! `[auth]`: who may connect (password file, anonymous access, client ids) and what they may
//! do (ACL file). The files themselves are read by `crate::startup` and `crate::auth`.

use std::path::PathBuf;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::{HumanDuration, Invalid};

/// `[auth]`: client authentication (password file) and authorization (ACL file).
///
/// Without this section every client may connect and do anything, and the edge warns at
/// start. Both files are read again on SIGHUP; a file with an error is reported in the log
/// and the rules in force stay.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AuthConfig {
    /// Password file: `user:hash` lines, written by `edge passwd FILE USER` (argon2id).
    /// Files made by Mosquitto's `mosquitto_passwd` (`$6$` and `$7$` hashes) work as they
    /// are. Once set, clients must log in with a user name and password (5.0: 0x86 Bad user
    /// name or password; 3.1.1: return code 4) unless `allow_anonymous = true`.
    pub password_file: Option<PathBuf>,
    /// ACL file in Mosquitto's `acl_file` syntax: `user NAME` starts a user's block,
    /// `topic [read|write|readwrite|deny] FILTER` grants within it (or to anonymous clients
    /// before the first `user` line), `pattern [read|write|readwrite|deny] FILTER` grants to
    /// every client with `%u` (user name) and `%c` (client id) substituted. `read` allows
    /// subscribing, `write` publishing; a matching `deny` wins over any allow. Once set,
    /// everything not allowed is denied: a publish gets 5.0 PUBACK/PUBREC 0x87 (3.1.1: the
    /// connection is closed), a subscription SUBACK 0x87 (3.1.1: 0x80), a will is refused
    /// at CONNECT. A substituted value holding `+`, `#` or `/` never widens a rule.
    /// `group read NAME` lets the user (or anonymous clients) join durable consumer group
    /// NAME (`[[groups]]`).
    pub acl_file: Option<PathBuf>,
    /// Whether clients without credentials may connect. Default: true without a
    /// `password_file` or `tls.client_ca_file` (the edge warns at start), false with
    /// either. Without a password file a
    /// user name sent in CONNECT is not verified, so it is ignored (the client is anonymous).
    pub allow_anonymous: Option<bool>,
    /// How long a refused CONNECT waits before its CONNACK, for the first failure from an
    /// address; each further failure from that address within a minute doubles it.
    pub failure_delay: HumanDuration,
    /// The most a refused CONNECT waits.
    pub max_failure_delay: HumanDuration,
    /// Which client ids a logged-in user may use: `"any"`; `"username"`, the client id
    /// must equal the user name (from the password file or the client certificate);
    /// `"username-prefix"`, it must start with `{user}-` or `{user}/`. Otherwise CONNACK
    /// 0x85 Client identifier not valid (3.1.1: return code 2). Anonymous clients are not
    /// affected. With `"any"` and an ACL that grants by `%c`, any user can claim any
    /// device's client id and with it that device's rights: `edge check-config` warns.
    /// Whatever this says, a persistent session a user started can only be resumed or taken
    /// over by that same user (0x87 Not authorized; 3.1.1: return code 5).
    pub client_id: ClientIdPolicy,
}

/// `auth.client_id`: how client ids are bound to users.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Deserialize, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum ClientIdPolicy {
    /// Any client id.
    #[default]
    Any,
    /// The client id is the user name.
    Username,
    /// The client id starts with `{user}-` or `{user}/`.
    UsernamePrefix,
}

impl ClientIdPolicy {
    /// Whether `user` (`None`: anonymous) may use `client_id`.
    pub fn allows(self, user: Option<&str>, client_id: &str) -> bool {
        let Some(user) = user else { return true };
        match self {
            ClientIdPolicy::Any => true,
            ClientIdPolicy::Username => client_id == user,
            ClientIdPolicy::UsernamePrefix => client_id
                .strip_prefix(user)
                .is_some_and(|rest| rest.starts_with('-') || rest.starts_with('/')),
        }
    }
}

impl Default for AuthConfig {
    fn default() -> Self {
        Self {
            password_file: None,
            acl_file: None,
            allow_anonymous: None,
            failure_delay: HumanDuration(Duration::from_millis(500)),
            max_failure_delay: HumanDuration(Duration::from_secs(10)),
            client_id: ClientIdPolicy::Any,
        }
    }
}

impl AuthConfig {
    /// Whether clients without credentials may connect, after defaults: not once a password
    /// file or client certificates (`mutual_tls`) authenticate clients.
    pub fn anonymous_allowed(&self, mutual_tls: bool) -> bool {
        self.allow_anonymous
            .unwrap_or(self.password_file.is_none() && !mutual_tls)
    }
}

impl AuthConfig {
    /// Checks the settings against each other; `mutual_tls`: TLS clients authenticate with
    /// certificates.
    pub fn validate(&self, mutual_tls: bool) -> Result<(), Invalid> {
        let a = self;
        if a.password_file.is_none() && a.allow_anonymous == Some(false) && !mutual_tls {
            return Err(Invalid::new(
                "auth.allow_anonymous",
                "false without auth.password_file or tls.client_ca_file would refuse every client: set one of them",
            ));
        }
        if a.failure_delay.0 > a.max_failure_delay.0 {
            return Err(Invalid::new(
                "auth.failure_delay",
                format!(
                    "{} is longer than auth.max_failure_delay ({})",
                    a.failure_delay, a.max_failure_delay
                ),
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    #[test]
    fn client_id_policy_binds_ids_to_users_and_leaves_anonymous_alone() {
        use ClientIdPolicy::*;
        assert!(Any.allows(Some("alice"), "bob"));
        assert!(Username.allows(Some("alice"), "alice"));
        assert!(!Username.allows(Some("alice"), "alice-1"));
        assert!(UsernamePrefix.allows(Some("alice"), "alice-1"));
        assert!(UsernamePrefix.allows(Some("alice"), "alice/pump"));
        assert!(!UsernamePrefix.allows(Some("alice"), "alicex"));
        assert!(!UsernamePrefix.allows(Some("alice"), "alice"));
        assert!(!UsernamePrefix.allows(Some("al"), "alice-1"));
        assert!(
            Username.allows(None, "anything"),
            "anonymous clients are not affected"
        );
        let c = Config::parse("[auth]\nclient_id = \"username-prefix\"\n", "e.toml").unwrap();
        assert_eq!(c.auth.client_id, UsernamePrefix);
        assert!(Config::parse("[auth]\nclient_id = \"user\"\n", "e.toml").is_err());
    }

    #[test]
    fn anonymous_access_follows_the_password_file() {
        let c = Config::parse("", "t.toml").unwrap();
        assert!(c.auth.anonymous_allowed(false));
        let c = Config::parse("[auth]\nallow_anonymous = true\n", "t.toml").unwrap();
        assert!(c.auth.anonymous_allowed(false));
        let err = Config::parse("[auth]\nallow_anonymous = false\n", "t.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config t.toml:2: auth.allow_anonymous:")
                && err.contains("password_file"),
            "{err}"
        );
    }

    #[test]
    fn failure_delay_must_not_exceed_its_cap() {
        let err = Config::parse(
            "[auth]\nfailure_delay = \"20s\"\nmax_failure_delay = \"10s\"\n",
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("config t.toml:2: auth.failure_delay:"),
            "{err}"
        );
    }
}
