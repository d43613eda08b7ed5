//! `worker avatar prepare`: from an operator's recording to an avatar directory.
//!
//! ```text
//!   INPUT.mp4 ─ decode, cover-scale to the output size, resample to its fps
//!             ─ detect the face in every frame (CenterFace, `detect`)
//!             ─ one face per frame, the longest stretch with a face, smoothed boxes (`plan::track`)
//!             ─ a loop that does not jump: a matching cut or ping-pong (`plan::choose_loop`)
//!             ─ OUT/ID/ avatar.toml, idle.mp4, boxes.tsv, preview.png, preview.mp4
//! ```
//!
//! The recording may come from someone else, so it is read as data, not as instructions to
//! FFmpeg ([`avatar::InputLimits::recording`]): only MP4/MOV, Matroska and WebM containers (an
//! HLS playlist named `.mp4` would otherwise pull in other local files), only the local file,
//! pictures up to `--max-input-pixels` (4096×4096 by default), and only pixel formats FFmpeg's
//! scaler can convert; anything else is refused with [`PrepareError::Input`] naming the reason.
//!
//! The directory is written under a temporary name and renamed into place when complete, so a
//! failed run leaves no half avatar and an existing one is only replaced with `--force`. The
//! worker loads it as any avatar directory ([`crate::media::avatar::load_dir`]); docs/avatars.md
//! walks an operator through it.

pub mod detect;
pub mod plan;

use crate::media::avatar::{self, FaceBox, Fit, Looping, Yuv420};
use crate::media::file;
use crate::talk::face;
use indicatif::ProgressBar;
use std::fmt::Write as _;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Instant;

/// The smallest face (its box's shorter side, in output pixels) accepted. The lip-sync model
/// works on a 96×96 crop of the face, so a face below [`SHARP_FACE`] is upscaled into it and its
/// mouth pasted back at the face's own size: a little softer than the rest of the picture down
/// to about 64 px, clearly soft below, and below this too blurred to read.
pub const MIN_FACE: u32 = 48;
/// Faces at least this large (the model's crop) lose nothing; smaller ones prepare with a warning.
pub const SHARP_FACE: u32 = face::SIZE as u32;
/// Longest input read, in seconds (memory: about 0.4 MB per 512×512 frame, 1.4 MB at 1280×720).
pub const MAX_INPUT_SECONDS: u32 = 60;
/// Gaps without a face up to this long (in frames) are bridged by interpolation.
const MAX_GAP: usize = 5;
/// Smoothing of the box centre, in frames (the size is smoothed 4 times as long).
const SIGMA: f32 = 1.5;

/// What to prepare and where.
#[derive(Debug, Clone)]
pub struct Options {
    pub input: PathBuf,
    pub id: String,
    pub out: PathBuf,
    /// Display name; the id if absent.
    pub name: Option<String>,
    /// The output size, the recording cropped to cover it (`--size`); `None` keeps the
    /// recording's own framing (1280×720, 720×1280, 512×512…), scaled down only past what
    /// streams ([`avatar::stream_size`]).
    pub size: Option<(u32, u32)>,
    pub fps: u32,
    /// Longest loop kept, in seconds.
    pub max_seconds: u32,
    /// Forced loop mode; `None` chooses.
    pub looping: Option<Looping>,
    pub detector: PathBuf,
    pub onnxruntime: PathBuf,
    pub threads: usize,
    /// Replace an existing avatar directory.
    pub force: bool,
    /// The largest input picture, width × height ([`avatar::DEFAULT_MAX_INPUT_PIXELS`]).
    pub max_input_pixels: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum PrepareError {
    #[error("avatar id `{0}`: use 1 to 64 letters, digits, `-` or `_` (it becomes a directory and a URL)")]
    BadId(String),
    #[error("{size}: the output size must be even, from 96 to 4096 pixels a side, and fps 1 to 60")]
    BadSize { size: String },
    #[error("cannot read {path} as a video: {message}")]
    Input { path: PathBuf, message: String },
    #[error(
        "no face found in any of the {frames} frames of {path}: record the face from the front, \
         lit evenly, filling about a third of the picture"
    )]
    NoFace { path: PathBuf, frames: usize },
    #[error(
        "the face in {path} is only about {w}×{h} pixels in the {width}×{height} output; the lip-sync \
         model needs at least {min}×{min}: record closer (head and shoulders), or prepare at a larger --size"
    )]
    TooSmall {
        path: PathBuf,
        w: u32,
        h: u32,
        width: u32,
        height: u32,
        min: u32,
    },
    #[error("{0} exists: pass --force to replace it")]
    Exists(PathBuf),
    #[error(transparent)]
    Detector(#[from] detect::DetectError),
    #[error("writing {path}: {message}")]
    Write { path: PathBuf, message: String },
}

