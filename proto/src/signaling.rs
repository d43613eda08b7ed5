//! Browser ↔ relay signaling: the JSON the customer's page already speaks.
//!
//! Every WebSocket text message is one JSON object with a `type` field. The browser sends
//! [`ClientMessage`]s; the server answers with [`ServerEvent`]s. The customer's page only reads
//! `webrtc_answer` and ignores every other type, so new server events are safe to add.
//!
//! Decoding is deliberately two-step: [`decode_client_message`] first checks the size and that the
//! text is a JSON object with a string `type`, then deserialises the body for that type. That way
//! each failure maps to one precise [`ErrorCode`] the browser can act on (`bad_json`,
//! `unknown_type`, `invalid_message`, `message_too_large`) instead of a generic parse error.
//! Unknown *fields* are tolerated everywhere: the customer's page sends extra ones (`session_id`
//! inside `text_webrtc`, `usernameFragment` inside candidates) and future pages may send more.

use serde::{Deserialize, Serialize};
use std::fmt;

/// Default cap on one signaling message. An SDP offer from Chromium is 3–6 KiB.
pub const DEFAULT_MAX_MESSAGE_LEN: usize = 64 * 1024;

/// A user, tutor or session identifier as browsers send it: the customer's page uses numbers
/// (`"user_id": 5`), other front ends use strings. Both are kept exactly as sent.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(untagged)]
pub enum Id {
    Int(i64),
    Str(String),
}

impl fmt::Display for Id {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Id::Int(n) => write!(f, "{n}"),
            Id::Str(s) => f.write_str(s),
        }
    }
}

/// `webrtc_offer {session_id, user_id, avatar_id, sdp}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Offer {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar_id: Option<String>,
    pub sdp: String,
}

/// The browser's `RTCIceCandidate.toJSON()`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CandidateInit {
    pub candidate: String,
    #[serde(rename = "sdpMid", default, skip_serializing_if = "Option::is_none")]
    pub sdp_mid: Option<String>,
    #[serde(rename = "sdpMLineIndex", default, skip_serializing_if = "Option::is_none")]
    pub sdp_mline_index: Option<u16>,
    #[serde(rename = "usernameFragment", default, skip_serializing_if = "Option::is_none")]
    pub username_fragment: Option<String>,
}

impl CandidateInit {
    /// The empty candidate a browser sends to mean "end of candidates".
    pub fn is_end_of_candidates(&self) -> bool {
        self.candidate.trim().is_empty()
    }
}

/// `webrtc_ice_candidate {user_id, candidate}`. A `null` candidate also means end of candidates.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct IceCandidate {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Id>,
    /// Required, but may be `null`. (`deserialize_with` stops serde treating a missing field as `None`.)
    #[serde(deserialize_with = "Option::deserialize")]
    pub candidate: Option<CandidateInit>,
}

/// `text_webrtc {session_id, user_id, tutor_id, message, avatar_id}`: the user said something.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Text {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session_id: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub user_id: Option<Id>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tutor_id: Option<Id>,
    pub message: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub avatar_id: Option<String>,
}

/// Browser → server.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ClientMessage {
    WebrtcOffer(Offer),
    WebrtcIceCandidate(IceCandidate),
    TextWebrtc(Text),
    /// Stop the current answer (our own client; the customer's page never sends it).
    Interrupt {},
}

impl ClientMessage {
    /// The wire name of this message's type.
    pub fn kind(&self) -> &'static str {
        match self {
            ClientMessage::WebrtcOffer(_) => "webrtc_offer",
            ClientMessage::WebrtcIceCandidate(_) => "webrtc_ice_candidate",
            ClientMessage::TextWebrtc(_) => "text_webrtc",
            ClientMessage::Interrupt {} => "interrupt",
        }
    }
}

const CLIENT_TYPES: &[&str] = &["webrtc_offer", "webrtc_ice_candidate", "text_webrtc", "interrupt"];

