//! A GPU box whose network blocks UDP: the tunnel over TLS/TCP on the relay's HTTPS port, media
//! through the relay's TURN reached through that tunnel, and the move back to QUIC.
//!
//! Namespace topologies as in `topologies.rs` (documentation ranges only): the relay with HTTPS on
//! 203.0.113.1:443, QUIC on :4433 and its embedded TURN; the worker behind its NAT, whose firewall
//! drops all UDP and lets TCP out only to the relay's port 443; headless Chromium behind the
//! other NAT. The worker names only the QUIC address: its TCP fallback is port 443 by default.
//!
//! - no UDP: the worker registers over TCP within 5 s of starting; Chromium behind a cone NAT and
//!   behind a symmetric NAT plays, the worker's side of the selected pair is a relay candidate on
//!   the relay's address, and the avatar talks, with audio and moving lips;
//! - back to QUIC: UDP returns while a session plays; the worker is on QUIC within one probe
//!   interval and the session plays on (the longest stall at the receiver is printed and bounded);
//! - blocked mid-session: UDP goes while a session plays on QUIC; the worker falls back to TCP
//!   and a new session plays. The session that was playing loses its media path (it ran over UDP),
//!   and what it saw is printed;
//! - UDP only to the tunnel port: QUIC works but TURN's ports do not; with `turn_via_quic` the
//!   session's TURN rides the QUIC tunnel and the browser plays through the relay.

use avatar_edge_tests::cluster::{log_text, wait_for_count};
use avatar_edge_tests::netns;
use avatar_edge_tests::topology::{public_relay, spawn_gpu_worker, Topology, PUBLIC};
use serde_json::Value;
use std::time::{Duration, Instant};

const SECS: fn(u64) -> Duration = Duration::from_secs;

fn browse(topo: &Topology, frames: u32, say: Option<&str>, watch_ms: u64) -> Value {
    let mut env = Vec::new();
    if let Some(text) = say {
        env.push(("PROBE_SAY", text.to_owned()));
    }
    if watch_ms > 0 {
        env.push(("PROBE_WATCH_MS", watch_ms.to_string()));
    }
    topo.chromium_probe(
        &format!("https://{PUBLIC}/?autoconnect=1&avatar=avatar_tutor_13"),
        frames,
        &env,
    )
}

async fn browse_async(topo: &std::sync::Arc<Topology>, frames: u32, say: Option<&'static str>, watch_ms: u64) -> Value {
    let topo = std::sync::Arc::clone(topo);
    tokio::task::spawn_blocking(move || browse(&topo, frames, say, watch_ms))
        .await
        .expect("probe thread")
}

/// No UDP from the GPU box: registration over TCP within 5 s, a session that plays through the
/// relay's TURN reached through the tunnel, and (with `say`) an answer with voice and lips.
async fn plays_without_udp(name: &str, browser_symmetric: bool, say: Option<&'static str>) {
    let topo = std::sync::Arc::new(Topology::new(false, browser_symmetric));
    topo.block_worker_udp(&[(PUBLIC, 443)]);
    let mut cluster = public_relay().await;
    let started = Instant::now();
    let log = spawn_gpu_worker(&mut cluster, &topo, "");
    let registered = wait_for_count(&log, "registered with relay over tcp", 1, SECS(15)).await;
    let registered = registered.unwrap_or_else(|| panic!("{name}: never registered over TCP\n{}", log_text(&log)));
    println!("{name}: registered over TLS/TCP {registered:?} after the worker started (QUIC tried first for 2 s)");
    assert!(
        started.elapsed() < SECS(5) + SECS(1) && registered < SECS(5),
        "{name}: registration took {registered:?}"
    );
    let report = browse_async(&topo, 100, say, 0).await;
    println!("{name}: {report}");
    assert!(
        report["frames"].as_u64().unwrap_or(0) >= 100,
        "{name}: {report}\n{}",
        cluster.logs()
    );
    assert_eq!(
        report["remote"], "relay",
        "{name}: the worker's side is a relay candidate: {report}"
    );
    assert_eq!(
        report["remote_address"], PUBLIC,
        "{name}: on the relay's address: {report}"
    );
    if say.is_some() {
        assert_eq!(report["spoke"], true, "{name}: the avatar answered aloud: {report}");
        assert!(
            report["mouth_open_share"].as_f64().unwrap_or(0.0) >= 0.33,
            "{name}: the lips moved while it spoke: {report}"
        );
    }
    // The relay saw the worker arrive over TCP, too.
    let relay_log = log_text(&cluster.relay.log);
    assert!(
        relay_log
            .lines()
            .any(|l| l.contains("worker registered") && l.contains("transport=\"tcp\"")),
        "{name}: the relay registered the worker over TCP:\n{relay_log}"
    );
}

#[test]
fn a_gpu_box_without_udp_registers_over_tcp_and_a_browser_behind_a_cone_nat_talks() {
    netns::run(
        "a_gpu_box_without_udp_registers_over_tcp_and_a_browser_behind_a_cone_nat_talks",
        || async {
            plays_without_udp("no UDP, cone browser", false, Some("hello")).await;
        },
    );
}

#[test]
fn a_gpu_box_without_udp_serves_a_browser_behind_a_symmetric_nat() {
    netns::run(
        "a_gpu_box_without_udp_serves_a_browser_behind_a_symmetric_nat",
        || async {
            plays_without_udp("no UDP, symmetric browser", true, None).await;
        },
    );
}

