//! Recording a session: the media its viewer received, muxed into a fragmented MP4 without
//! re-encoding.
//!
//! [`record`] is one more sink of the session's media fan-out ([`super::fanout`]). It joins as a
//! tap (`SessionHandle::tap("recording", capacity)`), gets the same H.264 access units and Opus
//! packets the browser gets, packet by packet, and muxes them until the session ends and the
//! channel closes. Nothing is decoded or encoded again: a recording costs some memory and disk,
//! not a core. The muxing blocks, so it runs on a blocking thread, never on the async workers.
//!
//! **What is recorded is what the viewer saw.** The encoder follows the viewer's bandwidth
//! ([`super::rate`]): on a weak link the pictures get smaller, fewer and softer, and so does the
//! recording. A change of size comes in band: the keyframe that starts a new level carries its
//! own SPS and PPS, and they stay in the samples. The file's header describes the first
//! keyframe. Decoders that follow in-band parameter sets (FFmpeg's, and so VLC and mpv) show the
//! change. A strict reader may assume the first size all the way through.
//!
//! **Why fragmented.** A plain MP4 writes its index (`moov`) at the end, so a worker killed during
//! a session would leave a file that does not play. Here the header holds an empty `moov`, and the
//! media follows in fragments (`moof` + `mdat`). A fragment is cut at every keyframe and at least
//! once a second (`frag_duration`), and is flushed to disk as it is written. The file is written
//! at its final path from the start. Whatever happens to the worker, the file plays up to about
//! one second before the end.
//!
//! **Timing.** Time 0 is the first keyframe. A picture's time is its RTP timestamp (90 kHz, from
//! the media clock's tick) counted from that keyframe, and unwrapped past 2³². A timestamp that
//! goes back means a new clock: after the browser renegotiates, the new clock starts again from
//! 0. The recording then continues one frame after its last picture, so the file has no gap.
//! Audio packets carry no timestamp, but each is 20 ms long, so the n-th packet after the first
//! keyframe is at n × 960 samples (48 kHz). The clock sends a tick's audio right after the tick's
//! picture, so the two tracks start together. Audio that comes before the first keyframe is
//! dropped.
//!
//! **What a full tap loses.** The fan-out never waits for a slow sink. If the recorder falls
//! behind (a slow disk), packets are lost. Lost video makes the tap wait for the next keyframe, so
//! the file shows a frozen picture for up to one GOP. Each lost audio packet would play the audio
//! after it 20 ms early. So when audio falls more than 60 ms behind the pictures, it moves back
//! onto the pictures' time: a short silence in place of broken lip sync.
//!
//! **How the tracks are described.** The MP4 header needs the H.264 SPS and PPS (`avcC`) and an
//! `OpusHead` (`dOps`) before the first sample. ffmpeg-next has no setter for a stream's
//! extradata, and the workspace forbids `unsafe`, so FFmpeg writes both itself. The first keyframe
//! is read back through FFmpeg's raw H.264 demuxer, whose stream probe extracts the SPS and PPS
//! (and the picture size). An Opus encoder opened with the clock's settings (48 kHz mono,
//! `libopus` like the clock's own encoder) produces the OpusHead, pre-skip included. FFmpeg 4.3's
//! muxer treats Opus in MP4 as experimental, so `strict` is set. Chrome, Firefox, VLC and FFmpeg
//! play it.
//!
//! To record a session, join the tap and spawn [`record`] inside the session's span. It returns
//! when the session ends, with the file's duration, size and SHA-256 ([`Recording`]). Name the
//! files with [`file_name`], and delete expired ones with [`sweep`] on a timer.

use super::encoder::contains_idr;
use super::stream::{EncodedFrame, MediaOut, AUDIO_RATE, OPUS_FRAME};
use ffmpeg_next as ffmpeg;
use sha2::{Digest, Sha256};
use std::ffi::OsStr;
use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

/// Where to record, and the picture size the session was configured for.
#[derive(Debug, Clone)]
pub struct RecordingSpec {
    /// The MP4 to write. Its folder is created if needed. An existing file is never overwritten.
    pub path: PathBuf,
    /// The session's configured picture size. The file's size comes from the first keyframe's
    /// SPS, which is smaller when the viewer's level is lower. A difference is logged.
    pub width: u32,
    pub height: u32,
}

/// A finished recording.
#[derive(Debug, Clone, PartialEq)]
pub struct Recording {
    pub path: PathBuf,
    /// From the first keyframe to the end of the last picture or audio packet.
    pub duration_s: f64,
    /// The file's size.
    pub bytes: u64,
    /// The file's SHA-256, in lower-case hex.
    pub sha256: String,
    /// Pictures written.
    pub video_frames: u64,
    /// Opus packets written. Packets that came before the first keyframe are not counted.
    pub audio_packets: u64,
}

