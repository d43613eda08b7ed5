//! The embedded TURN/STUN server (`[turn] mode = "embedded"`).
//!
//! Browsers behind symmetric NATs or UDP-blocking firewalls, and GPU boxes behind NAT, reach each
//! other through a relayed address on the VPS: the client allocates a UDP port here (Allocate),
//! says which peers may use it (CreatePermission / ChannelBind), and the server forwards between
//! them. Clients reach the server over UDP, TCP, or TLS (a browser that can only make HTTPS-like
//! connections uses `turns:` on 443 or 5349, with the relay's certificate).
//!
//! Why our own server rather than a crate's: `turn` 0.17 (webrtc-rs) is UDP only, answers a wrong
//! password with 400, relays to loopback and has no hook to refuse a peer with 403; the protocol
//! codecs it and `stun` provide are used here, the server logic (the safety rules below, quotas,
//! TCP/TLS framing) is ours.
//!
//! Safety, since a TURN server is an authenticated proxy:
//! - credentials are coturn REST-API ones minted by the relay with a short TTL ([`auth`]);
//! - peers in special-purpose ranges and the server's own addresses are refused with 403 unless
//!   allow-listed, IPv4-mapped spellings canonicalised first ([`avatar_proto::netfilter`]);
//! - allocations per credential and in total are capped (486/508), each allocation's bandwidth is
//!   capped per direction, and 401 answers are rate-limited per source address;
//! - TCP/TLS connections are capped in number, in total and per source address, one that sends
//!   no STUN message within `stream_first_message_within_ms` or has not allocated within
//!   `stream_allocate_within_s` is closed, so idle connections cannot exhaust the descriptors the
//!   relay's signaling needs, nor one address the slots that browsers without UDP depend on.
//!
//! Layout: [`core`] is the control plane, a state machine with no I/O (bytes and the time in,
//! what to send out; tested in memory in `relay/tests/turn_core.rs`); [`server`] carries out its
//! decisions with sockets and tasks; this module binds the listening sockets and runs the
//! listeners, each of which stops when the relay's shutdown token fires.

pub mod auth;
pub mod core;
pub mod server;

use crate::config::TurnConfig;
use crate::tls::ServerCerts;
use bytes::BytesMut;
use server::{ClientTx, FiveTuple, Server, Transport};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, UdpSocket};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// A TCP/TLS connection with an allocation that sends nothing for this long is closed (its
/// allocation goes with it).
const STREAM_IDLE: Duration = Duration::from_secs(300);
/// A TLS handshake must finish within this.
const TLS_HANDSHAKE: Duration = Duration::from_secs(10);
/// Frames queued towards one TCP/TLS client before further data is dropped.
const STREAM_QUEUE: usize = 512;
/// TCP/TLS connections from IPv6 are counted per network of this size (one subscriber's).
const STREAM_V6_PREFIX: u8 = 64;

#[derive(Debug, thiserror::Error)]
pub enum TurnError {
    #[error("binding TURN {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("TURN TLS: {0}")]
    Tls(#[from] crate::tls::TlsError),
}

/// A UDP socket with SO_REUSEPORT (for several receive loops on one port) and big buffers.
pub(crate) fn bind_udp(addr: SocketAddr, buffer: usize, reuse_port: bool) -> std::io::Result<std::net::UdpSocket> {
    use socket2::{Domain, Protocol, Socket, Type};
    let socket = Socket::new(Domain::for_address(addr), Type::DGRAM, Some(Protocol::UDP))?;
    if reuse_port {
        socket.set_reuse_port(true)?;
    }
    // Best effort: the kernel caps these at net.core.{r,w}mem_max.
    let _ = socket.set_recv_buffer_size(buffer);
    let _ = socket.set_send_buffer_size(buffer);
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    Ok(socket.into())
}

/// The embedded TURN server with its sockets bound.
pub struct TurnServer {
    server: Arc<Server>,
    udp: Vec<std::net::UdpSocket>,
    tcp: Option<std::net::TcpListener>,
    tls: Option<(std::net::TcpListener, Arc<rustls::ServerConfig>)>,
    shutdown: CancellationToken,
}

fn bind_tcp(addr: SocketAddr, what: &'static str) -> Result<std::net::TcpListener, TurnError> {
    crate::limits::listen_tcp(addr).map_err(|source| TurnError::Bind { what, addr, source })
}

impl TurnServer {
    /// Bind every configured listener. `secret` mints and checks the credentials; `own` are the
    /// relay's other addresses (denied as peers).
    pub fn bind(
        cfg: &TurnConfig,
        certs: &ServerCerts,
        own: &[IpAddr],
        shutdown: CancellationToken,
    ) -> Result<Self, TurnError> {
        let e = &cfg.embedded;
        let mut udp = Vec::new();
        if let Some(addr) = e.listen_udp {
            // One receive loop per core, on one port (the kernel spreads clients by address).
            let loops = std::thread::available_parallelism().map_or(1, |n| n.get()).clamp(1, 8);
            let err = |source| TurnError::Bind {
                what: "UDP",
                addr,
                source,
            };
            let first = bind_udp(addr, e.socket_buffer_bytes, true).map_err(err)?;
            let bound = first.local_addr().map_err(err)?;
            udp.push(first);
            for _ in 1..loops {
                udp.push(bind_udp(bound, e.socket_buffer_bytes, true).map_err(err)?);
            }
        }
        let tcp = e.listen_tcp.map(|a| bind_tcp(a, "TCP")).transpose()?;
        let tls = match e.listen_tls {
            Some(a) => {
                let config = certs.server_config(false, Vec::new())?;
                Some((bind_tcp(a, "TLS")?, Arc::new(config)))
            }
            None => None,
        };
        let mut own = own.to_vec();
        own.extend(udp.iter().filter_map(|s| s.local_addr().ok()).map(|a| a.ip()));
        Ok(Self {
            server: Arc::new(Server::new(e.clone(), cfg.secret.expose(), &own, shutdown.clone())),
            udp,
            tcp,
            tls,
            shutdown,
        })
    }

