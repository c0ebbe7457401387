// Small helpers the whipcast pages share: the stream name from the address, status
// lines, durations, and the directory entry of a stream. No dependencies.

/** The stream name from /{prefix}/{stream} (or ?stream= on a plain static server). */
export function streamName(prefix) {
  const parts = location.pathname.split('/').filter(Boolean);
  try {
    if (parts[0] === prefix && parts.length === 2) return decodeURIComponent(parts[1]);
  } catch {
    return null;
  }
  return new URLSearchParams(location.search).get('stream') || null;
}

/** Set a status element's text and tone ('ok', 'warn', 'error', '' = neutral). */
export function setStatus(element, text, tone = '') {
  if (element.textContent === text && (element.dataset.tone ?? '') === tone) return;
  element.textContent = text;
  if (tone) element.dataset.tone = tone;
  else delete element.dataset.tone;
}

/** 3725 -> "1:02:05", 65 -> "1:05". */
export function formatDuration(seconds) {
  const s = Math.max(0, Math.floor(seconds));
  const h = Math.floor(s / 3600);
  const m = Math.floor((s % 3600) / 60);
  const ss = String(s % 60).padStart(2, '0');
  return h ? `${h}:${String(m).padStart(2, '0')}:${ss}` : `${m}:${ss}`;
}

/** "H264 · 1280×720" from a directory entry (codec names without the "video/" part). */
export function describeVideo(entry) {
  const parts = [];
  const codec = entry?.video?.mimeType?.replace(/^video\//, '');
  if (codec) parts.push(codec);
  if (entry?.width && entry?.height) parts.push(`${entry.width}×${entry.height}`);
  if (!entry?.video && entry?.audio) parts.push('audio only');
  return parts.join(' · ');
}

/** "1 viewer", "3 viewers". */
export function viewers(count) {
  return `${count} ${count === 1 ? 'viewer' : 'viewers'}`;
}

/**
 * Follow a stream's directory entry (title, viewers, uptime): onEntry(entry or null when
 * it is not live) every `intervalMs`. Returns a function that stops following.
 */
export function followStream(stream, onEntry, intervalMs = 3000) {
  let stopped = false;
  let timer = 0;
  const tick = async () => {
    let entry = null;
    try {
      const response = await fetch(`/api/streams/${encodeURIComponent(stream)}`, { cache: 'no-store' });
      if (response.ok) entry = await response.json();
    } catch { /* offline: try again next tick */ }
    if (stopped) return;
    onEntry(entry);
    timer = setTimeout(tick, intervalMs);
  };
  tick();
  return () => { stopped = true; clearTimeout(timer); };
}

/** The filename in a Content-Disposition header (`attachment; filename="x.mp4"`), or null. */
export function dispositionFilename(header) {
  const match = /filename="?([^";]+)"?/i.exec(header || '');
  return match ? match[1] : null;
}

/** A problem+json answer as an Error with its `detail` (and the body as `problem`). */
async function problemError(response) {
  let problem = {};
  try {
    problem = await response.json();
  } catch { /* not problem+json: the status line says it */ }
  const err = new Error(problem.detail || `${response.status} ${response.statusText}`);
  err.problem = problem;
  return err;
}

/**
 * A button that downloads the last `seconds` of a stream as a file (MP4, or WebM for VP8):
 * GET /api/streams/{stream}/clip?from=-seconds&to=0, saved under the server's filename.
 * A broadcast shorter than that is clipped from its start (the 422's window_start).
 * Progress and errors (a problem+json `detail`) go to `statusElement` as text.
 */
export function clipButton(button, statusElement, stream, seconds = 30) {
  const clipUrl = (from) => `/api/streams/${encodeURIComponent(stream)}/clip?from=${from}&to=0`;
  button.addEventListener('click', async () => {
    button.disabled = true;
    setStatus(statusElement, `Cutting the last ${seconds} s…`);
    try {
      let response = await fetch(clipUrl(-seconds), { cache: 'no-store' });
      if (response.status === 422) {
        const err = await problemError(response);
        const start = err.problem.window_start;
        if (!(start > err.problem.live_edge - seconds * 1000)) throw err;
        response = await fetch(clipUrl(start), { cache: 'no-store' });
      }
      if (!response.ok) throw await problemError(response);
      const blob = await response.blob();
      const name = dispositionFilename(response.headers.get('Content-Disposition'))
        || `${stream}-clip`;
      const link = document.createElement('a');
      link.href = URL.createObjectURL(blob);
      link.download = name;
      document.body.append(link);
      link.click();
      link.remove();
      setTimeout(() => URL.revokeObjectURL(link.href), 60000);
      setStatus(statusElement, `Clip ready: ${name} (${Math.round(blob.size / 1024)} KiB).`, 'ok');
    } catch (err) {
      setStatus(statusElement, `No clip: ${err.message}`, 'error');
    } finally {
      button.disabled = false;
    }
  });
}
