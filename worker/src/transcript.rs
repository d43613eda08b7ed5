//! What was said in a session, turn by turn: for the session API's
//! `GET /api/v1/sessions/{id}/transcript` and the relay's `transcript.*` webhooks.
//!
//! Two pieces:
//!
//! * [`Transcript`], one per session, a pure machine. The session tells it what happens (a user's
//!   message was taken, an answer was asked for, its text arrived, its speech ended) and it says
//!   when a turn is complete. A user's turn is complete at once. An answer is complete when its
//!   speech ends, or when it ends with nothing to hear; it carries the language model's final
//!   text (or, when it was cut before the model finished, what had arrived), and whether it was
//!   interrupted. Answers still open when the session ends close as interrupted.
//! * [`Transcripts`], the worker's store: every complete turn, by session id, while the session
//!   runs and for `transcripts.keep_s` after it ends. Bounded: at most
//!   `transcripts.max_turns_per_session` turns a session (later ones are counted and dropped)
//!   and `transcripts.max_ended_sessions` ended sessions (the oldest go first).
//!
//! ```text
//!   session ──user / asked / text / answer / ended──▶ Transcript ──complete turn──┬─▶ Transcripts (the API)
//!                                                                                 └─▶ relay (webhooks)
//! ```
//!
//! The store lives on the worker, not the relay: a session's worker is the one place that hears
//! every turn, whichever relay the browser and the backend use, so a transcript call on any relay
//! of a fleet finds it by asking the workers, as every session API call does. A worker restart
//! loses the transcripts it kept; the webhooks have delivered them by then.

