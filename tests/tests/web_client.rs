//! The page end users open, and the SDK customers embed, in headless Chromium against the real
//! relay and worker (issue 18): a desktop and a phone viewport with screenshots, an accessibility
//! audit (axe-core), reconnecting after a relay restart without a reload, and a customer page
//! written only against `avatar-edge.js`.
//!
//! Screenshots go to `target/test-artifacts/`.

use avatar_edge_tests::cdp::{Chromium, SESSION_STATE};
use avatar_edge_tests::cluster::{write_certificate, Cluster};
use avatar_edge_tests::netns;
use serde_json::Value;
use std::path::PathBuf;
use std::time::{Duration, Instant};

const SECS: fn(u64) -> Duration = Duration::from_secs;

async fn wait_live(browser: &mut Chromium, cluster: &Cluster, timeout: Duration) -> Duration {
    let started = Instant::now();
    let state = browser.poll(SESSION_STATE, timeout, |v| v == "live").await;
    if state != "live" {
        let events = browser
            .eval("JSON.stringify(window.avatarEdge.state.events.map(e => e.type === 'error' ? e.code : e.type))")
            .await
            .unwrap_or(Value::Null);
        panic!(
            "the page never played ({state}); its events {events}\n{}",
            cluster.logs()
        );
    }
    started.elapsed()
}

/// After a relay restart: the page opens a new socket (a new session id, not `first_socket`),
/// then a new peer that plays.
async fn live_on_a_new_socket(browser: &mut Chromium, cluster: &Cluster, first_socket: &Value) {
    let second_socket = browser
        .poll(
            "window.avatarEdge.state.ws ? window.avatarEdge.state.ws.url : null",
            SECS(10),
            |v| v.is_string() && v != first_socket,
        )
        .await;
    assert_ne!(*first_socket, second_socket, "a new socket (a new session id)");
    wait_live(browser, cluster, SECS(10)).await;
}

/// Type `text` into the page's box and press Send, as a user would.
async fn ask(browser: &mut Chromium, text: &str) {
    let js = format!(
        "(() => {{ const m = document.getElementById('message'); m.value = {}; document.getElementById('send').click(); return true; }})()",
        Value::from(text)
    );
    browser.eval(&js).await.expect("ask");
}

/// The conversation as `[class, text]` pairs.
async fn turns(browser: &mut Chromium) -> Vec<(String, String)> {
    let v = browser
        .eval("JSON.stringify([...document.querySelectorAll('#turns .turn')].map(t => [t.className, t.querySelector('.text').textContent]))")
        .await
        .expect("turns");
    serde_json::from_str(v.as_str().unwrap_or("[]")).expect("turns JSON")
}

fn artefact(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../target/test-artifacts")
        .join(name)
}

/// Run axe-core (installed by scripts/install-deps) in the page: its serious and critical violations.
async fn axe_violations(browser: &mut Chromium) -> Vec<Value> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.tools/web/node_modules/axe-core/axe.min.js");
    let source = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("{}: {e} (scripts/install-deps installs axe-core)", path.display()));
    browser.eval(&source).await.expect("load axe-core");
    let result = browser
        .eval("axe.run(document).then(r => JSON.stringify(r.violations.filter(v => v.impact === 'serious' || v.impact === 'critical').map(v => ({id: v.id, impact: v.impact, nodes: v.nodes.map(n => n.target)}))))")
        .await
        .expect("axe.run");
    serde_json::from_str(result.as_str().unwrap_or("[]")).expect("axe JSON")
}

/// What the viewport shows: each element's box inside it, and no horizontal scroll.
const LAYOUT: &str = r#"(() => {
  const inside = (id) => { const r = document.getElementById(id).getBoundingClientRect();
    return r.width > 0 && r.height > 0 && r.left >= 0 && r.top >= 0 && r.right <= innerWidth + 0.5 && r.bottom <= innerHeight + 0.5; };
  return JSON.stringify({
    video: inside('video'), message: inside('message'), send: inside('send'), stop: inside('stop'),
    badge: inside('badge'), turns: inside('turns'),
    horizontalScroll: document.documentElement.scrollWidth > innerWidth,
    rawJsonVisible: document.body.innerText.includes('{"type"'),
    debugHidden: document.getElementById('debug').hidden,
    chooserShown: getComputedStyle(document.getElementById('avatar-choice')).display !== 'none',
  });
})()"#;

