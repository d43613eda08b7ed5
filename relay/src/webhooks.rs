//! Webhooks: each session's events, POSTed to the operator's servers, signed, and never lost.
//!
//! **What is sent.** Each event is one POST of JSON
//! `{"id", "type", "created_at", "session_id", "data"}` ([`Event`]), of one of the
//! [`EVENT_TYPES`]. The relay that holds a session's browser socket sends that session's events:
//! it sees the session start and end, and the worker sends it each finished turn of the
//! transcript on the session's own stream (`SessionFrame::Record`, asked for in the `Open`).
//! A browser is on exactly one relay, so each event is sent once per fleet.
//!
//! **Signed.** Every POST carries
//! `Avatar-Edge-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256(secret, "<t>.<raw body>")>`
//! ([`signature`]), made fresh for each try. The receiver recomputes it over the raw body and
//! rejects a `t` older than five minutes, so a captured POST cannot be replayed later
//! (`docs/webhooks.md` shows it in Python and Node).
//!
//! **Never lost, never in the way.** An event is written to disk the moment it happens
//! ([`Queue::push`]: one small file, renamed into place), before anything is sent; a session
//! never waits for a receiver. Each receiver has its own queue and its own task
//! ([`Deliverer`]). Events of one session go one at a time, oldest first, so they keep their
//! order; different sessions' events go side by side, up to `concurrency` POSTs at once, so a
//! receiver far away still keeps up with a busy relay. A try that fails (no answer within
//! `timeout_ms`, a status other than 2xx) is retried after 1 s, 2 s, 4 s, ... up to
//! `max_backoff_s`, for `retry_for_s` (a day), and that session's later events wait for it; a
//! relay restarted meanwhile picks the queue up from disk. The receiver deduplicates by `id`:
//! delivery is at least once.
//!
//! ```text
//!  signaling ──emit──▶ Queue (disk, per webhook) ──each session's oldest──▶ Deliverer ──POSTs──▶ receiver
//!                           ▲ bound: max_queued, oldest dropped                  │ 2xx: delete; else retry later
//!                           └────────────────────────────────────────────────────┘
//! ```
//!
//! Bounded: a queue holds at most `max_queued` events; past it the oldest is dropped. Every drop
//! is counted (`relay_webhook_dropped_total{reason}`: `full`, `expired`, `unreadable`), next to
//! `relay_webhook_delivered_total`, `relay_webhook_retries_total` and
//! `relay_webhook_queue_depth`.
//!
//! **Reloaded in place.** A reload (SIGHUP, `systemctl reload`: [`Webhooks::reload`]) applies an
//! edited `[[webhooks]]` list to the running relay, with nothing queued lost. A webhook *is* its
//! URL, which names its queue's folder (`queue_dir`):
//!
//! ```text
//!  before              after               what happens
//!  url A (secret s1)   url A (secret s2)   same queue, same deliverer; s2 signs the next try
//!  url B               (gone)              B's deliverer stops; its events stay on disk
//!  (none)              url C               C's queue opened (with what was left there), delivered
//! ```
//!
//! A changed `events` filters the next event, a changed `name` labels the next log line and
//! metric (`Settings`). A URL that comes back finds its queue where it was left. What
//! `[webhook_delivery]` says (the folder, the bounds, the retries) is read at start only: a change
//! there waits for a restart, like any other setting the relay does not reload.

use crate::config::{WebhookConfig, WebhookDelivery};
use arc_swap::ArcSwap;
use hmac::{Hmac, Mac};
use serde::Serialize;
use serde_json::Value;
use sha2::{Digest, Sha256};
use std::collections::VecDeque;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

pub use avatar_proto::webhook::{
    EVENT_TYPES, RECORDING_READY, SESSION_ENDED, SESSION_STARTED, TRANSCRIPT_ASSISTANT, TRANSCRIPT_USER,
};

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "Avatar-Edge-Signature";

/// One event, as POSTed.
#[derive(Debug, Clone, Serialize)]
pub struct Event<'a> {
    pub id: String,
    #[serde(rename = "type")]
    pub kind: &'a str,
    pub created_at: String,
    pub session_id: &'a str,
    pub data: Value,
}

/// `t=<t>,v1=<hex HMAC-SHA256(secret, "<t>.<body>")>`.
pub fn signature(secret: &[u8], t: u64, body: &[u8]) -> String {
    // HMAC takes a key of any length.
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret) else {
        return String::new();
    };
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Errors opening the webhooks' queues.
#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("webhook queue {path}: {source}")]
    Queue { path: PathBuf, source: std::io::Error },
    #[error("webhook HTTP client: {0}")]
    Client(#[from] reqwest::Error),
}

/// The relay's webhooks: where events are emitted ([`Webhooks::emit`]). Empty (every call a
/// no-op) without `[[webhooks]]`.
///
/// Shared by every session (it lives in the relay's `AppState`), so everything goes through
/// `&self`: emitting reads the current set of receivers, a reload ([`Webhooks::reload`]) swaps
/// in the next one whole, and each receiver's deliverer runs once [`Webhooks::start`] has said
/// where.
#[derive(Default)]
pub struct Webhooks {
    /// The receivers as emitting sees them now, in the file's order; replaced whole by a reload.
    hooks: ArcSwap<Vec<Arc<Hook>>>,
    /// Where deliverers run; held for the whole of a reload, so that two never interleave.
    runner: Mutex<Runner>,
}

/// One receiver, as emitting sees it. A reload keeps it as long as its URL stays.
struct Hook {
    /// Who it is: its queue's folder is named by it ([`queue_dir`]). Never logged (a URL may
    /// carry a token); `name` is.
    url: String,
    /// What a reload may change in place; shared with its [`Deliverer`].
    settings: Arc<ArcSwap<Settings>>,
    queue: Arc<Mutex<Queue>>,
    wake: Arc<Notify>,
    /// Stops its deliverer when a reload removes it.
    stop: CancellationToken,
}

