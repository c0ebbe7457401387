#!/usr/bin/env node
// Browser check of the operator dashboard (/dashboard) while a stream is live.
//
//   node dashboard.mjs <base-url> <stream> <screenshot-dir> [--timeout 45] [--min-points 5]
//        [--verbose]
//
// Launches the system Chromium (/usr/bin/chromium, never a downloaded browser) headless with
// a fresh profile at devicePixelRatio 2, opens /dashboard and waits until <stream> has at
// least --min-points samples with a non-zero ingest bitrate and gateway latency. Then checks
// that every chart canvas is backed at full resolution and has its data lines drawn (pixels
// of the series colours), selects the stream's drill-down from the keyboard, and writes
// dashboard.png (light), dashboard-dark.png and dashboard-phone.png (390 px wide, no
// sideways scrolling). Last, it cuts /api/stats off and expects the "disconnected" state,
// then the recovery. Prints one JSON line on stdout ({"ok": true, ...} or {"ok": false,
// "error": ...}); exits 0 on success, 1 on a failed check, 2 on bad usage.

import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import {
  CHROMIUM_ARGS,
  CheckFailed,
  errorText,
  launchChromium,
  parseCommandLine,
  runMain,
  sleep,
} from './chromium.mjs';

const CHARTS = ['audience', 'bitrate', 'latency', 'lag'];
const STATE_TIMEOUT_MS = 20000; // selection, disconnect and reconnect, each

function parseOptions() {
  const { values, usage, ...positionals } = parseCommandLine(
    'node dashboard.mjs <base-url> <stream> <screenshot-dir> ' +
      '[--timeout SECONDS] [--min-points N] [--verbose]',
    {
      timeout: { type: 'string', default: '45' },
      'min-points': { type: 'string', default: '5' },
    },
  );
  const timeoutS = Number(values.timeout);
  const minPoints = Number(values['min-points']);
  if (!(timeoutS > 0) || !(minPoints > 1)) usage('--timeout > 0 and --min-points > 1 please');
  return { ...positionals, timeoutMs: timeoutS * 1000, minPoints, verbose: values.verbose };
}

/** Poll fn() (in Node) until it returns a truthy value or timeoutMs passes. */
async function until(what, timeoutMs, fn) {
  const deadline = Date.now() + timeoutMs;
  let last;
  for (;;) {
    last = await fn();
    if (last?.done) return last;
    if (Date.now() > deadline) {
      throw new CheckFailed(`${what} not seen within ${timeoutMs} ms: ${JSON.stringify(last)}`);
    }
    await sleep(250);
  }
}

/** The stream's figures in the dashboard's own samples (window.whipcastDashboard). */
function streamFigures(page, stream) {
  return page.evaluate((name) => {
    const hook = window.whipcastDashboard;
    if (!hook) return { hook: false };
    const mine = hook.samples().map((s) => s.streams[name]).filter(Boolean);
    const last = mine.at(-1) ?? {};
    return {
      connected: hook.connected,
      points: mine.length,
      withBitrate: mine.filter((d) => d.kbps > 0).length,
      kbps: last.kbps ?? null,
      fps: last.fps ?? null,
      p50: last.p50 ?? null,
      p99: last.p99 ?? null,
      lagMs: last.lagMs ?? null,
      viewers: last.viewers ?? null,
    };
  }, stream);
}

/**
 * For each chart canvas: backing size against CSS size × devicePixelRatio, pixels with any
 * ink, and pixels of each drawn series' colour (so the data lines are really there).
 */
