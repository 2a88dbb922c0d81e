// Browser checks of the fleet server's console, run by
// integ/tests/console.rs against a real server with agents mid-rollout.
// Debian's Chromium, headless, driven by playwright-core (no downloaded
// browser). Environment:
//   EF_URL          the server (http://127.0.0.1:PORT)
//   EF_OPERATOR     an operator token; EF_VIEWER a viewer token
//   EF_PAUSED       a rollout paused by a health gate
//   EF_RUNNING      a running rollout (this script pauses it)
//   EF_EXPERIMENT   a running A/B experiment (this script stops it)
//   EF_DEVICE       a device with telemetry
//   EF_CHROMIUM     the browser binary (default /usr/bin/chromium)
//   EF_SCREENSHOTS  a folder for one PNG per view (optional)
// Exits 1 with the failed check's message on the first failure.
import { chromium } from 'playwright-core';
import { mkdirSync } from 'node:fs';
import { join } from 'node:path';

const env = (k) => {
  const v = process.env[k];
  if (!v) throw new Error(`${k} is not set`);
  return v;
};
const URL_ = env('EF_URL');
const OPERATOR = env('EF_OPERATOR');
const VIEWER = env('EF_VIEWER');
const PAUSED = env('EF_PAUSED');
const RUNNING = env('EF_RUNNING');
const DEVICE = env('EF_DEVICE');
const EXPERIMENT = env('EF_EXPERIMENT');
const SHOTS = process.env.EF_SCREENSHOTS || '';
const TIMEOUT = 20000;

let checks = 0;
function check(cond, what) {
  if (!cond) throw new Error('check failed: ' + what);
  checks++;
  console.log('ok -', what);
}

async function api(path, token, method = 'GET') {
  const r = await fetch(URL_ + path, { method, headers: { Authorization: 'Bearer ' + token } });
  if (!r.ok) throw new Error(`${method} ${path}: ${r.status} ${await r.text()}`);
  return r.json();
}

async function shot(page, name) {
  if (!SHOTS) return;
  mkdirSync(SHOTS, { recursive: true });
  // Let charts and live updates settle.
  await page.waitForTimeout(300);
  await page.screenshot({ path: join(SHOTS, name + '.png'), fullPage: true });
  console.log('screenshot', name);
}

async function login(context, token) {
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (e) => errors.push(String(e)));
  // Refused requests (a 401 before login, the checks' 403s) are expected;
  // script errors and CSP violations are not.
  page.on('console', (m) => {
    if (m.type() === 'error' && !m.text().startsWith('Failed to load resource')) errors.push(m.text());
  });
  page.errors = errors;
  await page.goto(URL_ + '/ui/');
  await page.locator('#token').fill(token);
  await page.locator('form button[type=submit]').click();
  // The session is there once the header names the caller's role.
  // (attached, not visible: a phone-sized layout hides the name.)
  await page.locator('#who[data-role]').waitFor({ state: 'attached', timeout: TIMEOUT });
  check(await page.locator('#nav').isVisible(), 'the navigation shows after login');
  return page;
}

// Waits until fn() (run in Node) returns true, or fails with `what`.
async function eventually(what, fn, ms = TIMEOUT) {
  const deadline = Date.now() + ms;
  let last;
  for (;;) {
    try {
      last = await fn();
      if (last === true) return;
    } catch (e) {
      last = e;
    }
    if (Date.now() > deadline) throw new Error(`check failed: ${what} (last: ${last})`);
    await new Promise((r) => setTimeout(r, 250));
  }
}

async function noHorizontalOverflow(page) {
  return page.evaluate(() => document.documentElement.scrollWidth <= window.innerWidth + 1);
}

