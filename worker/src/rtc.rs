//! The WebRTC layer, kept behind a small interface ([`RtcEngine::answer`], [`Peer`]) so that a
//! later move to another WebRTC stack stays inside this file.
//!
//! Answers are **non-trickle**: we wait for ICE gathering to complete before returning the answer,
//! so every server candidate is inside the SDP. The customer's page reads no server candidates,
//! and this costs only milliseconds with host candidates. Browser candidates may still trickle in
//! through [`Peer::add_candidate`].
//!
//! Each peer sends one H.264 video track and, when the offer has an audio section, one Opus audio
//! track (the avatar's voice; silence while idle). When that section is `sendrecv`, the browser's
//! microphone comes back on it and is decoded for voice input ([`Answer::mic`]). RTCP from the senders is read continuously —
//! that keeps the interceptors (reports) running — and a PLI or FIR sets the `keyframe`
//! flag that the video clock consumes to emit an IDR.
//!
//! Video is written packet by packet ([`Peer::write_video_packet`]), so that the sender can pace
//! it ([`crate::media::send`]). Each video packet carries `abs-send-time`, and the answer offers
//! `goog-remb` and no transport-wide congestion control: the browser (or aiortc) then estimates
//! the path's capacity from the packets' delays and reports it in REMB messages, which come back
//! as [`Feedback::Remb`], with the loss in each receiver report as [`Feedback::Loss`]. Lost
//! video packets the viewer reports (NACK) come back as [`Feedback::Nack`]: the sender, not an
//! interceptor, sends them again, through its pacer ([`crate::media::send`]).
//!
//! Where the worker sends packets is the browser's choice only within [`CandidateFilter`]: ICE
//! sends checks to every remote candidate, so candidates aimed at special-purpose addresses are
//! dropped, and so are mDNS names (`<uuid>.local`). The ICE agent's mDNS is off
//! ([`setting_engine`]): left on (webrtc-ice's default, `QueryOnly`) it resolves such a name on
//! the worker's own network, and a name answered with a LAN address took checks there that the
//! same address written as a literal could not (issue 26, N5).

use avatar_proto::signaling::{CandidateInit, IceServer};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};
use tokio::sync::mpsc;
use webrtc::api::interceptor_registry::configure_rtcp_reports;
use webrtc::api::media_engine::{MediaEngine, MIME_TYPE_H264, MIME_TYPE_OPUS};
use webrtc::api::setting_engine::SettingEngine;
use webrtc::api::{APIBuilder, API};
use webrtc::ice::mdns::MulticastDnsMode;
use webrtc::ice_transport::ice_candidate::RTCIceCandidateInit;
use webrtc::ice_transport::ice_server::RTCIceServer;
use webrtc::interceptor::registry::Registry;
use webrtc::peer_connection::configuration::RTCConfiguration;
use webrtc::peer_connection::peer_connection_state::RTCPeerConnectionState;
use webrtc::peer_connection::sdp::session_description::RTCSessionDescription;
use webrtc::peer_connection::RTCPeerConnection;
use webrtc::rtcp::payload_feedbacks::full_intra_request::FullIntraRequest;
use webrtc::rtcp::payload_feedbacks::picture_loss_indication::PictureLossIndication;
use webrtc::rtcp::payload_feedbacks::receiver_estimated_maximum_bitrate::ReceiverEstimatedMaximumBitrate;
use webrtc::rtcp::receiver_report::ReceiverReport;
use webrtc::rtcp::sender_report::SenderReport;
use webrtc::rtcp::transport_feedbacks::transport_layer_nack::TransportLayerNack;
use webrtc::rtp_transceiver::rtp_codec::RTCRtpCodecCapability;
use webrtc::rtp_transceiver::rtp_codec::RTPCodecType;
use webrtc::track::track_local::track_local_static_rtp::TrackLocalStaticRTP;
use webrtc::track::track_local::track_local_static_sample::TrackLocalStaticSample;
use webrtc::track::track_local::TrackLocal;
use webrtc::track::track_remote::TrackRemote;

/// H.264 Constrained Baseline level 3.1, packetization mode 1: what every browser decodes.
pub const H264_FMTP: &str = "level-asymmetry-allowed=1;packetization-mode=1;profile-level-id=42e01f";

