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
use std::time::Duration;

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

/// The IPv4 address two IPv6 segments carry.
fn v4_from(hi: u16, lo: u16) -> Ipv4Addr {
    Ipv4Addr::from((u32::from(hi) << 16) | u32::from(lo))
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
        return is_global_v4(v4_from(s[6], s[7]));
    }
    // NAT64 well-known prefix 64:ff9b::/96 and local-use 64:ff9b:1::/48.
    if s[0] == 0x64 && s[1] == 0xff9b {
        if s[2] == 1 {
            return false;
        }
        return is_global_v4(v4_from(s[6], s[7]));
    }
    // 6to4 2002::/16 carries an IPv4 address in the next 32 bits.
    if s[0] == 0x2002 {
        return is_global_v4(v4_from(s[1], s[2]));
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

/// Anything that decides whether an address may be contacted: an
/// [`EgressPolicy`] or [`EgressRules`] (a policy with exceptions).
pub trait AddressFilter {
    /// Whether `ip` may be contacted.
    fn permits_ip(&self, ip: IpAddr) -> bool;
}

impl AddressFilter for EgressPolicy {
    fn permits_ip(&self, ip: IpAddr) -> bool {
        self.permits(ip)
    }
}

impl<T: AddressFilter + ?Sized> AddressFilter for &T {
    fn permits_ip(&self, ip: IpAddr) -> bool {
        (**self).permits_ip(ip)
    }
}

/// A policy plus exactly the extra addresses or networks it lets through.
///
/// `AllowPrivate` is all or nothing; these rules let a test (or a private
/// deployment) open precisely one address, e.g. `127.0.0.1/32`, while every
/// other non-global address (`10.0.0.1`, `169.254.169.254`, `::1`...) stays
/// refused, redirects included.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct EgressRules {
    /// The policy for every address not listed in `allow`.
    pub base: EgressPolicy,
    /// Addresses and networks let through whatever `base` says.
    pub allow: Vec<ipnet::IpNet>,
}

impl EgressRules {
    /// Globally routable addresses only, no exceptions.
    pub fn public_only() -> Self {
        EgressRules::default()
    }

    /// These rules plus one address or network (`127.0.0.1`, `10.1.0.0/16`,
    /// `::1`). A bare address means exactly that address.
    pub fn allowing(mut self, net: &str) -> Result<Self> {
        let net = net.trim();
        let parsed = match net.parse::<ipnet::IpNet>() {
            Ok(n) => n,
            Err(_) => net
                .parse::<IpAddr>()
                .map(ipnet::IpNet::from)
                .map_err(|_| Error::InvalidInput(format!("`{net}` is not an address or CIDR")))?,
        };
        self.allow.push(parsed.trunc());
        Ok(self)
    }
}

impl From<EgressPolicy> for EgressRules {
    fn from(base: EgressPolicy) -> Self {
        EgressRules {
            base,
            allow: Vec::new(),
        }
    }
}

impl AddressFilter for EgressRules {
    fn permits_ip(&self, ip: IpAddr) -> bool {
        // An IPv4-mapped IPv6 address is the IPv4 address for an allowlist,
        // so `::ffff:127.0.0.1` matches `127.0.0.1/32` and nothing else.
        let canon = ip.to_canonical();
        self.base.permits(ip)
            || self
                .allow
                .iter()
                .any(|n| n.contains(&canon) || n.contains(&ip))
    }
}

/// Parses a URL and checks it is `http`/`https` with a host, no credentials.
pub fn parse_http_url(url: &str) -> Result<reqwest::Url> {
    let u = reqwest::Url::parse(url)
        .map_err(|e| Error::InvalidInput(format!("`{url}` is not a URL: {e}")))?;
    check_http_url(&u)?;
    Ok(u)
}

