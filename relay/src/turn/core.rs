//! The TURN control plane as a state machine with no I/O: bytes and the time go in, what to send
//! comes out ([`Output`]). [`super::server`] drives it with sockets and tasks; tests drive it
//! directly, with any clock, and see every answer without a socket.
//!
//! ```text
//!  client datagram / stream frame ─▶ Core::handle(now, unix, five, bytes) ──▶ [Output]
//!  peer datagram on a relayed port ─▶ Core::from_peer(now, port, peer, bytes) ─▶ ToClient / ToPeer / Opened / Closed
//!  the clock ──────────────────────▶ Core::handle_timeout(now) (expiries; Core::poll_timeout says when)
//! ```
//!
//! Relayed ports are the one thing it cannot decide alone: an Allocate asks the driver's [`Ports`]
//! to bind one, and an [`Output::Opened`] says which port became an allocation.
//!
//! Order of checks for a request (RFC 8656 §7–§11): authenticate (401/438, rate-limited per
//! source), then the allocation's existence and owner (437/441), then the request's own
//! attributes (400/442/440), then policy — caps (486/508) and the peer filter (403).

use super::auth::Credentials;
use crate::config::EmbeddedTurnConfig;
use crate::ice::TurnUser;
use avatar_proto::netfilter::{canonical, PeerFilter};
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use stun::agent::TransactionId;
use stun::attributes::*;
use stun::error_code::*;
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::TextAttribute;
use stun::xoraddr::XorMappedAddress;

const DEFAULT_LIFETIME: Duration = Duration::from_secs(600);
const PERMISSION_LIFETIME: Duration = Duration::from_secs(300);
const CHANNEL_LIFETIME: Duration = Duration::from_secs(600);
const CHANNEL_MIN: u16 = 0x4000;
/// RFC 5766 range (RFC 8656 narrowed it to 0x4FFF; coturn and its clients still use the old one).
const CHANNEL_MAX: u16 = 0x7FFE;
const PROTO_UDP: u8 = 17;
/// Largest datagram relayed.
pub const MAX_DATAGRAM: usize = 65_535;

/// How a client reached the server.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Transport {
    Udp,
    Tcp,
    Tls,
}

/// Client address, server address and transport: what identifies an allocation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FiveTuple {
    pub client: SocketAddr,
    pub server: SocketAddr,
    pub transport: Transport,
}

impl FiveTuple {
    /// Over TCP and TLS, ChannelData is padded to a multiple of four (RFC 8656 §12.5).
    fn is_stream(&self) -> bool {
        self.transport != Transport::Udp
    }
}

/// What the driver must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Output {
    /// Send `bytes` to the client of `five` (an answer, or what a peer sent, wrapped).
    ToClient { five: FiveTuple, bytes: Vec<u8> },
    /// Send `bytes` from the relayed port `port` to `peer`.
    ToPeer {
        port: u16,
        peer: SocketAddr,
        bytes: Vec<u8>,
    },
    /// The port [`Ports::bind`] took now belongs to the allocation of `five`: receive on it.
    Opened { five: FiveTuple, port: u16 },
    /// The allocation of `five` is gone: close its relayed port.
    Closed { five: FiveTuple, port: u16 },
}

/// The driver's relayed ports.
pub trait Ports {
    /// Bind a UDP socket on `port` of the relay address; `false` if it is taken.
    fn bind(&mut self, port: u16) -> bool;
}

/// Counters the tests read (`/metrics` has the same as `relay_turn_*`).
#[derive(Debug, Default)]
pub struct Stats {
    pub allocations: AtomicU64,
    pub peer_denied: AtomicU64,
    pub unauthorized_dropped: AtomicU64,
    pub bandwidth_dropped: AtomicU64,
}

/// The core's own clock for its rate limiters: the time of the last input, so that they run on
/// the time the driver passes in (a test's synthetic time included).
#[derive(Debug, Clone, Default)]
struct InputClock(Arc<AtomicU64>);

impl Clock for InputClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, InputClock, NoOpMiddleware<Duration>>;
type KeyedLimiter =
    RateLimiter<IpAddr, governor::state::keyed::HashMapStateStore<IpAddr>, InputClock, NoOpMiddleware<Duration>>;