#[test]
fn the_page_plays_and_talks_on_a_desktop_and_a_phone_and_passes_an_accessibility_audit() {
    netns::run(
        "the_page_plays_and_talks_on_a_desktop_and_a_phone_and_passes_an_accessibility_audit",
        || async {
            let cluster = Cluster::start().await;
            for (name, width, height, mobile) in [("desktop", 1280, 800, false), ("phone", 390, 844, true)] {
                let url = format!("http://{}/?avatar=avatar_tutor_13&lang=en", cluster.relay.http);
                let mut browser = Chromium::launch(&url).await.expect("chromium");
                browser.viewport(width, height, mobile).await.expect("viewport");
                wait_live(&mut browser, &cluster, SECS(15)).await;

                // A question: the conversation grows with the user's turn and the streamed answer.
                ask(&mut browser, "Hello, who are you?").await;
                let speaking = browser
                    .poll("window.avatarEdge.state.speaking", SECS(10), |v| !v.is_null())
                    .await;
                assert!(
                    !speaking.is_null(),
                    "{name}: the avatar never spoke\n{}",
                    cluster.logs()
                );
                let conversation = turns(&mut browser).await;
                assert_eq!(
                    conversation.first().map(|t| t.1.as_str()),
                    Some("Hello, who are you?"),
                    "{name}"
                );
                assert!(
                    conversation
                        .iter()
                        .any(|(class, text)| class.contains("tutor") && !text.is_empty()),
                    "{name}: the answer streams into the conversation: {conversation:?}"
                );
                let stop_enabled = browser
                    .eval("!document.getElementById('stop').disabled")
                    .await
                    .expect("stop");
                assert_eq!(stop_enabled, true, "{name}: Stop is offered while the tutor speaks");
                browser
                    .eval("document.getElementById('stop').click()")
                    .await
                    .expect("stop");
                let after = browser
                    .poll("window.avatarEdge.state.speaking", SECS(3), Value::is_null)
                    .await;
                assert!(after.is_null(), "{name}: Stop ends the speech");

                // The connection panel opens from the badge and shows live numbers.
                browser
                    .eval("document.getElementById('badge').click()")
                    .await
                    .expect("badge");
                let fps = browser
                    .poll(
                        "parseFloat(document.getElementById('p-fps').textContent) || 0",
                        SECS(4),
                        |v| v.as_f64().unwrap_or(0.0) > 5.0,
                    )
                    .await;
                assert!(fps.as_f64().unwrap_or(0.0) > 5.0, "{name}: panel fps {fps}");
                let rtt = browser
                    .eval("document.getElementById('p-rtt').textContent")
                    .await
                    .expect("rtt");
                let path = browser
                    .eval("document.getElementById('p-path').textContent")
                    .await
                    .expect("path");
                let badge = browser
                    .eval("document.getElementById('badge').dataset.quality")
                    .await
                    .expect("badge");
                assert!(rtt.as_str().is_some_and(|r| r.ends_with("ms")), "{name}: rtt {rtt}");
                assert!(path.as_str().is_some_and(|p| p.contains('→')), "{name}: path {path}");
                assert!(
                    matches!(badge.as_str(), Some("good" | "relayed" | "poor")),
                    "{name}: badge {badge}"
                );
                browser
                    .eval("document.getElementById('badge').click()")
                    .await
                    .expect("close panel");

                // What the user sees: everything in the viewport, no sideways scroll, no raw JSON.
                let layout: Value =
                    serde_json::from_str(browser.eval(LAYOUT).await.expect("layout").as_str().unwrap_or("{}"))
                        .expect("layout JSON");
                for key in ["video", "message", "send", "stop", "badge", "turns"] {
                    assert_eq!(layout[key], true, "{name}: #{key} not fully in the viewport: {layout}");
                }
                assert_eq!(layout["horizontalScroll"], false, "{name}: {layout}");
                assert_eq!(layout["rawJsonVisible"], false, "{name}: {layout}");
                assert_eq!(layout["debugHidden"], true, "{name}: {layout}");
                assert_eq!(
                    layout["chooserShown"], false,
                    "{name}: one avatar, no chooser: {layout}"
                );
                let shot = artefact(&format!("web-client-{name}.png"));
                browser.screenshot(&shot).await.expect("screenshot");
                assert!(std::fs::metadata(&shot).map(|m| m.len() > 10_000).unwrap_or(false));

                let violations = axe_violations(&mut browser).await;
                assert!(violations.is_empty(), "{name}: axe-core: {violations:#?}");
                eprintln!(
                    "web client ({name} {width}×{height}): plays, talks, stops; panel {fps} fps, {rtt}; axe clean; {}",
                    shot.display()
                );
            }

            // The raw event log only with ?debug=1; the UI in Chinese for a Chinese browser.
            let url = format!("http://{}/?avatar=avatar_tutor_13&debug=1&lang=zh", cluster.relay.http);
            let mut browser = Chromium::launch(&url).await.expect("chromium");
            wait_live(&mut browser, &cluster, SECS(15)).await;
            let log = browser
                .eval("document.getElementById('events').innerText")
                .await
                .expect("log");
            assert!(log.as_str().is_some_and(|l| l.contains("\"type\"")), "debug log: {log}");
            let send = browser
                .eval("document.getElementById('send').textContent")
                .await
                .expect("send");
            assert_eq!(send, "发送");
        },
    );
}

