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
//! WebRTC tracks ([`super::send`]); if that task lags, the frame is dropped and counted instead of
//! blocking the clock.
//!
//! What the encoder produces follows the viewer's bandwidth ([`Adaptation`]): each tick reads the
//! latest [`Target`]. A new bitrate is set on the running encoder; a new level (frame rate or
//! size), or a bitrate far from the one the encoder was opened with (its VBV is sized at open),
//! reopens it, which starts with a keyframe. At a lower frame rate the clock still ticks at the
//! full rate, audio included, and encodes only every second or third tick; the RTP timestamps
//! come from the tick, so time does not stretch. Keyframes asked for by the viewer (PLI, FIR)
//! are granted at most once per `min_keyframe_interval`: a storm of requests on a lossy path
//! does not turn every frame into a keyframe.
//!
//! The decisions are a function of what arrives, with no encoder, thread or sleep in them:
//! [`ClockCore::tick`] says what one tick shows and plays (and which speech events it raises), and
//! [`Pacer`] says, given the time, how long to sleep or how many frames were late. The thread in
//! [`VideoStream`] only encodes, sends and sleeps as they say, so prebuffering, underruns,
//! interrupts and the audio/video tie are tested tick by tick below.

use super::avatar::{AvatarClip, Yuv420};
use super::encoder::{EncoderSettings, H264Encoder, Scaler};
use super::fanout::Taps;
use super::rate::Target;
use bytes::Bytes;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

/// Audio sample rate of the Opus track.
pub const AUDIO_RATE: u32 = 48_000;
/// Samples in one 20 ms Opus packet.
pub const OPUS_FRAME: usize = 960;
/// Units buffered before a turn starts playing.
pub const PREBUFFER: usize = 3;
/// The most loss the Opus encoder's FEC is sized for, in percent: past it, more redundancy
/// would take too much from the speech itself.
const MAX_FEC_LOSS_PCT: u8 = 25;

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
    SpeechStarted {
        turn: u64,
    },
    SpeechEnded {
        turn: u64,
        interrupted: bool,
    },
    /// The video's level or the viewer's estimated bandwidth changed (from [`super::send`]).
    Quality(Target),
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

/// Where the clock's encoded media goes.
pub struct Sinks {
    /// The viewer's sender ([`super::send::send_media`]): a full channel loses a picture and
    /// asks for a keyframe.
    pub viewer: mpsc::Sender<MediaOut>,
    /// Every other sink ([`super::fanout`]).
    pub taps: Taps,
}

/// Encoded media for the track writer (and the session's other sinks, [`super::fanout`]).
#[derive(Debug, Clone)]
pub enum MediaOut {
    Video(EncodedFrame),
    /// One 20 ms Opus packet.
    Audio(Bytes),
}

/// What one tick shows.
pub enum Picture {
    /// The idle clip's frame at this index (modulo the clip's length).
    Idle(usize),
    /// A talking frame.
    Talk(Yuv420),
}

/// Everything one tick decides.
pub struct Tick {
    /// The frame's presentation index (0 first: a key frame).
    pub pts: i64,
    pub picture: Picture,
    /// Complete 20 ms blocks of 48 kHz audio to encode now: this tick's share of the speech, or
    /// silence; samples short of a block wait for the next tick.
    pub audio: Vec<Vec<f32>>,
    pub events: Vec<ClockEvent>,
    /// A speaking turn had no unit ready: the idle frame and silence show instead.
    pub underrun: bool,
}

/// The clock's rules, tick by tick: which turn plays, when it starts (after [`PREBUFFER`] units,
/// or its last), what an interrupt drops, and how many audio samples each frame carries.
pub struct ClockCore {
    fps: u32,
    pts: i64,
    /// The next idle frame.
    idle: usize,
    queue: VecDeque<TalkUnit>,
    /// The turn being spoken.
    playing: Option<u64>,
    /// 48 kHz samples not yet in a whole Opus block.
    pending_audio: VecDeque<f32>,
}

impl ClockCore {
    pub fn new(fps: u32, idle_index: usize) -> Self {
        Self {
            fps: fps.max(1),
            pts: 0,
            idle: idle_index,
            queue: VecDeque::new(),
            playing: None,
            pending_audio: VecDeque::new(),
        }
    }

    /// The idle frame the next tick would show (the talking pipeline draws from there on).
    pub fn idle_index(&self) -> usize {
        self.idle
    }

