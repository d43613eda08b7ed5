//! Idle avatars: the picture a session shows from its first frame.
//!
//! An avatar is a short loop of YUV 4:2:0 frames plus its face boxes (where the lip-sync stage
//! crops the face from and pastes the talking one back): one box per frame, so the crop follows a
//! head that moves, or one fixed box for them all. Two sources:
//!
//! * **a directory**: `<avatar_dir>/<avatar_id>/avatar.toml` naming an MP4 (or any file FFmpeg
//!   reads) that is decoded once at start-up and scaled to the output size, and either a
//!   `face_box` typed by hand or a `boxes` file, one box per frame, as `worker avatar prepare`
//!   writes it ([`crate::prepare`]);
//! * **the built-in synthetic avatar**, drawn in code — a face that breathes and blinks — so the
//!   demo and the tests need no files.
//!
//! Frames are decoded or drawn once and shared read-only by every session (`Arc`).

use serde::Deserialize;
use std::path::{Path, PathBuf};

/// One planar YUV 4:2:0 picture, tightly packed (stride = width).
#[derive(Debug, Clone)]
pub struct Yuv420 {
    pub width: u32,
    pub height: u32,
    pub y: Vec<u8>,
    pub u: Vec<u8>,
    pub v: Vec<u8>,
}

impl Yuv420 {
    pub fn new(width: u32, height: u32) -> Self {
        let (w, h) = (width as usize, height as usize);
        Self {
            width,
            height,
            y: vec![16; w * h],
            u: vec![128; w * h / 4],
            v: vec![128; w * h / 4],
        }
    }

    /// The picture as a player shows it in `orientation`: mirrored left to right first, then
    /// turned clockwise (sides swap on odd turns). Both sides must be even (4:2:0).
    pub(crate) fn oriented(&self, orientation: Orientation) -> Self {
        debug_assert!(
            self.width.is_multiple_of(2) && self.height.is_multiple_of(2),
            "4:2:0 needs even sides"
        );
        let turns = orientation.quarter_turns % 4;
        let (w, h) = (self.width, self.height);
        let (tw, th) = if turns % 2 == 1 { (h, w) } else { (w, h) };
        let mut out = Self::new(tw, th);
        for (src, dst, pw, ph) in [
            (&self.y, &mut out.y, w as usize, h as usize),
            (&self.u, &mut out.u, w as usize / 2, h as usize / 2),
            (&self.v, &mut out.v, w as usize / 2, h as usize / 2),
        ] {
            let out_w = if turns % 2 == 1 { ph } else { pw };
            for y in 0..ph {
                for x in 0..pw {
                    let mx = if orientation.mirror { pw - 1 - x } else { x };
                    // Where the (mirrored) pixel lands after the turn.
                    let (nx, ny) = match turns {
                        1 => (ph - 1 - y, mx),
                        2 => (pw - 1 - mx, ph - 1 - y),
                        3 => (y, pw - 1 - mx),
                        _ => (mx, y),
                    };
                    dst[ny * out_w + nx] = src[y * pw + x];
                }
            }
        }
        out
    }
}

/// How a player shows a stored picture: mirrored left to right first (`mirror`), then turned
/// clockwise by `quarter_turns` × 90°. MP4 and MOV files say it in their track header's display
/// matrix; a phone held upright stores its video sideways and writes one clockwise turn.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Orientation {
    pub mirror: bool,
    pub quarter_turns: u32,
}

impl Orientation {
    /// From an FFmpeg display matrix: nine native-endian `i32` (a, b, u, c, d, v, x, y, w; a–d in
    /// 16.16 fixed point). A negative determinant (ad − bc) mirrors; the turn is then
    /// atan2(b, a), read after undoing the mirror. `None` when it is not nine numbers or has no
    /// linear part.
    pub(crate) fn from_display_matrix(matrix: &[u8]) -> Option<Self> {
        if matrix.len() != 36 {
            return None;
        }
        let m: Vec<f64> = matrix
            .chunks_exact(4)
            .map(|c| f64::from(i32::from_ne_bytes([c[0], c[1], c[2], c[3]])))
            .collect();
        let (a, b, c, d) = (m[0], m[1], m[3], m[4]);
        if a == 0.0 && b == 0.0 {
            return None;
        }
        let mirror = a * d - b * c < 0.0;
        let (a, b) = if mirror { (-a, -b) } else { (a, b) };
        let degrees = b.atan2(a).to_degrees();
        Some(Self {
            mirror,
            quarter_turns: ((degrees / 90.0).round() as i64).rem_euclid(4) as u32,
        })
    }

    fn sideways(self) -> bool {
        self.quarter_turns % 2 == 1
    }

    /// The part `(x, y, w, h)` of the stored `stored_w`×`stored_h` picture that shows as the
    /// rectangle `(x, y, w, h)` of the picture as shown: the turn undone, then the mirror.
    fn stored_rect(self, (x, y, w, h): (u32, u32, u32, u32), (stored_w, stored_h): (u32, u32)) -> (u32, u32, u32, u32) {
        let (sw, sh) = (stored_w, stored_h);
        let r = match self.quarter_turns % 4 {
            1 => (y, sh - x - w, h, w),
            2 => (sw - x - w, sh - y - h, w, h),
            3 => (sw - y - h, x, h, w),
            _ => (x, y, w, h),
        };
        if self.mirror {
            (sw - r.0 - r.2, r.1, r.2, r.3)
        } else {
            r
        }
    }
}

/// Face box in output pixels: x, y, width, height.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub struct FaceBox {
    pub x: u32,
    pub y: u32,
    pub w: u32,
    pub h: u32,
}

/// How the idle clip repeats.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Looping {
    /// First to last, then the first again: seamless only if the recording ends as it began.
    #[default]
    Forward,
    /// First to last and back (0 1 … n-1 n-2 … 1 0 1 …): never a jump, whatever the recording.
    Pingpong,
}

/// An idle loop, ready to stream.
#[derive(Debug)]
pub struct AvatarClip {
    pub id: String,
    pub name: String,
    /// One face box per frame of `frames`, or a single one for every frame.
    pub boxes: Vec<FaceBox>,
    pub frames: Vec<Yuv420>,
    pub looping: Looping,
}

impl AvatarClip {
    /// Which of `frames` the `i`-th idle picture shows (any `i`: the loop repeats).
    pub fn frame_index(&self, i: usize) -> usize {
        let n = self.frames.len().max(1);
        match self.looping {
            Looping::Pingpong if n > 2 => {
                let period = 2 * n - 2;
                let k = i % period;
                if k < n {
                    k
                } else {
                    period - k
                }
            }
            _ => i % n,
        }
    }

