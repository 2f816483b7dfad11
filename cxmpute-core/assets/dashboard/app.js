// The Cxmpute dashboard: a small single-page app over the JSON routes.
//
// Everything is built with DOM calls and textContent, never innerHTML:
// application names, model names and emails come from other people and
// must never be read as markup. Credentials stay in memory only (the
// session also lives in the broker's HttpOnly cookies).
'use strict';

const state = {
  token: null,       // access token from sign-in (the cookie is the fallback)
  apiKey: null,      // a user's API key, when they chose that way in
  providerKey: null, // a provider key
  adminKey: null,    // an admin's API key
  signinEmail: null,
};

// ---- small helpers ---------------------------------------------------------

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k === 'class') e.className = v;
    else if (k.startsWith('on')) e.addEventListener(k.slice(2), v);
    else e.setAttribute(k, v === true ? '' : String(v));
  }
  for (const c of children.flat()) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

const SVG = 'http://www.w3.org/2000/svg';
function svg(tag, attrs, ...children) {
  const e = document.createElementNS(SVG, tag);
  for (const [k, v] of Object.entries(attrs || {})) e.setAttribute(k, String(v));
  for (const c of children) e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  return e;
}

const nf = new Intl.NumberFormat('en-US');
function fmtInt(n) { return n === null || n === undefined ? '–' : nf.format(n); }
function fmtMs(n) { return n === null || n === undefined ? '–' : nf.format(n) + ' ms'; }
function fmtRate(n) { return n === null || n === undefined ? '–' : n.toFixed(1); }
// Small amounts (credits per day) keep their significant digits.
function fmtAmount(v) {
  if (!v) return '0';
  if (Math.abs(v) >= 10) return nf.format(Math.round(v * 10) / 10);
  return String(Number(v.toPrecision(3)));
}
function fmtPct(part, whole) { return whole ? (100 * part / whole).toFixed(1) + '%' : '–'; }
// Micro-credits to credits, exactly: integer arithmetic, no float rounding.
function fmtCredits(micro) {
  if (micro === null || micro === undefined) return '–';
  const neg = micro < 0;
  const a = Math.abs(micro);
  const whole = Math.floor(a / 1e6);
  let frac = String(a % 1e6).padStart(6, '0').replace(/0+$/, '');
  if (frac.length < 2) frac = frac.padEnd(2, '0');
  return (neg ? '-' : '') + nf.format(whole) + '.' + frac;
}
function shortDay(d) {
  const [y, m, dd] = d.split('-').map(Number);
  return new Date(Date.UTC(y, m - 1, dd)).toLocaleDateString('en-US', { month: 'short', day: 'numeric', timeZone: 'UTC' });
}

function setStatus(msg) { document.getElementById('status').textContent = msg || ''; }

// ---- the API -----------------------------------------------------------------

function rangeQuery() {
  const p = new URLSearchParams();
  const f = document.getElementById('range-from').value;
  const t = document.getElementById('range-to').value;
  if (f) p.set('from', f);
  if (t) p.set('to', t);
  const s = p.toString();
  return s ? '?' + s : '';
}

async function api(path, opts) {
  const o = opts || {};
  const headers = { 'Accept': 'application/json' };
  if (o.body !== undefined) headers['Content-Type'] = 'application/json';
  if (o.bearer) headers['Authorization'] = 'Bearer ' + o.bearer;
  const resp = await fetch(path, {
    method: o.method || 'GET',
    headers,
    body: o.body === undefined ? undefined : JSON.stringify(o.body),
    credentials: 'same-origin',
  });
  let data = null;
  const text = await resp.text();
  if (text) { try { data = JSON.parse(text); } catch (_) { data = { raw: text }; } }
  if (resp.ok && data && data.range && data.range.from) lastRange = data.range;
  return { status: resp.status, ok: resp.ok, data };
}

// The range the server answered for, shown in the form so people see it.
let lastRange = null;
function showRange(r) {
  if (!r) return;
  const f = document.getElementById('range-from');
  const t = document.getElementById('range-to');
  if (!f.value) f.value = r.from;
  if (!t.value) t.value = r.to;
}

function errorText(r) {
  return (r.data && r.data.error && r.data.error.message) || ('HTTP ' + r.status);
}

// A call as the signed-in user: the in-memory access token, else the
// cookie; one refresh when the access token has expired.
async function asUser(path, opts) {
  const o = Object.assign({}, opts, { bearer: state.token });
  let r = await api(path, o);
  if (r.status === 401) {
    const ref = await api('/v1/auth/refresh', { method: 'POST', body: {} });
    if (ref.ok && ref.data && ref.data.access_token) {
      state.token = ref.data.access_token;
      r = await api(path, Object.assign({}, opts, { bearer: state.token }));
    }
  }
  return r;
}

// A call with the key someone gave for this view, else as the signed-in user.
function withKeyOrUser(key, path, opts) {
  return key ? api(path, Object.assign({}, opts, { bearer: key })) : asUser(path, opts);
}

