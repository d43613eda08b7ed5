//! The sandbox: one wasmtime [`Engine`], loading and checking modules, running one decision.
//!
//! Every decision gets a fresh [`Store`] and a fresh instance (from an [`InstancePre`], so
//! instantiation is a few microseconds from a pooled slot), under three limits:
//!
//! * **time**: epoch interruption. A ticker thread advances the engine's epoch every millisecond;
//!   at each tick a running guest is interrupted and the wall clock since the decision started
//!   decides whether it may go on, so a module is stopped within the deadline plus one tick;
//! * **memory**: a [`ResourceLimiter`] refuses linear-memory growth past the cap, and the refusal
//!   traps (rather than letting the guest see a failed `memory.grow` and carry on);
//! * **output**: the decision's strings are measured before the relay uses them.
//!
//! Anything that goes wrong inside the guest (trap, deadline, cap, bad answer) is a
//! [`CallError`], never a panic; after a trap the instance is dropped with its store.

use super::bindings::{auth::AuthPre, router::RouterPre, types, Level};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use wasmtime::component::{Component, Linker};
use wasmtime::{Engine, InstanceAllocationStrategy, PoolingAllocationConfig, ResourceLimiter, Store};

/// The contract version this relay speaks (the `package` line of `wasm-policies/wit/policy.wit`).
pub const CONTRACT: &str = "avatar-edge:policy@0.1.0";

/// Interfaces a module may import: the contract's own, nothing else.
const ALLOWED_IMPORTS: &[&str] = &["avatar-edge:policy/host@0.1.0", "avatar-edge:policy/types@0.1.0"];

/// How many log lines one decision may write, and how long each may be.
const LOGS_PER_DECISION: u32 = 8;
const LOG_LINE_MAX: usize = 1024;

/// Limits applied to every module and decision.
#[derive(Debug, Clone)]
pub struct Limits {
    pub deadline: Duration,
    pub max_memory_bytes: usize,
    pub max_module_bytes: u64,
    pub max_output_bytes: usize,
    pub max_concurrent: u32,
}

/// A module that cannot be used. The old version (if any) stays in place.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path} is {size} bytes, above policies.max_module_bytes ({max})")]
    TooLarge { path: PathBuf, size: u64, max: u64 },
    #[error("{path} is not a valid WebAssembly component: {message}")]
    Compile { path: PathBuf, message: String },
    #[error("{path} imports `{import}`, which the relay does not provide: {hint}")]
    ForbiddenImport {
        path: PathBuf,
        import: String,
        hint: &'static str,
    },
    #[error("{path} does not implement the `{world}` world: {message}")]
    WrongWorld {
        path: PathBuf,
        world: &'static str,
        message: String,
    },
    #[error("{path} cannot be instantiated within the limits: {message}")]
    Trial { path: PathBuf, message: String },
    #[error("setting up the policy engine: {0}")]
    Engine(String),
}

/// A decision that did not produce a usable answer.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    #[error("deadline of {0:?} exceeded")]
    Deadline(Duration),
    #[error("memory cap of {0} bytes exceeded")]
    Memory(usize),
    #[error("trapped: {0}")]
    Trap(String),
    #[error("answer of {size} bytes exceeds the cap of {max} bytes")]
    Output { size: usize, max: usize },
    #[error("invalid answer: {0}")]
    Invalid(String),
    #[error("all {0} decision slots are busy")]
    Busy(u32),
}

impl CallError {
    /// A short label for metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            CallError::Deadline(_) => "deadline",
            CallError::Memory(_) => "memory",
            CallError::Trap(_) => "trap",
            CallError::Output { .. } => "output",
            CallError::Invalid(_) => "invalid",
            CallError::Busy(_) => "busy",
        }
    }
}

/// What a guest's store holds: its name, its config string, and the meters.
pub struct HostState {
    name: Arc<str>,
    config: Arc<str>,
    max_memory: usize,
    memory_refused: bool,
    deadline_hit: bool,
    logs_left: u32,
}

