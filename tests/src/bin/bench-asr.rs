//! Speech recognition on this machine: accuracy and time of the offline recogniser
//! (scripts/asr-server.py: faster-whisper, Whisper base, int8 on 2 threads), the window fitted to
//! the audio (the default) beside the old 30 s window, in the same run. Prints two tables.
//!
//! ```text
//! cargo run --release -p avatar-edge-tests --bin bench-asr
//! ```
//!
//! The questions are the fixed set in `avatar_edge_tests::asr` (20 English questions in three
//! espeak-ng voices, 10 Chinese in two), sent as the worker sends an utterance (`OpenAiAsr`, 16 kHz
//! WAV). English is scored in words, Chinese in characters. The second table is the cost of one recognition by the
//! audio's length: the 30 s window costs the same for any length, the fitted one follows it.

use avatar_edge_tests::asr::{score, speak, AsrServer, QUESTIONS_EN, QUESTIONS_ZH, VOICES_EN, VOICES_ZH, ZH_PROMPT};
use avatar_edge_tests::percentile;
use avatar_worker::talk::asr::{Asr, OpenAiAsr, Urgency};
use std::time::{Duration, Instant};

struct Path {
    name: &'static str,
    base_url: String,
    _server: AsrServer,
}

fn client(base_url: &str) -> OpenAiAsr {
    OpenAiAsr {
        client: reqwest::Client::new(),
        base_url: base_url.to_owned(),
        model: "whisper-1".into(),
        api_key: None,
        prompt: None,
        timeout: Duration::from_secs(60),
    }
}

fn main() -> anyhow::Result<()> {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?
        .block_on(run())
}

async fn run() -> anyhow::Result<()> {
    let dir = tempfile::tempdir()?;
    let mut paths = Vec::new();
    for (name, args) in [
        ("fitted window (default)", &[][..]),
        ("30 s window (old)", &["--window", "full"][..]),
    ] {
        let server = AsrServer::start_with(dir.path(), args).await;
        paths.push(Path {
            name,
            base_url: server.base_url(),
            _server: server,
        });
    }
    // One recognition each first: the model's first run is slower.
    let warm = speak("en-us", "Hello.", 16_000);
    for p in &paths {
        client(&p.base_url).transcribe(&warm, Some("en"), Urgency::Now).await?;
    }

    println!();
    println!("speech recognition: accuracy and time per question (Whisper base, int8, 2 threads)");
    println!();
    println!("| path | language | utterances | units | errors | error rate | p50 ms | p95 ms |");
    println!("|---|---|---:|---:|---:|---:|---:|---:|");
    for (language, voices, questions, unit, prompt) in [
        ("en", &VOICES_EN[..], &QUESTIONS_EN[..], "words", None),
        ("zh", &VOICES_ZH[..], &QUESTIONS_ZH[..], "characters", Some(ZH_PROMPT)),
    ] {
        for p in &paths {
            let s = score(&p.base_url, questions, voices, language, prompt).await?;
            for (said, heard) in &s.misheard {
                eprintln!("  {}: {said:?} -> {heard:?}", p.name);
            }
            println!(
                "| {} | {language} | {} | {} {unit} | {} | {:.1} % | {:.0} | {:.0} |",
                p.name,
                questions.len() * voices.len(),
                s.units,
                s.errors,
                100.0 * s.rate(),
                percentile(&s.ms, 50.0),
                percentile(&s.ms, 95.0)
            );
        }
    }

    println!();
    println!("one recognition by the audio's length, ms (median of 3)");
    println!();
    println!("| speech | {} | {} |", paths[0].name, paths[1].name);
    println!("|---:|---:|---:|");
    for n in [1usize, 2, 4] {
        let text = QUESTIONS_EN[..n].join(" ");
        let pcm = speak("en-us", &text, 16_000);
        let seconds = pcm.len() as f64 / 16_000.0;
        let mut row = format!("| {seconds:.1} s |");
        for p in &paths {
            let asr = client(&p.base_url);
            let mut took = Vec::new();
            for _ in 0..3 {
                let started = Instant::now();
                asr.transcribe(&pcm, Some("en"), Urgency::Now).await?;
                took.push(started.elapsed().as_secs_f64() * 1e3);
            }
            took.sort_by(f64::total_cmp);
            row += &format!(" {:.0} |", took[1]);
        }
        println!("{row}");
    }
    Ok(())
}
