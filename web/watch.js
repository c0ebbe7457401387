import { Player, StatsSampler, mediaStats } from '/web/whip.js';
import { QAClient, QuestionList, MAX_TEXT } from '/web/qa.js';
import {
  streamName, setStatus, formatDuration, followStream, viewers, clipButton,
} from '/web/page.js';
import { Timeline, questionMarkers } from '/web/timeline.js';
import { HlsPlayer, wantsHls, describePath } from '/web/hls.js';

const $ = (id) => document.getElementById(id);
const video = $('video');
const unmuteButton = $('unmute');
const statsToggle = $('stats-toggle');
const statsOverlay = $('stats-overlay');
const stream = streamName('watch');
// A replay or rewind: /watch/{stream}?start=<epoch ms | -seconds>[&session=<id>]
const query = new URLSearchParams(location.search);
const replay = { start: query.get('start'), session: query.get('session') };
const isReplay = replay.start !== null || replay.session !== null;
let replayEnded = false;
const timeline = new Timeline($('timeline'), {
  onPosition: onPosition,
  onMessage: (text) => setStatus($('status'), text, 'warn'),
});

let player = null;
let hlsPlayer = null; // set once playback fell back to (or was asked for) LL-HLS
let played = false; // WebRTC played once: later errors reconnect it, no fallback
video.addEventListener('playing', () => { played = true; }, { once: true });
let sampler = null;
const WHEP_GIVE_UP_MS = 10000; // not playing over WebRTC by then: LL-HLS instead
let qa = null;

// Read-only handle for tests and the console: window.whipcast.stats() etc.
window.whipcast = Object.freeze({
  role: 'watch',
  stream,
  get session() { return player?.session ?? null; },
  get pc() { return player?.pc ?? null; },
  get state() { return player?.session?.state ?? 'idle'; },
  get status() { return player?.status ?? null; },
  get qa() { return qa; },
  get timeline() { return timeline; },
  get via() { return hlsPlayer ? 'hls' : 'webrtc'; },
  get hls() { return hlsPlayer ? { latency: hlsPlayer.latency, stalls: hlsPlayer.stalls,
    path: hlsPlayer.path, state: hlsPlayer.status.state } : null; },
  stats: () => mediaStats(player?.pc),
});

const STATES = {
  connecting: ['Connecting', ''],
  live: ['Live', 'ok'],
  stalled: ['Stalled', 'warn'],
  reconnecting: ['Reconnecting', 'warn'],
  ended: ['Ended', 'warn'],
  replay: ['Replay', ''],
  paused: ['Paused', ''],
  offline: ['Offline', 'warn'],
  error: ['Error', 'error'],
  stopped: ['Stopped', ''],
};

if (!stream) {
  setStatus($('status'), 'No stream name in the address. Pick a stream on the home page.', 'error');
  showOverlay('Stream not found', false);
  $('clip').disabled = true;
} else {
  document.title = `${stream} · whipcast`;
  $('title').textContent = stream;
  $('studio-link').href = `/studio/${encodeURIComponent(stream)}`;
  startPlayer();
  startQuestions();
  followStream(stream, showEntry);
  clipButton($('clip'), $('clip-status'), stream);
}

/** The WHEP URL: live, or from a moment (start) of a broadcast (session). */
function whepUrl(start = replay.start) {
  const url = new URL(`/whep/${encodeURIComponent(stream)}`, location.href);
  if (start !== null && start !== undefined) url.searchParams.set('start', String(start));
  if (replay.session) url.searchParams.set('session', replay.session);
  return url.pathname + url.search;
}

function startPlayer() {
  setInterval(updateStats, 1000);
  addEventListener('pagehide', () => (hlsPlayer ?? player)?.stop());
  document.addEventListener('keydown', (event) => timeline.handleKey(event));
  if (!isReplay && wantsHls(query)) {
    startHls();
    return;
  }
  player = new Player(whepUrl(), video, { onStatus: showState });
  player.start();
  if (!isReplay) {
    setTimeout(() => {
      const state = player?.status.state;
      if (!played && !['live', 'offline', 'ended', 'paused'].includes(state)) startHls();
    }, WHEP_GIVE_UP_MS);
  }
}

/** Each position report: keep reconnects where the viewer is, and stop at a replay's end. */
function onPosition(position) {
  if (position.ended) {
    endReplay();
    return;
  }
  player.paused = Boolean(position.paused);
  // A reconnect (the player's own loop) resumes at the viewer's moment, not the start.
  player.url = position.live ? whepUrl(null) : whepUrl(Math.round(position.position));
  if (player.status?.state === 'live') {
    const label = position.paused ? 'paused' : position.live ? 'live' : 'replay';
    const badge = $('state-badge');
    badge.textContent = STATES[label][0];
    badge.dataset.state = label;
    const behind = formatDuration(Math.max(0, position.live_edge - position.position) / 1000);
    setStatus($('status'), position.live ? 'Live'
      : `${position.paused ? 'Paused' : 'Playing'} ${behind} behind live`, 'ok');
  }
}

