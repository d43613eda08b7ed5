//! `worker`: parse the config, start up, keep tunnels to the relays until Ctrl-C or SIGTERM.

use anyhow::Context as _;
use avatar_worker::config::WorkerConfig;
use avatar_worker::Worker;
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;

/// The avatar-edge worker (GPU box side).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML configuration file.
    #[arg(long, short, global = true)]
    config: Option<PathBuf>,
    /// Development defaults: dial a `relay --dev` on 127.0.0.1:4433, loopback ICE candidates.
    #[arg(long)]
    dev: bool,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Prove that everything the configuration needs works here: the encoder and lip-sync model
    /// run (GPU or CPU, with their speed), the VAD and face models load, each configured LLM, TTS
    /// and speech recognition answers one small request and has its API key variable set. Prints
    /// a table and exits non-zero naming what failed.
    #[arg(long)]
    self_test: bool,
    /// Frames per self-test measurement.
    #[arg(long, default_value_t = 250)]
    self_test_frames: usize,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Seconds a draining worker waits for its live sessions to end (SIGTERM; a second SIGTERM
    /// ends them at once). Overrides `drain_timeout_s` (default 4 hours). `--grace-secs`, its
    /// old name, still works.
    #[arg(long = "drain-timeout-s", alias = "grace-secs")]
    drain_timeout_s: Option<u64>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(clap::Subcommand, Debug)]
enum Command {
    /// Work with avatar directories (docs/avatars.md).
    Avatar {
        #[command(subcommand)]
        action: AvatarCommand,
    },
}

#[derive(clap::Subcommand, Debug)]
enum AvatarCommand {
    /// Turn a recording into an avatar directory: the face found and tracked in every frame, a
    /// loop that does not jump, and a preview (preview.png, preview.mp4) to check before going live.
    Prepare(PrepareArgs),
}

