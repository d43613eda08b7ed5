//! Voice activity with the real model: Silero VAD v5 through ONNX Runtime (both fetched by
//! `scripts/install-deps` into `.tools/`), on speech that espeak-ng speaks, on silence, on pink
//! noise, and on the avatar's own voice coming back quietly (what survives echo cancellation).
//! No browser and no sockets: the listener takes audio in and gives events out, so a minute of
//! audio takes well under a second.

use avatar_worker::config::VadConfig;
use avatar_worker::talk::audio::{decode_wav, resample, rms};
use avatar_worker::talk::vad::{Heard, Listener, SileroVad, SpeechModel, RATE, WINDOW};
use std::path::PathBuf;

fn tools() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools"))
}

fn silero() -> SileroVad {
    SileroVad::load(
        &tools().join("models/silero_vad.onnx"),
        &tools().join("onnxruntime/libonnxruntime.so"),
    )
    .expect("the Silero model and ONNX Runtime (run scripts/install-deps)")
}

/// `text` spoken by espeak-ng, at 16 kHz.
fn speak(voice: &str, text: &str) -> Vec<f32> {
    let out = std::process::Command::new("espeak-ng")
        .args(["--stdout", "-b", "1", "-s", "150", "-v", voice, text])
        .output()
        .expect("espeak-ng (scripts/install-deps)");
    assert!(
        out.status.success(),
        "espeak-ng: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pcm = decode_wav(&out.stdout).expect("espeak's WAV");
    resample(&pcm, RATE).expect("resample")
}

fn silence(seconds: f32) -> Vec<f32> {
    vec![0.0; (seconds * RATE as f32) as usize]
}

/// Pink noise (Paul Kellet's filter over a fixed-seed white noise) at `level` RMS.
fn pink_noise(seconds: f32, level: f32) -> Vec<f32> {
    let mut seed = 0x2545_f491_4f6c_dd1d_u64;
    let mut white = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed >> 11) as f32 / (1u64 << 53) as f32 * 2.0 - 1.0
    };
    let mut b = [0.0f32; 7];
    let mut out: Vec<f32> = (0..(seconds * RATE as f32) as usize)
        .map(|_| {
            let w = white();
            b[0] = 0.99886 * b[0] + w * 0.0555179;
            b[1] = 0.99332 * b[1] + w * 0.0750759;
            b[2] = 0.96900 * b[2] + w * 0.153852;
            b[3] = 0.86650 * b[3] + w * 0.3104856;
            b[4] = 0.55000 * b[4] + w * 0.5329522;
            b[5] = -0.7616 * b[5] - w * 0.0168980;
            let pink = b.iter().sum::<f32>() + w * 0.5362;
            b[6] = w * 0.115926;
            pink
        })
        .collect();
    let gain = level / rms(&out).max(1e-9);
    out.iter_mut().for_each(|s| *s *= gain);
    out
}

fn db(level: f32) -> f32 {
    20.0 * level.max(1e-9).log10()
}

/// Everything the listener hears in `audio`, fed in 20 ms packets as the microphone arrives.
fn hear(audio: &[f32], avatar_speaking: bool, cfg: &VadConfig) -> Vec<Heard> {
    let mut listener = Listener::new(silero(), cfg);
    let mut heard = Vec::new();
    for packet in audio.chunks(320) {
        heard.extend(listener.push(packet, avatar_speaking).expect("inference"));
    }
    heard
}

fn starts(heard: &[Heard]) -> usize {
    heard.iter().filter(|h| matches!(h, Heard::Started { .. })).count()
}

#[test]
fn a_spoken_question_is_one_utterance_with_its_words_inside() {
    let cfg = VadConfig::default();
    for (voice, text) in [
        ("en-us", "Hello, please tell me about the weather today."),
        ("cmn-latn-pinyin", "北京在哪里？"),
    ] {
        let speech = speak(voice, text);
        let mut audio = silence(1.0);
        audio.extend(&speech);
        audio.extend(silence(1.5));
        let heard = hear(&audio, false, &cfg);
        assert_eq!(starts(&heard), 1, "{voice}: {heard:?}");
        let utterances: Vec<_> = heard
            .iter()
            .filter_map(|h| match h {
                Heard::Utterance { pcm, cut, .. } => Some((pcm.len(), *cut)),
                _ => None,
            })
            .collect();
        let [(len, false)] = utterances.as_slice() else {
            panic!("{voice}: one whole utterance, got {utterances:?}");
        };
        // It holds the speech (espeak's leading and trailing quiet aside), and not much more
        // than the pre-roll and one window of silence around it.
        let speech_len = speech.len() as f32;
        let len = *len as f32;
        assert!(
            len > 0.8 * speech_len && len < speech_len + 0.8 * RATE as f32,
            "{voice}: utterance {:.2} s for {:.2} s of speech",
            len / RATE as f32,
            speech_len / RATE as f32
        );
    }
}

