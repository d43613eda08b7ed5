//! The relay ↔ worker tunnel protocol, carried over one connection that the worker dials: QUIC,
//! or TLS over TCP on the relay's HTTPS port ([`TCP_ALPN`]; there the handshake frames travel on
//! the TLS stream and yamux provides the streams after `Registered`).
//!
//! ```text
//!   worker                                   relay
//!     |--- QUIC handshake (ALPN avatar-edge/1, relay cert pinned) --->|
//!     |--- control stream (worker opens the first bidi stream) ------>|
//!     |  Hello {protocol, worker_id}                                  |
//!     |<------------------ Challenge {protocol, relay_id, nonce} -----|
//!     |  Auth {proof = HMAC-SHA256(secret, transcript)}              |
//!     |  Register {avatars, capacity, labels}                        |
//!     |<--------------------------------- Registered | Rejected -----|
//!     |<-------------------------------------- Ping / Pong ---------->|
//!     |                                                               |
//!     |<== one bidi stream per browser session (relay opens) ========|
//!     |  SessionOpen, then Client(..) messages relay→worker          |
//!     |  Event(..) messages worker→relay, Close either way          |
//!     |                                                               |
//!     |<== one bidi stream per session API call (relay opens) =======|
//!     |  Command(..) relay→worker, Reply(..) worker→relay            |
//! ```
//!
//! Every stream carries **frames**: a 4-byte big-endian length, then that many bytes of JSON. A
//! frame longer than [`MAX_FRAME_LEN`] is a protocol error (the reader stops before buffering
//! it). [`FrameDecoder`] is the incremental reader; [`encode_frame`] the writer. Neither does I/O.
//!
//! **Authentication** never puts anything replayable on the wire: the relay sends a fresh random
//! nonce per connection and the worker answers with an HMAC over the nonce, its id, and keying
//! material exported from this very TLS session ([`auth_proof`]). A recorded proof is useless on
//! another connection, and a man in the middle with a different TLS session cannot forward it.

use bytes::{Buf, BufMut, Bytes, BytesMut};
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use std::collections::BTreeMap;

use crate::signaling::{ClientMessage, Id, ServerEvent};

/// Bumped on any incompatible change; both sides send it and refuse a mismatch.
pub const PROTOCOL_VERSION: u32 = 1;
/// QUIC ALPN for the tunnel.
pub const ALPN: &[u8] = b"avatar-edge/1";
/// ALPN of the tunnel over TLS/TCP (the relay's HTTPS port serves it beside `http/1.1`). The
/// handshake frames travel on the TLS stream itself; after `Registered` both sides run a yamux
/// multiplexer over it, and every stream carries frames as on QUIC.
pub const TCP_ALPN: &[u8] = b"avatar-edge-tcp/1";
/// Largest frame payload either side accepts.
pub const MAX_FRAME_LEN: usize = 256 * 1024;
/// Label for the TLS keying-material exporter used in [`auth_proof`] (RFC 5705).
pub const EXPORTER_LABEL: &[u8] = b"EXPORTER-avatar-edge-tunnel-auth";
/// Length of the exported keying material.
pub const EXPORTER_LEN: usize = 32;
/// Length of the relay's challenge nonce in bytes.
pub const NONCE_LEN: usize = 32;
/// The tunnel secret of `relay --dev` and `worker --dev` (local development only: both refuse
/// nothing, but it is public).
pub const DEV_SECRET: &str = "avatar-edge-dev-secret-do-not-deploy";
/// Most sessions one worker may announce (`capacity`), and most avatars it may serve; the relay
/// refuses a registration above either.
pub const MAX_WORKER_CAPACITY: u32 = 10_000;
pub const MAX_WORKER_AVATARS: usize = 10_000;
/// The longest avatar display name a relay keeps (characters); longer ones are cut.
pub const MAX_AVATAR_NAME_LEN: usize = 128;
/// The largest avatar preview (a JPEG, before base64) a relay keeps; larger ones are dropped.
pub const MAX_AVATAR_PREVIEW_LEN: usize = 16 * 1024;
/// The most base64 a worker puts into its registration's previews (the frame carries at most
/// [`MAX_FRAME_LEN`]); avatars past it are announced without one.
pub const MAX_AVATAR_PREVIEWS_TOTAL: usize = 128 * 1024;

