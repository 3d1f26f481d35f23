// omnitalk web client: OpenAI Realtime (GA events) over a WebSocket to this server.
// Mic -> AudioWorklet (context rate) -> 24 kHz PCM16 -> input_audio_buffer.append.
// Answer audio deltas are scheduled back to back on one AudioContext clock (`nextTime`), so chunks
// play without gaps; an interruption stops every scheduled source at once and tells the server how
// much was heard (conversation.item.truncate audio_end_ms).
'use strict';

const $ = (id) => document.getElementById(id);
const RATE = 24000;

const S = {                 // everything the page knows; window.omnitalk exposes it (tests, debugging)
  ws: null, ctx: null, stream: null, node: null, video: null,
  connected: false, muted: false, vad: true, speak: true,
  nextTime: 0,              // AudioContext time where the next answer chunk starts
  sources: [],              // scheduled, not yet ended: {src, start, dur, item}
  segments: {},             // item id -> [{start, dur}] of everything scheduled for it
  truncated: {},            // item ids already truncated
  current: null,            // assistant item being played / generated
  responseActive: false, responseId: null,
  stats: { events: 0, audioChunks: 0, audioBytes: 0, underruns: 0, cancelled: 0, completed: 0, truncates: 0,
           interruptions: 0, errors: [], lastStatus: null, speechStarted: 0, appended: 0 },
  log: [],                  // last server event types
  tSpeechStopped: null, latencyMs: null,
  userLines: {}, botLines: {},
};
window.omnitalk = S;

function setStatus(text, cls) { const el = $('status'); el.textContent = text; el.className = 'status ' + cls; }

function line(who, id, text) {
  const map = who === 'user' ? S.userLines : S.botLines;
  let el = id && map[id];
  if (!el) {
    el = document.createElement('div');
    el.className = 'line ' + who;
    el.innerHTML = '<b></b><span></span>';
    el.querySelector('b').textContent = who === 'user' ? 'You' : who === 'bot' ? 'omni' : '';
    $('transcript').appendChild(el);
    if (id) map[id] = el;
  }
  if (text !== undefined) el.querySelector('span').textContent = text;
  el.scrollIntoView({ block: 'end' });
  return el;
}
function appendText(who, id, delta) {
  const el = line(who, id);
  el.querySelector('span').textContent += delta;
}
function note(text) { line('note', null, text); }

function b64encode(buf) {
  const bytes = new Uint8Array(buf);
  let s = '';
  for (let i = 0; i < bytes.length; i += 0x8000) s += String.fromCharCode.apply(null, bytes.subarray(i, i + 0x8000));
  return btoa(s);
}
function b64decode(b64) {
  const s = atob(b64);
  const bytes = new Uint8Array(s.length);
  for (let i = 0; i < s.length; i++) bytes[i] = s.charCodeAt(i);
  return bytes.buffer;
}

function send(ev) {
  if (S.ws && S.ws.readyState === WebSocket.OPEN) S.ws.send(JSON.stringify(ev));
}

// ---- playback ----------------------------------------------------------------------------------
function play(b64, itemId) {
  const ab = b64decode(b64);
  const n = ab.byteLength >> 1;
  if (!n) return;
  const dv = new DataView(ab);
  const f = new Float32Array(n);
  for (let i = 0; i < n; i++) f[i] = dv.getInt16(2 * i, true) / 32768;
  const buf = S.ctx.createBuffer(1, n, RATE);
  buf.copyToChannel(f, 0);
  const src = S.ctx.createBufferSource();
  src.buffer = buf;
  src.connect(S.ctx.destination);
  const now = S.ctx.currentTime;
  const segs = (S.segments[itemId] = S.segments[itemId] || []);
  if (S.nextTime < now + 0.02) {       // nothing queued (first chunk) or we ran dry (an underrun)
    if (segs.length) S.stats.underruns++;
    S.nextTime = now + 0.05;
  }
  const rec = { src, start: S.nextTime, dur: buf.duration, item: itemId };
  src.start(rec.start);
  S.nextTime += buf.duration;
  segs.push({ start: rec.start, dur: rec.dur });
  S.sources.push(rec);
  src.onended = () => { S.sources = S.sources.filter((r) => r !== rec); };
  S.stats.audioChunks++;
  S.stats.audioBytes += ab.byteLength;
}

