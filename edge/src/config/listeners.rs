//! `[[listeners]]`: the sockets MQTT is served on, each with its protocol and its own TLS
//! identity; `mqtt.listen` and `[tls]` are shorthands for one entry each.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::{CertIdentity, Config, Invalid, TlsConfig, TlsVersion};

/// What a listener speaks; see `ListenerConfig::protocol`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerProtocol {
    /// MQTT over plain TCP.
    Mqtt,
    /// MQTT over TLS.
    Mqtts,
    /// MQTT over WebSocket (binary frames, subprotocol `mqtt`).
    Ws,
    /// MQTT over WebSocket over TLS.
    Wss,
}

impl ListenerProtocol {
    /// Whether the listener handshakes TLS first.
    pub fn tls(self) -> bool {
        matches!(self, ListenerProtocol::Mqtts | ListenerProtocol::Wss)
    }

    /// Whether MQTT is carried in WebSocket messages.
    pub fn websocket(self) -> bool {
        matches!(self, ListenerProtocol::Ws | ListenerProtocol::Wss)
    }

    /// The name written in the config.
    pub fn name(self) -> &'static str {
        match self {
            ListenerProtocol::Mqtt => "mqtt",
            ListenerProtocol::Mqtts => "mqtts",
            ListenerProtocol::Ws => "ws",
            ListenerProtocol::Wss => "wss",
        }
    }
}

impl std::fmt::Display for ListenerProtocol {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// `[[listeners]]`: one socket MQTT is served on (3.1.1 and 5.0 on each). Every listener shares the node-wide `[mqtt]` limits (`max_connections` counts the connections of all of them, `connect_timeout` also bounds the TLS and WebSocket handshakes), authentication and ACLs; each TLS listener has its own certificate, key and client CA, reloaded on SIGHUP.
///
/// Without any `[[listeners]]` entry the edge binds `mqtt` on `mqtt.listen` (default `0.0.0.0:1883`) and, with a `[tls]` section, `mqtts` on `tls.listen`. With entries, only those are bound, plus `mqtt.listen` if it is written and `[tls]` if it is there: a config that lists only an `mqtts` listener binds nothing else. `--mqtt-listen` and `--tls-listen` change the first `mqtt` and `mqtts` listener. A WebSocket listener answers an HTTP upgrade on `path` that offers the subprotocol `mqtt` (any other request gets an HTTP error); MQTT packets may span WebSocket messages and one message may hold several packets; text messages close the connection.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ListenerConfig {
    /// `"mqtt"` (plain TCP), `"mqtts"` (TLS), `"ws"` (WebSocket) or `"wss"` (WebSocket over TLS).
    pub protocol: ListenerProtocol,
    /// Address and port to listen on, e.g. `"0.0.0.0:8884"`.
    pub bind: SocketAddr,
    /// For `ws` and `wss`: the HTTP path of the WebSocket upgrade (a request to another path gets 404). Default `/mqtt`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub path: Option<String>,
    /// For `mqtts` and `wss` (required there): the server's certificate chain (PEM), its own certificate first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cert_file: Option<PathBuf>,
    /// For `mqtts` and `wss` (required there): the private key of that certificate (PEM: PKCS#8, PKCS#1 RSA or SEC1 EC).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub key_file: Option<PathBuf>,
    /// CA certificates (PEM) that sign client certificates: a certificate a client presents must chain to one of them and be within its validity period.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client_ca_file: Option<PathBuf>,
    /// Whether every client must present a certificate (mutual TLS; its `identity` becomes the client's username). Default: true when `client_ca_file` is set; `false` with `client_ca_file` makes the certificate optional (checked when given, the client otherwise authenticates as on any listener). `true` needs `client_ca_file`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub require_certificate: Option<bool>,
    /// With client certificates, which part names the client: `"cn"`, `"san_dns"`, `"san_email"` or `"san_uri"`, as `tls.identity`.
    #[serde(default)]
    pub identity: CertIdentity,
    /// Oldest TLS version offered: `"1.2"` or `"1.3"`.
    #[serde(default)]
    pub min_version: TlsVersion,
}

/// The default path of a WebSocket listener.
pub const DEFAULT_WS_PATH: &str = "/mqtt";

