//! The TURN control plane in memory: [`Core`] driven with bytes and a synthetic clock, no socket
//! anywhere. Every answer and every datagram it would send is an [`Output`] the test reads, so
//! it can assert what never left (a peer the filter refused) as well as what did.
//! (`turn_server.rs` proves the same rules over real UDP; `tests/tests/turn.rs` with coturn's tools.)

mod common;

use avatar_relay::config::EmbeddedTurnConfig;
use avatar_relay::turn::core::{Core, FiveTuple, Output, Ports, Transport};
use common::{code, peer, Credentials, Raw};
use rand::{rngs::StdRng, Rng, SeedableRng};
use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};
use stun::attributes::*;
use stun::message::*;
use stun::xoraddr::XorMappedAddress;

const SECRET: &str = "test-secret-0123456789";
const UNIX: u64 = 1_800_000_000;

fn config(f: impl FnOnce(&mut EmbeddedTurnConfig)) -> EmbeddedTurnConfig {
    let mut e = EmbeddedTurnConfig {
        relay_ip: "203.0.113.5".parse().expect("ip"),
        relay_port_min: 20000,
        relay_port_max: 20099,
        allow_peers: vec!["198.51.100.0/24".parse().expect("net")],
        ..EmbeddedTurnConfig::default()
    };
    f(&mut e);
    e
}

/// Relayed ports as a set: what a driver would bind.
#[derive(Default)]
struct FakePorts(HashSet<u16>);

impl Ports for FakePorts {
    fn bind(&mut self, port: u16) -> bool {
        self.0.insert(port)
    }
}

struct Setup {
    core: Core,
    ports: FakePorts,
    start: Instant,
    now: Instant,
}

impl Setup {
    fn new(cfg: EmbeddedTurnConfig) -> Self {
        let now = Instant::now();
        Self {
            core: Core::new(cfg, SECRET, &[], 0, now),
            ports: FakePorts::default(),
            start: now,
            now,
        }
    }

    fn handle(&mut self, five: FiveTuple, bytes: &[u8]) -> Vec<Output> {
        let unix = UNIX + (self.now - self.start).as_secs();
        self.core.handle(self.now, unix, five, bytes, &mut self.ports)
    }

    fn advance(&mut self, by: Duration) -> Vec<Output> {
        self.now += by;
        self.core.handle_timeout(self.now)
    }
}

fn five(client: &str) -> FiveTuple {
    FiveTuple {
        client: client.parse().expect("addr"),
        server: "203.0.113.5:3478".parse().expect("addr"),
        transport: Transport::Udp,
    }
}

/// The STUN answers among `out` to `five`.
fn answers(out: &[Output], to: FiveTuple) -> Vec<Message> {
    out.iter()
        .filter_map(|o| match o {
            Output::ToClient { five, bytes } if *five == to => {
                let mut m = Message::new();
                m.raw = bytes.clone();
                m.decode().ok().map(|()| m)
            }
            _ => None,
        })
        .collect()
}

/// A client's credentials and the nonce it was given.
struct Client {
    five: FiveTuple,
    creds: Credentials,
}

impl Client {
    fn new(client: &str, user: &str) -> Self {
        Self {
            five: five(client),
            creds: Credentials::rest(user, UNIX + 3600, SECRET),
        }
    }

    fn build(&self, typ: MessageType, attrs: Vec<Box<dyn Setter>>, auth: bool) -> Result<Message, stun::Error> {
        self.creds.build(typ, attrs, auth)
    }

    /// An authenticated request (challenged first if needed): the answer, and everything else
    /// the core decided.
    fn request(
        &mut self,
        s: &mut Setup,
        method: Method,
        attrs: impl Fn() -> Vec<Box<dyn Setter>>,
    ) -> (Message, Vec<Output>) {
        let typ = MessageType::new(method, CLASS_REQUEST);
        if self.creds.nonce.is_empty() {
            let out = s.handle(self.five, &self.build(typ, attrs(), false).expect("build").raw);
            let r = answers(&out, self.five).pop().expect("challenge");
            assert_eq!(code(&r), Some(401));
            self.creds.learn(&r);
        }
        let out = s.handle(self.five, &self.build(typ, attrs(), true).expect("build").raw);
        let r = answers(&out, self.five).pop().expect("answer");
        (r, out)
    }

