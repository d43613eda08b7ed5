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
//!
//! **The second chance.** An offer the worker has not answered yet is not lost when the worker
//! closes the session (it was ending as the offer crossed): [`SignalingSession::worker_closed`]
//! routes it again, once. An offer whose forwarding fails (the worker's stream is gone) is routed
//! afresh.
//!
//! **Busy is not final while another worker may be free.** A worker that refuses an offer with
//! `busy` (it is the authority on its capacity; in a fleet of relays another relay may have
//! filled it) gets the offer routed again to a worker that has not refused it:
//! [`SignalingSession::worker_event`] returns [`Action::Route`] and [`SignalingSession::refused_by`]
//! names the workers to skip. Each worker refuses an offer at most once, so this ends.

use crate::sdp::{inspect_candidate, inspect_offer};
use crate::signaling::{decode_client_message, ClientMessage, ErrorCode, Offer, ServerEvent};

/// Where the session stands.
#[derive(Debug, Clone, PartialEq)]
pub enum SessionState {
    /// No worker yet: waiting for a valid `webrtc_offer`.
    AwaitingOffer,
    /// A relay → worker stream is open for this session. `unanswered`: the last offer sent to
    /// this worker, until its answer (or error) comes back.
    Attached {
        worker_id: String,
        unanswered: Option<Offer>,
    },
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
    /// The offer being routed is already a second chance: it gets no third.
    rerouting: bool,
    /// Workers that refused the offer being placed as `busy`.
    refused_by: Vec<String>,
}

impl SignalingSession {
    pub fn new(max_message_len: usize) -> Self {
        Self {
            state: SessionState::AwaitingOffer,
            max_message_len,
            rerouting: false,
            refused_by: Vec::new(),
        }
    }

