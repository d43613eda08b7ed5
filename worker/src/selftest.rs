//! `worker --self-test`: prove on this box, before taking sessions, that the video encoder and the
//! lip-sync model the configuration asks for really run, and how fast.
//!
//! A GPU box that silently fell back to the CPU would still stream, only fewer sessions per box; this
//! command makes the difference visible. It opens the configured encoder (`auto` reports which one it
//! got) and encodes a few seconds of the avatar, loads the configured lip-sync model with its
//! execution provider and runs it at batch 1 and at `max_batch`, and prints one table. The exit status
//! is non-zero when any of them failed, so it can gate a deployment.

use crate::config::WorkerConfig;
use crate::media::avatar;
use crate::media::encoder::{self, EncoderSettings, H264Encoder};
use crate::talk::face;
use crate::talk::lipsync::{self, FrameInput, MEL_LEN};
use std::time::Instant;

/// One measured line of the report.
#[derive(Debug, Clone)]
pub struct Row {
    pub what: String,
    pub detail: String,
    /// Milliseconds per frame: mean and 95th percentile.
    pub mean_ms: f64,
    pub p95_ms: f64,
}

/// What the self-test found.
#[derive(Debug, Default)]
pub struct Report {
    pub rows: Vec<Row>,
    pub failures: Vec<String>,
}

impl Report {
    pub fn ok(&self) -> bool {
        self.failures.is_empty()
    }

    /// The report as a Markdown table, then the failures.
    pub fn render(&self) -> String {
        let mut s = String::from("| component | detail | ms/frame mean | ms/frame p95 |\n|---|---|---:|---:|\n");
        for r in &self.rows {
            s += &format!("| {} | {} | {:.3} | {:.3} |\n", r.what, r.detail, r.mean_ms, r.p95_ms);
        }
        for f in &self.failures {
            s += &format!("FAILED: {f}\n");
        }
        s
    }
}

/// Run the self-test with `frames` frames per measurement.
pub fn run(config: &WorkerConfig, frames: usize) -> Report {
    let mut report = Report::default();
    let frames = frames.max(10);
    encode_test(config, frames, &mut report);
    if config.talk.enabled {
        lipsync_test(config, frames, &mut report);
    }
    report
}

fn per_frame(mut samples: Vec<f64>, per: usize) -> (f64, f64) {
    let per = per.max(1) as f64;
    samples.iter_mut().for_each(|v| *v /= per);
    samples.sort_by(f64::total_cmp);
    let mean = samples.iter().sum::<f64>() / samples.len().max(1) as f64;
    let p95 = samples
        .get(((samples.len() as f64 * 0.95) as usize).min(samples.len().saturating_sub(1)))
        .copied()
        .unwrap_or(0.0);
    (mean, p95)
}

fn encode_test(config: &WorkerConfig, frames: usize, report: &mut Report) {
    let v = &config.video;
    let settings = EncoderSettings::from(v);
    if let Err(e) = encoder::init() {
        report.failures.push(format!("FFmpeg: {e}"));
        return;
    }
    let name = match encoder::select_encoder(v.encoder, &settings) {
        Ok(name) => name,
        Err(e) => {
            report.failures.push(format!("encoder `{}`: {e}", v.encoder));
            return;
        }
    };
    let mut enc = match H264Encoder::open(name, &settings) {
        Ok(enc) => enc,
        Err(e) => {
            report.failures.push(format!("encoder {name}: {e}"));
            return;
        }
    };
    let clip = avatar::synthetic(v.width, v.height, v.fps);
    let (mut times, mut bytes) = (Vec::with_capacity(frames), 0usize);
    for i in 0..frames {
        let picture = clip.frame(i);
        let t = Instant::now();
        match enc.encode(picture, i as i64, i == 0) {
            Ok(au) => bytes += au.len(),
            Err(e) => {
                report.failures.push(format!("encoding with {name}: {e}"));
                return;
            }
        }
        times.push(t.elapsed().as_secs_f64() * 1e3);
    }
    let (mean, p95) = per_frame(times, 1);
    let kbps = bytes as f64 * 8.0 / (frames as f64 / v.fps as f64) / 1e3;
    report.rows.push(Row {
        what: format!("encoder {name}"),
        detail: format!(
            "{}x{} @ {} fps, asked `{}`, {kbps:.0} kbit/s out",
            v.width, v.height, v.fps, v.encoder
        ),
        mean_ms: mean,
        p95_ms: p95,
    });
}

