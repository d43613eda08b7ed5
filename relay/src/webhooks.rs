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

use crate::config::{WebhookConfig, WebhookDelivery};
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
#[derive(Default)]
pub struct Webhooks {
    hooks: Vec<Hook>,
}

/// One receiver, as emitting sees it.
struct Hook {
    name: String,
    events: Option<Vec<String>>,
    queue: Arc<Mutex<Queue>>,
    wake: Arc<Notify>,
}

impl Webhooks {
    /// Open every webhook's queue (creating its folder, reading what a previous run left) and
    /// make the tasks that deliver them ([`Deliverer::run`]).
    pub fn open(hooks: &[WebhookConfig], delivery: &WebhookDelivery) -> Result<(Self, Vec<Deliverer>), WebhookError> {
        let mut out = Self::default();
        let mut deliverers = Vec::new();
        for hook in hooks {
            let name = hook.name.clone().unwrap_or_else(|| host_of(&hook.url));
            // Named by the URL, so that reordering or renaming webhooks keeps each one's queue.
            let dir = delivery
                .dir
                .join(&hex::encode(Sha256::digest(hook.url.as_bytes()))[..16]);
            let queue = Queue::open(&dir, delivery.max_queued).map_err(|source| WebhookError::Queue {
                path: dir.clone(),
                source,
            })?;
            if !queue.items.is_empty() {
                info!(webhook = %name, queued = queue.items.len(), "webhook events left from before: delivering them");
            }
            metrics::gauge!("relay_webhook_queue_depth", "webhook" => name.clone()).set(queue.items.len() as f64);
            let queue = Arc::new(Mutex::new(queue));
            let wake = Arc::new(Notify::new());
            let client = reqwest::Client::builder()
                .timeout(Duration::from_millis(delivery.timeout_ms))
                .connect_timeout(Duration::from_millis(delivery.timeout_ms))
                .user_agent(concat!("avatar-edge-relay/", env!("CARGO_PKG_VERSION")))
                .redirect(reqwest::redirect::Policy::none())
                .build()?;
            deliverers.push(Deliverer {
                name: name.clone(),
                url: hook.url.clone(),
                secret: Arc::from(hook.secret.expose().as_bytes()),
                queue: Arc::clone(&queue),
                wake: Arc::clone(&wake),
                client,
                retry_for: Duration::from_secs(delivery.retry_for_s),
                max_backoff: Duration::from_secs(delivery.max_backoff_s),
                concurrency: delivery.concurrency.max(1),
            });
            out.hooks.push(Hook {
                name,
                events: hook.events.clone(),
                queue,
                wake,
            });
        }
        Ok((out, deliverers))
    }

    /// Whether any webhook is configured.
    pub fn enabled(&self) -> bool {
        !self.hooks.is_empty()
    }

    /// Whether any webhook takes events of type `kind`.
    pub fn wants(&self, kind: &str) -> bool {
        self.hooks.iter().any(|h| h.takes(kind))
    }

