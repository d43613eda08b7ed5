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
//! The session API's audio joins them too: the backend's own speech ([`AudioIn`]) goes straight
//! to the lip-sync thread as it arrives, resampled on the way, with no model and no synthesis.
//!
//! Voice input joins the same turns: the microphone's audio goes through voice activity detection
//! ([`vad`], on a thread per peer: [`hearing`]), the utterance so far, its pauses and the whole
//! utterance through speech recognition ([`asr`], [`Conversation::transcribe`], one request at a
//! time per session, partials only when nothing is more urgent: [`Queue`]), and the final
//! transcript is then said like a `text_webrtc`.
//!
//! What a browser may spend is bounded before anything is sent ([`limits`]): a turn rate and a
//! message length per session, a byte budget for the history, at most [`MAX_WAITING_JOBS`]
//! recognitions waiting per session, and a cap on requests in flight to each backend for the
//! whole worker.
//!
//! Worker-wide parts live in [`Talk`] (backends per avatar, the lip-sync runners, the backend
//! slots); each session has a [`Conversation`] (history, turn rate, the current turn, the
//! clock's feed).

pub mod asr;
pub mod audio;
pub mod face;
pub mod hearing;
pub mod limits;
pub mod lipsync;
pub mod llm;
pub mod mel;
pub mod sentences;
pub mod tts;
pub mod turn_end;
pub mod vad;

use crate::config::{
    AsrConfig, ExecutionProvider, LlmBackend, LlmConfig, TalkConfig, TalkLimits, TtsBackend, TtsConfig, VadConfig,
};
use crate::dialogue::Job;
use crate::media::avatar::AvatarClip;
use crate::media::stream::{ClockEvent, Feed, TalkUnit, AUDIO_RATE, PREBUFFER};
use avatar_proto::api::SayMode;
use limits::{Backend, Refusal, Slots, TurnLimiter};
use lipsync::{FrameInput, LipSyncService};
use llm::{ChatMessage, Llm, Role};
use std::collections::{HashMap, VecDeque};
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
    /// Every request slot of this backend stayed taken for `talk.limits.slot_wait_ms`.
    #[error("the {0} is busy: every request slot of this worker stayed taken (talk.limits)")]
    Busy(&'static str),
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
    /// What one session may spend; [`Talk::slots`] shares the backends among sessions.
    pub limits: TalkLimits,
    pub slots: Slots,
    session_batch: usize,
    feather: u32,
    /// Voice input: speech recognition, and the voice activity settings (`vad.model` unset: off).
    pub asr: Arc<dyn asr::Asr>,
    /// Recognitions of a pause or a whole utterance running now, in every session: partial
    /// transcripts wait while any does.
    urgent_recognitions: AtomicUsize,
    /// One partial transcript at a time in the whole worker.
    partial_slot: tokio::sync::Semaphore,
    pub vad: VadConfig,
    /// `talk.asr.partial_ms`.
    partial_ms: u64,
    /// Whether speech recognition answered at its last check ([`Talk::watch_hearing`]).
    recogniser_up: std::sync::atomic::AtomicBool,
    /// The ONNX Runtime library (the VAD model runs on it too).
    pub onnxruntime: std::path::PathBuf,
}

