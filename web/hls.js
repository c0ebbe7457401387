// LL-HLS playback, the fallback when WebRTC (WHEP) cannot play: UDP blocked, every
// egress full (503), or asked for with ?via=hls. hls.js (vendor/hls.light.min.js,
// 1.7.4 from npm, served by whipcast itself) plays it where Media Source Extensions
// exist; Safari without MSE uses its native HLS (H.264 plays; whether Opus audio does
// depends on the Safari version, see docs/hls.md).

const HLS_SCRIPT = '/web/vendor/hls.light.min.js';
let loading = null;

/** Load hls.js once (a classic script that defines window.Hls). */
function loadHlsJs() {
  if (window.Hls) return Promise.resolve(window.Hls);
  loading ??= new Promise((resolve, reject) => {
    const script = document.createElement('script');
    script.src = HLS_SCRIPT;
    script.onload = () => resolve(window.Hls);
    script.onerror = () => reject(new Error('hls.js did not load'));
    document.head.append(script);
  });
  return loading;
}

/** Whether the page should start on HLS rather than WebRTC. */
export function wantsHls(query) {
  return query.get('via') === 'hls';
}

/**
 * Plays /hls/{stream}/index.m3u8 into a <video>; reports the same states as the WHEP
 * Player ('connecting', 'live', 'stalled', 'ended', 'error') and its live latency.
 */
export class HlsPlayer {
  constructor(stream, video, { onStatus = () => {} } = {}) {
    this.url = `/hls/${encodeURIComponent(stream)}/index.m3u8`;
    this.video = video;
    this.hls = null;
    this.path = 'LL-HLS';
    this.stalls = 0;
    this.status = { state: 'connecting', message: 'Connecting over LL-HLS…' };
    this._onStatus = onStatus;
    this._retry = null;
    this._stopped = false;
  }

  /** Seconds behind the live edge (hls.js); for native HLS, from the program date. */
  get latency() {
    if (this.hls) return Number.isFinite(this.hls.latency) ? this.hls.latency : null;
    const date = this.video.getStartDate?.();
    if (!date || Number.isNaN(date.getTime())) return null;
    return (Date.now() - (date.getTime() + this.video.currentTime * 1000)) / 1000;
  }

  async start() {
    this._stopped = false;
    const response = await fetch(this.url, { method: 'GET' }).catch(() => null);
    if (this._stopped) return;
    if (!response || !response.ok) {
      const problem = await response?.json().catch(() => null);
      const reason = problem?.detail || 'LL-HLS is not available';
      this._set(response?.status === 404 ? 'offline' : 'error', reason);
      if (response?.status !== 415) this._retry = setTimeout(() => this.start(), 3000);
      return;
    }
    const Hls = this.video.canPlayType('application/vnd.apple.mpegurl') && !window.MediaSource
      ? null : await loadHlsJs().catch(() => null);
    if (Hls && Hls.isSupported()) {
      this.path = 'LL-HLS (hls.js)';
      const hls = new Hls({ lowLatencyMode: true, enableWorker: false, maxLiveSyncPlaybackRate: 1.5,
        backBufferLength: 30 });
      this.hls = hls;
      hls.on(Hls.Events.ERROR, (_event, data) => {
        if (data.details === 'bufferStalledError') { this.stalls += 1; this._set('stalled', 'Buffering…'); }
        if (data.fatal) {
          hls.destroy();
          this.hls = null;
          this._set('error', `LL-HLS failed (${data.details}). Retrying…`);
          this._retry = setTimeout(() => this.start(), 2000);
        }
      });
      hls.on(Hls.Events.BUFFER_EOS, () => this._set('ended', 'The broadcast ended'));
      hls.loadSource(this.url);
      hls.attachMedia(this.video);
    } else if (this.video.canPlayType('application/vnd.apple.mpegurl')) {
      this.path = 'LL-HLS (native)';
      this.video.src = this.url;
    } else {
      this._set('error', 'This browser cannot play HLS');
      return;
    }
    this.video.addEventListener('playing', () => this._set('live', `Playing over ${this.path}`));
    this.video.addEventListener('waiting', () => this._set('stalled', 'Buffering…'));
    this.video.play().catch(() => {});
  }

  stop() {
    this._stopped = true;
    clearTimeout(this._retry);
    this.hls?.destroy();
    this.hls = null;
    this._set('stopped', 'Stopped');
  }

  _set(state, message) {
    if (this.status.state === state && this.status.message === message) return;
    this.status = { state, message };
    try { this._onStatus(this.status); } catch (err) { console.error(err); }
  }
}

/** The path and latency line the pages show: "via WebRTC" or "via LL-HLS · 1.8 s behind". */
export function describePath(hlsPlayer) {
  if (!hlsPlayer) return 'via WebRTC';
  const latency = hlsPlayer.latency;
  return `via ${hlsPlayer.path}` + (latency !== null ? ` · ${latency.toFixed(1)} s behind live` : '');
}
