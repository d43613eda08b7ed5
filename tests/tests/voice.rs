//! Voice input end to end (issue 17): real relay and worker processes, the worker's Silero VAD,
//! and real speech recognition (scripts/asr-server.py: faster-whisper with Whisper base, offline).
//!
//! * Headless Chromium with a fake microphone playing a WAV file that espeak-ng spoke asks a
//!   question in English and one in Chinese: the page shows the user speaking, the transcript, and
//!   the avatar answering it. Then the fake microphone speaks over a long answer: it is
//!   interrupted and the spoken question answered.
//! * A Rust WebRTC peer with a microphone track speaks over the avatar's answer: the answer stops
//!   (audio silent) within 300 ms of the speech onset, and the new question is answered.
//! * A recogniser that errors, then one that hangs, each give `talk_failed` naming speech
//!   recognition, and the session goes on.
//!
//! No false triggers on silence, noise and the avatar's own echo are proved without sockets, on the
//! same model, in worker/tests/voice_activity.rs.
//!
//! Each test runs in its own loopback-only network namespace (see `netns`).

use avatar_edge_tests::asr::{speak, write_wav, AsrServer};
use avatar_edge_tests::cdp::{fake_microphone, Chromium, SESSION_STATE};
use avatar_edge_tests::cluster::Cluster;
use avatar_edge_tests::netns;
use avatar_edge_tests::openai::OpenAiServer;
use avatar_edge_tests::rtc_client::{Microphone, RtcClient};
use avatar_edge_tests::signaling::Signaling;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const SECS: fn(u64) -> Duration = Duration::from_secs;

/// The worker's recognition deadline where the real recogniser answers. Recognition takes
/// 0.2–0.5 s on 2 cores (issue 31), but these tests run two at a time beside Chromium.
const REAL_RECOGNITION_MS: u64 = 6000;

fn tools() -> std::path::PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools")
}

/// A worker's voice settings: the VAD model, recognition at `asr` within `timeout_ms`, and `extra` TOML.
fn voice_toml(asr: &str, timeout_ms: u64, extra: &str) -> String {
    voice_toml_with(asr, timeout_ms, "", extra)
}

/// The same with more `[talk.vad]` keys (`vad`).
fn voice_toml_with(asr: &str, timeout_ms: u64, vad: &str, extra: &str) -> String {
    format!(
        "[talk.vad]\nmodel = \"{}\"\n{vad}[talk.lipsync]\nonnxruntime = \"{}\"\n[talk.asr]\nbase_url = \"{asr}\"\ntimeout_ms = {timeout_ms}\n{extra}",
        tools().join("models/silero_vad.onnx").display(),
        tools().join("onnxruntime/libonnxruntime.so").display(),
    )
}

/// The page's events of these types, in order, as JSON.
async fn page_events(browser: &mut Chromium, types: &[&str]) -> Vec<Value> {
    let js = format!(
        "JSON.stringify(window.avatarEdge.state.events.filter(e => {}.includes(e.type)))",
        json!(types)
    );
    let v = browser.eval(&js).await.expect("events");
    serde_json::from_str(v.as_str().unwrap_or("[]")).expect("events JSON")
}

/// What the page was told (`features`: does the worker hear?) and whether it hides Talk.
async fn talk_offered(browser: &mut Chromium) -> (Value, Value) {
    let voice = browser
        .poll(
            "window.avatarEdge.state.session ? window.avatarEdge.state.session.voice : null",
            SECS(5),
            |v| !v.is_null(),
        )
        .await;
    let hidden = browser
        .eval("document.getElementById('mic').hidden")
        .await
        .expect("mic");
    (voice, hidden)
}

