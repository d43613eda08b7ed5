// @ts-check
// avatar-edge web client: the page end users open. Built only on the SDK (avatar-edge.js), which
// speaks the protocol, negotiates, and reconnects; this file is the interface around it: the
// avatar, the conversation, the connection badge and panel, messages for the errors a user can
// meet, and an English/Chinese UI that follows the browser.
//
// Query parameters: `avatar` (which avatar), `user_id`, `lang` (en|zh), `debug=1` (the raw event
// log), `autoconnect=0` (wait for the Retry button), `voice=1` (offer the microphone from the start,
// so the Talk button needs no new negotiation), `ice=relay` (media only through the relay's TURN:
// the GPU box never sees the user's address); every parameter also goes to the relay (its
// policies may read e.g. `token`). Tests and operators read `window.avatarEdge`.
import { Session } from './avatar-edge.js';

const params = new URLSearchParams(location.search);
/** @param {string} id @returns {any} */
const $ = (id) => document.getElementById(id);

const TEXT = {
  en: {
    title: 'Your tutor', connecting: 'Connecting…', live: 'Connected', reconnecting: 'Reconnecting…',
    waiting: 'Waiting for a tutor…', failed: 'Not connected', closed: 'Disconnected',
    good: 'Good connection', poor: 'Poor connection', relayed: 'Relayed connection',
    connection: 'Connection', rtt: 'Round trip', fps: 'Frames per second', bitrate: 'Bitrate',
    loss: 'Packets lost', jitter: 'Jitter', path: 'Path', speaking: 'Speaking…', unmute: 'Turn sound on',
    estimate: 'Bandwidth estimate', level: 'Picture sent', lowered: 'lowered for this connection',
    retry: 'Try again', avatar: 'Tutor', conversation: 'Conversation', ask: 'Ask your tutor',
    placeholder: 'Ask your tutor something', send: 'Send', stop: 'Stop', you: 'You', tutor: 'Tutor',
    empty: 'Say hello: type a question below, or press Talk and speak.',
    mic: 'Talk', mic_on: 'Stop talking', listening: 'Listening…',
    mic_denied: 'The microphone is blocked. Allow it in the browser to talk, or type instead.',
    no_worker: 'No tutor is online right now. We keep trying.',
    busy: 'All tutors are busy right now. You are next in line; we keep trying.',
    unauthorized: 'This page could not sign you in. Open it again from your course link.',
    worker_lost: 'The tutor went away. Reconnecting…',
    peer_failed: 'The video connection failed. Reconnecting…',
    talk_failed: 'The tutor could not answer that. Please ask again.',
    rate_limited: 'One question at a time, please: wait a moment, then ask again.',
    message_too_long: 'That message is too long. Please ask in fewer words.',
    unreachable: 'Cannot reach the tutor service. Check your network; we keep trying.',
    error: 'Something went wrong.',
  },
  zh: {
    title: '你的老师', connecting: '正在连接…', live: '已连接', reconnecting: '正在重新连接…',
    waiting: '正在等待老师…', failed: '未连接', closed: '已断开',
    good: '连接良好', poor: '连接较差', relayed: '中继连接',
    connection: '连接', rtt: '往返时延', fps: '帧率', bitrate: '码率',
    loss: '丢包', jitter: '抖动', path: '路径', speaking: '正在说话…', unmute: '打开声音',
    estimate: '带宽估计', level: '发送画面', lowered: '已按当前网络降低',
    retry: '重试', avatar: '老师', conversation: '对话', ask: '向老师提问',
    placeholder: '向老师提个问题', send: '发送', stop: '停止', you: '你', tutor: '老师',
    empty: '打个招呼吧：在下面输入问题，或按“说话”直接说。',
    mic: '说话', mic_on: '停止说话', listening: '正在听…',
    mic_denied: '麦克风被禁止。请在浏览器中允许使用麦克风，或者直接输入。',
    no_worker: '现在没有老师在线，我们会继续尝试。',
    busy: '老师们都在忙，马上轮到你，我们会继续尝试。',
    unauthorized: '无法登录，请从课程链接重新打开本页。',
    worker_lost: '老师离开了，正在重新连接…',
    peer_failed: '视频连接失败，正在重新连接…',
    talk_failed: '老师没能回答这个问题，请再问一次。',
    rate_limited: '请一个一个地提问：稍等一下再问。',
    message_too_long: '这条消息太长了，请简短一些再问。',
    unreachable: '无法连接到服务，请检查网络，我们会继续尝试。',
    error: '出错了。',
  },
};
const wanted = (params.get('lang') || navigator.language || 'en').toLowerCase();
const lang = wanted.startsWith('zh') ? 'zh' : 'en';
/** @param {string} key @returns {string} */
const t = (key) => /** @type {Record<string, string>} */ (TEXT[lang])[key] || key;

