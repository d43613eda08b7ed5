//! Sending one session's media: audio at once, video paced to the estimate.
//!
//! An encoded frame is many packets; a keyframe, dozens. Written in one burst they arrive at the
//! bottleneck together, and a small queue there drops the tail of the frame (the browser then
//! asks for another keyframe, which is dropped the same way). So video packets leave through a
//! [`PacedQueue`] at the rate [`RateControl`] allows, a few milliseconds' worth at a time, while
//! audio packets skip the queue: the answer is heard on time however the picture fares.
//!
//! The session's first frame skips the pacer: it is what the viewer waits for, and nothing is
//! queued ahead of it yet.
//!
//! The queue's length in time is published to the media clock ([`SendParts::backlog`]), which
//! skips encoding while more than [`SKIP_ABOVE`] is queued: a keyframe larger than the path
//! carries in a frame's time (on a narrow path, most of them) then drains whole instead of being
//! followed by frames that cannot leave either. Frames skipped before encoding leave the stream
//! decodable; frames dropped after it would not. As a last resort the queue is bounded
//! ([`MAX_QUEUE_DELAY`]): past it, what is queued is dropped whole and a keyframe asked for,
//! rather than letting the picture fall seconds behind the sound. Packets are numbered only as
//! they leave ([`Sequence`]), so what the queue drops leaves no hole in the sequence numbers.
//!
//! A packet lost on the way is sent again when the viewer reports it (NACK): the last
//! [`HISTORY`] packets sent are kept ([`History`]), and a reported one goes to the front of the
//! pacer, ahead of new video. Paced, a batch of retransmissions does not arrive at the
//! bottleneck in one burst and overflow the queue that dropped the originals (a viewer that asks
//! only once, as aiortc does, would then wait seconds on the hole). However often a packet is
//! asked for (aiortc repeats every missing number with each new loss, Chromium asks again every
//! round trip), at most one copy waits in the pacer, and the next leaves no sooner than
//! [`RESEND_SPACING`] after the last. And retransmissions are bounded: at most
//! [`RESEND_BACKLOG`] of them wait in the pacer (more are refused until it drains, and the viewer
//! asks again), and nothing first sent over [`MAX_RESEND_AGE`] ago is sent again. Unbounded, the
//! start's overshoot on a 200 kbit/s link (dozens of packets lost, all asked for) queued two
//! seconds of copies at 70 kbit/s, too late to be of use, and no new frame was encoded while
//! they drained: Chromium froze.
//!
//! [`send_media`] is the async task that ties it together: it packetises frames
//! ([`H264Packetizer`], RTP timestamps from the media clock, so a frame rate step does not stretch
//! time), feeds the viewer's REMB and receiver reports to the [`RateControl`], publishes each new
//! [`Target`] to the clock (which sets the encoder's bitrate and picture from it), and tells the
//! session when the level or the estimate moved.
//!
//! [`RateControl`]: super::rate::RateControl

use super::rate::{RateControl, Target};
use super::stream::{ClockEvent, MediaOut};
use crate::rtc::{Feedback, Peer};
use bytes::Bytes;
use rtp::codecs::h264::H264Payloader;
use rtp::packetizer::Payloader;
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// The longest video may wait in the pacer; beyond it the queue is dropped and a keyframe asked
/// for.
pub const MAX_QUEUE_DELAY: Duration = Duration::from_millis(1000);
/// While more than this is queued, the clock encodes no new frame.
pub const SKIP_ABOVE: Duration = Duration::from_millis(150);
/// Packets may leave this far ahead of the pacing schedule (a small burst, as browsers allow).
const BURST: Duration = Duration::from_millis(5);
/// How many sent video packets are kept for retransmission: at 2 Mbit/s, about 2.5 s.
pub const HISTORY: usize = 512;
/// The shortest time between two retransmissions of one packet.
pub const RESEND_SPACING: Duration = Duration::from_millis(100);
/// Retransmissions wait in the pacer for at most this long, at its rate: more are refused until
/// it drains (the viewer asks again).
pub const RESEND_BACKLOG: Duration = Duration::from_millis(250);
/// A packet first sent longer ago than this is not sent again: the viewer has played past it,
/// and a keyframe is its better repair.
pub const MAX_RESEND_AGE: Duration = Duration::from_millis(1000);
/// RTP payload per packet: 1,200 bytes, as webrtc-rs and browsers use, less the RTP header.
const RTP_PAYLOAD: usize = 1200 - 12;
/// How often the controller is asked for a target when no feedback arrives (for its up-holds).
const TARGET_EVERY: Duration = Duration::from_millis(250);

