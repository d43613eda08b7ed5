//! `worker --self-test`: prove on this box, before it takes sessions, that everything the
//! configuration asks for is really there: the video encoder and the lip-sync model run (and how
//! fast), the models load, and every backend the worker calls answers.
//!
//! A GPU box that silently fell back to the CPU would still stream, only fewer sessions per box; a
//! worker whose LLM key is missing from its environment would start, register, and fail every
//! answer. This command makes both visible before traffic arrives. It checks, in order:
//!
//! * the **avatars** in `avatar_dir`, loaded as the worker loads them (each keeps its own size);
//! * the **encoder**: opens the configured one (`auto` reports which it got) and encodes `frames`
//!   frames at each size the worker will stream (one row per size: a 720p avatar costs about
//!   2.5 times a 512×512 one), timed per frame; without `avatar_dir`, the built-in avatar at
//!   `[video]`'s size;
//! * the **lip-sync** model, with its execution provider, at batch 1 and at `max_batch`, per frame;
//! * the **VAD** (Silero) model when voice input is on (`talk.vad.model` set): loaded, one window run;
//! * each **LLM** and **TTS** the pipeline would build (the default and every avatar's own), and
//!   the **speech recognition (ASR)** when voice input is on: first that every `api_key_env`
//!   variable is set, then one real, small request each — a chat completion cut after its first
//!   words, a short phrase spoken (espeak-ng runs locally), half a second of silence transcribed
//!   (an empty transcript is an answer) — each bounded by its configured `timeout_ms` plus the
//!   connect time, and timed. The clients are the pipeline's own ([`crate::talk`]);
//! * the **face model** (CenterFace) when the caller found one ([`Options::face_model`]): the worker
//!   itself never runs it, `worker avatar prepare` on this box does.
//!
//! What the configuration does not use (the built-in scripted LLM, voice input off, talk disabled)
//! gets a `skipped` row saying why. Every check gives one row; a failed one a `FAILED` row and a
//! line below the table naming the component and the reason, so `worker --self-test` exits non-zero
//! naming what failed and can gate a deployment.
//!
//! [`run`] blocks. The backend requests run on a small Tokio runtime of their own, on a thread of
//! their own, so `run` may be called from `main` or from a blocking task of an async program alike.

use crate::config::{AsrConfig, LlmBackend, LlmConfig, TalkConfig, TtsBackend, TtsConfig, WorkerConfig};
use crate::media::avatar::{self, AvatarClip};
use crate::media::encoder::{self, EncoderSettings, H264Encoder};
use crate::prepare::detect::FaceDetector;
use crate::talk::lipsync::{self, FrameInput, MEL_LEN};
use crate::talk::llm::{ChatMessage, Llm, Role};
use crate::talk::vad::{self, SileroVad, SpeechModel};
use crate::talk::{self, face, TalkError};
use std::future::Future;
use std::path::PathBuf;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The component names the rows and failure lines use.
const LLM: &str = "LLM";
const TTS: &str = "TTS";
const ASR: &str = "speech recognition (ASR)";
const VAD: &str = "voice activity (VAD)";
const FACE: &str = "face model (CenterFace)";

/// What one check found, as its row shows it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Outcome {
    /// Measured over many frames (encoder, lip-sync): milliseconds per frame, mean and 95th
    /// percentile.
    PerFrame { mean_ms: f64, p95_ms: f64 },
    /// Done once (a request, loading a model): how long it took, in milliseconds.
    Once { ms: f64 },
    /// Not checked: the configuration does not use it (the row's detail says why).
    Skipped,
    /// Failed: the lines below the table say why.
    Failed,
}

/// One line of the report.
#[derive(Debug, Clone)]
pub struct Row {
    /// The component: `encoder libx264`, `LLM`, `speech recognition (ASR)`, …
    pub what: String,
    /// What was checked: the model, the URL, what came back.
    pub detail: String,
    pub outcome: Outcome,
}

