//! The session API against the browser's own message: how soon the avatar is heard.
//!
//! ```text
//! cargo run --release -p avatar-edge-tests --bin bench-api -- [ROUNDS]
//! ```
//!
//! Real relay and worker processes (built-in scripted language model, espeak-ng speech, the
//! built-in lip-sync) and a Rust WebRTC receiver that decodes the audio. Each round sends one
//! request and times it to the first loud audio packet at the receiver, then interrupts and
//! waits for quiet. Side by side, in the same session:
//!
//! * `text_webrtc` on the browser's socket (the anchor: the path the customer's page uses);
//! * `say` with `mode: chat`: the same text through the API, answered by the language model;
//! * `say` with `mode: repeat`: the same text spoken as given (no language model);
//! * `audio`, a WAV of the same text made by espeak-ng beforehand (no model, no speech
//!   synthesis), uploaded whole, and chunked in 200 ms pieces sent in real time (timed from
//!   the first piece).

use avatar_edge_tests::cluster::{http_request, http_upload, Cluster};
use avatar_edge_tests::signaling::Signaling;
use serde_json::json;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const KEY: &str = "bench-key-0123456789abcdef0123456789";
const TEXT: &str = "Plants turn sunlight into food.";
const SESSION: &str = "bench-api";

/// What one round sends.
#[derive(Clone, Copy)]
enum Ask {
    Text,
    SayChat,
    SayRepeat,
    AudioWhole,
    AudioChunked,
}

impl Ask {
    fn name(self) -> &'static str {
        match self {
            Ask::Text => "`text_webrtc` (browser socket, anchor)",
            Ask::SayChat => "API `say`, chat (language model)",
            Ask::SayRepeat => "API `say`, repeat (no model)",
            Ask::AudioWhole => "API `audio`, WAV uploaded whole",
            Ask::AudioChunked => "API `audio`, chunked 200 ms pieces",
        }
    }
}

async fn api(addr: SocketAddr, method: &str, path: &str, body: serde_json::Value) -> u16 {
    let auth = format!("Bearer {KEY}");
    let headers = [("Authorization", auth.as_str()), ("Content-Type", "application/json")];
    let body = body.to_string();
    http_request(addr, method, path, &headers, body.as_bytes())
        .await
        .map_or(0, |(status, _)| status)
}

fn espeak_wav(text: &str) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("speech.wav");
    let out = std::process::Command::new("espeak-ng")
        .args(["-s", "150", "-v", "en-us", "-w"])
        .arg(&path)
        .arg(text)
        .output()
        .expect("espeak-ng (scripts/install-deps)");
    assert!(out.status.success(), "espeak-ng failed");
    std::fs::read(&path).expect("the WAV")
}

fn percentiles(v: &[f64]) -> (String, String) {
    if v.is_empty() {
        return ("n/a".into(), "n/a".into());
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let at = |q: f64| s[((s.len() - 1) as f64 * q).round() as usize];
    (format!("{:.0}", at(0.5)), format!("{:.0}", at(0.95)))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let rounds: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(8);
    let keys = format!("[[api.keys]]\nname = \"bench\"\nkey = \"{KEY}\"\n");
    let mut cluster = Cluster::relay_only(&keys).await;
    cluster.add_worker("bench-api", 2, "").await;
    let addr = cluster.relay.http;
    let mut sig = Signaling::connect(&cluster.ws_url(SESSION)).await.expect("ws");
    let client = avatar_edge_tests::play(&mut sig, "avatar_tutor_13")
        .await
        .expect("play");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let wav = espeak_wav(TEXT);
    // 200 ms of 22,050 Hz 16-bit mono per piece, after the 44-byte header.
    let pieces: Vec<&[u8]> = wav.chunks(8_820).collect();
    let asks = [
        Ask::Text,
        Ask::SayChat,
        Ask::SayRepeat,
        Ask::AudioWhole,
        Ask::AudioChunked,
    ];
    let mut results: Vec<Vec<f64>> = vec![Vec::new(); asks.len()];
    let mut failures = vec![0usize; asks.len()];
    let say = format!("/api/v1/sessions/{SESSION}/say");
    let audio = format!("/api/v1/sessions/{SESSION}/audio");
    for _ in 0..rounds {
        // Interleaved, so that a slow moment of the machine falls on every kind alike.
        for (i, ask) in asks.iter().enumerate() {
            let t0 = Instant::now();
            let sent = match ask {
                Ask::Text => sig
                    .send_json(&json!({"type": "text_webrtc", "message": TEXT}))
                    .await
                    .is_ok(),
                Ask::SayChat => api(addr, "POST", &say, json!({"text": TEXT, "mode": "chat"})).await == 202,
                Ask::SayRepeat => api(addr, "POST", &say, json!({"text": TEXT})).await == 202,
                Ask::AudioWhole | Ask::AudioChunked => {
                    let (owned, gap): (Vec<Vec<u8>>, _) = match ask {
                        Ask::AudioWhole => (vec![wav.clone()], Duration::ZERO),
                        _ => (pieces.iter().map(|p| p.to_vec()).collect(), Duration::from_millis(200)),
                    };
                    let path = audio.clone();
                    let upload = tokio::spawn(async move {
                        let auth = format!("Bearer {KEY}");
                        let headers = [("Authorization", auth.as_str()), ("Content-Type", "audio/wav")];
                        let pieces: Vec<&[u8]> = owned.iter().map(Vec::as_slice).collect();
                        http_upload(addr, &path, &headers, &pieces, gap).await.0
                    });
                    // The upload runs on; speech_started says it plays.
                    let started = sig.wait_for("speech_started", Duration::from_secs(10)).await.is_ok();
                    let status = upload.await.unwrap_or(0);
                    started && status == 202
                }
            };
            let started = match ask {
                Ask::AudioWhole | Ask::AudioChunked => sent,
                _ => sent && sig.wait_for("speech_started", Duration::from_secs(10)).await.is_ok(),
            };
            tokio::time::sleep(Duration::from_millis(600)).await;
            let heard = client
                .snapshot()
                .audio
                .iter()
                .find(|(t, v)| *t >= t0 && *v > 0.02)
                .map(|(t, _)| t.duration_since(t0).as_secs_f64() * 1000.0);
            match (started, heard) {
                (true, Some(ms)) => results[i].push(ms),
                _ => failures[i] += 1,
            }
            let _ = api(
                addr,
                "POST",
                &format!("/api/v1/sessions/{SESSION}/interrupt"),
                json!({}),
            )
            .await;
            let _ = sig.wait_for("speech_ended", Duration::from_secs(10)).await;
            tokio::time::sleep(Duration::from_millis(400)).await;
        }
    }
    println!(
        "bench-api: request → first loud audio at a WebRTC receiver, ms; {rounds} rounds each, interleaved; \
         built-in LLM, espeak-ng, built-in lip-sync; text: {TEXT:?}\n"
    );
    println!("| request | p50 | p95 | rounds | failed |");
    println!("|---|---:|---:|---:|---:|");
    for (i, ask) in asks.iter().enumerate() {
        let (p50, p95) = percentiles(&results[i]);
        println!(
            "| {} | {p50} | {p95} | {} | {} |",
            ask.name(),
            results[i].len(),
            failures[i]
        );
    }
    client.close().await;
    sig.close().await;
}
