//! The worker's configuration: one TOML file, every key optional except what `validate` demands,
//! unknown keys rejected. Secrets can come from `AVATAR_EDGE_TUNNEL_SECRET` instead of the file;
//! `AVATAR_EDGE_ONNXRUNTIME` and `AVATAR_EDGE_LIPSYNC_MODEL` point the lip-sync stage at ONNX
//! Runtime and a model without a file (the demo uses them with `--dev`).

use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::PathBuf;

/// A secret string that never appears in logs or `Debug` output.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

/// Serialized (the configuration reference test walks the keys) as `***`, never the value.
impl Serialize for Secret {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(if self.0.is_empty() { "" } else { "***" })
    }
}

impl Secret {
    pub fn new(s: impl Into<String>) -> Self {
        Self(s.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// Secret used by `--dev` on both binaries (same value as the relay's).
pub use avatar_proto::tunnel::DEV_SECRET as DEV_TUNNEL_SECRET;

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// This worker's id at the relay; a reconnect under the same id replaces the old entry.
    /// Overridden by `AVATAR_EDGE_WORKER_ID` (the unit template sets it per GPU).
    pub worker_id: String,
    /// Sessions this worker runs at once.
    pub capacity: u32,
    /// On SIGTERM the worker drains: it takes no new session and waits this long at most for its
    /// live ones to end, then ends what is left (a second SIGTERM ends them at once). Default:
    /// 4 hours, the relay's longest session (`limits.max_session_ms`).
    pub drain_timeout_s: u64,
    /// Shared tunnel secret. Overridden by `AVATAR_EDGE_TUNNEL_SECRET`.
    pub secret: Secret,
    /// Read the secret from this file instead (its first line: a copy of the relay's
    /// `/etc/avatar-edge/tunnel.secret`). `AVATAR_EDGE_TUNNEL_SECRET` still wins.
    pub secret_file: Option<PathBuf>,
    /// Relays to keep a tunnel to.
    pub relays: Vec<RelayTarget>,
    /// How the tunnels travel: QUIC, or TLS over TCP where UDP is blocked.
    pub tunnel: TunnelSettings,
    pub ice: IceConfig,
    pub video: VideoConfig,
    /// Directory of avatars (`<id>/avatar.toml` + video). Unset: the built-in synthetic avatar.
    pub avatar_dir: Option<PathBuf>,
    /// Labels sent to the relay at registration (for routing policies).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Serve Prometheus metrics at `http://<this address>/metrics`. Unset: no listener.
    pub metrics_listen: Option<std::net::SocketAddr>,
    /// The talking pipeline: language model, speech, lip-sync.
    pub talk: TalkConfig,
    /// `[transcripts]`: how long the session API can read a session's transcript after it ends.
    pub transcripts: crate::transcript::TranscriptsConfig,
    /// `[recording]`: record every session, as the browser received it (off by default).
    pub recording: RecordingConfig,
    /// Keys whose value is still a shipped `REQUIRED` placeholder (see `avatar_proto::required`).
    #[serde(skip)]
    pub unset_required: Vec<String>,
}

/// `[recording]`: each session's media, as its browser received it, in a fragmented MP4
/// ([`crate::media::record`]): `<dir>/<session id>-<unix seconds>.mp4`, announced to the relay's
/// `recording.ready` webhook when complete, deleted after `retention_days`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct RecordingConfig {
    /// Record every session.
    pub enabled: bool,
    /// Where the files go (created at start).
    pub dir: PathBuf,
    /// Recordings older than this many days are deleted (checked hourly); 0 keeps them.
    pub retention_days: u32,
    /// Packets the recorder may fall behind the session (about 75 a second) before it loses
    /// some; the session never waits for it.
    pub buffer_packets: usize,
    /// A session is not recorded (and the skip counted) while the folder's disk has less than
    /// this many MB free: recordings must not fill the GPU box.
    pub min_free_mb: u64,
}

impl Default for RecordingConfig {
    fn default() -> Self {
        Self {
            enabled: false,
            dir: PathBuf::from("/var/lib/avatar-edge/recordings"),
            retention_days: 30,
            buffer_packets: 512,
            min_free_mb: 2048,
        }
    }
}

/// A closed set of names in the config: parsed by serde (an unknown one is refused with the valid
/// ones listed), printed as written.
macro_rules! config_names {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $text:literal),+ $(,)? }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize, Serialize)]
        pub enum $name {
            $($(#[$vdoc])* #[serde(rename = $text)] $variant),+
        }

        impl $name {
            pub fn as_str(self) -> &'static str {
                match self {
                    $(Self::$variant => $text),+
                }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str(self.as_str())
            }
        }
    };
}

config_names! {
    /// `tunnel.transport`.
    TunnelTransport {
        /// QUIC first; TLS/TCP when QUIC cannot connect, and back to QUIC once it can.
        Auto = "auto",
        /// QUIC only (UDP to the relay's tunnel port).
        Quic = "quic",
        /// TLS over TCP only (the relay's HTTPS port).
        Tcp = "tcp",
    }
}

