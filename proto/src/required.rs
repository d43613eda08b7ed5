//! The `REQUIRED` marker of shipped configuration files.
//!
//! The packages install a config in which the few values an operator must choose (the relay's
//! domain, its public address, which relay a worker dials) hold a string that starts with
//! `REQUIRED`, e.g. `domains = ["REQUIRED: your relay's DNS name"]`. A config that still holds one
//! is refused as a whole, naming every such key, before any of its values is interpreted: the
//! operator learns all there is to edit from one `--check-config`, and a service never starts on a
//! placeholder.
//!
//! The config is looked at as JSON (a parsed TOML document converts to it losslessly for this
//! purpose), so this module stays free of any file format.

use serde_json::Value;

/// What a placeholder value starts with.
pub const MARKER: &str = "REQUIRED";

/// Whether a value (from a file or the environment) is still the shipped placeholder.
pub fn is_marked(value: &str) -> bool {
    value.trim_start().starts_with(MARKER)
}

/// The dotted path of every string that still holds the marker, sorted by key: `tls.acme.domains`
/// for a list of strings, `relays[0].address` for a key in an array of tables.
pub fn unset_keys(config: &Value) -> Vec<String> {
    let mut found = Vec::new();
    walk(config, String::new(), &mut found);
    found
}

fn walk(value: &Value, path: String, found: &mut Vec<String>) {
    match value {
        Value::String(s) if is_marked(s) && !found.contains(&path) => found.push(path),
        Value::Object(map) => {
            for (key, v) in map {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                walk(v, child, found);
            }
        }
        Value::Array(items) => {
            for (i, v) in items.iter().enumerate() {
                // A list of plain values is one key to the operator; a list of tables is several.
                let child = if v.is_object() {
                    format!("{path}[{i}]")
                } else {
                    path.clone()
                };
                walk(v, child, found);
            }
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn every_marked_value_is_named_once() {
        let config = json!({
            "relay_id": "vps-1",
            "tls": { "acme": { "domains": ["REQUIRED: your domain", "REQUIRED too"] } },
            "turn": { "embedded": { "public_ip": "  REQUIRED" , "relay_port_min": 49152 } },
            "relays": [ { "address": "relay.example.com:4433" }, { "address": "REQUIRED: host:port" } ],
        });
        assert_eq!(
            unset_keys(&config),
            ["relays[1].address", "tls.acme.domains", "turn.embedded.public_ip"]
        );
    }

    #[test]
    fn a_filled_config_has_nothing_unset() {
        let config = json!({ "tls": { "acme": { "domains": ["relay.example.com"] } }, "note": "not REQUIRED" });
        assert!(unset_keys(&config).is_empty());
        assert!(
            !is_marked("required"),
            "the marker is case-sensitive: a real value may contain the word"
        );
    }
}