#[derive(Debug, thiserror::Error)]
pub enum RtcError {
    /// The offer could not be applied: report to the browser as `bad_sdp`.
    #[error("the offer was rejected: {0}")]
    BadOffer(webrtc::Error),
    #[error("the candidate was rejected: {0}")]
    BadCandidate(webrtc::Error),
    #[error("WebRTC: {0}")]
    Internal(#[from] webrtc::Error),
    #[error("ICE gathering did not complete in time")]
    GatheringTimeout,
}

/// ICE settings for every peer of this worker.
#[derive(Debug, Clone, Default)]
pub struct RtcSettings {
    pub include_loopback: bool,
    /// NAT 1:1: the public addresses to announce instead of the host's own (host candidates).
    pub public_ips: Vec<String>,
    /// Local UDP ports for ICE, inclusive (both or neither).
    pub udp_ports: Option<(u16, u16)>,
}

/// Register only what the worker sends: H.264 with packetization mode 1 (Constrained Baseline
/// `42e01f` and Baseline `42001f`, both of which browsers offer) and Opus. The library's defaults
/// would also put VP8, VP9, AV1, G.722, PCMU and PCMA in the answer, which the worker never sends.
fn register_codecs(media: &mut MediaEngine) -> Result<(), webrtc::Error> {
    use webrtc::rtp_transceiver::rtp_codec::{RTCRtpCodecCapability, RTCRtpCodecParameters};
    use webrtc::rtp_transceiver::RTCPFeedback;
    let feedback = |typ: &str, parameter: &str| RTCPFeedback {
        typ: typ.to_owned(),
        parameter: parameter.to_owned(),
    };
    let video_feedback = vec![
        feedback("goog-remb", ""),
        feedback("ccm", "fir"),
        feedback("nack", ""),
        feedback("nack", "pli"),
    ];
    media.register_codec(
        RTCRtpCodecParameters {
            capability: RTCRtpCodecCapability {
                mime_type: MIME_TYPE_OPUS.to_owned(),
                clock_rate: 48000,
                channels: 2,
                sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
                rtcp_feedback: vec![],
            },
            payload_type: 111,
            ..Default::default()
        },
        RTPCodecType::Audio,
    )?;
    // The receiver's delay-based estimate (REMB) needs each packet's send time.
    media.register_header_extension(
        webrtc::rtp_transceiver::rtp_codec::RTCRtpHeaderExtensionCapability {
            uri: webrtc::sdp::extmap::ABS_SEND_TIME_URI.to_owned(),
        },
        RTPCodecType::Video,
        None,
    )?;
    for (payload_type, profile) in [(102, "42001f"), (125, "42e01f")] {
        media.register_codec(
            RTCRtpCodecParameters {
                capability: RTCRtpCodecCapability {
                    mime_type: MIME_TYPE_H264.to_owned(),
                    clock_rate: 90000,
                    channels: 0,
                    sdp_fmtp_line: format!("level-asymmetry-allowed=1;packetization-mode=1;profile-level-id={profile}"),
                    rtcp_feedback: video_feedback.clone(),
                },
                payload_type,
                ..Default::default()
            },
            RTPCodecType::Video,
        )?;
    }
    Ok(())
}

/// Builds peers. One per worker process.
pub struct RtcEngine {
    api: API,
}

/// The ICE settings of every peer. mDNS is off: the agent neither resolves remote `.local`
/// names (a browser could name any host on the worker's LAN that way, past the candidate
/// filter) nor announces its own host candidates as `.local` names (the browser could not
/// resolve them across the internet anyway).
fn setting_engine(settings: &RtcSettings, mdns: MulticastDnsMode) -> Result<SettingEngine, RtcError> {
    let mut se = SettingEngine::default();
    se.set_ice_multicast_dns_mode(mdns);
    se.set_include_loopback_candidate(settings.include_loopback);
    if !settings.public_ips.is_empty() {
        se.set_nat_1to1_ips(
            settings.public_ips.clone(),
            webrtc::ice_transport::ice_candidate_type::RTCIceCandidateType::Host,
        );
    }
    if let Some((min, max)) = settings.udp_ports {
        let ports = webrtc::ice::udp_network::EphemeralUDP::new(min, max)
            .map_err(|e| RtcError::Internal(webrtc::Error::Ice(e)))?;
        se.set_udp_network(webrtc::ice::udp_network::UDPNetwork::Ephemeral(ports));
    }
    // Notice a vanished browser within seconds (3 s disconnected + 5 s failed), not the
    // default half-minute: its capacity slot goes back to the pool sooner.
    se.set_ice_timeouts(
        Some(Duration::from_secs(3)),
        Some(Duration::from_secs(5)),
        Some(Duration::from_secs(2)),
    );
    Ok(se)
}

impl RtcEngine {
    pub fn new(settings: &RtcSettings) -> Result<Self, RtcError> {
        Self::with_mdns(settings, MulticastDnsMode::Disabled)
    }

