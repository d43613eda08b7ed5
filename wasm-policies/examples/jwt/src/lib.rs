//! JSON Web Tokens signed with HS256 (shared secret) or RS256 (your identity provider's key).
//!
//! The token comes from `Authorization: Bearer` or the `token` query parameter. The algorithm is
//! fixed by the config, never taken from the token: a token whose header names another
//! algorithm is refused (this is what stops the classic "alg: none" and RS256→HS256 key
//! confusion attacks). `exp` is required and checked against the relay's clock; `nbf`, `iss` and
//! `aud` are checked when present or configured.
//!
//! Config (JSON):
//! * `algorithm`: `"HS256"` or `"RS256"`.
//! * `secret` (HS256): the shared key.
//! * `public_key_pem` (RS256): the PEM public key (`-----BEGIN PUBLIC KEY-----` or
//!   `-----BEGIN RSA PUBLIC KEY-----`).
//! * `issuer`, `audience`: required values of `iss` / `aud` (optional).
//! * `leeway_s`: clock skew allowed on `exp`/`nbf` (default 30).
//! * `user_claim`: the claim that names the user (default `sub`).
//!
//! String-valued claims other than the registered ones are passed to the router as principal
//! claims (`region`, `plan` ...).
//!
//! Built from RustCrypto parts (`hmac`, `sha2`, `rsa`) rather than the `jsonwebtoken` crate:
//! on `wasm32-unknown-unknown` that crate links `js-sys` (wasm-bindgen imports a policy cannot
//! have). The relay's tests mint tokens with `jsonwebtoken`, so the two are checked against each
//! other.

use avatar_policy_sdk::auth::*;
use avatar_policy_sdk::host;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use hmac::{Hmac, Mac};
use rsa::pkcs1::DecodeRsaPublicKey;
use rsa::pkcs1v15::{Signature, VerifyingKey};
use rsa::pkcs8::DecodePublicKey;
use rsa::signature::Verifier;
use rsa::RsaPublicKey;
use serde_json::{Map, Value};
use sha2::Sha256;

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct Config {
    algorithm: String,
    #[serde(default)]
    secret: Option<String>,
    #[serde(default)]
    public_key_pem: Option<String>,
    #[serde(default)]
    issuer: Option<String>,
    #[serde(default)]
    audience: Option<String>,
    #[serde(default = "default_leeway")]
    leeway_s: u64,
    #[serde(default = "default_user_claim")]
    user_claim: String,
}

fn default_leeway() -> u64 {
    30
}

fn default_user_claim() -> String {
    "sub".into()
}

enum Key {
    Hs256(Vec<u8>),
    Rs256(Box<VerifyingKey<Sha256>>),
}

impl Key {
    fn algorithm(&self) -> &'static str {
        match self {
            Key::Hs256(_) => "HS256",
            Key::Rs256(_) => "RS256",
        }
    }

    fn verify(&self, signing_input: &[u8], signature: &[u8]) -> bool {
        match self {
            Key::Hs256(secret) => Hmac::<Sha256>::new_from_slice(secret)
                .map(|mac| mac.chain_update(signing_input).verify_slice(signature).is_ok())
                .unwrap_or(false),
            Key::Rs256(key) => Signature::try_from(signature)
                .map(|sig| key.verify(signing_input, &sig).is_ok())
                .unwrap_or(false),
        }
    }
}

struct Checker {
    key: Key,
    config: Config,
}

fn checker() -> Result<Checker, String> {
    let config: Config = avatar_policy_sdk::config_json()?;
    let key = match config.algorithm.as_str() {
        "HS256" => Key::Hs256(
            config
                .secret
                .as_deref()
                .ok_or("HS256 needs `secret`")?
                .as_bytes()
                .to_vec(),
        ),
        "RS256" => {
            let pem = config.public_key_pem.as_deref().ok_or("RS256 needs `public_key_pem`")?;
            let key = RsaPublicKey::from_public_key_pem(pem)
                .or_else(|_| RsaPublicKey::from_pkcs1_pem(pem))
                .map_err(|e| format!("public_key_pem: {e}"))?;
            Key::Rs256(Box::new(VerifyingKey::new(key)))
        }
        other => return Err(format!("unsupported algorithm `{other}` (use HS256 or RS256)")),
    };
    Ok(Checker { key, config })
}

