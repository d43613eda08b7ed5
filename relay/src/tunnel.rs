//! The relay's end of the worker tunnels: a QUIC listener, the handshake, the control stream.
//!
//! Each accepted connection gets its own task, owned by a `TaskTracker` so shutdown can wait for
//! all of them. The handshake runs inside that task under a deadline, never in the accept loop,
//! so one slow or hostile worker cannot stall others. Once registered, the task watches the
//! control stream (ping/pong, draining) until the connection ends, then unregisters the worker
//! unless a newer tunnel from the same worker id has already replaced it.
//!
//! Before a worker has proved the secret it is anonymous, and anyone can start a QUIC handshake.
//! What it may cost is bounded: at most `max_pending_handshakes` connections are between accept
//! and registration at once (more are refused at once), above `retry_above_pending` a client must
//! first prove its address with a stateless Retry, the whole handshake has one deadline, a worker
//! may open two streams (its control stream and a spare; session streams are the relay's) and no
//! unidirectional ones, and the receive windows are bounded, so unread data cannot pile up.

use crate::registry::{SessionSlot, WorkerHandle};
use crate::tls::ServerCerts;
use crate::AppState;
use avatar_proto::stream::{send_frame, FramedRecv, StreamError};
use avatar_proto::tunnel::{
    valid_worker_id, verify_auth_proof, Control, SessionFrame, SessionOpen, ALPN, EXPORTER_LABEL, EXPORTER_LEN,
    NONCE_LEN, PROTOCOL_VERSION,
};
use rand::RngCore;
use serde::de::DeserializeOwned;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, info_span, warn, Instrument};

pub use avatar_proto::tunnel::close_code;

