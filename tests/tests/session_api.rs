//! The session API (issue 28): the operator's backend drives a session through `/api/v1/...` on
//! the relay, with a key. Real relay and worker processes, a Rust WebRTC receiver that decodes
//! the pictures and the audio, and a real HTTP server speaking the OpenAI API as the language
//! model (so a test can tell whether the model was asked).

use avatar_edge_tests::cluster::{http_request, http_upload, Cluster, SECRET};
use avatar_edge_tests::netns;
use avatar_edge_tests::openai::OpenAiServer;
use avatar_edge_tests::rtc_client::{ReceiverStats, RtcClient};
use avatar_edge_tests::signaling::Signaling;
use serde_json::{json, Value};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

const KEY: &str = "backend-key-0123456789abcdef0123456789";
const SECS: fn(u64) -> Duration = Duration::from_secs;

fn api_keys(extra: &str) -> String {
    format!("[api]\nmax_text_chars = 400\n{extra}\n[[api.keys]]\nname = \"backend\"\nkey = \"{KEY}\"\n")
}

/// Call the API on `addr` with the test key; the status and the JSON body (`Null` if none).
async fn call(addr: SocketAddr, method: &str, path: &str, body: Option<Value>) -> (u16, Value) {
    call_with(addr, method, path, Some(KEY), body.map(|b| b.to_string()).as_deref()).await
}

async fn call_with(addr: SocketAddr, method: &str, path: &str, key: Option<&str>, body: Option<&str>) -> (u16, Value) {
    let auth = key.map(|k| format!("Bearer {k}"));
    let mut headers = vec![("Content-Type", "application/json")];
    if let Some(a) = auth.as_deref() {
        headers.push(("Authorization", a));
    }
    let (status, text) = http_request(addr, method, path, &headers, body.unwrap_or("").as_bytes())
        .await
        .expect("HTTP");
    (status, serde_json::from_str(&text).unwrap_or(Value::Null))
}

/// Connect a receiver and wait until its video plays: ICE connecting on the receiver's side comes
/// a moment before the worker starts the session's media, and until then a say is refused
/// (409 `not_ready`), as a backend would be told.
async fn play(sig: &mut Signaling, cluster: &Cluster) -> RtcClient {
    let client = avatar_edge_tests::play(sig, "avatar_tutor_13")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
    let playing = client.wait_frames(1, SECS(10)).await;
    assert!(playing.frames_decoded >= 1, "no video\n{}", cluster.logs());
    client
}

/// Events until the `speech_ended` of the next speech to start; (events, started, ended).
async fn until_speech_ended(sig: &mut Signaling, cluster: &Cluster) -> (Vec<Value>, Instant, Instant) {
    let deadline = Instant::now() + SECS(20);
    let mut events = Vec::new();
    let mut started: Option<(Instant, Value)> = None;
    loop {
        let ev = sig
            .next_event(deadline.saturating_duration_since(Instant::now()))
            .await
            .unwrap_or_else(|e| panic!("{e}; events so far {events:?}\n{}", cluster.logs()));
        match ev["type"].as_str() {
            Some("speech_started") => started = Some((Instant::now(), ev["turn"].clone())),
            Some("speech_ended") if started.as_ref().is_some_and(|(_, t)| *t == ev["turn"]) => {
                let (at, _) = started.expect("matched above");
                events.push(ev);
                return (events, at, Instant::now());
            }
            Some("error") => panic!("error event: {ev}\n{}", cluster.logs()),
            _ => {}
        }
        events.push(ev);
    }
}

fn loud(stats: &ReceiverStats, from: Instant, to: Instant) -> (usize, usize) {
    let audio = stats.audio_between(from, to);
    (audio.iter().filter(|v| **v > 0.02).count(), audio.len())
}

/// POST `pieces` to `path` with the test key, chunked, `gap` apart ([`http_upload`]).
async fn upload(
    addr: SocketAddr,
    path: &str,
    content_type: &str,
    pieces: &[&[u8]],
    gap: Duration,
) -> (u16, Value, Instant) {
    let auth = format!("Bearer {KEY}");
    let headers = [("Authorization", auth.as_str()), ("Content-Type", content_type)];
    let (status, body, last) = http_upload(addr, path, &headers, pieces, gap).await;
    (status, serde_json::from_str(body.trim()).unwrap_or(Value::Null), last)
}

