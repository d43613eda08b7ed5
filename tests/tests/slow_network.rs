//! Slow networks (issue 33): the stream follows the viewer's bandwidth.
//!
//! Real relay and worker processes in the test's namespace; an independent viewer (aiortc, which
//! sends REMB and receiver reports as browsers do) in a second namespace behind a veth link that
//! `tc tbf` limits (see `slow_link`). At 1 Mbit/s and 400 kbit/s the viewer must get at least 20
//! and 15 frames a second, the first frame within a second, and the answer to a question heard
//! within 500 ms; when the link drops mid-session, the frame rate recovers within 2 s and the
//! audio never gaps more than 200 ms; a narrow link steps the size down, and when it widens the
//! sender probes back up to the full picture. Chromium on the page sees the lowered level at 1 Mbit/s, and
//! at 200 kbit/s a steady smaller picture (aiortc is not the viewer there: its jitter buffer
//! re-asks for a lost packet only when a new gap appears, and waits 128 packets — 13 s at 10 fps
//! — before it asks for a keyframe, so one loss in the start's overshoot freezes it; Chromium
//! asks again, and for a keyframe, and plays on).

use avatar_edge_tests::cluster::Cluster;
use avatar_edge_tests::netns;
use avatar_edge_tests::slow_link::{Report, SlowLink, SERVER_IP};
use std::sync::Arc;

async fn cluster() -> Cluster {
    let mut cluster = Cluster::relay_on(SERVER_IP, "", false, "self_signed = true").await;
    cluster.add_worker("slow-worker", 2, "").await;
    cluster
}

/// Probe for `seconds`, asking a question at `text_at`, with `during` run alongside (after
/// `during_at` seconds) on the link.
async fn probe(link: &Arc<SlowLink>, cluster: &Cluster, session: &str, seconds: f64, text_at: f64) -> Report {
    let (link, ws) = (Arc::clone(link), cluster.ws_url(session));
    tokio::task::spawn_blocking(move || link.probe(&ws, seconds, Some(text_at)))
        .await
        .expect("probe task")
}

/// Chromium on the page, its worker behind a link limited to `kbit` kbit/s (the worker's media
/// crosses the limit; the relay and the browser are in this namespace).
async fn chromium_behind(kbit: u32) -> (SlowLink, Cluster, avatar_edge_tests::cdp::Chromium) {
    use avatar_edge_tests::cluster::SECRET;
    let link = SlowLink::new();
    link.limit_far(kbit);
    let mut cluster = Cluster::relay_on(SERVER_IP, "", false, "self_signed = true").await;
    let trust = format!("fingerprint = \"{}\"", cluster.relay.fingerprint);
    let log = cluster.spawn_worker_in(Some(link.viewer.pid()), "far-worker", 2, SECRET, &trust, "");
    cluster
        .wait_for_log(&log, "registered with relay", std::time::Duration::from_secs(15))
        .await;
    let url = format!("http://{}/?autoconnect=1&avatar=avatar_tutor_13", cluster.relay.http);
    let browser = avatar_edge_tests::cdp::Chromium::launch(&url).await.expect("chromium");
    (link, cluster, browser)
}

fn check_limited(kbit: u32, min_fps: f64, report: &Report, cluster: &Cluster) {
    let summary = report.summary(3.0, 12.0);
    eprintln!("{kbit} kbit/s: {summary}");
    for (t, q) in report.qualities() {
        eprintln!("  {t:.2}: {q}");
    }
    for (t, e) in report
        .events
        .iter()
        .filter(|(_, e)| e["type"] != "video_quality" && e["type"] != "webrtc_answer")
    {
        eprintln!("  {t:.2}: {e}");
    }
    let fail = |what: &str| panic!("{kbit} kbit/s: {what}: {summary}\n{}", cluster.logs());
    if report.first_frame().is_none_or(|t| t > 1.0) {
        fail("first frame not within 1 s");
    }
    if report.fps(3.0, 12.0) < min_fps {
        fail(&format!("fewer than {min_fps} fps"));
    }
    if report.answer_delay().is_none_or(|d| d > 0.5) {
        fail("answer not heard within 500 ms");
    }
    if report.qualities().is_empty() {
        fail("no video_quality event");
    }
}

