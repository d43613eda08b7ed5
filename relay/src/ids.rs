//! Checks on what a caller presents to name a session or to prove a key.
//!
//! Session ids arrive in URLs (`/ws/{session_id}`, `/api/v1/sessions/{id}`) and go on into logs
//! and tunnel frames; bearer tokens arrive in headers and are compared against configured
//! secrets. Both the browser-facing HTTP routes and the session API apply these same rules, so
//! they live here, as pure functions that import nothing from the rest of the crate.

/// Whether `id` may name a session: 1 to 128 printable ASCII characters.
///
/// Session ids appear in logs and tunnel frames: keeping them short and printable keeps a caller
/// from writing control characters or megabytes into either.
pub(crate) fn valid_session_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 128 && id.chars().all(|c| c.is_ascii_graphic())
}

/// Equal bytes, compared in time that depends only on the length.
///
/// For comparing a presented token with a secret: an early return at the first differing byte
/// would tell a caller, by the time taken, how much of a guess was right. The length is not
/// hidden; callers that must hide it compare fixed-length digests.
pub(crate) fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn session_ids_are_checked() {
        assert!(valid_session_id("test-session-1767600000000"));
        assert!(!valid_session_id(""));
        assert!(!valid_session_id("a b"));
        assert!(!valid_session_id(&"x".repeat(129)));
    }
}
