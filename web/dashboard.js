// whipcast operator dashboard: polls /api/stats once a second, keeps the last two minutes
// and draws them on <canvas> line charts, with a table of this node's streams.
//
// Plain ES module, no dependencies, no build step. /api/stats counters are cumulative, so
// rates are the difference between two polls over the server-side time between them.
// Stream names are user input: every server-provided string goes through textContent.
//
// Read-only hook for tests and the console:
//   window.whipcastDashboard.samples()        derived samples in the window, oldest first
//   window.whipcastDashboard.series('bitrate') what a chart last drew: label, colour, points

const POLL_MS = 1000;
const FETCH_TIMEOUT_MS = 4000;
const BACKOFF_MAX_MS = 15000;
const WINDOW_S = 120;
const GAP_S = 4.5; // samples further apart than this are not joined by a line
const X_TICK_S = 30;

const $ = (id) => document.getElementById(id);
const main = $('main');
const statusLine = $('status');
const badge = $('connection');
const tbody = document.querySelector('#streams tbody');

let samples = []; // { t, kafka, streams: { name: derived figures } }
let previous = null; // the last raw /api/stats answer, for deltas
let latest = null;
let selected = selectionFromHash();
let failures = 0;
const rows = new Map(); // stream name -> { tr, cells }
const streamColour = new Map(); // stream name -> palette index, stable while the page lives

// ---------------------------------------------------------------- polling

async function poll() {
  const started = performance.now();
  let stats;
  try {
    stats = await fetchStats();
  } catch (err) {
    failures += 1;
    // Exponential backoff with jitter, so many open dashboards do not retry in step.
    const delay = Math.min(POLL_MS * 2 ** failures, BACKOFF_MAX_MS) * (0.8 + Math.random() * 0.4);
    const reason = err?.name === 'TimeoutError' ? 'no answer' : err?.message || String(err);
    setConnection('down',
      `Disconnected (${reason}). Retrying in ${Math.round(delay / 1000)} s; charts are paused.`);
    setTimeout(poll, delay);
    return;
  }
  failures = 0;
  setTimeout(poll, Math.max(0, POLL_MS - (performance.now() - started)));
  ingest(stats);
  setConnection('live', 'Live: updating every second.');
  render();
}

async function fetchStats() {
  const response = await fetch('/api/stats', {
    cache: 'no-store',
    signal: AbortSignal.timeout(FETCH_TIMEOUT_MS),
  });
  if (!response.ok) throw new Error(`HTTP ${response.status}`);
  const stats = await response.json();
  if (!stats || typeof stats.streams !== 'object' || !Number.isFinite(stats.time)) {
    throw new Error('unexpected answer');
  }
  return stats;
}

function setConnection(state, message) {
  badge.dataset.conn = state;
  badge.textContent = state === 'live' ? 'Live' : 'Disconnected';
  if (state === 'down') main.dataset.stale = '';
  else delete main.dataset.stale;
  statusLine.dataset.tone = state === 'live' ? 'ok' : 'error';
  if (statusLine.textContent !== message) statusLine.textContent = message;
}