#[test]
fn at_one_megabit_the_picture_keeps_20_fps_and_the_answer_is_heard_at_once() {
    netns::run(
        "at_one_megabit_the_picture_keeps_20_fps_and_the_answer_is_heard_at_once",
        || async {
            let link = Arc::new(SlowLink::new());
            link.limit(Some(1000));
            let cluster = cluster().await;
            let report = probe(&link, &cluster, "slow-1m", 12.0, 7.0).await;
            check_limited(1000, 20.0, &report, &cluster);
        },
    );
}

#[test]
fn at_400_kilobits_the_picture_keeps_15_fps_and_the_answer_is_heard_at_once() {
    netns::run(
        "at_400_kilobits_the_picture_keeps_15_fps_and_the_answer_is_heard_at_once",
        || async {
            let link = Arc::new(SlowLink::new());
            link.limit(Some(400));
            let cluster = cluster().await;
            let report = probe(&link, &cluster, "slow-400k", 12.0, 7.0).await;
            check_limited(400, 15.0, &report, &cluster);
            // The worker said what it sends: a lowered level, and a bitrate under the link.
            let (_, last) = report.qualities().pop().expect("quality");
            assert!(last["bitrate_kbps"].as_u64().is_some_and(|k| k < 400), "{last}");
            assert!(last["fps"].as_u64().is_some_and(|f| f < 25), "{last}");
        },
    );
}

#[test]
fn a_drop_mid_session_recovers_the_frame_rate_within_two_seconds_without_audio_gaps() {
    netns::run(
        "a_drop_mid_session_recovers_the_frame_rate_within_two_seconds_without_audio_gaps",
        || async {
            let link = Arc::new(SlowLink::new());
            let cluster = cluster().await;
            let dropper = Arc::clone(&link);
            // Unlimited for 6 s, then 500 kbit/s; the moment is taken from the wall clock and
            // placed on the probe's own clock (its report says when it started).
            let drop = tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_secs(6)).await;
                dropper.limit(Some(500));
                std::time::SystemTime::now()
            });
            let report = probe(&link, &cluster, "slow-drop", 14.0, 11.0).await;
            let dropped_at = report.probe_time(drop.await.expect("drop task"));
            let summary = report.summary(dropped_at + 2.0, 14.0);
            eprintln!("drop to 500 kbit/s at {dropped_at:.2} s (probe clock): {summary}");
            let fail = |what: &str| {
                panic!(
                    "drop at {dropped_at:.2} s: {what}: {summary}\n{}\n{}",
                    report.timeline(),
                    cluster.logs()
                )
            };
            if !(3.0..8.0).contains(&dropped_at) {
                fail("the drop did not fall inside the probe's run");
            }
            if report.fps(2.0, dropped_at) < 23.0 {
                fail("not 25 fps before the drop");
            }
            // Recovered within 2 s of the drop: the frame rate from then on.
            if report.fps(dropped_at + 2.0, 14.0) < 15.0 {
                fail("frame rate not recovered within 2 s");
            }
            // The audio never gaps over 200 ms: before the drop, as the link narrows (the sender
            // still sends at the old rate until the viewer's feedback arrives, and the
            // bottleneck's queue first delays audio behind video, then may drop some with it),
            // and after it. Measured as the network delivers it: the longest time between two
            // audio packets arriving. What aiortc then plays gaps longer when one packet was
            // lost (its jitter buffer holds the next 16 packets, 320 ms, behind the hole, where
            // a browser conceals 20 ms): printed, not judged.
            let windows = [
                (2.0, dropped_at),
                (dropped_at, dropped_at + 2.0),
                (dropped_at + 2.0, 14.0),
            ];
            let wire = windows.map(|(from, to)| report.max_audio_wire_gap_between(from, to));
            let decoded = windows.map(|(from, to)| report.max_audio_gap_between(from, to));
            let lost = windows.map(|(from, to)| report.audio_lost_between(from, to));
            eprintln!(
                "audio gaps on the wire: before {:.3} s, at the drop {:.3} s, after {:.3} s; packets lost {lost:?}; gaps aiortc played {decoded:.3?}",
                wire[0], wire[1], wire[2]
            );
            eprintln!("{}", report.timeline());
            if report.audio_rtp.len() < 500 {
                fail("the probe saw too few audio packets");
            }
            if wire.iter().any(|g| *g > 0.2) {
                fail("audio gapped more than 200 ms");
            }
            if report.answer_delay().is_none_or(|d| d > 0.5) {
                fail("answer not heard within 500 ms after the drop");
            }
        },
    );
}

