//! The relay's configuration: one TOML file, every key optional, unknown keys rejected.
//!
//! Parsing ([`RelayConfig::from_toml`]) is separate from loading a file so tests can build configs
//! from strings. Secrets live in [`Secret`], whose `Debug` prints `***`, and can come from the
//! environment (`AVATAR_EDGE_TUNNEL_SECRET`) instead of the file.

use serde::{Deserialize, Serialize};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

/// A secret string that never appears in logs or `Debug` output.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

/// Serialized (the configuration reference test walks the keys) as `***`, never the value.
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Secret used by `--dev` on both binaries. Never use it on a network you do not own.
pub use avatar_proto::tunnel::DEV_SECRET as DEV_TUNNEL_SECRET;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RelayConfig {
    /// Shown to workers in the challenge and in logs.
    pub relay_id: String,
    pub http: HttpConfig,
    pub tunnel: TunnelConfig,
    pub tls: TlsConfig,
    pub limits: LimitsConfig,
    pub policies: PoliciesConfig,
    pub turn: TurnConfig,
    /// `[api]`: the session API for the operator's backend (off without keys).
    pub api: ApiConfig,
    /// `[[webhooks]]`: where each session's events are POSTed, signed ([`crate::webhooks`]).
    pub webhooks: Vec<WebhookConfig>,
    /// `[webhook_delivery]`: the queue on disk and the retries, for every webhook.
    pub webhook_delivery: WebhookDelivery,
    /// Keys whose value is still a shipped `REQUIRED` placeholder (see `avatar_proto::required`).
    #[serde(skip)]
    pub unset_required: Vec<String>,
}

/// `turn.mode`: where browsers' TURN comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum TurnMode {
    /// Hand out no STUN/TURN servers.
    Off,
    /// An existing coturn with `use-auth-secret`; the relay only mints its credentials.
    External,
    /// The relay's own TURN server (`[turn.embedded]`).
    Embedded,
}

/// `[turn]`: the STUN/TURN servers handed to browsers (the `ice_servers` event,
/// `GET /api/ice-servers`) and to workers (with each session), with coturn REST-API credentials.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TurnConfig {
    /// `off` (hand out nothing), or `external`: an existing coturn with `use-auth-secret` and
    /// `static-auth-secret` equal to `secret`; the relay only mints credentials for it.
    pub mode: TurnMode,
    /// Shared with coturn's `static-auth-secret`. Overridden by `AVATAR_EDGE_TURN_SECRET`.
    pub secret: Secret,
    /// TURN URLs, e.g. `turn:turn.example.com:3478?transport=udp`, `turns:turn.example.com:443?transport=tcp`.
    pub urls: Vec<String>,
    /// STUN URLs handed out without credentials, e.g. `stun:turn.example.com:3478`.
    pub stun_urls: Vec<String>,
    /// Lifetime of minted credentials (keep it short: a leaked credential is a relay for anyone).
    pub ttl_s: u64,
    /// The embedded server (`mode = "embedded"`).
    pub embedded: EmbeddedTurnConfig,
}

/// `[turn.embedded]`: TURN/STUN inside the relay process.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct EmbeddedTurnConfig {
    /// STUN/TURN over UDP (the usual 3478). Unset: no UDP listener.
    pub listen_udp: Option<SocketAddr>,
    /// TURN over TCP (usually the same port as UDP).
    pub listen_tcp: Option<SocketAddr>,
    /// TURN over TLS with the relay's certificate (5349, or 443 on a host without HTTPS there).
    pub listen_tls: Option<SocketAddr>,
    /// Realm in the long-term credentials.
    pub realm: String,
    /// Address the relayed sockets bind to.
    pub relay_ip: IpAddr,
    /// Address announced to clients as the relayed address (the VPS's public IP; NAT 1:1 clouds
    /// bind to a private one). Defaults to `relay_ip` when that is not 0.0.0.0.
    pub public_ip: Option<IpAddr>,
    /// Relayed ports are taken from this range (open it in the firewall).
    pub relay_port_min: u16,
    pub relay_port_max: u16,
    /// Allocations one browser user may hold at once, whatever credentials they were minted
    /// (a fresh credential every second, or a fresh session id, gives no fresh quota). The user
    /// is the auth policy's principal, or the session id without one.
    #[serde(alias = "max_allocations_per_credential")]
    pub max_allocations_per_user: usize,
    /// Allocations held at once by browser credentials from one source address (IPv6: one /64):
    /// the cap on an anonymous client that opens many sockets under many session ids.
    pub max_allocations_per_ip: usize,
    /// Allocations one worker may hold at once (a worker allocates for each of its sessions; its
    /// identities are minted only for workers and never for a browser).
    pub max_allocations_per_worker: usize,
    /// Allocations the whole server holds at once.
    pub max_allocations: usize,
    /// Longest lifetime one Allocate/Refresh grants, seconds.
    pub max_lifetime_s: u64,
    /// Longest an allocation lives however often it is refreshed, seconds.
    pub max_allocation_age_s: u64,
    /// Relayed bandwidth per allocation and direction, kbit/s (bursts of one second allowed).
    pub bandwidth_kbps: u32,
    /// 401 answers per source IP per minute (bursts of that size); further ones are dropped.
    pub unauthorized_per_minute: u32,
    /// Peers in these ranges are relayed to even though they are special-purpose (tests, LANs).
    pub allow_peers: Vec<ipnet::IpNet>,
    /// More ranges to refuse, on top of the built-in special-purpose list.
    pub deny_peers: Vec<ipnet::IpNet>,
    /// TCP and TLS connections held at once; further ones are closed on accept.
    pub max_stream_connections: usize,
    /// TCP and TLS connections one source address (IPv6: one /64) holds at once; further ones
    /// are closed on accept.
    pub max_stream_connections_per_ip: usize,
    /// A TCP or TLS connection must send a STUN message within this (after its TLS handshake).
    pub stream_first_message_within_ms: u64,
    /// A TCP or TLS connection that holds no allocation this long after it opened is closed.
    pub stream_allocate_within_s: u64,
    /// SO_RCVBUF/SO_SNDBUF of every TURN socket (bursts of many clients; capped by the kernel's
    /// net.core.rmem_max/wmem_max).
    pub socket_buffer_bytes: usize,
}

impl EmbeddedTurnConfig {
    /// The relayed address announced to clients.
    pub fn announced_ip(&self) -> Option<IpAddr> {
        self.public_ip
            .or((!self.relay_ip.is_unspecified()).then_some(self.relay_ip))
    }
}