    /// The engine with mDNS in `mdns` mode: [`MulticastDnsMode::Disabled`] in the worker; the
    /// tests build the library's default too, to show what it would do.
    fn with_mdns(settings: &RtcSettings, mdns: MulticastDnsMode) -> Result<Self, RtcError> {
        let mut media = MediaEngine::default();
        register_codecs(&mut media)?;
        // RTCP reports only. Not webrtc-rs's NACK responder: it would send every reported packet
        // again at once, past the pacer (the sender does it, paced). Not its transport-wide CC
        // receiver: offered in the answer, it would switch the browser from REMB to feedback
        // that nothing here reads. NACK and PLI are still offered ([`register_codecs`]).
        let registry = configure_rtcp_reports(Registry::new());
        let se = setting_engine(settings, mdns)?;
        let api = APIBuilder::new()
            .with_media_engine(media)
            .with_interceptor_registry(registry)
            .with_setting_engine(se)
            .build();
        Ok(Self { api })
    }

    /// Answer `offer_sdp` with all our candidates inside: host, server-reflexive and (with a TURN
    /// server in `ice_servers`) relay candidates.
    pub async fn answer(&self, offer_sdp: String, ice_servers: &[IceServer]) -> Result<Answer, RtcError> {
        let config = RTCConfiguration {
            ice_servers: ice_servers
                .iter()
                .map(|s| RTCIceServer {
                    urls: s.urls.iter().filter(|u| udp_url(u)).cloned().collect(),
                    username: s.username.clone().unwrap_or_default(),
                    credential: s.credential.clone().unwrap_or_default(),
                })
                .filter(|s| !s.urls.is_empty())
                .collect(),
            ..Default::default()
        };
        let pc = Arc::new(self.api.new_peer_connection(config).await?);
        match self.negotiate(&pc, offer_sdp).await {
            Ok(answer) => Ok(answer),
            Err(e) => {
                let _ = pc.close().await;
                Err(e)
            }
        }
    }

    async fn negotiate(&self, pc: &Arc<RTCPeerConnection>, offer_sdp: String) -> Result<Answer, RtcError> {
        let (state_tx, states) = mpsc::channel(16);
        pc.on_peer_connection_state_change(Box::new(move |s| {
            let tx = state_tx.clone();
            Box::pin(async move {
                let _ = tx.send(PeerState::from(s)).await;
            })
        }));
        let video = Arc::new(TrackLocalStaticRTP::new(
            RTCRtpCodecCapability {
                mime_type: MIME_TYPE_H264.to_owned(),
                clock_rate: 90_000,
                channels: 0,
                sdp_fmtp_line: H264_FMTP.to_owned(),
                rtcp_feedback: vec![],
            },
            "video".to_owned(),
            "avatar".to_owned(),
        ));
        let sender = pc
            .add_track(Arc::clone(&video) as Arc<dyn TrackLocal + Send + Sync>)
            .await?;
        let video_ssrc = sender.get_parameters().await.encodings.first().map(|e| e.ssrc);
        // Audio only if the browser asked for it: a track the offer has no section for would
        // get a transceiver that no answer can negotiate.
        let wants_audio = avatar_proto::sdp::inspect_offer(&offer_sdp).is_ok_and(|o| o.audio_sections > 0);
        let audio = if wants_audio {
            let audio = Arc::new(TrackLocalStaticSample::new(
                RTCRtpCodecCapability {
                    mime_type: MIME_TYPE_OPUS.to_owned(),
                    clock_rate: 48_000,
                    channels: 2,
                    sdp_fmtp_line: "minptime=10;useinbandfec=1".to_owned(),
                    rtcp_feedback: vec![],
                },
                "audio".to_owned(),
                "avatar".to_owned(),
            ));
            let sender = pc
                .add_track(Arc::clone(&audio) as Arc<dyn TrackLocal + Send + Sync>)
                .await?;
            tokio::spawn(async move { while sender.read_rtcp().await.is_ok() {} });
            Some(audio)
        } else {
            None
        };
        // A page with voice input sends its microphone in the same connection (audio sendrecv).
        // The sender goes to the first audio track's reader, so the channel closes with that track.
        let (mic_tx, mic) = mpsc::channel(MIC_QUEUE);
        let mic_tx = std::sync::Mutex::new(Some(mic_tx));
        pc.on_track(Box::new(move |track, _, _| {
            if track.kind() == RTPCodecType::Audio {
                if let Some(tx) = mic_tx.lock().ok().and_then(|mut t| t.take()) {
                    tokio::spawn(read_microphone(track, tx));
                }
            }
            Box::pin(async {})
        }));
        let keyframe = Arc::new(AtomicBool::new(true));
        let (feedback_tx, feedback) = mpsc::channel(FEEDBACK_QUEUE);
        {
            let keyframe = Arc::clone(&keyframe);
            // Ends when the sender closes with the peer connection.
            tokio::spawn(async move {
                while let Ok((packets, _)) = sender.read_rtcp().await {
                    for p in packets {
                        let any = p.as_any();
                        if any.is::<PictureLossIndication>() || any.is::<FullIntraRequest>() {
                            keyframe.store(true, Ordering::Release);
                        }
                        for f in read_feedback(any, video_ssrc) {
                            // A full queue means the sender is gone or far behind: newer
                            // feedback replaces what it would have said.
                            let _ = feedback_tx.try_send(f);
                        }
                    }
                }
            });
        }

        // The track is added *before* the offer is applied, so that webrtc-rs pairs it with the
        // browser's recvonly video section instead of creating a new, unnegotiated transceiver.
        let offer = RTCSessionDescription::offer(offer_sdp).map_err(RtcError::BadOffer)?;
        pc.set_remote_description(offer).await.map_err(RtcError::BadOffer)?;
        let answer = pc.create_answer(None).await.map_err(RtcError::BadOffer)?;
        let mut gathered = pc.gathering_complete_promise().await;
        pc.set_local_description(answer).await?;
        // Host candidates take milliseconds; a STUN or TURN server that does not answer would hold
        // the answer until its own timeouts. After 3 s, answer with what has been gathered.
        if tokio::time::timeout(Duration::from_secs(3), gathered.recv())
            .await
            .is_err()
        {
            tracing::warn!("ICE gathering incomplete after 3 s (a STUN/TURN server did not answer); answering with the candidates gathered so far");
        }
        let local = pc.local_description().await.ok_or(RtcError::GatheringTimeout)?;
        let peer = Arc::new(Peer {
            pc: Arc::clone(pc),
            video,
            audio,
            keyframe,
        });
        Ok(Answer {
            peer,
            states,
            mic,
            feedback,
            sdp: local.sdp,
        })
    }
}

/// Where a peer connection is, as a session acts on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerState {
    /// ICE and DTLS are up: media can flow.
    Connected,
    /// Failed or closed: it will not carry media again.
    Ended,
    /// New, connecting, or disconnected (which may recover).
    Other,
}