/// Record in the page when each video frame is shown (`requestVideoFrameCallback`), across the
/// SDK's swap to a new peer: a watchdog asks again (once) whenever no frame came for 100 ms.
const RECORD_FRAMES: &str = "(() => { const v = document.querySelector('video'); window.shownAt = []; \
    let id = 0; const tick = () => { window.shownAt.push(performance.now()); id = v.requestVideoFrameCallback(tick); }; \
    id = v.requestVideoFrameCallback(tick); \
    setInterval(() => { const last = window.shownAt[window.shownAt.length - 1] || 0; \
      if (performance.now() - last > 100) { v.cancelVideoFrameCallback(id); id = v.requestVideoFrameCallback(tick); } }, 50); \
    return true; })()";

/// The longest time without a shown frame (`RECORD_FRAMES`) from `since` (the page's clock) on,
/// where it began (ms after `since`), how many frames were shown after it, and in all.
async fn longest_cut(browser: &mut Chromium, since: f64) -> (f64, f64, usize, usize) {
    let shown: Vec<f64> = serde_json::from_value(
        browser
            .eval(&format!("window.shownAt.filter(t => t >= {since})"))
            .await
            .expect("frames"),
    )
    .expect("numbers");
    let (cut, at) = shown
        .windows(2)
        .map(|w| (w[1] - w[0], w[0] - since))
        .fold((0.0, 0.0), |a, b| if b.0 > a.0 { b } else { a });
    let after = shown.iter().filter(|t| **t > since + at + cut).count();
    (cut, at, after, shown.len())
}