/** Turn one /api/stats answer into a sample of rates and gauges. */
function ingest(stats) {
  if (previous && previous.node !== stats.node) { // another node behind the same URL
    samples = [];
    previous = null;
  }
  if (previous && stats.time <= previous.time) return;
  const dt = previous ? stats.time - previous.time : 0;
  const streams = {};
  for (const [name, s] of Object.entries(stats.streams)) {
    const before = previous?.streams?.[name];
    // Per-second rate of a counter; null without an earlier value or after a reset.
    const rate = (part, key) => {
      const now = s[part]?.[key];
      const then = before?.[part]?.[key];
      if (!(dt > 0) || typeof now !== 'number' || typeof then !== 'number' || now < then) {
        return null;
      }
      return (now - then) / dt;
    };
    const kbps = (key) => {
      const r = rate('ingest', key);
      return r === null ? null : (r * 8) / 1000;
    };
    const videoKbps = kbps('video_bytes');
    const audioKbps = kbps('audio_bytes');
    streams[name] = {
      ingest: Boolean(s.ingest),
      egress: Boolean(s.egress),
      videoKbps,
      audioKbps,
      kbps: sum([videoKbps, audioKbps]),
      fps: rate('ingest', 'video_frames'),
      viewers: s.egress?.viewers ?? null,
      p50: s.egress?.latency_ms_p50 ?? null,
      p99: s.egress?.latency_ms_p99 ?? null,
      lagMs: s.egress?.lag_ms ?? null,
      drops: sum([rate('egress', 'keyframe_drops'), rate('ingest', 'frames_lost')]),
    };
    if (!streamColour.has(name)) streamColour.set(name, streamColour.size);
  }
  samples.push({ t: stats.time, kafka: stats.kafka_reachable, streams });
  while (samples.length && samples[0].t < stats.time - WINDOW_S - 2) samples.shift();
  previous = stats;
  latest = stats;
}

// ---------------------------------------------------------------- what each chart shows

/** Build one chart's series from the samples: {label, colour, dash?, right?, points}. */
const CHARTS = {
  audience: {
    unit: 'count', integer: true,
    series: (name) => (name
      ? [line('Viewers', 1, (s) => s.streams[name]?.viewers)]
      : [line('Live streams', 2, (s) => Object.keys(s.streams).length),
        line('Viewers', 1, (s) => sum(each(s, 'viewers')) ?? 0)]),
  },
  bitrate: {
    unit: 'kbps',
    series: (name) => (name
      ? [line('Video', 1, (s) => s.streams[name]?.videoKbps),
        line('Audio', 3, (s) => s.streams[name]?.audioKbps)]
      : streamsInWindow().map((n) => line(n, null, (s) => s.streams[n]?.kbps, n))),
  },
  latency: {
    unit: 'ms',
    series: (name) => {
      const pick = (key) => (s) => (name ? s.streams[name]?.[key] : max(each(s, key)));
      const suffix = name ? '' : ', worst stream';
      return [line(`p50${suffix}`, 1, pick('p50')),
        { ...line(`p99${suffix}`, 2, pick('p99')), dash: true }];
    },
  },
  lag: {
    unit: 'ms', rightUnit: 'drops/s',
    series: (name) => {
      const value = (key, all) => (s) => (name ? s.streams[name]?.[key] : all(each(s, key)));
      return [line(name ? 'Lag' : 'Lag, worst stream', 4, value('lagMs', max)),
        { ...line(name ? 'Drops' : 'Drops, all streams', 2, value('drops', sum)), right: true }];
    },
  },
};

function line(label, paletteIndex, value, stream = null) {
  return { label, stream, paletteIndex, points: samples.map((s) => [s.t, value(s) ?? null]) };
}

function each(sample, key) {
  return Object.values(sample.streams).map((s) => s[key]);
}

function streamsInWindow() {
  const names = new Set();
  for (const s of samples) for (const n of Object.keys(s.streams)) names.add(n);
  return [...names].sort();
}

function sum(values) {
  const real = values.filter((v) => typeof v === 'number');
  return real.length ? real.reduce((a, b) => a + b, 0) : null;
}

function max(values) {
  const real = values.filter((v) => typeof v === 'number');
  return real.length ? Math.max(...real) : null;
}

// ---------------------------------------------------------------- rendering

const charts = Object.fromEntries(Object.entries(CHARTS).map(([id, spec]) => {
  const canvas = $(`chart-${id}`);
  return [id, { spec, canvas, title: canvas.getAttribute('aria-label'),
    legend: document.querySelector(`.legend[data-for="chart-${id}"]`), drawn: [] }];
}));

function render() {
  renderCards();
  renderTable();
  renderCharts();
}

