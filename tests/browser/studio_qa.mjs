#!/usr/bin/env node
// Browser check of the studio, watch, embed and directory pages with live Q&A.
//
//   node studio_qa.mjs <base-url> <stream> <screenshot-dir> [--token TOKEN]
//        [--min-frames 30] [--verbose]
//
// Launches the system Chromium (/usr/bin/chromium, never a downloaded browser) headless
// with fake media devices and a fresh profile, then:
//  1. /studio/<stream>: sets a title, goes live over WHIP with the publish token.
//  2. Two /watch/<stream> viewers play: frames decoded (getStats) and presented
//     (requestVideoFrameCallback); /embed/<stream> plays too.
//  3. Viewer A asks a question; it must show in viewer B and in the studio within 1 s.
//     The host marks it answered in the studio; both viewers must show that within 1 s.
//  4. Viewer A asks an HTML-injection question; every page must show it as text.
//  5. The studio stops and goes live again; viewer A must reconnect and play again.
// Screenshots: directory.png, studio.png, watch.png (stats overlay on), embed.png,
// watch-phone.png. Prints one JSON line ({"ok": true, ...} or {"ok": false, "error"});
// exits 0 on success, 1 on a failed check, 2 on bad usage.

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

const LIVE_WITHIN_MS = 1000; // the goal for questions and answered state
const STEP_TIMEOUT_MS = 20000;
const HARD_LIMIT_MS = 150000;
const INJECTION = '<img src=x onerror="window.__pwned=1"><b>bold?</b> & <script>window.__pwned=2</script>';

function parseOptions() {
  const { values, usage, ...positionals } = parseCommandLine(
    'node studio_qa.mjs <base-url> <stream> <screenshot-dir> ' +
      '[--token TOKEN] [--min-frames N] [--verbose]',
    {
      token: { type: 'string' },
      'min-frames': { type: 'string', default: '30' },
    },
  );
  return {
    ...positionals,
    token: values.token || '',
    minFrames: Number(values['min-frames']),
    verbose: values.verbose,
  };
}

function recordLog(page, name, log) {
  page.on('console', (msg) => log.push(`[${name}] console.${msg.type()}: ${msg.text()}`));
  page.on('pageerror', (err) => log.push(`[${name}] page error: ${err.message}`));
  page.on('dialog', (dialog) => {
    log.push(`[${name}] dialog: ${dialog.message()}`);
    dialog.dismiss().catch(() => {});
  });
}

/** Wait until fn() in the page is truthy; CheckFailed with `what` after timeoutMs. */
async function until(page, what, fn, arg, timeoutMs = STEP_TIMEOUT_MS, polling = 50) {
  try {
    await page.waitForFunction(fn, arg, { timeout: timeoutMs, polling });
  } catch {
    const status = await page.locator('#status').textContent({ timeout: 1000 }).catch(() => null);
    throw new CheckFailed(`${what} within ${timeoutMs} ms (status: "${status}")`);
  }
}

/**
 * Count frames the <video> presents (requestVideoFrameCallback) and keep the decoded
 * count from getStats in window.__decoded, so waits can use plain (sync) predicates.
 */
async function countPresentedFrames(page, selector) {
  await page.evaluate((sel) => {
    const video = document.querySelector(sel);
    window.__presentedFrames = 0;
    window.__decoded = 0;
    const onFrame = () => {
      window.__presentedFrames += 1;
      video.requestVideoFrameCallback(onFrame);
    };
    video.requestVideoFrameCallback(onFrame);
    setInterval(async () => {
      window.__decoded = (await window.whipcast.stats()).framesDecoded;
    }, 100);
  }, selector);
}

async function waitForPlayback(page, name, minFrames) {
  await until(page, `${name} did not play ${minFrames} frames`, (min) =>
    window.__decoded >= min && window.__presentedFrames >= min, minFrames);
  return page.evaluate(async () => ({
    ...(await window.whipcast.stats()),
    presentedFrames: window.__presentedFrames,
  }));
}

/**
 * Note, inside the page, the wall-clock time at which the question list first shows
 * `text` (answered: also marked answered). A MutationObserver is used because timers
 * and animation frames of background tabs are throttled, which would blur the timing.
 */
