//! Waiters ahead that never take a free lock.
//!
//! A head waiter that is stopped (SIGSTOP, a debugger) or a live ticket planted by a user of
//! the lock directory that never tries would otherwise keep a free lock free while everyone
//! behind it waits. So each waiter behind the head set keeps one clock: since when every full
//! look at the queue has seen the lock free (fewer holders than slots) with the head set ahead
//! of it, without the queue moving. Past [`GRACE`] the whole head set ahead is *passed*: this
//! waiter orders the queue as if those tickets were not there, so the next in line tries the
//! lock. Only the order of *trying* changes: the kernel (or the store's grant) still decides
//! who holds. A passed ticket stays skipped by this waiter until it leaves the queue; if it
//! wakes up, it competes for the lock like a newcomer.
//!
//! The clock belongs to the waiter's place, not to a ticket, so that any number of stalled
//! tickets is passed one head set after another (each gets [`GRACE`] as the head, as a live
//! waiter would), and so that replacing a planted ticket by a new one does not restart it. It
//! restarts only when the queue moves for us: fewer tickets ahead than at any look since it
//! started (a holder released and left; a planter can fake that only by removing for good
//! tickets it planted), or when the lock is seen held, or when we are in the head set. Looks
//! answered from a listing ([`super::backend::Queued::rescan`]) say nothing of whether the lock
//! is free, and neither count nor restart the clock.

use std::collections::HashSet;
use std::time::Duration;

/// How long a free lock may stay untaken by the head set before the next in line tries it.
/// Far above any head's polling interval (the built-in policies poll at the head every 20 ms).
pub const GRACE: Duration = Duration::from_secs(2);

/// What one waiter has seen of the head set ahead of it.
#[derive(Debug, Default)]
pub struct Stalls {
    /// Tickets passed (skipped until they leave the queue).
    passed: HashSet<String>,
    /// Since when the lock has looked free at every full look, with the head set ahead.
    free_since: Option<Duration>,
    /// The fewest tickets ahead of us seen since `free_since`.
    fewest_ahead: usize,
}

impl Stalls {
    /// Whether `id` was passed.
    pub fn is_passed(&self, id: &str) -> bool {
        !self.passed.is_empty() && self.passed.contains(id)
    }

    /// Forgets passed tickets that are no longer live.
    pub fn forget_gone<'a>(&mut self, live: impl IntoIterator<Item = &'a str>) {
        if self.passed.is_empty() {
            return;
        }
        let live: HashSet<&str> = live.into_iter().collect();
        self.passed.retain(|id| live.contains(id.as_str()));
    }

    /// Records one full look at `now`: `head_ahead` is the head set when we are not in it
    /// (passed tickets excluded; empty when we are in it), `free` whether the lock looked free,
    /// `ahead` how many tickets are ahead of us. Returns whether the head set ahead is to be
    /// passed now (then it is recorded as passed and the clock restarts).
    pub fn observe<'a>(
        &mut self,
        now: Duration,
        head_ahead: impl IntoIterator<Item = &'a str> + Clone,
        free: bool,
        ahead: usize,
    ) -> bool {
        if !free || head_ahead.clone().into_iter().next().is_none() {
            self.free_since = None;
            return false;
        }
        match self.free_since {
            Some(_) if ahead >= self.fewest_ahead => {}
            _ => {
                self.free_since = Some(now);
                self.fewest_ahead = ahead;
            }
        }
        if self.free_for(now) < GRACE {
            return false;
        }
        let before = self.passed.len();
        self.passed
            .extend(head_ahead.into_iter().map(str::to_string));
        // The next head set gets its own grace, as a live waiter there would need to notice.
        self.free_since = Some(now);
        self.fewest_ahead = ahead.saturating_sub(self.passed.len() - before);
        true
    }

    /// How long the lock has looked free with the head set ahead not taking it.
    pub fn free_for(&self, now: Duration) -> Duration {
        self.free_since
            .map(|s| now.saturating_sub(s))
            .unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    #[test]
    fn a_head_that_leaves_the_lock_free_is_passed_after_the_grace() {
        let mut s = Stalls::default();
        assert!(!s.observe(ms(0), ["a"], true, 1));
        assert!(!s.observe(ms(1500), ["a"], true, 1));
        // Held meanwhile: the clock restarts.
        assert!(!s.observe(ms(1600), ["a"], false, 1));
        assert!(!s.observe(ms(1700), ["a"], true, 1));
        assert!(!s.observe(ms(3600), ["a"], true, 1));
        assert!(s.observe(ms(3700), ["a"], true, 1));
        assert!(s.is_passed("a"));
        s.forget_gone(["me"]);
        assert!(!s.is_passed("a"));
    }

    #[test]
    fn every_stalled_head_is_passed_in_turn() {
        let mut s = Stalls::default();
        assert!(!s.observe(ms(0), ["a"], true, 2));
        assert!(s.observe(ms(2000), ["a"], true, 2));
        // "b" is the head now, and gets its own grace.
        assert!(!s.observe(ms(2000), ["b"], true, 1));
        assert!(!s.observe(ms(3999), ["b"], true, 1));
        assert!(s.observe(ms(4000), ["b"], true, 1));
        assert!(s.is_passed("a") && s.is_passed("b"));
    }

    #[test]
    fn a_replaced_head_does_not_restart_the_clock_but_progress_does() {
        let mut s = Stalls::default();
        assert!(!s.observe(ms(0), ["p1"], true, 3));
        // Replaced by a new ticket, as many ahead as before: the clock runs on.
        assert!(!s.observe(ms(1500), ["p2"], true, 3));
        assert!(s.observe(ms(2000), ["p2"], true, 3));
        let mut s = Stalls::default();
        assert!(!s.observe(ms(0), ["h1"], true, 3));
        // The head released and left: fewer ahead, the queue moves.
        assert!(!s.observe(ms(1500), ["h2"], true, 2));
        assert!(!s.observe(ms(3000), ["h2"], true, 2));
        assert!(s.observe(ms(3500), ["h2"], true, 2));
    }

    #[test]
    fn nothing_counts_in_the_head_set() {
        let mut s = Stalls::default();
        assert!(!s.observe(ms(0), [], true, 0));
        assert!(!s.observe(ms(5000), [], true, 0));
        assert_eq!(s.free_for(ms(5000)), Duration::ZERO);
    }
}