/// Chromium at `url` with a fake microphone that will play `wav` once, the page playing.
async fn live_with_microphone(url: &str, wav: &std::path::Path, cluster: &Cluster) -> Chromium {
    let mut browser = Chromium::launch_with(url, &fake_microphone(wav))
        .await
        .expect("chromium");
    let state = browser.poll(SESSION_STATE, SECS(15), |v| v == "live").await;
    assert_eq!(state, "live", "{}", cluster.logs());
    browser
}

#[test]
fn chromium_asks_by_voice_in_english_and_chinese_and_the_avatar_answers() {
    netns::run(
        "chromium_asks_by_voice_in_english_and_chinese_and_the_avatar_answers",
        || async {
            let dir = tempfile::tempdir().expect("tempdir");
            let asr = AsrServer::start(dir.path()).await;
            let mut cluster = Cluster::relay_only("").await;
            // The language set, as an operator does: detecting it on a 3 s question is a guess.
            let extra = "language = \"en\"\n[talk.avatars.zh_tutor]\nlanguage = \"zh\"\n";
            cluster
                .add_worker("listener", 4, &voice_toml(&asr.base_url(), REAL_RECOGNITION_MS, extra))
                .await;
            let mouth = avatar_edge_tests::cdp::mouth_luma();
            for (avatar, voice, question, words) in [
                (
                    "avatar_tutor_13",
                    "en-us",
                    "Hello, can you please explain fractions to me?",
                    &["fraction"][..],
                ),
                // Whisper writes Chinese in either script: the word in simplified or traditional.
                ("zh_tutor", "cmn-latn-pinyin", "我想学习数学。", &["学习", "學習"][..]),
            ] {
                let wav = dir.path().join(format!("{avatar}.wav"));
                write_wav(&wav, &speak(voice, question, 48_000), 48_000, 1.5, 4.0);
                let url = format!("http://{}/?voice=1&avatar={avatar}", cluster.relay.http);
                let mut browser = live_with_microphone(&url, &wav, &cluster).await;
                // The worker hears (its recogniser answers): the page offers Talk.
                assert_eq!(
                    talk_offered(&mut browser).await,
                    (json!(true), json!(false)),
                    "the worker hears: Talk is offered"
                );
                let frames = browser
                    .poll("window.avatarEdge.stats().then(s => s.framesDecoded)", SECS(10), |v| {
                        v.as_u64().unwrap_or(0) >= 10
                    })
                    .await;
                assert!(frames.as_u64().unwrap_or(0) >= 10, "playing: {frames}");
                let idle = browser.eval(&mouth).await.expect("luma").as_f64().expect("a picture");
                let audio_before = browser.eval("window.avatarEdge.stats()").await.expect("stats")
                    ["audioSamplesReceived"]
                    .as_f64()
                    .unwrap_or(0.0);

                // The user presses Talk: the fake microphone plays the question once.
                let pressed = Instant::now();
                browser
                    .eval("document.getElementById('mic').click(); true")
                    .await
                    .expect("click");
                // While the user speaks, the page shows what they said so far (English: the
                // question is long enough for partial transcripts).
                let partial_shown = if voice == "en-us" {
                    let shown = browser
                        .poll("!!document.querySelector('#turns .turn.user.partial')", SECS(15), |v| {
                            v == true
                        })
                        .await;
                    Some(shown == true)
                } else {
                    None
                };
                let transcript = browser
                    .poll(
                        "window.avatarEdge.state.events.some(e => e.type === 'user_transcript' && e.final)",
                        SECS(25),
                        |v| v == true,
                    )
                    .await;
                let all = page_events(
                    &mut browser,
                    &["user_speech_started", "user_speech_ended", "user_transcript", "error"],
                )
                .await;
                let (partials, heard): (Vec<Value>, Vec<Value>) = all
                    .into_iter()
                    .partition(|e| e["type"] == "user_transcript" && e["final"] == false);
                if let Some(shown) = partial_shown {
                    assert!(
                        shown,
                        "{avatar}: no partial transcript in the page; events {partials:?} {heard:?}"
                    );
                    let ended = heard.iter().position(|e| e["type"] == "user_speech_ended");
                    eprintln!(
                        "voice ({avatar}): partials {:?}",
                        partials.iter().map(|p| &p["text"]).collect::<Vec<_>>()
                    );
                    assert!(
                        !partials.is_empty() && ended.is_some(),
                        "{avatar}: {partials:?} {heard:?}"
                    );
                }
                assert_eq!(
                    transcript,
                    true,
                    "{avatar}: no transcript; events {heard:?}\n{}",
                    cluster.logs()
                );
                let kinds: Vec<&str> = heard.iter().filter_map(|e| e["type"].as_str()).collect();
                assert_eq!(
                    kinds,
                    ["user_speech_started", "user_speech_ended", "user_transcript"],
                    "{avatar}: {heard:?}"
                );
                let text = heard[2]["text"].as_str().unwrap_or_default().to_lowercase();
                eprintln!(
                    "voice ({avatar}): heard {text:?} ({} ms of speech) {:?} after Talk",
                    heard[1]["duration_ms"],
                    pressed.elapsed()
                );
                assert!(
                    words.iter().any(|w| text.contains(w)),
                    "{avatar}: the transcript {text:?} lacks {words:?}"
                );
                // The avatar answers the transcript: its text, its voice and its mouth.
                let speaking = browser
                    .poll("window.avatarEdge.state.speaking", SECS(15), |v| !v.is_null())
                    .await;
                assert!(!speaking.is_null(), "{avatar}: no speech_started\n{}", cluster.logs());
                let open = browser
                    .poll(&mouth, SECS(3), |v| v.as_f64().is_some_and(|l| l < idle - 25.0))
                    .await;
                assert!(
                    open.as_f64().is_some_and(|l| l < idle - 25.0),
                    "{avatar}: the mouth moves (idle {idle:.1}, now {open})"
                );
                let answer = page_events(&mut browser, &["assistant_text"]).await;
                assert!(!answer.is_empty(), "{avatar}: the answer's text");
                let audio_after = browser.eval("window.avatarEdge.stats()").await.expect("stats")
                    ["audioSamplesReceived"]
                    .as_f64()
                    .unwrap_or(0.0);
                assert!(audio_after > audio_before + 48_000.0, "{avatar}: audio arrives");
                // The conversation shows the spoken question as the user's turn.
                let user_turn = browser
                    .eval("document.querySelector('#turns .turn.user .text')?.textContent || ''")
                    .await
                    .expect("turns");
                assert!(
                    user_turn.as_str().is_some_and(|t| t.to_lowercase() == text),
                    "{avatar}: {user_turn}"
                );
                let pressed_state = browser
                    .eval("document.getElementById('mic').getAttribute('aria-pressed')")
                    .await
                    .expect("mic");
                assert_eq!(pressed_state, "true", "the Talk button shows the microphone is on");
            }

            // Barge-in from the page: a long typed question, and 6 s after Talk the fake
            // microphone speaks over the answer. (Headless Chromium plays no audio, so the time to
            // silence is measured by the Rust peer in the next test.)
            let wav = dir.path().join("barge-in.wav");
            let question = speak("en-us", "Wait, what is two plus two?", 48_000);
            write_wav(&wav, &question, 48_000, 6.0, 4.0);
            let url = format!("http://{}/?voice=1&avatar=avatar_tutor_13", cluster.relay.http);
            let mut browser = live_with_microphone(&url, &wav, &cluster).await;
            browser
                .eval("document.getElementById('mic').click(); window.avatarEdge.say('Tell me a long story about fractions.')")
                .await
                .expect("talk and ask");
            let next = browser
                .poll(
                    "window.avatarEdge.state.events.some(e => e.type === 'speech_started' && e.turn === 2)",
                    SECS(30),
                    |v| v == true,
                )
                .await;
            let events = page_events(
                &mut browser,
                &[
                    "speech_started",
                    "speech_ended",
                    "user_speech_started",
                    "user_transcript",
                    "error",
                ],
            )
            .await;
            assert_eq!(
                next,
                true,
                "the spoken question was answered: {events:?}\n{}",
                cluster.logs()
            );
            let position = |pred: &dyn Fn(&Value) -> bool| events.iter().position(pred);
            let interrupted = position(&|e| e["type"] == "speech_ended" && e["turn"] == 1);
            assert_eq!(
                interrupted.map(|i| &events[i]["interrupted"]),
                Some(&Value::Bool(true)),
                "turn 1 was interrupted: {events:?}"
            );
            let spoke = position(&|e| e["type"] == "user_speech_started").expect("the user spoke");
            assert!(
                position(&|e| e["type"] == "speech_started" && e["turn"] == 1).is_some_and(|i| i < spoke),
                "the user spoke over the avatar: {events:?}"
            );
            assert!(interrupted.is_some_and(|i| i > spoke), "{events:?}");
        },
    );
}

