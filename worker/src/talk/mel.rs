//! Wav2Lip's audio features, computed incrementally as speech arrives.
//!
//! The contract (Wav2Lip `audio.py` / `hparams.py`, with librosa 0.7's defaults): mono 16 kHz,
//! pre-emphasis 0.97, a *centered* STFT (reflect padding of `n_fft / 2` at both ends) with
//! n_fft 800, hop 200 and a periodic Hann window of 800, magnitude, an 80-band Slaney mel
//! filterbank over 55–7600 Hz with Slaney normalisation, `20·log10(max(1e-5, S)) − 20`, then
//! `clip(8·((S + 100) / 100) − 4, −4, 4)`. That gives 80 mel columns per second; video frame `i`
//! at 25 fps reads columns `int(i · 3.2) .. + 16` (see [`window_start`]).
//!
//! [`MelStream`] yields a column as soon as the samples under its window have arrived, so lip-sync
//! can start on the first sentence while later ones are still being synthesised. Only the last
//! columns wait for [`MelStream::finish`], which applies the right-hand reflect padding. The result
//! equals the whole-signal computation; `worker/tests/fixtures` holds a numpy reference made by
//! `scripts/talk_fixtures.py mel`.

use realfft::{RealFftPlanner, RealToComplex};
use std::sync::Arc;

pub const SAMPLE_RATE: u32 = 16_000;
pub const N_FFT: usize = 800;
pub const HOP: usize = 200;
pub const N_MELS: usize = 80;
/// Mel columns per video frame's window.
pub const WINDOW: usize = 16;
const PAD: usize = N_FFT / 2;
const BINS: usize = N_FFT / 2 + 1;
const FMIN: f64 = 55.0;
const FMAX: f64 = 7600.0;

/// One mel column: 80 normalised values in [−4, 4].
pub type MelColumn = [f32; N_MELS];

/// First mel column of video frame `frame` at `fps`: `int(frame · 80 / fps)`.
pub fn window_start(frame: usize, fps: u32) -> usize {
    (frame as f64 * 80.0 / fps as f64) as usize
}

/// The 16-column window of `frame`, clamped at the end as Wav2Lip does (the last frames reuse the
/// last 16 columns); columns missing entirely (a very short utterance) read as silence (−4).
pub fn frame_window(columns: &[MelColumn], frame: usize, fps: u32) -> [f32; N_MELS * WINDOW] {
    let start = window_start(frame, fps).min(columns.len().saturating_sub(WINDOW));
    let mut out = [-4.0f32; N_MELS * WINDOW];
    // Layout (1, 80, 16): band-major, time-minor, as the model's (B,1,80,16) input.
    for t in 0..WINDOW {
        if let Some(col) = columns.get(start + t) {
            for (m, v) in col.iter().enumerate() {
                out[m * WINDOW + t] = *v;
            }
        }
    }
    out
}

/// Incremental Wav2Lip mel spectrogram of one utterance.
pub struct MelStream {
    /// Pre-emphasised samples received so far.
    y: Vec<f32>,
    last_raw: Option<f32>,
    /// Columns already emitted.
    emitted: usize,
    finished: bool,
    fft: Arc<dyn RealToComplex<f32>>,
    window: Vec<f32>,
    basis: Arc<MelBasis>,
    frame: Vec<f32>,
    spectrum: Vec<realfft::num_complex::Complex<f32>>,
    scratch: Vec<realfft::num_complex::Complex<f32>>,
}

impl Default for MelStream {
    fn default() -> Self {
        Self::new()
    }
}

impl MelStream {
    pub fn new() -> Self {
        let fft = RealFftPlanner::<f32>::new().plan_fft_forward(N_FFT);
        let window = (0..N_FFT)
            .map(|n| (0.5 - 0.5 * (std::f64::consts::TAU * n as f64 / N_FFT as f64).cos()) as f32)
            .collect();
        let spectrum = fft.make_output_vec();
        let scratch = fft.make_scratch_vec();
        Self {
            y: Vec::new(),
            last_raw: None,
            emitted: 0,
            finished: false,
            fft,
            window,
            basis: mel_basis(),
            frame: vec![0.0; N_FFT],
            spectrum,
            scratch,
        }
    }

