//! HTTP routes: the web client, `/ws/{session_id}`, `/api/ice-servers`, `/healthz`, `/readyz`,
//! `/metrics`.
//!
//! The web client is compiled into the binary so the relay is one file to deploy; a directory
//! named in the config replaces it (for operators who restyle the page). Text responses always
//! carry `charset=utf-8`: the customer's page has no `<meta charset>`, and without it Chromium
//! decodes the page as windows-1252 and the Chinese messages it sends arrive garbled.
//!
//! Everything here faces anonymous clients, so each route is bounded before it does work: a
//! client is known by its address ([`crate::limits`]), each one may open so many sockets at once
//! and so many per minute, a WebSocket from a browser page on another origin is refused before
//! the upgrade when `allowed_origins` is set, and every response carries headers that keep the
//! page out of frames and its scripts to its own origin. A web client directory serves neither
//! dotfiles nor symlinks, and no path redirects off the site.

use crate::avatars::preview_bytes;
use crate::ids::{constant_time_eq, valid_session_id};
use crate::limits::{client_ip, client_key};
use crate::policy::{self, ConnectDecision, ConnectRequest, Header, Principal};
use crate::signaling::{refuse, run_session};
use crate::AppState;
use axum::extract::{ConnectInfo, FromRequestParts, Path, Request, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use tracing::{debug, info, info_span, warn, Instrument};

const INDEX_HTML: &str = include_str!("../../web-client/index.html");
const APP_JS: &str = include_str!("../../web-client/app.js");
const STYLE_CSS: &str = include_str!("../../web-client/style.css");
const SDK_JS: &str = include_str!("../../web-client/avatar-edge.js");
const COMPAT_JS: &str = include_str!("../../web-client/compat.js");

/// The relay's HTTP application.
pub fn app(state: Arc<AppState>) -> Router {
    let router = Router::new()
        .route("/ws/{session_id}", get(ws_upgrade))
        .route("/api/ice-servers", get(ice_servers))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/workers", get(workers))
        .route("/api/avatars", get(avatars))
        .route("/api/avatars/{id}/preview.jpg", get(avatar_preview));
    // The session API answers only with a key configured (a reload may add one): without one,
    // its paths are as unknown as any (404).
    let router = router.merge(crate::api::routes().layer(axum::extract::DefaultBodyLimit::max(crate::api::MAX_BODY)));
    let router = match &state.config.http.web_client_dir {
        Some(dir) => {
            let root = Arc::new(dir.clone());
            router.fallback_service(
                tower::ServiceBuilder::new()
                    .layer(axum::middleware::from_fn(move |req: Request, next: Next| {
                        let root = Arc::clone(&root);
                        async move {
                            let path = req.uri().path();
                            if !servable(&root, path) {
                                return StatusCode::NOT_FOUND.into_response();
                            }
                            // The operator's copies of the SDK and compat.js, like the built-in ones.
                            let script = path.ends_with(".js");
                            let response = next.run(req).await;
                            if script {
                                allow_any_origin(response)
                            } else {
                                response
                            }
                        }
                    }))
                    .service(tower_http::services::ServeDir::new(dir)),
            )
        }
        None => router
            .route("/", get(|| async { embedded("text/html", INDEX_HTML) }))
            .route("/index.html", get(|| async { embedded("text/html", INDEX_HTML) }))
            .route("/app.js", get(|| async { embedded("text/javascript", APP_JS) }))
            .route("/style.css", get(|| async { embedded("text/css", STYLE_CSS) }))
            .route("/avatar-edge.js", get(|| async { cross_origin_script(SDK_JS) }))
            .route("/compat.js", get(|| async { cross_origin_script(COMPAT_JS) })),
    };
    let hsts = state.config.http.tls;
    // Checked by the config's validation; an empty policy sends no header.
    let csp = HeaderValue::from_str(&state.config.http.content_security_policy)
        .ok()
        .filter(|v| !v.is_empty());
    router
        .layer(axum::middleware::map_response(utf8_text))
        .layer(axum::middleware::map_response(move |r| {
            security_headers(r, hsts, csp.clone())
        }))
        .layer(axum::middleware::from_fn(no_ambiguous_paths))
        .with_state(state)
}

/// Headers that keep the page out of frames, its types unsniffed and (with `csp`) its scripts
/// and connections on its own origin; HSTS over TLS.
async fn security_headers(mut response: Response, hsts: bool, csp: Option<HeaderValue>) -> Response {
    let headers = response.headers_mut();
    if let Some(csp) = csp {
        headers.entry(header::CONTENT_SECURITY_POLICY).or_insert(csp);
    }
    let mut set = |name: header::HeaderName, value: &'static str| {
        headers.entry(name).or_insert(HeaderValue::from_static(value));
    };
    set(header::X_CONTENT_TYPE_OPTIONS, "nosniff");
    set(header::X_FRAME_OPTIONS, "DENY");
    set(header::REFERRER_POLICY, "no-referrer");
    if hsts {
        set(header::STRICT_TRANSPORT_SECURITY, "max-age=31536000");
    }
    response
}

