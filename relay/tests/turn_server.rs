//! The embedded TURN server, driven over real UDP on loopback by a minimal STUN client written
//! with the `stun` codecs: exact error codes for each safety rule (coturn's own tools, in
//! `tests/tests/turn.rs`, prove interoperability; this proves the rules). The control plane alone,
//! with no socket, is driven in `turn_core.rs` (the hostile-message test lives there).

mod common;

use avatar_relay::config::{EmbeddedTurnConfig, Secret, TurnConfig};
use avatar_relay::ice::{IceServers, TurnUser};
use avatar_relay::tls::{Identity, ServerCerts};
use avatar_relay::turn::TurnServer;
use common::{code, peer, Credentials, Raw};
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::Ordering;
use std::time::Duration;
use stun::agent::TransactionId;
use stun::attributes::*;
use stun::message::*;
use stun::xoraddr::XorMappedAddress;
use tokio::net::UdpSocket;
use tokio_util::sync::CancellationToken;

const SECRET: &str = "test-secret-0123456789";

fn config(f: impl FnOnce(&mut EmbeddedTurnConfig)) -> TurnConfig {
    let mut e = EmbeddedTurnConfig {
        listen_udp: Some("127.0.0.1:0".parse().expect("addr")),
        listen_tcp: None,
        relay_ip: "127.0.0.1".parse().expect("ip"),
        relay_port_min: 20000,
        relay_port_max: 29999,
        ..EmbeddedTurnConfig::default()
    };
    f(&mut e);
    TurnConfig {
        mode: avatar_relay::config::TurnMode::Embedded,
        secret: Secret::new(SECRET),
        embedded: e,
        ..TurnConfig::default()
    }
}

struct Running {
    addr: SocketAddr,
    tcp: Option<SocketAddr>,
    server: std::sync::Arc<avatar_relay::turn::server::Server>,
    stop: CancellationToken,
}

impl Drop for Running {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

fn start(cfg: TurnConfig) -> Running {
    let stop = CancellationToken::new();
    let certs = ServerCerts::Static(Identity::self_signed().expect("cert"));
    let turn = TurnServer::bind(&cfg, &certs, &[], stop.clone()).expect("bind");
    let addr = turn.udp_addr().expect("udp");
    let tcp = turn.tcp_addr();
    let server = turn.server();
    tokio::spawn(turn.run());
    Running {
        addr,
        tcp,
        server,
        stop,
    }
}

/// A TURN client: one UDP socket, long-term credentials once challenged.
struct Client {
    sock: UdpSocket,
    server: SocketAddr,
    creds: Credentials,
}

fn setter<T: Setter + 'static>(t: T) -> Box<dyn Setter> {
    Box::new(t)
}

impl Client {
    async fn new(server: SocketAddr, user: &str, expiry: u64, secret: &str) -> Self {
        Self {
            sock: UdpSocket::bind("127.0.0.1:0").await.expect("bind"),
            server,
            creds: Credentials::rest(user, expiry, secret),
        }
    }

    async fn valid(server: SocketAddr, user: &str) -> Self {
        Self::new(server, user, avatar_relay::ice::unix_now() + 300, SECRET).await
    }

    /// Send and wait for the answer with the same transaction id; `None` after a second of silence.
    async fn roundtrip(&self, m: &Message) -> Option<Message> {
        self.sock.send_to(&m.raw, self.server).await.expect("send");
        let mut buf = vec![0u8; 2048];
        let deadline = tokio::time::Instant::now() + Duration::from_secs(1);
        loop {
            let (n, _) = tokio::time::timeout_at(deadline, self.sock.recv_from(&mut buf))
                .await
                .ok()?
                .ok()?;
            let mut r = Message::new();
            r.raw = buf[..n].to_vec();
            if r.decode().is_ok() && r.transaction_id == m.transaction_id {
                return Some(r);
            }
        }
    }