/// Checks a parsed URL is `http`/`https` with a host, no credentials.
pub fn check_http_url(u: &reqwest::Url) -> Result<()> {
    if !matches!(u.scheme(), "http" | "https") {
        return Err(Error::InvalidInput(format!(
            "`{u}`: only http and https URLs are allowed"
        )));
    }
    if u.host_str().is_none_or(str::is_empty) {
        return Err(Error::InvalidInput(format!("`{u}` has no host")));
    }
    if !u.username().is_empty() || u.password().is_some() {
        return Err(Error::InvalidInput(format!(
            "`{u}`: credentials in URLs are not allowed"
        )));
    }
    Ok(())
}

/// The IP address a URL names literally, if its host is one.
pub fn literal_ip(url: &reqwest::Url) -> Option<IpAddr> {
    // The URL parser has already normalised IPv4 forms (`0x7f.1` is
    // `127.0.0.1` here) and bracketed IPv6 ones.
    let host = url.host_str()?;
    host.trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
        .ok()
}

/// Name suffixes that never lead to a public address: special-use names
/// (`localhost`, RFC 6761; `local`, mDNS; `home.arpa`, RFC 8375), the
/// private-use `internal` (cloud metadata: `metadata.google.internal`) and
/// the suffixes private networks commonly use.
const LOCAL_SUFFIXES: &[&str] = &[
    "localhost",
    "local",
    "internal",
    "home.arpa",
    "localdomain",
    "lan",
    "home",
    "corp",
    "intranet",
];

/// Whether a host name can only mean a machine on a private network: one
/// label (`metadata`, `intranet`), or a name under a special-use or private
/// suffix (`localhost`, `metadata.google.internal`, `printer.local`...).
///
/// Such a URL can be refused without resolving it, where resolving is not
/// possible (the broker checking a URL a node will fetch). It is a first
/// filter, not the guard: a public-looking name may still resolve to a
/// private address, which only [`resolve_checked`] catches.
pub fn is_local_name(host: &str) -> bool {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    !host.contains('.')
        || LOCAL_SUFFIXES.iter().any(|s| {
            host.strip_suffix(s)
                .is_some_and(|rest| rest.is_empty() || rest.ends_with('.'))
        })
}

/// Resolves a URL's host and checks every address under `policy`. Returns the
/// addresses to connect to (pin them: do not resolve again).
pub async fn resolve_checked(
    url: &reqwest::Url,
    policy: impl AddressFilter,
) -> Result<Vec<SocketAddr>> {
    let host = url.host_str().unwrap_or_default();
    let port = url.port_or_known_default().unwrap_or(80);
    let host = host.trim_start_matches('[').trim_end_matches(']');
    let addrs: Vec<SocketAddr> = match literal_ip(url) {
        Some(ip) => vec![SocketAddr::new(ip, port)],
        None => tokio::net::lookup_host((host, port))
            .await
            .map_err(|e| Error::InvalidInput(format!("cannot resolve `{host}`: {e}")))?
            .collect(),
    };
    if addrs.is_empty() {
        return Err(Error::InvalidInput(format!(
            "`{host}` resolves to no address"
        )));
    }
    if let Some(bad) = addrs.iter().find(|a| !policy.permits_ip(a.ip())) {
        return Err(Error::Forbidden(if literal_ip(url).is_some() {
            format!("{} is not a public address", bad.ip())
        } else {
            format!(
                "`{host}` resolves to {}, which is not a public address",
                bad.ip()
            )
        }));
    }
    Ok(addrs)
}

/// A DNS resolver for HTTP clients that hands out a name's addresses only
/// when `filter` permits every one of them (the rule of [`resolve_checked`]).
///
/// Checking a host once (at registration) is not enough when a client
/// resolves it again for each new connection: its DNS could later point it
/// at a forbidden address. A client built with this resolver re-applies the
/// check on every resolution. (Literal IP hosts are never resolved; they are
/// checked once and cannot change.)
#[derive(Clone, Debug)]
pub struct GuardedResolver<F>(pub F);

