//! A webhook receiver for tests: a real HTTP server that checks every POST's
//! `Avatar-Edge-Signature` the way the docs tell operators to (HMAC-SHA256 over `"<t>.<raw body>"`
//! with the shared secret, `t` no older than five minutes), and keeps each event it accepted.
//!
//! Its [`Mode`] can change at any time: answering 200, answering 503 (down), or never answering.

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::Router;
use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// How the receiver answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Up,
    /// 503 to everything.
    Down,
    /// Never answers.
    Hang,
}

#[derive(Default)]
struct Inner {
    mode: Option<Mode>,
    /// Events accepted (200), in arrival order.
    events: Vec<Value>,
    /// POSTs of any outcome.
    posts: usize,
    /// POSTs whose signature did not verify (never accepted).
    bad_signatures: usize,
}

pub struct WebhookReceiver {
    pub addr: SocketAddr,
    secret: String,
    inner: Arc<Mutex<Inner>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for WebhookReceiver {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Whether `header` signs `body` with `secret`, made within five minutes of now.
pub fn verify(secret: &str, header: &str, body: &[u8]) -> bool {
    let mut t = None;
    let mut v1 = None;
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", value)) => t = value.parse::<u64>().ok(),
            Some(("v1", value)) => v1 = hex::decode(value).ok(),
            _ => {}
        }
    }
    let (Some(t), Some(v1)) = (t, v1) else { return false };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    if now.abs_diff(t) > 300 {
        return false;
    }
    let Ok(mut mac) = Hmac::<Sha256>::new_from_slice(secret.as_bytes()) else {
        return false;
    };
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    mac.verify_slice(&v1).is_ok()
}

impl WebhookReceiver {
    pub async fn start(secret: &str, mode: Mode) -> Self {
        let inner = Arc::new(Mutex::new(Inner {
            mode: Some(mode),
            ..Default::default()
        }));
        let state = (secret.to_owned(), Arc::clone(&inner));
        let app = Router::new().route("/events", post(receive)).with_state(state);
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self {
            addr,
            secret: secret.to_owned(),
            inner,
            task,
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}/events", self.addr)
    }

    /// `[[webhooks]]` and `[webhook_delivery]` for a relay, queueing in `dir`.
    pub fn relay_toml(&self, dir: &std::path::Path, delivery: &str) -> String {
        format!(
            "[[webhooks]]\nurl = \"{}\"\nsecret = \"{}\"\n[webhook_delivery]\ndir = \"{}\"\n{delivery}\n",
            self.url(),
            self.secret,
            dir.display()
        )
    }

    pub fn set_mode(&self, mode: Mode) {
        self.lock().mode = Some(mode);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The events accepted so far.
    pub fn events(&self) -> Vec<Value> {
        self.lock().events.clone()
    }

    pub fn posts(&self) -> usize {
        self.lock().posts
    }

    pub fn bad_signatures(&self) -> usize {
        self.lock().bad_signatures
    }

    /// Wait until an accepted event satisfies `done` (the events so far), up to `timeout`.
    pub async fn wait_until(&self, timeout: Duration, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let events = self.events();
            if done(&events) || tokio::time::Instant::now() >= deadline {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

async fn receive(
    State((secret, inner)): State<(String, Arc<Mutex<Inner>>)>,
    headers: HeaderMap,
    body: Bytes,
) -> StatusCode {
    let mode = {
        let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.posts += 1;
        inner.mode.unwrap_or(Mode::Up)
    };
    match mode {
        Mode::Down => return StatusCode::SERVICE_UNAVAILABLE,
        Mode::Hang => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return StatusCode::GATEWAY_TIMEOUT;
        }
        Mode::Up => {}
    }
    let signature = headers
        .get("avatar-edge-signature")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default();
    let mut inner = inner.lock().unwrap_or_else(|e| e.into_inner());
    if !verify(&secret, signature, &body) {
        inner.bad_signatures += 1;
        return StatusCode::UNAUTHORIZED;
    }
    match serde_json::from_slice::<Value>(&body) {
        Ok(event) => {
            inner.events.push(event);
            StatusCode::OK
        }
        Err(_) => StatusCode::BAD_REQUEST,
    }
}
