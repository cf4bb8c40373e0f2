//! Where and how to connect: the broker URL, TLS material, protocol version and session kind.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use rumqttc::tokio_rustls::rustls::pki_types::pem::PemObject;
use rumqttc::tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rumqttc::tokio_rustls::rustls::{ClientConfig, RootCertStore};
use serde::{Deserialize, Serialize};

use crate::error::SimError;

/// MQTT protocol version.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
pub enum Protocol {
    /// MQTT 3.1.1 (protocol level 4).
    #[value(name = "3.1.1", alias = "311", alias = "4")]
    #[serde(rename = "3.1.1")]
    V311,
    /// MQTT 5.0.
    #[value(name = "5", alias = "5.0")]
    #[serde(rename = "5")]
    V5,
}

/// Clean or persistent session.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum SessionKind {
    /// The broker forgets the session at disconnect (clean session / clean start).
    Clean,
    /// The broker keeps the session and unacknowledged messages are sent again on reconnect.
    Persistent,
}

/// A parsed `mqtt://` or `mqtts://` URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokerUrl {
    /// The URL as given, for messages.
    pub original: String,
    /// Host name or address.
    pub host: String,
    /// TCP port.
    pub port: u16,
    /// Whether to connect with TLS.
    pub tls: bool,
}

impl BrokerUrl {
    /// Parses `mqtt://host[:port]` (default port 1883) or `mqtts://host[:port]` (8883).
    pub fn parse(option: &str, url: &str) -> Result<Self, SimError> {
        let (tls, rest) = if let Some(rest) = url.strip_prefix("mqtt://") {
            (false, rest)
        } else if let Some(rest) = url.strip_prefix("mqtts://") {
            (true, rest)
        } else {
            return Err(SimError::invalid(
                option,
                format!("{url:?} must start with mqtt:// or mqtts://"),
            ));
        };
        let rest = rest.trim_end_matches('/');
        if rest.is_empty() || rest.contains('/') || rest.contains('@') {
            return Err(SimError::invalid(
                option,
                format!("{url:?} must be scheme://host[:port]; give credentials with --username/--password"),
            ));
        }
        let default_port = if tls { 8883 } else { 1883 };
        let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
            let (host, after) = v6.split_once(']').ok_or_else(|| {
                SimError::invalid(option, format!("{url:?}: unclosed '[' in IPv6 address"))
            })?;
            let port = match after.strip_prefix(':') {
                Some(p) => parse_port(option, url, p)?,
                None if after.is_empty() => default_port,
                None => return Err(SimError::invalid(option, format!("{url:?}: bad port"))),
            };
            (host.to_string(), port)
        } else {
            match rest.rsplit_once(':') {
                Some((host, p)) => (host.to_string(), parse_port(option, url, p)?),
                None => (rest.to_string(), default_port),
            }
        };
        Ok(BrokerUrl {
            original: url.to_string(),
            host,
            port,
            tls,
        })
    }

    /// `host:port` for socket connections.
    pub fn socket_address(&self) -> String {
        if self.host.contains(':') {
            format!("[{}]:{}", self.host, self.port)
        } else {
            format!("{}:{}", self.host, self.port)
        }
    }
}

fn parse_port(option: &str, url: &str, text: &str) -> Result<u16, SimError> {
    match text.parse::<u16>() {
        Ok(port) if port > 0 => Ok(port),
        _ => Err(SimError::invalid(
            option,
            format!("{url:?}: port {text:?} is not a number from 1 to 65535"),
        )),
    }
}

/// TLS files given on the command line.
#[derive(Debug, Clone, Default)]
pub struct TlsFiles {
    /// CA certificates (PEM) that sign the broker's certificate.
    pub ca_file: Option<PathBuf>,
    /// Client certificate chain (PEM) for mutual TLS.
    pub cert_file: Option<PathBuf>,
    /// Private key (PEM) of the client certificate.
    pub key_file: Option<PathBuf>,
}

fn read_file(option: &'static str, path: &Path) -> Result<Vec<u8>, SimError> {
    std::fs::read(path).map_err(|e| SimError::Tls {
        option,
        path: path.to_path_buf(),
        reason: e.to_string(),
    })
}

