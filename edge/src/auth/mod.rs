//! Who may connect (password file, client certificates) and what they may do (ACL file).
//!
//! Both files are read at start and again on SIGHUP ([`Auth::reload`]); a file that fails
//! to load on reload is reported and the rules in force stay. Connections look at the ACL
//! generation before they use a cached decision, so after a reload their next publish or
//! subscribe follows the new rules.

pub mod acl;
pub mod passwords;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use acl::{AclFile, ClientRules};
use passwords::{AuthFileError, PasswordFile, StoredHash};

use crate::config::{AuthConfig, ClientIdPolicy};

/// Settings that are valid but unsafe, each as a sentence for the operator; `acl_text` is
/// the text of `config.acl_file` as loaded.
pub fn warnings(config: &AuthConfig, acl_text: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    if let (ClientIdPolicy::Any, Some(acl), Some(text)) =
        (config.client_id, &config.acl_file, acl_text)
    {
        let uses_client_id = text
            .lines()
            .map(str::trim_start)
            .any(|l| l.starts_with("pattern") && l.contains("%c"));
        if uses_client_id {
            out.push(format!(
                "auth.acl_file {} grants by %c (client id) while auth.client_id = \"any\": \
                 any user can connect with a device's client id and get its rights (take \
                 over its session, read its commands, publish as it); set auth.client_id \
                 = \"username\" or \"username-prefix\"",
                acl.display()
            ));
        }
    }
    out
}

/// Failed logins from one address are forgotten after this long without another.
const FAILURE_QUIET: Duration = Duration::from_secs(60);
/// Addresses whose failures are remembered at once (the oldest are forgotten first).
const FAILURE_TABLE_ENTRIES: usize = 10_000;

/// Why a CONNECT is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LoginRefusal {
    /// Unknown user or wrong password: 5.0 0x86, 3.1.1 return code 4.
    BadCredentials,
    /// Not allowed to connect (anonymous when anonymous access is off): 5.0 0x87, 3.1.1
    /// return code 5.
    NotAuthorized,
}

/// Counters exported on /metrics.
#[derive(Debug, Default)]
pub struct AuthStats {
    /// Publishes (and wills) refused by the ACL.
    pub publishes_denied: AtomicU64,
    /// Subscription filters refused by the ACL.
    pub subscriptions_denied: AtomicU64,
    /// CONNECTs refused for bad credentials or missing authorization.
    pub failures: AtomicU64,
}

/// Logins one source address may have in progress at once (a NAT gateway's fleet
/// reconnecting together stays far below it unless the password checks are queued up).
pub const MAX_LOGINS_PER_ADDRESS: u32 = 64;

/// A login's place in its address' share, given back on drop.
pub struct LoginSlot<'a> {
    auth: &'a Auth,
    ip: IpAddr,
}

impl Drop for LoginSlot<'_> {
    fn drop(&mut self) {
        let mut map = self.auth.logins_per_address.lock().expect("logins lock");
        if let Some(n) = map.get_mut(&self.ip) {
            *n -= 1;
            if *n == 0 {
                map.remove(&self.ip);
            }
        }
    }
}

/// Authentication and authorization state shared by all connections.
pub struct Auth {
    password_file: Option<PathBuf>,
    acl_file: Option<PathBuf>,
    allow_anonymous: bool,
    passwords: RwLock<Option<Arc<PasswordFile>>>,
    acl: RwLock<Option<Arc<AclFile>>>,
    /// Bumped by every ACL reload; connections compare it with the generation of the rules
    /// they hold.
    acl_generation: AtomicU64,
    /// Password checks running at once: each argon2 check takes ~19 MiB and a core for tens
    /// of milliseconds, so a flood of CONNECTs queues here instead of exhausting memory and
    /// CPU.
    verifying: Arc<tokio::sync::Semaphore>,
    /// Logins in progress (waiting for or in a password check) per source address: each
    /// address gets a fair share of the queue, so a flood of bogus logins from one place
    /// cannot keep real devices waiting behind it.
    logins_per_address: std::sync::Mutex<HashMap<IpAddr, u32>>,
    delays: FailureDelays,
    /// Which client ids a user may use.
    pub client_id_policy: ClientIdPolicy,
    /// A hash checked for unknown users, so they take as long to refuse as wrong passwords
    /// (made only when a password file is configured).
    decoy: Option<StoredHash>,
    /// Counters.
    pub stats: AuthStats,
}