/// Items leave no faster than `rate`, with a burst allowance of [`BURST`]; the queue's drain time
/// is bounded by `max_delay`.
#[derive(Debug)]
pub struct PacedQueue<T> {
    items: VecDeque<(T, usize)>,
    /// How many items at the front were queued with [`PacedQueue::push_urgent`], and their size.
    urgent: usize,
    urgent_bytes: usize,
    bytes: usize,
    rate_bps: u64,
    next: Option<Instant>,
    max_delay: Duration,
}

/// A frame that would not fit: everything queued was dropped.
#[derive(Debug, PartialEq, Eq)]
pub struct Overflow {
    pub dropped: usize,
}

impl<T> PacedQueue<T> {
    pub fn new(rate_bps: u64, max_delay: Duration) -> Self {
        Self {
            items: VecDeque::new(),
            urgent: 0,
            urgent_bytes: 0,
            bytes: 0,
            rate_bps: rate_bps.max(1000),
            next: None,
            max_delay,
        }
    }

    pub fn set_rate(&mut self, bps: u64) {
        self.rate_bps = bps.max(1000);
    }

    pub fn len(&self) -> usize {
        self.items.len()
    }

    pub fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Drop everything queued.
    pub fn clear(&mut self) {
        self.items.clear();
        self.urgent = 0;
        self.urgent_bytes = 0;
        self.bytes = 0;
    }

    /// How long what is queued takes to leave at the current rate.
    pub fn delay(&self) -> Duration {
        self.drain_time(self.bytes)
    }

    /// How long the urgent items queued take to leave.
    pub fn urgent_delay(&self) -> Duration {
        self.drain_time(self.urgent_bytes)
    }

    fn drain_time(&self, bytes: usize) -> Duration {
        Duration::from_secs_f64(bytes as f64 * 8.0 / self.rate_bps as f64)
    }

    /// Queue one frame's items (`(item, bytes)`). If the queue would then take longer than
    /// `max_delay` to drain, everything already queued is dropped first (the new frame is kept:
    /// the caller makes it a keyframe next time, or it already is one).
    pub fn push(&mut self, frame: impl IntoIterator<Item = (T, usize)>) -> Result<(), Overflow> {
        let frame: Vec<_> = frame.into_iter().collect();
        let adding: usize = frame.iter().map(|(_, n)| n).sum();
        let mut result = Ok(());
        if !self.items.is_empty() && self.drain_time(self.bytes + adding) > self.max_delay {
            result = Err(Overflow {
                dropped: self.items.len(),
            });
            self.clear();
        }
        self.bytes += adding;
        self.items.extend(frame);
        result
    }

    /// Queue one item ahead of everything but the urgent items queued before it (a
    /// retransmission). It counts toward the queue's delay, and is dropped with the rest.
    pub fn push_urgent(&mut self, item: T, bytes: usize) {
        self.items.insert(self.urgent, (item, bytes));
        self.urgent += 1;
        self.urgent_bytes += bytes;
        self.bytes += bytes;
    }

    /// The next item, if its time has come.
    pub fn pop(&mut self, now: Instant) -> Option<T> {
        if self.next.is_some_and(|t| t > now + BURST) {
            return None;
        }
        let (item, n) = self.items.pop_front()?;
        if self.urgent > 0 {
            self.urgent -= 1;
            self.urgent_bytes -= n;
        }
        self.bytes -= n;
        // A schedule that fell behind (an idle queue) restarts from now, so idle time is not
        // banked as a burst.
        let from = self.next.map_or(now, |t| t.max(now));
        self.next = Some(from + self.drain_time(n));
        Some(item)
    }