    fn build(&self, method: Method, attrs: Vec<Box<dyn Setter>>, auth: bool) -> Message {
        self.build_as(MessageType::new(method, CLASS_REQUEST), attrs, auth)
    }

    fn build_as(&self, typ: MessageType, attrs: Vec<Box<dyn Setter>>, auth: bool) -> Message {
        self.creds.build(typ, attrs, auth).expect("build")
    }

    /// An authenticated request (challenged first if needed); the answer.
    async fn request(&mut self, method: Method, attrs: impl Fn() -> Vec<Box<dyn Setter>>) -> Message {
        if self.creds.nonce.is_empty() {
            let r = self
                .roundtrip(&self.build(method, attrs(), false))
                .await
                .expect("challenge");
            assert_eq!(code(&r), Some(401), "first answer is the challenge");
            self.creds.learn(&r);
        }
        self.roundtrip(&self.build(method, attrs(), true))
            .await
            .expect("answer")
    }

    async fn allocate(&mut self) -> Message {
        self.request(METHOD_ALLOCATE, || {
            vec![setter(Raw(ATTR_REQUESTED_TRANSPORT, vec![17, 0, 0, 0]))]
        })
        .await
    }

    async fn permit(&mut self, to: SocketAddr) -> Message {
        self.request(METHOD_CREATE_PERMISSION, || vec![peer(ATTR_XOR_PEER_ADDRESS, to)])
            .await
    }

    async fn bind_channel(&mut self, number: u16, to: SocketAddr) -> Message {
        self.request(METHOD_CHANNEL_BIND, || {
            let mut value = number.to_be_bytes().to_vec();
            value.extend([0, 0]);
            vec![setter(Raw(ATTR_CHANNEL_NUMBER, value)), peer(ATTR_XOR_PEER_ADDRESS, to)]
        })
        .await
    }
}

fn relayed(m: &Message) -> SocketAddr {
    let mut a = XorMappedAddress::default();
    a.get_from_as(m, ATTR_XOR_RELAYED_ADDRESS).expect("relayed address");
    SocketAddr::new(a.ip, a.port)
}

#[tokio::test]
async fn binding_answers_the_mapped_address() {
    let s = start(config(|_| {}));
    let c = Client::valid(s.addr, "alice").await;
    let r = c
        .roundtrip(&c.build(METHOD_BINDING, vec![], false))
        .await
        .expect("answer");
    assert_eq!(r.typ, MessageType::new(METHOD_BINDING, CLASS_SUCCESS_RESPONSE));
    let mut mapped = XorMappedAddress::default();
    mapped.get_from(&r).expect("mapped");
    assert_eq!(
        SocketAddr::new(mapped.ip, mapped.port),
        c.sock.local_addr().expect("addr")
    );
}

#[tokio::test]
async fn wrong_password_and_expired_credentials_get_401() {
    let s = start(config(|_| {}));
    let mut wrong = Client::new(
        s.addr,
        "mallory",
        avatar_relay::ice::unix_now() + 300,
        "not-the-secret-xxxx",
    )
    .await;
    let r = wrong.allocate().await;
    assert_eq!(code(&r), Some(401), "wrong password");
    let mut expired = Client::new(s.addr, "alice", avatar_relay::ice::unix_now() - 1, SECRET).await;
    assert_eq!(code(&expired.allocate().await), Some(401), "expired");
    let mut good = Client::valid(s.addr, "alice").await;
    let r = good.allocate().await;
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE, "{:?}", code(&r));
    assert_eq!(relayed(&r).ip(), "127.0.0.1".parse::<IpAddr>().expect("ip"));
    // A forged nonce is stale: 438 with a fresh one.
    good.creds.nonce = "1-00".into();
    let r = good.permit("198.51.100.1:9".parse().expect("addr")).await;
    assert_eq!(code(&r), Some(438));
}

