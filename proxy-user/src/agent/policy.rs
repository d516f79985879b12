//! Which destinations an agent dials.
//!
//! Allowed by default: the node's own addresses on the kubelet port, and every port of the networks the
//! agent serves (pod CIDRs, service CIDRs). Loopback, link-local (cloud metadata such as
//! 169.254.169.254), unspecified and multicast addresses are denied unless an explicit `--allow` rule
//! covers them. Everything else is denied. Host names are resolved first and each address is checked.

use std::net::IpAddr;
use std::ops::RangeInclusive;
use std::str::FromStr;

use ipnet::IpNet;

/// An explicit allow rule: a network and a port range.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AllowRule {
    /// Destination network.
    pub net: IpNet,
    /// Destination ports.
    pub ports: RangeInclusive<u16>,
}

impl FromStr for AllowRule {
    type Err = String;

    /// `NET`, `NET@PORT` or `NET@LOW-HIGH`; a bare address means a single host.
    fn from_str(s: &str) -> Result<Self, String> {
        let (net, ports) = s.split_once('@').map_or((s, None), |(n, p)| (n, Some(p)));
        let net = net
            .parse::<IpNet>()
            .or_else(|_| net.parse::<IpAddr>().map(IpNet::from))
            .map_err(|_| format!("allow rule {s:?}: {net:?} is not a network or address"))?
            .trunc();
        let ports = match ports {
            None => 1..=u16::MAX,
            Some(p) => {
                let (lo, hi) = p.split_once('-').unwrap_or((p, p));
                let port = |v: &str| v.parse::<u16>().ok().filter(|&v| v != 0);
                match (port(lo), port(hi)) {
                    (Some(lo), Some(hi)) if lo <= hi => lo..=hi,
                    _ => {
                        return Err(format!(
                            "allow rule {s:?}: ports must be PORT or LOW-HIGH within 1-65535"
                        ));
                    }
                }
            }
        };
        Ok(Self { net, ports })
    }
}

/// The destination policy of one agent.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Policy {
    /// Explicit allow rules; they override the special-address denial.
    pub allow: Vec<AllowRule>,
    /// The node's own addresses, allowed on `kubelet_port`.
    pub node_addresses: Vec<IpAddr>,
    /// The kubelet's port.
    pub kubelet_port: u16,
    /// Networks allowed on every port (pod and service CIDRs).
    pub served: Vec<IpNet>,
}

/// Why the policy denied a destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Denial {
    /// Loopback, link-local, unspecified or multicast, with no explicit rule.
    SpecialAddress,
    /// A node address on a port other than the kubelet's.
    NodePort,
    /// Not a node address and not in any served network.
    NotServed,
}

impl Denial {
    /// Human-readable reason.
    #[must_use]
    pub fn describe(self) -> &'static str {
        match self {
            Self::SpecialAddress => {
                "loopback, link-local, unspecified and multicast addresses need an explicit --allow rule"
            }
            Self::NodePort => "only the kubelet port is allowed on the node's own addresses",
            Self::NotServed => {
                "destination is outside the node's addresses, pod and service CIDRs and --allow rules"
            }
        }
    }
}

fn is_special(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            v4.is_loopback()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_multicast()
                || v4.is_broadcast()
        }
        IpAddr::V6(v6) => {
            v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || v6.is_unicast_link_local()
                || v6.to_ipv4_mapped().is_some_and(|v4| is_special(IpAddr::V4(v4)))
        }
    }
}

impl Policy {
    /// Decides whether `ip:port` may be dialed.
    pub fn check(&self, ip: IpAddr, port: u16) -> Result<(), Denial> {
        // An IPv4-mapped IPv6 address is judged as the IPv4 address it carries.
        let ip = match ip {
            IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
            IpAddr::V4(_) => ip,
        };
        if self.allow.iter().any(|r| r.net.contains(&ip) && r.ports.contains(&port)) {
            return Ok(());
        }
        if is_special(ip) {
            return Err(Denial::SpecialAddress);
        }
        if self.node_addresses.contains(&ip) {
            return if port == self.kubelet_port { Ok(()) } else { Err(Denial::NodePort) };
        }
        if self.served.iter().any(|n| n.contains(&ip)) {
            return Ok(());
        }
        Err(Denial::NotServed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(allow: &[&str]) -> Policy {
        Policy {
            allow: allow.iter().map(|r| r.parse().unwrap()).collect(),
            node_addresses: vec!["10.0.0.5".parse().unwrap(), "fd00::5".parse().unwrap()],
            kubelet_port: 10250,
            served: vec!["10.244.1.0/24".parse().unwrap(), "10.96.0.0/12".parse().unwrap()],
        }
    }

    fn check(p: &Policy, ip: &str, port: u16) -> Result<(), Denial> {
        p.check(ip.parse().unwrap(), port)
    }

    #[test]
    fn defaults() {
        let p = policy(&[]);
        assert_eq!(check(&p, "10.0.0.5", 10250), Ok(()));
        assert_eq!(check(&p, "fd00::5", 10250), Ok(()));
        assert_eq!(check(&p, "10.0.0.5", 22), Err(Denial::NodePort));
        assert_eq!(check(&p, "10.244.1.9", 8080), Ok(()));
        assert_eq!(check(&p, "10.100.3.4", 443), Ok(()));
        assert_eq!(check(&p, "10.244.2.9", 8080), Err(Denial::NotServed));
        assert_eq!(check(&p, "8.8.8.8", 53), Err(Denial::NotServed));
    }

    #[test]
    fn special_addresses_need_explicit_rules() {
        let p = policy(&[]);
        for ip in
            ["127.0.0.1", "169.254.169.254", "0.0.0.0", "224.0.0.1", "::1", "fe80::1", "::ffff:127.0.0.1"]
        {
            assert_eq!(check(&p, ip, 80), Err(Denial::SpecialAddress), "{ip}");
        }
        let p = policy(&["127.0.0.0/8@8000-8100", "::1"]);
        assert_eq!(check(&p, "127.0.0.2", 8080), Ok(()));
        assert_eq!(check(&p, "::ffff:127.0.0.2", 8080), Ok(()));
        assert_eq!(check(&p, "127.0.0.2", 9000), Err(Denial::SpecialAddress));
        assert_eq!(check(&p, "::1", 1), Ok(()));
        assert_eq!(check(&p, "169.254.169.254", 80), Err(Denial::SpecialAddress));
    }

    #[test]
    fn rule_syntax() {
        let r: AllowRule = "10.1.2.3".parse().unwrap();
        assert_eq!((r.net.to_string(), r.ports), ("10.1.2.3/32".into(), 1..=65535));
        let r: AllowRule = "fd00::/64@443".parse().unwrap();
        assert_eq!(r.ports, 443..=443);
        for bad in
            ["10.0.0.0/33", "host", "10.0.0.0/8@", "10.0.0.0/8@9-1", "10.0.0.0/8@0", "10.0.0.0/8@1-70000"]
        {
            assert!(bad.parse::<AllowRule>().is_err(), "{bad}");
        }
    }
}