/// A narrow link steps the picture's size down, and once the link widens the sender probes up
/// again, back to the full picture. The worker's ladder is configured here so that the size
/// drops at a rate aiortc plays reliably (its jitter buffer freezes on a loss at the default
/// ladder's 60 kbit/s): 512 px from 260 kbit/s of video, 384 px below. The link carries
/// 300 kbit/s for the first 6 s, then nothing limits it.
#[test]
fn a_narrow_link_steps_the_size_down_and_a_widened_one_is_probed_back_to_the_full_picture() {
    netns::run(
        "a_narrow_link_steps_the_size_down_and_a_widened_one_is_probed_back_to_the_full_picture",
        || async {
            let link = Arc::new(SlowLink::new());
            link.limit(Some(300));
            let mut cluster = Cluster::relay_on(SERVER_IP, "", false, "self_signed = true").await;
            cluster
                .add_worker(
                    "slow-widen",
                    2,
                    "[video.adapt]\nsteps = [{ min_kbps = 260, fps = 25 }, { min_kbps = 0, fps = 25, scale = 0.75 }]\n",
                )
                .await;
            let widener = Arc::clone(&link);
            let widen = tokio::spawn(async move {
                tokio::time::sleep(std::time::Duration::from_secs(6)).await;
                widener.limit(None);
            });
            let report = probe(&link, &cluster, "slow-widen", 30.0, 26.0).await;
            widen.await.expect("widen task");
            eprintln!("narrow then wide: {}", report.summary(3.0, 30.0));
            for (t, q) in report.qualities() {
                eprintln!("  {t:.2}: {q}");
            }
            let fail = |what: &str| panic!("widen: {what}: {}\n{}", report.summary(3.0, 30.0), cluster.logs());
            // Narrow (3–5 s on the probe's clock, which starts up to a second after the link's
            // timer): the smaller size, still at 25 fps.
            let narrow: Vec<_> = report.frames.iter().filter(|(t, ..)| (3.0..5.0).contains(t)).collect();
            if narrow.len() < 30 || narrow.iter().any(|(_, w, h)| (*w, *h) != (384, 384)) {
                fail("not a 384×384 picture on the narrow link");
            }
            // Widened: probed back up to the full picture, and it holds to the end.
            let Some(&(full_at, ..)) = report.frames.iter().find(|(t, w, _)| *t > 5.0 && *w == 512) else {
                fail("never back to 512×512 after the link widened");
                return;
            };
            eprintln!(
                "the full picture returned {:.1} s after the link widened (5–6 s)",
                full_at - 6.0
            );
            // Slow: the idle avatar at 384 px uses less than its bitrate, and the viewer's
            // estimate (REMB) grows only with what arrives; the sender does not pad to probe.
            // Runs measured 9.7, 12.7 and 15.4 s.
            if full_at > 26.0 {
                fail("the full picture took more than 20 s to return");
            }
            if report.frames.iter().any(|(t, w, _)| *t > full_at + 0.5 && *w != 512) {
                fail("the picture fell back after it returned on an unlimited link");
            }
            if report.fps(full_at.min(28.0), 30.0) < 23.0 {
                fail("not 25 fps on the widened link");
            }
            if report.qualities().last().is_none_or(|(_, q)| q["level"] != 0) {
                fail("the last video_quality is not the best level");
            }
        },
    );
}