/// Paths with an empty segment (`//evil.example`) or a backslash are refused: a redirect built
/// from one (a directory's trailing-slash redirect) would send the browser to another site.
async fn no_ambiguous_paths(req: Request, next: Next) -> Response {
    let path = req.uri().path();
    if path.contains("//") || path.contains('\\') || path.to_ascii_lowercase().contains("%5c") {
        return StatusCode::NOT_FOUND.into_response();
    }
    next.run(req).await
}

/// Whether `path` may be served from the web client directory `root`: no segment starts with a
/// dot (`.git`, `.env`, `..`), and no file or directory on the way is a symlink (which could lead
/// out of the directory). The root itself may be a symlink: the operator chose it.
fn servable(root: &std::path::Path, path: &str) -> bool {
    let Ok(decoded) = percent_encoding::percent_decode_str(path).decode_utf8() else {
        return false;
    };
    let mut at = root.to_path_buf();
    for segment in decoded.split('/').filter(|s| !s.is_empty()) {
        if segment.starts_with('.') || segment.contains('\\') || segment.contains('\0') {
            return false;
        }
        at.push(segment);
        match std::fs::symlink_metadata(&at) {
            Ok(m) if m.file_type().is_symlink() => return false,
            Ok(_) => {}
            // Missing: ServeDir answers 404 itself.
            Err(_) => return true,
        }
    }
    // A directory is served as its index.html: that must not be a symlink either.
    !std::fs::symlink_metadata(at.join("index.html")).is_ok_and(|m| m.file_type().is_symlink())
}

/// A script other sites' pages load from the relay: the SDK (imported as a module) and compat.js
/// (for pages written for the old server). Readable from any origin, which a module import and
/// a `<script integrity=…>` need: they hold no secret, and the socket and `/api/ice-servers`
/// apply `http.allowed_origins` themselves.
fn cross_origin_script(body: &'static str) -> Response {
    allow_any_origin(embedded("text/javascript", body))
}

fn allow_any_origin(mut response: Response) -> Response {
    response
        .headers_mut()
        .insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, HeaderValue::from_static("*"));
    response
}

fn embedded(mime: &'static str, body: &'static str) -> Response {
    (
        [(header::CONTENT_TYPE, mime), (header::CACHE_CONTROL, "no-cache")],
        body,
    )
        .into_response()
}

/// Add `charset=utf-8` to any text response that lacks a charset.
async fn utf8_text(mut response: Response) -> Response {
    let headers = response.headers_mut();
    if let Some(ct) = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()) {
        let is_text = ct.starts_with("text/") || ct.starts_with("application/javascript");
        if is_text && !ct.to_ascii_lowercase().contains("charset") {
            if let Ok(v) = HeaderValue::from_str(&format!("{ct}; charset=utf-8")) {
                headers.insert(header::CONTENT_TYPE, v);
            }
        }
    }
    response
}

async fn healthz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok", "workers": state.registry.len() }))
}

/// Ready to take sessions: at least one worker is registered and not draining, and the relay is
/// not shutting down. For a load balancer in front of a fleet: the body also says how many
/// sessions the workers can still take (by the load they report, other relays' sessions
/// included), so a relay whose workers are all full can be told from one without workers.
async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let available = state.registry.all().iter().filter(|w| !w.is_draining()).count();
    let free = state.registry.sessions_free();
    let stopping = state.shutdown.is_cancelled();
    let ready = available > 0 && !stopping;
    let status = if ready {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({
            "ready": ready,
            "workers_available": available,
            "sessions_free": free,
            "stopping": stopping,
        })),
    )
}

/// Whether the operator's endpoints (`/metrics`, `/api/workers`) may answer: with
/// `http.metrics_token`, to its bearer token; without, to loopback callers not behind a proxy
/// (no forwarding header, and not a peer listed in `limits.trusted_proxies`).
fn operator_allowed(state: &AppState, remote: SocketAddr, headers: &HeaderMap) -> bool {
    match &state.config.http.metrics_token {
        Some(token) => headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "))
            .is_some_and(|given| constant_time_eq(given.as_bytes(), token.expose().as_bytes())),
        None => {
            // A proxy on the same host forwards everyone's requests from loopback, with or
            // without forwarding headers: a peer in `limits.trusted_proxies` is never local.
            let peer = avatar_proto::netfilter::canonical(remote.ip());
            let proxy = state.live().limits.trusted_proxies.iter().any(|n| n.contains(&peer));
            let proxied = ["forwarded", "x-forwarded-for", "x-real-ip"]
                .iter()
                .any(|h| headers.contains_key(*h));
            peer.is_loopback() && !proxy && !proxied
        }
    }
}

/// A request [`operator_allowed`] admits; anyone else gets 404, as if the path did not exist.
struct Operator;