/// What the self-test found.
#[derive(Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    /// One line per failed check, starting with the component's name.
    pub failures: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    /// The report as a Markdown table, then the failures.
    pub fn render(&self) -> String {
        let mut s = String::from("| component | detail | ms | ms p95 |\n|---|---|---:|---:|\n");
        for r in &self.rows {
            let (ms, p95) = match r.outcome {
                Outcome::PerFrame { mean_ms, p95_ms } => (format!("{mean_ms:.3}/frame"), format!("{p95_ms:.3}/frame")),
                Outcome::Once { ms } => (format!("{ms:.0}"), String::new()),
                Outcome::Skipped => ("skipped".to_owned(), String::new()),
                Outcome::Failed => ("FAILED".to_owned(), String::new()),
            };
            s += &format!("| {} | {} | {ms} | {p95} |\n", cell(&r.what), cell(&r.detail));
        }
        for f in &self.failures {
            s += &format!("FAILED: {f}\n");
        }
        s
    }

    fn row(&mut self, what: impl Into<String>, detail: impl Into<String>, outcome: Outcome) {
        self.rows.push(Row {
            what: what.into(),
            detail: detail.into(),
            outcome,
        });
    }

    fn once(&mut self, what: impl Into<String>, detail: impl Into<String>, took: Duration) {
        let ms = took.as_secs_f64() * 1e3;
        self.row(what, detail, Outcome::Once { ms });
    }

    fn skip(&mut self, what: impl Into<String>, detail: impl Into<String>) {
        self.row(what, detail, Outcome::Skipped);
    }

    /// A failed check: its row, and the line naming `what` and why.
    fn fail(&mut self, what: impl Into<String>, detail: impl Into<String>, reason: impl std::fmt::Display) {
        let what = what.into();
        self.failures.push(format!("{what}: {reason}"));
        self.row(what, detail, Outcome::Failed);
    }

    fn append(&mut self, other: Report) {
        self.rows.extend(other.rows);
        self.failures.extend(other.failures);
    }
}

/// A table cell: one line, and no `|` that would end it (details quote what servers sent).
fn cell(s: &str) -> String {
    s.replace(['\n', '\r'], " ").replace('|', "\\|")
}

/// The face detector `worker avatar prepare` would use on this box.
#[derive(Debug, Clone)]
pub struct FaceModel {
    /// The CenterFace ONNX file.
    pub model: PathBuf,
    /// The ONNX Runtime library to load it with.
    pub onnxruntime: PathBuf,
}

/// How the self-test runs.
#[derive(Debug, Clone)]
pub struct Options {
    /// Frames per measurement of the encoder and the lip-sync model (at least 10).
    pub frames: usize,
    /// The face model to load. `None`: none found on this box (a `skipped` row; the worker does
    /// not need one to serve sessions).
    pub face_model: Option<FaceModel>,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            frames: 250,
            face_model: None,
        }
    }
}

/// Run the self-test. Blocks until every check is done (each backend request is bounded by its
/// timeout).
pub fn run(config: &WorkerConfig, options: &Options) -> Report {
    let mut report = Report::default();
    let frames = options.frames.max(10);
    encode_test(config, frames, &mut report);
    let t = &config.talk;
    if t.enabled {
        lipsync_test(config, frames, &mut report);
        vad_test(t, &mut report);
        backend_test(t, &mut report);
    } else {
        report.skip(
            "talking pipeline",
            "talk.enabled = false: no lip-sync, LLM, TTS or voice input to check",
        );
    }
    face_test(options.face_model.as_ref(), config, &mut report);
    report
}

