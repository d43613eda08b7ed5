//! The web client served by the relay, in real headless Chromium, inside a loopback-only
//! network namespace.

use avatar_edge_tests::cdp::Chromium;
use avatar_edge_tests::cluster::Cluster;
use avatar_edge_tests::customer_site::{first_frame, CustomerSite, Page};
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
    let ws = browser
        .poll(
            "window.avatarEdge ? window.avatarEdge.state.wsState : 'loading'",
            Duration::from_secs(15),
            |v| v == "open",
        )
        .await;
    assert_eq!(ws, "open", "page socket never opened\n{}", cluster.logs());
    let opened = Instant::now();
    let stats = browser
        .poll("window.avatarEdge.stats()", Duration::from_secs(6), |s| {
            s["framesDecoded"].as_u64().unwrap_or(0) >= 100
        })
        .await;
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
    // The SDK times each step of connecting, from the socket's opening to the first frame shown.
    let steps = browser
        .eval("window.avatarEdge.state.timing.connect")
        .await
        .expect("timing");
    eprintln!("chromium ({scheme}): connect steps (ms after the socket opened): {steps}");
    let at = |k: &str| steps[k].as_f64().unwrap_or(f64::NAN);
    assert!(
        at("offerMs") <= at("answerMs") && at("answerMs") <= at("connectedMs") && at("firstFrameMs") < 6000.0,
        "every step timed, in order: {steps}"
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

#[test]
fn chromium_plays_the_talking_avatar_and_stops_it() {
    netns::run("chromium_plays_the_talking_avatar_and_stops_it", || async {
        let cluster = Cluster::start().await;
        let url = format!("http://{}/?autoconnect=1&avatar=avatar_tutor_13", cluster.relay.http);
        let mut browser = Chromium::launch(&url).await.expect("chromium");
        let frames = browser
            .poll(
                "window.avatarEdge ? window.avatarEdge.stats().then(s => s.framesDecoded) : 0",
                Duration::from_secs(15),
                |v| v.as_u64().unwrap_or(0) >= 25,
            )
            .await;
        assert!(
            frames.as_u64().unwrap_or(0) >= 25,
            "playing: {frames}\n{}",
            cluster.logs()
        );
        let mouth = avatar_edge_tests::cdp::mouth_luma();
        let idle = browser.eval(&mouth).await.expect("luma").as_f64().expect("a picture");
        let before = browser.eval("window.avatarEdge.stats()").await.expect("stats");

        let sent = Instant::now();
        browser
            .eval("window.avatarEdge.say('Hello, who are you?')")
            .await
            .expect("say");
        let speaking = browser
            .poll("window.avatarEdge.state.speaking", Duration::from_secs(15), |v| {
                !v.is_null()
            })
            .await;
        assert!(
            !speaking.is_null(),
            "speech_started reached the page\n{}",
            cluster.logs()
        );
        eprintln!("chromium: text -> speech_started {:?}", sent.elapsed());
        let open = browser
            .poll(&mouth, Duration::from_secs(3), |v| {
                v.as_f64().is_some_and(|l| l < idle - 25.0)
            })
            .await;
        // Headless Chromium has no audio sink, so its playout levels (audioLevel, the page's
        // WebAudio meter) stay 0 there; what it does show is the Opus track arriving and being
        // decoded at 48 kHz. The Rust client in tests/talk.rs decodes the same audio and checks
        // that it is speech.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let talking = browser.eval("window.avatarEdge.stats()").await.expect("stats");
        let samples = |v: &Value| v["audioSamplesReceived"].as_f64().unwrap_or(0.0);
        eprintln!(
            "chromium: mouth luma idle {idle:.1}, speaking {open}; audio samples {} -> {}",
            samples(&before),
            samples(&talking),
        );
        assert!(
            open.as_f64().is_some_and(|l| l < idle - 25.0),
            "the mouth opens: {open} vs idle {idle}"
        );
        assert!(
            samples(&talking) >= samples(&before) + 48_000.0,
            "the audio track plays: {before} -> {talking}"
        );

        // Stop: the badge goes, the audio falls silent, the mouth closes.
        let stopped = Instant::now();
        browser
            .eval("document.getElementById('stop').click()")
            .await
            .expect("stop");
        let after = browser
            .poll(
                "window.avatarEdge.state.speaking",
                Duration::from_secs(2),
                Value::is_null,
            )
            .await;
        assert!(after.is_null(), "speech_ended after stop");
        eprintln!("chromium: stop -> speech_ended seen after {:?}", stopped.elapsed());
        tokio::time::sleep(Duration::from_millis(700)).await;
        let closed = browser.eval(&mouth).await.expect("luma").as_f64().unwrap_or(0.0);
        assert!((closed - idle).abs() < 8.0, "mouth idle after stop: {closed} vs {idle}");
        // The conversation shows the question and the tutor's answer.
        let turns = browser
            .eval("JSON.stringify([...document.querySelectorAll('#turns .turn')].map(t => [t.className, t.querySelector('.text').textContent]))")
            .await
            .expect("turns");
        let turns: Vec<(String, String)> = serde_json::from_str(turns.as_str().unwrap_or("[]")).expect("turns JSON");
        assert!(
            turns
                .first()
                .is_some_and(|(class, text)| class.contains("user") && text == "Hello, who are you?"),
            "{turns:?}"
        );
        assert!(
            turns
                .iter()
                .any(|(class, text)| class.contains("tutor") && text.contains("Hello")),
            "the conversation shows the answer: {turns:?}"
        );
    });
}

/// The design notes' page, unchanged but for one script tag (compat.js), from the customer's own
/// origin in a fresh Chromium with its default autoplay policy, Connect clicked as a user does:
/// it plays, it talks, and its first frame comes within 100 ms of the click (best of 5). The same
/// page with the documented two-line fix instead, in the same run, is at least 40 ms slower
/// (about 140 ms in `bench-first-frame`): Chromium starts its audio output on the first frame's
/// way unless compat.js started it at load.
#[test]
fn the_design_notes_page_with_compat_js_talks_and_shows_its_first_frame_within_100_ms() {
    netns::run(
        "the_design_notes_page_with_compat_js_talks_and_shows_its_first_frame_within_100_ms",
        || async {
            let cluster = Cluster::start().await;
            let site = CustomerSite::start(cluster.relay.http).await;
            let mut best = Vec::new();
            for (page, runs) in [(Page::OldFixedInline, 3), (Page::OldWithCompat, 5)] {
                let mut shown = Vec::new();
                for run in 0..runs {
                    // The first run with compat.js also presses Send: the answer is heard.
                    let talk = run == 0 && page == Page::OldWithCompat;
                    match first_frame(&site, page, talk).await {
                        Ok(t) => shown.push(t.shown_ms),
                        Err(e) => panic!("{}: {e:#}\n{}", page.label(), cluster.logs()),
                    }
                }
                eprintln!("{}: connect → first frame {shown:?} ms", page.label());
                best.push(shown.iter().copied().fold(f64::INFINITY, f64::min));
            }
            let (fixed, compat) = (best[0], best[1]);
            assert!(compat <= 100.0, "compat.js: best first frame {compat:.0} ms");
            assert!(
                compat + 40.0 <= fixed,
                "compat.js {compat:.0} ms against the inline fix {fixed:.0} ms (best of each)"
            );
        },
    );
}
