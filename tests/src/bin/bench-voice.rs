//! Voice input on this machine: how soon the avatar answers a spoken question, with the offline
//! speech recognition (scripts/asr-server.py: faster-whisper, Whisper base, int8 on 2 threads).
//! Prints one table.
//!
//! ```text
//! cargo run --release -p avatar-edge-tests --bin bench-voice -- [ROUNDS_PER_LEVEL]
//! ```
//!
//! Real relay and worker processes, the worker's Silero VAD, and Rust WebRTC peers that send a
//! microphone (espeak-ng questions at -20 dBFS, Opus, 20 ms packets) and decode what comes back.
//! For each level, that many sessions ask at the same moment. From the **end of the user's
//! speech** (the last loud packet the peer sent) to:
//! * `user_speech_ended` (the VAD's hangover: `talk.vad.complete_silence_ms` when the words so far
//!   read as a finished sentence, `min_silence_ms` or `incomplete_silence_ms` otherwise);
//! * the final `user_transcript` (speech recognition, run at the pause while the silence goes on);
//! * the first loud audio packet of the answer, and the first picture whose mouth opened.
//!
//! It also counts the partial transcripts (`final: false`) each question got while it was spoken.
//!
//! The anchor in the same run is the same session answering the same question typed
//! (`text_webrtc` → first loud audio): the difference is what voice input costs.

use avatar_edge_tests::asr::{speak, AsrServer};
use avatar_edge_tests::cluster::Cluster;
use avatar_edge_tests::percentile;
use avatar_edge_tests::rtc_client::{Microphone, RtcClient};
use avatar_edge_tests::signaling::Signaling;
use serde_json::{json, Value};
use std::time::{Duration, Instant};

const QUESTIONS: [&str; 4] = [
    "What is the capital of France?",
    "Can you explain fractions to me?",
    "How many legs does a spider have?",
    "Why is the sky blue?",
];

struct Session {
    sig: Signaling,
    client: RtcClient,
    mic: Microphone,
    idle_mouth: f32,
}

async fn open(cluster: &Cluster, id: &str) -> anyhow::Result<Session> {
    let mut sig = Signaling::connect(&cluster.ws_url(id)).await?;
    let (client, mic) = RtcClient::with_microphone().await?;
    sig.send_offer(&client.offer().await?, "avatar_tutor_13").await?;
    let answer = sig.wait_for("webrtc_answer", Duration::from_secs(10)).await?;
    client.accept_answer(answer["sdp"].as_str().unwrap_or_default()).await?;
    client.connected(Duration::from_secs(10)).await?;
    client.wait_frames(25, Duration::from_secs(10)).await;
    let from = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let mouth = client.snapshot().mouth_between(from, Instant::now());
    let idle_mouth = mouth.iter().sum::<f32>() / mouth.len().max(1) as f32;
    Ok(Session {
        sig,
        client,
        mic,
        idle_mouth,
    })
}

/// Milliseconds from `from` to each mark of one spoken question.
#[derive(Debug, Default, Clone)]
struct Marks {
    ended: f64,
    transcript: f64,
    audio: f64,
    frame: f64,
    partials: usize,
}

fn ms(from: Instant, to: Instant) -> f64 {
    to.saturating_duration_since(from).as_secs_f64() * 1e3
}

/// Wait for events until `speech_started`; returns when each type first came.
async fn events_until_speech(sig: &mut Signaling) -> anyhow::Result<Vec<(String, Instant, Value)>> {
    let mut seen = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let ev = sig
            .next_event(deadline.saturating_duration_since(Instant::now()))
            .await?;
        let kind = ev["type"].as_str().unwrap_or_default().to_owned();
        anyhow::ensure!(kind != "error", "error event: {ev}");
        let done = kind == "speech_started";
        seen.push((kind, Instant::now(), ev));
        if done {
            return Ok(seen);
        }
    }
}

