//! Egress control: `outbox.allowed_hosts`, the hosts endpoints may point at.
//!
//! A comma-separated list of host names (`api.example.com`), name suffixes
//! (`*.example.com`) and IP networks (`10.0.0.0/8`, `127.0.0.1`, `::1`).
//! Empty means any host. Names match names; networks match IP-address
//! hosts. Checked when an endpoint is created or changed, before every
//! request, and for every redirect an endpoint is allowed to follow.

use crate::config::ConfigError;
use std::net::IpAddr;

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

    /// The error for a URL this list does not allow.
    pub fn refusal(url: &reqwest::Url) -> ConfigError {
        ConfigError {
            message: format!("host {:?} is not in outbox.allowed_hosts", url.host_str().unwrap_or("")),
            hint: Some("Ask the server administrator to add it to outbox.allowed_hosts.".into()),
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
    fn networks() {
        assert!(in_network("192.168.1.7".parse().unwrap(), "192.168.0.0".parse().unwrap(), 16));
        assert!(!in_network("192.169.1.7".parse().unwrap(), "192.168.0.0".parse().unwrap(), 16));
        assert!(in_network("1.2.3.4".parse().unwrap(), "0.0.0.0".parse().unwrap(), 0));
        assert!(in_network("::ffff:10.0.0.1".parse().unwrap(), "10.0.0.0".parse().unwrap(), 8));
    }
}