impl TurnConfig {
    /// TURN URLs to hand out: `urls`, or for the embedded server with none configured, its UDP
    /// and TCP listeners at the announced address (`turns:` needs a host name matching the
    /// certificate, so list it in `urls`).
    pub fn turn_urls(&self) -> Vec<String> {
        if !self.urls.is_empty() || self.mode != TurnMode::Embedded {
            return self.urls.clone();
        }
        let Some(host) = self.embedded_host() else {
            return Vec::new();
        };
        let mut urls = Vec::new();
        if let Some(a) = self.embedded.listen_udp {
            urls.push(format!("turn:{host}:{}?transport=udp", a.port()));
        }
        if let Some(a) = self.embedded.listen_tcp {
            urls.push(format!("turn:{host}:{}?transport=tcp", a.port()));
        }
        urls
    }

    /// STUN URLs to hand out: `stun_urls`, or the embedded server's UDP listener.
    pub fn stun_urls(&self) -> Vec<String> {
        if !self.stun_urls.is_empty() || self.mode != TurnMode::Embedded {
            return self.stun_urls.clone();
        }
        match (self.embedded_host(), self.embedded.listen_udp) {
            (Some(host), Some(a)) => vec![format!("stun:{host}:{}", a.port())],
            _ => Vec::new(),
        }
    }

    /// The announced address as it goes into a URL (IPv6 in brackets).
    fn embedded_host(&self) -> Option<String> {
        let ip = self.embedded.announced_ip()?;
        Some(match ip {
            IpAddr::V4(v4) => v4.to_string(),
            IpAddr::V6(v6) => format!("[{v6}]"),
        })
    }
}

impl Default for EmbeddedTurnConfig {
    fn default() -> Self {
        Self {
            listen_udp: Some(SocketAddr::from(([0, 0, 0, 0], 3478))),
            listen_tcp: Some(SocketAddr::from(([0, 0, 0, 0], 3478))),
            listen_tls: None,
            realm: "avatar-edge".into(),
            relay_ip: IpAddr::from([0, 0, 0, 0]),
            public_ip: None,
            relay_port_min: 49152,
            relay_port_max: 65535,
            max_allocations_per_user: 12,
            max_allocations_per_ip: 64,
            max_allocations_per_worker: 2048,
            max_allocations: 10_000,
            max_lifetime_s: 3600,
            max_allocation_age_s: 4 * 3600,
            bandwidth_kbps: 16_000,
            unauthorized_per_minute: 30,
            allow_peers: Vec::new(),
            deny_peers: Vec::new(),
            max_stream_connections: 4096,
            max_stream_connections_per_ip: 64,
            stream_first_message_within_ms: 3000,
            stream_allocate_within_s: 30,
            socket_buffer_bytes: 8 << 20,
        }
    }
}

impl Default for TurnConfig {
    fn default() -> Self {
        Self {
            mode: TurnMode::Off,
            secret: Secret::default(),
            urls: Vec::new(),
            stun_urls: Vec::new(),
            ttl_s: 300,
            embedded: EmbeddedTurnConfig::default(),
        }
    }
}

/// `[policies]`: operator-written WebAssembly modules that decide admission and routing.
///
/// See `docs/policies.md`. With no `auth` module everyone is admitted; with no `router` module the
/// built-in least-loaded rule routes.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct PoliciesConfig {
    /// The `auth` world module: admits connects, checks messages. Fails closed.
    pub auth: Option<PolicyModuleConfig>,
    /// The `router` world module: picks a worker. Takes `fallback` when it fails.
    pub router: Option<PolicyModuleConfig>,
    /// Wall-clock budget of one decision (instantiate + call), in milliseconds.
    pub deadline_ms: u64,
    /// Linear memory one decision may use.
    pub max_memory_bytes: usize,
    /// Largest module file accepted.
    pub max_module_bytes: u64,
    /// Largest decision accepted (user id, claims and reasons together).
    pub max_output_bytes: usize,
    /// Decisions running at once; more wait for a free slot.
    pub max_concurrent: u32,
    /// How often module and config files are checked for changes; 0 turns polling off
    /// (SIGHUP still reloads).
    pub reload_poll_ms: u64,
    /// Keep compiled modules here so a restart or reload of an unchanged module skips compiling.
    pub cache_dir: Option<PathBuf>,
}

impl Default for PoliciesConfig {
    fn default() -> Self {
        Self {
            auth: None,
            router: None,
            deadline_ms: 10,
            max_memory_bytes: 16 << 20,
            max_module_bytes: 8 << 20,
            max_output_bytes: 64 << 10,
            max_concurrent: 64,
            reload_poll_ms: 1000,
            cache_dir: None,
        }
    }
}

/// One policy module.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct PolicyModuleConfig {
    /// The component file (`.wasm`), built with `scripts/build-policies` or the SDK.
    pub path: PathBuf,
    /// The module's settings, handed to it by `host.config()`: a TOML table (passed as JSON) or
    /// a string (passed as is). Never logged.
    pub config: Option<ModuleSettings>,
    /// Read the settings from this file instead (for secrets: keep it readable by the relay
    /// only). Re-read on reload.
    pub config_file: Option<PathBuf>,
    /// Router only: what to do when the module fails (`builtin`: the least-loaded rule;
    /// `reject`: the session gets `no_worker`).
    pub fallback: Option<RouterFallback>,
}

/// A module's settings as written in the relay config. `Debug` hides them: they hold keys.
#[derive(Clone, Deserialize)]
#[serde(transparent)]
pub struct ModuleSettings(pub toml::Value);

impl Serialize for ModuleSettings {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str("***")
    }
}