/// Why a recording failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    /// The session ended before its first keyframe. There is nothing to record, and no file was
    /// made.
    #[error("the session ended before its first keyframe; nothing was recorded")]
    Empty,
    /// FFmpeg refused a step of the muxing. `what` names the step.
    #[error("{what}: {source}")]
    Ffmpeg { what: &'static str, source: ffmpeg::Error },
    /// A file or folder could not be created or read.
    #[error("{what} {}: {source}", .path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    /// FFmpeg takes paths as UTF-8 C strings, and this path is not UTF-8 or holds a NUL byte.
    #[error("recording path {} is not UTF-8 or contains a NUL byte", .0.display())]
    Path(PathBuf),
    /// The blocking muxer task panicked or was cancelled.
    #[error("the recording task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Record `media` (a fan-out tap, [`super::fanout::Taps::join`]) into `spec.path` until the
/// channel closes (the session ended), then finish the file.
///
/// The file is made at the first keyframe. A session that ends before one returns
/// [`RecordError::Empty`] and leaves no file. If a write fails part-way, the error is returned
/// and the file is kept: it plays up to the last fragment written. The muxing runs on a blocking
/// thread inside the caller's span, so its log lines carry the session's fields.
pub async fn record(media: mpsc::Receiver<MediaOut>, spec: RecordingSpec) -> Result<Recording, RecordError> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(|| record_blocking(media, spec))).await?
}

/// Delete the recordings (`*.mp4`) in `dir` last modified more than `retention` ago, and return
/// how many were deleted. A missing `dir` has none.
///
/// Only regular files directly in `dir` are considered. Symbolic links are never followed, so a
/// link to a file elsewhere is never deleted through. A recording in progress is written at
/// least once a second, so it is never old enough to delete. A file that cannot be deleted is
/// logged and skipped.
pub fn sweep(dir: &Path, retention: Duration) -> std::io::Result<usize> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    let now = SystemTime::now();
    let mut deleted = 0;
    for entry in entries {
        let Ok(entry) = entry else { continue };
        // A DirEntry's file type and metadata describe the entry itself, not a link's target.
        let is_file = entry.file_type().is_ok_and(|t| t.is_file());
        let path = entry.path();
        if !is_file || path.extension() != Some(OsStr::new("mp4")) {
            continue;
        }
        let Ok(modified) = entry.metadata().and_then(|m| m.modified()) else {
            continue;
        };
        // A time in the future (a clock that stepped back) is not old.
        let expired = now.duration_since(modified).is_ok_and(|age| age > retention);
        if !expired {
            continue;
        }
        match std::fs::remove_file(&path) {
            Ok(()) => {
                debug!(path = %path.display(), "deleted an expired recording");
                deleted += 1;
            }
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => warn!(path = %path.display(), error = %e, "could not delete an expired recording"),
        }
    }
    Ok(deleted)
}

/// The longest session id a file name keeps, so that names stay far below the usual 255-byte
/// limit.
const MAX_ID_CHARS: usize = 100;

/// A session's recording file name: `{session_id}-{unix_seconds}.mp4`.
///
/// Any character of the id outside `[A-Za-z0-9_-]` becomes `_`, so an id can never name another
/// folder. A leading `-` also becomes `_`, because shell tools would read it as an option. An empty
/// id becomes `_`.
pub fn file_name(session_id: &str, started: SystemTime) -> String {
    let mut id: String = session_id
        .chars()
        .take(MAX_ID_CHARS)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '_' || c == '-' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if id.is_empty() {
        id.push('_');
    } else if id.starts_with('-') {
        id.replace_range(..1, "_");
    }
    let seconds = started.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
    format!("{id}-{seconds}.mp4")
}

/// RTP's video clock rate.
const VIDEO_HZ: i32 = 90_000;
/// A picture's duration until a second picture shows the real frame rate (25 fps).
const FIRST_FRAME_TICKS: i64 = 3_600;
/// The longest gap between pictures that counts as the frame rate (1 fps, the slowest level
/// allowed). Longer gaps are losses.
const MAX_FRAME_TICKS: i64 = 90_000;
/// The longest forward jump that counts as a gap: a loss lasts at most one GOP. A longer jump
/// means a new clock.
const MAX_GAP_TICKS: u32 = 30 * 90_000;
/// Audio that falls this far behind the pictures has lost packets, and moves back onto the
/// pictures' time (60 ms).
const AUDIO_RESYNC: i64 = 3 * OPUS_FRAME as i64;

