//! The session API on the worker: sessions addressable by id.
//!
//! Each running session registers its handle here ([`Directory::register`]): its inbox. A relay
//! carries an operator's API call as a command stream ([`avatar_proto::api`]); [`serve_command`]
//! finds the session by id, puts the command in its inbox with a reply channel (never waiting:
//! a full inbox is `busy`), and sends the reply back on the stream. The session acts on the command between its
//! other events, so everything about a session still happens on its own task.
//!
//! An audio command's samples follow its frame on the stream ([`avatar_proto::api`]): once the
//! session has taken the turn, [`serve_command`] reads them and hands them on in pieces as they
//! come ([`AudioIn`]), so the avatar speaks while the upload goes on. The pieces wait in a small
//! channel: while the turn waits its place, or the lip-sync is behind, the stream is not read
//! (beyond what the transport's window holds), and the upload waits with it. At the end of the
//! stream, once the turn holds every piece, the relay hears [`Reply::Received`]; when the turn
//! is cut first, reading stops at once and it hears `interrupted`.

use crate::session::{NotTaken, RecvHalf, SendHalf, SessionHandle};
use crate::talk::AudioIn;
use crate::Context;
use avatar_proto::api::{Command, Reply, SessionInfo};
use avatar_proto::stream::{send_frame, FramedRecv};
use avatar_proto::tunnel::SessionFrame;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};

/// How long a session may take to answer a command (under the relay's `api.timeout_ms`, 5 s by
/// default, so that the relay hears `busy` rather than nothing).
const REPLY_WITHIN: Duration = Duration::from_secs(3);
/// How long one session may take to describe itself for a list.
const LIST_WITHIN: Duration = Duration::from_millis(1000);
/// Pieces of uploaded audio (up to 16 KiB each) read ahead of the lip-sync.
const AUDIO_AHEAD: usize = 8;

/// A command for one session, with where its reply goes.
pub struct Request {
    pub command: Command,
    pub reply: oneshot::Sender<Reply>,
    /// An audio command's samples.
    pub audio: Option<AudioIn>,
}

/// The sessions this worker runs, by id.
#[derive(Default)]
pub struct Directory {
    sessions: Mutex<HashMap<String, (u64, SessionHandle)>>,
    next: std::sync::atomic::AtomicU64,
}

/// A session's entry; removed from the directory on drop.
pub struct Registered {
    directory: Arc<Directory>,
    id: String,
    key: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        let mut sessions = self.directory.lock();
        // A newer session with the same id (the browser reconnected) keeps its entry.
        if sessions.get(&self.id).is_some_and(|(key, _)| *key == self.key) {
            sessions.remove(&self.id);
        }
    }
}

impl Directory {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, SessionHandle)>> {
        self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Register session `id` until the guard drops (a newer session with the same id, the
    /// browser reconnecting, takes the entry over).
    pub fn register(self: &Arc<Self>, id: &str, handle: SessionHandle) -> Registered {
        let key = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().insert(id.to_owned(), (key, handle));
        Registered {
            directory: Arc::clone(self),
            id: id.to_owned(),
            key,
        }
    }

    /// Session `id`'s handle, if it runs here.
    pub fn handle(&self, id: &str) -> Option<SessionHandle> {
        self.lock().get(id).map(|(_, h)| h.clone())
    }

    fn all(&self) -> Vec<SessionHandle> {
        self.lock().values().map(|(_, h)| h.clone()).collect()
    }

    /// Ask one session; `NotFound` if it is not here or ended before it answered.
    pub async fn ask(&self, id: &str, command: Command, audio: Option<AudioIn>) -> Reply {
        match self.handle(id) {
            Some(session) => ask(&session, command, audio).await,
            None => Reply::NotFound {},
        }
    }

    /// Every session's description, all asked at once.
    pub async fn list(&self) -> Vec<SessionInfo> {
        let asks = self.all().into_iter().map(|session| async move {
            match tokio::time::timeout(LIST_WITHIN, ask(&session, Command::List {}, None)).await {
                Ok(Reply::Session { session }) => Some(session),
                _ => None,
            }
        });
        futures::future::join_all(asks).await.into_iter().flatten().collect()
    }
}

/// Put `command` in a session's inbox and wait for its reply: `busy` if the inbox is full or the
/// session does not answer in time, `NotFound` if it ended.
async fn ask(session: &SessionHandle, command: Command, audio: Option<AudioIn>) -> Reply {
    let busy = || Reply::Refused {
        code: "busy".into(),
        message: "the session did not take the command in time; retry".into(),
    };
    let (reply, answer) = oneshot::channel();
    match session.try_command(Request { command, reply, audio }) {
        Ok(()) => {}
        Err(NotTaken::Full) => return busy(),
        Err(NotTaken::Ended) => return Reply::NotFound {},
    }
    match tokio::time::timeout(REPLY_WITHIN, answer).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(_)) => Reply::NotFound {},
        // The request stays in the inbox; the session skips it (its reply channel is closed).
        Err(_) => busy(),
    }
}

