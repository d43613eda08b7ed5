//! `docs/configuration.md` lists every key of both binaries with the code's default: a key added
//! to a config struct without a line in the reference fails here, and so does a default that
//! changed in the code but not in the doc.
//!
//! The keys come from the config structs themselves: a configuration with every optional section
//! filled in is serialized to JSON and walked. A row reads ``| `dotted.key` | `default` | … |``,
//! the default written as JSON (`unset` for a key that has none).

use serde_json::Value;
use std::collections::BTreeMap;

const DOC: &str = include_str!("../../docs/configuration.md");

/// Every leaf key under `prefix`, with its value. Tables are walked; arrays of tables are
/// walked through their first element as `key[]`; empty maps, arrays and scalars are leaves.
fn leaves(prefix: &str, v: &Value, out: &mut BTreeMap<String, Value>) {
    let join = |k: &str| {
        if prefix.is_empty() {
            k.to_owned()
        } else {
            format!("{prefix}.{k}")
        }
    };
    match v {
        Value::Object(map) if !map.is_empty() => {
            for (k, v) in map {
                leaves(&join(k), v, out);
            }
        }
        Value::Array(items) if items.first().is_some_and(Value::is_object) => {
            leaves(&format!("{prefix}[]"), &items[0], out);
        }
        leaf => {
            out.insert(prefix.to_owned(), leaf.clone());
        }
    }
}

fn render(v: &Value) -> String {
    match v {
        Value::Null => "unset".into(),
        other => other.to_string(),
    }
}

/// The reference rows of `section` (the text after its heading, to the next `## `).
fn rows(section: &str) -> BTreeMap<String, String> {
    let start = DOC
        .find(section)
        .unwrap_or_else(|| panic!("docs/configuration.md has no `{section}`"));
    let body = &DOC[start + section.len()..];
    let body = &body[..body.find("\n## ").unwrap_or(body.len())];
    body.lines()
        .filter_map(|l| {
            let key = l.strip_prefix("| `")?.split('`').next()?;
            Some((key.to_owned(), l.to_owned()))
        })
        .collect()
}

fn check(section: &str, full: &Value, defaults: &Value) {
    let (mut keys, mut default_of) = (BTreeMap::new(), BTreeMap::new());
    leaves("", full, &mut keys);
    leaves("", defaults, &mut default_of);
    assert!(keys.len() > 30, "the walk found the keys: {keys:?}");
    let rows = rows(section);
    let mut missing = Vec::new();
    for key in keys.keys() {
        let want = default_of.get(key).map(render);
        match (rows.get(key), &want) {
            (None, _) => missing.push(format!("| `{key}` | `{}` | |", want.as_deref().unwrap_or("unset"))),
            (Some(row), Some(d)) if !row.contains(&format!("`{d}`")) => {
                missing.push(format!("default of `{key}` is `{d}`: {row}"))
            }
            _ => {}
        }
    }
    let stale: Vec<&String> = rows.keys().filter(|k| !keys.contains_key(*k)).collect();
    assert!(
        missing.is_empty() && stale.is_empty(),
        "docs/configuration.md, {section}, is out of date.\nMissing or wrong:\n{}\nNo such key: {stale:?}",
        missing.join("\n")
    );
}

#[test]
fn every_relay_key_is_in_the_reference_with_its_default() {
    let full = avatar_relay::config::RelayConfig::from_toml(
        r#"
        [http]
        metrics_token = "0123456789abcdef"
        [tls.acme]
        domains = ["relay.example.com"]
        cache_dir = "/var/lib/avatar-edge/acme"
        [[api.keys]]
        name = "backend"
        key = "0123456789abcdef0123456789"
        [[webhooks]]
        url = "https://backend.example.com/avatar-events"
        secret = "0123456789abcdef"
        events = ["session.ended"]
        name = "backend"
        [[tunnel.workers]]
        id = "gpu-1"
        key = "0123456789abcdef"
        max_capacity = 4
        [policies.auth]
        path = "auth.wasm"
        config = "settings"
        [policies.router]
        path = "router.wasm"
        config_file = "router.json"
        fallback = "builtin"
        "#,
    )
    .expect("parses");
    let defaults = avatar_relay::config::RelayConfig::default();
    check(
        "## Reference: relay",
        &serde_json::to_value(&full).expect("json"),
        &serde_json::to_value(&defaults).expect("json"),
    );
}

#[test]
fn every_worker_key_is_in_the_reference_with_its_default() {
    let full = avatar_worker::config::WorkerConfig::from_toml(
        r#"
        [[relays]]
        address = "relay.example.com:4433"
        [talk.avatars."<id>"]
        system_prompt = "p"
        [talk.avatars."<id>".llm]
        model = "m"
        [talk.avatars."<id>".tts]
        model = "t"
        "#,
    )
    .expect("parses");
    let defaults = avatar_worker::config::WorkerConfig::default();
    check(
        "## Reference: worker",
        &serde_json::to_value(&full).expect("json"),
        &serde_json::to_value(&defaults).expect("json"),
    );
}

/// deploy.md's config files, whole, as its steps write them: each one parses and validates in
/// the binary it is for, so pasting them can never leave a duplicated table or a misspelt key.
/// (`tests/tests/packages.rs` pastes the first-start ones into installed systems and plays.)
#[test]
fn the_config_files_deploy_md_writes_are_valid_whole() {
    use avatar_edge_tests::debian::{doc_block, heredoc};
    let docs = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/deploy.md")).expect("deploy.md");
    let block = |name: &str| heredoc(&doc_block(&docs, name));
    let auth = block("relay-auth");
    for (name, text) in [
        ("relay-acme", block("relay-acme")),
        ("relay-certbot", block("relay-certbot")),
        ("relay-certbot + relay-auth", block("relay-certbot") + &auth),
    ] {
        let mut config = avatar_relay::config::RelayConfig::from_toml(&text)
            .unwrap_or_else(|e| panic!("deploy.md's {name}: {e}\n{text}"));
        // (what `secret_file` holds, read at start)
        config.tunnel.secret = avatar_relay::config::Secret::new("a-tunnel-secret-from-the-file");
        config
            .validate()
            .unwrap_or_else(|e| panic!("deploy.md's {name}: {e}\n{text}"));
        assert!(config.unset_required.is_empty(), "{name}: {:?}", config.unset_required);
    }
    // The whole file step 8 shows is step 3b's with step 8's lines appended.
    assert_eq!(
        doc_block(&docs, "relay-final"),
        block("relay-certbot") + &auth,
        "deploy.md's relay-final is relay-certbot then relay-auth"
    );
    for name in ["worker-toml", "worker-toml-production"] {
        let text = block(name);
        let mut config = avatar_worker::config::WorkerConfig::from_toml(&text)
            .unwrap_or_else(|e| panic!("deploy.md's {name}: {e}\n{text}"));
        config.secret = avatar_worker::config::Secret::new("a-tunnel-secret-from-the-file");
        config
            .validate()
            .unwrap_or_else(|e| panic!("deploy.md's {name}: {e}\n{text}"));
    }
}
