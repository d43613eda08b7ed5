//! Operator policies: WebAssembly modules that decide who connects and which worker serves them.
//!
//! Operators write auth and routing rules against the WIT contract in `wasm-policies/wit`
//! (see `docs/policies.md`) and name the compiled components in `[policies]`. To the relay
//! these modules are untrusted code, so:
//!
//! * modules are compiled and checked when loaded, never on the request path; a module that
//!   imports anything but the contract's `host` interface (WASI, an unknown function) is refused
//!   at load, naming the import;
//! * each decision runs in a fresh instance with a deadline, a memory cap and an output cap
//!   ([`runtime`]), on the blocking pool so a slow module never stalls the async workers;
//! * a failed decision **fails closed** for auth (the browser gets `unauthorized`, no worker is
//!   touched) and takes the configured **fallback** for routing; the relay counts it and serves on;
//! * modules are **hot-reloaded** when their file (or config file) changes, or on SIGHUP: the new
//!   version is loaded and checked first, then swapped in atomically. Decisions already running
//!   finish on the old one; a version that fails to load leaves the old one in place.
//!
//! Metrics: `relay_policy_decisions_total{hook,outcome}` (outcome: allow, deny, failed),
//! `relay_policy_failures_total{hook,kind}` (kind: deadline, memory, trap, output, invalid, busy),
//! `relay_policy_decision_seconds{hook}`, `relay_policy_reloads_total{module,result}`.

pub mod runtime;

use crate::config::{PoliciesConfig, PolicyModuleConfig, RouterFallback};
use arc_swap::ArcSwap;
pub use runtime::{CallError, Limits, LoadError, CONTRACT};
use runtime::{Prepared, Runtime, World};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

/// Host bindings generated from the contract. Both worlds share one `types` and one `host`.
pub mod bindings {
    pub mod auth {
        wasmtime::component::bindgen!({
            path: "../wasm-policies/wit",
            world: "auth",
        });
    }
    pub mod router {
        wasmtime::component::bindgen!({
            path: "../wasm-policies/wit",
            world: "router",
            with: {
                "avatar-edge:policy/types": super::auth::avatar_edge::policy::types,
                "avatar-edge:policy/host": super::auth::avatar_edge::policy::host,
            },
        });
    }
    pub use auth::avatar_edge::policy::{host, types};
    pub use host::Level;
}

pub use bindings::types::{
    ConnectDecision, ConnectRequest, Header, MessageKind, MessageRequest, Principal, RouteDecision, RouteRequest,
    Verdict, Worker,
};

/// Headers a connect policy may see; everything else stays with the relay.
pub const FORWARDED_HEADERS: &[&str] = &[
    "authorization",
    "cookie",
    "origin",
    "user-agent",
    "x-forwarded-for",
    "sec-websocket-protocol",
];

/// Milliseconds since the Unix epoch (0 if the clock is before 1970).
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// Where a module comes from, as configured.
#[derive(Debug)]
struct Source {
    world: World,
    path: PathBuf,
    inline_config: Option<String>,
    config_file: Option<PathBuf>,
}

/// File sizes and modification times: a change means "look again".
#[derive(Debug, Clone, PartialEq)]
struct Stamp(Vec<Option<(SystemTime, u64)>>);

impl Source {
    fn from_config(world: World, m: &PolicyModuleConfig) -> Self {
        Self {
            world,
            path: m.path.clone(),
            inline_config: m.config.as_ref().map(|c| c.to_module_string()),
            config_file: m.config_file.clone(),
        }
    }

    fn stamp(&self) -> Stamp {
        let of = |p: &Path| {
            std::fs::metadata(p)
                .ok()
                .map(|m| (m.modified().unwrap_or(SystemTime::UNIX_EPOCH), m.len()))
        };
        Stamp(
            std::iter::once(of(&self.path))
                .chain(self.config_file.as_deref().map(of))
                .collect(),
        )
    }

