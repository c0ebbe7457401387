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
