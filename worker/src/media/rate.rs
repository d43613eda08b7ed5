//! Following the viewer's bandwidth: how fast this session may send, and what picture fits.
//!
//! A path to a phone on 4G or a school's Wi-Fi carries far less than the 2 Mbit/s the encoder
//! could use. Sent anyway, the surplus queues in the bottleneck, and the answer's audio waits
//! behind it. [`RateControl`] turns the viewer's feedback into a sending rate, as browsers do
//! for each other (Google Congestion Control's two halves):
//!
//! * **Delay**: the receiver estimates what the path carries from how packet delays grow, and
//!   says so in REMB messages ([`RateControl::on_remb`]); Chromium and aiortc both send them
//!   when the answer offers `goog-remb` and the packets carry `abs-send-time`. Both measure the
//!   video stream only (audio has no send time on it), so a REMB is read as what *video* may
//!   send; it never rises past 1.5 times what arrived, so the loop probes upward by sending.
//! * **Loss**: every receiver report says what fraction of the video was lost
//!   ([`RateControl::on_loss`]). Above 10 % the estimate falls by half the loss; below 2 % it
//!   grows: quickly at the start (slow start, until the first sign of congestion), then by 8 %
//!   a second, and faster again after a quiet spell, so a path that widens is probed up.
//!
//! The video estimate is the smaller of the two. Audio comes first: it is never throttled, and
//! its share of the path ([`AUDIO_RESERVE_BPS`]) is set aside before video gets any (only the
//! video stream's loss is read: audio shares its path). The encoder gets 85 % of the video estimate
//! ([`VIDEO_SHARE`]) and the pacer sends at the whole of it, so a keyframe's burst drains from
//! the worker's queue (where audio overtakes it) instead of building one at the bottleneck.
//!
//! Below the bitrate that keeps the picture acceptable, the picture degrades in steps
//! ([`Step`]): first the frame rate (25 → 20 → 15 → 10), then the size (512 → 384 → 256), so
//! the mouth stays readable. A step down is taken at once; a step up only after the bitrate has
//! stayed 15 % above the next step's threshold for [`UP_HOLD`], one step at a time, so a level
//! does not flap on a noisy estimate.
//!
//! Everything here is a function of the feedback and the time it arrived: no clock, no I/O.

use std::time::{Duration, Instant};

/// What one session's audio takes on the path: Opus at 32 kbit/s plus 50 packets a second of
/// IP, UDP, RTP and SRTP headers. Reported with the video estimate as the path's estimate.
pub const AUDIO_RESERVE_BPS: f64 = 56_000.0;
/// The encoder's share of the video estimate; the pacer sends at the whole of it.
pub const VIDEO_SHARE: f64 = 0.85;
/// How long the bitrate must stay above a higher step before the picture steps up.
pub const UP_HOLD: Duration = Duration::from_secs(2);
/// The margin above a step's threshold that counts for stepping up.
const UP_MARGIN: f64 = 1.15;
/// Growth per second of the loss-based estimate: at the start, after the first congestion, and
/// after [`QUIET_FOR`] without one.
const SLOW_START_GROWTH: f64 = 1.8;
const STEADY_GROWTH: f64 = 1.08;
const RECOVERY_GROWTH: f64 = 1.25;
const QUIET_FOR: Duration = Duration::from_secs(5);
/// A REMB this much older than the latest receiver report no longer counts.
const REMB_EXPIRES: Duration = Duration::from_secs(5);
/// The smallest step the estimate grows by, per second (8 % of 100 kbit/s would take minutes).
const MIN_GROWTH_BPS: f64 = 20_000.0;

/// One rung of the ladder: at `min_kbps` of video or more, send `fps` frames a second at
/// `scale` of the avatar's size.
#[derive(Debug, Clone, Copy, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields)]
pub struct Step {
    pub min_kbps: u32,
    pub fps: u32,
    #[serde(default = "full_scale")]
    pub scale: f32,
}

fn full_scale() -> f32 {
    1.0
}

/// How much more bitrate a picture of `width`×`height` needs than 512×512 for the same look:
/// the ladder's thresholds are for 512×512, and a larger picture's are raised by its area to the
/// power 0.75 (1280×720: 2.6 times). Smaller pictures keep them.
pub fn area_factor(width: u32, height: u32) -> f64 {
    let area = f64::from(width) * f64::from(height) / (512.0 * 512.0);
    area.max(1.0).powf(0.75)
}

