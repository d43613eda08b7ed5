//! Write avatar-edge relay policies in Rust.
//!
//! A policy is a WebAssembly component that implements one world of the contract in
//! `wasm-policies/wit/policy.wit`. This crate generates the bindings, so a policy is one small
//! `impl`:
//!
//! ```no_run
//! use avatar_policy_sdk::auth::*;
//!
//! struct AllowAll;
//!
//! impl Guest for AllowAll {
//!     fn authorize_connect(request: ConnectRequest) -> ConnectDecision {
//!         ConnectDecision::Allow(Principal::user(request.query_param("user").unwrap_or("guest".into())))
//!     }
//!     fn authorize_message(_request: MessageRequest) -> Verdict {
//!         Verdict::Allow
//!     }
//! }
//!
//! avatar_policy_sdk::export_auth!(AllowAll);
//! ```
//!
//! Enable the feature of the world you implement (`auth` or `router`) and build with
//! `scripts/build-policies` (or `cargo build --target wasm32-unknown-unknown --release` followed by
//! `wasm-tools component new`). Build for `wasm32-unknown-unknown`, not `wasm32-wasip2`: the relay
//! gives policies no WASI and refuses modules that import it.
//!
//! What a policy can rely on:
//! * **Fresh instance per decision.** Globals, caches and `static`s start from scratch on every
//!   call; nothing you keep survives, so nothing leaks from one user's decision into another's.
//!   Anything that must be stable across calls (a user's worker) must be computed, not stored.
//! * **Limits.** A deadline (default 10 ms), a memory cap (default 16 MiB) and an output cap
//!   (default 64 KiB). Exceeding any of them, panicking or trapping is a *failure*: for auth the
//!   relay denies (fail closed), for routing it takes the configured fallback.
//! * **Host functions** in [`host`]: log, the operator's config string, the time.

pub mod host;

#[cfg(all(feature = "arena", target_family = "wasm"))]
mod arena;

#[cfg(all(feature = "arena", target_family = "wasm"))]
#[global_allocator]
static ALLOCATOR: arena::BumpAllocator = arena::BumpAllocator;

#[cfg(feature = "auth")]
pub mod auth;

#[cfg(feature = "router")]
pub mod router;

/// `export_auth!(MyPolicy)`: make `MyPolicy` (an [`auth::Guest`]) the module's exports.
#[cfg(feature = "auth")]
pub use auth::export_auth;
/// `export_router!(MyRouter)`: make `MyRouter` (a [`router::Guest`]) the module's exports.
#[cfg(feature = "router")]
pub use router::export_router;

/// Decode the operator's config string as JSON into `T`. An empty config decodes as `{}`.
///
/// Returns a message fit to show in a deny reason or log when it does not parse.
pub fn config_json<T: serde::de::DeserializeOwned>() -> Result<T, String> {
    parse_config(&host::config())
}

fn parse_config<T: serde::de::DeserializeOwned>(text: &str) -> Result<T, String> {
    let text = if text.trim().is_empty() { "{}" } else { text };
    serde_json::from_str(text).map_err(|e| format!("policy config is not valid: {e}"))
}

/// The value of `name` in a URL query string (`a=1&b=x%20y`), percent-decoded.
pub fn query_param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        (percent_decode(key)? == name).then(|| percent_decode(value)).flatten()
    })
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte; `None` if the
/// result is not UTF-8 or an escape is malformed.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' => {
                let hex = s.get(i + 1..i + 3)?;
                out.push(u8::from_str_radix(hex, 16).ok()?);
                i += 2;
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8(out).ok()
}

/// The token of an `Authorization: Bearer <token>` header value.
pub fn bearer(authorization: &str) -> Option<&str> {
    let (scheme, token) = authorization.trim().split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_params_are_decoded() {
        let q = "avatar=tutor&token=a%2Eb.c&name=Li+Lei&empty=&flag";
        assert_eq!(query_param(q, "token").as_deref(), Some("a.b.c"));
        assert_eq!(query_param(q, "name").as_deref(), Some("Li Lei"));
        assert_eq!(query_param(q, "empty").as_deref(), Some(""));
        assert_eq!(query_param(q, "flag").as_deref(), Some(""));
        assert_eq!(query_param(q, "missing"), None);
        assert_eq!(query_param("token=%zz", "token"), None);
        assert_eq!(query_param("", "token"), None);
    }

    #[test]
    fn bearer_tokens() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer   abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer "), None);
    }

    #[test]
    fn config_parses_json_and_empty() {
        #[derive(serde::Deserialize, Debug, PartialEq)]
        struct C {
            #[serde(default)]
            secret: String,
        }
        assert_eq!(parse_config::<C>("").unwrap(), C { secret: String::new() });
        assert_eq!(
            parse_config::<C>(r#"{"secret":"s"}"#).unwrap(),
            C { secret: "s".into() }
        );
        assert!(parse_config::<C>("secret = 1").unwrap_err().contains("not valid"));
    }
}