impl FromRequestParts<Arc<AppState>> for Operator {
    type Rejection = (StatusCode, &'static str);

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &Arc<AppState>,
    ) -> Result<Self, Self::Rejection> {
        // The extractor, not the extension: it also finds a test's `MockConnectInfo`.
        let remote = ConnectInfo::<SocketAddr>::from_request_parts(parts, state).await.ok();
        match remote {
            Some(ConnectInfo(remote)) if operator_allowed(state, remote, &parts.headers) => Ok(Operator),
            _ => Err((
                StatusCode::NOT_FOUND,
                "served to loopback, or with the bearer token of http.metrics_token",
            )),
        }
    }
}

async fn metrics(_: Operator, State(state): State<Arc<AppState>>) -> Response {
    let Some(handle) = &state.metrics else {
        return (StatusCode::NOT_FOUND, "metrics are not enabled").into_response();
    };
    crate::metrics::refresh_gauges(&state);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}

/// The registered workers, for operators: id, transport, load, round trip.
async fn workers(_: Operator, State(state): State<Arc<AppState>>) -> Response {
    let mut list: Vec<_> = state
        .registry
        .all()
        .iter()
        .map(|w| {
            serde_json::json!({
                "id": w.id,
                "transport": w.connection.transport().as_str(),
                "remote": w.connection.remote_address().to_string(),
                "capacity": w.registration.capacity,
                "active": w.active(),
                "load": w.load(),
                "draining": w.is_draining(),
                "rtt_ms": w.connection.rtt().as_secs_f64() * 1000.0,
                "avatars": w.registration.avatars.len(),
                "labels": w.registration.labels,
            })
        })
        .collect();
    list.sort_by(|a, b| a["id"].as_str().cmp(&b["id"].as_str()));
    Json(serde_json::json!({ "workers": list })).into_response()
}

/// `GET /api/avatars`: the avatars the connected workers serve, for a page's avatar chooser:
/// `{"avatars": [{"id", "name", "preview"}]}`, by id; `preview`, where the worker sent one, is the
/// URL of a small JPEG of the avatar. Workers that serve any id (the built-in avatar) add
/// nothing. Public, as the page is; rate-limited per client like `/api/ice-servers`.
async fn avatars(
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    State(state): State<Arc<AppState>>,
    headers: HeaderMap,
) -> Response {
    let (_, key) = client_of(&state, remote, &headers);
    if let Err(refused) = check_rate(&state, key) {
        return refused.into_response();
    }
    let mut by_id = std::collections::BTreeMap::new();
    for w in state.registry.all().iter().filter(|w| !w.is_draining()) {
        for id in &w.registration.avatars {
            let name = w.registration.avatar_names.get(id).unwrap_or(id);
            let entry = by_id.entry(id.clone()).or_insert_with(|| (name.clone(), false));
            entry.1 |= w.registration.avatar_previews.contains_key(id);
        }
    }
    let list: Vec<_> = by_id
        .into_iter()
        .map(|(id, (name, preview))| {
            let mut entry = serde_json::json!({ "id": id, "name": name });
            // Ids are the workers' directory names: any character but `/` could need escaping.
            if preview && id.chars().all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c)) {
                entry["preview"] = format!("/api/avatars/{id}/preview.jpg").into();
            }
            entry
        })
        .collect();
    (
        [(header::CACHE_CONTROL, "no-store")],
        Json(serde_json::json!({ "avatars": list })),
    )
        .into_response()
}

/// `GET /api/avatars/{id}/preview.jpg`: the preview a connected worker sent for avatar `id`.
async fn avatar_preview(
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    State(state): State<Arc<AppState>>,
    Path(id): Path<String>,
    headers: HeaderMap,
) -> Response {
    let (_, key) = client_of(&state, remote, &headers);
    if let Err(refused) = check_rate(&state, key) {
        return refused.into_response();
    }
    let jpeg = state
        .registry
        .all()
        .iter()
        .filter(|w| !w.is_draining())
        .find_map(|w| w.registration.avatar_previews.get(&id).and_then(|p| preview_bytes(p)));
    match jpeg {
        Some(bytes) => (
            [
                (header::CONTENT_TYPE, "image/jpeg"),
                (header::CACHE_CONTROL, "public, max-age=300"),
            ],
            bytes,
        )
            .into_response(),
        None => StatusCode::NOT_FOUND.into_response(),
    }
}

/// Ask the auth module about a connect: `Ok(None)` without a module, `Ok(Some)` with the
/// principal it admitted, `Err(reason)` when refused (by the module, or because it failed).
async fn authorize(
    state: &AppState,
    session_id: &str,
    uri: &Uri,
    headers: &HeaderMap,
    remote: SocketAddr,
) -> Result<Option<Principal>, String> {
    let Some(policies) = state.policies.as_ref().filter(|p| p.has_auth()) else {
        return Ok(None);
    };
    let headers = policy::FORWARDED_HEADERS
        .iter()
        .flat_map(|name| headers.get_all(*name).iter().map(move |v| (name, v)))
        .filter_map(|(name, value)| {
            Some(Header {
                name: name.to_string(),
                value: value.to_str().ok()?.to_owned(),
            })
        })
        .collect();
    let request = ConnectRequest {
        session_id: session_id.to_owned(),
        path: uri.path().to_owned(),
        query: uri.query().unwrap_or("").to_owned(),
        headers,
        remote_addr: remote.to_string(),
        now_ms: policy::now_ms(),
    };
    match policies.authorize_connect(request).await {
        None => Ok(None),
        Some(Ok(ConnectDecision::Allow(principal))) => Ok(Some(principal)),
        Some(Ok(ConnectDecision::Deny(reason))) => {
            if state.log_refusal() {
                info!(%reason, "connect refused by the auth policy");
            } else {
                debug!(%reason, "connect refused by the auth policy");
            }
            Err(reason)
        }
        Some(Err(e)) => {
            warn!(error = %e, "auth policy failed; refusing the connect (fail closed)");
            Err("authorization is unavailable right now (policy error); try again later".into())
        }
    }
}