impl std::fmt::Debug for Auth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Auth")
            .field("password_file", &self.password_file)
            .field("acl_file", &self.acl_file)
            .field("allow_anonymous", &self.allow_anonymous)
            .finish_non_exhaustive()
    }
}

impl Auth {
    /// Loads the configured files. `mutual_tls`: TLS clients authenticate with certificates
    /// (so anonymous access is off unless the config allows it).
    pub fn new(config: &AuthConfig, mutual_tls: bool) -> Result<Auth, AuthFileError> {
        let passwords = match &config.password_file {
            Some(p) => Some(PasswordFile::load(p)?),
            None => None,
        };
        let acl = match &config.acl_file {
            Some(p) => Some(AclFile::load(p)?),
            None => None,
        };
        Ok(Auth::with_files(config, mutual_tls, passwords, acl))
    }

    /// Authentication over files already loaded from `config`'s `password_file` and
    /// `acl_file` (which [`Auth::reload`] reads again).
    pub fn with_files(
        config: &AuthConfig,
        mutual_tls: bool,
        passwords: Option<PasswordFile>,
        acl: Option<AclFile>,
    ) -> Auth {
        let passwords = passwords.map(Arc::new);
        let acl = acl.map(Arc::new);
        // Half the cores at most, so a flood of bad logins cannot starve the publish path.
        let parallel = std::thread::available_parallelism().map_or(1, |n| (n.get() / 2).max(1));
        let decoy = passwords.as_ref().map(|_| {
            let h = passwords::hash_password(b"decoy").expect("argon2 hashes with defaults");
            StoredHash::parse(&h).expect("our own hash parses")
        });
        Auth {
            password_file: config.password_file.clone(),
            acl_file: config.acl_file.clone(),
            allow_anonymous: config.anonymous_allowed(mutual_tls),
            passwords: RwLock::new(passwords),
            acl: RwLock::new(acl),
            acl_generation: AtomicU64::new(0),
            verifying: Arc::new(tokio::sync::Semaphore::new(parallel)),
            logins_per_address: Default::default(),
            client_id_policy: config.client_id,
            delays: FailureDelays::new(config.failure_delay.0, config.max_failure_delay.0),
            decoy,
            stats: AuthStats::default(),
        }
    }

    /// Whether clients without credentials may connect.
    pub fn anonymous_allowed(&self) -> bool {
        self.allow_anonymous
    }

    /// Whether an ACL file is configured (then everything it does not allow is denied).
    pub fn has_acl(&self) -> bool {
        self.acl_file.is_some()
    }

    /// Reads the password and ACL files again. On an error the rules in force stay and the
    /// error is returned; a file that loaded is used even if the other failed.
    pub fn reload(&self) -> Result<(), String> {
        let mut errors = Vec::new();
        if let Some(p) = &self.password_file {
            match PasswordFile::load(p) {
                Ok(f) => {
                    let users = f.len();
                    *self.passwords.write().expect("passwords lock") = Some(Arc::new(f));
                    tracing::info!(file = %p.display(), users, "password file reloaded");
                }
                Err(e) => errors.push(format!("{e} (the previous users stay in force)")),
            }
        }
        if let Some(p) = &self.acl_file {
            match AclFile::load(p) {
                Ok(f) => {
                    *self.acl.write().expect("acl lock") = Some(Arc::new(f));
                    self.acl_generation.fetch_add(1, Ordering::Release);
                    tracing::info!(file = %p.display(), "ACL file reloaded");
                }
                Err(e) => errors.push(format!("{e} (the previous rules stay in force)")),
            }
        }
        if errors.is_empty() {
            Ok(())
        } else {
            Err(errors.join("; "))
        }
    }

