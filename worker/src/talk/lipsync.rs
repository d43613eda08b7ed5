//! Lip-sync: turn (mel window, face crop) pairs into talking faces.
//!
//! [`LipSyncModel`] is the interface a model implements: a batch of frames in, a batch of faces
//! out, on the Wav2Lip contract — mel `(B,1,80,16)`, faces `(B,6,96,96)` (the crop with its lower
//! half zeroed, then the crop as reference), output `(B,3,96,96)` BGR in [0,1]. Two models ship:
//!
//! * [`BuiltinMouth`]: no files, no runtime. It opens a dark mouth in proportion to the loudness of
//!   the mel window. The demo's and the tests' fallback, and the floor for the benchmarks.
//! * [`OnnxLipSync`]: any ONNX model on the contract (a real Wav2Lip export, or the small test model
//!   `scripts/talk_fixtures.py model` generates), run by ONNX Runtime through `ort` with the
//!   library loaded at run time. With `execution_provider = "cuda"` the CUDA provider is registered
//!   with `error_on_failure`: a GPU box that cannot use its GPU refuses to start instead of quietly
//!   rendering on the CPU at a fraction of the speed.
//!
//! [`LipSyncService`] owns the models: `runners` threads, each with its own model instance (ONNX
//! sessions run `&mut`), pulling from one queue. A runner takes a job and then drains whatever other
//! sessions queued meanwhile, up to `max_batch` frames, and runs them as one batch. On a GPU that
//! cross-session batch is what lets one card serve many sessions; on the CPU a runner per core
//! lets sessions proceed in parallel.

use super::face::{Face, FACE_LEN, SIZE};
use super::mel::{N_MELS, WINDOW};
use crate::config::{ExecutionProvider, LipSyncBackend, LipSyncConfig};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Instant;
use tracing::{info, warn};

/// Floats in one mel window (1, 80, 16).
pub const MEL_LEN: usize = N_MELS * WINDOW;

/// One frame to render.
pub struct FrameInput {
    pub mel: [f32; MEL_LEN],
    pub face: Face,
}

#[derive(Debug, thiserror::Error)]
pub enum LipSyncError {
    #[error("ONNX Runtime library {path}: {message}")]
    Runtime { path: String, message: String },
    #[error("model {path}: {message}")]
    Model { path: String, message: String },
    #[error("the CUDA execution provider could not be registered: {0} (set lipsync.execution_provider = \"cpu\" to run on the CPU knowingly)")]
    Cuda(String),
    #[error("inference: {0}")]
    Inference(String),
    #[error("the lip-sync service has stopped")]
    Stopped,
}

/// A lip-sync model on the Wav2Lip contract.
pub trait LipSyncModel: Send {
    fn name(&self) -> String;
    fn infer(&mut self, batch: &[FrameInput]) -> Result<Vec<Face>, LipSyncError>;
}

/// Mouth mask in the 96×96 crop: a soft ellipse around row 66, as the test model's.
fn mouth_mask() -> &'static [f32] {
    static MASK: std::sync::OnceLock<Vec<f32>> = std::sync::OnceLock::new();
    MASK.get_or_init(|| {
        (0..SIZE * SIZE)
            .map(|i| {
                let (y, x) = ((i / SIZE) as f32, (i % SIZE) as f32);
                let d = ((x - 47.5) / 17.0).powi(2) + ((y - 66.0) / 9.0).powi(2);
                (1.5 - d).clamp(0.0, 1.0)
            })
            .collect()
    })
}

/// How open the mouth is for a mel window: ~0 in silence, ~1 in loud speech.
pub fn openness(mel: &[f32]) -> f32 {
    let mean = mel.iter().sum::<f32>() / mel.len().max(1) as f32;
    1.0 / (1.0 + (-(1.6 * mean + 2.2)).exp())
}

/// The built-in model: darkens the mouth region towards a mouth-interior colour by loudness.
#[derive(Debug, Default)]
pub struct BuiltinMouth;

impl LipSyncModel for BuiltinMouth {
    fn name(&self) -> String {
        "builtin".into()
    }