use avatar_proto::api::{Source, Speaker, TranscriptTurn};
use chrono::{DateTime, Utc};
use std::collections::{HashMap, VecDeque};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// RFC 3339 UTC with milliseconds, as every transcript time is written.
pub fn timestamp(at: DateTime<Utc>) -> String {
    at.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// An answer asked for, not yet complete.
#[derive(Debug)]
struct Open {
    source: Source,
    started_at: DateTime<Utc>,
    text: String,
    /// The model's final text arrived (deltas after it are ignored).
    complete: bool,
}

/// The turns of one session in the making (see the module docs).
#[derive(Debug, Default)]
pub struct Transcript {
    open: HashMap<u64, Open>,
}

impl Transcript {
    /// The user's turn `turn` was taken: `started_at` when it began (a typed message's arrival,
    /// the start of speech). Complete at once; `None` for an empty text.
    pub fn user(
        &mut self,
        turn: u64,
        text: &str,
        source: Source,
        started_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Option<TranscriptTurn> {
        let text = text.trim();
        (!text.is_empty()).then(|| TranscriptTurn {
            turn,
            speaker: Speaker::User,
            text: text.to_owned(),
            source,
            started_at: timestamp(started_at),
            ended_at: timestamp(now),
            interrupted: false,
        })
    }

    /// Answer `turn` was asked for now. `text`: what it will say, when known in advance (a
    /// backend's `say` to repeat); otherwise the model's text fills it.
    pub fn asked(&mut self, turn: u64, source: Source, text: Option<String>, now: DateTime<Utc>) {
        let complete = text.is_some();
        self.open.insert(
            turn,
            Open {
                source,
                started_at: now,
                text: text.unwrap_or_default(),
                complete,
            },
        );
    }

    /// More of answer `turn`'s text, as the model writes it.
    pub fn delta(&mut self, turn: u64, delta: &str) {
        if let Some(open) = self.open.get_mut(&turn).filter(|o| !o.complete) {
            open.text.push_str(delta);
        }
    }

    /// Answer `turn`'s whole text.
    pub fn answer(&mut self, turn: u64, text: &str) {
        if let Some(open) = self.open.get_mut(&turn) {
            open.text = text.to_owned();
            open.complete = true;
        }
    }

    /// Answer `turn` ended (its speech ended, or it had nothing to say, or it failed): the
    /// complete turn, unless it is unknown or said nothing in words (a backend's own audio).
    pub fn ended(&mut self, turn: u64, interrupted: bool, now: DateTime<Utc>) -> Option<TranscriptTurn> {
        let open = self.open.remove(&turn)?;
        let text = open.text.trim();
        (!text.is_empty()).then(|| TranscriptTurn {
            turn,
            speaker: Speaker::Assistant,
            text: text.to_owned(),
            source: open.source,
            started_at: timestamp(open.started_at),
            ended_at: timestamp(now),
            interrupted,
        })
    }

    /// The session ends: every answer still open, as interrupted, in turn order.
    pub fn close(&mut self, now: DateTime<Utc>) -> Vec<TranscriptTurn> {
        self.cut_except(None, now)
    }

    /// Every answer still open but `keep`, as interrupted now, in turn order: they were cut
    /// (an interrupt, a barge-in, a new message), whether or not they had begun to play.
    pub fn cut_except(&mut self, keep: Option<u64>, now: DateTime<Utc>) -> Vec<TranscriptTurn> {
        let mut turns: Vec<u64> = self.open.keys().copied().filter(|t| Some(*t) != keep).collect();
        turns.sort_unstable();
        turns.into_iter().filter_map(|t| self.ended(t, true, now)).collect()
    }
}

/// `[transcripts]` in the worker's config.
#[derive(Debug, Clone, serde::Deserialize, serde::Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct TranscriptsConfig {
    /// How long a transcript stays readable through the session API after its session ends.
    pub keep_s: u64,
    /// Turns kept per session; later ones are dropped (and counted).
    pub max_turns_per_session: usize,
    /// Ended sessions whose transcripts are kept; past it the oldest go first.
    pub max_ended_sessions: usize,
}

impl Default for TranscriptsConfig {
    fn default() -> Self {
        Self {
            keep_s: 3600,
            max_turns_per_session: 1000,
            max_ended_sessions: 1000,
        }
    }
}

#[derive(Debug, Default)]
struct Kept {
    turns: Vec<TranscriptTurn>,
    /// Sessions running with this id now (a browser that reconnects runs a second one).
    live: usize,
    ended: Option<Instant>,
}

/// The worker's transcripts, by session id (see the module docs).
#[derive(Debug)]
pub struct Transcripts {
    config: TranscriptsConfig,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    sessions: HashMap<String, Kept>,
    /// Ended sessions, oldest first (an id may appear again if it was reused; the stale entry
    /// is skipped when it comes up).
    ended: VecDeque<(Instant, String)>,
}

impl Transcripts {
    pub fn new(config: TranscriptsConfig) -> Self {
        Self {
            config,
            inner: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// A session with this id starts. While another session with the id runs here (the browser
    /// renegotiating through a second stream), the transcript goes on; an id reused after its
    /// session ended starts a fresh one, so nobody reads another's lesson under a reused id.
    pub fn started(&self, session_id: &str) {
        let mut inner = self.lock();
        let kept = inner.sessions.entry(session_id.to_owned()).or_default();
        if kept.live == 0 {
            kept.turns.clear();
        }
        kept.live += 1;
        kept.ended = None;
    }

    /// A complete turn of a session.
    pub fn push(&self, session_id: &str, turn: TranscriptTurn) {
        let max = self.config.max_turns_per_session;
        let mut inner = self.lock();
        let kept = inner.sessions.entry(session_id.to_owned()).or_default();
        if kept.turns.len() >= max {
            metrics::counter!("worker_transcript_turns_dropped_total").increment(1);
            return;
        }
        kept.turns.push(turn);
    }

    /// A session with this id ended: its transcript is kept for `keep_s` from now.
    pub fn ended(&self, session_id: &str) {
        self.ended_at(session_id, Instant::now());
    }

    fn ended_at(&self, session_id: &str, now: Instant) {
        let mut inner = self.lock();
        let Some(kept) = inner.sessions.get_mut(session_id) else {
            return;
        };
        kept.live = kept.live.saturating_sub(1);
        if kept.live > 0 {
            return;
        }
        kept.ended = Some(now);
        inner.ended.push_back((now, session_id.to_owned()));
        self.expire(&mut inner, now);
    }

    /// A session's turns so far; `None` if this worker has none for it (or they expired).
    pub fn get(&self, session_id: &str) -> Option<Vec<TranscriptTurn>> {
        self.get_at(session_id, Instant::now())
    }

    fn get_at(&self, session_id: &str, now: Instant) -> Option<Vec<TranscriptTurn>> {
        let mut inner = self.lock();
        self.expire(&mut inner, now);
        inner.sessions.get(session_id).map(|k| k.turns.clone())
    }

    /// Drop ended sessions older than `keep_s`, and the oldest past `max_ended_sessions`.
    fn expire(&self, inner: &mut Inner, now: Instant) {
        let keep = Duration::from_secs(self.config.keep_s);
        while let Some((at, id)) = inner.ended.front().cloned() {
            let too_many = inner.ended.len() > self.config.max_ended_sessions;
            if !too_many && now.saturating_duration_since(at) < keep {
                break;
            }
            inner.ended.pop_front();
            // Only the entry that ended then: a reused id running again, or ended later, stays.
            if inner.sessions.get(&id).is_some_and(|k| k.ended == Some(at)) {
                inner.sessions.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: i64) -> DateTime<Utc> {
        DateTime::from_timestamp(1_800_000_000 + s, 0).unwrap_or_default()
    }

    #[test]
    fn a_chat_turn_is_the_users_words_then_the_models_whole_answer() {
        let mut t = Transcript::default();
        let user = t
            .user(1, " What is the sea? ", Source::Voice, at(0), at(1))
            .expect("user turn");
        assert_eq!(
            (user.speaker, user.text.as_str(), user.source),
            (Speaker::User, "What is the sea?", Source::Voice)
        );
        assert_eq!(
            (user.started_at.as_str(), user.ended_at.as_str()),
            ("2027-01-15T08:00:00.000Z", "2027-01-15T08:00:01.000Z")
        );
        t.asked(1, Source::Voice, None, at(1));
        t.delta(1, "Salt ");
        t.delta(1, "water.");
        t.answer(1, "Salt water, mostly.");
        t.delta(1, " ignored");
        let answer = t.ended(1, false, at(4)).expect("answer");
        assert_eq!(answer.text, "Salt water, mostly.");
        assert_eq!(
            (answer.speaker, answer.source, answer.interrupted),
            (Speaker::Assistant, Source::Voice, false)
        );
        assert_eq!(answer.ended_at, "2027-01-15T08:00:04.000Z");
        assert!(t.ended(1, false, at(5)).is_none(), "a turn ends once");
    }

    #[test]
    fn a_cut_answer_keeps_what_arrived_and_says_it_was_interrupted() {
        let mut t = Transcript::default();
        t.asked(2, Source::Text, None, at(0));
        t.delta(2, "The sea is");
        let cut = t.ended(2, true, at(1)).expect("answer");
        assert_eq!((cut.text.as_str(), cut.interrupted), ("The sea is", true));
    }

    #[test]
    fn a_repeat_say_is_its_text_and_audio_with_no_words_is_no_turn() {
        let mut t = Transcript::default();
        t.asked(3, Source::Api, Some("Welcome back.".into()), at(0));
        t.delta(3, "never");
        assert_eq!(t.ended(3, false, at(2)).map(|a| a.text), Some("Welcome back.".into()));
        t.asked(4, Source::Api, None, at(2));
        assert!(
            t.ended(4, false, at(3)).is_none(),
            "the backend's own audio has no text"
        );
        assert!(t.user(5, "   ", Source::Text, at(0), at(0)).is_none());
    }

    #[test]
    fn a_new_message_cuts_every_other_open_answer_at_once() {
        let mut t = Transcript::default();
        t.asked(1, Source::Text, None, at(0));
        t.delta(1, "Thinking about");
        t.asked(2, Source::Voice, None, at(3));
        let cut = t.cut_except(Some(2), at(3));
        assert_eq!(cut.len(), 1);
        assert_eq!(
            (cut[0].turn, cut[0].text.as_str(), cut[0].interrupted),
            (1, "Thinking about", true)
        );
        assert_eq!(
            cut[0].ended_at, "2027-01-15T08:00:03.000Z",
            "cut when the new message came"
        );
        assert!(t.ended(2, false, at(5)).is_none(), "turn 2 has no text yet");
    }

    #[test]
    fn answers_open_at_the_end_close_as_interrupted_in_order() {
        let mut t = Transcript::default();
        t.asked(7, Source::Api, Some("seven".into()), at(0));
        t.asked(6, Source::Text, Some("six".into()), at(0));
        let closed = t.close(at(9));
        assert_eq!(
            closed.iter().map(|c| (c.turn, c.interrupted)).collect::<Vec<_>>(),
            [(6, true), (7, true)]
        );
        assert!(t.close(at(10)).is_empty());
    }

    fn turn(n: u64) -> TranscriptTurn {
        TranscriptTurn {
            turn: n,
            speaker: Speaker::User,
            text: format!("turn {n}"),
            source: Source::Text,
            started_at: String::new(),
            ended_at: String::new(),
            interrupted: false,
        }
    }

    #[test]
    fn the_store_keeps_a_transcript_for_keep_s_after_the_end_and_bounds_everything() {
        let store = Transcripts::new(TranscriptsConfig {
            keep_s: 60,
            max_turns_per_session: 2,
            max_ended_sessions: 2,
        });
        let t0 = Instant::now();
        store.started("a");
        for n in 1..=3 {
            store.push("a", turn(n));
        }
        assert_eq!(store.get_at("a", t0).map(|t| t.len()), Some(2), "bounded per session");
        store.ended_at("a", t0);
        assert!(
            store.get_at("a", t0 + Duration::from_secs(59)).is_some(),
            "kept after the end"
        );
        assert!(
            store.get_at("a", t0 + Duration::from_secs(61)).is_none(),
            "gone after keep_s"
        );
        assert!(store.get("never").is_none());

        // At most two ended sessions: the oldest goes first.
        for id in ["b", "c", "d"] {
            store.started(id);
            store.push(id, turn(1));
            store.ended_at(id, t0);
        }
        assert!(store.get_at("b", t0).is_none());
        assert!(store.get_at("c", t0).is_some() && store.get_at("d", t0).is_some());

        // An id reused after its session ended starts afresh, and is kept while it runs.
        store.started("c");
        store.push("c", turn(2));
        assert!(store
            .get_at("c", t0 + Duration::from_secs(120))
            .is_some_and(|t| t.len() == 1));
        // A second session with an id that runs goes on with its transcript.
        store.started("c");
        store.push("c", turn(3));
        store.ended_at("c", t0);
        assert_eq!(store.get_at("c", t0).map(|t| t.len()), Some(2));
    }
}
