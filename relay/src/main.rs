//! `relay`: parse the config, bind, serve until Ctrl-C or SIGTERM, shut down cleanly.

use anyhow::Context;
use avatar_relay::config::RelayConfig;
use avatar_relay::{Relay, RelayError};
use clap::Parser;
use std::path::PathBuf;
use tokio_util::sync::CancellationToken;

/// The avatar-edge relay (public VPS side).
#[derive(Parser, Debug)]
#[command(version, about)]
struct Args {
    /// TOML configuration file.
    #[arg(long, short)]
    config: Option<PathBuf>,
    /// Development defaults: HTTP on 127.0.0.1:8080, tunnel on 127.0.0.1:4433, self-signed
    /// certificate, a well-known tunnel secret. Never expose a dev relay to a network.
    #[arg(long)]
    dev: bool,
    /// Check the configuration and exit.
    #[arg(long)]
    check_config: bool,
    /// Log as JSON lines instead of text.
    #[arg(long)]
    log_json: bool,
    /// Once bound, write `{"http": ADDR, "tunnel": ADDR, "fingerprint": HEX}` here (for
    /// supervisors and tests that bind port 0).
    #[arg(long)]
    ready_file: Option<PathBuf>,
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    init_tracing(args.log_json);
    let config = match load_config(&args) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("relay: bad configuration: {e:#}");
            // EX_CONFIG-style exit before any port is bound.
            return std::process::ExitCode::from(64);
        }
    };
    if args.check_config {
        // What the file points at too: certificate and key, policy modules, writable folders.
        return match avatar_relay::check::check(&config, std::time::SystemTime::now()) {
            Ok(report) => {
                for line in report {
                    println!("{line}");
                }
                println!("configuration OK");
                std::process::ExitCode::SUCCESS
            }
            Err(e) => {
                eprintln!("relay: bad configuration: {e}");
                std::process::ExitCode::from(64)
            }
        };
    }
    match run(config, args.ready_file, args.config.clone()) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            tracing::error!("relay failed: {e:#}");
            let bad_config = matches!(
                e.downcast_ref::<RelayError>(),
                Some(RelayError::Config(_) | RelayError::Policy(_))
            );
            std::process::ExitCode::from(if bad_config { 64 } else { 1 })
        }
    }
}

fn load_config(args: &Args) -> anyhow::Result<RelayConfig> {
    match (&args.config, args.dev) {
        (Some(path), _) => read_config(path),
        (None, true) => {
            let mut config = RelayConfig::dev();
            config.apply_env()?;
            config.validate()?;
            Ok(config)
        }
        (None, false) => anyhow::bail!("pass --config FILE, or --dev for local development"),
    }
}

/// The file, with the environment's overrides, validated: at start and on each reload.
fn read_config(path: &std::path::Path) -> anyhow::Result<RelayConfig> {
    let mut config = RelayConfig::load(path).with_context(|| format!("loading {}", path.display()))?;
    config.apply_env()?;
    config.validate()?;
    Ok(config)
}

#[tokio::main]
async fn run(config: RelayConfig, ready_file: Option<PathBuf>, config_file: Option<PathBuf>) -> anyhow::Result<()> {
    let shutdown = CancellationToken::new();
    let metrics = avatar_relay::metrics::install().context("installing the metrics recorder")?;
    let relay = Relay::bind_with_metrics(config, shutdown.clone(), Some(metrics))?;
    // SIGHUP (`systemctl reload`): the certificates and policy modules reload themselves; here
    // the config file's reloadable settings (`avatar_relay::Live`, and `[[webhooks]]`). A broken
    // edit changes nothing. Without a handler, SIGHUP's default action would kill the relay.
    #[cfg(unix)]
    if let Ok(mut hup) = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()) {
        let state = std::sync::Arc::clone(relay.state());
        tokio::spawn(async move {
            while hup.recv().await.is_some() {
                let Some(path) = &config_file else {
                    tracing::info!("SIGHUP: no config file to re-read (--dev)");
                    continue;
                };
                match read_config(path) {
                    Ok(new) => {
                        let done = state.reload(&new);
                        tracing::info!(changed = ?done.changed, "SIGHUP: configuration reloaded");
                        for why in &done.failed {
                            tracing::error!(config = %path.display(), "SIGHUP: {why}");
                        }
                        if done.restart_needed {
                            tracing::warn!(
                                config = %path.display(),
                                "SIGHUP: other settings changed too; they apply at the next restart (docs/deploy.md)"
                            );
                        }
                    }
                    Err(e) => tracing::error!("SIGHUP: {e:#}; the running settings stay"),
                }
            }
        });
    }
    if let Some(path) = ready_file {
        let ready = serde_json::json!({
            "http": relay.http_addr().to_string(),
            "tunnel": relay.tunnel_addr().to_string(),
            "fingerprint": relay.fingerprint(),
            "turn_udp": relay.turn().and_then(|t| t.udp_addr()).map(|a| a.to_string()),
            "turn_tcp": relay.turn().and_then(|t| t.tcp_addr()).map(|a| a.to_string()),
            "turn_tls": relay.turn().and_then(|t| t.tls_addr()).map(|a| a.to_string()),
        });
        // Write then rename, so a reader never sees half a file.
        let tmp = path.with_extension("tmp");
        std::fs::write(&tmp, ready.to_string()).with_context(|| format!("writing {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
    }
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        http = %relay.http_addr(),
        tunnel = %relay.tunnel_addr(),
        tls_fingerprint = %relay.fingerprint(),
        "relay listening"
    );
    if let Some(t) = relay.turn() {
        tracing::info!(udp = ?t.udp_addr(), tcp = ?t.tcp_addr(), tls = ?t.tls_addr(), "embedded TURN listening");
    }
    if relay.open_to_anyone() {
        tracing::warn!(
            http = %relay.http_addr(),
            "no auth policy: anyone who finds this address can start sessions and spend your GPUs and LLM/TTS keys. \
             Switch on the shipped token policy ([policies.auth], docs/deploy.md, \"Restrict access\")"
        );
    }
    tokio::spawn(async move {
        wait_for_signal().await;
        tracing::info!("shutdown requested");
        shutdown.cancel();
    });
    relay.run().await?;
    tracing::info!("clean shutdown");
    Ok(())
}

async fn wait_for_signal() {
    let ctrl_c = tokio::signal::ctrl_c();
    #[cfg(unix)]
    {
        use tokio::signal::unix::{signal, SignalKind};
        match signal(SignalKind::terminate()) {
            Ok(mut term) => {
                tokio::select! { _ = ctrl_c => {}, _ = term.recv() => {} }
            }
            Err(_) => {
                let _ = ctrl_c.await;
            }
        }
    }
    #[cfg(not(unix))]
    let _ = ctrl_c.await;
}

fn init_tracing(json: bool) {
    let mut filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,webrtc=warn,quinn=warn"));
    // Whatever RUST_LOG says: these libraries log whole messages (signaling bodies with TURN
    // credentials, HTTP/2 headers) at debug and trace, and message bodies never reach the logs.
    for quiet in avatar_relay::QUIET_LOG_TARGETS {
        if let Ok(directive) = quiet.parse() {
            filter = filter.add_directive(directive);
        }
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