/// `[tunnel]`: the transport of the tunnels to the relays.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TunnelSettings {
    /// `auto` (default), `quic` or `tcp`.
    pub transport: TunnelTransport,
    /// With `auto`: how long a QUIC attempt may take before the worker tries TLS/TCP.
    pub quic_timeout_ms: u64,
    /// With `auto`, while on TLS/TCP: how often to try QUIC again. When it connects, new sessions
    /// go over QUIC at once and the TCP tunnel closes after its last session.
    pub quic_probe_interval_s: u64,
    /// Send the sessions' TURN through the tunnel on QUIC too (a network that lets UDP out only
    /// to the relay's tunnel port). On TLS/TCP it always goes through the tunnel.
    pub turn_via_quic: bool,
}

impl Default for TunnelSettings {
    fn default() -> Self {
        Self {
            transport: TunnelTransport::Auto,
            quic_timeout_ms: 2000,
            quic_probe_interval_s: 30,
            turn_via_quic: false,
        }
    }
}

config_names! {
    /// `video.encoder`.
    VideoEncoder {
        /// `h264_nvenc` if it opens, else `libx264` (logged loudly).
        Auto = "auto",
        H264Nvenc = "h264_nvenc",
        Libx264 = "libx264",
    }
}

config_names! {
    /// `talk.llm.backend`.
    LlmBackend {
        /// Offline canned answers (no service).
        Scripted = "scripted",
        /// An OpenAI-compatible chat completions endpoint.
        Openai = "openai",
    }
}

config_names! {
    /// `talk.tts.backend`.
    TtsBackend {
        /// The espeak-ng program.
        Espeak = "espeak",
        /// An OpenAI-compatible speech endpoint.
        Openai = "openai",
    }
}

config_names! {
    /// `talk.lipsync.backend`.
    LipSyncBackend {
        /// A drawn mouth driven by the audio level (no model).
        Builtin = "builtin",
        /// A Wav2Lip-contract ONNX model.
        Onnx = "onnx",
    }
}

config_names! {
    /// `talk.lipsync.execution_provider`.
    ExecutionProvider {
        Cpu = "cpu",
        Cuda = "cuda",
    }
}

/// `[talk]`: what answers a `text_webrtc`. Every backend has a built-in default that needs no
/// service, so a worker with no `[talk]` section talks (scripted answers, espeak-ng, the built-in
/// mouth).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TalkConfig {
    /// `false`: `text_webrtc` is answered with `unsupported`; the idle avatar still streams.
    pub enabled: bool,
    /// System prompt for the language model (per avatar: `[talk.avatars.<id>]`).
    pub system_prompt: String,
    /// TTS voice. Unset: `en-us`, or `cmn` when the answer is Chinese (espeak-ng voice names;
    /// for an OpenAI-compatible server e.g. `alloy`).
    pub voice: Option<String>,
    /// Earlier exchanges sent along with each message (0: none).
    pub history: usize,
    pub llm: LlmConfig,
    pub tts: TtsConfig,
    pub lipsync: LipSyncConfig,
    /// Voice input: hearing the user's microphone (voice activity and barge-in).
    pub vad: VadConfig,
    /// Voice input: speech recognition.
    pub asr: AsrConfig,
    /// What one session may ask of the backends, and requests in flight per backend.
    pub limits: TalkLimits,
    /// Per-avatar overrides, by avatar id.
    pub avatars: std::collections::BTreeMap<String, AvatarTalkConfig>,
}

#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct AvatarTalkConfig {
    pub system_prompt: Option<String>,
    pub voice: Option<String>,
    pub llm: Option<LlmConfig>,
    pub tts: Option<TtsConfig>,
    /// The language the user speaks to this avatar (`en`, `zh`, …), for speech recognition.
    /// Unset: `talk.asr.language`.
    pub language: Option<String>,
}

/// `[talk.limits]`: what one browser session may spend of the backends, and how many requests
/// all sessions together may have in flight to each (see `talk::limits`).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TalkLimits {
    /// Turns (typed messages and transcripts) one session may start per minute; more get
    /// `rate_limited`. 0: no limit.
    pub turns_per_minute: u32,
    /// Turns one session may start at once before `turns_per_minute` applies.
    pub turn_burst: u32,
    /// Longest message or transcript, in characters; longer ones get `message_too_long`.
    pub max_message_chars: usize,
    /// Most bytes of earlier exchanges sent with a message; the oldest go first. The system
    /// prompt is always sent and not counted.
    pub history_bytes: usize,
    /// Requests in flight to the language models, all sessions together.
    pub llm_requests: usize,
    /// Requests in flight to the speech (TTS) backends, all sessions together.
    pub tts_requests: usize,
    /// Requests in flight to speech recognition, all sessions together.
    pub asr_requests: usize,
    /// Longest wait for a free request slot; then the answer fails with `talk_failed`.
    pub slot_wait_ms: u64,
}

impl Default for TalkLimits {
    fn default() -> Self {
        Self {
            turns_per_minute: 60,
            turn_burst: 3,
            max_message_chars: 2000,
            history_bytes: 16_384,
            llm_requests: 16,
            tts_requests: 16,
            asr_requests: 8,
            slot_wait_ms: 20_000,
        }
    }
}

