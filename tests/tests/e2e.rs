//! End to end with the real relay and worker processes and a Rust WebRTC client.
//!
//! Each test runs in its own loopback-only network namespace (see `netns`).

use avatar_edge_tests::cluster::Cluster;
use avatar_edge_tests::netns;
use avatar_edge_tests::rtc_client::RtcClient;
use avatar_edge_tests::signaling::Signaling;
use serde_json::json;
use std::time::{Duration, Instant};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// Offer, answer, connect; on failure, panic with every process's log.
async fn play(sig: &mut Signaling, cluster: &Cluster, avatar: &str) -> RtcClient {
    avatar_edge_tests::play(sig, avatar)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()))
}

fn error_code(ev: &serde_json::Value) -> &str {
    assert_eq!(ev["type"], "error", "expected an error event, got {ev}");
    assert!(
        ev["message"].as_str().is_some_and(|m| !m.is_empty()),
        "error without a message: {ev}"
    );
    ev["code"].as_str().expect("code")
}

#[test]
fn rust_client_plays_idle_avatar_through_relay_and_tunnel() {
    netns::run("rust_client_plays_idle_avatar_through_relay_and_tunnel", || async {
        let cluster = Cluster::start().await;
        let mut sig = Signaling::connect(&cluster.ws_url("rust-1")).await.expect("ws");
        let client = RtcClient::new(true).await.expect("client");
        sig.send_offer(&client.offer().await.expect("offer"), "avatar_tutor_13")
            .await
            .expect("send");
        let assigned = sig.next_event(SECS(10)).await.expect("event");
        assert_eq!(assigned["type"], "session_assigned", "{assigned}");
        assert_eq!(assigned["worker_id"], "worker-1");
        let answer = sig.wait_for("webrtc_answer", SECS(10)).await.expect("answer");
        let sdp = answer["sdp"].as_str().expect("sdp");
        assert!(answer["timestamp"].as_str().is_some_and(|t| t.len() >= 19), "{answer}");
        let candidates = sdp.lines().filter(|l| l.starts_with("a=candidate:")).count();
        assert!(candidates > 0, "answer carries no candidates (non-trickle):\n{sdp}");
        assert!(sdp.contains("H264"), "answer negotiated H.264:\n{sdp}");
        assert!(sdp.contains("opus/48000"), "answer negotiated Opus:\n{sdp}");
        // Only what the worker sends: no codec it never uses appears in the answer.
        for unused in ["VP8/", "VP9/", "AV1/", "G722/", "PCMU/", "PCMA/"] {
            assert!(
                !sdp.contains(unused),
                "answer lists {unused} though the worker never sends it:\n{sdp}"
            );
        }
        if std::env::var_os("AE_SHOW_SDP").is_some() {
            eprintln!("{sdp}");
        }
        client.accept_answer(sdp).await.expect("accept");
        client.connected(SECS(10)).await.expect("ICE connects");
        let connected = Instant::now();
        let stats = client.wait_frames(100, SECS(6)).await;
        assert!(
            stats.frames_decoded >= 100,
            "decoded {} frames in 6 s: {stats:?}",
            stats.frames_decoded
        );
        assert_eq!((stats.width, stats.height), (512, 512));
        assert_eq!(stats.codec.to_ascii_lowercase(), "video/h264");
        assert_eq!(stats.decode_errors, 0);
        eprintln!("100 frames {:?} after connect; stats {stats:?}", connected.elapsed());
        client.close().await;
        sig.close().await;
    });
}

