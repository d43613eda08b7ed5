//! The worker's end of the tunnel: dial each relay, prove the shared secret, register, then
//! serve the session streams the relay opens.
//!
//! The worker only dials out, so a GPU box behind NAT needs no inbound port. Each relay gets its
//! own task that reconnects forever with **full-jitter** exponential backoff (a random wait in
//! `[0, min(cap, base·2^attempt)]`), so a fleet of workers does not stampede a relay that comes
//! back. The relay's certificate is pinned by SHA-256 fingerprint or checked against a CA file.

use crate::config::RelayTarget;
use crate::session::run_session;
use crate::Context;
use avatar_proto::stream::{send_frame, FramedRecv, StreamError};
use avatar_proto::tunnel::{
    auth_proof, close_code, Control, Registration, ALPN, EXPORTER_LABEL, EXPORTER_LEN, PROTOCOL_VERSION,
};
use rand::Rng;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, SignatureScheme};
use sha2::{Digest, Sha256};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{info, info_span, warn, Instrument};

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connect: {0}")]
    Connect(#[from] quinn::ConnectError),
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
    #[error("{0}")]
    Stream(#[from] StreamError),
    #[error("relay refused us: {0}")]
    Rejected(String),
    #[error("protocol: {0}")]
    Protocol(String),
    #[error("trust settings: {0}")]
    Trust(String),
    #[error("resolving {0}: no address")]
    Resolve(String),
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

/// Session streams the relay may have open at once on one tunnel, for a worker of `capacity`:
/// every session one stream, plus room for streams that are closing while their replacements
/// open (quinn's default of 100 would cap a worker at 100 sessions whatever its capacity).
pub fn session_stream_limit(capacity: u32) -> u32 {
    capacity.saturating_add(capacity / 4).saturating_add(16)
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

pub fn client_config(
    target: &RelayTarget,
    idle: Duration,
    keepalive: Duration,
    capacity: u32,
) -> Result<quinn::ClientConfig, TunnelError> {
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
    tls.alpn_protocols = vec![ALPN.to_vec()];
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

/// Keep a tunnel to `target` until `shutdown`.
pub async fn maintain(target: RelayTarget, ctx: Arc<Context>, shutdown: CancellationToken) {
    let span = info_span!("relay", address = %target.address);
    async move {
        let mut attempt = 0u32;
        while !shutdown.is_cancelled() {
            match connect_and_serve(&target, &ctx, &shutdown).await {
                Ok(()) => attempt = 0,
                Err(e) => {
                    warn!(error = %e, "tunnel failed");
                    metrics::counter!("worker_tunnel_failures_total").increment(1);
                    attempt = attempt.saturating_add(1);
                }
            }
            if shutdown.is_cancelled() {
                break;
            }
            let wait = backoff(attempt, &mut rand::thread_rng());
            info!(wait_ms = wait.as_millis() as u64, "reconnecting");
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }
    .instrument(span)
    .await
}

async fn connect_and_serve(
    target: &RelayTarget,
    ctx: &Arc<Context>,
    shutdown: &CancellationToken,
) -> Result<(), TunnelError> {
    let addr = tokio::net::lookup_host(&target.address)
        .await
        .map_err(|_| TunnelError::Resolve(target.address.clone()))?
        .next()
        .ok_or_else(|| TunnelError::Resolve(target.address.clone()))?;
    let server_name = target.server_name.clone().unwrap_or_else(|| {
        target
            .address
            .rsplit_once(':')
            .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
            .unwrap_or_default()
    });
    let config = client_config(target, ctx.tunnel_idle, ctx.tunnel_keepalive, ctx.config.capacity)?;
    let bind: std::net::SocketAddr = if addr.is_ipv6() { "[::]:0" } else { "0.0.0.0:0" }
        .parse()
        .map_err(|_| TunnelError::Protocol("bind address".into()))?;
    let endpoint = quinn::Endpoint::client(bind).map_err(|e| TunnelError::Protocol(format!("binding UDP: {e}")))?;
    let connecting = endpoint.connect_with(config, addr, &server_name)?;
    let conn = tokio::time::timeout(CONNECT_TIMEOUT, connecting)
        .await
        .map_err(|_| TunnelError::Protocol(format!("no handshake within {CONNECT_TIMEOUT:?}")))??;
    let result = serve(&conn, ctx, shutdown).await;
    conn.close(quinn::VarInt::from_u32(close_code::SHUTDOWN), b"worker closing");
    // Give the close a moment to reach the relay so it unregisters us at once.
    let _ = tokio::time::timeout(Duration::from_millis(500), endpoint.wait_idle()).await;
    result
}

async fn serve(conn: &quinn::Connection, ctx: &Arc<Context>, shutdown: &CancellationToken) -> Result<(), TunnelError> {
    let (mut send, recv) = conn.open_bi().await?;
    let mut recv = FramedRecv::new(recv);
    let worker_id = ctx.config.worker_id.clone();
    send_frame(
        &mut send,
        &Control::Hello {
            protocol: PROTOCOL_VERSION,
            worker_id: worker_id.clone(),
            software: format!("avatar-worker/{}", env!("CARGO_PKG_VERSION")),
        },
    )
    .await?;
    let (relay_id, nonce) = match recv.next::<Control>().await? {
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
    let mut exporter = [0u8; EXPORTER_LEN];
    conn.export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
        .map_err(|_| TunnelError::Protocol("TLS exporter unavailable".into()))?;
    let proof = auth_proof(ctx.config.secret.expose().as_bytes(), &nonce, &worker_id, &exporter);
    send_frame(&mut send, &Control::Auth { proof }).await?;
    let registration = Registration {
        avatars: ctx.avatars.ids(),
        capacity: ctx.config.capacity,
        labels: ctx.config.labels.clone(),
    };
    send_frame(&mut send, &Control::Register(registration)).await?;
    match recv.next::<Control>().await {
        Ok(Some(Control::Registered { .. })) => {}
        Ok(Some(Control::Rejected { reason })) => return Err(TunnelError::Rejected(reason)),
        Ok(other) => return Err(TunnelError::Protocol(format!("expected registered, got {other:?}"))),
        // A relay that refuses us may close the connection before our read sees `Rejected`.
        Err(e) => match quic_close_reason(&e) {
            Some(reason) => return Err(TunnelError::Rejected(reason)),
            None => return Err(e.into()),
        },
    }
    info!(%relay_id, "registered with relay");
    metrics::counter!("worker_tunnel_registrations_total").increment(1);
    let mut rtt_tick = tokio::time::interval(Duration::from_secs(2));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                let _ = send_frame(&mut send, &Control::Draining {}).await;
                // Sessions obey the same token and say goodbye over this connection: let them
                // finish before the caller closes it.
                let deadline = tokio::time::Instant::now() + Duration::from_secs(2);
                while ctx.active_sessions() > 0 && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                return Ok(());
            }
            stream = conn.accept_bi() => {
                let (s, r) = stream?;
                let ctx = Arc::clone(ctx);
                let shutdown = shutdown.clone();
                ctx.sessions.spawn(run_session(s, r, Arc::clone(&ctx), shutdown));
            }
            _ = rtt_tick.tick() => {
                metrics::gauge!("worker_tunnel_rtt_seconds", "relay" => relay_id.clone()).set(conn.rtt().as_secs_f64());
            }
            msg = recv.next::<Control>() => match msg? {
                Some(Control::Ping { seq, sent_ms }) => send_frame(&mut send, &Control::Pong { seq, sent_ms }).await?,
                Some(_) => {}
                None => return Err(TunnelError::Protocol("relay closed the control stream".into())),
            },
        }
    }
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