async function noteArrival(page, key, text, answered) {
  await page.evaluate(({ key, text, answered }) => {
    window.__arrivals ??= {};
    const list = document.getElementById('questions');
    const shown = () => [...list.querySelectorAll('.question')].some((li) =>
      li.querySelector('.q-text').textContent === text && (!answered || li.dataset.answered === 'true'));
    const check = () => {
      if (window.__arrivals[key] || !shown()) return;
      window.__arrivals[key] = Date.now();
      observer.disconnect();
    };
    const observer = new MutationObserver(check);
    observer.observe(list, { subtree: true, childList: true, characterData: true, attributes: true });
    check();
  }, { key, text, answered });
}

/**
 * Click and return the wall-clock time at which the page saw the click. Playwright's
 * own checks before a click wait for animation frames, which background tabs throttle,
 * so a time taken before calling click() would count that wait too.
 */
async function clickedAt(page, selector) {
  await page.evaluate(() => {
    addEventListener('click', () => { window.__clickedAt = Date.now(); }, { capture: true, once: true });
  });
  await page.click(selector);
  return page.evaluate(() => window.__clickedAt);
}

/** Milliseconds from `since` until the page showed what noteArrival() waited for. */
async function arrivalMs(page, key, since) {
  await until(page, `"${key}" did not show`, (k) => Boolean(window.__arrivals?.[k]), key, 5000);
  return (await page.evaluate((k) => window.__arrivals[k], key)) - since;
}

function questionShown(text) {
  return [...document.querySelectorAll('#questions .q-text')].some((el) => el.textContent === text);
}

