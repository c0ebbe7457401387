import { publish, canSendVideoCodec, mediaStats, StatsSampler } from '/web/whip.js';
import { QAClient, QuestionList } from '/web/qa.js';
import {
  streamName, setStatus, formatDuration, followStream, viewers, clipButton,
} from '/web/page.js';
import { Timeline, questionMarkers } from '/web/timeline.js';

const $ = (id) => document.getElementById(id);
const preview = $('preview');
const startButton = $('start');
const stopButton = $('stop');
const codecSelect = $('codec');
const simulcastBox = $('simulcast');
const tokenInput = $('token');
const titleInput = $('stream-title');
const statusLine = $('status');

const stream = streamName('studio');
// The host's view of the broadcast so far; a chosen moment opens its replay.
const timeline = new Timeline($('timeline'), {
  onOpen: (atMs) => window.open(
    `/watch/${encodeURIComponent(stream)}?start=${Math.round(atMs)}`, '_blank', 'noopener'),
});
let media = null;       // MediaStream from getUserMedia
let session = null;     // whip.js Session
let abort = null;       // AbortController of the attempt in progress
let sampler = null;
let statsTimer = 0;
let qa = null;
let reported = '';      // details last sent to the directory
let size = null;        // resolution being sent, from getStats
let cameraQueue = Promise.resolve();

// Read-only handle for tests and the console: window.whipcast.stats() etc.
window.whipcast = Object.freeze({
  role: 'publish',
  stream,
  get session() { return session; },
  get pc() { return session?.pc ?? null; },
  get state() { return session?.state ?? 'idle'; },
  get qa() { return qa; },
  stats: () => mediaStats(session?.pc),
});

$('stream-name').textContent = stream ?? '';
if (stream) {
  document.title = `Studio · ${stream} · whipcast`;
  const watchUrl = new URL(`/watch/${encodeURIComponent(stream)}`, location.href).href;
  const embedUrl = new URL(`/embed/${encodeURIComponent(stream)}`, location.href).href;
  $('watch-link').href = watchUrl;
  $('share-link').value = watchUrl;
  $('embed-code').value = `<iframe src="${embedUrl}" width="640" height="360" allow="autoplay; fullscreen" allowfullscreen></iframe>`;
  for (const id of ['share-link', 'embed-code']) $(id).addEventListener('focus', (e) => e.target.select());
  followStream(stream, showEntry);
  startQuestions();
  openCamera();
  clipButton($('clip'), $('clip-status'), stream);
} else {
  setStatus(statusLine, 'No stream name in the address. Pick one on the home page.', 'error');
  startButton.disabled = true;
  $('clip').disabled = true;
}
// ?simulcast=0 starts with one encoding (the checkbox can still change it).
if (new URLSearchParams(location.search).get('simulcast') === '0') simulcastBox.checked = false;
for (const option of codecSelect.options) {
  if (option.value && !canSendVideoCodec(option.value)) {
    option.disabled = true;
    option.textContent += ' (not supported by this browser)';
  }
}

$('controls').addEventListener('submit', (event) => {
  event.preventDefault();
  start();
});
stopButton.addEventListener('click', () => stop('Stopped. Press Go live to start again.'));
addEventListener('pagehide', () => { session?.stop(); });
$('camera').addEventListener('change', () => openCamera());
$('microphone').addEventListener('change', () => openCamera());
tokenInput.addEventListener('change', () => startQuestions());
titleInput.addEventListener('change', () => reportDetails());

/** (Re)open camera and microphone, one request at a time, in the order asked. */
function openCamera() {
  cameraQueue = cameraQueue.then(captureDevices)
    .catch((err) => setStatus(statusLine, describeError(err), 'error'));
  return cameraQueue;
}