function playedMs(itemId) {
  const now = S.ctx ? S.ctx.currentTime : 0;
  let ms = 0;
  for (const s of S.segments[itemId] || []) ms += Math.max(0, Math.min(now - s.start, s.dur)) * 1000;
  return Math.floor(ms);
}

function isPlaying() { return !!S.ctx && S.sources.some((r) => r.start + r.dur > S.ctx.currentTime); }

// Stop everything queued locally and tell the server what was actually heard.
function interrupt(why) {
  const item = S.current;
  const heard = item ? playedMs(item) : 0;
  for (const r of S.sources) { try { r.src.stop(); } catch (e) { /* already stopped */ } }
  S.sources = [];
  if (S.ctx) S.nextTime = S.ctx.currentTime;
  if (item && S.segments[item]) S.segments[item] = [{ start: 0, dur: heard / 1000 }];  // freeze what was heard
  if (item && !S.truncated[item] && S.segments[item]) {
    S.truncated[item] = true;
    S.stats.truncates++;
    send({ type: 'conversation.item.truncate', item_id: item, content_index: 0, audio_end_ms: heard });
  }
  S.stats.interruptions++;
  if (why) note(why);
}

// ---- server events ---------------------------------------------------------------------------
function onEvent(ev) {
  S.stats.events++;
  S.log.push(ev.type);
  if (S.log.length > 200) S.log.shift();
  switch (ev.type) {
    case 'session.created':
    case 'session.updated':
      break;
    case 'input_audio_buffer.speech_started':
      S.stats.speechStarted++;
      line('user', ev.item_id, '…');
      if (isPlaying() || S.responseActive) interrupt('(interrupted)');
      break;
    case 'input_audio_buffer.speech_stopped':
      S.tSpeechStopped = performance.now();
      break;
    case 'input_audio_buffer.committed':
      line('user', ev.item_id, '(speech)');
      break;
    case 'conversation.item.input_audio_transcription.completed':
      line('user', ev.item_id, ev.transcript || '(speech)');
      break;
    case 'output_audio_buffer.cleared':
      if (isPlaying()) interrupt('(stopped)');
      break;
    case 'response.created':
      S.responseActive = true;
      S.responseId = ev.response.id;
      break;
    case 'response.output_item.added':
      S.current = ev.item.id;
      line('bot', ev.item.id, '');
      break;
    case 'response.output_audio.delta':
    case 'response.audio.delta':
      if (S.tSpeechStopped !== null) {
        S.latencyMs = Math.round(performance.now() - S.tSpeechStopped);
        $('latency').textContent = `first audio: ${S.latencyMs} ms`;
        S.tSpeechStopped = null;
      }
      if (ev.item_id === S.current && !S.truncated[ev.item_id]) play(ev.delta, ev.item_id);
      break;
    case 'response.output_audio_transcript.delta':
    case 'response.audio_transcript.delta':
    case 'response.output_text.delta':
    case 'response.text.delta':
      appendText('bot', ev.item_id, ev.delta);
      break;
    case 'response.done': {
      S.responseActive = false;
      const st = ev.response.status;
      S.stats.lastStatus = st;
      if (st === 'cancelled') {
        S.stats.cancelled++;
        if (isPlaying()) interrupt();
      } else if (st === 'completed' || st === 'incomplete') {
        S.stats.completed++;
      } else if (st === 'failed') {
        note('(the answer failed)');
      }
      break;
    }
    case 'conversation.item.truncated':
      break;
    case 'error':
      S.stats.errors.push(ev.error && ev.error.code);
      note(`error: ${ev.error && ev.error.message}`);
      break;
    default:
      break;
  }
  updateStats();
}