fn per_frame(mut samples: Vec<f64>, per: usize) -> (f64, f64) {
    let per = per.max(1) as f64;
    samples.iter_mut().for_each(|v| *v /= per);
    samples.sort_by(f64::total_cmp);
    let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    let p95 = samples
        .get(((samples.len() as f64 * 0.95) as usize).min(samples.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0);
    (mean, p95)
}

/// What the worker will encode: the first avatar of each size in `avatar_dir` (an `avatars` row
/// lists them all), or the built-in avatar at `[video]`'s size. Empty when the avatars do not
/// load (a failed row: the worker would not start either).
fn avatars_to_encode(config: &WorkerConfig, report: &mut Report) -> Vec<AvatarClip> {
    let v = &config.video;
    let Some(dir) = &config.avatar_dir else {
        return vec![avatar::synthetic(v.width, v.height, v.fps)];
    };
    let started = Instant::now();
    match avatar::load_dir(dir, v.fps) {
        Ok(clips) => {
            let listed: Vec<String> = clips
                .iter()
                .map(|c| format!("{} {}x{}", c.id, c.size().0, c.size().1))
                .collect();
            report.once(
                "avatars",
                format!("{} from {}: {}", clips.len(), dir.display(), listed.join(", ")),
                started.elapsed(),
            );
            let mut sizes = std::collections::HashSet::new();
            clips.into_iter().filter(|c| sizes.insert(c.size())).collect()
        }
        Err(e) => {
            report.fail("avatars", dir.display().to_string(), e);
            Vec::new()
        }
    }
}

fn encode_test(config: &WorkerConfig, frames: usize, report: &mut Report) {
    let v = &config.video;
    let asked = format!("asked `{}`", v.encoder);
    if let Err(e) = encoder::init() {
        report.fail("encoder", asked, format!("FFmpeg: {e}"));
        return;
    }
    let clips = avatars_to_encode(config, report);
    let Some(first) = clips.first() else { return };
    let name = match encoder::select_encoder(v.encoder, &EncoderSettings::from(v).at_size(first.size())) {
        Ok(name) => name,
        Err(e) => {
            report.fail(format!("encoder `{}`", v.encoder), asked, e);
            return;
        }
    };
    for clip in &clips {
        encode_one(config, name, &asked, clip, frames, report);
    }
}

/// `frames` frames of `clip` through encoder `name` at the clip's size: one row.
fn encode_one(
    config: &WorkerConfig,
    name: &'static str,
    asked: &str,
    clip: &AvatarClip,
    frames: usize,
    report: &mut Report,
) {
    let v = &config.video;
    let (width, height) = clip.size();
    let mut enc = match H264Encoder::open(name, &EncoderSettings::from(v).at_size((width, height))) {
        Ok(enc) => enc,
        Err(e) => {
            report.fail(format!("encoder {name}"), format!("{width}x{height}, {asked}"), e);
            return;
        }
    };
    let (mut times, mut bytes) = (Vec::with_capacity(frames), 0usize);
    for i in 0..frames {
        let picture = clip.frame(i);
        let t = Instant::now();
        match enc.encode(picture, i as i64, i == 0) {
            Ok(au) => bytes += au.len(),
            Err(e) => {
                report.fail(format!("encoder {name}"), asked, format!("encoding frame {i}: {e}"));
                return;
            }
        }
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (mean_ms, p95_ms) = per_frame(times, 1);
    let kbps = bytes as f64 * 8.0 / (frames as f64 / v.fps as f64) / 1e3;
    report.row(
        format!("encoder {name}"),
        format!("{width}x{height} @ {} fps, {asked}, {kbps:.0} kbit/s out", v.fps),
        Outcome::PerFrame { mean_ms, p95_ms },
    );
}

fn lipsync_test(config: &WorkerConfig, frames: usize, report: &mut Report) {
    let cfg = &config.talk.lipsync;
    let t = Instant::now();
    let mut model = match lipsync::load_model(cfg) {
        Ok(m) => m,
        Err(e) => {
            let detail = match &cfg.model {
                Some(path) => format!("{} on {}", path.display(), cfg.execution_provider),
                None => cfg.backend.to_string(),
            };
            report.fail("lip-sync model", detail, e);
            return;
        }
    };
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let v = &config.video;
    let clip = avatar::synthetic(v.width, v.height, v.fps);
    let region = face::crop_region(clip.face_box(0), v.width, v.height);
    let face = face::crop(&clip.frames[0], region);
    let input = |i: usize| FrameInput {
        mel: std::array::from_fn(|k| ((i * 31 + k) % 97) as f32 / 24.0 - 3.0),
        face: face.clone(),
    };
    let mut batches = vec![1usize];
    if cfg.max_batch > 1 {
        batches.push(cfg.max_batch);
    }
    debug_assert_eq!(MEL_LEN, 80 * 16);
    for batch in batches {
        let runs = (frames / batch).max(5);
        let mut times = Vec::with_capacity(runs);
        // One warm-up run: the first inference on a GPU also builds its kernels.
        for r in 0..=runs {
            let inputs: Vec<FrameInput> = (0..batch).map(|i| input(r * batch + i)).collect();
            let t = Instant::now();
            if let Err(e) = model.infer(&inputs) {
                report.fail(
                    format!("lip-sync {}", model.name()),
                    format!("batch {batch}"),
                    format!("inference (batch {batch}): {e}"),
                );
                return;
            }
            if r > 0 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let (mean_ms, p95_ms) = per_frame(times, batch);
        report.row(
            format!("lip-sync {}", model.name()),
            format!("batch {batch}, {runs} runs, loaded in {load_ms:.0} ms"),
            Outcome::PerFrame { mean_ms, p95_ms },
        );
    }
}

/// Voice input's model: load it as a peer's listener would, and run one window of silence.
fn vad_test(t: &TalkConfig, report: &mut Report) {
    let Some(model) = &t.vad.model else {
        report.skip(
            "voice input",
            "talk.vad.model is not set (voice input off): no VAD model to load, no speech recognition to call",
        );
        return;
    };
    let detail = format!("Silero VAD {}", model.display());
    let started = Instant::now();
    let ran = SileroVad::load(model, &t.lipsync.onnxruntime)
        .and_then(|mut silero| silero.probability(&[0.0f32; vad::WINDOW]));
    match ran {
        Ok(p) => report.once(
            VAD,
            format!("{detail}: loaded, silence scored {p:.2}"),
            started.elapsed(),
        ),
        Err(e) => report.fail(VAD, detail, e),
    }
}

/// The face detector: load it and run it once on the built-in avatar (found faces or none, it ran).
fn face_test(face: Option<&FaceModel>, config: &WorkerConfig, report: &mut Report) {
    let Some(face) = face else {
        report.skip(
            FACE,
            "no CenterFace model found on this box: the worker does not need one, `worker avatar prepare` does",
        );
        return;
    };
    let detail = face.model.display().to_string();
    let v = &config.video;
    let clip = avatar::synthetic(v.width, v.height, v.fps);
    let started = Instant::now();
    let ran = FaceDetector::load(&face.model, &face.onnxruntime, 1).and_then(|mut d| d.detect(clip.frame(0)));
    match ran {
        Ok(found) => report.once(
            FACE,
            format!("{detail}: loaded, {} face(s) in the built-in avatar", found.len()),
            started.elapsed(),
        ),
        Err(e) => report.fail(FACE, detail, e),
    }
}

/// The backend requests, on a current-thread runtime on a thread of their own (so `run` never
/// starts a runtime inside a caller's).
fn backend_test(t: &TalkConfig, report: &mut Report) {
    let checked = std::thread::scope(|scope| {
        scope
            .spawn(|| {
                let runtime = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| e.to_string())?;
                let mut part = Report::default();
                runtime.block_on(check_backends(t, &mut part));
                // A lookup still running after its timeout must not hold the report back.
                runtime.shutdown_timeout(std::time::Duration::from_secs(1));
                Ok::<Report, String>(part)
            })
            .join()
    });
    let what = format!("{LLM}, {TTS} and {ASR}");
    match checked {
        Ok(Ok(part)) => report.append(part),
        Ok(Err(e)) => report.fail(what, "not checked", format!("no async runtime to call them with: {e}")),
        Err(_) => report.fail(what, "not checked", "the checking thread panicked"),
    }
}

async fn check_backends(t: &TalkConfig, report: &mut Report) {
    let client = match talk::http_client() {
        Ok(c) => c,
        Err(e) => {
            report.fail(format!("{LLM}, {TTS} and {ASR}"), "not checked", e);
            return;
        }
    };
    for check in llms(t) {
        check_llm(&check, &client, report).await;
    }
    for check in ttss(t) {
        check_tts(&check, &client, report).await;
    }
    if t.vad.model.is_some() {
        check_asr(&t.asr, &client, report).await;
    }
}

/// One backend setting to check: its row's name, the config key it sits under, the setting.
struct Check<'a, C> {
    what: String,
    key: String,
    cfg: &'a C,
    /// TTS only: the voice to speak with.
    voice: String,
}

/// The language models the pipeline builds: the default, then each avatar's own (each distinct
/// setting once).
fn llms(t: &TalkConfig) -> Vec<Check<'_, LlmConfig>> {
    let mut list = vec![Check {
        what: LLM.to_owned(),
        key: "talk.llm".to_owned(),
        cfg: &t.llm,
        voice: String::new(),
    }];
    for (id, a) in &t.avatars {
        let Some(llm) = &a.llm else { continue };
        let same = |c: &LlmConfig| {
            c.backend == llm.backend
                && c.base_url == llm.base_url
                && c.model == llm.model
                && c.api_key_env == llm.api_key_env
                && c.api_key == llm.api_key
        };
        if !list.iter().any(|seen| same(seen.cfg)) {
            list.push(Check {
                what: format!("{LLM} for avatar {id}"),
                key: format!("talk.avatars.{id}.llm"),
                cfg: llm,
                voice: String::new(),
            });
        }
    }
    list
}

