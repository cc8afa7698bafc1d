//! Per-client rate limits at the edge, and which address a client has.
//!
//! Two limits, both per client address and both persisted in
//! `<rate_limit.state_dir>/edge-ratelimit.bin` ([`crate::ratelimit`]), so a
//! restart or a graceful upgrade does not hand a flooding client a fresh
//! bucket:
//! - `client_requests`: every request but `/health`;
//! - `client_misses`: answers for unknown, disabled or expired codes. A client
//!   over it gets 429 for *every* short code, known ones included, so that
//!   scanning cannot tell a live code from a dead one.
//!
//! An IPv6 client is its /64 (see [`client_key`]).
//!
//! The client address is the peer's, unless the peer is a configured
//! trusted proxy: then it is the rightmost address in the configured header
//! that is not itself a trusted proxy.

use std::net::IpAddr;

use crate::config::{IpNet, RateLimitConfig};
use crate::ratelimit::{Decision, Limit, LimiterTable};
use crate::state_file::StateError;

/// Limiter namespaces in the shared table.
const KIND_REQUESTS: u8 = 1;
const KIND_MISSES: u8 = 2;

/// The edge's limits. Shared through `Arc`; deciding takes no lock.
#[derive(Debug)]
pub struct EdgeRateLimits {
    table: LimiterTable,
    requests: Option<Limit>,
    misses: Option<Limit>,
}

/// A client address as limiter key bytes: IPv4 as its 4 bytes, so that
/// `::ffff:a.b.c.d` and `a.b.c.d` are one client; IPv6 as its /64 (8
/// bytes), since a host picks any address of its /64 at will, and counting
/// each address on its own would let it start afresh with every request.
pub fn client_key(ip: IpAddr, buf: &mut [u8; 16]) -> &[u8] {
    match ip {
        IpAddr::V4(v4) => {
            buf[..4].copy_from_slice(&v4.octets());
            &buf[..4]
        }
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => {
                buf[..4].copy_from_slice(&v4.octets());
                &buf[..4]
            }
            None => {
                buf[..8].copy_from_slice(&v6.octets()[..8]);
                &buf[..8]
            }
        },
    }
}

impl EdgeRateLimits {
    /// Opens the persisted table; `None` when no edge limit is configured.
    pub fn open(config: &RateLimitConfig) -> Result<Option<Self>, StateError> {
        if config.client_requests.is_none() && config.client_misses.is_none() {
            return Ok(None);
        }
        let table = LimiterTable::open(&config.state_dir.join("edge-ratelimit.bin"), config.slots)?;
        Ok(Some(Self {
            table,
            requests: config.client_requests,
            misses: config.client_misses,
        }))
    }

    /// Charges a request of `client`; `Some` when it is refused.
    pub fn request(&self, client: IpAddr, now_us: u64) -> Option<Decision> {
        let limit = self.requests?;
        let mut buf = [0u8; 16];
        let d = self
            .table
            .check(KIND_REQUESTS, client_key(client, &mut buf), limit, now_us);
        (!d.allowed).then_some(d)
    }

    /// Whether `client` is barred from short codes for scanning (not charged).
    pub fn scanning(&self, client: IpAddr, now_us: u64) -> Option<Decision> {
        let limit = self.misses?;
        let mut buf = [0u8; 16];
        let d = self
            .table
            .peek(KIND_MISSES, client_key(client, &mut buf), limit, now_us);
        (!d.allowed).then_some(d)
    }

    /// Charges one unknown-code answer to `client`.
    pub fn miss(&self, client: IpAddr, now_us: u64) {
        if let Some(limit) = self.misses {
            let mut buf = [0u8; 16];
            self.table
                .check(KIND_MISSES, client_key(client, &mut buf), limit, now_us);
        }
    }

    /// Flushes the persisted state (at shutdown).
    pub fn flush(&self) {
        self.table.flush();
    }
}

/// The client's address: `peer`, or, when `peer` is a trusted proxy, the
/// rightmost address of `forwarded` (an `X-Forwarded-For`-style list) that
/// is not a trusted proxy itself.
pub fn client_ip(peer: IpAddr, forwarded: Option<&[u8]>, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: IpAddr| trusted.iter().any(|net| net.contains(ip));
    if trusted.is_empty() || !is_trusted(peer) {
        return peer;
    }
    let Some(list) = forwarded else {
        return peer;
    };
    let mut leftmost = None;
    // Entry by entry from the right, as bytes: a byte that is not UTF-8 in
    // an entry left of the client's (forged by the client) must not spoil
    // the entries that trusted proxies appended.
    for entry in list.rsplit(|&b| b == b',') {
        let Some(ip) = std::str::from_utf8(entry)
            .ok()
            .and_then(|e| parse_forwarded_ip(e.trim()))
        else {
            // Garbage where an address should be: nothing further left can
            // be trusted either.
            break;
        };
        if !is_trusted(ip) {
            return ip;
        }
        leftmost = Some(ip);
    }
    leftmost.unwrap_or(peer)
}

