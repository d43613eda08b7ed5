//! From per-frame detections to an avatar: which face each frame shows, which frames to keep,
//! smooth boxes, and a loop that does not jump. Pure functions over numbers, tested in memory.

use super::detect::Detection;
use crate::media::avatar::{FaceBox, Looping, Yuv420};
use std::ops::Range;

/// The face a frame shows.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Choice {
    pub face: Option<Detection>,
    /// Another face scored at least half as well as the chosen one.
    pub several: bool,
}

/// Pick one face per frame: the one that overlaps the previous frame's most (the same person as
/// the head moves), or else the best-scoring one. `per_frame` lists each frame's detections.
pub fn choose(per_frame: &[Vec<Detection>]) -> Vec<Choice> {
    let mut previous: Option<Detection> = None;
    per_frame
        .iter()
        .map(|found| {
            let by_track = previous.and_then(|p| {
                found
                    .iter()
                    .map(|d| (d.iou(&p), d))
                    .filter(|(iou, _)| *iou >= 0.3)
                    .max_by(|a, b| a.0.total_cmp(&b.0))
                    .map(|(_, d)| *d)
            });
            let best = found.iter().copied().max_by(|a, b| a.score.total_cmp(&b.score));
            let face = by_track.or(best);
            if face.is_some() {
                previous = face;
            }
            let several = face.is_some_and(|f| {
                found
                    .iter()
                    .filter(|d| **d != f && d.score >= 0.5 * f.score && d.iou(&f) < 0.3)
                    .count()
                    > 0
            });
            Choice { face, several }
        })
        .collect()
}

/// The runs of consecutive indices where `flag` holds.
pub fn ranges(flags: impl IntoIterator<Item = bool>) -> Vec<Range<usize>> {
    let mut out: Vec<Range<usize>> = Vec::new();
    for (i, flag) in flags.into_iter().enumerate() {
        match out.last_mut() {
            Some(r) if flag && r.end == i => r.end = i + 1,
            _ if flag => out.push(i..i + 1),
            _ => {}
        }
    }
    out
}

/// The frames an avatar keeps and their smoothed face boxes.
#[derive(Debug, Clone, PartialEq)]
pub struct Track {
    /// The kept frames of the input (the longest stretch with a face).
    pub frames: Range<usize>,
    /// One box per kept frame, in output pixels.
    pub boxes: Vec<FaceBox>,
    /// Per kept frame: no face was detected there and its box is interpolated.
    pub interpolated: Vec<bool>,
    /// Input frames with no face, as runs.
    pub no_face: Vec<Range<usize>>,
    /// Input frames with more than one face, as runs.
    pub several: Vec<Range<usize>>,
}

/// Gaussian smoothing of `values` with `sigma` frames; the kernel is cut at 3 σ and renormalised
/// at the ends, so a still face stays exactly where it is.
pub fn smooth(values: &[f32], sigma: f32) -> Vec<f32> {
    let reach = (3.0 * sigma).ceil() as isize;
    let n = values.len() as isize;
    (0..n)
        .map(|i| {
            let (mut sum, mut weights) = (0.0f32, 0.0f32);
            for k in (i - reach).max(0)..=(i + reach).min(n - 1) {
                let d = (k - i) as f32 / sigma.max(1e-3);
                let w = (-0.5 * d * d).exp();
                sum += w * values[k as usize];
                weights += w;
            }
            sum / weights
        })
        .collect()
}

/// The face track of a clip: the longest stretch of frames where gaps without a face last at most
/// `max_gap` frames (those are interpolated), with the box centre smoothed over `sigma` frames
/// and its size over `4 σ` (sizes jitter more and change slowly), fitted inside `width`×`height`.
/// `None`: no frame has a face.
pub fn track(choices: &[Choice], max_gap: usize, sigma: f32, width: u32, height: u32) -> Option<Track> {
    let no_face = ranges(choices.iter().map(|c| c.face.is_none()));
    let several = ranges(choices.iter().map(|c| c.several));
    // Stretches with a face, bridging gaps up to `max_gap`.
    let mut stretches: Vec<Range<usize>> = Vec::new();
    for r in ranges(choices.iter().map(|c| c.face.is_some())) {
        match stretches.last_mut() {
            Some(last) if r.start - last.end <= max_gap => last.end = r.end,
            _ => stretches.push(r),
        }
    }
    let frames = stretches
        .into_iter()
        .max_by_key(|r| (r.len(), std::cmp::Reverse(r.start)))?;
    // Centre and size per kept frame; gaps interpolated linearly between their neighbours.
    let known: Vec<(usize, [f32; 4])> = frames
        .clone()
        .filter_map(|i| {
            choices[i].face.map(|d| {
                let (cx, cy) = d.centre();
                (i - frames.start, [cx, cy, d.w, d.h])
            })
        })
        .collect();
    let mut series = vec![[0.0f32; 4]; frames.len()];
    let mut interpolated = vec![true; frames.len()];
    for pair in known.windows(2) {
        let ((a, va), (b, vb)) = (pair[0], pair[1]);
        for (k, slot) in series.iter_mut().enumerate().take(b + 1).skip(a) {
            let t = (k - a) as f32 / (b - a) as f32;
            *slot = std::array::from_fn(|c| va[c] + (vb[c] - va[c]) * t);
        }
    }
    for &(k, v) in &known {
        series[k] = v;
        interpolated[k] = false;
    }
    let column = |c: usize, sigma: f32| smooth(&series.iter().map(|v| v[c]).collect::<Vec<_>>(), sigma);
    let (cx, cy, w, h) = (
        column(0, sigma),
        column(1, sigma),
        column(2, 4.0 * sigma),
        column(3, 4.0 * sigma),
    );
    let boxes = (0..frames.len())
        .map(|k| fit(cx[k], cy[k], w[k], h[k], width, height))
        .collect();
    Some(Track {
        frames,
        boxes,
        interpolated,
        no_face,
        several,
    })
}

