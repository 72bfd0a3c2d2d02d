//! Egress control: `outbox.allowed_hosts`, the hosts endpoints may point at.
//!
//! A comma-separated list of host names (`api.example.com`), name suffixes
//! (`*.example.com`) and IP networks (`10.0.0.0/8`, `127.0.0.1`, `::1`).
//! Empty means any host. A URL's host must be listed: names by a name or
//! suffix, IP addresses by a network. Checked when an endpoint is created
//! or changed, before every request and every redirect followed, and again
//! at connect time on the addresses a name resolves to: those must be
//! public addresses, or inside a listed network. A name under an allowed
//! suffix that resolves to 127.0.0.1, 10.x or 169.254.169.254 is refused
//! unless such a network is listed too.

use crate::config::ConfigError;
use std::net::{IpAddr, Ipv4Addr};

#[derive(Debug, Clone, PartialEq)]
enum Entry {
    Name(String),
    Suffix(String),
    Net { addr: IpAddr, prefix: u8 },
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct AllowList {
    entries: Vec<Entry>,
}

const HINT: &str = "outbox.allowed_hosts lists host names, *.domain suffixes and IP networks, e.g. \
                    'hooks.example.com, *.internal.example.com, 10.0.0.0/8'.";

impl AllowList {
    pub fn parse(list: &str) -> Result<AllowList, ConfigError> {
        let mut entries = Vec::new();
        for item in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let lower = item.to_ascii_lowercase();
            let is_name = |n: &str| {
                !n.is_empty()
                    && !n.starts_with('.')
                    && !n.contains("..")
                    && n.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '.')
            };
            let entry = if let Some(suffix) = lower.strip_prefix("*.") {
                if !is_name(suffix) {
                    return Err(bad(item));
                }
                Entry::Suffix(format!(".{suffix}"))
            } else if let Some((addr, prefix)) = lower.split_once('/') {
                let addr: IpAddr = addr.parse().map_err(|_| bad(item))?;
                let max = if addr.is_ipv4() { 32 } else { 128 };
                let prefix: u8 = prefix.parse().ok().filter(|p| *p <= max).ok_or_else(|| bad(item))?;
                Entry::Net { addr, prefix }
            } else if let Ok(addr) = lower.parse::<IpAddr>() {
                Entry::Net { addr, prefix: if addr.is_ipv4() { 32 } else { 128 } }
            } else if is_name(&lower) {
                Entry::Name(lower)
            } else {
                return Err(bad(item));
            };
            entries.push(entry);
        }
        Ok(AllowList { entries })
    }

    /// A list that allows no host (what an unparsable setting means).
    pub fn nothing() -> AllowList {
        AllowList { entries: vec![Entry::Name(String::new())] }
    }

    /// Whether any host may be reached (the list is empty).
    pub fn is_open(&self) -> bool {
        self.entries.is_empty()
    }

    /// Whether `url`'s host may be reached.
    pub fn allows(&self, url: &reqwest::Url) -> bool {
        if self.is_open() {
            return true;
        }
        match url.host() {
            Some(url::Host::Domain(name)) => self.allows_name(name),
            Some(url::Host::Ipv4(ip)) => self.allows_ip(IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.allows_ip(IpAddr::V6(ip)),
            None => false,
        }
    }

    /// Whether `host` (a name or an IP address, as a Kafka broker is named)
    /// may be reached.
    pub fn allows_host(&self, host: &str) -> bool {
        let host = host.trim_start_matches('[').trim_end_matches(']');
        self.is_open()
            || match host.parse::<IpAddr>() {
                Ok(ip) => self.allows_ip(ip),
                Err(_) => self.allows_name(host),
            }
    }

    fn allows_name(&self, name: &str) -> bool {
        let name = name.trim_end_matches('.').to_ascii_lowercase();
        self.entries.iter().any(|e| match e {
            Entry::Name(n) => *n == name,
            Entry::Suffix(s) => name.ends_with(s.as_str()),
            Entry::Net { .. } => false,
        })
    }

    fn allows_ip(&self, ip: IpAddr) -> bool {
        self.entries.iter().any(|e| match e {
            Entry::Net { addr, prefix } => in_network(ip, *addr, *prefix),
            _ => false,
        })
    }

    /// Whether a connection may go to `ip`, an address an allowed name
    /// resolved to: a public address, or one inside a listed network.
    pub fn allows_address(&self, ip: IpAddr) -> bool {
        self.is_open() || self.allows_ip(ip) || is_public(ip)
    }

    /// The error for a URL this list does not allow.
    pub fn refusal(url: &reqwest::Url) -> ConfigError {
        Self::host_refusal(url.host_str().unwrap_or(""))
    }

    /// The error for a host this list does not allow.
    pub fn host_refusal(host: &str) -> ConfigError {
        ConfigError {
            message: format!("host {host:?} is not in outbox.allowed_hosts"),
            hint: Some("Ask the server administrator to add it to outbox.allowed_hosts.".into()),
        }
    }
}

