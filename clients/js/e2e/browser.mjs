// Drives a headless Chromium for tests/browser.rs, as a user's page would
// use the client. Opens the node's web side (--url), then runs one step
// per JSON line on stdin and answers each with one JSON line on stdout:
// {"ok": result} or {"error": message}. Closes the browser when stdin ends.
//
//   node browser.mjs --chromium /usr/bin/chromium --url http://127.0.0.1:PORT/

import { createInterface } from 'node:readline';
import { parseArgs } from 'node:util';

import puppeteer from 'puppeteer-core';

const { values: args } = parseArgs({ options: { chromium: { type: 'string' }, url: { type: 'string' } } });

// Each step runs in the page. The page loads the client the node serves.
const steps = {
  connect: async ({ token }) => {
    const { connect } = await import('/treescale.js');
    window.client = await connect({ token, name: 'e2e' });
    return { user: window.client.user, node: window.client.node };
  },

  connectRefused: async ({ token }) => {
    const { connect } = await import('/treescale.js');
    try {
      const client = await connect({ token, name: 'refused' });
      // The node judges the token after the hello: the refusal closes the session.
      await client.status();
      return { connected: true };
    } catch (e) {
      return { name: e.name, code: e.code, message: e.message };
    }
  },

  subscribe: async ({ pattern }) => {
    const subscription = await window.client.subscribe(pattern);
    window.received = [];
    (async () => {
      for await (const event of subscription) window.received.push(event.text());
    })();
    return pattern;
  },

  subscribeRefused: async ({ pattern }) => {
    try {
      await window.client.subscribe(pattern);
      return { subscribed: true };
    } catch (e) {
      return { name: e.name, code: e.code, message: e.message };
    }
  },

  received: async ({ count, timeoutMs }) => {
    const deadline = Date.now() + timeoutMs;
    while (window.received.length < count && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 20));
    }
    return window.received;
  },

  publish: async ({ topic, count }) => {
    if (!(await window.client.waitForInterest(topic, { timeoutMs: 10000 }))) return 'no subscriber';
    for (let i = 1; i <= count; i++) window.client.publish(topic, `p${i}`);
    await window.client.flush();
    return count;
  },

  respond: async ({ pattern }) => {
    const requests = await window.client.subscribe(pattern);
    (async () => {
      for await (const request of requests) request.respond(request.text().toUpperCase());
    })();
    return pattern;
  },

  request: async ({ topic, data, waitMs = 0 }) => {
    await window.client.waitForInterest(topic, { timeoutMs: waitMs });
    try {
      return { answer: (await window.client.request(topic, data)).text() };
    } catch (e) {
      return { name: e.name, code: e.code, message: e.message };
    }
  },

  // Counts events of `pattern` until `count` came or `idleMs` passed
  // without one; the rate is from the first to the last.
  countEvents: async ({ pattern, count, idleMs }) => {
    const subscription = await window.client.subscribe(pattern);
    window.counted = (async () => {
      let [received, first, last] = [0, 0, 0];
      for (;;) {
        const next = await Promise.race([
          subscription.next(),
          new Promise((resolve) => setTimeout(() => resolve(null), idleMs)),
        ]);
        if (next === null || next.done) break;
        last = performance.now();
        if (received === 0) first = last;
        received += 1;
        if (received === count) break;
      }
      return { received, seconds: (last - first) / 1000 };
    })();
    return pattern;
  },

  counted: async () => window.counted,

  dashboardNodes: async ({ count, timeoutMs }) => {
    const deadline = Date.now() + timeoutMs;
    const shown = () => document.querySelectorAll('#tree [data-node]').length;
    while (shown() !== count && Date.now() < deadline) {
      await new Promise((resolve) => setTimeout(resolve, 50));
    }
    return {
      nodes: shown(),
      rows: document.querySelectorAll('#nodes tbody tr').length,
      state: document.getElementById('state').textContent,
    };
  },

  close: async () => {
    await window.client.close();
    return 'closed';
  },
};

const browser = await puppeteer.launch({
  executablePath: args.chromium,
  headless: true,
  pipe: true,
  args: [
    '--no-sandbox',
    '--disable-gpu',
    // Nothing leaves the machine: no name resolves but the test's own.
    '--host-resolver-rules=MAP * ~NOTFOUND, EXCLUDE 127.0.0.1',
    '--no-proxy-server',
  ],
});
try {
  const page = await browser.newPage();
  page.on('console', (message) => console.error(`page: ${message.text()}`));
  page.on('pageerror', (error) => console.error(`page error: ${error.message}`));
  // Any page of the node's origin is a secure context (127.0.0.1).
  await page.goto(new URL('webtransport.json', args.url).href);
  for await (const line of createInterface({ input: process.stdin })) {
    const { step, ...params } = JSON.parse(line);
    let answer;
    try {
      if (step === 'goto') {
        await page.goto(params.url);
        answer = { ok: page.url() };
      } else if (step === 'screenshot') {
        await page.screenshot({ path: params.path });
        answer = { ok: params.path };
      } else if (steps[step]) {
        answer = { ok: await page.evaluate(steps[step], params) };
      } else {
        answer = { error: `no step ${step}` };
      }
    } catch (e) {
      answer = { error: e.message };
    }
    process.stdout.write(`${JSON.stringify(answer)}\n`);
  }
} finally {
  await browser.close();
}