impl From<RTCPeerConnectionState> for PeerState {
    fn from(s: RTCPeerConnectionState) -> Self {
        match s {
            RTCPeerConnectionState::Connected => PeerState::Connected,
            RTCPeerConnectionState::Failed | RTCPeerConnectionState::Closed => PeerState::Ended,
            _ => PeerState::Other,
        }
    }
}

/// The result of answering an offer.
pub struct Answer {
    pub peer: Arc<Peer>,
    /// Connection state changes, in order.
    pub states: mpsc::Receiver<PeerState>,
    /// The browser's microphone, if it sends one: 16 kHz mono PCM, one chunk per Opus packet.
    pub mic: mpsc::Receiver<Vec<f32>>,
    /// What the viewer says about the path, for the sender's rate control.
    pub feedback: mpsc::Receiver<Feedback>,
    /// The answer SDP, every candidate inside.
    pub sdp: String,
}

/// What a viewer's RTCP says about the path to it.
#[derive(Debug, Clone, PartialEq)]
pub enum Feedback {
    /// The receiver's estimate of what the path carries, in bits per second (REMB).
    Remb(u64),
    /// The fraction of the video packets lost since the last report (0..=1).
    Loss(f64),
    /// Video packets the receiver lost, by sequence number: to send again.
    Nack(Vec<u16>),
}

/// Feedback messages waiting for the sender: REMB and reports come a few times a second.
const FEEDBACK_QUEUE: usize = 32;

/// The sender's feedback in one RTCP packet: REMB, the loss of `video_ssrc` in a sender or
/// receiver report, and the packets of `video_ssrc` a NACK reports lost.
fn read_feedback(any: &dyn std::any::Any, video_ssrc: Option<u32>) -> Vec<Feedback> {
    let ours = |ssrc: u32| video_ssrc.is_none_or(|v| v == ssrc);
    let loss = |r: &webrtc::rtcp::reception_report::ReceptionReport| {
        ours(r.ssrc).then(|| Feedback::Loss(f64::from(r.fraction_lost) / 256.0))
    };
    if let Some(remb) = any.downcast_ref::<ReceiverEstimatedMaximumBitrate>() {
        if remb.bitrate.is_finite() && remb.bitrate >= 0.0 {
            return vec![Feedback::Remb(remb.bitrate as u64)];
        }
    } else if let Some(rr) = any.downcast_ref::<ReceiverReport>() {
        return rr.reports.iter().filter_map(loss).collect();
    } else if let Some(sr) = any.downcast_ref::<SenderReport>() {
        return sr.reports.iter().filter_map(loss).collect();
    } else if let Some(nack) = any.downcast_ref::<TransportLayerNack>() {
        if ours(nack.media_ssrc) {
            let lost = nack.nacks.iter().flat_map(|pair| pair.packet_list()).collect();
            return vec![Feedback::Nack(lost)];
        }
    }
    Vec::new()
}

/// Microphone chunks (20 ms each) waiting for the listener: about a second. When it falls behind,
/// newer audio is dropped rather than memory growing.
const MIC_QUEUE: usize = 48;

