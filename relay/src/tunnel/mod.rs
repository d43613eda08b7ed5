//! The relay's end of the worker tunnels: a QUIC listener, TLS/TCP tunnels handed over by the
//! HTTPS listener ([`tcp`]), the handshake, the control stream.
//!
//! Both transports run the same handshake and control loop over tokio byte streams; what differs
//! is where the streams come from (QUIC's own, or yamux over TLS) and, on TCP, that the relay
//! pings the worker itself (TCP has no QUIC idle timer to notice a dead path, and the pings give
//! routing its round-trip time). On either, streams the worker opens after registration carry its
//! sessions' TURN ([`StreamHeader::Turn`]) to the embedded TURN server.
//!
//! Each accepted connection gets its own task, owned by a `TaskTracker` so shutdown can wait for
//! all of them. The handshake runs inside that task under a deadline, never in the accept loop,
//! so one slow or hostile worker cannot stall others. Once registered, the task watches the
//! control stream (ping/pong, draining) until the connection ends, then unregisters the worker
//! unless a newer tunnel from the same worker id has already replaced it.
//!
//! Before a worker has proved its key it is anonymous, and anyone can start a QUIC handshake or
//! open a TLS connection with the tunnel ALPN. What it may cost is bounded:
//! - at most `max_pending_handshakes` connections are between accept and registration at once,
//!   QUIC and TLS/TCP together, and one source address holds at most
//!   `max_pending_handshakes_per_ip` of them, so one address cannot lock workers out; addresses
//!   workers registered from have a pool of their own ([`PendingHandshakes`]), so many
//!   addresses cannot either;
//! - above `retry_above_pending` a QUIC client must first prove its address with a stateless
//!   Retry (only a proven address is charged to its source, so a spoofed one cannot use up
//!   someone else's share);
//! - the hello must come within `hello_timeout_ms`, the whole handshake within
//!   `handshake_timeout_ms`;
//! - a worker may open two streams (its control stream and a spare; session streams are the
//!   relay's) and no unidirectional ones, and the receive windows are bounded, so unread data
//!   cannot pile up. Only once registered may it open more: one TURN stream per session.
//!
//! Who may register under an id ([`crate::config::TunnelConfig::credential`]): an id listed in
//! `[[tunnel.workers]]` proves its own key and no other, so a box holding another key (the fleet
//! secret included) cannot take it over; ids not listed prove the shared `tunnel.secret`, when
//! one is set, which trusts every box that holds it alike. Either way, a worker's declared
//! capacity is capped per id, so no box can draw every new session to itself.

pub mod tcp;

use crate::conn::{self, RecvHalf, SendHalf, TcpTunnel};
use crate::limits::{OpenCounts, OpenGuard, Refused};
use crate::registry::{SessionSlot, WorkerHandle};
use crate::tls::ServerCerts;
use crate::turn::server::Server as TurnServer;
use crate::AppState;
use avatar_proto::mux::{self, Incoming, MuxError, MuxStream};
use avatar_proto::stream::{recv_frame_exact, send_frame, FramedRecv, StreamError};
use avatar_proto::tunnel::{
    session_stream_limit, valid_worker_id, verify_auth_proof, Control, Registration, SessionFrame, SessionOpen,
    StreamHeader, ALPN, EXPORTER_LABEL, EXPORTER_LEN, NONCE_LEN, PROTOCOL_VERSION,
};
use rand::RngCore;
use serde::de::DeserializeOwned;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

pub use crate::conn::{Transport, TunnelConn};
pub use avatar_proto::tunnel::close_code;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("{0}")]
    Open(#[from] conn::OpenError),
    #[error("{0}")]
    Mux(#[from] MuxError),
    #[error("{0}")]
    Stream(#[from] StreamError),
    #[error("protocol: {0}")]
    Protocol(String),
    /// Refused on purpose; the text is sent to the worker as the close reason.
    #[error("{0}")]
    Rejected(String),
    #[error("timed out")]
    Timeout,
}

/// The next handshake message, which must be there: the stream ending first is a protocol
/// error. Read exactly, so that on TCP nothing of what follows the handshake is taken.
async fn expect<T: DeserializeOwned, R: AsyncRead + Unpin>(recv: &mut R, what: &str) -> Result<T, TunnelError> {
    recv_frame_exact(recv)
        .await?
        .ok_or_else(|| TunnelError::Protocol(format!("stream ended before {what}")))
}

/// Bidirectional streams a worker may open at once: its control stream, and one more so that a
/// control stream being replaced never blocks the next.
const WORKER_OPENED_STREAMS: u32 = 2;

/// Build the QUIC endpoint workers dial.
pub fn endpoint(
    listen: SocketAddr,
    certs: &ServerCerts,
    cfg: &crate::config::TunnelConfig,
) -> Result<quinn::Endpoint, crate::RelayError> {
    let idle_timeout = Duration::from_millis(cfg.idle_timeout_ms);
    let keepalive = Duration::from_millis(cfg.keepalive_ms);
    let tls = certs.server_config(true, vec![ALPN.to_vec()])?;
    let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls)
        .map_err(|e| crate::RelayError::Quic(format!("TLS config unusable for QUIC: {e}")))?;
    let mut server = quinn::ServerConfig::with_crypto(Arc::new(crypto));
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(idle_timeout).map_err(|e| crate::RelayError::Quic(e.to_string()))?,
        ))
        .keep_alive_interval(Some(keepalive))
        // Session streams are opened by the relay (the worker's limit bounds those); the worker
        // itself opens only its control stream.
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(WORKER_OPENED_STREAMS))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0))
        .receive_window(quinn::VarInt::from_u32(cfg.receive_window_bytes))
        .stream_receive_window(quinn::VarInt::from_u32(cfg.stream_receive_window_bytes));
    server.transport_config(Arc::new(transport));
    // Incoming connections the endpoint itself buffers before the accept loop sees them.
    server.max_incoming(cfg.max_pending_handshakes.max(1));
    quinn::Endpoint::server(server, listen).map_err(|source| crate::RelayError::Bind {
        what: "tunnel (UDP)",
        addr: listen,
        source,
    })
}

