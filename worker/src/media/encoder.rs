//! H.264 encoding through FFmpeg: `h264_nvenc` on a GPU box, `libx264` everywhere else.
//!
//! The encoder is chosen once at start-up by [`select_encoder`]: with `auto`, NVENC is tried by
//! opening a real encoder (Debian's FFmpeg lists `h264_nvenc` even without a GPU; it fails at open
//! with "Cannot load libcuda.so.1"), and the worker logs loudly which one it uses. Output is
//! Constrained Baseline (no B-frames), Annex B with SPS/PPS repeated on every IDR, so a browser can
//! join at any keyframe. [`H264Encoder::encode`] can force an IDR when a receiver sends PLI/FIR.
//!
//! Rate control is ABR with a VBV of a quarter second ([`VBV_SECONDS`]): a keyframe may take
//! about six frames' worth of bits, not fifty, so it leaves the pacer before the frames behind it
//! are due. The bitrate can change while the encoder runs ([`H264Encoder::set_bitrate`]; FFmpeg
//! reconfigures x264 and NVENC in place); the VBV is fixed at open, so the clock reopens the
//! encoder when the bitrate moves far from the one it was opened at.

use super::avatar::Yuv420;
use crate::config::VideoEncoder;
use ffmpeg_next as ffmpeg;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    #[error("FFmpeg has no encoder named {0}")]
    NotFound(&'static str),
    #[error("{name}: {source}")]
    Ffmpeg { name: &'static str, source: ffmpeg::Error },
    #[error(
        "{name}: {source} (NVENC needs the NVIDIA driver's libcuda.so.1 and libnvidia-encode.so.1, and a GPU \
         with an NVENC engine: data-centre A100, H100 and H200 have none; L4, L40S, A10 and RTX cards do)"
    )]
    NvencUnavailable { name: &'static str, source: ffmpeg::Error },
}

impl EncodeError {
    /// FFmpeg's NVENC errors ("Operation not permitted", "Generic error in an external library") do
    /// not say what to check; add the two causes seen in practice.
    fn nvenc_hint(self) -> Self {
        match self {
            EncodeError::Ffmpeg { name, source } => EncodeError::NvencUnavailable { name, source },
            other => other,
        }
    }
}

/// The VBV buffer, in seconds of the bitrate.
pub const VBV_SECONDS: f64 = 0.25;

/// What to encode.
#[derive(Debug, Clone)]
pub struct EncoderSettings {
    pub width: u32,
    pub height: u32,
    /// The media clock's rate: timestamps count its ticks.
    pub fps: u32,
    /// Frames actually encoded per second (below `fps` when the picture steps down), for rate
    /// control.
    pub frame_rate: u32,
    pub bitrate_kbps: u32,
    pub gop: u32,
}

impl EncoderSettings {
    /// These settings for a picture of `width`×`height` (a session's avatar's size).
    pub fn at_size(&self, (width, height): (u32, u32)) -> Self {
        Self {
            width,
            height,
            ..self.clone()
        }
    }
}

impl From<&crate::config::VideoConfig> for EncoderSettings {
    fn from(v: &crate::config::VideoConfig) -> Self {
        Self {
            width: v.width,
            height: v.height,
            fps: v.fps,
            frame_rate: v.fps,
            bitrate_kbps: v.bitrate_kbps,
            gop: v.gop,
        }
    }
}

/// An open encoder for one session.
pub struct H264Encoder {
    name: &'static str,
    encoder: ffmpeg::encoder::Video,
    frame: ffmpeg::frame::Video,
    packet: ffmpeg::Packet,
}

/// Initialise FFmpeg once per process (idempotent).
pub fn init() -> Result<(), ffmpeg::Error> {
    ffmpeg::init()?;
    ffmpeg::util::log::set_level(ffmpeg::util::log::Level::Error);
    Ok(())
}

/// Pick the encoder for this process according to `preference` (`auto`, `h264_nvenc`,
/// `libx264`), proving it by opening it once.
pub fn select_encoder(preference: VideoEncoder, settings: &EncoderSettings) -> Result<&'static str, EncodeError> {
    match preference {
        VideoEncoder::H264Nvenc => H264Encoder::open("h264_nvenc", settings)
            .map(|_| "h264_nvenc")
            .map_err(EncodeError::nvenc_hint),
        VideoEncoder::Libx264 => H264Encoder::open("libx264", settings).map(|_| "libx264"),
        VideoEncoder::Auto => match H264Encoder::open("h264_nvenc", settings) {
            Ok(_) => {
                info!("video encoder: h264_nvenc (GPU)");
                Ok("h264_nvenc")
            }
            Err(e) => {
                let e = EncodeError::nvenc_hint(e);
                warn!(error = %e, "h264_nvenc unavailable; FALLING BACK TO CPU ENCODING with libx264");
                H264Encoder::open("libx264", settings).map(|_| "libx264")
            }
        },
    }
}

