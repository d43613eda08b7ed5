//! The TURN state machine: allocations, permissions, channels, and the answers to each request.
//!
//! Transport-agnostic: a listener hands every datagram or framed stream message to
//! [`Server::handle`] with its [`FiveTuple`] and a [`ClientTx`] to answer on; nothing here
//! awaits, so one UDP receive loop serves many clients without queueing behind slow ones. Each
//! allocation owns a relayed UDP socket and one task that forwards what peers send back to the
//! client, and expires the allocation.
//!
//! Order of checks for a request (RFC 8656 §7–§11): authenticate (401/438, rate-limited per
//! source), then the allocation's existence and owner (437/441), then the request's own
//! attributes (400/442/440), then policy — caps (486/508) and the peer filter (403).

use super::auth::Credentials;
use crate::config::EmbeddedTurnConfig;
use crate::ice::TurnUser;
use avatar_proto::netfilter::{canonical, PeerFilter};
use bytes::Bytes;
use governor::{DefaultDirectRateLimiter, DefaultKeyedRateLimiter, Quota, RateLimiter};
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};
use stun::agent::TransactionId;
use stun::attributes::*;
use stun::error_code::*;
use stun::fingerprint::FINGERPRINT;
use stun::integrity::MessageIntegrity;
use stun::message::*;
use stun::textattrs::TextAttribute;
use stun::xoraddr::XorMappedAddress;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

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

/// Where answers and relayed data for a client go.
#[derive(Debug, Clone)]
pub enum ClientTx {
    /// The listening UDP socket the client's datagram arrived on.
    Udp(Arc<UdpSocket>),
    /// A TCP or TLS connection's writer task (bounded; full means congestion, and data is dropped).
    Stream(mpsc::Sender<Bytes>),
}

impl ClientTx {
    fn send(&self, to: SocketAddr, frame: Vec<u8>) {
        // A full socket buffer or queue drops the frame, as the network would.
        match self {
            ClientTx::Udp(socket) => {
                let _ = socket.try_send_to(&frame, to);
            }
            ClientTx::Stream(tx) => {
                let _ = tx.try_send(Bytes::from(frame));
            }
        }
    }

    fn is_stream(&self) -> bool {
        matches!(self, ClientTx::Stream(_))
    }
}

/// Counters the tests read (`/metrics` has the same as `relay_turn_*`).
#[derive(Debug, Default)]
pub struct Stats {
    pub allocations: AtomicU64,
    pub peer_denied: AtomicU64,
    pub unauthorized_dropped: AtomicU64,
    pub bandwidth_dropped: AtomicU64,
}

struct Channel {
    peer: SocketAddr,
    expires: Instant,
}

struct AllocState {
    expires: Instant,
    permissions: HashMap<IpAddr, Instant>,
    channels: HashMap<u16, Channel>,
    channel_of: HashMap<SocketAddr, u16>,
}

/// One allocation: a relayed UDP socket on behalf of one client.
pub struct Allocation {
    five: FiveTuple,
    username: String,
    /// The quotas this allocation counts against, given back when it goes.
    quotas: Vec<QuotaKey>,
    key: Vec<u8>,
    relay: Arc<UdpSocket>,
    /// The relayed transport address as announced to the client.
    relayed: SocketAddr,
    created: Instant,
    client: ClientTx,
    state: Mutex<AllocState>,
    to_peers: DefaultDirectRateLimiter,
    to_client: DefaultDirectRateLimiter,
    cancel: CancellationToken,
}

impl Allocation {
    fn state(&self) -> MutexGuard<'_, AllocState> {
        // A panic while holding this lock would be a bug in this module; the state stays usable.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn permitted(&self, ip: IpAddr, now: Instant) -> bool {
        self.state().permissions.get(&canonical(ip)).is_some_and(|t| *t > now)
    }

    fn within(limiter: &DefaultDirectRateLimiter, bytes: usize) -> bool {
        match NonZeroU32::new(bytes.max(1) as u32) {
            Some(n) => matches!(limiter.check_n(n), Ok(Ok(()))),
            None => true,
        }
    }
}

struct Table {
    by_five: HashMap<FiveTuple, Arc<Allocation>>,
    /// Allocations by relayed port: two clients of this server relaying to each other.
    by_port: HashMap<u16, Arc<Allocation>>,
    /// Allocations held per quota key.
    held: HashMap<QuotaKey, usize>,
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

impl Table {
    fn held(&self, key: &QuotaKey) -> usize {
        self.held.get(key).copied().unwrap_or(0)
    }

