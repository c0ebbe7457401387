// A Chromium viewer for the transport-cc check (tests/test_twcc_browser.py): watch a
// stream that is already live on /watch/<stream> for --seconds, then stop.
//
//   node watch_twcc.mjs <base-url> <stream> <screenshot-dir> [--seconds 12] [--timeout 20]
//
// Chromium offers transport-wide-cc-extensions-01 and rtcp-fb transport-cc on its own;
// the Python side checks what the gateway negotiated and did with the feedback. Prints
// one JSON line: { ok, framesDecoded, transportCc (the answer's extmap line, if any) }.

import { CHROMIUM_ARGS, CheckFailed, launchChromium, parseCommandLine, runMain, sleep } from './chromium.mjs';

const { baseUrl, stream, values } = parseCommandLine(
  'node watch_twcc.mjs <base-url> <stream> <screenshot-dir> [--seconds N] [--timeout N]',
  { seconds: { type: 'string', default: '12' }, timeout: { type: 'string', default: '20' } },
);
const seconds = Number(values.seconds);
const timeoutMs = Number(values.timeout) * 1000;

async function main({ result, log }) {
  let chrome;
  try {
    chrome = await launchChromium({ args: CHROMIUM_ARGS });
    const page = await chrome.context.newPage();
    page.on('console', (m) => log.push(`[watch] ${m.type()}: ${m.text()}`));
    // Note the SDP answer the page gets (the extmap line proves the negotiation).
    page.on('response', async (response) => {
      if (response.request().method() === 'POST' && response.url().includes('/whep/')) {
        const sdp = await response.text().catch(() => '');
        result.transportCc = sdp.split(/\r?\n/).find((l) => l.includes('transport-wide-cc')) || null;
      }
    });
    await page.goto(`${baseUrl}/watch/${encodeURIComponent(stream)}`);
    const deadline = Date.now() + timeoutMs;
    let stats = {};
    while (!(stats.framesDecoded > 0)) {
      if (Date.now() > deadline) throw new CheckFailed(`no frame decoded: ${JSON.stringify(stats)}`);
      await sleep(250);
      stats = await page.evaluate(() => window.whipcast.stats());
    }
    await sleep(seconds * 1000);
    stats = await page.evaluate(() => window.whipcast.stats());
    result.framesDecoded = stats.framesDecoded;
    await page.evaluate(() => window.whipcast?.session?.stop()).catch(() => {});
    result.ok = true;
  } catch (err) {
    result.error = err instanceof CheckFailed ? err.message : `${err.name}: ${err.message}`;
  } finally {
    await chrome?.cleanup();
  }
}

runMain(main, {
  name: 'watch_twcc',
  result: { ok: false, stream },
  timeoutMs: timeoutMs + seconds * 1000 + 40000,
  verbose: values.verbose,
});
