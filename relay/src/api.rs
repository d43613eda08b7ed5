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
//!   JSON or empty text, 401 no or a wrong key, 404 no such session, 408 an audio upload that
//!   stalled (`api.timeout_ms`), 409 a session that cannot do it now, an id two workers claim or
//!   an audio turn cut before its upload ended, 413 text or audio over the limit
//!   (`api.max_audio_seconds`), 415 audio in a format it does not take, 429 over the key's rate,
//!   503 no worker connected, 504 a worker did not answer in time (and none had the session).

use crate::conn::{RecvHalf, SendHalf};
use crate::upload::{Format, Samples};
use crate::AppState;
use avatar_proto::api::{Command, Reply, RequestError, SayRequest};
use avatar_proto::stream::{send_frame, FramedRecv};
use avatar_proto::tunnel::SessionFrame;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{any, get, post};
use axum::{Json, Router};
use serde_json::json;
use std::sync::Arc;
use std::time::Duration;
use tracing::{debug, info};

/// How long an audio upload may trail real time before it must keep up at half speed (see
/// `upload_too_slow` in `docs/api.md`).
const SLOW_UPLOAD_GRACE: Duration = Duration::from_secs(10);

/// The largest request body (a `say` of `api.max_text_chars` fits many times over); larger is 413.
pub const MAX_BODY: usize = 64 * 1024;

/// The API's routes (the HTTP router mounts them, under a [`MAX_BODY`] limit).
pub fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/api/v1/sessions", get(list))
        .route("/api/v1/sessions/{id}", get(get_one).delete(end))
        .route("/api/v1/sessions/{id}/say", post(say))
        .route("/api/v1/sessions/{id}/interrupt", post(interrupt))
        .route("/api/v1/sessions/{id}/audio", post(audio))
        .route("/api/v1/sessions/{id}/transcript", get(transcript))
        // Anything else under the prefix, and a method a route does not take: the API's own
        // errors, in its JSON shape, not the router's plain text.
        .route("/api/v1/{*rest}", any(no_such_endpoint))
        .method_not_allowed_fallback(wrong_method)
}

async fn no_such_endpoint(State(state): State<Arc<AppState>>, uri: axum::http::Uri) -> ApiError {
    if state.live().api.keys.is_empty() {
        return ApiError::off();
    }
    ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no endpoint {} (see docs/api.md)", uri.path()),
    )
}

async fn wrong_method(
    State(state): State<Arc<AppState>>,
    method: axum::http::Method,
    uri: axum::http::Uri,
) -> ApiError {
    if state.live().api.keys.is_empty() {
        return ApiError::off();
    }
    ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{method} is not one of the methods {} takes (see docs/api.md)",
            uri.path()
        ),
    )
}

/// A body axum could not read: over [`MAX_BODY`] (413) or cut short, in the API's shape.
fn unreadable(rejection: axum::extract::rejection::BytesRejection) -> ApiError {
    let status = rejection.status();
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE {
        "body_too_large"
    } else {
        "bad_request"
    };
    ApiError::new(status, code, format!("the request body: {}", rejection.body_text()))
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

    /// The API is off (no key configured): a bare 404, as for any unknown path.
    fn off() -> Self {
        Self::new(StatusCode::NOT_FOUND, "", "")
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
        if self.code.is_empty() {
            return self.status.into_response();
        }
        let body = json!({"error": {"code": self.code, "message": self.message}});
        (self.status, Json(body)).into_response()
    }
}

