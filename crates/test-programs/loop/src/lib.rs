//! Test policy: `rank` never returns (an endless loop). The host's fuel limit must end it.
use cachelock_policy_sdk::*;

struct Loop;

impl Policy for Loop {
    fn configure(_: &Config) -> Result<Self, String> {
        Ok(Loop)
    }
    fn rank(&mut self, t: &Ticket, now_ms: u64) -> i64 {
        let mut x = now_ms ^ t.request.enqueued_at_ms;
        loop {
            x = std::hint::black_box(x.wrapping_mul(31).wrapping_add(7));
        }
    }
}

export_policy!(Loop);