async function main(opts, { result, log }) {
  const shots = opts.screenshotDir;
  await mkdir(shots, { recursive: true });

  let chrome = null;
  const pages = {};
  const shoot = async (name, page) => {
    const file = path.join(shots, `${name}.png`);
    await page.screenshot({ path: file, fullPage: true, timeout: 5000 });
    result.screenshots.push(file);
  };
  const open = async (name, url) => {
    const page = await chrome.context.newPage();
    recordLog(page, name, log);
    pages[name] = page;
    await page.goto(`${opts.baseUrl}${url}`);
    return page;
  };
  const streamPath = encodeURIComponent(opts.stream);

  try {
    chrome = await launchChromium({
      args: [...CHROMIUM_ARGS, ...FAKE_MEDIA_ARGS, '--autoplay-policy=no-user-gesture-required'],
      viewport: { width: 1280, height: 860 },
    });

    // 1. Studio: title, token, H.264, go live.
    const studio = await open('studio', `/studio/${streamPath}`);
    await studio.fill('#stream-title', 'Launch day: whipcast Q&A');
    await studio.selectOption('#codec', 'h264');
    if (opts.token) {
      await studio.fill('#token', opts.token);
      await studio.dispatchEvent('#token', 'change'); // host view of the questions
    }
    await studio.click('#start');
    await until(studio, 'studio did not go live', () => window.whipcast.state === 'connected');

    // 2. Two viewers and an embed play.
    const viewerA = await open('watchA', `/watch/${streamPath}`);
    const viewerB = await open('watchB', `/watch/${streamPath}`);
    for (const page of [viewerA, viewerB]) await countPresentedFrames(page, '#video');
    result.viewerA = await waitForPlayback(viewerA, 'viewer A', opts.minFrames);
    result.viewerB = await waitForPlayback(viewerB, 'viewer B', opts.minFrames);
    const embed = await open('embed', `/embed/${streamPath}`);
    await countPresentedFrames(embed, '#video');
    result.embed = await waitForPlayback(embed, 'embed', 10);
    await until(embed, 'embed shows no "Live" state', () => window.whipcast.status?.state === 'live');

    // 3. A question from viewer A reaches viewer B and the studio within 1 s.
    for (const page of [viewerA, viewerB, studio]) {
      await until(page, 'Q&A did not connect', () => window.whipcast.qa?._connected === true);
    }
    const question = 'Which codec does the studio send?';
    await viewerA.fill('#ask-name', 'Ada');
    await viewerA.fill('#ask-text', question);
    for (const page of [viewerB, studio]) await noteArrival(page, 'asked', question, false);
    let sent = await clickedAt(viewerA, '#ask-submit');
    const arrivals = [await arrivalMs(viewerB, 'asked', sent), await arrivalMs(studio, 'asked', sent)];
    result.questionArrivalMs = Math.max(...arrivals);
    if (result.questionArrivalMs > LIVE_WITHIN_MS) {
      throw new CheckFailed(`question took ${result.questionArrivalMs} ms to reach everyone`);
    }

    // Viewer B votes for it; the count reaches viewer A.
    await viewerB.click('#questions .vote');
    await until(viewerA, 'vote did not arrive', () =>
      document.querySelector('#questions .vote-count')?.textContent === '1');

    // The host marks it answered; both viewers see it within 1 s.
    for (const page of [viewerA, viewerB]) await noteArrival(page, 'answered', question, true);
    sent = await clickedAt(studio, '#questions .q-actions button[data-flag="answered"]');
    result.answeredArrivalMs = Math.max(
      await arrivalMs(viewerA, 'answered', sent), await arrivalMs(viewerB, 'answered', sent));
    if (result.answeredArrivalMs > LIVE_WITHIN_MS) {
      throw new CheckFailed(`answered state took ${result.answeredArrivalMs} ms to reach everyone`);
    }

    // 4. HTML injection shows as text everywhere and runs nothing.
    await viewerA.fill('#ask-text', INJECTION);
    await viewerA.click('#ask-submit');
    for (const page of [viewerA, viewerB, studio]) {
      await until(page, 'injection question did not arrive', questionShown, INJECTION);
      const check = await page.evaluate(() => ({
        pwned: window.__pwned ?? null,
        elements: document.querySelectorAll('#questions img, #questions b, #questions script').length,
      }));
      if (check.pwned !== null || check.elements !== 0) {
        throw new CheckFailed(`HTML injection was rendered as HTML: ${JSON.stringify(check)}`);
      }
    }
    result.injectionShownAsText = true;

    // Pin a question in the studio so the screenshots show every state.
    await studio.click('#questions .question:not([data-answered="true"]) button[data-flag="pinned"]');
    await until(viewerB, 'pin did not arrive', () =>
      document.querySelector('#questions .question')?.dataset.pinned === 'true');

    // Screenshots of the live pages: directory, studio, watch with the stats overlay.
    const directory = await open('directory', '/');
    await until(directory, 'directory does not list the stream with its title and viewers',
      (name) => [...document.querySelectorAll('.stream-card')].some((card) =>
        card.textContent.includes('Launch day') && card.textContent.includes(name)
        && /[1-9]\d* viewers?/.test(card.textContent)), opts.stream);
    result.directory = await directory.evaluate(() =>
      [...document.querySelectorAll('.stream-card')].map((card) => card.textContent.replace(/\s+/g, ' ').trim()));
    await viewerA.click('#stats-toggle');
    await until(viewerA, 'stats overlay empty', () =>
      document.querySelectorAll('#stats-overlay dd').length > 0);
    await sleep(1200); // one more stats sample
    await shoot('directory', directory);
    await shoot('studio', studio);
    await shoot('watch', viewerA);
    await shoot('embed', embed);
    await viewerB.setViewportSize({ width: 390, height: 844 });
    const overflow = await viewerB.evaluate(() =>
      document.documentElement.scrollWidth - document.documentElement.clientWidth);
    if (overflow > 0) throw new CheckFailed(`watch page scrolls sideways on a phone (${overflow} px)`);
    await shoot('watch-phone', viewerB);

    // 5. The publisher restarts; viewer A reconnects on its own and plays again.
    const before = await viewerA.evaluate(() => window.whipcast.session?.location);
    await studio.click('#stop');
    await until(viewerA, 'viewer A did not notice the publisher leaving',
      () => window.whipcast.status?.state !== 'live', null, STEP_TIMEOUT_MS, 100);
    result.afterStop = await viewerA.evaluate(() => window.whipcast.status);
    await studio.click('#start');
    await until(studio, 'studio did not go live again', () => window.whipcast.state === 'connected');
    await until(viewerA, 'viewer A did not play a new WHEP session after the restart',
      (old) => window.whipcast.status?.state === 'live'
        && window.whipcast.session?.location !== old && window.__decoded > 10,
      before, 30000, 200);
    result.reconnected = Boolean(before);
    result.ok = true;
  } catch (err) {
    result.error = errorText(err);
    for (const [name, page] of Object.entries(pages)) {
      await shoot(`failed-${name}`, page).catch(() => {});
    }
  } finally {
    for (const page of Object.values(pages)) {
      await page.evaluate(() => window.whipcast?.session?.stop?.()).catch(() => {});
    }
    await chrome?.cleanup();
  }
}

const opts = parseOptions();
runMain((run) => main(opts, run), {
  name: 'studio_qa',
  result: { ok: false, stream: opts.stream, screenshots: [] },
  timeoutMs: HARD_LIMIT_MS,
  verbose: opts.verbose,
});