/// The HTTP client every backend shares (and `worker --self-test` calls them with).
pub(crate) fn http_client() -> Result<reqwest::Client, TalkError> {
    reqwest::Client::builder()
        .connect_timeout(Duration::from_secs(5))
        .user_agent(concat!("avatar-edge/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| TalkError::Client(e.to_string()))
}

/// The backends as the pipeline builds them from their config (the self-test checks these very ones).
pub(crate) fn make_llm(cfg: &LlmConfig, client: &reqwest::Client) -> Arc<dyn Llm> {
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

pub(crate) fn make_asr(cfg: &AsrConfig, client: &reqwest::Client) -> Arc<dyn asr::Asr> {
    Arc::new(asr::OpenAiAsr {
        client: client.clone(),
        base_url: cfg.base_url.clone(),
        model: cfg.model.clone(),
        api_key: cfg.key(),
        prompt: cfg.prompt.clone(),
        timeout: Duration::from_millis(cfg.timeout_ms.max(1)),
    })
}

pub(crate) fn make_tts(cfg: &TtsConfig, client: &reqwest::Client) -> Arc<dyn Tts> {
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
            limits: cfg.limits.clone(),
            slots: Slots::new(&cfg.limits),
            session_batch: lcfg.session_batch,
            feather: lcfg.feather_px,
            asr: make_asr(&cfg.asr, &client),
            urgent_recognitions: AtomicUsize::new(0),
            partial_slot: tokio::sync::Semaphore::new(1),
            vad: cfg.vad.clone(),
            partial_ms: cfg.asr.partial_ms,
            recogniser_up: std::sync::atomic::AtomicBool::new(true),
            onnxruntime: lcfg.onnxruntime.clone(),
        })
    }

    /// How often a speaking user's utterance so far is recognised (0: never).
    pub fn partial_ms(&self) -> u64 {
        self.partial_ms
    }

    fn backends(&self, avatar_id: &str) -> &Backends {
        self.per_avatar.get(avatar_id).unwrap_or(&self.default)
    }

    /// Whether sessions can take voice input now: a VAD model is configured and speech
    /// recognition answered at its last check. Pages hide their microphone button when not
    /// (`features` event), instead of failing each attempt.
    pub fn hears(&self) -> bool {
        self.vad.model.is_some() && self.recogniser_up.load(Ordering::Relaxed)
    }

    /// With voice input configured, check that speech recognition answers, and log what
    /// changed (`first`: the worker's start, which always says).
    pub async fn check_hearing(&self, first: bool) {
        if self.vad.model.is_none() {
            return;
        }
        let up = self.asr.reachable().await;
        let was = self.recogniser_up.swap(up.is_ok(), Ordering::Relaxed);
        match up {
            Ok(()) if first || !was => info!(asr = %self.asr.name(), "speech recognition answers: voice input is on"),
            Err(e) if first || was => warn!(
                asr = %self.asr.name(),
                error = %e,
                "speech recognition cannot be reached: voice input is off (pages hide Talk) until it answers"
            ),
            _ => {}
        }
    }

    /// [`Talk::check_hearing`] every [`HEARING_CHECK_EVERY`] until `stop`.
    pub async fn watch_hearing(self: Arc<Self>, stop: CancellationToken) {
        if self.vad.model.is_none() {
            return;
        }
        loop {
            tokio::select! {
                _ = tokio::time::sleep(HEARING_CHECK_EVERY) => self.check_hearing(false).await,
                _ = stop.cancelled() => return,
            }
        }
    }
}

/// How often a worker with voice input checks that speech recognition answers.
pub const HEARING_CHECK_EVERY: Duration = Duration::from_secs(30);

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
    /// The turn's work is done (speech may still be playing). `user` is the message it answered
    /// (`None` for a text spoken as given, or audio); `answer` its text (`None` for audio);
    /// `spoken` whether anything went to the clock (a turn of no sound has no speech to end).
    Done {
        turn: u64,
        user: Option<String>,
        answer: Option<String>,
        spoken: bool,
    },
    Failed {
        turn: u64,
        message: String,
    },
    /// Speech recognition heard the audio of `job` as `text` (possibly empty: a noise).
    Transcript {
        job: Job,
        text: String,
    },
    /// Speech recognition failed for `job`'s audio.
    TranscriptFailed {
        job: Job,
        message: String,
    },
}

/// Speech of the backend's own, arriving in pieces: mono samples in [−1, 1] at `rate`. The
/// sender ends the audio by dropping its side.
pub struct AudioIn {
    pub rate: u32,
    pub pieces: mpsc::Receiver<Vec<f32>>,
    /// The sending side, while the upload goes on (the session allows one at a time).
    pub upload: mpsc::WeakSender<Vec<f32>>,
}

impl std::fmt::Debug for AudioIn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AudioIn")
            .field("rate", &self.rate)
            .finish_non_exhaustive()
    }
}

/// What a turn says.
enum What {
    /// Text: answered by the language model (`Chat`) or spoken as given (`Repeat`).
    Text(String, SayMode),
    Audio(AudioIn),
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
    /// This session's turn rate.
    limiter: TurnLimiter,
    /// Cancels speech recognition when the conversation ends.
    hearing: CancellationToken,
    /// The audio waiting for recognition ([`Queue`]).
    waiting: Arc<std::sync::Mutex<Queue>>,
    /// Wakes the recognition task (started with the first utterance).
    wake: Option<Arc<tokio::sync::Notify>>,
}

