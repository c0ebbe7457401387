// whipcast browser client: WHIP publish (RFC 9725) and WHEP play (draft-ietf-wish-whep).
//
// Plain ES module, no dependencies, no build step. Signalling is non-trickle: the client
// gathers its ICE candidates (at most ICE_GATHER_TIMEOUT_MS), POSTs one complete offer,
// applies the answer, and DELETEs the session resource on stop().
//
//   import { publish, play } from '/web/whip.js';
//   const session = await publish('/whip/demo', mediaStream, { token, videoCodec: 'h264' });
//   const viewer = await play('/whep/demo', videoElement, { onState: (s) => ... });
//   await session.stop();

const ICE_GATHER_TIMEOUT_MS = 2000;

/** Failure of a WHIP/WHEP exchange, with the server's problem+json reason when it gave one. */
export class WhipError extends Error {
  constructor(message, { status = 0, title = '', detail = '', retryAfter = null } = {}) {
    super(message);
    this.name = 'WhipError';
    /** HTTP status; 0 when the request never got an answer. */
    this.status = status;
    this.title = title;
    this.detail = detail;
    /** Seconds from a Retry-After header, or null. */
    this.retryAfter = retryAfter;
  }
}

/**
 * Publish a MediaStream's first audio and video track to a WHIP endpoint.
 *
 * @param {string|URL} url WHIP endpoint, e.g. '/whip/demo' (relative to the page).
 * @param {MediaStream} stream Media to send; missing kinds are offered without a track.
 * @param {object} [options]
 * @param {string} [options.token] Bearer token for the Authorization header.
 * @param {'h264'|'vp8'} [options.videoCodec] Video codec to put first in the offer
 *   (default: H.264 when this browser can send it, since it plays on the most devices).
 * @param {boolean} [options.simulcast] Send the video as three encodings (full, 1/2 and
 *   1/4 resolution: SIMULCAST_ENCODINGS) so that viewers on slow links can get a smaller
 *   one; default true. Falls back to one encoding where the browser cannot.
 * @param {RTCIceServer[]} [options.iceServers] STUN/TURN servers used to gather candidates.
 * @param {(state: string, session: Session) => void} [options.onState] See Session.state.
 * @param {AbortSignal} [options.signal] Aborting it stops the session, even mid-setup.
 * @returns {Promise<Session>} Resolves once the answer is applied (media may still be connecting).
 */
export async function publish(url, stream, options = {}) {
  const pc = newPeerConnection(options.iceServers);
  const session = new Session(pc, options);
  try {
    for (const kind of ['audio', 'video']) {
      const track = stream ? stream.getTracks().find((t) => t.kind === kind) : undefined;
      const init = { direction: 'sendonly', streams: stream ? [stream] : [] };
      const layered = kind === 'video' && track && options.simulcast !== false;
      const transceiver = layered ? addSimulcastTransceiver(pc, track, init)
        : pc.addTransceiver(track || kind, init);
      if (kind === 'video') preferVideoCodec(transceiver, options.videoCodec);
    }
    await session._negotiate(url);
    return session;
  } catch (err) {
    session._close();
    throw session._stopped ? new WhipError('Stopped') : err;
  }
}

/**
 * The simulcast encodings the studio sends, best first (whipcast ingest orders layers
 * by size anyway). Rates follow libwebrtc's own table for a 1280x720 source; the
 * browser turns the top layers off by itself when its uplink cannot carry them, and
 * sends fewer layers for small sources (libwebrtc needs about 960x540 for three).
 */
export const SIMULCAST_ENCODINGS = [
  { rid: 'h', scaleResolutionDownBy: 1, maxBitrate: 2_500_000 },
  { rid: 'm', scaleResolutionDownBy: 2, maxBitrate: 700_000 },
  { rid: 'l', scaleResolutionDownBy: 4, maxBitrate: 200_000 },
];

