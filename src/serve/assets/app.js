// The dashboard: /api/v1/locks (the status document) drawn as one card per lock, redrawn a
// moment after each event of /api/v1/events (server-sent events), and every few seconds as a
// safety net; clocks move every second in between. Text from the store is only ever set as
// text (never as markup).
'use strict';

const state = { doc: null, fetchedAt: 0, waits: {} };
const KEPT_WAITS = 120;
const KEPT_EVENTS = 50;

function el(tag, attrs, ...children) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v !== undefined && v !== null) e.setAttribute(k, v);
  }
  for (const c of children) {
    if (c === null || c === undefined) continue;
    e.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
  return e;
}

function svg(tag, attrs) {
  const e = document.createElementNS('http://www.w3.org/2000/svg', tag);
  for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
  return e;
}

function duration(ms) {
  if (ms < 1000) return `${Math.round(ms)} ms`;
  const s = ms / 1000;
  if (s < 60) return `${s.toFixed(1)} s`;
  const m = Math.floor(s / 60);
  if (m < 60) return `${m} min ${Math.floor(s % 60)} s`;
  return `${Math.floor(m / 60)} h ${m % 60} min`;
}

function since(iso) {
  if (!iso) return '';
  const d = new Date(iso);
  return d.toLocaleTimeString();
}

function labels(obj) {
  const span = el('span');
  for (const [k, v] of Object.entries(obj || {})) span.append(el('span', { class: 'label' }, `${k}=${v}`));
  return span;
}

// Milliseconds since the document was fetched: clocks in it move on by this much.
function drift() { return state.fetchedAt ? Date.now() - state.fetchedAt : 0; }

function chart(lock) {
  const waits = (state.waits[lock] || []).slice(-KEPT_WAITS);
  const w = 240, h = 40;
  const box = el('div', { class: 'chart' });
  const s = svg('svg', { width: w, height: h, viewBox: `0 0 ${w} ${h}`, role: 'img' });
  const title = svg('title', {});
  title.textContent = `recent waits of ${lock} (logarithmic: 1 ms to the longest)`;
  s.append(title);
  // Logarithmic from 1 ms: a millisecond and an hour on one chart.
  const longest = Math.max(0, ...waits.map(x => x[1]));
  const lmax = Math.log10(Math.max(longest, 10) + 1);
  const bw = w / KEPT_WAITS;
  waits.forEach(([at, ms], i) => {
    const bh = Math.max(2, (Math.log10(ms + 1) / lmax) * (h - 2));
    const r = svg('rect', { x: (i * bw).toFixed(1), y: (h - bh).toFixed(1), width: Math.max(1, bw - 0.5).toFixed(1), height: bh.toFixed(1) });
    const t = svg('title', {});
    t.textContent = `${new Date(at).toLocaleTimeString()}: waited ${duration(ms)}`;
    r.append(t);
    s.append(r);
  });
  const last = waits.length ? waits[waits.length - 1][1] : null;
  box.append(s, el('span', { class: 'muted small' },
    waits.length ? `last ${waits.length} waits: longest ${duration(longest)}, latest ${duration(last)}` : 'no acquisitions seen yet'));
  return box;
}

