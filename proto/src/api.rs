//! The session API: what an operator's backend asks of a session, as the relay carries it to the
//! worker that runs it.
//!
//! A backend calls `/api/v1/...` on any relay of a fleet (see `docs/api.md`). The relay does not
//! need to know where the session is: every worker holds a tunnel to every relay, so the relay
//! opens a stream to each worker it has and sends a [`SessionFrame::Command`]; the worker that
//! runs the session acts on it and answers with a [`SessionFrame::Reply`], the others answer
//! [`Reply::NotFound`]. The events the command causes (`assistant_text`, `speech_started`, ...)
//! reach the browser on its own session stream, through whichever relay it is on.
//!
//! Audio of the backend's own ([`Command::Audio`]) rides the same command stream: once the worker
//! has answered [`Reply::Turn`], the relay writes the raw samples after the frames (16-bit signed
//! little-endian, mono, at the command's `rate`) and finishes the stream when the upload ends.
//! The worker plays them as they come, so a chunked upload is heard before it ends.
//!
//! This module holds the messages and the checks a request must pass before it is sent
//! ([`SayRequest::validate`]); no I/O.
//!
//! [`SessionFrame::Command`]: crate::tunnel::SessionFrame::Command
//! [`SessionFrame::Reply`]: crate::tunnel::SessionFrame::Reply

use serde::{Deserialize, Serialize};

/// The sample rates [`Command::Audio`] takes, in Hz.
pub const AUDIO_RATES: std::ops::RangeInclusive<u32> = 8_000..=48_000;

/// How `say` treats its text.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SayMode {
    /// Speak the text as given: no language model.
    #[default]
    Repeat,
    /// The text is the user's message: the language model answers it.
    Chat,
}

/// The body of `POST /api/v1/sessions/{id}/say`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SayRequest {
    pub text: String,
    #[serde(default)]
    pub mode: SayMode,
    /// Stop what the avatar says now and speak at once; otherwise wait for it to finish.
    #[serde(default)]
    pub interrupt: bool,
}

/// Why a request is refused before it reaches a worker.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RequestError {
    #[error("`text` is empty")]
    EmptyText,
    #[error("`text` is {chars} characters; the limit is {max} (api.max_text_chars)")]
    TextTooLong { chars: usize, max: usize },
}

impl SayRequest {
    /// Trim the text and check it against `max_chars`.
    pub fn validate(mut self, max_chars: usize) -> Result<Self, RequestError> {
        self.text = self.text.trim().to_owned();
        let chars = self.text.chars().count();
        if chars == 0 {
            return Err(RequestError::EmptyText);
        }
        if chars > max_chars {
            return Err(RequestError::TextTooLong { chars, max: max_chars });
        }
        Ok(self)
    }
}

/// relay → worker, the first and only frame of a command stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "c", rename_all = "snake_case")]
pub enum Command {
    /// Every session the worker runs.
    List {},
    Get {
        session_id: String,
    },
    Say {
        session_id: String,
        say: SayRequest,
    },
    Interrupt {
        session_id: String,
    },
    /// Play the backend's own speech (lip-synced; no language model, no speech synthesis): the
    /// samples follow on the stream once the worker answers [`Reply::Turn`] (see the module docs).
    Audio {
        session_id: String,
        /// Samples per second of what follows (8,000–48,000).
        rate: u32,
        /// Cut what the avatar says now instead of waiting for it to finish.
        #[serde(default)]
        interrupt: bool,
    },
    /// End the session: the browser is told, the peer closes.
    End {
        session_id: String,
    },
    /// Every turn said so far, while the session runs and for `transcripts.keep_s` after it
    /// ends ([`Reply::Transcript`]).
    Transcript {
        session_id: String,
    },
}

impl Command {
    /// The session this command is for (`None` for [`Command::List`]).
    pub fn session_id(&self) -> Option<&str> {
        match self {
            Command::List {} => None,
            Command::Get { session_id }
            | Command::Say { session_id, .. }
            | Command::Interrupt { session_id }
            | Command::Audio { session_id, .. }
            | Command::End { session_id }
            | Command::Transcript { session_id } => Some(session_id),
        }
    }
}