    /// When [`PacedQueue::pop`] will next return an item (`None`: the queue is empty).
    pub fn next_due(&self) -> Option<Instant> {
        if self.items.is_empty() {
            return None;
        }
        Some(
            self.next
                .map_or_else(Instant::now, |t| t.checked_sub(BURST).unwrap_or(t)),
        )
    }
}

/// H.264 access units to RTP packets (RFC 6184, packetization mode 1). The SSRC and payload type
/// are the track binding's; the timestamp is the caller's; the sequence number is given as the
/// packet leaves ([`Sequence`]).
pub struct H264Packetizer {
    payloader: H264Payloader,
    /// Timestamps start at a random value (RFC 3550).
    timestamp_offset: u32,
}

/// RTP sequence numbers, given as packets leave rather than as frames are packetised. A packet
/// the pacer drops (its queue over [`MAX_QUEUE_DELAY`]) then never takes one, so the viewer sees
/// whole frames missing, which the keyframe sent after every drop repairs, and never a hole in the
/// numbers that no retransmission can fill: a receiver would keep asking for it (aiortc's stalls
/// until its jitter buffer overflows, seconds later).
#[derive(Debug)]
pub struct Sequence(u16);

impl Default for Sequence {
    /// From a random start (RFC 3550).
    fn default() -> Self {
        Self(rand::random())
    }
}

impl Sequence {
    pub fn stamp(&mut self, mut packet: rtp::packet::Packet) -> rtp::packet::Packet {
        packet.header.sequence_number = self.0;
        self.0 = self.0.wrapping_add(1);
        packet
    }
}

/// A video packet waiting in the pacer.
#[derive(Debug)]
pub enum Outgoing {
    /// Sent for the first time: numbered as it leaves.
    New(rtp::packet::Packet),
    /// Sent again, with the number it had.
    Again(rtp::packet::Packet),
}

impl Outgoing {
    /// What the packet takes on the wire, for pacing: payload and RTP header.
    fn bytes(&self) -> usize {
        let (Self::New(p) | Self::Again(p)) = self;
        p.payload.len() + 12
    }
}

/// The last [`HISTORY`] video packets sent, by sequence number, for retransmission.
#[derive(Debug)]
pub struct History {
    slots: Vec<Option<Sent>>,
}

#[derive(Debug)]
struct Sent {
    packet: rtp::packet::Packet,
    /// When it was first sent.
    at: Instant,
    /// When a copy last left.
    resent: Option<Instant>,
    /// A copy waits in the pacer.
    queued: bool,
}

impl Default for History {
    fn default() -> Self {
        Self {
            slots: std::iter::repeat_with(|| None).take(HISTORY).collect(),
        }
    }
}

impl History {
    fn slot(seq: u16) -> usize {
        usize::from(seq) % HISTORY
    }

    /// Keep a packet as it is sent (numbered) at `now`; it replaces the one [`HISTORY`] numbers
    /// before.
    pub fn record(&mut self, packet: &rtp::packet::Packet, now: Instant) {
        self.slots[Self::slot(packet.header.sequence_number)] = Some(Sent {
            packet: packet.clone(),
            at: now,
            resent: None,
            queued: false,
        });
    }

    fn get_mut(&mut self, seq: u16) -> Option<&mut Sent> {
        self.slots[Self::slot(seq)]
            .as_mut()
            .filter(|s| s.packet.header.sequence_number == seq)
    }

