//! The session API: the operator's backend drives a session (`/api/v1/...`, see `docs/api.md`).
//!
//! * **Keys.** Every call carries `Authorization: Bearer <key>`, compared in constant time
//!   against `[[api.keys]]`, and each key is rate-limited (`api.requests_per_minute`). With no
//!   key configured the API answers 404, as if it were not there.
//! * **Where the session is.** Nowhere here: every worker of a fleet holds a tunnel to every
//!   relay, so a call goes to each worker this relay has, as a command stream
//!   ([`avatar_proto::api`]), and the worker that runs the session answers. A call on any relay
//!   reaches the session, whichever relay its browser is on.
//! * **Errors** are `{"error": {"code", "message"}}` with the status a client can act on: 400 bad
//!   JSON or empty text, 401 no or a wrong key, 404 no such session, 409 a session that cannot
//!   do it now or an id two workers claim, 413 text over the limit, 429 over the key's rate, 503
//!   no worker connected, 504 a worker did not answer in time (and none had the session).

use crate::AppState;
use avatar_proto::api::{Command, Reply, RequestError, SayRequest};
use avatar_proto::stream::{send_frame, FramedRecv};
use avatar_proto::tunnel::SessionFrame;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info};

/// The largest request body (a `say` of `api.max_text_chars` fits many times over); larger is 413.
pub const MAX_BODY: usize = 64 * 1024;

/// The API's routes (mounted by [`crate::http::app`]).
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/v1/sessions", get(list))
        .route("/api/v1/sessions/{id}", get(get_one).delete(end))
        .route("/api/v1/sessions/{id}/say", post(say))
        .route("/api/v1/sessions/{id}/interrupt", post(interrupt))
}

/// An API error: its status, code and message.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            code,
            message: message.into(),
        }
    }

    fn not_found(id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            "no_session",
            format!("no worker runs session `{id}`"),
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

/// Check the caller's key and rate; the key's name on success.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    let keys = &state.config.api.keys;
    if keys.is_empty() {
        // Off: indistinguishable from a relay without the API.
        return Err(ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint"));
    }
    let given = headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.split_once(' '))
        .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
        .map(|(_, token)| token.trim())
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::UNAUTHORIZED,
                "unauthorized",
                "send `Authorization: Bearer <key>` with a key from [[api.keys]]",
            )
        })?;
    // Digests of equal length, each compared in constant time, and every key compared: the
    // time taken says nothing about which key matched, how much of one, or how long keys are.
    let digest = |s: &str| -> [u8; 32] { <sha2::Sha256 as sha2::Digest>::digest(s.as_bytes()).into() };
    let given = digest(given);
    let mut matched = None;
    for k in keys {
        if crate::http::constant_time_eq(&given, &digest(k.key.expose())) {
            matched = Some(k.name.clone());
        }
    }
    let name = matched.ok_or_else(|| {
        metrics::counter!("relay_api_requests_total", "outcome" => "unauthorized").increment(1);
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the key is not one of [[api.keys]]",
        )
    })?;
    if state.api_limiter.check_key(&name).is_err() {
        metrics::counter!("relay_api_requests_total", "outcome" => "rate_limited").increment(1);
        return Err(ApiError::new(
            StatusCode::TOO_MANY_REQUESTS,
            "rate_limited",
            format!(
                "key {name}: over {} calls a minute (api.requests_per_minute)",
                state.config.api.requests_per_minute
            ),
        ));
    }
    metrics::counter!("relay_api_requests_total", "outcome" => "accepted").increment(1);
    Ok(name)
}

/// What the workers said: the replies that are not `NotFound`, and how many did not answer.
struct Answers {
    replies: Vec<Reply>,
    silent: usize,
}

/// Send `command` to every worker at once and wait for all of them (so an id two workers claim
/// is noticed).
async fn ask_workers(state: &AppState, command: Command) -> Result<Answers, ApiError> {
    let workers = state.registry.all();
    if workers.is_empty() {
        return Err(ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "no_worker",
            "no worker is connected to this relay",
        ));
    }
    let timeout = Duration::from_millis(state.config.api.timeout_ms);
    let mut asks: futures::stream::FuturesUnordered<_> = workers
        .into_iter()
        .map(|w| {
            let command = command.clone();
            async move {
                let ask = async {
                    // A session stream budget shared with browsers: never wait for one.
                    let (mut send, recv) = tokio::time::timeout(Duration::from_millis(200), w.connection.open_bi())
                        .await
                        .ok()?
                        .ok()?;
                    send_frame(&mut send, &SessionFrame::Command(command)).await.ok()?;
                    let mut recv = FramedRecv::new(recv);
                    match recv.next::<SessionFrame>().await {
                        Ok(Some(SessionFrame::Reply(reply))) => Some(reply),
                        other => {
                            debug!(worker = %w.id, ?other, "no reply to a session API command (an older worker?)");
                            None
                        }
                    }
                };
                tokio::time::timeout(timeout, ask).await.ok().flatten()
            }
        })
        .collect();
    let mut answers = Answers {
        replies: Vec::new(),
        silent: 0,
    };
    while let Some(reply) = futures::StreamExt::next(&mut asks).await {
        match reply {
            Some(Reply::NotFound {}) => {}
            None => answers.silent += 1,
            Some(r) => answers.replies.push(r),
        }
    }
    Ok(answers)
}