/// Check the caller's key and rate; the key's name on success.
fn authorize(state: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    let live = state.live();
    let keys = &live.api.keys;
    if keys.is_empty() {
        // Off: indistinguishable from a relay without the API.
        return Err(ApiError::off());
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
        if crate::ids::constant_time_eq(&given, &digest(k.key.expose())) {
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

/// What the workers said: the replies that are not `NotFound`, with the streams they came on,
/// and how many workers did not answer.
struct Answers {
    replies: Vec<Answer>,
    silent: usize,
}

/// One worker's reply, and its command stream (which goes on for an audio upload).
struct Answer {
    reply: Reply,
    send: SendHalf,
    recv: FramedRecv<RecvHalf>,
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
    let timeout = Duration::from_millis(state.live().api.timeout_ms);
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
                        Ok(Some(SessionFrame::Reply(reply))) => Some(Answer { reply, send, recv }),
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
    while let Some(answer) = futures::StreamExt::next(&mut asks).await {
        match answer {
            Some(Answer {
                reply: Reply::NotFound {},
                ..
            }) => {}
            None => answers.silent += 1,
            Some(a) => answers.replies.push(a),
        }
    }
    Ok(answers)
}

/// One session's reply: 404 if no worker has it, 504 if one did not answer, 409 if two claim it.
async fn ask_session(state: &AppState, id: &str, command: Command) -> Result<Reply, ApiError> {
    ask_session_stream(state, id, command).await.map(|a| a.reply)
}

/// [`ask_session`], keeping the stream the reply came on.
async fn ask_session_stream(state: &AppState, id: &str, command: Command) -> Result<Answer, ApiError> {
    if !crate::ids::valid_session_id(id) {
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
        "bad_request" => StatusCode::BAD_REQUEST,
        _ => StatusCode::CONFLICT,
    };
    let code: &'static str = match code.as_str() {
        "rate_limited" => "rate_limited",
        "queue_full" => "queue_full",
        "busy" => "busy",
        "message_too_long" => "message_too_long",
        "unsupported" => "unsupported",
        "interrupted" => "interrupted",
        "bad_request" => "bad_request",
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

/// `GET /api/v1/sessions`: what every worker that answered in time runs. A worker that did not
/// answer does not hide the others' sessions: the list comes, with `unanswered_workers` saying
/// how many it lacks (504 only when no worker answered at all).
async fn list(State(state): State<Arc<AppState>>, headers: HeaderMap) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    let mut sessions = Vec::new();
    let answers = ask_workers(&state, Command::List {}).await?;
    if answers.silent > 0 && answers.replies.is_empty() {
        return Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!(
                "{} worker(s) did not answer within api.timeout_ms: retry",
                answers.silent
            ),
        ));
    }
    for answer in answers.replies {
        if let Reply::Sessions { sessions: s } = answer.reply {
            sessions.extend(s);
        }
    }
    sessions.sort_by(|a, b| a.started_at.cmp(&b.started_at));
    let mut body = json!({ "sessions": sessions });
    if answers.silent > 0 {
        body["unanswered_workers"] = answers.silent.into();
    }
    Ok(Json(body).into_response())
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

/// `GET /api/v1/sessions/{id}/transcript`: every turn, from every worker that ran the session
/// (a browser that reconnected may have moved), in time order; while the session runs and for
/// the workers' `transcripts.keep_s` after it ends.
async fn transcript(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Result<Response, ApiError> {
    authorize(&state, &headers)?;
    if !crate::ids::valid_session_id(&id) {
        return Err(ApiError::not_found(&id));
    }
    let answers = ask_workers(&state, Command::Transcript { session_id: id.clone() }).await?;
    let mut turns = Vec::new();
    let mut found = false;
    for answer in answers.replies {
        if let Reply::Transcript { turns: t } = answer.reply {
            found = true;
            turns.extend(t);
        }
    }
    if !found {
        return Err(match answers.silent {
            0 => ApiError::not_found(&id),
            n => ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("{n} worker(s) did not answer within api.timeout_ms; the session may be on one of them: retry"),
            ),
        });
    }
    // Stable: a user's turn and its answer may share a start time.
    turns.sort_by(|a, b| a.started_at.cmp(&b.started_at));
    Ok(Json(json!({ "session_id": id, "turns": turns })).into_response())
}

/// `POST /api/v1/sessions/{id}/say`
async fn say(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<axum::body::Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let key = authorize(&state, &headers)?;
    let body = body.map_err(unreadable)?;
    let request: SayRequest = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_json",
            format!("the body is not a say request ({{\"text\", \"mode\": \"repeat\"|\"chat\", \"interrupt\"}}): {e}"),
        )
    })?;
    let request = request.validate(state.live().api.max_text_chars).map_err(|e| match e {
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

/// `POST /api/v1/sessions/{id}/audio?interrupt=true|false`'s query.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AudioQuery {
    #[serde(default)]
    interrupt: bool,
}

/// The next piece of an upload: `None` at its end; 408 if the client sends nothing for
/// `api.timeout_ms`, 400 if the body broke off.
async fn next_piece(
    body: &mut axum::body::BodyDataStream,
    idle: Duration,
) -> Result<Option<axum::body::Bytes>, ApiError> {
    match tokio::time::timeout(idle, futures::StreamExt::next(body)).await {
        Ok(None) => Ok(None),
        Ok(Some(Ok(bytes))) => Ok(Some(bytes)),
        Ok(Some(Err(e))) => Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_body",
            format!("the upload broke off: {e}"),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::REQUEST_TIMEOUT,
            "upload_stalled",
            format!("no bytes for {} ms (api.timeout_ms)", idle.as_millis()),
        )),
    }
}

