import { describeVideo, formatDuration, viewers } from '/web/page.js';

const REFRESH_MS = 3000;
const $ = (id) => document.getElementById(id);
const list = $('streams');
const cards = new Map(); // stream name -> { item, entry, receivedAt }

// The directory, refreshed every few seconds; cards are updated in place.
async function refresh() {
  try {
    const response = await fetch('/api/streams', { cache: 'no-store' });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const { streams } = await response.json();
    render(streams);
    $('error').hidden = true;
    $('updated').textContent = `Updated ${new Date().toLocaleTimeString()}`;
  } catch (err) {
    $('error').textContent = `Cannot load the live streams (${err.message}). Retrying…`;
    $('error').hidden = false;
  } finally {
    list.setAttribute('aria-busy', 'false');
    setTimeout(refresh, REFRESH_MS);
  }
}

function render(streams) {
  streams.sort((a, b) => (b.viewers - a.viewers) || a.stream.localeCompare(b.stream));
  const names = new Set(streams.map((s) => s.stream));
  for (const [name, card] of cards) {
    if (!names.has(name)) {
      card.item.remove();
      cards.delete(name);
    }
  }
  for (const entry of streams) {
    let card = cards.get(entry.stream);
    if (!card) {
      card = { item: createCard(entry.stream) };
      cards.set(entry.stream, card);
    }
    card.entry = entry;
    card.receivedAt = performance.now();
    fillCard(card);
    list.append(card.item); // keeps the sorted order
  }
  $('empty').hidden = streams.length > 0;
  $('live-count').textContent = `${streams.length} live`;
}

function createCard(name) {
  const item = document.createElement('li');
  item.className = 'stream-card';
  const link = document.createElement('a');
  link.href = `/watch/${encodeURIComponent(name)}`;
  const thumb = document.createElement('div');
  thumb.className = 'thumb';
  thumb.style.background = gradient(name);
  thumb.setAttribute('aria-hidden', 'true');
  const initials = document.createElement('span');
  initials.textContent = name.replace(/[^A-Za-z0-9]/g, '').slice(0, 2) || '?';
  const badge = document.createElement('span');
  badge.className = 'badge live-badge';
  badge.textContent = 'Live';
  const uptime = document.createElement('span');
  uptime.className = 'uptime';
  thumb.append(initials, badge, uptime);
  const body = document.createElement('div');
  body.className = 'body';
  const title = document.createElement('h3');
  const sub = document.createElement('p');
  sub.className = 'sub';
  const tech = document.createElement('p');
  tech.className = 'sub';
  body.append(title, sub, tech);
  link.append(thumb, body);
  item.append(link);
  return item;
}

function fillCard(card) {
  const { item, entry } = card;
  const uptime = entry.uptime_s + (performance.now() - card.receivedAt) / 1000;
  item.querySelector('h3').textContent = entry.title || entry.stream;
  const [sub, tech] = item.querySelectorAll('.sub');
  sub.textContent = `${entry.title ? `${entry.stream} · ` : ''}${viewers(entry.viewers)}`;
  tech.textContent = describeVideo(entry);
  item.querySelector('.uptime').textContent = formatDuration(uptime);
  item.querySelector('a').setAttribute('aria-label',
    `${entry.title || entry.stream}, live for ${formatDuration(uptime)}, ${viewers(entry.viewers)}`);
}

/** A stable two-colour gradient per stream name: a placeholder thumbnail. */
function gradient(name) {
  let hash = 0;
  for (const char of name) hash = (hash * 31 + char.codePointAt(0)) >>> 0;
  const hue = hash % 360;
  return `linear-gradient(135deg, hsl(${hue} 70% 45%), hsl(${(hue + 50) % 360} 75% 30%))`;
}

setInterval(() => { for (const card of cards.values()) fillCard(card); }, 1000);
refresh();

// Go live / watch by name.
const form = $('open-stream');
const input = $('stream');
const error = $('form-error');
input.value = sessionStorage.getItem('whipcast.stream') || '';
form.addEventListener('submit', (event) => {
  event.preventDefault();
  const name = input.value.trim();
  input.value = name;
  if (!input.checkValidity()) {
    error.textContent = name
      ? 'Use only letters, digits, dash and underscore in the stream name.'
      : 'Enter a stream name.';
    error.hidden = false;
    input.setAttribute('aria-invalid', 'true');
    input.focus();
    return;
  }
  input.removeAttribute('aria-invalid');
  error.hidden = true;
  sessionStorage.setItem('whipcast.stream', name);
  const action = event.submitter?.value === 'watch' ? 'watch' : 'studio';
  location.assign(`/${action}/${encodeURIComponent(name)}`);
});