/// Offer with a microphone and play; returns the client and its microphone.
async fn play_with_microphone(sig: &mut Signaling, cluster: &Cluster) -> (RtcClient, Microphone) {
    let (client, mic) = RtcClient::with_microphone().await.expect("client");
    sig.send_offer(&client.offer().await.expect("offer"), "avatar_tutor_13")
        .await
        .expect("offer");
    let answer = sig
        .wait_for("webrtc_answer", SECS(10))
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    assert!(
        answer["sdp"].as_str().is_some_and(|s| s.contains("a=sendrecv")),
        "the answer takes the microphone"
    );
    client
        .accept_answer(answer["sdp"].as_str().unwrap_or_default())
        .await
        .expect("answer");
    client.connected(SECS(10)).await.expect("connected");
    client.wait_frames(10, SECS(10)).await;
    (client, mic)
}

/// A worker that hears through the real recogniser, and session `id` on it playing with a
/// microphone. (Fields drop in order: the processes, then the recogniser, then its directory.)
struct Listening {
    cluster: Cluster,
    sig: Signaling,
    client: RtcClient,
    mic: Microphone,
    _asr: AsrServer,
    _dir: tempfile::TempDir,
}

async fn listening(id: &str) -> Listening {
    let dir = tempfile::tempdir().expect("tempdir");
    let asr = AsrServer::start(dir.path()).await;
    let mut cluster = Cluster::relay_only("").await;
    cluster
        .add_worker("listener", 4, &voice_toml(&asr.base_url(), REAL_RECOGNITION_MS, ""))
        .await;
    let mut sig = Signaling::connect(&cluster.ws_url(id)).await.expect("ws");
    let (client, mic) = play_with_microphone(&mut sig, &cluster).await;
    Listening {
        cluster,
        sig,
        client,
        mic,
        _asr: asr,
        _dir: dir,
    }
}