    fn give_back(&mut self, keys: &[QuotaKey]) {
        for key in keys {
            if let Some(n) = self.held.get_mut(key) {
                *n = n.saturating_sub(1);
                if *n == 0 {
                    self.held.remove(key);
                }
            }
        }
    }
}

/// The embedded TURN server's shared state.
pub struct Server {
    cfg: EmbeddedTurnConfig,
    creds: Credentials,
    filter: PeerFilter,
    announced: IpAddr,
    table: Mutex<Table>,
    /// Failed authentications (wrong password, expired or foreign credentials) per source.
    failures: DefaultKeyedRateLimiter<IpAddr>,
    /// Challenges (the first 401 of every allocation) per source: ten times the failure budget.
    challenges: DefaultKeyedRateLimiter<IpAddr>,
    next_port: AtomicU32,
    shutdown: CancellationToken,
    pub stats: Stats,
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

impl Server {
    pub fn new(cfg: EmbeddedTurnConfig, secret: &str, own: &[IpAddr], shutdown: CancellationToken) -> Self {
        let announced = cfg.announced_ip().unwrap_or(cfg.relay_ip);
        let mut own = own.to_vec();
        own.extend([announced, cfg.relay_ip]);
        let span = u32::from(cfg.relay_port_max - cfg.relay_port_min) + 1;
        Self {
            creds: Credentials::new(secret, &cfg.realm),
            filter: PeerFilter::new(&cfg.deny_peers, &cfg.allow_peers, &own),
            announced,
            table: Mutex::new(Table {
                by_five: HashMap::new(),
                by_port: HashMap::new(),
                held: HashMap::new(),
            }),
            failures: RateLimiter::keyed(per_minute(cfg.unauthorized_per_minute)),
            challenges: RateLimiter::keyed(per_minute(cfg.unauthorized_per_minute.saturating_mul(10))),
            next_port: AtomicU32::new(rand::random::<u32>() % span),
            shutdown,
            stats: Stats::default(),
            cfg,
        }
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Forget idle entries of the per-source limiters (called periodically).
    pub fn sweep(&self) {
        self.failures.retain_recent();
        self.challenges.retain_recent();
    }

    fn allocation(&self, five: &FiveTuple) -> Option<Arc<Allocation>> {
        self.table().by_five.get(five).cloned()
    }

    /// Whether `five` holds an allocation.
    pub fn has_allocation(&self, five: &FiveTuple) -> bool {
        self.table().by_five.contains_key(five)
    }

    pub fn config(&self) -> &EmbeddedTurnConfig {
        &self.cfg
    }

    /// Delete the allocation of `five`, if any.
    pub fn remove(&self, five: &FiveTuple) {
        let removed = {
            let mut t = self.table();
            let a = t.by_five.remove(five);
            if let Some(a) = &a {
                t.by_port.remove(&a.relayed.port());
                t.give_back(&a.quotas);
            }
            a
        };
        if let Some(a) = removed {
            a.cancel.cancel();
            self.stats.allocations.fetch_sub(1, Ordering::Relaxed);
            metrics::gauge!("relay_turn_allocations").decrement(1.0);
            tracing::debug!(client = %five.client, user = %a.username, "TURN allocation deleted");
        }
    }

    /// Handle one STUN message or ChannelData frame from a client.
    pub fn handle(self: &Arc<Self>, five: FiveTuple, tx: &ClientTx, data: &[u8]) {
        if data.len() >= 4 && data[0] >> 6 == 1 {
            self.channel_data(&five, data);
            return;
        }
        let mut m = Message::new();
        m.raw = data.to_vec();
        if m.decode().is_err() {
            metrics::counter!("relay_turn_malformed_total").increment(1);
            return;
        }
        let class = m.typ.class;
        let method = m.typ.method;
        if class == CLASS_INDICATION && method == METHOD_SEND {
            self.send_indication(&five, &m);
            return;
        }
        if class != CLASS_REQUEST {
            return;
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
                self.authenticated(&five, tx, &m)
            }
            _ => Some(Reply::error(CODE_BAD_REQUEST, "Unsupported method", None)),
        };
        if let Some(reply) = reply {
            self.send_reply(&five, tx, &m, reply);
        }
    }