    /// The module's bytes and config string.
    fn read(&self, max_module_bytes: u64) -> Result<(Vec<u8>, String), LoadError> {
        let read_err = |path: &Path| {
            let path = path.to_path_buf();
            move |source| LoadError::Read { path, source }
        };
        let size = std::fs::metadata(&self.path).map_err(read_err(&self.path))?.len();
        if size > max_module_bytes {
            return Err(LoadError::TooLarge {
                path: self.path.clone(),
                size,
                max: max_module_bytes,
            });
        }
        let bytes = std::fs::read(&self.path).map_err(read_err(&self.path))?;
        let config = match (&self.inline_config, &self.config_file) {
            (_, Some(file)) => std::fs::read_to_string(file).map_err(read_err(file))?,
            (Some(inline), None) => inline.clone(),
            (None, None) => String::new(),
        };
        Ok((bytes, config))
    }
}

/// A loaded version of a module.
struct Loaded {
    name: Arc<str>,
    config: Arc<str>,
    prepared: Prepared,
    /// SHA-256 of module bytes and config: an unchanged module is not recompiled.
    digest: String,
}

/// One configured module and its current version.
struct Slot {
    source: Source,
    current: ArcSwap<Loaded>,
    /// What the files looked like at the last look (loaded or not), so a broken file is
    /// reported once, not every poll.
    seen: Mutex<Stamp>,
}

/// The relay's policies: the sandbox and the configured modules.
pub struct Policies {
    runtime: Arc<Runtime>,
    auth: Option<Slot>,
    router: Option<Slot>,
    fallback: RouterFallback,
    permits: Arc<Semaphore>,
    reload_poll: Duration,
}

/// How a module load went, for logs and metrics.
#[derive(Debug)]
pub enum Reload {
    Unchanged,
    Reloaded { digest: String },
    Failed(LoadError),
}

impl Policies {
    /// Load every configured module. `None` when no module is configured. Blocking: compiles.
    pub fn load(config: &PoliciesConfig) -> Result<Option<Arc<Self>>, LoadError> {
        if config.auth.is_none() && config.router.is_none() {
            return Ok(None);
        }
        let limits = Limits {
            deadline: Duration::from_millis(config.deadline_ms),
            max_memory_bytes: config.max_memory_bytes,
            max_module_bytes: config.max_module_bytes,
            max_output_bytes: config.max_output_bytes,
            max_concurrent: config.max_concurrent,
        };
        let runtime = Arc::new(Runtime::new(limits, config.cache_dir.as_deref())?);
        let slot = |world, m: &Option<PolicyModuleConfig>| -> Result<Option<Slot>, LoadError> {
            let Some(m) = m else { return Ok(None) };
            let source = Source::from_config(world, m);
            let stamp = source.stamp();
            let loaded = load_version(&runtime, &source)?;
            info!(module = %loaded.name, digest = %loaded.digest, "policy loaded");
            Ok(Some(Slot {
                source,
                current: ArcSwap::from_pointee(loaded),
                seen: Mutex::new(stamp),
            }))
        };
        let auth = slot(World::Auth, &config.auth)?;
        let router = slot(World::Router, &config.router)?;
        Ok(Some(Arc::new(Self {
            permits: Arc::new(Semaphore::new(config.max_concurrent as usize)),
            runtime,
            auth,
            router,
            fallback: config.router.as_ref().and_then(|r| r.fallback).unwrap_or_default(),
            reload_poll: Duration::from_millis(config.reload_poll_ms),
        })))
    }

    pub fn has_auth(&self) -> bool {
        self.auth.is_some()
    }

    pub fn has_router(&self) -> bool {
        self.router.is_some()
    }

    /// What to do when the router module fails.
    pub fn router_fallback(&self) -> RouterFallback {
        self.fallback
    }