/// What a run found and wrote.
#[derive(Debug, Clone)]
pub struct Report {
    pub dir: PathBuf,
    pub fps: u32,
    pub input_frames: usize,
    /// Input frames the avatar keeps (the loop plays these).
    pub kept: Range<usize>,
    pub no_face: Vec<Range<usize>>,
    pub several: Vec<Range<usize>>,
    /// Kept frames whose box is interpolated (a short gap in detection).
    pub interpolated: usize,
    pub looping: plan::LoopPlan,
    /// The median box, written as `face_box` (what an older worker would use).
    pub typical: FaceBox,
    /// The median detected face's width and height, in output pixels.
    pub face_size: (u32, u32),
    /// The avatar's picture: width and height.
    pub size: (u32, u32),
    pub decode_ms: f64,
    pub detect_ms: f64,
    pub write_ms: f64,
}

impl Report {
    fn seconds(&self, frames: usize) -> f64 {
        frames as f64 / f64::from(self.fps)
    }

    fn span(&self, r: &Range<usize>) -> String {
        format!(
            "frames {}–{} ({:.2}–{:.2} s)",
            r.start,
            r.end - 1,
            self.seconds(r.start),
            self.seconds(r.end)
        )
    }

    /// A warning for a face smaller than the model's crop, saying what to expect.
    pub fn small_face_warning(&self) -> Option<String> {
        let (w, h) = self.face_size;
        let side = w.min(h);
        (side < SHARP_FACE).then(|| {
            format!(
                "warning: the face is about {w}×{h} pixels, smaller than the {SHARP_FACE}×{SHARP_FACE} the lip-sync \
                 model works at: its mouth is upscaled {:.1}× and will look softer than the rest of the picture \
                 (record closer, or prepare at a larger --size, for a sharp mouth)",
                f64::from(SHARP_FACE) / f64::from(side.max(1))
            )
        })
    }

    /// The summary `worker avatar prepare` prints.
    pub fn render(&self) -> String {
        let mut out = String::new();
        if let Some(warning) = self.small_face_warning() {
            let _ = writeln!(out, "{warning}");
        }
        let _ = writeln!(
            out,
            "read {} frames ({:.2} s at {} fps); the avatar is {}×{}",
            self.input_frames,
            self.seconds(self.input_frames),
            self.fps,
            self.size.0,
            self.size.1
        );
        for r in &self.no_face {
            let _ = writeln!(out, "no face: {}", self.span(r));
        }
        for r in &self.several {
            let _ = writeln!(
                out,
                "several faces: {} (the one tracked from the frames before is used)",
                self.span(r)
            );
        }
        let _ = writeln!(
            out,
            "kept: {}; {} box(es) interpolated",
            self.span(&self.kept),
            self.interpolated
        );
        let l = &self.looping;
        let _ = writeln!(
            out,
            "loop: {} over {} frames ({:.2} s); change at the seam {:.2}, between frames {:.2} (median)",
            match l.looping {
                Looping::Forward => "forward",
                Looping::Pingpong => "pingpong",
            },
            l.len,
            self.seconds(l.len),
            l.seam,
            l.normal
        );
        let b = self.typical;
        let _ = writeln!(out, "face box (median): x {} y {} w {} h {}", b.x, b.y, b.w, b.h);
        let _ = writeln!(
            out,
            "time: decode {:.0} ms, detect {:.0} ms ({:.1} ms a frame), write {:.0} ms",
            self.decode_ms,
            self.detect_ms,
            self.detect_ms / self.input_frames.max(1) as f64,
            self.write_ms
        );
        let _ = writeln!(out, "wrote {}", self.dir.display());
        out
    }
}

/// A valid avatar id: it names a directory and appears in URLs.
pub fn valid_id(id: &str) -> bool {
    (1..=64).contains(&id.len()) && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
}

