//! The example configuration shipped in the repository parses and validates.

#[test]
fn relay_example_config_loads() {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("relay.example.toml");
    assert!(path.is_file(), "fixture missing: {}", path.display());
    let config = avatar_relay::config::RelayConfig::load(&path).expect("parses");
    config.validate().expect("validates");
    assert_eq!(config.relay_id, "vps-eu-1");
    assert!(config.http.tls);
    let auth = config.policies.auth.as_ref().expect("the example shows an auth policy");
    assert!(auth.path.ends_with("hmac-token.wasm"));
    assert_eq!(
        config.policies.router.as_ref().and_then(|r| r.fallback),
        Some(avatar_relay::config::RouterFallback::Builtin)
    );
}