    /// Run `call` on the blocking pool with one of the decision slots, recording metrics.
    async fn decide<T, F>(&self, hook: &'static str, outcome: fn(&T) -> &'static str, call: F) -> Result<T, CallError>
    where
        T: Send + 'static,
        F: FnOnce(&Runtime) -> Result<T, CallError> + Send + 'static,
    {
        let started = Instant::now();
        let result = match tokio::time::timeout(Duration::from_secs(1), Arc::clone(&self.permits).acquire_owned()).await
        {
            Ok(Ok(permit)) => {
                let runtime = Arc::clone(&self.runtime);
                tokio::task::spawn_blocking(move || {
                    let _permit = permit;
                    call(&runtime)
                })
                .await
                .unwrap_or_else(|e| Err(CallError::Trap(format!("decision task failed: {e}"))))
            }
            _ => Err(CallError::Busy(self.runtime.limits().max_concurrent)),
        };
        metrics::histogram!("relay_policy_decision_seconds", "hook" => hook).record(started.elapsed().as_secs_f64());
        match &result {
            Ok(v) => {
                metrics::counter!("relay_policy_decisions_total", "hook" => hook, "outcome" => outcome(v)).increment(1)
            }
            Err(e) => {
                metrics::counter!("relay_policy_decisions_total", "hook" => hook, "outcome" => "failed").increment(1);
                metrics::counter!("relay_policy_failures_total", "hook" => hook, "kind" => e.kind()).increment(1);
            }
        }
        result
    }

    /// The auth module's verdict on a connect. `None` when no auth module is configured.
    pub async fn authorize_connect(&self, request: ConnectRequest) -> Option<Result<ConnectDecision, CallError>> {
        let loaded = self.auth.as_ref()?.current.load_full();
        let outcome = |d: &ConnectDecision| match d {
            ConnectDecision::Allow(_) => "allow",
            ConnectDecision::Deny(_) => "deny",
        };
        Some(
            self.decide("connect", outcome, move |rt| match &loaded.prepared {
                Prepared::Auth(pre) => rt.authorize_connect(pre, &loaded.name, &loaded.config, &request),
                Prepared::Router(_) => Err(CallError::Invalid("not an auth module".into())),
            })
            .await,
        )
    }

    /// The auth module's verdict on a message. `None` when no auth module is configured.
    pub async fn authorize_message(&self, request: MessageRequest) -> Option<Result<Verdict, CallError>> {
        let loaded = self.auth.as_ref()?.current.load_full();
        let outcome = |v: &Verdict| match v {
            Verdict::Allow => "allow",
            Verdict::Deny(_) => "deny",
        };
        Some(
            self.decide("message", outcome, move |rt| match &loaded.prepared {
                Prepared::Auth(pre) => rt.authorize_message(pre, &loaded.name, &loaded.config, &request),
                Prepared::Router(_) => Err(CallError::Invalid("not an auth module".into())),
            })
            .await,
        )
    }

    /// The router module's choice. `None` when no router module is configured.
    pub async fn route(&self, request: RouteRequest) -> Option<Result<RouteDecision, CallError>> {
        let loaded = self.router.as_ref()?.current.load_full();
        let outcome = |d: &RouteDecision| match d {
            RouteDecision::Worker(_) => "allow",
            RouteDecision::Reject(_) => "deny",
        };
        Some(
            self.decide("route", outcome, move |rt| match &loaded.prepared {
                Prepared::Router(pre) => rt.route(pre, &loaded.name, &loaded.config, &request),
                Prepared::Auth(_) => Err(CallError::Invalid("not a router module".into())),
            })
            .await,
        )
    }

    /// [`Policies::authorize_connect`] on the calling thread, without the decision pool: for
    /// benchmarks and tools. Blocks for up to the deadline.
    pub fn authorize_connect_blocking(&self, request: &ConnectRequest) -> Option<Result<ConnectDecision, CallError>> {
        let loaded = self.auth.as_ref()?.current.load();
        Some(match &loaded.prepared {
            Prepared::Auth(pre) => self
                .runtime
                .authorize_connect(pre, &loaded.name, &loaded.config, request),
            Prepared::Router(_) => Err(CallError::Invalid("not an auth module".into())),
        })
    }

    /// [`Policies::route`] on the calling thread, without the decision pool (see
    /// [`Policies::authorize_connect_blocking`]).
    pub fn route_blocking(&self, request: &RouteRequest) -> Option<Result<RouteDecision, CallError>> {
        let loaded = self.router.as_ref()?.current.load();
        Some(match &loaded.prepared {
            Prepared::Router(pre) => self.runtime.route(pre, &loaded.name, &loaded.config, request),
            Prepared::Auth(_) => Err(CallError::Invalid("not a router module".into())),
        })
    }