impl<F: AddressFilter + Clone + Send + Sync + 'static> reqwest::dns::Resolve
    for GuardedResolver<F>
{
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let filter = self.0.clone();
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let addrs: reqwest::dns::Addrs = Box::new(guarded_lookup(filter, host).await?);
            Ok(addrs)
        })
    }
}

/// The same guard for hyper's connector (the client calls are forwarded to
/// nodes with, see `forward`).
impl<F: AddressFilter + Clone + Send + Sync + 'static>
    tower::Service<hyper_util::client::legacy::connect::dns::Name> for GuardedResolver<F>
{
    type Response = std::vec::IntoIter<SocketAddr>;
    type Error = Box<dyn std::error::Error + Send + Sync>;
    type Future = std::pin::Pin<
        Box<
            dyn std::future::Future<Output = std::result::Result<Self::Response, Self::Error>>
                + Send,
        >,
    >;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::result::Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, name: hyper_util::client::legacy::connect::dns::Name) -> Self::Future {
        Box::pin(guarded_lookup(self.0.clone(), name.as_str().to_owned()))
    }
}

/// Resolves `host` and refuses it when any of its addresses is one `filter`
/// forbids (what [`GuardedResolver`] does for either client).
async fn guarded_lookup<F: AddressFilter>(
    filter: F,
    host: String,
) -> std::result::Result<std::vec::IntoIter<SocketAddr>, Box<dyn std::error::Error + Send + Sync>> {
    // The port is the caller's; the connector replaces this one.
    let addrs: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
    if let Some(bad) = addrs.iter().find(|a| !filter.permits_ip(a.ip())) {
        return Err(format!(
            "`{host}` resolves to {}, which is not a public address",
            bad.ip()
        )
        .into());
    }
    Ok(addrs.into_iter())
}

/// Parses and checks a URL under `policy` (see [`resolve_checked`]).
pub async fn check_url(
    url: &str,
    policy: impl AddressFilter,
) -> Result<(reqwest::Url, Vec<SocketAddr>)> {
    let u = parse_http_url(url)?;
    let addrs = resolve_checked(&u, policy).await?;
    Ok((u, addrs))
}

// ---- guarded fetching -----------------------------------------------------------

/// The caps of one guarded fetch.
#[derive(Clone, Debug)]
pub struct FetchLimits {
    /// Largest body read; a larger one fails the fetch.
    pub max_bytes: usize,
    /// The whole fetch, redirects and body included.
    pub timeout: Duration,
    /// TCP (and TLS) connect timeout of each hop.
    pub connect_timeout: Duration,
    /// Redirects followed at most.
    pub max_redirects: usize,
    /// The `User-Agent` sent.
    pub user_agent: String,
}

impl Default for FetchLimits {
    fn default() -> Self {
        FetchLimits {
            max_bytes: 5 << 20,
            timeout: Duration::from_secs(15),
            connect_timeout: Duration::from_secs(5),
            max_redirects: 5,
            user_agent: "cxmpute-node/0.1".into(),
        }
    }
}

/// What a guarded fetch got.
#[derive(Clone, Debug)]
pub struct Fetched {
    /// The URL the body came from (after redirects).
    pub url: reqwest::Url,
    /// Its HTTP status.
    pub status: u16,
    /// Its `Content-Type`, lower-cased, if any.
    pub content_type: Option<String>,
    /// The body (at most [`FetchLimits::max_bytes`]).
    pub body: bytes::Bytes,
}