/// Session streams the relay may have open at once on one tunnel, for a worker of `capacity`:
/// every session one stream, plus room for streams that are closing while their replacements
/// open (quinn's default of 100 would cap a worker at 100 sessions whatever its capacity).
pub fn session_stream_limit(capacity: u32) -> u32 {
    capacity.saturating_add(capacity / 4).saturating_add(16)
}

/// Application close codes of the tunnel's QUIC connection. Either side may close with
/// [`SHUTDOWN`](close_code::SHUTDOWN); the others are the relay's.
pub mod close_code {
    /// A normal close: a side shutting down, or done.
    pub const SHUTDOWN: u32 = 0;
    /// The relay refused the worker (authentication, registration, handshake timeout).
    pub const REJECTED: u32 = 1;
    /// A newer connection of the same worker id took this one's place.
    pub const REPLACED: u32 = 2;
}

/// Messages on the control stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", rename_all = "snake_case")]
pub enum Control {
    /// worker → relay, first message.
    Hello {
        protocol: u32,
        worker_id: String,
        software: String,
    },
    /// relay → worker: prove you know the secret.
    Challenge {
        protocol: u32,
        relay_id: String,
        nonce: String,
    },
    /// worker → relay: hex HMAC, see [`auth_proof`].
    Auth {
        proof: String,
    },
    /// worker → relay: what this worker serves.
    Register(Registration),
    /// relay → worker: accepted; sessions may arrive now.
    Registered {
        relay_id: String,
        /// The relay takes [`Control::Load`] reports. Older relays omit it (and would take an
        /// unknown message as a broken stream), so a worker sends them only when this is set.
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        load_reports: bool,
    },
    /// relay → worker: refused; the relay closes the connection after this.
    Rejected {
        reason: String,
    },
    /// Either way; the peer answers with `Pong` carrying the same values.
    Ping {
        seq: u64,
        sent_ms: u64,
    },
    Pong {
        seq: u64,
        sent_ms: u64,
    },
    /// worker → relay: shutting down; send no new sessions.
    Draining {},
    /// worker → relay: the sessions it runs now, from **every** relay it is registered with.
    /// Sent after registration and whenever the number changes, so that each relay of a fleet
    /// routes on the worker's real load, not only on the sessions it sent there itself.
    Load {
        active: u32,
    },
    /// Any message type this build does not know (a newer peer's): ignored, not an error.
    #[serde(other)]
    Unknown,
}

/// What a worker announces when it registers.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// Avatar ids this worker can render. Empty means "any avatar id" (the built-in avatar).
    pub avatars: Vec<String>,
    /// Display names of `avatars`, by id (what a page's avatar chooser shows). Absent from older
    /// workers; the relay keeps at most [`MAX_AVATAR_NAME_LEN`] characters of each.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub avatar_names: BTreeMap<String, String>,
    /// A small JPEG of each of `avatars` (base64), what a page's avatar chooser shows. Absent from
    /// older workers; the relay keeps only JPEGs up to [`MAX_AVATAR_PREVIEW_LEN`] bytes.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub avatar_previews: BTreeMap<String, String>,
    /// Sessions it will run at once.
    pub capacity: u32,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    /// Random per worker process. A second tunnel from the same worker id **and** instance is the
    /// same process moving to another transport: the relay keeps the old tunnel until its
    /// sessions end instead of closing it as a stale ghost. Absent from older workers.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub instance: Option<String>,
}