function translate() {
  document.documentElement.lang = lang === 'zh' ? 'zh-CN' : 'en';
  document.querySelectorAll('[data-i18n]').forEach((el) => { el.textContent = t(el.getAttribute('data-i18n') || ''); });
  document.querySelectorAll('[data-i18n-placeholder]').forEach((el) => {
    el.setAttribute('placeholder', t(el.getAttribute('data-i18n-placeholder') || ''));
  });
  document.title = t('title');
  $('turns').dataset.empty = t('empty');
}

// What tests and operators can read (kept from the first page: state.wsState, state.events, …).
const state = {
  /** @type {import('./avatar-edge.js').Session | null} */
  session: null,
  /** @type {Record<string, any>[]} */
  events: [],
  wsState: 'closed',
  iceState: 'new',
  pair: '–',
  framesDecoded: 0,
  /** @type {number | null} */
  speaking: null,
  voiceLevel: 0,
  voicePeak: 0,
  /** @type {string | null} */
  notice: null,
  get ws() { return state.session && state.session.socket; },
  get timing() { return state.session ? state.session.timing : { offerToAnswerMs: null, textToFirstTextMs: null }; },
};

// ---- the conversation ----

/** @type {Map<number, HTMLElement>} */
const tutorTurns = new Map();
/** @type {number | null} */
let streaming = null;
/** The user's turn whose partial transcript is showing, until its final one. @type {HTMLElement | null} */
let hearing = null;

/** @param {'user' | 'tutor'} who @param {string} text @returns {HTMLElement} */
function addTurn(who, text) {
  const li = document.createElement('li');
  li.className = `turn ${who}`;
  const label = document.createElement('span');
  label.className = 'who';
  const time = new Date().toLocaleTimeString(lang === 'zh' ? 'zh-CN' : 'en', { hour: '2-digit', minute: '2-digit' });
  label.textContent = `${t(who === 'user' ? 'you' : 'tutor')} · ${time}`;
  const body = document.createElement('span');
  body.className = 'text';
  body.textContent = text;
  li.append(label, body);
  $('turns').appendChild(li);
  li.scrollIntoView({ block: 'nearest' });
  return li;
}

/** @param {import('./avatar-edge.js').AssistantText} a */
function onAssistantText(a) {
  let li = tutorTurns.get(a.turn);
  if (!li) {
    li = addTurn('tutor', '');
    tutorTurns.set(a.turn, li);
  }
  const body = li.querySelector('.text');
  if (body) body.textContent = a.full;
  streaming = a.final ? null : a.turn;
  li.scrollIntoView({ block: 'nearest' });
  updateButtons();
}

function updateButtons() {
  const live = state.session !== null && state.session.state === 'live';
  $('send').disabled = !live;
  $('mic').disabled = !live;
  const on = !!(state.session && state.session.microphone);
  $('mic').setAttribute('aria-pressed', String(on));
  $('mic').textContent = t(on ? 'mic_on' : 'mic');
  $('stop').disabled = !live || (state.speaking === null && streaming === null);
}

// ---- notices, the badge and the panel ----

/** @param {string | null} key @param {boolean} [retry] */
function notice(key, retry = false) {
  state.notice = key;
  $('notice-text').textContent = key ? t(key) : '';
  $('retry').hidden = !retry;
}

/** @param {string} quality @param {string} text */
function badge(quality, text) {
  $('badge').dataset.quality = quality;
  $('badge-text').textContent = text;
}

/** @param {import('./avatar-edge.js').SessionState} s */
function onState(s) {
  state.wsState = state.ws && state.ws.readyState === WebSocket.OPEN ? 'open' : 'closed';
  if (s === 'live') {
    notice(null);
    badge('good', t('live'));
  } else if (s === 'reconnecting') {
    notice('reconnecting');
    badge('down', t('reconnecting'));
  } else if (s === 'negotiating' || s === 'connecting') {
    if (!state.notice) notice('connecting');
    badge('none', t('connecting'));
  } else if (s === 'waiting') {
    badge('down', t('waiting'));
  } else {
    badge('down', t(s));
  }
  updateButtons();
  renderStatus();
}