function endReplay() {
  if (replayEnded) return;
  replayEnded = true;
  timeline.stop();
  player.stop();
  const badge = $('state-badge');
  badge.textContent = 'Replay ended';
  badge.dataset.state = 'ended';
  setStatus($('status'), 'Replay ended. Reload the page to watch it again.');
  showOverlay('Replay ended', false);
}

/** Leave WebRTC for LL-HLS: WHEP failed (UDP blocked, egress full) or ?via=hls. */
function startHls() {
  if (hlsPlayer) return;
  player?.stop();
  player = null;
  hlsPlayer = new HlsPlayer(stream, video, { onStatus: showState });
  hlsPlayer.start();
}

function showState({ state, message }) {
  if (replayEnded) return;
  if (state === 'error' && player && !hlsPlayer && !isReplay && !played) {
    startHls(); // WHEP was refused or could not connect
    return;
  }
  if (state === 'ended' && (isReplay || timeline.position?.ended)) {
    endReplay(); // the server closed the replay at its end
    return;
  }
  timeline.follow(player?.session?.positionUrl ?? null);
  const [label, tone] = STATES[state] ?? [state, ''];
  const badge = $('state-badge');
  badge.textContent = label;
  badge.dataset.state = state;
  setStatus($('status'), message, tone);
  if (state === 'live') {
    $('overlay').hidden = true;
  } else if (state === 'offline') {
    showOverlay(isReplay ? 'This broadcast is not available (any more).'
      : `“${stream}” is offline. Playback starts when it goes live.`, !isReplay);
  } else if (state === 'ended') {
    showOverlay('The broadcast ended. Waiting for it to come back…', true);
  } else if (state !== 'stalled') {
    showOverlay(message, state !== 'error' && state !== 'stopped');
  }
}

function showOverlay(text, busy) {
  $('overlay').hidden = false;
  $('overlay-text').textContent = text;
  $('spinner').hidden = !busy;
}

function showEntry(entry) {
  if (entry?.title) $('title').textContent = entry.title;
  $('meta').textContent = entry
    ? `${entry.title ? `${stream} · ` : ''}${viewers(entry.viewers)} · live for ${formatDuration(entry.uptime_s)}`
    : `${stream} · ${isReplay ? 'replay' : 'offline'}`;
}

// Mute/unmute. Autoplay policies allow muted playback only, so the page starts
// muted and unmuting is always a user gesture.
unmuteButton.addEventListener('click', () => {
  video.muted = !video.muted;
  unmuteButton.textContent = video.muted ? 'Unmute' : 'Mute';
  unmuteButton.setAttribute('aria-pressed', String(!video.muted));
  video.play().catch(() => {});
});
const fullscreen = $('fullscreen');
fullscreen.hidden = !(document.fullscreenEnabled || video.webkitEnterFullscreen);
fullscreen.addEventListener('click', () => {
  if (document.fullscreenElement) document.exitFullscreen();
  else if ($('frame').requestFullscreen) $('frame').requestFullscreen();
  else video.webkitEnterFullscreen?.();
});
statsToggle.addEventListener('click', () => {
  statsOverlay.hidden = !statsOverlay.hidden;
  statsToggle.setAttribute('aria-pressed', String(!statsOverlay.hidden));
  updateStats();
});

// The session resource (GET) says whether the gateway paused this viewer's video
// because its link is too slow, and its bandwidth estimate.
async function viewerState() {
  if (!player?.location) return null;
  try {
    const response = await fetch(player.location, { cache: 'no-store' });
    return response.ok ? await response.json() : null;
  } catch {
    return null;
  }
}

// Simulcast: which of the stream's layers the gateway chose for this viewer's link.
function describeLayer(view) {
  if (!view) return '–';
  if (view.layer === null || view.layer === undefined) return 'single';
  const size = view.layer_width ? ` (${view.layer_width}×${view.layer_height})` : '';
  const rank = view.layer === 0 ? 'best' : `${view.layer + 1}`;
  return `${rank} of ${view.layers}${size}`;
}

