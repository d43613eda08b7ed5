//! The talking pipeline on this machine, with the built-in backends (scripted answers, espeak-ng)
//! and the ONNX test model. Prints one table.
//!
//! ```text
//! cargo run --release -p avatar-edge-tests --bin bench-talk -- [SECONDS_PER_LEVEL] [WxH ...]
//! ```
//!
//! The in-process measures run at each picture size given (default: 512x512 and 1280x720, a
//! 16:9 avatar), one column per size and lip-sync backend.
//!
//! * **Latency and steadiness**, in process: one session's pipeline and media clock (libx264 +
//!   Opus), minus WebRTC. `text_webrtc` → first talking frame and first speech audio packet sent
//!   (both leave on the same clock tick by construction), late frames per minute, underruns,
//!   encode and lip-sync ms per frame.
//! * **A/V offset at the receiver**: the real relay and worker processes and a Rust WebRTC client
//!   that decodes both tracks: arrival of the first loud audio packet vs the first picture whose
//!   mouth opened (positive: video later). Measured over a few answers.
//! * **Concurrency**: N sessions in one worker, every one talking all the time; N rises until a
//!   session falls behind 25 fps (late frames or underruns after the first answer started).
//! * **Recording** (`[recording]`): the same two talking sessions without and with a recorder on
//!   each (a media tap muxing a fragmented MP4, no re-encoding): the process's CPU (% of one
//!   core per session) and the files' MB per minute.

use avatar_edge_tests::cluster::Cluster;
use avatar_edge_tests::signaling::Signaling;
use avatar_worker::config::TalkConfig;
use avatar_worker::media::avatar::{synthetic, AvatarClip};
use avatar_worker::media::encoder::{self, EncoderSettings};
use avatar_worker::media::fanout::Taps;
use avatar_worker::media::record::{RecordError, Recording, RecordingSpec};
use avatar_worker::media::stream::{Adaptation, ClockEvent, MediaOut, VideoStream};
use avatar_worker::talk::{Conversation, Talk, TalkEvent};
use std::sync::atomic::{AtomicBool, Ordering::Relaxed};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

const QUESTION: &str = "Please explain how plants turn sunlight into food.";

/// The picture size being measured, and the built-in avatar drawn at it (drawn once: at
/// 1280×720 that takes seconds).
static PICTURE: std::sync::Mutex<Option<Arc<AvatarClip>>> = std::sync::Mutex::new(None);

fn set_size((width, height): (u32, u32)) {
    if let Ok(mut picture) = PICTURE.lock() {
        if picture.as_ref().map(|c| c.size()) != Some((width, height)) {
            *picture = Some(Arc::new(synthetic(width, height, 25)));
        }
    }
}

fn clip() -> Arc<AvatarClip> {
    PICTURE
        .lock()
        .ok()
        .and_then(|p| p.clone())
        .unwrap_or_else(|| Arc::new(synthetic(512, 512, 25)))
}

fn settings() -> EncoderSettings {
    let (width, height) = clip().size();
    EncoderSettings {
        width,
        height,
        fps: 25,
        frame_rate: 25,
        bitrate_kbps: 2000,
        gop: 50,
    }
}

fn talk_config(onnx: bool) -> TalkConfig {
    let mut cfg = TalkConfig::default();
    if onnx {
        let tools = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools");
        cfg.lipsync.backend = avatar_worker::config::LipSyncBackend::Onnx;
        cfg.lipsync.model = Some(tools.join("models/lipsync-test.onnx"));
        cfg.lipsync.onnxruntime = tools.join("onnxruntime/libonnxruntime.so");
    }
    cfg
}

/// One in-process session: conversation + media clock, media drained and timed.
struct Bench {
    conv: Conversation,
    stream: VideoStream,
    clock: mpsc::UnboundedReceiver<ClockEvent>,
    talk_events: mpsc::UnboundedReceiver<TalkEvent>,
    /// When each video frame and audio packet reached the track writer.
    sent: Arc<std::sync::Mutex<(Vec<Instant>, Vec<Instant>)>>,
    /// The session's recorder, when it has one; it finishes when the session drops.
    recording: Option<tokio::task::JoinHandle<Result<Recording, RecordError>>>,
}

fn session(talk: &Arc<Talk>) -> Bench {
    session_recorded(talk, None)
}