/// What a reload changes of a webhook that stays (same URL), read afresh by each emit and each
/// try: the next event is filtered by the new `events`, the next POST signed with the new
/// `secret`, the next log line and metric labelled with the new `name` (series under the old
/// label stop where they were; its queue-depth gauge goes to 0).
struct Settings {
    /// The receiver in logs and in the metrics' `webhook` label.
    name: String,
    /// Only these event types; `None`: all of them.
    events: Option<Vec<String>>,
    secret: Arc<[u8]>,
}

impl Settings {
    fn of(config: &WebhookConfig) -> Self {
        Self {
            name: config.name.clone().unwrap_or_else(|| host_of(&config.url)),
            events: config.events.clone(),
            secret: Arc::from(config.secret.expose().as_bytes()),
        }
    }

    /// What differs in `new`, as the reload's report says it (never the secret itself).
    fn changes(&self, new: &Self) -> Vec<String> {
        let mut what = Vec::new();
        if self.secret != new.secret {
            what.push("secret".to_owned());
        }
        if self.events != new.events {
            what.push("events".to_owned());
        }
        if self.name != new.name {
            what.push(format!("renamed from {}", self.name));
        }
        what
    }
}

/// Where deliverers run. Before [`Webhooks::start`] (between binding and serving, or in tests
/// that never serve) they wait in `pending`; from then on each one starts as it is made.
#[derive(Default)]
struct Runner {
    pending: Vec<Deliverer>,
    running: Option<Running>,
}

/// The relay's task tracker (shutdown waits for every task in one place), its shutdown, and the
/// runtime to spawn on (a reload runs outside any task of ours).
struct Running {
    tasks: TaskTracker,
    shutdown: CancellationToken,
    runtime: tokio::runtime::Handle,
}

impl Runner {
    fn launch(&mut self, deliverer: Deliverer) {
        match &self.running {
            Some(r) => {
                r.tasks.spawn_on(deliverer.run(r.shutdown.clone()), &r.runtime);
            }
            None => self.pending.push(deliverer),
        }
    }
}

/// What a reload does with one configured webhook: decided for all of them before any is
/// applied, so that a queue that cannot be opened changes nothing.
enum Plan {
    /// The same URL, the same settings.
    Kept(Arc<Hook>),
    /// The same URL: the same queue and deliverer, these settings from now on.
    Changed(Arc<Hook>, Settings),
    /// A new URL: its queue opened, its deliverer ready to start.
    Added(Arc<Hook>, Deliverer),
}

impl Webhooks {
    /// Open every webhook's queue (creating its folder, reading what a previous run left) and
    /// make the tasks that deliver them ([`Deliverer::run`]); they run from [`Webhooks::start`].
    pub fn open(hooks: &[WebhookConfig], delivery: &WebhookDelivery) -> Result<Self, WebhookError> {
        let webhooks = Self::default();
        webhooks.reload(hooks, delivery)?;
        Ok(webhooks)
    }

