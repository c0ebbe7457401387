#!/usr/bin/env node
// Browser check of the rewind timeline, question markers and thumbnails.
//
//   node rewind.mjs <base-url> <stream> <screenshot-dir> [--verbose]
//
// System Chromium (/usr/bin/chromium) headless with a fake camera, fresh profile:
//  1. /studio/<stream> goes live; after a few seconds of broadcast /watch/<stream> plays
//     and shows the timeline (the WHEP session's position API).
//  2. The viewer asks a question; a marker appears on the seek bar.
//  3. "−10 s" leaves the live edge: the LIVE control says how far behind, the player keeps
//     decoding. ArrowLeft on the seek bar seeks further back.
//  4. Space pauses; choosing the question marker seeks to its moment; "L" returns to live.
//  5. The directory shows the stream's thumbnail picture instead of initials.
// Screenshots: watch.png, watch-phone.png, studio.png, directory.png, directory-phone.png.
// Prints one JSON line; exits 0 on success, 1 on a failed check, 2 on bad usage.

import { mkdir } from 'node:fs/promises';
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

const STEP_TIMEOUT_MS = 20000;
const HARD_LIMIT_MS = 150000;
const BROADCAST_BEFORE_WATCHING_MS = 14000; // so there is a past to seek into

async function until(page, what, fn, arg, timeoutMs = STEP_TIMEOUT_MS) {
  try {
    await page.waitForFunction(fn, arg, { timeout: timeoutMs, polling: 100 });
  } catch {
    const status = await page.locator('#status').textContent({ timeout: 1000 }).catch(() => null);
    const position = await page.evaluate(() => window.whipcast?.timeline?.position ?? null)
      .catch(() => null);
    throw new CheckFailed(`${what} within ${timeoutMs} ms (status: "${status}", ` +
      `position: ${JSON.stringify(position)})`);
  }
}

const behindMs = () => {
  const p = window.whipcast.timeline.position;
  return p ? p.live_edge - p.position : 0;
};

async function framesDecoded(page) {
  return (await page.evaluate(() => window.whipcast.stats())).framesDecoded;
}