/// A session whose media is also recorded to `record` (as `[recording]` does it: a tap).
fn session_recorded(talk: &Arc<Talk>, record: Option<std::path::PathBuf>) -> Bench {
    let taps = Taps::default();
    let recording = record.map(|path| {
        let media = taps.join("recording", 512);
        tokio::spawn(avatar_worker::media::record::record(
            media,
            RecordingSpec {
                path,
                width: settings().width,
                height: settings().height,
            },
        ))
    });
    let clip = clip();
    let (talk_tx, talk_events) = mpsc::unbounded_channel();
    let mut conv = Conversation::new(Arc::clone(talk), Arc::clone(&clip), "bench".into(), talk_tx);
    let (clock_tx, clock) = mpsc::unbounded_channel();
    let feed = conv.feed(clock_tx);
    let (out_tx, mut out_rx) = mpsc::channel::<MediaOut>(64);
    let stream = VideoStream::start(
        clip,
        "libx264",
        settings(),
        Arc::new(AtomicBool::new(false)),
        avatar_worker::media::stream::Sinks { viewer: out_tx, taps },
        feed,
        Adaptation::fixed(&settings()),
    )
    .expect("clock");
    let sent = Arc::new(std::sync::Mutex::new((Vec::new(), Vec::new())));
    let seen = Arc::clone(&sent);
    tokio::spawn(async move {
        while let Some(m) = out_rx.recv().await {
            if let Ok(mut s) = seen.lock() {
                match m {
                    MediaOut::Video(_) => s.0.push(Instant::now()),
                    MediaOut::Audio(_) => s.1.push(Instant::now()),
                }
            }
        }
    });
    Bench {
        conv,
        stream,
        clock,
        talk_events,
        sent,
        recording,
    }
}

