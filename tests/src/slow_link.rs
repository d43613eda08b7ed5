//! A viewer behind a slow link: a second network namespace joined to the test's own by a veth
//! pair, the link from the server's side limited by `tc tbf`, and an independent WebRTC viewer
//! (aiortc, `tests/py/webrtc_probe.py`) in it.
//!
//! ```text
//!  test namespace (relay, worker)                    viewer namespace (aiortc probe)
//!  ae-s0 198.51.100.1/24  ──── tbf on egress ────▶  ae-s1 198.51.100.2/24
//! ```
//!
//! The shaping is on what the server sends, as a slow downlink to a phone or a school is. The
//! probe's report ([`Report`]) is reduced here to what a viewer notices: frames a second, the
//! first frame, the delay from a question to the first sound of its answer, gaps in the audio,
//! and freezes.

use crate::netns::{self, ChildNs};
use serde_json::Value;
use std::path::PathBuf;
use std::process::Command;

/// The server side's end of the link.
pub const SERVER_DEV: &str = "ae-s0";
pub const SERVER_IP: &str = "198.51.100.1";
pub const VIEWER_IP: &str = "198.51.100.2";
/// Audio at least this loud (RMS, 0..1) counts as the answer's voice; silence decodes to 0.
pub const LOUD: f64 = 0.01;

/// The viewer's namespace and the link to it.
pub struct SlowLink {
    pub viewer: ChildNs,
}

impl SlowLink {
    /// Make the link (unlimited); call inside a test's own namespace.
    pub fn new() -> Self {
        netns::sh(&format!(
            "ip link add {SERVER_DEV} type veth peer name ae-s1 && ip addr add {SERVER_IP}/24 dev {SERVER_DEV} && ip link set {SERVER_DEV} up"
        ));
        let viewer = ChildNs::new();
        netns::sh(&format!("ip link set ae-s1 netns {}", viewer.pid()));
        viewer.sh(&format!("ip addr add {VIEWER_IP}/24 dev ae-s1 && ip link set ae-s1 up"));
        Self { viewer }
    }

    /// Limit what the server sends to `kbit` kbit/s (`None`: unlimited), at once, mid-session
    /// too. The bucket holds 300 ms of the rate (at least 8 KiB); the queue, 200 ms.
    pub fn limit(&self, kbit: Option<u32>) {
        match kbit {
            None => {
                let _ = Command::new("tc")
                    .args(["qdisc", "del", "dev", SERVER_DEV, "root"])
                    .status();
            }
            Some(k) => {
                let burst = (k as usize * 1000 / 8 * 3 / 10).max(8192);
                netns::sh(&format!(
                    "tc qdisc replace dev {SERVER_DEV} root tbf rate {k}kbit burst {burst} latency 200ms"
                ));
            }
        }
    }

    /// As [`SlowLink::limit`], on what the viewer's side sends (a worker placed there, behind the
    /// link, sends its media through this limit).
    pub fn limit_far(&self, kbit: u32) {
        let burst = (kbit as usize * 1000 / 8 * 3 / 10).max(8192);
        self.viewer.sh(&format!(
            "tc qdisc replace dev ae-s1 root tbf rate {kbit}kbit burst {burst} latency 200ms"
        ));
    }

    /// Run the probe against `ws_url` for `seconds`, asking a question at `text_at` seconds.
    /// Blocking: call from `spawn_blocking`.
    pub fn probe(&self, ws_url: &str, seconds: f64, text_at: Option<f64>) -> Report {
        run_probe(Some(self.viewer.pid()), ws_url, seconds, text_at)
    }
}

impl Default for SlowLink {
    fn default() -> Self {
        Self::new()
    }
}

/// The Python with aiortc (scripts/install-deps).
pub fn python() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../.tools/rtcpy/bin/python")
}

pub fn script(name: &str) -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("py").join(name)
}

