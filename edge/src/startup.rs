//! Start-up: from a parsed [`Config`] to what a node runs with, every file it names read
//! once.
//!
//! `config` checks each value on its own; this step does what needs more than the config.
//! It builds the routing table ([`RoutePlan`]), reads the password and ACL files
//! ([`crate::auth`]), the TLS certificate, key and client CA ([`crate::mqtt::tls`]), the
//! admin token file and the mirror's SASL password file, and makes the checks that span
//! sections (mirrored topics and consumer groups must be topics of the edge). Serving and
//! `edge check-config` both go through [`load`], so they report the same errors, each
//! naming the file, the line and the key; the node then starts from the values loaded here
//! instead of reading the files again. (SIGHUP reads the auth and TLS files anew.)

use std::collections::BTreeMap;

use crate::admin::hosts::AllowedHosts;
use crate::auth::acl::AclFile;
use crate::auth::passwords::PasswordFile;
use crate::config::{AdminConfig, Config, ConfigError, Source};
use crate::mqtt::tls::TlsServer;
use crate::route::RoutePlan;

/// A configuration with everything its files hold.
pub struct LoadedConfig {
    /// The configuration.
    pub config: Config,
    /// Its routing table and log topics.
    pub plan: RoutePlan,
    /// The password and ACL files.
    pub auth: AuthFiles,
    /// The certificate, key and client CA of each TLS listener, by the listener's key
    /// (`listeners[0]`, `tls`).
    pub tls: BTreeMap<String, TlsServer>,
    /// The admin endpoint's token and hosts; `None` when the endpoint is off.
    pub admin: Option<AdminAccess>,
    /// The mirror's settings, with `[cloud]`.
    pub mirror: Option<cloud_sync::MirrorConfig>,
}

/// The files of `[auth]`, loaded.
#[derive(Debug, Default)]
pub struct AuthFiles {
    /// The users of `auth.password_file`.
    pub passwords: Option<PasswordFile>,
    /// The rules of `auth.acl_file`.
    pub acl: Option<AclFile>,
    /// Settings that are valid but unsafe, each a sentence for the operator.
    pub warnings: Vec<String>,
}

/// Who may use the admin endpoint.
#[derive(Debug)]
pub struct AdminAccess {
    /// The bearer token every request must carry, if any.
    pub token: Option<String>,
    /// The `Host` header values answered.
    pub allowed_hosts: AllowedHosts,
}

impl AdminAccess {
    /// The hosts and the token of `config` (reading `token_file` when that is set); an error
    /// names the key within `[admin]`.
    pub fn read(config: &AdminConfig) -> Result<AdminAccess, (&'static str, String)> {
        let allowed_hosts = allowed_hosts(config)?;
        let token = token(config)?;
        Ok(AdminAccess {
            token,
            allowed_hosts,
        })
    }
}

/// The hosts the admin endpoint answers to.
fn allowed_hosts(config: &AdminConfig) -> Result<AllowedHosts, (&'static str, String)> {
    let listen = config
        .address()
        .map_or(std::net::Ipv4Addr::LOCALHOST.into(), |(addr, _)| addr.ip());
    AllowedHosts::new(&config.allowed_hosts, listen).map_err(|message| ("allowed_hosts", message))
}

/// The admin token, read from `token_file` when that is set.
fn token(config: &AdminConfig) -> Result<Option<String>, (&'static str, String)> {
    match (&config.token, &config.token_file) {
        (Some(_), Some(_)) => Err((
            "token_file",
            "set either token or token_file, not both".into(),
        )),
        (Some(t), None) => Ok(Some(t.clone())),
        (None, Some(f)) => {
            let text = std::fs::read_to_string(f)
                .map_err(|e| ("token_file", format!("reading {}: {e}", f.display())))?;
            Ok(text.lines().next().map(|l| l.trim().to_string()))
        }
        (None, None) => Ok(None),
    }
    .and_then(|t| match t {
        Some(t) if t.len() < 16 => Err(("token", "must be at least 16 characters".to_string())),
        t => Ok(t),
    })
}