/// The customer-facing page in real Chromium, with the worker behind a 1 Mbit/s link (the
/// worker in the far namespace, the relay and Chromium here, so that Chromium's DevTools port
/// stays on this namespace's loopback): the connection panel shows the lowered level, the picture
/// keeps moving, and the answer arrives.
#[test]
fn chromium_on_the_page_under_one_megabit_shows_the_lowered_level_and_gets_the_answer() {
    netns::run(
        "chromium_on_the_page_under_one_megabit_shows_the_lowered_level_and_gets_the_answer",
        || async {
            use std::time::Duration;
            let (_link, cluster, mut browser) = chromium_behind(1000).await;
            let stats = "window.avatarEdge ? window.avatarEdge.stats() : {}";
            let playing = browser
                .poll(stats, Duration::from_secs(15), |s| {
                    s["framesDecoded"].as_u64().unwrap_or(0) >= 25
                })
                .await;
            assert!(
                playing["framesDecoded"].as_u64().unwrap_or(0) >= 25,
                "{playing}\n{}",
                cluster.logs()
            );
            // Let the estimate settle on the link, then read the panel.
            tokio::time::sleep(Duration::from_secs(4)).await;
            let panel = browser
                .eval("[document.getElementById('p-estimate').textContent, document.getElementById('p-level').textContent]")
                .await
                .expect("panel");
            eprintln!("chromium under 1 Mbit/s: panel {panel}");
            let estimate: u64 = panel[0]
                .as_str()
                .and_then(|s| s.split_whitespace().next()?.parse().ok())
                .unwrap_or(0);
            assert!(
                (300..1300).contains(&estimate),
                "the panel shows an estimate near the link's 1 Mbit/s: {panel}\n{}",
                cluster.logs()
            );
            assert!(
                panel[1].as_str().is_some_and(|s| s.contains("lowered")),
                "the panel says the picture is lowered: {panel}"
            );
            // The page meters the tutor's voice as it plays (WebAudio on the received track).
            let quiet = browser
                .eval("(() => { const p = window.avatarEdge.state.voicePeak; window.avatarEdge.state.voicePeak = 0; return p; })()")
                .await
                .expect("voice level");
            let before = browser.eval(stats).await.expect("stats");
            let sent = std::time::Instant::now();
            browser
                .eval("window.avatarEdge.say('Hello, who are you?')")
                .await
                .expect("say");
            let speaking = browser
                .poll("window.avatarEdge.state.speaking", Duration::from_secs(5), |v| {
                    !v.is_null()
                })
                .await;
            assert!(
                !speaking.is_null(),
                "speech_started reached the page\n{}",
                cluster.logs()
            );
            let heard_after = sent.elapsed();
            tokio::time::sleep(Duration::from_secs(2)).await;
            let after = browser.eval(stats).await.expect("stats");
            let delta = |k: &str| after[k].as_f64().unwrap_or(0.0) - before[k].as_f64().unwrap_or(0.0);
            let secs = 2.0 + heard_after.as_secs_f64();
            eprintln!(
                "chromium under 1 Mbit/s: speech_started after {heard_after:?}; {:.1} fps and {:.0} audio samples/s while it spoke",
                delta("framesDecoded") / secs,
                delta("audioSamplesReceived") / secs
            );
            // getStats' audio levels stay 0 in headless Chromium (no audio sink), but the decoded
            // Opus arrives at 48 kHz, and the page's meter hears the answer: loud, where the idle
            // stream before it was silence.
            assert!(
                delta("audioSamplesReceived") / secs > 40_000.0,
                "audio flows: {before} -> {after}"
            );
            let loud = browser
                .eval("window.avatarEdge.state.voicePeak")
                .await
                .expect("voice level")
                .as_f64()
                .unwrap_or(0.0);
            eprintln!("chromium under 1 Mbit/s: voice peak {quiet} before the question, {loud:.3} during the answer");
            let idle = quiet.as_f64().unwrap_or(1.0);
            assert!(
                loud >= avatar_edge_tests::slow_link::LOUD && idle < avatar_edge_tests::slow_link::LOUD,
                "the answer is heard in the page: peak {quiet} idle, {loud} answering"
            );
            assert!(
                delta("framesDecoded") / secs >= 20.0,
                "the picture keeps 20 fps: {before} -> {after}"
            );
        },
    );
}

