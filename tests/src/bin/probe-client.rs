//! A browser stand-in for network-namespace topologies: run inside the "browser" namespace (the
//! test starts it with `nsenter`), it opens the signaling socket, takes the relay's
//! `ice_servers`, plays a session with the Rust WebRTC receiver and prints one JSON line:
//! frames decoded, the selected candidate pair's types, and the time from connect to first frame.
//!
//! ```text
//! probe-client WS_URL [relay-only] [FRAMES]
//! ```
//!
//! `AE_DUMP_SDP=1` prints the offer and the answer to stderr.

use avatar_edge_tests::rtc_client::RtcClient;
use avatar_edge_tests::signaling::Signaling;
use std::time::{Duration, Instant};
use webrtc::ice_transport::ice_server::RTCIceServer;

async fn probe(url: &str, relay_only: bool, frames: u64) -> anyhow::Result<serde_json::Value> {
    let started = Instant::now();
    let mut sig = Signaling::connect(url).await?;
    let mut servers = Vec::new();
    if let Ok(ev) = sig.next_event(Duration::from_secs(2)).await {
        if ev["type"] == "ice_servers" {
            for s in ev["ice_servers"].as_array().into_iter().flatten() {
                servers.push(RTCIceServer {
                    urls: s["urls"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|u| u.as_str().map(str::to_owned))
                        .collect(),
                    username: s["username"].as_str().unwrap_or_default().to_owned(),
                    credential: s["credential"].as_str().unwrap_or_default().to_owned(),
                });
            }
        }
    }
    let client = RtcClient::with_ice(true, servers, relay_only).await?;
    let offer = client.offer().await?;
    sig.send_offer(&offer, "avatar_tutor_13").await?;
    let answer = sig.wait_for("webrtc_answer", Duration::from_secs(10)).await?;
    let sdp = answer["sdp"].as_str().unwrap_or_default().to_owned();
    if std::env::var_os("AE_DUMP_SDP").is_some() {
        eprintln!("OFFER\n{offer}\nANSWER\n{sdp}");
    }
    client.accept_answer(&sdp).await?;
    client.connected(Duration::from_secs(15)).await?;
    let stats = client.wait_frames(frames, Duration::from_secs(15)).await;
    let first = stats
        .first_frame_at
        .map(|t| t.duration_since(started).as_millis() as u64);
    let pair = client.selected_pair().await;
    let count = |sdp: &str, typ: &str| sdp.matches(&format!("typ {typ}")).count();
    let out = serde_json::json!({
        "frames": stats.frames_decoded,
        "local": pair.as_ref().map(|p| p.0.clone()),
        "remote": pair.as_ref().map(|p| p.1.clone()),
        "connect_to_first_frame_ms": first,
        "offer_candidates": {"host": count(&offer, "host"), "srflx": count(&offer, "srflx"), "relay": count(&offer, "relay")},
        "answer_candidates": {"host": count(&sdp, "host"), "srflx": count(&sdp, "srflx"), "relay": count(&sdp, "relay")},
    });
    client.close().await;
    sig.close().await;
    Ok(out)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    let Some(url) = args.get(1) else {
        eprintln!("usage: probe-client WS_URL [relay-only] [FRAMES]");
        std::process::exit(2);
    };
    let relay_only = args.iter().any(|a| a == "relay-only");
    let frames = args.iter().skip(2).find_map(|a| a.parse().ok()).unwrap_or(100);
    let result = tokio::time::timeout(Duration::from_secs(45), probe(url, relay_only, frames)).await;
    let line = match result {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => serde_json::json!({ "error": e.to_string() }),
        Err(_) => serde_json::json!({ "error": "timed out after 45 s" }),
    };
    println!("{line}");
}