/// Connections between accept and registration, counted until registered or gone, in two pools.
///
/// Anyone may start a handshake, so one pool is for anonymous addresses; an attacker with a few
/// addresses (or an IPv6 /56) can fill it however it is shared. Workers reconnect from addresses
/// they registered from before, and those get a pool of their own: a relay under such a flood
/// keeps its workers. An address counts as a worker's for [`KNOWN_FOR`] after a registration
/// from it, and only once proven (TCP, or QUIC after a Retry or its handshake), since a QUIC
/// Initial can name any address. Each pool holds `max_pending_handshakes`, and one address at
/// most `max_pending_handshakes_per_ip` of it. A trusted proxy (`limits.trusted_proxies`, e.g.
/// an L4 pass-through for 443) carries many workers and is counted in the total only.
#[derive(Default)]
struct PendingHandshakes {
    anonymous: Arc<OpenCounts>,
    workers: Arc<OpenCounts>,
    known: std::sync::Mutex<std::collections::HashMap<IpAddr, Instant>>,
}

/// How long an address stays a worker's after it registered.
const KNOWN_FOR: Duration = Duration::from_secs(24 * 3600);
/// Addresses remembered at most (a fleet's egress addresses; further ones are not remembered).
const KNOWN_MAX: usize = 4096;

impl PendingHandshakes {
    /// The key `remote` is counted under; `None` for a trusted proxy.
    fn key(remote: SocketAddr, state: &AppState) -> Option<IpAddr> {
        state.connection_key(remote.ip())
    }

    fn known(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<IpAddr, Instant>> {
        // Only timestamps are held under this lock; a panic elsewhere leaves them consistent.
        self.known.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn is_known(&self, key: IpAddr) -> bool {
        self.known().get(&key).is_some_and(|at| at.elapsed() < KNOWN_FOR)
    }

    /// A worker registered from `remote`.
    fn remember(&self, remote: SocketAddr, state: &AppState) {
        let Some(key) = Self::key(remote, state) else { return };
        let mut known = self.known();
        if known.len() >= KNOWN_MAX && !known.contains_key(&key) {
            known.retain(|_, at| at.elapsed() < KNOWN_FOR);
            if known.len() >= KNOWN_MAX {
                return;
            }
        }
        known.insert(key, Instant::now());
    }

    /// Whether a QUIC client whose address is not proven must prove it first (a stateless
    /// Retry): past `retry_above_pending` anonymous handshakes, and always to enter the workers'
    /// pool.
    fn wants_retry(&self, remote: SocketAddr, state: &AppState) -> bool {
        self.anonymous.total() >= state.config.tunnel.retry_above_pending
            || Self::key(remote, state).is_some_and(|k| self.is_known(k))
    }

    /// Count a new connection, or refuse it. An unproven address is counted in the anonymous
    /// total only (it may be spoofed); [`OpenGuard::charge`] charges it once proven.
    fn admit(&self, remote: SocketAddr, validated: bool, state: &AppState) -> Result<OpenGuard, Refused> {
        let cfg = &state.config.tunnel;
        let (per_ip, total) = (cfg.max_pending_handshakes_per_ip, cfg.max_pending_handshakes);
        match Self::key(remote, state) {
            Some(key) if validated && self.is_known(key) => self.workers.try_open(Some(key), per_ip, total),
            key => self.anonymous.try_open(key.filter(|_| validated), per_ip, total),
        }
    }
}

fn refused_pending(state: &AppState, remote: SocketAddr, refused: Refused) {
    metrics::counter!("relay_tunnel_handshakes_refused_total", "reason" => refused.as_str()).increment(1);
    if state.log_refusal() {
        info!(%remote, reason = refused.as_str(), "tunnel refused: too many unauthenticated connections");
    }
}

/// Where tunnels come from, and what serving them needs besides the relay's state.
pub struct Listeners {
    /// QUIC tunnels.
    pub endpoint: quinn::Endpoint,
    /// TLS/TCP tunnels, handed over by the HTTPS listener after the TLS handshake.
    pub tcp: mpsc::Receiver<tcp::TcpAccepted>,
    /// The embedded TURN server, which TURN streams from TCP workers are fed to.
    pub turn: Option<Arc<TurnServer>>,
}

/// What every tunnel task shares.
struct Shared {
    state: Arc<AppState>,
    shutdown: CancellationToken,
    turn: Option<Arc<TurnServer>>,
    /// Five-tuples for TURN streams (see [`serve_turn_stream`]).
    turn_streams: TurnStreamIds,
    /// Connections that have not registered yet.
    pending: PendingHandshakes,
}

/// Accept tunnels until `shutdown`, then close every connection and wait for them to go idle.
pub async fn serve(listeners: Listeners, state: Arc<AppState>, shutdown: CancellationToken) {
    let Listeners {
        endpoint,
        tcp: mut tcp_tunnels,
        turn,
    } = listeners;
    let tasks = TaskTracker::new();
    let shared = Arc::new(Shared {
        state: Arc::clone(&state),
        shutdown: shutdown.clone(),
        turn,
        turn_streams: TurnStreamIds::default(),
        pending: PendingHandshakes::default(),
    });
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let remote = incoming.remote_address();
                let validated = incoming.remote_address_validated();
                if !validated && incoming.may_retry() && shared.pending.wants_retry(remote, &state) {
                    metrics::counter!("relay_tunnel_handshakes_refused_total", "reason" => "retry").increment(1);
                    let _ = incoming.retry();
                    continue;
                }
                let guard = match shared.pending.admit(remote, validated, &state) {
                    Ok(guard) => guard,
                    Err(refused) => {
                        refused_pending(&state, remote, refused);
                        incoming.refuse();
                        continue;
                    }
                };
                let shared = Arc::clone(&shared);
                tasks.spawn(
                    async move {
                        if let Err(e) = handle_quic(incoming, &shared, guard).await {
                            info!(error = %e, "tunnel ended");
                        }
                    }
                    .instrument(info_span!("tunnel", %remote, transport = "quic")),
                );
            }
            Some(accepted) = tcp_tunnels.recv() => {
                // The TLS handshake is done (the HTTPS listener bounded it); the address is
                // proven by TCP, so there is no Retry step: only the pending caps.
                let remote = accepted.remote;
                let guard = match shared.pending.admit(remote, true, &state) {
                    Ok(guard) => guard,
                    Err(refused) => {
                        refused_pending(&state, remote, refused);
                        continue;
                    }
                };
                let shared = Arc::clone(&shared);
                tasks.spawn(
                    async move {
                        if let Err(e) = handle_tcp(accepted, &shared, guard).await {
                            info!(error = %e, "tunnel ended");
                        }
                    }
                    .instrument(info_span!("tunnel", %remote, transport = "tcp")),
                );
            }
        }
    }
    tasks.close();
    endpoint.close(quinn::VarInt::from_u32(close_code::SHUTDOWN), b"relay shutting down");
    if tokio::time::timeout(Duration::from_secs(3), async {
        tasks.wait().await;
        endpoint.wait_idle().await;
    })
    .await
    .is_err()
    {
        warn!("tunnels did not close within 3 s");
    }
}

