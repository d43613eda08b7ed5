//! Webhooks, transcripts and recordings (issue 29), end to end: real relay and worker processes,
//! a Rust WebRTC peer with a microphone, a stand-in for the hosted language model and speech
//! recogniser (a real HTTP server speaking their protocol), and a webhook receiver that checks
//! every signature as the docs tell operators to ([`avatar_edge_tests::webhook_receiver`]).
//!
//! * A session with a typed question, a spoken one and a backend's `say` yields, in order,
//!   `session.started`, each turn's `transcript.user` / `transcript.assistant` with its source,
//!   `session.ended` and `recording.ready`; the transcript API lists the same turns; the
//!   recording is H.264 at the session's size and 25 fps with Opus, as long as the session.
//! * The receiver down, then the relay restarted with the events queued, then the receiver up:
//!   every event arrives, in order. A worker killed mid-session leaves a recording that plays.
//! * A receiver that never answers does not slow a session: first frame and answer as fast as
//!   with no webhooks at all.
//! * Two relays with the same webhook, the browser on one and the backend on the other: each
//!   event arrives once, and either relay reads the transcript.

use avatar_edge_tests::cluster::{http_get, http_request, Cluster};
use avatar_edge_tests::netns;
use avatar_edge_tests::openai::OpenAiServer;
use avatar_edge_tests::signaling::Signaling;
use avatar_edge_tests::webhook_receiver::{Mode, WebhookReceiver};
use serde_json::{json, Value};
use std::path::Path;
use std::time::{Duration, Instant};

const SECS: fn(u64) -> Duration = Duration::from_secs;
const HOOK_SECRET: &str = "whsec-test-0123456789abcdef";
const KEY: &str = "backend-key-0123456789abcdef0123456789";
const AVATAR: &str = "avatar_tutor_13";

fn tools() -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools")
}

fn api_keys() -> String {
    format!("[[api.keys]]\nname = \"backend\"\nkey = \"{KEY}\"\n")
}

/// A talking worker: the stand-in language model and recogniser, voice input, and `extra`.
fn worker_toml(llm: &OpenAiServer, extra: &str) -> String {
    format!(
        "[talk.llm]\nbackend = \"openai\"\nbase_url = \"{url}\"\nmodel = \"tutor-1\"\napi_key = \"sk-test\"\ntimeout_ms = 3000\n\
         [talk.asr]\nbase_url = \"{url}\"\ntimeout_ms = 3000\n\
         [talk.vad]\nmodel = \"{vad}\"\n[talk.lipsync]\nonnxruntime = \"{ort}\"\n{extra}",
        url = llm.base_url(),
        vad = tools().join("models/silero_vad.onnx").display(),
        ort = tools().join("onnxruntime/libonnxruntime.so").display(),
    )
}

fn recording_toml(dir: &Path) -> String {
    format!("[recording]\nenabled = true\ndir = \"{}\"\n", dir.display())
}

/// Events until one of type `kind`; panics on timeout or an error event.
async fn until(sig: &mut Signaling, kind: &str, cluster: &Cluster) -> Vec<Value> {
    let deadline = Instant::now() + SECS(20);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = sig
            .next_event(left)
            .await
            .unwrap_or_else(|e| panic!("waiting for {kind}: {e}; saw {seen:?}\n{}", cluster.logs()));
        let done = ev["type"] == kind;
        assert!(done || ev["type"] != "error", "{ev}\n{}", cluster.logs());
        seen.push(ev);
        if done {
            return seen;
        }
    }
}

async fn api(cluster: &Cluster, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    let auth = format!("Bearer {KEY}");
    let headers = [("Authorization", auth.as_str()), ("Content-Type", "application/json")];
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let (status, text) = http_request(cluster.relay.http, method, path, &headers, body.as_bytes())
        .await
        .expect("HTTP");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// The user types `message`, as the customer's page sends it.
async fn ask(sig: &mut Signaling, message: &str) {
    sig.send_json(&json!({"type": "text_webrtc", "message": message}))
        .await
        .expect("text_webrtc");
}

/// The user speaks `text` into the microphone, at about -20 dBFS.
fn speak(mic: &avatar_edge_tests::rtc_client::Microphone, text: &str) {
    let pcm = avatar_edge_tests::asr::speak("en-us", text, 48_000);
    let gain = 0.1 / avatar_worker::talk::audio::rms(&pcm);
    mic.speak(&pcm.iter().map(|s| s * gain).collect::<Vec<_>>());
}

/// The only `.mp4` in `dir`.
fn the_recording(dir: &Path) -> std::path::PathBuf {
    let files: Vec<_> = std::fs::read_dir(dir)
        .expect("recording dir")
        .flatten()
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|x| x == "mp4"))
        .collect();
    assert_eq!(files.len(), 1, "one recording: {files:?}");
    files[0].clone()
}