/// `GET /api/ice-servers`: the same list the `ice_servers` event carries, for front ends that
/// build their own `RTCPeerConnection` before opening the socket. Admitted like a connect (the
/// auth module sees session id `api-ice-servers`); credentials are minted for the admitted user,
/// or for the caller's address without an auth module.
async fn ice_servers(
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    State(state): State<Arc<AppState>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    let (client, key) = client_of(&state, remote, &headers);
    if let Err(refused) = check_rate(&state, key) {
        return refused.into_response();
    }
    let user = match authorize(&state, "api-ice-servers", &uri, &headers, remote).await {
        Ok(Some(p)) => p.user_id,
        Ok(None) => client.to_string(),
        Err(reason) => return (StatusCode::UNAUTHORIZED, reason).into_response(),
    };
    let body = serde_json::json!({
        "ice_servers": state.ice.servers(crate::ice::TurnUser::Browser(&user), crate::ice::unix_now()),
        "ttl_s": state.ice.ttl_s(),
    });
    let mut response = ([(axum::http::header::CACHE_CONTROL, "no-store")], axum::Json(body)).into_response();
    // A customer's page on another origin (the SDK) may read the list when that origin may open
    // a socket too (`http.allowed_origins`).
    if let Some(origin) = headers.get(header::ORIGIN) {
        if check_origin(&state, &headers).is_ok() {
            let h = response.headers_mut();
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.clone());
            h.insert(header::VARY, HeaderValue::from_static("Origin"));
        }
    }
    response
}

async fn ws_upgrade(
    ws: WebSocketUpgrade,
    Path(session_id): Path<String>,
    ConnectInfo(remote): ConnectInfo<SocketAddr>,
    State(state): State<Arc<AppState>>,
    uri: Uri,
    headers: HeaderMap,
) -> Response {
    if !valid_session_id(&session_id) {
        return (
            StatusCode::BAD_REQUEST,
            "session id must be 1-128 printable ASCII characters",
        )
            .into_response();
    }
    if let Err(refused) = check_origin(&state, &headers) {
        return refused.into_response();
    }
    let (client, key) = client_of(&state, remote, &headers);
    if let Err(refused) = check_rate(&state, key) {
        return refused.into_response();
    }
    let per_client = state.live().limits.sockets_per_ip;
    let socket_slot = match state.sockets.try_open(Some(key), per_client, usize::MAX) {
        Ok(slot) => slot,
        Err(_) => {
            ::metrics::counter!("relay_connections_rate_limited_total", "reason" => "open_sockets").increment(1);
            return (
                StatusCode::TOO_MANY_REQUESTS,
                "too many open connections from this address; close one first",
            )
                .into_response();
        }
    };
    let span = info_span!("session", %session_id, remote = %client, user = tracing::field::Empty);
    let principal = match authorize(&state, &session_id, &uri, &headers, remote)
        .instrument(span.clone())
        .await
    {
        Ok(principal) => {
            if let Some(p) = &principal {
                span.record("user", tracing::field::display(&p.user_id));
            }
            principal
        }
        // Upgrade anyway: a browser reads the reason from an `error` event, not from a 403.
        Err(reason) => {
            let write = std::time::Duration::from_millis(state.live().limits.write_timeout_ms);
            return ws.on_upgrade(move |socket| refuse(socket, reason, write).instrument(span));
        }
    };
    let shutdown = state.shutdown.clone();
    let max_frame = state.config.http.max_frame_bytes;
    // Buffers sized for signaling, grown only while a large message passes: the library's
    // defaults (128 KiB to read, 128 KiB to write) cost ~137 KiB per idle socket.
    ws.max_message_size(max_frame)
        .max_frame_size(max_frame)
        .read_buffer_size(WS_READ_BUFFER)
        .write_buffer_size(0)
        .max_write_buffer_size(max_frame.saturating_mul(4))
        .on_upgrade(move |socket| {
            // The session gets a task of its own and the upgrade task ends here: axum's upgrade
            // future (the handshake state and this callback) would otherwise stay allocated
            // beside the session for the socket's whole life, about 2 KiB per idle socket.
            // The socket is boxed so that the session's future holds a pointer, not 368 bytes
            // copied into several of its states.
            tokio::spawn(
                async move {
                    run_session(Box::new(socket), session_id, principal, state, shutdown).await;
                    drop(socket_slot);
                }
                .instrument(span),
            );
            std::future::ready(())
        })
}

