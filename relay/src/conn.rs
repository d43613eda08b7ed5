//! A worker's tunnel, whichever transport carries it: the one type the registry, routing and
//! signaling see.
//!
//! Both transports give the same thing: streams the relay opens (one per browser session), a
//! round-trip time for routing, and a way to close. Session code gets boxed tokio halves and
//! frames them with [`avatar_proto::stream`], so it cannot tell QUIC from TLS/TCP.

use avatar_proto::mux::{Mux, MuxError};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite};

/// The sending half of a session stream.
pub type SendHalf = Box<dyn AsyncWrite + Send + Unpin>;
/// The receiving half of a session stream.
pub type RecvHalf = Box<dyn AsyncRead + Send + Unpin>;

/// Which transport carries a tunnel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// QUIC over UDP, the default.
    Quic,
    /// TLS over TCP with yamux streams, for workers whose network blocks UDP.
    Tcp,
}

impl Transport {
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Quic => "quic",
            Transport::Tcp => "tcp",
        }
    }
}

/// Opening a session stream failed.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error("connection: {0}")]
    Quic(#[from] quinn::ConnectionError),
    #[error("{0}")]
    Mux(#[from] MuxError),
}

/// The TLS/TCP side of a tunnel: the multiplexer and what the control loop measures.
#[derive(Debug)]
pub struct TcpTunnel {
    pub mux: Mux,
    pub remote: SocketAddr,
    /// Latest round trip of the relay's pings, in microseconds (0 before the first).
    rtt_us: AtomicU64,
}

impl TcpTunnel {
    pub fn new(mux: Mux, remote: SocketAddr) -> Self {
        Self {
            mux,
            remote,
            rtt_us: AtomicU64::new(0),
        }
    }

    pub fn set_rtt(&self, rtt: Duration) {
        self.rtt_us
            .store(u64::try_from(rtt.as_micros()).unwrap_or(u64::MAX), Ordering::Relaxed);
    }
}

/// A live tunnel to one worker.
#[derive(Debug, Clone)]
pub enum TunnelConn {
    Quic(quinn::Connection),
    Tcp(Arc<TcpTunnel>),
}

impl TunnelConn {
    /// Open a stream to the worker (a browser session).
    pub async fn open_bi(&self) -> Result<(SendHalf, RecvHalf), OpenError> {
        match self {
            TunnelConn::Quic(c) => {
                let (send, recv) = c.open_bi().await?;
                Ok((Box::new(send), Box::new(recv)))
            }
            TunnelConn::Tcp(t) => {
                let (recv, send) = tokio::io::split(t.mux.open().await?);
                Ok((Box::new(send), Box::new(recv)))
            }
        }
    }

    /// Smoothed round-trip time: QUIC's estimate, or the control pings' over TCP.
    pub fn rtt(&self) -> Duration {
        match self {
            TunnelConn::Quic(c) => c.rtt(),
            TunnelConn::Tcp(t) => Duration::from_micros(t.rtt_us.load(Ordering::Relaxed)),
        }
    }

    /// Close the tunnel; `code` and `reason` reach the worker over QUIC (TCP just closes).
    pub fn close(&self, code: u32, reason: &[u8]) {
        match self {
            TunnelConn::Quic(c) => c.close(quinn::VarInt::from_u32(code), reason),
            TunnelConn::Tcp(t) => t.mux.close(),
        }
    }

    pub fn transport(&self) -> Transport {
        match self {
            TunnelConn::Quic(_) => Transport::Quic,
            TunnelConn::Tcp(_) => Transport::Tcp,
        }
    }

    pub fn remote_address(&self) -> SocketAddr {
        match self {
            TunnelConn::Quic(c) => c.remote_address(),
            TunnelConn::Tcp(t) => t.remote,
        }
    }
}
