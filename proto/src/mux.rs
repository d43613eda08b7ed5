//! Many streams over one byte stream, for the tunnel over TLS/TCP (feature `mux`).
//!
//! QUIC gives the tunnel its streams natively. Over TCP the same streams come from
//! [yamux](https://github.com/libp2p/rust-yamux) (libp2p's multiplexer: per-stream flow control,
//! either side may open a stream). yamux's `Connection` does all of its I/O when polled, so one
//! task — the **driver** returned by [`start`] — polls it for as long as the tunnel lives, hands
//! streams the peer opens to an [`Incoming`] queue, and opens streams for any [`Mux`] handle.
//! Streams are tokio `AsyncRead + AsyncWrite`, so [`crate::stream`] frames them exactly as it
//! frames QUIC streams, and the session code above cannot tell which transport it runs on.
//!
//! A stream the peer resets reads as a clean end; the session protocol says goodbye with its own
//! `Close` frame, so an end without one means the stream was lost.

use futures::future::poll_fn;
use std::future::Future;
use std::pin::pin;
use std::task::Poll;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::sync::{mpsc, oneshot};
use tokio_util::compat::{Compat, FuturesAsyncReadCompatExt, TokioAsyncReadCompatExt};
use tokio_util::sync::CancellationToken;

/// One multiplexed stream, as tokio I/O.
pub type MuxStream = Compat<yamux::Stream>;

/// Which end of the multiplexer this is: yamux numbers the streams of each side apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// The side that dialed (the worker).
    Client,
    /// The side that accepted (the relay).
    Server,
}

/// The multiplexer failed or is gone.
#[derive(Debug, thiserror::Error)]
pub enum MuxError {
    #[error("multiplexer: {0}")]
    Yamux(#[from] yamux::ConnectionError),
    #[error("the tunnel is closed")]
    Closed,
}

/// Opens streams and closes the connection; cheap to clone.
#[derive(Debug, Clone)]
pub struct Mux {
    open: mpsc::Sender<oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>>,
    close: CancellationToken,
}

impl Mux {
    /// A new stream to the peer. Waits while the peer's stream limit is reached.
    pub async fn open(&self) -> Result<MuxStream, MuxError> {
        let (tx, rx) = oneshot::channel();
        self.open.send(tx).await.map_err(|_| MuxError::Closed)?;
        let stream = rx.await.map_err(|_| MuxError::Closed)??;
        Ok(stream.compat())
    }

    /// Close the connection (every stream ends); the driver returns once the close is sent.
    pub fn close(&self) {
        self.close.cancel();
    }

    /// Resolves when the connection has ended, whichever side ended it.
    pub async fn closed(&self) {
        self.close.cancelled().await;
    }

