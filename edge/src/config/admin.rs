//! `[admin]`: the admin HTTP endpoint. Its token file and host list are read and checked by
//! `crate::startup`.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use super::redact;

/// `[admin]`: the admin HTTP endpoint.
#[derive(Debug, Clone, Deserialize, Serialize, Default)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Address of the admin HTTP listener. Unset: `127.0.0.1:8080`, and when that port is
    /// taken the edge serves MQTT without it (with a warning); set: a bind failure stops the
    /// edge.
    pub listen: Option<SocketAddr>,
    /// `false` turns the admin endpoint off.
    pub enabled: Option<bool>,
    /// Bearer token every request must carry (`Authorization: Bearer <token>`); required
    /// when `listen` is not a loopback address.
    #[serde(serialize_with = "redact")]
    pub token: Option<String>,
    /// File holding the token (first line), instead of `token`.
    pub token_file: Option<PathBuf>,
    /// Host names and addresses (without a port) the endpoint answers to, besides
    /// `localhost`, `127.0.0.1`, `[::1]` and the address of `listen` (unless that is
    /// `0.0.0.0` or `[::]`), which are always answered. A request whose `Host` header names
    /// another host, or none, gets 421 Misdirected Request before the token is checked: this
    /// keeps a web page that points its own name at this machine (DNS rebinding) from reading
    /// the API through a browser. List the names and addresses that people and scrapers use
    /// to reach the endpoint, e.g. `["edge-7.plant.local", "192.0.2.7"]`.
    pub allowed_hosts: Vec<String>,
}

impl AdminConfig {
    /// The default admin address.
    pub const DEFAULT_LISTEN: &'static str = "127.0.0.1:8080";

    /// Where to listen (`None`: turned off) and whether the address was configured.
    pub fn address(&self) -> Option<(SocketAddr, bool)> {
        if self.enabled == Some(false) {
            return None;
        }
        Some(match self.listen {
            Some(a) => (a, true),
            None => (
                Self::DEFAULT_LISTEN.parse().expect("literal address"),
                false,
            ),
        })
    }
}
