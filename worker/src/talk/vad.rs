//! Voice activity: which parts of the microphone's audio are the user speaking.
//!
//! ```text
//!  16 kHz PCM ─▶ Listener ─ 512-sample windows ─▶ SpeechModel (Silero VAD) ─ probability ─▶ Detector
//!                  │ keeps a pre-roll and the utterance                                      │
//!                  └──────────────── Started { barge_in } / Utterance { pcm } ◀──────────────┘
//! ```
//!
//! [`Detector`] is the decision, a pure state machine over one probability per 32 ms window: speech
//! starts after `min_speech_ms` above `threshold`, and ends after `min_silence_ms` below
//! `threshold - 0.15` (the hangover that keeps a pause between words inside one utterance).
//!
//! The hangover listens to the words. After `pause_ms` of silence the detector says the user
//! has *paused*: the listener hands over the utterance so far, and the session recognises it at
//! once, while the silence goes on, and tells the listener what it read ([`Listener::words`]).
//! A finished sentence ("What is two plus two?") ends the turn after `complete_silence_ms`; the
//! transcript is ready by then, so the answer starts at once. Words that stop mid-sentence ("What
//! is the capital of") wait `incomplete_silence_ms`, longer than the plain hangover
//! (`min_silence_ms`, which holds until the words are read, or when they cannot be). Speech that
//! comes back ([`Heard::Resumed`]) makes the pause part of the utterance again.
//! While speech goes on, the listener also hands over the utterance every `partial_ms`, for the
//! partial transcripts the page shows as the user speaks.
//!
//! While
//! the avatar is speaking its voice may come back through the user's speakers, past the browser's
//! echo cancellation; then speech must pass the stricter `barge_in_threshold` for
//! `barge_in_min_speech_ms` before it counts, and be louder than `barge_in_min_dbfs` (the model
//! itself hears speech at any level). A stricter guard misses soft interruptions; a looser
//! one lets the avatar interrupt itself (docs/models.md, "Voice").
//!
//! [`Listener`] adds the audio: it cuts the stream into windows, asks a [`SpeechModel`] for each
//! window's probability, and collects the utterance (with `pre_roll_ms` from before the start, so
//! the first syllable is not lost) up to `max_utterance_ms`. Both take audio in and give events
//! out, with no clock and no threads, so tests drive them window by window.
//!
//! [`SileroVad`] is the model: Silero VAD v5 (ONNX, MIT licence) through ONNX Runtime, about
//! 0.1 ms of one core per window.

use crate::config::VadConfig;
use std::collections::VecDeque;
use std::path::Path;

/// Samples per second of everything here.
pub const RATE: u32 = 16_000;
/// Samples per window: Silero's window at 16 kHz (32 ms).
pub const WINDOW: usize = 512;
/// Milliseconds per window.
pub const WINDOW_MS: u64 = (WINDOW as u64 * 1000) / RATE as u64;
/// Samples of the previous window that Silero v5 sees before each window.
const CONTEXT: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum VadError {
    #[error("voice activity model {path}: {message}")]
    Model { path: String, message: String },
    #[error("voice activity inference: {0}")]
    Inference(String),
}

/// Anything that gives the probability that a window is speech.
pub trait SpeechModel: Send {
    /// `window` has [`WINDOW`] samples at [`RATE`]. Windows must come in order.
    fn probability(&mut self, window: &[f32]) -> Result<f32, VadError>;
    /// Forget the audio so far (a new stream).
    fn reset(&mut self);
}

/// Silero VAD v5 through ONNX Runtime.
pub struct SileroVad {
    session: ort::session::Session,
    /// The recurrent state, `[2, 1, 128]`.
    state: ndarray::Array3<f32>,
    /// The last [`CONTEXT`] samples of the previous window.
    context: [f32; CONTEXT],
}

impl SileroVad {
    /// Load the model with the ONNX Runtime library at `onnxruntime` (the lip-sync stage's).
    pub fn load(model: &Path, onnxruntime: &Path) -> Result<Self, VadError> {
        let err = |message: String| VadError::Model {
            path: model.display().to_string(),
            message,
        };
        let session = super::lipsync::cpu_session(model, onnxruntime, 1).map_err(err)?;
        for name in ["input", "state", "sr"] {
            if !session.inputs().iter().any(|i| i.name() == name) {
                return Err(err(format!("has no input `{name}`: not a Silero VAD v5 model")));
            }
        }
        Ok(Self {
            session,
            state: ndarray::Array3::zeros((2, 1, 128)),
            context: [0.0; CONTEXT],
        })
    }
}

