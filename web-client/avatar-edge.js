// @ts-check
/**
 * avatar-edge.js: talk to an avatar-edge relay from any web page. No dependencies, no build step:
 *
 * ```js
 * import { connect } from 'https://relay.example.com/avatar-edge.js';
 * const session = await connect({ url: 'https://relay.example.com', avatarId: 'tutor', video });
 * session.on('assistant_text', (t) => console.log(t.turn, t.full));
 * session.say('Hello!');
 * ```
 *
 * What it does for you:
 * - the right offer: receive-only video and audio transceivers *before* `createOffer()` (a page
 *   that forgets them sends an offer with no media, the bug of the old test page);
 * - fresh STUN/TURN servers from `/api/ice-servers`, and trickled candidates;
 * - **reconnects by itself**: when the socket drops (a relay restart, a network change) or the
 *   worker goes away, it opens a new socket and negotiates again, with backoff, and keeps the old
 *   video playing until the new one is live. It stops on `unauthorized`, and on `close()`;
 * - retries `busy` and `no_worker` with backoff (the page may offer "retry now": `retry()`);
 * - **voice**: `startMicrophone()` sends the microphone in the same connection (with the browser's
 *   echo cancellation, noise suppression and gain control); the worker hears when the user speaks,
 *   recognises it, and answers as if it had been typed. Speaking over the avatar interrupts it.
 *
 * The wire protocol it speaks is documented in docs/integration.md.
 */

/**
 * @typedef {object} ConnectOptions
 * @property {string} [url] The relay's base URL (`https://relay.example.com`); default: this page's origin.
 * @property {string} [avatarId] Which avatar to talk to.
 * @property {string} [token] Sent as `?token=` on the socket and the ICE-server request, for the relay's auth policy.
 * @property {string} [userId] Sent as `user_id` (an auth policy may overrule it).
 * @property {HTMLVideoElement} [video] Where the avatar plays (video and audio).
 * @property {Record<string, string>} [query] Extra query parameters for the relay's policies.
 * @property {boolean} [reconnect] Reconnect after a lost socket or worker (default true).
 * @property {boolean} [voice] Offer to send a microphone (audio `sendrecv`) from the start, so that
 *   `startMicrophone()` needs no new negotiation (default false; `startMicrophone()` turns it on).
 * @property {'all' | 'relay'} [iceTransportPolicy] `'relay'`: media only through the relay's TURN
 *   server, never a direct path, so the GPU box never learns the user's address (default `'all'`).
 * @property {boolean} [warmAudio] Start the browser's audio output while the socket opens (default
 *   true). The first stream with sound a page plays otherwise holds its main thread for about 50 ms
 *   (Chromium starts its audio process) just as the first frame arrives. It is an `AudioContext`
 *   created and closed at once: it plays nothing (without a click, Chromium's console notes it
 *   "was not allowed to start").
 */

/**
 * @typedef {'connecting' | 'negotiating' | 'live' | 'reconnecting' | 'waiting' | 'failed' | 'closed'} SessionState
 * `waiting`: no worker is free (`busy`, `no_worker`); the SDK retries with backoff.
 * `failed`: refused for good (`unauthorized`); `closed`: `close()` was called.
 */

/**
 * @typedef {object} AssistantText
 * @property {number} turn Numbers the answers of a session.
 * @property {string} text This piece (a delta), or the whole answer when `final`.
 * @property {boolean} final
 * @property {string} full The answer so far.
 */

/**
 * @typedef {object} SessionError
 * @property {string} code `busy`, `no_worker`, `unauthorized`, `worker_lost`, `talk_failed`, …
 * @property {string} message
 * @property {boolean} retrying The SDK tries again by itself.
 */

/**
 * @typedef {object} SessionStats
 * @property {number | null} rttMs Round trip to the worker's media (ICE), ms.
 * @property {number} fps Frames decoded per second since the last call.
 * @property {number} bitrateKbps Video and audio received, kbit/s, since the last call.
 * @property {number} packetsLost
 * @property {number | null} jitterMs Video jitter, ms.
 * @property {number} framesDecoded
 * @property {number} frameWidth
 * @property {number} frameHeight
 * @property {string | null} localCandidateType `host`, `srflx`, `prflx` or `relay`.
 * @property {string | null} remoteCandidateType
 * @property {boolean} relayed Media goes through TURN.
 * @property {'good' | 'poor' | 'relayed' | 'none'} quality
 */