/** Capture the selected devices; a live broadcast switches tracks in place. */
async function captureDevices() {
  showOverlay('Starting the camera…', true);
  const camera = $('camera').value;
  const microphone = $('microphone').value;
  let captured;
  try {
    captured = await navigator.mediaDevices.getUserMedia({
      audio: microphone ? { deviceId: { exact: microphone } } : true,
      video: {
        deviceId: camera ? { exact: camera } : undefined,
        width: { ideal: 1280 }, height: { ideal: 720 }, frameRate: { ideal: 30 },
      },
    });
  } catch (err) {
    setBadge('denied', err?.name === 'NotAllowedError' ? 'Permission denied' : 'No camera');
    showOverlay(describeError(err), false);
    setStatus(statusLine, describeError(err), 'error');
    startButton.disabled = true;
    return;
  }
  const old = media;
  media = captured;
  preview.srcObject = media;
  $('overlay').hidden = true;
  if (session) {
    for (const sender of session.pc.getSenders()) {
      const track = media.getTracks().find((t) => t.kind === sender.track?.kind);
      if (track) await sender.replaceTrack(track);
    }
    reportDetails();
  }
  old?.getTracks().forEach((track) => track.stop());
  if (!abort) startButton.disabled = !stream;
  await listDevices();
}

async function listDevices() {
  const devices = await navigator.mediaDevices.enumerateDevices();
  for (const [kind, select, fallback] of [
    ['videoinput', $('camera'), 'Camera'], ['audioinput', $('microphone'), 'Microphone']]) {
    const inUse = media?.getTracks().find((t) => `${t.kind}input` === kind)?.getSettings().deviceId;
    const options = devices.filter((d) => d.kind === kind).map((d, i) => {
      const option = document.createElement('option');
      option.value = d.deviceId;
      option.textContent = d.label || `${fallback} ${i + 1}`;
      return option;
    });
    if (!options.length) continue;
    select.replaceChildren(...options);
    if (inUse) select.value = inUse;
  }
}

async function start() {
  if (abort || !stream) return;
  if (!media) await openCamera();
  if (!media || abort) return;
  abort = new AbortController();
  const { signal } = abort;
  setBusy(true);
  try {
    setStatus(statusLine, 'Connecting…');
    setBadge('connecting', 'Connecting');
    session = await publish(`/whip/${encodeURIComponent(stream)}`, media, {
      token: tokenInput.value.trim() || undefined,
      videoCodec: codecSelect.value || undefined,
      simulcast: simulcastBox.checked,
      signal,
      onState,
    });
    onState(session.state);
  } catch (err) {
    if (signal.aborted) return;
    session = null;
    abort = null;
    setBusy(false);
    setBadge('error', 'Not live');
    setStatus(statusLine, describeError(err), 'error');
  }
}

function stop(message) {
  abort?.abort();
  abort = null;
  session = null;
  sampler = null;
  clearInterval(statsTimer);
  setBusy(false);
  setBadge('idle', 'Off air');
  setStatus(statusLine, message);
  clearStats();
}

function onState(state) {
  switch (state) {
    case 'gathering':
    case 'signaling':
    case 'connecting':
      setStatus(statusLine, 'Connecting…');
      break;
    case 'connected':
      setStatus(statusLine, 'You are live. Viewers can watch now.', 'ok');
      setBadge('live', 'Live');
      sampler = new StatsSampler(session.pc);
      clearInterval(statsTimer);
      statsTimer = setInterval(showStats, 1000);
      reported = '';
      reportDetails();
      break;
    case 'disconnected':
      setStatus(statusLine, 'Connection interrupted, trying to recover…', 'warn');
      setBadge('reconnecting', 'Reconnecting');
      break;
    case 'failed':
    case 'ended':
      stop(state === 'ended'
        ? 'The server ended this broadcast. Press Go live to start again.'
        : 'Connection lost. Press Go live to start again.');
      setStatus(statusLine, statusLine.textContent, 'error');
      setBadge('ended', 'Ended');
      break;
  }
}

async function showStats() {
  if (!sampler) return;
  const s = await sampler.sample();
  $('s-bitrate').textContent = s.bitrateKbps !== null ? `${s.bitrateKbps} kbit/s` : '–';
  $('s-fps').textContent = s.fps !== null ? `${s.fps}` : '–';
  $('s-resolution').textContent = s.frameWidth ? `${s.frameWidth}×${s.frameHeight}` : '–';
  $('s-codec').textContent = s.codec || '–';
  $('s-rtt').textContent = s.rttMs !== null ? `${s.rttMs} ms` : '–';
  $('s-loss').textContent = `${s.lossPercent}%`;
  const layers = s.encodings.filter((e) => e.frameWidth).map((e) => `${e.frameWidth}×${e.frameHeight}`);
  $('stats').textContent = `${s.framesEncoded} frames encoded · ${Math.round(s.bytesSent / 1024)} KiB sent` +
    (layers.length > 1 ? ` · simulcast ${layers.join(', ')}` : '');
  if (s.frameWidth) {
    size = { width: s.frameWidth, height: s.frameHeight };
    reportDetails();
  }
}

