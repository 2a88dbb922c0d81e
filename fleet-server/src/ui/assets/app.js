// edgefleet console: a small single-page app over the fleet server's REST
// API (the same one fleetctl uses). No framework, no build step, nothing
// from elsewhere: the server's Content-Security-Policy allows only this
// file. Text from devices (ids, tags, reasons) is always set as text,
// never parsed as HTML.
'use strict';

const state = {
  session: null, // {name, role, csrf, can_manage_rollouts}
  route: null,
  refreshing: false,
  pending: false,
  stream: null,
  confirm: null, // the rollout action waiting for confirmation
};

// ---------- DOM helpers ----------

function h(tag, attrs, ...children) {
  const el = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === 'class') el.className = v;
    else if (k === 'text') el.textContent = v;
    else if (k.startsWith('on')) el.addEventListener(k.slice(2), v);
    else el.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return el;
}

const svgNS = 'http://www.w3.org/2000/svg';
function s(tag, attrs) {
  const el = document.createElementNS(svgNS, tag);
  for (const [k, v] of Object.entries(attrs || {})) el.setAttribute(k, String(v));
  return el;
}

function time(unix) {
  if (!unix) return '–';
  const d = new Date(unix * 1000);
  return d.toLocaleString(undefined, { hour12: false });
}

function ago(unix) {
  if (!unix) return 'never';
  const s = Math.max(0, Math.round(Date.now() / 1000 - unix));
  if (s < 90) return s + ' s ago';
  if (s < 5400) return Math.round(s / 60) + ' min ago';
  if (s < 172800) return Math.round(s / 3600) + ' h ago';
  return Math.round(s / 86400) + ' d ago';
}

function bytes(n) {
  if (n === null || n === undefined) return '–';
  const u = ['B', 'KiB', 'MiB', 'GiB', 'TiB'];
  let i = 0;
  while (n >= 1024 && i < u.length - 1) { n /= 1024; i++; }
  return (i ? n.toFixed(1) : n) + ' ' + u[i];
}

function num(v, digits) {
  if (v === null || v === undefined) return '–';
  return Number(v).toFixed(digits === undefined ? 2 : digits).replace(/\.?0+$/, '') || '0';
}

function model(ref) {
  return ref ? ref.name + '@' + ref.version : '–';
}

const STATE_CLASS = {
  committed: 'ok', idle: '', watching: 'warn', downloading: 'warn', verifying: 'warn',
  staged: 'warn', self_testing: 'warn', shadowing: 'warn', blocked: 'warn',
  failed: 'bad', rolled_back: 'bad', unreported: '',
  running: 'warn', paused: 'bad', completed: 'ok', aborted: 'bad',
  online: 'ok', offline: 'bad', unknown: '',
};

function pill(text, cls) {
  return h('span', { class: 'pill ' + (cls === undefined ? (STATE_CLASS[text] || '') : cls) }, text);
}

function online(d) {
  if (d.online === true) return pill('online');
  if (d.online === false) return pill('offline');
  return pill('unknown', '');
}

function table(head, rows, attrs) {
  return h('div', { class: 'scroll' },
    h('table', attrs || {},
      h('thead', {}, h('tr', {}, head.map((c) =>
        typeof c === 'string' ? h('th', {}, c) : h('th', c.attrs || {}, c.text)))),
      h('tbody', {}, rows)));
}

// ---------- the API ----------

class ApiError extends Error {
  constructor(status, code, message) {
    super(message);
    this.status = status;
    this.code = code;
  }
}

async function api(path, opts) {
  opts = opts || {};
  const headers = { Accept: 'application/json' };
  if (opts.method && opts.method !== 'GET') {
    headers['X-CSRF-Token'] = state.session ? state.session.csrf : '';
    if (opts.body !== undefined) headers['Content-Type'] = 'application/json';
  }
  const r = await fetch(path, {
    method: opts.method || 'GET',
    headers,
    credentials: 'same-origin',
    cache: 'no-store',
    body: opts.body === undefined ? undefined : JSON.stringify(opts.body),
  });
  if (r.status === 401 && !opts.anonymous) {
    state.session = null;
    showLogin('Your session ended; log in again.');
    throw new ApiError(401, 'unauthorized', 'not logged in');
  }
  if (!r.ok) {
    let code = 'http_' + r.status, message = r.statusText;
    try {
      const b = await r.json();
      code = b.error.code;
      message = b.error.message;
    } catch (_) { /* not our JSON */ }
    throw new ApiError(r.status, code, message);
  }
  if (r.status === 204) return { body: null, headers: r.headers };
  return { body: await r.json(), headers: r.headers };
}

// ---------- login ----------

