//! What an idle signaling socket costs the relay: resident memory per open WebSocket, and the
//! connect time (TCP, HTTP upgrade) while thousands are opened.
//!
//! ```text
//! bench-sockets [COUNTS...]        (default: 1000 5000)
//! ```
//!
//! For each count, a fresh relay (per-address limits lifted: every socket comes from 127.0.0.1)
//! takes that many WebSockets, opened 100 at a time and then left idle; the table gives the
//! relay's RSS growth divided by the count, and connect p50/p99. The anchor is the relay's RSS
//! before the first socket, in the same run. The process's descriptor limit bounds the count
//! (both ends of every socket live on this machine).

use avatar_edge_tests::cluster::Cluster;
use std::time::{Duration, Instant};

fn rss_kib(pid: u32) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.split_whitespace().next())
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

struct Row {
    count: usize,
    opened: usize,
    base_kib: u64,
    per_socket_kib: f64,
    p50_ms: f64,
    p99_ms: f64,
}

async fn measure(count: usize) -> Row {
    let cluster = Cluster::relay_sections(
        "[limits]\nconnections_per_ip_per_minute = 0\nsockets_per_ip = 0\nidle_timeout_ms = 600000",
        "max_connections_per_ip = 0",
        "",
        false,
    )
    .await;
    let pid = cluster.relay.child.id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base_kib = rss_kib(pid);
    let mut held = Vec::with_capacity(count);
    let mut connect_ms = Vec::with_capacity(count);
    let mut n = 0;
    while n < count {
        let batch: Vec<_> = (n..(n + 100).min(count))
            .map(|i| {
                let url = cluster.ws_url(&format!("idle-{i}"));
                tokio::spawn(async move {
                    let started = Instant::now();
                    let ws = tokio_tungstenite::connect_async(url).await.ok()?;
                    Some((ws.0, started.elapsed()))
                })
            })
            .collect();
        for task in batch {
            if let Ok(Some((ws, took))) = task.await {
                connect_ms.push(took.as_secs_f64() * 1000.0);
                held.push(ws);
            }
        }
        n += 100;
    }
    // Let the relay settle (its sessions send their first events and wait).
    tokio::time::sleep(Duration::from_secs(1)).await;
    let after = rss_kib(pid);
    connect_ms.sort_by(f64::total_cmp);
    let opened = held.len();
    drop(held);
    Row {
        count,
        opened,
        base_kib,
        per_socket_kib: after.saturating_sub(base_kib) as f64 / opened.max(1) as f64,
        p50_ms: percentile(&connect_ms, 50.0),
        p99_ms: percentile(&connect_ms, 99.0),
    }
}

fn main() {
    avatar_edge_tests::netns::reexec_isolated();
    let counts: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let counts = if counts.is_empty() { vec![1000, 5000] } else { counts };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    let rows: Vec<Row> = counts.iter().map(|&c| rt.block_on(measure(c))).collect();
    println!("\nIdle signaling sockets on one relay (loopback, per-address limits lifted)\n");
    println!(
        "| sockets | opened | relay RSS before (KiB) | RSS per idle socket (KiB) | connect p50 ms | connect p99 ms |"
    );
    println!("|---:|---:|---:|---:|---:|---:|");
    for r in rows {
        println!(
            "| {} | {} | {} | {:.1} | {:.2} | {:.2} |",
            r.count, r.opened, r.base_kib, r.per_socket_kib, r.p50_ms, r.p99_ms
        );
    }
}