/// The TLS side of a listener, as the TLS code needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ListenerTls {
    /// The server's certificate chain (PEM).
    pub cert_file: PathBuf,
    /// Its private key (PEM).
    pub key_file: PathBuf,
    /// CA certificates that sign client certificates.
    pub client_ca_file: Option<PathBuf>,
    /// Whether a client certificate is required (with `client_ca_file`).
    pub require_certificate: bool,
    /// The part of a client certificate that names the client.
    pub identity: CertIdentity,
    /// Oldest TLS version offered.
    pub min_version: TlsVersion,
}

impl From<&TlsConfig> for ListenerTls {
    fn from(t: &TlsConfig) -> ListenerTls {
        ListenerTls {
            cert_file: t.cert_file.clone(),
            key_file: t.key_file.clone(),
            client_ca_file: t.client_ca_file.clone(),
            require_certificate: t.client_ca_file.is_some(),
            identity: t.identity,
            min_version: t.min_version,
        }
    }
}

/// A listener to bind, after the shorthands are resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    /// Where it is configured, for errors: `listeners[0]`, `mqtt.listen` or `tls`.
    pub key: String,
    /// What it speaks.
    pub protocol: ListenerProtocol,
    /// Where it listens.
    pub bind: SocketAddr,
    /// The WebSocket path (`ws` and `wss`).
    pub path: String,
    /// The TLS settings (`mqtts` and `wss`).
    pub tls: Option<ListenerTls>,
}

impl Config {
    /// Every listener to bind, in order: the `mqtt.listen` shorthand (written, or the
    /// default when no `[[listeners]]` are given), the `[[listeners]]` entries, then `[tls]`.
    pub fn listeners(&self) -> Vec<Listener> {
        let mut out = Vec::new();
        let plain = match self.mqtt.listen {
            Some(addr) => Some(addr),
            None if self.listeners.is_empty() => Some(super::mqtt::default_mqtt_listen()),
            None => None,
        };
        if let Some(bind) = plain {
            out.push(Listener {
                key: "mqtt.listen".into(),
                protocol: ListenerProtocol::Mqtt,
                bind,
                path: String::new(),
                tls: None,
            });
        }
        for (i, l) in self.listeners.iter().enumerate() {
            let tls = match (&l.cert_file, &l.key_file) {
                (Some(cert_file), Some(key_file)) if l.protocol.tls() => Some(ListenerTls {
                    cert_file: cert_file.clone(),
                    key_file: key_file.clone(),
                    client_ca_file: l.client_ca_file.clone(),
                    require_certificate: l
                        .require_certificate
                        .unwrap_or(l.client_ca_file.is_some()),
                    identity: l.identity,
                    min_version: l.min_version,
                }),
                _ => None,
            };
            out.push(Listener {
                key: format!("listeners[{i}]"),
                protocol: l.protocol,
                bind: l.bind,
                path: l.path.clone().unwrap_or_else(|| DEFAULT_WS_PATH.into()),
                tls,
            });
        }
        if let Some(t) = &self.tls {
            out.push(Listener {
                key: "tls".into(),
                protocol: ListenerProtocol::Mqtts,
                bind: t.listen,
                path: String::new(),
                tls: Some(ListenerTls::from(t)),
            });
        }
        out
    }

    /// Points the first listener of `protocol` at `bind` (what `--mqtt-listen` and
    /// `--tls-listen` do, for `mqtt` and `mqtts`); false when there is no such listener.
    pub fn set_first_listener(&mut self, protocol: ListenerProtocol, bind: SocketAddr) -> bool {
        if protocol == ListenerProtocol::Mqtt
            && (self.mqtt.listen.is_some() || self.listeners.is_empty())
        {
            self.mqtt.listen = Some(bind);
            return true;
        }
        if let Some(l) = self.listeners.iter_mut().find(|l| l.protocol == protocol) {
            l.bind = bind;
            return true;
        }
        match &mut self.tls {
            Some(t) if protocol == ListenerProtocol::Mqtts => {
                t.listen = bind;
                true
            }
            _ => false,
        }
    }