#[tokio::test]
async fn special_purpose_peers_are_refused_with_403_unless_allow_listed() {
    let s = start(config(|_| {}));
    let mut c = Client::valid(s.addr, "alice").await;
    assert_eq!(c.allocate().await.typ.class, CLASS_SUCCESS_RESPONSE);
    for p in [
        "127.0.0.1:9",
        "169.254.169.254:80",
        "[::ffff:127.0.0.1]:9",
        "10.0.0.1:9",
        "[::ffff:169.254.169.254]:80",
        "[::1]:9",
    ] {
        let to: SocketAddr = p.parse().expect("addr");
        assert_eq!(code(&c.permit(to).await), Some(403), "CreatePermission {p}");
        let r = c.bind_channel(0x4001, to).await;
        assert_eq!(code(&r), Some(403), "ChannelBind {p}");
    }
    assert!(s.server.stats.peer_denied.load(Ordering::Relaxed) >= 12);
    // A public address is fine.
    let r = c.permit("8.8.8.8:53".parse().expect("addr")).await;
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE);

    let allowed = start(config(|e| e.allow_peers = vec!["127.0.0.0/8".parse().expect("net")]));
    let mut c = Client::valid(allowed.addr, "alice").await;
    assert_eq!(c.allocate().await.typ.class, CLASS_SUCCESS_RESPONSE);
    for p in ["127.0.0.1:9", "[::ffff:127.0.0.1]:9"] {
        let r = c.permit(p.parse().expect("addr")).await;
        assert_eq!(
            r.typ.class,
            CLASS_SUCCESS_RESPONSE,
            "{p} is allow-listed: {:?}",
            code(&r)
        );
    }
    assert_eq!(
        code(&c.permit("169.254.169.254:80".parse().expect("addr")).await),
        Some(403)
    );
}

#[tokio::test]
async fn allocations_per_user_are_capped_whatever_credentials_they_hold() {
    let s = start(config(|e| e.max_allocations_per_user = 2));
    let expiry = avatar_relay::ice::unix_now() + 300;
    let mut answers = Vec::new();
    // A fresh credential every second used to give a fresh quota: the user is what counts.
    for (i, ip) in ["127.0.0.2", "127.0.0.3", "127.0.0.4"].into_iter().enumerate() {
        let mut c = Client::new(s.addr, "b.alice", expiry + i as u64, SECRET).await;
        c.sock = UdpSocket::bind((ip, 0)).await.expect("bind");
        answers.push(code(&c.allocate().await));
    }
    assert_eq!(answers, [None, None, Some(486)]);
    // Another user is not affected.
    let mut other = Client::valid(s.addr, "b.bob").await;
    assert_eq!(code(&other.allocate().await), None);
    assert_eq!(s.server.stats.allocations.load(Ordering::Relaxed), 3);
}

/// A client holding credentials the relay minted for it, as a browser gets them.
async fn minted(s: &Running, ice: &IceServers, who: TurnUser<'_>, from: &str) -> Client {
    let list = ice.servers(who, avatar_relay::ice::unix_now());
    let turn = list.iter().find(|i| i.username.is_some()).expect("TURN entry");
    Client {
        sock: UdpSocket::bind((from, 0)).await.expect("bind"),
        server: s.addr,
        creds: Credentials {
            username: turn.username.clone().expect("username"),
            password: turn.credential.clone().expect("credential"),
            realm: String::new(),
            nonce: String::new(),
        },
    }
}