    /// The picture's width and height: every frame's (`(0, 0)` for a clip without frames).
    pub fn size(&self) -> (u32, u32) {
        self.frames.first().map_or((0, 0), |f| (f.width, f.height))
    }

    /// The `i`-th idle picture.
    pub fn frame(&self, i: usize) -> &Yuv420 {
        &self.frames[self.frame_index(i)]
    }

    /// The face box of the `i`-th idle picture.
    pub fn face_box(&self, i: usize) -> FaceBox {
        let fixed = FaceBox { x: 0, y: 0, w: 2, h: 2 };
        match self.boxes.as_slice() {
            [] => fixed,
            [only] => *only,
            boxes => boxes.get(self.frame_index(i)).copied().unwrap_or(boxes[0]),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AvatarError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{path}: {message}")]
    Metadata { path: PathBuf, message: String },
    #[error("decoding {path}: {source}")]
    Decode { path: PathBuf, source: ffmpeg_next::Error },
    #[error("{path}: no video stream")]
    NoVideo { path: PathBuf },
    #[error("{path}: decoded no frames")]
    Empty { path: PathBuf },
    /// Not one of the containers this reader takes (`worker avatar prepare`: MP4/MOV, Matroska,
    /// WebM), by the file's first bytes or by FFmpeg's probe.
    #[error("{path} is not an MP4/MOV, Matroska or WebM file ({found}); convert it first, e.g. `ffmpeg -i INPUT -c:v libx264 recording.mp4`")]
    Container { path: PathBuf, found: String },
    /// The pictures are larger than the reader takes.
    #[error(
        "{path}: its pictures are {width}×{height}, more than the {max_pixels} pixels accepted; scale it down first"
    )]
    TooLarge {
        path: PathBuf,
        width: u32,
        height: u32,
        max_pixels: u64,
    },
    /// The decoder gives pictures FFmpeg's scaler cannot convert (an unknown pixel format, or none).
    #[error("{path}: its pictures are in a pixel format that cannot be converted ({format})")]
    PixelFormat { path: PathBuf, format: String },
    /// The picture size or pixel format changes partway through.
    #[error("{path}: the picture size or pixel format changes partway through the video")]
    Changed { path: PathBuf },
    #[error("{dir}: no avatars found (expected <id>/avatar.toml)")]
    NoneFound { dir: PathBuf },
    #[error("{path}, line {line}: {message}")]
    Boxes {
        path: PathBuf,
        line: usize,
        message: String,
    },
}

/// `avatar.toml` inside an avatar's directory.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AvatarMeta {
    name: String,
    /// Video file, relative to the avatar's directory.
    video: PathBuf,
    /// Face box `[x, y, w, h]` in the source video's pixels, for every frame.
    face_box: Option<[u32; 4]>,
    /// A file of one face box per frame (as `worker avatar prepare` writes it), relative to the
    /// avatar's directory; takes the place of `face_box`.
    boxes: Option<PathBuf>,
    /// Longest loop to keep, in seconds (memory bound).
    #[serde(default = "default_max_seconds")]
    max_seconds: u32,
    /// `forward` (the default) or `pingpong`.
    #[serde(default, rename = "loop")]
    looping: Looping,
}

fn default_max_seconds() -> u32 {
    10
}

/// The built-in avatar's loop length: 4 s, one breath and one blink.
const SYNTHETIC_SECONDS: u32 = 4;

/// Draw the built-in avatar: a face on a gradient that breathes and blinks.
pub fn synthetic(width: u32, height: u32, fps: u32) -> AvatarClip {
    let n = (SYNTHETIC_SECONDS * fps).max(1);
    let frames = (0..n).map(|i| draw_face(width, height, i as f32 / n as f32)).collect();
    AvatarClip {
        id: "synthetic".into(),
        name: "Built-in synthetic tutor".into(),
        boxes: vec![synthetic_face_box(width, height)],
        frames,
        looping: Looping::Forward,
    }
}

/// The built-in avatar's face box at `width`×`height`.
pub fn synthetic_face_box(width: u32, height: u32) -> FaceBox {
    let s = |v: f32| (v * width.min(height) as f32) as u32;
    FaceBox {
        x: width / 2 - s(0.22),
        y: s(0.2),
        w: s(0.44),
        h: s(0.54),
    }
}

type Rgb = [f32; 3];

fn ellipse(x: f32, y: f32, cx: f32, cy: f32, rx: f32, ry: f32) -> bool {
    let (dx, dy) = ((x - cx) / rx, (y - cy) / ry);
    dx * dx + dy * dy <= 1.0
}

/// Where the built-in avatar's figure stands in a picture: its centre line, how far it is moved
/// down, and its size (the picture's shorter side for the built-in avatar). The face is the
/// ellipse centred at (`cx`, `dy + 0.46 size`) with radii 0.20 and 0.25 `size`; the mouth is
/// centred at (`cx`, `dy + 0.59 size`). Tests draw moving faces with it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pose {
    pub cx: f32,
    pub dy: f32,
    pub size: f32,
}

impl Pose {
    /// The built-in avatar's pose in a `width`×`height` picture.
    pub fn centred(width: u32, height: u32) -> Self {
        Self {
            cx: width as f32 / 2.0,
            dy: 0.0,
            size: width.min(height) as f32,
        }
    }
}

/// One frame at `phase` ∈ [0, 1) of the loop.
fn draw_face(width: u32, height: u32, phase: f32) -> Yuv420 {
    draw(width, height, phase, Some(Pose::centred(width, height)))
}