async fn handle_quic(incoming: quinn::Incoming, shared: &Shared, mut pending: OpenGuard) -> Result<(), TunnelError> {
    let state = &shared.state;
    // One deadline for the QUIC handshake and ours together.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(state.config.tunnel.handshake_timeout_ms);
    let conn = match tokio::time::timeout_at(deadline, incoming).await {
        Ok(conn) => conn?,
        Err(_) => {
            info!("QUIC handshake timed out");
            return Err(TunnelError::Timeout);
        }
    };
    // The handshake proved the address: from now on it counts against that address's share.
    if let Some(key) = PendingHandshakes::key(conn.remote_address(), state) {
        if let Err(refused) = pending.charge(key, state.config.tunnel.max_pending_handshakes_per_ip) {
            refused_pending(state, conn.remote_address(), refused);
            conn.close(
                quinn::VarInt::from_u32(close_code::REJECTED),
                b"too many unauthenticated connections from this address",
            );
            return Err(TunnelError::Rejected("too many unauthenticated connections".into()));
        }
    }
    let hello_by = tokio::time::Instant::now() + Duration::from_millis(state.config.tunnel.hello_timeout_ms);
    let handshake = async {
        // The worker's control stream arrives with its hello: both by the hello deadline.
        let (mut send, mut recv) = tokio::time::timeout_at(hello_by, conn.accept_bi())
            .await
            .map_err(|_| TunnelError::Protocol("no hello within tunnel.hello_timeout_ms".into()))??;
        let mut exporter = [0u8; EXPORTER_LEN];
        conn.export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
            .map_err(|_| TunnelError::Protocol("TLS exporter unavailable".into()))?;
        let registered = handshake(&mut send, &mut recv, &exporter, state, hello_by).await?;
        Ok::<_, TunnelError>((registered, send, recv))
    };
    let ((worker_id, registration), send, recv) = match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(done)) => {
            drop(pending);
            shared.pending.remember(conn.remote_address(), state);
            done
        }
        Ok(Err(e)) => {
            warn!(error = %e, "tunnel handshake failed");
            conn.close(
                quinn::VarInt::from_u32(close_code::REJECTED),
                truncate_reason(&e.to_string()),
            );
            return Err(e);
        }
        Err(_) => {
            warn!("tunnel handshake timed out");
            conn.close(quinn::VarInt::from_u32(close_code::REJECTED), b"handshake timed out");
            return Err(TunnelError::Timeout);
        }
    };
    // Authenticated: the worker may now open a TURN stream per session (`tunnel.turn_via_quic`).
    conn.set_max_concurrent_bi_streams(quinn::VarInt::from_u32(
        WORKER_OPENED_STREAMS.saturating_add(session_stream_limit(registration.capacity)),
    ));
    let worker = Arc::new(WorkerHandle::new(
        worker_id,
        registration,
        TunnelConn::Quic(conn.clone()),
        state.registry.next_generation(),
    ));
    let control = ControlStream::new(send, recv);
    let result = registered(shared, &worker, control, WorkerStreams::Quic(&conn)).await;
    if let Some(reason) = conn.close_reason() {
        info!(%reason, "tunnel closed");
    }
    result
}