/// Prepare `options.input` into `options.out/options.id`, reporting progress on `progress`.
pub fn run(options: &Options, progress: &ProgressBar) -> Result<Report, PrepareError> {
    if !valid_id(&options.id) {
        return Err(PrepareError::BadId(options.id.clone()));
    }
    let fps = options.fps;
    let bad_size = |(width, height): (u32, u32)| {
        !(96..=4096).contains(&width) || !(96..=4096).contains(&height) || width % 2 + height % 2 != 0
    };
    if options.size.is_some_and(bad_size) || !(1..=60).contains(&fps) {
        let size = options
            .size
            .map_or("the recording's size".into(), |(w, h)| format!("{w}×{h}"));
        return Err(PrepareError::BadSize {
            size: format!("{size} at {fps} fps"),
        });
    }
    let dir = options.out.join(&options.id);
    if dir.exists() && !options.force {
        return Err(PrepareError::Exists(dir));
    }
    crate::media::encoder::init().map_err(|e| input_error(&options.input, e.to_string()))?;
    // FFmpeg's own messages about a bad file would repeat, less clearly, the error returned.
    ffmpeg_next::util::log::set_level(ffmpeg_next::util::log::Level::Fatal);

    progress.set_message("decoding");
    let t = Instant::now();
    let max_frames = (MAX_INPUT_SECONDS * fps) as usize;
    let limits = avatar::InputLimits::recording(options.max_input_pixels);
    let (fit, (width, height)) = match options.size {
        Some(size) => (Fit::Cover, size),
        None => (Fit::Keep, (0, 0)),
    };
    let (frames, _, _) = avatar::decode_video(&options.input, width, height, max_frames, fps, fit, &limits)
        .map_err(|e| input_error(&options.input, decode_message(e)))?;
    // Never empty: `decode_video` refuses a video without a picture.
    let (width, height) = frames.first().map_or((0, 0), |f| (f.width, f.height));
    if bad_size((width, height)) {
        return Err(input_error(
            &options.input,
            format!("its pictures are {width}×{height}; the avatar needs at least 96×96 (or pass --size)"),
        ));
    }
    let decode_ms = ms(t);

    let mut detector = detect::FaceDetector::load(&options.detector, &options.onnxruntime, options.threads)?;
    progress.set_length(frames.len() as u64);
    progress.set_message("finding the face");
    let t = Instant::now();
    let mut found = Vec::with_capacity(frames.len());
    for frame in &frames {
        found.push(detector.detect(frame)?);
        progress.inc(1);
    }
    let detect_ms = ms(t);

    let choices = plan::choose(&found);
    let track = plan::track(&choices, MAX_GAP, SIGMA, width, height).ok_or_else(|| PrepareError::NoFace {
        path: options.input.clone(),
        frames: frames.len(),
    })?;
    let mut sides: Vec<(u32, u32)> = choices
        .iter()
        .filter_map(|c| c.face)
        .map(|d| (d.w.round() as u32, d.h.round() as u32))
        .collect();
    sides.sort_by_key(|(w, h)| (*w).min(*h));
    let (w, h) = sides[sides.len() / 2];
    if w.min(h) < MIN_FACE {
        return Err(PrepareError::TooSmall {
            path: options.input.clone(),
            w,
            h,
            width,
            height,
            min: MIN_FACE,
        });
    }

    // The loop: at most `max_seconds` of the kept stretch, cut or ping-ponged.
    let keep = track.frames.len().min((options.max_seconds.max(1) * fps) as usize);
    let kept = track.frames.start..track.frames.start + keep;
    let thumbs: Vec<Vec<u8>> = frames[kept.clone()].iter().map(plan::thumbnail).collect();
    let min_len = (keep / 2).max(2 * fps as usize).min(keep);
    let mut looping = plan::choose_loop(&thumbs, min_len);
    if let Some(forced) = options.looping {
        if forced != looping.looping {
            looping = plan::LoopPlan {
                looping: forced,
                len: keep,
                seam: match forced {
                    Looping::Forward => plan::difference(&thumbs[keep - 1], &thumbs[0]),
                    Looping::Pingpong => looping.normal,
                },
                ..looping
            };
        }
    }
    let loop_frames = &frames[kept.start..kept.start + looping.len];
    let boxes = &track.boxes[..looping.len];
    let typical = median_box(boxes);

    progress.set_message("writing");
    let t = Instant::now();
    let partial = options.out.join(format!(".{}.partial", options.id));
    let _ = std::fs::remove_dir_all(&partial);
    let name = options.name.clone().unwrap_or_else(|| options.id.clone());
    let written = write_avatar(&partial, &name, loop_frames, boxes, &track, &looping, typical, fps)
        .and_then(|()| write_contact_sheet(&partial.join("preview.png"), &frames, &choices, &track))
        .and_then(|()| {
            if options.force && dir.exists() {
                std::fs::remove_dir_all(&dir).map_err(|e| write_error(&dir, e))?;
            }
            std::fs::rename(&partial, &dir).map_err(|e| write_error(&dir, e))
        });
    if let Err(e) = written {
        let _ = std::fs::remove_dir_all(&partial);
        return Err(e);
    }
    let write_ms = ms(t);
    progress.finish_and_clear();
    Ok(Report {
        dir,
        fps,
        input_frames: frames.len(),
        kept: kept.start..kept.start + looping.len,
        no_face: track.no_face.clone(),
        several: track.several.clone(),
        interpolated: track.interpolated[..looping.len].iter().filter(|i| **i).count(),
        looping,
        typical,
        face_size: (w, h),
        size: (width, height),
        decode_ms,
        detect_ms,
        write_ms,
    })
}