impl H264Encoder {
    pub fn open(name: &'static str, s: &EncoderSettings) -> Result<Self, EncodeError> {
        let err = |source| EncodeError::Ffmpeg { name, source };
        let codec = ffmpeg::encoder::find_by_name(name).ok_or(EncodeError::NotFound(name))?;
        let mut enc = ffmpeg::codec::context::Context::new_with_codec(codec)
            .encoder()
            .video()
            .map_err(err)?;
        enc.set_width(s.width);
        enc.set_height(s.height);
        enc.set_format(ffmpeg::format::Pixel::YUV420P);
        enc.set_time_base(ffmpeg::Rational::new(1, s.fps as i32));
        enc.set_frame_rate(Some(ffmpeg::Rational::new(s.frame_rate.clamp(1, s.fps) as i32, 1)));
        let bps = s.bitrate_kbps as usize * 1000;
        enc.set_bit_rate(bps);
        enc.set_max_bit_rate(bps);
        enc.set_gop(s.gop);
        enc.set_max_b_frames(0);
        let mut opts = ffmpeg::Dictionary::new();
        // rc_buffer_size, which ffmpeg-next has no setter for: the codec context's own option.
        opts.set("bufsize", &((bps as f64 * VBV_SECONDS) as u64).to_string());
        if name == "h264_nvenc" {
            opts.set("preset", "p1");
            opts.set("tune", "ull");
            opts.set("zerolatency", "1");
            opts.set("profile", "baseline");
            opts.set("rc", "cbr");
            opts.set("forced-idr", "1");
        } else {
            opts.set("preset", "ultrafast");
            opts.set("tune", "zerolatency");
            opts.set("profile", "baseline");
            opts.set("forced-idr", "1");
            // One thread per session: sessions scale across cores, not one session across all.
            opts.set("threads", "1");
        }
        let encoder = enc.open_with(opts).map_err(err)?;
        Ok(Self {
            name,
            encoder,
            frame: ffmpeg::frame::Video::new(ffmpeg::format::Pixel::YUV420P, s.width, s.height),
            packet: ffmpeg::Packet::empty(),
        })
    }

    pub fn name(&self) -> &'static str {
        self.name
    }

    /// Change the target bitrate from the next frame on (x264 and NVENC reconfigure in place).
    pub fn set_bitrate(&mut self, bps: u64) {
        let bps = bps.max(1000) as usize;
        self.encoder.set_bit_rate(bps);
        self.encoder.set_max_bit_rate(bps);
    }

    /// Encode one picture; returns the Annex B access unit (empty if the encoder buffered it).
    pub fn encode(&mut self, picture: &Yuv420, pts: i64, keyframe: bool) -> Result<Vec<u8>, EncodeError> {
        let err = |source| EncodeError::Ffmpeg {
            name: self.name,
            source,
        };
        // A picture of another size than the encoder's would not fit its frame.
        if (picture.width, picture.height) != (self.frame.width(), self.frame.height()) {
            return Err(err(ffmpeg::Error::InputChanged));
        }
        fill(&mut self.frame, picture);
        self.frame.set_pts(Some(pts));
        self.frame.set_kind(if keyframe {
            ffmpeg::picture::Type::I
        } else {
            ffmpeg::picture::Type::None
        });
        self.encoder.send_frame(&self.frame).map_err(err)?;
        let mut out = Vec::new();
        while self.encoder.receive_packet(&mut self.packet).is_ok() {
            if let Some(data) = self.packet.data() {
                out.extend_from_slice(data);
            }
        }
        Ok(out)
    }
}

/// Scales pictures to one size (bilinear), reusing its buffers: a session whose picture stepped
/// down scales every frame.
pub struct Scaler {
    context: ffmpeg::software::scaling::Context,
    source: ffmpeg::frame::Video,
    scaled: ffmpeg::frame::Video,
    width: u32,
    height: u32,
}

impl Scaler {
    pub fn new(from: (u32, u32), to: (u32, u32)) -> Result<Self, EncodeError> {
        let err = |source| EncodeError::Ffmpeg {
            name: "swscale",
            source,
        };
        let pixel = ffmpeg::format::Pixel::YUV420P;
        let context = ffmpeg::software::scaling::Context::get(
            pixel,
            from.0,
            from.1,
            pixel,
            to.0,
            to.1,
            ffmpeg::software::scaling::Flags::BILINEAR,
        )
        .map_err(err)?;
        Ok(Self {
            context,
            source: ffmpeg::frame::Video::new(pixel, from.0, from.1),
            scaled: ffmpeg::frame::Video::empty(),
            width: to.0,
            height: to.1,
        })
    }

