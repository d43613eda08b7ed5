//! STUN/TURN servers for browsers and workers, with coturn REST-API credentials.
//!
//! A TURN server relays for whoever holds a valid credential, so credentials must be short-lived
//! and minted per user. coturn's `use-auth-secret` scheme (the "TURN REST API") needs no shared
//! state between the relay and coturn beyond one secret: the username is
//! `<unix expiry>:<user>`, the password `base64(HMAC-SHA1(secret, username))`. coturn recomputes
//! the password from the username and refuses it after the expiry; browsers take the pair as
//! ordinary `username` / `credential` of an `RTCIceServer`.
//!
//! The relay hands them out three ways: an `ice_servers` event right after a browser connects,
//! `GET /api/ice-servers` for custom front ends, and inside each session's `Open` frame for the
//! worker, whose answer then carries relay candidates — which is what lets the customer's page,
//! which ignores new events, still connect through TURN.
//!
//! The user inside a username says **whose** it is, in a namespace a browser cannot enter:
//! `b.<user>` for a browser (its principal, or its session id without an auth policy) and
//! `w.<worker id>` for a worker. A browser that picks a session id shaped like a worker's id
//! still gets a `b.` name, so it can never spend a worker's TURN quota ([`TurnUser::of`] reads
//! the namespace back on the TURN server's side).

use crate::config::{TurnConfig, TurnMode};
use avatar_proto::signaling::IceServer;
use base64::Engine as _;
use hmac::{Hmac, Mac};

/// Seconds since the Unix epoch.
pub fn unix_now() -> u64 {
    crate::policy::now_ms() / 1000
}

/// coturn REST-API credentials for `user`, valid until `expiry` (Unix seconds).
pub fn rest_credentials(secret: &str, user: &str, expiry: u64) -> (String, String) {
    let username = format!("{expiry}:{user}");
    let password = rest_password(secret, &username);
    (username, password)
}

/// The REST-API password of `username`: base64(HMAC-SHA1(secret, username)).
pub fn rest_password(secret: &str, username: &str) -> String {
    // HMAC accepts keys of any length: `new_from_slice` cannot fail for it.
    match Hmac::<sha1::Sha1>::new_from_slice(secret.as_bytes()) {
        Ok(mut mac) => {
            mac.update(username.as_bytes());
            base64::engine::general_purpose::STANDARD.encode(mac.finalize().into_bytes())
        }
        Err(_) => String::new(),
    }
}

