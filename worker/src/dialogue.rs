//! Whose turn it is: the rules that order a session's answers, as a pure state machine.
//!
//! Turns come from the browser (a typed message, a transcript of speech) and from the operator's
//! backend (the session API's `say`). A browser's message always starts at once: the user is
//! talking, and the answer in progress is cut. A backend's `say` waits until the avatar has
//! finished what it says, unless it asks to `interrupt`; waiting says play in order, one after
//! another. An interrupt (the API's, the browser's, or a voice barge-in) stops the answer and
//! drops every say still waiting.
//!
//! [`Dialogue`] only decides; the session does what it says (starts a turn on its conversation)
//! and reports back what happened ([`Dialogue::started`], [`Dialogue::ended`]).

use avatar_proto::api::SayMode;
use std::collections::VecDeque;

/// Says that may wait behind the answer in progress; more are refused.
pub const MAX_WAITING: usize = 16;

/// A turn the session should start now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Start {
    pub turn: u64,
    pub text: String,
    pub mode: SayMode,
}

/// What to do with a backend's `say`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Say {
    /// Start it now.
    Now(Start),
    /// It waits behind the answer in progress (and `ahead` other says).
    Queued { ahead: usize },
}

/// The turn order of one session (see the module docs).
#[derive(Debug, Default)]
pub struct Dialogue {
    /// The turn being prepared or spoken.
    current: Option<u64>,
    waiting: VecDeque<Start>,
}

impl Dialogue {
    /// Whether an answer is being prepared or spoken.
    pub fn busy(&self) -> bool {
        self.current.is_some()
    }

    /// Says waiting for their turn.
    pub fn waiting(&self) -> usize {
        self.waiting.len()
    }

    /// A backend's `say` as turn `turn` (the conversation's next number).
    pub fn say(&mut self, turn: u64, text: String, mode: SayMode, interrupt: bool) -> Say {
        let start = Start { turn, text, mode };
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
    pub fn ended(&mut self, turn: u64, interrupted: bool) -> Option<Start> {
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

    fn start(turn: u64, text: &str) -> Start {
        Start {
            turn,
            text: text.into(),
            mode: SayMode::Repeat,
        }
    }

    #[test]
    fn a_say_while_the_avatar_speaks_waits_its_turn_and_they_play_in_order() {
        let mut d = Dialogue::default();
        assert_eq!(
            d.say(1, "one".into(), SayMode::Repeat, false),
            Say::Now(start(1, "one"))
        );
        d.started(1);
        assert_eq!(d.say(2, "two".into(), SayMode::Repeat, false), Say::Queued { ahead: 0 });
        assert_eq!(d.say(3, "three".into(), SayMode::Chat, false), Say::Queued { ahead: 1 });
        assert!(d.busy() && d.waiting() == 2);
        assert_eq!(d.ended(1, false), Some(start(2, "two")));
        d.started(2);
        let next = d.ended(2, false).expect("three");
        assert_eq!((next.turn, next.mode), (3, SayMode::Chat));
        d.started(3);
        assert_eq!(d.ended(3, false), None);
        assert!(!d.busy());
    }

    #[test]
    fn interrupt_true_cuts_in_and_drops_the_waiting_says() {
        let mut d = Dialogue::default();
        d.started(1);
        d.say(2, "later".into(), SayMode::Repeat, false);
        assert_eq!(d.say(3, "now".into(), SayMode::Repeat, true), Say::Now(start(3, "now")));
        d.started(3);
        assert_eq!(d.waiting(), 0);
        // Turn 1's end arrives late (it was cut): it starts nothing.
        assert_eq!(d.ended(1, true), None);
        assert!(d.busy(), "turn 3 is still current");
    }

    #[test]
    fn the_browsers_message_cuts_in_and_the_waiting_says_follow_it() {
        let mut d = Dialogue::default();
        d.started(1);
        d.say(2, "backend".into(), SayMode::Repeat, false);
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
        let mut d = Dialogue::default();
        assert!(!d.interrupt(), "nothing to stop");
        d.started(1);
        d.say(2, "waiting".into(), SayMode::Repeat, false);
        assert!(d.interrupt());
        assert!(!d.busy() && d.waiting() == 0);
        assert_eq!(d.ended(1, true), None);
    }

    #[test]
    fn a_failed_turn_lets_the_next_say_play() {
        let mut d = Dialogue::default();
        d.started(1);
        d.say(2, "after".into(), SayMode::Repeat, false);
        assert_eq!(d.ended(1, false), Some(start(2, "after")));
    }
}