/// Fetches `url` with `GET` under `policy`.
///
/// Every hop is resolved and checked, and the connection goes to exactly the
/// checked addresses (pinned in the client, so a second DNS answer cannot
/// swap in a private one). Redirects are followed here, each target checked
/// again, never by the HTTP client. No proxy from the environment is used:
/// a proxy would connect on our behalf to an address we never checked.
///
/// Errors: `InvalidInput` (not an http(s) URL, unresolvable host),
/// `Forbidden` (a refused address, on any hop), `PayloadTooLarge` (body over
/// the cap), `UpstreamTimeout` (over the time cap), `Upstream` (connection
/// failures, too many redirects).
pub async fn fetch(url: &str, policy: impl AddressFilter, limits: &FetchLimits) -> Result<Fetched> {
    let deadline = tokio::time::Instant::now() + limits.timeout;
    match tokio::time::timeout_at(deadline, fetch_inner(url, &policy, limits)).await {
        Ok(r) => r,
        Err(_) => Err(Error::UpstreamTimeout(format!(
            "`{url}` did not answer within {} ms",
            limits.timeout.as_millis()
        ))),
    }
}

async fn fetch_inner(
    url: &str,
    policy: &impl AddressFilter,
    limits: &FetchLimits,
) -> Result<Fetched> {
    let mut current = parse_http_url(url)?;
    for _hop in 0..=limits.max_redirects {
        let addrs = resolve_checked(&current, policy).await?;
        let client = pinned_client(&current, &addrs, limits)?;
        let mut resp = client
            .get(current.clone())
            .send()
            .await
            .map_err(|e| Error::Upstream(format!("fetching `{current}` failed: {e}")))?;
        let status = resp.status();
        if status.is_redirection() {
            if let Some(loc) = resp.headers().get(http::header::LOCATION) {
                let loc = loc.to_str().map_err(|_| {
                    Error::Upstream(format!("`{current}` redirected to an unreadable location"))
                })?;
                let next = current.join(loc).map_err(|e| {
                    Error::Upstream(format!("`{current}` redirected to `{loc}`: {e}"))
                })?;
                check_http_url(&next)?;
                current = next;
                continue;
            }
        }
        if resp
            .content_length()
            .is_some_and(|n| n > limits.max_bytes as u64)
        {
            return Err(too_large(&current, limits));
        }
        let content_type = resp
            .headers()
            .get(http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.trim().to_ascii_lowercase());
        let body = read_capped(&mut resp, limits.max_bytes, None)
            .await
            .map_err(|e| match e {
                CappedReadError::TooLarge => too_large(&current, limits),
                other => Error::Upstream(format!("reading `{current}` failed: {other}")),
            })?;
        return Ok(Fetched {
            url: current,
            status: status.as_u16(),
            content_type,
            body: body.into(),
        });
    }
    Err(Error::Upstream(format!(
        "`{url}`: more than {} redirects",
        limits.max_redirects
    )))
}

/// Why [`read_capped`] stopped before the end of a body.
#[derive(Debug)]
pub enum CappedReadError {
    /// The body broke off.
    Failed(reqwest::Error),
    /// The body is larger than the cap.
    TooLarge,
    /// No bytes came within the idle timeout.
    Stalled,
}

impl std::fmt::Display for CappedReadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            CappedReadError::Failed(e) => e.fmt(f),
            CappedReadError::TooLarge => f.write_str("the body is too large"),
            CappedReadError::Stalled => f.write_str("the body stalled"),
        }
    }
}

/// Reads a response's whole body, refusing it once it would pass `cap`
/// bytes and, with an `idle` timeout, when no bytes come for that long: how
/// an answer from a stranger's server (a node's, a model server's) is read.
pub async fn read_capped(
    resp: &mut reqwest::Response,
    cap: usize,
    idle: Option<Duration>,
) -> std::result::Result<Vec<u8>, CappedReadError> {
    let mut buf = Vec::new();
    loop {
        let chunk = match idle {
            Some(idle) => tokio::time::timeout(idle, resp.chunk())
                .await
                .map_err(|_| CappedReadError::Stalled)?,
            None => resp.chunk().await,
        };
        match chunk.map_err(CappedReadError::Failed)? {
            None => return Ok(buf),
            Some(c) => {
                if buf.len() + c.len() > cap {
                    return Err(CappedReadError::TooLarge);
                }
                buf.extend_from_slice(&c);
            }
        }
    }
}

