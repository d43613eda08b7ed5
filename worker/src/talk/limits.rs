//! What one browser may spend of the backends, and how the backends are shared among sessions.
//!
//! A turn costs a language-model request that carries the history, then speech for its answer;
//! an utterance costs a recognition. The browser decides how often those happen, and a hosted
//! model bills by the token, so each session is held to four rules before anything is sent, and
//! the worker shares each backend among its sessions with a fifth:
//!
//! * **turn rate** ([`TurnLimiter`]): a token bucket per session (`talk.limits.turns_per_minute`,
//!   bursts of `turn_burst`) over typed messages and transcripts alike. A message over the rate
//!   is refused with `rate_limited`, and the answer being spoken goes on: a refused message
//!   interrupts nothing. `interrupt` is not a turn and is never limited.
//! * **message length** ([`check_length`]): a message or transcript longer than
//!   `max_message_chars` characters is refused with `message_too_long` before it costs a turn.
//! * **history budget** ([`trim_history`]): the earlier exchanges kept for the prompt are at most
//!   `talk.history` exchanges and `history_bytes` bytes; the oldest go first, and the system
//!   prompt is never counted nor dropped. A prompt is then at most the system prompt, the
//!   budget and one message.
//! * **one waiting utterance** (in [`super::Conversation::transcribe`]): one recognition runs and
//!   at most one utterance waits; a newer one replaces the waiting one, because the newest
//!   speech is what the user means now.
//! * **backend slots** ([`Slots`]): requests in flight to the language model, the speech server
//!   and speech recognition, all sessions together, are capped per kind (`llm_requests`,
//!   `tts_requests`, `asr_requests`). A turn waits for a slot at most `slot_wait_ms` (then it
//!   fails with `talk_failed`), and a turn that is interrupted or replaced while it waits
//!   leaves the queue with it: the wait is part of the turn's future, which cancelling drops.
//!
//! The turn limiter takes the time as an argument, so its tests need no sleeping.

use super::llm::{ChatMessage, Role};
use super::TalkError;
use crate::config::TalkLimits;
use avatar_proto::signaling::{ErrorCode, ServerEvent};
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::{InMemoryState, NotKeyed};
use governor::{Quota, RateLimiter};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{Semaphore, SemaphorePermit};

/// Why a message (typed or a transcript) starts no turn. Each is told to the browser as an
/// `error` event ([`Refusal::event`]); the session goes on.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    /// Longer than `talk.limits.max_message_chars`.
    #[error("the message is {chars} characters long; at most {max} are accepted")]
    TooLong { chars: usize, max: usize },
    /// Over the session's turn rate.
    #[error(
        "too many messages: at most {per_minute} a minute ({burst} at once); try again in {} ms",
        retry_after.as_millis()
    )]
    RateLimited {
        retry_after: Duration,
        per_minute: u32,
        burst: u32,
    },
    /// No media clock is attached yet, so there is nothing to play an answer on.
    #[error("the video is not playing yet: send webrtc_offer, wait for the connection, then text_webrtc")]
    NotReady,
}

impl Refusal {
    pub fn code(&self) -> ErrorCode {
        match self {
            Refusal::TooLong { .. } => ErrorCode::MessageTooLong,
            Refusal::RateLimited { .. } => ErrorCode::RateLimited,
            Refusal::NotReady => ErrorCode::NoSession,
        }
    }

    /// The `error` event the browser gets.
    pub fn event(&self) -> ServerEvent {
        ServerEvent::error(self.code(), self.to_string())
    }

    /// The metric label.
    pub fn reason(&self) -> &'static str {
        match self {
            Refusal::TooLong { .. } => "too_long",
            Refusal::RateLimited { .. } => "rate_limited",
            Refusal::NotReady => "not_ready",
        }
    }
}

/// Refuse `text` if it has more than `max` characters. A text of more than `4 × max` bytes is
/// refused without counting (no character is longer than 4 bytes).
pub fn check_length(text: &str, max: usize) -> Result<(), Refusal> {
    if text.len() <= max {
        return Ok(());
    }
    let chars = if text.len() > max.saturating_mul(4) {
        text.len() / 4
    } else {
        text.chars().count()
    };
    if chars > max {
        return Err(Refusal::TooLong { chars, max });
    }
    Ok(())
}

/// The limiter's clock: the time of the latest check, so the bucket runs on the time passed in.
#[derive(Debug, Clone, Default)]
struct InputClock(Arc<AtomicU64>);

impl Clock for InputClock {
    type Instant = Duration;
    fn now(&self) -> Duration {
        Duration::from_nanos(self.0.load(Ordering::Relaxed))
    }
}

