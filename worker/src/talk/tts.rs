//! The speech stage: one sentence in, PCM out.
//!
//! * [`EspeakTts`]: built in, runs the `espeak-ng` program (installed by the scripts) with the text
//!   on standard input (never on the command line), reading the WAV it writes to standard output.
//!   Voices are espeak-ng's: `en-us`, `cmn` (Mandarin), …
//! * [`OpenAiTts`]: any OpenAI-compatible `POST {base_url}/audio/speech` (`model`, `input`, `voice`,
//!   `response_format: "wav"`).
//!
//! Both are bounded by a timeout, and a cancelled answer kills the espeak-ng process.

use super::audio::{decode_wav, Pcm};
use super::llm::{fetch, snippet};
use super::TalkError;
use futures::future::BoxFuture;
use std::time::Duration;
use tokio::io::AsyncWriteExt;

pub trait Tts: Send + Sync {
    fn name(&self) -> String;
    fn synthesize<'a>(&'a self, text: &'a str, voice: &'a str) -> BoxFuture<'a, Result<Pcm, TalkError>>;
}

/// Is `voice` a plain voice name (no options smuggled in)?
pub fn valid_voice(voice: &str) -> bool {
    !voice.is_empty()
        && voice.len() <= 64
        && voice.chars().all(|c| c.is_ascii_alphanumeric() || "-_+.".contains(c))
        && !voice.starts_with('-')
}

/// The portable tarball carries its own espeak-ng beside the worker: `libexec/espeak-ng` with its
/// voices in `share/espeak-ng-data` (docs/deploy.md, "Portable tarballs"). With the default
/// program name and such a bundle next to the running binary (`bin/worker`), that copy runs, told
/// where its data is; any other name, or no bundle, runs the program from `PATH`.
fn espeak_command(program: &str) -> tokio::process::Command {
    let bundled = std::env::current_exe()
        .ok()
        .and_then(|exe| bundled_espeak(&exe, program));
    match bundled {
        Some((binary, data)) => {
            let mut cmd = tokio::process::Command::new(binary);
            cmd.env("ESPEAK_DATA_PATH", data);
            cmd
        }
        None => tokio::process::Command::new(program),
    }
}

/// The bundled espeak-ng for a worker binary at `exe`, and the directory that holds its
/// `espeak-ng-data`, when `program` is the default and the bundle is complete.
fn bundled_espeak(exe: &std::path::Path, program: &str) -> Option<(std::path::PathBuf, std::path::PathBuf)> {
    if program != "espeak-ng" {
        return None;
    }
    let prefix = exe.parent()?.parent()?;
    let (binary, data) = (prefix.join("libexec/espeak-ng"), prefix.join("share"));
    (binary.is_file() && data.join("espeak-ng-data").is_dir()).then_some((binary, data))
}

pub struct EspeakTts {
    pub program: String,
    /// Words per minute.
    pub speed: u32,
    pub timeout: Duration,
}

impl Tts for EspeakTts {
    fn name(&self) -> String {
        "espeak-ng".into()
    }

    fn synthesize<'a>(&'a self, text: &'a str, voice: &'a str) -> BoxFuture<'a, Result<Pcm, TalkError>> {
        Box::pin(async move {
            if !valid_voice(voice) {
                return Err(TalkError::Tts(format!("invalid voice name {voice:?}")));
            }
            let mut child = espeak_command(&self.program)
                .args(["--stdout", "-b", "1", "-v", voice, "-s", &self.speed.to_string()])
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .kill_on_drop(true)
                .spawn()
                .map_err(|e| {
                    TalkError::Tts(format!(
                        "cannot run {}: {e} (scripts/install-deps installs espeak-ng)",
                        self.program
                    ))
                })?;
            if let Some(mut stdin) = child.stdin.take() {
                // `-b 1`: the input is UTF-8. A newline-free line keeps it one utterance.
                let line = text.replace(['\n', '\r'], " ");
                stdin
                    .write_all(line.as_bytes())
                    .await
                    .map_err(|e| TalkError::Tts(format!("espeak-ng stdin: {e}")))?;
            }
            let output = tokio::time::timeout(self.timeout, child.wait_with_output())
                .await
                .map_err(|_| TalkError::Timeout("espeak-ng took too long"))?
                .map_err(|e| TalkError::Tts(format!("espeak-ng: {e}")))?;
            if !output.status.success() {
                return Err(TalkError::Tts(format!(
                    "espeak-ng failed ({}): {}",
                    output.status,
                    snippet(&String::from_utf8_lossy(&output.stderr))
                )));
            }
            decode_wav(&output.stdout).map_err(|e| TalkError::Tts(format!("espeak-ng output: {e}")))
        })
    }
}