    pub fn scale(&mut self, picture: &Yuv420) -> Result<Yuv420, EncodeError> {
        if (picture.width, picture.height) != (self.source.width(), self.source.height()) {
            return Err(EncodeError::Ffmpeg {
                name: "swscale",
                source: ffmpeg::Error::InputChanged,
            });
        }
        fill(&mut self.source, picture);
        self.context
            .run(&self.source, &mut self.scaled)
            .map_err(|source| EncodeError::Ffmpeg {
                name: "swscale",
                source,
            })?;
        Ok(super::avatar::copy_planes(&self.scaled, self.width, self.height))
    }
}

/// Copy `picture` into `frame`, a YUV 4:2:0 frame of the same size (FFmpeg pads its rows).
pub(crate) fn fill(frame: &mut ffmpeg::frame::Video, picture: &Yuv420) {
    let (w, h) = (picture.width as usize, picture.height as usize);
    for (plane, src, pw, ph) in [
        (0, &picture.y, w, h),
        (1, &picture.u, w / 2, h / 2),
        (2, &picture.v, w / 2, h / 2),
    ] {
        let stride = frame.stride(plane);
        let dst = frame.data_mut(plane);
        for row in 0..ph {
            dst[row * stride..row * stride + pw].copy_from_slice(&src[row * pw..(row + 1) * pw]);
        }
    }
}

/// Does this Annex B access unit contain an IDR slice (NAL type 5)?
pub fn contains_idr(annex_b: &[u8]) -> bool {
    annex_b
        .windows(4)
        .any(|w| w[0] == 0 && w[1] == 0 && w[2] == 1 && (w[3] & 0x1f) == 5)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::avatar::synthetic;

    #[test]
    fn libx264_emits_constrained_baseline_with_idr_on_demand() {
        init().expect("ffmpeg");
        let s = EncoderSettings {
            width: 128,
            height: 128,
            fps: 25,
            frame_rate: 25,
            bitrate_kbps: 500,
            gop: 50,
        };
        let clip = synthetic(128, 128, 25);
        let mut enc = H264Encoder::open("libx264", &s).expect("libx264");
        let first = enc.encode(&clip.frames[0], 0, false).expect("encode");
        assert!(contains_idr(&first), "first frame is an IDR");
        // SPS (NAL 7) with profile_idc 66 (baseline) and constraint_set1 (constrained).
        let sps = first
            .windows(6)
            .find(|w| w[0] == 0 && w[1] == 0 && w[2] == 1 && (w[3] & 0x1f) == 7)
            .expect("SPS");
        assert_eq!(sps[4], 66);
        assert_ne!(sps[5] & 0x40, 0);
        let second = enc.encode(&clip.frames[1], 1, false).expect("encode");
        assert!(!second.is_empty() && !contains_idr(&second));
        let forced = enc.encode(&clip.frames[2], 2, true).expect("encode");
        assert!(contains_idr(&forced), "forced keyframe is an IDR");
    }

    #[test]
    fn the_bitrate_changes_in_place_and_a_scaler_halves_the_picture() {
        init().expect("ffmpeg");
        let s = EncoderSettings {
            width: 256,
            height: 256,
            fps: 25,
            frame_rate: 25,
            bitrate_kbps: 1000,
            gop: 250,
        };
        let clip = synthetic(256, 256, 25);
        let mut enc = H264Encoder::open("libx264", &s).expect("libx264");
        let bytes = |enc: &mut H264Encoder, from: usize| -> usize {
            (from..from + 25)
                .map(|i| {
                    enc.encode(&clip.frames[i % clip.frames.len()], i as i64, false)
                        .map_or(0, |d| d.len())
                })
                .sum()
        };
        let high = bytes(&mut enc, 0);
        enc.set_bitrate(100_000);
        bytes(&mut enc, 25); // x264's rate control settles
        let low = bytes(&mut enc, 50);
        assert!(
            low * 3 < high,
            "a second at 100 kbit/s ({low} B) is far smaller than at 1 Mbit/s ({high} B)"
        );
        let mut scaler = Scaler::new((256, 256), (128, 128)).expect("scaler");
        let half = scaler.scale(&clip.frames[0]).expect("scale");
        assert_eq!(
            (half.width, half.height, half.y.len(), half.u.len()),
            (128, 128, 128 * 128, 64 * 64)
        );
        assert!(
            scaler.scale(&Yuv420::new(64, 64)).is_err(),
            "another size is refused, not read out of bounds"
        );
    }

    #[test]
    fn auto_falls_back_to_libx264_without_a_gpu() {
        init().expect("ffmpeg");
        let s = EncoderSettings {
            width: 64,
            height: 64,
            fps: 25,
            frame_rate: 25,
            bitrate_kbps: 200,
            gop: 50,
        };
        let chosen = select_encoder(VideoEncoder::Auto, &s).expect("some encoder");
        assert!(chosen == "libx264" || chosen == "h264_nvenc");
    }
}
