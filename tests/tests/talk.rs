//! The talking avatar end to end: real relay and worker processes, a Rust WebRTC client that
//! decodes the H.264 pictures and the Opus audio, the built-in backends (scripted answers,
//! espeak-ng) with the ONNX test model, and a real HTTP server speaking the OpenAI APIs.
//!
//! Each test runs in its own loopback-only network namespace (see `netns`).

use avatar_edge_tests::cluster::Cluster;
use avatar_edge_tests::netns;
use avatar_edge_tests::openai::OpenAiServer;
use avatar_edge_tests::rtc_client::{ReceiverStats, RtcClient};
use avatar_edge_tests::signaling::Signaling;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// The ONNX test model, run by the runtime from the onnxruntime wheel (scripts/install-deps).
fn onnx_lipsync() -> String {
    let tools = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools");
    format!(
        "[talk.lipsync]\nbackend = \"onnx\"\nmodel = \"{}\"\nonnxruntime = \"{}\"\n",
        tools.join("models/lipsync-test.onnx").display(),
        tools.join("onnxruntime/libonnxruntime.so").display()
    )
}

async fn talking_cluster(extra: &str) -> Cluster {
    let mut cluster = Cluster::relay_only("").await;
    cluster.add_worker("talker", 4, extra).await;
    cluster
}

async fn play(sig: &mut Signaling, cluster: &Cluster) -> RtcClient {
    avatar_edge_tests::play(sig, "avatar_tutor_13")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()))
}

async fn say(sig: &mut Signaling, text: &str) {
    sig.send_json(
        &json!({"type": "text_webrtc", "session_id": "s", "user_id": 5, "tutor_id": 1,
        "message": text, "avatar_id": "avatar_tutor_13"}),
    )
    .await
    .expect("send text");
}

fn mean(v: &[f32]) -> f32 {
    v.iter().sum::<f32>() / v.len().max(1) as f32
}

fn max(v: &[f32]) -> f32 {
    v.iter().copied().fold(0.0, f32::max)
}

/// Idle mouth luma and audio level over `window`, measured now.
async fn idle_levels(client: &RtcClient, window: Duration) -> (f32, f32) {
    let from = Instant::now();
    tokio::time::sleep(window).await;
    let s = client.snapshot();
    let (mouth, audio) = (
        s.mouth_between(from, Instant::now()),
        s.audio_between(from, Instant::now()),
    );
    assert!(
        mouth.len() >= 10 && audio.len() >= 20,
        "media flowing: {} frames, {} packets",
        mouth.len(),
        audio.len()
    );
    (mean(&mouth), max(&audio))
}

/// Collect events until the `speech_ended` of the next speech to start (earlier turns' late
/// events are skipped); returns (events, time speech started, ended).
async fn until_speech_ended(
    sig: &mut Signaling,
    cluster: &Cluster,
    timeout: Duration,
) -> (Vec<Value>, Instant, Instant) {
    let deadline = Instant::now() + timeout;
    let mut events = Vec::new();
    let mut started: Option<(Instant, Value)> = None;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = sig
            .next_event(left)
            .await
            .unwrap_or_else(|e| panic!("{e}; events so far {events:?}\n{}", cluster.logs()));
        match ev["type"].as_str() {
            Some("speech_started") => started = Some((Instant::now(), ev["turn"].clone())),
            Some("speech_ended") if started.as_ref().is_some_and(|(_, turn)| *turn == ev["turn"]) => {
                let ended = Instant::now();
                events.push(ev);
                let (at, _) = started.expect("matched above");
                return (events, at, ended);
            }
            Some("error") => panic!("error event: {ev}\n{}", cluster.logs()),
            _ => {}
        }
        events.push(ev);
    }
}

fn assert_spoke(stats: &ReceiverStats, started: Instant, ended: Instant, idle_mouth: f32) {
    let audio = stats.audio_between(started, ended);
    let mouth = stats.mouth_between(started, ended);
    let loud = audio.iter().filter(|v| **v > 0.02).count();
    eprintln!(
        "speech {:?}: {} packets ({loud} loud, max rms {:.3}), {} frames, mouth luma idle {idle_mouth:.1} / speaking min {:.1} mean {:.1}",
        ended - started,
        audio.len(),
        max(&audio),
        mouth.len(),
        mouth.iter().copied().fold(f32::MAX, f32::min),
        mean(&mouth)
    );
    assert!(
        loud * 3 >= audio.len(),
        "the audio is speech, not silence: {loud}/{} loud packets",
        audio.len()
    );
    let open = mouth.iter().filter(|v| **v < idle_mouth - 25.0).count();
    assert!(
        open * 3 >= mouth.len(),
        "the mouth moves while speaking: {open}/{} frames differ from idle",
        mouth.len()
    );
}