/// A `w`×`h` box centred on (cx, cy), in whole pixels, moved (not shrunk) to lie inside the frame.
fn fit(cx: f32, cy: f32, w: f32, h: f32, width: u32, height: u32) -> FaceBox {
    let w = (w.round().max(2.0) as u32).min(width);
    let h = (h.round().max(2.0) as u32).min(height);
    let x = (cx - w as f32 / 2.0).round().clamp(0.0, (width - w) as f32) as u32;
    let y = (cy - h as f32 / 2.0).round().clamp(0.0, (height - h) as f32) as u32;
    FaceBox { x, y, w, h }
}

/// The side of the pictures [`difference`] compares.
pub const THUMB: usize = 64;

/// A `THUMB`×`THUMB` luma thumbnail of `picture` (box-filtered), to compare frames cheaply.
pub fn thumbnail(picture: &Yuv420) -> Vec<u8> {
    let (w, h) = (picture.width as usize, picture.height as usize);
    let mut out = Vec::with_capacity(THUMB * THUMB);
    for ty in 0..THUMB {
        for tx in 0..THUMB {
            let (x0, x1) = (tx * w / THUMB, ((tx + 1) * w / THUMB).max(tx * w / THUMB + 1).min(w));
            let (y0, y1) = (ty * h / THUMB, ((ty + 1) * h / THUMB).max(ty * h / THUMB + 1).min(h));
            let (mut sum, mut n) = (0u32, 0u32);
            for y in y0..y1 {
                for x in x0..x1 {
                    sum += u32::from(picture.y[y * w + x]);
                    n += 1;
                }
            }
            out.push((sum / n.max(1)) as u8);
        }
    }
    out
}

/// Mean absolute luma difference of two thumbnails: how much the picture changes between them.
pub fn difference(a: &[u8], b: &[u8]) -> f32 {
    let sum: u32 = a.iter().zip(b).map(|(x, y)| u32::from(x.abs_diff(*y))).sum();
    sum as f32 / a.len().max(1) as f32
}

/// How a clip should loop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LoopPlan {
    pub looping: Looping,
    /// Frames the loop keeps, from the first.
    pub len: usize,
    /// The picture's change at the seam (last shown frame → the next), and the clip's normal
    /// change from one frame to the next (the median), both as [`difference`]s.
    pub seam: f32,
    pub normal: f32,
}

/// Choose a loop for `thumbs` (one per frame) that never jumps: a forward loop cut where the
/// picture comes back to the first frame, if some cut of at least `min_len` frames changes the
/// picture at its seam no more than 9 in 10 of the clip's own steps do; ping-pong otherwise.
pub fn choose_loop(thumbs: &[Vec<u8>], min_len: usize) -> LoopPlan {
    let n = thumbs.len();
    let steps: Vec<f32> = thumbs.windows(2).map(|p| difference(&p[0], &p[1])).collect();
    let normal = median(&steps);
    if n < 3 {
        return LoopPlan {
            looping: Looping::Forward,
            len: n,
            seam: thumbs.last().map(|t| difference(t, &thumbs[0])).unwrap_or(0.0),
            normal,
        };
    }
    // A cut after frame `len - 1` plays frame 0 next, where the recording played frame `len`: the
    // best cut is where frame `len` looks most like frame 0.
    let best = (min_len.clamp(2, n - 1)..n)
        .min_by(|&a, &b| difference(&thumbs[a], &thumbs[0]).total_cmp(&difference(&thumbs[b], &thumbs[0])));
    if let Some(len) = best {
        let seam = difference(&thumbs[len - 1], &thumbs[0]);
        // The seam must look like an ordinary step of the clip (no larger than 9 steps in 10).
        if seam <= percentile(&steps, 0.9) {
            return LoopPlan {
                looping: Looping::Forward,
                len,
                seam,
                normal,
            };
        }
    }
    // Ping-pong's seams are the two ends, where the clip turns back: one frame's own motion.
    LoopPlan {
        looping: Looping::Pingpong,
        len: n,
        seam: steps[n - 2].max(steps[0]),
        normal,
    }
}

fn median(v: &[f32]) -> f32 {
    percentile(v, 0.5)
}

