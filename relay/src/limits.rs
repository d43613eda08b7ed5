//! Who a client is, and how much of the relay it may hold at once.
//!
//! An anonymous client on the open internet can open connections and keep them open for free;
//! every one costs the relay a descriptor and memory. Three rules bound that cost:
//!
//! * **per connection**, deadlines: the TLS handshake, and the first request head (and the next
//!   one on a kept-alive connection), must arrive in time (`http.*_timeout_ms`, applied in
//!   [`crate::Relay::run`]);
//! * **per client**, caps on what is open at once: TCP connections ([`LimitAcceptor`], checked
//!   before the TLS handshake so a refused client costs one `accept`), and WebSockets
//!   ([`OpenCounts`] again, checked at the upgrade);
//! * **for everyone together**, a cap on connections below the descriptor limit, so the relay
//!   can always accept the next honest client and its tunnels and TURN sockets keep working.
//!
//! A client is its address, canonicalised ([`client_key`]): IPv4-mapped IPv6 is IPv4, and IPv6
//! is counted per network (a /64 by default), because one subscriber holds a whole /64. Behind
//! a reverse proxy every request comes from the proxy: [`client_ip`] takes the address the
//! proxy reports, from the proxies the operator trusts and from nobody else.

use axum::http::HeaderMap;
use axum_server::accept::Accept;
use ipnet::IpNet;
use std::collections::HashMap;
use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv6Addr};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;

/// The key a client is counted under: IPv4 as is (mapped forms unwrapped), IPv6 masked to its
/// first `v6_prefix_len` bits.
pub fn client_key(ip: IpAddr, v6_prefix_len: u8) -> IpAddr {
    match avatar_proto::netfilter::canonical(ip) {
        IpAddr::V6(v6) => {
            let bits = u32::from(v6_prefix_len.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            IpAddr::V6(Ipv6Addr::from(u128::from(v6) & mask))
        }
        v4 => v4,
    }
}

/// The client's address. A request from a trusted proxy is taken to come from the address the
/// proxy appended to `X-Forwarded-For` (or `Forwarded: for=`): the right-most entry that is not
/// itself a trusted proxy. Anyone else's headers are ignored, since a client can write them.
pub fn client_ip(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let peer = avatar_proto::netfilter::canonical(peer);
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|n| n.contains(ip));
    if !is_trusted(&peer) {
        return peer;
    }
    let mut chain: Vec<IpAddr> = Vec::new();
    for value in headers.get_all("forwarded").iter().filter_map(|v| v.to_str().ok()) {
        for element in value.split(',') {
            for pair in element.split(';') {
                let Some((k, v)) = pair.trim().split_once('=') else {
                    continue;
                };
                if k.trim().eq_ignore_ascii_case("for") {
                    if let Some(ip) = parse_forwarded_node(v.trim()) {
                        chain.push(ip);
                    }
                }
            }
        }
    }
    if chain.is_empty() {
        for value in headers
            .get_all("x-forwarded-for")
            .iter()
            .filter_map(|v| v.to_str().ok())
        {
            chain.extend(value.split(',').filter_map(|s| parse_forwarded_node(s.trim())));
        }
    }
    chain
        .into_iter()
        .rev()
        .map(avatar_proto::netfilter::canonical)
        .find(|ip| !is_trusted(ip))
        .unwrap_or(peer)
}

/// An address as a proxy writes it: `203.0.113.7`, `203.0.113.7:4711`, `"[2001:db8::1]:4711"`.
fn parse_forwarded_node(s: &str) -> Option<IpAddr> {
    let s = s.trim_matches('"');
    if let Ok(ip) = s.parse() {
        return Some(ip);
    }
    if let Some(rest) = s.strip_prefix('[') {
        return rest.split_once(']').and_then(|(ip, _)| ip.parse().ok());
    }
    s.rsplit_once(':').and_then(|(ip, _)| ip.parse().ok())
}