    /// One tick: `arrived` are the units that came from the pipeline since the last tick,
    /// `current_turn` the turn that may play (units of any other are dropped).
    pub fn tick(&mut self, arrived: impl IntoIterator<Item = TalkUnit>, current_turn: u64) -> Tick {
        let mut events = Vec::new();
        let fps = i64::from(self.fps);
        let rate = i64::from(AUDIO_RATE);
        // Integer shares that add up exactly: 25 fps gives 1920 samples a frame.
        let samples = (((self.pts + 1) * rate) / fps - (self.pts * rate) / fps) as usize;
        self.queue
            .extend(arrived.into_iter().filter(|u| u.turn == current_turn));
        self.queue.retain(|u| u.turn == current_turn);
        if self.playing.is_some_and(|turn| turn != current_turn) {
            events.extend(self.end_turn(true));
        }
        if self.playing.is_none() {
            let ready = self.queue.len() >= PREBUFFER || self.queue.iter().any(|u| u.last);
            if let Some(first) = self.queue.front().filter(|_| ready) {
                self.playing = Some(first.turn);
                events.push(ClockEvent::SpeechStarted { turn: first.turn });
            }
        }
        let unit = if self.playing.is_some() {
            self.queue.pop_front()
        } else {
            None
        };
        let underrun = self.playing.is_some() && unit.is_none();
        let (picture, last) = match unit {
            Some(u) => {
                self.idle = u.idle_index + 1;
                self.pending_audio.extend(u.audio.iter().copied().take(samples));
                self.pending_audio
                    .extend(std::iter::repeat_n(0.0, samples.saturating_sub(u.audio.len())));
                (Picture::Talk(u.frame), u.last)
            }
            None => {
                let index = self.idle;
                self.idle += 1;
                self.pending_audio.extend(std::iter::repeat_n(0.0, samples));
                (Picture::Idle(index), false)
            }
        };
        let mut audio = Vec::new();
        while self.pending_audio.len() >= OPUS_FRAME {
            audio.push(self.pending_audio.drain(..OPUS_FRAME).collect());
        }
        if last {
            events.extend(self.end_turn(false));
        }
        let pts = self.pts;
        self.pts += 1;
        Tick {
            pts,
            picture,
            audio,
            events,
            underrun,
        }
    }

    /// The clock stops: a turn still playing ends as interrupted.
    pub fn stop(&mut self) -> Option<ClockEvent> {
        self.end_turn(true)
    }

    fn end_turn(&mut self, interrupted: bool) -> Option<ClockEvent> {
        self.playing
            .take()
            .map(|turn| ClockEvent::SpeechEnded { turn, interrupted })
    }
}

/// Keyframes on request, at most one per interval. A request made too soon stays pending (the
/// flag is left set) and is granted once the interval has passed, so the viewer still gets its
/// keyframe, and a storm of requests yields one keyframe per interval, not one per frame.
pub struct KeyframeGate {
    interval: Duration,
    last: Option<Instant>,
}

impl KeyframeGate {
    pub fn new(interval: Duration) -> Self {
        Self { interval, last: None }
    }

    /// A keyframe went out (a new encoder's first frame).
    pub fn sent(&mut self, now: Instant) {
        self.last = Some(now);
    }

    /// Whether to make this frame a keyframe: a request is pending in `requested` and the
    /// interval has passed (the request is then taken).
    pub fn grant(&mut self, requested: &AtomicBool, now: Instant) -> bool {
        let due = self
            .last
            .is_none_or(|t| now.saturating_duration_since(t) >= self.interval);
        if due && requested.swap(false, Ordering::AcqRel) {
            self.last = Some(now);
            true
        } else {
            false
        }
    }
}

/// The RTP timestamp (90 kHz) of tick `pts` at `fps` ticks a second; it wraps, as RTP's does.
pub fn rtp_timestamp(pts: i64, fps: u32) -> u32 {
    ((pts as i128 * 90_000) / i128::from(fps.max(1))) as u32
}

/// Frames leave on a deadline: after each tick, sleep until the next one is due, or, more than a
/// frame behind, count the late frames and start again from now rather than burst.
pub struct Pacer {
    interval: Duration,
    next: Instant,
}

/// What the pacer says after a tick.
#[derive(Debug, PartialEq, Eq)]
pub enum Pace {
    Sleep(Duration),
    /// Due now (less than a frame behind).
    Now,
    /// This many frames late; the schedule restarts from now.
    Late(u64),
}

impl Pacer {
    pub fn new(fps: u32, start: Instant) -> Self {
        Self {
            interval: Duration::from_secs_f64(1.0 / f64::from(fps.max(1))),
            next: start,
        }
    }