fn within(limiter: &Limiter, bytes: usize) -> bool {
    match NonZeroU32::new(bytes.max(1) as u32) {
        Some(n) => matches!(limiter.check_n(n), Ok(Ok(()))),
        None => true,
    }
}

struct Channel {
    peer: SocketAddr,
    expires: Instant,
}

/// One allocation: a relayed port on behalf of one client.
struct Allocation {
    username: String,
    /// The quotas this allocation counts against, given back when it goes.
    quotas: Vec<QuotaKey>,
    key: Vec<u8>,
    port: u16,
    created: Instant,
    expires: Instant,
    permissions: HashMap<IpAddr, Instant>,
    channels: HashMap<u16, Channel>,
    channel_of: HashMap<SocketAddr, u16>,
    to_peers: Limiter,
    to_client: Limiter,
}

impl Allocation {
    fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        self.permissions.get(&canonical(ip)).is_some_and(|t| *t > now)
    }
}

/// What an allocation counts against. A browser's allocations count against its user (so fresh
/// credentials give no fresh quota) and its source address (so fresh session ids give none
/// either); a worker's against the worker, whose identity only the relay can mint.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
enum QuotaKey {
    User(String),
    Source(IpAddr),
    Worker(String),
}

fn per_minute(n: u32) -> Quota {
    let n = NonZeroU32::new(n).unwrap_or(NonZeroU32::MIN);
    Quota::per_minute(n).allow_burst(n)
}

fn bytes_per_second(kbps: u32) -> Quota {
    let bytes = NonZeroU32::new((kbps.max(1) as u64 * 1000 / 8).min(u32::MAX as u64) as u32).unwrap_or(NonZeroU32::MIN);
    // A burst of one second, and never less than one maximal datagram.
    let burst = NonZeroU32::new(bytes.get().max(MAX_DATAGRAM as u32)).unwrap_or(bytes);
    Quota::per_second(bytes).allow_burst(burst)
}

/// A reply about to be sent.
struct Reply {
    class: MessageClass,
    attrs: Vec<Box<dyn Setter>>,
    key: Option<Vec<u8>>,
}

impl Reply {
    fn ok(attrs: Vec<Box<dyn Setter>>, key: &[u8]) -> Self {
        Self {
            class: CLASS_SUCCESS_RESPONSE,
            attrs,
            key: Some(key.to_vec()),
        }
    }

    fn error(code: ErrorCode, reason: &str, key: Option<&[u8]>) -> Self {
        Self {
            class: CLASS_ERROR_RESPONSE,
            attrs: vec![Box::new(ErrorCodeAttribute {
                code,
                reason: reason.as_bytes().to_vec(),
            })],
            key: key.map(<[u8]>::to_vec),
        }
    }
}

/// The embedded TURN server's state.
pub struct Core {
    cfg: EmbeddedTurnConfig,
    creds: Credentials,
    filter: PeerFilter,
    announced: IpAddr,
    allocations: HashMap<FiveTuple, Allocation>,
    /// Allocations by relayed port: two clients of this server relaying to each other.
    by_port: HashMap<u16, FiveTuple>,
    /// Allocations held per quota key.
    held: HashMap<QuotaKey, usize>,
    /// Failed authentications (wrong password, expired or foreign credentials) per source.
    failures: KeyedLimiter,
    /// Challenges (the first 401 of every allocation) per source: ten times the failure budget.
    challenges: KeyedLimiter,
    clock: InputClock,
    epoch: Instant,
    next_port: u32,
    stats: Arc<Stats>,
}

impl Core {
    /// `own`: this machine's addresses (refused as peers); `start`: the first relayed port to try
    /// (random in the driver, fixed in tests); `now`: the time of creation.
    pub fn new(cfg: EmbeddedTurnConfig, secret: &str, own: &[IpAddr], start: u32, now: Instant) -> Self {
        let announced = cfg.announced_ip().unwrap_or(cfg.relay_ip);
        let mut own = own.to_vec();
        own.extend([announced, cfg.relay_ip]);
        let clock = InputClock::default();
        Self {
            creds: Credentials::new(secret, &cfg.realm),
            filter: PeerFilter::new(&cfg.deny_peers, &cfg.allow_peers, &own),
            announced,
            allocations: HashMap::new(),
            by_port: HashMap::new(),
            held: HashMap::new(),
            failures: RateLimiter::new(
                per_minute(cfg.unauthorized_per_minute),
                Default::default(),
                clock.clone(),
            ),
            challenges: RateLimiter::new(
                per_minute(cfg.unauthorized_per_minute.saturating_mul(10)),
                Default::default(),
                clock.clone(),
            ),
            clock,
            epoch: now,
            next_port: start,
            stats: Arc::new(Stats::default()),
            cfg,
        }
    }

