//! One browser session on the worker, from the relay's `Open` frame to its end.
//!
//! The session waits on its inbox (the browser's messages, the relay's close, the session API's
//! commands), the peer connection's state, its conversation and media clock, and shutdown. An offer creates (or replaces) the peer and answers with every candidate inside;
//! when ICE connects, the media clock starts and idle avatar frames flow at once. A `text_webrtc`
//! starts an answer in the session's [`Conversation`]; its text deltas, speech start/end and
//! failures come back here and go to the browser as events.
//!
//! Voice input: when the browser sends its microphone and `talk.vad.model` is set, a listener
//! thread ([`crate::talk::hearing`]) reports speech starts, the utterance so far (for partial
//! transcripts), pauses and utterances. A start while the avatar answers interrupts it (barge-in;
//! `talk.vad.barge_in`); the dialogue says what to recognise ([`Out::Recognise`], carried out by
//! [`Conversation::transcribe`]) and answers the final transcript like a `text_webrtc`; how the
//! words of a pause read goes back to the listener thread ([`Out::Words`]). The browser sees
//! `user_speech_started`, partial `user_transcript`s, `user_speech_ended` and the final one.
//!
//! Nothing outside reaches into a session: it runs on its own task, and everything it is told
//! arrives in its inbox through a [`SessionHandle`]. Adapters turn their protocols into
//! [`Input`]s: the relay's session stream ([`relay_link`]: the browser's messages, the relay's
//! close, a lost tunnel) and the session API ([`crate::api`]: describe, say, audio, interrupt,
//! end), and later WHEP. What the session says goes out as [`Output`]s, which the relay link
//! writes as frames.
//!
//! ```text
//!  relay stream ──frames──▶ relay_link ──Input──┐                ┌──Output──▶ relay_link ──frames──▶ relay
//!  session API ──Request──▶ Directory ──Input───┼─▶ inbox ─▶ Session ─┤
//!  (media sinks) ─────────── tap ───── Input ───┘                └──media──▶ viewer + taps (fan-out)
//! ```
//!
//! The session's media is a fan-out ([`crate::media::fanout`]): the viewer's peer first, and any
//! sink that joins through [`SessionHandle::tap`] (a recording, another viewer).
//!
//! The dialogue rules are the pure [`Dialogue`]'s: which answer plays when (the browser's
//! message cuts in; a backend's say waits its turn unless it interrupts), what the user's voice
//! does, and which events the browser gets for it all. The session feeds it what happened (the
//! browser's messages, the API's says, what the listener heard, the conversation's and the
//! clock's reports, a new peer) and carries out what it decides, in order (`Session::follow`).
//!
//! Media follows the viewer's bandwidth: the peer's REMB and receiver reports go to the sender
//! task ([`crate::media::send`]), which paces video and publishes the target the media clock
//! encodes at.
//!
//! Typed messages and transcripts pass the same per-session limits ([`crate::talk::limits`]): a
//! message too long or over the turn rate gets `message_too_long` or `rate_limited`, and the
//! answer in progress goes on. An `interrupt` is not a turn and is never limited.
//!
//! How a session ends, and why:
//! * the relay sends `Close` or finishes the stream (the browser left): stop at once;
//! * the peer fails or closes: tell the browser (`peer_failed`) and stop;
//! * the tunnel breaks while media flows: keep streaming — media does not ride the tunnel — and
//!   stop only when the peer itself ends;
//! * the worker shuts down: tell the relay and stop.
//!
//! Either way the encoder thread is stopped and the capacity slot returned (both on drop).

use crate::dialogue::{Cause, Conditions, Dialogue, Job, Out, Said, Say, Start};
use crate::media::fanout::Taps;
use crate::media::rate::{RateControl, Target};
use crate::media::record::{RecordError, Recording, RecordingSpec};
use crate::media::send::{send_media, SendParts};
use crate::media::stream::{Adaptation, ClockEvent, Feed, MediaOut, Sinks, VideoStream};
use crate::rtc::{CandidateRefused, Feedback, Peer, PeerState, RtcError};
use crate::talk::hearing::Hearing;
use crate::talk::vad::Heard;
use crate::talk::{AudioIn, Conversation, TalkEvent};
use crate::transcript::Transcript;
use crate::Context;
use avatar_proto::api::{Source, TranscriptTurn};
use avatar_proto::signaling::{ClientMessage, ErrorCode, ServerEvent};
use avatar_proto::stream::{send_frame, FramedRecv};
use avatar_proto::tunnel::SessionFrame;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, info_span, warn, Instrument};

/// How a session ended, and what the relay must hear about it.
enum End {
    /// The relay already knows (it closed the stream) or cannot be told (the tunnel is gone).
    Quiet,
    /// Send `event` (if any) for the browser, then a `Close` with `reason`.
    Tell {
        event: Option<ServerEvent>,
        reason: &'static str,
    },
}

/// The audio the voice detector handed over ([`Heard`]), until the dialogue says what to
/// recognise.
#[derive(Default)]
struct HeardAudio {
    /// The utterance so far, for a partial transcript.
    partial: Option<Vec<f32>>,
    /// The utterance up to the last pause, by the pause's number.
    pause: Option<(u64, Vec<f32>)>,
    /// The last utterance that did not end in a pause.
    utterance: Option<Vec<f32>>,
    /// The last few utterances that ended in a pause, by its number: asked again if their
    /// recognition fails ([`crate::dialogue::MAX_PENDING`] of them).
    ended: VecDeque<(u64, Vec<f32>)>,
}

