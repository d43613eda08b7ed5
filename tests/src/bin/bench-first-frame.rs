//! Connect → first frame in Chromium, on the customer's pages, before and after compat.js and
//! the SDK's audio warm-up, with a Rust receiver as the anchor in the same run.
//!
//! ```text
//! cargo run --release -p avatar-edge-tests --bin bench-first-frame -- [RUNS]
//! ```
//!
//! Real relay and worker processes on loopback (a loopback-only network namespace). The pages come
//! from the customer's own site, another origin ([`avatar_edge_tests::customer_site`]). Each run
//! is a fresh headless Chromium, a browser that has played no sound yet: a student's first visit.
//! "Connect" is a real click on the old page's Connect button (a second after its socket opened;
//! Chromium's default autoplay policy), and the SDK page's call of `connect()` on load. The anchor
//! is the Rust WebRTC receiver: socket connect (its offer made before) → first decoded frame, with
//! no browser in the way.

use avatar_edge_tests::cluster::Cluster;
use avatar_edge_tests::customer_site::{first_frame, CustomerSite, FirstFrame, Page};
use avatar_edge_tests::percentile;
use avatar_edge_tests::rtc_client::RtcClient;
use avatar_edge_tests::signaling::Signaling;
use std::time::{Duration, Instant};

fn main() {
    avatar_edge_tests::netns::reexec_isolated();
    let runs: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(5);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(runs.max(1)));
}

async fn run(runs: usize) {
    let cluster = Cluster::start().await;
    let site = CustomerSite::start(cluster.relay.http).await;
    let pages = [
        Page::OldFixedInline,
        Page::OldWithCompat,
        Page::Sdk { warm_audio: false },
        Page::Sdk { warm_audio: true },
    ];
    let mut rows = Vec::new();
    for page in pages {
        let mut timings = Vec::new();
        for _ in 0..runs {
            match first_frame(&site, page, false).await {
                Ok(t) => timings.push(t),
                Err(e) => eprintln!("{}: {e:#}", page.label()),
            }
        }
        rows.push((page.label(), timings));
    }
    let anchor = rust_receiver(&cluster, runs).await;

    println!();
    println!("Runs per page: {runs}, each a fresh headless Chromium; relay and worker processes on loopback.");
    println!();
    println!(
        "| page | runs | connect → first frame ms, min / median / max | each run | → answer ms (median) | → connected ms (median) |"
    );
    println!("|---|---:|---:|---|---:|---:|");
    for (label, timings) in &rows {
        row(label, timings, true);
    }
    row(
        "anchor: Rust receiver, socket connect → first decoded frame",
        &anchor,
        false,
    );
}

/// One line of the table; `connected`: whether the timings have a `connected` (the anchor's has
/// only the answer applied).
fn row(label: &str, timings: &[FirstFrame], connected: bool) {
    let sorted = |f: fn(&FirstFrame) -> f64| {
        let mut v: Vec<f64> = timings.iter().map(f).collect();
        v.sort_by(f64::total_cmp);
        v
    };
    let shown = sorted(|t| t.shown_ms);
    let each: Vec<String> = timings.iter().map(|t| format!("{:.0}", t.shown_ms)).collect();
    let connected = if connected {
        format!("{:.0}", percentile(&sorted(|t| t.connected_ms), 50.0))
    } else {
        "–".into()
    };
    println!(
        "| {label} | {} | {:.0} / **{:.0}** / {:.0} | {} | {:.0} | {connected} |",
        timings.len(),
        shown.first().copied().unwrap_or(f64::NAN),
        percentile(&shown, 50.0),
        shown.last().copied().unwrap_or(f64::NAN),
        each.join(", "),
        percentile(&sorted(|t| t.answer_ms), 50.0),
    );
}

/// The anchor: the same path without a browser (`connected_ms` holds the answer applied).
async fn rust_receiver(cluster: &Cluster, runs: usize) -> Vec<FirstFrame> {
    let mut out = Vec::new();
    for i in 0..runs {
        let client = RtcClient::new(true).await.expect("client");
        let offer = client.offer().await.expect("offer");
        let t0 = Instant::now();
        let mut sig = Signaling::connect(&cluster.ws_url(&format!("anchor-{i}")))
            .await
            .expect("ws");
        sig.send_offer(&offer, "avatar_tutor_13").await.expect("send");
        let answer = sig
            .wait_for("webrtc_answer", Duration::from_secs(10))
            .await
            .expect("answer");
        let answered = t0.elapsed();
        client
            .accept_answer(answer["sdp"].as_str().expect("sdp"))
            .await
            .expect("accept");
        let applied = t0.elapsed();
        let stats = client.wait_frames(1, Duration::from_secs(10)).await;
        let ms = |d: Duration| d.as_secs_f64() * 1000.0;
        if let Some(first) = stats.first_frame_at {
            out.push(FirstFrame {
                shown_ms: ms(first - t0),
                answer_ms: ms(answered),
                connected_ms: ms(applied),
            });
        }
        client.close().await;
        sig.close().await;
    }
    out
}
