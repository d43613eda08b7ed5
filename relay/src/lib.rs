//! The avatar-edge relay: the public face of the system.
//!
//! It runs on a VPS and does three things:
//!
//! * serves the web client and `/healthz` over HTTP(S) ([`http`]);
//! * terminates browser signaling at `/ws/{session_id}` ([`signaling`]), driving the pure session
//!   rules from `avatar-proto` and forwarding each session over a tunnel;
//! * accepts QUIC tunnels that workers dial out to it ([`tunnel`]), authenticates them by a
//!   challenge–response inside TLS, and keeps them in a [`registry`] that routing consults.
//!
//! Media never passes through the relay: the browser and the worker exchange it directly (or via
//! TURN). The relay only carries signaling, so a lost tunnel does not stop a playing video.
//!
//! Driving it: [`Relay::bind`] binds every socket (so a bad address fails before anything runs),
//! then [`Relay::run`] serves until the cancellation token fires and returns once every task has
//! stopped. That token is the one shutdown path: HTTP, each WebSocket and each tunnel obey it.

pub mod api;
mod avatars;
pub mod check;
pub mod config;
pub mod conn;
pub mod http;
pub mod ice;
mod ids;
pub mod limits;
pub mod metrics;
pub mod policy;
pub mod registry;
pub mod routing;
pub mod signaling;
pub mod tls;
pub mod tunnel;
pub mod turn;
pub mod upload;
pub mod webhooks;

use axum_server::accept::NoDelayAcceptor;
use axum_server::tls_rustls::RustlsAcceptor;
use config::RelayConfig;
use registry::Registry;
use routing::{LeastLoaded, RoutePolicy};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tls::{Identity, ServerCerts};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::info;

/// Log directives applied over `RUST_LOG`: libraries that log message bodies below info.
pub const QUIET_LOG_TARGETS: &[&str] = &["tungstenite=info", "tokio_tungstenite=info", "h2=info"];

