//! Media: idle avatars ([`avatar`]), H.264 encoding ([`encoder`]) and the per-session video clock
//! ([`stream`]). Everything here runs on plain threads, never on the async runtime.

pub mod avatar;
pub mod encoder;
pub mod file;
pub mod stream;
