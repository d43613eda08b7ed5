//! The avatar-edge worker: the GPU box's side.
//!
//! It dials out to one or more relays over QUIC ([`tunnel`]) — no inbound port needed — and serves
//! each browser session the relay hands it ([`session`]): a WebRTC peer ([`rtc`]) that answers the
//! browser's offer with every candidate inside, then streams the avatar as H.264 from a per-session
//! media clock ([`media`]); on `text_webrtc` the talking pipeline ([`talk`]) turns the answer into
//! speech and lip-synced frames that the clock plays. What each session says is kept turn by turn
//! ([`transcript`]) for the session API and the relay's webhooks, and with `[recording]` its media
//! is written, as sent, to a file ([`media::record`]).
//!
//! Driving it: [`Worker::new`] does the slow start-up work once (FFmpeg, choosing NVENC or x264,
//! decoding or drawing the idle avatars, the WebRTC engine); [`Worker::run`] keeps a tunnel to every
//! configured relay until told to [`Stop`]: first it drains (no new session, the live ones play on
//! until they end), then it ends what is left, each browser told.

pub mod api;
pub mod config;
pub mod dialogue;
pub mod media;
pub mod prepare;
pub mod rtc;
pub mod selftest;
pub mod session;
pub mod talk;
pub mod transcript;
pub mod tunnel;

use config::WorkerConfig;
use media::avatar::AvatarClip;
use media::encoder::EncoderSettings;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

