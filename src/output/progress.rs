//! The progress line of a waiting request (stderr): at the start of the wait, then every
//! `progress_interval`; one line on success saying how long it waited (only if it waited).

use std::time::{Duration, Instant};

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

/// Progress reporting for one request; `interval: None` is quiet (`-q`).
#[derive(Debug)]
pub struct Progress {
    name: String,
    interval: Option<Duration>,
    next: Option<Instant>,
    shown: bool,
}

impl Progress {
    /// Reporting for lock `name`, every `interval` (None: never).
    pub fn new(name: &str, interval: Option<Duration>) -> Self {
        Self {
            name: name.to_string(),
            interval,
            next: None,
            shown: false,
        }
    }

    /// Called at each evaluation of a waiting request; prints when a line is due.
    /// `position` is 1-based among waiters, `holders` as last scanned.
    pub fn waiting(&mut self, holders: &[HolderView], position: usize, waiting: usize) {
        let Some(interval) = self.interval else {
            return;
        };
        let now = Instant::now();
        if self.next.is_some_and(|n| now < n) {
            return;
        }
        self.next = Some(now + interval.max(Duration::from_millis(100)));
        self.shown = true;
        eprintln!(
            "cachelock: waiting for lock {}: {}; position {position} of {waiting} waiting",
            self.name,
            describe_holders(holders)
        );
    }

    /// Called once the lock is taken after `waited`; prints only if a waiting line was printed.
    pub fn acquired(&self, waited: Duration) {
        if self.interval.is_some() && self.shown {
            eprintln!(
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