    fn infer(&mut self, batch: &[FrameInput]) -> Result<Vec<Face>, LipSyncError> {
        const COLOUR: [f32; 3] = [0.20, 0.12, 0.30]; // B, G, R
        let mask = mouth_mask();
        Ok(batch
            .iter()
            .map(|input| {
                let open = openness(&input.mel);
                let mut face = input.face.clone();
                for (c, colour) in COLOUR.iter().enumerate() {
                    let plane = &mut face[c * SIZE * SIZE..(c + 1) * SIZE * SIZE];
                    for (v, m) in plane.iter_mut().zip(mask) {
                        *v += (colour - *v) * m * open;
                    }
                }
                face
            })
            .collect())
    }
}

/// A CPU session of the small model at `model` (a file a package or `scripts/install-deps`
/// provides) on `threads` threads, with the ONNX Runtime library at `onnxruntime`; the error says
/// what is wrong in words.
pub(crate) fn cpu_session(
    model: &std::path::Path,
    onnxruntime: &std::path::Path,
    threads: usize,
) -> Result<ort::session::Session, String> {
    if !model.is_file() {
        return Err("no such file (scripts/install-deps fetches it; the Debian package installs it)".into());
    }
    let env = ort_environment(onnxruntime).map_err(|e| e.to_string())?;
    let build = || -> ort::Result<ort::session::Session> {
        ort::session::Session::builder(env)?
            .with_intra_threads(threads.max(1))?
            .with_inter_threads(1)?
            .commit_from_file(model)
    };
    build().map_err(|e| e.to_string())
}

/// The process-wide ONNX Runtime environment (one per process, kept alive for its sessions).
pub(crate) fn ort_environment(
    library: &std::path::Path,
) -> Result<&'static ort::environment::Environment, LipSyncError> {
    static ENV: std::sync::OnceLock<Result<ort::environment::Environment, String>> = std::sync::OnceLock::new();
    let err = |message: String| LipSyncError::Runtime {
        path: library.display().to_string(),
        message,
    };
    ENV.get_or_init(|| {
        if !library.exists() {
            return Err("no such file (scripts/install-deps fetches it from the onnxruntime wheel)".into());
        }
        ort::init_from(library)
            .map_err(|e| e.to_string())?
            .with_name("avatar-edge")
            .build()
            .map_err(|e| e.to_string())
    })
    .as_ref()
    .map_err(|e| err(e.clone()))
}

/// An ONNX model on the Wav2Lip contract.
pub struct OnnxLipSync {
    session: ort::session::Session,
    path: String,
    provider: &'static str,
    input_mel: String,
    input_video: String,
    output: String,
}

impl OnnxLipSync {
    pub fn load(cfg: &LipSyncConfig) -> Result<Self, LipSyncError> {
        let path = cfg.model.as_ref().ok_or_else(|| LipSyncError::Model {
            path: String::new(),
            message: "lipsync.model is not set".into(),
        })?;
        let env = ort_environment(&cfg.onnxruntime)?;
        let model_err = |message: String| LipSyncError::Model {
            path: path.display().to_string(),
            message,
        };
        let cuda = cfg.execution_provider == ExecutionProvider::Cuda;
        let session = build_session(env, path, cfg.threads, cuda.then_some(cfg.device_id)).map_err(|e| {
            let message = e.to_string();
            if cuda && message.to_ascii_lowercase().contains("cuda") {
                LipSyncError::Cuda(message)
            } else {
                model_err(message)
            }
        })?;
        for name in [&cfg.input_mel, &cfg.input_video] {
            if !session.inputs().iter().any(|i| i.name() == name.as_str()) {
                let have: Vec<_> = session.inputs().iter().map(|i| i.name().to_owned()).collect();
                return Err(model_err(format!(
                    "has no input `{name}` (inputs: {have:?}); set lipsync.input_mel / input_video"
                )));
            }
        }
        if !session.outputs().iter().any(|o| o.name() == cfg.output.as_str()) {
            let have: Vec<_> = session.outputs().iter().map(|o| o.name().to_owned()).collect();
            return Err(model_err(format!(
                "has no output `{}` (outputs: {have:?}); set lipsync.output",
                cfg.output
            )));
        }
        Ok(Self {
            session,
            path: path.display().to_string(),
            provider: if cuda { "cuda" } else { "cpu" },
            input_mel: cfg.input_mel.clone(),
            input_video: cfg.input_video.clone(),
            output: cfg.output.clone(),
        })
    }
}