impl fmt::Debug for ModuleSettings {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl ModuleSettings {
    /// The string the module sees: strings verbatim, anything else as JSON.
    pub fn to_module_string(&self) -> String {
        match &self.0 {
            toml::Value::String(s) => s.clone(),
            // Serializing a parsed TOML value to JSON cannot fail (no non-string keys, no NaN
            // keys); fall back to an empty config rather than panic.
            other => serde_json::to_string(other).unwrap_or_default(),
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum RouterFallback {
    #[default]
    Builtin,
    Reject,
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// New WebSocket connections (and `/api/ice-servers` requests) one client address may make
    /// per minute (burst included); 0: no limit.
    pub connections_per_ip_per_minute: u32,
    /// WebSockets one client address may hold open at once; 0: no limit.
    pub sockets_per_ip: usize,
    /// IPv6 clients are counted per network of this prefix length (one subscriber usually holds
    /// a whole /64, so counting single addresses would let one client multiply its quota).
    pub ipv6_prefix_len: u8,
    /// Reverse proxies whose `X-Forwarded-For` / `Forwarded` headers name the client. Requests
    /// from any other address are taken to come from that address, headers ignored.
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// With an auth policy that names a user, a session id stays bound to that user this long
    /// after their socket closes: nobody else can take it over meanwhile.
    pub session_binding_s: u64,
    /// A browser that has not taken an event this long after it was sent (it stopped reading)
    /// is disconnected, so it cannot hold its session's task and buffers.
    pub write_timeout_ms: u64,
    /// Close a socket that has no worker session and sends nothing for this long.
    pub idle_timeout_ms: u64,
    /// End any session after this long, however busy.
    pub max_session_ms: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        Self {
            connections_per_ip_per_minute: 120,
            sockets_per_ip: 64,
            ipv6_prefix_len: 64,
            trusted_proxies: Vec::new(),
            session_binding_s: 600,
            write_timeout_ms: 10_000,
            idle_timeout_ms: 120_000,
            max_session_ms: 4 * 3600 * 1000,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// Where browsers connect (web client, `/ws/{session_id}`, `/healthz`).
    pub listen: SocketAddr,
    /// Serve HTTPS/WSS with the `[tls]` certificate instead of plain HTTP/WS.
    pub tls: bool,
    /// Serve the web client from this directory instead of the copy built into the binary.
    pub web_client_dir: Option<PathBuf>,
    /// Largest signaling message accepted; larger ones get `message_too_large`.
    pub max_message_bytes: usize,
    /// Messages above this size close the socket (1009) instead of getting an error event;
    /// nothing larger is ever buffered.
    pub max_frame_bytes: usize,
    /// How long open connections get to finish on shutdown.
    pub shutdown_grace_ms: u64,
    /// A new connection must send a complete request head within this, and a kept-alive one
    /// that sends nothing for this long is closed (slowloris and silent connections).
    pub header_read_timeout_ms: u64,
    /// A TLS handshake must complete within this (`tls = true`).
    pub tls_handshake_timeout_ms: u64,
    /// Connections held open at once, all clients together; further ones are closed on
    /// accept. Lowered at start to fit the process's descriptor limit.
    pub max_connections: usize,
    /// Connections one client address (IPv6: one `limits.ipv6_prefix_len` network) may hold
    /// open at once; trusted proxies are exempt. 0: no limit.
    pub max_connections_per_ip: usize,
    /// Browser origins allowed to open `/ws/…` (e.g. `https://tutor.example.com`); empty: any
    /// origin. Requests without an `Origin` header (not a browser) are not affected. Set it when
    /// an auth policy reads cookies, or a third-party page could use a visitor's cookies.
    pub allowed_origins: Vec<String>,
    /// Bearer token for `/metrics`. Without one, `/metrics` answers only requests from loopback
    /// that did not come through a proxy.
    pub metrics_token: Option<Secret>,
    /// The `Content-Security-Policy` of every response. The default keeps the page's scripts,
    /// styles and connections on its own origin and out of frames; a page in `web_client_dir`
    /// with inline scripts or third-party assets needs its own. Empty: no header.
    pub content_security_policy: String,
}

/// The default `http.content_security_policy`.
pub const DEFAULT_CSP: &str = "default-src 'self'; connect-src 'self'; img-src 'self' data:; \
    media-src 'self' blob: mediastream:; object-src 'none'; base-uri 'none'; frame-ancestors 'none'; \
    form-action 'self'";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelConfig {
    /// UDP address for workers' QUIC tunnels.
    pub listen: SocketAddr,
    /// Shared secret workers prove knowledge of. Overridden by `AVATAR_EDGE_TUNNEL_SECRET`.
    pub secret: Secret,
    /// Read the secret from this file instead (its first line; the package generates
    /// `/etc/avatar-edge/tunnel.secret`). `AVATAR_EDGE_TUNNEL_SECRET` still wins.
    pub secret_file: Option<PathBuf>,
    /// A tunnel silent this long is dead (QUIC idle timeout).
    pub idle_timeout_ms: u64,
    /// QUIC keep-alive interval; keep it well under the idle timeout.
    pub keepalive_ms: u64,
    /// Time a worker gets to complete the QUIC handshake, hello, auth and registration.
    pub handshake_timeout_ms: u64,
    /// Once its QUIC or TLS handshake is done, a connection must send its hello within this.
    pub hello_timeout_ms: u64,
    /// Connections that have not yet authenticated, at once; further ones are refused.
    pub max_pending_handshakes: usize,
    /// Unauthenticated connections one source address (IPv6: one `limits.ipv6_prefix_len`
    /// network) may hold at once, QUIC and TLS/TCP together, once its address is proven.
    pub max_pending_handshakes_per_ip: usize,
    /// Above this many pending handshakes, a client whose address is not yet validated gets a
    /// QUIC Retry first (proves its address, costs the relay no state).
    pub retry_above_pending: usize,
    /// Bytes a worker may have in flight to the relay on one tunnel (QUIC receive window).
    pub receive_window_bytes: u32,
    /// Bytes in flight on one stream of a tunnel.
    pub stream_receive_window_bytes: u32,
    /// Accept tunnels over TLS/TCP on the HTTPS listener (ALPN `avatar-edge-tcp/1`), for
    /// workers whose network blocks UDP. Needs `http.tls`.
    pub tcp_on_https: bool,
    /// The most sessions one worker id is routed at once, whatever capacity it declares (a
    /// worker's `[[tunnel.workers]] max_capacity` overrides it).
    pub max_capacity_per_worker: u32,
    /// Workers with keys of their own (`[[tunnel.workers]]`). A listed id registers with its own
    /// key only; the shared `secret`, when set, admits ids that are not listed.
    pub workers: Vec<WorkerCredential>,
}

/// `[[tunnel.workers]]`: one worker id and the key it alone proves.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WorkerCredential {
    /// The worker's `worker_id`.
    pub id: String,
    /// Its key (at least 16 characters); the worker sets it as its `secret`.
    #[serde(default)]
    pub key: Secret,
    /// Read the key from this file instead (its first line).
    pub key_file: Option<PathBuf>,
    /// The most sessions this worker is routed at once (default `tunnel.max_capacity_per_worker`).
    pub max_capacity: Option<u32>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TlsConfig {
    /// PEM certificate chain, used for the QUIC tunnel and (if `http.tls`) for HTTPS.
    pub cert: Option<PathBuf>,
    /// PEM private key for `cert`.
    pub key: Option<PathBuf>,
    /// Generate a self-signed certificate at start (development only).
    pub self_signed: bool,
    /// Write the certificate's SHA-256 fingerprint here, for workers to pin.
    pub fingerprint_file: Option<PathBuf>,
    /// Obtain and renew the certificate from an ACME CA (Let's Encrypt by default) instead of
    /// `cert`/`key`. Workers then trust the CA (`ca_file`), not a pin.
    pub acme: Option<AcmeConfig>,
}

/// `[tls.acme]`: certificates by ACME (TLS-ALPN-01 on the HTTPS port, which must be 443 for a
/// public CA), cached on disk and renewed in the background.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AcmeConfig {
    /// DNS names for the certificate; they must resolve to this relay.
    pub domains: Vec<String>,
    /// Contacts for the CA, e.g. `mailto:ops@example.com`.
    #[serde(default)]
    pub contact: Vec<String>,
    /// Account key and certificates live here (keep it across restarts: CAs rate-limit).
    pub cache_dir: PathBuf,
    /// The CA's ACME directory URL.
    #[serde(default = "AcmeConfig::lets_encrypt")]
    pub directory: String,
    /// PEM roots to trust for the ACME server's own HTTPS (a private CA); default: the public
    /// web roots.
    pub ca_file: Option<PathBuf>,
}

impl AcmeConfig {
    pub const LETS_ENCRYPT: &'static str = "https://acme-v02.api.letsencrypt.org/directory";

    fn lets_encrypt() -> String {
        Self::LETS_ENCRYPT.into()
    }
}

impl Default for RelayConfig {
    fn default() -> Self {
        Self {
            relay_id: "relay".into(),
            http: HttpConfig::default(),
            tunnel: TunnelConfig::default(),
            tls: TlsConfig::default(),
            limits: LimitsConfig::default(),
            policies: PoliciesConfig::default(),
            turn: TurnConfig::default(),
            api: ApiConfig::default(),
            webhooks: Vec::new(),
            webhook_delivery: WebhookDelivery::default(),
            unset_required: Vec::new(),
        }
    }
}

/// `[api]`: the session API (`/api/v1/...`) for the operator's servers. Off (404) until a key
/// is configured; separate from the end users' auth policies.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    /// `[[api.keys]]`: who may call it.
    pub keys: Vec<ApiKey>,
    /// Calls per minute one key may make (a burst of a tenth of it at once).
    pub requests_per_minute: u32,
    /// The longest `say` text, in characters (413 above it).
    pub max_text_chars: usize,
    /// How long a call waits for the workers' answers (and an audio upload for its next bytes).
    pub timeout_ms: u64,
    /// The longest audio upload, in seconds of audio (413 above it).
    pub max_audio_seconds: u32,
    /// Audio uploads one key may have in progress at once (each holds a tunnel stream); more get
    /// 429. Raise it for a backend that speaks into more sessions at once.
    pub max_uploads_per_key: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        Self {
            keys: Vec::new(),
            requests_per_minute: 600,
            max_text_chars: 2000,
            timeout_ms: 5000,
            max_audio_seconds: 300,
            max_uploads_per_key: 32,
        }
    }
}

/// `[[webhooks]]`: one receiver of the relay's events.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct WebhookConfig {
    /// Where each event is POSTed (`http://` or `https://`).
    pub url: String,
    /// Signs every POST (`Avatar-Edge-Signature`); at least 16 characters.
    #[serde(default)]
    pub secret: Secret,
    /// Read the secret from this file instead (its first line).
    pub secret_file: Option<PathBuf>,
    /// Only these event types (default: all of them).
    pub events: Option<Vec<String>>,
    /// Names the receiver in logs and metrics (default: the URL's host).
    pub name: Option<String>,
}

/// `[webhook_delivery]`: how events reach the `[[webhooks]]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookDelivery {
    /// The queue on disk: one folder per webhook, one file per event not yet delivered.
    pub dir: PathBuf,
    /// Events one webhook's queue holds; past it the oldest are dropped (and counted).
    pub max_queued: usize,
    /// How long an event is retried before it is dropped (and counted); at least an hour.
    pub retry_for_s: u64,
    /// The longest wait between two tries (the wait doubles from 1 s up to this).
    pub max_backoff_s: u64,
    /// How long one POST may take.
    pub timeout_ms: u64,
    /// POSTs in flight at once per webhook (each session's events still go one at a time).
    pub concurrency: usize,
}

