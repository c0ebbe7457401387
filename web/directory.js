import { describeVideo, formatDuration, viewers } from '/web/page.js';

const REFRESH_MS = 3000;
const $ = (id) => document.getElementById(id);
const list = $('streams');
const cards = new Map(); // stream name -> { item, entry, receivedAt }
const THUMBNAIL_REFRESH_MS = 10000;

// The directory, refreshed every few seconds; cards are updated in place.
async function refresh() {
  try {
    const response = await fetch('/api/streams', { cache: 'no-store' });
    if (!response.ok) throw new Error(`HTTP ${response.status}`);
    const { streams } = await response.json();
    render(streams);
    await refreshReplays();
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

function createCard(name, { replay = false } = {}) {
  const item = document.createElement('li');
  item.className = replay ? 'stream-card replay' : 'stream-card';
  const link = document.createElement('a');
  link.href = `/watch/${encodeURIComponent(name)}`;
  const thumb = document.createElement('div');
  thumb.className = 'thumb';
  thumb.style.background = gradient(name);
  thumb.setAttribute('aria-hidden', 'true');
  // Initials until the stream's picture loads (the thumbnails role makes one every few s).
  const initials = document.createElement('span');
  initials.textContent = name.replace(/[^A-Za-z0-9]/g, '').slice(0, 2) || '?';
  const picture = document.createElement('img');
  picture.alt = '';
  picture.hidden = true;
  picture.decoding = 'async';
  picture.addEventListener('load', () => { picture.hidden = false; initials.hidden = true; });
  picture.addEventListener('error', () => { picture.hidden = true; initials.hidden = false; });
  const badge = document.createElement('span');
  badge.className = replay ? 'badge replay-badge' : 'badge live-badge';
  badge.textContent = replay ? 'Replay' : 'Live';
  const uptime = document.createElement('span');
  uptime.className = 'uptime';
  thumb.append(initials, picture, badge, uptime);
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

/** Point a card's picture at the stream's thumbnail, a new URL every few seconds. */
function showThumbnail(item, url, live) {
  const version = live ? Math.floor(Date.now() / THUMBNAIL_REFRESH_MS) : 0;
  const src = `${url}?v=${version}`;
  const picture = item.querySelector('img');
  if (picture.getAttribute('src') !== src) picture.src = src;
}

function fillCard(card) {
  const { item, entry } = card;
  showThumbnail(item, `/api/streams/${encodeURIComponent(entry.stream)}/thumbnail`, true);
  const uptime = entry.uptime_s + (performance.now() - card.receivedAt) / 1000;
  item.querySelector('h3').textContent = entry.title || entry.stream;
  const [sub, tech] = item.querySelectorAll('.sub');
  sub.textContent = `${entry.title ? `${entry.stream} · ` : ''}${viewers(entry.viewers)}`;
  tech.textContent = describeVideo(entry);
  item.querySelector('.uptime').textContent = formatDuration(uptime);
  item.querySelector('a').setAttribute('aria-label',
    `${entry.title || entry.stream}, live for ${formatDuration(uptime)}, ${viewers(entry.viewers)}`);
}

// Replays: ended broadcasts still in Kafka, newest first, each a link to its start.
const replayCards = new Map(); // "stream/session" -> item

async function refreshReplays() {
  let replays = [];
  try {
    const response = await fetch('/api/streams?state=ended', { cache: 'no-store' });
    if (response.ok) replays = (await response.json()).streams ?? [];
  } catch { /* the live list reports trouble already */ }
  const keys = new Set();
  const items = replays.map((entry) => {
    const key = `${entry.stream}/${entry.session ?? entry.started}`;
    keys.add(key);
    let item = replayCards.get(key);
    if (!item) {
      item = createCard(entry.stream, { replay: true });
      replayCards.set(key, item);
    }
    fillReplay(item, entry);
    return item;
  });
  for (const [key, item] of replayCards) {
    if (!keys.has(key)) {
      item.remove();
      replayCards.delete(key);
    }
  }
  $('replays').replaceChildren(...items);
  $('replays-section').hidden = items.length === 0;
  $('replay-count').textContent = `${items.length}`;
}

function fillReplay(item, entry) {
  const from = Math.max(entry.started, entry.available_from ?? entry.started);
  const url = new URL(`/watch/${encodeURIComponent(entry.stream)}`, location.href);
  url.searchParams.set('start', String(Math.ceil(from * 1000)));
  if (entry.session) url.searchParams.set('session', entry.session);
  item.querySelector('a').href = url.pathname + url.search;
  const title = entry.title || entry.stream;
  item.querySelector('h3').textContent = title;
  const [sub, tech] = item.querySelectorAll('.sub');
  const ended = entry.ended ? new Date(entry.ended * 1000) : null;
  sub.textContent = `${entry.title ? `${entry.stream} · ` : ''}ended ${ended ? ended.toLocaleTimeString() : ''}`;
  tech.textContent = describeVideo(entry);
  item.querySelector('.uptime').textContent = formatDuration(entry.duration ?? 0);
  item.querySelector('a').setAttribute('aria-label',
    `Replay of ${title}, ${formatDuration(entry.duration ?? 0)} long${ended ? `, ended ${ended.toLocaleTimeString()}` : ''}`);
  if (entry.thumbnail) showThumbnail(item, entry.thumbnail, false);
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