/// Whose credential it is: the namespace inside a TURN username.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TurnUser<'a> {
    /// A browser: its principal's user id, or its session id.
    Browser(&'a str),
    /// A worker, for its own side of a session.
    Worker(&'a str),
}

impl<'a> TurnUser<'a> {
    const BROWSER: &'static str = "b.";
    const WORKER: &'static str = "w.";

    /// The user part of a minted username (after `<expiry>:`).
    fn user_part(self) -> String {
        match self {
            TurnUser::Browser(user) => format!("{}{}", Self::BROWSER, sanitize(user)),
            TurnUser::Worker(id) => format!("{}{}", Self::WORKER, sanitize(id)),
        }
    }

    /// Whose a TURN username (`<expiry>:<user part>`) is. Names not minted by this relay (an
    /// operator's static ones) count as browsers: only the relay mints worker identities.
    pub fn of(username: &'a str) -> TurnUser<'a> {
        let user = username.split_once(':').map_or(username, |(_, u)| u);
        match user.strip_prefix(Self::WORKER) {
            Some(id) => TurnUser::Worker(id),
            None => TurnUser::Browser(user.strip_prefix(Self::BROWSER).unwrap_or(user)),
        }
    }
}

/// A user name safe inside a TURN username (`:` separates the expiry; keep it printable).
fn sanitize(user: &str) -> String {
    let s: String = user
        .chars()
        .filter(|c| c.is_ascii_graphic() && *c != ':')
        .take(64)
        .collect();
    if s.is_empty() {
        "anonymous".into()
    } else {
        s
    }
}

/// Mints the ICE server list from `[turn]`.
#[derive(Debug, Clone)]
pub struct IceServers {
    mode: TurnMode,
    secret: crate::config::Secret,
    turn_urls: Vec<String>,
    stun_urls: Vec<String>,
    ttl_s: u64,
}

impl IceServers {
    /// From `[turn]`; the embedded server's URLs are derived from its listeners when none are set.
    pub fn new(cfg: &TurnConfig) -> Self {
        Self {
            mode: cfg.mode,
            secret: cfg.secret.clone(),
            turn_urls: cfg.turn_urls(),
            stun_urls: cfg.stun_urls(),
            ttl_s: cfg.ttl_s,
        }
    }

    /// Whether anything is handed out.
    pub fn enabled(&self) -> bool {
        self.mode != TurnMode::Off && !(self.turn_urls.is_empty() && self.stun_urls.is_empty())
    }

    pub fn ttl_s(&self) -> u64 {
        self.ttl_s
    }

    /// The list for `who` at time `now`: STUN without credentials, TURN with fresh ones.
    pub fn servers(&self, who: TurnUser<'_>, now: u64) -> Vec<IceServer> {
        if !self.enabled() {
            return Vec::new();
        }
        let mut out = Vec::new();
        if !self.stun_urls.is_empty() {
            out.push(IceServer {
                urls: self.stun_urls.clone(),
                username: None,
                credential: None,
            });
        }
        if !self.turn_urls.is_empty() {
            let (username, password) = rest_credentials(self.secret.expose(), &who.user_part(), now + self.ttl_s);
            out.push(IceServer {
                urls: self.turn_urls.clone(),
                username: Some(username),
                credential: Some(password),
            });
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Secret;

    #[test]
    fn credentials_follow_the_coturn_rest_api() {
        // Reference: printf '%s' '1700000300:alice' | openssl dgst -sha1 -hmac 'north-star-secret' -binary | base64
        let (user, pass) = rest_credentials("north-star-secret", "alice", 1_700_000_300);
        assert_eq!(user, "1700000300:alice");
        assert_eq!(pass, "vrMTbz7LFHUArX/HUJp975yviSU=");
    }

    #[test]
    fn servers_carry_fresh_credentials_and_stun_without() {
        let ice = IceServers::new(&TurnConfig {
            mode: TurnMode::External,
            secret: Secret::new("north-star-secret"),
            urls: vec!["turn:203.0.113.1:3478?transport=udp".into()],
            stun_urls: vec!["stun:203.0.113.1:3478".into()],
            ttl_s: 300,
            ..TurnConfig::default()
        });
        let list = ice.servers(TurnUser::Browser("bob:evil\nname"), 1_700_000_000);
        assert_eq!(list.len(), 2);
        assert_eq!(list[0].username, None);
        let turn = &list[1];
        assert_eq!(turn.username.as_deref(), Some("1700000300:b.bobevilname"));
        let (_, expected) = rest_credentials("north-star-secret", "b.bobevilname", 1_700_000_300);
        assert_eq!(turn.credential.as_deref(), Some(expected.as_str()));
        assert!(IceServers::new(&TurnConfig::default())
            .servers(TurnUser::Browser("x"), 0)
            .is_empty());
    }

    #[test]
    fn a_browser_can_never_be_handed_a_worker_identity() {
        let ice = IceServers::new(&TurnConfig {
            mode: TurnMode::External,
            secret: Secret::new("north-star-secret"),
            urls: vec!["turn:203.0.113.1:3478?transport=udp".into()],
            ..TurnConfig::default()
        });
        let name = |who| ice.servers(who, 1000)[0].username.clone().expect("username");
        let worker = name(TurnUser::Worker("gpu-1"));
        assert_eq!(TurnUser::of(&worker), TurnUser::Worker("gpu-1"));
        // Session ids shaped like every spelling of the worker's identity stay browsers.
        for session_id in ["w.gpu-1", "worker-gpu-1", "gpu-1", "1300:w.gpu-1", ":w.gpu-1"] {
            let browser = name(TurnUser::Browser(session_id));
            assert_ne!(browser, worker, "{session_id}");
            assert!(
                matches!(TurnUser::of(&browser), TurnUser::Browser(_)),
                "{session_id}: {browser}"
            );
        }
        assert_eq!(TurnUser::of("1300:static-user"), TurnUser::Browser("static-user"));
    }
}
