//! What a build may reach: the allow lists, the address ranges no recipe can
//! reach, and the mode (record or replay).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use crate::egress::report::Download;
use crate::escape::escape;

/// The default cap on the bytes one run may download: 16 GiB.
pub const DEFAULT_DOWNLOAD_LIMIT: u64 = 16 << 30;

/// One host (and port) a build may reach.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct AllowedHost {
    /// An exact host name in lowercase, or an IP literal (IPv6 without brackets).
    pub host: String,
    /// The port; `None` means 80 for plain HTTP and 443 for CONNECT.
    pub port: Option<u16>,
}

/// A string that is not an allowed host.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("`{value}` is not an allowed host: {reason} (expected a host name or IP literal with an optional port, e.g. deb.debian.org, deb.debian.org:80, 127.0.0.1:8080, [::1]:8080)")]
pub struct BadAllowedHost {
    /// The rejected text, escaped.
    pub value: String,
    /// What is wrong with it.
    pub reason: &'static str,
}

impl AllowedHost {
    /// Whether a request for `host` (canonical, see [`canonical_host`]) on
    /// `port` matches; `connect` selects the default port (443, else 80).
    pub fn matches(&self, host: &str, port: u16, connect: bool) -> bool {
        self.host == host && self.port.unwrap_or(if connect { 443 } else { 80 }) == port
    }
}

impl fmt::Display for AllowedHost {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let host = if self.host.contains(':') { format!("[{}]", self.host) } else { self.host.clone() };
        match self.port {
            Some(port) => write!(f, "{host}:{port}"),
            None => f.write_str(&host),
        }
    }
}

/// The canonical form of a host as requested: an IP literal (IPv6 with or
/// without brackets) in its standard notation, or a host name in lowercase.
/// `None` for anything else (empty, wildcards, user info, a trailing dot,
/// characters outside letters, digits, `-` and `.`).
pub fn canonical_host(host: &str) -> Option<String> {
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    if let Some(inner) = bare {
        return inner.parse::<Ipv6Addr>().ok().map(|ip| ip.to_string());
    }
    if let Ok(ip) = host.parse::<IpAddr>() {
        return Some(ip.to_string());
    }
    let lower = host.to_ascii_lowercase();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && !l.starts_with('-')
            && !l.ends_with('-')
            && l.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
    };
    (lower.len() <= 253 && lower.split('.').all(label_ok)).then_some(lower)
}

impl FromStr for AllowedHost {
    type Err = BadAllowedHost;

    /// Parses `host`, `host:port`, `ip:port`, `[ipv6]` or `[ipv6]:port`.
    fn from_str(s: &str) -> Result<AllowedHost, BadAllowedHost> {
        let bad = |reason| BadAllowedHost { value: escape(s).into_owned(), reason };
        if s.is_empty() {
            return Err(bad("it is empty"));
        }
        if s.chars().any(|c| c.is_control() || c.is_whitespace()) {
            return Err(bad("it contains control characters or spaces"));
        }
        if s.contains("://") {
            return Err(bad("it has a scheme; give the host alone"));
        }
        if s.contains('/') || s.contains('?') || s.contains('#') {
            return Err(bad("it has a path; give the host alone"));
        }
        if s.contains('*') {
            return Err(bad("wildcards are not allowed; name each host exactly"));
        }
        if s.contains('@') {
            return Err(bad("it has user information"));
        }
        let (host, port) = if s.starts_with('[') {
            match s.find(']') {
                Some(end) => (&s[..=end], s[end + 1..].strip_prefix(':')),
                None => return Err(bad("an unclosed [")),
            }
        } else if s.parse::<Ipv6Addr>().is_ok() {
            (s, None)
        } else {
            match s.rsplit_once(':') {
                Some((host, port)) => (host, Some(port)),
                None => (s, None),
            }
        };
        if host.len() + port.map_or(0, |p| p.len() + 1) != s.len() {
            return Err(bad("unexpected text after the IPv6 literal"));
        }
        let port = match port {
            Some(p) => match p.parse::<u16>() {
                Ok(n) if n != 0 && p.bytes().all(|b| b.is_ascii_digit()) => Some(n),
                _ => return Err(bad("the port is not a number from 1 to 65535")),
            },
            None => None,
        };
        let host = canonical_host(host).ok_or_else(|| bad("not a host name (letters, digits, '-' and '.') or IP literal"))?;
        Ok(AllowedHost { host, port })
    }
}

/// What a build may reach, and whether it records or replays.
#[derive(Clone, Debug)]
pub struct EgressPolicy {
    /// Hosts from the recipe: never reached on a forbidden address (see [`forbidden_reason`]).
    pub allow: Vec<AllowedHost>,
    /// Hosts named on the command line: may resolve to forbidden ranges.
    pub allow_private: Vec<AllowedHost>,
    /// Record or replay.
    pub mode: EgressMode,
    /// Bytes the run may download from the network in all (see [`DEFAULT_DOWNLOAD_LIMIT`]).
    pub download_limit: u64,
}

/// Whether the proxy fetches and records, or serves what was recorded.
#[derive(Clone, Debug)]
pub enum EgressMode {
    /// Fetch from the allowed hosts and record every download.
    Record,
    /// Serve only recorded downloads, from the cache.
    Replay {
        /// What was recorded.
        downloads: Vec<Download>,
        /// Fetch a recorded download missing from the cache from its URL (its hash checked).
        fetch_missing: bool,
    },
}

