//! The dialogue rules of one session, as a pure state machine: what the user and the backend
//! say, what the conversation and the media clock report, and the peer's changes go in; the
//! browser's events and the commands for the conversation come out.
//!
//! Turns come from the browser (a typed message, a transcript of speech) and from the operator's
//! backend (the session API's `say`, and its `audio`: speech of its own). A browser's message
//! always starts at once: the user is talking, and the answer in progress is cut. A backend's
//! `say` waits until the avatar has finished what it says, unless it asks to `interrupt`; waiting
//! says play in order, one after another. An interrupt (the API's, the browser's, or a voice
//! barge-in) stops the answer and drops every say still waiting; so does a new peer (the browser
//! renegotiated, and the answer in progress went with the old media clock).
//!
//! The user's voice follows the same rules: speech that starts while the avatar speaks is a
//! barge-in, which interrupts it, when barge-in is allowed; when it is not, that speech is most
//! likely the avatar's own echo, and the utterance it starts is dropped rather than answered. An
//! utterance is recognised, and its transcript (unless it has no words) answered like a typed
//! message.
//!
//! Recognition runs while the user speaks, so the answer can start as soon as they stop. Every
//! few hundred ms the utterance so far is recognised for a partial transcript (shown as
//! `user_transcript` with `final: false`). When the user pauses, the utterance so far is
//! recognised at once ([`Job::Pause`]): if the turn then ends in that pause, that transcript is
//! the final one, with no second recognition. [`Out::Words`] tells the voice detector whether it
//! reads as a finished sentence ([`crate::talk::turn_end`]): then the turn ends early; words
//! that stop mid-sentence wait longer. Only when the turn ends otherwise (speech after the pause,
//! or an utterance cut at its maximum length) is the whole utterance recognised after it ends
//! ([`Job::Final`]). Utterances are answered in the order they were spoken, whichever transcript
//! comes first; a failed recognition of a pause is asked once more before it is reported.
//!
//! [`Dialogue`] does no I/O and keeps no clock. Each input is a method; what follows from it is
//! queued as [`Out`]s, which the session takes with [`Dialogue::poll`] and carries out: events
//! go to the browser, [`Out::Answer`] and [`Out::Start`] start a turn on the conversation, whose
//! numbering and limits ([`crate::talk::limits`]) are its own. The session reports back what
//! happened: [`Dialogue::began`] when a turn started, [`Dialogue::start_failed`] when a queued
//! one could not. What a turn says is opaque here: `A` is how a backend's audio arrives.

use avatar_proto::api::{SayMode, Source};
use avatar_proto::signaling::{ErrorCode, ServerEvent};
use std::collections::VecDeque;

/// Says that may wait behind the answer in progress; more are refused.
pub const MAX_WAITING: usize = 16;

/// What a backend's turn says.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Said<A> {
    /// Text: spoken as given (`Repeat`) or answered by the language model (`Chat`).
    Text { text: String, mode: SayMode },
    /// The backend's own speech, arriving through `A`.
    Audio(A),
}

/// A backend's turn the session should start now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start<A> {
    pub turn: u64,
    pub said: Said<A>,
}

/// What became of a backend's `say` or `audio`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Say<A> {
    /// Start it now.
    Now(Start<A>),
    /// It waits behind the answer in progress (and `ahead` other says).
    Queued { turn: u64, ahead: usize },
}

/// Why a backend's `say` or `audio` was refused; the session is unharmed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Refused {
    /// The worker has no talking pipeline.
    #[error("this worker streams the idle avatar only; the talking pipeline is disabled ([talk] enabled = false)")]
    Unsupported,
    /// The browser's peer is not playing yet: nothing could be heard.
    #[error("the session's video is not playing yet (the browser has not connected its peer)")]
    NotReady,
    /// [`MAX_WAITING`] says already wait.
    #[error("{MAX_WAITING} says are already waiting; send one with interrupt, or wait")]
    QueueFull,
    /// Another audio upload to the session is still arriving.
    #[error("an audio upload to this session is in progress: wait for its answer, or send with interrupt=true")]
    Uploading,
}

impl Refused {
    /// The code the session API's error carries.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unsupported => ErrorCode::Unsupported.as_str(),
            Self::NotReady => ErrorCode::NoSession.as_str(),
            Self::QueueFull => ErrorCode::RateLimited.as_str(),
            Self::Uploading => ErrorCode::Busy.as_str(),
        }
    }
}

/// What the session knows when a backend's turn arrives.
#[derive(Debug, Clone, Copy, Default)]
pub struct Conditions {
    /// The session's media is playing (the conversation can speak).
    pub ready: bool,
    /// An audio upload to the session is still arriving.
    pub uploading: bool,
}

/// Who stopped the avatar.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// The browser's `interrupt`.
    Browser,
    /// The session API's `interrupt`.
    Api,
    /// The user spoke over the avatar.
    BargeIn,
}

/// A recognition the dialogue asks for, and whose result comes back with it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Job {
    /// The utterance so far, while the user speaks (utterance `n` of the session).
    Partial(u64),
    /// The utterance up to pause `n` (the voice detector's numbering, unique in the session).
    Pause(u64),
    /// Utterance `n`, whole, after it ended (it did not end in a pause).
    Final(u64),
}

/// Utterances that may wait for their final transcript; past this the oldest is given up.
pub const MAX_PENDING: usize = 4;

/// An utterance that ended, waiting for its final transcript.
#[derive(Debug)]
struct Pending {
    job: Job,
    text: Option<String>,
    /// Its recognition failed once and was asked again.
    retried: bool,
}