    /// Run the deliverers, now and those a reload adds later, as tasks of `tasks` that stop with
    /// `shutdown`. Called once, inside the relay's runtime, when it starts serving; without a
    /// runtime nothing starts (logged) and the events stay queued.
    pub fn start(&self, tasks: &TaskTracker, shutdown: &CancellationToken) {
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            warn!("webhooks: no runtime to deliver on; events stay queued on disk");
            return;
        };
        let mut runner = self.runner();
        runner.running = Some(Running {
            tasks: tasks.clone(),
            shutdown: shutdown.clone(),
            runtime,
        });
        for deliverer in std::mem::take(&mut runner.pending) {
            if !deliverer.stop.is_cancelled() {
                runner.launch(deliverer);
            }
        }
    }

    /// Apply an edited `[[webhooks]]` list (SIGHUP); returns what changed, one line each
    /// (`webhooks: added billing`, `webhooks: changed billing (secret)`, `webhooks: removed
    /// billing`), empty when nothing did.
    ///
    /// A webhook is its URL. One whose URL stays keeps its queue and its running deliverer; a
    /// changed `secret`, `events` or `name` applies to the next event and the next POST
    /// (`Settings`). A new URL opens its queue, as at start (what an earlier run, or an
    /// earlier entry with that URL, left there is delivered), and starts delivering. A removed
    /// one stops delivering (a POST in flight is cut, and sent again should it come back: at
    /// least once) and queues nothing more; what it had not delivered stays on disk (logged:
    /// how many, and where) until its URL comes back.
    ///
    /// `delivery` is the running relay's `[webhook_delivery]`, the one it started with: a
    /// change there applies at the next restart. If a new queue cannot be opened, the error is
    /// returned and nothing changes.
    pub fn reload(&self, hooks: &[WebhookConfig], delivery: &WebhookDelivery) -> Result<Vec<String>, WebhookError> {
        let mut runner = self.runner();
        let old = self.hooks.load_full();
        let mut plans = Vec::with_capacity(hooks.len());
        let mut seen = std::collections::HashSet::new();
        for config in hooks {
            // A URL listed twice (the configuration's check refuses it): the first one counts.
            if !seen.insert(config.url.as_str()) {
                continue;
            }
            let settings = Settings::of(config);
            plans.push(match old.iter().find(|h| h.url == config.url) {
                Some(hook) if hook.settings.load().changes(&settings).is_empty() => Plan::Kept(Arc::clone(hook)),
                Some(hook) => Plan::Changed(Arc::clone(hook), settings),
                None => {
                    let (hook, deliverer) = Hook::open(config, settings, delivery)?;
                    Plan::Added(hook, deliverer)
                }
            });
        }
        // Every queue is open: from here on nothing fails.
        let mut changed = Vec::new();
        let mut next = Vec::with_capacity(plans.len());
        for plan in plans {
            match plan {
                Plan::Kept(hook) => next.push(hook),
                Plan::Changed(hook, settings) => {
                    let was = hook.settings.load_full();
                    let what = was.changes(&settings).join(", ");
                    if was.name != settings.name {
                        let depth = lock(&hook.queue).len();
                        metrics::gauge!("relay_webhook_queue_depth", "webhook" => was.name.clone()).set(0.0);
                        metrics::gauge!("relay_webhook_queue_depth", "webhook" => settings.name.clone())
                            .set(depth as f64);
                    }
                    changed.push(format!("webhooks: changed {} ({what})", settings.name));
                    hook.settings.store(Arc::new(settings));
                    next.push(hook);
                }
                Plan::Added(hook, deliverer) => {
                    let name = hook.name();
                    let queued = lock(&hook.queue).len();
                    if queued > 0 {
                        info!(webhook = %name, queued, "webhook events left from before: delivering them");
                    }
                    metrics::gauge!("relay_webhook_queue_depth", "webhook" => name.clone()).set(queued as f64);
                    changed.push(format!("webhooks: added {name}"));
                    runner.launch(deliverer);
                    next.push(hook);
                }
            }
        }
        for gone in old.iter().filter(|h| !hooks.iter().any(|c| c.url == h.url)) {
            gone.stop.cancel();
            let name = gone.name();
            let (queued, dir) = {
                let queue = lock(&gone.queue);
                (queue.len(), queue.dir.clone())
            };
            // Nothing waits to be sent any more; the log says what stays on disk.
            metrics::gauge!("relay_webhook_queue_depth", "webhook" => name.clone()).set(0.0);
            if queued > 0 {
                info!(
                    webhook = %name,
                    queued,
                    dir = %dir.display(),
                    "webhook removed: its undelivered events stay on disk, and go if its URL comes back"
                );
            }
            changed.push(format!("webhooks: removed {name}"));
        }
        // A removed webhook's deliverer that never started never will.
        runner.pending.retain(|d| !d.stop.is_cancelled());
        self.hooks.store(Arc::new(next));
        Ok(changed)
    }

    fn runner(&self) -> std::sync::MutexGuard<'_, Runner> {
        self.runner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Whether any webhook is configured.
    pub fn enabled(&self) -> bool {
        !self.hooks.load().is_empty()
    }

    /// Whether any webhook takes events of type `kind`.
    pub fn wants(&self, kind: &str) -> bool {
        self.hooks.load().iter().any(|h| h.takes(kind))
    }

    /// Queue an event for every webhook that takes its type: on disk before this returns, never
    /// waiting for a receiver.
    pub fn emit(&self, session_id: &str, kind: &str, data: Value) {
        // The set as it is now (a reload meanwhile applies from the next event): held as a full
        // `Arc`, not a short-lived guard, since writing the files takes a while.
        let hooks = self.hooks.load_full();
        if !hooks.iter().any(|h| h.takes(kind)) {
            return;
        }
        let event = Event {
            id: format!("evt_{}", hex::encode(rand::random::<[u8; 12]>())),
            kind,
            created_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
            session_id,
            data,
        };
        let body = match serde_json::to_vec(&event) {
            Ok(body) => body,
            Err(e) => {
                warn!(error = %e, "a webhook event could not be written");
                return;
            }
        };
        for hook in hooks.iter().filter(|h| h.takes(kind)) {
            let name = hook.name();
            let mut queue = lock(&hook.queue);
            match queue.push(session_id, &body) {
                Ok(dropped) => {
                    if dropped > 0 {
                        metrics::counter!("relay_webhook_dropped_total", "webhook" => name.clone(), "reason" => "full")
                            .increment(dropped);
                        warn!(webhook = %name, dropped, "webhook queue full: the oldest events were dropped (webhook_delivery.max_queued)");
                    }
                }
                Err(e) => {
                    metrics::counter!("relay_webhook_dropped_total", "webhook" => name.clone(), "reason" => "unwritable")
                        .increment(1);
                    warn!(webhook = %name, error = %e, "a webhook event could not be queued on disk");
                }
            }
            metrics::gauge!("relay_webhook_queue_depth", "webhook" => name).set(queue.items.len() as f64);
            drop(queue);
            hook.wake.notify_one();
        }
    }
}

impl Hook {
    /// Open the queue of the webhook at `config.url` (creating its folder, reading what was left
    /// there) and make its deliverer. Nothing runs yet, and nothing is logged or counted.
    fn open(
        config: &WebhookConfig,
        settings: Settings,
        delivery: &WebhookDelivery,
    ) -> Result<(Arc<Self>, Deliverer), WebhookError> {
        let dir = queue_dir(&delivery.dir, &config.url);
        let queue = Queue::open(&dir, delivery.max_queued).map_err(|source| WebhookError::Queue {
            path: dir.clone(),
            source,
        })?;
        let client = reqwest::Client::builder()
            .timeout(Duration::from_millis(delivery.timeout_ms))
            .connect_timeout(Duration::from_millis(delivery.timeout_ms))
            .user_agent(concat!("avatar-edge-relay/", env!("CARGO_PKG_VERSION")))
            .redirect(reqwest::redirect::Policy::none())
            .build()?;
        let settings = Arc::new(ArcSwap::from_pointee(settings));
        let queue = Arc::new(Mutex::new(queue));
        let wake = Arc::new(Notify::new());
        let stop = CancellationToken::new();
        let deliverer = Deliverer {
            url: config.url.clone(),
            settings: Arc::clone(&settings),
            queue: Arc::clone(&queue),
            wake: Arc::clone(&wake),
            stop: stop.clone(),
            client,
            retry_for: Duration::from_secs(delivery.retry_for_s),
            max_backoff: Duration::from_secs(delivery.max_backoff_s),
            concurrency: delivery.concurrency.max(1),
        };
        let hook = Arc::new(Self {
            url: config.url.clone(),
            settings,
            queue,
            wake,
            stop,
        });
        Ok((hook, deliverer))
    }