/// Where endpoints may be reached, and how: the allow-list and the proxy
/// (`outbox.http_proxy`; the server's environment is never consulted).
#[derive(Debug, Clone, PartialEq, Default)]
pub struct Egress {
    pub allowed: AllowList,
    pub proxy: Option<String>,
}

/// Whether `ip` is an address of the public internet: not loopback,
/// private, link-local (cloud metadata lives at 169.254.169.254), shared,
/// unique-local, multicast, documentation or unspecified; nor an IPv6
/// address that embeds one of those (mapped, translated, compatible, 6to4)
/// or may embed any IPv4 address (NAT64, Teredo).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let o = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || o[0] == 0
                || (o[0] == 100 && (64..128).contains(&o[1])) // shared address space
                || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
                || (o[0] == 198 && (18..20).contains(&o[1])) // benchmarking
                || o[0] >= 240)
        }
        IpAddr::V6(v6) => {
            let s = v6.segments();
            let embedded = |hi: u16, lo: u16| IpAddr::V4(Ipv4Addr::from(((hi as u32) << 16) | lo as u32));
            match s {
                // An IPv4 address in the last 32 bits: IPv4-compatible
                // (::a.b.c.d, deprecated; `::` and `::1` are 0.0.0.0 and
                // 0.0.0.1 this way), mapped (::ffff:a.b.c.d) and translated
                // (::ffff:0:a.b.c.d, SIIT). As public as that address.
                [0, 0, 0, 0, 0, 0 | 0xffff, lo_hi, lo_lo] | [0, 0, 0, 0, 0xffff, 0, lo_hi, lo_lo] => {
                    return is_public(embedded(lo_hi, lo_lo))
                }
                // 6to4 (2002:AABB:CCDD::/48): a tunnel may deliver to the
                // IPv4 address it carries.
                [0x2002, hi, lo, ..] => return is_public(embedded(hi, lo)),
                _ => {}
            }
            !(v6.is_multicast()
                || (s[0] & 0xfe00) == 0xfc00 // unique local
                || (s[0] & 0xffc0) == 0xfe80 // link-local
                || (s[0] & 0xffc0) == 0xfec0 // site-local (deprecated, still routed in places)
                || (s[0] & 0xfff0) == 0x3ff0 // documentation (RFC 9637)
                || (s[0] == 0x2001 && s[1] == 0x0002 && s[2] == 0) // benchmarking
                || (s[0] == 0x2001 && (s[1] & 0xfff0) == 0x0010) // ORCHID
                || (s[0] == 0x2001 && s[1] == 0x0db8) // documentation
                || (s[0] == 0x64 && s[1] == 0xff9b) // NAT64 (embeds any IPv4 address)
                || (s[0] == 0x2001 && s[1] == 0) // Teredo (embeds an IPv4 address, obfuscated)
                || s[..4] == [0x100, 0, 0, 0]) // discard-only
        }
    }
}

fn bad(item: &str) -> ConfigError {
    ConfigError { message: format!("invalid entry {item:?} in outbox.allowed_hosts"), hint: Some(HINT.into()) }
}

