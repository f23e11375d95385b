//! The progress line of a waiting request (stderr): at the start of the wait, then every
//! `progress_interval`; one line on success saying how long it waited (only if it waited).

use std::io::Write;
use std::time::Duration;

/// What a progress line shows of one holder.
#[derive(Debug, Clone)]
pub struct HolderView {
    /// The holder's host.
    pub host: String,
    /// Its pid there.
    pub pid: u32,
    /// Its ticket id.
    pub ticket: String,
    /// How long it has held the lock, if known.
    pub held_for_ms: Option<u64>,
}

/// Progress lines of one request, timed by the clock of the events that drive them (see
/// `lock::events`): at the start of the wait, then every `interval`.
#[derive(Debug)]
pub struct Progress {
    name: String,
    interval: Duration,
    next: Option<Duration>,
    shown: bool,
}

impl Progress {
    /// Reporting for lock `name`, every `interval` (at least 100 ms).
    pub fn new(name: &str, interval: Duration) -> Self {
        Self {
            name: name.to_string(),
            interval: interval.max(Duration::from_millis(100)),
            next: None,
            shown: false,
        }
    }

    /// Whether a line is due at `at`.
    pub fn due(&self, at: Duration) -> bool {
        self.next.is_none_or(|n| at >= n)
    }

    /// Prints a waiting line (`position` is 1-based among `waiting` waiters) and schedules
    /// the next one.
    pub fn waiting(
        &mut self,
        at: Duration,
        holders: &[HolderView],
        position: usize,
        waiting: usize,
    ) {
        self.next = Some(at + self.interval);
        self.shown = true;
        // A closed stderr must not end a waiting request: nothing is said then.
        let _ = writeln!(
            std::io::stderr(),
            "cachelock: waiting for lock {}: {}; position {position} of {waiting} waiting",
            self.name,
            describe_holders(holders)
        );
    }

    /// The lock is taken after `waited`; says so only if a waiting line was printed.
    pub fn acquired(&self, waited: Duration) {
        if self.shown {
            let _ = writeln!(
                std::io::stderr(),
                "cachelock: acquired lock {} after waiting {:.1}s",
                self.name,
                waited.as_secs_f64()
            );
        }
    }
}

/// "held by host:pid (ticket T, for 3.2s)", or what an empty holder list means.
pub fn describe_holders(holders: &[HolderView]) -> String {
    if holders.is_empty() {
        return "free and about to be taken by the next in line (or held by a process without a ticket, such as a command that outlived its cachelock)".to_string();
    }
    let parts: Vec<String> = holders
        .iter()
        .map(|h| {
            let age = h
                .held_for_ms
                .map(|ms| format!(", for {:.1}s", ms as f64 / 1000.0))
                .unwrap_or_default();
            format!(
                "{}:{} (ticket {}{age})",
                super::escape(&h.host),
                h.pid,
                super::escape(&h.ticket)
            )
        })
        .collect();
    format!("held by {}", parts.join(", "))
}