/// Events until one of type `kind`; panics on timeout.
async fn until(sig: &mut Signaling, kind: &str, cluster: &Cluster) -> (Vec<Value>, Value) {
    let deadline = Instant::now() + SECS(20);
    let mut seen = Vec::new();
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let ev = sig
            .next_event(left)
            .await
            .unwrap_or_else(|e| panic!("waiting for {kind}: {e}; saw {seen:?}\n{}", cluster.logs()));
        if ev["type"] == kind {
            return (seen, ev);
        }
        seen.push(ev);
    }
}

/// Events until the final `user_transcript`; panics on timeout.
async fn until_final(sig: &mut Signaling, cluster: &Cluster) -> (Vec<Value>, Value) {
    let mut seen = Vec::new();
    loop {
        let (before, ev) = until(sig, "user_transcript", cluster).await;
        seen.extend(before);
        if ev["final"] == true {
            return (seen, ev);
        }
        seen.push(ev);
    }
}

#[test]
fn speaking_over_the_avatar_silences_it_within_300_ms_and_is_answered() {
    netns::run(
        "speaking_over_the_avatar_silences_it_within_300_ms_and_is_answered",
        || async {
            let Listening {
                cluster,
                mut sig,
                client,
                mic,
                _asr,
                _dir,
            } = listening("barge-1").await;

            sig.send_json(
                &json!({"type": "text_webrtc", "session_id": "barge-1", "user_id": 5, "tutor_id": 1,
                "message": "Tell me a long story about fractions.", "avatar_id": "avatar_tutor_13"}),
            )
            .await
            .expect("text");
            until(&mut sig, "speech_started", &cluster).await;
            tokio::time::sleep(SECS(1)).await;
            let spoke_at = Instant::now();
            let loud_before = client
                .snapshot()
                .audio_between(spoke_at - SECS(1), spoke_at)
                .iter()
                .filter(|v| **v > 0.02)
                .count();
            assert!(
                loud_before > 10,
                "the avatar is audibly speaking: {loud_before} loud packets"
            );

            // The user speaks at about -20 dBFS, as a voice near a microphone arrives after gain control.
            let question = speak("en-us", "What is two plus two?", 48_000);
            let gain = 0.1 / avatar_worker::talk::audio::rms(&question);
            mic.speak(&question.iter().map(|s| s * gain).collect::<Vec<_>>());
            let (before, ended) = until(&mut sig, "speech_ended", &cluster).await;
            assert_eq!(ended["interrupted"], true, "{ended}");
            assert_eq!(ended["turn"], 1);
            assert!(
                before.iter().any(|e| e["type"] == "user_speech_started"),
                "the barge-in came from the voice: {before:?}"
            );
            let onset = mic.onset_after(spoke_at, 0.01).expect("the speech was sent");
            // Silence: the first received packet of a quiet run that lasts until the next answer.
            tokio::time::sleep(Duration::from_millis(500)).await;
            let audio: Vec<(Instant, f32)> = client
                .snapshot()
                .audio
                .into_iter()
                .filter(|(at, _)| *at >= onset)
                .collect();
            let silent_from = audio.iter().rposition(|(_, rms)| *rms > 0.005).map_or(0, |i| i + 1);
            let silent_at = audio
                .get(silent_from)
                .map(|(at, _)| *at)
                .expect("audio after the onset");
            let latency = silent_at - onset;
            eprintln!("barge-in: the user's speech onset -> the avatar silent: {latency:?}");
            assert!(
                latency <= Duration::from_millis(300),
                "silent {latency:?} after the onset\n{}",
                cluster.logs()
            );

            // The interrupting question is recognised and answered as turn 2.
            let (_, transcript) = until_final(&mut sig, &cluster).await;
            let text = transcript["text"].as_str().unwrap_or_default().to_lowercase();
            eprintln!("barge-in: heard {text:?}");
            assert!(text.contains("two") || text.contains('2'), "{transcript}");
            let (_, next) = until(&mut sig, "speech_started", &cluster).await;
            assert_eq!(next["turn"], 2, "{next}");
        },
    );
}

