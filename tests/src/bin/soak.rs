//! Soak: many concurrent sessions for a long time, with real processes on loopback.
//!
//! ```text
//! cargo run --release -p avatar-edge-tests --bin soak -- [SESSIONS] [MINUTES]   (default 10 10)
//! ```
//!
//! Prints the resident memory of relay and worker at the start and the end, frames decoded by the
//! receivers, and the worker's late and dropped frame counters. Not part of CI (it takes minutes).

use avatar_edge_tests::cluster::{http_get, Cluster};
use avatar_edge_tests::rtc_client::RtcClient;
use avatar_edge_tests::signaling::Signaling;
use std::time::{Duration, Instant};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines().find_map(|l| {
                l.strip_prefix("VmRSS:")
                    .map(|v| v.trim().trim_end_matches(" kB").trim().to_owned())
            })
        })
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

async fn worker_metric(name: &str) -> f64 {
    let addr = "127.0.0.1:9464".parse().expect("addr");
    let (_, body) = http_get(addr, "/metrics").await.unwrap_or_default();
    body.lines()
        .find_map(|l| l.strip_prefix(name).and_then(|v| v.trim().parse().ok()))
        .unwrap_or(0.0)
}

fn main() {
    avatar_edge_tests::netns::reexec_isolated();
    let mut args = std::env::args().skip(1);
    let sessions: usize = args.next().and_then(|s| s.parse().ok()).unwrap_or(10);
    let minutes: u64 = args.next().and_then(|s| s.parse().ok()).unwrap_or(10);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(sessions, Duration::from_secs(minutes * 60)));
}

async fn run(sessions: usize, length: Duration) {
    let mut cluster = Cluster::relay_sections(
        "[limits]\nmax_session_ms = 86400000\nsockets_per_ip = 0",
        "max_connections_per_ip = 0",
        "",
        false,
    )
    .await;
    // Fixed port: this runs alone in its own network namespace.
    cluster
        .add_worker("soak-worker", sessions as u32, "metrics_listen = \"127.0.0.1:9464\"")
        .await;
    let (relay_pid, worker_pid) = (cluster.relay.child.id(), cluster.workers[0].child.id());
    let mut live = Vec::new();
    for i in 0..sessions {
        let mut sig = Signaling::connect(&cluster.ws_url(&format!("soak-{i}")))
            .await
            .expect("ws");
        let client = RtcClient::new(true).await.expect("client");
        sig.send_offer(&client.offer().await.expect("offer"), "a")
            .await
            .expect("send");
        let answer = sig
            .wait_for("webrtc_answer", Duration::from_secs(10))
            .await
            .expect("answer");
        client
            .accept_answer(answer["sdp"].as_str().expect("sdp"))
            .await
            .expect("accept");
        live.push((sig, client));
    }
    tokio::time::sleep(Duration::from_secs(5)).await;
    let start = (rss_kib(relay_pid), rss_kib(worker_pid));
    let late0 = worker_metric("worker_frames_late_total ").await;
    let sent0 = worker_metric("worker_frames_sent_total ").await;
    let began = Instant::now();
    while began.elapsed() < length {
        tokio::time::sleep(Duration::from_secs(30)).await;
        let decoded: u64 = live.iter().map(|(_, c)| c.snapshot().frames_decoded).sum();
        eprintln!(
            "{:>4} s: decoded {decoded}, relay {} KiB, worker {} KiB",
            began.elapsed().as_secs(),
            rss_kib(relay_pid),
            rss_kib(worker_pid)
        );
    }
    let end = (rss_kib(relay_pid), rss_kib(worker_pid));
    let late = worker_metric("worker_frames_late_total ").await - late0;
    let sent = worker_metric("worker_frames_sent_total ").await - sent0;
    let dropped = worker_metric("worker_frames_dropped_total ").await;
    let decoded: Vec<u64> = live.iter().map(|(_, c)| c.snapshot().frames_decoded).collect();
    let secs = began.elapsed().as_secs_f64();
    println!();
    println!(
        "Soak: {sessions} sessions × {:.1} min, loopback-only namespace, 2 cores, release build.",
        secs / 60.0
    );
    println!();
    println!("| measure | start | end |");
    println!("|---|---|---|");
    println!(
        "| relay RSS (MiB) | {:.1} | {:.1} |",
        start.0 as f64 / 1024.0,
        end.0 as f64 / 1024.0
    );
    println!(
        "| worker RSS (MiB) | {:.1} | {:.1} |",
        start.1 as f64 / 1024.0,
        end.1 as f64 / 1024.0
    );
    println!();
    println!("| measure | value |");
    println!("|---|---|");
    println!(
        "| frames sent by the worker during the soak | {sent:.0} (expected ≈ {:.0}) |",
        sessions as f64 * 25.0 * secs
    );
    println!("| late frames (clock fell behind) | {late:.0} |");
    println!("| frames dropped (writer lagged) | {dropped:.0} |");
    println!(
        "| frames decoded per session, min / max | {} / {} |",
        decoded.iter().min().unwrap_or(&0),
        decoded.iter().max().unwrap_or(&0)
    );
    for (sig, client) in live {
        client.close().await;
        sig.close().await;
    }
}