async fn handle_tcp(accepted: tcp::TcpAccepted, shared: &Shared, pending: OpenGuard) -> Result<(), TunnelError> {
    let state = &shared.state;
    let deadline = tokio::time::Instant::now() + Duration::from_millis(state.config.tunnel.handshake_timeout_ms);
    let tcp::TcpAccepted { io, remote, exporter } = accepted;
    // The handshake runs on the TLS stream itself, before any multiplexing: an anonymous peer
    // costs one bounded frame at a time and no yamux state.
    let (mut recv, mut send) = tokio::io::split(io);
    let hello_by = tokio::time::Instant::now() + Duration::from_millis(state.config.tunnel.hello_timeout_ms);
    let (worker_id, registration) =
        match tokio::time::timeout_at(deadline, handshake(&mut send, &mut recv, &exporter, state, hello_by)).await {
            Ok(Ok(done)) => done,
            Ok(Err(e)) => {
                warn!(error = %e, "tunnel handshake failed");
                return Err(e);
            }
            Err(_) => {
                warn!("tunnel handshake timed out");
                return Err(TunnelError::Timeout);
            }
        };
    let io = recv.unsplit(send);
    // Session streams (the relay's), TURN streams and the control stream (the worker's).
    let limit = session_stream_limit(registration.capacity) as usize;
    let (mux, mut incoming, driver) = mux::start(io, mux::Side::Server, 2 * limit + 2, 16);
    let driver = tokio::spawn(driver);
    // The worker's first stream is its control stream.
    let control = match tokio::time::timeout_at(deadline, first_control_stream(&mut incoming)).await {
        Ok(Ok(stream)) => {
            drop(pending);
            shared.pending.remember(remote, state);
            stream
        }
        Ok(Err(e)) => {
            mux.close();
            return Err(e);
        }
        Err(_) => {
            mux.close();
            return Err(TunnelError::Timeout);
        }
    };
    let tunnel = Arc::new(TcpTunnel::new(mux.clone(), remote));
    let worker = Arc::new(WorkerHandle::new(
        worker_id,
        registration,
        TunnelConn::Tcp(Arc::clone(&tunnel)),
        state.registry.next_generation(),
    ));
    let (recv, send) = tokio::io::split(control);
    let result = registered(
        shared,
        &worker,
        ControlStream::new(send, recv),
        WorkerStreams::Tcp(&tunnel, &mut incoming),
    )
    .await;
    mux.close();
    let _ = driver.await;
    result
}

async fn first_control_stream(incoming: &mut Incoming) -> Result<MuxStream, TunnelError> {
    let mut stream = incoming
        .recv()
        .await
        .ok_or_else(|| TunnelError::Protocol("tunnel closed before its control stream".into()))?;
    match expect::<StreamHeader, _>(&mut stream, "the stream header").await? {
        StreamHeader::Control => Ok(stream),
        other => Err(TunnelError::Protocol(format!(
            "expected the control stream first, got {other:?}"
        ))),
    }
}

fn truncate_reason(s: &str) -> &[u8] {
    let b = s.as_bytes();
    &b[..b.len().min(200)]
}

/// Hello, challenge, proof and registration, on any byte stream. Refusals are sent to the worker
/// as `Rejected` before the error returns.
async fn handshake<S: AsyncWrite + Unpin, R: AsyncRead + Unpin>(
    send: &mut S,
    recv: &mut R,
    exporter: &[u8; EXPORTER_LEN],
    state: &AppState,
    hello_by: tokio::time::Instant,
) -> Result<(String, Registration), TunnelError> {
    // An anonymous peer gets a short while to say who it is, not the whole handshake deadline.
    let hello = tokio::time::timeout_at(hello_by, expect::<Control, _>(recv, "hello"))
        .await
        .map_err(|_| TunnelError::Protocol("no hello within tunnel.hello_timeout_ms".into()))?;
    let (protocol, worker_id) = match hello? {
        Control::Hello {
            protocol, worker_id, ..
        } => (protocol, worker_id),
        other => return Err(TunnelError::Protocol(format!("expected hello, got {other:?}"))),
    };
    let reject = TunnelError::Rejected;
    if protocol != PROTOCOL_VERSION {
        let reason = format!("protocol {protocol} not supported; this relay speaks {PROTOCOL_VERSION}");
        send_frame(send, &Control::Rejected { reason: reason.clone() }).await?;
        return Err(reject(reason));
    }
    if !valid_worker_id(&worker_id) {
        let reason = "worker id must be 1-64 characters of [A-Za-z0-9-_.:]".to_owned();
        send_frame(send, &Control::Rejected { reason: reason.clone() }).await?;
        return Err(reject(reason));
    }
    let mut nonce = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    let nonce = hex::encode(nonce);
    send_frame(
        send,
        &Control::Challenge {
            protocol: PROTOCOL_VERSION,
            relay_id: state.config.relay_id.clone(),
            nonce: nonce.clone(),
        },
    )
    .await?;
    let proof = match expect::<Control, _>(recv, "auth").await? {
        Control::Auth { proof } => proof,
        other => return Err(TunnelError::Protocol(format!("expected auth, got {other:?}"))),
    };
    // A listed id proves its own key and nothing else; an unlisted one the shared secret, if
    // any. Either way the refusal reads the same, so a prober learns nothing about the list.
    let credential = state.config.tunnel.credential(&worker_id);
    let proven = credential.is_some_and(|c| {
        !c.key.is_empty() && verify_auth_proof(c.key.as_bytes(), &nonce, &worker_id, exporter, &proof)
    });
    let Some(credential) = credential.filter(|_| proven) else {
        warn!(%worker_id, "worker failed authentication");
        send_frame(
            send,
            &Control::Rejected {
                reason: "authentication failed".into(),
            },
        )
        .await?;
        return Err(reject("authentication failed".into()));
    };
    let mut registration = match expect::<Control, _>(recv, "register").await? {
        Control::Register(r) => r,
        other => return Err(TunnelError::Protocol(format!("expected register, got {other:?}"))),
    };
    if registration.capacity == 0
        || registration.capacity > avatar_proto::tunnel::MAX_WORKER_CAPACITY
        || registration.avatars.len() > avatar_proto::tunnel::MAX_WORKER_AVATARS
    {
        let reason = format!(
            "capacity must be 1..={} and at most {} avatars",
            avatar_proto::tunnel::MAX_WORKER_CAPACITY,
            avatar_proto::tunnel::MAX_WORKER_AVATARS
        );
        send_frame(send, &Control::Rejected { reason: reason.clone() }).await?;
        return Err(reject(reason));
    }
    // Routing believes a worker's capacity: a box may not claim more than its id is allowed.
    if registration.capacity > credential.max_capacity {
        warn!(
            %worker_id,
            declared = registration.capacity,
            allowed = credential.max_capacity,
            own_key = credential.own,
            "worker capacity capped (tunnel.max_capacity_per_worker or its max_capacity)"
        );
        registration.capacity = credential.max_capacity;
    }
    // Display names reach web pages: only for announced ids, and short.
    let announced = std::mem::take(&mut registration.avatar_names);
    registration.avatar_names = announced
        .into_iter()
        .filter(|(id, _)| registration.avatars.contains(id))
        .map(|(id, name)| {
            (
                id,
                name.chars().take(avatar_proto::tunnel::MAX_AVATAR_NAME_LEN).collect(),
            )
        })
        .collect();
    // Previews are served to web pages as images: only for announced ids, and only small JPEGs.
    let previews = std::mem::take(&mut registration.avatar_previews);
    registration.avatar_previews = previews
        .into_iter()
        .filter(|(id, preview)| registration.avatars.contains(id) && crate::avatars::preview_bytes(preview).is_some())
        .collect();
    send_frame(
        send,
        &Control::Registered {
            relay_id: state.config.relay_id.clone(),
            load_reports: true,
        },
    )
    .await?;
    Ok((worker_id, registration))
}

