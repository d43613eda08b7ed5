//! The rules of one browser session, as a plain state machine (no sockets, no clock).
//!
//! The relay feeds it each WebSocket text message and each tunnel outcome, and performs the
//! [`Action`] it returns. Keeping the rules here means every sequence — a candidate before the
//! offer, a second offer, a worker that vanishes mid-session — is tested without a network.
//!
//! ```text
//!             offer (valid)            route ok
//!  AwaitingOffer ───────────▶ Action::Route ───────▶ Attached(worker)
//!       ▲                          │ route failed        │ offer / candidate / text → Forward
//!       │                          ▼                     │
//!       └──── error event ◀────────┘◀──── worker lost ───┘
//! ```

use crate::sdp::inspect_offer;
use crate::signaling::{decode_client_message, ClientMessage, ErrorCode, Offer, ServerEvent};

/// Where the session stands.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SessionState {
    /// No worker yet: waiting for a valid `webrtc_offer`.
    AwaitingOffer,
    /// A relay → worker stream is open for this session.
    Attached { worker_id: String },
}

/// What the relay must do next.
#[derive(Debug, Clone, PartialEq)]
pub enum Action {
    /// Send this event to the browser; nothing else changes.
    Reply(ServerEvent),
    /// Choose a worker for this offer and open a session stream to it, then report back with
    /// [`SignalingSession::attached`] or [`SignalingSession::route_failed`].
    Route(Offer),
    /// Pass this message to the attached worker.
    Forward(ClientMessage),
    /// Nothing to do (e.g. the end-of-candidates marker).
    Ignore,
}

/// One browser session's signaling rules.
#[derive(Debug)]
pub struct SignalingSession {
    state: SessionState,
    max_message_len: usize,
}

impl SignalingSession {
    pub fn new(max_message_len: usize) -> Self {
        Self {
            state: SessionState::AwaitingOffer,
            max_message_len,
        }
    }

    pub fn state(&self) -> &SessionState {
        &self.state
    }

    /// A text message arrived from the browser.
    pub fn on_text(&mut self, text: &str) -> Action {
        match decode_client_message(text, self.max_message_len) {
            Ok(msg) => self.on_message(msg),
            Err(e) => Action::Reply(e.to_event()),
        }
    }

    /// A decoded message arrived from the browser.
    pub fn on_message(&mut self, msg: ClientMessage) -> Action {
        if let ClientMessage::WebrtcOffer(offer) = &msg {
            if let Err(e) = inspect_offer(&offer.sdp) {
                return Action::Reply(e.to_event());
            }
        }
        if let ClientMessage::WebrtcIceCandidate(c) = &msg {
            if c.candidate.as_ref().is_none_or(|c| c.is_end_of_candidates()) {
                return Action::Ignore;
            }
        }
        match (&self.state, msg) {
            (SessionState::AwaitingOffer, ClientMessage::WebrtcOffer(offer)) => Action::Route(offer),
            (SessionState::AwaitingOffer, other) => Action::Reply(ServerEvent::error(
                ErrorCode::NoSession,
                format!("`{}` needs a session: send webrtc_offer first", other.kind()),
            )),
            (SessionState::Attached { .. }, msg) => Action::Forward(msg),
        }
    }

    /// The worker accepted the session stream.
    pub fn attached(&mut self, worker_id: impl Into<String>) {
        self.state = SessionState::Attached {
            worker_id: worker_id.into(),
        };
    }

    /// Routing failed; `event` goes to the browser and the socket stays open for another offer.
    pub fn route_failed(&mut self, code: ErrorCode, message: impl Into<String>) -> ServerEvent {
        self.state = SessionState::AwaitingOffer;
        ServerEvent::error(code, message)
    }

    /// The worker's stream ended without a `Close`: its connection was lost.
    pub fn worker_lost(&mut self) -> Option<ServerEvent> {
        match std::mem::replace(&mut self.state, SessionState::AwaitingOffer) {
            SessionState::Attached { worker_id } => Some(ServerEvent::error(
                ErrorCode::WorkerLost,
                format!("worker {worker_id} went away; send a new webrtc_offer to start again"),
            )),
            SessionState::AwaitingOffer => None,
        }
    }

