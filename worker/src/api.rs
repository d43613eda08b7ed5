//! The session API on the worker: sessions addressable by id.
//!
//! Each running session registers a handle here ([`Directory::register`]): a command inbox.
//! A relay carries an operator's API call as a command stream ([`avatar_proto::api`]);
//! [`serve_command`] finds the session by id, puts the command in its inbox with a reply
//! channel, and sends the reply back on the stream. The session acts on the command between its
//! other events, so everything about a session still happens on its own task.

use crate::session::SendHalf;
use crate::Context;
use avatar_proto::api::{Command, Reply, SessionInfo};
use avatar_proto::stream::send_frame;
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
/// Commands that may wait in one session's inbox.
const INBOX: usize = 16;

/// A command for one session, with where its reply goes.
pub struct Request {
    pub command: Command,
    pub reply: oneshot::Sender<Reply>,
}

/// The sessions this worker runs, by id.
#[derive(Default)]
pub struct Directory {
    sessions: Mutex<HashMap<String, (u64, mpsc::Sender<Request>)>>,
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
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (u64, mpsc::Sender<Request>)>> {
        self.sessions.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Register session `id`; its commands arrive on the returned receiver until the guard drops.
    pub fn register(self: &Arc<Self>, id: &str) -> (Registered, mpsc::Receiver<Request>) {
        let (tx, rx) = mpsc::channel(INBOX);
        let key = self.next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        self.lock().insert(id.to_owned(), (key, tx));
        let guard = Registered {
            directory: Arc::clone(self),
            id: id.to_owned(),
            key,
        };
        (guard, rx)
    }

    fn inbox(&self, id: &str) -> Option<mpsc::Sender<Request>> {
        self.lock().get(id).map(|(_, tx)| tx.clone())
    }

    fn all(&self) -> Vec<mpsc::Sender<Request>> {
        self.lock().values().map(|(_, tx)| tx.clone()).collect()
    }

    /// Ask one session; `NotFound` if it is not here or ended before it answered.
    pub async fn ask(&self, id: &str, command: Command) -> Reply {
        match self.inbox(id) {
            Some(inbox) => ask(&inbox, command).await,
            None => Reply::NotFound {},
        }
    }

    /// Every session's description, all asked at once.
    pub async fn list(&self) -> Vec<SessionInfo> {
        let asks = self.all().into_iter().map(|inbox| async move {
            match tokio::time::timeout(LIST_WITHIN, ask(&inbox, Command::List {})).await {
                Ok(Reply::Session { session }) => Some(session),
                _ => None,
            }
        });
        futures::future::join_all(asks).await.into_iter().flatten().collect()
    }
}

/// Put `command` in a session's inbox and wait for its reply: `busy` if the inbox is full or the
/// session does not answer in time, `NotFound` if it ended.
async fn ask(inbox: &mpsc::Sender<Request>, command: Command) -> Reply {
    let busy = || Reply::Refused {
        code: "busy".into(),
        message: "the session did not take the command in time; retry".into(),
    };
    let (reply, answer) = oneshot::channel();
    match inbox.try_send(Request { command, reply }) {
        Ok(()) => {}
        Err(mpsc::error::TrySendError::Full(_)) => return busy(),
        Err(mpsc::error::TrySendError::Closed(_)) => return Reply::NotFound {},
    }
    match tokio::time::timeout(REPLY_WITHIN, answer).await {
        Ok(Ok(reply)) => reply,
        Ok(Err(_)) => Reply::NotFound {},
        // The request stays in the inbox; the session skips it (its reply channel is closed).
        Err(_) => busy(),
    }
}

/// Serve one command stream from a relay: answer the command and finish the stream.
pub async fn serve_command(mut send: SendHalf, command: Command, ctx: Arc<Context>) {
    let reply = match command.session_id() {
        None => Reply::Sessions {
            sessions: ctx.directory.list().await,
        },
        Some(id) => {
            let id = id.to_owned();
            ctx.directory.ask(&id, command).await
        }
    };
    if let Err(e) = send_frame(&mut send, &SessionFrame::Reply(reply)).await {
        tracing::debug!(error = %e, "could not send the command's reply");
    }
    let _ = tokio::io::AsyncWriteExt::shutdown(&mut send).await;
}
