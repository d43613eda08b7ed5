//! HMAC-signed tokens, checked without any call to your backend.
//!
//! Your backend mints a token for a signed-in user and the page passes it as `?token=` on the
//! WebSocket URL (browsers cannot set headers on a WebSocket) or in `Authorization: Bearer`.
//!
//! Token: `<user>.<expiry>.<signature>` where `expiry` is Unix seconds and `signature` is
//! base64url (no padding) of HMAC-SHA256(secret, "<user>.<expiry>"). The user id may contain
//! dots; the last two fields may not. Mint one in a shell:
//!
//! ```sh
//! user=alice; exp=$(( $(date +%s) + 3600 ))
//! sig=$(printf '%s' "$user.$exp" | openssl dgst -sha256 -hmac "$SECRET" -binary | basenc --base64url | tr -d '=')
//! echo "$user.$exp.$sig"
//! ```
//!
//! Config (JSON):
//! * `secret` (required): the shared key; keep it in a `config_file` readable by the relay only.
//! * `param`: query parameter holding the token (default `token`).
//! * `max_lifetime_s`: refuse tokens that expire further ahead than this (default one day), so a
//!   leaked long-lived token is not forever.
//! * `avatars`: if set, offers may only ask for these avatars (a per-message check).

use avatar_policy_sdk::auth::*;
use avatar_policy_sdk::host;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use sha2::Sha256;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    secret: String,
    #[serde(default = "default_param")]
    param: String,
    #[serde(default = "default_max_lifetime")]
    max_lifetime_s: u64,
    #[serde(default)]
    avatars: Option<Vec<String>>,
}

fn default_param() -> String {
    "token".into()
}

fn default_max_lifetime() -> u64 {
    86_400
}

fn config() -> Result<Config, String> {
    let config: Config = avatar_policy_sdk::config_json()?;
    if config.secret.len() < 16 {
        return Err("policy config: `secret` must be at least 16 bytes".into());
    }
    Ok(config)
}

/// Check `token` at time `now_s`; the user id on success.
fn verify(token: &str, secret: &[u8], now_s: u64, max_lifetime_s: u64) -> Result<String, &'static str> {
    let mut parts = token.rsplitn(3, '.');
    let (Some(sig), Some(expiry), Some(user)) = (parts.next(), parts.next(), parts.next()) else {
        return Err("malformed token: expected <user>.<expiry>.<signature>");
    };
    if user.is_empty() {
        return Err("malformed token: empty user");
    }
    let expiry: u64 = expiry.parse().map_err(|_| "malformed token: expiry is not a number")?;
    let sig = URL_SAFE_NO_PAD
        .decode(sig)
        .map_err(|_| "malformed token: signature is not base64url")?;
    let mut mac = Hmac::<Sha256>::new_from_slice(secret).map_err(|_| "bad key")?;
    mac.update(user.as_bytes());
    mac.update(b".");
    mac.update(expiry.to_string().as_bytes());
    // Signature first: an attacker learns nothing about expiry rules from a forged token.
    mac.verify_slice(&sig).map_err(|_| "bad signature")?;
    if expiry <= now_s {
        return Err("token expired");
    }
    if expiry - now_s > max_lifetime_s {
        return Err("token lifetime exceeds the configured maximum");
    }
    Ok(user.to_owned())
}

struct HmacToken;

impl Guest for HmacToken {
    fn authorize_connect(request: ConnectRequest) -> ConnectDecision {
        let config = match config() {
            Ok(c) => c,
            Err(e) => {
                host::warn(&e);
                return ConnectDecision::deny("authentication is misconfigured on this relay");
            }
        };
        let Some(token) = request.token(&config.param) else {
            return ConnectDecision::deny(format!(
                "missing token: pass ?{}=... on the WebSocket URL or Authorization: Bearer",
                config.param
            ));
        };
        match verify(
            &token,
            config.secret.as_bytes(),
            request.now_ms / 1000,
            config.max_lifetime_s,
        ) {
            Ok(user) => ConnectDecision::Allow(Principal::user(user).with_claim("auth", "hmac-token")),
            Err(reason) => ConnectDecision::deny(reason),
        }
    }

    fn authorize_message(request: MessageRequest) -> Verdict {
        let Ok(config) = config() else {
            return Verdict::deny("authentication is misconfigured on this relay");
        };
        match (&config.avatars, request.kind, &request.avatar_id) {
            (Some(allowed), MessageKind::Offer, Some(avatar)) if !allowed.contains(avatar) => {
                Verdict::deny(format!("avatar `{avatar}` is not available to you"))
            }
            _ => Verdict::Allow,
        }
    }
}

avatar_policy_sdk::export_auth!(HmacToken);
