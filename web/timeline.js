// The rewind timeline shared by the watch, embed and studio pages: a seek bar over the
// window Kafka still holds, -10 s / +10 s, pause/play, a LIVE control that says how far
// behind live the viewer is, and question markers at their stream time.
//
// It drives a WHEP session's position API (the Link rel="urn:whipcast:position" URL,
// whip.js Session.positionUrl): GET it about once a second, POST {"seek": s},
// {"at": epoch_ms}, {"live": true} or {"paused": bool}. Without a session (the studio)
// it shows the broadcast so far and its markers, and choosing a moment opens a replay.
//
// The markup lives in the page (see watch.html); this module finds its parts by
// data-part inside the root element. Keyboard: arrows seek 10 s, space pauses, L goes
// live, Home/End jump to the window's ends. User text is set with textContent only.

import { formatDuration } from './page.js';

const POLL_MS = 1000;
const STEP_S = 10;
const LIVE_SLACK_MS = 3000; // closer than this to the edge counts as live

export class Timeline {
  /**
   * @param {HTMLElement} root Element holding the parts (data-part="range", ...).
   * @param {object} [options]
   * @param {(position: object) => void} [options.onPosition] Every position report.
   * @param {(message: string) => void} [options.onMessage] Refusals to show the user.
   * @param {(atMs: number) => void} [options.onOpen] Overview mode: a moment was chosen.
   */
  constructor(root, { onPosition = () => {}, onMessage = () => {}, onOpen = null } = {}) {
    this.root = root;
    this.url = null;
    /** The last report: { position, window_start, live_edge, live, paused, ended }. */
    this.position = null;
    this._receivedAt = 0;
    this._markers = [];
    this._onPosition = onPosition;
    this._onMessage = onMessage;
    this._onOpen = onOpen;
    this._timer = 0;
    this._dragging = false;
    this._busy = false;
    const part = (name) => root.querySelector(`[data-part="${name}"]`);
    this.range = part('range');
    this.back = part('back');
    this.forward = part('forward');
    this.pause = part('pause');
    this.live = part('live');
    this.time = part('time');
    this.markerLayer = part('markers');
    this._wire();
    root.hidden = true;
  }

  /** Follow a WHEP session's position API (null: hide the timeline). */
  follow(url) {
    if (url === this.url) return;
    this.url = url;
    clearTimeout(this._timer);
    this.position = null;
    this.root.hidden = !url;
    if (url) this._poll();
  }

  /** Overview mode (no session): show [startMs, now] and open moments via onOpen. */
  overview(startMs) {
    this.url = null;
    clearTimeout(this._timer);
    this.root.hidden = !startMs;
    this.root.dataset.mode = 'overview';
    if (!startMs) return;
    const now = Date.now();
    this._apply({ position: now, window_start: startMs, live_edge: now, live: true,
      paused: false, ended: false });
  }

  stop() {
    clearTimeout(this._timer);
    this.url = null;
  }

  /** Markers: [{ id, atMs, label }] (label: plain text, e.g. the question). */
  setMarkers(markers) {
    this._markers = markers;
    this._renderMarkers();
  }

  /** Where playback is now, interpolated since the last report (epoch ms). */
  now() {
    const p = this.position;
    if (!p) return null;
    if (p.paused || p.ended) return p.position;
    const elapsed = performance.now() - this._receivedAt;
    return Math.min(p.position + elapsed, p.live_edge + elapsed);
  }

  /** Send one move to the position API: { seek }, { at }, { live: true } or { paused }. */
  async move(body, retried = false) {
    if (!this.url) {
      if (this._onOpen && body.at !== undefined) this._onOpen(body.at);
      return;
    }
    if (this._busy) return;
    this._busy = true;
    this.root.setAttribute('aria-busy', 'true');
    try {
      const response = await fetch(this.url, {
        method: 'POST',
        headers: { 'Content-Type': 'application/json' },
        body: JSON.stringify(body),
      });
      const data = await response.json().catch(() => ({}));
      if (response.ok) {
        this._apply(data);
      } else if (response.status === 422 && data.window_start !== undefined) {
        // Outside the window: clamp to it and try once more.
        const target = body.seek !== undefined ? (this.now() ?? 0) + body.seek * 1000 : body.at;
        if (target !== undefined && !retried) {
          const clamped = Math.min(Math.max(target, data.window_start), data.live_edge);
          this._busy = false;
          return this.move({ at: clamped }, true);
        }
        this._onMessage(data.detail || 'That moment is no longer available.');
      } else {
        this._onMessage(data.detail || `Could not move (HTTP ${response.status}).`);
      }
    } catch (err) {
      this._onMessage(`Could not reach the server: ${err.message}`);
    } finally {
      this._busy = false;
      this.root.removeAttribute('aria-busy');
    }
  }

  async _poll() {
    const url = this.url;
    try {
      const response = await fetch(url, { cache: 'no-store' });
      if (url !== this.url) return;
      if (response.ok) this._apply(await response.json());
      else if (response.status === 404) this.root.hidden = true; // the session is gone
    } catch { /* next tick */ }
    if (url === this.url && !this.position?.ended) {
      this._timer = setTimeout(() => this._poll(), POLL_MS);
    }
  }

  _apply(position) {
    if (typeof position?.position !== 'number') return;
    const clean = position;
    this.position = clean;
    this._receivedAt = performance.now();
    this.root.dataset.live = String(Boolean(clean.live));
    this.root.dataset.ended = String(Boolean(clean.ended));
    this._render();
    this._renderMarkers();
    try { this._onPosition(clean); } catch (err) { console.error(err); }
  }

