//! The worker's end of the tunnel: dial each relay, prove the shared secret, register, then
//! serve the session streams the relay opens.
//!
//! The worker only dials out, so a GPU box behind NAT needs no inbound port. A tunnel is QUIC
//! (UDP to the relay's tunnel port) or TLS over TCP (the relay's HTTPS port, yamux streams) for
//! networks that block UDP. With `tunnel.transport = "auto"` the worker tries QUIC for
//! `tunnel.quic_timeout_ms`, falls back to TCP, and while on TCP tries QUIC again every
//! `tunnel.quic_probe_interval_s`: a QUIC tunnel that registers takes the new sessions at once,
//! and the TCP tunnel closes after its last session (make before break). On TCP, sessions' TURN
//! goes through the tunnel too ([`gateway`]), so media needs no UDP from this machine. Each relay gets its
//! own task that reconnects forever with **full-jitter** exponential backoff (a random wait in
//! `[0, min(cap, base·2^attempt)]`), so a fleet of workers does not stampede a relay that comes
//! back. The relay's certificate is pinned by SHA-256 fingerprint or checked against a CA file.

pub mod gateway;

use crate::config::{RelayTarget, TunnelTransport};
use crate::session::{run_session, RecvHalf, SendHalf};
use crate::{Context, Stop};
use avatar_proto::mux::{self, Incoming, Mux, MuxError};
use avatar_proto::stream::{recv_frame_exact, send_frame, FramedRecv, StreamError};
use avatar_proto::tunnel::{
    auth_proof, close_code, session_stream_limit, Control, Registration, StreamHeader, ALPN, EXPORTER_LABEL,
    EXPORTER_LEN, PROTOCOL_VERSION, TCP_ALPN,
};
use gateway::TurnGateway;
use rand::Rng;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::mpsc;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("{0}")]
    Stream(#[from] StreamError),
    #[error("{0}")]
    Mux(#[from] MuxError),
    #[error("relay refused us: {0}")]
    Rejected(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("trust settings: {0}")]
    Trust(String),
    #[error("resolving {0}: no address")]
    Resolve(String),
    /// The QUIC path went silent (idle timeout), as when UDP is blocked mid-session.
    #[error("QUIC path lost (idle timeout): is UDP to the relay blocked?")]
    PathLost,
}

/// Accepts exactly the certificate with the pinned SHA-256 fingerprint; signatures are still
/// verified, so only the holder of that certificate's key can complete the handshake.
#[derive(Debug)]
struct PinnedCert {
    fingerprint: [u8; 32],
    provider: Arc<rustls::crypto::CryptoProvider>,
}

impl ServerCertVerifier for PinnedCert {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        if Sha256::digest(end_entity.as_ref()).as_slice() == self.fingerprint {
            Ok(ServerCertVerified::assertion())
        } else {
            Err(rustls::Error::InvalidCertificate(
                rustls::CertificateError::ApplicationVerificationFailure,
            ))
        }
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(message, cert, dss, &self.provider.signature_verification_algorithms)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider.signature_verification_algorithms.supported_schemes()
    }
}

/// Parse a fingerprint: 64 hex digits, colons and whitespace ignored.
pub fn parse_fingerprint(text: &str) -> Result<[u8; 32], TunnelError> {
    let cleaned: String = text.chars().filter(|c| !c.is_whitespace() && *c != ':').collect();
    let cleaned = cleaned.strip_prefix("sha256/").unwrap_or(&cleaned);
    let bytes = hex::decode(cleaned).map_err(|e| TunnelError::Trust(format!("fingerprint is not hex: {e}")))?;
    bytes
        .try_into()
        .map_err(|_| TunnelError::Trust("fingerprint must be 32 bytes (SHA-256)".into()))
}