    pub fn udp_addr(&self) -> Option<SocketAddr> {
        self.udp.first().and_then(|s| s.local_addr().ok())
    }

    pub fn tcp_addr(&self) -> Option<SocketAddr> {
        self.tcp.as_ref().and_then(|s| s.local_addr().ok())
    }

    pub fn tls_addr(&self) -> Option<SocketAddr> {
        self.tls.as_ref().and_then(|(s, _)| s.local_addr().ok())
    }

    /// The shared state, for counters.
    pub fn server(&self) -> Arc<Server> {
        Arc::clone(&self.server)
    }

    /// Serve until shutdown.
    pub async fn run(self) {
        let Self {
            server,
            udp,
            tcp,
            tls,
            shutdown,
        } = self;
        let mut tasks = tokio::task::JoinSet::new();
        for socket in udp {
            match UdpSocket::from_std(socket) {
                Ok(s) => {
                    tasks.spawn(udp_loop(Arc::clone(&server), Arc::new(s), shutdown.clone()));
                }
                Err(e) => tracing::error!(error = %e, "TURN UDP socket"),
            }
        }
        // TCP and TLS connections share one count: the caps are per address and in total,
        // whichever port they use.
        let open = Arc::new(crate::limits::OpenCounts::default());
        if let Some(l) = tcp.and_then(|l| TcpListener::from_std(l).ok()) {
            tasks.spawn(accept_loop(
                Arc::clone(&server),
                l,
                None,
                Arc::clone(&open),
                shutdown.clone(),
            ));
        }
        if let Some((l, config)) = tls {
            if let Ok(l) = TcpListener::from_std(l) {
                let acceptor = tokio_rustls::TlsAcceptor::from(config);
                tasks.spawn(accept_loop(
                    Arc::clone(&server),
                    l,
                    Some(acceptor),
                    open,
                    shutdown.clone(),
                ));
            }
        }
        let sweeper = {
            let (server, shutdown) = (Arc::clone(&server), shutdown.clone());
            async move {
                // Expiries (allocations, permissions, channels) with a second's resolution.
                let mut tick = tokio::time::interval(Duration::from_secs(1));
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tick.tick() => server.tick(),
                    }
                }
            }
        };
        tasks.spawn(sweeper);
        while tasks.join_next().await.is_some() {}
    }
}

async fn udp_loop(server: Arc<Server>, socket: Arc<UdpSocket>, shutdown: CancellationToken) {
    let Ok(local) = socket.local_addr() else { return };
    let tx = ClientTx::Udp(Arc::clone(&socket));
    let mut buf = vec![0u8; server::MAX_DATAGRAM];
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, from)) => {
                    let five = FiveTuple { client: from, server: local, transport: Transport::Udp };
                    server.handle(five, &tx, &buf[..n]);
                }
                // ICMP port unreachable from an earlier answer: not this socket's problem.
                Err(_) => tokio::task::yield_now().await,
            }
        }
    }
}