    fn name(&self) -> String {
        self.settings.load().name.clone()
    }

    fn takes(&self, kind: &str) -> bool {
        self.settings
            .load()
            .events
            .as_ref()
            .is_none_or(|e| e.iter().any(|k| k == kind))
    }
}

/// A webhook's queue folder under `webhook_delivery.dir`: named by its URL, so that reordering,
/// renaming or re-keying webhooks keeps each one's queue.
fn queue_dir(root: &Path, url: &str) -> PathBuf {
    root.join(&hex::encode(Sha256::digest(url.as_bytes()))[..16])
}

fn lock(queue: &Mutex<Queue>) -> std::sync::MutexGuard<'_, Queue> {
    queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// `https://host:port/path` → `host`.
fn host_of(url: &str) -> String {
    url.parse::<axum::http::Uri>()
        .ok()
        .and_then(|u| u.host().map(str::to_owned))
        .unwrap_or_else(|| "webhook".into())
}

fn unix_ms(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// An event waiting in a queue: its file is `<seq>-<queued at, unix ms>-<lane>.json`.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Item {
    seq: u64,
    queued_ms: u64,
    /// Its session's lane (a hash of the session id): a lane's events go one at a time.
    lane: u64,
}

impl Item {
    fn file_name(&self) -> String {
        format!("{:020}-{}-{:016x}.json", self.seq, self.queued_ms, self.lane)
    }

    fn parse(name: &str) -> Option<Self> {
        let mut parts = name.strip_suffix(".json")?.splitn(3, '-');
        Some(Self {
            seq: parts.next()?.parse().ok()?,
            queued_ms: parts.next()?.parse().ok()?,
            lane: u64::from_str_radix(parts.next()?, 16).ok()?,
        })
    }
}

/// The lane of a session's events.
fn lane(session_id: &str) -> u64 {
    let digest = Sha256::digest(session_id.as_bytes());
    let mut first = [0u8; 8];
    first.copy_from_slice(&digest[..8]);
    u64::from_be_bytes(first)
}

/// One webhook's events on disk, oldest first.
#[derive(Debug)]
pub struct Queue {
    dir: PathBuf,
    items: VecDeque<Item>,
    next_seq: u64,
    max: usize,
}

impl Queue {
    /// Open (or create) the queue in `dir`, with what an earlier run left there.
    pub fn open(dir: &Path, max: usize) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        // Writable now, not at the first event.
        let probe = dir.join(format!("probe-{}.tmp", std::process::id()));
        std::fs::write(&probe, b"")?;
        std::fs::remove_file(&probe)?;
        let mut items = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            match Item::parse(name) {
                Some(item) => items.push(item),
                // A write cut short by a crash never got its final name.
                None if name.ends_with(".tmp") => {
                    let _ = std::fs::remove_file(entry.path());
                }
                None => {}
            }
        }
        items.sort_by_key(|i| i.seq);
        let next_seq = items.last().map_or(0, |i| i.seq + 1);
        let mut queue = Self {
            dir: dir.to_owned(),
            items: items.into(),
            next_seq,
            max: max.max(1),
        };
        queue.trim();
        Ok(queue)
    }

    /// Write an event of `session_id`'s as the newest item; returns how many of the oldest were dropped to
    /// stay within the bound.
    pub fn push(&mut self, session_id: &str, body: &[u8]) -> std::io::Result<u64> {
        let item = Item {
            seq: self.next_seq,
            queued_ms: unix_ms(SystemTime::now()),
            lane: lane(session_id),
        };
        let path = self.dir.join(item.file_name());
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, body)?;
        std::fs::rename(&tmp, &path)?;
        self.next_seq += 1;
        self.items.push_back(item);
        Ok(self.trim())
    }

    fn trim(&mut self) -> u64 {
        let mut dropped = 0;
        while self.items.len() > self.max {
            if let Some(old) = self.items.pop_front() {
                let _ = std::fs::remove_file(self.dir.join(old.file_name()));
                dropped += 1;
            }
        }
        dropped
    }

    #[cfg(test)]
    fn head(&self) -> Option<Item> {
        self.items.front().cloned()
    }

    /// Remove `item` (delivered, or given up on), if it is still queued.
    fn remove(&mut self, item: &Item) {
        if let Some(i) = self.items.iter().position(|x| x == item) {
            self.items.remove(i);
            let _ = std::fs::remove_file(self.dir.join(item.file_name()));
        }
    }

    fn read(&self, item: &Item) -> std::io::Result<Vec<u8>> {
        std::fs::read(self.dir.join(item.file_name()))
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }
}

/// The wait before try `attempt + 1` after `attempt` failures: 1 s, 2 s, 4 s, ... up to `max`.
pub fn backoff(attempt: u32, max: Duration) -> Duration {
    Duration::from_secs(1u64 << attempt.saturating_sub(1).min(20)).min(max)
}

/// Delivers one webhook's queue (see the module docs): up to `concurrency` POSTs at once, each
/// session's events one at a time and oldest first. Made by [`Webhooks::open`] and
/// [`Webhooks::reload`], run by [`Webhooks::start`].
pub struct Deliverer {
    url: String,
    /// Its hook's: the name and secret as the last reload left them.
    settings: Arc<ArcSwap<Settings>>,
    queue: Arc<Mutex<Queue>>,
    wake: Arc<Notify>,
    /// Cancelled when a reload removes its webhook.
    stop: CancellationToken,
    client: reqwest::Client,
    retry_for: Duration,
    max_backoff: Duration,
    concurrency: usize,
}

/// How far into a queue the deliverer looks for events it may send: a session whose oldest
/// event lies further back waits until the events ahead of it have gone.
const SCAN: usize = 4096;

/// An event's failed tries, and when the next is due.
struct Retry {
    failures: u32,
    due: tokio::time::Instant,
}

