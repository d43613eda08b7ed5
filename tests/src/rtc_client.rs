//! A Rust WebRTC receiver for end-to-end tests and benchmarks.
//!
//! It plays the browser: recvonly video and audio transceivers, an offer, the answer from the
//! server. Every H.264 RTP packet it receives is depacketised into Annex B access units (one per
//! RTP marker bit) and decoded by FFmpeg on a plain thread, so the tests check *decoded pictures*,
//! not just packets. For each decoded picture it records the mean luma of the built-in avatar's
//! mouth area, and it decodes the Opus audio track and records each packet's loudness, so tests
//! can tell a talking avatar from an idle one by what a viewer would see and hear.

use bytes::Bytes;
use ffmpeg_next as ffmpeg;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tokio::sync::watch;
use webrtc::api::interceptor_registry::register_default_interceptors;
use webrtc::api::media_engine::MediaEngine;
use webrtc::api::setting_engine::SettingEngine;
use webrtc::api::APIBuilder;
use webrtc::interceptor::registry::Registry;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::rtp::codecs::h264::H264Packet;
use webrtc::rtp::packetizer::Depacketizer;
use webrtc::rtp_transceiver::rtp_codec::RTCRtpCodecCapability;
use webrtc::rtp_transceiver::rtp_codec::RTPCodecType;
use webrtc::rtp_transceiver::rtp_transceiver_direction::RTCRtpTransceiverDirection;
use webrtc::rtp_transceiver::RTCRtpTransceiverInit;
use webrtc::track::track_local::track_local_static_sample::TrackLocalStaticSample;

/// The sending side of [`RtcClient::with_microphone`]: 20 ms Opus packets at 48 kHz, paced in real
/// time, silence unless [`Microphone::speak`] queued audio.
pub struct Microphone {
    queue: Arc<Mutex<std::collections::VecDeque<f32>>>,
    /// (send time, RMS) of every packet sent.
    pub sent: Arc<Mutex<Vec<(Instant, f32)>>>,
    task: tokio::task::JoinHandle<()>,
}

impl Drop for Microphone {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl Microphone {
    /// Samples per packet (20 ms at 48 kHz).
    pub const PACKET: usize = 960;

    fn start(track: Arc<TrackLocalStaticSample>) -> anyhow::Result<Self> {
        let mut encoder = opus::Encoder::new(48_000, opus::Channels::Mono, opus::Application::Voip)?;
        let queue = Arc::new(Mutex::new(std::collections::VecDeque::<f32>::new()));
        let sent = Arc::new(Mutex::new(Vec::new()));
        let (q, log) = (Arc::clone(&queue), Arc::clone(&sent));
        let task = tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_millis(20));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            let mut frame = vec![0f32; Self::PACKET];
            let mut packet = vec![0u8; 1500];
            loop {
                tick.tick().await;
                {
                    let mut q = q.lock().expect("queue");
                    for s in frame.iter_mut() {
                        *s = q.pop_front().unwrap_or(0.0);
                    }
                }
                let Ok(n) = encoder.encode_float(&frame, &mut packet) else {
                    continue;
                };
                let rms = (frame.iter().map(|v| v * v).sum::<f32>() / frame.len() as f32).sqrt();
                log.lock().expect("sent").push((Instant::now(), rms));
                let sample = webrtc::media::Sample {
                    data: Bytes::copy_from_slice(&packet[..n]),
                    duration: Duration::from_millis(20),
                    ..Default::default()
                };
                let _ = track.write_sample(&sample).await;
            }
        });
        Ok(Self { queue, sent, task })
    }

    /// Queue `pcm` (48 kHz mono) to be sent after what is queued already.
    pub fn speak(&self, pcm: &[f32]) {
        self.queue.lock().expect("queue").extend(pcm.iter().copied());
    }

    /// When the first packet louder than `rms` was sent after `since`.
    pub fn onset_after(&self, since: Instant, rms: f32) -> Option<Instant> {
        self.sent
            .lock()
            .expect("sent")
            .iter()
            .find(|(at, level)| *at >= since && *level > rms)
            .map(|(at, _)| *at)
    }
}