/**
 * @typedef {object} VideoQuality
 * @property {number} estimateKbps The worker's estimate of the path to this viewer (audio included).
 * @property {number} bitrateKbps The video bitrate it encodes at.
 * @property {number} maxBitrateKbps The bitrate it would use on a path with room to spare.
 * @property {number} level 0: the best picture; higher: fewer frames a second, then a smaller picture.
 * @property {number} fps The frame rate it sends.
 * @property {number} width
 * @property {number} height
 */

/**
 * @typedef {object} EventMap
 * @property {AssistantText} assistant_text
 * @property {{turn: number}} speech_started
 * @property {{turn: number, interrupted: boolean}} speech_ended
 * @property {{}} user_speech_started The worker heard the user start speaking (voice).
 * @property {{durationMs: number}} user_speech_ended The user stopped; the speech goes to recognition.
 * @property {{text: string, final: boolean}} user_transcript What the user said. While they speak,
 *   partial transcripts (`final: false`) come every few hundred ms, each the whole utterance so far
 *   (replace, do not append); the final one (`final: true`) is what the avatar answers.
 * @property {VideoQuality} video_quality What the worker sends as it follows this viewer's bandwidth.
 * @property {{voice: boolean}} features What the session's worker can do: `voice` false means it
 *   cannot hear the microphone now (no voice input, or its speech recognition is down): hide Talk.
 * @property {boolean} microphone The microphone went on (`true`) or off.
 * @property {SessionError} error
 * @property {SessionState} state
 * @property {Record<string, any>} event Every message from the relay, as it came (for a debug view).
 */

const RETRYABLE_OFFER_ERRORS = ['busy', 'no_worker'];
const RENEGOTIATE_ERRORS = ['worker_lost', 'peer_failed'];

/**
 * Start the browser's audio output now, once per page: an `AudioContext` created and closed.
 * Chromium starts its audio process for the first one, about 50 ms during which the page's main
 * thread waits; without this, that wait falls on the first frame. compat.js has the same function
 * for old pages: keep the two in step.
 */
function warmAudioOutput() {
  const g = /** @type {any} */ (globalThis);
  const Context = g.AudioContext || g.webkitAudioContext;
  if (!Context || g.avatarEdgeAudioWarmed) return;
  g.avatarEdgeAudioWarmed = true;
  try {
    new Context().close().catch(() => {});
  } catch {
    // No audio output (a machine without sound devices): nothing to start early.
  }
}

/**
 * Connect to the relay; resolves once the socket is open and the offer is on its way (listen to
 * `state` for `live`). Rejects when the first socket cannot be opened at all.
 * @param {ConnectOptions} [options]
 * @returns {Promise<Session>}
 */
export async function connect(options = {}) {
  const session = new Session(options);
  await session.start();
  return session;
}

export class Session {
  /** @param {ConnectOptions} options */
  constructor(options) {
    /** @type {ConnectOptions} */
    this.options = { reconnect: true, ...options };
    const base = new URL(options.url || globalThis.location.href);
    /** @private */
    this.base = base;
    /** @type {SessionState} */
    this.state = 'connecting';
    /** @type {string | null} */
    this.sessionId = null;
    /** @type {string | null} Which worker serves the session. */
    this.workerId = null;
    /** @type {boolean | null} Whether the worker hears the microphone (null: not said yet). */
    this.voice = null;
    /** @type {WebSocket | null} */
    this.socket = null;
    /** @type {RTCPeerConnection | null} */
    this.peer = null;
    /** @private @type {RTCPeerConnection | null} the previous peer, playing until the new one is live */
    this.previousPeer = null;
    /** @private @type {RTCIceServer[]} */
    this.iceServers = [];
    /** @private @type {Map<string, Set<(value: any) => void>>} */
    this.handlers = new Map();
    /** @private @type {Map<number, string>} */
    this.answers = new Map();
    /** @private @type {WeakMap<RTCPeerConnection, MediaStream>} what each peer receives */
    this.streams = new WeakMap();
    /** @private */
    this.attempt = 0;
    /** @private @type {ReturnType<typeof setTimeout> | null} */
    this.timer = null;
    /** @private @type {{at: number, frames: number, bytes: number} | null} */
    this.lastSample = null;
    /**
     * Round trips the SDK measured (ms): offer → answer, and a message → the first answer text;
     * `connect`: when each step of the latest connection came, in ms after its socket opened
     * (the offer sent, the answer, ICE and DTLS connected, the first video frame shown).
     */
    this.timing = {
      offerToAnswerMs: /** @type {number|null} */ (null),
      textToFirstTextMs: /** @type {number|null} */ (null),
      connect: /** @type {{offerMs: number|null, answerMs: number|null, connectedMs: number|null, firstFrameMs: number|null}} */ (
        { offerMs: null, answerMs: null, connectedMs: null, firstFrameMs: null }),
    };
    /** @private @type {number} when the latest socket opened (performance.now()) */ this.openedAt = 0;
    /** @private @type {number | null} */ this.offerSentAt = null;
    /** @type {MediaStreamTrack | null} The microphone, while it is on. */
    this.microphone = null;
    /** @private @type {number | null} */ this.textSentAt = null;
  }