#[test]
fn bad_input_gets_error_events_and_the_socket_still_works() {
    netns::run("bad_input_gets_error_events_and_the_socket_still_works", || async {
        let cluster = Cluster::start().await;
        let mut sig = Signaling::connect(&cluster.ws_url("bad-input")).await.expect("ws");
        let candidate = json!({"type": "webrtc_ice_candidate", "user_id": 5,
            "candidate": {"candidate": "candidate:1 1 udp 2122260223 127.0.0.1 5000 typ host", "sdpMid": "0", "sdpMLineIndex": 0}});
        // Over the message cap (64 KiB), under the frame cap (128 KiB): an error event, socket kept.
        let huge = json!({"type": "text_webrtc", "message": "x".repeat(100 << 10)}).to_string();
        let no_media = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n";
        let cases: Vec<(String, &str)> = vec![
            ("this is not json".into(), "bad_json"),
            ("[1,2,3]".into(), "bad_json"),
            (json!({"type": "make_coffee"}).to_string(), "unknown_type"),
            (
                json!({"type": "webrtc_answer", "sdp": "v=0"}).to_string(),
                "unknown_type",
            ),
            (
                json!({"type": "webrtc_offer", "user_id": 5}).to_string(),
                "invalid_message",
            ),
            (json!({"type": "text_webrtc"}).to_string(), "invalid_message"),
            (
                json!({"type": "webrtc_offer", "sdp": "hello, I am not SDP"}).to_string(),
                "bad_sdp",
            ),
            (
                json!({"type": "webrtc_offer", "sdp": no_media}).to_string(),
                "offer_without_media",
            ),
            (huge, "message_too_large"),
            (candidate.to_string(), "no_session"),
            (
                json!({"type": "text_webrtc", "message": "hi"}).to_string(),
                "no_session",
            ),
        ];
        for (input, want) in &cases {
            sig.send_text(input.clone()).await.expect("send");
            let ev = sig
                .next_event(SECS(5))
                .await
                .unwrap_or_else(|e| panic!("no reply to {:.60}: {e}", input));
            assert_eq!(error_code(&ev), *want, "for input {:.80}", input);
        }
        // An SDP the worker's WebRTC stack cannot use passes the relay's quick check but is
        // refused by the worker, also as an error event.
        let broken = "v=0\r\no=- 1 2 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\na=rtpmap:96 H264/90000\r\n";
        sig.send_offer(broken, "a").await.expect("send");
        let ev = sig.wait_for("error", SECS(10)).await.expect("error");
        assert_eq!(error_code(&ev), "bad_sdp", "{ev}");
        // The socket survived all of it: a valid offer now plays.
        let client = play(&mut sig, &cluster, "a").await;
        let stats = client.wait_frames(25, SECS(5)).await;
        assert!(stats.frames_decoded >= 25, "{stats:?}");
        // Issue 26: once a session plays, a malformed candidate and an answer sent as an offer
        // are answered too (they used to be dropped in silence), and the session goes on.
        let malformed = json!({"type": "webrtc_ice_candidate",
            "candidate": {"candidate": "candidate:garbage", "sdpMid": "0", "sdpMLineIndex": 0}});
        sig.send_json(&malformed).await.expect("send");
        let ev = sig.wait_for("error", SECS(5)).await.expect("error");
        assert_eq!(error_code(&ev), "bad_candidate", "{ev}");
        let answer_as_offer = RtcClient::new(true)
            .await
            .expect("client")
            .offer()
            .await
            .expect("offer")
            .replace("a=setup:actpass", "a=setup:active");
        sig.send_offer(&answer_as_offer, "a").await.expect("send");
        let ev = sig.wait_for("error", SECS(5)).await.expect("error");
        assert_eq!(error_code(&ev), "bad_sdp", "{ev}");
        assert!(ev["message"].as_str().is_some_and(|m| m.contains("answer")), "{ev}");
        let before = client.wait_frames(1, SECS(1)).await.frames_decoded;
        let after = client.wait_frames(before + 25, SECS(5)).await.frames_decoded;
        assert!(after >= before + 25, "still playing: {before} → {after}");
    });
}

#[test]
fn offer_without_media_gets_the_fix_in_the_error() {
    netns::run("offer_without_media_gets_the_fix_in_the_error", || async {
        let cluster = Cluster::start().await;
        let mut sig = Signaling::connect(&cluster.ws_url("customer-page")).await.expect("ws");
        // What the customer's page does: createOffer() with no transceiver and no track.
        let client = RtcClient::new(false).await.expect("client");
        let offer = client.offer().await.expect("offer");
        assert!(
            !offer.contains("m="),
            "a peer without transceivers offers no media:\n{offer}"
        );
        sig.send_offer(&offer, "avatar_tutor_13").await.expect("send");
        let ev = sig.next_event(SECS(5)).await.expect("event");
        assert_eq!(error_code(&ev), "offer_without_media");
        let message = ev["message"].as_str().expect("message");
        assert!(
            message.contains("addTransceiver('video', {direction: 'recvonly'})"),
            "{message}"
        );
        assert!(message.contains("addTransceiver('audio'"), "{message}");
    });
}

#[test]
fn no_worker_is_an_error_and_the_socket_stays_open() {
    netns::run("no_worker_is_an_error_and_the_socket_stays_open", || async {
        let mut cluster = Cluster::relay_only("").await;
        let mut sig = Signaling::connect(&cluster.ws_url("early")).await.expect("ws");
        let client = RtcClient::new(true).await.expect("client");
        sig.send_offer(&client.offer().await.expect("offer"), "avatar_tutor_13")
            .await
            .expect("send");
        let ev = sig.next_event(SECS(5)).await.expect("event");
        assert_eq!(error_code(&ev), "no_worker");
        cluster.add_worker("late-worker", 2, "").await;
        let client = play(&mut sig, &cluster, "avatar_tutor_13").await;
        assert!(client.wait_frames(10, SECS(5)).await.frames_decoded >= 10);
    });
}