    /// Whether some listener requires client certificates (which then authenticate its
    /// clients).
    pub fn mutual_tls(&self) -> bool {
        self.listeners()
            .iter()
            .any(|l| l.tls.as_ref().is_some_and(|t| t.require_certificate))
    }

    /// Checks each `[[listeners]]` entry, and that no two listeners share an address.
    pub(super) fn validate_listeners(&self) -> Result<(), Invalid> {
        for (i, l) in self.listeners.iter().enumerate() {
            let key = |k: &str| format!("listeners[{i}].{k}");
            if l.protocol.tls() {
                for (name, value) in [("cert_file", &l.cert_file), ("key_file", &l.key_file)] {
                    if value.is_none() {
                        return Err(Invalid::new(
                            key(name),
                            format!(
                                "a `{}` listener needs cert_file and key_file (PEM)",
                                l.protocol
                            ),
                        ));
                    }
                }
            } else {
                for (name, set) in [
                    ("cert_file", l.cert_file.is_some()),
                    ("key_file", l.key_file.is_some()),
                    ("client_ca_file", l.client_ca_file.is_some()),
                    ("require_certificate", l.require_certificate.is_some()),
                ] {
                    if set {
                        return Err(Invalid::new(
                            key(name),
                            format!(
                                "a `{}` listener has no TLS: remove it, or make the protocol `{}`",
                                l.protocol,
                                if l.protocol.websocket() {
                                    "wss"
                                } else {
                                    "mqtts"
                                }
                            ),
                        ));
                    }
                }
            }
            if l.require_certificate == Some(true) && l.client_ca_file.is_none() {
                return Err(Invalid::new(
                    key("require_certificate"),
                    "client certificates are checked against client_ca_file: set it to the CA that signs them",
                ));
            }
            match (&l.path, l.protocol.websocket()) {
                (Some(_), false) => {
                    return Err(Invalid::new(
                        key("path"),
                        format!("only `ws` and `wss` listeners have a path, not `{}`", l.protocol),
                    ))
                }
                (Some(p), true) if !p.starts_with('/') || p.contains(['?', '#', ' ']) => {
                    return Err(Invalid::new(
                        key("path"),
                        format!("{p:?} is not an HTTP path: write it from its leading `/`, without a query, e.g. \"/mqtt\""),
                    ))
                }
                _ => {}
            }
        }
        let all = self.listeners();
        for (i, a) in all.iter().enumerate() {
            if let Some(b) = all[..i].iter().find(|b| b.bind == a.bind) {
                return Err(Invalid::new(
                    format!(
                        "{}{}",
                        a.key,
                        if a.key.starts_with("listeners[") {
                            ".bind"
                        } else {
                            ""
                        }
                    ),
                    format!(
                        "{} is also the address of {}: give each listener its own port",
                        a.bind, b.key
                    ),
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::Config;
    use super::*;

    const TLS: &str = "cert_file = \"s.pem\"\nkey_file = \"s.key\"\n";

    #[test]
    fn no_listeners_binds_the_plain_default() {
        let l = Config::parse("", "t.toml").unwrap().listeners();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].protocol, ListenerProtocol::Mqtt);
        assert_eq!(l[0].bind.to_string(), "0.0.0.0:1883");
    }

    #[test]
    fn tls_section_adds_an_mqtts_listener_beside_the_default() {
        let c = Config::parse(&format!("[tls]\n{TLS}"), "t.toml").unwrap();
        let l = c.listeners();
        assert_eq!(
            l.iter()
                .map(|l| (l.protocol, l.bind.to_string()))
                .collect::<Vec<_>>(),
            [
                (ListenerProtocol::Mqtt, "0.0.0.0:1883".to_string()),
                (ListenerProtocol::Mqtts, "0.0.0.0:8883".to_string())
            ]
        );
        assert!(!c.mutual_tls());
    }

    #[test]
    fn only_an_mqtts_listener_binds_nothing_else() {
        let text = format!("[[listeners]]\nprotocol = \"mqtts\"\nbind = \"127.0.0.1:8883\"\n{TLS}");
        let l = Config::parse(&text, "t.toml").unwrap().listeners();
        assert_eq!(l.len(), 1);
        assert_eq!(l[0].protocol, ListenerProtocol::Mqtts);
        let tls = l[0].tls.as_ref().unwrap();
        assert_eq!(tls.cert_file, PathBuf::from("s.pem"));
        assert!(!tls.require_certificate);
    }

    #[test]
    fn written_mqtt_listen_is_kept_beside_listeners() {
        let text = "[mqtt]\nlisten = \"127.0.0.1:1883\"\n[[listeners]]\nprotocol = \"ws\"\nbind = \"127.0.0.1:8080\"\n";
        let l = Config::parse(text, "t.toml").unwrap().listeners();
        assert_eq!(l.len(), 2);
        assert_eq!(l[1].path, "/mqtt");
    }

    #[test]
    fn client_ca_requires_certificates_unless_told_otherwise() {
        let base = format!("[[listeners]]\nprotocol = \"wss\"\nbind = \"127.0.0.1:1\"\n{TLS}client_ca_file = \"ca.pem\"\n");
        let c = Config::parse(&base, "t.toml").unwrap();
        assert!(c.mutual_tls());
        let c = Config::parse(&format!("{base}require_certificate = false\n"), "t.toml").unwrap();
        assert!(!c.mutual_tls());
        assert!(c.listeners()[0]
            .tls
            .as_ref()
            .unwrap()
            .client_ca_file
            .is_some());
    }

    #[test]
    fn bad_listener_entries_are_named() {
        for (text, key) in [
            ("protocol = \"mqtts\"\nbind = \"127.0.0.1:1\"\n", "listeners[0].cert_file"),
            (
                "protocol = \"mqtt\"\nbind = \"127.0.0.1:1\"\ncert_file = \"a\"\n",
                "listeners[0].cert_file",
            ),
            ("protocol = \"mqtt\"\nbind = \"127.0.0.1:1\"\npath = \"/x\"\n", "listeners[0].path"),
            ("protocol = \"ws\"\nbind = \"127.0.0.1:1\"\npath = \"mqtt\"\n", "listeners[0].path"),
            (
                "protocol = \"wss\"\nbind = \"127.0.0.1:1\"\ncert_file = \"a\"\nkey_file = \"b\"\nrequire_certificate = true\n",
                "listeners[0].require_certificate",
            ),
        ] {
            let err = Config::parse(&format!("[[listeners]]\n{text}"), "t.toml")
                .unwrap_err()
                .to_string();
            assert!(err.contains(key), "{text}: {err}");
        }
        let err = Config::parse(
            "[[listeners]]\nprotocol = \"http\"\nbind = \"127.0.0.1:1\"\n",
            "t.toml",
        )
        .unwrap_err()
        .to_string();
        assert!(
            err.starts_with("config t.toml:2:") && err.contains("mqtts"),
            "{err}"
        );
    }

    #[test]
    fn command_line_addresses_change_the_first_listener_of_their_protocol() {
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut c = Config::parse("", "t.toml").unwrap();
        assert!(c.set_first_listener(ListenerProtocol::Mqtt, addr));
        assert_eq!(c.listeners()[0].bind, addr);
        assert!(!c.set_first_listener(ListenerProtocol::Mqtts, addr));
        let text = format!("[[listeners]]\nprotocol = \"mqtts\"\nbind = \"127.0.0.1:1\"\n{TLS}[[listeners]]\nprotocol = \"mqtts\"\nbind = \"127.0.0.1:2\"\n{TLS}");
        let mut c = Config::parse(&text, "t.toml").unwrap();
        assert!(
            !c.set_first_listener(ListenerProtocol::Mqtt, addr),
            "no mqtt listener to change"
        );
        assert!(c.set_first_listener(ListenerProtocol::Mqtts, addr));
        let l = c.listeners();
        assert_eq!((l[0].bind, l[1].bind.port()), (addr, 2));
    }

    #[test]
    fn two_listeners_on_one_address_are_refused() {
        let text = "[mqtt]\nlisten = \"127.0.0.1:1883\"\n[[listeners]]\nprotocol = \"ws\"\nbind = \"127.0.0.1:1883\"\n";
        let err = Config::parse(text, "t.toml").unwrap_err().to_string();
        assert!(
            err.contains("listeners[0].bind") && err.contains("mqtt.listen"),
            "{err}"
        );
    }
}