/// Counts of what each client holds open, and in total. Clients are addresses by default; the
/// session API counts its uploads per key name.
pub struct OpenCounts<K = IpAddr> {
    inner: Mutex<Counts<K>>,
}

impl<K> Default for OpenCounts<K> {
    fn default() -> Self {
        Self {
            inner: Mutex::new(Counts {
                total: 0,
                per_key: HashMap::new(),
            }),
        }
    }
}

struct Counts<K> {
    total: usize,
    per_key: HashMap<K, usize>,
}

/// Why [`OpenCounts::try_open`] refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    /// The client already holds its share.
    PerClient,
    /// Everyone together holds the total.
    Total,
}

impl Refused {
    pub fn as_str(self) -> &'static str {
        match self {
            Refused::PerClient => "per_ip",
            Refused::Total => "total",
        }
    }
}

impl<K: Eq + std::hash::Hash + Clone> OpenCounts<K> {
    fn counts(&self) -> std::sync::MutexGuard<'_, Counts<K>> {
        // Only counters are held under this lock; a panic elsewhere leaves them consistent.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Count one more for `key` (`None`: exempt from the per-client cap, counted in the total),
    /// unless that would pass `per_client` (0: no cap) or `total`. The count is given back when
    /// the guard drops.
    pub fn try_open(
        self: &Arc<Self>,
        key: Option<K>,
        per_client: usize,
        total: usize,
    ) -> Result<OpenGuard<K>, Refused> {
        let mut c = self.counts();
        if c.total >= total {
            return Err(Refused::Total);
        }
        if let Some(key) = key.clone() {
            let n = c.per_key.entry(key).or_insert(0);
            if per_client > 0 && *n >= per_client {
                return Err(Refused::PerClient);
            }
            *n += 1;
        }
        c.total += 1;
        Ok(OpenGuard {
            counts: Arc::clone(self),
            key,
        })
    }

    /// What is open, in total.
    pub fn total(&self) -> usize {
        self.counts().total
    }

    /// Clients with something open (the table never holds a client with nothing open).
    pub fn clients(&self) -> usize {
        self.counts().per_key.len()
    }
}

/// One open connection or socket, counted until dropped.
pub struct OpenGuard<K: Eq + std::hash::Hash + Clone = IpAddr> {
    counts: Arc<OpenCounts<K>>,
    key: Option<K>,
}

impl<K: Eq + std::hash::Hash + Clone> OpenGuard<K> {
    /// Charge a guard counted only in the total to `key` as well, once who holds it is known (a
    /// QUIC client whose handshake proved its address), unless `key` already holds `per_client`
    /// (0: no cap). A guard already charged stays as it is.
    pub fn charge(&mut self, key: K, per_client: usize) -> Result<(), Refused> {
        if self.key.is_some() {
            return Ok(());
        }
        let mut c = self.counts.counts();
        let n = c.per_key.entry(key.clone()).or_insert(0);
        if per_client > 0 && *n >= per_client {
            return Err(Refused::PerClient);
        }
        *n += 1;
        drop(c);
        self.key = Some(key);
        Ok(())
    }
}

impl<K: Eq + std::hash::Hash + Clone> Drop for OpenGuard<K> {
    fn drop(&mut self) {
        let mut c = self.counts.counts();
        c.total = c.total.saturating_sub(1);
        if let Some(key) = self.key.take() {
            if let Some(n) = c.per_key.get_mut(&key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    c.per_key.remove(&key);
                }
            }
        }
    }
}

/// Caps on the TCP connections of the HTTP listener.
#[derive(Clone)]
pub struct ConnectionLimits {
    pub counts: Arc<OpenCounts>,
    pub per_client: usize,
    pub total: usize,
    /// Whose connection it is ([`crate::AppState::connection_key`]), by the `[limits]` in force
    /// when it is accepted (a reload applies to the next one). Proxies carry many clients:
    /// exempt from the per-client cap.
    pub state: Arc<crate::AppState>,
}