function showLogin(message) {
  closeStream();
  document.getElementById('nav').hidden = true;
  document.getElementById('logout').hidden = true;
  const who = document.getElementById('who');
  who.textContent = '';
  delete who.dataset.role;
  const err = h('p', { class: 'error', id: 'login-error', role: 'alert' }, message || '');
  const token = h('input', {
    type: 'password', name: 'token', id: 'token', autocomplete: 'current-password',
    required: true, placeholder: 'operator token',
  });
  const form = h('form', {
    onsubmit: async (e) => {
      e.preventDefault();
      err.textContent = '';
      try {
        const r = await api('/ui/login', { method: 'POST', body: { token: token.value }, anonymous: true });
        token.value = '';
        state.session = r.body;
        start();
      } catch (x) {
        err.textContent = x.status === 429 ? 'Too many attempts; wait and retry.' : x.message;
      }
    },
  },
  h('label', { for: 'token' }, 'Operator token (viewer, operator or admin)', token),
  h('button', { class: 'primary', type: 'submit' }, 'Log in'),
  err);
  const main = document.getElementById('main');
  main.replaceChildren(h('section', { class: 'login card' },
    h('h1', {}, 'Log in to edgefleet'),
    h('p', { class: 'muted' }, 'The token is exchanged for a session cookie; the page never stores it.'),
    form));
  token.focus();
}

async function logout() {
  // Stop painting views first: the CSRF token the logout request needs is
  // read before the session is dropped.
  const request = api('/ui/logout', { method: 'POST' });
  state.session = null;
  closeStream();
  try { await request; } catch (_) { /* ended anyway */ }
  showLogin('Logged out.');
}

// ---------- live updates ----------

function closeStream() {
  if (state.stream) state.stream.close();
  state.stream = null;
  document.getElementById('live').classList.remove('on');
}

function openStream() {
  closeStream();
  const es = new EventSource('/api/v1/stream');
  const dot = document.getElementById('live');
  es.addEventListener('open', () => { dot.classList.add('on'); dot.title = 'Live'; });
  es.addEventListener('error', () => { dot.classList.remove('on'); dot.title = 'Reconnecting…'; });
  es.addEventListener('change', () => refresh());
  state.stream = es;
}

// At most one render at a time; changes during a render cause one more.
async function refresh() {
  if (!state.session) return;
  if (state.refreshing) { state.pending = true; return; }
  state.refreshing = true;
  try {
    await render();
  } finally {
    state.refreshing = false;
    if (state.pending) {
      state.pending = false;
      setTimeout(refresh, 250);
    }
  }
}

// ---------- routing ----------