/// `[talk.vad]`: voice activity detection on the microphone track a page may send, and barge-in.
/// Probabilities come from the model per 32 ms window.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct VadConfig {
    /// The Silero VAD v5 ONNX model. Unset: voice input is off and microphone audio is ignored.
    /// Overridden by `AVATAR_EDGE_VAD_MODEL`.
    pub model: Option<PathBuf>,
    /// Speech when the probability is at least this (0..1); silence below `threshold - 0.15`.
    pub threshold: f64,
    /// Speech must last this long before it counts as started (clicks and coughs do not).
    pub min_speech_ms: u64,
    /// The hangover: this much silence ends an utterance (a pause between words does not).
    pub min_silence_ms: u64,
    /// Silence that makes a pause: the utterance so far is recognised at once, while the
    /// silence goes on, so its transcript is ready when the turn ends.
    pub pause_ms: u64,
    /// The hangover when that transcript is a finished sentence (ends in `.`, `?`, `!`, `。`,
    /// `？` or `！`, and not in a word like "and" or "of"): the answer starts this soon.
    pub complete_silence_ms: u64,
    /// The hangover when it stops mid-sentence: the user is looking for a word.
    pub incomplete_silence_ms: u64,
    /// Audio kept from before the start, so the first syllable reaches speech recognition.
    pub pre_roll_ms: u64,
    /// An utterance longer than this is cut and recognised in parts.
    pub max_utterance_ms: u64,
    /// Speaking while the avatar speaks interrupts it, as the Stop button does.
    pub barge_in: bool,
    /// While the avatar speaks, speech needs this probability (its own voice may come back
    /// through the user's speakers, past the browser's echo cancellation).
    pub barge_in_threshold: f64,
    /// While the avatar speaks, speech must last this long to interrupt it.
    pub barge_in_min_speech_ms: u64,
    /// While the avatar speaks, speech must be at least this loud (RMS per 32 ms window, dB
    /// below full scale): its echo past the browser's echo cancellation is quieter than a voice
    /// at the microphone.
    pub barge_in_min_dbfs: f64,
}

impl Default for VadConfig {
    fn default() -> Self {
        Self {
            model: None,
            threshold: 0.5,
            min_speech_ms: 160,
            min_silence_ms: 640,
            pause_ms: 128,
            complete_silence_ms: 448,
            incomplete_silence_ms: 960,
            pre_roll_ms: 320,
            max_utterance_ms: 15_000,
            barge_in: true,
            barge_in_threshold: 0.8,
            barge_in_min_speech_ms: 128,
            barge_in_min_dbfs: -35.0,
        }
    }
}

/// `[talk.asr]`: speech recognition, any OpenAI-compatible `POST {base_url}/audio/transcriptions`
/// (whisper.cpp's server, faster-whisper servers, vLLM, hosted APIs; the demo's is
/// scripts/asr-server.py).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct AsrConfig {
    pub base_url: String,
    pub model: String,
    pub api_key: Option<Secret>,
    pub api_key_env: Option<String>,
    /// The user's language (`en`, `zh`, …; per avatar: `[talk.avatars.<id>] language`).
    /// Unset: the server detects it.
    pub language: Option<String>,
    /// Text that primes recognition (names, terms, the script to write Chinese in).
    pub prompt: Option<String>,
    /// Longest wait for one transcript.
    pub timeout_ms: u64,
    /// While the user speaks, recognise the utterance so far this often, for the partial
    /// transcripts (`user_transcript` with `final: false`) the page shows. 0: no partials (a
    /// hosted recogniser bills each request). Partials run only while the recogniser has
    /// nothing else to do.
    pub partial_ms: u64,
}

impl Default for AsrConfig {
    fn default() -> Self {
        Self {
            base_url: "http://127.0.0.1:8780/v1".into(),
            model: "whisper-1".into(),
            api_key: None,
            api_key_env: None,
            language: None,
            prompt: None,
            timeout_ms: 10_000,
            partial_ms: 600,
        }
    }
}

impl AsrConfig {
    pub fn key(&self) -> Option<String> {
        resolve_key(&self.api_key, &self.api_key_env)
    }
}

/// `[talk.llm]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LlmConfig {
    /// `scripted` (built in, offline) or `openai` (any OpenAI-compatible chat-completions server).
    pub backend: LlmBackend,
    /// e.g. `https://api.openai.com/v1` or `http://127.0.0.1:8000/v1`.
    pub base_url: Option<String>,
    pub model: String,
    /// Prefer `api_key_env`: the name of an environment variable holding the key.
    pub api_key: Option<Secret>,
    pub api_key_env: Option<String>,
    pub temperature: Option<f32>,
    /// Longest wait for the first byte and between streamed events.
    pub timeout_ms: u64,
    /// `scripted` only: pause between words.
    pub word_delay_ms: u64,
}

