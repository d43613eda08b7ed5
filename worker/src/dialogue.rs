//! Whose turn it is: the rules that order a session's answers, as a pure state machine.
//!
//! Turns come from the browser (a typed message, a transcript of speech) and from the operator's
//! backend (the session API's `say`, and its `audio`: speech of its own). A browser's message always starts at once: the user is
//! talking, and the answer in progress is cut. A backend's `say` waits until the avatar has
//! finished what it says, unless it asks to `interrupt`; waiting says play in order, one after
//! another. An interrupt (the API's, the browser's, or a voice barge-in) stops the answer and
//! drops every say still waiting.
//!
//! The user's voice follows the same rules ([`Dialogue::voice_started`]): speech that starts
//! while the avatar speaks is a barge-in, which interrupts it, when barge-in is allowed; when it
//! is not, that speech is most likely the avatar's own echo, and the utterance it starts is
//! dropped ([`Dialogue::utterance`]) rather than answered.
//!
//! [`Dialogue`] only decides (what a turn says is opaque to it: `A` is how its audio arrives); the session does what it says (starts a turn on its conversation)
//! and reports back what happened ([`Dialogue::started`], [`Dialogue::ended`]).

use avatar_proto::api::SayMode;
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

/// A turn the session should start now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start<A> {
    pub turn: u64,
    pub said: Said<A>,
}

/// What to do with a backend's `say` or `audio`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Say<A> {
    /// Start it now.
    Now(Start<A>),
    /// It waits behind the answer in progress (and `ahead` other says).
    Queued { ahead: usize },
}

/// What to do when the user starts speaking.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Voice {
    /// Listen (tell the browser `user_speech_started`).
    Listen,
    /// The user spoke over the avatar: it was interrupted (stop the conversation's answer too),
    /// then listen.
    BargeIn,
    /// Over the avatar, with barge-in off: ignore this speech and its utterance.
    Ignore,
}

/// The turn order of one session (see the module docs).
#[derive(Debug)]
pub struct Dialogue<A> {
    /// The turn being prepared or spoken.
    current: Option<u64>,
    waiting: VecDeque<Start<A>>,
    /// May the user's voice interrupt the avatar?
    barge_in: bool,
    /// The utterance in progress started over the avatar with barge-in off: drop it.
    ignoring: bool,
}

impl<A> Default for Dialogue<A> {
    fn default() -> Self {
        Self::new(true)
    }
}

impl<A> Dialogue<A> {
    /// A dialogue in which the user's voice may interrupt the avatar, or not (`talk.vad.barge_in`).
    pub fn new(barge_in: bool) -> Self {
        Self {
            current: None,
            waiting: VecDeque::new(),
            barge_in,
            ignoring: false,
        }
    }

    /// The user started speaking; `over_avatar`: while the avatar was speaking.
    pub fn voice_started(&mut self, over_avatar: bool) -> Voice {
        if !over_avatar {
            self.ignoring = false;
            return Voice::Listen;
        }
        if !self.barge_in {
            self.ignoring = true;
            return Voice::Ignore;
        }
        self.interrupt();
        Voice::BargeIn
    }

    /// The user's utterance ended: whether to recognise and answer it (not when its start was
    /// ignored).
    pub fn utterance(&mut self) -> bool {
        !std::mem::take(&mut self.ignoring)
    }

    /// Whether an answer is being prepared or spoken.
    pub fn busy(&self) -> bool {
        self.current.is_some()
    }

    /// Says waiting for their turn.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// A backend's `say` or `audio` as turn `turn` (the conversation's next number).
    pub fn say(&mut self, turn: u64, said: Said<A>, interrupt: bool) -> Say<A> {
        let start = Start { turn, said };
        if interrupt {
            self.waiting.clear();
            return Say::Now(start);
        }
        if self.busy() {
            self.waiting.push_back(start);
            Say::Queued {
                ahead: self.waiting.len() - 1,
            }
        } else {
            Say::Now(start)
        }
    }

    /// Turn `turn` started (a backend's say, or the browser's message, which always starts at
    /// once and cuts the one in progress).
    pub fn started(&mut self, turn: u64) {
        self.current = Some(turn);
    }

    /// Turn `turn` finished speaking, was interrupted, or failed: the next waiting say, if it is
    /// the current turn that ended and it was not cut by an interrupt.
    pub fn ended(&mut self, turn: u64, interrupted: bool) -> Option<Start<A>> {
        if self.current != Some(turn) {
            return None; // an older turn that a newer one already replaced
        }
        self.current = None;
        if interrupted {
            return None;
        }
        self.waiting.pop_front()
    }