/// A control stream as the control loop uses it.
struct ControlStream {
    send: SendHalf,
    recv: FramedRecv<RecvHalf>,
}

impl ControlStream {
    fn new(send: impl AsyncWrite + Send + Unpin + 'static, recv: impl AsyncRead + Send + Unpin + 'static) -> Self {
        Self {
            send: Box::new(send),
            recv: FramedRecv::new(Box::new(recv)),
        }
    }
}

/// Streams the worker opens after registration (its TURN streams), on either transport.
enum WorkerStreams<'a> {
    Quic(&'a quinn::Connection),
    Tcp(&'a Arc<TcpTunnel>, &'a mut Incoming),
}

impl WorkerStreams<'_> {
    /// The next stream the worker opened; `None` when the tunnel has ended.
    async fn next(&mut self) -> Option<Box<dyn tcp::Io>> {
        match self {
            WorkerStreams::Quic(conn) => {
                let (send, recv) = conn.accept_bi().await.ok()?;
                Some(Box::new(tokio::io::join(recv, send)))
            }
            WorkerStreams::Tcp(_, incoming) => Some(Box::new(incoming.recv().await?)),
        }
    }

    fn tcp(&self) -> Option<&Arc<TcpTunnel>> {
        match self {
            WorkerStreams::Quic(_) => None,
            WorkerStreams::Tcp(tunnel, _) => Some(tunnel),
        }
    }
}

/// Register the worker, run its control loop until the tunnel ends, then unregister it.
async fn registered(
    shared: &Shared,
    worker: &Arc<WorkerHandle>,
    control: ControlStream,
    streams: WorkerStreams<'_>,
) -> Result<(), TunnelError> {
    let state = &shared.state;
    let transport = worker.connection.transport().as_str();
    let span = info_span!("worker", worker_id = %worker.id, transport);
    async {
        metrics::counter!("relay_tunnel_registrations_total", "transport" => transport).increment(1);
        if let Some(old) = state.registry.insert(Arc::clone(worker)) {
            info!(
                old_generation = old.generation,
                old_transport = old.connection.transport().as_str(),
                "replaced the registration of the same worker"
            );
        }
        info!(
            avatars = ?worker.registration.avatars,
            capacity = worker.registration.capacity,
            "worker registered"
        );
        let result = control_loop(shared, worker, control, streams).await;
        if state.registry.remove(&worker.id, worker.generation) {
            info!("worker unregistered");
        }
        result
    }
    .instrument(span)
    .await
}

async fn control_loop(
    shared: &Shared,
    worker: &WorkerHandle,
    mut control: ControlStream,
    mut streams: WorkerStreams<'_>,
) -> Result<(), TunnelError> {
    let cfg = &shared.state.config.tunnel;
    let idle = Duration::from_millis(cfg.idle_timeout_ms);
    let mut ping = tokio::time::interval(Duration::from_millis(cfg.keepalive_ms));
    ping.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let started = Instant::now();
    let mut last_heard = Instant::now();
    let mut seq = 0u64;
    // Over QUIC the transport's own keep-alive and idle timer watch the path.
    let pinging = streams.tcp().is_some();
    let turn_streams = TaskTracker::new();
    let remote = worker.connection.remote_address();
    let result = loop {
        let incoming = streams.next();
        let tick = async {
            if pinging {
                ping.tick().await
            } else {
                std::future::pending().await
            }
        };
        tokio::select! {
            _ = shared.shutdown.cancelled() => {
                worker.connection.close(close_code::SHUTDOWN, b"relay shutting down");
                break Ok(());
            }
            msg = control.recv.next::<Control>() => {
                last_heard = Instant::now();
                match msg? {
                    Some(Control::Ping { seq, sent_ms }) => send_frame(&mut control.send, &Control::Pong { seq, sent_ms }).await?,
                    Some(Control::Pong { sent_ms, .. }) => {
                        if let Some(tunnel) = streams.tcp() {
                            let sent = Duration::from_millis(sent_ms);
                            tunnel.set_rtt(started.elapsed().saturating_sub(sent));
                        }
                    }
                    Some(Control::Draining {}) => {
                        info!("worker is draining: no new sessions");
                        worker.set_draining();
                    }
                    Some(Control::Load { active }) => worker.set_reported_load(active),
                    Some(_) => debug!("ignoring an unexpected control message"),
                    None => break Ok(()),
                }
            }
            _ = tick => {
                if last_heard.elapsed() > idle {
                    warn!(silent_ms = last_heard.elapsed().as_millis() as u64, "tunnel silent past tunnel.idle_timeout_ms; closing it");
                    break Err(TunnelError::Timeout);
                }
                seq += 1;
                let sent_ms = u64::try_from(started.elapsed().as_millis()).unwrap_or(u64::MAX);
                send_frame(&mut control.send, &Control::Ping { seq, sent_ms }).await?;
            }
            Some(stream) = incoming => {
                turn_streams.spawn(serve_turn_stream(stream, shared.turn_streams.next(remote), worker.id.clone(), shared.turn.clone(), shared.shutdown.clone()));
            }
        }
    };
    turn_streams.close();
    result
}

