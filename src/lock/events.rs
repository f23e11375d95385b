//! What a request does, as events: the one seam that progress lines, logs, metrics and a
//! request log observe. The scheduler ([`super::schedule`]) emits every event of the wait; the
//! [`super::Guard`] emits the last one of a request that held the lock, at its release.
//!
//! Events borrow what they show (no allocation to emit one), and an [`Observers`] list that is
//! empty costs one branch per event: an uncontended request that nobody observes pays nothing.
//! Every request ends with exactly one [`Event::Finished`], whose [`Summary`] carries what a
//! record of the request needs.

use std::sync::Arc;
use std::time::Duration;

use super::backend::TicketData;
use crate::policy::WaitDecision;

/// When an event happened: `at` on the driver's monotonic clock (the time since the request
/// started, in the engine; the simulated time in `policy simulate`), and the wall clock in Unix
/// milliseconds (what policies and arrival stamps use).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Now {
    /// Monotonic time since the driver's origin.
    pub at: Duration,
    /// Unix milliseconds.
    pub wall_ms: u64,
}

/// How a request ended (the values of a request log's `outcome`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// It held the lock and released it.
    Acquired,
    /// `-n`: the lock could not be taken at once.
    Conflict,
    /// `-w`: the caller's bound passed.
    Timeout,
    /// The policy gave up.
    GaveUp,
    /// The policy fell back (the lock's rule allows it): the command ran without the lock.
    FellBack,
    /// A terminating signal ended the wait.
    Interrupted,
    /// The lock (its lease) was lost while held.
    Lost,
    /// The store or the policy failed.
    Error,
}

impl Outcome {
    /// Every outcome, in the order metrics list them.
    pub const ALL: [Outcome; 8] = [
        Outcome::Acquired,
        Outcome::Conflict,
        Outcome::Timeout,
        Outcome::GaveUp,
        Outcome::FellBack,
        Outcome::Interrupted,
        Outcome::Lost,
        Outcome::Error,
    ];

    /// The outcome a log or a metric label names `s`.
    pub fn parse(s: &str) -> Option<Outcome> {
        Outcome::ALL.into_iter().find(|o| o.as_str() == s)
    }

    /// The name a log or a metric label uses.
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Acquired => "acquired",
            Outcome::Conflict => "conflict",
            Outcome::Timeout => "timeout",
            Outcome::GaveUp => "gave_up",
            Outcome::FellBack => "fell_back",
            Outcome::Interrupted => "interrupted",
            Outcome::Lost => "lost",
            Outcome::Error => "error",
        }
    }
}

/// A place in the serving order (1-based) among `of` waiters, ourselves included.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    /// 1 is next.
    pub position: usize,
    /// Waiters in the order, us included.
    pub of: usize,
}

/// What a finished request's record holds.
#[derive(Debug, Clone, Copy)]
pub struct Summary<'a> {
    /// Our ticket: lock, id, host, pid, priority, labels, arrival; holding, slot and
    /// generation when the lock was held.
    pub ticket: &'a TicketData,
    /// The policy's name as configured.
    pub policy: &'a str,
    /// The hex sha256 of the policy's module, if known (see `Policy::digest`).
    pub digest: Option<&'a str>,
    /// Decisions of the policy that faulted during the request.
    pub faults: u32,
    /// How it ended.
    pub outcome: Outcome,
    /// Why, for an ending other than a release (the message the caller is given).
    pub reason: Option<&'a str>,
    /// Time from arrival to acquisition, or to the end of the wait.
    pub waited: Duration,
    /// Time the lock was held, if it was.
    pub held: Option<Duration>,
    /// The place at the first look at the queue.
    pub position_at_arrival: Option<Position>,
    /// How many times the policy was asked whether to keep waiting.
    pub decisions: u32,
    /// Its last answer.
    pub last_decision: Option<&'a WaitDecision>,
}