fn too_large(url: &reqwest::Url, limits: &FetchLimits) -> Error {
    Error::PayloadTooLarge(format!("`{url}` is larger than {} bytes", limits.max_bytes))
}

/// A client that connects only to `addrs` for `url`'s host and follows no
/// redirects by itself.
fn pinned_client(
    url: &reqwest::Url,
    addrs: &[SocketAddr],
    limits: &FetchLimits,
) -> Result<reqwest::Client> {
    let mut b = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .connect_timeout(limits.connect_timeout)
        .user_agent(limits.user_agent.clone());
    if let (None, Some(host)) = (literal_ip(url), url.host_str()) {
        b = b.resolve_to_addrs(host, addrs);
    }
    b.build()
        .map_err(|e| Error::backend("building the fetch client", e))
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
            // CGNAT, and metadata in every wrapping.
            "100.64.0.0",
            "::ffff:169.254.169.254",
            "::ffff:100.64.0.1",
            "64:ff9b::a9fe:a9fe",
            "64:ff9b::6440:1",
            "2002:a9fe:a9fe::1",
            "2002:c0a8:101::1",
            "2002:6440:1::",
            // AWS's IPv6 metadata address lives in unique-local space.
            "fd00:ec2::254",
            "fec0::fe",
            "feff::1",
            "2001::1",
            "100::1",
        ] {
            let ip: IpAddr = bad.parse().unwrap();
            assert!(!is_global(ip), "{bad} must be refused");
        }
    }

    #[test]
    fn local_names_are_told_from_public_ones() {
        for local in [
            "localhost",
            "LOCALHOST.",
            "api.localhost",
            "metadata",
            "metadata.google.internal",
            "printer.local",
            "router.home.arpa",
            "nas.lan",
        ] {
            assert!(is_local_name(local), "{local}");
        }
        for public in [
            "example.com",
            "images.example.org.",
            "internal.example.com",
            "mylan.com",
        ] {
            assert!(!is_local_name(public), "{public}");
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

    #[test]
    fn an_allowlist_opens_exactly_what_it_names() {
        let rules = EgressRules::public_only().allowing("127.0.0.1").unwrap();
        let ok = |a: &str| rules.permits_ip(a.parse().unwrap());
        assert!(ok("127.0.0.1"));
        assert!(
            ok("::ffff:127.0.0.1"),
            "the mapped form is the same address"
        );
        assert!(ok("1.1.1.1"), "public addresses stay allowed");
        for bad in [
            "127.0.0.2",
            "10.0.0.1",
            "169.254.169.254",
            "::1",
            "192.168.0.1",
            "fd00::1",
        ] {
            assert!(!ok(bad), "{bad} must stay refused");
        }
        let net = EgressRules::public_only().allowing("10.1.0.0/16").unwrap();
        assert!(net.permits_ip("10.1.200.3".parse().unwrap()));
        assert!(!net.permits_ip("10.2.0.1".parse().unwrap()));
        assert!(matches!(
            EgressRules::public_only().allowing("nope"),
            Err(Error::InvalidInput(_))
        ));
    }

    #[tokio::test]
    async fn literal_addresses_are_checked_without_resolving() {
        let rules = EgressRules::public_only().allowing("127.0.0.1").unwrap();
        for bad in [
            "http://10.0.0.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]:8080/",
            "http://[fd00:ec2::254]/",
            "http://100.64.1.1/",
            "http://0x7f.0.0.2/",
            "http://[::ffff:a9fe:a9fe]/",
        ] {
            let err = check_url(bad, &rules).await.unwrap_err();
            assert!(matches!(err, Error::Forbidden(_)), "{bad}: {err}");
        }
        assert!(check_url("http://127.0.0.1:9/", &rules).await.is_ok());
    }

    /// A loopback server: `/redirect?to=URL` redirects there, `/chain/N`
    /// redirects N more times, `/big` sends 64 KiB, anything else says hello.
    async fn page_server() -> std::net::SocketAddr {
        use axum::extract::{Path, Query};
        use axum::response::{IntoResponse, Redirect};
        use axum::routing::get;
        let app = axum::Router::new()
            .route(
                "/redirect",
                get(
                    |Query(q): Query<std::collections::HashMap<String, String>>| async move {
                        Redirect::temporary(&q["to"])
                    },
                ),
            )
            .route(
                "/chain/{n}",
                get(|Path(n): Path<u32>| async move {
                    if n == 0 {
                        "end of chain".into_response()
                    } else {
                        Redirect::temporary(&format!("/chain/{}", n - 1)).into_response()
                    }
                }),
            )
            .route("/big", get(|| async { "x".repeat(64 << 10) }))
            .route("/", get(|| async { "hello" }));
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap();
        tokio::spawn(async move {
            let _ = axum::serve(l, app).await;
        });
        addr
    }

    #[tokio::test]
    async fn a_guarded_client_never_connects_to_a_name_resolving_to_a_forbidden_address() {
        let addr = page_server().await;
        let url = format!("http://localhost:{}/chain/0", addr.port());
        let client = |p: EgressPolicy| {
            reqwest::Client::builder()
                .dns_resolver(std::sync::Arc::new(GuardedResolver(p)))
                .build()
                .unwrap()
        };
        let refused = client(EgressPolicy::PublicOnly).get(&url).send().await;
        assert!(refused.is_err(), "connected to loopback through a name");
        let allowed = client(EgressPolicy::AllowPrivate)
            .get(&url)
            .send()
            .await
            .unwrap();
        assert_eq!(allowed.status(), 200);
    }

    #[tokio::test]
    async fn fetch_follows_redirects_and_rechecks_every_hop() {
        let addr = page_server().await;
        let rules = EgressRules::public_only().allowing("127.0.0.1").unwrap();
        let limits = FetchLimits::default();
        let page = fetch(&format!("http://{addr}/chain/3"), &rules, &limits)
            .await
            .unwrap();
        assert_eq!(page.status, 200);
        assert_eq!(&page.body[..], b"end of chain");
        assert_eq!(page.url.path(), "/chain/0");

        // Each of these would be reached through an allowed first hop; the
        // redirect target is refused before any connection is made.
        for target in [
            "http://10.0.0.1/",
            "http://169.254.169.254/latest/meta-data/",
            "http://[::1]/",
            "http://127.0.0.2/",
            "http://100.64.0.1/",
        ] {
            let url = format!("http://{addr}/redirect?to={target}");
            let err = fetch(&url, &rules, &limits).await.unwrap_err();
            assert!(matches!(err, Error::Forbidden(_)), "{target}: {err}");
        }
        let url = format!("http://{addr}/redirect?to=file:///etc/passwd");
        assert!(matches!(
            fetch(&url, &rules, &limits).await,
            Err(Error::InvalidInput(_))
        ));
    }

    #[tokio::test]
    async fn fetch_enforces_redirect_and_size_caps() {
        let addr = page_server().await;
        let rules = EgressRules::public_only().allowing("127.0.0.1").unwrap();
        let limits = FetchLimits {
            max_redirects: 2,
            max_bytes: 1024,
            ..FetchLimits::default()
        };
        let err = fetch(&format!("http://{addr}/chain/3"), &rules, &limits)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::Upstream(_)), "{err}");
        let err = fetch(&format!("http://{addr}/big"), &rules, &limits)
            .await
            .unwrap_err();
        assert!(matches!(err, Error::PayloadTooLarge(_)), "{err}");
        // Loopback without the exception is refused.
        let err = fetch(
            &format!("http://{addr}/"),
            EgressPolicy::PublicOnly,
            &limits,
        )
        .await
        .unwrap_err();
        assert!(matches!(err, Error::Forbidden(_)), "{err}");
    }
}
