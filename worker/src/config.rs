//! The worker's configuration: one TOML file, every key optional except what `validate` demands,
//! unknown keys rejected. Secrets can come from `AVATAR_EDGE_TUNNEL_SECRET` instead of the file.

use serde::Deserialize;
use std::fmt;
use std::path::PathBuf;

/// A secret string that never appears in logs or `Debug` output.
#[derive(Clone, Default, Deserialize, PartialEq, Eq)]
#[serde(transparent)]
pub struct Secret(String);

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
pub const DEV_TUNNEL_SECRET: &str = "avatar-edge-dev-secret-do-not-deploy";

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WorkerConfig {
    /// This worker's id at the relay; a reconnect under the same id replaces the old entry.
    pub worker_id: String,
    /// Sessions this worker runs at once.
    pub capacity: u32,
    /// Shared tunnel secret. Overridden by `AVATAR_EDGE_TUNNEL_SECRET`.
    pub secret: Secret,
    /// Relays to keep a tunnel to.
    pub relays: Vec<RelayTarget>,
    pub ice: IceConfig,
    pub video: VideoConfig,
    /// Directory of avatars (`<id>/avatar.toml` + video). Unset: the built-in synthetic avatar.
    pub avatar_dir: Option<PathBuf>,
    /// Labels sent to the relay at registration (for routing policies).
    pub labels: std::collections::BTreeMap<String, String>,
    /// Serve Prometheus metrics at `http://<this address>/metrics`. Unset: no listener.
    pub metrics_listen: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, Deserialize)]
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
}

#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IceConfig {
    /// Offer loopback candidates (tests and single-host demos only).
    pub include_loopback: bool,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct VideoConfig {
    pub width: u32,
    pub height: u32,
    pub fps: u32,
    pub bitrate_kbps: u32,
    /// Keyframe interval in frames.
    pub gop: u32,
    /// `auto` (h264_nvenc if it opens, else libx264), `h264_nvenc` or `libx264`.
    pub encoder: String,
}

impl Default for WorkerConfig {
    fn default() -> Self {
        Self {
            worker_id: "worker-1".into(),
            capacity: 4,
            secret: Secret::default(),
            relays: Vec::new(),
            ice: IceConfig::default(),
            video: VideoConfig::default(),
            avatar_dir: None,
            labels: Default::default(),
            metrics_listen: None,
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
            encoder: "auto".into(),
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
}

impl WorkerConfig {
    pub fn from_toml(text: &str) -> Result<Self, ConfigError> {
        Ok(toml::from_str(text)?)
    }

    pub fn load(path: &std::path::Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.into(),
            source,
        })?;
        Self::from_toml(&text)
    }

    /// Defaults for `worker --dev`: one relay on 127.0.0.1:4433 pinned through the fingerprint
    /// file a `relay --dev` writes, loopback candidates on, the built-in avatar.
    pub fn dev() -> Self {
        Self {
            secret: Secret::new(DEV_TUNNEL_SECRET),
            relays: vec![RelayTarget {
                address: "127.0.0.1:4433".into(),
                server_name: Some("localhost".into()),
                fingerprint: None,
                fingerprint_file: Some(PathBuf::from(".avatar-edge-dev/relay.fingerprint")),
                ca_file: None,
            }],
            ice: IceConfig { include_loopback: true },
            ..Self::default()
        }
    }

    pub fn apply_env(&mut self) {
        if let Ok(s) = std::env::var("AVATAR_EDGE_TUNNEL_SECRET") {
            self.secret = Secret::new(s);
        }
    }

    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, message: &str| {
            Err(ConfigError::Invalid {
                key,
                message: message.into(),
            })
        };
        if !avatar_proto::tunnel::valid_worker_id(&self.worker_id) {
            return invalid("worker_id", "1-64 characters of [A-Za-z0-9-_.:]");
        }
        if self.capacity == 0 {
            return invalid("capacity", "must be at least 1");
        }
        if self.secret.expose().len() < 16 {
            return invalid(
                "secret",
                "set a secret of at least 16 characters (or AVATAR_EDGE_TUNNEL_SECRET)",
            );
        }
        if self.relays.is_empty() {
            return invalid("relays", "name at least one relay");
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
        let v = &self.video;
        if v.width == 0 || v.height == 0 || v.width % 2 == 1 || v.height % 2 == 1 || v.width > 4096 || v.height > 4096 {
            return invalid("video.width", "width and height must be even and between 2 and 4096");
        }
        if !(1..=60).contains(&v.fps) {
            return invalid("video.fps", "must be 1..=60");
        }
        if !["auto", "h264_nvenc", "libx264"].contains(&v.encoder.as_str()) {
            return invalid("video.encoder", "must be auto, h264_nvenc or libx264");
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