function renderCards() {
  if (!latest) return;
  const live = Object.values(latest.streams);
  $('card-node').textContent = String(latest.node ?? '—');
  $('card-roles').textContent = Array.isArray(latest.roles) ? latest.roles.join(', ') : '—';
  const kafka = $('card-kafka');
  kafka.textContent = latest.kafka_reachable ? 'Reachable' : 'Unreachable';
  kafka.dataset.tone = latest.kafka_reachable ? 'ok' : 'error';
  $('card-streams').textContent = fmt(live.length);
  $('card-viewers').textContent = fmt(sum(live.map((s) => s.egress?.viewers)) ?? 0);
}

function renderTable() {
  if (!latest) return;
  const names = Object.keys(latest.streams).sort();
  for (const [name, row] of rows) {
    if (!(name in latest.streams)) { row.tr.remove(); rows.delete(name); }
  }
  names.forEach((name, index) => {
    let row = rows.get(name);
    if (!row) {
      row = newRow(name);
      rows.set(name, row);
      // Insert in name order without moving existing rows (a moved row loses focus).
      const next = names.slice(index + 1).map((n) => rows.get(n)?.tr).find(Boolean);
      tbody.insertBefore(row.tr, next ?? null);
    }
    const raw = latest.streams[name];
    const ing = raw.ingest;
    const eg = raw.egress;
    const drops = sum([eg?.keyframe_drops, ing?.frames_lost]);
    const cells = [
      fmt(recent(name, 'kbps')), fmt(recent(name, 'fps'), 1),
      ing && ing.keyframe_interval_s > 0 ? `${fmt(ing.keyframe_interval_s, 1)} s` : '—',
      describeViewers(eg),
      eg ? `${fmt(eg.latency_ms_p50, 1)} / ${fmt(eg.latency_ms_p99, 1)} ms` : '—',
      eg ? `${fmt(eg.lag_ms)} ms · ${fmt(eg.lag_records)} rec` : '—',
      fmt(drops), fmt(ing?.rtp_packets_lost),
    ];
    cells.forEach((text, i) => {
      if (row.cells[i].textContent !== text) row.cells[i].textContent = text;
    });
    row.cells[6].title = drops === null ? ''
      : `${eg?.keyframe_drops ?? 0} keyframe drops (egress), ` +
        `${ing?.frames_lost ?? 0} frames lost and ${ing?.malformed_rtp ?? 0} malformed RTP ` +
        'packets (ingest), since the stream started';
    row.cells[3].title = adaptationTitle(eg);
    row.tr.title = !ing ? 'Ingest runs on another node' : !eg ? 'No egress on this node' : '';
  });
  $('no-streams').hidden = names.length > 0;
  for (const [name, row] of rows) {
    row.tr.setAttribute('aria-current', String(name === selected));
    row.button.setAttribute('aria-pressed', String(name === selected));
  }
}

/** Viewers, and for a simulcast stream how many are on each layer (best first). */
function describeViewers(eg) {
  const perLayer = eg?.viewers_per_layer;
  if (!eg || !Array.isArray(perLayer) || perLayer.length < 2) return fmt(eg?.viewers);
  return `${fmt(eg.viewers)} (${perLayer.join(' / ')})`;
}

/** What per-viewer adaptation did, aggregated: the tooltip of the viewers cell. */
function adaptationTitle(eg) {
  if (!eg) return '';
  const lines = [];
  if (Array.isArray(eg.viewers_per_layer) && eg.viewers_per_layer.length > 1) {
    lines.push(`Viewers per simulcast layer, best first: ${eg.viewers_per_layer.join(' / ')}`);
    lines.push(`Layer switches: ${eg.layer_switches_down ?? 0} down, ` +
      `${eg.layer_switches_up ?? 0} up (${eg.layer_failed_ups ?? 0} undone)`);
  }
  if (eg.estimate_kbps_min !== null && eg.estimate_kbps_min !== undefined) {
    lines.push(`Bandwidth estimates: min ${fmt(eg.estimate_kbps_min)}, ` +
      `median ${fmt(eg.estimate_kbps_p50)} kbps`);
  }
  if (eg.viewers_paused) lines.push(`${eg.viewers_paused} viewers with video paused`);
  if (eg.viewers_rewound) lines.push(`${eg.viewers_rewound} viewers watching the past`);
  return lines.join('\n');
}