#[derive(clap::Args, Debug)]
struct PrepareArgs {
    /// The recording: an MP4, MOV, Matroska (MKV) or WebM file.
    input: PathBuf,
    /// The avatar id pages ask for (`avatar_id`): letters, digits, `-`, `_`.
    #[arg(long)]
    id: String,
    /// The directory to write ID/ into: the worker's `avatar_dir`.
    #[arg(long)]
    out: PathBuf,
    /// The name an avatar chooser shows (default: the id).
    #[arg(long)]
    name: Option<String>,
    /// Output size, WIDTHxHEIGHT, the recording cropped to cover it (default: the recording's
    /// own framing, scaled down past 1280×720 or its equal in area).
    #[arg(long)]
    size: Option<String>,
    /// Frames per second (default: the config's [video] fps, else 25).
    #[arg(long)]
    fps: Option<u32>,
    /// Longest loop kept, in seconds (the worker keeps at most `max_seconds`, 10 by default).
    #[arg(long, default_value_t = 10)]
    max_seconds: u32,
    /// `auto` (a cut where the picture comes back, else pingpong), `forward` or `pingpong`.
    #[arg(long = "loop", default_value = "auto")]
    looping: String,
    /// The CenterFace model (default: $AVATAR_EDGE_FACE_MODEL, the package's, or .tools/models).
    #[arg(long)]
    detector: Option<PathBuf>,
    /// libonnxruntime.so (default: $AVATAR_EDGE_ONNXRUNTIME, the config's talk.lipsync.onnxruntime,
    /// the package's, or .tools/onnxruntime).
    #[arg(long)]
    onnxruntime: Option<PathBuf>,
    /// Threads for face detection.
    #[arg(long, default_value_t = 2)]
    threads: usize,
    /// Replace ID/ if it exists.
    #[arg(long)]
    force: bool,
    /// The largest input picture, in pixels (width × height); larger recordings are refused.
    #[arg(long, default_value_t = avatar_worker::media::avatar::DEFAULT_MAX_INPUT_PIXELS)]
    max_input_pixels: u64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_tracing(args.log_json);
    if let Some(Command::Avatar {
        action: AvatarCommand::Prepare(prepare),
    }) = &args.command
    {
        return prepare_avatar(&args, prepare);
    }
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("worker: bad configuration: {e:#}");
            return std::process::ExitCode::from(64);
        }
    };
    if args.check_config {
        println!("configuration OK");
        return std::process::ExitCode::SUCCESS;
    }
    if args.self_test {
        let options = avatar_worker::selftest::Options {
            frames: args.self_test_frames,
            face_model: self_test_face_model(&config),
        };
        let report = avatar_worker::selftest::run(&config, &options);
        print!("{}", report.render());
        return if report.ok() {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        };
    }
    let drain_limit = Duration::from_secs(args.drain_timeout_s.unwrap_or(config.drain_timeout_s));
    match run(config, drain_limit) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("worker failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

/// `worker avatar prepare`: exit 0 with a summary, 1 when the recording cannot be used, 64 on bad
/// arguments.
fn prepare_avatar(args: &Args, p: &PrepareArgs) -> std::process::ExitCode {
    use avatar_worker::prepare;
    let fail = |code: u8, e: &dyn std::fmt::Display| {
        eprintln!("worker avatar prepare: {e}");
        std::process::ExitCode::from(code)
    };
    let config = match &args.config {
        Some(path) => match WorkerConfig::load(path) {
            Ok(c) => Some(c),
            Err(e) => return fail(64, &format!("loading {}: {e}", path.display())),
        },
        None => None,
    };
    let size = match &p.size {
        None => None,
        Some(size) => match size
            .split_once(['x', 'X', '×'])
            .and_then(|(w, h)| Some((w.parse().ok()?, h.parse().ok()?)))
        {
            Some(wh) => Some(wh),
            None => return fail(64, &format!("--size {size}: expected WIDTHxHEIGHT, e.g. 512x512")),
        },
    };
    let fps = p.fps.unwrap_or_else(|| config.as_ref().map_or(25, |c| c.video.fps));
    let looping = match p.looping.as_str() {
        "auto" => None,
        "forward" => Some(avatar_worker::media::avatar::Looping::Forward),
        "pingpong" => Some(avatar_worker::media::avatar::Looping::Pingpong),
        other => return fail(64, &format!("--loop {other}: expected auto, forward or pingpong")),
    };
    let detector = find_file(&p.detector, FACE_MODEL_ENV, &face_model_candidates());
    let onnxruntime = find_file(
        &p.onnxruntime,
        ONNXRUNTIME_ENV,
        &onnxruntime_candidates(config.as_ref()),
    );
    let options = prepare::Options {
        input: p.input.clone(),
        id: p.id.clone(),
        out: p.out.clone(),
        name: p.name.clone(),
        size,
        fps,
        max_seconds: p.max_seconds,
        looping,
        detector,
        onnxruntime,
        threads: p.threads,
        force: p.force,
        max_input_pixels: p.max_input_pixels,
    };
    let progress = indicatif::ProgressBar::new(0).with_style(
        indicatif::ProgressStyle::with_template("{msg:>18} [{bar:40}] {pos}/{len} frames, {eta} left")
            .unwrap_or_else(|_| indicatif::ProgressStyle::default_bar())
            .progress_chars("=> "),
    );
    match prepare::run(&options, &progress) {
        Ok(report) => {
            print!("{}", report.render());
            println!("preview: {0}/preview.png and {0}/preview.mp4", report.dir.display());
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            progress.abandon();
            let code = match e {
                prepare::PrepareError::BadId(_) | prepare::PrepareError::BadSize { .. } => 64,
                _ => 1,
            };
            fail(code, &e)
        }
    }
}

const FACE_MODEL_ENV: &str = "AVATAR_EDGE_FACE_MODEL";
const ONNXRUNTIME_ENV: &str = "AVATAR_EDGE_ONNXRUNTIME";

/// `lib/` beside `bin/` of the running binary: where the portable tarball keeps its libraries.
fn exe_lib() -> Option<PathBuf> {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().and_then(|bin| bin.parent()).map(|root| root.join("lib")))
}

/// Where a CenterFace model may be: the Debian package's, the tarball's, the checkout's.
fn face_model_candidates() -> Vec<Option<PathBuf>> {
    vec![
        Some(PathBuf::from("/usr/share/avatar-edge/centerface.onnx")),
        exe_lib().map(|l| l.join("centerface.onnx")),
        Some(PathBuf::from(".tools/models/centerface.onnx")),
    ]
}

/// Where ONNX Runtime may be: the config's, the Debian package's, the tarball's, the checkout's.
fn onnxruntime_candidates(config: Option<&WorkerConfig>) -> Vec<Option<PathBuf>> {
    vec![
        config.map(|c| c.talk.lipsync.onnxruntime.clone()),
        Some(PathBuf::from("/usr/lib/avatar-edge/libonnxruntime.so")),
        exe_lib().map(|l| l.join("libonnxruntime.so")),
        Some(PathBuf::from(".tools/onnxruntime/libonnxruntime.so")),
    ]
}