/// `ffprobe`'s streams and format of `file`.
fn probe(file: &Path) -> Value {
    let out = std::process::Command::new("ffprobe")
        .args(["-v", "error", "-show_streams", "-show_format", "-of", "json"])
        .arg(file)
        .output()
        .expect("ffprobe (scripts/install-deps)");
    assert!(
        out.status.success(),
        "ffprobe: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).expect("ffprobe JSON")
}

/// Decode every packet of `file`; FFmpeg's complaints, if any.
fn decode_errors(file: &Path) -> String {
    let out = std::process::Command::new("ffmpeg")
        .args(["-v", "error", "-i"])
        .arg(file)
        .args(["-f", "null", "-"])
        .output()
        .expect("ffmpeg");
    assert!(out.status.success(), "ffmpeg: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn stream<'a>(probe: &'a Value, kind: &str) -> &'a Value {
    probe["streams"]
        .as_array()
        .and_then(|s| s.iter().find(|s| s["codec_type"] == kind))
        .unwrap_or_else(|| panic!("no {kind} stream: {probe}"))
}

fn seconds(v: &Value) -> f64 {
    v.as_str()
        .and_then(|s| s.parse().ok())
        .or(v.as_f64())
        .unwrap_or(f64::NAN)
}

#[test]
fn a_session_yields_signed_events_in_order_a_transcript_and_a_recording_that_plays() {
    netns::run(
        "a_session_yields_signed_events_in_order_a_transcript_and_a_recording_that_plays",
        || async {
            let dir = tempfile::tempdir().expect("tempdir");
            let recordings = dir.path().join("recordings");
            let receiver = WebhookReceiver::start(HOOK_SECRET, Mode::Up).await;
            let llm = OpenAiServer::start().await;
            llm.recognise_at_once();
            let relay = format!("{}{}", api_keys(), receiver.relay_toml(&dir.path().join("queue"), ""));
            let mut cluster = Cluster::relay_only(&relay).await;
            cluster
                .add_worker("recorder", 2, &worker_toml(&llm, &recording_toml(&recordings)))
                .await;
            let mut sig = Signaling::connect(&cluster.ws_url("lesson-42")).await.expect("ws");
            let (client, mic) = avatar_edge_tests::play_with_microphone(&mut sig, AVATAR)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
            client.wait_frames(10, SECS(10)).await;

            // A typed question, a spoken one, and the backend's say, each to its end.
            ask(&mut sig, "What is the sea?").await;
            until(&mut sig, "speech_ended", &cluster).await;
            speak(&mic, "What is two plus two?");
            let heard = until(&mut sig, "user_transcript", &cluster).await;
            assert!(heard.iter().any(|e| e["type"] == "user_speech_started"), "{heard:?}");
            until(&mut sig, "speech_ended", &cluster).await;
            let (status, said) = api(
                &cluster,
                "POST",
                "/api/v1/sessions/lesson-42/say",
                Some(json!({"text": "Well done. See you tomorrow."})),
            )
            .await;
            assert_eq!(status, 202, "{said}");
            until(&mut sig, "speech_ended", &cluster).await;

            // While the session lives, the transcript API has every turn.
            let (status, live) = api(&cluster, "GET", "/api/v1/sessions/lesson-42/transcript", None).await;
            assert_eq!(status, 200, "{live}");
            let turns = live["turns"].as_array().cloned().unwrap_or_default();
            let summary: Vec<(String, String)> = turns
                .iter()
                .map(|t| {
                    (
                        t["speaker"].as_str().unwrap_or("").to_owned(),
                        t["source"].as_str().unwrap_or("").to_owned(),
                    )
                })
                .collect();
            let expected: Vec<(String, String)> = [
                ("user", "text"),
                ("assistant", "text"),
                ("user", "voice"),
                ("assistant", "voice"),
                ("assistant", "api"),
            ]
            .iter()
            .map(|(a, b)| ((*a).to_owned(), (*b).to_owned()))
            .collect();
            assert_eq!(summary, expected, "{live}");
            assert_eq!(turns[0]["text"], "What is the sea?");
            assert_eq!(turns[2]["text"], "hello after the failures");
            assert!(
                turns[1]["text"]
                    .as_str()
                    .is_some_and(|t| t.contains("You asked: What is the sea?")),
                "{live}"
            );
            assert_eq!(turns[4]["text"], "Well done. See you tomorrow.");
            assert!(turns
                .iter()
                .all(|t| t["interrupted"] == false && t["ended_at"].as_str() >= t["started_at"].as_str()));

            // The browser leaves.
            sig.close().await;
            client.close().await;
            let events = receiver
                .wait_until(SECS(20), |evs| evs.iter().any(|e| e["type"] == "recording.ready"))
                .await;
            let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
            assert_eq!(
                kinds,
                [
                    "session.started",
                    "transcript.user",
                    "transcript.assistant",
                    "transcript.user",
                    "transcript.assistant",
                    "transcript.assistant",
                    "session.ended",
                    "recording.ready"
                ],
                "{events:#?}\n{}",
                cluster.logs()
            );
            assert_eq!(receiver.bad_signatures(), 0);
            let mut ids: Vec<&str> = events.iter().filter_map(|e| e["id"].as_str()).collect();
            ids.sort_unstable();
            ids.dedup();
            assert_eq!(ids.len(), events.len(), "every event has an id of its own");
            assert!(events
                .iter()
                .all(|e| e["session_id"] == "lesson-42" && e["created_at"].is_string()));
            let started = &events[0]["data"];
            assert_eq!(
                (started["avatar"].as_str(), started["worker"].as_str()),
                (Some(AVATAR), Some("recorder")),
                "{started}"
            );
            assert_eq!(started["relay"], "test-relay", "{started}");
            let sources: Vec<&str> = events[1..6]
                .iter()
                .filter_map(|e| e["data"]["source"].as_str())
                .collect();
            assert_eq!(sources, ["text", "text", "voice", "voice", "api"]);
            assert_eq!(
                events[1..6].iter().map(|e| e["data"].clone()).collect::<Vec<_>>(),
                turns,
                "webhooks and API agree"
            );
            let ended = &events[6]["data"];
            assert_eq!(ended["reason"], "browser_left", "{ended}");
            let duration = ended["duration_s"].as_f64().expect("duration_s");

            // The recording: what the browser received, as long as the session.
            let ready = &events[7]["data"];
            let file = the_recording(&recordings);
            assert_eq!(ready["file"].as_str(), file.to_str(), "{ready}");
            let bytes = std::fs::read(&file).expect("recording");
            assert_eq!(ready["bytes"].as_u64(), Some(bytes.len() as u64));
            use sha2::Digest;
            assert_eq!(
                ready["sha256"].as_str(),
                Some(hex::encode(sha2::Sha256::digest(&bytes)).as_str())
            );
            let probed = probe(&file);
            let video = stream(&probed, "video");
            let audio = stream(&probed, "audio");
            assert_eq!(
                (
                    video["codec_name"].as_str(),
                    video["width"].as_u64(),
                    video["height"].as_u64()
                ),
                (Some("h264"), Some(512), Some(512)),
                "{video}"
            );
            assert_eq!(video["r_frame_rate"], "25/1", "{video}");
            assert_eq!(audio["codec_name"], "opus", "{audio}");
            let length = seconds(&probed["format"]["duration"]);
            eprintln!(
                "session {duration:.3} s, recording {length:.3} s, {} bytes, {:.2} MB/min",
                bytes.len(),
                bytes.len() as f64 / 1e6 / (length / 60.0)
            );
            assert!(
                (length - duration).abs() < 0.5,
                "recording {length} s for a session of {duration} s"
            );
            assert!(
                (length - ready["duration_s"].as_f64().unwrap_or(f64::NAN)).abs() < 0.1,
                "{ready}"
            );
            let offset = seconds(&video["start_time"]) - seconds(&audio["start_time"]);
            assert!(offset.abs() < 0.05, "audio and video start together: {offset} s");
            assert_eq!(decode_errors(&file), "", "the recording decodes cleanly");

            // After the end, the transcript is still there.
            let (status, after) = api(&cluster, "GET", "/api/v1/sessions/lesson-42/transcript", None).await;
            assert_eq!(
                (status, after["turns"].as_array().map(Vec::len)),
                (200, Some(5)),
                "{after}"
            );
            let (status, _) = api(&cluster, "GET", "/api/v1/sessions/never-was/transcript", None).await;
            assert_eq!(status, 404);
        },
    );
}

#[test]
fn a_receiver_down_and_a_relay_restart_lose_nothing_and_a_killed_worker_leaves_a_playable_file() {
    netns::run(
        "a_receiver_down_and_a_relay_restart_lose_nothing_and_a_killed_worker_leaves_a_playable_file",
        || async {
            let dir = tempfile::tempdir().expect("tempdir");
            let recordings = dir.path().join("recordings");
            let queue = dir.path().join("queue");
            let receiver = WebhookReceiver::start(HOOK_SECRET, Mode::Down).await;
            let llm = OpenAiServer::start().await;
            let relay = receiver.relay_toml(&queue, "max_backoff_s = 1");
            let mut cluster = Cluster::relay_only(&relay).await;
            cluster
                .add_worker("doomed", 2, &worker_toml(&llm, &recording_toml(&recordings)))
                .await;
            let mut sig = Signaling::connect(&cluster.ws_url("lesson-9")).await.expect("ws");
            let client = avatar_edge_tests::play(&mut sig, AVATAR)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
            let playing = Instant::now();
            client.wait_frames(10, SECS(10)).await;
            ask(&mut sig, "Tell me about rivers.").await;
            until(&mut sig, "speech_ended", &cluster).await;
            tokio::time::sleep(SECS(2)).await;

            // The worker dies mid-session: its recording plays up to about the kill.
            let killed_after = playing.elapsed().as_secs_f64();
            cluster.kill_worker(0);
            until(&mut sig, "error", &cluster).await;
            sig.close().await;
            client.close().await;
            let file = the_recording(&recordings);
            let probed = probe(&file);
            let length = seconds(&probed["format"]["duration"]);
            eprintln!("killed after {killed_after:.2} s of media; the file plays {length:.2} s");
            assert!(
                length > killed_after - 2.0 && length <= killed_after + 0.5,
                "{length} s of {killed_after} s: {probed}"
            );
            assert_eq!(stream(&probed, "video")["codec_name"], "h264");
            assert_eq!(decode_errors(&file), "", "the cut file decodes cleanly");

            // The receiver is down: the events wait on disk, retried.
            let queued = |q: &Path| -> usize {
                std::fs::read_dir(q)
                    .into_iter()
                    .flatten()
                    .flatten()
                    .map(|d| std::fs::read_dir(d.path()).map(|f| f.count()).unwrap_or(0))
                    .sum()
            };
            let deadline = Instant::now() + SECS(10);
            while queued(&queue) < 4 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            assert_eq!(queued(&queue), 4, "started, the turn's two transcripts, ended");
            tokio::time::sleep(SECS(3)).await;
            assert!(receiver.posts() >= 3, "retried while down: {} tries", receiver.posts());
            assert!(receiver.events().is_empty());
            let (_, metrics) = http_get(cluster.relay.http, "/metrics").await.expect("metrics");
            assert!(metrics.contains("relay_webhook_retries_total"), "{metrics}");
            assert!(
                metrics.contains("relay_webhook_queue_depth{webhook=\"127.0.0.1\"} 4"),
                "{metrics}"
            );

            // The relay restarts with them queued; then the receiver comes back.
            assert!(cluster.stop_relay().success());
            cluster.restart_relay().await;
            receiver.set_mode(Mode::Up);
            let events = receiver.wait_until(SECS(15), |evs| evs.len() >= 4).await;
            let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
            assert_eq!(
                kinds,
                [
                    "session.started",
                    "transcript.user",
                    "transcript.assistant",
                    "session.ended"
                ],
                "{events:#?}\n{}",
                cluster.logs()
            );
            assert_eq!(receiver.bad_signatures(), 0);
            assert_eq!(events[3]["data"]["reason"], "browser_left");
            let deadline = Instant::now() + SECS(5);
            while queued(&queue) > 0 && Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
            assert_eq!(queued(&queue), 0, "delivered events leave the disk");
            let (_, metrics) = http_get(cluster.relay.http, "/metrics").await.expect("metrics");
            assert!(
                metrics.contains("relay_webhook_delivered_total{webhook=\"127.0.0.1\"} 4"),
                "{metrics}"
            );
        },
    );
}

/// Connect → first frame, and question → `speech_started`, for one session on `cluster`.
async fn timings(cluster: &Cluster, session: &str) -> (Duration, Duration) {
    let mut sig = Signaling::connect(&cluster.ws_url(session)).await.expect("ws");
    let asked = Instant::now();
    let client = avatar_edge_tests::play(&mut sig, AVATAR)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    client.wait_frames(1, SECS(10)).await;
    let first_frame = asked.elapsed();
    let asked = Instant::now();
    ask(&mut sig, "Hello there.").await;
    until(&mut sig, "speech_started", cluster).await;
    let answer = asked.elapsed();
    sig.close().await;
    client.close().await;
    (first_frame, answer)
}

#[test]
fn a_receiver_that_never_answers_does_not_slow_sessions() {
    netns::run("a_receiver_that_never_answers_does_not_slow_sessions", || async {
        let dir = tempfile::tempdir().expect("tempdir");
        let receiver = WebhookReceiver::start(HOOK_SECRET, Mode::Hang).await;
        let llm = OpenAiServer::start().await;
        let mut rows = Vec::new();
        for hooks in [false, true] {
            let relay = if hooks {
                receiver.relay_toml(&dir.path().join("queue"), "timeout_ms = 300000")
            } else {
                String::new()
            };
            let mut cluster = Cluster::relay_only(&relay).await;
            cluster.add_worker("w", 4, &worker_toml(&llm, "")).await;
            let mut runs = Vec::new();
            for n in 0..3 {
                runs.push(timings(&cluster, &format!("s-{hooks}-{n}")).await);
            }
            let best = |f: fn(&(Duration, Duration)) -> Duration| runs.iter().map(f).min().unwrap_or_default();
            rows.push((best(|r| r.0), best(|r| r.1)));
        }
        eprintln!("| webhooks | first frame ms | question → speech ms |\n|---|---:|---:|");
        for (hooks, (frame, answer)) in ["none", "a receiver that never answers"].iter().zip(&rows) {
            eprintln!("| {hooks} | {} | {} |", frame.as_millis(), answer.as_millis());
        }
        assert!(receiver.posts() >= 1, "the hanging receiver was asked");
        let ((frame0, answer0), (frame1, answer1)) = (rows[0], rows[1]);
        assert!(
            frame1 <= frame0 + Duration::from_millis(150),
            "first frame {frame1:?} vs {frame0:?}"
        );
        assert!(
            answer1 <= answer0 + Duration::from_millis(150),
            "answer {answer1:?} vs {answer0:?}"
        );
    });
}

#[test]
fn in_a_fleet_each_event_is_sent_once_and_any_relay_reads_the_transcript() {
    netns::run(
        "in_a_fleet_each_event_is_sent_once_and_any_relay_reads_the_transcript",
        || async {
            use avatar_edge_tests::cluster::SECRET;
            let dir = tempfile::tempdir().expect("tempdir");
            let receiver = WebhookReceiver::start(HOOK_SECRET, Mode::Up).await;
            let llm = OpenAiServer::start().await;
            // Both relays send to the same receiver, each from a queue of its own.
            let hooks = |name: &str| format!("{}{}", api_keys(), receiver.relay_toml(&dir.path().join(name), ""));
            let a = Cluster::relay_only(&hooks("a")).await;
            let mut b = Cluster::relay_only(&hooks("b")).await;
            let also_a = format!(
                "[[relays]]\naddress = \"{}\"\nserver_name = \"localhost\"\nfingerprint = \"{}\"\n{}",
                a.relay.tunnel,
                a.relay.fingerprint,
                worker_toml(&llm, "")
            );
            let trust = format!("fingerprint = \"{}\"", b.relay.fingerprint);
            let log = b.spawn_worker("fleet-worker", 4, SECRET, &trust, &also_a);
            let registered =
                avatar_edge_tests::cluster::wait_for_count(&log, "registered with relay", 2, SECS(15)).await;
            assert!(registered.is_some(), "not registered with both relays:\n{}", b.logs());

            // The browser is on relay A; the backend speaks and reads through relay B.
            let mut sig = Signaling::connect(&a.ws_url("fleet-7")).await.expect("ws");
            let client = avatar_edge_tests::play(&mut sig, AVATAR)
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", a.logs()));
            client.wait_frames(10, SECS(10)).await;
            let (status, said) = api(
                &b,
                "POST",
                "/api/v1/sessions/fleet-7/say",
                Some(json!({"text": "Hello from the lesson plan."})),
            )
            .await;
            assert_eq!(status, 202, "{said}");
            until(&mut sig, "speech_ended", &a).await;
            let (status, transcript) = api(&b, "GET", "/api/v1/sessions/fleet-7/transcript", None).await;
            assert_eq!(status, 200, "{transcript}");
            assert_eq!(
                transcript["turns"][0]["text"], "Hello from the lesson plan.",
                "{transcript}"
            );
            sig.close().await;
            client.close().await;

            receiver
                .wait_until(SECS(10), |evs| evs.iter().any(|e| e["type"] == "session.ended"))
                .await;
            // Anything a second relay would send would come as fast: give it time to show.
            tokio::time::sleep(SECS(2)).await;
            let events = receiver.events();
            let kinds: Vec<&str> = events.iter().filter_map(|e| e["type"].as_str()).collect();
            assert_eq!(
                kinds,
                ["session.started", "transcript.assistant", "session.ended"],
                "{events:#?}"
            );
            assert_eq!(events[1]["data"]["source"], "api");
            assert_eq!(receiver.bad_signatures(), 0);
        },
    );
}