/// A WAV file of `text` spoken by espeak-ng (22,050 Hz, 16-bit mono), as `-w` writes it (true
/// sizes) or as `--stdout` does (placeholder sizes: to the end of the stream).
fn espeak_wav(text: &str, streaming: bool) -> Vec<u8> {
    let dir = tempfile::tempdir().expect("tempdir");
    let path = dir.path().join("speech.wav");
    let mut cmd = std::process::Command::new("espeak-ng");
    cmd.args(["-s", "150", "-v", "en-us"]);
    if streaming {
        cmd.arg("--stdout");
    } else {
        cmd.arg("-w").arg(&path);
    }
    let out = cmd.arg(text).output().expect("espeak-ng (scripts/install-deps)");
    assert!(
        out.status.success(),
        "espeak-ng: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    if streaming {
        out.stdout
    } else {
        std::fs::read(&path).expect("the WAV")
    }
}

/// RMS (0..1) of each 20 ms of a 44-byte-header 16-bit mono WAV at 22,050 Hz: what the receiver
/// measures per Opus packet.
fn wav_rms(wav: &[u8]) -> Vec<f32> {
    let samples: Vec<f32> = wav[44..]
        .chunks_exact(2)
        .map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0)
        .collect();
    samples
        .chunks(441)
        .map(|c| (c.iter().map(|s| s * s).sum::<f32>() / c.len().max(1) as f32).sqrt())
        .collect()
}

/// Seconds from the first to the last 20 ms whose level is above a tenth of the loudest.
fn voiced_span(levels: impl Iterator<Item = f32>) -> f64 {
    let levels: Vec<f32> = levels.collect();
    let peak = levels.iter().copied().fold(0.0, f32::max);
    let voiced: Vec<usize> = (0..levels.len()).filter(|i| levels[*i] > peak * 0.1).collect();
    match (voiced.first(), voiced.last()) {
        (Some(a), Some(b)) => (b - a + 1) as f64 * 0.02,
        _ => 0.0,
    }
}

/// Seconds of 16-bit mono audio in a 44-byte-header WAV at 22,050 Hz.
fn wav_seconds(wav: &[u8]) -> f64 {
    (wav.len() - 44) as f64 / 2.0 / 22_050.0
}

fn mean(v: &[f32]) -> f32 {
    v.iter().sum::<f32>() / v.len().max(1) as f32
}

async fn talking_cluster(relay_extra: &str, llm: &OpenAiServer) -> Cluster {
    let mut cluster = Cluster::relay_only(relay_extra).await;
    let worker = format!(
        "[talk.llm]\nbackend = \"openai\"\nbase_url = \"{}\"\nmodel = \"tutor-1\"\napi_key = \"sk-test\"\ntimeout_ms = 3000\n",
        llm.base_url()
    );
    cluster.add_worker("talker", 4, &worker).await;
    cluster
}