    /// Samples received so far.
    pub fn samples(&self) -> usize {
        self.y.len()
    }

    /// Add 16 kHz samples; returns the columns whose windows are now complete.
    pub fn push(&mut self, samples: &[f32]) -> Vec<MelColumn> {
        debug_assert!(!self.finished, "push after finish");
        self.y.reserve(samples.len());
        for &x in samples {
            let y = match self.last_raw {
                Some(prev) => x - 0.97 * prev,
                None => x,
            };
            self.last_raw = Some(x);
            self.y.push(y);
        }
        // Column t covers original samples [t·HOP − PAD, t·HOP + PAD): complete once
        // t·HOP + PAD ≤ len. The left edge is reflected, which needs PAD + 1 samples.
        let mut out = Vec::new();
        while self.y.len() > PAD && self.emitted * HOP + PAD <= self.y.len() {
            out.push(self.column(self.emitted));
            self.emitted += 1;
        }
        out
    }

    /// End of the utterance: the remaining columns, with the right edge reflected.
    /// The total is `1 + len / 200` columns, as librosa's centered STFT.
    pub fn finish(&mut self) -> Vec<MelColumn> {
        self.finished = true;
        let total = 1 + self.y.len() / HOP;
        let mut out = Vec::new();
        while self.emitted < total {
            out.push(self.column(self.emitted));
            self.emitted += 1;
        }
        out
    }

    /// Sample `i` of the padded signal (index relative to the unpadded start).
    fn padded(&self, i: isize) -> f32 {
        let n = self.y.len() as isize;
        if n == 0 {
            return 0.0;
        }
        let j = if i < 0 {
            -i
        } else if i >= n {
            2 * (n - 1) - i
        } else {
            i
        };
        // A signal shorter than the pad cannot be reflected: the rest reads as zeros.
        if (0..n).contains(&j) {
            self.y[j as usize]
        } else {
            0.0
        }
    }

    fn column(&mut self, t: usize) -> MelColumn {
        let start = (t * HOP) as isize - PAD as isize;
        for n in 0..N_FFT {
            let v = self.padded(start + n as isize);
            self.frame[n] = v * self.window[n];
        }
        // The lengths are the planner's own (`make_output_vec`, `make_scratch_vec`): cannot fail.
        let _ = self
            .fft
            .process_with_scratch(&mut self.frame, &mut self.spectrum, &mut self.scratch);
        let mut mag = [0.0f32; BINS];
        for (m, c) in mag.iter_mut().zip(&self.spectrum) {
            *m = c.norm();
        }
        let mut col = [0.0f32; N_MELS];
        for (band, out) in col.iter_mut().enumerate() {
            let (first, weights) = &self.basis.bands[band];
            let s: f32 = weights.iter().zip(&mag[*first..]).map(|(w, m)| w * m).sum();
            let db = 20.0 * s.max(1e-5).log10() - 20.0;
            *out = (8.0 * ((db + 100.0) / 100.0) - 4.0).clamp(-4.0, 4.0);
        }
        col
    }
}

/// Sparse Slaney mel filterbank: per band, the first bin and its non-zero weights.
struct MelBasis {
    bands: Vec<(usize, Vec<f32>)>,
}

fn hz_to_mel(f: f64) -> f64 {
    let (f_sp, min_log_hz, min_log_mel, logstep) = (200.0 / 3.0, 1000.0, 15.0, (6.4f64).ln() / 27.0);
    if f >= min_log_hz {
        min_log_mel + (f / min_log_hz).ln() / logstep
    } else {
        f / f_sp
    }
}

fn mel_to_hz(m: f64) -> f64 {
    let (f_sp, min_log_hz, min_log_mel, logstep) = (200.0 / 3.0, 1000.0, 15.0, (6.4f64).ln() / 27.0);
    if m >= min_log_mel {
        min_log_hz * (logstep * (m - min_log_mel)).exp()
    } else {
        f_sp * m
    }
}