/// Machine-readable error codes sent in `{"type":"error","code":...}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    /// The message is not a JSON object with a string `type`.
    BadJson,
    /// `type` names no message this server understands.
    UnknownType,
    /// A known type with missing or mistyped fields.
    InvalidMessage,
    /// The message exceeds the server's size limit.
    MessageTooLarge,
    /// The SDP is not a session description we can answer.
    BadSdp,
    /// A `webrtc_ice_candidate` whose `candidate` is not an ICE candidate line.
    BadCandidate,
    /// The offer has no media sections: the page created it without a transceiver or track.
    OfferWithoutMedia,
    /// A message that needs a session arrived before `webrtc_offer`.
    NoSession,
    /// No connected worker can take this session.
    NoWorker,
    /// The worker serving this session went away.
    WorkerLost,
    /// The worker is at capacity.
    Busy,
    /// The WebRTC connection to the worker failed (ICE or DTLS); send a new offer to retry.
    PeerFailed,
    /// The request is understood but this worker does not offer it (e.g. talking is disabled).
    Unsupported,
    /// The connection or message was refused by policy.
    Unauthorized,
    /// Another live socket already uses this `session_id`.
    SessionInUse,
    /// The socket sat idle (no session, no message) past the relay's limit.
    IdleTimeout,
    /// The session reached the relay's maximum duration.
    SessionExpired,
    /// The operator's backend ended the session (`DELETE /api/v1/sessions/{id}`).
    SessionEnded,
    /// Something failed on our side; the details are in the server log.
    Internal,
    /// The answer to a `text_webrtc` or a spoken question could not be produced (speech
    /// recognition, language model, speech or lip-sync failed or timed out; the message names
    /// the stage). The avatar is back to idle and the session goes on.
    TalkFailed,
    /// The session sent messages (typed or spoken) faster than the worker's turn rate; the
    /// message was not answered, and the answer in progress goes on. Wait and send it again.
    RateLimited,
    /// The message or transcript is longer than the worker accepts; it was not answered.
    MessageTooLong,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            ErrorCode::BadJson => "bad_json",
            ErrorCode::UnknownType => "unknown_type",
            ErrorCode::InvalidMessage => "invalid_message",
            ErrorCode::MessageTooLarge => "message_too_large",
            ErrorCode::BadSdp => "bad_sdp",
            ErrorCode::BadCandidate => "bad_candidate",
            ErrorCode::OfferWithoutMedia => "offer_without_media",
            ErrorCode::NoSession => "no_session",
            ErrorCode::NoWorker => "no_worker",
            ErrorCode::WorkerLost => "worker_lost",
            ErrorCode::Busy => "busy",
            ErrorCode::PeerFailed => "peer_failed",
            ErrorCode::Unsupported => "unsupported",
            ErrorCode::Unauthorized => "unauthorized",
            ErrorCode::SessionInUse => "session_in_use",
            ErrorCode::IdleTimeout => "idle_timeout",
            ErrorCode::TalkFailed => "talk_failed",
            ErrorCode::RateLimited => "rate_limited",
            ErrorCode::MessageTooLong => "message_too_long",
            ErrorCode::SessionExpired => "session_expired",
            ErrorCode::SessionEnded => "session_ended",
            ErrorCode::Internal => "internal",
        }
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A problem to report to the browser as an `error` event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct SignalError {
    pub code: ErrorCode,
    pub message: String,
}

impl SignalError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        Self {
            code,
            message: message.into(),
        }
    }

    pub fn to_event(&self) -> ServerEvent {
        ServerEvent::Error {
            code: self.code,
            message: self.message.clone(),
        }
    }
}

/// One entry of an `RTCConfiguration.iceServers` list, as browsers take it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct IceServer {
    pub urls: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub username: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub credential: Option<String>,
}