    /// The packet numbered `seq`, to queue again; `None` if it is no longer kept or older than
    /// [`MAX_RESEND_AGE`], if a copy already waits in the pacer (a receiver asks again every
    /// round trip, and on a narrow link the copy may not have left yet), or if one left less
    /// than [`RESEND_SPACING`] ago (it may still be on its way).
    pub fn resend(&mut self, seq: u16, now: Instant) -> Option<rtp::packet::Packet> {
        let sent = self.get_mut(seq)?;
        if sent.queued
            || now.saturating_duration_since(sent.at) > MAX_RESEND_AGE
            || sent
                .resent
                .is_some_and(|at| now.saturating_duration_since(at) < RESEND_SPACING)
        {
            return None;
        }
        sent.queued = true;
        Some(sent.packet.clone())
    }

    /// The copy of `seq` left at `now`.
    pub fn left(&mut self, seq: u16, now: Instant) {
        if let Some(sent) = self.get_mut(seq) {
            sent.queued = false;
            sent.resent = Some(now);
        }
    }

    /// The pacer dropped what it held: no copy waits any more.
    pub fn unqueue_all(&mut self) {
        for sent in self.slots.iter_mut().flatten() {
            sent.queued = false;
        }
    }
}

impl Default for H264Packetizer {
    fn default() -> Self {
        Self {
            payloader: H264Payloader::default(),
            timestamp_offset: rand::random(),
        }
    }
}

impl H264Packetizer {
    /// One frame (Annex B) at the clock's RTP time `timestamp` (offset by this stream's random
    /// start); the last packet carries the marker bit.
    pub fn packetize(&mut self, annex_b: &Bytes, timestamp: u32) -> Vec<rtp::packet::Packet> {
        let payloads = match self.payloader.payload(RTP_PAYLOAD, annex_b) {
            Ok(p) => p,
            Err(e) => {
                tracing::debug!(error = %e, "frame not packetised");
                return Vec::new();
            }
        };
        let count = payloads.len();
        payloads
            .into_iter()
            .enumerate()
            .map(|(i, payload)| rtp::packet::Packet {
                header: rtp::header::Header {
                    version: 2,
                    marker: i + 1 == count,
                    timestamp: timestamp.wrapping_add(self.timestamp_offset),
                    ..Default::default()
                },
                payload,
            })
            .collect()
    }
}

/// What the sending task works with.
pub struct SendParts {
    pub peer: Arc<Peer>,
    pub media: mpsc::Receiver<MediaOut>,
    pub feedback: mpsc::Receiver<Feedback>,
    /// `None`: the session does not adapt and sends at its fixed target.
    pub control: Option<RateControl>,
    pub targets: watch::Sender<Target>,
    pub keyframe: Arc<AtomicBool>,
    /// The session hears of level and estimate changes here ([`ClockEvent::Quality`]).
    pub events: mpsc::UnboundedSender<ClockEvent>,
    /// What the queue holds, in milliseconds at the pacing rate (the clock reads it).
    pub backlog: Arc<AtomicU64>,
}

