//! Between the avatar's frames and the lip-sync model: crop the face box to the model's 96×96 BGR
//! input, and paste the model's output back with a feathered edge.
//!
//! Frames are YUV 4:2:0 (what the encoder takes), the model speaks BGR in [0, 1], planar, as
//! Wav2Lip was trained on OpenCV images. The crop is the face box padded 10 px at the bottom (as
//! Wav2Lip's `pads = [0, 10, 0, 0]`), sampled bilinearly; the paste blends the model's face into
//! the frame with an alpha that is 0 over the model's outermost pixel ring (zero-padded
//! convolutions darken it) and then rises smoothly to 1 over `feather` pixels, so no seam shows
//! where the generated face meets the idle frame.
//!
//! Only the lower part of the face comes from the model ([`MODEL_FROM`] down, fully from
//! [`MODEL_FULL`]): Wav2Lip redraws the lower half of its input and only copies the upper half,
//! at 96×96. Above, the frame keeps the recording's own pixels, so on a large face (280 px in a
//! 1280×720 picture: a 2.9× upscale) the eyes stay as sharp as the recording.

use crate::media::avatar::{FaceBox, Yuv420};

/// The model's face size.
pub const SIZE: usize = 96;
/// Floats in one face: 3 planes of 96×96, B, G, R.
pub const FACE_LEN: usize = 3 * SIZE * SIZE;
/// Pixels added below the face box before cropping (Wav2Lip's default pad).
pub const BOTTOM_PAD: u32 = 10;
/// Where, as a fraction of the crop's height from its top, the model's face starts to be blended
/// in, and from where it is blended in whole (the mouth sits from about 0.57 down).
pub const MODEL_FROM: f32 = 0.40;
pub const MODEL_FULL: f32 = 0.53;

/// One 96×96 BGR face, planar, values in [0, 1].
pub type Face = Vec<f32>;

/// The region actually cropped for `face_box` in a `width`×`height` frame.
pub fn crop_region(face_box: FaceBox, width: u32, height: u32) -> FaceBox {
    let x = face_box.x.min(width.saturating_sub(2));
    let y = face_box.y.min(height.saturating_sub(2));
    FaceBox {
        x,
        y,
        w: face_box.w.clamp(2, width - x),
        h: (face_box.h + BOTTOM_PAD).clamp(2, height - y),
    }
}

pub(crate) fn yuv_to_rgb(y: f32, u: f32, v: f32) -> [f32; 3] {
    let c = 1.164 * (y - 16.0);
    let (d, e) = (u - 128.0, v - 128.0);
    [
        ((c + 1.596 * e) / 255.0).clamp(0.0, 1.0),
        ((c - 0.392 * d - 0.813 * e) / 255.0).clamp(0.0, 1.0),
        ((c + 2.017 * d) / 255.0).clamp(0.0, 1.0),
    ]
}

fn rgb_to_yuv([r, g, b]: [f32; 3]) -> [f32; 3] {
    [
        16.0 + 219.0 * (0.299 * r + 0.587 * g + 0.114 * b),
        128.0 + 224.0 * (-0.168_736 * r - 0.331_264 * g + 0.5 * b),
        128.0 + 224.0 * (0.5 * r - 0.418_688 * g - 0.081_312 * b),
    ]
}

/// Bilinear sample of a `w`×`h` plane at (x, y) in pixel-centre coordinates.
fn sample(plane: &[u8], w: usize, h: usize, x: f32, y: f32) -> f32 {
    let x = (x - 0.5).clamp(0.0, (w - 1) as f32);
    let y = (y - 0.5).clamp(0.0, (h - 1) as f32);
    let (x0, y0) = (x as usize, y as usize);
    let (x1, y1) = ((x0 + 1).min(w - 1), (y0 + 1).min(h - 1));
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let p = |xx: usize, yy: usize| plane[yy * w + xx] as f32;
    let top = p(x0, y0) * (1.0 - fx) + p(x1, y0) * fx;
    let bottom = p(x0, y1) * (1.0 - fx) + p(x1, y1) * fx;
    top * (1.0 - fy) + bottom * fy
}

/// Crop `region` of `frame` to a 96×96 BGR face.
pub fn crop(frame: &Yuv420, region: FaceBox) -> Face {
    let (w, h) = (frame.width as usize, frame.height as usize);
    let mut face = vec![0.0f32; FACE_LEN];
    let (sx, sy) = (region.w as f32 / SIZE as f32, region.h as f32 / SIZE as f32);
    for row in 0..SIZE {
        for col in 0..SIZE {
            let fx = region.x as f32 + (col as f32 + 0.5) * sx;
            let fy = region.y as f32 + (row as f32 + 0.5) * sy;
            let y = sample(&frame.y, w, h, fx, fy);
            let u = sample(&frame.u, w / 2, h / 2, fx / 2.0, fy / 2.0);
            let v = sample(&frame.v, w / 2, h / 2, fx / 2.0, fy / 2.0);
            let [r, g, b] = yuv_to_rgb(y, u, v);
            let i = row * SIZE + col;
            face[i] = b;
            face[SIZE * SIZE + i] = g;
            face[2 * SIZE * SIZE + i] = r;
        }
    }
    face
}