/** A rate averaged over the last few seconds, steadier to read than one poll's delta. */
function recent(name, key, seconds = 5) {
  const since = (samples.at(-1)?.t ?? 0) - seconds;
  const values = samples.filter((s) => s.t > since).map((s) => s.streams[name]?.[key]);
  const real = values.filter((v) => typeof v === 'number');
  return real.length ? sum(real) / real.length : null;
}

function newRow(name) {
  const tr = document.createElement('tr');
  const th = document.createElement('th');
  th.scope = 'row';
  const button = document.createElement('button');
  button.type = 'button';
  button.className = 'pick';
  button.textContent = name;
  button.setAttribute('aria-label', `Show only ${name} in the charts`);
  th.append(button);
  tr.append(th);
  const cells = [];
  for (let i = 0; i < 8; i += 1) {
    const td = document.createElement('td');
    td.className = 'num';
    tr.append(td);
    cells.push(td);
  }
  // The button handles Enter and Space; a click anywhere on the row does the same.
  tr.addEventListener('click', () => select(name === selected ? null : name));
  return { tr, cells, button };
}

function renderCharts() {
  const css = getComputedStyle(document.documentElement);
  const palette = [1, 2, 3, 4, 5, 6, 7, 8].map((i) => css.getPropertyValue(`--series-${i}`).trim());
  const tEnd = samples.at(-1)?.t ?? Date.now() / 1000;
  for (const chart of Object.values(charts)) {
    const series = chart.spec.series(selected).map((s) => ({
      ...s,
      colour: palette[(s.stream !== null ? streamColour.get(s.stream) ?? 0 : s.paletteIndex - 1)
        % palette.length],
    }));
    chart.drawn = series;
    drawChart(chart.canvas, series, tEnd, chart.spec, css);
    renderLegend(chart, series);
  }
  const scope = selected ? `stream “${selected}”` : 'all streams';
  const gone = selected && !(latest && selected in latest.streams) ? ' (not on this node now)' : '';
  $('scope').textContent = scope + gone;
  $('show-all').hidden = !selected;
}

function renderLegend(chart, series) {
  const { unit, rightUnit, integer } = chart.spec;
  const unitOf = (s) => (s.right ? rightUnit : unit === 'count' ? '' : unit);
  const items = series.map((s) => {
    const last = s.points.at(-1)?.[1];
    const digits = integer ? 0 : typeof last === 'number' && last < 10 ? 1 : 0;
    const text = typeof last === 'number' ? `${fmt(last, digits)} ${unitOf(s)}`.trim() : '—';
    return { ...s, text };
  });
  chart.legend.replaceChildren(...items.map((s) => {
    const li = document.createElement('li');
    const swatch = document.createElement('span');
    swatch.className = 'swatch';
    swatch.style.color = s.colour;
    if (s.dash) swatch.dataset.dash = '';
    const name = document.createElement('span');
    name.className = 'name';
    name.textContent = s.label;
    const value = document.createElement('span');
    value.className = 'value';
    value.textContent = s.text;
    li.append(swatch, name, value);
    return li;
  }));
  const summary = items.map((s) => `${s.label} ${s.text}`).join(', ');
  chart.canvas.setAttribute('aria-label',
    `${chart.title}, last ${WINDOW_S} s. Now: ${summary || 'no data'}`);
}

// ---------------------------------------------------------------- the line chart

/**
 * Draw series of [t (s), value|null] points over the last WINDOW_S seconds up to tEnd:
 * grid, y axis with unit (and a right-hand one for series marked `right`), x axis in
 * seconds before now. Sized for the canvas's CSS box and devicePixelRatio.
 */