// An admin's call: with the admin key given, else as the signed-in admin.
function asAdmin(path, opts) {
  return withKeyOrUser(state.adminKey, path, opts);
}

// ---- rate limits -----------------------------------------------------------------

// A limit typed into a form: empty means no limit (null); a number is sent
// as a number, anything else as typed, for the broker to refuse with its
// own message.
function limitValue(text) {
  const t = text.trim();
  if (!t) return null;
  const n = Number(t);
  return Number.isFinite(n) ? n : t;
}

function limitText(v) { return v === null || v === undefined ? 'none' : fmtInt(v); }

// The inputs of a key's requests and tokens per minute, filled with its own.
function limitInputs(prefix, k) {
  const attrs = (name, v) => ({ id: `${prefix}-${name}`, name, inputmode: 'numeric', class: 'limit',
    placeholder: 'none', value: v === null || v === undefined ? '' : String(v), 'aria-label': name });
  const budget = k && k.budget;
  const period = el('select', { id: `${prefix}-period`, name: 'period', 'aria-label': 'budget period' },
    ...['day', 'month'].map(p => el('option', Object.assign({ value: p }, budget && budget.period === p ? { selected: true } : {}), 'a ' + p)));
  return [el('input', attrs('rpm', k && k.rpm)), el('input', attrs('tpm', k && k.tpm)),
    el('input', { id: `${prefix}-budget`, name: 'budget', inputmode: 'decimal', class: 'limit',
      placeholder: 'no budget', value: budget ? String(budget.limit / 1e6) : '', 'aria-label': 'budget in credits' }),
    period];
}

// A budget typed into a form, in credits: empty means none (null); a number
// is sent in micro-credits, anything else as typed for the broker to refuse.
function budgetValue(form) {
  const t = form.elements.budget.value.trim();
  if (!t) return null;
  const n = Number(t);
  return { limit: Number.isFinite(n) ? Math.round(n * 1e6) : t, period: form.elements.period.value };
}

// A key's response-cache settings: its default TTL for calls without the
// X-Cxmpute-Cache header, and whether an admin let it share across accounts.
function cacheText(c) {
  if (!c) return 'off';
  const ttl = c.ttl_secs ? `${fmtInt(c.ttl_secs)} s by default` : 'per call';
  return c.shared ? ttl + ', shared' : ttl;
}

function budgetText(b) { return b ? `${fmtCredits(b.limit)} a ${b.period}` : 'no budget'; }

// An account's budget and alert thresholds, editable (empty: none), sent
// with `send` (a PATCH of the account); `done` gets the account as it is now.
function accountForm(id, a, send, done) {
  const budget = a && a.budget;
  const alerts = (a && a.alerts) || {};
  const num = (name, v, label, mode) => el('input', { id: `${id}-${name}`, name, inputmode: mode, class: 'limit',
    placeholder: 'none', value: v === null || v === undefined ? '' : String(v), 'aria-label': label });
  const period = el('select', { id: `${id}-period`, name: 'period', 'aria-label': 'budget period' },
    ...['day', 'month'].map(p => el('option', Object.assign({ value: p }, budget && budget.period === p ? { selected: true } : {}), 'a ' + p)));
  return el('form', { id, class: 'limits', onsubmit: async (e) => {
    e.preventDefault();
    const f = e.target.elements;
    const below = limitValue(f.balance_below.value);
    const body = { budget: budgetValue(e.target), alerts: {
      balance_below: typeof below === 'number' ? Math.round(below * 1e6) : below,
      budget_percent: limitValue(f.budget_percent.value) } };
    const r = await send(body);
    if (!r.ok) { setStatus(errorText(r)); return; }
    setStatus('');
    done(r.data);
  } },
  el('label', {}, 'Budget (credits) ', num('budget', budget ? budget.limit / 1e6 : null, 'budget in credits', 'decimal'), period),
  el('label', {}, ' Mail me when the balance is below ', num('balance_below',
    alerts.balance_below === null || alerts.balance_below === undefined ? null : alerts.balance_below / 1e6, 'balance alert in credits', 'decimal'), ' credits'),
  el('label', {}, ' or the budget is ', num('budget_percent', alerts.budget_percent, 'budget alert in percent', 'numeric'), '% spent '),
  el('button', { type: 'submit', class: 'secondary' }, 'Save'));
}

function accountText(a) {
  const al = a.alerts || {};
  return `${budgetText(a.budget)}; mail below ${al.balance_below == null ? 'never' : fmtCredits(al.balance_below) + ' credits'}` +
    `, at ${al.budget_percent == null ? 'no share' : al.budget_percent + '%'} of the budget`;
}