/// `pcm` without its quiet start and end (espeak-ng pads its speech), at about -20 dBFS.
fn voiced(pcm: &[f32]) -> Vec<f32> {
    let first = pcm.iter().position(|s| s.abs() > 0.01).unwrap_or(0);
    let last = pcm.iter().rposition(|s| s.abs() > 0.01).map_or(pcm.len(), |i| i + 1);
    let gain = 0.1 / avatar_worker::talk::audio::rms(pcm).max(1e-6);
    pcm[first..last.max(first)].iter().map(|s| s * gain).collect()
}

/// Say `parts` with `pause` of silence between them; returns when the last loud packet went.
async fn say_with_pauses(mic: &Microphone, parts: &[&str], pause: Duration) -> Instant {
    let mut pcm = Vec::new();
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            pcm.extend(std::iter::repeat_n(0.0, (pause.as_secs_f32() * 48_000.0) as usize));
        }
        pcm.extend(voiced(&speak("en-us", part, 48_000)));
    }
    let started = Instant::now();
    let length = Duration::from_secs_f32(pcm.len() as f32 / 48_000.0);
    mic.speak(&pcm);
    tokio::time::sleep(length + Duration::from_millis(100)).await;
    let sent = mic.sent.lock().expect("sent").clone();
    sent.iter()
        .filter(|(at, rms)| *at >= started && *rms > 0.01)
        .map(|(at, _)| *at)
        .next_back()
        .unwrap_or(started)
}

