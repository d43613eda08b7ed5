//! Tunnel frames on byte streams (feature `io`).
//!
//! The only code in this crate that does I/O, kept behind a feature so that the default build —
//! and the fuzz targets — stay pure. It is generic over tokio's [`AsyncRead`] and [`AsyncWrite`]:
//! the relay and the worker pass their QUIC streams (quinn's `RecvStream` and `SendStream`), and
//! tests pass the two ends of a [`tokio::io::duplex`], so a session loop runs in memory exactly as
//! it runs over the tunnel.

use crate::tunnel::{encode_frame, FrameDecoder, FrameError};
use serde::{de::DeserializeOwned, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

/// Bytes asked of the stream per read.
const READ_CHUNK: usize = 16 * 1024;

/// Reading or writing a framed stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("read: {0}")]
    Read(std::io::Error),
    #[error("write: {0}")]
    Write(std::io::Error),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
}

impl StreamError {
    /// The transport's own error, for callers that know the transport (a QUIC stream's
    /// `std::io::Error` wraps quinn's `ReadError`/`WriteError`, which says why the connection
    /// closed).
    pub fn io_error(&self) -> Option<&std::io::Error> {
        match self {
            StreamError::Read(e) | StreamError::Write(e) => Some(e),
            StreamError::Frame(_) => None,
        }
    }
}

/// A byte stream read as decoded messages. [`FramedRecv::next`] is cancel-safe: a read that is
/// cancelled has taken no bytes, and bytes move into the decoder only after a read completes, so
/// it can sit in a `select!`.
pub struct FramedRecv<R> {
    recv: R,
    decoder: FrameDecoder,
    buf: Box<[u8]>,
}

impl<R: AsyncRead + Unpin> FramedRecv<R> {
    pub fn new(recv: R) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::default(),
            buf: vec![0; READ_CHUNK].into_boxed_slice(),
        }
    }

    /// The next message, or `None` at a clean end of stream.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, StreamError> {
        loop {
            if let Some(msg) = self.decoder.next_message()? {
                return Ok(Some(msg));
            }
            let n = self.recv.read(&mut self.buf).await.map_err(StreamError::Read)?;
            if n == 0 {
                self.decoder.finish()?;
                return Ok(None);
            }
            self.decoder.push(&self.buf[..n]);
        }
    }
}

/// Write one message as a frame.
pub async fn send_frame<W: AsyncWrite + Unpin, T: Serialize>(send: &mut W, msg: &T) -> Result<(), StreamError> {
    let frame = encode_frame(msg)?;
    send.write_all(&frame).await.map_err(StreamError::Write)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::tunnel::Control;

    #[tokio::test]
    async fn messages_cross_an_in_memory_stream_in_order_and_end_cleanly() {
        let (a, b) = tokio::io::duplex(64);
        let (_, mut write) = tokio::io::split(a);
        let (read, _) = tokio::io::split(b);
        let mut recv = FramedRecv::new(read);
        let writer = tokio::spawn(async move {
            for i in 0..50u32 {
                send_frame(
                    &mut write,
                    &Control::Ping {
                        seq: u64::from(i),
                        sent_ms: 0,
                    },
                )
                .await
                .expect("send");
            }
            // Dropping the writer ends the stream.
        });
        for i in 0..50u64 {
            match recv.next::<Control>().await.expect("frame") {
                Some(Control::Ping { seq, .. }) => assert_eq!(seq, i),
                other => panic!("expected ping {i}, got {other:?}"),
            }
        }
        writer.await.expect("writer");
        assert!(recv.next::<Control>().await.expect("clean end").is_none());
    }

    #[tokio::test]
    async fn a_stream_cut_inside_a_frame_is_an_error_not_an_end() {
        let frame = encode_frame(&Control::Pong { seq: 7, sent_ms: 1 }).expect("encode");
        let (mut a, b) = tokio::io::duplex(1024);
        a.write_all(&frame[..frame.len() - 1]).await.expect("write");
        drop(a);
        let mut recv = FramedRecv::new(b);
        assert!(matches!(recv.next::<Control>().await, Err(StreamError::Frame(_))));
    }
}