impl Conversation {
    pub fn new(
        talk: Arc<Talk>,
        clip: Arc<AvatarClip>,
        avatar_id: String,
        events: mpsc::UnboundedSender<TalkEvent>,
    ) -> Self {
        let limiter = TurnLimiter::new(
            talk.limits.turns_per_minute,
            talk.limits.turn_burst,
            std::time::Instant::now(),
        );
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
            limiter,
            hearing: CancellationToken::new(),
            waiting: Arc::default(),
            wake: None,
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

    /// Recognise `job`'s audio (16 kHz mono); the result comes back as a
    /// [`TalkEvent::Transcript`] or [`TalkEvent::TranscriptFailed`] for that job. One recognition
    /// runs at a time, bounded by `talk.asr.timeout_ms` and a speech-recognition slot; what waits
    /// for it follows [`Queue::push`]: a partial only when nothing else waits, the rest in order,
    /// and a job the queue has no room for fails at once. Dropping the conversation ends them.
    pub fn transcribe(&mut self, job: Job, pcm: Vec<f32>) {
        let queued = self
            .waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .push(job, pcm);
        if !queued {
            metrics::counter!("worker_recognitions_refused_total").increment(1);
            let _ = self.events.send(TalkEvent::TranscriptFailed {
                job,
                message: format!("speech recognition is {MAX_WAITING_JOBS} requests behind"),
            });
            return;
        }
        let wake = match &self.wake {
            Some(wake) => Arc::clone(wake),
            None => {
                let wake = Arc::new(tokio::sync::Notify::new());
                let recognizer = Recognizer {
                    talk: Arc::clone(&self.talk),
                    language: self.talk.backends(&self.avatar_id).language.clone(),
                    events: self.events.clone(),
                    waiting: Arc::clone(&self.waiting),
                    wake: Arc::clone(&wake),
                    cancel: self.hearing.child_token(),
                };
                // Ends when the conversation does (its `hearing` token).
                tokio::spawn(recognizer.run().instrument(tracing::Span::current()));
                self.wake = Some(Arc::clone(&wake));
                wake
            }
        };
        wake.notify_one();
    }

    /// Drop `job` if it waits for recognition and has not started (the user spoke on after a
    /// pause).
    pub fn forget(&mut self, job: Job) {
        self.waiting
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .forget(job);
    }

    /// Stop the current answer, if any. The clock ends its speech at the next tick.
    pub fn interrupt(&mut self) {
        self.current_turn.store(0, Ordering::Release);
        if let Some(cancel) = self.active.take() {
            cancel.cancel();
        }
    }

    /// Record a finished exchange (for the next turns' context), keeping at most `talk.history`
    /// exchanges and `talk.limits.history_bytes` bytes of them.
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
        limits::trim_history(&mut self.history, self.talk.history, self.talk.limits.history_bytes);
    }

    /// Start answering `text` (typed, or a transcript), cancelling any answer in progress, and
    /// return the turn number; or refuse it ([`limits`]: too long, over the turn rate, or no
    /// clock to play it on). A refused message changes nothing: the answer in progress goes on.
    pub fn say(&mut self, text: String) -> Result<u64, Refusal> {
        limits::check_length(&text, self.talk.limits.max_message_chars)?;
        self.units.as_ref().ok_or(Refusal::NotReady)?;
        self.limiter.check(std::time::Instant::now())?;
        self.start(None, What::Text(text, SayMode::Chat))
    }

    /// Take the next turn number for a turn that starts later ([`Conversation::speak`]).
    pub fn reserve_turn(&mut self) -> u64 {
        self.turns += 1;
        self.turns
    }

    /// The session API's say (the operator's backend: trusted, so neither the browser's turn
    /// rate nor its message length applies; the relay checks its own limits): `Repeat` speaks
    /// `text` as given with no language model, `Chat` answers it as the user's message. As turn
    /// `turn` if one was reserved, else the next; cancels any answer in progress.
    pub fn speak(&mut self, turn: Option<u64>, text: String, mode: SayMode) -> Result<u64, Refusal> {
        self.units.as_ref().ok_or(Refusal::NotReady)?;
        self.start(turn, What::Text(text, mode))
    }

    /// The session API's audio: lip-sync `audio` and play it as it arrives, as turn `turn` if
    /// one was reserved, else the next; cancels any answer in progress.
    pub fn play(&mut self, turn: Option<u64>, audio: AudioIn) -> Result<u64, Refusal> {
        self.units.as_ref().ok_or(Refusal::NotReady)?;
        self.start(turn, What::Audio(audio))
    }

    fn start(&mut self, turn: Option<u64>, what: What) -> Result<u64, Refusal> {
        let units = self.units.clone().ok_or(Refusal::NotReady)?;
        self.interrupt();
        let turn = match turn {
            Some(t) => t,
            None => self.reserve_turn(),
        };
        self.current_turn.store(turn, Ordering::Release);
        let cancel = CancellationToken::new();
        self.active = Some(cancel.clone());
        let messages = match &what {
            What::Text(text, SayMode::Chat) => {
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
                messages
            }
            What::Text(_, SayMode::Repeat) | What::Audio(_) => Vec::new(),
        };
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
                // Cancelling drops the stages: HTTP requests end, espeak-ng is killed, a wait for
                // a backend slot ends. Cancellation is looked at first: a turn cancelled just as
                // a slot came free must not start its request.
                tokio::select! {
                    biased;
                    _ = cancel.cancelled() => info!("answer interrupted"),
                    result = run.run(messages, what) => if let Err(e) = result {
                        warn!(error = %e, "answer failed");
                    },
                }
            }
            .instrument(span),
        );
        Ok(turn)
    }
}

/// Recognitions that may wait in one conversation; past this a new one fails at once.
pub const MAX_WAITING_JOBS: usize = 6;

