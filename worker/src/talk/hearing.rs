//! Voice input for one peer: the microphone's audio through a [`Listener`] on a thread of its own.
//!
//! The thread loads its own Silero session (the model keeps state per stream) when the first audio
//! arrives, reads the 16 kHz chunks the peer decodes ([`crate::rtc::Answer::mic`]), and sends what
//! it hears to the session. It ends when the peer's microphone ends (the track, with the peer) or
//! the session stops listening (its `stop` token, cancelled when the peer is replaced or stopped).

use super::vad::{Heard, Listener, SileroVad};
use crate::config::VadConfig;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// What the session hears from the thread.
#[derive(Debug)]
pub enum Hearing {
    Heard(Heard),
    /// The model could not be loaded or run, or the thread not started: voice input stops for
    /// this peer.
    Failed(String),
}

/// How the words of pause `pause` read, as the session tells the thread: one number, so one
/// atomic carries it (0: nothing read yet; pauses are numbered from 1).
pub fn words(pause: u64, complete: bool) -> u64 {
    (pause << 1) | u64::from(complete)
}

/// What the thread needs to listen.
pub struct Voice {
    /// The Silero VAD model, and the ONNX Runtime library that runs it.
    pub model: PathBuf,
    pub onnxruntime: PathBuf,
    pub vad: VadConfig,
    /// How often the utterance so far is handed over for a partial transcript (0: never).
    pub partial_ms: u64,
    /// Pauses are numbered from this one on (a session's peers each get their own range).
    pub pauses_from: u64,
}

/// Listen to `mic` until it ends or `stop` fires. Nothing runs until the first audio arrives:
/// then the thread starts and loads the model, so a page without a microphone costs nothing.
/// `busy` is the conversation's current turn (non-zero: the avatar is answering, so the
/// barge-in guard applies). `words` is how the words of the last pause read ([`words`],
/// [`Listener::words`]).
pub fn listen(
    voice: Voice,
    mut mic: mpsc::Receiver<Vec<f32>>,
    busy: Arc<AtomicU64>,
    words: Arc<AtomicU64>,
    out: mpsc::UnboundedSender<Hearing>,
    stop: CancellationToken,
) {
    let span = tracing::Span::current();
    tokio::spawn(async move {
        let first = tokio::select! {
            _ = stop.cancelled() => return,
            first = mic.recv() => first,
        };
        let Some(first) = first else { return };
        let failed = out.clone();
        let thread = std::thread::Builder::new().name("vad".into()).spawn(move || {
            let _entered = span.enter();
            let mut listener = match SileroVad::load(&voice.model, &voice.onnxruntime) {
                Ok(vad) => Listener::new(vad, &voice.vad)
                    .with_partials(voice.partial_ms)
                    .with_pauses_from(voice.pauses_from),
                Err(e) => {
                    let _ = out.send(Hearing::Failed(e.to_string()));
                    return;
                }
            };
            tracing::debug!("listening to the microphone");
            let mut next = Some(first);
            while let Some(chunk) = next.take().or_else(|| mic.blocking_recv()) {
                if stop.is_cancelled() {
                    return;
                }
                let started = std::time::Instant::now();
                let read = words.load(Ordering::Acquire);
                if read != 0 {
                    listener.words(read >> 1, read & 1 == 1);
                }
                let heard = listener.push(&chunk, busy.load(Ordering::Acquire) != 0);
                metrics::histogram!("worker_vad_chunk_seconds").record(started.elapsed().as_secs_f64());
                match heard {
                    Ok(heard) => {
                        for h in heard {
                            if out.send(Hearing::Heard(h)).is_err() {
                                return;
                            }
                        }
                    }
                    Err(e) => {
                        let _ = out.send(Hearing::Failed(e.to_string()));
                        return;
                    }
                }
            }
        });
        if let Err(e) = thread {
            let _ = failed.send(Hearing::Failed(format!("no thread for voice input: {e}")));
        }
    });
}