    pub fn interval(&self) -> Duration {
        self.interval
    }

    pub fn after_tick(&mut self, now: Instant) -> Pace {
        self.next += self.interval;
        if now > self.next + self.interval {
            let behind = ((now - self.next).as_secs_f64() / self.interval.as_secs_f64()) as u64;
            self.next = now;
            Pace::Late(behind)
        } else if self.next > now {
            Pace::Sleep(self.next - now)
        } else {
            Pace::Now
        }
    }
}

/// Handle to a running clock; dropping it stops the thread.
pub struct VideoStream {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    pub stats: Arc<StreamStats>,
}

/// An encoded frame and its RTP timestamp (90 kHz, from the clock's tick).
#[derive(Debug, Clone)]
pub struct EncodedFrame {
    pub data: Bytes,
    pub rtp_timestamp: u32,
}

/// How the clock follows the viewer's bandwidth.
pub struct Adaptation {
    /// The latest target, published by the sender ([`super::send::send_media`]).
    pub targets: watch::Receiver<Target>,
    /// At most one requested keyframe per this interval.
    pub min_keyframe_interval: Duration,
    /// What the sender's pacer holds, in milliseconds: above [`super::send::SKIP_ABOVE`] the
    /// clock encodes no new frame.
    pub backlog: Arc<AtomicU64>,
}

impl Adaptation {
    /// The configured bitrate and picture, always.
    pub fn fixed(settings: &EncoderSettings) -> Self {
        let target = Target::fixed(settings.bitrate_kbps, settings.fps, settings.width, settings.height);
        Self {
            targets: watch::channel(target).1,
            min_keyframe_interval: Duration::ZERO,
            backlog: Default::default(),
        }
    }
}

/// The encoder must be reopened when the bitrate leaves this range around the one it was opened
/// with (its VBV buffer is sized then).
const REOPEN_BELOW: f64 = 0.6;
const REOPEN_ABOVE: f64 = 2.0;

impl VideoStream {
    /// Start the clock for `clip` with `encoder_name`; media goes to `out`. `keyframe` is set by
    /// the RTCP reader on PLI/FIR and consumed here. `settings` are the clock's rate and the
    /// avatar's size; the bitrate and level come from `adapt`.
    pub fn start(
        clip: Arc<AvatarClip>,
        encoder_name: &'static str,
        settings: EncoderSettings,
        keyframe: Arc<AtomicBool>,
        sinks: Sinks,
        feed: Feed,
        adapt: Adaptation,
    ) -> std::io::Result<Self> {
        let Sinks { viewer: out, taps } = sinks;
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
                    taps: &taps,
                    stats: &stats,
                    feed,
                    adapt,
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
    /// Sinks beyond the viewer, offered the same packets.
    taps: &'a Taps,
    stats: &'a StreamStats,
    feed: Feed,
    adapt: Adaptation,
}

/// The encoder as the clock runs it: opened for one level and bitrate, scaling when the level's
/// size is not the avatar's.
struct Encoding {
    encoder: H264Encoder,
    scaler: Option<Scaler>,
    target: Target,
    /// The bitrate the encoder was opened with (its VBV's size).
    opened_bps: u64,
    /// Frames the level owes: one is encoded each time this reaches the clock's rate.
    credit: u32,
}

impl Encoding {
    fn open(name: &'static str, base: &EncoderSettings, target: Target) -> Result<Self, super::encoder::EncodeError> {
        let level = target.level;
        let settings = EncoderSettings {
            width: level.width,
            height: level.height,
            fps: base.fps,
            frame_rate: level.fps,
            bitrate_kbps: (target.video_bps / 1000).max(1) as u32,
            gop: base.gop,
        };
        let scaler = if (level.width, level.height) == (base.width, base.height) {
            None
        } else {
            Some(Scaler::new((base.width, base.height), (level.width, level.height))?)
        };
        Ok(Self {
            encoder: H264Encoder::open(name, &settings)?,
            scaler,
            target,
            opened_bps: target.video_bps,
            credit: base.fps,
        })
    }

    /// Must the encoder be reopened for `target`?
    fn needs_reopen(&self, target: &Target) -> bool {
        let ratio = target.video_bps as f64 / self.opened_bps.max(1) as f64;
        target.level != self.target.level || !(REOPEN_BELOW..=REOPEN_ABOVE).contains(&ratio)
    }