    pub fn stats(&self) -> Arc<Stats> {
        Arc::clone(&self.stats)
    }

    pub fn config(&self) -> &EmbeddedTurnConfig {
        &self.cfg
    }

    /// Whether `five` holds an allocation.
    pub fn has_allocation(&self, five: &FiveTuple) -> bool {
        self.allocations.contains_key(five)
    }

    /// Allocations held now.
    pub fn allocation_count(&self) -> usize {
        self.allocations.len()
    }

    /// Move the rate limiters' clock to `now` (never backwards).
    fn tick(&self, now: Instant) {
        let nanos = now
            .saturating_duration_since(self.epoch)
            .as_nanos()
            .min(u64::MAX as u128) as u64;
        self.clock.0.fetch_max(nanos, Ordering::Relaxed);
    }

    /// When [`Core::handle_timeout`] next has something to do: the earliest expiry of an
    /// allocation, a permission or a channel.
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.allocations
            .values()
            .flat_map(|a| {
                std::iter::once(a.expires)
                    .chain(a.permissions.values().copied())
                    .chain(a.channels.values().map(|c| c.expires))
            })
            .min()
    }

    /// Expire what is due at `now`: permissions, channels, whole allocations. Also forgets idle
    /// entries of the per-source limiters.
    pub fn handle_timeout(&mut self, now: Instant) -> Vec<Output> {
        self.tick(now);
        self.failures.retain_recent();
        self.challenges.retain_recent();
        let mut expired = Vec::new();
        for (five, a) in &mut self.allocations {
            a.permissions.retain(|_, t| *t > now);
            let gone: Vec<u16> = a
                .channels
                .iter()
                .filter(|(_, c)| c.expires <= now)
                .map(|(n, _)| *n)
                .collect();
            for n in gone {
                if let Some(c) = a.channels.remove(&n) {
                    a.channel_of.remove(&c.peer);
                }
            }
            if a.expires <= now {
                expired.push(*five);
            }
        }
        expired.iter().filter_map(|five| self.remove(five)).collect()
    }

    /// Delete the allocation of `five`, if any (its client went away).
    pub fn remove(&mut self, five: &FiveTuple) -> Option<Output> {
        let a = self.allocations.remove(five)?;
        self.by_port.remove(&a.port);
        for key in &a.quotas {
            if let Some(n) = self.held.get_mut(key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.held.remove(key);
                }
            }
        }
        self.stats.allocations.fetch_sub(1, Ordering::Relaxed);
        metrics::gauge!("relay_turn_allocations").decrement(1.0);
        tracing::debug!(client = %five.client, user = %a.username, "TURN allocation deleted");
        Some(Output::Closed {
            five: *five,
            port: a.port,
        })
    }

    /// One STUN message or ChannelData frame from a client. `unix`: the wall clock in seconds
    /// (credentials and nonces carry it).
    pub fn handle(
        &mut self,
        now: Instant,
        unix: u64,
        five: FiveTuple,
        data: &[u8],
        ports: &mut dyn Ports,
    ) -> Vec<Output> {
        self.tick(now);
        let mut out = Vec::new();
        if data.len() >= 4 && data[0] >> 6 == 1 {
            self.channel_data(now, &five, data, &mut out);
            return out;
        }
        let mut m = Message::new();
        m.raw = data.to_vec();
        if m.decode().is_err() {
            metrics::counter!("relay_turn_malformed_total").increment(1);
            return out;
        }
        let class = m.typ.class;
        let method = m.typ.method;
        if class == CLASS_INDICATION && method == METHOD_SEND {
            self.send_indication(now, &five, &m, &mut out);
            return out;
        }
        if class != CLASS_REQUEST {
            return out;
        }
        let reply = match method {
            METHOD_BINDING => Some(Reply {
                class: CLASS_SUCCESS_RESPONSE,
                attrs: vec![Box::new(XorMappedAddress {
                    ip: five.client.ip(),
                    port: five.client.port(),
                })],
                key: None,
            }),
            METHOD_ALLOCATE | METHOD_REFRESH | METHOD_CREATE_PERMISSION | METHOD_CHANNEL_BIND => {
                self.authenticated(now, unix, &five, &m, ports, &mut out)
            }
            _ => Some(Reply::error(CODE_BAD_REQUEST, "Unsupported method", None)),
        };
        if let Some(reply) = reply {
            if let Some(bytes) = build_reply(&m, reply) {
                out.push(Output::ToClient { five, bytes });
            }
        }
        out
    }

    /// 401 with a fresh nonce, unless this source has used up its budget.
    fn unauthorized(&self, unix: u64, five: &FiveTuple, challenge: bool) -> Option<Reply> {
        let ip = five.client.ip();
        let limiter = if challenge { &self.challenges } else { &self.failures };
        if limiter.check_key(&ip).is_err() {
            self.stats.unauthorized_dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("relay_turn_unauthorized_dropped_total").increment(1);
            return None;
        }
        if !challenge {
            metrics::counter!("relay_turn_auth_failures_total").increment(1);
        }
        Some(self.with_nonce(CODE_UNAUTHORIZED, "Unauthorized", unix, five))
    }

    fn with_nonce(&self, code: ErrorCode, reason: &str, unix: u64, five: &FiveTuple) -> Reply {
        let mut r = Reply::error(code, reason, None);
        r.attrs.push(Box::new(TextAttribute::new(
            ATTR_NONCE,
            self.creds.nonce(five.client.ip(), unix),
        )));
        r.attrs
            .push(Box::new(TextAttribute::new(ATTR_REALM, self.creds.realm().to_owned())));
        r
    }

    /// Authenticate `m`, then dispatch it; `None` means send nothing.
    fn authenticated(
        &mut self,
        now: Instant,
        unix: u64,
        five: &FiveTuple,
        m: &Message,
        ports: &mut dyn Ports,
        out: &mut Vec<Output>,
    ) -> Option<Reply> {
        if !m.contains(ATTR_MESSAGE_INTEGRITY) {
            return self.unauthorized(unix, five, true);
        }
        let text = |attr| TextAttribute::get_from_as(m, attr).map(|t| t.text);
        let (Ok(nonce), Ok(username), Ok(realm)) = (text(ATTR_NONCE), text(ATTR_USERNAME), text(ATTR_REALM)) else {
            return Some(Reply::error(
                CODE_BAD_REQUEST,
                "USERNAME, REALM and NONCE are required",
                None,
            ));
        };
        if !self.creds.nonce_ok(&nonce, five.client.ip(), unix) {
            // Counted with the challenges: both are answers anyone can ask for.
            if self.challenges.check_key(&five.client.ip()).is_err() {
                self.stats.unauthorized_dropped.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            return Some(self.with_nonce(CODE_STALE_NONCE, "Stale Nonce", unix, five));
        }
        let existing = self.allocations.get(five).map(|a| (a.username.clone(), a.key.clone()));
        let key = match &existing {
            Some((owner, key)) if m.typ.method != METHOD_ALLOCATE || *owner == username => {
                if *owner != username {
                    return Some(Reply::error(CODE_WRONG_CREDENTIALS, "Wrong Credentials", None));
                }
                // An existing allocation keeps the key it was made with (see auth.rs).
                Some(key.clone())
            }
            _ => self.creds.key_for_new(&username, &realm, unix),
        };
        let Some(key) = key else {
            return self.unauthorized(unix, five, false);
        };
        if MessageIntegrity(key.clone()).check(&mut m.clone()).is_err() {
            return self.unauthorized(unix, five, false);
        }
        if m.typ.method == METHOD_ALLOCATE {
            return Some(self.allocate(now, five, m, username, key, existing.is_some(), ports, out));
        }
        if existing.is_none() {
            return Some(Reply::error(CODE_ALLOC_MISMATCH, "Allocation Mismatch", Some(&key)));
        }
        Some(match m.typ.method {
            METHOD_REFRESH => self.refresh(now, five, m, &key, out),
            METHOD_CREATE_PERMISSION => self.create_permission(now, five, m, &key),
            _ => self.channel_bind(now, five, m, &key),
        })
    }

    fn requested_lifetime(&self, m: &Message) -> Duration {
        let cap = Duration::from_secs(self.cfg.max_lifetime_s);
        match m.get(ATTR_LIFETIME) {
            Ok(v) if v.len() == 4 => Duration::from_secs(u32::from_be_bytes([v[0], v[1], v[2], v[3]]) as u64).min(cap),
            _ => DEFAULT_LIFETIME.min(cap),
        }
    }

    fn lifetime_attr(d: Duration) -> Box<dyn Setter> {
        Box::new(RawAttr(ATTR_LIFETIME, (d.as_secs() as u32).to_be_bytes().to_vec()))
    }

    /// The quotas a new allocation by `username` from `client` counts against, with their caps.
    fn quotas(&self, username: &str, client: IpAddr) -> Vec<(QuotaKey, usize)> {
        match TurnUser::of(username) {
            TurnUser::Worker(id) => vec![(QuotaKey::Worker(id.to_owned()), self.cfg.max_allocations_per_worker)],
            TurnUser::Browser(user) => vec![
                (QuotaKey::User(user.to_owned()), self.cfg.max_allocations_per_user),
                (
                    QuotaKey::Source(crate::limits::client_key(client, 64)),
                    self.cfg.max_allocations_per_ip,
                ),
            ],
        }
    }

    /// The refusal for a new allocation over one of its quotas (486) or the server's cap (508).
    fn over_quota(&self, quotas: &[(QuotaKey, usize)], k: Option<&[u8]>) -> Option<Reply> {
        let held = |key: &QuotaKey| self.held.get(key).copied().unwrap_or(0);
        if let Some((key, cap)) = quotas.iter().find(|(key, cap)| held(key) >= *cap) {
            metrics::counter!("relay_turn_quota_refusals_total", "quota" => match key {
                QuotaKey::User(_) => "user",
                QuotaKey::Source(_) => "ip",
                QuotaKey::Worker(_) => "worker",
            })
            .increment(1);
            tracing::debug!(?key, cap, "TURN allocation over quota");
            return Some(Reply::error(CODE_ALLOC_QUOTA_REACHED, "Allocation Quota Reached", k));
        }
        (self.allocations.len() >= self.cfg.max_allocations)
            .then(|| Reply::error(CODE_INSUFFICIENT_CAPACITY, "Insufficient Capacity", k))
    }

    #[allow(clippy::too_many_arguments)]
    fn allocate(
        &mut self,
        now: Instant,
        five: &FiveTuple,
        m: &Message,
        username: String,
        key: Vec<u8>,
        exists: bool,
        ports: &mut dyn Ports,
        out: &mut Vec<Output>,
    ) -> Reply {
        let k = Some(key.as_slice());
        if exists {
            return Reply::error(CODE_ALLOC_MISMATCH, "Allocation Mismatch", k);
        }
        match m.get(ATTR_REQUESTED_TRANSPORT) {
            Ok(v) if v.len() == 4 && v[0] == PROTO_UDP => {}
            Ok(v) if v.len() == 4 => {
                return Reply::error(CODE_UNSUPPORTED_TRANS_PROTO, "Unsupported Transport Protocol", k)
            }
            _ => return Reply::error(CODE_BAD_REQUEST, "REQUESTED-TRANSPORT is required", k),
        }
        if let Ok(v) = m.get(ATTR_REQUESTED_ADDRESS_FAMILY) {
            if v.first() != Some(&0x01) {
                return Reply::error(CODE_ADDR_FAMILY_NOT_SUPPORTED, "Address Family not Supported", k);
            }
        }
        if m.contains(ATTR_RESERVATION_TOKEN) {
            return Reply::error(CODE_INSUFFICIENT_CAPACITY, "Reservations are not supported", k);
        }
        let quotas = self.quotas(&username, five.client.ip());
        if let Some(refused) = self.over_quota(&quotas, k) {
            return refused;
        }
        let Some(port) = self.bind_relay(ports) else {
            return Reply::error(CODE_INSUFFICIENT_CAPACITY, "No relay port free", k);
        };
        let lifetime = self.requested_lifetime(m);
        for (key, _) in &quotas {
            *self.held.entry(key.clone()).or_insert(0) += 1;
        }
        self.allocations.insert(
            *five,
            Allocation {
                username: username.clone(),
                quotas: quotas.into_iter().map(|(key, _)| key).collect(),
                key: key.clone(),
                port,
                created: now,
                expires: now + lifetime,
                permissions: HashMap::new(),
                channels: HashMap::new(),
                channel_of: HashMap::new(),
                to_peers: RateLimiter::direct_with_clock(bytes_per_second(self.cfg.bandwidth_kbps), self.clock.clone()),
                to_client: RateLimiter::direct_with_clock(
                    bytes_per_second(self.cfg.bandwidth_kbps),
                    self.clock.clone(),
                ),
            },
        );
        self.by_port.insert(port, *five);
        self.stats.allocations.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("relay_turn_allocations").increment(1.0);
        metrics::counter!("relay_turn_allocations_total").increment(1);
        tracing::debug!(client = %five.client, transport = ?five.transport, user = %username, port, "TURN allocation");
        out.push(Output::Opened { five: *five, port });
        Reply::ok(
            vec![
                Box::new(XorAddr(ATTR_XOR_RELAYED_ADDRESS, SocketAddr::new(self.announced, port))),
                Self::lifetime_attr(lifetime),
                Box::new(XorMappedAddress {
                    ip: five.client.ip(),
                    port: five.client.port(),
                }),
            ],
            &key,
        )
    }

    /// A free port of the relay range (a bounded number of tries).
    fn bind_relay(&mut self, ports: &mut dyn Ports) -> Option<u16> {
        let (min, max) = (self.cfg.relay_port_min, self.cfg.relay_port_max);
        let span = u32::from(max - min) + 1;
        for _ in 0..span.min(256) {
            let port = min + (self.next_port % span) as u16;
            self.next_port = self.next_port.wrapping_add(1);
            if !self.by_port.contains_key(&port) && ports.bind(port) {
                return Some(port);
            }
        }
        tracing::warn!(min, max, "TURN: no free relay port");
        None
    }

    fn refresh(&mut self, now: Instant, five: &FiveTuple, m: &Message, key: &[u8], out: &mut Vec<Output>) -> Reply {
        let lifetime = self.requested_lifetime(m);
        if lifetime.is_zero() {
            out.extend(self.remove(five));
            return Reply::ok(vec![Self::lifetime_attr(Duration::ZERO)], key);
        }
        let max_age = Duration::from_secs(self.cfg.max_allocation_age_s);
        let Some(a) = self.allocations.get_mut(five) else {
            return Reply::error(CODE_ALLOC_MISMATCH, "Allocation Mismatch", Some(key));
        };
        let expires = (now + lifetime).min(a.created + max_age);
        a.expires = expires;
        Reply::ok(vec![Self::lifetime_attr(expires.saturating_duration_since(now))], key)
    }

    /// The peers of `m`'s XOR-PEER-ADDRESS attributes, canonical and checked; or the error reply.
    fn peers(&self, five: &FiveTuple, m: &Message, key: &[u8]) -> Result<Vec<SocketAddr>, Reply> {
        let mut peers = Vec::new();
        for raw in m.attributes.0.iter().filter(|r| r.typ == ATTR_XOR_PEER_ADDRESS) {
            let mut one = Message::new();
            one.transaction_id = m.transaction_id;
            one.add(ATTR_XOR_PEER_ADDRESS, &raw.value);
            let mut addr = XorMappedAddress::default();
            if addr.get_from_as(&one, ATTR_XOR_PEER_ADDRESS).is_err() {
                return Err(Reply::error(CODE_BAD_REQUEST, "Malformed XOR-PEER-ADDRESS", Some(key)));
            }
            let ip = canonical(addr.ip);
            if !self.filter.allows(ip) && self.relayed_allocation(SocketAddr::new(ip, addr.port)).is_none() {
                self.stats.peer_denied.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("relay_turn_peer_denied_total").increment(1);
                tracing::info!(client = %five.client, peer = %ip, "TURN peer refused (special-purpose or own address)");
                return Err(Reply::error(CODE_FORBIDDEN, "Forbidden IP", Some(key)));
            }
            if !ip.is_ipv4() {
                return Err(Reply::error(
                    CODE_PEER_ADDR_FAMILY_MISMATCH,
                    "Peer Address Family Mismatch",
                    Some(key),
                ));
            }
            peers.push(SocketAddr::new(ip, addr.port));
        }
        if peers.is_empty() {
            return Err(Reply::error(
                CODE_BAD_REQUEST,
                "XOR-PEER-ADDRESS is required",
                Some(key),
            ));
        }
        Ok(peers)
    }

    /// The allocation whose relayed address is `peer`, if any: the server's own address is
    /// otherwise refused, but relaying between two of its own allocations (both sides behind
    /// symmetric NATs) must work, and is delivered inside the core.
    fn relayed_allocation(&self, peer: SocketAddr) -> Option<FiveTuple> {
        let own = peer.ip() == self.announced || peer.ip() == self.cfg.relay_ip;
        if !own {
            return None;
        }
        self.by_port.get(&peer.port()).copied()
    }

    fn create_permission(&mut self, now: Instant, five: &FiveTuple, m: &Message, key: &[u8]) -> Reply {
        let peers = match self.peers(five, m, key) {
            Ok(p) => p,
            Err(reply) => return reply,
        };
        if let Some(a) = self.allocations.get_mut(five) {
            for p in peers {
                a.permissions.insert(p.ip(), now + PERMISSION_LIFETIME);
            }
        }
        Reply::ok(Vec::new(), key)
    }

    fn channel_bind(&mut self, now: Instant, five: &FiveTuple, m: &Message, key: &[u8]) -> Reply {
        let number = match m.get(ATTR_CHANNEL_NUMBER) {
            Ok(v) if v.len() == 4 => u16::from_be_bytes([v[0], v[1]]),
            _ => return Reply::error(CODE_BAD_REQUEST, "CHANNEL-NUMBER is required", Some(key)),
        };
        if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&number) {
            return Reply::error(CODE_BAD_REQUEST, "Channel number out of range", Some(key));
        }
        let peer = match self.peers(five, m, key) {
            Ok(p) if p.len() == 1 => p[0],
            Ok(_) => return Reply::error(CODE_BAD_REQUEST, "One XOR-PEER-ADDRESS", Some(key)),
            Err(reply) => return reply,
        };
        let Some(a) = self.allocations.get_mut(five) else {
            return Reply::error(CODE_ALLOC_MISMATCH, "Allocation Mismatch", Some(key));
        };
        let clash = a.channels.get(&number).is_some_and(|c| c.peer != peer)
            || a.channel_of.get(&peer).is_some_and(|n| *n != number);
        if clash {
            return Reply::error(CODE_BAD_REQUEST, "Channel already bound differently", Some(key));
        }
        a.channels.insert(
            number,
            Channel {
                peer,
                expires: now + CHANNEL_LIFETIME,
            },
        );
        a.channel_of.insert(peer, number);
        a.permissions.insert(peer.ip(), now + PERMISSION_LIFETIME);
        Reply::ok(Vec::new(), key)
    }

    fn send_indication(&mut self, now: Instant, five: &FiveTuple, m: &Message, out: &mut Vec<Output>) {
        if !self.allocations.contains_key(five) {
            return;
        }
        let mut peer = XorMappedAddress::default();
        if peer.get_from_as(m, ATTR_XOR_PEER_ADDRESS).is_err() {
            return;
        }
        let Ok(data) = m.get(ATTR_DATA) else { return };
        self.relay_to_peer(now, five, SocketAddr::new(canonical(peer.ip), peer.port), &data, out);
    }

    fn channel_data(&mut self, now: Instant, five: &FiveTuple, frame: &[u8], out: &mut Vec<Output>) {
        let Some(a) = self.allocations.get(five) else { return };
        let number = u16::from_be_bytes([frame[0], frame[1]]);
        let len = u16::from_be_bytes([frame[2], frame[3]]) as usize;
        let Some(payload) = frame.get(4..4 + len) else { return };
        let peer = match a.channels.get(&number) {
            Some(c) if c.expires > now => c.peer,
            _ => return,
        };
        self.relay_to_peer(now, five, peer, payload, out);
    }

    fn relay_to_peer(
        &mut self,
        now: Instant,
        five: &FiveTuple,
        peer: SocketAddr,
        payload: &[u8],
        out: &mut Vec<Output>,
    ) {
        let Some(a) = self.allocations.get(five) else { return };
        if !a.permitted(peer.ip(), now) {
            return;
        }
        let relayed = self.relayed_allocation(peer);
        // Permissions are per IP (RFC 8656 §9): one granted for this server's own address (for a
        // relayed port) must not let a Send indication reach its other ports.
        if relayed.is_none() && !self.filter.allows(peer.ip()) {
            self.stats.peer_denied.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !within(&a.to_peers, payload.len()) {
            self.stats.bandwidth_dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("relay_turn_bandwidth_dropped_total").increment(1);
            return;
        }
        let from = SocketAddr::new(self.announced, a.port);
        let port = a.port;
        if let Some(other) = relayed {
            // Hand it to the other allocation directly: a VPS behind 1:1 NAT cannot send to its
            // own public address, and this skips a trip through the kernel besides.
            out.extend(self.relay_to_client(now, &other, from, payload));
            return;
        }
        out.push(Output::ToPeer {
            port,
            peer,
            bytes: payload.to_vec(),
        });
    }

    /// What a peer sent to relayed port `port`, on its way to the allocation's client.
    pub fn from_peer(&mut self, now: Instant, port: u16, peer: SocketAddr, payload: &[u8]) -> Option<Output> {
        self.tick(now);
        let five = *self.by_port.get(&port)?;
        self.relay_to_client(now, &five, peer, payload)
    }

    fn relay_to_client(&self, now: Instant, five: &FiveTuple, peer: SocketAddr, payload: &[u8]) -> Option<Output> {
        let a = self.allocations.get(five)?;
        let peer = SocketAddr::new(canonical(peer.ip()), peer.port());
        if a.permissions.get(&peer.ip()).is_none_or(|t| *t <= now) {
            return None;
        }
        let channel = a
            .channel_of
            .get(&peer)
            .copied()
            .filter(|n| a.channels.get(n).is_some_and(|c| c.expires > now));
        if !within(&a.to_client, payload.len()) {
            self.stats.bandwidth_dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("relay_turn_bandwidth_dropped_total").increment(1);
            return None;
        }
        let bytes = match channel {
            Some(number) => {
                let mut f = Vec::with_capacity(payload.len() + 8);
                f.extend_from_slice(&number.to_be_bytes());
                f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
                f.extend_from_slice(payload);
                if five.is_stream() {
                    f.resize(f.len().next_multiple_of(4), 0);
                }
                f
            }
            None => {
                let mut m = Message::new();
                m.build(&[
                    Box::new(TransactionId::new()),
                    Box::new(MessageType::new(METHOD_DATA, CLASS_INDICATION)),
                    Box::new(XorAddr(ATTR_XOR_PEER_ADDRESS, peer)),
                    Box::new(RawAttr(ATTR_DATA, payload.to_vec())),
                ])
                .ok()?;
                m.raw
            }
        };
        Some(Output::ToClient { five: *five, bytes })
    }
}