/// Decode the browser's microphone track (Opus) to 16 kHz mono, as the voice activity detector
/// and speech recognition take it. The track is read to its end even when nobody listens, so
/// that the receiver's reports keep flowing.
async fn read_microphone(track: Arc<TrackRemote>, tx: mpsc::Sender<Vec<f32>>) {
    let mut decoder = match opus::Decoder::new(crate::talk::vad::RATE, opus::Channels::Mono) {
        Ok(d) => d,
        Err(e) => {
            tracing::warn!(error = %e, "no Opus decoder: the microphone is ignored");
            return;
        }
    };
    // The longest Opus frame, 120 ms.
    let mut pcm = vec![0.0f32; crate::talk::vad::RATE as usize * 120 / 1000];
    while let Ok((packet, _)) = track.read_rtp().await {
        if tx.is_closed() || packet.payload.is_empty() {
            continue;
        }
        match decoder.decode_float(&packet.payload, &mut pcm, false) {
            Ok(n) => {
                if tx.try_send(pcm[..n].to_vec()).is_err() {
                    metrics::counter!("worker_mic_chunks_dropped_total").increment(1);
                }
            }
            Err(e) => tracing::debug!(error = %e, "an undecodable microphone packet"),
        }
    }
}

/// Which remote candidates a session may add. ICE sends connectivity checks to every remote
/// candidate, so a browser that trickles candidates chooses where the worker sends packets: only
/// addresses outside the special-purpose ranges ([`avatar_proto::netfilter`]) are taken, unless
/// allow-listed, and only so many per offer. Refused candidates are dropped quietly: a browser's
/// private host candidates are normal, and ICE still finds the path (as peer-reflexive) from the
/// browser's own checks to the candidates in our answer.
///
/// mDNS names (`<uuid>.local`, how browsers hide their host addresses) are dropped as well: the
/// name stands for an address the filter cannot see, and the worker's agent does not resolve
/// it ([`setting_engine`]). Dropping them costs nothing, for the same reason as above.
#[derive(Debug, Clone)]
pub struct CandidateFilter {
    filter: avatar_proto::netfilter::PeerFilter,
    max_per_offer: usize,
}

/// Why a remote candidate was dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CandidateRefused {
    /// The address is special-purpose and not allow-listed (or not an address at all).
    Address,
    /// The session already added its share for this offer.
    TooMany,
}

impl CandidateFilter {
    /// `allow`: ranges used although special-purpose; loopback too when `loopback`.
    pub fn new(allow: &[ipnet::IpNet], loopback: bool, max_per_offer: usize) -> Self {
        let mut allow = allow.to_vec();
        if loopback {
            allow.extend(
                ["127.0.0.0/8", "::1/128"]
                    .iter()
                    .filter_map(|n| n.parse::<ipnet::IpNet>().ok()),
            );
        }
        Self {
            filter: avatar_proto::netfilter::PeerFilter::new(&[], &allow, &[]),
            max_per_offer,
        }
    }

    /// Check the `candidate:` line of a trickled candidate, the `added`-th of this offer.
    /// Only an IP address literal can pass: mDNS names (`<uuid>.local`) and any other name are
    /// refused.
    pub fn check(&self, candidate: &str, added: usize) -> Result<(), CandidateRefused> {
        if added >= self.max_per_offer {
            return Err(CandidateRefused::TooMany);
        }
        let address = candidate.split_whitespace().nth(4).unwrap_or("");
        match address.parse::<std::net::IpAddr>() {
            Ok(ip) if self.filter.allows(ip) => Ok(()),
            _ => Err(CandidateRefused::Address),
        }
    }

    /// The offer with the same rule applied to the candidates inside it (`a=candidate:` lines
    /// are as good as trickled ones to an attacker), and how many it kept.
    pub fn filter_offer(&self, sdp: &str) -> (String, usize) {
        let mut kept = 0;
        let mut out = String::with_capacity(sdp.len());
        for line in sdp.split_inclusive('\n') {
            if let Some(candidate) = line.trim_end().strip_prefix("a=") {
                if candidate.starts_with("candidate:") {
                    if self.check(candidate, kept).is_err() {
                        continue;
                    }
                    kept += 1;
                }
            }
            out.push_str(line);
        }
        (out, kept)
    }
}

/// One browser's peer connection.
pub struct Peer {
    pc: Arc<RTCPeerConnection>,
    video: Arc<TrackLocalStaticRTP>,
    audio: Option<Arc<TrackLocalStaticSample>>,
    /// Set on PLI/FIR; the video clock emits an IDR and clears it.
    pub keyframe: Arc<AtomicBool>,
}