/// The QUIC transport of a tunnel: timers, and stream limits that follow `capacity`.
pub fn transport_config(
    idle: Duration,
    keepalive: Duration,
    capacity: u32,
) -> Result<quinn::TransportConfig, TunnelError> {
    let mut transport = quinn::TransportConfig::default();
    transport
        .max_idle_timeout(Some(
            quinn::IdleTimeout::try_from(idle).map_err(|e| TunnelError::Trust(e.to_string()))?,
        ))
        .keep_alive_interval(Some(keepalive))
        // Before the first RTT sample, retransmit a lost handshake after ~300 ms, not ~1 s: a
        // tunnel comes back quickly when its path returns mid-attempt.
        .initial_rtt(Duration::from_millis(100))
        .max_concurrent_bidi_streams(quinn::VarInt::from_u32(session_stream_limit(capacity)))
        .max_concurrent_uni_streams(quinn::VarInt::from_u32(0));
    Ok(transport)
}

/// The relay's certificate check (pin or CA), TLS 1.3 only, offering `alpn`.
pub fn tls_config(target: &RelayTarget, alpn: &[u8]) -> Result<rustls::ClientConfig, TunnelError> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(Arc::clone(&provider))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(|e| TunnelError::Trust(e.to_string()))?;
    let pinned = match (&target.fingerprint, &target.fingerprint_file) {
        (Some(f), _) => Some(parse_fingerprint(f)?),
        (None, Some(path)) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| TunnelError::Trust(format!("reading {}: {e}", path.display())))?;
            Some(parse_fingerprint(&text)?)
        }
        (None, None) => None,
    };
    let mut tls = match (pinned, &target.ca_file) {
        (Some(fingerprint), _) => builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(PinnedCert { fingerprint, provider }))
            .with_no_client_auth(),
        (None, Some(ca)) => {
            let pem = std::fs::read(ca).map_err(|e| TunnelError::Trust(format!("reading {}: {e}", ca.display())))?;
            let mut roots = rustls::RootCertStore::empty();
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| TunnelError::Trust(format!("{}: {e}", ca.display())))?;
                roots
                    .add(cert)
                    .map_err(|e| TunnelError::Trust(format!("{}: {e}", ca.display())))?;
            }
            builder.with_root_certificates(roots).with_no_client_auth()
        }
        (None, None) => return Err(TunnelError::Trust("no fingerprint or CA configured".into())),
    };
    tls.alpn_protocols = vec![alpn.to_vec()];
    Ok(tls)
}

/// The QUIC client configuration for `target`.
pub fn client_config(
    target: &RelayTarget,
    idle: Duration,
    keepalive: Duration,
    capacity: u32,
) -> Result<quinn::ClientConfig, TunnelError> {
    let tls = tls_config(target, ALPN)?;
    let crypto =
        quinn::crypto::rustls::QuicClientConfig::try_from(tls).map_err(|e| TunnelError::Trust(e.to_string()))?;
    let mut config = quinn::ClientConfig::new(Arc::new(crypto));
    config.transport_config(Arc::new(transport_config(idle, keepalive, capacity)?));
    Ok(config)
}

/// Backoff bounds for reconnecting. The cap is low on purpose: a relay is one host the operator
/// runs, not a shared service, and a GPU box that waits 10 s to return wastes sessions; the full
/// jitter still spreads a fleet's attempts.
const BACKOFF_BASE: Duration = Duration::from_millis(100);
const BACKOFF_CAP: Duration = Duration::from_secs(1);
/// A connection attempt that has not completed its handshake by then is abandoned and retried.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Full jitter: uniform in `[0, min(cap, base·2^attempt)]`.
pub fn backoff(attempt: u32, rng: &mut impl Rng) -> Duration {
    let ceiling = BACKOFF_BASE.saturating_mul(1u32 << attempt.min(16)).min(BACKOFF_CAP);
    ceiling.mul_f64(rng.gen::<f64>())
}

/// A tunnel the worker holds: its transport, its control stream, and where session streams come
/// from.
struct Tunnel {
    link: Link,
    send: SendHalf,
    recv: FramedRecv<RecvHalf>,
    relay: Accepted,
}

/// What the relay said when it accepted the registration.
struct Accepted {
    relay_id: String,
    /// It takes [`Control::Load`] reports (older relays do not).
    load_reports: bool,
}

