//! Tunnels over TLS/TCP arrive on the HTTPS port: after the TLS handshake, a connection whose
//! ALPN is [`TCP_ALPN`] leaves the HTTP server and goes to the tunnel listener.
//!
//! A GPU box that may only open HTTPS connections reaches the relay this way, with no extra port
//! or setting on the relay. The connection has already passed the HTTP listener's per-client and
//! total connection caps and its TLS handshake timeout, and it stays counted against them while
//! it lives. The keying material for the worker's proof is exported here, from the TLS session
//! the worker actually negotiated.

use avatar_proto::tunnel::{EXPORTER_LABEL, EXPORTER_LEN, TCP_ALPN};
use axum_server::accept::Accept;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;

/// A byte stream the tunnel can own.
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// A TLS connection that asked for the tunnel.
pub struct TcpAccepted {
    pub io: Box<dyn Io>,
    pub remote: SocketAddr,
    /// Keying material of this TLS session, for the proof ([`avatar_proto::tunnel::auth_proof`]).
    pub exporter: [u8; EXPORTER_LEN],
}

/// Wraps the HTTPS acceptor: HTTP connections pass through, tunnel connections are handed to
/// the tunnel listener (a full queue drops them, as a full accept backlog would).
#[derive(Clone)]
pub struct TunnelDivert<A> {
    inner: A,
    tunnels: mpsc::Sender<TcpAccepted>,
}

impl<A> TunnelDivert<A> {
    pub fn new(inner: A, tunnels: mpsc::Sender<TcpAccepted>) -> Self {
        Self { inner, tunnels }
    }
}

impl<A, S, X> Accept<TcpStream, S> for TunnelDivert<A>
where
    A: Accept<TcpStream, S, Stream = TlsStream<X>> + Clone + Send + 'static,
    A::Future: Send + 'static,
    A::Service: Send + 'static,
    X: AsyncRead + AsyncWrite + Send + Unpin + 'static,
    S: Send + 'static,
{
    type Stream = TlsStream<X>;
    type Service = A::Service;
    type Future = Pin<Box<dyn Future<Output = io::Result<(Self::Stream, Self::Service)>> + Send>>;

    fn accept(&self, stream: TcpStream, service: S) -> Self::Future {
        let remote = stream.peer_addr();
        let inner = self.inner.clone();
        let tunnels = self.tunnels.clone();
        Box::pin(async move {
            let (tls, service) = inner.accept(stream, service).await?;
            if tls.get_ref().1.alpn_protocol() != Some(TCP_ALPN) {
                return Ok((tls, service));
            }
            let remote = remote?;
            let exporter = tls
                .get_ref()
                .1
                .export_keying_material([0u8; EXPORTER_LEN], EXPORTER_LABEL, None)
                .map_err(io::Error::other)?;
            if tunnels
                .try_send(TcpAccepted {
                    io: Box::new(tls),
                    remote,
                    exporter,
                })
                .is_err()
            {
                metrics::counter!("relay_tunnel_handshakes_refused_total", "reason" => "queue").increment(1);
            }
            // Not an error of the client's: the connection is the tunnel's now.
            Err(io::Error::other("handed to the tunnel listener"))
        })
    }
}