    fn send_reply(&self, five: &FiveTuple, tx: &ClientTx, req: &Message, reply: Reply) {
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
        if out.build(&setters).is_ok() {
            tx.send(five.client, out.raw);
        }
    }

    /// 401 with a fresh nonce, unless this source has used up its budget.
    fn unauthorized(&self, five: &FiveTuple, challenge: bool) -> Option<Reply> {
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
        Some(self.with_nonce(CODE_UNAUTHORIZED, "Unauthorized", five))
    }

    fn with_nonce(&self, code: ErrorCode, reason: &str, five: &FiveTuple) -> Reply {
        let mut r = Reply::error(code, reason, None);
        r.attrs.push(Box::new(TextAttribute::new(
            ATTR_NONCE,
            self.creds.nonce(five.client.ip(), crate::ice::unix_now()),
        )));
        r.attrs
            .push(Box::new(TextAttribute::new(ATTR_REALM, self.creds.realm().to_owned())));
        r
    }

    /// Authenticate `m`, then dispatch it; `None` means send nothing.
    fn authenticated(self: &Arc<Self>, five: &FiveTuple, tx: &ClientTx, m: &Message) -> Option<Reply> {
        if !m.contains(ATTR_MESSAGE_INTEGRITY) {
            return self.unauthorized(five, true);
        }
        let text = |attr| TextAttribute::get_from_as(m, attr).map(|t| t.text);
        let (Ok(nonce), Ok(username), Ok(realm)) = (text(ATTR_NONCE), text(ATTR_USERNAME), text(ATTR_REALM)) else {
            return Some(Reply::error(
                CODE_BAD_REQUEST,
                "USERNAME, REALM and NONCE are required",
                None,
            ));
        };
        let now = crate::ice::unix_now();
        if !self.creds.nonce_ok(&nonce, five.client.ip(), now) {
            // Counted with the challenges: both are answers anyone can ask for.
            if self.challenges.check_key(&five.client.ip()).is_err() {
                self.stats.unauthorized_dropped.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            return Some(self.with_nonce(CODE_STALE_NONCE, "Stale Nonce", five));
        }
        let existing = self.allocation(five);
        let key = match (&existing, m.typ.method) {
            (Some(a), method) if method != METHOD_ALLOCATE || a.username == username => {
                if a.username != username {
                    return Some(Reply::error(CODE_WRONG_CREDENTIALS, "Wrong Credentials", None));
                }
                // An existing allocation keeps the key it was made with (see auth.rs).
                Some(a.key.clone())
            }
            _ => self.creds.key_for_new(&username, &realm, now),
        };
        let Some(key) = key else {
            return self.unauthorized(five, false);
        };
        if MessageIntegrity(key.clone()).check(&mut m.clone()).is_err() {
            return self.unauthorized(five, false);
        }
        Some(match m.typ.method {
            METHOD_ALLOCATE => self.allocate(five, tx, m, username, key, existing.is_some()),
            method => match existing {
                None => Reply::error(CODE_ALLOC_MISMATCH, "Allocation Mismatch", Some(&key)),
                Some(a) if method == METHOD_REFRESH => self.refresh(&a, m),
                Some(a) if method == METHOD_CREATE_PERMISSION => self.create_permission(&a, m),
                Some(a) => self.channel_bind(&a, m),
            },
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
    fn over_quota(&self, t: &Table, quotas: &[(QuotaKey, usize)], k: Option<&[u8]>) -> Option<Reply> {
        if let Some((key, cap)) = quotas.iter().find(|(key, cap)| t.held(key) >= *cap) {
            metrics::counter!("relay_turn_quota_refusals_total", "quota" => match key {
                QuotaKey::User(_) => "user",
                QuotaKey::Source(_) => "ip",
                QuotaKey::Worker(_) => "worker",
            })
            .increment(1);
            tracing::debug!(?key, cap, "TURN allocation over quota");
            return Some(Reply::error(CODE_ALLOC_QUOTA_REACHED, "Allocation Quota Reached", k));
        }
        (t.by_five.len() >= self.cfg.max_allocations)
            .then(|| Reply::error(CODE_INSUFFICIENT_CAPACITY, "Insufficient Capacity", k))
    }

    fn allocate(
        self: &Arc<Self>,
        five: &FiveTuple,
        tx: &ClientTx,
        m: &Message,
        username: String,
        key: Vec<u8>,
        exists: bool,
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
        if let Some(refused) = self.over_quota(&self.table(), &quotas, k) {
            return refused;
        }
        let Some(relay) = self.bind_relay() else {
            return Reply::error(CODE_INSUFFICIENT_CAPACITY, "No relay port free", k);
        };
        let port = relay.local_addr().map(|a| a.port()).unwrap_or(0);
        let lifetime = self.requested_lifetime(m);
        let now = Instant::now();
        let alloc = Arc::new(Allocation {
            five: *five,
            username: username.clone(),
            quotas: quotas.iter().map(|(key, _)| key.clone()).collect(),
            key: key.clone(),
            relay: Arc::new(relay),
            relayed: SocketAddr::new(self.announced, port),
            created: now,
            client: tx.clone(),
            state: Mutex::new(AllocState {
                expires: now + lifetime,
                permissions: HashMap::new(),
                channels: HashMap::new(),
                channel_of: HashMap::new(),
            }),
            to_peers: RateLimiter::direct(bytes_per_second(self.cfg.bandwidth_kbps)),
            to_client: RateLimiter::direct(bytes_per_second(self.cfg.bandwidth_kbps)),
            cancel: self.shutdown.child_token(),
        });
        {
            let mut t = self.table();
            // Checked again under the lock that inserts: two racing Allocates cannot both pass.
            if t.by_five.contains_key(five) {
                return Reply::error(CODE_ALLOC_MISMATCH, "Allocation Mismatch", k);
            }
            if let Some(refused) = self.over_quota(&t, &quotas, k) {
                return refused;
            }
            for (key, _) in quotas {
                *t.held.entry(key).or_insert(0) += 1;
            }
            t.by_five.insert(*five, Arc::clone(&alloc));
            t.by_port.insert(port, Arc::clone(&alloc));
        }
        self.stats.allocations.fetch_add(1, Ordering::Relaxed);
        metrics::gauge!("relay_turn_allocations").increment(1.0);
        metrics::counter!("relay_turn_allocations_total").increment(1);
        tracing::debug!(client = %five.client, transport = ?five.transport, user = %username, port, "TURN allocation");
        tokio::spawn(relay_task(Arc::clone(self), alloc));
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

    /// A UDP socket on a free port of the relay range (a bounded number of tries).
    fn bind_relay(&self) -> Option<UdpSocket> {
        let (min, max) = (self.cfg.relay_port_min, self.cfg.relay_port_max);
        let span = u32::from(max - min) + 1;
        for _ in 0..span.min(256) {
            let port = min + (self.next_port.fetch_add(1, Ordering::Relaxed) % span) as u16;
            if let Ok(s) = super::bind_udp(
                SocketAddr::new(self.cfg.relay_ip, port),
                self.cfg.socket_buffer_bytes,
                false,
            ) {
                return UdpSocket::from_std(s).ok();
            }
        }
        tracing::warn!(min, max, "TURN: no free relay port");
        None
    }

    fn refresh(&self, a: &Arc<Allocation>, m: &Message) -> Reply {
        let lifetime = self.requested_lifetime(m);
        if lifetime.is_zero() {
            self.remove(&a.five);
            return Reply::ok(vec![Self::lifetime_attr(Duration::ZERO)], &a.key);
        }
        let limit = a.created + Duration::from_secs(self.cfg.max_allocation_age_s);
        let now = Instant::now();
        let expires = (now + lifetime).min(limit);
        a.state().expires = expires;
        Reply::ok(
            vec![Self::lifetime_attr(expires.saturating_duration_since(now))],
            &a.key,
        )
    }

    /// The peers of `m`'s XOR-PEER-ADDRESS attributes, canonical and checked; or the error reply.
    fn peers(&self, a: &Allocation, m: &Message) -> Result<Vec<SocketAddr>, Reply> {
        let mut peers = Vec::new();
        for raw in m.attributes.0.iter().filter(|r| r.typ == ATTR_XOR_PEER_ADDRESS) {
            let mut one = Message::new();
            one.transaction_id = m.transaction_id;
            one.add(ATTR_XOR_PEER_ADDRESS, &raw.value);
            let mut addr = XorMappedAddress::default();
            if addr.get_from_as(&one, ATTR_XOR_PEER_ADDRESS).is_err() {
                return Err(Reply::error(
                    CODE_BAD_REQUEST,
                    "Malformed XOR-PEER-ADDRESS",
                    Some(&a.key),
                ));
            }
            let ip = canonical(addr.ip);
            if !self.filter.allows(ip) && self.relayed_allocation(SocketAddr::new(ip, addr.port)).is_none() {
                self.stats.peer_denied.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("relay_turn_peer_denied_total").increment(1);
                tracing::info!(client = %a.five.client, user = %a.username, peer = %ip, "TURN peer refused (special-purpose or own address)");
                return Err(Reply::error(CODE_FORBIDDEN, "Forbidden IP", Some(&a.key)));
            }
            if !ip.is_ipv4() {
                return Err(Reply::error(
                    CODE_PEER_ADDR_FAMILY_MISMATCH,
                    "Peer Address Family Mismatch",
                    Some(&a.key),
                ));
            }
            peers.push(SocketAddr::new(ip, addr.port));
        }
        if peers.is_empty() {
            return Err(Reply::error(
                CODE_BAD_REQUEST,
                "XOR-PEER-ADDRESS is required",
                Some(&a.key),
            ));
        }
        Ok(peers)
    }

    /// The live allocation whose relayed address is `peer`, if any: the server's own address is
    /// otherwise refused, but relaying between two of its own allocations (both sides behind
    /// symmetric NATs) must work, and is delivered inside the process ([`Server::to_peer`]).
    fn relayed_allocation(&self, peer: SocketAddr) -> Option<Arc<Allocation>> {
        let own = peer.ip() == self.announced || peer.ip() == self.cfg.relay_ip;
        if !own {
            return None;
        }
        self.table().by_port.get(&peer.port()).cloned()
    }

    fn create_permission(&self, a: &Arc<Allocation>, m: &Message) -> Reply {
        let peers = match self.peers(a, m) {
            Ok(p) => p,
            Err(reply) => return reply,
        };
        let expires = Instant::now() + PERMISSION_LIFETIME;
        let mut s = a.state();
        for p in peers {
            s.permissions.insert(p.ip(), expires);
        }
        Reply::ok(Vec::new(), &a.key)
    }

    fn channel_bind(&self, a: &Arc<Allocation>, m: &Message) -> Reply {
        let number = match m.get(ATTR_CHANNEL_NUMBER) {
            Ok(v) if v.len() == 4 => u16::from_be_bytes([v[0], v[1]]),
            _ => return Reply::error(CODE_BAD_REQUEST, "CHANNEL-NUMBER is required", Some(&a.key)),
        };
        if !(CHANNEL_MIN..=CHANNEL_MAX).contains(&number) {
            return Reply::error(CODE_BAD_REQUEST, "Channel number out of range", Some(&a.key));
        }
        let peer = match self.peers(a, m) {
            Ok(p) if p.len() == 1 => p[0],
            Ok(_) => return Reply::error(CODE_BAD_REQUEST, "One XOR-PEER-ADDRESS", Some(&a.key)),
            Err(reply) => return reply,
        };
        let now = Instant::now();
        let mut s = a.state();
        let clash = s.channels.get(&number).is_some_and(|c| c.peer != peer)
            || s.channel_of.get(&peer).is_some_and(|n| *n != number);
        if clash {
            return Reply::error(CODE_BAD_REQUEST, "Channel already bound differently", Some(&a.key));
        }
        s.channels.insert(
            number,
            Channel {
                peer,
                expires: now + CHANNEL_LIFETIME,
            },
        );
        s.channel_of.insert(peer, number);
        s.permissions.insert(peer.ip(), now + PERMISSION_LIFETIME);
        Reply::ok(Vec::new(), &a.key)
    }

    fn send_indication(&self, five: &FiveTuple, m: &Message) {
        let Some(a) = self.allocation(five) else { return };
        let mut peer = XorMappedAddress::default();
        if peer.get_from_as(m, ATTR_XOR_PEER_ADDRESS).is_err() {
            return;
        }
        let Ok(data) = m.get(ATTR_DATA) else { return };
        self.to_peer(&a, SocketAddr::new(canonical(peer.ip), peer.port), &data);
    }

    fn channel_data(&self, five: &FiveTuple, frame: &[u8]) {
        let Some(a) = self.allocation(five) else { return };
        let number = u16::from_be_bytes([frame[0], frame[1]]);
        let len = u16::from_be_bytes([frame[2], frame[3]]) as usize;
        let Some(payload) = frame.get(4..4 + len) else { return };
        let peer = {
            let s = a.state();
            match s.channels.get(&number) {
                Some(c) if c.expires > Instant::now() => c.peer,
                _ => return,
            }
        };
        self.to_peer(&a, peer, payload);
    }

    fn to_peer(&self, a: &Allocation, peer: SocketAddr, payload: &[u8]) {
        if !a.permitted(peer.ip(), Instant::now()) {
            return;
        }
        let relayed = self.relayed_allocation(peer);
        // Permissions are per IP (RFC 8656 §9): one granted for this server's own address (for a
        // relayed port) must not let a Send indication reach its other ports.
        if relayed.is_none() && !self.filter.allows(peer.ip()) {
            self.stats.peer_denied.fetch_add(1, Ordering::Relaxed);
            return;
        }
        if !Allocation::within(&a.to_peers, payload.len()) {
            self.stats.bandwidth_dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("relay_turn_bandwidth_dropped_total").increment(1);
            return;
        }
        if let Some(other) = relayed {
            // Hand it to the other allocation directly: a VPS behind 1:1 NAT cannot send to its
            // own public address, and this skips a trip through the kernel besides.
            self.peer_to_client(&other, a.relayed, payload);
            return;
        }
        // A full socket buffer drops the datagram, as the network would.
        let _ = a.relay.try_send_to(payload, peer);
    }

    /// What a peer sent to the relayed address, on its way to the client.
    fn peer_to_client(&self, a: &Allocation, peer: SocketAddr, payload: &[u8]) {
        let now = Instant::now();
        let peer = SocketAddr::new(canonical(peer.ip()), peer.port());
        let channel = {
            let s = a.state();
            if s.permissions.get(&peer.ip()).is_none_or(|t| *t <= now) {
                return;
            }
            s.channel_of
                .get(&peer)
                .copied()
                .filter(|n| s.channels.get(n).is_some_and(|c| c.expires > now))
        };
        if !Allocation::within(&a.to_client, payload.len()) {
            self.stats.bandwidth_dropped.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("relay_turn_bandwidth_dropped_total").increment(1);
            return;
        }
        let frame = match channel {
            Some(number) => {
                let mut f = Vec::with_capacity(payload.len() + 8);
                f.extend_from_slice(&number.to_be_bytes());
                f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
                f.extend_from_slice(payload);
                if a.client.is_stream() {
                    // Over TCP and TLS, ChannelData is padded to a multiple of four (RFC 8656 §12.5).
                    f.resize(f.len().next_multiple_of(4), 0);
                }
                f
            }
            None => {
                let mut m = Message::new();
                let built = m.build(&[
                    Box::new(TransactionId::new()),
                    Box::new(MessageType::new(METHOD_DATA, CLASS_INDICATION)),
                    Box::new(XorAddr(ATTR_XOR_PEER_ADDRESS, peer)),
                    Box::new(RawAttr(ATTR_DATA, payload.to_vec())),
                ]);
                if built.is_err() {
                    return;
                }
                m.raw
            }
        };
        a.client.send(a.five.client, frame);
    }
}

/// Forward peers' datagrams to the client and expire the allocation.
async fn relay_task(server: Arc<Server>, a: Arc<Allocation>) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = a.cancel.cancelled() => break,
            r = a.relay.recv_from(&mut buf) => match r {
                Ok((n, peer)) => server.peer_to_client(&a, peer, &buf[..n]),
                // ICMP errors from earlier sends surface here on Linux; keep serving.
                Err(_) => tokio::task::yield_now().await,
            },
            _ = tick.tick() => {
                let now = Instant::now();
                let expired = {
                    let mut s = a.state();
                    s.permissions.retain(|_, t| *t > now);
                    let gone: Vec<u16> = s.channels.iter().filter(|(_, c)| c.expires <= now).map(|(n, _)| *n).collect();
                    for n in gone {
                        if let Some(c) = s.channels.remove(&n) {
                            s.channel_of.remove(&c.peer);
                        }
                    }
                    s.expires <= now
                };
                if expired {
                    break;
                }
            }
        }
    }
    server.remove(&a.five);
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