impl HeardAudio {
    /// The audio `job` names, if still here.
    fn take(&mut self, job: Job) -> Option<Vec<f32>> {
        match job {
            Job::Partial(_) => self.partial.take(),
            Job::Final(_) => self.utterance.take(),
            Job::Pause(p) => match self.pause.take_if(|(n, _)| *n == p) {
                Some((_, pcm)) => Some(pcm),
                None => self.ended.iter().find(|(n, _)| *n == p).map(|(_, pcm)| pcm.clone()),
            },
        }
    }
}

/// A negotiated peer and, once connected, its running media.
struct Active {
    peer: Arc<Peer>,
    states: mpsc::Receiver<PeerState>,
    media: Option<(VideoStream, tokio::task::JoinHandle<()>)>,
    /// Remote candidates added since this offer (capped).
    candidates: usize,
    /// The browser's microphone, until voice input takes it.
    mic: Option<mpsc::Receiver<Vec<f32>>>,
    /// The viewer's RTCP feedback, until the sender takes it.
    feedback: Option<mpsc::Receiver<Feedback>>,
    /// Stops voice input for this peer when it goes.
    _listening: Option<tokio_util::sync::DropGuard>,
}

impl Active {
    async fn stop(self) {
        if let Some((stream, writer)) = self.media {
            // Joining the encoder thread can take up to one frame: keep it off the async workers.
            let _ = tokio::task::spawn_blocking(move || drop(stream)).await;
            writer.abort();
        }
        self.peer.close().await;
    }
}

/// Inputs that may wait in a session's inbox. The relay link waits for room; a session API
/// command that finds it full is refused as `busy`.
const INBOX: usize = 32;
/// Outputs that may wait for the relay link to write them.
const OUTBOX: usize = 64;

/// What reaches a session, from any adapter.
pub enum Input {
    /// A browser message, from the relay's stream.
    Client(ClientMessage),
    /// The relay closed the session (the browser left).
    Closed { reason: String },
    /// The relay's stream ended without a close, or broke: the tunnel is lost.
    Lost,
    /// The relay's stream carried a frame a session stream must not.
    ProtocolError,
    /// A command from the session API.
    Command(crate::api::Request),
    /// Join the session's media ([`crate::media::fanout`]).
    Tap {
        name: String,
        capacity: usize,
        reply: oneshot::Sender<mpsc::Receiver<MediaOut>>,
    },
}

/// What a session says, for the relay's stream.
#[derive(Debug)]
pub enum Output {
    /// An event for the browser.
    Event(ServerEvent),
    /// A complete turn of the transcript, for the relay's webhooks (only when it asked).
    Record(TranscriptTurn),
    /// The session's recording is complete, for the relay's webhooks (only when it asked).
    Recording(avatar_proto::tunnel::RecordingReady),
    /// The session is over; the link sends `Close` and finishes the stream.
    Close { reason: String },
}

/// Why a session did not take a command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NotTaken {
    /// Its inbox is full: it is busy, retry.
    Full,
    /// It has ended.
    Ended,
}

/// A running session, as the world outside reaches it: its inbox.
#[derive(Clone)]
pub struct SessionHandle {
    inbox: mpsc::Sender<Input>,
}

impl SessionHandle {
    /// Hand the session a session API command without waiting.
    pub fn try_command(&self, request: crate::api::Request) -> Result<(), NotTaken> {
        self.inbox.try_send(Input::Command(request)).map_err(|e| match e {
            mpsc::error::TrySendError::Full(_) => NotTaken::Full,
            mpsc::error::TrySendError::Closed(_) => NotTaken::Ended,
        })
    }

    /// Join the session's media as a sink named `name`, with room for `capacity` packets (see
    /// [`crate::media::fanout`]); `None` if the session has ended.
    pub async fn tap(&self, name: &str, capacity: usize) -> Option<mpsc::Receiver<MediaOut>> {
        let (reply, media) = oneshot::channel();
        let input = Input::Tap {
            name: name.to_owned(),
            capacity,
            reply,
        };
        self.inbox.send(input).await.ok()?;
        media.await.ok()
    }
}

/// The sending half of a session stream, whichever transport carries the tunnel.
pub type SendHalf = Box<dyn tokio::io::AsyncWrite + Send + Unpin>;
/// The receiving half of a session stream.
pub type RecvHalf = Box<dyn tokio::io::AsyncRead + Send + Unpin>;