/// The speech backends the pipeline builds, each with the voice it would speak with.
fn ttss(t: &TalkConfig) -> Vec<Check<'_, TtsConfig>> {
    // Unset: what the pipeline uses for an English sentence.
    let voice = |cfg: &TtsConfig, voice: Option<&String>| match voice {
        Some(v) => v.clone(),
        None if cfg.backend == TtsBackend::Openai => "alloy".to_owned(),
        None => "en-us".to_owned(),
    };
    let mut list = vec![Check {
        what: TTS.to_owned(),
        key: "talk.tts".to_owned(),
        cfg: &t.tts,
        voice: voice(&t.tts, t.voice.as_ref()),
    }];
    for (id, a) in &t.avatars {
        let (cfg, key) = match &a.tts {
            Some(tts) => (tts, format!("talk.avatars.{id}.tts")),
            None => (&t.tts, "talk.tts".to_owned()),
        };
        let spoken = voice(cfg, a.voice.as_ref().or(t.voice.as_ref()));
        let same = |c: &Check<'_, TtsConfig>| {
            c.cfg.backend == cfg.backend
                && c.cfg.base_url == cfg.base_url
                && c.cfg.model == cfg.model
                && c.cfg.program == cfg.program
                && c.cfg.api_key_env == cfg.api_key_env
                && c.cfg.api_key == cfg.api_key
                && c.voice == spoken
        };
        if !list.iter().any(same) {
            list.push(Check {
                what: format!("{TTS} for avatar {id}"),
                key,
                cfg,
                voice: spoken,
            });
        }
    }
    list
}