impl SpeechModel for SileroVad {
    fn probability(&mut self, window: &[f32]) -> Result<f32, VadError> {
        let inf = |e: ort::Error| VadError::Inference(e.to_string());
        if window.len() != WINDOW {
            return Err(VadError::Inference(format!(
                "a window has {WINDOW} samples, not {}",
                window.len()
            )));
        }
        let mut input = ndarray::Array2::<f32>::zeros((1, CONTEXT + WINDOW));
        if let Some(row) = input.as_slice_mut() {
            row[..CONTEXT].copy_from_slice(&self.context);
            row[CONTEXT..].copy_from_slice(window);
        }
        self.context.copy_from_slice(&window[WINDOW - CONTEXT..]);
        let sr = ndarray::arr0(i64::from(RATE));
        let inputs = ort::inputs![
            "input" => ort::value::TensorRef::from_array_view(&input).map_err(inf)?,
            "state" => ort::value::TensorRef::from_array_view(&self.state).map_err(inf)?,
            "sr" => ort::value::TensorRef::from_array_view(&sr).map_err(inf)?,
        ];
        let outputs = self.session.run(inputs).map_err(inf)?;
        let probability = outputs
            .get("output")
            .ok_or_else(|| VadError::Inference("no output `output`".into()))?
            .try_extract_array::<f32>()
            .map_err(inf)?
            .iter()
            .next()
            .copied()
            .ok_or_else(|| VadError::Inference("an empty output".into()))?;
        let state = outputs
            .get("stateN")
            .ok_or_else(|| VadError::Inference("no output `stateN`".into()))?
            .try_extract_array::<f32>()
            .map_err(inf)?;
        if state.len() != self.state.len() {
            return Err(VadError::Inference(format!("state of shape {:?}", state.shape())));
        }
        for (to, from) in self.state.iter_mut().zip(state.iter()) {
            *to = *from;
        }
        Ok(probability)
    }

    fn reset(&mut self) {
        self.state.fill(0.0);
        self.context = [0.0; CONTEXT];
    }
}

/// What the detector decided about one window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    /// Nothing changed.
    Continue,
    /// Speech started `windows` windows ago (the windows that confirmed it). `barge_in`: the
    /// avatar was speaking, so this speech passed the stricter guard and interrupts it.
    Started { windows: usize, barge_in: bool },
    /// The user has been silent for `pause_ms`: the utterance may be over (`trailing`: the
    /// silent windows so far).
    Paused { trailing: usize },
    /// Speech again after [`Decision::Paused`]: the pause was inside the utterance.
    Resumed,
    /// Speech ended; the last `trailing` windows were the silence that confirmed it.
    Ended { trailing: usize },
}

/// The speech/silence decision, one window at a time.
#[derive(Debug, Clone)]
pub struct Detector {
    threshold: f32,
    start_windows: usize,
    end_windows: usize,
    /// Silence that makes a pause ([`Decision::Paused`]).
    pause_windows: usize,
    /// The hangover once the words before the pause are a finished sentence, and once they
    /// stop mid-sentence.
    complete_windows: usize,
    incomplete_windows: usize,
    barge_in_threshold: f32,
    barge_in_windows: usize,
    barge_in_min_dbfs: f32,
    speaking: bool,
    /// Consecutive windows above the threshold (before a start) or below the lower one (after).
    run: usize,
    /// This silence has made a pause.
    paused: bool,
    /// Whether the words before this pause are a finished sentence, once read
    /// ([`Detector::words`]).
    complete: Option<bool>,
}

/// The RMS level of `samples` in dB below full scale.
pub fn dbfs(samples: &[f32]) -> f32 {
    20.0 * super::audio::rms(samples).max(1e-6).log10()
}

fn windows(ms: u64) -> usize {
    (ms.div_ceil(WINDOW_MS)).max(1) as usize
}

