//! The per-session video clock: one thread that encodes a frame every `1/fps` seconds.
//!
//! Frames leave on a deadline (`next += interval`), not after a sleep of fixed length, so encode
//! time does not stretch the clock. If the thread falls more than one frame behind, it counts the
//! frames as late and resynchronises rather than bursting. Encoded samples go through a small
//! bounded channel to an async task that writes them to the WebRTC track; if that task lags, the
//! frame is dropped and counted instead of blocking the clock.

use super::avatar::AvatarClip;
use super::encoder::{EncoderSettings, H264Encoder};
use bytes::Bytes;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;
use tracing::{info, warn};

/// Counters a session exposes.
#[derive(Debug, Default)]
pub struct StreamStats {
    pub frames_sent: AtomicU64,
    pub frames_late: AtomicU64,
    pub frames_dropped: AtomicU64,
    pub encode_micros_total: AtomicU64,
}

/// Handle to a running video clock; dropping it stops the thread.
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
    /// Start encoding `clip` with `encoder_name`; frames go to `out`. `keyframe` is set by the
    /// RTCP reader on PLI/FIR and consumed here.
    pub fn start(
        clip: Arc<AvatarClip>,
        encoder_name: &'static str,
        settings: EncoderSettings,
        keyframe: Arc<AtomicBool>,
        out: mpsc::Sender<EncodedFrame>,
    ) -> std::io::Result<Self> {
        let stop = Arc::new(AtomicBool::new(false));
        let stats = Arc::new(StreamStats::default());
        let thread = {
            let (stop, stats) = (Arc::clone(&stop), Arc::clone(&stats));
            let span = tracing::Span::current();
            std::thread::Builder::new().name("video-clock".into()).spawn(move || {
                let _entered = span.enter();
                run_clock(&clip, encoder_name, &settings, &keyframe, &out, &stop, &stats);
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

fn run_clock(
    clip: &AvatarClip,
    encoder_name: &'static str,
    settings: &EncoderSettings,
    keyframe: &AtomicBool,
    out: &mpsc::Sender<EncodedFrame>,
    stop: &AtomicBool,
    stats: &StreamStats,
) {
    let mut encoder = match H264Encoder::open(encoder_name, settings) {
        Ok(e) => e,
        Err(e) => {
            warn!(error = %e, "could not open the video encoder; session has no video");
            return;
        }
    };
    info!(encoder = encoder.name(), "video clock started");
    let interval = Duration::from_secs_f64(1.0 / settings.fps as f64);
    let mut next = Instant::now();
    let mut pts: i64 = 0;
    while !stop.load(Ordering::Acquire) && !clip.frames.is_empty() {
        let picture = &clip.frames[pts as usize % clip.frames.len()];
        let force = pts == 0 || keyframe.swap(false, Ordering::AcqRel);
        let started = Instant::now();
        match encoder.encode(picture, pts, force) {
            Ok(data) if !data.is_empty() => {
                let took = started.elapsed();
                stats
                    .encode_micros_total
                    .fetch_add(took.as_micros() as u64, Ordering::Relaxed);
                metrics::histogram!("worker_encode_seconds").record(took.as_secs_f64());
                match out.try_send(EncodedFrame {
                    data: Bytes::from(data),
                    duration: interval,
                }) {
                    Ok(()) => {
                        stats.frames_sent.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("worker_frames_sent_total").increment(1);
                    }
                    Err(mpsc::error::TrySendError::Full(_)) => {
                        stats.frames_dropped.fetch_add(1, Ordering::Relaxed);
                        metrics::counter!("worker_frames_dropped_total").increment(1);
                        keyframe.store(true, Ordering::Release); // the receiver lost a reference
                    }
                    Err(mpsc::error::TrySendError::Closed(_)) => break,
                }
            }
            Ok(_) => {}
            Err(e) => {
                warn!(error = %e, "encode failed; stopping the video clock");
                break;
            }
        }
        pts += 1;
        next += interval;
        let now = Instant::now();
        if now > next + interval {
            let behind = ((now - next).as_secs_f64() / interval.as_secs_f64()) as u64;
            stats.frames_late.fetch_add(behind, Ordering::Relaxed);
            metrics::counter!("worker_frames_late_total").increment(behind);
            next = now;
        } else if next > now {
            std::thread::sleep(next - now);
        }
    }
}
