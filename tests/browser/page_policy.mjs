#!/usr/bin/env node
// Every page under its Content-Security-Policy, in use: nothing blocked, and framing only
// for the embeddable player. Also which codec the studio publishes when left on
// "Automatic".
//
//   node page_policy.mjs <base-url> <stream> <screenshot-dir> [--token TOKEN] [--verbose]
//
// Publishes a fake camera from /studio/<stream> with the codec select untouched, then
// plays it on /watch and /embed, and opens / and /dashboard; each page records every
// `securitypolicyviolation` event from its first script on. Then a blank page frames
// /embed/<stream> (must load) and /watch/<stream> (must be refused). Prints one JSON
// line: {"ok", "violations": {page: [...]}, "automaticCodec", "framing", ...}.

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

const CONNECT_TIMEOUT_MS = 15000;
const PLAY_TIMEOUT_MS = 15000;
const SETTLE_MS = 2000; // pages without media: time for their first fetches and timers

const { baseUrl, stream, values } = parseCommandLine(
  'node page_policy.mjs <base-url> <stream> <screenshot-dir> [--token TOKEN] [--verbose]',
  { token: { type: 'string' } },
);

/** Runs before any page script: keep every CSP violation the document reports. */
function recordViolations() {
  window.__violations = [];
  document.addEventListener('securitypolicyviolation', (e) => {
    window.__violations.push(`${e.effectiveDirective} blocked ${e.blockedURI || 'inline'} ` +
      `(${e.sourceFile}:${e.lineNumber}) ${e.sample}`);
  });
}

async function waitFor(page, predicate, timeoutMs, what) {
  try {
    await page.waitForFunction(predicate, null, { timeout: timeoutMs, polling: 100 });
  } catch {
    throw new CheckFailed(`${what} within ${timeoutMs} ms`);
  }
}

async function main({ result, log }) {
  const chrome = await launchChromium({ args: [...CHROMIUM_ARGS, ...FAKE_MEDIA_ARGS] });
  const pages = {};
  try {
    const { context } = chrome;
    await context.addInitScript(recordViolations);
    const open = async (name, path) => {
      const page = await context.newPage();
      page.on('console', (msg) => log.push(`[${name}] console.${msg.type()}: ${msg.text()}`));
      page.on('pageerror', (err) => log.push(`[${name}] page error: ${err.message}`));
      pages[name] = page;
      const response = await page.goto(`${baseUrl}${path}`);
      if (!response?.ok()) throw new CheckFailed(`${path} answered ${response?.status()}`);
      return page;
    };
    const name = encodeURIComponent(stream);

    const studio = await open('studio', `/studio/${name}`);
    if (values.token) await studio.fill('#token', values.token);
    result.codecSelect = await studio.inputValue('#codec');
    await studio.click('#start');
    await waitFor(studio, () => window.whipcast?.state === 'connected', CONNECT_TIMEOUT_MS,
      'studio not connected');
    result.automaticCodec = (await studio.evaluate(() => window.whipcast.stats())).codec;
    const info = await studio.request.get(`${baseUrl}/api/streams/${name}`);
    result.streamVideo = (await info.json()).video;

    for (const role of ['watch', 'embed']) {
      const page = await open(role, `/${role}/${name}`);
      await waitFor(page, async () => (await window.whipcast.stats()).framesDecoded > 0,
        PLAY_TIMEOUT_MS, `${role} played no frame`);
    }
    await open('index', '/');
    await open('dashboard', '/dashboard');
    await sleep(SETTLE_MS);

    result.violations = {};
    for (const [page, handle] of Object.entries(pages)) {
      result.violations[page] = await handle.evaluate(() => window.__violations);
    }

    // Framing: from a document of another origin (about:blank), only the player loads.
    const framer = await context.newPage();
    await framer.setContent(
      `<iframe id="embed" src="${baseUrl}/embed/${name}"></iframe>` +
        `<iframe id="watch" src="${baseUrl}/watch/${name}"></iframe>`,
    );
    await sleep(SETTLE_MS);
    result.framing = {};
    for (const id of ['embed', 'watch']) {
      const frame = await (await framer.$(`#${id}`)).contentFrame();
      let loaded = false;
      try {
        loaded = (await frame.evaluate(() => document.querySelector('video') !== null)) === true;
      } catch {
        loaded = false; // a refused frame is an error page of another origin
      }
      result.framing[id] = loaded;
    }
    await framer.close();

    const failures = Object.entries(result.violations).filter(([, v]) => v.length);
    if (failures.length) {
      throw new CheckFailed(`CSP violations: ${JSON.stringify(Object.fromEntries(failures))}`);
    }
    if (!result.framing.embed || result.framing.watch) {
      throw new CheckFailed(`framing: ${JSON.stringify(result.framing)}`);
    }
    result.ok = true;
  } catch (err) {
    result.error = errorText(err);
  } finally {
    for (const page of [pages.watch, pages.embed, pages.studio]) {
      try {
        await page?.evaluate(() => window.whipcast?.session?.stop());
      } catch (err) {
        log.push(`stop failed: ${err.message}`);
      }
    }
    await chrome.cleanup();
  }
}

runMain(main, {
  name: 'page_policy',
  result: { ok: false, stream },
  timeoutMs: CONNECT_TIMEOUT_MS + 2 * PLAY_TIMEOUT_MS + 40000,
  verbose: values.verbose,
});
