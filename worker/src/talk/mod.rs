//! The talking pipeline: `text_webrtc` → language model → speech → lip-sync → the media clock.
//!
//! ```text
//!  text ─▶ LLM task ──deltas──▶ chunker ──sentences──▶ TTS task ──PCM 16k+48k──▶ lip-sync thread ──units──▶ media clock
//!            │                    │                                               (mel, crop,               (25 fps, Opus)
//!            └─ assistant_text ◀──┘                                                shared runners, paste)
//! ```
//!
//! Each answer is a *turn*. Its stages run concurrently and are joined by bounded channels, so a
//! slow stage holds the others back instead of piling up memory, and the first sentence is being
//! spoken while the model is still writing the rest. A turn is cancelled as a whole: its token
//! stops the async stages (dropping the HTTP requests and killing espeak-ng), the lip-sync thread
//! sees that its turn is no longer current, and the clock drops the turn's queued frames at its
//! next tick — which is why an interrupt silences the avatar within one frame.
//!
//! Voice input joins the same turns: the microphone's audio goes through voice activity detection
//! ([`vad`], on a thread per peer: [`hearing`]), each utterance through speech recognition
//! ([`asr`], [`Conversation::transcribe`]), and its transcript is then said like a `text_webrtc`.
//!
//! Worker-wide parts live in [`Talk`] (backends per avatar, the lip-sync runners); each session
//! has a [`Conversation`] (history, the current turn, the clock's feed).

pub mod asr;
pub mod audio;
pub mod face;
pub mod hearing;
pub mod lipsync;
pub mod llm;
pub mod mel;
pub mod sentences;
pub mod tts;
pub mod vad;

use crate::config::{
    AsrConfig, ExecutionProvider, LlmBackend, LlmConfig, TalkConfig, TtsBackend, TtsConfig, VadConfig,
};
use crate::media::avatar::AvatarClip;
use crate::media::stream::{ClockEvent, Feed, TalkUnit, AUDIO_RATE, PREBUFFER};
use lipsync::{FrameInput, LipSyncService};
use llm::{ChatMessage, Llm, Role};
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};
use tts::Tts;