/// The five-tuples of TURN streams through tunnels, unique for the life of the relay.
///
/// The client is the worker's address (its quotas, nonces and 401 limits are per address, as for
/// any TCP client). The server side is an address no socket of the relay has, taken from the
/// discard-only prefix `100::/64` (RFC 6666) with a 64-bit counter in its host bits: no TURN
/// TCP client can share it, and it never wraps, so closing one stream can never delete another
/// session's allocation.
#[derive(Default)]
struct TurnStreamIds(AtomicU64);

impl TurnStreamIds {
    fn next(&self, worker: SocketAddr) -> crate::turn::server::FiveTuple {
        let n = self.0.fetch_add(1, Ordering::Relaxed);
        let server = std::net::Ipv6Addr::from((0x0100_u128 << 112) | u128::from(n));
        crate::turn::server::FiveTuple {
            client: worker,
            server: SocketAddr::new(server.into(), 0),
            transport: crate::turn::server::Transport::Tcp,
        }
    }
}

/// A stream the worker opened after registration: TURN for its media, fed to the embedded TURN
/// server as a TCP client at the worker's address ([`TurnStreamIds`]), with the credentials,
/// quotas and peer filter of any other.
async fn serve_turn_stream(
    mut stream: Box<dyn tcp::Io>,
    five: crate::turn::server::FiveTuple,
    worker_id: String,
    turn: Option<Arc<TurnServer>>,
    shutdown: CancellationToken,
) {
    let header = tokio::time::timeout(
        Duration::from_secs(5),
        expect::<StreamHeader, _>(&mut stream, "the stream header"),
    )
    .await;
    match (header, turn) {
        (Ok(Ok(StreamHeader::Turn)), Some(turn)) => {
            metrics::counter!("relay_tunnel_turn_streams_total").increment(1);
            debug!(%worker_id, server = %five.server, "TURN stream through the tunnel");
            crate::turn::serve_stream(turn, stream, five, shutdown).await;
        }
        (Ok(Ok(StreamHeader::Turn)), None) => {
            info!(%worker_id, "worker asked for TURN through the tunnel, but this relay runs no embedded TURN server");
        }
        (other, _) => debug!(%worker_id, ?other, "unexpected stream from the worker; dropped"),
    }
}