impl LoadedConfig {
    /// Settings that are valid but unsafe, each a sentence for the operator.
    pub fn warnings(&self) -> &[String] {
        &self.auth.warnings
    }
}

/// Parses and validates `source` and loads what it names.
pub fn load(source: &Source) -> Result<LoadedConfig, ConfigError> {
    prepare(source.parse()?, source)
}

/// Checks `config` and loads what it names; errors point into `source`, the text it was
/// parsed from ([`Source::embedded`] for a config built in code). The checks of
/// [`Config::validate`] are made again (they are cheap), so that a config built in code gets
/// them too.
pub fn prepare(config: Config, source: &Source) -> Result<LoadedConfig, ConfigError> {
    config
        .validate()
        .map_err(|e| source.invalid(None, e.key, e.message))?;
    let auth = auth_files(&config, source)?;
    let plan = RoutePlan::new(&config, source)?;
    let admin = admin_access(&config, source)?;
    // Builds the TLS settings once, so that a missing file, bad PEM or a key that does not
    // match the certificate stops the edge at start.
    let mut tls = BTreeMap::new();
    for listener in config.listeners() {
        if let Some(settings) = listener.tls {
            let server = TlsServer::new(listener.key.clone(), settings).map_err(|e| {
                source.invalid(None, format!("{}.{}", listener.key, e.key), e.message)
            })?;
            tls.insert(listener.key, server);
        }
    }
    let mirror = mirror_config(&config, &plan, source)?;
    check_groups(&config, &plan, source)?;
    Ok(LoadedConfig {
        config,
        plan,
        auth,
        tls,
        admin,
        mirror,
    })
}

/// Reads the password and ACL files.
fn auth_files(config: &Config, source: &Source) -> Result<AuthFiles, ConfigError> {
    let a = &config.auth;
    let passwords = match &a.password_file {
        Some(p) => Some(
            PasswordFile::load(p)
                .map_err(|e| source.invalid(None, "auth.password_file".into(), e.to_string()))?,
        ),
        None => None,
    };
    let (acl, acl_text) = match &a.acl_file {
        Some(p) => {
            let (acl, text) = AclFile::load_with_text(p)
                .map_err(|e| source.invalid(None, "auth.acl_file".into(), e.to_string()))?;
            (Some(acl), Some(text))
        }
        None => (None, None),
    };
    Ok(AuthFiles {
        passwords,
        acl,
        warnings: crate::auth::warnings(a, acl_text.as_deref()),
    })
}

/// The admin endpoint's access, when it is on: a token is required beyond loopback.
pub fn admin_access(config: &Config, source: &Source) -> Result<Option<AdminAccess>, ConfigError> {
    let Some((addr, _)) = config.admin.address() else {
        return Ok(None);
    };
    let access = AdminAccess::read(&config.admin)
        .map_err(|(key, message)| source.invalid(None, format!("admin.{key}"), message))?;
    if access.token.is_none() && !addr.ip().is_loopback() {
        return Err(source.invalid(
            None,
            "admin.token".into(),
            format!(
                "the admin endpoint listens on {addr}, beyond loopback: set admin.token (or admin.token_file)"
            ),
        ));
    }
    Ok(Some(access))
}