/// The built-in avatar's figure at `pose` (none: the empty background), at `phase` ∈ [0, 1) of
/// its breath and blink.
pub fn draw(width: u32, height: u32, phase: f32, pose: Option<Pose>) -> Yuv420 {
    let tau = std::f32::consts::TAU;
    let Pose { cx, dy, size: s } = pose.unwrap_or(Pose {
        cx: -1e6,
        dy: 0.0,
        size: 1.0,
    });
    let breathe = (phase * tau).sin() * 0.006 * s; // head and shoulders rise and fall
    let blink = {
        // Eyes close around 55 % of the loop for ~150 ms.
        let d = ((phase - 0.55) * SYNTHETIC_SECONDS as f32 / 0.075).abs();
        d.min(1.0)
    };
    let face_cy = dy + 0.44 * s - breathe;
    let mut rgb: Vec<Rgb> = Vec::with_capacity((width * height) as usize);
    for py in 0..height {
        for px in 0..width {
            let (x, y) = (px as f32 + 0.5, py as f32 + 0.5);
            let t = y / height as f32;
            let mut c: Rgb = [0.16 + 0.10 * t, 0.22 + 0.12 * t, 0.34 + 0.10 * t];
            if ellipse(x, y, cx, dy + 1.08 * s - breathe * 1.5, 0.42 * s, 0.30 * s) {
                c = [0.20, 0.36, 0.62]; // shirt
            }
            if ellipse(x, y, cx, dy + 0.70 * s - breathe, 0.07 * s, 0.10 * s) {
                c = [0.93, 0.76, 0.64]; // neck
            }
            if ellipse(x, y, cx, face_cy - 0.05 * s, 0.235 * s, 0.27 * s) {
                c = [0.25, 0.16, 0.10]; // hair
            }
            // The face, shaded darker towards its edge: a face detector finds it far more surely
            // with the shading, the pupils, the nostrils and the lips (a score of 0.5 rather than
            // 0.1 to 0.3 at some places on the tests' paths).
            let (fx, fy) = ((x - cx) / (0.20 * s), (y - face_cy - 0.02 * s) / (0.25 * s));
            let d = fx * fx + fy * fy;
            if d <= 1.0 {
                let shade = 1.0 - 0.18 * d;
                c = [0.96 * shade, 0.80 * shade, 0.68 * shade]; // face
            }
            for side in [-1.0f32, 1.0] {
                let ex = cx + side * 0.08 * s;
                let ey = face_cy - 0.02 * s;
                if ellipse(x, y, ex, ey - 0.045 * s, 0.045 * s, 0.012 * s) {
                    c = [0.30, 0.20, 0.12]; // brow
                }
                let open = 0.024 * s * blink.max(0.08);
                if ellipse(x, y, ex, ey, 0.04 * s, open) {
                    c = [0.98, 0.98, 0.97];
                    if ellipse(x, y, ex, ey, 0.02 * s, open.min(0.02 * s)) {
                        c = [0.25, 0.18, 0.12]; // iris
                    }
                    if ellipse(x, y, ex, ey, 0.009 * s, open.min(0.009 * s)) {
                        c = [0.02, 0.02, 0.02]; // pupil
                    }
                }
            }
            if ellipse(x, y, cx, face_cy + 0.09 * s, 0.03 * s, 0.012 * s) {
                c = [0.70, 0.50, 0.42]; // nostrils
            }
            if ellipse(x, y, cx, face_cy + 0.07 * s, 0.018 * s, 0.03 * s) {
                c = [0.90, 0.70, 0.58]; // nose
            }
            if ellipse(x, y, cx, face_cy + 0.15 * s, 0.075 * s, 0.022 * s) {
                c = [0.78, 0.38, 0.40]; // lips
            }
            if ellipse(x, y, cx, face_cy + 0.15 * s, 0.07 * s, 0.005 * s) {
                c = [0.60, 0.25, 0.28]; // closed mouth
            }
            rgb.push(c);
        }
    }
    rgb_to_yuv420(width, height, &rgb)
}

/// BT.601 limited-range conversion with 2×2 chroma averaging.
fn rgb_to_yuv420(width: u32, height: u32, rgb: &[Rgb]) -> Yuv420 {
    let (w, h) = (width as usize, height as usize);
    let mut out = Yuv420::new(width, height);
    for (i, [r, g, b]) in rgb.iter().enumerate() {
        out.y[i] = (16.0 + 219.0 * (0.299 * r + 0.587 * g + 0.114 * b))
            .round()
            .clamp(0.0, 255.0) as u8;
    }
    for cy in 0..h / 2 {
        for cx in 0..w / 2 {
            let mut acc = [0.0f32; 3];
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let p = rgb[(2 * cy + dy) * w + 2 * cx + dx];
                for k in 0..3 {
                    acc[k] += p[k] / 4.0;
                }
            }
            let [r, g, b] = acc;
            let u = 128.0 + 224.0 * (-0.168_736 * r - 0.331_264 * g + 0.5 * b);
            let v = 128.0 + 224.0 * (0.5 * r - 0.418_688 * g - 0.081_312 * b);
            out.u[cy * w / 2 + cx] = u.round().clamp(0.0, 255.0) as u8;
            out.v[cy * w / 2 + cx] = v.round().clamp(0.0, 255.0) as u8;
        }
    }
    out
}

/// Load every avatar under `dir`, each at its own size (what `worker avatar prepare` wrote:
/// the recording's framing, or `--size`), scaled down only past what streams ([`stream_size`]).
pub fn load_dir(dir: &Path, fps: u32) -> Result<Vec<AvatarClip>, AvatarError> {
    let entries = std::fs::read_dir(dir).map_err(|source| AvatarError::Read {
        path: dir.into(),
        source,
    })?;
    let mut clips = Vec::new();
    let mut paths: Vec<PathBuf> = entries.filter_map(|e| e.ok().map(|e| e.path())).collect();
    paths.sort();
    for path in paths {
        let meta_path = path.join("avatar.toml");
        if !meta_path.is_file() {
            continue;
        }
        let id = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        clips.push(load_one(&id, &meta_path, fps)?);
    }
    if clips.is_empty() {
        return Err(AvatarError::NoneFound { dir: dir.into() });
    }
    Ok(clips)
}

fn load_one(id: &str, meta_path: &Path, fps: u32) -> Result<AvatarClip, AvatarError> {
    let text = std::fs::read_to_string(meta_path).map_err(|source| AvatarError::Read {
        path: meta_path.into(),
        source,
    })?;
    let meta: AvatarMeta = toml::from_str(&text).map_err(|e| AvatarError::Metadata {
        path: meta_path.into(),
        message: e.to_string(),
    })?;
    let dir = meta_path.parent().unwrap_or(Path::new("."));
    let video = dir.join(&meta.video);
    let max_frames = (meta.max_seconds * fps).max(1) as usize;
    let (frames, src_w, src_h) = decode_video(&video, 0, 0, max_frames, fps, Fit::Keep, &InputLimits::AVATAR_DIR)?;
    // Never empty: `decode_video` refuses a video without a picture.
    let (width, height) = frames.first().map_or((0, 0), |f| (f.width, f.height));
    let bad = |message: String| AvatarError::Metadata {
        path: meta_path.into(),
        message,
    };
    let source_boxes = match (&meta.boxes, meta.face_box) {
        (Some(file), _) => {
            let boxes = read_boxes(&dir.join(file))?;
            if boxes.len() < frames.len() {
                return Err(bad(format!(
                    "{} has {} boxes for the {} frames of {}",
                    file.display(),
                    boxes.len(),
                    frames.len(),
                    meta.video.display()
                )));
            }
            boxes.into_iter().take(frames.len()).collect()
        }
        (None, Some([x, y, w, h])) => vec![FaceBox { x, y, w, h }],
        (None, None) => return Err(bad("needs `face_box = [x, y, w, h]` or `boxes = \"boxes.tsv\"`".into())),
    };
    let sx = |v: u32| (v as u64 * width as u64 / src_w as u64) as u32;
    let sy = |v: u32| (v as u64 * height as u64 / src_h as u64) as u32;
    let mut boxes = Vec::with_capacity(source_boxes.len());
    for (i, b) in source_boxes.into_iter().enumerate() {
        if b.w == 0 || b.h == 0 || b.x + b.w > src_w || b.y + b.h > src_h {
            let which = if meta.boxes.is_some() {
                format!("box of frame {i}")
            } else {
                "face_box".into()
            };
            return Err(bad(format!(
                "{which} [{}, {}, {}, {}] lies outside the {src_w}×{src_h} video",
                b.x, b.y, b.w, b.h
            )));
        }
        boxes.push(FaceBox {
            x: sx(b.x),
            y: sy(b.y),
            w: sx(b.w).max(1),
            h: sy(b.h).max(1),
        });
    }
    Ok(AvatarClip {
        id: id.to_owned(),
        name: meta.name,
        boxes,
        frames,
        looping: meta.looping,
    })
}

