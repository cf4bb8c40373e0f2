//! Which `Host` header values the admin endpoint answers to.
//!
//! A token-less admin endpoint on loopback is safe from other machines, but not from a web
//! page in a browser on the same machine: DNS rebinding points the page's own host name at
//! 127.0.0.1, and the browser then lets the page read the admin API as same-origin. Such a
//! request still names the attacker's host in `Host`, so answering only to known names
//! closes that door. The loopback names and the listen address are always allowed: a
//! rebinding page cannot make the browser send them.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

/// The host names and addresses the admin endpoint answers to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AllowedHosts {
    /// Lowercase DNS names, without a trailing dot.
    names: Vec<String>,
    addrs: Vec<IpAddr>,
}

/// The host part of a `Host` header or of an `admin.allowed_hosts` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Host {
    Name(String),
    Addr(IpAddr),
}

impl AllowedHosts {
    /// The loopback names, the listen address `listen` (unless it is the unspecified
    /// address, which names no host) and each of `configured`, which are host names or
    /// addresses without a port (an IPv6 address with or without brackets).
    pub fn new(configured: &[String], listen: IpAddr) -> Result<Self, String> {
        let mut allowed = AllowedHosts {
            names: vec!["localhost".to_string()],
            addrs: vec![
                IpAddr::V4(Ipv4Addr::LOCALHOST),
                IpAddr::V6(Ipv6Addr::LOCALHOST),
            ],
        };
        if !listen.is_unspecified() {
            allowed.add(Host::Addr(listen));
        }
        for entry in configured {
            let host = parse_entry(entry).ok_or_else(|| {
                format!(
                    "{entry:?} is not a host name or address: write a name (\"edge.plant.local\"), an IPv4 address or an IPv6 address in brackets (\"[fd00::7]\"), without a port"
                )
            })?;
            allowed.add(host);
        }
        Ok(allowed)
    }

    fn add(&mut self, host: Host) {
        match host {
            Host::Name(n) if !self.names.contains(&n) => self.names.push(n),
            Host::Addr(a) if !self.addrs.contains(&a) => self.addrs.push(a),
            _ => {}
        }
    }

    /// Whether a request carrying `Host: {header}` is answered. The port is ignored: the
    /// listener's own port is the only one that reaches it.
    pub fn allows(&self, header: &str) -> bool {
        match parse_host_header(header) {
            Some(Host::Name(n)) => self.names.contains(&n),
            Some(Host::Addr(a)) => self.addrs.contains(&a),
            None => false,
        }
    }
}

/// `host[:port]`, as RFC 9110 allows it in `Host` (an IPv6 address in brackets).
fn parse_host_header(header: &str) -> Option<Host> {
    let (host, port) = match header.strip_prefix('[') {
        Some(rest) => {
            let (inside, after) = rest.split_once(']')?;
            let addr: Ipv6Addr = inside.parse().ok()?;
            return after
                .strip_prefix(':')
                .map_or(after.is_empty(), is_port)
                .then_some(Host::Addr(IpAddr::V6(addr)));
        }
        None => match header.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (header, None),
        },
    };
    if !port.is_none_or(is_port) {
        return None;
    }
    parse_name_or_v4(host)
}

/// An `admin.allowed_hosts` entry: as in `Host` but without a port, and an IPv6 address may
/// also be written without brackets.
fn parse_entry(entry: &str) -> Option<Host> {
    if let Ok(addr) = entry.parse::<Ipv6Addr>() {
        return Some(Host::Addr(IpAddr::V6(addr)));
    }
    if let Some(inside) = entry.strip_prefix('[').and_then(|e| e.strip_suffix(']')) {
        return inside
            .parse::<Ipv6Addr>()
            .ok()
            .map(|a| Host::Addr(IpAddr::V6(a)));
    }
    parse_name_or_v4(entry)
}

/// An empty port is allowed by RFC 3986 (`host:`).
fn is_port(port: &str) -> bool {
    port.len() <= 5 && port.bytes().all(|b| b.is_ascii_digit())
}