/// What the receiver has seen so far.
#[derive(Debug, Clone, Default)]
pub struct ReceiverStats {
    pub access_units: u64,
    pub frames_decoded: u64,
    pub decode_errors: u64,
    pub width: u32,
    pub height: u32,
    pub first_frame_at: Option<Instant>,
    pub codec: String,
    /// (arrival, mean luma of the mouth area) per decoded picture.
    pub mouth: Vec<(Instant, f32)>,
    /// (arrival, RMS of the decoded samples) per Opus packet.
    pub audio: Vec<(Instant, f32)>,
    /// (arrival, [`seam`] of the lip-sync paste box) per decoded picture.
    pub seam: Vec<(Instant, f32)>,
    /// Whole luma planes (tightly packed) of the next `keep_pictures` decoded pictures.
    pub pictures: Vec<(Instant, Vec<u8>)>,
    pub keep_pictures: usize,
}

impl ReceiverStats {
    /// Mouth luma samples in [from, to).
    pub fn mouth_between(&self, from: Instant, to: Instant) -> Vec<f32> {
        self.mouth
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, v)| *v)
            .collect()
    }

    /// Seam samples in [from, to).
    pub fn seam_between(&self, from: Instant, to: Instant) -> Vec<f32> {
        self.seam
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, v)| *v)
            .collect()
    }

    /// Audio RMS samples in [from, to).
    pub fn audio_between(&self, from: Instant, to: Instant) -> Vec<f32> {
        self.audio
            .iter()
            .filter(|(t, _)| *t >= from && *t < to)
            .map(|(_, v)| *v)
            .collect()
    }
}

/// The box the worker pastes lip-synced faces into, for the built-in avatar at 512×512.
pub fn paste_box() -> avatar_worker::media::avatar::FaceBox {
    let face_box = avatar_worker::media::avatar::synthetic_face_box(512, 512);
    avatar_worker::talk::face::crop_region(face_box, 512, 512)
}

/// How much the paste box's border shows in a luma plane: along its left, right and bottom
/// edges (the top runs through hair, whose texture moves), the largest difference between the
/// pixel just outside and each of the four just inside, averaged. A pasted face that meets the
/// frame cleanly leaves this as it is on idle frames; a darker or lighter outline raises it.
pub fn seam(luma: &[u8], stride: usize, width: u32, height: u32) -> f32 {
    let b = paste_box();
    if b.x < 1 || b.x + b.w + 1 > width || b.y + b.h + 1 > height || b.w < 8 || b.h < 8 {
        return 0.0;
    }
    let at = |x: u32, y: u32| f32::from(luma[y as usize * stride + x as usize]);
    let (mut sum, mut n) = (0.0f32, 0u32);
    let mut edge = |outside: f32, inside: [f32; 4]| {
        sum += inside.iter().map(|v| (v - outside).abs()).fold(0.0, f32::max);
        n += 1;
    };
    let (x0, x1, y1) = (b.x, b.x + b.w - 1, b.y + b.h - 1);
    for y in b.y + 4..y1 - 4 {
        edge(at(x0 - 1, y), [at(x0, y), at(x0 + 1, y), at(x0 + 2, y), at(x0 + 3, y)]);
        edge(at(x1 + 1, y), [at(x1, y), at(x1 - 1, y), at(x1 - 2, y), at(x1 - 3, y)]);
    }
    for x in x0 + 4..x1 - 4 {
        edge(at(x, y1 + 1), [at(x, y1), at(x, y1 - 1), at(x, y1 - 2), at(x, y1 - 3)]);
    }
    sum / n.max(1) as f32
}

/// The mouth area of the built-in avatar at 512×512: (x0, x1, y0, y1).
pub fn mouth_region() -> (u32, u32, u32, u32) {
    let face_box = avatar_worker::media::avatar::synthetic_face_box(512, 512);
    let m = avatar_worker::talk::face::mouth_area(face_box, 512, 512);
    (m.x, m.x + m.w, m.y, m.y + m.h)
}

pub struct RtcClient {
    pub pc: Arc<RTCPeerConnection>,
    pub stats: Arc<Mutex<ReceiverStats>>,
    pub state: watch::Receiver<RTCPeerConnectionState>,
}

impl RtcClient {
    /// A receiver; `with_media = false` makes an offer with no media sections (the customer's bug).
    pub async fn new(with_media: bool) -> anyhow::Result<Self> {
        Self::with_ice(with_media, Vec::new(), false).await
    }

    /// A receiver using `ice_servers`; with `relay_only` it offers and uses relay candidates only
    /// (`iceTransportPolicy: "relay"`), so media must flow through the TURN server.
    pub async fn with_ice(
        with_media: bool,
        ice_servers: Vec<webrtc::ice_transport::ice_server::RTCIceServer>,
        relay_only: bool,
    ) -> anyhow::Result<Self> {
        Ok(Self::build(with_media, ice_servers, relay_only, false).await?.0)
    }