enum Link {
    Quic {
        endpoint: quinn::Endpoint,
        conn: quinn::Connection,
        /// With `tunnel.turn_via_quic`: loopback TURN whose traffic rides this tunnel.
        gateway: Option<Arc<TurnGateway>>,
    },
    Tcp {
        mux: Mux,
        incoming: Incoming,
        /// Loopback TURN whose traffic rides this tunnel (see [`gateway`]).
        gateway: Arc<TurnGateway>,
    },
}

impl Tunnel {
    fn transport(&self) -> TunnelTransport {
        self.link.transport()
    }
}

impl Link {
    fn transport(&self) -> TunnelTransport {
        match self {
            Link::Quic { .. } => TunnelTransport::Quic,
            Link::Tcp { .. } => TunnelTransport::Tcp,
        }
    }

    /// The next session stream the relay opens; `None` when the tunnel has ended.
    async fn accept(&mut self) -> Option<(SendHalf, RecvHalf)> {
        match self {
            Link::Quic { conn, .. } => {
                let (send, recv) = conn.accept_bi().await.ok()?;
                Some((Box::new(send), Box::new(recv)))
            }
            Link::Tcp { incoming, .. } => {
                let (recv, send) = tokio::io::split(incoming.recv().await?);
                Some((Box::new(send), Box::new(recv)))
            }
        }
    }

    /// Whether QUIC closed for silence (the path died) rather than by either side.
    fn timed_out(&self) -> bool {
        match self {
            Link::Quic { conn, .. } => matches!(conn.close_reason(), Some(quinn::ConnectionError::TimedOut)),
            Link::Tcp { .. } => false,
        }
    }

    fn rtt(&self) -> Option<Duration> {
        match self {
            Link::Quic { conn, .. } => Some(conn.rtt()),
            Link::Tcp { .. } => None,
        }
    }

    /// Where sessions on this tunnel send TURN, when it is not the relay's own address.
    fn turn_gateway(&self) -> Option<std::net::SocketAddr> {
        match self {
            Link::Quic { gateway, .. } => gateway.as_ref().map(|g| g.addr()),
            Link::Tcp { gateway, .. } => Some(gateway.addr()),
        }
    }

    async fn close(self) {
        match self {
            Link::Quic { endpoint, conn, .. } => {
                conn.close(quinn::VarInt::from_u32(close_code::SHUTDOWN), b"worker closing");
                // Give the close a moment to reach the relay so it unregisters us at once.
                let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
            }
            Link::Tcp { mux, .. } => {
                mux.close();
                let _ = tokio::time::timeout(Duration::from_millis(500), mux.closed()).await;
            }
        }
    }
}

async fn resolve(address: &str) -> Result<std::net::SocketAddr, TunnelError> {
    tokio::net::lookup_host(address)
        .await
        .map_err(|_| TunnelError::Resolve(address.to_owned()))?
        .next()
        .ok_or_else(|| TunnelError::Resolve(address.to_owned()))
}

/// Dial the relay over QUIC and register, within `within`.
async fn connect_quic(target: &RelayTarget, ctx: &Context, within: Duration) -> Result<Tunnel, TunnelError> {
    let addr = resolve(&target.address).await?;
    let config = client_config(target, ctx.tunnel_idle, ctx.tunnel_keepalive, ctx.config.capacity)?;
    let bind: std::net::SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .map_err(|_| TunnelError::Protocol("bind address".into()))?;
    let endpoint = quinn::Endpoint::client(bind).map_err(|e| TunnelError::Protocol(format!("binding UDP: {e}")))?;
    let connecting = endpoint.connect_with(config, addr, &target.server_name())?;
    let registered = async {
        let conn = connecting.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        let mut exporter = [0u8; EXPORTER_LEN];
        conn.export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
            .map_err(|_| TunnelError::Protocol("TLS exporter unavailable".into()))?;
        let relay = match handshake(&mut send, &mut recv, &exporter, ctx).await {
            Ok(accepted) => accepted,
            // A relay that refuses us may close the connection before our read sees `Rejected`.
            Err(TunnelError::Stream(e)) => match quic_close_reason(&e) {
                Some(reason) => return Err(TunnelError::Rejected(reason)),
                None => return Err(e.into()),
            },
            Err(e) => return Err(e),
        };
        let gateway = if ctx.config.tunnel.turn_via_quic {
            let g = TurnGateway::start(gateway::Opener::Quic(conn.clone()))
                .await
                .map_err(|e| TunnelError::Protocol(format!("TURN gateway: {e}")))?;
            Some(Arc::new(g))
        } else {
            None
        };
        Ok::<_, TunnelError>(Tunnel {
            link: Link::Quic {
                endpoint: endpoint.clone(),
                conn,
                gateway,
            },
            send: Box::new(send),
            recv: FramedRecv::new(Box::new(recv)),
            relay,
        })
    };
    match tokio::time::timeout(within, registered).await {
        Ok(result) => result,
        Err(_) => Err(TunnelError::Protocol(format!("no QUIC handshake within {within:?}"))),
    }
}

