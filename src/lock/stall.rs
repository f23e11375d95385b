//! Waiters ahead that never take a free lock.
//!
//! A head waiter that is stopped (SIGSTOP, a debugger) or a live ticket planted by a user of
//! the lock directory that never tries would otherwise keep a free lock free while everyone
//! behind it waits. So each waiter keeps, for every ticket of the head set ahead of it, how
//! long it has seen the lock free (fewer holders than slots) while that ticket was there.
//! Past [`GRACE`] that ticket is *stalled*: this waiter orders the queue as if it were not
//! there, so the next in line tries the lock. Only the order of *trying* changes: the kernel
//! still decides who holds. A stalled ticket stays skipped by this waiter until it leaves the
//! queue; if it wakes up, it competes for the lock like a newcomer.

use std::collections::HashMap;
use std::time::{Duration, Instant};

/// How long a free lock may stay untaken by the head set before the next in line tries it.
/// Far above any head's polling interval (the built-in policies poll at the head every 20 ms).
pub const GRACE: Duration = Duration::from_secs(2);

/// What one waiter has seen of the tickets ahead of it.
#[derive(Debug, Default)]
pub struct Stalls {
    seen: HashMap<String, Seen>,
}

#[derive(Debug, Default, Clone, Copy)]
struct Seen {
    /// Time seen at the head with the lock free, summed over evaluations.
    free_for: Duration,
    /// The previous evaluation at which it was at the head with the lock free.
    last: Option<Instant>,
}

impl Stalls {
    /// Records one evaluation at `now`: `ahead` are the tickets of the head set before us,
    /// `free` whether the lock looked free, `live` every live ticket id (others are forgotten).
    pub fn observe<'a>(
        &mut self,
        ahead: impl IntoIterator<Item = &'a str>,
        free: bool,
        live: impl IntoIterator<Item = &'a str>,
        now: Instant,
    ) {
        let live: std::collections::HashSet<&str> = live.into_iter().collect();
        self.seen.retain(|id, _| live.contains(id.as_str()));
        let ahead: std::collections::HashSet<&str> = ahead.into_iter().collect();
        for (id, s) in self.seen.iter_mut() {
            if !free || !ahead.contains(id.as_str()) {
                s.last = None;
            }
        }
        if !free {
            return;
        }
        for id in ahead {
            let s = self.seen.entry(id.to_string()).or_default();
            if let Some(last) = s.last {
                s.free_for += now.saturating_duration_since(last);
            }
            s.last = Some(now);
        }
    }

    /// Whether `id` has left a free lock untaken for longer than [`GRACE`].
    pub fn is_stalled(&self, id: &str) -> bool {
        self.free_for(id) >= GRACE
    }

    /// How long `id` has been seen leaving a free lock untaken.
    pub fn free_for(&self, id: &str) -> Duration {
        self.seen.get(id).map(|s| s.free_for).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_time_with_the_lock_free_at_the_head_counts() {
        let mut s = Stalls::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        s.observe(["a"], true, ["a", "me"], at(0));
        s.observe(["a"], true, ["a", "me"], at(1500));
        assert_eq!(s.free_for("a"), Duration::from_millis(1500));
        // Held meanwhile: the gap does not count.
        s.observe(["a"], false, ["a", "me"], at(5000));
        s.observe(["a"], true, ["a", "me"], at(5100));
        assert!(!s.is_stalled("a"));
        s.observe(["a"], true, ["a", "me"], at(5700));
        assert!(s.is_stalled("a"));
        // Gone from the queue: forgotten.
        s.observe([], true, ["me"], at(6000));
        assert_eq!(s.free_for("a"), Duration::ZERO);
    }
}
