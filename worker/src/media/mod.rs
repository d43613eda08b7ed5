//! Media: idle avatars ([`avatar`]), H.264 encoding ([`encoder`]), the per-session video clock
//! ([`stream`]), following the viewer's bandwidth ([`rate`]) and sending video paced to it
//! ([`send`]), further sinks of the same encoded media ([`fanout`]), and recording it to a file
//! ([`record`]). The clock and the encoders run on plain threads, never on the async runtime.

pub mod avatar;
pub mod encoder;
pub mod fanout;
pub mod file;
pub mod rate;
pub mod record;
pub mod send;
pub mod stream;