async fn accept_loop(
    server: Arc<Server>,
    listener: TcpListener,
    tls: Option<tokio_rustls::TlsAcceptor>,
    open: Arc<crate::limits::OpenCounts>,
    shutdown: CancellationToken,
) {
    let Ok(local) = listener.local_addr() else { return };
    let (total, per_ip) = (
        server.config().max_stream_connections,
        server.config().max_stream_connections_per_ip,
    );
    let mut conns = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = conns.join_next(), if !conns.is_empty() => {}
            r = listener.accept() => {
                let Ok((stream, peer)) = r else { continue };
                let key = crate::limits::client_key(peer.ip(), STREAM_V6_PREFIX);
                let slot = match open.try_open(Some(key), per_ip, total) {
                    Ok(slot) => slot,
                    Err(refused) => {
                        // Dropping the stream closes it: an idle-connection flood cannot use up
                        // the relay's file descriptors (which its signaling needs too), nor one
                        // address every slot that browsers without UDP depend on.
                        metrics::counter!("relay_turn_connections_refused_total", "reason" => refused.as_str()).increment(1);
                        tracing::debug!(%peer, reason = refused.as_str(), "TURN stream connection refused: at the cap");
                        continue;
                    }
                };
                let _ = stream.set_nodelay(true);
                let (server, shutdown, tls) = (Arc::clone(&server), shutdown.clone(), tls.clone());
                conns.spawn(async move {
                    let _slot = slot;
                    let transport = if tls.is_some() { Transport::Tls } else { Transport::Tcp };
                    let five = FiveTuple { client: peer, server: local, transport };
                    match tls {
                        None => serve_stream(server, stream, five, shutdown).await,
                        Some(acceptor) => match tokio::time::timeout(TLS_HANDSHAKE, acceptor.accept(stream)).await {
                            Ok(Ok(s)) => serve_stream(server, s, five, shutdown).await,
                            Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TURN TLS handshake failed"),
                            Err(_) => tracing::debug!(%peer, "TURN TLS handshake timed out"),
                        },
                    }
                });
            }
        }
    }
    conns.shutdown().await;
}

/// Whether a frame is a STUN message: the top two bits clear and the magic cookie (RFC 5389 §6).
fn is_stun(frame: &[u8]) -> bool {
    frame.len() >= 20 && frame[0] >> 6 == 0 && frame[4..8] == [0x21, 0x12, 0xA4, 0x42]
}

/// One TCP or TLS client: split the byte stream into frames; write answers from a queue.
pub(crate) async fn serve_stream<S>(server: Arc<Server>, stream: S, five: FiveTuple, shutdown: CancellationToken)
where
    S: AsyncRead + AsyncWrite + Send + Unpin + 'static,
{
    let (mut rd, mut wr) = tokio::io::split(stream);
    let (tx, mut rx) = mpsc::channel::<bytes::Bytes>(STREAM_QUEUE);
    let writer = tokio::spawn(async move {
        while let Some(frame) = rx.recv().await {
            if wr.write_all(&frame).await.is_err() {
                break;
            }
        }
        let _ = wr.shutdown().await;
    });
    let client = ClientTx::Stream(tx);
    let mut buf = BytesMut::with_capacity(8192);
    let opened = tokio::time::Instant::now();
    let allocate_within = Duration::from_secs(server.config().stream_allocate_within_s);
    let first_within = Duration::from_millis(server.config().stream_first_message_within_ms);
    let mut heard = false;
    'conn: loop {
        loop {
            match avatar_proto::tunnel::turn_frame_len(&buf) {
                Err(()) => break 'conn,
                Ok(Some(n)) if buf.len() >= n => {
                    let frame = buf.split_to(n);
                    // A connection opens with STUN (a Binding or an Allocate): anything else
                    // first is not a TURN client.
                    if !heard && !is_stun(&frame) {
                        break 'conn;
                    }
                    heard = true;
                    server.handle(five, &client, &frame);
                }
                _ => break,
            }
        }
        // A connection gets `stream_first_message_within_ms` to say something, and without an
        // allocation only `stream_allocate_within_s` from its start.
        let idle = if server.has_allocation(&five) {
            STREAM_IDLE
        } else {
            let within = if heard {
                allocate_within
            } else {
                first_within.min(allocate_within)
            };
            match within.checked_sub(opened.elapsed()) {
                Some(left) if !left.is_zero() => left,
                _ => break,
            }
        };
        tokio::select! {
            _ = shutdown.cancelled() => break,
            r = tokio::time::timeout(idle, rd.read_buf(&mut buf)) => match r {
                Ok(Ok(n)) if n > 0 => {}
                _ => break,
            }
        }
    }
    // Closing the connection deletes its allocation (RFC 6062 §5.2 / RFC 8656 §2.2).
    server.remove(&five);
    drop(client);
    let _ = writer.await;
}