function parseRoute() {
  const hash = location.hash.replace(/^#/, '') || '/';
  const [path, query] = hash.split('?');
  const parts = path.split('/').filter(Boolean).map(decodeURIComponent);
  return { parts, query: new URLSearchParams(query || '') };
}

async function render() {
  const route = parseRoute();
  state.route = route;
  const view = route.parts[0] || 'overview';
  for (const a of document.querySelectorAll('nav a')) {
    a.classList.toggle('active', a.dataset.view === view);
  }
  const main = document.getElementById('main');
  let content;
  try {
    if (view === 'overview') content = await overview();
    else if (view === 'devices' && route.parts[1]) content = await devicePage(route.parts[1]);
    else if (view === 'devices') content = await devices(route.query);
    else if (view === 'bundles') content = await bundles();
    else if (view === 'rollouts' && route.parts[1]) content = await rolloutPage(route.parts[1]);
    else if (view === 'rollouts') content = await rollouts();
    else if (view === 'experiments' && route.parts[1]) content = await experimentPage(route.parts[1]);
    else if (view === 'experiments') content = await experiments();
    else content = h('p', {}, 'No such page. ', h('a', { href: '#/' }, 'Overview'));
  } catch (e) {
    if (e.status === 401) return;
    content = h('div', { class: 'banner bad', role: 'alert' }, 'Could not load this view: ' + e.message);
  }
  // A live refresh that was in flight when the operator logged out (or the
  // session ended) must not paint a view over the login form.
  if (!state.session) return;
  // Keep focus and typing in filter fields across live refreshes.
  const active = document.activeElement;
  if (active && active.id && main.contains(active) && content.querySelector('#' + active.id)) {
    const twin = content.querySelector('#' + active.id);
    if ('value' in twin) twin.value = active.value;
    main.replaceChildren(content);
    twin.focus();
  } else {
    main.replaceChildren(content);
  }
}

// Devices of the current stage that installed the bundle and wait for a
// maintenance window (or their local app).
function waitingText(r) {
  const i = r.phase.stage;
  const st = i === undefined ? null : r.stages[i];
  if (!st || !st.waiting) return '';
  return st.waiting + ' device(s) waiting for window (next: ' + (st.next_window ? time(st.next_window) : 'unknown') + ')';
}

// ---------- views ----------

function countTable(title, key, counts) {
  const rows = Object.entries(counts).sort((a, b) => b[1] - a[1]).map(([k, n]) =>
    h('tr', { 'data-count': key + ':' + k },
      h('td', {}, key === 'state' || key === 'presence' ? pill(k) : h('span', { class: 'mono' }, k)),
      h('td', { class: 'num' }, n)));
  return h('section', {}, h('h2', {}, title),
    rows.length ? table(['', { text: 'devices', attrs: { class: 'num' } }], rows) : h('p', { class: 'muted' }, 'No devices yet.'));
}

async function overview() {
  const { body: sum } = await api('/api/v1/summary');
  const { body: rs } = await api('/api/v1/rollouts');
  const card = (label, n, id) => h('div', { class: 'card', 'data-card': id }, h('div', { class: 'muted' }, label), h('div', { class: 'n' }, n));
  const live = rs.filter((r) => r.phase.state === 'running' || r.phase.state === 'paused');
  return h('div', {},
    h('h1', {}, 'Fleet overview'),
    h('div', { class: 'cards' },
      card('Devices', sum.devices, 'devices'),
      card('Online', sum.by_presence.online || 0, 'online'),
      card('Offline', sum.by_presence.offline || 0, 'offline'),
      card('Rollouts running', sum.rollouts.running || 0, 'running'),
      card('Rollouts paused', sum.rollouts.paused || 0, 'paused')),
    live.length ? h('section', {}, h('h2', {}, 'Active rollouts'), rolloutTable(live)) : null,
    h('div', { class: 'grid' },
      countTable('By update state', 'state', sum.by_state),
      countTable('By model version', 'version', sum.by_version),
      countTable('By board', 'board', sum.by_board),
      countTable('By presence', 'presence', sum.by_presence)));
}

const PAGE = 50;

async function devices(q) {
  const params = new URLSearchParams();
  params.set('limit', String(PAGE));
  for (const k of ['status', 'version', 'online', 'cursor']) if (q.get(k)) params.set(k, q.get(k));
  for (const t of (q.get('tag') || '').split(',').map((x) => x.trim()).filter(Boolean)) params.append('tag', t);
  const { body: list, headers } = await api('/api/v1/devices?' + params);
  const next = /[?&]cursor=([^&>]*)/.exec(headers.get('Link') || '');
  const states = ['', 'idle', 'downloading', 'blocked', 'verifying', 'staged', 'self_testing', 'shadowing', 'watching', 'committed', 'failed', 'rolled_back'];
  const field = (name, label, input) => h('label', { for: 'f-' + name }, label, input);
  const stateSel = h('select', { id: 'f-status', name: 'status' },
    states.map((st) => h('option', { value: st, selected: q.get('status') === st }, st || 'any')));
  const onlineSel = h('select', { id: 'f-online', name: 'online' },
    [['', 'any'], ['true', 'online'], ['false', 'offline']].map(([v, t]) => h('option', { value: v, selected: (q.get('online') || '') === v }, t)));
  const version = h('input', { id: 'f-version', name: 'version', value: q.get('version') || '', placeholder: '1.2.0', size: 10 });
  const tag = h('input', { id: 'f-tag', name: 'tag', value: q.get('tag') || '', placeholder: 'board=rpi4', size: 14 });
  const go = (extra) => {
    const p = new URLSearchParams();
    if (stateSel.value) p.set('status', stateSel.value);
    if (onlineSel.value) p.set('online', onlineSel.value);
    if (version.value.trim()) p.set('version', version.value.trim());
    if (tag.value.trim()) p.set('tag', tag.value.trim());
    for (const [k, v] of Object.entries(extra || {})) p.set(k, v);
    location.hash = '#/devices' + (p.toString() ? '?' + p : '');
  };
  const form = h('form', { class: 'filters', onsubmit: (e) => { e.preventDefault(); go(); } },
    field('status', 'State', stateSel), field('online', 'Presence', onlineSel),
    field('version', 'Version', version), field('tag', 'Tags (k=v, …)', tag),
    h('button', { type: 'submit' }, 'Filter'));
  stateSel.addEventListener('change', () => go());
  onlineSel.addEventListener('change', () => go());
  const rows = list.map((d) => h('tr', { 'data-device': d.id },
    h('td', {}, h('a', { href: '#/devices/' + encodeURIComponent(d.id) }, d.id)),
    h('td', { class: 'hide-sm' }, d.tags.board || '–'),
    h('td', { class: 'mono' }, model(d.active)),
    h('td', {}, pill(d.state || 'unreported')),
    h('td', {}, online(d)),
    h('td', { class: 'hide-sm' }, ago(d.last_seen))));
  return h('div', {},
    h('h1', {}, 'Devices'),
    form,
    rows.length ? table(['device', { text: 'board', attrs: { class: 'hide-sm' } }, 'model', 'state', 'presence', { text: 'last seen', attrs: { class: 'hide-sm' } }], rows, { id: 'devices' })
      : h('p', { class: 'muted' }, 'No device matches.'),
    h('div', { class: 'pager' },
      q.get('cursor') ? h('button', { type: 'button', onclick: () => go() }, 'First page') : null,
      next ? h('button', { type: 'button', id: 'next-page', onclick: () => go({ cursor: decodeURIComponent(next[1]) }) }, 'Next page') : null,
      h('span', { class: 'muted' }, list.length + ' shown')));
}

function sparkline(title, points, value, unit, digits) {
  const vals = points.map(value);
  const known = vals.filter((v) => v !== null && v !== undefined && isFinite(v));
  const last = known.length ? known[known.length - 1] : null;
  const box = h('div', { class: 'card chart' },
    h('div', {}, h('span', { class: 'muted' }, title + ' '), h('span', { class: 'last' }, last === null ? '–' : num(last, digits) + ' ' + unit)));
  if (known.length < 2) {
    box.append(h('div', { class: 'muted' }, 'Not enough telemetry yet.'));
    return box;
  }
  const w = 200, ht = 50;
  const lo = Math.min(0, ...known), hi = Math.max(...known) || 1;
  const xs = (i) => (i / (vals.length - 1)) * w;
  const ys = (v) => ht - ((v - lo) / (hi - lo || 1)) * (ht - 4) - 2;
  const pts = vals.map((v, i) => (v === null || v === undefined ? null : xs(i).toFixed(1) + ',' + ys(v).toFixed(1))).filter(Boolean);
  const svg = s('svg', { viewBox: '0 0 ' + w + ' ' + ht, preserveAspectRatio: 'none', role: 'img', 'aria-label': title });
  svg.append(s('polyline', { points: pts.join(' '), fill: 'none', stroke: '#1f4e79', 'stroke-width': 1.5, 'vector-effect': 'non-scaling-stroke' }));
  box.append(svg, h('div', { class: 'muted' }, 'max ' + num(hi, digits) + ' ' + unit + ' · ' + vals.length + ' points'));
  return box;
}

async function devicePage(id) {
  const enc = encodeURIComponent(id);
  const [{ body: d }, { body: points }] = await Promise.all([
    api('/api/v1/devices/' + enc), api('/api/v1/devices/' + enc + '/telemetry')]);
  const kv = (pairs) => h('dl', { class: 'kv' }, pairs.filter(Boolean).map(([k, v]) => [h('dt', {}, k), h('dd', {}, v)]));
  const health = d.health ? d.health.inferences + ' inferences, ' + d.health.errors + ' errors, p95 ' + num(d.health.p95_latency_ms) + ' ms' : '–';
  const t = d.telemetry;
  const drift = t && t.drift && t.drift.length
    ? table(['input', { text: 'PSI', attrs: { class: 'num' } }, ''], t.drift.map((v) => h('tr', {},
      h('td', { class: 'mono' }, v.feature), h('td', { class: 'num' }, num(v.psi, 3)),
      h('td', {}, v.psi >= 0.2 ? pill('alarm', 'bad') : v.psi >= 0.1 ? pill('watch', 'warn') : pill('ok', 'ok')))))
    : h('p', { class: 'muted' }, 'No drift values reported (the model has no baseline, or no telemetry yet).');
  const events = (d.events || []).slice().reverse().map((e) => h('tr', {},
    h('td', {}, time(e.at)), h('td', {}, e.event), h('td', { class: 'mono' }, e.bundle ? model(e.bundle) : ''),
    h('td', {}, e.reason || (e.drift && e.drift.length ? e.drift.map((v) => v.feature + ' ' + num(v.psi, 3)).join(', ') : ''))));
  const tags = Object.entries(d.tags).map(([k, v]) => k + '=' + v).join(', ') || '–';
  return h('div', {},
    h('p', {}, h('a', { href: '#/devices' }, '← Devices')),
    h('h1', {}, d.id),
    d.degraded ? h('div', { class: 'banner warn', role: 'status' }, 'Degraded but serving: ' + d.degraded) : null,
    h('div', { class: 'grid' },
      h('section', { class: 'card' }, h('h2', {}, 'Model'), kv([
        ['active', h('span', { class: 'mono', 'data-field': 'active' }, model(d.active))],
        ['desired', h('span', { class: 'mono' }, model(d.desired))],
        ['rollout', d.rollout ? h('a', { href: '#/rollouts/' + encodeURIComponent(d.rollout) }, d.rollout) : '–'],
        ['state', h('span', { 'data-field': 'state' }, pill(d.state || 'unreported'))],
        ['reason', d.reason || '–'],
        d.staged ? ['staged', model(d.staged)] : null,
        d.last_failed ? ['last failed', model(d.last_failed)] : null,
        ['last known good', model(d.last_known_good)],
        ['health', health],
      ])),
      h('section', { class: 'card' }, h('h2', {}, 'Device'), kv([
        ['presence', online(d)],
        ['last seen', ago(d.last_seen)],
        ['tags', tags],
        ['arch', d.arch],
        ['agent', d.agent_version],
        ['trust version', d.trust_version === null || d.trust_version === undefined ? '–' : String(d.trust_version)],
        ['enrolled', time(d.enrolled_at)],
        t ? ['memory', bytes(t.rss_bytes)] : null,
        t && t.disk_free_bytes !== null ? ['disk free', bytes(t.disk_free_bytes)] : null,
      ]))),
    h('h2', {}, 'Telemetry'),
    h('div', { class: 'charts' },
      sparkline('p95 latency', points, (p) => p.p95_latency_ms, 'ms', 1),
      sparkline('inferences', points, (p) => p.inferences_per_sec, '/s', 1),
      sparkline('CPU', points, (p) => p.cpu_pct, '%', 0),
      sparkline('temperature', points, (p) => p.temperature_c, '°C', 1),
      sparkline('drift (max PSI)', points, (p) => p.drift_psi_max, '', 3)),
    h('h2', {}, 'Drift'), drift,
    h('h2', {}, 'Events'),
    events.length ? table(['at', 'event', 'bundle', 'detail'], events) : h('p', { class: 'muted' }, 'No events yet.'));
}

async function bundles() {
  const { body: list } = await api('/api/v1/bundles');
  list.sort((a, b) => b.uploaded_at - a.uploaded_at);
  const rows = list.map((b) => h('tr', { 'data-bundle': b.id },
    h('td', { class: 'mono', title: b.id }, b.id.slice(0, 12)),
    h('td', {}, b.name), h('td', { class: 'mono' }, b.version), h('td', { class: 'num' }, b.sequence),
    h('td', {}, b.format), h('td', { class: 'num' }, bytes(b.size)),
    h('td', { class: 'hide-sm' }, time(b.uploaded_at) + ' by ' + b.uploaded_by),
    h('td', { class: 'hide-sm' }, time(b.expires_at))));
  return h('div', {}, h('h1', {}, 'Bundles'),
    rows.length ? table(['id', 'name', 'version', { text: 'seq', attrs: { class: 'num' } }, 'format', { text: 'size', attrs: { class: 'num' } },
      { text: 'pushed', attrs: { class: 'hide-sm' } }, { text: 'expires', attrs: { class: 'hide-sm' } }], rows, { id: 'bundles' })
      : h('p', { class: 'muted' }, 'No bundles yet: fleetctl bundle push FILE.'));
}

function phaseText(r) {
  const p = r.phase;
  if (p.state === 'running' || p.state === 'paused') return p.state + ' · stage ' + (p.stage + 1) + '/' + r.stages.length;
  return p.state;
}

function rolloutTable(list) {
  const rows = list.map((r) => h('tr', { 'data-rollout': r.id },
    h('td', {}, h('a', { href: '#/rollouts/' + r.id, class: 'mono' }, r.id.slice(0, 8))),
    h('td', { class: 'mono' }, model(r.bundle)),
    h('td', {}, pill(r.phase.state), ' ', h('span', { class: 'muted' }, phaseText(r).replace(/^\w+ ?·? ?/, ''))),
    h('td', { class: 'hide-sm' }, Object.entries(r.selector).map(([k, v]) => k + '=' + v).join(', ') || 'all'),
    h('td', { class: 'hide-sm' }, time(r.created_at))));
  return table(['rollout', 'bundle', 'phase', { text: 'selector', attrs: { class: 'hide-sm' } }, { text: 'created', attrs: { class: 'hide-sm' } }], rows);
}

async function rollouts() {
  const { body: list } = await api('/api/v1/rollouts');
  list.sort((a, b) => b.created_at - a.created_at);
  return h('div', {}, h('h1', {}, 'Rollouts'),
    list.length ? rolloutTable(list) : h('p', { class: 'muted' }, 'No rollouts yet: fleetctl rollout create.'));
}

const GATE_TEXT = {
  max_failed_devices_pct: ['failed devices', '%'],
  max_rollback_pct: ['rolled-back devices', '%'],
  max_p95_latency_ms: ['p95 latency', ' ms'],
  max_error_rate: ['error rate', ''],
  min_reporting_devices: ['reporting devices', ''],
};

function gateText(d) {
  const [what, unit] = GATE_TEXT[d.gate] || [d.gate, ''];
  if (d.observed === null || d.observed === undefined) return what;
  return what + ' ' + num(d.observed, 3) + unit + (d.threshold === null || d.threshold === undefined ? '' : ' (limit ' + num(d.threshold, 3) + unit + ')');
}

async function act(r, action) {
  try {
    await api('/api/v1/rollouts/' + r.id + '/' + action, { method: 'POST' });
    state.confirm = null;
  } catch (e) {
    if (e.status !== 401) alertBox('Could not ' + action + ': ' + e.message);
  }
  refresh();
}

function alertBox(text) {
  const main = document.getElementById('main');
  main.prepend(h('div', { class: 'banner bad', role: 'alert' }, text));
}

async function rolloutPage(id) {
  const { body: r } = await api('/api/v1/rollouts/' + encodeURIComponent(id));
  const { body: members, headers } = await api('/api/v1/devices?limit=200&rollout=' + encodeURIComponent(r.id));
  const more = /rel="next"/.test(headers.get('Link') || '');
  const p = r.phase;
  const current = p.stage === undefined ? -1 : p.stage;
  const last = r.decisions.length ? r.decisions[r.decisions.length - 1] : null;
  let banner = null;
  if (p.state === 'paused') {
    const why = r.decisions.slice().reverse().find((d) => d.action === 'pause');
    banner = h('div', { class: 'banner bad', role: 'status', id: 'paused-banner' },
      h('strong', {}, 'Paused'),
      why ? [' by ', h('span', { 'data-gate': why.gate }, why.gate === 'operator' ? 'an operator' : 'the ' + why.gate + ' gate'),
        why.gate === 'operator' ? '' : [': ', h('span', { 'data-observed': why.observed }, gateText(why))],
        why.devices && why.devices.length ? ' on ' + why.devices.join(', ') : '',
        '. ', why.message] : '');
  } else if (p.state === 'aborted') {
    banner = h('div', { class: 'banner bad', role: 'status' }, 'Aborted: devices were sent back to their previous model.');
  } else if (p.state === 'completed') {
    banner = h('div', { class: 'banner info', role: 'status' }, 'Completed ' + time(p.at) + '.');
  }
  const buttons = [];
  if (state.session && state.session.can_manage_rollouts && (p.state === 'running' || p.state === 'paused')) {
    const btn = (action, label, cls, needsConfirm) => h('button', {
      type: 'button', class: cls || '', 'data-action': action,
      onclick: () => {
        if (needsConfirm && state.confirm !== action) { state.confirm = action; refresh(); return; }
        act(r, action);
      },
    }, state.confirm === action ? 'Confirm ' + label.toLowerCase() : label);
    if (p.state === 'running') buttons.push(btn('pause', 'Pause'));
    if (p.state === 'paused') buttons.push(btn('resume', 'Resume', 'primary'));
    if (current + 1 < r.stages.length) buttons.push(btn('promote', 'Promote to next stage', '', true));
    buttons.push(btn('abort', 'Abort', 'danger', true));
  }
  const stageRows = r.stages.map((st, i) => {
    const bar = h('div', { class: 'bar', title: st.running + ' running, ' + st.failed + ' failed, ' + st.rolled_back + ' rolled back of ' + st.devices });
    for (const k of ['running', 'failed', 'rolled_back']) {
      const sp = h('span', { class: k });
      sp.style.width = (st.devices ? (100 * st[k]) / st.devices : 0) + '%';
      bar.append(sp);
    }
    const status = i < current || p.state === 'completed' ? 'done' : i === current ? p.state : 'waiting';
    return h('tr', { 'data-stage': i },
      h('td', {}, (i + 1) + ' · ' + st.percent + ' %'),
      h('td', {}, pill(status, status === 'done' ? 'ok' : status === 'paused' ? 'bad' : status === 'running' ? 'warn' : '')),
      h('td', {}, bar),
      h('td', { class: 'num' }, st.running + '/' + st.devices),
      h('td', { class: 'num hide-sm' }, st.pending), h('td', { class: 'num' }, st.failed),
      h('td', { class: 'num' }, st.rolled_back), h('td', { class: 'num hide-sm' }, st.offline),
      h('td', { class: 'hide-sm' }, st.bake_seconds ? Math.round(st.bake_seconds / 60 * 10) / 10 + ' min' : '–'));
  });
  const decisionRows = r.decisions.slice().reverse().map((d) => h('tr', { 'data-decision': d.action },
    h('td', {}, time(d.at)), h('td', {}, d.action), h('td', { class: 'mono' }, d.gate),
    h('td', { class: 'num' }, d.threshold === null || d.threshold === undefined ? '–' : num(d.threshold, 3)),
    h('td', { class: 'num' }, d.observed === null || d.observed === undefined ? '–' : num(d.observed, 3)),
    h('td', {}, d.devices.join(', ') + (d.device_count > d.devices.length ? ' … (' + d.device_count + ' in all)' : '')),
    h('td', { class: 'hide-sm' }, d.message)));
  const memberRows = members.map((d) => h('tr', {},
    h('td', {}, h('a', { href: '#/devices/' + encodeURIComponent(d.id) }, d.id)),
    h('td', { class: 'mono' }, model(d.active)), h('td', {}, pill(d.state || 'unreported')),
    h('td', {}, online(d)), h('td', { class: 'hide-sm' }, d.reason || '')));
  const gates = Object.entries(r.gates).filter(([, v]) => v !== null && v !== undefined).map(([k, v]) => k + ' ' + v).join(', ') || 'none';
  return h('div', {},
    h('p', {}, h('a', { href: '#/rollouts' }, '← Rollouts')),
    h('h1', {}, 'Rollout ', h('span', { class: 'mono' }, r.id.slice(0, 8)), ' · ', model(r.bundle)),
    h('p', {}, pill(p.state), ' ', h('span', { class: 'muted', id: 'phase' }, phaseText(r)),
      last ? h('span', { class: 'muted' }, ' · last decision ' + ago(last.at)) : null),
    banner,
    buttons.length ? h('div', { class: 'actions' }, buttons) : null,
    h('dl', { class: 'kv' },
      h('dt', {}, 'selector'), h('dd', {}, Object.entries(r.selector).map(([k, v]) => k + '=' + v).join(', ') || 'all devices'),
      h('dt', {}, 'gates'), h('dd', { class: 'mono' }, gates),
      r.shadow ? [h('dt', {}, 'shadow'), h('dd', {}, r.shadow.samples + ' samples at rate ' + r.shadow.sample_rate)] : null,
      r.window ? [h('dt', {}, 'window'), h('dd', { class: 'mono' }, r.window.windows.join('; ') + ' (' + (r.window.time_zone || 'device time') + ')')] : null,
      h('dt', {}, 'created'), h('dd', {}, time(r.created_at))),
    h('h2', {}, 'Stages'),
    waitingText(r) ? h('p', { class: 'banner', id: 'waiting' }, waitingText(r)) : null,
    table(['stage', 'status', 'progress', { text: 'running', attrs: { class: 'num' } }, { text: 'pending', attrs: { class: 'num hide-sm' } },
      { text: 'failed', attrs: { class: 'num' } }, { text: 'rolled back', attrs: { class: 'num' } }, { text: 'offline', attrs: { class: 'num hide-sm' } },
      { text: 'bake', attrs: { class: 'hide-sm' } }], stageRows, { id: 'stages' }),
    h('h2', {}, 'Decisions'),
    decisionRows.length ? table(['at', 'action', 'gate', { text: 'threshold', attrs: { class: 'num' } }, { text: 'observed', attrs: { class: 'num' } }, 'devices',
      { text: 'message', attrs: { class: 'hide-sm' } }], decisionRows, { id: 'decisions' }) : h('p', { class: 'muted' }, 'No decisions yet.'),
    h('h2', {}, 'Devices in this rollout'),
    memberRows.length ? table(['device', 'model', 'state', 'presence', { text: 'reason', attrs: { class: 'hide-sm' } }], memberRows, { id: 'members' })
      : h('p', { class: 'muted' }, 'No device assigned yet.'),
    more ? h('p', { class: 'muted' }, 'The first 200 are shown; fleetctl devices list has them all.') : null);
}

function expPhase(e) {
  const p = e.phase;
  if (p.state === 'concluded') return p.winner.toUpperCase() + ' won';
  return p.state;
}

async function experiments() {
  const { body: list } = await api('/api/v1/experiments');
  const rows = list.map((e) => {
    const v = e.verdicts.find((x) => x.metric === e.primary);
    return h('tr', { 'data-experiment': e.id },
      h('td', {}, h('a', { href: '#/experiments/' + e.id, class: 'mono' }, e.id.slice(0, 8))),
      h('td', {}, e.name),
      h('td', { class: 'mono' }, model(e.a)), h('td', { class: 'mono' }, model(e.b)),
      h('td', {}, pill(e.phase.state === 'running' ? 'running' : e.phase.state, e.phase.state === 'running' ? 'warn' : e.phase.state === 'concluded' ? 'ok' : 'bad')),
      h('td', { class: 'num' }, e.devices_a + ' / ' + e.devices_b),
      h('td', { class: 'hide-sm' }, v && v.better ? v.better.toUpperCase() + ' better on ' + e.primary : 'no verdict yet'));
  });
  return h('div', {}, h('h1', {}, 'Experiments'),
    rows.length ? table(['experiment', 'name', 'A', 'B', 'phase', { text: 'devices A / B', attrs: { class: 'num' } }, { text: 'verdict', attrs: { class: 'hide-sm' } }], rows, { id: 'experiments' })
      : h('p', { class: 'muted' }, 'No experiments yet: fleetctl experiment create.'));
}

async function experimentAct(e, action) {
  try {
    await api('/api/v1/experiments/' + e.id + '/' + action, { method: 'POST', body: {} });
    state.confirm = null;
  } catch (x) {
    if (x.status !== 401) alertBox('Could not ' + action + ': ' + x.message);
  }
  refresh();
}

async function experimentPage(id) {
  const { body: e } = await api('/api/v1/experiments/' + encodeURIComponent(id));
  const f = (v, d) => (v === null || v === undefined ? '–' : num(v, d === undefined ? 4 : d));
  const rows = e.verdicts.map((v) => h('tr', { 'data-metric': v.metric },
    h('td', { class: 'mono' }, v.metric + (v.metric === e.primary ? ' (primary)' : '')),
    h('td', { class: 'num' }, f(v.a.mean) + ' (n ' + v.a.n + ')'),
    h('td', { class: 'num' }, f(v.b.mean) + ' (n ' + v.b.n + ')'),
    h('td', { class: 'num' }, f(v.effect)),
    h('td', { class: 'num hide-sm' }, '[' + f(v.effect_low) + ', ' + f(v.effect_high) + ']'),
    h('td', {}, v.better ? pill(v.better.toUpperCase() + ' better', 'ok') : pill('not significant', ''))));
  const buttons = [];
  if (state.session && state.session.can_manage_rollouts && e.phase.state === 'running') {
    const btn = (action, label, cls) => h('button', {
      type: 'button', class: cls || '', 'data-action': action,
      onclick: () => {
        if (state.confirm !== action) { state.confirm = action; refresh(); return; }
        experimentAct(e, action);
      },
    }, state.confirm === action ? 'Confirm ' + label.toLowerCase() : label);
    buttons.push(btn('conclude', 'Conclude with the winner', 'primary'), btn('stop', 'Stop (all back to A)', 'danger'));
  }
  const decisions = e.decisions.slice().reverse().slice(0, 50).map((d) => h('tr', {},
    h('td', {}, time(d.at)), h('td', {}, d.action), h('td', { class: 'mono' }, d.gate),
    h('td', {}, d.device_count ? String(d.device_count) : ''), h('td', { class: 'hide-sm' }, d.message)));
  const shares = Object.entries(e.b_share_by_board).map(([b, x]) => b + ' ' + Math.round(100 * x) + ' %').join(', ') || '–';
  return h('div', {},
    h('p', {}, h('a', { href: '#/experiments' }, '← Experiments')),
    h('h1', {}, 'Experiment ', h('span', { class: 'mono' }, e.id.slice(0, 8)), ' · ', e.name),
    h('p', {}, pill(expPhase(e), e.phase.state === 'running' ? 'warn' : e.phase.state === 'concluded' ? 'ok' : 'bad'),
      e.phase.reason ? h('span', { class: 'muted' }, ' ' + e.phase.reason) : null,
      e.phase.rollout ? [' → ', h('a', { href: '#/rollouts/' + e.phase.rollout }, 'rollout ' + e.phase.rollout.slice(0, 8))] : null),
    buttons.length ? h('div', { class: 'actions' }, buttons) : null,
    h('dl', { class: 'kv' },
      h('dt', {}, 'A (control)'), h('dd', { class: 'mono', 'data-arm': 'a' }, model(e.a) + ' · ' + e.devices_a + ' devices'),
      h('dt', {}, 'B (candidate)'), h('dd', { class: 'mono', 'data-arm': 'b' }, model(e.b) + ' · ' + e.devices_b + ' devices'),
      h('dt', {}, 'B share by board'), h('dd', {}, shares),
      h('dt', {}, 'selector'), h('dd', {}, Object.entries(e.selector).map(([k, v]) => k + '=' + v).join(', ') || 'all devices'),
      h('dt', {}, 'allocation'), h('dd', {}, e.allocation + (e.allocation === 'fixed' ? ' (' + e.split_pct + ' % on B)' : '')),
      h('dt', {}, 'guardrail'), h('dd', {}, e.guardrail ? e.guardrail.metric + ' worse by > ' + e.guardrail.max_worse_pct + ' %' : 'none'),
      h('dt', {}, 'confidence'), h('dd', {}, Math.round(e.confidence * 100) + ' % (always-valid intervals)')),
    h('h2', {}, 'Verdict'),
    table(['metric', { text: 'A', attrs: { class: 'num' } }, { text: 'B', attrs: { class: 'num' } }, { text: 'B − A', attrs: { class: 'num' } },
      { text: 'interval', attrs: { class: 'num hide-sm' } }, 'verdict'], rows, { id: 'verdicts' }),
    h('div', { class: 'card', id: 'summary' }, e.summary.split('\n').map((l) => h('p', {}, l))),
    h('h2', {}, 'Decisions'),
    decisions.length ? table(['at', 'action', 'by', 'devices', { text: 'message', attrs: { class: 'hide-sm' } }], decisions) : h('p', { class: 'muted' }, 'No decisions yet.'));
}

// ---------- start ----------

function start() {
  document.getElementById('nav').hidden = false;
  const who = document.getElementById('who');
  who.textContent = state.session.name + ' (' + state.session.role + ')';
  who.dataset.role = state.session.role;
  document.getElementById('logout').hidden = false;
  openStream();
  refresh();
}

async function boot() {
  document.getElementById('logout').addEventListener('click', logout);
  window.addEventListener('hashchange', () => { state.confirm = null; refresh(); });
  try {
    const r = await api('/ui/session', { anonymous: true });
    state.session = r.body;
    start();
  } catch (_) {
    showLogin('');
  }
}

document.addEventListener('DOMContentLoaded', boot);
