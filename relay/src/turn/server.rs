//! The TURN server's I/O around its state machine ([`super::core::Core`]): the listeners hand
//! every datagram or framed stream message to [`Server::handle`] with its [`FiveTuple`] and a
//! [`ClientTx`] to answer on, and this module carries out what the core decides: answers and
//! relayed data to clients, datagrams to peers from the relayed sockets it binds, one receive task
//! per relayed socket, and a once-a-second timer for expiries. Nothing here awaits while holding
//! the core, so one UDP receive loop serves many clients without queueing behind slow ones.

use super::core::{Core, Output, Ports};
pub use super::core::{FiveTuple, Stats, Transport, MAX_DATAGRAM};
use crate::config::EmbeddedTurnConfig;
use bytes::Bytes;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::net::UdpSocket;
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

/// Where answers and relayed data for a client go.
#[derive(Debug, Clone)]
pub enum ClientTx {
    /// The listening UDP socket the client's datagram arrived on.
    Udp(Arc<UdpSocket>),
    /// A TCP or TLS connection's writer task (bounded; full means congestion, and data is dropped).
    Stream(mpsc::Sender<Bytes>),
}

impl ClientTx {
    fn send(&self, to: SocketAddr, frame: Vec<u8>) {
        // A full socket buffer or queue drops the frame, as the network would.
        match self {
            ClientTx::Udp(socket) => {
                let _ = socket.try_send_to(&frame, to);
            }
            ClientTx::Stream(tx) => {
                let _ = tx.try_send(Bytes::from(frame));
            }
        }
    }
}

/// A relayed port's socket and the task receiving on it.
struct Relayed {
    socket: Arc<UdpSocket>,
    cancel: CancellationToken,
}

/// Binds the relayed sockets the core asks for.
struct Binder<'a> {
    cfg: &'a EmbeddedTurnConfig,
    bound: Vec<(u16, UdpSocket)>,
}

impl Ports for Binder<'_> {
    fn bind(&mut self, port: u16) -> bool {
        let addr = SocketAddr::new(self.cfg.relay_ip, port);
        match super::bind_udp(addr, self.cfg.socket_buffer_bytes, false).map(UdpSocket::from_std) {
            Ok(Ok(socket)) => {
                self.bound.push((port, socket));
                true
            }
            _ => false,
        }
    }
}

/// The embedded TURN server.
pub struct Server {
    core: Mutex<Core>,
    cfg: EmbeddedTurnConfig,
    /// Each allocation's client transport (relayed data goes there).
    clients: Mutex<HashMap<FiveTuple, ClientTx>>,
    relayed: Mutex<HashMap<u16, Relayed>>,
    shutdown: CancellationToken,
    pub stats: Arc<Stats>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding one of these would be a bug in this module; the state stays usable.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl Server {
    pub fn new(cfg: EmbeddedTurnConfig, secret: &str, own: &[IpAddr], shutdown: CancellationToken) -> Self {
        let span = u32::from(cfg.relay_port_max - cfg.relay_port_min) + 1;
        let core = Core::new(cfg.clone(), secret, own, rand::random::<u32>() % span, Instant::now());
        Self {
            stats: core.stats(),
            core: Mutex::new(core),
            cfg,
            clients: Mutex::new(HashMap::new()),
            relayed: Mutex::new(HashMap::new()),
            shutdown,
        }
    }

    pub fn config(&self) -> &EmbeddedTurnConfig {
        &self.cfg
    }

    /// Whether `five` holds an allocation.
    pub fn has_allocation(&self, five: &FiveTuple) -> bool {
        lock(&self.core).has_allocation(five)
    }

    /// Expire what is due (call about once a second).
    pub fn tick(self: &Arc<Self>) {
        let out = lock(&self.core).handle_timeout(Instant::now());
        self.execute(out, None, Vec::new());
    }

    /// Delete the allocation of `five`, if any (its connection closed).
    pub fn remove(self: &Arc<Self>, five: &FiveTuple) {
        let out = lock(&self.core).remove(five);
        self.execute(out.into_iter().collect(), None, Vec::new());
    }

    /// Handle one STUN message or ChannelData frame from a client.
    pub fn handle(self: &Arc<Self>, five: FiveTuple, tx: &ClientTx, data: &[u8]) {
        let mut binder = Binder {
            cfg: &self.cfg,
            bound: Vec::new(),
        };
        let out = lock(&self.core).handle(Instant::now(), crate::ice::unix_now(), five, data, &mut binder);
        let bound = binder.bound;
        self.execute(out, Some((five, tx)), bound);
    }

    fn from_peer(self: &Arc<Self>, port: u16, peer: SocketAddr, data: &[u8]) {
        let out = lock(&self.core).from_peer(Instant::now(), port, peer, data);
        self.execute(out.into_iter().collect(), None, Vec::new());
    }

    /// Carry out the core's decisions. `current`: the client whose message is being handled (its
    /// answers go back the way it came); `bound`: sockets bound for it by [`Binder`].
    fn execute(
        self: &Arc<Self>,
        out: Vec<Output>,
        current: Option<(FiveTuple, &ClientTx)>,
        mut bound: Vec<(u16, UdpSocket)>,
    ) {
        for o in out {
            match o {
                Output::ToClient { five, bytes } => match current {
                    Some((c, tx)) if c == five => tx.send(five.client, bytes),
                    _ => {
                        let tx = lock(&self.clients).get(&five).cloned();
                        if let Some(tx) = tx {
                            tx.send(five.client, bytes);
                        }
                    }
                },
                Output::ToPeer { port, peer, bytes } => {
                    let socket = lock(&self.relayed).get(&port).map(|r| Arc::clone(&r.socket));
                    // A full socket buffer drops the datagram, as the network would.
                    if let Some(socket) = socket {
                        let _ = socket.try_send_to(&bytes, peer);
                    }
                }
                Output::Opened { five, port } => {
                    let Some(i) = bound.iter().position(|(p, _)| *p == port) else {
                        continue;
                    };
                    let socket = Arc::new(bound.swap_remove(i).1);
                    let cancel = self.shutdown.child_token();
                    if let Some((_, tx)) = current {
                        lock(&self.clients).insert(five, tx.clone());
                    }
                    lock(&self.relayed).insert(
                        port,
                        Relayed {
                            socket: Arc::clone(&socket),
                            cancel: cancel.clone(),
                        },
                    );
                    tokio::spawn(receive(Arc::clone(self), port, socket, cancel));
                }
                Output::Closed { five, port } => {
                    if let Some(r) = lock(&self.relayed).remove(&port) {
                        r.cancel.cancel();
                    }
                    lock(&self.clients).remove(&five);
                }
            }
        }
    }
}

/// What peers send to a relayed port, into the core (and on to the client).
async fn receive(server: Arc<Server>, port: u16, socket: Arc<UdpSocket>, cancel: CancellationToken) {
    let mut buf = vec![0u8; MAX_DATAGRAM];
    loop {
        tokio::select! {
            _ = cancel.cancelled() => break,
            r = socket.recv_from(&mut buf) => match r {
                Ok((n, peer)) => server.from_peer(port, peer, &buf[..n]),
                // ICMP errors from earlier sends surface here on Linux; keep serving.
                Err(_) => tokio::task::yield_now().await,
            },
        }
    }
}