/// Serve one session stream. `turn_gateway`: the loopback TURN server of a TLS/TCP tunnel, which
/// the session's TURN then goes through instead of to the relay's own address.
pub async fn run_session(
    send: SendHalf,
    recv: RecvHalf,
    ctx: Arc<Context>,
    shutdown: CancellationToken,
    turn_gateway: Option<std::net::SocketAddr>,
) {
    let mut recv = FramedRecv::new(recv);
    let open = match tokio::time::timeout(Duration::from_secs(5), recv.next::<SessionFrame>()).await {
        Ok(Ok(Some(SessionFrame::Open(open)))) => open,
        Ok(Ok(Some(SessionFrame::Command(command)))) => {
            return crate::api::serve_command(send, recv, command, ctx).await;
        }
        other => {
            warn!(?other, "session stream did not start with an open frame");
            return;
        }
    };
    let span = info_span!("session", session_id = %open.session_id, worker_id = %ctx.config.worker_id);
    let barge_in = ctx.talk.as_ref().is_some_and(|t| t.vad.barge_in);
    let (inbox_tx, inbox) = mpsc::channel(INBOX);
    let (outbox, outbox_rx) = mpsc::channel(OUTBOX);
    let handle = SessionHandle { inbox: inbox_tx };
    let link = tokio::spawn(relay_link(send, recv, handle.clone(), outbox_rx).instrument(span.clone()));
    let (talk_tx, talk_events) = mpsc::unbounded_channel();
    let clip = ctx.avatars.get(open.avatar_id.as_deref());
    let conv = ctx.talk.as_ref().map(|talk| {
        let avatar_id = open.avatar_id.clone().unwrap_or_else(|| clip.id.clone());
        Conversation::new(Arc::clone(talk), Arc::clone(&clip), avatar_id, talk_tx)
    });
    let about = About {
        session_id: open.session_id.clone(),
        avatar_id: open.avatar_id.clone().unwrap_or_else(|| clip.id.clone()),
        user_id: open.user_id.as_ref().map(ToString::to_string),
        started_at: chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true),
    };
    Session {
        handle,
        inbox,
        outbox,
        taps: Taps::default(),
        upload: None,
        ctx,
        about,
        dialogue: Dialogue::new(conv.is_some(), barge_in),
        transcript: Transcript::default(),
        records: open.records,
        finished: Vec::new(),
        voice_began: None,
        heard: HeardAudio::default(),
        words: Arc::default(),
        pauses_from: 0,
        active: None,
        detached: false,
        conv,
        talk_events,
        clock_events: None,
        hearing: None,
        ice_servers: match turn_gateway {
            Some(gateway) => crate::rtc::through_gateway(&open.ice_servers, gateway),
            None => open.ice_servers,
        },
    }
    .run(clip, shutdown)
    .instrument(span)
    .await;
    // The session has dropped its outbox: the link writes what is left and finishes the stream.
    let _ = link.await;
}

/// The relay's session stream as an adapter onto a session: frames in become [`Input`]s, the
/// session's [`Output`]s go out as frames. It ends when the session drops its outbox (reading
/// stops then too), or, once the relay's side has ended, when the session is done writing.
async fn relay_link(
    mut send: SendHalf,
    mut recv: FramedRecv<RecvHalf>,
    session: SessionHandle,
    mut outbox: mpsc::Receiver<Output>,
) {
    let reading = async {
        loop {
            let input = match recv.next::<SessionFrame>().await {
                Ok(Some(SessionFrame::Client(msg))) => Input::Client(msg),
                Ok(Some(SessionFrame::Close { reason })) => {
                    let _ = session.inbox.send(Input::Closed { reason }).await;
                    return;
                }
                Ok(Some(other)) => {
                    warn!(?other, "unexpected frame on a session stream");
                    let _ = session.inbox.send(Input::ProtocolError).await;
                    return;
                }
                // The relay ends a session with a `Close` frame; a stream that ends without one
                // was lost (the tunnel broke, or the relay is stopping).
                Ok(None) | Err(_) => {
                    let _ = session.inbox.send(Input::Lost).await;
                    return;
                }
            };
            if session.inbox.send(input).await.is_err() {
                return;
            }
        }
    };
    let writing = async {
        while let Some(output) = outbox.recv().await {
            let (frame, last) = match output {
                Output::Event(ev) => (SessionFrame::Event(ev), false),
                Output::Record(turn) => (SessionFrame::Record(turn), false),
                Output::Recording(done) => (SessionFrame::Recording(done), false),
                Output::Close { reason } => (SessionFrame::Close { reason }, true),
            };
            if let Err(e) = send_frame(&mut send, &frame).await {
                info!(error = %e, "could not reach the relay");
                // The session sees its outbox closed when it next writes; a session with no peer
                // may not write again, so it is told as well.
                let _ = session.inbox.try_send(Input::Lost);
                return;
            }
            if last {
                break;
            }
        }
        let _ = tokio::io::AsyncWriteExt::shutdown(&mut send).await;
    };
    tokio::pin!(writing);
    tokio::select! {
        _ = &mut writing => return,
        _ = reading => {}
    }
    writing.await;
}

/// What the session API lists about a session.
struct About {
    session_id: String,
    avatar_id: String,
    user_id: Option<String>,
    started_at: String,
}

struct Session {
    /// Its own handle, for the directory.
    handle: SessionHandle,
    inbox: mpsc::Receiver<Input>,
    /// To the relay link.
    outbox: mpsc::Sender<Output>,
    /// The media's sinks beyond the viewer (they outlive a renegotiated peer).
    taps: Taps,
    /// The session API's audio upload in progress, if any.
    upload: Option<mpsc::WeakSender<Vec<f32>>>,
    ctx: Arc<Context>,
    about: About,
    /// Whose turn it is (the browser's messages and the session API's says).
    dialogue: Dialogue<AudioIn>,
    /// What was said, turn by turn ([`crate::transcript`]).
    transcript: Transcript,
    /// The relay wants each complete turn ([`Output::Record`]).
    records: bool,
    /// Complete turns the relay has not been sent yet.
    finished: Vec<TranscriptTurn>,
    /// When the user's current utterance began.
    voice_began: Option<chrono::DateTime<chrono::Utc>>,
    /// The audio the voice detector handed over, until the dialogue says to recognise it.
    heard: HeardAudio,
    /// How the words of the last pause read ([`Out::Words`], [`crate::talk::hearing::words`]),
    /// for the voice detector of the current peer.
    words: Arc<std::sync::atomic::AtomicU64>,
    /// Where the next peer's voice detector numbers its pauses from: each peer's are its own.
    pauses_from: u64,
    active: Option<Active>,
    /// The tunnel broke (or the relay link is gone); media continues until the peer ends.
    detached: bool,
    /// The talking pipeline (None when `[talk] enabled = false`).
    conv: Option<Conversation>,
    talk_events: mpsc::UnboundedReceiver<TalkEvent>,
    /// Speech start/end from the running media clock.
    clock_events: Option<mpsc::UnboundedReceiver<ClockEvent>>,
    /// Voice input from the current peer's microphone.
    hearing: Option<mpsc::UnboundedReceiver<Hearing>>,
    /// STUN/TURN servers from the relay, for this session's peers.
    ice_servers: Vec<avatar_proto::signaling::IceServer>,
}