const browser = await chromium.launch({
  executablePath: process.env.EF_CHROMIUM || '/usr/bin/chromium',
  headless: true,
  args: ['--no-sandbox', '--disable-gpu', '--disable-quic', '--no-first-run',
    '--disable-background-networking', '--disable-component-update', '--disable-sync'],
});
try {
  // ---- login, with a wrong token first ----
  const desk = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  {
    const page = await desk.newPage();
    const res = await page.goto(URL_ + '/ui/');
    const csp = res.headers()['content-security-policy'] || '';
    check(csp.includes("script-src 'self'") && csp.includes("frame-ancestors 'none'") && !csp.includes('unsafe'),
      'the console is served with a strict Content-Security-Policy');
    await page.locator('#token').fill('not-a-token');
    await page.locator('form button[type=submit]').click();
    await page.locator('#login-error').filter({ hasText: /not an operator token/ }).waitFor({ timeout: TIMEOUT });
    check(true, 'a wrong token is refused with a clear message');
    check(!(await page.locator('#nav').isVisible()) && !(await page.locator('#logout').isVisible()),
      'the login screen shows no navigation');
    await shot(page, 'login');
    await page.close();
  }
  const op = await login(desk, OPERATOR);
  const cookies = await desk.cookies();
  const session = cookies.find((c) => c.name === 'ef_session');
  check(session && session.httpOnly && session.sameSite === 'Strict',
    'the session cookie is HttpOnly and SameSite=Strict');
  check(await op.evaluate(() => !document.cookie.includes('ef_session')), 'page scripts cannot read the session cookie');

  // ---- overview counts match the API ----
  await op.locator('[data-card=devices] .n').waitFor({ timeout: TIMEOUT });
  await eventually('the overview counts match GET /api/v1/summary', async () => {
    const sum = await api('/api/v1/summary', VIEWER);
    const shown = await op.evaluate(() => {
      const out = {};
      for (const el of document.querySelectorAll('[data-card]')) out['card:' + el.dataset.card] = Number(el.querySelector('.n').textContent);
      for (const el of document.querySelectorAll('[data-count]')) out[el.dataset.count] = Number(el.querySelector('td.num').textContent);
      return out;
    });
    const want = {
      'card:devices': sum.devices,
      'card:online': sum.by_presence.online || 0,
      'card:offline': sum.by_presence.offline || 0,
      'card:running': sum.rollouts.running || 0,
      'card:paused': sum.rollouts.paused || 0,
    };
    for (const [k, v] of Object.entries(sum.by_state)) want['state:' + k] = v;
    for (const [k, v] of Object.entries(sum.by_version)) want['version:' + k] = v;
    for (const [k, v] of Object.entries(sum.by_board)) want['board:' + k] = v;
    for (const [k, v] of Object.entries(sum.by_presence)) want['presence:' + k] = v;
    const diff = Object.keys({ ...want, ...shown }).filter((k) => want[k] !== shown[k]);
    return diff.length === 0 || JSON.stringify({ diff, want, shown });
  });
  check(true, 'the overview counts match GET /api/v1/summary');
  const sum = await api('/api/v1/summary', VIEWER);
  const list = await api('/api/v1/devices', VIEWER);
  check(sum.devices === list.length, `the summary counts every device of GET /api/v1/devices (${list.length})`);
  await shot(op, 'overview');

  // ---- devices: a filter, then a device page with charts ----
  await op.goto(URL_ + '/ui/#/devices?tag=board%3Drpi5');
  await op.locator('#devices tbody tr').first().waitFor({ timeout: TIMEOUT });
  const rpi5 = list.filter((d) => d.tags.board === 'rpi5').map((d) => d.id).sort();
  await eventually('the board filter shows exactly the rpi5 devices', async () => {
    const shown = (await op.locator('#devices tbody tr').evaluateAll((rows) => rows.map((r) => r.dataset.device))).sort();
    return JSON.stringify(shown) === JSON.stringify(rpi5) || JSON.stringify(shown);
  });
  check(true, 'the devices view filters by tag');
  await op.goto(URL_ + '/ui/#/devices');
  await op.locator('#devices tbody tr').first().waitFor({ timeout: TIMEOUT });
  await shot(op, 'devices');
  await op.goto(URL_ + '/ui/#/devices/' + DEVICE);
  await op.locator('.chart svg polyline').first().waitFor({ timeout: TIMEOUT });
  const dev = await api('/api/v1/devices/' + DEVICE, VIEWER);
  const activeShown = await op.locator('[data-field=active]').textContent();
  check(activeShown === `${dev.active.name}@${dev.active.version}`, `the device page shows the active model (${activeShown})`);
  check(await op.locator('.chart svg').count() >= 3, 'the device page charts its telemetry history');
  await shot(op, 'device');

  await op.goto(URL_ + '/ui/#/bundles');
  // The view's own table: the previous page's tables may still be shown
  // until the hash change has rendered.
  await op.locator('#bundles tbody tr').first().waitFor({ timeout: TIMEOUT });
  const bundles = await api('/api/v1/bundles', VIEWER);
  await eventually('the bundles view lists every bundle', async () => {
    const shown = (await op.locator('#bundles tbody tr').evaluateAll((rows) => rows.map((r) => r.dataset.bundle))).sort();
    const want = bundles.map((b) => b.id).sort();
    return JSON.stringify(shown) === JSON.stringify(want) || JSON.stringify(shown);
  });
  check(true, 'the bundles view lists every bundle');
  await shot(op, 'bundles');
  await op.goto(URL_ + '/ui/#/rollouts');
  await op.locator('[data-rollout]').first().waitFor({ timeout: TIMEOUT });
  await shot(op, 'rollouts');

  // ---- experiments: the list and a page with both arms and the verdict ----
  const exp = await api('/api/v1/experiments/' + EXPERIMENT, VIEWER);
  await op.goto(URL_ + '/ui/#/experiments');
  await op.locator(`[data-experiment="${EXPERIMENT}"]`).waitFor({ timeout: TIMEOUT });
  check(true, 'the experiments view lists the experiment');
  await op.goto(URL_ + '/ui/#/experiments/' + EXPERIMENT);
  await op.locator('#verdicts').waitFor({ timeout: TIMEOUT });
  const armA = await op.locator('[data-arm=a]').textContent();
  const armB = await op.locator('[data-arm=b]').textContent();
  check(armA.includes(`${exp.a.name}@${exp.a.version}`) && armA.includes(`${exp.devices_a} devices`)
    && armB.includes(`${exp.b.name}@${exp.b.version}`) && armB.includes(`${exp.devices_b} devices`),
  `the experiment page shows both arms with their devices (${armA} / ${armB})`);
  check(await op.locator(`#verdicts tr[data-metric=${exp.primary}]`).count() === 1, 'the verdict table has the primary metric');
  check((await op.locator('#summary').textContent()).includes(exp.primary), 'the verdict is explained in words');
  await shot(op, 'experiment');

  // ---- a paused rollout shows the breached gate and its observed value ----
  const paused = await api('/api/v1/rollouts/' + PAUSED, VIEWER);
  const why = paused.decisions.filter((d) => d.action === 'pause').pop();
  await op.goto(URL_ + '/ui/#/rollouts/' + PAUSED);
  const banner = op.locator('#paused-banner');
  await banner.waitFor({ timeout: TIMEOUT });
  check(await banner.locator('[data-gate]').getAttribute('data-gate') === why.gate,
    `the paused rollout names the breached gate (${why.gate})`);
  check(Number(await banner.locator('[data-observed]').getAttribute('data-observed')) === why.observed,
    `... with its observed value (${why.observed}, threshold ${why.threshold})`);
  const bannerText = await banner.textContent();
  check(bannerText.includes(String(Math.round(why.observed))) || bannerText.includes(why.observed.toFixed(1).replace(/\.0$/, '')),
    `the banner says the observed value in words: "${bannerText.trim()}"`);
  const gateRow = op.locator(`#decisions tr[data-decision=pause]`).first();
  check((await gateRow.textContent()).includes(why.gate), 'the decisions table lists the pause with its gate');
  check(await op.locator('#stages tbody tr').count() === paused.stages.length, 'the rollout page shows every stage');
  check(await op.locator('#members tbody tr').count() > 0, 'the rollout page lists its devices');
  await shot(op, 'rollout-paused');

  // ---- a viewer sees no action buttons and cannot act ----
  const viewerCtx = await browser.newContext({ viewport: { width: 1280, height: 860 } });
  const viewer = await login(viewerCtx, VIEWER);
  check(await viewer.locator('#who').getAttribute('data-role') === 'viewer', 'the viewer is logged in as a viewer');
  await viewer.goto(URL_ + '/ui/#/rollouts/' + RUNNING);
  await viewer.locator('#stages').waitFor({ timeout: TIMEOUT });
  check(await viewer.locator('[data-action]').count() === 0, 'a viewer sees no action buttons on a running rollout');
  await viewer.goto(URL_ + '/ui/#/rollouts/' + PAUSED);
  await viewer.locator('#paused-banner').waitFor({ timeout: TIMEOUT });
  check(await viewer.locator('[data-action]').count() === 0, 'a viewer sees no action buttons on a paused rollout');
  const forged = await viewer.evaluate(async (id) => {
    const s = await (await fetch('/ui/session')).json();
    const r = await fetch('/api/v1/rollouts/' + id + '/abort', { method: 'POST', headers: { 'X-CSRF-Token': s.csrf } });
    return r.status;
  }, PAUSED);
  check(forged === 403, `a viewer's session cannot abort a rollout, even by hand (${forged})`);
  await viewer.goto(URL_ + '/ui/#/experiments/' + EXPERIMENT);
  await viewer.locator('#verdicts').waitFor({ timeout: TIMEOUT });
  check(await viewer.locator('[data-action]').count() === 0, 'a viewer sees no action buttons on an experiment');
  await viewer.goto(URL_ + '/ui/#/rollouts/' + RUNNING);
  await viewer.locator('#stages').waitFor({ timeout: TIMEOUT });

  // ---- CSRF: an operator's session cannot act without its token ----
  const noCsrf = await op.evaluate(async (id) => {
    const r = await fetch('/api/v1/rollouts/' + id + '/pause', { method: 'POST' });
    return [r.status, (await r.json()).error.code];
  }, RUNNING);
  check(noCsrf[0] === 403 && noCsrf[1] === 'csrf', `a session request without the CSRF token is refused (${noCsrf})`);
  check((await api('/api/v1/rollouts/' + RUNNING, VIEWER)).phase.state === 'running', '... and changed nothing');

  // ---- the pause button pauses; the viewer's open page follows live ----
  await op.goto(URL_ + '/ui/#/rollouts/' + RUNNING);
  const pause = op.locator('button[data-action=pause]');
  await pause.waitFor({ timeout: TIMEOUT });
  await shot(op, 'rollout-running');
  await pause.click();
  await op.locator('#paused-banner').filter({ hasText: 'an operator' }).waitFor({ timeout: TIMEOUT });
  await eventually('the API says the rollout is paused', async () =>
    (await api('/api/v1/rollouts/' + RUNNING, VIEWER)).phase.state === 'paused');
  check(true, 'the pause button pauses the rollout');
  check(await op.locator('button[data-action=resume]').count() === 1, 'a paused rollout offers resume');
  await viewer.locator('#paused-banner').waitFor({ timeout: TIMEOUT });
  check(true, "the viewer's open page showed the pause live, without a reload");

  // ---- stopping an experiment takes a second click ----
  await op.goto(URL_ + '/ui/#/experiments/' + EXPERIMENT);
  const stopBtn = op.locator('button[data-action=stop]');
  await stopBtn.waitFor({ timeout: TIMEOUT });
  await stopBtn.click();
  await op.locator('button[data-action=stop]', { hasText: 'Confirm' }).waitFor({ timeout: TIMEOUT });
  check((await api('/api/v1/experiments/' + EXPERIMENT, VIEWER)).phase.state === 'running', 'one click does not stop an experiment');
  await op.locator('button[data-action=stop]').click();
  await eventually('the experiment is stopped', async () =>
    (await api('/api/v1/experiments/' + EXPERIMENT, VIEWER)).phase.state === 'stopped');
  check(true, 'the second click stops the experiment');

  // ---- a phone-sized screen ----
  const phone = await browser.newContext({ viewport: { width: 390, height: 844 }, isMobile: true, hasTouch: true, deviceScaleFactor: 2 });
  const mob = await login(phone, OPERATOR);
  for (const [hash, ready, name] of [
    ['#/', '[data-card=devices]', 'phone-overview'],
    ['#/devices', '#devices', 'phone-devices'],
    ['#/devices/' + DEVICE, '.chart', 'phone-device'],
    ['#/bundles', '#bundles', 'phone-bundles'],
    ['#/rollouts/' + PAUSED, '#paused-banner', 'phone-rollout'],
    ['#/experiments/' + EXPERIMENT, '#verdicts', 'phone-experiment'],
  ]) {
    await mob.goto(URL_ + '/ui/' + hash);
    await mob.locator(ready).first().waitFor({ timeout: TIMEOUT });
    check(await noHorizontalOverflow(mob), `${hash} fits a 390 px wide screen`);
    if (name === 'phone-overview' || name === 'phone-rollout') await shot(mob, name);
  }

  // ---- logout ends the session ----
  await op.locator('#logout').click();
  await op.locator('#token').waitFor({ timeout: TIMEOUT });
  const after = await op.evaluate(async () => (await fetch('/ui/session')).status);
  check(after === 401, 'after logout the session is gone');

  for (const p of [op, viewer, mob]) {
    check(p.errors.length === 0, 'no script errors in the page: ' + JSON.stringify(p.errors));
  }
  console.log(`${checks} checks passed`);
} catch (e) {
  // What the pages showed when it failed.
  for (const ctx of browser.contexts()) {
    for (const p of ctx.pages()) {
      const text = await p.evaluate(() => document.getElementById('main')?.innerText || '').catch(() => '');
      console.error(`--- page ${p.url()} ---\n${text.slice(0, 3000)}`);
    }
  }
  throw e;
} finally {
  await browser.close();
}