/// Issue 31: the turn follows the words. A question with a 400 ms pause in the middle is one
/// turn (no false cut-off); a finished question is answered soon after the user stops; partial
/// transcripts come while the user speaks. Real VAD, real recogniser, real WebRTC.
#[test]
fn a_pause_inside_a_question_keeps_one_turn_and_a_finished_question_is_answered_at_once() {
    netns::run(
        "a_pause_inside_a_question_keeps_one_turn_and_a_finished_question_is_answered_at_once",
        || async {
            let Listening {
                cluster,
                mut sig,
                client: _client,
                mic,
                _asr,
                _dir,
            } = listening("turns-1").await;
            let pause = Duration::from_millis(400);
            // A pause after a function word, after a verb, after "plus": each answered as one
            // turn, its transcript holding words from both sides of the pause (`a|b`: either).
            let cases: [(&[&str], &[&str]); 5] = [
                (&["What is the biggest animal in", "the ocean?"], &["what", "ocean"]),
                (&["Can you explain", "fractions to me?"], &["explain", "fraction"]),
                (&["What is three plus", "four?"], &["plus", "four|4"]),
                (&["Tell me a story about", "a dragon."], &["story", "dragon"]),
                (&["Why do we need", "to sleep?"], &["need", "sleep"]),
            ];
            let mut cut_off = Vec::new();
            for (parts, words) in cases {
                say_with_pauses(&mic, parts, pause).await;
                let (seen, answer) = until(&mut sig, "speech_started", &cluster).await;
                let finals: Vec<String> = seen
                    .iter()
                    .filter(|e| e["type"] == "user_transcript" && e["final"] == true)
                    .map(|e| e["text"].as_str().unwrap_or_default().to_lowercase())
                    .collect();
                eprintln!("paused question {parts:?}: finals {finals:?}");
                let has = |w: &&str| w.split('|').any(|w| finals[0].contains(w));
                if finals.len() != 1 || !words.iter().all(has) {
                    cut_off.push((parts, finals));
                }
                sig.send_json(&json!({"type": "interrupt"})).await.expect("interrupt");
                let turn = answer["turn"].clone();
                loop {
                    let (_, ended) = until(&mut sig, "speech_ended", &cluster).await;
                    if ended["turn"] == turn {
                        break;
                    }
                }
            }

            // A finished question: partials while it is spoken, then the answer soon after.
            let spoken_end = say_with_pauses(
                &mic,
                &["Please tell me about the weather today, and whether I will need an umbrella?"],
                pause,
            )
            .await;
            let (seen, transcript) = until_final(&mut sig, &cluster).await;
            let heard_at = Instant::now();
            let (_, started) = until(&mut sig, "speech_started", &cluster).await;
            let answered_at = Instant::now();
            let partials: Vec<&Value> = seen
                .iter()
                .filter(|e| e["type"] == "user_transcript" && e["final"] == false)
                .collect();
            let ended = seen.iter().position(|e| e["type"] == "user_speech_ended");
            let first_partial = seen.iter().position(|e| e["type"] == "user_transcript");
            eprintln!(
                "finished question: {} partials {:?}; the end of speech -> final transcript {:?}, -> speech_started {:?}",
                partials.len(),
                partials.iter().map(|p| &p["text"]).collect::<Vec<_>>(),
                heard_at.saturating_duration_since(spoken_end),
                answered_at.saturating_duration_since(spoken_end)
            );
            assert!(
                cut_off.is_empty(),
                "questions with a 400 ms pause inside were cut or misheard: {cut_off:?}\n{}",
                cluster.logs()
            );
            assert!(
                partials.len() >= 2 && first_partial < ended,
                "partial transcripts while the user speaks: {seen:?}"
            );
            assert!(transcript["text"]
                .as_str()
                .is_some_and(|t| t.to_lowercase().contains("umbrella")));
            assert_eq!(started["turn"].as_u64().map(|t| t > 5), Some(true), "{started}");
            // The bench measures it (bench-voice); this bounds it with room for a busy CI machine.
            assert!(
                heard_at.saturating_duration_since(spoken_end) < Duration::from_millis(1500),
                "the final transcript came {:?} after the end of speech\n{}",
                heard_at.saturating_duration_since(spoken_end),
                cluster.logs()
            );
        },
    );
}