function drawChart(canvas, series, tEnd, { unit, rightUnit, integer }, css) {
  const dpr = window.devicePixelRatio || 1;
  const width = canvas.clientWidth;
  const height = canvas.clientHeight;
  if (!width || !height) return;
  if (canvas.width !== Math.round(width * dpr) || canvas.height !== Math.round(height * dpr)) {
    canvas.width = Math.round(width * dpr);
    canvas.height = Math.round(height * dpr);
  }
  const ctx = canvas.getContext('2d');
  ctx.setTransform(dpr, 0, 0, dpr, 0, 0);
  ctx.clearRect(0, 0, width, height);
  const text = css.getPropertyValue('--muted').trim();
  ctx.font = `12px ${getComputedStyle(document.body).fontFamily}`;
  ctx.textBaseline = 'middle';

  const left = series.filter((s) => !s.right);
  const right = series.filter((s) => s.right);
  const yLeft = niceScale(left, integer);
  const yRight = right.length ? niceScale(right, true) : null;
  const labelWidth = (scale) =>
    Math.max(...scale.ticks.map((v) => ctx.measureText(fmt(v, scale.digits)).width));
  const box = {
    top: 22,
    bottom: height - 22,
    left: Math.ceil(labelWidth(yLeft)) + 10,
    right: width - (yRight ? Math.ceil(labelWidth(yRight)) + 10 : 12),
  };
  const x = (t) => box.right - ((tEnd - t) / WINDOW_S) * (box.right - box.left);
  const y = (scale) => (v) => box.bottom - (v / scale.top) * (box.bottom - box.top);

  // Grid and y labels.
  ctx.lineWidth = 1;
  ctx.strokeStyle = css.getPropertyValue('--chart-grid').trim();
  ctx.fillStyle = text;
  for (const v of yLeft.ticks) {
    const py = Math.round(y(yLeft)(v)) + 0.5;
    hline(ctx, box.left, box.right, py);
    ctx.textAlign = 'right';
    ctx.fillText(fmt(v, yLeft.digits), box.left - 6, py);
  }
  if (yRight) {
    ctx.textAlign = 'left';
    for (const v of yRight.ticks) ctx.fillText(fmt(v, yRight.digits), box.right + 6, y(yRight)(v));
  }
  // X axis: a tick every X_TICK_S seconds, labelled relative to the newest sample.
  ctx.textAlign = 'center';
  ctx.textBaseline = 'alphabetic';
  for (let ago = 0; ago <= WINDOW_S; ago += X_TICK_S) {
    const px = Math.round(x(tEnd - ago)) + 0.5;
    ctx.beginPath();
    ctx.moveTo(px, box.top);
    ctx.lineTo(px, box.bottom + 4);
    ctx.stroke();
    ctx.textAlign = ago === WINDOW_S ? 'left' : ago === 0 ? 'right' : 'center';
    ctx.fillText(ago ? `−${ago} s` : 'now', ago === WINDOW_S ? box.left : px, height - 4);
  }
  ctx.strokeStyle = css.getPropertyValue('--chart-axis').trim();
  hline(ctx, box.left, box.right, Math.round(box.bottom) + 0.5);
  // Units above the y axes.
  ctx.textBaseline = 'middle';
  ctx.textAlign = 'left';
  ctx.fillText(unit, 0, 8);
  if (yRight) {
    ctx.textAlign = 'right';
    ctx.fillText(rightUnit, width, 8);
  }

  // The lines, clipped to the plot area; a gap in the data breaks the line.
  ctx.save();
  ctx.beginPath();
  ctx.rect(box.left, box.top - 2, box.right - box.left, box.bottom - box.top + 4);
  ctx.clip();
  ctx.lineWidth = 2;
  ctx.lineJoin = 'round';
  ctx.lineCap = 'round';
  for (const s of series) {
    const py = y(s.right ? yRight : yLeft);
    ctx.strokeStyle = s.colour;
    ctx.fillStyle = s.colour;
    ctx.setLineDash(s.dash ? [6, 4] : []);
    ctx.beginPath();
    let prev = null;
    s.points.forEach(([t, v], i) => {
      if (v === null) { prev = null; return; }
      const point = [x(t), py(v)];
      if (prev && t - prev <= GAP_S) {
        ctx.lineTo(...point);
      } else {
        ctx.moveTo(...point);
        const next = s.points[i + 1];
        const alone = !next || next[1] === null || next[0] - t > GAP_S;
        if (alone) ctx.fillRect(point[0] - 2, point[1] - 2, 4, 4); // a lone point stays visible
      }
      prev = t;
    });
    ctx.stroke();
  }
  ctx.restore();
  if (!series.some((s) => s.points.some(([, v]) => v !== null))) {
    ctx.fillStyle = text;
    ctx.textAlign = 'center';
    ctx.fillText('No data yet', (box.left + box.right) / 2, (box.top + box.bottom) / 2);
  }
}