impl Default for WebhookDelivery {
    fn default() -> Self {
        Self {
            dir: PathBuf::from("/var/lib/avatar-edge/webhooks"),
            max_queued: 100_000,
            retry_for_s: 86_400,
            max_backoff_s: 300,
            timeout_ms: 10_000,
            concurrency: 8,
        }
    }
}

impl RelayConfig {
    fn validate_webhooks(&self) -> Result<(), ConfigError> {
        let mut urls = std::collections::HashSet::new();
        for hook in &self.webhooks {
            let scheme_ok = hook.url.starts_with("http://") || hook.url.starts_with("https://");
            if !scheme_ok || hook.url.parse::<axum::http::Uri>().is_err() {
                return invalid(
                    "webhooks.url",
                    &format!("{:?} is not an http:// or https:// URL", hook.url),
                );
            }
            if !urls.insert(hook.url.as_str()) {
                return invalid("webhooks.url", &format!("{} is listed twice", hook.url));
            }
            if hook.secret.expose().len() < 16 {
                return invalid(
                    "webhooks.secret",
                    &format!("{}: a secret of at least 16 characters (or secret_file)", hook.url),
                );
            }
            for event in hook.events.iter().flatten() {
                if !avatar_proto::webhook::EVENT_TYPES.contains(&event.as_str()) {
                    return invalid(
                        "webhooks.events",
                        &format!(
                            "{event:?} is not an event; the events are {}",
                            avatar_proto::webhook::EVENT_TYPES.join(", ")
                        ),
                    );
                }
            }
        }
        let d = &self.webhook_delivery;
        if d.max_queued == 0
            || d.retry_for_s < 3600
            || d.max_backoff_s == 0
            || !(1..=300_000).contains(&d.timeout_ms)
            || !(1..=256).contains(&d.concurrency)
        {
            return invalid(
                "webhook_delivery",
                "max_queued and max_backoff_s must be above 0, retry_for_s at least 3600, timeout_ms 1..=300000, concurrency 1..=256",
            );
        }
        Ok(())
    }
}

/// `[[api.keys]]`: one caller of the session API.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct ApiKey {
    /// Names the caller in logs and metrics.
    pub name: String,
    /// The bearer token (at least 24 characters).
    #[serde(default)]
    pub key: Secret,
    /// Read the key from this file instead (its first line).
    pub key_file: Option<PathBuf>,
}

