#!/usr/bin/env node
// Browser check of LL-HLS playback with hls.js (served by whipcast from web/vendor/).
//
//   node hls.mjs <base-url> <stream> <screenshot-dir> [--seconds N] [--verbose]
//
// A publisher is already live on <stream> (the Python test runs an aiortc peer that
// switches resolution part way). /watch/<stream>?via=hls plays over LL-HLS in the system
// Chromium; for --seconds (default 20) the page is sampled every 500 ms: the video's
// time must keep moving (no stall: never stuck for more than 1 s once playing), and
// hls.js must report a live latency. With --origin-ms (wall-clock ms at which the
// publisher's frame 0 was captured) it also reads the frame counter out of each shown
// frame and reports glass-to-glass latency. Prints one JSON line with the samples' summary;
// exits 0 on success, 1 on a failed check, 2 on bad usage.

import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import {
  CheckFailed,
  errorText,
  launchChromium,
  parseCommandLine,
  runMain,
  sleep,
} from './chromium.mjs';

const START_TIMEOUT_MS = 30000;
const STUCK_LIMIT_MS = 1000;

async function main({ baseUrl, stream, screenshotDir, seconds, originMs, fallback }, { result, log }) {
  let chrome;
  let page;
  try {
    chrome = await launchChromium();
    page = await chrome.context.newPage();
    page.on('console', (msg) => log.push(`[${msg.type()}] ${msg.text()}`));
    page.on('pageerror', (err) => log.push(`[pageerror] ${err.message}`));
    // --fallback: open the page plainly; WHEP must fail (the test fills egress) and the
    // page must switch to LL-HLS on its own.
    await page.goto(`${baseUrl}/watch/${encodeURIComponent(stream)}${fallback ? '' : '?via=hls'}`);
    try {
      await page.waitForFunction(() => {
        const v = document.querySelector('#video');
        return window.whipcast?.via === 'hls' && v.currentTime > 0.5 && !v.paused;
      }, null, { timeout: START_TIMEOUT_MS, polling: 200 });
    } catch {
      const status = await page.locator('#status').textContent().catch(() => null);
      throw new CheckFailed(`not playing over LL-HLS within ${START_TIMEOUT_MS} ms (status: "${status}")`);
    }
    if (originMs !== null) {
      // Glass to glass: the publisher draws its frame counter in the picture (16 cells,
      // tests/peers.py) and frame i was captured at originMs + i / fps.
      await page.evaluate(({ origin, fps }) => {
        const video = document.querySelector('#video');
        const canvas = document.createElement('canvas');
        const ctx = canvas.getContext('2d', { willReadFrequently: true });
        window.__glass = [];
        const onFrame = () => {
          const w = video.videoWidth;
          const h = video.videoHeight;
          if (w && h) {
            canvas.width = w;
            canvas.height = h;
            ctx.drawImage(video, 0, 0, w, h);
            const row = ctx.getImageData(0, Math.round(10 * h / 240), w, 1).data;
            let counter = 0;
            for (let bit = 0; bit < 16; bit += 1) {
              const x = Math.round((bit * 20 + 10) * w / 320);
              if (row[x * 4] > 128) counter |= 1 << bit;
            }
            window.__glass.push(Date.now() - (origin + counter * 1000 / fps));
          }
          video.requestVideoFrameCallback(onFrame);
        };
        video.requestVideoFrameCallback(onFrame);
      }, { origin: originMs, fps: 30 });
    }
    const samples = [];
    const end = Date.now() + seconds * 1000;
    let lastTime = -1;
    let stuckSince = null;
    let longestStuckMs = 0;
    while (Date.now() < end) {
      const s = await page.evaluate(() => {
        const v = document.querySelector('#video');
        return { t: v.currentTime, width: v.videoWidth, height: v.videoHeight,
          latency: window.whipcast.hls?.latency ?? null, via: document.querySelector('#via').textContent };
      });
      s.at = Date.now();
      samples.push(s);
      if (s.t > lastTime) {
        stuckSince = null;
        lastTime = s.t;
      } else {
        stuckSince ??= s.at;
        longestStuckMs = Math.max(longestStuckMs, s.at - stuckSince);
      }
      await sleep(500);
    }
    const latencies = samples.map((s) => s.latency).filter((x) => x !== null).sort((a, b) => a - b);
    result.playedSeconds = samples.at(-1).t - samples[0].t;
    result.longestStuckMs = longestStuckMs;
    result.latencyP50 = latencies.length ? latencies[Math.floor(latencies.length / 2)] : null;
    result.sizes = [...new Set(samples.map((s) => `${s.width}x${s.height}`))];
    result.via = samples.at(-1).via;
    if (originMs !== null) {
      const glass = (await page.evaluate(() => window.__glass)).sort((a, b) => a - b);
      const at = (q) => glass[Math.min(glass.length - 1, Math.floor(q * glass.length))];
      result.glassToGlassMs = glass.length ? { p50: at(0.5), p95: at(0.95), n: glass.length } : null;
    }
    await mkdir(screenshotDir, { recursive: true });
    await page.screenshot({ path: path.join(screenshotDir, 'watch-hls.png') });
    if (longestStuckMs > STUCK_LIMIT_MS) throw new CheckFailed(`stalled for ${longestStuckMs} ms`);
    if (result.latencyP50 === null) throw new CheckFailed('hls.js reported no latency');
    result.ok = true;
  } catch (err) {
    result.error = errorText(err);
  } finally {
    await chrome?.cleanup();
  }
}

const { values, usage, ...positionals } = parseCommandLine(
  'node hls.mjs <base-url> <stream> <screenshot-dir> [--seconds N] [--origin-ms MS] [--fallback] [--verbose]',
  { seconds: { type: 'string', default: '20' }, 'origin-ms': { type: 'string' },
    fallback: { type: 'boolean', default: false } });
const originMs = values['origin-ms'] === undefined ? null : Number(values['origin-ms']);
const seconds = Number(values.seconds);
if (!(seconds > 0 && seconds <= 120)) usage('--seconds must be 1-120');
runMain((run) => main({ ...positionals, seconds, originMs, fallback: values.fallback }, run), {
  name: 'hls',
  result: { ok: false, stream: positionals.stream },
  timeoutMs: (seconds + 60) * 1000,
  verbose: values.verbose,
});