/// Whether a request is allowed, and whether it may reach forbidden ranges.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Allowed {
    /// In neither list.
    No,
    /// In the recipe's list only: public addresses only.
    Public,
    /// In the command line's list.
    Private,
}

impl EgressPolicy {
    /// How `host` (canonical) on `port` is allowed.
    pub(crate) fn allowed(&self, host: &str, port: u16, connect: bool) -> Allowed {
        if self.allow_private.iter().any(|a| a.matches(host, port, connect)) {
            Allowed::Private
        } else if self.allow.iter().any(|a| a.matches(host, port, connect)) {
            Allowed::Public
        } else {
            Allowed::No
        }
    }
}

/// Why a recipe's host may not be reached on `ip`, or `None` for a public
/// address. Covers unspecified, loopback, private, CGNAT, link-local,
/// multicast, reserved and broadcast IPv4; unspecified, loopback, link-local,
/// site-local, unique-local and multicast IPv6; and IPv4 embedded in IPv6
/// (mapped, compatible, NAT64), judged as the IPv4 address.
pub fn forbidden_reason(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => forbidden_v4(v4),
        IpAddr::V6(v6) => forbidden_v6(v6),
    }
}

fn forbidden_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, c, _] = ip.octets();
    Some(match (a, b) {
        (0, _) => "an unspecified (0.0.0.0/8) address",
        (127, _) => "a loopback address",
        (10, _) | (192, 168) => "a private address",
        (172, 16..=31) => "a private address",
        (100, 64..=127) => "a carrier-grade NAT (100.64.0.0/10) address",
        (169, 254) => "a link-local address",
        (192, 0) if c == 0 => "an IETF protocol (192.0.0.0/24) address",
        (198, 18..=19) => "a benchmarking (198.18.0.0/15) address",
        (224..=239, _) => "a multicast address",
        (240..=255, _) => "a reserved or broadcast address",
        _ => return None,
    })
}

fn forbidden_v6(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if let Some(v4) = ip.to_ipv4_mapped() {
        return forbidden_v4(v4);
    }
    if s[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // NAT64: the gateway reaches the embedded IPv4 address.
        return forbidden_v4(Ipv4Addr::from((u32::from(s[6]) << 16) | u32::from(s[7])));
    }
    Some(match s[0] {
        _ if ip.is_unspecified() => "an unspecified address",
        _ if ip.is_loopback() => "a loopback address",
        0 if s[..6] == [0; 6] => "an IPv4-compatible address",
        0xfe80..=0xfebf => "a link-local address",
        0xfec0..=0xfeff => "a site-local address",
        0xfc00..=0xfdff => "a unique-local address",
        0xff00..=0xffff => "a multicast address",
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_hosts_parse_in_every_documented_form() {
        let parse = |s: &str| s.parse::<AllowedHost>().unwrap();
        assert_eq!(parse("deb.debian.org"), AllowedHost { host: "deb.debian.org".into(), port: None });
        assert_eq!(parse("Deb.Debian.ORG:80"), AllowedHost { host: "deb.debian.org".into(), port: Some(80) });
        assert_eq!(parse("127.0.0.1:8080"), AllowedHost { host: "127.0.0.1".into(), port: Some(8080) });
        assert_eq!(parse("[::1]:8080"), AllowedHost { host: "::1".into(), port: Some(8080) });
        assert_eq!(parse("[0:0::1]"), AllowedHost { host: "::1".into(), port: None });
        assert_eq!(parse("::1"), AllowedHost { host: "::1".into(), port: None });
        assert_eq!(parse("[::1]:8080").to_string(), "[::1]:8080");
    }

    #[test]
    fn bad_allowed_hosts_are_refused_naming_the_value() {
        for bad in [
            "",
            "*.debian.org",
            "http://deb.debian.org",
            "deb.debian.org/debian",
            "deb.debian.org:0",
            "deb.debian.org:99999",
            "deb.debian.org:+80",
            "deb.debian.org:",
            "deb\u{1b}[2J.org",
            "a b",
            "user@host",
            "[::1",
            "[::1]x",
            "[::1]:80:80",
            "host.",
            "-bad.org",
            "under_score.org",
        ] {
            let err = bad.parse::<AllowedHost>().unwrap_err();
            assert_eq!(err.value, escape(bad), "{bad:?}");
            assert!(!err.to_string().contains('\u{1b}'), "{err}");
        }
    }

    #[test]
    fn forbidden_ranges_cover_v4_v6_and_embedded_v4() {
        for ip in [
            "0.0.0.0",
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "172.31.255.255",
            "192.168.1.1",
            "100.64.0.1",
            "169.254.169.254",
            "224.0.0.1",
            "255.255.255.255",
            "::",
            "::1",
            "fe80::1",
            "fd00::1",
            "fc00::1",
            "ff02::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "::127.0.0.1",
        ] {
            assert!(forbidden_reason(ip.parse().unwrap()).is_some(), "{ip} must be forbidden");
        }
        for ip in ["1.1.1.1", "151.101.2.132", "172.32.0.1", "100.128.0.1", "2a04:4e42::644", "::ffff:1.1.1.1"] {
            assert_eq!(forbidden_reason(ip.parse().unwrap()), None, "{ip} is public");
        }
    }
}