/** @param {import('./avatar-edge.js').SessionError} e */
function onError(e) {
  if (e.code === 'unauthorized') notice('unauthorized', false);
  else if (e.code === 'busy' || e.code === 'no_worker') notice(e.code, true);
  else if (e.code === 'worker_lost' || e.code === 'peer_failed') notice(e.code, false);
  else if (e.code === 'talk_failed' || e.code === 'rate_limited' || e.code === 'message_too_long') {
    const code = e.code;
    notice(code);
    setTimeout(() => { if (state.notice === code) notice(null); }, 5000);
  }
}

function renderStatus() {
  const s = state.session;
  const ice = s && s.peer ? s.peer.iceConnectionState : 'new';
  state.iceState = ice;
  $('status').textContent = `WebSocket: ${state.wsState} · ICE: ${ice} · pair: ${state.pair} · frames: ${state.framesDecoded}`;
}

/** @param {number | null} v @param {string} unit @param {number} [digits] */
const fmt = (v, unit, digits = 0) => (v === null || Number.isNaN(v) ? '–' : `${v.toFixed(digits)} ${unit}`);

async function refresh() {
  const s = state.session;
  if (!s) return;
  state.wsState = s.socket && s.socket.readyState === WebSocket.OPEN ? 'open' : 'closed';
  try {
    const st = await s.stats();
    state.framesDecoded = st.framesDecoded;
    if (st.localCandidateType) state.pair = `${st.localCandidateType} → ${st.remoteCandidateType}`;
    $('p-rtt').textContent = fmt(st.rttMs, 'ms');
    $('p-fps').textContent = fmt(st.fps, 'fps');
    $('p-bitrate').textContent = fmt(st.bitrateKbps, 'kbit/s');
    $('p-loss').textContent = String(st.packetsLost);
    $('p-jitter').textContent = fmt(st.jitterMs, 'ms', 1);
    $('p-path').textContent = st.localCandidateType ? `${st.localCandidateType} → ${st.remoteCandidateType}` : '–';
    if (s.state === 'live' && st.quality !== 'none') badge(st.quality, t(st.quality));
  } catch { /* the peer closed between calls */ }
  renderStatus();
}

// ---- sound: browsers start media muted; the first tap turns it on ----

function unmute() {
  const video = $('video');
  video.muted = false;
  video.play().catch(() => {});
  $('unmute').hidden = true;
}

/** @param {MediaStreamTrack} track */
function meterVoice(track) {
  try {
    const ctx = new AudioContext();
    const analyser = ctx.createAnalyser();
    analyser.fftSize = 1024;
    ctx.createMediaStreamSource(new MediaStream([track])).connect(analyser);
    const buf = new Float32Array(analyser.fftSize);
    const timer = setInterval(() => {
      if (track.readyState === 'ended') { clearInterval(timer); ctx.close(); return; }
      analyser.getFloatTimeDomainData(buf);
      let sum = 0;
      for (const v of buf) sum += v * v;
      state.voiceLevel = Math.sqrt(sum / buf.length);
      state.voicePeak = Math.max(state.voicePeak, state.voiceLevel);
    }, 50);
    ctx.resume().catch(() => {});
  } catch { /* no WebAudio: no level */ }
}

// ---- the session ----

/** @param {Record<string, any>} ev */
function logEvent(ev) {
  state.events.push(ev);
  if (!debug || (ev.type === 'assistant_text' && !ev.final)) return;
  const li = document.createElement('li');
  li.textContent = JSON.stringify(ev).slice(0, 300);
  if (ev.type === 'error') li.className = 'error';
  $('events').appendChild(li);
}