/// The recording's clock. Pictures are timed in 90 kHz ticks from their RTP timestamps, and audio
/// in 48 kHz samples counted packet by packet, both from the first keyframe (the first picture
/// given to [`Timeline::video`]).
#[derive(Debug)]
struct Timeline {
    /// The last picture: its RTP timestamp and its time in the file.
    last: Option<(u32, i64)>,
    /// The current frame interval, used as a picture's duration.
    frame_ticks: i64,
    /// The next audio packet's time in the file.
    next_audio: i64,
}

impl Timeline {
    fn new() -> Self {
        Self {
            last: None,
            frame_ticks: FIRST_FRAME_TICKS,
            next_audio: 0,
        }
    }

    /// A picture's time and duration (90 kHz).
    fn video(&mut self, rtp_timestamp: u32) -> (i64, i64) {
        let pts = match self.last {
            None => 0,
            Some((last_rtp, last_pts)) => {
                // Wrapping arithmetic: a timestamp just past 2³² is a small step forward.
                let gap = rtp_timestamp.wrapping_sub(last_rtp);
                if gap > 0 && gap <= MAX_GAP_TICKS {
                    let gap = i64::from(gap);
                    if gap <= MAX_FRAME_TICKS {
                        self.frame_ticks = gap;
                    }
                    last_pts + gap
                } else {
                    // The same timestamp, or one from before: a new clock. Go on one frame later.
                    last_pts + self.frame_ticks
                }
            }
        };
        self.last = Some((rtp_timestamp, pts));
        (pts, self.frame_ticks)
    }

    /// The next audio packet's time and duration (48 kHz).
    fn audio(&mut self) -> (i64, i64) {
        let pictures = self
            .last
            .map_or(0, |(_, pts)| pts * i64::from(AUDIO_RATE) / i64::from(VIDEO_HZ));
        if pictures - self.next_audio > AUDIO_RESYNC {
            self.next_audio = pictures;
        }
        let pts = self.next_audio;
        self.next_audio += OPUS_FRAME as i64;
        (pts, OPUS_FRAME as i64)
    }

    /// The end of the last picture or audio packet, in seconds from the first keyframe.
    fn seconds(&self) -> f64 {
        let video = self
            .last
            .map_or(0.0, |(_, pts)| (pts + self.frame_ticks) as f64 / f64::from(VIDEO_HZ));
        let audio = self.next_audio as f64 / f64::from(AUDIO_RATE);
        video.max(audio)
    }
}

const NAL_IDR: u8 = 5;
const NAL_SPS: u8 = 7;
const NAL_PPS: u8 = 8;

/// The NAL units of an Annex-B access unit, without their start codes (3 or 4 bytes).
fn nal_units(data: &[u8]) -> Vec<&[u8]> {
    let mut starts = Vec::new();
    let mut i = 0;
    while i + 2 < data.len() {
        if data[i] == 0 && data[i + 1] == 0 && data[i + 2] == 1 {
            starts.push(i);
            i += 3;
        } else {
            i += 1;
        }
    }
    starts
        .iter()
        .enumerate()
        .map(|(k, &start)| {
            let end = starts.get(k + 1).copied().unwrap_or(data.len());
            let mut unit = &data[start + 3..end];
            // Trailing zeros are the next 4-byte start code's first byte, or padding.
            while let [rest @ .., 0] = unit {
                unit = rest;
            }
            unit
        })
        .filter(|unit| !unit.is_empty())
        .collect()
}

/// Whether a recording can start at this access unit: an IDR picture that carries the SPS and PPS
/// describing it.
fn starts_stream(access_unit: &[u8]) -> bool {
    let types: Vec<u8> = nal_units(access_unit).iter().map(|unit| unit[0] & 0x1f).collect();
    [NAL_IDR, NAL_SPS, NAL_PPS].iter().all(|t| types.contains(t))
}

fn ffmpeg_error(what: &'static str) -> impl FnOnce(ffmpeg::Error) -> RecordError {
    move |source| RecordError::Ffmpeg { what, source }
}

fn io_error(what: &'static str, path: &Path) -> impl FnOnce(std::io::Error) -> RecordError {
    let path = path.to_owned();
    move |source| RecordError::Io { what, path, source }
}

