//! One browser WebSocket, from upgrade to close.
//!
//! The loop waits on several things at once: shutdown, the idle and session-length timers, the
//! worker's next frame (once a worker is attached) and the browser's next message. Every browser message goes through the pure
//! [`SignalingSession`] state machine, which says what to do; this module only does it. The loop
//! is generic over `Sink`/`Stream` of axum messages, so tests can drive it with channels.

use crate::conn::{RecvHalf, SendHalf};
use crate::policy::{self, MessageKind, MessageRequest, Principal, Verdict};
use crate::registry::SessionSlot;
use crate::routing::{self, RouteRequest};
use crate::tunnel::open_session;
use crate::{AppState, ClaimRefused};
use avatar_proto::session::{Action, SignalingSession};
use avatar_proto::signaling::{decode_client_message, ClientMessage, ErrorCode, Id, Offer, ServerEvent};
use avatar_proto::stream::{send_frame, FramedRecv, StreamError};
use avatar_proto::tunnel::{SessionFrame, SessionOpen};
use axum::extract::ws::{CloseFrame, Message};
use futures::{Sink, SinkExt, Stream, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn, Instrument};

/// A session attached to a worker.
struct Attached {
    // Dropping the slot returns the worker's capacity.
    _slot: SessionSlot,
    send: SendHalf,
    recv: FramedRecv<RecvHalf>,
    /// Who runs the session, for its `session.started` webhook.
    about: serde_json::Value,
}

/// What the webhooks need to know of a session, as it goes (boxed: the session's future, held
/// for every idle socket, stays small).
struct Ledger {
    /// When a worker answered the first offer (`session.started`).
    started: Option<std::time::Instant>,
    ended_at: Option<std::time::Instant>,
    end_reason: &'static str,
    /// Recordings the workers finished, announced after `session.ended`.
    recordings: Vec<serde_json::Value>,
}

impl Default for Ledger {
    fn default() -> Self {
        Self {
            started: None,
            ended_at: None,
            end_reason: "browser_left",
            recordings: Vec::new(),
        }
    }
}

impl Ledger {
    /// `session.ended`'s data (if the session started), and the recordings to announce after it.
    fn close(&mut self) -> (Option<serde_json::Value>, Vec<serde_json::Value>) {
        let end = self.ended_at.unwrap_or_else(std::time::Instant::now);
        let ended = self.started.map(|at| {
            serde_json::json!({
                "duration_s": (end.saturating_duration_since(at).as_secs_f64() * 1000.0).round() / 1000.0,
                "reason": self.end_reason,
            })
        });
        (ended, std::mem::take(&mut self.recordings))
    }
}

/// A finished turn from the worker, as its `transcript.*` webhook.
fn record(state: &AppState, session_id: &str, turn: avatar_proto::api::TranscriptTurn) {
    let kind = match turn.speaker {
        avatar_proto::api::Speaker::User => crate::webhooks::TRANSCRIPT_USER,
        avatar_proto::api::Speaker::Assistant => crate::webhooks::TRANSCRIPT_ASSISTANT,
    };
    match serde_json::to_value(turn) {
        Ok(data) => state.webhooks.emit(session_id, kind, data),
        Err(e) => warn!(error = %e, "a transcript turn could not be written"),
    }
}

/// WebSocket close codes used here.
const NORMAL: u16 = 1000;
const GOING_AWAY: u16 = 1001;
const POLICY: u16 = 1008;
const PROTOCOL_ERROR: u16 = 1002;
const INVALID_PAYLOAD: u16 = 1007;
const TOO_BIG: u16 = 1009;
/// How long a socket closed for a bad frame stays open, so its close frame arrives.
const CLOSE_LINGER: Duration = Duration::from_millis(500);