async function start() {
  disconnect();
  notice('connecting');
  const avatarId = $('avatar').value || params.get('avatar') || undefined;
  // Listeners first, then start: the relay's first events (its ICE servers) are logged too.
  const session = new Session({
    url: location.href,
    avatarId,
    userId: params.get('user_id') || undefined,
    video: $('video'),
    query: Object.fromEntries(params),
    voice: params.get('voice') === '1',
    iceTransportPolicy: params.get('ice') === 'relay' ? 'relay' : 'all',
  });
  state.session = session;
  session.on('event', logEvent);
  session.on('state', onState);
  session.on('error', onError);
  session.on('assistant_text', onAssistantText);
  session.on('speech_started', ({ turn }) => {
    state.speaking = turn;
    $('speaking').hidden = false;
    updateButtons();
  });
  session.on('user_speech_started', () => {
    $('listening').hidden = false;
    // A partial line whose utterance had no words (a cough) gives way to the new one.
    hearing?.remove();
    hearing = null;
  });
  // A worker that cannot hear (no voice input, or its speech recognition is down) gets no Talk.
  session.on('features', ({ voice }) => {
    $('mic').hidden = !voice || !(navigator.mediaDevices && navigator.mediaDevices.getUserMedia);
    if (!voice && session.microphone) session.stopMicrophone();
  });
  // The worker follows this connection's bandwidth; the panel says what it sends now.
  session.on('video_quality', (q) => {
    $('p-estimate').textContent = `${q.estimateKbps} kbit/s`;
    const full = q.level === 0 && q.bitrateKbps >= 0.9 * q.maxBitrateKbps;
    $('p-level').textContent = `${q.width}×${q.height} at ${q.fps} fps, ${q.bitrateKbps} kbit/s${full ? '' : ` (${t('lowered')})`}`;
    $('p-level').dataset.lowered = String(!full);
  });
  session.on('user_speech_ended', () => { $('listening').hidden = true; });
  // Partials (final: false) grow one line while the user speaks; the final one settles it.
  session.on('user_transcript', ({ text, final }) => {
    if (!text) return;
    if (!hearing) {
      hearing = addTurn('user', text);
    } else {
      const body = hearing.querySelector('.text');
      if (body) body.textContent = text;
    }
    hearing.classList.toggle('partial', !final);
    if (final) {
      hearing = null;
      streaming = null;
    }
  });
  session.on('microphone', (on) => {
    if (!on) $('listening').hidden = true;
    updateButtons();
  });
  session.on('speech_ended', ({ turn, interrupted }) => {
    if (interrupted) tutorTurns.get(turn)?.classList.add('stopped');
    if (streaming === turn) streaming = null;
    if (state.speaking === turn) state.speaking = null;
    $('speaking').hidden = true;
    updateButtons();
  });
  try {
    await session.start();
    onState(session.state);
  } catch {
    notice('unreachable', true);
    badge('down', t('failed'));
  }
}

function disconnect() {
  if (state.session) state.session.close();
  state.session = null;
  state.wsState = 'closed';
}

/** @param {string} message */
function say(message) {
  const text = message.trim();
  if (!text || !state.session) return false;
  if (!state.session.say(text)) return false;
  addTurn('user', text);
  streaming = null;
  return true;
}

/** Mean luma (0-255) of a rectangle of the current picture, in video pixels (tests, operators). */
function lumaAt(/** @type {number} */ x0, /** @type {number} */ y0, /** @type {number} */ x1, /** @type {number} */ y1) {
  const v = $('video');
  if (!v.videoWidth) return null;
  const c = document.createElement('canvas');
  c.width = v.videoWidth;
  c.height = v.videoHeight;
  const g = c.getContext('2d', { willReadFrequently: true });
  if (!g) return null;
  g.drawImage(v, 0, 0);
  const px = g.getImageData(x0, y0, x1 - x0, y1 - y0).data;
  let sum = 0;
  for (let i = 0; i < px.length; i += 4) sum += 0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2];
  return sum / (px.length / 4);
}

/** The page's own diagnostics: the SDK's numbers plus the raw inbound counters tests read. */
async function stats() {
  const s = state.session;
  /** @type {Record<string, any>} */
  const out = {
    framesDecoded: 0, frameWidth: 0, frameHeight: 0, localCandidateType: null, remoteCandidateType: null,
    iceState: state.iceState, audioLevel: 0, totalAudioEnergy: 0, audioSamplesReceived: 0,
    offerToAnswerMs: state.timing.offerToAnswerMs, textToFirstTextMs: state.timing.textToFirstTextMs,
  };
  if (!s || !s.peer) return out;
  const report = await s.peer.getStats();
  /** @type {string | null} */
  let pairId = null;
  report.forEach((r) => { if (r.type === 'transport' && r.selectedCandidatePairId) pairId = r.selectedCandidatePairId; });
  report.forEach((r) => {
    if (r.type === 'inbound-rtp' && r.kind === 'video') {
      Object.assign(out, {
        framesDecoded: r.framesDecoded || 0, framesDropped: r.framesDropped || 0, freezeCount: r.freezeCount || 0,
        totalFreezesDuration: r.totalFreezesDuration || 0, videoPacketsLost: r.packetsLost || 0,
        nackCount: r.nackCount || 0, frameWidth: r.frameWidth || 0, frameHeight: r.frameHeight || 0,
      });
    }
    if (r.type === 'inbound-rtp' && r.kind === 'audio') {
      Object.assign(out, {
        audioLevel: r.audioLevel || 0, totalAudioEnergy: r.totalAudioEnergy || 0,
        audioSamplesReceived: r.totalSamplesReceived || 0,
      });
    }
    if (!pairId && r.type === 'candidate-pair' && r.nominated && r.state === 'succeeded') pairId = r.id;
  });
  const pair = pairId ? report.get(pairId) : null;
  if (pair) {
    const local = report.get(pair.localCandidateId);
    const remote = report.get(pair.remoteCandidateId);
    out.localCandidateType = local && local.candidateType;
    out.remoteCandidateType = remote && remote.candidateType;
    out.remoteAddress = remote && (remote.address || remote.ip);
    out.localRelayProtocol = (local && local.relayProtocol) || null;
  }
  return out;
}