/// The initial read buffer of a WebSocket: a typical signaling message fits, a 64 KiB offer grows it.
const WS_READ_BUFFER: usize = 4 << 10;

/// A browser page may open a socket only from an allowed origin (`http.allowed_origins`, and
/// always the relay's own), so a
/// third-party page cannot act with a visitor's cookies. Checked before the upgrade: 403.
fn check_origin(state: &AppState, headers: &HeaderMap) -> Result<(), (StatusCode, &'static str)> {
    let live = state.live();
    let allowed = &live.allowed_origins;
    let Some(origin) = headers.get(header::ORIGIN) else {
        return Ok(()); // not a browser page
    };
    if allowed.is_empty() || allowed.iter().any(|a| a == "*") {
        return Ok(());
    }
    let origin = origin.to_str().unwrap_or("").trim_end_matches('/');
    if allowed
        .iter()
        .any(|a| a.trim_end_matches('/').eq_ignore_ascii_case(origin))
    {
        return Ok(());
    }
    // The relay's own page (its origin is the host the request is addressed to) is never
    // another site, whatever the list says.
    let host = headers.get(header::HOST).and_then(|h| h.to_str().ok());
    let same_origin = origin
        .split_once("://")
        .is_some_and(|(_, authority)| host.is_some_and(|h| authority.eq_ignore_ascii_case(h)));
    if same_origin {
        return Ok(());
    }
    ::metrics::counter!("relay_connections_refused_total", "reason" => "origin").increment(1);
    if state.log_refusal() {
        info!(%origin, "WebSocket from an origin not in http.allowed_origins refused");
    }
    Err((StatusCode::FORBIDDEN, "this page's origin may not connect here"))
}

/// The client a request comes from ([`client_ip`]) and the key it is counted under
/// ([`client_key`]), by the live `[limits]` (`trusted_proxies`, `ipv6_prefix_len`).
fn client_of(state: &AppState, remote: SocketAddr, headers: &HeaderMap) -> (IpAddr, IpAddr) {
    let live = state.live();
    let client = client_ip(remote.ip(), headers, &live.limits.trusted_proxies);
    (client, client_key(client, live.limits.ipv6_prefix_len))
}