#[test]
fn the_backend_lists_the_session_makes_it_speak_interrupts_and_ends_it() {
    netns::run(
        "the_backend_lists_the_session_makes_it_speak_interrupts_and_ends_it",
        || async {
            let llm = OpenAiServer::start().await;
            let cluster = talking_cluster(&api_keys(""), &llm).await;
            let api = cluster.relay.http;
            let mut sig = Signaling::connect(&cluster.ws_url("lesson-7")).await.expect("ws");
            let client = play(&mut sig, &cluster).await;
            client.wait_frames(10, SECS(5)).await;

            // GET lists the session with its worker and avatar.
            let (status, list) = call(api, "GET", "/api/v1/sessions", None).await;
            assert_eq!(status, 200, "{list}");
            let session = list["sessions"]
                .as_array()
                .and_then(|s| s.iter().find(|s| s["session_id"] == "lesson-7"))
                .unwrap_or_else(|| panic!("listed: {list}"));
            assert_eq!(session["worker_id"], "talker");
            assert_eq!(session["avatar_id"], "avatar_tutor_13");
            assert_eq!(session["state"], "idle");
            assert!(
                session["started_at"].as_str().is_some_and(|t| t.ends_with('Z')),
                "{session}"
            );
            let (status, one) = call(api, "GET", "/api/v1/sessions/lesson-7", None).await;
            assert_eq!((status, &one["session_id"]), (200, &json!("lesson-7")));

            // say (repeat): spoken as given, with no language model.
            let text = "Today we learn how plants make food from light.";
            let sent = Instant::now();
            let (status, turn) = call(
                api,
                "POST",
                "/api/v1/sessions/lesson-7/say",
                Some(json!({"text": text})),
            )
            .await;
            assert_eq!(status, 202, "{turn}");
            assert_eq!(turn["queued"], false);
            let (events, started, ended) = until_speech_ended(&mut sig, &cluster).await;
            eprintln!("say (repeat) -> speech_started {:?}", started - sent);
            let said = events
                .iter()
                .find(|e| e["type"] == "assistant_text" && e["final"] == true)
                .expect("final text");
            assert_eq!(said["text"], text, "the browser sees exactly the text");
            assert_eq!(said["turn"], turn["turn"]);
            let stats = client.snapshot();
            let (n_loud, n) = loud(&stats, started + Duration::from_millis(150), ended);
            assert!(n_loud * 3 >= n && n > 20, "speech heard: {n_loud}/{n} loud packets");
            let idle_mouth = mean(&stats.mouth_between(sent - Duration::from_millis(600), sent));
            let mouth = stats.mouth_between(started + Duration::from_millis(150), ended);
            let moved = mouth.iter().filter(|m| (**m - idle_mouth).abs() > 6.0).count();
            assert!(
                moved * 4 >= mouth.len() && mouth.len() > 20,
                "the mouth moves: {moved}/{} frames (idle luma {idle_mouth:.1})",
                mouth.len()
            );
            assert!(llm.seen().chat_requests.is_empty(), "repeat asks no language model");

            // say (chat): the language model answers it.
            let (status, _) = call(
                api,
                "POST",
                "/api/v1/sessions/lesson-7/say",
                Some(json!({"text": "hello there", "mode": "chat"})),
            )
            .await;
            assert_eq!(status, 202);
            let (events, ..) = until_speech_ended(&mut sig, &cluster).await;
            let answer = events.iter().find(|e| e["final"] == true).expect("final");
            assert_eq!(answer["text"], "Sure. You asked: hello there. Here is my answer.");
            assert_eq!(llm.seen().chat_requests.len(), 1, "chat asks the model");

            // A say while the avatar speaks waits its turn; interrupt stops both.
            let long = "This is a long explanation. ".repeat(8);
            call(
                api,
                "POST",
                "/api/v1/sessions/lesson-7/say",
                Some(json!({"text": long})),
            )
            .await;
            sig.wait_for("speech_started", SECS(10)).await.expect("speaking");
            let (_, queued) = call(
                api,
                "POST",
                "/api/v1/sessions/lesson-7/say",
                Some(json!({"text": "And this comes after."})),
            )
            .await;
            assert_eq!(queued["queued"], true, "{queued}");
            let (_, state) = call(api, "GET", "/api/v1/sessions/lesson-7", None).await;
            assert_eq!(state["state"], "speaking");
            tokio::time::sleep(Duration::from_millis(500)).await;
            let at = Instant::now();
            let (status, stopped) = call(api, "POST", "/api/v1/sessions/lesson-7/interrupt", None).await;
            assert_eq!((status, &stopped["interrupted"]), (200, &json!(true)), "{stopped}");
            let ended = sig.wait_for("speech_ended", SECS(2)).await.expect("speech_ended");
            assert_eq!(ended["interrupted"], true);
            tokio::time::sleep(Duration::from_millis(900)).await;
            let (n_loud, n) = loud(
                &client.snapshot(),
                at + Duration::from_millis(200),
                at + Duration::from_millis(900),
            );
            eprintln!("after interrupt: {n_loud}/{n} loud packets from 200 ms on");
            assert!(
                n > 20 && n_loud == 0,
                "silent within 200 ms of the interrupt: {n_loud}/{n} loud"
            );
            let (_, again) = call(api, "POST", "/api/v1/sessions/lesson-7/interrupt", None).await;
            assert_eq!(again["interrupted"], false, "the queued say was dropped too");

            // A say with interrupt cuts the answer in progress and plays itself to its end.
            call(
                api,
                "POST",
                "/api/v1/sessions/lesson-7/say",
                Some(json!({"text": long})),
            )
            .await;
            let first = sig.wait_for("speech_started", SECS(10)).await.expect("speaking");
            let (status, cut_in) = call(
                api,
                "POST",
                "/api/v1/sessions/lesson-7/say",
                Some(json!({"text": "Sorry, one urgent thing.", "interrupt": true})),
            )
            .await;
            assert_eq!((status, &cut_in["queued"]), (202, &json!(false)), "{cut_in}");
            let urgent = cut_in["turn"].as_u64().expect("turn");
            let (mut started, mut ended) = (false, None);
            let deadline = Instant::now() + SECS(10);
            while ended.is_none() && Instant::now() < deadline {
                let Ok(ev) = sig.next_event(SECS(10)).await else { break };
                match ev["type"].as_str() {
                    Some("speech_started") if ev["turn"] == urgent => started = true,
                    Some("speech_ended") if ev["turn"] == urgent => ended = Some(ev["interrupted"].clone()),
                    _ => {}
                }
            }
            assert!(
                started && ended == Some(json!(false)),
                "the urgent say (turn {urgent}, after turn {}) played to its end: started {started}, ended {ended:?}\n{}",
                first["turn"],
                cluster.logs()
            );
            let (_, state) = call(api, "GET", "/api/v1/sessions/lesson-7", None).await;
            assert_eq!(state["state"], "idle", "nothing is left speaking: {state}");

            // DELETE ends the browser's session.
            let (status, _) = call(api, "DELETE", "/api/v1/sessions/lesson-7", None).await;
            assert_eq!(status, 204);
            let err = sig.wait_for("error", SECS(5)).await.expect("told");
            assert_eq!(err["code"], "session_ended", "{err}");
            let closed = sig.next_event(SECS(3)).await;
            assert!(
                closed.as_ref().is_err_and(|e| e.to_string().contains("closed")),
                "the socket closes, so the page cannot start the session again: {closed:?}"
            );
            let (status, gone) = call(api, "GET", "/api/v1/sessions/lesson-7", None).await;
            assert_eq!(status, 404, "{gone}");
            assert_eq!(gone["error"]["code"], "no_session");
        },
    );
}