/// Bilinear sample of the face at (x, y) in face pixel-centre coordinates → RGB.
fn face_rgb(face: &[f32], x: f32, y: f32) -> [f32; 3] {
    let x = (x - 0.5).clamp(0.0, (SIZE - 1) as f32);
    let y = (y - 0.5).clamp(0.0, (SIZE - 1) as f32);
    let (x0, y0) = (x as usize, y as usize);
    let (x1, y1) = ((x0 + 1).min(SIZE - 1), (y0 + 1).min(SIZE - 1));
    let (fx, fy) = (x - x0 as f32, y - y0 as f32);
    let mut bgr = [0.0f32; 3];
    for (c, out) in bgr.iter_mut().enumerate() {
        let p = |xx: usize, yy: usize| face[c * SIZE * SIZE + yy * SIZE + xx];
        let top = p(x0, y0) * (1.0 - fx) + p(x1, y0) * fx;
        let bottom = p(x0, y1) * (1.0 - fx) + p(x1, y1) * fx;
        *out = top * (1.0 - fy) + bottom * fy;
    }
    [bgr[2], bgr[1], bgr[0]]
}

/// Paste `face` (the model's output) into `region` of `frame`, feathered over `feather` pixels.
pub fn paste(frame: &mut Yuv420, region: FaceBox, face: &[f32], feather: u32) {
    if face.len() != FACE_LEN {
        return;
    }
    let w = frame.width as usize;
    let (sx, sy) = (SIZE as f32 / region.w as f32, SIZE as f32 / region.h as f32);
    let feather = feather.max(1) as f32;
    // Frame pixels per model pixel, across each edge: the model's outermost ring of pixels is
    // not pasted at all. Convolutions with zero padding (Wav2Lip's, and the test model's) darken
    // it, and even a few percent of it showed as a 1-pixel outline around the box.
    let (ring_x, ring_y) = (1.0 / sx, 1.0 / sy);
    let alpha = |px: u32, py: u32| {
        let dx = (px - region.x).min(region.x + region.w - 1 - px) as f32 + 0.5 - ring_x;
        let dy = (py - region.y).min(region.y + region.h - 1 - py) as f32 + 0.5 - ring_y;
        let t = (dx.min(dy) / feather).clamp(0.0, 1.0);
        // The lower part only: 0 above MODEL_FROM, rising to 1 at MODEL_FULL.
        let v = ((py - region.y) as f32 + 0.5) / region.h as f32;
        let lower = ((v - MODEL_FROM) / (MODEL_FULL - MODEL_FROM)).clamp(0.0, 1.0);
        // Smoothstep: no kink where a blend starts or ends, so no line at either.
        let smooth = |t: f32| t * t * (3.0 - 2.0 * t);
        smooth(t) * smooth(lower)
    };
    let at = |px: u32, py: u32| {
        face_rgb(
            face,
            (px - region.x) as f32 * sx + 0.5 * sx,
            (py - region.y) as f32 * sy + 0.5 * sy,
        )
    };
    for py in region.y..region.y + region.h {
        for px in region.x..region.x + region.w {
            let a = alpha(px, py);
            let [y, _, _] = rgb_to_yuv(at(px, py));
            let i = py as usize * w + px as usize;
            frame.y[i] = (frame.y[i] as f32 * (1.0 - a) + y * a).round().clamp(0.0, 255.0) as u8;
        }
    }
    // Chroma: one sample per 2×2 block, blended with the block's alpha.
    let (cx0, cy0) = (region.x.div_ceil(2), region.y.div_ceil(2));
    let (cx1, cy1) = ((region.x + region.w) / 2, (region.y + region.h) / 2);
    for cy in cy0..cy1 {
        for cx in cx0..cx1 {
            let (px, py) = (2 * cx, 2 * cy);
            let a = alpha(px, py).min(alpha(px + 1, py + 1));
            let mut acc = [0.0f32; 3];
            for (dx, dy) in [(0, 0), (1, 0), (0, 1), (1, 1)] {
                let c = at(px + dx, py + dy);
                for k in 0..3 {
                    acc[k] += c[k] / 4.0;
                }
            }
            let [_, u, v] = rgb_to_yuv(acc);
            let i = cy as usize * w / 2 + cx as usize;
            frame.u[i] = (frame.u[i] as f32 * (1.0 - a) + u * a).round().clamp(0.0, 255.0) as u8;
            frame.v[i] = (frame.v[i] as f32 * (1.0 - a) + v * a).round().clamp(0.0, 255.0) as u8;
        }
    }
}