function clearStats() {
  for (const id of ['s-bitrate', 's-fps', 's-resolution', 's-codec', 's-rtt', 's-loss']) {
    $(id).textContent = '–';
  }
  $('stats').textContent = '';
}

/** Tell the directory the title and the resolution being sent, when they change. */
function reportDetails() {
  if (session?.state !== 'connected') return;
  const body = JSON.stringify({ title: titleInput.value.trim() || null, ...(size ?? {}) });
  if (body === reported) return;
  reported = body;
  fetch(`/api/streams/${encodeURIComponent(stream)}`, {
    method: 'PATCH',
    headers: { 'Content-Type': 'application/json', ...authorization() },
    body,
  }).then((response) => { if (!response.ok) reported = ''; }, () => { reported = ''; });
}

function showEntry(entry) {
  $('s-viewers').textContent = entry ? String(entry.viewers) : '–';
  $('s-uptime').textContent = entry ? formatDuration(entry.uptime_s) : '–';
  $('meta').textContent = entry ? `${viewers(entry.viewers)} watching` : '';
  timeline.overview(entry ? entry.started_at * 1000 : null);
}

// Q&A moderation: the host view, with the publish token when one is typed in.
function startQuestions() {
  qa?.stop();
  const list = new QuestionList($('questions'), { host: true, onModerate: moderate });
  $('questions').replaceChildren();
  qa = new QAClient(stream, {
    host: true,
    token: tokenInput.value.trim(),
    onChange: () => {
      const sorted = qa.sorted();
      list.render(sorted);
      timeline.setMarkers(questionMarkers(sorted));
      $('qa-empty').hidden = sorted.length > 0;
      $('qa-count').textContent = sorted.length ? `(${sorted.length})` : '';
    },
    onConnection: (state, detail) => {
      const text = {
        connecting: 'Connecting to live questions…',
        open: '',
        offline: 'Questions open when you go live.',
      }[state] ?? (/token/i.test(detail || '')
        ? 'Enter the publish token to moderate questions.'
        : `Live questions are unavailable (${detail}). Retrying…`);
      $('qa-state').textContent = text;
      $('qa-state').hidden = !text;
      if (state === 'open') $('qa-empty').hidden = qa.questions.size > 0;
    },
  }).start();
}

async function moderate(id, flags, button) {
  button.disabled = true;
  try {
    await qa.moderate(id, flags);
  } catch (err) {
    $('qa-state').hidden = false;
    $('qa-state').textContent = `Not changed: ${err.message}`;
  } finally {
    button.disabled = false;
  }
}

function authorization() {
  const token = tokenInput.value.trim();
  return token ? { Authorization: `Bearer ${token}` } : {};
}

function setBusy(busy) {
  startButton.disabled = busy || !stream || !media;
  stopButton.disabled = !busy;
  codecSelect.disabled = busy;
  simulcastBox.disabled = busy;
  tokenInput.disabled = busy;
}

function setBadge(state, label) {
  $('state-badge').dataset.state = state;
  $('state-badge').textContent = label;
}

function showOverlay(text, busy) {
  $('overlay').hidden = false;
  $('overlay-text').textContent = text;
  $('spinner').hidden = !busy;
}

function describeError(err) {
  if (err?.name === 'NotAllowedError') {
    return 'Camera or microphone permission was denied. Allow access in the browser’s site settings, then reload.';
  }
  if (err?.name === 'NotFoundError' || err?.name === 'OverconstrainedError') {
    return 'No camera or microphone found.';
  }
  if (err?.name === 'NotReadableError') return 'The camera is in use by another application.';
  if (err?.status === 401 || err?.status === 403) return `Not allowed to publish: ${err.message}`;
  if (err?.status === 409) return 'Someone is already live on this stream name.';
  return err?.message || String(err);
}