fn in_network(ip: IpAddr, net: IpAddr, prefix: u8) -> bool {
    let (ip, net, bits) = match (ip, net) {
        (IpAddr::V4(a), IpAddr::V4(b)) => (u32::from(a) as u128, u32::from(b) as u128, 32),
        (IpAddr::V6(a), IpAddr::V6(b)) => (u128::from(a), u128::from(b), 128),
        // An IPv4-mapped IPv6 address is the IPv4 address.
        (IpAddr::V6(a), IpAddr::V4(b)) => match a.to_ipv4_mapped() {
            Some(a) => (u32::from(a) as u128, u32::from(b) as u128, 32),
            None => return false,
        },
        (IpAddr::V4(_), IpAddr::V6(_)) => return false,
    };
    let shift = bits - u32::from(prefix);
    if shift >= 128 {
        return true;
    }
    (ip >> shift) == (net >> shift)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(s: &str) -> reqwest::Url {
        reqwest::Url::parse(s).unwrap()
    }

    #[test]
    fn empty_allows_everything() {
        let open = AllowList::parse(" , ").unwrap();
        assert!(open.is_open());
        assert!(open.allows(&url("http://anything.example/")));
    }

    #[test]
    fn names_suffixes_and_networks() {
        let list = AllowList::parse("hooks.example.com, *.internal.example.com, 10.0.0.0/8, 127.0.0.1, ::1").unwrap();
        assert!(list.allows(&url("https://hooks.example.com/x")));
        assert!(list.allows(&url("https://HOOKS.example.com./x")));
        assert!(!list.allows(&url("https://evil.example.com/")));
        assert!(list.allows(&url("http://a.internal.example.com/")));
        assert!(!list.allows(&url("http://internal.example.com.evil.org/")));
        assert!(list.allows(&url("http://10.1.2.3:8080/")));
        assert!(!list.allows(&url("http://11.1.2.3/")));
        assert!(list.allows(&url("http://127.0.0.1:9/")));
        assert!(!list.allows(&url("http://127.0.0.2/")));
        assert!(list.allows(&url("http://[::1]:9/")));
        assert!(!list.allows(&url("http://[::2]/")));
        assert!(!list.allows(&url("http://localhost/")), "names are not resolved to match networks");
    }

    #[test]
    fn nothing_allows_nothing() {
        assert!(!AllowList::nothing().allows(&url("http://127.0.0.1/")));
        assert!(!AllowList::nothing().is_open());
    }

    #[test]
    fn bad_entries() {
        for bad in ["10.0.0.0/33", "nope/8", "a b", "*.", "x..y", "1.2.3.4/-1"] {
            let e = AllowList::parse(bad).unwrap_err();
            assert!(e.message.contains(bad.trim()), "{bad}: {}", e.message);
        }
    }

    #[test]
    fn resolved_addresses() {
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        let list = AllowList::parse("*.example.com, 10.1.0.0/16").unwrap();
        assert!(list.allows_address(ip("93.184.216.34")));
        assert!(list.allows_address(ip("10.1.2.3")), "a listed network");
        for refused in [
            "127.0.0.1",
            "169.254.169.254",
            "10.2.0.1",
            "192.168.1.1",
            "172.16.0.1",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "::",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "64:ff9b::7f00:1",
            // IPv4 addresses inside IPv6 ones: compatible, 6to4, Teredo.
            "::127.0.0.1",
            "::10.0.0.1",
            "2002:a9fe:a9fe::1",
            "2002:7f00:1::",
            "2001:0:4136:e378:8000:63bf:3fff:fdd2",
            "100::1",
            // IPv4-translated (SIIT), site-local, and the other special ranges.
            "::ffff:0:127.0.0.1",
            "::ffff:0:a9fe:a9fe",
            "fec0::1",
            "3fff::1",
            "2001:2::1",
            "2001:10::1",
        ] {
            assert!(!list.allows_address(ip(refused)), "{refused}");
        }
        assert!(list.allows_address(ip("2002:5db8:d822::1")), "6to4 of a public address");
        assert!(list.allows_address(ip("2606:2800:220:1::248")));
        assert!(AllowList::default().allows_address(ip("127.0.0.1")), "an empty list allows any address");
    }

    #[test]
    fn networks() {
        assert!(in_network("192.168.1.7".parse().unwrap(), "192.168.0.0".parse().unwrap(), 16));
        assert!(!in_network("192.169.1.7".parse().unwrap(), "192.168.0.0".parse().unwrap(), 16));
        assert!(in_network("1.2.3.4".parse().unwrap(), "0.0.0.0".parse().unwrap(), 0));
        assert!(in_network("::ffff:10.0.0.1".parse().unwrap(), "10.0.0.0".parse().unwrap(), 8));
    }
}