fn parse_name_or_v4(host: &str) -> Option<Host> {
    if let Ok(addr) = host.parse::<Ipv4Addr>() {
        return Some(Host::Addr(IpAddr::V4(addr)));
    }
    // DNS is case-insensitive, and `name.` is the same name as `name`.
    let name = host.strip_suffix('.').unwrap_or(host).to_ascii_lowercase();
    let valid = !name.is_empty()
        && name.len() <= 253
        && name.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    valid.then_some(Host::Name(name))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn loopback_default() -> AllowedHosts {
        AllowedHosts::new(&[], "127.0.0.1".parse().unwrap()).unwrap()
    }

    #[test]
    fn loopback_names_are_allowed_with_or_without_a_port() {
        let allowed = loopback_default();
        for host in [
            "localhost",
            "localhost:8080",
            "127.0.0.1",
            "127.0.0.1:8080",
            "[::1]",
            "[::1]:8080",
            "[0:0:0:0:0:0:0:1]:8080",
        ] {
            assert!(allowed.allows(host), "{host}");
        }
    }

    #[test]
    fn names_match_case_insensitively_and_with_a_trailing_dot() {
        let allowed = loopback_default();
        assert!(allowed.allows("LocalHost:8080"));
        assert!(allowed.allows("localhost.:8080"));
        let configured = AllowedHosts::new(
            &["Edge.Plant.Local".to_string()],
            "127.0.0.1".parse().unwrap(),
        )
        .unwrap();
        assert!(configured.allows("edge.plant.local:8080"));
        assert!(configured.allows("EDGE.PLANT.LOCAL"));
    }

    #[test]
    fn other_hosts_are_refused() {
        let allowed = loopback_default();
        for host in [
            "evil.example",
            "evil.example:8080",
            "localhost.evil.example",
            "127.0.0.2:8080",
            "[::2]:8080",
            "0.0.0.0:8080",
        ] {
            assert!(!allowed.allows(host), "{host}");
        }
    }

    #[test]
    fn malformed_host_headers_are_refused() {
        let allowed = loopback_default();
        for host in [
            "",
            ":8080",
            "localhost:80:80",
            "localhost:http",
            "localhost:123456",
            "::1",
            "[::1",
            "[::1]8080",
            "[localhost]:8080",
            "local host",
            "localhost/",
            "user@localhost",
        ] {
            assert!(!allowed.allows(host), "{host:?}");
        }
    }

    #[test]
    fn the_listen_address_is_allowed_unless_it_is_unspecified() {
        let v4 = AllowedHosts::new(&[], "192.0.2.7".parse().unwrap()).unwrap();
        assert!(v4.allows("192.0.2.7:8080"));
        assert!(v4.allows("localhost:8080"));
        let v6 = AllowedHosts::new(&[], "fd00::7".parse().unwrap()).unwrap();
        assert!(v6.allows("[fd00::7]:8080"));
        assert!(v6.allows("[FD00:0::7]"));
        let any = AllowedHosts::new(&[], "0.0.0.0".parse().unwrap()).unwrap();
        assert!(!any.allows("0.0.0.0:8080"));
        assert!(!any.allows("192.0.2.7:8080"));
    }

    #[test]
    fn configured_addresses_are_allowed_in_either_ipv6_form() {
        let allowed = AllowedHosts::new(
            &[
                "fd00::1".to_string(),
                "[fd00::2]".to_string(),
                "192.0.2.9".to_string(),
            ],
            "127.0.0.1".parse().unwrap(),
        )
        .unwrap();
        assert!(allowed.allows("[fd00::1]:8080"));
        assert!(allowed.allows("[fd00::2]"));
        assert!(allowed.allows("192.0.2.9:8080"));
        assert!(!allowed.allows("192.0.2.10:8080"));
    }

    #[test]
    fn a_configured_entry_with_a_port_or_a_path_is_refused() {
        for entry in ["edge.local:8080", "[fd00::1]:8080", "http://edge.local", ""] {
            let err =
                AllowedHosts::new(&[entry.to_string()], "127.0.0.1".parse().unwrap()).unwrap_err();
            assert!(err.contains("without a port"), "{entry}: {err}");
        }
    }
}