#[test]
fn the_avatar_answers_with_voice_and_moving_lips_then_returns_to_idle() {
    netns::run(
        "the_avatar_answers_with_voice_and_moving_lips_then_returns_to_idle",
        || async {
            let cluster = talking_cluster(&onnx_lipsync()).await;
            let mut sig = Signaling::connect(&cluster.ws_url("talk-1")).await.expect("ws");
            let client = play(&mut sig, &cluster).await;
            let idle_from = Instant::now();
            let (idle_mouth, idle_audio) = idle_levels(&client, SECS(1)).await;
            let idle_seam = mean(&client.snapshot().seam_between(idle_from, Instant::now()));
            assert!(idle_audio < 0.005, "idle audio is silence: {idle_audio}");

            let sent = Instant::now();
            say(&mut sig, "What is the capital of France?").await;
            let (events, started, ended) = until_speech_ended(&mut sig, &cluster, SECS(30)).await;
            eprintln!("text_webrtc -> speech_started {:?}", started - sent);
            let deltas: Vec<&Value> = events
                .iter()
                .filter(|e| e["type"] == "assistant_text" && e["final"] == false)
                .collect();
            assert!(deltas.len() > 5, "text arrives in deltas: {events:?}");
            let answer = events
                .iter()
                .find(|e| e["type"] == "assistant_text" && e["final"] == true)
                .unwrap_or_else(|| panic!("a final assistant_text: {events:?}"));
            assert!(
                answer["text"].as_str().is_some_and(|t| t.contains("capital of France")),
                "{answer}"
            );
            assert_eq!(events.last().expect("ended")["interrupted"], false);
            assert_spoke(
                &client.snapshot(),
                started + Duration::from_millis(150),
                ended,
                idle_mouth,
            );
            // No outline where the lip-synced face meets the frame: the luma step across the paste
            // box's border while speaking is what it is on idle frames (this test model darkens
            // its outer pixel ring, as zero-padded convolutions do).
            let speech_seam = mean(
                &client
                    .snapshot()
                    .seam_between(started + Duration::from_millis(150), ended),
            );
            eprintln!("paste box border step: idle {idle_seam:.2}, speaking {speech_seam:.2} (luma)");
            assert!(
                speech_seam <= idle_seam + 1.0,
                "a seam shows around the pasted face: {speech_seam:.2} while speaking vs {idle_seam:.2} idle"
            );

            // Back to idle: the mouth closes and the audio is silent again.
            tokio::time::sleep(Duration::from_millis(300)).await;
            let (after_mouth, after_audio) = idle_levels(&client, SECS(1)).await;
            assert!(
                (after_mouth - idle_mouth).abs() < 6.0,
                "mouth back to idle: {after_mouth} vs {idle_mouth}"
            );
            assert!(after_audio < 0.005, "silence after speech_ended: {after_audio}");

            // Chinese in, Chinese out (the scripted responder answers in the user's language).
            say(&mut sig, "请介绍一下你自己").await;
            let (events, started, ended) = until_speech_ended(&mut sig, &cluster, SECS(30)).await;
            let answer = events.iter().find(|e| e["final"] == true).expect("final text");
            assert!(answer["text"].as_str().is_some_and(|t| t.contains("你好")), "{answer}");
            assert_spoke(
                &client.snapshot(),
                started + Duration::from_millis(150),
                ended,
                idle_mouth,
            );
            let stats = client.snapshot();
            assert_eq!(stats.decode_errors, 0);
            client.close().await;
            sig.close().await;
        },
    );
}

#[test]
fn an_interrupt_or_a_new_question_silences_the_avatar_within_200_ms() {
    netns::run(
        "an_interrupt_or_a_new_question_silences_the_avatar_within_200_ms",
        || async {
            let cluster = talking_cluster("").await;
            let mut sig = Signaling::connect(&cluster.ws_url("talk-2")).await.expect("ws");
            let client = play(&mut sig, &cluster).await;
            let (idle_mouth, _) = idle_levels(&client, SECS(1)).await;

            for round in 0..2 {
                say(&mut sig, "Tell me a long story about the sea, the wind and the ships.").await;
                sig.wait_for("speech_started", SECS(20)).await.expect("speech starts");
                tokio::time::sleep(Duration::from_millis(1200)).await;
                let t0 = Instant::now();
                if round == 0 {
                    sig.send_json(&json!({"type": "interrupt"})).await.expect("interrupt");
                } else {
                    say(&mut sig, "Stop, another question!").await;
                }
                let ended = sig.wait_for("speech_ended", SECS(2)).await.expect("speech_ended");
                let ended_after = t0.elapsed();
                assert_eq!(ended["interrupted"], true, "{ended}");
                tokio::time::sleep(Duration::from_millis(800)).await;
                let stats = client.snapshot();
                let last_loud = stats
                    .audio
                    .iter()
                    .filter(|(t, v)| *t >= t0 && *v > 0.01)
                    .map(|(t, _)| *t - t0)
                    .max()
                    .unwrap_or_default();
                eprintln!("round {round}: last loud audio {last_loud:?} after the interrupt; speech_ended after {ended_after:?}");
                if round == 0 {
                    assert!(
                        last_loud <= Duration::from_millis(200),
                        "audio went on for {last_loud:?}"
                    );
                    let mouth = stats.mouth_between(t0 + Duration::from_millis(250), t0 + Duration::from_millis(800));
                    assert!((mean(&mouth) - idle_mouth).abs() < 6.0, "the mouth is idle again");
                } else {
                    // The new question's answer starts speaking; the old one stopped first.
                    let next = sig
                        .wait_for("speech_started", SECS(20))
                        .await
                        .expect("the new answer speaks");
                    assert_eq!(
                        (ended["turn"].as_u64(), next["turn"].as_u64()),
                        (Some(2), Some(3)),
                        "{ended} then {next}"
                    );
                    sig.send_json(&json!({"type": "interrupt"})).await.expect("interrupt");
                    sig.wait_for("speech_ended", SECS(2)).await.expect("ended");
                }
            }
            client.close().await;
            sig.close().await;
        },
    );
}