#[test]
fn when_udp_returns_the_worker_moves_to_quic_and_the_playing_session_plays_on() {
    netns::run(
        "when_udp_returns_the_worker_moves_to_quic_and_the_playing_session_plays_on",
        || async {
            let topo = std::sync::Arc::new(Topology::new(false, false));
            topo.block_worker_udp(&[(PUBLIC, 443)]);
            let mut cluster = public_relay().await;
            let probe_interval = 3;
            let log = spawn_gpu_worker(
                &mut cluster,
                &topo,
                &format!("quic_probe_interval_s = {probe_interval}"),
            );
            wait_for_count(&log, "registered with relay over tcp", 1, SECS(15))
                .await
                .unwrap_or_else(|| panic!("never on TCP\n{}", log_text(&log)));
            // A session plays over TCP; the probe watches it for 14 s after its first 25 frames.
            let playing = {
                let topo = std::sync::Arc::clone(&topo);
                tokio::spawn(async move { browse_async(&topo, 25, None, 14_000).await })
            };
            let relay_log = cluster.relay.log.clone();
            wait_for_count(&relay_log, "session routed", 1, SECS(20))
                .await
                .expect("the session reaches the worker");
            tokio::time::sleep(SECS(4)).await;
            topo.unblock_worker();
            let unblocked = Instant::now();
            let on_quic = wait_for_count(&log, "registered with relay over quic", 1, SECS(15)).await;
            let on_quic = on_quic.unwrap_or_else(|| panic!("never back on QUIC\n{}", log_text(&log)));
            println!("back on QUIC {on_quic:?} after UDP returned (probe interval {probe_interval} s)");
            assert!(
                unblocked.elapsed() <= SECS(probe_interval) + SECS(3),
                "within one probe interval (plus the QUIC handshake): {on_quic:?}"
            );
            let report = playing.await.expect("probe");
            println!("the session that played across the move: {report}");
            assert!(
                report["frames"].as_u64().unwrap_or(0) >= 25 + 14 * 20,
                "it kept playing: {report}\n{}",
                cluster.logs()
            );
            let gap = report["max_gap_ms"].as_u64().unwrap_or(u64::MAX);
            assert!(gap < 1000, "no stall at the receiver across the move: {report}");
            // Its tunnel closes after it, and a new session goes over QUIC (the relay routes it there).
            wait_for_count(&log, "the last session on this tunnel ended", 1, SECS(15))
                .await
                .unwrap_or_else(|| panic!("the TCP tunnel drained\n{}", log_text(&log)));
            let next = browse_async(&topo, 50, None, 0).await;
            println!("a new session after the move: {next}");
            assert!(next["frames"].as_u64().unwrap_or(0) >= 50, "{next}");
        },
    );
}

#[test]
fn when_udp_goes_mid_session_the_worker_falls_back_to_tcp_and_new_sessions_play() {
    netns::run(
        "when_udp_goes_mid_session_the_worker_falls_back_to_tcp_and_new_sessions_play",
        || async {
            let topo = std::sync::Arc::new(Topology::new(false, false));
            let mut cluster = public_relay().await;
            let log = spawn_gpu_worker(&mut cluster, &topo, "");
            wait_for_count(&log, "registered with relay over quic", 1, SECS(15))
                .await
                .unwrap_or_else(|| panic!("never on QUIC\n{}", log_text(&log)));
            let playing = {
                let topo = std::sync::Arc::clone(&topo);
                tokio::spawn(async move { browse_async(&topo, 25, None, 10_000).await })
            };
            wait_for_count(&cluster.relay.log, "session routed", 1, SECS(20))
                .await
                .expect("the session reaches the worker");
            tokio::time::sleep(SECS(3)).await;
            topo.block_worker_udp(&[(PUBLIC, 443)]);
            let blocked = Instant::now();
            wait_for_count(&log, "registered with relay over tcp", 1, SECS(20))
                .await
                .unwrap_or_else(|| panic!("never fell back to TCP\n{}", log_text(&log)));
            println!("on TLS/TCP {:?} after UDP was blocked", blocked.elapsed());
            for line in log_text(&log).lines().filter(|l| l.contains("avatar_worker::tunnel")) {
                println!("  {line}");
            }
            let before = playing.await.expect("probe");
            println!("the session that was playing on UDP media when UDP went: {before}");
            let after = browse_async(&topo, 100, None, 0).await;
            println!("a new session on the TCP tunnel: {after}");
            assert!(
                after["frames"].as_u64().unwrap_or(0) >= 100,
                "{after}\n{}",
                cluster.logs()
            );
            assert_eq!(after["remote"], "relay", "{after}");
        },
    );
}

#[test]
fn with_udp_only_to_the_tunnel_port_turn_rides_the_quic_tunnel() {
    netns::run(
        "with_udp_only_to_the_tunnel_port_turn_rides_the_quic_tunnel",
        || async {
            let topo = std::sync::Arc::new(Topology::new(false, false));
            topo.firewall_worker(&[(PUBLIC, 4433)], &[]);
            let mut cluster = public_relay().await;
            let log = spawn_gpu_worker(&mut cluster, &topo, "turn_via_quic = true");
            wait_for_count(&log, "registered with relay over quic", 1, SECS(15))
                .await
                .unwrap_or_else(|| panic!("never on QUIC\n{}", log_text(&log)));
            let report = browse_async(&topo, 100, None, 0).await;
            println!("UDP only to 4433, TURN through the QUIC tunnel: {report}");
            assert!(
                report["frames"].as_u64().unwrap_or(0) >= 100,
                "{report}\n{}",
                cluster.logs()
            );
            assert_eq!(report["remote"], "relay", "{report}");
            assert_eq!(report["remote_address"], PUBLIC, "{report}");
        },
    );
}
