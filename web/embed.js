// The embeddable player: /embed/{stream} in an <iframe>. Plays muted (what autoplay
// allows), reconnects on its own, and offers unmute and full screen.
import { Player, mediaStats } from '/web/whip.js';
import { streamName } from '/web/page.js';

const $ = (id) => document.getElementById(id);
const video = $('video');
const stream = streamName('embed');
const LABELS = { connecting: 'Connecting', live: 'Live', stalled: 'Stalled',
  reconnecting: 'Reconnecting', ended: 'Ended', offline: 'Offline', error: 'Error' };
let player = null;

window.whipcast = Object.freeze({
  role: 'embed',
  stream,
  get session() { return player?.session ?? null; },
  get state() { return player?.session?.state ?? 'idle'; },
  get status() { return player?.status ?? null; },
  stats: () => mediaStats(player?.pc),
});

if (stream) {
  $('watch-link').href = `/watch/${encodeURIComponent(stream)}`;
  player = new Player(`/whep/${encodeURIComponent(stream)}`, video, {
    onStatus: ({ state, message }) => {
      $('state-badge').dataset.state = state;
      $('state-badge').textContent = LABELS[state] ?? state;
      $('overlay').hidden = state === 'live' || state === 'stalled';
      $('overlay-text').textContent = state === 'offline' ? 'Offline. Playback starts when the stream goes live.' : message;
      $('spinner').hidden = state === 'error';
    },
  }).start();
  addEventListener('pagehide', () => player.stop());
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