/// First frame of every stream the **worker** opens on a TLS/TCP tunnel after registration
/// (on TCP the handshake runs on the TLS stream itself, before multiplexing starts).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "stream", rename_all = "snake_case")]
pub enum StreamHeader {
    /// The control stream (pings, draining); exactly one, opened first.
    Control,
    /// TURN for this worker's media: after this frame the stream carries TURN messages framed
    /// as on TURN over TCP (RFC 8656 §7.2, see [`turn_frame_len`]), fed to the relay's embedded
    /// TURN server as coming from this worker.
    Turn,
}

/// Length of the TURN message at the start of `b` as framed on a stream: a STUN message (20-byte
/// header plus its length) or a ChannelData message (4-byte header plus its length, padded to a
/// multiple of 4). `Ok(None)`: fewer than 4 bytes. `Err(())`: neither kind.
#[allow(clippy::result_unit_err)]
pub fn turn_frame_len(b: &[u8]) -> Result<Option<usize>, ()> {
    if b.len() < 4 {
        return Ok(None);
    }
    let len = usize::from(u16::from_be_bytes([b[2], b[3]]));
    match b[0] >> 6 {
        0 => Ok(Some(20 + len)),
        1 => Ok(Some(4 + len.div_ceil(4) * 4)),
        _ => Err(()),
    }
}

/// Messages on a per-session stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "t", content = "m", rename_all = "snake_case")]
pub enum SessionFrame {
    /// relay → worker, first frame of every session stream.
    Open(SessionOpen),
    /// relay → worker: a browser message for this session.
    Client(ClientMessage),
    /// worker → relay: an event for the browser.
    Event(ServerEvent),
    /// Either way: the session is over. The sender finishes its side of the stream after this.
    Close { reason: String },
    /// relay → worker, the only frame of a command stream (the session API, [`crate::api`]).
    Command(crate::api::Command),
    /// worker → relay: the answer on a command stream; the worker then finishes the stream.
    Reply(crate::api::Reply),
    /// worker → relay, only when the `Open` asked for them (`records`): a turn of the
    /// transcript, complete, for the relay's webhooks. Never forwarded to the browser.
    Record(crate::api::TranscriptTurn),
    /// worker → relay, only when the `Open` asked for records: the session's recording is
    /// complete (its `recording.ready` webhook). Sent after the session's last turn.
    Recording(RecordingReady),
}

/// A session's finished recording, on the worker that made it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RecordingReady {
    /// The file's path on the worker (`[recording] dir`).
    pub file: String,
    pub worker: String,
    pub duration_s: f64,
    pub bytes: u64,
    /// Lower-case hex.
    pub sha256: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SessionOpen {
    pub session_id: String,
    pub avatar_id: Option<String>,
    pub user_id: Option<Id>,
    /// STUN/TURN servers (with fresh credentials of its own) for the worker's peer, so its answer
    /// carries relay candidates. Empty when the relay hands out none.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub ice_servers: Vec<crate::signaling::IceServer>,
    /// The relay wants each finished turn as a [`SessionFrame::Record`] and the recording as a
    /// [`SessionFrame::Recording`] (it has webhooks).
    /// Absent (false) from older relays, which would not understand the frame.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub records: bool,
}

/// Errors reading or writing tunnel frames.
#[derive(Debug, thiserror::Error)]
pub enum FrameError {
    #[error("frame of {len} bytes exceeds the {max}-byte limit")]
    TooLarge { len: usize, max: usize },
    #[error("malformed frame payload: {0}")]
    Json(#[from] serde_json::Error),
    #[error("stream ended inside a frame ({buffered} bytes buffered)")]
    Truncated { buffered: usize },
}

/// Serialise `msg` as one length-prefixed frame.
pub fn encode_frame<T: Serialize>(msg: &T) -> Result<Bytes, FrameError> {
    let body = serde_json::to_vec(msg)?;
    if body.len() > MAX_FRAME_LEN {
        return Err(FrameError::TooLarge {
            len: body.len(),
            max: MAX_FRAME_LEN,
        });
    }
    let mut buf = BytesMut::with_capacity(4 + body.len());
    // The length fits in u32: it is at most MAX_FRAME_LEN.
    buf.put_u32(body.len() as u32);
    buf.extend_from_slice(&body);
    Ok(buf.freeze())
}

/// Incremental frame reader: feed bytes as they arrive, take whole frames out.
#[derive(Debug)]
pub struct FrameDecoder {
    buf: BytesMut,
    max: usize,
}

impl Default for FrameDecoder {
    fn default() -> Self {
        Self::new(MAX_FRAME_LEN)
    }
}

impl FrameDecoder {
    pub fn new(max: usize) -> Self {
        Self {
            buf: BytesMut::new(),
            max,
        }
    }