/// The mouth area of `face_box` in a `width`×`height` frame: the middle quarter of the crop's
/// width, rows 5/8..6/8 of its height. Where tests and the bench look to tell a talking frame from
/// an idle one.
pub fn mouth_area(face_box: FaceBox, width: u32, height: u32) -> FaceBox {
    let r = crop_region(face_box, width, height);
    FaceBox {
        x: r.x + r.w * 3 / 8,
        y: r.y + r.h * 5 / 8,
        w: r.w / 4,
        h: r.h / 8,
    }
}

/// Mean luma of [`mouth_area`].
pub fn mouth_luma(frame: &Yuv420, face_box: FaceBox) -> f32 {
    let m = mouth_area(face_box, frame.width, frame.height);
    let (x0, x1, y0, y1) = (m.x, m.x + m.w, m.y, m.y + m.h);
    let mut sum = 0u64;
    let mut n = 0u64;
    for y in y0..y1 {
        for x in x0..x1 {
            sum += frame.y[(y * frame.width + x) as usize] as u64;
            n += 1;
        }
    }
    sum as f32 / n.max(1) as f32
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::media::avatar::synthetic;

    #[test]
    fn crop_then_paste_of_the_same_face_changes_almost_nothing() {
        let clip = synthetic(256, 256, 25);
        let frame = &clip.frames[0];
        let region = crop_region(clip.face_box(0), 256, 256);
        let face = crop(frame, region);
        assert!(face.iter().all(|v| (0.0..=1.0).contains(v)));
        let mut pasted = frame.clone();
        paste(&mut pasted, region, &face, 6);
        let diff: f64 = frame
            .y
            .iter()
            .zip(&pasted.y)
            .map(|(a, b)| (*a as f64 - *b as f64).abs())
            .sum::<f64>()
            / (region.w * region.h) as f64;
        assert!(diff < 4.0, "mean luma change {diff}");
    }

    #[test]
    fn a_dark_face_shows_inside_the_box_and_fades_at_the_edge() {
        let clip = synthetic(256, 256, 25);
        let region = crop_region(clip.face_box(0), 256, 256);
        let mut frame = clip.frames[0].clone();
        let before = frame.clone();
        paste(&mut frame, region, &vec![0.0; FACE_LEN], 8);
        let at = |f: &Yuv420, x: u32, y: u32| f.y[(y * 256 + x) as usize];
        let (cx, cy) = (region.x + region.w / 2, region.y + region.h * 7 / 10);
        assert!(at(&frame, cx, cy) <= 17, "the lower face is black");
        let eyes = region.y + region.h / 4;
        assert_eq!(
            at(&frame, cx, eyes),
            at(&before, cx, eyes),
            "the upper face is the frame's own"
        );
        assert_eq!(
            at(&frame, region.x - 1, cy),
            at(&before, region.x - 1, cy),
            "outside untouched"
        );
        let edge = at(&frame, region.x, cy) as i32;
        assert!(
            (edge - at(&before, region.x, cy) as i32).abs() < 30,
            "edge is feathered: {edge}"
        );
        assert!(mouth_luma(&frame, clip.face_box(0)) < mouth_luma(&before, clip.face_box(0)) - 50.0);
    }

    #[test]
    fn a_dark_outer_ring_in_the_models_output_leaves_no_outline() {
        // The model returns the face it was given, except its outermost pixel ring, darkened to
        // 75% as a zero-padded 3×3 convolution does.
        let clip = synthetic(256, 256, 25);
        let region = crop_region(clip.face_box(0), 256, 256);
        let before = clip.frames[0].clone();
        let mut face = crop(&before, region);
        for c in 0..3 {
            for i in 0..SIZE {
                for j in [0, SIZE - 1] {
                    face[c * SIZE * SIZE + i * SIZE + j] *= 0.75;
                    face[c * SIZE * SIZE + j * SIZE + i] *= 0.75;
                }
            }
        }
        let mut frame = before.clone();
        paste(&mut frame, region, &face, 6);
        // Along the box's left and right edges, the first pixels inside stay as they were.
        let at = |f: &Yuv420, x: u32, y: u32| i32::from(f.y[(y * 256 + x) as usize]);
        let worst = (region.y + 4..region.y + region.h - 4)
            .flat_map(|y| (0..3).flat_map(move |k| [(region.x + k, y), (region.x + region.w - 1 - k, y)]))
            .map(|(x, y)| (at(&frame, x, y) - at(&before, x, y)).abs())
            .max()
            .unwrap_or(0);
        assert!(worst <= 2, "the box edge changed by up to {worst} luma");
    }
}
