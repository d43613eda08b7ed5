//! `worker --self-test` checks everything the configured worker needs (issue 30), against real
//! HTTP backends: the OpenAI-compatible stand-in ([`OpenAiServer`]) for the LLM, the TTS and speech
//! recognition, a port where nothing listens for a backend that is down, and the real Silero VAD
//! and CenterFace models from `.tools` (scripts/install-deps).
//!
//! * every backend up: the self-test passes, with a row for each, and each got exactly one request;
//! * the LLM down: it fails naming the LLM, and only the LLM;
//! * speech recognition down: it fails naming speech recognition (ASR), and only that;
//! * an API key variable that is not set: it fails naming the variable, before any request.
//!
//! The self-test runs in memory (`avatar_worker::selftest::run`, what `worker --self-test` calls)
//! on a blocking thread, since it blocks while the stand-in serves on this runtime. No socket
//! leaves loopback and no test sets an environment variable (they run in parallel): the missing
//! key is a variable name no environment has.

use avatar_edge_tests::openai::OpenAiServer;
use avatar_worker::config::{LlmBackend, Secret, TtsBackend, VideoEncoder, WorkerConfig};
use avatar_worker::selftest::{self, FaceModel, Options, Outcome, Report};
use std::path::PathBuf;

const KEY: &str = "sk-self-test";

fn tools() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/../.tools"))
}

/// A URL where nothing listens: a loopback port bound, then let go.
fn closed_url() -> String {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr");
    drop(listener);
    format!("http://{addr}/v1")
}

/// A worker that uses every backend: the LLM, TTS and speech recognition at `url`, voice input
/// on, libx264 and the built-in mouth (the encoder and lip-sync rows have their own tests).
fn config(url: &str) -> WorkerConfig {
    let mut config = WorkerConfig::dev();
    config.video.encoder = VideoEncoder::Libx264;
    let t = &mut config.talk;
    t.llm.backend = LlmBackend::Openai;
    t.llm.base_url = Some(url.to_owned());
    t.llm.api_key = Some(Secret::new(KEY));
    t.llm.timeout_ms = 5000;
    t.tts.backend = TtsBackend::Openai;
    t.tts.base_url = Some(url.to_owned());
    t.tts.api_key = Some(Secret::new(KEY));
    t.tts.timeout_ms = 5000;
    t.vad.model = Some(tools().join("models/silero_vad.onnx"));
    t.lipsync.onnxruntime = tools().join("onnxruntime/libonnxruntime.so");
    t.asr.base_url = url.to_owned();
    t.asr.api_key = Some(Secret::new(KEY));
    t.asr.timeout_ms = 5000;
    config
}

/// The stand-in, answering every transcription (its first two would fail on purpose).
async fn backends() -> OpenAiServer {
    let server = OpenAiServer::start().await;
    server.recognise_at_once();
    server
}

/// `worker --self-test` with `config`, the face model included.
async fn self_test(config: WorkerConfig) -> Report {
    let options = Options {
        frames: 10,
        face_model: Some(FaceModel {
            model: tools().join("models/centerface.onnx"),
            onnxruntime: tools().join("onnxruntime/libonnxruntime.so"),
        }),
    };
    tokio::task::spawn_blocking(move || selftest::run(&config, &options))
        .await
        .expect("the self-test returns")
}

fn outcome(report: &Report, what: &str) -> Outcome {
    report
        .rows
        .iter()
        .find(|r| r.what == what)
        .map(|r| r.outcome)
        .unwrap_or_else(|| panic!("no row {what}:\n{}", report.render()))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_self_test_passes_when_every_backend_is_up() {
    let server = backends().await;
    let report = self_test(config(&server.base_url())).await;
    let table = report.render();
    assert!(report.ok(), "{table}");
    for what in [
        "LLM",
        "TTS",
        "speech recognition (ASR)",
        "voice activity (VAD)",
        "face model (CenterFace)",
    ] {
        assert!(
            matches!(outcome(&report, what), Outcome::Once { ms } if ms > 0.0),
            "{what}:\n{table}"
        );
    }
    assert!(table.contains("| encoder libx264 |"), "{table}");
    assert!(table.contains("| lip-sync builtin |"), "{table}");
    // One small request each, with the key.
    let seen = server.seen();
    assert_eq!(seen.chat_requests.len(), 1, "{table}");
    assert_eq!(seen.speech_requests.len(), 1, "{table}");
    assert_eq!(seen.transcriptions.len(), 1, "{table}");
    assert_eq!(seen.authorization.len(), 3);
    assert!(seen.authorization.iter().all(|a| a == &format!("Bearer {KEY}")));
    assert!(!table.contains(KEY), "no key in the table: {table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_self_test_fails_naming_the_llm_when_it_is_down() {
    let server = backends().await;
    let mut config = config(&server.base_url());
    config.talk.llm.base_url = Some(closed_url());
    let report = self_test(config).await;
    let table = report.render();
    assert_eq!(report.failures.len(), 1, "{table}");
    assert!(report.failures[0].starts_with("LLM: "), "{table}");
    assert!(table.contains("FAILED: LLM: language model: request failed"), "{table}");
    assert_eq!(outcome(&report, "LLM"), Outcome::Failed);
    assert!(matches!(outcome(&report, "TTS"), Outcome::Once { .. }), "{table}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_self_test_fails_naming_speech_recognition_when_it_is_down() {
    let server = backends().await;
    let mut config = config(&server.base_url());
    config.talk.asr.base_url = closed_url();
    let report = self_test(config).await;
    let table = report.render();
    assert_eq!(report.failures.len(), 1, "{table}");
    assert!(report.failures[0].starts_with("speech recognition (ASR): "), "{table}");
    assert_eq!(outcome(&report, "speech recognition (ASR)"), Outcome::Failed);
    assert!(matches!(outcome(&report, "LLM"), Outcome::Once { .. }), "{table}");
    assert!(server.seen().transcriptions.is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_self_test_fails_naming_the_variable_when_a_key_is_missing() {
    let var = "AVATAR_EDGE_SELF_TEST_KEY_NO_ENVIRONMENT_HAS";
    let server = backends().await;
    let mut config = config(&server.base_url());
    config.talk.llm.api_key = None;
    config.talk.llm.api_key_env = Some(var.to_owned());
    let report = self_test(config).await;
    let table = report.render();
    assert_eq!(report.failures.len(), 1, "{table}");
    assert!(
        table.contains(&format!("FAILED: LLM: the variable {var} is not set")),
        "{table}"
    );
    // The check comes before the request: the model was never asked.
    assert!(server.seen().chat_requests.is_empty());
}