type Limiter = RateLimiter<NotKeyed, InMemoryState, InputClock, NoOpMiddleware<Duration>>;

/// One session's turn rate: a token bucket of `burst` turns refilled at `per_minute`.
pub struct TurnLimiter {
    /// None: no limit (`turns_per_minute = 0`).
    limiter: Option<Limiter>,
    clock: InputClock,
    epoch: Instant,
    per_minute: u32,
    burst: u32,
}

impl TurnLimiter {
    /// A full bucket at `epoch`.
    pub fn new(per_minute: u32, burst: u32, epoch: Instant) -> Self {
        let clock = InputClock::default();
        let burst = burst.max(1);
        let limiter = NonZeroU32::new(per_minute).map(|rate| {
            let quota = Quota::per_minute(rate).allow_burst(NonZeroU32::new(burst).unwrap_or(NonZeroU32::MIN));
            RateLimiter::direct_with_clock(quota, clock.clone())
        });
        Self {
            limiter,
            clock,
            epoch,
            per_minute,
            burst,
        }
    }

    /// Take one turn at `now`, or say how long until one is free. Times before the last one
    /// passed in count as the last one.
    pub fn check(&self, now: Instant) -> Result<(), Refusal> {
        let Some(limiter) = &self.limiter else {
            return Ok(());
        };
        let at = now
            .saturating_duration_since(self.epoch)
            .as_nanos()
            .min(u128::from(u64::MAX)) as u64;
        self.clock.0.fetch_max(at, Ordering::Relaxed);
        limiter.check().map_err(|not_until| Refusal::RateLimited {
            retry_after: not_until.wait_time_from(self.clock.now()),
            per_minute: self.per_minute,
            burst: self.burst,
        })
    }
}

/// Bytes of a message as the prompt carries it (its text; the JSON around it is constant).
pub fn message_bytes(m: &ChatMessage) -> usize {
    m.content.len()
}

/// Keep at most `max_exchanges` exchanges (user + assistant) and `max_bytes` bytes of them in
/// `history`, dropping the oldest first. A system message is never in the history: it is added
/// when the prompt is built, whatever the budget.
pub fn trim_history(history: &mut Vec<ChatMessage>, max_exchanges: usize, max_bytes: usize) {
    debug_assert!(history.iter().all(|m| m.role != Role::System));
    let mut bytes: usize = history.iter().map(message_bytes).sum();
    let mut drop = 0;
    while drop < history.len() && ((history.len() - drop) > max_exchanges * 2 || bytes > max_bytes) {
        // Whole exchanges: the user's message and the answer after it.
        let n = if history.get(drop + 1).is_some_and(|m| m.role == Role::Assistant) {
            2
        } else {
            1
        };
        bytes -= history[drop..drop + n].iter().map(message_bytes).sum::<usize>();
        drop += n;
    }
    history.drain(..drop);
}

/// A backend kind, for its slots and its messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Llm,
    Tts,
    Asr,
}

impl Backend {
    pub fn name(self) -> &'static str {
        match self {
            Backend::Llm => "language model",
            Backend::Tts => "speech server",
            Backend::Asr => "speech recognition",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Backend::Llm => "llm",
            Backend::Tts => "tts",
            Backend::Asr => "asr",
        }
    }
}

/// Requests in flight to each backend, all sessions together: a request takes a slot for as
/// long as it runs. Waiting is bounded, and dropping the waiting future leaves the queue.
pub struct Slots {
    llm: Semaphore,
    tts: Semaphore,
    asr: Semaphore,
    wait: Duration,
}

impl Slots {
    pub fn new(limits: &TalkLimits) -> Self {
        Self {
            llm: Semaphore::new(limits.llm_requests.max(1)),
            tts: Semaphore::new(limits.tts_requests.max(1)),
            asr: Semaphore::new(limits.asr_requests.max(1)),
            wait: Duration::from_millis(limits.slot_wait_ms.max(1)),
        }
    }