impl ResourceLimiter for HostState {
    fn memory_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        if desired > self.max_memory {
            self.memory_refused = true;
            return Err(wasmtime::format_err!(
                "memory cap of {} bytes exceeded (wanted {desired})",
                self.max_memory
            ));
        }
        Ok(true)
    }

    fn table_growing(&mut self, _current: usize, desired: usize, _max: Option<usize>) -> wasmtime::Result<bool> {
        Ok(desired <= 100_000)
    }
}

impl super::bindings::host::Host for HostState {
    fn log(&mut self, level: Level, message: String) {
        if self.logs_left == 0 {
            return;
        }
        self.logs_left -= 1;
        let mut end = message.len().min(LOG_LINE_MAX);
        while !message.is_char_boundary(end) {
            end -= 1;
        }
        let (policy, message) = (&*self.name, &message[..end]);
        match level {
            Level::Trace => tracing::trace!(policy, "{message}"),
            Level::Debug => tracing::debug!(policy, "{message}"),
            Level::Info => tracing::info!(policy, "{message}"),
            Level::Warn => tracing::warn!(policy, "{message}"),
            Level::Error => tracing::error!(policy, "{message}"),
        }
    }

    fn config(&mut self) -> String {
        self.config.to_string()
    }

    fn now_ms(&mut self) -> u64 {
        super::now_ms()
    }
}

impl super::bindings::types::Host for HostState {}

/// One engine for all policy modules, with its epoch ticker.
pub struct Runtime {
    engine: Engine,
    auth_linker: Linker<HostState>,
    router_linker: Linker<HostState>,
    limits: Limits,
    ticker_stop: Arc<AtomicBool>,
}

impl Drop for Runtime {
    fn drop(&mut self) {
        self.ticker_stop.store(true, Ordering::Release);
    }
}

/// The compiled, linked, checked form of a module, ready to instantiate.
#[derive(Clone)]
pub enum Prepared {
    Auth(AuthPre<HostState>),
    Router(RouterPre<HostState>),
}

/// Which world a module must implement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum World {
    Auth,
    Router,
}

impl World {
    pub fn name(self) -> &'static str {
        match self {
            World::Auth => "auth",
            World::Router => "router",
        }
    }
}

impl Runtime {
    pub fn new(limits: Limits, cache_dir: Option<&Path>) -> Result<Self, LoadError> {
        let engine_err = |e: wasmtime::Error| LoadError::Engine(format!("{e:#}"));
        let mut config = wasmtime::Config::new();
        config.wasm_component_model(true);
        config.epoch_interruption(true);
        // Copy-on-write memory images (the default): a pooled slot that last held the same module
        // keeps its image mapped, so instantiating maps and copies nothing.
        config.memory_init_cow(true);
        let slots = limits.max_concurrent;
        let mut pool = PoolingAllocationConfig::new();
        pool.total_component_instances(slots)
            // A Rust component is a few core instances (the module plus adapter shims).
            .total_core_instances(slots * 8)
            .total_memories(slots * 2)
            .total_tables(slots * 4)
            .max_memory_size(limits.max_memory_bytes)
            // Reset the first 512 KiB of a slot with memset instead of returning it to the
            // kernel: a policy's whole initial memory (128 KiB stack, data, the SDK's 256 KiB
            // arena) stays mapped and warm, so the next instance takes no page faults.
            .linear_memory_keep_resident(512 << 10)
            .table_keep_resident(64 << 10)
            // Linux 6.7+: reset only the pages a decision dirtied, not the whole kept region.
            .pagemap_scan(wasmtime::Enabled::Auto);
        config.allocation_strategy(InstanceAllocationStrategy::Pooling(pool));
        if let Some(dir) = cache_dir {
            let mut cache = wasmtime::CacheConfig::new();
            cache.with_directory(dir);
            config.cache(Some(wasmtime::Cache::new(cache).map_err(engine_err)?));
        }
        let engine = Engine::new(&config).map_err(engine_err)?;
        let mut auth_linker = Linker::new(&engine);
        super::bindings::auth::Auth::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(
            &mut auth_linker,
            |s| s,
        )
        .map_err(engine_err)?;
        let mut router_linker = Linker::new(&engine);
        super::bindings::router::Router::add_to_linker::<HostState, wasmtime::component::HasSelf<HostState>>(
            &mut router_linker,
            |s| s,
        )
        .map_err(engine_err)?;
        let ticker_stop = Arc::new(AtomicBool::new(false));
        {
            let (engine, stop) = (engine.clone(), Arc::clone(&ticker_stop));
            std::thread::Builder::new()
                .name("policy-epoch".into())
                .spawn(move || {
                    // One tick per millisecond of wall-clock time: a late wake-up catches up, so
                    // a deadline of N ticks is N milliseconds however the thread is scheduled.
                    let start = std::time::Instant::now();
                    let mut ticks = 0u128;
                    while !stop.load(Ordering::Acquire) {
                        std::thread::sleep(Duration::from_millis(1));
                        let due = start.elapsed().as_millis();
                        while ticks < due {
                            engine.increment_epoch();
                            ticks += 1;
                        }
                    }
                })
                .map_err(|e| LoadError::Engine(format!("starting the epoch ticker: {e}")))?;
        }
        Ok(Self {
            engine,
            auth_linker,
            router_linker,
            limits,
            ticker_stop,
        })
    }