/// What waits for a conversation's recogniser, and whether it is busy.
///
/// A partial transcript is worth having only while it is fresh and cheap: it is queued only
/// when nothing else waits or runs, runs only while no session's recognition of a pause or a
/// whole utterance runs ([`Talk::urgent_recognitions`]), and a newer job drops it. Pauses and
/// whole utterances are never dropped for a newer one: they wait in order (a pause the user
/// spoke on after is taken out by [`Queue::forget`]), at most [`MAX_WAITING_JOBS`].
#[derive(Debug, Default)]
pub struct Queue {
    jobs: VecDeque<(Job, Vec<f32>)>,
    running: bool,
}

impl Queue {
    /// Queue `job`; `false` when a pause or an utterance finds [`MAX_WAITING_JOBS`] waiting
    /// (the caller reports it). A partial while anything waits or runs is skipped quietly.
    pub fn push(&mut self, job: Job, pcm: Vec<f32>) -> bool {
        if let Job::Partial(_) = job {
            if self.jobs.is_empty() && !self.running {
                self.jobs.push_back((job, pcm));
            }
            return true;
        }
        self.jobs.retain(|(j, _)| !matches!(j, Job::Partial(_)));
        if self.jobs.len() >= MAX_WAITING_JOBS {
            return false;
        }
        self.jobs.push_back((job, pcm));
        true
    }

    /// Take `job` out if it waits.
    pub fn forget(&mut self, job: Job) {
        self.jobs.retain(|(j, _)| *j != job);
    }

    fn pop(&mut self) -> Option<(Job, Vec<f32>)> {
        let next = self.jobs.pop_front();
        self.running = next.is_some();
        next
    }
}

/// A conversation's speech recognition: takes the waiting audio, recognises it in a slot of the
/// worker's, reports the transcript, and waits for the next.
struct Recognizer {
    talk: Arc<Talk>,
    language: Option<String>,
    events: mpsc::UnboundedSender<TalkEvent>,
    waiting: Arc<std::sync::Mutex<Queue>>,
    wake: Arc<tokio::sync::Notify>,
    cancel: CancellationToken,
}

/// Counts a recognition that must not wait behind partials, while it lives.
struct Urgent<'a>(&'a AtomicUsize);

impl<'a> Urgent<'a> {
    fn new(count: &'a AtomicUsize) -> Self {
        count.fetch_add(1, Ordering::AcqRel);
        Self(count)
    }
}

impl Drop for Urgent<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Recognizer {
    async fn run(self) {
        loop {
            tokio::select! {
                _ = self.cancel.cancelled() => return,
                _ = self.wake.notified() => {}
            }
            loop {
                let next = self
                    .waiting
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .pop();
                let Some((job, pcm)) = next else { break };
                let result = tokio::select! {
                    biased;
                    _ = self.cancel.cancelled() => return,
                    r = self.recognise(job, &pcm) => r,
                };
                let event = match result {
                    Some(Ok(text)) => TalkEvent::Transcript { job, text },
                    Some(Err(e)) => TalkEvent::TranscriptFailed {
                        job,
                        message: e.to_string(),
                    },
                    None => continue, // a partial skipped: the recogniser has better things to do
                };
                let _ = self.events.send(event);
            }
        }
    }

