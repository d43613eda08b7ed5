//! Headless Chromium with the web client, for network-namespace topologies: run inside the
//! "browser" namespace (the test starts it with `nsenter`, so Chromium and its DevTools port live
//! there), it opens the page, lets it connect, waits for FRAMES decoded frames and prints one JSON
//! line: frames decoded, the selected pair's candidate types and relay protocol, and the time from
//! the page's socket opening to its first decoded frame.
//!
//! ```text
//! chromium-probe PAGE_URL [FRAMES] [-- CHROMIUM_FLAG...]
//! ```
//!
//! With `PROBE_SAY=TEXT` in the environment it then types TEXT into the page and waits for the
//! avatar to answer: `speech_started`, the Opus track growing by a second of samples, and
//! `speech_ended` (`"spoke"` and `"audio_samples"` in the line).

use avatar_edge_tests::cdp::Chromium;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn probe(url: &str, frames: u64, flags: &[String], say: Option<&str>) -> anyhow::Result<Value> {
    let mut browser = Chromium::launch_with(url, flags).await?;
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let s = browser
            .eval("window.avatarEdge ? window.avatarEdge.state.wsState : 'loading'")
            .await?;
        if s == "open" {
            break;
        }
        anyhow::ensure!(Instant::now() < deadline, "the page's socket never opened ({s})");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let opened = Instant::now();
    let mut first_frame = None;
    let deadline = opened + Duration::from_secs(25);
    let stats = loop {
        let s = browser.eval("window.avatarEdge.stats()").await?;
        let decoded = s["framesDecoded"].as_u64().unwrap_or(0);
        if decoded > 0 && first_frame.is_none() {
            first_frame = Some(opened.elapsed().as_millis() as u64);
        }
        if decoded >= frames || Instant::now() > deadline {
            break s;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    };
    let spoke = match say {
        Some(text) => Some(talk(&mut browser, text).await?),
        None => None,
    };
    let events = browser
        .eval("JSON.stringify(window.avatarEdge.state.events.map(e => e.type))")
        .await
        .unwrap_or(Value::Null);
    Ok(json!({
        "frames": stats["framesDecoded"],
        "local": stats["localCandidateType"],
        "remote": stats["remoteCandidateType"],
        "relay_protocol": stats["localRelayProtocol"],
        "ice_state": stats["iceState"],
        "connect_to_first_frame_ms": first_frame,
        "events": events,
        "spoke": spoke.map(|(spoke, _)| spoke),
        "audio_samples": spoke.map(|(_, samples)| samples),
    }))
}

/// Type `text`, then wait for the answer to start, play a second of audio and end. Returns whether
/// all three happened, and the audio samples that arrived meanwhile.
async fn talk(browser: &mut Chromium, text: &str) -> anyhow::Result<(bool, f64)> {
    let samples = |s: &Value| s["audioSamplesReceived"].as_f64().unwrap_or(0.0);
    let before = samples(&browser.eval("window.avatarEdge.stats()").await?);
    browser
        .eval(&format!("window.avatarEdge.say({})", Value::from(text)))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut started, mut ended, mut after) = (false, false, before);
    while Instant::now() < deadline && !(started && ended) {
        let speaking = browser.eval("window.avatarEdge.state.speaking").await?;
        started |= !speaking.is_null();
        after = samples(&browser.eval("window.avatarEdge.stats()").await?);
        ended = started && speaking.is_null();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok((started && ended && after >= before + 48_000.0, after - before))
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(url) = args.get(1) else {
        eprintln!("usage: chromium-probe PAGE_URL [FRAMES]");
        std::process::exit(2);
    };
    let frames = args.get(2).and_then(|a| a.parse().ok()).unwrap_or(100);
    let flags: Vec<String> = args.iter().skip_while(|a| *a != "--").skip(1).cloned().collect();
    let say = std::env::var("PROBE_SAY").ok();
    let line = match tokio::time::timeout(Duration::from_secs(90), probe(url, frames, &flags, say.as_deref())).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => json!({ "error": e.to_string() }),
        Err(_) => json!({ "error": "timed out after 90 s" }),
    };
    println!("{line}");
}
