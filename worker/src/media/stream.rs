//! The per-session media clock: one thread that emits a video frame every `1/fps` seconds and the
//! audio that goes with it.
//!
//! Frames leave on a deadline (`next += interval`), not after a sleep of fixed length, so encode
//! time does not stretch the clock. If the thread falls more than one frame behind, it counts the
//! frames as late and resynchronises rather than bursting.
//!
//! Each tick shows either the next idle frame or, while the avatar speaks, the next [`TalkUnit`]
//! from the talking pipeline: a finished frame and exactly the audio that belongs to it. Audio is
//! Opus, 20 ms packets at 48 kHz, encoded here from the same tick's samples (silence when idle),
//! so audio and video are tied to one clock by construction: their RTP timestamps advance
//! together and cannot drift apart. A turn starts playing once a few units are buffered
//! ([`PREBUFFER`]), so a lip-sync hiccup does not show; if the buffer still runs dry mid-turn, the
//! tick shows an idle frame with silence and counts an underrun. A turn that is no longer the
//! current one (interrupted) is dropped at the next tick: at most one frame (40 ms) of it shows.
//!
//! Encoded media goes through a small bounded channel to an async task that writes it to the
//! WebRTC tracks; if that task lags, the frame is dropped and counted instead of blocking the clock.

use super::avatar::{AvatarClip, Yuv420};
use super::encoder::{EncoderSettings, H264Encoder};
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Audio sample rate of the Opus track.
pub const AUDIO_RATE: u32 = 48_000;
/// Samples in one 20 ms Opus packet.
pub const OPUS_FRAME: usize = 960;
/// Units buffered before a turn starts playing.
pub const PREBUFFER: usize = 3;

/// Counters a session exposes.
#[derive(Debug, Default)]
pub struct StreamStats {
    pub frames_sent: AtomicU64,
    pub frames_late: AtomicU64,
    pub frames_dropped: AtomicU64,
    pub encode_micros_total: AtomicU64,
    /// Talking frames shown.
    pub talk_frames: AtomicU64,
    /// Ticks where a speaking turn had no unit ready.
    pub underruns: AtomicU64,
    pub audio_packets: AtomicU64,
}

/// One talking frame and its audio (48 kHz mono, this frame's share).
pub struct TalkUnit {
    pub turn: u64,
    pub frame: Yuv420,
    /// The idle frame this one was drawn from: idle playback continues after it.
    pub idle_index: usize,
    pub audio: Vec<f32>,
    /// The answer's last unit.
    pub last: bool,
}

/// What the clock tells the session.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ClockEvent {
    SpeechStarted { turn: u64 },
    SpeechEnded { turn: u64, interrupted: bool },
}

/// The talking pipeline's side of the clock.
pub struct Feed {
    pub units: std::sync::mpsc::Receiver<TalkUnit>,
    /// Units of any other turn are dropped.
    pub current_turn: Arc<AtomicU64>,
    /// The idle frame index the clock is at (the pipeline draws talking frames from there on).
    pub idle_index: Arc<AtomicUsize>,
    pub events: mpsc::UnboundedSender<ClockEvent>,
}

/// Encoded media for the track writer.
pub enum MediaOut {
    Video(EncodedFrame),
    /// One 20 ms Opus packet.
    Audio(Bytes),
}

/// Handle to a running clock; dropping it stops the thread.
pub struct VideoStream {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub stats: Arc<StreamStats>,
}

/// An encoded frame and how long it is shown.
pub struct EncodedFrame {
    pub data: Bytes,
    pub duration: Duration,
}

impl VideoStream {
    /// Start the clock for `clip` with `encoder_name`; media goes to `out`. `keyframe` is set by
    /// the RTCP reader on PLI/FIR and consumed here.
    pub fn start(
        clip: Arc<AvatarClip>,
        encoder_name: &'static str,
        settings: EncoderSettings,
        keyframe: Arc<AtomicBool>,
        out: mpsc::Sender<MediaOut>,
        feed: Feed,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(StreamStats::default());
        let thread = {
            let (stop, stats) = (Arc::clone(&stop), Arc::clone(&stats));
            let span = tracing::Span::current();
            std::thread::Builder::new().name("media-clock".into()).spawn(move || {
                let _entered = span.enter();
                Clock {
                    clip: &clip,
                    settings: &settings,
                    keyframe: &keyframe,
                    out: &out,
                    stats: &stats,
                    feed,
                    queue: VecDeque::new(),
                    playing: None,
                    pending_audio: VecDeque::new(),
                }
                .run(encoder_name, &stop);
            })?
        };
        Ok(Self {
            stop,
            thread: Some(thread),
            stats,
        })
    }
}

impl Drop for VideoStream {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Release);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

struct Clock<'a> {
    clip: &'a AvatarClip,
    settings: &'a EncoderSettings,
    keyframe: &'a AtomicBool,
    out: &'a mpsc::Sender<MediaOut>,
    stats: &'a StreamStats,
    feed: Feed,
    queue: VecDeque<TalkUnit>,
    /// The turn being spoken.
    playing: Option<u64>,
    /// 48 kHz samples not yet encoded (less than one Opus frame between ticks).
    pending_audio: VecDeque<f32>,
}