/// One thing a request did.
#[derive(Debug, Clone, Copy)]
pub enum Event<'a> {
    /// Its ticket is in the queue.
    Arrived {
        /// The published ticket (id and arrival stamp assigned).
        ticket: &'a TicketData,
    },
    /// It looked at the queue and ordered it.
    Ranked {
        /// Our place.
        position: Position,
        /// Whether we are in the head set (we may try the lock).
        in_head: bool,
        /// The holders seen.
        holders: &'a [TicketData],
        /// The waiters in serving order with their ranks (us included; passed ones excluded).
        order: &'a [(TicketData, i64)],
        /// Whether the look reused the previous one for tickets still listed.
        listed: bool,
    },
    /// Tickets ahead that left a free lock untaken too long are passed (see `stall`).
    Passed {
        /// The passed tickets.
        tickets: &'a [TicketData],
        /// How long the lock had been seen free meanwhile.
        free_for: Duration,
    },
    /// It tried the lock.
    Tried {
        /// Whether it was granted.
        granted: bool,
    },
    /// The policy was asked whether to keep waiting.
    Decided {
        /// Its answer.
        decision: &'a WaitDecision,
        /// A fall-back the lock's rule does not allow (waiting on instead).
        refused: bool,
        /// How many times it was asked before.
        evaluations: u32,
    },
    /// It waits (a progress line's moment).
    Waits {
        /// Our place.
        position: Position,
        /// The holders seen.
        holders: &'a [TicketData],
        /// The next look at the latest, on the driver's clock.
        until: Duration,
    },
    /// It holds the lock.
    Acquired {
        /// Our ticket, holding, with its slot and generation.
        ticket: &'a TicketData,
        /// Time from arrival.
        waited: Duration,
    },
    /// The request is over: the last event of every request.
    Finished(Summary<'a>),
}

/// Something that watches requests. Called on the requesting thread: keep it short.
pub trait Observer: Send + Sync {
    /// One event of one request.
    fn event(&self, now: Now, event: &Event<'_>);
}

/// The observers of a request.
#[derive(Clone, Default)]
pub struct Observers(Vec<Arc<dyn Observer>>);

impl Observers {
    /// No observers.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds one.
    pub fn push(&mut self, o: Arc<dyn Observer>) {
        self.0.push(o);
    }

    /// Whether nobody listens.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

impl std::fmt::Debug for Observers {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Observers({})", self.0.len())
    }
}

impl Observer for Observers {
    fn event(&self, now: Now, event: &Event<'_>) {
        for o in &self.0 {
            o.event(now, event);
        }
    }
}

/// Two observers as one (a driver's own beside the caller's).
pub struct Both<'a>(pub &'a dyn Observer, pub &'a dyn Observer);

impl Observer for Both<'_> {
    fn event(&self, now: Now, event: &Event<'_>) {
        self.0.event(now, event);
        self.1.event(now, event);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::lock::conformance::Never;
    use crate::lock::memory::MemoryBackend;
    use crate::lock::{acquire, Acquired, Options};
    use crate::policy::native::DefaultPolicy;
    use std::sync::Mutex;

    /// The kinds of the events seen, and each final summary's outcome, waited/held, place and
    /// decisions.
    #[derive(Default)]
    struct Log(Mutex<Vec<String>>);

    impl Observer for Log {
        fn event(&self, _: Now, e: &Event<'_>) {
            let s = match e {
                Event::Arrived { .. } => "arrived".into(),
                Event::Ranked { .. } => "ranked".into(),
                Event::Passed { .. } => "passed".into(),
                Event::Tried { granted } => format!("tried {granted}"),
                Event::Decided { .. } => "decided".into(),
                Event::Waits { .. } => "waits".into(),
                Event::Acquired { ticket, .. } => {
                    format!("acquired {}", ticket.generation.unwrap())
                }
                Event::Finished(s) => format!(
                    "finished {} held={} at={:?} decisions={} last={}",
                    s.outcome.as_str(),
                    s.held.is_some(),
                    s.position_at_arrival.map(|p| (p.position, p.of)),
                    s.decisions,
                    s.last_decision.is_some()
                ),
            };
            self.0.lock().unwrap().push(s);
        }
    }

    fn run(store: &MemoryBackend, opts: &Options) -> crate::error::Result<Acquired> {
        acquire(store, opts, &mut DefaultPolicy, &Never::new())
    }

    #[test]
    fn every_request_ends_with_one_summary() {
        let store = MemoryBackend::new();
        let log = Arc::new(Log::default());
        let mut opts = Options::new("l");
        opts.observers.push(log.clone());
        let Ok(Acquired::Held(g)) = run(&store, &opts) else {
            panic!()
        };
        opts.wait_limit_ms = Some(0);
        assert!(run(&store, &opts).is_err());
        opts.wait_limit_ms = Some(30);
        assert!(run(&store, &opts).is_err());
        assert!(store.take_away("l", g.ticket()));
        g.release();
        let seen = log.0.lock().unwrap().clone();
        let finished: Vec<&String> = seen.iter().filter(|s| s.starts_with("finished")).collect();
        assert_eq!(
            finished,
            [
                "finished conflict held=false at=Some((1, 1)) decisions=0 last=false",
                "finished timeout held=false at=Some((1, 1)) decisions=1 last=true",
                "finished lost held=true at=Some((1, 1)) decisions=0 last=false",
            ],
            "{seen:?}"
        );
        assert_eq!(
            seen[..4],
            ["arrived", "ranked", "tried true", "acquired 1"],
            "{seen:?}"
        );
    }
}
