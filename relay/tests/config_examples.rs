//! The example configuration shipped in the repository parses and validates.

#[test]
fn relay_example_config_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("relay.example.toml");
    assert!(path.is_file(), "fixture missing: {}", path.display());
    let config = avatar_relay::config::RelayConfig::load(&path).expect("parses");
    config.validate().expect("validates");
    assert_eq!(config.relay_id, "vps-eu-1");
    assert!(config.http.tls);
}