// Sends a key's limits from `form` (`rpm`, `tpm` inputs) with `send` (a
// PATCH of the key), then hands `done` the key as it is now; a refusal is
// shown in the status line.
async function saveLimits(form, send, done) {
  const body = { rpm: limitValue(form.elements.rpm.value), tpm: limitValue(form.elements.tpm.value),
    budget: budgetValue(form) };
  const r = await send(body);
  if (!r.ok) { setStatus(errorText(r)); return; }
  setStatus('');
  done(r.data);
}

// ---- charts: inline SVG, drawn here -------------------------------------------

function niceMax(v) {
  if (v <= 0) return 1;
  const p = Math.pow(10, Math.floor(Math.log10(v)));
  for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
  return 10 * p;
}

// series: [{name, values: [number]}]; labels: day strings. kind: 'line' | 'bar'.
function chart(id, labels, series, kind, fmt) {
  const W = 560, H = 220, L = 46, R = 12, T = 12, B = 28;
  const format = fmt || fmtInt;
  const all = series.flatMap(s => s.values);
  const max = niceMax(Math.max(0, ...all));
  const n = labels.length;
  // Lines run edge to edge; bars sit in the middle of equal bands.
  const band = (W - L - R) / Math.max(n, 1);
  const x = kind === 'bar'
    ? i => L + (i + 0.5) * band
    : i => L + (n <= 1 ? (W - L - R) / 2 : i * (W - L - R) / (n - 1));
  const y = v => T + (H - T - B) * (1 - v / max);
  const root = svg('svg', {
    class: 'chart', viewBox: `0 0 ${W} ${H}`, role: 'img',
    'data-chart': id, 'data-points': n, 'data-max': Math.max(0, ...all),
    'aria-label': series.map(s => s.name).join(', ') + ' per day',
  });
  for (let k = 0; k <= 4; k++) {
    const v = max * k / 4;
    root.append(svg('line', { class: 'grid', x1: L, x2: W - R, y1: y(v), y2: y(v) }));
    root.append(svg('text', { class: 'axis', x: L - 6, y: y(v) + 4, 'text-anchor': 'end' }, format(v)));
  }
  const step = Math.max(1, Math.ceil(n / 6));
  labels.forEach((d, i) => {
    if (i % step === 0 || i === n - 1) {
      const edge = kind !== 'bar' && n > 1;
      const anchor = edge && i === n - 1 ? 'end' : (edge && i === 0 ? 'start' : 'middle');
      root.append(svg('text', { class: 'axis', x: x(i), y: H - 8, 'text-anchor': anchor }, shortDay(d)));
    }
  });
  if (kind === 'bar') {
    const bw = Math.max(2, Math.min(band * 0.7, 48));
    const s = series[0];
    s.values.forEach((v, i) => {
      const bar = svg('rect', {
        class: 'bar', x: x(i) - bw / 2, y: y(v), width: bw, height: Math.max(0, y(0) - y(v)), rx: 2,
        'data-value': v,
      });
      bar.append(svg('title', {}, `${labels[i]}: ${format(v)} ${s.name}`));
      root.append(bar);
    });
  } else {
    series.forEach((s, si) => {
      const pts = s.values.map((v, i) => `${x(i)},${y(v)}`).join(' ');
      if (si === 0 && n > 1) {
        root.append(svg('polygon', { class: 'area', points: `${x(0)},${y(0)} ${pts} ${x(n - 1)},${y(0)}` }));
      }
      root.append(svg('polyline', { class: 'line s' + si, points: pts }));
      if (si === 0) {
        s.values.forEach((v, i) => {
          const c = svg('circle', { class: 'point', cx: x(i), cy: y(v), r: n > 60 ? 1.5 : 3, 'data-value': v });
          c.append(svg('title', {}, `${labels[i]}: ${format(v)} ${s.name}`));
          root.append(c);
        });
      }
    });
  }
  const legend = el('div', { class: 'legend' },
    series.map((s, i) => el('span', { class: 's' + i }, el('i'), s.name)));
  return el('div', {}, root, series.length > 1 ? legend : null);
}

function panel(title, ...body) { return el('section', { class: 'panel' }, el('h2', {}, title), ...body); }
function tile(id, label, value, hint) {
  return el('div', { class: 'tile', id: 'tile-' + id },
    el('div', { class: 'label' }, label), el('div', { class: 'value' }, value),
    hint ? el('div', { class: 'hint' }, hint) : null);
}
function table(id, columns, rows) {
  if (!rows.length) return el('p', { class: 'empty', id }, 'Nothing in this range.');
  return el('table', { id },
    el('thead', {}, el('tr', {}, columns.map(c => el('th', {}, c[0])))),
    el('tbody', {}, rows.map(r => el('tr', {}, columns.map((c, i) => el('td', { class: i === 0 ? 'name' : null, title: i === 0 ? String(c[1](r)) : null }, c[1](r)))))));
}