/// The close frame a read error deserves (RFC 6455 §7.4.1), or `None` when the connection itself
/// is gone and nothing can be sent. The library leaves the socket open for writing after a
/// message it refused, so the browser learns why instead of seeing a dropped connection (1006).
fn close_for_read_error(e: &(dyn std::error::Error + 'static)) -> Option<(u16, &'static str)> {
    use tungstenite::error::{Error, ProtocolError};
    // axum wraps the library's error: look along the chain of sources.
    let found = std::iter::successors(Some(e), |e| e.source()).find_map(|e| e.downcast_ref::<Error>())?;
    match found {
        Error::Capacity(_) => Some((TOO_BIG, "message too big: over http.max_frame_bytes")),
        Error::Utf8(_) => Some((INVALID_PAYLOAD, "a text message must be valid UTF-8")),
        Error::Protocol(ProtocolError::ResetWithoutClosingHandshake) => None,
        Error::Protocol(_) => Some((PROTOCOL_ERROR, "WebSocket protocol error")),
        _ => None,
    }
}

/// Send `ev` to the browser, counting error events by code. `false` when the socket failed, or
/// when the browser did not take the event within `within`: a client that stops reading would
/// otherwise hold this task (and the session) forever, since nothing else runs while it waits.
async fn send_event<S: Sink<Message> + Unpin>(socket: &mut S, ev: &ServerEvent, within: Duration) -> bool {
    if let ServerEvent::Error { code, .. } = ev {
        metrics::counter!("relay_signaling_errors_total", "code" => code.as_str()).increment(1);
    }
    match tokio::time::timeout(within, socket.send(Message::Text(ev.to_json().into()))).await {
        Ok(sent) => sent.is_ok(),
        Err(_) => {
            metrics::counter!("relay_sockets_not_reading_total").increment(1);
            info!("the browser is not reading its events; closing the socket");
            false
        }
    }
}

async fn close<S: Sink<Message> + Unpin>(socket: &mut S, code: u16, reason: &'static str, within: Duration) {
    let frame = Message::Close(Some(CloseFrame {
        code,
        reason: reason.into(),
    }));
    let _ = tokio::time::timeout(within, socket.send(frame)).await;
}

/// Counts a live browser socket in `relay_sessions_active` for as long as it exists.
struct ActiveGauge;

impl ActiveGauge {
    fn new() -> Self {
        metrics::counter!("relay_sessions_total").increment(1);
        metrics::gauge!("relay_sessions_active").increment(1.0);
        Self
    }
}

impl Drop for ActiveGauge {
    fn drop(&mut self) {
        metrics::gauge!("relay_sessions_active").decrement(1.0);
    }
}

/// A socket the auth policy refused: tell the browser why, then close (1008, policy violation).
pub async fn refuse<S: Sink<Message> + Unpin>(socket: S, reason: String, within: Duration) {
    turn_away(
        socket,
        ServerEvent::error(ErrorCode::Unauthorized, reason),
        "unauthorized",
        within,
    )
    .await;
}

/// Send the browser the error that refuses its socket, then close it (1008).
async fn turn_away<S: Sink<Message> + Unpin>(mut socket: S, ev: ServerEvent, reason: &'static str, within: Duration) {
    send_event(&mut socket, &ev, within).await;
    close(&mut socket, POLICY, reason, within).await;
}

/// Ask the auth module about one message; `Err` carries the event to send instead of acting.
async fn check_message(
    state: &AppState,
    session_id: &str,
    principal: Option<&Principal>,
    msg: &ClientMessage,
) -> Result<(), ServerEvent> {
    let Some(policies) = state.policies.as_ref().filter(|p| p.has_auth()) else {
        return Ok(());
    };
    let (kind, avatar_id) = match msg {
        ClientMessage::WebrtcOffer(o) => (MessageKind::Offer, o.avatar_id.clone()),
        ClientMessage::WebrtcIceCandidate(_) => (MessageKind::IceCandidate, None),
        ClientMessage::TextWebrtc(t) => (MessageKind::Text, t.avatar_id.clone()),
        ClientMessage::Interrupt {} => (MessageKind::Interrupt, None),
    };
    let request = MessageRequest {
        session_id: session_id.to_owned(),
        kind,
        user_id: principal.map(|p| p.user_id.clone()).unwrap_or_default(),
        avatar_id,
        now_ms: policy::now_ms(),
    };
    match policies.authorize_message(request).await {
        None | Some(Ok(Verdict::Allow)) => Ok(()),
        Some(Ok(Verdict::Deny(reason))) => {
            info!(kind = msg.kind(), %reason, "message refused by the auth policy");
            Err(ServerEvent::error(ErrorCode::Unauthorized, reason))
        }
        Some(Err(e)) => {
            warn!(kind = msg.kind(), error = %e, "auth policy failed; refusing the message (fail closed)");
            Err(ServerEvent::error(
                ErrorCode::Unauthorized,
                format!(
                    "`{}` refused: authorization is unavailable right now (policy error)",
                    msg.kind()
                ),
            ))
        }
    }
}

/// What woke the session loop.
enum Wake<E> {
    Shutdown,
    Idle,
    Expired,
    Worker(Result<Option<SessionFrame>, StreamError>),
    Browser(Option<Result<Message, E>>),
}

/// Wait for the next thing the session loop must handle. Kept apart from the handling (whose
/// rare, larger futures are boxed) so that an idle socket holds only these few timers and reads.
///
/// Biased: shutdown first, then the worker's frames before the browser's next message, so a
/// session the worker has just ended is detached before a new offer is handled.
async fn wait<S, E>(
    socket: &mut S,
    attached: Option<&mut Attached>,
    shutdown: &CancellationToken,
    idle_at: Option<tokio::time::Instant>,
    expires: tokio::time::Instant,
) -> Wake<E>
where
    S: Stream<Item = Result<Message, E>> + Unpin,
{
    let worker_frame = async {
        match attached {
            Some(a) => a.recv.next::<SessionFrame>().await,
            None => std::future::pending().await,
        }
    };
    let idle_timer = async {
        match idle_at {
            Some(at) => tokio::time::sleep_until(at).await,
            None => std::future::pending().await,
        }
    };
    tokio::select! {
        biased;
        _ = shutdown.cancelled() => Wake::Shutdown,
        _ = idle_timer => Wake::Idle,
        _ = tokio::time::sleep_until(expires) => Wake::Expired,
        frame = worker_frame => Wake::Worker(frame),
        msg = socket.next() => Wake::Browser(msg),
    }
}

pub async fn run_session<S, E>(
    mut socket: S,
    session_id: String,
    principal: Option<Principal>,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) where
    S: Sink<Message> + Stream<Item = Result<Message, E>> + Unpin,
    E: std::error::Error + 'static,
{
    // The `[limits]` in force now hold for the whole session (a reload applies to the next one).
    let (write, idle, max_session_ms) = {
        let live = state.live();
        let l = &live.limits;
        (
            Duration::from_millis(l.write_timeout_ms),
            Duration::from_millis(l.idle_timeout_ms),
            l.max_session_ms,
        )
    };
    let owner = principal.as_ref().map(|p| p.user_id.as_str());
    let _claim = match state.claim_session(&session_id, owner) {
        Ok(claim) => claim,
        Err(refused) => {
            let message = match refused {
                ClaimRefused::InUse => {
                    info!("refused: another live socket uses this session id");
                    "another connection is using this session_id; pick a fresh one for each connection"
                }
                ClaimRefused::BoundToAnother => {
                    info!("refused: the session id is bound to another user");
                    "this session_id belongs to another user; pick a fresh one for each connection"
                }
            };
            let ev = ServerEvent::error(ErrorCode::SessionInUse, message);
            Box::pin(turn_away(socket, ev, "session id in use", write)).await;
            return;
        }
    };
    let _gauge = ActiveGauge::new();
    let expires = tokio::time::Instant::now() + Duration::from_millis(max_session_ms);
    let mut idle_deadline = tokio::time::Instant::now() + idle;
    let mut session = SignalingSession::new(state.config.http.max_message_bytes);
    let mut attached: Option<Attached> = None;
    let mut ledger = Box::<Ledger>::default();
    info!("browser connected");
    // Set when the relay itself is going away: the session's media must outlive it.
    let mut relay_stopping = false;
    if state.ice.enabled() {
        let user = principal.as_ref().map_or(session_id.as_str(), |p| p.user_id.as_str());
        let ev = ServerEvent::IceServers {
            ice_servers: state
                .ice
                .servers(crate::ice::TurnUser::Browser(user), crate::ice::unix_now()),
            ttl_s: state.ice.ttl_s(),
        };
        Box::pin(send_event(&mut socket, &ev, write)).await;
    }
    'session: loop {
        // Only a socket with no worker session can be idle: a user watching the avatar sends nothing.
        let idle_at = attached.is_none().then_some(idle_deadline);
        let woke = wait(&mut socket, attached.as_mut(), &shutdown, idle_at, expires).await;
        let out: Vec<ServerEvent> = match woke {
            Wake::Shutdown => {
                Box::pin(close(&mut socket, GOING_AWAY, "relay shutting down", write)).await;
                relay_stopping = true;
                ledger.end_reason = "relay_stopped";
                break;
            }
            Wake::Idle => {
                info!("idle timeout");
                ledger.end_reason = "idle";
                let ev = ServerEvent::error(
                    ErrorCode::IdleTimeout,
                    format!(
                        "no session and no message for {} s; reconnect to start again",
                        idle.as_secs()
                    ),
                );
                Box::pin(send_event(&mut socket, &ev, write)).await;
                Box::pin(close(&mut socket, NORMAL, "idle", write)).await;
                break;
            }
            Wake::Expired => {
                info!("maximum session duration reached");
                ledger.end_reason = "expired";
                let ev = ServerEvent::error(
                    ErrorCode::SessionExpired,
                    "this session reached its maximum duration; reconnect to continue",
                );
                Box::pin(send_event(&mut socket, &ev, write)).await;
                Box::pin(close(&mut socket, NORMAL, "session expired", write)).await;
                break;
            }
            Wake::Worker(frame) => match frame {
                Ok(Some(SessionFrame::Event(ev))) => match session.worker_event(ev) {
                    Action::Route(offer) => {
                        // The worker refused as full (another relay of a fleet may have filled
                        // it): count it full until it reports, and try the next worker.
                        if let Some(worker) = session.refused_by().last().and_then(|id| state.registry.get(id)) {
                            info!(worker_id = %worker.id, "worker refused the session as busy; routing it on");
                            metrics::counter!("relay_sessions_rerouted_total").increment(1);
                            worker.refused_as_busy();
                        }
                        attached = None;
                        let ctx = Ctx {
                            session_id: &session_id,
                            principal: principal.as_ref(),
                            state: &state,
                        };
                        Box::pin(perform(Action::Route(offer), &mut session, &mut attached, &ctx)).await
                    }
                    Action::Reply(ev) => vec![ev],
                    Action::Forward(_) | Action::Ignore => vec![],
                },
                Ok(Some(SessionFrame::Record(turn))) => {
                    record(&state, &session_id, turn);
                    vec![]
                }
                Ok(Some(SessionFrame::Recording(done))) => {
                    ledger.recordings.extend(serde_json::to_value(done).ok());
                    vec![]
                }
                Ok(Some(SessionFrame::Close { reason })) => {
                    info!(%reason, "worker closed the session");
                    idle_deadline = tokio::time::Instant::now() + idle;
                    attached = None;
                    let action = session.worker_closed();
                    let ctx = Ctx {
                        session_id: &session_id,
                        principal: principal.as_ref(),
                        state: &state,
                    };
                    Box::pin(perform(action, &mut session, &mut attached, &ctx)).await
                }
                Ok(Some(_)) => {
                    // Not the frame itself: message bodies never reach the logs.
                    warn!("unexpected frame from worker; dropping the session");
                    attached = None;
                    session.worker_lost().into_iter().collect()
                }
                Ok(None) | Err(_) => {
                    if let Err(e) = &frame {
                        info!(error = %e, "worker stream failed");
                    }
                    attached = None;
                    idle_deadline = tokio::time::Instant::now() + idle;
                    session.worker_lost().into_iter().collect()
                }
            },
            Wake::Browser(msg) => {
                // Only valid signaling keeps an idle socket open: pings, binary frames and
                // messages that fail to decode or are refused do not reset the timer.
                match msg {
                    None | Some(Ok(Message::Close(_))) => break,
                    Some(Err(e)) => {
                        debug!(error = %e, "websocket error");
                        ledger.end_reason = "browser_error";
                        if let Some((code, reason)) = close_for_read_error(&e) {
                            Box::pin(close(&mut socket, code, reason, write)).await;
                            // Linger before dropping: closing a socket with unread data resets
                            // it, and some stacks throw away what they received on a reset, the
                            // close frame included, while the browser is still sending.
                            tokio::time::sleep(CLOSE_LINGER.min(write)).await;
                        }
                        break;
                    }
                    Some(Ok(Message::Text(text))) => {
                        // Its size only: bodies carry users' words, SDP and credentials.
                        trace!(bytes = text.len(), "message from the browser");
                        match decode_client_message(text.as_str(), state.config.http.max_message_bytes) {
                            Err(e) => vec![e.to_event()],
                            Ok(msg) => {
                                match Box::pin(check_message(&state, &session_id, principal.as_ref(), &msg)).await {
                                    Err(refused) => vec![refused],
                                    Ok(()) => {
                                        idle_deadline = tokio::time::Instant::now() + idle;
                                        let action = session.on_message(msg);
                                        let ctx = Ctx {
                                            session_id: &session_id,
                                            principal: principal.as_ref(),
                                            state: &state,
                                        };
                                        Box::pin(perform(action, &mut session, &mut attached, &ctx)).await
                                    }
                                }
                            }
                        }
                    }
                    Some(Ok(Message::Binary(_))) => vec![ServerEvent::error(
                        ErrorCode::BadJson,
                        "binary messages are not supported; send JSON text",
                    )],
                    Some(Ok(_)) => vec![], // ping/pong are answered by the server itself
                }
            }
        };
        // The session starts, for the webhooks, when a worker has answered its first offer.
        if let (None, Some(a)) = (ledger.started, &attached) {
            if out.iter().any(|ev| matches!(ev, ServerEvent::WebrtcAnswer { .. })) {
                ledger.started = Some(std::time::Instant::now());
                state
                    .webhooks
                    .emit(&session_id, crate::webhooks::SESSION_STARTED, a.about.clone());
            }
        }
        for ev in out {
            if !Box::pin(send_event(&mut socket, &ev, write)).await {
                ledger.end_reason = "browser_gone";
                break 'session;
            }
            if ev.ends_session() {
                ledger.end_reason = "ended_by_api";
                info!("the service ended the session");
                Box::pin(close(&mut socket, NORMAL, "session ended", write)).await;
                break 'session;
            }
        }
    }
    ledger.ended_at = Some(std::time::Instant::now());
    // A reconnect with this id may start now.
    drop(_claim);
    match attached {
        Some(a) if relay_stopping => {
            // Not the browser leaving: the relay is. End the stream without a `Close` frame, which
            // the worker takes as a lost tunnel, not the end of the session: it detaches it and
            // the video plays on (media never rides the relay) until the browser's peer goes away.
            drop(a);
            info!("relay stopping; the session is left to play on");
        }
        Some(a) => {
            let recv = Box::pin(farewell(a)).await;
            let (ended, recordings) = ledger.close();
            if state.webhooks.enabled() && ended.is_some() {
                info!("browser disconnected");
                tokio::spawn(tail(Arc::clone(&state), session_id.clone(), recv, ended, recordings).in_current_span());
                return;
            }
        }
        None => {}
    }
    let (ended, recordings) = ledger.close();
    finish(&state, &session_id, ended, recordings);
    info!("browser disconnected");
}