/// First loud answer audio and first open mouth after `after`.
async fn first_media(s: &Session, after: Instant) -> (Instant, Instant) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let snap = s.client.snapshot();
        let audio = snap
            .audio
            .iter()
            .find(|(at, rms)| *at >= after && *rms > 0.02)
            .map(|x| x.0);
        let frame = snap
            .mouth
            .iter()
            .find(|(at, luma)| *at >= after && *luma < s.idle_mouth - 25.0)
            .map(|x| x.0);
        if let (Some(a), Some(f)) = (audio, frame) {
            return (a, f);
        }
        if Instant::now() > deadline {
            let now = Instant::now();
            return (audio.unwrap_or(now), frame.unwrap_or(now));
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

async fn ask_by_voice(mut s: Session, question: &str) -> anyhow::Result<(Marks, Session)> {
    let speech = speak("en-us", question, 48_000);
    let gain = 0.1 / avatar_worker::talk::audio::rms(&speech).max(1e-6);
    let started = Instant::now();
    s.mic.speak(&speech.iter().map(|v| v * gain).collect::<Vec<_>>());
    let events = events_until_speech(&mut s.sig).await?;
    let end_of_speech = s
        .mic
        .sent
        .lock()
        .map_err(|_| anyhow::anyhow!("mic log"))?
        .iter()
        .filter(|(at, rms)| *at >= started && *rms > 0.01)
        .map(|x| x.0)
        .next_back()
        .ok_or_else(|| anyhow::anyhow!("no speech was sent"))?;
    let at = |kind: &str| events.iter().find(|(k, _, _)| k == kind).map(|x| x.1);
    let transcript = events
        .iter()
        .find(|(k, _, ev)| k == "user_transcript" && ev["final"] == true)
        .map(|x| x.1)
        .ok_or_else(|| anyhow::anyhow!("no final transcript: {events:?}"))?;
    let partials = events
        .iter()
        .filter(|(k, _, ev)| k == "user_transcript" && ev["final"] == false)
        .count();
    let (audio, frame) = first_media(&s, transcript).await;
    let marks = Marks {
        ended: ms(end_of_speech, at("user_speech_ended").unwrap_or(transcript)),
        transcript: ms(end_of_speech, transcript),
        audio: ms(end_of_speech, audio),
        frame: ms(end_of_speech, frame),
        partials,
    };
    // Let the answer finish before the next question.
    s.sig.wait_for("speech_ended", Duration::from_secs(30)).await?;
    Ok((marks, s))
}

async fn ask_by_text(mut s: Session, question: &str) -> anyhow::Result<(f64, Session)> {
    let sent = Instant::now();
    s.sig
        .send_json(&json!({"type": "text_webrtc", "session_id": "bench", "user_id": 1, "message": question}))
        .await?;
    events_until_speech(&mut s.sig).await?;
    let (audio, _) = first_media(&s, sent).await;
    s.sig.wait_for("speech_ended", Duration::from_secs(30)).await?;
    Ok((ms(sent, audio), s))
}

fn summary(v: &[f64]) -> String {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    format!("{:.0} / {:.0}", percentile(&v, 50.0), percentile(&v, 95.0))
}

fn main() -> anyhow::Result<()> {
    avatar_edge_tests::netns::reexec_isolated();
    let rounds: usize = std::env::args().nth(1).and_then(|a| a.parse().ok()).unwrap_or(2);
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run(rounds))
}

async fn run(rounds: usize) -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let asr = AsrServer::start(dir.path()).await;
    let tools = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools");
    let voice = format!(
        "[talk.vad]\nmodel = \"{}\"\n[talk.lipsync]\nbackend = \"onnx\"\nmodel = \"{}\"\nonnxruntime = \"{}\"\n[talk.asr]\nbase_url = \"{}\"\n",
        tools.join("models/silero_vad.onnx").display(),
        tools.join("models/lipsync-test.onnx").display(),
        tools.join("onnxruntime/libonnxruntime.so").display(),
        asr.base_url()
    );
    let mut cluster = Cluster::relay_only("").await;
    cluster.add_worker("voice", 8, &voice).await;

    // The anchor: one session, the questions typed.
    let mut typed = Vec::new();
    let mut s = open(&cluster, "anchor").await?;
    for q in QUESTIONS.iter().take(rounds.max(1)) {
        let (t, back) = ask_by_text(s, q).await?;
        typed.push(t);
        s = back;
    }
    drop(s);

    println!();
    println!("voice input: the end of the user's speech -> each mark, ms (p50 / p95), offline ASR on this machine");
    println!();
    println!("| sessions asking at once | questions | -> user_speech_ended | -> final user_transcript | -> first answer audio | -> first talking frame | partials per question |");
    println!("|---:|---:|---:|---:|---:|---:|---:|");
    for level in [1usize, 2, 4] {
        let mut sessions = Vec::new();
        for i in 0..level {
            sessions.push(open(&cluster, &format!("voice-{level}-{i}")).await?);
        }
        let mut all: Vec<Marks> = Vec::new();
        for round in 0..rounds {
            let tasks: Vec<_> = sessions
                .into_iter()
                .enumerate()
                .map(|(i, s)| tokio::spawn(ask_by_voice(s, QUESTIONS[(i + round) % QUESTIONS.len()])))
                .collect();
            sessions = Vec::new();
            for t in tasks {
                let (m, s) = t.await??;
                all.push(m);
                sessions.push(s);
            }
        }
        let col = |f: fn(&Marks) -> f64| summary(&all.iter().map(f).collect::<Vec<_>>());
        println!(
            "| {level} | {} | {} | {} | {} | {} | {:.1} |",
            all.len(),
            col(|m| m.ended),
            col(|m| m.transcript),
            col(|m| m.audio),
            col(|m| m.frame),
            all.iter().map(|m| m.partials as f64).sum::<f64>() / all.len().max(1) as f64
        );
    }
    println!();
    println!(
        "anchor: the same questions typed, text_webrtc -> first answer audio: {} ms (p50 / p95)",
        summary(&typed)
    );
    if std::env::var_os("BENCH_LOGS").is_some() {
        eprintln!("{}", cluster.logs());
    }
    Ok(())
}