/// New connections (and ICE server requests) per client (its [`client_key`]) and minute, by
/// the limiter in force (a reload that changes the quota replaces it).
fn check_rate(state: &AppState, key: IpAddr) -> Result<(), (StatusCode, &'static str)> {
    let limiter = state.connect_limiter.load();
    let Some(limiter) = limiter.as_deref() else {
        return Ok(());
    };
    if limiter.check_key(&key).is_ok() {
        return Ok(());
    }
    ::metrics::counter!("relay_connections_rate_limited_total", "reason" => "rate").increment(1);
    Err((
        StatusCode::TOO_MANY_REQUESTS,
        "too many connections from this address; retry in a minute",
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RelayConfig;
    use http_body_util::BodyExt;
    use tower::ServiceExt;

    fn state_with(config: RelayConfig) -> Arc<AppState> {
        AppState::new(config, tokio_util::sync::CancellationToken::new())
    }

    /// GET `path` from the app; returns status, content type and body.
    async fn get(state: Arc<AppState>, path: &str) -> (StatusCode, String, String) {
        let request = axum::http::Request::get(path)
            .body(axum::body::Body::empty())
            .expect("request");
        let res = app(state).oneshot(request).await.expect("response");
        let content_type = res
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_owned();
        let status = res.status();
        let body = res.into_body().collect().await.expect("body").to_bytes();
        (status, content_type, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn index_is_served_as_utf8_html() {
        let (status, content_type, body) = get(state_with(RelayConfig::dev()), "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, "text/html; charset=utf-8");
        assert!(body.contains("app.js"));
    }

    #[tokio::test]
    async fn healthz_reports_workers_and_readyz_wants_one() {
        let (status, _, body) = get(state_with(RelayConfig::dev()), "/healthz").await;
        assert_eq!(status, StatusCode::OK);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["workers"], 0);
        let (status, _, _) = get(state_with(RelayConfig::dev()), "/readyz").await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
    }

    #[tokio::test]
    async fn a_web_client_directory_replaces_the_embedded_page() {
        let dir = tempfile::tempdir().expect("tempdir");
        std::fs::write(dir.path().join("index.html"), "<p>operator page 你好</p>").expect("write");
        let mut config = RelayConfig::dev();
        config.http.web_client_dir = Some(dir.path().to_path_buf());
        std::fs::write(dir.path().join("compat.js"), "/* the operator's copy */").expect("write");
        let state = state_with(config);
        let (status, content_type, body) = get(Arc::clone(&state), "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, "text/html; charset=utf-8");
        assert_eq!(body, "<p>operator page 你好</p>");
        // Its scripts are for other sites' pages too, as the built-in ones are; its pages are not.
        let (status, headers, body) = get_from(Arc::clone(&state), "/compat.js", "203.0.113.9", &[]).await;
        assert_eq!((status, body.as_str()), (StatusCode::OK, "/* the operator's copy */"));
        assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*");
        let (_, headers, _) = get_from(state, "/", "203.0.113.9", &[]).await;
        assert!(!headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN));
    }

    /// GET `path` from `from` with `headers`; status, headers and body.
    async fn get_from(
        state: Arc<AppState>,
        path: &str,
        from: &str,
        headers: &[(&str, &str)],
    ) -> (StatusCode, HeaderMap, String) {
        let mut request = axum::http::Request::get(path);
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let request = request.body(axum::body::Body::empty()).expect("request");
        let from = SocketAddr::new(from.parse().expect("address"), 40000);
        let res = app(state)
            .layer(axum::extract::connect_info::MockConnectInfo(from))
            .oneshot(request)
            .await
            .expect("response");
        let (status, headers) = (res.status(), res.headers().clone());
        let body = res.into_body().collect().await.expect("body").to_bytes();
        (status, headers, String::from_utf8_lossy(&body).into_owned())
    }

    #[tokio::test]
    async fn each_api_key_has_its_own_rate_and_past_it_gets_429() {
        let mut cfg = RelayConfig::dev();
        cfg.api.requests_per_minute = 20; // a burst of 2
        for name in ["backend", "grader"] {
            cfg.api.keys.push(crate::config::ApiKey {
                name: name.into(),
                key: crate::config::Secret::new(format!("{name}-0123456789abcdef0123456789")),
                key_file: None,
            });
        }
        let state = state_with(cfg);
        let call = |key: &'static str| {
            let state = Arc::clone(&state);
            async move {
                let auth = format!("Bearer {key}-0123456789abcdef0123456789");
                let (status, _, body) =
                    get_from(state, "/api/v1/sessions", "127.0.0.1", &[("authorization", &auth)]).await;
                (status, body)
            }
        };
        // Past the key's burst: 429, naming the setting. No worker: the two allowed calls get 503.
        let statuses: Vec<StatusCode> = [call("backend").await, call("backend").await, call("backend").await]
            .iter()
            .map(|(s, _)| *s)
            .collect();
        assert_eq!(
            statuses,
            [
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::SERVICE_UNAVAILABLE,
                StatusCode::TOO_MANY_REQUESTS
            ]
        );
        let (_, body) = call("backend").await;
        assert!(
            body.contains("rate_limited") && body.contains("api.requests_per_minute"),
            "{body}"
        );
        // Another key is not slowed by the first.
        assert_eq!(call("grader").await.0, StatusCode::SERVICE_UNAVAILABLE);
        // A wrong key is refused before any rate is counted.
        assert_eq!(call("nobody").await.0, StatusCode::UNAUTHORIZED);
    }

    #[tokio::test]
    async fn an_unknown_endpoint_a_wrong_method_and_an_oversized_body_get_the_apis_json_errors() {
        let mut cfg = RelayConfig::dev();
        let key = "backend-0123456789abcdef0123456789";
        cfg.api.keys.push(crate::config::ApiKey {
            name: "backend".into(),
            key: crate::config::Secret::new(key.to_owned()),
            key_file: None,
        });
        let state = state_with(cfg);
        let call = |method: &str, path: &str, body: Vec<u8>| {
            let request = axum::http::Request::builder()
                .method(method)
                .uri(path)
                .header("authorization", format!("Bearer {key}"))
                .header("content-type", "application/json")
                .body(axum::body::Body::from(body))
                .expect("request");
            let state = Arc::clone(&state);
            async move {
                let from = SocketAddr::new([127, 0, 0, 1].into(), 40000);
                let res = app(state)
                    .layer(axum::extract::connect_info::MockConnectInfo(from))
                    .oneshot(request)
                    .await
                    .expect("response");
                let status = res.status();
                let body = res.into_body().collect().await.expect("body").to_bytes();
                let json: serde_json::Value = serde_json::from_slice(&body)
                    .unwrap_or_else(|e| panic!("{status}: not JSON ({e}): {}", String::from_utf8_lossy(&body)));
                (status, json["error"]["code"].as_str().unwrap_or_default().to_owned())
            }
        };
        assert_eq!(
            call("GET", "/api/v1/nothing/here", vec![]).await,
            (StatusCode::NOT_FOUND, "not_found".into())
        );
        assert_eq!(
            call("GET", "/api/v1/sessions/lesson-1/say", vec![]).await,
            (StatusCode::METHOD_NOT_ALLOWED, "method_not_allowed".into())
        );
        let huge = format!("{{\"text\": \"{}\"}}", "a".repeat(crate::api::MAX_BODY + 1));
        assert_eq!(
            call("POST", "/api/v1/sessions/lesson-1/say", huge.into_bytes()).await,
            (StatusCode::PAYLOAD_TOO_LARGE, "body_too_large".into())
        );
        // The routes themselves still answer (no worker here: 503, in the same shape).
        assert_eq!(
            call("POST", "/api/v1/sessions/lesson-1/say", br#"{"text": "hi"}"#.to_vec()).await,
            (StatusCode::SERVICE_UNAVAILABLE, "no_worker".into())
        );
    }

    #[tokio::test]
    async fn the_sdk_and_compat_js_are_served_to_any_origin_and_the_ice_list_to_allowed_ones() {
        for (path, marker) in [
            ("/avatar-edge.js", "export async function connect"),
            ("/compat.js", "function avatarEdgeCompat"),
        ] {
            let (status, headers, body) = get_from(state_with(RelayConfig::dev()), path, "203.0.113.9", &[]).await;
            assert_eq!(status, StatusCode::OK, "{path}");
            assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "*", "{path}");
            assert!(headers[header::CONTENT_TYPE]
                .to_str()
                .is_ok_and(|t| t.starts_with("text/javascript")));
            assert!(body.contains(marker), "{path}");
        }
        let mut cfg = RelayConfig::dev();
        cfg.http.allowed_origins = vec!["https://school.example".into()];
        let state = state_with(cfg);
        let allowed = [("origin", "https://school.example")];
        let (status, headers, _) = get_from(Arc::clone(&state), "/api/ice-servers", "203.0.113.9", &allowed).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(headers[header::ACCESS_CONTROL_ALLOW_ORIGIN], "https://school.example");
        let other = [("origin", "https://evil.example")];
        let (_, headers, _) = get_from(state, "/api/ice-servers", "203.0.113.9", &other).await;
        assert!(
            !headers.contains_key(header::ACCESS_CONTROL_ALLOW_ORIGIN),
            "not for other origins"
        );
    }

    #[tokio::test]
    async fn every_response_carries_the_security_headers_and_hsts_over_tls() {
        for path in ["/", "/app.js", "/healthz", "/no-such-page"] {
            let (_, headers, _) = get_from(state_with(RelayConfig::dev()), path, "203.0.113.9", &[]).await;
            let csp = headers[header::CONTENT_SECURITY_POLICY].to_str().expect("csp");
            assert!(
                csp.contains("default-src 'self'") && csp.contains("frame-ancestors 'none'"),
                "{path}: {csp}"
            );
            assert_eq!(headers[header::X_CONTENT_TYPE_OPTIONS], "nosniff", "{path}");
            assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY", "{path}");
            assert!(
                !headers.contains_key(header::STRICT_TRANSPORT_SECURITY),
                "no HSTS over plain HTTP"
            );
        }
        let mut config = RelayConfig::dev();
        config.http.tls = true;
        let (_, headers, _) = get_from(state_with(config), "/", "203.0.113.9", &[]).await;
        assert_eq!(headers[header::STRICT_TRANSPORT_SECURITY], "max-age=31536000");
        // An operator's own page may need its own policy, or none.
        let mut config = RelayConfig::dev();
        config.http.content_security_policy = "default-src 'self' https://cdn.example.com".into();
        let (_, headers, _) = get_from(state_with(config), "/", "203.0.113.9", &[]).await;
        assert_eq!(
            headers[header::CONTENT_SECURITY_POLICY],
            "default-src 'self' https://cdn.example.com"
        );
        let mut config = RelayConfig::dev();
        config.http.content_security_policy = String::new();
        let (_, headers, _) = get_from(state_with(config), "/", "203.0.113.9", &[]).await;
        assert!(!headers.contains_key(header::CONTENT_SECURITY_POLICY));
        assert_eq!(headers[header::X_FRAME_OPTIONS], "DENY", "the others stay");
    }

    #[tokio::test]
    async fn the_web_client_directory_serves_no_dotfiles_no_symlinks_and_no_offsite_redirect() {
        let dir = tempfile::tempdir().expect("tempdir");
        let root = dir.path();
        let outside = tempfile::tempdir().expect("outside");
        std::fs::write(outside.path().join("secret.txt"), "outside the web root").expect("write");
        std::fs::write(root.join("index.html"), "<p>page</p>").expect("write");
        std::fs::write(root.join(".env"), "TOKEN=hunter2").expect("write");
        std::fs::create_dir(root.join(".git")).expect("mkdir");
        std::fs::write(root.join(".git/config"), "[remote]").expect("write");
        std::fs::create_dir(root.join("evil.example")).expect("mkdir");
        std::fs::write(root.join("evil.example/index.html"), "<p>sub</p>").expect("write");
        std::os::unix::fs::symlink(outside.path().join("secret.txt"), root.join("leak.txt")).expect("symlink");
        std::os::unix::fs::symlink(outside.path(), root.join("linked")).expect("symlink");
        let mut config = RelayConfig::dev();
        config.http.web_client_dir = Some(root.to_path_buf());
        let state = state_with(config);
        let status = |path: &'static str| {
            let state = Arc::clone(&state);
            async move { get_from(state, path, "203.0.113.9", &[]).await }
        };
        assert_eq!(status("/").await.0, StatusCode::OK);
        assert_eq!(status("/evil.example/").await.0, StatusCode::OK);
        for path in [
            "/.env",
            "/%2eenv",
            "/.git/config",
            "/%2Egit/config",
            "/leak.txt",
            "/linked/secret.txt",
            "/evil.example/../.env",
        ] {
            let (code, _, body) = status(path).await;
            assert_eq!(code, StatusCode::NOT_FOUND, "{path}");
            assert!(!body.contains("hunter2") && !body.contains("outside"), "{path}: {body}");
        }
        // A directory's trailing-slash redirect stays on this site...
        let (code, headers, _) = status("/evil.example").await;
        assert!(code.is_redirection(), "{code}");
        assert_eq!(headers[header::LOCATION], "/evil.example/");
        // ...and a path that would make it point elsewhere is not served at all.
        for path in ["//evil.example", "/%5Cevil.example"] {
            let (code, headers, _) = status(path).await;
            assert_eq!(code, StatusCode::NOT_FOUND, "{path}");
            assert!(!headers.contains_key(header::LOCATION), "{path}");
        }
    }

    #[tokio::test]
    async fn metrics_are_served_to_loopback_or_with_the_token_only() {
        let handle = metrics_exporter_prometheus::PrometheusBuilder::new()
            .build_recorder()
            .handle();
        let state = |config: RelayConfig| {
            AppState::with_metrics(
                config,
                tokio_util::sync::CancellationToken::new(),
                Some(handle.clone()),
                None,
                crate::webhooks::Webhooks::default(),
            )
        };
        let open = state(RelayConfig::dev());
        assert_eq!(
            get_from(Arc::clone(&open), "/metrics", "127.0.0.1", &[]).await.0,
            StatusCode::OK
        );
        assert_eq!(
            get_from(Arc::clone(&open), "/metrics", "::1", &[]).await.0,
            StatusCode::OK
        );
        assert_eq!(
            get_from(Arc::clone(&open), "/metrics", "203.0.113.9", &[]).await.0,
            StatusCode::NOT_FOUND
        );
        let proxied = [("x-forwarded-for", "203.0.113.9")];
        assert_eq!(
            get_from(open, "/metrics", "127.0.0.1", &proxied).await.0,
            StatusCode::NOT_FOUND,
            "a local reverse proxy is not a local caller"
        );
        // Issue 26, N7: a proxy that sends no forwarding header (nginx's default) is still a
        // proxy: a peer in `limits.trusted_proxies` is never local.
        let mut config = RelayConfig::dev();
        config.limits.trusted_proxies = vec!["127.0.0.1/32".parse().expect("net")];
        let behind_proxy = state(config);
        for path in ["/metrics", "/api/workers"] {
            assert_eq!(
                get_from(Arc::clone(&behind_proxy), path, "127.0.0.1", &[]).await.0,
                StatusCode::NOT_FOUND,
                "{path} through a header-less proxy"
            );
        }
        assert_eq!(
            get_from(behind_proxy, "/metrics", "::1", &[]).await.0,
            StatusCode::OK,
            "loopback that is not the proxy is still local"
        );
        let mut config = RelayConfig::dev();
        config.http.metrics_token = Some(crate::config::Secret::new("metrics-token-0123456789"));
        let locked = state(config);
        let bearer = [("authorization", "Bearer metrics-token-0123456789")];
        let wrong = [("authorization", "Bearer metrics-token-0123456780")];
        assert_eq!(
            get_from(Arc::clone(&locked), "/metrics", "203.0.113.9", &bearer)
                .await
                .0,
            StatusCode::OK
        );
        assert_eq!(
            get_from(Arc::clone(&locked), "/metrics", "203.0.113.9", &wrong).await.0,
            StatusCode::NOT_FOUND
        );
        assert_eq!(
            get_from(Arc::clone(&locked), "/metrics", "127.0.0.1", &[]).await.0,
            StatusCode::NOT_FOUND,
            "with a token, loopback needs it too"
        );
        // The worker list is the operator's too, under the same rule.
        let (status, _, body) = get_from(Arc::clone(&locked), "/api/workers", "203.0.113.9", &bearer).await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body).expect("JSON")["workers"],
            serde_json::json!([])
        );
        assert_eq!(
            get_from(locked, "/api/workers", "203.0.113.9", &wrong).await.0,
            StatusCode::NOT_FOUND
        );
    }

    #[test]
    fn allowed_origins_admit_the_listed_pages_and_the_relays_own() {
        let mut config = RelayConfig::dev();
        config.http.allowed_origins = vec!["https://tutor.example.com".into()];
        let state = AppState::new(config, tokio_util::sync::CancellationToken::new());
        let check = |origin: &str, host: &str| {
            let mut h = HeaderMap::new();
            h.insert(header::ORIGIN, HeaderValue::from_str(origin).expect("value"));
            h.insert(header::HOST, HeaderValue::from_str(host).expect("value"));
            check_origin(&state, &h).is_ok()
        };
        assert!(check("https://tutor.example.com", "relay.example.com"), "listed");
        assert!(
            check("https://relay.example.com", "relay.example.com"),
            "the relay's own page"
        );
        assert!(!check("https://evil.example", "relay.example.com"), "another site");
        assert!(!check("https://relay.example.com.evil.example", "relay.example.com"));
        assert!(check_origin(&state, &HeaderMap::new()).is_ok(), "not a browser");
    }
}
