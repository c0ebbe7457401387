// What the browser checks in this folder share: the command line, the system Chromium
// (never a downloaded browser) with a fresh profile, the hard time limit, and the one
// JSON line of result and the exit code.

import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { parseArgs } from 'node:util';
import { chromium } from 'playwright-core';

export const CHROMIUM = process.env.WHIPCAST_CHROMIUM || '/usr/bin/chromium';
export const CHROMIUM_ARGS = [
  '--no-sandbox',
  '--disable-gpu',
  '--disable-quic',
  '--no-first-run',
  '--disable-background-networking',
  '--disable-component-update',
  '--disable-sync',
];
/** A fake camera and microphone, granted without a prompt. */
export const FAKE_MEDIA_ARGS = ['--use-fake-device-for-media-stream', '--use-fake-ui-for-media-stream'];

/** A failed check: its message is the whole error, without the exception's name. */
export class CheckFailed extends Error {}

/**
 * Parse `<base-url> <stream> <screenshot-dir>` and `options` (node:util parseArgs; every
 * script also takes --verbose). Bad usage prints the reason and `usageLine` on stderr and
 * exits 2; the returned usage() does the same for the script's own checks of `values`.
 */
export function parseCommandLine(usageLine, options) {
  const usage = (message) => {
    process.stderr.write(`${message}\nusage: ${usageLine}\n`);
    process.exit(2);
  };
  let parsed;
  try {
    parsed = parseArgs({
      allowPositionals: true,
      options: { ...options, verbose: { type: 'boolean', default: false } },
    });
  } catch (err) {
    usage(err.message);
  }
  const { positionals, values } = parsed;
  if (positionals.length !== 3) usage('expected 3 arguments');
  const [baseUrl, stream, screenshotDir] = positionals;
  try {
    new URL(baseUrl);
  } catch {
    usage(`not a URL: ${baseUrl}`);
  }
  return { baseUrl: baseUrl.replace(/\/+$/, ''), stream, screenshotDir, values, usage };
}

/**
 * Start the system Chromium headless in a fresh profile. `args` are its flags;
 * `contextOptions` go to launchPersistentContext (viewport, deviceScaleFactor, ...).
 * Returns { context, browser, cleanup }: cleanup() closes the browser and removes the
 * profile, and never throws.
 */
export async function launchChromium({ args = CHROMIUM_ARGS, ...contextOptions } = {}) {
  const userDataDir = await mkdtemp(path.join(tmpdir(), 'whipcast-chromium-'));
  const removeProfile = () => rm(userDataDir, { recursive: true, force: true }).catch(() => {});
  let context;
  try {
    context = await chromium.launchPersistentContext(userDataDir, {
      executablePath: CHROMIUM,
      headless: true,
      args,
      timeout: 30000,
      ...contextOptions,
    });
  } catch (err) {
    await removeProfile();
    throw err;
  }
  const cleanup = async () => {
    await context.close().catch(() => {});
    await removeProfile();
  };
  return { context, browser: context.browser(), cleanup };
}

/** The error as the result reports it: a CheckFailed's message, else name and message. */
export function errorText(err) {
  const message = String(err.message).replace(/\x1b\[[0-9;]*m/g, ''); // Playwright colours
  return err instanceof CheckFailed ? message : `${err.name}: ${message}`;
}

export function sleep(ms) {
  return new Promise((resolve) => setTimeout(resolve, ms));
}

/**
 * Run one check and end the process: main({ result, log }) fills `result` (result.ok =
 * true on success, result.error otherwise) and pushes browser output to `log`. Prints
 * `result` as one JSON line on stdout, on failure "<name>: FAILED: <error>" and the log on
 * stderr (the log with --verbose too), and exits 0 if result.ok, else 1. After timeoutMs,
 * whatever hangs (browser launch, a stuck evaluate, ...), it prints the result so far with
 * the hard-limit error and the log, and exits 1; if main throws, it prints the stack.
 */
export function runMain(main, { name, result, timeoutMs, verbose = false }) {
  const log = [];
  const watchdog = setTimeout(() => {
    result.error = `gave up after ${timeoutMs} ms (hard limit)`;
    process.stdout.write(`${JSON.stringify(result)}\n`);
    process.stderr.write(`${name}: FAILED: ${result.error}\n${log.join('\n')}\n`);
    process.exit(1);
  }, timeoutMs);
  watchdog.unref();
  main({ result, log }).then(
    () => {
      clearTimeout(watchdog);
      process.stdout.write(`${JSON.stringify(result)}\n`);
      if (!result.ok) process.stderr.write(`${name}: FAILED: ${result.error}\n`);
      if (log.length && (!result.ok || verbose)) {
        process.stderr.write(`browser log:\n${log.join('\n')}\n`);
      }
      process.exit(result.ok ? 0 : 1);
    },
    (err) => {
      process.stderr.write(`${name}: ${err.stack || err}\n`);
      process.exit(1);
    },
  );
}