fn lipsync_test(config: &WorkerConfig, frames: usize, report: &mut Report) {
    let cfg = &config.talk.lipsync;
    let t = Instant::now();
    let mut model = match lipsync::load_model(cfg) {
        Ok(m) => m,
        Err(e) => {
            report.failures.push(format!("lip-sync model: {e}"));
            return;
        }
    };
    let load_ms = t.elapsed().as_secs_f64() * 1e3;
    let v = &config.video;
    let clip = avatar::synthetic(v.width, v.height, v.fps);
    let region = face::crop_region(clip.face_box(0), v.width, v.height);
    let face = face::crop(&clip.frames[0], region);
    let input = |i: usize| FrameInput {
        mel: std::array::from_fn(|k| ((i * 31 + k) % 97) as f32 / 24.0 - 3.0),
        face: face.clone(),
    };
    let mut batches = vec![1usize];
    if cfg.max_batch > 1 {
        batches.push(cfg.max_batch);
    }
    debug_assert_eq!(MEL_LEN, 80 * 16);
    for batch in batches {
        let runs = (frames / batch).max(5);
        let mut times = Vec::with_capacity(runs);
        // One warm-up run: the first inference on a GPU also builds its kernels.
        for r in 0..=runs {
            let inputs: Vec<FrameInput> = (0..batch).map(|i| input(r * batch + i)).collect();
            let t = Instant::now();
            if let Err(e) = model.infer(&inputs) {
                report.failures.push(format!("lip-sync inference (batch {batch}): {e}"));
                return;
            }
            if r > 0 {
                times.push(t.elapsed().as_secs_f64() * 1e3);
            }
        }
        let (mean, p95) = per_frame(times, batch);
        report.rows.push(Row {
            what: format!("lip-sync {}", model.name()),
            detail: format!("batch {batch}, {runs} runs, loaded in {load_ms:.0} ms"),
            mean_ms: mean,
            p95_ms: p95,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_config_passes_with_libx264_and_the_builtin_mouth() {
        let mut config = WorkerConfig::dev();
        config.video.encoder = crate::config::VideoEncoder::Libx264;
        let report = run(&config, 20);
        assert!(report.ok(), "{}", report.render());
        assert_eq!(report.rows.len(), 3, "{}", report.render());
        assert!(report.rows[0].what.contains("libx264"));
        assert!(report.rows[0].mean_ms > 0.0);
        assert!(report.render().contains("| lip-sync builtin"), "{}", report.render());
    }

    #[test]
    fn a_missing_model_is_a_failure_not_a_silent_fallback() {
        let mut config = WorkerConfig::dev();
        config.video.encoder = crate::config::VideoEncoder::Libx264;
        config.talk.lipsync.backend = crate::config::LipSyncBackend::Onnx;
        config.talk.lipsync.model = Some("/nonexistent/model.onnx".into());
        let report = run(&config, 10);
        assert!(!report.ok());
        assert!(
            report.render().contains("FAILED: lip-sync model"),
            "{}",
            report.render()
        );
    }

    #[test]
    fn nvenc_without_a_gpu_fails_when_asked_for_by_name() {
        let mut config = WorkerConfig::dev();
        config.video.encoder = crate::config::VideoEncoder::H264Nvenc;
        config.talk.enabled = false;
        let report = run(&config, 10);
        if report.ok() {
            // A machine with a GPU: the row must say so.
            assert!(report.rows[0].what.contains("h264_nvenc"));
        } else {
            assert!(report.render().contains("h264_nvenc"), "{}", report.render());
        }
    }
}