/// Why a backend has no key: `api_key_env` names a variable that is not set (or empty) and the
/// file holds no `api_key` to fall back on (as the pipeline does).
fn missing_key(env: Option<&str>, inline: Option<&crate::config::Secret>, key: &str) -> Option<String> {
    let var = env?;
    let set = std::env::var_os(var).is_some_and(|v| !v.is_empty());
    let fallback = inline.is_some_and(|k| !k.expose().is_empty());
    (!set && !fallback).then(|| format!("the variable {var} is not set ({key}.api_key_env names it)"))
}

/// `work` bounded by the backend's `timeout_ms` plus the HTTP client's connect timeout (the
/// clients bound each wait themselves; this bounds the whole check).
async fn bounded<T>(timeout_ms: u64, work: impl Future<Output = Result<T, TalkError>>) -> Result<T, String> {
    let limit = Duration::from_millis(timeout_ms.max(1)) + Duration::from_secs(5);
    match tokio::time::timeout(limit, work).await {
        Ok(Ok(v)) => Ok(v),
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err(format!("no answer within {} ms", limit.as_millis())),
    }
}

/// At most this many characters of what a server sent, quoted.
fn quoted(s: &str) -> String {
    format!("{:?}", s.chars().take(24).collect::<String>())
}

async fn check_llm(check: &Check<'_, LlmConfig>, client: &reqwest::Client, report: &mut Report) {
    let cfg = check.cfg;
    if cfg.backend == LlmBackend::Scripted {
        report.skip(&check.what, "scripted: the built-in answers, no service to call");
        return;
    }
    let llm = talk::make_llm(cfg, client);
    let name = llm.name();
    if let Some(reason) = missing_key(cfg.api_key_env.as_deref(), cfg.api_key.as_ref(), &check.key) {
        report.fail(&check.what, name, reason);
        return;
    }
    let started = Instant::now();
    match bounded(cfg.timeout_ms, first_words(&*llm)).await {
        Ok(words) => report.once(
            &check.what,
            format!("{name}: answered {}", quoted(&words)),
            started.elapsed(),
        ),
        Err(e) => report.fail(&check.what, name, e),
    }
}

