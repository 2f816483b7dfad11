//! The egress guard: every outbound URL the broker or a node did not get from
//! its own configuration (node endpoints, scrape targets, image URLs) passes
//! here first.
//!
//! It refuses addresses that are not globally routable: loopback, private,
//! link-local, CGNAT, unique-local, site-local, multicast, documentation,
//! benchmarking, NAT64 and 6to4 forms of those, IPv4-mapped forms of those,
//! and the cloud metadata address. Hostnames are resolved and *every*
//! address must pass; callers then connect to the checked addresses only
//! (see [`resolve_checked`]), so a second DNS answer cannot swap in a
//! private address.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::error::{Error, Result};

/// Whether an IPv4 address is globally routable.
pub fn is_global_v4(ip: Ipv4Addr) -> bool {
    let o = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local() // 169.254/16, includes metadata 169.254.169.254
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || o[0] == 0 // "this network"
        || (o[0] == 100 && (o[1] & 0xc0) == 64) // CGNAT 100.64/10
        || (o[0] == 192 && o[1] == 0 && o[2] == 0) // IETF protocol assignments
        || (o[0] == 198 && (o[1] & 0xfe) == 18) // benchmarking 198.18/15
        || o[0] >= 240) // reserved
}

/// Whether an IPv6 address is globally routable (embedded IPv4 forms are
/// judged by the IPv4 address they carry).
pub fn is_global_v6(ip: Ipv6Addr) -> bool {
    if let Some(v4) = ip.to_ipv4_mapped() {
        return is_global_v4(v4);
    }
    let s = ip.segments();
    if ip.is_unspecified() || ip.is_loopback() || ip.is_multicast() {
        return false;
    }
    // IPv4-compatible ::a.b.c.d (deprecated) – judge the IPv4 part.
    if s[..6] == [0, 0, 0, 0, 0, 0] {
        return is_global_v4(Ipv4Addr::new(
            (s[6] >> 8) as u8,
            s[6] as u8,
            (s[7] >> 8) as u8,
            s[7] as u8,
        ));
    }
    // NAT64 well-known prefix 64:ff9b::/96 and local-use 64:ff9b:1::/48.
    if s[0] == 0x64 && s[1] == 0xff9b {
        if s[2] == 1 {
            return false;
        }
        return is_global_v4(Ipv4Addr::new(
            (s[6] >> 8) as u8,
            s[6] as u8,
            (s[7] >> 8) as u8,
            s[7] as u8,
        ));
    }
    // 6to4 2002::/16 carries an IPv4 address in the next 32 bits.
    if s[0] == 0x2002 {
        return is_global_v4(Ipv4Addr::new(
            (s[1] >> 8) as u8,
            s[1] as u8,
            (s[2] >> 8) as u8,
            s[2] as u8,
        ));
    }
    let unique_local = (s[0] & 0xfe00) == 0xfc00; // fc00::/7
    let link_local = (s[0] & 0xffc0) == 0xfe80; // fe80::/10
    let site_local = (s[0] & 0xffc0) == 0xfec0; // fec0::/10 (deprecated)
    let documentation = s[0] == 0x2001 && s[1] == 0x0db8; // 2001:db8::/32
    let discard = s[0] == 0x0100 && s[1] == 0 && s[2] == 0 && s[3] == 0; // 100::/64
    let teredo_or_orchid = s[0] == 0x2001 && (s[1] < 0x0200); // 2001::/23 IETF special
    !(unique_local || link_local || site_local || documentation || discard || teredo_or_orchid)
}

/// Whether an address is globally routable.
pub fn is_global(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_global_v4(v4),
        IpAddr::V6(v6) => is_global_v6(v6),
    }
}

/// Which addresses a guard lets through.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum EgressPolicy {
    /// Only globally routable addresses (production).
    #[default]
    PublicOnly,
    /// Any address, loopback and private included (tests, private clusters).
    AllowPrivate,
}