/// An acceptor that counts each TCP connection against [`ConnectionLimits`] before the inner
/// acceptor (and any TLS handshake) runs, closing it at once when a cap is reached. The count
/// travels with the stream ([`Counted`]), through a WebSocket upgrade, until it closes.
#[derive(Clone)]
pub struct LimitAcceptor<A> {
    limits: ConnectionLimits,
    inner: A,
}

impl<A> LimitAcceptor<A> {
    pub fn new(limits: ConnectionLimits, inner: A) -> Self {
        Self { limits, inner }
    }
}

impl<A, S> Accept<TcpStream, S> for LimitAcceptor<A>
where
    A: Accept<TcpStream, S> + Clone + Send + 'static,
    A::Future: Send + 'static,
    A::Stream: Send + 'static,
    A::Service: Send + 'static,
    S: Send + 'static,
{
    type Stream = Counted<A::Stream>;
    type Service = A::Service;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Self::Stream, Self::Service)>> + Send>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let l = &self.limits;
        let guard = stream.peer_addr().map_err(Some).and_then(|peer| {
            let key = l.state.connection_key(peer.ip());
            l.counts.try_open(key, l.per_client, l.total).map_err(|refused| {
                metrics::counter!("relay_http_connections_refused_total", "reason" => refused.as_str()).increment(1);
                None
            })
        });
        let inner = self.inner.clone();
        Box::pin(async move {
            let guard = match guard {
                Ok(g) => g,
                // Dropping the stream closes it: the cheapest answer to a client over its cap.
                Err(Some(e)) => return Err(e),
                Err(None) => return Err(io::Error::other("connection cap reached")),
            };
            let (stream, service) = inner.accept(stream, service).await?;
            Ok((
                Counted {
                    inner: stream,
                    _guard: guard,
                },
                service,
            ))
        })
    }
}

/// A stream counted against the connection caps for as long as it lives.
pub struct Counted<S> {
    inner: S,
    _guard: OpenGuard,
}