    /// Whether this tick is one of the level's frames (at 15 of 25 fps: three ticks in five).
    fn shows(&mut self, clock_fps: u32) -> bool {
        self.credit += self.target.level.fps.min(clock_fps);
        if self.credit >= clock_fps {
            self.credit -= clock_fps;
            true
        } else {
            false
        }
    }
}

impl Clock<'_> {
    /// Encode, send and sleep as [`ClockCore`] and [`Pacer`] decide, until stopped.
    fn run(self, encoder_name: &'static str, stop: &AtomicBool) {
        let mut encoding = match Encoding::open(encoder_name, self.settings, *self.adapt.targets.borrow()) {
            Ok(e) => e,
            Err(e) => {
                warn!(error = %e, "could not open the video encoder; session has no video");
                return;
            }
        };
        let mut keyframes = KeyframeGate::new(self.adapt.min_keyframe_interval);
        let mut opus_loss = 0u8;
        let mut reopen_failed: Option<Instant> = None;
        let mut opus = match opus::Encoder::new(AUDIO_RATE, opus::Channels::Mono, opus::Application::Voip) {
            Ok(mut e) => {
                let _ = e.set_bitrate(opus::Bitrate::Bits(32_000));
                // In-band FEC (the answer says `useinbandfec=1`): each packet also carries the
                // previous one at a lower rate, sized to the loss the viewer reports, so a browser
                // rebuilds a lost packet's speech from the next. None while nothing is lost.
                let _ = e.set_inband_fec(true);
                Some(e)
            }
            Err(e) => {
                warn!(error = %e, "could not open the Opus encoder; session has no audio");
                None
            }
        };
        info!(encoder = encoding.encoder.name(), "media clock started");
        let mut core = ClockCore::new(self.settings.fps, self.feed.idle_index.load(Ordering::Acquire));
        let mut pacer = Pacer::new(self.settings.fps, Instant::now());
        let mut packet = vec![0u8; 1500];
        while !stop.load(Ordering::Acquire) && !self.clip.frames.is_empty() {
            let current = self.feed.current_turn.load(Ordering::Acquire);
            let tick = core.tick(self.feed.units.try_iter(), current);
            self.feed.idle_index.store(core.idle_index(), Ordering::Release);
            for ev in tick.events {
                let _ = self.feed.events.send(ev);
            }
            if tick.underrun {
                self.stats.underruns.fetch_add(1, Ordering::Relaxed);
                metrics::counter!("worker_talk_underruns_total").increment(1);
            }
            let picture = match &tick.picture {
                Picture::Talk(frame) => {
                    self.stats.talk_frames.fetch_add(1, Ordering::Relaxed);
                    frame
                }
                Picture::Idle(i) => self.clip.frame(*i),
            };
            let target = *self.adapt.targets.borrow();
            if target.loss_pct != opus_loss {
                opus_loss = target.loss_pct;
                if let Some(e) = opus.as_mut() {
                    let _ = e.set_packet_loss_perc(i32::from(opus_loss.min(MAX_FEC_LOSS_PCT)));
                }
            }
            let may_reopen = reopen_failed.is_none_or(|t: Instant| t.elapsed() >= Duration::from_secs(2));
            if may_reopen && encoding.needs_reopen(&target) {
                match Encoding::open(encoder_name, self.settings, target) {
                    Ok(e) => {
                        debug!(
                            fps = target.level.fps,
                            width = target.level.width,
                            kbps = target.video_bps / 1000,
                            "video level"
                        );
                        encoding = e;
                        reopen_failed = None;
                        keyframes.sent(Instant::now()); // a new encoder starts with one
                    }
                    Err(e) => {
                        // Keep the old encoder (and try again in 2 s, not on every tick).
                        warn!(error = %e, "could not reopen the video encoder; keeping the old level");
                        reopen_failed = Some(Instant::now());
                        encoding.encoder.set_bitrate(target.video_bps);
                    }
                }
            } else if target.video_bps != encoding.target.video_bps {
                encoding.encoder.set_bitrate(target.video_bps);
                encoding.target = target;
            }
            // The pacer still holds more than a few frames' worth (a keyframe on a narrow path):
            // skip this frame rather than queue one that cannot leave either.
            let backlogged = self.adapt.backlog.load(Ordering::Acquire) > super::send::SKIP_ABOVE.as_millis() as u64;
            let due = encoding.shows(self.settings.fps);
            let shown = due && !(backlogged && tick.pts > 0);
            if due && !shown {
                metrics::counter!("worker_video_frames_skipped_total").increment(1);
            }
            let now = Instant::now();
            let force = shown && (tick.pts == 0 || keyframes.grant(self.keyframe, now));
            let scaled = match (&mut encoding.scaler, shown) {
                (Some(scaler), true) => match scaler.scale(picture) {
                    Ok(p) => Some(p),
                    Err(e) => {
                        warn!(error = %e, "scaling failed; stopping the media clock");
                        break;
                    }
                },
                _ => None,
            };
            let picture = scaled.as_ref().unwrap_or(picture);
            let started = Instant::now();
            let encoded = if shown {
                encoding.encoder.encode(picture, tick.pts, force)
            } else {
                Ok(Vec::new())
            };
            match encoded {
                Ok(data) if !data.is_empty() => {
                    let took = started.elapsed();
                    self.stats
                        .encode_micros_total
                        .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
                    metrics::histogram!("worker_encode_seconds").record(took.as_secs_f64());
                    let frame = EncodedFrame {
                        data: Bytes::from(data),
                        rtp_timestamp: rtp_timestamp(tick.pts, self.settings.fps),
                    };
                    if !self.taps.is_empty() {
                        let keyframe = super::encoder::contains_idr(&frame.data);
                        self.taps.offer(&MediaOut::Video(frame.clone()), keyframe);
                    }
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
            if let Some(opus) = opus.as_mut() {
                for pcm in &tick.audio {
                    match opus.encode_float(pcm, &mut packet) {
                        Ok(n) => {
                            let packet = MediaOut::Audio(Bytes::copy_from_slice(&packet[..n]));
                            self.taps.offer(&packet, false);
                            if self.out.try_send(packet).is_ok() {
                                self.stats.audio_packets.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Err(e) => warn!(error = %e, "opus encode failed"),
                    }
                }
            }
            match pacer.after_tick(Instant::now()) {
                Pace::Sleep(d) => std::thread::sleep(d),
                Pace::Now => {}
                Pace::Late(behind) => {
                    self.stats.frames_late.fetch_add(behind, Ordering::Relaxed);
                    metrics::counter!("worker_frames_late_total").increment(behind);
                }
            }
        }
        if let Some(ev) = core.stop() {
            let _ = self.feed.events.send(ev);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn unit(turn: u64, idle_index: usize, last: bool) -> TalkUnit {
        TalkUnit {
            turn,
            frame: Yuv420::new(16, 16),
            idle_index,
            audio: vec![0.5; 1920],
            last,
        }
    }

    fn is_idle(t: &Tick) -> bool {
        matches!(t.picture, Picture::Idle(_))
    }

    #[test]
    fn idle_ticks_advance_the_clip_and_carry_exactly_their_share_of_silence() {
        let mut core = ClockCore::new(25, 7);
        let mut blocks = 0;
        for pts in 0..50 {
            let t = core.tick([], 0);
            assert_eq!(t.pts, pts);
            assert!(matches!(t.picture, Picture::Idle(i) if i == 7 + pts as usize));
            assert!(t.events.is_empty() && !t.underrun);
            assert!(t
                .audio
                .iter()
                .all(|b| b.len() == OPUS_FRAME && b.iter().all(|s| *s == 0.0)));
            blocks += t.audio.len();
        }
        // Two seconds of frames carry exactly two seconds of audio: the tie cannot drift.
        assert_eq!(blocks * OPUS_FRAME, 2 * AUDIO_RATE as usize);
    }

    #[test]
    fn a_turn_waits_for_the_prebuffer_then_plays_its_audio_and_ends() {
        let mut core = ClockCore::new(25, 0);
        // Fewer units than the prebuffer: still idle, no event.
        let t = core.tick([unit(1, 10, false), unit(1, 11, false)], 1);
        assert!(is_idle(&t) && t.events.is_empty() && !t.underrun);
        // The third arrives: speech starts on this very tick, with the first unit's picture.
        let t = core.tick([unit(1, 12, false)], 1);
        assert_eq!(t.events, [ClockEvent::SpeechStarted { turn: 1 }]);
        assert!(matches!(t.picture, Picture::Talk(_)));
        assert_eq!(
            core.idle_index(),
            11,
            "idle playback resumes after the talking frame's source"
        );
        // Its audio is the unit's samples, not silence.
        let t = core.tick([unit(1, 13, true)], 1);
        assert!(t.audio.iter().flatten().any(|s| *s == 0.5));
        let t = core.tick([], 1);
        assert!(matches!(t.picture, Picture::Talk(_)) && t.events.is_empty());
        let t = core.tick([], 1);
        assert!(matches!(t.picture, Picture::Talk(_)));
        assert_eq!(
            t.events,
            [ClockEvent::SpeechEnded {
                turn: 1,
                interrupted: false
            }]
        );
        assert!(is_idle(&core.tick([], 1)));
    }

    #[test]
    fn a_short_answer_plays_at_once_and_a_dry_buffer_is_an_underrun() {
        let mut core = ClockCore::new(25, 0);
        // One unit that is the answer's last: no need to wait for a prebuffer.
        let t = core.tick([unit(4, 0, true)], 4);
        assert_eq!(
            t.events,
            [
                ClockEvent::SpeechStarted { turn: 4 },
                ClockEvent::SpeechEnded {
                    turn: 4,
                    interrupted: false
                }
            ]
        );
        let mut core = ClockCore::new(25, 0);
        core.tick([unit(5, 0, false), unit(5, 1, false), unit(5, 2, false)], 5);
        core.tick([], 5);
        core.tick([], 5);
        let t = core.tick([], 5);
        assert!(
            t.underrun && is_idle(&t),
            "the pipeline fell behind: idle frame, counted"
        );
        assert!(t.audio.iter().flatten().all(|s| *s == 0.0));
    }

    #[test]
    fn an_interrupt_drops_the_turn_at_the_next_tick() {
        let mut core = ClockCore::new(25, 0);
        let units: Vec<_> = (0..6).map(|i| unit(2, i, false)).collect();
        core.tick(units, 2);
        // The session moved on to turn 3 (Stop, or a new question): one tick later turn 2 is gone.
        let t = core.tick([unit(2, 9, false)], 3);
        assert_eq!(
            t.events,
            [ClockEvent::SpeechEnded {
                turn: 2,
                interrupted: true
            }]
        );
        assert!(is_idle(&t));
        assert!(is_idle(&core.tick([], 3)), "nothing of turn 2 is left to show");
        // Stopping the clock mid-turn ends that turn as interrupted too.
        core.tick((0..3).map(|i| unit(3, i, false)), 3);
        assert_eq!(
            core.stop(),
            Some(ClockEvent::SpeechEnded {
                turn: 3,
                interrupted: true
            })
        );
        assert_eq!(core.stop(), None);
    }

    #[test]
    fn a_storm_of_keyframe_requests_yields_one_keyframe_per_interval() {
        let mut gate = KeyframeGate::new(Duration::from_millis(500));
        let requested = AtomicBool::new(false);
        let t0 = Instant::now();
        let mut granted = Vec::new();
        // A PLI before every frame for two seconds at 25 fps.
        for i in 0..50u32 {
            requested.store(true, Ordering::Release);
            let now = t0 + Duration::from_millis(40) * i;
            if gate.grant(&requested, now) {
                granted.push(i);
            }
        }
        assert_eq!(granted, [0, 13, 26, 39], "one every 500 ms (13 frames of 40 ms)");
        // A request too soon is kept, not lost: granted once the interval has passed.
        assert!(requested.load(Ordering::Acquire));
        assert!(gate.grant(&requested, t0 + Duration::from_millis(40 * 39 + 500)));
        assert!(
            !gate.grant(&requested, t0 + Duration::from_secs(10)),
            "no request, no keyframe"
        );
        // A new encoder's first frame counts as one.
        gate.sent(t0 + Duration::from_secs(20));
        requested.store(true, Ordering::Release);
        assert!(!gate.grant(&requested, t0 + Duration::from_millis(20_100)));
    }

    #[test]
    fn the_pacer_keeps_deadlines_and_resynchronises_when_late() {
        let start = Instant::now();
        let mut pacer = Pacer::new(25, start);
        let frame = Duration::from_millis(40);
        // Encoding took 10 ms: sleep the remaining 30 ms (a deadline, not a fixed sleep).
        assert_eq!(
            pacer.after_tick(start + Duration::from_millis(10)),
            Pace::Sleep(Duration::from_millis(30))
        );
        // Slightly behind (less than a frame): go on at once.
        assert_eq!(
            pacer.after_tick(start + frame * 2 + Duration::from_millis(5)),
            Pace::Now
        );
        // Stalled 200 ms: five frames late, counted, and the schedule restarts from now.
        let now = start + frame * 3 + Duration::from_millis(200);
        assert_eq!(pacer.after_tick(now), Pace::Late(5));
        assert_eq!(pacer.after_tick(now), Pace::Sleep(frame));
    }
}