fn build_session(
    env: &ort::environment::Environment,
    path: &std::path::Path,
    threads: usize,
    cuda_device: Option<i32>,
) -> ort::Result<ort::session::Session> {
    let mut builder = ort::session::Session::builder(env)?.with_intra_threads(threads.max(1))?;
    if let Some(device) = cuda_device {
        builder = builder.with_execution_providers([ort::ep::CUDA::default()
            .with_device_id(device)
            .build()
            .error_on_failure()])?;
    }
    builder.commit_from_file(path)
}

impl LipSyncModel for OnnxLipSync {
    fn name(&self) -> String {
        format!("onnx:{} ({})", self.path, self.provider)
    }

    fn infer(&mut self, batch: &[FrameInput]) -> Result<Vec<Face>, LipSyncError> {
        let b = batch.len();
        let plane = SIZE * SIZE;
        let mut mel = ndarray::Array4::<f32>::zeros((b, 1, N_MELS, WINDOW));
        let mut video = ndarray::Array4::<f32>::zeros((b, 6, SIZE, SIZE));
        {
            let (mel_s, video_s) = (
                mel.as_slice_mut()
                    .ok_or_else(|| LipSyncError::Inference("mel layout".into()))?,
                video
                    .as_slice_mut()
                    .ok_or_else(|| LipSyncError::Inference("video layout".into()))?,
            );
            for (i, input) in batch.iter().enumerate() {
                mel_s[i * MEL_LEN..(i + 1) * MEL_LEN].copy_from_slice(&input.mel);
                let v = &mut video_s[i * 6 * plane..(i + 1) * 6 * plane];
                // Channels 0..3: the crop with its lower half zeroed; 3..6: the crop as reference.
                v[..3 * plane].copy_from_slice(&input.face);
                for c in 0..3 {
                    v[c * plane + plane / 2..(c + 1) * plane].fill(0.0);
                }
                v[3 * plane..].copy_from_slice(&input.face);
            }
        }
        let inf = |e: ort::Error| LipSyncError::Inference(e.to_string());
        let inputs = ort::inputs![
            self.input_mel.as_str() => ort::value::TensorRef::from_array_view(&mel).map_err(inf)?,
            self.input_video.as_str() => ort::value::TensorRef::from_array_view(&video).map_err(inf)?,
        ];
        let outputs = self.session.run(inputs).map_err(inf)?;
        let out = outputs
            .get(self.output.as_str())
            .ok_or_else(|| LipSyncError::Inference(format!("no output `{}`", self.output)))?
            .try_extract_array::<f32>()
            .map_err(inf)?;
        if out.shape() != [b, 3, SIZE, SIZE] {
            return Err(LipSyncError::Inference(format!(
                "output shape {:?}, expected [{b}, 3, {SIZE}, {SIZE}]",
                out.shape()
            )));
        }
        let flat: Vec<f32> = out.iter().map(|v| v.clamp(0.0, 1.0)).collect();
        Ok(flat.chunks_exact(FACE_LEN).map(<[f32]>::to_vec).collect())
    }
}

/// Build the model `cfg` asks for.
pub fn load_model(cfg: &LipSyncConfig) -> Result<Box<dyn LipSyncModel>, LipSyncError> {
    match cfg.backend {
        LipSyncBackend::Onnx => Ok(Box::new(OnnxLipSync::load(cfg)?)),
        LipSyncBackend::Builtin => Ok(Box::new(BuiltinMouth)),
    }
}

struct Job {
    frames: Vec<FrameInput>,
    reply: mpsc::SyncSender<Result<Vec<Face>, LipSyncError>>,
}

/// Frames rendered and time spent, for the bench and metrics.
#[derive(Debug, Default)]
pub struct LipSyncStats {
    pub frames: std::sync::atomic::AtomicU64,
    pub batches: std::sync::atomic::AtomicU64,
    pub micros: std::sync::atomic::AtomicU64,
}

/// The worker's lip-sync runners (see the module docs).
pub struct LipSyncService {
    tx: Mutex<Option<mpsc::Sender<Job>>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    pub model_name: String,
    pub stats: Arc<LipSyncStats>,
}

