//! The example configuration shipped in the repository parses and validates.

#[test]
fn worker_example_config_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("worker.example.toml");
    assert!(path.is_file(), "fixture missing: {}", path.display());
    let config = avatar_worker::config::WorkerConfig::load(&path).expect("parses");
    config.validate().expect("validates");
    assert_eq!(config.worker_id, "gpu-box-1");
    assert_eq!(config.relays.len(), 1);
    assert_eq!(config.talk.avatars["avatar_tutor_13"].voice.as_deref(), Some("cmn"));
}