/// A page whose media goes through the relay's embedded TURN over TCP (`ice=relay`, and no UDP
/// to the TURN port: a browser whose network blocks UDP), first across a relay restart, then across a
/// certificate renewal. The restart kills the TURN allocation with the old process, so the
/// picture stops until the page has reconnected through the new one: measured here, and
/// documented in deploy.md ("Upgrade and rollback"). The renewal is a reload: no cut at all.
#[test]
fn a_session_relayed_by_the_relays_turn_comes_back_after_a_restart_and_a_renewal_cuts_nothing() {
    netns::run(
        "a_session_relayed_by_the_relays_turn_comes_back_after_a_restart_and_a_renewal_cuts_nothing",
        || async {
            use avatar_edge_tests::turnutils::{embedded_toml, free_port};
            let (port, tls_port) = (free_port("127.0.0.1"), free_port("127.0.0.1"));
            // No UDP to the TURN server: the page's TURN goes over TCP. (The worker, on the same
            // host, sends its own TURN through the tunnel, as a worker whose network lets UDP
            // out only to the tunnel's port does.)
            netns::sh(&format!("iptables -A INPUT -p udp --dport {port} -j DROP"));
            // Certificate files, so the restarted relay has the one the worker pinned.
            let certs = tempfile::tempdir().expect("tempdir");
            let (tls, _) = write_certificate(certs.path());
            let turn = embedded_toml(port, tls_port, "\"127.0.0.0/8\"");
            let mut cluster = Cluster::relay_with_tls(&turn, false, &tls).await;
            cluster
                .add_worker("worker-1", 2, "[tunnel]\nturn_via_quic = true")
                .await;
            // Media only through the relay's TURN (the page's `ice=relay`).
            let url = format!("http://{}/?avatar=avatar_tutor_13&ice=relay", cluster.relay.http);
            let mut browser = Chromium::launch(&url).await.expect("chromium");
            wait_live(&mut browser, &cluster, SECS(15)).await;
            let relayed = |v: &Value| v.as_str().is_some_and(|p| p.starts_with("relay"));
            let over_tcp = "(async () => { const r = await window.avatarEdge.state.session.peer.getStats(); \
                let p = null; r.forEach(s => { if (s.type === 'transport' && s.selectedCandidatePairId) p = r.get(s.selectedCandidatePairId); }); \
                const l = p && r.get(p.localCandidateId); return l ? `${l.candidateType}/${l.relayProtocol}` : null; })()";
            let pair = browser.poll("window.avatarEdge.state.pair", SECS(10), relayed).await;
            let path = browser.eval(over_tcp).await.expect("stats");
            assert!(
                relayed(&pair) && path == "relay/tcp",
                "the page's media goes through TURN over TCP: {pair} {path}"
            );
            browser.eval(RECORD_FRAMES).await.expect("record frames");
            tokio::time::sleep(SECS(1)).await;
            let first_socket = browser.eval("window.avatarEdge.state.ws.url").await.expect("url");

            // The restart (an upgrade): stop, start on the same ports.
            let stopping = browser
                .eval("performance.now()")
                .await
                .expect("now")
                .as_f64()
                .unwrap_or(0.0);
            let restarted = Instant::now();
            cluster.stop_relay();
            let down = restarted.elapsed();
            cluster.restart_relay().await;
            let listening = restarted.elapsed();
            live_on_a_new_socket(&mut browser, &cluster, &first_socket).await;
            let pair = browser.poll("window.avatarEdge.state.pair", SECS(10), relayed).await;
            let path = browser.eval(over_tcp).await.expect("stats");
            assert!(
                relayed(&pair) && path == "relay/tcp",
                "the new peer goes through TURN over TCP too: {pair} {path}"
            );
            tokio::time::sleep(SECS(2)).await;
            let (cut, at, after, _) = longest_cut(&mut browser, stopping - 1000.0).await;
            eprintln!(
                "TURN-relayed session (TCP) across a relay restart: the picture stopped {cut:.0} ms \
                 (from {:.0} ms after the stop began); the old relay exited after {down:?}, the new \
                 one listened {listening:?} after the stop began; {after} frames after",
                at - 1000.0
            );
            assert!(after >= 25, "the picture plays again: {after} frames after the cut");
            assert!(
                cut < 2000.0,
                "a relay restart cut the TURN-relayed picture for {cut:.0} ms\n{}",
                cluster.logs()
            );

            // Then certbot renews: new files, a reload (SIGHUP). Same process, no cut.
            let renewing = browser
                .eval("performance.now()")
                .await
                .expect("now")
                .as_f64()
                .unwrap_or(0.0);
            write_certificate(certs.path());
            avatar_edge_tests::cluster::signal(&cluster.relay.child, "HUP");
            cluster
                .wait_for_log(&cluster.relay.log, "certificate reloaded", SECS(5))
                .await;
            tokio::time::sleep(SECS(2)).await;
            assert!(
                cluster.relay.child.try_wait().expect("wait").is_none(),
                "the relay runs on after the reload"
            );
            let (cut, _, _, shown) = longest_cut(&mut browser, renewing - 500.0).await;
            eprintln!("TURN-relayed session (TCP) across a certificate reload: longest gap {cut:.0} ms, {shown} frames around it");
            assert!(shown >= 50, "frames kept coming: {shown}");
            assert!(
                cut <= 200.0,
                "a certificate reload left a {cut:.0} ms gap in the picture"
            );
        },
    );
}

