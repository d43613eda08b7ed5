//! A real HTTP server speaking the OpenAI-compatible APIs the worker can use, for tests:
//! `POST /v1/chat/completions` with `stream: true` (server-sent events),
//! `POST /v1/audio/speech` (a WAV file) and `POST /v1/audio/transcriptions` (multipart in, JSON out). It stands in for a hosted LLM and TTS, which cannot run
//! here. What it does depends on the words in the request, so one session can meet every case:
//!
//! * a user message containing `FAIL` → HTTP 500; `HANG` → headers, then silence forever;
//! * otherwise it streams `Sure. You asked: <message>. Here is my answer, BADTTS/SLOWTTS if asked.`
//!   in small deltas;
//! * speech for text containing `BADTTS` → HTTP 500; `SLOWTTS` → never answers; `HUGETTS` → 40 MiB;
//!   otherwise a
//!   voiced, loud 24 kHz WAV (a 125 Hz harmonic buzz with a syllable envelope) of ~60 ms per char;
//! * transcriptions go by their order, so one session meets each failure: the first gets HTTP 500,
//!   the second never an answer, every later one `{"text": "hello after the failures"}`.

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::{Json, Router};
use serde_json::Value;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// What the server saw.
#[derive(Debug, Default, Clone)]
pub struct Seen {
    pub chat_requests: Vec<Value>,
    pub speech_requests: Vec<Value>,
    /// Body sizes of the transcription requests (each a multipart form with a WAV file).
    pub transcriptions: Vec<usize>,
    pub authorization: Vec<String>,
    /// Skip the two failing transcriptions ([`OpenAiServer::recognise_at_once`]).
    pub recognise_at_once: bool,
}