    /// Workers that refused the offer being placed as `busy`: routing skips them.
    pub fn refused_by(&self) -> &[String] {
        &self.refused_by
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
            match &c.candidate {
                Some(c) if !c.is_end_of_candidates() => {
                    if let Err(e) = inspect_candidate(&c.candidate) {
                        return Action::Reply(e.to_event());
                    }
                }
                _ => return Action::Ignore,
            }
        }
        match (&mut self.state, msg) {
            (SessionState::AwaitingOffer, ClientMessage::WebrtcOffer(offer)) => {
                self.refused_by.clear();
                Action::Route(offer)
            }
            (SessionState::AwaitingOffer, other) => Action::Reply(ServerEvent::error(
                ErrorCode::NoSession,
                format!("`{}` needs a session: send webrtc_offer first", other.kind()),
            )),
            (SessionState::Attached { unanswered, .. }, msg) => {
                if let ClientMessage::WebrtcOffer(offer) = &msg {
                    // A new offer: it gets its own second chance.
                    *unanswered = Some(offer.clone());
                }
                Action::Forward(msg)
            }
        }
    }

    /// The worker accepted the session stream that carries `offer`.
    pub fn attached(&mut self, worker_id: impl Into<String>, offer: Offer) {
        let second_chance_left = !std::mem::take(&mut self.rerouting);
        self.state = SessionState::Attached {
            worker_id: worker_id.into(),
            unanswered: second_chance_left.then_some(offer),
        };
    }

    /// Routing failed; `event` goes to the browser and the socket stays open for another offer.
    pub fn route_failed(&mut self, code: ErrorCode, message: impl Into<String>) -> ServerEvent {
        self.state = SessionState::AwaitingOffer;
        self.rerouting = false;
        self.refused_by.clear();
        ServerEvent::error(code, message)
    }

    /// An event arrived from the worker. Usually it goes to the browser ([`Action::Reply`]),
    /// and an answer (or an error) settles the offer it answers. A `busy` refusal of the offer
    /// still unanswered instead detaches the session and routes the offer again
    /// ([`Action::Route`]), skipping every worker that refused it ([`Self::refused_by`]).
    pub fn worker_event(&mut self, event: ServerEvent) -> Action {
        let SessionState::Attached { worker_id, unanswered } = &mut self.state else {
            return Action::Reply(event);
        };
        let busy = matches!(
            &event,
            ServerEvent::Error {
                code: ErrorCode::Busy,
                ..
            }
        );
        match unanswered.take() {
            Some(offer) if busy => {
                self.refused_by.push(std::mem::take(worker_id));
                self.state = SessionState::AwaitingOffer;
                Action::Route(offer)
            }
            Some(offer) if !matches!(event, ServerEvent::WebrtcAnswer { .. } | ServerEvent::Error { .. }) => {
                *unanswered = Some(offer);
                Action::Reply(event)
            }
            _ => {
                if matches!(event, ServerEvent::WebrtcAnswer { .. }) {
                    self.refused_by.clear();
                }
                Action::Reply(event)
            }
        }
    }

    /// Forwarding `msg` failed: the worker's stream is gone. An offer is routed afresh; anything
    /// else tells the browser the worker went away.
    pub fn forward_failed(&mut self, msg: ClientMessage) -> Action {
        let lost = self.worker_lost();
        match msg {
            ClientMessage::WebrtcOffer(offer) => Action::Route(offer),
            _ => lost.map_or(Action::Ignore, Action::Reply),
        }
    }

    /// The worker's stream ended without a `Close`: its connection was lost.
    pub fn worker_lost(&mut self) -> Option<ServerEvent> {
        match std::mem::replace(&mut self.state, SessionState::AwaitingOffer) {
            SessionState::Attached { worker_id, .. } => Some(ServerEvent::error(
                ErrorCode::WorkerLost,
                format!("worker {worker_id} went away; send a new webrtc_offer to start again"),
            )),
            SessionState::AwaitingOffer => None,
        }
    }

    /// The worker closed the session on purpose (peer failed, shutting down). An offer it had
    /// not answered is routed again ([`Action::Route`]), once: a worker that keeps closing
    /// cannot loop the session.
    pub fn worker_closed(&mut self) -> Action {
        match std::mem::replace(&mut self.state, SessionState::AwaitingOffer) {
            SessionState::Attached {
                unanswered: Some(offer),
                ..
            } => {
                self.rerouting = true;
                Action::Route(offer)
            }
            _ => Action::Ignore,
        }
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
    fn parsed_offer() -> Offer {
        match decode_client_message(&offer(), DEFAULT_MAX_MESSAGE_LEN) {
            Ok(ClientMessage::WebrtcOffer(o)) => o,
            other => panic!("an offer: {other:?}"),
        }
    }

    const ANSWER: fn() -> ServerEvent = || ServerEvent::WebrtcAnswer {
        sdp: "v=0".into(),
        timestamp: "0".into(),
    };

    #[test]
    fn an_unanswered_offer_gets_one_second_chance_when_the_worker_closes() {
        let mut s = SignalingSession::new(DEFAULT_MAX_MESSAGE_LEN);
        assert!(matches!(s.on_text(&offer()), Action::Route(_)));
        s.attached("w1", parsed_offer());
        // w1 closes before answering: the same offer is routed again.
        let again = s.worker_closed();
        assert!(matches!(&again, Action::Route(o) if o.avatar_id.as_deref() == Some("a")));
        s.attached("w2", parsed_offer());
        // w2 closes too: no third try; the browser sends a new offer when it wants one.
        assert_eq!(s.worker_closed(), Action::Ignore);
        assert_eq!(s.state(), &SessionState::AwaitingOffer);
    }

    #[test]
    fn an_answered_offer_is_settled_and_a_new_offer_has_its_own_chance() {
        let mut s = SignalingSession::new(DEFAULT_MAX_MESSAGE_LEN);
        assert!(matches!(s.on_text(&offer()), Action::Route(_)));
        s.attached("w1", parsed_offer());
        assert!(matches!(s.worker_event(ANSWER()), Action::Reply(_)));
        assert_eq!(s.worker_closed(), Action::Ignore, "an answered session just ends");

        assert!(matches!(s.on_text(&offer()), Action::Route(_)));
        s.attached("w1", parsed_offer());
        assert!(matches!(s.worker_event(ANSWER()), Action::Reply(_)));
        // A renegotiation offer, forwarded and not answered yet, is the one kept.
        assert!(matches!(s.on_text(&offer()), Action::Forward(_)));
        assert!(matches!(s.worker_closed(), Action::Route(_)));
    }

    fn busy() -> ServerEvent {
        ServerEvent::error(ErrorCode::Busy, "this worker is at capacity")
    }

    #[test]
    fn a_busy_refusal_routes_the_offer_to_a_worker_that_has_not_refused_it() {
        let mut s = SignalingSession::new(DEFAULT_MAX_MESSAGE_LEN);
        assert!(matches!(s.on_text(&offer()), Action::Route(_)));
        s.attached("w1", parsed_offer());
        // Events before the answer pass and keep the offer open.
        let ice = ServerEvent::SpeechStarted { turn: 1 };
        assert!(matches!(s.worker_event(ice), Action::Reply(_)));
        // w1 is full: the offer goes on, without w1.
        assert!(matches!(s.worker_event(busy()), Action::Route(o) if o.avatar_id.as_deref() == Some("a")));
        assert_eq!(s.state(), &SessionState::AwaitingOffer);
        assert_eq!(s.refused_by(), ["w1"]);
        s.attached("w2", parsed_offer());
        assert!(matches!(s.worker_event(busy()), Action::Route(_)));
        assert_eq!(s.refused_by(), ["w1", "w2"]);
        // Every worker refused: routing finds none and tells the browser; the list starts afresh.
        let ev = s.route_failed(ErrorCode::Busy, "every worker is full");
        assert!(matches!(
            ev,
            ServerEvent::Error {
                code: ErrorCode::Busy,
                ..
            }
        ));
        assert!(s.refused_by().is_empty());
        // A worker that answers settles the offer: a later busy (about something else) just passes.
        assert!(matches!(s.on_text(&offer()), Action::Route(_)));
        s.attached("w3", parsed_offer());
        assert!(matches!(s.worker_event(ANSWER()), Action::Reply(_)));
        assert!(matches!(s.worker_event(busy()), Action::Reply(_)));
        assert!(s.refused_by().is_empty());
    }

    #[test]
    fn a_failed_forward_routes_an_offer_afresh_and_reports_anything_else() {
        let mut s = SignalingSession::new(DEFAULT_MAX_MESSAGE_LEN);
        assert!(matches!(s.on_text(&offer()), Action::Route(_)));
        s.attached("w1", parsed_offer());
        let Action::Forward(msg) = s.on_text(TEXT) else {
            panic!("forwarded")
        };
        match s.forward_failed(msg) {
            Action::Reply(ServerEvent::Error { code, .. }) => assert_eq!(code, ErrorCode::WorkerLost),
            other => panic!("worker_lost expected, got {other:?}"),
        }
        assert!(matches!(s.on_text(&offer()), Action::Route(_)));
        s.attached("w1", parsed_offer());
        let Action::Forward(msg) = s.on_text(&offer()) else {
            panic!("forwarded")
        };
        assert!(matches!(s.forward_failed(msg), Action::Route(_)));
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
        s.attached("w1", parsed_offer());
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
        // A malformed candidate after the offer gets an error event (issue 26), not silence.
        let malformed = r#"{"type":"webrtc_ice_candidate","candidate":{"candidate":"candidate:garbage","sdpMid":"0"}}"#;
        assert_eq!(code(s.on_text(malformed)), ErrorCode::BadCandidate);
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
        s.attached("w", parsed_offer());
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
        s.attached("w9", parsed_offer());
        let lost = s.worker_lost().expect("event");
        assert!(matches!(&lost, ServerEvent::Error { code: ErrorCode::WorkerLost, message } if message.contains("w9")));
        assert_eq!(code(s.on_text(CAND)), ErrorCode::NoSession);
        assert!(matches!(s.on_text(&offer()), Action::Route(_)));
    }
}