fn record_blocking(mut media: mpsc::Receiver<MediaOut>, spec: RecordingSpec) -> Result<Recording, RecordError> {
    let Some(first) = first_keyframe(&mut media) else {
        debug!("the session ended before its first keyframe");
        return Err(RecordError::Empty);
    };
    let mut recorder = Recorder::create(&spec, &first.data)?;
    info!(path = %spec.path.display(), "recording started");
    let pumped = recorder.pump(first, &mut media);
    // The tap leaves now. The fan-out stops offering to it while the file is finished.
    drop(media);
    let duration_s = recorder.timeline.seconds();
    let (video_frames, audio_packets) = (recorder.video_frames, recorder.audio_packets);
    let finished = recorder.finish();
    if let Err(e) = pumped {
        if let Err(trailer) = finished {
            warn!(error = %trailer, "could not finish the recording after a failed write");
        }
        return Err(e);
    }
    finished?;
    let (bytes, sha256) = digest(&spec.path).map_err(io_error("read back", &spec.path))?;
    info!(
        path = %spec.path.display(),
        duration_s,
        bytes,
        video_frames,
        audio_packets,
        "recording finished"
    );
    Ok(Recording {
        path: spec.path,
        duration_s,
        bytes,
        sha256,
        video_frames,
        audio_packets,
    })
}

/// Wait for the first access unit a recording can start at. Audio before it is dropped, and so is
/// video (the fan-out starts a tap at a keyframe, so there should be none). Returns `None` if the
/// channel closes first.
fn first_keyframe(media: &mut mpsc::Receiver<MediaOut>) -> Option<EncodedFrame> {
    let (mut audio, mut pictures) = (0u64, 0u64);
    while let Some(packet) = media.blocking_recv() {
        match packet {
            MediaOut::Video(frame) if starts_stream(&frame.data) => {
                if audio + pictures > 0 {
                    debug!(audio, pictures, "dropped packets before the first keyframe");
                }
                return Some(frame);
            }
            MediaOut::Video(_) => pictures += 1,
            MediaOut::Audio(_) => audio += 1,
        }
    }
    None
}