/// Errors that stop the relay from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error("TLS: {0}")]
    Tls(#[from] tls::TlsError),
    #[error("binding {what} on {addr}: {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("QUIC: {0}")]
    Quic(String),
    #[error("writing {path}: {source}")]
    Write { path: String, source: std::io::Error },
    #[error("HTTP server: {0}")]
    Serve(std::io::Error),
    #[error("policy: {0}")]
    Policy(#[from] policy::LoadError),
    #[error("{0}")]
    Turn(#[from] turn::TurnError),
    #[error("{0}")]
    Webhooks(#[from] webhooks::WebhookError),
}

/// The settings a reload (SIGHUP, `systemctl reload`) replaces in a running relay, with no
/// restart and nothing cut: who may call the session API and its limits (`[api]`), which
/// pages may open sockets (`http.allowed_origins`), and what each client may open and for how
/// long (`[limits]`: each request, connection and session reads them as it starts, so an open
/// session keeps the deadlines it started with; a changed `connections_per_ip_per_minute`
/// counts every client afresh, see [`AppState::connect_limiter`]). Read with
/// [`AppState::live`]. A reload also applies `[[webhooks]]` ([`webhooks::Webhooks::reload`]:
/// added, removed, a secret or filter changed, each queue kept); the rest of
/// [`AppState::config`] applies at the next restart (certificates and policy modules reload on
/// their own; see `tls::files` and `policy`).
#[derive(Debug, Clone)]
pub struct Live {
    pub allowed_origins: Vec<String>,
    pub api: config::ApiConfig,
    pub limits: config::LimitsConfig,
}

impl Live {
    fn of(config: &RelayConfig) -> Self {
        Self {
            allowed_origins: config.http.allowed_origins.clone(),
            api: config.api.clone(),
            limits: config.limits.clone(),
        }
    }
}

/// The limiter of `limits.connections_per_ip_per_minute`; `None` when unlimited.
fn new_connect_limiter(per_minute: u32) -> Option<Arc<governor::DefaultKeyedRateLimiter<std::net::IpAddr>>> {
    std::num::NonZeroU32::new(per_minute)
        .map(|n| Arc::new(governor::RateLimiter::keyed(governor::Quota::per_minute(n))))
}

/// What [`AppState::reload`] did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reloaded {
    /// The settings that changed and now apply.
    pub changed: Vec<String>,
    /// Other settings changed too: they apply at the next restart.
    pub restart_needed: bool,
    /// Settings that could not be applied, and why (the running ones stay): a `[[webhooks]]`
    /// entry whose queue cannot be opened. The next start would fail on it too.
    pub failed: Vec<String>,
}

/// Shared state of one relay.
pub struct AppState {
    /// The configuration the relay started with (for what a reload changes, see [`Live`]).
    pub config: RelayConfig,
    live: arc_swap::ArcSwap<Live>,
    pub registry: Registry,
    /// The built-in routing rule: used without a router module, and as its fallback.
    pub router: Box<dyn RoutePolicy>,
    /// Operator policy modules (auth, router); `None` when none is configured.
    pub policies: Option<Arc<policy::Policies>>,
    pub shutdown: CancellationToken,
    /// Session API calls per key (`api.requests_per_minute`).
    pub api_limiter: governor::DefaultKeyedRateLimiter<String>,
    /// Audio uploads in progress, per key (`api.max_uploads_per_key`).
    pub api_uploads: Arc<limits::OpenCounts<String>>,
    /// New connections per client (its [`limits::client_key`]); `None` when unlimited. A reload
    /// that changes `limits.connections_per_ip_per_minute` puts a new limiter here (a quota is
    /// fixed when its limiter is made): every client's count starts afresh.
    pub connect_limiter: arc_swap::ArcSwapOption<governor::DefaultKeyedRateLimiter<std::net::IpAddr>>,
    /// TCP connections of the HTTP listener, per client and in total.
    pub http_connections: Arc<limits::OpenCounts>,
    /// Open WebSockets per client.
    pub sockets: Arc<limits::OpenCounts>,
    /// Log lines about refused requests, all clients together: a flood of refusals must not
    /// become a flood of log lines.
    refusal_logs: governor::DefaultDirectRateLimiter,
    /// Session ids with a live socket, and those bound to a user who just left.
    sessions: std::sync::Mutex<std::collections::HashMap<String, SessionEntry>>,
    /// Renders `/metrics`; `None` when no recorder is installed (library use, unit tests).
    pub metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    /// STUN/TURN servers handed to browsers and workers (`[turn]`).
    pub ice: ice::IceServers,
    /// Where sessions' events go (`[[webhooks]]`, replaced by a reload); empty without any.
    pub webhooks: webhooks::Webhooks,
}

impl AppState {
    pub fn new(config: RelayConfig, shutdown: CancellationToken) -> Arc<Self> {
        Self::with_metrics(config, shutdown, None, None, webhooks::Webhooks::default())
    }

    pub fn with_metrics(
        config: RelayConfig,
        shutdown: CancellationToken,
        metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
        policies: Option<Arc<policy::Policies>>,
        webhooks: webhooks::Webhooks,
    ) -> Arc<Self> {
        let connect_limiter =
            arc_swap::ArcSwapOption::new(new_connect_limiter(config.limits.connections_per_ip_per_minute));
        let api_rate = std::num::NonZeroU32::new(config.api.requests_per_minute).unwrap_or(std::num::NonZeroU32::MIN);
        let api_burst =
            std::num::NonZeroU32::new(config.api.requests_per_minute / 10).unwrap_or(std::num::NonZeroU32::MIN);
        Arc::new(Self {
            api_limiter: governor::RateLimiter::keyed(governor::Quota::per_minute(api_rate).allow_burst(api_burst)),
            api_uploads: Arc::default(),
            ice: ice::IceServers::new(&config.turn),
            live: arc_swap::ArcSwap::from_pointee(Live::of(&config)),
            config,
            registry: Registry::default(),
            router: Box::new(LeastLoaded),
            policies,
            shutdown,
            connect_limiter,
            http_connections: Default::default(),
            sockets: Default::default(),
            refusal_logs: governor::RateLimiter::direct(governor::Quota::per_second(
                std::num::NonZeroU32::MIN.saturating_add(9),
            )),
            sessions: Default::default(),
            metrics,
            webhooks,
        })
    }

    /// The reloadable settings as they are now.
    pub fn live(&self) -> arc_swap::Guard<Arc<Live>> {
        self.live.load()
    }

    /// The key a connection straight from `peer` is counted under ([`limits::client_key`], by
    /// the live `[limits]`); `None` for a trusted proxy, which carries many clients.
    pub fn connection_key(&self, peer: std::net::IpAddr) -> Option<std::net::IpAddr> {
        let ip = avatar_proto::netfilter::canonical(peer);
        let live = self.live();
        let proxy = live.limits.trusted_proxies.iter().any(|n| n.contains(&ip));
        (!proxy).then(|| limits::client_key(ip, live.limits.ipv6_prefix_len))
    }

    /// Apply a reloaded configuration: its [`Live`] settings at once, for the next request (with
    /// a new [`AppState::connect_limiter`] when its quota changed), and its `[[webhooks]]` (with
    /// the `[webhook_delivery]` the relay started with). Returns what
    /// changed, whether anything else changed that only a restart applies
    /// (`api.requests_per_minute` among them: the key's rate limiter keeps its quota;
    /// `[webhook_delivery]` too), and what could not be applied.
    pub fn reload(&self, new: &RelayConfig) -> Reloaded {
        let (old, next) = (self.live.load_full(), Live::of(new));
        let mut changed = Vec::new();
        if old.allowed_origins != next.allowed_origins {
            changed.push("http.allowed_origins".to_owned());
        }
        let names = |api: &config::ApiConfig| api.keys.iter().map(|k| k.name.clone()).collect::<Vec<_>>();
        let secrets = |api: &config::ApiConfig| api.keys.iter().map(|k| k.key.expose().to_owned()).collect::<Vec<_>>();
        if names(&old.api) != names(&next.api) || secrets(&old.api) != secrets(&next.api) {
            changed.push(format!("api.keys ({} now)", next.api.keys.len()));
        }
        let limits = |a: &config::ApiConfig| {
            (
                a.max_text_chars,
                a.timeout_ms,
                a.max_audio_seconds,
                a.max_uploads_per_key,
            )
        };
        if limits(&old.api) != limits(&next.api) {
            changed.push("api limits".to_owned());
        }
        if old.limits != next.limits {
            changed.push("limits".to_owned());
        }
        let per_minute = next.limits.connections_per_ip_per_minute;
        if per_minute != old.limits.connections_per_ip_per_minute {
            self.connect_limiter.store(new_connect_limiter(per_minute));
        }
        // Each webhook keeps its queue (and its deliverer) while its URL stays; a change to
        // `[webhook_delivery]` is left to the restart (compared below with the rest).
        let mut failed = Vec::new();
        match self.webhooks.reload(&new.webhooks, &self.config.webhook_delivery) {
            Ok(lines) => changed.extend(lines),
            Err(e) => failed.push(format!("[[webhooks]] not reloaded, the running ones stay: {e}")),
        }
        // Everything else, compared as the file would say it.
        let mut rest = new.clone();
        rest.http.allowed_origins = self.config.http.allowed_origins.clone();
        rest.webhooks = self.config.webhooks.clone();
        rest.limits = self.config.limits.clone();
        rest.api = config::ApiConfig {
            requests_per_minute: new.api.requests_per_minute,
            ..self.config.api.clone()
        };
        let text = |c: &RelayConfig| toml::to_string(c).unwrap_or_default();
        let restart_needed = text(&rest) != text(&self.config);
        self.live.store(Arc::new(next));
        Reloaded {
            changed,
            restart_needed,
            failed,
        }
    }

    /// Whether a line about one more refused request may be logged now (ten a second at most).
    pub fn log_refusal(&self) -> bool {
        self.refusal_logs.check().is_ok()
    }

    fn sessions(&self) -> std::sync::MutexGuard<'_, std::collections::HashMap<String, SessionEntry>> {
        self.sessions.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claim `session_id` for one socket of `owner` (the user an auth policy admitted, if any).
    /// Refused while another socket holds it, and for `limits.session_binding_s` after its
    /// owner's socket closed, to anyone but that owner.
    pub fn claim_session(
        self: &Arc<Self>,
        session_id: &str,
        owner: Option<&str>,
    ) -> Result<SessionClaim, ClaimRefused> {
        let binding = std::time::Duration::from_secs(self.live().limits.session_binding_s);
        let now = std::time::Instant::now();
        let mut sessions = self.sessions();
        if let Some(entry) = sessions.get(session_id) {
            match &entry.released {
                None => return Err(ClaimRefused::InUse),
                Some(at) if now.duration_since(*at) < binding && entry.owner.as_deref() != owner => {
                    return Err(ClaimRefused::BoundToAnother)
                }
                Some(_) => {}
            }
        }
        sessions.insert(
            session_id.to_owned(),
            SessionEntry {
                owner: owner.map(str::to_owned),
                released: None,
            },
        );
        Ok(SessionClaim {
            state: Arc::clone(self),
            id: session_id.to_owned(),
        })
    }

    /// Forget bindings older than `limits.session_binding_s` (called periodically).
    fn sweep_sessions(&self) {
        let binding = std::time::Duration::from_secs(self.live().limits.session_binding_s);
        let now = std::time::Instant::now();
        self.sessions()
            .retain(|_, e| e.released.is_none_or(|at| now.duration_since(at) < binding));
    }
}

/// A session id's holder: a live socket (`released` unset), or the owner who just left.
struct SessionEntry {
    owner: Option<String>,
    released: Option<std::time::Instant>,
}

/// Why a socket may not use a session id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClaimRefused {
    /// Another live socket uses it.
    InUse,
    /// Its owner left moments ago; only they may take it back.
    BoundToAnother,
}

/// A claimed session id, released on drop (and kept bound to its owner for a while).
pub struct SessionClaim {
    state: Arc<AppState>,
    id: String,
}

impl Drop for SessionClaim {
    fn drop(&mut self) {
        let mut sessions = self.state.sessions();
        match sessions.get_mut(&self.id) {
            Some(entry) if entry.owner.is_some() => entry.released = Some(std::time::Instant::now()),
            _ => {
                sessions.remove(&self.id);
            }
        }
    }
}

/// Hyper's own timers: the header timer (kept-alive connections waiting for their next request
/// included) for HTTP/1, and keep-alive pings that close a silent HTTP/2 connection.
fn configure_http<A>(server: &mut axum_server::Server<SocketAddr, A>, header_read: Duration) {
    let builder = server.http_builder();
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_read);
    builder
        .http2()
        .timer(hyper_util::rt::TokioTimer::new())
        .keep_alive_interval(header_read)
        .keep_alive_timeout(header_read)
        .max_concurrent_streams(64);
}