#[test]
fn silence_and_background_noise_start_nothing() {
    let cfg = VadConfig::default();
    assert!(hear(&silence(30.0), false, &cfg).is_empty(), "30 s of silence");
    // Pink noise at -40 dBFS (a quiet room through a headset) and at -26 dBFS (a noisy one, or a
    // laptop fan near its microphone), 30 s each.
    for level in [0.01, 0.05] {
        let heard = hear(&pink_noise(30.0, level), false, &cfg);
        assert!(heard.is_empty(), "pink noise at {:.0} dBFS: {heard:?}", db(level));
    }
}

#[test]
fn quiet_speech_under_noise_still_starts_a_turn() {
    // The user speaks at -26 dBFS over -40 dBFS of pink noise.
    let cfg = VadConfig::default();
    let speech = speak("en-us", "Can you explain fractions to me?");
    let gain = 0.05 / rms(&speech);
    let mut audio = pink_noise(4.0 + speech.len() as f32 / RATE as f32, 0.01);
    for (i, s) in speech.iter().enumerate() {
        audio[RATE as usize + i] += s * gain;
    }
    assert_eq!(starts(&hear(&audio, false, &cfg)), 1);
}

#[test]
fn the_avatars_own_voice_at_echo_level_does_not_barge_in() {
    // The avatar's answer, as espeak-ng speaks it, played back into the microphone at a series of
    // levels while the avatar is speaking (the barge-in guard applies). Browsers' echo cancellation
    // takes 20-30 dB off the echo; with the speakers' coupling, what reaches the detector is around
    // -40 dBFS or less. The model alone hears speech at any of these levels; the guard's loudness
    // floor (`barge_in_min_dbfs`, -35) is what holds. The test asserts no barge-in up to -40 dBFS
    // and prints the level where it starts.
    let cfg = VadConfig::default();
    let answer = speak(
        "en-us",
        "Fractions are parts of a whole. One half means one of two equal parts. \
         If you cut a pizza into four pieces, each piece is one quarter.",
    );
    let base = rms(&answer);
    let mut first_trigger = None;
    for level_db in [-50.0f32, -45.0, -40.0, -35.0, -30.0, -25.0, -20.0, -15.0, -10.0] {
        let gain = 10f32.powf(level_db / 20.0) / base;
        let echo: Vec<f32> = answer.iter().map(|s| s * gain).collect();
        let heard = hear(&echo, true, &cfg);
        if starts(&heard) > 0 && first_trigger.is_none() {
            first_trigger = Some(level_db);
        }
    }
    println!(
        "echo of the avatar's voice: first barge-in at {}",
        first_trigger.map_or("no level up to -10 dBFS".into(), |l| format!("{l} dBFS RMS"))
    );
    assert!(
        first_trigger.is_none_or(|l| l > -40.0),
        "the avatar's own voice at {first_trigger:?} dBFS interrupted it"
    );
    // The same guard lets a real interruption through: the user at -20 dBFS.
    let user = speak("en-us", "Wait, stop, I have a question.");
    let gain = 0.1 / rms(&user);
    let loud: Vec<f32> = user.iter().map(|s| s * gain).collect();
    let heard = hear(&loud, true, &cfg);
    assert!(
        matches!(heard.first(), Some(Heard::Started { barge_in: true })),
        "{heard:?}"
    );
}

#[test]
fn the_model_takes_a_fraction_of_a_core() {
    // Speed of one window, for the note's table (CPU per voice session).
    let mut model = silero();
    let audio = speak("en-us", "One two three four five six seven eight nine ten.");
    let windows: Vec<&[f32]> = audio.chunks_exact(WINDOW).collect();
    let started = std::time::Instant::now();
    let mut n = 0;
    while started.elapsed().as_secs_f32() < 1.0 {
        for w in &windows {
            model.probability(w).expect("inference");
            n += 1;
        }
    }
    let per_window = started.elapsed().as_secs_f64() / n as f64;
    let share = per_window / (WINDOW as f64 / RATE as f64);
    println!(
        "silero vad: {:.3} ms per 32 ms window = {:.2}% of one core per voice session",
        per_window * 1e3,
        share * 100.0
    );
    assert!(share < 0.25, "{:.1}% of a core", share * 100.0);
}
