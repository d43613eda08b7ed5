//! Which addresses a server may send to on a stranger's word.
//!
//! Two places send UDP wherever a remote party asks. The relay's embedded TURN server relays to
//! any peer an authenticated client names; the worker's ICE agent sends connectivity checks to
//! every candidate a browser trickles. Without a filter either is a proxy into the host's own
//! network (cloud metadata at 169.254.169.254, services on loopback, the private LAN). Addresses
//! in special-purpose ranges are refused unless an operator allow-lists them. Addresses are
//! canonicalised first: `::ffff:127.0.0.1` is 127.0.0.1 (coturn's CVE-2020-26262 and
//! CVE-2026-27624 were both bypasses through such spellings).

use ipnet::IpNet;
use std::net::IpAddr;

/// Special-purpose ranges denied by default (IANA special-purpose registries, plus documentation
/// and benchmarking ranges).
pub const DEFAULT_DENY: &[&str] = &[
    "0.0.0.0/8",
    "10.0.0.0/8",
    "100.64.0.0/10",
    "127.0.0.0/8",
    "169.254.0.0/16",
    "172.16.0.0/12",
    "192.0.0.0/24",
    "192.0.2.0/24",
    "192.168.0.0/16",
    "198.18.0.0/15",
    "198.51.100.0/24",
    "203.0.113.0/24",
    "224.0.0.0/4",
    "240.0.0.0/4",
    "::/128",
    "::1/128",
    "fc00::/7",
    "fe80::/10",
    "ff00::/8",
    "64:ff9b::/96",
    "2002::/16",
];

/// The IPv4 address inside an IPv4-mapped (`::ffff:a.b.c.d`) IPv6 address; others unchanged.
pub fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => IpAddr::V6(v6),
        },
        v4 => v4,
    }
}

/// Deny list (defaults, the server's own addresses, extra ranges) and an allow-list that wins.
#[derive(Debug, Clone)]
pub struct PeerFilter {
    deny: Vec<IpNet>,
    allow: Vec<IpNet>,
}

impl PeerFilter {
    /// `own`: the server's own addresses, always denied unless allow-listed.
    pub fn new(extra_deny: &[IpNet], allow: &[IpNet], own: &[IpAddr]) -> Self {
        let mut deny: Vec<IpNet> = DEFAULT_DENY.iter().filter_map(|s| s.parse().ok()).collect();
        deny.extend_from_slice(extra_deny);
        deny.extend(
            own.iter()
                .filter(|ip| !ip.is_unspecified())
                .map(|ip| IpNet::from(canonical(*ip))),
        );
        Self {
            deny,
            allow: allow.to_vec(),
        }
    }

    /// Whether relaying to `ip` is allowed.
    pub fn allows(&self, ip: IpAddr) -> bool {
        let ip = canonical(ip);
        if self.allow.iter().any(|n| n.contains(&ip)) {
            return true;
        }
        !self.deny.iter().any(|n| n.contains(&ip))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("test address")
    }

    #[test]
    fn every_default_range_parses() {
        assert_eq!(
            DEFAULT_DENY.iter().filter(|s| s.parse::<IpNet>().is_ok()).count(),
            DEFAULT_DENY.len()
        );
    }

    #[test]
    fn special_ranges_are_denied_and_public_addresses_allowed() {
        let f = PeerFilter::new(&[], &[], &[]);
        for denied in [
            "127.0.0.1",
            "169.254.169.254",
            "10.0.0.1",
            "192.168.1.1",
            "172.31.255.255",
            "100.64.0.1",
            "0.0.0.0",
            "224.0.0.251",
            "255.255.255.255",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "64:ff9b::7f00:1",
            "2002:7f00:1::",
        ] {
            assert!(!f.allows(ip(denied)), "{denied} must be denied");
        }
        for allowed in ["8.8.8.8", "1.1.1.1", "2001:4860:4860::8888", "172.32.0.1"] {
            assert!(f.allows(ip(allowed)), "{allowed} must be allowed");
        }
    }

    #[test]
    fn ipv4_mapped_spellings_are_canonicalised_before_matching() {
        let f = PeerFilter::new(&[], &[], &[]);
        for denied in [
            "::ffff:127.0.0.1",
            "::ffff:169.254.169.254",
            "::ffff:10.0.0.1",
            "::ffff:7f00:1",
        ] {
            assert!(!f.allows(ip(denied)), "{denied} must be denied");
        }
        assert!(f.allows(ip("::ffff:8.8.8.8")));
        assert_eq!(canonical(ip("::ffff:127.0.0.1")), ip("127.0.0.1"));
    }

    #[test]
    fn the_allow_list_wins_and_the_servers_own_address_is_denied() {
        let allow: Vec<IpNet> = vec!["127.0.0.0/8".parse().expect("net")];
        let f = PeerFilter::new(&["8.8.4.0/24".parse().expect("net")], &allow, &[ip("1.2.3.4")]);
        assert!(f.allows(ip("127.0.0.1")));
        assert!(
            f.allows(ip("::ffff:127.0.0.1")),
            "allow-list matches the canonical form too"
        );
        assert!(!f.allows(ip("169.254.169.254")));
        assert!(!f.allows(ip("1.2.3.4")), "own address");
        assert!(!f.allows(ip("8.8.4.4")), "extra deny");
    }
}