/// What the session should do, in order.
#[derive(Debug, Clone, PartialEq)]
pub enum Out<A> {
    /// Tell the browser.
    Event(ServerEvent),
    /// Answer the user's message (typed, or a transcript): start a turn on the conversation,
    /// then report [`Dialogue::began`], or tell the browser why the conversation refused it.
    Answer { text: String, source: Source },
    /// Start a backend's turn that waited, then report [`Dialogue::began`] (or
    /// [`Dialogue::start_failed`]).
    Start(Start<A>),
    /// Stop what the conversation prepares or plays.
    Stop(Cause),
    /// Close the transcript's open turns as cut short, all but `keep`.
    Cut { keep: Option<u64> },
    /// Recognise the audio this job names: the latest partial, the pause's, or the utterance
    /// that just ended. The result comes back through [`Dialogue::heard`] or
    /// [`Dialogue::not_heard`].
    Recognise(Job),
    /// The user went on after the pause: drop this recognition if it has not started.
    Forget(Job),
    /// The words before pause `pause` were read: a finished sentence (`complete`) lets the
    /// voice detector end the turn after a short silence; one that stops mid-sentence makes it
    /// wait longer.
    Words { pause: u64, complete: bool },
    /// Keep this exchange in the conversation's history.
    Remember { user: String, answer: String },
    /// Turn `turn` is over: spoken to its end, or `cut` short.
    TurnOver { turn: u64, cut: bool },
}

/// The dialogue of one session (see the module docs).
#[derive(Debug)]
pub struct Dialogue<A> {
    /// Whether the session has a talking pipeline at all (`[talk] enabled`).
    talk: bool,
    /// May the user's voice interrupt the avatar? (`talk.vad.barge_in`)
    barge_in: bool,
    /// The turn being prepared or spoken.
    current: Option<u64>,
    waiting: VecDeque<Start<A>>,
    /// The utterance in progress started over the avatar with barge-in off: drop it.
    ignoring: bool,
    /// Utterances started so far (numbers [`Job::Partial`]).
    utterances: u64,
    /// The user is speaking: partial transcripts are shown.
    speaking: bool,
    /// The pause the user is silent in now, and its transcript once heard.
    pause: Option<(u64, Option<String>)>,
    /// Utterances that ended and wait for their final transcript, oldest first: they are
    /// answered in the order the user spoke them.
    finals: VecDeque<Pending>,
    /// What the page was last told about voice input (`features`).
    told_voice: Option<bool>,
    out: VecDeque<Out<A>>,
}

impl<A> Default for Dialogue<A> {
    fn default() -> Self {
        Self::new(true, true)
    }
}

impl<A> Dialogue<A> {
    /// The dialogue of a session with a talking pipeline or not (`talk`), in which the user's
    /// voice may interrupt the avatar or not (`barge_in`).
    pub fn new(talk: bool, barge_in: bool) -> Self {
        Self {
            talk,
            barge_in,
            current: None,
            waiting: VecDeque::new(),
            ignoring: false,
            utterances: 0,
            speaking: false,
            pause: None,
            finals: VecDeque::new(),
            told_voice: None,
            out: VecDeque::new(),
        }
    }

    /// The next thing to do, in the order the inputs called for them.
    pub fn poll(&mut self) -> Option<Out<A>> {
        self.out.pop_front()
    }

    /// Whether an answer is being prepared or spoken.
    pub fn busy(&self) -> bool {
        self.current.is_some()
    }