impl TlsFiles {
    /// Builds one rustls client configuration for the whole fleet, so that every device shares
    /// the parsed certificates instead of keeping its own copy of the PEM files.
    pub fn client_config(&self, url: &BrokerUrl) -> Result<Option<Arc<ClientConfig>>, SimError> {
        if !url.tls {
            if self.ca_file.is_some() || self.cert_file.is_some() || self.key_file.is_some() {
                return Err(SimError::invalid(
                    "--ca-file/--cert/--key",
                    format!(
                        "TLS files need an mqtts:// broker URL, not {}",
                        url.original
                    ),
                ));
            }
            return Ok(None);
        }
        let ca_path = self.ca_file.as_deref().ok_or_else(|| {
            SimError::invalid(
                "--ca-file",
                "an mqtts:// broker needs --ca-file with the CA (PEM) that signed its certificate",
            )
        })?;
        let ca_pem = read_file("--ca-file", ca_path)?;
        let mut roots = RootCertStore::empty();
        for cert in CertificateDer::pem_slice_iter(&ca_pem) {
            let cert = cert.map_err(|e| SimError::Tls {
                option: "--ca-file",
                path: ca_path.to_path_buf(),
                reason: format!("not PEM certificates: {e}"),
            })?;
            roots.add(cert).map_err(|e| SimError::Tls {
                option: "--ca-file",
                path: ca_path.to_path_buf(),
                reason: e.to_string(),
            })?;
        }
        if roots.is_empty() {
            return Err(SimError::Tls {
                option: "--ca-file",
                path: ca_path.to_path_buf(),
                reason: "holds no certificate".into(),
            });
        }
        let builder = ClientConfig::builder().with_root_certificates(roots);
        let config = match (&self.cert_file, &self.key_file) {
            (None, None) => builder.with_no_client_auth(),
            (Some(cert_path), Some(key_path)) => {
                let cert_pem = read_file("--cert", cert_path)?;
                let chain = CertificateDer::pem_slice_iter(&cert_pem)
                    .collect::<Result<Vec<_>, _>>()
                    .map_err(|e| SimError::Tls {
                        option: "--cert",
                        path: cert_path.clone(),
                        reason: format!("not PEM certificates: {e}"),
                    })?;
                if chain.is_empty() {
                    return Err(SimError::Tls {
                        option: "--cert",
                        path: cert_path.clone(),
                        reason: "holds no certificate".into(),
                    });
                }
                let key_pem = read_file("--key", key_path)?;
                let key = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| SimError::Tls {
                    option: "--key",
                    path: key_path.clone(),
                    reason: format!("no PEM private key: {e}"),
                })?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| SimError::Tls {
                        option: "--cert/--key",
                        path: cert_path.clone(),
                        reason: format!("unusable client certificate or key: {e}"),
                    })?
            }
            (Some(_), None) => {
                return Err(SimError::invalid(
                    "--cert",
                    "a client certificate needs --key",
                ))
            }
            (None, Some(_)) => return Err(SimError::invalid("--key", "a client key needs --cert")),
        };
        Ok(Some(Arc::new(config)))
    }
}

/// Everything about a connection that is the same for every device of the fleet.
#[derive(Debug, Clone)]
pub struct ConnectSettings {
    /// The broker.
    pub url: BrokerUrl,
    /// Shared TLS configuration when the URL is `mqtts://`.
    pub tls: Option<Arc<ClientConfig>>,
    /// MQTT version.
    pub protocol: Protocol,
    /// Optional user name and password.
    pub credentials: Option<(String, String)>,
    /// Keep-alive interval.
    pub keep_alive: Duration,
    /// Time allowed for TCP + TLS + CONNACK.
    pub connect_timeout: Duration,
    /// Session expiry for persistent MQTT 5 sessions.
    pub session_expiry: Duration,
}

/// Most addresses `--source-ips` may list: far more than any fleet needs, few enough to hold.
const MAX_SOURCE_IPS: u32 = 1 << 16;