    /// Decides a CONNECT. `cert_user` is the identity of a verified client certificate,
    /// which needs no password. Returns the user name the client acts as (`None`:
    /// anonymous). Without a password file a user name in CONNECT is not verified, so it
    /// is not trusted either: such a client is anonymous.
    pub async fn authenticate(
        &self,
        username: Option<&str>,
        password: Option<&str>,
        cert_user: Option<String>,
    ) -> Result<Option<String>, LoginRefusal> {
        if let Some(user) = cert_user {
            return Ok(Some(user));
        }
        let passwords = self.passwords.read().expect("passwords lock").clone();
        let Some(passwords) = passwords else {
            return if self.allow_anonymous {
                Ok(None)
            } else {
                Err(LoginRefusal::NotAuthorized)
            };
        };
        let Some(user) = username else {
            if password.is_some() {
                return Err(LoginRefusal::BadCredentials);
            }
            return if self.allow_anonymous {
                Ok(None)
            } else {
                Err(LoginRefusal::NotAuthorized)
            };
        };
        let Some(password) = password else {
            return Err(LoginRefusal::BadCredentials);
        };
        let (hash, known) = match (passwords.get(user), &self.decoy) {
            (Some(h), _) => (h.clone(), true),
            (None, Some(decoy)) => (decoy.clone(), false),
            (None, None) => return Err(LoginRefusal::BadCredentials),
        };
        let permit = self
            .verifying
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| LoginRefusal::NotAuthorized)?;
        let password = password.as_bytes().to_vec();
        let matched = tokio::task::spawn_blocking(move || {
            let ok = hash.verify(&password);
            drop(permit);
            ok
        })
        .await
        .unwrap_or(false);
        if matched && known {
            Ok(Some(user.to_string()))
        } else {
            Err(LoginRefusal::BadCredentials)
        }
    }

    /// Takes a place for a login from `ip` among the [`MAX_LOGINS_PER_ADDRESS`] one address
    /// may have in progress; `None` when it has them all (the CONNECT is refused as busy).
    /// The place is given back when the returned guard drops.
    pub fn login_slot(&self, ip: IpAddr) -> Option<LoginSlot<'_>> {
        let ip = ip.to_canonical();
        let mut map = self.logins_per_address.lock().expect("logins lock");
        let n = map.entry(ip).or_insert(0);
        if *n >= MAX_LOGINS_PER_ADDRESS {
            return None;
        }
        *n += 1;
        Some(LoginSlot { auth: self, ip })
    }

    /// Records a refused login from `ip`; returns how long to wait before answering it.
    pub fn record_failure(&self, ip: IpAddr) -> Duration {
        self.stats.failures.fetch_add(1, Ordering::Relaxed);
        self.delays.record(ip, Instant::now())
    }

    /// The generation of the ACL in force.
    pub fn acl_generation(&self) -> u64 {
        self.acl_generation.load(Ordering::Acquire)
    }

    /// The rules of one client under the ACL in force, with their generation; `None`
    /// without an ACL file.
    pub fn client_rules(&self, user: Option<&str>, client_id: &str) -> Option<ConnAcl> {
        let acl = self.acl.read().expect("acl lock");
        // A reload bumps the generation after it replaced the rules, so rules read here are
        // at least as new as this generation (at worst a connection refreshes once more).
        let generation = self.acl_generation();
        let rules = acl.as_ref()?.for_client(user, client_id);
        Some(ConnAcl {
            user: user.map(str::to_string),
            rules,
            generation,
        })
    }
}

/// The ACL rules one connection holds.
#[derive(Debug, Clone)]
pub struct ConnAcl {
    /// The user the client acts as.
    pub user: Option<String>,
    /// Its rules.
    pub rules: ClientRules,
    /// The ACL generation they come from.
    pub generation: u64,
}