    /// The worker closed the session on purpose (peer failed, shutting down).
    pub fn worker_closed(&mut self) {
        self.state = SessionState::AwaitingOffer;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signaling::DEFAULT_MAX_MESSAGE_LEN;

    const OFFER_SDP: &str =
        "v=0\\r\\no=- 1 2 IN IP4 127.0.0.1\\r\\ns=-\\r\\nt=0 0\\r\\nm=video 9 UDP/TLS/RTP/SAVPF 96\\r\\n";

    fn offer() -> String {
        format!(r#"{{"type":"webrtc_offer","user_id":5,"avatar_id":"a","sdp":"{OFFER_SDP}"}}"#)
    }
    const CAND: &str = r#"{"type":"webrtc_ice_candidate","candidate":{"candidate":"candidate:1 1 udp 1 ::1 9 typ host","sdpMid":"0","sdpMLineIndex":0}}"#;
    const TEXT: &str = r#"{"type":"text_webrtc","message":"hi"}"#;

    fn code(a: Action) -> ErrorCode {
        match a {
            Action::Reply(ServerEvent::Error { code, .. }) => code,
            other => panic!("expected an error reply, got {other:?}"),
        }
    }

    #[test]
    fn candidate_or_text_before_offer_is_refused_and_offer_still_works() {
        let mut s = SignalingSession::new(DEFAULT_MAX_MESSAGE_LEN);
        assert_eq!(code(s.on_text(CAND)), ErrorCode::NoSession);
        assert_eq!(code(s.on_text(TEXT)), ErrorCode::NoSession);
        assert!(matches!(s.on_text(&offer()), Action::Route(o) if o.avatar_id.as_deref() == Some("a")));
    }

    #[test]
    fn bad_input_leaves_the_session_usable() {
        let mut s = SignalingSession::new(DEFAULT_MAX_MESSAGE_LEN);
        assert_eq!(code(s.on_text("not json")), ErrorCode::BadJson);
        assert_eq!(code(s.on_text(r#"{"type":"nope"}"#)), ErrorCode::UnknownType);
        assert_eq!(code(s.on_text(r#"{"type":"webrtc_offer"}"#)), ErrorCode::InvalidMessage);
        assert_eq!(
            code(s.on_text(r#"{"type":"webrtc_offer","sdp":"hello"}"#)),
            ErrorCode::BadSdp
        );
        assert_eq!(
            code(s.on_text(&"x".repeat(DEFAULT_MAX_MESSAGE_LEN + 1))),
            ErrorCode::MessageTooLarge
        );
        assert_eq!(s.state(), &SessionState::AwaitingOffer);
        assert!(matches!(s.on_text(&offer()), Action::Route(_)));
    }

    #[test]
    fn attached_session_forwards_everything() {
        let mut s = SignalingSession::new(DEFAULT_MAX_MESSAGE_LEN);
        assert!(matches!(s.on_text(&offer()), Action::Route(_)));
        s.attached("w1");
        assert!(matches!(
            s.on_text(CAND),
            Action::Forward(ClientMessage::WebrtcIceCandidate(_))
        ));
        assert!(matches!(s.on_text(TEXT), Action::Forward(ClientMessage::TextWebrtc(_))));
        assert!(matches!(
            s.on_text(&offer()),
            Action::Forward(ClientMessage::WebrtcOffer(_))
        ));
        // Bad input while attached is still answered locally, never forwarded.
        assert_eq!(code(s.on_text("{")), ErrorCode::BadJson);
    }

    #[test]
    fn end_of_candidates_is_ignored_in_any_state() {
        let mut s = SignalingSession::new(DEFAULT_MAX_MESSAGE_LEN);
        let eoc = r#"{"type":"webrtc_ice_candidate","candidate":{"candidate":"","sdpMid":"0"}}"#;
        assert_eq!(s.on_text(eoc), Action::Ignore);
        assert_eq!(
            s.on_text(r#"{"type":"webrtc_ice_candidate","candidate":null}"#),
            Action::Ignore
        );
        s.attached("w");
        assert_eq!(s.on_text(eoc), Action::Ignore);
    }

    #[test]
    fn route_failure_and_worker_loss_return_to_awaiting_offer() {
        let mut s = SignalingSession::new(DEFAULT_MAX_MESSAGE_LEN);
        assert!(matches!(s.on_text(&offer()), Action::Route(_)));
        let ev = s.route_failed(ErrorCode::NoWorker, "none");
        assert!(matches!(
            ev,
            ServerEvent::Error {
                code: ErrorCode::NoWorker,
                ..
            }
        ));
        assert_eq!(s.state(), &SessionState::AwaitingOffer);
        assert_eq!(s.worker_lost(), None, "no worker, nothing lost");

        assert!(matches!(s.on_text(&offer()), Action::Route(_)));
        s.attached("w9");
        let lost = s.worker_lost().expect("event");
        assert!(matches!(&lost, ServerEvent::Error { code: ErrorCode::WorkerLost, message } if message.contains("w9")));
        assert_eq!(code(s.on_text(CAND)), ErrorCode::NoSession);
        assert!(matches!(s.on_text(&offer()), Action::Route(_)));
    }
}
