//! What an idle signaling socket costs the relay: resident memory per open WebSocket, and the
//! connect time (TCP, HTTP upgrade) while thousands are opened.
//!
//! ```text
//! bench-sockets [COUNTS...]        (default: 1000 5000 20000)
//! ```
//!
//! For each count, a fresh relay (per-address limits lifted: every socket comes from 127.0.0.1)
//! takes that many WebSockets, opened 100 at a time and then left idle; the table gives the
//! relay's RSS growth divided by the count, and connect p50/p99. The anchor is the relay's RSS
//! before the first socket, in the same run. Both ends of every socket live on this machine, so
//! the bench raises its descriptor limit (the relay inherits it) to fit twice the largest count.
//!
//! A second table is the signaling round trip through relay and tunnel to a worker (an empty
//! `text_webrtc` on an attached session, which the worker answers with an error event): on a
//! relay with no other socket (the anchor), then with 5,000 idle sockets open.

use avatar_edge_tests::cluster::Cluster;
use avatar_edge_tests::percentile;
use avatar_edge_tests::rtc_client::RtcClient;
use avatar_edge_tests::signaling::Signaling;
use std::time::{Duration, Instant};

/// Round trips measured per row of the second table.
const ROUND_TRIPS: usize = 500;

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

struct Row {
    count: usize,
    opened: usize,
    base_kib: u64,
    per_socket_kib: f64,
    p50_ms: f64,
    p99_ms: f64,
}

/// The relay every row uses: per-address limits lifted, room for the largest count.
async fn relay(max_connections: usize) -> Cluster {
    Cluster::relay_sections(
        "[limits]\nconnections_per_ip_per_minute = 0\nsockets_per_ip = 0\nidle_timeout_ms = 600000",
        &format!(
            "max_connections_per_ip = 0\nmax_connections = {}",
            max_connections.max(1000) + 1000
        ),
        "",
        false,
    )
    .await
}

/// Open `count` idle WebSockets to `cluster`, 100 at a time: the sockets and each connect time.
async fn open_idle(
    cluster: &Cluster,
    count: usize,
) -> (
    Vec<tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>>,
    Vec<f64>,
) {
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
    (held, connect_ms)
}

async fn measure(count: usize) -> Row {
    let cluster = relay(count).await;
    let pid = cluster.relay.child.id();
    tokio::time::sleep(Duration::from_millis(300)).await;
    let base_kib = rss_kib(pid);
    let (held, mut connect_ms) = open_idle(&cluster, count).await;
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

/// Signaling round trips (ms, sorted) through a relay with `idle` other sockets open.
async fn round_trips(idle: usize) -> Result<(usize, Vec<f64>), String> {
    let mut cluster = relay(idle).await;
    cluster.add_worker("rtt", 2, "").await;
    let (held, _) = open_idle(&cluster, idle).await;
    let mut sig = Signaling::connect(&cluster.ws_url("rtt"))
        .await
        .map_err(|e| format!("socket: {e}"))?;
    let client = RtcClient::new(true).await.map_err(|e| format!("peer: {e}"))?;
    let offer = client.offer().await.map_err(|e| format!("offer: {e}"))?;
    sig.send_offer(&offer, "a").await.map_err(|e| format!("send: {e}"))?;
    sig.wait_for("webrtc_answer", Duration::from_secs(10))
        .await
        .map_err(|e| format!("answer: {e}"))?;
    let mut ms = Vec::with_capacity(ROUND_TRIPS);
    for _ in 0..ROUND_TRIPS {
        let started = Instant::now();
        sig.send_text(r#"{"type":"text_webrtc","message":""}"#)
            .await
            .map_err(|e| format!("send: {e}"))?;
        sig.wait_for("error", Duration::from_secs(5))
            .await
            .map_err(|e| format!("round trip: {e}"))?;
        ms.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    ms.sort_by(f64::total_cmp);
    Ok((held.len(), ms))
}

/// Raise the descriptor limit to `wanted` (root may raise the hard limit too); children inherit it.
fn raise_nofile(wanted: u64) -> u64 {
    use rustix::process::{getrlimit, setrlimit, Resource, Rlimit};
    let now = getrlimit(Resource::Nofile);
    if now.current.is_some_and(|c| c < wanted) {
        let hard = now.maximum.map(|m| m.max(wanted));
        let raised = setrlimit(
            Resource::Nofile,
            Rlimit {
                current: Some(wanted),
                maximum: hard,
            },
        );
        if raised.is_err() {
            let _ = setrlimit(
                Resource::Nofile,
                Rlimit {
                    current: now.maximum,
                    maximum: now.maximum,
                },
            );
        }
    }
    getrlimit(Resource::Nofile).current.unwrap_or(u64::MAX)
}

fn main() {
    avatar_edge_tests::netns::reexec_isolated();
    let counts: Vec<usize> = std::env::args().skip(1).filter_map(|a| a.parse().ok()).collect();
    let counts = if counts.is_empty() {
        vec![1000, 5000, 20000]
    } else {
        counts
    };
    let largest = counts.iter().copied().max().unwrap_or(0).max(5000) as u64;
    let nofile = raise_nofile(2 * largest + 4096);
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
    println!("\n(descriptor limit {nofile})");
    println!("\nSignaling round trip through relay + tunnel to a worker ({ROUND_TRIPS} empty `text_webrtc`, each answered by an error event)\n");
    println!("| idle sockets open | round trips | p50 ms | p99 ms |");
    println!("|---:|---:|---:|---:|");
    for idle in [0, 5000] {
        match rt.block_on(round_trips(idle)) {
            Ok((open, ms)) => println!(
                "| {open} | {} | {:.2} | {:.2} |",
                ms.len(),
                percentile(&ms, 50.0),
                percentile(&ms, 99.0)
            ),
            Err(e) => println!("| {idle} | failed: {e} | | |"),
        }
    }
}