impl<S: AsyncRead + Unpin> AsyncRead for Counted<S> {
    fn poll_read(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Counted<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Connections the kernel may hold completed but not yet accepted, per listener (capped by
/// `net.core.somaxconn`). The standard library's 128 overflows under a burst of connections (a
/// page load storm, or an attacker), and a client whose SYN is dropped retries only after 1 s.
pub const LISTEN_BACKLOG: i32 = 4096;

/// A non-blocking TCP listener on `addr` with [`LISTEN_BACKLOG`].
pub fn listen_tcp(addr: std::net::SocketAddr) -> io::Result<std::net::TcpListener> {
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(addr),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )?;
    // As the standard library does: a restarted relay can bind at once.
    socket.set_reuse_address(true)?;
    socket.bind(&addr.into())?;
    socket.listen(LISTEN_BACKLOG)?;
    socket.set_nonblocking(true)?;
    Ok(socket.into())
}

/// The connection cap that fits this process: `configured`, lowered so that at most three
/// quarters of the soft descriptor limit go to HTTP connections (the rest: tunnels, TURN,
/// policy modules, logs). The soft limit is first raised to the hard one, as Go and nginx do: a
/// container or shell often starts a process with a soft limit of 1,024 under a hard limit
/// many times larger. Returns the cap and the limit it fits (`None` when it cannot be read).
pub fn fit_to_descriptor_limit(configured: usize) -> (usize, Option<u64>) {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let limit = getrlimit(Resource::Nofile);
    if let (Some(soft), Some(hard)) = (limit.current, limit.maximum) {
        if soft < hard {
            let raised = Rlimit {
                current: Some(hard),
                maximum: Some(hard),
            };
            if let Err(e) = setrlimit(Resource::Nofile, raised) {
                tracing::debug!(error = %e, "could not raise the soft descriptor limit");
            }
        }
    }
    match getrlimit(Resource::Nofile).current {
        Some(soft) => {
            let fit = usize::try_from(soft / 4 * 3).unwrap_or(usize::MAX).max(1);
            (configured.min(fit), Some(soft))
        }
        None => (configured, None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::HeaderValue;

    fn ip(s: &str) -> IpAddr {
        s.parse().expect("ip")
    }

    #[test]
    fn ipv6_clients_are_counted_per_network_and_mapped_ipv4_as_ipv4() {
        assert_eq!(client_key(ip("2001:db8:1:2:aaaa::1"), 64), ip("2001:db8:1:2::"));
        assert_eq!(
            client_key(ip("2001:db8:1:2:aaaa::1"), 64),
            client_key(ip("2001:db8:1:2:bbbb::7"), 64)
        );
        assert_ne!(
            client_key(ip("2001:db8:1:3::1"), 64),
            client_key(ip("2001:db8:1:2::1"), 64)
        );
        assert_eq!(client_key(ip("2001:db8::1"), 128), ip("2001:db8::1"));
        assert_eq!(client_key(ip("::ffff:192.0.2.7"), 64), ip("192.0.2.7"));
        assert_eq!(client_key(ip("192.0.2.7"), 64), ip("192.0.2.7"));
    }

    #[test]
    fn forwarded_headers_count_only_from_trusted_proxies() {
        let trusted: Vec<IpNet> = vec!["198.51.100.0/24".parse().expect("net")];
        let mut h = HeaderMap::new();
        h.insert("x-forwarded-for", HeaderValue::from_static("192.0.2.66, 203.0.113.9"));
        // An untrusted peer's headers are the client's own words: ignored.
        assert_eq!(client_ip(ip("203.0.113.50"), &h, &trusted), ip("203.0.113.50"));
        // From the proxy: the right-most address the proxy appended (not the client's claim).
        assert_eq!(client_ip(ip("198.51.100.2"), &h, &trusted), ip("203.0.113.9"));
        // A chain of trusted proxies is skipped.
        h.insert("x-forwarded-for", HeaderValue::from_static("203.0.113.9, 198.51.100.3"));
        assert_eq!(client_ip(ip("198.51.100.2"), &h, &trusted), ip("203.0.113.9"));
        // RFC 7239 wins over X-Forwarded-For.
        h.insert(
            "forwarded",
            HeaderValue::from_static("for=\"[2001:db8::7]:4711\";proto=https"),
        );
        assert_eq!(client_ip(ip("198.51.100.2"), &h, &trusted), ip("2001:db8::7"));
        // A proxy that sent no header: the proxy itself.
        assert_eq!(
            client_ip(ip("198.51.100.2"), &HeaderMap::new(), &trusted),
            ip("198.51.100.2")
        );
    }

    #[test]
    fn the_connection_cap_fits_three_quarters_of_the_descriptor_limit() {
        let (fit, soft) = fit_to_descriptor_limit(usize::MAX);
        let soft = soft.expect("Linux: /proc/self/limits is readable");
        assert_eq!(fit as u64, soft / 4 * 3);
        assert_eq!(fit_to_descriptor_limit(10).0, 10, "a lower setting is kept");
    }

    #[test]
    fn open_counts_cap_each_client_and_the_total_and_give_back_on_drop() {
        let counts = Arc::new(OpenCounts::default());
        let a = Some(ip("192.0.2.1"));
        let g1 = counts.try_open(a, 2, 3).expect("first");
        let g2 = counts.try_open(a, 2, 3).expect("second");
        assert_eq!(counts.try_open(a, 2, 3).err(), Some(Refused::PerClient));
        let g3 = counts.try_open(Some(ip("192.0.2.2")), 2, 3).expect("another client");
        assert_eq!(counts.try_open(None, 2, 3).err(), Some(Refused::Total));
        drop(g1);
        let _g4 = counts.try_open(a, 2, 3).expect("given back");
        drop((g2, g3));
        assert_eq!(counts.total(), 1);
        assert_eq!(counts.clients(), 1);
    }
}