impl ConnAcl {
    /// Takes the current rules if the ACL was reloaded; returns whether it was.
    pub fn refresh(&mut self, auth: &Auth, client_id: &str) -> bool {
        if auth.acl_generation() == self.generation {
            return false;
        }
        if let Some(fresh) = auth.client_rules(self.user.as_deref(), client_id) {
            *self = fresh;
        }
        true
    }
}

/// The delay before a refused CONNECT is answered: `initial` for the first failure from
/// an address, doubling with each further one up to `max`, forgotten after a quiet
/// minute. Bounded memory: at most `FAILURE_TABLE_ENTRIES` addresses.
#[derive(Debug)]
struct FailureDelays {
    initial: Duration,
    max: Duration,
    table: Mutex<HashMap<IpAddr, (u32, Instant)>>,
}

impl FailureDelays {
    fn new(initial: Duration, max: Duration) -> FailureDelays {
        FailureDelays {
            initial,
            max,
            table: Mutex::new(HashMap::new()),
        }
    }

    fn record(&self, ip: IpAddr, now: Instant) -> Duration {
        let mut table = self.table.lock().expect("failure table lock");
        if table.len() >= FAILURE_TABLE_ENTRIES && !table.contains_key(&ip) {
            table.retain(|_, (_, last)| now.duration_since(*last) < FAILURE_QUIET);
            if table.len() >= FAILURE_TABLE_ENTRIES {
                if let Some(oldest) = table.iter().min_by_key(|(_, (_, t))| *t).map(|(k, _)| *k) {
                    table.remove(&oldest);
                }
            }
        }
        let entry = table.entry(ip).or_insert((0, now));
        if now.duration_since(entry.1) >= FAILURE_QUIET {
            entry.0 = 0;
        }
        entry.0 = entry.0.saturating_add(1);
        entry.1 = now;
        let doublings = (entry.0 - 1).min(31);
        self.initial
            .checked_mul(1u32 << doublings)
            .unwrap_or(self.max)
            .min(self.max)
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.table.lock().unwrap().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::Ipv4Addr;

    fn ip(n: u32) -> IpAddr {
        IpAddr::V4(Ipv4Addr::from(n))
    }

    #[test]
    fn acl_granting_by_client_id_warns_while_any_user_may_take_any_client_id() {
        let config = AuthConfig {
            acl_file: Some("acl".into()),
            ..Default::default()
        };
        let by_client_id = "user bob\ntopic read bob/#\n  pattern readwrite devices/%c/#\n";
        let said = warnings(&config, Some(by_client_id));
        assert_eq!(said.len(), 1, "{said:?}");
        assert!(said[0].contains("auth.acl_file acl grants by %c"));
        assert!(warnings(&config, Some("pattern read devices/%u/#\n")).is_empty());
        let bound = AuthConfig {
            client_id: ClientIdPolicy::Username,
            ..config
        };
        assert!(warnings(&bound, Some(by_client_id)).is_empty());
    }

    #[test]
    fn failure_delay_doubles_to_its_cap() {
        let d = FailureDelays::new(Duration::from_millis(500), Duration::from_secs(10));
        let t = Instant::now();
        let got: Vec<u128> = (0..8)
            .map(|i| d.record(ip(1), t + Duration::from_secs(i)).as_millis())
            .collect();
        assert_eq!(got, [500, 1000, 2000, 4000, 8000, 10000, 10000, 10000]);
    }

    #[test]
    fn failure_delay_is_per_address_and_decays_after_quiet() {
        let d = FailureDelays::new(Duration::from_millis(500), Duration::from_secs(10));
        let t = Instant::now();
        d.record(ip(1), t);
        assert_eq!(d.record(ip(1), t).as_millis(), 1000);
        assert_eq!(d.record(ip(2), t).as_millis(), 500);
        let later = t + FAILURE_QUIET + Duration::from_secs(1);
        assert_eq!(d.record(ip(1), later).as_millis(), 500);
    }

    #[test]
    fn failure_table_is_bounded() {
        let d = FailureDelays::new(Duration::from_millis(1), Duration::from_secs(1));
        let t = Instant::now();
        for n in 0..(FAILURE_TABLE_ENTRIES as u32 + 50) {
            d.record(ip(n), t + Duration::from_millis(u64::from(n)));
        }
        assert_eq!(d.len(), FAILURE_TABLE_ENTRIES);
        // The oldest went first; a recent one is still remembered.
        let last = FAILURE_TABLE_ENTRIES as u32 + 49;
        assert_eq!(
            d.record(ip(last), t + Duration::from_secs(20)).as_millis(),
            2
        );
    }

    fn auth_with(password_file: Option<&str>, allow_anonymous: Option<bool>) -> Auth {
        let dir = tempfile::tempdir().unwrap();
        let mut config = AuthConfig::default();
        if let Some(text) = password_file {
            let p = dir.path().join("pw");
            std::fs::write(&p, text).unwrap();
            config.password_file = Some(p);
        }
        config.allow_anonymous = allow_anonymous;
        Auth::new(&config, false).unwrap()
    }

    #[tokio::test]
    async fn logins_are_decided_by_the_password_file() {
        let h = passwords::hash_password(b"right").unwrap();
        let auth = auth_with(Some(&format!("alice:{h}\n")), None);
        assert!(!auth.anonymous_allowed());
        assert_eq!(
            auth.authenticate(Some("alice"), Some("right"), None).await,
            Ok(Some("alice".into()))
        );
        assert_eq!(
            auth.authenticate(Some("alice"), Some("wrong"), None).await,
            Err(LoginRefusal::BadCredentials)
        );
        assert_eq!(
            auth.authenticate(Some("mallory"), Some("right"), None)
                .await,
            Err(LoginRefusal::BadCredentials)
        );
        assert_eq!(
            auth.authenticate(Some("alice"), None, None).await,
            Err(LoginRefusal::BadCredentials)
        );
        assert_eq!(
            auth.authenticate(None, None, None).await,
            Err(LoginRefusal::NotAuthorized)
        );
        assert_eq!(
            auth.authenticate(None, None, Some("dev-7".into())).await,
            Ok(Some("dev-7".into()))
        );
    }

    #[tokio::test]
    async fn anonymous_may_be_allowed_next_to_a_password_file() {
        let h = passwords::hash_password(b"right").unwrap();
        let auth = auth_with(Some(&format!("alice:{h}\n")), Some(true));
        assert_eq!(auth.authenticate(None, None, None).await, Ok(None));
        assert_eq!(
            auth.authenticate(Some("alice"), Some("wrong"), None).await,
            Err(LoginRefusal::BadCredentials)
        );
    }

    #[tokio::test]
    async fn without_a_password_file_user_names_are_not_trusted() {
        let auth = auth_with(None, None);
        assert!(auth.anonymous_allowed());
        assert_eq!(
            auth.authenticate(Some("admin"), Some("x"), None).await,
            Ok(None)
        );
    }

    #[test]
    fn acl_reload_bumps_the_generation_and_keeps_rules_on_error() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("acl");
        std::fs::write(&p, "pattern write devices/%c/#\n").unwrap();
        let config = AuthConfig {
            acl_file: Some(p.clone()),
            ..AuthConfig::default()
        };
        let auth = Auth::new(&config, false).unwrap();
        let mut conn = auth.client_rules(None, "dev-a").unwrap();
        assert!(conn.rules.may_publish("devices/dev-a/x"));
        assert!(!conn.refresh(&auth, "dev-a"));

        std::fs::write(&p, "pattern write other/%c/#\n").unwrap();
        auth.reload().unwrap();
        assert!(conn.refresh(&auth, "dev-a"));
        assert!(!conn.rules.may_publish("devices/dev-a/x"));
        assert!(conn.rules.may_publish("other/dev-a/x"));

        std::fs::write(&p, "topik read x\n").unwrap();
        let err = auth.reload().unwrap_err();
        assert!(err.contains(":1: unknown keyword"), "{err}");
        assert!(!conn.refresh(&auth, "dev-a"));
        assert!(auth
            .client_rules(None, "dev-a")
            .unwrap()
            .rules
            .may_publish("other/dev-a/x"));
    }
}
