// avatar-edge web client: the page end users open.
//
// It speaks the same JSON as the customer's existing page (webrtc_offer, webrtc_answer,
// webrtc_ice_candidate, text_webrtc) and fixes that page's bug: it adds recvonly video and audio
// transceivers *before* createOffer(), so the offer has media sections the server can answer.
// Everything it learns (socket state, ICE state, the selected candidate pair, decoded frames)
// is shown in the status line and exposed as window.avatarEdge for tests and debugging.
// The tutor's answer streams into the answer panel (assistant_text deltas), a badge shows while
// the avatar speaks (speech_started / speech_ended), and Stop sends {"type":"interrupt"}.
'use strict';

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const state = {
  ws: null,
  pc: null,
  sessionId: null,
  events: [],
  // Round trips measured by the page (ms): offer → answer, and a text message → the first
  // assistant text (browser → relay → worker and back).
  timing: { offerToAnswerMs: null, textToFirstTextMs: null },
  wsState: 'closed',
  iceState: 'new',
  pair: '–',
  framesDecoded: 0,
  width: 0,
  height: 0,
  iceServers: [],
  answers: {},
  speaking: null,
};

function newSessionId() {
  const rnd = (window.crypto && crypto.randomUUID) ? crypto.randomUUID() : String(Math.random()).slice(2);
  return 'web-' + rnd;
}

function renderStatus() {
  $('status').textContent =
    `WebSocket: ${state.wsState} · ICE: ${state.iceState} · pair: ${state.pair} · ` +
    `frames: ${state.framesDecoded}${state.width ? ` (${state.width}×${state.height})` : ''}`;
}

function logEvent(ev) {
  state.events.push(ev);
  const t = state.timing;
  if (ev.type === 'webrtc_answer' && t.offerSentAt != null) {
    t.offerToAnswerMs = performance.now() - t.offerSentAt;
    t.offerSentAt = null;
  }
  if (ev.type === 'assistant_text' && t.textSentAt != null) {
    t.textToFirstTextMs = performance.now() - t.textSentAt;
    t.textSentAt = null;
  }
  if (ev.type === 'assistant_text' && !ev.final) return; // deltas go to the answer panel only
  const li = document.createElement('li');
  li.textContent = JSON.stringify(ev).slice(0, 300);
  if (ev.type === 'error') li.className = 'error';
  $('events').appendChild(li);
  li.scrollIntoView({ block: 'nearest' });
}

function send(msg) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) {
    if (msg.type === 'webrtc_offer') state.timing.offerSentAt = performance.now();
    if (msg.type === 'text_webrtc') state.timing.textSentAt = performance.now();
    state.ws.send(JSON.stringify(msg));
  }
}

function setConnected(on) {
  $('connect').disabled = on;
  $('disconnect').disabled = !on;
  $('send').disabled = !on;
  $('stop').disabled = !on;
}

async function startPeer() {
  const pc = new RTCPeerConnection({ iceServers: state.iceServers });
  state.pc = pc;
  // The fix for the customer's page: without these the offer has no m= lines at all.
  pc.addTransceiver('video', { direction: 'recvonly' });
  pc.addTransceiver('audio', { direction: 'recvonly' });
  pc.ontrack = (event) => {
    const video = $('video');
    if (!video.srcObject) video.srcObject = event.streams[0] || new MediaStream([event.track]);
    else if (!video.srcObject.getTracks().includes(event.track)) video.srcObject.addTrack(event.track);
    video.play().catch(() => {});
    if (event.track.kind === 'audio') meterVoice(event.track);
  };
  pc.onicecandidate = (event) => {
    if (event.candidate && event.candidate.candidate) {
      send({ type: 'webrtc_ice_candidate', user_id: userId(), candidate: event.candidate.toJSON() });
    }
  };
  pc.oniceconnectionstatechange = () => { state.iceState = pc.iceConnectionState; renderStatus(); };
  const offer = await pc.createOffer();
  await pc.setLocalDescription(offer);
  send({
    type: 'webrtc_offer',
    session_id: state.sessionId,
    user_id: userId(),
    avatar_id: $('avatar').value,
    sdp: offer.sdp,
  });
}

// A voice meter: the level of the avatar's audio as the page receives it (WebAudio), shown next
// to the "speaking" badge and kept in state.voiceLevel (RMS, 0..1) for tests.
function meterVoice(track) {
  try {
    const ctx = new AudioContext();
    const analyser = ctx.createAnalyser();
    analyser.fftSize = 1024;
    ctx.createMediaStreamSource(new MediaStream([track])).connect(analyser);
    const buf = new Float32Array(analyser.fftSize);
    const measure = () => {
      if (track.readyState === 'ended') { ctx.close(); return; }
      analyser.getFloatTimeDomainData(buf);
      let sum = 0;
      for (const v of buf) sum += v * v;
      state.voiceLevel = Math.sqrt(sum / buf.length);
      state.voicePeak = Math.max(state.voicePeak || 0, state.voiceLevel);
      $('level').value = Math.min(1, state.voiceLevel * 4);
    };
    ctx.resume().catch(() => {});
    state.meter = setInterval(measure, 50);
  } catch (e) {
    logEvent({ type: 'client_error', message: `voice meter: ${e}` });
  }
}

function userId() {
  return params.get('user_id') || 'web-user';
}