/// Keep every session talking for `secs`: a new question as each answer ends.
async fn keep_talking(sessions: &mut [Bench], secs: u64) {
    let t0 = Instant::now();
    while t0.elapsed() < Duration::from_secs(secs) {
        for b in sessions.iter_mut() {
            while let Ok(ev) = b.clock.try_recv() {
                if let ClockEvent::SpeechEnded { .. } = ev {
                    // One question per answer: far under the session's turn rate.
                    b.conv.say(QUESTION.into()).expect("within the turn rate");
                }
            }
            while b.talk_events.try_recv().is_ok() {}
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// This process's CPU time so far (user + system), from `/proc/self/stat`.
fn cpu_time() -> Duration {
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // After the command name's closing parenthesis: state is field 3; utime and stime 14 and 15.
    let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
    let f: Vec<u64> = rest.split_whitespace().map(|x| x.parse().unwrap_or(0)).collect();
    let ticks = f.get(11).copied().unwrap_or(0) + f.get(12).copied().unwrap_or(0);
    Duration::from_millis(ticks * 10) // USER_HZ is 100 on Linux
}

/// `n` sessions talking without pause for `secs`, recorded into `dir` or not: CPU % of one
/// core per session over the window, and the recordings' MB per minute per session.
async fn recording_cost(talk: &Arc<Talk>, n: usize, secs: u64, dir: Option<&std::path::Path>) -> (f64, f64) {
    let mut sessions: Vec<Bench> = (0..n)
        .map(|i| session_recorded(talk, dir.map(|d| d.join(format!("bench-{i}.mp4")))))
        .collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for b in sessions.iter_mut() {
        b.conv.say(QUESTION.into()).expect("the first question of a session");
    }
    let (cpu0, t0) = (cpu_time(), Instant::now());
    keep_talking(&mut sessions, secs).await;
    let wall = t0.elapsed().as_secs_f64();
    let cpu = (cpu_time() - cpu0).as_secs_f64() / wall * 100.0 / n as f64;
    let recorders: Vec<_> = sessions.iter_mut().filter_map(|b| b.recording.take()).collect();
    let _ = tokio::task::spawn_blocking(move || drop(sessions)).await;
    let mut bytes = 0u64;
    for r in recorders {
        if let Ok(Ok(done)) = r.await {
            bytes += done.bytes;
        }
    }
    (cpu, bytes as f64 / 1e6 / n as f64 / (wall / 60.0))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

async fn latency(talk: &Arc<Talk>, rounds: usize) -> (Vec<f64>, Vec<f64>, f64, u64, f64) {
    let mut b = session(talk);
    tokio::time::sleep(Duration::from_millis(500)).await;
    let (mut to_frame, mut to_audio) = (Vec::new(), Vec::new());
    let started_at = Instant::now();
    for _ in 0..rounds {
        let t0 = Instant::now();
        b.conv.say(QUESTION.into()).expect("ready");
        // The clock announces the turn on the tick that takes its first unit, before encoding
        // it: the next frame and audio packets to reach the writer are speech.
        while let Some(ClockEvent::SpeechStarted { .. }) = b.clock.recv().await {
            let at = Instant::now();
            tokio::time::sleep(Duration::from_millis(100)).await;
            let sent = b.sent.lock().expect("times");
            let first = |v: &[Instant]| v.iter().copied().find(|t| *t >= at).unwrap_or(at);
            to_frame.push(ms(first(&sent.0) - t0));
            to_audio.push(ms(first(&sent.1) - t0));
        }
        while b.talk_events.try_recv().is_ok() {}
    }
    let minutes = started_at.elapsed().as_secs_f64() / 60.0;
    let s = &b.stream.stats;
    let late_per_min = s.frames_late.load(Relaxed) as f64 / minutes;
    let encode = s.encode_micros_total.load(Relaxed) as f64 / s.frames_sent.load(Relaxed).max(1) as f64 / 1000.0;
    (to_frame, to_audio, late_per_min, s.underruns.load(Relaxed), encode)
}

/// N sessions talking without pause for `secs`; returns (late frames/min per session, underruns per session).
async fn concurrency(talk: &Arc<Talk>, n: usize, secs: u64) -> (f64, f64, f64) {
    let mut sessions: Vec<Bench> = (0..n).map(|_| session(talk)).collect();
    tokio::time::sleep(Duration::from_millis(500)).await;
    for b in sessions.iter_mut() {
        b.conv.say(QUESTION.into()).expect("the first question of a session");
    }
    // Count from the moment every session is speaking (start-up costs are the latency rows).
    for b in sessions.iter_mut() {
        while !matches!(b.clock.recv().await, Some(ClockEvent::SpeechStarted { .. }) | None) {}
    }
    let base: Vec<(u64, u64, u64)> = sessions
        .iter()
        .map(|b| {
            (
                b.stream.stats.frames_late.load(Relaxed),
                b.stream.stats.underruns.load(Relaxed),
                b.stream.stats.talk_frames.load(Relaxed),
            )
        })
        .collect();
    let t0 = Instant::now();
    keep_talking(&mut sessions, secs).await;
    let minutes = t0.elapsed().as_secs_f64() / 60.0;
    let (mut late, mut under, mut talking) = (0.0, 0.0, 0.0);
    for (b, (l0, u0, t0)) in sessions.iter().zip(base) {
        late += (b.stream.stats.frames_late.load(Relaxed) - l0) as f64 / minutes;
        under += (b.stream.stats.underruns.load(Relaxed) - u0) as f64;
        talking += (b.stream.stats.talk_frames.load(Relaxed) - t0) as f64;
    }
    let share = talking / (n as f64 * minutes * 60.0 * 25.0);
    (late / n as f64, under / n as f64, share)
}

/// Receiver-side A/V offset through relay, tunnel and WebRTC: first loud audio vs first open mouth.
async fn av_offset(rounds: usize) -> Vec<f64> {
    let mut cluster = Cluster::relay_only("").await;
    cluster.add_worker("bench-talk", 2, "").await;
    let mut sig = Signaling::connect(&cluster.ws_url("bench-talk")).await.expect("ws");
    let client = avatar_edge_tests::play(&mut sig, "avatar_tutor_13")
        .await
        .expect("play");
    tokio::time::sleep(Duration::from_secs(1)).await;
    let idle = {
        let s = client.snapshot();
        let v: Vec<f32> = s.mouth.iter().rev().take(20).map(|(_, v)| *v).collect();
        v.iter().sum::<f32>() / v.len().max(1) as f32
    };
    let mut out = Vec::new();
    for _ in 0..rounds {
        let t0 = Instant::now();
        sig.send_json(&serde_json::json!({"type": "text_webrtc", "message": QUESTION}))
            .await
            .expect("send");
        let _ = sig.wait_for("speech_started", Duration::from_secs(20)).await;
        tokio::time::sleep(Duration::from_millis(1500)).await;
        sig.send_json(&serde_json::json!({"type": "interrupt"}))
            .await
            .expect("interrupt");
        let _ = sig.wait_for("speech_ended", Duration::from_secs(5)).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        let s = client.snapshot();
        let audio = s.audio.iter().find(|(t, v)| *t >= t0 && *v > 0.02).map(|(t, _)| *t);
        let video = s
            .mouth
            .iter()
            .find(|(t, v)| *t >= t0 && *v < idle - 25.0)
            .map(|(t, _)| *t);
        if let (Some(a), Some(v)) = (audio, video) {
            out.push(v.duration_since(t0).as_secs_f64() * 1000.0 - a.duration_since(t0).as_secs_f64() * 1000.0);
        }
    }
    client.close().await;
    sig.close().await;
    out
}

fn stats(v: &[f64]) -> String {
    if v.is_empty() {
        return "n/a".into();
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    format!("{:.0} / {:.0} / {:.0}", s[0], s[s.len() / 2], s[s.len() - 1])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let secs: u64 = std::env::args().nth(1).and_then(|s| s.parse().ok()).unwrap_or(15);
    let mut sizes: Vec<(u32, u32)> = std::env::args()
        .skip(2)
        .filter_map(|a| {
            let (w, h) = a.split_once('x')?;
            Some((w.parse().ok()?, h.parse().ok()?))
        })
        .collect();
    if sizes.is_empty() {
        sizes = vec![(512, 512), (1280, 720)];
    }
    encoder::init().expect("ffmpeg");
    println!("bench-talk: 25 fps, libx264 + Opus, scripted LLM + espeak-ng; min / median / max over rounds\n");
    let columns: Vec<String> = sizes
        .iter()
        .flat_map(|(w, h)| [format!("builtin mouth, {w}×{h}"), format!("ONNX test model, {w}×{h}")])
        .collect();
    println!("| measure | {} |", columns.join(" | "));
    println!("|---|{}", "---:|".repeat(columns.len()));
    let mut rows: Vec<(String, Vec<String>)> = Vec::new();
    let mut push = |name: &str, i: usize, v: String| {
        if let Some(row) = rows.iter_mut().find(|(n, _)| n == name) {
            row.1.resize(i + 1, String::new());
            row.1[i] = v;
        } else {
            let mut cells = vec![String::new(); i + 1];
            cells[i] = v;
            rows.push((name.to_owned(), cells));
        }
    };
    for (i, (size, onnx)) in sizes
        .iter()
        .flat_map(|size| [(*size, false), (*size, true)])
        .enumerate()
    {
        set_size(size);
        let talk = Arc::new(Talk::new(&talk_config(onnx), 25).expect("talk"));
        let (frame, audio, late, underruns, encode) = latency(&talk, 5).await;
        push("text_webrtc → first speech audio packet sent, ms", i, stats(&audio));
        push("text_webrtc → first talking frame sent, ms", i, stats(&frame));
        push("late frames per minute (one session talking)", i, format!("{late:.1}"));
        push("underruns (one session, 5 answers)", i, underruns.to_string());
        push("encode ms/frame (libx264)", i, format!("{encode:.2}"));
        let ls = &talk.lipsync.stats;
        let per = ls.micros.load(Relaxed) as f64 / ls.frames.load(Relaxed).max(1) as f64 / 1000.0;
        push("lip-sync ms/frame (model only)", i, format!("{per:.3}"));
        let mut best = 0;
        for n in [1usize, 2, 4, 6, 8, 10, 12] {
            let (late, under, share) = concurrency(&talk, n, secs).await;
            eprintln!(
                "{} {}×{} n={n}: late/min/session {late:.1}, underruns/session {under:.1}, talking share {share:.2}",
                if onnx { "onnx" } else { "builtin" },
                size.0,
                size.1
            );
            if late <= 1.0 && under <= 2.0 {
                best = n;
            } else {
                break;
            }
        }
        push(
            "concurrent talking sessions at 25 fps (≤1 late frame/min, ≤2 underruns)",
            i,
            best.to_string(),
        );
    }
    {
        set_size((512, 512));
        let talk = Arc::new(Talk::new(&talk_config(false), 25).expect("talk"));
        let dir = tempfile::tempdir().expect("tempdir");
        let (cpu_without, _) = recording_cost(&talk, 2, secs, None).await;
        let (cpu_with, mb) = recording_cost(&talk, 2, secs, Some(dir.path())).await;
        push(
            "CPU % of a core per talking session: no recording → recording (2 sessions)",
            0,
            format!("{cpu_without:.0} → {cpu_with:.0}"),
        );
        push("recording, MB per minute per session (512×512)", 0, format!("{mb:.1}"));
    }
    let offsets = av_offset(4).await;
    push(
        "A/V offset at the receiver, ms (video − audio; WebRTC, builtin)",
        0,
        stats(&offsets),
    );
    for (name, mut cells) in rows {
        cells.resize(columns.len(), "–".into());
        println!("| {name} | {} |", cells.join(" | "));
    }
}