pub struct OpenAiServer {
    pub addr: SocketAddr,
    pub seen: Arc<Mutex<Seen>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for OpenAiServer {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl OpenAiServer {
    pub async fn start() -> Self {
        let seen = Arc::new(Mutex::new(Seen::default()));
        let app = Router::new()
            .route("/v1/chat/completions", post(chat))
            .route("/v1/audio/speech", post(speech))
            .route("/v1/audio/transcriptions", post(transcription))
            .with_state(Arc::clone(&seen));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let task = tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
        Self { addr, seen, task }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// Every transcription answers `{"text": "hello after the failures"}`, the first too.
    pub fn recognise_at_once(&self) {
        self.seen.lock().expect("seen").recognise_at_once = true;
    }

    pub fn seen(&self) -> Seen {
        self.seen.lock().expect("seen").clone()
    }
}

fn record(seen: &Mutex<Seen>, headers: &HeaderMap) {
    if let Some(a) = headers.get("authorization").and_then(|v| v.to_str().ok()) {
        seen.lock().expect("seen").authorization.push(a.to_owned());
    }
}

async fn chat(State(seen): State<Arc<Mutex<Seen>>>, headers: HeaderMap, Json(req): Json<Value>) -> Response {
    record(&seen, &headers);
    seen.lock().expect("seen").chat_requests.push(req.clone());
    let user = req["messages"]
        .as_array()
        .and_then(|m| m.iter().rev().find(|m| m["role"] == "user"))
        .and_then(|m| m["content"].as_str())
        .unwrap_or_default()
        .to_owned();
    if user.contains("FAIL") {
        return (
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"error":{"message":"model overloaded"}}"#,
        )
            .into_response();
    }
    let hang = user.contains("HANG");
    let mut answer = format!("Sure. You asked: {user}. Here is my answer.");
    for word in ["BADTTS", "SLOWTTS", "HUGETTS"] {
        if user.contains(word) {
            answer = format!("Sure. Now {word} speaks.");
        }
    }
    let words: Vec<String> = answer.split_inclusive(' ').map(str::to_owned).collect();
    let stream = futures::stream::unfold((0usize, words, hang), |(i, words, hang)| async move {
        if hang {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            return None;
        }
        tokio::time::sleep(Duration::from_millis(15)).await;
        let event = match i.cmp(&words.len()) {
            std::cmp::Ordering::Less => {
                let chunk = serde_json::json!({
                    "id": "chatcmpl-test", "object": "chat.completion.chunk",
                    "choices": [{"index": 0, "delta": {"content": words[i]}, "finish_reason": null}],
                });
                format!("data: {chunk}\n\n")
            }
            std::cmp::Ordering::Equal => "data: [DONE]\n\n".to_owned(),
            std::cmp::Ordering::Greater => return None,
        };
        Some((Ok::<_, std::io::Error>(event), (i + 1, words, hang)))
    });
    Response::builder()
        .header("content-type", "text/event-stream")
        .body(Body::from_stream(stream))
        .unwrap_or_else(|_| StatusCode::INTERNAL_SERVER_ERROR.into_response())
}

async fn transcription(State(seen): State<Arc<Mutex<Seen>>>, headers: HeaderMap, body: axum::body::Bytes) -> Response {
    record(&seen, &headers);
    let text = String::from_utf8_lossy(&body);
    if !(text.contains("name=\"file\"") && text.contains("RIFF")) {
        return (StatusCode::BAD_REQUEST, r#"{"error":{"message":"no WAV file"}}"#).into_response();
    }
    let n = {
        let mut seen = seen.lock().expect("seen");
        seen.transcriptions.push(body.len());
        seen.transcriptions.len() + if seen.recognise_at_once { 2 } else { 0 }
    };
    match n {
        1 => (
            StatusCode::INTERNAL_SERVER_ERROR,
            r#"{"error":{"message":"recogniser crashed"}}"#,
        )
            .into_response(),
        2 => {
            tokio::time::sleep(Duration::from_secs(3600)).await;
            StatusCode::GATEWAY_TIMEOUT.into_response()
        }
        _ => Json(serde_json::json!({"text": "hello after the failures"})).into_response(),
    }
}

async fn speech(State(seen): State<Arc<Mutex<Seen>>>, headers: HeaderMap, Json(req): Json<Value>) -> Response {
    record(&seen, &headers);
    seen.lock().expect("seen").speech_requests.push(req.clone());
    let text = req["input"].as_str().unwrap_or_default().to_owned();
    if text.contains("BADTTS") {
        return (StatusCode::INTERNAL_SERVER_ERROR, "voice unavailable").into_response();
    }
    if text.contains("SLOWTTS") {
        tokio::time::sleep(Duration::from_secs(3600)).await;
    }
    if text.contains("HUGETTS") {
        return ([("content-type", "audio/wav")], vec![0u8; 40 << 20]).into_response();
    }
    let rate = 24_000u32;
    let n = (text.chars().count() as f32 * 0.06 * rate as f32) as usize;
    let mut wav = Vec::with_capacity(44 + 2 * n);
    wav.extend_from_slice(b"RIFF");
    wav.extend_from_slice(&(36 + 2 * n as u32).to_le_bytes());
    wav.extend_from_slice(b"WAVEfmt ");
    wav.extend_from_slice(&16u32.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes());
    wav.extend_from_slice(&1u16.to_le_bytes());
    wav.extend_from_slice(&rate.to_le_bytes());
    wav.extend_from_slice(&(rate * 2).to_le_bytes());
    wav.extend_from_slice(&2u16.to_le_bytes());
    wav.extend_from_slice(&16u16.to_le_bytes());
    wav.extend_from_slice(b"data");
    wav.extend_from_slice(&(2 * n as u32).to_le_bytes());
    for i in 0..n {
        let t = i as f32 / rate as f32;
        let syllable = (std::f32::consts::PI * t * 4.0).sin().abs(); // 4 syllables a second
                                                                     // A buzz rich in harmonics up to ~5 kHz, like a voice (a pure tone would barely register
                                                                     // in the upper mel bands).
        let voiced: f32 = (1..40)
            .map(|k| (std::f32::consts::TAU * 125.0 * k as f32 * t).sin() / (k as f32).sqrt())
            .sum::<f32>()
            / 8.0;
        let v = (0.4 * syllable * voiced * 32767.0).clamp(-32767.0, 32767.0) as i16;
        wav.extend_from_slice(&v.to_le_bytes());
    }
    ([("content-type", "audio/wav")], wav).into_response()
}
