// The embeddable player: /embed/{stream} in an <iframe>. Plays muted (what autoplay
// allows), reconnects on its own, and offers unmute and full screen.
import { Player, mediaStats } from '/web/whip.js';
import { streamName } from '/web/page.js';
import { Timeline } from '/web/timeline.js';
import { HlsPlayer, wantsHls, describePath } from '/web/hls.js';

const $ = (id) => document.getElementById(id);
const video = $('video');
const stream = streamName('embed');
const LABELS = { connecting: 'Connecting', live: 'Live', stalled: 'Stalled',
  reconnecting: 'Reconnecting', ended: 'Ended', offline: 'Offline', error: 'Error' };
let player = null;
let hlsPlayer = null;
const query = new URLSearchParams(location.search);
const timeline = new Timeline($('timeline'), {
  onPosition: (position) => {
    if (player) player.paused = Boolean(position.paused);
    if (position.ended) {
      timeline.stop();
      player.stop();
      $('overlay').hidden = false;
      $('overlay-text').textContent = 'Replay ended';
      $('spinner').hidden = true;
    }
  },
});
document.addEventListener('keydown', (event) => timeline.handleKey(event));

/** The WHEP URL, with ?start= and ?session= passed through for a replay. */
function whepUrl() {
  const url = new URL(`/whep/${encodeURIComponent(stream)}`, location.href);
  for (const name of ['start', 'session']) {
    if (query.get(name) !== null) url.searchParams.set(name, query.get(name));
  }
  return url.pathname + url.search;
}

window.whipcast = Object.freeze({
  role: 'embed',
  stream,
  get session() { return player?.session ?? null; },
  get state() { return player?.session?.state ?? 'idle'; },
  get status() { return player?.status ?? null; },
  get timeline() { return timeline; },
  get via() { return hlsPlayer ? 'hls' : 'webrtc'; },
  get hls() { return hlsPlayer ? { latency: hlsPlayer.latency, stalls: hlsPlayer.stalls,
    path: hlsPlayer.path, state: hlsPlayer.status.state } : null; },
  stats: () => mediaStats(player?.pc),
});

if (stream) {
  $('watch-link').href = `/watch/${encodeURIComponent(stream)}`;
  const replay = query.get('start') !== null || query.get('session') !== null;
  let played = false; // WebRTC played once: later errors reconnect it, no fallback
  video.addEventListener('playing', () => { played = true; }, { once: true });
  const showState = ({ state, message }) => {
    if (timeline.position?.ended) return;
    if (state === 'error' && player && !hlsPlayer && !replay && !played) { startHls(); return; }
    timeline.follow(player?.session?.positionUrl ?? null);
    $('state-badge').dataset.state = state;
    $('state-badge').textContent = LABELS[state] ?? state;
    $('overlay').hidden = state === 'live' || state === 'stalled';
    $('overlay-text').textContent = state === 'offline' ? 'Offline. Playback starts when the stream goes live.' : message;
    $('spinner').hidden = state === 'error';
  };
  // LL-HLS when asked (?via=hls), when WHEP fails, or when WebRTC is not playing by 10 s.
  const startHls = () => {
    if (hlsPlayer) return;
    player?.stop();
    player = null;
    hlsPlayer = new HlsPlayer(stream, video, { onStatus: showState });
    hlsPlayer.start();
  };
  setInterval(() => { $('via').textContent = describePath(hlsPlayer); }, 1000);
  if (!replay && wantsHls(query)) {
    startHls();
  } else {
    player = new Player(whepUrl(), video, { onStatus: showState });
    player.start();
    if (!replay) {
      setTimeout(() => {
        if (!played && !['live', 'offline', 'ended'].includes(player?.status.state)) startHls();
      }, 10000);
    }
  }
  addEventListener('pagehide', () => (hlsPlayer ?? player)?.stop());
} else {
  $('overlay-text').textContent = 'Stream not found';
  $('spinner').hidden = true;
}
$('unmute').addEventListener('click', () => {
  video.muted = !video.muted;
  $('unmute').textContent = video.muted ? 'Unmute' : 'Mute';
  $('unmute').setAttribute('aria-pressed', String(!video.muted));
  video.play().catch(() => {});
});
$('fullscreen').hidden = !document.fullscreenEnabled;
$('fullscreen').addEventListener('click', () => {
  if (document.fullscreenElement) document.exitFullscreen();
  else $('frame').requestFullscreen();
});