#[test]
fn openai_compatible_backends_speak_and_their_failures_leave_the_session_usable() {
    netns::run(
        "openai_compatible_backends_speak_and_their_failures_leave_the_session_usable",
        || async {
            let server = OpenAiServer::start().await;
            let extra = format!(
                "[talk]\nsystem_prompt = \"You are Ada, a maths tutor.\"\n\
                 [talk.llm]\nbackend = \"openai\"\nbase_url = \"{0}\"\nmodel = \"tutor-1\"\napi_key = \"sk-test-llm\"\ntimeout_ms = 1500\n\
                 [talk.tts]\nbackend = \"openai\"\nbase_url = \"{0}\"\nmodel = \"voice-1\"\napi_key = \"sk-test-tts\"\ntimeout_ms = 1500\n",
                server.base_url()
            );
            let cluster = talking_cluster(&extra).await;
            let mut sig = Signaling::connect(&cluster.ws_url("talk-3")).await.expect("ws");
            let client = play(&mut sig, &cluster).await;
            let (idle_mouth, _) = idle_levels(&client, SECS(1)).await;

            say(&mut sig, "hello there").await;
            let (events, started, ended) = until_speech_ended(&mut sig, &cluster, SECS(20)).await;
            let answer = events.iter().find(|e| e["final"] == true).expect("final text");
            assert_eq!(answer["text"], "Sure. You asked: hello there. Here is my answer.");
            assert_spoke(
                &client.snapshot(),
                started + Duration::from_millis(150),
                ended,
                idle_mouth,
            );
            let seen = server.seen();
            let chat = &seen.chat_requests[0];
            assert_eq!(
                (chat["model"].as_str(), chat["stream"].as_bool()),
                (Some("tutor-1"), Some(true))
            );
            assert_eq!(
                chat["messages"][0],
                json!({"role": "system", "content": "You are Ada, a maths tutor."})
            );
            assert_eq!(seen.speech_requests[0]["model"], "voice-1");
            assert_eq!(seen.speech_requests[0]["voice"], "alloy");
            assert!(seen.authorization.contains(&"Bearer sk-test-llm".to_owned()));
            assert!(seen.authorization.contains(&"Bearer sk-test-tts".to_owned()));

            // Each failure: an `error` event (talk_failed), the avatar idle, the session usable.
            for (text, needle, within) in [
                ("please FAIL", "HTTP 500", 3),
                ("please HANG", "language model stopped sending", 4),
                ("say BADTTS", "voice unavailable", 3),
                ("say SLOWTTS", "took too long", 4),
                ("say HUGETTS", "larger than", 4),
            ] {
                let t0 = Instant::now();
                say(&mut sig, text).await;
                let err = sig
                    .wait_for("error", SECS(within))
                    .await
                    .unwrap_or_else(|e| panic!("{text}: {e}\n{}", cluster.logs()));
                assert_eq!(err["code"], "talk_failed", "{err}");
                assert!(
                    err["message"].as_str().is_some_and(|m| m.contains(needle)),
                    "{text}: {err}"
                );
                eprintln!("{text}: talk_failed after {:?}: {}", t0.elapsed(), err["message"]);
                tokio::time::sleep(Duration::from_millis(200)).await; // packets already in flight
                let (mouth, audio) = idle_levels(&client, Duration::from_millis(600)).await;
                assert!(
                    (mouth - idle_mouth).abs() < 6.0 && audio < 0.005,
                    "{text}: idle ({mouth}, {audio})"
                );
            }
            // The conversation went on: the next question is answered, with the history.
            say(&mut sig, "and now?").await;
            let (events, _, _) = until_speech_ended(&mut sig, &cluster, SECS(20)).await;
            assert!(events.iter().any(|e| e["final"] == true));
            let last = server.seen().chat_requests.last().cloned().expect("request");
            let roles: Vec<&str> = last["messages"]
                .as_array()
                .expect("messages")
                .iter()
                .filter_map(|m| m["role"].as_str())
                .collect();
            assert_eq!(
                roles,
                ["system", "user", "assistant", "user"],
                "history carries the answered exchange"
            );
            assert!(!cluster.logs().contains("sk-test"), "API keys never reach the logs");
            client.close().await;
            sig.close().await;
        },
    );
}