    /// Says waiting for their turn.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    fn event(&mut self, event: ServerEvent) {
        self.out.push_back(Out::Event(event));
    }

    /// Nothing is current and nothing waits.
    fn clear(&mut self) -> bool {
        let was = self.busy() || !self.waiting.is_empty();
        self.current = None;
        self.waiting.clear();
        was
    }

    // ---- the browser ----

    /// The browser's `text_webrtc`.
    pub fn typed(&mut self, message: &str) {
        let text = message.trim();
        if !self.talk {
            self.event(ServerEvent::error(
                ErrorCode::Unsupported,
                Refused::Unsupported.to_string(),
            ));
        } else if text.is_empty() {
            self.event(ServerEvent::error(ErrorCode::InvalidMessage, "`message` is empty"));
        } else {
            self.out.push_back(Out::Answer {
                text: text.to_owned(),
                source: Source::Text,
            });
        }
    }

    /// The browser's `interrupt`.
    pub fn browser_interrupt(&mut self) {
        if self.talk {
            self.clear();
            self.out.push_back(Out::Stop(Cause::Browser));
        }
    }

    /// The browser renegotiated: a new peer replaced the old one, and the answer in progress
    /// went with the old media clock (it will report no end). Nothing is current, what waited
    /// is dropped, and the transcript's open turns are cut.
    pub fn peer_replaced(&mut self) {
        self.clear();
        self.ignoring = false;
        // The new peer has a voice detector of its own (numbering its pauses past the old
        // one's). Utterances the old one heard end are still answered.
        self.speaking = false;
        self.pause = None;
        self.out.push_back(Out::Cut { keep: None });
    }

    // ---- the user's voice ----

    /// Whether the session can hear the user now (voice input configured, its recogniser
    /// answering): the page is told when the session opens and whenever it changes, so it
    /// offers Talk only while speaking can work.
    pub fn hearing(&mut self, voice: bool) {
        if self.told_voice != Some(voice) {
            self.told_voice = Some(voice);
            self.event(ServerEvent::Features { voice });
        }
    }

    /// The user started speaking; `over_avatar`: while the avatar was speaking.
    pub fn voice_started(&mut self, over_avatar: bool) {
        if !self.talk {
            return;
        }
        self.utterances += 1;
        self.pause = None;
        self.speaking = true;
        if over_avatar && !self.barge_in {
            self.ignoring = true;
            return;
        }
        self.ignoring = false;
        if over_avatar {
            self.clear();
            self.out.push_back(Out::Stop(Cause::BargeIn));
        }
        self.event(ServerEvent::UserSpeechStarted {});
    }

    /// Another stretch of speech is in: recognise the utterance so far for a partial transcript.
    pub fn voice_partial(&mut self) {
        if self.talk && self.speaking && !self.ignoring {
            self.out.push_back(Out::Recognise(Job::Partial(self.utterances)));
        }
    }

    /// The user fell silent (pause `pause`): recognise what they said so far at once.
    pub fn voice_paused(&mut self, pause: u64) {
        if self.talk && self.speaking && !self.ignoring {
            self.pause = Some((pause, None));
            self.out.push_back(Out::Recognise(Job::Pause(pause)));
        }
    }

    /// The user spoke again after the pause: its transcript is not the utterance's, and its
    /// recognition is dropped if it has not started.
    pub fn voice_resumed(&mut self) {
        if let Some((p, _)) = self.pause.take() {
            self.out.push_back(Out::Forget(Job::Pause(p)));
        }
    }

    /// The user's utterance ended after `duration_ms`, in pause `pause` if the turn ended in
    /// one: its transcript, heard or on its way, is the final one; otherwise recognise the
    /// utterance. Unless its start was ignored.
    pub fn utterance_ended(&mut self, duration_ms: u64, pause: Option<u64>) {
        self.speaking = false;
        let from_pause = match (self.pause.take(), pause) {
            (Some((p, heard)), Some(ended)) if p == ended => Some((p, heard)),
            _ => None,
        };
        if !self.talk || std::mem::take(&mut self.ignoring) {
            return;
        }
        self.event(ServerEvent::UserSpeechEnded { duration_ms });
        let pending = match from_pause {
            Some((p, text)) => Pending {
                job: Job::Pause(p),
                text,
                retried: false,
            },
            None => {
                self.out.push_back(Out::Recognise(Job::Final(self.utterances)));
                Pending {
                    job: Job::Final(self.utterances),
                    text: None,
                    retried: false,
                }
            }
        };
        if self.finals.len() >= MAX_PENDING {
            // Recognition is this far behind the user: the oldest is given up, and said so.
            self.finals.pop_front();
            self.transcript_failed("speech recognition fell behind: an earlier utterance was dropped".into());
        }
        self.finals.push_back(pending);
        self.flush();
    }

    /// Answer the utterances whose final transcripts are in, in the order they were spoken.
    fn flush(&mut self) {
        while let Some(text) = self.finals.front().and_then(|p| p.text.clone()) {
            self.finals.pop_front();
            self.transcript(&text);
        }
    }

    fn pending(&mut self, job: Job) -> Option<&mut Pending> {
        self.finals.iter_mut().find(|p| p.job == job)
    }

    /// What recognition heard for `job`. A partial is shown while the user speaks; a pause's
    /// is shown too, and may end the turn early, or is the final one if the turn ended in it;
    /// a final one is shown and answered like a typed message.
    pub fn heard(&mut self, job: Job, text: &str) {
        let text = text.trim();
        match job {
            Job::Partial(n) => {
                if self.speaking && n == self.utterances && !self.ignoring && !text.is_empty() {
                    self.partial(text);
                }
            }
            Job::Pause(_) | Job::Final(_) if self.pending(job).is_some() => {
                if let Some(pending) = self.pending(job) {
                    pending.text = Some(text.to_owned());
                }
                self.flush();
            }
            Job::Final(_) => {} // given up already
            Job::Pause(p) => {
                let Some((now, heard)) = self.pause.as_mut() else {
                    return;
                };
                if *now != p || self.ignoring {
                    return;
                }
                *heard = Some(text.to_owned());
                if !text.is_empty() {
                    self.partial(text);
                    self.out.push_back(Out::Words {
                        pause: p,
                        complete: crate::talk::turn_end::looks_complete(text),
                    });
                }
            }
        }
    }

    /// Recognition of `job` failed: a partial is skipped. An utterance that ended in the pause
    /// is recognised once more (the same audio), so a slow or failing recogniser delays the
    /// question rather than dropping it; a second failure, or a whole utterance's, is reported,
    /// and the utterances after it are answered.
    pub fn not_heard(&mut self, job: Job, message: String) {
        match job {
            Job::Partial(_) => {}
            Job::Pause(_) | Job::Final(_) if self.pending(job).is_some() => {
                let retry = matches!(job, Job::Pause(_))
                    && self
                        .pending(job)
                        .is_some_and(|p| !std::mem::replace(&mut p.retried, true));
                if retry {
                    self.out.push_back(Out::Recognise(job));
                } else {
                    self.finals.retain(|p| p.job != job);
                    self.transcript_failed(message);
                    self.flush();
                }
            }
            Job::Final(_) => {}
            Job::Pause(p) => {
                if self.pause.as_ref().is_some_and(|(now, _)| *now == p) {
                    self.pause = None; // the turn's end recognises the utterance itself
                }
            }
        }
    }

    fn partial(&mut self, text: &str) {
        self.event(ServerEvent::UserTranscript {
            text: text.to_owned(),
            is_final: false,
        });
    }

    /// What recognition heard for the whole utterance: shown, then answered like a typed
    /// message; an utterance with no words (a cough) is neither.
    fn transcript(&mut self, text: &str) {
        let text = text.trim();
        if !self.talk || text.is_empty() {
            return;
        }
        self.event(ServerEvent::UserTranscript {
            text: text.to_owned(),
            is_final: true,
        });
        self.out.push_back(Out::Answer {
            text: text.to_owned(),
            source: Source::Voice,
        });
    }

    /// Recognition failed; the session goes on.
    fn transcript_failed(&mut self, message: String) {
        self.event(ServerEvent::error(ErrorCode::TalkFailed, message));
    }

    // ---- the backend ----

    /// A backend's `say` or `audio`. `turn` numbers it (the conversation's next number), and
    /// is asked for only once the say is accepted.
    pub fn say(
        &mut self,
        said: Said<A>,
        interrupt: bool,
        now: Conditions,
        turn: impl FnOnce() -> u64,
    ) -> Result<Say<A>, Refused> {
        if !self.talk {
            return Err(Refused::Unsupported);
        }
        if !now.ready {
            return Err(Refused::NotReady);
        }
        if !interrupt {
            // One upload at a time (each holds a tunnel stream), unless the new one cuts in.
            if matches!(said, Said::Audio(_)) && now.uploading {
                return Err(Refused::Uploading);
            }
            if self.waiting.len() >= MAX_WAITING {
                return Err(Refused::QueueFull);
            }
        }
        let start = Start { turn: turn(), said };
        if interrupt {
            // Starting it cuts the answer in progress (as a browser's message does); what
            // waited is dropped. No `Stop`: it would stop this very turn once started.
            self.clear();
            return Ok(Say::Now(start));
        }
        if self.busy() {
            let turn = start.turn;
            self.waiting.push_back(start);
            Ok(Say::Queued {
                turn,
                ahead: self.waiting.len() - 1,
            })
        } else {
            Ok(Say::Now(start))
        }
    }

    /// The session API's `interrupt`: whether anything was being said or waiting.
    pub fn api_interrupt(&mut self) -> bool {
        let was = self.clear();
        if self.talk {
            self.out.push_back(Out::Stop(Cause::Api));
        }
        was
    }

    // ---- what the session reports ----

    /// Turn `turn` started on the conversation (the user's message or a backend's say). A
    /// message cuts the answer in progress: the transcript's other open turns are cut.
    pub fn began(&mut self, turn: u64) {
        self.current = Some(turn);
        self.out.push_back(Out::Cut { keep: Some(turn) });
    }

    /// A backend's turn that waited could not start (the conversation refused it): the next
    /// one plays.
    pub fn start_failed(&mut self, turn: u64) {
        if self.current == Some(turn) {
            self.current = None;
        }
        if self.current.is_none() {
            self.next();
        }
    }

    /// A piece of answer `turn`'s text, as the language model writes it.
    pub fn answer_text(&mut self, turn: u64, text: String) {
        self.event(ServerEvent::AssistantText {
            turn,
            text,
            is_final: false,
        });
    }

    /// Answer `turn` is written (`answer`, to the user's message `user` if it answered one);
    /// `spoken`: it has audio to play (the clock will report its end).
    pub fn answer_done(&mut self, turn: u64, user: Option<String>, answer: Option<String>, spoken: bool) {
        if !spoken {
            // Nothing to hear (a text of no words, audio of no samples): the clock will not
            // report an end of speech, so the turn ends here.
            self.over(turn, false);
        }
        let Some(answer) = answer else { return };
        if let Some(user) = user {
            self.out.push_back(Out::Remember {
                user,
                answer: answer.clone(),
            });
        }
        self.event(ServerEvent::AssistantText {
            turn,
            text: answer,
            is_final: true,
        });
    }

    /// Answer `turn` failed: what was said of it is cut short, and the next say plays.
    pub fn answer_failed(&mut self, turn: u64, message: &str) {
        self.out.push_back(Out::TurnOver { turn, cut: true });
        self.advance(turn);
        self.event(ServerEvent::error(
            ErrorCode::TalkFailed,
            format!("answer {turn} failed: {message}"),
        ));
    }

    /// The avatar started speaking turn `turn`.
    pub fn speech_started(&mut self, turn: u64) {
        self.event(ServerEvent::SpeechStarted { turn });
    }

    /// The avatar stopped speaking turn `turn`: at its end, or `interrupted`.
    pub fn speech_ended(&mut self, turn: u64, interrupted: bool) {
        self.over(turn, interrupted);
        self.event(ServerEvent::SpeechEnded { turn, interrupted });
    }

    /// Turn `turn` is over: the next waiting say plays if it was the current turn and it was
    /// not cut by an interrupt.
    fn over(&mut self, turn: u64, interrupted: bool) {
        self.out.push_back(Out::TurnOver { turn, cut: interrupted });
        if interrupted {
            if self.current == Some(turn) {
                self.current = None;
                self.waiting.clear();
            }
        } else {
            self.advance(turn);
        }
    }

    fn advance(&mut self, turn: u64) {
        if self.current == Some(turn) {
            self.current = None;
            self.next();
        }
    }

    fn next(&mut self) {
        if let Some(start) = self.waiting.pop_front() {
            self.out.push_back(Out::Start(start));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Audio stands in as its name: the rules never look inside it.
    type Clip = &'static str;
    type D = Dialogue<Clip>;

    const READY: Conditions = Conditions {
        ready: true,
        uploading: false,
    };

    fn text(text: &str, mode: SayMode) -> Said<Clip> {
        Said::Text {
            text: text.into(),
            mode,
        }
    }

    fn repeat(t: &str) -> Said<Clip> {
        text(t, SayMode::Repeat)
    }

    fn start(turn: u64, t: &str) -> Start<Clip> {
        Start { turn, said: repeat(t) }
    }

    fn say(d: &mut D, turn: u64, said: Said<Clip>, interrupt: bool) -> Say<Clip> {
        d.say(said, interrupt, READY, || turn).expect("accepted")
    }

    fn drain(d: &mut D) -> Vec<Out<Clip>> {
        std::iter::from_fn(|| d.poll()).collect()
    }

    /// The outputs that start something: the turns started, and stops.
    fn starts(d: &mut D) -> Vec<Out<Clip>> {
        drain(d)
            .into_iter()
            .filter(|o| matches!(o, Out::Start(_) | Out::Stop(_) | Out::Answer { .. }))
            .collect()
    }

    fn events(outs: &[Out<Clip>]) -> Vec<ServerEvent> {
        outs.iter()
            .filter_map(|o| match o {
                Out::Event(e) => Some(e.clone()),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn a_say_while_the_avatar_speaks_waits_its_turn_and_they_play_in_order() {
        let mut d = D::default();
        assert_eq!(say(&mut d, 1, repeat("one"), false), Say::Now(start(1, "one")));
        d.began(1);
        assert_eq!(say(&mut d, 2, repeat("two"), false), Say::Queued { turn: 2, ahead: 0 });
        assert_eq!(
            say(&mut d, 3, text("three", SayMode::Chat), false),
            Say::Queued { turn: 3, ahead: 1 }
        );
        assert!(d.busy() && d.waiting() == 2);
        drain(&mut d);
        d.speech_ended(1, false);
        let outs = drain(&mut d);
        assert_eq!(
            outs,
            vec![
                Out::TurnOver { turn: 1, cut: false },
                Out::Start(start(2, "two")),
                Out::Event(ServerEvent::SpeechEnded {
                    turn: 1,
                    interrupted: false
                }),
            ]
        );
        d.began(2);
        d.speech_ended(2, false);
        assert_eq!(
            starts(&mut d),
            vec![Out::Start(Start {
                turn: 3,
                said: text("three", SayMode::Chat)
            })]
        );
        d.began(3);
        d.speech_ended(3, false);
        assert_eq!(starts(&mut d), vec![]);
        assert!(!d.busy());
    }

    #[test]
    fn interrupt_true_cuts_in_and_drops_the_waiting_says() {
        let mut d = D::default();
        d.began(1);
        say(&mut d, 2, repeat("later"), false);
        drain(&mut d);
        assert_eq!(say(&mut d, 3, repeat("now"), true), Say::Now(start(3, "now")));
        // Starting turn 3 cuts turn 1: nothing must stop the new turn after it starts.
        assert_eq!(starts(&mut d), vec![]);
        d.began(3);
        assert_eq!(drain(&mut d), vec![Out::Cut { keep: Some(3) }]);
        assert_eq!(d.waiting(), 0);
        // Turn 1's end arrives late (it was cut): it starts nothing.
        d.speech_ended(1, true);
        assert_eq!(starts(&mut d), vec![]);
        assert!(d.busy(), "turn 3 is still current");
    }

    #[test]
    fn the_browsers_message_cuts_in_and_the_waiting_says_follow_it() {
        let mut d = D::default();
        d.began(1);
        say(&mut d, 2, repeat("backend"), false);
        drain(&mut d);
        // The user types a question: the session starts it at once (turn 3), turn 1 is cut.
        d.typed("  What is a fraction?  ");
        assert_eq!(
            drain(&mut d),
            vec![Out::Answer {
                text: "What is a fraction?".into(),
                source: Source::Text
            }]
        );
        d.began(3);
        assert_eq!(drain(&mut d), vec![Out::Cut { keep: Some(3) }]);
        d.speech_ended(1, true);
        assert_eq!(starts(&mut d), vec![]);
        d.speech_ended(3, false);
        assert_eq!(
            starts(&mut d),
            vec![Out::Start(start(2, "backend"))],
            "the backend's say follows the answer"
        );
    }

    #[test]
    fn an_empty_message_or_one_without_talking_gets_an_error_and_nothing_starts() {
        let mut d = D::default();
        d.typed("   ");
        let outs = drain(&mut d);
        assert!(
            matches!(
                &events(&outs)[..],
                [ServerEvent::Error {
                    code: ErrorCode::InvalidMessage,
                    ..
                }]
            ),
            "{outs:?}"
        );
        let mut idle = D::new(false, true);
        idle.typed("hello");
        let outs = drain(&mut idle);
        assert!(
            matches!(
                &events(&outs)[..],
                [ServerEvent::Error {
                    code: ErrorCode::Unsupported,
                    ..
                }]
            ),
            "{outs:?}"
        );
        assert_eq!(idle.say(repeat("hi"), false, READY, || 1), Err(Refused::Unsupported));
        idle.voice_started(false);
        idle.utterance_ended(800, None);
        idle.browser_interrupt();
        assert_eq!(drain(&mut idle), vec![], "no voice and nothing to stop without talking");
    }

    #[test]
    fn an_interrupt_or_a_barge_in_stops_everything() {
        let mut d = D::default();
        assert!(!d.api_interrupt(), "nothing to stop");
        d.began(1);
        say(&mut d, 2, repeat("waiting"), false);
        drain(&mut d);
        assert!(d.api_interrupt());
        assert_eq!(drain(&mut d), vec![Out::Stop(Cause::Api)]);
        assert!(!d.busy() && d.waiting() == 0);
        d.speech_ended(1, true);
        assert_eq!(starts(&mut d), vec![]);

        d.began(3);
        say(&mut d, 4, repeat("waiting"), false);
        d.browser_interrupt();
        assert!(!d.busy() && d.waiting() == 0);
        assert_eq!(starts(&mut d), vec![Out::Stop(Cause::Browser)]);
    }

    #[test]
    fn a_failed_turn_lets_the_next_say_play_and_says_why() {
        let mut d = D::default();
        d.began(1);
        say(&mut d, 2, repeat("after"), false);
        drain(&mut d);
        d.answer_failed(1, "the LLM answered 500");
        let outs = drain(&mut d);
        assert_eq!(outs[0], Out::TurnOver { turn: 1, cut: true });
        assert_eq!(outs[1], Out::Start(start(2, "after")));
        assert!(
            matches!(&events(&outs)[..], [ServerEvent::Error { code: ErrorCode::TalkFailed, message }] if message.contains("answer 1 failed")),
            "{outs:?}"
        );
    }

    #[test]
    fn a_queued_say_that_cannot_start_lets_the_one_after_it_play() {
        let mut d = D::default();
        d.began(1);
        say(&mut d, 2, repeat("refused"), false);
        say(&mut d, 3, repeat("played"), false);
        d.speech_ended(1, false);
        assert_eq!(starts(&mut d), vec![Out::Start(start(2, "refused"))]);
        // The conversation refused turn 2 (say, over its rate): turn 3 does not wait forever.
        d.start_failed(2);
        assert_eq!(starts(&mut d), vec![Out::Start(start(3, "played"))]);
    }

    #[test]
    fn an_answer_with_nothing_to_hear_ends_its_turn_and_is_remembered() {
        let mut d = D::default();
        d.began(1);
        say(&mut d, 2, repeat("next"), false);
        drain(&mut d);
        d.answer_done(1, Some("hi".into()), Some("Hello!".into()), false);
        assert_eq!(
            drain(&mut d),
            vec![
                Out::TurnOver { turn: 1, cut: false },
                Out::Start(start(2, "next")),
                Out::Remember {
                    user: "hi".into(),
                    answer: "Hello!".into()
                },
                Out::Event(ServerEvent::AssistantText {
                    turn: 1,
                    text: "Hello!".into(),
                    is_final: true
                }),
            ]
        );
        // Spoken: the turn goes on until the clock says it ended.
        d.began(2);
        drain(&mut d);
        d.answer_done(2, None, Some("next".into()), true);
        assert!(d.busy());
    }

    #[test]
    fn a_new_peer_drops_the_answer_and_what_waits() {
        let mut d = D::default();
        d.began(1);
        say(&mut d, 2, repeat("waiting"), false);
        drain(&mut d);
        d.peer_replaced();
        assert_eq!(drain(&mut d), vec![Out::Cut { keep: None }]);
        assert!(!d.busy() && d.waiting() == 0);
    }

    #[test]
    fn says_are_refused_before_the_video_plays_past_the_queue_and_beside_an_upload() {
        let mut d = D::default();
        let not_ready = Conditions::default();
        let mut numbered = false;
        assert_eq!(
            d.say(repeat("early"), false, not_ready, || {
                numbered = true;
                1
            }),
            Err(Refused::NotReady)
        );
        assert!(!numbered, "a refused say takes no turn number");
        d.began(1);
        for turn in 2..2 + MAX_WAITING as u64 {
            say(&mut d, turn, repeat("queued"), false);
        }
        assert_eq!(d.say(repeat("one more"), false, READY, || 99), Err(Refused::QueueFull));
        assert!(
            d.say(repeat("urgent"), true, READY, || 99).is_ok(),
            "an interrupting say is never refused for the queue"
        );
        let uploading = Conditions {
            ready: true,
            uploading: true,
        };
        assert_eq!(
            d.say(Said::Audio("second.wav"), false, uploading, || 100),
            Err(Refused::Uploading)
        );
        assert!(d.say(repeat("text is fine"), false, uploading, || 101).is_ok());
        assert!(d.say(Said::Audio("cuts in"), true, uploading, || 102).is_ok());
    }

    #[test]
    fn audio_waits_its_turn_like_a_say_and_an_interrupting_one_cuts_in() {
        let mut d = D::default();
        assert_eq!(
            say(&mut d, 1, Said::Audio("greeting.wav"), false),
            Say::Now(Start {
                turn: 1,
                said: Said::Audio("greeting.wav")
            })
        );
        d.began(1);
        assert_eq!(
            say(&mut d, 2, Said::Audio("lesson.wav"), false),
            Say::Queued { turn: 2, ahead: 0 }
        );
        assert_eq!(
            say(&mut d, 3, repeat("and text after it"), false),
            Say::Queued { turn: 3, ahead: 1 }
        );
        drain(&mut d);
        d.speech_ended(1, false);
        assert_eq!(
            starts(&mut d),
            vec![Out::Start(Start {
                turn: 2,
                said: Said::Audio("lesson.wav")
            })]
        );
        d.began(2);
        // Urgent audio: cuts turn 2 and drops the text waiting behind it.
        assert!(matches!(say(&mut d, 4, Said::Audio("urgent.wav"), true), Say::Now(_)));
        d.began(4);
        d.speech_ended(2, true);
        assert_eq!(d.waiting(), 0);
        assert_eq!(starts(&mut d), vec![], "turn 4 plays on");
        assert!(d.busy());
    }

    #[test]
    fn a_chat_say_is_answered_by_the_model_in_its_turn() {
        let mut d = D::default();
        let chat = text("Ask the student about fractions", SayMode::Chat);
        assert_eq!(
            say(&mut d, 1, chat.clone(), false),
            Say::Now(Start { turn: 1, said: chat })
        );
        d.began(1);
        d.answer_text(1, "What".into());
        d.answer_done(
            1,
            Some("Ask the student about fractions".into()),
            Some("What is 1/2?".into()),
            true,
        );
        let outs = drain(&mut d);
        assert!(outs.contains(&Out::Remember {
            user: "Ask the student about fractions".into(),
            answer: "What is 1/2?".into()
        }));
        assert_eq!(events(&outs).len(), 2, "the delta and the final text: {outs:?}");
    }

    #[test]
    fn a_voice_barge_in_during_a_backends_turn_stops_it_and_what_waits_and_is_answered() {
        let mut d = D::default();
        d.began(1);
        say(&mut d, 2, Said::Audio("next.wav"), false);
        drain(&mut d);
        d.voice_started(true);
        assert_eq!(
            drain(&mut d),
            vec![Out::Stop(Cause::BargeIn), Out::Event(ServerEvent::UserSpeechStarted {})]
        );
        assert!(!d.busy() && d.waiting() == 0);
        d.utterance_ended(900, None);
        assert_eq!(
            drain(&mut d),
            vec![
                Out::Event(ServerEvent::UserSpeechEnded { duration_ms: 900 }),
                Out::Recognise(Job::Final(1)),
            ]
        );
        d.heard(Job::Final(1), " What is two plus two? ");
        assert_eq!(
            drain(&mut d),
            vec![
                Out::Event(ServerEvent::UserTranscript {
                    text: "What is two plus two?".into(),
                    is_final: true
                }),
                Out::Answer {
                    text: "What is two plus two?".into(),
                    source: Source::Voice
                }
            ]
        );
        d.began(3);
        d.speech_ended(1, true);
        d.speech_ended(3, false);
        assert_eq!(starts(&mut d), vec![], "nothing of the backend's follows it");
        // A cough: no words, no transcript, no answer.
        d.voice_started(false);
        d.utterance_ended(300, None);
        drain(&mut d);
        d.heard(Job::Final(2), "  ");
        assert_eq!(drain(&mut d), vec![]);
    }

    #[test]
    fn the_page_is_told_whether_the_worker_hears_at_the_start_and_on_each_change() {
        let mut d = D::default();
        d.hearing(true);
        d.hearing(true);
        d.hearing(false);
        assert_eq!(
            drain(&mut d),
            vec![
                Out::Event(ServerEvent::Features { voice: true }),
                Out::Event(ServerEvent::Features { voice: false })
            ]
        );
    }

    #[test]
    fn speech_over_the_avatar_with_barge_in_off_is_ignored_as_echo_with_its_utterance() {
        let mut quiet = D::new(true, false);
        quiet.began(1);
        drain(&mut quiet);
        quiet.voice_started(true);
        assert!(quiet.busy(), "barge-in off: the avatar goes on");
        quiet.voice_partial();
        quiet.voice_paused(1);
        quiet.utterance_ended(700, Some(1));
        assert_eq!(drain(&mut quiet), vec![], "the echo and its utterance are dropped");
        quiet.voice_started(false);
        quiet.utterance_ended(700, None);
        let outs = drain(&mut quiet);
        assert!(
            outs.contains(&Out::Recognise(Job::Final(2))),
            "the next one, after the avatar, is recognised"
        );
    }

    fn transcript(text: &str, is_final: bool) -> Out<Clip> {
        Out::Event(ServerEvent::UserTranscript {
            text: text.into(),
            is_final,
        })
    }

    fn answer(text: &str) -> Out<Clip> {
        Out::Answer {
            text: text.into(),
            source: Source::Voice,
        }
    }

    #[test]
    fn partials_are_shown_while_the_user_speaks_and_never_after_the_final() {
        let mut d = D::default();
        d.voice_started(false);
        d.voice_partial();
        assert_eq!(
            drain(&mut d),
            vec![
                Out::Event(ServerEvent::UserSpeechStarted {}),
                Out::Recognise(Job::Partial(1))
            ]
        );
        d.heard(Job::Partial(1), " What is ");
        d.heard(Job::Partial(1), "");
        assert_eq!(
            drain(&mut d),
            vec![transcript("What is", false)],
            "an empty partial is not shown"
        );
        d.utterance_ended(1200, None);
        d.heard(Job::Final(1), "What is two plus two?");
        d.heard(Job::Partial(1), "What is two");
        let outs = drain(&mut d);
        assert_eq!(
            outs,
            vec![
                Out::Event(ServerEvent::UserSpeechEnded { duration_ms: 1200 }),
                Out::Recognise(Job::Final(1)),
                transcript("What is two plus two?", true),
                answer("What is two plus two?"),
            ],
            "a late partial is dropped"
        );
        // The next utterance's partials are its own.
        d.voice_started(false);
        d.heard(Job::Partial(1), "stale");
        assert_eq!(drain(&mut d), vec![Out::Event(ServerEvent::UserSpeechStarted {})]);
    }

    #[test]
    fn a_turn_that_ends_in_a_pause_takes_the_pause_transcript_without_a_second_recognition() {
        let mut d = D::default();
        d.voice_started(false);
        d.voice_paused(4);
        assert_eq!(drain(&mut d)[1..], [Out::Recognise(Job::Pause(4))]);
        // A finished sentence: shown as a partial, and the detector may end the turn early.
        d.heard(Job::Pause(4), "What is two plus two?");
        assert_eq!(
            drain(&mut d),
            vec![
                transcript("What is two plus two?", false),
                Out::Words {
                    pause: 4,
                    complete: true
                }
            ]
        );
        d.utterance_ended(1500, Some(4));
        assert_eq!(
            drain(&mut d),
            vec![
                Out::Event(ServerEvent::UserSpeechEnded { duration_ms: 1500 }),
                transcript("What is two plus two?", true),
                answer("What is two plus two?"),
            ]
        );

        // The turn ends before the pause's transcript is in: it is the final one when it comes.
        d.voice_started(false);
        d.voice_paused(5);
        drain(&mut d);
        d.utterance_ended(900, Some(5));
        assert_eq!(
            drain(&mut d),
            vec![Out::Event(ServerEvent::UserSpeechEnded { duration_ms: 900 })]
        );
        d.heard(Job::Pause(5), "Why is the sky blue?");
        assert_eq!(
            drain(&mut d),
            vec![transcript("Why is the sky blue?", true), answer("Why is the sky blue?")]
        );
    }

    #[test]
    fn words_that_stop_mid_sentence_or_speech_after_the_pause_wait_for_the_whole_utterance() {
        let mut d = D::default();
        d.voice_started(false);
        d.voice_paused(1);
        drain(&mut d);
        d.heard(Job::Pause(1), "What is the capital of");
        assert_eq!(
            drain(&mut d),
            vec![
                transcript("What is the capital of", false),
                Out::Words {
                    pause: 1,
                    complete: false
                }
            ],
            "not finished: the detector waits longer"
        );
        // The user goes on: the pause was inside the utterance, and its recognition is
        // dropped if it has not started.
        d.voice_resumed();
        assert_eq!(drain(&mut d), vec![Out::Forget(Job::Pause(1))]);
        d.utterance_ended(2600, None);
        assert_eq!(drain(&mut d)[1..], [Out::Recognise(Job::Final(1))]);
        d.heard(Job::Pause(1), "What is the capital of");
        assert_eq!(drain(&mut d), vec![], "the stale pause is not the final one");
        d.heard(Job::Final(1), "What is the capital of France?");
        assert_eq!(drain(&mut d)[1..], [answer("What is the capital of France?")]);

        // A turn that ended in a pause whose recognition failed: the same audio is recognised
        // once more, and the question is answered, not dropped.
        d.voice_started(false);
        d.voice_paused(2);
        d.utterance_ended(800, Some(2));
        drain(&mut d);
        d.not_heard(Job::Pause(2), "speech recognition took too long".into());
        assert_eq!(drain(&mut d), vec![Out::Recognise(Job::Pause(2))]);
        d.not_heard(Job::Partial(2), "busy".into());
        assert_eq!(drain(&mut d), vec![], "a failed partial is skipped");
        d.heard(Job::Pause(2), "Why is the sky blue?");
        assert_eq!(drain(&mut d)[1..], [answer("Why is the sky blue?")]);
        // Twice: reported, and the session goes on.
        d.voice_started(false);
        d.voice_paused(3);
        d.utterance_ended(800, Some(3));
        drain(&mut d);
        d.not_heard(Job::Pause(3), "HTTP 500".into());
        drain(&mut d);
        d.not_heard(Job::Pause(3), "HTTP 500".into());
        assert!(matches!(
            drain(&mut d).as_slice(),
            [Out::Event(ServerEvent::Error { .. })]
        ));
    }

    #[test]
    fn utterances_are_answered_in_the_order_spoken_whichever_transcript_comes_first() {
        let mut d = D::default();
        // A ends in a pause whose recognition is slow; B ends without one.
        d.voice_started(false);
        d.voice_paused(7);
        d.utterance_ended(900, Some(7));
        d.voice_started(false);
        d.utterance_ended(700, None);
        drain(&mut d);
        d.heard(Job::Final(2), "And why?");
        assert_eq!(drain(&mut d), vec![], "B waits for A");
        d.heard(Job::Pause(7), "Why is the sky blue?");
        assert_eq!(
            drain(&mut d),
            vec![
                transcript("Why is the sky blue?", true),
                answer("Why is the sky blue?"),
                transcript("And why?", true),
                answer("And why?"),
            ]
        );
        // A whole utterance that fails is reported, and the one after it still answered.
        d.voice_started(false);
        d.utterance_ended(700, None);
        d.voice_started(false);
        d.voice_paused(8);
        d.utterance_ended(700, Some(8));
        drain(&mut d);
        d.heard(Job::Pause(8), "Thanks.");
        assert_eq!(drain(&mut d), vec![]);
        d.not_heard(Job::Final(3), "HTTP 500".into());
        let outs = drain(&mut d);
        assert!(matches!(outs[0], Out::Event(ServerEvent::Error { .. })), "{outs:?}");
        assert_eq!(outs[1..], [transcript("Thanks.", true), answer("Thanks.")]);
        // More than MAX_PENDING behind: the oldest is given up, and said so.
        for _ in 0..MAX_PENDING {
            d.voice_started(false);
            d.utterance_ended(500, None);
        }
        let outs = drain(&mut d);
        assert!(outs.iter().all(|o| !matches!(o, Out::Event(ServerEvent::Error { .. }))));
        d.voice_started(false);
        d.utterance_ended(500, None);
        assert!(drain(&mut d)
            .iter()
            .any(|o| matches!(o, Out::Event(ServerEvent::Error { .. }))));
    }
}