/// The size and SHA-256 (hex) of a file.
fn digest(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buffer = vec![0u8; 64 * 1024];
    let mut bytes = 0u64;
    loop {
        match file.read(&mut buffer) {
            Ok(0) => break,
            Ok(n) => {
                hasher.update(&buffer[..n]);
                bytes += n as u64;
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(e),
        }
    }
    Ok((bytes, hex::encode(hasher.finalize())))
}

/// The H.264 track's description, read from the first keyframe by FFmpeg's raw H.264 demuxer.
/// Its stream probe puts the SPS and PPS into the extradata (Annex B, which the MP4 muxer turns
/// into `avcC`) and reads the size and profile.
fn h264_parameters(keyframe: &[u8]) -> Result<ffmpeg::codec::Parameters, RecordError> {
    let what = "read the first keyframe's SPS and PPS";
    let io = ffmpeg::format::context::StreamIo::from_read_seek(std::io::Cursor::new(keyframe.to_vec()))
        .map_err(ffmpeg_error(what))?;
    // The name only helps the probe, which would find H.264 from the bytes anyway.
    let input = ffmpeg::format::input_from_stream(io, Some("keyframe.h264"), None).map_err(ffmpeg_error(what))?;
    let parameters = input.stream(0).map(|s| s.parameters());
    match parameters {
        Some(p) if p.id() == ffmpeg::codec::Id::H264 => Ok(p),
        _ => Err(RecordError::Ffmpeg {
            what,
            source: ffmpeg::Error::InvalidData,
        }),
    }
}

/// The picture size a track's parameters describe. FFmpeg's parameters have no getter for it, so
/// an H.264 decoder is opened on them (it decodes nothing).
fn picture_size(parameters: &ffmpeg::codec::Parameters) -> Option<(u32, u32)> {
    let decoder = ffmpeg::codec::context::Context::from_parameters(parameters.clone())
        .ok()?
        .decoder()
        .video()
        .ok()?;
    Some((decoder.width(), decoder.height()))
}

/// The Opus track's description: 48 kHz mono, like the media clock's encoder
/// ([`super::stream`]), with the OpusHead the encoder writes on opening. `libopus` is preferred
/// because the clock's packets come from libopus and so the pre-skip matches. FFmpeg's own
/// (experimental) encoder is the fallback.
fn opus_parameters() -> Result<ffmpeg::codec::Parameters, RecordError> {
    use ffmpeg::format::{sample::Type, Sample};
    let what = "describe the Opus track";
    let mut failed = ffmpeg::Error::EncoderNotFound;
    for (name, format) in [
        ("libopus", Sample::F32(Type::Packed)),
        ("opus", Sample::F32(Type::Planar)),
    ] {
        let Some(codec) = ffmpeg::encoder::find_by_name(name) else {
            continue;
        };
        let mut context = ffmpeg::codec::context::Context::new_with_codec(codec);
        context.compliance(ffmpeg::codec::Compliance::Experimental);
        let mut encoder = context.encoder().audio().map_err(ffmpeg_error(what))?;
        encoder.set_rate(AUDIO_RATE as i32);
        encoder.set_channel_layout(ffmpeg::ChannelLayout::MONO);
        encoder.set_format(format);
        encoder.set_time_base(ffmpeg::Rational::new(1, AUDIO_RATE as i32));
        encoder.set_bit_rate(32_000);
        match encoder.open() {
            Ok(opened) => return Ok(ffmpeg::codec::Parameters::from(&opened)),
            Err(e) => {
                debug!(encoder = name, error = %e, "could not open an Opus encoder for the track header");
                failed = e;
            }
        }
    }
    Err(RecordError::Ffmpeg { what, source: failed })
}

/// One track of the MP4: its stream index, the clock its timestamps are counted in, and the time
/// base the muxer chose for it.
#[derive(Debug, Clone, Copy)]
struct Track {
    index: usize,
    clock: ffmpeg::Rational,
    time_base: ffmpeg::Rational,
}

/// An open fragmented MP4 with a video track and an audio track.
struct Recorder {
    output: ffmpeg::format::context::Output,
    video: Track,
    audio: Track,
    timeline: Timeline,
    video_frames: u64,
    audio_packets: u64,
}

impl Recorder {
    /// Describe both tracks, then create the file and write its header. If this fails after the
    /// file was made, the file is removed.
    fn create(spec: &RecordingSpec, keyframe: &[u8]) -> Result<Self, RecordError> {
        let path = &spec.path;
        // The `file:` prefix keeps a `:` in a relative path from being read as a protocol.
        let url = match path.to_str() {
            Some(p) if !p.contains('\0') => format!("file:{p}"),
            _ => return Err(RecordError::Path(path.clone())),
        };
        let video = h264_parameters(keyframe)?;
        if let Some((width, height)) = picture_size(&video).filter(|&size| size != (spec.width, spec.height)) {
            info!(
                width,
                height,
                configured_width = spec.width,
                configured_height = spec.height,
                "recording starts at the viewer's level, not the configured size"
            );
        }
        let audio = opus_parameters()?;
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(io_error("create the recordings folder", dir))?;
        }
        // Claim the name first. If the file already exists, this fails, so a second recording
        // can never overwrite the first.
        std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(path)
            .map_err(io_error("create", path))?;
        Self::open(&url, video, audio).inspect_err(|_| {
            // The header was never written, so nothing in the file would play.
            let _ = std::fs::remove_file(path);
        })
    }

    fn open(
        url: &str,
        video: ffmpeg::codec::Parameters,
        audio: ffmpeg::codec::Parameters,
    ) -> Result<Self, RecordError> {
        let mut output = ffmpeg::format::output_as(url, "mp4").map_err(ffmpeg_error("open the MP4 for writing"))?;
        let video_clock = ffmpeg::Rational::new(1, VIDEO_HZ);
        let audio_clock = ffmpeg::Rational::new(1, AUDIO_RATE as i32);
        let video_index = add_track(&mut output, video, video_clock)?;
        let audio_index = add_track(&mut output, audio, audio_clock)?;
        let mut options = ffmpeg::Dictionary::new();
        // An empty moov up front, then a fragment at every keyframe and at least every second.
        options.set("movflags", "frag_keyframe+empty_moov+default_base_moof");
        options.set("frag_duration", "1000000");
        // Each packet goes to the file as it is written, not when a buffer fills.
        options.set("flush_packets", "1");
        // FFmpeg 4.3 muxes Opus into MP4 only with this set.
        options.set("strict", "experimental");
        let ignored: Vec<String> = output
            .write_header_with(options)
            .map_err(ffmpeg_error("write the MP4 header"))?
            .iter()
            .map(|(key, _)| key.to_owned())
            .collect();
        if !ignored.is_empty() {
            warn!(?ignored, "the MP4 muxer ignored options");
        }
        // The muxer picks each track's time base (its timescale) when writing the header.
        let track = |index: usize, clock: ffmpeg::Rational| Track {
            index,
            clock,
            time_base: output.stream(index).map_or(clock, |s| s.time_base()),
        };
        let video = track(video_index, video_clock);
        let audio = track(audio_index, audio_clock);
        Ok(Self {
            output,
            video,
            audio,
            timeline: Timeline::new(),
            video_frames: 0,
            audio_packets: 0,
        })
    }

    /// Write `first` (the first keyframe), then everything that comes until the channel closes.
    fn pump(&mut self, first: EncodedFrame, media: &mut mpsc::Receiver<MediaOut>) -> Result<(), RecordError> {
        self.video(&first)?;
        while let Some(packet) = media.blocking_recv() {
            match packet {
                MediaOut::Video(frame) => self.video(&frame)?,
                MediaOut::Audio(opus) => self.audio(&opus)?,
            }
        }
        Ok(())
    }

    fn video(&mut self, frame: &EncodedFrame) -> Result<(), RecordError> {
        if frame.data.is_empty() {
            return Ok(());
        }
        let (pts, duration) = self.timeline.video(frame.rtp_timestamp);
        let track = self.video;
        let key = contains_idr(&frame.data);
        self.write(track, &frame.data, pts, duration, key)
            .map_err(ffmpeg_error("write a picture"))?;
        self.video_frames += 1;
        Ok(())
    }

    fn audio(&mut self, packet: &[u8]) -> Result<(), RecordError> {
        if packet.is_empty() {
            return Ok(());
        }
        let (pts, duration) = self.timeline.audio();
        let track = self.audio;
        // Every Opus packet can be decoded on its own.
        self.write(track, packet, pts, duration, true)
            .map_err(ffmpeg_error("write an audio packet"))?;
        self.audio_packets += 1;
        Ok(())
    }

    fn write(&mut self, track: Track, data: &[u8], pts: i64, duration: i64, key: bool) -> Result<(), ffmpeg::Error> {
        let mut packet = ffmpeg::Packet::copy(data);
        packet.set_stream(track.index);
        packet.set_pts(Some(pts));
        // No B-frames: each picture is decoded when it is shown.
        packet.set_dts(Some(pts));
        packet.set_duration(duration);
        if key {
            packet.set_flags(ffmpeg::packet::Flags::KEY);
        }
        packet.rescale_ts(track.clock, track.time_base);
        packet.write_interleaved(&mut self.output)
    }

    /// Write the trailer, then close the file (when `output` drops).
    fn finish(mut self) -> Result<(), RecordError> {
        self.output
            .write_trailer()
            .map_err(ffmpeg_error("write the MP4 trailer"))
    }
}

