//! NAT topologies built from network namespaces, with headless Chromium and the web client in the
//! browser's namespace, the worker in its own behind a NAT, and the relay with its embedded TURN in
//! the "public" namespace between them (see `topology.rs` for the picture). Addresses only from
//! 192.0.2.0/24, 198.51.100.0/24 and 203.0.113.0/24; everything is torn down with the test.
//!
//! (a) both NATs cone-like: plays (directly, through STUN, or through TURN);
//! (b) the worker behind a symmetric NAT: plays through the relay's TURN;
//! (c) the browser with all UDP blocked, TCP only to the relay's HTTP and TURN-over-TLS ports:
//!     plays through TURN over TLS.
//!
//! Each asserts `framesDecoded >= 100` and prints the selected candidate types and the time from
//! the page's socket opening to its first frame.

use avatar_edge_tests::cluster::{Cluster, SECRET};
use avatar_edge_tests::netns;
use avatar_edge_tests::topology::Topology;
use serde_json::Value;
use std::time::Duration;

const PUBLIC: &str = "203.0.113.1";
const TLS_PORT: u16 = 5349;

/// Relay + embedded TURN on the public address, a worker behind its NAT, Chromium behind the
/// other; returns what `chromium-probe` reported.
async fn play(name: &str, worker_symmetric: bool, browser_symmetric: bool, block_udp: bool) -> Value {
    let topo = Topology::new(worker_symmetric, browser_symmetric);
    // The test ranges are special-purpose, so they must be allow-listed for TURN to relay to them.
    let turn = format!(
        "[turn]\nmode = \"embedded\"\nttl_s = 300\n\
         urls = [\"turn:{PUBLIC}:3478?transport=udp\", \"turn:{PUBLIC}:3478?transport=tcp\", \"turns:{PUBLIC}:{TLS_PORT}?transport=tcp\"]\n\
         [turn.embedded]\nlisten_udp = \"{PUBLIC}:3478\"\nlisten_tcp = \"{PUBLIC}:3478\"\nlisten_tls = \"{PUBLIC}:{TLS_PORT}\"\n\
         relay_ip = \"{PUBLIC}\"\nallow_peers = [\"192.0.2.0/24\", \"198.51.100.0/24\", \"203.0.113.0/24\"]\n"
    );
    let mut cluster = Cluster::relay_on(PUBLIC, &turn, false, "self_signed = true").await;
    let trust = format!("fingerprint = \"{}\"", cluster.relay.fingerprint);
    let log = cluster.spawn_worker_in(Some(topo.gpu.pid()), "gpu-1", 2, SECRET, &trust, "");
    cluster
        .wait_for_log(&log, "registered with relay", Duration::from_secs(15))
        .await;
    let http = cluster.relay.http;
    if block_udp {
        topo.block_browser_udp(&[(PUBLIC, http.port()), (PUBLIC, TLS_PORT)]);
    }
    let url = format!("http://{http}/?autoconnect=1&avatar=avatar_tutor_13");
    let out = tokio::task::spawn_blocking(move || topo.run_in_browser("chromium-probe", &[&url, "100"]))
        .await
        .expect("probe");
    let report: Value = serde_json::from_str(out.trim()).unwrap_or_else(|_| panic!("probe printed: {out}"));
    println!("{name}: {report}");
    assert!(
        report["frames"].as_u64().unwrap_or(0) >= 100,
        "{name}: {report}\n{}",
        cluster.logs()
    );
    report
}

#[test]
fn a_cone_nats_on_both_sides_play() {
    netns::run("a_cone_nats_on_both_sides_play", || async {
        let r = play("(a) cone NATs", false, false, false).await;
        assert!(r["local"].is_string() && r["remote"].is_string(), "{r}");
    });
}

#[test]
fn b_a_worker_behind_a_symmetric_nat_plays_through_the_relays_turn() {
    netns::run(
        "b_a_worker_behind_a_symmetric_nat_plays_through_the_relays_turn",
        || async {
            let r = play("(b) symmetric worker NAT", true, false, false).await;
            assert!(
                r["local"] == "relay" || r["remote"] == "relay",
                "the selected pair goes through TURN: {r}"
            );
        },
    );
}

#[test]
fn c_a_browser_without_udp_plays_through_turn_over_tls() {
    netns::run("c_a_browser_without_udp_plays_through_turn_over_tls", || async {
        let r = play("(c) browser UDP blocked", false, false, true).await;
        assert_eq!(r["local"], "relay", "{r}");
        assert_eq!(r["relay_protocol"], "tls", "{r}");
    });
}
