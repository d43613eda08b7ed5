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

/// The config the package installs: refused until the operator sets the values marked REQUIRED
/// (its secret file too), with every one of them named at once; valid once they are set.
#[test]
fn the_packaged_config_names_its_required_keys_and_passes_once_they_are_set() {
    use avatar_worker::config::{ConfigError, WorkerConfig};
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/config/worker.toml");
    let text = std::fs::read_to_string(&path).expect("deploy/config/worker.toml");
    // Refused when parsed (a placeholder where an address belongs) or when validated.
    match WorkerConfig::from_toml(&text).and_then(|c| c.validate()) {
        Err(e @ ConfigError::Required(_)) => {
            let message = e.to_string();
            for key in ["worker_id", "relays[0].address"] {
                assert!(message.contains(key), "{message}");
            }
        }
        other => panic!("the unedited config must be refused naming its REQUIRED keys: {other:?}"),
    }
    let dir = tempfile::tempdir().expect("tempdir");
    let secret = dir.path().join("tunnel.secret");
    // What the package writes until the relay's secret is copied over it.
    std::fs::write(
        &secret,
        "REQUIRED: copy /etc/avatar-edge/tunnel.secret from the relay\n",
    )
    .expect("write");
    let edited = text
        .replace(
            "\"REQUIRED: a name for this GPU box, unique among your workers, e.g. gpu-1\"",
            "\"gpu-1\"",
        )
        .replace(
            "\"REQUIRED: your relay's DNS name and tunnel port, e.g. relay.example.com:4433\"",
            "\"relay.example.com:4433\"",
        )
        .replace("/etc/avatar-edge/tunnel.secret", &secret.display().to_string());
    let mut config = WorkerConfig::from_toml(&edited).expect("the edited config parses");
    config.apply_env().expect("reads the secret file");
    let message = config
        .validate()
        .expect_err("a placeholder secret is refused")
        .to_string();
    assert!(message.contains("secret_file"), "{message}");
    std::fs::write(&secret, "0123456789abcdef0123456789\n").expect("write");
    let mut config = WorkerConfig::from_toml(&edited).expect("the edited config parses");
    config.apply_env().expect("reads the secret file");
    config.validate().expect("the edited config validates");
    assert_eq!(config.relays[0].address, "relay.example.com:4433");
}