async function updateStats() {
  $('via').textContent = describePath(hlsPlayer);
  const pc = player?.pc;
  if (!pc) {
    sampler = null;
    $('stats').textContent = '';
    return;
  }
  if (sampler?.pc !== pc) sampler = new StatsSampler(pc);
  const s = await sampler.sample();
  const view = await viewerState();
  const resolution = s.frameWidth ? `${s.frameWidth}×${s.frameHeight}` : '–';
  // The gateway adapts what it sends to this viewer's link: say so when it does.
  const notice = view?.video === 'paused' ? 'video paused: connection too slow'
    : view?.video === 'reduced' ? 'reduced quality' : null;
  $('stats').textContent = [notice, s.codec, s.frameWidth ? resolution : null,
    s.fps !== null ? `${s.fps} fps` : null].filter(Boolean).join(' · ');
  if (statsOverlay.hidden) return;
  // Glass-to-glass latency needs the publisher's clock; what the player itself adds
  // (jitter buffer) plus half the round trip is the part the viewer can see.
  const latency = s.jitterBufferMs !== null && s.rttMs !== null
    ? `≈ ${s.jitterBufferMs + Math.round(s.rttMs / 2)} ms` : '–';
  const rows = [
    ['Codec', [s.codec, s.audioCodec].filter(Boolean).join(' + ') || '–'],
    ['Resolution', resolution],
    ['Frame rate', s.fps !== null ? `${s.fps} fps` : '–'],
    ['Bitrate', s.bitrateKbps !== null ? `${s.bitrateKbps} kbit/s` : '–'],
    ['Round trip', s.rttMs !== null ? `${s.rttMs} ms` : '–'],
    ['Jitter buffer', s.jitterBufferMs !== null ? `${s.jitterBufferMs} ms` : '–'],
    ['Player latency', latency],
    ['Packet loss', `${s.lossPercent}%`],
    ['Frames decoded', String(s.framesDecoded)],
    ['Layer', describeLayer(view)],
    ['Estimate', view?.estimate_kbps != null ? `${view.estimate_kbps} kbit/s` : '–'],
  ];
  statsOverlay.replaceChildren(...rows.flatMap(([name, value]) => {
    const dt = document.createElement('dt');
    dt.textContent = name;
    const dd = document.createElement('dd');
    dd.textContent = value;
    return [dt, dd];
  }));
}

// Audience Q&A.
function startQuestions() {
  const list = new QuestionList($('questions'), { onVote: vote });
  const render = () => {
    const sorted = qa.sorted();
    timeline.setMarkers(questionMarkers(sorted));
    list.render(sorted, qa.voted);
    $('qa-empty').hidden = sorted.length > 0;
    $('qa-count').textContent = sorted.length ? `(${sorted.length})` : '';
  };
  qa = new QAClient(stream, {
    onChange: render,
    onConnection: (state, detail) => {
      const text = {
        connecting: 'Connecting to live questions…',
        open: '',
        offline: 'Questions open when the stream is live.',
      }[state] ?? `Live questions are unavailable (${detail}). Retrying…`;
      $('qa-state').textContent = text;
      $('qa-state').hidden = !text;
      if (state === 'open') $('qa-empty').hidden = qa.questions.size > 0;
    },
  }).start();

  const name = $('ask-name');
  const text = $('ask-text');
  name.value = localStorage.getItem('whipcast.name') || '';
  const counter = () => {
    const length = text.value.length;
    $('ask-counter').textContent = `${length} / ${MAX_TEXT}`;
    if (length > MAX_TEXT) $('ask-counter').dataset.over = '';
    else delete $('ask-counter').dataset.over;
  };
  text.addEventListener('input', counter);
  text.addEventListener('keydown', (event) => {
    if (event.key === 'Enter' && (event.ctrlKey || event.metaKey)) $('ask').requestSubmit();
  });
  $('ask').addEventListener('submit', async (event) => {
    event.preventDefault();
    const status = $('ask-status');
    if (!text.value.trim()) {
      status.textContent = 'Type a question first.';
      text.setAttribute('aria-invalid', 'true');
      text.focus();
      return;
    }
    text.removeAttribute('aria-invalid');
    $('ask-submit').disabled = true;
    status.textContent = 'Sending…';
    try {
      localStorage.setItem('whipcast.name', name.value.trim());
      await qa.ask(name.value, text.value);
      text.value = '';
      counter();
      status.textContent = 'Sent. Others see it now.';
    } catch (err) {
      status.textContent = err.status === 429
        ? `You are asking quickly; try again in ${err.retryAfter ?? 'a few'} s.`
        : err.status === 409 ? 'Questions open when the stream is live.' : err.message;
    } finally {
      $('ask-submit').disabled = false;
    }
  });
}

async function vote(id, button) {
  button.disabled = true;
  try {
    await qa.vote(id);
  } catch (err) {
    button.disabled = false;
    $('ask-status').textContent = err.status === 429
      ? `Too many votes at once; try again in ${err.retryAfter ?? 'a few'} s.` : err.message;
  }
}