    /// Queue an event for every webhook that takes its type: on disk before this returns, never
    /// waiting for a receiver.
    pub fn emit(&self, session_id: &str, kind: &str, data: Value) {
        if !self.wants(kind) {
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
        for hook in self.hooks.iter().filter(|h| h.takes(kind)) {
            let mut queue = lock(&hook.queue);
            match queue.push(session_id, &body) {
                Ok(dropped) => {
                    if dropped > 0 {
                        metrics::counter!("relay_webhook_dropped_total", "webhook" => hook.name.clone(), "reason" => "full")
                            .increment(dropped);
                        warn!(webhook = %hook.name, dropped, "webhook queue full: the oldest events were dropped (webhook_delivery.max_queued)");
                    }
                }
                Err(e) => {
                    metrics::counter!("relay_webhook_dropped_total", "webhook" => hook.name.clone(), "reason" => "unwritable")
                        .increment(1);
                    warn!(webhook = %hook.name, error = %e, "a webhook event could not be queued on disk");
                }
            }
            metrics::gauge!("relay_webhook_queue_depth", "webhook" => hook.name.clone()).set(queue.items.len() as f64);
            drop(queue);
            hook.wake.notify_one();
        }
    }
}

impl Hook {
    fn takes(&self, kind: &str) -> bool {
        self.events.as_ref().is_none_or(|e| e.iter().any(|k| k == kind))
    }
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
/// session's events one at a time and oldest first.
pub struct Deliverer {
    name: String,
    url: String,
    secret: Arc<[u8]>,
    queue: Arc<Mutex<Queue>>,
    wake: Arc<Notify>,
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
    /// Deliver until `shutdown`; what is left stays on disk for the next start.
    pub async fn run(self, shutdown: CancellationToken) {
        let mut flying: tokio::task::JoinSet<(Item, Result<(), String>)> = tokio::task::JoinSet::new();
        let mut in_flight: std::collections::HashSet<u64> = Default::default();
        let mut retries: std::collections::HashMap<u64, Retry> = Default::default();
        loop {
            let (starts, next_due) = self.pick(&in_flight, &retries, flying.len());
            for item in starts {
                let Some(body) = self.body(&item) else {
                    retries.remove(&item.seq);
                    continue;
                };
                in_flight.insert(item.seq);
                let post = post(self.client.clone(), self.url.clone(), Arc::clone(&self.secret), body);
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
                warn!(webhook = %self.name, "a webhook event was not delivered within webhook_delivery.retry_for_s: dropped");
                self.give_up(item, "expired");
                None
            }
            // A file cut short (a crash while writing) is not an event.
            Ok(body) if serde_json::from_slice::<serde::de::IgnoredAny>(&body).is_ok() => Some(body),
            Ok(_) => {
                warn!(webhook = %self.name, "a queued webhook event is not JSON: dropped");
                self.give_up(item, "unreadable");
                None
            }
            Err(e) => {
                warn!(webhook = %self.name, error = %e, "a queued webhook event could not be read: dropped");
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
                metrics::counter!("relay_webhook_delivered_total", "webhook" => self.name.clone()).increment(1);
                metrics::gauge!("relay_webhook_queue_depth", "webhook" => self.name.clone()).set(queue.len() as f64);
            }
            Err(why) => {
                let failures = retries.get(&item.seq).map_or(0, |r| r.failures).saturating_add(1);
                let wait = backoff(failures, self.max_backoff);
                metrics::counter!("relay_webhook_retries_total", "webhook" => self.name.clone()).increment(1);
                if failures == 1 || failures.is_power_of_two() {
                    warn!(webhook = %self.name, %why, failures, retry_in_s = wait.as_secs(), "webhook delivery failed; retrying");
                } else {
                    debug!(webhook = %self.name, %why, failures, "webhook delivery failed");
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

    fn give_up(&self, item: &Item, reason: &'static str) {
        let mut queue = lock(&self.queue);
        queue.remove(item);
        metrics::counter!("relay_webhook_dropped_total", "webhook" => self.name.clone(), "reason" => reason)
            .increment(1);
        metrics::gauge!("relay_webhook_queue_depth", "webhook" => self.name.clone()).set(queue.len() as f64);
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
        let (hooks, deliverers) = Webhooks::open(&hooks, &delivery).expect("open");
        for (session, n) in [("a", 1), ("b", 1), ("a", 2), ("b", 2)] {
            hooks.emit(session, SESSION_STARTED, serde_json::json!({ "n": n }));
        }
        let stop = CancellationToken::new();
        let tasks: Vec<_> = deliverers
            .into_iter()
            .map(|d| tokio::spawn(d.run(stop.clone())))
            .collect();
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while got.lock().map(|g| g.len()).unwrap_or(0) < 4 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        stop.cancel();
        for t in tasks {
            let _ = t.await;
        }
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
        assert!(lock(&hooks.hooks[0].queue).is_empty());
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
        let (hooks, deliverers) = Webhooks::open(&hooks, &delivery).expect("open");
        assert_eq!(deliverers.len(), 2);
        hooks.emit("s1", SESSION_STARTED, serde_json::json!({"worker": "w"}));
        hooks.emit("s1", SESSION_ENDED, serde_json::json!({"duration_s": 1.5}));
        let lens: Vec<usize> = hooks.hooks.iter().map(|h| lock(&h.queue).len()).collect();
        assert_eq!(lens, [2, 1]);
        let q = lock(&hooks.hooks[0].queue);
        let first: Value = serde_json::from_slice(&q.read(&q.head().expect("head")).expect("read")).expect("json");
        assert_eq!(first["type"], SESSION_STARTED);
        assert_eq!(first["session_id"], "s1");
        assert_eq!(first["data"]["worker"], "w");
        assert!(first["id"]
            .as_str()
            .is_some_and(|id| id.starts_with("evt_") && id.len() == 28));
        assert!(first["created_at"].as_str().is_some_and(|t| t.ends_with('Z')));
    }
}