/// Dial the relay's HTTPS port, run the handshake on the TLS stream, then multiplex it.
async fn connect_tcp(target: &RelayTarget, ctx: &Context, within: Duration) -> Result<Tunnel, TunnelError> {
    let address = target.tcp_address();
    let addr = resolve(&address).await?;
    let tls = tokio_rustls::TlsConnector::from(Arc::new(tls_config(target, TCP_ALPN)?));
    let name =
        ServerName::try_from(target.server_name()).map_err(|e| TunnelError::Trust(format!("server name: {e}")))?;
    let registered = async {
        let tcp = tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| TunnelError::Protocol(format!("TCP connect to {address}: {e}")))?;
        // Control frames and TURN are small and latency-bound.
        let _ = tcp.set_nodelay(true);
        let stream = tls
            .connect(name, tcp)
            .await
            .map_err(|e| TunnelError::Protocol(format!("TLS to {address}: {e}")))?;
        if stream.get_ref().1.alpn_protocol() != Some(TCP_ALPN) {
            return Err(TunnelError::Protocol(format!(
                "{address} does not take tunnels over TLS/TCP (an old relay, tunnel.tcp_on_https = false, or not a relay)"
            )));
        }
        let exporter = stream
            .get_ref()
            .1
            .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)
            .map_err(|_| TunnelError::Protocol("TLS exporter unavailable".into()))?;
        let (mut recv, mut send) = tokio::io::split(stream);
        let relay = handshake(&mut send, &mut recv, &exporter, ctx).await?;
        Ok::<_, TunnelError>((recv.unsplit(send), relay))
    };
    let (io, relay) = match tokio::time::timeout(within, registered).await {
        Ok(result) => result?,
        Err(_) => return Err(TunnelError::Protocol(format!("no TLS/TCP handshake within {within:?}"))),
    };
    let limit = session_stream_limit(ctx.config.capacity) as usize;
    let (mux, incoming, driver) = mux::start(io, mux::Side::Client, 2 * limit + 2, limit);
    tokio::spawn(driver);
    let mut control = mux.open().await?;
    send_frame(&mut control, &StreamHeader::Control).await?;
    let gateway = TurnGateway::start(gateway::Opener::Mux(mux.clone()))
        .await
        .map_err(|e| TunnelError::Protocol(format!("TURN gateway: {e}")))?;
    let (recv, send) = tokio::io::split(control);
    Ok(Tunnel {
        link: Link::Tcp {
            mux,
            incoming,
            gateway: Arc::new(gateway),
        },
        send: Box::new(send),
        recv: FramedRecv::new(Box::new(recv)),
        relay,
    })
}