    /// Append received bytes.
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The bytes received past the last complete frame, taken out: for a stream that carries
    /// something other than frames after them (the session API's audio, [`crate::api`]).
    pub fn take_rest(&mut self) -> Bytes {
        self.buf.split().freeze()
    }

    /// The next complete frame payload, `Ok(None)` if more bytes are needed. An oversized length
    /// prefix is reported as soon as the prefix is seen, before its body is buffered.
    pub fn next_frame(&mut self) -> Result<Option<Bytes>, FrameError> {
        if self.buf.len() < 4 {
            return Ok(None);
        }
        let len = u32::from_be_bytes([self.buf[0], self.buf[1], self.buf[2], self.buf[3]]) as usize;
        if len > self.max {
            return Err(FrameError::TooLarge { len, max: self.max });
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        self.buf.advance(4);
        Ok(Some(self.buf.split_to(len).freeze()))
    }

    /// The next complete frame decoded as `T`.
    pub fn next_message<T: for<'de> Deserialize<'de>>(&mut self) -> Result<Option<T>, FrameError> {
        match self.next_frame()? {
            Some(frame) => Ok(Some(serde_json::from_slice(&frame)?)),
            None => Ok(None),
        }
    }

    /// Call at end of stream: an error if a partial frame is left.
    pub fn finish(&self) -> Result<(), FrameError> {
        if self.buf.is_empty() {
            Ok(())
        } else {
            Err(FrameError::Truncated {
                buffered: self.buf.len(),
            })
        }
    }
}

type HmacSha256 = Hmac<Sha256>;

fn auth_mac(secret: &[u8], nonce_hex: &str, worker_id: &str, exporter: &[u8]) -> HmacSha256 {
    // HMAC accepts keys of any length, so `new_from_slice` cannot fail.
    let mut mac = HmacSha256::new_from_slice(secret).unwrap_or_else(|_| unreachable!("HMAC takes any key length"));
    mac.update(b"avatar-edge tunnel auth v1\0");
    for part in [nonce_hex.as_bytes(), worker_id.as_bytes(), exporter] {
        mac.update(&(part.len() as u64).to_be_bytes());
        mac.update(part);
    }
    mac
}

/// The worker's proof of the shared secret, bound to the relay's nonce, the worker id and the TLS
/// session (exported keying material), hex encoded.
pub fn auth_proof(secret: &[u8], nonce_hex: &str, worker_id: &str, exporter: &[u8]) -> String {
    hex::encode(auth_mac(secret, nonce_hex, worker_id, exporter).finalize().into_bytes())
}

/// Check a proof in constant time.
pub fn verify_auth_proof(secret: &[u8], nonce_hex: &str, worker_id: &str, exporter: &[u8], proof_hex: &str) -> bool {
    let Ok(proof) = hex::decode(proof_hex) else {
        return false;
    };
    auth_mac(secret, nonce_hex, worker_id, exporter)
        .verify_slice(&proof)
        .is_ok()
}

/// Rules for a worker id: short, printable, no spaces (it appears in logs and metrics).
pub fn valid_worker_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 64 && id.bytes().all(|b| b.is_ascii_alphanumeric() || b"-_.:".contains(&b))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::signaling::{ErrorCode, Offer};