/// Read a boxes file: one `frame x y w h` line per frame (further columns ignored), `#` comments.
pub fn read_boxes(path: &Path) -> Result<Vec<FaceBox>, AvatarError> {
    let text = std::fs::read_to_string(path).map_err(|source| AvatarError::Read {
        path: path.into(),
        source,
    })?;
    parse_boxes(&text).map_err(|(line, message)| AvatarError::Boxes {
        path: path.into(),
        line,
        message,
    })
}

/// [`read_boxes`] on text: the boxes, or the 1-based line and what is wrong with it.
pub fn parse_boxes(text: &str) -> Result<Vec<FaceBox>, (usize, String)> {
    let mut boxes = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let fields: Vec<&str> = line.split_whitespace().collect();
        let numbers: Option<Vec<u32>> = fields.iter().take(5).map(|f| f.parse().ok()).collect();
        match numbers.as_deref() {
            Some(&[frame, x, y, w, h]) if frame as usize == boxes.len() => boxes.push(FaceBox { x, y, w, h }),
            Some(&[frame, ..]) if fields.len() >= 5 => {
                return Err((n + 1, format!("frame {frame} where frame {} was expected", boxes.len())))
            }
            _ => return Err((n + 1, format!("expected `frame x y w h` in whole pixels, got `{line}`"))),
        }
    }
    if boxes.is_empty() {
        return Err((0, "no boxes".into()));
    }
    Ok(boxes)
}

/// How a video of another shape than the output is made to fit it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fit {
    /// Scale each side on its own (the picture may look squeezed).
    Stretch,
    /// Scale to cover the output and cut the overflow evenly from both sides.
    Cover,
    /// Keep the video's own framing: its size, scaled down (never up) to what streams
    /// ([`stream_size`]). The requested output size is not used.
    Keep,
}

/// The largest picture streamed, in 16×16 macroblocks: H.264 level 3.1, which the answer
/// offers (`profile-level-id=42e01f`) and every browser decodes: 1280×720, 720×1280, or 960×960.
pub const MAX_STREAM_MACROBLOCKS: u32 = 3600;

/// The longest side streamed, in pixels: level 3.1's limit, √(8 × 3600) macroblocks.
pub const MAX_STREAM_SIDE: u32 = 2704;

/// The size a `src_w`×`src_h` video streams at: its own, with even sides, scaled down with its
/// aspect kept until it fits [`MAX_STREAM_MACROBLOCKS`] and [`MAX_STREAM_SIDE`] (1920×1080
/// becomes 1280×720).
pub fn stream_size(src_w: u32, src_h: u32) -> (u32, u32) {
    let macroblocks = |w: u32, h: u32| u64::from(w.div_ceil(16)) * u64::from(h.div_ceil(16));
    let even = |v: f64| ((v.floor() as u32) & !1).max(2);
    let (w, h) = (f64::from(src_w.max(2)), f64::from(src_h.max(2)));
    let limit = f64::from(MAX_STREAM_MACROBLOCKS) * 256.0;
    let side = f64::from(MAX_STREAM_SIDE);
    let mut k = (limit / (w * h)).sqrt().min(side / w).min(side / h).min(1.0);
    loop {
        let size = (even(w * k), even(h * k));
        // Rounding up to whole macroblocks can overshoot by a row or a column: shrink a little.
        if macroblocks(size.0, size.1) <= u64::from(MAX_STREAM_MACROBLOCKS) || size.0.min(size.1) <= 16 {
            return size;
        }
        k *= 0.995;
    }
}

/// The containers `worker avatar prepare` reads, as FFmpeg's demuxers name themselves (the
/// `format_whitelist` syntax): MP4/MOV and its family, Matroska and WebM.
pub const RECORDING_FORMATS: &str = "mov,mp4,m4a,3gp,3g2,mj2,matroska,webm";

/// The largest picture read by default, in pixels: 4096×4096 (about 25 MB a decoded frame).
pub const DEFAULT_MAX_INPUT_PIXELS: u64 = 4096 * 4096;

/// What [`decode_video`] reads. Whatever the limits, only local files are opened: FFmpeg's
/// `protocol_whitelist` is `file`, for the file and anything it names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct InputLimits {
    /// The containers accepted ([`RECORDING_FORMATS`]), comma-separated; `None`: any FFmpeg reads.
    /// A recording from someone else gets the list: FFmpeg knows containers that open other
    /// files (an HLS playlist named `.mp4` pulls in any local video it lists).
    pub formats: Option<&'static str>,
    /// The largest picture, width × height. The decoder is held to it too (`max_pixels`), so a
    /// larger picture partway through is refused rather than allocated.
    pub max_pixels: u64,
}

impl InputLimits {
    /// An operator's avatar directory: any container FFmpeg reads, pictures up to the default.
    pub const AVATAR_DIR: Self = Self {
        formats: None,
        max_pixels: DEFAULT_MAX_INPUT_PIXELS,
    };

    /// A recording for `worker avatar prepare`: [`RECORDING_FORMATS`] only.
    pub fn recording(max_pixels: u64) -> Self {
        Self {
            formats: Some(RECORDING_FORMATS),
            max_pixels,
        }
    }
}