/// Hello, proof and registration on the control stream; what the relay accepted with.
async fn handshake<S: AsyncWrite + Unpin, R: AsyncRead + Unpin>(
    send: &mut S,
    recv: &mut R,
    exporter: &[u8; EXPORTER_LEN],
    ctx: &Context,
) -> Result<Accepted, TunnelError> {
    let worker_id = ctx.config.worker_id.clone();
    send_frame(
        send,
        &Control::Hello {
            protocol: PROTOCOL_VERSION,
            worker_id: worker_id.clone(),
            software: format!("avatar-worker/{}", env!("CARGO_PKG_VERSION")),
        },
    )
    .await?;
    // Read exactly: on TCP the multiplexer takes the stream over right after `Registered`.
    let (relay_id, nonce) = match recv_frame_exact::<_, Control>(recv).await? {
        Some(Control::Challenge {
            protocol,
            relay_id,
            nonce,
        }) if protocol == PROTOCOL_VERSION => (relay_id, nonce),
        Some(Control::Challenge { protocol, .. }) => {
            return Err(TunnelError::Protocol(format!("relay speaks protocol {protocol}")))
        }
        Some(Control::Rejected { reason }) => return Err(TunnelError::Rejected(reason)),
        other => return Err(TunnelError::Protocol(format!("expected a challenge, got {other:?}"))),
    };
    let proof = auth_proof(ctx.config.secret.expose().as_bytes(), &nonce, &worker_id, exporter);
    send_frame(send, &Control::Auth { proof }).await?;
    let registration = Registration {
        avatars: ctx.avatars.ids(),
        avatar_names: ctx.avatars.names(),
        avatar_previews: ctx.avatars.previews(),
        capacity: ctx.config.capacity,
        labels: ctx.config.labels.clone(),
        instance: Some(ctx.instance.clone()),
    };
    send_frame(send, &Control::Register(registration)).await?;
    match recv_frame_exact::<_, Control>(recv).await? {
        Some(Control::Registered { load_reports, .. }) => Ok(Accepted { relay_id, load_reports }),
        Some(Control::Rejected { reason }) => Err(TunnelError::Rejected(reason)),
        other => Err(TunnelError::Protocol(format!("expected registered, got {other:?}"))),
    }
}

/// Connect as `mode` says. `auto` tries QUIC first unless `prefer_tcp` (QUIC failed last time
/// and the probe will find it again), and falls back to TLS/TCP on anything but a refusal.
async fn establish(
    target: &RelayTarget,
    ctx: &Context,
    mode: TunnelTransport,
    prefer_tcp: bool,
) -> Result<Tunnel, TunnelError> {
    let quic_within = Duration::from_millis(ctx.config.tunnel.quic_timeout_ms);
    match mode {
        TunnelTransport::Quic => connect_quic(target, ctx, CONNECT_TIMEOUT).await,
        TunnelTransport::Tcp => connect_tcp(target, ctx, CONNECT_TIMEOUT).await,
        TunnelTransport::Auto if prefer_tcp => match connect_tcp(target, ctx, CONNECT_TIMEOUT).await {
            Ok(t) => Ok(t),
            Err(e @ TunnelError::Rejected(_)) => Err(e),
            Err(e) => {
                info!(error = %e, "TLS/TCP failed; trying QUIC");
                connect_quic(target, ctx, quic_within).await
            }
        },
        TunnelTransport::Auto => match connect_quic(target, ctx, quic_within).await {
            Ok(t) => Ok(t),
            Err(e @ TunnelError::Rejected(_)) => Err(e),
            Err(e) => {
                info!(error = %e, tcp = %target.tcp_address(), "QUIC failed; falling back to TLS/TCP");
                connect_tcp(target, ctx, CONNECT_TIMEOUT).await
            }
        },
    }
}