/// Add a stream that is copied, not encoded (so no codec), described by `parameters`.
fn add_track(
    output: &mut ffmpeg::format::context::Output,
    parameters: ffmpeg::codec::Parameters,
    clock: ffmpeg::Rational,
) -> Result<usize, RecordError> {
    let mut stream = output
        .add_stream(None::<ffmpeg::Codec>)
        .map_err(ffmpeg_error("add a track to the MP4"))?;
    stream.set_parameters(parameters);
    stream.set_time_base(clock);
    Ok(stream.index())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::avatar::synthetic;
    use crate::media::encoder::{init, EncoderSettings, H264Encoder};
    use crate::media::stream::rtp_timestamp;
    use bytes::Bytes;

    #[test]
    fn nal_units_split_on_three_and_four_byte_start_codes() {
        let au = [0, 0, 0, 1, 0x67, 1, 2, 0, 0, 1, 0x68, 3, 0, 0, 0, 1, 0x65, 4, 5];
        let units = nal_units(&au);
        assert_eq!(units, [&[0x67, 1, 2][..], &[0x68, 3][..], &[0x65, 4, 5][..]]);
        assert!(starts_stream(&au));
        assert!(
            !starts_stream(&[0, 0, 0, 1, 0x65, 4, 5]),
            "an IDR without its SPS and PPS cannot start a file"
        );
        assert!(!starts_stream(&[
            0, 0, 0, 1, 0x67, 1, 0, 0, 0, 1, 0x68, 3, 0, 0, 0, 1, 0x41, 9
        ]));
    }

    #[test]
    fn video_time_follows_rtp_timestamps_across_the_wrap() {
        let mut t = Timeline::new();
        let first = u32::MAX - 3_599; // the next picture's timestamp wraps to 0
        assert_eq!(t.video(first), (0, FIRST_FRAME_TICKS));
        assert_eq!(t.video(first.wrapping_add(3_600)), (3_600, 3_600));
        // 15 fps: the duration follows the frame interval.
        assert_eq!(t.video(first.wrapping_add(9_600)), (9_600, 6_000));
        // Pictures lost for two seconds (the tap was full): the gap stays in the file, and the
        // frame interval is not stretched by it.
        assert_eq!(t.video(first.wrapping_add(9_600 + 180_000)), (189_600, 6_000));
    }

    #[test]
    fn a_new_clock_after_renegotiation_continues_one_frame_later() {
        let mut t = Timeline::new();
        t.video(450_000);
        t.video(453_600);
        // The new clock starts again from 0: the file's time does not go back.
        assert_eq!(t.video(0), (7_200, 3_600));
        assert_eq!(t.video(3_600), (10_800, 3_600));
        // A jump far forward (a clock with another origin) is not a 12-hour gap either.
        assert_eq!(t.video(3_600 + 4_000_000_000 / 2), (14_400, 3_600));
    }

    #[test]
    fn audio_counts_packets_and_resyncs_to_the_pictures_after_a_loss() {
        let mut t = Timeline::new();
        t.video(0);
        assert_eq!(t.audio(), (0, 960));
        assert_eq!(t.audio(), (960, 960));
        t.video(3_600);
        // One picture ahead of the audio: normal, counted on.
        assert_eq!(t.audio(), (1_920, 960));
        // A second of audio lost in the tap while pictures went on: back onto the pictures' time.
        t.video(3_600 + 90_000);
        assert_eq!(t.audio(), (93_600 * 48 / 90, 960));
        // Pictures lost while audio went on: the audio keeps its own count, not pulled back.
        let mut t = Timeline::new();
        t.video(0);
        for n in 0..100 {
            assert_eq!(t.audio().0, n * 960);
        }
        assert!((t.seconds() - 2.0).abs() < 1e-9);
    }

    #[test]
    fn file_names_keep_only_safe_characters() {
        let t = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        assert_eq!(file_name("sess-42_a", t), "sess-42_a-1700000000.mp4");
        assert_eq!(file_name("../etc/pass wd", t), "___etc_pass_wd-1700000000.mp4");
        assert_eq!(file_name("é", t), "_-1700000000.mp4");
        assert_eq!(file_name("", t), "_-1700000000.mp4");
        assert_eq!(file_name("-rf", t), "_rf-1700000000.mp4");
        assert_eq!(
            file_name(&"x".repeat(500), t).len(),
            MAX_ID_CHARS + "-1700000000.mp4".len()
        );
    }

    #[test]
    fn sweep_deletes_only_recordings_older_than_the_retention() {
        let dir = tempfile::tempdir().expect("tempdir");
        let elsewhere = tempfile::tempdir().expect("tempdir");
        let day = Duration::from_secs(86_400);
        let now = SystemTime::now();
        let touch = |path: &Path, modified: SystemTime| {
            let file = std::fs::File::create(path).expect("create");
            file.set_modified(modified).expect("set mtime");
        };
        touch(&dir.path().join("old.mp4"), now - 2 * day);
        touch(&dir.path().join("fresh.mp4"), now - day / 2);
        touch(&dir.path().join("old.txt"), now - 2 * day);
        touch(&elsewhere.path().join("target.mp4"), now - 2 * day);
        #[cfg(unix)]
        std::os::unix::fs::symlink(elsewhere.path().join("target.mp4"), dir.path().join("link.mp4")).expect("symlink");
        std::fs::create_dir(dir.path().join("folder.mp4")).expect("mkdir");

        assert_eq!(sweep(dir.path(), day).expect("sweep"), 1);
        assert!(!dir.path().join("old.mp4").exists());
        for kept in ["fresh.mp4", "old.txt", "folder.mp4"] {
            assert!(dir.path().join(kept).exists(), "{kept} was kept");
        }
        #[cfg(unix)]
        assert!(
            dir.path().join("link.mp4").symlink_metadata().is_ok(),
            "a link is not a recording"
        );
        assert!(
            elsewhere.path().join("target.mp4").exists(),
            "nothing outside the folder is touched"
        );
        assert_eq!(sweep(&dir.path().join("missing"), day).expect("missing folder"), 0);
    }

    /// What a tap gets from a session's media clock: `seconds` of 25 fps H.264 (libx264, a
    /// keyframe first) and two 20 ms Opus packets per picture, with RTP timestamps from
    /// `first_rtp`. A few packets of audio come first, as when a tap joins between keyframes.
    fn session_media(seconds: u32, first_rtp: u32) -> Vec<MediaOut> {
        let (width, height, fps) = (128, 96, 25);
        let clip = synthetic(width, height, fps);
        let settings = EncoderSettings {
            width,
            height,
            fps,
            frame_rate: fps,
            bitrate_kbps: 300,
            gop: 50,
        };
        let mut video = H264Encoder::open("libx264", &settings).expect("libx264");
        let mut opus =
            opus::Encoder::new(AUDIO_RATE, opus::Channels::Mono, opus::Application::Voip).expect("opus encoder");
        let mut buffer = vec![0u8; 1500];
        let mut samples = 0usize;
        let mut speech = |out: &mut Vec<MediaOut>| {
            let pcm: Vec<f32> = (samples..samples + OPUS_FRAME)
                .map(|n| 0.3 * (n as f32 * 2.0 * std::f32::consts::PI * 220.0 / AUDIO_RATE as f32).sin())
                .collect();
            samples += OPUS_FRAME;
            let n = opus.encode_float(&pcm, &mut buffer).expect("opus encode");
            out.push(MediaOut::Audio(Bytes::copy_from_slice(&buffer[..n])));
        };
        let mut out = Vec::new();
        for _ in 0..3 {
            speech(&mut out);
        }
        for tick in 0..i64::from(seconds * fps) {
            let picture = &clip.frames[tick as usize % clip.frames.len()];
            let data = video.encode(picture, tick, tick == 0).expect("encode");
            assert!(!data.is_empty(), "zerolatency x264 returns every picture at once");
            out.push(MediaOut::Video(EncodedFrame {
                data: Bytes::from(data),
                rtp_timestamp: first_rtp.wrapping_add(rtp_timestamp(tick, fps)),
            }));
            speech(&mut out);
            speech(&mut out);
        }
        out
    }

    #[tokio::test]
    async fn a_session_is_recorded_as_a_fragmented_mp4_that_plays_back() {
        init().expect("ffmpeg");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir
            .path()
            .join("recordings")
            .join(file_name("session/1", SystemTime::now()));
        // RTP timestamps that wrap one second in.
        let media = session_media(2, u32::MAX - 89_999);
        let (tx, rx) = mpsc::channel(media.len());
        for packet in media {
            tx.try_send(packet).expect("room in the channel");
        }
        drop(tx); // the session ended
        let spec = RecordingSpec {
            path: path.clone(),
            width: 128,
            height: 96,
        };
        let recording = record(rx, spec).await.expect("recorded");

        assert_eq!((recording.video_frames, recording.audio_packets), (50, 100));
        assert!(
            (recording.duration_s - 2.0).abs() < 0.05,
            "duration {}",
            recording.duration_s
        );
        let bytes = std::fs::read(&path).expect("the file");
        assert_eq!(recording.bytes, bytes.len() as u64);
        assert_eq!(recording.sha256, hex::encode(Sha256::digest(&bytes)));
        assert!(bytes.windows(4).any(|w| w == b"moof"), "the media is in fragments");

        let mut input = ffmpeg::format::input(&path).expect("the MP4 opens");
        assert_eq!(input.streams().count(), 2);
        let stream_of = |kind: ffmpeg::media::Type| {
            input
                .streams()
                .find(|s| s.parameters().medium() == kind)
                .map(|s| (s.index(), s.parameters(), s.time_base()))
                .expect("a track of each kind")
        };
        let (video_index, video, video_tb) = stream_of(ffmpeg::media::Type::Video);
        let (audio_index, audio, audio_tb) = stream_of(ffmpeg::media::Type::Audio);
        assert_eq!(video.id(), ffmpeg::codec::Id::H264);
        assert_eq!(audio.id(), ffmpeg::codec::Id::OPUS);
        assert_eq!(picture_size(&video), Some((128, 96)));
        let opus = ffmpeg::codec::context::Context::from_parameters(audio)
            .expect("context")
            .decoder()
            .audio()
            .expect("an Opus decoder");
        assert_eq!((opus.rate(), opus.channels()), (48_000, 1));

        // Every picture decodes, and both tracks last two seconds.
        let mut decoder = ffmpeg::codec::context::Context::from_parameters(video)
            .expect("context")
            .decoder()
            .video()
            .expect("an H.264 decoder");
        let mut frame = ffmpeg::frame::Video::empty();
        let mut decoded = 0;
        let (mut video_end, mut audio_end) = (0.0f64, 0.0f64);
        for (stream, packet) in input.packets() {
            let end = (packet.pts().unwrap_or(0) + packet.duration()) as f64;
            if stream.index() == video_index {
                video_end = video_end.max(end * f64::from(video_tb));
                decoder.send_packet(&packet).expect("send");
                while decoder.receive_frame(&mut frame).is_ok() {
                    decoded += 1;
                }
            } else if stream.index() == audio_index {
                audio_end = audio_end.max(end * f64::from(audio_tb));
            }
        }
        decoder.send_eof().expect("eof");
        while decoder.receive_frame(&mut frame).is_ok() {
            decoded += 1;
        }
        assert_eq!(decoded, 50);
        assert!((video_end - 2.0).abs() < 0.2, "video ends at {video_end}");
        assert!((audio_end - 2.0).abs() < 0.2, "audio ends at {audio_end}");
    }

    #[tokio::test]
    async fn a_session_that_ends_before_its_first_keyframe_leaves_no_file() {
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("recordings").join("empty-0.mp4");
        let (tx, rx) = mpsc::channel(4);
        tx.try_send(MediaOut::Audio(Bytes::from_static(&[0xf8, 0xff, 0xfe])))
            .expect("room");
        drop(tx);
        let spec = RecordingSpec {
            path: path.clone(),
            width: 128,
            height: 96,
        };
        assert!(matches!(record(rx, spec).await, Err(RecordError::Empty)));
        assert!(!path.exists());
    }
}
