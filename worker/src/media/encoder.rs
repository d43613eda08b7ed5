//! H.264 encoding through FFmpeg: `h264_nvenc` on a GPU box, `libx264` everywhere else.
//!
//! The encoder is chosen once at start-up by [`select_encoder`]: with `auto`, NVENC is tried by
//! opening a real encoder (Debian's FFmpeg lists `h264_nvenc` even without a GPU; it fails at open
//! with "Cannot load libcuda.so.1"), and the worker logs loudly which one it uses. Output is
//! Constrained Baseline (no B-frames), Annex B with SPS/PPS repeated on every IDR, so a browser can
//! join at any keyframe. [`H264Encoder::encode`] can force an IDR when a receiver sends PLI/FIR.

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

/// What to encode.
#[derive(Debug, Clone)]
pub struct EncoderSettings {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub bitrate_kbps: u32,
    pub gop: u32,
}

impl From<&crate::config::VideoConfig> for EncoderSettings {
    fn from(v: &crate::config::VideoConfig) -> Self {
        Self {
            width: v.width,
            height: v.height,
            fps: v.fps,
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
        enc.set_frame_rate(Some(ffmpeg::Rational::new(s.fps as i32, 1)));
        enc.set_bit_rate(s.bitrate_kbps as usize * 1000);
        enc.set_max_bit_rate(s.bitrate_kbps as usize * 1000);
        enc.set_gop(s.gop);
        enc.set_max_b_frames(0);
        let mut opts = ffmpeg::Dictionary::new();
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

    /// Encode one picture; returns the Annex B access unit (empty if the encoder buffered it).
    pub fn encode(&mut self, picture: &Yuv420, pts: i64, keyframe: bool) -> Result<Vec<u8>, EncodeError> {
        let err = |source| EncodeError::Ffmpeg {
            name: self.name,
            source,
        };
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
    fn auto_falls_back_to_libx264_without_a_gpu() {
        init().expect("ffmpeg");
        let s = EncoderSettings {
            width: 64,
            height: 64,
            fps: 25,
            bitrate_kbps: 200,
            gop: 50,
        };
        let chosen = select_encoder(VideoEncoder::Auto, &s).expect("some encoder");
        assert!(chosen == "libx264" || chosen == "h264_nvenc");
    }
}