/// Keep a tunnel to `target` until the worker drains ([`Stop::drain`]); then let the tunnels that
/// are up finish their sessions.
pub async fn maintain(target: RelayTarget, ctx: Arc<Context>, stop: Stop) {
    let span = info_span!("relay", address = %target.address);
    async move {
        let mode = ctx.config.tunnel.transport;
        // Tunnels being served, the current one and any left to finish their sessions.
        let serving = TaskTracker::new();
        let mut attempt = 0u32;
        let mut prefer_tcp = false;
        let mut next: Option<Tunnel> = None;
        // Draining: the tunnels that are up finish their sessions; none is dialled any more.
        while !stop.drain.is_cancelled() {
            let tunnel = match next.take() {
                Some(t) => Ok(t),
                None => establish(&target, &ctx, mode, prefer_tcp).await,
            };
            match tunnel {
                Ok(tunnel) => {
                    attempt = 0;
                    let transport = tunnel.transport();
                    prefer_tcp = transport == TunnelTransport::Tcp;
                    let (moved_tx, mut moved_rx) = mpsc::channel(1);
                    let probe = (mode == TunnelTransport::Auto && transport == TunnelTransport::Tcp).then(|| Probe {
                        target: target.clone(),
                        every: Duration::from_secs(ctx.config.tunnel.quic_probe_interval_s),
                        found: moved_tx,
                    });
                    let mut task = serving.spawn(
                        serve(tunnel, Arc::clone(&ctx), stop.clone(), probe)
                            .instrument(info_span!("tunnel", transport = transport.as_str())),
                    );
                    tokio::select! {
                        result = &mut task => match result {
                            Ok(Ok(())) => {}
                            Ok(Err(TunnelError::PathLost)) if mode == TunnelTransport::Auto => {
                                // Likely UDP went away: TLS/TCP first now; the probe finds QUIC again.
                                warn!("QUIC path lost; reconnecting over TLS/TCP first");
                                metrics::counter!("worker_tunnel_failures_total").increment(1);
                                prefer_tcp = true;
                            }
                            Ok(Err(e)) => {
                                warn!(error = %e, "tunnel failed");
                                metrics::counter!("worker_tunnel_failures_total").increment(1);
                                attempt = attempt.saturating_add(1);
                            }
                            Err(e) => warn!(error = %e, "tunnel task failed"),
                        },
                        Some(quic) = moved_rx.recv() => {
                            // The TCP tunnel finishes its sessions on its own (still tracked).
                            info!("QUIC works again: new sessions go over QUIC, the TLS/TCP tunnel closes after its last session");
                            next = Some(quic);
                            continue;
                        }
                    }
                }
                Err(e) => {
                    warn!(error = %e, "tunnel failed");
                    metrics::counter!("worker_tunnel_failures_total").increment(1);
                    attempt = attempt.saturating_add(1);
                }
            }
            if stop.drain.is_cancelled() {
                break;
            }
            let wait = backoff(attempt, &mut rand::thread_rng());
            info!(wait_ms = wait.as_millis() as u64, "reconnecting");
            tokio::select! {
                _ = stop.drain.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
        serving.close();
        serving.wait().await;
    }
    .instrument(span)
    .await
}

/// While on TLS/TCP with `transport = "auto"`: try QUIC every `every`, and hand over a tunnel
/// that registered.
struct Probe {
    target: RelayTarget,
    every: Duration,
    found: mpsc::Sender<Tunnel>,
}

/// Serve one tunnel: its control stream, and a session task per stream the relay opens. A
/// successful QUIC probe, or the worker draining ([`Stop::drain`]), turns it into a draining one,
/// which takes no new sessions and ends when its last session does.
async fn serve(tunnel: Tunnel, ctx: Arc<Context>, stop: Stop, probe: Option<Probe>) -> Result<(), TunnelError> {
    let shutdown = stop.end.clone();
    let Tunnel {
        mut link,
        mut send,
        mut recv,
        relay: Accepted {
            relay_id,
            mut load_reports,
        },
    } = tunnel;
    let transport = link.transport().as_str();
    let gateway = link.turn_gateway();
    info!(%relay_id, "registered with relay over {transport}");
    metrics::counter!("worker_tunnel_registrations_total", "transport" => transport).increment(1);
    metrics::gauge!("worker_tunnel_transport", "relay" => relay_id.clone(), "transport" => transport).set(1.0);
    // This tunnel's sessions (also in `ctx.sessions`, which shutdown waits for).
    let sessions = TaskTracker::new();
    // A tunnel the probe registered over QUIC arrives here, and goes on to `maintain`.
    let (quic_tx, mut quic_rx) = mpsc::channel::<Tunnel>(1);
    let (probe_task, handover) = match probe {
        Some(Probe { target, every, found }) => {
            let ctx = Arc::clone(&ctx);
            let task = tokio::spawn(async move {
                let mut tick = tokio::time::interval(every);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    let within = Duration::from_millis(ctx.config.tunnel.quic_timeout_ms);
                    match connect_quic(&target, &ctx, within).await {
                        Ok(t) => {
                            let _ = quic_tx.send(t).await;
                            return;
                        }
                        Err(e) => debug!(error = %e, "QUIC probe failed; staying on TLS/TCP"),
                    }
                }
            });
            (Some(task), Some(found))
        }
        None => (None, None),
    };
    let mut draining = false;
    let mut last_heard = tokio::time::Instant::now();
    // The relay pings a TCP tunnel every `tunnel.keepalive_ms` (default 1 s).
    let idle = ctx.tunnel_idle * 3;
    let mut tick = tokio::time::interval(Duration::from_secs(2));
    // The load as it is now goes first, then every change (relays that take the reports).
    let mut load = ctx.watch_load();
    load.mark_changed();
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = send_frame(&mut send, &Control::Draining {}).await;
                // Sessions obey the same token and say goodbye over this connection: let them
                // finish before it closes, and let their last frames cross (closing a QUIC
                // connection drops what is still unsent): two round trips, within the same 2 s.
                sessions.close();
                let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                let _ = tokio::time::timeout_at(deadline, sessions.wait()).await;
                let crossing = link.rtt().unwrap_or(Duration::ZERO) * 2 + Duration::from_millis(20);
                tokio::time::sleep_until(deadline.min(tokio::time::Instant::now() + crossing)).await;
                break Ok(());
            }
            _ = stop.drain.cancelled(), if !draining => {
                // The relay stops routing here at once; the sessions already here play on.
                send_frame(&mut send, &Control::Draining {}).await?;
                info!(sessions = ctx.active_sessions(), "draining: the relay sends no new session");
                draining = true;
                sessions.close();
            }
            stream = link.accept(), if !draining => match stream {
                Some((send, recv)) => {
                    let session = run_session(send, recv, Arc::clone(&ctx), shutdown.clone(), gateway);
                    ctx.sessions.spawn(sessions.track_future(session));
                }
                None => break Err(TunnelError::Protocol("the tunnel closed".into())),
            },
            changed = load.changed(), if load_reports => match changed {
                Ok(()) => {
                    let active = *load.borrow_and_update();
                    send_frame(&mut send, &Control::Load { active }).await?;
                }
                // The context (and its sender) outlives every tunnel; should that change, stop.
                Err(_) => load_reports = false,
            },
            msg = recv.next::<Control>() => {
                last_heard = tokio::time::Instant::now();
                match msg? {
                    Some(Control::Ping { seq, sent_ms }) => send_frame(&mut send, &Control::Pong { seq, sent_ms }).await?,
                    Some(_) => {}
                    None => break Err(TunnelError::Protocol("relay closed the control stream".into())),
                }
            }
            Some(quic) = quic_rx.recv(), if !draining => {
                // Sessions already here stay on this tunnel until they end; the relay sends new
                // ones over QUIC (it keeps this tunnel draining: same `instance`).
                draining = true;
                sessions.close();
                if let Some(h) = &handover {
                    let _ = h.send(quic).await;
                }
            }
            _ = sessions.wait(), if draining => {
                info!("the last session on this tunnel ended; closing it");
                break Ok(());
            }
            _ = tick.tick() => {
                if let Some(rtt) = link.rtt() {
                    metrics::gauge!("worker_tunnel_rtt_seconds", "relay" => relay_id.clone()).set(rtt.as_secs_f64());
                }
                // QUIC notices a dead path itself; over TCP the relay's pings are the heartbeat.
                if link.transport() == TunnelTransport::Tcp && last_heard.elapsed() > idle {
                    break Err(TunnelError::Protocol(format!("relay silent for {idle:?}")));
                }
            }
        }
    };
    if let Some(task) = probe_task {
        task.abort();
    }
    metrics::gauge!("worker_tunnel_transport", "relay" => relay_id, "transport" => transport).set(0.0);
    let result = match result {
        Err(_) if link.timed_out() => Err(TunnelError::PathLost),
        other => other,
    };
    link.close().await;
    result
}