/// The browser left: give the worker's slot back and tell the worker to end the session now
/// rather than when the stream drops (best effort). The stream's reading half is left, for what
/// the worker still sends.
async fn farewell(a: Attached) -> FramedRecv<RecvHalf> {
    let Attached {
        _slot, mut send, recv, ..
    } = a;
    drop(_slot);
    let close = SessionFrame::Close {
        reason: "browser left".into(),
    };
    let _ = send_frame(&mut send, &close).await;
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut send).await;
    recv
}

/// How long the worker's last turns may take to arrive after the browser left (they are sent at
/// once), and its recording (hashed once its file is complete: seconds for hours of video).
const TAIL_TURNS: Duration = Duration::from_secs(2);
const TAIL_RECORDING: Duration = Duration::from_secs(600);

/// After the browser left, for the webhooks: the worker closes the answer in progress and sends
/// that turn, then `session.ended` goes out, then the recording once its file is complete.
async fn tail(
    state: Arc<AppState>,
    session_id: String,
    mut recv: FramedRecv<RecvHalf>,
    mut ended: Option<serde_json::Value>,
    mut recordings: Vec<serde_json::Value>,
) {
    loop {
        let within = if ended.is_some() { TAIL_TURNS } else { TAIL_RECORDING };
        match tokio::time::timeout(within, recv.next::<SessionFrame>()).await {
            Ok(Ok(Some(SessionFrame::Record(turn)))) => record(&state, &session_id, turn),
            Ok(Ok(Some(SessionFrame::Recording(done)))) => {
                finish(&state, &session_id, ended.take(), std::mem::take(&mut recordings));
                recordings.extend(serde_json::to_value(done).ok());
            }
            Ok(Ok(Some(_))) => {}
            Ok(Ok(None)) | Ok(Err(_)) => break,
            // No more turns: the session has ended; wait on for a recording.
            Err(_) if ended.is_some() => finish(&state, &session_id, ended.take(), std::mem::take(&mut recordings)),
            Err(_) => {
                debug!("no recording from the worker in time");
                break;
            }
        }
    }
    finish(&state, &session_id, ended, recordings);
}

