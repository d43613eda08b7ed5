//! The tunnel's transports compared: QUIC (UDP) against TLS/TCP with media through the relay's
//! TURN reached through the tunnel (a GPU box whose network blocks UDP).
//!
//! ```text
//! bench-transport [WATCH_SECONDS]
//! ```
//!
//! The namespace topology of the tests (`topology.rs`): relay on 203.0.113.1, the worker behind
//! its NAT, headless Chromium behind the other. For each transport, on a clean link and with 1%
//! of the packets through the worker's NAT dropped each way, it plays one session of
//! 512×512 H.264 at 2 Mbit/s and prints one table: the page's offer → answer and text → first
//! answer text (browser → relay → worker and back), socket open → first frame, and over
//! WATCH_SECONDS (default 20) of play the frames decoded against the 25 fps due, the receiver's
//! freezes, its longest stall, packets lost and NACKs sent. The QUIC rows are the anchor.
//!
//! The loss comes from iptables' `statistic` match, not `tc netem`: the kernels of the CI machines
//! have no netem module. It drops whole packets at random, as netem's `loss` does.

use avatar_edge_tests::cluster::wait_for_count;
use avatar_edge_tests::topology::{public_relay, spawn_gpu_worker, Topology, PUBLIC};
use serde_json::Value;
use std::time::Duration;

struct Row {
    transport: &'static str,
    link: &'static str,
    report: Value,
}

fn main() {
    avatar_edge_tests::netns::reexec_isolated();
    let watch_s: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(20);
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let mut rows = Vec::new();
    for (transport, block_udp) in [("quic", false), ("tcp", true)] {
        for (link, loss) in [("clean", false), ("1% loss each way", true)] {
            let report = rt.block_on(run(transport, block_udp, loss, watch_s));
            eprintln!("{transport} / {link}: {report}");
            rows.push(Row {
                transport,
                link,
                report,
            });
        }
    }
    print_table(&rows, watch_s);
}

async fn run(transport: &str, block_udp: bool, loss: bool, watch_s: u64) -> Value {
    let topo = std::sync::Arc::new(Topology::new(false, false));
    if block_udp {
        topo.block_worker_udp(&[(PUBLIC, 443)]);
    }
    let mut cluster = public_relay().await;
    let log = spawn_gpu_worker(&mut cluster, &topo, &format!("transport = \"{transport}\""));
    if wait_for_count(
        &log,
        &format!("registered with relay over {transport}"),
        1,
        Duration::from_secs(20),
    )
    .await
    .is_none()
    {
        return serde_json::json!({ "error": format!("the worker never registered over {transport}") });
    }
    if loss {
        // Everything the worker's NAT forwards, both ways: tunnel, TURN and media alike.
        topo.worker_nat_sh("iptables -I FORWARD 1 -m statistic --mode random --probability 0.01 -j DROP");
    }
    let url = format!("https://{PUBLIC}/?autoconnect=1&avatar=avatar_tutor_13");
    let env = [
        ("PROBE_WATCH_MS", (watch_s * 1000).to_string()),
        ("PROBE_SAY", "hello".to_owned()),
    ];
    let topo2 = std::sync::Arc::clone(&topo);
    let report = tokio::task::spawn_blocking(move || topo2.chromium_probe(&url, 25, &env))
        .await
        .unwrap_or(Value::Null);
    drop(cluster);
    report
}

fn num(v: &Value) -> String {
    match v.as_f64() {
        Some(x) => format!("{x:.0}"),
        None => "–".into(),
    }
}

fn print_table(rows: &[Row], watch_s: u64) {
    let due = watch_s * 25;
    println!("\nTunnel transports: one session, 512×512 H.264 at 2 Mbit/s, {watch_s} s watched ({due} frames due)\n");
    println!(
        "| transport | link | offer → answer ms | text → first text ms | open → first frame ms | frames decoded / due | freezes | freeze s | longest stall ms | packets lost | NACKs |"
    );
    println!("|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        let v = &r.report;
        if let Some(e) = v.get("error") {
            println!("| {} | {} | error: {e} |", r.transport, r.link);
            continue;
        }
        // Frames decoded during the watch: the total minus the 25 the probe waited for first.
        let watched = v["frames"].as_u64().map(|f| f.saturating_sub(25));
        println!(
            "| {} | {} | {} | {} | {} | {} / {due} | {} | {:.2} | {} | {} | {} |",
            r.transport,
            r.link,
            num(&v["offer_to_answer_ms"]),
            num(&v["text_to_first_text_ms"]),
            num(&v["connect_to_first_frame_ms"]),
            watched.map_or("–".into(), |w| w.to_string()),
            num(&v["freeze_count"]),
            v["freezes_s"].as_f64().unwrap_or(0.0),
            num(&v["max_gap_ms"]),
            num(&v["packets_lost"]),
            num(&v["nacks"]),
        );
    }
}