impl ApiConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let mut names = std::collections::HashSet::new();
        for k in &self.keys {
            if k.name.is_empty() || !names.insert(k.name.as_str()) {
                return invalid(
                    "api.keys.name",
                    &format!("each key needs a name of its own ({:?})", k.name),
                );
            }
            if k.key.expose().len() < 24 {
                return invalid(
                    "api.keys.key",
                    &format!("key {}: at least 24 characters of random (or key_file)", k.name),
                );
            }
        }
        if self.requests_per_minute == 0
            || self.max_text_chars == 0
            || self.max_audio_seconds == 0
            || self.max_uploads_per_key == 0
            || !(1..=60_000).contains(&self.timeout_ms)
        {
            return invalid(
                "api",
                "requests_per_minute, max_text_chars, max_audio_seconds and max_uploads_per_key must be above 0, timeout_ms 1..=60000",
            );
        }
        Ok(())
    }
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 8080)),
            tls: false,
            web_client_dir: None,
            max_message_bytes: avatar_proto::signaling::DEFAULT_MAX_MESSAGE_LEN,
            max_frame_bytes: 2 * avatar_proto::signaling::DEFAULT_MAX_MESSAGE_LEN,
            shutdown_grace_ms: 3000,
            header_read_timeout_ms: 10_000,
            tls_handshake_timeout_ms: 10_000,
            max_connections: 25_000,
            max_connections_per_ip: 256,
            allowed_origins: Vec::new(),
            metrics_token: None,
            content_security_policy: DEFAULT_CSP.into(),
        }
    }
}

impl Default for TunnelConfig {
    fn default() -> Self {
        Self {
            listen: SocketAddr::from(([127, 0, 0, 1], 4433)),
            secret: Secret::default(),
            secret_file: None,
            idle_timeout_ms: 3000,
            keepalive_ms: 1000,
            handshake_timeout_ms: 5000,
            hello_timeout_ms: 2000,
            max_pending_handshakes: 64,
            max_pending_handshakes_per_ip: 8,
            retry_above_pending: 16,
            receive_window_bytes: 4 << 20,
            stream_receive_window_bytes: 256 << 10,
            tcp_on_https: true,
            max_capacity_per_worker: 64,
            workers: Vec::new(),
        }
    }
}

/// A configuration that cannot work, naming the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    #[error("`{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    #[error(
        "still marked REQUIRED: {}. Set each to your own value (the comment beside it says what goes there; docs/deploy.md walks through them)",
        .0.join(", ")
    )]
    Required(Vec<String>),
}

/// The first line of a secret file, without surrounding whitespace.
fn read_secret_file(path: &std::path::Path) -> Result<String, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
        path: path.into(),
        source,
    })?;
    Ok(text.lines().next().unwrap_or_default().trim().to_owned())
}

impl RelayConfig {
    /// Parse a config file's text. A file that still holds `REQUIRED` placeholders is refused
    /// with every such key named, even where a placeholder is not of its key's type.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let unset = toml::from_str::<toml::Table>(text)
            .ok()
            .and_then(|doc| serde_json::to_value(doc).ok())
            .map(|doc| avatar_proto::required::unset_keys(&doc))
            .unwrap_or_default();
        match toml::from_str::<Self>(text) {
            Ok(mut config) => {
                config.unset_required = unset;
                Ok(config)
            }
            Err(_) if !unset.is_empty() => Err(ConfigError::Required(unset)),
            Err(e) => Err(e.into()),
        }
    }

    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Defaults for `relay --dev`: plain HTTP on 127.0.0.1:8080, tunnel on 127.0.0.1:4433, a fresh
    /// self-signed certificate whose fingerprint goes to `.avatar-edge-dev/relay.fingerprint`.
    pub fn dev() -> Self {
        let mut c = Self::default();
        c.tunnel.secret = Secret::new(DEV_TUNNEL_SECRET);
        c.tls.self_signed = true;
        c.tls.fingerprint_file = Some(PathBuf::from(".avatar-edge-dev/relay.fingerprint"));
        c
    }

    /// Apply environment overrides for secrets, and read `tunnel.secret_file` where the
    /// environment does not set the secret.
    pub fn apply_env(&mut self) -> Result<(), ConfigError> {
        match std::env::var("AVATAR_EDGE_TUNNEL_SECRET") {
            Ok(s) => {
                self.unset_required.retain(|k| !k.starts_with("tunnel.secret"));
                if avatar_proto::required::is_marked(&s) {
                    self.unset_required
                        .push("AVATAR_EDGE_TUNNEL_SECRET (environment)".into());
                }
                self.tunnel.secret = Secret::new(s);
            }
            Err(_) => {
                if let Some(path) = &self.tunnel.secret_file {
                    if !self.tunnel.secret.expose().is_empty() {
                        return Err(ConfigError::Invalid {
                            key: "tunnel.secret_file",
                            message: "set either tunnel.secret or tunnel.secret_file".into(),
                        });
                    }
                    let secret = read_secret_file(path)?;
                    if avatar_proto::required::is_marked(&secret) {
                        self.unset_required
                            .push(format!("tunnel.secret_file ({})", path.display()));
                    }
                    self.tunnel.secret = Secret::new(secret);
                }
            }
        }
        if let Ok(s) = std::env::var("AVATAR_EDGE_TURN_SECRET") {
            self.turn.secret = Secret::new(s);
        }
        for k in &mut self.api.keys {
            if let Some(path) = &k.key_file {
                if !k.key.is_empty() {
                    return Err(ConfigError::Invalid {
                        key: "api.keys.key_file",
                        message: format!("key {}: set either key or key_file", k.name),
                    });
                }
                k.key = Secret::new(read_secret_file(path)?);
            }
        }
        for hook in &mut self.webhooks {
            if let Some(path) = &hook.secret_file {
                if !hook.secret.is_empty() {
                    return Err(ConfigError::Invalid {
                        key: "webhooks.secret_file",
                        message: format!("{}: set either secret or secret_file", hook.url),
                    });
                }
                hook.secret = Secret::new(read_secret_file(path)?);
            }
        }
        for worker in &mut self.tunnel.workers {
            if let Some(path) = &worker.key_file {
                if !worker.key.is_empty() {
                    return Err(ConfigError::Invalid {
                        key: "tunnel.workers.key_file",
                        message: format!("worker {}: set either key or key_file", worker.id),
                    });
                }
                worker.key = Secret::new(read_secret_file(path)?);
            }
        }
        Ok(())
    }

    /// Check what serde cannot: presence of secrets, coherent TLS settings, sane limits. Each
    /// section checks its own keys; what spans sections is checked here.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.unset_required.is_empty() {
            return Err(ConfigError::Required(self.unset_required.clone()));
        }
        // With keys per worker, the shared secret is optional (empty: only listed workers).
        let shared = self.tunnel.secret.expose();
        let only_listed = shared.is_empty() && !self.tunnel.workers.is_empty();
        if shared.len() < 16 && !only_listed {
            return invalid(
                "tunnel.secret",
                "set a secret of at least 16 characters (or secret_file, or AVATAR_EDGE_TUNNEL_SECRET), or give every worker a key of its own in [[tunnel.workers]]",
            );
        }
        self.tls.validate(self.http.tls)?;
        self.http.validate()?;
        self.tunnel.validate()?;
        self.limits.validate()?;
        self.turn.validate()?;
        self.policies.validate()?;
        self.api.validate()?;
        self.validate_webhooks()?;
        for (key, ms) in [
            ("http.header_read_timeout_ms", self.http.header_read_timeout_ms),
            ("http.tls_handshake_timeout_ms", self.http.tls_handshake_timeout_ms),
            ("tunnel.handshake_timeout_ms", self.tunnel.handshake_timeout_ms),
            ("limits.write_timeout_ms", self.limits.write_timeout_ms),
        ] {
            if !(1..=3_600_000).contains(&ms) {
                return invalid(key, "must be between 1 ms and one hour");
            }
        }
        Ok(())
    }
}