/// `session.ended` (if not sent yet), then the recordings the worker finished.
fn finish(state: &AppState, session_id: &str, ended: Option<serde_json::Value>, recordings: Vec<serde_json::Value>) {
    if let Some(data) = ended {
        state.webhooks.emit(session_id, crate::webhooks::SESSION_ENDED, data);
    }
    for done in recordings {
        state.webhooks.emit(session_id, crate::webhooks::RECORDING_READY, done);
    }
}

/// Who the session is, for routing.
struct Ctx<'a> {
    session_id: &'a str,
    principal: Option<&'a Principal>,
    state: &'a AppState,
}

async fn perform(
    action: Action,
    session: &mut SignalingSession,
    attached: &mut Option<Attached>,
    ctx: &Ctx<'_>,
) -> Vec<ServerEvent> {
    match action {
        Action::Ignore => vec![],
        Action::Reply(ev) => vec![ev],
        Action::Forward(msg) => {
            let Some(a) = attached.as_mut() else {
                return vec![];
            };
            let frame = SessionFrame::Client(msg);
            if let Err(e) = send_frame(&mut a.send, &frame).await {
                info!(error = %e, "worker stream failed while forwarding");
                *attached = None;
                let SessionFrame::Client(msg) = frame else {
                    return vec![];
                };
                // Not recursive: a forward failure yields a route or a reply, never a forward.
                return match session.forward_failed(msg) {
                    Action::Route(offer) => attach(offer, session, attached, ctx).await,
                    Action::Reply(ev) => vec![ev],
                    Action::Forward(_) | Action::Ignore => vec![],
                };
            }
            vec![]
        }
        Action::Route(offer) => attach(offer, session, attached, ctx).await,
    }
}