fn ms(t: Instant) -> f64 {
    t.elapsed().as_secs_f64() * 1e3
}

fn input_error(path: &Path, message: String) -> PrepareError {
    PrepareError::Input {
        path: path.into(),
        message,
    }
}

/// The decoder's error without the path, which [`PrepareError::Input`] names already.
fn decode_message(e: avatar::AvatarError) -> String {
    use avatar::AvatarError as E;
    match e {
        E::Decode { source, .. } => source.to_string(),
        E::Read { source, .. } => source.to_string(),
        E::NoVideo { .. } => "it has no video stream".into(),
        E::Empty { .. } => "it has no pictures".into(),
        E::Container { found, .. } => format!(
            "it is not an MP4/MOV, Matroska or WebM file ({found}); convert it first, e.g. \
             `ffmpeg -i INPUT -c:v libx264 recording.mp4`"
        ),
        E::TooLarge {
            width,
            height,
            max_pixels,
            ..
        } => format!(
            "its pictures are {width}×{height}, more than the {max_pixels} pixels accepted \
             (--max-input-pixels); scale it down first"
        ),
        E::PixelFormat { format, .. } => {
            format!("its pictures are in a pixel format that cannot be converted ({format})")
        }
        E::Changed { .. } => "the picture size or pixel format changes partway through".into(),
        other => other.to_string(),
    }
}

fn write_error(path: &Path, e: impl std::fmt::Display) -> PrepareError {
    PrepareError::Write {
        path: path.into(),
        message: e.to_string(),
    }
}

fn median_box(boxes: &[FaceBox]) -> FaceBox {
    let median = |f: fn(&FaceBox) -> u32| {
        let mut v: Vec<u32> = boxes.iter().map(f).collect();
        v.sort_unstable();
        v.get(v.len() / 2).copied().unwrap_or(0)
    };
    FaceBox {
        x: median(|b| b.x),
        y: median(|b| b.y),
        w: median(|b| b.w),
        h: median(|b| b.h),
    }
}

/// Y, U, V of the outline colours (BT.601, video range).
const GREEN: [u8; 3] = [145, 54, 34];
const YELLOW: [u8; 3] = [210, 16, 146];
const RED: [u8; 3] = [81, 90, 240];

/// Draw the outline of `b` on `picture`, `thickness` pixels wide, inside the box.
pub fn outline(picture: &mut Yuv420, b: FaceBox, [y, u, v]: [u8; 3], thickness: u32) {
    let (w, h) = (picture.width, picture.height);
    let (x0, y0) = (b.x.min(w - 1), b.y.min(h - 1));
    let (x1, y1) = ((b.x + b.w).min(w), (b.y + b.h).min(h));
    for py in y0..y1 {
        for px in x0..x1 {
            let edge = px < x0 + thickness || px + thickness >= x1 || py < y0 + thickness || py + thickness >= y1;
            if edge {
                picture.y[(py * w + px) as usize] = y;
                let c = ((py / 2) * (w / 2) + px / 2) as usize;
                picture.u[c] = u;
                picture.v[c] = v;
            }
        }
    }
}

