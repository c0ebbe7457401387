#!/usr/bin/env node
// Simulcast from the studio: Chromium publishes three encodings over WHIP, driven step by
// step by the Python test that checks Kafka and the registry meanwhile.
//
//   node simulcast.mjs <base-url> <stream> <screenshot-dir> [--codec h264|vp8] [--token T]
//        [--single] [--timeout 30] [--verbose]
//
// Opens /publish/<stream> (simulcast is the studio's default) with a fake 1280x720
// camera, presses Start and waits until every encoding sends frames; prints
// {"phase": "sending", "encodings": [...]} (best first: rid, frameWidth, frameHeight,
// framesEncoded, bytesSent, pliCount). With --single it opens /publish/<stream>?simulcast=0
// and waits for one encoding instead. Then reads commands on stdin, one per line:
//   stats  prints {"phase": "stats", "encodings": [...]}
//   watch  opens /watch/<stream>, waits until it plays 30 frames, prints {"phase": "watch", ...}
//   stop   ends the session; the final JSON line {"ok": ...} follows.
// Exits 0 on success, 1 on a failed check (with the final line saying why).

import { mkdir } from 'node:fs/promises';
import path from 'node:path';
import { createInterface } from 'node:readline';
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

const LAYERS = 3;
const MIN_FRAMES = 30;

function parseOptions() {
  const { values, usage, ...positionals } = parseCommandLine(
    'node simulcast.mjs <base-url> <stream> <screenshot-dir> [--codec h264|vp8] [--token T] ' +
      '[--single] [--timeout S] [--verbose]',
    {
      codec: { type: 'string' },
      token: { type: 'string' },
      single: { type: 'boolean', default: false },
      timeout: { type: 'string', default: '30' },
    },
  );
  if (values.codec && !['h264', 'vp8'].includes(values.codec)) usage('--codec is h264 or vp8');
  const timeoutS = Number(values.timeout);
  if (!(timeoutS > 0)) usage('--timeout must be positive');
  return { ...positionals, codec: values.codec || null, token: values.token || null,
    single: values.single, timeoutMs: timeoutS * 1000, verbose: values.verbose };
}

function emit(line) {
  process.stdout.write(`${JSON.stringify(line)}\n`);
}

async function waitFor(check, timeoutMs, describe) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const seen = await check();
    if (seen.done) return seen.value;
    if (Date.now() > deadline) throw new CheckFailed(`${describe} within ${timeoutMs} ms: ${JSON.stringify(seen.value)}`);
    await sleep(250);
  }
}

async function main(opts, { result, log }) {
  await mkdir(opts.screenshotDir, { recursive: true });
  const commands = createInterface({ input: process.stdin })[Symbol.asyncIterator]();
  let chrome = null;
  let publisher = null;
  let viewer = null;
  try {
    chrome = await launchChromium({ args: [...CHROMIUM_ARGS, ...FAKE_MEDIA_ARGS] });
    publisher = await chrome.context.newPage();
    publisher.on('console', (m) => log.push(`[publish] ${m.type()}: ${m.text()}`));
    const query = opts.single ? '?simulcast=0' : '';
    await publisher.goto(`${opts.baseUrl}/publish/${encodeURIComponent(opts.stream)}${query}`);
    if (opts.codec) await publisher.selectOption('#codec', opts.codec);
    if (opts.token) await publisher.fill('#token', opts.token);
    if ((await publisher.isChecked('#simulcast')) === opts.single) {
      throw new CheckFailed(`the simulcast checkbox is ${opts.single ? 'on' : 'off'}`);
    }
    await publisher.click('#start');
    const encodings = () => publisher.evaluate(async () => (await window.whipcast.stats()).encodings);
    result.sending = await waitFor(async () => {
      const stats = await publisher.evaluate(() => window.whipcast.stats());
      const sending = stats.encodings.filter((e) => e.framesEncoded > 0 && e.frameWidth > 0);
      const done = opts.single ? stats.framesEncoded > 0 : sending.length >= LAYERS;
      return { done, value: stats.encodings };
    }, opts.timeoutMs, `Chromium did not send ${opts.single ? 'video' : `${LAYERS} encodings`}`);
    const codec = (await publisher.evaluate(async () => (await window.whipcast.stats()).codec));
    emit({ phase: 'sending', codec, encodings: result.sending });

    for (;;) {
      const { value: command, done } = await commands.next();
      if (done || command.trim() === 'stop') break;
      if (command.trim() === 'stats') {
        emit({ phase: 'stats', encodings: await encodings() });
      } else if (command.trim() === 'watch') {
        viewer = await chrome.context.newPage();
        viewer.on('console', (m) => log.push(`[watch] ${m.type()}: ${m.text()}`));
        await viewer.goto(`${opts.baseUrl}/watch/${encodeURIComponent(opts.stream)}`);
        const watched = await waitFor(async () => {
          const value = await viewer.evaluate(async () => {
            const video = document.getElementById('video');
            const stats = await window.whipcast.stats();
            return { framesDecoded: stats.framesDecoded, videoWidth: video.videoWidth,
              videoHeight: video.videoHeight, codec: stats.codec };
          });
          return { done: value.framesDecoded >= MIN_FRAMES && value.videoWidth > 0, value };
        }, opts.timeoutMs, `the viewer did not play ${MIN_FRAMES} frames`);
        emit({ phase: 'watch', ...watched });
      }
    }
    result.ok = true;
  } catch (err) {
    result.error = errorText(err);
  } finally {
    for (const [name, page] of [['publish', publisher], ['watch', viewer]]) {
      await page?.screenshot({ path: path.join(opts.screenshotDir, `${name}.png`), timeout: 5000 })
        .catch(() => {});
    }
    for (const page of [viewer, publisher]) {
      await page?.evaluate(() => window.whipcast?.session?.stop()).catch(() => {});
    }
    await chrome?.cleanup();
  }
}

const opts = parseOptions();
runMain((run) => main(opts, run), {
  name: 'simulcast',
  result: { ok: false, stream: opts.stream },
  timeoutMs: 4 * opts.timeoutMs + 60000,
  verbose: opts.verbose,
});