/// A relay with its sockets bound, ready to [`run`](Relay::run).
pub struct Relay {
    state: Arc<AppState>,
    certs: ServerCerts,
    /// The ACME client to drive while serving, with `[tls.acme]`.
    acme: Option<tls::acme::Acme>,
    http: std::net::TcpListener,
    endpoint: quinn::Endpoint,
    /// The embedded TURN server, with `[turn] mode = "embedded"`.
    turn: Option<turn::TurnServer>,
}

impl Relay {
    /// Validate the config, load or generate the certificate, bind HTTP and QUIC. Must be called
    /// inside a tokio runtime (the QUIC endpoint registers its socket with it).
    pub fn bind(config: RelayConfig, shutdown: CancellationToken) -> Result<Self, RelayError> {
        Self::bind_with_metrics(config, shutdown, None)
    }

    /// As [`Relay::bind`], serving `/metrics` from `metrics` (the handle of the installed
    /// Prometheus recorder).
    pub fn bind_with_metrics(
        config: RelayConfig,
        shutdown: CancellationToken,
        metrics: Option<metrics_exporter_prometheus::PrometheusHandle>,
    ) -> Result<Self, RelayError> {
        let mut config = config;
        config.validate()?;
        if config.turn.mode == config::TurnMode::Embedded && config.turn.secret.is_empty() {
            // Nobody else needs it: the relay both mints and checks the credentials.
            config.turn.secret = config::Secret::new(hex::encode(rand::random::<[u8; 32]>()));
        }
        let (certs, acme) = match &config.tls.acme {
            Some(acme) => {
                let acme = tls::acme::Acme::new(acme)?;
                (ServerCerts::Resolver(acme.resolver()), Some(acme))
            }
            None => {
                let certs = match (&config.tls.cert, &config.tls.key) {
                    (Some(cert), Some(key)) => ServerCerts::Files(Arc::new(tls::files::FileCert::load(cert, key)?)),
                    _ => ServerCerts::Static(Identity::self_signed()?),
                };
                (certs, None)
            }
        };
        if let (Some(path), Some(fingerprint)) = (&config.tls.fingerprint_file, certs.fingerprint()) {
            if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir).map_err(|source| RelayError::Write {
                    path: dir.display().to_string(),
                    source,
                })?;
            }
            std::fs::write(path, format!("{fingerprint}\n")).map_err(|source| RelayError::Write {
                path: path.display().to_string(),
                source,
            })?;
        }
        // Compiled here, before any socket is bound: a broken module stops the start, not a request.
        let policies = policy::Policies::load(&config.policies)?;
        // The queues are opened (and what a previous run left read) before anything listens;
        // their deliverers start with the relay's other tasks (`run`).
        let webhooks = webhooks::Webhooks::open(&config.webhooks, &config.webhook_delivery)?;
        let http_addr = config.http.listen;
        let http = limits::listen_tcp(http_addr).map_err(|source| RelayError::Bind {
            what: "http (TCP)",
            addr: http_addr,
            source,
        })?;
        let endpoint = tunnel::endpoint(config.tunnel.listen, &certs, &config.tunnel)?;
        let turn = if config.turn.mode == config::TurnMode::Embedded {
            let own = [config.http.listen.ip(), config.tunnel.listen.ip()];
            Some(turn::TurnServer::bind(&config.turn, &certs, &own, shutdown.clone())?)
        } else {
            None
        };
        Ok(Self {
            state: AppState::with_metrics(config, shutdown, metrics, policies, webhooks),
            certs,
            acme,
            http,
            endpoint,
            turn,
        })
    }

    pub fn http_addr(&self) -> SocketAddr {
        // A bound listener always has a local address; fall back to the configured one regardless.
        self.http.local_addr().unwrap_or(self.state.config.http.listen)
    }

    pub fn tunnel_addr(&self) -> SocketAddr {
        self.endpoint.local_addr().unwrap_or(self.state.config.tunnel.listen)
    }

    /// SHA-256 of the certificate workers may pin; empty with ACME (trust the CA instead).
    pub fn fingerprint(&self) -> String {
        self.certs.fingerprint().unwrap_or_default()
    }

    pub fn state(&self) -> &Arc<AppState> {
        &self.state
    }

    /// Whether anyone on the internet may start sessions: the HTTP listener is reachable from
    /// outside (a wildcard or a public address, or a reverse proxy forwards to it) and no auth
    /// policy is loaded. Every such session spends the operator's GPU slots and paid LLM and
    /// speech keys, so the relay warns at start.
    pub fn open_to_anyone(&self) -> bool {
        let auth = self.state.policies.as_ref().is_some_and(|p| p.has_auth());
        let proxied = !self.state.config.limits.trusted_proxies.is_empty();
        !auth && (proxied || reachable_from_outside(self.http_addr().ip()))
    }

    /// The embedded TURN server, if configured (its addresses and counters).
    pub fn turn(&self) -> Option<&turn::TurnServer> {
        self.turn.as_ref()
    }

    /// Serve until the shutdown token fires; returns when HTTP and every tunnel have stopped.
    pub async fn run(self) -> Result<(), RelayError> {
        let Self {
            state,
            certs,
            acme,
            http,
            endpoint,
            turn,
        } = self;
        // Every background task of the relay, so that shutdown waits for all of them in one place.
        // Each ends when `shutdown` fires; none has a grace timer of its own.
        let tasks = TaskTracker::new();
        let turn_server = turn.as_ref().map(turn::TurnServer::server);
        if let Some(t) = turn {
            tasks.spawn(t.run());
        }
        // One deliverer per webhook; those a reload adds later join these tasks too.
        state.webhooks.start(&tasks, &state.shutdown);
        let acme_running = acme.is_some();
        if let Some(a) = acme {
            tasks.spawn(a.drive(state.shutdown.clone()));
        }
        let shutdown = state.shutdown.clone();
        // TLS/TCP tunnels come in through the HTTPS listener (`tunnel.tcp_on_https`).
        let (tcp_tunnels, tcp_incoming) = tokio::sync::mpsc::channel(64);
        let listeners = tunnel::Listeners {
            endpoint,
            tcp: tcp_incoming,
            turn: turn_server,
        };
        tasks.spawn(tunnel::serve(listeners, Arc::clone(&state), shutdown.clone()));
        // Forget idle per-IP rate-limit entries so the table does not grow without bound.
        {
            let (state, shutdown) = (Arc::clone(&state), shutdown.clone());
            tasks.spawn(async move {
                let mut tick = tokio::time::interval(Duration::from_secs(60));
                loop {
                    tokio::select! {
                        _ = shutdown.cancelled() => break,
                        _ = tick.tick() => {
                            if let Some(l) = state.connect_limiter.load().as_deref() {
                                l.retain_recent();
                                l.shrink_to_fit();
                            }
                            state.sweep_sessions();
                        }
                    }
                }
            });
        }
        if let Some(p) = state.policies.clone() {
            tasks.spawn(p.watch(shutdown.clone()));
        }
        if let ServerCerts::Files(files) = &certs {
            let fingerprint_file = state.config.tls.fingerprint_file.clone();
            tasks.spawn(tls::files::watch(Arc::clone(files), fingerprint_file, shutdown.clone()));
        }
        let grace = Duration::from_millis(state.config.http.shutdown_grace_ms);
        let handle = axum_server::Handle::new();
        let app = http::app(Arc::clone(&state)).into_make_service_with_connect_info::<SocketAddr>();
        let http_cfg = &state.config.http;
        let (max_connections, nofile) = limits::fit_to_descriptor_limit(http_cfg.max_connections);
        if max_connections < http_cfg.max_connections {
            tracing::warn!(
                configured = http_cfg.max_connections,
                used = max_connections,
                descriptor_limit = ?nofile,
                "http.max_connections lowered to fit the descriptor limit (raise LimitNOFILE to allow more)"
            );
        }
        let connection_limits = limits::ConnectionLimits {
            counts: Arc::clone(&state.http_connections),
            per_client: http_cfg.max_connections_per_ip,
            total: max_connections,
            state: Arc::clone(&state),
        };
        let header_read = Duration::from_millis(http_cfg.header_read_timeout_ms);
        // Slowloris and silent connections: the first request head must arrive within
        // `header_read` (this also bounds hyper's protocol detection and, over TLS, the silence
        // after the handshake); on a kept-alive connection hyper's header timer bounds the wait
        // for the next request. A WebSocket, once upgraded, is timed by the signaling loop.
        {
            // `http.shutdown_grace_ms`: how long open HTTP connections get to finish.
            let handle = handle.clone();
            let shutdown = shutdown.clone();
            tasks.spawn(async move {
                shutdown.cancelled().await;
                handle.graceful_shutdown(Some(grace));
            });
        }
        let served = if state.config.http.tls {
            let mut alpn = vec![b"http/1.1".to_vec()];
            if state.config.tunnel.tcp_on_https {
                alpn.push(avatar_proto::tunnel::TCP_ALPN.to_vec());
            }
            if acme_running {
                // The CA's TLS-ALPN-01 check arrives on this listener.
                alpn.push(tls::acme::ACME_TLS_ALPN.to_vec());
            }
            let tls = certs.server_config(false, alpn)?;
            let config = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(tls));
            // TCP_NODELAY: signaling sends small messages back to back (session_assigned, then the
            // answer); with Nagle the second waits for the browser's delayed ACK, ~40 ms.
            // Connection caps first: a client over its cap costs no handshake.
            let acceptor = RustlsAcceptor::new(config)
                .handshake_timeout(Duration::from_millis(http_cfg.tls_handshake_timeout_ms))
                .acceptor(limits::LimitAcceptor::new(connection_limits, NoDelayAcceptor::new()));
            let acceptor = tunnel::tcp::TunnelDivert::new(acceptor, tcp_tunnels);
            let mut server = axum_server::from_tcp(http)
                .map_err(RelayError::Serve)?
                .acceptor(acceptor)
                .first_request_timeout(header_read);
            configure_http(&mut server, header_read);
            server.handle(handle).serve(app).await
        } else {
            let mut server = axum_server::from_tcp(http)
                .map_err(RelayError::Serve)?
                .acceptor(limits::LimitAcceptor::new(connection_limits, NoDelayAcceptor::new()))
                .first_request_timeout(header_read);
            configure_http(&mut server, header_read);
            server.handle(handle).serve(app).await
        };
        // Whatever ended the HTTP server, stop everything else too.
        shutdown.cancel();
        tasks.close();
        tasks.wait().await;
        info!("relay stopped");
        served.map_err(RelayError::Serve)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn state(binding_s: u64) -> Arc<AppState> {
        let mut config = RelayConfig::dev();
        config.limits.session_binding_s = binding_s;
        AppState::new(config, CancellationToken::new())
    }

    #[test]
    fn a_reload_swaps_keys_origins_and_api_limits_and_says_when_the_rest_needs_a_restart() {
        let s = state(600);
        let mut new = RelayConfig::dev();
        new.http.allowed_origins = vec!["https://school.example".into()];
        new.api.max_text_chars = 99;
        new.api.keys.push(config::ApiKey {
            name: "backend".into(),
            key: config::Secret::new("backend-0123456789abcdef0123456789"),
            key_file: None,
        });
        let done = s.reload(&new);
        assert_eq!(
            done,
            Reloaded {
                changed: vec![
                    "http.allowed_origins".into(),
                    "api.keys (1 now)".into(),
                    "api limits".into()
                ],
                restart_needed: false,
                failed: vec![]
            }
        );
        let live = s.live();
        assert_eq!(live.allowed_origins, ["https://school.example"]);
        assert_eq!((live.api.keys.len(), live.api.max_text_chars), (1, 99));
        // The same again: nothing changed. A listen address: only a restart moves it.
        assert_eq!(s.reload(&new).changed, Vec::<String>::new());
        new.http.listen = "127.0.0.1:9999".parse().expect("address");
        assert!(s.reload(&new).restart_needed);
        assert_eq!(
            s.config.http.listen,
            RelayConfig::dev().http.listen,
            "the running listener stays"
        );
    }

    #[test]
    fn a_reload_applies_limits_and_a_changed_connection_rate_to_the_next_request() {
        let s = state(600);
        let ip: std::net::IpAddr = "192.0.2.7".parse().expect("ip");
        let allowed = || {
            s.connect_limiter
                .load()
                .as_deref()
                .is_none_or(|l| l.check_key(&ip).is_ok())
        };
        assert!(allowed() && allowed(), "120 a minute: two at once pass");
        let mut new = RelayConfig::dev();
        new.limits.connections_per_ip_per_minute = 1;
        new.limits.session_binding_s = 0;
        new.limits.trusted_proxies = vec!["198.51.100.0/24".parse().expect("net")];
        assert_eq!(
            s.reload(&new),
            Reloaded {
                changed: vec!["limits".into()],
                restart_needed: false,
                failed: vec![]
            }
        );
        assert_eq!(s.live().limits.connections_per_ip_per_minute, 1);
        assert_eq!(
            s.config.limits.session_binding_s, 600,
            "the started config stays as it was"
        );
        // A new limiter, its counts afresh: the first connection passes, the second is refused.
        assert!(allowed(), "counted afresh");
        assert!(!allowed(), "one a minute");
        // A trusted proxy is exempt from the per-client caps from now on...
        assert_eq!(s.connection_key("198.51.100.2".parse().expect("ip")), None);
        assert_eq!(s.connection_key(ip), Some(ip));
        // ...and without a binding time a left session id is free at once.
        drop(s.claim_session("lesson", Some("alice")).expect("free"));
        drop(
            s.claim_session("lesson", Some("bob"))
                .expect("no binding since the reload"),
        );
        // Another limit changed: the limiter, and what it counted, stay.
        new.limits.sockets_per_ip = 3;
        assert_eq!(s.reload(&new).changed, ["limits"]);
        assert!(!allowed(), "still counted");
        // 0: no limit.
        new.limits.connections_per_ip_per_minute = 0;
        assert_eq!(s.reload(&new).changed, ["limits"]);
        assert!(s.connect_limiter.load().is_none());
        assert!(allowed() && allowed());
    }

    #[test]
    fn a_reload_applies_webhooks_and_leaves_webhook_delivery_to_a_restart() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = RelayConfig::dev();
        config.webhook_delivery.dir = dir.path().join("webhooks");
        let s = AppState::new(config.clone(), CancellationToken::new());
        let mut new = config;
        new.webhooks.push(config::WebhookConfig {
            url: "http://192.0.2.1/events".into(),
            secret: config::Secret::new("0123456789abcdef"),
            secret_file: None,
            events: None,
            name: Some("backend".into()),
        });
        let done = s.reload(&new);
        assert_eq!(
            done,
            Reloaded {
                changed: vec!["webhooks: added backend".into()],
                restart_needed: false,
                failed: vec![]
            }
        );
        assert!(s.webhooks.enabled());
        // `[webhook_delivery]`: read at start only.
        new.webhook_delivery.max_queued = 7;
        let done = s.reload(&new);
        assert_eq!((done.changed.len(), done.restart_needed), (0, true));
        // A queue that cannot be opened (a file where its folder goes): said, and nothing changes.
        let mut blocked = RelayConfig::dev();
        blocked.webhook_delivery.dir = dir.path().join("webhooks-file");
        std::fs::write(&blocked.webhook_delivery.dir, b"").expect("file");
        let s = AppState::new(blocked, CancellationToken::new());
        let done = s.reload(&new);
        assert_eq!((done.changed.len(), done.failed.len()), (0, 1), "{done:?}");
        assert!(!s.webhooks.enabled());
    }

    #[test]
    fn a_session_id_stays_bound_to_its_owner_after_they_leave() {
        let s = state(600);
        let alice = s.claim_session("lesson", Some("alice")).expect("free");
        assert_eq!(s.claim_session("lesson", Some("bob")).err(), Some(ClaimRefused::InUse));
        drop(alice);
        assert_eq!(
            s.claim_session("lesson", Some("bob")).err(),
            Some(ClaimRefused::BoundToAnother)
        );
        assert_eq!(
            s.claim_session("lesson", None).err(),
            Some(ClaimRefused::BoundToAnother),
            "nor anyone anonymous"
        );
        let back = s.claim_session("lesson", Some("alice")).expect("the owner returns");
        drop(back);
        // Without an owner (no auth policy) the id is free once the socket goes.
        drop(s.claim_session("open", None).expect("free"));
        drop(s.claim_session("open", Some("bob")).expect("free again"));
    }

    #[test]
    fn without_a_binding_time_a_left_session_id_is_free_for_anyone() {
        let s = state(0);
        drop(s.claim_session("lesson", Some("alice")).expect("free"));
        drop(s.claim_session("lesson", Some("bob")).expect("no binding"));
        s.sweep_sessions();
        assert!(s.sessions().is_empty(), "swept");
    }
}

