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
//! `speech_ended` (`"spoke"` and `"audio_samples"` in the line). Meanwhile it samples the mean luma
//! of the built-in avatar's mouth in the playing video: `"mouth_idle"` before the question and
//! `"mouth_open_share"`, the share of samples while speaking at least 25 levels darker (open).
//!
//! With `PROBE_WATCH_MS=N` it keeps watching for N ms more after the frames arrived, polling the
//! decoded-frame count every 20 ms: `"max_gap_ms"` is the longest time the count stood still
//! (a stall at the receiver), and the line carries the receiver's loss, freeze and drop counters.

use avatar_edge_tests::cdp::Chromium;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

async fn probe(url: &str, frames: u64, flags: &[String], say: Option<&str>, watch: Duration) -> anyhow::Result<Value> {
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
    let (max_gap_ms, stats) = if watch.is_zero() {
        (None, stats)
    } else {
        let (gap, last) = watch_frames(&mut browser, watch).await?;
        (Some(gap), last)
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
        "remote_address": stats["remoteAddress"],
        "offer_to_answer_ms": stats["offerToAnswerMs"],
        "text_to_first_text_ms": browser.eval("window.avatarEdge.stats()").await.map(|s| s["textToFirstTextMs"].clone()).unwrap_or(Value::Null),
        "spoke": spoke.as_ref().map(|t| t.spoke),
        "audio_samples": spoke.as_ref().map(|t| t.audio_samples),
        "mouth_idle": spoke.as_ref().map(|t| t.mouth_idle),
        "mouth_open_share": spoke.as_ref().map(|t| t.mouth_open_share),
        "max_gap_ms": max_gap_ms,
        "frames_dropped": stats["framesDropped"],
        "freeze_count": stats["freezeCount"],
        "freezes_s": stats["totalFreezesDuration"],
        "packets_lost": stats["videoPacketsLost"],
        "nacks": stats["nackCount"],
    }))
}

/// Poll the decoded-frame count for `watch`; the longest time it stood still, and the last stats.
async fn watch_frames(browser: &mut Chromium, watch: Duration) -> anyhow::Result<(u64, Value)> {
    let end = Instant::now() + watch;
    let mut last_change = Instant::now();
    let mut last_count = 0;
    let mut max_gap = Duration::ZERO;
    let mut stats = Value::Null;
    while Instant::now() < end {
        stats = browser.eval("window.avatarEdge.stats()").await?;
        let count = stats["framesDecoded"].as_u64().unwrap_or(0);
        if count != last_count {
            last_count = count;
            last_change = Instant::now();
        }
        max_gap = max_gap.max(last_change.elapsed());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Ok((max_gap.as_millis() as u64, stats))
}

/// Mean luma of the built-in avatar's mouth in the playing video.
async fn mouth_luma(browser: &mut Chromium) -> anyhow::Result<f64> {
    let (x0, x1, y0, y1) = avatar_edge_tests::rtc_client::mouth_region();
    let js = format!(
        "(() => {{ const v = document.querySelector('video'); \
           const c = window.__probeCanvas || (window.__probeCanvas = document.createElement('canvas')); \
           c.width = 512; c.height = 512; const g = c.getContext('2d', {{ willReadFrequently: true }}); \
           g.drawImage(v, 0, 0, 512, 512); const d = g.getImageData({x0}, {y0}, {w}, {h}).data; \
           let s = 0; for (let i = 0; i < d.length; i += 4) s += 0.299 * d[i] + 0.587 * d[i + 1] + 0.114 * d[i + 2]; \
           return s / (d.length / 4); }})()",
        w = x1 - x0,
        h = y1 - y0,
    );
    Ok(browser.eval(&js).await?.as_f64().unwrap_or(0.0))
}

/// What `PROBE_SAY` found.
struct Talked {
    spoke: bool,
    audio_samples: f64,
    mouth_idle: f64,
    mouth_open_share: f64,
}

/// Type `text`, then wait for the answer to start, play a second of audio and end, sampling the
/// mouth meanwhile.
async fn talk(browser: &mut Chromium, text: &str) -> anyhow::Result<Talked> {
    let samples = |s: &Value| s["audioSamplesReceived"].as_f64().unwrap_or(0.0);
    let before = samples(&browser.eval("window.avatarEdge.stats()").await?);
    let mut idle = Vec::new();
    for _ in 0..5 {
        idle.push(mouth_luma(browser).await?);
        tokio::time::sleep(Duration::from_millis(40)).await;
    }
    let mouth_idle = idle.iter().sum::<f64>() / idle.len() as f64;
    let mut speaking_mouth = Vec::new();
    browser
        .eval(&format!("window.avatarEdge.say({})", Value::from(text)))
        .await?;
    let deadline = Instant::now() + Duration::from_secs(30);
    let (mut started, mut ended, mut after) = (false, false, before);
    while Instant::now() < deadline && !(started && ended) {
        let speaking = browser.eval("window.avatarEdge.state.speaking").await?;
        started |= !speaking.is_null();
        if !speaking.is_null() {
            speaking_mouth.push(mouth_luma(browser).await?);
        }
        after = samples(&browser.eval("window.avatarEdge.stats()").await?);
        ended = started && speaking.is_null();
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let open = speaking_mouth.iter().filter(|v| **v < mouth_idle - 25.0).count();
    Ok(Talked {
        spoke: started && ended && after >= before + 48_000.0,
        audio_samples: after - before,
        mouth_idle,
        mouth_open_share: open as f64 / speaking_mouth.len().max(1) as f64,
    })
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
    let watch = Duration::from_millis(
        std::env::var("PROBE_WATCH_MS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0),
    );
    let limit = Duration::from_secs(90) + watch;
    let line = match tokio::time::timeout(limit, probe(url, frames, &flags, say.as_deref(), watch)).await {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => json!({ "error": e.to_string() }),
        Err(_) => json!({ "error": "timed out after 90 s" }),
    };
    println!("{line}");
}