    /// `None`: a partial that was not worth running now.
    async fn recognise(&self, job: Job, pcm: &[f32]) -> Option<Result<String, TalkError>> {
        let talk = &self.talk;
        let (_urgent, _partial, urgency, kind) = match job {
            Job::Partial(_) => {
                if talk.urgent_recognitions.load(Ordering::Acquire) > 0 {
                    return None;
                }
                let permit = talk.partial_slot.try_acquire().ok()?;
                (None, Some(permit), asr::Urgency::Idle, "partial")
            }
            Job::Pause(_) | Job::Final(_) => {
                let urgent = Urgent::new(&talk.urgent_recognitions);
                let kind = if matches!(job, Job::Pause(_)) { "pause" } else { "final" };
                (Some(urgent), None, asr::Urgency::Now, kind)
            }
        };
        let work = async {
            let _slot = talk.slots.acquire(Backend::Asr).await?;
            let started = std::time::Instant::now();
            let text = talk.asr.transcribe(pcm, self.language.as_deref(), urgency).await;
            metrics::histogram!("worker_asr_seconds", "job" => kind).record(started.elapsed().as_secs_f64());
            text
        };
        Some(work.await)
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

    async fn run(&self, messages: Vec<ChatMessage>, what: What) -> Result<(), TalkError> {
        let result = match what {
            What::Text(text, mode) => self.pipeline(&messages, &text, mode).await,
            What::Audio(audio) => self.play(audio).await,
        };
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

    /// Start the lip-sync thread: it ends when the audio channel closes or the turn stops being
    /// current, and says whether it sent the clock anything.
    fn lip_sync(
        &self,
    ) -> (
        mpsc::Sender<AudioChunk>,
        tokio::task::JoinHandle<Result<bool, TalkError>>,
    ) {
        let (audio_tx, audio_rx) = mpsc::channel::<AudioChunk>(4);
        let p = Producer {
            turn: self.turn,
            talk: Arc::clone(&self.talk),
            clip: Arc::clone(&self.clip),
            units: self.units.clone(),
            current_turn: Arc::clone(&self.current_turn),
            idle_index: Arc::clone(&self.idle_index),
        };
        let span = tracing::Span::current();
        let producer = tokio::task::spawn_blocking(move || {
            let _e = span.enter();
            p.run(audio_rx)
        });
        (audio_tx, producer)
    }

    async fn finished(
        &self,
        producer: tokio::task::JoinHandle<Result<bool, TalkError>>,
        user: Option<String>,
        answer: Option<String>,
    ) -> Result<(), TalkError> {
        let spoken = producer
            .await
            .map_err(|e| TalkError::LipSync(lipsync::LipSyncError::Inference(format!("lip-sync thread: {e}"))))??;
        let _ = self.events.send(TalkEvent::Done {
            turn: self.turn,
            user,
            answer,
            spoken,
        });
        Ok(())
    }

    /// The backend's own audio: resampled as it arrives and lip-synced.
    async fn play(&self, mut audio: AudioIn) -> Result<(), TalkError> {
        let (audio_tx, producer) = self.lip_sync();
        let feed = async {
            let resampling = |e: audio::AudioError| TalkError::Tts(format!("the uploaded audio: {e}"));
            let mut to16 = audio::StreamResampler::new(audio.rate, mel::SAMPLE_RATE).map_err(resampling)?;
            let mut to48 = audio::StreamResampler::new(audio.rate, AUDIO_RATE).map_err(resampling)?;
            while let Some(piece) = audio.pieces.recv().await {
                let chunk = AudioChunk {
                    pcm16: to16.push(&piece).map_err(resampling)?,
                    pcm48: to48.push(&piece).map_err(resampling)?,
                };
                if audio_tx.send(chunk).await.is_err() {
                    return Ok(()); // the lip-sync thread ended (turn no longer current)
                }
            }
            let last = AudioChunk {
                pcm16: to16.finish().map_err(resampling)?,
                pcm48: to48.finish().map_err(resampling)?,
            };
            let _ = audio_tx.send(last).await;
            Ok::<_, TalkError>(())
        };
        feed.await?;
        drop(audio_tx);
        self.finished(producer, None, None).await
    }

    async fn pipeline(&self, messages: &[ChatMessage], user: &str, mode: SayMode) -> Result<(), TalkError> {
        let backends = self.talk.backends(&self.avatar_id);
        let (text_tx, mut text_rx) = mpsc::channel::<String>(64);
        let (sentence_tx, mut sentence_rx) = mpsc::channel::<String>(16);
        let (audio_tx, producer) = self.lip_sync();

        // The request waits for a slot of the worker's; cancelling the turn drops the wait too.
        let llm = async {
            if mode == SayMode::Repeat {
                // The text is the answer: it goes to speech as a language model's would.
                let _ = text_tx.send(user.to_owned()).await;
                return Ok(());
            }
            let _slot = self.talk.slots.acquire(Backend::Llm).await?;
            backends.llm.stream(messages, text_tx).await
        };
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
                let pcm = {
                    let _slot = self.talk.slots.acquire(Backend::Tts).await?;
                    backends.tts.synthesize(&sentence, voice).await?
                };
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
        // A repeated text is not a user's message: nothing to remember as one.
        let user = (mode == SayMode::Chat).then(|| user.to_owned());
        self.finished(producer, user, Some(answer)).await
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

    /// Render the turn; whether anything went to the clock.
    fn run(self, mut audio: mpsc::Receiver<AudioChunk>) -> Result<bool, TalkError> {
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
        let mut sent = false;
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
                return Ok(sent);
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
                        return Ok(sent); // interrupted, or the clock is gone
                    }
                    sent = true;
                }
                next += n;
            }
            if done {
                return Ok(sent);
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
            Err(Refusal::NotReady),
            "no clock attached: nothing to play it on"
        );
        let (clock_tx, _clock_rx) = mpsc::unbounded_channel();
        let feed = conv.feed(clock_tx);
        assert!(conv.ready());
        assert_eq!(conv.say("Hello, who are you?".into()), Ok(1));
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
                TalkEvent::Done {
                    turn,
                    user,
                    answer,
                    spoken,
                } => {
                    assert_eq!(turn, 1);
                    assert!(spoken);
                    break (user, answer.expect("a text turn has an answer"));
                }
                other => panic!("the turn failed: {other:?}"),
            }
        };
        assert_eq!(user.as_deref(), Some("Hello, who are you?"));
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
        assert_eq!(conv.say("Tell me a long story about France.".into()), Ok(1));
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
        assert_eq!(conv.say("Are you there?".into()), Ok(2));
        assert_eq!(current_turn.load(Ordering::Acquire), 2);
        // Detached (the peer is being replaced): no clock, no answers.
        conv.detach();
        assert!(!conv.ready());
        assert_eq!(conv.say("hello".into()), Err(Refusal::NotReady));
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

    /// A stand-in language model: counts its requests and keeps their prompts, holds every
    /// answer while its gate is shut, and answers in three words.
    struct CountingLlm {
        prompts: std::sync::Mutex<Vec<Vec<ChatMessage>>>,
        running: AtomicUsize,
        most: AtomicUsize,
        gate: tokio::sync::watch::Receiver<bool>,
    }

    /// Counts down a running request however its future ends (answered or dropped).
    struct Running<'a>(&'a AtomicUsize);

    impl Drop for Running<'_> {
        fn drop(&mut self) {
            self.0.fetch_sub(1, Ordering::SeqCst);
        }
    }

    impl Llm for CountingLlm {
        fn name(&self) -> String {
            "counting stand-in".into()
        }

        fn stream<'a>(
            &'a self,
            messages: &'a [ChatMessage],
            out: mpsc::Sender<String>,
        ) -> futures::future::BoxFuture<'a, Result<(), TalkError>> {
            Box::pin(async move {
                self.prompts.lock().expect("lock").push(messages.to_vec());
                let now = self.running.fetch_add(1, Ordering::SeqCst) + 1;
                self.most.fetch_max(now, Ordering::SeqCst);
                let _running = Running(&self.running);
                let _ = self.gate.clone().wait_for(|open| *open).await;
                let _ = out.send("Fine, thank you.".into()).await;
                Ok(())
            })
        }
    }

    impl CountingLlm {
        fn prompts(&self) -> Vec<Vec<ChatMessage>> {
            self.prompts.lock().expect("lock").clone()
        }
    }

    /// A stand-in speech recogniser: keeps the length of each utterance it gets, holds while its
    /// gate is shut, and answers with that length.
    struct CountingAsr {
        heard: std::sync::Mutex<Vec<usize>>,
        gate: tokio::sync::watch::Receiver<bool>,
    }

    impl asr::Asr for CountingAsr {
        fn name(&self) -> String {
            "counting stand-in".into()
        }

        fn transcribe<'a>(
            &'a self,
            pcm: &'a [f32],
            _language: Option<&'a str>,
            _urgency: asr::Urgency,
        ) -> futures::future::BoxFuture<'a, Result<String, TalkError>> {
            Box::pin(async move {
                self.heard.lock().expect("lock").push(pcm.len());
                let _ = self.gate.clone().wait_for(|open| *open).await;
                Ok(format!("{} samples", pcm.len()))
            })
        }
    }

    /// Speech without espeak-ng: a fifth of a second of silence per sentence.
    struct SilentTts;

    impl Tts for SilentTts {
        fn name(&self) -> String {
            "silence".into()
        }

        fn synthesize<'a>(
            &'a self,
            _text: &'a str,
            _voice: &'a str,
        ) -> futures::future::BoxFuture<'a, Result<audio::Pcm, TalkError>> {
            Box::pin(async {
                Ok(audio::Pcm {
                    rate: 16_000,
                    samples: vec![0.0; 3_200],
                })
            })
        }
    }

    /// A worker's talking machinery with the stand-ins in place of its backends.
    struct StandIns {
        talk: Arc<Talk>,
        llm: Arc<CountingLlm>,
        asr: Arc<CountingAsr>,
        llm_gate: tokio::sync::watch::Sender<bool>,
        asr_gate: tokio::sync::watch::Sender<bool>,
    }

    fn stand_ins(limits: TalkLimits, history: usize, gates_open: bool) -> StandIns {
        let cfg = TalkConfig {
            history,
            limits,
            ..TalkConfig::default()
        };
        let mut talk = Talk::new(&cfg, 25).expect("talking pipeline");
        let (llm_gate, gate) = tokio::sync::watch::channel(gates_open);
        let llm = Arc::new(CountingLlm {
            prompts: Default::default(),
            running: AtomicUsize::new(0),
            most: AtomicUsize::new(0),
            gate,
        });
        let (asr_gate, gate) = tokio::sync::watch::channel(gates_open);
        let asr = Arc::new(CountingAsr {
            heard: Default::default(),
            gate,
        });
        talk.default.llm = Arc::clone(&llm) as Arc<dyn Llm>;
        talk.default.tts = Arc::new(SilentTts);
        talk.asr = Arc::clone(&asr) as Arc<dyn asr::Asr>;
        StandIns {
            talk: Arc::new(talk),
            llm,
            asr,
            llm_gate,
            asr_gate,
        }
    }

    /// A session's conversation with a clock attached that plays whatever comes.
    fn attached(talk: &Arc<Talk>) -> (Conversation, mpsc::UnboundedReceiver<TalkEvent>) {
        let (events_tx, events) = mpsc::unbounded_channel();
        let clip = Arc::new(synthetic(256, 256, 25));
        let mut conv = Conversation::new(Arc::clone(talk), clip, "tutor".into(), events_tx);
        let (clock_tx, _clock_rx) = mpsc::unbounded_channel();
        let units = conv.feed(clock_tx).units;
        std::thread::spawn(move || while units.recv().is_ok() {});
        (conv, events)
    }

    /// The `code` of the `error` event the browser gets for `refusal`.
    fn code_of(refusal: &Refusal) -> String {
        let event = serde_json::to_value(refusal.event()).expect("json");
        assert_eq!(event["type"], "error", "{event}");
        event["code"].as_str().expect("a code").to_owned()
    }

    async fn eventually(what: &str, mut ok: impl FnMut() -> bool) {
        let deadline = std::time::Instant::now() + WAIT;
        while !ok() {
            assert!(std::time::Instant::now() < deadline, "{what}: not within 10 s");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    /// Issue 26 (N3): one session sent 100 messages of 60 KB, one every 50 ms, and caused 100
    /// language-model requests and 6 MB of prompt in 5 s. The same burst now: the 60 KB messages
    /// are refused as too long, the rest get the burst and one turn a second, and every prompt
    /// is bounded by the system prompt, the history budget and one message.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_burst_of_messages_costs_no_more_model_requests_than_the_turn_rate_allows() {
        let limits = TalkLimits::default();
        let s = stand_ins(limits.clone(), 6, true);
        let (mut conv, mut events) = attached(&s.talk);
        let (huge, long) = ("a".repeat(60_000), "b".repeat(1_900));
        let (mut turns, mut refused) = (0usize, std::collections::BTreeMap::<String, usize>::new());
        let started = std::time::Instant::now();
        for i in 0..100 {
            let text = if i % 2 == 0 { huge.clone() } else { long.clone() };
            match conv.say(text) {
                Ok(_) => turns += 1,
                Err(refusal) => *refused.entry(code_of(&refusal)).or_default() += 1,
            }
            // As the session does: a finished exchange joins the history.
            while let Ok(ev) = events.try_recv() {
                if let TalkEvent::Done {
                    user: Some(user),
                    answer: Some(answer),
                    ..
                } = ev
                {
                    conv.remember(user, answer);
                }
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        let elapsed = started.elapsed();
        // Let the last turn reach the model.
        tokio::time::sleep(Duration::from_millis(300)).await;
        let prompts = s.llm.prompts();
        let bytes: Vec<usize> = prompts
            .iter()
            .map(|p| p.iter().map(limits::message_bytes).sum())
            .collect();
        let total: usize = bytes.iter().sum();
        eprintln!(
            "100 messages in {elapsed:?}: {turns} turns, {} model requests, {total} prompt bytes, refused {refused:?}",
            prompts.len()
        );
        let allowed = limits.turn_burst as usize + elapsed.as_secs() as usize * limits.turns_per_minute as usize / 60;
        assert_eq!(refused.get("message_too_long"), Some(&50), "every 60 KB message");
        assert!((3..=allowed).contains(&turns), "{turns} turns, {allowed} allowed");
        assert_eq!(refused.get("rate_limited"), Some(&(50 - turns)), "{refused:?}");
        assert_eq!(refused.values().sum::<usize>() + turns, 100, "{refused:?}");
        assert!(prompts.len() <= turns, "{} requests for {turns} turns", prompts.len());
        let system = s.talk.default.system_prompt.len();
        let most = system + limits.history_bytes + 4 * limits.max_message_chars;
        assert!(bytes.iter().all(|b| *b <= most), "{bytes:?} (at most {most} each)");
        assert!(total <= allowed * most && total < 200_000, "{total} prompt bytes");
        assert!(
            prompts.iter().all(|p| p[0].role == Role::System),
            "the system prompt leads every request"
        );
        // An interrupt is not a turn: it is never limited.
        conv.interrupt();
        assert_eq!(conv.current_turn().load(Ordering::Acquire), 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn the_history_budget_keeps_the_prompt_under_its_bytes_and_the_system_prompt_first() {
        let limits = TalkLimits {
            history_bytes: 1_000,
            ..TalkLimits::default()
        };
        let s = stand_ins(limits, 6, true);
        let (mut conv, mut events) = attached(&s.talk);
        // Six exchanges of about 600 bytes: one fits the budget.
        for i in 0..6 {
            conv.remember(
                format!("question {i} {}", "q".repeat(290)),
                format!("answer {i} {}", "a".repeat(290)),
            );
        }
        let turn = conv.say("And now?".into()).expect("a turn");
        loop {
            match next(&mut events).await {
                TalkEvent::Done { turn: t, .. } if t == turn => break,
                TalkEvent::Failed { message, .. } => panic!("the turn failed: {message}"),
                _ => {}
            }
        }
        let prompts = s.llm.prompts();
        assert_eq!(prompts.len(), 1);
        let prompt = &prompts[0];
        assert_eq!(prompt[0].role, Role::System);
        assert_eq!(prompt[0].content, s.talk.default.system_prompt);
        assert_eq!(prompt.last().map(|m| m.content.as_str()), Some("And now?"));
        let history = &prompt[1..prompt.len() - 1];
        let bytes: usize = history.iter().map(limits::message_bytes).sum();
        assert!(bytes <= 1_000, "{bytes} bytes of history");
        let kept: Vec<&str> = history.iter().map(|m| &m.content[..8]).collect();
        assert_eq!(kept, ["question", "answer 5"], "the newest exchange, whole");
        assert!(history[0].content.starts_with("question 5"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn requests_to_a_backend_are_capped_for_the_whole_worker_and_a_waiting_turn_leaves_with_its_interrupt() {
        let limits = TalkLimits {
            llm_requests: 2,
            ..TalkLimits::default()
        };
        let s = stand_ins(limits, 0, false);
        let mut sessions: Vec<_> = (0..5).map(|_| attached(&s.talk)).collect();
        for (i, (conv, _)) in sessions.iter_mut().enumerate() {
            conv.say(format!("hello from session {i}")).expect("a turn");
        }
        eventually("two requests at the model", || {
            s.llm.running.load(Ordering::SeqCst) == 2
        })
        .await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert_eq!(s.llm.prompts().len(), 2, "three sessions wait for a slot");
        assert_eq!(s.talk.slots.available(Backend::Llm), 0);
        // One waiting session's user presses Stop: its turn leaves the queue.
        let asked = |p: &Vec<Vec<ChatMessage>>| -> Vec<String> {
            p.iter().filter_map(|m| m.last().map(|m| m.content.clone())).collect()
        };
        let first = asked(&s.llm.prompts());
        let waiting = (0..5)
            .find(|i| !first.contains(&format!("hello from session {i}")))
            .expect("a waiting session");
        sessions[waiting].0.interrupt();
        s.llm_gate.send_replace(true);
        for (i, (_, events)) in sessions.iter_mut().enumerate() {
            if i == waiting {
                continue;
            }
            loop {
                match next(events).await {
                    TalkEvent::Done { .. } => break,
                    TalkEvent::Failed { message, .. } => panic!("session {i}: {message}"),
                    _ => {}
                }
            }
        }
        let all = asked(&s.llm.prompts());
        assert_eq!(all.len(), 4, "{all:?}");
        assert!(!all.contains(&format!("hello from session {waiting}")), "{all:?}");
        assert_eq!(s.llm.most.load(Ordering::SeqCst), 2, "never more than the slots");
        assert_eq!(s.talk.slots.available(Backend::Llm), 2, "every slot given back");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn utterances_wait_for_recognition_in_order_and_partials_only_when_idle() {
        let s = stand_ins(TalkLimits::default(), 6, false);
        let (mut conv, mut events) = attached(&s.talk);
        conv.transcribe(Job::Final(1), vec![0.0; 100]);
        eventually("the first utterance at the recogniser", || {
            s.asr.heard.lock().expect("lock").len() == 1
        })
        .await;
        conv.transcribe(Job::Partial(2), vec![0.0; 150]); // skipped: busy
        conv.transcribe(Job::Pause(1), vec![0.0; 200]);
        conv.transcribe(Job::Pause(2), vec![0.0; 250]);
        conv.transcribe(Job::Final(2), vec![0.0; 300]);
        conv.forget(Job::Pause(1)); // the user spoke on after pause 1
        for n in 3..=(2 + MAX_WAITING_JOBS as u64 - 2) {
            conv.transcribe(Job::Final(n), vec![0.0; 10]);
        }
        conv.transcribe(Job::Final(99), vec![0.0; 10]);
        match next(&mut events).await {
            TalkEvent::TranscriptFailed {
                job: Job::Final(99),
                message,
            } => {
                assert!(message.contains("behind"), "{message}")
            }
            other => panic!("no room: {other:?}"),
        }
        s.asr_gate.send_replace(true);
        let mut heard = Vec::new();
        for _ in 0..(1 + 2 + MAX_WAITING_JOBS - 2) {
            match next(&mut events).await {
                TalkEvent::Transcript { job, text } => heard.push((job, text)),
                other => panic!("{other:?}"),
            }
        }
        assert_eq!(
            heard[..3],
            [
                (Job::Final(1), "100 samples".to_owned()),
                (Job::Pause(2), "250 samples".to_owned()),
                (Job::Final(2), "300 samples".to_owned()),
            ]
        );
        // Idle again: a partial runs.
        conv.transcribe(Job::Partial(3), vec![0.0; 400]);
        match next(&mut events).await {
            TalkEvent::Transcript {
                job: Job::Partial(3),
                text,
            } => assert_eq!(text, "400 samples"),
            other => panic!("{other:?}"),
        }
    }
}