/// Issue 31: recognition whose cost follows the audio's length (the offline default) against
/// the old 30 s window, on the same fixed questions in the same run: no less accurate, and
/// several times faster (`bench-asr` prints the table).
#[test]
fn recognition_fitted_to_the_audio_is_as_accurate_as_the_30_s_window_and_faster() {
    use avatar_edge_tests::asr::{score, QUESTIONS_EN, QUESTIONS_ZH, VOICES_EN, VOICES_ZH, ZH_PROMPT};
    netns::run(
        "recognition_fitted_to_the_audio_is_as_accurate_as_the_30_s_window_and_faster",
        || async {
            let dir = tempfile::tempdir().expect("tempdir");
            let fitted = AsrServer::start(dir.path()).await;
            let full = AsrServer::start_with(dir.path(), &["--window", "full"]).await;
            let (mut new_errors, mut old_errors, mut units) = (0, 0, 0);
            for (language, voices, questions, prompt) in [
                ("en", &VOICES_EN[..2], &QUESTIONS_EN[..], None),
                ("zh", &VOICES_ZH[..1], &QUESTIONS_ZH[..], Some(ZH_PROMPT)),
            ] {
                let new = score(&fitted.base_url(), questions, voices, language, prompt)
                    .await
                    .expect("the fitted window");
                let old = score(&full.base_url(), questions, voices, language, prompt)
                    .await
                    .expect("the 30 s window");
                let median = |s: &avatar_edge_tests::asr::Score| s.ms[s.ms.len() / 2];
                eprintln!(
                    "{language}: fitted {}/{} errors, median {:.0} ms; 30 s window {}/{} errors, median {:.0} ms",
                    new.errors,
                    new.units,
                    median(&new),
                    old.errors,
                    old.units,
                    median(&old)
                );
                eprintln!("{language}: fitted misheard {:?}", new.misheard);
                eprintln!("{language}: 30 s misheard {:?}", old.misheard);
                assert!(
                    median(&new) < 0.6 * median(&old),
                    "{language}: the fitted window is not faster: {:?} vs {:?}",
                    new.ms,
                    old.ms
                );
                new_errors += new.errors;
                old_errors += old.errors;
                units += new.units;
            }
            // No worse: at most 3 % of the units more, over both languages (which of the two
            // misses a word or two more moves from run to run; bench-asr's larger run has the rates).
            assert!(
                new_errors as f64 <= old_errors as f64 + 0.03 * units as f64,
                "fitted {new_errors} errors, 30 s window {old_errors}, of {units}"
            );
        },
    );
}