/// The container a file's first bytes announce: `Some("MP4/MOV")` for an ISO media file (a box
/// type at offset 4 that such files begin with), `Some("Matroska/WebM")` for an EBML header;
/// `None` for anything else.
pub fn sniff_container(head: &[u8]) -> Option<&'static str> {
    const ISO_BOXES: [&[u8; 4]; 7] = [b"ftyp", b"moov", b"mdat", b"free", b"skip", b"wide", b"pnot"];
    if head.starts_with(&[0x1a, 0x45, 0xdf, 0xa3]) {
        return Some("Matroska/WebM");
    }
    match head.get(4..8) {
        Some(kind) if ISO_BOXES.iter().any(|b| b.as_slice() == kind) => Some("MP4/MOV"),
        _ => None,
    }
}

/// What a file that is not a recording starts with, for the error: its first line if it is
/// text (an HLS playlist says `#EXTM3U`), else its first bytes in hex.
fn describe_head(head: &[u8]) -> String {
    let line = head.split(|b| *b == b'\n').next().unwrap_or_default();
    match std::str::from_utf8(line) {
        Ok(text) if !text.trim().is_empty() && text.chars().all(|c| !c.is_control() || c == '\r') => {
            format!("it begins {:?}", text.trim().chars().take(40).collect::<String>())
        }
        _ if head.is_empty() => "it is empty".into(),
        _ => format!("it begins with the bytes {}", hex::encode(&head[..head.len().min(8)])),
    }
}

/// Whether FFmpeg's demuxer name `name` (itself a list, e.g. `mov,mp4,m4a`) is in `allowed`.
fn format_allowed(name: &str, allowed: &str) -> bool {
    name.split(',').any(|n| allowed.split(',').any(|a| a == n))
}

/// Whether FFmpeg's scaler can take pictures of `format` at `width`×`height` within `max_pixels`.
pub(crate) fn check_picture(
    path: &Path,
    format: ffmpeg_next::format::Pixel,
    width: u32,
    height: u32,
    max_pixels: u64,
) -> Result<(), AvatarError> {
    if width == 0 || height == 0 {
        return Err(AvatarError::Empty { path: path.into() });
    }
    if u64::from(width) * u64::from(height) > max_pixels {
        return Err(AvatarError::TooLarge {
            path: path.into(),
            width,
            height,
            max_pixels,
        });
    }
    // swscale asserts (aborting the process) on a format without a descriptor, such as none.
    if format.descriptor().is_none() || !ffmpeg_next::software::scaling::support::input(format) {
        return Err(AvatarError::PixelFormat {
            path: path.into(),
            format: format!("{format:?}"),
        });
    }
    Ok(())
}

/// Open `path` for reading within `limits`: the container checked by its first bytes before
/// FFmpeg sees it, FFmpeg held to the same list (`format_whitelist`, checked before the
/// demuxer reads anything) and to local files (`protocol_whitelist`), and the probed demuxer
/// checked again after.
fn open_input(path: &Path, limits: &InputLimits) -> Result<ffmpeg_next::format::context::Input, AvatarError> {
    let err = |source| AvatarError::Decode {
        path: path.into(),
        source,
    };
    let mut options = ffmpeg_next::Dictionary::new();
    options.set("protocol_whitelist", "file");
    if let Some(allowed) = limits.formats {
        let mut head = Vec::with_capacity(16);
        std::fs::File::open(path)
            .and_then(|f| std::io::Read::read_to_end(&mut std::io::Read::take(f, 16), &mut head))
            .map_err(|source| AvatarError::Read {
                path: path.into(),
                source,
            })?;
        if sniff_container(&head).is_none() {
            return Err(AvatarError::Container {
                path: path.into(),
                found: describe_head(&head),
            });
        }
        options.set("format_whitelist", allowed);
    }
    let input = ffmpeg_next::format::input_with_dictionary(path, options).map_err(err)?;
    if let Some(allowed) = limits.formats {
        let name = input.format().name().to_owned();
        if !format_allowed(&name, allowed) {
            return Err(AvatarError::Container {
                path: path.into(),
                found: format!("FFmpeg reads it as {name}"),
            });
        }
    }
    Ok(input)
}