/// The avatar itself: the idle clip, its boxes, `avatar.toml`, and the loop's preview.
#[allow(clippy::too_many_arguments)]
fn write_avatar(
    dir: &Path,
    name: &str,
    frames: &[Yuv420],
    boxes: &[FaceBox],
    track: &plan::Track,
    looping: &plan::LoopPlan,
    typical: FaceBox,
    fps: u32,
) -> Result<(), PrepareError> {
    std::fs::create_dir_all(dir).map_err(|e| write_error(dir, e))?;
    let (width, height) = (frames[0].width, frames[0].height);
    let mp4 = |path: PathBuf, pictures: &mut dyn Iterator<Item = Yuv420>| -> Result<(), PrepareError> {
        let mut writer = file::Mp4Writer::create(&path, width, height, fps).map_err(|e| write_error(&path, e))?;
        for p in pictures {
            writer.write(&p).map_err(|e| write_error(&path, e))?;
        }
        writer.finish().map_err(|e| write_error(&path, e))
    };
    mp4(dir.join("idle.mp4"), &mut frames.iter().cloned())?;

    let mut tsv = String::from(
        "# Face boxes of idle.mp4, one line per frame, in its pixels (worker avatar prepare).\n\
         # frame\tx\ty\tw\th\tsource\n",
    );
    for (i, b) in boxes.iter().enumerate() {
        let source = if track.interpolated[i] {
            "interpolated"
        } else {
            "detected"
        };
        let _ = writeln!(tsv, "{i}\t{}\t{}\t{}\t{}\t{source}", b.x, b.y, b.w, b.h);
    }
    let path = dir.join("boxes.tsv");
    std::fs::write(&path, tsv).map_err(|e| write_error(&path, e))?;

    let meta = format!(
        "# Written by `worker avatar prepare`; docs/avatars.md explains each key.\n\
         name = {}\n\
         video = \"idle.mp4\"\n\
         boxes = \"boxes.tsv\"\n\
         # The median of the boxes, for tools that read one box.\n\
         face_box = [{}, {}, {}, {}]\n\
         loop = \"{}\"\n\
         max_seconds = {}\n",
        toml_string(name),
        typical.x,
        typical.y,
        typical.w,
        typical.h,
        match looping.looping {
            Looping::Forward => "forward",
            Looping::Pingpong => "pingpong",
        },
        frames.len().div_ceil(fps as usize).max(1),
    );
    let path = dir.join("avatar.toml");
    std::fs::write(&path, meta).map_err(|e| write_error(&path, e))?;

    // The preview: one turn of the loop as the worker plays it, the lip-sync crop outlined.
    let clip = avatar::AvatarClip {
        id: String::new(),
        name: String::new(),
        boxes: boxes.to_vec(),
        frames: frames.to_vec(),
        looping: looping.looping,
    };
    let turn = match looping.looping {
        Looping::Forward => frames.len(),
        Looping::Pingpong => (2 * frames.len()).saturating_sub(2).max(1),
    };
    mp4(
        dir.join("preview.mp4"),
        &mut (0..turn).map(|i| {
            let mut p = clip.frame(i).clone();
            outline(&mut p, face::crop_region(clip.face_box(i), width, height), GREEN, 2);
            p
        }),
    )
}

/// A TOML basic string.
fn toml_string(s: &str) -> String {
    toml::Value::String(s.to_owned()).to_string()
}