/// Parses a list of local IPv4 addresses: comma-separated addresses or inclusive ranges,
/// e.g. `127.0.0.2-127.0.0.254` or `10.0.0.5,10.0.0.7`.
pub fn parse_source_ips(option: &str, text: &str) -> Result<Vec<std::net::IpAddr>, SimError> {
    use std::net::Ipv4Addr;
    let address = |part: &str| {
        part.trim()
            .parse::<Ipv4Addr>()
            .map_err(|_| SimError::invalid(option, format!("{part:?} is not an IPv4 address")))
    };
    let mut ips = Vec::new();
    for item in text.split(',').filter(|item| !item.trim().is_empty()) {
        let (first, last) = match item.split_once('-') {
            Some((first, last)) => (address(first)?, address(last)?),
            None => (address(item)?, address(item)?),
        };
        let (first, last) = (u32::from(first), u32::from(last));
        if last < first {
            return Err(SimError::invalid(
                option,
                format!("{item:?}: the range ends before it starts"),
            ));
        }
        if u64::from(last - first) + 1 + ips.len() as u64 > u64::from(MAX_SOURCE_IPS) {
            return Err(SimError::invalid(
                option,
                format!("more than {MAX_SOURCE_IPS} addresses"),
            ));
        }
        ips.extend((first..=last).map(|ip| std::net::IpAddr::V4(Ipv4Addr::from(ip))));
    }
    if ips.is_empty() {
        return Err(SimError::invalid(
            option,
            "no address; write e.g. 127.0.0.2-127.0.0.254",
        ));
    }
    Ok(ips)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn source_ip_ranges_and_lists_expand_in_order() {
        let ips = parse_source_ips("--source-ips", "127.0.0.2-127.0.0.4,10.0.0.1").unwrap();
        let text: Vec<String> = ips.iter().map(|ip| ip.to_string()).collect();
        assert_eq!(text, ["127.0.0.2", "127.0.0.3", "127.0.0.4", "10.0.0.1"]);
    }

    #[test]
    fn bad_source_ips_are_refused_with_the_option_name() {
        for text in [
            "127.0.0.9-127.0.0.2",
            "localhost",
            "",
            "::1",
            "1.0.0.0-2.0.0.0",
        ] {
            let err = parse_source_ips("--source-ips", text).unwrap_err();
            assert!(
                err.to_string().starts_with("--source-ips:"),
                "{text}: {err}"
            );
        }
    }

    #[test]
    fn mqtt_url_defaults_to_port_1883() {
        let url = BrokerUrl::parse("--broker", "mqtt://localhost").unwrap();
        assert_eq!(
            (url.host.as_str(), url.port, url.tls),
            ("localhost", 1883, false)
        );
    }

    #[test]
    fn mqtts_url_defaults_to_port_8883() {
        let url = BrokerUrl::parse("--broker", "mqtts://broker.example:9000").unwrap();
        assert_eq!((url.port, url.tls), (9000, true));
        let url = BrokerUrl::parse("--broker", "mqtts://[::1]").unwrap();
        assert_eq!((url.host.as_str(), url.port), ("::1", 8883));
        assert_eq!(url.socket_address(), "[::1]:8883");
    }

    #[test]
    fn other_schemes_are_refused_with_the_option_name() {
        let err = BrokerUrl::parse("--broker", "tcp://127.0.0.1:1883").unwrap_err();
        assert!(err.to_string().starts_with("--broker:"), "{err}");
        assert!(BrokerUrl::parse("--broker", "mqtt://h:0").is_err());
        assert!(BrokerUrl::parse("--broker", "mqtt://h:99999").is_err());
        assert!(BrokerUrl::parse("--broker", "mqtt://user:pw@h").is_err());
    }

    #[test]
    fn tls_files_without_mqtts_are_refused() {
        let url = BrokerUrl::parse("--broker", "mqtt://h").unwrap();
        let files = TlsFiles {
            ca_file: Some("ca.pem".into()),
            ..TlsFiles::default()
        };
        assert!(files.client_config(&url).is_err());
    }

    #[test]
    fn mqtts_without_ca_file_is_refused() {
        let url = BrokerUrl::parse("--broker", "mqtts://h").unwrap();
        let err = TlsFiles::default().client_config(&url).unwrap_err();
        assert!(err.to_string().contains("--ca-file"), "{err}");
    }

    #[test]
    fn missing_ca_file_names_the_path() {
        let url = BrokerUrl::parse("--broker", "mqtts://h").unwrap();
        let files = TlsFiles {
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..TlsFiles::default()
        };
        let err = files.client_config(&url).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }
}