// ---- wiring ----

const debug = params.get('debug') === '1';
translate();
$('debug').hidden = !debug;
$('badge').addEventListener('click', () => {
  const open = $('panel').hidden;
  $('panel').hidden = !open;
  $('badge').setAttribute('aria-expanded', String(open));
});
$('unmute').addEventListener('click', unmute);
$('retry').addEventListener('click', () => {
  if (state.session && state.session.state !== 'failed') state.session.retry();
  else start();
});
$('stop').addEventListener('click', () => { if (state.session) state.session.interrupt(); });
// Talk: the microphone on or off. Pressing it is a user gesture, so the tutor's voice plays too.
$('mic').hidden = !(navigator.mediaDevices && navigator.mediaDevices.getUserMedia);
$('mic').addEventListener('click', () => {
  const s = state.session;
  if (!s) return;
  if ($('video').muted) unmute();
  if (s.microphone) {
    s.stopMicrophone();
    return;
  }
  s.startMicrophone().catch(() => {
    notice('mic_denied');
    setTimeout(() => { if (state.notice === 'mic_denied') notice(null); }, 6000);
  });
});
$('chat').addEventListener('submit', (/** @type {Event} */ e) => {
  e.preventDefault();
  const input = $('message');
  // Sending is a user gesture: the tutor's voice may play from now on.
  if ($('video').muted) unmute();
  if (say(input.value)) input.value = '';
});
$('video').addEventListener('loadedmetadata', () => {
  const stream = /** @type {MediaStream | null} */ ($('video').srcObject);
  const track = stream && stream.getAudioTracks()[0];
  if (track) meterVoice(track);
});

// The layout follows the avatar's shape (square, 16:9, 9:16): from its preview before the stream
// starts, then from the stream itself. A picture stepped down for a slow link keeps its shape.
const shape = (/** @type {number} */ width, /** @type {number} */ height) => {
  const stage = /** @type {HTMLElement | null} */ (document.querySelector('.stage'));
  if (width > 0 && height > 0 && stage) stage.style.setProperty('--avatar-ar', String(width / height));
};
$('video').addEventListener('resize', () => {
  const video = /** @type {HTMLVideoElement} */ ($('video'));
  shape(video.videoWidth, video.videoHeight);
});

// An avatar chooser, only when the relay lists more than one avatar; the chosen avatar's preview
// shows in the video until its stream starts.
fetch('/api/avatars').then((r) => (r.ok ? r.json() : null)).then((list) => {
  const avatars = list && Array.isArray(list.avatars) ? list.avatars : [];
  /** @type {Record<string, string>} */
  const previews = {};
  for (const a of avatars) if (typeof a.preview === 'string') previews[a.id] = a.preview;
  const video = /** @type {HTMLVideoElement} */ ($('video'));
  const poster = (/** @type {string} */ id) => {
    if (!previews[id]) return;
    video.poster = previews[id];
    if (video.videoWidth) return; // the stream already gave the shape
    const image = new Image();
    image.onload = () => { if (!video.videoWidth) shape(image.naturalWidth, image.naturalHeight); };
    image.src = previews[id];
  };
  poster(params.get('avatar') || (avatars[0] && avatars[0].id) || '');
  if (avatars.length < 2) return;
  const select = /** @type {HTMLSelectElement} */ ($('avatar'));
  for (const a of avatars) {
    const option = document.createElement('option');
    option.value = a.id;
    option.textContent = a.name || a.id;
    select.appendChild(option);
  }
  select.value = params.get('avatar') || select.value;
  $('avatar-choice').hidden = false;
  select.addEventListener('change', () => { poster(select.value); start(); });
}).catch(() => {});

setInterval(refresh, 1000);
/** @type {any} */ (window).avatarEdge = {
  state, stats, lumaAt, say, send: (/** @type {Record<string, any>} */ m) => state.session && state.session.socket
    && state.session.socket.send(JSON.stringify(m)), connect: start, disconnect,
};
if (params.get('autoconnect') !== '0') start();
else notice(null, true);