#[derive(Debug, thiserror::Error)]
pub enum TalkError {
    #[error("language model: {0}")]
    Llm(String),
    #[error("speech: {0}")]
    Tts(String),
    #[error("{0}")]
    Timeout(&'static str),
    #[error("lip-sync: {0}")]
    LipSync(#[from] lipsync::LipSyncError),
    #[error("audio: {0}")]
    Audio(#[from] audio::AudioError),
    #[error("HTTP client: {0}")]
    Client(String),
    #[error("speech recognition: {0}")]
    Asr(String),
}

/// One avatar's backends.
pub struct Backends {
    pub llm: Arc<dyn Llm>,
    pub tts: Arc<dyn Tts>,
    pub system_prompt: String,
    pub voice: Option<String>,
    /// The language the user speaks, for speech recognition (None: detect).
    pub language: Option<String>,
    /// The TTS speaks OpenAI voices (`alloy`, …) rather than espeak-ng's.
    openai_voices: bool,
}

/// The worker-wide talking machinery.
pub struct Talk {
    default: Backends,
    per_avatar: HashMap<String, Backends>,
    pub lipsync: Arc<LipSyncService>,
    fps: u32,
    history: usize,
    session_batch: usize,
    feather: u32,
    /// Voice input: speech recognition, and the voice activity settings (`vad.model` unset: off).
    pub asr: Arc<dyn asr::Asr>,
    pub vad: VadConfig,
    /// The ONNX Runtime library (the VAD model runs on it too).
    pub onnxruntime: std::path::PathBuf,
}

fn http_client() -> Result<reqwest::Client, TalkError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .user_agent(concat!("avatar-edge/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| TalkError::Client(e.to_string()))
}

fn make_llm(cfg: &LlmConfig, client: &reqwest::Client) -> Arc<dyn Llm> {
    match cfg.backend {
        LlmBackend::Openai => Arc::new(llm::OpenAiLlm {
            client: client.clone(),
            base_url: cfg.base_url.clone().unwrap_or_default(),
            model: cfg.model.clone(),
            api_key: cfg.key(),
            temperature: cfg.temperature,
            timeout: Duration::from_millis(cfg.timeout_ms.max(1)),
        }),
        LlmBackend::Scripted => Arc::new(llm::ScriptedLlm {
            delay: Duration::from_millis(cfg.word_delay_ms),
        }),
    }
}

fn make_asr(cfg: &AsrConfig, client: &reqwest::Client) -> Arc<dyn asr::Asr> {
    Arc::new(asr::OpenAiAsr {
        client: client.clone(),
        base_url: cfg.base_url.clone(),
        model: cfg.model.clone(),
        api_key: cfg.key(),
        prompt: cfg.prompt.clone(),
        timeout: Duration::from_millis(cfg.timeout_ms.max(1)),
    })
}

fn make_tts(cfg: &TtsConfig, client: &reqwest::Client) -> Arc<dyn Tts> {
    match cfg.backend {
        TtsBackend::Openai => Arc::new(tts::OpenAiTts {
            client: client.clone(),
            base_url: cfg.base_url.clone().unwrap_or_default(),
            model: cfg.model.clone(),
            api_key: cfg.key(),
            timeout: Duration::from_millis(cfg.timeout_ms.max(1)),
        }),
        TtsBackend::Espeak => Arc::new(tts::EspeakTts {
            program: cfg.program.clone(),
            speed: cfg.speed,
            timeout: Duration::from_millis(cfg.timeout_ms.max(1)),
        }),
    }
}

impl Talk {
    /// Build the backends and start the lip-sync runners (loading the model; a CUDA model that
    /// cannot use the GPU fails here).
    pub fn new(cfg: &TalkConfig, fps: u32) -> Result<Self, TalkError> {
        let client = http_client()?;
        let backends =
            |llm: &LlmConfig, tts: &TtsConfig, prompt: &str, voice: &Option<String>, language: &Option<String>| {
                Backends {
                    llm: make_llm(llm, &client),
                    tts: make_tts(tts, &client),
                    system_prompt: prompt.to_owned(),
                    voice: voice.clone(),
                    language: language.clone(),
                    openai_voices: tts.backend == TtsBackend::Openai,
                }
            };
        let default = backends(&cfg.llm, &cfg.tts, &cfg.system_prompt, &cfg.voice, &cfg.asr.language);
        let per_avatar = cfg
            .avatars
            .iter()
            .map(|(id, a)| {
                let b = backends(
                    a.llm.as_ref().unwrap_or(&cfg.llm),
                    a.tts.as_ref().unwrap_or(&cfg.tts),
                    a.system_prompt.as_deref().unwrap_or(&cfg.system_prompt),
                    if a.voice.is_some() { &a.voice } else { &cfg.voice },
                    if a.language.is_some() {
                        &a.language
                    } else {
                        &cfg.asr.language
                    },
                );
                (id.clone(), b)
            })
            .collect();
        let mut lcfg = cfg.lipsync.clone();
        if lcfg.runners == 0 {
            lcfg.runners = if lcfg.execution_provider == ExecutionProvider::Cuda {
                1
            } else {
                std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1)
            };
        }
        let lipsync = LipSyncService::start(&lcfg)?;
        info!(
            llm = %default.llm.name(),
            tts = %default.tts.name(),
            lipsync = %lipsync.model_name,
            "talking pipeline ready"
        );
        Ok(Self {
            default,
            per_avatar,
            lipsync,
            fps,
            history: cfg.history,
            session_batch: lcfg.session_batch,
            feather: lcfg.feather_px,
            asr: make_asr(&cfg.asr, &client),
            vad: cfg.vad.clone(),
            onnxruntime: lcfg.onnxruntime.clone(),
        })
    }

    fn backends(&self, avatar_id: &str) -> &Backends {
        self.per_avatar.get(avatar_id).unwrap_or(&self.default)
    }
}

impl Drop for Talk {
    fn drop(&mut self) {
        self.lipsync.shutdown();
    }
}

/// What a turn tells its session.
#[derive(Debug)]
pub enum TalkEvent {
    /// A text delta of the answer.
    Text {
        turn: u64,
        text: String,
    },
    /// The answer's text is complete (speech may still be playing).
    Done {
        turn: u64,
        user: String,
        answer: String,
    },
    Failed {
        turn: u64,
        message: String,
    },
    /// Speech recognition heard an utterance as `text` (possibly empty: a noise).
    Transcript {
        text: String,
    },
    /// Speech recognition failed for an utterance.
    TranscriptFailed {
        message: String,
    },
}

/// One session's conversation.
pub struct Conversation {
    talk: Arc<Talk>,
    clip: Arc<AvatarClip>,
    avatar_id: String,
    history: Vec<ChatMessage>,
    turns: u64,
    current_turn: Arc<AtomicU64>,
    idle_index: Arc<AtomicUsize>,
    units: Option<std::sync::mpsc::SyncSender<TalkUnit>>,
    active: Option<CancellationToken>,
    events: mpsc::UnboundedSender<TalkEvent>,
    /// Cancels speech recognitions in flight when the conversation ends.
    hearing: CancellationToken,
    /// The latest recognition (the next waits for it, so transcripts keep their order).
    transcribing: Option<tokio::task::JoinHandle<()>>,
}

impl Conversation {
    pub fn new(
        talk: Arc<Talk>,
        clip: Arc<AvatarClip>,
        avatar_id: String,
        events: mpsc::UnboundedSender<TalkEvent>,
    ) -> Self {
        Self {
            talk,
            clip,
            avatar_id,
            history: Vec::new(),
            turns: 0,
            current_turn: Arc::new(AtomicU64::new(0)),
            idle_index: Arc::new(AtomicUsize::new(0)),
            units: None,
            active: None,
            events,
            hearing: CancellationToken::new(),
            transcribing: None,
        }
    }

    /// A feed for a (new) media clock. Any answer in progress is cancelled: its frames were for
    /// the old clock.
    pub fn feed(&mut self, clock_events: mpsc::UnboundedSender<ClockEvent>) -> Feed {
        self.interrupt();
        // Two seconds of frames: the pipeline may run that far ahead of the clock.
        let (tx, rx) = std::sync::mpsc::sync_channel(2 * self.talk.fps as usize);
        self.units = Some(tx);
        Feed {
            units: rx,
            current_turn: Arc::clone(&self.current_turn),
            idle_index: Arc::clone(&self.idle_index),
            events: clock_events,
        }
    }

    /// The media clock went away (the peer is being replaced): stop any answer, and take no new
    /// one until [`Conversation::feed`] attaches the next clock.
    pub fn detach(&mut self) {
        self.interrupt();
        self.units = None;
    }

    /// Whether a media clock is attached.
    pub fn ready(&self) -> bool {
        self.units.is_some()
    }

    /// The current turn (0: none). Non-zero while an answer is being written or spoken: voice
    /// input then applies its barge-in guard.
    pub fn current_turn(&self) -> Arc<AtomicU64> {
        Arc::clone(&self.current_turn)
    }

    /// Recognise an utterance (16 kHz mono); the result comes back as a
    /// [`TalkEvent::Transcript`] or [`TalkEvent::TranscriptFailed`]. Recognitions run in order
    /// of arrival, each bounded by `talk.asr.timeout_ms`; dropping the conversation ends them.
    pub fn transcribe(&mut self, pcm: Vec<f32>) {
        let asr = Arc::clone(&self.talk.asr);
        let language = self.talk.backends(&self.avatar_id).language.clone();
        let events = self.events.clone();
        let cancel = self.hearing.child_token();
        let previous = self.transcribing.take();
        self.transcribing = Some(tokio::spawn(async move {
            if let Some(previous) = previous {
                let _ = previous.await;
            }
            let started = std::time::Instant::now();
            let result = tokio::select! {
                _ = cancel.cancelled() => return,
                r = asr.transcribe(&pcm, language.as_deref()) => r,
            };
            metrics::histogram!("worker_asr_seconds").record(started.elapsed().as_secs_f64());
            let _ = events.send(match result {
                Ok(text) => TalkEvent::Transcript { text },
                Err(e) => TalkEvent::TranscriptFailed { message: e.to_string() },
            });
        }));
    }

    /// Stop the current answer, if any. The clock ends its speech at the next tick.
    pub fn interrupt(&mut self) {
        self.current_turn.store(0, Ordering::Release);
        if let Some(cancel) = self.active.take() {
            cancel.cancel();
        }
    }

    /// Record a finished exchange (for the next turns' context).
    pub fn remember(&mut self, user: String, answer: String) {
        if self.talk.history == 0 {
            return;
        }
        self.history.push(ChatMessage {
            role: Role::User,
            content: user,
        });
        self.history.push(ChatMessage {
            role: Role::Assistant,
            content: answer,
        });
        let keep = self.talk.history * 2;
        if self.history.len() > keep {
            self.history.drain(..self.history.len() - keep);
        }
    }

    /// Start answering `text`, cancelling any answer in progress. Returns the turn number.
    pub fn say(&mut self, text: String) -> Option<u64> {
        let units = self.units.clone()?;
        self.interrupt();
        self.turns += 1;
        let turn = self.turns;
        self.current_turn.store(turn, Ordering::Release);
        let cancel = CancellationToken::new();
        self.active = Some(cancel.clone());
        let backends = self.talk.backends(&self.avatar_id);
        let mut messages = vec![ChatMessage {
            role: Role::System,
            content: backends.system_prompt.clone(),
        }];
        messages.extend(self.history.iter().cloned());
        messages.push(ChatMessage {
            role: Role::User,
            content: text.clone(),
        });
        let run = Turn {
            turn,
            talk: Arc::clone(&self.talk),
            avatar_id: self.avatar_id.clone(),
            clip: Arc::clone(&self.clip),
            units,
            current_turn: Arc::clone(&self.current_turn),
            idle_index: Arc::clone(&self.idle_index),
            events: self.events.clone(),
        };
        let span = tracing::info_span!("turn", turn);
        tokio::spawn(
            async move {
                // Cancelling drops the stages: HTTP requests end, espeak-ng is killed.
                tokio::select! {
                    _ = cancel.cancelled() => info!("answer interrupted"),
                    result = run.run(messages, text) => if let Err(e) = result {
                        warn!(error = %e, "answer failed");
                    },
                }
            }
            .instrument(span),
        );
        Some(turn)
    }
}

impl Drop for Conversation {
    fn drop(&mut self) {
        self.interrupt();
        self.hearing.cancel();
    }
}

/// 16 kHz (features) and 48 kHz (Opus) versions of one sentence.
struct AudioChunk {
    pcm16: Vec<f32>,
    pcm48: Vec<f32>,
}

struct Turn {
    turn: u64,
    talk: Arc<Talk>,
    avatar_id: String,
    clip: Arc<AvatarClip>,
    units: std::sync::mpsc::SyncSender<TalkUnit>,
    current_turn: Arc<AtomicU64>,
    idle_index: Arc<AtomicUsize>,
    events: mpsc::UnboundedSender<TalkEvent>,
}

impl Turn {
    fn is_current(&self) -> bool {
        self.current_turn.load(Ordering::Acquire) == self.turn
    }

    async fn run(&self, messages: Vec<ChatMessage>, user: String) -> Result<(), TalkError> {
        let result = self.pipeline(&messages, &user).await;
        if let Err(e) = &result {
            if self.is_current() {
                // Drop whatever is queued and return to idle before the browser hears of it.
                let _ = self
                    .current_turn
                    .compare_exchange(self.turn, 0, Ordering::AcqRel, Ordering::Acquire);
                let _ = self.events.send(TalkEvent::Failed {
                    turn: self.turn,
                    message: e.to_string(),
                });
            }
        }
        result
    }

    async fn pipeline(&self, messages: &[ChatMessage], user: &str) -> Result<(), TalkError> {
        let backends = self.talk.backends(&self.avatar_id);
        let (text_tx, mut text_rx) = mpsc::channel::<String>(64);
        let (sentence_tx, mut sentence_rx) = mpsc::channel::<String>(16);
        let (audio_tx, audio_rx) = mpsc::channel::<AudioChunk>(4);

        // The lip-sync thread: ends when the audio channel closes or the turn stops being current.
        let producer = {
            let p = Producer {
                turn: self.turn,
                talk: Arc::clone(&self.talk),
                clip: Arc::clone(&self.clip),
                units: self.units.clone(),
                current_turn: Arc::clone(&self.current_turn),
                idle_index: Arc::clone(&self.idle_index),
            };
            let span = tracing::Span::current();
            tokio::task::spawn_blocking(move || {
                let _e = span.enter();
                p.run(audio_rx)
            })
        };

        let llm = backends.llm.stream(messages, text_tx);
        let text = async {
            let mut chunker = sentences::SentenceChunker::new();
            let mut answer = String::new();
            while let Some(delta) = text_rx.recv().await {
                answer.push_str(&delta);
                let _ = self.events.send(TalkEvent::Text {
                    turn: self.turn,
                    text: delta.clone(),
                });
                for s in chunker.push(&delta) {
                    debug!(sentence = %s, "sentence");
                    if sentence_tx.send(s).await.is_err() {
                        break;
                    }
                }
            }
            if let Some(s) = chunker.finish() {
                let _ = sentence_tx.send(s).await;
            }
            drop(sentence_tx);
            Ok::<_, TalkError>(answer)
        };
        let speech = async {
            while let Some(sentence) = sentence_rx.recv().await {
                let voice = match &backends.voice {
                    Some(v) => v.as_str(),
                    None if backends.openai_voices => "alloy",
                    // Mandarin read as pinyin: the `cmn` voice reads its pinyin as English.
                    None if sentences::is_chinese(&sentence) => "cmn-latn-pinyin",
                    None => "en-us",
                };
                let pcm = backends.tts.synthesize(&sentence, voice).await?;
                let chunk = tokio::task::spawn_blocking(move || -> Result<AudioChunk, TalkError> {
                    Ok(AudioChunk {
                        pcm16: audio::resample(&pcm, mel::SAMPLE_RATE)?,
                        pcm48: audio::resample(&pcm, AUDIO_RATE)?,
                    })
                })
                .await
                .map_err(|e| TalkError::Tts(format!("resampling task: {e}")))??;
                if audio_tx.send(chunk).await.is_err() {
                    break; // the lip-sync thread ended (turn no longer current)
                }
            }
            drop(audio_tx);
            Ok::<_, TalkError>(())
        };
        let (_, answer, _) = tokio::try_join!(llm, text, speech)?;
        let rendered = producer
            .await
            .map_err(|e| TalkError::LipSync(lipsync::LipSyncError::Inference(format!("lip-sync thread: {e}"))))?;
        let _ = self.events.send(TalkEvent::Done {
            turn: self.turn,
            user: user.to_owned(),
            answer,
        });
        rendered
    }
}

/// The lip-sync side of a turn, on a blocking thread.
struct Producer {
    turn: u64,
    talk: Arc<Talk>,
    clip: Arc<AvatarClip>,
    units: std::sync::mpsc::SyncSender<TalkUnit>,
    current_turn: Arc<AtomicU64>,
    idle_index: Arc<AtomicUsize>,
}

impl Producer {
    fn is_current(&self) -> bool {
        self.current_turn.load(Ordering::Acquire) == self.turn
    }

    fn run(self, mut audio: mpsc::Receiver<AudioChunk>) -> Result<(), TalkError> {
        let fps = self.talk.fps;
        let first =
            self.clip.frames.first().ok_or_else(|| {
                TalkError::LipSync(lipsync::LipSyncError::Inference("the avatar has no frames".into()))
            })?;
        let (width, height) = (first.width, first.height);
        // Each idle picture's own face box: the crop and the paste follow a head that moves.
        let region = |idle_index: usize| face::crop_region(self.clip.face_box(idle_index), width, height);
        let per_frame16 = mel::SAMPLE_RATE as usize / fps as usize;
        let audio_end = |i: usize| ((i as u64 + 1) * AUDIO_RATE as u64 / fps as u64) as usize;
        let audio_start = |i: usize| (i as u64 * AUDIO_RATE as u64 / fps as u64) as usize;
        let mut stream = mel::MelStream::new();
        let mut cols = Vec::new();
        let mut pcm48: Vec<f32> = Vec::new();
        let mut next = 0usize;
        let mut base: Option<usize> = None;
        loop {
            let chunk = audio.blocking_recv();
            let done = chunk.is_none();
            match chunk {
                Some(c) => {
                    cols.extend(stream.push(&c.pcm16));
                    pcm48.extend_from_slice(&c.pcm48);
                }
                None => cols.extend(stream.finish()),
            }
            if !self.is_current() {
                return Ok(());
            }
            // Talking frames are drawn from the idle frames the clock will be at when they play:
            // where it is now, plus the prebuffer and the time to render it.
            let base = *base.get_or_insert_with(|| self.idle_index.load(Ordering::Acquire) + PREBUFFER + 2);
            let total = stream.samples().div_ceil(per_frame16);
            let ready = if done {
                total
            } else {
                (0..total)
                    .take_while(|&i| {
                        mel::window_start(i, fps) + mel::WINDOW <= cols.len() && audio_end(i) <= pcm48.len()
                    })
                    .count()
            };
            while next < ready {
                let n = self.talk.session_batch.min(ready - next);
                let frames: Vec<usize> = (next..next + n).collect();
                let inputs = frames
                    .iter()
                    .map(|&i| FrameInput {
                        mel: mel::frame_window(&cols, i, fps),
                        face: face::crop(self.clip.frame(base + i), region(base + i)),
                    })
                    .collect();
                let faces = self.talk.lipsync.infer(inputs)?;
                for (&i, face_out) in frames.iter().zip(faces) {
                    let idle_index = base + i;
                    let mut frame = self.clip.frame(idle_index).clone();
                    face::paste(&mut frame, region(idle_index), &face_out, self.talk.feather);
                    let (a0, a1) = (audio_start(i), audio_end(i));
                    let mut samples = pcm48.get(a0..a1.min(pcm48.len())).unwrap_or_default().to_vec();
                    samples.resize(a1 - a0, 0.0);
                    let unit = TalkUnit {
                        turn: self.turn,
                        frame,
                        idle_index,
                        audio: samples,
                        last: done && i + 1 == total,
                    };
                    if !self.is_current() || self.units.send(unit).is_err() {
                        return Ok(()); // interrupted, or the clock is gone
                    }
                }
                next += n;
            }
            if done {
                return Ok(());
            }
        }
    }
}

/// A conversation with no session, peer or clock: the test reads the events and the talking
/// frames the clock would play. The scripted language model and the built-in lip-sync run
/// in-process; speech is espeak-ng (installed by scripts/install-deps).
#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::avatar::synthetic;

    const WAIT: Duration = Duration::from_secs(10);

    fn conversation(history: usize) -> (Conversation, mpsc::UnboundedReceiver<TalkEvent>) {
        let cfg = TalkConfig {
            history,
            ..TalkConfig::default()
        };
        let talk = Arc::new(Talk::new(&cfg, 25).expect("talking pipeline"));
        let (events_tx, events) = mpsc::unbounded_channel();
        let clip = Arc::new(synthetic(256, 256, 25));
        (Conversation::new(talk, clip, "tutor".into(), events_tx), events)
    }

    async fn next(events: &mut mpsc::UnboundedReceiver<TalkEvent>) -> TalkEvent {
        tokio::time::timeout(WAIT, events.recv())
            .await
            .expect("an event within 10 s")
            .expect("the conversation is alive")
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_question_streams_its_answer_and_feeds_a_whole_turn_of_talking_frames() {
        let (mut conv, mut events) = conversation(6);
        assert_eq!(
            conv.say("hello".into()),
            None,
            "no clock attached: nothing to play it on"
        );
        let (clock_tx, _clock_rx) = mpsc::unbounded_channel();
        let feed = conv.feed(clock_tx);
        assert!(conv.ready());
        assert_eq!(conv.say("Hello, who are you?".into()), Some(1));
        // The clock's side, read as it plays (the pipeline runs at most 2 s ahead of it): frames
        // of turn 1 with their audio, up to the one marked last.
        let clock = tokio::task::spawn_blocking(move || {
            let (mut frames, mut samples) = (0usize, 0usize);
            loop {
                let unit = feed.units.recv_timeout(WAIT).expect("talking frames");
                assert_eq!(unit.turn, 1);
                frames += 1;
                samples += unit.audio.len();
                if unit.last {
                    return (frames, samples);
                }
            }
        });

        let mut deltas = String::new();
        let (user, answer) = loop {
            match next(&mut events).await {
                TalkEvent::Text { turn, text } => {
                    assert_eq!(turn, 1);
                    deltas.push_str(&text);
                }
                TalkEvent::Done { turn, user, answer } => {
                    assert_eq!(turn, 1);
                    break (user, answer);
                }
                other => panic!("the turn failed: {other:?}"),
            }
        };
        assert_eq!(user, "Hello, who are you?");
        assert!(!answer.is_empty());
        assert!(
            deltas.split_whitespace().eq(answer.split_whitespace()),
            "the deltas make the answer: {deltas:?} vs {answer:?}"
        );

        let (frames, samples) = clock.await.expect("the clock's reader");
        assert!(frames >= 10, "{frames} talking frames");
        let per_frame = AUDIO_RATE as usize / 25;
        assert!(
            samples.abs_diff(frames * per_frame) <= per_frame,
            "one frame's worth of audio per frame: {samples} samples for {frames} frames"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn an_interrupt_ends_the_turn_and_the_next_question_is_a_new_turn() {
        let (mut conv, mut events) = conversation(6);
        let (clock_tx, _clock_rx) = mpsc::unbounded_channel();
        let Feed {
            units, current_turn, ..
        } = conv.feed(clock_tx);
        // A clock that plays whatever comes, so nothing but the interrupt can hold the turn back.
        std::thread::spawn(move || while units.recv_timeout(Duration::from_secs(3)).is_ok() {});
        assert_eq!(conv.say("Tell me a long story about France.".into()), Some(1));
        assert!(matches!(next(&mut events).await, TalkEvent::Text { turn: 1, .. }));
        conv.interrupt();
        assert_eq!(
            current_turn.load(Ordering::Acquire),
            0,
            "the clock drops turn 1's frames"
        );
        // Turn 1 never completes.
        let late = tokio::time::timeout(Duration::from_millis(1500), async {
            loop {
                if let Some(TalkEvent::Done { turn: 1, .. }) = events.recv().await {
                    return;
                }
            }
        })
        .await;
        assert!(late.is_err(), "an interrupted turn reported Done");
        assert_eq!(conv.say("Are you there?".into()), Some(2));
        assert_eq!(current_turn.load(Ordering::Acquire), 2);
        // Detached (the peer is being replaced): no clock, no answers.
        conv.detach();
        assert!(!conv.ready());
        assert_eq!(conv.say("hello".into()), None);
    }

    #[tokio::test]
    async fn history_keeps_the_last_exchanges_and_none_when_off() {
        let (mut conv, _events) = conversation(2);
        for i in 0..5 {
            conv.remember(format!("q{i}"), format!("a{i}"));
        }
        let kept: Vec<&str> = conv.history.iter().map(|m| m.content.as_str()).collect();
        assert_eq!(kept, ["q3", "a3", "q4", "a4"]);
        let (mut conv, _events) = conversation(0);
        conv.remember("q".into(), "a".into());
        assert!(conv.history.is_empty());
    }
}