/// The mirror's settings (reading the SASL `password_file`), whose topics must be topics of
/// the edge.
fn mirror_config(
    config: &Config,
    plan: &RoutePlan,
    source: &Source,
) -> Result<Option<cloud_sync::MirrorConfig>, ConfigError> {
    let Some(cloud) = &config.cloud else {
        return Ok(None);
    };
    let text = &source.text;
    let invalid = |span, key, message| source.invalid(span, key, message);
    if !cfg!(feature = "kafka") {
        return Err(invalid(
            text.find("[cloud]").map(|at| at..at),
            "cloud".into(),
            "this edge was built without Kafka (cargo feature `kafka` off), so it cannot mirror: \
             remove the [cloud] section, or build the edge with its default features"
                .into(),
        ));
    }
    let key_line = |key: &str| -> Option<std::ops::Range<usize>> {
        let section = text.find("[cloud]")?;
        let at = text[section..]
            .match_indices(key)
            .map(|(i, _)| section + i)
            .find(|&i| i == 0 || text.as_bytes()[i - 1] == b'\n')?;
        Some(at..at)
    };
    let mirror = cloud
        .mirror_config(config.mqtt.max_packet_size.0)
        .map_err(|(key, message)| invalid(key_line(key), format!("cloud.{key}"), message))?;
    for t in cloud.topics.iter().flatten() {
        if !plan.topics.iter().any(|p| &p.name == t) {
            return Err(invalid(
                key_line("topics"),
                "cloud.topics".into(),
                format!("\"{t}\" is not a topic of this edge (a route, [topics.*] or the default route names its topics)"),
            ));
        }
    }
    Ok(Some(mirror))
}

/// Checks the consumer groups: names, filters, and that they read topics of the edge.
fn check_groups(config: &Config, plan: &RoutePlan, source: &Source) -> Result<(), ConfigError> {
    let invalid = |span, key, message| source.invalid(span, key, message);
    for (i, g) in config.groups.iter().enumerate() {
        let at = |field: &str| {
            let key = format!("groups[{i}].{field}");
            let line = source
                .text
                .match_indices(&format!("\"{}\"", g.name))
                .next()
                .map(|(b, _)| b..b);
            (line, key)
        };
        if let Err(why) = validate_group_name(&g.name) {
            let (line, key) = at("name");
            return Err(invalid(line, key, why));
        }
        if config.groups[..i].iter().any(|o| o.name == g.name) {
            let (line, key) = at("name");
            return Err(invalid(
                line,
                key,
                format!(
                    "the group \"{}\" is declared twice: give each group its own name",
                    g.name
                ),
            ));
        }
        if let Err(why) = crate::mqtt::subs::validate_filter(&g.filter, usize::MAX) {
            let (line, key) = at("filter");
            return Err(invalid(line, key, why));
        }
        if g.filter.starts_with("$share/") {
            let (line, key) = at("filter");
            return Err(invalid(
                line,
                key,
                "the filter of the records the group reads, without $share/: members add it".into(),
            ));
        }
        if g.ack_timeout.0.is_zero() {
            let (line, key) = at("ack_timeout");
            return Err(invalid(line, key, "must be above 0s".into()));
        }
        if g.topics.is_empty() {
            let (line, key) = at("topics");
            return Err(invalid(
                line,
                key,
                "a group reads at least one log topic: list them, e.g. topics = [\"telemetry\"]"
                    .into(),
            ));
        }
        for t in &g.topics {
            if !plan.topics.iter().any(|p| &p.name == t) {
                let (line, key) = at("topics");
                return Err(invalid(
                    line,
                    key,
                    format!("\"{t}\" is not a topic of this edge (a route, [topics.*] or the default route names its topics)"),
                ));
            }
        }
    }
    Ok(())
}