    fn allocate(&mut self, s: &mut Setup, lifetime: Option<u32>) -> (Message, Vec<Output>) {
        self.request(s, METHOD_ALLOCATE, || {
            let mut a: Vec<Box<dyn Setter>> = vec![Box::new(Raw(ATTR_REQUESTED_TRANSPORT, vec![17, 0, 0, 0]))];
            if let Some(l) = lifetime {
                a.push(Box::new(Raw(ATTR_LIFETIME, l.to_be_bytes().to_vec())));
            }
            a
        })
    }

    fn permit(&mut self, s: &mut Setup, to: SocketAddr) -> Message {
        self.request(s, METHOD_CREATE_PERMISSION, || vec![peer(ATTR_XOR_PEER_ADDRESS, to)])
            .0
    }
}

fn relayed(m: &Message) -> SocketAddr {
    let mut a = XorMappedAddress::default();
    a.get_from_as(m, ATTR_XOR_RELAYED_ADDRESS).expect("relayed address");
    SocketAddr::new(a.ip, a.port)
}

#[test]
fn an_allocation_relays_both_ways_and_expires_on_the_clock_giving_back_its_quota() {
    let mut s = Setup::new(config(|e| e.max_allocations_per_user = 1));
    let mut alice = Client::new("192.0.2.10:5000", "alice");
    let (r, out) = alice.allocate(&mut s, Some(60));
    assert_eq!(code(&r), None, "allocated");
    let port = relayed(&r).port();
    assert!(out.contains(&Output::Opened { five: alice.five, port }), "{out:?}");
    assert_eq!(s.core.poll_timeout(), Some(s.now + Duration::from_secs(60)));

    // A permission, a Send indication out, a peer's datagram back as a Data indication.
    let peer: SocketAddr = "198.51.100.7:9000".parse().expect("addr");
    assert_eq!(code(&alice.permit(&mut s, peer)), None);
    let send = alice
        .build(
            MessageType::new(METHOD_SEND, CLASS_INDICATION),
            vec![
                common::peer(ATTR_XOR_PEER_ADDRESS, peer),
                Box::new(Raw(ATTR_DATA, b"ping".to_vec())),
            ],
            false,
        )
        .expect("send");
    let out = s.handle(alice.five, &send.raw);
    assert_eq!(
        out,
        vec![Output::ToPeer {
            port,
            peer,
            bytes: b"ping".to_vec()
        }]
    );
    let back = s
        .core
        .from_peer(s.now, port, peer, b"pong")
        .expect("relayed to the client");
    let Output::ToClient { five, bytes } = back else {
        panic!("{back:?}");
    };
    assert_eq!(five, alice.five);
    let mut data = Message::new();
    data.raw = bytes;
    data.decode().expect("a Data indication");
    assert_eq!(data.get(ATTR_DATA).expect("data"), b"pong");
    // An unpermitted peer's datagram goes nowhere.
    assert_eq!(
        s.core
            .from_peer(s.now, port, "198.51.100.8:1".parse().expect("addr"), b"x"),
        None
    );

    // The cap holds while it lives; at its lifetime it closes and the quota is free again.
    let mut again = Client::new("192.0.2.10:5001", "alice");
    assert_eq!(code(&again.allocate(&mut s, None).0), Some(486));
    assert!(s.advance(Duration::from_secs(59)).is_empty());
    assert_eq!(
        s.advance(Duration::from_secs(2)),
        vec![Output::Closed { five: alice.five, port }]
    );
    assert_eq!(s.core.allocation_count(), 0);
    assert_eq!(code(&again.allocate(&mut s, None).0), None);
}