/// Decode up to `max_frames` frames of `path` at `fps` (frames dropped or repeated by their
/// timestamps), scaled to `width`×`height` YUV 4:2:0 as `fit` says (with [`Fit::Keep`], to the
/// video's own [`stream_size`]), reading only what `limits` allow. Also returns the source size.
pub(crate) fn decode_video(
    path: &Path,
    width: u32,
    height: u32,
    max_frames: usize,
    fps: u32,
    fit: Fit,
    limits: &InputLimits,
) -> Result<(Vec<Yuv420>, u32, u32), AvatarError> {
    use ffmpeg_next::{codec, format, media, software::scaling, util::frame::video::Video};
    let err = |source| AvatarError::Decode {
        path: path.into(),
        source,
    };
    let mut input = open_input(path, limits)?;
    let stream = input
        .streams()
        .best(media::Type::Video)
        .ok_or_else(|| AvatarError::NoVideo { path: path.into() })?;
    let index = stream.index();
    let time_base = f64::from(stream.time_base());
    // A phone records an upright video sideways and says so in the file (a display matrix):
    // show it as a player does. Sizes below are of the picture as shown.
    let orientation = orientation(&stream);
    // The stream's size and pixel format, from a decoder opened only to read them: one opened
    // with `max_pixels` would quietly forget a larger size instead of refusing it.
    let (src_w, src_h, src_format) = {
        let probe = codec::context::Context::from_parameters(stream.parameters())
            .map_err(err)?
            .decoder()
            .video()
            .map_err(err)?;
        (probe.width(), probe.height(), probe.format())
    };
    check_picture(path, src_format, src_w, src_h, limits.max_pixels)?;
    let ctx = codec::context::Context::from_parameters(stream.parameters()).map_err(err)?;
    let codec = codec::decoder::find(ctx.id()).ok_or_else(|| err(ffmpeg_next::Error::DecoderNotFound))?;
    let mut options = ffmpeg_next::Dictionary::new();
    options.set("max_pixels", &limits.max_pixels.min(i32::MAX as u64).to_string());
    let mut decoder = ctx
        .decoder()
        .open_as_with(codec, options)
        .and_then(|d| d.video())
        .map_err(err)?;
    if (decoder.width(), decoder.height(), decoder.format()) != (src_w, src_h, src_format) {
        return Err(AvatarError::Changed { path: path.into() });
    }
    let sideways = orientation.sideways();
    let (shown_w, shown_h) = if sideways { (src_h, src_w) } else { (src_w, src_h) };
    let (width, height) = match fit {
        Fit::Keep => stream_size(shown_w, shown_h),
        Fit::Stretch | Fit::Cover => (width, height),
    };
    let (scaled_w, scaled_h) = match fit {
        Fit::Stretch | Fit::Keep => (width, height),
        Fit::Cover => {
            let k = (f64::from(width) / f64::from(shown_w)).max(f64::from(height) / f64::from(shown_h));
            let even = |v: f64, min: u32| ((v.ceil() as u32).div_ceil(2) * 2).max(min);
            (
                even(f64::from(shown_w) * k, width),
                even(f64::from(shown_h) * k, height),
            )
        }
    };
    let (x0, y0) = ((scaled_w - width) / 4 * 2, (scaled_h - height) / 4 * 2);
    // The scaler works on the picture as stored; the part shown is cut from it, then turned.
    let (stored_w, stored_h) = if sideways {
        (scaled_h, scaled_w)
    } else {
        (scaled_w, scaled_h)
    };
    let mut scaler = scaling::Context::get(
        src_format,
        src_w,
        src_h,
        format::Pixel::YUV420P,
        stored_w,
        stored_h,
        scaling::Flags::BICUBIC,
    )
    .map_err(err)?;
    let mut frames = Vec::new();
    let mut decoded = Video::empty();
    // The latest decoded picture: output frame k (at k / fps seconds) shows the last picture
    // whose timestamp is not after k / fps.
    let mut latest: Option<Yuv420> = None;
    let mut start: Option<f64> = None;
    let mut take = |decoder: &mut ffmpeg_next::decoder::Video, frames: &mut Vec<Yuv420>| -> Result<(), AvatarError> {
        while frames.len() < max_frames && decoder.receive_frame(&mut decoded).is_ok() {
            let mut scaled = Video::empty();
            scaler.run(&decoded, &mut scaled).map_err(|e| match e {
                ffmpeg_next::Error::InputChanged => AvatarError::Changed { path: path.into() },
                other => err(other),
            })?;
            let picture = if orientation == Orientation::default() {
                copy_region(&scaled, x0, y0, width, height)
            } else {
                let (x, y, w, h) = orientation.stored_rect((x0, y0, width, height), (stored_w, stored_h));
                copy_region(&scaled, x, y, w, h).oriented(orientation)
            };
            let Some(t) = decoded.timestamp().map(|ts| ts as f64 * time_base) else {
                frames.push(picture); // no timestamps: every picture, in order
                continue;
            };
            // The first picture starts the clip, whatever its timestamp.
            let t = t - *start.get_or_insert(t);
            if let Some(previous) = &latest {
                while frames.len() < max_frames && (frames.len() as f64) / f64::from(fps) < t - 1e-6 {
                    frames.push(previous.clone());
                }
            }
            latest = Some(picture);
        }
        Ok(())
    };
    for (s, packet) in input.packets() {
        if frames.len() >= max_frames {
            break;
        }
        if s.index() == index {
            decoder.send_packet(&packet).map_err(err)?;
            take(&mut decoder, &mut frames)?;
        }
    }
    decoder.send_eof().map_err(err)?;
    take(&mut decoder, &mut frames)?;
    if let Some(last) = latest {
        if frames.len() < max_frames {
            frames.push(last);
        }
    }
    if frames.is_empty() {
        return Err(AvatarError::Empty { path: path.into() });
    }
    Ok((frames, shown_w, shown_h))
}

/// How a player shows `stream`'s pictures: its display matrix, upright when it has none.
fn orientation(stream: &ffmpeg_next::format::stream::Stream) -> Orientation {
    use ffmpeg_next::codec::packet::side_data::Type;
    stream
        .side_data()
        .find(|d| d.kind() == Type::DisplayMatrix)
        .and_then(|d| Orientation::from_display_matrix(d.data()))
        .unwrap_or_default()
}

/// The `width`×`height` picture at (`x0`, `y0`) (both even) of a YUV 4:2:0 FFmpeg frame.
pub(crate) fn copy_region(
    frame: &ffmpeg_next::util::frame::video::Video,
    x0: u32,
    y0: u32,
    width: u32,
    height: u32,
) -> Yuv420 {
    let mut out = Yuv420::new(width, height);
    let (w, h, x0, y0) = (width as usize, height as usize, x0 as usize, y0 as usize);
    for (plane, dst, pw, ph, dx, dy) in [
        (0, &mut out.y, w, h, x0, y0),
        (1, &mut out.u, w / 2, h / 2, x0 / 2, y0 / 2),
        (2, &mut out.v, w / 2, h / 2, x0 / 2, y0 / 2),
    ] {
        let stride = frame.stride(plane);
        let src = frame.data(plane);
        for row in 0..ph {
            let at = (row + dy) * stride + dx;
            dst[row * pw..(row + 1) * pw].copy_from_slice(&src[at..at + pw]);
        }
    }
    out
}