/// A group name is an MQTT share name (no `/`, `+` or `#`) and a Kafka group id.
fn validate_group_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 200 {
        return Err(format!(
            "group name \"{name}\" must have 1 to 200 characters"
        ));
    }
    if let Some(c) = name
        .chars()
        .find(|c| matches!(c, '/' | '+' | '#') || c.is_control() || c.is_whitespace())
    {
        return Err(format!(
            "group name \"{name}\" has {c:?}: members subscribe to $share/{{name}}/{{filter}}, where the name may not hold '/', '+', '#', spaces or control characters"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::config::{CertIdentity, GroupStart, TlsVersion};

    /// Parses `text` and loads what it names, as `edge` does at start.
    fn load_text(text: &str, origin: &str) -> Result<Config, ConfigError> {
        load(&Source::new(text, origin)).map(|loaded| loaded.config)
    }

    /// A `[tls]` section naming a self-signed certificate (`s.pem`) and its key (`s.key`),
    /// written to `dir`.
    fn tls_section(dir: &std::path::Path) -> String {
        let key = rcgen::KeyPair::generate().unwrap();
        let cert = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .unwrap()
            .self_signed(&key)
            .unwrap();
        std::fs::write(dir.join("s.pem"), cert.pem()).unwrap();
        std::fs::write(dir.join("s.key"), key.serialize_pem()).unwrap();
        format!(
            "[tls]\ncert_file = \"{0}/s.pem\"\nkey_file = \"{0}/s.key\"\n",
            dir.display()
        )
    }

    #[test]
    fn bad_cloud_setting_is_named_with_its_line() {
        let err = load_text(
            "[cloud]\nbootstrap = \"127.0.0.1:19092\"\nsite = \"plant 7\"\n",
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(err.starts_with("config c.toml:3: cloud.site:"), "{err}");
        let err = load_text("[cloud]\nbootstrap = \"kafka\"\nsite = \"p\"\n", "c.toml")
            .unwrap_err()
            .to_string();
        assert!(
            err.starts_with("config c.toml:2: cloud.bootstrap:"),
            "{err}"
        );
    }

    #[test]
    fn cloud_topics_must_exist() {
        let err = load_text(
            "[cloud]\nbootstrap = \"k:9092\"\nsite = \"p\"\ntopics = [\"nope\"]\n",
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.contains("cloud.topics") && err.contains("\"nope\""),
            "{err}"
        );
    }

    #[test]
    fn group_sync_interval_defaults_to_5s_and_is_checked() {
        let cloud = "[cloud]\nbootstrap = \"k:9092\"\nsite = \"p\"\n";
        let m = load_text(cloud, "c.toml")
            .unwrap()
            .cloud
            .unwrap()
            .mirror_config(1024 * 1024)
            .unwrap();
        assert_eq!(m.group_sync_interval, Duration::from_secs(5));
        let off = format!("{cloud}group_sync_interval = \"0s\"\n");
        let m = load_text(&off, "c.toml").unwrap().cloud.unwrap();
        assert!(m
            .mirror_config(1024 * 1024)
            .unwrap()
            .group_sync_interval
            .is_zero());
        let err = load_text(
            &format!("{cloud}group_sync_interval = \"10ms\"\n"),
            "c.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("config c.toml:4: cloud.group_sync_interval:"),
            "{err}"
        );
    }

    #[test]
    fn client_certificates_turn_anonymous_access_off() {
        let dir = tempfile::tempdir().unwrap();
        let tls = tls_section(dir.path());
        let c = load_text(&tls, "t.toml").unwrap();
        assert!(!c.mutual_tls());
        assert!(
            c.auth.anonymous_allowed(c.mutual_tls()),
            "TLS alone does not authenticate"
        );
        let mutual = format!("{tls}client_ca_file = \"{}/s.pem\"\n", dir.path().display());
        let c = load_text(&mutual, "t.toml").unwrap();
        assert!(c.mutual_tls());
        assert!(!c.auth.anonymous_allowed(c.mutual_tls()));
        let c = load_text(
            &format!("{mutual}[auth]\nallow_anonymous = false\n"),
            "t.toml",
        )
        .expect("client certificates let clients in without a password file");
        assert!(!c.auth.anonymous_allowed(c.mutual_tls()));
    }

    #[test]
    fn auth_files_are_checked_at_load() {
        let dir = tempfile::tempdir().unwrap();
        let pw = dir.path().join("pw");
        let acl = dir.path().join("acl");
        std::fs::write(
            &pw,
            format!(
                "bob:{}\n",
                crate::auth::passwords::hash_password(b"x").unwrap()
            ),
        )
        .unwrap();
        std::fs::write(&acl, "user bob\ntopic readwrite bob/#\n").unwrap();
        let text = format!(
            "[auth]\npassword_file = {:?}\nacl_file = {:?}\n",
            pw.to_str().unwrap(),
            acl.to_str().unwrap()
        );
        let c = load_text(&text, "t.toml").unwrap();
        assert!(!c.auth.anonymous_allowed(false));

        std::fs::write(&acl, "user bob\ntopic readwrite bob/#/x\n").unwrap();
        let err = load_text(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.starts_with("config t.toml:3: auth.acl_file: ") && err.contains("acl:2: filter"),
            "{err}"
        );
        std::fs::remove_file(&pw).unwrap();
        let err = load_text(&text, "t.toml").unwrap_err().to_string();
        assert!(
            err.starts_with("config t.toml:2: auth.password_file: "),
            "{err}"
        );
    }

    #[test]
    fn tls_section_defaults() {
        let dir = tempfile::tempdir().unwrap();
        let text = tls_section(dir.path());
        let c = load_text(&text, "t.toml").unwrap();
        let tls = c.tls.unwrap();
        assert_eq!(tls.listen.to_string(), "0.0.0.0:8883");
        assert_eq!(tls.client_ca_file, None);
        assert_eq!(tls.identity, CertIdentity::Cn);
        assert_eq!(tls.min_version, TlsVersion::Tls12);
        assert!(load_text("", "t.toml").unwrap().tls.is_none());
    }

    #[test]
    fn missing_tls_file_is_named_with_its_line() {
        let text = "[mqtt]\nlisten = \"127.0.0.1:1883\"\n[tls]\ncert_file = \"/nonexistent/s.pem\"\nkey_file = \"/nonexistent/s.key\"\n";
        let err = load_text(text, "e.toml").unwrap_err().to_string();
        assert!(err.starts_with("config e.toml:4: tls.cert_file:"), "{err}");
        assert!(err.contains("/nonexistent/s.pem"), "{err}");
    }

    #[test]
    fn readme_example_configs_load() {
        let readme = include_str!("../../README.md");
        let examples: Vec<&str> = readme
            .split("```toml\n")
            .skip(1)
            .map(|rest| &rest[..rest.find("```").unwrap()])
            .collect();
        assert!(
            examples.len() >= 2,
            "the README shows the main and [cloud] examples"
        );
        let main = load_text(examples[0], "README.md").unwrap();
        assert!(!main.routes.is_empty());
        let cloud = load_text(examples[1], "README.md").unwrap();
        let m = cloud.cloud.unwrap().mirror_config(1024 * 1024).unwrap();
        assert_eq!(m.kafka_topic("telemetry"), "plant-7.telemetry");
    }

    #[test]
    fn groups_are_checked_at_load() {
        let base = "[[routes]]\nmatch = \"sensors/+/#\"\ntopic = \"telemetry\"\n";
        let ok = load_text(
            &format!("{base}[[groups]]\nname = \"alarms\"\ntopics = [\"telemetry\"]\nstart = \"latest\"\n"),
            "g.toml",
        )
        .unwrap();
        assert_eq!(ok.groups[0].start, GroupStart::Latest);
        let err = |text: &str| {
            load_text(&format!("{base}{text}"), "g.toml")
                .unwrap_err()
                .to_string()
        };
        let e = err("[[groups]]\nname = \"alarms\"\ntopics = [\"nope\"]\n");
        assert!(
            e.contains("groups[0].topics") && e.contains("\"nope\" is not a topic"),
            "{e}"
        );
        let e = err("[[groups]]\nname = \"a/b\"\ntopics = [\"telemetry\"]\n");
        assert!(e.contains("groups[0].name") && e.contains("'/'"), "{e}");
        let e = err("[[groups]]\nname = \"a\"\ntopics = []\n");
        assert!(e.contains("at least one log topic"), "{e}");
        let e = err("[[groups]]\nname = \"a\"\ntopics = [\"telemetry\"]\n[[groups]]\nname = \"a\"\ntopics = [\"telemetry\"]\n");
        assert!(
            e.contains("groups[1].name") && e.contains("declared twice"),
            "{e}"
        );
        let e = err("[[groups]]\nname = \"a\"\ntopics = [\"telemetry\"]\nstart = \"middle\"\n");
        assert!(e.contains("middle"), "{e}");
    }
}