/// Run the aiortc probe (in namespace `netns` if given) and parse its report.
pub fn run_probe(netns: Option<u32>, ws_url: &str, seconds: f64, text_at: Option<f64>) -> Report {
    let mut cmd = match netns {
        Some(pid) => {
            let mut c = Command::new("nsenter");
            c.args(["-t", &pid.to_string(), "-n", "--"]).arg(python());
            c
        }
        None => Command::new(python()),
    };
    cmd.arg(script("webrtc_probe.py"))
        .args(["--ws", ws_url, "--seconds", &seconds.to_string()]);
    if let Some(t) = text_at {
        cmd.args(["--text-at", &t.to_string()]);
    }
    let out = cmd
        .output()
        .expect("run the aiortc probe (scripts/install-deps makes .tools/rtcpy)");
    assert!(
        out.status.success(),
        "probe failed: {}\n{}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
    let v: Value = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "probe output is not JSON: {e}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    Report::from_json(&v)
}

/// The longest gap between consecutive `times` (in order) that starts in `from..to`.
fn longest_gap(times: impl Iterator<Item = f64>, from: f64, to: f64) -> f64 {
    let times: Vec<f64> = times.filter(|t| *t >= from).collect();
    times
        .windows(2)
        .filter(|w| w[0] < to)
        .map(|w| w[1] - w[0])
        .fold(0.0, f64::max)
}

/// What the viewer got.
#[derive(Debug, Default)]
pub struct Report {
    /// The probe's start (its clock's zero) on the wall clock, seconds since the Unix epoch.
    pub t0_unix: f64,
    pub connected_at: f64,
    pub answer_at: Option<f64>,
    /// (arrival, width, height) of each decoded frame.
    pub frames: Vec<(f64, u32, u32)>,
    /// (arrival, RMS) of each decoded audio frame.
    pub audio: Vec<(f64, f64)>,
    pub text_sent_at: Option<f64>,
    /// (arrival, event) of each signaling event.
    pub events: Vec<(f64, Value)>,
    /// (sent, sequence numbers) of each NACK the viewer sent (the first 64 numbers).
    pub nacks: Vec<(f64, Vec<u16>)>,
    /// When the viewer asked for a keyframe (PLI).
    pub plis: Vec<f64>,
    /// (arrival, sequence number) of each audio RTP packet, before the viewer's jitter buffer.
    pub audio_rtp: Vec<(f64, u16)>,
}

impl Report {
    fn from_json(v: &Value) -> Self {
        let f = |v: &Value| v.as_f64().unwrap_or(f64::NAN);
        let rows = |key: &str| v[key].as_array().cloned().unwrap_or_default();
        Self {
            t0_unix: f(&v["t0_unix"]),
            connected_at: f(&v["connected_at"]),
            answer_at: v["answer_at"].as_f64(),
            frames: rows("video")
                .iter()
                .map(|r| {
                    (
                        f(&r[0]),
                        r[1].as_u64().unwrap_or(0) as u32,
                        r[2].as_u64().unwrap_or(0) as u32,
                    )
                })
                .collect(),
            audio: rows("audio").iter().map(|r| (f(&r[0]), f(&r[1]))).collect(),
            text_sent_at: v["text_sent_at"].as_f64(),
            events: rows("events").iter().map(|r| (f(&r[0]), r[1].clone())).collect(),
            nacks: rows("nacks")
                .iter()
                .map(|r| {
                    let seqs = r[1].as_array().map_or(&[][..], |a| a.as_slice());
                    (
                        f(&r[0]),
                        seqs.iter().filter_map(|n| n.as_u64()).map(|n| n as u16).collect(),
                    )
                })
                .collect(),
            plis: rows("plis").iter().map(f).collect(),
            audio_rtp: rows("audio_rtp")
                .iter()
                .map(|r| (f(&r[0]), r[1].as_u64().unwrap_or(0) as u16))
                .collect(),
        }
    }

    /// When `at` (wall clock) fell on the probe's clock, in seconds.
    pub fn probe_time(&self, at: std::time::SystemTime) -> f64 {
        let unix = at
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64());
        unix - self.t0_unix
    }

    /// Frames a second received between `from` and `to` (probe seconds).
    pub fn fps(&self, from: f64, to: f64) -> f64 {
        let n = self.frames.iter().filter(|(t, ..)| *t >= from && *t < to).count();
        n as f64 / (to - from)
    }

    /// The first frame, seconds after the signaling connection opened.
    pub fn first_frame(&self) -> Option<f64> {
        self.frames.first().map(|(t, ..)| t - self.connected_at)
    }

    /// Question to the first loud audio of its answer, in seconds.
    pub fn answer_delay(&self) -> Option<f64> {
        let sent = self.text_sent_at?;
        self.audio
            .iter()
            .find(|(t, rms)| *t > sent && *rms >= LOUD)
            .map(|(t, _)| t - sent)
    }

    /// The longest gap between audio frames after `from` (decoded frames are 20 ms apart).
    pub fn max_audio_gap(&self, from: f64) -> f64 {
        self.max_audio_gap_between(from, f64::INFINITY)
    }

    /// The longest gap between audio packets that starts in `from..to`, in seconds.
    pub fn max_audio_gap_between(&self, from: f64, to: f64) -> f64 {
        longest_gap(self.audio.iter().map(|(t, _)| *t), from, to)
    }

    /// The longest time between two audio packets arriving (on the wire, before the viewer's
    /// jitter buffer), for gaps that start in `from..to`, in seconds: how long the network
    /// delivered no sound.
    pub fn max_audio_wire_gap_between(&self, from: f64, to: f64) -> f64 {
        longest_gap(self.audio_rtp.iter().map(|(t, _)| *t), from, to)
    }

    /// Audio packets that never arrived, among those numbered between the first and the last
    /// that arrived in `from..to`.
    pub fn audio_lost_between(&self, from: f64, to: f64) -> usize {
        let mut seqs: Vec<u16> = self
            .audio_rtp
            .iter()
            .filter(|(t, _)| (from..to).contains(t))
            .map(|(_, s)| *s)
            .collect();
        let Some(&first) = seqs.first() else {
            return 0;
        };
        // Numbers relative to the first, so a wrap past 65535 sorts in order.
        let mut offsets: Vec<u16> = seqs.drain(..).map(|s| s.wrapping_sub(first)).collect();
        offsets.sort_unstable();
        offsets.dedup();
        offsets.last().map_or(0, |last| usize::from(*last) + 1 - offsets.len())
    }

    /// Seconds of freeze after `from`: the sum of the gaps between frames longer than 200 ms.
    pub fn freeze(&self, from: f64) -> f64 {
        self.frames
            .iter()
            .filter(|(t, ..)| *t >= from)
            .collect::<Vec<_>>()
            .windows(2)
            .map(|w| w[1].0 - w[0].0)
            .filter(|gap| *gap > 0.2)
            .sum()
    }

    /// Second by second: frames received, and the NACKs and PLIs the viewer sent (for failure
    /// reports: where a picture stalled, and what the viewer asked for).
    pub fn timeline(&self) -> String {
        let end = self
            .frames
            .last()
            .map_or(0.0, |f| f.0)
            .max(self.nacks.last().map_or(0.0, |n| n.0));
        let mut out = String::from(
            "second: frames, NACKs (packets), PLIs | audio packets (lost), longest gap on the wire, decoded\n",
        );
        for s in 0..=end.ceil() as usize {
            let within = |t: f64| (s as f64..s as f64 + 1.0).contains(&t);
            let frames = self.frames.iter().filter(|f| within(f.0)).count();
            let nacks: Vec<_> = self.nacks.iter().filter(|n| within(n.0)).collect();
            let packets: usize = nacks.iter().map(|n| n.1.len()).sum();
            let plis = self.plis.iter().filter(|t| within(**t)).count();
            let (from, to) = (s as f64, s as f64 + 1.0);
            let audio = self.audio_rtp.iter().filter(|a| within(a.0)).count();
            out += &format!(
                "{s:>3}: {frames:>3}, {} ({packets}), {plis} | {audio} ({}), {:.3}, {:.3}",
                nacks.len(),
                self.audio_lost_between(from, to),
                self.max_audio_wire_gap_between(from, to),
                self.max_audio_gap_between(from, to)
            );
            if let Some((_, last)) = nacks.last() {
                out += &format!("  last asked {last:?}");
            }
            out += "\n";
        }
        out
    }

    /// The `video_quality` events, in order.
    pub fn qualities(&self) -> Vec<(f64, Value)> {
        self.events
            .iter()
            .filter(|(_, e)| e["type"] == "video_quality")
            .cloned()
            .collect()
    }

    /// A one-line summary for failure messages and logs.
    pub fn summary(&self, from: f64, to: f64) -> String {
        let last = self
            .frames
            .last()
            .map(|(_, w, h)| format!("{w}x{h}"))
            .unwrap_or_default();
        format!(
            "fps {:.1}, first frame {:?} s, answer delay {:?} s, max audio gap {:.3} s, freeze {:.2} s, last size {last}, quality {:?}",
            self.fps(from, to),
            self.first_frame(),
            self.answer_delay(),
            self.max_audio_gap(from),
            self.freeze(from),
            self.qualities().last().map(|(_, e)| e.to_string())
        )
    }
}
