//! `builtin:deadline`: gives up after `max_wait`, or falls back (runs without the shared lock,
//! where the lock's rule allows it) after `fallback_after`; re-evaluates with exponential
//! backoff and jitter, except at the head of the queue, which keeps looking often.
//!
//! Config (durations such as `90s`, `5m`, `250ms`): `max_wait`, `fallback_after` (each
//! optional), `base_interval` (default 50ms), `max_interval` (default 2s).
use cachelock_policy_sdk::*;

struct Deadline {
    max_wait: Option<u64>,
    fallback_after: Option<u64>,
    base: u64,
    cap: u64,
}

impl Policy for Deadline {
    fn configure(config: &Config) -> Result<Self, String> {
        config.deny_unknown(&["max_wait", "fallback_after", "base_interval", "max_interval"])?;
        let base = config.duration_ms("base_interval")?.unwrap_or(50).max(1);
        let cap = config.duration_ms("max_interval")?.unwrap_or(2_000).max(base);
        Ok(Deadline {
            max_wait: config.duration_ms("max_wait")?,
            fallback_after: config.duration_ms("fallback_after")?,
            base,
            cap,
        })
    }

    fn on_wait(&mut self, state: &WaitState) -> WaitDecision {
        let waited = state.waited_ms;
        let secs = |ms: u64| ms as f64 / 1000.0;
        if let Some(limit) = state.me.request.wait_limit_ms {
            if waited >= limit {
                return WaitDecision::GiveUp(format!(
                    "waited {:.1}s, the caller's limit",
                    secs(waited)
                ));
            }
        }
        // max_wait first: where the lock refuses a fallback, the request keeps waiting after
        // fallback_after and still gives up at max_wait.
        if let Some(m) = self.max_wait {
            if waited >= m {
                return WaitDecision::GiveUp(format!(
                    "waited {:.1}s, the policy's max_wait of {:.1}s",
                    secs(waited),
                    secs(m)
                ));
            }
        }
        if let Some(f) = self.fallback_after {
            if waited >= f {
                return WaitDecision::FallBack(format!(
                    "waited {:.1}s (fallback_after {:.1}s): running without the shared lock",
                    secs(waited),
                    secs(f)
                ));
            }
        }
        let pos = defaults::position(state, |t| defaults::rank(t));
        let mut interval = if pos == 0 {
            self.base
        } else {
            let exp = state.evaluations.min(30);
            let raw = self.base.saturating_mul(1u64 << exp).min(self.cap);
            // Jitter in [75%, 100%] so that waiters that arrived together spread out;
            // derived from the ticket id so that it is deterministic.
            let h = fnv1a(state.me.id.as_bytes()) ^ (state.evaluations as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15);
            raw - raw * (h % 26) / 100
        };
        // Never sleep past the next deadline.
        for d in [self.fallback_after, self.max_wait, state.me.request.wait_limit_ms]
            .into_iter()
            .flatten()
        {
            if d > waited {
                interval = interval.min(d - waited);
            }
        }
        WaitDecision::KeepWaiting(interval.max(1))
    }
}

fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ *b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

export_policy!(Deadline);
