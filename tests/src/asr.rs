//! Voice-input helpers: the demo's offline speech recognition as a child process, and spoken
//! questions for fake microphones.
//!
//! [`AsrServer`] runs `scripts/asr-server.py` (faster-whisper with the Whisper base model, both
//! installed into `.tools/asr` by `scripts/install-deps`) on a free loopback port: a real
//! recogniser speaking the OpenAI transcription protocol, as `scripts/demo` starts it.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..")
}

pub struct AsrServer {
    pub addr: SocketAddr,
    child: Child,
    pub log: PathBuf,
}

impl Drop for AsrServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl AsrServer {
    /// Start it and wait until it answers `/health` (loading the model takes about a second).
    pub async fn start(log_dir: &Path) -> Self {
        let port = crate::turnutils::free_port("127.0.0.1");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        let python = root().join(".tools/asr/bin/python");
        let log = log_dir.join("asr-server.log");
        let out = std::fs::File::create(&log).expect("asr log");
        let child = Command::new(&python)
            .arg(root().join("scripts/asr-server.py"))
            .args(["--listen", &addr.to_string()])
            .stdin(Stdio::null())
            .stdout(out.try_clone().expect("log"))
            .stderr(out)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e} (run scripts/install-deps)", python.display()));
        let server = Self { addr, child, log };
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Ok((200, _)) = crate::cluster::http_get(addr, "/health").await {
                return server;
            }
            assert!(
                Instant::now() < deadline,
                "the ASR server did not start: {}",
                crate::cluster::log_text(&server.log)
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }
}

/// `text` spoken by espeak-ng (`voice`, 150 words a minute), mono, at `rate`.
pub fn speak(voice: &str, text: &str, rate: u32) -> Vec<f32> {
    let out = Command::new("espeak-ng")
        .args(["--stdout", "-b", "1", "-s", "150", "-v", voice, text])
        .output()
        .expect("espeak-ng (scripts/install-deps)");
    assert!(
        out.status.success(),
        "espeak-ng: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let pcm = avatar_worker::talk::audio::decode_wav(&out.stdout).expect("espeak's WAV");
    avatar_worker::talk::audio::resample(&pcm, rate).expect("resample")
}

/// A 16-bit mono WAV file of `pcm` at `rate`, with `before` and `after` seconds of silence.
pub fn write_wav(path: &Path, pcm: &[f32], rate: u32, before: f32, after: f32) {
    let mut all = vec![0.0; (before * rate as f32) as usize];
    all.extend_from_slice(pcm);
    all.extend(std::iter::repeat_n(0.0, (after * rate as f32) as usize));
    let bytes = avatar_worker::talk::asr::wav_bytes(&all, rate).expect("wav");
    std::fs::write(path, bytes).expect("write wav");
}