/// The ladder's default rungs (for a 512×512 picture, see [`area_factor`]): 25 fps down to 350 kbit/s of video, 20 down to 200, 15 down to
/// 130, 10 down to 90, then 384 px (of 512) down to 60, and 256 px below.
pub fn default_steps() -> Vec<Step> {
    let step = |min_kbps, fps, scale| Step { min_kbps, fps, scale };
    vec![
        step(350, 25, 1.0),
        step(200, 20, 1.0),
        step(130, 15, 1.0),
        step(90, 10, 1.0),
        step(60, 10, 0.75),
        step(0, 10, 0.5),
    ]
}

/// `[video.adapt]`: how a session follows its viewer's bandwidth.
#[derive(Debug, Clone, PartialEq, serde::Deserialize, serde::Serialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdaptConfig {
    /// Off: every session sends at `video.bitrate_kbps`, full frame rate and size, as before.
    pub enabled: bool,
    /// The video bitrate a session starts at, before any feedback.
    pub start_kbps: u32,
    /// The floor: video never goes below this, however narrow the path.
    pub min_kbps: u32,
    /// Whether the picture may shrink (the ladder's steps with `scale` below 1).
    pub allow_resolution_drop: bool,
    /// The ladder, highest first (sorted on load); the frame rate never exceeds `video.fps`.
    pub steps: Vec<Step>,
    /// At most one keyframe per this many milliseconds, however many PLIs arrive.
    pub min_keyframe_interval_ms: u64,
}

impl Default for AdaptConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            start_kbps: 500,
            min_kbps: 60,
            allow_resolution_drop: true,
            steps: default_steps(),
            min_keyframe_interval_ms: 500,
        }
    }
}

impl AdaptConfig {
    /// Check the ladder; `max_kbps` is `video.bitrate_kbps`.
    pub fn validate(&self, max_kbps: u32) -> Result<(), String> {
        if self.steps.is_empty() {
            return Err("video.adapt.steps: at least one step".into());
        }
        if let Some(s) = self
            .steps
            .iter()
            .find(|s| s.fps == 0 || !(s.scale > 0.1 && s.scale <= 1.0))
        {
            return Err(format!(
                "video.adapt.steps: fps must be at least 1 and scale in (0.1, 1] (got fps {}, scale {})",
                s.fps, s.scale
            ));
        }
        if self.min_kbps == 0 || self.min_kbps > max_kbps {
            return Err(format!(
                "video.adapt.min_kbps must be between 1 and video.bitrate_kbps ({max_kbps}); got {}",
                self.min_kbps
            ));
        }
        Ok(())
    }
}

/// The picture one step sends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Level {
    /// The step's index in the ladder (0: the best).
    pub index: usize,
    pub fps: u32,
    pub width: u32,
    pub height: u32,
}

/// What the session sends now.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Target {
    /// The path's estimated capacity, audio included.
    pub estimate_bps: u64,
    /// The encoder's bitrate.
    pub video_bps: u64,
    /// The rate video packets leave at.
    pub pace_bps: u64,
    pub level: Level,
    /// The share of packets the path lost at the latest receiver report, in percent (read from
    /// video; audio shares the path). The Opus encoder sizes its in-band FEC to it.
    pub loss_pct: u8,
}

impl Target {
    /// A fixed target for sessions that do not adapt: the configured bitrate and picture.
    pub fn fixed(bitrate_kbps: u32, fps: u32, width: u32, height: u32) -> Self {
        let video_bps = u64::from(bitrate_kbps) * 1000;
        Self {
            estimate_bps: video_bps * 2 + AUDIO_RESERVE_BPS as u64,
            video_bps,
            // Twice the bitrate: a keyframe leaves within a few frames, never in one burst.
            pace_bps: video_bps * 2,
            loss_pct: 0,
            level: Level {
                index: 0,
                fps,
                width,
                height,
            },
        }
    }
}

/// The controller for one session (see the module docs).
#[derive(Debug)]
pub struct RateControl {
    steps: Vec<Step>,
    min_bps: f64,
    max_bps: f64,
    /// The avatar's own size and the session's clock rate: the ladder scales from these.
    width: u32,
    height: u32,
    fps: u32,
    /// The loss-based video estimate, bits per second.
    loss_based: f64,
    /// The receiver's video estimate, and when it came.
    remb: Option<(f64, Instant)>,
    slow_start: bool,
    last_congestion: Option<Instant>,
    last_report: Option<Instant>,
    /// The latest receiver report's loss fraction.
    loss: f64,
    level: usize,
    up_since: Option<Instant>,
}