/// A `ConfigError::Invalid` for `key`.
fn invalid(key: &'static str, message: &str) -> Result<(), ConfigError> {
    Err(ConfigError::Invalid {
        key,
        message: message.into(),
    })
}

/// One day in milliseconds, for the bounds of timeouts.
const DAY_MS: u64 = 24 * 3600 * 1000;

impl TlsConfig {
    /// `https`: whether the HTTPS listener is on (ACME answers its challenge there).
    fn validate(&self, https: bool) -> Result<(), ConfigError> {
        if let Some(acme) = &self.acme {
            if self.cert.is_some() || self.key.is_some() || self.self_signed {
                return invalid("tls.acme", "ACME replaces cert/key/self_signed: set only one of them");
            }
            if acme.domains.is_empty() {
                return invalid("tls.acme.domains", "name at least one domain");
            }
            if self.fingerprint_file.is_some() {
                return invalid(
                    "tls.fingerprint_file",
                    "an ACME certificate changes at every renewal: workers must trust the CA (ca_file), not a pin",
                );
            }
            if !https {
                return invalid(
                    "http.tls",
                    "ACME needs the HTTPS listener (its TLS-ALPN-01 challenge is answered there)",
                );
            }
        } else {
            match (&self.cert, &self.key, self.self_signed) {
                (Some(_), Some(_), false) | (None, None, true) => {}
                (Some(_), None, _) => return invalid("tls.key", "`tls.cert` is set but `tls.key` is not"),
                (None, Some(_), _) => return invalid("tls.cert", "`tls.key` is set but `tls.cert` is not"),
                (Some(_), Some(_), true) => {
                    return invalid("tls.self_signed", "set either cert/key or self_signed, not both")
                }
                (None, None, false) => {
                    return invalid(
                        "tls.cert",
                        "the QUIC tunnel needs a certificate: set cert and key, [tls.acme], or self_signed = true",
                    )
                }
            }
        }
        Ok(())
    }
}

impl HttpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_message_bytes == 0 || self.max_message_bytes > self.max_frame_bytes {
            return invalid("http.max_message_bytes", "must be between 1 and http.max_frame_bytes");
        }
        if self.max_connections == 0 {
            return invalid("http.max_connections", "must be above 0");
        }
        for origin in &self.allowed_origins {
            let host = origin
                .strip_prefix("https://")
                .or_else(|| origin.strip_prefix("http://"));
            let ok = origin == "*"
                || host.is_some_and(|h| !h.is_empty() && !h.contains(|c: char| "/?#".contains(c) || c.is_whitespace()));
            if !ok {
                return invalid(
                    "http.allowed_origins",
                    "origins look like https://tutor.example.com (scheme and host, optional port, no path), or *",
                );
            }
        }
        if axum::http::HeaderValue::from_str(&self.content_security_policy).is_err() {
            return invalid(
                "http.content_security_policy",
                "must be a valid header value (printable ASCII, no line breaks)",
            );
        }
        if self.metrics_token.as_ref().is_some_and(|t| t.expose().len() < 16) {
            return invalid("http.metrics_token", "at least 16 characters");
        }
        Ok(())
    }
}

/// What a worker must prove to register under an id ([`TunnelConfig::credential`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Credential<'a> {
    /// The key its proof is made with.
    pub key: &'a str,
    /// The id has a key of its own (`[[tunnel.workers]]`), not the fleet's shared secret.
    pub own: bool,
    /// The most sessions it is routed at once, whatever it declares.
    pub max_capacity: u32,
}

impl TunnelConfig {
    /// The credential for `worker_id`: its own entry in `[[tunnel.workers]]`, else the shared
    /// secret when one is set, else none (the id cannot register).
    pub fn credential(&self, worker_id: &str) -> Option<Credential<'_>> {
        match self.workers.iter().find(|w| w.id == worker_id) {
            Some(w) => Some(Credential {
                key: w.key.expose(),
                own: true,
                max_capacity: w.max_capacity.unwrap_or(self.max_capacity_per_worker),
            }),
            None => (!self.secret.is_empty()).then(|| Credential {
                key: self.secret.expose(),
                own: false,
                max_capacity: self.max_capacity_per_worker,
            }),
        }
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.max_pending_handshakes == 0 {
            return invalid("tunnel.max_pending_handshakes", "must be above 0");
        }
        if !(1..=self.handshake_timeout_ms).contains(&self.hello_timeout_ms) {
            return invalid(
                "tunnel.hello_timeout_ms",
                "must be above 0 and at most tunnel.handshake_timeout_ms",
            );
        }
        if self.max_pending_handshakes_per_ip == 0 {
            return invalid(
                "tunnel.max_pending_handshakes_per_ip",
                "must be above 0 (at most tunnel.max_pending_handshakes)",
            );
        }
        if self.max_capacity_per_worker == 0 {
            return invalid("tunnel.max_capacity_per_worker", "must be above 0");
        }
        let mut ids = std::collections::HashSet::new();
        for w in &self.workers {
            if !avatar_proto::tunnel::valid_worker_id(&w.id) {
                return Err(ConfigError::Invalid {
                    key: "tunnel.workers.id",
                    message: format!("{:?}: 1-64 characters of [A-Za-z0-9-_.:]", w.id),
                });
            }
            if !ids.insert(w.id.as_str()) {
                return Err(ConfigError::Invalid {
                    key: "tunnel.workers.id",
                    message: format!("{} is listed twice", w.id),
                });
            }
            if w.key.expose().len() < 16 {
                return Err(ConfigError::Invalid {
                    key: "tunnel.workers.key",
                    message: format!("worker {}: a key of at least 16 characters (or key_file)", w.id),
                });
            }
            if w.max_capacity == Some(0) {
                return Err(ConfigError::Invalid {
                    key: "tunnel.workers.max_capacity",
                    message: format!("worker {}: must be above 0", w.id),
                });
            }
        }
        if self.stream_receive_window_bytes < 16 << 10 || self.receive_window_bytes < self.stream_receive_window_bytes {
            return invalid(
                "tunnel.stream_receive_window_bytes",
                "at least 16 KiB, and at most tunnel.receive_window_bytes",
            );
        }
        if self.keepalive_ms == 0 || self.keepalive_ms >= self.idle_timeout_ms {
            return invalid(
                "tunnel.keepalive_ms",
                "must be above 0 and below tunnel.idle_timeout_ms",
            );
        }
        Ok(())
    }
}

