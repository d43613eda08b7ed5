//! Tunnel frames on byte streams (feature `io`).
//!
//! The only code in this crate that does I/O, kept behind a feature so that the default build —
//! and the fuzz targets — stay pure. It is generic over tokio's [`AsyncRead`] and [`AsyncWrite`]:
//! the relay and the worker pass their tunnel streams (quinn's on QUIC, yamux's on TLS/TCP, see
//! `mux`), and tests pass the two ends of a [`tokio::io::duplex`], so a session loop runs in
//! memory exactly as it runs over the tunnel.

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

impl<R> FramedRecv<R> {
    /// The stream back, with the bytes already read past the last frame: for a stream whose
    /// frames are followed by raw bytes (the session API's audio, [`crate::api`]).
    pub fn into_parts(mut self) -> (R, bytes::Bytes) {
        let rest = self.decoder.take_rest();
        (self.recv, rest)
    }
}

/// Read exactly one frame and nothing after it: for a handshake on a byte stream that another
/// protocol takes over afterwards (the TLS/TCP tunnel), where [`FramedRecv`]'s read-ahead could
/// swallow the next protocol's first bytes. `None` at a clean end before the frame.
pub async fn recv_frame_exact<R: AsyncRead + Unpin, T: DeserializeOwned>(
    recv: &mut R,
) -> Result<Option<T>, StreamError> {
    let mut header = [0u8; 4];
    match recv.read_exact(&mut header).await {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => return Ok(None),
        Err(e) => return Err(StreamError::Read(e)),
    }
    let mut decoder = FrameDecoder::default();
    decoder.push(&header);
    // The decoder checks the length against the limit before anything is read.
    if let Some(msg) = decoder.next_message()? {
        return Ok(Some(msg));
    }
    let len = u32::from_be_bytes(header) as usize;
    let mut body = vec![0u8; len];
    recv.read_exact(&mut body).await.map_err(StreamError::Read)?;
    decoder.push(&body);
    match decoder.next_message()? {
        Some(msg) => Ok(Some(msg)),
        None => Err(StreamError::Frame(crate::tunnel::FrameError::Truncated {
            buffered: len,
        })),
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
    async fn an_exact_read_takes_one_frame_and_leaves_what_follows() {
        let mut bytes = encode_frame(&Control::Pong { seq: 7, sent_ms: 1 })
            .expect("encode")
            .to_vec();
        bytes.extend_from_slice(b"next protocol");
        let mut reader = &bytes[..];
        let msg: Option<Control> = recv_frame_exact(&mut reader).await.expect("frame");
        assert_eq!(msg, Some(Control::Pong { seq: 7, sent_ms: 1 }));
        assert_eq!(reader, b"next protocol");
        let mut huge = &(u32::MAX.to_be_bytes())[..];
        assert!(matches!(
            recv_frame_exact::<_, Control>(&mut huge).await,
            Err(StreamError::Frame(_))
        ));
        let mut empty: &[u8] = &[];
        assert!(recv_frame_exact::<_, Control>(&mut empty)
            .await
            .expect("clean end")
            .is_none());
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