async function main(opts, { result, log }) {
  await mkdir(opts.screenshotDir, { recursive: true });
  let chrome = null;
  const pages = {};
  const shoot = async (name, page) => {
    const file = path.join(opts.screenshotDir, `${name}.png`);
    await page.screenshot({ path: file, fullPage: true, timeout: 5000 });
    result.screenshots.push(file);
  };
  const open = async (name, url) => {
    const page = await chrome.context.newPage();
    page.on('console', (msg) => log.push(`[${name}] console.${msg.type()}: ${msg.text()}`));
    page.on('pageerror', (err) => log.push(`[${name}] page error: ${err.message}`));
    pages[name] = page;
    await page.goto(`${opts.baseUrl}${url}`);
    return page;
  };
  const name = encodeURIComponent(opts.stream);

  try {
    chrome = await launchChromium({
      args: [...CHROMIUM_ARGS, ...FAKE_MEDIA_ARGS, '--autoplay-policy=no-user-gesture-required'],
      viewport: { width: 1280, height: 860 },
    });

    // 1. Broadcast, then watch.
    const studio = await open('studio', `/studio/${name}`);
    await studio.fill('#stream-title', 'Rewind check');
    await until(studio, 'camera opened', () => !document.querySelector('#start').disabled);
    await studio.click('#start');
    await until(studio, 'studio live', () => window.whipcast.state === 'connected');
    await sleep(BROADCAST_BEFORE_WATCHING_MS);
    const watch = await open('watch', `/watch/${name}`);
    await until(watch, 'watch page playing', () => window.whipcast.status?.state === 'live');
    await until(watch, 'timeline shown', () => !document.querySelector('#timeline').hidden
      && window.whipcast.timeline.position?.live === true);

    // 2. A question becomes a marker.
    await watch.fill('#ask-name', 'Grace');
    await watch.fill('#ask-text', 'When does the <b>demo</b> start?');
    await watch.click('#ask-submit');
    await until(watch, 'question marker on the seek bar',
      () => document.querySelectorAll('#timeline .marker').length === 1);
    result.markerLabel = await watch.getAttribute('#timeline .marker', 'aria-label');
    if (!result.markerLabel.includes('<b>demo</b>')) {
      throw new CheckFailed(`marker label is not the question as text: ${result.markerLabel}`);
    }
    const markerAt = Number(await watch.getAttribute('#timeline .marker', 'data-at'));

    // 3. Back 10 s with the button, then further with the seek bar's arrow key.
    await sleep(2500); // let the question's moment fall behind the live edge
    await watch.click('#timeline [data-part="back"]');
    await until(watch, 'behind live after −10 s', () => {
      const p = window.whipcast.timeline.position;
      return p && !p.live && p.live_edge - p.position > 5000;
    });
    result.liveLabelBehind = await watch.textContent('#timeline [data-part="live"]');
    if (!/Go live/.test(result.liveLabelBehind)) {
      throw new CheckFailed(`LIVE control does not say how far behind: ${result.liveLabelBehind}`);
    }
    const before = await framesDecoded(watch);
    await until(watch, 'video keeps playing in the past',
      async (n) => (await window.whipcast.stats()).framesDecoded > n + 15, before);
    const behindAfterButton = await watch.evaluate(behindMs);
    await watch.focus('#timeline [data-part="range"]');
    await watch.keyboard.press('ArrowLeft');
    await until(watch, 'seek bar ArrowLeft moved further back',
      (b) => window.whipcast.timeline.position.live_edge - window.whipcast.timeline.position.position > b + 5000,
      behindAfterButton);
    result.valueText = await watch.getAttribute('#timeline [data-part="range"]', 'aria-valuetext');
    await shoot('watch', watch);

    // 4. Space pauses; the question marker then seeks to its moment (and plays on from
    // there); L goes back to live. Paused far from the marker, so only the seek gets there.
    await watch.locator('#timeline [data-part="range"]').blur();
    await watch.keyboard.press(' ');
    await until(watch, 'space paused', () => window.whipcast.timeline.position.paused);
    const gap = await watch.evaluate(
      (at) => Math.abs(window.whipcast.timeline.position.position - at), markerAt);
    if (gap < 8000) throw new CheckFailed(`paused only ${gap} ms from the marker`);
    await watch.click('#timeline .marker');
    await until(watch, 'marker seeked to the question',
      (at) => Math.abs(window.whipcast.timeline.position.position - at) < 3000
        && !window.whipcast.timeline.position.live, markerAt, 5000);
    result.markerSeekErrorMs = await watch.evaluate(
      (at) => window.whipcast.timeline.position.position - at, markerAt);
    await watch.locator('#timeline [data-part="range"]').blur();
    await watch.keyboard.press('l');
    await until(watch, 'L returned to live', () => window.whipcast.timeline.position.live);
    const atLive = await framesDecoded(watch);
    await until(watch, 'video plays at live again',
      async (n) => (await window.whipcast.stats()).framesDecoded > n + 15, atLive);
    await watch.setViewportSize({ width: 390, height: 844 });
    await sleep(300);
    await shoot('watch-phone', watch);

    // 5. The directory shows the thumbnail picture.
    const directory = await open('directory', '/');
    await until(directory, 'thumbnail shown in the directory', (stream) => {
      const card = [...document.querySelectorAll('#streams .stream-card')]
        .find((item) => item.querySelector('a').getAttribute('href') === `/watch/${stream}`);
      const img = card?.querySelector('img');
      return img && !img.hidden && img.naturalWidth > 0;
    }, name);
    result.thumbnail = await directory.evaluate(() => {
      const img = document.querySelector('#streams img:not([hidden])');
      return { width: img.naturalWidth, height: img.naturalHeight };
    });
    await until(studio, 'studio timeline with the marker',
      () => !document.querySelector('#timeline').hidden
        && document.querySelectorAll('#timeline .marker').length === 1);
    await shoot('studio', studio);
    await shoot('directory', directory);
    await directory.setViewportSize({ width: 390, height: 844 });
    await sleep(300);
    await shoot('directory-phone', directory);
    result.ok = true;
  } catch (err) {
    result.error = errorText(err);
    for (const [pageName, page] of Object.entries(pages)) {
      await shoot(`failed-${pageName}`, page).catch(() => {});
    }
  } finally {
    for (const page of Object.values(pages)) {
      await page.evaluate(() => window.whipcast?.session?.stop?.()).catch(() => {});
    }
    await chrome?.cleanup();
  }
}

const { values, usage, ...positionals } = parseCommandLine(
  'node rewind.mjs <base-url> <stream> <screenshot-dir> [--verbose]', {});
void usage;
runMain((run) => main(positionals, run), {
  name: 'rewind',
  result: { ok: false, stream: positionals.stream, screenshots: [] },
  timeoutMs: HARD_LIMIT_MS,
  verbose: values.verbose,
});