    /// A slot for one request to `backend`, or [`TalkError::Busy`] after the longest wait.
    pub async fn acquire(&self, backend: Backend) -> Result<SemaphorePermit<'_>, TalkError> {
        let semaphore = match backend {
            Backend::Llm => &self.llm,
            Backend::Tts => &self.tts,
            Backend::Asr => &self.asr,
        };
        match tokio::time::timeout(self.wait, semaphore.acquire()).await {
            Ok(Ok(permit)) => Ok(permit),
            // The semaphores are never closed; either way, no slot.
            Ok(Err(_)) | Err(_) => {
                metrics::counter!("worker_backend_busy_total", "backend" => backend.label()).increment(1);
                Err(TalkError::Busy(backend.name()))
            }
        }
    }

    /// Free slots of `backend` now (tests and metrics).
    pub fn available(&self, backend: Backend) -> usize {
        match backend {
            Backend::Llm => self.llm.available_permits(),
            Backend::Tts => self.tts.available_permits(),
            Backend::Asr => self.asr.available_permits(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(role: Role, content: &str) -> ChatMessage {
        ChatMessage {
            role,
            content: content.into(),
        }
    }

    #[test]
    fn the_bucket_allows_its_burst_then_one_turn_per_period() {
        let t0 = Instant::now();
        let limiter = TurnLimiter::new(60, 3, t0);
        for _ in 0..3 {
            limiter.check(t0).expect("the burst");
        }
        let Err(Refusal::RateLimited { retry_after, .. }) = limiter.check(t0) else {
            panic!("a fourth turn at once is over the rate");
        };
        assert!(
            retry_after <= Duration::from_secs(1) && retry_after > Duration::ZERO,
            "{retry_after:?}"
        );
        assert!(limiter.check(t0 + Duration::from_millis(500)).is_err());
        limiter
            .check(t0 + Duration::from_secs(1))
            .expect("one more after a second");
        assert!(limiter.check(t0 + Duration::from_millis(1500)).is_err());
        // 100 messages, one every 50 ms: the burst and one a second.
        let limiter = TurnLimiter::new(60, 3, t0);
        let allowed = (0..100u64)
            .filter(|i| limiter.check(t0 + Duration::from_millis(50 * i)).is_ok())
            .count();
        assert_eq!(
            allowed,
            3 + 4,
            "3 at once, then at 1, 2, 3 and 4 s (the last at 4.95 s)"
        );
        // An earlier time than seen before cannot refill the bucket.
        assert!(limiter.check(t0).is_err());
    }

    #[test]
    fn no_rate_means_no_limit() {
        let t0 = Instant::now();
        let limiter = TurnLimiter::new(0, 3, t0);
        assert!((0..1000).all(|_| limiter.check(t0).is_ok()));
    }

    #[test]
    fn length_is_counted_in_characters() {
        assert_eq!(check_length("hello", 5), Ok(()));
        assert_eq!(check_length("你好你好你", 5), Ok(()), "15 bytes, 5 characters");
        assert_eq!(
            check_length("你好你好你好", 5),
            Err(Refusal::TooLong { chars: 6, max: 5 })
        );
        let huge = "a".repeat(60_000);
        assert!(matches!(check_length(&huge, 2000), Err(Refusal::TooLong { .. })));
        assert_eq!(
            check_length(&huge, 2000).expect_err("too long").code(),
            ErrorCode::MessageTooLong
        );
    }

    #[test]
    fn history_drops_the_oldest_exchanges_first_to_fit_its_budget() {
        let mut h = Vec::new();
        for i in 0..5 {
            h.push(msg(Role::User, &format!("q{i}{}", "x".repeat(98))));
            h.push(msg(Role::Assistant, &format!("a{i}{}", "y".repeat(98))));
        }
        let mut by_count = h.clone();
        trim_history(&mut by_count, 2, usize::MAX);
        assert_eq!(by_count.len(), 4);
        assert!(by_count[0].content.starts_with("q3"));
        // 200 bytes an exchange: a budget of 450 keeps two.
        let mut by_bytes = h.clone();
        trim_history(&mut by_bytes, 10, 450);
        let kept: Vec<&str> = by_bytes.iter().map(|m| &m.content[..2]).collect();
        assert_eq!(kept, ["q3", "a3", "q4", "a4"]);
        // An exchange larger than the whole budget leaves nothing.
        let mut tiny = h;
        trim_history(&mut tiny, 10, 100);
        assert!(tiny.is_empty());
    }

    #[tokio::test]
    async fn a_backend_takes_as_many_requests_as_it_has_slots() {
        let limits = TalkLimits {
            llm_requests: 2,
            slot_wait_ms: 50,
            ..TalkLimits::default()
        };
        let slots = Slots::new(&limits);
        let a = slots.acquire(Backend::Llm).await.expect("first");
        let _b = slots.acquire(Backend::Llm).await.expect("second");
        let err = slots
            .acquire(Backend::Llm)
            .await
            .expect_err("a third waits, then gives up");
        assert!(err.to_string().contains("language model"), "{err}");
        assert!(
            slots.acquire(Backend::Tts).await.is_ok(),
            "other backends are not affected"
        );
        drop(a);
        let _slot = slots.acquire(Backend::Llm).await.expect("a freed slot is taken");
    }
}
