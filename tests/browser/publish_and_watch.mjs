#!/usr/bin/env node
// End-to-end browser check: publish a fake camera over WHIP, watch it over WHEP.
//
//   node publish_and_watch.mjs <base-url> <stream> <screenshot-dir>
//        [--codec h264|vp8] [--token TOKEN] [--timeout 20] [--min-frames 30] [--verbose]
//
// Launches the system Chromium (/usr/bin/chromium, never a downloaded browser) headless
// with fake media devices and a fresh profile, opens /publish/<stream> and presses Start,
// then opens /watch/<stream> and waits until the <video> element presents decoded frames,
// then presses "Clip the last 30 s" on both pages and checks each download is a video file.
// Prints one JSON line on stdout ({"ok": true, ...} or {"ok": false, "error": ...}),
// writes publish.png and watch.png into <screenshot-dir>, exits 0 on success, 1 on a failed
// check, 2 on bad usage.

import { mkdir, readFile } from 'node:fs/promises';
import path from 'node:path';
import {
  CHROMIUM_ARGS,
  CheckFailed,
  FAKE_MEDIA_ARGS,
  errorText,
  launchChromium,
  parseCommandLine,
  runMain,
  sleep,
} from './chromium.mjs';

const PUBLISH_CONNECT_TIMEOUT_MS = 15000;
const CLIP_TIMEOUT_MS = 20000;
const MIN_CLIP_BYTES = 10000;

function parseOptions() {
  const { values, usage, ...positionals } = parseCommandLine(
    'node publish_and_watch.mjs <base-url> <stream> <screenshot-dir> ' +
      '[--codec h264|vp8] [--token TOKEN] [--timeout SECONDS] [--min-frames N] [--verbose]',
    {
      codec: { type: 'string' },
      token: { type: 'string' },
      timeout: { type: 'string', default: '20' },
      'min-frames': { type: 'string', default: '30' },
    },
  );
  if (values.codec && !['h264', 'vp8'].includes(values.codec)) usage('--codec is h264 or vp8');
  const timeoutS = Number(values.timeout);
  const minFrames = Number(values['min-frames']);
  if (!(timeoutS > 0) || !(minFrames > 0)) usage('--timeout and --min-frames must be positive');
  return {
    ...positionals,
    codec: values.codec || null,
    token: values.token || null,
    timeoutMs: timeoutS * 1000,
    minFrames,
    verbose: values.verbose,
  };
}

/** Collect a page's console output and errors, for the failure report. */
function recordLog(page, name, log) {
  page.on('console', (msg) => log.push(`[${name}] console.${msg.type()}: ${msg.text()}`));
  page.on('pageerror', (err) => log.push(`[${name}] page error: ${err.message}`));
  page.on('requestfailed', (req) =>
    log.push(`[${name}] request failed: ${req.method()} ${req.url()} ${req.failure()?.errorText}`),
  );
  page.on('response', (res) => {
    const url = new URL(res.url());
    if (/^\/(whip|whep)\//.test(url.pathname)) {
      log.push(`[${name}] ${res.request().method()} ${url.pathname} -> ${res.status()}`);
    }
  });
}

async function statusText(page) {
  try {
    return await page.locator('#status').textContent({ timeout: 1000 });
  } catch {
    return null;
  }
}

/**
 * Press the page's "Clip the last 30 s" and check the download: a non-trivial MP4 (or
 * WebM for VP8) under the server's filename. Returns { name, bytes, container }.
 */
async function checkClip(page, codec, dir, label) {
  const downloaded = page.waitForEvent('download', { timeout: CLIP_TIMEOUT_MS });
  await page.getByRole('button', { name: 'Clip the last 30 s' }).click();
  let download;
  try {
    download = await downloaded;
  } catch {
    throw new CheckFailed(`${label}: no clip download within ${CLIP_TIMEOUT_MS} ms ` +
      `(clip status "${await page.locator('#clip-status').textContent()}")`);
  }
  const name = download.suggestedFilename();
  const file = path.join(dir, `${label}-${name}`);
  await download.saveAs(file);
  const bytes = await readFile(file);
  const container = bytes.subarray(4, 8).toString('latin1') === 'ftyp' ? 'mp4'
    : bytes.readUInt32BE(0) === 0x1a45dfa3 ? 'webm' : 'unknown';
  const want = codec === 'vp8' ? 'webm' : 'mp4';
  if (container !== want || !name.endsWith(`.${want}`) || bytes.length < MIN_CLIP_BYTES) {
    throw new CheckFailed(`${label}: clip ${name} is ${bytes.length} bytes of ${container}, ` +
      `expected at least ${MIN_CLIP_BYTES} bytes of ${want}`);
  }
  return { name, bytes: bytes.length, container };
}