const usageColumns = (money) => [
  ['Name', r => r.name],
  ['Requests', r => fmtInt(r.requests)],
  ['Failed', r => fmtPct(r.failures, r.requests)],
  ['Avg', r => fmtMs(r.avg_latency_ms)],
  ['p95', r => fmtMs(r.p95_latency_ms)],
  ['Tokens in', r => fmtInt(r.input_tokens)],
  ['Tokens out', r => fmtInt(r.output_tokens)],
  ['Tok/s', r => fmtRate(r.tokens_per_second)],
].concat(money ? [[money[0], r => fmtCredits(r[money[1]])]] : []);

// Tokens per second is a chat figure: taken from the chat service's row
// when there is one, so other services' time does not dilute it.
function totalsTiles(t, extra, services) {
  const chat = (services || []).find(x => x.name === 'chat');
  const tps = chat ? chat.tokens_per_second : t.tokens_per_second;
  return el('div', { class: 'tiles' },
    tile('requests', 'Requests', fmtInt(t.requests), fmtPct(t.failures, t.requests) + ' failed'),
    tile('latency', 'Latency', fmtMs(t.avg_latency_ms), 'p95 ' + fmtMs(t.p95_latency_ms)),
    tile('tokens', 'Tokens', fmtInt(t.input_tokens + t.output_tokens), fmtInt(t.output_tokens) + ' out'),
    tile('tps', 'Tokens / s', fmtRate(tps), 'chat output'),
    extra || []);
}

function days(list) { return list.map(d => d.day); }

// Requests and failures per day: the same chart on every view.
function requestsChart(id, list) {
  return chart(id, days(list), [
    { name: 'requests', values: list.map(d => d.requests) },
    { name: 'failures', values: list.map(d => d.failures) },
  ], 'line');
}

// ---- views ---------------------------------------------------------------------------

// The services that had nodes in the range (at most four lines stay readable).
function serviceSeries(s) {
  const seen = s.nodes_by_service
    .filter(x => x.days.some(d => d.average > 0))
    .slice(0, 4)
    .map(x => ({ name: x.name, values: x.days.map(d => d.average) }));
  return seen.length ? seen : [{ name: 'nodes', values: s.nodes.map(() => 0) }];
}

async function viewNetwork(main) {
  const r = await api('/v1/stats/network' + rangeQuery());
  if (!r.ok) { setStatus(errorText(r)); return; }
  const s = r.data;
  main.append(
    el('h1', {}, 'Network'),
    el('p', { class: 'sub' }, `${s.range.from} to ${s.range.to}: traffic through the gateway and the nodes serving it.`),
    totalsTiles(s.totals, tile('nodes', 'Nodes now', fmtInt(s.nodes_now), fmtInt(s.pools_now.length + (s.pools_now_omitted || 0)) + ' pools'), s.services),
    el('div', { class: 'grid2' },
      panel('Requests per day', requestsChart('requests', s.days)),
      panel('Nodes per day (average)', chart('nodes', days(s.nodes), [
        { name: 'nodes', values: s.nodes.map(d => d.average) },
      ], 'bar', fmtAmount)),
    ),
    el('div', { class: 'grid2' },
      panel('Tokens per day', chart('tokens', days(s.days), [
        { name: 'input', values: s.days.map(d => d.input_tokens) },
        { name: 'output', values: s.days.map(d => d.output_tokens) },
      ], 'line')),
      panel('Nodes per service (average)', chart('services', days(s.nodes), serviceSeries(s), 'line', fmtAmount)),
    ),
    panel('Pools now', table('pools-now', [
      ['Service', p => p.service], ['Model', p => p.model], ['Nodes', p => fmtInt(p.nodes)],
    ], s.pools_now)),
    panel('Models', table('models', usageColumns(null), s.models)),
    panel('Endpoints', table('endpoints', usageColumns(null), s.endpoints)),
  );
}

function signinPanel(onDone) {
  const email = el('input', { id: 'signin-email', type: 'email', placeholder: 'you@example.com', required: true, autocomplete: 'email' });
  const code = el('input', { id: 'signin-code', inputmode: 'numeric', placeholder: '8-digit code', autocomplete: 'one-time-code' });
  const key = el('input', { id: 'apikey-input', type: 'password', placeholder: 'sk-…', autocomplete: 'off' });
  const codeForm = el('form', { id: 'signin-code-form', hidden: true, onsubmit: async (e) => {
    e.preventDefault();
    const r = await api('/v1/auth/verify', { method: 'POST', body: { email: state.signinEmail, code: code.value.trim() } });
    if (!r.ok) { setStatus(errorText(r)); return; }
    state.token = r.data.access_token;
    setStatus('');
    onDone();
  } }, code, el('button', { id: 'signin-verify', type: 'submit' }, 'Sign in'));
  const emailForm = el('form', { id: 'signin-form', onsubmit: async (e) => {
    e.preventDefault();
    state.signinEmail = email.value.trim();
    const r = await api('/v1/auth/code', { method: 'POST', body: { email: state.signinEmail } });
    if (!r.ok) { setStatus(errorText(r)); return; }
    setStatus('');
    codeForm.hidden = false;
    document.getElementById('signin-sent').textContent = `We sent a code to ${state.signinEmail}.`;
    code.focus();
  } }, email, el('button', { id: 'signin-send', type: 'submit' }, 'Email me a code'));
  const keyForm = el('form', { id: 'apikey-form', onsubmit: (e) => {
    e.preventDefault();
    state.apiKey = key.value.trim() || null;
    onDone();
  } }, key, el('button', { id: 'apikey-use', type: 'submit', class: 'secondary' }, 'Use API key'));
  return el('section', { class: 'panel signin' }, el('h2', {}, 'Sign in'),
    emailForm, el('p', { id: 'signin-sent', class: 'muted' }), codeForm,
    el('p', { class: 'or' }, 'or read usage with an API key'), keyForm);
}