#[test]
fn the_page_reconnects_by_itself_after_a_relay_restart() {
    netns::run("the_page_reconnects_by_itself_after_a_relay_restart", || async {
        // A certificate from files, so the restarted relay has the one the worker pinned.
        let (mut cluster, _certs) = Cluster::relay_with_cert_files().await;
        cluster.add_worker("worker-1", 2, "").await;
        let url = format!("http://{}/?avatar=avatar_tutor_13", cluster.relay.http);
        let mut browser = Chromium::launch(&url).await.expect("chromium");
        wait_live(&mut browser, &cluster, SECS(15)).await;
        let first_socket = browser.eval("window.avatarEdge.state.ws.url").await.expect("url");

        let restarted = Instant::now();
        cluster.stop_relay();
        cluster.restart_relay().await;
        let listening = Instant::now();
        live_on_a_new_socket(&mut browser, &cluster, &first_socket).await;
        let took = listening.elapsed();
        let total = restarted.elapsed();
        eprintln!("web client: live again {total:?} after the relay restart began ({took:?} after it listened)");
        assert!(
            took < SECS(3),
            "the page took {took:?} to play again after the relay came back"
        );

        // A new question is answered, with no reload.
        ask(&mut browser, "Are you back?").await;
        let answered = browser
            .poll(
                "[...document.querySelectorAll('#turns .turn.tutor .text')].map(t => t.textContent).join('')",
                SECS(10),
                |v| v.as_str().is_some_and(|s| !s.is_empty()),
            )
            .await;
        assert!(
            answered.as_str().is_some_and(|s| !s.is_empty()),
            "no answer after reconnecting\n{}",
            cluster.logs()
        );
    });
}

#[test]
fn a_customer_page_built_only_on_the_sdk_plays_and_talks() {
    netns::run("a_customer_page_built_only_on_the_sdk_plays_and_talks", || async {
        // The relay serves the repository's web-client directory, examples included.
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../web-client");
        let dir = dir.canonicalize().expect("web-client");
        let mut cluster =
            Cluster::relay_sections("", &format!("web_client_dir = \"{}\"", dir.display()), "", false).await;
        cluster.add_worker("worker-1", 2, "").await;
        let url = format!("http://{}/examples/minimal.html", cluster.relay.http);
        let mut browser = Chromium::launch(&url).await.expect("chromium");
        let state = browser
            .poll(
                "window.example ? window.example.session.state : 'loading'",
                SECS(15),
                |v| v == "live",
            )
            .await;
        assert_eq!(state, "live", "the example never played\n{}", cluster.logs());
        let frames = browser
            .poll(
                "window.example.session.stats().then(s => s.framesDecoded)",
                SECS(5),
                |v| v.as_u64().unwrap_or(0) >= 25,
            )
            .await;
        assert!(frames.as_u64().unwrap_or(0) >= 25, "frames {frames}");
        browser
            .eval("(() => { document.getElementById('question').value = 'Hello, who are you?'; document.querySelector('#ask button').click(); return true; })()")
            .await
            .expect("ask");
        let answer = browser
            .poll("document.getElementById('answer').textContent", SECS(10), |v| {
                v.as_str().is_some_and(|s| s.contains("Hello"))
            })
            .await;
        assert!(
            answer.as_str().is_some_and(|s| s.contains("Hello")),
            "the example shows the answer: {answer}\n{}",
            cluster.logs()
        );
    });
}

#[test]
fn with_no_tutor_online_the_page_says_so_and_plays_when_one_arrives() {
    netns::run(
        "with_no_tutor_online_the_page_says_so_and_plays_when_one_arrives",
        || async {
            let mut cluster = Cluster::relay_only("").await;
            let url = format!("http://{}/?avatar=avatar_tutor_13&lang=en", cluster.relay.http);
            let mut browser = Chromium::launch(&url).await.expect("chromium");
            let notice = browser
                .poll("document.getElementById('notice-text').textContent", SECS(10), |v| {
                    v.as_str().is_some_and(|s| s.contains("No tutor is online"))
                })
                .await;
            assert!(
                notice.as_str().is_some_and(|s| s.contains("No tutor is online")),
                "notice: {notice}"
            );
            let retry_shown = browser
                .eval("!document.getElementById('retry').hidden")
                .await
                .expect("retry");
            assert_eq!(retry_shown, true, "a Try again button");
            let send_enabled = browser
                .eval("!document.getElementById('send').disabled")
                .await
                .expect("send");
            assert_eq!(send_enabled, false, "nothing to send to yet");
            // A worker arrives: the page plays without a reload or a click (the SDK retries with
            // backoff; the button only makes it sooner).
            cluster.add_worker("worker-1", 2, "").await;
            let took = wait_live(&mut browser, &cluster, SECS(15)).await;
            eprintln!("web client: playing {took:?} after a worker registered");
            let notice = browser
                .eval("document.getElementById('notice-text').textContent")
                .await
                .expect("notice");
            assert_eq!(notice, "", "the notice is gone once it plays");
        },
    );
}

