//! Test policy for engine and torture tests: rank = priority + one point per `ms_per_point`
//! (config, default 100) waited, so ranks change while requests wait.
use cachelock_policy_sdk::*;

struct Aging {
    ms_per_point: u64,
}

impl Policy for Aging {
    fn configure(config: &Config) -> Result<Self, String> {
        config.deny_unknown(&["ms_per_point"])?;
        Ok(Aging {
            ms_per_point: config.parse_or("ms_per_point", 100u64)?.max(1),
        })
    }
    fn rank(&mut self, t: &Ticket, now_ms: u64) -> i64 {
        let waited = now_ms.saturating_sub(t.request.enqueued_at_ms);
        (t.request.priority as i64).saturating_add((waited / self.ms_per_point) as i64)
    }
}

export_policy!(Aging);
