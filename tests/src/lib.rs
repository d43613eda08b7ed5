//! Test harness for avatar-edge: real processes, real sockets, real browsers.
//!
//! * [`netns`] runs each end-to-end test inside a fresh network namespace that holds only
//!   loopback, so every packet of every test stays on this machine.
//! * [`cluster`] starts the real `relay` and `worker` binaries with generated configs.
//! * [`signaling`] is a WebSocket client speaking the customer's JSON.
//! * [`rtc_client`] is a Rust WebRTC receiver that depacketises and decodes the H.264 it gets.
//! * [`cdp`] drives headless Chromium over the DevTools protocol.
//! * [`customer_site`] is the customer's own web site (the design notes' page, a page on the SDK)
//!   on its own origin, and times connect → first frame on it in a fresh Chromium.
//! * [`asr`] runs the demo's offline speech recognition and speaks questions for fake microphones.
//! * [`debian`] makes fresh Debian 12 machines, installs the release's packages and starts
//!   their systemd units, for the deploy tests.

pub mod asr;
pub mod avatars;
pub mod cdp;
pub mod cluster;
pub mod customer_site;
pub mod debian;
pub mod netns;
pub mod openai;
pub mod rtc_client;
pub mod signaling;
pub mod slow_link;
pub mod topology;
pub mod turnutils;
pub mod webhook_receiver;

/// Where `cargo build --release` put the workspace binaries: next to this test executable's
/// `deps/` directory.
pub fn bin_path(name: &str) -> std::path::PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let mut dir = exe.parent().expect("exe dir").to_path_buf();
    if dir.ends_with("deps") {
        dir.pop();
    }
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built: run `cargo build --release --workspace` first",
        path.display()
    );
    path
}

/// A compiled policy module from `scripts/build-policies` (`wasm-policies/dist/<name>.wasm`).
pub fn policy_module(name: &str) -> std::path::PathBuf {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../wasm-policies/dist")
        .join(format!("{name}.wasm"));
    assert!(
        path.exists(),
        "{} is missing: run scripts/build-policies (scripts/test does)",
        path.display()
    );
    path
}

/// A token for the `hmac-token` example policy: `<user>.<expiry>.<base64url HMAC-SHA256>`.
pub fn hmac_token(secret: &str, user: &str, expiry_unix_s: u64) -> String {
    use base64::Engine as _;
    use hmac::Mac;
    let mut mac = hmac::Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes()).expect("any key length");
    mac.update(format!("{user}.{expiry_unix_s}").as_bytes());
    let sig = base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(mac.finalize().into_bytes());
    format!("{user}.{expiry_unix_s}.{sig}")
}

/// The `p`-th percentile (0–100) of `sorted` values, nearest rank; NaN when empty. For the
/// benchmarks' tables.
pub fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    let idx = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// Play a session on an open signaling socket: offer, answer, and wait for ICE to connect.
pub async fn play(sig: &mut signaling::Signaling, avatar: &str) -> anyhow::Result<rtc_client::RtcClient> {
    let client = rtc_client::RtcClient::new(true).await?;
    connect(sig, &client, avatar).await?;
    Ok(client)
}

/// As [`play`], with a microphone the worker hears (voice input).
pub async fn play_with_microphone(
    sig: &mut signaling::Signaling,
    avatar: &str,
) -> anyhow::Result<(rtc_client::RtcClient, rtc_client::Microphone)> {
    let (client, mic) = rtc_client::RtcClient::with_microphone().await?;
    connect(sig, &client, avatar).await?;
    Ok((client, mic))
}

/// Offer `client`'s peer for `avatar`, take the answer and wait until ICE connects.
async fn connect(sig: &mut signaling::Signaling, client: &rtc_client::RtcClient, avatar: &str) -> anyhow::Result<()> {
    use std::time::Duration;
    sig.send_offer(&client.offer().await?, avatar).await?;
    let answer = sig.wait_for("webrtc_answer", Duration::from_secs(10)).await?;
    let sdp = answer["sdp"]
        .as_str()
        .ok_or_else(|| anyhow::anyhow!("answer without sdp: {answer}"))?;
    client.accept_answer(sdp).await?;
    client.connected(Duration::from_secs(10)).await?;
    Ok(())
}

/// Log to stderr for test debugging (RUST_LOG controls it).
pub fn init_logging() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .with_test_writer()
        .try_init();
}