/// The attack from the security review: an anonymous client opens 40 WebSockets under 40 session
/// ids, so the relay mints 40 credentials, and allocates with each of them as fast as it can.
#[tokio::test]
async fn the_turn_exhaustion_sequence_gets_no_more_than_the_per_ip_cap() {
    const PER_IP: usize = 8;
    let cfg = config(|e| e.max_allocations_per_ip = PER_IP);
    let ice = IceServers::new(&cfg);
    let s = start(cfg);
    let mut granted = 0;
    let mut refused = 0;
    // Every client keeps its socket: a dropped one's port could come back to a later client and
    // name a granted allocation's 5-tuple (437, allocation mismatch) instead of a new one.
    let mut clients = Vec::new();
    for session in 0..40 {
        for _ in 0..3 {
            let session_id = format!("attacker-session-{session}");
            let mut c = minted(&s, &ice, TurnUser::Browser(&session_id), "127.0.0.1").await;
            match code(&c.allocate().await) {
                None => granted += 1,
                Some(486) => refused += 1,
                other => panic!("unexpected answer {other:?}"),
            }
            clients.push(c);
        }
    }
    assert_eq!((granted, refused), (PER_IP, 120 - PER_IP));
    // Another client still allocates, and so does a worker at the attacker's address (NAT).
    let mut student = minted(&s, &ice, TurnUser::Browser("student"), "127.0.0.9").await;
    assert_eq!(code(&student.allocate().await), None, "another client allocates");
    let mut worker = minted(&s, &ice, TurnUser::Worker("gpu-1"), "127.0.0.1").await;
    assert_eq!(code(&worker.allocate().await), None, "the worker allocates");
}

/// The second attack: a browser opens sockets under session ids shaped like a worker's TURN user
/// (the worker id is public) to use up the worker's quota, so its answers lose relay candidates.
#[tokio::test]
async fn a_browser_cannot_spend_a_workers_turn_quota() {
    let cfg = config(|e| {
        e.max_allocations_per_user = 2;
        e.max_allocations_per_worker = 2;
    });
    let ice = IceServers::new(&cfg);
    let s = start(cfg);
    for (i, session_id) in ["worker-gpu-1", "w.gpu-1", "gpu-1", "b.w.gpu-1"]
        .into_iter()
        .enumerate()
    {
        for j in 0..3 {
            let from = format!("127.0.1.{}", i * 3 + j + 1);
            let mut c = minted(&s, &ice, TurnUser::Browser(session_id), &from).await;
            let answer = code(&c.allocate().await);
            assert!(answer.is_none() || answer == Some(486), "{session_id}: {answer:?}");
        }
    }
    for i in 0..2 {
        let mut worker = minted(&s, &ice, TurnUser::Worker("gpu-1"), &format!("127.0.2.{i}")).await;
        assert_eq!(code(&worker.allocate().await), None, "the worker keeps its whole quota");
    }
    let mut third = minted(&s, &ice, TurnUser::Worker("gpu-1"), "127.0.2.9").await;
    assert_eq!(code(&third.allocate().await), Some(486), "and its own cap holds");
}

#[tokio::test]
async fn failed_authentications_are_answered_at_a_limited_rate() {
    let s = start(config(|e| e.unauthorized_per_minute = 5));
    let mut c = Client::new(
        s.addr,
        "mallory",
        avatar_relay::ice::unix_now() + 300,
        "not-the-secret-xxxx",
    )
    .await;
    assert_eq!(code(&c.allocate().await), Some(401));
    let mut answered = 1;
    for _ in 0..20 {
        let m = c.build(
            METHOD_ALLOCATE,
            vec![setter(Raw(ATTR_REQUESTED_TRANSPORT, vec![17, 0, 0, 0]))],
            true,
        );
        c.sock.send_to(&m.raw, s.addr).await.expect("send");
        let mut buf = [0u8; 1024];
        if tokio::time::timeout(Duration::from_millis(100), c.sock.recv_from(&mut buf))
            .await
            .is_ok()
        {
            answered += 1;
        }
    }
    assert_eq!(answered, 5, "five 401s a minute, then silence");
    assert!(s.server.stats.unauthorized_dropped.load(Ordering::Relaxed) >= 16);
}