/// An address others on the internet can reach: a wildcard, or one that is neither loopback,
/// private (RFC 1918, unique-local), shared (100.64/10) nor link-local.
fn reachable_from_outside(ip: std::net::IpAddr) -> bool {
    use std::net::IpAddr;
    match avatar_proto::netfilter::canonical(ip) {
        IpAddr::V4(v4) => {
            let shared = v4.octets()[0] == 100 && (v4.octets()[1] & 0xC0) == 64;
            !(v4.is_loopback() || v4.is_private() || v4.is_link_local() || shared)
        }
        IpAddr::V6(v6) => {
            let unique_local = (v6.segments()[0] & 0xFE00) == 0xFC00;
            let link_local = (v6.segments()[0] & 0xFFC0) == 0xFE80;
            !(v6.is_loopback() || unique_local || link_local)
        }
    }
}

#[cfg(test)]
mod open_access_tests {
    use super::reachable_from_outside;

    #[test]
    fn wildcards_and_public_addresses_are_reachable_private_ones_are_not() {
        for reachable in ["0.0.0.0", "::", "203.0.113.5", "2001:db8::1"] {
            assert!(reachable_from_outside(reachable.parse().expect("ip")), "{reachable}");
        }
        for local in [
            "127.0.0.1",
            "::1",
            "10.1.2.3",
            "192.168.1.1",
            "172.16.0.1",
            "100.64.0.1",
            "fd00::1",
            "fe80::1",
        ] {
            assert!(!reachable_from_outside(local.parse().expect("ip")), "{local}");
        }
    }
}