#[test]
fn with_several_avatars_the_page_offers_a_chooser_by_name() {
    netns::run("with_several_avatars_the_page_offers_a_chooser_by_name", || async {
        let mut cluster = Cluster::relay_only("").await;
        let dir = avatar_edge_tests::cluster::avatar_dir(
            cluster.dir.path(),
            &[("tutor_a", "Ms. Alpha"), ("tutor_b", "Mr. Beta")],
        );
        cluster
            .add_worker("gpu-1", 2, &format!("avatar_dir = \"{}\"", dir.display()))
            .await;
        let (status, body) = avatar_edge_tests::cluster::http_get(cluster.relay.http, "/api/avatars")
            .await
            .expect("avatars");
        assert_eq!(status, 200);
        let listed: Value = serde_json::from_str(&body).expect("JSON");
        assert_eq!(
            listed["avatars"],
            serde_json::json!([
                {"id": "tutor_a", "name": "Ms. Alpha", "preview": "/api/avatars/tutor_a/preview.jpg"},
                {"id": "tutor_b", "name": "Mr. Beta", "preview": "/api/avatars/tutor_b/preview.jpg"}
            ])
        );

        let url = format!("http://{}/?lang=en", cluster.relay.http);
        let mut browser = Chromium::launch(&url).await.expect("chromium");
        let options = browser.poll(
            "getComputedStyle(document.getElementById('avatar-choice')).display === 'none' ? null : [...document.querySelectorAll('#avatar option')].map(o => o.textContent)",
            SECS(10),
            |v| v.is_array(),
        )
        .await;
        assert_eq!(
            options,
            serde_json::json!(["Ms. Alpha", "Mr. Beta"]),
            "the chooser shows the names"
        );
        wait_live(&mut browser, &cluster, SECS(15)).await;
        // Choosing the other avatar starts a session with it.
        browser
            .eval("(() => { const s = document.getElementById('avatar'); s.value = 'tutor_b'; s.dispatchEvent(new Event('change')); return true; })()")
            .await
            .expect("choose");
        let log = cluster.workers[0].log.clone();
        let took = avatar_edge_tests::cluster::wait_for_count(&log, "avatar=tutor_b", 1, SECS(10)).await;
        assert!(took.is_some(), "no session with tutor_b:\n{}", cluster.logs());
        wait_live(&mut browser, &cluster, SECS(15)).await;
    });
}

#[test]
fn a_page_the_auth_policy_refuses_says_so_and_does_not_retry() {
    netns::run("a_page_the_auth_policy_refuses_says_so_and_does_not_retry", || async {
        let policies = format!(
            "[policies]\nreload_poll_ms = 0\n[policies.auth]\npath = \"{}\"\nconfig = {{ secret = \"a-policy-secret-0123456789\" }}\n",
            avatar_edge_tests::policy_module("hmac-token").display()
        );
        let mut cluster = Cluster::relay_only(&policies).await;
        cluster.add_worker("worker-1", 2, "").await;
        // No token: the relay's auth module refuses the page.
        let url = format!("http://{}/?lang=en", cluster.relay.http);
        let mut browser = Chromium::launch(&url).await.expect("chromium");
        let state = browser.poll(SESSION_STATE, SECS(10), |v| v == "failed").await;
        assert_eq!(state, "failed", "{}", cluster.logs());
        let notice = browser
            .eval("document.getElementById('notice-text').textContent")
            .await
            .expect("notice");
        assert!(
            notice.as_str().is_some_and(|n| n.contains("could not sign you in")),
            "{notice}"
        );
        let retry_shown = browser
            .eval("!document.getElementById('retry').hidden")
            .await
            .expect("retry");
        assert_eq!(retry_shown, false, "no point retrying a refusal");
        // No reconnect loop: one attempt (its ICE-server request and its socket) in 3 s.
        tokio::time::sleep(SECS(3)).await;
        let refusals = avatar_edge_tests::cluster::log_text(&cluster.relay.log)
            .matches("connect refused by the auth policy")
            .count();
        assert_eq!(refusals, 2, "{}", cluster.logs());
    });
}