/// Route `offer` to a worker and attach the session to it.
async fn attach(
    offer: Offer,
    session: &mut SignalingSession,
    attached: &mut Option<Attached>,
    ctx: &Ctx<'_>,
) -> Vec<ServerEvent> {
    let session_id = ctx.session_id;
    match route(offer.clone(), session.refused_by(), ctx).await {
        Ok((a, worker_id)) => {
            metrics::counter!("relay_sessions_routed_total").increment(1);
            session.attached(worker_id.clone(), offer);
            *attached = Some(a);
            vec![ServerEvent::SessionAssigned {
                session_id: session_id.to_owned(),
                worker_id,
            }]
        }
        Err((code, message)) => vec![session.route_failed(code, message)],
    }
}

async fn route(offer: Offer, refused_by: &[String], ctx: &Ctx<'_>) -> Result<(Attached, String), (ErrorCode, String)> {
    let (session_id, state) = (ctx.session_id, ctx.state);
    let avatar = offer.avatar_id.clone();
    // The admitted principal is who the user is; the offer's `user_id` is only a claim.
    let user_id = match ctx.principal {
        Some(p) => Some(Id::Str(p.user_id.clone())),
        None => offer.user_id.clone(),
    };
    let request = RouteRequest {
        session_id,
        user_id: user_id.as_ref().map(|u| u.to_string()),
        avatar_id: avatar.as_deref(),
        refused_by,
    };
    let worker_id = routing::choose_worker(
        &request,
        ctx.principal,
        state.registry.views(),
        state.router.as_ref(),
        state.policies.as_deref(),
    )
    .await?;
    let worker = state
        .registry
        .get(&worker_id)
        .filter(|w| w.serves(avatar.as_deref()))
        .ok_or((ErrorCode::NoWorker, format!("worker {worker_id} is gone")))?;
    let slot = worker
        .try_acquire()
        .ok_or((ErrorCode::Busy, format!("worker {worker_id} is at capacity")))?;
    let about = serde_json::json!({
        "avatar": avatar,
        "worker": worker_id,
        "relay": state.config.relay_id,
        "user_id": user_id.as_ref().map(|u| u.to_string()),
    });
    let open = SessionOpen {
        session_id: session_id.to_owned(),
        avatar_id: avatar,
        user_id,
        // Turns and the recording, for the webhooks that take them.
        records: [
            crate::webhooks::TRANSCRIPT_USER,
            crate::webhooks::TRANSCRIPT_ASSISTANT,
            crate::webhooks::RECORDING_READY,
        ]
        .iter()
        .any(|kind| state.webhooks.wants(kind)),
        // The worker's own credentials: its answer then carries relay candidates too.
        ice_servers: state
            .ice
            .servers(crate::ice::TurnUser::Worker(&worker_id), crate::ice::unix_now()),
    };
    let opened = tokio::time::timeout(
        Duration::from_secs(3),
        open_session(&slot, open, SessionFrame::Client(ClientMessage::WebrtcOffer(offer))),
    )
    .await;
    match opened {
        Ok(Ok((send, recv))) => {
            info!(%worker_id, "session routed");
            Ok((
                Attached {
                    _slot: slot,
                    send,
                    recv,
                    about,
                },
                worker_id,
            ))
        }
        Ok(Err(e)) => {
            warn!(%worker_id, error = %e, "could not open a session stream");
            Err((
                ErrorCode::WorkerLost,
                format!("worker {worker_id} could not be reached"),
            ))
        }
        Err(_) => Err((
            ErrorCode::WorkerLost,
            format!("worker {worker_id} did not accept the session in time"),
        )),
    }
}