async function viewMe(main) {
  const rerender = () => render();
  const r = await withKeyOrUser(state.apiKey, '/v1/stats/me' + rangeQuery());
  if (r.status === 401) {
    main.append(el('h1', {}, 'My usage'), el('p', { class: 'sub' }, 'Sign in to see your usage, charges and keys.'), signinPanel(rerender));
    return;
  }
  if (!r.ok) { setStatus(errorText(r)); return; }
  const s = r.data;
  let me = null;
  if (!state.apiKey) {
    const m = await asUser('/v1/me');
    if (m.ok) me = m.data;
  }
  main.append(
    el('h1', {}, 'My usage'),
    el('p', { class: 'sub', id: 'me-who' }, me ? `${me.email}: ${fmtCredits(me.credits)} credits left` : 'Signed in with an API key'),
    totalsTiles(s.totals, tile('charged', 'Charged', fmtCredits(s.totals.charged), 'credits')),
    el('div', { class: 'grid2' },
      panel('Requests per day', requestsChart('my-requests', s.days)),
      panel('Charged per day', chart('my-charged', days(s.days), [
        { name: 'credits', values: s.days.map(d => d.charged / 1e6) },
      ], 'bar', fmtAmount)),
    ),
    panel('Models', table('my-models', usageColumns(['Charged', 'charged']), s.models)),
    panel('Applications', table('my-apps', usageColumns(['Charged', 'charged']), s.apps)),
  );
  if (me) {
    // The latest requests: the model that served each, the one asked for
    // where a fallback or an alias made them differ, and those answered
    // from the response cache (charged the cache price, served by no node).
    const u = await asUser('/v1/me/usage?days=1');
    if (u.ok) main.append(panel('Latest requests', table('my-latest', [
      ['When', q => new Date(q.at).toISOString().slice(0, 16).replace('T', ' ')],
      ['Route', q => q.route], ['Model', q => q.model],
      ['Asked for', q => q.requested_model ? q.requested_model + ' (fell back)' : '–'],
      ['Tokens', q => fmtInt(q.input_tokens + q.output_tokens)], ['Charged', q => fmtCredits(q.charged)],
      ['Answered', q => !q.success ? 'failed' : q.cache_hit ? 'from cache' : 'by a node'],
    ], u.data.recent)));
    // The account's budget over all its keys, what it spent this period, and
    // when to mail (empty: none).
    const spent = me.budget ? `Spent this ${me.budget.period}: ${fmtCredits(me.budget_spent || 0)} of ${fmtCredits(me.budget.limit)} credits.`
      : 'No account budget: only each key\'s own limits apply.';
    main.append(panel('Account budget and alerts', el('div', {},
      el('p', { id: 'me-budget', class: 'muted' }, spent),
      accountForm('me-account', me, body => asUser('/v1/me', { method: 'PATCH', body }), rerender))));
    // Each key's requests and tokens per minute and budget, editable (empty: none).
    const limitsForm = k => el('form', { id: 'limits-' + k.key_id, class: 'limits', onsubmit: (e) => {
      e.preventDefault();
      saveLimits(e.target, body => asUser('/v1/me/keys/' + encodeURIComponent(k.key_id), { method: 'PATCH', body }), rerender);
    } }, limitInputs('limits-' + k.key_id, k), el('button', { type: 'submit', class: 'secondary' }, 'Save'));
    main.append(panel('API keys', table('my-keys', [
      ['Name', k => k.name], ['Key', k => k.prefix + '…'],
      ['Limit', k => k.credit_limit === null ? 'none' : fmtCredits(k.credit_limit)],
      ['Left', k => k.credits_left === null ? '–' : fmtCredits(k.credits_left)],
      ['Per minute (requests, tokens); budget (credits a day or month)', limitsForm],
      ['Last used', k => k.last_used_at ? new Date(k.last_used_at).toISOString().slice(0, 16).replace('T', ' ') : 'never'],
      ['Response cache', k => cacheText(k.cache)],
    ], me.keys)));
  }
  main.append(el('p', {}, el('button', { class: 'secondary', id: 'signout', onclick: async () => {
    if (!state.apiKey) await api('/v1/auth/logout', { method: 'POST', body: {}, bearer: state.token });
    state.token = null; state.apiKey = null;
    render();
  } }, 'Sign out')));
}