impl LipSyncService {
    /// Load `runners` model instances (failing if any cannot load) and start their threads.
    pub fn start(cfg: &LipSyncConfig) -> Result<Arc<Self>, LipSyncError> {
        let runners = cfg.runners.max(1);
        let mut models = Vec::with_capacity(runners);
        for _ in 0..runners {
            models.push(load_model(cfg)?);
        }
        let model_name = models[0].name();
        info!(model = %model_name, runners, max_batch = cfg.max_batch, "lip-sync ready");
        let (tx, rx) = mpsc::channel::<Job>();
        let rx = Arc::new(Mutex::new(rx));
        let stats = Arc::new(LipSyncStats::default());
        let max_batch = cfg.max_batch.max(1);
        let mut threads = Vec::new();
        for (i, model) in models.into_iter().enumerate() {
            let (rx, stats) = (Arc::clone(&rx), Arc::clone(&stats));
            let spawned = std::thread::Builder::new()
                .name(format!("lipsync-{i}"))
                .spawn(move || run_runner(model, &rx, max_batch, &stats));
            match spawned {
                Ok(t) => threads.push(t),
                Err(e) => warn!(error = %e, "could not start a lip-sync runner"),
            }
        }
        if threads.is_empty() {
            return Err(LipSyncError::Stopped);
        }
        Ok(Arc::new(Self {
            tx: Mutex::new(Some(tx)),
            threads: Mutex::new(threads),
            model_name,
            stats,
        }))
    }

    /// Render `frames` (blocking; call from a plain thread).
    pub fn infer(&self, frames: Vec<FrameInput>) -> Result<Vec<Face>, LipSyncError> {
        if frames.is_empty() {
            return Ok(Vec::new());
        }
        let (reply, answer) = mpsc::sync_channel(1);
        {
            let tx = self.tx.lock().map_err(|_| LipSyncError::Stopped)?;
            tx.as_ref()
                .ok_or(LipSyncError::Stopped)?
                .send(Job { frames, reply })
                .map_err(|_| LipSyncError::Stopped)?;
        }
        answer.recv().map_err(|_| LipSyncError::Stopped)?
    }

    /// Stop the runners after the queued jobs.
    pub fn shutdown(&self) {
        if let Ok(mut tx) = self.tx.lock() {
            tx.take();
        }
        let threads = self
            .threads
            .lock()
            .map(|mut t| std::mem::take(&mut *t))
            .unwrap_or_default();
        for t in threads {
            let _ = t.join();
        }
    }
}

fn run_runner(
    mut model: Box<dyn LipSyncModel>,
    rx: &Mutex<mpsc::Receiver<Job>>,
    max_batch: usize,
    stats: &LipSyncStats,
) {
    use std::sync::atomic::Ordering::Relaxed;
    loop {
        // Take one job, then whatever else is already queued (other sessions), up to max_batch frames.
        let mut jobs = Vec::new();
        {
            let Ok(rx) = rx.lock() else { return };
            match rx.recv() {
                Ok(job) => jobs.push(job),
                Err(_) => return, // the service was shut down
            }
            let mut frames = jobs[0].frames.len();
            while frames < max_batch {
                match rx.try_recv() {
                    Ok(job) => {
                        frames += job.frames.len();
                        jobs.push(job);
                    }
                    Err(_) => break,
                }
            }
        }
        let counts: Vec<usize> = jobs.iter().map(|j| j.frames.len()).collect();
        let mut all = Vec::with_capacity(counts.iter().sum());
        let mut replies = Vec::with_capacity(jobs.len());
        for job in jobs {
            all.extend(job.frames);
            replies.push(job.reply);
        }
        let started = Instant::now();
        let result = model.infer(&all);
        stats.micros.fetch_add(started.elapsed().as_micros() as u64, Relaxed);
        stats.batches.fetch_add(1, Relaxed);
        stats.frames.fetch_add(all.len() as u64, Relaxed);
        metrics::histogram!("worker_lipsync_batch_seconds").record(started.elapsed().as_secs_f64());
        match result {
            Ok(faces) if faces.len() == all.len() => {
                let mut faces = faces.into_iter();
                for (reply, n) in replies.into_iter().zip(counts) {
                    let _ = reply.send(Ok(faces.by_ref().take(n).collect()));
                }
            }
            Ok(faces) => {
                let msg = format!("model returned {} faces for {} frames", faces.len(), all.len());
                for reply in replies {
                    let _ = reply.send(Err(LipSyncError::Inference(msg.clone())));
                }
            }
            Err(e) => {
                let msg = e.to_string();
                warn!(error = %msg, "lip-sync batch failed");
                for reply in replies {
                    let _ = reply.send(Err(LipSyncError::Inference(msg.clone())));
                }
            }
        }
    }
}