/** A send-only video transceiver with SIMULCAST_ENCODINGS, or with one encoding where
 * this browser rejects them. */
function addSimulcastTransceiver(pc, track, init) {
  try {
    return pc.addTransceiver(track, {
      ...init,
      sendEncodings: SIMULCAST_ENCODINGS.map((e) => ({ ...e })),
    });
  } catch {
    return pc.addTransceiver(track, init);
  }
}

/**
 * Play a WHEP stream into a <video> element (audio and video on one MediaStream).
 *
 * @param {string|URL} url WHEP endpoint, e.g. '/whep/demo' (relative to the page).
 * @param {HTMLVideoElement} video Element that gets the remote MediaStream as srcObject.
 * @param {object} [options]
 * @param {string} [options.token] Bearer token for the Authorization header.
 * @param {RTCIceServer[]} [options.iceServers]
 * @param {(state: string, session: Session) => void} [options.onState] See Session.state.
 * @param {AbortSignal} [options.signal] Aborting it stops the session, even mid-setup.
 * @returns {Promise<Session>}
 */
export async function play(url, video, options = {}) {
  const pc = newPeerConnection(options.iceServers);
  const session = new Session(pc, options);
  const remote = new MediaStream();
  pc.addEventListener('track', (event) => {
    remote.addTrack(event.track);
    if (video && video.srcObject !== remote) video.srcObject = remote;
  });
  try {
    pc.addTransceiver('audio', { direction: 'recvonly' });
    pc.addTransceiver('video', { direction: 'recvonly' });
    await session._negotiate(url);
    if (video) video.play().catch(() => {}); // autoplay refusals are the page's business
    return session;
  } catch (err) {
    session._close();
    throw session._stopped ? new WhipError('Stopped') : err;
  }
}

/** Whether this browser can send the given video codec ('h264' or 'vp8'). */
export function canSendVideoCodec(codec) {
  const caps = globalThis.RTCRtpSender?.getCapabilities?.('video');
  if (!caps) return false;
  return caps.codecs.some((c) => codecRank(c, codec) >= 0);
}

/**
 * A few figures from getStats() for status lines and tests: codec, frame counts, size.
 * Works for both directions (outbound-rtp for publishers, inbound-rtp for players).
 */