    fn round_trip<T: Serialize + for<'de> Deserialize<'de> + PartialEq + std::fmt::Debug>(msg: T) {
        let frame = encode_frame(&msg).expect("encode");
        let mut dec = FrameDecoder::default();
        // Byte by byte, to exercise partial reads.
        let mut out = None;
        for b in frame.iter() {
            dec.push(&[*b]);
            if let Some(m) = dec.next_message::<T>().expect("decode") {
                out = Some(m);
            }
        }
        assert_eq!(out.expect("one frame"), msg);
        dec.finish().expect("nothing left");
    }

    #[test]
    fn turn_frames_are_delimited_by_their_headers() {
        // STUN binding request header: type 0x0001, length 8.
        assert_eq!(turn_frame_len(&[0x00, 0x01, 0x00, 0x08]), Ok(Some(28)));
        // ChannelData 0x4000 with 5 bytes: padded to 12 on a stream.
        assert_eq!(turn_frame_len(&[0x40, 0x00, 0x00, 0x05]), Ok(Some(12)));
        assert_eq!(turn_frame_len(&[0x40, 0x00, 0x00]), Ok(None));
        assert_eq!(turn_frame_len(&[0xC0, 0, 0, 0]), Err(()));
        let header: StreamHeader = serde_json::from_str(r#"{"stream":"turn"}"#).expect("header");
        assert_eq!(header, StreamHeader::Turn);
    }

    #[test]
    fn every_control_message_round_trips() {
        round_trip(Control::Hello {
            protocol: 1,
            worker_id: "gpu-1".into(),
            software: "x".into(),
        });
        round_trip(Control::Challenge {
            protocol: 1,
            relay_id: "r".into(),
            nonce: "00ff".into(),
        });
        round_trip(Control::Auth { proof: "ab".into() });
        round_trip(Control::Register(Registration {
            avatars: vec!["a".into()],
            avatar_names: BTreeMap::from([("a".into(), "Ms A".into())]),
            avatar_previews: BTreeMap::new(),
            capacity: 4,
            labels: BTreeMap::from([("zone".into(), "eu".into())]),
            instance: Some("9f3a".into()),
        }));
        // A registration from a worker that predates `instance` still parses.
        let old: Control = serde_json::from_str(r#"{"t":"register","avatars":[],"capacity":1}"#).expect("old register");
        assert!(matches!(old, Control::Register(Registration { instance: None, .. })));
        round_trip(Control::Registered {
            relay_id: "r".into(),
            load_reports: true,
        });
        // A relay that predates load reports says nothing of them: the worker sends none.
        let old: Control = serde_json::from_str(r#"{"t":"registered","relay_id":"r"}"#).expect("old registered");
        assert!(matches!(
            old,
            Control::Registered {
                load_reports: false,
                ..
            }
        ));
        round_trip(Control::Rejected { reason: "no".into() });
        round_trip(Control::Ping { seq: 1, sent_ms: 2 });
        round_trip(Control::Pong { seq: 1, sent_ms: 2 });
        round_trip(Control::Draining {});
        round_trip(Control::Load { active: 3 });
        // A message type from a newer peer is read as `Unknown`, which both sides ignore.
        let newer: Control = serde_json::from_str(r#"{"t":"from_the_future","x":1}"#).expect("unknown type");
        assert_eq!(newer, Control::Unknown);
    }

    #[test]
    fn every_session_frame_round_trips() {
        round_trip(SessionFrame::Open(SessionOpen {
            session_id: "s".into(),
            avatar_id: Some("a".into()),
            user_id: Some(Id::Int(5)),
            ice_servers: vec![crate::signaling::IceServer {
                urls: vec!["turn:203.0.113.1:3478".into()],
                username: Some("1700000000:worker:w".into()),
                credential: Some("c2VjcmV0".into()),
            }],
            records: true,
        }));
        round_trip(SessionFrame::Recording(RecordingReady {
            file: "/var/lib/avatar-edge/recordings/s-1800000000.mp4".into(),
            worker: "gpu-1".into(),
            duration_s: 61.25,
            bytes: 1_234_567,
            sha256: "ab".repeat(32),
        }));
        round_trip(SessionFrame::Client(ClientMessage::WebrtcOffer(Offer {
            session_id: None,
            user_id: None,
            avatar_id: None,
            sdp: "v=0".into(),
        })));
        round_trip(SessionFrame::Event(ServerEvent::error(ErrorCode::Busy, "full")));
        round_trip(SessionFrame::Close { reason: "bye".into() });
    }

    #[test]
    fn several_frames_in_one_read() {
        let mut bytes = BytesMut::new();
        for seq in 0..3 {
            bytes.extend_from_slice(&encode_frame(&Control::Ping { seq, sent_ms: 0 }).expect("encode"));
        }
        let mut dec = FrameDecoder::default();
        dec.push(&bytes);
        for seq in 0..3 {
            assert_eq!(
                dec.next_message::<Control>().expect("ok"),
                Some(Control::Ping { seq, sent_ms: 0 })
            );
        }
        assert_eq!(dec.next_message::<Control>().expect("ok"), None);
    }

    #[test]
    fn oversized_length_prefix_is_refused_before_buffering() {
        let mut dec = FrameDecoder::new(1024);
        dec.push(&(1025u32).to_be_bytes());
        assert!(matches!(
            dec.next_frame(),
            Err(FrameError::TooLarge { len: 1025, max: 1024 })
        ));
        let mut dec = FrameDecoder::default();
        dec.push(&u32::MAX.to_be_bytes());
        assert!(matches!(dec.next_frame(), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn oversized_message_cannot_be_encoded() {
        let big = SessionFrame::Close {
            reason: "x".repeat(MAX_FRAME_LEN),
        };
        assert!(matches!(encode_frame(&big), Err(FrameError::TooLarge { .. })));
    }

    #[test]
    fn malformed_payloads_are_errors() {
        for payload in [
            &b"not json"[..],
            b"{}",
            // A known type with its fields missing (an unknown type is `Control::Unknown`).
            br#"{"t":"hello"}"#,
            b"\xff\xfe",
        ] {
            let mut dec = FrameDecoder::default();
            dec.push(&(payload.len() as u32).to_be_bytes());
            dec.push(payload);
            assert!(dec.next_message::<Control>().is_err(), "{payload:?}");
        }
    }

    #[test]
    fn truncated_stream_is_reported() {
        let frame = encode_frame(&Control::Draining {}).expect("encode");
        let mut dec = FrameDecoder::default();
        dec.push(&frame[..frame.len() - 1]);
        assert!(dec.next_frame().expect("ok").is_none());
        assert!(matches!(dec.finish(), Err(FrameError::Truncated { .. })));
    }

    #[test]
    fn auth_proof_binds_secret_nonce_worker_and_tls_session() {
        let p = auth_proof(b"secret", "n1", "w1", b"tls1");
        assert!(verify_auth_proof(b"secret", "n1", "w1", b"tls1", &p));
        assert!(!verify_auth_proof(b"wrong", "n1", "w1", b"tls1", &p));
        assert!(
            !verify_auth_proof(b"secret", "n2", "w1", b"tls1", &p),
            "replay under a new nonce"
        );
        assert!(!verify_auth_proof(b"secret", "n1", "w2", b"tls1", &p));
        assert!(
            !verify_auth_proof(b"secret", "n1", "w1", b"tls2", &p),
            "forwarded into another TLS session"
        );
        assert!(!verify_auth_proof(b"secret", "n1", "w1", b"tls1", "zz"));
        assert!(!verify_auth_proof(b"secret", "n1", "w1", b"tls1", ""));
        // Length-prefixing keeps field boundaries: ("n1w", "1") differs from ("n1", "w1").
        assert_ne!(auth_proof(b"s", "n1w", "1", b""), auth_proof(b"s", "n1", "w1", b""));
    }

    #[test]
    fn worker_id_rules() {
        assert!(valid_worker_id("gpu-box_1.eu:a"));
        for bad in ["", "has space", "日本", &"x".repeat(65)] {
            assert!(!valid_worker_id(bad), "{bad}");
        }
    }
}
