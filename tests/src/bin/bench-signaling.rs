//! Signaling and start-up latency over many sessions, on loopback, with real processes.
//!
//! ```text
//! cargo run --release -p avatar-edge-tests --bin bench-signaling -- [SESSIONS]
//! ```
//!
//! For each session: open the WebSocket, send an offer, wait for the answer, connect, wait for the
//! first decoded frame, measure one pure signaling round trip (an empty `text_webrtc` the worker
//! refuses with an error event), close. Separately, the worker's own answer logic is timed in-process
//! with the same offer (the anchor: what answering costs without relay and tunnel). Prints a table.

use avatar_edge_tests::cluster::Cluster;
use avatar_edge_tests::percentile;
use avatar_edge_tests::rtc_client::RtcClient;
use avatar_edge_tests::signaling::Signaling;
use avatar_worker::rtc::{RtcEngine, RtcSettings};
use std::time::{Duration, Instant};

struct Series {
    name: &'static str,
    ms: Vec<f64>,
}

impl Series {
    fn new(name: &'static str) -> Self {
        Self { name, ms: Vec::new() }
    }
    fn push(&mut self, d: Duration) {
        self.ms.push(d.as_secs_f64() * 1000.0);
    }
    fn row(&mut self) -> (f64, f64) {
        self.ms.sort_by(f64::total_cmp);
        let (p50, p99) = (percentile(&self.ms, 50.0), percentile(&self.ms, 99.0));
        let mean = self.ms.iter().sum::<f64>() / self.ms.len().max(1) as f64;
        println!(
            "| {:<46} | {:>5} | {:>8.2} | {:>8.2} | {:>8.2} |",
            self.name,
            self.ms.len(),
            p50,
            p99,
            mean
        );
        (p50, p99)
    }
}

fn main() {
    avatar_edge_tests::netns::reexec_isolated();
    let sessions: usize = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(200);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(run(sessions));
}

async fn run(sessions: usize) {
    // Hundreds of connections from one address: lift the per-IP connection limit.
    let mut cluster = Cluster::relay_sections(
        "[limits]\nconnections_per_ip_per_minute = 0\nsockets_per_ip = 0",
        "max_connections_per_ip = 0",
        "",
        false,
    )
    .await;
    cluster.add_worker("bench-worker", 16, "").await;

    let mut open_to_answer = Series::new("WebSocket open → webrtc_answer");
    let mut offer_to_answer = Series::new("offer → answer, via relay + tunnel");
    let mut answer_to_frame = Series::new("answer → first decoded frame");
    let mut rtt = Series::new("signaling round trip, via relay + tunnel");
    let mut direct = Series::new("offer → answer, worker logic in-process");

    for i in 0..sessions {
        let client = RtcClient::new(true).await.expect("client");
        let offer = client.offer().await.expect("offer");
        let t0 = Instant::now();
        let mut sig = Signaling::connect(&cluster.ws_url(&format!("bench-{i}")))
            .await
            .expect("ws");
        let t1 = Instant::now();
        sig.send_offer(&offer, "avatar_tutor_13").await.expect("send");
        let answer = sig
            .wait_for("webrtc_answer", Duration::from_secs(10))
            .await
            .expect("answer");
        let t2 = Instant::now();
        open_to_answer.push(t2 - t0);
        offer_to_answer.push(t2 - t1);
        client
            .accept_answer(answer["sdp"].as_str().expect("sdp"))
            .await
            .expect("accept");
        let stats = client.wait_frames(1, Duration::from_secs(10)).await;
        let first = stats.first_frame_at.expect("a frame was decoded");
        answer_to_frame.push(first - t2);
        let t3 = Instant::now();
        sig.send_text(r#"{"type":"text_webrtc","message":""}"#)
            .await
            .expect("send");
        sig.wait_for("error", Duration::from_secs(5)).await.expect("event");
        rtt.push(t3.elapsed());
        client.close().await;
        sig.close().await;
    }

    // The anchor: the worker's answer logic, called directly with the same kind of offer.
    let engine = RtcEngine::new(&RtcSettings {
        include_loopback: true,
        ..RtcSettings::default()
    })
    .expect("engine");
    for _ in 0..sessions {
        let client = RtcClient::new(true).await.expect("client");
        let offer = client.offer().await.expect("offer");
        let t = Instant::now();
        let answer = engine.answer(offer, &[]).await.expect("answer");
        direct.push(t.elapsed());
        answer.peer.close().await;
        client.close().await;
    }

    println!();
    println!("Sessions: {sessions}, loopback-only network namespace, 2 cores, release build.");
    println!();
    println!(
        "| {:<46} | {:>5} | {:>8} | {:>8} | {:>8} |",
        "metric", "n", "p50 ms", "p99 ms", "mean ms"
    );
    println!("|{:-<48}|{:-<7}|{:-<10}|{:-<10}|{:-<10}|", "", "", "", "", "");
    open_to_answer.row();
    let (relay_p50, relay_p99) = offer_to_answer.row();
    let (direct_p50, direct_p99) = direct.row();
    answer_to_frame.row();
    rtt.row();
    println!();
    println!(
        "relay + tunnel overhead on offer → answer: p50 +{:.2} ms ({:.2}×), p99 +{:.2} ms",
        relay_p50 - direct_p50,
        relay_p50 / direct_p50,
        relay_p99 - direct_p99
    );
    drop(cluster);
}