impl LimitsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !(1..=128).contains(&self.ipv6_prefix_len) {
            return invalid("limits.ipv6_prefix_len", "must be between 1 and 128");
        }
        if !(1..=DAY_MS).contains(&self.idle_timeout_ms) {
            return invalid("limits.idle_timeout_ms", "must be between 1 ms and one day");
        }
        if !(1..=30 * DAY_MS).contains(&self.max_session_ms) {
            return invalid("limits.max_session_ms", "must be between 1 ms and 30 days");
        }
        Ok(())
    }
}

impl TurnConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let t = self;
        match t.mode {
            TurnMode::Off => {}
            TurnMode::External => {
                if t.secret.expose().len() < 16 {
                    return invalid(
                        "turn.secret",
                        "external TURN needs coturn's static-auth-secret (at least 16 characters, or AVATAR_EDGE_TURN_SECRET)",
                    );
                }
                if t.urls.is_empty() {
                    return invalid(
                        "turn.urls",
                        "name the TURN URLs to hand out (turn:HOST:PORT?transport=udp, ...)",
                    );
                }
            }
            TurnMode::Embedded => {
                let e = &t.embedded;
                if !t.secret.expose().is_empty() && t.secret.expose().len() < 16 {
                    return invalid(
                        "turn.secret",
                        "at least 16 characters (or leave it unset for a random one)",
                    );
                }
                if e.listen_udp.is_none() && e.listen_tcp.is_none() && e.listen_tls.is_none() {
                    return invalid(
                        "turn.embedded.listen_udp",
                        "set at least one of listen_udp, listen_tcp, listen_tls",
                    );
                }
                if e.announced_ip().is_none() {
                    return invalid(
                        "turn.embedded.public_ip",
                        "set the address clients reach the relay at (relay_ip is 0.0.0.0)",
                    );
                }
                if e.relay_port_min < 1024 || e.relay_port_min > e.relay_port_max {
                    return invalid(
                        "turn.embedded.relay_port_min",
                        "need 1024 <= relay_port_min <= relay_port_max",
                    );
                }
                for (key, value) in [
                    (
                        "turn.embedded.max_allocations_per_user",
                        e.max_allocations_per_user as u64,
                    ),
                    ("turn.embedded.max_allocations_per_ip", e.max_allocations_per_ip as u64),
                    (
                        "turn.embedded.max_allocations_per_worker",
                        e.max_allocations_per_worker as u64,
                    ),
                    ("turn.embedded.max_allocations", e.max_allocations as u64),
                    ("turn.embedded.bandwidth_kbps", e.bandwidth_kbps as u64),
                    (
                        "turn.embedded.unauthorized_per_minute",
                        e.unauthorized_per_minute as u64,
                    ),
                    ("turn.embedded.max_stream_connections", e.max_stream_connections as u64),
                    (
                        "turn.embedded.max_stream_connections_per_ip",
                        e.max_stream_connections_per_ip as u64,
                    ),
                    (
                        "turn.embedded.stream_first_message_within_ms",
                        e.stream_first_message_within_ms,
                    ),
                ] {
                    if value == 0 {
                        return invalid(key, "must be above 0");
                    }
                }
                if !(60..=86_400).contains(&e.max_lifetime_s) || e.max_allocation_age_s < e.max_lifetime_s {
                    return invalid(
                        "turn.embedded.max_lifetime_s",
                        "between 60 s and one day, and at most max_allocation_age_s",
                    );
                }
                if e.realm.is_empty() || e.realm.len() > 127 {
                    return invalid("turn.embedded.realm", "1 to 127 characters");
                }
            }
        }
        for url in t.urls.iter().chain(&t.stun_urls) {
            let scheme_ok = ["turn:", "turns:", "stun:", "stuns:"]
                .iter()
                .any(|s| url.starts_with(s));
            if !scheme_ok || url.chars().any(char::is_whitespace) {
                return invalid(
                    "turn.urls",
                    "URLs look like turn:HOST:PORT, turns:HOST:PORT or stun:HOST:PORT",
                );
            }
        }
        if !(30..=86_400).contains(&t.ttl_s) {
            return invalid("turn.ttl_s", "must be between 30 s and one day");
        }
        Ok(())
    }
}

