//! What the relay gives every policy: logging, the operator's config, the time.
//!
//! These are the only imports a policy has. Logs go to the relay's log under the policy's name
//! (cut at 1 KiB each, and only the first few per decision).

#[cfg(feature = "auth")]
use crate::auth::avatar_edge::policy::host as imports;
#[cfg(all(feature = "router", not(feature = "auth")))]
use crate::router::avatar_edge::policy::host as imports;

#[cfg(not(any(feature = "auth", feature = "router")))]
compile_error!("enable the `auth` or `router` feature of avatar-policy-sdk: the world your policy implements");

pub use imports::Level;

/// The operator's configuration string for this module (usually JSON; see [`crate::config_json`]).
pub fn config() -> String {
    imports::config()
}

/// Milliseconds since the Unix epoch, from the relay's clock.
pub fn now_ms() -> u64 {
    imports::now_ms()
}

/// Seconds since the Unix epoch, from the relay's clock.
pub fn now_s() -> u64 {
    now_ms() / 1000
}

pub fn log(level: Level, message: &str) {
    imports::log(level, message)
}

pub fn debug(message: &str) {
    log(Level::Debug, message)
}

pub fn info(message: &str) {
    log(Level::Info, message)
}

pub fn warn(message: &str) {
    log(Level::Warn, message)
}