function inspectCanvases(page, charts) {
  return page.evaluate((ids) => {
    const probe = document.createElement('canvas').getContext('2d', { willReadFrequently: true });
    const rgb = (colour) => {
      probe.clearRect(0, 0, 1, 1);
      probe.fillStyle = colour;
      probe.fillRect(0, 0, 1, 1);
      return [...probe.getImageData(0, 0, 1, 1).data.slice(0, 3)];
    };
    return ids.map((id) => {
      const canvas = document.getElementById(`chart-${id}`);
      const { data } = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height);
      const series = window.whipcastDashboard.series(id).map((s) => ({ ...s, rgb: rgb(s.colour) }));
      const hits = series.map(() => 0);
      let ink = 0;
      for (let i = 0; i < data.length; i += 4) {
        if (data[i + 3] === 0) continue;
        ink += 1;
        if (data[i + 3] < 250) continue;
        series.forEach((s, k) => {
          if (s.rgb.every((c, j) => Math.abs(c - data[i + j]) <= 24)) hits[k] += 1;
        });
      }
      const dpr = window.devicePixelRatio;
      return {
        id,
        sharp: canvas.width === Math.round(canvas.clientWidth * dpr) &&
          canvas.height === Math.round(canvas.clientHeight * dpr),
        size: [canvas.width, canvas.height],
        ink,
        label: canvas.getAttribute('aria-label'),
        series: series.map((s, k) => ({ label: s.label, points: s.points, last: s.last, pixels: hits[k] })),
      };
    });
  }, charts);
}

function checkCanvases(canvases) {
  for (const c of canvases) {
    if (!c.sharp) throw new CheckFailed(`canvas ${c.id} is not sized for devicePixelRatio`);
    if (c.ink < 500) throw new CheckFailed(`canvas ${c.id} looks blank (${c.ink} pixels drawn)`);
    // Series can lie on top of each other (1 stream, 1 viewer), so one visible line is enough.
    if (!c.series.some((s) => s.points >= 2 && s.pixels >= 50)) {
      throw new CheckFailed(`canvas ${c.id} shows no data line: ${JSON.stringify(c.series)}`);
    }
  }
}

function recordLog(page, log, errors) {
  page.on('console', (msg) => log.push(`console.${msg.type()}: ${msg.text()}`));
  page.on('pageerror', (err) => errors.push(err.message));
  page.on('requestfailed', (req) =>
    log.push(`request failed: ${req.method()} ${req.url()} ${req.failure()?.errorText}`),
  );
}

async function screenshot(page, dir, name, result) {
  const file = path.join(dir, name);
  await page.screenshot({ path: file, fullPage: true, scale: 'css', timeout: 10000 });
  result.screenshots.push(file);
}

