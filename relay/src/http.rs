//! HTTP routes: the web client, `/ws/{session_id}`, `/healthz`.
//!
//! The web client is compiled into the binary so the relay is one file to deploy; a directory
//! named in the config replaces it (for operators who restyle the page). Text responses always
//! carry `charset=utf-8`: the customer's page has no `<meta charset>`, and without it Chromium
//! decodes the page as windows-1252 and the Chinese messages it sends arrive garbled.

use crate::policy::{self, ConnectDecision, ConnectRequest, Header, Principal};
use crate::signaling::{refuse, run_session};
use crate::AppState;
use axum::extract::{ConnectInfo, Path, State, WebSocketUpgrade};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use std::net::SocketAddr;
use std::sync::Arc;
use tracing::{info, info_span, warn, Instrument};

const INDEX_HTML: &str = include_str!("../../web-client/index.html");
const APP_JS: &str = include_str!("../../web-client/app.js");
const STYLE_CSS: &str = include_str!("../../web-client/style.css");

/// The relay's HTTP application.
pub fn app(state: Arc<AppState>) -> Router {
    let router = Router::new()
        .route("/ws/{session_id}", get(ws_upgrade))
        .route("/api/ice-servers", get(ice_servers))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics));
    let router = match &state.config.http.web_client_dir {
        Some(dir) => router.fallback_service(tower_http::services::ServeDir::new(dir)),
        None => router
            .route("/", get(|| async { embedded("text/html", INDEX_HTML) }))
            .route("/index.html", get(|| async { embedded("text/html", INDEX_HTML) }))
            .route("/app.js", get(|| async { embedded("text/javascript", APP_JS) }))
            .route("/style.css", get(|| async { embedded("text/css", STYLE_CSS) })),
    };
    router
        .layer(axum::middleware::map_response(utf8_text))
        .with_state(state)
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

/// Ready to take sessions: at least one worker is registered and not draining.
async fn readyz(State(state): State<Arc<AppState>>) -> impl IntoResponse {
    let available = state.registry.views().len();
    let status = if available > 0 {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({ "ready": available > 0, "workers_available": available })),
    )
}

/// Prometheus text exposition.
async fn metrics(State(state): State<Arc<AppState>>) -> Response {
    let Some(handle) = &state.metrics else {
        return (StatusCode::NOT_FOUND, "metrics are not enabled").into_response();
    };
    crate::metrics::refresh_gauges(&state);
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], handle.render()).into_response()
}

/// Session ids appear in logs and tunnel frames: keep them short and printable.
fn valid_session_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic())
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
            info!(%reason, "connect refused by the auth policy");
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
    let user = match authorize(&state, "api-ice-servers", &uri, &headers, remote).await {
        Ok(Some(p)) => p.user_id,
        Ok(None) => remote.ip().to_string(),
        Err(reason) => return (StatusCode::UNAUTHORIZED, reason).into_response(),
    };
    let body = serde_json::json!({
        "ice_servers": state.ice.servers(&user, crate::ice::unix_now()),
        "ttl_s": state.ice.ttl_s(),
    });
    ([(axum::http::header::CACHE_CONTROL, "no-store")], axum::Json(body)).into_response()
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
    if let Some(limiter) = &state.connect_limiter {
        if limiter.check_key(&remote.ip()).is_err() {
            ::metrics::counter!("relay_connections_rate_limited_total").increment(1);
            return (
                StatusCode::TOO_MANY_REQUESTS,
                "too many connections from this address; retry in a minute",
            )
                .into_response();
        }
    }
    let span = info_span!("session", %session_id, %remote, user = tracing::field::Empty);
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
        Err(reason) => return ws.on_upgrade(move |socket| refuse(socket, reason).instrument(span)),
    };
    let shutdown = state.shutdown.clone();
    let max_frame = state.config.http.max_frame_bytes;
    ws.max_message_size(max_frame)
        .max_frame_size(max_frame)
        .on_upgrade(move |socket| run_session(socket, session_id, principal, state, shutdown).instrument(span))
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
        let (status, content_type, body) = get(state_with(config), "/").await;
        assert_eq!(status, StatusCode::OK);
        assert_eq!(content_type, "text/html; charset=utf-8");
        assert_eq!(body, "<p>operator page 你好</p>");
    }

    #[test]
    fn session_ids_are_checked() {
        assert!(valid_session_id("test-session-1767600000000"));
        assert!(!valid_session_id(""));
        assert!(!valid_session_id("a b"));
        assert!(!valid_session_id(&"x".repeat(129)));
    }
}