  /**
   * Listen for an event; returns a function that stops listening.
   * @template {keyof EventMap} K
   * @param {K} name
   * @param {(value: EventMap[K]) => void} handler
   * @returns {() => void}
   */
  on(name, handler) {
    let set = this.handlers.get(name);
    if (!set) {
      set = new Set();
      this.handlers.set(name, set);
    }
    set.add(handler);
    return () => { set?.delete(handler); };
  }

  /**
   * Ask the avatar something; `false` when not connected right now (nothing is queued).
   * @param {string} text
   * @returns {boolean}
   */
  say(text) {
    const message = String(text).trim();
    if (!message) return false;
    this.textSentAt = performance.now();
    return this.send({
      type: 'text_webrtc',
      session_id: this.sessionId,
      user_id: this.userId(),
      avatar_id: this.options.avatarId,
      message,
    });
  }

  /**
   * Turn the microphone on: the user may now talk instead of typing (call it from a click: the
   * browser asks for permission). Rejects when the user or the browser refuses. Without the
   * `voice` option this negotiates once more, so the video reconnects briefly.
   * @returns {Promise<void>}
   */
  async startMicrophone() {
    if (this.microphone) return;
    const stream = await navigator.mediaDevices.getUserMedia({
      audio: { echoCancellation: true, noiseSuppression: true, autoGainControl: true, channelCount: 1 },
    });
    const track = stream.getAudioTracks()[0];
    if (!track) throw new Error('no microphone');
    this.microphone = track;
    const sender = this.audioSender();
    if (this.options.voice && sender) {
      await sender.replaceTrack(track);
    } else {
      this.options.voice = true;
      if (this.socket && this.socket.readyState === WebSocket.OPEN) this.negotiate();
    }
    this.emit('microphone', true);
  }

  /** Turn the microphone off (the connection stays as it is). */
  stopMicrophone() {
    const track = this.microphone;
    if (!track) return;
    this.microphone = null;
    this.audioSender()?.replaceTrack(null).catch(() => {});
    track.stop();
    this.emit('microphone', false);
  }

  /** Stop the current answer (speech, lip-sync and the text still coming). */
  interrupt() {
    return this.send({ type: 'interrupt' });
  }

  /** Try again now (after `busy` or `no_worker`, or while reconnecting). */
  retry() {
    if (this.state === 'closed' || this.state === 'failed') return;
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.attempt = 0;
    if (this.socket && this.socket.readyState === WebSocket.OPEN) this.negotiate();
    else this.openSocket().catch(() => this.scheduleReconnect());
  }

  /** End the session for good. */
  close() {
    this.setState('closed');
    this.stopMicrophone();
    this.teardown();
  }