async function main(opts, { result, log }) {
  const started = Date.now();
  const errors = [];
  await mkdir(opts.screenshotDir, { recursive: true });
  let chrome = null;

  try {
    chrome = await launchChromium({
      args: ['--headless', ...CHROMIUM_ARGS],
      viewport: { width: 1280, height: 900 },
      deviceScaleFactor: 2,
      colorScheme: 'light',
    });
    result.browser = chrome.browser?.version() ?? null;
    const page = chrome.context.pages()[0] ?? (await chrome.context.newPage());
    recordLog(page, log, errors);
    await page.goto(`${opts.baseUrl}/dashboard`);

    // 1. The stream shows up with enough samples, a bitrate and a latency.
    const openedAt = Date.now();
    const seen = await until('the stream with bitrate and latency', opts.timeoutMs, async () => {
      const f = await streamFigures(page, opts.stream);
      return { ...f, done: f.withBitrate >= opts.minPoints && f.p50 > 0 && f.p99 > 0 };
    });
    delete seen.done;
    result.readyMs = Date.now() - openedAt;
    Object.assign(result, seen);
    const row = page.getByRole('row').filter({ hasText: opts.stream });
    result.tableRow = (await row.innerText({ timeout: 5000 })).replace(/\s+/g, ' ').trim();
    result.cards = await page.locator('#cards').innerText();
    if (!/Kafka\s+Reachable/.test(result.cards)) throw new CheckFailed(`cards: ${result.cards}`);

    // 2. The charts are drawn: sharp canvases with the series' colours in them.
    result.canvases = await inspectCanvases(page, CHARTS);
    checkCanvases(result.canvases);

    // 3. Drill-down from the keyboard: focus the stream's button, press Enter.
    await page.getByRole('button', { name: `Show only ${opts.stream} in the charts` }).focus();
    await page.keyboard.press('Enter');
    const drill = await until('the drill-down', STATE_TIMEOUT_MS, () =>
      page.evaluate((name) => {
        const labels = window.whipcastDashboard.series('bitrate').map((s) => s.label);
        return {
          selected: window.whipcastDashboard.selected,
          hash: location.hash,
          scope: document.getElementById('scope').textContent,
          showAll: !document.getElementById('show-all').hidden,
          labels,
          done: window.whipcastDashboard.selected === name && labels.join() === 'Video,Audio',
        };
      }, opts.stream),
    );
    delete drill.done;
    result.drillDown = drill;
    await page.waitForTimeout(1200); // one more poll, so the legend shows fresh numbers
    result.drillCanvases = await inspectCanvases(page, CHARTS);
    checkCanvases(result.drillCanvases);
    await screenshot(page, opts.screenshotDir, 'dashboard.png', result);

    await page.emulateMedia({ colorScheme: 'dark' });
    await page.waitForTimeout(1200);
    await screenshot(page, opts.screenshotDir, 'dashboard-dark.png', result);
    await page.emulateMedia({ colorScheme: 'light' });

    // 4. Escape goes back to all streams.
    await page.keyboard.press('Escape');
    await until('all streams again after Escape', STATE_TIMEOUT_MS, () =>
      page.evaluate(() => ({ done: window.whipcastDashboard.selected === null })),
    );

    // 5. Phone width: everything fits without sideways scrolling of the page.
    await page.setViewportSize({ width: 390, height: 844 });
    await page.waitForTimeout(1200);
    result.phone = await page.evaluate(() => ({
      scrollWidth: document.documentElement.scrollWidth,
      innerWidth: window.innerWidth,
    }));
    await screenshot(page, opts.screenshotDir, 'dashboard-phone.png', result);
    if (result.phone.scrollWidth > result.phone.innerWidth + 1) {
      throw new CheckFailed(`page scrolls sideways on a phone: ${JSON.stringify(result.phone)}`);
    }
    checkCanvases(await inspectCanvases(page, CHARTS));
    await page.setViewportSize({ width: 1280, height: 900 });

    // 6. /api/stats goes away: a visible "disconnected" state, then recovery.
    await page.route('**/api/stats', (route) => route.abort('connectionrefused'));
    const cutAt = Date.now();
    const down = await until('the disconnected state', STATE_TIMEOUT_MS, () =>
      page.evaluate(() => ({
        badge: document.getElementById('connection').textContent,
        status: document.getElementById('status').textContent,
        done: document.getElementById('connection').dataset.conn === 'down',
      })),
    );
    result.disconnected = { afterMs: Date.now() - cutAt, badge: down.badge, status: down.status };
    await page.unroute('**/api/stats');
    const restoredAt = Date.now();
    await until('reconnection', STATE_TIMEOUT_MS, () =>
      page.evaluate(() => ({ done: window.whipcastDashboard.connected })),
    );
    result.reconnectMs = Date.now() - restoredAt;

    if (errors.length) throw new CheckFailed(`page errors: ${errors.join('; ')}`);
    result.ok = true;
  } catch (err) {
    result.error = errorText(err);
    if (errors.length) result.pageErrors = errors;
    const page = chrome?.context.pages()[0];
    if (page && !result.screenshots.length) {
      await screenshot(page, opts.screenshotDir, 'dashboard.png', result).catch(() => {});
    }
  } finally {
    await chrome?.cleanup();
  }
  result.elapsedMs = Date.now() - started;
}

const opts = parseOptions();
runMain((run) => main(opts, run), {
  name: 'dashboard',
  result: { ok: false, stream: opts.stream, screenshots: [] },
  // Hard cap on the whole run, whatever hangs (browser launch, a stuck evaluate, ...).
  timeoutMs: opts.timeoutMs + 4 * STATE_TIMEOUT_MS + 30000,
  verbose: opts.verbose,
});