impl Deliverer {
    /// Deliver until `shutdown`, or until a reload removes the webhook; what is left stays on
    /// disk for the next start (or for the webhook's return). POSTs in flight then are cut.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut flying: tokio::task::JoinSet<(Item, Result<(), String>)> = tokio::task::JoinSet::new();
        let mut in_flight: std::collections::HashSet<u64> = Default::default();
        let mut retries: std::collections::HashMap<u64, Retry> = Default::default();
        loop {
            // Checked first: `select!` below picks among ready branches at random.
            if shutdown.is_cancelled() || self.stop.is_cancelled() {
                return;
            }
            let (starts, next_due) = self.pick(&in_flight, &retries, flying.len());
            for item in starts {
                let Some(body) = self.body(&item) else {
                    retries.remove(&item.seq);
                    continue;
                };
                in_flight.insert(item.seq);
                // The secret as it is now: a reload's new one signs the next try.
                let secret = Arc::clone(&self.settings.load().secret);
                let post = post(self.client.clone(), self.url.clone(), secret, body);
                flying.spawn(async move { (item, post.await) });
            }
            let due = async {
                match next_due {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = self.stop.cancelled() => return,
                Some(done) = flying.join_next(), if !flying.is_empty() => {
                    let Ok((item, outcome)) = done else { continue };
                    in_flight.remove(&item.seq);
                    self.settle(&item, outcome, &mut retries);
                }
                _ = self.wake.notified() => {}
                _ = due => {}
            }
        }
    }

    /// The events that may go now: per session only its oldest, when it is not in flight and
    /// its next try is due; and when the next try falls due.
    fn pick(
        &self,
        in_flight: &std::collections::HashSet<u64>,
        retries: &std::collections::HashMap<u64, Retry>,
        flying: usize,
    ) -> (Vec<Item>, Option<tokio::time::Instant>) {
        let now = tokio::time::Instant::now();
        let queue = lock(&self.queue);
        let mut lanes = std::collections::HashSet::new();
        let mut starts = Vec::new();
        let mut next_due: Option<tokio::time::Instant> = None;
        for item in queue.items.iter().take(SCAN) {
            if flying + starts.len() >= self.concurrency {
                break;
            }
            // An older event of this session goes first.
            if !lanes.insert(item.lane) || in_flight.contains(&item.seq) {
                continue;
            }
            match retries.get(&item.seq) {
                Some(r) if r.due > now => next_due = Some(next_due.map_or(r.due, |d| d.min(r.due))),
                _ => starts.push(item.clone()),
            }
        }
        (starts, next_due)
    }

    /// The event's body, if it is still worth sending: one past `retry_for`, or unreadable, is
    /// dropped (and counted).
    fn body(&self, item: &Item) -> Option<Vec<u8>> {
        let age = Duration::from_millis(unix_ms(SystemTime::now()).saturating_sub(item.queued_ms));
        let read = lock(&self.queue).read(item);
        match read {
            Ok(_) if age > self.retry_for => {
                warn!(webhook = %self.name(), "a webhook event was not delivered within webhook_delivery.retry_for_s: dropped");
                self.give_up(item, "expired");
                None
            }
            // A file cut short (a crash while writing) is not an event.
            Ok(body) if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok() => Some(body),
            Ok(_) => {
                warn!(webhook = %self.name(), "a queued webhook event is not JSON: dropped");
                self.give_up(item, "unreadable");
                None
            }
            Err(e) => {
                warn!(webhook = %self.name(), error = %e, "a queued webhook event could not be read: dropped");
                self.give_up(item, "unreadable");
                None
            }
        }
    }

    /// After a try: delivered (off the queue), or due again after the backoff.
    fn settle(&self, item: &Item, outcome: Result<(), String>, retries: &mut std::collections::HashMap<u64, Retry>) {
        match outcome {
            Ok(()) => {
                retries.remove(&item.seq);
                let mut queue = lock(&self.queue);
                queue.remove(item);
                metrics::counter!("relay_webhook_delivered_total", "webhook" => self.name()).increment(1);
                metrics::gauge!("relay_webhook_queue_depth", "webhook" => self.name()).set(queue.len() as f64);
            }
            Err(why) => {
                let failures = retries.get(&item.seq).map_or(0, |r| r.failures).saturating_add(1);
                let wait = backoff(failures, self.max_backoff);
                metrics::counter!("relay_webhook_retries_total", "webhook" => self.name()).increment(1);
                if failures == 1 || failures.is_power_of_two() {
                    warn!(webhook = %self.name(), %why, failures, retry_in_s = wait.as_secs(), "webhook delivery failed; retrying");
                } else {
                    debug!(webhook = %self.name(), %why, failures, "webhook delivery failed");
                }
                retries.insert(
                    item.seq,
                    Retry {
                        failures,
                        due: tokio::time::Instant::now() + wait,
                    },
                );
            }
        }
    }

    /// The webhook's name now (a reload may change it).
    fn name(&self) -> String {
        self.settings.load().name.clone()
    }

    fn give_up(&self, item: &Item, reason: &'static str) {
        let mut queue = lock(&self.queue);
        queue.remove(item);
        metrics::counter!("relay_webhook_dropped_total", "webhook" => self.name(), "reason" => reason).increment(1);
        metrics::gauge!("relay_webhook_queue_depth", "webhook" => self.name()).set(queue.len() as f64);
    }
}