#[test]
fn failed_authentications_are_answered_at_a_limited_rate_per_minute_of_the_given_clock() {
    let mut s = Setup::new(config(|e| e.unauthorized_per_minute = 5));
    let mut mallory = Client::new("192.0.2.66:4000", "mallory");
    mallory.creds.password = "wrong".into();
    let (first, _) = mallory.allocate(&mut s, None);
    assert_eq!(code(&first), Some(401));
    let attempt = |s: &mut Setup, m: &Client| {
        let typ = MessageType::new(METHOD_ALLOCATE, CLASS_REQUEST);
        let raw = m
            .build(
                typ,
                vec![Box::new(Raw(ATTR_REQUESTED_TRANSPORT, vec![17, 0, 0, 0]))],
                true,
            )
            .expect("build")
            .raw;
        answers(&s.handle(m.five, &raw), m.five).len()
    };
    let answered: usize = (0..20).map(|_| attempt(&mut s, &mallory)).sum();
    assert_eq!(answered, 4, "five per minute, one spent above");
    assert!(s.core.stats().unauthorized_dropped.load(Ordering::Relaxed) >= 15);
    // A minute later, by the clock passed in, the budget is back.
    s.advance(Duration::from_secs(61));
    assert_eq!(attempt(&mut s, &mallory), 1);
}