/// Largest audio answer accepted for one sentence (about 10 minutes of 24 kHz 16-bit speech).
pub const MAX_AUDIO_BYTES: usize = 32 * 1024 * 1024;

pub struct OpenAiTts {
    pub client: reqwest::Client,
    pub base_url: String,
    pub model: String,
    pub api_key: Option<String>,
    pub timeout: Duration,
}

impl Tts for OpenAiTts {
    fn name(&self) -> String {
        format!("openai:{} at {}", self.model, self.base_url)
    }

    fn synthesize<'a>(&'a self, text: &'a str, voice: &'a str) -> BoxFuture<'a, Result<Pcm, TalkError>> {
        Box::pin(async move {
            let url = format!("{}/audio/speech", self.base_url.trim_end_matches('/'));
            let body = serde_json::json!({
                "model": self.model, "input": text, "voice": voice, "response_format": "wav",
            });
            let mut req = self.client.post(&url).json(&body);
            if let Some(key) = &self.api_key {
                req = req.bearer_auth(key);
            }
            let work = async {
                let bytes = fetch(req, MAX_AUDIO_BYTES, "the audio").await.map_err(TalkError::Tts)?;
                decode_wav(&bytes).map_err(|e| TalkError::Tts(format!("the speech server's audio: {e}")))
            };
            tokio::time::timeout(self.timeout, work)
                .await
                .map_err(|_| TalkError::Timeout("the speech server took too long"))?
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn voice_names_cannot_carry_options() {
        assert!(valid_voice("en-us") && valid_voice("cmn") && valid_voice("alloy"));
        assert!(!valid_voice("--stdout") && !valid_voice("en us") && !valid_voice("") && !valid_voice("a;b"));
    }

    #[test]
    fn the_bundled_espeak_is_used_only_for_the_default_name_and_a_complete_bundle() {
        let dir = std::env::temp_dir().join(format!("espeak-bundle-{}", std::process::id()));
        let exe = dir.join("bin/worker");
        assert_eq!(bundled_espeak(&exe, "espeak-ng"), None, "no bundle");
        std::fs::create_dir_all(dir.join("libexec")).expect("mkdir");
        std::fs::write(dir.join("libexec/espeak-ng"), b"").expect("write");
        assert_eq!(bundled_espeak(&exe, "espeak-ng"), None, "a binary without its voices");
        std::fs::create_dir_all(dir.join("share/espeak-ng-data")).expect("mkdir");
        assert_eq!(
            bundled_espeak(&exe, "espeak-ng"),
            Some((dir.join("libexec/espeak-ng"), dir.join("share")))
        );
        assert_eq!(
            bundled_espeak(&exe, "/usr/bin/espeak-ng"),
            None,
            "an operator's own choice"
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn espeak_speaks_english_and_chinese() {
        let tts = EspeakTts {
            program: "espeak-ng".into(),
            speed: 175,
            timeout: Duration::from_secs(20),
        };
        for (voice, text) in [
            ("en-us", "Hello there, how are you?"),
            ("cmn", "你好，今天我们学习数学。"),
        ] {
            let pcm = tts
                .synthesize(text, voice)
                .await
                .expect("espeak-ng (scripts/install-deps)");
            assert_eq!(pcm.rate, 22_050);
            assert!(pcm.seconds() > 0.8, "{voice}: {} s", pcm.seconds());
            assert!(super::super::audio::rms(&pcm.samples) > 0.02, "{voice}: audible");
        }
        let err = tts.synthesize("hi", "-x").await.expect_err("bad voice");
        assert!(err.to_string().contains("invalid voice"), "{err}");
    }
}