#[test]
fn the_backends_own_audio_is_lip_synced_and_plays_while_it_uploads() {
    netns::run(
        "the_backends_own_audio_is_lip_synced_and_plays_while_it_uploads",
        || async {
            let llm = OpenAiServer::start().await;
            // Speech synthesis through the stand-in too, so that a request to it would show.
            let mut cluster = Cluster::relay_only(&api_keys("max_audio_seconds = 8")).await;
            let worker = format!(
                "[talk.llm]\nbackend = \"openai\"\nbase_url = \"{0}\"\nmodel = \"tutor-1\"\napi_key = \"sk-test\"\n\
             [talk.tts]\nbackend = \"openai\"\nbase_url = \"{0}\"\nmodel = \"voice-1\"\napi_key = \"sk-test\"\n",
                llm.base_url()
            );
            cluster.add_worker("talker", 4, &worker).await;
            let api = cluster.relay.http;
            let mut sig = Signaling::connect(&cluster.ws_url("audio-1")).await.expect("ws");
            let client = play(&mut sig, &cluster).await;
            client.wait_frames(10, SECS(5)).await;
            let idle_mouth = {
                let now = Instant::now();
                tokio::time::sleep(Duration::from_millis(600)).await;
                mean(&client.snapshot().mouth_between(now, Instant::now()))
            };

            // A whole WAV file, as espeak-ng writes it.
            let wav = espeak_wav(
                "The water cycle moves water from the sea to the sky and back again.",
                false,
            );
            let seconds = wav_seconds(&wav);
            let path = "/api/v1/sessions/audio-1/audio";
            // The answer comes once the avatar's turn holds all of it, which may be some way
            // into its playback: the events are read meanwhile, as they arrive.
            let file = wav.clone();
            let uploading = tokio::spawn(async move { upload(api, path, "audio/wav", &[&file], Duration::ZERO).await });
            let (events, started, ended) = until_speech_ended(&mut sig, &cluster).await;
            let (status, turn, _) = uploading.await.expect("upload");
            assert_eq!(status, 202, "{turn}\n{}", cluster.logs());
            assert!(
                (turn["seconds"].as_f64().unwrap_or(0.0) - seconds).abs() < 0.01,
                "{turn} vs {seconds}"
            );
            let played = (ended - started).as_secs_f64();
            eprintln!("audio of {seconds:.2} s played for {played:.2} s (speech_started → speech_ended)");
            assert!(
                (played - seconds).abs() <= seconds * 0.1,
                "played {played:.2} s of a {seconds:.2} s file"
            );
            assert!(
                !events.iter().any(|e| e["type"] == "assistant_text"),
                "audio has no text: {events:?}"
            );
            let stats = client.snapshot();
            let (n_loud, n) = loud(&stats, started + Duration::from_millis(150), ended);
            assert!(n_loud * 3 >= n && n > 20, "speech heard: {n_loud}/{n} loud packets");
            // At the receiver: the speech it heard lasts as long as the file's (±10 %).
            let heard = voiced_span(
                stats
                    .audio
                    .iter()
                    .filter(|(t, _)| {
                        *t + Duration::from_millis(500) >= started && *t <= ended + Duration::from_millis(500)
                    })
                    .map(|(_, v)| *v),
            );
            let voiced = voiced_span(wav_rms(&wav).into_iter());
            eprintln!("voiced {voiced:.2} s in the file, {heard:.2} s heard at the receiver");
            assert!(
                (heard - voiced).abs() <= voiced * 0.1,
                "heard {heard:.2} s of speech for {voiced:.2} s in the file"
            );
            let mouth = stats.mouth_between(started + Duration::from_millis(150), ended);
            let moved = mouth.iter().filter(|m| (**m - idle_mouth).abs() > 6.0).count();
            eprintln!("mouth luma idle {idle_mouth:.1}; {moved}/{} frames moved", mouth.len());
            assert!(
                moved * 4 >= mouth.len() && mouth.len() > 20,
                "the mouth moves: {moved}/{}",
                mouth.len()
            );
            let seen = llm.seen();
            assert!(
                seen.chat_requests.is_empty() && seen.speech_requests.is_empty(),
                "no language model and no speech synthesis"
            );

            // A streaming WAV (placeholder sizes) sent in pieces at about real time: the avatar
            // speaks before the last piece is sent.
            let wav = espeak_wav(
                "This lesson is streamed to the avatar while it is still being made.",
                true,
            );
            let sent_at = Instant::now();
            let streamed = wav.clone();
            let uploading = tokio::spawn(async move {
                let pieces: Vec<&[u8]> = streamed.chunks(8_820).collect(); // 0.2 s each
                upload(api, path, "audio/wav", &pieces, Duration::from_millis(150)).await
            });
            let started = sig
                .wait_for("speech_started", SECS(10))
                .await
                .unwrap_or_else(|e| panic!("{e}\n{}", cluster.logs()));
            let heard_at = Instant::now();
            // One upload at a time: a second one while this one streams is refused.
            let silence = [0u8; 3200];
            let (second, reply, _) = upload(api, path, "audio/L16;rate=16000", &[&silence[..]], Duration::ZERO).await;
            assert_eq!((second, &reply["error"]["code"]), (429, &json!("busy")), "{reply}");
            let (status, _, last_piece) = uploading.await.expect("upload");
            assert_eq!(status, 202);
            eprintln!(
                "chunked: speech_started {:?} after the first piece, last piece sent at {:?}",
                heard_at - sent_at,
                last_piece - sent_at
            );
            assert!(heard_at < last_piece, "playing began before the upload ended");
            let first_loud = client
                .snapshot()
                .audio
                .iter()
                .find(|(t, v)| *t >= sent_at && *v > 0.02)
                .map(|(t, _)| *t);
            assert!(
                first_loud.is_some_and(|t| t < last_piece),
                "the receiver heard the speech before the last piece was sent ({:?} vs {:?})",
                first_loud.map(|t| t - sent_at),
                last_piece - sent_at
            );
            let ended = sig.wait_for("speech_ended", SECS(15)).await.expect("ended");
            assert_eq!(
                (ended["turn"].clone(), ended["interrupted"].clone()),
                (started["turn"].clone(), json!(false))
            );

            // Raw samples: audio/L16 (big-endian) at 16 kHz, interrupting nothing.
            let tone: Vec<u8> = (0..16_000)
                .flat_map(|i| (((i as f32 * 0.06).sin() * 12_000.0) as i16).to_be_bytes())
                .collect();
            let raw = tone.clone();
            let uploading =
                tokio::spawn(async move { upload(api, path, "audio/L16;rate=16000", &[&raw], Duration::ZERO).await });
            let (_, started, ended) = until_speech_ended(&mut sig, &cluster).await;
            let (status, reply, _) = uploading.await.expect("upload");
            assert_eq!((status, reply["seconds"].as_f64()), (202, Some(1.0)), "{reply}");
            let played = (ended - started).as_secs_f64();
            assert!((played - 1.0).abs() <= 0.1, "1 s of L16 played for {played:.2} s");

            // What it does not take.
            for (content_type, body, status, code) in [
                ("audio/mpeg", &b"ID3\x03\0\0\0\0\0\0"[..], 415, "unsupported_audio"),
                ("audio/L16", &tone[..64], 415, "unsupported_audio"),
                (
                    "audio/wav",
                    &b"RIFF\0\0\0\0WAVEfmt \x10\0\0\0\x03\0\x01\0\x80\xbb\0\0\0\0\0\0\x04\0\x20\0"[..],
                    415,
                    "unsupported_audio",
                ),
            ] {
                let (got, reply, _) = upload(api, path, content_type, &[body], Duration::ZERO).await;
                assert_eq!(
                    (got, &reply["error"]["code"]),
                    (status, &json!(code)),
                    "{content_type}: {reply}"
                );
                eprintln!("{content_type}: {}", reply["error"]["message"]);
            }
            // Over api.max_audio_seconds (8 s): a file that says so up front is refused whole.
            let long: Vec<u8> = {
                let mut w =
                    b"RIFF\0\0\0\0WAVEfmt \x10\0\0\0\x01\0\x01\0\x80\x3e\0\0\0\x7d\0\0\x02\0\x10\0data".to_vec();
                w.extend_from_slice(&(16_000u32 * 2 * 9).to_le_bytes());
                w.resize(w.len() + 16_000 * 2 * 9, 0);
                w
            };
            let (got, reply, _) = upload(api, path, "audio/wav", &[&long], Duration::ZERO).await;
            assert_eq!(
                (got, &reply["error"]["code"]),
                (413, &json!("audio_too_long")),
                "{reply}"
            );
            // A stream that does not say its length is cut where it passes the limit.
            let second = vec![0u8; 16_000 * 2];
            let stream: Vec<&[u8]> = (0..9).map(|_| &second[..]).collect();
            let (got, reply, _) = upload(api, path, "audio/L16;rate=16000", &stream, Duration::ZERO).await;
            assert_eq!(
                (got, &reply["error"]["code"]),
                (413, &json!("audio_too_long")),
                "{reply}"
            );
            let (status, _, _) = upload(
                api,
                "/api/v1/sessions/nobody/audio",
                "audio/wav",
                &[&wav],
                Duration::ZERO,
            )
            .await;
            assert_eq!(status, 404);
            assert!(llm.seen().speech_requests.is_empty());
            let frames = client.snapshot().frames_decoded;
            assert!(
                client.wait_frames(frames + 10, SECS(5)).await.frames_decoded >= frames + 10,
                "still playing"
            );
        },
    );
}