    /// Look at every module's files and reload those that changed (all of them when `force`).
    /// Blocking: compiles. Returns what happened to each module.
    pub fn reload(&self, force: bool) -> Vec<(String, Reload)> {
        let mut report = Vec::new();
        for slot in self.auth.iter().chain(self.router.iter()) {
            let stamp = slot.source.stamp();
            {
                let mut seen = slot.seen.lock().unwrap_or_else(|e| e.into_inner());
                if !force && *seen == stamp {
                    continue;
                }
                *seen = stamp;
            }
            let name = module_name(&slot.source);
            let current = slot.current.load().digest.clone();
            let loaded = read_version(&self.runtime, &slot.source).and_then(|(bytes, config, digest)| {
                if digest == current {
                    return Ok(None);
                }
                prepare(&self.runtime, &slot.source, &bytes, config, digest).map(Some)
            });
            let outcome = match loaded {
                Ok(None) => Reload::Unchanged,
                Ok(Some(loaded)) => {
                    let digest = loaded.digest.clone();
                    slot.current.store(Arc::new(loaded));
                    info!(module = %name, %digest, "policy reloaded");
                    metrics::counter!("relay_policy_reloads_total", "module" => name.clone(), "result" => "reloaded")
                        .increment(1);
                    Reload::Reloaded { digest }
                }
                Err(e) => {
                    error!(module = %name, error = %e, "policy reload failed; the previous version stays in place");
                    metrics::counter!("relay_policy_reloads_total", "module" => name.clone(), "result" => "failed")
                        .increment(1);
                    Reload::Failed(e)
                }
            };
            report.push((name, outcome));
        }
        report
    }

    /// Reload on file changes (every `reload_poll_ms`) and on SIGHUP, until shutdown.
    pub async fn watch(self: Arc<Self>, shutdown: CancellationToken) {
        #[cfg(unix)]
        let mut hangup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
        let poll = (!self.reload_poll.is_zero()).then_some(self.reload_poll);
        loop {
            let force = tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = async {
                    match poll {
                        Some(p) => tokio::time::sleep(p).await,
                        None => std::future::pending().await,
                    }
                } => false,
                _ = async {
                    #[cfg(unix)]
                    if let Some(h) = hangup.as_mut() {
                        h.recv().await;
                        return;
                    }
                    std::future::pending::<()>().await
                } => {
                    info!("SIGHUP: reloading policies");
                    true
                }
            };
            let this = Arc::clone(&self);
            let _ = tokio::task::spawn_blocking(move || this.reload(force)).await;
        }
    }
}

fn module_name(source: &Source) -> String {
    let file = source.path.file_name().map(|f| f.to_string_lossy()).unwrap_or_default();
    format!("{}:{file}", source.world.name())
}

/// The module's bytes, its config and their digest.
fn read_version(runtime: &Runtime, source: &Source) -> Result<(Vec<u8>, String, String), LoadError> {
    let (bytes, config) = source.read(runtime.limits().max_module_bytes)?;
    let mut h = Sha256::new();
    h.update(&bytes);
    h.update([0]);
    h.update(config.as_bytes());
    let digest = hex::encode(&h.finalize()[..8]);
    Ok((bytes, config, digest))
}

fn load_version(runtime: &Runtime, source: &Source) -> Result<Loaded, LoadError> {
    let (bytes, config, digest) = read_version(runtime, source)?;
    prepare(runtime, source, &bytes, config, digest)
}

fn prepare(
    runtime: &Runtime,
    source: &Source,
    bytes: &[u8],
    config: String,
    digest: String,
) -> Result<Loaded, LoadError> {
    let prepared = runtime.load(&source.path, bytes, source.world)?;
    Ok(Loaded {
        name: module_name(source).into(),
        config: config.into(),
        prepared,
        digest,
    })
}