/// Data goes both ways through a channel and through Send/Data indications; the bandwidth cap drops
/// what exceeds it.
#[tokio::test]
async fn data_is_relayed_both_ways_and_bandwidth_is_capped() {
    let s = start(config(|e| {
        e.allow_peers = vec!["127.0.0.0/8".parse().expect("net")];
        e.bandwidth_kbps = 100; // 12.5 kB/s, bursts of 64 KiB
    }));
    let peer_sock = UdpSocket::bind("127.0.0.1:0").await.expect("peer");
    let peer_addr = peer_sock.local_addr().expect("addr");
    let mut c = Client::valid(s.addr, "alice").await;
    let relay = relayed(&c.allocate().await);
    let r = c.bind_channel(0x4000, peer_addr).await;
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE, "{:?}", code(&r));

    // Client → peer through the channel.
    let mut frame = vec![0x40, 0x00, 0x00, 0x05];
    frame.extend_from_slice(b"hello");
    c.sock.send_to(&frame, s.addr).await.expect("send");
    let mut buf = vec![0u8; 2048];
    let (n, from) = tokio::time::timeout(Duration::from_secs(1), peer_sock.recv_from(&mut buf))
        .await
        .expect("peer got it")
        .expect("recv");
    assert_eq!((&buf[..n], from), (&b"hello"[..], relay));

    // Peer → client arrives as ChannelData on channel 0x4000.
    peer_sock.send_to(b"world", relay).await.expect("send");
    let (n, _) = tokio::time::timeout(Duration::from_secs(1), c.sock.recv_from(&mut buf))
        .await
        .expect("client got it")
        .expect("recv");
    assert_eq!(&buf[..n], &[0x40, 0x00, 0x00, 0x05, b'w', b'o', b'r', b'l', b'd']);

    // A peer without permission is not relayed.
    let stranger = UdpSocket::bind("127.0.0.2:0").await.expect("stranger");
    stranger.send_to(b"spam", relay).await.expect("send");
    assert!(
        tokio::time::timeout(Duration::from_millis(200), c.sock.recv_from(&mut buf))
            .await
            .is_err(),
        "no permission for 127.0.0.2"
    );

    // 200 × 1200 B at once: far over 12.5 kB/s; the one-burst allowance (64 KiB) passes, the rest drops.
    let mut big = vec![0x40, 0x00, 0x04, 0xB0];
    big.extend_from_slice(&[7u8; 1200]);
    for _ in 0..200 {
        c.sock.send_to(&big, s.addr).await.expect("send");
    }
    let mut got = 0;
    while let Ok(Ok(_)) = tokio::time::timeout(Duration::from_millis(300), peer_sock.recv_from(&mut buf)).await {
        got += 1;
    }
    assert!((40..=60).contains(&got), "bandwidth cap let {got} of 200 through");
    assert!(s.server.stats.bandwidth_dropped.load(Ordering::Relaxed) >= 140);
}