#[derive(Debug, thiserror::Error)]
pub enum WorkerError {
    #[error("configuration: {0}")]
    Config(#[from] config::ConfigError),
    #[error("FFmpeg: {0}")]
    Ffmpeg(#[from] ffmpeg_next::Error),
    #[error("video encoder: {0}")]
    Encoder(#[from] media::encoder::EncodeError),
    #[error("avatars: {0}")]
    Avatar(#[from] media::avatar::AvatarError),
    #[error("WebRTC: {0}")]
    Rtc(#[from] rtc::RtcError),
    #[error("talking pipeline: {0}")]
    Talk(#[from] talk::TalkError),
    #[error("recording.dir {path}: {source}")]
    RecordingDir { path: String, source: std::io::Error },
}

/// The idle avatars this worker serves.
pub struct Avatars {
    by_id: HashMap<String, Arc<AvatarClip>>,
    fallback: Arc<AvatarClip>,
    /// True when the built-in avatar serves every avatar id.
    any_id: bool,
    /// A small JPEG of each avatar's first frame, base64, by id (the chooser's picture).
    previews: std::collections::BTreeMap<String, String>,
}

impl Avatars {
    /// The clip for `avatar_id`, or the fallback.
    pub fn get(&self, avatar_id: Option<&str>) -> Arc<AvatarClip> {
        avatar_id
            .and_then(|id| self.by_id.get(id))
            .cloned()
            .unwrap_or_else(|| Arc::clone(&self.fallback))
    }

    /// Ids announced to the relay; empty means "any id".
    pub fn ids(&self) -> Vec<String> {
        if self.any_id {
            return Vec::new();
        }
        let mut ids: Vec<String> = self.by_id.keys().cloned().collect();
        ids.sort();
        ids
    }

    /// Previews of the announced ids, as the registration carries them.
    pub fn previews(&self) -> std::collections::BTreeMap<String, String> {
        self.previews.clone()
    }

    /// Display names of the announced ids (from each `avatar.toml`).
    pub fn names(&self) -> std::collections::BTreeMap<String, String> {
        if self.any_id {
            return Default::default();
        }
        self.by_id
            .iter()
            .map(|(id, clip)| (id.clone(), clip.name.clone()))
            .collect()
    }
}

/// The side of an avatar preview's longer edge, in pixels.
const PREVIEW_SIDE: u32 = 160;

/// A JPEG of each avatar's first frame, base64, in id order until the registration's budget
/// ([`avatar_proto::tunnel::MAX_AVATAR_PREVIEWS_TOTAL`]) is spent.
fn previews(by_id: &HashMap<String, Arc<AvatarClip>>) -> std::collections::BTreeMap<String, String> {
    use base64::Engine as _;
    let mut ids: Vec<&String> = by_id.keys().collect();
    ids.sort();
    let mut out = std::collections::BTreeMap::new();
    let mut total = 0;
    for id in ids {
        let Some(first) = by_id.get(id).and_then(|c| c.frames.first()) else {
            continue;
        };
        let even = |v: u32| (v / 2 * 2).max(2);
        let longer = first.width.max(first.height);
        let (w, h) = (
            even(first.width * PREVIEW_SIDE / longer),
            even(first.height * PREVIEW_SIDE / longer),
        );
        match media::file::jpeg(first, w, h) {
            Ok(jpeg) if jpeg.len() <= avatar_proto::tunnel::MAX_AVATAR_PREVIEW_LEN => {
                let encoded = base64::engine::general_purpose::STANDARD.encode(jpeg);
                total += encoded.len();
                if total > avatar_proto::tunnel::MAX_AVATAR_PREVIEWS_TOTAL {
                    warn!(%id, "too many avatars for previews in the registration: the rest have none");
                    break;
                }
                out.insert(id.clone(), encoded);
            }
            Ok(jpeg) => warn!(%id, bytes = jpeg.len(), "avatar preview too large; announced without one"),
            Err(e) => warn!(%id, error = %e, "no avatar preview"),
        }
    }
    out
}

/// Everything sessions share.
pub struct Context {
    pub config: WorkerConfig,
    pub rtc: rtc::RtcEngine,
    pub avatars: Avatars,
    pub encoder: &'static str,
    pub encoder_settings: EncoderSettings,
    /// The talking pipeline (None when `[talk] enabled = false`).
    pub talk: Option<Arc<talk::Talk>>,
    pub sessions: TaskTracker,
    /// The sessions running now, by id, for the session API.
    pub directory: Arc<api::Directory>,
    /// What was said in each session, for the session API (`[transcripts]`).
    pub transcripts: Arc<transcript::Transcripts>,
    /// Random per process, sent at registration: lets a relay tell this process moving its
    /// tunnel to another transport from a restarted worker with the same id.
    pub instance: String,
    pub tunnel_idle: Duration,
    pub tunnel_keepalive: Duration,
    /// Which trickled browser candidates sessions may add.
    pub candidates: rtc::CandidateFilter,
    /// Sessions running now, from every relay. The worker is the authority on its capacity;
    /// each tunnel reports changes to its relay ([`avatar_proto::tunnel::Control::Load`]).
    active: watch::Sender<u32>,
}

/// A held session slot; the slot returns on drop.
pub struct Slot<'a>(&'a watch::Sender<u32>);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        self.0.send_modify(|n| *n = n.saturating_sub(1));
    }
}

impl Context {
    /// Take a session slot if one is free: checked and taken under one lock, so two relays'
    /// sessions arriving at once can never both take the last slot.
    pub fn try_acquire(&self) -> Option<Slot<'_>> {
        let cap = self.config.capacity;
        self.active
            .send_if_modified(|n| {
                let free = *n < cap;
                if free {
                    *n += 1;
                }
                free
            })
            .then_some(Slot(&self.active))
    }

    pub fn active_sessions(&self) -> u32 {
        *self.active.borrow()
    }

    /// Changes of [`Context::active_sessions`], for reporting them.
    pub fn watch_load(&self) -> watch::Receiver<u32> {
        self.active.subscribe()
    }
}

/// How a running worker is stopped, in two steps (SIGTERM, then a second SIGTERM or the drain
/// limit, in `main`):
/// * `drain`: take no new session. Every tunnel tells its relay at once (`Control::Draining`), so
///   routing, `/readyz` and `relay_sessions_free` stop counting this worker; the live sessions play
///   on, and each tunnel closes when its last session ends.
/// * `end`: end the sessions that are left; each browser gets `worker_lost` ("shutting down").
///
/// Ending without draining first is allowed (it drains on the way).
#[derive(Debug, Clone, Default)]
pub struct Stop {
    pub drain: CancellationToken,
    pub end: CancellationToken,
}

/// Time the sessions get, once ended, to say goodbye to their browsers before the process exits.
const GOODBYE: Duration = Duration::from_secs(3);

/// A worker ready to run.
pub struct Worker {
    ctx: Arc<Context>,
}

impl Worker {
    /// Validate the config and do the start-up work. Call from a blocking context or
    /// `spawn_blocking`: decoding avatars and probing encoders take a moment.
    pub fn new(config: WorkerConfig) -> Result<Self, WorkerError> {
        config.validate()?;
        media::encoder::init()?;
        if config.recording.enabled {
            let dir = &config.recording.dir;
            let err = |source| WorkerError::RecordingDir {
                path: dir.display().to_string(),
                source,
            };
            std::fs::create_dir_all(dir).map_err(err)?;
            // Writable now, not at the first session's end.
            let probe = dir.join(format!(".probe-{}", std::process::id()));
            std::fs::write(&probe, b"").map_err(err)?;
            let _ = std::fs::remove_file(&probe);
            info!(dir = %config.recording.dir.display(), "recording every session");
        }
        let v = &config.video;
        let encoder_settings = EncoderSettings::from(v);
        let encoder = media::encoder::select_encoder(v.encoder, &encoder_settings)?;
        let avatars = match &config.avatar_dir {
            Some(dir) => {
                let clips = media::avatar::load_dir(dir, v.fps)?;
                for c in &clips {
                    let (width, height) = c.size();
                    info!(id = %c.id, name = %c.name, frames = c.frames.len(), width, height, "avatar loaded");
                }
                let by_id: HashMap<_, _> = clips.into_iter().map(|c| (c.id.clone(), Arc::new(c))).collect();
                // Sorted so the fallback does not depend on hash order; `load_dir` never returns empty.
                let mut ids: Vec<&String> = by_id.keys().collect();
                ids.sort();
                let fallback = ids
                    .first()
                    .and_then(|id| by_id.get(*id))
                    .cloned()
                    .unwrap_or_else(|| Arc::new(media::avatar::synthetic(v.width, v.height, v.fps)));
                let previews = previews(&by_id);
                Avatars {
                    by_id,
                    fallback,
                    any_id: false,
                    previews,
                }
            }
            None => {
                info!("no avatar_dir: using the built-in synthetic avatar for every avatar id");
                let clip = Arc::new(media::avatar::synthetic(v.width, v.height, v.fps));
                Avatars {
                    by_id: HashMap::new(),
                    fallback: clip,
                    any_id: true,
                    previews: Default::default(),
                }
            }
        };
        let rtc = rtc::RtcEngine::new(&rtc::RtcSettings {
            include_loopback: config.ice.include_loopback,
            public_ips: config.ice.public_ips.clone(),
            udp_ports: config.ice.udp_port_min.zip(config.ice.udp_port_max),
        })?;
        if config.ice.include_loopback {
            warn!("ICE loopback candidates are on: fine for tests and a single-host demo, not for production");
        }
        let talk = if config.talk.enabled {
            Some(Arc::new(talk::Talk::new(&config.talk, v.fps)?))
        } else {
            info!("talking pipeline disabled: text_webrtc is answered with `unsupported`");
            None
        };
        let ctx = Context {
            candidates: rtc::CandidateFilter::new(
                &config.ice.allow_candidate_ranges,
                config.ice.include_loopback,
                config.ice.max_remote_candidates,
            ),
            talk,
            rtc,
            avatars,
            encoder,
            encoder_settings,
            sessions: TaskTracker::new(),
            directory: Default::default(),
            transcripts: Arc::new(transcript::Transcripts::new(config.transcripts.clone())),
            instance: hex::encode(rand::random::<[u8; 8]>()),
            tunnel_idle: Duration::from_secs(3),
            tunnel_keepalive: Duration::from_secs(1),
            active: watch::Sender::new(0),
            config,
        };
        Ok(Self { ctx: Arc::new(ctx) })
    }

    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Keep tunnels to every relay until `stop.drain`; then wait up to `drain_limit` for the live
    /// sessions to end on their own (or until `stop.end`), end what is left, and return once the
    /// sessions have said goodbye.
    pub async fn run(self, stop: Stop, drain_limit: Duration) {
        let tunnels = TaskTracker::new();
        let recording = &self.ctx.config.recording;
        if recording.enabled && recording.retention_days > 0 {
            let (dir, keep) = (
                recording.dir.clone(),
                Duration::from_secs(u64::from(recording.retention_days) * 86_400),
            );
            tunnels.spawn(sweep_recordings(dir, keep, stop.end.clone()));
        }
        if let Some(talk) = &self.ctx.talk {
            // Before the first session: whether its page may offer Talk.
            talk.check_hearing(true).await;
            tunnels.spawn(Arc::clone(talk).watch_hearing(stop.end.clone()));
        }
        for target in self.ctx.config.relays.clone() {
            tunnels.spawn(tunnel::maintain(target, Arc::clone(&self.ctx), stop.clone()));
        }
        tunnels.close();
        tokio::select! {
            _ = stop.drain.cancelled() => {}
            _ = stop.end.cancelled() => stop.drain.cancel(),
        }
        let active = self.ctx.active_sessions();
        if !stop.end.is_cancelled() && active > 0 {
            info!(
                active,
                limit_s = drain_limit.as_secs(),
                "draining: no new sessions; the live ones play on until they end (a second stop signal ends them)"
            );
            let mut load = self.ctx.watch_load();
            tokio::select! {
                _ = load.wait_for(|n| *n == 0) => info!("drained: the last session ended"),
                _ = tokio::time::sleep(drain_limit) => warn!(
                    active = self.ctx.active_sessions(),
                    "drain limit reached: ending the sessions that are left"
                ),
                _ = stop.end.cancelled() => warn!(
                    active = self.ctx.active_sessions(),
                    "stop signal while draining: ending the sessions that are left"
                ),
            }
        }
        stop.end.cancel();
        tunnels.wait().await;
        self.ctx.sessions.close();
        if tokio::time::timeout(GOODBYE, self.ctx.sessions.wait()).await.is_err() {
            warn!(
                active = self.ctx.active_sessions(),
                "sessions did not end within {GOODBYE:?} of being ended"
            );
        }
        info!("worker stopped");
    }
}

/// Delete recordings older than `keep` from `dir`, at start and hourly, until `stop`.
async fn sweep_recordings(dir: std::path::PathBuf, keep: Duration, stop: tokio_util::sync::CancellationToken) {
    let mut hourly = tokio::time::interval(Duration::from_secs(3600));
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = hourly.tick() => {}
        }
        let dir = dir.clone();
        match tokio::task::spawn_blocking(move || media::record::sweep(&dir, keep)).await {
            Ok(Ok(0)) => {}
            Ok(Ok(n)) => info!(deleted = n, "expired recordings deleted (recording.retention_days)"),
            Ok(Err(e)) => warn!(error = %e, "could not sweep expired recordings"),
            Err(e) => warn!(error = %e, "the recordings sweep stopped"),
        }
    }
}