fn mel_basis() -> Arc<MelBasis> {
    static BASIS: std::sync::OnceLock<Arc<MelBasis>> = std::sync::OnceLock::new();
    Arc::clone(BASIS.get_or_init(|| {
        let (lo, hi) = (hz_to_mel(FMIN), hz_to_mel(FMAX));
        let mel_f: Vec<f64> = (0..N_MELS + 2)
            .map(|i| mel_to_hz(lo + (hi - lo) * i as f64 / (N_MELS + 1) as f64))
            .collect();
        let fft_freq = |k: usize| k as f64 * SAMPLE_RATE as f64 / N_FFT as f64;
        let bands = (0..N_MELS)
            .map(|i| {
                let enorm = 2.0 / (mel_f[i + 2] - mel_f[i]);
                let w: Vec<f64> = (0..BINS)
                    .map(|k| {
                        let lower = (fft_freq(k) - mel_f[i]) / (mel_f[i + 1] - mel_f[i]);
                        let upper = (mel_f[i + 2] - fft_freq(k)) / (mel_f[i + 2] - mel_f[i + 1]);
                        lower.min(upper).max(0.0) * enorm
                    })
                    .collect();
                let first = w.iter().position(|v| *v > 0.0).unwrap_or(0);
                let last = w.iter().rposition(|v| *v > 0.0).unwrap_or(0);
                (first, w[first..=last].iter().map(|v| *v as f32).collect())
            })
            .collect();
        Arc::new(MelBasis { bands })
    }))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_f32(name: &str) -> Vec<f32> {
        let path = format!("{}/tests/fixtures/{name}", env!("CARGO_MANIFEST_DIR"));
        let bytes = std::fs::read(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
        bytes
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect()
    }

    /// Compare against `scripts/talk_fixtures.py mel` (numpy, float64), fed in uneven chunks.
    #[test]
    fn incremental_features_match_the_numpy_reference() {
        let input = read_f32("mel_input.f32");
        let expected = read_f32("mel_expected.f32"); // (80, frames), row-major
        let frames = expected.len() / N_MELS;
        assert_eq!(frames, 1 + input.len() / HOP);
        let mut stream = MelStream::new();
        let mut cols = Vec::new();
        let mut rest = &input[..];
        let mut step = 1;
        while !rest.is_empty() {
            let n = step.min(rest.len());
            cols.extend(stream.push(&rest[..n]));
            rest = &rest[n..];
            step = step * 3 % 1777 + 1; // 1, 4, 13, 40, ... uneven chunk sizes
        }
        let streamed = cols.len();
        cols.extend(stream.finish());
        assert_eq!(cols.len(), frames);
        assert!(
            streamed >= frames - 3,
            "only the last columns wait for finish: {streamed}/{frames}"
        );
        let mut max_err = 0.0f32;
        for (t, col) in cols.iter().enumerate() {
            for m in 0..N_MELS {
                max_err = max_err.max((col[m] - expected[m * frames + t]).abs());
            }
        }
        println!("mel max abs error vs numpy: {max_err:.2e} over {frames} x {N_MELS}");
        assert!(max_err < 2e-3, "max error {max_err}");
    }

    #[test]
    fn frame_windows_follow_wav2lip_indexing_and_clamp_at_the_end() {
        assert_eq!(window_start(0, 25), 0);
        assert_eq!(window_start(1, 25), 3);
        assert_eq!(window_start(5, 25), 16);
        let cols: Vec<MelColumn> = (0..40).map(|t| [t as f32; N_MELS]).collect();
        let w = frame_window(&cols, 2, 25); // starts at int(6.4) = 6
        assert_eq!((w[0], w[15], w[16]), (6.0, 21.0, 6.0));
        let last = frame_window(&cols, 100, 25); // clamped to the last 16 columns
        assert_eq!((last[0], last[15]), (24.0, 39.0));
        let short = frame_window(&cols[..5], 0, 25);
        assert_eq!((short[4], short[5]), (4.0, -4.0));
    }

    #[test]
    fn silence_is_the_floor() {
        let mut s = MelStream::new();
        let mut cols = s.push(&[0.0; 3200]);
        cols.extend(s.finish());
        assert_eq!(cols.len(), 17);
        assert!(cols.iter().flatten().all(|v| *v == -4.0));
    }
}