/// `[talk.tts]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TtsConfig {
    /// `espeak` (built in; the `espeak-ng` program) or `openai` (`/v1/audio/speech`).
    pub backend: TtsBackend,
    /// `espeak` only: the program to run.
    pub program: String,
    /// `espeak` only: words per minute.
    pub speed: u32,
    pub base_url: Option<String>,
    pub model: String,
    pub api_key: Option<Secret>,
    pub api_key_env: Option<String>,
    /// Longest wait for one sentence's audio.
    pub timeout_ms: u64,
}

/// `[talk.lipsync]`.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct LipSyncConfig {
    /// `builtin` (no model: the mouth opens with loudness) or `onnx`.
    pub backend: LipSyncBackend,
    /// The ONNX model (Wav2Lip contract; see docs/models.md).
    pub model: Option<PathBuf>,
    /// `libonnxruntime.so`, loaded at run time. Overridden by `AVATAR_EDGE_ONNXRUNTIME`.
    pub onnxruntime: PathBuf,
    /// `cpu` or `cuda`. `cuda` fails at start-up if the CUDA provider cannot be used.
    pub execution_provider: ExecutionProvider,
    pub device_id: i32,
    /// ONNX Runtime intra-op threads per runner.
    pub threads: usize,
    /// Model instances (threads) shared by all sessions. 0: one per CPU core (CPU), 1 (CUDA).
    pub runners: usize,
    /// Most frames one inference runs, across sessions.
    pub max_batch: usize,
    /// Frames a session submits at once.
    pub session_batch: usize,
    pub input_mel: String,
    pub input_video: String,
    pub output: String,
    /// Width of the blend between the generated face and the frame, in pixels.
    pub feather_px: u32,
}

impl Default for TalkConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            system_prompt: "You are a friendly tutor. Answer briefly, in the language of the question.".into(),
            voice: None,
            history: 6,
            llm: LlmConfig::default(),
            tts: TtsConfig::default(),
            lipsync: LipSyncConfig::default(),
            vad: VadConfig::default(),
            asr: AsrConfig::default(),
            limits: TalkLimits::default(),
            avatars: Default::default(),
        }
    }
}

impl Default for LlmConfig {
    fn default() -> Self {
        Self {
            backend: LlmBackend::Scripted,
            base_url: None,
            model: "gpt-4o-mini".into(),
            api_key: None,
            api_key_env: None,
            temperature: None,
            timeout_ms: 15_000,
            word_delay_ms: 30,
        }
    }
}

impl Default for TtsConfig {
    fn default() -> Self {
        Self {
            backend: TtsBackend::Espeak,
            program: "espeak-ng".into(),
            speed: 170,
            base_url: None,
            model: "tts-1".into(),
            api_key: None,
            api_key_env: None,
            timeout_ms: 15_000,
        }
    }
}

impl Default for LipSyncConfig {
    fn default() -> Self {
        Self {
            backend: LipSyncBackend::Builtin,
            model: None,
            onnxruntime: PathBuf::from("/usr/local/lib/libonnxruntime.so"),
            execution_provider: ExecutionProvider::Cpu,
            device_id: 0,
            threads: 1,
            runners: 0,
            max_batch: 16,
            session_batch: 4,
            input_mel: "mel_spectrogram".into(),
            input_video: "video_frames".into(),
            output: "predicted_frames".into(),
            feather_px: 6,
        }
    }
}

impl LlmConfig {
    /// The API key: `api_key_env`'s variable, else `api_key`.
    pub fn key(&self) -> Option<String> {
        resolve_key(&self.api_key, &self.api_key_env)
    }
}

impl TtsConfig {
    pub fn key(&self) -> Option<String> {
        resolve_key(&self.api_key, &self.api_key_env)
    }
}