  _render() {
    const p = this.position;
    if (!p) return;
    const at = this.now();
    const start = p.window_start;
    const edge = Math.max(p.live_edge, start + 1000);
    const behindS = Math.max(0, (edge - at) / 1000);
    const atLive = p.live || behindS * 1000 < LIVE_SLACK_MS;
    const overview = this.root.dataset.mode === 'overview';
    this.range.min = String(Math.floor(start));
    this.range.max = String(Math.ceil(edge));
    if (!this._dragging) this.range.value = String(Math.round(at));
    const offset = formatDuration((at - start) / 1000);
    const length = formatDuration((edge - start) / 1000);
    let text;
    if (overview) text = `${length} so far`;
    else if (p.ended) text = 'Replay ended';
    else if (atLive) text = 'Live';
    else text = `${formatDuration(behindS)} behind live`;
    this.range.setAttribute('aria-valuetext',
      overview ? `${length} broadcast so far` : `${offset} of ${length}, ${text}`);
    this.time.textContent = overview ? text : `${offset} / ${length}`;
    this.live.textContent = atLive && !p.paused ? 'Live' : `−${formatDuration(behindS)} · Go live`;
    this.live.setAttribute('aria-pressed', String(atLive && !p.paused));
    this.live.setAttribute('aria-label', atLive && !p.paused
      ? 'Playing live' : `${formatDuration(behindS)} behind live. Go to live`);
    this.live.disabled = overview || Boolean(p.ended) || (atLive && !p.paused);
    this.pause.textContent = p.paused ? 'Play' : 'Pause';
    this.pause.setAttribute('aria-label', p.paused ? 'Play' : 'Pause');
    this.pause.setAttribute('aria-pressed', String(Boolean(p.paused)));
    for (const button of [this.pause, this.back, this.forward]) {
      button.disabled = overview || Boolean(p.ended);
    }
    this.forward.disabled ||= atLive;
    this.range.disabled = Boolean(p.ended);
  }

  _renderMarkers() {
    const p = this.position;
    const layer = this.markerLayer;
    if (!p || !layer) return;
    const start = p.window_start;
    const edge = Math.max(p.live_edge, start + 1000);
    const shown = this._markers.filter((m) => m.atMs >= start && m.atMs <= edge);
    const items = shown.map((marker) => {
      const button = document.createElement('button');
      button.type = 'button';
      button.className = 'marker';
      button.dataset.id = marker.id;
      button.dataset.at = String(marker.atMs);
      button.style.left = `${(100 * (marker.atMs - start)) / (edge - start)}%`;
      const when = formatDuration((marker.atMs - start) / 1000);
      button.setAttribute('aria-label', `Question at ${when}: ${marker.label}`);
      button.title = `${when} · ${marker.label}`;
      button.addEventListener('click', () => this.move({ at: marker.atMs }));
      return button;
    });
    layer.replaceChildren(...items);
  }

  _wire() {
    this.range.addEventListener('input', () => {
      this._dragging = true;
      const p = this.position;
      if (p) this.time.textContent = `${formatDuration((Number(this.range.value) - p.window_start) / 1000)}`;
    });
    this.range.addEventListener('change', () => {
      this._dragging = false;
      this.move({ at: Number(this.range.value) });
    });
    this.back.addEventListener('click', () => this.move({ seek: -STEP_S }));
    this.forward.addEventListener('click', () => this.move({ seek: STEP_S }));
    this.pause.addEventListener('click', () => this.move({ paused: !this.position?.paused }));
    this.live.addEventListener('click', () => this.move({ live: true }));
    setInterval(() => { if (this.position && !this.root.hidden) this._render(); }, 500);
  }

  /**
   * Keyboard shortcuts for the player area: call from a keydown listener. Returns true
   * when the key was used. Keys typed into text fields are never taken.
   */
  handleKey(event) {
    if (this.root.hidden || !this.url || event.ctrlKey || event.metaKey || event.altKey) return false;
    const target = event.target;
    const typing = target.closest?.('textarea, select, [contenteditable]')
      || (target.tagName === 'INPUT' && target.type !== 'range');
    if (typing) return false;
    const onButton = target.tagName === 'BUTTON';
    const p = this.position;
    let body = null;
    switch (event.key) {
      case 'ArrowLeft': body = { seek: -STEP_S }; break;
      case 'ArrowRight': body = { seek: STEP_S }; break;
      case 'Home': if (p) body = { at: p.window_start }; break;
      case 'End': case 'l': case 'L': body = { live: true }; break;
      case ' ': case 'k': case 'K':
        if (onButton && event.key === ' ') return false; // the button's own action
        body = { paused: !p?.paused };
        break;
      default: return false;
    }
    if (!body) return false;
    event.preventDefault();
    this.move(body);
    return true;
  }
}

/**
 * Markers from Q&A questions at their stream time. The server records stream_time as
 * created_at minus the broadcast's start, on the clock frame times use, so created_at
 * is that moment in the position API's epoch milliseconds.
 */
export function questionMarkers(questions) {
  return questions
    .filter((q) => !q.hidden && typeof q.created_at === 'number')
    .map((q) => ({ id: q.id, atMs: q.created_at * 1000, label: `${q.name}: ${q.text}`.slice(0, 140) }));
}
