//! Tunnel frames on QUIC streams (feature `quinn`).
//!
//! The only code in this crate that touches a socket, kept behind a feature so that the default
//! build — and the fuzz targets — stay pure. Relay and worker both read and write their tunnel
//! streams through these two helpers.

use crate::tunnel::{encode_frame, FrameDecoder, FrameError};
use serde::{de::DeserializeOwned, Serialize};

/// Reading or writing a framed stream failed.
#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("read: {0}")]
    Read(#[from] quinn::ReadError),
    #[error("write: {0}")]
    Write(#[from] quinn::WriteError),
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
}

impl StreamError {
    /// The reason the peer gave if it closed the whole connection on purpose.
    pub fn close_reason(&self) -> Option<String> {
        let conn = match self {
            StreamError::Read(quinn::ReadError::ConnectionLost(c)) => c,
            StreamError::Write(quinn::WriteError::ConnectionLost(c)) => c,
            _ => return None,
        };
        match conn {
            quinn::ConnectionError::ApplicationClosed(close) => {
                Some(String::from_utf8_lossy(&close.reason).into_owned())
            }
            _ => None,
        }
    }
}

/// A receive stream that yields decoded messages. [`FramedRecv::next`] is cancel-safe: bytes
/// move into the decoder only after a read completes, so it can sit in a `select!`.
pub struct FramedRecv {
    recv: quinn::RecvStream,
    decoder: FrameDecoder,
}

impl FramedRecv {
    pub fn new(recv: quinn::RecvStream) -> Self {
        Self {
            recv,
            decoder: FrameDecoder::default(),
        }
    }

    /// The next message, or `None` at a clean end of stream.
    pub async fn next<T: DeserializeOwned>(&mut self) -> Result<Option<T>, StreamError> {
        loop {
            if let Some(msg) = self.decoder.next_message()? {
                return Ok(Some(msg));
            }
            match self.recv.read_chunk(64 * 1024, true).await? {
                Some(chunk) => self.decoder.push(&chunk.bytes),
                None => {
                    self.decoder.finish()?;
                    return Ok(None);
                }
            }
        }
    }
}

/// Write one message as a frame.
pub async fn send_frame<T: Serialize>(send: &mut quinn::SendStream, msg: &T) -> Result<(), StreamError> {
    send.write_all(&encode_frame(msg)?).await?;
    Ok(())
}