/// One short chat completion: the first words of the answer (the request is dropped once they
/// came, so a talkative model costs a few tokens), or all of it if it is shorter.
async fn first_words(llm: &dyn Llm) -> Result<String, TalkError> {
    let messages = [
        ChatMessage {
            role: Role::System,
            content: "This is a connectivity check. Answer with one word.".into(),
        },
        ChatMessage {
            role: Role::User,
            content: "Say OK.".into(),
        },
    ];
    let (tx, mut rx) = mpsc::channel::<String>(16);
    let mut answer = llm.stream(&messages, tx);
    let mut words = String::new();
    loop {
        tokio::select! {
            done = &mut answer => {
                done?;
                while let Ok(delta) = rx.try_recv() {
                    words.push_str(&delta);
                }
                return Ok(words);
            }
            Some(delta) = rx.recv() => {
                words.push_str(&delta);
                if words.chars().count() >= 16 {
                    return Ok(words);
                }
            }
        }
    }
}

async fn check_tts(check: &Check<'_, TtsConfig>, client: &reqwest::Client, report: &mut Report) {
    let cfg = check.cfg;
    let tts = talk::make_tts(cfg, client);
    let detail = format!("{}, voice {}", tts.name(), check.voice);
    if cfg.backend == TtsBackend::Openai {
        if let Some(reason) = missing_key(cfg.api_key_env.as_deref(), cfg.api_key.as_ref(), &check.key) {
            report.fail(&check.what, detail, reason);
            return;
        }
    }
    let started = Instant::now();
    match bounded(cfg.timeout_ms, tts.synthesize("Hello, this is a test.", &check.voice)).await {
        Ok(pcm) if pcm.samples.is_empty() => report.fail(&check.what, detail, "no audio came back"),
        Ok(pcm) => report.once(
            &check.what,
            format!("{detail}: {:.1} s of audio", pcm.seconds()),
            started.elapsed(),
        ),
        Err(e) => report.fail(&check.what, detail, e),
    }
}