#[test]
fn worker_restart_reports_worker_lost_then_serves_again() {
    netns::run("worker_restart_reports_worker_lost_then_serves_again", || async {
        let mut cluster = Cluster::start().await;
        let mut sig = Signaling::connect(&cluster.ws_url("restart")).await.expect("ws");
        let client = play(&mut sig, &cluster, "a").await;
        assert!(client.wait_frames(10, SECS(5)).await.frames_decoded >= 10);
        let killed = Instant::now();
        cluster.kill_worker(0);
        let ev = sig
            .wait_for("error", SECS(10))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
        assert_eq!(error_code(&ev), "worker_lost");
        eprintln!("worker_lost {:?} after SIGKILL", killed.elapsed());
        client.close().await;
        // The same worker id comes back and a new session on the same socket works.
        while cluster.worker_count().await > 0 {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        cluster.add_worker("worker-1", 4, "").await;
        let client = play(&mut sig, &cluster, "a").await;
        let stats = client.wait_frames(25, SECS(5)).await;
        assert!(stats.frames_decoded >= 25, "{stats:?}");
    });
}

#[test]
fn avatar_directory_is_decoded_and_routed_by_avatar_id() {
    netns::run("avatar_directory_is_decoded_and_routed_by_avatar_id", || async {
        let mut cluster = Cluster::relay_only("").await;
        let avatars = avatar_edge_tests::cluster::avatar_dir(cluster.dir.path(), &[("tutor_7", "Tutor seven")]);
        cluster
            .add_worker("dir-worker", 2, &format!("avatar_dir = \"{}\"", avatars.display()))
            .await;

        let mut sig = Signaling::connect(&cluster.ws_url("dir")).await.expect("ws");
        let client = RtcClient::new(true).await.expect("client");
        sig.send_offer(&client.offer().await.expect("offer"), "someone_else")
            .await
            .expect("send");
        assert_eq!(error_code(&sig.next_event(SECS(5)).await.expect("event")), "no_worker");

        let client = play(&mut sig, &cluster, "tutor_7").await;
        let stats = client.wait_frames(50, SECS(6)).await;
        assert!(stats.frames_decoded >= 50, "{stats:?}");
        assert_eq!(
            (stats.width, stats.height),
            (320, 240),
            "the avatar streams at its own size, whatever `[video]` says"
        );
    });
}

#[test]
fn closing_the_socket_returns_the_workers_capacity() {
    netns::run("closing_the_socket_returns_the_workers_capacity", || async {
        let mut cluster = Cluster::relay_only("").await;
        cluster.add_worker("one-slot", 1, "").await;
        let mut first = Signaling::connect(&cluster.ws_url("first")).await.expect("ws");
        let client = play(&mut first, &cluster, "a").await;
        assert!(client.wait_frames(5, SECS(5)).await.frames_decoded >= 5);

        // The only slot is taken.
        let mut second = Signaling::connect(&cluster.ws_url("second")).await.expect("ws");
        let waiting = RtcClient::new(true).await.expect("client");
        second
            .send_offer(&waiting.offer().await.expect("offer"), "a")
            .await
            .expect("send");
        assert_eq!(error_code(&second.next_event(SECS(5)).await.expect("event")), "busy");

        // The first browser leaves: its session ends and the slot comes back.
        first.close().await;
        client.close().await;
        let deadline = Instant::now() + SECS(5);
        let played = loop {
            let client = RtcClient::new(true).await.expect("client");
            second
                .send_offer(&client.offer().await.expect("offer"), "a")
                .await
                .expect("send");
            let ev = second
                .wait_for_any(&["webrtc_answer", "error"], SECS(10))
                .await
                .expect("event");
            if ev["type"] == "webrtc_answer" {
                client
                    .accept_answer(ev["sdp"].as_str().expect("sdp"))
                    .await
                    .expect("accept");
                break client;
            }
            assert!(
                Instant::now() < deadline,
                "slot never returned: {ev}\n{}",
                cluster.logs()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        };
        assert!(played.wait_frames(5, SECS(5)).await.frames_decoded >= 5);
    });
}

#[test]
fn a_failed_peer_ends_the_session_and_frees_the_slot() {
    netns::run("a_failed_peer_ends_the_session_and_frees_the_slot", || async {
        let mut cluster = Cluster::relay_only("").await;
        cluster.add_worker("one-slot", 1, "").await;
        let mut sig = Signaling::connect(&cluster.ws_url("peer-fails")).await.expect("ws");
        let client = play(&mut sig, &cluster, "a").await;
        assert!(client.wait_frames(5, SECS(5)).await.frames_decoded >= 5);
        // The browser's peer goes away but its socket stays.
        let closed = Instant::now();
        client.close().await;
        let ev = sig
            .wait_for("error", SECS(30))
            .await
            .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
        assert_eq!(error_code(&ev), "peer_failed");
        eprintln!("peer_failed {:?} after the browser peer closed", closed.elapsed());
        // The slot is free again: a new offer on the same socket plays.
        let client = play(&mut sig, &cluster, "a").await;
        assert!(client.wait_frames(5, SECS(5)).await.frames_decoded >= 5);
    });
}

#[test]
fn demo_script_serves_a_session_and_stops_cleanly_on_sigterm() {
    netns::run("demo_script_serves_a_session_and_stops_cleanly_on_sigterm", || async {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .parent()
            .expect("workspace root")
            .to_path_buf();
        let log = tempfile::NamedTempFile::new().expect("log");
        // `--no-build`: cargo holds the build lock while tests run; scripts/test built everything.
        let mut demo = std::process::Command::new(root.join("scripts/demo"))
            .arg("--no-build")
            .current_dir(&root)
            .stdin(std::process::Stdio::null())
            .stdout(log.reopen().expect("log"))
            .stderr(log.reopen().expect("log"))
            .spawn()
            .expect("scripts/demo");
        let http: std::net::SocketAddr = "127.0.0.1:8080".parse().expect("addr");
        let deadline = Instant::now() + SECS(120);
        loop {
            if let Ok((200, body)) = avatar_edge_tests::cluster::http_get(http, "/healthz").await {
                if body.contains("\"workers\":1") {
                    break;
                }
            }
            assert!(
                Instant::now() < deadline,
                "demo did not come up:\n{}",
                std::fs::read_to_string(log.path()).unwrap_or_default()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let (status, page) = avatar_edge_tests::cluster::http_get(http, "/").await.expect("page");
        assert_eq!(status, 200);
        assert!(page.contains("avatar-edge"));
        let mut sig = Signaling::connect("ws://127.0.0.1:8080/ws/demo-session")
            .await
            .expect("ws");
        let client = RtcClient::new(true).await.expect("client");
        sig.send_offer(&client.offer().await.expect("offer"), "avatar_tutor_13")
            .await
            .expect("send");
        let answer = sig.wait_for("webrtc_answer", SECS(10)).await.expect("answer");
        client
            .accept_answer(answer["sdp"].as_str().expect("sdp"))
            .await
            .expect("accept");
        assert!(client.wait_frames(25, SECS(6)).await.frames_decoded >= 25);

        // SIGTERM the script: it stops relay and worker and exits 0; the browser sees a close.
        let pid = demo.id() as i32;
        let killed = std::process::Command::new("kill")
            .args(["-TERM", &pid.to_string()])
            .status()
            .expect("kill");
        assert!(killed.success());
        let deadline = Instant::now() + SECS(10);
        let status = loop {
            if let Some(status) = demo.try_wait().expect("wait") {
                break status;
            }
            assert!(Instant::now() < deadline, "demo did not stop within 10 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        let output = std::fs::read_to_string(log.path()).unwrap_or_default();
        assert!(status.success(), "demo exited with {status}:\n{output}");
        assert!(
            output.contains("relay stopped") && output.contains("worker stopped"),
            "{output}"
        );
        // The browser may first hear that its worker left; then its socket is closed.
        let mut seen = Vec::new();
        let closed = loop {
            match sig.next_event(SECS(3)).await {
                Ok(ev) if seen.len() < 5 => seen.push(ev),
                Ok(ev) => panic!("socket still open after events {seen:?} {ev}"),
                Err(e) => break e.to_string(),
            }
        };
        assert!(
            closed.contains("closed") || closed.contains("ended"),
            "{closed} after {seen:?}"
        );
        assert!(
            avatar_edge_tests::cluster::http_get(http, "/healthz").await.is_err(),
            "nothing listens any more"
        );
    });
}

#[test]
fn workers_with_a_wrong_secret_or_pin_are_refused() {
    netns::run("workers_with_a_wrong_secret_or_pin_are_refused", || async {
        let mut cluster = Cluster::relay_only("").await;
        let pin = cluster.relay.fingerprint.clone();
        let wrong_secret = cluster.spawn_worker(
            "intruder",
            1,
            "not-the-secret-at-all",
            &format!("fingerprint = \"{pin}\""),
            "",
        );
        cluster
            .wait_for_log(&wrong_secret, "relay refused us: authentication failed", SECS(10))
            .await;
        let wrong_pin = cluster.spawn_worker(
            "mitm-victim",
            1,
            avatar_edge_tests::cluster::SECRET,
            &format!("fingerprint = \"{}\"", "ab".repeat(32)),
            "",
        );
        cluster.wait_for_log(&wrong_pin, "tunnel failed", SECS(10)).await;
        let relay_log = std::fs::read_to_string(&cluster.relay.log).expect("relay log");
        assert!(
            relay_log.contains("worker failed authentication worker_id=intruder"),
            "{relay_log}"
        );
        assert!(!relay_log.contains("worker registered"), "{relay_log}");
        assert!(
            !relay_log.contains("not-the-secret-at-all"),
            "secrets never reach the logs"
        );
        assert_eq!(cluster.worker_count().await, 0);
        // A worker with the right credentials still gets in.
        cluster.add_worker("honest", 1, "").await;
        assert_eq!(cluster.worker_count().await, 1);
    });
}

#[test]
fn worker_trusts_the_relay_through_a_ca_file() {
    netns::run("worker_trusts_the_relay_through_a_ca_file", || async {
        let dir = tempfile::tempdir().expect("tempdir");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).expect("CA");
        let leaf_key = rcgen::KeyPair::generate().expect("key");
        let leaf = rcgen::CertificateParams::new(vec!["localhost".to_owned()])
            .expect("params")
            .signed_by(&leaf_key, &ca)
            .expect("leaf");
        let (cert, key, ca_file) = (
            dir.path().join("relay.pem"),
            dir.path().join("relay.key"),
            dir.path().join("ca.pem"),
        );
        std::fs::write(&cert, leaf.pem()).expect("write");
        std::fs::write(&key, leaf_key.serialize_pem()).expect("write");
        std::fs::write(&ca_file, ca.pem()).expect("write");

        let tls = format!("cert = \"{}\"\nkey = \"{}\"", cert.display(), key.display());
        let mut cluster = Cluster::relay_with_tls("", false, &tls).await;
        let trusted = format!("ca_file = \"{}\"", ca_file.display());
        let log = cluster.spawn_worker("ca-worker", 1, avatar_edge_tests::cluster::SECRET, &trusted, "");
        cluster.wait_for_log(&log, "registered with relay", SECS(10)).await;

        // A CA that did not issue the relay's certificate is not trusted.
        let other_key = rcgen::KeyPair::generate().expect("key");
        let mut other_params = rcgen::CertificateParams::new(Vec::<String>::new()).expect("params");
        other_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        let other = rcgen::CertifiedIssuer::self_signed(other_params, other_key).expect("CA");
        let other_file = dir.path().join("other-ca.pem");
        std::fs::write(&other_file, other.pem()).expect("write");
        let untrusted = format!("ca_file = \"{}\"", other_file.display());
        let log = cluster.spawn_worker("wrong-ca", 1, avatar_edge_tests::cluster::SECRET, &untrusted, "");
        cluster.wait_for_log(&log, "tunnel failed", SECS(10)).await;
        assert_eq!(
            cluster.worker_count().await,
            1,
            "only the worker that trusts the right CA registered"
        );
    });
}

#[test]
fn a_worker_serves_sessions_through_every_relay_it_dials() {
    netns::run("a_worker_serves_sessions_through_every_relay_it_dials", || async {
        let first = Cluster::relay_only("").await;
        let mut second = Cluster::relay_only("").await;
        let also_first = format!(
            "[[relays]]\naddress = \"{}\"\nserver_name = \"localhost\"\nfingerprint = \"{}\"",
            first.relay.tunnel, first.relay.fingerprint
        );
        let trust = format!("fingerprint = \"{}\"", second.relay.fingerprint);
        let log = second.spawn_worker(
            "multi-homed",
            4,
            avatar_edge_tests::cluster::SECRET,
            &trust,
            &also_first,
        );
        let deadline = Instant::now() + SECS(15);
        while std::fs::read_to_string(&log)
            .unwrap_or_default()
            .matches("registered with relay")
            .count()
            < 2
        {
            assert!(
                Instant::now() < deadline,
                "not registered with both relays:\n{}",
                second.logs()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for cluster in [&first, &second] {
            let mut sig = Signaling::connect(&cluster.ws_url("via-each")).await.expect("ws");
            let client = play(&mut sig, cluster, "a").await;
            assert!(client.wait_frames(10, SECS(5)).await.frames_decoded >= 10);
        }
    });
}