  /**
   * Connection numbers for a quality badge or panel.
   * @returns {Promise<SessionStats>}
   */
  async stats() {
    /** @type {SessionStats} */
    const out = {
      rttMs: null, fps: 0, bitrateKbps: 0, packetsLost: 0, jitterMs: null, framesDecoded: 0,
      frameWidth: 0, frameHeight: 0, localCandidateType: null, remoteCandidateType: null,
      relayed: false, quality: 'none',
    };
    if (!this.peer) return out;
    const report = await this.peer.getStats();
    let bytes = 0;
    /** @type {string | null} */
    let pairId = null;
    report.forEach((s) => {
      if (s.type === 'transport' && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId;
    });
    report.forEach((s) => {
      if (s.type === 'inbound-rtp') {
        bytes += s.bytesReceived || 0;
        out.packetsLost += s.packetsLost || 0;
        if (s.kind === 'video') {
          out.framesDecoded = s.framesDecoded || 0;
          out.frameWidth = s.frameWidth || 0;
          out.frameHeight = s.frameHeight || 0;
          if (typeof s.jitter === 'number') out.jitterMs = s.jitter * 1000;
        }
      }
      if (!pairId && s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pairId = s.id;
    });
    const pair = pairId ? report.get(pairId) : null;
    if (pair) {
      if (typeof pair.currentRoundTripTime === 'number') out.rttMs = pair.currentRoundTripTime * 1000;
      const local = report.get(pair.localCandidateId);
      const remote = report.get(pair.remoteCandidateId);
      out.localCandidateType = (local && local.candidateType) || null;
      out.remoteCandidateType = (remote && remote.candidateType) || null;
      out.relayed = out.localCandidateType === 'relay' || out.remoteCandidateType === 'relay';
    }
    const now = performance.now();
    const last = this.lastSample;
    if (last && now > last.at) {
      const seconds = (now - last.at) / 1000;
      out.fps = Math.max(0, (out.framesDecoded - last.frames) / seconds);
      out.bitrateKbps = Math.max(0, ((bytes - last.bytes) * 8) / 1000 / seconds);
    }
    this.lastSample = { at: now, frames: out.framesDecoded, bytes };
    if (out.framesDecoded > 0) {
      const poor = (out.rttMs !== null && out.rttMs > 400) || (last !== null && out.fps < 15)
        || (out.jitterMs !== null && out.jitterMs > 60);
      out.quality = poor ? 'poor' : out.relayed ? 'relayed' : 'good';
    }
    return out;
  }

  // ---- inside ----

  /**
   * Open the first socket and send the offer; `connect()` calls it. Rejects when the relay cannot
   * be reached, and then keeps trying in the background (unless `reconnect: false`); `close()`
   * stops it.
   */
  async start() {
    try {
      await this.openSocket();
    } catch (e) {
      this.scheduleReconnect();
      throw e;
    }
  }

  /** @private The current peer's audio sender (where the microphone goes). */
  audioSender() {
    const t = this.peer?.getTransceivers().find((x) => x.receiver.track.kind === 'audio');
    return t ? t.sender : null;
  }

  /** @private */
  userId() {
    return this.options.userId || 'web-user';
  }

  /** @private @param {string} path */
  url(path) {
    const u = new URL(path, this.base);
    const q = new URLSearchParams(this.options.query || {});
    if (this.options.token) q.set('token', this.options.token);
    u.search = q.toString();
    return u;
  }

  /** @private @param {SessionState} state */
  setState(state) {
    if (this.state === state) return;
    this.state = state;
    this.emit('state', state);
  }

  /** @private @param {string} name @param {any} value */
  emit(name, value) {
    const set = this.handlers.get(name);
    if (!set) return;
    for (const handler of [...set]) {
      try { handler(value); } catch (e) { console.error(`avatar-edge: a ${name} handler threw`, e); }
    }
  }

  /** @private @param {Record<string, any>} message */
  send(message) {
    if (!this.socket || this.socket.readyState !== WebSocket.OPEN) return false;
    this.socket.send(JSON.stringify(message));
    return true;
  }

  /** @private */
  async fetchIceServers() {
    try {
      const r = await fetch(this.url('/api/ice-servers'), { cache: 'no-store' });
      if (r.ok) this.iceServers = (await r.json()).ice_servers || [];
    } catch { /* no list: direct and server-reflexive candidates still work */ }
  }

  /** @private */
  async openSocket() {
    if (this.state === 'closed' || this.state === 'failed') return;
    const iceServers = this.fetchIceServers();
    // While the request is out (a round trip): the audio output's start is then off the path
    // from the answer to the first frame.
    if (this.options.warmAudio !== false) warmAudioOutput();
    await iceServers;
    const rnd = globalThis.crypto && crypto.randomUUID ? crypto.randomUUID() : String(Math.random()).slice(2);
    this.sessionId = `web-${rnd}`;
    this.voice = null; // the next worker says again
    const u = this.url(`/ws/${encodeURIComponent(this.sessionId)}`);
    u.protocol = u.protocol === 'https:' ? 'wss:' : 'ws:';
    const socket = new WebSocket(u);
    this.socket = socket;
    await new Promise((resolve, reject) => {
      socket.onopen = () => resolve(undefined);
      socket.onerror = () => reject(new Error(`cannot reach ${u.host}`));
    });
    socket.onerror = null;
    this.openedAt = performance.now();
    this.timing.connect = { offerMs: null, answerMs: null, connectedMs: null, firstFrameMs: null };
    socket.onmessage = (e) => this.onMessage(e.data);
    socket.onclose = () => {
      if (this.socket !== socket) return;
      this.socket = null;
      this.scheduleReconnect();
    };
    this.negotiate();
  }

  /** @private */
  negotiate() {
    this.setState(this.previousPeer || this.state === 'reconnecting' ? 'reconnecting' : 'negotiating');
    if (this.peer) {
      // Keep it playing until the new one is live.
      this.closePeer(this.previousPeer);
      this.previousPeer = this.peer;
      this.peer = null;
    }
    const peer = new RTCPeerConnection({
      iceServers: this.iceServers,
      iceTransportPolicy: this.options.iceTransportPolicy === 'relay' ? 'relay' : 'all',
    });
    this.peer = peer;
    // The fix the old test page lacked: without these the offer has no media sections.
    peer.addTransceiver('video', { direction: 'recvonly' });
    // With voice the same audio section carries the microphone (sendrecv), on or off.
    if (this.options.voice) peer.addTransceiver(this.microphone || 'audio', { direction: 'sendrecv' });
    else peer.addTransceiver('audio', { direction: 'recvonly' });
    this.streams.set(peer, new MediaStream());
    peer.ontrack = (event) => this.attachTrack(peer, event);
    peer.onicecandidate = (event) => {
      if (event.candidate && event.candidate.candidate) {
        this.send({ type: 'webrtc_ice_candidate', user_id: this.userId(), candidate: event.candidate.toJSON() });
      }
    };
    peer.onconnectionstatechange = () => {
      if (peer !== this.peer) return;
      if (peer.connectionState === 'connected') {
        this.timing.connect.connectedMs ??= this.sinceOpen();
        this.attempt = 0;
        this.show(peer);
        this.closePeer(this.previousPeer);
        this.previousPeer = null;
        this.setState('live');
      } else if (peer.connectionState === 'failed') {
        this.scheduleRenegotiate();
      }
    };
    peer.createOffer()
      .then((offer) => peer.setLocalDescription(offer).then(() => offer))
      .then((offer) => {
        this.offerSentAt = performance.now();
        this.timing.connect.offerMs = this.sinceOpen();
        this.send({
          type: 'webrtc_offer',
          session_id: this.sessionId,
          user_id: this.userId(),
          avatar_id: this.options.avatarId,
          sdp: offer.sdp,
        });
      })
      .catch((e) => this.emit('error', { code: 'client', message: String(e), retrying: false }));
  }

  /** @private @param {RTCPeerConnection} peer @param {RTCTrackEvent} event */
  attachTrack(peer, event) {
    const stream = this.streams.get(peer);
    if (!stream) return;
    if (!stream.getTracks().includes(event.track)) stream.addTrack(event.track);
    // The first session shows at once; a reconnect's stream replaces the old one once it is live.
    const video = this.options.video;
    if (video && !video.srcObject) this.show(peer);
  }

  /** @private @param {RTCPeerConnection} peer */
  show(peer) {
    const video = this.options.video;
    const stream = this.streams.get(peer);
    if (!video || !stream || video.srcObject === stream) return;
    video.srcObject = stream;
    video.play().catch(() => {});
    if ('requestVideoFrameCallback' in video) {
      video.requestVideoFrameCallback(() => { this.timing.connect.firstFrameMs ??= this.sinceOpen(); });
    }
  }

  /** @private ms since the latest socket opened */
  sinceOpen() {
    return Math.round((performance.now() - this.openedAt) * 10) / 10;
  }

  /** @private Stop timers, peers and the socket, leaving the state as it is. */
  teardown() {
    if (this.timer) clearTimeout(this.timer);
    this.timer = null;
    this.closePeer(this.previousPeer);
    this.previousPeer = null;
    this.closePeer(this.peer);
    this.peer = null;
    if (this.socket) this.socket.close(1000, 'closed by the page');
    this.socket = null;
  }

  /** @private @param {RTCPeerConnection | null} peer */
  closePeer(peer) {
    if (peer) peer.close();
  }

  /** @private @param {string} data */
  onMessage(data) {
    /** @type {Record<string, any>} */
    let msg;
    try { msg = JSON.parse(data); } catch { return; }
    this.emit('event', msg);
    switch (msg.type) {
      case 'ice_servers':
        if (Array.isArray(msg.ice_servers)) this.iceServers = msg.ice_servers;
        break;
      case 'session_assigned':
        this.workerId = msg.worker_id;
        break;
      case 'webrtc_answer':
        if (this.offerSentAt !== null) this.timing.offerToAnswerMs = performance.now() - this.offerSentAt;
        this.offerSentAt = null;
        this.timing.connect.answerMs = this.sinceOpen();
        this.peer?.setRemoteDescription({ type: 'answer', sdp: msg.sdp })
          .catch((e) => this.emit('error', { code: 'client', message: String(e), retrying: false }));
        break;
      case 'assistant_text': {
        if (this.textSentAt !== null) this.timing.textToFirstTextMs = performance.now() - this.textSentAt;
        this.textSentAt = null;
        const full = msg.final ? msg.text : (this.answers.get(msg.turn) || '') + msg.text;
        this.answers.set(msg.turn, full);
        this.emit('assistant_text', { turn: msg.turn, text: msg.text, final: !!msg.final, full });
        break;
      }
      case 'speech_started':
        this.emit('speech_started', { turn: msg.turn });
        break;
      case 'speech_ended':
        this.emit('speech_ended', { turn: msg.turn, interrupted: !!msg.interrupted });
        break;
      case 'user_speech_started':
        this.emit('user_speech_started', {});
        break;
      case 'user_speech_ended':
        this.emit('user_speech_ended', { durationMs: Number(msg.duration_ms) || 0 });
        break;
      case 'user_transcript':
        this.textSentAt = performance.now();
        this.emit('user_transcript', { text: String(msg.text || ''), final: !!msg.final });
        break;
      case 'features':
        this.voice = !!msg.voice;
        this.emit('features', { voice: this.voice });
        break;
      case 'video_quality':
        this.emit('video_quality', {
          estimateKbps: Number(msg.estimate_kbps) || 0,
          bitrateKbps: Number(msg.bitrate_kbps) || 0,
          maxBitrateKbps: Number(msg.max_bitrate_kbps) || 0,
          level: Number(msg.level) || 0,
          fps: Number(msg.fps) || 0,
          width: Number(msg.width) || 0,
          height: Number(msg.height) || 0,
        });
        break;
      case 'error':
        this.onError(msg.code, msg.message || '');
        break;
      default:
        break;
    }
  }

  /** @private @param {string} code @param {string} message */
  onError(code, message) {
    if (code === 'unauthorized') {
      this.emit('error', { code, message, retrying: false });
      this.teardown();
      this.setState('failed');
      return;
    }
    const offerFailed = RETRYABLE_OFFER_ERRORS.includes(code);
    const lost = RENEGOTIATE_ERRORS.includes(code);
    const retrying = (offerFailed || lost) && !!this.options.reconnect;
    this.emit('error', { code, message, retrying });
    if (offerFailed) {
      this.setState('waiting');
      if (retrying) this.scheduleRenegotiate();
    } else if (lost && retrying) {
      this.scheduleRenegotiate();
    }
  }

  /** @private */
  backoff() {
    const ms = Math.min(10000, 250 * 2 ** this.attempt);
    this.attempt = Math.min(this.attempt + 1, 10);
    return ms / 2 + Math.random() * (ms / 2);
  }

  /** @private A new offer on the same socket (the worker went away, or none was free). */
  scheduleRenegotiate() {
    if (!this.options.reconnect || this.state === 'closed' || this.state === 'failed') return;
    if (this.timer) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      if (this.socket && this.socket.readyState === WebSocket.OPEN) this.negotiate();
      else this.scheduleReconnect();
    }, this.backoff());
  }

  /** @private A new socket (and then a new offer): the relay restarted or the network changed. */
  scheduleReconnect() {
    if (!this.options.reconnect || this.state === 'closed' || this.state === 'failed') {
      if (this.state !== 'closed' && this.state !== 'failed') this.setState('closed');
      return;
    }
    this.setState('reconnecting');
    if (this.timer) return;
    this.timer = setTimeout(() => {
      this.timer = null;
      this.openSocket().catch(() => this.scheduleReconnect());
    }, this.backoff());
  }
}