    /// A receiver that also sends a microphone, as a page with voice input does: its audio
    /// section is `sendrecv`, and the [`Microphone`] sends 20 ms Opus packets from the start
    /// (silence until told to speak), like a browser's microphone track.
    pub async fn with_microphone() -> anyhow::Result<(Self, Microphone)> {
        let (client, mic) = Self::build(true, Vec::new(), false, true).await?;
        let mic = mic.ok_or_else(|| anyhow::anyhow!("no microphone track"))?;
        Ok((client, mic))
    }

    async fn build(
        with_media: bool,
        ice_servers: Vec<webrtc::ice_transport::ice_server::RTCIceServer>,
        relay_only: bool,
        microphone: bool,
    ) -> anyhow::Result<(Self, Option<Microphone>)> {
        let _ = ffmpeg::init();
        let mut media = MediaEngine::default();
        media.register_default_codecs()?;
        let registry = register_default_interceptors(Registry::new(), &mut media)?;
        let mut se = SettingEngine::default();
        se.set_include_loopback_candidate(true);
        let api = APIBuilder::new()
            .with_media_engine(media)
            .with_interceptor_registry(registry)
            .with_setting_engine(se)
            .build();
        let config = RTCConfiguration {
            ice_servers,
            ice_transport_policy: if relay_only {
                webrtc::peer_connection::policy::ice_transport_policy::RTCIceTransportPolicy::Relay
            } else {
                Default::default()
            },
            ..Default::default()
        };
        let pc = Arc::new(api.new_peer_connection(config).await?);
        let mut mic = None;
        if microphone {
            let init = RTCRtpTransceiverInit {
                direction: RTCRtpTransceiverDirection::Recvonly,
                send_encodings: vec![],
            };
            pc.add_transceiver_from_kind(RTPCodecType::Video, Some(init)).await?;
            let track = Arc::new(TrackLocalStaticSample::new(
                RTCRtpCodecCapability {
                    mime_type: webrtc::api::media_engine::MIME_TYPE_OPUS.to_owned(),
                    clock_rate: 48_000,
                    channels: 2,
                    ..Default::default()
                },
                "mic".to_owned(),
                "browser".to_owned(),
            ));
            let sender = pc
                .add_track(Arc::clone(&track) as Arc<dyn webrtc::track::track_local::TrackLocal + Send + Sync>)
                .await?;
            tokio::spawn(async move { while sender.read_rtcp().await.is_ok() {} });
            mic = Some(Microphone::start(track)?);
        } else if with_media {
            for kind in [RTPCodecType::Video, RTPCodecType::Audio] {
                let init = RTCRtpTransceiverInit {
                    direction: RTCRtpTransceiverDirection::Recvonly,
                    send_encodings: vec![],
                };
                pc.add_transceiver_from_kind(kind, Some(init)).await?;
            }
        }
        let stats = Arc::new(Mutex::new(ReceiverStats::default()));
        let (tx, state) = watch::channel(RTCPeerConnectionState::New);
        pc.on_peer_connection_state_change(Box::new(move |s| {
            let _ = tx.send(s);
            Box::pin(async {})
        }));
        let track_stats = Arc::clone(&stats);
        pc.on_track(Box::new(move |track, _receiver, _transceiver| {
            let stats = Arc::clone(&track_stats);
            Box::pin(async move {
                if track.kind() == RTPCodecType::Audio {
                    tokio::spawn(async move {
                        let Ok(mut decoder) = opus::Decoder::new(48_000, opus::Channels::Mono) else {
                            return;
                        };
                        let mut pcm = vec![0f32; 5760];
                        while let Ok((packet, _)) = track.read_rtp().await {
                            if let Ok(n) = decoder.decode_float(&packet.payload, &mut pcm, false) {
                                let rms = (pcm[..n].iter().map(|v| v * v).sum::<f32>() / n.max(1) as f32).sqrt();
                                stats.lock().expect("stats").audio.push((Instant::now(), rms));
                            }
                        }
                    });
                    return;
                }
                let codec = track.codec().capability.mime_type.clone();
                stats.lock().expect("stats").codec = codec;
                let (au_tx, au_rx) = std::sync::mpsc::sync_channel::<Bytes>(64);
                let decoder_stats = Arc::clone(&stats);
                std::thread::spawn(move || decode_loop(au_rx, &decoder_stats));
                tokio::spawn(async move {
                    let mut depacketizer = H264Packet::default();
                    let mut au = Vec::new();
                    while let Ok((packet, _)) = track.read_rtp().await {
                        if let Ok(nals) = depacketizer.depacketize(&packet.payload) {
                            au.extend_from_slice(&nals);
                        }
                        if packet.header.marker && !au.is_empty() {
                            stats.lock().expect("stats").access_units += 1;
                            if au_tx.try_send(Bytes::from(std::mem::take(&mut au))).is_err() {
                                break;
                            }
                        }
                    }
                });
            })
        }));
        Ok((Self { pc, stats, state }, mic))
    }