function hline(ctx, x0, x1, py) {
  ctx.beginPath();
  ctx.moveTo(x0, py);
  ctx.lineTo(x1, py);
  ctx.stroke();
}

/** 0 to a round top above the largest value, in about 4 steps of 1, 2, 2.5 or 5 × 10^n. */
function niceScale(series, integer) {
  const largest = Math.max(0, ...series.flatMap((s) => s.points.map(([, v]) => v ?? 0)));
  const rough = (largest || 1) / 4;
  const magnitude = 10 ** Math.floor(Math.log10(rough));
  const steps = integer ? [1, 2, 5, 10] : [1, 2, 2.5, 5, 10];
  let step = +(steps.map((m) => m * magnitude).find((m) => m >= rough)).toPrecision(3);
  if (integer) step = Math.max(1, Math.round(step));
  const top = Math.max(step, Math.ceil(largest / step) * step);
  const ticks = [];
  for (let i = 0; i * step <= top + step / 2; i += 1) ticks.push(+(i * step).toPrecision(6));
  const digits = Math.min(3, (String(step).split('.')[1] ?? '').length);
  return { top, ticks, digits };
}

function fmt(value, digits = 0) {
  if (typeof value !== 'number' || !Number.isFinite(value)) return '—';
  return value.toLocaleString(undefined, { maximumFractionDigits: digits });
}

// ---------------------------------------------------------------- selection

function selectionFromHash() {
  const match = /^#stream=(.+)$/.exec(location.hash);
  try {
    return match ? decodeURIComponent(match[1]) : null;
  } catch {
    return null;
  }
}

/** Show one stream in the charts (null: all). Kept in the URL, so Back returns to all. */
function select(name) {
  if (name === selected) return;
  const url = name ? `#stream=${encodeURIComponent(name)}` : location.pathname + location.search;
  history.pushState(null, '', url);
  applySelection(name);
}

function applySelection(name) {
  selected = name;
  if (latest) render();
  else renderCharts();
}

$('show-all').addEventListener('click', () => {
  const was = selected;
  select(null);
  (rows.get(was)?.button ?? $('charts-heading')).focus();
});
addEventListener('hashchange', () => applySelection(selectionFromHash()));
addEventListener('keydown', (event) => {
  if (event.key === 'Escape' && selected && !event.defaultPrevented) $('show-all').click();
});

// Redraw when a canvas changes size (layout, rotation, zoom) or the colour scheme flips.
const redraw = () => requestAnimationFrame(renderCharts);
new ResizeObserver(redraw).observe(document.querySelector('.charts'));
matchMedia('(prefers-color-scheme: dark)').addEventListener('change', redraw);

$('charts-heading').tabIndex = -1;
$('window-s').textContent = String(WINDOW_S);

window.whipcastDashboard = Object.freeze({
  windowS: WINDOW_S,
  get selected() { return selected; },
  get connected() { return badge.dataset.conn === 'live'; },
  samples: () => structuredClone(samples),
  series: (id) => (charts[id]?.drawn ?? []).map((s) => ({
    label: s.label, colour: s.colour, right: Boolean(s.right),
    points: s.points.filter(([, v]) => v !== null).length,
    last: s.points.at(-1)?.[1] ?? null,
  })),
});

renderCharts();
poll();