    pub fn limits(&self) -> &Limits {
        &self.limits
    }

    /// Read, compile and check the module at `path` for `world`. Blocking (compiling takes tens
    /// of milliseconds): call it off the request path.
    pub fn load(&self, path: &Path, bytes: &[u8], world: World) -> Result<Prepared, LoadError> {
        let size = bytes.len() as u64;
        if size > self.limits.max_module_bytes {
            return Err(LoadError::TooLarge {
                path: path.into(),
                size,
                max: self.limits.max_module_bytes,
            });
        }
        let component = Component::new(&self.engine, bytes).map_err(|e| LoadError::Compile {
            path: path.into(),
            message: format!("{e:#}"),
        })?;
        // Name the first foreign import ourselves: the linker's own error is less helpful.
        let ty = component.component_type();
        for (import, _) in ty.imports(&self.engine) {
            if ALLOWED_IMPORTS.contains(&import) {
                continue;
            }
            let hint = if import.starts_with("wasi:") {
                "policies get no WASI; build for wasm32-unknown-unknown and componentize with `wasm-tools component new` (scripts/build-policies does)"
            } else if import.starts_with("avatar-edge:policy/") {
                "the module was built against another version of the policy contract; rebuild it with this relay's wasm-policies/wit"
            } else {
                "policies may import only avatar-edge:policy/host"
            };
            return Err(LoadError::ForbiddenImport {
                path: path.into(),
                import: import.to_owned(),
                hint,
            });
        }
        let wrong_world = |e: wasmtime::Error| LoadError::WrongWorld {
            path: path.into(),
            world: world.name(),
            message: format!("{e:#}"),
        };
        let prepared = match world {
            World::Auth => {
                let pre = self.auth_linker.instantiate_pre(&component).map_err(wrong_world)?;
                Prepared::Auth(AuthPre::new(pre).map_err(wrong_world)?)
            }
            World::Router => {
                let pre = self.router_linker.instantiate_pre(&component).map_err(wrong_world)?;
                Prepared::Router(RouterPre::new(pre).map_err(wrong_world)?)
            }
        };
        // A trial instantiation (no call): a module whose initial memory exceeds the cap, or
        // whose start-up traps, is refused now rather than failing every decision later.
        let mut store = self.store(&Arc::from("trial"), &Arc::from(""));
        let trial = match &prepared {
            Prepared::Auth(pre) => pre.instantiate(&mut store).map(drop),
            Prepared::Router(pre) => pre.instantiate(&mut store).map(drop),
        };
        trial.map_err(|e| LoadError::Trial {
            path: path.into(),
            message: self.classify(&store, e).to_string(),
        })?;
        Ok(prepared)
    }