async function main(opts, { result, log }) {
  const started = Date.now();
  await mkdir(opts.screenshotDir, { recursive: true });
  let chrome = null;
  let publisher = null;
  let viewer = null;

  try {
    chrome = await launchChromium({
      args: [...CHROMIUM_ARGS, ...FAKE_MEDIA_ARGS],
      viewport: { width: 1280, height: 900 },
    });
    const { context } = chrome;
    result.browser = chrome.browser?.version() ?? null;

    // 1. Publisher: fake camera + microphone, press Start, wait for "connected".
    publisher = await context.newPage();
    recordLog(publisher, 'publish', log);
    await publisher.goto(`${opts.baseUrl}/publish/${encodeURIComponent(opts.stream)}`);
    if (opts.codec) await publisher.selectOption('#codec', opts.codec);
    if (opts.token) await publisher.fill('#token', opts.token);
    const clickedAt = Date.now();
    await publisher.click('#start');
    try {
      await publisher.waitForFunction(
        () =>
          window.whipcast?.state === 'connected' ||
          document.getElementById('status')?.dataset.tone === 'error',
        null,
        { timeout: PUBLISH_CONNECT_TIMEOUT_MS, polling: 100 },
      );
    } catch {
      throw new CheckFailed(
        `publisher not connected within ${PUBLISH_CONNECT_TIMEOUT_MS} ms ` +
          `(state ${await publisher.evaluate(() => window.whipcast?.state)}, ` +
          `status "${await statusText(publisher)}")`,
      );
    }
    if ((await publisher.evaluate(() => window.whipcast.state)) !== 'connected') {
      throw new CheckFailed(`publisher failed: ${await statusText(publisher)}`);
    }
    result.publishConnectedMs = Date.now() - clickedAt;

    // 2. Viewer: open the watch page, count presented frames with requestVideoFrameCallback.
    viewer = await context.newPage();
    recordLog(viewer, 'watch', log);
    const openedAt = Date.now();
    await viewer.goto(`${opts.baseUrl}/watch/${encodeURIComponent(opts.stream)}`);
    await viewer.evaluate(() => {
      const video = document.getElementById('video');
      window.__presentedFrames = 0;
      if ('requestVideoFrameCallback' in video) {
        const onFrame = () => {
          window.__presentedFrames += 1;
          video.requestVideoFrameCallback(onFrame);
        };
        video.requestVideoFrameCallback(onFrame);
      }
    });
    const probe = () =>
      viewer.evaluate(async () => {
        const video = document.getElementById('video');
        const stats = await window.whipcast.stats();
        return {
          state: window.whipcast.state,
          presentedFrames: window.__presentedFrames,
          videoWidth: video.videoWidth,
          videoHeight: video.videoHeight,
          currentTime: video.currentTime,
          paused: video.paused,
          ...stats,
        };
      });
    const deadline = Date.now() + opts.timeoutMs;
    let seen = null;
    let firstFrameAt = null;
    for (;;) {
      seen = await probe();
      if (firstFrameAt === null && seen.framesDecoded > 0) firstFrameAt = Date.now();
      const playing =
        seen.framesDecoded >= opts.minFrames &&
        seen.presentedFrames >= opts.minFrames &&
        seen.videoWidth > 0 &&
        seen.videoHeight > 0 &&
        seen.currentTime > 0 &&
        !seen.paused;
      if (playing) break;
      if (Date.now() > deadline) {
        throw new CheckFailed(
          `viewer did not play ${opts.minFrames} frames within ${opts.timeoutMs} ms: ` +
            `${JSON.stringify(seen)}, status "${await statusText(viewer)}"`,
        );
      }
      await sleep(250);
    }
    result.firstFrameMs = firstFrameAt - openedAt;
    result.framesDecoded = seen.framesDecoded;
    result.presentedFrames = seen.presentedFrames;
    result.videoWidth = seen.videoWidth;
    result.videoHeight = seen.videoHeight;
    result.codec = seen.codec;
    result.audioCodec = seen.audioCodec;
    result.packetsLost = seen.packetsLost;
    const sent = await publisher.evaluate(() => window.whipcast.stats());
    result.publisher = {
      codec: sent.codec,
      audioCodec: sent.audioCodec,
      framesEncoded: sent.framesEncoded,
      frameWidth: sent.frameWidth,
      frameHeight: sent.frameHeight,
    };
    if (opts.codec && (result.codec || '').toLowerCase() !== opts.codec) {
      throw new CheckFailed(`viewer decodes ${result.codec}, publisher asked for ${opts.codec}`);
    }

    // 3. "Clip the last 30 s" on the watch page and in the studio: each downloads a file.
    const codec = (result.codec || '').toLowerCase();
    result.clips = {
      watch: await checkClip(viewer, codec, opts.screenshotDir, 'watch'),
      studio: await checkClip(publisher, codec, opts.screenshotDir, 'studio'),
    };
    result.ok = true;
  } catch (err) {
    result.error = errorText(err);
  } finally {
    for (const [name, page] of [['publish', publisher], ['watch', viewer]]) {
      if (!page) continue;
      const file = path.join(opts.screenshotDir, `${name}.png`);
      try {
        await page.screenshot({ path: file, fullPage: true, timeout: 5000 });
        result.screenshots.push(file);
      } catch (err) {
        log.push(`[${name}] screenshot failed: ${err.message}`);
      }
    }
    // End both sessions (stop() sends DELETE to the Location and waits for the answer).
    for (const page of [viewer, publisher]) {
      try {
        await page?.evaluate(() => window.whipcast?.session?.stop());
      } catch (err) {
        log.push(`stop failed: ${err.message}`);
      }
    }
    await chrome?.cleanup();
  }
  result.elapsedMs = Date.now() - started;
}

const opts = parseOptions();
runMain((run) => main(opts, run), {
  name: 'publish_and_watch',
  result: { ok: false, stream: opts.stream, codecRequested: opts.codec, screenshots: [] },
  // Hard cap on the whole run, whatever hangs (browser launch, a stuck evaluate, ...).
  timeoutMs: opts.timeoutMs + PUBLISH_CONNECT_TIMEOUT_MS + 2 * CLIP_TIMEOUT_MS + 30000,
  verbose: opts.verbose,
});
