//! Long-term credentials for the embedded TURN server, in coturn's REST-API form.
//!
//! The username is `<unix expiry>:<user>` and the password `base64(HMAC-SHA1(secret, username))`
//! (see [`crate::ice`]), so the server needs no user table: it recomputes the password from the
//! username. The expiry gates **new allocations**; requests on an allocation that already exists
//! (refresh, permissions, channels) are checked with the key it was created with, so a lesson that
//! outlasts the credential's TTL keeps its media path, up to the allocation's own age limit.
//!
//! Nonces are stateless: `<issued unix seconds, hex>-<HMAC of it and the client's IP, hex>`, valid
//! for [`NONCE_LIFETIME_S`]; an old or forged one gets 438 (Stale Nonce) with a fresh one.

use crate::ice::rest_password;
use hmac::{Hmac, Mac};
use sha2::Sha256;
use std::net::IpAddr;

/// How long a nonce is accepted. Long enough that browsers rarely see a 438 mid-session.
pub const NONCE_LIFETIME_S: u64 = 3600;
/// Bytes of HMAC in a nonce: 96 bits, ample for a value that only proves the server issued it.
const NONCE_TAG_LEN: usize = 12;

/// Mints and checks nonces; computes the long-term key of a REST-API username.
pub struct Credentials {
    secret: String,
    realm: String,
    nonce_key: [u8; 32],
}

impl Credentials {
    pub fn new(secret: &str, realm: &str) -> Self {
        Self {
            secret: secret.to_owned(),
            realm: realm.to_owned(),
            nonce_key: rand::random(),
        }
    }

    pub fn realm(&self) -> &str {
        &self.realm
    }

    /// The HMAC over a nonce's issue time and the client's IP; its first [`NONCE_TAG_LEN`] bytes
    /// are the nonce's tag.
    fn nonce_mac(&self, issued: u64, ip: IpAddr) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.nonce_key).expect("HMAC takes keys of any length");
        mac.update(&issued.to_be_bytes());
        mac.update(ip.to_string().as_bytes());
        mac
    }

    /// A fresh nonce for a client at `ip`.
    pub fn nonce(&self, ip: IpAddr, now: u64) -> String {
        let tag = self.nonce_mac(now, ip).finalize().into_bytes();
        format!("{now:x}-{}", hex::encode(&tag[..NONCE_TAG_LEN]))
    }

    /// Whether `nonce` was minted by this server for `ip` and is still fresh (the tag is compared
    /// in constant time).
    pub fn nonce_ok(&self, nonce: &str, ip: IpAddr, now: u64) -> bool {
        let Some((issued, tag)) = nonce.split_once('-') else {
            return false;
        };
        let (Ok(issued), Ok(tag)) = (u64::from_str_radix(issued, 16), hex::decode(tag)) else {
            return false;
        };
        issued <= now
            && now - issued <= NONCE_LIFETIME_S
            && tag.len() == NONCE_TAG_LEN
            && self.nonce_mac(issued, ip).verify_truncated_left(&tag).is_ok()
    }

    /// The MESSAGE-INTEGRITY key for a new allocation by `username` in `realm`; `None` (answered
    /// with 401) for another realm, a username without an expiry, or an expired one.
    pub fn key_for_new(&self, username: &str, realm: &str, now: u64) -> Option<Vec<u8>> {
        if realm != self.realm {
            return None;
        }
        let expiry = username.split(':').next().and_then(|e| e.parse::<u64>().ok())?;
        (expiry > now).then(|| self.key(username))
    }

    /// MD5(username ":" realm ":" password), the long-term credential key (RFC 8489 §9.2.2).
    pub fn key(&self, username: &str) -> Vec<u8> {
        let password = rest_password(&self.secret, username);
        stun::integrity::MessageIntegrity::new_long_term_integrity(username.to_owned(), self.realm.clone(), password).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn nonces_are_bound_to_the_client_and_expire() {
        let c = Credentials::new("0123456789abcdef", "avatar-edge");
        let ip: IpAddr = "192.0.2.7".parse().expect("ip");
        let other: IpAddr = "192.0.2.8".parse().expect("ip");
        let n = c.nonce(ip, 1000);
        assert!(c.nonce_ok(&n, ip, 1000));
        assert!(c.nonce_ok(&n, ip, 1000 + NONCE_LIFETIME_S));
        assert!(!c.nonce_ok(&n, ip, 1001 + NONCE_LIFETIME_S), "expired");
        assert!(!c.nonce_ok(&n, other, 1000), "another client's");
        assert!(!c.nonce_ok("3e8-00", ip, 1000), "forged");
        assert!(
            !c.nonce_ok(&format!("3e8-{}", "0".repeat(24)), ip, 1000),
            "forged, full length"
        );
        assert!(!c.nonce_ok(&n[..n.len() - 2], ip, 1000), "truncated tag");
        assert!(!c.nonce_ok(&format!("{n}00"), ip, 1000), "extended tag");
        assert!(!c.nonce_ok("garbage", ip, 1000));
        let restarted = Credentials::new("0123456789abcdef", "avatar-edge");
        assert!(!restarted.nonce_ok(&n, ip, 1000), "keys are per process");
    }

    #[test]
    fn the_key_is_the_long_term_key_of_the_rest_password() {
        let c = Credentials::new("0123456789abcdef", "avatar-edge");
        let username = "2000:alice";
        let (_, password) = crate::ice::rest_credentials("0123456789abcdef", "alice", 2000);
        let expected =
            stun::integrity::MessageIntegrity::new_long_term_integrity(username.into(), "avatar-edge".into(), password)
                .0;
        assert_eq!(c.key_for_new(username, "avatar-edge", 1999), Some(expected));
        assert_eq!(c.key_for_new(username, "avatar-edge", 2000), None, "expired");
        assert_eq!(c.key_for_new(username, "other", 10), None, "realm");
        assert_eq!(c.key_for_new("alice", "avatar-edge", 10), None, "no expiry");
    }
}
