//! The private-network guard: with `delivery.allow_private_networks = false`, refuse
//! destinations whose address is loopback, private, link-local, unspecified or otherwise
//! not a public unicast address.
//!
//! Checked on IP literals in any spelling (the URL parser normalises `2130706433`,
//! `0x7f.1` and `[::ffff:127.0.0.1]` to their addresses) and on every address a host name
//! resolves to, inside the HTTP client's resolver, so the address checked is the address
//! connected to.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use reqwest::dns::{Addrs, Name, Resolve, Resolving};

/// Whether the guard refuses this address, and why (`None`: allowed).
pub fn refusal(ip: IpAddr) -> Option<&'static str> {
    match ip {
        IpAddr::V4(v4) => refusal_v4(v4),
        IpAddr::V6(v6) => refusal_v6(v6),
    }
}

fn refusal_v4(ip: Ipv4Addr) -> Option<&'static str> {
    let [a, b, ..] = ip.octets();
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_private() {
        Some("private")
    } else if ip.is_link_local() {
        Some("link-local")
    } else if ip.is_unspecified() || a == 0 {
        Some("unspecified")
    } else if a == 100 && (64..128).contains(&b) {
        Some("shared (carrier-grade NAT)")
    } else if ip.is_broadcast() || ip.is_multicast() || a >= 240 {
        Some("broadcast, multicast or reserved")
    } else if a == 192 && b == 0 && ip.octets()[2] == 0 {
        Some("IETF protocol assignment")
    } else {
        None
    }
}

fn refusal_v6(ip: Ipv6Addr) -> Option<&'static str> {
    // Embedded IPv4 forms reach the IPv4 address: judge that one.
    if let Some(v4) = ip.to_ipv4_mapped() {
        return refusal_v4(v4);
    }
    let seg = ip.segments();
    if seg[..6] == [0, 0, 0, 0, 0, 0] && !ip.is_loopback() && !ip.is_unspecified() {
        // Deprecated IPv4-compatible ::a.b.c.d.
        return refusal_v4(Ipv4Addr::from(((seg[6] as u32) << 16) | seg[7] as u32));
    }
    if seg[..6] == [0x64, 0xff9b, 0, 0, 0, 0] {
        // NAT64 well-known prefix 64:ff9b::/96.
        return refusal_v4(Ipv4Addr::from(((seg[6] as u32) << 16) | seg[7] as u32));
    }
    if ip.is_loopback() {
        Some("loopback")
    } else if ip.is_unspecified() {
        Some("unspecified")
    } else if seg[0] & 0xfe00 == 0xfc00 {
        Some("private (unique local)")
    } else if seg[0] & 0xffc0 == 0xfe80 || seg[0] & 0xffc0 == 0xfec0 {
        Some("link-local")
    } else if ip.is_multicast() {
        Some("multicast")
    } else {
        None
    }
}

/// The error text for a refused address.
pub fn refused_message(host: &str, ip: IpAddr, why: &str) -> String {
    format!(
        "destination {host} resolves to {why} address {ip}, refused by the private-network guard \
         (delivery.allow_private_networks = false)"
    )
}

/// A resolver that refuses a name if any address it resolves to is refused.
#[derive(Debug, Default, Clone)]
pub struct GuardedResolver;

impl Resolve for GuardedResolver {
    fn resolve(&self, name: Name) -> Resolving {
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let addrs: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            for addr in &addrs {
                if let Some(why) = refusal(addr.ip()) {
                    return Err(refused_message(&host, addr.ip(), why).into());
                }
            }
            Ok(Box::new(addrs.into_iter()) as Addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn refused(s: &str) -> bool {
        refusal(s.parse().unwrap()).is_some()
    }

    #[test]
    fn refuses_non_public_addresses() {
        for ip in [
            "127.0.0.1",
            "127.255.0.9",
            "10.0.0.1",
            "172.16.5.4",
            "172.31.255.255",
            "192.168.1.1",
            "169.254.169.254",
            "0.0.0.0",
            "0.1.2.3",
            "100.64.0.1",
            "255.255.255.255",
            "224.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12:3456::1",
            "fe80::1",
            "::ffff:127.0.0.1",
            "::ffff:10.1.2.3",
            "::ffff:169.254.169.254",
            "::127.0.0.1",
            "64:ff9b::a9fe:a9fe",
            "ff02::1",
        ] {
            assert!(refused(ip), "{ip} should be refused");
        }
    }

    #[test]
    fn allows_public_addresses() {
        for ip in [
            "8.8.8.8",
            "1.1.1.1",
            "172.32.0.1",
            "100.128.0.1",
            "2606:4700::1111",
            "::ffff:8.8.8.8",
        ] {
            assert!(!refused(ip), "{ip} should be allowed");
        }
    }

    #[test]
    fn url_literals_in_any_spelling_reach_the_classifier() {
        for url in [
            "http://2130706433/",
            "http://0x7f.1/",
            "http://0177.0.0.1/",
            "http://127.1/",
            "http://[::ffff:127.0.0.1]/",
            "http://[::ffff:7f00:1]/",
        ] {
            let parsed = url::Url::parse(url).unwrap();
            let ip: IpAddr = match parsed.host().unwrap() {
                url::Host::Ipv4(ip) => ip.into(),
                url::Host::Ipv6(ip) => ip.into(),
                url::Host::Domain(d) => panic!("{url} parsed as a domain {d}"),
            };
            assert!(refusal(ip).is_some(), "{url} ({ip}) should be refused");
        }
    }
}
