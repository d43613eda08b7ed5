//! TURN through the tunnel, for a worker whose network blocks UDP.
//!
//! The ICE agent (webrtc-rs) speaks TURN over UDP only. On a TLS/TCP tunnel (and on QUIC with
//! `tunnel.turn_via_quic`, for a network that lets UDP out only to the tunnel port) the worker
//! therefore gives each session's agent a TURN server on loopback: this gateway. Every local client (one
//! UDP source address, i.e. one session's TURN client) gets its own tunnel stream, opened with
//! [`StreamHeader::Turn`]; the relay feeds that stream to its embedded TURN server as a TCP
//! client. Datagrams become stream frames (ChannelData padded to 4 bytes, RFC 8656 §12.5) and
//! frames become datagrams again (padding cut). The relayed address the agent gets is on the
//! relay, so browsers reach the worker's media there, by UDP or by TURN over TCP/TLS of their own.
//!
//! On QUIC these are streams too, not QUIC datagrams: a datagram must fit one packet, and a
//! 1,200-byte RTP packet in TURN framing does not fit QUIC's datagram size before path MTU
//! discovery raises it; a stream carries any size, and each session has its own, so a loss delays
//! only that session.

use avatar_proto::mux::Mux;
use avatar_proto::stream::send_frame;
use avatar_proto::tunnel::{turn_frame_len, StreamHeader};
use bytes::{Bytes, BytesMut};
use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

/// Datagrams waiting for one client's stream; more are dropped, as a full socket would.
const CLIENT_QUEUE: usize = 256;

/// A loopback TURN server address whose traffic rides one tunnel. Stops when dropped.
#[derive(Debug)]
pub struct TurnGateway {
    addr: SocketAddr,
    stop: CancellationToken,
}

/// How the gateway opens tunnel streams.
#[derive(Debug, Clone)]
pub enum Opener {
    Mux(Mux),
    Quic(quinn::Connection),
}

/// A stream the gateway can own.
trait Io: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Io for T {}

impl Opener {
    async fn open(&self) -> Result<Box<dyn Io>, String> {
        match self {
            Opener::Mux(mux) => Ok(Box::new(mux.open().await.map_err(|e| e.to_string())?)),
            Opener::Quic(conn) => {
                let (send, recv) = conn.open_bi().await.map_err(|e| e.to_string())?;
                Ok(Box::new(tokio::io::join(recv, send)))
            }
        }
    }

    /// Resolves when the tunnel has ended.
    async fn closed(&self) {
        match self {
            Opener::Mux(mux) => mux.closed().await,
            Opener::Quic(conn) => {
                conn.closed().await;
            }
        }
    }
}

impl TurnGateway {
    /// Bind on loopback and serve until the tunnel closes or the gateway is dropped.
    pub async fn start(opener: Opener) -> std::io::Result<Self> {
        let socket = Arc::new(UdpSocket::bind(("127.0.0.1", 0)).await?);
        let addr = socket.local_addr()?;
        let stop = CancellationToken::new();
        tokio::spawn(run(socket, opener, stop.clone()));
        Ok(Self { addr, stop })
    }

    /// The address to give the ICE agent as its TURN server.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }
}

impl Drop for TurnGateway {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

async fn run(socket: Arc<UdpSocket>, opener: Opener, stop: CancellationToken) {
    let mut clients: HashMap<SocketAddr, mpsc::Sender<Bytes>> = HashMap::new();
    let (gone_tx, mut gone_rx) = mpsc::unbounded_channel::<SocketAddr>();
    let mut buf = vec![0u8; 65_536];
    loop {
        tokio::select! {
            _ = stop.cancelled() => break,
            _ = opener.closed() => break,
            Some(addr) = gone_rx.recv() => {
                clients.remove(&addr);
            }
            received = socket.recv_from(&mut buf) => {
                let (n, from) = match received {
                    Ok(r) => r,
                    Err(e) => {
                        // ICMP errors surface here on some systems; the socket itself is fine.
                        debug!(error = %e, "TURN gateway receive");
                        continue;
                    }
                };
                // Only this machine's ICE agents: the socket is on loopback, but say it here.
                if !from.ip().is_loopback() {
                    continue;
                }
                let tx = clients.entry(from).or_insert_with(|| {
                    spawn_client(from, Arc::clone(&socket), opener.clone(), gone_tx.clone(), stop.clone())
                });
                let _ = tx.try_send(to_stream_frame(&buf[..n]));
            }
        }
    }
}

/// One local TURN client: a tunnel stream, written from a queue, read back into datagrams.
fn spawn_client(
    local: SocketAddr,
    socket: Arc<UdpSocket>,
    opener: Opener,
    gone: mpsc::UnboundedSender<SocketAddr>,
    stop: CancellationToken,
) -> mpsc::Sender<Bytes> {
    let (tx, mut rx) = mpsc::channel::<Bytes>(CLIENT_QUEUE);
    tokio::spawn(async move {
        let stream = match opener.open().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "cannot open a TURN stream through the tunnel");
                let _ = gone.send(local);
                return;
            }
        };
        let (mut rd, mut wr) = tokio::io::split(stream);
        let writer = async {
            send_frame(&mut wr, &StreamHeader::Turn).await.ok()?;
            while let Some(frame) = rx.recv().await {
                wr.write_all(&frame).await.ok()?;
            }
            Some(())
        };
        let reader = async {
            let mut buf = BytesMut::with_capacity(8192);
            loop {
                while let Ok(Some(n)) = turn_frame_len(&buf) {
                    if buf.len() < n {
                        break;
                    }
                    let frame = buf.split_to(n);
                    let _ = socket.send_to(&frame[..datagram_len(&frame)], local).await;
                }
                if turn_frame_len(&buf).is_err() {
                    warn!("the relay sent bytes that are not TURN on a TURN stream");
                    return;
                }
                match rd.read_buf(&mut buf).await {
                    Ok(n) if n > 0 => {}
                    _ => return,
                }
            }
        };
        tokio::select! {
            _ = stop.cancelled() => {}
            _ = writer => {}
            _ = reader => {}
        }
        let _ = gone.send(local);
    });
    tx
}

/// A datagram as a stream frame: ChannelData is padded to a multiple of 4 bytes on streams.
fn to_stream_frame(datagram: &[u8]) -> Bytes {
    let mut frame = datagram.to_vec();
    if datagram.first().is_some_and(|b| b >> 6 == 1) {
        frame.resize(datagram.len().next_multiple_of(4), 0);
    }
    Bytes::from(frame)
}

/// The datagram inside a stream frame: ChannelData without its padding.
fn datagram_len(frame: &[u8]) -> usize {
    if frame.len() >= 4 && frame[0] >> 6 == 1 {
        (4 + usize::from(u16::from_be_bytes([frame[2], frame[3]]))).min(frame.len())
    } else {
        frame.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn channel_data_is_padded_on_the_stream_and_unpadded_back() {
        let datagram = [0x40, 0x00, 0x00, 0x05, 1, 2, 3, 4, 5];
        let frame = to_stream_frame(&datagram);
        assert_eq!(frame.len(), 12);
        assert_eq!(turn_frame_len(&frame), Ok(Some(12)));
        assert_eq!(&frame[..datagram_len(&frame)], &datagram);
        // STUN messages are a multiple of 4 already and pass unchanged.
        let stun = [
            0x00, 0x01, 0x00, 0x00, 0x21, 0x12, 0xa4, 0x42, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0,
        ];
        assert_eq!(&to_stream_frame(&stun)[..], &stun);
        assert_eq!(datagram_len(&stun), 20);
    }
}