/// Twelve frames spread over the input, 4 × 3, each with its face box: green where detected,
/// yellow where interpolated, a red frame where there is no face or it is not kept.
fn write_contact_sheet(
    path: &Path,
    frames: &[Yuv420],
    choices: &[plan::Choice],
    track: &plan::Track,
) -> Result<(), PrepareError> {
    const COLS: u32 = 4;
    const ROWS: u32 = 3;
    let (width, height) = (frames[0].width, frames[0].height);
    let tile_w = 256u32.min(width) / 2 * 2;
    let tile_h = ((u64::from(tile_w) * u64::from(height) / u64::from(width)) as u32 / 2 * 2).max(2);
    let mut sheet = Yuv420::new(COLS * tile_w, ROWS * tile_h);
    let n = frames.len();
    for k in 0..(COLS * ROWS) as usize {
        let i = (k * n / (COLS * ROWS) as usize).min(n - 1);
        let mut tile = file::scaled(&frames[i], tile_w, tile_h).map_err(|e| write_error(path, e))?;
        let scale = |b: FaceBox| FaceBox {
            x: b.x * tile_w / width,
            y: b.y * tile_h / height,
            w: (b.w * tile_w / width).max(2),
            h: (b.h * tile_h / height).max(2),
        };
        let kept = track.frames.contains(&i);
        match (kept, choices[i].face.is_some()) {
            (true, detected) => outline(
                &mut tile,
                scale(track.boxes[i - track.frames.start]),
                if detected { GREEN } else { YELLOW },
                2,
            ),
            (false, _) => outline(
                &mut tile,
                FaceBox {
                    x: 0,
                    y: 0,
                    w: tile_w,
                    h: tile_h,
                },
                RED,
                4,
            ),
        }
        let (ox, oy) = ((k as u32 % COLS) * tile_w, (k as u32 / COLS) * tile_h);
        let sw = sheet.width as usize;
        for row in 0..tile_h as usize {
            let at = (oy as usize + row) * sw + ox as usize;
            sheet.y[at..at + tile_w as usize]
                .copy_from_slice(&tile.y[row * tile_w as usize..(row + 1) * tile_w as usize]);
        }
        for row in 0..(tile_h / 2) as usize {
            let at = (oy as usize / 2 + row) * (sw / 2) + ox as usize / 2;
            let tw = (tile_w / 2) as usize;
            sheet.u[at..at + tw].copy_from_slice(&tile.u[row * tw..(row + 1) * tw]);
            sheet.v[at..at + tw].copy_from_slice(&tile.v[row * tw..(row + 1) * tw]);
        }
    }
    let bytes = file::png(&sheet).map_err(|e| write_error(path, e))?;
    std::fs::write(path, bytes).map_err(|e| write_error(path, e))
}