/// Two clients of this server relay to each other (both behind symmetric NATs): the server's own
/// address is otherwise forbidden, its relayed ports are not, and the data never leaves the process.
#[tokio::test]
async fn two_allocations_of_this_server_reach_each_other() {
    let s = start(config(|_| {}));
    let mut a = Client::valid(s.addr, "alice").await;
    let mut b = Client::valid(s.addr, "bob").await;
    let (ra, rb) = (relayed(&a.allocate().await), relayed(&b.allocate().await));
    assert_eq!(code(&a.permit(rb).await), None, "permission for the other allocation");
    assert_eq!(code(&b.permit(ra).await), None);
    // Not for any other port of this host, nor a port of the relay range that no allocation holds.
    assert_eq!(code(&a.permit("127.0.0.1:9".parse().expect("addr")).await), Some(403));
    let unused = (20000..=29999u16)
        .find(|p| ![ra.port(), rb.port()].contains(p))
        .expect("a free relay port");
    assert_eq!(
        code(&a.permit(SocketAddr::from(([127, 0, 0, 1], unused))).await),
        Some(403)
    );
    let r = a.bind_channel(0x4000, rb).await;
    assert_eq!(code(&r), None);
    let mut frame = vec![0x40, 0x00, 0x00, 0x04];
    frame.extend_from_slice(b"ping");
    a.sock.send_to(&frame, s.addr).await.expect("send");
    let mut buf = vec![0u8; 2048];
    let (n, _) = tokio::time::timeout(Duration::from_secs(1), b.sock.recv_from(&mut buf))
        .await
        .expect("b got it")
        .expect("recv");
    // No channel on b's side: a Data indication from a's relayed address.
    let mut m = Message::new();
    m.raw = buf[..n].to_vec();
    m.decode().expect("STUN");
    assert_eq!(m.typ, MessageType::new(METHOD_DATA, CLASS_INDICATION));
    let mut from = XorMappedAddress::default();
    from.get_from_as(&m, ATTR_XOR_PEER_ADDRESS).expect("peer");
    assert_eq!(SocketAddr::new(from.ip, from.port), ra);
    assert_eq!(m.get(ATTR_DATA).expect("data"), b"ping");

    // The permission for this host's address covers its relayed ports only: a Send indication to
    // another port of it (a service on the relay host) goes nowhere.
    let service = UdpSocket::bind("127.0.0.1:0")
        .await
        .expect("a service on the relay host");
    let send = |to: SocketAddr| {
        let mut m = Message::new();
        m.build(&[
            setter(TransactionId::new()),
            setter(MessageType::new(METHOD_SEND, CLASS_INDICATION)),
            peer(ATTR_XOR_PEER_ADDRESS, to),
            setter(Raw(ATTR_DATA, b"probe".to_vec())),
        ])
        .expect("build");
        m
    };
    a.sock
        .send_to(&send(service.local_addr().expect("addr")).raw, s.addr)
        .await
        .expect("send");
    assert!(
        tokio::time::timeout(Duration::from_millis(300), service.recv_from(&mut buf))
            .await
            .is_err(),
        "nothing reaches the relay host's other ports"
    );
    // While a Send indication to the other allocation still arrives.
    a.sock.send_to(&send(rb).raw, s.addr).await.expect("send");
    assert!(tokio::time::timeout(Duration::from_secs(1), b.sock.recv_from(&mut buf))
        .await
        .is_ok());
}

/// A STUN request over a TCP connection, and its answer.
async fn ask(conn: &mut tokio::net::TcpStream, m: &Message) -> Message {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    conn.write_all(&m.raw).await.expect("write");
    let mut head = [0u8; 20];
    conn.read_exact(&mut head).await.expect("header");
    let mut raw = head.to_vec();
    raw.resize(20 + u16::from_be_bytes([head[2], head[3]]) as usize, 0);
    conn.read_exact(&mut raw[20..]).await.expect("body");
    let mut r = Message::new();
    r.raw = raw;
    r.decode().expect("STUN");
    r
}

/// Whether the server closes `c` within `limit` (EOF or reset).
async fn closed_within(c: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut b = [0u8; 64];
    matches!(
        tokio::time::timeout(limit, c.read(&mut b)).await,
        Ok(Ok(0)) | Ok(Err(_))
    )
}