export async function mediaStats(pc) {
  const out = { codec: null, audioCodec: null, framesEncoded: 0, framesDecoded: 0,
    framesSent: 0, framesReceived: 0, frameWidth: 0, frameHeight: 0,
    bytesSent: 0, bytesReceived: 0, packetsLost: 0, encodings: [] };
  if (!pc) return out;
  const report = await pc.getStats();
  const mime = (id) => {
    const codec = id && report.get(id);
    return codec ? codec.mimeType.replace(/^(video|audio)\//, '') : null;
  };
  report.forEach((s) => {
    if (s.type !== 'outbound-rtp' && s.type !== 'inbound-rtp') return;
    if (s.kind === 'audio') {
      out.audioCodec = mime(s.codecId) || out.audioCodec;
      return;
    }
    if (s.kind !== 'video') return;
    out.codec = mime(s.codecId) || out.codec;
    // Simulcast: one outbound-rtp per encoding; frame counts are the busiest one's.
    out.framesEncoded = Math.max(out.framesEncoded, s.framesEncoded || 0);
    out.framesDecoded += s.framesDecoded || 0;
    out.framesSent = Math.max(out.framesSent, s.framesSent || 0);
    out.framesReceived += s.framesReceived || 0;
    out.frameWidth = Math.max(out.frameWidth, s.frameWidth || 0);
    out.frameHeight = Math.max(out.frameHeight, s.frameHeight || 0);
    out.bytesSent += s.bytesSent || 0;
    out.bytesReceived += s.bytesReceived || 0;
    out.packetsLost += s.packetsLost || 0;
    if (s.type === 'outbound-rtp' && s.rid !== undefined) {
      out.encodings.push({ rid: s.rid, frameWidth: s.frameWidth || 0,
        frameHeight: s.frameHeight || 0, framesEncoded: s.framesEncoded || 0,
        bytesSent: s.bytesSent || 0, pliCount: s.pliCount || 0 });
    }
  });
  out.encodings.sort((a, b) => b.frameWidth - a.frameWidth);
  return out;
}

/**
 * One WHIP or WHEP session.
 *
 * state: 'new' → 'gathering' → 'signaling' → 'connecting' → 'connected', then possibly
 * 'disconnected' (may recover), 'failed', 'ended' (the server closed the session: DTLS
 * close_notify, e.g. a WHEP stream whose publisher left), and finally 'closed' after stop().
 */
class Session {
  constructor(pc, options) {
    this.pc = pc;
    this.state = 'new';
    /** Absolute URL of the session resource (from the Location header). */
    this.location = null;
    this.etag = null;
    /**
     * ICE servers the endpoint announced in Link headers. This session's candidates were
     * gathered before the POST, so they only help a later attempt (pass as iceServers).
     */
    this.iceServers = [];
    /**
     * Absolute URL of the session's position API (Link rel="urn:whipcast:position": seek,
     * pause, go live), or null when the server offers none (WHIP, other WHEP servers).
     */
    this.positionUrl = null;
    this._token = options.token || null;
    this._stopped = false;
    this._onState = options.onState || null;
    pc.addEventListener('connectionstatechange', () => {
      if (this.state === 'closed' || this.state === 'ended') return;
      const s = pc.connectionState;
      if (s === 'new') return;
      this._setState(s === 'closed' ? 'failed' : s);
    });
    if (options.signal) {
      if (options.signal.aborted) this.stop();
      else options.signal.addEventListener('abort', () => this.stop(), { once: true });
    }
  }

  /** End the session: DELETE the session resource (best effort), then close the connection. */
  async stop() {
    if (this._stopped) return;
    this._stopped = true;
    const endedByServer = this.state === 'ended';
    this._setState('closed');
    // DELETE first, so the server sees an orderly end rather than a vanished peer.
    const deleted = endedByServer ? Promise.resolve() : this._deleteResource();
    await Promise.race([deleted, new Promise((resolve) => setTimeout(resolve, 2000))]);
    this._close();
  }

  async _deleteResource() {
    const location = this.location;
    this.location = null;
    if (!location) return;
    try {
      // keepalive lets the DELETE go out even when called from pagehide.
      const response = await fetch(location, {
        method: 'DELETE', headers: this._headers(), keepalive: true,
      });
      await response.arrayBuffer();
    } catch {
      // The server also drops sessions whose peer went silent (ICE consent freshness).
    }
  }

  _close() {
    try { this.pc.close(); } catch { /* already closed */ }
    this._setState('closed');
  }

  _setState(state) {
    if (state === this.state) return;
    this.state = state;
    if (this._onState) {
      try { this._onState(state, this); } catch (err) { console.error(err); }
    }
  }

  _headers(extra = {}) {
    const headers = { ...extra };
    if (this._token) headers.Authorization = `Bearer ${this._token}`;
    return headers;
  }

  async _negotiate(url) {
    const endpoint = new URL(url, document.baseURI);
    if (this._stopped) throw new WhipError('Stopped');
    const offer = await this.pc.createOffer();
    await this.pc.setLocalDescription(offer);
    this._setState('gathering');
    await iceGatheringComplete(this.pc, ICE_GATHER_TIMEOUT_MS);
    if (this._stopped) throw new WhipError('Stopped');

    this._setState('signaling');
    let response;
    try {
      response = await fetch(endpoint, {
        method: 'POST',
        headers: this._headers({ 'Content-Type': 'application/sdp' }),
        body: this.pc.localDescription.sdp,
      });
    } catch (err) {
      throw new WhipError(`Cannot reach ${endpoint.host}: ${err.message}`);
    }
    if (response.status !== 201) throw await errorFromResponse(response);

    const location = response.headers.get('Location');
    if (location) {
      // RFC 9725: relative to the endpoint URL (response.url, after any 307 redirect).
      this.location = new URL(location, response.url || endpoint).href;
    }
    this.etag = response.headers.get('ETag');
    this.iceServers = parseIceServerLinks(response.headers.get('Link'));
    const position = parseLinks(response.headers.get('Link'))
      .find((link) => link.rel.split(/\s+/).includes(POSITION_REL));
    if (position) this.positionUrl = new URL(position.uri, response.url || endpoint).href;
    const answer = await response.text();
    if (this._stopped) {
      await this._deleteResource(); // stop() came while the POST was in flight
      throw new WhipError('Stopped');
    }
    try {
      await this.pc.setRemoteDescription({ type: 'answer', sdp: answer });
    } catch (err) {
      await this.stop();
      throw new WhipError(`The server's SDP answer was not accepted: ${err.message}`,
        { status: response.status });
    }
    this._watchDtls();
    const s = this.pc.connectionState;
    this._setState(s === 'new' ? 'connecting' : s);
  }

  /**
   * Chrome keeps connectionState 'connected' after the peer's DTLS close_notify (until ICE
   * consent runs out, ~10 s later), so watch the bundled DTLS transport itself.
   */
  _watchDtls() {
    const transport = this.pc.getReceivers()[0]?.transport || this.pc.getSenders()[0]?.transport;
    if (!transport) return;
    transport.addEventListener('statechange', () => {
      if (this._stopped || this.state === 'closed') return;
      if (transport.state === 'closed') this._setState('ended');
      else if (transport.state === 'failed') this._setState('failed');
    });
  }
}

function newPeerConnection(iceServers = []) {
  return new RTCPeerConnection({ iceServers, bundlePolicy: 'max-bundle', rtcpMuxPolicy: 'require' });
}

/** Resolve when ICE gathering is complete, or after timeoutMs with what was gathered. */
function iceGatheringComplete(pc, timeoutMs) {
  if (pc.iceGatheringState === 'complete') return Promise.resolve();
  return new Promise((resolve) => {
    const done = () => {
      clearTimeout(timer);
      pc.removeEventListener('icegatheringstatechange', check);
      pc.removeEventListener('icecandidate', onCandidate);
      resolve();
    };
    const check = () => { if (pc.iceGatheringState === 'complete') done(); };
    const onCandidate = (event) => { if (!event.candidate) done(); };
    const timer = setTimeout(done, timeoutMs);
    pc.addEventListener('icegatheringstatechange', check);
    pc.addEventListener('icecandidate', onCandidate);
  });
}

/**
 * Rank of a codec capability for the wanted codec: -1 = not that codec, higher = better.
 * H.264 needs packetization-mode=1 (FU-A, what every WHIP server expects); Constrained
 * Baseline is decodable everywhere, so it goes first, then Baseline, then Main/High.
 */
function codecRank(capability, wanted) {
  const mime = capability.mimeType.toLowerCase();
  if (wanted === 'vp8') return mime === 'video/vp8' ? 0 : -1;
  if (wanted !== 'h264' || mime !== 'video/h264') return -1;
  const fmtp = (capability.sdpFmtpLine || '').toLowerCase();
  if (!/packetization-mode=1/.test(fmtp)) return -1;
  const profile = (/profile-level-id=([0-9a-f]{6})/.exec(fmtp) || [])[1] || '';
  if (profile.startsWith('42e0')) return 3;
  if (profile.startsWith('4200')) return 2;
  if (profile.startsWith('4d')) return 1;
  return 0;
}

/**
 * Move the wanted codec to the front of the offer; the rest stays as a fallback. Without
 * a wish, H.264 goes first when the browser can send it (Chromium would offer VP8 first).
 */
function preferVideoCodec(transceiver, wanted) {
  if (typeof transceiver.setCodecPreferences !== 'function') return;
  const caps = RTCRtpSender.getCapabilities?.('video');
  if (!caps) return;
  if (!wanted) {
    if (!caps.codecs.some((c) => codecRank(c, 'h264') >= 0)) return;
    wanted = 'h264';
  }
  const ranked = caps.codecs
    .map((codec, index) => ({ codec, index, rank: codecRank(codec, wanted) }));
  const preferred = ranked.filter((c) => c.rank >= 0)
    .sort((a, b) => b.rank - a.rank || a.index - b.index)
    .map((c) => c.codec);
  if (!preferred.length) {
    throw new WhipError(`This browser cannot send ${wanted.toUpperCase()} video`);
  }
  const others = caps.codecs.filter((c) => !preferred.includes(c));
  transceiver.setCodecPreferences([...preferred, ...others]);
}

/** The relation whipcast's WHEP sessions announce their position API with. */
export const POSITION_REL = 'urn:whipcast:position';

/** RFC 8288 Link header entries as { uri, rel (lower case), params }. */
export function parseLinks(header) {
  if (!header) return [];
  const links = [];
  const re = /<([^>]*)>((?:\s*;\s*[^;,=\s]+(?:\s*=\s*(?:"(?:[^"\\]|\\.)*"|[^;,\s]*))?)*)/g;
  for (const [, uri, paramText] of header.matchAll(re)) {
    const params = {};
    for (const [, key, quoted, bare] of paramText.matchAll(
      /;\s*([^;,=\s]+)(?:\s*=\s*(?:"((?:[^"\\]|\\.)*)"|([^;,\s]*)))?/g)) {
      params[key.toLowerCase()] = quoted !== undefined ? quoted.replace(/\\(.)/g, '$1') : bare;
    }
    links.push({ uri, rel: (params.rel || '').toLowerCase(), params });
  }
  return links;
}

/** RFC 8288 Link header entries with rel="ice-server" (RFC 9725 §4.6) as RTCIceServer. */
export function parseIceServerLinks(header) {
  return parseLinks(header)
    .filter((link) => link.rel.split(/\s+/).includes('ice-server'))
    .map(({ uri, params }) => {
      const server = { urls: uri };
      if (params.username !== undefined) server.username = params.username;
      if (params.credential !== undefined) server.credential = params.credential;
      return server;
    });
}

/** Turn a non-201 response into a WhipError, reading an RFC 9457 problem+json body. */
async function errorFromResponse(response) {
  const status = response.status;
  const retry = Number.parseInt(response.headers.get('Retry-After') || '', 10);
  const retryAfter = Number.isFinite(retry) ? retry : null;
  let title = response.statusText || '';
  let detail = '';
  const type = (response.headers.get('Content-Type') || '').toLowerCase();
  try {
    if (type.includes('json')) {
      const problem = await response.json();
      if (problem && typeof problem === 'object') {
        if (typeof problem.title === 'string') title = problem.title;
        if (typeof problem.detail === 'string') detail = problem.detail;
      }
    } else if (type.startsWith('text/plain')) {
      detail = (await response.text()).trim().slice(0, 300);
    }
  } catch { /* an unreadable body leaves the status line */ }
  const reason = [title, detail].filter(Boolean).join(': ') || 'request failed';
  return new WhipError(`${reason} (HTTP ${status})`, { status, title, detail, retryAfter });
}

/**
 * Rates from successive getStats() reports: what a studio or a player shows as "live
 * stats". Call sample() about once a second; rates cover the time since the last call.
 *
 *   const sampler = new StatsSampler(session.pc);
 *   const s = await sampler.sample(); // { bitrateKbps, fps, rttMs, lossPercent, ... }
 */
export class StatsSampler {
  constructor(pc) {
    this.pc = pc;
    this._last = null;
  }

  async sample() {
    const now = performance.now();
    const base = await mediaStats(this.pc);
    const totals = { bytes: 0, packets: 0, lost: 0, frames: 0, jitterDelay: 0, emitted: 0 };
    let rtt = null;
    if (this.pc) {
      const report = await this.pc.getStats();
      report.forEach((s) => {
        if (s.type === 'outbound-rtp' || s.type === 'inbound-rtp') {
          totals.bytes += (s.bytesSent || 0) + (s.bytesReceived || 0);
          totals.packets += (s.packetsSent || 0) + (s.packetsReceived || 0);
          if (s.kind === 'video') {
            // Simulcast has an outbound-rtp per encoding: the frame rate is the busiest one's.
            totals.frames = Math.max(totals.frames,
              s.type === 'outbound-rtp' ? (s.framesEncoded || 0) : (s.framesDecoded || 0));
            totals.jitterDelay += s.jitterBufferDelay || 0;
            totals.emitted += s.jitterBufferEmittedCount || 0;
          }
          if (s.type === 'inbound-rtp') totals.lost += s.packetsLost || 0;
        } else if (s.type === 'remote-inbound-rtp') {
          totals.lost += s.packetsLost || 0; // what the far end reports missing from us
          if (s.roundTripTime !== undefined) rtt = s.roundTripTime;
        } else if (s.type === 'candidate-pair' && s.nominated && s.state === 'succeeded') {
          if (s.currentRoundTripTime !== undefined) rtt = s.currentRoundTripTime;
        }
      });
    }
    const last = this._last;
    this._last = { at: now, ...totals };
    const seconds = last ? (now - last.at) / 1000 : 0;
    const rate = (key) => (seconds > 0 ? Math.max(0, totals[key] - last[key]) / seconds : null);
    const packets = last ? totals.packets - last.packets : 0;
    const lost = last ? Math.max(0, totals.lost - last.lost) : 0;
    const emitted = last ? totals.emitted - last.emitted : 0;
    return {
      ...base,
      bitrateKbps: seconds > 0 ? Math.round((rate('bytes') * 8) / 1000) : null,
      fps: seconds > 0 ? Math.round(rate('frames')) : null,
      rttMs: rtt === null ? null : Math.round(rtt * 1000),
      lossPercent: packets + lost > 0 ? Math.round((1000 * lost) / (packets + lost)) / 10 : 0,
      jitterBufferMs: emitted > 0
        ? Math.round((1000 * (totals.jitterDelay - last.jitterDelay)) / emitted) : null,
    };
  }
}

const RETRY_MIN_MS = 1000;
const RETRY_MAX_MS = 8000;
const DISCONNECTED_GRACE_MS = 5000; // 'disconnected' often recovers by itself
const FIRST_FRAME_TIMEOUT_MS = 15000;
const STALL_NOTICE_MS = 3000;
const STALL_TIMEOUT_MS = 10000;

/**
 * Keep a WHEP stream playing: reconnect with exponential backoff and jitter whenever the
 * stream ends or restarts, the connection fails, video stalls, or the egress goes away.
 *
 * onStatus({ state, message }) is called on every change; state is one of
 * 'connecting', 'live', 'stalled', 'reconnecting', 'ended' (the broadcast stopped),
 * 'offline' (the endpoint says the stream is not live: 404/409), 'error', 'stopped'.
 *
 *   const player = new Player('/whep/demo', video, { onStatus: (s) => show(s) });
 *   player.start();  ...  await player.stop();
 */
export class Player {
  constructor(url, video, { onStatus = () => {}, iceServers } = {}) {
    this.url = url;
    this.video = video;
    this.session = null;
    this.status = { state: 'connecting', message: 'Connecting…' };
    this._onStatus = onStatus;
    this._iceServers = iceServers;
    this._attempt = null;
    this._stopped = false;
    this._retryDelay = RETRY_MIN_MS;
    /** Set while the viewer paused playback (position API): no video then is no stall. */
    this.paused = false;
  }

  get pc() { return this.session?.pc ?? null; }

  start() {
    this._run().catch((err) => this._set('error', String(err?.message || err)));
    return this;
  }

  async stop() {
    this._stopped = true;
    this._attempt?.abort();
    await this.session?.stop();
    this._set('stopped', 'Stopped');
  }

  _set(state, message) {
    if (this.status.state === state && this.status.message === message) return;
    this.status = { state, message };
    try { this._onStatus(this.status); } catch (err) { console.error(err); }
  }

  async _run() {
    let offline = false;
    while (!this._stopped) {
      this._attempt = new AbortController();
      let retryAfterMs = 0;
      try {
        if (!offline) this._set('connecting', 'Connecting…');
        this.session = await play(this.url, this.video, {
          signal: this._attempt.signal,
          iceServers: this._iceServers,
          onState: (state) => {
            if (state === 'disconnected') this._set('reconnecting', 'Connection interrupted, recovering…');
          },
        });
        offline = false;
        const [state, reason] = await this._untilSessionEnds(this.session);
        if (this._stopped) break;
        this._set(state, `${reason}. Reconnecting…`);
      } catch (err) {
        if (this._stopped) break;
        offline = err?.status === 404 || err?.status === 409; // WHEP: not live (yet)
        if (offline) this._set('offline', 'The stream is offline. Waiting for it to go live…');
        else this._set('error', `${err?.message || err}. Retrying…`);
        if (err?.retryAfter) retryAfterMs = err.retryAfter * 1000;
      }
      this._attempt.abort(); // stops the session (DELETE) if it is still up
      this.session = null;
      await sleep(Math.max(this._retryDelay * (0.8 + Math.random() * 0.4), retryAfterMs));
      this._retryDelay = Math.min(this._retryDelay * 2, RETRY_MAX_MS);
    }
  }

  /** Resolve with [state, reason] once the session failed, stayed disconnected or stalled. */
  _untilSessionEnds(session) {
    return new Promise((resolve) => {
      const started = performance.now();
      let lastFrames = 0;
      let lastProgress = started;
      let disconnectedSince = null;
      let live = false;
      let done = false;
      const finish = (state, reason) => {
        done = true;
        clearInterval(timer);
        resolve([state, reason]);
      };
      const tick = async () => {
        const s = await mediaStats(session.pc);
        if (done) return;
        if (this._stopped) return finish('stopped', 'Stopped');
        const now = performance.now();
        if (session.state === 'ended') return finish('ended', 'The broadcast ended');
        if (session.state === 'closed' || session.state === 'failed') {
          return finish('reconnecting', 'Connection lost');
        }
        if (session.state !== 'disconnected') disconnectedSince = null;
        else if (now - (disconnectedSince ??= now) > DISCONNECTED_GRACE_MS) {
          return finish('reconnecting', 'Connection lost');
        }
        if (this.paused) lastProgress = now;
        if (s.framesDecoded > lastFrames) {
          lastFrames = s.framesDecoded;
          lastProgress = now;
          if (!live) this._retryDelay = RETRY_MIN_MS;
          live = true;
          if (session.state === 'connected') this._set('live', 'Live');
          return;
        }
        if (!live) {
          if (now - started > FIRST_FRAME_TIMEOUT_MS) finish('reconnecting', 'No video arrived');
          else if (session.state === 'connected') this._set('connecting', 'Connected, waiting for video…');
          return;
        }
        const idle = now - lastProgress;
        if (idle > STALL_TIMEOUT_MS) return finish('reconnecting', 'The video stopped');
        if (idle > STALL_NOTICE_MS) this._set('stalled', 'No video for a moment, waiting…');
      };
      const timer = setInterval(() => { tick().catch(() => {}); }, 500);
    });
  }
}

function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}