    /// Stop: nothing is current and every waiting say is dropped. Returns whether anything was
    /// being said or waiting.
    pub fn interrupt(&mut self) -> bool {
        let was = self.busy() || !self.waiting.is_empty();
        self.current = None;
        self.waiting.clear();
        was
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Audio stands in as its name: the rules never look inside it.
    type Clip = &'static str;

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

    #[test]
    fn a_say_while_the_avatar_speaks_waits_its_turn_and_they_play_in_order() {
        let mut d = Dialogue::<Clip>::default();
        assert_eq!(d.say(1, repeat("one"), false), Say::Now(start(1, "one")));
        d.started(1);
        assert_eq!(d.say(2, repeat("two"), false), Say::Queued { ahead: 0 });
        assert_eq!(d.say(3, text("three", SayMode::Chat), false), Say::Queued { ahead: 1 });
        assert!(d.busy() && d.waiting() == 2);
        assert_eq!(d.ended(1, false), Some(start(2, "two")));
        d.started(2);
        let next = d.ended(2, false).expect("three");
        assert_eq!(
            next,
            Start {
                turn: 3,
                said: text("three", SayMode::Chat)
            }
        );
        d.started(3);
        assert_eq!(d.ended(3, false), None);
        assert!(!d.busy());
    }

    #[test]
    fn interrupt_true_cuts_in_and_drops_the_waiting_says() {
        let mut d = Dialogue::<Clip>::default();
        d.started(1);
        d.say(2, repeat("later"), false);
        assert_eq!(d.say(3, repeat("now"), true), Say::Now(start(3, "now")));
        d.started(3);
        assert_eq!(d.waiting(), 0);
        // Turn 1's end arrives late (it was cut): it starts nothing.
        assert_eq!(d.ended(1, true), None);
        assert!(d.busy(), "turn 3 is still current");
    }

    #[test]
    fn the_browsers_message_cuts_in_and_the_waiting_says_follow_it() {
        let mut d = Dialogue::<Clip>::default();
        d.started(1);
        d.say(2, repeat("backend"), false);
        // The user types a question: it starts at once (turn 3), turn 1 is cut.
        d.started(3);
        assert_eq!(d.ended(1, true), None);
        assert_eq!(
            d.ended(3, false),
            Some(start(2, "backend")),
            "the backend's say follows the answer"
        );
    }

    #[test]
    fn an_interrupt_or_a_barge_in_stops_everything() {
        let mut d = Dialogue::<Clip>::default();
        assert!(!d.interrupt(), "nothing to stop");
        d.started(1);
        d.say(2, repeat("waiting"), false);
        assert!(d.interrupt());
        assert!(!d.busy() && d.waiting() == 0);
        assert_eq!(d.ended(1, true), None);
    }

    #[test]
    fn a_failed_turn_lets_the_next_say_play() {
        let mut d = Dialogue::<Clip>::default();
        d.started(1);
        d.say(2, repeat("after"), false);
        assert_eq!(d.ended(1, false), Some(start(2, "after")));
    }

    #[test]
    fn audio_waits_its_turn_like_a_say_and_an_interrupting_one_cuts_in() {
        let mut d = Dialogue::<Clip>::default();
        assert_eq!(
            d.say(1, Said::Audio("greeting.wav"), false),
            Say::Now(Start {
                turn: 1,
                said: Said::Audio("greeting.wav")
            })
        );
        d.started(1);
        assert_eq!(d.say(2, Said::Audio("lesson.wav"), false), Say::Queued { ahead: 0 });
        assert_eq!(d.say(3, repeat("and text after it"), false), Say::Queued { ahead: 1 });
        let next = d.ended(1, false).expect("the queued audio");
        assert_eq!(next.said, Said::Audio("lesson.wav"));
        d.started(2);
        // Urgent audio: cuts turn 2 and drops the text waiting behind it.
        assert!(matches!(d.say(4, Said::Audio("urgent.wav"), true), Say::Now(_)));
        d.started(4);
        assert_eq!((d.ended(2, true), d.waiting()), (None, 0));
    }

    #[test]
    fn a_voice_barge_in_during_a_backends_turn_stops_it_and_what_waits() {
        let mut d = Dialogue::<Clip>::default();
        d.started(1);
        d.say(2, Said::Audio("next.wav"), false);
        // The user starts speaking (barge-in): the session interrupts; their words then start
        // a turn of their own, and nothing of the backend's follows it.
        assert!(d.interrupt());
        d.started(3);
        assert_eq!(d.ended(1, true), None);
        assert_eq!(d.ended(3, false), None);
        assert!(!d.busy());
    }

    #[test]
    fn speech_over_the_avatar_barges_in_or_is_ignored_as_echo_with_its_utterance() {
        let mut d = Dialogue::<Clip>::new(true);
        assert_eq!(d.voice_started(false), Voice::Listen);
        assert!(d.utterance(), "an ordinary utterance is answered");
        d.started(1);
        d.say(2, Said::Audio("after.wav"), false);
        assert_eq!(d.voice_started(true), Voice::BargeIn);
        assert!(
            !d.busy() && d.waiting() == 0,
            "the barge-in stopped the answer and what waited"
        );
        assert!(d.utterance(), "and the user's words are answered");

        let mut quiet = Dialogue::<Clip>::new(false);
        quiet.started(1);
        assert_eq!(quiet.voice_started(true), Voice::Ignore);
        assert!(quiet.busy(), "barge-in off: the avatar goes on");
        assert!(!quiet.utterance(), "the echo's utterance is dropped");
        assert_eq!(quiet.voice_started(false), Voice::Listen);
        assert!(quiet.utterance(), "the next one, after the avatar, is answered");
    }
}