    pub fn is_closed(&self) -> bool {
        self.close.is_cancelled()
    }
}

/// Streams the peer opened, in order; `None` once the connection has ended.
pub type Incoming = mpsc::Receiver<MuxStream>;

/// yamux settings for a tunnel that holds at most `max_streams` streams at once.
fn config(max_streams: usize) -> yamux::Config {
    let max_streams = max_streams.max(1);
    let mut cfg = yamux::Config::default();
    // yamux asserts that the connection window covers every stream's initial 256 KiB window:
    // lift the window, set the count, then bound the window to exactly what the count needs.
    cfg.set_max_connection_receive_window(None);
    cfg.set_max_num_streams(max_streams);
    cfg.set_max_connection_receive_window(Some(max_streams.saturating_mul(256 * 1024)));
    cfg
}

/// Start multiplexing `io`. Returns the handle, the peer's streams (up to `incoming_queue`
/// waiting; more are reset), and the driver future, which the caller spawns: it runs until the
/// connection ends and then marks the [`Mux`] closed.
pub fn start<T>(
    io: T,
    side: Side,
    max_streams: usize,
    incoming_queue: usize,
) -> (Mux, Incoming, impl Future<Output = Result<(), MuxError>> + Send)
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mode = match side {
        Side::Client => yamux::Mode::Client,
        Side::Server => yamux::Mode::Server,
    };
    let mut conn = yamux::Connection::new(io.compat(), config(max_streams), mode);
    let (open_tx, mut open_rx) = mpsc::channel::<oneshot::Sender<Result<yamux::Stream, yamux::ConnectionError>>>(16);
    let (in_tx, in_rx) = mpsc::channel(incoming_queue.max(1));
    let close = CancellationToken::new();
    let mux = Mux {
        open: open_tx,
        close: close.clone(),
    };
    let driver = async move {
        let mut cancelled = pin!(close.clone().cancelled_owned());
        let mut waiting: Option<oneshot::Sender<_>> = None;
        let mut closing = false;
        let result = poll_fn(|cx| loop {
            if closing {
                return conn.poll_close(cx).map(|r| r.map_err(MuxError::from));
            }
            if cancelled.as_mut().poll(cx).is_ready() {
                closing = true;
                continue;
            }
            if waiting.is_none() {
                if let Poll::Ready(Some(tx)) = open_rx.poll_recv(cx) {
                    waiting = Some(tx);
                }
            }
            if let Some(tx) = waiting.take() {
                match conn.poll_new_outbound(cx) {
                    Poll::Ready(result) => {
                        let _ = tx.send(result);
                        continue;
                    }
                    Poll::Pending => waiting = Some(tx),
                }
            }
            match conn.poll_next_inbound(cx) {
                Poll::Ready(Some(Ok(stream))) => {
                    // A full queue resets the stream (dropping it): the peer opens no more than
                    // the other side takes.
                    let _ = in_tx.try_send(stream.compat());
                }
                Poll::Ready(Some(Err(e))) => return Poll::Ready(Err(MuxError::from(e))),
                Poll::Ready(None) => return Poll::Ready(Ok(())),
                Poll::Pending => return Poll::Pending,
            }
        })
        .await;
        close.cancel();
        result
    };
    (mux, in_rx, driver)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stream::{send_frame, FramedRecv};
    use crate::tunnel::Control;

    #[tokio::test]
    async fn streams_opened_by_either_side_carry_frames_and_closing_ends_both() {
        let (a, b) = tokio::io::duplex(64 * 1024);
        let (client, mut client_in, client_driver) = start(a, Side::Client, 8, 8);
        let (server, mut server_in, server_driver) = start(b, Side::Server, 8, 8);
        let client_task = tokio::spawn(client_driver);
        let server_task = tokio::spawn(server_driver);

        // Server → client, as the relay opens session streams.
        let mut s = server.open().await.expect("open");
        send_frame(&mut s, &Control::Ping { seq: 1, sent_ms: 2 })
            .await
            .expect("send");
        let c = client_in.recv().await.expect("incoming");
        let msg: Option<Control> = FramedRecv::new(c).next().await.expect("read");
        assert_eq!(msg, Some(Control::Ping { seq: 1, sent_ms: 2 }));

        // Client → server, as the worker opens its control stream.
        let mut c = client.open().await.expect("open");
        send_frame(&mut c, &Control::Draining {}).await.expect("send");
        let s = server_in.recv().await.expect("incoming");
        let msg: Option<Control> = FramedRecv::new(s).next().await.expect("read");
        assert_eq!(msg, Some(Control::Draining {}));

        client.close();
        tokio::time::timeout(std::time::Duration::from_secs(5), async {
            client_task.await.expect("join").expect("client closes cleanly");
            server_task.await.expect("join").expect("server sees the close");
        })
        .await
        .expect("both drivers end");
        assert!(server.is_closed());
        assert!(server_in.recv().await.is_none(), "no more streams");
        assert!(matches!(server.open().await, Err(MuxError::Closed)));
    }

    #[test]
    fn a_large_stream_limit_is_a_valid_yamux_config() {
        // yamux asserts that the window covers the streams; a worker of the largest capacity
        // must not trip it.
        let _ = config(20_000);
        let _ = config(0);
    }
}