    /// A store for one decision, with its deadline and meters set.
    fn store(&self, name: &Arc<str>, config: &Arc<str>) -> Store<HostState> {
        let mut store = Store::new(
            &self.engine,
            HostState {
                name: Arc::clone(name),
                config: Arc::clone(config),
                max_memory: self.limits.max_memory_bytes,
                memory_refused: false,
                deadline_hit: false,
                logs_left: LOGS_PER_DECISION,
            },
        );
        store.limiter(|s| s as &mut dyn ResourceLimiter);
        // The epoch ticks every millisecond; at each tick the guest is interrupted and the
        // wall clock decides: under the deadline it runs one more tick, past it the call traps.
        // A module gets at least its deadline and at most one tick more, however late or bursty
        // the ticker thread is scheduled.
        let (started, deadline) = (std::time::Instant::now(), self.limits.deadline);
        store.set_epoch_deadline(1);
        store.epoch_deadline_callback(move |mut ctx| {
            if started.elapsed() < deadline {
                return Ok(wasmtime::UpdateDeadline::Continue(1));
            }
            ctx.data_mut().deadline_hit = true;
            Err(wasmtime::format_err!("deadline of {deadline:?} exceeded"))
        });
        store
    }

    /// Turn a wasmtime error from inside a decision into what went wrong.
    fn classify(&self, store: &Store<HostState>, error: wasmtime::Error) -> CallError {
        if store.data().memory_refused {
            return CallError::Memory(self.limits.max_memory_bytes);
        }
        if store.data().deadline_hit {
            return CallError::Deadline(self.limits.deadline);
        }
        match error.downcast_ref::<wasmtime::Trap>() {
            Some(wasmtime::Trap::Interrupt) => CallError::Deadline(self.limits.deadline),
            Some(trap) => CallError::Trap(trap.to_string()),
            None => CallError::Trap(format!("{error:#}")),
        }
    }

    /// One decision: a fresh store, `f` (instantiate and call), and what went wrong if anything.
    fn call<T>(
        &self,
        name: &Arc<str>,
        config: &Arc<str>,
        f: impl FnOnce(&mut Store<HostState>) -> wasmtime::Result<T>,
    ) -> Result<T, CallError> {
        let mut store = self.store(name, config);
        f(&mut store).map_err(|e| self.classify(&store, e))
    }

    fn check_output(&self, size: usize) -> Result<(), CallError> {
        if size > self.limits.max_output_bytes {
            return Err(CallError::Output {
                size,
                max: self.limits.max_output_bytes,
            });
        }
        Ok(())
    }

    pub fn authorize_connect(
        &self,
        pre: &AuthPre<HostState>,
        name: &Arc<str>,
        config: &Arc<str>,
        request: &types::ConnectRequest,
    ) -> Result<types::ConnectDecision, CallError> {
        let decision = self.call(name, config, |store| {
            pre.instantiate(&mut *store)?.call_authorize_connect(store, request)
        })?;
        let size = match &decision {
            types::ConnectDecision::Allow(p) => principal_size(p),
            types::ConnectDecision::Deny(reason) => reason.len(),
        };
        self.check_output(size)?;
        if let types::ConnectDecision::Allow(p) = &decision {
            if p.user_id.is_empty() {
                return Err(CallError::Invalid("allowed with an empty user id".into()));
            }
        }
        Ok(decision)
    }

    pub fn authorize_message(
        &self,
        pre: &AuthPre<HostState>,
        name: &Arc<str>,
        config: &Arc<str>,
        request: &types::MessageRequest,
    ) -> Result<types::Verdict, CallError> {
        let verdict = self.call(name, config, |store| {
            pre.instantiate(&mut *store)?.call_authorize_message(store, request)
        })?;
        if let types::Verdict::Deny(reason) = &verdict {
            self.check_output(reason.len())?;
        }
        Ok(verdict)
    }

    pub fn route(
        &self,
        pre: &RouterPre<HostState>,
        name: &Arc<str>,
        config: &Arc<str>,
        request: &types::RouteRequest,
    ) -> Result<types::RouteDecision, CallError> {
        let decision = self.call(name, config, |store| {
            pre.instantiate(&mut *store)?.call_route(store, request)
        })?;
        let size = match &decision {
            types::RouteDecision::Worker(id) | types::RouteDecision::Reject(id) => id.len(),
        };
        self.check_output(size)?;
        if let types::RouteDecision::Worker(id) = &decision {
            if !request.workers.iter().any(|w| &w.id == id) {
                return Err(CallError::Invalid(format!(
                    "chose worker `{id}`, which was not offered"
                )));
            }
        }
        Ok(decision)
    }
}

fn principal_size(p: &types::Principal) -> usize {
    p.user_id.len() + p.claims.iter().map(|(k, v)| k.len() + v.len()).sum::<usize>()
}
