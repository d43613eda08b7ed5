//! The webhook events' names: what `type` says in each event the relay POSTs to the operator's
//! `[[webhooks]]` (see `docs/webhooks.md`), and what a webhook's `events` filter may list.

/// Every event type, as `type` names it.
pub const EVENT_TYPES: &[&str] = &[
    SESSION_STARTED,
    SESSION_ENDED,
    TRANSCRIPT_USER,
    TRANSCRIPT_ASSISTANT,
    RECORDING_READY,
];
pub const SESSION_STARTED: &str = "session.started";
pub const SESSION_ENDED: &str = "session.ended";
pub const TRANSCRIPT_USER: &str = "transcript.user";
pub const TRANSCRIPT_ASSISTANT: &str = "transcript.assistant";
pub const RECORDING_READY: &str = "recording.ready";
