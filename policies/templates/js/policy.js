// The {{name}} cachelock policy (JavaScript, built with componentize-js).
//
// Implements the world cachelock:policy/policy@0.1.0 (wit/policy.wit). This one ranks by
// priority, with `branch=main` ahead of everything else of the same priority (config key
// `main_boost`); waiting and dockerd decisions follow builtin:default's rules.
// WIT u64/s64 values are BigInts; variants are {tag, val}; throwing from configure refuses it.
import { log } from 'cachelock:policy/host@0.1.0';

const CONTAINERD_TIMEOUT = 'failed to start containerd: timeout waiting for containerd to start';

let mainBoost = 100n;

export function configure(config) {
  for (const [key, value] of config) {
    if (key === 'main_boost') {
      if (!/^-?\d+$/.test(value)) throw `main_boost: ${JSON.stringify(value)} is not an integer`;
      mainBoost = BigInt(value);
    } else {
      throw `unknown config key ${JSON.stringify(key)} (known: main_boost)`;
    }
  }
}

function rankOf(t) {
  const main = t.request.labels.some(([k, v]) => k === 'branch' && v === 'main');
  return BigInt(t.request.priority) + (main ? mainBoost : 0n);
}

// The host's order: highest rank, then earliest arrival, then smallest id.
function goesBefore(a, b) {
  const ra = rankOf(a), rb = rankOf(b);
  if (ra !== rb) return ra > rb;
  if (a.request.enqueuedAtMs !== b.request.enqueuedAtMs) return a.request.enqueuedAtMs < b.request.enqueuedAtMs;
  return a.id < b.id;
}

export const lockPolicy = {
  rank(waiter, nowMs) {
    return rankOf(waiter);
  },
  onWait(state) {
    const limit = state.me.request.waitLimitMs;
    if (limit !== undefined && state.waitedMs >= limit) {
      return { tag: 'give-up', val: `waited ${Number(state.waitedMs) / 1000}s, the caller's limit` };
    }
    const position = state.waiters.filter((t) => goesBefore(t, state.me)).length;
    if (state.evaluations === 0 && position > 0) log('debug', `${state.me.id}: ${position} ahead`);
    return { tag: 'keep-waiting', val: BigInt(Math.min(20 * (position + 1), 1000)) };
  },
};

export const dockerdPolicy = {
  startTimeoutMs(attempt) {
    return 300000n;
  },
  onStartFailure(attempt, failure, logTail) {
    if (attempt.attempt < 5 && logTail.includes(CONTAINERD_TIMEOUT)) return { tag: 'retry-after', val: 5000n };
    return { tag: 'give-up', val: 'dockerd did not start' };
  },
  stopTimeoutMs(cacheId) {
    return 30000n;
  },
};