async fn check_asr(cfg: &AsrConfig, client: &reqwest::Client, report: &mut Report) {
    let asr = talk::make_asr(cfg, client);
    let name = asr.name();
    if let Some(reason) = missing_key(cfg.api_key_env.as_deref(), cfg.api_key.as_ref(), "talk.asr") {
        report.fail(ASR, name, reason);
        return;
    }
    // Half a second of silence: any answer, an empty transcript too, proves the service works.
    let silence = vec![0.0f32; vad::RATE as usize / 2];
    let started = Instant::now();
    match bounded(
        cfg.timeout_ms,
        asr.transcribe(&silence, cfg.language.as_deref(), crate::talk::asr::Urgency::Now),
    )
    .await
    {
        Ok(text) => report.once(
            ASR,
            format!("{name}: 0.5 s of silence heard as {}", quoted(&text)),
            started.elapsed(),
        ),
        Err(e) => report.fail(ASR, name, e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Secret, VideoEncoder};

    fn options(frames: usize) -> Options {
        Options {
            frames,
            face_model: None,
        }
    }

    /// A URL where nothing listens: a port bound, then let go.
    fn closed_url() -> String {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        format!("http://{addr}/v1")
    }

    fn named<'a>(report: &'a Report, what: &str) -> &'a Row {
        report
            .rows
            .iter()
            .find(|r| r.what == what)
            .unwrap_or_else(|| panic!("no row {what}: {}", report.render()))
    }

    #[test]
    fn the_default_config_passes_with_libx264_and_the_builtin_mouth() {
        let mut config = WorkerConfig::dev();
        config.video.encoder = VideoEncoder::Libx264;
        let report = run(&config, &options(20));
        assert!(report.ok(), "{}", report.render());
        assert!(report.rows[0].what.contains("libx264"));
        assert!(
            matches!(report.rows[0].outcome, Outcome::PerFrame { mean_ms, .. } if mean_ms > 0.0),
            "{}",
            report.render()
        );
        let table = report.render();
        assert!(table.contains("| lip-sync builtin"), "{table}");
        // The built-in backends: nothing to call for the LLM, espeak-ng speaks here.
        assert_eq!(named(&report, LLM).outcome, Outcome::Skipped, "{table}");
        assert!(matches!(named(&report, TTS).outcome, Outcome::Once { .. }), "{table}");
        assert!(named(&report, TTS).detail.contains("espeak-ng"), "{table}");
        assert_eq!(named(&report, "voice input").outcome, Outcome::Skipped, "{table}");
        assert_eq!(named(&report, FACE).outcome, Outcome::Skipped, "{table}");
    }

    /// An avatar directory as `worker avatar prepare` leaves it: `idle.mp4` and `avatar.toml`.
    fn write_avatar(dir: &std::path::Path, id: &str, (width, height): (u32, u32)) {
        let dir = dir.join(id);
        std::fs::create_dir_all(&dir).expect("dir");
        let mut mp4 = crate::media::file::Mp4Writer::create(&dir.join("idle.mp4"), width, height, 25).expect("mp4");
        for i in 0..10 {
            mp4.write(&avatar::draw(width, height, i as f32 / 10.0, None))
                .expect("frame");
        }
        mp4.finish().expect("finish");
        let b = avatar::synthetic_face_box(width, height);
        let meta = format!(
            "name = \"{id}\"\nvideo = \"idle.mp4\"\nface_box = [{}, {}, {}, {}]\n",
            b.x, b.y, b.w, b.h
        );
        std::fs::write(dir.join("avatar.toml"), meta).expect("toml");
    }

    #[test]
    fn the_encoder_is_timed_at_each_size_the_avatars_stream_at() {
        let dir = tempfile::tempdir().expect("tempdir");
        write_avatar(dir.path(), "tutor-wide", (1280, 720));
        write_avatar(dir.path(), "tutor-phone", (720, 1280));
        write_avatar(dir.path(), "tutor-wide-2", (1280, 720));
        let mut config = WorkerConfig::dev();
        config.video.encoder = VideoEncoder::Libx264;
        config.talk.enabled = false;
        config.avatar_dir = Some(dir.path().into());
        let report = run(&config, &options(10));
        let table = report.render();
        assert!(report.ok(), "{table}");
        let avatars = named(&report, "avatars");
        assert!(
            avatars.detail.contains("3 from") && avatars.detail.contains("tutor-phone 720x1280"),
            "{table}"
        );
        // One row per size, not per avatar, and none at [video]'s 512x512.
        let encoded: Vec<&str> = report
            .rows
            .iter()
            .filter(|r| r.what.starts_with("encoder"))
            .map(|r| r.detail.split(' ').next().unwrap_or(""))
            .collect();
        assert_eq!(encoded, ["720x1280", "1280x720"], "{table}");
    }

    #[test]
    fn avatars_that_do_not_load_fail_the_self_test() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut config = WorkerConfig::dev();
        config.video.encoder = VideoEncoder::Libx264;
        config.talk.enabled = false;
        config.avatar_dir = Some(dir.path().into());
        let report = run(&config, &options(10));
        assert!(!report.ok());
        assert_eq!(
            named(&report, "avatars").outcome,
            Outcome::Failed,
            "{}",
            report.render()
        );
    }

    #[test]
    fn a_missing_model_is_a_failure_not_a_silent_fallback() {
        let mut config = WorkerConfig::dev();
        config.video.encoder = VideoEncoder::Libx264;
        config.talk.lipsync.backend = crate::config::LipSyncBackend::Onnx;
        config.talk.lipsync.model = Some("/nonexistent/model.onnx".into());
        let report = run(&config, &options(10));
        assert!(!report.ok());
        assert!(
            report.render().contains("FAILED: lip-sync model"),
            "{}",
            report.render()
        );
    }

    #[test]
    fn nvenc_without_a_gpu_fails_when_asked_for_by_name() {
        let mut config = WorkerConfig::dev();
        config.video.encoder = VideoEncoder::H264Nvenc;
        config.talk.enabled = false;
        let report = run(&config, &options(10));
        if report.ok() {
            // A machine with a GPU: the row must say so.
            assert!(report.rows[0].what.contains("h264_nvenc"));
        } else {
            assert!(report.render().contains("h264_nvenc"), "{}", report.render());
        }
    }

    #[test]
    fn an_llm_that_is_down_fails_naming_the_llm() {
        let mut config = WorkerConfig::dev();
        config.video.encoder = VideoEncoder::Libx264;
        config.talk.llm.backend = LlmBackend::Openai;
        config.talk.llm.base_url = Some(closed_url());
        config.talk.llm.timeout_ms = 3000;
        let report = run(&config, &options(10));
        assert_eq!(report.failures.len(), 1, "{}", report.render());
        assert!(report.failures[0].starts_with("LLM: "), "{}", report.render());
        assert!(report.failures[0].contains("language model"), "{}", report.render());
        assert_eq!(named(&report, LLM).outcome, Outcome::Failed);
    }

    #[test]
    fn a_key_variable_that_is_not_set_fails_naming_it_before_any_request() {
        let var = "AVATAR_EDGE_SELFTEST_UNIT_UNSET_KEY_30";
        let mut config = WorkerConfig::dev();
        config.video.encoder = VideoEncoder::Libx264;
        config.talk.llm.backend = LlmBackend::Openai;
        config.talk.llm.base_url = Some(closed_url());
        config.talk.llm.api_key_env = Some(var.into());
        let report = run(&config, &options(10));
        assert_eq!(report.failures.len(), 1, "{}", report.render());
        let line = &report.failures[0];
        assert!(
            line.starts_with("LLM: the variable AVATAR_EDGE_SELFTEST_UNIT_UNSET_KEY_30 is not set"),
            "{line}"
        );
        assert!(line.contains("talk.llm.api_key_env"), "{line}");
        assert!(!line.contains("request failed"), "no request was made: {line}");
        // A key in the file is what the pipeline falls back on: then nothing is missing.
        config.talk.llm.api_key = Some(Secret::new("sk-in-the-file"));
        let report = run(&config, &options(10));
        assert!(
            report.failures.iter().all(|f| !f.contains("is not set")),
            "{}",
            report.render()
        );
    }

    #[test]
    fn voice_input_checks_the_vad_model_and_the_recogniser() {
        let mut config = WorkerConfig::dev();
        config.video.encoder = VideoEncoder::Libx264;
        config.talk.vad.model = Some("/nonexistent/silero_vad.onnx".into());
        config.talk.asr.base_url = closed_url();
        config.talk.asr.timeout_ms = 3000;
        let report = run(&config, &options(10));
        let table = report.render();
        assert_eq!(report.failures.len(), 2, "{table}");
        assert!(table.contains("FAILED: voice activity (VAD): "), "{table}");
        assert!(table.contains("/nonexistent/silero_vad.onnx"), "{table}");
        assert!(table.contains("FAILED: speech recognition (ASR): "), "{table}");
    }

    #[test]
    fn a_talk_disabled_worker_skips_the_pipeline() {
        let mut config = WorkerConfig::dev();
        config.video.encoder = VideoEncoder::Libx264;
        config.talk.enabled = false;
        config.talk.llm.backend = LlmBackend::Openai;
        config.talk.llm.base_url = Some(closed_url());
        let report = run(&config, &options(10));
        assert!(report.ok(), "{}", report.render());
        assert_eq!(named(&report, "talking pipeline").outcome, Outcome::Skipped);
        assert!(report.rows.iter().all(|r| r.what != LLM), "{}", report.render());
    }

    #[test]
    fn table_cells_cannot_be_broken_by_what_a_server_sent() {
        let mut report = Report::default();
        report.once(LLM, "answered \"a | b\nc\"", Duration::from_millis(12));
        report.fail(TTS, "x", "HTTP 500");
        let table = report.render();
        assert!(table.contains("| LLM | answered \"a \\| b c\" | 12 |  |\n"), "{table}");
        assert!(table.contains("| TTS | x | FAILED |  |\n"), "{table}");
        assert!(table.ends_with("FAILED: TTS: HTTP 500\n"), "{table}");
    }
}