/// One session, as the API lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionInfo {
    pub session_id: String,
    pub avatar_id: String,
    pub worker_id: String,
    pub user_id: Option<String>,
    /// RFC 3339, UTC.
    pub started_at: String,
    /// `connecting` (no peer yet), `idle`, `speaking` (an answer is being prepared or played).
    pub state: String,
}

/// worker → relay: the answer to a [`Command`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "r", rename_all = "snake_case")]
pub enum Reply {
    Sessions {
        sessions: Vec<SessionInfo>,
    },
    Session {
        session: SessionInfo,
    },
    /// The say was accepted as turn `turn`; `queued` when it waits for the current answer.
    Turn {
        turn: u64,
        queued: bool,
    },
    Interrupted {
        interrupted: bool,
    },
    /// The end of an audio command's stream: its turn holds all `samples` (it plays them to
    /// the end unless it is cut). A turn cut first answers `Refused` with code `interrupted`.
    Received {
        samples: u64,
    },
    Ended {},
    /// The turns this worker heard and said in the session, in order.
    Transcript {
        turns: Vec<TranscriptTurn>,
    },
    /// This worker does not run the session.
    NotFound {},
    /// The session is there but cannot do it (`code` as in the signaling errors, e.g.
    /// `rate_limited`, `talk_failed`).
    Refused {
        code: String,
        message: String,
    },
}

/// Who said a turn of a transcript.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Speaker {
    User,
    Assistant,
}

/// Where a turn came from: the browser's typed message, the user's voice, or the session API
/// (a `say` or `audio`). An answer has the source of what it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Source {
    Text,
    Voice,
    Api,
}

/// One turn of a session's transcript: what the user said, or the avatar's answer in full.
/// Times are RFC 3339 UTC with milliseconds: a user's turn from when the message arrived (typed)
/// or the speech began (voice) to when it was taken; an answer from when it was asked for to
/// when its speech ended.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TranscriptTurn {
    /// The session's answer number this turn belongs to (a user's turn and its answer share it).
    pub turn: u64,
    pub speaker: Speaker,
    pub text: String,
    pub source: Source,
    pub started_at: String,
    pub ended_at: String,
    /// An answer cut before its end (by the user, an interrupt, or a new message).
    #[serde(default)]
    pub interrupted: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn say_defaults_to_repeat_and_checks_its_text() {
        let say: SayRequest = serde_json::from_str(r#"{"text":"  Hello  "}"#).expect("json");
        assert_eq!((say.mode, say.interrupt), (SayMode::Repeat, false));
        assert_eq!(say.clone().validate(10).expect("valid").text, "Hello");
        assert_eq!(
            SayRequest {
                text: " ".into(),
                ..say.clone()
            }
            .validate(10),
            Err(RequestError::EmptyText)
        );
        assert_eq!(
            SayRequest {
                text: "ééééééé".into(),
                ..say
            }
            .validate(5),
            Err(RequestError::TextTooLong { chars: 7, max: 5 })
        );
        let chat: SayRequest = serde_json::from_str(r#"{"text":"hi","mode":"chat","interrupt":true}"#).expect("json");
        assert_eq!((chat.mode, chat.interrupt), (SayMode::Chat, true));
        assert!(serde_json::from_str::<SayRequest>(r#"{"text":"hi","mode":"sing"}"#).is_err());
        assert!(serde_json::from_str::<SayRequest>(r#"{"text":"hi","volume":3}"#).is_err());
    }

    #[test]
    fn commands_and_replies_round_trip() {
        let say = Command::Say {
            session_id: "s1".into(),
            say: SayRequest {
                text: "Hi".into(),
                mode: SayMode::Chat,
                interrupt: false,
            },
        };
        let text = serde_json::to_string(&say).expect("json");
        assert_eq!(serde_json::from_str::<Command>(&text).expect("back"), say);
        assert_eq!(say.session_id(), Some("s1"));
        assert_eq!(Command::List {}.session_id(), None);
        let reply = Reply::Turn { turn: 3, queued: true };
        let text = serde_json::to_string(&reply).expect("json");
        assert_eq!(text, r#"{"r":"turn","turn":3,"queued":true}"#);
        assert_eq!(serde_json::from_str::<Reply>(&text).expect("back"), reply);
    }
}
