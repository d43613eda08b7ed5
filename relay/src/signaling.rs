//! One browser WebSocket, from upgrade to close.
//!
//! The loop waits on several things at once: shutdown, the idle and session-length timers, the
//! worker's next frame (once a worker is attached) and the browser's next message. Every browser message goes through the pure
//! [`SignalingSession`] state machine, which says what to do; this module only does it. The loop
//! is generic over `Sink`/`Stream` of axum messages, so tests can drive it with channels.

use crate::policy::{self, MessageKind, MessageRequest, Principal, Verdict};
use crate::registry::SessionSlot;
use crate::routing::{self, RouteRequest};
use crate::tunnel::conn::{RecvHalf, SendHalf};
use crate::tunnel::open_session;
use crate::{AppState, ClaimRefused};
use avatar_proto::session::{Action, SignalingSession};
use avatar_proto::signaling::{decode_client_message, ClientMessage, ErrorCode, Id, Offer, ServerEvent};
use avatar_proto::stream::{send_frame, FramedRecv};
use avatar_proto::tunnel::{SessionFrame, SessionOpen};
use axum::extract::ws::{CloseFrame, Message};
use futures::{Sink, SinkExt, Stream, StreamExt};
use std::sync::Arc;
use std::time::Duration;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, trace, warn};

/// A session attached to a worker.
struct Attached {
    // Dropping the slot returns the worker's capacity.
    _slot: SessionSlot,
    send: SendHalf,
    recv: FramedRecv<RecvHalf>,
}

/// WebSocket close codes used here.
const NORMAL: u16 = 1000;
const GOING_AWAY: u16 = 1001;
const POLICY: u16 = 1008;

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

pub async fn run_session<S, E>(
    mut socket: S,
    session_id: String,
    principal: Option<Principal>,
    state: Arc<AppState>,
    shutdown: CancellationToken,
) where
    S: Sink<Message> + Stream<Item = Result<Message, E>> + Unpin,
    E: std::fmt::Display,
{
    let write = Duration::from_millis(state.config.limits.write_timeout_ms);
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
            turn_away(socket, ev, "session id in use", write).await;
            return;
        }
    };
    let _gauge = ActiveGauge::new();
    let limits = &state.config.limits;
    let idle = Duration::from_millis(limits.idle_timeout_ms);
    let expires = tokio::time::Instant::now() + Duration::from_millis(limits.max_session_ms);
    let mut idle_deadline = tokio::time::Instant::now() + idle;
    let mut session = SignalingSession::new(state.config.http.max_message_bytes);
    let mut attached: Option<Attached> = None;
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
        send_event(&mut socket, &ev, write).await;
    }
    'session: loop {
        let can_idle = attached.is_none();
        let worker_frame = async {
            match attached.as_mut() {
                Some(a) => a.recv.next::<SessionFrame>().await,
                None => std::future::pending().await,
            }
        };
        // Only a socket with no worker session can be idle: a user watching the avatar sends nothing.
        let idle_timer = async move {
            if !can_idle {
                std::future::pending::<()>().await
            }
            tokio::time::sleep_until(idle_deadline).await
        };
        // Biased: shutdown first, then the worker's frames before the browser's next message, so
        // a session the worker has just ended is detached before a new offer is handled.
        let out: Vec<ServerEvent> = tokio::select! {
            biased;
            _ = shutdown.cancelled() => {
                close(&mut socket, GOING_AWAY, "relay shutting down", write).await;
                relay_stopping = true;
                break;
            }
            _ = idle_timer => {
                info!("idle timeout");
                let ev = ServerEvent::error(ErrorCode::IdleTimeout, format!("no session and no message for {} s; reconnect to start again", idle.as_secs()));
                send_event(&mut socket, &ev, write).await;
                close(&mut socket, NORMAL, "idle", write).await;
                break;
            }
            _ = tokio::time::sleep_until(expires) => {
                info!("maximum session duration reached");
                let ev = ServerEvent::error(ErrorCode::SessionExpired, "this session reached its maximum duration; reconnect to continue");
                send_event(&mut socket, &ev, write).await;
                close(&mut socket, NORMAL, "session expired", write).await;
                break;
            }
            frame = worker_frame => match frame {
                Ok(Some(SessionFrame::Event(ev))) => {
                    session.worker_event(&ev);
                    vec![ev]
                }
                Ok(Some(SessionFrame::Close { reason })) => {
                    info!(%reason, "worker closed the session");
                    idle_deadline = tokio::time::Instant::now() + idle;
                    attached = None;
                    let action = session.worker_closed();
                    let ctx = Ctx { session_id: &session_id, principal: principal.as_ref(), state: &state };
                    perform(action, &mut session, &mut attached, &ctx).await
                }
                Ok(Some(_)) => {
                    // Not the frame itself: message bodies never reach the logs.
                    warn!("unexpected frame from worker; dropping the session");
                    attached = None;
                    session.worker_lost().into_iter().collect()
                }
                Ok(None) | Err(_) => {
                    if let Err(e) = &frame { info!(error = %e, "worker stream failed"); }
                    attached = None;
                    idle_deadline = tokio::time::Instant::now() + idle;
                    session.worker_lost().into_iter().collect()
                }
            },
            msg = socket.next() => {
                // Only valid signaling keeps an idle socket open: pings, binary frames and
                // messages that fail to decode or are refused do not reset the timer.
                match msg {
                    None | Some(Ok(Message::Close(_))) => break,
                    Some(Err(e)) => { debug!(error = %e, "websocket error"); break; }
                    Some(Ok(Message::Text(text))) => {
                        // Its size only: bodies carry users' words, SDP and credentials.
                        trace!(bytes = text.len(), "message from the browser");
                        match decode_client_message(text.as_str(), state.config.http.max_message_bytes) {
                            Err(e) => vec![e.to_event()],
                            Ok(msg) => match check_message(&state, &session_id, principal.as_ref(), &msg).await {
                                Err(refused) => vec![refused],
                                Ok(()) => {
                                    idle_deadline = tokio::time::Instant::now() + idle;
                                    let action = session.on_message(msg);
                                    let ctx = Ctx { session_id: &session_id, principal: principal.as_ref(), state: &state };
                                    perform(action, &mut session, &mut attached, &ctx).await
                                }
                            },
                        }
                    }
                    Some(Ok(Message::Binary(_))) => vec![ServerEvent::error(ErrorCode::BadJson, "binary messages are not supported; send JSON text")],
                    Some(Ok(_)) => vec![], // ping/pong are answered by the server itself
                }
            },
        };
        for ev in out {
            if !send_event(&mut socket, &ev, write).await {
                break 'session;
            }
        }
    }
    if let Some(mut a) = attached {
        if relay_stopping {
            // Not the browser leaving: the relay is. End the stream without a `Close` frame, which
            // the worker takes as a lost tunnel, not the end of the session: it detaches it and
            // the video plays on (media never rides the relay) until the browser's peer goes away.
            drop(a);
            info!("relay stopping; the session is left to play on");
            return;
        }
        // Best effort: tell the worker to end the session now rather than when the stream drops.
        let _ = send_frame(
            &mut a.send,
            &SessionFrame::Close {
                reason: "browser left".into(),
            },
        )
        .await;
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut a.send).await;
    }
    info!("browser disconnected");
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
    match route(offer.clone(), ctx).await {
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

async fn route(offer: Offer, ctx: &Ctx<'_>) -> Result<(Attached, String), (ErrorCode, String)> {
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
    let open = SessionOpen {
        session_id: session_id.to_owned(),
        avatar_id: avatar,
        user_id,
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