impl PoliciesConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        let p = self;
        if !(1..=10_000).contains(&p.deadline_ms) {
            return invalid("policies.deadline_ms", "must be between 1 and 10000");
        }
        if !(1 << 16..=4 << 30).contains(&p.max_memory_bytes) {
            return invalid("policies.max_memory_bytes", "must be between 64 KiB and 4 GiB");
        }
        if !(1..=4096).contains(&p.max_concurrent) {
            return invalid("policies.max_concurrent", "must be between 1 and 4096");
        }
        if p.max_output_bytes == 0 || p.max_module_bytes == 0 {
            return invalid("policies.max_output_bytes", "size caps must be above 0");
        }
        for (key, module) in [("policies.auth", &p.auth), ("policies.router", &p.router)] {
            let Some(m) = module else { continue };
            if m.config.is_some() && m.config_file.is_some() {
                return invalid(key, "set `config` or `config_file`, not both");
            }
            if key == "policies.auth" && m.fallback.is_some() {
                return invalid(
                    "policies.auth.fallback",
                    "auth always fails closed; `fallback` is for the router",
                );
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_keys_are_rejected_with_their_name() {
        let err = RelayConfig::from_toml("[http]\nlisten = \"127.0.0.1:1\"\nlsiten = 2\n").expect_err("typo");
        assert!(err.to_string().contains("lsiten"), "{err}");
    }

    #[test]
    fn turn_settings_are_checked() {
        let check = |turn: &str| {
            let mut c = RelayConfig::dev();
            // A bad mode is refused when parsed, the rest when validated.
            c.turn = RelayConfig::from_toml(turn).map_err(|e| e.to_string())?.turn;
            c.validate().map_err(|e| e.to_string())
        };
        let ok = "[turn]\nmode = \"external\"\nsecret = \"0123456789abcdef\"\nurls = [\"turn:203.0.113.1:3478\"]\n";
        check(ok).expect("valid external");
        let cases = [
            ("[turn]\nmode = \"external\"\nurls = [\"turn:h:1\"]\n", "turn.secret"),
            (
                "[turn]\nmode = \"external\"\nsecret = \"0123456789abcdef\"\n",
                "turn.urls",
            ),
            ("[turn]\nmode = \"embedded\"\n", "turn.embedded.public_ip"),
            (
                "[turn]\nmode = \"embedded\"\n[turn.embedded]\npublic_ip = \"203.0.113.1\"\nrelay_port_min = 50000\nrelay_port_max = 40000\n",
                "turn.embedded.relay_port_min",
            ),
            (
                "[turn]\nmode = \"embedded\"\nsecret = \"short\"\n[turn.embedded]\npublic_ip = \"203.0.113.1\"\n",
                "turn.secret",
            ),
            (
                "[turn]\nmode = \"embedded\"\n[turn.embedded]\npublic_ip = \"203.0.113.1\"\nbandwidth_kbps = 0\n",
                "turn.embedded.bandwidth_kbps",
            ),
            (
                "[turn]\nmode = \"embedded\"\n[turn.embedded]\npublic_ip = \"203.0.113.1\"\nmax_allocations = 0\n",
                "`turn.embedded.max_allocations`",
            ),
            (
                "[turn]\nmode = \"embedded\"\n[turn.embedded]\npublic_ip = \"203.0.113.1\"\nunauthorized_per_minute = 0\n",
                "turn.embedded.unauthorized_per_minute",
            ),
            ("[turn]\nmode = \"maybe\"\n", "unknown variant `maybe`, expected one of `off`, `external`, `embedded`"),
            ("[turn]\nstun_urls = [\"http://x\"]\n", "turn.urls"),
            ("[turn]\nttl_s = 5\n", "turn.ttl_s"),
        ];
        for (toml, want) in cases {
            let err = check(toml).expect_err(toml);
            assert!(err.contains(want), "{toml}: {err}");
        }
        let embedded = "[turn]\nmode = \"embedded\"\n[turn.embedded]\npublic_ip = \"203.0.113.1\"\n";
        check(embedded).expect("valid embedded, random secret");
        let t = RelayConfig::from_toml(embedded).expect("parses").turn;
        assert_eq!(
            t.turn_urls(),
            [
                "turn:203.0.113.1:3478?transport=udp",
                "turn:203.0.113.1:3478?transport=tcp"
            ]
        );
        assert_eq!(t.stun_urls(), ["stun:203.0.113.1:3478"]);
        let c = RelayConfig::from_toml(ok).expect("parses");
        assert!(
            !format!("{c:?}").contains("0123456789abcdef"),
            "the TURN secret is never printed"
        );
    }

    #[test]
    fn dev_config_is_valid_and_secret_is_hidden() {
        let c = RelayConfig::dev();
        c.validate().expect("valid");
        assert!(!format!("{c:?}").contains(DEV_TUNNEL_SECRET));
    }

    #[test]
    fn validation_names_the_key() {
        let mut c = RelayConfig::dev();
        c.tunnel.secret = Secret::new("short");
        assert!(c
            .validate()
            .expect_err("short")
            .to_string()
            .starts_with("`tunnel.secret`"));
        let mut c = RelayConfig::dev();
        c.limits.max_session_ms = u64::MAX;
        assert!(c
            .validate()
            .expect_err("huge")
            .to_string()
            .starts_with("`limits.max_session_ms`"));
        let mut c = RelayConfig::dev();
        c.tls.self_signed = false;
        assert!(c.validate().expect_err("no cert").to_string().starts_with("`tls.cert`"));
    }

    #[test]
    fn acme_replaces_certificate_files_and_pins() {
        let mut c = RelayConfig::from_toml(
            "[http]\ntls = true\n[tunnel]\nsecret = \"0123456789abcdef\"\n[tls.acme]\ndomains = [\"relay.example.com\"]\ncache_dir = \"/var/lib/avatar-edge/acme\"\n",
        )
        .expect("parses");
        c.validate().expect("valid");
        let acme = c.tls.acme.clone().expect("acme");
        assert_eq!(acme.directory, AcmeConfig::LETS_ENCRYPT);
        c.tls.self_signed = true;
        assert!(c.validate().expect_err("both").to_string().starts_with("`tls.acme`"));
        c.tls.self_signed = false;
        c.tls.fingerprint_file = Some("pin".into());
        assert!(c
            .validate()
            .expect_err("pin")
            .to_string()
            .starts_with("`tls.fingerprint_file`"));
        c.tls.fingerprint_file = None;
        c.http.tls = false;
        assert!(c
            .validate()
            .expect_err("no https")
            .to_string()
            .starts_with("`http.tls`"));
        c.http.tls = true;
        c.tls.acme = Some(AcmeConfig {
            domains: vec![],
            ..acme
        });
        assert!(c
            .validate()
            .expect_err("no domain")
            .to_string()
            .starts_with("`tls.acme.domains`"));
    }

    #[test]
    fn policy_modules_take_a_table_or_a_string_and_hide_it() {
        let c = RelayConfig::from_toml(
            r#"
            [policies.auth]
            path = "hmac-token.wasm"
            config = { secret = "0123456789abcdef-topsecret", max_lifetime_s = 60 }
            [policies.router]
            path = "router.wasm"
            config = "raw text"
            fallback = "reject"
            "#,
        )
        .expect("parses");
        let auth = c.policies.auth.as_ref().expect("auth");
        let json: serde_json::Value =
            serde_json::from_str(&auth.config.as_ref().expect("config").to_module_string()).expect("json");
        assert_eq!(json["secret"], "0123456789abcdef-topsecret");
        assert_eq!(json["max_lifetime_s"], 60);
        let router = c.policies.router.as_ref().expect("router");
        assert_eq!(router.config.as_ref().expect("config").to_module_string(), "raw text");
        assert_eq!(router.fallback, Some(RouterFallback::Reject));
        assert!(!format!("{c:?}").contains("topsecret"));
        let mut bad = RelayConfig::dev();
        bad.policies.auth = c.policies.auth.clone();
        bad.policies.auth.as_mut().expect("auth").fallback = Some(RouterFallback::Builtin);
        assert!(bad
            .validate()
            .expect_err("auth fallback")
            .to_string()
            .starts_with("`policies.auth.fallback`"));
    }
}