/// Send until the media channel closes or the peer fails (see the module docs).
pub async fn send_media(parts: SendParts) {
    let SendParts {
        peer,
        mut media,
        mut feedback,
        mut control,
        targets,
        keyframe,
        events,
        backlog,
    } = parts;
    let mut target = *targets.borrow();
    let mut gauge = QualityGauge::new(&target);
    let mut told = Told::default();
    told.maybe_tell(&target, Instant::now(), &events);
    let mut queue = PacedQueue::new(target.pace_bps, MAX_QUEUE_DELAY);
    let mut packetizer = H264Packetizer::default();
    let mut numbering = Numbering::default();
    let audio_packet = Duration::from_millis(20);
    let mut every = tokio::time::interval(TARGET_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut feedback_open = true;
    let mut first_frame = true;
    loop {
        let due = queue.next_due();
        tokio::select! {
            m = media.recv() => match m {
                None => break,
                Some(MediaOut::Audio(data)) => {
                    if let Err(e) = peer.write_audio(data, audio_packet).await {
                        tracing::debug!(error = %e, "audio write failed");
                        break;
                    }
                }
                Some(MediaOut::Video(frame)) if first_frame => {
                    first_frame = false;
                    let packets = packetizer.packetize(&frame.data, frame.rtp_timestamp);
                    if !numbering.write_all(&peer, packets.into_iter().map(Outgoing::New)).await {
                        break;
                    }
                }
                Some(MediaOut::Video(frame)) => {
                    let packets = packetizer.packetize(&frame.data, frame.rtp_timestamp);
                    let sized = packets.into_iter().map(Outgoing::New).map(|p| {
                        let n = p.bytes();
                        (p, n)
                    });
                    let key = super::encoder::contains_idr(&frame.data);
                    tracing::trace!(bytes = frame.data.len(), key, queued_ms = queue.delay().as_millis() as u64, pace_kbps = target.pace_bps / 1000, "video frame");
                    if let Err(Overflow { dropped }) = queue.push(sized) {
                        metrics::counter!("worker_video_queue_drops_total").increment(1);
                        tracing::debug!(dropped, "pacer queue over its bound: dropped, keyframe next");
                        keyframe.store(true, Ordering::Release);
                        if !key {
                            // Its references were just dropped: it would only show garbage.
                            queue.clear();
                        }
                        // Copies sent again were dropped with the rest: they may be asked for again.
                        numbering.history.unqueue_all();
                    }
                }
            },
            f = feedback.recv(), if feedback_open => match f {
                None => feedback_open = false,
                Some(Feedback::Nack(lost)) => {
                    let now = Instant::now();
                    for seq in lost {
                        // Room for a few in the pacer; the rest wait for the viewer to ask again.
                        if queue.urgent_delay() >= RESEND_BACKLOG {
                            break;
                        }
                        let Some(packet) = numbering.history.resend(seq, now) else {
                            continue;
                        };
                        metrics::counter!("worker_video_retransmits_total").increment(1);
                        let again = Outgoing::Again(packet);
                        let n = again.bytes();
                        queue.push_urgent(again, n);
                    }
                }
                Some(f) => {
                    if let Some(rc) = control.as_mut() {
                        let now = Instant::now();
                        match f {
                            Feedback::Remb(bps) => rc.on_remb(bps, now),
                            Feedback::Loss(fraction) => rc.on_loss(fraction, now),
                            Feedback::Nack(_) => {}
                        }
                    }
                }
            },
            _ = every.tick() => {}
            _ = sleep_until(due), if due.is_some() => {
                // Whatever the pacer lets go now.
                if !numbering.write_all(&peer, std::iter::from_fn(|| queue.pop(Instant::now()))).await {
                    break;
                }
            }
        }
        backlog.store(queue.delay().as_millis() as u64, Ordering::Release);
        if let Some(rc) = control.as_mut() {
            let now = Instant::now();
            let next = rc.target(now);
            if next != target {
                tracing::debug!(
                    estimate_kbps = next.estimate_bps / 1000,
                    video_kbps = next.video_bps / 1000,
                    fps = next.level.fps,
                    height = next.level.height,
                    queued_ms = queue.delay().as_millis() as u64,
                    "target"
                );
                gauge.update(&target, &next);
                target = next;
                queue.set_rate(target.pace_bps);
                targets.send_replace(target);
                told.maybe_tell(&target, now, &events);
            }
        }
    }
}

/// Numbers given to video packets as they leave, and the packets kept for retransmission.
#[derive(Default)]
struct Numbering {
    sequence: Sequence,
    history: History,
}

impl Numbering {
    /// Write `packets` in order, numbering and keeping the new ones; `false` once a write fails
    /// (the peer is gone).
    async fn write_all(&mut self, peer: &Peer, packets: impl IntoIterator<Item = Outgoing>) -> bool {
        for p in packets {
            let packet = match p {
                Outgoing::New(p) => {
                    let p = self.sequence.stamp(p);
                    self.history.record(&p, Instant::now());
                    p
                }
                Outgoing::Again(p) => {
                    self.history.left(p.header.sequence_number, Instant::now());
                    p
                }
            };
            if let Err(e) = peer.write_video_packet(&packet).await {
                tracing::debug!(error = %e, "video write failed");
                return false;
            }
        }
        true
    }
}

async fn sleep_until(due: Option<Instant>) {
    if let Some(t) = due {
        tokio::time::sleep_until(tokio::time::Instant::from_std(t)).await;
    }
}

/// When the session last told the page, and what.
#[derive(Default)]
struct Told {
    last: Option<(Instant, Target)>,
}

impl Told {
    /// Tell on a level change at once; on an estimate that moved by a fifth, at most once a
    /// second.
    fn maybe_tell(&mut self, target: &Target, now: Instant, events: &mpsc::UnboundedSender<ClockEvent>) {
        let tell = match &self.last {
            None => true,
            Some((at, last)) => {
                let moved =
                    (target.estimate_bps as f64 - last.estimate_bps as f64).abs() > last.estimate_bps as f64 * 0.2;
                last.level != target.level || (moved && now.saturating_duration_since(*at) >= Duration::from_secs(1))
            }
        };
        if tell {
            self.last = Some((now, *target));
            let _ = events.send(ClockEvent::Quality(*target));
        }
    }
}

/// This session's share of the aggregate gauges in `/metrics`; taken back on drop.
struct QualityGauge {
    target: Target,
}

impl QualityGauge {
    fn new(target: &Target) -> Self {
        Self::add(target, 1.0);
        Self { target: *target }
    }

    fn add(t: &Target, sign: f64) {
        metrics::gauge!("worker_video_estimate_kbps_sum").increment(sign * t.estimate_bps as f64 / 1000.0);
        metrics::gauge!("worker_video_bitrate_kbps_sum").increment(sign * t.video_bps as f64 / 1000.0);
        metrics::gauge!(
            "worker_video_level_sessions",
            "fps" => t.level.fps.to_string(),
            "height" => t.level.height.to_string()
        )
        .increment(sign);
    }

    fn update(&mut self, old: &Target, new: &Target) {
        if new.level.index != old.level.index {
            let direction = if new.level.index > old.level.index {
                "down"
            } else {
                "up"
            };
            metrics::counter!("worker_video_level_changes_total", "direction" => direction).increment(1);
        }
        Self::add(old, -1.0);
        Self::add(new, 1.0);
        self.target = *new;
    }
}

impl Drop for QualityGauge {
    fn drop(&mut self) {
        Self::add(&self.target, -1.0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn packets_leave_at_the_pacing_rate_with_a_small_burst() {
        // 1 Mbit/s: a 1,250-byte packet takes 10 ms.
        let mut q = PacedQueue::new(1_000_000, Duration::from_secs(1));
        let t0 = Instant::now();
        q.push((0..10).map(|i| (i, 1250))).expect("fits");
        assert_eq!(q.pop(t0), Some(0), "the first leaves at once");
        assert_eq!(q.delay(), Duration::from_millis(90), "nine packets of 10 ms wait");
        assert_eq!(q.pop(t0), None, "the next is 10 ms away");
        assert_eq!(
            q.next_due(),
            Some(t0 + Duration::from_millis(5)),
            "due within the burst allowance"
        );
        assert_eq!(q.pop(t0 + Duration::from_millis(5)), Some(1));
        let mut sent = 2;
        let mut t = t0;
        while q.pop(t).is_some() || !q.is_empty() {
            t += Duration::from_millis(1);
            if q.pop(t).is_some() {
                sent += 1;
            }
            if q.is_empty() {
                break;
            }
        }
        assert_eq!(sent, 10);
        let took = t - t0;
        assert!(
            took >= Duration::from_millis(80) && took <= Duration::from_millis(95),
            "ten packets at 1 Mbit/s take about 90 ms, not one burst: {took:?}"
        );
    }

    #[test]
    fn an_idle_queue_banks_no_burst_and_a_rate_change_applies_to_the_next_packet() {
        let mut q = PacedQueue::new(1_000_000, Duration::from_secs(1));
        let t0 = Instant::now();
        q.push([(1, 1250)]).expect("fits");
        assert_eq!(q.pop(t0), Some(1));
        // A second later (idle): two packets; the second still waits its 10 ms.
        let t1 = t0 + Duration::from_secs(1);
        q.push([(2, 1250), (3, 1250)]).expect("fits");
        assert_eq!(q.pop(t1), Some(2));
        assert_eq!(q.pop(t1), None);
        q.set_rate(100_000);
        assert_eq!(q.pop(t1 + Duration::from_millis(10)), Some(3));
        q.push([(4, 1250)]).expect("fits");
        assert_eq!(
            q.pop(t1 + Duration::from_millis(20)),
            None,
            "100 kbit/s: 100 ms a packet now"
        );
        assert!(q.pop(t1 + Duration::from_millis(110)).is_some());
    }

    #[test]
    fn a_queue_past_its_bound_is_dropped_whole_and_the_new_frame_kept() {
        // 100 kbit/s and 500 ms: 6,250 bytes at most.
        let mut q = PacedQueue::new(100_000, Duration::from_millis(500));
        q.push((0..4).map(|i| (i, 1250))).expect("5,000 bytes fit");
        assert_eq!(q.push((10..12).map(|i| (i, 1250))), Err(Overflow { dropped: 4 }));
        assert_eq!(q.len(), 2);
        assert_eq!(q.pop(Instant::now()), Some(10), "the new frame is what is left");
        // One frame alone is always queued, however large (a keyframe at a low rate).
        let mut q = PacedQueue::new(100_000, Duration::from_millis(500));
        assert!(q.push((0..20).map(|i| (i, 1250))).is_ok());
    }

    /// Only the packets that leave are numbered: what the pacer drops leaves no hole.
    #[test]
    fn sequence_numbers_go_to_packets_as_they_leave_with_no_hole_for_dropped_ones() {
        let mut p = H264Packetizer::default();
        let mut q = PacedQueue::new(100_000, Duration::from_millis(500));
        let mut seq = Sequence::default();
        let frame = |n: usize| Bytes::from([&[0u8, 0, 0, 1, 0x41][..], &vec![0x9a; n]].concat());
        let sized = |pk: Vec<rtp::packet::Packet>| pk.into_iter().map(|pk| (pk, 1200)).collect::<Vec<_>>();
        let sent: Vec<u16> = p
            .packetize(&frame(3000), 0)
            .into_iter()
            .map(|pk| seq.stamp(pk).header.sequence_number)
            .collect();
        // Two frames queued past the bound (100 kbit/s: 500 ms is about five 1,200-byte packets):
        // the first is dropped whole, unsent.
        assert!(q.push(sized(p.packetize(&frame(4000), 3600))).is_ok());
        assert!(q.push(sized(p.packetize(&frame(4000), 7200))).is_err());
        let mut now = Instant::now();
        let after: Vec<u16> = std::iter::from_fn(|| {
            now += Duration::from_secs(1);
            q.pop(now)
        })
        .map(|pk| seq.stamp(pk).header.sequence_number)
        .collect();
        let all: Vec<u16> = sent.iter().chain(&after).copied().collect();
        assert!(after.len() >= 2 && sent.len() >= 2, "{sent:?} {after:?}");
        assert!(all.windows(2).all(|w| w[1] == w[0].wrapping_add(1)), "no hole: {all:?}");
    }

    /// A reported loss leaves ahead of queued video, with its old number, and is not sent twice
    /// within [`RESEND_SPACING`]; what is no longer kept is not sent.
    #[test]
    fn a_reported_loss_is_sent_again_first_with_its_number_once_per_spacing() {
        let mut history = History::default();
        let mut seq = Sequence(65530);
        let packet = |n: u8| rtp::packet::Packet {
            payload: Bytes::from(vec![n; 100]),
            ..Default::default()
        };
        let sent: Vec<_> = (0..10).map(|n| seq.stamp(packet(n))).collect();
        let t0 = Instant::now();
        sent.iter().for_each(|p| history.record(p, t0));
        let mut q = PacedQueue::new(1_000_000, Duration::from_secs(1));
        q.push((10..13).map(|n| (Outgoing::New(packet(n)), 112))).expect("fits");
        // Lost: 65532 and 1 (the numbers wrapped); asked for twice, as aiortc does.
        for lost in [65532, 1, 65532, 1] {
            if let Some(again) = history.resend(lost, t0) {
                q.push_urgent(Outgoing::Again(again), 112);
            }
        }
        assert_eq!(q.len(), 5, "each lost packet queued once");
        assert_eq!(
            q.urgent_delay(),
            Duration::from_secs_f64(224.0 * 8.0 / 1e6),
            "two copies wait"
        );
        assert!(
            history.resend(65532, t0 + Duration::from_secs(1)).is_none(),
            "asked again while its copy waits in the pacer: not queued twice"
        );
        let mut t = t0;
        let (mut left, mut order) = (Vec::new(), Vec::new());
        while !q.is_empty() {
            t += Duration::from_millis(10);
            while let Some(o) = q.pop(t) {
                order.push(match o {
                    Outgoing::Again(p) => {
                        history.left(p.header.sequence_number, t);
                        left.push(t);
                        format!("again {} {}", p.header.sequence_number, p.payload[0])
                    }
                    Outgoing::New(p) => format!("new {}", p.payload[0]),
                });
            }
        }
        assert_eq!(order, ["again 65532 2", "again 1 7", "new 10", "new 11", "new 12"]);
        let gone = left[0];
        assert!(
            history.resend(65532, gone + Duration::from_millis(50)).is_none(),
            "within the spacing after its copy left"
        );
        assert!(
            history.resend(65532, gone + RESEND_SPACING).is_some(),
            "asked again later"
        );
        assert_eq!(q.urgent_delay(), Duration::ZERO, "all left");
        assert!(
            history
                .resend(65531, t0 + MAX_RESEND_AGE + Duration::from_millis(1))
                .is_none(),
            "first sent too long ago: the viewer has played past it"
        );
        history.unqueue_all();
        assert!(
            history.resend(65532, gone + RESEND_SPACING).is_some(),
            "a copy the pacer dropped may be queued again"
        );
        // HISTORY packets later, the slot holds another packet: the old one is gone.
        for _ in 0..HISTORY {
            history.record(&seq.stamp(packet(0)), t0);
        }
        assert!(history.resend(1, t0 + Duration::from_secs(1)).is_none());
    }

    #[test]
    fn frames_become_rtp_packets_with_the_clock_timestamp_and_one_marker() {
        let mut p = H264Packetizer::default();
        // SPS, PPS and an IDR slice of 5,000 bytes: STAP-A for the small ones, FU-A for the slice.
        let mut au = vec![
            0, 0, 0, 1, 0x67, 0x42, 0xe0, 0x1f, 0, 0, 0, 1, 0x68, 0xce, 0x3c, 0x80, 0, 0, 0, 1, 0x65,
        ];
        au.extend(std::iter::repeat_n(0x88u8, 5000));
        let packets = p.packetize(&Bytes::from(au), 3600);
        assert!(packets.len() >= 5, "{}", packets.len());
        let ts = packets[0].header.timestamp;
        assert!(packets
            .iter()
            .all(|pk| pk.header.timestamp == ts && pk.payload.len() <= RTP_PAYLOAD));
        assert_eq!(packets.iter().filter(|pk| pk.header.marker).count(), 1);
        assert!(packets.last().is_some_and(|pk| pk.header.marker));
        let next = p.packetize(&Bytes::from_static(&[0, 0, 0, 1, 0x41, 0x9a]), 7200);
        assert_eq!(
            next[0].header.timestamp.wrapping_sub(ts),
            3600,
            "one frame at 25 fps later"
        );
    }
}