/// Two viewers of one worker at once, one behind a 300 kbit/s link and one on a fast path: each
/// session has its own estimate and encoder, so the weak link lowers only its own picture; the
/// worker's `/metrics` shows both levels.
#[test]
fn one_viewers_weak_link_never_lowers_anothers_picture() {
    netns::run("one_viewers_weak_link_never_lowers_anothers_picture", || async {
        use avatar_edge_tests::slow_link::run_probe;
        let link = Arc::new(SlowLink::new());
        link.limit(Some(300));
        let mut cluster = Cluster::relay_on(SERVER_IP, "", false, "self_signed = true").await;
        cluster
            .add_worker("two-viewers", 2, "metrics_listen = \"127.0.0.1:9466\"")
            .await;
        let (far_link, far_ws) = (Arc::clone(&link), cluster.ws_url("far-viewer"));
        let far = tokio::task::spawn_blocking(move || far_link.probe(&far_ws, 12.0, None));
        // The near viewer runs here: its path to the worker is this namespace's own, unlimited.
        let near_ws = cluster.ws_url("near-viewer");
        let near = tokio::task::spawn_blocking(move || run_probe(None, &near_ws, 12.0, None));
        tokio::time::sleep(std::time::Duration::from_secs(9)).await;
        let metrics = avatar_edge_tests::cluster::http_get("127.0.0.1:9466".parse().expect("addr"), "/metrics")
            .await
            .map(|(_, body)| body)
            .unwrap_or_default();
        let (far, near) = (far.await.expect("far"), near.await.expect("near"));
        eprintln!("far (300 kbit/s): {}", far.summary(3.0, 12.0));
        eprintln!("near (unlimited): {}", near.summary(3.0, 12.0));
        let level = |r: &Report| r.qualities().last().and_then(|(_, q)| q["level"].as_u64());
        assert!(near.fps(3.0, 12.0) >= 24.0, "near: {}", near.summary(3.0, 12.0));
        assert_eq!(level(&near), Some(0), "the near viewer keeps the best level");
        assert!(level(&far).is_some_and(|l| l > 0), "far: {}", far.summary(3.0, 12.0));
        assert!(far.fps(3.0, 12.0) >= 10.0, "far: {}", far.summary(3.0, 12.0));
        let sessions_at = |fps: &str| {
            metrics
                .lines()
                .filter(|l| l.starts_with("worker_video_level_sessions{") && l.contains(&format!("fps=\"{fps}\"")))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum::<f64>()
        };
        assert_eq!(sessions_at("25"), 1.0, "one session at the best level:\n{metrics}");
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with("worker_video_estimate_kbps_sum ")),
            "{metrics}"
        );
        let lowered: f64 = ["20", "15", "10"].iter().map(|f| sessions_at(f)).sum();
        assert_eq!(lowered, 1.0, "one session lowered:\n{metrics}");
    });
}

#[test]
fn chromium_at_200_kilobits_keeps_a_steady_smaller_picture() {
    netns::run("chromium_at_200_kilobits_keeps_a_steady_smaller_picture", || async {
        use std::time::Duration;
        let (_link, cluster, mut browser) = chromium_behind(200).await;
        let stats = "window.avatarEdge ? window.avatarEdge.stats() : {}";
        let decoded = |s: &serde_json::Value| s["framesDecoded"].as_u64().unwrap_or(0);
        let playing = browser.poll(stats, Duration::from_secs(15), |s| decoded(s) >= 5).await;
        assert!(decoded(&playing) >= 5, "{playing}\n{}", cluster.logs());
        // The start overshoots the link until the first estimates arrive; then the picture must
        // settle on a step it can carry, and hold it: no second without pictures. (A loss on this
        // link costs a keyframe, which takes most of a second at the ~60 kbit/s video gets here:
        // one second in eight with a single frame is a recovery, not a freeze; CI saw 12.8 fps
        // with such a second.)
        tokio::time::sleep(Duration::from_secs(3)).await;
        let (from, at) = (
            decoded(&browser.eval(stats).await.expect("stats")),
            std::time::Instant::now(),
        );
        let mut slowest = u64::MAX;
        let mut last = from;
        for _ in 0..8 {
            tokio::time::sleep(Duration::from_secs(1)).await;
            let now = decoded(&browser.eval(stats).await.expect("stats"));
            slowest = slowest.min(now - last);
            last = now;
        }
        let fps = (last - from) as f64 / at.elapsed().as_secs_f64();
        let panel = browser
            .eval("[document.getElementById('p-estimate').textContent, document.getElementById('p-level').textContent]")
            .await
            .expect("panel");
        eprintln!("chromium under 200 kbit/s: {fps:.1} fps, slowest second {slowest} frames, panel {panel}");
        assert!(
            fps >= 8.0 && slowest >= 1,
            "a steady picture at 200 kbit/s: {fps:.1} fps, slowest second {slowest} frames; panel {panel}\n{}",
            cluster.logs()
        );
        assert!(
            panel[1].as_str().is_some_and(|s| s.contains("lowered")),
            "the panel says the picture is lowered: {panel}"
        );
    });
}