impl EgressPolicy {
    /// Whether `ip` may be contacted under this policy.
    pub fn permits(self, ip: IpAddr) -> bool {
        self == EgressPolicy::AllowPrivate || is_global(ip)
    }
}

/// Parses a URL and checks it is `http`/`https` with a host, no credentials.
pub fn parse_http_url(url: &str) -> Result<reqwest::Url> {
    let u = reqwest::Url::parse(url)
        .map_err(|e| Error::InvalidInput(format!("`{url}` is not a URL: {e}")))?;
    if !matches!(u.scheme(), "http" | "https") {
        return Err(Error::InvalidInput(format!(
            "`{url}`: only http and https URLs are allowed"
        )));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(Error::InvalidInput(format!("`{url}` has no host")));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(Error::InvalidInput(format!(
            "`{url}`: credentials in URLs are not allowed"
        )));
    }
    Ok(u)
}

/// Resolves a URL's host and checks every address under `policy`. Returns the
/// addresses to connect to (pin them: do not resolve again).
pub async fn resolve_checked(url: &reqwest::Url, policy: EgressPolicy) -> Result<Vec<SocketAddr>> {
    let host = url.host_str().unwrap_or_default();
    let port = url.port_or_known_default().unwrap_or(80);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match host.parse::<IpAddr>() {
        Ok(ip) => vec![SocketAddr::new(ip, port)],
        Err(_) => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| Error::InvalidInput(format!("cannot resolve `{host}`: {e}")))?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(Error::InvalidInput(format!(
            "`{host}` resolves to no address"
        )));
    }
    if let Some(bad) = addrs.iter().find(|a| !policy.permits(a.ip())) {
        return Err(Error::Forbidden(format!(
            "`{host}` resolves to {}, which is not a public address",
            bad.ip()
        )));
    }
    Ok(addrs)
}

/// Parses and checks a URL under `policy` (see [`resolve_checked`]).
pub async fn check_url(url: &str, policy: EgressPolicy) -> Result<(reqwest::Url, Vec<SocketAddr>)> {
    let u = parse_http_url(url)?;
    let addrs = resolve_checked(&u, policy).await?;
    Ok((u, addrs))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refuses_every_non_global_class() {
        for bad in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "100.127.255.255",
            "0.0.0.0",
            "255.255.255.255",
            "224.0.0.1",
            "198.18.0.1",
            "192.0.0.8",
            "240.0.0.1",
            "::1",
            "::",
            "fc00::1",
            "fd12::1",
            "fe80::1",
            "fec0::1",
            "::ffff:127.0.0.1",
            "::ffff:10.0.0.1",
            "64:ff9b::a00:1",
            "64:ff9b:1::1",
            "2002:a00:1::",
            "2002:7f00:1::",
            "2001:db8::1",
            "ff02::1",
            "::127.0.0.1",
        ] {
            let ip: IpAddr = bad.parse().unwrap();
            assert!(!is_global(ip), "{bad} must be refused");
        }
    }

    #[test]
    fn allows_public_addresses() {
        for good in [
            "1.1.1.1",
            "8.8.8.8",
            "100.128.0.1",
            "2606:4700::1111",
            "64:ff9b::808:808",
            "2002:808:808::",
        ] {
            let ip: IpAddr = good.parse().unwrap();
            assert!(is_global(ip), "{good} must be allowed");
        }
    }

    #[tokio::test]
    async fn hostnames_resolving_to_loopback_are_refused_unless_allowed() {
        let err = check_url("http://localhost:9/x", EgressPolicy::PublicOnly)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Forbidden(_)), "{err}");
        assert!(
            check_url("http://localhost:9/x", EgressPolicy::AllowPrivate)
                .await
                .is_ok()
        );
        assert!(matches!(
            check_url("ftp://example.com", EgressPolicy::AllowPrivate).await,
            Err(Error::InvalidInput(_))
        ));
        assert!(matches!(
            check_url("http://u:p@1.1.1.1/", EgressPolicy::AllowPrivate).await,
            Err(Error::InvalidInput(_))
        ));
    }
}