/// One try: `Ok` on a 2xx answer.
async fn post(client: reqwest::Client, url: String, secret: Arc<[u8]>, body: Vec<u8>) -> Result<(), String> {
    let t = SystemTime::now().duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    let signed = signature(&secret, t, &body);
    let response = client
        .post(&url)
        .header(reqwest::header::CONTENT_TYPE, "application/json")
        .header(SIGNATURE_HEADER, signed)
        .body(body)
        .send()
        .await
        .map_err(|e| e.to_string())?;
    let status = response.status();
    if status.is_success() {
        Ok(())
    } else {
        Err(format!("the receiver answered {status}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_signature_is_hmac_sha256_over_t_dot_body() {
        // Known answer: python3 -c 'import hmac,hashlib;print(hmac.new(b"whsec_test_secret_123",
        //   b"1700000000.{\"a\":1}",hashlib.sha256).hexdigest())'
        let s = signature(b"whsec_test_secret_123", 1_700_000_000, br#"{"a":1}"#);
        assert_eq!(
            s,
            "t=1700000000,v1=e89dcbfdce3392fb275033fb083d8c81e095a63bf687d9a2cd50e7d5f55e21f6"
        );
    }

    #[test]
    fn backoff_doubles_up_to_its_ceiling() {
        let max = Duration::from_secs(300);
        let waits: Vec<u64> = (1..=10).map(|a| backoff(a, max).as_secs()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
        assert_eq!(backoff(u32::MAX, max), max);
    }

    #[test]
    fn a_queue_keeps_its_order_across_a_restart_and_drops_the_oldest_past_its_bound() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut q = Queue::open(dir.path(), 3).expect("open");
        for n in 0..3 {
            assert_eq!(q.push("s", format!("{{\"n\":{n}}}").as_bytes()).expect("push"), 0);
        }
        // A write cut short by a crash, and a stranger's file: neither is an event.
        std::fs::write(dir.path().join("x.tmp"), b"half").expect("tmp");
        std::fs::write(dir.path().join("README"), b"hi").expect("other");
        drop(q);
        let mut q = Queue::open(dir.path(), 3).expect("reopen");
        assert_eq!(q.len(), 3);
        assert!(!dir.path().join("x.tmp").exists(), "a torn write is cleaned up");
        assert_eq!(q.push("s", b"{\"n\":3}").expect("push"), 1, "the oldest goes");
        let head = q.head().expect("head");
        assert_eq!(q.read(&head).expect("read"), b"{\"n\":1}");
        q.remove(&head);
        let next = q.head().expect("next");
        assert_eq!(q.read(&next).expect("read"), b"{\"n\":2}");
        assert_eq!(q.len(), 2);
        // Sequence numbers go on after a restart: the new event sorts last.
        drop(q);
        let mut q = Queue::open(dir.path(), 3).expect("reopen");
        q.push("s", b"{\"n\":4}").expect("push");
        let order: Vec<Vec<u8>> = q.items.clone().iter().map(|i| q.read(i).expect("read")).collect();
        assert_eq!(
            order,
            [b"{\"n\":2}".to_vec(), b"{\"n\":3}".to_vec(), b"{\"n\":4}".to_vec()]
        );
    }

    /// A receiver on loopback that refuses the first POST of session `a`, then takes everything;
    /// the bodies it took, in order.
    type Got = Arc<Mutex<Vec<Value>>>;
    type Refused = Arc<std::sync::atomic::AtomicBool>;

    async fn receiver() -> (String, Got) {
        use axum::routing::post;
        let got: Got = Arc::default();
        let refused = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let state = (Arc::clone(&got), refused);
        let app = axum::Router::new()
            .route(
                "/",
                post(
                    |axum::extract::State((got, refused)): axum::extract::State<(Got, Refused)>,
                     body: axum::body::Bytes| async move {
                        let event: Value = serde_json::from_slice(&body).unwrap_or_default();
                        if event["session_id"] == "a" && !refused.swap(true, std::sync::atomic::Ordering::SeqCst) {
                            return axum::http::StatusCode::SERVICE_UNAVAILABLE;
                        }
                        got.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push(event);
                        axum::http::StatusCode::NO_CONTENT
                    },
                ),
            )
            .with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, got)
    }

    #[tokio::test]
    async fn a_session_whose_event_is_retried_waits_while_others_go_on() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (url, got) = receiver().await;
        let hooks = [WebhookConfig {
            url,
            secret: crate::config::Secret::new("0123456789abcdef"),
            secret_file: None,
            events: None,
            name: None,
        }];
        let delivery = WebhookDelivery {
            dir: dir.path().to_owned(),
            max_backoff_s: 1,
            ..Default::default()
        };
        let hooks = Webhooks::open(&hooks, &delivery).expect("open");
        for (session, n) in [("a", 1), ("b", 1), ("a", 2), ("b", 2)] {
            hooks.emit(session, SESSION_STARTED, serde_json::json!({ "n": n }));
        }
        let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
        hooks.start(&tasks, &stop);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        // All four received, and off the queue (the receiver has each before the deliverer knows).
        let done = || got.lock().map(|g| g.len()).unwrap_or(0) == 4 && lock(&hooks.hooks.load()[0].queue).is_empty();
        while !done() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        tasks.close();
        tasks.wait().await;
        let got = got.lock().map(|g| g.clone()).unwrap_or_default();
        let order: Vec<(String, i64)> = got
            .iter()
            .map(|e| {
                (
                    e["session_id"].as_str().unwrap_or("").to_owned(),
                    e["data"]["n"].as_i64().unwrap_or(0),
                )
            })
            .collect();
        // b went on while a's first event waited a second for its retry; a kept its order.
        assert_eq!(
            order,
            [
                ("b".to_owned(), 1),
                ("b".to_owned(), 2),
                ("a".to_owned(), 1),
                ("a".to_owned(), 2)
            ]
        );
        assert!(lock(&hooks.hooks.load()[0].queue).is_empty());
    }

    #[test]
    fn emit_queues_only_for_webhooks_that_take_the_type() {
        let dir = tempfile::tempdir().expect("tempdir");
        let hooks = [
            WebhookConfig {
                url: "http://192.0.2.1/all".into(),
                secret: crate::config::Secret::new("0123456789abcdef"),
                secret_file: None,
                events: None,
                name: None,
            },
            WebhookConfig {
                url: "http://192.0.2.1/ends".into(),
                secret: crate::config::Secret::new("0123456789abcdef"),
                secret_file: None,
                events: Some(vec![SESSION_ENDED.into()]),
                name: Some("ends".into()),
            },
        ];
        let delivery = WebhookDelivery {
            dir: dir.path().to_owned(),
            ..Default::default()
        };
        let hooks = Webhooks::open(&hooks, &delivery).expect("open");
        assert_eq!(hooks.runner().pending.len(), 2, "a deliverer each, waiting for start");
        hooks.emit("s1", SESSION_STARTED, serde_json::json!({"worker": "w"}));
        hooks.emit("s1", SESSION_ENDED, serde_json::json!({"duration_s": 1.5}));
        let set = hooks.hooks.load();
        let lens: Vec<usize> = set.iter().map(|h| lock(&h.queue).len()).collect();
        assert_eq!(lens, [2, 1]);
        let q = lock(&set[0].queue);
        let first: Value = serde_json::from_slice(&q.read(&q.head().expect("head")).expect("read")).expect("json");
        assert_eq!(first["type"], SESSION_STARTED);
        assert_eq!(first["session_id"], "s1");
        assert_eq!(first["data"]["worker"], "w");
        assert!(first["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("evt_") && id.len() == 28));
        assert!(first["created_at"].as_str().is_some_and(|t| t.ends_with('Z')));
    }

    /// One `[[webhooks]]` entry.
    fn hook(url: &str, secret: &str, events: Option<&[&str]>, name: &str) -> WebhookConfig {
        WebhookConfig {
            url: url.into(),
            secret: crate::config::Secret::new(secret),
            secret_file: None,
            events: events.map(|e| e.iter().map(|k| (*k).to_owned()).collect()),
            name: Some(name.into()),
        }
    }

    /// The events on disk in a queue's folder.
    fn json_files(dir: &Path) -> usize {
        std::fs::read_dir(dir).map_or(0, |entries| {
            entries
                .filter_map(Result::ok)
                .filter(|e| e.file_name().to_string_lossy().ends_with(".json"))
                .count()
        })
    }

    const SECRET: &str = "first-secret-0123";
    const OTHER_SECRET: &str = "second-secret-456";

    #[test]
    fn a_reload_adds_and_removes_webhooks_and_a_removed_ones_events_stay_on_disk() {
        let dir = tempfile::tempdir().expect("tempdir");
        let delivery = WebhookDelivery {
            dir: dir.path().to_owned(),
            ..Default::default()
        };
        let a = hook("http://192.0.2.1/a", SECRET, None, "a");
        let b = hook("http://192.0.2.1/b", SECRET, None, "b");
        let (dir_a, dir_b) = (queue_dir(&delivery.dir, &a.url), queue_dir(&delivery.dir, &b.url));
        let hooks = Webhooks::open(&[], &delivery).expect("open");
        assert!(!hooks.enabled());
        // Added: emitting queues for it from the next event.
        assert_eq!(
            hooks.reload(std::slice::from_ref(&a), &delivery).expect("add a"),
            ["webhooks: added a"]
        );
        assert!(hooks.enabled() && hooks.wants(SESSION_STARTED));
        hooks.emit("s1", SESSION_STARTED, serde_json::json!({}));
        assert_eq!(
            hooks.reload(&[a.clone(), b.clone()], &delivery).expect("add b"),
            ["webhooks: added b"]
        );
        hooks.emit("s1", SESSION_ENDED, serde_json::json!({}));
        assert_eq!((json_files(&dir_a), json_files(&dir_b)), (2, 1));
        // The same list again: nothing changes.
        assert_eq!(
            hooks.reload(&[a.clone(), b.clone()], &delivery).expect("same"),
            Vec::<String>::new()
        );
        // Removed: nothing more is queued for it, and what it had stays where it was.
        assert_eq!(
            hooks.reload(std::slice::from_ref(&b), &delivery).expect("remove a"),
            ["webhooks: removed a"]
        );
        hooks.emit("s1", TRANSCRIPT_USER, serde_json::json!({}));
        assert_eq!((json_files(&dir_a), json_files(&dir_b)), (2, 2));
        assert_eq!(
            hooks.runner().pending.len(),
            1,
            "a's deliverer, never started, is dropped; b's waits for start"
        );
        // Back again: its queue is picked up where it was left.
        assert_eq!(
            hooks.reload(&[a, b], &delivery).expect("a again"),
            ["webhooks: added a"]
        );
        assert_eq!(lock(&hooks.hooks.load()[0].queue).len(), 2);
        assert_eq!(hooks.runner().pending.len(), 2);
    }

    #[test]
    fn a_changed_secret_events_or_name_keeps_the_webhooks_queue() {
        let dir = tempfile::tempdir().expect("tempdir");
        let delivery = WebhookDelivery {
            dir: dir.path().to_owned(),
            ..Default::default()
        };
        let url = "http://192.0.2.1/events";
        let a = hook(url, SECRET, Some(&[SESSION_ENDED]), "a");
        let hooks = Webhooks::open(std::slice::from_ref(&a), &delivery).expect("open");
        hooks.emit("s1", SESSION_ENDED, serde_json::json!({}));
        assert!(!hooks.wants(SESSION_STARTED));
        let before = Arc::clone(&hooks.hooks.load()[0].queue);
        let edited = WebhookConfig {
            secret: crate::config::Secret::new(OTHER_SECRET),
            events: None,
            name: Some("billing".into()),
            ..a
        };
        assert_eq!(
            hooks.reload(&[edited], &delivery).expect("reload"),
            ["webhooks: changed billing (secret, events, renamed from a)"]
        );
        let now = hooks.hooks.load_full();
        assert!(Arc::ptr_eq(&before, &now[0].queue), "the same queue");
        assert_eq!(&*now[0].settings.load().secret, OTHER_SECRET.as_bytes());
        assert_eq!(now[0].name(), "billing");
        assert_eq!(hooks.runner().pending.len(), 1, "and the same deliverer: no second one");
        // The new filter applies to the next event.
        assert!(hooks.wants(SESSION_STARTED));
        hooks.emit("s1", SESSION_STARTED, serde_json::json!({}));
        assert_eq!(lock(&now[0].queue).len(), 2);
        assert_eq!(json_files(&queue_dir(&delivery.dir, url)), 2);
    }

    #[test]
    fn a_reload_that_cannot_open_a_new_queue_changes_nothing() {
        let dir = tempfile::tempdir().expect("tempdir");
        let delivery = WebhookDelivery {
            dir: dir.path().join("queues"),
            ..Default::default()
        };
        let a = hook("http://192.0.2.1/a", SECRET, None, "a");
        let hooks = Webhooks::open(std::slice::from_ref(&a), &delivery).expect("open");
        // A file where the new webhook's folder would go.
        let blocked = WebhookDelivery {
            dir: dir.path().join("a-file"),
            ..delivery.clone()
        };
        std::fs::write(&blocked.dir, b"not a folder").expect("file");
        let edited = WebhookConfig {
            secret: crate::config::Secret::new(OTHER_SECRET),
            ..a
        };
        let b = hook("http://192.0.2.1/b", SECRET, None, "b");
        let refused = hooks.reload(&[edited, b], &blocked);
        assert!(matches!(refused, Err(WebhookError::Queue { .. })), "{refused:?}");
        let now = hooks.hooks.load_full();
        assert_eq!(now.len(), 1, "b not added");
        assert_eq!(&*now[0].settings.load().secret, SECRET.as_bytes(), "a's secret kept");
        assert_eq!(hooks.runner().pending.len(), 1);
    }

    /// A receiver on loopback that takes everything; each POST's signature header and body.
    type Signed = Arc<Mutex<Vec<(String, Vec<u8>)>>>;

    async fn signed_receiver() -> (String, Signed) {
        use axum::routing::post;
        let got: Signed = Arc::default();
        let app = axum::Router::new()
            .route(
                "/",
                post(
                    |axum::extract::State(got): axum::extract::State<Signed>,
                     headers: axum::http::HeaderMap,
                     body: axum::body::Bytes| async move {
                        let signed = headers
                            .get(SIGNATURE_HEADER)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned();
                        got.lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner)
                            .push((signed, body.to_vec()));
                        axum::http::StatusCode::NO_CONTENT
                    },
                ),
            )
            .with_state(Arc::clone(&got));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let url = format!("http://{}/", listener.local_addr().expect("addr"));
        tokio::spawn(async move { axum::serve(listener, app).await });
        (url, got)
    }

    /// Whether `post` carries a valid signature made with `secret`.
    fn signed_with(secret: &str, (header, body): &(String, Vec<u8>)) -> bool {
        let t = header
            .strip_prefix("t=")
            .and_then(|rest| rest.split(',').next())
            .and_then(|t| t.parse::<u64>().ok());
        t.is_some_and(|t| signature(secret.as_bytes(), t, body) == *header)
    }

    /// Waits (10 s at most) until `done`; whether it came.
    async fn until(done: impl Fn() -> bool) -> bool {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while !done() {
            if tokio::time::Instant::now() >= deadline {
                return false;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        true
    }

    #[tokio::test]
    async fn a_reload_starts_a_new_webhooks_deliverer_and_a_new_secret_signs_the_next_post() {
        let dir = tempfile::tempdir().expect("tempdir");
        let (url, got) = signed_receiver().await;
        let received = || got.lock().map(|g| g.len()).unwrap_or(0);
        let delivery = WebhookDelivery {
            dir: dir.path().to_owned(),
            ..Default::default()
        };
        let queue = queue_dir(&delivery.dir, &url);
        let hooks = Webhooks::open(&[], &delivery).expect("open");
        let (tasks, stop) = (TaskTracker::new(), CancellationToken::new());
        hooks.start(&tasks, &stop);
        // Added while running: its deliverer starts at once.
        let first = hook(&url, SECRET, None, "rx");
        assert_eq!(
            hooks.reload(std::slice::from_ref(&first), &delivery).expect("add"),
            ["webhooks: added rx"]
        );
        hooks.emit("s", SESSION_STARTED, serde_json::json!({ "n": 1 }));
        assert!(until(|| received() == 1).await, "the added webhook delivers");
        // A new secret: the same deliverer signs the next POST with it.
        let second = WebhookConfig {
            secret: crate::config::Secret::new(OTHER_SECRET),
            ..first
        };
        assert_eq!(
            hooks.reload(&[second], &delivery).expect("secret"),
            ["webhooks: changed rx (secret)"]
        );
        hooks.emit("s", SESSION_ENDED, serde_json::json!({ "n": 2 }));
        // Delivered, and off the queue (the receiver has it before the deliverer knows).
        assert!(
            until(|| received() == 2 && json_files(&queue) == 0).await,
            "delivered after the reload"
        );
        let posts = got.lock().map(|g| g.clone()).unwrap_or_default();
        assert!(signed_with(SECRET, &posts[0]), "the first POST: the first secret");
        assert!(signed_with(OTHER_SECRET, &posts[1]), "the next POST: the new secret");
        assert!(!signed_with(SECRET, &posts[1]));
        // Removed: its deliverer stops, and nothing more is queued for it.
        assert_eq!(hooks.reload(&[], &delivery).expect("remove"), ["webhooks: removed rx"]);
        hooks.emit("s", TRANSCRIPT_USER, serde_json::json!({ "n": 3 }));
        assert_eq!(json_files(&queue), 0);
        assert!(!hooks.enabled());
        stop.cancel();
        tasks.close();
        assert!(
            tokio::time::timeout(Duration::from_secs(5), tasks.wait()).await.is_ok(),
            "every deliverer stopped"
        );
        assert_eq!(received(), 2);
    }
}