impl Detector {
    pub fn new(cfg: &VadConfig) -> Self {
        Self {
            threshold: cfg.threshold as f32,
            start_windows: windows(cfg.min_speech_ms),
            end_windows: windows(cfg.min_silence_ms),
            pause_windows: windows(cfg.pause_ms.min(cfg.min_silence_ms)),
            complete_windows: windows(cfg.complete_silence_ms.max(cfg.pause_ms).min(cfg.min_silence_ms)),
            incomplete_windows: windows(cfg.incomplete_silence_ms.max(cfg.min_silence_ms)),
            barge_in_threshold: cfg.barge_in_threshold.max(cfg.threshold) as f32,
            barge_in_windows: windows(cfg.barge_in_min_speech_ms),
            barge_in_min_dbfs: cfg.barge_in_min_dbfs as f32,
            speaking: false,
            run: 0,
            paused: false,
            complete: None,
        }
    }

    /// The words before the current pause were read: a finished sentence (`complete`) ends the
    /// turn after `complete_silence_ms` of silence, one that stops mid-sentence after
    /// `incomplete_silence_ms`, instead of `min_silence_ms`. Ignored unless paused.
    pub fn words(&mut self, complete: bool) {
        if self.speaking && self.paused {
            self.complete = Some(complete);
        }
    }

    /// Whether the user is silent inside an utterance, past `pause_ms`.
    pub fn paused(&self) -> bool {
        self.speaking && self.paused
    }

    /// Whether the user is speaking.
    pub fn speaking(&self) -> bool {
        self.speaking
    }

    /// Decide on one window of probability `p` and loudness `dbfs` (RMS, dB below full scale).
    /// `avatar_speaking`: apply the barge-in guard.
    pub fn push(&mut self, p: f32, dbfs: f32, avatar_speaking: bool) -> Decision {
        if self.speaking {
            // Below the lower threshold counts as silence; anything above it (even between the
            // thresholds) ends a silence, and a pause with it.
            if p < (self.threshold - 0.15).max(0.01) {
                self.run += 1;
                let end = match self.complete {
                    Some(true) => self.complete_windows,
                    Some(false) => self.incomplete_windows,
                    None => self.end_windows,
                };
                if self.run >= end {
                    let trailing = self.run;
                    self.speaking = false;
                    self.run = 0;
                    self.paused = false;
                    self.complete = None;
                    return Decision::Ended { trailing };
                }
                if self.run == self.pause_windows {
                    self.paused = true;
                    return Decision::Paused { trailing: self.run };
                }
            } else {
                self.run = 0;
                self.complete = None;
                if std::mem::take(&mut self.paused) {
                    return Decision::Resumed;
                }
            }
            return Decision::Continue;
        }
        let (counts, needed) = if avatar_speaking {
            // The model hears speech at any level, the avatar's faint echo included: against
            // it, only speech that is also loud enough counts.
            (
                p >= self.barge_in_threshold && dbfs >= self.barge_in_min_dbfs,
                self.barge_in_windows,
            )
        } else {
            (p >= self.threshold, self.start_windows)
        };
        if counts {
            self.run += 1;
            if self.run >= needed {
                let windows = self.run;
                self.speaking = true;
                self.run = 0;
                return Decision::Started {
                    windows,
                    barge_in: avatar_speaking,
                };
            }
        } else {
            self.run = 0;
        }
        Decision::Continue
    }
}

/// What the listener heard.
#[derive(Debug, Clone, PartialEq)]
pub enum Heard {
    /// The user started speaking (see [`Decision::Started`]).
    Started { barge_in: bool },
    /// Every `partial_ms` of speech: the utterance so far, for a partial transcript.
    Partial { pcm: Vec<f32> },
    /// The user fell silent for `pause_ms`: the utterance so far (trimmed as an utterance is).
    /// `pause` numbers the pauses of this listener; if the turn ends in this silence, the
    /// utterance is exactly this audio, and its transcript can be this one's.
    Paused { pause: u64, pcm: Vec<f32> },
    /// The user spoke again after [`Heard::Paused`].
    Resumed,
    /// The user stopped speaking: the utterance, pre-roll included, trailing silence trimmed to
    /// one window. `cut`: it reached `max_utterance_ms` and was cut there. `pause`: the
    /// [`Heard::Paused`] whose audio this is, when the turn ended in that pause.
    Utterance {
        pcm: Vec<f32>,
        cut: bool,
        pause: Option<u64>,
    },
}

/// Milliseconds of `pcm` at [`RATE`].
pub fn duration_ms(pcm: &[f32]) -> u64 {
    pcm.len() as u64 * 1000 / u64::from(RATE)
}