/// The whole of a `width`×`height` YUV 4:2:0 FFmpeg frame.
pub(crate) fn copy_planes(frame: &ffmpeg_next::util::frame::video::Video, width: u32, height: u32) -> Yuv420 {
    copy_region(frame, 0, 0, width, height)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A `w`×`h` picture whose luma is its pixel's index (mod 256), chroma likewise.
    fn numbered(w: u32, h: u32) -> Yuv420 {
        let mut p = Yuv420::new(w, h);
        p.y.iter_mut().enumerate().for_each(|(i, v)| *v = i as u8);
        p.u.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = 100u8.wrapping_add(i as u8));
        p.v.iter_mut()
            .enumerate()
            .for_each(|(i, v)| *v = 200u8.wrapping_add(i as u8));
        p
    }

    /// The `w`×`h` part at (`x`, `y`), as a plain copy (what `stored_rect` must agree with).
    fn cut(p: &Yuv420, (x, y, w, h): (u32, u32, u32, u32)) -> Yuv420 {
        let mut out = Yuv420::new(w, h);
        for (src, dst, sw, div) in [
            (&p.y, &mut out.y, p.width, 1),
            (&p.u, &mut out.u, p.width / 2, 2),
            (&p.v, &mut out.v, p.width / 2, 2),
        ] {
            let (pw, ph, px, py) = (
                (w / div) as usize,
                (h / div) as usize,
                (x / div) as usize,
                (y / div) as usize,
            );
            for row in 0..ph {
                let at = (row + py) * sw as usize + px;
                dst[row * pw..(row + 1) * pw].copy_from_slice(&src[at..at + pw]);
            }
        }
        out
    }

    fn planes(p: &Yuv420) -> (u32, u32, &[u8], &[u8], &[u8]) {
        (p.width, p.height, &p.y, &p.u, &p.v)
    }

    #[test]
    fn a_picture_turns_clockwise_and_mirrors() {
        let turn = |k| Orientation {
            mirror: false,
            quarter_turns: k,
        };
        let p = numbered(4, 2); // luma rows [0 1 2 3] [4 5 6 7]
        let q = p.oriented(turn(1));
        assert_eq!((q.width, q.height), (2, 4));
        // Clockwise: the left column, read upwards, becomes the top row.
        assert_eq!(q.y, [4, 0, 5, 1, 6, 2, 7, 3]);
        assert_eq!(q.u, [100, 101], "chroma turns with it");
        assert_eq!(p.oriented(turn(2)).y, [7, 6, 5, 4, 3, 2, 1, 0]);
        assert_eq!(p.oriented(turn(3)).y, [3, 7, 2, 6, 1, 5, 0, 4]);
        let mirrored = p.oriented(Orientation {
            mirror: true,
            quarter_turns: 0,
        });
        assert_eq!(mirrored.y, [3, 2, 1, 0, 7, 6, 5, 4]);
        let back = (0..4).fold(p.clone(), |q, _| q.oriented(turn(1)));
        assert_eq!(planes(&back), planes(&p));
    }

    #[test]
    fn the_part_shown_is_cut_from_the_stored_picture_where_it_lies() {
        // Cutting first and turning the small part gives what turning the whole and cutting gives.
        let stored = numbered(12, 8);
        for mirror in [false, true] {
            for quarter_turns in 0..4 {
                let o = Orientation { mirror, quarter_turns };
                let shown = stored.oriented(o);
                for rect in [(0, 0, 4, 2), (2, 4, 6, 4), (shown.width - 4, shown.height - 2, 4, 2)] {
                    let from_stored = cut(&stored, o.stored_rect(rect, (12, 8))).oriented(o);
                    assert_eq!(planes(&from_stored), planes(&cut(&shown, rect)), "{o:?} {rect:?}");
                }
            }
        }
    }

    /// A display matrix as FFmpeg hands it over: a, b, u, c, d, v, x, y, w, native-endian.
    fn matrix(a: i32, b: i32, c: i32, d: i32) -> Vec<u8> {
        [a, b, 0, c, d, 0, 0, 0, 1 << 30]
            .iter()
            .flat_map(|v| v.to_ne_bytes())
            .collect()
    }

    #[test]
    fn the_display_matrix_says_how_far_to_turn_and_whether_to_mirror() {
        const ONE: i32 = 1 << 16;
        let o = |m: &[u8]| Orientation::from_display_matrix(m).map(|o| (o.mirror, o.quarter_turns));
        assert_eq!(o(&matrix(ONE, 0, 0, ONE)), Some((false, 0)));
        // What a phone held upright writes ("rotation of -90 degrees" in ffprobe).
        assert_eq!(o(&matrix(0, ONE, -ONE, 0)), Some((false, 1)));
        assert_eq!(o(&matrix(-ONE, 0, 0, -ONE)), Some((false, 2)));
        assert_eq!(o(&matrix(0, -ONE, ONE, 0)), Some((false, 3)));
        // A mirror is not half a turn.
        assert_eq!(o(&matrix(-ONE, 0, 0, ONE)), Some((true, 0)));
        assert_eq!(o(&matrix(ONE, 0, 0, -ONE)), Some((true, 2)), "upside down, mirrored");
        assert_eq!(o(&matrix(0, 0, 0, 0)), None, "no linear part");
        assert_eq!(o(&[0; 35]), None, "not nine numbers");
    }

    /// Set the rotation of the first track of an MP4 file in its track header, as a phone does:
    /// the matrix sits 40 bytes after `tkhd` in a version-0 header, big-endian.
    fn rotate_mp4_track(path: &Path, matrix: [i32; 9]) {
        let mut bytes = std::fs::read(path).expect("read");
        let at = bytes.windows(4).position(|w| w == b"tkhd").expect("tkhd") + 4;
        assert_eq!(bytes[at], 0, "a version-0 track header");
        for (i, v) in matrix.iter().enumerate() {
            bytes[at + 40 + 4 * i..at + 44 + 4 * i].copy_from_slice(&v.to_be_bytes());
        }
        std::fs::write(path, bytes).expect("write");
    }

    #[test]
    fn a_phone_recording_stored_sideways_is_read_upright() {
        crate::media::encoder::init().expect("ffmpeg");
        let dir = tempfile::tempdir().expect("tempdir");
        let path = dir.path().join("phone.mp4");
        // Stored 320×180, its top-left corner white: upright, that corner is the top right. A
        // grey band down the stored picture (x 100–140) is a band across the upright one.
        let mut mp4 = crate::media::file::Mp4Writer::create(&path, 320, 180, 25).expect("mp4");
        let mut stored = Yuv420::new(320, 180);
        for y in 0..180 {
            stored.y[y * 320 + 100..y * 320 + 140].fill(160);
            if y < 40 {
                stored.y[y * 320..y * 320 + 40].fill(235);
            }
        }
        for _ in 0..5 {
            mp4.write(&stored).expect("frame");
        }
        mp4.finish().expect("finish");
        let limits = InputLimits::recording(DEFAULT_MAX_INPUT_PIXELS);
        let luma_at = |p: &Yuv420, x: u32, y: u32| p.y[(y * p.width + x) as usize];

        let (frames, w, h) = decode_video(&path, 0, 0, 5, 25, Fit::Keep, &limits).expect("decode");
        assert_eq!(
            (w, h, frames[0].width, frames[0].height),
            (320, 180, 320, 180),
            "no matrix: as stored"
        );

        const ONE: i32 = 1 << 16;
        rotate_mp4_track(&path, [0, ONE, 0, -ONE, 0, 0, 0, 0, 1 << 30]);
        let (frames, w, h) = decode_video(&path, 0, 0, 5, 25, Fit::Keep, &limits).expect("decode");
        let f = &frames[0];
        assert_eq!((w, h, f.width, f.height), (180, 320, 180, 320), "upright");
        assert!(luma_at(f, 160, 20) > 200, "the white corner is at the top right");
        assert!(luma_at(f, 20, 20) < 60 && luma_at(f, 160, 300) < 60);
        assert!((140..180).contains(&luma_at(f, 90, 120)), "the band lies across");
        // Covering 90×90 scales the upright picture to 90×160 and keeps its middle (rows 34–124):
        // the band (rows 50–70 once scaled) in it, the corner not.
        let (frames, _, _) = decode_video(&path, 90, 90, 5, 25, Fit::Cover, &limits).expect("decode");
        let f = &frames[0];
        assert_eq!((f.width, f.height), (90, 90));
        assert!((140..180).contains(&luma_at(f, 45, 26)), "the band, where it shows");
        assert!(
            luma_at(f, 80, 2) < 60 && luma_at(f, 45, 80) < 60,
            "above and below it, dark"
        );

        // A mirrored track: the same size, the corner on the other side.
        rotate_mp4_track(&path, [-ONE, 0, 0, 0, ONE, 0, 0, 0, 1 << 30]);
        let (frames, _, _) = decode_video(&path, 0, 0, 5, 25, Fit::Keep, &limits).expect("decode");
        let f = &frames[0];
        assert_eq!((f.width, f.height), (320, 180));
        assert!(
            luma_at(f, 300, 20) > 200 && luma_at(f, 20, 20) < 60,
            "mirrored, not turned"
        );
    }

    /// A clip whose picture `k` has luma `10 k`: the luma says which frame is shown.
    fn ramp(n: usize, looping: Looping) -> AvatarClip {
        let frames = (0..n)
            .map(|k| {
                let mut f = Yuv420::new(16, 16);
                f.y.fill(10 * k as u8);
                f
            })
            .collect();
        AvatarClip {
            id: "ramp".into(),
            name: "ramp".into(),
            boxes: vec![FaceBox { x: 0, y: 0, w: 8, h: 8 }],
            frames,
            looping,
        }
    }

    /// The largest luma step between consecutive idle pictures over three loops.
    fn largest_step(clip: &AvatarClip) -> u8 {
        (0..3 * 2 * clip.frames.len())
            .map(|i| clip.frame(i).y[0].abs_diff(clip.frame(i + 1).y[0]))
            .max()
            .unwrap_or(0)
    }

    #[test]
    fn a_pingpong_loop_never_jumps_and_a_forward_one_jumps_at_its_seam() {
        let forward = ramp(6, Looping::Forward);
        assert_eq!(largest_step(&forward), 50, "the last frame back to the first");
        let pingpong = ramp(6, Looping::Pingpong);
        assert_eq!(largest_step(&pingpong), 10, "one frame's motion, the seams included");
        let shown: Vec<usize> = (0..12).map(|i| pingpong.frame_index(i)).collect();
        assert_eq!(shown, [0, 1, 2, 3, 4, 5, 4, 3, 2, 1, 0, 1]);
        // Too short to turn around: it just repeats.
        assert_eq!(ramp(2, Looping::Pingpong).frame_index(3), 1);
        assert_eq!(ramp(1, Looping::Pingpong).frame_index(7), 0);
    }

    #[test]
    fn a_boxes_file_gives_each_frame_its_box_and_bad_lines_are_named() {
        let text = "# comment\n0\t10\t20\t100\t120\tdetected\n\n1 12 20 100 120\n2 14 21 101 119 interpolated\n";
        let boxes = parse_boxes(text).expect("valid");
        assert_eq!(boxes.len(), 3);
        assert_eq!(
            boxes[2],
            FaceBox {
                x: 14,
                y: 21,
                w: 101,
                h: 119
            }
        );
        let mut clip = ramp(3, Looping::Pingpong);
        clip.boxes = boxes;
        // The box follows the picture shown, through the ping-pong turn.
        let xs: Vec<u32> = (0..6).map(|i| clip.face_box(i).x).collect();
        assert_eq!(xs, [10, 12, 14, 12, 10, 12]);
        for (bad, line, says) in [
            ("0 1 2 3\n", 1, "expected"),
            ("0 1 2 3 4\n2 1 2 3 4\n", 2, "frame 2 where frame 1"),
            ("0 1 2 -3 4\n", 1, "whole pixels"),
            ("# nothing\n", 0, "no boxes"),
        ] {
            let (l, message) = parse_boxes(bad).expect_err(bad);
            assert_eq!(l, line, "{bad}");
            assert!(message.contains(says), "{bad}: {message}");
        }
    }

    #[test]
    fn a_recording_streams_at_its_own_framing_scaled_down_only_past_level_3_1() {
        assert_eq!(stream_size(1280, 720), (1280, 720));
        assert_eq!(stream_size(720, 1280), (720, 1280));
        assert_eq!(stream_size(512, 512), (512, 512));
        assert_eq!(stream_size(1920, 1080), (1280, 720));
        assert_eq!(stream_size(1080, 1920), (720, 1280));
        assert_eq!(stream_size(641, 481), (640, 480), "even sides");
        assert_eq!(stream_size(2000, 300), (2000, 300), "within the limits");
        assert_eq!(stream_size(4000, 200), (2704, 134), "no side over level 3.1's");
        for (w, h) in [(4096, 4096), (3840, 2160), (1000, 999), (1282, 722)] {
            let (sw, sh) = stream_size(w, h);
            let mbs = sw.div_ceil(16) * sh.div_ceil(16);
            assert!(
                mbs <= MAX_STREAM_MACROBLOCKS && mbs > 3400,
                "{w}×{h} -> {sw}×{sh}: {mbs}"
            );
            assert!(sw % 2 == 0 && sh % 2 == 0);
            let (a, b) = (f64::from(w) / f64::from(h), f64::from(sw) / f64::from(sh));
            assert!((a / b - 1.0).abs() < 0.01, "aspect kept: {w}×{h} -> {sw}×{sh}");
        }
    }

    #[test]
    fn avatar_toml_names_its_loop() {
        let meta = |extra: &str| {
            toml::from_str::<AvatarMeta>(&format!(
                "name = \"T\"\nvideo = \"idle.mp4\"\nface_box = [1, 2, 3, 4]\n{extra}"
            ))
        };
        assert_eq!(meta("").expect("default").looping, Looping::Forward);
        assert_eq!(
            meta("loop = \"pingpong\"").expect("pingpong").looping,
            Looping::Pingpong
        );
        let err = meta("loop = \"shuffle\"").expect_err("unknown");
        assert!(err.to_string().contains("pingpong"), "{err}");
    }

    #[test]
    fn synthetic_avatar_blinks_and_breathes() {
        let clip = synthetic(128, 128, 25);
        assert_eq!(clip.frames.len(), 100);
        let f0 = &clip.frames[0];
        assert_eq!(
            (f0.width, f0.height, f0.y.len(), f0.u.len()),
            (128, 128, 128 * 128, 64 * 64)
        );
        // Frames differ over the loop (breathing), and the eye whites vanish in the blink.
        assert_ne!(clip.frames[0].y, clip.frames[25].y);
        let whites = |f: &Yuv420| f.y.iter().filter(|&&v| v > 225).count();
        assert!(whites(&clip.frames[0]) > 20, "eyes open: {}", whites(&clip.frames[0]));
        assert!(
            whites(&clip.frames[55]) * 4 < whites(&clip.frames[0]),
            "eyes closed at 55 %"
        );
        let fb = clip.face_box(0);
        assert!(fb.x + fb.w <= 128 && fb.y + fb.h <= 128);
    }
}