/// Server → browser.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ServerEvent {
    /// The answer, with every server candidate inside the SDP (no trickle from the server:
    /// the customer's page reads no server candidates).
    WebrtcAnswer {
        sdp: String,
        timestamp: String,
    },
    Error {
        code: ErrorCode,
        message: String,
    },
    /// Which worker took the session (our client shows it; others ignore it).
    SessionAssigned {
        session_id: String,
        worker_id: String,
    },
    /// The answer's text as the language model writes it: deltas (`final: false`), then the whole
    /// answer once (`final: true`). `turn` numbers the answers of a session.
    AssistantText {
        turn: u64,
        text: String,
        #[serde(rename = "final")]
        is_final: bool,
    },
    /// Sent right after connect when the relay hands out STUN/TURN servers: use them for the
    /// `RTCPeerConnection` (TURN credentials expire after `ttl_s` seconds). The customer's page
    /// ignores it; the worker's answer carries relay candidates either way.
    IceServers {
        ice_servers: Vec<IceServer>,
        ttl_s: u64,
    },
    /// The avatar started speaking answer `turn` (its first talking frame and audio left).
    SpeechStarted {
        turn: u64,
    },
    /// The avatar stopped speaking answer `turn`: it finished, or was `interrupted` by an
    /// `interrupt` or a new `text_webrtc`.
    SpeechEnded {
        turn: u64,
        interrupted: bool,
    },
    /// Voice input: the user started speaking into the microphone (the worker's voice activity
    /// detector heard speech). While the avatar speaks, this also interrupts it (barge-in).
    UserSpeechStarted {},
    /// The user stopped speaking: `duration_ms` of speech goes to speech recognition.
    UserSpeechEnded {
        duration_ms: u64,
    },
    /// What the user said, as speech recognition heard it. `final: true` is the whole utterance;
    /// it starts an answer exactly as a `text_webrtc` with this text would.
    UserTranscript {
        text: String,
        #[serde(rename = "final")]
        is_final: bool,
    },
    /// The video as it follows the viewer's bandwidth: the worker's estimate of the path
    /// (`estimate_kbps`, audio included), the encoder's bitrate and its ceiling
    /// (`max_bitrate_kbps`), and the level it sends (`level` 0 is the best step; `fps`,
    /// `width`×`height`). Sent when the stream starts, when the level changes, and at most once a
    /// second while the estimate moves by more than a fifth.
    VideoQuality {
        estimate_kbps: u64,
        bitrate_kbps: u64,
        max_bitrate_kbps: u64,
        level: u32,
        fps: u32,
        width: u32,
        height: u32,
    },
    /// What the session's worker can do, sent when the session opens and again when it changes
    /// (as the peer connects). `voice`: it hears
    /// the microphone (voice input is configured and its speech recognition answers); a page
    /// hides its microphone button when it is false, instead of failing each attempt. Pages
    /// may ignore it (the customer's page does).
    Features {
        voice: bool,
    },
}

impl ServerEvent {
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ServerEvent::Error {
            code,
            message: message.into(),
        }
    }

    /// Whether the browser's socket closes after this event: the service ended the session for
    /// good (the session API's `DELETE`), so the page must not start it again with a new offer.
    pub fn ends_session(&self) -> bool {
        matches!(
            self,
            ServerEvent::Error {
                code: ErrorCode::SessionEnded,
                ..
            }
        )
    }

    pub fn to_json(&self) -> String {
        // Serialising these plain structs cannot fail: every field is a string or a unit enum.
        serde_json::to_string(self)
            .unwrap_or_else(|_| r#"{"type":"error","code":"internal","message":"unserialisable event"}"#.to_owned())
    }
}