/// Audio in, speech events and utterances out.
pub struct Listener<M> {
    model: M,
    detector: Detector,
    /// Samples not yet making a whole window.
    partial: Vec<f32>,
    /// The last windows before speech (the pre-roll and the confirming windows).
    recent: VecDeque<Vec<f32>>,
    recent_windows: usize,
    pre_roll_windows: usize,
    /// The utterance so far, while speaking.
    utterance: Vec<f32>,
    max_samples: usize,
    /// Samples between partials (0: none), and the utterance's length at the last one.
    partial_samples: usize,
    last_partial: usize,
    /// The number of the last pause ([`Heard::Paused`]).
    pause: u64,
    /// The user is silent in that pause now.
    in_pause: bool,
}

impl<M: SpeechModel> Listener<M> {
    pub fn new(model: M, cfg: &VadConfig) -> Self {
        let detector = Detector::new(cfg);
        let pre_roll_windows = windows(cfg.pre_roll_ms);
        let recent_windows = pre_roll_windows + detector.start_windows.max(detector.barge_in_windows);
        Self {
            model,
            detector,
            partial: Vec::with_capacity(WINDOW),
            recent: VecDeque::with_capacity(recent_windows + 1),
            recent_windows,
            pre_roll_windows,
            utterance: Vec::new(),
            max_samples: (cfg.max_utterance_ms.max(WINDOW_MS) * u64::from(RATE) / 1000) as usize,
            partial_samples: 0,
            last_partial: 0,
            pause: 0,
            in_pause: false,
        }
    }

    /// Hand over the utterance so far every `ms` of speech ([`Heard::Partial`]); 0: never.
    pub fn with_partials(mut self, ms: u64) -> Self {
        self.partial_samples = (ms * u64::from(RATE) / 1000) as usize;
        self
    }

    /// Number the pauses from `first` on (the next is `first + 1`).
    pub fn with_pauses_from(mut self, first: u64) -> Self {
        self.pause = first;
        self
    }

    /// The words up to pause `pause` were read, and are a finished sentence or not: if the
    /// user is still silent in that pause, the turn ends after `complete_silence_ms` or
    /// `incomplete_silence_ms` (see the module docs). A later pause, or speech since, makes this
    /// a no-op.
    pub fn words(&mut self, pause: u64, complete: bool) {
        if pause == self.pause && self.in_pause {
            self.detector.words(complete);
        }
    }

    /// Whether the user is speaking now.
    pub fn speaking(&self) -> bool {
        self.detector.speaking()
    }

    /// Feed 16 kHz samples (any length). `avatar_speaking` selects the barge-in guard.
    pub fn push(&mut self, mut pcm: &[f32], avatar_speaking: bool) -> Result<Vec<Heard>, VadError> {
        let mut heard = Vec::new();
        while !pcm.is_empty() {
            let take = (WINDOW - self.partial.len()).min(pcm.len());
            self.partial.extend_from_slice(&pcm[..take]);
            pcm = &pcm[take..];
            if self.partial.len() == WINDOW {
                let window = std::mem::replace(&mut self.partial, Vec::with_capacity(WINDOW));
                heard.extend(self.window(window, avatar_speaking)?);
            }
        }
        Ok(heard)
    }