#[test]
fn bad_calls_get_their_status_and_the_session_is_unharmed() {
    netns::run("bad_calls_get_their_status_and_the_session_is_unharmed", || async {
        // Without keys the API is not there.
        let off = Cluster::start().await;
        let (status, _) = call(off.relay.http, "GET", "/api/v1/sessions", None).await;
        assert_eq!(status, 404, "no key configured: off");

        let llm = OpenAiServer::start().await;
        let cluster = talking_cluster(&api_keys(""), &llm).await;
        let api = cluster.relay.http;
        let mut sig = Signaling::connect(&cluster.ws_url("bad-1")).await.expect("ws");
        let client = play(&mut sig, &cluster).await;
        let say = "/api/v1/sessions/bad-1/say";
        // (method, key, path, body, status, error code)
        type Case<'a> = (&'a str, Option<&'a str>, &'a str, Option<&'a str>, u16, &'a str);
        let cases: Vec<Case> = vec![
            ("GET", None, "/api/v1/sessions", None, 401, "unauthorized"),
            (
                "GET",
                Some("wrong-key-0123456789abcdef0123"),
                "/api/v1/sessions",
                None,
                401,
                "unauthorized",
            ),
            ("GET", Some(KEY), "/api/v1/sessions/nobody", None, 404, "no_session"),
            (
                "POST",
                Some(KEY),
                "/api/v1/sessions/nobody/say",
                Some(r#"{"text":"hi"}"#),
                404,
                "no_session",
            ),
            ("POST", Some(KEY), say, Some("{not json"), 400, "bad_json"),
            (
                "POST",
                Some(KEY),
                say,
                Some(r#"{"text":"hi","mode":"sing"}"#),
                400,
                "bad_json",
            ),
            ("POST", Some(KEY), say, Some(r#"{"text":"   "}"#), 400, "empty_text"),
            ("DELETE", Some(KEY), "/api/v1/sessions/nobody", None, 404, "no_session"),
        ];
        for (method, key, path, body, want, code) in cases {
            let (status, reply) = call_with(api, method, path, key, body).await;
            assert_eq!(status, want, "{method} {path} {body:?}: {reply}");
            assert_eq!(reply["error"]["code"], code, "{method} {path}: {reply}");
            assert!(reply["error"]["message"].as_str().is_some_and(|m| !m.is_empty()));
        }
        let too_long = json!({"text": "x".repeat(401)}).to_string();
        let (status, reply) = call_with(api, "POST", say, Some(KEY), Some(&too_long)).await;
        assert_eq!(
            (status, &reply["error"]["code"]),
            (413, &json!("text_too_long")),
            "{reply}"
        );
        assert!(
            reply["error"]["message"].as_str().is_some_and(|m| m.contains("400")),
            "{reply}"
        );
        // The session is unharmed: it plays, and a good call works.
        let frames = client.snapshot().frames_decoded;
        assert!(client.wait_frames(frames + 10, SECS(5)).await.frames_decoded >= frames + 10);
        let (status, _) = call(api, "POST", say, Some(json!({"text": "Still here."}))).await;
        assert_eq!(status, 202);
        assert!(llm.seen().chat_requests.is_empty());
    });
}

#[test]
fn a_call_on_any_relay_of_a_fleet_reaches_the_session() {
    netns::run("a_call_on_any_relay_of_a_fleet_reaches_the_session", || async {
        let keys = api_keys("");
        let a = Cluster::relay_only(&keys).await;
        let mut b = Cluster::relay_only(&keys).await;
        let also_a = format!(
            "[[relays]]\naddress = \"{}\"\nserver_name = \"localhost\"\nfingerprint = \"{}\"",
            a.relay.tunnel, a.relay.fingerprint
        );
        let trust = format!("fingerprint = \"{}\"", b.relay.fingerprint);
        let log = b.spawn_worker("fleet-worker", 4, SECRET, &trust, &also_a);
        let registered = avatar_edge_tests::cluster::wait_for_count(&log, "registered with relay", 2, SECS(15)).await;
        assert!(registered.is_some(), "not registered with both relays:\n{}", b.logs());
        // The browser is on relay A; the backend calls relay B.
        let mut sig = Signaling::connect(&a.ws_url("fleet-1")).await.expect("ws");
        let _client = play(&mut sig, &a).await;
        let api = b.relay.http;
        let (status, list) = call(api, "GET", "/api/v1/sessions", None).await;
        assert_eq!(status, 200);
        assert!(
            list["sessions"]
                .as_array()
                .is_some_and(|s| s.iter().any(|s| s["session_id"] == "fleet-1")),
            "{list}"
        );
        let (status, _) = call(
            api,
            "POST",
            "/api/v1/sessions/fleet-1/say",
            Some(json!({"text": "Hello through the other relay, and a little more to say."})),
        )
        .await;
        assert_eq!(status, 202, "{}", b.logs());
        let said = sig
            .wait_for("speech_started", SECS(10))
            .await
            .expect("the browser on A hears it");
        assert!(said["turn"].as_u64().is_some());
        let (status, stopped) = call(api, "POST", "/api/v1/sessions/fleet-1/interrupt", None).await;
        assert_eq!((status, &stopped["interrupted"]), (200, &json!(true)));
        let ended = sig.wait_for("speech_ended", SECS(2)).await.expect("interrupted");
        assert_eq!(ended["interrupted"], true);
        // Audio sent to relay B plays to the browser on A.
        let half_second: Vec<u8> = (0..8_000)
            .flat_map(|i| (((i as f32 * 0.05).sin() * 12_000.0) as i16).to_le_bytes())
            .collect();
        let (status, reply, _) = upload(
            api,
            "/api/v1/sessions/fleet-1/audio",
            "audio/pcm;rate=16000",
            &[&half_second],
            Duration::ZERO,
        )
        .await;
        assert_eq!(status, 202, "{reply}");
        let ended = sig
            .wait_for("speech_ended", SECS(10))
            .await
            .expect("the audio played on A");
        assert_eq!(ended["turn"], reply["turn"]);
        let (status, _) = call(api, "DELETE", "/api/v1/sessions/fleet-1", None).await;
        assert_eq!(status, 204);
        let err = sig.wait_for("error", SECS(5)).await.expect("ended");
        assert_eq!(err["code"], "session_ended");
    });
}

/// Write the relay's config file, send SIGHUP, and wait until its log says `outcome` once more.
async fn reload(cluster: &Cluster, text: &str, outcome: &str) {
    let count = || {
        std::fs::read_to_string(&cluster.relay.log)
            .unwrap_or_default()
            .matches(outcome)
            .count()
    };
    let before = count();
    std::fs::write(cluster.dir.path().join("relay.toml"), text).expect("write config");
    avatar_edge_tests::cluster::signal(&cluster.relay.child, "HUP");
    for _ in 0..50 {
        if count() > before {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("the relay did not log {outcome:?} after SIGHUP\n{}", cluster.logs());
}

/// `systemctl reload` (SIGHUP) re-reads the config file: a key added there works at once, a key
/// removed stops working, the relay's process stays the same, and a broken edit changes nothing.
#[test]
fn a_reload_adds_and_removes_api_keys_without_a_restart_and_a_broken_edit_keeps_them() {
    netns::run(
        "a_reload_adds_and_removes_api_keys_without_a_restart_and_a_broken_edit_keeps_them",
        || async {
            const RELOADED: &str = "configuration reloaded";
            let mut cluster = Cluster::relay_only("").await;
            let (pid, http) = (cluster.relay.child.id(), cluster.relay.http);
            // No key yet: the API is off.
            assert_eq!(call(http, "GET", "/api/v1/sessions", None).await.0, 404);
            let original = std::fs::read_to_string(cluster.dir.path().join("relay.toml")).expect("config");
            let with_key = format!("{original}\n[[api.keys]]\nname = \"backend\"\nkey = \"{KEY}\"\n");
            reload(&cluster, &with_key, RELOADED).await;
            // The key works (no worker here: 503, past the key check).
            let (status, body) = call(http, "GET", "/api/v1/sessions", None).await;
            assert_eq!((status, &body["error"]["code"]), (503, &json!("no_worker")), "{body}");
            // A broken edit: refused, logged, and the key goes on working.
            reload(
                &cluster,
                &format!("{with_key}\nthis is not toml ["),
                "the running settings stay",
            )
            .await;
            assert_eq!(call(http, "GET", "/api/v1/sessions", None).await.0, 503);
            // The key replaced by another: refused at once.
            let other =
                format!("{original}\n[[api.keys]]\nname = \"other\"\nkey = \"other-key-0123456789abcdef0123\"\n");
            reload(&cluster, &other, RELOADED).await;
            assert_eq!(call(http, "GET", "/api/v1/sessions", None).await.0, 401);
            assert!(
                cluster.relay.child.try_wait().expect("status").is_none() && cluster.relay.child.id() == pid,
                "the same relay process throughout"
            );
        },
    );
}