impl Peer {
    pub async fn add_candidate(&self, c: CandidateInit) -> Result<(), RtcError> {
        let init = RTCIceCandidateInit {
            candidate: c.candidate,
            sdp_mid: c.sdp_mid,
            sdp_mline_index: c.sdp_mline_index,
            username_fragment: c.username_fragment,
        };
        self.pc.add_ice_candidate(init).await.map_err(RtcError::BadCandidate)
    }

    /// Send one video packet now, stamped with its send time (`abs-send-time`). The SSRC and
    /// payload type are the negotiated ones.
    pub async fn write_video_packet(&self, packet: &rtp::packet::Packet) -> Result<(), RtcError> {
        use webrtc::rtp::extension::{abs_send_time_extension::AbsSendTimeExtension, HeaderExtension};
        let sent = HeaderExtension::AbsSendTime(AbsSendTimeExtension::new(SystemTime::now()));
        self.video.write_rtp_with_extensions(packet, &[sent]).await?;
        Ok(())
    }

    /// Write one Opus packet (dropped if the browser did not ask for audio).
    pub async fn write_audio(&self, data: bytes::Bytes, duration: Duration) -> Result<(), RtcError> {
        if let Some(audio) = &self.audio {
            let sample = webrtc::media::Sample {
                data,
                duration,
                timestamp: SystemTime::now(),
                ..Default::default()
            };
            audio.write_sample(&sample).await?;
        }
        Ok(())
    }

    pub fn has_audio(&self) -> bool {
        self.audio.is_some()
    }

    pub async fn close(&self) {
        let _ = self.pc.close().await;
    }
}

/// The ICE servers of a session whose tunnel is TLS/TCP: each TURN server of the relay's, reached
/// through the tunnel's loopback `gateway` with the same credentials. STUN and the relay's own
/// TURN addresses are left out: they need UDP to the relay, and a non-trickle answer would wait
/// for their gathering to time out.
pub fn through_gateway(servers: &[IceServer], gateway: std::net::SocketAddr) -> Vec<IceServer> {
    let mut out: Vec<IceServer> = Vec::new();
    for s in servers {
        let has_turn = s.urls.iter().any(|u| u.starts_with("turn:") && udp_url(u));
        let duplicate = out
            .iter()
            .any(|o| o.username == s.username && o.credential == s.credential);
        if has_turn && !duplicate {
            out.push(IceServer {
                urls: vec![format!("turn:{gateway}?transport=udp")],
                username: s.username.clone(),
                credential: s.credential.clone(),
            });
        }
    }
    out
}