/// One session's reply: 404 if no worker has it, 504 if one did not answer, 409 if two claim it.
async fn ask_session(state: &AppState, id: &str, command: Command) -> Result<Reply, ApiError> {
    if !crate::http::valid_session_id(id) {
        return Err(ApiError::not_found(id));
    }
    let mut answers = ask_workers(state, command).await?;
    match answers.replies.len() {
        1 => Ok(answers.replies.remove(0)),
        0 if answers.silent > 0 => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!(
                "{} worker(s) did not answer within api.timeout_ms; the session may be on one of them: retry",
                answers.silent
            ),
        )),
        0 => Err(ApiError::not_found(id)),
        n => Err(ApiError::new(
            StatusCode::CONFLICT,
            "ambiguous",
            format!("{n} workers run a session `{id}` (session ids must be unique: use random ones)"),
        )),
    }
}

fn refused(code: String, message: String) -> ApiError {
    let status = match code.as_str() {
        "rate_limited" | "queue_full" | "busy" => StatusCode::TOO_MANY_REQUESTS,
        "message_too_long" => StatusCode::PAYLOAD_TOO_LARGE,
        _ => StatusCode::CONFLICT,
    };
    let code: &'static str = match code.as_str() {
        "rate_limited" => "rate_limited",
        "queue_full" => "queue_full",
        "busy" => "busy",
        "message_too_long" => "message_too_long",
        "unsupported" => "unsupported",
        "no_session" => "not_ready",
        _ => "refused",
    };
    ApiError::new(status, code, message)
}

fn unexpected(reply: &Reply) -> ApiError {
    ApiError::new(
        StatusCode::BAD_GATEWAY,
        "internal",
        format!("the worker answered {reply:?}"),
    )
}

/// `GET /api/v1/sessions`
async fn list(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let mut sessions = Vec::new();
    let answers = ask_workers(&state, Command::List {}).await?;
    if answers.silent > 0 {
        return Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!(
                "{} worker(s) did not answer within api.timeout_ms: retry",
                answers.silent
            ),
        ));
    }
    for reply in answers.replies {
        if let Reply::Sessions { sessions: s } = reply {
            sessions.extend(s);
        }
    }
    sessions.sort_by(|a, b| a.started_at.cmp(&b.started_at));
    Ok(Json(json!({ "sessions": sessions })).into_response())
}

/// `GET /api/v1/sessions/{id}`
async fn get_one(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    match ask_session(&state, &id, Command::Get { session_id: id.clone() }).await? {
        Reply::Session { session } => Ok(Json(session).into_response()),
        other => Err(unexpected(&other)),
    }
}

/// `POST /api/v1/sessions/{id}/say`
async fn say(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> Result<Response, ApiError> {
    let key = authorize(&state, &headers)?;
    let request: SayRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("the body is not a say request ({{\"text\", \"mode\": \"repeat\"|\"chat\", \"interrupt\"}}): {e}"),
        )
    })?;
    let request = request.validate(state.config.api.max_text_chars).map_err(|e| match e {
        RequestError::EmptyText => ApiError::new(StatusCode::BAD_REQUEST, "empty_text", e.to_string()),
        RequestError::TextTooLong { .. } => {
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "text_too_long", e.to_string())
        }
    })?;
    let mode = request.mode;
    let command = Command::Say {
        session_id: id.clone(),
        say: request,
    };
    match ask_session(&state, &id, command).await? {
        Reply::Turn { turn, queued } => {
            info!(%key, session_id = %id, turn, queued, ?mode, "session API: say");
            Ok((StatusCode::ACCEPTED, Json(json!({"turn": turn, "queued": queued}))).into_response())
        }
        Reply::Refused { code, message } => Err(refused(code, message)),
        other => Err(unexpected(&other)),
    }
}

/// `POST /api/v1/sessions/{id}/interrupt`
async fn interrupt(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    match ask_session(&state, &id, Command::Interrupt { session_id: id.clone() }).await? {
        Reply::Interrupted { interrupted } => Ok(Json(json!({ "interrupted": interrupted })).into_response()),
        other => Err(unexpected(&other)),
    }
}

/// `DELETE /api/v1/sessions/{id}`
async fn end(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    let key = authorize(&state, &headers)?;
    match ask_session(&state, &id, Command::End { session_id: id.clone() }).await? {
        Reply::Ended {} => {
            info!(%key, session_id = %id, "session API: ended");
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        other => Err(unexpected(&other)),
    }
}