impl Session {
    async fn run(mut self, clip: Arc<crate::media::avatar::AvatarClip>, shutdown: CancellationToken) {
        let ctx = Arc::clone(&self.ctx);
        let Some(slot) = ctx.try_acquire() else {
            info!("at capacity: refusing session");
            self.event(ServerEvent::error(
                ErrorCode::Busy,
                "this worker is at capacity; try again shortly",
            ))
            .await;
            self.close("busy").await;
            return;
        };
        info!(avatar = %clip.id, "session started");
        self.dialogue.hearing(ctx.talk.as_ref().is_some_and(|t| t.hears()));
        metrics::counter!("worker_sessions_total").increment(1);
        metrics::gauge!("worker_sessions_active").increment(1.0);
        let registered = ctx.directory.register(&self.about.session_id, self.handle.clone());
        ctx.transcripts.started(&self.about.session_id);
        let recording = self.start_recording(clip.size());
        let farewell = self.serve(&clip, &shutdown).await;
        drop(registered);
        for turn in self.transcript.close(chrono::Utc::now()) {
            self.note(Some(turn));
        }
        self.send_records().await;
        ctx.transcripts.ended(&self.about.session_id);
        // Free everything *before* telling the relay, so the browser's next offer finds the slot.
        if let Some(conv) = self.conv.as_mut() {
            conv.interrupt();
        }
        if let Some(active) = self.active.take() {
            active.stop().await;
        }
        drop(slot);
        metrics::gauge!("worker_sessions_active").decrement(1.0);
        // The browser hears why at once; the relay hears of the recording before the close.
        let (event, reason) = match farewell {
            End::Tell { event, reason } => (event, Some(reason)),
            End::Quiet => (None, None),
        };
        if let Some(event) = event {
            self.event(event).await;
        }
        if let Some(recording) = recording {
            self.finish_recording(recording).await;
        }
        if let Some(reason) = reason {
            self.close(reason).await;
        }
        info!("session ended");
    }