/// The signaling loop in memory: a browser on a channel-backed socket, workers on yamux over
/// `tokio::io::duplex` (the TLS/TCP tunnel's multiplexer without the TLS), registered in a real
/// registry. No process, port or clock beyond tokio's.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::conn::{TcpTunnel, TunnelConn};
    use crate::registry::WorkerHandle;
    use avatar_proto::mux::{self, Incoming, Mux};
    use avatar_proto::tunnel::Registration;
    use futures::channel::mpsc as chan;
    use serde_json::{json, Value};
    use std::convert::Infallible;
    use std::pin::Pin;
    use std::task::{Context, Poll};

    const OFFER_SDP: &str = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n";

    /// The relay's side of a WebSocket whose other side is [`Browser`].
    struct Socket {
        inbound: chan::UnboundedReceiver<Result<Message, Infallible>>,
        outbound: chan::UnboundedSender<Message>,
    }

    impl Stream for Socket {
        type Item = Result<Message, Infallible>;
        fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
            Pin::new(&mut self.inbound).poll_next(cx)
        }
    }

    impl Sink<Message> for Socket {
        type Error = chan::SendError;
        fn poll_ready(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Pin::new(&mut self.outbound).poll_ready(cx)
        }
        fn start_send(mut self: Pin<&mut Self>, item: Message) -> Result<(), Self::Error> {
            Pin::new(&mut self.outbound).start_send(item)
        }
        fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Pin::new(&mut self.outbound).poll_flush(cx)
        }
        fn poll_close(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Pin::new(&mut self.outbound).poll_close(cx)
        }
    }

    struct Browser {
        tx: chan::UnboundedSender<Result<Message, Infallible>>,
        rx: chan::UnboundedReceiver<Message>,
    }

    impl Browser {
        fn send(&self, msg: Value) {
            self.tx
                .unbounded_send(Ok(Message::Text(msg.to_string().into())))
                .expect("the session is running");
        }

        fn send_text(&self, text: &str) {
            self.tx
                .unbounded_send(Ok(Message::Text(text.to_owned().into())))
                .expect("the session is running");
        }

        /// The next event of type `kind`, skipping others; panics after 5 s.
        async fn wait_for(&mut self, kind: &str) -> Value {
            self.events_until(kind).await.pop().expect("the event waited for")
        }

        /// Every event up to and including the next of type `kind`; panics after 5 s.
        async fn events_until(&mut self, kind: &str) -> Vec<Value> {
            let mut seen = Vec::new();
            let wait = async {
                loop {
                    match self.rx.next().await {
                        Some(Message::Text(t)) => {
                            let ev: Value = serde_json::from_str(t.as_str()).expect("JSON event");
                            let done = ev["type"] == kind;
                            seen.push(ev);
                            if done {
                                return seen;
                            }
                        }
                        Some(_) => {}
                        None => panic!("the socket closed before a {kind} event"),
                    }
                }
            };
            tokio::time::timeout(Duration::from_secs(5), wait)
                .await
                .unwrap_or_else(|_| panic!("no {kind} event within 5 s"))
        }
    }

    /// Start the signaling loop for `session_id` on `state`; the browser's end.
    fn connect(state: &Arc<AppState>, session_id: &str) -> Browser {
        let (tx, inbound) = chan::unbounded();
        let (outbound, rx) = chan::unbounded();
        let socket = Socket { inbound, outbound };
        tokio::spawn(run_session(
            socket,
            session_id.to_owned(),
            None,
            Arc::clone(state),
            CancellationToken::new(),
        ));
        Browser { tx, rx }
    }

    /// A worker's end of its tunnel: session streams the relay opens arrive here.
    struct FakeWorker {
        id: String,
        generation: u64,
        mux: Mux,
        incoming: Incoming,
    }

    impl FakeWorker {
        /// Register worker `id` (capacity 2) with `state` over an in-memory multiplexer.
        fn register(state: &AppState, id: &str) -> Self {
            let (relay_io, worker_io) = tokio::io::duplex(256 * 1024);
            let (relay_mux, _, relay_driver) = mux::start(relay_io, mux::Side::Server, 64, 16);
            let (worker_mux, incoming, worker_driver) = mux::start(worker_io, mux::Side::Client, 64, 16);
            tokio::spawn(relay_driver);
            tokio::spawn(worker_driver);
            let remote = std::net::SocketAddr::from(([192, 0, 2, 10], 40000));
            let generation = state.registry.next_generation();
            let handle = WorkerHandle::new(
                id.to_owned(),
                Registration {
                    avatars: vec![],
                    avatar_names: Default::default(),
                    avatar_previews: Default::default(),
                    capacity: 2,
                    labels: Default::default(),
                    instance: None,
                },
                TunnelConn::Tcp(Arc::new(TcpTunnel::new(relay_mux, remote))),
                generation,
            );
            state.registry.insert(Arc::new(handle));
            Self {
                id: id.to_owned(),
                generation,
                mux: worker_mux,
                incoming,
            }
        }

        /// The next session: its open frame and its first client message.
        async fn session(&mut self) -> (SessionOpen, ClientMessage, FakeSession) {
            let stream = tokio::time::timeout(Duration::from_secs(5), self.incoming.recv())
                .await
                .expect("a session within 5 s")
                .expect("the tunnel is up");
            let (recv, send) = tokio::io::split(stream);
            let mut session = FakeSession {
                send: Box::new(send),
                recv: FramedRecv::new(Box::new(recv)),
            };
            let open = match session.next().await {
                Some(SessionFrame::Open(open)) => open,
                other => panic!("expected an open frame, got {other:?}"),
            };
            let first = match session.next().await {
                Some(SessionFrame::Client(msg)) => msg,
                other => panic!("expected the offer, got {other:?}"),
            };
            (open, first, session)
        }

        /// The tunnel breaks (the GPU box is gone): the relay's tunnel task unregisters it.
        fn vanish(self, state: &AppState) {
            state.registry.remove(&self.id, self.generation);
            self.mux.close();
        }
    }

    struct FakeSession {
        send: SendHalf,
        recv: FramedRecv<RecvHalf>,
    }

    impl FakeSession {
        async fn next(&mut self) -> Option<SessionFrame> {
            tokio::time::timeout(Duration::from_secs(5), self.recv.next::<SessionFrame>())
                .await
                .expect("a frame within 5 s")
                .expect("a well-formed frame")
        }

        async fn event(&mut self, ev: ServerEvent) {
            send_frame(&mut self.send, &SessionFrame::Event(ev))
                .await
                .expect("send");
        }

        async fn answer(&mut self) {
            self.event(ServerEvent::WebrtcAnswer {
                sdp: "v=0 answer".into(),
                timestamp: "2026-11-27 18:00:00".into(),
            })
            .await;
        }
    }

    fn state() -> Arc<AppState> {
        AppState::new(crate::config::RelayConfig::dev(), CancellationToken::new())
    }

    fn offer() -> Value {
        json!({"type": "webrtc_offer", "user_id": 5, "avatar_id": "a", "sdp": OFFER_SDP})
    }

    /// Every idle signaling socket holds one of these futures for as long as it is open (issue
    /// 16: at most 10 KiB per idle socket in all). Rare, larger work (routing, policy calls,
    /// sending) is boxed only while it runs; a change that pulls it back inline fails here.
    #[tokio::test]
    async fn an_idle_sessions_future_stays_under_two_kib() {
        let (_tx, inbound) = chan::unbounded();
        let (outbound, _rx) = chan::unbounded();
        // As the relay passes it: boxed, so its state is not copied into the future.
        let socket = Box::new(Socket { inbound, outbound });
        let session = run_session(socket, "s".into(), None, state(), CancellationToken::new());
        let size = std::mem::size_of_val(&session);
        assert!(size < 2048, "the session future is {size} bytes");
    }

    #[tokio::test]
    async fn an_offer_reaches_the_worker_and_its_answer_the_browser() {
        let state = state();
        let mut worker = FakeWorker::register(&state, "gpu-1");
        let mut browser = connect(&state, "s-1");
        browser.send(offer());
        let assigned = browser.wait_for("session_assigned").await;
        assert_eq!(assigned["worker_id"], "gpu-1");
        let (open, first, mut session) = worker.session().await;
        assert_eq!(open.session_id, "s-1");
        assert_eq!(open.avatar_id.as_deref(), Some("a"));
        assert!(matches!(first, ClientMessage::WebrtcOffer(ref o) if o.sdp == OFFER_SDP));
        session.answer().await;
        let answer = browser.wait_for("webrtc_answer").await;
        assert_eq!(answer["sdp"], "v=0 answer");
        // Text and an interrupt are forwarded to the worker as they are.
        browser.send(json!({"type": "text_webrtc", "message": "hello"}));
        assert!(
            matches!(session.next().await, Some(SessionFrame::Client(ClientMessage::TextWebrtc(t))) if t.message == "hello")
        );
        browser.send(json!({"type": "interrupt"}));
        assert!(matches!(
            session.next().await,
            Some(SessionFrame::Client(ClientMessage::Interrupt { .. }))
        ));
        // The worker's events reach the browser.
        session.event(ServerEvent::SpeechStarted { turn: 1 }).await;
        assert_eq!(browser.wait_for("speech_started").await["turn"], 1);
        // The browser leaves: the worker is told, and the slot returns.
        drop(browser);
        assert!(matches!(session.next().await, Some(SessionFrame::Close { .. })));
        assert_eq!(state.registry.get("gpu-1").expect("registered").active(), 0);
    }

    #[tokio::test]
    async fn bad_input_gets_an_error_and_the_session_goes_on() {
        let state = state();
        let mut worker = FakeWorker::register(&state, "gpu-1");
        let mut browser = connect(&state, "s-bad");
        browser.send_text("not json");
        assert_eq!(browser.wait_for("error").await["code"], "bad_json");
        browser.send(json!({"type": "text_webrtc", "message": "too early"}));
        assert_eq!(browser.wait_for("error").await["code"], "no_session");
        browser.send(json!({"type": "webrtc_offer", "sdp": "v=0\r\n"}));
        assert_eq!(browser.wait_for("error").await["code"], "bad_sdp");
        // Still usable: a good offer now plays.
        browser.send(offer());
        browser.wait_for("session_assigned").await;
        let (_, _, mut session) = worker.session().await;
        session.answer().await;
        browser.wait_for("webrtc_answer").await;
    }

    #[tokio::test]
    async fn an_offer_a_worker_closes_unanswered_is_routed_again_once() {
        let state = state();
        let mut first = FakeWorker::register(&state, "gpu-1");
        let mut second = FakeWorker::register(&state, "gpu-2");
        let mut browser = connect(&state, "s-reroute");
        browser.send(offer());
        let chosen = browser.wait_for("session_assigned").await["worker_id"].clone();
        let (closing, other) = if chosen == "gpu-1" {
            (&mut first, &mut second)
        } else {
            (&mut second, &mut first)
        };
        // The chosen worker is shutting down: it drains, then closes the session unanswered.
        let (_, _, mut session) = closing.session().await;
        let id = chosen.as_str().expect("a worker id");
        state.registry.get(id).expect("registered").set_draining();
        send_frame(
            &mut session.send,
            &SessionFrame::Close {
                reason: "worker shutting down".into(),
            },
        )
        .await
        .expect("close");
        // The same offer goes to the other worker, and the browser sees no error.
        let next = browser.wait_for("session_assigned").await;
        assert_ne!(next["worker_id"], chosen, "{next}");
        let (_, again, mut session) = other.session().await;
        assert!(matches!(again, ClientMessage::WebrtcOffer(ref o) if o.sdp == OFFER_SDP));
        // Once only: if this one also ends it unanswered (with its own error), the offer is not
        // routed a third time; the browser's next offer starts afresh.
        session
            .event(ServerEvent::error(
                ErrorCode::PeerFailed,
                "the WebRTC connection failed",
            ))
            .await;
        send_frame(
            &mut session.send,
            &SessionFrame::Close {
                reason: "peer failed".into(),
            },
        )
        .await
        .expect("close");
        assert_eq!(browser.wait_for("error").await["code"], "peer_failed");
        let more = tokio::time::timeout(Duration::from_millis(300), browser.rx.next()).await;
        assert!(more.is_err(), "nothing more follows: {more:?}");
        browser.send(offer());
        browser.wait_for("session_assigned").await;
        let (_, _, mut session) = other.session().await;
        session.answer().await;
        browser.wait_for("webrtc_answer").await;
    }

    #[tokio::test]
    async fn a_worker_lost_after_answering_is_reported_and_a_new_offer_plays_elsewhere() {
        let state = state();
        let mut first = FakeWorker::register(&state, "gpu-1");
        let mut browser = connect(&state, "s-lost");
        browser.send(offer());
        browser.wait_for("session_assigned").await;
        let (_, _, mut session) = first.session().await;
        session.answer().await;
        browser.wait_for("webrtc_answer").await;
        let mut second = FakeWorker::register(&state, "gpu-2");
        first.vanish(&state);
        // The stream ends without a `Close`: the worker is lost, and the browser is told.
        assert_eq!(browser.wait_for("error").await["code"], "worker_lost");
        browser.send(offer());
        assert_eq!(browser.wait_for("session_assigned").await["worker_id"], "gpu-2");
        let (_, _, mut session) = second.session().await;
        session.answer().await;
        browser.wait_for("webrtc_answer").await;
    }

    /// The session a relay opened on one of two workers, and which of them got it.
    async fn session_on_either(a: &mut FakeWorker, b: &mut FakeWorker) -> (String, FakeSession) {
        tokio::select! {
            (_, _, s) = a.session() => (a.id.clone(), s),
            (_, _, s) = b.session() => (b.id.clone(), s),
        }
    }

    #[tokio::test]
    async fn a_busy_worker_hands_the_offer_to_another_and_the_browser_never_sees_busy() {
        let state = state();
        let mut one = FakeWorker::register(&state, "gpu-1");
        let mut two = FakeWorker::register(&state, "gpu-2");
        let mut browser = connect(&state, "s-busy");
        browser.send(offer());
        // Whichever worker gets the offer first is full (another relay filled it).
        let (refuser, mut refused) = session_on_either(&mut one, &mut two).await;
        refused
            .event(ServerEvent::error(ErrorCode::Busy, "this worker is at capacity"))
            .await;
        let (other, mut session) = session_on_either(&mut one, &mut two).await;
        assert_ne!(other, refuser, "the offer went to the worker that had not refused it");
        session.answer().await;
        let events = browser.events_until("webrtc_answer").await;
        assert!(
            events.iter().all(|e| e["type"] != "error"),
            "the browser saw no error: {events:?}"
        );
        // The refuser counts as full until it reports its load again.
        let view = |id: &str| state.registry.views().into_iter().find(|v| v.id == id).expect("view");
        assert_eq!(view(&refuser).active, 2);
        state.registry.get(&refuser).expect("registered").set_reported_load(0);
        assert_eq!(view(&refuser).active, 0);
    }

    #[tokio::test]
    async fn when_every_worker_refuses_the_browser_gets_busy_once() {
        let state = state();
        let mut one = FakeWorker::register(&state, "gpu-1");
        let mut two = FakeWorker::register(&state, "gpu-2");
        let mut browser = connect(&state, "s-full");
        browser.send(offer());
        for _ in 0..2 {
            let (_, mut s) = session_on_either(&mut one, &mut two).await;
            s.event(ServerEvent::error(ErrorCode::Busy, "this worker is at capacity"))
                .await;
        }
        let events = browser.events_until("error").await;
        assert_eq!(events.last().expect("an error")["code"], "busy");
        // The socket stays usable: a worker that frees a slot takes the next offer.
        state.registry.get("gpu-1").expect("registered").set_reported_load(1);
        browser.send(offer());
        assert_eq!(browser.wait_for("session_assigned").await["worker_id"], "gpu-1");
    }
}