/// Serve one command stream from a relay: answer the command (and take an audio command's
/// samples), and finish the stream.
pub async fn serve_command(mut send: SendHalf, recv: FramedRecv<RecvHalf>, command: Command, ctx: Arc<Context>) {
    let mut samples = None;
    let reply = match (command.session_id(), &command) {
        (None, _) => Reply::Sessions {
            sessions: ctx.directory.list().await,
        },
        (Some(_), Command::Audio { rate, .. }) if !avatar_proto::api::AUDIO_RATES.contains(rate) => Reply::Refused {
            code: "bad_request".into(),
            message: format!("a sample rate of {rate} Hz is not taken"),
        },
        (Some(id), Command::Audio { rate, .. }) => {
            let id = id.to_owned();
            let (tx, pieces) = mpsc::channel(AUDIO_AHEAD);
            let audio = AudioIn {
                rate: *rate,
                pieces,
                upload: tx.downgrade(),
            };
            samples = Some(tx);
            ctx.directory.ask(&id, command, Some(audio)).await
        }
        // Kept after the session ends, so not asked of the session itself.
        (Some(id), Command::Transcript { .. }) => match ctx.transcripts.get(id) {
            Some(turns) => Reply::Transcript { turns },
            None => Reply::NotFound {},
        },
        (Some(id), _) => {
            let id = id.to_owned();
            ctx.directory.ask(&id, command, None).await
        }
    };
    let taken = matches!(reply, Reply::Turn { .. });
    if let Err(e) = send_frame(&mut send, &SessionFrame::Reply(reply)).await {
        tracing::debug!(error = %e, "could not send the command's reply");
    }
    if let (Some(pieces), true) = (samples, taken) {
        let (recv, rest) = recv.into_parts();
        let outcome = match read_audio(recv, rest, &pieces).await {
            Some(samples) => Reply::Received { samples },
            None => Reply::Refused {
                code: "interrupted".into(),
                message: "the turn was cut before it had all of the audio (interrupted, or the session ended)".into(),
            },
        };
        drop(pieces);
        if let Err(e) = send_frame(&mut send, &SessionFrame::Reply(outcome)).await {
            tracing::debug!(error = %e, "could not confirm the audio");
        }
    }
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut send).await;
}

/// Read 16-bit little-endian samples to the end of the stream and pass them on as pieces.
/// The samples read once the turn holds them all; `None` when the turn stopped taking them (it
/// was cut, or the session ended) or the stream broke.
async fn read_audio(mut recv: RecvHalf, rest: bytes::Bytes, pieces: &mpsc::Sender<Vec<f32>>) -> Option<u64> {
    use tokio::io::AsyncReadExt;
    let mut buf = vec![0u8; 16 * 1024];
    let mut odd: Option<u8> = None;
    let mut first = Some(rest);
    let mut samples = 0u64;
    loop {
        let bytes: &[u8] = match first.take() {
            Some(rest) if !rest.is_empty() => {
                let n = rest.len().min(buf.len());
                buf[..n].copy_from_slice(&rest[..n]);
                if n < rest.len() {
                    first = Some(rest.slice(n..));
                }
                &buf[..n]
            }
            _ => {
                let read = tokio::select! {
                    // Cut while waiting for bytes: stop now, so the relay hears of it at once.
                    _ = pieces.closed() => return None,
                    read = recv.read(&mut buf) => read,
                };
                match read {
                    Ok(0) => break,
                    Ok(n) => &buf[..n],
                    Err(e) => {
                        tracing::debug!(error = %e, "the audio upload's stream broke");
                        return None;
                    }
                }
            }
        };
        let mut piece = Vec::with_capacity(bytes.len() / 2 + 1);
        let mut bytes = bytes;
        if let (Some(lo), Some((&hi, tail))) = (odd, bytes.split_first()) {
            piece.push(f32::from(i16::from_le_bytes([lo, hi])) / 32768.0);
            odd = None;
            bytes = tail;
        }
        let pairs = bytes.chunks_exact(2);
        odd = odd.or_else(|| pairs.remainder().first().copied());
        piece.extend(pairs.map(|b| f32::from(i16::from_le_bytes([b[0], b[1]])) / 32768.0));
        samples += piece.len() as u64;
        if !piece.is_empty() && pieces.send(piece).await.is_err() {
            tracing::debug!("the audio's turn ended; the rest of the upload is refused");
            return None;
        }
    }
    // The end of the upload: answer once the turn has taken every piece.
    while pieces.capacity() < pieces.max_capacity() {
        tokio::select! {
            _ = pieces.closed() => return None,
            _ = tokio::time::sleep(std::time::Duration::from_millis(20)) => {}
        }
    }
    Some(samples)
}