async function onMessage(event) {
  let msg;
  try { msg = JSON.parse(event.data); } catch { return; }
  logEvent(msg);
  if (msg.type === 'webrtc_answer' && state.pc) {
    await state.pc.setRemoteDescription({ type: 'answer', sdp: msg.sdp });
  } else if (msg.type === 'ice_servers' && Array.isArray(msg.ice_servers)) {
    state.iceServers = msg.ice_servers;
  } else if (msg.type === 'assistant_text') {
    state.answers[msg.turn] = msg.final ? msg.text : (state.answers[msg.turn] || '') + msg.text;
    $('answer').textContent = state.answers[msg.turn];
  } else if (msg.type === 'speech_started') {
    state.speaking = msg.turn;
    $('speaking').hidden = false;
  } else if (msg.type === 'speech_ended' && state.speaking === msg.turn) {
    state.speaking = null;
    $('speaking').hidden = true;
  }
}

// STUN/TURN servers with fresh credentials, before the peer is created (the relay also sends them
// as the first event on the socket; that copy refreshes them for the next connection).
async function fetchIceServers() {
  try {
    const r = await fetch(`/api/ice-servers${location.search}`, { cache: 'no-store' });
    if (r.ok) state.iceServers = (await r.json()).ice_servers || [];
  } catch { /* no list: direct and server-reflexive candidates still work */ }
}

async function connect() {
  disconnect();
  await fetchIceServers();
  state.sessionId = newSessionId();
  const scheme = location.protocol === 'https:' ? 'wss' : 'ws';
  const ws = new WebSocket(`${scheme}://${location.host}/ws/${encodeURIComponent(state.sessionId)}${location.search}`);
  state.ws = ws;
  state.wsState = 'connecting';
  renderStatus();
  ws.onopen = () => { state.wsState = 'open'; renderStatus(); setConnected(true); startPeer().catch((e) => logEvent({ type: 'client_error', message: String(e) })); };
  ws.onmessage = (e) => { onMessage(e).catch((err) => logEvent({ type: 'client_error', message: String(err) })); };
  ws.onclose = (e) => { state.wsState = `closed (${e.code})`; renderStatus(); setConnected(false); };
  ws.onerror = () => { state.wsState = 'error'; renderStatus(); };
}

function disconnect() {
  if (state.pc) { state.pc.close(); state.pc = null; }
  if (state.ws) { state.ws.close(); state.ws = null; }
  $('video').srcObject = null;
  state.iceState = 'new';
  state.pair = '–';
  renderStatus();
}

async function collectStats() {
  const out = {
    framesDecoded: 0, frameWidth: 0, frameHeight: 0, localCandidateType: null, remoteCandidateType: null,
    iceState: state.iceState, audioLevel: 0, totalAudioEnergy: 0, audioSamplesReceived: 0,
    offerToAnswerMs: state.timing.offerToAnswerMs, textToFirstTextMs: state.timing.textToFirstTextMs,
  };
  if (!state.pc) return out;
  const report = await state.pc.getStats();
  let pairId = null;
  report.forEach((s) => { if (s.type === 'transport' && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId; });
  report.forEach((s) => {
    if (s.type === 'inbound-rtp' && s.kind === 'video') {
      out.framesDecoded = s.framesDecoded || 0;
      out.framesDropped = s.framesDropped || 0;
      out.freezeCount = s.freezeCount || 0;
      out.totalFreezesDuration = s.totalFreezesDuration || 0;
      out.videoPacketsLost = s.packetsLost || 0;
      out.nackCount = s.nackCount || 0;
      out.frameWidth = s.frameWidth || 0;
      out.frameHeight = s.frameHeight || 0;
    }
    if (s.type === 'inbound-rtp' && s.kind === 'audio') {
      out.audioLevel = s.audioLevel || 0;
      out.totalAudioEnergy = s.totalAudioEnergy || 0;
      out.audioSamplesReceived = s.totalSamplesReceived || 0;
    }
    if (!pairId && s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pairId = s.id;
  });
  const pair = pairId && report.get(pairId);
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

async function tick() {
  try {
    const s = await collectStats();
    state.framesDecoded = s.framesDecoded;
    state.width = s.frameWidth;
    state.height = s.frameHeight;
    if (s.localCandidateType) state.pair = `${s.localCandidateType} → ${s.remoteCandidateType}`;
    renderStatus();
  } catch { /* the peer closed between calls */ }
}

$('connect').onclick = () => { connect(); };
$('disconnect').onclick = disconnect;
$('unmute').onclick = () => { $('video').muted = false; };
$('stop').onclick = () => send({ type: 'interrupt' });
$('chat').onsubmit = (e) => {
  e.preventDefault();
  const message = $('message').value.trim();
  if (!message) return;
  send({ type: 'text_webrtc', session_id: state.sessionId, user_id: userId(), message, avatar_id: $('avatar').value });
  $('message').value = '';
};
setInterval(tick, 500);
if (params.get('avatar')) $('avatar').value = params.get('avatar');
if (params.get('autoconnect') === '1') connect();

// Mean luma (0-255) of a rectangle of the current video picture, in video pixels: lets a test or
// an operator check what is on screen (e.g. the mouth area) without a screenshot.
function lumaAt(x0, y0, x1, y1) {
  const v = $('video');
  if (!v.videoWidth) return null;
  const c = document.createElement('canvas');
  c.width = v.videoWidth;
  c.height = v.videoHeight;
  const g = c.getContext('2d', { willReadFrequently: true });
  g.drawImage(v, 0, 0);
  const px = g.getImageData(x0, y0, x1 - x0, y1 - y0).data;
  let sum = 0;
  for (let i = 0; i < px.length; i += 4) sum += 0.299 * px[i] + 0.587 * px[i + 1] + 0.114 * px[i + 2];
  return sum / (px.length / 4);
}

window.avatarEdge = { state, stats: collectStats, connect, disconnect, send, lumaAt, say: (m) => { $('message').value = m; $('chat').requestSubmit(); } };