/// The video's box against its stream: the shape each has, and whether the video, the input and
/// its buttons are in view.
const SHAPE: &str = r#"(() => {
  const video = document.getElementById('video');
  const r = video.getBoundingClientRect();
  const inside = (id) => { const b = document.getElementById(id).getBoundingClientRect();
    return b.width > 0 && b.height > 0 && b.left >= 0 && b.top >= 0 && b.right <= innerWidth + 0.5 && b.bottom <= innerHeight + 0.5; };
  return JSON.stringify({
    stream: [video.videoWidth, video.videoHeight], box: [r.width, r.height],
    shaped: document.querySelector('.stage').style.getPropertyValue('--avatar-ar') !== '',
    video: inside('video'), message: inside('message'), send: inside('send'), stop: inside('stop'),
    horizontalScroll: document.documentElement.scrollWidth > innerWidth,
  });
})()"#;

/// Any shape of avatar: a 16:9 and a 9:16 picture each get a box of their own shape (the page
/// follows the stream), and the video, the input and its buttons stay in view, on a desktop, a
/// tablet held upright and a phone. (The workers draw the built-in avatar at those sizes: `[video] width, height`.)
#[test]
fn a_16_9_and_a_9_16_avatar_keep_their_shape_on_a_desktop_and_a_phone() {
    netns::run(
        "a_16_9_and_a_9_16_avatar_keep_their_shape_on_a_desktop_and_a_phone",
        || async {
            for (w, h) in [(1280u32, 720u32), (720, 1280)] {
                let mut cluster = Cluster::relay_only("").await;
                cluster
                    .add_worker("shaped", 2, &format!("[video]\nwidth = {w}\nheight = {h}"))
                    .await;
                for (name, vw, vh, mobile) in [
                    ("desktop", 1280, 800, false),
                    ("tablet", 820, 1180, false),
                    ("phone", 390, 844, true),
                ] {
                    let url = format!("http://{}/?avatar=avatar_tutor_13&lang=en", cluster.relay.http);
                    let mut browser = Chromium::launch(&url).await.expect("chromium");
                    browser.viewport(vw, vh, mobile).await.expect("viewport");
                    wait_live(&mut browser, &cluster, SECS(15)).await;
                    // Once the stream has a size and the page has taken its shape from it.
                    let shape = browser
                        .poll(SHAPE, SECS(5), |v| {
                            serde_json::from_str::<Value>(v.as_str().unwrap_or("{}"))
                                .is_ok_and(|s| s["stream"][0].as_f64().is_some_and(|x| x > 0.0) && s["shaped"] == true)
                        })
                        .await;
                    let s: Value = serde_json::from_str(shape.as_str().unwrap_or("{}")).expect("shape JSON");
                    eprintln!("{w}×{h} on a {name}: {s}");
                    let f = |v: &Value| v.as_f64().unwrap_or(0.0);
                    assert_eq!(
                        (f(&s["stream"][0]), f(&s["stream"][1])),
                        (f64::from(w), f64::from(h)),
                        "{name}: the stream's size: {s}"
                    );
                    let (box_ratio, ratio) = (f(&s["box"][0]) / f(&s["box"][1]).max(1.0), f64::from(w) / f64::from(h));
                    // On a phone the box may be cut to half the screen's height: the picture is
                    // then contained in it, never cropped or squeezed.
                    if !mobile || ratio >= 1.0 {
                        assert!(
                            (box_ratio / ratio - 1.0).abs() < 0.03,
                            "{w}×{h} on a {name}: the box has the picture's shape: {s}"
                        );
                    }
                    for key in ["video", "message", "send", "stop"] {
                        assert_eq!(s[key], true, "{w}×{h} on a {name}: {key} in view: {s}");
                    }
                    assert_eq!(s["horizontalScroll"], false, "{w}×{h} on a {name}: {s}");
                }
            }
        },
    );
}
