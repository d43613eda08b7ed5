//! The web client served by the relay, in real headless Chromium, inside a loopback-only
//! network namespace.

use avatar_edge_tests::cdp::Chromium;
use avatar_edge_tests::cluster::Cluster;
use avatar_edge_tests::netns;
use serde_json::Value;
use std::time::{Duration, Instant};

#[test]
fn chromium_plays_the_idle_avatar_from_the_web_client() {
    netns::run("chromium_plays_the_idle_avatar_from_the_web_client", || async {
        let cluster = Cluster::start().await;
        play_in_chromium(&cluster, "http").await;
    });
}

#[test]
fn chromium_plays_over_https_and_wss() {
    netns::run("chromium_plays_over_https_and_wss", || async {
        let mut cluster = Cluster::relay_with("", true).await;
        cluster.add_worker("worker-1", 2, "").await;
        play_in_chromium(&cluster, "https").await;
    });
}

/// Open the web client, let it connect by itself, and require 100 decoded 512×512 frames within
/// 6 s of its WebSocket opening.
async fn play_in_chromium(cluster: &Cluster, scheme: &str) {
    let url = format!(
        "{scheme}://{}/?autoconnect=1&avatar=avatar_tutor_13",
        cluster.relay.http
    );
    let mut browser = Chromium::launch(&url).await.expect("chromium");
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let ws = browser
            .eval("window.avatarEdge ? window.avatarEdge.state.wsState : 'loading'")
            .await
            .expect("eval");
        if ws == "open" {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "page socket never opened ({ws})\n{}",
            cluster.logs()
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let opened = Instant::now();
    let mut stats = Value::Null;
    while opened.elapsed() < Duration::from_secs(6) {
        stats = browser.eval("window.avatarEdge.stats()").await.expect("stats");
        if stats["framesDecoded"].as_u64().unwrap_or(0) >= 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let events = browser
        .eval("JSON.stringify(window.avatarEdge.state.events)")
        .await
        .expect("events");
    let frames = stats["framesDecoded"].as_u64().unwrap_or(0);
    assert!(
        frames >= 100,
        "framesDecoded {frames} after 6 s: {stats}\nevents: {events}\n{}",
        cluster.logs()
    );
    assert_eq!(
        (stats["frameWidth"].as_u64(), stats["frameHeight"].as_u64()),
        (Some(512), Some(512)),
        "{stats}"
    );
    eprintln!(
        "chromium ({scheme}): {frames} frames {:?} after socket open; pair {} → {}",
        opened.elapsed(),
        stats["localCandidateType"],
        stats["remoteCandidateType"]
    );
    // The page shows what it knows in its status line, and used the right socket scheme.
    let status = browser
        .eval("document.getElementById('status').textContent")
        .await
        .expect("status");
    assert!(
        status
            .as_str()
            .is_some_and(|s| s.contains("WebSocket: open") && s.contains("ICE: connected")),
        "{status}"
    );
    let ws_url = browser.eval("window.avatarEdge.state.ws.url").await.expect("url");
    let want = if scheme == "https" { "wss://" } else { "ws://" };
    assert!(ws_url.as_str().is_some_and(|u| u.starts_with(want)), "{ws_url}");
}