function keyPanel(id, label, placeholder, onKey) {
  const input = el('input', { id: id + '-input', type: 'password', placeholder, autocomplete: 'off' });
  return el('section', { class: 'panel signin' }, el('h2', {}, label),
    el('form', { id: id + '-form', onsubmit: (e) => { e.preventDefault(); onKey(input.value.trim() || null); } },
      input, el('button', { id: id + '-use', type: 'submit' }, 'Open')),
    el('p', { class: 'muted' }, 'Signed in users who own the account need no key.'));
}

async function viewProvider(main) {
  const r = await withKeyOrUser(state.providerKey, '/v1/stats/provider' + rangeQuery());
  if (r.status === 401 || r.status === 404) {
    main.append(el('h1', {}, 'Provider'), el('p', { class: 'sub' }, 'Your nodes and what they earned.'),
      keyPanel('provider-key', 'Provider key', 'pk-…', k => { state.providerKey = k; render(); }));
    return;
  }
  if (!r.ok) { setStatus(errorText(r)); return; }
  const s = r.data;
  main.append(
    el('h1', {}, 'Provider'),
    el('p', { class: 'sub' }, `${s.range.from} to ${s.range.to}: what your nodes served and earned.`),
    totalsTiles(s.totals, [
      tile('earned', 'Earned in range', fmtCredits(s.totals.rewarded), 'credits'),
      tile('earnings', 'Unpaid total', fmtCredits(s.earnings_total), 'credits'),
    ]),
    el('div', { class: 'grid2' },
      panel('Earnings per day', chart('earnings', days(s.days), [
        { name: 'credits', values: s.days.map(d => d.rewarded / 1e6) },
      ], 'bar', fmtAmount)),
      panel('Requests served per day', requestsChart('served', s.days)),
    ),
    panel('Nodes', table('nodes', [
      ['Node', n => n.provision_id],
      ['State', n => el('span', { class: 'pill ' + (n.routable ? 'ok' : 'off') }, n.routable ? 'routing' : n.state)],
      ['Breaker', n => n.breaker || '–'],
      ['Verified', verificationPill],
      ['In flight', n => fmtInt(n.in_flight)],
      ['Requests', n => fmtInt(n.requests)],
      ['Failed', n => fmtPct(n.failures, n.requests)],
      ['p95', n => fmtMs(n.p95_latency_ms)],
      ['Earned', n => fmtCredits(n.rewarded)],
    ], s.nodes)),
    panel('Models', table('provider-models', usageColumns(['Earned', 'rewarded']), s.models)),
  );
}

// A node's standing with the broker's canary calls; why, when it failed one.
function verificationPill(n) {
  const v = n.verification || { status: 'unverified' };
  const bad = v.status === 'quarantined' || v.status === 'suspect';
  return el('span', { class: 'pill ' + (bad ? 'off' : 'ok'), title: v.reason || '' },
    v.status.replace('_', ' '));
}

const nodeColumns = [
  ['Node', n => n.provision_id],
  ['Provider', n => n.provider_id],
  ['Verified', verificationPill],
  ['Score', n => n.verification ? fmtPct(n.verification.score_permille, 1000) : '–'],
  ['Why', n => (n.verification && n.verification.reason) || '–'],
];