#[derive(Debug, thiserror::Error)]
pub enum TunnelError {
    #[error("connection: {0}")]
    Connection(#[from] quinn::ConnectionError),
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

/// The next message, which must be there: the stream ending first is a protocol error.
async fn expect<T: DeserializeOwned>(recv: &mut FramedRecv<quinn::RecvStream>, what: &str) -> Result<T, TunnelError> {
    recv.next()
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

/// Connections between accept and registration, counted until registered or gone.
struct Pending(Arc<AtomicUsize>);

impl Pending {
    fn new(count: &Arc<AtomicUsize>) -> Self {
        count.fetch_add(1, Ordering::Relaxed);
        Self(Arc::clone(count))
    }
}

impl Drop for Pending {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What to do with a new connection while `pending` others are unauthenticated.
#[derive(Debug, PartialEq, Eq)]
enum Admission {
    Accept,
    /// Make the client prove its address first (stateless for the relay).
    Retry,
    Refuse,
}

fn admission(pending: usize, validated: bool, cfg: &crate::config::TunnelConfig) -> Admission {
    if pending >= cfg.max_pending_handshakes {
        Admission::Refuse
    } else if pending >= cfg.retry_above_pending && !validated {
        Admission::Retry
    } else {
        Admission::Accept
    }
}

/// Accept tunnels until `shutdown`, then close every connection and wait for them to go idle.
pub async fn serve(endpoint: quinn::Endpoint, state: Arc<AppState>, shutdown: CancellationToken) {
    let tasks = TaskTracker::new();
    let pending = Arc::new(AtomicUsize::new(0));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            incoming = endpoint.accept() => {
                let Some(incoming) = incoming else { break };
                let now = pending.load(Ordering::Relaxed);
                match admission(now, incoming.remote_address_validated(), &state.config.tunnel) {
                    Admission::Accept => {}
                    Admission::Retry if incoming.may_retry() => {
                        metrics::counter!("relay_tunnel_handshakes_refused_total", "reason" => "retry").increment(1);
                        let _ = incoming.retry();
                        continue;
                    }
                    Admission::Retry | Admission::Refuse => {
                        metrics::counter!("relay_tunnel_handshakes_refused_total", "reason" => "pending").increment(1);
                        if state.log_refusal() {
                            info!(remote = %incoming.remote_address(), pending = now, "tunnel refused: too many unauthenticated connections");
                        }
                        incoming.refuse();
                        continue;
                    }
                }
                let guard = Pending::new(&pending);
                let state = Arc::clone(&state);
                let shutdown = shutdown.clone();
                let remote = incoming.remote_address();
                tasks.spawn(
                    async move {
                        if let Err(e) = handle_connection(incoming, state, shutdown, guard).await {
                            info!(error = %e, "tunnel ended");
                        }
                    }
                    .instrument(info_span!("tunnel", %remote)),
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

async fn handle_connection(
    incoming: quinn::Incoming,
    state: Arc<AppState>,
    shutdown: CancellationToken,
    pending: Pending,
) -> Result<(), TunnelError> {
    // One deadline for the QUIC handshake and ours together.
    let deadline = tokio::time::Instant::now() + Duration::from_millis(state.config.tunnel.handshake_timeout_ms);
    let conn = match tokio::time::timeout_at(deadline, incoming).await {
        Ok(conn) => conn?,
        Err(_) => {
            info!("QUIC handshake timed out");
            return Err(TunnelError::Timeout);
        }
    };
    let (worker, mut send, mut recv) = match tokio::time::timeout_at(deadline, handshake(&conn, &state)).await {
        Ok(Ok(done)) => {
            drop(pending);
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
    let span = info_span!("worker", worker_id = %worker.id);
    async {
        metrics::counter!("relay_tunnel_registrations_total").increment(1);
        if let Some(old) = state.registry.insert(Arc::clone(&worker)) {
            info!(old_generation = old.generation, "replaced stale registration of the same worker");
        }
        info!(
            avatars = ?worker.registration.avatars,
            capacity = worker.registration.capacity,
            "worker registered"
        );
        let result = control_loop(&conn, &worker, &mut send, &mut recv, &shutdown).await;
        if state.registry.remove(&worker.id, worker.generation) {
            info!(reason = %conn.close_reason().map(|r| r.to_string()).unwrap_or_else(|| "control stream ended".into()), "worker unregistered");
        }
        result
    }
    .instrument(span)
    .await
}

fn truncate_reason(s: &str) -> &[u8] {
    let b = s.as_bytes();
    &b[..b.len().min(200)]
}

async fn handshake(
    conn: &quinn::Connection,
    state: &AppState,
) -> Result<(Arc<WorkerHandle>, quinn::SendStream, FramedRecv<quinn::RecvStream>), TunnelError> {
    let (mut send, recv) = conn.accept_bi().await?;
    let mut recv = FramedRecv::new(recv);
    let (protocol, worker_id) = match expect::<Control>(&mut recv, "hello").await? {
        Control::Hello {
            protocol, worker_id, ..
        } => (protocol, worker_id),
        other => return Err(TunnelError::Protocol(format!("expected hello, got {other:?}"))),
    };
    let reject = TunnelError::Rejected;
    if protocol != PROTOCOL_VERSION {
        let reason = format!("protocol {protocol} not supported; this relay speaks {PROTOCOL_VERSION}");
        send_frame(&mut send, &Control::Rejected { reason: reason.clone() }).await?;
        return Err(reject(reason));
    }
    if !valid_worker_id(&worker_id) {
        let reason = "worker id must be 1-64 characters of [A-Za-z0-9-_.:]".to_owned();
        send_frame(&mut send, &Control::Rejected { reason: reason.clone() }).await?;
        return Err(reject(reason));
    }
    let mut nonce = [0u8; NONCE_LEN];
    rand::thread_rng().fill_bytes(&mut nonce);
    let nonce = hex::encode(nonce);
    send_frame(
        &mut send,
        &Control::Challenge {
            protocol: PROTOCOL_VERSION,
            relay_id: state.config.relay_id.clone(),
            nonce: nonce.clone(),
        },
    )
    .await?;
    let proof = match expect::<Control>(&mut recv, "auth").await? {
        Control::Auth { proof } => proof,
        other => return Err(TunnelError::Protocol(format!("expected auth, got {other:?}"))),
    };
    let mut exporter = [0u8; EXPORTER_LEN];
    conn.export_keying_material(&mut exporter, EXPORTER_LABEL, b"")
        .map_err(|_| TunnelError::Protocol("TLS exporter unavailable".into()))?;
    if !verify_auth_proof(
        state.config.tunnel.secret.expose().as_bytes(),
        &nonce,
        &worker_id,
        &exporter,
        &proof,
    ) {
        warn!(%worker_id, "worker failed authentication");
        send_frame(
            &mut send,
            &Control::Rejected {
                reason: "authentication failed".into(),
            },
        )
        .await?;
        return Err(reject("authentication failed".into()));
    }
    let registration = match expect::<Control>(&mut recv, "register").await? {
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
        send_frame(&mut send, &Control::Rejected { reason: reason.clone() }).await?;
        return Err(reject(reason));
    }
    send_frame(
        &mut send,
        &Control::Registered {
            relay_id: state.config.relay_id.clone(),
        },
    )
    .await?;
    let generation = state.registry.next_generation();
    let worker = Arc::new(WorkerHandle::new(worker_id, registration, conn.clone(), generation));
    Ok((worker, send, recv))
}

async fn control_loop(
    conn: &quinn::Connection,
    worker: &WorkerHandle,
    send: &mut quinn::SendStream,
    recv: &mut FramedRecv<quinn::RecvStream>,
    shutdown: &CancellationToken,
) -> Result<(), TunnelError> {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => {
                conn.close(quinn::VarInt::from_u32(close_code::SHUTDOWN), b"relay shutting down");
                return Ok(());
            }
            msg = recv.next::<Control>() => match msg? {
                Some(Control::Ping { seq, sent_ms }) => send_frame(send, &Control::Pong { seq, sent_ms }).await?,
                Some(Control::Pong { .. }) => {}
                Some(Control::Draining {}) => {
                    info!("worker is draining: no new sessions");
                    worker.set_draining();
                }
                Some(_) => debug!("ignoring an unexpected control message"),
                None => return Ok(()),
            },
        }
    }
}

/// Open a session stream on the slot's worker and send the opening frames.
pub async fn open_session(
    slot: &SessionSlot,
    open: SessionOpen,
    first: SessionFrame,
) -> Result<(quinn::SendStream, FramedRecv<quinn::RecvStream>), TunnelError> {
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
        let cfg = crate::config::TunnelConfig {
            max_pending_handshakes: 8,
            retry_above_pending: 2,
            ..Default::default()
        };
        assert_eq!(admission(0, false, &cfg), Admission::Accept);
        assert_eq!(admission(1, false, &cfg), Admission::Accept);
        assert_eq!(admission(2, false, &cfg), Admission::Retry);
        assert_eq!(
            admission(2, true, &cfg),
            Admission::Accept,
            "address proven by the Retry"
        );
        assert_eq!(admission(7, true, &cfg), Admission::Accept);
        assert_eq!(admission(8, true, &cfg), Admission::Refuse);
        assert_eq!(admission(100, false, &cfg), Admission::Refuse);
    }
}
