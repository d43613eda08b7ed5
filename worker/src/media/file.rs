//! Pictures and clips written to files, through FFmpeg: an H.264 MP4 (x264, for the avatar's idle
//! clip and its preview), a PNG (the contact sheet) and a small JPEG (the avatar chooser's
//! thumbnail, which travels in the worker's registration).

use super::avatar::{copy_planes, Yuv420};
use super::encoder::fill;
use ffmpeg_next as ffmpeg;
use std::path::Path;

/// `picture` as an FFmpeg frame.
fn frame_of(picture: &Yuv420) -> ffmpeg::frame::Video {
    let mut frame = ffmpeg::frame::Video::new(ffmpeg::format::Pixel::YUV420P, picture.width, picture.height);
    fill(&mut frame, picture);
    frame
}

/// `picture` converted to `format` at `width`×`height` (bicubic).
fn convert(
    picture: &Yuv420,
    format: ffmpeg::format::Pixel,
    width: u32,
    height: u32,
) -> Result<ffmpeg::frame::Video, ffmpeg::Error> {
    let mut scaler = ffmpeg::software::scaling::Context::get(
        ffmpeg::format::Pixel::YUV420P,
        picture.width,
        picture.height,
        format,
        width,
        height,
        ffmpeg::software::scaling::Flags::BICUBIC,
    )?;
    let mut out = ffmpeg::frame::Video::empty();
    scaler.run(&frame_of(picture), &mut out)?;
    Ok(out)
}

/// `picture` scaled to `width`×`height` (both even).
pub fn scaled(picture: &Yuv420, width: u32, height: u32) -> Result<Yuv420, ffmpeg::Error> {
    let frame = convert(picture, ffmpeg::format::Pixel::YUV420P, width, height)?;
    Ok(copy_planes(&frame, width, height))
}

/// Encode one frame with the still-image encoder `id` and return its bytes.
fn encode_still(
    id: ffmpeg::codec::Id,
    frame: &ffmpeg::frame::Video,
    options: ffmpeg::Dictionary,
) -> Result<Vec<u8>, ffmpeg::Error> {
    let codec = ffmpeg::encoder::find(id).ok_or(ffmpeg::Error::EncoderNotFound)?;
    let mut encoder = ffmpeg::codec::context::Context::new_with_codec(codec)
        .encoder()
        .video()?;
    encoder.set_width(frame.width());
    encoder.set_height(frame.height());
    encoder.set_format(frame.format());
    encoder.set_time_base(ffmpeg::Rational::new(1, 25));
    let mut encoder = encoder.open_with(options)?;
    encoder.send_frame(frame)?;
    encoder.send_eof()?;
    let mut bytes = Vec::new();
    let mut packet = ffmpeg::Packet::empty();
    while encoder.receive_packet(&mut packet).is_ok() {
        bytes.extend_from_slice(packet.data().unwrap_or_default());
    }
    Ok(bytes)
}

/// `picture` as a PNG.
pub fn png(picture: &Yuv420) -> Result<Vec<u8>, ffmpeg::Error> {
    let rgb = convert(picture, ffmpeg::format::Pixel::RGB24, picture.width, picture.height)?;
    encode_still(ffmpeg::codec::Id::PNG, &rgb, ffmpeg::Dictionary::new())
}

/// `picture` scaled to `width`×`height` as a JPEG of moderate quality (a few kB at 128×128).
pub fn jpeg(picture: &Yuv420, width: u32, height: u32) -> Result<Vec<u8>, ffmpeg::Error> {
    // YUVJ: full-range YUV, as JPEG has it; the scaler converts from the video range.
    let full = convert(picture, ffmpeg::format::Pixel::YUVJ420P, width, height)?;
    let mut options = ffmpeg::Dictionary::new();
    options.set("qmin", "2");
    options.set("qmax", "6");
    encode_still(ffmpeg::codec::Id::MJPEG, &full, options)
}

/// An H.264 MP4 written frame by frame (x264, CRF 18: near-lossless for a clip that is decoded
/// and re-encoded again for every session).
pub struct Mp4Writer {
    output: ffmpeg::format::context::Output,
    encoder: ffmpeg::encoder::Video,
    time_base: ffmpeg::Rational,
    frames: i64,
}

impl Mp4Writer {
    pub fn create(path: &Path, width: u32, height: u32, fps: u32) -> Result<Self, ffmpeg::Error> {
        let mut output = ffmpeg::format::output(path)?;
        let codec = ffmpeg::encoder::find_by_name("libx264").ok_or(ffmpeg::Error::EncoderNotFound)?;
        let global_header = output.format().flags().contains(ffmpeg::format::Flags::GLOBAL_HEADER);
        let mut stream = output.add_stream(codec)?;
        let mut encoder = ffmpeg::codec::context::Context::new_with_codec(codec)
            .encoder()
            .video()?;
        let time_base = ffmpeg::Rational::new(1, fps as i32);
        encoder.set_width(width);
        encoder.set_height(height);
        encoder.set_format(ffmpeg::format::Pixel::YUV420P);
        encoder.set_time_base(time_base);
        encoder.set_frame_rate(Some(ffmpeg::Rational::new(fps as i32, 1)));
        if global_header {
            encoder.set_flags(ffmpeg::codec::Flags::GLOBAL_HEADER);
        }
        let mut options = ffmpeg::Dictionary::new();
        options.set("preset", "medium");
        options.set("crf", "18");
        let encoder = encoder.open_with(options)?;
        stream.set_parameters(&encoder);
        stream.set_time_base(time_base);
        output.write_header()?;
        Ok(Self {
            output,
            encoder,
            time_base,
            frames: 0,
        })
    }

    pub fn write(&mut self, picture: &Yuv420) -> Result<(), ffmpeg::Error> {
        let mut frame = frame_of(picture);
        frame.set_pts(Some(self.frames));
        self.frames += 1;
        self.encoder.send_frame(&frame)?;
        self.drain()
    }

    fn drain(&mut self) -> Result<(), ffmpeg::Error> {
        let stream_time_base = self.output.stream(0).map(|s| s.time_base()).unwrap_or(self.time_base);
        let mut packet = ffmpeg::Packet::empty();
        while self.encoder.receive_packet(&mut packet).is_ok() {
            packet.set_stream(0);
            // Every frame lasts one tick: without a duration the MP4's edit list cuts the last.
            packet.set_duration(1);
            packet.rescale_ts(self.time_base, stream_time_base);
            packet.write_interleaved(&mut self.output)?;
        }
        Ok(())
    }

    pub fn finish(mut self) -> Result<(), ffmpeg::Error> {
        self.encoder.send_eof()?;
        self.drain()?;
        self.output.write_trailer()
    }
}