function card(l) {
  const c = el('article', { class: 'lock' + (l.exists ? '' : ' missing'), 'data-lock': l.name });
  c.append(el('h2', {}, l.name,
    el('span', { class: 'meta' }, `generation ${l.generation} · policy ${l.policy} · ${l.holders.length} holding · ${l.waiters.length} waiting`)));
  if (l.note) c.append(el('p', { class: 'note' }, l.note));
  if (l.mixed_policies) {
    const parts = l.policies.map(p => `${p.policy || 'unrecorded'} (${(p.digest || 'digest unknown').slice(0, 19)}) ×${p.tickets}`);
    c.append(el('p', { class: 'note' }, `requests run different policies: ${parts.join(', ')}`));
  }
  const t = el('table', {}, el('thead', {}, el('tr', {},
    el('th', {}, '#'), el('th', {}, 'ticket'), el('th', {}, 'who'), el('th', {}, 'priority'),
    el('th', {}, 'rank'), el('th', {}, 'since'), el('th', {}, 'for'), el('th', {}, 'labels'))));
  const body = el('tbody');
  for (const h of l.holders) {
    body.append(el('tr', { class: 'holder', 'data-ticket': h.ticket, 'data-role': 'holder' },
      el('td', {}, `slot ${h.slot}`), el('td', {}, h.ticket), el('td', {}, `${h.host}:${h.pid}`),
      el('td', { class: 'num' }, h.priority), el('td', {}, ''), el('td', {}, since(h.acquired_at)),
      el('td', { class: 'num', 'data-ms': h.held_for_ms }, duration(h.held_for_ms + drift())), el('td', {}, labels(h.labels))));
  }
  for (const w of l.waiters) {
    body.append(el('tr', { class: 'waiter', 'data-ticket': w.ticket, 'data-role': 'waiter' },
      el('td', {}, w.position), el('td', {}, w.ticket), el('td', {}, `${w.host}:${w.pid}`),
      el('td', { class: 'num' }, w.priority), el('td', { class: 'num' }, w.rank), el('td', {}, since(w.enqueued_at)),
      el('td', { class: 'num', 'data-ms': w.waited_ms }, duration(w.waited_ms + drift())), el('td', {}, labels(w.labels))));
  }
  if (!l.holders.length && !l.waiters.length) {
    body.append(el('tr', {}, el('td', { colspan: 8, class: 'empty' }, l.exists ? 'free, nobody waiting' : 'no such lock yet')));
  }
  t.append(body);
  c.append(t, chart(l.name));
  return c;
}

function render() {
  const doc = state.doc;
  if (!doc) return;
  document.getElementById('store').textContent = doc.lock_dir;
  const root = document.getElementById('locks');
  root.replaceChildren(...(doc.locks.length ? doc.locks.map(card) : [el('p', { class: 'muted' }, 'no locks yet')]));
}

function tick() {
  document.getElementById('clock').textContent = new Date().toLocaleTimeString();
  const d = drift();
  for (const td of document.querySelectorAll('td[data-ms]')) {
    td.textContent = duration(Number(td.getAttribute('data-ms')) + d);
  }
}

async function fetchLocks() {
  const r = await fetch('/api/v1/locks', { cache: 'no-store' });
  if (!r.ok) return;
  const text = await r.text();
  if (!text) return;
  state.doc = JSON.parse(text);
  state.fetchedAt = Date.now();
  render();
}

async function fetchWaits() {
  const r = await fetch('/api/v1/waits', { cache: 'no-store' });
  if (r.ok) state.waits = await r.json();
}

let pending = null;
// Events come in bursts (a hand-off is a release and an acquisition): one fetch after them.
function soon() {
  if (pending) return;
  pending = setTimeout(() => { pending = null; fetchLocks().catch(() => {}); }, 150);
}

function logEvent(type, d) {
  const list = document.getElementById('events');
  const what = {
    arrival: 'arrived', acquisition: `acquired after ${duration(d.waited_ms || 0)}`,
    release: `released after ${duration(d.held_ms || 0)}`, departure: `left: ${d.outcome}`,
  }[type];
  list.prepend(el('li', { class: type }, `${new Date(d.at_ms).toLocaleTimeString()} ${d.lock} ${d.ticket} ${what}`));
  while (list.children.length > KEPT_EVENTS) list.lastChild.remove();
}

function connect() {
  const live = document.getElementById('live');
  const es = new EventSource('/api/v1/events');
  es.onopen = () => { live.textContent = 'live'; live.classList.remove('off'); fetchLocks().catch(() => {}); };
  es.onerror = () => { live.textContent = 'reconnecting'; live.classList.add('off'); };
  for (const type of ['arrival', 'acquisition', 'release', 'departure']) {
    es.addEventListener(type, ev => {
      const d = JSON.parse(ev.data);
      if (type === 'acquisition') {
        const w = state.waits[d.lock] || (state.waits[d.lock] = []);
        w.push([d.at_ms, d.waited_ms || 0]);
        if (w.length > KEPT_WAITS) w.shift();
      }
      logEvent(type, d);
      soon();
    });
  }
}

async function start() {
  await Promise.all([fetchWaits().catch(() => {}), fetchLocks().catch(() => {})]);
  connect();
  setInterval(tick, 1000);
  setInterval(() => fetchLocks().catch(() => {}), 5000);
}

start();
