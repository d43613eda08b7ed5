//! `worker`: parse the config, start up, keep tunnels to the relays until Ctrl-C or SIGTERM.

use anyhow::Context as _;
use avatar_worker::config::WorkerConfig;
use avatar_worker::Worker;
use clap::Parser;
use std::path::PathBuf;
use std::time::Duration;
use tokio_util::sync::CancellationToken;

/// The avatar-edge worker (GPU box side).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Development defaults: dial a `relay --dev` on 127.0.0.1:4433, loopback ICE candidates.
    #[arg(long)]
    dev: bool,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Prove the configured encoder and lip-sync model run here (GPU or CPU), print a table of
    /// their speed, and exit (non-zero if any failed).
    #[arg(long)]
    self_test: bool,
    /// Frames per self-test measurement.
    #[arg(long, default_value_t = 250)]
    self_test_frames: usize,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Seconds sessions get to finish on shutdown.
    #[arg(long, default_value_t = 3)]
    grace_secs: u64,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_tracing(args.log_json);
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
        let report = avatar_worker::selftest::run(&config, args.self_test_frames);
        print!("{}", report.render());
        return if report.ok() {
            std::process::ExitCode::SUCCESS
        } else {
            std::process::ExitCode::FAILURE
        };
    }
    match run(config, Duration::from_secs(args.grace_secs)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("worker failed: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
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
async fn run(config: WorkerConfig, grace: Duration) -> anyhow::Result<()> {
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
    let shutdown = CancellationToken::new();
    let trigger = shutdown.clone();
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        trigger.cancel();
    });
    worker.run(shutdown, grace).await;
    tracing::info!("clean shutdown");
    Ok(())
}

async fn wait_for_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let ctrl_c = tokio::signal::ctrl_c();
    match signal(SignalKind::terminate()) {
        Ok(mut term) => {
            tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
        }
        Err(_) => {
            let _ = ctrl_c.await;
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