/// Fifty thousand malformed and hostile messages straight into the state machine, from a client
/// that holds an allocation and valid credentials, so most of them pass authentication and reach
/// the attribute parsers: random attribute values and lengths, duplicated and misplaced
/// attributes, flipped bytes, truncations, ChannelData with lying lengths. Nothing panics, the
/// allocation count stays within its caps, no datagram goes to a refused peer, and the server
/// still serves afterwards. No socket: it runs in well under a second.
#[test]
fn hostile_messages_are_refused_without_harm() {
    let mut s = Setup::new(config(|e| e.max_allocations_per_user = 3));
    let mut c = Client::new("192.0.2.20:6000", "mallory");
    assert_eq!(code(&c.allocate(&mut s, None).0), None);

    let types = [
        ATTR_XOR_PEER_ADDRESS,
        ATTR_LIFETIME,
        ATTR_CHANNEL_NUMBER,
        ATTR_REQUESTED_TRANSPORT,
        ATTR_DATA,
        ATTR_EVEN_PORT,
        ATTR_REQUESTED_ADDRESS_FAMILY,
        ATTR_RESERVATION_TOKEN,
        ATTR_DONT_FRAGMENT,
        ATTR_USERNAME,
        ATTR_NONCE,
        ATTR_REALM,
        ATTR_MESSAGE_INTEGRITY,
        ATTR_FINGERPRINT,
        AttrType(0x7777),
    ];
    let methods = [
        METHOD_BINDING,
        METHOD_ALLOCATE,
        METHOD_REFRESH,
        METHOD_CREATE_PERMISSION,
        METHOD_CHANNEL_BIND,
        METHOD_SEND,
        METHOD_DATA,
        METHOD_CONNECT,
    ];
    let classes = [
        CLASS_REQUEST,
        CLASS_REQUEST,
        CLASS_REQUEST,
        CLASS_INDICATION,
        CLASS_SUCCESS_RESPONSE,
    ];
    let allowed: SocketAddr = "198.51.100.9:9".parse().expect("addr");
    let peers: [SocketAddr; 5] = [
        allowed,
        "169.254.169.254:80".parse().expect("addr"),
        "[::ffff:10.0.0.1]:53".parse().expect("addr"),
        "[::1]:9".parse().expect("addr"),
        "127.0.0.1:22".parse().expect("addr"),
    ];
    let mut rng = StdRng::seed_from_u64(0x5EED);
    let mut by_code = BTreeMap::<u16, usize>::new();
    let mut sent_to = HashSet::new();
    let started = Instant::now();
    for _ in 0..50_000 {
        let frame = if rng.gen_ratio(1, 10) {
            // ChannelData: any channel, a length field that may exceed the payload.
            let payload = rng.gen_range(0..64);
            let mut f = vec![0x40 | rng.gen_range(0..0x40u8), rng.gen(), rng.gen(), rng.gen()];
            f.extend((0..payload).map(|_| rng.gen::<u8>()));
            f
        } else {
            let mut attrs: Vec<Box<dyn Setter>> = Vec::new();
            for _ in 0..rng.gen_range(0..6) {
                if rng.gen_ratio(1, 4) {
                    attrs.push(peer(ATTR_XOR_PEER_ADDRESS, peers[rng.gen_range(0..peers.len())]));
                } else {
                    let len = rng.gen_range(0..48);
                    let value = (0..len).map(|_| rng.gen::<u8>()).collect();
                    attrs.push(Box::new(Raw(types[rng.gen_range(0..types.len())], value)));
                }
            }
            let typ = MessageType::new(
                methods[rng.gen_range(0..methods.len())],
                classes[rng.gen_range(0..classes.len())],
            );
            // The builder refuses some orders (MESSAGE-INTEGRITY after FINGERPRINT); those are
            // made by the "append" mutation below instead.
            let Ok(m) = c.build(typ, attrs, rng.gen_ratio(4, 5)) else {
                continue;
            };
            let mut raw = m.raw;
            if rng.gen_ratio(1, 3) {
                match rng.gen_range(0..4) {
                    // A well-formed attribute after the signature, the length header fixed up.
                    3 => {
                        let len = rng.gen_range(0..24u16);
                        raw.extend(types[rng.gen_range(0..types.len())].0.to_be_bytes());
                        raw.extend(len.to_be_bytes());
                        raw.extend((0..len.next_multiple_of(4)).map(|_| rng.gen::<u8>()));
                        let body = (raw.len() - 20) as u16;
                        raw[2..4].copy_from_slice(&body.to_be_bytes());
                    }
                    0 => {
                        for _ in 0..rng.gen_range(1..4) {
                            let at = rng.gen_range(0..raw.len());
                            raw[at] ^= 1 << rng.gen_range(0..8);
                        }
                    }
                    1 => raw.truncate(rng.gen_range(0..raw.len())),
                    _ => raw.extend((0..rng.gen_range(1..16)).map(|_| rng.gen::<u8>())),
                }
            }
            raw
        };
        let out = s.handle(c.five, &frame);
        for m in answers(&out, c.five) {
            *by_code.entry(code(&m).unwrap_or(0)).or_default() += 1;
        }
        for o in &out {
            if let Output::ToPeer { peer, .. } = o {
                sent_to.insert(*peer);
            }
        }
        // A millisecond a message, by the clock passed in.
        s.now += Duration::from_millis(1);
    }
    println!(
        "50,000 hostile messages in {:?}; answers by error code (0 = success): {by_code:?}",
        started.elapsed()
    );
    // Past authentication into each parser: successes, malformed attributes (400), refused peers
    // (403), wrong family (440/443), and answers for an allocation that is gone (437).
    for want in [0, 400, 403, 437] {
        assert!(
            by_code.get(&want).is_some_and(|n| *n > 0),
            "no {want} among {by_code:?}"
        );
    }
    assert!(s.core.allocation_count() <= 3, "caps held");
    assert!(
        sent_to.iter().all(|p| p.ip() == allowed.ip()),
        "datagrams only to the allowed peer: {sent_to:?}"
    );
    // Thousands of unsigned requests used up this source's challenge budget: it is now ignored.
    assert!(s.core.stats().unauthorized_dropped.load(Ordering::Relaxed) > 0);

    // Still serving: a Binding, and a newcomer from another address allocates and gets a permission.
    let mut newcomer = Client::new("192.0.2.21:6000", "alice");
    let binding = newcomer
        .build(MessageType::new(METHOD_BINDING, CLASS_REQUEST), Vec::new(), false)
        .expect("binding");
    let r = answers(&s.handle(newcomer.five, &binding.raw), newcomer.five);
    assert_eq!(r.first().map(|m| m.typ.class), Some(CLASS_SUCCESS_RESPONSE));
    assert_eq!(code(&newcomer.allocate(&mut s, None).0), None);
    assert_eq!(code(&newcomer.permit(&mut s, allowed)), None);
}