/// Whether the ICE agent can use `url`: webrtc-rs gathers over UDP only, so `turn:…?transport=tcp`
/// and `turns:` (meant for browsers behind firewalls) are left out instead of warned about per session.
fn udp_url(url: &str) -> bool {
    let (scheme, rest) = url.split_once(':').unwrap_or((url, ""));
    match scheme {
        "stun" => true,
        "turn" => !rest.contains("transport=tcp"),
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::{CandidateFilter, CandidateRefused};

    #[test]
    fn a_nack_for_our_video_lists_every_packet_it_reports_lost() {
        use super::{read_feedback, Feedback, TransportLayerNack};
        use webrtc::rtcp::transport_feedbacks::transport_layer_nack::NackPair;
        let nack = |media_ssrc| TransportLayerNack {
            sender_ssrc: 1,
            media_ssrc,
            // 100, and from the bitmask 101 and 103; then 65535 wrapping to 0.
            nacks: vec![
                NackPair {
                    packet_id: 100,
                    lost_packets: 0b101,
                },
                NackPair {
                    packet_id: 65535,
                    lost_packets: 0b1,
                },
            ],
        };
        assert_eq!(
            read_feedback(&nack(7), Some(7)),
            vec![Feedback::Nack(vec![100, 101, 103, 65535, 0])]
        );
        assert!(
            read_feedback(&nack(8), Some(7)).is_empty(),
            "another stream's loss is not ours"
        );
    }

    #[test]
    fn over_a_tcp_tunnel_turn_goes_to_the_gateway_and_stun_is_dropped() {
        use avatar_proto::signaling::IceServer;
        let relay = vec![
            IceServer {
                urls: vec!["stun:203.0.113.10:3478".into()],
                username: None,
                credential: None,
            },
            IceServer {
                urls: vec![
                    "turn:203.0.113.10:3478?transport=udp".into(),
                    "turn:203.0.113.10:3478?transport=tcp".into(),
                ],
                username: Some("1700000000:w.gpu-1".into()),
                credential: Some("c2VjcmV0".into()),
            },
        ];
        let gateway: std::net::SocketAddr = "127.0.0.1:40000".parse().expect("addr");
        let routed = super::through_gateway(&relay, gateway);
        assert_eq!(routed.len(), 1);
        assert_eq!(routed[0].urls, vec!["turn:127.0.0.1:40000?transport=udp".to_owned()]);
        assert_eq!(routed[0].username.as_deref(), Some("1700000000:w.gpu-1"));
        assert!(
            super::through_gateway(&relay[..1], gateway).is_empty(),
            "no TURN: nothing to route"
        );
    }

    fn line(addr: &str) -> String {
        format!("candidate:842163049 1 udp 1677729535 {addr} 51234 typ host generation 0")
    }

    #[test]
    fn candidates_aimed_at_loopback_metadata_and_private_ranges_are_dropped() {
        let f = CandidateFilter::new(&[], false, 64);
        for denied in [
            "127.0.0.1",
            "169.254.169.254",
            "10.1.2.3",
            "192.168.1.5",
            "::1",
            "::ffff:127.0.0.1",
            "fe80::1",
            "0.0.0.0",
            "not-an-address",
        ] {
            assert_eq!(f.check(&line(denied), 0), Err(CandidateRefused::Address), "{denied}");
        }
        for allowed in ["8.8.8.8", "2001:4860:4860::8888"] {
            assert_eq!(f.check(&line(allowed), 0), Ok(()), "{allowed}");
        }
        assert_eq!(f.check("", 0), Err(CandidateRefused::Address));
    }

    /// Issue 26 (N5): an mDNS name passed the filter, and the agent resolved it to a LAN address
    /// whose literal the filter refuses. Names are refused now, whatever the allow-list says.
    #[test]
    fn mdns_names_are_refused_trickled_or_in_the_offer() {
        let everything: Vec<ipnet::IpNet> = vec!["0.0.0.0/0".parse().expect("net"), "::/0".parse().expect("net")];
        for f in [
            CandidateFilter::new(&[], false, 64),
            CandidateFilter::new(&everything, true, 64),
        ] {
            for name in [
                "1b4c7f1e-2f0a-4e36-9f7b-3b9d0c6b1d2e.local",
                "printer.local",
                "LOCAL",
                "example.com",
            ] {
                assert_eq!(f.check(&line(name), 0), Err(CandidateRefused::Address), "{name}");
            }
            let sdp =
                "v=0\r\na=candidate:1 1 udp 2122260223 1b4c7f1e-2f0a-4e36-9f7b-3b9d0c6b1d2e.local 54321 typ host\r\n\
                       a=candidate:2 1 udp 1686052607 8.8.8.8 4000 typ srflx raddr 0.0.0.0 rport 0\r\n";
            let (filtered, kept) = f.filter_offer(sdp);
            assert_eq!(kept, 1);
            assert!(!filtered.contains(".local"), "{filtered}");
        }
    }

    #[test]
    fn allow_lists_and_the_loopback_setting_open_their_ranges_only() {
        let lan: Vec<ipnet::IpNet> = vec!["192.168.0.0/16".parse().expect("net")];
        let f = CandidateFilter::new(&lan, true, 64);
        assert_eq!(f.check(&line("192.168.1.5"), 0), Ok(()));
        assert_eq!(f.check(&line("127.0.0.1"), 0), Ok(()));
        assert_eq!(f.check(&line("::1"), 0), Ok(()));
        assert_eq!(f.check(&line("169.254.169.254"), 0), Err(CandidateRefused::Address));
        assert_eq!(f.check(&line("10.0.0.1"), 0), Err(CandidateRefused::Address));
    }

    #[test]
    fn candidates_inside_the_offer_are_filtered_too() {
        let f = CandidateFilter::new(&[], false, 2);
        let sdp = "v=0\r\nm=video 9 UDP/TLS/RTP/SAVPF 96\r\n\
                   a=candidate:1 1 udp 1 169.254.169.254 80 typ host\r\n\
                   a=candidate:2 1 udp 1 8.8.8.8 4000 typ host\r\n\
                   a=candidate:3 1 udp 1 127.0.0.1 5000 typ host\r\n\
                   a=candidate:4 1 udp 1 8.8.4.4 4001 typ srflx\r\n\
                   a=candidate:5 1 udp 1 1.1.1.1 4002 typ srflx\r\n\
                   a=mid:0\r\n";
        let (filtered, kept) = f.filter_offer(sdp);
        assert_eq!(kept, 2);
        assert!(
            filtered.contains("8.8.8.8") && filtered.contains("8.8.4.4"),
            "{filtered}"
        );
        for gone in ["169.254.169.254", "127.0.0.1", "1.1.1.1"] {
            assert!(!filtered.contains(gone), "{gone}: {filtered}");
        }
        assert!(filtered.starts_with("v=0\r\n") && filtered.ends_with("a=mid:0\r\n"));
    }

    #[test]
    fn candidates_per_offer_are_capped() {
        let f = CandidateFilter::new(&[], false, 3);
        assert_eq!(f.check(&line("8.8.8.8"), 2), Ok(()));
        assert_eq!(f.check(&line("8.8.8.8"), 3), Err(CandidateRefused::TooMany));
    }

    #[test]
    fn only_udp_ice_urls_reach_the_agent() {
        assert!(super::udp_url("stun:203.0.113.1:3478"));
        assert!(super::udp_url("turn:203.0.113.1:3478?transport=udp"));
        assert!(super::udp_url("turn:203.0.113.1:3478"));
        assert!(!super::udp_url("turn:203.0.113.1:3478?transport=tcp"));
        assert!(!super::udp_url("turns:relay.example.com:5349?transport=tcp"));
    }

    /// How long after a candidate named `name` (which an mDNS responder on this host answers
    /// with this host's address) is added, past the filter, to a peer of `engine`'s, the first
    /// packet reaches the candidate's port; None: none within `window`.
    async fn first_packet_to_an_mdns_name(
        engine: &super::RtcEngine,
        name: &str,
        window: std::time::Duration,
    ) -> Option<std::time::Duration> {
        use avatar_proto::signaling::CandidateInit;
        use webrtc::api::APIBuilder;
        use webrtc::rtp_transceiver::rtp_codec::RTPCodecType;
        // The browser's side: an offer for video (its own candidates are not in it).
        let mut media = webrtc::api::media_engine::MediaEngine::default();
        super::register_codecs(&mut media).expect("codecs");
        let browser = APIBuilder::new()
            .with_media_engine(media)
            .build()
            .new_peer_connection(Default::default())
            .await
            .expect("browser peer");
        browser
            .add_transceiver_from_kind(RTPCodecType::Video, None)
            .await
            .expect("video section");
        let offer = browser.create_offer(None).await.expect("offer").sdp;
        let answer = engine.answer(offer, &[]).await.expect("answer");
        let probe = tokio::net::UdpSocket::bind("0.0.0.0:0").await.expect("probe");
        let port = probe.local_addr().expect("port").port();
        answer
            .peer
            .add_candidate(CandidateInit {
                candidate: format!("candidate:1 1 udp 2122260223 {name} {port} typ host"),
                sdp_mid: Some("0".into()),
                sdp_mline_index: Some(0),
                username_fragment: None,
            })
            .await
            .expect("the agent takes the candidate");
        let started = std::time::Instant::now();
        let mut buf = [0u8; 1500];
        let first = match tokio::time::timeout(window, probe.recv(&mut buf)).await {
            Ok(Ok(n)) => {
                // An ICE check: a STUN Binding request (type 0x0001, then the magic cookie).
                assert!(
                    n >= 20 && buf[..2] == [0, 1] && buf[4..8] == [0x21, 0x12, 0xa4, 0x42],
                    "not a STUN binding request: {:02x?}",
                    &buf[..n.min(20)]
                );
                Some(started.elapsed())
            }
            _ => None,
        };
        answer.peer.close().await;
        let _ = browser.close().await;
        first
    }

    /// Issue 26 (N5), in memory on this host: an mDNS responder answers a `.local` name with this
    /// host's own address, and a candidate of that name reaches a peer (as if past the filter).
    /// A peer of the library's default settings (mDNS `QueryOnly`) resolves the name and sends
    /// its checks to the probe; a peer of the worker's engine sends it nothing.
    ///
    /// Needs IPv4 multicast on a non-loopback interface (an mDNS responder on this host): where
    /// the control peer gets no packet, the test says so instead of passing without a proof.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_worker_peer_sends_nothing_to_where_an_mdns_name_resolves() {
        use webrtc::mdns::config::Config;
        use webrtc::mdns::conn::DnsConn;
        let name = format!("probe-{:016x}.local", rand::random::<u64>());
        let responder = DnsConn::server(
            "0.0.0.0:5353".parse().expect("addr"),
            Config {
                local_names: vec![name.clone()],
                ..Config::default()
            },
        )
        .expect("an mDNS responder on this host (IPv4 multicast on an interface)");
        let settings = super::RtcSettings::default();
        let library_default =
            super::RtcEngine::with_mdns(&settings, webrtc::ice::mdns::MulticastDnsMode::QueryOnly).expect("engine");
        let took = first_packet_to_an_mdns_name(&library_default, &name, std::time::Duration::from_secs(8))
            .await
            .expect(
                "the control peer (mDNS on) sent nothing to the resolved address: no mDNS on this host, so \
                 this test would prove nothing here",
            );
        let worker = super::RtcEngine::new(&settings).expect("engine");
        let window = (took * 3).max(std::time::Duration::from_secs(3));
        let sent = first_packet_to_an_mdns_name(&worker, &name, window).await;
        let _ = responder.close().await;
        eprintln!("mDNS on: the first packet after {took:?}; the worker's peer: {sent:?} in {window:?}");
        assert_eq!(
            sent, None,
            "the worker's peer resolved the .local name and sent checks there"
        );
    }
}
