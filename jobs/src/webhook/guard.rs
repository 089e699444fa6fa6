//! The SSRF guard: which addresses a webhook may reach.
//!
//! By default loopback, private (RFC 1918, unique-local), link-local (which includes the cloud
//! metadata address 169.254.169.254), multicast, unspecified, broadcast, shared (CGNAT),
//! documentation/benchmarking ranges and IPv4-mapped forms of all of them are refused.
//! `allow` (CIDRs from `webhooks.allow_cidrs`) re-opens chosen ranges for on-premise receivers
//! and tests.
//!
//! The check runs on the resolved address, inside the HTTP client's DNS resolver
//! ([`GuardedResolver`]): the address checked is the address connected to, so a name that
//! resolves to a public address for a check and to a private one for the connection (DNS
//! rebinding) cannot slip through. URLs with a literal IP (which skip the resolver) are
//! checked before sending and on every redirect hop.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;

use ipnet::IpNet;
use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// The addresses deliveries may go to.
#[derive(Clone, Debug)]
pub struct Guard {
    allow: Arc<Vec<IpNet>>,
    /// The setting that re-opens a range, named in refusals.
    setting: &'static str,
}

impl Default for Guard {
    fn default() -> Self {
        Self::new(Vec::new())
    }
}

/// A refused destination.
#[derive(Debug, thiserror::Error)]
#[error(
    "refused by the SSRF guard: {host} resolves to {ip}, a {class} address; allow it with {setting} if this receiver is trusted"
)]
pub struct Blocked {
    /// The host as written in the URL.
    pub host: String,
    /// The address refused.
    pub ip: IpAddr,
    /// Why (loopback, private, …).
    pub class: &'static str,
    /// The setting that would let it through (`webhooks.allow_cidrs`).
    pub setting: &'static str,
}

impl Guard {
    /// A guard that also lets `allow` through.
    pub fn new(allow: Vec<IpNet>) -> Self {
        Self {
            allow: Arc::new(allow),
            setting: "webhooks.allow_cidrs",
        }
    }

    /// Names `setting` (e.g. `http_requests.allow_cidrs`) in refusals as the way to allow a
    /// range.
    pub fn naming(mut self, setting: &'static str) -> Self {
        self.setting = setting;
        self
    }

    /// `Ok` if `ip` may be reached.
    pub fn check(&self, host: &str, ip: IpAddr) -> Result<(), Blocked> {
        if self.allow.iter().any(|net| net.contains(&ip)) {
            return Ok(());
        }
        match forbidden_class(ip) {
            None => Ok(()),
            Some(class) => Err(Blocked {
                host: host.to_string(),
                ip,
                class,
                setting: self.setting,
            }),
        }
    }

    /// Checks a URL whose host is a literal IP (names are checked by the resolver).
    pub fn check_url(&self, url: &reqwest::Url) -> Result<(), Blocked> {
        match url.host() {
            Some(url::Host::Ipv4(ip)) => self.check(&ip.to_string(), IpAddr::V4(ip)),
            Some(url::Host::Ipv6(ip)) => self.check(&ip.to_string(), IpAddr::V6(ip)),
            _ => Ok(()),
        }
    }
}

/// Why an address is refused by default, or `None` if it is a public unicast address.
pub fn forbidden_class(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => v4_class(v4),
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return v4_class(v4);
            }
            v6_class(v6)
        }
    }
}

fn v4_class(ip: Ipv4Addr) -> Option<&'static str> {
    let o = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        // 169.254.169.254 is where AWS, GCP, Azure and others serve instance credentials.
        Some(if o == [169, 254, 169, 254] {
            "cloud metadata"
        } else {
            "link-local"
        })
    } else if ip.is_multicast() {
        Some("multicast")
    } else if ip.is_unspecified() || o[0] == 0 {
        Some("unspecified")
    } else if ip.is_broadcast() {
        Some("broadcast")
    } else if o[0] == 100 && (o[1] & 0xc0) == 64 {
        Some("shared (CGNAT)")
    } else if o[0] >= 240
        || (o[0] == 192 && o[1] == 0 && (o[2] == 0 || o[2] == 2))
        || (o[0] == 198 && (o[1] & 0xfe) == 18)
        || (o[0] == 198 && o[1] == 51 && o[2] == 100)
        || (o[0] == 203 && o[1] == 0 && o[2] == 113)
    {
        Some("reserved")
    } else {
        None
    }
}

fn v6_class(ip: Ipv6Addr) -> Option<&'static str> {
    let s = ip.segments();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if ip.is_multicast() {
        Some("multicast")
    } else if (s[0] & 0xfe00) == 0xfc00 {
        // Unique-local; includes AWS's IPv6 metadata address fd00:ec2::254.
        Some("private")
    } else if (s[0] & 0xffc0) == 0xfe80 {
        Some("link-local")
    } else if s[0] == 0x2001 && s[1] == 0xdb8 {
        Some("reserved")
    } else if s[0] == 0x64 && s[1] == 0xff9b {
        // NAT64 embeds an IPv4 address in the low 32 bits.
        let v4 = Ipv4Addr::new((s[6] >> 8) as u8, s[6] as u8, (s[7] >> 8) as u8, s[7] as u8);
        v4_class(v4)
    } else {
        None
    }
}

/// The HTTP client's resolver: resolves with the system resolver, then drops every address
/// the guard refuses; a name with no address left fails with [`Blocked`].
#[derive(Clone, Debug)]
pub struct GuardedResolver {
    guard: Guard,
}

impl GuardedResolver {
    /// A resolver that applies `guard`.
    pub fn new(guard: Guard) -> Self {
        Self { guard }
    }
}

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        let guard = self.guard.clone();
        Box::pin(async move {
            let host = name.as_str().to_string();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let mut allowed = Vec::with_capacity(addrs.len());
            let mut first_refusal = None;
            for addr in addrs {
                match guard.check(&host, addr.ip()) {
                    Ok(()) => allowed.push(addr),
                    Err(e) => {
                        first_refusal.get_or_insert(e);
                    }
                }
            }
            if allowed.is_empty()
                && let Some(refusal) = first_refusal
            {
                return Err(Box::new(refusal) as Box<dyn std::error::Error + Send + Sync>);
            }
            Ok(Box::new(allowed.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classes() {
        for (ip, class) in [
            ("127.0.0.1", Some("loopback")),
            ("10.0.0.1", Some("private")),
            ("172.16.5.4", Some("private")),
            ("192.168.1.1", Some("private")),
            ("169.254.169.254", Some("cloud metadata")),
            ("169.254.1.1", Some("link-local")),
            ("224.0.0.1", Some("multicast")),
            ("0.0.0.0", Some("unspecified")),
            ("100.64.0.1", Some("shared (CGNAT)")),
            ("::1", Some("loopback")),
            ("fc00::1", Some("private")),
            ("fe80::1", Some("link-local")),
            ("::ffff:127.0.0.1", Some("loopback")),
            ("::ffff:10.1.2.3", Some("private")),
            ("fd00:ec2::254", Some("private")),
            ("64:ff9b::a00:1", Some("private")),
            ("93.184.216.34", None),
            ("2606:4700::1111", None),
        ] {
            assert_eq!(forbidden_class(ip.parse().unwrap()), class, "{ip}");
        }
    }

    #[test]
    fn allow_list_opens_a_range() {
        let guard = Guard::new(vec!["127.0.0.0/8".parse().unwrap()]);
        assert!(guard.check("x", "127.0.0.1".parse().unwrap()).is_ok());
        assert!(guard.check("x", "10.0.0.1".parse().unwrap()).is_err());
    }
}