impl RateControl {
    /// `max_kbps` is `video.bitrate_kbps`; `width`, `height` and `fps` are the avatar's.
    pub fn new(cfg: &AdaptConfig, max_kbps: u32, width: u32, height: u32, fps: u32) -> Self {
        let factor = area_factor(width, height);
        let mut steps: Vec<Step> = cfg
            .steps
            .iter()
            .filter(|s| cfg.allow_resolution_drop || s.scale >= 1.0)
            .map(|s| Step {
                min_kbps: (f64::from(s.min_kbps) * factor).round() as u32,
                ..*s
            })
            .collect();
        if steps.is_empty() {
            steps.push(Step {
                min_kbps: 0,
                fps,
                scale: 1.0,
            });
        }
        steps.sort_by_key(|s| std::cmp::Reverse(s.min_kbps));
        // The last step takes whatever is left.
        if let Some(last) = steps.last_mut() {
            last.min_kbps = 0;
        }
        let max_bps = f64::from(max_kbps.max(1)) * 1000.0;
        let min_bps = (f64::from(cfg.min_kbps) * 1000.0).min(max_bps);
        let start_video = (f64::from(cfg.start_kbps) * 1000.0).clamp(min_bps, max_bps);
        let mut rc = Self {
            steps,
            min_bps,
            max_bps,
            width,
            height,
            fps: fps.max(1),
            loss_based: start_video / VIDEO_SHARE,
            remb: None,
            slow_start: true,
            last_congestion: None,
            last_report: None,
            loss: 0.0,
            level: 0,
            up_since: None,
        };
        rc.level = rc.step_for(rc.video_bps(rc.estimate()));
        rc
    }

    /// The receiver's estimate (REMB), in bits per second.
    pub fn on_remb(&mut self, bps: u64, now: Instant) {
        let bps = bps as f64;
        if bps < self.estimate() * 0.95 {
            self.congested(now);
            // The loss-based half must not sit far above what the receiver allows, or the first
            // REMB that rises would let a long-stale estimate through at once.
            self.loss_based = self.loss_based.min(bps * 1.5);
        }
        self.remb = Some((bps, now));
    }

    /// A receiver report: `fraction` of the video packets since the last report were lost.
    pub fn on_loss(&mut self, fraction: f64, now: Instant) {
        let since = self
            .last_report
            .map_or(Duration::from_secs(1), |t| now.saturating_duration_since(t))
            .min(Duration::from_secs(1));
        self.last_report = Some(now);
        self.loss = fraction.clamp(0.0, 1.0);
        if fraction > 0.10 {
            self.loss_based *= 1.0 - 0.5 * fraction.min(1.0);
            self.congested(now);
        } else if fraction >= 0.02 {
            self.congested(now);
        } else {
            let growth = if self.slow_start {
                SLOW_START_GROWTH
            } else if self
                .last_congestion
                .is_some_and(|t| now.saturating_duration_since(t) >= QUIET_FOR)
            {
                RECOVERY_GROWTH
            } else {
                STEADY_GROWTH
            };
            let secs = since.as_secs_f64();
            let grown = self.loss_based * growth.powf(secs);
            self.loss_based = grown.max(self.loss_based + MIN_GROWTH_BPS * secs);
        }
        let ceiling = self.max_bps / VIDEO_SHARE;
        let floor = self.min_bps / VIDEO_SHARE;
        self.loss_based = self.loss_based.clamp(floor, ceiling);
    }

    fn congested(&mut self, now: Instant) {
        self.slow_start = false;
        self.last_congestion = Some(now);
    }

    /// What video may send: the smaller of the two halves (a REMB older than [`REMB_EXPIRES`]
    /// no longer counts: a receiver that stopped sending them is not held to the last one).
    fn estimate(&self) -> f64 {
        match self.remb {
            Some((r, at))
                if self
                    .last_report
                    .is_none_or(|t| t.saturating_duration_since(at) < REMB_EXPIRES) =>
            {
                r.min(self.loss_based)
            }
            _ => self.loss_based,
        }
    }

    fn video_bps(&self, estimate: f64) -> f64 {
        (estimate * VIDEO_SHARE).round().clamp(self.min_bps, self.max_bps)
    }

    /// The highest step the video bitrate reaches.
    fn step_for(&self, video_bps: f64) -> usize {
        self.steps
            .iter()
            .position(|s| video_bps >= f64::from(s.min_kbps) * 1000.0)
            .unwrap_or(self.steps.len() - 1)
    }