function updateStats() {
  $('stats').textContent = `chunks ${S.stats.audioChunks} · gaps ${S.stats.underruns}`;
  $('stop').disabled = !S.connected;
}

// ---- session ----------------------------------------------------------------------------------
function sessionConfig() {
  return {
    type: 'realtime',
    output_modalities: S.speak ? ['audio'] : ['text'],
    audio: {
      input: {
        format: { type: 'audio/pcm', rate: RATE },
        transcription: { model: 'omnitalk' },
        turn_detection: S.vad ? { type: 'server_vad', threshold: 0.5, prefix_padding_ms: 300, silence_duration_ms: 500 } : null,
      },
      output: { format: { type: 'audio/pcm', rate: RATE }, voice: 'default' },
    },
  };
}

function wsUrl() {
  const custom = $('server').value.trim();
  let base;
  if (custom) base = custom.replace(/^http/, 'ws').replace(/\/$/, '');
  else base = (location.protocol === 'https:' ? 'wss://' : 'ws://') + location.host;
  return base + '/v1/realtime?api=ga';
}

async function startAudio() {
  S.ctx = new (window.AudioContext || window.webkitAudioContext)();
  await S.ctx.resume();
  await S.ctx.audioWorklet.addModule('/static/worklet.js');
  S.stream = await navigator.mediaDevices.getUserMedia({
    audio: { channelCount: 1, echoCancellation: true, noiseSuppression: true, autoGainControl: true },
  });
  const source = S.ctx.createMediaStreamSource(S.stream);
  S.node = new AudioWorkletNode(S.ctx, 'pcm16-capture', { processorOptions: { targetRate: RATE, chunkMs: 40 } });
  S.node.port.onmessage = (e) => {
    $('level').value = Math.min(1, e.data.peak * 2);
    if (!S.connected) return;
    if (!S.vad && !S.talking) return;
    send({ type: 'input_audio_buffer.append', audio: b64encode(e.data.pcm) });
    S.stats.appended++;
  };
  const sink = S.ctx.createGain();
  sink.gain.value = 0;
  source.connect(S.node);
  S.node.connect(sink).connect(S.ctx.destination);   // keeps the worklet pulled; outputs silence
}

async function connect() {
  if (S.ws) { disconnect(); return; }
  $('connect').disabled = true;
  try {
    if (!S.ctx) await startAudio();
  } catch (e) {
    note(`microphone unavailable (${e.name || e}); you can still type and send images`);
    if (!S.ctx) { S.ctx = new AudioContext(); await S.ctx.resume(); }
  }
  const protocols = ['realtime'];
  const key = $('apikey').value.trim();
  if (key) protocols.push('openai-insecure-api-key.' + key);
  setStatus('connecting…', 'wait');
  const ws = new WebSocket(wsUrl(), protocols);
  S.ws = ws;
  ws.onopen = () => {
    S.connected = true;
    setStatus('connected', 'on');
    $('connect').textContent = 'Disconnect';
    $('connect').disabled = false;
    $('mute').disabled = false;
    $('talk').disabled = S.vad;
    send({ type: 'session.update', session: sessionConfig() });
    updateStats();
  };
  ws.onmessage = (m) => { try { onEvent(JSON.parse(m.data)); } catch (e) { console.error(e); } };
  ws.onclose = (e) => {
    S.connected = false; S.ws = null; S.responseActive = false;
    setStatus(e.code === 1013 ? 'server busy' : 'disconnected', 'off');
    $('connect').textContent = 'Connect & talk';
    $('connect').disabled = false;
    $('mute').disabled = true;
    $('talk').disabled = true;
    if (e.code !== 1000 && e.code !== 1005) note(`connection closed (${e.code}${e.reason ? ': ' + e.reason : ''})`);
    updateStats();
  };
}