/// The answer to `req`, signed with the reply's key and fingerprinted.
fn build_reply(req: &Message, reply: Reply) -> Option<Vec<u8>> {
    let mut setters: Vec<Box<dyn Setter>> = vec![
        Box::new(req.transaction_id),
        Box::new(MessageType::new(req.typ.method, reply.class)),
    ];
    setters.extend(reply.attrs);
    if let Some(key) = reply.key {
        setters.push(Box::new(MessageIntegrity(key)));
    }
    setters.push(Box::new(FINGERPRINT));
    let mut out = Message::new();
    out.build(&setters).ok()?;
    Some(out.raw)
}

/// An attribute given as raw bytes.
struct RawAttr(AttrType, Vec<u8>);

impl Setter for RawAttr {
    fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
        m.add(self.0, &self.1);
        Ok(())
    }
}

/// An address attribute XOR-encoded like XOR-MAPPED-ADDRESS (XOR-RELAYED-ADDRESS, XOR-PEER-ADDRESS).
struct XorAddr(AttrType, SocketAddr);

impl Setter for XorAddr {
    fn add_to(&self, m: &mut Message) -> Result<(), stun::Error> {
        XorMappedAddress {
            ip: self.1.ip(),
            port: self.1.port(),
        }
        .add_to_as(m, self.0)
    }
}