/// Open a session stream on the slot's worker and send the opening frames.
pub async fn open_session(
    slot: &SessionSlot,
    open: SessionOpen,
    first: SessionFrame,
) -> Result<(SendHalf, FramedRecv<RecvHalf>), TunnelError> {
    let (mut send, recv) = slot.worker.connection.open_bi().await?;
    send_frame(&mut send, &SessionFrame::Open(open)).await?;
    send_frame(&mut send, &first).await?;
    Ok((send, FramedRecv::new(recv)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unauthenticated_connections_are_retried_then_refused_under_load() {
        let mut config = crate::config::RelayConfig::dev();
        config.tunnel.max_pending_handshakes = 8;
        config.tunnel.max_pending_handshakes_per_ip = 0;
        config.tunnel.retry_above_pending = 2;
        let state = AppState::new(config, CancellationToken::new());
        let pending = PendingHandshakes::default();
        let client: SocketAddr = "203.0.113.9:4000".parse().expect("addr");
        let mut held = Vec::new();
        assert!(!pending.wants_retry(client, &state));
        held.push(pending.admit(client, false, &state).expect("first"));
        held.push(pending.admit(client, false, &state).expect("second"));
        assert!(pending.wants_retry(client, &state), "past retry_above_pending");
        while let Ok(guard) = pending.admit(client, true, &state) {
            held.push(guard);
        }
        assert_eq!(held.len(), 8, "the total caps everyone together");
        assert_eq!(pending.admit(client, true, &state).err(), Some(Refused::Total));
    }

    /// A worker in memory: hello, then (given the challenge) proof and registration, over one
    /// end of a duplex; the relay's handshake runs on the other. What the worker read back.
    async fn handshake_with(
        secret: &str,
        protocol: u32,
        capacity: u32,
        exporter_seen_by_worker: [u8; EXPORTER_LEN],
    ) -> (Result<(String, Registration), TunnelError>, Vec<Control>) {
        let mut config = crate::config::RelayConfig::dev();
        config.tunnel.secret = crate::config::Secret::new("the-relays-secret-0123456789");
        handshake_as(config, "gpu-1", secret, protocol, capacity, exporter_seen_by_worker).await
    }

    async fn handshake_as(
        config: crate::config::RelayConfig,
        worker_id: &str,
        secret: &str,
        protocol: u32,
        capacity: u32,
        exporter_seen_by_worker: [u8; EXPORTER_LEN],
    ) -> (Result<(String, Registration), TunnelError>, Vec<Control>) {
        let state = AppState::new(config, CancellationToken::new());
        let (relay_end, worker_end) = tokio::io::duplex(64 * 1024);
        let exporter = [7u8; EXPORTER_LEN];
        let relay = async {
            let (mut recv, mut send) = tokio::io::split(relay_end);
            let hello_by = tokio::time::Instant::now() + Duration::from_secs(2);
            handshake(&mut send, &mut recv, &exporter, &state, hello_by).await
        };
        let worker = async {
            let (mut recv, mut send) = tokio::io::split(worker_end);
            let mut seen = Vec::new();
            let hello = Control::Hello {
                protocol,
                worker_id: worker_id.into(),
                software: "test".into(),
            };
            send_frame(&mut send, &hello).await.expect("hello");
            let Ok(Some(first)) = recv_frame_exact::<_, Control>(&mut recv).await else {
                return seen;
            };
            seen.push(first.clone());
            if let Control::Challenge { nonce, .. } = first {
                let proof =
                    avatar_proto::tunnel::auth_proof(secret.as_bytes(), &nonce, worker_id, &exporter_seen_by_worker);
                send_frame(&mut send, &Control::Auth { proof }).await.expect("auth");
                let registration = Registration {
                    avatars: vec![],
                    avatar_names: Default::default(),
                    avatar_previews: Default::default(),
                    capacity,
                    labels: Default::default(),
                    instance: Some("abc".into()),
                };
                send_frame(&mut send, &Control::Register(registration))
                    .await
                    .expect("register");
                while let Ok(Some(msg)) = recv_frame_exact::<_, Control>(&mut recv).await {
                    seen.push(msg);
                }
            }
            seen
        };
        // When the relay's side returns, its halves drop and the worker's reads end.
        let (result, seen) = tokio::join!(relay, worker);
        (result, seen)
    }

    fn last(seen: &[Control]) -> &Control {
        seen.last().expect("the worker heard something")
    }

    #[tokio::test]
    async fn a_worker_with_the_secret_registers_on_any_byte_stream() {
        let (result, seen) =
            handshake_with("the-relays-secret-0123456789", PROTOCOL_VERSION, 4, [7; EXPORTER_LEN]).await;
        let (id, registration) = result.expect("registered");
        assert_eq!(id, "gpu-1");
        assert_eq!(registration.capacity, 4);
        assert_eq!(registration.instance.as_deref(), Some("abc"));
        assert!(matches!(seen[0], Control::Challenge { .. }));
        assert!(matches!(last(&seen), Control::Registered { .. }), "{seen:?}");
    }

    #[tokio::test]
    async fn wrong_secrets_sessions_protocols_and_capacities_are_rejected_with_a_reason() {
        // The wrong secret.
        let (result, seen) = handshake_with("another-secret-0123456789", PROTOCOL_VERSION, 4, [7; EXPORTER_LEN]).await;
        assert!(matches!(result, Err(TunnelError::Rejected(_))));
        assert_eq!(
            last(&seen),
            &Control::Rejected {
                reason: "authentication failed".into()
            }
        );
        // The right secret, but a proof made for another TLS session (a relayed proof).
        let (result, _) = handshake_with("the-relays-secret-0123456789", PROTOCOL_VERSION, 4, [8; EXPORTER_LEN]).await;
        assert!(matches!(result, Err(TunnelError::Rejected(_))));
        // Another protocol version: refused before any challenge.
        let (result, seen) = handshake_with(
            "the-relays-secret-0123456789",
            PROTOCOL_VERSION + 1,
            4,
            [7; EXPORTER_LEN],
        )
        .await;
        assert!(matches!(result, Err(TunnelError::Rejected(_))));
        assert!(matches!(&seen[..], [Control::Rejected { .. }]), "{seen:?}");
        // No capacity, or more than a relay accepts.
        for capacity in [0, avatar_proto::tunnel::MAX_WORKER_CAPACITY + 1] {
            let (result, seen) = handshake_with(
                "the-relays-secret-0123456789",
                PROTOCOL_VERSION,
                capacity,
                [7; EXPORTER_LEN],
            )
            .await;
            assert!(matches!(result, Err(TunnelError::Rejected(_))), "{capacity}");
            assert!(matches!(last(&seen), Control::Rejected { .. }), "{seen:?}");
        }
    }

    fn with_own_keys() -> crate::config::RelayConfig {
        let mut config = crate::config::RelayConfig::dev();
        config.tunnel.secret = crate::config::Secret::new("the-fleets-shared-secret-0123");
        config.tunnel.max_capacity_per_worker = 16;
        config.tunnel.workers = vec![crate::config::WorkerCredential {
            id: "gpu-1".into(),
            key: crate::config::Secret::new("gpu-1s-own-key-0123456789"),
            key_file: None,
            max_capacity: Some(4),
        }];
        config
    }

    /// N4: a listed id registers with its own key only, so a box holding the fleet secret cannot
    /// take it over; unlisted ids still use the shared secret; no box claims more than its cap.
    #[tokio::test]
    async fn a_listed_worker_id_is_bound_to_its_own_key_and_capacity() {
        let exporter = [7; EXPORTER_LEN];
        let (result, _) = handshake_as(
            with_own_keys(),
            "gpu-1",
            "gpu-1s-own-key-0123456789",
            PROTOCOL_VERSION,
            10_000,
            exporter,
        )
        .await;
        let (_, registration) = result.expect("its own key registers");
        assert_eq!(registration.capacity, 4, "declared 10,000, capped at its max_capacity");
        // Another box with the fleet secret claims the same id.
        let (result, seen) = handshake_as(
            with_own_keys(),
            "gpu-1",
            "the-fleets-shared-secret-0123",
            PROTOCOL_VERSION,
            4,
            exporter,
        )
        .await;
        assert!(
            matches!(result, Err(TunnelError::Rejected(_))),
            "the shared secret cannot take a listed id"
        );
        assert_eq!(
            last(&seen),
            &Control::Rejected {
                reason: "authentication failed".into()
            }
        );
        // An unlisted id with the shared secret: admitted, under the relay-wide cap.
        let (result, _) = handshake_as(
            with_own_keys(),
            "gpu-2",
            "the-fleets-shared-secret-0123",
            PROTOCOL_VERSION,
            10_000,
            exporter,
        )
        .await;
        assert_eq!(result.expect("shared secret").1.capacity, 16);
        // Without a shared secret only listed ids exist, whatever key an unlisted one tries
        // (the empty key included).
        let mut only_listed = with_own_keys();
        only_listed.tunnel.secret = crate::config::Secret::default();
        only_listed.validate().expect("keys per worker need no shared secret");
        for key in ["", "the-fleets-shared-secret-0123", "gpu-1s-own-key-0123456789"] {
            let (result, _) = handshake_as(only_listed.clone(), "gpu-2", key, PROTOCOL_VERSION, 4, exporter).await;
            assert!(matches!(result, Err(TunnelError::Rejected(_))), "{key:?}");
        }
    }

    /// N1: one address holds at most its share of pending handshakes, across both transports;
    /// another address still gets in, and a share comes back when a connection registers or goes.
    #[test]
    fn one_address_holds_only_its_share_of_pending_handshakes() {
        let mut config = crate::config::RelayConfig::dev();
        config.tunnel.max_pending_handshakes = 64;
        config.tunnel.max_pending_handshakes_per_ip = 8;
        config.limits.trusted_proxies = vec!["192.0.2.10/32".parse().expect("net")];
        let state = AppState::new(config, CancellationToken::new());
        let pending = PendingHandshakes::default();
        let attacker: SocketAddr = "203.0.113.9:4000".parse().expect("addr");
        let worker: SocketAddr = "198.51.100.7:5000".parse().expect("addr");
        let held: Vec<_> = (0..250)
            .filter_map(|_| pending.admit(attacker, true, &state).ok())
            .collect();
        assert_eq!(held.len(), 8, "one address, any transport: its share only");
        assert_eq!(pending.admit(attacker, true, &state).err(), Some(Refused::PerClient));
        let guard = pending.admit(worker, true, &state).expect("another address gets in");
        drop(held);
        drop(guard);
        assert_eq!(pending.anonymous.total(), 0, "every share given back");
        // An unproven QUIC address is not charged to the address it names (it may be spoofed)
        // until its handshake proves it.
        let mut spoofed: Vec<_> = (0..16)
            .filter_map(|_| pending.admit(worker, false, &state).ok())
            .collect();
        assert_eq!(spoofed.len(), 16);
        let key = PendingHandshakes::key(worker, &state).expect("key");
        let charged = spoofed
            .iter_mut()
            .map(|g| g.charge(key, 8))
            .filter(Result::is_ok)
            .count();
        assert_eq!(charged, 8, "once proven, the address's share applies");
        // A trusted proxy (an L4 pass-through) carries many workers: counted in the total only.
        let proxy: SocketAddr = "192.0.2.10:443".parse().expect("addr");
        let through_proxy: Vec<_> = (0..20)
            .filter_map(|_| pending.admit(proxy, true, &state).ok())
            .collect();
        assert_eq!(through_proxy.len(), 20);
    }

    /// The review's multi-address flood: an attacker with many addresses fills the anonymous
    /// pool, but an address a worker registered from has a pool of its own, and must prove it
    /// (Retry) before it may use it.
    #[test]
    fn workers_reconnect_from_known_addresses_whatever_fills_the_anonymous_pool() {
        let mut config = crate::config::RelayConfig::dev();
        config.tunnel.max_pending_handshakes = 64;
        config.tunnel.max_pending_handshakes_per_ip = 8;
        let state = AppState::new(config, CancellationToken::new());
        let pending = PendingHandshakes::default();
        let worker: SocketAddr = "198.51.100.7:5000".parse().expect("addr");
        pending.remember(worker, &state);
        let flood: Vec<_> = (0..8u16)
            .flat_map(|i| {
                let from = SocketAddr::new(std::net::Ipv6Addr::new(0x2001, 0xdb8, 0, i, 0, 0, 0, 1).into(), 4000);
                (0..8)
                    .filter_map(|_| pending.admit(from, true, &state).ok())
                    .collect::<Vec<_>>()
            })
            .collect();
        assert_eq!(flood.len(), 64, "eight /64s fill the anonymous pool");
        let stranger: SocketAddr = "198.51.100.99:5000".parse().expect("addr");
        assert_eq!(pending.admit(stranger, true, &state).err(), Some(Refused::Total));
        assert!(
            pending.wants_retry(worker, &state),
            "a known address proves itself first"
        );
        let _reconnect = pending.admit(worker, true, &state).expect("the worker's own pool");
    }

    /// N6: TURN streams' five-tuples never repeat, however many streams a relay has seen (the
    /// old 16-bit counter wrapped after 65,535).
    #[test]
    fn turn_stream_five_tuples_are_unique_for_the_relays_life() {
        let ids = TurnStreamIds::default();
        let worker: SocketAddr = "198.51.100.7:5000".parse().expect("addr");
        let mut seen = std::collections::HashSet::new();
        for _ in 0..70_000 {
            let five = ids.next(worker);
            assert_eq!(five.client, worker, "quotas stay the worker's");
            assert!(seen.insert(five), "a five-tuple was reused");
        }
        assert_eq!(seen.len(), 70_000);
    }
}