    /// What to send now: the estimate, the encoder's bitrate, the pacing rate and the picture.
    pub fn target(&mut self, now: Instant) -> Target {
        let estimate = self.estimate();
        let video = self.video_bps(estimate);
        let fits = self.step_for(video);
        if fits > self.level {
            // Narrower: step down at once, as far as needed.
            self.level = fits;
            self.up_since = None;
        } else if fits < self.level {
            let next = self.level - 1;
            let threshold = f64::from(self.steps[next].min_kbps) * 1000.0 * UP_MARGIN;
            if video >= threshold {
                let since = *self.up_since.get_or_insert(now);
                if now.saturating_duration_since(since) >= UP_HOLD {
                    self.level = next;
                    self.up_since = None;
                }
            } else {
                self.up_since = None;
            }
        } else {
            self.up_since = None;
        }
        Target {
            estimate_bps: (estimate + AUDIO_RESERVE_BPS).round() as u64,
            video_bps: video as u64,
            pace_bps: (estimate.round() as u64).max(video as u64),
            level: self.level(),
            loss_pct: (self.loss * 100.0).round() as u8,
        }
    }

    fn level(&self) -> Level {
        let step = self.steps[self.level];
        // Even sizes (4:2:0), never larger than the avatar.
        let scaled = |v: u32| (((v as f32 * step.scale) as u32) & !1).clamp(2, v.max(2));
        Level {
            index: self.level,
            fps: step.fps.clamp(1, self.fps),
            width: scaled(self.width),
            height: scaled(self.height),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn controller() -> (RateControl, Instant) {
        (
            RateControl::new(&AdaptConfig::default(), 2000, 512, 512, 25),
            Instant::now(),
        )
    }

    /// Receiver reports every `every` with `loss`, and REMB `remb` (if any), for `secs`.
    fn feed(rc: &mut RateControl, t: &mut Instant, secs: u64, loss: f64, remb: Option<u64>) -> Target {
        let every = Duration::from_millis(250);
        let mut last = rc.target(*t);
        for _ in 0..(secs * 4) {
            *t += every;
            if let Some(r) = remb {
                rc.on_remb(r, *t);
            }
            rc.on_loss(loss, *t);
            last = rc.target(*t);
        }
        last
    }

    #[test]
    fn starts_conservatively_and_ramps_up_to_the_ceiling_on_a_clean_path() {
        let (mut rc, mut t) = controller();
        let first = rc.target(t);
        assert_eq!(first.video_bps, 500_000, "the configured start");
        assert_eq!((first.level.fps, first.level.width), (25, 512));
        let after_2s = feed(&mut rc, &mut t, 2, 0.0, None);
        assert!(after_2s.video_bps > 1_200_000, "slow start: {after_2s:?}");
        let after_5s = feed(&mut rc, &mut t, 3, 0.0, None);
        assert_eq!(after_5s.video_bps, 2_000_000, "capped at video.bitrate_kbps");
    }

    #[test]
    fn falls_within_a_second_when_the_receiver_reports_a_narrow_path() {
        let (mut rc, mut t) = controller();
        feed(&mut rc, &mut t, 5, 0.0, None);
        // The path narrows to 400 kbit/s: the receiver's REMB for video says about 300.
        t += Duration::from_millis(200);
        rc.on_remb(300_000, t);
        let now = rc.target(t);
        assert_eq!(now.estimate_bps, 356_000, "video's estimate plus audio's share");
        assert_eq!(now.video_bps, 255_000, "85 % of it for the encoder");
        assert_eq!(now.pace_bps, 300_000, "the pacer sends at the whole of it");
        assert_eq!(now.level.fps, 20, "below 350 kbit/s of video: 20 fps");
        assert_eq!(now.level.width, 512, "the size holds while the frame rate steps");
    }

    #[test]
    fn heavy_loss_cuts_the_estimate_and_light_loss_holds_it() {
        let (mut rc, mut t) = controller();
        let before = rc.target(t).video_bps;
        t += Duration::from_millis(500);
        rc.on_loss(0.05, t);
        assert_eq!(rc.target(t).video_bps, before, "2-10 %: hold");
        assert_eq!(rc.target(t).loss_pct, 5, "the loss, for the audio's FEC");
        t += Duration::from_millis(500);
        rc.on_loss(0.4, t);
        assert_eq!(rc.target(t).video_bps, before * 8 / 10, "40 % loss: minus 20 %");
        assert_eq!(rc.target(t).loss_pct, 40);
        // After congestion, growth is 8 % a second, not slow start.
        let t0 = rc.target(t).video_bps as f64;
        let grown = feed(&mut rc, &mut t, 1, 0.0, None).video_bps as f64;
        assert!(grown <= t0 * 1.09 && grown > t0, "{t0} -> {grown}");
    }

    #[test]
    fn a_720p_avatar_needs_more_bitrate_for_each_step() {
        let (mut small, t0) = controller();
        let mut large = RateControl::new(&AdaptConfig::default(), 2000, 1280, 720, 25);
        let (mut t, mut u) = (t0, t0);
        let s = feed(&mut small, &mut t, 10, 0.0, Some(700_000));
        let l = feed(&mut large, &mut u, 10, 0.0, Some(700_000));
        assert_eq!(s.video_bps, 595_000);
        assert_eq!((s.level.fps, s.level.width, s.level.height), (25, 512, 512));
        // 595 kbit/s of video: under 1280×720's 25 fps step (350 × 2.6 = 898), over its 20 fps
        // one (513).
        assert_eq!((l.level.fps, l.level.width, l.level.height), (20, 1280, 720));
        assert!((area_factor(1280, 720) - 2.567).abs() < 0.01);
        assert_eq!(area_factor(256, 256), 1.0, "smaller pictures keep the thresholds");
    }

    #[test]
    fn steps_down_at_once_and_up_one_step_at_a_time_after_a_hold() {
        let (mut rc, mut t) = controller();
        feed(&mut rc, &mut t, 5, 0.0, None);
        // 200 kbit/s path: a REMB of 80 kbit/s, 68 for the encoder: 10 fps at 384 px.
        let low = feed(&mut rc, &mut t, 1, 0.0, Some(80_000));
        assert_eq!((low.level.fps, low.level.width, low.level.height), (10, 384, 384));
        // The path widens: REMB 2 Mbit/s. Each step needs its hold, one at a time.
        let mut seen = vec![low.level.index];
        for _ in 0..80 {
            t += Duration::from_millis(250);
            rc.on_remb(3_000_000, t);
            rc.on_loss(0.0, t);
            let level = rc.target(t).level.index;
            if seen.last() != Some(&level) {
                seen.push(level);
            }
        }
        assert_eq!(seen, [4, 3, 2, 1, 0], "one step at a time");
    }

    #[test]
    fn a_noisy_estimate_does_not_flap_the_level() {
        let (mut rc, mut t) = controller();
        feed(&mut rc, &mut t, 5, 0.0, None);
        feed(&mut rc, &mut t, 1, 0.0, Some(300_000));
        let level = rc.target(t).level.index;
        assert_eq!(level, 1);
        let mut changes = 0;
        for i in 0..40 {
            t += Duration::from_millis(250);
            // Alternating above and below the 25 fps threshold every quarter second.
            rc.on_remb(if i % 2 == 0 { 600_000 } else { 300_000 }, t);
            rc.on_loss(0.0, t);
            if rc.target(t).level.index != level {
                changes += 1;
            }
        }
        assert_eq!(changes, 0);
    }

    #[test]
    fn without_resolution_drops_the_floor_is_the_lowest_full_size_step() {
        let cfg = AdaptConfig {
            allow_resolution_drop: false,
            ..AdaptConfig::default()
        };
        let mut rc = RateControl::new(&cfg, 2000, 512, 512, 25);
        let mut t = Instant::now();
        let low = feed(&mut rc, &mut t, 2, 0.0, Some(50_000));
        assert_eq!((low.level.fps, low.level.width), (10, 512));
        assert_eq!(low.video_bps, 60_000, "never below min_kbps");
    }

    #[test]
    fn a_fixed_target_and_bad_ladders() {
        let f = Target::fixed(2000, 25, 512, 512);
        assert_eq!((f.video_bps, f.level.fps), (2_000_000, 25));
        let mut cfg = AdaptConfig::default();
        assert!(cfg.validate(2000).is_ok());
        cfg.steps[0].fps = 0;
        assert!(cfg.validate(2000).is_err());
        let cfg = AdaptConfig {
            min_kbps: 3000,
            ..AdaptConfig::default()
        };
        assert!(cfg.validate(2000).is_err());
        let cfg = AdaptConfig {
            steps: vec![],
            ..AdaptConfig::default()
        };
        assert!(cfg.validate(2000).is_err());
    }
}