/// The variable `env` names, unless unset or empty; else the key in the file.
fn resolve_key(key: &Option<Secret>, env: &Option<String>) -> Option<String> {
    env.as_ref()
        .and_then(|name| std::env::var(name).ok())
        .filter(|k| !k.is_empty())
        .or_else(|| key.as_ref().map(|k| k.expose().to_owned()))
        .filter(|k| !k.is_empty())
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct RelayTarget {
    /// `host:port` of the relay's QUIC tunnel listener.
    pub address: String,
    /// TLS server name to verify; defaults to the host part of `address`.
    #[serde(default)]
    pub server_name: Option<String>,
    /// Pin the relay's certificate by SHA-256 (hex, colons allowed).
    #[serde(default)]
    pub fingerprint: Option<String>,
    /// Read the fingerprint from this file (as written by the relay's `tls.fingerprint_file`).
    #[serde(default)]
    pub fingerprint_file: Option<PathBuf>,
    /// Trust certificates issued by the CA(s) in this PEM file.
    #[serde(default)]
    pub ca_file: Option<PathBuf>,
    /// `host:port` of the relay's HTTPS listener, for the tunnel over TLS/TCP. Default: the host
    /// of `address` at port 443.
    #[serde(default)]
    pub tcp_address: Option<String>,
}

impl RelayTarget {
    /// Where the TLS/TCP tunnel goes: `tcp_address`, or port 443 on the QUIC address's host.
    pub fn tcp_address(&self) -> String {
        if let Some(a) = &self.tcp_address {
            return a.clone();
        }
        match self.address.rsplit_once(':') {
            Some((host, _)) => format!("{host}:443"),
            None => format!("{}:443", self.address),
        }
    }

    /// The TLS server name: `server_name`, or the host part of `address`.
    pub fn server_name(&self) -> String {
        self.server_name.clone().unwrap_or_else(|| {
            self.address
                .rsplit_once(':')
                .map(|(h, _)| h.trim_matches(['[', ']']).to_owned())
                .unwrap_or_default()
        })
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct IceConfig {
    /// Offer loopback candidates (tests and single-host demos only).
    pub include_loopback: bool,
    /// NAT 1:1 (a cloud VM with a public IP mapped onto a private one): announce these
    /// addresses in host candidates instead of the machine's own.
    pub public_ips: Vec<String>,
    /// Use only local UDP ports in this range for media (for a firewall rule). Both or neither.
    pub udp_port_min: Option<u16>,
    pub udp_port_max: Option<u16>,
    /// Browser candidates in these ranges are used although they are special-purpose (a LAN
    /// where browsers and the worker meet on private addresses). Others in special-purpose
    /// ranges (loopback, link-local and cloud metadata, private networks) are dropped, so a
    /// browser cannot make the worker send to them. `include_loopback` allows loopback too.
    pub allow_candidate_ranges: Vec<ipnet::IpNet>,
    /// Remote candidates one session may trickle per offer; more are dropped.
    pub max_remote_candidates: usize,
}

impl Default for IceConfig {
    fn default() -> Self {
        Self {
            include_loopback: false,
            public_ips: Vec::new(),
            udp_port_min: None,
            udp_port_max: None,
            allow_candidate_ranges: Vec::new(),
            max_remote_candidates: 64,
        }
    }
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct VideoConfig {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub bitrate_kbps: u32,
    /// Keyframe interval in frames.
    pub gop: u32,
    /// `auto` (h264_nvenc if it opens, else libx264), `h264_nvenc` or `libx264`.
    pub encoder: VideoEncoder,
    /// `[video.adapt]`: following each viewer's bandwidth (`bitrate_kbps` is the ceiling).
    pub adapt: crate::media::rate::AdaptConfig,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            worker_id: "worker-1".into(),
            capacity: 4,
            drain_timeout_s: 4 * 3600,
            secret: Secret::default(),
            secret_file: None,
            relays: Vec::new(),
            tunnel: TunnelSettings::default(),
            ice: IceConfig::default(),
            video: VideoConfig::default(),
            avatar_dir: None,
            labels: Default::default(),
            metrics_listen: None,
            talk: TalkConfig::default(),
            transcripts: Default::default(),
            recording: RecordingConfig::default(),
            unset_required: Vec::new(),
        }
    }
}

impl Default for VideoConfig {
    fn default() -> Self {
        Self {
            width: 512,
            height: 512,
            fps: 25,
            bitrate_kbps: 2000,
            gop: 50,
            encoder: VideoEncoder::Auto,
            adapt: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("reading {path}: {source}")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Parse(#[from] toml::de::Error),
    #[error("`{key}`: {message}")]
    Invalid { key: &'static str, message: String },
    #[error(
        "still marked REQUIRED: {}. Set each to your own value (the comment beside it says what goes there; docs/deploy.md walks through them)",
        .0.join(", ")
    )]
    Required(Vec<String>),
}

impl WorkerConfig {
    /// Parse a config file's text. A file that still holds `REQUIRED` placeholders is refused
    /// with every such key named, even where a placeholder is not of its key's type.
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        let unset = toml::from_str::<toml::Table>(text)
            .ok()
            .and_then(|doc| serde_json::to_value(doc).ok())
            .map(|doc| avatar_proto::required::unset_keys(&doc))
            .unwrap_or_default();
        match toml::from_str::<Self>(text) {
            Ok(mut config) => {
                config.unset_required = unset;
                Ok(config)
            }
            Err(_) if !unset.is_empty() => Err(ConfigError::Required(unset)),
            Err(e) => Err(e.into()),
        }
    }

    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Defaults for `worker --dev`: one relay on 127.0.0.1:4433 pinned through the fingerprint
    /// file a `relay --dev` writes, loopback candidates on, the built-in avatar, a 2 s drain.
    pub fn dev() -> Self {
        Self {
            secret: Secret::new(DEV_TUNNEL_SECRET),
            relays: vec![RelayTarget {
                address: "127.0.0.1:4433".into(),
                server_name: Some("localhost".into()),
                fingerprint: None,
                fingerprint_file: Some(PathBuf::from(".avatar-edge-dev/relay.fingerprint")),
                ca_file: None,
                tcp_address: None,
            }],
            ice: IceConfig {
                include_loopback: true,
                ..IceConfig::default()
            },
            // Ctrl-C on a development worker stops it within seconds, sessions or not.
            drain_timeout_s: 2,
            ..Self::default()
        }
    }

    /// Apply environment overrides, and read `secret_file` where the environment does not set
    /// the secret.
    pub fn apply_env(&mut self) -> Result<(), ConfigError> {
        match std::env::var("AVATAR_EDGE_TUNNEL_SECRET") {
            Ok(s) => {
                self.unset_required.retain(|k| !k.starts_with("secret"));
                if avatar_proto::required::is_marked(&s) {
                    self.unset_required
                        .push("AVATAR_EDGE_TUNNEL_SECRET (environment)".into());
                }
                self.secret = Secret::new(s);
            }
            Err(_) => {
                if let Some(path) = &self.secret_file {
                    if !self.secret.expose().is_empty() {
                        return Err(ConfigError::Invalid {
                            key: "secret_file",
                            message: "set either secret or secret_file".into(),
                        });
                    }
                    let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                        path: path.clone(),
                        source,
                    })?;
                    let secret = text.lines().next().unwrap_or_default().trim().to_owned();
                    if avatar_proto::required::is_marked(&secret) {
                        self.unset_required.push(format!("secret_file ({})", path.display()));
                    }
                    self.secret = Secret::new(secret);
                }
            }
        }
        // One unit instance per GPU (`avatar-edge-worker@.service`) shares the config file and
        // names itself here (the hostname and the instance, by default).
        if let Ok(id) = std::env::var("AVATAR_EDGE_WORKER_ID") {
            self.worker_id = id.trim().to_owned();
        }
        if let Ok(p) = std::env::var("AVATAR_EDGE_ONNXRUNTIME") {
            self.talk.lipsync.onnxruntime = PathBuf::from(p);
        }
        if let Ok(p) = std::env::var("AVATAR_EDGE_VAD_MODEL") {
            self.talk.vad.model = Some(PathBuf::from(p));
        }
        if let Ok(p) = std::env::var("AVATAR_EDGE_LIPSYNC_MODEL") {
            self.talk.lipsync.backend = LipSyncBackend::Onnx;
            self.talk.lipsync.model = Some(PathBuf::from(p));
        }
        Ok(())
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        if !self.unset_required.is_empty() {
            return Err(ConfigError::Required(self.unset_required.clone()));
        }
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.into(),
            })
        };
        if !avatar_proto::tunnel::valid_worker_id(&self.worker_id) {
            return invalid("worker_id", "1-64 characters of [A-Za-z0-9-_.:]");
        }
        if !(1..=65_536).contains(&self.recording.buffer_packets) {
            return invalid("recording.buffer_packets", "1..=65536");
        }
        if !(1..=30 * 24 * 3600).contains(&self.drain_timeout_s) {
            return invalid("drain_timeout_s", "between 1 s and 30 days");
        }
        if !(1..=avatar_proto::tunnel::MAX_WORKER_CAPACITY).contains(&self.capacity) {
            let most = avatar_proto::tunnel::MAX_WORKER_CAPACITY;
            return invalid(
                "capacity",
                &format!("must be between 1 and {most} (what a relay accepts)"),
            );
        }
        if self.secret.expose().len() < 16 {
            return invalid(
                "secret",
                "set a secret of at least 16 characters (or secret_file, or AVATAR_EDGE_TUNNEL_SECRET)",
            );
        }
        if self.relays.is_empty() {
            return invalid("relays", "name at least one relay");
        }
        if self.tunnel.quic_timeout_ms == 0 || self.tunnel.quic_probe_interval_s == 0 {
            return invalid(
                "tunnel.quic_timeout_ms",
                "tunnel.quic_timeout_ms and tunnel.quic_probe_interval_s must be above 0",
            );
        }
        for r in &self.relays {
            let trust = [
                r.fingerprint.is_some(),
                r.fingerprint_file.is_some(),
                r.ca_file.is_some(),
            ];
            if trust.iter().filter(|t| **t).count() != 1 {
                return invalid(
                    "relays.fingerprint",
                    "set exactly one of fingerprint, fingerprint_file, ca_file per relay",
                );
            }
        }
        let ice = &self.ice;
        if let Some(ip) = ice.public_ips.iter().find(|ip| ip.parse::<std::net::IpAddr>().is_err()) {
            return invalid("ice.public_ips", &format!("{ip:?} is not an IP address"));
        }
        match (ice.udp_port_min, ice.udp_port_max) {
            (None, None) => {}
            (Some(min), Some(max)) if min > 0 && min <= max => {}
            _ => {
                return invalid(
                    "ice.udp_port_min",
                    "set udp_port_min and udp_port_max together, 1 <= min <= max",
                )
            }
        }
        let v = &self.video;
        if v.width == 0 || v.height == 0 || v.width % 2 == 1 || v.height % 2 == 1 || v.width > 4096 || v.height > 4096 {
            return invalid("video.width", "width and height must be even and between 2 and 4096");
        }
        use crate::media::avatar::{MAX_STREAM_MACROBLOCKS, MAX_STREAM_SIDE};
        if v.width.div_ceil(16) * v.height.div_ceil(16) > MAX_STREAM_MACROBLOCKS
            || v.width.max(v.height) > MAX_STREAM_SIDE
        {
            return invalid(
                "video.width",
                "the picture must fit H.264 level 3.1, which every browser decodes: at most 1280×720 or 720×1280 in area, 2704 a side",
            );
        }
        if !(1..=60).contains(&v.fps) {
            return invalid("video.fps", "must be 1..=60");
        }
        if v.bitrate_kbps == 0 {
            return invalid("video.bitrate_kbps", "must be at least 1");
        }
        if v.adapt.enabled {
            if let Err(e) = v.adapt.validate(v.bitrate_kbps) {
                return invalid("video.adapt", &e);
            }
        }
        self.validate_talk()
    }

    fn validate_talk(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: String| Err(ConfigError::Invalid { key, message });
        let t = &self.talk;
        let llms = std::iter::once(&t.llm).chain(t.avatars.values().filter_map(|a| a.llm.as_ref()));
        for llm in llms {
            if llm.backend == LlmBackend::Openai && llm.base_url.is_none() {
                return invalid("talk.llm.base_url", "the openai backend needs base_url".into());
            }
        }
        let ttss = std::iter::once(&t.tts).chain(t.avatars.values().filter_map(|a| a.tts.as_ref()));
        for tts in ttss {
            if tts.backend == TtsBackend::Openai && tts.base_url.is_none() {
                return invalid("talk.tts.base_url", "the openai backend needs base_url".into());
            }
        }
        let voices = t
            .voice
            .iter()
            .chain(t.avatars.values().filter_map(|a| a.voice.as_ref()));
        for voice in voices {
            if !crate::talk::tts::valid_voice(voice) {
                return invalid("talk.voice", format!("{voice:?}: letters, digits and -_+. only"));
            }
        }
        let v = &t.vad;
        if !(0.05..=0.95).contains(&v.threshold) || !(v.threshold..=0.99).contains(&v.barge_in_threshold) {
            return invalid(
                "talk.vad.threshold",
                "threshold 0.05..=0.95, barge_in_threshold from threshold to 0.99".into(),
            );
        }
        if v.min_speech_ms > 2_000 || v.barge_in_min_speech_ms > 2_000 || v.pre_roll_ms > 2_000 {
            return invalid(
                "talk.vad.min_speech_ms",
                "min_speech_ms, barge_in_min_speech_ms and pre_roll_ms are at most 2000".into(),
            );
        }
        if !(-80.0..=0.0).contains(&v.barge_in_min_dbfs) {
            return invalid("talk.vad.barge_in_min_dbfs", "-80..=0".into());
        }
        if !(100..=5_000).contains(&v.min_silence_ms) {
            return invalid("talk.vad.min_silence_ms", "100..=5000".into());
        }
        if !(32..=v.min_silence_ms).contains(&v.pause_ms) {
            return invalid("talk.vad.pause_ms", "32..=min_silence_ms".into());
        }
        if !(32..=v.min_silence_ms).contains(&v.complete_silence_ms) {
            return invalid("talk.vad.complete_silence_ms", "32..=min_silence_ms".into());
        }
        if !(v.min_silence_ms..=5_000).contains(&v.incomplete_silence_ms) {
            return invalid("talk.vad.incomplete_silence_ms", "min_silence_ms..=5000".into());
        }
        if t.asr.partial_ms != 0 && !(200..=10_000).contains(&t.asr.partial_ms) {
            return invalid("talk.asr.partial_ms", "0 (off) or 200..=10000".into());
        }
        if !(1_000..=60_000).contains(&v.max_utterance_ms) {
            return invalid("talk.vad.max_utterance_ms", "1000..=60000".into());
        }
        if !(t.asr.base_url.starts_with("http://") || t.asr.base_url.starts_with("https://")) {
            return invalid("talk.asr.base_url", "an http:// or https:// URL".into());
        }
        let languages = t
            .asr
            .language
            .iter()
            .chain(t.avatars.values().filter_map(|a| a.language.as_ref()));
        for language in languages {
            let plain = (2..=8).contains(&language.len()) && language.chars().all(|c| c.is_ascii_alphabetic());
            if !plain {
                return invalid(
                    "talk.asr.language",
                    format!("{language:?}: a language code like en or zh"),
                );
            }
        }
        let lim = &t.limits;
        if lim.turns_per_minute > 6_000 || !(1..=100).contains(&lim.turn_burst) {
            return invalid(
                "talk.limits.turns_per_minute",
                "turns_per_minute 0..=6000 (0: no limit), turn_burst 1..=100".into(),
            );
        }
        if !(1..=65_536).contains(&lim.max_message_chars) {
            return invalid("talk.limits.max_message_chars", "1..=65536".into());
        }
        if lim.history_bytes > 1 << 20 {
            return invalid("talk.limits.history_bytes", "at most 1048576".into());
        }
        let requests = [lim.llm_requests, lim.tts_requests, lim.asr_requests];
        if requests.iter().any(|n| !(1..=4096).contains(n)) {
            return invalid(
                "talk.limits.llm_requests",
                "llm_requests, tts_requests and asr_requests 1..=4096".into(),
            );
        }
        if !(1..=600_000).contains(&lim.slot_wait_ms) {
            return invalid("talk.limits.slot_wait_ms", "1..=600000".into());
        }
        let l = &t.lipsync;
        if l.backend == LipSyncBackend::Onnx && l.model.is_none() {
            return invalid("talk.lipsync.model", "the onnx backend needs a model".into());
        }
        if !(1..=256).contains(&l.max_batch) || !(1..=64).contains(&l.session_batch) {
            return invalid(
                "talk.lipsync.max_batch",
                "max_batch 1..=256, session_batch 1..=64".into(),
            );
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dev_config_is_valid() {
        WorkerConfig::dev().validate().expect("valid");
    }

    #[test]
    fn unknown_keys_are_rejected() {
        let err = WorkerConfig::from_toml("capacity = 2\n[video]\nfsp = 3\n").expect_err("typo");
        assert!(err.to_string().contains("fsp"), "{err}");
    }

    #[test]
    fn talk_settings_are_checked_with_the_key_named() {
        let base = "secret = \"0123456789abcdef0123\"\n[[relays]]\naddress = \"r:1\"\nca_file = \"/x\"\n";
        let check = |extra: &str| {
            WorkerConfig::from_toml(&format!("{base}{extra}"))
                .map_err(|e| e.to_string())
                .and_then(|c| c.validate().map_err(|e| e.to_string()))
        };
        check("").expect("no [talk] at all is valid (built-in backends)");
        check("[ice]\npublic_ips = [\"203.0.113.7\"]\nudp_port_min = 50000\nudp_port_max = 50100\n")
            .expect("ice settings");
        let cases = [
            // Refused when parsed, with the valid names listed.
            (
                "[talk.llm]\nbackend = \"gpt\"\n",
                "unknown variant `gpt`, expected `scripted` or `openai`",
            ),
            ("[talk.llm]\nbackend = \"openai\"\n", "talk.llm.base_url"),
            ("[talk.tts]\nbackend = \"openai\"\n", "talk.tts.base_url"),
            ("[talk]\nvoice = \"--stdout\"\n", "talk.voice"),
            ("[talk.avatars.a]\nvoice = \"en us\"\n", "talk.voice"),
            ("[talk.lipsync]\nbackend = \"onnx\"\n", "talk.lipsync.model"),
            (
                "[talk.lipsync]\nexecution_provider = \"tpu\"\n",
                "unknown variant `tpu`, expected `cpu` or `cuda`",
            ),
            ("[video]\nencoder = \"vp8\"\n", "unknown variant `vp8`"),
            ("[talk.lipsync]\nmax_batch = 0\n", "talk.lipsync.max_batch"),
            ("[talk.vad]\nthreshold = 1.5\n", "talk.vad.threshold"),
            ("[talk.vad]\nbarge_in_threshold = 0.3\n", "talk.vad.threshold"),
            ("[talk.vad]\nmin_silence_ms = 10\n", "talk.vad.min_silence_ms"),
            ("[talk.vad]\npause_ms = 700\n", "talk.vad.pause_ms"),
            (
                "[talk.vad]\ncomplete_silence_ms = 700\n",
                "talk.vad.complete_silence_ms",
            ),
            (
                "[talk.vad]\nincomplete_silence_ms = 100\n",
                "talk.vad.incomplete_silence_ms",
            ),
            ("[talk.asr]\npartial_ms = 50\n", "talk.asr.partial_ms"),
            ("[talk.vad]\nmax_utterance_ms = 0\n", "talk.vad.max_utterance_ms"),
            ("[talk.asr]\nbase_url = \"file:///etc/passwd\"\n", "talk.asr.base_url"),
            ("[talk.avatars.a]\nlanguage = \"zh; rm\"\n", "talk.asr.language"),
            ("[talk.llm]\nmodle = \"x\"\n", "modle"),
            ("[talk.limits]\nturn_burst = 0\n", "talk.limits.turns_per_minute"),
            (
                "[talk.limits]\nmax_message_chars = 0\n",
                "talk.limits.max_message_chars",
            ),
            ("[talk.limits]\nhistory_bytes = 99999999\n", "talk.limits.history_bytes"),
            ("[talk.limits]\nasr_requests = 0\n", "talk.limits.llm_requests"),
            ("[talk.limits]\nslot_wait_ms = 0\n", "talk.limits.slot_wait_ms"),
            ("[ice]\npublic_ips = [\"not-an-ip\"]\n", "ice.public_ips"),
            ("[ice]\nudp_port_min = 50000\n", "ice.udp_port_min"),
            (
                "[ice]\nudp_port_min = 50010\nudp_port_max = 50000\n",
                "ice.udp_port_min",
            ),
        ];
        for (extra, key) in cases {
            let err = check(extra).expect_err(extra);
            assert!(err.contains(key), "{extra}: {err}");
        }
    }

    #[test]
    fn each_relay_needs_exactly_one_trust_setting() {
        let mut c = WorkerConfig::dev();
        c.relays[0].fingerprint = Some("ab".into());
        assert!(c
            .validate()
            .expect_err("two")
            .to_string()
            .contains("relays.fingerprint"));
    }
}