/// The flag, else the environment (as for the worker itself), else the first of `candidates`
/// that exists, else the first of them (for the error to name).
fn find_file(flag: &Option<PathBuf>, env: &str, candidates: &[Option<PathBuf>]) -> PathBuf {
    flag.clone()
        .or_else(|| std::env::var_os(env).map(PathBuf::from))
        .or_else(|| candidates.iter().flatten().find(|c| c.is_file()).cloned())
        .or_else(|| candidates.iter().flatten().next().cloned())
        .unwrap_or_default()
}

/// The face model `worker avatar prepare` would use here, for the self-test to load: the one
/// `AVATAR_EDGE_FACE_MODEL` names (missing or not), else the first installed one; none when
/// this box has none (the worker does not need one to serve).
fn self_test_face_model(config: &WorkerConfig) -> Option<avatar_worker::selftest::FaceModel> {
    let model = std::env::var_os(FACE_MODEL_ENV)
        .map(PathBuf::from)
        .or_else(|| face_model_candidates().into_iter().flatten().find(|c| c.is_file()))?;
    let onnxruntime = find_file(&None, ONNXRUNTIME_ENV, &onnxruntime_candidates(Some(config)));
    Some(avatar_worker::selftest::FaceModel { model, onnxruntime })
}

fn load_config(args: &Args) -> anyhow::Result<WorkerConfig> {
    let mut config = match (&args.config, args.dev) {
        (Some(path), _) => WorkerConfig::load(path).with_context(|| format!("loading {}", path.display()))?,
        (None, true) => WorkerConfig::dev(),
        (None, false) => anyhow::bail!("pass --config FILE, or --dev for local development"),
    };
    config.apply_env()?;
    config.validate()?;
    Ok(config)
}

#[tokio::main]
async fn run(config: WorkerConfig, drain_limit: Duration) -> anyhow::Result<()> {
    if let Some(addr) = config.metrics_listen {
        metrics_exporter_prometheus::PrometheusBuilder::new()
            .with_http_listener(addr)
            .install()
            .with_context(|| format!("serving metrics on {addr}"))?;
    }
    let worker_id = config.worker_id.clone();
    let relays: Vec<String> = config.relays.iter().map(|r| r.address.clone()).collect();
    let worker = tokio::task::spawn_blocking(move || Worker::new(config)).await??;
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        %worker_id,
        ?relays,
        encoder = worker.context().encoder,
        capacity = worker.context().config.capacity,
        metrics = ?worker.context().config.metrics_listen,
        "worker started"
    );
    // The first SIGTERM (or Ctrl-C) drains, the second ends the sessions that are left.
    let stop = avatar_worker::Stop::default();
    let trigger = stop.clone();
    // Listening from here on, so a second signal right after the first is not lost.
    let mut signals = StopSignals::new();
    tokio::spawn(async move {
        signals.next().await;
        tracing::info!("stop requested: draining");
        trigger.drain.cancel();
        signals.next().await;
        tracing::info!("second stop signal: ending the sessions that are left");
        trigger.end.cancel();
    });
    worker.run(stop, drain_limit).await;
    tracing::info!("clean shutdown");
    Ok(())
}

/// SIGTERM and SIGINT (Ctrl-C), each delivery counted from the moment this is made.
struct StopSignals {
    term: Option<tokio::signal::unix::Signal>,
    int: Option<tokio::signal::unix::Signal>,
}

impl StopSignals {
    fn new() -> Self {
        use tokio::signal::unix::{signal, SignalKind};
        Self {
            term: signal(SignalKind::terminate()).ok(),
            int: signal(SignalKind::interrupt()).ok(),
        }
    }

    /// The next SIGTERM or SIGINT.
    async fn next(&mut self) {
        async fn recv(s: &mut Option<tokio::signal::unix::Signal>) {
            match s {
                Some(s) => {
                    if s.recv().await.is_none() {
                        std::future::pending::<()>().await;
                    }
                }
                None => std::future::pending().await,
            }
        }
        tokio::select! {
            _ = recv(&mut self.term) => {}
            _ = recv(&mut self.int) => {}
        }
    }
}

fn init_tracing(json: bool) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,webrtc=warn,webrtc_ice=warn,quinn=warn"));
    // Whatever RUST_LOG says: HTTP/2 frames to the LLM and TTS services carry their API keys.
    if let Ok(directive) = "h2=info".parse() {
        filter = filter.add_directive(directive);
    }
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder.json().init();
    } else {
        builder.init();
    }
}
