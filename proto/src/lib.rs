//! Wire formats of avatar-edge, with no I/O and no async runtime.
//!
//! A browser session crosses two wires:
//!
//! 1. **Signaling** ([`signaling`]): JSON text messages on the browser's WebSocket to the relay,
//!    exactly as the customer's existing page speaks them (`webrtc_offer`, `webrtc_answer`,
//!    `webrtc_ice_candidate`, `text_webrtc`), plus server events such as `error`.
//! 2. **The tunnel** ([`tunnel`]): length-prefixed frames on streams between the relay and a
//!    worker that dialed out to it: QUIC streams, or yamux streams over TLS/TCP where UDP is
//!    blocked. One control stream per worker; one stream per session.
//!
//! [`session`] holds the relay's per-session rules as a state machine driven by decoded messages,
//! and [`sdp`] the quick offer check that catches pages that forgot to add transceivers.
//! [`netfilter`] is the special-purpose address list that both the TURN server's peers and the
//! worker's remote ICE candidates are checked against. [`required`] finds the placeholders a shipped
//! configuration file marks for the operator to fill in. [`api`] is the session API's commands as
//! the relay carries them to workers, and [`webhook`] names the events the relay sends the
//! operator's webhooks.
//!
//! Everything here is a pure function or a state machine: the relay and worker own the sockets,
//! the tests and fuzz targets drive these types directly.

pub mod api;
#[cfg(feature = "mux")]
pub mod mux;
pub mod netfilter;
pub mod required;
pub mod sdp;
pub mod session;
pub mod signaling;
#[cfg(feature = "io")]
pub mod stream;
pub mod tunnel;
pub mod webhook;

pub use signaling::{ClientMessage, ErrorCode, Id, ServerEvent, SignalError};