async function viewAdmin(main) {
  const r = await withKeyOrUser(state.adminKey, '/v1/stats/admin' + rangeQuery());
  if (r.status === 401 || r.status === 403) {
    if (r.status === 403) setStatus('This account is not an admin.');
    main.append(el('h1', {}, 'Admin'), keyPanel('admin-key', 'Admin API key', 'sk-…', k => { state.adminKey = k; render(); }));
    return;
  }
  if (!r.ok) { setStatus(errorText(r)); return; }
  const s = r.data;
  // Every node with its verification (the stats carry no node list).
  const nodes = await withKeyOrUser(state.adminKey, '/v1/admin/provisions');
  const flagged = nodes.ok ? nodes.data : [];
  main.append(
    el('h1', {}, 'Admin'),
    el('p', { class: 'sub' }, `${s.range.from} to ${s.range.to}: the whole marketplace.`),
    totalsTiles(s.totals, [
      tile('charged', 'Charged', fmtCredits(s.totals.charged), 'credits in range'),
      tile('platform-range', 'Platform took', fmtCredits(s.totals.platform), 'in range'),
      tile('platform', 'Platform kept', fmtCredits(s.ledger.platform), 'all time'),
    ], s.services),
    el('div', { class: 'grid2' },
      panel('Charged, rewarded and the platform\'s take per day', chart('money', days(s.days), [
        { name: 'charged', values: s.days.map(d => d.charged / 1e6) },
        { name: 'rewarded', values: s.days.map(d => d.rewarded / 1e6) },
        { name: 'platform', values: s.days.map(d => d.platform / 1e6) },
      ], 'line', fmtAmount)),
      panel('Requests per day', requestsChart('admin-requests', s.days)),
    ),
    panel('Money per day', table('money-days', [
      ['Day', d => d.day], ['Charged', d => fmtCredits(d.charged)],
      ['Rewarded', d => fmtCredits(d.rewarded)], ['Platform', d => fmtCredits(d.platform)],
    ], s.days.filter(d => d.requests > 0).reverse())),
    await catalogueSection(),
    await aliasesSection(),
    panel('Top users', table('top-users', usageColumns(['Charged', 'charged']), s.top_users)),
    panel('Top providers', table('top-providers', usageColumns(['Rewarded', 'rewarded']), s.top_providers)),
    panel('Top applications', table('top-apps', usageColumns(['Charged', 'charged']), s.top_apps)),
    panel('Models', table('admin-models', usageColumns(['Charged', 'charged']), s.models)),
    panel('API key rate limits', adminLimitsForm()),
    panel('Account budgets and alerts', adminAccountForm()),
    panel('Nodes needing attention', table('admin-nodes', nodeColumns,
      flagged.filter(n => ['quarantined', 'suspect'].includes((n.verification || {}).status)))),
    panel('Ledger (all time)', table('ledger', [
      ['Settlements', l => fmtInt(l.settlements)], ['Charged', l => fmtCredits(l.charged)],
      ['Rewarded', l => fmtCredits(l.rewarded)], ['Platform', l => fmtCredits(l.platform)],
      ['Reserved', l => fmtCredits(l.reserved)],
    ], [s.ledger])),
  );
}

// Any key's requests and tokens per minute and budget, by its id (the key ids of a
// user are in `GET /v1/admin/users/{id}`); empty fields remove a limit.
function adminLimitsForm() {
  const id = el('input', { id: 'admin-limits-key', placeholder: 'key_…', required: true, autocomplete: 'off', 'aria-label': 'key id' });
  const shown = el('p', { id: 'admin-limits-result', class: 'muted' }, 'Requests and tokens per minute, and a budget in credits a day or month; empty for none.');
  return el('form', { id: 'admin-limits', class: 'limits', onsubmit: (e) => {
    e.preventDefault();
    const key = id.value.trim();
    saveLimits(e.target, body => asAdmin('/v1/admin/keys/' + encodeURIComponent(key), { method: 'PATCH', body }),
      k => { shown.textContent = `${k.name} (${k.prefix}…): ${limitText(k.rpm)} requests, ${limitText(k.tpm)} tokens a minute, ${budgetText(k.budget)}`; });
  } }, id, limitInputs('admin-limits', null), el('button', { id: 'admin-limits-save', type: 'submit' }, 'Set limits'), shown);
}

// Any account's budget (over all its keys) and alerts, by its user id;
// empty fields remove them.
function adminAccountForm() {
  const id = el('input', { id: 'admin-account-user', placeholder: 'usr_…', required: true, autocomplete: 'off', 'aria-label': 'user id' });
  const shown = el('p', { id: 'admin-account-result', class: 'muted' }, 'A budget in credits a day or month over all the account\'s keys, and its alert emails; empty for none.');
  const form = accountForm('admin-account', null, body => asAdmin('/v1/admin/users/' + encodeURIComponent(id.value.trim()), { method: 'PATCH', body }),
    u => { shown.textContent = `${u.email}: ${accountText(u)}`; });
  form.prepend(id);
  form.append(shown);
  return form;
}