/// Recordings made with the ffmpeg program (scripts/install-deps installs it), read the way
/// `worker avatar prepare` reads them. A process abort inside FFmpeg would end this test binary,
/// so each test passing also shows the input was refused without one.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::avatar::{AvatarError, InputLimits};
    use std::process::Command;

    fn ffmpeg(args: &[&str], out: &Path) {
        let status = Command::new("ffmpeg")
            .args(["-v", "error", "-y"])
            .args(args)
            .arg(out)
            .status()
            .expect("ffmpeg (scripts/install-deps)");
        assert!(status.success(), "ffmpeg {args:?}");
    }

    /// A second of a test pattern, `size`, as `out` (its container by the extension).
    fn pattern(size: &str, out: &Path) {
        let source = format!("testsrc=size={size}:rate=25:duration=1");
        ffmpeg(&["-f", "lavfi", "-i", &source, "-pix_fmt", "yuv420p"], out);
    }

    fn decode(path: &Path, limits: &InputLimits) -> Result<usize, AvatarError> {
        crate::media::encoder::init().expect("ffmpeg");
        ffmpeg_next::util::log::set_level(ffmpeg_next::util::log::Level::Fatal);
        avatar::decode_video(path, 128, 128, 10, 25, avatar::Fit::Cover, limits).map(|(frames, _, _)| frames.len())
    }

    #[test]
    fn recordings_in_mp4_mov_matroska_and_webm_are_read() {
        let dir = tempfile::tempdir().expect("tmp");
        for name in ["a.mp4", "a.mov", "a.mkv", "a.webm"] {
            let path = dir.path().join(name);
            pattern("160x120", &path);
            let frames = decode(&path, &InputLimits::recording(avatar::DEFAULT_MAX_INPUT_PIXELS))
                .unwrap_or_else(|e| panic!("{name}: {e}"));
            assert_eq!(frames, 10, "{name}");
        }
    }

    /// Issue 26 (N9): an HLS playlist named `.mp4` made FFmpeg read another local video (and, in
    /// a second try, abort the process in swscale). It is refused before FFmpeg opens it.
    #[test]
    fn a_playlist_named_mp4_is_refused_and_the_video_it_lists_is_not_read() {
        let dir = tempfile::tempdir().expect("tmp");
        let other = dir.path().join("private.ts");
        pattern("160x120", &other);
        let playlist = dir.path().join("recording.mp4");
        std::fs::write(
            &playlist,
            format!(
                "#EXTM3U\n#EXT-X-VERSION:3\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{}\n#EXT-X-ENDLIST\n",
                other.display()
            ),
        )
        .expect("write");
        // Any container, as the worker reads its own avatar directory: FFmpeg follows the list.
        assert_eq!(
            decode(&playlist, &InputLimits::AVATAR_DIR).expect("FFmpeg reads the playlist's video"),
            10,
            "the attack this test is about"
        );
        let err = decode(&playlist, &InputLimits::recording(avatar::DEFAULT_MAX_INPUT_PIXELS))
            .expect_err("a playlist is not a recording");
        assert!(matches!(err, AvatarError::Container { .. }), "{err}");
        let message = decode_message(err);
        assert!(
            message.contains("not an MP4/MOV, Matroska or WebM file") && message.contains("#EXTM3U"),
            "{message}"
        );
        // The same refusal from the command's entry point, as the operator sees it.
        let options = Options {
            input: playlist.clone(),
            id: "playlist".into(),
            out: dir.path().join("avatars"),
            name: None,
            size: Some((128, 128)),
            fps: 25,
            max_seconds: 10,
            looping: None,
            detector: dir.path().join("no-detector.onnx"),
            onnxruntime: dir.path().join("no-onnxruntime.so"),
            threads: 1,
            force: false,
            max_input_pixels: avatar::DEFAULT_MAX_INPUT_PIXELS,
        };
        let err = run(&options, &ProgressBar::hidden()).expect_err("refused");
        assert!(matches!(err, PrepareError::Input { .. }), "{err}");
        assert!(
            err.to_string()
                .contains("recording.mp4 as a video: it is not an MP4/MOV"),
            "{err}"
        );
        assert!(!dir.path().join("avatars").join("playlist").exists());
    }

    #[test]
    fn pictures_over_the_pixel_limit_are_refused_before_decoding() {
        let dir = tempfile::tempdir().expect("tmp");
        let path = dir.path().join("large.mp4");
        pattern("320x240", &path);
        let err = decode(&path, &InputLimits::recording(320 * 240 - 1)).expect_err("over the limit");
        assert!(
            matches!(
                err,
                AvatarError::TooLarge {
                    width: 320,
                    height: 240,
                    ..
                }
            ),
            "{err}"
        );
        assert!(decode_message(err).contains("320×240, more than the 76799 pixels"));
        assert_eq!(
            decode(&path, &InputLimits::recording(320 * 240)).expect("at the limit"),
            10
        );
        // The default: 4096×4096. One picture just over it (MJPEG encodes it in a moment).
        let huge = dir.path().join("huge.mkv");
        ffmpeg(
            &[
                "-f",
                "lavfi",
                "-i",
                "color=c=gray:size=4112x4096:rate=1:duration=1",
                "-c:v",
                "mjpeg",
            ],
            &huge,
        );
        let err = decode(&huge, &InputLimits::recording(avatar::DEFAULT_MAX_INPUT_PIXELS)).expect_err("too large");
        assert!(
            matches!(
                err,
                AvatarError::TooLarge {
                    width: 4112,
                    height: 4096,
                    ..
                }
            ),
            "{err}"
        );
    }

    #[test]
    fn containers_are_recognised_by_their_first_bytes() {
        use avatar::sniff_container;
        assert_eq!(sniff_container(b"\0\0\0\x20ftypisom\0\0\x02\0"), Some("MP4/MOV"));
        assert_eq!(sniff_container(b"\0\0\0\x08wide\0\0\0\0mdat"), Some("MP4/MOV"));
        assert_eq!(sniff_container(&[0x1a, 0x45, 0xdf, 0xa3, 0x9f]), Some("Matroska/WebM"));
        for other in [
            &b"#EXTM3U\n#EXT-X-VERSION:3"[..],
            b"ffconcat version 1.0",
            b"\x47\x40\x11\x10",
            b"RIFF",
            b"",
        ] {
            assert_eq!(sniff_container(other), None, "{other:?}");
        }
    }

    #[test]
    fn pixel_formats_the_scaler_cannot_take_are_refused_not_asserted_on() {
        use ffmpeg_next::format::Pixel;
        crate::media::encoder::init().expect("ffmpeg");
        let path = Path::new("x.mp4");
        let check = |format, w, h| avatar::check_picture(path, format, w, h, avatar::DEFAULT_MAX_INPUT_PIXELS);
        check(Pixel::YUV420P, 640, 480).expect("the usual");
        check(Pixel::YUVJ420P, 640, 480).expect("full-range, as phones record");
        assert!(matches!(
            check(Pixel::None, 640, 480),
            Err(AvatarError::PixelFormat { .. })
        ));
        assert!(matches!(check(Pixel::YUV420P, 0, 480), Err(AvatarError::Empty { .. })));
        assert!(matches!(
            check(Pixel::YUV420P, 4097, 4096),
            Err(AvatarError::TooLarge { .. })
        ));
    }
}