/// Issue 26, N2: one address opening idle TCP connections held every slot (4,100 against a cap
/// of 4,096, each living 30 s), so a browser without UDP could not reach TURN. Now one address
/// holds its share only, and a silent connection goes after `stream_first_message_within_ms`:
/// another client's Binding over TCP is answered during the flood.
#[tokio::test]
async fn one_address_cannot_take_every_tcp_slot() {
    use tokio::net::{TcpSocket, TcpStream};

    let s = start(config(|e| {
        e.listen_tcp = Some("127.0.0.1:0".parse().expect("addr"));
        e.max_stream_connections = 100;
        e.max_stream_connections_per_ip = 16;
        e.stream_first_message_within_ms = 800;
    }));
    let tcp = s.tcp.expect("tcp listener");
    // The attacker: 150 idle connections from 127.0.0.2 (more than the whole cap).
    let mut flood = Vec::new();
    for _ in 0..150 {
        let socket = TcpSocket::new_v4().expect("socket");
        socket.bind("127.0.0.2:0".parse().expect("addr")).expect("bind");
        flood.push(socket.connect(tcp).await.expect("connect"));
    }
    let started = std::time::Instant::now();
    let outcomes =
        futures::future::join_all(flood.iter_mut().map(|c| closed_within(c, Duration::from_millis(300)))).await;
    let held = outcomes.iter().filter(|closed| !**closed).count();
    eprintln!("N2 flood: 150 idle connections from one address, {held} held past 300 ms");
    assert_eq!(
        held, 16,
        "one address holds max_stream_connections_per_ip, the rest closed at once"
    );
    // Meanwhile another client's Binding over TCP is answered.
    let mut other = TcpStream::connect(tcp).await.expect("connect");
    let c = Client::valid(s.addr, "bob").await;
    let r = tokio::time::timeout(
        Duration::from_secs(2),
        ask(&mut other, &c.build(METHOD_BINDING, Vec::new(), false)),
    )
    .await
    .expect("answered during the flood");
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE);
    assert!(started.elapsed() < Duration::from_secs(2));
    // The held ones said nothing: closed after `stream_first_message_within_ms`.
    for c in &mut flood {
        assert!(closed_within(c, Duration::from_secs(2)).await, "silent: closed");
    }
    // Not STUN first: closed at once.
    let mut junk = TcpStream::connect(tcp).await.expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut junk, &[0u8; 32])
        .await
        .expect("write");
    assert!(
        closed_within(&mut junk, Duration::from_millis(500)).await,
        "a first frame that is not STUN"
    );
}

/// TCP connections are capped, and one that holds no allocation is closed after
/// `stream_allocate_within_s`; one with an allocation stays.
#[tokio::test]
async fn idle_and_excess_tcp_connections_are_closed() {
    use tokio::net::TcpStream;

    let s = start(config(|e| {
        e.listen_tcp = Some("127.0.0.1:0".parse().expect("addr"));
        e.max_stream_connections = 2;
        e.stream_allocate_within_s = 1;
    }));
    let tcp = s.tcp.expect("tcp listener");

    let mut first = TcpStream::connect(tcp).await.expect("connect");
    let mut second = TcpStream::connect(tcp).await.expect("connect");
    let mut third = TcpStream::connect(tcp).await.expect("connect");
    assert!(
        closed_within(&mut third, Duration::from_millis(500)).await,
        "over the cap: closed at once"
    );
    let started = std::time::Instant::now();
    assert!(
        closed_within(&mut first, Duration::from_secs(3)).await,
        "no allocation: closed"
    );
    assert!(started.elapsed() >= Duration::from_millis(500), "not before its time");
    assert!(closed_within(&mut second, Duration::from_secs(3)).await);

    // One that allocates over TCP outlives the limit.
    let mut conn = TcpStream::connect(tcp).await.expect("connect");
    let mut c = Client::valid(s.addr, "alice").await;
    let transport = || vec![setter(Raw(ATTR_REQUESTED_TRANSPORT, vec![17, 0, 0, 0]))];
    let challenge = ask(&mut conn, &c.build(METHOD_ALLOCATE, transport(), false)).await;
    assert_eq!(code(&challenge), Some(401));
    c.creds.learn(&challenge);
    let r = ask(&mut conn, &c.build(METHOD_ALLOCATE, transport(), true)).await;
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE, "{:?}", code(&r));
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let r = ask(&mut conn, &c.build(METHOD_BINDING, Vec::new(), false)).await;
    assert_eq!(r.typ.class, CLASS_SUCCESS_RESPONSE, "still open after the limit");
}