/// Voice input is configured, but speech recognition cannot be reached: the worker says so at
/// start, and the page hides Talk instead of failing each attempt.
#[test]
fn a_worker_whose_recogniser_is_down_says_so_at_start_and_its_page_hides_talk() {
    netns::run(
        "a_worker_whose_recogniser_is_down_says_so_at_start_and_its_page_hides_talk",
        || async {
            // Nothing listens on port 9 in the test's own namespace: refused at once.
            let mut cluster = Cluster::relay_only("").await;
            cluster
                .add_worker("deaf", 2, &voice_toml("http://127.0.0.1:9/v1", 2000, ""))
                .await;
            let log = cluster.workers[0].log.clone();
            cluster
                .wait_for_log(&log, "speech recognition cannot be reached", SECS(5))
                .await;
            let url = format!("http://{}/?avatar=avatar_tutor_13", cluster.relay.http);
            let mut browser = Chromium::launch(&url).await.expect("chromium");
            let state = browser.poll(SESSION_STATE, SECS(15), |v| v == "live").await;
            assert_eq!(state, "live", "{}", cluster.logs());
            assert_eq!(
                talk_offered(&mut browser).await,
                (json!(false), json!(true)),
                "the worker cannot hear: Talk is hidden\n{}",
                cluster.logs()
            );
            // Typing still works.
            browser.eval("window.avatarEdge.say('Hello?')").await.expect("say");
            let speaking = browser
                .poll("window.avatarEdge.state.speaking", SECS(10), |v| !v.is_null())
                .await;
            assert!(
                !speaking.is_null(),
                "the typed question is answered\n{}",
                cluster.logs()
            );
        },
    );
}

#[test]
fn a_recogniser_that_fails_or_hangs_gives_talk_failed_and_the_session_lives_on() {
    netns::run(
        "a_recogniser_that_fails_or_hangs_gives_talk_failed_and_the_session_lives_on",
        || async {
            let standin = OpenAiServer::start().await;
            let mut cluster = Cluster::relay_only("").await;
            // The whole utterance only, recognised once it ends: no partials, and no recognition
            // at a pause (a failed one is retried on the whole utterance, so the question is not
            // lost; worker/src/dialogue.rs tests that).
            let whole_only = voice_toml_with(&standin.base_url(), 2000, "pause_ms = 640\n", "partial_ms = 0\n");
            cluster.add_worker("listener", 4, &whole_only).await;
            let mut sig = Signaling::connect(&cluster.ws_url("asr-fail-1")).await.expect("ws");
            let (_client, mic) = play_with_microphone(&mut sig, &cluster).await;
            let phrase = speak("en-us", "Hello there, can you hear me?", 48_000);
            let gain = 0.1 / avatar_worker::talk::audio::rms(&phrase);
            let phrase: Vec<f32> = phrase.iter().map(|s| s * gain).collect();
            // First the recogniser answers HTTP 500, then it never answers (timeout_ms = 2000).
            for expected in ["HTTP 500", "took too long"] {
                let asked = Instant::now();
                mic.speak(&phrase);
                let (seen, error) = until(&mut sig, "error", &cluster).await;
                let kinds: Vec<&str> = seen.iter().filter_map(|e| e["type"].as_str()).collect();
                assert_eq!(kinds, ["user_speech_started", "user_speech_ended"], "{seen:?}");
                assert_eq!(error["code"], "talk_failed", "{error}");
                let message = error["message"].as_str().unwrap_or_default();
                assert!(
                    message.contains("speech recognition") && message.contains(expected),
                    "{message}"
                );
                eprintln!("asr failure: {message:?} after {:?}", asked.elapsed());
            }
            // The session lives on: the next utterance is recognised and answered.
            mic.speak(&phrase);
            let (_, transcript) = until(&mut sig, "user_transcript", &cluster).await;
            assert_eq!(transcript["text"], "hello after the failures");
            let (_, text) = until(&mut sig, "assistant_text", &cluster).await;
            assert_eq!(text["turn"], 1, "{text}");
            assert_eq!(standin.seen().transcriptions.len(), 3);
        },
    );
}