/// An address as proxies write it: `1.2.3.4`, `1.2.3.4:567`, `::1`, `[::1]:567`.
fn parse_forwarded_ip(s: &str) -> Option<IpAddr> {
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Ok(sock) = s.parse::<std::net::SocketAddr>() {
        return Some(sock.ip());
    }
    s.strip_prefix('[')?.split(']').next()?.parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn nets(list: &[&str]) -> Vec<IpNet> {
        list.iter().map(|s| IpNet::parse(s).unwrap()).collect()
    }

    #[test]
    fn the_header_is_believed_only_from_trusted_proxies() {
        let trusted = nets(&["10.0.0.0/8", "::1"]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        // An untrusted peer's header is ignored.
        assert_eq!(
            client_ip(ip("203.0.113.9"), Some(b"1.1.1.1"), &trusted),
            ip("203.0.113.9")
        );
        // From a trusted proxy: the rightmost untrusted entry.
        assert_eq!(
            client_ip(
                ip("10.1.2.3"),
                Some(b"6.6.6.6, 198.51.100.4, 10.9.9.9"),
                &trusted
            ),
            ip("198.51.100.4")
        );
        assert_eq!(
            client_ip(ip("::1"), Some(b"[2001:db8::7]:4431"), &trusted),
            ip("2001:db8::7")
        );
        // Garbage stops the walk; no header: the peer.
        assert_eq!(
            client_ip(ip("10.1.2.3"), Some(b"6.6.6.6, junk, 10.2.2.2"), &trusted),
            ip("10.2.2.2")
        );
        assert_eq!(client_ip(ip("10.1.2.3"), None, &trusted), ip("10.1.2.3"));
        // No trusted proxies configured: always the peer.
        assert_eq!(
            client_ip(ip("10.1.2.3"), Some(b"1.1.1.1"), &[]),
            ip("10.1.2.3")
        );
    }

    /// A client behind a trusted proxy puts one byte that is not
    /// UTF-8 into its own `X-Forwarded-For`; the proxy appends the real
    /// address. The client must still be the one charged, not the proxy.
    #[test]
    fn a_forged_entry_that_is_not_utf8_does_not_make_the_proxy_the_client() {
        let trusted = nets(&["10.0.0.0/8"]);
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(
            client_ip(ip("10.1.2.3"), Some(b"\xff, 198.51.100.4"), &trusted),
            ip("198.51.100.4")
        );
    }

    #[test]
    fn mapped_ipv4_is_the_same_client() {
        let mut a = [0u8; 16];
        let mut b = [0u8; 16];
        let v4: IpAddr = "192.0.2.1".parse().unwrap();
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(client_key(v4, &mut a), client_key(mapped, &mut b));
        assert!(IpNet::parse("192.0.2.0/24").unwrap().contains(mapped));
        assert!(!IpNet::parse("192.0.3.0/24").unwrap().contains(v4));
        assert!(IpNet::parse("0.0.0.0/0").unwrap().contains(v4));
        assert!(IpNet::parse("10.0.0.0/33").is_none());
        // A network written IPv4-mapped is the IPv4 network, whichever way
        // the peer's address comes.
        let mapped = IpNet::parse("::ffff:10.1.0.0/112").unwrap();
        for peer in ["10.1.2.3", "::ffff:10.1.2.3"] {
            assert!(mapped.contains(peer.parse().unwrap()), "{peer}");
        }
        assert!(!mapped.contains("10.2.0.1".parse().unwrap()));
        assert!(IpNet::parse("::ffff:192.0.2.1").unwrap().contains(v4));
    }

    #[test]
    fn an_ipv6_client_is_its_64() {
        let key = |s: &str| {
            let mut buf = [0u8; 16];
            client_key(s.parse().unwrap(), &mut buf).to_vec()
        };
        assert_eq!(
            key("2001:db8:1:2::1"),
            key("2001:db8:1:2:aaaa:bbbb:cccc:dddd")
        );
        assert_ne!(key("2001:db8:1:2::1"), key("2001:db8:1:3::1"));
        // Not the key of any IPv4 client.
        assert_ne!(key("::1"), key("0.0.0.0"));
        assert_eq!(key("::ffff:192.0.2.1"), key("192.0.2.1"));
        assert_ne!(key("::ffff:192.0.2.1"), key("::ffff:192.0.2.2"));
    }
}