// The catalogue (what nodes may serve) with a form to add or change an
// entry and a button per entry to remove it; the reward policy above it.
async function catalogueSection() {
  const call = asAdmin;
  const [cat, reward] = await Promise.all([call('/v1/admin/catalogue'), call('/v1/admin/reward')]);
  if (!cat.ok) return panel('Catalogue', el('p', { class: 'empty' }, errorText(cat)));
  const shares = reward.ok ? Object.entries(reward.data.platform_share_permille || {}) : [];
  const policy = reward.ok
    ? el('p', { class: 'sub', id: 'reward-policy' }, 'Reward policy: ' + reward.data.policy +
        (shares.length ? ' (platform keeps ' + shares.map(([k, v]) => k + ' ' + (v / 10) + '%').join(', ') + ')' : '') +
        '. ' + reward.data.description + '.')
    : null;
  const change = async (opts, done) => {
    const r = await call('/v1/admin/catalogue' + (opts.suffix || ''), opts);
    if (!r.ok) { setStatus(errorText(r)); return; }
    await render();
    setStatus(done(r.data));
  };
  const remove = m => el('button', {
    type: 'button', class: 'remove', 'data-model': m.service + ':' + m.model,
    onclick: () => change({ method: 'DELETE', suffix: '/' + encodeURIComponent(m.service) + '/' + encodeURIComponent(m.model) },
      d => `Removed ${m.service} ${m.model}; ${d.removed_nodes} node(s) left its pool.`),
  }, 'Remove');
  const services = ['chat', 'embeddings', 'tts', 'scrape', 'vision'];
  const form = el('form', { id: 'catalogue-form', class: 'inline' },
    el('label', {}, 'Service ', el('select', { id: 'catalogue-service' }, services.map(x => el('option', { value: x }, x)))),
    el('label', {}, 'Model ', el('input', { id: 'catalogue-model', required: '', maxlength: '200', placeholder: 'qwen2.5:0.5b' })),
    el('label', {}, 'Min tier ', el('input', { id: 'catalogue-tier', type: 'number', min: '1', max: '4', value: '1' })),
    el('label', {}, 'Target nodes ', el('input', { id: 'catalogue-target', type: 'number', min: '0', max: '100000', value: '1' })),
    el('button', { type: 'submit', id: 'catalogue-add' }, 'Add or change'));
  form.addEventListener('submit', e => {
    e.preventDefault();
    const v = id => document.getElementById(id).value;
    const body = { service: v('catalogue-service'), model: v('catalogue-model'),
      min_tier: Number(v('catalogue-tier')), target_nodes: Number(v('catalogue-target')) };
    change({ method: 'PUT', body }, d => `Saved ${body.service} ${body.model}` +
      (d.removed_nodes ? `; ${d.removed_nodes} node(s) below its tier left its pool.` : '.'));
  });
  return panel('Catalogue', policy, table('catalogue', [
    ['Model', m => m.model], ['Service', m => m.service], ['Min tier', m => String(m.min_tier)],
    ['Target nodes', m => fmtInt(m.target_nodes)], ['', m => remove(m)],
  ], cat.data), form);
}

// Model aliases (a name for models tried in order) with a form to define or
// change one and a button per alias to remove it.
async function aliasesSection() {
  const r = await asAdmin('/v1/admin/aliases');
  if (!r.ok) return panel('Model aliases', el('p', { class: 'empty' }, errorText(r)));
  const change = async (path, opts, done) => {
    const res = await asAdmin(path, opts);
    if (!res.ok) { setStatus(errorText(res)); return; }
    await render();
    setStatus(done);
  };
  const remove = a => el('button', {
    type: 'button', class: 'remove', 'data-alias': a.alias,
    onclick: () => change('/v1/admin/aliases/' + encodeURIComponent(a.alias), { method: 'DELETE' }, `Removed alias ${a.alias}.`),
  }, 'Remove');
  const form = el('form', { id: 'alias-form', class: 'inline' },
    el('label', {}, 'Alias ', el('input', { id: 'alias-name', required: '', maxlength: '200', placeholder: 'fast' })),
    el('label', {}, 'Models, in order ', el('input', { id: 'alias-models', required: '', placeholder: 'llama3.2:3b, llama3.2:1b' })),
    el('button', { type: 'submit', id: 'alias-save' }, 'Define or change'));
  form.addEventListener('submit', e => {
    e.preventDefault();
    const alias = document.getElementById('alias-name').value.trim();
    const models = document.getElementById('alias-models').value.split(',').map(m => m.trim()).filter(m => m);
    change('/v1/admin/aliases', { method: 'PUT', body: { alias, models } }, `Saved alias ${alias}.`);
  });
  return panel('Model aliases',
    el('p', { class: 'sub' }, 'A request naming an alias is served by the first of its models with a healthy node (at most 4).'),
    table('aliases', [['Alias', a => a.alias], ['Models', a => a.models.join(' → ')], ['', a => remove(a)]], r.data), form);
}

const views = { network: viewNetwork, me: viewMe, provider: viewProvider, admin: viewAdmin };
let renders = 0;

async function render() {
  const name = (location.hash.replace(/^#\/?/, '') || 'network').split('?')[0];
  const view = views[name] ? name : 'network';
  for (const a of document.querySelectorAll('#nav a')) a.classList.toggle('active', a.dataset.view === view);
  const main = document.getElementById('main');
  const mine = ++renders;
  main.removeAttribute('data-ready');
  main.replaceChildren(el('p', { class: 'muted' }, 'Loading…'));
  setStatus('');
  const fresh = el('div');
  try {
    await views[view](fresh);
  } catch (e) {
    setStatus('Could not load: ' + e.message);
  }
  if (mine !== renders) return; // a newer render started meanwhile
  main.replaceChildren(...fresh.childNodes);
  showRange(lastRange);
  main.dataset.ready = view;
}

window.addEventListener('hashchange', render);
document.addEventListener('DOMContentLoaded', () => {
  document.getElementById('range').addEventListener('submit', (e) => { e.preventDefault(); render(); });
  render();
});
