// avatar-edge web client: the page end users open.
//
// It speaks the same JSON as the customer's existing page (webrtc_offer, webrtc_answer,
// webrtc_ice_candidate, text_webrtc) and fixes that page's bug: it adds recvonly video and audio
// transceivers *before* createOffer(), so the offer has media sections the server can answer.
// Everything it learns (socket state, ICE state, the selected candidate pair, decoded frames)
// is shown in the status line and exposed as window.avatarEdge for tests and debugging.
'use strict';

const params = new URLSearchParams(location.search);
const $ = (id) => document.getElementById(id);
const state = {
  ws: null,
  pc: null,
  sessionId: null,
  events: [],
  wsState: 'closed',
  iceState: 'new',
  pair: '–',
  framesDecoded: 0,
  width: 0,
  height: 0,
  iceServers: [],
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
  const li = document.createElement('li');
  li.textContent = JSON.stringify(ev).slice(0, 300);
  if (ev.type === 'error') li.className = 'error';
  $('events').appendChild(li);
  li.scrollIntoView({ block: 'nearest' });
}

function send(msg) {
  if (state.ws && state.ws.readyState === WebSocket.OPEN) state.ws.send(JSON.stringify(msg));
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
  }
}

function connect() {
  disconnect();
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
  const out = { framesDecoded: 0, frameWidth: 0, frameHeight: 0, localCandidateType: null, remoteCandidateType: null, iceState: state.iceState };
  if (!state.pc) return out;
  const report = await state.pc.getStats();
  let pairId = null;
  report.forEach((s) => { if (s.type === 'transport' && s.selectedCandidatePairId) pairId = s.selectedCandidatePairId; });
  report.forEach((s) => {
    if (s.type === 'inbound-rtp' && s.kind === 'video') {
      out.framesDecoded = s.framesDecoded || 0;
      out.frameWidth = s.frameWidth || 0;
      out.frameHeight = s.frameHeight || 0;
    }
    if (!pairId && s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') pairId = s.id;
  });
  const pair = pairId && report.get(pairId);
  if (pair) {
    const local = report.get(pair.localCandidateId);
    const remote = report.get(pair.remoteCandidateId);
    out.localCandidateType = local && local.candidateType;
    out.remoteCandidateType = remote && remote.candidateType;
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

$('connect').onclick = connect;
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

window.avatarEdge = { state, stats: collectStats, connect, disconnect, send };