#[derive(serde::Deserialize)]
struct Header {
    alg: String,
}

fn decode_json<T: serde::de::DeserializeOwned>(part: &str) -> Result<T, String> {
    let bytes = URL_SAFE_NO_PAD.decode(part).map_err(|_| "malformed token")?;
    serde_json::from_slice(&bytes).map_err(|_| "malformed token".into())
}

impl Checker {
    fn verify(&self, token: &str, now_s: u64) -> Result<Principal, String> {
        let parts: Vec<&str> = token.split('.').collect();
        let [header, payload, signature] = parts[..] else {
            return Err("malformed token: a JWT has three dot-separated parts".into());
        };
        let header: Header = decode_json(header)?;
        if header.alg != self.key.algorithm() {
            return Err(format!(
                "wrong algorithm: token is signed with {}, this relay accepts {}",
                header.alg,
                self.key.algorithm()
            ));
        }
        let signature = URL_SAFE_NO_PAD.decode(signature).map_err(|_| "malformed token")?;
        let signing_input = &token[..token.len() - parts[2].len() - 1];
        if !self.key.verify(signing_input.as_bytes(), &signature) {
            return Err("bad signature".into());
        }
        let claims: Map<String, Value> = decode_json(payload)?;
        let leeway = self.config.leeway_s;
        let exp = claims.get("exp").and_then(Value::as_u64).ok_or("token has no `exp`")?;
        if exp + leeway <= now_s {
            return Err("token expired".into());
        }
        if let Some(nbf) = claims.get("nbf").and_then(Value::as_u64) {
            if nbf > now_s + leeway {
                return Err("token not yet valid".into());
            }
        }
        if let Some(iss) = &self.config.issuer {
            if claims.get("iss").and_then(Value::as_str) != Some(iss) {
                return Err("wrong issuer".into());
            }
        }
        if let Some(aud) = &self.config.audience {
            let ok = match claims.get("aud") {
                Some(Value::String(a)) => a == aud,
                Some(Value::Array(list)) => list.iter().any(|a| a.as_str() == Some(aud)),
                _ => false,
            };
            if !ok {
                return Err("wrong audience".into());
            }
        }
        let user = claims
            .get(&self.config.user_claim)
            .and_then(Value::as_str)
            .filter(|u| !u.is_empty())
            .ok_or_else(|| format!("token has no `{}`", self.config.user_claim))?;
        let mut principal = Principal::user(user).with_claim("auth", "jwt");
        const REGISTERED: &[&str] = &["iss", "sub", "aud", "exp", "nbf", "iat", "jti"];
        for (k, v) in &claims {
            if let (false, Some(v)) = (REGISTERED.contains(&k.as_str()), v.as_str()) {
                principal = principal.with_claim(k.clone(), v);
            }
        }
        Ok(principal)
    }
}

struct Jwt;

impl Guest for Jwt {
    fn authorize_connect(request: ConnectRequest) -> ConnectDecision {
        let checker = match checker() {
            Ok(c) => c,
            Err(e) => {
                host::warn(&format!("policy config: {e}"));
                return ConnectDecision::deny("authentication is misconfigured on this relay");
            }
        };
        let Some(token) = request.token("token") else {
            return ConnectDecision::deny("missing token: pass ?token=... or Authorization: Bearer");
        };
        match checker.verify(&token, request.now_ms / 1000) {
            Ok(principal) => ConnectDecision::Allow(principal),
            Err(reason) => ConnectDecision::deny(reason),
        }
    }

    fn authorize_message(_request: MessageRequest) -> Verdict {
        Verdict::Allow
    }
}

avatar_policy_sdk::export_auth!(Jwt);

/// Verifying signatures needs no randomness, and a policy has no entropy source: anything that
/// asks for random bytes gets an error instead of a silently weak seed.
fn no_randomness(_buf: &mut [u8]) -> Result<(), getrandom::Error> {
    Err(getrandom::Error::UNSUPPORTED)
}

getrandom::register_custom_getrandom!(no_randomness);