impl Clock<'_> {
    fn run(mut self, encoder_name: &'static str, stop: &AtomicBool) {
        let mut encoder = match H264Encoder::open(encoder_name, self.settings) {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "could not open the video encoder; session has no video");
                return;
            }
        };
        let mut opus = match opus::Encoder::new(AUDIO_RATE, opus::Channels::Mono, opus::Application::Voip) {
            Ok(mut e) => {
                let _ = e.set_bitrate(opus::Bitrate::Bits(32_000));
                Some(e)
            }
            Err(e) => {
                warn!(error = %e, "could not open the Opus encoder; session has no audio");
                None
            }
        };
        info!(encoder = encoder.name(), "media clock started");
        let fps = self.settings.fps.max(1);
        let interval = Duration::from_secs_f64(1.0 / fps as f64);
        let mut next = Instant::now();
        let mut pts: i64 = 0;
        let mut idle = self.feed.idle_index.load(Ordering::Acquire);
        let mut packet = vec![0u8; 1500];
        while !stop.load(Ordering::Acquire) && !self.clip.frames.is_empty() {
            let samples =
                (((pts + 1) * AUDIO_RATE as i64) / fps as i64 - (pts * AUDIO_RATE as i64) / fps as i64) as usize;
            let unit = self.next_unit();
            let (picture, audio) = match &unit {
                Some(u) => {
                    idle = u.idle_index + 1;
                    self.stats.talk_frames.fetch_add(1, Ordering::Relaxed);
                    (&u.frame, Some(&u.audio))
                }
                None => {
                    let p = &self.clip.frames[idle % self.clip.frames.len()];
                    idle += 1;
                    (p, None)
                }
            };
            self.feed.idle_index.store(idle, Ordering::Release);
            let force = pts == 0 || self.keyframe.swap(false, Ordering::AcqRel);
            let started = Instant::now();
            match encoder.encode(picture, pts, force) {
                Ok(data) if !data.is_empty() => {
                    let took = started.elapsed();
                    self.stats
                        .encode_micros_total
                        .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
                    metrics::histogram!("worker_encode_seconds").record(took.as_secs_f64());
                    let frame = EncodedFrame {
                        data: Bytes::from(data),
                        duration: interval,
                    };
                    match self.out.try_send(MediaOut::Video(frame)) {
                        Ok(()) => {
                            self.stats.frames_sent.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!("worker_frames_sent_total").increment(1);
                        }
                        Err(mpsc::error::TrySendError::Full(_)) => {
                            self.stats.frames_dropped.fetch_add(1, Ordering::Relaxed);
                            metrics::counter!("worker_frames_dropped_total").increment(1);
                            self.keyframe.store(true, Ordering::Release); // the receiver lost a reference
                        }
                        Err(mpsc::error::TrySendError::Closed(_)) => break,
                    }
                }
                Ok(_) => {}
                Err(e) => {
                    warn!(error = %e, "encode failed; stopping the media clock");
                    break;
                }
            }
            match audio {
                Some(a) => {
                    self.pending_audio.extend(a.iter().take(samples));
                    self.pending_audio
                        .extend(std::iter::repeat_n(0.0, samples.saturating_sub(a.len())));
                }
                None => self.pending_audio.extend(std::iter::repeat_n(0.0, samples)),
            }
            if let Some(opus) = opus.as_mut() {
                while self.pending_audio.len() >= OPUS_FRAME {
                    let pcm: Vec<f32> = self.pending_audio.drain(..OPUS_FRAME).collect();
                    match opus.encode_float(&pcm, &mut packet) {
                        Ok(n) => {
                            if self
                                .out
                                .try_send(MediaOut::Audio(Bytes::copy_from_slice(&packet[..n])))
                                .is_ok()
                            {
                                self.stats.audio_packets.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => warn!(error = %e, "opus encode failed"),
                    }
                }
            } else {
                self.pending_audio.clear();
            }
            if let Some(u) = &unit {
                if u.last {
                    self.end_turn(false);
                }
            }
            pts += 1;
            next += interval;
            let now = Instant::now();
            if now > next + interval {
                let behind = ((now - next).as_secs_f64() / interval.as_secs_f64()) as u64;
                self.stats.frames_late.fetch_add(behind, Ordering::Relaxed);
                metrics::counter!("worker_frames_late_total").increment(behind);
                next = now;
            } else if next > now {
                std::thread::sleep(next - now);
            }
        }
        if self.playing.is_some() {
            self.end_turn(true);
        }
    }

    /// The unit to show this tick, if the avatar is speaking and one is ready.
    fn next_unit(&mut self) -> Option<TalkUnit> {
        let current = self.feed.current_turn.load(Ordering::Acquire);
        while let Ok(u) = self.feed.units.try_recv() {
            if u.turn == current {
                self.queue.push_back(u);
            }
        }
        self.queue.retain(|u| u.turn == current);
        if let Some(turn) = self.playing {
            if turn != current {
                self.end_turn(true);
            }
        }
        if self.playing.is_none() {
            let ready = self.queue.len() >= PREBUFFER || self.queue.iter().any(|u| u.last);
            match self.queue.front() {
                Some(first) if ready => {
                    let turn = first.turn;
                    self.playing = Some(turn);
                    let _ = self.feed.events.send(ClockEvent::SpeechStarted { turn });
                }
                _ => return None,
            }
        }
        let unit = self.queue.pop_front();
        if unit.is_none() {
            self.stats.underruns.fetch_add(1, Ordering::Relaxed);
            metrics::counter!("worker_talk_underruns_total").increment(1);
        }
        unit
    }

    fn end_turn(&mut self, interrupted: bool) {
        if let Some(turn) = self.playing.take() {
            let _ = self.feed.events.send(ClockEvent::SpeechEnded { turn, interrupted });
        }
    }
}