    /// Create the offer and wait for ICE gathering, so the offer carries our candidates.
    pub async fn offer(&self) -> anyhow::Result<String> {
        let offer = self.pc.create_offer(None).await?;
        let mut gathered = self.pc.gathering_complete_promise().await;
        self.pc.set_local_description(offer).await?;
        let _ = tokio::time::timeout(Duration::from_secs(5), gathered.recv()).await;
        Ok(self
            .pc
            .local_description()
            .await
            .ok_or_else(|| anyhow::anyhow!("no local description"))?
            .sdp)
    }

    pub async fn accept_answer(&self, sdp: &str) -> anyhow::Result<()> {
        self.pc
            .set_remote_description(RTCSessionDescription::answer(sdp.to_owned())?)
            .await?;
        Ok(())
    }

    pub fn snapshot(&self) -> ReceiverStats {
        self.stats.lock().expect("stats").clone()
    }

    /// Wait until the peer connection reaches `Connected`.
    pub async fn connected(&self, timeout: Duration) -> anyhow::Result<()> {
        let mut state = self.state.clone();
        tokio::time::timeout(timeout, state.wait_for(|s| *s == RTCPeerConnectionState::Connected))
            .await
            .map_err(|_| anyhow::anyhow!("not connected within {timeout:?} (state {:?})", *self.state.borrow()))??;
        Ok(())
    }

    /// Wait until `n` frames were decoded or `timeout` passes; returns the stats either way.
    pub async fn wait_frames(&self, n: u64, timeout: Duration) -> ReceiverStats {
        let deadline = Instant::now() + timeout;
        loop {
            let s = self.snapshot();
            if s.frames_decoded >= n || Instant::now() >= deadline {
                return s;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Candidate types (`host`, `srflx`, `prflx`, `relay`) of the selected pair: (ours, theirs).
    pub async fn selected_pair(&self) -> Option<(String, String)> {
        let pair = self
            .pc
            .sctp()
            .transport()
            .ice_transport()
            .get_selected_candidate_pair()
            .await?;
        Some((pair.local.typ.to_string(), pair.remote.typ.to_string()))
    }

    pub async fn close(&self) {
        let _ = self.pc.close().await;
    }
}

fn decode_loop(rx: std::sync::mpsc::Receiver<Bytes>, stats: &Mutex<ReceiverStats>) {
    let Some(codec) = ffmpeg::decoder::find(ffmpeg::codec::Id::H264) else {
        return;
    };
    let Ok(mut decoder) = ffmpeg::codec::context::Context::new_with_codec(codec).decoder().video() else {
        return;
    };
    let mut frame = ffmpeg::frame::Video::empty();
    while let Ok(au) = rx.recv() {
        let packet = ffmpeg::Packet::copy(&au);
        if decoder.send_packet(&packet).is_err() {
            stats.lock().expect("stats").decode_errors += 1;
            continue;
        }
        while decoder.receive_frame(&mut frame).is_ok() {
            let (x0, x1, y0, y1) = mouth_region();
            let (stride, luma) = (frame.stride(0), frame.data(0));
            let mut sum = 0u64;
            if frame.width() >= x1 && frame.height() >= y1 {
                for y in y0..y1 {
                    for x in x0..x1 {
                        sum += luma[y as usize * stride + x as usize] as u64;
                    }
                }
            }
            let mouth = sum as f32 / ((x1 - x0) * (y1 - y0)).max(1) as f32;
            let border = seam(luma, stride, frame.width(), frame.height());
            let mut s = stats.lock().expect("stats");
            if s.keep_pictures > 0 {
                s.keep_pictures -= 1;
                let (w, h) = (frame.width() as usize, frame.height() as usize);
                let plane = (0..h)
                    .flat_map(|y| &luma[y * stride..y * stride + w])
                    .copied()
                    .collect();
                s.pictures.push((Instant::now(), plane));
            }
            s.mouth.push((Instant::now(), mouth));
            s.seam.push((Instant::now(), border));
            s.frames_decoded += 1;
            s.width = frame.width();
            s.height = frame.height();
            s.first_frame_at.get_or_insert_with(Instant::now);
        }
    }
}