fn percentile(v: &[f32], p: f32) -> f32 {
    let mut sorted = v.to_vec();
    sorted.sort_by(f32::total_cmp);
    sorted
        .get(((sorted.len().saturating_sub(1)) as f32 * p).round() as usize)
        .copied()
        .unwrap_or(0.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn face(cx: f32, cy: f32, size: f32, score: f32) -> Detection {
        Detection {
            x: cx - size / 2.0,
            y: cy - size / 2.0,
            w: size,
            h: size,
            score,
            mouth: (cx, cy + size / 4.0),
        }
    }

    #[test]
    fn the_tracked_face_is_kept_over_a_stronger_stranger_and_both_are_flagged() {
        let frames = vec![
            vec![face(100.0, 100.0, 80.0, 0.9)],
            // A stranger scores higher, far away: the face that overlaps the last one is kept.
            vec![face(300.0, 100.0, 80.0, 0.95), face(104.0, 100.0, 80.0, 0.8)],
            vec![],
            vec![face(108.0, 100.0, 80.0, 0.9), face(300.0, 300.0, 40.0, 0.3)],
        ];
        let chosen = choose(&frames);
        assert_eq!(chosen[1].face.map(|d| d.centre().0), Some(104.0));
        assert_eq!(
            chosen.iter().map(|c| c.several).collect::<Vec<_>>(),
            [false, true, false, false]
        );
        assert_eq!(chosen[2].face, None);
    }

    #[test]
    fn short_gaps_are_interpolated_long_ones_split_and_the_longest_stretch_is_kept() {
        // 10 frames with a face moving right 2 px a frame, a 2-frame gap, 20 more, a 30-frame gap,
        // 5 more.
        let mut frames: Vec<Vec<Detection>> = Vec::new();
        for i in 0..67 {
            let present = !(10..12).contains(&i) && !(32..62).contains(&i);
            frames.push(if present {
                vec![face(100.0 + 2.0 * i as f32, 120.0, 90.0, 0.9)]
            } else {
                vec![]
            });
        }
        let t = track(&choose(&frames), 5, 1.5, 512, 512).expect("a face");
        assert_eq!(t.frames, 0..32);
        assert_eq!(t.no_face, [10..12, 32..62]);
        assert_eq!(t.interpolated.iter().filter(|i| **i).count(), 2);
        // Linear motion survives smoothing and interpolation (inside the ends, where the kernel
        // is cut).
        for (k, b) in t.boxes.iter().enumerate().skip(5).take(22) {
            let cx = b.x as f32 + b.w as f32 / 2.0;
            assert!((cx - (100.0 + 2.0 * k as f32)).abs() <= 1.0, "frame {k}: {b:?}");
            assert_eq!((b.w, b.h), (90, 90));
        }
        assert!(track(&choose(&[vec![], vec![]]), 5, 1.5, 512, 512).is_none());
    }

    #[test]
    fn jitter_is_smoothed_and_a_box_at_the_edge_stays_inside_the_frame() {
        let frames: Vec<Vec<Detection>> = (0..50)
            .map(|i| vec![face(200.0 + if i % 2 == 0 { 4.0 } else { -4.0 }, 30.0, 80.0, 0.9)])
            .collect();
        let t = track(&choose(&frames), 5, 1.5, 512, 512).expect("a face");
        let xs: Vec<u32> = t.boxes.iter().skip(5).take(40).map(|b| b.x).collect();
        let spread = xs.iter().max().unwrap_or(&0) - xs.iter().min().unwrap_or(&0);
        assert!(spread <= 1, "±4 px of jitter left {spread} px: {xs:?}");
        // Centred at y = 30 with a height of 80, the box would start at -10: it is moved down.
        assert!(t.boxes.iter().all(|b| b.y == 0 && b.h == 80));
    }

    fn thumbs(values: &[u8]) -> Vec<Vec<u8>> {
        values.iter().map(|v| vec![*v; 16]).collect()
    }

    #[test]
    fn a_recording_that_comes_back_is_cut_there_and_one_that_drifts_plays_pingpong() {
        // Up and back down twice: 0, 4, 8, … 40, … 4, 0, 4, … — the cut at frame 20 (back at 0).
        let wave: Vec<u8> = (0..34).map(|i: i32| (40 - (i % 20 - 10).abs() * 4) as u8).collect();
        let plan = choose_loop(&thumbs(&wave), 17);
        assert_eq!(plan.looping, Looping::Forward, "{plan:?}");
        assert_eq!(plan.len, 20);
        assert!(plan.seam <= plan.normal, "{plan:?}");
        // A steady drift never comes back: ping-pong, whose turns move one frame's step.
        let drift: Vec<u8> = (0..30).map(|i| 2 * i as u8).collect();
        let plan = choose_loop(&thumbs(&drift), 15);
        assert_eq!((plan.looping, plan.len), (Looping::Pingpong, 30));
        assert_eq!((plan.seam, plan.normal), (2.0, 2.0));
    }

    #[test]
    fn ranges_are_runs_of_true() {
        assert_eq!(
            ranges([true, true, false, true, false, false, true]),
            [0..2, 3..4, 6..7]
        );
        assert!(ranges([false; 3]).is_empty());
    }
}