    fn window(&mut self, window: Vec<f32>, avatar_speaking: bool) -> Result<Option<Heard>, VadError> {
        let p = self.model.probability(&window)?;
        match self.detector.push(p, dbfs(&window), avatar_speaking) {
            Decision::Started { barge_in, windows } => {
                // The windows that confirmed the start, and the pre-roll before them.
                let keep = (self.pre_roll_windows + windows - 1).min(self.recent.len());
                let skip = self.recent.len() - keep;
                self.utterance.clear();
                self.last_partial = 0;
                for w in self.recent.drain(..).skip(skip) {
                    self.utterance.extend_from_slice(&w);
                }
                self.utterance.extend_from_slice(&window);
                Ok(Some(Heard::Started { barge_in }))
            }
            Decision::Paused { trailing } => {
                self.utterance.extend_from_slice(&window);
                self.pause += 1;
                self.in_pause = true;
                Ok(Some(Heard::Paused {
                    pause: self.pause,
                    pcm: self.trimmed(trailing).to_vec(),
                }))
            }
            Decision::Resumed => {
                self.utterance.extend_from_slice(&window);
                self.in_pause = false;
                Ok(Some(Heard::Resumed))
            }
            Decision::Ended { trailing } => {
                self.utterance.extend_from_slice(&window);
                let keep = self.trimmed(trailing).len();
                self.utterance.truncate(keep);
                let pause = self.in_pause.then_some(self.pause);
                Ok(Some(self.finish(false, pause)))
            }
            Decision::Continue if self.detector.speaking() => {
                self.utterance.extend_from_slice(&window);
                if self.utterance.len() >= self.max_samples {
                    // Too long for one request: end it here as if the user had paused.
                    self.detector.speaking = false;
                    self.detector.run = 0;
                    self.detector.paused = false;
                    self.detector.complete = None;
                    return Ok(Some(self.finish(true, None)));
                }
                // Only while the user is audibly speaking: one that starts as they fall silent
                // would hold up the recognition of the pause (one at a time).
                if self.partial_samples > 0
                    && self.detector.run == 0
                    && self.utterance.len() >= self.last_partial + self.partial_samples
                {
                    self.last_partial = self.utterance.len();
                    return Ok(Some(Heard::Partial {
                        pcm: self.utterance.clone(),
                    }));
                }
                Ok(None)
            }
            Decision::Continue => {
                self.recent.push_back(window);
                while self.recent.len() > self.recent_windows {
                    self.recent.pop_front();
                }
                Ok(None)
            }
        }
    }

    /// The utterance without the last `trailing` silent windows but one.
    fn trimmed(&self, trailing: usize) -> &[f32] {
        let keep = self.utterance.len().saturating_sub(trailing.saturating_sub(1) * WINDOW);
        &self.utterance[..keep]
    }