function disconnect() {
  interrupt();
  if (S.ws) S.ws.close(1000);
}

function stop() {
  if (S.responseActive) send({ type: 'response.cancel' });
  interrupt('(stopped)');
}

function userImage(dataUrl) {
  $('thumb').src = dataUrl;
  $('thumb').hidden = false;
  send({ type: 'conversation.item.create',
         item: { type: 'message', role: 'user', content: [{ type: 'input_image', image_url: dataUrl }] } });
  note('(image sent: ask about it)');
}

function downscale(img, max) {
  const k = Math.min(1, max / Math.max(img.width || img.videoWidth, img.height || img.videoHeight));
  const w = Math.round((img.width || img.videoWidth) * k), h = Math.round((img.height || img.videoHeight) * k);
  const c = document.createElement('canvas');
  c.width = w; c.height = h;
  c.getContext('2d').drawImage(img, 0, 0, w, h);
  return c.toDataURL('image/jpeg', 0.9);
}

async function camera() {
  const v = $('video');
  if (S.video) {
    S.video.getTracks().forEach((t) => t.stop());
    S.video = null; v.hidden = true; $('snap').disabled = true; $('camera').textContent = 'Camera';
    return;
  }
  try {
    S.video = await navigator.mediaDevices.getUserMedia({ video: { width: 640, height: 480 } });
    v.srcObject = S.video; v.hidden = false; $('snap').disabled = false; $('camera').textContent = 'Camera off';
  } catch (e) { note(`camera unavailable (${e.name || e})`); }
}

// ---- wiring -----------------------------------------------------------------------------------
$('connect').onclick = connect;
$('stop').onclick = stop;
$('mute').onclick = () => {
  S.muted = !S.muted;
  if (S.node) S.node.port.postMessage({ muted: S.muted });
  $('mute').textContent = S.muted ? 'Unmute mic' : 'Mute mic';
};
$('speak').onchange = (e) => { S.speak = e.target.checked; send({ type: 'session.update', session: sessionConfig() }); };
$('vad').onchange = (e) => {
  S.vad = e.target.checked;
  $('talk').disabled = S.vad || !S.connected;
  send({ type: 'session.update', session: sessionConfig() });
};
const talkDown = () => { if (S.vad || !S.connected) return; stop(); S.talking = true; send({ type: 'input_audio_buffer.clear' }); };
const talkUp = () => {
  if (!S.talking) return;
  S.talking = false;
  send({ type: 'input_audio_buffer.commit' });
  send({ type: 'response.create' });
  S.tSpeechStopped = performance.now();
};
$('talk').onmousedown = talkDown; $('talk').onmouseup = talkUp; $('talk').onmouseleave = talkUp;
$('talk').ontouchstart = talkDown; $('talk').ontouchend = talkUp;
$('camera').onclick = camera;
$('snap').onclick = () => { if (S.video) userImage(downscale($('video'), 448)); };
$('upload').onchange = (e) => {
  const f = e.target.files && e.target.files[0];
  if (!f) return;
  const r = new FileReader();
  r.onload = () => { const img = new Image(); img.onload = () => userImage(downscale(img, 448)); img.src = r.result; };
  r.readAsDataURL(f);
  e.target.value = '';
};
$('textform').onsubmit = (e) => {
  e.preventDefault();
  const t = $('text').value.trim();
  if (!t || !S.connected) return;
  if (S.responseActive) send({ type: 'response.cancel' });
  if (isPlaying()) interrupt();
  line('user', null, t);
  send({ type: 'conversation.item.create', item: { type: 'message', role: 'user', content: [{ type: 'input_text', text: t }] } });
  send({ type: 'response.create' });
  S.tSpeechStopped = performance.now();
  $('text').value = '';
};
if (!window.isSecureContext) note('This page is not a secure context: browsers allow the microphone only on https or http://localhost.');