/// Why the relay closed the QUIC connection, when a stream error says so: quinn's `ReadError` and
/// `WriteError` travel inside the stream's `std::io::Error`.
fn quic_close_reason(e: &StreamError) -> Option<String> {
    let inner = e.io_error()?.get_ref()?;
    let lost = match (
        inner.downcast_ref::<quinn::ReadError>(),
        inner.downcast_ref::<quinn::WriteError>(),
    ) {
        (Some(quinn::ReadError::ConnectionLost(c)), _) | (_, Some(quinn::WriteError::ConnectionLost(c))) => c,
        _ => return None,
    };
    match lost {
        quinn::ConnectionError::ApplicationClosed(close) => Some(String::from_utf8_lossy(&close.reason).into_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_is_full_jitter_and_capped() {
        let mut rng = rand::thread_rng();
        for attempt in 0..40 {
            let d = backoff(attempt, &mut rng);
            assert!(d <= BACKOFF_CAP);
            assert!(d <= BACKOFF_BASE.saturating_mul(1 << attempt.min(16)));
        }
    }

    /// A relay (a QUIC server with a fresh certificate) and a worker connected to it with the
    /// worker's own client configuration for `capacity`. Returns how many session streams of
    /// `wanted` the relay could open and hold at once.
    async fn session_streams_held(capacity: u32, wanted: usize) -> usize {
        let ck = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).expect("cert");
        let der = ck.cert.der().clone();
        let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.signing_key.serialize_der().into());
        let mut tls = rustls::ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
            .with_protocol_versions(&[&rustls::version::TLS13])
            .expect("TLS 1.3")
            .with_no_client_auth()
            .with_single_cert(vec![der.clone()], key)
            .expect("certificate");
        tls.alpn_protocols = vec![ALPN.to_vec()];
        let crypto = quinn::crypto::rustls::QuicServerConfig::try_from(tls).expect("QUIC TLS");
        let loopback: std::net::SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let relay =
            quinn::Endpoint::server(quinn::ServerConfig::with_crypto(Arc::new(crypto)), loopback).expect("server");
        let addr = relay.local_addr().expect("addr");
        let target = RelayTarget {
            address: addr.to_string(),
            server_name: Some("localhost".into()),
            fingerprint: Some(hex::encode(Sha256::digest(der.as_ref()))),
            fingerprint_file: None,
            ca_file: None,
            tcp_address: None,
        };
        let config = client_config(&target, Duration::from_secs(10), Duration::from_secs(1), capacity).expect("config");
        let worker_end = quinn::Endpoint::client(loopback).expect("client");
        let connecting = worker_end.connect_with(config, addr, "localhost").expect("connect");
        let (worker, relay_conn) = tokio::join!(connecting, async { relay.accept().await.expect("incoming").await });
        let (worker, relay_conn) = (worker.expect("worker side"), relay_conn.expect("relay side"));
        // The worker takes every session stream and keeps it, as a live session does.
        let held = tokio::spawn(async move {
            let mut streams = Vec::new();
            while let Ok(pair) = worker.accept_bi().await {
                streams.push(pair);
            }
            streams.len()
        });
        let mut open = Vec::new();
        for _ in 0..wanted {
            match tokio::time::timeout(Duration::from_millis(300), relay_conn.open_bi()).await {
                Ok(Ok((mut send, recv))) => {
                    send.write_all(b"open").await.expect("write");
                    open.push((send, recv));
                }
                _ => break,
            }
        }
        relay_conn.close(quinn::VarInt::from_u32(close_code::SHUTDOWN), b"done");
        let _ = held.await;
        open.len()
    }

    #[tokio::test]
    async fn a_tunnel_carries_as_many_sessions_as_the_worker_has_capacity() {
        assert_eq!(session_streams_held(150, 150).await, 150, "capacity 150 serves 150");
        assert_eq!(session_streams_held(1000, 1000).await, 1000);
        // And no more than the capacity allows: the relay cannot pile streams on a worker.
        let small = session_streams_held(20, 150).await;
        assert_eq!(small, session_stream_limit(20) as usize);
        assert!(small < 150);
    }

    #[test]
    fn fingerprints_parse_with_or_without_colons() {
        let hex64 = "ab".repeat(32);
        let colons = vec!["AB"; 32].join(":");
        assert_eq!(parse_fingerprint(&hex64).expect("hex"), [0xab; 32]);
        assert_eq!(parse_fingerprint(&format!("{colons}\n")).expect("colons"), [0xab; 32]);
        assert!(parse_fingerprint("abcd").is_err());
        assert!(parse_fingerprint("zz").is_err());
    }
}