/// `POST /api/v1/sessions/{id}/audio`: the backend's own speech, lip-synced and played as it
/// arrives ([`crate::upload`] for the formats). The worker is found first (the WAV header is read
/// to know the rate), then the samples stream to it while the body is still coming.
async fn audio(
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    query: Result<axum::extract::Query<AudioQuery>, axum::extract::rejection::QueryRejection>,
    headers: HeaderMap,
    body: axum::body::Body,
) -> Result<Response, ApiError> {
    let key = authorize(&state, &headers)?;
    let axum::extract::Query(query) = query.map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            "bad_query",
            format!("{e} (?interrupt=true|false)"),
        )
    })?;
    let unsupported = |e: crate::upload::FormatError| {
        ApiError::new(StatusCode::UNSUPPORTED_MEDIA_TYPE, "unsupported_audio", e.to_string())
    };
    let content_type = headers
        .get(axum::http::header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    let format = crate::upload::format_of(content_type).map_err(unsupported)?;
    let idle = Duration::from_millis(state.live().api.timeout_ms);
    let max_seconds = state.live().api.max_audio_seconds;
    let mut body = body.into_data_stream();
    let (spec, data_len, first) = match format {
        Format::Raw(spec) => (spec, None, Vec::new()),
        Format::Wav => {
            let mut head = Vec::new();
            loop {
                if let Some(h) = crate::upload::parse_wav_header(&head).map_err(unsupported)? {
                    break (h.spec, h.data_len, head.split_off(h.data_offset));
                }
                match next_piece(&mut body, idle).await? {
                    Some(piece) => head.extend_from_slice(&piece),
                    None => {
                        return Err(unsupported(crate::upload::FormatError::Wav(
                            "the body ends inside its header",
                        )))
                    }
                }
            }
        }
    };
    let too_long = |seconds: f64| {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            "audio_too_long",
            format!("{seconds:.1} s of audio; the limit is {max_seconds} s (api.max_audio_seconds)"),
        )
    };
    let frame_bytes = 2 * u64::from(spec.channels);
    if let Some(len) = data_len {
        let seconds = (len / frame_bytes) as f64 / f64::from(spec.rate);
        if seconds > f64::from(max_seconds) {
            return Err(too_long(seconds));
        }
    }
    let command = Command::Audio {
        session_id: id.clone(),
        rate: spec.rate,
        interrupt: query.interrupt,
    };
    // At most `api.max_uploads_per_key` uploads per key at once: each holds a tunnel stream.
    let _upload = state
        .api_uploads
        .try_open(Some(key.clone()), state.live().api.max_uploads_per_key, usize::MAX)
        .map_err(|_| {
            ApiError::new(
                StatusCode::TOO_MANY_REQUESTS,
                "too_many_uploads",
                format!(
                    "key {key}: {} audio uploads are in progress (api.max_uploads_per_key)",
                    state.live().api.max_uploads_per_key
                ),
            )
        })?;
    let Answer {
        reply,
        mut send,
        mut recv,
    } = ask_session_stream(&state, &id, command).await?;
    let (turn, queued) = match reply {
        Reply::Turn { turn, queued } => (turn, queued),
        Reply::Refused { code, message } => return Err(refused(code, message)),
        other => return Err(unexpected(&other)),
    };
    info!(%key, session_id = %id, turn, queued, rate = spec.rate, "session API: audio");
    let interrupted = || {
        ApiError::new(
            StatusCode::CONFLICT,
            "interrupted",
            format!("turn {turn} was cut before the upload ended (interrupted, or the session ended)"),
        )
    };
    // A queued upload is read as its turn plays: the session may hold it this long.
    let settle = Duration::from_secs(u64::from(max_seconds) + 60);
    // Samples after the limit are not sent; the upload is then refused with what was played.
    let allowed = u64::from(max_seconds) * u64::from(spec.rate) * 2;
    let mut sent = 0u64;
    let mut samples = Samples::new(spec, data_len);
    let mut out = Vec::new();
    let mut piece = Some(axum::body::Bytes::from(first));
    // Time spent waiting for the client's bytes: a client that sends slower than half real time
    // (after a grace) holds a stream and a turn for nothing.
    let mut client_wait = Duration::ZERO;
    let result = loop {
        let Some(bytes) = piece.take() else { break Ok(()) };
        out.clear();
        samples.push(&bytes, &mut out);
        let room = usize::try_from(allowed - sent).unwrap_or(usize::MAX);
        let over = out.len() > room;
        out.truncate(room);
        sent += out.len() as u64;
        match tokio::time::timeout(settle, tokio::io::AsyncWriteExt::write_all(&mut send, &out)).await {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break Err(interrupted()),
            Err(_) => {
                break Err(ApiError::new(
                    StatusCode::GATEWAY_TIMEOUT,
                    "timeout",
                    format!("the session took none of the audio for {} s", settle.as_secs()),
                ))
            }
        }
        if over {
            break Err(too_long(samples.seconds()));
        }
        if samples.complete() {
            break Ok(());
        }
        let waiting = std::time::Instant::now();
        match next_piece(&mut body, idle).await {
            Ok(next) => piece = next,
            Err(e) => break Err(e),
        }
        client_wait += waiting.elapsed();
        if client_wait > SLOW_UPLOAD_GRACE + Duration::from_secs_f64(2.0 * samples.seconds()) {
            break Err(ApiError::new(
                StatusCode::REQUEST_TIMEOUT,
                "upload_too_slow",
                format!(
                    "{:.1} s of audio in {:.1} s: send at least half as fast as it plays",
                    samples.seconds(),
                    client_wait.as_secs_f64()
                ),
            ));
        }
    };
    // The end of the stream is the end of the audio: the avatar finishes what it got.
    let _ = tokio::time::timeout(idle, tokio::io::AsyncWriteExt::shutdown(&mut send)).await;
    result?;
    // The worker answers once the turn holds all of it, or when it was cut first.
    let seconds = match tokio::time::timeout(settle, recv.next::<SessionFrame>()).await {
        Ok(Ok(Some(SessionFrame::Reply(Reply::Received { samples })))) => samples as f64 / f64::from(spec.rate),
        Ok(Ok(Some(SessionFrame::Reply(Reply::Refused { code, message })))) => return Err(refused(code, message)),
        Ok(Ok(Some(other))) => {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "internal",
                format!("the worker answered {other:?}"),
            ))
        }
        Ok(Ok(None) | Err(_)) => {
            return Err(ApiError::new(
                StatusCode::BAD_GATEWAY,
                "worker_lost",
                "the worker's tunnel ended before it confirmed the audio; the session may have ended",
            ))
        }
        Err(_) => {
            return Err(ApiError::new(
                StatusCode::GATEWAY_TIMEOUT,
                "timeout",
                format!("the session did not confirm the audio within {} s", settle.as_secs()),
            ))
        }
    };
    Ok((
        StatusCode::ACCEPTED,
        Json(json!({"turn": turn, "queued": queued, "seconds": (seconds * 1000.0).round() / 1000.0})),
    )
        .into_response())
}