    fn finish(&mut self, cut: bool, pause: Option<u64>) -> Heard {
        self.recent.clear();
        self.last_partial = 0;
        self.in_pause = false;
        Heard::Utterance {
            pcm: std::mem::take(&mut self.utterance),
            cut,
            pause,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> VadConfig {
        VadConfig {
            threshold: 0.5,
            min_speech_ms: 96,   // 3 windows
            min_silence_ms: 320, // 10 windows
            barge_in_threshold: 0.8,
            barge_in_min_speech_ms: 192, // 6 windows
            pre_roll_ms: 64,             // 2 windows
            max_utterance_ms: 3200,      // 100 windows
            pause_ms: 128,               // 4 windows
            complete_silence_ms: 256,    // 8 windows
            ..VadConfig::default()
        }
    }

    const LOUD: f32 = -20.0;

    /// A model that reads the probability from the window itself: every sample is `p`.
    struct Level;
    impl SpeechModel for Level {
        fn probability(&mut self, window: &[f32]) -> Result<f32, VadError> {
            Ok(window[0])
        }
        fn reset(&mut self) {}
    }

    /// What was heard, without the audio.
    fn brief(heard: &[Heard]) -> Vec<String> {
        heard
            .iter()
            .map(|h| match h {
                Heard::Partial { pcm } => format!("Partial({})", pcm.len() / WINDOW),
                Heard::Paused { pause, pcm } => format!("Paused({pause}, {})", pcm.len() / WINDOW),
                Heard::Utterance { pcm, cut, pause } => format!("Utterance({}, {cut}, {pause:?})", pcm.len() / WINDOW),
                other => format!("{other:?}"),
            })
            .collect()
    }

    fn windows_of(p: f32, n: usize) -> Vec<f32> {
        vec![p; n * WINDOW]
    }

    #[test]
    fn speech_starts_after_the_minimum_and_ends_after_the_hangover() {
        let mut d = Detector::new(&cfg());
        assert_eq!(d.push(0.9, LOUD, false), Decision::Continue);
        assert_eq!(d.push(0.9, LOUD, false), Decision::Continue);
        assert_eq!(
            d.push(0.9, LOUD, false),
            Decision::Started {
                windows: 3,
                barge_in: false
            }
        );
        // A pause shorter than the hangover, and values between the thresholds, keep speech on;
        // after pause_ms (4 windows) the detector says the user paused.
        let pause = |d: &mut Detector| {
            for i in 1..=9 {
                let want = if i == 4 {
                    Decision::Paused { trailing: 4 }
                } else {
                    Decision::Continue
                };
                assert_eq!(d.push(0.1, LOUD, false), want, "silent window {i}");
            }
        };
        pause(&mut d);
        assert_eq!(
            d.push(0.4, LOUD, false),
            Decision::Resumed,
            "between the thresholds: not silence"
        );
        pause(&mut d);
        assert_eq!(d.push(0.1, LOUD, false), Decision::Ended { trailing: 10 });
        assert!(!d.speaking());
    }

    #[test]
    fn short_bursts_do_not_start_speech() {
        let mut d = Detector::new(&cfg());
        for _ in 0..50 {
            assert_eq!(d.push(0.9, LOUD, false), Decision::Continue);
            assert_eq!(d.push(0.9, LOUD, false), Decision::Continue);
            assert_eq!(
                d.push(0.2, LOUD, false),
                Decision::Continue,
                "two windows then a dip: a click"
            );
        }
    }

    #[test]
    fn while_the_avatar_speaks_only_stronger_longer_speech_barges_in() {
        let mut d = Detector::new(&cfg());
        // 0.7 starts speech normally, but not against the avatar's voice.
        for _ in 0..100 {
            assert_eq!(d.push(0.7, LOUD, true), Decision::Continue);
        }
        // Faint speech (an echo past the browser's echo cancellation) does not count.
        for _ in 0..100 {
            assert_eq!(d.push(0.95, -50.0, true), Decision::Continue);
        }
        for _ in 0..5 {
            assert_eq!(d.push(0.95, LOUD, true), Decision::Continue);
        }
        assert_eq!(
            d.push(0.95, LOUD, true),
            Decision::Started {
                windows: 6,
                barge_in: true
            }
        );
    }

    #[test]
    fn the_utterance_has_its_pre_roll_and_loses_its_trailing_silence() {
        let mut l = Listener::new(Level, &cfg());
        assert!(l.push(&windows_of(0.0, 20), false).expect("vad").is_empty());
        // A window of quiet onset (0.3) just before the speech is inside the pre-roll.
        let mut audio = windows_of(0.3, 1);
        audio.extend(windows_of(0.9, 30));
        let heard = l.push(&audio, false).expect("vad");
        assert_eq!(heard, vec![Heard::Started { barge_in: false }]);
        assert!(l.speaking());
        let heard = l.push(&windows_of(0.0, 10), false).expect("vad");
        let [Heard::Paused { pause: 1, pcm: paused }, Heard::Utterance {
            pcm,
            cut: false,
            pause: Some(1),
        }] = heard.as_slice()
        else {
            panic!("a pause, then the utterance that ended in it: {:?}", brief(&heard));
        };
        assert_eq!(paused, pcm, "the pause had the whole utterance");
        // The pre-roll (two windows: one silent, the onset), the 30 speech windows (the first
        // three confirmed the start), one trailing silent window.
        assert_eq!(pcm.len(), (2 + 30 + 1) * WINDOW);
        assert_eq!(pcm[WINDOW], 0.3, "the onset survives in the pre-roll");
        assert_eq!(pcm[pcm.len() - 1], 0.0);
        assert!(!l.speaking());
    }

    #[test]
    fn odd_packet_sizes_make_the_same_windows() {
        let mut audio = windows_of(0.0, 5);
        audio.extend(windows_of(0.9, 20));
        audio.extend(windows_of(0.0, 12));
        let mut whole = Listener::new(Level, &cfg());
        let expected = whole.push(&audio, false).expect("vad");
        let mut pieces = Listener::new(Level, &cfg());
        let mut got = Vec::new();
        for chunk in audio.chunks(320) {
            // 20 ms of 16 kHz: what one Opus packet decodes to.
            got.extend(pieces.push(chunk, false).expect("vad"));
        }
        assert_eq!(got, expected);
        assert_eq!(got.len(), 3, "started, paused, ended: {got:?}");
    }

    #[test]
    fn an_endless_utterance_is_cut_at_the_maximum() {
        let mut l = Listener::new(Level, &cfg());
        let heard = l.push(&windows_of(0.9, 250), false).expect("vad");
        let cuts: Vec<_> = heard
            .iter()
            .filter_map(|h| match h {
                Heard::Utterance { pcm, cut, .. } => Some((pcm.len(), *cut)),
                _ => None,
            })
            .collect();
        assert!(cuts.len() >= 2, "{cuts:?}");
        assert!(cuts.iter().all(|&(len, cut)| cut && len <= 100 * WINDOW), "{cuts:?}");
        assert_eq!(
            heard.iter().filter(|h| matches!(h, Heard::Started { .. })).count(),
            cuts.len() + 1,
            "speech goes on: each cut is followed by a new start"
        );
    }

    #[test]
    fn a_pause_after_a_finished_sentence_ends_the_turn_early_and_speech_after_it_resumes() {
        // pause_ms 128 (4 windows), complete_silence_ms 256 (8), min_silence_ms 320 (10).
        let mut l = Listener::new(Level, &cfg());
        l.push(&windows_of(0.9, 20), false).expect("vad");
        let heard = l.push(&windows_of(0.0, 4), false).expect("vad");
        let [Heard::Paused { pause: 1, pcm }] = heard.as_slice() else {
            panic!("{:?}", brief(&heard));
        };
        // The 20 speech windows (the first three confirmed the start), one trailing silent window.
        assert_eq!(pcm.len(), (20 + 1) * WINDOW, "trimmed like an utterance");
        // Speech again: the pause was inside the utterance, and a stale word from it is ignored.
        assert_eq!(l.push(&windows_of(0.9, 5), false).expect("vad"), vec![Heard::Resumed]);
        l.words(1, true);
        assert!(
            l.push(&windows_of(0.0, 7), false).expect("vad").len() == 1,
            "pause 2 only"
        );
        assert!(l.speaking(), "a stale complete does not end the turn");
        let heard = l.push(&windows_of(0.0, 3), false).expect("vad");
        assert!(
            matches!(heard.as_slice(), [Heard::Utterance { pause: Some(2), .. }]),
            "the full hangover: {:?}",
            brief(&heard)
        );

        // A finished sentence: the turn ends after 8 silent windows, not 10.
        l.push(&windows_of(0.9, 20), false).expect("vad");
        assert!(matches!(
            l.push(&windows_of(0.0, 4), false).expect("vad").as_slice(),
            [Heard::Paused { pause: 3, .. }]
        ));
        l.words(3, true);
        assert!(l.push(&windows_of(0.0, 3), false).expect("vad").is_empty());
        let heard = l.push(&windows_of(0.0, 1), false).expect("vad");
        assert!(
            matches!(
                heard.as_slice(),
                [Heard::Utterance {
                    pause: Some(3),
                    cut: false,
                    ..
                }]
            ),
            "{:?}",
            brief(&heard)
        );
        // The word arrived late, after more silence than the short hangover: it ends at once.
        l.push(&windows_of(0.9, 20), false).expect("vad");
        l.push(&windows_of(0.0, 9), false).expect("vad");
        l.words(4, true);
        assert!(matches!(
            l.push(&windows_of(0.0, 1), false).expect("vad").as_slice(),
            [Heard::Utterance { pause: Some(4), .. }]
        ));
    }

    #[test]
    fn words_that_stop_mid_sentence_wait_longer_than_the_plain_hangover() {
        let cfg = VadConfig {
            incomplete_silence_ms: 480, // 15 windows
            ..cfg()
        };
        let mut l = Listener::new(Level, &cfg);
        l.push(&windows_of(0.9, 20), false).expect("vad");
        l.push(&windows_of(0.0, 4), false).expect("vad");
        l.words(1, false);
        assert!(
            l.push(&windows_of(0.0, 10), false).expect("vad").is_empty(),
            "past min_silence_ms"
        );
        assert!(matches!(
            l.push(&windows_of(0.0, 1), false).expect("vad").as_slice(),
            [Heard::Utterance { pause: Some(1), .. }]
        ));
    }

    #[test]
    fn partials_come_every_interval_of_speech_and_not_in_a_pause() {
        let mut l = Listener::new(Level, &cfg()).with_partials(320); // 10 windows
        let heard = l.push(&windows_of(0.9, 31), false).expect("vad");
        let lens: Vec<usize> = heard
            .iter()
            .filter_map(|h| match h {
                Heard::Partial { pcm } => Some(pcm.len() / WINDOW),
                _ => None,
            })
            .collect();
        // Each 10 windows of the utterance (the 3 that confirmed its start among them).
        assert_eq!(lens, [10, 20, 30]);
        let heard = l.push(&windows_of(0.0, 9), false).expect("vad");
        assert!(
            !heard.iter().any(|h| matches!(h, Heard::Partial { .. })),
            "silence is not speech"
        );
    }
}