    /// Run until the session ends; returns what to tell the relay, if anything.
    async fn serve(&mut self, clip: &Arc<crate::media::avatar::AvatarClip>, shutdown: &CancellationToken) -> End {
        loop {
            // What the last input made the dialogue decide, then the turns it completed, for
            // the relay's webhooks.
            self.follow().await;
            self.send_records().await;
            let state = async {
                match self.active.as_mut() {
                    Some(a) => a.states.recv().await,
                    None => std::future::pending().await,
                }
            };
            let clock = async {
                match self.clock_events.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            let heard = async {
                match self.hearing.as_mut() {
                    Some(rx) => rx.recv().await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                // The session holds a handle itself: the inbox never closes under it.
                Some(input) = self.inbox.recv() => {
                    if let Some(end) = self.on_input(input).await {
                        return end;
                    }
                }
                Some(ev) = self.talk_events.recv() => self.on_talk(ev).await,
                Some(ev) = clock => self.on_clock(ev).await,
                heard = heard => match heard {
                    Some(h) => self.on_hearing(h).await,
                    None => self.hearing = None,
                },
                _ = shutdown.cancelled() => {
                    let event = ServerEvent::error(
                        ErrorCode::WorkerLost,
                        "the worker is shutting down; send a new webrtc_offer to continue on another worker",
                    );
                    return End::Tell { event: Some(event), reason: "worker shutting down" };
                }
                state = state => match state {
                    Some(PeerState::Connected) => self.start_media(clip),
                    Some(PeerState::Ended) | None => {
                        info!(?state, "peer connection ended");
                        let event = ServerEvent::error(
                            ErrorCode::PeerFailed,
                            "the WebRTC connection failed; send a new webrtc_offer to retry",
                        );
                        return End::Tell { event: Some(event), reason: "peer failed" };
                    }
                    Some(PeerState::Other) => debug!("peer state changed"),
                },
            }
        }
    }

    /// One input from an adapter; `Some` when it ends the session.
    async fn on_input(&mut self, input: Input) -> Option<End> {
        match input {
            Input::Client(msg) => self.on_client(msg).await,
            Input::Closed { reason } => {
                info!(%reason, "relay closed the session");
                return Some(End::Quiet);
            }
            Input::ProtocolError => {
                return Some(End::Tell {
                    event: None,
                    reason: "protocol error",
                })
            }
            Input::Lost if self.active.is_none() => return Some(End::Quiet),
            Input::Lost => {
                info!("tunnel stream lost; media continues while the peer lives");
                self.detached = true;
            }
            Input::Command(request) => return self.on_command(request),
            Input::Tap { name, capacity, reply } => {
                info!(%name, "a media sink joined");
                let _ = reply.send(self.taps.join(&name, capacity));
            }
        }
        None
    }

    async fn on_client(&mut self, msg: ClientMessage) {
        match msg {
            ClientMessage::WebrtcOffer(offer) => {
                if let Some(old) = self.active.take() {
                    info!("new offer: replacing the peer");
                    if let Some(conv) = self.conv.as_mut() {
                        conv.detach();
                    }
                    self.dialogue.peer_replaced();
                    old.stop().await;
                }
                let started = std::time::Instant::now();
                let (sdp, candidates) = self.ctx.candidates.filter_offer(&offer.sdp);
                match self.ctx.rtc.answer(sdp, &self.ice_servers).await {
                    Ok(answer) => {
                        info!(elapsed_ms = started.elapsed().as_millis() as u64, "answered");
                        self.active = Some(Active {
                            peer: answer.peer,
                            states: answer.states,
                            media: None,
                            candidates,
                            mic: Some(answer.mic),
                            feedback: Some(answer.feedback),
                            _listening: None,
                        });
                        let timestamp = chrono::Local::now().format("%Y-%m-%dT%H:%M:%S%.6f").to_string();
                        self.event(ServerEvent::WebrtcAnswer {
                            sdp: answer.sdp,
                            timestamp,
                        })
                        .await;
                    }
                    Err(RtcError::BadOffer(e)) => {
                        info!(error = %e, "offer rejected");
                        self.event(ServerEvent::error(
                            ErrorCode::BadSdp,
                            format!("the offer could not be used: {e}"),
                        ))
                        .await;
                    }
                    Err(e) => {
                        warn!(error = %e, "could not answer");
                        self.event(ServerEvent::error(
                            ErrorCode::Internal,
                            "the worker could not create a peer connection",
                        ))
                        .await;
                    }
                }
            }
            ClientMessage::WebrtcIceCandidate(c) => {
                let (Some(active), Some(candidate)) = (self.active.as_mut(), c.candidate) else {
                    return;
                };
                if let Err(refused) = self.ctx.candidates.check(&candidate.candidate, active.candidates) {
                    metrics::counter!("worker_remote_candidates_dropped_total", "reason" => match refused {
                        CandidateRefused::Address => "address",
                        CandidateRefused::TooMany => "too_many",
                    })
                    .increment(1);
                    debug!(?refused, "remote candidate dropped");
                    return;
                }
                active.candidates += 1;
                if let Err(e) = active.peer.add_candidate(candidate).await {
                    self.event(ServerEvent::error(ErrorCode::InvalidMessage, e.to_string()))
                        .await;
                }
            }
            ClientMessage::TextWebrtc(t) => self.dialogue.typed(&t.message),
            ClientMessage::Interrupt {} => self.dialogue.browser_interrupt(),
        }
    }

    /// Carry out what the dialogue decided ([`crate::dialogue`]), in order.
    async fn follow(&mut self) {
        while let Some(out) = self.dialogue.poll() {
            match out {
                Out::Event(event) => {
                    if event == (ServerEvent::UserSpeechStarted {}) {
                        self.voice_began = Some(chrono::Utc::now());
                    }
                    self.event(event).await;
                }
                Out::Answer { text, source } => self.answer(text, source).await,
                Out::Start(start) => {
                    let turn = start.turn;
                    match self.begin(start) {
                        Ok(turn) => info!(turn, "saying what the session API queued"),
                        Err(refusal) => {
                            warn!(turn, %refusal, "a queued say could not start; the next one plays");
                            self.dialogue.start_failed(turn);
                        }
                    }
                }
                Out::Stop(cause) => {
                    match cause {
                        Cause::Browser => info!("interrupted by the browser"),
                        Cause::Api => info!("interrupted by the session API"),
                        Cause::BargeIn => {
                            info!("barge-in: the user spoke over the avatar");
                            metrics::counter!("worker_barge_ins_total").increment(1);
                        }
                    }
                    if let Some(conv) = self.conv.as_mut() {
                        conv.interrupt();
                    }
                    self.cut(None);
                }
                Out::Cut { keep } => self.cut(keep),
                Out::Recognise(job) => match (self.conv.as_mut(), self.heard.take(job)) {
                    (Some(conv), Some(pcm)) => conv.transcribe(job, pcm),
                    (Some(_), None) => self
                        .dialogue
                        .not_heard(job, "speech recognition: the audio is gone".into()),
                    (None, _) => {}
                },
                Out::Forget(job) => {
                    if let Some(conv) = self.conv.as_mut() {
                        conv.forget(job);
                    }
                }
                Out::Words { pause, complete } => {
                    debug!(pause, complete, "the words so far read");
                    let words = crate::talk::hearing::words(pause, complete);
                    self.words.store(words, std::sync::atomic::Ordering::Release);
                }
                Out::Remember { user, answer } => {
                    if let Some(conv) = self.conv.as_mut() {
                        conv.remember(user, answer);
                    }
                }
                Out::TurnOver { turn, cut } => {
                    let done = self.transcript.ended(turn, cut, chrono::Utc::now());
                    self.note(done);
                }
            }
        }
    }

    /// Start answering the user's `message` (typed, or a transcript), or tell the browser why
    /// not: the session's limits ([`crate::talk::limits`]) refuse a message that is too long or
    /// comes over the turn rate, and the answer in progress then goes on.
    async fn answer(&mut self, message: String, source: Source) {
        let now = chrono::Utc::now();
        let began = match source {
            Source::Voice => self.voice_began.take().unwrap_or(now),
            _ => now,
        };
        let Some(conv) = self.conv.as_mut() else { return };
        match conv.say(message.clone()) {
            Ok(turn) => {
                info!(turn, "answering");
                let user = self.transcript.user(turn, &message, source, began, now);
                self.note(user);
                self.transcript.asked(turn, source, None, now);
                self.dialogue.began(turn);
                metrics::counter!("worker_talk_turns_total").increment(1);
            }
            Err(refusal) => {
                info!(%refusal, "message refused");
                metrics::counter!("worker_talk_refused_total", "reason" => refusal.reason()).increment(1);
                self.event(refusal.event()).await;
            }
        }
    }

    async fn on_hearing(&mut self, h: Hearing) {
        match h {
            Hearing::Heard(Heard::Started { barge_in }) => self.dialogue.voice_started(barge_in),
            Hearing::Heard(Heard::Partial { pcm }) => {
                self.heard.partial = Some(pcm);
                self.dialogue.voice_partial();
            }
            Hearing::Heard(Heard::Paused { pause, pcm }) => {
                self.heard.pause = Some((pause, pcm));
                self.dialogue.voice_paused(pause);
            }
            Hearing::Heard(Heard::Resumed) => self.dialogue.voice_resumed(),
            Hearing::Heard(Heard::Utterance { pcm, pause, .. }) => {
                let duration_ms = crate::talk::vad::duration_ms(&pcm);
                debug!(duration_ms, ?pause, "utterance");
                metrics::counter!("worker_utterances_total").increment(1);
                match pause {
                    // Its pause's audio is recognised already; this copy is for a retry.
                    Some(p) => {
                        if self.heard.ended.len() >= crate::dialogue::MAX_PENDING {
                            self.heard.ended.pop_front();
                        }
                        self.heard.ended.push_back((p, pcm));
                    }
                    None => self.heard.utterance = Some(pcm),
                }
                self.dialogue.utterance_ended(duration_ms, pause);
            }
            Hearing::Failed(e) => {
                warn!(error = %e, "voice input stopped");
                self.hearing = None;
                self.event(ServerEvent::error(
                    ErrorCode::TalkFailed,
                    format!("voice input stopped: {e}"),
                ))
                .await;
            }
        }
    }

    async fn on_talk(&mut self, ev: TalkEvent) {
        match ev {
            TalkEvent::Transcript { job, text } => {
                if matches!(job, Job::Partial(_)) {
                    debug!(?job, chars = text.trim().chars().count(), "heard so far");
                } else {
                    info!(?job, chars = text.trim().chars().count(), "heard");
                }
                self.dialogue.heard(job, &text);
            }
            TalkEvent::TranscriptFailed { job, message } => {
                if !matches!(job, Job::Partial(_)) {
                    metrics::counter!("worker_talk_failures_total").increment(1);
                } else {
                    debug!(?job, %message, "recognition failed");
                }
                self.dialogue.not_heard(job, message);
            }
            TalkEvent::Text { turn, text } => {
                self.transcript.delta(turn, &text);
                self.dialogue.answer_text(turn, text);
            }
            TalkEvent::Done {
                turn,
                user,
                answer,
                spoken,
            } => {
                if let Some(answer) = &answer {
                    self.transcript.answer(turn, answer);
                }
                self.dialogue.answer_done(turn, user, answer, spoken);
            }
            TalkEvent::Failed { turn, message } => {
                metrics::counter!("worker_talk_failures_total").increment(1);
                self.dialogue.answer_failed(turn, &message);
            }
        }
    }

    /// Start a backend's turn on the conversation.
    fn begin(&mut self, start: Start<AudioIn>) -> Result<u64, crate::talk::limits::Refusal> {
        use avatar_proto::api::SayMode;
        let conv = self.conv.as_mut().ok_or(crate::talk::limits::Refusal::NotReady)?;
        let now = chrono::Utc::now();
        let (turn, user, answer) = match start.said {
            Said::Text { text, mode } => {
                let turn = conv.speak(Some(start.turn), text.clone(), mode)?;
                match mode {
                    SayMode::Repeat => (turn, None, Some(text)),
                    SayMode::Chat => (turn, Some(text), None),
                }
            }
            Said::Audio(audio) => (conv.play(Some(start.turn), audio)?, None, None),
        };
        if let Some(user) = user {
            let user = self.transcript.user(turn, &user, Source::Api, now, now);
            self.note(user);
        }
        self.transcript.asked(turn, Source::Api, answer, now);
        self.dialogue.began(turn);
        Ok(turn)
    }

    /// A command from the session API ([`crate::api`]); `Some` when it ends the session.
    fn on_command(&mut self, request: crate::api::Request) -> Option<End> {
        use avatar_proto::api::{Command, Reply};
        let crate::api::Request { command, reply, audio } = request;
        if reply.is_closed() {
            return None; // the caller gave up waiting (and was told `busy`): do not act late
        }
        let (answer, end) = match command {
            Command::List {} | Command::Get { .. } => (Reply::Session { session: self.info() }, None),
            // The API serves transcripts from the worker's store; asked here, the same answer.
            Command::Transcript { .. } => {
                let turns = self.ctx.transcripts.get(&self.about.session_id).unwrap_or_default();
                (Reply::Transcript { turns }, None)
            }
            Command::Say { say, .. } => {
                let said = Said::Text {
                    text: say.text,
                    mode: say.mode,
                };
                (self.api_turn(said, say.interrupt), None)
            }
            Command::Audio { interrupt, .. } => match audio {
                Some(audio) => {
                    let upload = audio.upload.clone();
                    let reply = self.api_turn(Said::Audio(audio), interrupt);
                    if matches!(reply, Reply::Turn { .. }) {
                        self.upload = Some(upload);
                    }
                    (reply, None)
                }
                None => (
                    Reply::Refused {
                        code: ErrorCode::BadJson.as_str().into(),
                        message: "an audio command without its audio".into(),
                    },
                    None,
                ),
            },
            Command::Interrupt { .. } => {
                let interrupted = self.dialogue.api_interrupt();
                (Reply::Interrupted { interrupted }, None)
            }
            Command::End { .. } => {
                info!("ended by the session API");
                let event = ServerEvent::error(ErrorCode::SessionEnded, "the service ended this session");
                let end = End::Tell {
                    event: Some(event),
                    reason: "ended by the session API",
                };
                (Reply::Ended {}, Some(end))
            }
        };
        let _ = reply.send(answer);
        end
    }

    /// The session API's say or audio: start it, or queue it behind the answer in progress
    /// (the dialogue decides; see [`crate::dialogue::Dialogue::say`]).
    fn api_turn(&mut self, said: Said<AudioIn>, interrupt: bool) -> avatar_proto::api::Reply {
        use avatar_proto::api::Reply;
        let now = Conditions {
            ready: self.conv.as_ref().is_some_and(|c| c.ready()),
            // One upload at a time: each holds a tunnel stream.
            uploading: self.upload.as_ref().is_some_and(|u| u.upgrade().is_some()),
        };
        let kind = match &said {
            Said::Text { mode, .. } => format!("{mode:?}"),
            Said::Audio(a) => format!("audio at {} Hz", a.rate),
        };
        let conv = &mut self.conv;
        let next_turn = || conv.as_mut().map_or(0, |c| c.reserve_turn());
        match self.dialogue.say(said, interrupt, now, next_turn) {
            Err(refused) => Reply::Refused {
                code: refused.code().to_owned(),
                message: refused.to_string(),
            },
            Ok(Say::Queued { turn, ahead }) => {
                info!(turn, ahead, %kind, "queued behind the answer in progress");
                Reply::Turn { turn, queued: true }
            }
            Ok(Say::Now(start)) => match self.begin(start) {
                Ok(turn) => {
                    info!(turn, %kind, "saying for the session API");
                    metrics::counter!("worker_api_says_total").increment(1);
                    Reply::Turn { turn, queued: false }
                }
                Err(refusal) => Reply::Refused {
                    code: refusal.code().as_str().to_owned(),
                    message: refusal.to_string(),
                },
            },
        }
    }

    /// This session as the session API lists it.
    fn info(&self) -> avatar_proto::api::SessionInfo {
        let state = match (&self.active, self.dialogue.busy()) {
            (None, _) => "connecting",
            (Some(a), _) if a.media.is_none() => "connecting",
            (_, true) => "speaking",
            (_, false) => "idle",
        };
        avatar_proto::api::SessionInfo {
            session_id: self.about.session_id.clone(),
            avatar_id: self.about.avatar_id.clone(),
            worker_id: self.ctx.config.worker_id.clone(),
            user_id: self.about.user_id.clone(),
            started_at: self.about.started_at.clone(),
            state: state.into(),
        }
    }

    async fn on_clock(&mut self, ev: ClockEvent) {
        let event = match ev {
            ClockEvent::SpeechStarted { turn } => return self.dialogue.speech_started(turn),
            ClockEvent::SpeechEnded { turn, interrupted } => return self.dialogue.speech_ended(turn, interrupted),
            ClockEvent::Quality(t) => {
                debug!(
                    estimate_kbps = t.estimate_bps / 1000,
                    video_kbps = t.video_bps / 1000,
                    fps = t.level.fps,
                    height = t.level.height,
                    "video quality"
                );
                ServerEvent::VideoQuality {
                    estimate_kbps: t.estimate_bps / 1000,
                    bitrate_kbps: t.video_bps / 1000,
                    max_bitrate_kbps: u64::from(self.ctx.encoder_settings.bitrate_kbps),
                    level: t.level.index as u32,
                    fps: t.level.fps,
                    width: t.level.width,
                    height: t.level.height,
                }
            }
        };
        self.event(event).await;
    }

    fn start_media(&mut self, clip: &Arc<crate::media::avatar::AvatarClip>) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        if active.media.is_some() {
            return;
        }
        let (tx, rx) = mpsc::channel::<MediaOut>(12);
        let (clock_tx, clock_rx) = mpsc::unbounded_channel();
        let events = clock_tx.clone();
        let feed = match self.conv.as_mut() {
            Some(conv) => conv.feed(clock_tx),
            None => Feed {
                units: std::sync::mpsc::sync_channel(0).1,
                current_turn: Default::default(),
                idle_index: Default::default(),
                events: clock_tx,
            },
        };
        self.clock_events = Some(clock_rx);
        // Each session follows its own viewer's bandwidth, with its own encoder, at its avatar's
        // size.
        let settings = &self.ctx.encoder_settings.at_size(clip.size());
        let cfg = &self.ctx.config.video.adapt;
        let (control, first, min_keyframe_interval) = if cfg.enabled {
            let mut rc = RateControl::new(
                cfg,
                settings.bitrate_kbps,
                settings.width,
                settings.height,
                settings.fps,
            );
            let first = rc.target(std::time::Instant::now());
            (Some(rc), first, Duration::from_millis(cfg.min_keyframe_interval_ms))
        } else {
            let fixed = Target::fixed(settings.bitrate_kbps, settings.fps, settings.width, settings.height);
            (None, fixed, Duration::from_millis(cfg.min_keyframe_interval_ms))
        };
        let (targets_tx, targets) = watch::channel(first);
        let backlog = Arc::new(std::sync::atomic::AtomicU64::new(0));
        let adapt = Adaptation {
            targets,
            min_keyframe_interval,
            backlog: Arc::clone(&backlog),
        };
        self.taps.attach(Arc::clone(&active.peer.keyframe));
        let stream = match VideoStream::start(
            Arc::clone(clip),
            self.ctx.encoder,
            settings.clone(),
            Arc::clone(&active.peer.keyframe),
            Sinks {
                viewer: tx,
                taps: self.taps.clone(),
            },
            feed,
            adapt,
        ) {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "could not start the video thread");
                return;
            }
        };
        let writer = tokio::spawn(send_media(SendParts {
            peer: Arc::clone(&active.peer),
            media: rx,
            // A peer answered once has its feedback; a second start (never) would send blind.
            feedback: active.feedback.take().unwrap_or_else(|| mpsc::channel(1).1),
            control,
            targets: targets_tx,
            keyframe: Arc::clone(&active.peer.keyframe),
            events,
            backlog,
        }));
        info!("peer connected: streaming");
        active.media = Some((stream, writer));
        // Voice input, when the browser sends its microphone and the worker has a VAD model.
        // Not while speech recognition cannot be reached; the page hears which, as it hides or
        // offers Talk by it.
        let hears = self.ctx.talk.as_ref().is_some_and(|t| t.hears());
        self.dialogue.hearing(hears);
        let voice = (self.ctx.talk.as_ref())
            .filter(|_| hears)
            .and_then(|t| t.vad.model.clone().map(|m| (t, m)));
        if let (Some((talk, model)), Some(conv), Some(mic)) = (voice, self.conv.as_ref(), active.mic.take()) {
            let (tx, rx) = mpsc::unbounded_channel();
            let stop = CancellationToken::new();
            self.words = Arc::default();
            self.pauses_from += 1 << 32;
            crate::talk::hearing::listen(
                crate::talk::hearing::Voice {
                    model,
                    onnxruntime: talk.onnxruntime.clone(),
                    vad: talk.vad.clone(),
                    partial_ms: talk.partial_ms(),
                    pauses_from: self.pauses_from,
                },
                mic,
                conv.current_turn(),
                Arc::clone(&self.words),
                tx,
                stop.clone(),
            );
            active._listening = Some(stop.drop_guard());
            self.hearing = Some(rx);
        }
    }

    /// With `[recording] enabled`: join the session's media as the `recording` sink, written to
    /// its file by [`crate::media::record`] until the session ends.
    fn start_recording(
        &mut self,
        (width, height): (u32, u32),
    ) -> Option<tokio::task::JoinHandle<Result<Recording, RecordError>>> {
        let config = &self.ctx.config.recording;
        if !config.enabled {
            return None;
        }
        let free_mb = rustix::fs::statvfs(&config.dir)
            .map(|s| s.f_bavail.saturating_mul(s.f_frsize) / 1_000_000)
            .unwrap_or(0);
        if free_mb < config.min_free_mb {
            metrics::counter!("worker_recordings_skipped_total", "reason" => "disk_full").increment(1);
            warn!(free_mb, min_free_mb = config.min_free_mb, dir = %config.dir.display(), "not recording this session: too little free space (recording.min_free_mb)");
            return None;
        }
        let media = self.taps.join("recording", config.buffer_packets);
        let spec = RecordingSpec {
            path: config.dir.join(crate::media::record::file_name(
                &self.about.session_id,
                std::time::SystemTime::now(),
            )),
            width,
            height,
        };
        Some(tokio::spawn(
            crate::media::record::record(media, spec).instrument(tracing::Span::current()),
        ))
    }

    /// The media has stopped: let the recorder finish its file, and tell the relay.
    async fn finish_recording(&mut self, recording: tokio::task::JoinHandle<Result<Recording, RecordError>>) {
        // The last sender of the recorder's channel goes with the session's list of sinks.
        self.taps = Taps::default();
        match recording.await {
            Ok(Ok(done)) => {
                info!(file = %done.path.display(), duration_s = done.duration_s, bytes = done.bytes, "recording complete");
                metrics::counter!("worker_recordings_total").increment(1);
                metrics::counter!("worker_recording_bytes_total").increment(done.bytes);
                if self.records && !self.detached {
                    let ready = avatar_proto::tunnel::RecordingReady {
                        file: done.path.display().to_string(),
                        worker: self.ctx.config.worker_id.clone(),
                        duration_s: (done.duration_s * 1000.0).round() / 1000.0,
                        bytes: done.bytes,
                        sha256: done.sha256,
                    };
                    if self.outbox.send(Output::Recording(ready)).await.is_err() {
                        self.detached = true;
                    }
                }
            }
            Ok(Err(RecordError::Empty)) => debug!("nothing recorded: the session never played"),
            Ok(Err(e)) => {
                metrics::counter!("worker_recording_failures_total").increment(1);
                warn!(error = %e, "the session's recording failed");
            }
            Err(e) => warn!(error = %e, "the recorder stopped"),
        }
    }

    /// Answers cut before they ended (an interrupt, a barge-in, a new message or peer): each
    /// but `keep` is complete now, as interrupted. (The clock reports the end only of an answer
    /// that was playing; one still being written would otherwise wait for the session's end.)
    fn cut(&mut self, keep: Option<u64>) {
        for turn in self.transcript.cut_except(keep, chrono::Utc::now()) {
            self.note(Some(turn));
        }
    }

    /// A complete turn (if any): into the worker's transcripts, and for the relay if it asked.
    fn note(&mut self, turn: Option<TranscriptTurn>) {
        let Some(turn) = turn else { return };
        self.ctx.transcripts.push(&self.about.session_id, turn.clone());
        if self.records {
            self.finished.push(turn);
        }
    }

    /// Send the relay the complete turns it has not had.
    async fn send_records(&mut self) {
        for turn in std::mem::take(&mut self.finished) {
            if self.detached {
                return;
            }
            if self.outbox.send(Output::Record(turn)).await.is_err() {
                self.detached = true;
            }
        }
    }

    async fn event(&mut self, ev: ServerEvent) {
        if self.detached {
            return;
        }
        if self.outbox.send(Output::Event(ev)).await.is_err() {
            self.detached = true; // the link could not write: the tunnel is gone
        }
    }

    async fn close(&mut self, reason: &str) {
        if self.detached {
            return;
        }
        let _ = self.outbox.send(Output::Close { reason: reason.into() }).await;
    }
}