/// Decode one text message from the browser, enforcing `max_len` bytes.
pub fn decode_client_message(text: &str, max_len: usize) -> Result<ClientMessage, SignalError> {
    if text.len() > max_len {
        return Err(SignalError::new(
            ErrorCode::MessageTooLarge,
            format!("message is {} bytes; the limit is {max_len}", text.len()),
        ));
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| SignalError::new(ErrorCode::BadJson, format!("not JSON: {e}")))?;
    let Some(obj) = value.as_object() else {
        return Err(SignalError::new(ErrorCode::BadJson, "expected a JSON object"));
    };
    let Some(kind) = obj.get("type").and_then(|t| t.as_str()) else {
        return Err(SignalError::new(ErrorCode::BadJson, "missing string field `type`"));
    };
    if !CLIENT_TYPES.contains(&kind) {
        return Err(SignalError::new(
            ErrorCode::UnknownType,
            format!(
                "unknown message type `{}`; expected one of {}",
                truncate(kind, 64),
                CLIENT_TYPES.join(", ")
            ),
        ));
    }
    let kind = kind.to_owned();
    serde_json::from_value(value)
        .map_err(|e| SignalError::new(ErrorCode::InvalidMessage, format!("invalid `{kind}`: {e}")))
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rt(msg: &ClientMessage) {
        let text = serde_json::to_string(msg).expect("serialise");
        assert_eq!(
            &decode_client_message(&text, DEFAULT_MAX_MESSAGE_LEN).expect("decode"),
            msg
        );
    }

    #[test]
    fn every_client_message_round_trips() {
        rt(&ClientMessage::WebrtcOffer(Offer {
            session_id: Some(Id::Str("s-1".into())),
            user_id: Some(Id::Int(5)),
            avatar_id: Some("avatar_tutor_13".into()),
            sdp: "v=0\r\n".into(),
        }));
        rt(&ClientMessage::WebrtcIceCandidate(IceCandidate {
            user_id: Some(Id::Int(5)),
            candidate: Some(CandidateInit {
                candidate: "candidate:1 1 udp 2122260223 127.0.0.1 50000 typ host".into(),
                sdp_mid: Some("0".into()),
                sdp_mline_index: Some(0),
                username_fragment: Some("abcd".into()),
            }),
        }));
        rt(&ClientMessage::WebrtcIceCandidate(IceCandidate {
            user_id: None,
            candidate: None,
        }));
        rt(&ClientMessage::TextWebrtc(Text {
            session_id: Some(Id::Str("s".into())),
            user_id: Some(Id::Int(5)),
            tutor_id: Some(Id::Int(13)),
            message: "你好，请介绍一下自己".into(),
            avatar_id: Some("avatar_tutor_13".into()),
        }));
        rt(&ClientMessage::Interrupt {});
    }

    #[test]
    fn every_server_event_round_trips() {
        for ev in [
            ServerEvent::WebrtcAnswer {
                sdp: "v=0\r\n".into(),
                timestamp: "2026-01-05T10:30:00".into(),
            },
            ServerEvent::error(ErrorCode::NoWorker, "none"),
            ServerEvent::SessionAssigned {
                session_id: "s".into(),
                worker_id: "w".into(),
            },
        ] {
            let back: ServerEvent = serde_json::from_str(&ev.to_json()).expect("decode");
            assert_eq!(back, ev);
        }
    }

    #[test]
    fn error_event_has_the_documented_shape() {
        let v: serde_json::Value =
            serde_json::from_str(&ServerEvent::error(ErrorCode::NoWorker, "x").to_json()).expect("json");
        assert_eq!(v["type"], "error");
        assert_eq!(v["code"], "no_worker");
        assert_eq!(v["message"], "x");
        for code in [ErrorCode::BadJson, ErrorCode::OfferWithoutMedia, ErrorCode::WorkerLost] {
            assert_eq!(serde_json::to_value(code).expect("json"), code.as_str());
        }
    }

    #[test]
    fn customer_page_messages_decode() {
        // Exactly what the seed page sends, including the browser's candidate.toJSON() fields.
        let offer = r#"{"type":"webrtc_offer","session_id":"test-session-1","user_id":5,"avatar_id":"avatar_tutor_13","sdp":"v=0\r\n"}"#;
        assert!(matches!(
            decode_client_message(offer, 1 << 16),
            Ok(ClientMessage::WebrtcOffer(_))
        ));
        let cand = r#"{"type":"webrtc_ice_candidate","user_id":5,"candidate":{"candidate":"candidate:1 1 udp 1 ::1 9 typ host","sdpMid":"0","sdpMLineIndex":0,"usernameFragment":"x"}}"#;
        assert!(matches!(
            decode_client_message(cand, 1 << 16),
            Ok(ClientMessage::WebrtcIceCandidate(_))
        ));
        let text =
            r#"{"type":"text_webrtc","session_id":"s","user_id":5,"tutor_id":13,"message":"hi","avatar_id":"a"}"#;
        assert!(matches!(
            decode_client_message(text, 1 << 16),
            Ok(ClientMessage::TextWebrtc(_))
        ));
    }

    #[test]
    fn unknown_fields_are_tolerated() {
        let m = r#"{"type":"text_webrtc","message":"hi","extra":{"nested":[1,2]},"x":null}"#;
        assert!(decode_client_message(m, 1 << 16).is_ok());
    }

    #[test]
    fn malformed_input_is_an_error_with_a_precise_code() {
        let cases: &[(&str, ErrorCode)] = &[
            ("", ErrorCode::BadJson),
            ("not json", ErrorCode::BadJson),
            ("{", ErrorCode::BadJson),
            ("[1,2]", ErrorCode::BadJson),
            ("\"webrtc_offer\"", ErrorCode::BadJson),
            ("{}", ErrorCode::BadJson),
            (r#"{"type":5}"#, ErrorCode::BadJson),
            (r#"{"type":"webrtc_answer","sdp":"v=0"}"#, ErrorCode::UnknownType),
            (r#"{"type":"hello"}"#, ErrorCode::UnknownType),
            (r#"{"type":"webrtc_offer"}"#, ErrorCode::InvalidMessage),
            (r#"{"type":"webrtc_offer","sdp":42}"#, ErrorCode::InvalidMessage),
            (
                r#"{"type":"webrtc_offer","sdp":"v=0","user_id":[1]}"#,
                ErrorCode::InvalidMessage,
            ),
            (r#"{"type":"webrtc_ice_candidate"}"#, ErrorCode::InvalidMessage),
            (
                r#"{"type":"webrtc_ice_candidate","candidate":{"sdpMid":"0"}}"#,
                ErrorCode::InvalidMessage,
            ),
            (
                r#"{"type":"webrtc_ice_candidate","candidate":{"candidate":"c","sdpMLineIndex":-1}}"#,
                ErrorCode::InvalidMessage,
            ),
            (r#"{"type":"text_webrtc"}"#, ErrorCode::InvalidMessage),
        ];
        for (input, code) in cases {
            let err = decode_client_message(input, 1 << 16).expect_err(input);
            assert_eq!(err.code, *code, "{input}: {err}");
            assert!(!err.message.is_empty());
        }
    }

    #[test]
    fn oversized_message_is_refused_before_parsing() {
        let big = format!(r#"{{"type":"text_webrtc","message":"{}"}}"#, "a".repeat(1 << 20));
        let err = decode_client_message(&big, DEFAULT_MAX_MESSAGE_LEN).expect_err("too large");
        assert_eq!(err.code, ErrorCode::MessageTooLarge);
        assert!(err.message.contains("65536"), "{}", err.message);
    }

    #[test]
    fn unknown_type_name_is_truncated_in_the_error() {
        let long = format!(r#"{{"type":"{}"}}"#, "é".repeat(10_000));
        let err = decode_client_message(&long, 1 << 20).expect_err("unknown");
        assert!(err.message.len() < 400);
    }

    #[test]
    fn end_of_candidates_is_recognised() {
        let c = CandidateInit {
            candidate: String::new(),
            sdp_mid: None,
            sdp_mline_index: None,
            username_fragment: None,
        };
        assert!(c.is_end_of_candidates());
    }
}
